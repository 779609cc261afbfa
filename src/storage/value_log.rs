//! Values out of the kv table: the value log, `DATA_DIR/values/`.
//!
//! Why: a flush spreads its writes over the whole key space, so it rewrites
//! nearly every leaf of the kv table, and what that costs grows with the
//! bytes each entry holds. With 256-byte values inline, a flush cost about
//! 11 µs per key at 540k keys; with ~40-byte headers in the table and the
//! values appended here, about 5 µs including garbage collection
//! (`bench/redb_layouts`: `inline` against `value-log-gc`).
//!
//! A kv record whose value is at least [`INLINE_MAX`] bytes holds a
//! [`ValueRef`] instead of the value; smaller values stay inline (a second
//! read would cost more than it saves), so a store written before the log
//! existed is valid as it is.
//!
//! Segments are `NNNNNNNN.seg`, each a run of records:
//!
//! ```text
//! crc32 (4 bytes LE, over the rest) | key length (4 LE) | value length (4 LE) | key | value
//! ```
//!
//! A flush appends the values it moves here to the head segment, fsyncs it,
//! and then commits, in the same redb transaction as the kv records, the
//! `value_segments` table: each segment's committed length and the bytes of
//! it that live records still point to. So after a crash, at open: bytes
//! past a segment's committed length come from a flush that never committed
//! (cut off); a file the table does not list was never committed or was
//! collected (deleted); a listed file that is missing or shorter, a record
//! whose checksum or key does not match, is damage, refused and never
//! served.
//!
//! Garbage collection runs in the flush while the segments hold more than
//! [`GC_SPACE`] times the live bytes: it reads the sealed segment with the
//! fewest live bytes through, then, within the flush's own pass over the kv
//! table in key order, appends each record a key still points to to the
//! head and rewrites that key's header (a key the flush writes anyway is
//! skipped: its record is released), and deletes the file after the
//! commit. Liveness is the key's header itself (a lookup per record), so no
//! second structure can disagree with it; the in-memory dead-record bitmaps
//! only spare lookups. In key order, the lookups and rewrites land on
//! leaves the flush's own writes touch next to them, instead of rewriting
//! leaves at random that the ordered pass then reads and writes again.
//!
//! Readers resolve refs through the [`Segments`] captured with their read
//! transaction: an open file per segment, readable after it is deleted, so
//! a view (a follower's snapshot, a backup) reads what it saw.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;
use prost::Message;
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};

use super::fs_util::sync_dir;
use super::state_store::{read_record, without_value};
use super::StorageError;
use crate::proto::{StoredValue, ValueRef};

/// The value log's directory under the data dir.
pub const VALUES_DIR: &str = "values";
/// Values shorter than this stay inline in the kv table.
pub const INLINE_MAX: usize = 64;
/// A segment is sealed once it holds about this many bytes.
pub const SEGMENT_BYTES: u64 = 32 << 20;
/// Garbage collection runs while the segments hold more than this many
/// times the live bytes. 3x: ~10% of a flush's puts moved again, against
/// ~25% at 2x (`bench/redb_layouts`, 540k keys).
pub const GC_SPACE: u64 = 3;
/// Below this many bytes in all, no collection: a small store's dead bytes
/// cost less disk than moving them costs time.
const GC_MIN_BYTES: u64 = 2 * SEGMENT_BYTES;
/// At most this many segments are collected per flush, so one flush never
/// does much more than its own writes.
const GC_SEGMENTS_PER_FLUSH: usize = 2;
/// Bytes before a record's key: checksum, key length, value length.
const RECORD_HEADER: u64 = 12;
/// Appends are written to the head file in pieces of about this size.
const WRITE_BUFFER: usize = 1 << 20;

/// Segment id -> (committed length, live bytes).
pub(super) const SEGMENTS: TableDefinition<u32, (u64, u64)> = TableDefinition::new("value_segments");

fn segment_name(id: u32) -> String {
    format!("{id:08}.seg")
}

/// The bytes a record of `key_len` and `value_len` takes in a segment.
fn record_size(key_len: usize, value_len: u64) -> u64 {
    RECORD_HEADER + key_len as u64 + value_len
}

/// One segment file, open for reads.
struct Segment {
    path: PathBuf,
    file: File,
}

