//! Request bodies: JSON of a known shape, with errors that say what was wrong.

use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Problem;

/// A request body's shape, and what to call it in errors.
pub(crate) trait Shape: DeserializeOwned {
    /// "batch of writes".
    const WHAT: &'static str;
}

impl Shape for kiln_store::model::WriteBatch {
    const WHAT: &'static str = "batch of writes";
}

impl Shape for kiln_store::model::CrashOrphans {
    const WHAT: &'static str = "crash request (`dead`, `stale_before`)";
}

impl Shape for crate::api::SetState {
    const WHAT: &'static str = "state change (`from`, `to`, `message`)";
}

/// A JSON request body parsed as `T`. Numbers written with a zero fraction (`3.0`) are
/// accepted where integers go, as JSON Schema (and so the API document) counts them integers.
pub(crate) struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: Shape> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Problem> {
        let what = T::WHAT;
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| {
                let v = v.trim().to_ascii_lowercase();
                v == "application/json" || v.ends_with("+json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("send the {what} as JSON, with `Content-Type: application/json`"),
            ));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|e| Problem::new(e.status(), e.body_text()))?;
        let first = match serde_json::from_slice::<T>(&bytes) {
            Ok(value) => return Ok(JsonBody(value)),
            Err(e) => e,
        };
        if first.is_data()
            && let Ok(mut value) = serde_json::from_slice::<Value>(&bytes)
            && integers(&mut value)
            && let Ok(parsed) = serde_json::from_value::<T>(value)
        {
            return Ok(JsonBody(parsed));
        }
        let status = if first.is_data() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        Err(Problem::new(
            status,
            format!("the request body is not a valid {what}: {first}"),
        ))
    }
}

/// Turns numbers with a zero fraction into integers; whether any changed.
fn integers(value: &mut Value) -> bool {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Only where a float is exact (below 2^53): beyond, `3e19` may not be the integer meant.
            let whole = if f.fract() != 0.0 || !f.is_finite() || f.abs() >= 9_007_199_254_740_992.0 {
                None
            } else {
                Some(serde_json::Number::from(f as i64))
            };
            whole.map(|w| *n = w).is_some()
        }
        Value::Array(items) => items.iter_mut().fold(false, |changed, v| integers(v) | changed),
        Value::Object(fields) => fields.values_mut().fold(false, |changed, v| integers(v) | changed),
        _ => false,
    }
}
