//! Result storages: named configurations of where records live, all through `object_store`.
//!
//! ```toml
//! # kiln.toml (in the working directory, else in $KILN_HOME)
//! [storage.my-results]
//! kind = "local"
//! path = "/data/kiln-results"        # default: $KILN_HOME/storage/<name>
//!
//! [storage.lake]
//! kind = "s3"
//! bucket = "pipelines"
//! endpoint = "http://127.0.0.1:9000" # any S3-compatible server; omit for AWS
//! region = "us-east-1"
//! access_key_id = "..."
//! secret_access_key = "..."
//! allow_http = true
//! prefix = "kiln"                    # keys live under this folder of the bucket
//! ```
//!
//! Kinds: `local`, `memory` (this process only), `s3`, `gcs`, `azure`. The cloud kinds are
//! compiled in with the features `aws`, `gcp` and `azure` (the `kiln` CLI has all three).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::ResultError;
use super::record::{self, RecordHeader};

/// One storage's configuration, as written in `kiln.toml`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum StorageConfig {
    /// A folder on this machine.
    Local {
        /// The folder (default: `$KILN_HOME/storage/<name>`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<PathBuf>,
    },
    /// Memory of this process: gone when it exits (tests, scratch results).
    Memory,
    /// Amazon S3 or any S3-compatible server.
    S3 {
        /// The bucket.
        bucket: String,
        /// The endpoint of an S3-compatible server (omit for AWS).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// The region (default `us-east-1`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        region: Option<String>,
        /// The access key id (else from the environment, as the AWS SDKs read it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        access_key_id: Option<String>,
        /// The secret access key (never printed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret_access_key: Option<String>,
        /// Allow plain `http://` endpoints.
        #[serde(default, skip_serializing_if = "is_false")]
        allow_http: bool,
        /// A folder inside the bucket for Kiln's keys.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
    /// Google Cloud Storage.
    Gcs {
        /// The bucket.
        bucket: String,
        /// A service account key file (else the environment's credentials).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        service_account_path: Option<String>,
        /// A folder inside the bucket for Kiln's keys.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
    /// Azure Blob Storage (or its emulator, Azurite).
    Azure {
        /// The container.
        container: String,
        /// The storage account (default: the emulator's when `use_emulator`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        account: Option<String>,
        /// The account key (never printed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        access_key: Option<String>,
        /// The blob endpoint, e.g. Azurite's `http://127.0.0.1:10000/devstoreaccount1`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// Use the Azurite emulator's well-known account.
        #[serde(default, skip_serializing_if = "is_false")]
        use_emulator: bool,
        /// Allow plain `http://` endpoints.
        #[serde(default, skip_serializing_if = "is_false")]
        allow_http: bool,
        /// A folder inside the container for Kiln's keys.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl StorageConfig {
    /// `local`, `memory`, `s3`, `gcs` or `azure`.
    pub fn kind(&self) -> &'static str {
        match self {
            StorageConfig::Local { .. } => "local",
            StorageConfig::Memory => "memory",
            StorageConfig::S3 { .. } => "s3",
            StorageConfig::Gcs { .. } => "gcs",
            StorageConfig::Azure { .. } => "azure",
        }
    }

    /// Where the storage points, for listings (no secrets).
    pub fn location(&self, name: &str, home: &FsPath) -> String {
        match self {
            StorageConfig::Local { path } => local_root(path.as_deref(), name, home).display().to_string(),
            StorageConfig::Memory => "(this process's memory)".into(),
            StorageConfig::S3 {
                bucket,
                endpoint,
                prefix,
                ..
            } => format!(
                "s3://{bucket}/{}{}",
                prefix.as_deref().unwrap_or(""),
                endpoint.as_deref().map(|e| format!(" at {e}")).unwrap_or_default()
            ),
            StorageConfig::Gcs { bucket, prefix, .. } => format!("gs://{bucket}/{}", prefix.as_deref().unwrap_or("")),
            StorageConfig::Azure {
                container,
                endpoint,
                prefix,
                ..
            } => format!(
                "az://{container}/{}{}",
                prefix.as_deref().unwrap_or(""),
                endpoint.as_deref().map(|e| format!(" at {e}")).unwrap_or_default()
            ),
        }
    }
}

// Secrets never reach logs or terminals: Debug masks them.
impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mask = |s: &Option<String>| s.as_ref().map(|_| "***");
        match self {
            StorageConfig::Local { path } => f.debug_struct("Local").field("path", path).finish(),
            StorageConfig::Memory => f.write_str("Memory"),
            StorageConfig::S3 {
                bucket,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                allow_http,
                prefix,
            } => f
                .debug_struct("S3")
                .field("bucket", bucket)
                .field("endpoint", endpoint)
                .field("region", region)
                .field("access_key_id", access_key_id)
                .field("secret_access_key", &mask(secret_access_key))
                .field("allow_http", allow_http)
                .field("prefix", prefix)
                .finish(),
            StorageConfig::Gcs {
                bucket,
                service_account_path,
                prefix,
            } => f
                .debug_struct("Gcs")
                .field("bucket", bucket)
                .field("service_account_path", service_account_path)
                .field("prefix", prefix)
                .finish(),
            StorageConfig::Azure {
                container,
                account,
                access_key,
                endpoint,
                use_emulator,
                allow_http,
                prefix,
            } => f
                .debug_struct("Azure")
                .field("container", container)
                .field("account", account)
                .field("access_key", &mask(access_key))
                .field("endpoint", endpoint)
                .field("use_emulator", use_emulator)
                .field("allow_http", allow_http)
                .field("prefix", prefix)
                .finish(),
        }
    }
}

