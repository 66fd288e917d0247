//! The seed pipeline with a PNG serializer written by the user: implementing
//! `kiln::serializer::Serializer` for your type is all it takes.
//!
//! ```text
//! cargo run --release -p kiln --example image_pipeline_custom
//! ```

use std::borrow::Cow;

use image::{ImageFormat, RgbImage};
use kiln::prelude::*;
use kiln::result::StorageConfig;
use kiln::serializer::SerializeError;

/// PNG through the `image` crate, under the name `my-png`.
struct MyPng;

impl Serializer<RgbImage> for MyPng {
    fn name(&self) -> Cow<'static, str> {
        "my-png".into()
    }
    fn encode(&self, img: &RgbImage, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        img.write_to(&mut std::io::Cursor::new(out), ImageFormat::Png)
            .map_err(|e| SerializeError::encode("my-png", e))
    }
    fn decode(&self, bytes: &[u8]) -> Result<RgbImage, SerializeError> {
        let img = image::load_from_memory_with_format(bytes, ImageFormat::Png);
        Ok(img.map_err(|e| SerializeError::decode("my-png", e))?.into_rgb8())
    }
}

#[task(persist, storage = "my-results", serializer = MyPng)]
async fn make_image() -> anyhow::Result<RgbImage> {
    Ok(RgbImage::from_pixel(512, 512, image::Rgb([255, 0, 255])))
}

#[task(persist, storage = "my-results", serializer = MyPng)]
async fn consume_image(mut img: RgbImage) -> anyhow::Result<RgbImage> {
    image::imageops::invert(&mut img);
    Ok(img)
}

#[flow]
async fn pipeline_custom() -> anyhow::Result<u64> {
    let img = make_image().await?;
    let out = consume_image(img).await?;
    Ok(u64::from(out.width()) * u64::from(out.height()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kiln::Engine::current()?.ensure_storage("my-results", StorageConfig::Local { path: None })?;
    println!("{}", pipeline_custom().await?);
    Ok(())
}
