//! Turns a backup (`kvraft snapshot save`) into the data dir of one member of
//! a **new** cluster, as etcd's `snapshot restore` does: the keys and the
//! index and term come from the backup; the members come from
//! `--initial-cluster`; the cluster id is new (derived from the members and
//! the backup, so every member restored from the same file with the same
//! member list computes the same one). Run it once per member, then start
//! each `kvraftd` on its data dir.

use std::path::Path;

use super::startup::{cluster_id_of, initial_state};
use crate::address::parse_initial_cluster;
use crate::proto::{NodeIdentity, SnapshotHeader};
use crate::storage::snapshot_stream::SnapshotStager;
use crate::storage::{backup_file, NodeIdentityFile, RaftStorage, StateStore, StorageError};

/// What a restore wrote.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The backup's header (source cluster, index, term, keys).
    pub backup: SnapshotHeader,
    /// The new cluster's id.
    pub cluster_id: u64,
}

/// Why a restore could not be done; nothing usable is left in the data dir.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The arguments don't describe a member of a new cluster.
    #[error("{0}")]
    Usage(String),
    /// The backup is damaged or the data dir can't be written.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Restores `backup` into `data_dir` (which must not hold a node already) as
/// node `id` of the cluster `initial_cluster` (`ID=HOST:PORT,...`).
pub fn restore(backup: &Path, data_dir: &Path, id: u64, initial_cluster: &str) -> Result<Restored, RestoreError> {
    let members = parse_initial_cluster(initial_cluster).map_err(RestoreError::Usage)?;
    if !members.iter().any(|(m, _)| *m == id) {
        return Err(RestoreError::Usage(format!(
            "--initial-cluster does not list node {id}; list every member of the new cluster, this one included"
        )));
    }
    let occupied = std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some());
    if occupied {
        return Err(RestoreError::Usage(format!(
            "{} is not empty: restore into a new, empty data dir (a restored node starts a new cluster)",
            data_dir.display()
        )));
    }
    crate::storage::create_private_dir(data_dir)?;
    let result = write_member(backup, data_dir, id, &members);
    if result.is_err() {
        // Leave no half-made data dir that a daemon could start on.
        let _ = std::fs::remove_dir_all(data_dir);
    }
    result
}

fn write_member(backup: &Path, data_dir: &Path, id: u64, members: &[(u64, String)]) -> Result<Restored, RestoreError> {
    let store_path = StateStore::path_in(data_dir);
    let mut stager = SnapshotStager::new(&data_dir.join(crate::storage::state_store::INCOMING_DIR), 0);
    let mut header = None;
    for frame in backup_file::read_frames(backup)? {
        let frame = frame.map_err(|e| backup_file::unusable(backup, e))?;
        if let Some((h, _)) = stager
            .push(&frame, |_| store_path.clone())
            .map_err(|e| backup_file::unusable(backup, e))?
        {
            header = Some(h);
            break;
        }
    }
    let backup_header =
        header.ok_or_else(|| backup_file::unusable(backup, "it ends before its trailer (cut short)"))?;
    // A new cluster: its id differs from the source's and from a fresh
    // bootstrap of the same members.
    let cluster_id = cluster_id_of(members) ^ backup_header.cluster_id.rotate_left(17) ^ backup_header.index;
    let cluster_id = cluster_id.max(1);
    let (index, term) = (backup_header.index, backup_header.term);
    let state = initial_state(members, cluster_id, index, term);
    let store = StateStore::open(data_dir, 16 << 20)?;
    store.write_header(&state.to_header())?;
    store.close();
    RaftStorage::open(data_dir)?.start_at(index, term)?;
    NodeIdentityFile::in_dir(data_dir).store(&NodeIdentity {
        node_id: id,
        cluster_id,
        removed: false,
        incarnation: crate::storage::identity::new_incarnation(),
    })?;
    Ok(Restored {
        backup: backup_header,
        cluster_id,
    })
}
