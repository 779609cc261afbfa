//! Fills a redb file with KEYS keys (16 bytes, 280-byte records: the
//! `bench/scale.sh` workload), then times flushes of PUTS_PER_FLUSH random
//! puts (sorted, as the memtable hands them over; one durable commit each)
//! and prints the CPU per put. Layouts:
//!
//! - `inline`: one entry per key holding its whole record (the store today);
//! - `headers`: one entry per key holding a 24-byte header only (the floor
//!   of any layout that keeps one entry per key);
//! - `value-log`: headers, with the values appended to a file fsynced before
//!   the commit (no garbage collection);
//! - `value-table`: headers, with the values in a second table keyed by an
//!   increasing id (appended, never deleted);
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
    value_log: std::fs::File,
    next_id: u64,
    chunk_bytes: usize,
}

impl Bench {
    /// One flush of `keys` (sorted), one durable commit.
    fn flush(&mut self, keys: &[[u8; 16]], random: &mut Random) {
        let mut record = [0u8; RECORD];
        let mut txn = self.db.begin_write().expect("begin");
        if self.layout == "chunks" {
            random.fill(&mut record);
            chunks::write(&txn, keys, &record, self.chunk_bytes);
        } else {
            let mut kv = txn.open_table(KV).expect("kv");
            let mut values = txn.open_table(VALUES).expect("values");
            let mut log = Vec::new();
            for key in keys {
                random.fill(&mut record);
                self.next_id += 1;
                let entry: &[u8] = match self.layout.as_str() {
                    "inline" => &record,
                    "headers" => &header(0),
                    "value-log" => {
                        log.extend_from_slice(key);
                        log.extend_from_slice(&record);
                        &header(log.len() as u64)
                    }
                    "value-table" => {
                        values.insert(self.next_id, record.as_slice()).expect("insert");
                        &header(self.next_id)
                    }
                    other => panic!("unknown layout {other}"),
                };
                kv.insert(key.as_slice(), entry).expect("insert");
            }
            if !log.is_empty() {
                self.value_log.write_all(&log).expect("value log");
                self.value_log.sync_data().expect("fsync");
            }
        }
        txn.set_durability(Durability::Immediate);
        txn.set_quick_repair(true);
        txn.commit().expect("commit");
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
        value_log: std::fs::File::create(dir.join("values.log")).expect("value log"),
        next_id: 0,
        chunk_bytes,
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
    for round in 0..WARM_UP_FLUSHES + TIMED_FLUSHES {
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
        "{} with {keys} keys, {per_flush} puts per flush, {cache_mib} MiB cache: {:.2} us of CPU per put (file {file_mib} MiB)",
        bench.layout,
        cpu * 1e6 / puts as f64
    );
    drop(bench);
    let _ = std::fs::remove_dir_all(&dir);
}
