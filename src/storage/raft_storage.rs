//! `raft::Storage` over raft-engine (the log, HardState and log bounds) and
//! the state store (snapshots for followers are views of it).
//!
//! Invariants:
//! - The log holds the entries `(truncated_index, last_index]`; `truncated_index`
//!   and its term are persisted with every compaction and snapshot install.
//! - The store's durable applied index is `>= truncated_index`: the log is
//!   compacted only behind it, keeping a catch-up tail for slow followers, so
//!   a restart replays the entries after the store's applied index.
//! - The ConfState raft starts from is the store's, as of its applied index.

use std::path::Path;
use std::sync::{Arc, RwLock};

use prost::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use raft_engine::{Command, Engine, LogBatch, MessageExt, ReadableSize};

use super::{StateStore, StorageError};
use crate::proto::SnapshotDescriptor;

/// raft-engine can hold many raft groups; kvraft has one.
const GROUP: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_TRUNCATED: &[u8] = b"truncated";
/// The log's own directory under the data dir.
pub const LOG_DIR: &str = "raft-log";

/// Tells raft-engine how to find an entry's index.
#[derive(Clone)]
struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

#[derive(Debug, Default)]
struct LogState {
    hard_state: HardState,
    truncated_index: u64,
    truncated_term: u64,
    /// The membership raft starts from (the store's, at open).
    conf_state: ConfState,
    /// Terms of the entries appended since open.
    terms: TermRuns,
}

/// The terms of the log's newest entries, kept in memory: raft asks for
/// terms all the time (each append it sends or checks), and raft-engine can
/// only answer by reading the entry back from its file.
#[derive(Debug, Default)]
struct TermRuns {
    /// Entries `from..=until` are covered (none when `until < from`).
    from: u64,
    until: u64,
    /// (first index, term) of each run of one term, ascending.
    runs: Vec<(u64, u64)>,
}

impl TermRuns {
    /// Nothing covered: the log's next entry will be `next`.
    fn starting_at(next: u64) -> Self {
        TermRuns {
            from: next,
            until: next - 1,
            runs: Vec::new(),
        }
    }

    /// Entries `entries` (contiguous) were written, replacing any from
    /// their first index on.
    fn appended(&mut self, entries: &[Entry]) {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return;
        };
        if first.index < self.from || first.index > self.until + 1 {
            *self = TermRuns::starting_at(first.index);
        }
        let keep = self.runs.partition_point(|&(start, _)| start < first.index);
        self.runs.truncate(keep);
        for e in entries {
            if self.runs.last().is_none_or(|&(_, term)| term != e.term) {
                self.runs.push((e.index, e.term));
            }
        }
        self.until = last.index;
    }

    /// The term of entry `index` (at most the log's last), if covered.
    fn term(&self, index: u64) -> Option<u64> {
        if index < self.from || index > self.until {
            return None;
        }
        let at = self.runs.partition_point(|&(start, _)| start <= index);
        at.checked_sub(1).map(|i| self.runs[i].1)
    }

    /// Entries up to `index` are gone: runs that end by then go too.
    fn compacted_to(&mut self, index: u64) {
        let gone = self
            .runs
            .partition_point(|&(start, _)| start <= index + 1)
            .saturating_sub(1);
        self.runs.drain(..gone);
    }
}

/// The durable raft state of one node. Cheap to clone: clones share state.
#[derive(Clone)]
pub struct RaftStorage {
    engine: Arc<Engine>,
    state: Arc<RwLock<LogState>>,
    /// Where snapshots for followers come from.
    store: Option<Arc<StateStore>>,
}

