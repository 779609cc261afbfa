//! Applied writes that are not in the store file yet.
//!
//! Applying a batch into redb on the raft thread costs a copy-on-write of
//! every B-tree page the batch touches, each time; with writes spread over
//! many keys that is most of a write's cost. So the raft loop applies into
//! this in-memory layer (a sorted map of changes, cheap to update), and the
//! store's flusher moves it into redb in one large transaction now and then,
//! where many writes share each page (and a key written many times is written
//! once).
//!
//! Two layers: `active` takes new batches; a flush first *freezes* it (moves
//! it aside, still readable) and only drops the frozen layer once the redb
//! commit that holds it is done. A reader that finds a key in neither layer
//! therefore finds its newest value in redb, whenever it looks.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::ops::Bound;
use std::sync::{Arc, OnceLock};

use super::history::Event;
use crate::leases::LeaseDelta;
use crate::proto::{SnapshotHeader, StoredValue};
use crate::sessions::{SessionDelta, Sessions};

/// What one committed batch hands the store.
#[derive(Debug, Default)]
pub struct Applied {
    /// Its changes to keys.
    pub changes: Layer,
    /// Their history, in revision order.
    pub events: Vec<Event>,
    /// The state record it led to.
    pub header: SnapshotHeader,
    /// How it changed the client sessions.
    pub sessions: SessionDelta,
    /// How it changed the leases.
    pub leases: LeaseDelta,
    /// How it changed the number of keys (puts applied unresolved counted
    /// as replacing a key).
    pub keys_added: i64,
    /// Puts applied unresolved, as `(key, mod revision)`, that the batch
    /// replaced and found to have created their key: each adds that key to
    /// the count if the active layer still holds it (else the flush that
    /// took it counted it).
    pub settle: Vec<(Vec<u8>, u64)>,
}

/// A key's newest record, or `None` for a delete.
pub type Change = Option<StoredValue>;

/// True for a put applied without the key's previous record: memory held
/// none, and reading the file for it on the raft thread was, with a large
/// state, a quarter of that thread's work per put. Such a record knows its
/// value, mod revision and lease; its create revision and version come from
/// the record below it in the file, found when it is read ([`resolve`]) or
/// flushed. Marked by `create_revision == 0` (a real one is a log index, so
/// at least 1); never written to the file.
pub fn is_unresolved(record: &StoredValue) -> bool {
    record.create_revision == 0
}

/// `record` with its create revision and version filled in from `below`,
/// the key's record in a file view that holds everything older than
/// `record`: either the record it replaced (or `None`: the key was absent),
/// or, once the file holds `record` itself (its flush committed), that
/// resolved copy. A resolved record comes back as it was.
pub fn resolve(mut record: StoredValue, below: Option<&StoredValue>) -> StoredValue {
    if !is_unresolved(&record) {
        return record;
    }
    match below {
        Some(b) if b.mod_revision == record.mod_revision => {
            record.create_revision = b.create_revision;
            record.version = b.version;
        }
        Some(b) => {
            record.create_revision = b.create_revision;
            record.version = b.version + 1;
        }
        None => {
            record.create_revision = record.mod_revision;
            record.version = 1;
        }
    }
    record
}

/// `event` (a put applied unresolved, see [`is_unresolved`]) resolved
/// against the record it replaced, `below` (`None`: the key was absent).
pub fn resolve_event(event: &mut Event, below: Option<&StoredValue>) {
    if let Some(record) = event.change.record.take() {
        event.change.record = Some(resolve(record, below));
        event.change.prev_mod_revision = below.map_or(0, |b| b.mod_revision);
    }
}

/// True for the history of a put applied unresolved: its record's create
/// revision and version and the revision it replaced are not known yet.
pub fn is_unresolved_event(event: &Event) -> bool {
    event.change.record.as_ref().is_some_and(is_unresolved)
}

/// A key with its change.
pub type KeyedChange = (Vec<u8>, Change);

/// Bytes a change costs in memory, roughly: key, value and the map's own
/// overhead. Used to decide when to flush, not for exact accounting.
fn cost(key_len: usize, change: &Change) -> usize {
    key_len + change.as_ref().map_or(0, |v| v.value.len()) + 96
}

