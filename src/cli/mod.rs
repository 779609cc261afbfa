//! The `kvraft` command line: argument parsing and the commands.
//!
//! Exit status: 0 success, 1 key not found (`get`), 2 usage or invalid input,
//! 3 cluster or network trouble.

mod bench;
mod certs;
mod endpoint;
mod lease;
mod output;
mod snapshot;
mod txn;
mod value_input;
mod watch;

/// Key number `n` of `kvraft bench`'s key space, `size` bytes long: for
/// benchmarks outside the CLI (benches/) that must write the same keys.
pub use bench::key as bench_key;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::client::{Client, ClientOptions, Expect, ScanOptions, DEFAULT_ENDPOINT};
use crate::error::Error;
use crate::proto::KeyRange;
use output::Printer;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// One JSON document on stdout, for scripts.
    Json,
}

#[derive(Parser)]
#[command(name = "kvraft", version, about = "Client for a kvraft cluster")]
struct Cli {
    /// Client addresses of cluster nodes, comma-separated.
    #[arg(long, env = "KVRAFT_ENDPOINTS", value_delimiter = ',', default_value = DEFAULT_ENDPOINT, global = true)]
    endpoints: Vec<String>,
    /// Give up after this long (e.g. 500ms, 5s, 1m).
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    timeout: Duration,
    /// Output format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    output: OutputFormat,
    /// Read the contacted node's local copy (fast, possibly stale) instead of a
    /// linearizable read.
    #[arg(long, global = true)]
    serializable: bool,
    /// CA certificate (PEM) that signed the servers' certificates; turns TLS on.
    #[arg(
        long = "cacert",
        id = "tls_cacert",
        env = "KVRAFT_CACERT",
        value_name = "PATH",
        global = true
    )]
    cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM); its common name is this client's identity.
    #[arg(
        long = "cert",
        id = "tls_cert",
        env = "KVRAFT_CERT",
        value_name = "PATH",
        global = true
    )]
    cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --cert.
    // `id` keeps it apart from the KEY argument of set/get/delete.
    #[arg(long = "key", id = "tls_key", env = "KVRAFT_KEY", value_name = "PATH", global = true)]
    key: Option<std::path::PathBuf>,
    /// Verify servers' certificates against this name instead of the
    /// endpoint's host (for endpoints given by an address their certificate lacks).
    #[arg(
        long = "server-name",
        id = "tls_server_name",
        env = "KVRAFT_SERVER_NAME",
        value_name = "NAME",
        global = true
    )]
    server_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Set KEY to VALUE (`-` reads the value from stdin; or --value-file).
    Set {
        key: String,
        /// The value; `-` reads it from stdin (binary-safe).
        #[arg(required_unless_present = "value_file", conflicts_with = "value_file")]
        value: Option<String>,
        /// Read the value from this file (binary-safe), for values too large
        /// or too binary for an argument.
        #[arg(long, value_name = "PATH")]
        value_file: Option<std::path::PathBuf>,
        /// Attach KEY to this lease (see `kvraft lease`): it is deleted when
        /// the lease ends. Without it, KEY loses any lease it had.
        #[arg(long, value_name = "ID", default_value_t = 0)]
        lease: u64,
    },
    /// Print the value of KEY (exit status 1 if it does not exist).
    Get {
        key: String,
        /// Write the value's bytes exactly as stored, with no newline (for
        /// binary values; `> FILE` round-trips what `set --value-file` stored).
        /// Overrides --output.
        #[arg(long)]
        raw: bool,
    },
    /// Delete KEY, or every key in a range (--prefix, --from, --to) at one revision.
    Delete {
        #[arg(required_unless_present_any = ["prefix", "from", "to"], conflicts_with_all = ["prefix", "from", "to"])]
        key: Option<String>,
        /// Delete every key that starts with this (`--prefix ""`: every key).
        #[arg(long)]
        prefix: Option<String>,
        /// Delete keys from this one (inclusive).
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        from: Option<String>,
        /// Delete keys before this one.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        to: Option<String>,
    },
    /// Set KEY to NEW_VALUE only if it is as expected; exit status 4 (and the
    /// current value and version) if not.
    #[command(group(clap::ArgGroup::new("expect").required(true)))]
    Cas {
        key: String,
        new_value: String,
        /// Swap only if KEY holds this value.
        #[arg(long, group = "expect", value_name = "VALUE")]
        expect_value: Option<String>,
        /// Swap only if KEY is at this version (writes since it was created).
        #[arg(long, group = "expect", value_name = "N")]
        expect_version: Option<u64>,
        /// Swap only if KEY was last changed at this revision.
        #[arg(long, group = "expect", value_name = "REVISION")]
        expect_mod_revision: Option<u64>,
        /// Swap only if KEY does not exist.
        #[arg(long, group = "expect")]
        expect_absent: bool,
        /// Attach the new value to this lease (with --expect-absent: claim
        /// KEY for as long as the lease lives).
        #[arg(long, value_name = "ID", default_value_t = 0)]
        lease: u64,
    },
    /// Run a transaction read as JSON from stdin (format in the README);
    /// exit status 4 if its compares failed (the failure branch ran).
    Txn,
    /// Print every change to KEY (or a range) as it happens, one line each.
    Watch(watch::WatchArgs),
    /// Leases: keys attached to one are deleted when it ends.
    #[command(subcommand)]
    Lease(lease::LeaseCommand),
    /// List pairs in key order, one `KEY<TAB>VALUE` line each.
    Scan {
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Start at this key (inclusive).
        #[arg(long, default_value = "")]
        from: String,
        /// Stop before this key.
        #[arg(long, default_value = "")]
        to: String,
        /// At most this many pairs (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
    /// Add a node (as a learner; it is promoted to voter once caught up).
    #[command(alias = "add_node")]
    AddNode {
        /// The new node's id (positive, never used before in this cluster).
        id: u64,
        /// The new node's peer address, HOST:PORT.
        peer_addr: String,
        /// The new node's client address, HOST:PORT (it also publishes it itself).
        #[arg(long, default_value = "")]
        client_addr: String,
    },
    /// Remove a node (a leader hands leadership over first).
    #[command(alias = "remove_node")]
    RemoveNode {
        /// The node's id.
        id: u64,
    },
    /// List the members and the leader.
    Members,
    /// Status of the first node that answers (role, term, indexes, members).
    Info,
    /// Round trip to the first node that answers.
    Ping,
    /// Load generator: throughput and latency percentiles.
    Bench(bench::BenchArgs),
    /// Certificates for a first try with TLS (production should use its own PKI).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Backups: save a node's state to a file, restore one into a new cluster.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Each endpoint on its own: health (a linearizable read) or status.
    #[command(subcommand)]
    Endpoint(endpoint::EndpointCommand),
}