fn local_root(path: Option<&FsPath>, name: &str, home: &FsPath) -> PathBuf {
    path.map(FsPath::to_path_buf)
        .unwrap_or_else(|| home.join("storage").join(name))
}

/// The longest file or folder name a local storage accepts: file systems allow 255 bytes,
/// less what object_store's temporary files and Kiln's lock files append.
const LOCAL_NAME_MAX: usize = 230;
/// The longest key on S3, GCS and Azure (1024 bytes there), less what Kiln's staging and
/// lock keys add.
const OBJECT_KEY_MAX: usize = 950;

fn ellipsis(text: &str) -> String {
    if text.len() <= 80 {
        return text.to_owned();
    }
    let mut end = 60;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A storage ready for records: a named `ObjectStore` and the folder Kiln's keys live in.
#[derive(Clone)]
pub struct ResultStorage {
    name: Arc<str>,
    kind: &'static str,
    store: Arc<dyn ObjectStore>,
    /// A folder inside the bucket or container, without slashes at either end.
    prefix: Option<String>,
    /// The folder of a `local` storage (its locks are file locks).
    local_root: Option<PathBuf>,
    /// Records of a `local` storage are flushed to the disk, with their folder, before a
    /// write returns (`KILN_RESULTS_FSYNC`).
    fsync: bool,
}

impl fmt::Debug for ResultStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResultStorage")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

/// A validated storage key: relative, no `..`, no empty segments, no backslashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StorageKey(String);

impl StorageKey {
    /// Checks a key: it must stay inside the storage's root.
    pub fn new(key: impl Into<String>) -> Result<StorageKey, String> {
        let key = key.into();
        let reason = if key.is_empty() {
            Some("it is empty")
        } else if key.starts_with('/') || key.starts_with('\\') || key.chars().nth(1) == Some(':') {
            Some("it is absolute; keys are relative to the storage's root")
        } else if key.contains('\\') {
            Some("it contains a backslash; separate folders with '/'")
        } else if key.split('/').any(|s| s == ".." || s == ".") {
            Some("it contains a '..' or '.' segment, which could leave the storage's root")
        } else if key.split('/').any(str::is_empty) {
            Some("it contains an empty segment ('//' or a trailing '/')")
        } else if key.chars().any(char::is_control) {
            Some("it contains a control character")
        } else {
            None
        };
        match reason {
            Some(r) => Err(format!("key '{}' is not valid: {r}", key.escape_debug())),
            None => Ok(StorageKey(key)),
        }
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for StorageKey {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        StorageKey::new(s)
    }
}

impl From<StorageKey> for String {
    fn from(k: StorageKey) -> String {
        k.0
    }
}

impl fmt::Display for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Metadata of a stored object, from a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredObject {
    /// The key (relative to the storage's root).
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, microseconds since the Unix epoch.
    pub modified: i64,
}

/// A cached task result in a storage (a record under `cache/`), as its header describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheEntry {
    /// Its key (`cache/<task>/<hash>`).
    pub key: String,
    /// The payload's size in bytes.
    pub size: u64,
    /// When it was written, microseconds since the Unix epoch.
    pub created: i64,
    /// When it stops being valid, if ever.
    pub expires: Option<i64>,
    /// The run that produced it.
    pub run_id: Option<uuid::Uuid>,
    /// That run's name.
    pub run_name: String,
    /// The serializer that wrote it.
    pub serializer: String,
}

/// The cached results of a storage, and the objects under `cache/` that are not readable
/// records (with why).
#[derive(Debug, Clone, Default)]
pub struct CacheListing {
    /// The readable entries, by key.
    pub entries: Vec<CacheEntry>,
    /// Keys that could not be read as records, and why.
    pub unreadable: Vec<(String, String)>,
}

impl ResultStorage {
    /// The cached task results this storage holds.
    pub async fn cache_entries(&self) -> Result<CacheListing, ResultError> {
        let mut listing = CacheListing::default();
        for object in self.list(Some("cache")).await? {
            let key = match StorageKey::new(object.key.clone()) {
                Ok(key) => key,
                Err(e) => {
                    listing.unreadable.push((object.key, e));
                    continue;
                }
            };
            match self.read_header(&key).await {
                Ok(h) => listing.entries.push(CacheEntry {
                    key: object.key,
                    size: h.length,
                    created: h.created,
                    expires: h.expires,
                    run_id: h.run_id,
                    run_name: h.run_name,
                    serializer: h.serializer,
                }),
                Err(e) => listing.unreadable.push((object.key, e.to_string())),
            }
        }
        Ok(listing)
    }

    /// Deletes the cached results that expired at `now` (microseconds since the Unix epoch);
    /// how many.
    pub async fn prune_expired_cache(&self, now: i64) -> Result<u64, ResultError> {
        let mut pruned = 0;
        for entry in self.cache_entries().await?.entries {
            if entry.expires.is_some_and(|x| x <= now) {
                let key = StorageKey::new(entry.key).map_err(ResultError::InvalidKey)?;
                self.delete(&key).await?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// Builds the storage `name` from its configuration (`home` roots default local paths).
    pub fn build(name: &str, config: &StorageConfig, home: &FsPath) -> Result<ResultStorage, ResultError> {
        let fail = |message: String| ResultError::Config {
            storage: name.to_owned(),
            message,
        };
        let mut local_root_path = None;
        let (store, prefix): (Arc<dyn ObjectStore>, Option<&str>) = match config {
            StorageConfig::Local { path } => {
                let root = local_root(path.as_deref(), name, home);
                std::fs::create_dir_all(&root)
                    .map_err(|e| fail(format!("cannot create its folder {}: {e}", root.display())))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&root)
                    .map_err(|e| fail(format!("cannot use the folder {}: {e}", root.display())))?;
                local_root_path = Some(root.clone());
                (Arc::new(fs.with_automatic_cleanup(true)), None)
            }
            StorageConfig::Memory => (memory_store(name), None),
            #[cfg(feature = "aws")]
            StorageConfig::S3 {
                bucket,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                allow_http,
                prefix,
            } => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region.as_deref().unwrap_or("us-east-1"))
                    .with_allow_http(*allow_http)
                    .with_retry(retry_config());
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(k) = access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(s) = secret_access_key {
                    b = b.with_secret_access_key(s);
                }
                (Arc::new(b.build().map_err(|e| fail(e.to_string()))?), prefix.as_deref())
            }
            #[cfg(feature = "gcp")]
            StorageConfig::Gcs {
                bucket,
                service_account_path,
                prefix,
            } => {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry_config());
                if let Some(p) = service_account_path {
                    b = b.with_service_account_path(p);
                }
                (Arc::new(b.build().map_err(|e| fail(e.to_string()))?), prefix.as_deref())
            }
            #[cfg(feature = "azure")]
            StorageConfig::Azure {
                container,
                account,
                access_key,
                endpoint,
                use_emulator,
                allow_http,
                prefix,
            } => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .with_allow_http(*allow_http)
                    .with_retry(retry_config());
                match (use_emulator, endpoint) {
                    // object_store reads an emulator's address only from the environment;
                    // with an explicit endpoint, give it the emulator's public account instead.
                    (true, Some(_)) => {
                        b = b
                            .with_account(AZURITE_ACCOUNT)
                            .with_access_key(AZURITE_KEY)
                            .with_allow_http(true);
                    }
                    (true, None) => b = b.with_use_emulator(true),
                    (false, _) => {}
                }
                if let Some(a) = account {
                    b = b.with_account(a);
                }
                if let Some(k) = access_key {
                    b = b.with_access_key(k);
                }
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e.clone());
                }
                (Arc::new(b.build().map_err(|e| fail(e.to_string()))?), prefix.as_deref())
            }
            #[allow(unreachable_patterns)]
            other => {
                let feature = match other.kind() {
                    "s3" => "aws",
                    "gcs" => "gcp",
                    k => k,
                };
                return Err(fail(format!(
                    "it is of kind '{}', which this build of Kiln leaves out; enable the `kiln` feature `{feature}`",
                    other.kind()
                )));
            }
        };
        let prefix = prefix.map(|p| p.trim_matches('/').to_owned()).filter(|p| !p.is_empty());
        Ok(ResultStorage {
            name: Arc::from(name),
            kind: config.kind(),
            store,
            prefix,
            local_root: local_root_path,
            fsync: false,
        })
    }

    /// The storage's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The storage's kind.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The underlying object store (for streaming large assets).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub(crate) fn path(&self, key: &StorageKey) -> Path {
        let prefix = self.prefix.as_deref().into_iter().flat_map(|p| p.split('/'));
        Path::from_iter(prefix.chain(key.as_str().split('/')))
    }

    fn backend(&self, op: &'static str, key: &StorageKey, source: object_store::Error) -> ResultError {
        match source {
            // A write cannot find its key: what is missing is the bucket or container.
            object_store::Error::NotFound { source, .. } if op == "write" => ResultError::Config {
                storage: self.name.to_string(),
                message: format!(
                    "writing '{key}' failed because its bucket or container does not exist ({source}); \
                     create it, or correct its name in kiln.toml"
                ),
            },
            object_store::Error::NotFound { .. } => ResultError::Missing {
                storage: self.name.to_string(),
                key: key.to_string(),
            },
            object_store::Error::AlreadyExists { .. } => ResultError::AlreadyExists {
                storage: self.name.to_string(),
                key: key.to_string(),
            },
            source => ResultError::Backend {
                storage: self.name.to_string(),
                kind: self.kind,
                op,
                key: key.to_string(),
                message: source.to_string(),
            },
        }
    }

    /// Writes a record atomically (no reader sees a partial object). With `create_only`,
    /// fails with [`ResultError::AlreadyExists`] instead of replacing an existing record.
    pub async fn put_record(
        &self,
        key: &StorageKey,
        header: &RecordHeader,
        payload: Bytes,
        create_only: bool,
    ) -> Result<(), ResultError> {
        // Header and payload go as two chunks: the payload is never copied to prepend it.
        let body = PutPayload::from_iter([record::encode_prefix(header), payload]);
        let mode = if create_only {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        self.store
            .put_opts(&self.path(key), body, PutOptions::from(mode))
            .await
            .map(drop)
            .map_err(|e| self.backend("write", key, e))?;
        self.flush_to_disk(key).await
    }

    /// With [`with_fsync`](Self::with_fsync) on a `local` storage: the file at `key` and
    /// its folder are flushed to the disk (its content, then the entry the rename made).
    async fn flush_to_disk(&self, key: &StorageKey) -> Result<(), ResultError> {
        let (true, Some(root)) = (self.fsync, &self.local_root) else {
            return Ok(());
        };
        let file = self
            .path(key)
            .as_ref()
            .split('/')
            .fold(root.clone(), |p, part| p.join(part));
        let flushed = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(&file)?.sync_all()?;
            if let Some(folder) = file.parent() {
                std::fs::File::open(folder)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        flushed.map_err(|e| ResultError::Backend {
            storage: self.name.to_string(),
            kind: self.kind,
            op: "flush to disk",
            key: key.to_string(),
            message: e.to_string(),
        })
    }

    /// Whether writes flush records to the disk before they return (`local` storages).
    pub fn with_fsync(mut self, fsync: bool) -> ResultStorage {
        self.fsync = fsync;
        self
    }

    /// Reads a record and verifies its length and hash.
    pub async fn get_record(&self, key: &StorageKey) -> Result<(RecordHeader, Bytes), ResultError> {
        let bytes = self.get_bytes(key).await?;
        record::decode(bytes).map_err(|source| ResultError::Corrupt {
            storage: self.name.to_string(),
            key: key.to_string(),
            source,
        })
    }

    /// Reads only a record's header (two range reads), e.g. to list a cache.
    pub async fn read_header(&self, key: &StorageKey) -> Result<RecordHeader, ResultError> {
        let path = self.path(key);
        let corrupt = |source| ResultError::Corrupt {
            storage: self.name.to_string(),
            key: key.to_string(),
            source,
        };
        let prefix = self
            .store
            .get_range(&path, 0..14)
            .await
            .map_err(|e| self.backend("read", key, e))?;
        if prefix.len() < 14 || &prefix[..8] != record::MAGIC {
            return Err(corrupt(record::RecordError::NotARecord));
        }
        let len = u32::from_le_bytes([prefix[10], prefix[11], prefix[12], prefix[13]]) as u64;
        if len > 64 * 1024 {
            return Err(corrupt(record::RecordError::BadHeader(format!(
                "it declares {len} header bytes"
            ))));
        }
        let json = self
            .store
            .get_range(&path, 14..14 + len)
            .await
            .map_err(|e| self.backend("read", key, e))?;
        let mut both = bytes::BytesMut::from(&prefix[..]);
        both.extend_from_slice(&json);
        record::decode_unverified(both.freeze())
            .map(|(h, _)| h)
            .map_err(corrupt)
    }

    /// A record's header, then its payload as a stream of chunks as the storage sends them,
    /// verified on the way: when the bytes do not match the header's length and hash, the
    /// stream ends with [`ResultError::Corrupt`] instead of its last chunk, so a reader never
    /// gets a whole payload that is not the one written.
    pub async fn stream_record(
        &self,
        key: &StorageKey,
    ) -> Result<
        (
            RecordHeader,
            futures::stream::BoxStream<'static, Result<Bytes, ResultError>>,
        ),
        ResultError,
    > {
        use futures::StreamExt;
        let header = self.read_header(key).await?;
        let offset = record::encode_prefix(&header).len() as u64;
        let options = object_store::GetOptions {
            range: Some(object_store::GetRange::Offset(offset)),
            ..Default::default()
        };
        let got = self
            .store
            .get_opts(&self.path(key), options)
            .await
            .map_err(|e| self.backend("read", key, e))?;
        let (name, key_text) = (self.name.to_string(), key.to_string());
        let corrupt = move |source| ResultError::Corrupt {
            storage: name.clone(),
            key: key_text.clone(),
            source,
        };
        let (storage, key) = (self.clone(), key.clone());
        let chunks = got
            .into_stream()
            .map(move |chunk| chunk.map_err(|e| storage.backend("read", &key, e)))
            .boxed();
        // (chunks, checker, ended): a failure ends the stream after reporting it.
        let state = (chunks, record::Verify::new(&header), false);
        let verified = futures::stream::unfold(state, move |(mut chunks, mut verify, ended)| {
            let corrupt = corrupt.clone();
            async move {
                if ended {
                    return None;
                }
                let item = match chunks.next().await {
                    Some(Ok(chunk)) => verify.chunk(&chunk).map(|()| chunk).map_err(corrupt),
                    Some(Err(e)) => Err(e),
                    None => verify.finish().err().map(corrupt).map(Err)?,
                };
                let ended = item.is_err();
                Some((item, (chunks, verify, ended)))
            }
        });
        Ok((header, verified.boxed()))
    }

    /// Writes a probe object, reads it back and deletes it: whether the storage works, and
    /// if not, which step failed and why.
    pub async fn probe(&self) -> Result<(), ResultError> {
        let key = StorageKey::new(format!(".kiln-probe/{}", uuid::Uuid::now_v7())).map_err(ResultError::InvalidKey)?;
        let probe = Bytes::from(format!("kiln storage probe {key}"));
        self.put_bytes(&key, probe.clone()).await?;
        let back = self.get_bytes(&key).await?;
        let differs = back != probe;
        self.delete(&key).await?;
        let lingers = self.exists(&key).await?;
        if differs || lingers {
            return Err(ResultError::Config {
                storage: self.name.to_string(),
                message: if differs {
                    "the probe object read back differs from what was written".into()
                } else {
                    "the probe object is still there after deleting it".into()
                },
            });
        }
        Ok(())
    }

    /// Reads an object's bytes as they are.
    pub async fn get_bytes(&self, key: &StorageKey) -> Result<Bytes, ResultError> {
        let got = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| self.backend("read", key, e))?;
        got.bytes().await.map_err(|e| self.backend("read", key, e))
    }

    /// Writes raw bytes at `key` unless something is there; `Ok(false)` when it was.
    pub async fn put_bytes_if_absent(&self, key: &StorageKey, bytes: Bytes) -> Result<bool, ResultError> {
        let opts = PutOptions::from(PutMode::Create);
        match self.store.put_opts(&self.path(key), bytes.into(), opts).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.backend("write", key, e)),
        }
    }

    /// Writes raw bytes (not a record) at `key`.
    pub async fn put_bytes(&self, key: &StorageKey, bytes: Bytes) -> Result<(), ResultError> {
        self.store
            .put(&self.path(key), bytes.into())
            .await
            .map(drop)
            .map_err(|e| self.backend("write", key, e))
    }

    /// Moves an object to another key (a transaction's commit).
    pub async fn rename(&self, from: &StorageKey, to: &StorageKey) -> Result<(), ResultError> {
        self.store
            .rename(&self.path(from), &self.path(to))
            .await
            .map_err(|e| self.backend("move", from, e))?;
        self.flush_to_disk(to).await
    }

    /// Refuses a key this storage cannot hold, so that a task run fails before its body runs
    /// rather than after. Limits leave room for the suffixes Kiln adds (temporary files,
    /// `.lock` files, `staging/<transaction>/` folders).
    pub fn check_key(&self, key: &StorageKey) -> Result<(), ResultError> {
        let too_long = |what: String| {
            Err(ResultError::InvalidKey(format!(
                "storage key '{}' is too long for storage '{}' ({what}); shorten its `storage_key` template                  or the values it uses",
                ellipsis(key.as_str()),
                self.name
            )))
        };
        match self.kind {
            "memory" => Ok(()),
            "local" => match key.as_str().split('/').find(|s| s.len() > LOCAL_NAME_MAX) {
                Some(segment) => too_long(format!(
                    "a file or folder name of {} bytes; a local folder allows {LOCAL_NAME_MAX}",
                    segment.len()
                )),
                None => Ok(()),
            },
            _ => {
                let full = self.prefix.as_ref().map_or(0, |p| p.len() + 1) + key.as_str().len();
                if full > OBJECT_KEY_MAX {
                    too_long(format!(
                        "{full} bytes with its prefix; object keys allow {OBJECT_KEY_MAX}"
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The file behind `key` when this is a `local` storage.
    pub(crate) fn local_file(&self, key: &StorageKey) -> Option<PathBuf> {
        self.local_root.as_ref().map(|root| root.join(key.as_str()))
    }

    /// Reads a small object with its version (for conditional updates); `None` when absent.
    pub(crate) async fn get_versioned(&self, key: &StorageKey) -> Result<Option<(Bytes, UpdateVersion)>, ResultError> {
        let got = match self.store.get(&self.path(key)).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.backend("read", key, e)),
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let bytes = got.bytes().await.map_err(|e| self.backend("read", key, e))?;
        Ok(Some((bytes, version)))
    }

    /// Writes `bytes` at `key` only if nothing is there (`mode` Create) or only if the
    /// object is still at the version read (`mode` Update): the new version, or `None`
    /// when the condition failed (someone else wrote first).
    pub(crate) async fn put_conditional(
        &self,
        key: &StorageKey,
        bytes: Bytes,
        mode: PutMode,
    ) -> Result<Option<UpdateVersion>, ResultError> {
        match self.store.put_opts(&self.path(key), bytes.into(), mode.into()).await {
            Ok(put) => Ok(Some(UpdateVersion {
                e_tag: put.e_tag,
                version: put.version,
            })),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(None),
            Err(e) => Err(self.backend("write", key, e)),
        }
    }

    /// Copies an object to another key, replacing what is there.
    pub async fn copy(&self, from: &StorageKey, to: &StorageKey) -> Result<(), ResultError> {
        self.store
            .copy(&self.path(from), &self.path(to))
            .await
            .map_err(|e| self.backend("copy", from, e))
    }

    /// Deletes an object; deleting a missing one is not an error.
    pub async fn delete(&self, key: &StorageKey) -> Result<(), ResultError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend("delete", key, e)),
        }
    }

    /// Whether an object exists at `key`.
    pub async fn exists(&self, key: &StorageKey) -> Result<bool, ResultError> {
        match self.store.head(&self.path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.backend("check", key, e)),
        }
    }

    /// Lists the objects under `folder` (all when `None`), sorted by key.
    pub async fn list(&self, folder: Option<&str>) -> Result<Vec<StoredObject>, ResultError> {
        use futures::TryStreamExt;
        let parts: Vec<&str> = self
            .prefix
            .as_deref()
            .into_iter()
            .flat_map(|p| p.split('/'))
            .chain(folder.into_iter().flat_map(|f| f.split('/')))
            .filter(|s| !s.is_empty())
            .collect();
        let base = (!parts.is_empty()).then(|| Path::from_iter(parts));
        let strip = self.prefix.as_ref().map(|p| format!("{p}/")).unwrap_or_default();
        let mut out: Vec<StoredObject> = self
            .store
            .list(base.as_ref())
            .map_ok(|m| StoredObject {
                key: percent_decode(m.location.as_ref().strip_prefix(&strip).unwrap_or(m.location.as_ref())),
                size: m.size,
                modified: m.last_modified.timestamp_micros(),
            })
            .try_collect()
            .await
            .map_err(|e| ResultError::Backend {
                storage: self.name.to_string(),
                kind: self.kind,
                op: "list",
                key: folder.unwrap_or("").to_owned(),
                message: e.to_string(),
            })?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// object_store percent-encodes characters outside a safe set in paths; keys are shown as given.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

/// In-process storages are shared by name, so a record written by one task is there for the next.
fn memory_store(name: &str) -> Arc<dyn ObjectStore> {
    use std::sync::{Mutex, OnceLock};
    static STORES: OnceLock<Mutex<BTreeMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let mut stores = STORES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    stores
        .entry(name.to_owned())
        .or_insert_with(|| Arc::new(object_store::memory::InMemory::new()))
        .clone()
}

/// Azurite's documented development account and key (public; the emulator only).
#[cfg(feature = "azure")]
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
#[cfg(feature = "azure")]
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Few, quick retries: a missing bucket or a dead endpoint should fail in seconds, not minutes.
#[cfg(any(feature = "aws", feature = "gcp", feature = "azure"))]
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(30),
        ..Default::default()
    }
}
