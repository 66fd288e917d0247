//! A run's persisted result: its metadata, and its content streamed from the storage that
//! holds it (verified on the way), as PNG or JSON when asked, or as a thumbnail.
//!
//! The state database holds only the reference; values cross the API only when these
//! endpoints are asked, and never through the database.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kiln::result::{INLINE, RecordHeader, ResultError, ResultRef, ResultStorage, StorageKey};
use kiln::serializer::{Rendered, render, writes_images, writes_values};
use kiln::settings::Settings;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Problem;
use crate::api::{App, id};
use crate::openapi::ResultErrors;

/// Payloads larger than this are not decoded on the server (to PNG, JSON or a thumbnail):
/// their raw content streams instead.
pub const CONVERT_LIMIT: u64 = 256 * 1024 * 1024;

/// The result storages the server reads from: those of its settings file (`kiln.toml`),
/// read again on every use, so that edits (through the API or by hand) apply at once.
#[derive(Debug)]
pub(crate) struct Results {
    home: std::path::PathBuf,
    file: std::path::PathBuf,
    built: Mutex<HashMap<String, (kiln::result::StorageConfig, ResultStorage)>>,
}

impl Results {
    /// Reads results through the storages `settings` defines (and later versions of its file).
    pub(crate) fn new(settings: Settings) -> Results {
        Results {
            home: settings.home().to_owned(),
            file: settings.file().to_owned(),
            built: Mutex::new(HashMap::new()),
        }
    }

    /// The settings as the file holds them now.
    pub(crate) fn settings(&self) -> Result<Settings, Problem> {
        Settings::load_file(&self.home, &self.file).map_err(|e| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the server's settings cannot be read: {e}"),
            )
        })
    }

    pub(crate) fn storage(&self, name: &str) -> Result<ResultStorage, Problem> {
        let settings = self.settings()?;
        let config = settings.storage(name).ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                format!(
                    "this server has no storage named '{name}' (it has: {}); add it (PUT /api/v1/storages/{name}, \
                     or `kiln storage add` on the server), as in the program that wrote the result",
                    settings.storages().into_keys().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        if let Some((built_from, storage)) = self.built.lock().unwrap_or_else(|p| p.into_inner()).get(name)
            && *built_from == config
        {
            return Ok(storage.clone());
        }
        let storage = ResultStorage::build(name, &config, settings.home()).map_err(problem)?;
        self.built
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), (config, storage.clone()));
        Ok(storage)
    }
}

/// A result error as a problem: missing is 404, damaged or replaced is 409, a storage that
/// cannot be reached is 502 (503 when trying again may help).
pub(crate) fn problem(e: ResultError) -> Problem {
    let status = match &e {
        ResultError::Missing { .. } => StatusCode::NOT_FOUND,
        ResultError::Corrupt { .. } | ResultError::AlreadyExists { .. } => StatusCode::CONFLICT,
        ResultError::InvalidKey(_) => StatusCode::BAD_REQUEST,
        e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_GATEWAY,
    };
    Problem::new(status, e.to_string())
}

/// What `GET /api/v1/runs/{id}/result` answers.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResultInfo {
    /// The task run or flow run whose result it is.
    pub run_id: Uuid,
    /// The storage holding the record (`inline`: the state database itself).
    pub storage: String,
    /// The record's key in that storage.
    pub key: String,
    /// `storage:key`, as `kiln result show` takes it.
    pub uri: String,
    /// The serializer that wrote the payload.
    pub serializer: String,
    /// The payload's size in bytes.
    pub size: u64,
    /// `blake3:<hex>` of the payload.
    pub hash: String,
    /// The media type of `content` (`image/png`, `application/json`, ...).
    pub media_type: String,
    /// The record's header as the storage holds it (type, creation, expiry, producing run).
    #[schema(value_type = Option<Object>)]
    pub header: Option<RecordHeader>,
    /// Why the header could not be read, when it could not.
    pub header_error: Option<String>,
    /// Where to fetch the value: `content`, and `png`, `json`, `thumbnail` where they apply.
    pub links: Links,
}

/// The content URLs of a result.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Links {
    /// The payload as the serializer wrote it.
    pub content: String,
    /// The image as a PNG file (image results).
    pub png: Option<String>,
    /// A small PNG of the image (image results).
    pub thumbnail: Option<String>,
    /// The value as pretty JSON (self-describing serializers: msgpack, json).
    pub json: Option<String>,
}

fn media_type(serializer: &str) -> &'static str {
    match serializer {
        "png" => "image/png",
        "jpeg" => "image/jpeg",
        "json" => "application/json",
        "msgpack" => "application/msgpack",
        _ => "application/octet-stream",
    }
}