impl RaftStorage {
    /// Opens the log under `data_dir`, cutting off a torn tail (a write a
    /// crash interrupted, never acknowledged).
    pub fn open(data_dir: &Path) -> Result<Self, StorageError> {
        let log_dir = data_dir.join(LOG_DIR);
        super::fs_util::create_private_dir(&log_dir)?;
        // Before raft-engine may cut anything: only a torn last write may go.
        super::log_check::check_newest_files(&log_dir).map_err(|e| {
            StorageError::Corrupt(format!(
                "{e}; this node can't trust its log: keep the data dir for inspection, remove the node \
                 (`kvraft remove-node`) and add a fresh one under a new id"
            ))
        })?;
        let config = raft_engine::Config {
            dir: log_dir.to_string_lossy().into_owned(),
            // Keep files small enough that compaction frees disk soon.
            target_file_size: ReadableSize::mb(32),
            purge_threshold: ReadableSize::mb(256),
            ..Default::default()
        };
        let engine = Arc::new(Engine::open(config)?);
        let hard_state: HardState = engine.get_message(GROUP, KEY_HARD_STATE)?.unwrap_or_default();
        let truncated: SnapshotMetadata = engine.get_message(GROUP, KEY_TRUNCATED)?.unwrap_or_default();
        let next = last_index(&engine, truncated.index) + 1;
        Ok(RaftStorage {
            engine,
            state: Arc::new(RwLock::new(LogState {
                hard_state,
                truncated_index: truncated.index,
                truncated_term: truncated.term,
                conf_state: ConfState::default(),
                terms: TermRuns::starting_at(next),
            })),
            store: None,
        })
    }

