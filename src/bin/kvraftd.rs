//! `kvraftd`: one kvraft node. With no flags it runs a single-node cluster on
//! 127.0.0.1 (clients 7379, peers 7380) with its data in ./kvraft-data.

/// jemalloc (as TiKV uses), not glibc's malloc: buffers are allocated on one
/// thread and freed on another all the time (a request decoded on a tokio
/// worker is applied and dropped on the raft thread, the reverse for
/// replies), and glibc spent about a tenth of the node's CPU on that under
/// load. Measured with ~530k keys held (3 nodes, alternating builds on one
/// data set): 15.2k against 12.9k puts/s, 104 against 123 µs of CPU per put,
/// p99.9 38 against 55+ ms, RSS after those runs 158 against 160-166 MiB (the
/// peak over bench/scale.sh's fill was 205 against 196 MiB).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`. By default it keeps freed pages
/// for 10 s before giving them back, and each flush frees a whole layer of
/// writes (up to 48 MiB) at once: peak RSS in bench/scale.sh was 205-216 MiB
/// (up to 1.57x the data). Returning them after 5 s from a background thread
/// kept it at 192 MiB (1.39x) at the same throughput (13.3k puts/s with 532k
/// keys held, p99.9 41 ms). `_RJEM_MALLOC_CONF` in the environment overrides.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0\0";

fn main() {
    std::process::exit(kvraft::daemon::main());
}