/// The result reference the run `id` recorded.
async fn reference(app: &App, id: Uuid) -> Result<ResultRef, Problem> {
    let value = match app.store.task_run(id).await? {
        Some(run) => run.result,
        None => match app.store.flow_run(id).await? {
            Some(run) => run.result,
            None => {
                return Err(Problem::new(
                    StatusCode::NOT_FOUND,
                    format!("no flow run or task run with id {id}"),
                ));
            }
        },
    };
    let value = value.ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!("run {id} has no persisted result (it is not finished, or its task does not persist)"),
        )
    })?;
    serde_json::from_value(value).map_err(|e| {
        Problem::new(
            StatusCode::CONFLICT,
            format!("run {id}'s result reference cannot be read ({e}); the database holds something else"),
        )
    })
}

pub(crate) fn results(app: &App) -> Result<&Results, Problem> {
    app.results.as_deref().ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "this server was started without result storages (kiln_server::Server::with_results)",
        )
    })
}

/// A run's persisted result: where it is, its serializer, size and hash, the record's
/// header, and links to its content. The value itself is not sent.
#[utoipa::path(get, path = "/api/v1/runs/{id}/result", tag = "results",
    params(("id" = Uuid, Path, description = "A task run's or flow run's id")),
    responses((status = 200, description = "The result's metadata", body = ResultInfo), ResultErrors))]
pub(crate) async fn info(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<ResultInfo>, Problem> {
    let id = id(path)?;
    let r = reference(&app, id).await?;
    let (header, header_error) = if r.inline.is_some() {
        match r.inline_record().expect("an inline reference") {
            Ok((header, _)) => (Some(header), None),
            Err(e) => (None, Some(e.to_string())),
        }
    } else {
        let read = async {
            let storage = results(&app)?.storage(&r.storage)?;
            let key = StorageKey::new(r.key.clone()).map_err(|e| Problem::new(StatusCode::CONFLICT, e))?;
            storage.read_header(&key).await.map_err(problem)
        };
        match read.await {
            Ok(header) => (Some(header), None),
            Err(p) => (None, Some(p.detail)),
        }
    };
    let base = format!("/api/v1/runs/{id}/result");
    let image = writes_images(&r.serializer);
    Ok(axum::Json(ResultInfo {
        run_id: id,
        uri: r.uri(),
        media_type: media_type(&r.serializer).into(),
        links: Links {
            content: format!("{base}/content"),
            png: image.then(|| format!("{base}/content?as=png")),
            thumbnail: image.then(|| format!("{base}/thumbnail")),
            json: writes_values(&r.serializer).then(|| format!("{base}/content?as=json")),
        },
        storage: r.storage,
        key: r.key,
        serializer: r.serializer,
        size: r.size,
        hash: r.hash,
        header,
        header_error,
    }))
}

/// `?as=`: the form to send the value in.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct As {
    /// `png`: an image result as a PNG file; `json`: a serde value as pretty JSON; none
    /// (or `raw`): the payload as its serializer wrote it.
    #[serde(rename = "as")]
    #[param(rename = "as", pattern = "^(raw|png|json)?$")]
    form: Option<String>,
}

/// A run's result value: streamed from its storage as written and verified on the way (a
/// payload that does not match its hash ends the stream with an error), or converted.
#[utoipa::path(get, path = "/api/v1/runs/{id}/result/content", tag = "results",
    params(("id" = Uuid, Path, description = "A task run's or flow run's id"), As),
    responses((status = 200, description = "The value", content(
        (Vec<u8> = "application/octet-stream"), (Vec<u8> = "image/png"), (Vec<u8> = "image/jpeg"),
        (Object = "application/json"), (Vec<u8> = "application/msgpack"))), ResultErrors))]
