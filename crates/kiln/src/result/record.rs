//! The result record: one object per result, a short self-describing header followed by the
//! raw payload. The format is specified in `docs/RESULT_FORMAT.md`.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The first bytes of every record.
pub const MAGIC: &[u8; 8] = b"KILNRSLT";
/// The format version this build writes and the newest it reads.
pub const VERSION: u16 = 1;
/// The largest header accepted (it holds metadata only).
const MAX_HEADER: usize = 64 * 1024;
/// Magic, version and header length.
const PREFIX: usize = 8 + 2 + 4;

/// What a record says about its payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordHeader {
    /// The serializer that wrote the payload (`png`, `msgpack`, `zstd(json)`, ...).
    pub serializer: String,
    /// The Rust type of the value, for people (not used to decode).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value_type: String,
    /// `blake3:` and the hex BLAKE3 hash of the payload.
    pub hash: String,
    /// The payload's length in bytes.
    pub length: u64,
    /// When it was written, microseconds since the Unix epoch.
    pub created: i64,
    /// When it stops being valid (caching), microseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
    /// The task run or flow run that produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<uuid::Uuid>,
    /// That run's name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub run_name: String,
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The object does not start with the record magic.
    #[error(
        "not a Kiln result record (it does not start with {:?}); it was written by something else",
        String::from_utf8_lossy(MAGIC)
    )]
    NotARecord,
    /// A format version newer than this build reads.
    #[error("record format version {0} is newer than this Kiln reads ({VERSION}); upgrade Kiln")]
    TooNew(u16),
    /// The header is cut short or not valid JSON.
    #[error("the record header is damaged: {0}")]
    BadHeader(String),
    /// Fewer (or more) payload bytes than the header promises.
    #[error(
        "the payload has {found} bytes but the header promises {expected}: the object was truncated or appended to"
    )]
    Truncated {
        /// Bytes promised by the header.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The payload's hash differs from the header's.
    #[error("hash mismatch (expected {expected}, found {found}); the object was changed after it was written")]
    HashMismatch {
        /// The hash in the header.
        expected: String,
        /// The hash of the payload read.
        found: String,
    },
}

/// `blake3:<hex>` of `payload`.
pub fn content_hash(payload: &[u8]) -> String {
    let mut hasher = blake3::Hasher::new();
    // Large payloads hash on several threads would need rayon; one core does ~4 GB/s.
    hasher.update(payload);
    format!("blake3:{}", hasher.finalize().to_hex())
}

/// Checks a payload that arrives in chunks against its header's length and hash.
#[derive(Debug)]
pub struct Verify {
    hasher: blake3::Hasher,
    seen: u64,
    length: u64,
    hash: String,
}

impl Verify {
    /// A checker for the payload `header` describes.
    pub fn new(header: &RecordHeader) -> Verify {
        Verify {
            hasher: blake3::Hasher::new(),
            seen: 0,
            length: header.length,
            hash: header.hash.clone(),
        }
    }

    /// Takes the next chunk: an error when it goes past the promised length, or when it
    /// completes the payload and the hash differs.
    pub fn chunk(&mut self, chunk: &[u8]) -> Result<(), RecordError> {
        self.seen += chunk.len() as u64;
        if self.seen > self.length {
            return Err(RecordError::Truncated {
                expected: self.length,
                found: self.seen,
            });
        }
        self.hasher.update(chunk);
        if self.seen == self.length {
            let found = format!("blake3:{}", self.hasher.finalize().to_hex());
            if found != self.hash {
                return Err(RecordError::HashMismatch {
                    expected: self.hash.clone(),
                    found,
                });
            }
        }
        Ok(())
    }

    /// At the end of the payload: an error when bytes are missing.
    pub fn finish(&self) -> Result<(), RecordError> {
        if self.seen == self.length {
            Ok(())
        } else {
            Err(RecordError::Truncated {
                expected: self.length,
                found: self.seen,
            })
        }
    }
}

/// The bytes that precede the payload: magic, version, header length, header.
pub fn encode_prefix(header: &RecordHeader) -> Bytes {
    let json = serde_json::to_vec(header).expect("a record header always serializes");
    let mut out = BytesMut::with_capacity(PREFIX + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.freeze()
}

/// Splits a record into its header and payload and verifies length and hash.
pub fn decode(record: Bytes) -> Result<(RecordHeader, Bytes), RecordError> {
    let (header, payload) = decode_unverified(record)?;
    if payload.len() as u64 != header.length {
        return Err(RecordError::Truncated {
            expected: header.length,
            found: payload.len() as u64,
        });
    }
    let found = content_hash(&payload);
    if found != header.hash {
        return Err(RecordError::HashMismatch {
            expected: header.hash,
            found,
        });
    }
    Ok((header, payload))
}

/// Splits a record without checking the payload (to show a damaged record's metadata).
pub fn decode_unverified(record: Bytes) -> Result<(RecordHeader, Bytes), RecordError> {
    if record.len() < MAGIC.len() || &record[..MAGIC.len()] != MAGIC {
        return Err(RecordError::NotARecord);
    }
    if record.len() < PREFIX {
        return Err(RecordError::BadHeader(
            "the object ends inside the record prefix".into(),
        ));
    }
    let version = u16::from_le_bytes([record[8], record[9]]);
    if version > VERSION {
        return Err(RecordError::TooNew(version));
    }
    let len = u32::from_le_bytes([record[10], record[11], record[12], record[13]]) as usize;
    if len > MAX_HEADER || PREFIX + len > record.len() {
        return Err(RecordError::BadHeader(format!(
            "it declares {len} header bytes but the object has {} after the prefix",
            record.len() - PREFIX
        )));
    }
    let header: RecordHeader =
        serde_json::from_slice(&record[PREFIX..PREFIX + len]).map_err(|e| RecordError::BadHeader(e.to_string()))?;
    Ok((header, record.slice(PREFIX + len..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8]) -> Bytes {
        let header = RecordHeader {
            serializer: "json".into(),
            value_type: "u32".into(),
            hash: content_hash(payload),
            length: payload.len() as u64,
            created: 1,
            expires: None,
            run_id: None,
            run_name: "t".into(),
        };
        let mut out = BytesMut::from(&encode_prefix(&header)[..]);
        out.extend_from_slice(payload);
        out.freeze()
    }

    #[test]
    fn round_trips_and_verifies() {
        let (h, p) = decode(record(b"[1,2,3]")).unwrap();
        assert_eq!((h.serializer.as_str(), &p[..]), ("json", &b"[1,2,3]"[..]));
    }

    #[test]
    fn one_changed_byte_is_a_hash_mismatch() {
        let mut bytes = record(b"hello world").to_vec();
        *bytes.last_mut().unwrap() ^= 1;
        let err = decode(bytes.into()).unwrap_err();
        assert!(matches!(err, RecordError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().contains("changed after it was written"));
    }

    #[test]
    fn truncation_and_foreign_objects_are_named() {
        let full = record(b"hello world");
        let cut = full.slice(..full.len() - 3);
        assert_eq!(
            decode(cut).unwrap_err(),
            RecordError::Truncated { expected: 11, found: 8 }
        );
        assert_eq!(
            decode(Bytes::from_static(b"\x89PNG\r\n\x1a\n....")).unwrap_err(),
            RecordError::NotARecord
        );
        assert!(matches!(
            decode(full.slice(..12)).unwrap_err(),
            RecordError::BadHeader(_)
        ));
        let mut newer = full.to_vec();
        newer[8] = 9;
        assert_eq!(decode(newer.into()).unwrap_err(), RecordError::TooNew(9));
    }
}