/// The segments as of one moment: what a read view resolves its refs
/// through. Cheap to clone (`Arc`s).
#[derive(Default, Clone)]
pub struct Segments {
    files: BTreeMap<u32, Arc<Segment>>,
}

impl Segments {
    /// The value `value_ref` points to, checked against `key`.
    pub fn read(&self, key: &[u8], value_ref: &ValueRef) -> Result<Bytes, StorageError> {
        let segment = self.files.get(&value_ref.segment).ok_or_else(|| {
            StorageError::Corrupt(format!(
                "value log: the record of a key points to segment {}, which the value log does not have: \
                 {VALUES_DIR}/{} is missing; {REMEDY}",
                value_ref.segment,
                segment_name(value_ref.segment)
            ))
        })?;
        let size = record_size(key.len(), value_ref.len.into());
        if size > 2 * SEGMENT_BYTES.max(1 << 30) {
            // No record is this large: the ref itself is damaged (and must
            // not make us reserve that much memory).
            return Err(StorageError::Corrupt(format!(
                "state store: a key's record points to a {size}-byte value log record; {REMEDY}"
            )));
        }
        if size > WRITE_BUFFER as u64 {
            // A large record (rare): check it is all there before reserving
            // memory for it.
            let held = segment
                .file
                .metadata()
                .map_err(StorageError::io(format!("stat {}", segment.path.display())))?
                .len();
            if value_ref.offset.saturating_add(size) > held {
                return Err(StorageError::Corrupt(format!(
                    "value log: {} ends before the record at byte {} that the store points to (truncated?); {REMEDY}",
                    segment.path.display(),
                    value_ref.offset
                )));
            }
        }
        let mut record = vec![0; size as usize];
        segment.file.read_exact_at(&mut record, value_ref.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StorageError::Corrupt(format!(
                    "value log: {} ends before the record at byte {} that the store points to (truncated?); {REMEDY}",
                    segment.path.display(),
                    value_ref.offset
                ))
            } else {
                StorageError::Io {
                    context: format!("read {}", segment.path.display()),
                    source: e,
                }
            }
        })?;
        let damaged = |what: &str| damaged(&segment.path, value_ref.offset, what);
        let (stored_key, value_len) = parse_record(&record).map_err(damaged)?;
        if stored_key != key || value_len != u64::from(value_ref.len) {
            return Err(damaged("belongs to another key (the store and the value log disagree)"));
        }
        let start = size - u64::from(value_ref.len);
        Ok(Bytes::from(record).slice(start as usize..))
    }

    /// Fills in `record`'s value if the value log holds it.
    pub fn load(&self, key: &[u8], record: &mut StoredValue) -> Result<(), StorageError> {
        if let Some(value_ref) = record.value_ref.take() {
            record.value = self.read(key, &value_ref)?;
        }
        Ok(())
    }
}

/// What to do about damage found in the value log.
const REMEDY: &str = "this node can't serve its data: keep the data dir for inspection, remove the node \
                      (`kvraft remove-node`) and add a fresh one under a new id";

/// A whole record's bytes (`record`, exactly one record long): its key and
/// value length, once the checksum matches.
fn parse_record(record: &[u8]) -> Result<(&[u8], u64), &'static str> {
    let header = RECORD_HEADER as usize;
    if record.len() < header {
        return Err("is cut short");
    }
    let crc = u32::from_le_bytes(record[0..4].try_into().expect("4 bytes"));
    let key_len = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")) as usize;
    let value_len = u32::from_le_bytes(record[8..12].try_into().expect("4 bytes")) as u64;
    if (header + key_len) as u64 + value_len != record.len() as u64 {
        return Err("has lengths that do not fit it");
    }
    if crc32fast::hash(&record[4..]) != crc {
        return Err("fails its checksum");
    }
    Ok((&record[header..header + key_len], value_len))
}

/// Appends one record to `out`.
fn encode_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// A segment's length (as committed, or as written during a flush) and the
/// bytes of it live records point to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SegmentStats {
    len: u64,
    live: u64,
}

/// The segment appends go to.
struct Head {
    id: u32,
    file: File,
    /// Bytes in the file, with those still in `buffer`.
    len: u64,
    buffer: Vec<u8>,
}