    /// Serves snapshots from `store`, and starts raft from `conf_state` (the
    /// store's, as of its applied index).
    pub fn attach_store(&mut self, store: Arc<StateStore>, conf_state: ConfState) {
        self.write_state().conf_state = conf_state;
        self.store = Some(store);
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, LogState> {
        self.state.read().expect("storage lock poisoned")
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, LogState> {
        self.state.write().expect("storage lock poisoned")
    }

    /// The index and term the log starts after.
    pub fn truncated(&self) -> (u64, u64) {
        let st = self.read_state();
        (st.truncated_index, st.truncated_term)
    }

    /// Reads every entry in the log, so damage is found at start and not when
    /// raft needs the entry: an entry that fails its checksum is corruption.
    pub fn verify_entries(&self) -> Result<(), StorageError> {
        let (first, last) = {
            let st = self.read_state();
            (st.truncated_index + 1, self.last_index_locked(&st))
        };
        let mut low = first;
        while low <= last {
            let high = (low + 1024).min(last + 1);
            let mut entries = Vec::new();
            self.engine
                .fetch_entries_to::<EntryExt>(GROUP, low, high, None, &mut entries)
                .map_err(|e| {
                    StorageError::Corrupt(format!(
                        "the raft log entries {low}..{high} can't be read ({e}): the log is damaged"
                    ))
                })?;
            if entries.len() as u64 != high - low {
                return Err(StorageError::Corrupt(format!(
                    "the raft log is missing entries between {low} and {high}: the log is damaged"
                )));
            }
            low = high;
        }
        Ok(())
    }

    /// Makes the log start after `(index, term)`: empties it, in one fsynced
    /// batch (a new cluster's start, or a snapshot install).
    pub fn start_at(&self, index: u64, term: u64) -> Result<(), StorageError> {
        let mut st = self.write_state();
        let mut hs = st.hard_state.clone();
        hs.commit = hs.commit.max(index);
        hs.term = hs.term.max(term);
        let mut truncated = SnapshotMetadata::default();
        truncated.index = index;
        truncated.term = term;

        let mut batch = LogBatch::default();
        batch.add_command(GROUP, Command::Clean);
        batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &hs)?;
        batch.put_message(GROUP, KEY_TRUNCATED.to_vec(), &truncated)?;
        self.engine.write(&mut batch, true)?;
        st.hard_state = hs;
        st.truncated_index = index;
        st.truncated_term = term;
        st.terms = TermRuns::starting_at(index + 1);
        Ok(())
    }

    /// Appends entries (truncating any conflicting suffix) and stores the
    /// HardState in one write, fsynced when `sync`.
    pub fn append(&self, entries: &[Entry], hard_state: Option<&HardState>, sync: bool) -> Result<(), StorageError> {
        let mut batch = LogBatch::default();
        if !entries.is_empty() {
            batch.add_entries::<EntryExt>(GROUP, entries)?;
        }
        // A change of the commit index alone (no entries, sync not needed)
        // stays in memory: written unsynced, it could outlive an earlier
        // unsynced write after a power loss and look like mid-file damage to
        // the log check. A restart raises commit to the store's applied index
        // and learns the rest from the leader.
        let commit_only = entries.is_empty() && !sync;
        if let Some(hs) = hard_state.filter(|_| !commit_only) {
            batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), hs)?;
        }
        if batch.is_empty() {
            if let Some(hs) = hard_state {
                self.write_state().hard_state = hs.clone();
            }
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.engine.write(&mut batch, sync)?;
        if sync {
            crate::metrics::observe(crate::metrics::WAL_FSYNC_DURATION, started.elapsed());
        }
        // The terms follow the log once it is written. Between the two a
        // term() from another thread could see the old term of an index
        // just overwritten; none does: raft, and every caller of append and
        // term, runs on the raft thread.
        let mut st = self.write_state();
        st.terms.appended(entries);
        if let Some(hs) = hard_state {
            st.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Records a newer commit index (from a `LightReady`), in memory only (see
    /// [`RaftStorage::append`]): losing it only means learning it again.
    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.read_state().hard_state.clone();
        if commit <= hs.commit {
            return Ok(());
        }
        hs.commit = commit;
        self.append(&[], Some(&hs), false)
    }

    /// Compacts the log up to `index`: the store is durable past it, so
    /// neither a restart nor a follower within the kept tail needs the
    /// entries up to it.
    pub fn compact_to(&self, index: u64) -> Result<(), StorageError> {
        let truncated_index = self.read_state().truncated_index;
        if index <= truncated_index {
            return Ok(());
        }
        let term =
            raft::Storage::term(self, index).map_err(|e| StorageError::Corrupt(format!("term of {index}: {e}")))?;
        let mut truncated = SnapshotMetadata::default();
        truncated.index = index;
        truncated.term = term;
        let mut batch = LogBatch::default();
        batch.add_command(GROUP, Command::Compact { index: index + 1 });
        batch.put_message(GROUP, KEY_TRUNCATED.to_vec(), &truncated)?;
        self.engine.write(&mut batch, true)?;
        {
            let mut st = self.write_state();
            st.truncated_index = index;
            st.truncated_term = term;
            st.terms.compacted_to(index);
        }
        // Old log files are deleted only by a purge pass.
        self.engine.purge_expired_files()?;
        Ok(())
    }

    /// Raises the persisted commit index to `index` (entries the store has
    /// applied were committed, whatever an unsynced HardState says).
    pub fn raise_commit(&self, index: u64) -> Result<(), StorageError> {
        let mut hs = self.hard_state();
        if index <= hs.commit {
            return Ok(());
        }
        hs.commit = index;
        self.append(&[], Some(&hs), true)
    }

    /// The persisted HardState.
    pub fn hard_state(&self) -> HardState {
        self.read_state().hard_state.clone()
    }

    fn last_index_locked(&self, st: &LogState) -> u64 {
        last_index(&self.engine, st.truncated_index)
    }
}

/// The log's last index: its last entry's, or the index it was truncated
/// at when it holds none after that.
fn last_index(engine: &Engine, truncated_index: u64) -> u64 {
    engine.last_index(GROUP).unwrap_or(0).max(truncated_index)
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.read_state();
        Ok(RaftState::new(st.hard_state.clone(), st.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let st = self.read_state();
        if low <= st.truncated_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        let last = self.last_index_locked(&st);
        if high > last + 1 {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        let mut entries = Vec::with_capacity((high - low) as usize);
        let max_size = max_size.into().map(|m| m as usize);
        self.engine
            .fetch_entries_to::<EntryExt>(GROUP, low, high, max_size, &mut entries)
            .map_err(|e| match e {
                raft_engine::Error::EntryCompacted => raft::Error::Store(RaftStorageError::Compacted),
                other => raft::Error::Store(RaftStorageError::Other(Box::new(other))),
            })?;
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let st = self.read_state();
        if idx == st.truncated_index {
            return Ok(st.truncated_term);
        }
        if idx < st.truncated_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if let Some(term) = st.terms.term(idx) {
            return Ok(term);
        }
        match self.engine.get_entry::<EntryExt>(GROUP, idx) {
            Ok(Some(e)) => Ok(e.term),
            Ok(None) => Err(raft::Error::Store(RaftStorageError::Unavailable)),
            Err(e) => Err(raft::Error::Store(RaftStorageError::Other(Box::new(e)))),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read_state().truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        let st = self.read_state();
        Ok(self.last_index_locked(&st))
    }

    /// A snapshot for follower `to`: a view of the store pinned now, which
    /// the transport streams; the message itself carries only metadata.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable);
        let Some(store) = &self.store else {
            return Err(unavailable());
        };
        // raft-rs treats any other error here as fatal (a panic): a store
        // that can't give a view now is logged, and raft asks again later.
        let pinned = store
            .pin_for(to)
            .and_then(|header| Ok((crate::state_machine::StateMeta::from_header(&header)?, header)));
        let (meta, header) = match pinned {
            Ok(pinned) => pinned,
            Err(e) => {
                ::metrics::counter!(crate::metrics::SNAPSHOT_FAILURES, "kind" => "create").increment(1);
                tracing::error!(error = %e, to, "no snapshot view for a follower");
                return Err(unavailable());
            }
        };
        // A node only accepts a snapshot whose membership includes it; a node
        // being added is in it once the change is applied.
        let usable = header.index >= request_index
            && header.index >= self.read_state().truncated_index
            && crate::state_machine::conf_ids(meta.conf_state()).any(|id| id == to);
        if !usable {
            // The file lags what is applied by up to a flush: ask for one,
            // so raft's next try finds the member (or index) it needs.
            store.unpin(to);
            store.request_flush();
            return Err(unavailable());
        }
        ::metrics::counter!(crate::metrics::SNAPSHOTS, "kind" => "created").increment(1);
        let mut snapshot = Snapshot::default();
        snapshot.data = SnapshotDescriptor {
            cluster_id: header.cluster_id,
        }
        .encode_to_vec()
        .into();
        let metadata = snapshot.mut_metadata();
        metadata.index = header.index;
        metadata.term = header.term;
        metadata.set_conf_state(meta.conf_state().clone());
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = format!("e{index}t{term}").into_bytes().into();
        e
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|i| entry(i, term)).collect()
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        let mut h = HardState::default();
        h.term = term;
        h.vote = vote;
        h.commit = commit;
        h
    }

    fn open(dir: &Path) -> RaftStorage {
        RaftStorage::open(dir).unwrap()
    }

    fn all(s: &RaftStorage) -> Vec<(u64, u64)> {
        let (first, last) = (s.first_index().unwrap(), s.last_index().unwrap());
        s.entries(first, last + 1, None, GetEntriesContext::empty(false))
            .unwrap()
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    #[test]
    fn appends_and_reads_entries_and_hard_state_back_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
            s.append(&entries(1..=5, 1), Some(&hs(1, 2, 3)), true).unwrap();
            assert_eq!(all(&s).len(), 5);
            assert_eq!(s.term(4).unwrap(), 1);
        }
        let s = open(dir.path());
        assert_eq!(all(&s), (1..=5).map(|i| (i, 1)).collect::<Vec<_>>());
        let state = s.initial_state().unwrap();
        assert_eq!(state.hard_state, hs(1, 2, 3));
        let e = s.entries(3, 4, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(&e[0].data[..], b"e3t1");
    }

    #[test]
    fn a_commit_index_alone_stays_in_memory_and_comes_back_with_the_next_synced_write() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(&entries(1..=5, 1), Some(&hs(1, 1, 2)), true).unwrap();
            s.set_commit(5).unwrap();
            assert_eq!(s.hard_state().commit, 5);
        }
        // Never written unsynced (so never a lone record a power loss could
        // leave behind a lost one): the restart has the synced commit index.
        let s = open(dir.path());
        assert_eq!(s.hard_state().commit, 2);
        s.raise_commit(5).unwrap();
        drop(s);
        assert_eq!(open(dir.path()).hard_state().commit, 5);
    }

    #[test]
    fn a_conflicting_append_truncates_the_old_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.append(&entries(1..=10, 1), None, true).unwrap();
        s.append(&entries(6..=7, 2), None, true).unwrap();
        let expect: Vec<(u64, u64)> = (1..=5).map(|i| (i, 1)).chain([(6, 2), (7, 2)]).collect();
        assert_eq!(all(&s), expect);
        drop(s);
        assert_eq!(all(&open(dir.path())), expect, "truncation survives a restart");
    }

