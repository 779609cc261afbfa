//! The state machine's data on disk: one redb database, `DATA_DIR/state.redb`.
//!
//! Tables (the schema; see `proto/kvraft.proto` for the records):
//!
//! ```text
//! meta   "state"  -> SnapshotHeader: applied index and term, ConfState,
//!                    members, removed ids, cluster id, format
//! meta   "history_start", "history_bytes" -> big-endian u64 (see history.rs)
//! kv     user key -> StoredValue: value (or, from 64 bytes on, a ref to its
//!        record in the value log, value_log.rs), create/mod revision,
//!        version, lease
//! value_segments segment id -> (committed length, live bytes) (value_log.rs)
//! history_chunks revision (8 bytes BE) + place in it (4 bytes BE) of its
//!        first change -> HistoryChunk (consecutive changes, see history.rs)
//! leases     lease id (8 bytes BE) -> LeaseRecord
//! lease_keys lease id (8 bytes BE) + user key -> (empty)
//! ```
//!
//! The raft loop applies each batch of committed entries to the in-memory
//! [`Memtable`] in front of the file (cheap, on the raft thread). A flush moves
//! all of it into redb in one durable write transaction that also writes
//! `meta`, so the file's data and applied index never disagree. The flusher
//! thread flushes every five seconds (and sooner when asked or when memory
//! fills);
//! the log is compacted only behind the flushed index. After a crash redb
//! comes back at its last flush and raft replays the entries after it.
//!
//! Readers see memory over the file. Views for snapshots and backups are
//! read transactions of the file, as of a flush.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use prost::Message;
use redb::{Database, Durability, ReadTransaction, ReadableTableMetadata, TableDefinition};

use super::flush_schedule::FlushSchedule;
use super::history::{self, read_counter, Retention};
use super::lease_tables::{self, LEASES, LEASE_KEYS};
use super::memtable::{self, Applied, Memtable};
use super::read_cache::{ReadCache, ReadCacheStats};
use super::value_log::{Segments, ValueLog};
use super::StorageError;
use crate::leases::Leases;
use crate::proto::{KeyValue, SnapshotHeader, StoredValue, ValueRef};
use crate::sessions::Sessions;

/// The store's file under the data dir.
pub const STORE_FILE: &str = "state.redb";
/// Where received snapshots are built and verified before they are installed.
pub const INCOMING_DIR: &str = "snapshot-incoming";
/// The record format this code writes (`SnapshotHeader::format`).
pub const FORMAT: u32 = 1;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(super) const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const META_STATE: &str = "state";
/// `SnapshotRecord::table` of the kv table.
pub const TABLE_KV: u32 = 1;
/// `SnapshotRecord::table` of the `leases` table.
pub const TABLE_LEASES: u32 = 2;
/// `SnapshotRecord::table` of the `lease_keys` table.
pub const TABLE_LEASE_KEYS: u32 = 3;

/// A pinned view for a follower is dropped after this long unused: it holds
/// pages the store can't reuse.
const PIN_TTL: Duration = Duration::from_secs(120);
/// The flusher flushes this often while anything is applied: it bounds what
/// a restart replays.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// The flusher starts early once this many bytes of changes wait in memory
/// (with 256-byte values, about 5 s of writes at 13k/s). With writes spread
/// over many keys a flush rewrites most B-tree leaves whatever its size, so
/// a larger flush costs less per write: at ~530k keys, moving from 16 MiB
/// (and a 64 MiB page cache) to 48 MiB (and 32 MiB) cut the CPU per put of
/// a 3-node cluster from 156 to 120 µs, for about the same peak memory
/// (bench/scale.sh: 196 against 190 MiB).
const FLUSH_EARLY_BYTES: usize = 48 << 20;
/// The read cache's size unless the node is configured otherwise
/// ([`StateStore::with_read_cache`]): some 16,000 records of a 16-byte key
/// and a 256-byte value.
pub const DEFAULT_READ_CACHE_BYTES: usize = 8 << 20;
/// With this many bytes waiting (a flush is slower than the writes), the
/// raft loop waits for the running flush before it applies more: memory
/// stays bounded.
const HOLD_BYTES: usize = 128 << 20;

impl From<redb::Error> for StorageError {
    fn from(e: redb::Error) -> Self {
        match e {
            redb::Error::Corrupted(what) => StorageError::Corrupt(format!("state store: {what}")),
            other => StorageError::Store(other.to_string()),
        }
    }
}

macro_rules! store_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                redb::Error::from(e).into()
            }
        }
    )*};
}
store_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The state machine's store. Cheap to share (`Arc`); one writer at a time
/// (the raft loop), any number of readers, which wait for it only while a
/// batch is merged into memory (and it for them only while a scan copies
/// its part of memory).
pub struct StateStore {
    dir: PathBuf,
    cache_bytes: usize,
    /// Swapped whole when a snapshot from the leader is installed; readers
    /// holding the old one finish on it. `None` once closed.
    db: RwLock<Option<Arc<Database>>>,
    /// Applied changes not yet in the file. Read-locked by readers for a
    /// lookup (and while they take the file's handle, so both agree),
    /// write-locked by the raft loop to add a batch and by a flush.
    pub(super) mem: RwLock<Memtable>,
    /// The applied index of the last flush (each is fsynced).
    durable_index: AtomicU64,
    /// Shared with the flusher thread, which must not keep the store alive
    /// while it waits.
    flush: Arc<FlushControl>,
    /// Bytes waiting in memory at which the flusher starts early, and at
    /// which the raft loop waits for it ([`FLUSH_EARLY_BYTES`], [`HOLD_BYTES`]).
    memory_limits: (usize, usize),
    /// Views pinned for followers that need a snapshot, by follower id.
    pinned: Mutex<HashMap<u64, Pinned>>,
    /// The raft loop's copy of the client sessions (memory's copy follows it
    /// batch by batch); only the raft thread takes it.
    working_sessions: Mutex<Sessions>,
    /// The leases, the raft loop's copy (the file's tables follow it flush
    /// by flush); only the raft thread takes it.
    working_leases: Mutex<Leases>,
    /// How much change history flushes keep.
    retention: Mutex<Retention>,
    /// The applied index of the last batch, for watchers to wait on.
    applied: tokio::sync::watch::Sender<u64>,
    /// The first revision the file's change history holds (for metrics;
    /// readers check the file's own record).
    history_start: AtomicU64,
    /// Where the file's records point for values of 64 bytes and more.
    values: ValueLog,
    /// The read view single-key gets share until memory moves on: opening a
    /// read transaction and its table for every get cost more than the
    /// lookup. Emptied whenever the generation changes (under the memory
    /// write lock), so it never keeps an old file state or a closed file
    /// pinned.
    get_reader: Mutex<Option<Arc<FileReader>>>,
    /// Records gets read from the file, for the next get of the same key
    /// (good for one memory generation, like the shared view).
    read_cache: ReadCache,
}

/// A read view of the file kept across lookups (one batch's), good while
/// the memtable's generation has not moved on.
pub struct FileReader {
    generation: u64,
    /// `None`: the file has no key table yet.
    kv: Option<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
    /// The value log segments the view may point into.
    values: Arc<Segments>,
}

/// What memory holds of a key (see [`StateStore::memory_lookup`]).
#[derive(Debug, Clone, PartialEq)]
pub enum MemoryLookup {
    /// Its newest change (perhaps unresolved).
    Change {
        /// The change.
        change: memtable::Change,
        /// It is in the frozen layer (being flushed), not the active one.
        frozen: bool,
    },
    /// Nothing: the file has its record.
    NotHeld {
        /// The file holds no key at all.
        file_empty: bool,
    },
}

