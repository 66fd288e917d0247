//! Result storages through the API: listed, created or updated, tested, deleted. They live
//! in the server's settings file (`kiln.toml`, readable by the server's user only), as the
//! CLI's `kiln storage` keeps them. Secrets are write-only: masked on every read; a secret
//! left out of an update keeps its value, an empty one removes it.

use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use kiln::result::{ResultStorage, StorageConfig};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Problem;
use crate::api::App;
use crate::body::JsonBody;
use crate::openapi::WriteErrors;
use crate::results::results;

/// What secret fields read as.
const MASK: &str = "********";
/// The fields that hold secrets.
const SECRETS: [&str; 2] = ["secret_access_key", "access_key"];
/// How long a storage test may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A storage's configuration, as `kiln.toml` holds it (`kind` says which).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
#[allow(dead_code)] // the shape of the body, for the document; the config itself is kiln's
pub(crate) enum StorageBody {
    /// A folder on the server (absolute; inside the server's home or KILN_SERVER_STORAGE_ROOTS).
    Local {
        /// The folder, absolute (default: `$KILN_HOME/storage/<name>`).
        #[schema(pattern = "^/")]
        path: Option<String>,
    },
    /// Amazon S3 or an S3-compatible server.
    S3 {
        /// The bucket.
        bucket: String,
        /// The endpoint of an S3-compatible server (omit for AWS).
        endpoint: Option<String>,
        /// The region (default `us-east-1`).
        region: Option<String>,
        /// The access key id.
        access_key_id: Option<String>,
        /// The secret access key: write-only (reads show it masked); left out, it keeps its value.
        secret_access_key: Option<String>,
        /// Allow plain `http://` endpoints.
        #[serde(default)]
        allow_http: bool,
        /// A folder inside the bucket for Kiln's keys.
        prefix: Option<String>,
    },
    /// Google Cloud Storage.
    Gcs {
        /// The bucket.
        bucket: String,
        /// A service account key file on the server.
        service_account_path: Option<String>,
        /// A folder inside the bucket for Kiln's keys.
        prefix: Option<String>,
    },
    /// Azure Blob Storage (or Azurite).
    Azure {
        /// The container.
        container: String,
        /// The storage account.
        account: Option<String>,
        /// The account key: write-only (reads show it masked); left out, it keeps its value.
        access_key: Option<String>,
        /// The blob endpoint.
        endpoint: Option<String>,
        /// Use the Azurite emulator's well-known account.
        #[serde(default)]
        use_emulator: bool,
        /// Allow plain `http://` endpoints.
        #[serde(default)]
        allow_http: bool,
        /// A folder inside the container for Kiln's keys.
        prefix: Option<String>,
    },
}

impl crate::body::Shape for StorageBody {
    const WHAT: &'static str = "storage configuration (`kind` and its fields)";
}

/// A storage as the API shows it: secrets masked.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StorageView {
    /// Its name.
    pub(crate) name: String,
    /// `local`, `memory`, `s3`, `gcs` or `azure`.
    pub(crate) kind: String,
    /// Where it points.
    pub(crate) location: String,
    /// Its configuration, secrets masked.
    #[schema(value_type = Object)]
    pub(crate) config: serde_json::Value,
}

fn view(name: &str, config: &StorageConfig, home: &std::path::Path) -> StorageView {
    let mut shown = serde_json::to_value(config).unwrap_or_default();
    if let Some(fields) = shown.as_object_mut() {
        for secret in SECRETS {
            if let Some(v) = fields.get_mut(secret) {
                *v = MASK.into();
            }
        }
    }
    StorageView {
        name: name.to_owned(),
        kind: config.kind().to_owned(),
        location: config.location(name, home),
        config: shown,
    }
}

fn name(path: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    path.map(|Path(n)| n)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.body_text()))
}

fn unknown(name: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        format!("this server has no storage named '{name}'"),
    )
}

