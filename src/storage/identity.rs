//! The identity of a data dir: the node id and cluster id it was initialised
//! for. Checked at every start so a data dir can't be reused by another node or
//! joined to another cluster by mistake (raft would otherwise see a node that
//! "forgot" entries it acknowledged).

use std::path::{Path, PathBuf};

use prost::Message;

use super::fs_util::atomic_write;
use super::StorageError;
use crate::proto::NodeIdentity;

const FILE_NAME: &str = "identity";
const MAGIC: &[u8; 8] = b"KVRIDNT1";

/// A new data dir's incarnation: random and never 0 (0 means "not known").
pub fn new_incarnation() -> u64 {
    rand::random::<u64>().max(1)
}

/// The `identity` file of one data dir.
#[derive(Debug, Clone)]
pub struct NodeIdentityFile {
    path: PathBuf,
}

impl NodeIdentityFile {
    /// The identity file inside `data_dir`.
    pub fn in_dir(data_dir: &Path) -> Self {
        NodeIdentityFile {
            path: data_dir.join(FILE_NAME),
        }
    }

    /// Reads it; `None` if the data dir was never initialised.
    pub fn load(&self) -> Result<Option<NodeIdentity>, StorageError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io(format!("read {}", self.path.display()))(e)),
        };
        let corrupt = || {
            StorageError::Corrupt(format!(
                "{} is damaged (bad header or checksum); restore the data dir from a backup or wipe it and re-add the node",
                self.path.display()
            ))
        };
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(corrupt());
        }
        let crc = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
        if crc32fast::hash(&bytes[12..]) != crc {
            return Err(corrupt());
        }
        NodeIdentity::decode(&bytes[12..]).map(Some).map_err(|_| corrupt())
    }

    /// Writes it atomically.
    pub fn store(&self, identity: &NodeIdentity) -> Result<(), StorageError> {
        let body = identity.encode_to_vec();
        let mut bytes = Vec::with_capacity(12 + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        bytes.extend_from_slice(&body);
        atomic_write(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let file = NodeIdentityFile::in_dir(dir.path());
        assert_eq!(file.load().unwrap(), None);
        let id = NodeIdentity {
            node_id: 3,
            cluster_id: 42,
            removed: false,
            incarnation: new_incarnation(),
        };
        file.store(&id).unwrap();
        assert_eq!(file.load().unwrap(), Some(id));

        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(file.load(), Err(StorageError::Corrupt(_))));
    }
}