impl Head {
    fn write_out(&mut self, path: &Path) -> Result<(), StorageError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let at = self.len - self.buffer.len() as u64;
        self.file
            .write_all_at(&self.buffer, at)
            .map_err(StorageError::io(format!("write {}", path.display())))?;
        start_writeback(&self.file, at, self.buffer.len() as u64);
        self.buffer.clear();
        Ok(())
    }
}

/// Reserves a new segment's blocks up front, its size unchanged (reads see
/// only what was written): appends then allocate nothing, so the journal
/// commits that the raft log's fsyncs wait for carry no new blocks of ours.
/// Advisory: without it appends allocate as they go.
fn preallocate(file: &File, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate only reads its integer arguments; the fd is open
    // for as long as `file` is borrowed.
    unsafe {
        libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len as i64);
    }
}

/// Asks the kernel to start writing `len` bytes at `at` back to the disk
/// now, without waiting (as RocksDB's `bytes_per_sync`): the fsync before a
/// flush's commit then waits for less, and the disk is not handed a whole
/// flush's values at once, in front of the raft log's own fsyncs. Advisory:
/// an error shows at the fsync.
fn start_writeback(file: &File, at: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // open for as long as `file` is borrowed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), at as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Records of one segment known dead: bit `offset / 64` (every record is
/// longer than 64 bytes, so each has its own bit).
#[derive(Default)]
struct DeadRecords(Vec<u64>);

impl DeadRecords {
    fn mark(&mut self, offset: u64) {
        let bit = offset / 64;
        let word = (bit / 64) as usize;
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (bit % 64);
    }

    fn contains(&self, offset: u64) -> bool {
        let bit = offset / 64;
        self.0
            .get((bit / 64) as usize)
            .is_some_and(|word| word & (1 << (bit % 64)) != 0)
    }
}

/// The writer's state: only flushes (one at a time) and installs touch it.
struct Writer {
    /// Every segment the store lists, with this flush's changes.
    stats: BTreeMap<u32, SegmentStats>,
    /// Records known dead since the log was opened, by segment. Collection
    /// skips their key lookups (most records of the
    /// segment it collects are dead). Only a hint, kept in memory: a record
    /// not marked is looked up, and a dead record never comes back to life
    /// (a new ref always points to a new append).
    dead: HashMap<u32, DeadRecords>,
    head: Option<Head>,
    next_id: u32,
    /// Segment size and the size below which nothing is collected (the
    /// constants, but small in tests).
    segment_bytes: u64,
    gc_min_bytes: u64,
    /// A flush failed part-way: what is in memory no longer matches the
    /// file (the node stops; a restart reopens from the file).
    broken: bool,
}

/// The value log of one store.
pub struct ValueLog {
    dir: PathBuf,
    /// The segments readers resolve through. A reader holds the read lock
    /// while it begins its read transaction and clones this, and a flush
    /// drops a collected segment (under the write lock) only after the
    /// commit that moved its records: a transaction that still points into
    /// a segment always finds it. New segments are added before any commit
    /// refers to them.
    current: RwLock<Arc<Segments>>,
    writer: Mutex<Writer>,
    /// Bytes in all segments, and live bytes, as of the last commit (for
    /// metrics).
    total_bytes: AtomicU64,
    live_bytes: AtomicU64,
}

impl std::fmt::Debug for ValueLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValueLog").field("dir", &self.dir).finish()
    }
}

