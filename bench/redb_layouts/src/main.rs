//! Fills a redb file with KEYS keys (16 bytes, 280-byte records: the
//! `bench/scale.sh` workload), then times flushes of PUTS_PER_FLUSH random
//! puts (sorted, as the memtable hands them over; one durable commit each)
//! and prints the CPU per put. Layouts:
//!
//! - `inline`: one entry per key holding its whole record (the store today);
//! - `headers`: one entry per key holding a 24-byte header only (the floor
//!   of any layout that keeps one entry per key);
//! - `value-log`: headers, with the values appended to segment files fsynced
//!   before the commit (no garbage collection);
//! - `value-table`: headers, with the values in a second table keyed by an
//!   increasing id (appended, never deleted);
//! - `value-log-gc`: `value-log` in 64 MiB segments with garbage collection:
//!   while the log holds more than GC_SPACE (env, default 2) times the live
//!   bytes, the segment with the most dead records is read back, its live
//!   records (the header still points at them) are appended again and their
//!   headers rewritten in the flush's transaction, and the segment is
//!   deleted. Runs GC_FLUSHES (env, default 30) timed flushes so collection
//!   reaches its steady state. GC_BITMAP=1 tells live records by in-memory
//!   bitmaps of the dead ones (set from each header a put replaces) instead
//!   of a header lookup per record;
//! - `chunks`: key-ordered chunks of records, one entry per chunk of up to
//!   CHUNK_BYTES (env, default 48 KiB).

use std::io::Write as _;
use std::time::Instant;

use redb::{Database, Durability, ReadableTable, TableDefinition};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const VALUES: TableDefinition<u64, &[u8]> = TableDefinition::new("values");
const RECORD: usize = 280;
const WARM_UP_FLUSHES: usize = 2;
const TIMED_FLUSHES: usize = 8;

/// User + system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields[i].parse::<f64>().expect("a tick count");
    (ticks(11) + ticks(12)) / 100.0
}

/// Key `i`: spread over the key space, 16 bytes.
fn key(i: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i >> 7)).to_be_bytes());
    key[8..].copy_from_slice(&i.to_be_bytes());
    key
}

/// A small deterministic generator (xorshift), so runs compare.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

fn header(id: u64) -> [u8; 24] {
    let mut header = [7u8; 24];
    header[..8].copy_from_slice(&id.to_be_bytes());
    header
}

struct Bench {
    layout: String,
    db: Database,
    next_id: u64,
    chunk_bytes: usize,
    segments: segments::Log,
}

impl Bench {
    /// One flush of `keys` (sorted), one durable commit.
    fn flush(&mut self, keys: &[[u8; 16]], random: &mut Random) {
        let mut record = [0u8; RECORD];
        let mut txn = self.db.begin_write().expect("begin");
        if self.layout == "chunks" {
            random.fill(&mut record);
            chunks::write(&txn, keys, &record, self.chunk_bytes);
        } else if self.layout.starts_with("value-log") {
            let mut kv = txn.open_table(KV).expect("kv");
            if self.layout == "value-log-gc" {
                self.segments.collect(&mut kv);
            }
            for key in keys {
                random.fill(&mut record);
                let header = self.segments.append(key, &record);
                if let Some(old) = kv.insert(key.as_slice(), header.as_slice()).expect("insert") {
                    self.segments.dead(old.value());
                }
            }
            self.segments.sync();
        } else {
            let mut kv = txn.open_table(KV).expect("kv");
            let mut values = (self.layout == "value-table").then(|| txn.open_table(VALUES).expect("values"));
            for key in keys {
                random.fill(&mut record);
                let entry: &[u8] = match (self.layout.as_str(), values.as_mut()) {
                    ("inline", _) => &record,
                    ("headers", _) => &header(0),
                    ("value-table", Some(values)) => {
                        self.next_id += 1;
                        values.insert(self.next_id, record.as_slice()).expect("insert");
                        &header(self.next_id)
                    }
                    (other, _) => panic!("unknown layout {other}"),
                };
                kv.insert(key.as_slice(), entry).expect("insert");
            }
        }
        txn.set_durability(Durability::Immediate);
        txn.set_quick_repair(true);
        txn.commit().expect("commit");
    }
}

mod segments {
    //! A value log in segment files, with the dead bytes of each known from
    //! the headers each put replaces.
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read as _;

    const SEGMENT_BYTES: u64 = 64 << 20;
    const ENTRY: u64 = 16 + RECORD as u64;

    #[derive(Default)]
    struct Segment {
        len: u64,
        dead: u64,
        /// Which records are dead, by ordinal.
        dead_records: Vec<u64>,
    }

    pub struct Log {
        dir: std::path::PathBuf,
        segments: BTreeMap<u32, Segment>,
        head: u32,
        buffer: Vec<u8>,
        pub moved: u64,
        /// Collect while the log is over this many times the live bytes.
        space: u64,
        /// Liveness from the dead-record bitmaps instead of a header lookup.
        by_bitmap: bool,
    }

