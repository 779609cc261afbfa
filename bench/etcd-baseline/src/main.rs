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
    let value = vec![b'v'; args.val_size];
    let started = Instant::now();
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
                    BenchOp::Get => {
                        let opts = if args.serializable {
                            Some(GetOptions::new().with_serializable())
                        } else {
                            None
                        };
                        kv.get(k, opts).await.map(|_| ())
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
    let elapsed = started.elapsed();
    progress.abort();
    eprintln!();

    let completed = histogram.len();
    let errors = errors.load(Ordering::Relaxed);
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let ops_per_s = completed as f64 / elapsed.as_secs_f64();
    let op = match args.op {
        BenchOp::Put => "put",
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
