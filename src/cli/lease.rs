//! `kvraft lease ...`: grant, keepalive, revoke, ttl, list.
//!
//! Text output is made for shell scripts as well as people: `grant` prints
//! `lease ID granted with TTL Ns`, so `$(kvraft lease grant 10 | cut -d' ' -f2)`
//! is the id.

use std::time::Instant;

use clap::Subcommand;
use serde_json::json;

use super::output::text;
use super::Printer;
use crate::client::{Client, Lease, LeaseState};
use crate::error::Error;
use crate::leases::MAX_TTL;

/// The lease subcommands.
#[derive(Subcommand)]
pub enum LeaseCommand {
    /// Grant a lease of TTL_SECONDS (raised to the cluster's minimum, 2 s by
    /// default); keys set with --lease ID are deleted when it ends.
    Grant {
        /// Seconds it lives unless kept alive.
        ttl_seconds: u64,
    },
    /// Keep lease ID alive until interrupted (renewing every third of its
    /// TTL); exit status 1 once it is gone.
    #[command(alias = "keep-alive")]
    Keepalive {
        /// The lease.
        id: u64,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
    /// End lease ID now, deleting every key attached to it.
    Revoke {
        /// The lease.
        id: u64,
    },
    /// Time left of lease ID (exit status 1 if it is gone).
    Ttl {
        /// The lease.
        id: u64,
        /// Also list the keys attached to it.
        #[arg(long)]
        keys: bool,
    },
    /// List every lease.
    List,
}

fn print_renewed(printer: &Printer, id: u64, ttl: u64) {
    printer.emit(json!({"id": id, "ttl": ttl}), || {
        format!("lease {id} kept alive with TTL {ttl}s")
    });
}

/// Renews lease `id` every third of its TTL (through the client's
/// [`LeaseKeeper`](crate::client::LeaseKeeper)) until it is gone (exit 1)
/// or can't be renewed before it runs out (exit 3): a script waiting on
/// this command learns it lost the lease no later than the cluster does.
async fn keep_alive(client: &Client, id: u64, printer: &Printer) -> Result<i32, Error> {
    let sent = Instant::now();
    let ttl = client.lease_keep_alive_once(id).await?;
    print_renewed(printer, id, ttl.min(MAX_TTL));
    let mut keeper = client.keep_alive_from(Lease { id, ttl }, Some(sent));
    loop {
        match keeper.next().await {
            LeaseState::Alive { ttl, .. } => print_renewed(printer, id, ttl),
            LeaseState::Gone(why) => return Err(Error::LeaseNotFound(why)),
            LeaseState::Lost(why) => {
                eprintln!("kvraft: {why}");
                return Ok(3);
            }
        }
    }
}

/// Runs a lease subcommand; returns the exit status.
pub async fn run(command: LeaseCommand, client: Client, printer: &Printer) -> Result<i32, Error> {
    match command {
        LeaseCommand::Grant { ttl_seconds } => {
            let lease = client.lease_grant(ttl_seconds).await?;
            printer.emit(json!({"id": lease.id, "ttl": lease.ttl}), || {
                format!("lease {} granted with TTL {}s", lease.id, lease.ttl)
            });
        }
        LeaseCommand::Keepalive { id, once } => {
            if once {
                let ttl = client.lease_keep_alive_once(id).await?;
                print_renewed(printer, id, ttl);
            } else {
                return keep_alive(&client, id, printer).await;
            }
        }
        LeaseCommand::Revoke { id } => {
            let answer = client.lease_revoke(id).await?;
            printer.emit(
                json!({"id": id, "revision": answer.revision, "deleted": answer.deleted}),
                || {
                    let s = if answer.deleted == 1 { "" } else { "s" };
                    format!("lease {id} revoked; {} key{s} deleted", answer.deleted)
                },
            );
        }
        LeaseCommand::Ttl { id, keys } => {
            let answer = client.lease_time_to_live(id, keys).await?;
            let listed: Vec<String> = answer.keys.iter().map(|k| text(k)).collect();
            let mut j = json!({
                "id": id,
                "ttl": answer.ttl,
                "granted_ttl": answer.granted_ttl,
                "key_count": answer.key_count,
            });
            if keys {
                j["keys"] = json!(listed);
                j["keys_omitted"] = json!(answer.keys_omitted);
            }
            printer.emit(j, || {
                let mut line = format!(
                    "lease {id} granted with TTL {}s, remaining {}s, {} key{} attached",
                    answer.granted_ttl,
                    answer.ttl,
                    answer.key_count,
                    if answer.key_count == 1 { "" } else { "s" }
                );
                if keys {
                    line.push_str(&format!(": {}", listed.join(", ")));
                    if answer.keys_omitted > 0 {
                        line.push_str(&format!(" and {} more", answer.keys_omitted));
                    }
                }
                line
            });
        }
        LeaseCommand::List => {
            let ids = client.lease_list().await?;
            printer.emit(json!({"ids": ids}), || {
                ids.iter().map(u64::to_string).collect::<Vec<_>>().join("\n")
            });
        }
    }
    Ok(0)
}
