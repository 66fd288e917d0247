//! The API document (`/api/openapi.json`, OpenAPI 3.1), generated from the handlers'
//! annotations: the parts every operation shares are here.

use utoipa::IntoResponses;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, InfoBuilder, OpenApi, OpenApiBuilder};

use crate::Problem;

/// The document before the routes add their paths.
pub(crate) fn base() -> OpenApi {
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Kiln server API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Flow runs, task runs, their states, logs and results, recorded and read by Kiln programs and \
                     tools. Every endpoint but /api/health (this document too) needs `Authorization: Bearer <token>` \
                     once the server has a token (`kiln server token create`). Errors are RFC 9457 problem details.",
                ))
                .build(),
        )
        .components(Some(
            ComponentsBuilder::new()
                .schema_from::<Problem>()
                .security_scheme(
                    "bearer",
                    SecurityScheme::Http(
                        HttpBuilder::new()
                            .scheme(HttpAuthScheme::Bearer)
                            .description(Some("An API token (`kiln server token create NAME`)"))
                            .build(),
                    ),
                )
                .build(),
        ))
        .build()
}

/// The document as served, once every route is in: a bearer token is required by default,
/// and ids are constrained to what the server parses (a `uuid` format alone is advisory in
/// JSON Schema).
pub(crate) fn document(mut doc: OpenApi) -> String {
    doc.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
    let mut value = serde_json::to_value(&doc).expect("the OpenAPI document serializes");
    constrain_ids(&mut value);
    value.to_string()
}

/// Adds the hyphenated UUID pattern to every `format: uuid` schema.
fn constrain_ids(value: &mut serde_json::Value) {
    const UUID: &str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
    match value {
        serde_json::Value::Object(fields) => {
            if fields.get("format").and_then(|f| f.as_str()) == Some("uuid") && !fields.contains_key("pattern") {
                fields.insert("pattern".into(), UUID.into());
            }
            fields.values_mut().for_each(constrain_ids);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(constrain_ids),
        _ => {}
    }
}

/// What any read can answer besides its result.
#[derive(IntoResponses)]
#[allow(dead_code)] // describes responses in the API document
pub(crate) enum ReadErrors {
    /// A malformed parameter.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No token, or one the server does not know (or revoked).
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// No such run (or a path id that is no run id).
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// The database is busy or unreachable: try again.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// What a write can answer besides its result.
#[derive(IntoResponses)]
#[allow(dead_code)] // describes responses in the API document
pub(crate) enum WriteErrors {
    /// The body is not valid JSON of the expected shape.
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No token, or one the server does not know (or revoked).
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// A read-only token, or a write the API does not take (API tokens).
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// The body is over the server's limit.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(Problem),
    /// The body is not JSON (`Content-Type: application/json`).
    #[response(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Problem),
    /// The body is JSON but not of the expected shape.
    #[response(status = 422, content_type = "application/problem+json")]
    Unprocessable(Problem),
    /// The database is busy or unreachable: try again.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// What the result endpoints can answer besides the result.
#[derive(IntoResponses)]
#[allow(dead_code)] // describes responses in the API document
pub(crate) enum ResultErrors {
    /// A malformed id, or a form the result cannot take (`as=png` of a number).
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No token, or one the server does not know (or revoked).
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// No such run, no persisted result, no such storage on this server, or the record is gone.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// The record is damaged, or another value replaced it under the run's key.
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(Problem),
    /// Too large to convert on the server: fetch the raw content.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(Problem),
    /// The payload cannot be converted to the form asked.
    #[response(status = 422, content_type = "application/problem+json")]
    Unprocessable(Problem),
    /// This server reads no result storages.
    #[response(status = 501, content_type = "application/problem+json")]
    NotImplemented(Problem),
    /// The storage holding the record failed.
    #[response(status = 502, content_type = "application/problem+json")]
    BadGateway(Problem),
    /// The database or the storage is busy or unreachable: try again.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}
