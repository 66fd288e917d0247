//! Kiln's canonical encoding of serde values, the input of every cache-key and call hash.
//!
//! The encoding is Kiln's own, so that no dependency's feature flag can change a key (a
//! JSON form depends on serde_json's `preserve_order`, and maps JSON's NaN, infinities and
//! `None` alike to `null`). It is **injective**: two values of one type that differ give
//! different bytes, because
//! - every value starts with a type tag, and every variable-length part is length-prefixed
//!   or ends with a tag no value starts with (the code is prefix-free);
//! - floats are written by their exact bits (`NaN`, `-0.0` and the infinities all differ);
//! - `None`, `Some(None)` and `()` have tags of their own; enum variants are written by name;
//! - struct fields are written with their names, so a skipped field cannot shift another.
//!
//! It is **deterministic** across processes and builds: maps are written with their
//! entries sorted by encoded key, and hash sets (`HashSet` of std, hashbrown and others,
//! recognised by type) with their elements sorted, so their iteration order, which differs
//! per process, never shows. Type names are left out, so renaming a struct keeps its keys.
//!
//! Changing this encoding changes every cache key: it is done on purpose only, with the
//! version in [`CONTEXT`] raised and the change described in `docs/CACHE_KEYS.md`. The
//! stability test below pins the bytes of a fixed set of values.

use std::fmt;

use serde::Serialize;
use serde::ser;

/// BLAKE3 key-derivation context of input hashes: raise the version with the encoding.
pub(crate) const CONTEXT: &str = "kiln 2026-11 input hash v2";

mod tag {
    pub(super) const NONE: u8 = 0x01;
    pub(super) const SOME: u8 = 0x02;
    pub(super) const UNIT: u8 = 0x03;
    pub(super) const FALSE: u8 = 0x04;
    pub(super) const TRUE: u8 = 0x05;
    /// An integer that fits in `i128`: zigzag LEB128.
    pub(super) const INT: u8 = 0x06;
    /// A `u128` above `i128::MAX`: 16 bytes little-endian.
    pub(super) const BIG_UINT: u8 = 0x07;
    pub(super) const F32: u8 = 0x08;
    pub(super) const F64: u8 = 0x09;
    pub(super) const CHAR: u8 = 0x0a;
    pub(super) const STR: u8 = 0x0b;
    pub(super) const BYTES: u8 = 0x0c;
    pub(super) const SEQ: u8 = 0x0d;
    pub(super) const SET: u8 = 0x0e;
    pub(super) const MAP: u8 = 0x0f;
    pub(super) const STRUCT: u8 = 0x10;
    pub(super) const VARIANT: u8 = 0x11;
    pub(super) const TUPLE: u8 = 0x12;
    pub(super) const END: u8 = 0x13;
    pub(super) const IMAGE: u8 = 0x14;
}

/// Where encoded bytes go: a buffer (map entries, set elements, tests) or a hasher.
pub(crate) trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Feeds BLAKE3 in 64 KiB pieces: a `Vec<u8>` input is millions of tiny writes.
struct HashSink {
    hasher: blake3::Hasher,
    buffer: Vec<u8>,
}

const HASH_BUFFER: usize = 64 * 1024;

impl Sink for HashSink {
    fn put(&mut self, bytes: &[u8]) {
        if self.buffer.len() + bytes.len() > HASH_BUFFER {
            self.hasher.update(&self.buffer);
            self.buffer.clear();
            if bytes.len() > HASH_BUFFER {
                self.hasher.update(bytes);
                return;
            }
        }
        self.buffer.extend_from_slice(bytes);
    }
}

/// The BLAKE3 hash of `value`'s canonical encoding, or why it cannot be encoded.
pub(crate) fn hash<T: Serialize + ?Sized>(value: &T) -> Result<[u8; 32], String> {
    let mut sink = HashSink {
        hasher: blake3::Hasher::new_derive_key(CONTEXT),
        buffer: Vec::with_capacity(256),
    };
    value.serialize(&mut Encoder { sink: &mut sink }).map_err(|e| e.0)?;
    sink.hasher.update(&sink.buffer);
    Ok(*sink.hasher.finalize().as_bytes())
}

