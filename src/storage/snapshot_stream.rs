//! A consistent snapshot of the store as a stream of frames, and the other
//! end that builds a new store from one. The same stream goes to a follower
//! over a peer connection and into a backup file.
//!
//! ```text
//! SnapshotFrame{header}   index, term, membership, cluster id, record count
//! SnapshotFrame{chunk}*   records, table by table in key order, about CHUNK_BYTES each
//! SnapshotFrame{trailer}  record count and CRC-32 over every frame before it
//! ```
//!
//! Memory stays flat whatever the state size: one chunk is built or taken
//! apart at a time. A stream is installed only whole and verified: records
//! go into a new store file in the staging dir, which becomes the staged
//! snapshot only after the trailer checks out and the file is fsynced.

use std::path::{Path, PathBuf};

use prost::Message as _;

use super::state_store::{Record, StoreBuilder, StoreView, FORMAT};
use super::StorageError;
use crate::proto::{snapshot_frame, SnapshotChunk, SnapshotFrame, SnapshotHeader, SnapshotRecord, SnapshotTrailer};

/// The first bytes of a backup file; frames follow, each after its length
/// (u32, big-endian).
pub const BACKUP_MAGIC: &[u8] = b"KVRAFT-SNAPSHOT-1\n";

/// About this many bytes of records per chunk frame.
pub const CHUNK_BYTES: usize = 1 << 20;
/// The largest frame a stream may carry: a chunk of CHUNK_BYTES plus one
/// record that did not fit, bounded by the largest key and value.
pub const MAX_FRAME: usize = 8 << 20;

fn frame(part: snapshot_frame::Part) -> Vec<u8> {
    SnapshotFrame { part: Some(part) }.encode_to_vec()
}

/// The frames of a view, produced one at a time (a blocking iterator: it
/// reads the store).
pub struct SnapshotFrames {
    header: Option<SnapshotHeader>,
    records: Box<dyn Iterator<Item = Result<Record, StorageError>> + Send>,
    crc: crc32fast::Hasher,
    count: u64,
    done: bool,
    /// Keeps the read transaction (and so the records' snapshot) alive.
    _view: StoreView,
}

impl SnapshotFrames {
    /// The stream of `view`, stamped with the node and time it was taken.
    pub fn new(view: StoreView, source_node: u64) -> Result<Self, StorageError> {
        let mut header = view.header.clone();
        header.format = FORMAT;
        header.records = view.record_count()?;
        header.keys = Some(view.len()?);
        header.source_node = source_node;
        header.created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let records = Box::new(view.records()?);
        Ok(SnapshotFrames {
            header: Some(header),
            records,
            crc: crc32fast::Hasher::new(),
            count: 0,
            done: false,
            _view: view,
        })
    }

    fn next_frame(&mut self) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(header) = self.header.take() {
            let bytes = frame(snapshot_frame::Part::Header(header));
            self.crc.update(&bytes);
            return Ok(Some(bytes));
        }
        if self.done {
            return Ok(None);
        }
        let mut chunk = SnapshotChunk::default();
        let mut size = 0;
        while size < CHUNK_BYTES {
            match self.records.next() {
                Some(record) => {
                    let (table, key, value) = record?;
                    size += key.len() + value.len() + 8;
                    chunk.records.push(SnapshotRecord { table, key, value });
                }
                None => break,
            }
        }
        if chunk.records.is_empty() {
            self.done = true;
            let trailer = SnapshotTrailer {
                records: self.count,
                crc32: self.crc.clone().finalize(),
            };
            return Ok(Some(frame(snapshot_frame::Part::Trailer(trailer))));
        }
        self.count += chunk.records.len() as u64;
        let bytes = frame(snapshot_frame::Part::Chunk(chunk));
        self.crc.update(&bytes);
        Ok(Some(bytes))
    }
}

impl Iterator for SnapshotFrames {
    type Item = Result<Vec<u8>, StorageError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_frame().transpose()
    }
}

/// What a stream's frames must add up to: one header first, chunks, and a
/// trailer whose count and checksum match what came before it.
#[derive(Default)]
pub struct FrameCheck {
    header: Option<SnapshotHeader>,
    crc: crc32fast::Hasher,
    count: u64,
}

/// One checked frame.
pub enum Checked {
    /// The header (the first frame).
    Header(SnapshotHeader),
    /// Records, in key order.
    Chunk(SnapshotChunk),
    /// The trailer checked out: the stream is whole.
    Done(SnapshotHeader),
}

