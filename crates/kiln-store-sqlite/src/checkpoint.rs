//! WAL checkpoints on a thread of their own.
//!
//! SQLite's automatic checkpoint runs in the connection that commits: the writer, which then
//! copies a thousand pages into the database file and waits for two fsyncs between two
//! batches while the writes queue up behind it. Here the writer's commits only signal a
//! checkpointer thread, which copies the log on its own connection while the writer goes on.
//!
//! A checkpoint running beside the writer never catches the end of a log that keeps
//! growing, and the log starts again from its beginning only after a checkpoint that copied
//! all of it. So past a larger size the writer checkpoints itself, between two transactions
//! (as SQLite would have), which lets its next transaction start the log again: the log stays
//! bounded under any stream of writes.

use std::os::raw::c_int;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::thread::JoinHandle;

use kiln_store::StoreError;
use rusqlite::hooks::Wal;
use rusqlite::{Connection, OpenFlags};

/// Bytes added to the log after which the checkpointer copies it. SQLite's own default for
/// its automatic checkpoints is a thousand pages (4 MiB of its default 4 KiB pages); copying
/// less often copies a page rewritten by many commits (the last leaf of each tree) fewer
/// times, and a process that writes less than this leaves the copying to a later one.
/// Measured against 4 MiB (and 16 MiB for the writer's own): 10,000 submitted task runs in a
/// warm loop 4.7-5.0 -> 4.3-4.6 µs per run; `bench/process` W6 5.0 -> 4.7 µs.
const CHECKPOINT_BYTES: i64 = 16 << 20;

/// Bytes in the log after which the writer checkpoints itself (the log on disk stays below
/// this plus a batch).
const WRITER_CHECKPOINT_BYTES: i64 = 64 << 20;

/// Starts the checkpointer of the database at `path`, signalled by `writer`'s commits in
/// place of SQLite's automatic checkpoints. It stops once `writer` is dropped.
pub(crate) fn start(path: &Path, writer: &mut Connection) -> Result<JoinHandle<()>, StoreError> {
    let conn = crate::connect(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    let page_size: i64 = writer
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .map_err(crate::backend)?;
    let in_pages = |bytes: i64| c_int::try_from(bytes / page_size.max(512)).unwrap_or(c_int::MAX);
    let (checkpoint_pages, writer_checkpoint_pages) = (in_pages(CHECKPOINT_BYTES), in_pages(WRITER_CHECKPOINT_BYTES));
    // One signal waiting at most: commits while a checkpoint runs need only one more.
    let (signal, signals) = sync_channel::<()>(1);
    let database = path.display().to_string();
    let hook_database = database.clone();
    // The hook runs after the commit: an error from it would report a committed transaction
    // as failed. A writer's checkpoint that cannot run now (the checkpointer holds the log)
    // is tried again at its next commit.
    //
    // The checkpointer is asked once per `checkpoint_pages` new pages, not at every commit
    // past that size: a log that did not start again holds pages already copied, and a
    // checkpoint per commit cost more CPU than the writer (and two fsyncs each).
    let (mut asked_at, mut last): (c_int, c_int) = (0, 0);
    let hook = move |wal: &mut Wal, pages: c_int| {
        // The log only grows between two restarts: fewer pages than the last commit saw
        // means it started again from its beginning.
        if pages < last {
            asked_at = 0;
        }
        last = pages;
        if pages < writer_checkpoint_pages {
            if pages - asked_at >= checkpoint_pages {
                asked_at = pages;
                let _ = signal.try_send(());
            }
        } else if let Err(e) = wal.checkpoint() {
            tracing::debug!("{hook_database}: the writer's checkpoint not done now ({e}); its next commit tries again");
        }
        Ok(())
    };
    writer.wal_hook(Some(hook)).map_err(crate::backend)?;
    std::thread::Builder::new()
        .name("kiln-store-checkpoint".into())
        .spawn(move || {
            while signals.recv().is_ok() {
                // Passive: never waits for readers or the writer; what it cannot copy now
                // waits for the next signal (or the writer's own checkpoint).
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::debug!("{database}: checkpoint not done ({e}); the next signal tries again");
                }
            }
        })
        .map_err(|e| StoreError::WriterGone(format!("cannot start the checkpoint thread: {e}")))
}
