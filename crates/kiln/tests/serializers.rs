//! The serializer conformance suite: every serializer round-trips what it accepts (property
//! tests) and turns damaged bytes into an error, never a panic or a wrong value.

use std::collections::BTreeMap;

use image::{DynamicImage, GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use kiln::serializer::{Jpeg, Json, MsgPack, Png, PngCompression, PngFilter, Qoi, RawPixels, Serializer, Zstd};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

/// A struct-heavy value with the serde features users rely on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    id: u64,
    name: String,
    score: f64,
    tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    note: Option<String>,
    kind: Kind,
    shape: Shape,
    attributes: BTreeMap<String, i64>,
    #[serde(flatten)]
    extra: Extra,
    raw: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
enum Kind {
    Plain,
    Weighted { weight: f32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Shape {
    Point(i32, i32),
    Label(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Extra {
    origin: String,
}

fn records() -> impl Strategy<Value = Record> {
    (
        any::<u64>(),
        ".{0,20}",
        any::<f64>().prop_filter("finite", |f| f.is_finite()),
        prop::collection::vec("[a-z]{0,8}", 0..5),
        prop::option::of(".{0,10}"),
        prop_oneof![
            Just(Kind::Plain),
            any::<f32>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|weight| Kind::Weighted { weight })
        ],
        prop_oneof![
            (any::<i32>(), any::<i32>()).prop_map(|(x, y)| Shape::Point(x, y)),
            "[a-z]{1,8}".prop_map(Shape::Label)
        ],
        prop::collection::btree_map("[a-z]{1,6}", any::<i64>(), 0..5),
        "[a-z]{0,6}",
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(
            |(id, name, score, tags, note, kind, shape, attributes, origin, raw)| Record {
                id,
                name,
                score,
                tags,
                note,
                kind,
                shape,
                attributes,
                extra: Extra { origin },
                raw,
            },
        )
}

fn rgb_images() -> impl Strategy<Value = RgbImage> {
    (1u32..24, 1u32..24).prop_flat_map(|(w, h)| {
        prop::collection::vec(any::<u8>(), (w * h * 3) as usize)
            .prop_map(move |px| RgbImage::from_raw(w, h, px).expect("sized to fit"))
    })
}

fn rgba_images() -> impl Strategy<Value = RgbaImage> {
    (1u32..16, 1u32..16).prop_flat_map(|(w, h)| {
        prop::collection::vec(any::<u8>(), (w * h * 4) as usize)
            .prop_map(move |px| RgbaImage::from_raw(w, h, px).expect("sized to fit"))
    })
}

fn round_trip<T, S: Serializer<T>>(s: &S, value: &T) -> T {
    let mut bytes = Vec::new();
    s.encode(value, &mut bytes)
        .unwrap_or_else(|e| panic!("{} cannot encode: {e}", s.name()));
    s.decode(&bytes)
        .unwrap_or_else(|e| panic!("{} cannot decode what it wrote: {e}", s.name()))
}

/// Damaged input: an error or (for formats without checks) some value, never a panic.
fn never_panics<T, S: Serializer<T>>(s: &S, bytes: &[u8]) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.decode(bytes)))
        .unwrap_or_else(|_| panic!("{} panicked on damaged input", s.name()));
}

macro_rules! exact_suite {
    ($name:ident, $strategy:expr, $ty:ty, $($serializer:expr),+ $(,)?) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn $name(value in $strategy, garbage in prop::collection::vec(any::<u8>(), 0..256)) {
                $(
                    let s = $serializer;
                    prop_assert_eq!(&round_trip::<$ty, _>(&s, &value), &value, "serializer {}", Serializer::<$ty>::name(&s));
                    never_panics::<$ty, _>(&s, &garbage);
                    // Every prefix of a valid encoding is an error or a value, never a panic.
                    let mut bytes = Vec::new();
                    Serializer::<$ty>::encode(&s, &value, &mut bytes).unwrap();
                    never_panics::<$ty, _>(&s, &bytes[..bytes.len() / 2]);
                )+
            }
        }
    };
}

exact_suite!(
    serde_values_round_trip,
    records(),
    Record,
    MsgPack,
    Json,
    Zstd::new(MsgPack),
    Zstd::new(Json)
);
exact_suite!(
    rgb_images_round_trip,
    rgb_images(),
    RgbImage,
    Png::default(),
    Png::compact(),
    Qoi,
    Zstd::new(Png::default())
);
exact_suite!(
    rgba_images_round_trip,
    rgba_images(),
    RgbaImage,
    Png::default(),
    Png::default().compression(PngCompression::Best),
    Png::default().filter(PngFilter::Paeth),
    Png::default().filter(PngFilter::None),
    Png::compact().filter(PngFilter::Sub),
    Png::default().filter(PngFilter::Avg),
    Qoi
);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn jpeg_keeps_dimensions_and_stays_close(img in rgb_images()) {
        let back = round_trip(&Jpeg { quality: 95 }, &img);
        prop_assert_eq!(back.dimensions(), img.dimensions());
    }
}