/// Coordinates the flusher thread, the raft loop's flushes and installs.
#[derive(Default)]
struct FlushControl {
    /// Held for the whole of a flush or an install: one at a time.
    running: Mutex<()>,
    state: Mutex<FlushState>,
    /// Wakes the flusher (a request, or the store closing).
    wake: Condvar,
    /// Signalled after every flush.
    flushed: Condvar,
}

#[derive(Default)]
struct FlushState {
    requested: bool,
    stopped: bool,
    /// A flusher thread runs; without one, requests are served at once.
    flusher: bool,
    /// A flush failed: the node must stop (the frozen layer stays readable).
    failed: Option<String>,
}

struct Pinned {
    view: StoreView,
    at: Instant,
}

/// A consistent read view of the whole store (a read transaction) with the
/// state it was taken at.
pub struct StoreView {
    txn: ReadTransaction,
    /// The value log segments the view may point into.
    values: Arc<Segments>,
    /// Applied index, term, membership as of this view.
    pub header: SnapshotHeader,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore").field("dir", &self.dir).finish()
    }
}

/// Opens a redb file with our cache size, failing (not blocking) if another
/// process has it.
fn open_db(path: &Path, cache_bytes: usize) -> Result<Database, StorageError> {
    let mut builder = Database::builder();
    builder.set_cache_size(cache_bytes);
    Ok(builder.create(path)?)
}

pub(super) fn read_header(txn: &ReadTransaction) -> Result<SnapshotHeader, StorageError> {
    read_state_record(txn)
}

/// The applied index in the file's state record, without decoding the rest
/// of it: the record carries the client sessions (up to
/// [`crate::sessions::MAX_SESSIONS`] of them, with their results), and every
/// watcher read that resolves a change needs only the index. Decoding a
/// message of that one field skips the others by their length.
pub(super) fn read_state_index(txn: &ReadTransaction) -> Result<u64, StorageError> {
    /// `SnapshotHeader`'s `index` field alone.
    #[derive(Clone, PartialEq, prost::Message)]
    struct StateIndex {
        #[prost(uint64, tag = "3")]
        index: u64,
    }
    Ok(read_state_record::<StateIndex>(txn)?.index)
}

/// The file's state record decoded as `M` (`SnapshotHeader`, or a message of
/// some of its fields); an empty store's when there is none yet.
fn read_state_record<M: prost::Message + Default>(txn: &ReadTransaction) -> Result<M, StorageError> {
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(M::default()),
        Err(e) => return Err(e.into()),
    };
    match meta.get(META_STATE)? {
        Some(bytes) => M::decode(bytes.value()).map_err(|e| {
            StorageError::Corrupt(format!(
                "state store: the state record does not decode ({e}): state.redb is damaged"
            ))
        }),
        None => Ok(M::default()),
    }
}

/// `record`'s revisions and lease with its value left out: at `value_ref`
/// in the value log, or nowhere (what resolving a change against it reads).
/// Field by field: `..record.clone()` would clone the value only to drop
/// it, and a clone of a value decoded from a command allocates.
pub(super) fn without_value(record: &StoredValue, value_ref: Option<ValueRef>) -> StoredValue {
    StoredValue {
        value: Default::default(),
        value_ref,
        create_revision: record.create_revision,
        mod_revision: record.mod_revision,
        version: record.version,
        lease: record.lease,
    }
}

fn decode_value(bytes: &[u8]) -> Result<StoredValue, StorageError> {
    StoredValue::decode(bytes)
        .map_err(|e| StorageError::Corrupt(format!("state store: a value record does not decode: {e}")))
}

