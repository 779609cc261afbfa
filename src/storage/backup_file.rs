//! Backup files: `BACKUP_MAGIC`, then the frames of a snapshot stream, each
//! after its length (u32, big-endian). Written to `FILE.part`, fsynced and
//! renamed, so a file under its final name is always complete; its frames
//! carry their own checksum (`snapshot_stream::FrameCheck`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::snapshot_stream::{BACKUP_MAGIC, MAX_FRAME};
use super::StorageError;

/// Writes a backup file.
pub struct BackupWriter {
    file: BufWriter<File>,
    partial: PathBuf,
    target: PathBuf,
    bytes: u64,
}

impl BackupWriter {
    /// Starts `target` (as `target.part` until [`BackupWriter::finish`]).
    pub fn create(target: &Path) -> Result<Self, StorageError> {
        let mut name = target.as_os_str().to_owned();
        name.push(".part");
        let partial = PathBuf::from(name);
        let file = File::create(&partial).map_err(StorageError::io(format!("create {}", partial.display())))?;
        let mut writer = BackupWriter {
            file: BufWriter::new(file),
            partial,
            target: target.to_path_buf(),
            bytes: 0,
        };
        writer.write_all(BACKUP_MAGIC)?;
        Ok(writer)
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        self.bytes += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(StorageError::io(format!("write {}", self.partial.display())))
    }

    /// Appends one frame.
    pub fn frame(&mut self, frame: &[u8]) -> Result<(), StorageError> {
        let len = u32::try_from(frame.len()).map_err(|_| StorageError::Corrupt("a frame over 4 GiB".into()))?;
        self.write_all(&len.to_be_bytes())?;
        self.write_all(frame)
    }

    /// fsyncs the file and gives it its final name; returns its size.
    pub fn finish(mut self) -> Result<u64, StorageError> {
        let shown = self.partial.display().to_string();
        self.file.flush().map_err(StorageError::io(format!("write {shown}")))?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(StorageError::io(format!("fsync {shown}")))?;
        std::fs::rename(&self.partial, &self.target).map_err(StorageError::io(format!("rename {shown}")))?;
        if let Some(dir) = self.target.parent().filter(|d| !d.as_os_str().is_empty()) {
            super::fs_util::sync_dir(dir)?;
        }
        Ok(self.bytes)
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        // Unfinished: never leave a partial file behind.
        let _ = std::fs::remove_file(&self.partial);
    }
}

/// The frames of a backup file, in order (checked only for framing: feed
/// them to a `FrameCheck` or `SnapshotStager`).
pub fn read_frames(path: &Path) -> Result<impl Iterator<Item = Result<Vec<u8>, StorageError>>, StorageError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(StorageError::io(format!("open {shown}")))?;
    let mut reader = BufReader::new(file);
    let mut magic = vec![0u8; BACKUP_MAGIC.len()];
    if reader.read_exact(&mut magic).is_err() || magic != BACKUP_MAGIC {
        return Err(StorageError::Corrupt(format!(
            "{shown} is not a kvraft backup (written by `kvraft snapshot save`)"
        )));
    }
    let mut done = false;
    Ok(std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut len = [0u8; 4];
        match reader.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                done = true;
                return None;
            }
            Err(e) => {
                done = true;
                return Some(Err(StorageError::io(format!("read {shown}"))(e)));
            }
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            done = true;
            return Some(Err(StorageError::Corrupt(format!(
                "{shown}: a frame of {len} bytes, over the {MAX_FRAME} limit: the file is damaged"
            ))));
        }
        let mut frame = vec![0u8; len];
        if let Err(e) = reader.read_exact(&mut frame) {
            done = true;
            return Some(Err(StorageError::Corrupt(format!(
                "{shown} ends inside a frame ({e}): the file is cut short"
            ))));
        }
        Some(Ok(frame))
    }))
}

/// A backup file that can't be used, said with what to do about it.
pub fn unusable(path: &Path, e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!(
        "backup {}: {e}; this file can't be used: restore from another backup, or take a new one with `kvraft snapshot save`",
        path.display()
    ))
}
