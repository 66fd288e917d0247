//! Transactions: task runs whose results are committed together, or not at all.
//!
//! ```
//! use kiln::prelude::*;
//!
//! fn undo(run: &kiln::TransactionRun) {
//!     eprintln!("undoing what {} did", run.name);
//! }
//!
//! #[task(persist, on_rollback = undo)]
//! fn write_rows(n: u32) -> u32 { n }
//!
//! #[task(persist)]
//! fn publish(n: u32) -> anyhow::Result<u32> { Ok(n) }
//!
//! #[flow]
//! async fn load() -> anyhow::Result<u32> {
//!     kiln::transaction(async {
//!         let n = write_rows(3).await?;
//!         publish(n).await
//!     })
//!     .await
//! }
//! ```
//!
//! Inside a transaction a persisted result is written to a staging key
//! (`staging/<transaction id>/<key>`). When the body returns `Ok` and no task run in it
//! failed, the staged records are moved to their keys and the `on_commit` hooks run. Else
//! the staged records are deleted and the `on_rollback` hooks of the task runs that had
//! succeeded run, newest first, so they can undo side effects. A transaction inside
//! another follows the outer one.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::result::{ResultStorage, StorageKey};

/// What a commit or rollback hook learns about the task run it belongs to.
#[derive(Debug, Clone)]
pub struct TransactionRun {
    /// The task run's id.
    pub run_id: Uuid,
    /// The task run's name.
    pub name: String,
    /// The storage key of its result, when it persisted one.
    pub key: Option<String>,
}

/// A commit or rollback hook.
pub type TransactionHook = fn(&TransactionRun);

struct Staged {
    storage: ResultStorage,
    staging: StorageKey,
    target: StorageKey,
}

#[derive(Default)]
struct Hooks {
    commit: Vec<(TransactionHook, TransactionRun)>,
    rollback: Vec<(TransactionHook, TransactionRun)>,
}

/// The transaction a task run belongs to.
pub(crate) struct TransactionContext {
    pub(crate) id: Uuid,
    staged: Mutex<Vec<Staged>>,
    hooks: Mutex<Hooks>,
    failed: AtomicBool,
}

tokio::task_local! {
    pub(crate) static TRANSACTION: Arc<TransactionContext>;
}

pub(crate) fn current() -> Option<Arc<TransactionContext>> {
    TRANSACTION.try_with(Arc::clone).ok()
}

impl TransactionContext {
    /// Where a record for `target` is written until commit.
    pub(crate) fn staging_key(&self, target: &StorageKey) -> StorageKey {
        StorageKey::new(format!("staging/{}/{target}", self.id)).expect("a valid key stays valid under staging/")
    }

    pub(crate) fn stage(&self, storage: ResultStorage, staging: StorageKey, target: StorageKey) {
        self.staged.lock().unwrap_or_else(|p| p.into_inner()).push(Staged {
            storage,
            staging,
            target,
        });
    }

    /// Records how a task run in the transaction ended, with its hooks.
    pub(crate) fn finished(
        &self,
        run: TransactionRun,
        ok: bool,
        on_commit: Option<TransactionHook>,
        on_rollback: Option<TransactionHook>,
    ) {
        if !ok {
            self.failed.store(true, Ordering::SeqCst);
            return;
        }
        let mut hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = on_commit {
            hooks.commit.push((h, run.clone()));
        }
        if let Some(h) = on_rollback {
            hooks.rollback.push((h, run));
        }
    }

    async fn commit(&self) -> Result<(), crate::Error> {
        let staged = std::mem::take(&mut *self.staged.lock().unwrap_or_else(|p| p.into_inner()));
        for s in &staged {
            s.storage.rename(&s.staging, &s.target).await?;
        }
        let hooks = std::mem::take(&mut *self.hooks.lock().unwrap_or_else(|p| p.into_inner()));
        for (hook, run) in &hooks.commit {
            hook(run);
        }
        Ok(())
    }

    async fn rollback(&self) {
        let staged = std::mem::take(&mut *self.staged.lock().unwrap_or_else(|p| p.into_inner()));
        for s in &staged {
            if let Err(e) = s.storage.delete(&s.staging).await {
                tracing::warn!("rolling back transaction {}: cannot delete {}: {e}", self.id, s.staging);
            }
        }
        let hooks = std::mem::take(&mut *self.hooks.lock().unwrap_or_else(|p| p.into_inner()));
        for (hook, run) in hooks.rollback.iter().rev() {
            hook(run);
        }
    }
}

/// Runs `body` as a transaction (see the module docs). Returns the body's outcome; a task
/// run that failed inside it (even one whose error the body handled) rolls it back too.
pub async fn transaction<T, E, F>(body: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
    E: From<crate::Error>,
{
    if current().is_some() {
        // Nested: the outer transaction commits or rolls back everything.
        return body.await;
    }
    let tx = Arc::new(TransactionContext {
        id: Uuid::now_v7(),
        staged: Mutex::new(Vec::new()),
        hooks: Mutex::new(Hooks::default()),
        failed: AtomicBool::new(false),
    });
    let outcome = TRANSACTION.scope(tx.clone(), body).await;
    if outcome.is_ok() && !tx.failed.load(Ordering::SeqCst) {
        if let Err(e) = tx.commit().await {
            tx.rollback().await;
            return Err(E::from(e));
        }
        tracing::debug!("transaction {} committed", tx.id);
    } else {
        tracing::info!("transaction {} rolled back", tx.id);
        tx.rollback().await;
    }
    outcome
}