/// A table of a read view, or `None` if the file has none yet (nothing was
/// ever written to it).
pub(super) fn open_existing<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, StorageError> {
    match txn.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A key's record in a kv table (`None`: the table is absent, or the key),
/// its value perhaps still in the value log (see [`Segments::load`]).
pub(super) fn read_record(
    kv: Option<&impl redb::ReadableTable<&'static [u8], &'static [u8]>>,
    key: &[u8],
) -> Result<Option<StoredValue>, StorageError> {
    match kv {
        Some(t) => match t.get(key)? {
            Some(bytes) => Ok(Some(decode_value(bytes.value())?)),
            None => Ok(None),
        },
        None => Ok(None),
    }
}

impl StateStore {
    /// The store file of a data dir.
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join(STORE_FILE)
    }

    /// Opens (or creates, empty) the store of a data dir, with a page cache of
    /// `cache_bytes`.
    pub fn open(data_dir: &Path, cache_bytes: usize) -> Result<Self, StorageError> {
        let db = open_db(&Self::path_in(data_dir), cache_bytes)?;
        // Whatever redb opened is what survived: its last durable commit.
        let (header, keys) = header_and_len(&db)?;
        let values = ValueLog::open(data_dir, &db.begin_read()?)?;
        if history::drop_unchunked(&db, header.index)? {
            tracing::info!("the change history is now kept in chunks; the earlier one was dropped");
        }
        let history_start = start_history(&db, header.index)?;
        let mem = Memtable::new(header.clone(), keys);
        let working_sessions = Mutex::new(mem.sessions().clone());
        let working_leases = Mutex::new(lease_tables::load(&db.begin_read()?)?);
        Ok(StateStore {
            dir: data_dir.to_path_buf(),
            cache_bytes,
            db: RwLock::new(Some(Arc::new(db))),
            durable_index: AtomicU64::new(header.index),
            mem: RwLock::new(mem),
            flush: Arc::default(),
            memory_limits: (FLUSH_EARLY_BYTES, HOLD_BYTES),
            pinned: Mutex::default(),
            working_sessions,
            working_leases,
            retention: Mutex::default(),
            applied: tokio::sync::watch::Sender::new(header.index),
            history_start: AtomicU64::new(history_start),
            values,
            get_reader: Mutex::default(),
            read_cache: ReadCache::new(DEFAULT_READ_CACHE_BYTES),
        })
    }

    /// The first revision the change history held at the last flush.
    pub fn history_start(&self) -> u64 {
        self.history_start.load(Ordering::Relaxed)
    }

    /// Sets how much change history flushes keep.
    pub fn set_history_retention(&self, retention: Retention) {
        *self.retention.lock().expect("retention lock poisoned") = retention;
    }

    /// The applied index of each batch as it is committed (and of an
    /// installed snapshot), for watchers to wait on.
    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub(super) fn db(&self) -> Result<Arc<Database>, StorageError> {
        self.db
            .read()
            .expect("store lock poisoned")
            .clone()
            .ok_or_else(|| StorageError::Store("the node has stopped; its state store is closed".into()))
    }

    /// Starts the thread that flushes memory to the file at the slots of
    /// `schedule` (or sooner when asked), off the raft thread. It stops once
    /// the store is closed or dropped.
    pub fn spawn_flusher(self: &Arc<Self>, schedule: FlushSchedule) {
        let store = Arc::downgrade(self);
        let control = self.flush.clone();
        let spawned = std::thread::Builder::new()
            .name("store-flusher".into())
            .spawn(move || loop {
                {
                    let state = control.state.lock().expect("flush lock poisoned");
                    let wait = schedule.until_next(std::time::SystemTime::now());
                    let (mut state, _) = control
                        .wake
                        .wait_timeout_while(state, wait, |s| !s.requested && !s.stopped)
                        .expect("flush lock poisoned");
                    if state.stopped || state.failed.is_some() {
                        state.flusher = false;
                        return;
                    }
                    state.requested = false;
                }
                let Some(store) = store.upgrade() else { return };
                if let Err(e) = store.flush() {
                    tracing::error!(error = %e, "flushing the state store failed; the node stops");
                    return;
                }
            });
        match spawned {
            Ok(_) => self.flush.state.lock().expect("flush lock poisoned").flusher = true,
            Err(e) => tracing::warn!(error = %e, "no store flusher thread: the raft loop flushes the store itself"),
        }
    }

    /// Asks the flusher for a flush now, without waiting for it (without a
    /// flusher thread: flushes here; a failure is kept for
    /// [`Self::flush_failure`]).
    pub fn request_flush(&self) {
        let flusher = {
            let mut state = self.flush.state.lock().expect("flush lock poisoned");
            state.requested = true;
            state.flusher
        };
        if flusher {
            self.flush.wake.notify_all();
        } else {
            let _ = self.flush();
        }
    }

    /// Writes everything applied so far to the file and fsyncs it; returns
    /// when done. Waits for a flush already running.
    pub fn flush(&self) -> Result<(), StorageError> {
        let _running = self.flush.running.lock().expect("flush lock poisoned");
        self.flush_failure()?;
        if self.flush.state.lock().expect("flush lock poisoned").stopped {
            // Closed while this flush waited: the log keeps what memory held.
            return Ok(());
        }
        let Some(frozen) = self
            .mem
            .write()
            .expect("memtable lock poisoned")
            .freeze(self.durable_index())
        else {
            return Ok(());
        };
        let started = Instant::now();
        let file_keys = match self.write_frozen(&frozen) {
            Ok(keys) => keys,
            Err(e) => {
                self.flush.state.lock().expect("flush lock poisoned").failed = Some(e.to_string());
                // A raft loop waiting past the hold limit wakes to the failure.
                self.flush.flushed.notify_all();
                return Err(e);
            }
        };
        self.durable_index.store(frozen.header.index, Ordering::Release);
        let stale_view = {
            let mut mem = self.mem.write().expect("memtable lock poisoned");
            mem.flushed(file_keys);
            self.take_get_reader()
        };
        // Outside the lock readers and the raft loop wait on: the view may
        // hold the last handles of value log segments the flush collected.
        drop(stale_view);
        // Under the state lock: a waiter checks and sleeps holding it, so it
        // can't miss this.
        let _state = self.flush.state.lock().expect("flush lock poisoned");
        self.flush.flushed.notify_all();
        metrics::histogram!(crate::metrics::STORE_CHECKPOINT_DURATION).record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The error of a flush that failed: the node can't go on (its applied
    /// state can no longer reach the file).
    pub fn flush_failure(&self) -> Result<(), StorageError> {
        match &self.flush.state.lock().expect("flush lock poisoned").failed {
            Some(e) => Err(StorageError::Store(format!(
                "a flush failed ({e}): check the disk (space, errors), then restart the node; its raft log \
                 replays what the store lacks"
            ))),
            None => Ok(()),
        }
    }

    /// One durable transaction with every change of `frozen` and its state
    /// record; returns how many keys the file then holds. Puts applied
    /// unresolved (see [`memtable::is_unresolved`]) are resolved here
    /// against the record they replace, which the file still holds and the
    /// write of the key returns.
    fn write_frozen(&self, frozen: &memtable::Frozen) -> Result<u64, StorageError> {
        let txn = self.db()?.begin_write()?;
        let mut log = self.values.begin_flush()?;
        // The record each unresolved change replaced (value dropped), by key:
        // only a key's first change in a layer can be unresolved.
        let unresolved_events: foldhash::HashSet<&[u8]> = frozen
            .events
            .iter()
            .filter(|e| memtable::is_unresolved_event(e))
            .map(|e| e.change.key.as_slice())
            .collect();
        let mut below: foldhash::HashMap<&[u8], Option<StoredValue>> =
            foldhash::HashMap::with_capacity_and_hasher(unresolved_events.len(), Default::default());
        let keys = {
            let mut kv = txn.open_table(KV)?;
            // Collection moves its records in the same pass, in key order.
            let mut collection = log.plan_collection()?;
            for (key, change) in frozen.layer.iter() {
                log.move_collected(&mut collection, Some(key), &mut kv)?;
                let unresolved = change.as_ref().is_some_and(memtable::is_unresolved);
                let needed = unresolved || unresolved_events.contains(key);
                // What the file gets: the record, its value in the log if
                // large.
                let stored = match change {
                    Some(value) => Some(log.store(key, value)?),
                    None => None,
                };
                // A change that needs the record it replaces (an unresolved
                // put, or an event to resolve) reads it first, so the key is
                // written once, resolved: writing it as applied and then
                // again resolved (a longer record) rebuilt the leaf twice.
                let read_first = if needed { read_record(Some(&kv), key)? } else { None };
                let below_record = read_first.as_ref().map(|record| without_value(record, None));
                // `resolve` leaves a resolved record as it is; an unresolved
                // put is `needed`, so `below_record` is what it replaces.
                let stored = stored.map(|value| memtable::resolve(value, below_record.as_ref()));
                let old = match &stored {
                    Some(value) => kv.insert(key, value.encode_to_vec().as_slice())?,
                    None => kv.remove(key)?,
                };
                let replaced = if needed {
                    read_first
                } else {
                    old.map(|bytes| decode_value(bytes.value())).transpose()?
                };
                if let Some(old) = &replaced {
                    log.release(key, old)?;
                }
                if needed {
                    below.insert(key, below_record);
                }
            }
            log.move_collected(&mut collection, None, &mut kv)?;
            log.finish_collection(collection);
            kv.len()?
        };
        lease_tables::write_delta(&txn, &frozen.leases)?;
        let retention = *self.retention.lock().expect("retention lock poisoned");
        let events = frozen.events.iter().map(|event| {
            if !memtable::is_unresolved_event(event) {
                return Cow::Borrowed(event);
            }
            let mut resolved = event.clone();
            memtable::resolve_event(&mut resolved, below[event.change.key.as_slice()].as_ref());
            Cow::Owned(resolved)
        });
        let start = history::write_events(&txn, events, frozen.header.index, retention)?;
        log.prepare(&txn)?;
        commit_with_header(txn, &frozen.header)?;
        log.committed();
        self.history_start.store(start, Ordering::Relaxed);
        Ok(keys)
    }

    /// Adds a batch the raft loop applied: its changes, the state record it
    /// led to, and how it changed the number of keys. Visible to readers at
    /// once; in the file after the next flush.
    pub fn commit_batch(&self, batch: Applied) -> Result<(), StorageError> {
        let index = batch.header.index;
        let waiting = {
            let mut mem = self.mem.write().expect("memtable lock poisoned");
            mem.commit(batch);
            mem.active_bytes()
        };
        self.applied.send_replace(index);
        let (early, hold) = self.memory_limits;
        if waiting >= hold {
            // The flusher is behind: wait for the flush it is running to end
            // (the one asked for here then takes what waits), so at most
            // about twice `hold` is held. Not a flush of our own: that would
            // hold the raft thread for two flushes.
            self.request_flush();
            let state = self.flush.state.lock().expect("flush lock poisoned");
            let _ = self
                .flush
                .flushed
                .wait_timeout_while(state, Duration::from_secs(30), |s| {
                    s.failed.is_none() && !s.stopped && self.mem.read().expect("memtable lock poisoned").is_flushing()
                })
                .expect("flush lock poisoned");
        } else if waiting >= early {
            self.request_flush();
        }
        Ok(())
    }

    /// Closes the store when the node stops, so the file (and its lock) is
    /// free once the last in-flight read finishes, even while handles to
    /// this object live on. What is only in memory is dropped: the raft log
    /// still has it.
    pub fn close(&self) {
        self.flush.state.lock().expect("flush lock poisoned").stopped = true;
        self.flush.wake.notify_all();
        self.flush.flushed.notify_all();
        let _running = self.flush.running.lock().expect("flush lock poisoned");
        self.pinned.lock().expect("pin lock poisoned").clear();
        // Under the memory lock: a get opening a shared view holds it.
        let _mem = self.mem.write().expect("memtable lock poisoned");
        self.db.write().expect("store lock poisoned").take();
        self.take_get_reader();
        self.read_cache.close();
    }

    /// A consistent read view of the file, as of the last flush (call
    /// [`Self::flush`] first for one of everything applied).
    pub fn view(&self) -> Result<StoreView, StorageError> {
        let (txn, values) = {
            // Under the memory lock: an install swaps the file and the value
            // log together under it.
            let _mem = self.mem.read().expect("memtable lock poisoned");
            self.values.begin_read(&*self.db()?)?
        };
        let header = read_header(&txn)?;
        Ok(StoreView { txn, values, header })
    }

    /// The file's state record, as of the last flush.
    pub fn header(&self) -> Result<SnapshotHeader, StorageError> {
        read_header(&self.db()?.begin_read()?)
    }

    /// The store with a read cache of `bytes` (0: none) instead of
    /// [`DEFAULT_READ_CACHE_BYTES`].
    pub fn with_read_cache(mut self, bytes: usize) -> Self {
        self.read_cache = ReadCache::new(bytes);
        self
    }

    /// What the read cache did so far.
    pub fn read_cache_stats(&self) -> ReadCacheStats {
        self.read_cache.stats()
    }

    /// One key's newest record.
    pub fn get(&self, key: &[u8]) -> Result<Option<StoredValue>, StorageError> {
        /// Where the file's record comes from.
        enum FileRecord {
            Cached(Option<StoredValue>),
            Read(Arc<FileReader>),
        }
        let (held, generation, file) = {
            let mem = self.mem.read().expect("memtable lock poisoned");
            let held = match mem.lookup(key) {
                Some(Some(record)) if memtable::is_unresolved(record) => Some(record.clone()),
                Some(change) => return Ok(change.clone()),
                None => None,
            };
            let generation = mem.generation();
            // A change memory holds needs only the file record's revisions.
            let file = match self.read_cache.get(key, generation, held.is_none()) {
                Some(record) => FileRecord::Cached(record),
                None => FileRecord::Read(self.shared_get_reader(&mem)?),
            };
            (held, generation, file)
        };
        let in_file = match file {
            FileRecord::Cached(record) => record,
            FileRecord::Read(reader) => {
                let record = Self::read_file(key, Some(&reader))?;
                // Memory holds a change of the key until the generation
                // moves on: neither this get nor a later one of this
                // generation serves the file's value, only its revisions.
                let record = match held {
                    Some(_) => record,
                    None => Self::load_value(key, record, Some(&reader))?,
                };
                self.read_cache.insert(key, generation, &record);
                record
            }
        };
        Ok(match held {
            // Applied unresolved: the file's record (older, or this one
            // once flushed) resolves it.
            Some(record) => Some(memtable::resolve(record, in_file.as_ref())),
            None => in_file,
        })
    }

    /// The view gets share for memory's current generation, opened if there
    /// is none yet. Called under the memory lock, like [`Self::open_reader`].
    fn shared_get_reader(&self, mem: &Memtable) -> Result<Arc<FileReader>, StorageError> {
        let mut shared = self.get_reader.lock().expect("get reader lock poisoned");
        if let Some(reader) = shared.as_ref().filter(|r| r.generation == mem.generation()) {
            return Ok(reader.clone());
        }
        let reader = Arc::new(self.open_reader(mem)?);
        *shared = Some(reader.clone());
        Ok(reader)
    }

    /// Takes the shared get view away, for the caller to drop (outside
    /// the memory lock where that matters); called with the memory lock held
    /// for writing, where the generation moves on or the file goes.
    fn take_get_reader(&self) -> Option<Arc<FileReader>> {
        self.get_reader.lock().expect("get reader lock poisoned").take()
    }

    /// `record` (read through `reader`) with its value, from the value log
    /// if it is there.
    fn load_value(
        key: &[u8],
        record: Option<StoredValue>,
        reader: Option<&FileReader>,
    ) -> Result<Option<StoredValue>, StorageError> {
        match (record, reader) {
            (Some(mut record), Some(reader)) => {
                reader.values.load(key, &mut record)?;
                Ok(Some(record))
            }
            (record, _) => Ok(record),
        }
    }

    /// What memory holds of `key`: a change (perhaps unresolved), or
    /// nothing, in which case the file has the key's record; `file_empty`
    /// says the file holds no key at all (so none need be read).
    pub fn memory_lookup(&self, key: &[u8]) -> MemoryLookup {
        let mem = self.mem.read().expect("memtable lock poisoned");
        match mem.locate(key) {
            Some((change, frozen)) => MemoryLookup::Change {
                change: change.clone(),
                frozen,
            },
            None => MemoryLookup::NotHeld {
                file_empty: mem.file_keys() == 0,
            },
        }
    }

    /// The file's record of `key` through `reader`, memory not looked at:
    /// for a change memory holds unresolved, the record it replaced (or,
    /// flushed since, its resolved copy). `reader` is opened on first need
    /// and again only once memory and the file have moved on together: a
    /// batch's lookups share it (a read transaction per lookup costs more
    /// than the lookup when the page is cached).
    pub fn file_record(
        &self,
        key: &[u8],
        reader: &mut Option<FileReader>,
    ) -> Result<Option<StoredValue>, StorageError> {
        let header = self.file_header(key, reader)?;
        Self::load_value(key, header, reader.as_ref())
    }

    /// [`Self::file_record`] without the value when the value log holds it:
    /// for its revisions, without a second read.
    pub fn file_header(
        &self,
        key: &[u8],
        reader: &mut Option<FileReader>,
    ) -> Result<Option<StoredValue>, StorageError> {
        {
            let mem = self.mem.read().expect("memtable lock poisoned");
            self.refresh_reader(&mem, reader)?;
        }
        Self::read_file(key, reader.as_ref())
    }

    /// Opens `reader` again if memory moved on since (or it was never
    /// opened). Not in memory: the file holds the newest record (a flush
    /// drops a frozen layer only after committing it). A view taken before
    /// that commit is still good while memory holds the layer; the
    /// generation moves on when it goes. The view is opened under the memory
    /// lock (an install swaps both at once), so it holds nothing newer than
    /// what memory shows: a record applied unresolved finds in it either the
    /// record it replaced or itself, never a later one.
    fn refresh_reader(&self, mem: &Memtable, reader: &mut Option<FileReader>) -> Result<(), StorageError> {
        if reader.as_ref().is_none_or(|r| r.generation != mem.generation()) {
            *reader = Some(self.open_reader(mem)?);
        }
        Ok(())
    }

    /// A view of the file for memory's current generation (see
    /// [`Self::refresh_reader`] for why under the memory lock).
    fn open_reader(&self, mem: &Memtable) -> Result<FileReader, StorageError> {
        let (txn, values) = self.values.begin_read(&*self.db()?)?;
        let kv = open_existing(&txn, KV)?;
        Ok(FileReader {
            generation: mem.generation(),
            kv,
            values,
        })
    }

    fn read_file(key: &[u8], reader: Option<&FileReader>) -> Result<Option<StoredValue>, StorageError> {
        read_record(reader.and_then(|r| r.kv.as_ref()), key)
    }

    /// Number of keys, exactly: puts memory holds unresolved (see
    /// [`memtable::is_unresolved`]) are looked up in the file to see
    /// whether they created their key, a file read each. For a metric,
    /// [`Self::len_as_flushed`] costs nothing.
    pub fn len(&self) -> Result<u64, StorageError> {
        let unresolved = |layer: &memtable::Layer| -> Vec<Vec<u8>> {
            layer
                .iter()
                .filter(|(_, change)| change.as_ref().is_some_and(memtable::is_unresolved))
                .map(|(key, _)| key.to_vec())
                .collect()
        };
        // Memory's unresolved puts and a view of the file, as of one moment.
        let (txn, frozen, active, (frozen_added, active_added)) = {
            let mem = self.mem.read().expect("memtable lock poisoned");
            let frozen = mem.frozen().map(|f| (f.header.index, unresolved(&f.layer)));
            let active = unresolved(mem.active());
            if active.is_empty() && frozen.as_ref().is_none_or(|(_, keys)| keys.is_empty()) {
                return Ok(mem.keys());
            }
            (self.db()?.begin_read()?, frozen, active, mem.keys_added())
        };
        let kv = open_existing(&txn, KV)?;
        let absent = |key: &[u8]| -> Result<bool, StorageError> { Ok(read_record(kv.as_ref(), key)?.is_none()) };
        let mut count = kv.as_ref().map_or(Ok(0), |t| t.len())? as i64 + active_added;
        // The frozen layer counts unless the file holds it already (its
        // flush committed, memory not told yet).
        if let Some((index, keys)) = frozen {
            if read_state_index(&txn)? < index {
                count += frozen_added;
                for key in keys {
                    count += i64::from(absent(&key)?);
                }
            }
        }
        // The active layer's unresolved puts replaced what the file holds
        // (the frozen layer didn't have their keys).
        for key in active {
            count += i64::from(absent(&key)?);
        }
        Ok(count.max(0) as u64)
    }

    /// Number of keys as of the last flush, with the changes since as far
    /// as known without reading the file (a put applied unresolved counts
    /// as replacing a key until the flush that writes it): for metrics.
    pub fn len_as_flushed(&self) -> u64 {
        self.mem.read().expect("memtable lock poisoned").keys()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> Result<bool, StorageError> {
        Ok(self.len()? == 0)
    }

    /// Keys in `[from, to)` (empty `to`: unbounded) that start with `prefix`,
    /// at most `limit` pairs (0: no limit) and about `max_bytes` of keys and
    /// values (at least one pair).
    pub fn scan(
        &self,
        prefix: &[u8],
        from: &[u8],
        to: &[u8],
        limit: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, StorageError> {
        let start = if from > prefix { from } else { prefix };
        if !to.is_empty() && start >= to {
            // An empty range (a prefix past `to`): nothing, and no range
            // with its ends crossed reaches the maps below.
            return Ok(ScanPage::default());
        }
        let upper = if to.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(to)
        };
        // Memory's part of the range and a read transaction of the file, as
        // of the same moment.
        let (memory, known_until, txn, values) = {
            let mem = self.mem.read().expect("memtable lock poisoned");
            let (memory, known_until) = mem.collect_range(prefix, start, upper, limit, max_bytes);
            let (txn, values) = self.values.begin_read(&*self.db()?)?;
            (memory, known_until, txn, values)
        };
        let kv = open_existing(&txn, KV)?;
        let range = match &kv {
            Some(t) => Some(t.range::<&[u8]>((Bound::Included(start), upper))?),
            None => None,
        };
        let file = range
            .into_iter()
            .flatten()
            .map(|item| -> Result<(Vec<u8>, StoredValue), StorageError> {
                let (key, value) = item?;
                let key = key.value().to_vec();
                let mut record = decode_value(value.value())?;
                values.load(&key, &mut record)?;
                Ok((key, record))
            })
            .take_while(|item| item.as_ref().map_or(true, |(key, _)| key.starts_with(prefix)));
        let mut page = ScanPage::default();
        let mut bytes = 0usize;
        let stopped = memtable::merge(memory, known_until.as_deref(), file, |key, value| {
            let size = key.len() + value.value.len() + 8;
            if (limit > 0 && page.pairs.len() >= limit) || (!page.pairs.is_empty() && bytes + size > max_bytes) {
                page.more = true;
                return false;
            }
            bytes += size;
            page.pairs.push(value.into_key_value(key));
            true
        })?;
        page.more |= stopped;
        Ok(page)
    }

    /// The raft loop's working copy of the client sessions, for one batch
    /// (each [`StateStore::commit_batch`] brings memory's copy up to it).
    pub fn working_sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.working_sessions.lock().expect("sessions lock poisoned")
    }

    /// The raft loop's copy of the leases (each batch's changes reach the
    /// file with the batch's data).
    pub fn working_leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.working_leases.lock().expect("leases lock poisoned")
    }

    /// Resets the working copies to memory's and the file's (after an
    /// install or a new state record, with nothing applied in memory).
    fn reset_working_copies(&self) -> Result<(), StorageError> {
        let published = self.mem.read().expect("memtable lock poisoned").sessions().clone();
        *self.working_sessions() = published;
        *self.working_leases() = lease_tables::load(&self.db()?.begin_read()?)?;
        Ok(())
    }

    /// Writes the state record straight to the file, durably: only for a
    /// store nothing was applied to in memory (bootstrap, restore).
    pub fn write_header(&self, header: &SnapshotHeader) -> Result<(), StorageError> {
        let _running = self.flush.running.lock().expect("flush lock poisoned");
        let mut mem = self.mem.write().expect("memtable lock poisoned");
        if !mem.is_clean(self.durable_index()) {
            return Err(StorageError::Store(
                "the state record can't be written under applied changes that are only in memory".into(),
            ));
        }
        commit_with_header(self.db()?.begin_write()?, header)?;
        let keys = mem.keys();
        mem.reset(header.clone(), keys);
        let stale_view = self.take_get_reader();
        drop(mem);
        drop(stale_view);
        self.reset_working_copies()?;
        self.durable_index.store(header.index, Ordering::Release);
        Ok(())
    }

    /// The applied index of the last flush: what a crash can't take back,
    /// and what the raft log may be compacted behind.
    pub fn durable_index(&self) -> u64 {
        self.durable_index.load(Ordering::Acquire)
    }

    /// The store file's size on disk.
    pub fn size_on_disk(&self) -> u64 {
        std::fs::metadata(Self::path_in(&self.dir)).map_or(0, |m| m.len()) + self.values.bytes().0
    }

    /// Bytes in the value log's segments, and the live bytes among them, as
    /// of the last flush.
    pub fn value_log_bytes(&self) -> (u64, u64) {
        self.values.bytes()
    }

    /// Pins a view for follower `to` and returns its header (raft's snapshot
    /// metadata); the transport takes the view with [`Self::take_pinned`].
    pub fn pin_for(&self, to: u64) -> Result<SnapshotHeader, StorageError> {
        let view = self.view()?;
        let header = view.header.clone();
        let mut pinned = self.pinned.lock().expect("pin lock poisoned");
        pinned.retain(|_, p| p.at.elapsed() < PIN_TTL);
        pinned.insert(
            to,
            Pinned {
                view,
                at: Instant::now(),
            },
        );
        Ok(header)
    }

    /// Drops the view pinned for `to` (its snapshot could not be sent).
    pub fn unpin(&self, to: u64) {
        self.pinned.lock().expect("pin lock poisoned").remove(&to);
    }

    /// Drops views pinned longer than their time to live: each holds pages
    /// the store can't reuse.
    pub fn prune_pins(&self) {
        self.pinned
            .lock()
            .expect("pin lock poisoned")
            .retain(|_, p| p.at.elapsed() < PIN_TTL);
    }

    /// The state record of a staged (closed) store file, read before it is
    /// installed: an install starts only from a file that opens and holds
    /// the state it claims.
    pub fn read_staged_header(path: &Path) -> Result<SnapshotHeader, StorageError> {
        Ok(Self::read_staged(path)?.0)
    }

    /// The state record and key count of a built (closed) store file.
    pub fn read_staged(path: &Path) -> Result<(SnapshotHeader, u64), StorageError> {
        let db = Database::builder()
            .set_cache_size(1 << 20)
            .open(path)
            .map_err(|e| StorageError::Corrupt(format!("the staged snapshot {} does not open: {e}", path.display())))?;
        header_and_len(&db)
    }

    /// The view pinned for `to` at `index`, if it is still there.
    pub fn take_pinned(&self, to: u64, index: u64) -> Option<StoreView> {
        let mut pinned = self.pinned.lock().expect("pin lock poisoned");
        match pinned.remove(&to) {
            Some(p) if p.view.header.index == index => Some(p.view),
            Some(p) => {
                pinned.insert(to, p);
                None
            }
            None => None,
        }
    }

    /// Where received snapshots are staged.
    pub fn incoming_dir(&self) -> PathBuf {
        self.dir.join(INCOMING_DIR)
    }

    /// Where the verified state of a received snapshot at `(index, term)` waits
    /// for raft to accept it.
    pub fn staged_path(&self, index: u64, term: u64) -> PathBuf {
        self.incoming_dir().join(format!("{index:020}-{term:020}.redb"))
    }

    /// Removes staged snapshots at or below `applied`: raft can no longer
    /// install them, and each is as large as the state. Only the raft loop
    /// calls this (it alone installs), so it never races an install.
    pub fn remove_staged_up_to(&self, applied: u64) {
        let Ok(entries) = std::fs::read_dir(self.incoming_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "redb") {
                continue;
            }
            let index = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.split('-').next())
                .and_then(|i| i.parse::<u64>().ok());
            if index.is_some_and(|i| i <= applied) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Replaces the whole store with a staged (received, verified, fsynced)
    /// one, atomically: a rename over the store file. Readers on the old
    /// store finish on it.
    pub fn install(&self, staged: &Path) -> Result<SnapshotHeader, StorageError> {
        // No flush may write to the file being replaced.
        let _running = self.flush.running.lock().expect("flush lock poisoned");
        let target = Self::path_in(&self.dir);
        std::fs::rename(staged, &target).map_err(StorageError::io(format!(
            "rename {} to {}",
            staged.display(),
            target.display()
        )))?;
        super::fs_util::sync_dir(&self.dir)?;
        // Opened (and fsynced) before the swap: readers keep the old store
        // (its inode lives on) until then, instead of waiting on the lock.
        let installed = Arc::new(open_db(&target, self.cache_bytes)?);
        let (header, keys) = header_and_len(&installed)?;
        let old = {
            // Memory (older than the snapshot) goes with the old file, and
            // is freed after the locks readers need are released.
            let mut mem = self.mem.write().expect("memtable lock poisoned");
            let old = self.db.write().expect("store lock poisoned").replace(installed);
            let stale_view = self.take_get_reader();
            // The installed file holds its values inline.
            self.values.reset();
            (mem.reset(header.clone(), keys), old, stale_view)
        };
        drop(old);
        // A crash before this leaves files that the next open removes.
        self.values.remove_unlisted()?;
        self.reset_working_copies()?;
        self.pinned.lock().expect("pin lock poisoned").clear();
        self.durable_index.store(header.index, Ordering::Release);
        self.history_start.store(header.index + 1, Ordering::Relaxed);
        self.applied.send_replace(header.index);
        Ok(header)
    }
}