pub(crate) async fn content(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<As>, QueryRejection>,
) -> Result<Response, Problem> {
    let id = id(path)?;
    let As { form } = crate::api::query(query)?;
    let r = reference(&app, id).await?;
    let name = file_stem(&r, id);
    match form.as_deref() {
        None | Some("") | Some("raw") => {}
        Some("png") if r.serializer == "png" => {}
        Some("png") if writes_images(&r.serializer) => {
            let payload = payload(&app, &r).await?;
            let serializer = r.serializer.clone();
            let png = blocking(move || kiln::serializer::image_as_png(&serializer, &payload)).await?;
            return Ok(file(png.into(), "image/png", &format!("{name}.png")));
        }
        Some("json") if writes_values(&r.serializer) => {
            let payload = payload(&app, &r).await?;
            let serializer = r.serializer.clone();
            let json = blocking(move || match render(&serializer, &payload)? {
                Rendered::Json(v) => serde_json::to_vec_pretty(&v).map_err(|e| e.to_string()),
                _ => Err(format!("serializer '{serializer}' did not give a JSON value")),
            })
            .await?;
            return Ok(file(json.into(), "application/json", &format!("{name}.json")));
        }
        Some(other @ ("png" | "json")) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the result of run {id} was written by serializer '{}', which cannot be shown as {other}; ask \
                     for its raw content (no `as`)",
                    r.serializer
                ),
            ));
        }
        Some(other) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                format!("unknown form as={other}; ask for as=png (images), as=json (serde values), or no `as`"),
            ));
        }
    }
    // The payload as written, streamed from the storage and verified as it goes.
    let media = media_type(&r.serializer);
    let extension = match r.serializer.as_str() {
        "png" => "png",
        "jpeg" => "jpg",
        "json" => "json",
        "msgpack" => "msgpack",
        _ => "bin",
    };
    let filename = format!("{name}.{extension}");
    if r.inline.is_some() {
        return Ok(file(payload(&app, &r).await?, media, &filename));
    }
    let (storage, key) = locate(&app, &r)?;
    let (header, chunks) = storage.stream_record(&key).await.map_err(problem)?;
    replaced(&r, &header)?;
    let mut response = file_response(Body::from_stream(chunks), media, &filename);
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(header.length));
    Ok(response)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct Size {
    /// The largest width and height in pixels (default 256).
    #[param(minimum = 16, maximum = 2048)]
    size: Option<u32>,
}

/// An image result scaled down to fit `size` x `size` pixels, as PNG.
#[utoipa::path(get, path = "/api/v1/runs/{id}/result/thumbnail", tag = "results",
    params(("id" = Uuid, Path, description = "A task run's or flow run's id"), Size),
    responses((status = 200, description = "A PNG image", content((Vec<u8> = "image/png"))), ResultErrors))]
pub(crate) async fn thumbnail(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Size>, QueryRejection>,
) -> Result<Response, Problem> {
    let id = id(path)?;
    let Size { size } = crate::api::query(query)?;
    let size = size.unwrap_or(256);
    if !(16..=2048).contains(&size) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            format!("size={size} is out of range: a thumbnail is 16 to 2048 pixels wide"),
        ));
    }
    let r = reference(&app, id).await?;
    if !writes_images(&r.serializer) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the result of run {id} is not an image (serializer '{}'); thumbnails are for images",
                r.serializer
            ),
        ));
    }
    let payload = payload(&app, &r).await?;
    let serializer = r.serializer.clone();
    let png = blocking(move || kiln::serializer::image_thumbnail(&serializer, &payload, size)).await?;
    Ok(file(
        png.into(),
        "image/png",
        &format!("{}-{size}.png", file_stem(&r, id)),
    ))
}

fn locate(app: &App, r: &ResultRef) -> Result<(ResultStorage, StorageKey), Problem> {
    let storage = results(app)?.storage(&r.storage)?;
    let key = StorageKey::new(r.key.clone()).map_err(|e| {
        Problem::new(
            StatusCode::CONFLICT,
            format!("run's result key '{}' is not a valid storage key: {e}", r.key),
        )
    })?;
    Ok((storage, key))
}

/// The record a reference names must be the one it recorded (a key can be written again).
fn replaced(r: &ResultRef, header: &RecordHeader) -> Result<(), Problem> {
    if header.hash == r.hash {
        return Ok(());
    }
    Err(Problem::new(
        StatusCode::CONFLICT,
        format!(
            "the record at {} was replaced: it holds {} but the run recorded {}; the run's own value is gone",
            r.uri(),
            header.hash,
            r.hash
        ),
    ))
}

/// The whole payload, verified (for conversions).
async fn payload(app: &App, r: &ResultRef) -> Result<Bytes, Problem> {
    record(app, r).await.map(|(_, payload)| payload)
}

/// The whole record, its payload verified.
async fn record(app: &App, r: &ResultRef) -> Result<(RecordHeader, Bytes), Problem> {
    if r.size > CONVERT_LIMIT {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "this result is {} MiB, over the {} MiB the server converts (kiln_server::CONVERT_LIMIT); fetch its \
                 raw content instead",
                r.size >> 20,
                CONVERT_LIMIT >> 20
            ),
        ));
    }
    let (header, payload) = match r.inline_record() {
        Some(record) => record.map_err(problem)?,
        None => {
            let (storage, key) = locate(app, r)?;
            storage.get_record(&key).await.map_err(problem)?
        }
    };
    replaced(r, &header)?;
    Ok((header, payload))
}

