//! A check of the raft log's newest files before raft-engine opens them
//! (which cuts off a torn last write itself, with a plain message, so
//! raft-engine has no "Truncating log file" warning to give). raft-engine (in `TolerateTailCorruption`, the mode a crash needs)
//! cuts a damaged newest file at its first bad record with only a warning,
//! whether the damage is a torn last write (never fsynced, never
//! acknowledged: fine to drop) or a flipped byte in the middle (every later,
//! fsynced record would be dropped with it). Both look alike to it; they
//! differ in what follows the bad record: after a torn write nothing valid
//! does, after mid-file damage complete records do. So: at the first bad
//! record, look for any valid record after it; if there is one, refuse.
//!
//! The format (raft-engine 0.4, `file_pipe_log/format.rs`, `log_batch.rs`):
//! a file header (magic, big-endian u64 version, and for version 2 a u64
//! alignment), then records: a 16-byte header (big-endian u64
//! `len << 8 | compression`, big-endian u64 `footer offset`), the entries
//! block (`[16, footer)`, its CRC-32 in the last 4 bytes), the footer
//! (`[footer, len)`, its CRC-32 in the last 4 bytes, XOR the file's sequence
//! number for version 2).

use std::path::Path;

use super::StorageError;

const MAGIC: &[u8] = b"RAFT-LOG-FILE-HEADER-9986AB3E47F320B394C8E84916EB0ED5";
const RECORD_HEADER: usize = 16;
const CHECKSUM: usize = 4;

/// What the newest file of a queue looks like.
#[derive(Debug, PartialEq, Eq)]
pub enum TailState {
    /// Every record is whole, and nothing follows them.
    Clean,
    /// Every record is whole; from this offset on the file is zeros
    /// (preallocated space, which raft-engine cuts off after a crash with a
    /// "Corruption" warning).
    ZeroTailAt(usize),
    /// The last write is torn at this offset; nothing valid follows.
    TornAt(usize),
}

fn be_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

fn le_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// The length of a whole, valid record at `at`, if there is one.
fn record_at(buf: &[u8], at: usize, signature: u32) -> Option<usize> {
    let len_and_type = be_u64(buf, at)?;
    if len_and_type & 0xff > 1 {
        return None; // compression: none or lz4
    }
    let len = usize::try_from(len_and_type >> 8).ok()?;
    let footer = usize::try_from(be_u64(buf, at + 8)?).ok()?;
    if footer < RECORD_HEADER || footer + CHECKSUM >= len || at.checked_add(len)? > buf.len() {
        return None;
    }
    let footer_bytes = &buf[at + footer..at + len - CHECKSUM];
    if crc32fast::hash(footer_bytes) != le_u32(buf, at + len - CHECKSUM)? ^ signature {
        return None;
    }
    if footer > RECORD_HEADER {
        if footer < RECORD_HEADER + CHECKSUM {
            return None;
        }
        let entries = &buf[at + RECORD_HEADER..at + footer - CHECKSUM];
        if crc32fast::hash(entries) != le_u32(buf, at + footer - CHECKSUM)? {
            return None;
        }
    }
    Some(len)
}

/// Checks one log file (`seq` from its name).
pub fn check_file(path: &Path, seq: u64) -> Result<TailState, StorageError> {
    let shown = path.display().to_string();
    let buf = std::fs::read(path).map_err(StorageError::io(format!("read {shown}")))?;
    if buf.len() < MAGIC.len() + 8 || !buf.starts_with(MAGIC) {
        // An empty or headerless newest file is what a crash right after
        // creating it leaves; raft-engine handles it.
        return Ok(TailState::TornAt(0));
    }
    let (start, signature) = match be_u64(&buf, MAGIC.len()) {
        Some(1) => (MAGIC.len() + 8, 0),
        Some(2) => {
            if be_u64(&buf, MAGIC.len() + 8) != Some(0) {
                return Ok(TailState::Clean); // an aligned layout: not ours to judge
            }
            (MAGIC.len() + 16, seq as u32)
        }
        _ => return Ok(TailState::Clean), // a version this check does not know
    };
    let mut at = start;
    while at + RECORD_HEADER <= buf.len() {
        match record_at(&buf, at, signature) {
            Some(len) => at += len,
            None => {
                if buf[at..].iter().all(|b| *b == 0) {
                    return Ok(TailState::ZeroTailAt(at));
                }
                if let Some(later) =
                    (at + 1..buf.len().saturating_sub(RECORD_HEADER)).find(|p| record_at(&buf, *p, signature).is_some())
                {
                    return Err(StorageError::Corrupt(format!(
                        "{shown}: the record at byte {at} is damaged but a complete record follows at byte {later}: \
                         this is not a torn last write, entries the node fsynced (and may have acknowledged) would be lost"
                    )));
                }
                return Ok(TailState::TornAt(at));
            }
        }
    }
    Ok(TailState::Clean)
}

/// Truncates `path` to `at` bytes, durably.
fn cut_at(path: &Path, at: usize) -> Result<(), StorageError> {
    let shown = path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(StorageError::io(format!("open {shown}")))?;
    file.set_len(at as u64)
        .and_then(|()| file.sync_all())
        .map_err(StorageError::io(format!("truncate {shown}")))
}

/// Checks the newest file of each queue (`*.raftlog`, `*.rewrite`) in `dir`.
/// Older files are raft-engine's to check: it refuses damage in them.
pub fn check_newest_files(dir: &Path) -> Result<(), StorageError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let mut newest: [Option<(u64, std::path::PathBuf)>; 2] = [None, None];
    for entry in entries.flatten() {
        let path = entry.path();
        let queue = match path.extension().and_then(|x| x.to_str()) {
            Some("raftlog") => 0,
            Some("rewrite") => 1,
            _ => continue,
        };
        let Some(seq) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if newest[queue].as_ref().is_none_or(|(s, _)| seq > *s) {
            newest[queue] = Some((seq, path));
        }
    }
    for (seq, path) in newest.into_iter().flatten() {
        match check_file(&path, seq)? {
            // A headerless file is raft-engine's to rewrite.
            TailState::TornAt(0) | TailState::Clean => {}
            // Preallocated space after the last record: cut as raft-engine
            // would, so it has nothing to warn about.
            TailState::ZeroTailAt(at) => cut_at(&path, at)?,
            TailState::TornAt(at) => {
                // Cut here, as raft-engine would, so it finds nothing to
                // warn about: this is what a crash leaves, not damage.
                let shown = path.display().to_string();
                cut_at(&path, at)?;
                tracing::info!(
                    file = %shown,
                    offset = at,
                    "the raft log's last write was cut short by a crash; it was never fsynced, so never \
                     acknowledged: it is dropped and nothing acknowledged was lost"
                );
            }
        }
    }
    Ok(())
}