/// Where a store's change history starts, marked once: a store written
/// before there was one (or a new one) holds none of the revisions up to
/// `applied`.
fn start_history(db: &Database, applied: u64) -> Result<u64, StorageError> {
    let start = read_counter(&db.begin_read()?, history::META_HISTORY_START)?;
    if start != 0 {
        return Ok(start);
    }
    let txn = db.begin_write()?;
    txn.open_table(META)?
        .insert(history::META_HISTORY_START, &(applied + 1).to_be_bytes()[..])?;
    txn.commit()?;
    Ok(applied + 1)
}

/// A database's state record and key count.
fn header_and_len(db: &Database) -> Result<(SnapshotHeader, u64), StorageError> {
    let txn = db.begin_read()?;
    let keys = match txn.open_table(KV) {
        Ok(t) => t.len()?,
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => return Err(e.into()),
    };
    Ok((read_header(&txn)?, keys))
}

/// A raw kv record: the key and its encoded `StoredValue`.
/// A raw record of one of the store's tables (see `TABLE_KV` and the
/// others): table, key, value.
pub type Record = (u32, Vec<u8>, Vec<u8>);

/// One page of a scan.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanPage {
    /// The pairs, in key order.
    pub pairs: Vec<KeyValue>,
    /// More pairs matched than fit the limits.
    pub more: bool,
}

