//! systemd integration through sd_notify. Every call is a no-op when
//! `NOTIFY_SOCKET` is not set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::node::NodeHandle;

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1`.
pub fn notify_ready() {
    notify(&[NotifyState::Ready]);
}

/// `STOPPING=1`.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Pings `WATCHDOG=1` at half of `WATCHDOG_USEC`, but only while the raft loop
/// keeps counting rounds: a wedged loop stops the pings and systemd restarts
/// the node.
pub fn spawn_watchdog(rounds: Arc<AtomicU64>) -> Option<JoinHandle<()>> {
    let interval = watchdog_timeout()? / 2;
    Some(tokio::spawn(async move {
        let mut last = rounds.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(interval).await;
            let now = rounds.load(Ordering::Relaxed);
            if now != last {
                notify(&[NotifyState::Watchdog]);
                last = now;
            } else {
                warn!("the raft loop made no progress for {interval:?}; withholding the watchdog ping");
            }
        }
    }))
}

/// `WATCHDOG_USEC`, when it applies to this process. As sd_watchdog_enabled(3)
/// says, `WATCHDOG_PID` restricts it only when set (sd-notify's own check
/// also wants it set).
fn watchdog_timeout() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|u| *u > 0)?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

/// Keeps `STATUS=` current (role, term, leader, applied index), at most once a
/// second.
pub fn spawn_status(handle: NodeHandle) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut status = handle.watch_status();
        let mut last = String::new();
        loop {
            let line = {
                let s = status.borrow_and_update();
                format!(
                    "{} of cluster {:016x}, term {}, leader {}, applied {}",
                    s.role.as_str(),
                    s.cluster_id,
                    s.term,
                    s.leader_id,
                    s.applied_index
                )
            };
            if line != last {
                notify(&[NotifyState::Status(&line)]);
                last = line;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if status.changed().await.is_err() {
                return;
            }
        }
    })
}
