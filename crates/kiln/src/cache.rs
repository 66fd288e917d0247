//! Caching: a task run whose cache key has a valid record loads it instead of running.
//!
//! A [`CachePolicy`] says what the key is made of: the task's inputs (hashed with BLAKE3
//! over a canonical encoding), its source code, the flow run's parameters, the flow run's
//! id, or a function of yours. The key is the storage key of the task's result record, so
//! a hit is a verified load (state `Cached`) and a miss runs the task and writes the record.
//!
//! ```
//! use kiln::prelude::*;
//!
//! #[task(cache = inputs + task_source, cache_expiration = "1d")]
//! fn thumbnail(url: String, size: u32) -> Vec<u8> {
//!     vec![0; size as usize]
//! }
//! ```
//!
//! Hashing is injective and deterministic across processes, machines and builds: serde
//! values are hashed through Kiln's own canonical encoding (type-tagged, floats by their
//! bits, maps and hash sets sorted; see `docs/CACHE_KEYS.md`), images through their
//! dimensions, color type and pixels. An input that cannot be hashed makes the policy fail
//! with an error naming it, never a key from the other inputs.

mod canonical;

use std::fmt;

use serde_json::Value;

/// A user function that computes a cache key from the run's context.
pub type CacheKeyFn = fn(&CacheContext<'_>) -> Option<String>;

/// What a task's cache key is made of.
#[derive(Clone, Default)]
pub struct CachePolicy {
    inputs: bool,
    task_source: bool,
    flow_parameters: bool,
    run_id: bool,
    exclude: Vec<String>,
    key_fn: Option<CacheKeyFn>,
}

impl fmt::Debug for CachePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for CachePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (on, name) in [
            (self.inputs, "inputs"),
            (self.task_source, "task_source"),
            (self.flow_parameters, "flow_parameters"),
            (self.run_id, "run_id"),
            (self.key_fn.is_some(), "cache_key_fn"),
        ] {
            if on {
                parts.push(name.to_string());
            }
        }
        if parts.is_empty() {
            return f.write_str("none");
        }
        let mut text = parts.join("+");
        for e in &self.exclude {
            text.push_str(&format!("-{e}"));
        }
        f.write_str(&text)
    }
}

impl CachePolicy {
    /// No caching.
    pub fn none() -> Self {
        CachePolicy::default()
    }
    /// A hash of the task's inputs.
    pub fn inputs() -> Self {
        CachePolicy {
            inputs: true,
            ..Default::default()
        }
    }
    /// A hash of the task function's source code (embedded at compile time).
    pub fn task_source() -> Self {
        CachePolicy {
            task_source: true,
            ..Default::default()
        }
    }
    /// The parameters of the flow run the task runs in.
    pub fn flow_parameters() -> Self {
        CachePolicy {
            flow_parameters: true,
            ..Default::default()
        }
    }
    /// The id of the flow run: a cache that lives as long as the flow run (and its retries).
    pub fn run_id() -> Self {
        CachePolicy {
            run_id: true,
            ..Default::default()
        }
    }
    /// A key of your own; `None` from the function means "do not cache this run".
    pub fn key_fn(f: CacheKeyFn) -> Self {
        CachePolicy {
            key_fn: Some(f),
            ..Default::default()
        }
    }
    /// This policy and `other` together.
    pub fn and(mut self, other: CachePolicy) -> Self {
        self.inputs |= other.inputs;
        self.task_source |= other.task_source;
        self.flow_parameters |= other.flow_parameters;
        self.run_id |= other.run_id;
        self.exclude.extend(other.exclude);
        self.key_fn = self.key_fn.or(other.key_fn);
        self
    }
    /// Leaves the input `name` out of the inputs hash (a client handle, a logger...).
    pub fn without(mut self, name: &str) -> Self {
        self.exclude.push(name.to_owned());
        self
    }
    /// Whether the policy caches at all.
    pub fn is_none(&self) -> bool {
        !(self.inputs || self.task_source || self.flow_parameters || self.run_id || self.key_fn.is_some())
    }

