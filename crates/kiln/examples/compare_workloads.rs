//! The Kiln side of `bench/compare` and `bench/process`: one workload per run, chosen on
//! the command line.
//!
//! ```text
//! cargo run --release -p kiln --example compare_workloads -- W1 1000
//! ```
//!
//! W1: N trivial tasks in sequence; W6: N submitted at once; W2: a chain of N tasks each
//! changing every pixel of a 512x512 RGB image, nothing persisted; W3: the same, every
//! result persisted as raw pixels (`RawPixels`); W4: as PNG at the fast level (the
//! default `Png`); W4c: as PNG at the size-oriented level (`Png::compact()`); W5: W3 with
//! a cache on inputs (run twice: the second run loads every result).
//!
//! Prints one JSON line (`workload`, `result`, `records`) and, for the image workloads,
//! writes the final image's raw pixels to `$BENCH_OUT/final.raw`, so the harness can check
//! that both systems did the same work.

use image::RgbImage;
use kiln::prelude::*;
use kiln::result::StorageConfig;

#[task]
async fn inc(x: u64) -> u64 {
    x + 1
}

/// The image every chain starts from: a gradient with noise from a fixed LCG, so it
/// compresses like a photo and the Python peers (bench/*/workloads.py) make the same bytes.
fn start_image() -> RgbImage {
    let mut seed: u32 = 1;
    RgbImage::from_fn(512, 512, |x, y| {
        let mut px = [0u8; 3];
        for (c, v) in px.iter_mut().enumerate() {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0x7fff_ffff;
            let gradient = (x + y + 64 * c as u32) / 4;
            *v = ((gradient + (seed >> 16) % 32) & 255) as u8;
        }
        image::Rgb(px)
    })
}

fn step_body(mut img: RgbImage) -> RgbImage {
    // The same change as the Python workloads: every byte of every pixel, plus one.
    for v in img.iter_mut() {
        *v = v.wrapping_add(1);
    }
    img
}

#[task]
fn step(img: RgbImage) -> RgbImage {
    step_body(img)
}

#[task(persist, serializer = RawPixels)]
fn step_persisted(img: RgbImage) -> RgbImage {
    step_body(img)
}

#[task(persist, serializer = Png::default())]
fn step_png(img: RgbImage) -> RgbImage {
    step_body(img)
}

#[task(persist, serializer = Png::compact())]
fn step_png_compact(img: RgbImage) -> RgbImage {
    step_body(img)
}

#[task(cache = inputs, serializer = RawPixels)]
fn step_cached(img: RgbImage, _i: u32) -> RgbImage {
    step_body(img)
}

#[flow]
async fn w1(n: u64) -> Result<u64, kiln::Error> {
    let mut v = 0;
    for _ in 0..n {
        v = inc(v).await?;
    }
    Ok(v)
}

#[flow]
async fn chain(n: u32, kind: String) -> Result<RgbImage, kiln::Error> {
    let mut img = start_image();
    for i in 0..n {
        img = match kind.as_str() {
            "plain" => step(img).await?,
            "persisted" => step_persisted(img).await?,
            "png" => step_png(img).await?,
            "png-compact" => step_png_compact(img).await?,
            _ => step_cached(img, i).await?,
        };
    }
    Ok(img)
}

#[flow]
async fn w6(n: u64) -> Result<u64, kiln::Error> {
    Ok(kiln::join_all(inc.map(0..n)).await?.into_iter().sum())
}

fn records(engine: &kiln::Engine) -> usize {
    fn count(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| if e.path().is_dir() { count(&e.path()) } else { 1 })
                    .sum()
            })
            .unwrap_or(0)
    }
    count(&engine.home().join("storage"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (workload, n) = match args.as_slice() {
        [_, w, n] => (w.clone(), n.parse::<u64>()?),
        _ => anyhow::bail!("usage: compare_workloads W1|W2|W3|W4|W4c|W5|W6 N"),
    };
    let engine = kiln::Engine::current()?;
    engine.ensure_storage("local", StorageConfig::Local { path: None })?;
    let kind = match workload.as_str() {
        "W2" => "plain",
        "W3" => "persisted",
        "W4" => "png",
        "W4c" => "png-compact",
        _ => "cached",
    };
    let result = match workload.as_str() {
        "W1" => serde_json::json!(w1(n).await?),
        "W6" => serde_json::json!(w6(n).await?),
        "W2" | "W3" | "W4" | "W4c" | "W5" => {
            let img = chain(n as u32, kind.to_string()).await?;
            if let Ok(out) = std::env::var("BENCH_OUT") {
                std::fs::write(std::path::Path::new(&out).join("final.raw"), img.as_raw())?;
            }
            serde_json::json!("image")
        }
        other => anyhow::bail!("unknown workload {other}"),
    };
    println!(
        "{}",
        serde_json::json!({ "workload": workload, "result": result, "records": records(&engine) })
    );
    Ok(())
}
