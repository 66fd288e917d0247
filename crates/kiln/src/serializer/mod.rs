//! Serializers: how a result becomes bytes in a record, and back.
//!
//! A serializer has a stable [`name`](Serializer::name) that is written into every record,
//! so any process can tell how a record was encoded. It is typed by the values it accepts:
//! `#[task(serializer = Png)]` on a task that returns a `u64` does not compile.
//!
//! | serializer | name | values | notes |
//! |---|---|---|---|
//! | [`MsgPack`] | `msgpack` | any `Serialize + DeserializeOwned` | the default: fast, compact, readable without the Rust types |
//! | [`Json`] | `json` | any `Serialize + DeserializeOwned` | human-readable |
//! | [`Png`] | `png` | `image` buffers and `DynamicImage` (feature `images`) | what users expect; fast compression by default |
//! | [`Qoi`] | `qoi` | 8-bit RGB and RGBA images (feature `images`) | the fastest exact round trip measured |
//! | [`RawPixels`] | `raw-pixels` | any `image` buffer, 16-bit and float included (feature `images`) | no compression: memory speed; wrap in `Zstd` for flat images |
//! | [`Jpeg`] | `jpeg` | 8-bit RGB and gray images (feature `images`) | lossy: opt in only |
//! | [`Zstd`] | `zstd(<inner>)` | whatever the inner serializer takes | compression around any other |
//!
//! Writing your own takes a few lines:
//!
//! ```
//! use kiln::serializer::{Serializer, SerializeError};
//!
//! /// Stores a list of lines as UTF-8 text, one per line.
//! struct Lines;
//!
//! impl Serializer<Vec<String>> for Lines {
//!     fn name(&self) -> std::borrow::Cow<'static, str> {
//!         "lines".into()
//!     }
//!     fn encode(&self, value: &Vec<String>, out: &mut Vec<u8>) -> Result<(), SerializeError> {
//!         out.extend_from_slice(value.join("\n").as_bytes());
//!         Ok(())
//!     }
//!     fn decode(&self, bytes: &[u8]) -> Result<Vec<String>, SerializeError> {
//!         let text = std::str::from_utf8(bytes).map_err(|e| SerializeError::decode("msgpack", e))?;
//!         Ok(text.lines().map(str::to_owned).collect())
//!     }
//! }
//!
//! let mut out = Vec::new();
//! Lines.encode(&vec!["a".into(), "b".into()], &mut out)?;
//! assert_eq!(Lines.decode(&out)?, ["a", "b"]);
//! # Ok::<_, SerializeError>(())
//! ```

use std::borrow::Cow;
use std::error::Error as StdError;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Turns values of type `T` into bytes and back.
pub trait Serializer<T>: Send + Sync + 'static {
    /// The stable name written into records (`png`, `msgpack`, `zstd(json)`, ...).
    fn name(&self) -> Cow<'static, str>;
    /// Appends the encoding of `value` to `out`.
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError>;
    /// Reads a value back from bytes this serializer wrote.
    fn decode(&self, bytes: &[u8]) -> Result<T, SerializeError>;
}

/// Encoding or decoding failed.
#[derive(Debug, thiserror::Error)]
#[error("serializer '{serializer}' cannot {op}: {source}")]
pub struct SerializeError {
    serializer: String,
    op: &'static str,
    #[source]
    source: Box<dyn StdError + Send + Sync>,
}

impl SerializeError {
    /// Encoding a value failed.
    pub fn encode(serializer: impl Into<String>, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        SerializeError {
            serializer: serializer.into(),
            op: "encode the value",
            source: source.into(),
        }
    }

    /// Decoding bytes failed.
    pub fn decode(serializer: impl Into<String>, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        SerializeError {
            serializer: serializer.into(),
            op: "decode the bytes",
            source: source.into(),
        }
    }

    /// The serializer's name.
    pub fn serializer(&self) -> &str {
        &self.serializer
    }
}

/// `image::ImageBuffer<...>` reads better as `ImageBuffer<Rgb<u8>, Vec<u8>>`.
#[doc(hidden)]
pub fn short_type<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let mut out = String::with_capacity(full.len());
    // Drop the module paths inside the (possibly generic) type name.
    let mut word = String::new();
    for c in full.chars() {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            out.push_str(word.rsplit("::").next().unwrap_or(&word));
            word.clear();
            out.push(c);
        }
    }
    out.push_str(word.rsplit("::").next().unwrap_or(&word));
    out
}

/// MessagePack with field names (the default): fast, half the size of JSON, and
/// self-describing, so the CLI and other languages can read it without the Rust types.
/// Round-trips tagged and untagged enums, `flatten`, `skip_serializing_if` and added fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgPack;

impl<T: Serialize + DeserializeOwned + 'static> Serializer<T> for MsgPack {
    fn name(&self) -> Cow<'static, str> {
        "msgpack".into()
    }
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        // Byte vectors stay arrays of integers unless marked `serde_bytes`: writing every
        // `Vec<u8>` as binary (rmp's BytesMode::ForceIterables) breaks untagged enums.
        rmp_serde::encode::write_named(out, value).map_err(|e| SerializeError::encode("msgpack", e))
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        rmp_serde::from_slice(bytes).map_err(|e| SerializeError::decode("msgpack", e))
    }
}