impl ValueLog {
    /// Opens the value log of `data_dir` as the store's last commit (`txn`)
    /// lists it: cuts what no commit covers, refuses what a commit covers
    /// but the disk lacks.
    pub fn open(data_dir: &Path, txn: &ReadTransaction) -> Result<Self, StorageError> {
        let dir = data_dir.join(VALUES_DIR);
        let listed = read_listed(txn)?;
        if !dir.exists() {
            if let Some(id) = listed.keys().next() {
                return Err(StorageError::Corrupt(format!(
                    "value log: {} is missing, but the store lists {} segments in it (first {}); {REMEDY}",
                    dir.display(),
                    listed.len(),
                    segment_name(*id)
                )));
            }
            super::create_private_dir(&dir)?;
            // The new directory's entry must outlive a crash before any
            // commit lists a segment in it.
            sync_dir(data_dir)?;
        }
        let mut on_disk = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).map_err(StorageError::io(format!("list {}", dir.display())))? {
            let entry = entry.map_err(StorageError::io(format!("list {}", dir.display())))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if listed.contains_key(&id) {
                on_disk.insert(id);
                continue;
            }
            // Created by a flush that never committed, or collected by one
            // that did, before the file went: nothing points into it.
            tracing::info!(file = %entry.path().display(), "removing a value log segment no commit refers to");
            std::fs::remove_file(entry.path())
                .map_err(StorageError::io(format!("remove {}", entry.path().display())))?;
            on_disk.insert(id);
        }
        let next_id = on_disk.iter().chain(listed.keys()).max().map_or(1, |id| id + 1);
        // Only the newest listed segment takes appends, so only it can hold
        // bytes no commit covers.
        let newest = listed.keys().next_back().copied();
        let mut files = BTreeMap::new();
        for (&id, stats) in &listed {
            let path = dir.join(segment_name(id));
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    StorageError::Corrupt(format!(
                        "value log: {} is missing, but the store's last commit points into it; {REMEDY}",
                        path.display()
                    ))
                } else {
                    StorageError::Io {
                        context: format!("open {}", path.display()),
                        source: e,
                    }
                }
            })?;
            let len = file
                .metadata()
                .map_err(StorageError::io(format!("stat {}", path.display())))?
                .len();
            if len < stats.len {
                return Err(StorageError::Corrupt(format!(
                    "value log: {} holds {len} bytes, but the store committed {} bytes of it: values of keys \
                     this node acknowledged are lost; {REMEDY}",
                    path.display(),
                    stats.len
                )));
            }
            if len > stats.len && Some(id) != newest {
                return Err(StorageError::Corrupt(format!(
                    "value log: {} holds {len} bytes, but the store committed {} and only the newest segment \
                     takes appends: the store's segment table is damaged; {REMEDY}",
                    path.display(),
                    stats.len
                )));
            }
            if len > stats.len {
                // Appended by a flush that crashed before its commit: the
                // raft log replays those entries.
                file.set_len(stats.len)
                    .and_then(|()| file.sync_all())
                    .map_err(StorageError::io(format!("truncate {}", path.display())))?;
            }
            files.insert(id, Arc::new(Segment { path, file }));
        }
        sync_dir(&dir)?;
        // The newest segment takes appends while it has room.
        let head = match listed.iter().next_back() {
            Some((&id, stats)) if stats.len < SEGMENT_BYTES => {
                let file = files[&id]
                    .file
                    .try_clone()
                    .map_err(StorageError::io(format!("open {}", files[&id].path.display())))?;
                Some(Head {
                    id,
                    file,
                    len: stats.len,
                    buffer: Vec::new(),
                })
            }
            _ => None,
        };
        let log = ValueLog {
            dir,
            current: RwLock::new(Arc::new(Segments { files })),
            writer: Mutex::new(Writer {
                stats: listed,
                dead: HashMap::new(),
                head,
                next_id,
                segment_bytes: SEGMENT_BYTES,
                gc_min_bytes: GC_MIN_BYTES,
                broken: false,
            }),
            total_bytes: AtomicU64::new(0),
            live_bytes: AtomicU64::new(0),
        };
        log.publish_totals(&log.writer.lock().expect("value log lock poisoned"));
        Ok(log)
    }

    /// Begins a read transaction of `db` with the segments it may point
    /// into.
    pub fn begin_read(&self, db: &redb::Database) -> Result<(ReadTransaction, Arc<Segments>), StorageError> {
        let current = self.current.read().expect("segments lock poisoned");
        let txn = db.begin_read()?;
        Ok((txn, current.clone()))
    }

    /// Sets the segment size and the size from which garbage is collected
    /// (tests: small stores that still rotate and collect).
    #[cfg(test)]
    pub(super) fn set_limits(&self, segment_bytes: u64, gc_min_bytes: u64) {
        let mut writer = self.writer.lock().expect("value log lock poisoned");
        writer.segment_bytes = segment_bytes;
        writer.gc_min_bytes = gc_min_bytes;
    }

    /// The ids of the segments the log lists (tests: it waits for a
    /// running flush).
    #[cfg(test)]
    pub(super) fn segment_ids(&self) -> Vec<u32> {
        self.writer
            .lock()
            .expect("value log lock poisoned")
            .stats
            .keys()
            .copied()
            .collect()
    }

    /// Bytes in all segments and live bytes, as of the last commit.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.total_bytes.load(Ordering::Relaxed),
            self.live_bytes.load(Ordering::Relaxed),
        )
    }

    fn publish_totals(&self, writer: &Writer) {
        let (total, live) = writer.stats.values().fold((0, 0), |(t, l), s| (t + s.len, l + s.live));
        self.total_bytes.store(total, Ordering::Relaxed);
        self.live_bytes.store(live, Ordering::Relaxed);
    }

    /// Starts a flush's part in the log (one at a time: the store's flush
    /// lock is held).
    pub fn begin_flush(&self) -> Result<LogFlush<'_>, StorageError> {
        let writer = self.writer.lock().expect("value log lock poisoned");
        if writer.broken {
            return Err(StorageError::Store(
                "an earlier flush failed part-way; restart the node".into(),
            ));
        }
        Ok(LogFlush {
            log: self,
            writer,
            created: false,
            touched: BTreeSet::new(),
            collected: Vec::new(),
            committed: false,
        })
    }

    /// Forgets every segment: the store was replaced by one that holds its
    /// values inline (an installed snapshot). Call with the swap of the
    /// store, under the lock readers take it with; then
    /// [`Self::remove_unlisted`].
    pub fn reset(&self) {
        let mut writer = self.writer.lock().expect("value log lock poisoned");
        writer.stats.clear();
        writer.dead.clear();
        writer.head = None;
        writer.broken = false;
        self.publish_totals(&writer);
        *self.current.write().expect("segments lock poisoned") = Arc::new(Segments::default());
    }

    /// Deletes segment files the log no longer lists (after [`Self::reset`]):
    /// readers that hold them keep reading them.
    pub fn remove_unlisted(&self) -> Result<(), StorageError> {
        let writer = self.writer.lock().expect("value log lock poisoned");
        let entries = std::fs::read_dir(&self.dir).map_err(StorageError::io(format!("list {}", self.dir.display())))?;
        for entry in entries.flatten() {
            let listed = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|id| writer.stats.contains_key(&id));
            if !listed && entry.path().extension().is_some_and(|x| x == "seg") {
                std::fs::remove_file(entry.path())
                    .map_err(StorageError::io(format!("remove {}", entry.path().display())))?;
            }
        }
        sync_dir(&self.dir)
    }
}