/// Runs a conversion off the async threads; its error is the payload's fault (422).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, Problem> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the conversion stopped: {e}"),
            )
        })?
        .map_err(|e| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("the result cannot be converted: {e}"),
            )
        })
}

fn file_stem(r: &ResultRef, id: Uuid) -> String {
    let tail = r.key.rsplit('/').next().unwrap_or("result");
    let safe: String = tail
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if r.storage == INLINE || safe.is_empty() {
        format!("result-{}", id.simple())
    } else {
        safe
    }
}

fn file(bytes: Bytes, media: &str, filename: &str) -> Response {
    let length = bytes.len();
    let mut response = file_response(Body::from(bytes), media, filename);
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

fn file_response(body: Body, media: &str, filename: &str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(media).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("inline; filename=\"{filename}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// Results larger than this are not checked nor previewed by the UI (downloads still are
/// verified as they stream).
const PREVIEW_LIMIT: u64 = 64 * 1024 * 1024;

/// JSON previews are cut after this many bytes.
const PREVIEW_JSON: usize = 16 * 1024;

/// Where a result is and what it is, for the UI.
#[derive(Debug)]
pub(crate) struct Reference {
    pub(crate) serializer: String,
    pub(crate) size: u64,
    pub(crate) hash: String,
    pub(crate) storage: String,
    pub(crate) key: String,
    /// When the record expires (from its header), if it does.
    pub(crate) expires: Option<i64>,
}

/// What the UI shows of a result, after checking its hash.
#[derive(Debug)]
pub(crate) enum Preview {
    /// An image (shown through `content?as=png`), its size in pixels.
    Image { width: u32, height: u32 },
    /// A serde value as pretty JSON, cut at [`PREVIEW_JSON`] bytes.
    Json { text: String, truncated: bool },
    /// A payload only its program can read.
    Raw,
    /// Too large to check here.
    TooLarge,
    /// The record is there but is not what the run recorded: why.
    Corrupt(String),
}

/// A run's result for the UI: its reference, and a preview once its payload was read and its
/// hash checked. A record that cannot be reached at all is an error.
pub(crate) async fn preview(app: &App, id: Uuid) -> Result<(Reference, Preview), Problem> {
    let r = reference(app, id).await?;
    let mut reference = Reference {
        serializer: r.serializer.clone(),
        size: r.size,
        hash: r.hash.clone(),
        storage: r.storage.clone(),
        key: r.key.clone(),
        expires: None,
    };
    if r.size > PREVIEW_LIMIT {
        return Ok((reference, Preview::TooLarge));
    }
    let payload = match record(app, &r).await {
        Ok((header, payload)) => {
            reference.expires = header.expires;
            payload
        }
        Err(p) if p.status == StatusCode::CONFLICT.as_u16() => return Ok((reference, Preview::Corrupt(p.detail))),
        Err(p) => return Err(p),
    };
    let serializer = r.serializer.clone();
    let preview = blocking(move || {
        if writes_images(&serializer) {
            // A PNG says its size in its header; other formats are decoded (as the browser's
            // `?as=png` will).
            let size = match serializer.as_str() {
                "png" => png_size(&payload),
                _ => png_size(&kiln::serializer::image_as_png(&serializer, &payload)?),
            };
            let (width, height) = size.ok_or("the image has no PNG header")?;
            return Ok(Preview::Image { width, height });
        }
        if writes_values(&serializer) {
            return match render(&serializer, &payload)? {
                Rendered::Json(v) => {
                    let mut text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
                    let truncated = cut_text(&mut text, PREVIEW_JSON, "\n…");
                    Ok(Preview::Json { text, truncated })
                }
                _ => Ok(Preview::Raw),
            };
        }
        Ok(Preview::Raw)
    })
    .await;
    match preview {
        Ok(p) => Ok((reference, p)),
        // The hash matched, yet it does not decode: a record written by another serializer.
        Err(p) => Ok((reference, Preview::Corrupt(p.detail))),
    }
}

/// A PNG file's width and height, from its header chunk.
fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[12..16] != b"IHDR" {
        return None;
    }
    let width = u32::from_be_bytes(png[16..20].try_into().ok()?);
    let height = u32::from_be_bytes(png[20..24].try_into().ok()?);
    Some((width, height))
}

/// Cuts `text` to at most `limit` bytes (on a character boundary) and appends `mark`, when it
/// is longer; whether it was cut.
pub(crate) fn cut_text(text: &mut String, limit: usize, mark: &str) -> bool {
    if text.len() <= limit {
        return false;
    }
    let mut cut = limit;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text.push_str(mark);
    true
}
