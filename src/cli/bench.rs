//! `kvraft bench`: a load generator modelled on etcd's `benchmark`. N clients
//! (each one request in flight) share M connections; every request's latency
//! goes into an HDR histogram.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::json;

use super::output::Printer;
use crate::client::{Client, ClientOptions};
use crate::error::Error;

/// The operation to load the cluster with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchOp {
    /// Writes.
    Put,
    /// Reads (linearizable unless --serializable).
    Get,
    /// Transactions: a compare on the key's version, then a put either way
    /// (etcd's `benchmark txn-put` does the same).
    Txn,
    /// Puts watched by --watchers watchers on the keys' prefix: throughput
    /// is events delivered per second over all watchers, latency is from a
    /// put's start to each watcher's receipt of it.
    Watch,
}

/// `kvraft bench` arguments.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// put or get.
    #[arg(value_enum)]
    op: BenchOp,
    /// Concurrent clients (each keeps one request in flight).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// TCP connections the clients share.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Total requests.
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 16)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Keys are drawn at random from this many.
    #[arg(long, default_value_t = 1)]
    key_space: u64,
    /// Watchers (bench watch), spread over the connections.
    #[arg(long, default_value_t = 1)]
    watchers: usize,
}

/// A put's start, in nanoseconds since the bench began, carried in its value
/// so watchers can time delivery.
fn stamped(value: &[u8], started: Instant) -> Vec<u8> {
    let mut v = (started.elapsed().as_nanos() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(value.get(8..).unwrap_or_default());
    v
}

/// Watchers of every benchmark key; each records delivery latency until it
/// has seen `total` events (or a minute passed).
async fn spawn_watchers(
    connections: &[Client],
    args: &BenchArgs,
    started: Instant,
) -> Result<Vec<tokio::task::JoinHandle<(Histogram<u64>, u64)>>, Error> {
    use crate::client::WatchOptions;
    let mut tasks = Vec::new();
    for w in 0..args.watchers {
        let options = WatchOptions {
            range: Some(crate::proto::KeyRange::prefix("k")),
            ..Default::default()
        };
        let mut watcher = connections[w % connections.len()].watch(options).await?;
        let total = args.total;
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut seen = 0u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while seen < total {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(Some(Ok(update))) = tokio::time::timeout(left, watcher.next()).await else {
                    break;
                };
                if let crate::client::WatchUpdate::Events { events, .. } = update {
                    let now = started.elapsed().as_nanos() as u64;
                    for event in events {
                        let value = event.kv.map(|kv| kv.value).unwrap_or_default();
                        let sent = value
                            .get(..8)
                            .map_or(now, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                        let _ = histogram.record((now.saturating_sub(sent) / 1000).max(1));
                        seen += 1;
                    }
                }
            }
            (histogram, seen)
        }));
    }
    Ok(tasks)
}

/// Key number `n`: its digits, left-padded with 'k' to `size` bytes.
pub fn key(n: u64, size: usize) -> Vec<u8> {
    let digits = format!("{n}");
    let mut k = vec![b'k'; size.saturating_sub(digits.len())];
    k.extend_from_slice(digits.as_bytes());
    k
}