#[test]
fn sixteen_bit_and_gray_images_round_trip_as_png() {
    let gray: GrayImage = ImageBuffer::from_fn(7, 5, |x, y| Luma([(x * 30 + y) as u8]));
    assert_eq!(round_trip(&Png::default(), &gray), gray);
    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_fn(6, 4, |x, y| Rgb([x as u16 * 9000, y as u16 * 7000, 65535]));
    assert_eq!(round_trip(&Png::default(), &deep), deep);
    assert_eq!(round_trip(&RawPixels, &deep), deep);
    let float: ImageBuffer<Rgb<f32>, Vec<f32>> =
        ImageBuffer::from_fn(3, 2, |x, y| Rgb([x as f32 / 3.0, y as f32, -1.5]));
    assert_eq!(round_trip(&RawPixels, &float), float);
    let dynamic = DynamicImage::ImageRgba8(ImageBuffer::from_fn(3, 3, |x, _| Rgba([x as u8, 0, 0, 128])));
    assert_eq!(round_trip(&Png::default(), &dynamic), dynamic);
}

#[test]
fn decoding_into_another_color_type_is_an_error_not_a_conversion() {
    let rgba: RgbaImage = ImageBuffer::from_pixel(2, 2, Rgba([1, 2, 3, 4]));
    let mut bytes = Vec::new();
    Png::default().encode(&rgba, &mut bytes).unwrap();
    let err = Serializer::<RgbImage>::decode(&Png::default(), &bytes)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("serializer 'png' cannot decode") && err.contains("Rgba8"),
        "{err}"
    );
}

#[test]
fn qoi_refuses_what_it_cannot_hold_exactly() {
    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_pixel(2, 2, Rgb([1, 2, 3]));
    let err = Qoi.encode(&deep, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("QOI holds 8-bit RGB or RGBA only"), "{err}");
}

#[test]
fn names_are_stable() {
    assert_eq!(Serializer::<Record>::name(&MsgPack), "msgpack");
    assert_eq!(Serializer::<Record>::name(&Zstd::new(Json)), "zstd(json)");
    assert_eq!(Serializer::<RgbImage>::name(&Png::default()), "png");
    assert_eq!(Serializer::<RgbImage>::name(&Qoi), "qoi");
    assert_eq!(Serializer::<RgbImage>::name(&Jpeg::default()), "jpeg");
    assert_eq!(Serializer::<RgbImage>::name(&RawPixels), "raw-pixels");
}

#[test]
fn msgpack_is_readable_without_the_rust_types() {
    let value = serde_json::json!({ "id": 3, "name": "x", "nested": { "ok": true } });
    let mut bytes = Vec::new();
    MsgPack.encode(&value, &mut bytes).unwrap();
    match kiln::serializer::render("msgpack", &bytes).unwrap() {
        kiln::serializer::Rendered::Json(v) => assert_eq!(v, value),
        other => panic!("{other:?}"),
    }
}

#[test]
fn msgpack_byte_vectors_marked_serde_bytes_are_binary() {
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Frame {
        width: u32,
        pixels: Vec<u8>,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct CompactFrame {
        width: u32,
        #[serde(with = "serde_bytes")]
        pixels: Vec<u8>,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(untagged)]
    enum Payload {
        Bytes(Vec<u8>),
        Text(String),
    }
    let encode = |value: &dyn Fn(&mut Vec<u8>)| {
        let mut out = Vec::new();
        value(&mut out);
        out
    };
    // A 512x512 RGB frame: by default each byte is an integer (1 or 2 bytes each).
    let pixels: Vec<u8> = (0..512 * 512 * 3).map(|i| (i % 251) as u8).collect();
    let plain = Frame {
        width: 512,
        pixels: pixels.clone(),
    };
    let compact = CompactFrame { width: 512, pixels };
    let plain_bytes = encode(&|out| MsgPack.encode(&plain, out).unwrap());
    let compact_bytes = encode(&|out| MsgPack.encode(&compact, out).unwrap());
    assert!(plain_bytes.len() > 1_100_000, "{}", plain_bytes.len());
    assert!(compact_bytes.len() < 786_432 + 64, "{}", compact_bytes.len());
    assert_eq!(
        <MsgPack as Serializer<CompactFrame>>::decode(&MsgPack, &compact_bytes).unwrap(),
        compact
    );
    // The default keeps untagged enums holding byte vectors working.
    let payload = Payload::Bytes(vec![1, 200, 3]);
    let bytes = encode(&|out| MsgPack.encode(&payload, out).unwrap());
    assert_eq!(
        <MsgPack as Serializer<Payload>>::decode(&MsgPack, &bytes).unwrap(),
        payload
    );
}