/// A key as a layer's tree holds it: up to 24 bytes inside the tree's
/// node (most keys), longer ones on the heap. A search then compares keys
/// where it reads the node instead of following a pointer per key: that
/// search was most of absorbing a batch into a layer of ~70k keys on the
/// raft thread.
type LayerKey = smallvec::SmallVec<[u8; 24]>;

fn layer_key(key: Vec<u8>) -> LayerKey {
    if key.len() <= 24 {
        LayerKey::from_slice(&key)
    } else {
        LayerKey::from_vec(key)
    }
}

/// Sorted changes with their rough size in memory.
#[derive(Debug, Default)]
pub struct Layer {
    changes: BTreeMap<LayerKey, Change>,
    /// A hash of each key in `changes`: most lookups of a large state miss
    /// both layers, and a miss here costs one probe instead of a walk down
    /// the tree that reaches each compared key through a pointer (the raft
    /// loop's largest cost with 500k keys held). A collision only sends a
    /// lookup on to the tree.
    hashes: HashSet<u64, BuildHasherDefault<PassThrough>>,
    bytes: usize,
}

/// A key's hash for [`Layer::hashes`]: foldhash, seeded at random once per
/// process so that clients can't choose keys whose hashes collide. Several
/// times cheaper than std's SipHash on short keys, and the raft loop hashes
/// each put's key about six times (the batch's layers, memory's two, the
/// inserts): SipHash was ~5% of the raft loop's samples with 500k keys held.
fn key_hash(key: &[u8]) -> u64 {
    static SEED: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    SEED.get_or_init(Default::default).hash_one(key)
}

/// [`Layer::hashes`] holds [`key_hash`] values, already well mixed: the
/// set uses them as they are instead of hashing them again.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; this keeps any other input well defined.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Layer {
    /// Records `change` for `key`, replacing an older one.
    pub fn insert(&mut self, key: Vec<u8>, change: Change) {
        self.insert_key(layer_key(key), change);
    }

    fn insert_key(&mut self, key: LayerKey, change: Change) {
        let key_len = key.len();
        self.bytes += cost(key_len, &change);
        self.hashes.insert(key_hash(&key));
        if let Some(old) = self.changes.insert(key, change) {
            self.bytes -= cost(key_len, &old);
        }
    }

    /// The change recorded for `key`, if any.
    pub fn get(&self, key: &[u8]) -> Option<&Change> {
        if !self.hashes.contains(&key_hash(key)) {
            return None;
        }
        self.changes.get(key)
    }

    /// Every change, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Change)> {
        self.changes.iter().map(|(key, change)| (key.as_slice(), change))
    }

    /// Rough bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when no change is held.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Takes every change of `newer`, which replace this layer's own.
    pub fn absorb(&mut self, newer: Layer) {
        if self.changes.is_empty() {
            *self = newer;
            return;
        }
        for (key, change) in newer.changes {
            self.insert_key(key, change);
        }
    }

    /// The changes of keys in `[start, end)`, in key order.
    pub fn range<'a>(&'a self, start: &[u8], end: Bound<&'a [u8]>) -> impl Iterator<Item = (&'a [u8], &'a Change)> {
        self.changes
            .range::<[u8], _>((Bound::Included(start), end))
            .map(|(key, change)| (key.as_slice(), change))
    }
}

/// A layer being written to redb, with the state record its flush commits.
#[derive(Debug)]
pub struct Frozen {
    /// The changes.
    pub layer: Layer,
    /// Their history, in revision order.
    pub events: Vec<Event>,
    /// The changes to the lease tables.
    pub leases: LeaseDelta,
    /// The state (applied index, membership) as of the last change in it.
    pub header: SnapshotHeader,
}

