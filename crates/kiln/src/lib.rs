//! Kiln runs pipelines written as plain Rust functions and records everything they do.
//!
//! Mark functions with [`#[task]`](macro@task) and [`#[flow]`](macro@flow). Calling a task
//! inside a flow runs it as a *task run*: its states (Pending, Running, Completed, Failed,
//! ...), attempts, logs and dependency edges are recorded in the state store, by default a
//! SQLite file in `$KILN_HOME` (`~/.kiln`), which `kiln runs ls` reads.
//!
//! ```
//! use kiln::prelude::*;
//!
//! #[task]
//! fn double(x: u64) -> u64 {
//!     x * 2
//! }
//!
//! #[task(retries = 2, retry_delay = 0.01)]
//! async fn add(a: u64, b: u64) -> anyhow::Result<u64> {
//!     Ok(a + b)
//! }
//!
//! #[flow]
//! async fn arithmetic(n: u64) -> anyhow::Result<u64> {
//!     let a = double.submit(n);              // runs concurrently
//!     let b = double.submit(n + 1);
//!     let sum = add.submit(&a, &b).await?;   // waits for both, records two edges
//!     let doubled: Vec<u64> = kiln::join_all(double.map([1, 2, 3])).await?;
//!     Ok(sum + doubled.iter().sum::<u64>())
//! }
//!
//! # #[tokio::main] async fn main() -> anyhow::Result<()> {
//! # let home = tempfile::tempdir()?;
//! # let engine = kiln::Engine::open(home.path())?;
//! # engine.scope(async {
//! assert_eq!(arithmetic(10).await?, 42 + 12);
//! # Ok::<_, anyhow::Error>(()) }).await?;
//! # Ok(()) }
//! ```
//!
//! A task's return value is handed to the next task in memory, without copies. A task
//! returns a plain `T` or a `Result<T, E>`; awaiting a call gives back exactly the declared
//! type, so `?` works as in any Rust function. Synchronous (`fn`) bodies run on tokio's
//! blocking pool and never stall the async executor.
//!
//! # Options
//! On `#[task(...)]` and `#[flow(...)]`, and at call time with `with_options`:
//!
//! | option | value | effect |
//! |---|---|---|
//! | `name` | string | the run's name (default: the function's) |
//! | `retries` | integer | retries after a failed or timed-out attempt |
//! | `retry_delay` | seconds, `[s, s, ...]`, or `exponential(base)` / `exponential(base, max = s, jitter = f)` | wait before each retry |
//! | `retry_if` | a function `fn(&E) -> bool` | retry only the errors it accepts |
//! | `timeout` | seconds, or a string like `"1m 30s"` | an attempt running longer ends as TimedOut; a sync body is asked to stop through [`cancelled`] and is waited for before a retry |
//! | `tags` | `["a", "b"]` | recorded with the run; a tag with a concurrency limit (`kiln limit set db 2`) makes a task run wait for one of its slots |
#![warn(missing_docs)]

pub mod cache;
mod context;
pub mod deployment;
mod engine;
mod error;
mod flow;
pub mod heartbeat;
mod isolation;
pub mod log;
mod options;
mod remote;
pub mod result;
mod run;
pub mod serializer;
pub mod settings;
mod task;
mod transaction;
mod worker;

pub use cache::{CacheContext, CachePolicy};
pub use context::cancelled;
pub use deployment::{Deploy, DeploymentSpec};
pub use engine::{Engine, home_dir, open_api, open_existing_store, open_store};
pub use error::{Error, RunLabel};
pub use flow::{Flow, FlowCall, current_flow_run_id};
pub use isolation::Isolation;
pub use kiln_macros::{flow, task};
pub use kiln_store as store;
pub use kiln_store::state::StateType;
pub use options::{Options, RetryDelay, RetryIf};
pub use result::ObjectRef;
pub use run::Body;
pub use task::{Input, Task, TaskCall, TaskFuture, join_all};
pub use transaction::{TransactionHook, TransactionRun, transaction};
pub use worker::{Worker, serve};

