//! Live pages: one task per server looks at the runs' counts by state once a second while
//! any page listens, and tells the pages (a Server-Sent Events stream) when they changed;
//! each page then fetches itself again and swaps the parts that are live.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use kiln_store::Store;
use tokio::sync::watch;

use super::Ui;

/// How often the runs are looked at while a page listens.
const LOOK_EVERY: Duration = Duration::from_millis(700);

/// The changes the pages listen to, and the task that looks for them.
#[derive(Debug)]
pub(crate) struct Pulse {
    beats: watch::Sender<u64>,
    looker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Pulse {
    pub(crate) fn new() -> Pulse {
        Pulse {
            beats: watch::Sender::new(0),
            looker: Mutex::new(None),
        }
    }

    /// A receiver that sees every change from now on; starts the looking task if none runs.
    fn subscribe(self: &Arc<Self>, store: Arc<dyn Store>) -> watch::Receiver<u64> {
        let mut looker = self.looker.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = self.beats.subscribe();
        // A looker that ended (or died) is replaced.
        if looker.as_ref().is_none_or(|l| l.is_finished()) {
            *looker = Some(tokio::spawn(look(self.clone(), store)));
        }
        receiver
    }
}

/// Looks at the runs' counts until no page listens (the check and the exit happen under the
/// lock a new listener takes, so none is left without a looker).
///
/// Nothing is lost between a page's rendering and its stream: a page fetches itself again
/// when its stream opens, and a looker that starts tells its first listeners once it has
/// read the counts it compares with (what changed before that, their fetch may have missed).
async fn look(pulse: Arc<Pulse>, store: Arc<dyn Store>) {
    let mut last: Option<Vec<kiln_store::model::RunCount>> = None;
    loop {
        if last.is_some() {
            tokio::time::sleep(LOOK_EVERY).await;
        }
        {
            let mut looker = pulse.looker.lock().unwrap_or_else(|p| p.into_inner());
            if pulse.beats.receiver_count() == 0 {
                *looker = None;
                return;
            }
        }
        let Ok(mut counts) = store.run_counts().await else {
            tokio::time::sleep(LOOK_EVERY).await;
            continue;
        };
        counts.sort_by_key(|c| (c.kind as u8, c.state as u8));
        if last.as_ref().is_none_or(|l| *l != counts) {
            pulse.beats.send_modify(|n| *n += 1);
        }
        last = Some(counts);
    }
}

/// `GET /ui/events`: an event `changed` whenever runs changed state or were created.
pub(crate) async fn events(State(ui): State<Arc<Ui>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let receiver = ui.pulse.subscribe(ui.app.store.clone());
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.changed().await.ok()?;
        Some((Ok(Event::default().event("changed").data("runs")), receiver))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
