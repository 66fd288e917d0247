//! Persisted results: records in named storages, referenced from the state database.
//!
//! A persisted result is one object in a [`storage`] (see `docs/RESULT_FORMAT.md`): a short
//! header naming its serializer, length and BLAKE3 hash, then the raw payload. The state
//! database keeps only a [`ResultRef`] (storage, key, serializer, size, hash), never the
//! bytes, so results of any size stay out of the database. Every load verifies the hash.

pub(crate) mod cache;
mod object;
pub(crate) mod persist;
pub mod record;
pub mod storage;

use serde::{Deserialize, Serialize};

pub use object::ObjectRef;
pub use record::{RecordError, RecordHeader};
pub use storage::{CacheEntry, CacheListing, ResultStorage, StorageConfig, StorageKey, StoredObject};

/// Where a persisted result lives: what the state database records for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRef {
    /// The storage's name.
    pub storage: String,
    /// The key inside the storage.
    pub key: String,
    /// The serializer that wrote it.
    pub serializer: String,
    /// The payload's size in bytes.
    pub size: u64,
    /// `blake3:<hex>` of the payload.
    pub hash: String,
    /// The identity of the task call whose value it is (a hash of the task, its code and
    /// its inputs): a retry reuses the result only for a call with the same identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
    /// A small result's whole record (header and payload, base64), kept in the state
    /// database instead of a storage (`storage` is then [`INLINE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
}

/// The storage name of results kept in the state database (`KILN_RESULTS_INLINE_MAX`).
pub const INLINE: &str = "inline";

impl ResultRef {
    /// An inline result's record bytes as stored (not verified); `None` for a result in a
    /// storage.
    pub fn inline_bytes(&self) -> Option<Result<bytes::Bytes, ResultError>> {
        use base64::Engine as _;
        let text = self.inline.as_deref()?;
        Some(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map(bytes::Bytes::from)
                .map_err(|e| {
                    self.inline_corrupt(RecordError::BadHeader(format!("the inline record is not base64: {e}")))
                }),
        )
    }

    /// An inline result's record, verified (length and hash, and the hash the reference
    /// names); `None` for a result in a storage.
    pub fn inline_record(&self) -> Option<Result<(RecordHeader, bytes::Bytes), ResultError>> {
        let bytes = self.inline_bytes()?;
        Some(bytes.and_then(|bytes| {
            let (header, payload) = record::decode(bytes).map_err(|e| self.inline_corrupt(e))?;
            if header.hash != self.hash {
                return Err(self.inline_corrupt(RecordError::HashMismatch {
                    expected: self.hash.clone(),
                    found: header.hash,
                }));
            }
            Ok((header, payload))
        }))
    }

    fn inline_corrupt(&self, source: RecordError) -> ResultError {
        ResultError::Corrupt {
            storage: INLINE.into(),
            key: self.hash.clone(),
            source,
        }
    }

    /// `storage:key`, the form the CLI accepts.
    pub fn uri(&self) -> String {
        format!("{}:{}", self.storage, self.key)
    }
}

/// Errors of persisting and loading results. Each names the storage and key, the cause and
/// what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ResultError {
    /// No storage has this name.
    #[error(
        "unknown storage '{name}'{}; add it with `kiln storage add {name} --kind local` or in kiln.toml ([storage.{name}])",
        known_list(known)
    )]
    UnknownStorage {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: Vec<String>,
    },
    /// The storage's configuration cannot be used.
    #[error("storage '{storage}' cannot be used: {message}")]
    Config {
        /// The storage.
        storage: String,
        /// What is wrong.
        message: String,
    },
    /// The backend refused or could not be reached.
    #[error(
        "storage '{storage}': cannot {op} '{key}': {}; {}",
        backend_cause(kind, message),
        backend_advice(kind, storage, message)
    )]
    Backend {
        /// The storage.
        storage: String,
        /// Its kind (`local`, `s3`, ...): what to check depends on it.
        kind: &'static str,
        /// What was attempted.
        op: &'static str,
        /// The key.
        key: String,
        /// What the backend said.
        message: String,
    },
    /// No object at the key.
    #[error("result '{key}' in storage '{storage}' does not exist (it was deleted, or never written)")]
    Missing {
        /// The storage.
        storage: String,
        /// The key.
        key: String,
    },
    /// An object already exists where a create-only write went.
    #[error("result '{key}' in storage '{storage}' already exists")]
    AlreadyExists {
        /// The storage.
        storage: String,
        /// The key.
        key: String,
    },
    /// The object is not a valid record (damaged, truncated, foreign).
    #[error("result '{key}' in storage '{storage}': {source}")]
    Corrupt {
        /// The storage.
        storage: String,
        /// The key.
        key: String,
        /// What is wrong with it.
        #[source]
        source: RecordError,
    },
    /// The record was written by another serializer than the one reading it.
    #[error(
        "result '{key}' in storage '{storage}' was written by serializer '{found}', but {reader} reads it with '{expected}'; use the same serializer for writing and reading"
    )]
    WrongSerializer {
        /// The storage.
        storage: String,
        /// The key.
        key: String,
        /// The serializer in the record.
        found: String,
        /// The serializer reading it.
        expected: String,
        /// Who reads it (a task name).
        reader: String,
    },
    /// Encoding or decoding failed.
    #[error("{run}: {message}")]
    Serialize {
        /// The run (task or flow) whose value it was.
        run: String,
        /// The serializer's error, with the value's type.
        message: String,
    },
    /// A storage key or key template is not valid.
    #[error("{0}")]
    InvalidKey(String),
    /// A result must be persisted but nothing can persist it.
    #[error("{0}")]
    NotPersistable(String),
    /// A cache policy could not make a key for a run.
    #[error("{run}: cannot compute its cache key: {message}")]
    CacheKey {
        /// The run.
        run: String,
        /// Which part could not be hashed, and what to do.
        message: String,
    },
}