    pub fn header(segment: u32, offset: u64) -> [u8; 24] {
        let mut header = [7u8; 24];
        header[..4].copy_from_slice(&segment.to_be_bytes());
        header[4..12].copy_from_slice(&offset.to_be_bytes());
        header
    }

    fn pointer(header: &[u8]) -> (u32, u64) {
        let segment = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
        (segment, u64::from_be_bytes(header[4..12].try_into().expect("8 bytes")))
    }

    impl Log {
        pub fn new(dir: &std::path::Path) -> Self {
            Log {
                dir: dir.to_path_buf(),
                segments: BTreeMap::from([(0, Segment::default())]),
                head: 0,
                buffer: Vec::new(),
                moved: 0,
                space: std::env::var("GC_SPACE").map_or(2, |v| v.parse().expect("a number")),
                by_bitmap: std::env::var("GC_BITMAP").is_ok_and(|v| v == "1"),
            }
        }

        fn path(&self, segment: u32) -> std::path::PathBuf {
            self.dir.join(format!("{segment:08}.seg"))
        }

        /// Appends a record to the head; returns its header.
        pub fn append(&mut self, key: &[u8], record: &[u8]) -> [u8; 24] {
            let head = &self.segments[&self.head];
            let offset = head.len + self.buffer.len() as u64;
            self.buffer.extend_from_slice(key);
            self.buffer.extend_from_slice(record);
            header(self.head, offset)
        }

        /// The record a replaced header pointed at is dead.
        pub fn dead(&mut self, header: &[u8]) {
            let (segment, offset) = pointer(header);
            if let Some(segment) = self.segments.get_mut(&segment) {
                segment.dead += ENTRY;
                let ordinal = (offset / ENTRY) as usize;
                if segment.dead_records.len() <= ordinal / 64 {
                    segment.dead_records.resize(ordinal / 64 + 1, 0);
                }
                segment.dead_records[ordinal / 64] |= 1 << (ordinal % 64);
            }
        }

        /// Writes and fsyncs the head's new records; starts a new head
        /// once it is full.
        pub fn sync(&mut self) {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(self.head))
                .expect("segment");
            file.write_all(&self.buffer).expect("write");
            file.sync_data().expect("fsync");
            let head = self.segments.get_mut(&self.head).expect("head");
            head.len += self.buffer.len() as u64;
            self.buffer.clear();
            if head.len >= SEGMENT_BYTES {
                self.head += 1;
                self.segments.insert(self.head, Segment::default());
            }
        }

        /// While the log holds more than `space` times its live bytes, moves the
        /// live records of the emptiest segment to the head and deletes it.
        pub fn collect(&mut self, kv: &mut redb::Table<&[u8], &[u8]>) {
            loop {
                let total: u64 = self.segments.values().map(|s| s.len).sum();
                let dead: u64 = self.segments.values().map(|s| s.dead).sum();
                if total <= self.space * (total - dead) {
                    return;
                }
                let Some((&victim, _)) = self
                    .segments
                    .iter()
                    .filter(|(&id, _)| id != self.head)
                    .max_by_key(|(_, s)| s.dead)
                else {
                    return;
                };
                let mut bytes = Vec::new();
                std::fs::File::open(self.path(victim))
                    .and_then(|mut f| f.read_to_end(&mut bytes))
                    .expect("read segment");
                let dead_records = std::mem::take(&mut self.segments.get_mut(&victim).expect("victim").dead_records);
                for (i, entry) in bytes.chunks_exact(ENTRY as usize).enumerate() {
                    let key = &entry[..16];
                    let live = if self.by_bitmap {
                        dead_records.get(i / 64).is_none_or(|word| word & (1 << (i % 64)) == 0)
                    } else {
                        kv.get(key)
                            .expect("get")
                            .is_some_and(|h| pointer(h.value()) == (victim, i as u64 * ENTRY))
                    };
                    if live {
                        let header = self.append(key, &entry[16..]);
                        kv.insert(key, header.as_slice()).expect("insert");
                        self.moved += 1;
                    }
                }
                self.segments.remove(&victim);
                std::fs::remove_file(self.path(victim)).expect("remove segment");
            }
        }
    }
}

mod chunks {
    //! A minimal chunked kv table: bound → `[key_len u8, key, record]...`.
    use super::*;

