//! The change history that watches read: every put and delete the state
//! machine applies, in revision order, each with the revision of the record
//! it replaced (so a watcher asking for `prev_kv` finds that record in the
//! history too).
//!
//! Recent changes are in memory with the batch that made them; a flush
//! writes them into the `history_chunks` table with the data, a chunk of
//! consecutive changes per record (about 64 KiB: one B-tree insert per
//! chunk, not per change), keyed by its first change's revision and place
//! within that revision, and drops the oldest beyond the retention. The first
//! revision still held (`history_start` in `meta`) is committed with them, so
//! a reader that finds its start below it knows the history was compacted,
//! and never reads around a gap.

use std::borrow::Cow;

use prost::Message as _;
use redb::{ReadTransaction, ReadableTable, TableDefinition};

use super::memtable;
use super::state_store::{open_existing, read_record, read_state_index, StateStore, KV, META};
use super::StorageError;
use crate::proto::HistoryEvent;
use crate::proto::{HistoryChunk, HistoryChunkRevisions, KeyRange, StoredValue};

pub(crate) const HISTORY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("history_chunks");
/// Where the release before chunks kept one record per change; dropped
/// when such a store is opened (see [`drop_unchunked`]).
pub(crate) const UNCHUNKED_HISTORY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("history");
/// A chunk closes at this many changes, or at [`CHUNK_BYTES`].
const CHUNK_EVENTS: usize = 256;
/// Rough bytes of changes per chunk.
const CHUNK_BYTES: usize = 64 << 10;
/// `meta` key: the first revision the history holds, big-endian u64.
pub(crate) const META_HISTORY_START: &str = "history_start";
/// `meta` key: bytes of history records held, big-endian u64.
pub(super) const META_HISTORY_BYTES: &str = "history_bytes";

/// How much history a node keeps: the oldest changes go once either is
/// passed (at the next flush).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Revisions behind the applied index.
    pub revisions: u64,
    /// Bytes of history records.
    pub bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            revisions: 1_000_000,
            bytes: 256 << 20,
        }
    }
}

/// One change, at its revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The revision (log index) of the change.
    pub revision: u64,
    /// The key, its new record (none: deleted) and the previous record's revision.
    pub change: HistoryEvent,
}

impl Event {
    /// Rough bytes it holds in memory (its value is shared with the
    /// layer's record, but counted here too: the flush thresholds were set
    /// by this count).
    pub fn cost(&self) -> usize {
        self.change.key.len() + self.change.record.as_ref().map_or(0, |r| r.value.len()) + 96
    }
}

/// What a watch wants: one key, or every key in a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Exactly this key.
    Key(Vec<u8>),
    /// Keys in this range.
    Range(KeyRange),
}

impl Filter {
    /// Whether `key` is watched.
    pub fn matches(&self, key: &[u8]) -> bool {
        match self {
            Filter::Key(k) => k == key,
            Filter::Range(r) => r.contains(key),
        }
    }
}

/// Changes read from the history, whole revisions only.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HistoryPage {
    /// The matching changes, oldest first.
    pub events: Vec<Event>,
    /// Every matching change up to this revision is in `events`: read on
    /// from the revision after it.
    pub until: u64,
    /// More may follow `until` already (the page was full).
    pub more: bool,
}

/// Why history can't be read from a revision.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The revision is older than the history held.
    #[error("revision {asked} is compacted: the oldest revision this node still has is {oldest}")]
    Compacted {
        /// The revision asked for.
        asked: u64,
        /// The first revision held.
        oldest: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StorageError),
}

/// The `history` table's key of the `n`th change at `revision`.
pub(super) fn history_key(revision: u64, n: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&revision.to_be_bytes());
    key[8..].copy_from_slice(&n.to_be_bytes());
    key
}

