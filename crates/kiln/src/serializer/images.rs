//! Image serializers for the `image` crate's buffers (feature `images`).

use std::borrow::Cow;
use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::qoi::QoiEncoder;
use image::{DynamicImage, ExtendedColorType, ImageBuffer, ImageEncoder, ImageFormat, Pixel};

use super::{SerializeError, Serializer};

/// An image value a serializer can store: pixels, dimensions and color type, and back.
///
/// Implemented for `ImageBuffer`s of the `image` crate's pixel types (`RgbImage`,
/// `RgbaImage`, `GrayImage`, 16-bit and float buffers) and for `DynamicImage`. Decoding into
/// a buffer type whose color type differs from the stored one is an error, never a silent
/// conversion.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an image that Png, Qoi, Jpeg or RawPixels can store",
    label = "an image serializer for a value that is not an `image` buffer",
    note = "use MsgPack or Json for serde values, or implement `kiln::serializer::Serializer` for your type"
)]
pub trait ImageValue: Sized + Send + 'static {
    /// The width, height, color type and raw bytes of the pixels.
    fn raw(&self) -> (u32, u32, ExtendedColorType, &[u8]);
    /// The value from a decoded image; `None` when its color type does not fit.
    fn from_dynamic(image: DynamicImage) -> Option<Self>;
}

macro_rules! buffer_value {
    ($($pixel:ty => $variant:ident, $color:ident;)*) => {$(
        impl ImageValue for ImageBuffer<$pixel, Vec<<$pixel as Pixel>::Subpixel>> {
            fn raw(&self) -> (u32, u32, ExtendedColorType, &[u8]) {
                (self.width(), self.height(), ExtendedColorType::$color, image::EncodableLayout::as_bytes(self.as_raw().as_slice()))
            }
            fn from_dynamic(image: DynamicImage) -> Option<Self> {
                match image {
                    DynamicImage::$variant(buffer) => Some(buffer),
                    _ => None,
                }
            }
        }
    )*};
}

buffer_value! {
    image::Rgb<u8> => ImageRgb8, Rgb8;
    image::Rgba<u8> => ImageRgba8, Rgba8;
    image::Luma<u8> => ImageLuma8, L8;
    image::LumaA<u8> => ImageLumaA8, La8;
    image::Rgb<u16> => ImageRgb16, Rgb16;
    image::Rgba<u16> => ImageRgba16, Rgba16;
    image::Luma<u16> => ImageLuma16, L16;
    image::LumaA<u16> => ImageLumaA16, La16;
    image::Rgb<f32> => ImageRgb32F, Rgb32F;
    image::Rgba<f32> => ImageRgba32F, Rgba32F;
}

impl ImageValue for DynamicImage {
    fn raw(&self) -> (u32, u32, ExtendedColorType, &[u8]) {
        (self.width(), self.height(), self.color().into(), self.as_bytes())
    }
    fn from_dynamic(image: DynamicImage) -> Option<Self> {
        Some(image)
    }
}

fn decode_as<T: ImageValue>(name: &'static str, bytes: &[u8], format: ImageFormat) -> Result<T, SerializeError> {
    let image = image::load_from_memory_with_format(bytes, format).map_err(|e| SerializeError::decode(name, e))?;
    let color = image.color();
    T::from_dynamic(image).ok_or_else(|| {
        SerializeError::decode(
            name,
            format!("the record holds a {color:?} image; read it as that type or as a DynamicImage"),
        )
    })
}

/// How hard [`Png`] compresses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PngCompression {
    /// Fast (the default): a deflate specialised for filtered image rows (`fdeflate`), about
    /// 15x faster to encode than `Default`; files ~1.15x larger on photos.
    #[default]
    Fast,
    /// The `png` crate's balanced level (zlib level 6 through `flate2`).
    Default,
    /// The smallest files, slowest.
    Best,
}

/// How [`Png`] prepares rows before compressing them (PNG's filter types). The filter only
/// changes the file's size and the time to write it: every decoder reads every filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PngFilter {
    /// Rows as they are: fastest to filter, compresses worst.
    None,
    /// Each byte minus the one to its left.
    Sub,
    /// Each byte minus the one above it: the fastest to write here, on photos and on flat
    /// images alike (the default).
    #[default]
    Up,
    /// Each byte minus the mean of its left and upper neighbours.
    Avg,
    /// Each byte minus the Paeth predictor of its neighbours: the smallest fast files on
    /// flat images (screenshots, renders), ~15% slower than `Up` on photos.
    Paeth,
    /// The best of the others, chosen for each row: what `Png::compact()` uses.
    Adaptive,
}

