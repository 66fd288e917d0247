//! Loaded records kept in memory under a byte budget, least recently used first out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;

use super::record::RecordHeader;

/// Verified records by (storage, key, hash): a record is immutable at its hash.
#[derive(Debug)]
pub(crate) struct RecordCache {
    budget: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<(String, String, String), (RecordHeader, Bytes, u64)>,
    order: BTreeMap<u64, (String, String, String)>,
    tick: u64,
    bytes: u64,
}

impl RecordCache {
    pub(crate) fn new(budget: u64) -> Self {
        RecordCache {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub(crate) fn get(&self, storage: &str, key: &str, hash: &str) -> Option<(RecordHeader, Bytes)> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *inner;
        inner.tick += 1;
        let id = (storage.to_owned(), key.to_owned(), hash.to_owned());
        let (header, payload, tick) = inner.entries.get_mut(&id)?;
        inner.order.remove(tick);
        *tick = inner.tick;
        inner.order.insert(inner.tick, id);
        Some((header.clone(), payload.clone()))
    }

    pub(crate) fn put(&self, storage: &str, key: &str, header: &RecordHeader, payload: &Bytes) {
        let size = payload.len() as u64;
        if size > self.budget {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *inner;
        inner.tick += 1;
        let id = (storage.to_owned(), key.to_owned(), header.hash.clone());
        if let Some((_, old, tick)) = inner.entries.remove(&id) {
            inner.order.remove(&tick);
            inner.bytes -= old.len() as u64;
        }
        while inner.bytes + size > self.budget {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            if let Some((_, evicted, _)) = inner.entries.remove(&oldest) {
                inner.bytes -= evicted.len() as u64;
            }
        }
        inner.bytes += size;
        inner.order.insert(inner.tick, id.clone());
        inner.entries.insert(id, (header.clone(), payload.clone(), inner.tick));
    }

    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.inner.lock().unwrap().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(hash: &str) -> RecordHeader {
        RecordHeader {
            serializer: "raw".into(),
            value_type: String::new(),
            hash: hash.into(),
            length: 0,
            created: 0,
            expires: None,
            run_id: None,
            run_name: String::new(),
        }
    }

    #[test]
    fn stays_within_its_budget_evicting_the_least_recently_used() {
        let cache = RecordCache::new(100);
        let kb = |n: usize| Bytes::from(vec![0u8; n]);
        cache.put("s", "a", &header("1"), &kb(40));
        cache.put("s", "b", &header("2"), &kb(40));
        assert!(cache.get("s", "a", "1").is_some()); // a is now the most recent
        cache.put("s", "c", &header("3"), &kb(40)); // evicts b
        assert!(cache.get("s", "b", "2").is_none());
        assert!(cache.get("s", "a", "1").is_some() && cache.get("s", "c", "3").is_some());
        assert!(cache.bytes() <= 100);
        cache.put("s", "huge", &header("4"), &kb(101)); // larger than the budget: not kept
        assert!(cache.get("s", "huge", "4").is_none());
        assert!(
            cache.get("s", "a", "other-hash").is_none(),
            "a record is found only at its hash"
        );
    }
}
