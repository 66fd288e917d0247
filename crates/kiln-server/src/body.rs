//! Request bodies: JSON of a known shape, with errors that say what was wrong.

use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use bytes::Bytes;
use serde::de::DeserializeOwned;

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

impl Shape for kiln_store::work::ClaimRequest {
    const WHAT: &'static str = "claim (`process_id`, `pools`, `limit`, `wait_ms`)";
}

impl Shape for kiln_store::model::TaskRunLookup {
    const WHAT: &'static str = "lookup (`ids`, `states`)";
}

impl Shape for kiln_store::work::HolderLookup {
    const WHAT: &'static str = "lookup (`ids`)";
}

impl Shape for kiln_store::limit::SlotRequest {
    const WHAT: &'static str = "slot request (`run_id`, `tags`)";
}

impl Shape for crate::work::NewRun {
    const WHAT: &'static str = "run request (`parameters`, `tags`, `scheduled`)";
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
            && let Some(rewritten) = integral_numbers(&bytes)
            && let Ok(parsed) = serde_json::from_slice::<T>(&rewritten)
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

/// The JSON text with every number that is a whole number written with a fraction or an
/// exponent (`3.0`, `1e+16`, `2.5e1`) written as an integer instead, exactly (decimal digits
/// are shifted, never rounded through a float), so that the parser's own range checks
/// apply; `None` when there is none.
fn integral_numbers(json: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(json.len());
    let (mut i, mut changed) = (0, false);
    while i < json.len() {
        let b = json[i];
        if b == b'"' {
            // Copy the string through, escapes included.
            let start = i;
            i += 1;
            while i < json.len() && json[i] != b'"' {
                i += if json[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(json.len());
            out.extend_from_slice(&json[start..i]);
        } else if b == b'-' || b.is_ascii_digit() {
            let start = i;
            while i < json.len() && matches!(json[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                i += 1;
            }
            let token = &json[start..i];
            match std::str::from_utf8(token).ok().and_then(whole) {
                Some(integer) => {
                    out.extend_from_slice(integer.as_bytes());
                    changed = true;
                }
                None => out.extend_from_slice(token),
            }
        } else {
            out.push(b);
            i += 1;
        }
    }
    changed.then_some(out)
}

/// `number` as an integer literal, when it has a fraction or exponent and is whole.
fn whole(number: &str) -> Option<String> {
    let (negative, rest) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], rest[at + 1..].parse::<i32>().ok()?),
        None => (rest, 0),
    };
    if mantissa.len() == rest.len() && !mantissa.contains('.') {
        return None; // an integer already
    }
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) || exponent.abs() > 40 {
        return None;
    }
    let digits = format!("{int}{frac}");
    // The decimal point sits after `point` digits.
    let point = int.len() as i32 + exponent;
    if point < 0 {
        return digits.bytes().all(|b| b == b'0').then(|| "0".to_owned());
    }
    let point = point as usize;
    let (whole, fraction) = if point >= digits.len() {
        (format!("{digits}{}", "0".repeat(point - digits.len())), String::new())
    } else {
        (digits[..point].to_owned(), digits[point..].to_owned())
    };
    if !fraction.bytes().all(|b| b == b'0') {
        return None;
    }
    let trimmed = whole.trim_start_matches('0');
    let trimmed = if trimmed.is_empty() { "0" } else { trimmed };
    Some(if negative && trimmed != "0" {
        format!("-{trimmed}")
    } else {
        trimmed.to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::{integral_numbers, whole};

    #[test]
    fn whole_numbers_are_written_as_integers_exactly() {
        for (number, expected) in [
            ("3.0", Some("3")),
            ("-0.0", Some("0")),
            ("1e+16", Some("10000000000000000")),
            ("9007199254740993.0", Some("9007199254740993")),
            ("-9223372036854775809.0", Some("-9223372036854775809")),
            ("2.5e1", Some("25")),
            ("2.5", None),
            ("1e-3", None),
            ("12", None),
            ("1.0e400", None),
        ] {
            assert_eq!(whole(number).as_deref(), expected, "{number}");
        }
        let json = br#"{"a": 1.0, "b": "1.0 in a \" string", "c": [2e1, 0.5]}"#;
        let out = integral_numbers(json).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"a": 1, "b": "1.0 in a \" string", "c": [20, 0.5]}"#
        );
        assert!(integral_numbers(b"[1, 2.5]").is_none());
    }
}
