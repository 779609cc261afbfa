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
use crate::proto::{SnapshotData, StoredValue};
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
pub fn convert_legacy_snapshots(data_dir: &Path, cache_bytes: usize) -> Result<Option<Converted>, StorageError> {
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
    let mut state = StateMeta::new(data.cluster_id);
    let mut header = state.to_header();
    header.members = data.members.clone();
    header.removed = data.removed.clone();
    state = StateMeta::from_header(&header)?;
    state.apply_conf_state(meta.index, meta.term, meta.get_conf_state().clone(), None);

    let partial: PathBuf = data_dir.join("state.redb.upgrading");
    let mut builder = StoreBuilder::create(&partial)?;
    let keys = data.pairs.len() as u64;
    for pair in data.pairs {
        let record = StoredValue {
            value: pair.value,
            create_revision: meta.index,
            mod_revision: meta.index,
            version: 1,
            lease: 0,
        };
        builder.add(TABLE_KV, &pair.key, &record.encode_to_vec())?;
    }
    let built = builder.finish(&state.to_header())?;
    let target = StateStore::path_in(data_dir);
    std::fs::rename(&built, &target).map_err(StorageError::io(format!("rename {}", built.display())))?;
    super::fs_util::sync_dir(data_dir)?;

    // Check what was written before the old files go.
    let store = StateStore::open(data_dir, cache_bytes)?;
    let (held, index) = (store.len()?, store.header()?.index);
    drop(store);
    if held != keys || index != meta.index {
        return Err(StorageError::Corrupt(format!(
            "upgrading {}: the new store holds {held} keys at index {index}, the snapshot {keys} at {}; \
             the snapshot files were kept",
            data_dir.display(),
            meta.index
        )));
    }
    std::fs::remove_dir_all(&legacy_dir).map_err(StorageError::io(format!("remove {}", legacy_dir.display())))?;
    super::fs_util::sync_dir(data_dir)?;
    Ok(Some(Converted {
        index: meta.index,
        keys,
    }))
}
