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

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

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
    /// How it changed the number of keys.
    pub keys_added: i64,
}

/// A key's newest record, or `None` for a delete.
pub type Change = Option<StoredValue>;

/// A key with its change.
pub type KeyedChange = (Vec<u8>, Change);

/// Bytes a change costs in memory, roughly: key, value and the map's own
/// overhead. Used to decide when to flush, not for exact accounting.
fn cost(key: &[u8], change: &Change) -> usize {
    key.len() + change.as_ref().map_or(0, |v| v.value.len()) + 96
}

/// Sorted changes with their rough size in memory.
#[derive(Debug, Default)]
pub struct Layer {
    changes: BTreeMap<Vec<u8>, Change>,
    bytes: usize,
}

impl Layer {
    /// Records `change` for `key`, replacing an older one.
    pub fn insert(&mut self, key: Vec<u8>, change: Change) {
        self.bytes += cost(&key, &change);
        if let Some(old) = self.changes.get(&key) {
            self.bytes -= cost(&key, old);
        }
        self.changes.insert(key, change);
    }

    /// The change recorded for `key`, if any.
    pub fn get(&self, key: &[u8]) -> Option<&Change> {
        self.changes.get(key)
    }

    /// Every change, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Change)> {
        self.changes.iter()
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
            self.insert(key, change);
        }
    }

    /// The changes of keys in `[start, end)`, in key order.
    pub fn range<'a>(&'a self, start: &[u8], end: Bound<&'a [u8]>) -> impl Iterator<Item = (&'a Vec<u8>, &'a Change)> {
        self.changes.range::<[u8], _>((Bound::Included(start), end))
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
    /// Keys held, counting memory and file together.
    keys: u64,
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
            keys,
            generation: 0,
        }
    }

    /// The client sessions as of the last applied batch.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The newest change to `key` held in memory (`None`: look in the file).
    pub fn lookup(&self, key: &[u8]) -> Option<&Change> {
        self.active
            .get(key)
            .or_else(|| self.frozen.as_ref().and_then(|f| f.layer.get(key)))
    }

    /// Adds a committed batch.
    pub fn commit(&mut self, batch: Applied) {
        self.active.absorb(batch.changes);
        self.active_event_bytes += batch.events.iter().map(Event::cost).sum::<usize>();
        self.active_events.extend(batch.events);
        self.active_leases.absorb(batch.leases);
        self.header = batch.header;
        self.sessions.apply_delta(batch.sessions);
        self.keys = self.keys.saturating_add_signed(batch.keys_added);
    }

    /// Keys held.
    pub fn keys(&self) -> u64 {
        self.keys
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

    /// Drops the frozen layer once the file holds it.
    pub fn flushed(&mut self) {
        self.frozen = None;
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
            collected.push((key.clone(), change.clone()));
        }
    }
}

/// Merges changes collected from memory (see [`Memtable::collect_range`])
/// with the file's records of the same range, in key order: memory's change
/// wins, deletes hide the file's record. Stops at `known_until` (memory past
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
                    file.next();
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
                Some((key, Some(value))) => (key, value),
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

    fn value(v: &str) -> Change {
        Some(StoredValue {
            value: v.as_bytes().to_vec(),
            ..Default::default()
        })
    }

    fn header(index: u64) -> SnapshotHeader {
        SnapshotHeader {
            index,
            ..Default::default()
        }
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
                    value: v.as_bytes().to_vec(),
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
                String::from_utf8(v.value).unwrap()
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
        mem.flushed();
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
    fn sizes_follow_replacements() {
        let mut layer = Layer::default();
        layer.insert(b"k".to_vec(), value("12345"));
        let one = layer.bytes();
        layer.insert(b"k".to_vec(), value("1"));
        assert_eq!(layer.bytes(), one - 4);
    }
}
