//! The seed pipeline across machines: `make_image` runs on a worker of pool `cpu`,
//! `consume_image` on a worker of pool `gpu`, and the image crosses between them as a
//! record in a storage both reach (an S3-compatible server here). The flow itself is the
//! deployment `images`, run by the `cpu` worker when someone starts it.
//!
//! ```text
//! # every machine: the shared storage (credentials from AWS_ACCESS_KEY_ID and
//! # AWS_SECRET_ACCESS_KEY) and the shared database, or KILN_API_URL of a Kiln server
//! kiln storage add shared --kind s3 --bucket kiln --endpoint http://10.0.0.5:9000 --allow-http
//! export KILN_DATABASE_URL=postgres://kiln@10.0.0.5/kiln
//!
//! # machine A, then machine B
//! cargo run --release -p kiln --features postgres,aws --example distributed_pipeline -- cpu
//! cargo run --release -p kiln --features postgres,aws --example distributed_pipeline -- gpu
//!
//! # anywhere
//! kiln deployment run images --wait
//! kiln runs show <flow-run-id>
//! ```
//!
//! A worker claims only what its binary holds and what its pools name; SIGINT or SIGTERM
//! stops it claiming and lets its runs finish. A worker that dies has its runs retried on
//! another (`retries`), each committing one result.

use image::RgbImage;
use kiln::prelude::*;

/// A 512x512 magenta image, made on a `cpu` worker.
#[task(pool = "cpu", storage = "shared", serializer = Png::default(), retries = 1)]
async fn make_image() -> anyhow::Result<RgbImage> {
    Ok(RgbImage::from_pixel(512, 512, image::Rgb([255, 0, 255])))
}

/// Inverts the image (magenta becomes green) on a `gpu` worker.
#[task(pool = "gpu", storage = "shared", serializer = Png::default(), retries = 1)]
async fn consume_image(mut img: RgbImage) -> anyhow::Result<RgbImage> {
    image::imageops::invert(&mut img);
    Ok(img)
}

/// The pipeline: each task runs where its pool is served; the flow waits for them.
#[flow]
async fn pipeline() -> anyhow::Result<u64> {
    let img = make_image().await?;
    let out = consume_image(img).await?;
    Ok(u64::from(out.width()) * u64::from(out.height()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let role = std::env::args().nth(1).unwrap_or_default();
    let worker = match role.as_str() {
        // Serves the flow too: `kiln deployment run images` starts it here.
        "cpu" => kiln::serve()
            .deployment(pipeline.deploy("images").pool("cpu"))
            .pool("cpu"),
        "gpu" => kiln::serve().pool("gpu"),
        _ => anyhow::bail!("usage: distributed_pipeline cpu|gpu (the pool this worker serves)"),
    };
    worker.run().await?;
    Ok(())
}