/// The hash of an image input: its dimensions, color type and pixels.
pub(crate) fn hash_image(width: u32, height: u32, color: &str, pixels: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(CONTEXT);
    h.update(&[tag::IMAGE]);
    h.update(&width.to_le_bytes());
    h.update(&height.to_le_bytes());
    h.update(&(color.len() as u64).to_le_bytes());
    h.update(color.as_bytes());
    h.update(&(pixels.len() as u64).to_le_bytes());
    h.update(pixels);
    *h.finalize().as_bytes()
}

/// `value`'s canonical encoding (tests and documentation).
#[cfg(test)]
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    value.serialize(&mut Encoder { sink: &mut out }).map_err(|e| e.0)?;
    Ok(out)
}

fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    value.serialize(&mut Encoder { sink: &mut out })?;
    Ok(out)
}

/// Why a value has no canonical encoding (its `Serialize` failed).
#[derive(Debug)]
pub(crate) struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl ser::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error(format!("it does not serialize: {msg}"))
    }
}

struct Encoder<'s, S: Sink> {
    sink: &'s mut S,
}

impl<S: Sink> Encoder<'_, S> {
    fn tag(&mut self, tag: u8) {
        self.sink.put(&[tag]);
    }

    fn int(&mut self, v: i128) {
        // Zigzag, then LEB128: small magnitudes take one or two bytes.
        let mut z = ((v << 1) ^ (v >> 127)) as u128;
        let mut buf = [0u8; 20];
        let mut n = 0;
        buf[n] = tag::INT;
        n += 1;
        loop {
            let byte = (z & 0x7f) as u8;
            z >>= 7;
            if z == 0 {
                buf[n] = byte;
                n += 1;
                break;
            }
            buf[n] = byte | 0x80;
            n += 1;
        }
        self.sink.put(&buf[..n]);
    }

    fn len(&mut self, len: usize) {
        self.sink.put(&(len as u64).to_le_bytes());
    }

    fn str(&mut self, v: &str) {
        self.tag(tag::STR);
        self.len(v.len());
        self.sink.put(v.as_bytes());
    }
}

/// `HashSet`s (std, hashbrown, im...) iterate in an order that changes per process.
fn is_hash_set<I>() -> bool {
    let name = std::any::type_name::<I>();
    let name = name.trim_start_matches('&').trim_start_matches("mut ");
    let path = name.split('<').next().unwrap_or(name);
    path.rsplit("::").next() == Some("HashSet")
}

impl<'a, 's, S: Sink> ser::Serializer for &'a mut Encoder<'s, S> {
    type Ok = ();
    type Error = Error;
    type SerializeSeq = Seq<'a, 's, S>;
    type SerializeTuple = Seq<'a, 's, S>;
    type SerializeTupleStruct = Seq<'a, 's, S>;
    type SerializeTupleVariant = Seq<'a, 's, S>;
    type SerializeMap = Map<'a, 's, S>;
    type SerializeStruct = Seq<'a, 's, S>;
    type SerializeStructVariant = Seq<'a, 's, S>;