/// Everything applied but not yet flushed, and what readers need to merge it
/// with the file.
#[derive(Debug)]
pub struct Memtable {
    active: Layer,
    /// The history of the active layer's changes, in revision order.
    active_events: Vec<Event>,
    active_event_bytes: usize,
    /// The lease changes of the active layer's batches.
    active_leases: LeaseDelta,
    frozen: Option<Arc<Frozen>>,
    /// The state record as of the last applied batch (its `sessions` are
    /// in `sessions`, filled in only when a layer is frozen).
    header: SnapshotHeader,
    /// The client sessions as of the last applied batch.
    sessions: Sessions,
    /// Keys the file held at its last flush (or open, or install).
    file_keys: u64,
    /// How the frozen layer and the active one change the number of keys,
    /// as far as known: a put applied unresolved counts as replacing a key
    /// (most do) until the flush that writes it finds out, and then the
    /// file's count is exact again.
    frozen_keys_added: i64,
    active_keys_added: i64,
    /// Moves on whenever memory drops what the file may not have had a
    /// moment before (a flushed layer, everything on a reset): a reader
    /// that keeps a view of the file across lookups takes a new one then.
    generation: u64,
}

impl Memtable {
    /// Nothing in memory yet: the file holds `keys` keys at the state `header`.
    pub fn new(mut header: SnapshotHeader, keys: u64) -> Self {
        let sessions = Sessions::from_proto(header.sessions.take().as_ref());
        Memtable {
            active: Layer::default(),
            active_events: Vec::new(),
            active_event_bytes: 0,
            active_leases: LeaseDelta::default(),
            frozen: None,
            header,
            sessions,
            file_keys: keys,
            frozen_keys_added: 0,
            active_keys_added: 0,
            generation: 0,
        }
    }

    /// The client sessions as of the last applied batch.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The newest change to `key` held in memory (`None`: look in the file).
    pub fn lookup(&self, key: &[u8]) -> Option<&Change> {
        self.locate(key).map(|(change, _)| change)
    }

    /// [`Self::lookup`], and whether the change is in the frozen layer.
    pub fn locate(&self, key: &[u8]) -> Option<(&Change, bool)> {
        match self.active.get(key) {
            Some(change) => Some((change, false)),
            None => self.frozen.as_ref()?.layer.get(key).map(|change| (change, true)),
        }
    }

    /// Adds a committed batch.
    pub fn commit(&mut self, batch: Applied) {
        for (key, revision) in &batch.settle {
            let held = self.active.get(key).and_then(Option::as_ref);
            if held.is_some_and(|r| is_unresolved(r) && r.mod_revision == *revision) {
                self.active_keys_added += 1;
            }
        }
        self.active.absorb(batch.changes);
        self.active_event_bytes += batch.events.iter().map(Event::cost).sum::<usize>();
        self.active_events.extend(batch.events);
        self.active_leases.absorb(batch.leases);
        self.header = batch.header;
        self.sessions.apply_delta(batch.sessions);
        self.active_keys_added += batch.keys_added;
    }

    /// Keys held, counting memory and file together, as far as known: a put
    /// applied unresolved that created its key counts from the flush that
    /// writes it on (see [`StateStore::len`](super::StateStore::len) for
    /// the exact count).
    pub fn keys(&self) -> u64 {
        self.file_keys
            .saturating_add_signed(self.frozen_keys_added + self.active_keys_added)
    }

    /// Keys the file held at its last flush: none means a key memory
    /// doesn't hold is absent, with no need to look.
    pub fn file_keys(&self) -> u64 {
        self.file_keys
    }

    /// How the frozen layer and the active one change the number of keys,
    /// unresolved puts counted as replacing theirs.
    pub fn keys_added(&self) -> (i64, i64) {
        (self.frozen_keys_added, self.active_keys_added)
    }

    /// The frozen layer (being flushed), if any.
    pub fn frozen(&self) -> Option<&Arc<Frozen>> {
        self.frozen.as_ref()
    }

    /// The active layer.
    pub fn active(&self) -> &Layer {
        &self.active
    }

    /// Rough bytes of changes (and their history) not yet being flushed.
    pub fn active_bytes(&self) -> usize {
        self.active.bytes() + self.active_event_bytes + self.active_leases.cost()
    }

