//! Persisting a run's value as a record, and loading it back.

use std::sync::Arc;

use bytes::Bytes;
use kiln_store::model::now_micros;
use serde_json::Value;
use uuid::Uuid;

use super::record::{RecordHeader, content_hash};
use super::{ResultError, ResultRef, StorageKey};
use crate::Engine;
use crate::serializer::{Serializer, short_type};

/// How one run persists its value: decided before it runs, so a misconfiguration fails
/// before any work is done.
pub(crate) struct Plan<T> {
    pub(crate) storage: Arc<str>,
    pub(crate) template: Option<Arc<str>>,
    pub(crate) serializer: Arc<dyn Serializer<T>>,
}

impl<T> Plan<T> {
    pub(crate) fn needs_parameters(&self) -> bool {
        self.template.as_deref().is_some_and(|t| t.contains("{parameters."))
    }
}

/// What a key template may refer to.
pub(crate) struct KeyFields<'a> {
    pub(crate) run_id: Uuid,
    pub(crate) run_name: &'a str,
    pub(crate) flow_run: Option<(Uuid, &'a str)>,
    pub(crate) parameters: Option<&'a Value>,
}

/// The fields a template may use, for messages.
pub const KEY_FIELDS: &str = "run.id, run.name, flow_run.id, flow_run.name, parameters.<name>";

/// Fills a key template (`{run.name}/{run.id}` when none) and validates the key.
pub(crate) fn render_key(template: Option<&str>, f: &KeyFields<'_>) -> Result<StorageKey, ResultError> {
    let template = template.unwrap_or("{run.name}/{run.id}");
    let bad =
        |why: String| ResultError::InvalidKey(format!("storage_key template '{template}' of {}: {why}", f.run_name));
    let mut out = String::with_capacity(template.len() + 40);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| bad("a '{' is never closed".into()))?
            + open;
        let field = &rest[open + 1..close];
        let value = match field {
            "run.id" | "task_run.id" => f.run_id.to_string(),
            "run.name" | "task_run.name" => f.run_name.to_owned(),
            "flow_run.id" | "flow_run.name" => {
                let (id, name) = f
                    .flow_run
                    .ok_or_else(|| bad(format!("{{{field}}} needs a flow run, and this run has none")))?;
                if field == "flow_run.id" {
                    id.to_string()
                } else {
                    name.to_owned()
                }
            }
            p if p.starts_with("parameters.") => {
                let name = &p["parameters.".len()..];
                let value = f.parameters.and_then(|v| v.get(name)).ok_or_else(|| {
                    bad(format!(
                        "there is no parameter '{name}' with a value that can be written (it must implement Serialize)"
                    ))
                })?;
                match value {
                    Value::String(s) => s.clone(),
                    Value::Object(o) if o.contains_key("type") && o.len() == 1 => {
                        return Err(bad(format!(
                            "parameter '{name}' does not implement Serialize, so it cannot be part of a key"
                        )));
                    }
                    other => other.to_string(),
                }
            }
            other => return Err(bad(format!("unknown field {{{other}}}; fields: {KEY_FIELDS}"))),
        };
        out.push_str(&value);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    StorageKey::new(out).map_err(bad)
}

/// Encodes `value` off the async executor, writes the record (into the reference itself
/// when it is at most `inline_max` bytes), and gives the value back.
pub(crate) async fn persist<T: Send + 'static>(
    engine: &Engine,
    plan: &Plan<T>,
    key: StorageKey,
    expires: Option<i64>,
    (run_id, run_name): (Uuid, &str),
    inline_max: Option<u64>,
    value: T,
) -> Result<(T, ResultRef), (Option<T>, ResultError)> {
    let storage = match engine.storage(&plan.storage) {
        Ok(s) => s,
        Err(e) => return Err((Some(value), e)),
    };
    let serializer = plan.serializer.clone();
    let name = serializer.name().into_owned();
    // The value moves to a blocking thread and back: encoding a large image must not stall
    // the executor, and moving is not copying. A value owning no heap memory (a number, a
    // small plain struct) is encoded here: the hand-off would cost more than the work.
    let small = !std::mem::needs_drop::<T>() && std::mem::size_of::<T>() <= SMALL;
    let encoded = off_executor(small, move || {
        let mut payload = Vec::new();
        let outcome = serializer.encode(&value, &mut payload).map(|()| {
            let hash = content_hash(&payload);
            (Bytes::from(payload), hash)
        });
        (value, outcome)
    })
    .await;
    let (value, (payload, hash)) = match encoded {
        Ok((value, Ok(done))) => (value, done),
        Ok((value, Err(e))) => {
            let message = format!("cannot persist its {} result: {e}", short_type::<T>());
            return Err((
                Some(value),
                ResultError::Serialize {
                    run: run_name.to_owned(),
                    message,
                },
            ));
        }
        Err(join) => {
            let message = format!(
                "the serializer panicked while encoding its {} result: {join}",
                short_type::<T>()
            );
            return Err((
                None,
                ResultError::Serialize {
                    run: run_name.to_owned(),
                    message,
                },
            ));
        }
    };
    let header = RecordHeader {
        serializer: name.clone(),
        value_type: short_type::<T>(),
        hash: hash.clone(),
        length: payload.len() as u64,
        created: now_micros(),
        expires,
        run_id: Some(run_id),
        run_name: run_name.to_owned(),
    };
    let size = payload.len() as u64;
    if let Some(inline) = inline_max.and_then(|max| inline_record(&header, &payload, max)) {
        return Ok((
            value,
            ResultRef {
                storage: super::INLINE.into(),
                key: String::new(),
                serializer: name,
                size,
                hash,
                call: None,
                inline: Some(inline),
            },
        ));
    }
    if let Err(e) = storage.put_record(&key, &header, payload, false).await {
        return Err((Some(value), e));
    }
    Ok((
        value,
        ResultRef {
            storage: plan.storage.to_string(),
            key: key.to_string(),
            serializer: name,
            size,
            hash,
            call: None,
            inline: None,
        },
    ))
}

