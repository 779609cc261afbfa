//! `kvraft endpoint health` and `kvraft endpoint status` (etcdctl's model):
//! every endpoint asked on its own, at once, so one dead node neither hides
//! nor delays what the others say. Also the health column of `members`.

use std::time::{Duration, Instant};

use clap::Subcommand;
use serde_json::{json, Value};

use super::output::Printer;
use crate::client::{Client, ClientOptions};
use crate::error::Error;
use crate::proto::{InfoResponse, Member};

/// `kvraft endpoint ...`
#[derive(Subcommand)]
pub enum EndpointCommand {
    /// Per endpoint: does it serve a linearizable read (so it is up and the
    /// cluster has a leader it can reach)? Exit 3 unless every one does.
    Health,
    /// Per endpoint: id, role, leader, raft term, commit and applied index,
    /// keys, round trip. Exit 3 if any endpoint does not answer.
    Status,
}

/// What one endpoint said to a health check.
pub(crate) struct Health {
    pub(crate) endpoint: String,
    /// How long the linearizable read took, or why it failed.
    pub(crate) result: Result<Duration, Error>,
}

/// A client for `endpoint` alone.
fn client_for(options: &ClientOptions, endpoint: &str, timeout: Duration) -> Result<Client, Error> {
    Client::new(ClientOptions {
        endpoints: vec![endpoint.to_string()],
        timeout,
        serializable: false,
        tls: options.tls.clone(),
    })
}

/// A linearizable read through `endpoint` alone.
pub(crate) async fn health(options: &ClientOptions, endpoint: &str, timeout: Duration) -> Health {
    let started = Instant::now();
    let result = match client_for(options, endpoint, timeout) {
        Ok(client) => client.members().await.map(|_| started.elapsed()),
        Err(e) => Err(e),
    };
    Health {
        endpoint: endpoint.to_string(),
        result,
    }
}

/// `info` from `endpoint` alone, with the round trip.
async fn status(options: &ClientOptions, endpoint: &str) -> (String, Result<(InfoResponse, Duration), Error>) {
    let started = Instant::now();
    let result = match client_for(options, endpoint, options.timeout) {
        Ok(client) => client.info().await.map(|info| (info, started.elapsed())),
        Err(e) => Err(e),
    };
    (endpoint.to_string(), result)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Runs an `endpoint` command; returns the exit status.
pub async fn run(command: EndpointCommand, options: ClientOptions, printer: &Printer) -> Result<i32, Error> {
    match command {
        EndpointCommand::Health => {
            let checks =
                futures::future::join_all(options.endpoints.iter().map(|e| health(&options, e, options.timeout))).await;
            let all_healthy = checks.iter().all(|c| c.result.is_ok());
            let json = Value::Array(
                checks
                    .iter()
                    .map(|c| match &c.result {
                        Ok(took) => json!({"endpoint": c.endpoint, "healthy": true, "took_ms": ms(*took)}),
                        Err(e) => json!({"endpoint": c.endpoint, "healthy": false, "error": e.to_string()}),
                    })
                    .collect(),
            );
            printer.emit_summary(json, || {
                checks
                    .iter()
                    .map(|c| match &c.result {
                        Ok(took) => format!(
                            "{} is healthy: a linearizable read took {:.3} ms",
                            c.endpoint,
                            ms(*took)
                        ),
                        Err(e) => format!("{} is unhealthy: {e}", c.endpoint),
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(if all_healthy { 0 } else { 3 })
        }
        EndpointCommand::Status => {
            let statuses = futures::future::join_all(options.endpoints.iter().map(|e| status(&options, e))).await;
            let all_answered = statuses.iter().all(|(_, s)| s.is_ok());
            let json = Value::Array(
                statuses
                    .iter()
                    .map(|(endpoint, s)| match s {
                        Ok((i, rtt)) => json!({
                            "endpoint": endpoint,
                            "reachable": true,
                            "id": i.id,
                            "role": i.role,
                            "leader_id": i.leader_id,
                            "has_leader": i.leader_id != 0,
                            "term": i.term,
                            "commit_index": i.commit_index,
                            "applied_index": i.applied_index,
                            "keys": i.keys,
                            "version": i.version,
                            "rtt_ms": ms(*rtt),
                        }),
                        Err(e) => json!({"endpoint": endpoint, "reachable": false, "error": e.to_string()}),
                    })
                    .collect(),
            );
            printer.emit_summary(json, || {
                let mut lines = vec![format!(
                    "{:<22} {:>4} {:<9} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10}",
                    "ENDPOINT", "ID", "ROLE", "LEADER", "TERM", "COMMIT", "APPLIED", "KEYS", "RTT"
                )];
                for (endpoint, s) in &statuses {
                    lines.push(match s {
                        Ok((i, rtt)) => format!(
                            "{:<22} {:>4} {:<9} {:>6} {:>6} {:>10} {:>10} {:>10} {:>7.3} ms",
                            endpoint,
                            i.id,
                            i.role,
                            if i.leader_id == 0 {
                                "none".to_string()
                            } else {
                                i.leader_id.to_string()
                            },
                            i.term,
                            i.commit_index,
                            i.applied_index,
                            i.keys,
                            ms(*rtt)
                        ),
                        Err(Error::NothingListening { .. }) => {
                            format!("{endpoint:<22} down: nothing is listening there (connection refused)")
                        }
                        Err(e) => format!("{endpoint:<22} unreachable: {e}"),
                    });
                }
                lines.join("\n")
            });
            Ok(if all_answered { 0 } else { 3 })
        }
    }
}

/// The health of every member with a client address, for `members`: each
/// checked at once, within `timeout`.
pub(crate) async fn member_health(
    options: &ClientOptions,
    members: &[Member],
    timeout: Duration,
) -> Vec<Option<Health>> {
    futures::future::join_all(members.iter().map(|m| async move {
        if m.client_addr.is_empty() {
            None
        } else {
            Some(health(options, &m.client_addr, timeout).await)
        }
    }))
    .await
}