/// JSON (floats round-trip exactly).
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: Serialize + DeserializeOwned + 'static> Serializer<T> for Json {
    fn name(&self) -> Cow<'static, str> {
        "json".into()
    }
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        serde_json::to_writer(out, value).map_err(|e| SerializeError::encode("json", e))
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        serde_json::from_slice(bytes).map_err(|e| SerializeError::decode("json", e))
    }
}

/// zstd compression around another serializer.
#[derive(Debug, Clone, Copy)]
pub struct Zstd<S> {
    /// The serializer whose output is compressed.
    pub inner: S,
    /// The compression level (1-22; 3 is zstd's default and a good trade-off).
    pub level: i32,
}

impl<S> Zstd<S> {
    /// `inner`'s output compressed at level 3.
    pub fn new(inner: S) -> Self {
        Zstd { inner, level: 3 }
    }
}

impl<T: 'static, S: Serializer<T>> Serializer<T> for Zstd<S> {
    fn name(&self) -> Cow<'static, str> {
        format!("zstd({})", self.inner.name()).into()
    }
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        let mut plain = Vec::new();
        self.inner.encode(value, &mut plain)?;
        let name = || format!("zstd({})", self.inner.name());
        let mut encoder = zstd::stream::Encoder::new(out, self.level).map_err(|e| SerializeError::encode(name(), e))?;
        std::io::Write::write_all(&mut encoder, &plain).map_err(|e| SerializeError::encode(name(), e))?;
        encoder.finish().map_err(|e| SerializeError::encode(name(), e))?;
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        let plain = zstd::stream::decode_all(bytes)
            .map_err(|e| SerializeError::decode(format!("zstd({})", self.inner.name()), e))?;
        self.inner.decode(&plain)
    }
}

#[cfg(feature = "images")]
mod images;
#[cfg(feature = "images")]
pub use images::{ImageValue, Jpeg, Png, PngCompression, PngFilter, Qoi, RawPixels};

/// Decodes a record's payload without the Rust type, for tools (`kiln result get`):
/// self-describing formats become JSON, images become PNG, anything else stays as it is.
pub fn render(serializer: &str, payload: &[u8]) -> Result<Rendered, String> {
    if let Some(inner) = zstd_inner(serializer) {
        let plain = zstd::stream::decode_all(payload).map_err(|e| format!("zstd: {e}"))?;
        return render(inner, &plain);
    }
    match serializer {
        "msgpack" => {
            let value: serde_json::Value = rmp_serde::from_slice(payload).map_err(|e| format!("msgpack: {e}"))?;
            Ok(Rendered::Json(value))
        }
        "json" => Ok(Rendered::Json(
            serde_json::from_slice(payload).map_err(|e| format!("json: {e}"))?,
        )),
        "png" => Ok(Rendered::Image {
            extension: "png",
            bytes: payload.to_vec(),
        }),
        "jpeg" => Ok(Rendered::Image {
            extension: "jpg",
            bytes: payload.to_vec(),
        }),
        #[cfg(feature = "images")]
        "qoi" | "raw-pixels" => images::to_png(serializer, payload).map(|bytes| Rendered::Image {
            extension: "png",
            bytes,
        }),
        _ => Ok(Rendered::Raw(payload.to_vec())),
    }
}

/// Whether `serializer` writes images (`png`, `jpeg`, `qoi`, `raw-pixels`, or one of them
/// compressed with `zstd(...)`).
pub fn writes_images(serializer: &str) -> bool {
    let inner = zstd_inner(serializer).unwrap_or(serializer);
    matches!(inner, "png" | "jpeg" | "qoi" | "raw-pixels")
}

/// Whether `serializer` writes self-describing values that [`render`] turns into JSON
/// (`msgpack`, `json`, or one of them compressed with `zstd(...)`).
pub fn writes_values(serializer: &str) -> bool {
    let inner = zstd_inner(serializer).unwrap_or(serializer);
    matches!(inner, "msgpack" | "json")
}

fn zstd_inner(serializer: &str) -> Option<&str> {
    serializer.strip_prefix("zstd(").and_then(|s| s.strip_suffix(')'))
}

/// An image payload as a PNG file's bytes: a PNG payload as it is (bit-exact), other image
/// formats decoded and encoded again. Anything else is an error naming the serializer.
#[cfg(feature = "images")]
pub fn image_as_png(serializer: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
    if let Some(inner) = zstd_inner(serializer) {
        let plain = zstd::stream::decode_all(payload).map_err(|e| format!("zstd: {e}"))?;
        return image_as_png(inner, &plain);
    }
    images::to_png(serializer, payload)
}

/// An image payload scaled down to fit in `max` x `max` pixels (aspect ratio kept), as PNG.
#[cfg(feature = "images")]
pub fn image_thumbnail(serializer: &str, payload: &[u8], max: u32) -> Result<Vec<u8>, String> {
    if let Some(inner) = zstd_inner(serializer) {
        let plain = zstd::stream::decode_all(payload).map_err(|e| format!("zstd: {e}"))?;
        return image_thumbnail(inner, &plain, max);
    }
    images::thumbnail(serializer, payload, max)
}

/// A payload decoded for people.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Rendered {
    /// A self-describing value.
    Json(serde_json::Value),
    /// An image file.
    Image {
        /// The file extension that fits the bytes.
        extension: &'static str,
        /// The file's bytes.
        bytes: Vec<u8>,
    },
    /// Bytes of a format only its own program reads.
    Raw(Vec<u8>),
}
