//! An exclusive lock on a data dir, so two daemons can never share one. The
//! lock is an `flock` on `DATA_DIR/LOCK`, released by the kernel when the
//! process exits (even on kill -9); the file holds the owner's pid for the
//! error message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::StorageError;

/// Held for the life of the process.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock or says who holds it.
    pub fn acquire(data_dir: &Path) -> Result<Self, StorageError> {
        let path = data_dir.join("LOCK");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(StorageError::io(format!("open {}", path.display())))?;
        // SAFETY: flock on a valid, owned file descriptor.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "unknown" } else { holder };
            return Err(StorageError::Mismatch(format!(
                "data dir {} is in use by another kvraftd (pid {holder}); stop that process or give this one its own --data-dir",
                data_dir.display()
            )));
        }
        file.set_len(0).map_err(StorageError::io("truncate LOCK"))?;
        file.seek(SeekFrom::Start(0)).map_err(StorageError::io("seek LOCK"))?;
        write!(file, "{}", std::process::id()).map_err(StorageError::io("write LOCK"))?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        DataDirLock::acquire(dir.path()).expect("free again once released");
    }
}
