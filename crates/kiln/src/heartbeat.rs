//! Liveness: each engine records its process and heartbeats in the state store; the runs of
//! a process that died are marked Crashed.
//!
//! A process is known dead when its host sees its pid gone (or reused by another program:
//! the start time differs), which every Kiln process and CLI command on that host checks,
//! or, from any machine, when its heartbeat is older than [`LEASE`]. The store marks its
//! unfinished runs Crashed with the same compare-and-set as any state change, so a run is
//! never marked twice and a process that was only slow learns it (its next state change is
//! refused) instead of overwriting it.

use std::sync::Arc;
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::time::Duration;

use kiln_store::Store;
use kiln_store::model::{Micros, Process, Write, now_micros};
use uuid::Uuid;

/// How long a process may stay silent before its runs count as crashed (and a worker's
/// claims are taken back): three heartbeats.
pub const LEASE: Duration = Duration::from_secs(30);

/// How often a process heartbeats (and looks for dead processes).
const BEAT: Duration = Duration::from_secs(10);

/// The heartbeat period: [`KILN_HEARTBEAT_SECONDS`](crate::settings) when set (the lease is
/// three of them), else 10 s.
pub fn beat() -> Duration {
    std::env::var("KILN_HEARTBEAT_SECONDS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(BEAT, |s| Duration::from_secs_f64(s.max(0.1)))
}

/// How long a process may stay silent before it counts as dead: three heartbeats.
pub fn lease() -> Duration {
    if beat() == BEAT { LEASE } else { beat() * 3 }
}

/// This process as the store records it, and the thread that keeps it alive there.
pub(crate) struct Liveness {
    pub(crate) process_id: Uuid,
    /// Dropping it stops the heartbeat thread.
    _stop: Sender<()>,
}

impl std::fmt::Debug for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Liveness")
            .field("process_id", &self.process_id)
            .finish()
    }
}

/// This process, as a fresh record for the store.
fn this_process(id: Uuid) -> Process {
    Process {
        id,
        host: host_name(),
        pid: std::process::id(),
        started: start_ticks(std::process::id()).unwrap_or(0),
        heartbeat: now_micros(),
        lease: lease().as_micros() as Micros,
    }
}

/// Records this process in `store`, heartbeats until the engine is dropped, and marks the
/// runs of dead processes Crashed (at once, then at every beat).
pub(crate) fn start(store: Arc<dyn Store>) -> Liveness {
    let process_id = Uuid::now_v7();
    let _ = store.send(Write::Heartbeat(this_process(process_id)), None);
    let (stop, stopped) = channel::<()>();
    let weak = Arc::downgrade(&store);
    drop(store);
    let spawned = std::thread::Builder::new()
        .name("kiln-heartbeat".into())
        .spawn(move || {
            let mut first = true;
            loop {
                let Some(store) = weak.upgrade() else { return };
                if !first {
                    let _ = store.send(Write::Heartbeat(this_process(process_id)), None);
                }
                first = false;
                // Judge others only once this process's own heartbeat is recorded: after a
                // partition (a server restarting) its row is as stale as theirs, and the
                // store would count this process dead too and crash its runs.
                let judged = futures::executor::block_on(async {
                    // The backlog first (its heartbeats carry the time they were made), then a
                    // heartbeat made now.
                    store.flush().await?;
                    let _ = store.send(Write::Heartbeat(this_process(process_id)), None);
                    store.flush().await?;
                    crash_dead_processes(&*store, Some(process_id)).await
                });
                if let Err(e) = judged {
                    tracing::warn!("cannot look for dead processes: {e}");
                }
                drop(store);
                match stopped.recv_timeout(beat()) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the heartbeat thread ({e}); this process's runs may be marked Crashed");
    }
    Liveness {
        process_id,
        _stop: stop,
    }
}

/// Marks Crashed the unfinished runs of processes that died: those on this host whose pid is
/// gone, and those anywhere that stopped heartbeating for longer than [`LEASE`]. Returns how
/// many runs it marked.
pub async fn crash_dead_processes(store: &dyn Store, me: Option<Uuid>) -> Result<usize, crate::Error> {
    let now = now_micros();
    let lease = lease().as_micros() as Micros;
    let host = host_name();
    let processes = store.processes(now - lease).await?;
    let dead: Vec<Uuid> = processes
        .iter()
        .filter(|p| Some(p.id) != me && p.host == host && !alive(p.pid, p.started))
        .map(|p| p.id)
        .collect();
    let crashed = store.crash_orphans(&dead, now - lease).await?;
    if !crashed.is_empty() {
        tracing::warn!("marked {} run(s) of dead processes Crashed", crashed.len());
    }
    Ok(crashed.len())
}

pub(crate) fn host_name() -> String {
    // Read once: every task run sent to a pool names its host.
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown-host".into())
    })
    .clone()
}

/// When the OS started process `pid` (Linux: clock ticks since boot, field 22 of
/// `/proc/<pid>/stat`); `None` when it does not exist or this is not Linux.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether process `pid`, started at `started`, still runs on this host. Without `/proc`
/// it is assumed alive (the heartbeat lease decides).
fn alive(pid: u32, started: u64) -> bool {
    if !std::path::Path::new("/proc/self/stat").exists() {
        return true;
    }
    match start_ticks(pid) {
        None => false,
        Some(ticks) => started == 0 || ticks == started,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = std::process::id();
        let started = start_ticks(me).expect("Linux /proc");
        assert!(alive(me, started));
        assert!(!alive(me, started + 1), "another start time: the pid was reused");
        // A pid far beyond pid_max never exists.
        assert!(!alive(u32::MAX - 1, 0));
        assert!(!host_name().is_empty());
    }
}
