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
//! (`staging/<transaction id>/<key>`), and a task run that succeeds stays `Running` until
//! the transaction ends: its `Completed` state, with the reference to its record, is
//! recorded only once the record is at its key.
//!
//! When the body returns `Ok` and no task run in it failed, the staged records are moved to
//! their keys **all or nothing** (an object store has no multi-object transaction: a record
//! that a commit replaces is kept aside until every move succeeded, and put back if one
//! fails), the task runs enter `Completed` and the `on_commit` hooks run. Otherwise the
//! staged records are deleted, the task runs that had succeeded enter `RolledBack` (no
//! result), and their `on_rollback` hooks run, newest first, so they can undo side effects.
//! A transaction whose body returned `Ok` but that rolled back (a task run failed and the
//! body handled its error, or the commit failed) returns [`Error::RolledBack`]. A
//! transaction inside another follows the outer one.

use std::future::Future;
use std::sync::{Arc, Mutex};

use kiln_store::state::StateType;
use uuid::Uuid;

use crate::Error;
use crate::error::RunLabel;
use crate::result::{ResultError, ResultStorage, StorageKey};
use crate::run::{Completion, Tracker};

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

/// A task run that succeeded in the transaction, waiting for its end.
struct Deferred {
    tracker: Tracker,
    completion: Completion,
    on_commit: Option<TransactionHook>,
    on_rollback: Option<TransactionHook>,
}

impl Deferred {
    fn run(&self) -> TransactionRun {
        TransactionRun {
            run_id: self.tracker.id(),
            name: self.tracker.label.name.to_string(),
            key: self.completion.reference.as_ref().map(|r| r.key.clone()),
        }
    }
}

#[derive(Default)]
struct Inner {
    staged: Vec<Staged>,
    deferred: Vec<Deferred>,
    /// The first task run that failed in it.
    failure: Option<String>,
}

/// The transaction a task run belongs to.
pub(crate) struct TransactionContext {
    pub(crate) id: Uuid,
    inner: Mutex<Inner>,
}

tokio::task_local! {
    pub(crate) static TRANSACTION: Arc<TransactionContext>;
}

pub(crate) fn current() -> Option<Arc<TransactionContext>> {
    TRANSACTION.try_with(Arc::clone).ok()
}

impl TransactionContext {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a record for `target` is written until commit.
    pub(crate) fn staging_key(&self, target: &StorageKey) -> StorageKey {
        StorageKey::new(format!("staging/{}/{target}", self.id)).expect("a valid key stays valid under staging/")
    }

    /// Where a record that the commit replaces is kept until the commit has succeeded.
    fn previous_key(&self, target: &StorageKey) -> StorageKey {
        StorageKey::new(format!("staging/{}-previous/{target}", self.id))
            .expect("a valid key stays valid under staging/")
    }

    pub(crate) fn stage(&self, storage: ResultStorage, staging: StorageKey, target: StorageKey) {
        self.inner().staged.push(Staged {
            storage,
            staging,
            target,
        });
    }

    /// A task run in the transaction succeeded: it completes or rolls back with it.
    pub(crate) fn completed(
        &self,
        tracker: Tracker,
        completion: Completion,
        on_commit: Option<TransactionHook>,
        on_rollback: Option<TransactionHook>,
    ) {
        self.inner().deferred.push(Deferred {
            tracker,
            completion,
            on_commit,
            on_rollback,
        });
    }

    /// A task run in the transaction failed: the transaction will roll back.
    pub(crate) fn failed(&self, run: &RunLabel) {
        self.inner()
            .failure
            .get_or_insert_with(|| format!("{run} failed inside it"));
    }

    fn failure(&self) -> Option<String> {
        self.inner().failure.clone()
    }

    /// Moves every staged record to its key, or none; then completes the task runs.
    async fn commit(&self) -> Result<(), Error> {
        let Inner { staged, deferred, .. } = std::mem::take(&mut *self.inner());
        if let Err(e) = self.publish(&staged).await {
            let cause = format!("its commit failed: {e}");
            self.roll_back(&cause, &staged, deferred).await;
            return Err(Error::RolledBack {
                transaction: self.id,
                cause,
            });
        }
        let mut first_error = None;
        for mut d in deferred {
            let note = match d.completion.note.take() {
                Some(note) => format!("{note}; committed with transaction {}", self.id),
                None => format!("committed with transaction {}", self.id),
            };
            let entered =
                d.tracker
                    .enter_with_result(StateType::Completed, Some(note), d.completion.reference.as_ref());
            if let Err(e) = entered {
                first_error.get_or_insert(e);
            }
            if let Some(hook) = d.on_commit {
                hook(&d.run());
            }
        }
        tracing::debug!("transaction {} committed", self.id);
        first_error.map_or(Ok(()), Err)
    }

