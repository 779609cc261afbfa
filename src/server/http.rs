//! The operations endpoint at `metrics_addr`: `/metrics` (Prometheus text),
//! `/health` (the process is up and its raft loop is making rounds) and
//! `/ready` (a leader is known and this node has applied everything it knows
//! to be committed). A tiny HTTP/1.1 responder: these are three GETs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

use super::accept::Acceptor;
use crate::node::NodeHandle;
use crate::tls::server::ClientPortTls;

/// A raft loop silent for longer than this is unhealthy.
const STALL: Duration = Duration::from_secs(3);
/// Connections served at once (scrapers and probes need a handful).
const MAX_CONNECTIONS: usize = 64;
/// A whole request, TLS handshake included, must be done within this.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// What the endpoints read.
#[derive(Clone)]
pub struct Endpoints {
    /// Renders the metrics.
    pub prometheus: PrometheusHandle,
    /// The node's status.
    pub handle: NodeHandle,
    /// Raft loop rounds, sampled for `/health`.
    pub raft_rounds: Arc<AtomicU64>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the endpoints until the task is dropped; over HTTPS when `tls` is
/// set (no client certificate asked: these endpoints are read-only).
pub async fn serve(listener: TcpListener, endpoints: Endpoints, tls: Option<Arc<ClientPortTls>>) {
    let last_progress = Arc::new(Mutex::new(Instant::now()));
    // Ends with this future: aborting the server aborts its upkeep too.
    let _upkeep = {
        let (rounds, last_progress) = (endpoints.raft_rounds.clone(), last_progress.clone());
        let prometheus = endpoints.prometheus.clone();
        AbortOnDrop(tokio::spawn(async move {
            let mut seen = rounds.load(Ordering::Relaxed);
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let now = rounds.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    *last_progress.lock().unwrap() = Instant::now();
                }
                // Histograms need periodic upkeep in this exporter.
                prometheus.run_upkeep();
            }
        }))
    };
    let mut acceptor = Acceptor::new(listener, "metrics");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, _) = acceptor.accept().await;
        let (endpoints, last_progress, tls) = (endpoints.clone(), last_progress.clone(), tls.clone());
        tokio::spawn(async move {
            let serve = async {
                match tls {
                    None => respond(stream, &endpoints, &last_progress).await,
                    Some(tls) => {
                        let stream = tokio_rustls::TlsAcceptor::from(tls.server_config())
                            .accept(stream)
                            .await?;
                        respond(stream, &endpoints, &last_progress).await
                    }
                }
            };
            match tokio::time::timeout(REQUEST_DEADLINE, serve).await {
                Ok(Err(e)) => debug!(error = %e, "metrics connection failed"),
                Err(_) => debug!("metrics connection too slow; closed"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    endpoints: &Endpoints,
    last_progress: &Mutex<Instant>,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            crate::metrics::update_process();
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                endpoints.prometheus.render(),
            )
        }
        ("GET", "/health") => {
            let silent = last_progress.lock().unwrap().elapsed();
            let status = endpoints.handle.status();
            if status.stopped {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "raft loop stopped\n".to_string(),
                )
            } else if silent > STALL {
                let body = format!("raft loop made no progress for {silent:?}\n");
                ("503 Service Unavailable", "text/plain", body)
            } else {
                ("200 OK", "text/plain", "ok\n".to_string())
            }
        }
        ("GET", "/ready") => {
            let s = endpoints.handle.status();
            if s.leader_id == 0 {
                ("503 Service Unavailable", "text/plain", "no leader known\n".to_string())
            } else if s.applied_index < s.commit_index {
                let body = format!("applied {} of {} committed\n", s.applied_index, s.commit_index);
                ("503 Service Unavailable", "text/plain", body)
            } else {
                let body = format!("ready: leader {}, applied {}\n", s.leader_id, s.applied_index);
                ("200 OK", "text/plain", body)
            }
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /health or /ready\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