/// PNG, the format every tool opens. Lossless for 8- and 16-bit gray, gray+alpha, RGB, RGBA.
///
/// `Png::default()` is built for time: the fast deflate level and the `Up` filter (a
/// 512x512 photo in about 2 ms on one core here, see docs/PERFORMANCE.md). [`Png::compact`]
/// is built for size: the balanced level with a filter chosen per row (files ~30% smaller
/// on photos, 15-50x slower to write). Both are read by the same decoder.
///
/// ```
/// use kiln::serializer::{Png, PngCompression, PngFilter};
///
/// let fast = Png::default();
/// let small = Png::compact();
/// let screenshots = Png::default().filter(PngFilter::Paeth);
/// assert_eq!((fast.compression, small.compression), (PngCompression::Fast, PngCompression::Default));
/// assert_eq!(screenshots.filter, PngFilter::Paeth);
/// ```
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct Png {
    /// The compression effort.
    pub compression: PngCompression,
    /// The filter applied to rows before compressing them.
    pub filter: PngFilter,
}

impl Png {
    /// PNG for size: the balanced level and a filter chosen for each row. Much slower to
    /// write than the default; for records kept long or sent far.
    pub fn compact() -> Self {
        Png {
            compression: PngCompression::Default,
            filter: PngFilter::Adaptive,
        }
    }

    /// This setting at compression effort `compression`.
    pub fn compression(self, compression: PngCompression) -> Self {
        Png { compression, ..self }
    }

    /// This setting with row filter `filter`.
    pub fn filter(self, filter: PngFilter) -> Self {
        Png { filter, ..self }
    }
}

impl<T: ImageValue> Serializer<T> for Png {
    fn name(&self) -> Cow<'static, str> {
        "png".into()
    }
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        let (w, h, color, bytes) = value.raw();
        let compression = match self.compression {
            PngCompression::Fast => CompressionType::Fast,
            PngCompression::Default => CompressionType::Default,
            PngCompression::Best => CompressionType::Best,
        };
        let filter = match self.filter {
            PngFilter::None => FilterType::NoFilter,
            PngFilter::Sub => FilterType::Sub,
            PngFilter::Up => FilterType::Up,
            PngFilter::Avg => FilterType::Avg,
            PngFilter::Paeth => FilterType::Paeth,
            PngFilter::Adaptive => FilterType::Adaptive,
        };
        PngEncoder::new_with_quality(&mut *out, compression, filter)
            .write_image(bytes, w, h, color)
            .map_err(|e| SerializeError::encode("png", e))
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        decode_as("png", bytes, ImageFormat::Png)
    }
}

/// QOI: the fastest exact round trip for 8-bit RGB and RGBA images (see docs/PERFORMANCE.md).
#[derive(Debug, Clone, Copy, Default)]
pub struct Qoi;

impl<T: ImageValue> Serializer<T> for Qoi {
    fn name(&self) -> Cow<'static, str> {
        "qoi".into()
    }
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        let (w, h, color, bytes) = value.raw();
        if !matches!(color, ExtendedColorType::Rgb8 | ExtendedColorType::Rgba8) {
            return Err(SerializeError::encode(
                "qoi",
                format!("QOI holds 8-bit RGB or RGBA only, not {color:?}; use Png or Zstd(MsgPack)"),
            ));
        }
        QoiEncoder::new(&mut *out)
            .write_image(bytes, w, h, color)
            .map_err(|e| SerializeError::encode("qoi", e))
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        decode_as("qoi", bytes, ImageFormat::Qoi)
    }
}

/// JPEG: lossy, small. Only when you accept changed pixels; 8-bit RGB and gray.
#[derive(Debug, Clone, Copy)]
pub struct Jpeg {
    /// Quality from 1 to 100.
    pub quality: u8,
}

impl Default for Jpeg {
    fn default() -> Self {
        Jpeg { quality: 90 }
    }
}

impl<T: ImageValue> Serializer<T> for Jpeg {
    fn name(&self) -> Cow<'static, str> {
        "jpeg".into()
    }
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        let (w, h, color, bytes) = value.raw();
        JpegEncoder::new_with_quality(&mut *out, self.quality.clamp(1, 100))
            .write_image(bytes, w, h, color)
            .map_err(|e| SerializeError::encode("jpeg", e))
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        decode_as("jpeg", bytes, ImageFormat::Jpeg)
    }
}

/// Raw pixels behind a 14-byte header (magic, width, height, color type): no compression,
/// so it encodes and decodes at memory speed; exact for every color type, 16-bit and float
/// included. Wrap it in [`Zstd`](super::Zstd) for flat images (screenshots, renders).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawPixels;

const RAW_MAGIC: &[u8; 4] = b"KRAW";

fn color_code(c: ExtendedColorType) -> Option<u8> {
    Some(match c {
        ExtendedColorType::L8 => 1,
        ExtendedColorType::La8 => 2,
        ExtendedColorType::Rgb8 => 3,
        ExtendedColorType::Rgba8 => 4,
        ExtendedColorType::L16 => 5,
        ExtendedColorType::La16 => 6,
        ExtendedColorType::Rgb16 => 7,
        ExtendedColorType::Rgba16 => 8,
        ExtendedColorType::Rgb32F => 9,
        ExtendedColorType::Rgba32F => 10,
        _ => return None,
    })
}

