//! Serializer throughput and the cost of persisting an image, against raw disk writes.
//!
//! ```text
//! cargo bench -p kiln --bench serializers
//! ```
//!
//! Prints markdown tables (medians of several runs) for docs/PERFORMANCE.md. Images are
//! synthetic "photos": smooth gradients plus noise, which compress like camera images.

use std::hint::black_box;
use std::time::{Duration, Instant};

use image::RgbImage;
use kiln::prelude::*;
use kiln::result::StorageConfig;
use kiln::serializer::{Jpeg, Json, MsgPack, Png, PngFilter, Qoi, RawPixels, Serializer, Zstd};
use serde::{Deserialize, Serialize};

fn photo(w: u32, h: u32) -> RgbImage {
    let mut rng = fastrand::Rng::with_seed(7);
    RgbImage::from_fn(w, h, |x, y| {
        let n = rng.u8(0..24);
        image::Rgb([
            ((x * 255 / w) as u8).wrapping_add(n),
            ((y * 255 / h) as u8).wrapping_add(n / 2),
            (((x + y) * 127 / (w + h)) as u8).wrapping_add(n),
        ])
    })
}

/// A flat image, as screenshots and renders are: bands of one colour, a gradient, dark
/// marks.
fn flat(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        if (x / 40 + y / 24) % 3 == 0 {
            image::Rgb([250, 250, 250])
        } else if (x * 7 + y * 13) % 97 < 9 {
            image::Rgb([20, 20, 30])
        } else {
            image::Rgb([(x % 256) as u8, 90, 200])
        }
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut()) -> Duration {
    f(); // warm up
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn row<T, S: Serializer<T>>(label: &str, what: &str, s: &S, value: &T, raw_bytes: usize, runs: usize) {
    let mut encoded = Vec::new();
    let enc = time(runs, || {
        encoded.clear();
        s.encode(value, &mut encoded).unwrap();
    });
    let dec = time(runs, || {
        black_box(s.decode(&encoded).unwrap());
    });
    println!(
        "| {label} | {what} | {:.0} MB/s ({:.1} ms) | {:.0} MB/s ({:.1} ms) | {:.2} MB ({:.0}%) |",
        mbps(raw_bytes, enc),
        enc.as_secs_f64() * 1e3,
        mbps(raw_bytes, dec),
        dec.as_secs_f64() * 1e3,
        encoded.len() as f64 / 1e6,
        encoded.len() as f64 * 100.0 / raw_bytes as f64
    );
}

#[derive(Clone, Serialize, Deserialize)]
struct Item {
    id: u64,
    name: String,
    price: f64,
    tags: Vec<String>,
    attributes: std::collections::BTreeMap<String, String>,
    stock: Option<u32>,
}

fn items(n: usize) -> Vec<Item> {
    (0..n)
        .map(|i| Item {
            id: i as u64,
            name: format!("item number {i}"),
            price: i as f64 * 1.25,
            tags: vec!["red".into(), format!("batch-{}", i % 17)],
            attributes: [
                ("size".to_string(), "XL".to_string()),
                ("origin".into(), format!("plant {}", i % 5)),
            ]
            .into(),
            stock: (i % 3 != 0).then_some(i as u32),
        })
        .collect()
}

#[task(persist, storage = "bench", serializer = Png::default())]
fn persist_png(img: RgbImage) -> RgbImage {
    img
}

#[task(persist, storage = "bench", serializer = Qoi)]
fn persist_qoi(img: RgbImage) -> RgbImage {
    img
}

#[task(persist, storage = "bench", serializer = RawPixels)]
fn persist_raw(img: RgbImage) -> RgbImage {
    img
}

#[flow]
async fn persist_many(img: RgbImage, n: usize, which: u8) -> Result<(), kiln::Error> {
    for _ in 0..n {
        match which {
            0 => persist_png(img.clone()).await?,
            1 => persist_qoi(img.clone()).await?,
            _ => persist_raw(img.clone()).await?,
        };
    }
    Ok(())
}

#[task(cache = inputs, serializer = Png::default(), storage = "bench")]
fn cached_png(seed: u32) -> RgbImage {
    photo(512, 512 + seed)
}

#[task(cache = inputs, serializer = RawPixels, storage = "bench")]
fn cached_raw(seed: u32) -> RgbImage {
    photo(512, 512 + seed)
}

#[task]
fn trivial(x: u32) -> u32 {
    x + 1
}

#[flow]
async fn hits(n: usize, which: u8) -> Result<(), kiln::Error> {
    for _ in 0..n {
        match which {
            0 => drop(trivial(1).await?),
            1 => drop(cached_png(0).await?),
            _ => drop(cached_raw(0).await?),
        }
    }
    Ok(())
}

fn dd(dir: &std::path::Path, fsync: bool) -> f64 {
    let out = dir.join("dd.bin");
    let mut cmd = std::process::Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg(format!("of={}", out.display()))
        .arg("bs=786432")
        .arg("count=256");
    if fsync {
        cmd.arg("conv=fsync");
    }
    let t = Instant::now();
    let status = cmd.stderr(std::process::Stdio::null()).status().expect("dd runs");
    assert!(status.success());
    let d = t.elapsed();
    std::fs::remove_file(out).ok();
    mbps(786_432 * 256, d)
}

fn main() {
    println!("## Image serializers (one core, medians)\n");
    println!("| image | serializer | encode | decode | size (of raw) |");
    println!("|---|---|---|---|---|");
    for (label, w, runs) in [("512x512 RGB", 512u32, 15usize), ("4096x4096 RGB", 4096, 3)] {
        for (kind, img) in [("photo", photo(w, w)), ("flat", flat(w, w))] {
            let label = format!("{label} {kind}");
            let label = label.as_str();
            let raw = img.as_raw().len();
            row(
                label,
                "png, the default (fast level, Up filter)",
                &Png::default(),
                &img,
                raw,
                runs,
            );
            let paeth = Png::default().filter(PngFilter::Paeth);
            row(label, "png, fast level, Paeth filter", &paeth, &img, raw, runs);
            let adaptive = Png::default().filter(PngFilter::Adaptive);
            row(label, "png, fast level, Adaptive filter", &adaptive, &img, raw, runs);
            row(label, "png, Png::compact() (size)", &Png::compact(), &img, raw, runs);
            row(label, "qoi", &Qoi, &img, raw, runs);
            row(label, "raw-pixels", &RawPixels, &img, raw, runs);
            let zstd = Zstd {
                inner: RawPixels,
                level: 1,
            };
            row(label, "zstd(raw-pixels), level 1", &zstd, &img, raw, runs);
            if kind == "photo" {
                row(
                    label,
                    "jpeg (quality 90, lossy)",
                    &Jpeg { quality: 90 },
                    &img,
                    raw,
                    runs,
                );
            }
        }
    }
    if std::env::var("KILN_BENCH_ONLY").as_deref() == Ok("images") {
        return;
    }

    println!("\n## The default binary serializer on a struct-heavy value (20,000 records)\n");
    println!("| value | serializer | encode | decode | size (of JSON) |");
    println!("|---|---|---|---|---|");
    let value = items(20_000);
    let mut json = Vec::new();
    Json.encode(&value, &mut json).unwrap();
    row(
        "20,000 records",
        "msgpack (the default)",
        &MsgPack,
        &value,
        json.len(),
        15,
    );
    row("20,000 records", "json", &Json, &value, json.len(), 15);
    row(
        "20,000 records",
        "zstd(msgpack)",
        &Zstd::new(MsgPack),
        &value,
        json.len(),
        15,
    );

    println!("\n## Persisting a 512x512 RGB image to local storage, per task run\n");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let engine = kiln::Engine::open(home.path()).unwrap();
    engine
        .put_storage("bench", StorageConfig::Local { path: None })
        .unwrap();
    let img = photo(512, 512);
    let raw = img.as_raw().len();
    let n = 50;
    println!("| path | per task run (write) | MB/s of raw pixels | per load (read + verify + decode) |");
    println!("|---|---|---|---|");
    for (which, label) in [(0u8, "png (fast)"), (1, "qoi"), (2, "raw-pixels")] {
        let write = median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    rt.block_on(engine.scope(persist_many(img.clone(), n, which))).unwrap();
                    t.elapsed() / n as u32
                })
                .collect(),
        );
        let flow = rt.block_on(engine.store().flow_runs(1)).unwrap().pop().unwrap();
        let run = rt.block_on(engine.store().task_runs(flow.id)).unwrap().pop().unwrap();
        let reference: kiln::result::ResultRef = serde_json::from_value(run.result.unwrap()).unwrap();
        let read = time(15, || {
            let back: RgbImage = match which {
                0 => rt.block_on(engine.load_result(&reference, Png::default())).unwrap(),
                1 => rt.block_on(engine.load_result(&reference, Qoi)).unwrap(),
                _ => rt.block_on(engine.load_result(&reference, RawPixels)).unwrap(),
            };
            black_box(back);
        });
        println!(
            "| {} | {:.2} ms | {:.0} MB/s | {:.2} ms |",
            label,
            write.as_secs_f64() * 1e3,
            mbps(raw, write),
            read.as_secs_f64() * 1e3
        );
    }
    println!("\n## A cache hit on a 512x512 RGB image record in local storage, against running a trivial task\n");
    println!("| task run | per run (median of 5 batches of 100) |");
    println!("|---|---|");
    for (which, label) in [
        (0u8, "trivial task (runs)"),
        (1, "cache hit, png record"),
        (2, "cache hit, raw-pixels record"),
    ] {
        rt.block_on(engine.scope(hits(1, which))).unwrap(); // writes the record
        let per = median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    rt.block_on(engine.scope(hits(100, which))).unwrap();
                    t.elapsed() / 100
                })
                .collect(),
        );
        println!("| {label} | {:.1} µs |", per.as_secs_f64() * 1e6);
    }
    println!("\n## The machine's raw write speed (dd, 256 blocks of 786,432 bytes = one 512x512 RGB image each)\n");
    println!("| dd | MB/s | per image |");
    println!("|---|---|---|");
    for fsync in [false, true] {
        let speed = median(
            (0..3)
                .map(|_| Duration::from_secs_f64(1.0 / dd(home.path(), fsync)))
                .collect(),
        );
        let speed = 1.0 / speed.as_secs_f64();
        println!(
            "| {} | {:.0} | {:.2} ms |",
            if fsync { "conv=fsync" } else { "page cache" },
            speed,
            786_432.0 / 1e6 / speed * 1e3
        );
    }
}