    fn entries(bytes: &[u8]) -> Vec<(&[u8], &[u8])> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let key_len = bytes[at] as usize;
            let key = &bytes[at + 1..at + 1 + key_len];
            out.push((key, &bytes[at + 1 + key_len..at + 1 + key_len + RECORD]));
            at += 1 + key_len + RECORD;
        }
        out
    }

    /// Puts `keys` (sorted) with `record`: each chunk touched is read once,
    /// merged, and written once (split when full).
    pub fn write(txn: &redb::WriteTransaction, keys: &[[u8; 16]], record: &[u8], chunk_bytes: usize) {
        let mut table = txn.open_table(KV).expect("kv");
        let mut i = 0;
        while i < keys.len() {
            let (bound, old) = match table.range::<&[u8]>(..=keys[i].as_slice()).expect("range").next_back() {
                Some(item) => {
                    let (bound, bytes) = item.expect("chunk");
                    (bound.value().to_vec(), bytes.value().to_vec())
                }
                None => (Vec::new(), Vec::new()),
            };
            let next = table
                .range::<&[u8]>((std::ops::Bound::Excluded(bound.as_slice()), std::ops::Bound::Unbounded))
                .expect("range")
                .next()
                .map(|item| item.expect("chunk").0.value().to_vec());
            let mut end = i;
            while end < keys.len() && next.as_ref().is_none_or(|next| keys[end].as_slice() < next.as_slice()) {
                end += 1;
            }
            let mut merged: Vec<(&[u8], &[u8])> = Vec::new();
            let (old, mut new) = (entries(&old), keys[i..end].iter().peekable());
            let mut old = old.into_iter().peekable();
            loop {
                match (old.peek(), new.peek()) {
                    (None, None) => break,
                    (Some(&(o, _)), Some(n)) if n.as_slice() == o => {
                        old.next();
                        merged.push((new.next().expect("peeked"), record));
                    }
                    (Some(&(o, _)), Some(n)) if n.as_slice() < o => merged.push((new.next().expect("peeked"), record)),
                    (Some(_), _) => merged.push(old.next().expect("peeked")),
                    (None, Some(_)) => merged.push((new.next().expect("peeked"), record)),
                }
            }
            let per_chunk = (chunk_bytes / (1 + 16 + RECORD)).max(1);
            for (n, piece) in merged.chunks(per_chunk).enumerate() {
                let mut bytes = Vec::with_capacity(chunk_bytes);
                for (key, value) in piece {
                    bytes.push(key.len() as u8);
                    bytes.extend_from_slice(key);
                    bytes.extend_from_slice(value);
                }
                let chunk_key = if n == 0 { bound.clone() } else { piece[0].0.to_vec() };
                table.insert(chunk_key.as_slice(), bytes.as_slice()).expect("insert");
            }
            i = end;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let layout = args.get(1).cloned().unwrap_or_else(|| "inline".into());
    let arg = |i: usize, default: u64| args.get(i).map_or(default, |a| a.parse().expect("a number"));
    let (keys, per_flush, cache_mib) = (arg(2, 540_000), arg(3, 75_000) as usize, arg(4, 16) as usize);
    let chunk_bytes = std::env::var("CHUNK_BYTES").map_or(48 << 10, |v| v.parse().expect("a number"));
    let dir = std::env::temp_dir().join(format!("redb_layouts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut builder = Database::builder();
    builder.set_cache_size(cache_mib << 20);
    let mut bench = Bench {
        layout,
        db: builder.create(dir.join("kv.redb")).expect("create"),
        next_id: 0,
        chunk_bytes,
        segments: segments::Log::new(&dir),
    };
    let mut random = Random(0x2545_F491_4F6C_DD1D);
    // Every key once, in flushes of 100k keys.
    for start in (0..keys).step_by(100_000) {
        let mut batch: Vec<[u8; 16]> = (start..(start + 100_000).min(keys)).map(key).collect();
        batch.sort();
        bench.flush(&batch, &mut random);
    }
    let mut cpu = 0.0;
    let mut puts = 0;
    let timed = if bench.layout == "value-log-gc" {
        std::env::var("GC_FLUSHES").map_or(30, |v| v.parse().expect("a number"))
    } else {
        TIMED_FLUSHES
    };
    for round in 0..WARM_UP_FLUSHES + timed {
        let mut batch: Vec<[u8; 16]> = (0..per_flush).map(|_| key(random.next() % keys)).collect();
        batch.sort();
        batch.dedup();
        let (before, started) = (cpu_seconds(), Instant::now());
        bench.flush(&batch, &mut random);
        let used = cpu_seconds() - before;
        eprintln!(
            "flush {round}: {} keys, {used:.2} s CPU, {:.2} s",
            batch.len(),
            started.elapsed().as_secs_f64()
        );
        if round >= WARM_UP_FLUSHES {
            cpu += used;
            puts += batch.len();
        }
    }
    let file_mib = std::fs::metadata(dir.join("kv.redb")).map_or(0, |m| m.len() >> 20);
    println!(
        "{} with {keys} keys, {per_flush} puts per flush, {cache_mib} MiB cache: {:.2} us of CPU per put (file {file_mib} MiB; {} records moved by collection)",
        bench.layout,
        cpu * 1e6 / puts as f64,
        bench.segments.moved
    );
    drop(bench);
    let _ = std::fs::remove_dir_all(&dir);
}
