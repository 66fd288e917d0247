//! Large assets: stream a file into a storage and hand on only its reference.

use std::path::Path as FsPath;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, WriteMultipart};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{ResultError, StorageKey};
use crate::{Engine, Error};

/// Parts of a multipart upload; S3 requires at least 5 MiB for all but the last.
const PART: usize = 8 * 1024 * 1024;
/// Parts in flight at once: memory stays near `PART * (IN_FLIGHT + 1)` whatever the size.
const IN_FLIGHT: usize = 4;

/// A large object in a result storage, handed between tasks by reference.
///
/// A task streams a file (or any byte stream) into a storage with [`ObjectRef::upload_file`]
/// and returns the `ObjectRef`: a few bytes that persist and cross processes like any
/// result. The next task streams the object back with [`ObjectRef::download_to`] or
/// [`ObjectRef::stream`]. Memory stays bounded by a few 8 MiB parts however large the
/// object is (multipart uploads where the backend has them), and the BLAKE3 hash computed
/// while uploading is verified while downloading.
///
/// ```no_run
/// use kiln::prelude::*;
/// use kiln::ObjectRef;
///
/// #[task]
/// async fn render_video() -> Result<ObjectRef, kiln::Error> {
///     // ... write /tmp/out.mp4 ...
///     ObjectRef::upload_file("media", "videos/out.mp4", "/tmp/out.mp4").await
/// }
///
/// #[task]
/// async fn publish(video: ObjectRef) -> Result<u64, kiln::Error> {
///     video.download_to("/tmp/in.mp4").await?;
///     Ok(video.size)
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// The storage's name.
    pub storage: String,
    /// The key inside the storage.
    pub key: String,
    /// The object's size in bytes.
    pub size: u64,
    /// `blake3:<hex>` of the object's bytes.
    pub hash: String,
}

impl ObjectRef {
    /// `storage:key`, the form `kiln result show` and logs use.
    pub fn uri(&self) -> String {
        format!("{}:{}", self.storage, self.key)
    }

    /// Streams a file into `storage` at `key`.
    pub async fn upload_file(
        storage: &str,
        key: impl Into<String>,
        path: impl AsRef<FsPath>,
    ) -> Result<ObjectRef, Error> {
        let path = path.as_ref();
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::Setup(format!("cannot read {} to upload it: {e}", path.display())))?;
        Self::upload_reader(storage, key, file).await
    }

    /// Streams everything `reader` yields into `storage` at `key`.
    pub async fn upload_reader(
        storage: &str,
        key: impl Into<String>,
        reader: impl AsyncRead + Unpin,
    ) -> Result<ObjectRef, Error> {
        // Read whole parts: each chunk handed on is one part of the upload.
        let chunks = futures::stream::unfold(Some(reader), |reader| async move {
            let mut reader = reader?;
            let mut buf = vec![0u8; PART];
            let mut filled = 0;
            while filled < PART {
                match reader.read(&mut buf[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => return Some((Err(e), None)),
                }
            }
            buf.truncate(filled);
            (filled > 0).then(|| (Ok(Bytes::from(buf)), Some(reader)))
        });
        Self::upload_stream(storage, key, chunks).await
    }

    /// Streams chunks of bytes into `storage` at `key`.
    pub async fn upload_stream(
        storage: &str,
        key: impl Into<String>,
        chunks: impl Stream<Item = std::io::Result<Bytes>>,
    ) -> Result<ObjectRef, Error> {
        let engine = Engine::current()?;
        let store = engine.storage(storage)?;
        let key = StorageKey::new(key.into()).map_err(ResultError::InvalidKey)?;
        let fail = |op: &'static str, message: String| ResultError::Backend {
            storage: storage.to_owned(),
            kind: store.kind(),
            op,
            key: key.to_string(),
            message,
        };
        let upload = store
            .object_store()
            .put_multipart(&store.path(&key))
            .await
            .map_err(|e| fail("start uploading", e.to_string()))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut chunks = std::pin::pin!(chunks);
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(Error::Setup(format!(
                        "reading the data to upload to {storage}:{key} failed: {e}"
                    )));
                }
            };
            writer
                .wait_for_capacity(IN_FLIGHT)
                .await
                .map_err(|e| fail("upload", e.to_string()))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            writer.put(chunk);
        }
        writer
            .finish()
            .await
            .map_err(|e| fail("finish uploading", e.to_string()))?;
        let object = ObjectRef {
            storage: storage.to_owned(),
            key: key.to_string(),
            size,
            hash: format!("blake3:{}", hasher.finalize().to_hex()),
        };
        tracing::info!(uri = %object.uri(), size, "uploaded");
        Ok(object)
    }

    /// The object's bytes as a stream of chunks, as they arrive (not verified: use
    /// [`download_to`](Self::download_to) for a verified copy).
    pub async fn stream(&self) -> Result<impl Stream<Item = Result<Bytes, Error>> + use<>, Error> {
        let engine = Engine::current()?;
        let store = engine.storage(&self.storage)?;
        let key = StorageKey::new(self.key.clone()).map_err(ResultError::InvalidKey)?;
        let got = store.object_store().get(&store.path(&key)).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => ResultError::Missing {
                storage: self.storage.clone(),
                key: self.key.clone(),
            },
            e => ResultError::Backend {
                storage: self.storage.clone(),
                kind: store.kind(),
                op: "read",
                key: self.key.clone(),
                message: e.to_string(),
            },
        })?;
        let (storage, key_text, kind) = (self.storage.clone(), self.key.clone(), store.kind());
        Ok(got.into_stream().map_err(move |e| {
            Error::from(ResultError::Backend {
                storage: storage.clone(),
                kind,
                op: "read",
                key: key_text.clone(),
                message: e.to_string(),
            })
        }))
    }

    /// Streams the object into a file and verifies its size and hash; a copy that does not
    /// match is deleted and reported.
    pub async fn download_to(&self, path: impl AsRef<FsPath>) -> Result<(), Error> {
        let path = path.as_ref();
        let io = |e: std::io::Error| Error::Setup(format!("cannot write {}: {e}", path.display()));
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut chunks = std::pin::pin!(self.stream().await?);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        let found = format!("blake3:{}", hasher.finalize().to_hex());
        if size != self.size || found != self.hash {
            let _ = tokio::fs::remove_file(path).await;
            let source = if size != self.size {
                super::RecordError::Truncated {
                    expected: self.size,
                    found: size,
                }
            } else {
                super::RecordError::HashMismatch {
                    expected: self.hash.clone(),
                    found,
                }
            };
            return Err(ResultError::Corrupt {
                storage: self.storage.clone(),
                key: self.key.clone(),
                source,
            }
            .into());
        }
        Ok(())
    }
}
