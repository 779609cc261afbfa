//! etcd-baseline: a load generator for etcd v3 that mirrors the
//! semantics of `kvraft bench` (N workers, each one request in flight, sharing
//! M connections; a shared atomic counter hands out the T requests; latency in
//! microseconds into an HDR histogram 1 us..60 s, 3 significant figures).
//!
//! Connections follow etcd's `benchmark` convention: connection i is an
//! etcd-client `Client` dialled to endpoint i % len(endpoints) only.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use etcd_client::{Client, ConnectOptions, GetOptions};
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchOp {
    /// etcd Put.
    Put,
    /// etcd Range of one key (linearizable unless --serializable).
    Get,
    /// etcd Txn: a compare on the key's version, then a put either way.
    Txn,
    /// Puts watched by --watchers watchers on the keys' prefix (as `kvraft
    /// bench watch`): events delivered per second, put-to-receipt latency.
    Watch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "etcd-baseline", about = "kvraft-bench-compatible load generator for etcd v3")]
struct Args {
    /// put or get.
    #[arg(value_enum)]
    op: BenchOp,
    /// etcd client URLs, comma-separated (http:// is implied).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
    )]
    endpoints: Vec<String>,
    /// Concurrent clients (each keeps one request in flight).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// gRPC connections the clients share (connection i -> endpoint i % len).
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
    /// Watchers (watch), spread over the connections.
    #[arg(long, default_value_t = 1)]
    watchers: usize,
    /// Use serializable (member-local) ranges for get.
    #[arg(long)]
    serializable: bool,
    /// Per-request timeout in seconds (kvraft's default is 5s).
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    output: OutputFormat,
    /// CA certificate (PEM): talk TLS (https) to the endpoints, as etcdctl.
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for etcd's --client-cert-auth.
    #[arg(long)]
    cert: Option<std::path::PathBuf>,
    /// Key of --cert (PEM).
    #[arg(long)]
    key: Option<std::path::PathBuf>,
}

fn key(n: u64, size: usize) -> Vec<u8> {
    let digits = format!("{n}");
    let mut k = vec![b'k'; size.saturating_sub(digits.len())];
    k.extend_from_slice(digits.as_bytes());
    k
}

/// A put's start, in nanoseconds since the bench began, in its value.
fn stamped(value: &[u8], started: Instant) -> Vec<u8> {
    let mut v = (started.elapsed().as_nanos() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(value.get(8..).unwrap_or_default());
    v
}

/// Watchers of every benchmark key, as `kvraft bench watch` runs them.
async fn spawn_watchers(
    connections: &[Client],
    args: &Args,
    started: Instant,
) -> Result<Vec<tokio::task::JoinHandle<(Histogram<u64>, u64)>>, String> {
    let mut tasks = Vec::new();
    for w in 0..args.watchers {
        let mut client = connections[w % connections.len()].clone();
        let mut stream = client
            .watch("k", Some(etcd_client::WatchOptions::new().with_prefix()))
            .await
            .map_err(|e| format!("watch: {e}"))?;
        let total = args.total;
        tasks.push(tokio::spawn(async move {
            let mut histogram = new_histogram();
            let mut seen = 0u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while seen < total {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(Ok(Some(response))) = tokio::time::timeout(left, stream.message()).await else {
                    break;
                };
                let now = started.elapsed().as_nanos() as u64;
                for event in response.events() {
                    let value = event.kv().map(|kv| kv.value()).unwrap_or_default();
                    let sent = value.get(..8).map_or(now, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                    let _ = histogram.record((now.saturating_sub(sent) / 1000).max(1));
                    seen += 1;
                }
            }
            (histogram, seen)
        }));
    }
    Ok(tasks)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("etcd-baseline: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> Result<u8, String> {
    if args.clients == 0
        || args.conns == 0
        || args.total == 0
        || args.key_space == 0
        || args.key_size == 0
        || args.endpoints.is_empty()
    {
        return Err("--clients, --conns, --total, --key-space, --key-size and --endpoints must be at least 1".into());
    }
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        return Err("--timeout must be positive".into());
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut options = ConnectOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(timeout);
    let mut endpoints = args.endpoints.clone();
    if let Some(ca) = &args.cacert {
        let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
        endpoints = endpoints.iter().map(|e| format!("https://{e}")).collect();
    }

    // One Client per connection; connection i talks to endpoint i % len only.
    let mut connections = Vec::with_capacity(args.conns);
    for i in 0..args.conns {
        let ep = &endpoints[i % endpoints.len()];
        let c = Client::connect([ep.as_str()], Some(options.clone()))
            .await
            .map_err(|e| format!("connect {ep}: {e}"))?;
        connections.push(c);
    }

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
        // KvClient clones share the connection's (HTTP/2-multiplexed) channel.
        let mut kv = connections[i % args.conns].kv_client();
        let (issued, done, errors, value, args) = (
            issued.clone(),
            done.clone(),
            errors.clone(),
            value.clone(),
            args.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut histogram = new_histogram();
            let mut last_error = None;
            while issued.fetch_add(1, Ordering::Relaxed) < args.total {
                let k = key(rand::rng().random_range(0..args.key_space), args.key_size);
                let t = Instant::now();
                let result = match args.op {
                    BenchOp::Put => kv.put(k, value.clone(), None).await.map(|_| ()),
                    BenchOp::Watch => kv.put(k, stamped(&value, started), None).await.map(|_| ()),
                    BenchOp::Get => {
                        let opts = if args.serializable {
                            Some(GetOptions::new().with_serializable())
                        } else {
                            None
                        };
                        kv.get(k, opts).await.map(|_| ())
                    }
                    BenchOp::Txn => {
                        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                        let txn = Txn::new()
                            .when(vec![Compare::version(k.clone(), CompareOp::Greater, 0)])
                            .and_then(vec![TxnOp::put(k.clone(), value.clone(), None)])
                            .or_else(vec![TxnOp::put(k, value.clone(), None)]);
                        kv.txn(txn).await.map(|_| ())
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
    let mut histogram = new_histogram();
    let mut last_error = None;
    for w in workers {
        let (h, e) = w.await.expect("bench worker panicked");
        histogram.add(&h).expect("same histogram bounds");
        last_error = e.or(last_error);
    }
    let mut delivered = 0u64;
    if !watchers.is_empty() {
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
        BenchOp::Get if args.serializable => "get (serializable)",
        BenchOp::Get => "get (linearizable)",
    };
    match args.output {
        OutputFormat::Json => {
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
            println!("{summary}");
        }
        OutputFormat::Text => println!(
            "Summary ({op}, {} clients over {} connections):\n  Total:      {:.3} s\n  Requests:   {completed} ok, {errors} errors\n  Throughput: {ops_per_s:.1} ops/s\nLatency (ms):\n  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            args.clients,
            args.conns,
            elapsed.as_secs_f64(),
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            histogram.max() as f64 / 1000.0,
        ),
    }
    if let Some(e) = last_error {
        eprintln!("etcd-baseline: last error: {e}");
    }
    if args.op == BenchOp::Watch && delivered < args.total * args.watchers as u64 {
        eprintln!(
            "etcd-baseline: watchers received {delivered} of {} events",
            args.total * args.watchers as u64
        );
        return Ok(3);
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