/// The segments a store file lists.
fn read_listed(txn: &ReadTransaction) -> Result<BTreeMap<u32, SegmentStats>, StorageError> {
    let table = match txn.open_table(SEGMENTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
        Err(e) => return Err(e.into()),
    };
    let mut listed = BTreeMap::new();
    for item in table.iter()? {
        let (id, stats) = item?;
        let (len, live) = stats.value();
        listed.insert(id.value(), SegmentStats { len, live });
    }
    Ok(listed)
}

/// What one flush collects: the segments chosen, and the records in them
/// no release marked dead, by key (see [`LogFlush::plan_collection`]).
pub struct Collection {
    /// The segments as the flush began, victims among them: moved values
    /// are read through it (taken once, not per key the flush writes).
    segments: Arc<Segments>,
    victims: Vec<u32>,
    /// Sorted by key; those before `next` are done.
    candidates: Vec<Candidate>,
    next: usize,
}

/// A record that may still be live: moved if its key's header points to it.
struct Candidate {
    key: Vec<u8>,
    here: ValueRef,
}

/// The error for a damaged record at `offset` of the segment at `path`.
fn damaged(path: &Path, offset: u64, what: &str) -> StorageError {
    StorageError::Corrupt(format!(
        "value log: the record at byte {offset} of {} {what}; {REMEDY}",
        path.display()
    ))
}

/// One flush's changes to the value log. Dropped without
/// [`LogFlush::committed`], the log refuses further flushes.
pub struct LogFlush<'a> {
    log: &'a ValueLog,
    writer: MutexGuard<'a, Writer>,
    /// A segment was created: the directory needs an fsync before the commit.
    created: bool,
    /// Segments whose stats changed (to write), or went (to remove).
    touched: BTreeSet<u32>,
    /// Segments collected: deleted after the commit.
    collected: Vec<u32>,
    committed: bool,
}

impl Drop for LogFlush<'_> {
    fn drop(&mut self) {
        if !self.committed {
            self.writer.broken = true;
        }
    }
}

