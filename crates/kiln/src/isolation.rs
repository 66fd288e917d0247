//! Serializable isolation of cached task runs: of all the runs that miss the same cache key
//! at once, one runs and the others wait and load its record.
//!
//! Two locks, taken in order: an async lock in this process (so concurrent runs of one
//! flow, even on one thread, queue without polling), then a lease object next to the
//! record, created with a create-only put: an exclusive create on a local folder, a
//! conditional put (`If-None-Match`) on S3, Azure and GCS. The holder renews the lease
//! while it runs; a lease whose holder died expires and is taken over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kiln_store::model::now_micros;
use serde::{Deserialize, Serialize};
use tokio::sync::OwnedMutexGuard;
use tokio::task::JoinHandle;

use crate::result::{ResultError, ResultStorage, StorageKey};

/// How concurrent runs that miss the same cache key behave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Isolation {
    /// All of them run (the default): cheap, and the last write wins.
    #[default]
    ReadCommitted,
    /// One runs; the others wait for its record and load it.
    Serializable,
}

/// How long a lease lasts without renewal: a crashed holder blocks others this long at most.
pub(crate) const LEASE: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
struct Lease {
    owner: String,
    expires: i64,
}

/// A held lock on one cache key; [`CacheLock::release`] it when the record is written.
pub(crate) struct CacheLock {
    storage: ResultStorage,
    lease_key: StorageKey,
    renewer: JoinHandle<()>,
    _local: OwnedMutexGuard<()>,
}

/// What waiting for the lock ended with.
pub(crate) enum Acquired {
    /// This run holds the lock and must compute the record.
    Lock(CacheLock),
    /// Another run wrote the record meanwhile: load it.
    RecordExists,
}

/// The in-process locks, by storage and key.
type LocalLocks = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

fn local_lock(storage: &str, key: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: Mutex<Option<LocalLocks>> = Mutex::new(None);
    let mut locks = LOCKS.lock().unwrap_or_else(|p| p.into_inner());
    let locks = locks.get_or_insert_with(HashMap::new);
    // Forget locks nobody holds or waits for.
    locks.retain(|_, l| Arc::strong_count(l) > 1);
    locks.entry((storage.to_owned(), key.to_owned())).or_default().clone()
}

fn lease_key(record: &StorageKey) -> StorageKey {
    StorageKey::new(format!("locks/{record}.lock")).expect("a valid key under locks/ stays valid")
}

fn lease_bytes(owner: &str) -> Bytes {
    let lease = Lease {
        owner: owner.to_owned(),
        expires: now_micros() + LEASE.as_micros() as i64,
    };
    Bytes::from(serde_json::to_vec(&lease).expect("a lease serializes"))
}

/// Waits until this run may compute `record`, or until another run has written it.
pub(crate) async fn acquire(storage: &ResultStorage, record: &StorageKey) -> Result<Acquired, ResultError> {
    let local = local_lock(storage.name(), record.as_str()).lock_owned().await;
    let lease_key = lease_key(record);
    let owner = uuid::Uuid::now_v7().to_string();
    let mut wait = Duration::from_millis(10);
    loop {
        if storage.exists(record).await? {
            return Ok(Acquired::RecordExists);
        }
        match storage.put_bytes_if_absent(&lease_key, lease_bytes(&owner)).await {
            Ok(true) => {
                let (s, k, o) = (storage.clone(), lease_key.clone(), owner.clone());
                let renewer = tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(LEASE / 3).await;
                        if s.put_bytes(&k, lease_bytes(&o)).await.is_err() {
                            tracing::warn!("cannot renew the cache lock {k} in storage '{}'", s.name());
                        }
                    }
                });
                return Ok(Acquired::Lock(CacheLock {
                    storage: storage.clone(),
                    lease_key,
                    renewer,
                    _local: local,
                }));
            }
            Ok(false) => {
                // Held elsewhere: take it over if its holder stopped renewing it.
                let expired = match storage.get_bytes(&lease_key).await {
                    Ok(bytes) => serde_json::from_slice::<Lease>(&bytes).map_or(true, |l| l.expires <= now_micros()),
                    Err(ResultError::Missing { .. }) => false, // released meanwhile: try again at once
                    Err(e) => return Err(e),
                };
                if expired {
                    tracing::warn!(
                        "cache lock {lease_key} in storage '{}' expired; taking it over",
                        storage.name()
                    );
                    storage.delete(&lease_key).await?;
                    continue;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(250));
            }
            Err(e) => return Err(e),
        }
    }
}

impl CacheLock {
    /// Gives the lock up (after the record is written, or the run failed).
    pub(crate) async fn release(self) {
        self.renewer.abort();
        if let Err(e) = self.storage.delete(&self.lease_key).await {
            tracing::warn!(
                "cannot remove the cache lock {}: {e}; it expires by itself",
                self.lease_key
            );
        }
    }
}