/// An object store's client, finding no credentials anywhere else, asks the cloud metadata
/// service at this address for the machine's own; off a cloud machine the answer is a
/// refusal that says nothing about the real cause.
const METADATA_ADDRESS: &str = "169.254.169.254";

/// What the backend said, or what it meant when what it said misleads.
fn backend_cause<'a>(kind: &str, message: &'a str) -> std::borrow::Cow<'a, str> {
    if kind != "local" && kind != "memory" && message.contains(METADATA_ADDRESS) {
        return format!(
            "no credentials: none in its settings, none in the environment (AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY for s3), and this machine gets none from a cloud metadata service \
             ({METADATA_ADDRESS} refused)"
        )
        .into();
    }
    message.into()
}

/// What to do about a backend's failure, by the storage's kind and the cause.
fn backend_advice(kind: &str, storage: &str, message: &str) -> String {
    let said = |needles: &[&str]| needles.iter().any(|n| message.contains(n));
    let test = format!("`kiln storage test {storage}` tries it again");
    match kind {
        "local" if said(&["No space left", "os error 28", "Disk quota exceeded", "os error 122"]) => {
            format!("its disk is full: free space there, or point the storage at another disk; {test}")
        }
        "local" if said(&["Read-only file system", "os error 30"]) => {
            format!("its folder is on a read-only file system: point the storage at a writable folder; {test}")
        }
        "local" if said(&["Permission denied", "os error 13"]) => {
            format!("this user may not write its folder: change the folder's owner or permissions; {test}")
        }
        "local" => format!("check that its folder exists, is writable by this user and has free space; {test}"),
        "memory" => "a memory storage lives in this process only".into(),
        _ if message.contains(METADATA_ADDRESS) => format!(
            "give it credentials (`kiln storage add {storage} ... --access-key-id ID --secret-access-key-env VAR`, \
             or the environment variables); {test}"
        ),
        _ if said(&["NoSuchBucket", "bucket does not exist", "ContainerNotFound"]) => {
            format!("its bucket (or container) does not exist: create it, or fix the name; {test}")
        }
        _ if said(&[
            "403",
            "AccessDenied",
            "Forbidden",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
        ]) =>
        {
            format!("its credentials were refused: check them and what they may do in the bucket; {test}")
        }
        _ if said(&[
            "Connection refused",
            "error sending request",
            "dns error",
            "timed out",
            "connect",
        ]) =>
        {
            format!("nothing answered at its endpoint: check the endpoint and that the server runs; {test}")
        }
        _ => format!("check its endpoint, bucket and credentials; {test}"),
    }
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        " (no storage is configured)".into()
    } else {
        format!(" (configured: {})", known.join(", "))
    }
}

impl ResultError {
    /// Whether trying again may succeed (a backend that failed to answer).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ResultError::Backend { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_advise_by_kind() {
        let error = |kind, message: &str| {
            ResultError::Backend {
                storage: "results".into(),
                kind,
                op: "write",
                key: "a/b".into(),
                message: message.into(),
            }
            .to_string()
        };
        let local = error("local", "Is a directory (os error 21)");
        assert!(
            local.contains("folder exists, is writable") && !local.contains("credentials"),
            "{local}"
        );
        let s3 = error("s3", "a reason nobody foresaw");
        assert!(s3.contains("endpoint, bucket and credentials"), "{s3}");
        let full = error("local", "No space left on device (os error 28)");
        assert!(
            full.contains("its disk is full") && !full.contains("credentials"),
            "{full}"
        );
        let read_only = error("local", "Read-only file system (os error 30)");
        assert!(read_only.contains("read-only file system: point"), "{read_only}");
        let anonymous = error(
            "s3",
            "Generic S3 error: Error performing PUT http://169.254.169.254/latest/api/token: 403 Forbidden",
        );
        assert!(
            anonymous.contains("no credentials: none in its settings")
                && anonymous.contains("give it credentials")
                && !anonymous.contains("403"),
            "{anonymous}"
        );
        let refused = error(
            "s3",
            "error sending request for url (http://127.0.0.1:1/b): Connection refused",
        );
        assert!(refused.contains("nothing answered at its endpoint"), "{refused}");
        let missing = error("s3", "NoSuchBucket: The specified bucket does not exist");
        assert!(
            missing.contains("its bucket (or container) does not exist"),
            "{missing}"
        );
        for e in [local, s3, full, read_only, anonymous, refused, missing] {
            assert_eq!(e.matches("kiln storage test results").count(), 1, "said once: {e}");
        }
    }
}