/// The whole record, base64, when it fits in `max` bytes (the header is encoded only for a
/// payload that may fit: a stored record's header is encoded by `put_record`).
fn inline_record(header: &RecordHeader, payload: &[u8], max: u64) -> Option<String> {
    use base64::Engine as _;
    if payload.len() as u64 > max {
        return None;
    }
    let prefix = super::record::encode_prefix(header);
    if (prefix.len() + payload.len()) as u64 > max {
        return None;
    }
    let mut record = Vec::with_capacity(prefix.len() + payload.len());
    record.extend_from_slice(&prefix);
    record.extend_from_slice(payload);
    Some(base64::engine::general_purpose::STANDARD.encode(record))
}

/// Loads a persisted value, verifying the record and that `serializer` wrote it.
pub(crate) async fn load<T: Send + 'static>(
    engine: &Engine,
    reference: &ResultRef,
    serializer: Arc<dyn Serializer<T>>,
    reader: &str,
) -> Result<T, ResultError> {
    if let Some(record) = reference.inline_record() {
        let (header, payload) = record?;
        let key = StorageKey::new(format!("inline/{}", reference.hash.trim_start_matches("blake3:")))
            .map_err(ResultError::InvalidKey)?;
        return decode(super::INLINE, &key, &header, payload, serializer, reader).await;
    }
    let key = StorageKey::new(reference.key.clone()).map_err(ResultError::InvalidKey)?;
    let cache = engine.record_cache();
    let (header, payload) = match cache.get(&reference.storage, &reference.key, &reference.hash) {
        Some(hit) => hit,
        None => {
            let (header, payload) = engine.storage(&reference.storage)?.get_record(&key).await?;
            if header.hash == reference.hash {
                cache.put(&reference.storage, &reference.key, &header, &payload);
            }
            (header, payload)
        }
    };
    decode(&reference.storage, &key, &header, payload, serializer, reader).await
}

/// Values and payloads up to this size are encoded and decoded on the async executor.
const SMALL: usize = 4096;

/// Runs `work` on a blocking thread, or right here when it is `small`; a panic in it is an
/// error (its message) either way.
async fn off_executor<R: Send + 'static>(small: bool, work: impl FnOnce() -> R + Send + 'static) -> Result<R, String> {
    if small {
        return std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into())
        });
    }
    tokio::task::spawn_blocking(work).await.map_err(|e| e.to_string())
}

/// Decodes a verified record's payload off the async executor, after checking that
/// `serializer` is the one that wrote it.
pub(crate) async fn decode<T: Send + 'static>(
    storage: &str,
    key: &StorageKey,
    header: &RecordHeader,
    payload: Bytes,
    serializer: Arc<dyn Serializer<T>>,
    reader: &str,
) -> Result<T, ResultError> {
    let expected = serializer.name();
    if header.serializer != expected {
        return Err(ResultError::WrongSerializer {
            storage: storage.to_owned(),
            key: key.to_string(),
            found: header.serializer.clone(),
            expected: expected.into_owned(),
            reader: reader.to_owned(),
        });
    }
    let (run, key) = (reader.to_owned(), key.to_string());
    off_executor(payload.len() <= SMALL, move || {
        serializer.decode(&payload).map_err(|e| ResultError::Serialize {
            run,
            message: format!("cannot load its {} result from '{key}': {e}", short_type::<T>()),
        })
    })
    .await
    .unwrap_or_else(|e| {
        Err(ResultError::Serialize {
            run: reader.to_owned(),
            message: format!("the serializer panicked while decoding: {e}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(params: &Value) -> KeyFields<'_> {
        KeyFields {
            run_id: Uuid::nil(),
            run_name: "resize",
            flow_run: Some((Uuid::max(), "nightly")),
            parameters: Some(params),
        }
    }

    #[test]
    fn templates_fill_in_run_and_parameter_fields() {
        let params = serde_json::json!({ "name": "cat", "size": 512 });
        let key = render_key(
            Some("images/{flow_run.name}/{parameters.name}-{parameters.size}.png"),
            &fields(&params),
        );
        assert_eq!(key.unwrap().as_str(), "images/nightly/cat-512.png");
        let default = render_key(None, &fields(&params)).unwrap();
        assert_eq!(default.as_str(), format!("resize/{}", Uuid::nil()));
    }

    #[test]
    fn keys_that_escape_the_root_are_refused() {
        let params = serde_json::json!({ "name": "../../etc/passwd", "abs": "/etc" });
        for (template, why) in [
            ("{parameters.name}", "'..'"),
            ("/abs/{run.id}", "absolute"),
            ("{parameters.abs}/x", "absolute"),
            ("a//b", "empty segment"),
            ("{unknown}", "unknown field {unknown}"),
            ("{parameters.missing}", "no parameter 'missing'"),
            ("open{run.id", "never closed"),
        ] {
            let err = render_key(Some(template), &fields(&params)).unwrap_err().to_string();
            assert!(err.contains(why), "{template}: {err}");
            assert!(err.contains("storage_key template"), "{err}");
        }
    }
}