/// Parses `500ms`, `5s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, ""), |i| s.split_at(i));
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s or 1m"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s or m")),
    };
    if seconds <= 0.0 || !seconds.is_finite() {
        return Err(format!("{s:?}: the duration must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Runs the CLI and returns the exit status.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let printer = Printer::new(cli.output);
    match runtime.block_on(run(cli, &printer)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kvraft: {e}");
            e.exit_code()
        }
    }
}

async fn run(cli: Cli, printer: &Printer) -> Result<i32, Error> {
    let options = ClientOptions {
        endpoints: cli
            .endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect(),
        timeout: cli.timeout,
        serializable: cli.serializable,
        // An empty value is unset, so KVRAFT_CACERT= turns TLS off.
        tls: crate::tls::client::ClientTlsOptions {
            ca_file: cli.cacert.filter(|p| !p.as_os_str().is_empty()),
            cert_file: cli.cert.filter(|p| !p.as_os_str().is_empty()),
            key_file: cli.key.filter(|p| !p.as_os_str().is_empty()),
            server_name: cli.server_name.filter(|n| !n.is_empty()),
        },
    };
    match cli.command {
        Command::Bench(args) => return bench::run(args, options, printer).await,
        Command::Certs(command) => return certs::run(command, printer),
        Command::Snapshot(command) => {
            return snapshot::run(command, || Client::new(options), cli.serializable, printer).await
        }
        Command::Endpoint(command) => return endpoint::run(command, options, printer).await,
        _ => {}
    }
    let health_options = options.clone();
    let client = Client::new(options)?;
    match cli.command {
        Command::Set {
            key,
            value,
            value_file,
            lease,
        } => {
            let value = value_input::read(value.as_deref(), value_file.as_deref())?;
            printer.set(client.set_with_lease(key, value, lease).await?)
        }
        Command::Get { key, raw } => match client.get_record(key.clone()).await? {
            Some(record) if raw => output::write_raw(&record.value)?,
            Some(record) => printer.record(&record),
            None => {
                printer.not_found(&key);
                return Ok(1);
            }
        },
        Command::Delete { key: Some(key), .. } => {
            let answer = client.delete_record(key.clone()).await?;
            printer.deleted(&key, answer.existed, answer.revision)
        }
        Command::Delete {
            key: None,
            prefix,
            from,
            to,
        } => {
            let range = KeyRange {
                prefix: prefix.unwrap_or_default().into_bytes(),
                from: from.unwrap_or_default().into_bytes(),
                to: to.unwrap_or_default().into_bytes(),
            };
            let answer = client.delete_range(range).await?;
            printer.deleted_range(answer.deleted, answer.revision)
        }
        Command::Cas {
            key,
            new_value,
            expect_value,
            expect_version,
            expect_mod_revision,
            expect_absent,
            lease,
        } => {
            let expect = match (expect_value, expect_version, expect_mod_revision) {
                (Some(v), _, _) => Expect::Value(v.into_bytes()),
                (_, Some(v), _) => Expect::Version(v),
                (_, _, Some(r)) => Expect::ModRevision(r),
                _ => {
                    debug_assert!(expect_absent, "clap requires one of the group");
                    Expect::Absent
                }
            };
            let outcome = client.cas_with_lease(key.clone(), expect, new_value, lease).await?;
            return Ok(txn::print_cas(printer, &key, &outcome));
        }
        Command::Watch(args) => return watch::run(args, client, printer).await,
        Command::Lease(command) => return lease::run(command, client, printer).await,
        Command::Txn => {
            let request = txn::parse(&value_input::read_transaction()?)?;
            let answer = client.txn(request.clone()).await?;
            txn::print(printer, txn::branch_ran(&request, &answer), &answer);
            if !answer.succeeded {
                return Ok(txn::COMPARE_FAILED);
            }
        }
        Command::Scan {
            prefix,
            from,
            to,
            limit,
        } => {
            let options = ScanOptions {
                prefix: prefix.into_bytes(),
                from: from.into_bytes(),
                to: to.into_bytes(),
                limit,
            };
            printer.pairs(&client.scan(options).await?)
        }
        Command::AddNode {
            id,
            peer_addr,
            client_addr,
        } => {
            let members = client.add_node(id, &peer_addr, &client_addr).await?;
            printer.members_changed(
                &format!("added node {id} as a learner; the leader promotes it to voter once it has caught up"),
                &members,
            )
        }
        Command::RemoveNode { id } => {
            let members = client.remove_node(id).await?;
            printer.members_changed(&format!("removed node {id}"), &members)
        }
        Command::Members => {
            let (members, leader) = client.members().await?;
            // Each member asked on its own, briefly: a down one must not
            // hold the list back.
            let timeout = health_options.timeout.min(Duration::from_secs(2));
            let health = endpoint::member_health(&health_options, &members, timeout).await;
            printer.members(&members, leader, &health)
        }
        Command::Info => printer.info(&client.info().await?),
        Command::Ping => {
            let (node, rtt) = client.ping().await?;
            printer.ping(node, rtt)
        }
        Command::Bench(_) | Command::Certs(_) | Command::Snapshot(_) | Command::Endpoint(_) => {
            unreachable!("handled above")
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("abc").is_err());
    }
}
