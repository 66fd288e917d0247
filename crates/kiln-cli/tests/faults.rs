//! Faults around a run: the storage unreachable for 10 s while a task persists its result.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln::StateType::*;
use kiln::prelude::*;

/// 200 KB: too large to live inline in the state database, so it goes to the storage.
#[task(storage = "flaky", retries = 6, retry_delay = exponential(1.0))]
async fn produce(n: u64) -> Vec<u64> {
    (0..25_000).map(|i| i * n).collect()
}

#[flow]
async fn outage() -> Result<usize, kiln::Error> {
    Ok(produce(3).await?.len())
}

/// A TCP proxy to `upstream` that refuses every connection while `down` is set.
fn proxy(upstream: String, down: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            if down.load(Ordering::SeqCst) {
                drop(client);
                continue;
            }
            let Ok(server) = TcpStream::connect(&upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    format!("http://{address}")
}

#[test]
fn a_storage_down_for_ten_seconds_is_retried_with_backoff_and_the_task_completes() {
    let Some((endpoint, bucket)) = common::s3() else { return };
    let upstream = endpoint.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let down = Arc::new(AtomicBool::new(true));
    let through = proxy(upstream, down.clone());
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("kiln.toml"),
        format!(
            "[storage.flaky]\nkind = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{through}\"\naccess_key_id = \"test\"\n\
             secret_access_key = \"test\"\nallow_http = true\nprefix = \"faults/{}\"\n",
            uuid::Uuid::now_v7().simple()
        ),
    )
    .unwrap();
    let engine = kiln::Engine::open(home.path()).unwrap();
    let started = Instant::now();
    let back = {
        let down = down.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(10));
            down.store(false, Ordering::SeqCst);
        })
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let len = rt.block_on(engine.scope(outage())).unwrap();
    back.join().unwrap();
    assert_eq!(len, 25_000);
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "it completed after the outage"
    );
    let store = engine.store().clone();
    let flow = rt.block_on(store.flow_runs(1)).unwrap().remove(0);
    let task = rt.block_on(store.task_runs(flow.id)).unwrap().remove(0);
    assert_eq!(task.state, Completed);
    let history = rt.block_on(store.states(task.id)).unwrap();
    let waits: Vec<_> = history.iter().filter(|s| s.state == AwaitingRetry).collect();
    assert!(!waits.is_empty(), "{history:?}");
    assert!(
        waits[0].message.as_deref().unwrap().contains("could not be persisted"),
        "{:?}",
        waits[0]
    );
    assert_eq!(history.iter().filter(|s| s.state == Completed).count(), 1);
    assert_eq!(task.result.unwrap()["storage"], "flaky");
}