/// The names a pipeline file needs: `use kiln::prelude::*;`.
pub mod prelude {
    #[cfg(feature = "images")]
    pub use crate::serializer::{Jpeg, Png, Qoi, RawPixels};
    pub use crate::serializer::{Json, MsgPack, Serializer, Zstd};
    pub use crate::{CachePolicy, Deploy, Options, RetryDelay, TaskFuture, flow, task};
}

/// Support for the code `#[task]` and `#[flow]` generate. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::context::blocking;
    pub use crate::remote::probe;
    pub use crate::remote::{LoadedInputs, RemoteInput, RemoteTask, run_claimed as run_remote};
    pub use inventory;

    /// How a worker tells a run it is being cancelled.
    pub type CancelReceiver = futures::channel::oneshot::Receiver<crate::worker::Stop>;
    pub use crate::task::{Arg, Inputs};
    pub use futures::future::BoxFuture;
    pub use serde_json;
    pub use std::sync::{Arc, OnceLock};

    /// Splits a declared return type into its value and error types.
    pub trait Outcome {
        /// The value type.
        type Ok;
        /// The error type.
        type Err;
        /// As a `Result`.
        fn into_result(self) -> Result<Self::Ok, Self::Err>;
    }

    impl<T, E> Outcome for Result<T, E> {
        type Ok = T;
        type Err = E;
        fn into_result(self) -> Result<T, E> {
            self
        }
    }

    /// Wraps a value for autoref-based dispatch on its concrete type (see the `Via*` traits).
    #[allow(missing_debug_implementations)]
    pub struct Probe<'a, T>(pub &'a T);

    /// `Clone` arguments can be retried: `(&&Probe(&args)).kiln_clone()`.
    pub trait ViaClone<T> {
        /// A copy, if the type is `Clone`.
        fn kiln_clone(&self) -> Option<T>;
    }
    impl<T: Clone> ViaClone<T> for &Probe<'_, T> {
        fn kiln_clone(&self) -> Option<T> {
            Some(self.0.clone())
        }
    }
    /// Fallback of [`ViaClone`].
    pub trait NoClone<T> {
        /// `None`: the type is not `Clone`.
        fn kiln_clone(&self) -> Option<T>;
    }
    impl<T> NoClone<T> for Probe<'_, T> {
        fn kiln_clone(&self) -> Option<T> {
            None
        }
    }

    /// Flow parameters that implement `Serialize` are recorded as JSON:
    /// `(&&Probe(&value)).kiln_param()`.
    pub trait ViaSerialize {
        /// The value as JSON.
        fn kiln_param(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> ViaSerialize for &Probe<'_, T> {
        fn kiln_param(&self) -> serde_json::Value {
            serde_json::to_value(self.0).unwrap_or_else(
                |e| serde_json::json!({ "type": std::any::type_name::<T>(), "unrecorded": e.to_string() }),
            )
        }
    }
    /// Task arguments that implement `Serialize` are recorded with their run, cut short
    /// when long: `(&&Probe(&value)).kiln_preview()`.
    pub trait PreviewSerialize {
        /// `"value":<JSON>` for a short value, `"value_start":"<its first bytes>"` for a
        /// long one, `None` when it cannot be written as JSON.
        fn kiln_preview(&self) -> Option<String>;
    }
    impl<T: serde::Serialize> PreviewSerialize for &Probe<'_, T> {
        fn kiln_preview(&self) -> Option<String> {
            crate::task::preview(self.0)
        }
    }
    /// Fallback of [`PreviewSerialize`]: nothing.
    pub trait PreviewNone {
        /// `None`.
        fn kiln_preview(&self) -> Option<String>;
    }
    impl<T> PreviewNone for Probe<'_, T> {
        fn kiln_preview(&self) -> Option<String> {
            None
        }
    }

    /// Fallback of [`ViaSerialize`]: the type's name.
    pub trait ViaTypeName {
        /// `{"type": "<type name>"}`.
        fn kiln_param(&self) -> serde_json::Value;
    }
    impl<T> ViaTypeName for Probe<'_, T> {
        fn kiln_param(&self) -> serde_json::Value {
            serde_json::json!({ "type": std::any::type_name::<T>() })
        }
    }

    /// Errors with a chain of causes keep the chain: `(&&&Probe(&error)).kiln_chain()`.
    pub trait ViaKnownError {
        /// The error and its causes, joined by `": "`.
        fn kiln_chain(&self) -> String;
    }
    impl ViaKnownError for &&Probe<'_, anyhow::Error> {
        fn kiln_chain(&self) -> String {
            format!("{:#}", self.0)
        }
    }
    impl ViaKnownError for &&Probe<'_, Box<dyn std::error::Error + Send + Sync>> {
        fn kiln_chain(&self) -> String {
            chain(&**self.0)
        }
    }
    /// Any `std::error::Error`: walks `source()`.
    pub trait ViaStdError {
        /// The error and its causes, joined by `": "`.
        fn kiln_chain(&self) -> String;
    }
    impl<E: std::error::Error> ViaStdError for &Probe<'_, E> {
        fn kiln_chain(&self) -> String {
            chain(self.0)
        }
    }
    /// Anything else that can be displayed.
    pub trait ViaDisplay {
        /// The error's `Display`.
        fn kiln_chain(&self) -> String;
    }
    impl<E: std::fmt::Display> ViaDisplay for Probe<'_, E> {
        fn kiln_chain(&self) -> String {
            self.0.to_string()
        }
    }

    fn chain(error: &dyn std::error::Error) -> String {
        let mut out = error.to_string();
        let mut next = error.source();
        while let Some(cause) = next {
            let text = cause.to_string();
            // Errors that print their source inline would otherwise repeat it.
            if !out.ends_with(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            next = cause.source();
        }
        out
    }

    /// A type-only probe: `(&&TypeProbe::<T>::new()).kiln_serializer(default)` is the default
    /// serializer for serde types and `None` for the rest.
    #[allow(missing_debug_implementations)]
    pub struct TypeProbe<T>(std::marker::PhantomData<fn() -> T>);

    impl<T> TypeProbe<T> {
        /// The probe.
        pub fn new() -> Self {
            TypeProbe(std::marker::PhantomData)
        }
    }

    impl<T> Default for TypeProbe<T> {
        fn default() -> Self {
            Self::new()
        }
    }

    /// Serde types persist with the default serializer (`msgpack`, or `json` when set so).
    pub trait ViaSerde<T> {
        /// The default serializer.
        fn kiln_serializer(&self, default: &str) -> Option<Arc<dyn crate::serializer::Serializer<T>>>;
    }
    impl<T: serde::Serialize + serde::de::DeserializeOwned + 'static> ViaSerde<T> for &TypeProbe<T> {
        fn kiln_serializer(&self, default: &str) -> Option<Arc<dyn crate::serializer::Serializer<T>>> {
            Some(match default {
                "json" => Arc::new(crate::serializer::Json),
                _ => Arc::new(crate::serializer::MsgPack),
            })
        }
    }
    /// Fallback of [`ViaSerde`]: no default serializer.
    pub trait NoSerde<T> {
        /// `None`.
        fn kiln_serializer(&self, default: &str) -> Option<Arc<dyn crate::serializer::Serializer<T>>>;
    }
    impl<T> NoSerde<T> for TypeProbe<T> {
        fn kiln_serializer(&self, _default: &str) -> Option<Arc<dyn crate::serializer::Serializer<T>>> {
            None
        }
    }

    /// Parameter types that implement `schemars::JsonSchema` describe themselves:
    /// `(&&TypeProbe::<T>::new()).kiln_schema()`.
    pub trait ViaJsonSchema {
        /// The type's JSON Schema, subschemas inlined.
        fn kiln_schema(&self) -> serde_json::Value;
    }
    impl<T: schemars::JsonSchema> ViaJsonSchema for &TypeProbe<T> {
        fn kiln_schema(&self) -> serde_json::Value {
            let generator = schemars::generate::SchemaSettings::draft2020_12()
                .with(|s| s.inline_subschemas = true)
                .into_generator();
            let mut schema = generator.into_root_schema_for::<T>().to_value();
            if let Some(map) = schema.as_object_mut() {
                map.remove("$schema");
            }
            schema
        }
    }
    /// Fallback of [`ViaJsonSchema`]: any value (the worker's deserialization checks it).
    pub trait NoJsonSchema {
        /// A schema that accepts anything, saying why.
        fn kiln_schema(&self) -> serde_json::Value;
    }
    impl<T> NoJsonSchema for TypeProbe<T> {
        fn kiln_schema(&self) -> serde_json::Value {
            serde_json::json!({
                "description": format!(
                    "{} (derive schemars::JsonSchema for it to check values before a run is created)",
                    std::any::type_name::<T>()
                )
            })
        }
    }

    /// A flow's parameters as a JSON Schema: an object with exactly these, all required.
    pub fn parameter_schema(params: &[(&str, serde_json::Value)]) -> serde_json::Value {
        let names: Vec<&str> = params.iter().map(|(n, _)| *n).collect();
        let properties: serde_json::Map<String, serde_json::Value> =
            params.iter().map(|(n, s)| ((*n).to_owned(), s.clone())).collect();
        serde_json::json!({
            "type": "object",
            "properties": properties,
            "required": names,
            "additionalProperties": false,
        })
    }

    /// The serializer named on an attribute, checked against the function's value type.
    pub fn serializer_for<T, S: crate::serializer::Serializer<T>>(
        serializer: S,
    ) -> Arc<dyn crate::serializer::Serializer<T>> {
        Arc::new(serializer)
    }

    /// Images hash their dimensions, color type and pixels: `(&&&Probe(&v)).kiln_hash()`.
    pub trait ViaImageHash {
        /// The hash.
        fn kiln_hash(&self) -> crate::cache::InputHash;
    }
    #[cfg(feature = "images")]
    impl<T: crate::serializer::ImageValue> ViaImageHash for &&Probe<'_, T> {
        fn kiln_hash(&self) -> crate::cache::InputHash {
            let (w, h, color, bytes) = self.0.raw();
            crate::cache::hash_image(w, h, &format!("{color:?}"), bytes)
        }
    }
    /// Serde values hash their canonical encoding.
    pub trait ViaSerdeHash {
        /// The hash.
        fn kiln_hash(&self) -> crate::cache::InputHash;
    }
    impl<T: serde::Serialize> ViaSerdeHash for &Probe<'_, T> {
        fn kiln_hash(&self) -> crate::cache::InputHash {
            crate::cache::hash_serde(self.0)
        }
    }
    /// Anything else cannot be hashed.
    pub trait NoHash {
        /// Why not.
        fn kiln_hash(&self) -> crate::cache::InputHash;
    }
    impl<T> NoHash for Probe<'_, T> {
        fn kiln_hash(&self) -> crate::cache::InputHash {
            Err(format!(
                "{} implements neither Serialize nor an image type",
                crate::serializer::short_type::<T>()
            ))
        }
    }

    /// The options given on the attribute, built once per function, named `name` unless
    /// they name it (so that its runs share one name instead of copying it each).
    pub fn defaults<E>(
        cell: &'static OnceLock<Arc<crate::Options<E>>>,
        name: &'static str,
        make: fn() -> crate::Options<E>,
    ) -> Arc<crate::Options<E>>
    where
        E: 'static,
    {
        cell.get_or_init(|| {
            let mut options = make();
            options.name.get_or_insert_with(|| Arc::from(name));
            Arc::new(options)
        })
        .clone()
    }
}