/// The storages the server reads results from, secrets masked.
#[utoipa::path(get, path = "/api/v1/storages", tag = "storages",
    responses((status = 200, description = "The storages", body = Vec<StorageView>), crate::openapi::ReadErrors))]
pub(crate) async fn list(State(app): State<App>) -> Result<axum::Json<Vec<StorageView>>, Problem> {
    let settings = results(&app)?.settings()?;
    Ok(axum::Json(
        settings
            .storages()
            .iter()
            .map(|(n, c)| view(n, c, settings.home()))
            .collect(),
    ))
}

/// One storage, secrets masked.
#[utoipa::path(get, path = "/api/v1/storages/{name}", tag = "storages",
    params(("name" = String, Path, description = "The storage's name")),
    responses((status = 200, description = "The storage", body = StorageView), crate::openapi::ReadErrors))]
pub(crate) async fn get(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<StorageView>, Problem> {
    let name = name(path)?;
    let settings = results(&app)?.settings()?;
    let config = settings.storage(&name).ok_or_else(|| unknown(&name))?;
    Ok(axum::Json(view(&name, &config, settings.home())))
}

/// Creates or replaces a storage, once a probe object was written to it, read back and
/// deleted. Secrets left out keep their values (an empty one removes it). Local folders must be absolute and inside the server's home (or a root listed in
/// KILN_SERVER_STORAGE_ROOTS); the built-in `local` storage stays a local folder.
#[utoipa::path(put, path = "/api/v1/storages/{name}", tag = "storages", request_body = StorageBody,
    params(("name" = String, Path, description = "The storage's name")),
    responses((status = 200, description = "Saved", body = StorageView),
        (status = 409, description = "The built-in `local` storage cannot become another kind", body = Problem,
            content_type = "application/problem+json"),
        WriteErrors))]
pub(crate) async fn put(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<StorageBody>,
) -> Result<axum::Json<StorageView>, Problem> {
    let name = name(path)?;
    let results = results(&app)?;
    let mut settings = results.settings()?;
    let mut wanted = serde_json::to_value(&body).unwrap_or_default();
    // Write-only secrets: kept when left out, removed when empty.
    let existing = settings
        .storage(&name)
        .map(|c| serde_json::to_value(&c).unwrap_or_default());
    if let Some(fields) = wanted.as_object_mut() {
        for secret in SECRETS {
            match fields.get(secret) {
                Some(serde_json::Value::String(s)) if s.is_empty() => {
                    fields.remove(secret);
                }
                Some(serde_json::Value::String(_)) => {}
                _ => {
                    fields.remove(secret);
                    let kept = existing
                        .as_ref()
                        .filter(|e| e["kind"] == fields["kind"])
                        .and_then(|e| e.get(secret))
                        .cloned();
                    if let Some(kept) = kept {
                        fields.insert(secret.into(), kept);
                    }
                }
            }
        }
        fields.retain(|_, v| !v.is_null());
    }
    let config: StorageConfig = serde_json::from_value(wanted).map_err(|e| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("not a storage configuration: {e}"),
        )
    })?;
    if name == "local" && !matches!(config, StorageConfig::Local { .. }) {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "the built-in storage 'local' stays a local folder (every program falls back to it); give this storage \
             another name",
        ));
    }
    if let StorageConfig::Local { path: Some(path) } = &config {
        allowed_folder(path, settings.home())?;
    }
    // Built and tested before it is saved: a storage that cannot hold results is not kept
    // (every later read through it would fail).
    let storage = ResultStorage::build(&name, &config, settings.home())
        .map_err(|e| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    if let Some(why) = probe(&storage).await {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("storage '{name}' was not saved: writing, reading back and deleting a probe failed: {why}"),
        ));
    }
    settings
        .put_storage(&name, config.clone())
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    tracing::info!(storage = %name, kind = config.kind(), "storage saved");
    Ok(axum::Json(view(&name, &config, settings.home())))
}

