//! Serializable isolation of cached task runs: of all the runs that miss the same cache key
//! at once, one runs and the others wait and load its record.
//!
//! Two locks, taken in order: an async lock in this process (so concurrent runs of one
//! flow, even on one thread, queue without polling), then a lock shared with other
//! processes:
//! - on a `local` storage, an OS file lock (`flock`) on a file next to the record, which
//!   the kernel releases when its holder exits or dies: no lease, nothing to expire;
//! - on object storage (S3, Azure, GCS, memory), a **lease** object next to the record.
//!   Every change to a lease is conditional on the version last seen (a create-only put to
//!   take a free one, `If-Match` on its ETag to renew it or to take over an expired one),
//!   so two processes that both see an expired lease cannot both take it, and a holder
//!   whose lease was taken over learns it on its next renewal instead of overwriting it.
//!   A lease is released only by the holder that still owns it.
//!
//! A lock is released when the run has written its record, and also when the run is
//! dropped or cancelled while holding it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kiln_store::model::now_micros;
use object_store::{PutMode, UpdateVersion};
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
/// Dropped without that (the run was cancelled), it releases itself.
pub(crate) struct CacheLock {
    held: Option<Held>,
    _local: OwnedMutexGuard<()>,
}

enum Held {
    /// An OS lock on an open file; closing the file releases it.
    File {
        file: std::fs::File,
        path: PathBuf,
    },
    Lease(LeaseHold),
}

/// A lease this process holds: its key, owner id, last known version and renewer.
struct LeaseHold {
    storage: ResultStorage,
    key: StorageKey,
    owner: String,
    version: Arc<Mutex<UpdateVersion>>,
    renewer: JoinHandle<()>,
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

fn lease_bytes(owner: &str, expires: i64) -> Bytes {
    let lease = Lease {
        owner: owner.to_owned(),
        expires,
    };
    Bytes::from(serde_json::to_vec(&lease).expect("a lease serializes"))
}

fn fresh_lease(owner: &str) -> Bytes {
    lease_bytes(owner, now_micros() + LEASE.as_micros() as i64)
}

/// Waits until this run may compute `record`, or until another run has written it.
pub(crate) async fn acquire(storage: &ResultStorage, record: &StorageKey) -> Result<Acquired, ResultError> {
    let local = local_lock(storage.name(), record.as_str()).lock_owned().await;
    let lock_key = lease_key(record);
    let owner = uuid::Uuid::now_v7().to_string();
    let mut wait = Duration::from_millis(10);
    loop {
        if storage.exists(record).await? {
            return Ok(Acquired::RecordExists);
        }
        let held = match storage.local_file(&lock_key) {
            Some(path) => lock_file(storage, &lock_key, path).await?,
            None => take_lease(storage, &lock_key, &owner).await?.map(Held::Lease),
        };
        if let Some(held) = held {
            return Ok(Acquired::Lock(CacheLock {
                held: Some(held),
                _local: local,
            }));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(250));
    }
}

/// Tries the OS lock on the lock file; `None` when another process holds it.
async fn lock_file(storage: &ResultStorage, key: &StorageKey, path: PathBuf) -> Result<Option<Held>, ResultError> {
    let fail = |e: std::io::Error| ResultError::Backend {
        storage: storage.name().to_owned(),
        kind: storage.kind(),
        op: "lock",
        key: key.to_string(),
        message: e.to_string(),
    };
    let attempt = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Held>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        // The holder before us deletes the file when it releases: a lock on a file that is
        // no longer at the path locks nothing. Try again with the file that is there.
        if !same_file(&file, &path) {
            return Ok(None);
        }
        Ok(Some(Held::File { file, path }))
    })
    .await
    .map_err(|e| fail(std::io::Error::other(e)))?;
    attempt.map_err(fail)
}

#[cfg(unix)]
fn same_file(file: &std::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &std::fs::File, path: &std::path::Path) -> bool {
    path.exists()
}

/// Takes the lease if it is free or expired; `None` when someone else holds it (or took
/// it first). Every write is conditional on the version just read.
async fn take_lease(storage: &ResultStorage, key: &StorageKey, owner: &str) -> Result<Option<LeaseHold>, ResultError> {
    let taken = match storage.get_versioned(key).await? {
        None => {
            storage
                .put_conditional(key, fresh_lease(owner), PutMode::Create)
                .await?
        }
        Some((bytes, seen)) => {
            let expired = serde_json::from_slice::<Lease>(&bytes).map_or(true, |l| l.expires <= now_micros());
            if !expired {
                return Ok(None);
            }
            let taken = storage
                .put_conditional(key, fresh_lease(owner), PutMode::Update(seen))
                .await?;
            if taken.is_some() {
                tracing::warn!(
                    "cache lock {key} in storage '{}' had expired (its holder stopped renewing it); taken over",
                    storage.name()
                );
            }
            taken
        }
    };
    Ok(taken.map(|version| LeaseHold::start(storage.clone(), key.clone(), owner.to_owned(), version)))
}

impl LeaseHold {
    fn start(storage: ResultStorage, key: StorageKey, owner: String, version: UpdateVersion) -> LeaseHold {
        let version = Arc::new(Mutex::new(version));
        let renewer = {
            let (storage, key, owner, version) = (storage.clone(), key.clone(), owner.clone(), version.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LEASE / 3).await;
                    if !renew(&storage, &key, &owner, &version).await {
                        return;
                    }
                }
            })
        };
        LeaseHold {
            storage,
            key,
            owner,
            version,
            renewer,
        }
    }

    /// Deletes the lease if it is still ours (the version we last wrote).
    async fn release(self) {
        self.renewer.abort();
        let ours = self.version.lock().unwrap_or_else(|p| p.into_inner()).clone();
        release_lease(&self.storage, &self.key, &self.owner, &ours).await;
    }
}