    /// The history held in memory (not yet in the file) from revision
    /// `from` on, oldest first (each layer's is in revision order, so a
    /// watcher that is current skips the rest without reading it).
    pub fn events_from(&self, from: u64) -> impl Iterator<Item = &Event> {
        let since = |events: &'_ [Event]| events.partition_point(|e| e.revision < from);
        let frozen = self.frozen.as_ref().map_or(&[][..], |f| &f.events[since(&f.events)..]);
        frozen
            .iter()
            .chain(self.active_events[since(&self.active_events)..].iter())
    }

    /// The applied index of the last batch.
    pub fn applied_index(&self) -> u64 {
        self.header.index
    }

    /// Moves the active layer aside for a flush, unless there is nothing to
    /// write beyond `flushed_index`. At most one layer is frozen at a time.
    pub fn freeze(&mut self, flushed_index: u64) -> Option<Arc<Frozen>> {
        debug_assert!(self.frozen.is_none(), "one flush at a time");
        if self.active.is_empty()
            && self.active_events.is_empty()
            && self.active_leases.is_empty()
            && self.header.index <= flushed_index
        {
            return None;
        }
        let mut header = self.header.clone();
        // The sessions as of the same batch as the header: a crash brings
        // both back together.
        header.sessions = Some(self.sessions.to_proto());
        self.active_event_bytes = 0;
        self.frozen_keys_added = std::mem::take(&mut self.active_keys_added);
        let frozen = Arc::new(Frozen {
            layer: std::mem::take(&mut self.active),
            events: std::mem::take(&mut self.active_events),
            leases: std::mem::take(&mut self.active_leases),
            header,
        });
        self.frozen = Some(frozen.clone());
        Some(frozen)
    }

    /// True while a frozen layer is being written to the file.
    pub fn is_flushing(&self) -> bool {
        self.frozen.is_some()
    }

    /// True when the file holds everything applied up to `flushed_index`
    /// and memory holds nothing newer.
    pub fn is_clean(&self, flushed_index: u64) -> bool {
        self.active.is_empty() && self.frozen.is_none() && self.header.index <= flushed_index
    }

    /// Drops the frozen layer once the file holds it, and `file_keys` keys.
    pub fn flushed(&mut self, file_keys: u64) {
        self.frozen = None;
        self.file_keys = file_keys;
        self.frozen_keys_added = 0;
        self.generation += 1;
    }

    /// Forgets everything in memory: the file was replaced (by a snapshot
    /// that is ahead of it, or a new state record), holding `keys` keys at
    /// the state `header`. Returns what memory held, for the caller to
    /// free outside its locks.
    pub fn reset(&mut self, header: SnapshotHeader, keys: u64) -> Memtable {
        let mut fresh = Memtable::new(header, keys);
        fresh.generation = self.generation + 1;
        std::mem::replace(self, fresh)
    }

    /// See the `generation` field.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The changes in `[start, end)` that start with `prefix`, newest layer
    /// first, in key order, until `live_limit` live records (0: no limit) or
    /// `live_bytes` of them are collected. Returns the changes and, if the
    /// range held more, the last key collected: beyond it memory is unknown.
    pub fn collect_range(
        &self,
        prefix: &[u8],
        start: &[u8],
        end: Bound<&[u8]>,
        live_limit: usize,
        live_bytes: usize,
    ) -> (Vec<KeyedChange>, Option<Vec<u8>>) {
        let mut active = self.active.range(start, end).peekable();
        let mut frozen = self.frozen.iter().flat_map(|f| f.layer.range(start, end)).peekable();
        let (mut collected, mut live, mut bytes) = (Vec::new(), 0usize, 0usize);
        loop {
            // The smaller key next; on a tie the active layer's change wins.
            let next = match (active.peek(), frozen.peek()) {
                (None, None) => return (collected, None),
                (Some(_), None) => active.next(),
                (None, Some(_)) => frozen.next(),
                (Some((a, _)), Some((f, _))) => match a.cmp(f) {
                    std::cmp::Ordering::Less => active.next(),
                    std::cmp::Ordering::Greater => frozen.next(),
                    std::cmp::Ordering::Equal => {
                        frozen.next();
                        active.next()
                    }
                },
            };
            let (key, change) = next.expect("a layer had a next change");
            if !key.starts_with(prefix) {
                return (collected, None);
            }
            // At least one live change, as a scan returns at least one pair.
            let full = (live_limit > 0 && live >= live_limit) || (live > 0 && bytes >= live_bytes);
            if full {
                let last = collected.last().map(|(k, _): &KeyedChange| k.clone());
                return (collected, last);
            }
            if let Some(value) = change {
                live += 1;
                bytes += key.len() + value.value.len();
            }
            collected.push((key.to_vec(), change.clone()));
        }
    }
}

