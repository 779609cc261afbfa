//! Records that single-key gets read from the file, kept in memory in front
//! of it: a get that finds its key here costs a hash lookup and a copy
//! instead of a walk down redb's pages (each through its page cache's
//! locks), a decode, and a read of the value log.
//!
//! An entry is what a view of the file of one memory generation (see
//! `Memtable::generation`) held for its key, and is good exactly as long as
//! such a view is: a lookup names the generation it reads for, and an entry
//! of another one is a miss. So a flush invalidates every entry at once
//! without touching them (the cache's own eviction clears them out), and
//! nothing needs removing under the memory lock.
//!
//! The cache is bounded by the bytes its records take (keys, values and an
//! allowance per entry), and evicts by S3-FIFO (`quick_cache`): a scan over
//! many keys read once does not push out the keys read often.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::proto::StoredValue;

/// Bytes an entry costs beyond its key and value, roughly: the cache's slot
/// for it (key and record, about 130 bytes, plus links and its hash table
/// entry), the key's allocation, the value's shared header, and for a value
/// from the value log the record header and key copy its buffer keeps.
const ENTRY_OVERHEAD: u64 = 224;

#[derive(Clone)]
struct Entry {
    generation: u64,
    /// `None`: the file did not hold the key. A record with a `value_ref`
    /// has its revisions but not its value (see [`ReadCache::get`]).
    record: Option<StoredValue>,
}

impl Entry {
    fn has_value(&self) -> bool {
        self.record.as_ref().is_none_or(|r| r.value_ref.is_none())
    }
}

#[derive(Clone)]
struct EntryWeight;

impl quick_cache::Weighter<Vec<u8>, Entry> for EntryWeight {
    fn weight(&self, key: &Vec<u8>, entry: &Entry) -> u64 {
        key.len() as u64 + entry.record.as_ref().map_or(0, |r| r.value.len() as u64) + ENTRY_OVERHEAD
    }
}

/// The cache; `None` inside when it is sized 0 (switched off).
pub struct ReadCache {
    entries: Option<quick_cache::sync::Cache<Vec<u8>, Entry, EntryWeight>>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Set once the store closes: a get still running then may insert
    /// after the cache was emptied, and nothing may answer from it.
    closed: AtomicBool,
}

/// What the cache did so far, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCacheStats {
    /// Gets answered from the cache.
    pub hits: u64,
    /// Gets that read the file (none are counted while the cache is off).
    pub misses: u64,
    /// Bytes the entries take, as weighed.
    pub bytes: u64,
}

impl ReadCache {
    /// A cache of at most about `bytes` of records (0: none kept).
    pub fn new(bytes: usize) -> Self {
        let bytes = bytes as u64;
        let entries = (bytes > 0).then(|| {
            // The item estimate sizes the list of recently evicted keys
            // that S3-FIFO remembers, and bounds the number of shards: taken
            // for records of a 16-byte key and a 256-byte value.
            let estimated_items = (bytes / (16 + 256 + ENTRY_OVERHEAD)).max(16) as usize;
            quick_cache::sync::Cache::with_weighter(estimated_items, bytes, EntryWeight)
        });
        ReadCache {
            entries,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// The file's record of `key` as a view of memory generation
    /// `generation` holds it: `Some(None)` when it holds no such key, `None`
    /// when the cache does not know. With `with_value`, only a record that
    /// has its value answers; without, one that was kept for its revisions
    /// alone (its value still in the value log) does too.
    pub fn get(&self, key: &[u8], generation: u64, with_value: bool) -> Option<Option<StoredValue>> {
        let entries = self.entries.as_ref()?;
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let found = entries.get(key);
        match found.filter(|entry| entry.generation == generation && (entry.has_value() || !with_value)) {
            Some(entry) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(entry.record)
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Keeps `record`, read for `key` through a view of generation
    /// `generation`, with its value loaded or (a `value_ref` left in it)
    /// for its revisions alone.
    pub fn insert(&self, key: &[u8], generation: u64, record: &Option<StoredValue>) {
        if let Some(entries) = &self.entries {
            let entry = Entry {
                generation,
                record: record.clone(),
            };
            entries.insert(key.to_vec(), entry);
        }
    }

    /// Forgets everything and answers no more (the store is closing).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(entries) = &self.entries {
            entries.clear();
        }
    }

    /// Hits, misses and size so far.
    pub fn stats(&self) -> ReadCacheStats {
        ReadCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            bytes: self.entries.as_ref().map_or(0, |e| e.weight()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(len: usize) -> Option<StoredValue> {
        Some(StoredValue {
            value: vec![1; len].into(),
            mod_revision: 5,
            ..Default::default()
        })
    }

    #[test]
    fn an_entry_answers_for_its_generation_only() {
        let cache = ReadCache::new(1 << 20);
        assert_eq!(cache.get(b"k", 1, true), None);
        cache.insert(b"k", 1, &record(10));
        cache.insert(b"gone", 1, &None);
        assert_eq!(cache.get(b"k", 1, true), Some(record(10)));
        assert_eq!(cache.get(b"gone", 1, true), Some(None), "an absent key is known absent");
        assert_eq!(cache.get(b"k", 2, true), None, "an entry of an older generation");
        // A late insert from an older view replaces a newer entry: a miss
        // later, never a wrong answer.
        cache.insert(b"k", 2, &record(20));
        cache.insert(b"k", 1, &record(10));
        assert_eq!(cache.get(b"k", 2, true), None);
        // A record kept for its revisions answers only what needs no value.
        let mut revisions = record(0).unwrap();
        revisions.value_ref = Some(crate::proto::ValueRef::default());
        cache.insert(b"r", 1, &Some(revisions.clone()));
        assert_eq!(cache.get(b"r", 1, true), None);
        assert_eq!(cache.get(b"r", 1, false), Some(Some(revisions)));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (3, 4));
    }

    #[test]
    fn the_cache_keeps_to_its_size() {
        let bytes = 64 << 10;
        let cache = ReadCache::new(bytes);
        for i in 0..2_000u32 {
            cache.insert(&i.to_be_bytes(), 1, &record(256));
        }
        let stats = cache.stats();
        assert!(stats.bytes <= bytes as u64, "{stats:?}");
        assert!(stats.bytes >= bytes as u64 / 2, "{stats:?}");
        let kept = (0..2_000u32)
            .filter(|i| cache.get(&i.to_be_bytes(), 1, true).is_some())
            .count();
        assert!((60..=135).contains(&kept), "{kept} records of 484 bytes kept in 64 KiB");
    }

    #[test]
    fn a_closed_cache_answers_nothing_even_for_a_late_insert() {
        let cache = ReadCache::new(1 << 20);
        cache.insert(b"k", 1, &record(10));
        cache.close();
        assert_eq!(cache.get(b"k", 1, true), None);
        cache.insert(b"k", 1, &record(10));
        assert_eq!(cache.get(b"k", 1, true), None);
    }

    #[test]
    fn a_cache_of_size_zero_keeps_nothing() {
        let cache = ReadCache::new(0);
        cache.insert(b"k", 1, &record(10));
        assert_eq!(cache.get(b"k", 1, true), None);
        assert_eq!(cache.stats(), ReadCacheStats::default());
    }
}