impl<T: ImageValue> Serializer<T> for RawPixels {
    fn name(&self) -> Cow<'static, str> {
        "raw-pixels".into()
    }
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        let (w, h, color, bytes) = value.raw();
        let code = color_code(color)
            .ok_or_else(|| SerializeError::encode("raw-pixels", format!("unsupported color type {color:?}")))?;
        out.reserve(14 + bytes.len());
        out.extend_from_slice(RAW_MAGIC);
        out.extend_from_slice(&w.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
        out.extend_from_slice(&[code, 0]);
        out.extend_from_slice(bytes);
        Ok(())
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, SerializeError> {
        let fail = |why: String| SerializeError::decode("raw-pixels", why);
        if bytes.len() < 14 || &bytes[..4] != RAW_MAGIC {
            return Err(fail("not raw-pixels data".into()));
        }
        let w = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        let h = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let px = &bytes[14..];
        let (w_us, h_us) = (w as usize, h as usize);
        let expect = |channels: usize, size: usize| w_us.checked_mul(h_us).and_then(|n| n.checked_mul(channels * size));
        let sized = |channels, size| match expect(channels, size) {
            Some(n) if n == px.len() => Ok(()),
            _ => Err(fail(format!("{}x{} pixels do not match {} bytes", w, h, px.len()))),
        };
        let u16s = |px: &[u8]| {
            px.chunks_exact(2)
                .map(|c| u16::from_ne_bytes([c[0], c[1]]))
                .collect::<Vec<_>>()
        };
        let f32s = |px: &[u8]| {
            px.chunks_exact(4)
                .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<_>>()
        };
        let image = match bytes[12] {
            1 => sized(1, 1).map(|()| ImageBuffer::from_raw(w, h, px.to_vec()).map(DynamicImage::ImageLuma8)),
            2 => sized(2, 1).map(|()| ImageBuffer::from_raw(w, h, px.to_vec()).map(DynamicImage::ImageLumaA8)),
            3 => sized(3, 1).map(|()| ImageBuffer::from_raw(w, h, px.to_vec()).map(DynamicImage::ImageRgb8)),
            4 => sized(4, 1).map(|()| ImageBuffer::from_raw(w, h, px.to_vec()).map(DynamicImage::ImageRgba8)),
            5 => sized(1, 2).map(|()| ImageBuffer::from_raw(w, h, u16s(px)).map(DynamicImage::ImageLuma16)),
            6 => sized(2, 2).map(|()| ImageBuffer::from_raw(w, h, u16s(px)).map(DynamicImage::ImageLumaA16)),
            7 => sized(3, 2).map(|()| ImageBuffer::from_raw(w, h, u16s(px)).map(DynamicImage::ImageRgb16)),
            8 => sized(4, 2).map(|()| ImageBuffer::from_raw(w, h, u16s(px)).map(DynamicImage::ImageRgba16)),
            9 => sized(3, 4).map(|()| ImageBuffer::from_raw(w, h, f32s(px)).map(DynamicImage::ImageRgb32F)),
            10 => sized(4, 4).map(|()| ImageBuffer::from_raw(w, h, f32s(px)).map(DynamicImage::ImageRgba32F)),
            c => return Err(fail(format!("unknown color code {c}"))),
        }?
        .ok_or_else(|| fail("inconsistent dimensions".into()))?;
        let color = image.color();
        T::from_dynamic(image).ok_or_else(|| {
            fail(format!(
                "the record holds a {color:?} image; read it as that type or as a DynamicImage"
            ))
        })
    }
}

/// Re-encodes a QOI or raw-pixels payload as PNG for viewers.
/// Decodes an image payload written by `serializer` (`png`, `jpeg`, `qoi`, `raw-pixels`).
fn decode_image(serializer: &str, payload: &[u8]) -> Result<DynamicImage, String> {
    let format = match serializer {
        "png" => ImageFormat::Png,
        "jpeg" => ImageFormat::Jpeg,
        "qoi" => ImageFormat::Qoi,
        "raw-pixels" => return RawPixels.decode(payload).map_err(|e| e.to_string()),
        other => return Err(format!("serializer '{other}' does not write images")),
    };
    image::load_from_memory_with_format(payload, format).map_err(|e| format!("{serializer}: {e}"))
}

fn encode_png(image: &DynamicImage) -> Result<Vec<u8>, String> {
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|e| format!("png: {e}"))?;
    Ok(out.into_inner())
}

/// An image payload as PNG bytes (a PNG payload is returned as it is).
pub(crate) fn to_png(serializer: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
    if serializer == "png" {
        return Ok(payload.to_vec());
    }
    encode_png(&decode_image(serializer, payload)?)
}

/// An image payload scaled to fit in `max` x `max` pixels (aspect kept, never enlarged), as PNG.
pub(crate) fn thumbnail(serializer: &str, payload: &[u8], max: u32) -> Result<Vec<u8>, String> {
    let image = decode_image(serializer, payload)?;
    if image.width() <= max && image.height() <= max {
        return encode_png(&image);
    }
    encode_png(&image.thumbnail(max, max))
}
