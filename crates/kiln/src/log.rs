//! Log capture: `tracing` events emitted inside a task run or flow run are recorded with it.
//!
//! Kiln installs a global subscriber on first use (human-readable output on stderr, filtered
//! by `KILN_LOG`, default `info`, plus this capture) unless the program installed one first.
//! A program with its own subscriber adds [`layer`] to it to keep run logs:
//!
//! ```
//! use tracing_subscriber::prelude::*;
//! tracing_subscriber::registry().with(kiln::log::layer()).init();
//! ```

use std::fmt::Write as _;

use kiln_store::model::{LogRecord, Write};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::Context;

use crate::context;

/// The capture layer: records events at INFO and above that happen inside a run.
///
/// Its level applies to what it records only: other layers of the subscriber (and
/// `KILN_LOG=debug` on the default one) still see DEBUG and TRACE events.
pub fn layer() -> CaptureLayer {
    CaptureLayer { max_level: Level::INFO }
}

/// A `tracing_subscriber` layer that records events into the current run's log.
#[derive(Debug, Clone)]
pub struct CaptureLayer {
    max_level: Level,
}

impl CaptureLayer {
    fn wants(&self, meta: &Metadata<'_>) -> bool {
        meta.is_event() && *meta.level() <= self.max_level
    }

    /// Also capture events up to `level` (`Level::DEBUG` captures DEBUG and above).
    pub fn with_max_level(mut self, level: Level) -> Self {
        self.max_level = level;
        self
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for CaptureLayer {
    // What it does not want, it leaves to the other layers: "sometimes" (never "never",
    // which would turn a DEBUG callsite off for the whole subscriber, the user's own
    // `tracing::debug!` included). The level hint lets tracing skip callsites that no layer
    // wants: with the default subscriber at `info`, engine-internal DEBUG events cost nothing.
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.wants(meta) {
            Interest::always()
        } else {
            Interest::sometimes()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(self.max_level))
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if !self.wants(meta) {
            return;
        }
        let Some(run) = context::current_run() else { return };
        let mut message = MessageVisitor(String::new());
        event.record(&mut message);
        let record = LogRecord {
            id: kiln_store::model::write_id(),
            run_id: run.run_id,
            flow_run_id: run.flow_run_id,
            timestamp: kiln_store::model::now_micros(),
            level: meta.level().to_string(),
            target: meta.target().to_owned(),
            message: message.0,
        };
        // A store that is gone cannot take logs; the run's own state write reports that.
        // No reporter: a log line the store cannot record is logged by the store itself.
        let _ = run.engine.store().send(Write::Log(record), None);
    }
}

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.push_sep();
            self.0.push_str(value);
        } else {
            self.push_sep();
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.push_sep();
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }
}

impl MessageVisitor {
    fn push_sep(&mut self) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
    }
}

/// Installs stderr output plus capture as the global subscriber, unless one is set.
pub(crate) fn install_default_subscriber() {
    use std::sync::Once;
    use tracing_subscriber::prelude::*;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let stderr = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter);
        let _ = tracing_subscriber::registry().with(stderr).with(layer()).try_init();
    });
}