/// The changes of a history record, in order.
fn decode_chunk(bytes: &[u8]) -> Result<Vec<Event>, StorageError> {
    let chunk = HistoryChunk::decode(bytes).map_err(|e| damaged_history(format!("does not decode: {e}")))?;
    if chunk.revisions.len() != chunk.events.len() || chunk.events.is_empty() {
        return Err(damaged_history(format!(
            "holds {} revisions for {} changes",
            chunk.revisions.len(),
            chunk.events.len()
        )));
    }
    Ok(chunk
        .revisions
        .into_iter()
        .zip(chunk.events)
        .map(|(revision, change)| Event { revision, change })
        .collect())
}

/// The first and last revision of a history record, its changes skipped.
fn chunk_bounds(bytes: &[u8]) -> Result<(u64, u64), StorageError> {
    let chunk = HistoryChunkRevisions::decode(bytes).map_err(|e| damaged_history(format!("does not decode: {e}")))?;
    match (chunk.revisions.first(), chunk.revisions.last()) {
        (Some(&first), Some(&last)) => Ok((first, last)),
        _ => Err(damaged_history("holds no change")),
    }
}

/// Damage found in the history table, and what to do about it.
fn damaged_history(what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!(
        "state store: a history record {what}: state.redb is damaged; keep the data dir for inspection, remove \
         the node (`kvraft remove-node`) and add a fresh one under a new id"
    ))
}