    /// Every term as raft sees it, checked against the entries read back
    /// from raft-engine (what the in-memory terms stand in for).
    fn terms_agree_with_the_log(s: &RaftStorage) -> usize {
        let (first, last) = (s.first_index().unwrap(), s.last_index().unwrap());
        for (index, term) in all(s) {
            assert_eq!(s.term(index).unwrap(), term, "term of entry {index}");
        }
        assert!(s.term(last + 1).is_err(), "no term past the last entry");
        if first > 1 {
            assert_eq!(s.term(first - 1).unwrap(), s.truncated().1);
        }
        (last + 1 - first) as usize
    }

    #[test]
    fn terms_kept_in_memory_follow_appends_conflicts_compaction_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.append(&entries(1..=10, 1), None, true).unwrap();
        s.append(&entries(11..=20, 2), None, true).unwrap();
        assert_eq!(terms_agree_with_the_log(&s), 20);
        // A new leader overwrites a suffix that spans two terms.
        s.append(&entries(8..=12, 3), None, true).unwrap();
        assert_eq!(terms_agree_with_the_log(&s), 12);
        assert_eq!(s.term(9).unwrap(), 3);
        s.append(&entries(13..=30, 3), None, true).unwrap();
        s.append(&entries(31..=31, 4), None, true).unwrap();
        s.compact_to(12).unwrap();
        assert_eq!(terms_agree_with_the_log(&s), 19);
        drop(s);
        // After a restart the old entries' terms come from the file, new
        // ones from memory, and an overwrite reaching below both works.
        let s = open(dir.path());
        assert_eq!(terms_agree_with_the_log(&s), 19);
        s.append(&entries(32..=35, 4), None, true).unwrap();
        s.append(&entries(20..=22, 5), None, true).unwrap();
        assert_eq!(terms_agree_with_the_log(&s), 10);
        s.start_at(100, 6).unwrap();
        assert!(s.term(50).is_err());
        s.append(&entries(101..=102, 6), None, true).unwrap();
        assert_eq!(terms_agree_with_the_log(&s), 2);
    }

    #[test]
    fn entries_respect_max_size_but_return_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.append(&entries(1..=10, 1), None, true).unwrap();
        let one = s.entries(1, 11, Some(1), GetEntriesContext::empty(false)).unwrap();
        assert_eq!(one.len(), 1);
        assert!(matches!(
            s.entries(1, 12, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(RaftStorageError::Unavailable))
        ));
    }

    #[test]
    fn compaction_keeps_the_tail_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(&entries(1..=100, 3), Some(&hs(3, 1, 90)), true).unwrap();
            s.compact_to(70).unwrap();
            assert_eq!(s.first_index().unwrap(), 71);
            assert_eq!(s.term(70).unwrap(), 3, "term of the truncation point is kept");
            assert!(matches!(
                s.term(69),
                Err(raft::Error::Store(RaftStorageError::Compacted))
            ));
            assert!(matches!(
                s.entries(50, 60, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(RaftStorageError::Compacted))
            ));
            s.compact_to(60).unwrap();
            assert_eq!(s.first_index().unwrap(), 71, "never backwards");
        }
        let s = open(dir.path());
        assert_eq!(s.first_index().unwrap(), 71);
        assert_eq!(s.last_index().unwrap(), 100);
        assert_eq!(s.truncated(), (70, 3));
        s.verify_entries().unwrap();
    }

    #[test]
    fn without_a_store_raft_is_told_to_wait_for_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        assert!(matches!(
            s.snapshot(0, 2),
            Err(raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable))
        ));
    }

    #[test]
    fn starting_at_a_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(&entries(1..=10, 1), Some(&hs(1, 0, 5)), true).unwrap();
            s.start_at(50, 4).unwrap();
            assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (51, 50));
            assert_eq!(s.term(50).unwrap(), 4);
            assert_eq!(s.hard_state().commit, 50);
            s.append(&entries(51..=52, 4), None, true).unwrap();
        }
        let s = open(dir.path());
        assert_eq!(all(&s), vec![(51, 4), (52, 4)]);
    }

    #[test]
    fn a_damaged_entry_is_found_at_start_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            for i in 1..=40 {
                s.append(&entries(i..=i, 1), None, true).unwrap();
            }
        }
        // Flip a byte inside an early entry's data ("e5t1"). In the newest
        // file the check before open finds it; in an older one raft-engine's
        // recovery reads only batch footers, and verify_entries finds it.
        let newest = newest_log_file(dir.path());
        let mut bytes = std::fs::read(&newest).unwrap();
        let at = bytes
            .windows(4)
            .position(|w| w == b"e5t1")
            .expect("entry 5 is in the file");
        bytes[at] ^= 0x01;
        std::fs::write(&newest, &bytes).unwrap();
        let err = match RaftStorage::open(dir.path()) {
            Ok(s) => s.verify_entries().expect_err("a damaged entry went unnoticed"),
            Err(e) => e,
        };
        assert!(err.to_string().contains("damaged"), "{err}");
    }

    #[test]
    fn preallocated_zeros_after_the_last_record_are_cut_before_raft_engine_opens_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(&entries(1..=5, 1), None, true).unwrap();
        }
        let newest = &newest_log_file(dir.path());
        let seq: u64 = newest.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let log_check = super::super::log_check::check_file;
        // After kill -9, raft-engine's preallocated space is left behind, and
        // it would warn of "Corruption" when it cuts it at the next open.
        let file = std::fs::OpenOptions::new().write(true).open(newest).unwrap();
        file.set_len(file.metadata().unwrap().len() + 8192).unwrap();
        drop(file);
        assert!(matches!(
            log_check(newest, seq).unwrap(),
            super::super::log_check::TailState::ZeroTailAt(_)
        ));
        let s = open(dir.path());
        assert_eq!(s.last_index().unwrap(), 5);
        drop(s);
        let bytes = std::fs::read(newest).unwrap();
        assert_ne!(bytes.last(), Some(&0), "cut at the last record before the open");
    }

    #[test]
    fn a_torn_log_tail_is_cut_off_and_the_log_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            for i in 1..=20 {
                s.append(&entries(i..=i, 1), None, true).unwrap();
            }
        }
        // Tear the last write: chop bytes off the end of the newest log file.
        let newest = &newest_log_file(dir.path());
        let len = std::fs::metadata(newest).unwrap().len();
        // raft-engine preallocates; find the real end by the last non-zero byte.
        let bytes = std::fs::read(newest).unwrap();
        let end = bytes.iter().rposition(|b| *b != 0).unwrap() as u64 + 1;
        assert!(end <= len);
        let f = std::fs::OpenOptions::new().write(true).open(newest).unwrap();
        f.set_len(end - 5).unwrap();
        drop(f);
        // The check cuts the torn write off itself (as raft-engine would),
        // so raft-engine then finds a clean file and nothing to warn about.
        let seq: u64 = newest.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let log_check = super::super::log_check::check_file;
        assert!(matches!(
            log_check(newest, seq).unwrap(),
            super::super::log_check::TailState::TornAt(_)
        ));
        super::super::log_check::check_newest_files(newest.parent().unwrap()).unwrap();
        assert_eq!(
            log_check(newest, seq).unwrap(),
            super::super::log_check::TailState::Clean
        );

        let s = open(dir.path());
        let last = s.last_index().unwrap();
        assert!(
            (15..20).contains(&last),
            "the torn entry is gone, earlier ones stay: last={last}"
        );
        assert_eq!(all(&s).len() as u64, last);
        s.append(&entries(last + 1..=last + 3, 2), None, true).unwrap();
        drop(s);
        assert_eq!(open(dir.path()).last_index().unwrap(), last + 3);
    }

    #[test]
    fn damage_in_the_middle_of_the_newest_file_is_refused_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            for i in 1..=40 {
                s.append(&entries(i..=i, 1), Some(&hs(1, 1, i)), true).unwrap();
            }
        }
        let newest = newest_log_file(dir.path());
        let before = std::fs::read(&newest).unwrap();
        // A byte of entry 12's data: its record fails, complete ones follow.
        let mut bytes = before.clone();
        let at = bytes
            .windows(5)
            .position(|w| w == b"e12t1")
            .expect("entry 12 is in the file");
        bytes[at] ^= 0x01;
        std::fs::write(&newest, &bytes).unwrap();
        let err = RaftStorage::open(dir.path())
            .err()
            .expect("mid-file damage was cut silently")
            .to_string();
        assert!(
            err.contains("a complete record follows") && err.contains("new id"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&newest).unwrap(),
            bytes,
            "the damaged file is left as it is"
        );
        // Put right, it opens with everything.
        std::fs::write(&newest, &before).unwrap();
        assert_eq!(open(dir.path()).last_index().unwrap(), 40);
    }

    fn newest_log_file(dir: &Path) -> std::path::PathBuf {
        let mut files: Vec<_> = std::fs::read_dir(dir.join(LOG_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
            .collect();
        files.sort();
        files.pop().unwrap()
    }
}
