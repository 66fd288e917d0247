//! A 1 GiB asset goes from task to task through a storage by reference, in bounded memory.
//! Its own test binary: the peak-memory reading covers this test only.

mod support;

use std::io::Write;
use std::path::PathBuf;

use kiln::ObjectRef;
use kiln::prelude::*;

const SIZE: u64 = 1 << 30;

#[task(persist)]
async fn publish(path: String) -> Result<ObjectRef, kiln::Error> {
    ObjectRef::upload_file("local", "assets/big.bin", path).await
}

#[task]
async fn fetch(asset: ObjectRef, to: String) -> Result<u64, kiln::Error> {
    asset.download_to(&to).await?;
    Ok(std::fs::metadata(&to).map(|m| m.len()).unwrap_or(0))
}

#[flow]
async fn hand_over(from: String, to: String) -> Result<(ObjectRef, u64), kiln::Error> {
    let asset = publish(from).await?;
    let size = fetch(asset.clone(), to).await?;
    Ok((asset, size))
}

fn write_source(path: &PathBuf) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let block: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for i in 0..SIZE / block.len() as u64 {
        file.write_all(&block[..1]).unwrap(); // vary the blocks a little
        file.write_all(&[i as u8]).unwrap();
        file.write_all(&block[2..]).unwrap();
    }
    file.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gib_asset_crosses_tasks_by_reference_in_bounded_memory() {
    let home = support::home();
    let source = home.dir.path().join("source.bin");
    let copy = home.dir.path().join("copy.bin");
    write_source(&source);
    let (before, _) = support::rss();
    let (asset, size) = home
        .engine
        .scope(hand_over(source.display().to_string(), copy.display().to_string()))
        .await
        .unwrap();
    let (_, peak) = support::rss();
    assert_eq!((asset.size, size), (SIZE, SIZE));
    assert_eq!(asset.uri(), "local:assets/big.bin");
    // Streaming holds a few buffers; reading the asset whole would hold 1 GiB. The bound
    // leaves room for a loaded machine's allocator arenas.
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 400 << 20,
        "peak memory grew by {} MiB for a 1 GiB asset",
        grown >> 20
    );

    // Only the reference went through the state database and the result record.
    let flow = home.flow("hand_over");
    let publish_run = home.task(flow.id, "publish");
    let reference: kiln::result::ResultRef = serde_json::from_value(publish_run.result.unwrap()).unwrap();
    assert!(
        reference.size < 200,
        "the persisted ObjectRef is {} bytes",
        reference.size
    );
    let logs = home.store().logs(publish_run.id).await.unwrap();
    assert!(
        logs.iter().any(|l| l.message.contains("local:assets/big.bin")),
        "lineage: the URI is in the run's log"
    );

    // A changed byte in the stored object is caught on download, and the bad copy removed.
    let stored = home.dir.path().join("storage/local/assets/big.bin");
    {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::OpenOptions::new().write(true).open(&stored).unwrap();
        f.seek(SeekFrom::Start(SIZE / 2)).unwrap();
        f.write_all(b"X").unwrap();
    }
    let err = home
        .engine
        .scope(async { asset.download_to(&copy).await })
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'assets/big.bin' in storage 'local': hash mismatch"),
        "{err}"
    );
    assert!(!copy.exists());
}