    /// All or nothing: each record a move would replace is first copied aside; when a move
    /// fails, the moved ones are put back (or removed) and the error returned.
    async fn publish(&self, staged: &[Staged]) -> Result<(), ResultError> {
        let mut moved: Vec<(&Staged, Option<StorageKey>)> = Vec::new();
        for s in staged {
            match self.publish_one(s).await {
                Ok(previous) => moved.push((s, previous)),
                Err(e) => {
                    for (s, previous) in moved.into_iter().rev() {
                        let undone = match previous {
                            Some(previous) => s.storage.rename(&previous, &s.target).await,
                            None => s.storage.delete(&s.target).await,
                        };
                        if let Err(undo) = undone {
                            tracing::error!(
                                "transaction {}: cannot undo the commit of '{}' in storage '{}': {undo}; \
                                 that record is from the failed transaction",
                                self.id,
                                s.target,
                                s.storage.name()
                            );
                        }
                    }
                    return Err(e);
                }
            }
        }
        for (s, previous) in moved {
            if let Some(previous) = previous
                && let Err(e) = s.storage.delete(&previous).await
            {
                tracing::warn!("transaction {}: cannot remove {previous}: {e}", self.id);
            }
        }
        Ok(())
    }

    /// Moves one record to its key; the record it replaces, if any, is kept aside.
    async fn publish_one(&self, s: &Staged) -> Result<Option<StorageKey>, ResultError> {
        let previous = if s.storage.exists(&s.target).await? {
            let key = self.previous_key(&s.target);
            s.storage.copy(&s.target, &key).await?;
            Some(key)
        } else {
            None
        };
        if let Err(e) = s.storage.rename(&s.staging, &s.target).await {
            if let Some(previous) = &previous {
                let _ = s.storage.delete(previous).await;
            }
            return Err(e);
        }
        Ok(previous)
    }

    async fn rollback(&self, cause: &str) {
        let Inner { staged, deferred, .. } = std::mem::take(&mut *self.inner());
        self.roll_back(cause, &staged, deferred).await;
    }

    async fn roll_back(&self, cause: &str, staged: &[Staged], deferred: Vec<Deferred>) {
        tracing::info!("transaction {} rolled back: {cause}", self.id);
        for s in staged {
            if let Err(e) = s.storage.delete(&s.staging).await {
                tracing::warn!("rolling back transaction {}: cannot delete {}: {e}", self.id, s.staging);
            }
        }
        let message = format!(
            "transaction {} rolled back ({cause}); this run's result was discarded",
            self.id
        );
        let mut undo = Vec::new();
        for mut d in deferred {
            if let Err(e) = d.tracker.to(StateType::RolledBack, Some(message.clone())) {
                tracing::error!("{}: cannot record RolledBack: {e}", d.tracker.label);
            }
            undo.push(d);
        }
        for d in undo.iter().rev() {
            if let Some(hook) = d.on_rollback {
                hook(&d.run());
            }
        }
    }
}

/// Runs `body` as a transaction (see the module docs).
///
/// Returns the body's value when everything committed; the body's error when it failed;
/// and [`Error::RolledBack`] (converted into `E`) when the body returned `Ok` but the
/// transaction rolled back anyway: a task run inside it failed, or the commit did.
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
        inner: Mutex::new(Inner::default()),
    });
    let outcome = TRANSACTION.scope(tx.clone(), body).await;
    match (outcome, tx.failure()) {
        (Ok(value), None) => {
            tx.commit().await.map_err(E::from)?;
            Ok(value)
        }
        (Ok(_), Some(cause)) => {
            tx.rollback(&cause).await;
            Err(E::from(Error::RolledBack {
                transaction: tx.id,
                cause,
            }))
        }
        (Err(e), failure) => {
            tx.rollback(failure.as_deref().unwrap_or("its body returned an error"))
                .await;
            Err(e)
        }
    }
}
