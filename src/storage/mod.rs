//! Everything that lives on disk under a node's data dir:
//!
//! ```text
//! DATA_DIR/LOCK              held (flock) by the running daemon (lock.rs)
//! DATA_DIR/identity          which node and cluster this data dir belongs to (identity.rs)
//! DATA_DIR/state.redb        the state machine: keys, applied index, membership (state_store.rs;
//!                            recent changes wait in memory for a flush, memtable.rs)
//! DATA_DIR/values/           values of 64 bytes and more, in segments the store's records point into
//!                            (value_log.rs)
//! DATA_DIR/raft-log/         the raft log, HardState and log bounds, in raft-engine (raft_storage.rs)
//! DATA_DIR/snapshot-incoming/ snapshots from the leader, built and verified before install (snapshot_stream.rs)
//! ```
//!
//! Before the state store, `DATA_DIR/snapshots/*.snap` held checksummed full
//! snapshots (snapshot_files.rs); upgrade.rs converts such a data dir.
//!
//! [`RaftStorage`] implements `raft::Storage` over the log, with snapshots
//! for followers taken as read views of the [`StateStore`]. Every write that raft depends on is fsynced before the raft loop
//! lets anything that depends on it leave the node.

pub mod access;
pub mod backup_file;
pub mod flush_schedule;
mod fs_util;
pub mod history;
pub mod identity;
mod lease_tables;
pub mod lock;
pub mod log_check;
pub mod memtable;
pub mod raft_storage;
pub mod read_cache;
pub mod snapshot_files;
pub mod snapshot_stream;
pub mod state_store;
pub mod upgrade;
pub mod value_log;

pub use fs_util::create_private_dir;
pub use identity::NodeIdentityFile;
pub use lock::DataDirLock;
pub use raft_storage::RaftStorage;
pub use snapshot_files::SnapshotFiles;
pub use state_store::StateStore;

/// A storage failure. Apart from corruption detected at start-up, these are
/// fatal to the node: a consensus log that can't be written must stop.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The raft log store failed.
    #[error("raft log: {0}")]
    Engine(#[from] raft_engine::Error),
    /// A file failed its checksum or could not be decoded.
    #[error("{0}")]
    Corrupt(String),
    /// The state store failed.
    #[error("state store: {0}")]
    Store(String),
    /// The data dir does not fit the flags the node was started with.
    #[error("{0}")]
    Mismatch(String),
}

impl StorageError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| StorageError::Io { context, source }
    }
}
