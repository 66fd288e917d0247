//! The seed pipeline: one task makes an image, the next consumes it; both results are
//! persisted as PNG records in the storage `my-results`.
//!
//! ```text
//! cargo run --release -p kiln --example image_pipeline
//! cargo run --release --bin kiln -- runs ls
//! cargo run --release --bin kiln -- runs show <flow-run-id>
//! cargo run --release --bin kiln -- result show <task-run-id>
//! cargo run --release --bin kiln -- result get <task-run-id> -o image.png
//! ```
//!
//! The image is handed from `make_image` to `consume_image` in memory, without a copy (its
//! future passed as the argument also records the dependency edge that the UI draws); the
//! records are written beside, and the state database (`$KILN_HOME/kiln.db`, default
//! `~/.kiln`) keeps only references to them.

use image::RgbImage;
use kiln::prelude::*;
use kiln::result::StorageConfig;

/// A 512x512 magenta image.
#[task(persist, storage = "my-results", serializer = Png::default())]
async fn make_image() -> anyhow::Result<RgbImage> {
    Ok(RgbImage::from_pixel(512, 512, image::Rgb([255, 0, 255])))
}

/// Consumes the image: inverts it (magenta becomes green) and hands it on.
#[task(persist, storage = "my-results", serializer = Png::default())]
async fn consume_image(mut img: RgbImage) -> anyhow::Result<RgbImage> {
    image::imageops::invert(&mut img);
    Ok(img)
}

#[flow]
async fn pipeline() -> anyhow::Result<u64> {
    let img = make_image.submit(); // a tracked task run, started at once
    let out = consume_image.submit(img).await?; // waits for it; the value is handed over in memory, the edge recorded
    Ok(u64::from(out.width()) * u64::from(out.height()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `my-results` is a local folder under $KILN_HOME/storage unless kiln.toml says otherwise.
    kiln::Engine::current()?.ensure_storage("my-results", StorageConfig::Local { path: None })?;
    let pixels = pipeline().await?;
    println!("{pixels}");
    Ok(())
}
