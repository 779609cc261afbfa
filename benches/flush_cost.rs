//! What a flush of the state store costs per put, with few and with many
//! keys held: the real apply and flush code on one thread, no raft, no
//! network, so a change to the flush can be weighed in a minute instead of
//! in a noisy cluster run (`bench/scale.sh` is still the figure that
//! counts).
//!
//! `cargo bench --bench flush_cost [-- KEYS...]` (default: 10000 600000).
//! For each key count: puts every key once, then 140k puts at random keys
//! (warm-up), then 280k measured; a flush after every 70k puts (about one
//! 5 s flush of a cluster at 14k puts/s), batches of 256 puts as the raft
//! loop applies them, 16-byte keys and 256-byte values as `bench/scale.sh`,
//! a 16 MiB store cache as `kvraftd`'s default. The store lives in a temp
//! dir under `TMPDIR` (a disk, not tmpfs, for figures like a node's).
//! Prints CPU time per put of applying and of flushing, and the flush's
//! wall time (fsyncs included). Compare two builds by running each in turn,
//! a few times: this machine's speed drifts within minutes.

use kvraft::cli::bench_key;
use kvraft::proto::{command, Command, SetRequest};
use kvraft::state_machine::{Batch, StateMachine};
use kvraft::storage::state_store::StateStore;
use std::sync::Arc;
use std::time::Instant;

const KEY_BYTES: usize = 16;
const VALUE_BYTES: usize = 256;
const BATCH: u64 = 256;
const FLUSH_EVERY: u64 = 70_000;
const WARM_UP: u64 = 140_000;
const MEASURED: u64 = 280_000;
const CACHE_BYTES: usize = 16 << 20;

fn put(n: u64) -> Command {
    Command {
        op: Some(command::Op::Set(SetRequest {
            key: bench_key(n, KEY_BYTES),
            value: vec![b'v'; VALUE_BYTES],
            lease: 0,
        })),
        ..Default::default()
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

#[derive(Default)]
struct Cost {
    apply_cpu: f64,
    flush_cpu: f64,
    flush_wall: f64,
}

struct Run {
    machine: StateMachine,
    next_index: u64,
    rng: u64,
}

impl Run {
    /// xorshift64: the same keys in every run and build.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// `count` puts, at keys 0.. in turn (`space` None) or at random keys
    /// below `space`.
    fn puts(&mut self, count: u64, space: Option<u64>) -> Cost {
        let store = self.machine.store().clone();
        let mut cost = Cost::default();
        let mut done = 0;
        while done < count {
            let n = BATCH.min(count - done);
            let commands: Vec<Command> = (done..done + n)
                .map(|i| put(space.map_or(i, |s| self.random() % s)))
                .collect();
            let started = thread_cpu();
            let mut batch = Batch::begin(&store, self.machine.meta().clone()).expect("batch");
            for command in commands {
                batch.apply(self.next_index, 1, command).expect("apply");
                self.next_index += 1;
            }
            self.machine.set_meta(batch.commit().expect("commit"));
            cost.apply_cpu += thread_cpu() - started;
            done += n;
            if done % FLUSH_EVERY < n || done == count {
                let (cpu, wall) = (thread_cpu(), Instant::now());
                store.flush().expect("flush");
                cost.flush_cpu += thread_cpu() - cpu;
                cost.flush_wall += wall.elapsed().as_secs_f64();
            }
        }
        cost
    }
}

/// Flush CPU per put with `keys` held.
fn measure(keys: u64) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(StateStore::open(dir.path(), CACHE_BYTES).expect("open store"));
    let machine = StateMachine::open(store).expect("open state machine");
    let mut run = Run {
        machine,
        next_index: 1,
        rng: 0x9E37_79B9_7F4A_7C15,
    };
    run.puts(keys, None);
    run.puts(WARM_UP, Some(keys));
    let cost = run.puts(MEASURED, Some(keys));
    let per_put = |seconds: f64| seconds * 1e6 / MEASURED as f64;
    println!(
        "{keys:>9} keys held: apply {:5.2} us/put CPU, flush {:5.2} us/put CPU, {:5.2} us/put wall",
        per_put(cost.apply_cpu),
        per_put(cost.flush_cpu),
        per_put(cost.flush_wall)
    );
    per_put(cost.flush_cpu)
}

fn main() {
    // `cargo bench` passes `--bench`; anything numeric is a key count.
    let mut counts: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if counts.is_empty() {
        counts = vec![10_000, 600_000];
    }
    let costs: Vec<f64> = counts.iter().map(|&keys| measure(keys)).collect();
    if let [first, .., last] = costs[..] {
        let (first_keys, last_keys) = (counts[0], counts[counts.len() - 1]);
        println!(
            "flush CPU per put, {last_keys} keys against {first_keys}: {:.2}x",
            last / first
        );
    }
}