    fn serialize_bool(self, v: bool) -> Result<(), Error> {
        self.tag(if v { tag::TRUE } else { tag::FALSE });
        Ok(())
    }
    fn serialize_i8(self, v: i8) -> Result<(), Error> {
        self.serialize_i128(v.into())
    }
    fn serialize_i16(self, v: i16) -> Result<(), Error> {
        self.serialize_i128(v.into())
    }
    fn serialize_i32(self, v: i32) -> Result<(), Error> {
        self.serialize_i128(v.into())
    }
    fn serialize_i64(self, v: i64) -> Result<(), Error> {
        self.serialize_i128(v.into())
    }
    fn serialize_i128(self, v: i128) -> Result<(), Error> {
        self.int(v);
        Ok(())
    }
    fn serialize_u8(self, v: u8) -> Result<(), Error> {
        self.serialize_i128(v.into())
    }
    fn serialize_u16(self, v: u16) -> Result<(), Error> {
        self.serialize_i128(v.into())
    }
    fn serialize_u32(self, v: u32) -> Result<(), Error> {
        self.serialize_i128(v.into())
    }
    fn serialize_u64(self, v: u64) -> Result<(), Error> {
        self.serialize_i128(v.into())
    }
    fn serialize_u128(self, v: u128) -> Result<(), Error> {
        match i128::try_from(v) {
            Ok(v) => self.int(v),
            Err(_) => {
                self.tag(tag::BIG_UINT);
                self.sink.put(&v.to_le_bytes());
            }
        }
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result<(), Error> {
        self.tag(tag::F32);
        self.sink.put(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result<(), Error> {
        self.tag(tag::F64);
        self.sink.put(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), Error> {
        self.tag(tag::CHAR);
        self.sink.put(&u32::from(v).to_le_bytes());
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), Error> {
        self.str(v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), Error> {
        self.tag(tag::BYTES);
        self.len(v.len());
        self.sink.put(v);
        Ok(())
    }
    fn serialize_none(self) -> Result<(), Error> {
        self.tag(tag::NONE);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Error> {
        self.tag(tag::SOME);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Error> {
        self.tag(tag::UNIT);
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Error> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<(), Error> {
        self.tag(tag::VARIANT);
        self.str(variant);
        self.serialize_unit()
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<(), Error> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Error> {
        self.tag(tag::VARIANT);
        self.str(variant);
        value.serialize(self)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, Error> {
        self.tag(tag::SEQ);
        Ok(Seq { enc: self })
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, Error> {
        self.tag(tag::TUPLE);
        Ok(Seq { enc: self })
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeTupleStruct, Error> {
        self.tag(tag::TUPLE);
        Ok(Seq { enc: self })
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, Error> {
        self.tag(tag::VARIANT);
        self.str(variant);
        self.tag(tag::TUPLE);
        Ok(Seq { enc: self })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, Error> {
        Ok(Map {
            enc: self,
            entries: Vec::new(),
            key: None,
        })
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeStruct, Error> {
        self.tag(tag::STRUCT);
        Ok(Seq { enc: self })
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, Error> {
        self.tag(tag::VARIANT);
        self.str(variant);
        self.tag(tag::STRUCT);
        Ok(Seq { enc: self })
    }

    fn collect_seq<I>(self, iter: I) -> Result<(), Error>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        if !is_hash_set::<I>() {
            let mut seq = self.serialize_seq(None)?;
            for item in iter {
                ser::SerializeSeq::serialize_element(&mut seq, &item)?;
            }
            return ser::SerializeSeq::end(seq);
        }
        let mut items = iter.into_iter().map(|i| to_vec(&i)).collect::<Result<Vec<_>, _>>()?;
        items.sort_unstable();
        self.tag(tag::SET);
        self.len(items.len());
        for item in &items {
            self.sink.put(item);
        }
        Ok(())
    }

    fn is_human_readable(&self) -> bool {
        // The compact forms (e.g. a UUID's 16 bytes) are as injective and cheaper.
        false
    }
}

/// Sequences, tuples and structs: their parts in order, then `END`.
#[doc(hidden)]
pub(crate) struct Seq<'a, 's, S: Sink> {
    enc: &'a mut Encoder<'s, S>,
}

impl<S: Sink> Seq<'_, '_, S> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        value.serialize(&mut *self.enc)
    }
    fn field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
        self.enc.str(key);
        value.serialize(&mut *self.enc)
    }
    fn finish(self) -> Result<(), Error> {
        self.enc.tag(tag::END);
        Ok(())
    }
}

// The six serde traits of ordered compounds differ only in names: one body each.
macro_rules! ordered {
    ($($trait:ident :: $method:ident;)*) => {$(
        impl<S: Sink> ser::$trait for Seq<'_, '_, S> {
            type Ok = ();
            type Error = Error;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
                self.element(value)
            }
            fn end(self) -> Result<(), Error> {
                self.finish()
            }
        }
    )*};
    (fields: $($trait:ident;)*) => {$(
        impl<S: Sink> ser::$trait for Seq<'_, '_, S> {
            type Ok = ();
            type Error = Error;
            fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), Error> {
                self.field(key, value)
            }
            fn end(self) -> Result<(), Error> {
                self.finish()
            }
        }
    )*};
}

ordered! {
    SerializeSeq::serialize_element;
    SerializeTuple::serialize_element;
    SerializeTupleStruct::serialize_field;
    SerializeTupleVariant::serialize_field;
}
ordered! { fields: SerializeStruct; SerializeStructVariant; }

/// Maps: entries encoded apart, sorted by key bytes, written with their count.
#[doc(hidden)]
pub(crate) struct Map<'a, 's, S: Sink> {
    enc: &'a mut Encoder<'s, S>,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    key: Option<Vec<u8>>,
}

impl<S: Sink> ser::SerializeMap for Map<'_, '_, S> {
    type Ok = ();
    type Error = Error;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Error> {
        self.key = Some(to_vec(key)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let key = self
            .key
            .take()
            .ok_or_else(|| Error("a map value came without its key".into()))?;
        self.entries.push((key, to_vec(value)?));
        Ok(())
    }
    fn serialize_entry<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &mut self,
        key: &K,
        value: &V,
    ) -> Result<(), Error> {
        self.entries.push((to_vec(key)?, to_vec(value)?));
        Ok(())
    }
    fn end(mut self) -> Result<(), Error> {
        self.entries.sort_unstable();
        self.enc.tag(tag::MAP);
        self.enc.len(self.entries.len());
        for (k, v) in &self.entries {
            self.enc.sink.put(k);
            self.enc.sink.put(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

    use serde::Serialize;

    use super::*;

    fn hex(v: &impl Serialize) -> String {
        blake3::Hash::from(hash(v).unwrap()).to_hex().to_string()
    }

    #[test]
    fn floats_options_and_units_never_share_an_encoding() {
        let floats = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            0.0,
            -0.0,
            1.0,
            f64::MIN_POSITIVE,
        ];
        let hashes: HashSet<String> = floats.iter().map(hex).collect();
        assert_eq!(hashes.len(), floats.len());
        let nested: [Option<Option<()>>; 3] = [None, Some(None), Some(Some(()))];
        let hashes: HashSet<String> = nested.iter().map(hex).collect();
        assert_eq!(hashes.len(), 3);
        assert_ne!(hex(&()), hex(&Option::<()>::None));
        assert_ne!(hex(&"1"), hex(&1));
        assert_ne!(hex(&vec!["ab", "c"]), hex(&vec!["a", "bc"]));
        assert_ne!(hex(&(vec![1], vec![2, 3])), hex(&(vec![1, 2], vec![3])));
    }

    #[test]
    fn skipped_fields_and_variants_stay_apart() {
        #[derive(Serialize)]
        struct Sparse {
            #[serde(skip_serializing_if = "Option::is_none")]
            a: Option<u8>,
            #[serde(skip_serializing_if = "Option::is_none")]
            b: Option<u8>,
        }
        assert_ne!(
            hex(&Sparse { a: Some(1), b: None }),
            hex(&Sparse { a: None, b: Some(1) })
        );
        #[derive(Serialize)]
        enum E {
            A(u8),
            B(u8),
            C,
            D,
        }
        assert_ne!(hex(&E::A(1)), hex(&E::B(1)));
        assert_ne!(hex(&E::C), hex(&E::D));
    }

    #[test]
    fn maps_and_hash_sets_are_ordered_by_content() {
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for i in 0..100 {
            a.insert(format!("k{i}"), i);
        }
        for i in (0..100).rev() {
            b.insert(format!("k{i}"), i);
        }
        let sorted: BTreeMap<_, _> = a.clone().into_iter().collect();
        assert_eq!(hex(&a), hex(&b));
        assert_eq!(hex(&a), hex(&sorted));

        // Two sets with the same elements, built with different hashers (different orders).
        let x: HashSet<u32> = (0..200).collect();
        let mut y: HashSet<u32> = HashSet::with_capacity(1000);
        y.extend((0..200).rev());
        assert_eq!(hex(&x), hex(&y));
        assert_ne!(hex(&x), hex(&(0..199).collect::<HashSet<u32>>()));
        // A Vec keeps its order; a Vec of sets is still a Vec.
        assert_ne!(hex(&vec![1, 2]), hex(&vec![2, 1]));
        assert!(!is_hash_set::<&Vec<HashSet<u8>>>());
        assert!(is_hash_set::<&HashSet<Vec<u8>>>());
        assert!(!is_hash_set::<&BTreeSet<u8>>());
    }

    #[test]
    fn json_objects_hash_by_content_whatever_their_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b": 1, "a": [1.5, null]}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{"a": [1.5, null], "b": 1}"#).unwrap();
        assert_eq!(hex(&a), hex(&b));
    }

    /// Pins the encoding: if this fails, every cache key changed. Do that on purpose only:
    /// raise the version in `CONTEXT` and describe the change in docs/CACHE_KEYS.md.
    #[test]
    fn the_encoding_is_stable() {
        #[derive(Serialize)]
        struct Job {
            name: String,
            size: (u32, u32),
            scale: f64,
            tags: BTreeSet<&'static str>,
            extra: Option<BTreeMap<String, i64>>,
        }
        let job = Job {
            name: "cat".into(),
            size: (512, 512),
            scale: 0.5,
            tags: ["a", "b"].into_iter().collect(),
            extra: Some([("k".to_string(), -3)].into_iter().collect()),
        };
        assert_eq!(
            encode(&job).unwrap(),
            [
                0x10, // struct
                0x0b, 4, 0, 0, 0, 0, 0, 0, 0, b'n', b'a', b'm', b'e', // "name"
                0x0b, 3, 0, 0, 0, 0, 0, 0, 0, b'c', b'a', b't', // "cat"
                0x0b, 4, 0, 0, 0, 0, 0, 0, 0, b's', b'i', b'z', b'e', // "size"
                0x12, 0x06, 0x80, 0x08, 0x06, 0x80, 0x08, 0x13, // (512, 512)
                0x0b, 5, 0, 0, 0, 0, 0, 0, 0, b's', b'c', b'a', b'l', b'e', // "scale"
                0x09, 0, 0, 0, 0, 0, 0, 0xe0, 0x3f, // 0.5
                0x0b, 4, 0, 0, 0, 0, 0, 0, 0, b't', b'a', b'g', b's', // "tags"
                0x0d, 0x0b, 1, 0, 0, 0, 0, 0, 0, 0, b'a', 0x0b, 1, 0, 0, 0, 0, 0, 0, 0, b'b', 0x13, 0x0b, 5, 0, 0, 0,
                0, 0, 0, 0, b'e', b'x', b't', b'r', b'a', // "extra"
                0x02, 0x0f, 1, 0, 0, 0, 0, 0, 0, 0, // Some(map of 1)
                0x0b, 1, 0, 0, 0, 0, 0, 0, 0, b'k', 0x06, 0x05, // "k": -3
                0x13, // end of struct
            ]
        );
        let pinned = [
            (hex(&job), "JOB"),
            (hex(&f64::NAN), "NAN"),
            (hex(&Option::<Option<u8>>::Some(None)), "SOME_NONE"),
            (hex(&(0u8..5).collect::<HashSet<u8>>()), "SET"),
        ];
        let changed: Vec<String> = pinned
            .iter()
            .filter(|(got, name)| got != pinned_hash(name))
            .map(|(got, name)| format!("{name} is now {got}"))
            .collect();
        assert!(changed.is_empty(), "pinned hashes changed: {changed:?}");
    }

    fn pinned_hash(name: &str) -> &'static str {
        match name {
            "JOB" => "72a7748fd4e8b5630cf2e52a006a201daa45fc03b1cecd7e792f68bf3bd53879",
            "NAN" => "8380df92f0e890060c2272996568b5669062b20f80fd3727898a53de671e77e2",
            "SOME_NONE" => "eb49a00d8f81b992a347321f7cef30d036c7061b6dc2fc8dde7834a1e448d03b",
            "SET" => "a5ec75b74a17007209f853abe2357a338ef2f1a680a02617da575dc85c373d13",
            _ => unreachable!(),
        }
    }
}
