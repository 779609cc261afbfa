//! Snapshot files: a raft `Snapshot` (metadata + our state machine bytes)
//! behind a magic number, a CRC32 and a length, written atomically. The newest
//! two are kept so a damaged newest file still leaves one to start from.

use std::fs;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::Snapshot;

use super::fs_util::{atomic_write, create_private_dir, sync_dir};
use super::StorageError;

const MAGIC: &[u8; 8] = b"KVRSNAP1";
const HEADER_LEN: usize = 8 + 4 + 8;
const KEEP: usize = 2;

/// The snapshot directory of one data dir.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    dir: PathBuf,
}

impl SnapshotFiles {
    /// Opens (creating if needed) the snapshot directory.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        create_private_dir(dir)?;
        Ok(SnapshotFiles { dir: dir.to_path_buf() })
    }

    fn path_for(&self, index: u64, term: u64) -> PathBuf {
        self.dir.join(format!("snap-{index:020}-{term:020}.snap"))
    }

    /// Writes a snapshot durably and deletes all but the newest `KEEP` files.
    /// Returns the file size.
    pub fn save(&self, snapshot: &Snapshot) -> Result<u64, StorageError> {
        let meta = snapshot.get_metadata();
        let body = snapshot
            .write_to_bytes()
            .map_err(|e| StorageError::Corrupt(format!("encode snapshot: {e}")))?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        bytes.extend_from_slice(&(body.len() as u64).to_be_bytes());
        bytes.extend_from_slice(&body);
        atomic_write(&self.path_for(meta.index, meta.term), &bytes)?;
        self.remove_old()?;
        Ok(bytes.len() as u64)
    }

    /// The newest snapshot that passes its checksum, skipping (and naming in the
    /// returned list) damaged ones.
    pub fn load_newest(&self) -> Result<(Option<Snapshot>, Vec<String>), StorageError> {
        let mut damaged = Vec::new();
        for path in self.list()?.into_iter().rev() {
            match read_file(&path) {
                Ok(snapshot) => return Ok((Some(snapshot), damaged)),
                Err(e) => damaged.push(e.to_string()),
            }
        }
        Ok((None, damaged))
    }

    /// Snapshot files, oldest first (names sort by index).
    fn list(&self) -> Result<Vec<PathBuf>, StorageError> {
        let mut paths: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map_err(StorageError::io(format!("list {}", self.dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "snap"))
            .collect();
        paths.sort();
        Ok(paths)
    }

    fn remove_old(&self) -> Result<(), StorageError> {
        let paths = self.list()?;
        if paths.len() <= KEEP {
            return Ok(());
        }
        for old in &paths[..paths.len() - KEEP] {
            fs::remove_file(old).map_err(StorageError::io(format!("remove {}", old.display())))?;
        }
        sync_dir(&self.dir)
    }
}

fn read_file(path: &Path) -> Result<Snapshot, StorageError> {
    let bytes = fs::read(path).map_err(StorageError::io(format!("read {}", path.display())))?;
    let corrupt = |what: &str| StorageError::Corrupt(format!("snapshot {} is damaged: {what}", path.display()));
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(corrupt("bad header"));
    }
    let crc = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
    let len = u64::from_be_bytes(bytes[12..20].try_into().unwrap());
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != len {
        return Err(corrupt("truncated"));
    }
    if crc32fast::hash(body) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Snapshot::parse_from_bytes(body).map_err(|e| corrupt(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(index: u64, term: u64, data: &[u8]) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        s.data = data.to_vec().into();
        s
    }

    #[test]
    fn writes_and_reads_back_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        assert!(files.load_newest().unwrap().0.is_none());
        files.save(&snapshot(10, 2, b"ten")).unwrap();
        files.save(&snapshot(20, 3, b"twenty")).unwrap();
        let (newest, damaged) = files.load_newest().unwrap();
        let newest = newest.unwrap();
        assert!(damaged.is_empty());
        assert_eq!(newest.get_metadata().index, 20);
        assert_eq!(newest.get_metadata().term, 3);
        assert_eq!(&newest.data[..], b"twenty");
        assert_eq!(newest.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
    }

    #[test]
    fn keeps_only_the_newest_two() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        for i in 1..=5 {
            files.save(&snapshot(i * 100, 1, b"x")).unwrap();
        }
        let names = files.list().unwrap();
        assert_eq!(names.len(), 2);
        assert!(names[0].to_string_lossy().contains(&format!("{:020}", 400)));
    }

    #[test]
    fn a_damaged_newest_file_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        files.save(&snapshot(10, 1, b"old")).unwrap();
        files.save(&snapshot(20, 1, b"new")).unwrap();
        let newest = files.path_for(20, 1);
        let mut bytes = fs::read(&newest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&newest, bytes).unwrap();

        let (snap, damaged) = files.load_newest().unwrap();
        assert_eq!(snap.unwrap().get_metadata().index, 10);
        assert_eq!(damaged.len(), 1);
        assert!(damaged[0].contains("checksum mismatch"), "{damaged:?}");
    }

    #[test]
    fn a_truncated_file_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        files.save(&snapshot(10, 1, b"some data here")).unwrap();
        let path = files.path_for(10, 1);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let (snap, damaged) = files.load_newest().unwrap();
        assert!(snap.is_none());
        assert!(damaged[0].contains("truncated"), "{damaged:?}");
    }
}