/// Writes, reads back and deletes a probe object within [`TEST_TIMEOUT`]; what failed, if
/// anything.
async fn probe(storage: &ResultStorage) -> Option<String> {
    match tokio::time::timeout(TEST_TIMEOUT, storage.probe()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(format!("no answer within {TEST_TIMEOUT:?}")),
    }
}

/// A local folder given through the API must be absolute and inside the server's home or a
/// root the operator allowed (KILN_SERVER_STORAGE_ROOTS, separated by ':').
fn allowed_folder(path: &std::path::Path, home: &std::path::Path) -> Result<(), Problem> {
    if !path.is_absolute() {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("a local storage's path must be absolute ('{}')", path.display()),
        ));
    }
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            format!(
                "a local storage's path may not climb with '..' ('{}'); give the folder itself",
                path.display()
            ),
        ));
    }
    let mut roots = vec![home.to_owned()];
    if let Ok(extra) = std::env::var("KILN_SERVER_STORAGE_ROOTS") {
        roots.extend(std::env::split_paths(&extra).filter(|p| p.is_absolute()));
    }
    if roots.iter().any(|r| path.starts_with(r)) {
        return Ok(());
    }
    Err(Problem::new(
        StatusCode::FORBIDDEN,
        format!(
            "'{}' is outside the folders this server may write results to ({}); the server's operator can allow \
             more with KILN_SERVER_STORAGE_ROOTS",
            path.display(),
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// Removes a storage from the server's settings (its objects are left alone).
#[utoipa::path(delete, path = "/api/v1/storages/{name}", tag = "storages",
    params(("name" = String, Path, description = "The storage's name")),
    responses((status = 204, description = "Removed"),
        (status = 404, description = "No such storage", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The built-in `local` storage cannot be removed", body = Problem,
            content_type = "application/problem+json"),
        WriteErrors))]
pub(crate) async fn delete(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, Problem> {
    let name = name(path)?;
    let mut settings = results(&app)?.settings()?;
    if name == "local" && settings.storage("local") == Some(StorageConfig::Local { path: None }) {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "the built-in storage 'local' cannot be removed",
        ));
    }
    if !settings
        .remove_storage(&name)
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    {
        return Err(unknown(&name));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// What a storage test found.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TestReport {
    /// The storage.
    name: String,
    /// Whether a probe object was written, read back and deleted.
    ok: bool,
    /// What failed, when something did.
    error: Option<String>,
}

/// Writes a probe object to the storage, reads it back and deletes it.
#[utoipa::path(post, path = "/api/v1/storages/{name}/test", tag = "storages",
    params(("name" = String, Path, description = "The storage's name")),
    responses((status = 200, description = "What the test found (ok or not)", body = TestReport), WriteErrors,
        (status = 404, description = "No such storage", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn test(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<TestReport>, Problem> {
    let name = name(path)?;
    let results = results(&app)?;
    let settings = results.settings()?;
    if settings.storage(&name).is_none() {
        return Err(unknown(&name));
    }
    let outcome = match results.storage(&name) {
        Ok(storage) => probe(&storage).await,
        Err(p) => Some(p.detail),
    };
    Ok(axum::Json(TestReport {
        name,
        ok: outcome.is_none(),
        error: outcome,
    }))
}

/// A cached result, as the API lists it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CachedResult {
    /// Its key (`cache/<task>/<hash>`).
    pub(crate) key: String,
    /// The payload's size in bytes.
    pub(crate) size: u64,
    /// When it was written (microseconds since the Unix epoch).
    pub(crate) created: i64,
    /// When it stops being valid, if ever.
    pub(crate) expires: Option<i64>,
    /// The run that produced it.
    pub(crate) run_id: Option<uuid::Uuid>,
    /// That run's name.
    pub(crate) run_name: String,
    /// The serializer that wrote it.
    pub(crate) serializer: String,
}

/// An object under `cache/` that is not a readable record.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Unreadable {
    /// Its key.
    pub(crate) key: String,
    /// Why it cannot be read.
    pub(crate) error: String,
}

/// A storage's cached results.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CacheListing {
    /// The storage.
    pub(crate) storage: String,
    /// The cached results, by key.
    pub(crate) entries: Vec<CachedResult>,
    /// Objects under `cache/` that are not readable records.
    pub(crate) unreadable: Vec<Unreadable>,
}

fn storage_of(app: &App, name: &str) -> Result<ResultStorage, Problem> {
    results(app)?.storage(name)
}

/// The cached task results a storage holds: key, size, creation, expiry, producing run.
#[utoipa::path(get, path = "/api/v1/storages/{name}/cache", tag = "cache",
    params(("name" = String, Path, description = "The storage's name")),
    responses((status = 200, description = "Its cached results", body = CacheListing), crate::openapi::ResultErrors))]
