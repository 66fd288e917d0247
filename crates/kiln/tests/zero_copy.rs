//! Values pass between in-process task runs without being copied or serialised.
//!
//! Its own test binary: the peak-memory reading covers this one test only.

mod support;

use std::sync::Mutex;

use kiln::prelude::*;

const SIZE: usize = 100 * 1024 * 1024;

/// Where each task run saw the buffer's bytes.
static SEEN: Mutex<Vec<usize>> = Mutex::new(Vec::new());

#[task]
fn allocate() -> Vec<u8> {
    // Filled with non-zero bytes so every page is resident (zeroed pages may not be).
    let buf = vec![7u8; SIZE];
    SEEN.lock().unwrap().push(buf.as_ptr() as usize);
    buf
}

#[task]
async fn pass_on(mut buf: Vec<u8>) -> Vec<u8> {
    SEEN.lock().unwrap().push(buf.as_ptr() as usize);
    buf[0] = buf[0].wrapping_add(1);
    buf
}

#[flow]
async fn chain() -> Result<(usize, u8), kiln::Error> {
    // Five hand-offs by direct call, five through submitted futures.
    let mut buf = allocate().await?;
    for _ in 0..5 {
        buf = pass_on(buf).await?;
    }
    let mut fut = pass_on.submit(buf);
    for _ in 0..4 {
        fut = pass_on.submit(fut);
    }
    let buf = fut.await?;
    SEEN.lock().unwrap().push(buf.as_ptr() as usize);
    Ok((buf.len(), buf[0]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_buffer_crosses_ten_tasks_without_a_copy() {
    let home = support::home();
    let (before, _) = support::rss();
    let (len, first) = home.engine.scope(chain()).await.unwrap();
    let (_, peak) = support::rss();
    assert_eq!((len, first), (SIZE, 7 + 10));

    // One buffer all along: every task saw the same allocation.
    let seen = SEEN.lock().unwrap().clone();
    assert_eq!(seen.len(), 12);
    assert!(
        seen.iter().all(|p| *p == seen[0]),
        "the buffer was reallocated or cloned: {seen:x?}"
    );

    // And memory grew by one copy, under two (a second copy would make it 200 MiB; the
    // rest is room for a loaded machine's allocator arenas).
    let grown = peak.saturating_sub(before);
    assert!(
        grown < SIZE as u64 * 7 / 4,
        "peak memory grew by {} MiB for a {} MiB buffer",
        grown >> 20,
        SIZE >> 20
    );

    let flow = home.flow("chain");
    assert_eq!(home.tasks(flow.id).len(), 11);
}
