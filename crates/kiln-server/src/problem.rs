//! Errors as RFC 9457 problem details: `application/problem+json` with a status, a title and
//! a detail that names the cause.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_store::StoreError;
use serde::{Deserialize, Serialize};

/// A problem detail (RFC 9457), as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`about:blank` when the status says it all).
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's short title.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong and what to do.
    pub detail: String,
    /// Whether the same request may succeed later.
    #[serde(default)]
    pub retryable: bool,
}

impl Problem {
    /// A problem with `status` and `detail`.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("error").into(),
            status: status.as_u16(),
            detail: detail.into(),
            retryable: status == StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Problem {
        let status = match &e {
            StoreError::UnknownRun(_) => StatusCode::NOT_FOUND,
            StoreError::AmbiguousRun { .. } => StatusCode::CONFLICT,
            StoreError::IllegalTransition { .. } => StatusCode::CONFLICT,
            StoreError::UnknownProcess(_) => StatusCode::CONFLICT,
            StoreError::ReadOnly(_) => StatusCode::FORBIDDEN,
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Problem::new(status, e.to_string())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(self)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}
