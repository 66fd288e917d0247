//! The seed pipeline: one task makes an image, the next consumes it.
//!
//! ```text
//! cargo run --release -p kiln --example image_pipeline
//! cargo run --release --bin kiln -- runs ls
//! ```
//!
//! The image is handed from `make_image` to `consume_image` in memory, without a copy; both
//! task runs and the flow run are recorded in `$KILN_HOME/kiln.db` (default `~/.kiln`).

use image::RgbImage;
use kiln::prelude::*;

/// A 512x512 magenta image.
#[task]
async fn make_image() -> anyhow::Result<RgbImage> {
    Ok(RgbImage::from_pixel(512, 512, image::Rgb([255, 0, 255])))
}

/// Counts the image's pixels.
#[task]
async fn consume_image(img: RgbImage) -> anyhow::Result<u64> {
    Ok(u64::from(img.width()) * u64::from(img.height()))
}

#[flow]
async fn pipeline() -> anyhow::Result<u64> {
    let img = make_image().await?; // runs as a tracked task run
    consume_image(img).await // value handed over in memory
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pixels = pipeline().await?;
    println!("{pixels}");
    Ok(())
}