impl FrameCheck {
    /// Checks the next frame of the stream.
    pub fn check(&mut self, bytes: &[u8]) -> Result<Checked, StorageError> {
        let part = SnapshotFrame::decode(bytes)
            .map_err(|e| damaged(format!("a frame does not decode: {e}")))?
            .part
            .ok_or_else(|| damaged("an empty frame"))?;
        match (part, &self.header) {
            (snapshot_frame::Part::Header(header), None) => {
                if header.format != FORMAT {
                    return Err(damaged(format!(
                        "format {} is not {FORMAT}, the one this version reads; use the same version on both ends",
                        header.format
                    )));
                }
                if header.index == 0 || header.term == 0 {
                    return Err(damaged("the header has no index or term"));
                }
                self.crc.update(bytes);
                self.header = Some(header.clone());
                Ok(Checked::Header(header))
            }
            (snapshot_frame::Part::Chunk(chunk), Some(header)) => {
                self.crc.update(bytes);
                self.count += chunk.records.len() as u64;
                if self.count > header.records {
                    return Err(damaged(format!(
                        "more records than the {} the header announced",
                        header.records
                    )));
                }
                Ok(Checked::Chunk(chunk))
            }
            (snapshot_frame::Part::Trailer(trailer), Some(header)) => {
                let crc = self.crc.clone().finalize();
                if trailer.crc32 != crc || trailer.records != self.count || header.records != self.count {
                    return Err(damaged(format!(
                        "checksum {crc:08x} over {} records, the trailer says {:08x} over {} (header: {})",
                        self.count, trailer.crc32, trailer.records, header.records
                    )));
                }
                Ok(Checked::Done(header.clone()))
            }
            (snapshot_frame::Part::Header(_), Some(_)) => Err(damaged("a second header")),
            (snapshot_frame::Part::Ack(_), _) => Err(damaged("an acknowledgement inside the stream")),
            (_, None) => Err(damaged("records before the header")),
        }
    }
}

/// Builds a store from a stream, frame by frame.
pub struct SnapshotStager {
    staging_dir: PathBuf,
    expect_cluster: u64,
    check: FrameCheck,
    builder: Option<StoreBuilder>,
    partial: Option<PathBuf>,
}

fn damaged(what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("snapshot stream: {what}"))
}

impl SnapshotStager {
    /// A stager writing under `staging_dir`; `expect_cluster` (0: any) is the
    /// cluster the snapshot must belong to.
    pub fn new(staging_dir: &Path, expect_cluster: u64) -> Self {
        SnapshotStager {
            staging_dir: staging_dir.to_path_buf(),
            expect_cluster,
            check: FrameCheck::default(),
            builder: None,
            partial: None,
        }
    }

    /// Takes one frame. Returns the header and the staged file once the
    /// trailer checked out; any error leaves nothing behind.
    pub fn push(
        &mut self,
        bytes: &[u8],
        staged_name: impl Fn(&SnapshotHeader) -> PathBuf,
    ) -> Result<Option<(SnapshotHeader, PathBuf)>, StorageError> {
        let result = self.push_inner(bytes, staged_name);
        if result.is_err() {
            self.discard();
        }
        result
    }

    fn push_inner(
        &mut self,
        bytes: &[u8],
        staged_name: impl Fn(&SnapshotHeader) -> PathBuf,
    ) -> Result<Option<(SnapshotHeader, PathBuf)>, StorageError> {
        match self.check.check(bytes)? {
            Checked::Header(header) => {
                if self.expect_cluster != 0 && header.cluster_id != self.expect_cluster {
                    return Err(damaged(format!(
                        "it belongs to cluster {:016x}, not {:016x}",
                        header.cluster_id, self.expect_cluster
                    )));
                }
                super::fs_util::create_private_dir(&self.staging_dir)?;
                // Unique per stream: two leaders may send the same snapshot
                // at once, and neither may write into the other's file.
                static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let stream = STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let partial = self.staging_dir.join(format!(
                    "{:020}-{:020}-{}-{stream}.partial",
                    header.index,
                    header.term,
                    std::process::id()
                ));
                self.builder = Some(StoreBuilder::create(&partial)?);
                self.partial = Some(partial);
                Ok(None)
            }
            Checked::Chunk(chunk) => {
                let builder = self.builder.as_mut().expect("a builder exists once the header came");
                for record in chunk.records {
                    builder.add(record.table, &record.key, &record.value)?;
                }
                Ok(None)
            }
            Checked::Done(header) => {
                let builder = self.builder.take().expect("a builder exists once the header came");
                let built = builder.finish(&header)?;
                let staged = staged_name(&header);
                std::fs::rename(&built, &staged).map_err(StorageError::io(format!("rename {}", built.display())))?;
                if let Some(dir) = staged.parent() {
                    super::fs_util::sync_dir(dir)?;
                }
                self.partial = None;
                Ok(Some((header, staged)))
            }
        }
    }

    /// Removes what a failed or abandoned stream left.
    pub fn discard(&mut self) {
        self.builder = None;
        if let Some(partial) = self.partial.take() {
            let _ = std::fs::remove_file(partial);
        }
    }
}

