//! `raft::Storage` over raft-engine (the log, HardState and log bounds) and the
//! newest snapshot file.
//!
//! Invariants:
//! - The log holds the entries `(truncated_index, last_index]`; `truncated_index`
//!   and its term are persisted with every compaction and snapshot install.
//! - The newest snapshot's index is `>= truncated_index`: we only compact behind
//!   a durable snapshot, keeping a catch-up tail for slow followers.
//! - The ConfState that raft starts from is the newest snapshot's; conf changes
//!   applied after it are redelivered as committed entries and re-applied, so
//!   membership always matches the applied index.

use std::path::Path;
use std::sync::{Arc, RwLock};

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use raft_engine::{Command, Engine, LogBatch, MessageExt, ReadableSize};

use super::{SnapshotFiles, StorageError};

/// raft-engine can hold many raft groups; kvraft has one.
const GROUP: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_TRUNCATED: &[u8] = b"truncated";

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
    /// The newest durable snapshot; its metadata carries the ConfState raft
    /// starts from.
    snapshot: Option<Snapshot>,
    /// raft asked for a snapshot newer than the one we have.
    snapshot_wanted: bool,
}

/// The durable raft state of one node. Cheap to clone: clones share state.
#[derive(Clone)]
pub struct RaftStorage {
    engine: Arc<Engine>,
    snapshots: SnapshotFiles,
    state: Arc<RwLock<LogState>>,
}

/// What [`RaftStorage::open`] found, for the log.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// Snapshot files that failed their checks and were skipped.
    pub damaged_snapshots: Vec<String>,
    /// A snapshot install that a crash interrupted was completed.
    pub completed_snapshot_install: bool,
}

impl RaftStorage {
    /// Opens the log and snapshots under `data_dir`, recovering a torn log tail
    /// and completing a snapshot install interrupted by a crash.
    pub fn open(data_dir: &Path) -> Result<(Self, OpenReport), StorageError> {
        let log_dir = data_dir.join("raft-log");
        super::fs_util::create_private_dir(&log_dir)?;
        let config = raft_engine::Config {
            dir: log_dir.to_string_lossy().into_owned(),
            // Keep files small enough that compaction frees disk soon.
            target_file_size: ReadableSize::mb(32),
            purge_threshold: ReadableSize::mb(256),
            ..Default::default()
        };
        let engine = Arc::new(Engine::open(config)?);
        let snapshots = SnapshotFiles::open(&data_dir.join("snapshots"))?;
        let (snapshot, damaged_snapshots) = snapshots.load_newest()?;

        let hard_state: HardState = engine.get_message(GROUP, KEY_HARD_STATE)?.unwrap_or_default();
        let truncated: SnapshotMetadata = engine.get_message(GROUP, KEY_TRUNCATED)?.unwrap_or_default();
        let storage = RaftStorage {
            engine,
            snapshots,
            state: Arc::new(RwLock::new(LogState {
                hard_state,
                truncated_index: truncated.index,
                truncated_term: truncated.term,
                snapshot: None,
                snapshot_wanted: false,
            })),
        };
        let mut report = OpenReport {
            damaged_snapshots,
            completed_snapshot_install: false,
        };

        match snapshot {
            Some(snap) => {
                let meta = snap.get_metadata();
                if meta.index < truncated.index {
                    return Err(StorageError::Corrupt(format!(
                        "the newest usable snapshot is at index {} but the log was compacted up to {}: \
                         this node can't rebuild its state; remove it from the cluster, wipe its data dir and add it again",
                        meta.index, truncated.index
                    )));
                }
                if !storage.log_contains(meta.index, meta.term) {
                    // A crash between writing a received snapshot and resetting
                    // the log: finish the install.
                    storage.reset_log_to(&snap)?;
                    report.completed_snapshot_install = true;
                }
                storage.write_state().snapshot = Some(snap);
            }
            None if truncated.index > 0 => {
                return Err(StorageError::Corrupt(format!(
                    "no usable snapshot but the log was compacted up to {}: remove this node from the cluster, wipe its data dir and add it again",
                    truncated.index
                )));
            }
            None => {}
        }
        Ok((storage, report))
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, LogState> {
        self.state.read().expect("storage lock poisoned")
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, LogState> {
        self.state.write().expect("storage lock poisoned")
    }

    /// True if the log covers `index` with this term (at the truncation point or
    /// as an entry).
    fn log_contains(&self, index: u64, term: u64) -> bool {
        let st = self.read_state();
        if index == st.truncated_index {
            return st.truncated_term == term;
        }
        matches!(self.engine.get_entry::<EntryExt>(GROUP, index), Ok(Some(e)) if e.term == term && index > st.truncated_index)
    }

    /// Makes this data dir start from `snapshot`: the initial state of a new
    /// cluster, written identically on every initial member.
    pub fn bootstrap(&self, snapshot: &Snapshot) -> Result<(), StorageError> {
        self.snapshots.save(snapshot)?;
        self.reset_log_to(snapshot)?;
        self.write_state().snapshot = Some(snapshot.clone());
        Ok(())
    }

    /// Installs a snapshot received from the leader: the file first, then the
    /// log reset, so a crash in between is completed at the next open.
    pub fn install_snapshot(&self, snapshot: &Snapshot) -> Result<u64, StorageError> {
        let size = self.snapshots.save(snapshot)?;
        self.reset_log_to(snapshot)?;
        let mut st = self.write_state();
        st.snapshot = Some(snapshot.clone());
        st.snapshot_wanted = false;
        Ok(size)
    }

    /// Empties the log and sets its start to the snapshot, in one fsynced batch.
    fn reset_log_to(&self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let meta = snapshot.get_metadata();
        let mut st = self.write_state();
        let mut hs = st.hard_state.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        let mut truncated = SnapshotMetadata::default();
        truncated.index = meta.index;
        truncated.term = meta.term;

        let mut batch = LogBatch::default();
        batch.add_command(GROUP, Command::Clean);
        batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &hs)?;
        batch.put_message(GROUP, KEY_TRUNCATED.to_vec(), &truncated)?;
        self.engine.write(&mut batch, true)?;
        st.hard_state = hs;
        st.truncated_index = meta.index;
        st.truncated_term = meta.term;
        Ok(())
    }

    /// Appends entries (truncating any conflicting suffix) and stores the
    /// HardState in one write, fsynced when `sync`.
    pub fn append(&self, entries: &[Entry], hard_state: Option<&HardState>, sync: bool) -> Result<(), StorageError> {
        let mut batch = LogBatch::default();
        if !entries.is_empty() {
            batch.add_entries::<EntryExt>(GROUP, entries)?;
        }
        if let Some(hs) = hard_state {
            batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), hs)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.engine.write(&mut batch, sync)?;
        if sync {
            crate::metrics::observe(crate::metrics::WAL_FSYNC_DURATION, started.elapsed());
        }
        if let Some(hs) = hard_state {
            self.write_state().hard_state = hs.clone();
        }
        Ok(())
    }