    /// Reads `inputs`, `inputs+task_source`, `inputs-client`, `none`, ... (the form of
    /// `KILN_TASKS_DEFAULT_CACHE_POLICY`).
    pub fn parse(text: &str) -> Result<CachePolicy, String> {
        let mut policy = CachePolicy::none();
        let mut sign = '+';
        let mut word = String::new();
        let flush = |policy: &mut CachePolicy, sign: char, word: &str| -> Result<(), String> {
            let word = word.trim();
            if word.is_empty() {
                return Err(format!("cache policy '{text}' has an empty part"));
            }
            match (sign, word) {
                ('-', name) => policy.exclude.push(name.to_owned()),
                (_, "inputs") => policy.inputs = true,
                (_, "task_source") => policy.task_source = true,
                (_, "flow_parameters") => policy.flow_parameters = true,
                (_, "run_id") => policy.run_id = true,
                (_, "none") => {}
                (_, other) => {
                    return Err(format!(
                        "unknown cache policy '{other}' in '{text}'; use inputs, task_source, flow_parameters, \
                         run_id or none, joined with '+', and '-name' to leave an input out"
                    ));
                }
            }
            Ok(())
        };
        for c in text.chars() {
            if c == '+' || c == '-' {
                flush(&mut policy, sign, &word)?;
                word.clear();
                sign = c;
            } else {
                word.push(c);
            }
        }
        flush(&mut policy, sign, &word)?;
        Ok(policy)
    }
}

impl std::ops::Add for CachePolicy {
    type Output = CachePolicy;
    fn add(self, other: CachePolicy) -> CachePolicy {
        self.and(other)
    }
}

/// What a [`CacheKeyFn`] sees.
#[derive(Debug)]
pub struct CacheContext<'a> {
    /// The task's key (module path and function name).
    pub task_key: &'a str,
    /// The task's inputs that implement `Serialize`, as JSON (others by type name).
    pub parameters: &'a Value,
    /// The flow run, if the task runs in one.
    pub flow_run_id: Option<uuid::Uuid>,
    /// The flow run's parameters.
    pub flow_parameters: Option<&'a Value>,
}

/// One input's hash, or why it has none.
pub type InputHash = Result<[u8; 32], String>;

/// Everything a cache key may be made of, gathered for one run.
pub(crate) struct KeyParts<'a> {
    pub(crate) task_key: &'a str,
    pub(crate) task_name: &'a str,
    pub(crate) source_hash: &'a str,
    pub(crate) inputs: Vec<(&'static str, InputHash)>,
    pub(crate) parameters: &'a Value,
    pub(crate) flow_run_id: Option<uuid::Uuid>,
    pub(crate) flow_parameters: Option<&'a Value>,
    /// The hash of the flow run's arguments (the `flow_parameters` policy).
    pub(crate) flow_parameters_hash: Option<&'a InputHash>,
}