impl Drop for SnapshotStager {
    fn drop(&mut self) {
        self.discard();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::proto::{command, Command, SetRequest};
    use crate::state_machine::{Batch, StateMachine};
    use crate::storage::StateStore;

    /// A store with `n` keys of `value_len` bytes, applied at indexes 2..
    fn filled(dir: &Path, n: u64, value_len: usize) -> Arc<StateStore> {
        let store = Arc::new(StateStore::open(dir, 8 << 20).unwrap());
        let mut sm = StateMachine::open(store.clone()).unwrap();
        let mut meta = sm.meta().clone();
        let mut cs = raft::prelude::ConfState::default();
        cs.voters = vec![1, 2, 3];
        meta.apply_conf_state(1, 1, cs, None);
        let mut batch = Batch::begin(&store, meta).unwrap();
        for i in 0..n {
            let command = Command {
                op: Some(command::Op::Set(SetRequest {
                    key: format!("key{i:08}").into_bytes(),
                    value: vec![(i % 251) as u8; value_len],
                    lease: 0,
                })),
                ..Default::default()
            };
            batch.apply(i + 2, 1, command).unwrap();
        }
        sm.set_meta(batch.commit().unwrap());
        store.flush().unwrap();
        store
    }

    fn stage(frames: impl Iterator<Item = Vec<u8>>, staging: &Path) -> Result<(SnapshotHeader, PathBuf), StorageError> {
        let mut stager = SnapshotStager::new(staging, 0);
        for bytes in frames {
            if let Some(done) = stager.push(&bytes, |h| staging.join(format!("{}.redb", h.index)))? {
                return Ok(done);
            }
        }
        Err(damaged("the stream ended early"))
    }

    #[test]
    fn a_stream_larger_than_a_chunk_round_trips_into_a_new_store() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let store = filled(from.path(), 9_000, 300);
        let frames: Vec<Vec<u8>> = SnapshotFrames::new(store.view().unwrap(), 1)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(frames.len() >= 4, "more than one chunk: {} frames", frames.len());
        assert!(frames.iter().all(|f| f.len() <= MAX_FRAME));
        let staging = to.path().join("incoming");
        let (header, staged) = stage(frames.into_iter(), &staging).unwrap();
        assert_eq!((header.index, header.records), (9_001, 9_000));
        std::fs::rename(&staged, StateStore::path_in(to.path())).unwrap();
        let copy = StateStore::open(to.path(), 8 << 20).unwrap();
        assert_eq!(copy.len().unwrap(), 9_000);
        assert_eq!(copy.get(b"key00000042").unwrap(), store.get(b"key00000042").unwrap());
        assert_eq!(copy.header().unwrap().conf_state, store.header().unwrap().conf_state);
        let leftovers: Vec<_> = std::fs::read_dir(&staging).unwrap().collect();
        assert!(leftovers.is_empty(), "nothing but the staged file: {leftovers:?}");
    }

    #[test]
    fn leases_and_their_keys_travel_with_the_snapshot() {
        use crate::proto::LeaseGrantRequest;
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let store = filled(from.path(), 3, 10);
        let mut sm = StateMachine::open(store.clone()).unwrap();
        let mut batch = Batch::begin(&store, sm.meta().clone()).unwrap();
        let grant = Command {
            op: Some(command::Op::LeaseGrant(LeaseGrantRequest { ttl: 7 })),
            ..Default::default()
        };
        batch.apply(10, 1, grant).unwrap();
        let leased = Command {
            op: Some(command::Op::Set(SetRequest {
                key: b"leased".to_vec(),
                value: b"v".to_vec(),
                lease: 10,
            })),
            ..Default::default()
        };
        batch.apply(11, 1, leased).unwrap();
        sm.set_meta(batch.commit().unwrap());
        store.flush().unwrap();
        let frames = SnapshotFrames::new(store.view().unwrap(), 1).unwrap();
        let (header, staged) = stage(frames.map(Result::unwrap), &to.path().join("incoming")).unwrap();
        assert_eq!(header.records, 4 + 1 + 1, "keys, the lease, its one key");
        std::fs::rename(&staged, StateStore::path_in(to.path())).unwrap();
        let copy = StateStore::open(to.path(), 8 << 20).unwrap();
        let leases = copy.working_leases();
        let lease = leases.get(10).expect("the lease came along");
        assert_eq!(lease.ttl, 7);
        assert_eq!(lease.keys.iter().collect::<Vec<_>>(), [b"leased"]);
        assert_eq!(copy.get(b"leased").unwrap().unwrap().lease, 10);
    }

    #[test]
    fn a_damaged_or_cut_stream_is_refused_and_leaves_nothing() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let store = filled(from.path(), 5_000, 300);
        let frames: Vec<Vec<u8>> = SnapshotFrames::new(store.view().unwrap(), 1)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let staging = to.path().join("incoming");

        // A flipped byte inside a value: the frame still decodes, the checksum
        // does not match.
        let mut flipped = frames.clone();
        let last = flipped[1].len() - 10;
        flipped[1][last] ^= 0x40;
        let err = stage(flipped.into_iter(), &staging).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");

        // A stream cut before its trailer never becomes a staged file.
        let cut = frames[..frames.len() - 1].to_vec();
        assert!(stage(cut.into_iter(), &staging).is_err());
        let left: Vec<_> = std::fs::read_dir(&staging)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "{left:?}");

        // A chunk left out.
        let mut skipped = frames.clone();
        skipped.remove(1);
        assert!(stage(skipped.into_iter(), &staging).is_err());

        // Another cluster's snapshot.
        let mut stager = SnapshotStager::new(&staging, 0xdead);
        let err = stager.push(&frames[0], |_| staging.join("x")).unwrap_err().to_string();
        assert!(err.contains("cluster"), "{err}");
    }
}