    /// Records a newer commit index (from a `LightReady`). Not fsynced: losing it
    /// only means learning it again from the leader.
    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.read_state().hard_state.clone();
        if commit <= hs.commit {
            return Ok(());
        }
        hs.commit = commit;
        self.append(&[], Some(&hs), false)
    }

    /// Saves a snapshot taken from the local state machine, then compacts the
    /// log behind it, keeping `keep_entries` entries for slow followers.
    /// Returns the snapshot file size.
    pub fn save_snapshot(&self, snapshot: &Snapshot, keep_entries: u64) -> Result<u64, StorageError> {
        let size = self.snapshots.save(snapshot)?;
        let index = snapshot.get_metadata().index;
        let new_truncated = index.saturating_sub(keep_entries);
        let (truncated_index, mut hs) = {
            let st = self.read_state();
            (st.truncated_index, st.hard_state.clone())
        };
        let mut batch = LogBatch::default();
        // A restart applies from the snapshot, so the commit index must not be
        // behind it (raft panics on applied > committed).
        hs.commit = hs.commit.max(index);
        batch.put_message(GROUP, KEY_HARD_STATE.to_vec(), &hs)?;
        let mut compacted_to = None;
        if new_truncated > truncated_index {
            let term = raft::Storage::term(self, new_truncated)
                .map_err(|e| StorageError::Corrupt(format!("term of {new_truncated}: {e}")))?;
            let mut truncated = SnapshotMetadata::default();
            truncated.index = new_truncated;
            truncated.term = term;
            batch.add_command(
                GROUP,
                Command::Compact {
                    index: new_truncated + 1,
                },
            );
            batch.put_message(GROUP, KEY_TRUNCATED.to_vec(), &truncated)?;
            compacted_to = Some((new_truncated, term));
        }
        self.engine.write(&mut batch, true)?;
        {
            let mut st = self.write_state();
            st.hard_state = hs;
            st.snapshot = Some(snapshot.clone());
            st.snapshot_wanted = false;
            if let Some((index, term)) = compacted_to {
                st.truncated_index = index;
                st.truncated_term = term;
            }
        }
        // Old log files are deleted only by a purge pass.
        self.engine.purge_expired_files()?;
        Ok(size)
    }

    /// The newest durable snapshot.
    pub fn newest_snapshot(&self) -> Option<Snapshot> {
        self.read_state().snapshot.clone()
    }

    /// The index of the newest durable snapshot (0 if none).
    pub fn snapshot_index(&self) -> u64 {
        self.read_state()
            .snapshot
            .as_ref()
            .map_or(0, |s| s.get_metadata().index)
    }

    /// True once, after raft asked for a snapshot newer than the newest one.
    pub fn take_snapshot_request(&self) -> bool {
        std::mem::take(&mut self.write_state().snapshot_wanted)
    }

    /// The persisted HardState.
    pub fn hard_state(&self) -> HardState {
        self.read_state().hard_state.clone()
    }

    fn last_index_locked(&self, st: &LogState) -> u64 {
        match self.engine.last_index(GROUP) {
            Some(last) if last > st.truncated_index => last,
            _ => st.truncated_index,
        }
    }
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.read_state();
        let conf_state: ConfState = st
            .snapshot
            .as_ref()
            .map(|s| s.get_metadata().get_conf_state().clone())
            .unwrap_or_default();
        Ok(RaftState::new(st.hard_state.clone(), conf_state))
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

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut st = self.write_state();
        // A node only accepts a snapshot whose membership includes it, so a
        // node added after the newest snapshot needs a fresh one.
        let usable = |s: &Snapshot| {
            let meta = s.get_metadata();
            meta.index >= request_index
                && meta.index >= st.truncated_index
                && crate::state_machine::conf_ids(meta.get_conf_state()).any(|id| id == to)
        };
        match &st.snapshot {
            Some(s) if usable(s) => Ok(s.clone()),
            _ => {
                // The raft loop sees the flag and snapshots the state machine;
                // raft asks again on its next attempt.
                st.snapshot_wanted = true;
                Err(raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable))
            }
        }
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

    fn snapshot_at(index: u64, term: u64) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        s.data = b"state".to_vec().into();
        s
    }

    fn open(dir: &Path) -> RaftStorage {
        RaftStorage::open(dir).unwrap().0
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
    fn a_snapshot_compacts_behind_it_keeping_a_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(&entries(1..=100, 3), Some(&hs(3, 1, 90)), true).unwrap();
            s.save_snapshot(&snapshot_at(90, 3), 20).unwrap();
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
            assert_eq!(s.snapshot(0, 2).unwrap().get_metadata().index, 90);
            assert!(s.snapshot(95, 2).is_err(), "a newer snapshot is asked for");
            assert!(s.take_snapshot_request());
            assert!(s.snapshot(0, 4).is_err(), "node 4 is not in the snapshot's membership");
            assert!(s.take_snapshot_request());
            assert!(!s.take_snapshot_request());
        }
        let s = open(dir.path());
        assert_eq!(s.first_index().unwrap(), 71);
        assert_eq!(s.last_index().unwrap(), 100);
        assert_eq!(s.snapshot_index(), 90);
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn a_damaged_newest_snapshot_is_reported_and_the_node_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(&entries(1..=100, 3), Some(&hs(3, 1, 100)), true).unwrap();
            s.save_snapshot(&snapshot_at(40, 3), 20).unwrap();
            s.save_snapshot(&snapshot_at(90, 3), 20).unwrap();
        }
        let newest = dir
            .path()
            .join("snapshots")
            .join(format!("snap-{:020}-{:020}.snap", 90, 3));
        let mut bytes = std::fs::read(&newest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&newest, &bytes).unwrap();
        // The previous snapshot (40) is behind the compacted log (70): it can't
        // rebuild the state, so the node says so instead of serving.
        let err = RaftStorage::open(dir.path())
            .err()
            .expect("opened with a damaged newest snapshot");
        let err = err.to_string();
        assert!(
            err.contains("compacted up to 70") && err.contains("add it again"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(&newest).unwrap(),
            bytes,
            "the damaged file is left as it is"
        );
    }

    #[test]
    fn installing_a_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(&entries(1..=10, 1), Some(&hs(1, 0, 5)), true).unwrap();
            s.install_snapshot(&snapshot_at(50, 4)).unwrap();
            assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (51, 50));
            assert_eq!(s.term(50).unwrap(), 4);
            assert_eq!(s.hard_state().commit, 50);
            s.append(&entries(51..=52, 4), None, true).unwrap();
        }
        let s = open(dir.path());
        assert_eq!(all(&s), vec![(51, 4), (52, 4)]);
    }

    #[test]
    fn an_install_interrupted_after_the_snapshot_file_is_completed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(&entries(1..=10, 1), Some(&hs(1, 0, 5)), true).unwrap();
            // Crash right after the file is durable, before the log reset.
            s.snapshots.save(&snapshot_at(50, 4)).unwrap();
        }
        let (s, report) = RaftStorage::open(dir.path()).unwrap();
        assert!(report.completed_snapshot_install);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (51, 50));
        assert!(s.hard_state().commit >= 50);
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
        let log_dir = dir.path().join("raft-log");
        let mut files: Vec<_> = std::fs::read_dir(&log_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
            .collect();
        files.sort();
        let newest = files.last().unwrap();
        let len = std::fs::metadata(newest).unwrap().len();
        // raft-engine preallocates; find the real end by the last non-zero byte.
        let bytes = std::fs::read(newest).unwrap();
        let end = bytes.iter().rposition(|b| *b != 0).unwrap() as u64 + 1;
        assert!(end <= len);
        let f = std::fs::OpenOptions::new().write(true).open(newest).unwrap();
        f.set_len(end - 5).unwrap();
        drop(f);

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
    fn a_log_compacted_past_every_usable_snapshot_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.append(&entries(1..=100, 1), None, true).unwrap();
            s.save_snapshot(&snapshot_at(90, 1), 10).unwrap();
        }
        for f in std::fs::read_dir(dir.path().join("snapshots")).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        let err = RaftStorage::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("wipe its data dir"), "{err}");
    }
}
