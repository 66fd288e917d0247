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
    /// Fast (the default): up to 40x faster to encode than `Default`, files ~1.6x larger on photos.
    #[default]
    Fast,
    /// The `png` crate's default level.
    Default,
    /// The smallest files, slowest.
    Best,
}

/// PNG, the format every tool opens. Lossless for 8- and 16-bit gray, gray+alpha, RGB, RGBA.
#[derive(Debug, Clone, Copy, Default)]
pub struct Png {
    /// The compression effort.
    pub compression: PngCompression,
}

impl Png {
    /// PNG at the default compression level: smaller files, much slower to write.
    pub fn compact() -> Self {
        Png {
            compression: PngCompression::Default,
        }
    }
}

impl<T: ImageValue> Serializer<T> for Png {
    fn name(&self) -> Cow<'static, str> {
        "png".into()
    }
    fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerializeError> {
        let (w, h, color, bytes) = value.raw();
        let (compression, filter) = match self.compression {
            PngCompression::Fast => (CompressionType::Fast, FilterType::Adaptive),
            PngCompression::Default => (CompressionType::Default, FilterType::Adaptive),
            PngCompression::Best => (CompressionType::Best, FilterType::Adaptive),
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

/// Re-encodes a QOI payload as PNG for viewers that do not read QOI.
pub(crate) fn qoi_to_png(payload: &[u8]) -> Result<Vec<u8>, String> {
    let image = image::load_from_memory_with_format(payload, ImageFormat::Qoi).map_err(|e| format!("qoi: {e}"))?;
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|e| format!("png: {e}"))?;
    Ok(out.into_inner())
}
