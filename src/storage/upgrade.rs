//! Upgrades a data dir written before the state store existed: its state was
//! in checksummed snapshot files (`snapshots/*.snap`, the whole map in one
//! protobuf) with the raft log after them. The newest good snapshot becomes
//! `state.redb` at the snapshot's index; raft replays the log after it, as
//! it did before. The snapshot files are removed only once the new store is
//! durable and holds every key.

use std::path::{Path, PathBuf};

use prost::Message as _;

use super::state_store::{StoreBuilder, TABLE_KV};
use super::{SnapshotFiles, StateStore, StorageError};
use crate::proto::{SnapshotData, SnapshotHeader, StoredValue};
use crate::state_machine::StateMeta;

/// The directory the old layout kept snapshots in.
pub const LEGACY_SNAPSHOT_DIR: &str = "snapshots";

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// The applied index the store starts at.
    pub index: u64,
    /// Keys carried over.
    pub keys: u64,
}

/// Converts the old layout in `data_dir`, if that is what it holds: snapshot
/// files and no store. Returns `None` when there is nothing to convert.
pub fn convert_legacy_snapshots(data_dir: &Path) -> Result<Option<Converted>, StorageError> {
    let legacy_dir = data_dir.join(LEGACY_SNAPSHOT_DIR);
    if StateStore::path_in(data_dir).exists() || !legacy_dir.is_dir() {
        return Ok(None);
    }
    let files = SnapshotFiles::open(&legacy_dir)?;
    let (snapshot, damaged) = files.load_newest()?;
    let Some(snapshot) = snapshot else {
        if damaged.is_empty() {
            return Ok(None);
        }
        return Err(StorageError::Corrupt(format!(
            "upgrading {}: no snapshot file passes its checks ({}); nothing was changed",
            data_dir.display(),
            damaged.join(", ")
        )));
    };
    let meta = snapshot.get_metadata();
    let data = SnapshotData::decode(&snapshot.data[..]).map_err(|e| {
        StorageError::Corrupt(format!(
            "upgrading {}: the snapshot at index {} does not decode: {e}; nothing was changed",
            data_dir.display(),
            meta.index
        ))
    })?;
    let mut state = StateMeta::from_header(&SnapshotHeader {
        cluster_id: data.cluster_id,
        members: data.members,
        removed: data.removed,
        ..Default::default()
    })?;
    state.apply_conf_state(meta.index, meta.term, meta.get_conf_state().clone(), None);

    let partial: PathBuf = data_dir.join("state.redb.upgrading");
    let mut builder = StoreBuilder::create(&partial)?;
    let keys = data.pairs.len() as u64;
    for pair in data.pairs {
        let record = StoredValue {
            value: pair.value.into(),
            create_revision: meta.index,
            mod_revision: meta.index,
            version: 1,
            lease: 0,
            value_ref: None,
        };
        builder.add(TABLE_KV, &pair.key, &record.encode_to_vec())?;
    }
    let built = builder.finish(&state.to_header())?;
    // Check what was written before it becomes the store: once state.redb
    // exists, no later start converts again.
    let (header, held) = StateStore::read_staged(&built)?;
    if held != keys || header.index != meta.index {
        let _ = std::fs::remove_file(&built);
        return Err(StorageError::Corrupt(format!(
            "upgrading {}: the new store held {held} keys at index {}, the snapshot {keys} at {}; \
             nothing was changed (check the disk, then restart to convert again)",
            data_dir.display(),
            header.index,
            meta.index
        )));
    }
    let target = StateStore::path_in(data_dir);
    std::fs::rename(&built, &target).map_err(StorageError::io(format!("rename {}", built.display())))?;
    super::fs_util::sync_dir(data_dir)?;
    std::fs::remove_dir_all(&legacy_dir).map_err(StorageError::io(format!("remove {}", legacy_dir.display())))?;
    super::fs_util::sync_dir(data_dir)?;
    Ok(Some(Converted {
        index: meta.index,
        keys,
    }))
}