/// Writes one raw record of `table` (from a snapshot stream).
fn put_record(txn: &redb::WriteTransaction, table: u32, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
    let definition = match table {
        TABLE_KV => KV,
        TABLE_LEASES => LEASES,
        TABLE_LEASE_KEYS => LEASE_KEYS,
        other => {
            return Err(StorageError::Corrupt(format!(
                "a snapshot record names table {other}, which this version does not know; upgrade this node"
            )))
        }
    };
    if table == TABLE_KV {
        let record = decode_value(value)?;
        if record.value_ref.is_some() {
            return Err(StorageError::Corrupt(
                "a snapshot record points into a value log; snapshots carry values inline (a sender bug?)".into(),
            ));
        }
    }
    txn.open_table(definition)?.insert(key, value)?;
    Ok(())
}

/// Commits `txn` durably with `header` as the state record.
fn commit_with_header(mut txn: redb::WriteTransaction, header: &SnapshotHeader) -> Result<(), StorageError> {
    txn.open_table(META)?
        .insert(META_STATE, header.encode_to_vec().as_slice())?;
    txn.set_durability(Durability::Immediate);
    // Recovery after a crash then needs no full scan of the file.
    txn.set_quick_repair(true);
    txn.commit()?;
    Ok(())
}

impl StoreView {
    /// Every record a snapshot carries, table by table, each in key order:
    /// kv (key, encoded `StoredValue`), then the lease tables.
    pub fn records(&self) -> Result<impl Iterator<Item = Result<Record, StorageError>>, StorageError> {
        let mut tables = Vec::new();
        for (id, definition) in [(TABLE_KV, KV), (TABLE_LEASES, LEASES), (TABLE_LEASE_KEYS, LEASE_KEYS)] {
            match self.txn.open_table(definition) {
                Ok(t) => tables.push((id, t.range::<&[u8]>(..)?)),
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let values = self.values.clone();
        Ok(tables.into_iter().flat_map(move |(id, range)| {
            let values = values.clone();
            range.map(move |item| {
                let (k, v) = item?;
                let key = k.value().to_vec();
                let mut record = v.value().to_vec();
                if id == TABLE_KV {
                    // Values go inline: the receiver has no value log of ours.
                    let mut value = decode_value(&record)?;
                    if value.value_ref.is_some() {
                        values.load(&key, &mut value)?;
                        record = value.encode_to_vec();
                    }
                }
                Ok((id, key, record))
            })
        }))
    }

    /// Number of records [`Self::records`] yields.
    pub fn record_count(&self) -> Result<u64, StorageError> {
        let mut count = 0;
        for definition in [KV, LEASES, LEASE_KEYS] {
            match self.txn.open_table(definition) {
                Ok(t) => count += t.len()?,
                Err(redb::TableError::TableDoesNotExist(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(count)
    }

    /// Number of kv records in the view.
    pub fn len(&self) -> Result<u64, StorageError> {
        match self.txn.open_table(KV) {
            Ok(t) => Ok(t.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// True when the view holds no key.
    pub fn is_empty(&self) -> Result<bool, StorageError> {
        Ok(self.len()? == 0)
    }
}

/// A new, empty store file to fill from a snapshot stream; it becomes a store
/// only when [`StoreBuilder::finish`] commits it durably.
pub struct StoreBuilder {
    /// Declared before `db`: a transaction must go before its database.
    pending: Option<redb::WriteTransaction>,
    db: Database,
    path: PathBuf,
    pending_records: usize,
}

impl StoreBuilder {
    /// Creates `path` (replacing a leftover one).
    pub fn create(path: &Path) -> Result<Self, StorageError> {
        let _ = std::fs::remove_file(path);
        let db = open_db(path, 32 << 20)?;
        Ok(StoreBuilder {
            db,
            path: path.to_path_buf(),
            pending: None,
            pending_records: 0,
        })
    }

    /// Adds one record (records arrive in key order, which redb writes fast).
    pub fn add(&mut self, table: u32, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        if self.pending.is_none() {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::None);
            self.pending = Some(txn);
        }
        put_record(self.pending.as_ref().expect("a transaction is open"), table, key, value)?;
        self.pending_records += 1;
        // Bounded transactions, and a durable one now and then so redb can
        // reuse the pages the others freed.
        if self.pending_records.is_multiple_of(20_000) {
            let mut txn = self.pending.take().expect("a transaction is open");
            if self.pending_records.is_multiple_of(200_000) {
                txn.set_durability(Durability::Immediate);
            }
            txn.commit()?;
        }
        Ok(())
    }

    /// Writes the state record and commits everything durably. The change
    /// history is not part of a snapshot: the new store's starts after it.
    pub fn finish(mut self, header: &SnapshotHeader) -> Result<PathBuf, StorageError> {
        let txn = match self.pending.take() {
            Some(t) => t,
            None => self.db.begin_write()?,
        };
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(history::META_HISTORY_START, &(header.index + 1).to_be_bytes()[..])?;
            meta.insert(history::META_HISTORY_BYTES, &0u64.to_be_bytes()[..])?;
        }
        commit_with_header(txn, header)?;
        drop(self.db);
        Ok(self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_snapshots_raft_can_no_longer_install_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 1 << 20).unwrap();
        std::fs::create_dir_all(store.incoming_dir()).unwrap();
        let (old, current, newer) = (
            store.staged_path(40, 2),
            store.staged_path(50, 2),
            store.staged_path(60, 3),
        );
        let partial = store
            .incoming_dir()
            .join("00000000000000000030-00000000000000000002.partial");
        for path in [&old, &current, &newer, &partial] {
            std::fs::write(path, b"x").unwrap();
        }
        store.remove_staged_up_to(50);
        assert!(!old.exists() && !current.exists());
        assert!(newer.exists(), "a newer snapshot may still be installed");
        assert!(partial.exists(), "a stream still arriving is its receiver's");
    }

    use super::memtable::Layer;

    fn applied(changes: Layer, header: SnapshotHeader, keys_added: i64) -> Applied {
        Applied {
            changes,
            header,
            keys_added,
            ..Default::default()
        }
    }

    /// The state record of a batch applied up to `index`.
    fn state_at(index: u64) -> SnapshotHeader {
        SnapshotHeader {
            index,
            ..Default::default()
        }
    }

    /// A resolved record (see `memtable::is_unresolved`).
    fn value(len: usize) -> StoredValue {
        StoredValue {
            value: vec![7; len].into(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 0,
            value_ref: None,
        }
    }

    /// Applies a batch at `index` that creates `key` with a `len`-byte value.
    fn commit_new_key(store: &StateStore, index: u64, key: String, len: usize) {
        let mut changes = Layer::default();
        changes.insert(key.into_bytes(), Some(value(len)));
        let header = SnapshotHeader {
            index,
            ..Default::default()
        };
        store.commit_batch(applied(changes, header, 1)).unwrap();
    }

    #[test]
    fn without_a_flusher_thread_memory_is_flushed_where_it_fills() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = StateStore::open(dir.path(), 1 << 20).unwrap();
        store.memory_limits = (4 << 10, 16 << 10);
        for index in 1..=100u64 {
            commit_new_key(&store, index, format!("key{index:04}"), 1000);
            let waiting = store.mem.read().unwrap().active_bytes();
            assert!(waiting < 16 << 10, "{waiting} bytes wait in memory at index {index}");
        }
        // The writer's own flushes (no thread to ask) moved it to the file.
        assert!(store.durable_index() > 80, "{}", store.durable_index());
        assert_eq!(store.view().unwrap().len().unwrap(), store.durable_index());
        assert_eq!(store.len().unwrap(), 100);
        store.flush().unwrap();
        assert_eq!(
            (store.durable_index(), store.view().unwrap().len().unwrap()),
            (100, 100)
        );
    }

    #[test]
    fn the_flusher_flushes_at_its_timer_slots_without_being_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(StateStore::open(dir.path(), 1 << 20).unwrap());
        store.spawn_flusher(FlushSchedule::new(Duration::from_millis(200), 1));
        for index in 1..=2u64 {
            commit_new_key(&store, index, format!("key{index}"), 10);
            // Far below every size limit and nobody asks: only the timer
            // can move it to the file.
            let deadline = Instant::now() + Duration::from_secs(10);
            while store.durable_index() < index {
                assert!(
                    Instant::now() < deadline,
                    "index {index} not flushed on the timer within 10 s"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(store.view().unwrap().len().unwrap(), index);
        }
        store.close();
    }

    #[test]
    fn a_flush_writes_deletes_and_the_state_record_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(StateStore::open(dir.path(), 1 << 20).unwrap());
        let mut changes = Layer::default();
        changes.insert(b"gone".to_vec(), Some(value(3)));
        changes.insert(b"kept".to_vec(), Some(value(3)));
        store.commit_batch(applied(changes, state_at(1), 2)).unwrap();
        store.flush().unwrap();
        let mut changes = Layer::default();
        changes.insert(b"gone".to_vec(), None);
        store.commit_batch(applied(changes, state_at(2), -1)).unwrap();
        assert_eq!(
            store.view().unwrap().len().unwrap(),
            2,
            "not in the file before the flush"
        );
        assert_eq!(store.get(b"gone").unwrap(), None, "readers see memory at once");
        // The flusher thread, woken on request, not on its timer.
        store.spawn_flusher(FlushSchedule::new(Duration::from_secs(3600), 1));
        store.request_flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.durable_index() < 2 {
            assert!(Instant::now() < deadline, "the flusher did not flush on request");
            std::thread::sleep(Duration::from_millis(5));
        }
        let view = store.view().unwrap();
        assert_eq!((view.header.index, view.len().unwrap()), (2, 1));
        store.close();
    }

    #[test]
    fn gets_share_a_view_of_the_file_that_follows_each_flush_and_is_let_go_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 1 << 20).unwrap();
        let mut changes = Layer::default();
        changes.insert(b"gone".to_vec(), Some(value(3)));
        store.commit_batch(applied(changes, state_at(1), 1)).unwrap();
        store.flush().unwrap();
        // This get opens the shared view, of the file as of index 1.
        assert_eq!(store.get(b"gone").unwrap(), Some(value(3)));
        let mut changes = Layer::default();
        changes.insert(b"gone".to_vec(), None);
        changes.insert(b"new".to_vec(), Some(value(4)));
        store.commit_batch(applied(changes, state_at(2), 0)).unwrap();
        store.flush().unwrap();
        // Memory holds neither key now: both come from the file, as of the
        // second flush, not through the view the first get opened.
        assert_eq!(store.get(b"gone").unwrap(), None, "a delete the file took");
        assert_eq!(store.get(b"new").unwrap(), Some(value(4)), "a put the file took");
        store.close();
        // The shared view went with the file: it can be opened again here.
        let reopened = StateStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.get(b"new").unwrap(), Some(value(4)));
    }

    #[test]
    fn gets_answer_from_the_read_cache_only_for_the_generation_that_filled_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 1 << 20).unwrap();
        let record = |len: usize, revision: u64, version: u64| StoredValue {
            value: vec![revision as u8; len].into(),
            create_revision: 1,
            mod_revision: revision,
            version,
            ..Default::default()
        };
        let misses = |store: &StateStore| store.read_cache_stats().misses;
        let hits = |store: &StateStore| store.read_cache_stats().hits;
        // A value the value log holds, and one inline in the file.
        let mut changes = Layer::default();
        changes.insert(b"big".to_vec(), Some(record(300, 1, 1)));
        changes.insert(b"small".to_vec(), Some(record(8, 1, 1)));
        store.commit_batch(applied(changes, state_at(1), 2)).unwrap();
        store.flush().unwrap();
        for _ in 0..3 {
            assert_eq!(store.get(b"big").unwrap(), Some(record(300, 1, 1)));
            assert_eq!(store.get(b"small").unwrap(), Some(record(8, 1, 1)));
            assert_eq!(store.get(b"absent").unwrap(), None);
        }
        assert_eq!((misses(&store), hits(&store)), (3, 6), "the file read once per key");
        assert!(store.read_cache_stats().bytes >= 300, "{:?}", store.read_cache_stats());

        // A put applied unresolved over "big": its revisions come from the
        // cached record it replaced.
        let mut changes = Layer::default();
        let mut unresolved = record(300, 2, 0);
        unresolved.create_revision = 0;
        changes.insert(b"big".to_vec(), Some(unresolved));
        changes.insert(b"small".to_vec(), None);
        store.commit_batch(applied(changes, state_at(2), -1)).unwrap();
        assert_eq!(store.get(b"big").unwrap(), Some(record(300, 2, 2)));
        assert_eq!((misses(&store), hits(&store)), (3, 7));
        // After the flush, the file holds the new records: every entry of
        // the earlier generation is a miss, not an answer.
        store.flush().unwrap();
        assert_eq!(store.get(b"big").unwrap(), Some(record(300, 2, 2)));
        assert_eq!(store.get(b"small").unwrap(), None, "a delete the file took");
        assert_eq!(misses(&store), 5);
        assert_eq!(store.get(b"small").unwrap(), None);
        assert_eq!(hits(&store), 8);
        // A put applied unresolved over a key no get read yet: the get reads
        // only the file record's revisions, not its value from the value
        // log (memory answers with its own value until the generation moves
        // on), and the cache keeps no value for it.
        let mut changes = Layer::default();
        changes.insert(b"big2".to_vec(), Some(record(300, 3, 1)));
        store.commit_batch(applied(changes, state_at(3), 1)).unwrap();
        store.flush().unwrap();
        let mut changes = Layer::default();
        let mut unresolved = record(300, 4, 0);
        unresolved.create_revision = 0;
        changes.insert(b"big2".to_vec(), Some(unresolved));
        store.commit_batch(applied(changes, state_at(4), 0)).unwrap();
        let before = store.read_cache_stats().bytes;
        for _ in 0..2 {
            assert_eq!(store.get(b"big2").unwrap(), Some(record(300, 4, 2)));
        }
        assert_eq!((misses(&store), hits(&store)), (6, 9));
        let kept = store.read_cache_stats().bytes - before;
        assert!(
            kept < 300,
            "{kept} bytes kept for a record whose value no get of it can serve"
        );

        // Closed, the store answers no get, not even from the cache (which
        // holds "big" for the current generation).
        assert_eq!(store.get(b"big").unwrap(), Some(record(300, 2, 2)));
        store.close();
        assert!(store.get(b"big").is_err(), "a closed store served a cached record");
        // Switched off, nothing is kept and every get reads the file.
        let store = StateStore::open(dir.path(), 1 << 20).unwrap().with_read_cache(0);
        for _ in 0..2 {
            assert_eq!(store.get(b"big").unwrap(), Some(record(300, 2, 2)));
        }
        assert_eq!(store.read_cache_stats(), Default::default());
    }

    #[test]
    fn the_state_index_reads_alone_as_in_the_whole_record_and_damage_is_reported() {
        use crate::proto::{ClientSession, SessionTable};
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 1 << 20).unwrap();
        let db = store.db().unwrap();
        assert_eq!(read_state_index(&db.begin_read().unwrap()).unwrap(), 0, "no record yet");
        // Sessions around the index's field, as the state record has them.
        let sessions = (1..=100)
            .map(|id| ClientSession {
                id,
                first_incomplete: 7,
                ..Default::default()
            })
            .collect();
        let header = SnapshotHeader {
            index: 42,
            term: 3,
            sessions: Some(SessionTable { clock_ms: 5, sessions }),
            keys: Some(9),
            ..Default::default()
        };
        store.write_header(&header).unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(read_header(&txn).unwrap(), header);
        assert_eq!(read_state_index(&txn).unwrap(), 42);
        let write = db.begin_write().unwrap();
        write
            .open_table(META)
            .unwrap()
            .insert(META_STATE, &[0x1a, 0xff, 0xff][..])
            .unwrap();
        write.commit().unwrap();
        let err = read_state_index(&db.begin_read().unwrap()).unwrap_err();
        assert!(
            matches!(&err, StorageError::Corrupt(m) if m.contains("state.redb is damaged")),
            "{err}"
        );
        drop(db);
        store.close();
    }

    #[test]
    fn a_closed_store_refuses_reads_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), 1 << 20).unwrap();
        store.close();
        let err = store.get(b"k").unwrap_err().to_string();
        assert!(err.contains("stopped"), "{err}");
        // The file is free again: another store can open it.
        StateStore::open(dir.path(), 1 << 20).unwrap();
    }
}

#[cfg(test)]
#[path = "value_log_tests.rs"]
mod value_log_tests;
