//! Can this process use the data dir? Checked before anything opens it, so a
//! directory owned by another user (a first run as root, then the service as
//! its own user) is refused with the user, the path and the setting, not a
//! bare "Permission denied (os error 13)" from deep inside a storage engine.

use std::path::{Path, PathBuf};

/// The first path in `data_dir` (the directory itself, its files, and those
/// one level down) this process may not read and write, if any.
pub fn first_inaccessible(data_dir: &Path) -> Option<PathBuf> {
    let mut paths = vec![data_dir.to_path_buf()];
    let mut dirs = vec![(data_dir.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if depth == 0 && entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push((path.clone(), depth + 1));
            }
            paths.push(path);
        }
    }
    paths.sort();
    paths.into_iter().find(|p| !read_write(p))
}

fn read_write(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut mode = libc::R_OK | libc::W_OK;
    if path.is_dir() {
        mode |= libc::X_OK;
    }
    // SAFETY: a valid, NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c_path.as_ptr(), mode) == 0 }
}

/// "user NAME (uid N)", the name from /etc/passwd (read directly: a static
/// binary has no NSS).
fn describe_user(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|passwd| {
        passwd.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id = fields.nth(1)?;
            (id.parse::<u32>().ok()? == uid).then(|| name.to_string())
        })
    });
    match name {
        Some(name) => format!("user {name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// What to say when `path` in `data_dir` is not accessible.
pub fn explain(data_dir: &Path, path: &Path) -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    format!(
        "{}, which kvraftd runs as, may not read and write {} (data dir {}: data_dir, --data-dir, \
         KVRAFT_DATA_DIR); the data dir and everything in it must belong to that user \
         (chown -R {uid} {}), or point data_dir at a directory it owns",
        describe_user(uid),
        path.display(),
        data_dir.display(),
        data_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_this_user_and_finds_nothing_wrong_with_our_own_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("raft-log")).unwrap();
        std::fs::write(dir.path().join("raft-log/0001.raftlog"), b"x").unwrap();
        assert_eq!(first_inaccessible(dir.path()), None);
        assert_eq!(describe_user(0), "user root (uid 0)");
        assert_eq!(describe_user(4_000_000_000), "uid 4000000000", "no such user");
        let message = explain(dir.path(), &dir.path().join("state.redb"));
        assert!(
            message.contains("data_dir") && message.contains("state.redb"),
            "{message}"
        );
    }
}