/// Extends the lease if it is still ours; `false` (and an error log) once it is not.
async fn renew(storage: &ResultStorage, key: &StorageKey, owner: &str, version: &Mutex<UpdateVersion>) -> bool {
    let seen = version.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match storage
        .put_conditional(key, fresh_lease(owner), PutMode::Update(seen))
        .await
    {
        Ok(Some(new)) => {
            *version.lock().unwrap_or_else(|p| p.into_inner()) = new;
            true
        }
        Ok(None) => {
            tracing::error!(
                "cache lock {key} in storage '{}' was taken over by another process (this one did not renew it \
                 within {LEASE:?}); both may compute the same record",
                storage.name()
            );
            false
        }
        Err(e) => {
            tracing::warn!("cannot renew the cache lock {key} in storage '{}': {e}", storage.name());
            true
        }
    }
}

async fn release_lease(storage: &ResultStorage, key: &StorageKey, owner: &str, ours: &UpdateVersion) {
    // Object stores have no conditional delete: check that the lease is still the version we
    // wrote, then delete. Only an expired lease is ever taken over, and ours is renewed
    // until here, so it cannot change between the two calls.
    match storage.get_versioned(key).await {
        Ok(Some((bytes, now))) => {
            let owner_matches = serde_json::from_slice::<Lease>(&bytes).is_ok_and(|l| l.owner == owner);
            if !owner_matches || !same_version(&now, ours) {
                tracing::debug!("cache lock {key}: held by another process now, left in place");
                return;
            }
            if let Err(e) = storage.delete(key).await {
                tracing::warn!("cannot remove the cache lock {key}: {e}; it expires by itself");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("cannot read the cache lock {key}: {e}; it expires by itself"),
    }
}

fn same_version(a: &UpdateVersion, b: &UpdateVersion) -> bool {
    match (&a.version, &b.version) {
        (Some(x), Some(y)) => x == y,
        _ => a.e_tag.is_some() && a.e_tag == b.e_tag,
    }
}

fn release_file(file: std::fs::File, path: PathBuf) {
    // Deleted while still locked, so no waiter locks a file that is about to vanish (a
    // waiter that opened it already sees a different file at the path and tries again).
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove the cache lock file {}: {e}", path.display());
    }
    drop(file);
}

impl CacheLock {
    /// Gives the lock up (after the record is written, or the run failed).
    pub(crate) async fn release(mut self) {
        match self.held.take() {
            Some(Held::File { file, path }) => release_file(file, path),
            Some(Held::Lease(lease)) => lease.release().await,
            None => {}
        }
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        match self.held.take() {
            Some(Held::File { file, path }) => release_file(file, path),
            Some(Held::Lease(lease)) => {
                lease.renewer.abort();
                // Released in the background; with no runtime left, the lease expires.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(lease.release());
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::StorageConfig;

    fn memory(name: &str) -> ResultStorage {
        ResultStorage::build(name, &StorageConfig::Memory, std::path::Path::new("/nonexistent")).unwrap()
    }

    fn key() -> StorageKey {
        StorageKey::new("locks/cache/t/abc.lock").unwrap()
    }

    async fn owner_of(storage: &ResultStorage) -> String {
        let (bytes, _) = storage.get_versioned(&key()).await.unwrap().unwrap();
        serde_json::from_slice::<Lease>(&bytes).unwrap().owner
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_by_one_process_only() {
        let storage = memory(&format!("lease-{}", uuid::Uuid::now_v7()));
        storage.put_bytes(&key(), lease_bytes("dead", 0)).await.unwrap();
        // B reads the expired lease; A takes it over first; B's takeover, based on the
        // version it read, must fail rather than replace A's lease.
        let (_, seen_by_b) = storage.get_versioned(&key()).await.unwrap().unwrap();
        let a = take_lease(&storage, &key(), "a")
            .await
            .unwrap()
            .expect("A takes the expired lease");
        let b = storage
            .put_conditional(&key(), fresh_lease("b"), PutMode::Update(seen_by_b))
            .await
            .unwrap();
        assert!(b.is_none(), "B replaced a lease it had not read");
        assert!(
            take_lease(&storage, &key(), "b").await.unwrap().is_none(),
            "A's lease is fresh"
        );
        assert_eq!(owner_of(&storage).await, "a");
        a.release().await;
        assert!(storage.get_versioned(&key()).await.unwrap().is_none(), "released");
    }

    #[tokio::test]
    async fn a_holder_whose_lease_was_taken_neither_renews_nor_releases_it() {
        let storage = memory(&format!("lease-{}", uuid::Uuid::now_v7()));
        let a = take_lease(&storage, &key(), "a").await.unwrap().unwrap();
        // Another process took the lease (as after A stalled past its expiry).
        storage.put_bytes(&key(), fresh_lease("c")).await.unwrap();
        assert!(!renew(&storage, &key(), "a", &a.version).await, "the renewal notices");
        assert_eq!(owner_of(&storage).await, "c", "and does not overwrite C's lease");
        a.release().await;
        assert_eq!(owner_of(&storage).await, "c", "A's release leaves C's lease alone");
    }

    #[tokio::test]
    async fn a_dropped_lock_releases_its_lease() {
        let storage = memory(&format!("lease-{}", uuid::Uuid::now_v7()));
        let record = StorageKey::new("cache/t/abc").unwrap();
        let Acquired::Lock(lock) = acquire(&storage, &record).await.unwrap() else {
            panic!("the lock is free")
        };
        drop(lock);
        for _ in 0..100 {
            if storage.get_versioned(&key()).await.unwrap().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the lease of a dropped lock is still there");
    }
}
