//! Accepting connections without spinning: a failed `accept` (most often
//! EMFILE, out of file descriptors) is retried after an exponential backoff,
//! and logged at a bounded rate, on every listener.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one accept-failure warning per listener this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A listener whose `accept` backs off after failures.
pub struct Acceptor {
    listener: TcpListener,
    what: &'static str,
    backoff: Duration,
    last_log: Option<Instant>,
    failures_since_log: u64,
}

impl Acceptor {
    /// Wraps `listener`; `what` names it in logs ("client", "peer", "metrics").
    pub fn new(listener: TcpListener, what: &'static str) -> Self {
        Acceptor {
            listener,
            what,
            backoff: FIRST_BACKOFF,
            last_log: None,
            failures_since_log: 0,
        }
    }

    /// The next connection. On failure, waits (doubling up to a second) and
    /// tries again; never returns an error. Cancel-safe.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = FIRST_BACKOFF;
                    return accepted;
                }
                Err(e) => {
                    self.failures_since_log += 1;
                    let now = Instant::now();
                    if self.last_log.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
                        warn!(
                            listener = self.what,
                            error = %e,
                            failures = self.failures_since_log,
                            retry_in = ?self.backoff,
                            "accept failed; backing off (out of file descriptors? raise LimitNOFILE or lower max_connections)"
                        );
                        self.last_log = Some(now);
                        self.failures_since_log = 0;
                    }
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