/// A history record of `events` (a `HistoryChunk`, encoded without copying
/// the changes).
fn encode_chunk(events: &[Cow<'_, Event>]) -> Vec<u8> {
    use prost::encoding;
    let revisions: Vec<u64> = events.iter().map(|e| e.revision).collect();
    let mut buf = Vec::with_capacity(events.iter().map(|e| e.change.encoded_len() + 12).sum::<usize>() + 8);
    encoding::uint64::encode_packed(1, &revisions, &mut buf);
    for event in events {
        encoding::message::encode::<HistoryEvent>(2, &event.change, &mut buf);
    }
    buf
}

/// The key of the chunk to start reading at for changes from `revision`:
/// the last chunk that starts at or before its first change (it may begin
/// in an earlier chunk).
fn chunk_start(
    history: &impl ReadableTable<&'static [u8], &'static [u8]>,
    revision: u64,
) -> Result<Vec<u8>, StorageError> {
    let first = history_key(revision, 0);
    Ok(match history.range::<&[u8]>(..=&first[..])?.next_back() {
        Some(item) => item?.0.value().to_vec(),
        None => first.to_vec(),
    })
}

/// Every change from `revision` on (and before `until`), chunk by chunk:
/// `each` returns false to stop.
fn read_from(
    history: &impl ReadableTable<&'static [u8], &'static [u8]>,
    revision: u64,
    until: u64,
    mut each: impl FnMut(Event) -> bool,
) -> Result<(), StorageError> {
    let start = chunk_start(history, revision)?;
    for item in history.range::<&[u8]>(start.as_slice()..)? {
        let (_, value) = item?;
        for event in decode_chunk(value.value())? {
            if event.revision < revision {
                continue;
            }
            if event.revision >= until || !each(event) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// A `meta` counter (0 when unset).
pub(super) fn read_counter(txn: &ReadTransaction, name: &str) -> Result<u64, StorageError> {
    match txn.open_table(META) {
        Ok(meta) => counter(&meta, name),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// A `meta` counter of a table read or being written (0 when unset).
fn counter(meta: &impl ReadableTable<&'static str, &'static [u8]>, name: &str) -> Result<u64, StorageError> {
    Ok(meta
        .get(name)?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// Changes at most this many per page (then whole revisions to the end).
const PAGE_EVENTS: usize = 1000;
/// And about this many bytes.
const PAGE_BYTES: usize = 1 << 20;
/// And at most this many changes looked at (a watch of a rare key reads
/// past many that don't match: a page ends there, with its progress).
const PAGE_EXAMINED: usize = 20_000;

/// Collects a page: `take` returns false once full, after which only the
/// rest of the last revision is taken.
struct PageBuilder {
    page: HistoryPage,
    bytes: usize,
    examined: usize,
    full_at: Option<u64>,
}

impl PageBuilder {
    fn new() -> Self {
        PageBuilder {
            page: HistoryPage::default(),
            bytes: 0,
            examined: 0,
            full_at: None,
        }
    }

    /// Offers one event (one held elsewhere is copied only if it is
    /// taken); false once the page is complete.
    fn offer(&mut self, event: Cow<'_, Event>, filter: &Filter) -> bool {
        match self.admit(&event, filter) {
            Admit::Stop => false,
            Admit::Skip => true,
            Admit::Take => self.take(event.into_owned()),
        }
    }

    fn admit(&mut self, event: &Event, filter: &Filter) -> Admit {
        if let Some(last) = self.full_at {
            if event.revision != last {
                self.page.more = true;
                return Admit::Stop;
            }
        }
        self.examined += 1;
        if self.full_at.is_none() && self.examined >= PAGE_EXAMINED {
            self.full_at = Some(event.revision);
        }
        if filter.matches(&event.change.key) {
            Admit::Take
        } else {
            Admit::Skip
        }
    }

    fn take(&mut self, event: Event) -> bool {
        self.bytes += event.cost();
        let revision = event.revision;
        self.page.events.push(event);
        if self.full_at.is_none() && (self.page.events.len() >= PAGE_EVENTS || self.bytes >= PAGE_BYTES) {
            self.full_at = Some(revision);
        }
        true
    }
}

/// What a page does with an event offered.
enum Admit {
    /// The page is complete without it.
    Stop,
    /// Not watched.
    Skip,
    /// Watched: it goes in.
    Take,
}

impl StateStore {
    /// The changes matching `filter` from revision `from` on, a page at a
    /// time, as of the last applied batch.
    pub fn history(&self, from: u64, filter: &Filter) -> Result<HistoryPage, HistoryError> {
        // Memory's part and a read transaction of the file as of one moment.
        // Memory's matching part is copied under the lock the raft loop
        // waits on, so at most a page's worth of it.
        let (memory, memory_from, in_file, applied, txn) = {
            let mem = self.mem.read().expect("memtable lock poisoned");
            let memory_from = mem.events_from(from).next().map_or(u64::MAX, |e| e.revision);
            let mut memory = PageBuilder::new();
            for event in mem.events_from(from) {
                if !memory.offer(Cow::Borrowed(event), filter) {
                    break;
                }
            }
            // Every change after the durable index is still in memory (the
            // frozen layer is dropped only after the index moves on): a
            // watcher that is current has nothing to read in the file.
            let in_file = from <= self.durable_index();
            (
                memory,
                memory_from,
                in_file,
                mem.applied_index(),
                self.db()?.begin_read().map_err(StorageError::from)?,
            )
        };
        let oldest = read_counter(&txn, META_HISTORY_START)?.max(1);
        if from < oldest {
            return Err(HistoryError::Compacted { asked: from, oldest });
        }
        let mut memory = memory;
        resolve_events(&txn, memory.page.events.iter_mut())?;
        // The file holds what memory no longer does: stop where memory's
        // part begins, so a change just flushed is not read twice.
        let mut builder = PageBuilder::new();
        'file: {
            if !in_file {
                break 'file;
            }
            let table = match txn.open_table(HISTORY) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => break 'file,
                Err(e) => return Err(StorageError::from(e).into()),
            };
            read_from(&table, from, memory_from, |event| {
                builder.offer(Cow::Owned(event), filter)
            })?;
        }
        if !builder.page.more {
            for event in memory.page.events {
                if !builder.offer(Cow::Owned(event), filter) {
                    break;
                }
            }
        }
        if !builder.page.more && memory.page.more {
            // Memory held more than was copied: the page ends where the
            // copy did, every change up to there looked at.
            builder.page.more = true;
            builder.full_at = memory.full_at;
        }
        let mut page = builder.page;
        page.until = match (page.more, builder.full_at) {
            // Every change up to the end of that revision was looked at.
            (true, Some(last)) => last,
            _ => applied.max(from.saturating_sub(1)),
        };
        Ok(page)
    }

    /// The record `key` had at `revision`, if the history still holds that
    /// change.
    pub fn history_record(&self, revision: u64, key: &[u8]) -> Result<Option<StoredValue>, StorageError> {
        Ok(self.history_records(&[(revision, key)])?.pop().flatten())
    }

    /// The records keys had at revisions (for a watcher's `prev_kv`: each
    /// `(revision, key)` asked, in order), where the history still holds
    /// that change. Chunks are read once each for the whole call.
    pub fn history_records(&self, wanted: &[(u64, &[u8])]) -> Result<Vec<Option<StoredValue>>, StorageError> {
        // Per key asked: the change memory holds (perhaps unresolved), or
        // `None` to read the file's history.
        let mut found: Vec<Option<Option<Event>>> = vec![None; wanted.len()];
        let txn = {
            let mem = self.mem.read().expect("memtable lock poisoned");
            for (i, (revision, key)) in wanted.iter().enumerate() {
                if *revision == 0 {
                    // The key did not exist before.
                    found[i] = Some(None);
                } else if let Some(e) = mem
                    .events_from(*revision)
                    .take_while(|e| e.revision == *revision)
                    .find(|e| e.change.key == *key)
                {
                    found[i] = Some(Some(e.clone()));
                }
            }
            let unresolved = found.iter().flatten().flatten().any(memtable::is_unresolved_event);
            if found.iter().all(Option::is_some) && !unresolved {
                return Ok(found
                    .into_iter()
                    .map(|e| e.flatten().and_then(|e| e.change.record))
                    .collect());
            }
            self.db()?.begin_read()?
        };
        resolve_events(&txn, found.iter_mut().flatten().flatten())?;
        let table = open_existing(&txn, HISTORY)?;
        let mut records: Vec<Option<StoredValue>> = Vec::with_capacity(wanted.len());
        let mut left = Vec::new();
        for (i, event) in found.into_iter().enumerate() {
            match event {
                Some(event) => records.push(event.and_then(|e| e.change.record)),
                None => {
                    records.push(None);
                    left.push(i);
                }
            }
        }
        if let Some(table) = &table {
            // In revision order, so each chunk is decoded once and the cache
            // needs only the few around the revision being looked up.
            left.sort_by_key(|&i| wanted[i].0);
            let mut chunks = ChunkCache::default();
            for i in left {
                let (revision, key) = wanted[i];
                records[i] = chunks.find(table, revision, key)?;
            }
        }
        Ok(records)
    }
}

/// Resolves `events` that memory held unresolved (see
/// [`memtable::is_unresolved`]) against `txn`, a view of the file taken
/// with them: from the record each replaced, or, where the file holds the
/// event's own flush already, from its resolved copy in the history.
pub(super) fn resolve_events<'a>(
    txn: &ReadTransaction,
    events: impl IntoIterator<Item = &'a mut Event>,
) -> Result<(), StorageError> {
    let mut events = events
        .into_iter()
        .filter(|e| memtable::is_unresolved_event(e))
        .peekable();
    if events.peek().is_none() {
        return Ok(());
    }
    let flushed = read_state_index(txn)?;
    let kv = open_existing(txn, KV)?;
    let history = open_existing(txn, HISTORY)?;
    let mut chunks = ChunkCache::default();
    for event in events {
        if event.revision <= flushed {
            if let Some(table) = &history {
                if let Some(copy) = chunks.find_event(table, event.revision, &event.change.key)? {
                    *event = copy;
                    continue;
                }
            }
        }
        let below = read_record(kv.as_ref(), &event.change.key)?;
        if event.revision <= flushed && below.as_ref().is_none_or(|b| b.mod_revision != event.revision) {
            // Flushed, and dropped from the history at once by a retention
            // shorter than a flush, then changed again: what it replaced is
            // gone from the file. Said as a create, the one guess left.
            memtable::resolve_event(event, None);
            continue;
        }
        // Before the flush: the record it replaced. After: its own copy
        // (the revision it replaced stays unknown: 0).
        memtable::resolve_event(event, below.as_ref());
        if event.revision <= flushed {
            event.change.prev_mod_revision = 0;
        }
    }
    Ok(())
}

/// The chunks decoded last during one call, by key: lookups come in
/// revision order, so a few suffice, and the oldest goes first.
#[derive(Default)]
struct ChunkCache {
    decoded: std::collections::VecDeque<(Vec<u8>, Vec<Event>)>,
}

impl ChunkCache {
    const MAX: usize = 4;

    fn get(
        &mut self,
        history: &impl ReadableTable<&'static [u8], &'static [u8]>,
        key: &[u8],
    ) -> Result<&[Event], StorageError> {
        let at = match self.decoded.iter().position(|(k, _)| k == key) {
            Some(at) => at,
            None => {
                if self.decoded.len() >= Self::MAX {
                    self.decoded.pop_front();
                }
                let events = match history.get(key)? {
                    Some(value) => decode_chunk(value.value())?,
                    None => Vec::new(),
                };
                self.decoded.push_back((key.to_vec(), events));
                self.decoded.len() - 1
            }
        };
        Ok(&self.decoded[at].1)
    }

    /// The record `key` got at `revision`, if the history holds it.
    fn find(
        &mut self,
        history: &impl ReadableTable<&'static [u8], &'static [u8]>,
        revision: u64,
        key: &[u8],
    ) -> Result<Option<StoredValue>, StorageError> {
        Ok(self.find_event(history, revision, key)?.and_then(|e| e.change.record))
    }

    /// The change of `key` at `revision`, if the history holds it.
    fn find_event(
        &mut self,
        history: &impl ReadableTable<&'static [u8], &'static [u8]>,
        revision: u64,
        key: &[u8],
    ) -> Result<Option<Event>, StorageError> {
        let mut chunk = chunk_start(history, revision)?;
        loop {
            for event in self.get(history, &chunk)? {
                if event.revision > revision {
                    return Ok(None);
                }
                if event.revision == revision && event.change.key == key {
                    return Ok(Some(event.clone()));
                }
            }
            // The revision may go on in the next chunk.
            let next = history
                .range::<&[u8]>((std::ops::Bound::Excluded(chunk.as_slice()), std::ops::Bound::Unbounded))?
                .next();
            match next {
                Some(item) => chunk = item?.0.value().to_vec(),
                None => return Ok(None),
            }
        }
    }
}

/// Drops the history table of a release before chunks (one record per
/// change): its history is given up once, and starts after `applied`, as a
/// store's without history does. Returns whether there was one.
pub(super) fn drop_unchunked(db: &redb::Database, applied: u64) -> Result<bool, StorageError> {
    let txn = db.begin_write()?;
    if !txn.delete_table(UNCHUNKED_HISTORY)? {
        return Ok(false);
    }
    // Chunks from anything before would now sit behind the new start.
    txn.delete_table(HISTORY)?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(META_HISTORY_START, &(applied + 1).to_be_bytes()[..])?;
        meta.insert(META_HISTORY_BYTES, &0u64.to_be_bytes()[..])?;
    }
    txn.commit()?;
    Ok(true)
}

/// Writes `events` into the history table of `txn` and drops the oldest
/// beyond `retention` at `applied`; updates the counters in `meta`. Returns
/// the first revision the history then holds.
pub(super) fn write_events<'a>(
    txn: &redb::WriteTransaction,
    events: impl IntoIterator<Item = Cow<'a, Event>>,
    applied: u64,
    retention: Retention,
) -> Result<u64, StorageError> {
    let mut meta = txn.open_table(META)?;
    let mut start = counter(&meta, META_HISTORY_START)?;
    let mut bytes = counter(&meta, META_HISTORY_BYTES)?;
    let mut history = txn.open_table(HISTORY)?;
    // Every change of a revision is in one batch, so one flush: places
    // within a revision count from 0 here.
    let mut previous: Option<(u64, u32)> = None;
    let mut chunk: Vec<Cow<'a, Event>> = Vec::new();
    let mut chunk_key = [0u8; 12];
    let mut chunk_bytes = 0;
    let mut events = events.into_iter().peekable();
    while let Some(event) = events.next() {
        let n = match previous {
            Some((revision, n)) if revision == event.revision => n + 1,
            _ => 0,
        };
        previous = Some((event.revision, n));
        if chunk.is_empty() {
            chunk_key = history_key(event.revision, n);
        }
        chunk_bytes += event.cost();
        chunk.push(event);
        if chunk.len() >= CHUNK_EVENTS || chunk_bytes >= CHUNK_BYTES || events.peek().is_none() {
            let value = encode_chunk(&chunk);
            bytes += value.len() as u64;
            if history.insert(&chunk_key[..], value.as_slice())?.is_some() {
                return Err(damaged_history(format!(
                    "already exists at revision {} (the applied index went back, or the history table is damaged)",
                    u64::from_be_bytes(chunk_key[..8].try_into().expect("8 bytes"))
                )));
            }
            chunk.clear();
            chunk_bytes = 0;
        }
    }
    // Whole revisions go, oldest first, so a watcher never sees half of one:
    // everything below `drop_below`, which rises past the oldest revisions
    // left while the bytes are over their cap. A chunk that straddles it
    // is written again with the part that stays.
    let mut drop_below = applied.saturating_sub(retention.revisions).saturating_add(1);
    let mut dropped = false;
    loop {
        // Only the chunk's revisions are decoded: most chunks go whole, and
        // their changes are never looked at.
        let (key, len, first, last) = {
            let Some((key, value)) = history.first()? else { break };
            let (first, last) = chunk_bounds(value.value())?;
            (key.value().to_vec(), value.value().len(), first, last)
        };
        if first >= drop_below {
            if bytes <= retention.bytes {
                break;
            }
            drop_below = last + 1;
        }
        let removed = history.remove(key.as_slice())?;
        bytes = bytes.saturating_sub(len as u64);
        dropped = true;
        if last < drop_below {
            continue;
        }
        // The chunk began below drop_below and ends above it: what stays
        // (it starts a revision) is written again.
        let events = decode_chunk(removed.expect("the chunk was just read").value())?;
        let rest: Vec<Cow<'_, Event>> = events
            .iter()
            .filter(|e| e.revision >= drop_below)
            .map(Cow::Borrowed)
            .collect();
        let value = encode_chunk(&rest);
        bytes += value.len() as u64;
        history.insert(&history_key(rest[0].revision, 0)[..], value.as_slice())?;
    }
    if dropped {
        start = start.max(drop_below);
    }
    meta.insert(META_HISTORY_START, &start.to_be_bytes()[..])?;
    meta.insert(META_HISTORY_BYTES, &bytes.to_be_bytes()[..])?;
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_written_twice_at_one_revision_is_reported_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("h.redb")).unwrap();
        let event = Event {
            revision: 7,
            change: HistoryEvent {
                key: b"k".to_vec(),
                record: None,
                prev_mod_revision: 3,
            },
        };
        let txn = db.begin_write().unwrap();
        write_events(&txn, [Cow::Borrowed(&event)], 7, Retention::default()).unwrap();
        match write_events(&txn, [Cow::Owned(event)], 7, Retention::default()) {
            Err(StorageError::Corrupt(why)) => {
                assert!(
                    why.contains("revision 7") && why.contains("kvraft remove-node"),
                    "{why}"
                )
            }
            other => panic!("a second record at revision 7 must not replace the first: {other:?}"),
        }
    }
}