/// The cache key (a storage key) for `policy`, `None` when the policy does not cache this
/// run, or an error naming the part that cannot be hashed: no key is ever made from the
/// remaining parts.
pub(crate) fn key(policy: &CachePolicy, parts: &KeyParts<'_>) -> Result<Option<String>, String> {
    if policy.is_none() {
        return Ok(None);
    }
    let mut h = blake3::Hasher::new_derive_key("kiln 2026-11 cache key v2");
    let mut field = |name: &str, bytes: &[u8]| {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field("task", parts.task_key.as_bytes());
    if policy.inputs {
        for (name, hash) in &parts.inputs {
            if policy.exclude.iter().any(|e| e == name) {
                continue;
            }
            match hash {
                Ok(hash) => field(name, hash),
                Err(why) => {
                    return Err(format!(
                        "input '{name}' cannot be hashed for the cache key ({why}); leave it out with \
                         `cache = inputs - {name}`, or give a `cache_key_fn`"
                    ));
                }
            }
        }
    }
    if policy.task_source {
        field("source", parts.source_hash.as_bytes());
    }
    if policy.flow_parameters {
        let hash = parts
            .flow_parameters_hash
            .ok_or("the flow_parameters policy needs a flow run, and this task runs outside one")?
            .as_ref()
            .map_err(|e| format!("the flow parameters cannot be hashed: {e}"))?;
        field("flow_parameters", hash);
    }
    if policy.run_id {
        let id = parts
            .flow_run_id
            .ok_or("the run_id policy needs a flow run, and this task runs outside one")?;
        field("flow_run", id.as_bytes());
    }
    if let Some(f) = policy.key_fn {
        let ctx = CacheContext {
            task_key: parts.task_key,
            parameters: parts.parameters,
            flow_run_id: parts.flow_run_id,
            flow_parameters: parts.flow_parameters,
        };
        match f(&ctx) {
            Some(user) => field("user", user.as_bytes()),
            None => return Ok(None),
        }
    }
    Ok(Some(format!("cache/{}/{}", parts.task_name, h.finalize().to_hex())))
}

/// One hash of all of a run's arguments (a flow run's parameters), or why there is none.
pub(crate) fn combine(inputs: &[(&'static str, InputHash)]) -> InputHash {
    let mut h = blake3::Hasher::new_derive_key("kiln 2026-11 parameters v1");
    for (name, hash) in inputs {
        let hash = hash.as_ref().map_err(|e| format!("parameter '{name}': {e}"))?;
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(hash);
    }
    Ok(*h.finalize().as_bytes())
}

/// Hashes a serde value through Kiln's canonical encoding.
pub fn hash_serde<T: serde::Serialize + ?Sized>(value: &T) -> InputHash {
    canonical::hash(value)
}

/// Hashes an image input: its dimensions, color type (by name) and pixels.
pub fn hash_image(width: u32, height: u32, color: &str, pixels: &[u8]) -> InputHash {
    Ok(canonical::hash_image(width, height, color, pixels))
}

/// What identifies one call of a task across attempts and processes: the task, its code and
/// the hash of every input. A result persisted by an earlier attempt is reused only for a
/// call with the same identity; `None` (an input that cannot be hashed) means never reuse.
pub(crate) fn call_identity(task_key: &str, source_hash: &str, inputs: &[(&'static str, InputHash)]) -> Option<String> {
    let mut h = blake3::Hasher::new_derive_key("kiln 2026-11 call identity v1");
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(task_key.as_bytes());
    field(source_hash.as_bytes());
    for (name, hash) in inputs {
        field(name.as_bytes());
        field(hash.as_ref().ok()?);
    }
    Some(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(inputs: Vec<(&'static str, InputHash)>, params: &'a Value) -> KeyParts<'a> {
        KeyParts {
            task_key: "m::t",
            task_name: "t",
            source_hash: "abc",
            inputs,
            parameters: params,
            flow_run_id: None,
            flow_parameters: None,
            flow_parameters_hash: None,
        }
    }

    #[test]
    fn keys_depend_on_exactly_what_the_policy_names() {
        let p = Value::Null;
        let a = parts(vec![("x", hash_serde(&1)), ("client", Err("no".into()))], &p);
        let b = parts(vec![("x", hash_serde(&2)), ("client", Err("no".into()))], &p);
        let inputs = CachePolicy::inputs().without("client");
        let ka = key(&inputs, &a).unwrap().unwrap();
        assert_ne!(ka, key(&inputs, &b).unwrap().unwrap());
        assert_eq!(ka, key(&inputs, &a).unwrap().unwrap(), "deterministic");
        assert!(ka.starts_with("cache/t/"));
        // A part that cannot be hashed: an error, never a key from the rest.
        let err = key(&CachePolicy::inputs(), &a).unwrap_err();
        assert!(err.contains("input 'client' cannot be hashed"), "{err}");
        assert_eq!(key(&CachePolicy::none(), &a).unwrap(), None);
        assert!(
            key(&CachePolicy::run_id(), &a)
                .unwrap_err()
                .contains("needs a flow run")
        );
    }

    #[test]
    fn call_identities_differ_by_task_code_and_inputs() {
        let inputs = |x: i32| vec![("x", hash_serde(&x))];
        let one = call_identity("m::t", "src", &inputs(10)).unwrap();
        assert_eq!(one, call_identity("m::t", "src", &inputs(10)).unwrap());
        assert_ne!(one, call_identity("m::t", "src", &inputs(20)).unwrap());
        assert_ne!(one, call_identity("m::u", "src", &inputs(10)).unwrap());
        assert_ne!(one, call_identity("m::t", "changed", &inputs(10)).unwrap());
        assert_eq!(call_identity("m::t", "src", &[("x", Err("no".into()))]), None);
    }

    #[test]
    fn map_order_does_not_change_the_hash() {
        let mut one = std::collections::HashMap::new();
        let mut two = std::collections::HashMap::new();
        for i in 0..50 {
            one.insert(format!("k{i}"), i);
        }
        for i in (0..50).rev() {
            two.insert(format!("k{i}"), i);
        }
        assert_eq!(hash_serde(&one), hash_serde(&two));
    }

    #[test]
    fn policies_parse_and_print() {
        let p = CachePolicy::parse("inputs + task_source - client").unwrap();
        let built = CachePolicy::inputs().and(CachePolicy::task_source()).without("client");
        assert_eq!(p.to_string(), built.to_string());
        assert_eq!(p.to_string(), "inputs+task_source-client");
        assert!(CachePolicy::parse("none").unwrap().is_none());
        assert!(
            CachePolicy::parse("inputs+bogus")
                .unwrap_err()
                .contains("unknown cache policy 'bogus'")
        );
    }
}