/// Merges changes collected from memory (see [`Memtable::collect_range`])
/// with the file's records of the same range, in key order: memory's change
/// wins (resolved against the file's record, see [`resolve`]), deletes hide
/// the file's record. The file's records must be of a read view taken with
/// the memory collected. Stops at `known_until` (memory past
/// it was not collected); returns whether more may follow (it stopped there,
/// or memory holds changes past it).
pub fn merge<E>(
    memory: Vec<KeyedChange>,
    known_until: Option<&[u8]>,
    file: impl Iterator<Item = Result<(Vec<u8>, StoredValue), E>>,
    mut take: impl FnMut(Vec<u8>, StoredValue) -> bool,
) -> Result<bool, E> {
    let mut memory = memory.into_iter().peekable();
    let mut file = file.peekable();
    loop {
        // The file's record of a key memory changed resolves memory's
        // record if that was applied unresolved.
        let mut below = None;
        let from_file = match (memory.peek(), file.peek()) {
            (None, None) => return Ok(known_until.is_some()),
            (Some(_), None) => false,
            (_, Some(Err(_))) => match file.next() {
                Some(Err(e)) => return Err(e),
                _ => unreachable!("peeked an error"),
            },
            (None, Some(Ok(_))) => true,
            (Some((m, _)), Some(Ok((f, _)))) => {
                if m == f {
                    below = file.next().and_then(Result::ok).map(|(_, record)| record);
                    false
                } else {
                    f < m
                }
            }
        };
        let (key, value) = if from_file {
            match file.next() {
                Some(Ok(record)) => record,
                _ => unreachable!("peeked a record"),
            }
        } else {
            match memory.next() {
                Some((key, Some(value))) => (key, resolve(value, below.as_ref())),
                Some((_, None)) => continue,
                None => unreachable!("peeked a change"),
            }
        };
        if known_until.is_some_and(|until| key.as_slice() > until) {
            return Ok(true);
        }
        if !take(key, value) {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolved record of `v`.
    fn value(v: &str) -> Change {
        Some(StoredValue {
            value: v.as_bytes().to_vec().into(),
            ..record(1, 1, 1)
        })
    }

    fn record(create_revision: u64, mod_revision: u64, version: u64) -> StoredValue {
        StoredValue {
            value: b"v".to_vec().into(),
            create_revision,
            mod_revision,
            version,
            lease: 0,
            value_ref: None,
        }
    }

    fn header(index: u64) -> SnapshotHeader {
        SnapshotHeader {
            index,
            ..Default::default()
        }
    }

    #[test]
    fn a_layer_finds_every_key_it_holds_and_none_it_does_not() {
        let mut layer = Layer::default();
        for i in 0..2000u32 {
            layer.insert(
                format!("key-{i}").into_bytes(),
                (i % 3 != 0).then(|| record(u64::from(i) + 1, 1, 1)),
            );
        }
        for i in 0..2000u32 {
            let change = layer.get(format!("key-{i}").as_bytes()).expect("held");
            assert_eq!(change.is_some(), i % 3 != 0);
            assert_eq!(layer.get(format!("other-{i}").as_bytes()), None);
        }
        let mut newer = Layer::default();
        newer.insert(b"key-1".to_vec(), None);
        newer.insert(b"new".to_vec(), None);
        layer.absorb(newer);
        assert_eq!(layer.get(b"key-1"), Some(&None));
        assert_eq!(layer.get(b"new"), Some(&None));
        assert_eq!(layer.iter().count(), 2001);
    }

    #[test]
    fn keys_inline_and_on_the_heap_sort_and_read_back_as_bytes() {
        // Lengths around the 24 bytes held inline, prefixes of each other.
        let keys: Vec<Vec<u8>> = [0usize, 1, 23, 24, 25, 300]
            .iter()
            .flat_map(|&n| [vec![b'k'; n], [vec![b'k'; n], vec![0xff]].concat()])
            .collect();
        let mut layer = Layer::default();
        for (i, key) in keys.iter().enumerate().rev() {
            layer.insert(key.clone(), Some(record(i as u64 + 1, 1, 1)));
        }
        let mut sorted = keys.clone();
        sorted.sort();
        let listed: Vec<Vec<u8>> = layer.iter().map(|(key, _)| key.to_vec()).collect();
        assert_eq!(listed, sorted);
        for (i, key) in keys.iter().enumerate() {
            let held = layer.get(key).expect("held").as_ref().expect("a put");
            assert_eq!(held.create_revision, i as u64 + 1, "{} bytes", key.len());
        }
        let from_24: Vec<usize> = layer
            .range(&[b'k'; 24], Bound::Excluded(&[b'k'; 300][..]))
            .map(|(key, _)| key.len())
            .collect();
        // 0xff sorts after every further b'k', so the longer runs of k come first.
        assert_eq!(from_24, [24, 25]);
        let mut newer = Layer::default();
        newer.insert(vec![b'k'; 300], None);
        layer.absorb(newer);
        assert_eq!(layer.get(&[b'k'; 300]), Some(&None));
    }

    fn batch(changes: &[(&str, Change)]) -> Layer {
        let mut layer = Layer::default();
        for (k, c) in changes {
            layer.insert(k.as_bytes().to_vec(), c.clone());
        }
        layer
    }

    fn applied(changes: &[(&str, Change)], index: u64, keys_added: i64) -> Applied {
        Applied {
            changes: batch(changes),
            header: header(index),
            keys_added,
            ..Default::default()
        }
    }

    fn scan(mem: &Memtable, file: &[(&str, &str)], limit: usize) -> (Vec<String>, bool) {
        let (memory, until) = mem.collect_range(b"", b"", Bound::Unbounded, limit, usize::MAX);
        let file = file.iter().map(|(k, v)| {
            Ok::<_, ()>((
                k.as_bytes().to_vec(),
                StoredValue {
                    value: v.as_bytes().to_vec().into(),
                    ..Default::default()
                },
            ))
        });
        let mut out = Vec::new();
        let stopped = merge(memory, until.as_deref(), file, |k, v| {
            if limit > 0 && out.len() >= limit {
                return false;
            }
            out.push(format!(
                "{}={}",
                String::from_utf8(k).unwrap(),
                String::from_utf8(v.value.to_vec()).unwrap()
            ));
            true
        })
        .unwrap();
        (out, stopped)
    }

    #[test]
    fn the_active_layer_hides_the_frozen_one_and_both_hide_the_file() {
        let mut mem = Memtable::new(header(1), 2);
        mem.commit(applied(&[("a", value("1")), ("b", None)], 2, -1));
        let frozen = mem.freeze(1).expect("changes to flush");
        assert_eq!(frozen.header.index, 2);
        mem.commit(applied(&[("a", value("2")), ("c", value("3"))], 3, 1));
        assert_eq!(mem.lookup(b"a"), Some(&value("2")));
        assert_eq!(mem.lookup(b"b"), Some(&None), "a delete is remembered, not forgotten");
        assert_eq!(mem.lookup(b"d"), None);
        let (pairs, _) = scan(&mem, &[("a", "0"), ("b", "0"), ("d", "0")], 0);
        assert_eq!(pairs, ["a=2", "c=3", "d=0"]);
        assert_eq!(mem.keys(), 2, "2 in the file, -1 frozen, +1 active");
        // The file now holds a (and not b): 1 key, and the active layer's c.
        mem.flushed(1);
        assert_eq!(mem.lookup(b"b"), None, "once flushed, the file has it");
        assert_eq!(mem.keys(), 2);
    }

    #[test]
    fn nothing_is_frozen_when_the_file_is_current() {
        let mut mem = Memtable::new(header(5), 0);
        assert!(mem.freeze(5).is_none());
        // A batch with no key (a membership change) still moves the state.
        mem.commit(applied(&[], 6, 0));
        assert_eq!(mem.freeze(5).expect("a new state record").header.index, 6);
    }

    #[test]
    fn a_scan_stops_where_the_memory_it_collected_ends() {
        let mut mem = Memtable::new(header(1), 0);
        mem.commit(applied(
            &[("b", value("m")), ("d", value("m")), ("f", value("m"))],
            2,
            3,
        ));
        // Two live changes collected: memory is known up to "d" only, and
        // the file's "e" (which "e"'s absence from memory can't vouch for
        // beyond "d") is not returned.
        let (pairs, _) = scan(&mem, &[("a", "f"), ("c", "f"), ("e", "f")], 2);
        assert_eq!(pairs, ["a=f", "b=m"]);
        // Memory alone past its limit: there is more.
        let (pairs, more) = scan(&mem, &[], 2);
        assert_eq!(pairs, ["b=m", "d=m"]);
        assert!(more);
        let (memory, until) = mem.collect_range(b"", b"", Bound::Unbounded, 2, usize::MAX);
        assert_eq!(memory.len(), 2);
        assert_eq!(until.as_deref(), Some(&b"d"[..]));
        let file = [Ok::<_, ()>((b"e".to_vec(), StoredValue::default()))];
        let stopped = merge(memory, until.as_deref(), file.into_iter(), |_, _| true).unwrap();
        assert!(stopped);
    }

    #[test]
    fn an_unresolved_put_takes_create_revision_and_version_from_the_record_below_it() {
        let put = record(0, 9, 0);
        assert!(is_unresolved(&put));
        // The key was absent: this put created it.
        assert_eq!(resolve(put.clone(), None), record(9, 9, 1));
        // It replaced a record: carried on from that one.
        assert_eq!(resolve(put.clone(), Some(&record(3, 5, 4))), record(3, 9, 5));
        // The file holds the put itself (flushed since): its copy says.
        assert_eq!(resolve(put.clone(), Some(&record(3, 9, 5))), record(3, 9, 5));
        // A resolved record is left alone.
        assert_eq!(resolve(record(2, 9, 7), Some(&record(3, 5, 4))), record(2, 9, 7));

        let mut event = Event {
            revision: 9,
            change: crate::proto::HistoryEvent {
                key: b"k".to_vec(),
                record: Some(put.clone()),
                prev_mod_revision: 0,
            },
        };
        assert!(is_unresolved_event(&event));
        resolve_event(&mut event, Some(&record(3, 5, 4)));
        assert_eq!(event.change.record, Some(record(3, 9, 5)));
        assert_eq!(event.change.prev_mod_revision, 5);
        assert!(!is_unresolved_event(&event));

        // A scan resolves memory's unresolved puts against the file's records.
        let mut mem = Memtable::new(header(8), 1);
        let mut layer = Layer::default();
        layer.insert(b"a".to_vec(), Some(record(0, 9, 0)));
        layer.insert(b"b".to_vec(), Some(record(0, 9, 0)));
        mem.commit(Applied {
            changes: layer,
            header: header(9),
            ..Default::default()
        });
        let (memory, until) = mem.collect_range(b"", b"", Bound::Unbounded, 0, usize::MAX);
        let file = [Ok::<_, ()>((b"a".to_vec(), record(3, 5, 4)))];
        let mut seen = Vec::new();
        merge(memory, until.as_deref(), file.into_iter(), |k, v| {
            seen.push((k, v));
            true
        })
        .unwrap();
        assert_eq!(
            seen,
            [(b"a".to_vec(), record(3, 9, 5)), (b"b".to_vec(), record(9, 9, 1))]
        );
    }

    #[test]
    fn sizes_follow_replacements() {
        let mut layer = Layer::default();
        layer.insert(b"k".to_vec(), value("12345"));
        let one = layer.bytes();
        layer.insert(b"k".to_vec(), value("1"));
        assert_eq!(layer.bytes(), one - 4);
    }
}