/// Runs the benchmark and prints the summary.
pub async fn run(args: BenchArgs, options: ClientOptions, printer: &Printer) -> Result<i32, Error> {
    if args.clients == 0 || args.conns == 0 || args.total == 0 || args.key_space == 0 || args.key_size == 0 {
        return Err(Error::InvalidArgument(
            "--clients, --conns, --total, --key-space and --key-size must be at least 1".into(),
        ));
    }
    // One Client per connection, each starting at a different endpoint
    // (connection i on endpoint i mod n, as etcd's benchmark does).
    let connections: Vec<Client> = (0..args.conns)
        .map(|i| {
            let mut options = options.clone();
            let n = options.endpoints.len();
            options.endpoints.rotate_left(i % n);
            Client::new(options)
        })
        .collect::<Result<_, _>>()?;
    let issued = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let value = vec![b'v'; args.val_size.max(8)];
    let started = Instant::now();
    let watchers = if args.op == BenchOp::Watch {
        spawn_watchers(&connections, &args, started).await?
    } else {
        Vec::new()
    };
    let progress = tokio::spawn(progress_bar(done.clone(), args.total));
    let mut workers = Vec::new();
    for i in 0..args.clients {
        let client = connections[i % args.conns].clone();
        let (issued, done, errors, value, args) = (
            issued.clone(),
            done.clone(),
            errors.clone(),
            value.clone(),
            args.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut last_error = None;
            while issued.fetch_add(1, Ordering::Relaxed) < args.total {
                let k = key(rand::rng().random_range(0..args.key_space), args.key_size);
                let t = Instant::now();
                let result = match args.op {
                    BenchOp::Put => client.set(k, value.clone()).await.map(|_| ()),
                    BenchOp::Watch => client.set(k, stamped(&value, started)).await.map(|_| ()),
                    BenchOp::Get => client.get(k).await.map(|_| ()),
                    BenchOp::Txn => {
                        use crate::proto::{Compare, TxnOp, TxnRequest};
                        let txn = TxnRequest {
                            compare: vec![Compare::version(k.clone(), crate::client::CompareOp::Greater, 0)],
                            success: vec![TxnOp::put(k.clone(), value.clone())],
                            failure: vec![TxnOp::put(k, value.clone())],
                        };
                        client.txn(txn).await.map(|_| ())
                    }
                };
                match result {
                    Ok(()) => {
                        let _ = histogram.record(t.elapsed().as_micros().max(1) as u64);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        last_error = Some(e.to_string());
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (histogram, last_error)
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut last_error = None;
    for w in workers {
        let (h, e) = w.await.expect("bench worker panicked");
        histogram.add(&h).expect("same histogram bounds");
        last_error = e.or(last_error);
    }
    let mut delivered = 0u64;
    if !watchers.is_empty() {
        // What is timed is delivery: events over all watchers.
        histogram.reset();
        for w in watchers {
            let (h, seen) = w.await.expect("bench watcher panicked");
            histogram.add(&h).expect("same histogram bounds");
            delivered += seen;
        }
    }
    let elapsed = started.elapsed();
    progress.abort();
    eprintln!();
    let completed = histogram.len();
    let errors = errors.load(Ordering::Relaxed);
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let ops_per_s = completed as f64 / elapsed.as_secs_f64();
    let op = match args.op {
        BenchOp::Put => "put",
        BenchOp::Txn => "txn",
        BenchOp::Watch => "watch",
        BenchOp::Get if options.serializable => "get (serializable)",
        BenchOp::Get => "get (linearizable)",
    };
    let summary = json!({
        "op": op,
        "clients": args.clients,
        "conns": args.conns,
        "total": args.total,
        "completed": completed,
        "errors": errors,
        "seconds": elapsed.as_secs_f64(),
        "ops_per_s": ops_per_s,
        "p50_ms": ms(0.5),
        "p90_ms": ms(0.9),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": histogram.max() as f64 / 1000.0,
        "watchers": if args.op == BenchOp::Watch { args.watchers } else { 0 },
    });
    if args.op == BenchOp::Watch && delivered < args.total * args.watchers as u64 {
        eprintln!(
            "kvraft bench: watchers received {delivered} of {} events",
            args.total * args.watchers as u64
        );
        return Ok(3);
    }
    let text = format!(
        "Summary ({op}, {} clients over {} connections):\n  Total:      {:.3} s\n  Requests:   {completed} ok, {errors} errors\n  Throughput: {ops_per_s:.1} ops/s\nLatency (ms):\n  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
        args.clients,
        args.conns,
        elapsed.as_secs_f64(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        histogram.max() as f64 / 1000.0,
    );
    printer.bench(summary, text);
    if let Some(e) = last_error {
        eprintln!("kvraft bench: last error: {e}");
    }
    Ok(if errors > 0 { 3 } else { 0 })
}

async fn progress_bar(done: Arc<AtomicU64>, total: u64) {
    const WIDTH: u64 = 40;
    loop {
        let n = done.load(Ordering::Relaxed).min(total);
        let filled = (n * WIDTH / total) as usize;
        eprint!(
            "\r[{}{}] {n}/{total}",
            "#".repeat(filled),
            " ".repeat(WIDTH as usize - filled)
        );
        let _ = std::io::stderr().flush();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
