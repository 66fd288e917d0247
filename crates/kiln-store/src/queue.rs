//! The write path every backend shares: a bounded queue in front of one writer thread that
//! applies writes in batches and hands each write its outcome, in order.
//!
//! A backend supplies a [`Batches`]: how a batch is applied (one outcome per write) and,
//! optionally, how a message of its own is handled (SQLite's crash detection runs in its
//! writer); the queue does the rest: backpressure, batching, flushes that answer once every
//! write before them has its outcome, reporters, and an orderly close.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Mutex, RwLock};
use std::thread::JoinHandle;

use crate::model::Write;
use crate::{FlushDone, Outcome, Reporter, StoreError, log_unreported};

/// How a backend's writer thread applies what the queue hands it.
pub trait Batches: Send + 'static {
    /// A backend message, handled in order with the writes (`()` when there is none).
    type Message: Send + 'static;

    /// Applies `writes` in order, whole (retrying as the backend sees fit), and gives one
    /// outcome per write.
    fn apply(&mut self, writes: &[Write]) -> Vec<Outcome>;

    /// Handles a backend message, after every write queued before it was applied.
    fn handle(&mut self, message: Self::Message) {
        let _ = message;
    }
}

/// What follows a write of a batch once it has its outcome.
enum Entry {
    Write(Reporter),
    Flush(FlushDone),
}

/// What travels through the queue.
enum Queued<X> {
    Write(Write, Reporter),
    Flush(FlushDone),
    /// A backend's own message, handled after the writes queued before it.
    Other(X),
}

/// A bounded queue of writes and the writer thread that applies them.
pub struct WriteQueue<X: Send + 'static = ()> {
    /// Names the store in errors (a path or a URL).
    name: String,
    tx: RwLock<Option<SyncSender<Queued<X>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Writes sent and not yet applied.
    pending: Arc<AtomicUsize>,
}

impl<X: Send + 'static> std::fmt::Debug for WriteQueue<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteQueue").field("store", &self.name).finish()
    }
}

impl<X: Send + 'static> WriteQueue<X> {
    /// Starts the writer thread `thread`: it takes up to `max_batch` writes at a time (at
    /// most `capacity` wait in the queue) and gives them to `batches`.
    pub fn start(
        name: impl Into<String>,
        thread: &str,
        capacity: usize,
        max_batch: usize,
        mut batches: impl Batches<Message = X>,
    ) -> Result<WriteQueue<X>, StoreError> {
        let (tx, rx) = sync_channel(capacity);
        let pending = Arc::new(AtomicUsize::new(0));
        let applied = pending.clone();
        let writer = std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || write_loop(rx, max_batch, &mut batches, &applied))
            .map_err(|e| StoreError::WriterGone(format!("cannot start the writer thread: {e}")))?;
        Ok(WriteQueue {
            name: name.into(),
            tx: RwLock::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            pending,
        })
    }

    /// A queue that refuses every write (a store opened read-only).
    pub fn closed(name: impl Into<String>) -> WriteQueue<X> {
        WriteQueue {
            name: name.into(),
            tx: RwLock::new(None),
            writer: Mutex::new(None),
            pending: Arc::default(),
        }
    }

    /// Queues a message; gives it back (boxed: the failure path is rare) when the writer is gone.
    fn post(&self, msg: Queued<X>) -> Result<(), Box<Queued<X>>> {
        match &*self.tx.read().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(msg).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(msg)),
        }
    }

    fn gone(&self) -> StoreError {
        StoreError::WriterGone(format!("the store {} was closed or opened read-only", self.name))
    }

    /// Queues a write (waiting for room when the queue is full).
    pub fn send(&self, write: Write, reporter: Reporter) -> Result<(), StoreError> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.post(Queued::Write(write, reporter)).map_err(|_| {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            self.gone()
        })
    }

    /// How many writes were sent and are not applied yet (queued, or in the batch being
    /// applied).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Calls `done` once every write queued before has its outcome.
    pub fn flush_then(&self, done: FlushDone) {
        if let Err(msg) = self.post(Queued::Flush(done))
            && let Queued::Flush(done) = *msg
        {
            done(Err(self.gone()));
        }
    }

    /// Queues a backend message, handled after the writes queued before it.
    pub fn send_other(&self, message: X) -> Result<(), StoreError> {
        self.post(Queued::Other(message)).map_err(|_| self.gone())
    }

    /// Applies what is queued and stops the writer; later writes fail.
    pub fn close(&self) -> Result<(), StoreError> {
        drop(self.tx.write().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.join()
                .map_err(|_| StoreError::WriterGone("the writer thread panicked".into()))?;
        }
        Ok(())
    }
}

impl<X: Send + 'static> Drop for WriteQueue<X> {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn write_loop<B: Batches>(rx: Receiver<Queued<B::Message>>, max_batch: usize, batches: &mut B, pending: &AtomicUsize) {
    let mut next = None;
    // The batch: its writes, and what follows each (a reporter, or a flush to answer); kept
    // from batch to batch, so a deep queue does not grow them again each time.
    let mut writes: Vec<Write> = Vec::new();
    let mut entries: Vec<Entry> = Vec::new();
    loop {
        let first = match next.take() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        if let Queued::Other(x) = first {
            batches.handle(x);
            continue;
        }
        take::<B>(first, &mut writes, &mut entries);
        while writes.len() < max_batch {
            match rx.try_recv() {
                Ok(m @ Queued::Other(_)) => {
                    next = Some(m);
                    break;
                }
                Ok(m) => take::<B>(m, &mut writes, &mut entries),
                Err(_) => break,
            }
        }
        let outcomes = if writes.is_empty() {
            Vec::new()
        } else {
            batches.apply(&writes)
        };
        pending.fetch_sub(writes.len(), Ordering::Relaxed);
        let (mut outcomes, mut writes) = (outcomes.into_iter(), writes.drain(..));
        for entry in entries.drain(..) {
            match entry {
                Entry::Flush(done) => done(Ok(())),
                Entry::Write(reporter) => {
                    let write = writes.next().expect("one entry per write");
                    let outcome = outcomes.next().unwrap_or_else(|| {
                        Outcome::Failed(std::sync::Arc::new(StoreError::WriterGone(
                            "the backend gave this write no outcome".into(),
                        )))
                    });
                    match reporter {
                        Some(r) => r.report(&write, outcome),
                        None => log_unreported(&write, &outcome),
                    }
                }
            }
        }
    }
}

/// Adds a message of a batch to its writes and entries.
fn take<B: Batches>(m: Queued<B::Message>, writes: &mut Vec<Write>, entries: &mut Vec<Entry>) {
    match m {
        Queued::Write(w, r) => {
            writes.push(w);
            entries.push(Entry::Write(r));
        }
        Queued::Flush(done) => entries.push(Entry::Flush(done)),
        Queued::Other(_) => unreachable!("backend messages end a batch"),
    }
}