pub(crate) async fn cache(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<CacheListing>, Problem> {
    let name = name(path)?;
    let storage = storage_of(&app, &name)?;
    let listing = storage.cache_entries().await.map_err(crate::results::problem)?;
    Ok(axum::Json(CacheListing {
        storage: name,
        entries: listing
            .entries
            .into_iter()
            .map(|e| CachedResult {
                key: e.key,
                size: e.size,
                created: e.created,
                expires: e.expires,
                run_id: e.run_id,
                run_name: e.run_name,
                serializer: e.serializer,
            })
            .collect(),
        unreadable: listing
            .unreadable
            .into_iter()
            .map(|(key, error)| Unreadable { key, error })
            .collect(),
    }))
}

/// `?key=`: one cached result.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct CacheKey {
    /// The key, as the listing gives it (`cache/<task>/<hash>`).
    #[param(pattern = "^cache/")]
    pub(crate) key: String,
}

/// Deletes one cached result (the next run of its task computes it again).
#[utoipa::path(delete, path = "/api/v1/storages/{name}/cache", tag = "cache",
    params(("name" = String, Path, description = "The storage's name"), CacheKey),
    responses((status = 204, description = "Deleted"),
        (status = 404, description = "No such storage or cached result", body = Problem,
            content_type = "application/problem+json"),
        WriteErrors))]
pub(crate) async fn uncache(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
    query: Result<axum::extract::Query<CacheKey>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, Problem> {
    let name = name(path)?;
    let CacheKey { key } = crate::api::query(query)?;
    if !key.starts_with("cache/") {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            format!("'{key}' is not a cache key: they start with cache/ (see the listing)"),
        ));
    }
    // A key that would leave the storage's root (`..`) names nothing there.
    let key = kiln::result::StorageKey::new(key.clone()).map_err(|e| {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!("no cached result can have the key '{key}' ({e})"),
        )
    })?;
    let storage = storage_of(&app, &name)?;
    if !storage.exists(&key).await.map_err(crate::results::problem)? {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("no cached result '{key}' in storage '{name}'"),
        ));
    }
    storage.delete(&key).await.map_err(crate::results::problem)?;
    Ok(StatusCode::NO_CONTENT)
}

/// How many cached results a prune deleted.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Pruned {
    /// The storage.
    storage: String,
    /// How many expired cached results were deleted.
    pruned: u64,
}

/// Deletes the cached results that have expired.
#[utoipa::path(post, path = "/api/v1/storages/{name}/cache/prune", tag = "cache",
    params(("name" = String, Path, description = "The storage's name")),
    responses((status = 200, description = "What was deleted", body = Pruned),
        (status = 404, description = "No such storage", body = Problem, content_type = "application/problem+json"),
        WriteErrors))]
pub(crate) async fn prune(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<Pruned>, Problem> {
    let name = name(path)?;
    let storage = storage_of(&app, &name)?;
    let pruned = storage
        .prune_expired_cache(kiln_store::model::now_micros())
        .await
        .map_err(crate::results::problem)?;
    Ok(axum::Json(Pruned { storage: name, pruned }))
}