impl LogFlush<'_> {
    /// The header to write for `record` (which holds its value inline):
    /// the record itself if its value is small, else with the value
    /// appended to the log and a ref in its place.
    pub fn store(&mut self, key: &[u8], record: &StoredValue) -> Result<StoredValue, StorageError> {
        debug_assert!(record.value_ref.is_none(), "memory holds values inline");
        if record.value.len() < INLINE_MAX {
            return Ok(record.clone());
        }
        let value_ref = self.append(key, &record.value)?;
        Ok(without_value(record, Some(value_ref)))
    }

    /// `old`, the record the file held for `key`, was replaced or removed:
    /// its value in the log is dead.
    pub fn release(&mut self, key: &[u8], old: &StoredValue) -> Result<(), StorageError> {
        let Some(value_ref) = &old.value_ref else {
            return Ok(());
        };
        let Some(stats) = self.writer.stats.get_mut(&value_ref.segment) else {
            return Err(StorageError::Corrupt(format!(
                "value log: a key's record points to segment {}, which the store does not list; {REMEDY}",
                value_ref.segment
            )));
        };
        let size = record_size(key.len(), value_ref.len.into());
        // A damaged ref must not mark another key's record dead (collection
        // would then drop it) nor size the bitmap.
        if value_ref.offset.saturating_add(size) > stats.len || stats.live < size {
            return Err(StorageError::Corrupt(format!(
                "value log: a key's record points to bytes {}..{} of segment {}, which the store does not account \
                 for ({} bytes, {} live); {REMEDY}",
                value_ref.offset,
                value_ref.offset.saturating_add(size),
                value_ref.segment,
                stats.len,
                stats.live
            )));
        }
        stats.live -= size;
        self.writer
            .dead
            .entry(value_ref.segment)
            .or_default()
            .mark(value_ref.offset);
        self.touched.insert(value_ref.segment);
        Ok(())
    }

    fn append(&mut self, key: &[u8], value: &[u8]) -> Result<ValueRef, StorageError> {
        let size = record_size(key.len(), value.len() as u64);
        let full = self
            .writer
            .head
            .as_ref()
            .is_none_or(|h| h.len > 0 && h.len + size > self.writer.segment_bytes);
        if full {
            self.rotate()?;
        }
        let log = self.log;
        let writer = &mut *self.writer;
        let head = writer.head.as_mut().expect("a head segment is open");
        let offset = head.len;
        encode_record(&mut head.buffer, key, value);
        head.len += size;
        let id = head.id;
        if head.buffer.len() >= WRITE_BUFFER {
            head.write_out(&log.dir.join(segment_name(id)))?;
        }
        let stats = writer.stats.get_mut(&id).expect("the head is listed");
        stats.len = head.len;
        stats.live += size;
        self.touched.insert(id);
        Ok(ValueRef {
            segment: id,
            offset,
            len: value.len() as u32,
        })
    }

    /// Seals the head (written out and fsynced) and starts a new segment.
    fn rotate(&mut self) -> Result<(), StorageError> {
        if let Some(mut head) = self.writer.head.take() {
            let path = self.log.dir.join(segment_name(head.id));
            head.write_out(&path)?;
            head.file
                .sync_data()
                .map_err(StorageError::io(format!("fsync {}", path.display())))?;
        }
        let id = self.writer.next_id;
        self.writer.next_id += 1;
        let path = self.log.dir.join(segment_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(StorageError::io(format!("create {}", path.display())))?;
        preallocate(&file, self.writer.segment_bytes);
        let reader = file
            .try_clone()
            .map_err(StorageError::io(format!("open {}", path.display())))?;
        {
            // Readable before any commit points into it.
            let mut current = self.log.current.write().expect("segments lock poisoned");
            let mut next = Segments::clone(&current);
            next.files.insert(id, Arc::new(Segment { path, file: reader }));
            *current = Arc::new(next);
        }
        self.writer.stats.insert(id, SegmentStats::default());
        self.writer.head = Some(Head {
            id,
            file,
            len: 0,
            buffer: Vec::with_capacity(WRITE_BUFFER + (64 << 10)),
        });
        self.touched.insert(id);
        self.created = true;
        Ok(())
    }

    /// Chooses the segments this flush collects, while the log holds more
    /// than [`GC_SPACE`] times its live bytes (at most two), and reads each
    /// through for the records no release marked dead. The flush then moves
    /// them in key order ([`Self::move_collected`]) within its own ordered
    /// pass over the kv table, and [`Self::finish_collection`] drops the
    /// segments.
    pub fn plan_collection(&mut self) -> Result<Collection, StorageError> {
        let mut collection = Collection {
            segments: Arc::clone(&self.log.current.read().expect("segments lock poisoned")),
            victims: Vec::new(),
            candidates: Vec::new(),
            next: 0,
        };
        while collection.victims.len() < GC_SEGMENTS_PER_FLUSH {
            let Some(victim) = self.victim(&collection.victims) else {
                break;
            };
            self.read_victim(victim, &mut collection)?;
        }
        // Stable: a key's records in one segment keep their order (only the
        // one its header points to moves anyway).
        collection.candidates.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(collection)
    }

    /// The sealed segment with the smallest share of live bytes, if the log
    /// still needs collecting once the `chosen` ones are (their live bytes
    /// then sit in the head).
    fn victim(&self, chosen: &[u32]) -> Option<u32> {
        let is_chosen = |id: u32| chosen.contains(&id);
        let (total, live) = self
            .writer
            .stats
            .iter()
            .map(|(id, s)| {
                if is_chosen(*id) {
                    (s.live, s.live)
                } else {
                    (s.len, s.live)
                }
            })
            .fold((0u64, 0u64), |(t, l), (len, live)| (t + len, l + live));
        if total < self.writer.gc_min_bytes || total <= GC_SPACE * live {
            return None;
        }
        let head = self.writer.head.as_ref().map(|h| h.id);
        self.writer
            .stats
            .iter()
            // Moving a mostly live segment frees little (dead bytes may sit
            // in the head, which waits until it is sealed).
            .filter(|(id, s)| Some(**id) != head && !is_chosen(**id) && s.live * 2 < s.len)
            // live / len, compared without division.
            .min_by(|(_, a), (_, b)| {
                (u128::from(a.live) * u128::from(b.len)).cmp(&(u128::from(b.live) * u128::from(a.len)))
            })
            .map(|(id, _)| *id)
    }

    /// Reads `victim` through, checking every record, and adds the ones no
    /// release marked dead to `collection`'s candidates (keys and refs only:
    /// values are read again when moved, checked as any read is, from the
    /// page cache this read just filled).
    fn read_victim(&mut self, victim: u32, collection: &mut Collection) -> Result<(), StorageError> {
        let path = self.log.dir.join(segment_name(victim));
        let len = self.writer.stats[&victim].len;
        // Records this flush releases in the segment are marked in a fresh
        // bitmap, dropped with the segment.
        let dead = self.writer.dead.remove(&victim).unwrap_or_default();
        let file = File::open(&path).map_err(StorageError::io(format!("open {}", path.display())))?;
        let mut reader = BufReader::with_capacity(WRITE_BUFFER, file);
        let mut record = Vec::new();
        let mut offset = 0u64;
        while offset < len {
            record.resize(RECORD_HEADER as usize, 0);
            reader
                .read_exact(&mut record)
                .map_err(|_| damaged(&path, offset, "is cut short"))?;
            let key_len = u32::from_le_bytes(record[4..8].try_into().expect("4 bytes")) as u64;
            let value_len = u32::from_le_bytes(record[8..12].try_into().expect("4 bytes")) as u64;
            let size = RECORD_HEADER + key_len + value_len;
            if offset + size > len {
                return Err(damaged(&path, offset, "runs past the segment's committed end"));
            }
            record.resize(size as usize, 0);
            reader
                .read_exact(&mut record[RECORD_HEADER as usize..])
                .map_err(|_| damaged(&path, offset, "is cut short"))?;
            let (key, _) = parse_record(&record).map_err(|what| damaged(&path, offset, what))?;
            if !dead.contains(offset) {
                collection.candidates.push(Candidate {
                    key: key.to_vec(),
                    here: ValueRef {
                        segment: victim,
                        offset,
                        len: value_len as u32,
                    },
                });
            }
            offset += size;
        }
        collection.victims.push(victim);
        Ok(())
    }

    /// Moves the candidates of `collection` whose keys sort before `until`
    /// (all that are left, for `None`): each record a key's header still
    /// points to is appended to the head and the header rewritten. The
    /// candidates for `until` itself are dropped: the flush is about to
    /// write that key, which releases its record.
    pub fn move_collected(
        &mut self,
        collection: &mut Collection,
        until: Option<&[u8]>,
        kv: &mut redb::Table<&'static [u8], &'static [u8]>,
    ) -> Result<(), StorageError> {
        while let Some(candidate) = collection.candidates.get(collection.next) {
            let order = until.map(|until| candidate.key.as_slice().cmp(until));
            if order == Some(std::cmp::Ordering::Greater) {
                break;
            }
            collection.next += 1;
            if order == Some(std::cmp::Ordering::Equal) {
                continue;
            }
            let key = candidate.key.as_slice();
            let here = &candidate.here;
            let Some(header) = read_record(Some(&*kv), key)?.filter(|h| h.value_ref.as_ref() == Some(here)) else {
                continue;
            };
            // Checked like any read: checksum, key, length.
            let value = collection.segments.read(key, here)?;
            let value_ref = self.append(key, &value)?;
            let moved_header = StoredValue {
                value_ref: Some(value_ref),
                ..header
            };
            kv.insert(key, moved_header.encode_to_vec().as_slice())?;
        }
        Ok(())
    }

    /// Drops the segments `collection` read (their live records moved): off
    /// the segment table at this flush's commit, deleted after it.
    pub fn finish_collection(&mut self, collection: Collection) {
        debug_assert_eq!(
            collection.next,
            collection.candidates.len(),
            "every candidate was passed"
        );
        for victim in collection.victims {
            self.writer.stats.remove(&victim);
            self.writer.dead.remove(&victim);
            self.touched.insert(victim);
            self.collected.push(victim);
        }
    }

    /// Makes this flush's appends durable and writes the segment table into
    /// `txn`: call just before committing it.
    pub fn prepare(&mut self, txn: &WriteTransaction) -> Result<(), StorageError> {
        let dir = self.log.dir.clone();
        if let Some(head) = self.writer.head.as_mut() {
            if self.touched.contains(&head.id) {
                let path = dir.join(segment_name(head.id));
                head.write_out(&path)?;
                head.file
                    .sync_data()
                    .map_err(StorageError::io(format!("fsync {}", path.display())))?;
            }
        }
        if self.created {
            sync_dir(&dir)?;
        }
        let mut table = txn.open_table(SEGMENTS)?;
        for id in &self.touched {
            match self.writer.stats.get(id) {
                Some(stats) => table.insert(id, (stats.len, stats.live))?,
                None => table.remove(id)?,
            };
        }
        Ok(())
    }

    /// The transaction [`Self::prepare`] wrote into committed durably:
    /// collected segments go (views that hold them keep reading them).
    pub fn committed(mut self) {
        self.committed = true;
        self.log.publish_totals(&self.writer);
        if self.collected.is_empty() {
            return;
        }
        {
            let mut current = self.log.current.write().expect("segments lock poisoned");
            let mut next = Segments::clone(&current);
            for id in &self.collected {
                next.files.remove(id);
            }
            *current = Arc::new(next);
        }
        for id in &self.collected {
            let path = self.log.dir.join(segment_name(*id));
            // Left behind, it is removed at the next open (no commit lists it).
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "could not remove a collected value log segment");
            }
        }
        let _ = sync_dir(&self.log.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_damage_is_named() {
        let mut bytes = Vec::new();
        encode_record(&mut bytes, b"key", b"value");
        assert_eq!(parse_record(&bytes), Ok((&b"key"[..], 5)));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(parse_record(&flipped), Err("fails its checksum"));
        assert_eq!(
            parse_record(&bytes[..bytes.len() - 1]),
            Err("has lengths that do not fit it")
        );
        assert_eq!(parse_record(&bytes[..5]), Err("is cut short"));
    }

    #[test]
    fn dead_records_are_told_apart_by_offset() {
        let mut dead = DeadRecords::default();
        // Records at least 65 bytes apart, within one word and across words.
        for offset in [0, 65, 4096 * 64 + 130] {
            dead.mark(offset);
        }
        for offset in [0, 65, 4096 * 64 + 130] {
            assert!(dead.contains(offset), "{offset}");
        }
        for offset in [130, 4096 * 64, 1 << 30] {
            assert!(!dead.contains(offset), "{offset}");
        }
    }
}
