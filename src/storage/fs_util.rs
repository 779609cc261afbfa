//! Crash-safe file replacement.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use super::StorageError;

/// Replaces `path` with `contents` so that after a crash the file holds either
/// the old or the new contents, never a mix: write a temp file, fsync it,
/// rename it over the target, fsync the directory so the rename is durable.
pub fn atomic_write(path: &Path, contents: &[u8]) -> Result<(), StorageError> {
    let dir = path.parent().expect("a file path has a parent dir");
    let tmp = path.with_extension("tmp");
    let shown = path.display().to_string();
    {
        let mut file = File::create(&tmp).map_err(StorageError::io(format!("create {shown}.tmp")))?;
        file.write_all(contents)
            .map_err(StorageError::io(format!("write {shown}.tmp")))?;
        file.sync_all()
            .map_err(StorageError::io(format!("fsync {shown}.tmp")))?;
    }
    fs::rename(&tmp, path).map_err(StorageError::io(format!("rename to {shown}")))?;
    sync_dir(dir)
}

/// fsyncs a directory, making creates, renames and deletes in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StorageError::io(format!("fsync dir {}", dir.display())))
}

/// Creates a directory (and parents) readable only by its owner.
pub fn create_private_dir(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(StorageError::io(format!("create dir {}", dir.display())))
}
