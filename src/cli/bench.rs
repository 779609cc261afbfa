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
}

fn key(n: u64, size: usize) -> Vec<u8> {
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
    let value = vec![b'v'; args.val_size];
    let started = Instant::now();
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
                    BenchOp::Get => client.get(k).await.map(|_| ()),
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
    let elapsed = started.elapsed();
    progress.abort();
    eprintln!();
    let completed = histogram.len();
    let errors = errors.load(Ordering::Relaxed);
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let ops_per_s = completed as f64 / elapsed.as_secs_f64();
    let op = match args.op {
        BenchOp::Put => "put",
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
    });
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
