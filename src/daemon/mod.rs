//! `kvraftd` as a system daemon: layered configuration, logging with a
//! reloadable filter, systemd readiness/status/watchdog, and signals
//! (SIGTERM/SIGINT graceful stop, a second one exits at once, SIGHUP reloads the
//! log filter).

mod logging;
mod systemd;

use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tracing::{error, info, warn};

use crate::config::{ConfigSources, DaemonArgs, NodeConfig};
use crate::storage::StorageError;

#[derive(Parser)]
#[command(
    name = "kvraftd",
    version,
    args_override_self = true,
    about = "A kvraft node: a replicated key-value store on Raft",
    after_help = "Every flag is also a config file key and a KVRAFT_* environment variable \
                  (--client-addr = client_addr = KVRAFT_CLIENT_ADDR). \
                  Precedence: defaults < file < environment < flags."
)]
struct Cli {
    #[command(flatten)]
    args: DaemonArgs,
}

/// The command line, with each flag's built-in default taken from
/// `NodeConfig::default()` (written nowhere else).
fn command() -> clap::Command {
    let mut command = Cli::command();
    for (key, text) in crate::config::default_texts() {
        command = command.mut_arg(key, |arg| {
            if !arg.get_action().takes_values() {
                return arg;
            }
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            arg.help(format!("{help} [default: {text}]"))
        });
    }
    command
}

/// Exit status when the settings (flags, file, environment) or the data dir
/// don't fit: sysexits' EX_CONFIG. Distinct from 1 (a failure at run time) and
/// 2 (unusable command line) so that a service manager can stop restarting a
/// node that would only fail the same way again (`RestartPreventExitStatus=78`).
pub const EXIT_CONFIG: i32 = 78;
/// Exit status of a failure at run time: storage, a port already taken, a
/// second signal during a graceful stop.
pub const EXIT_FAILURE: i32 = 1;

/// Runs the daemon; returns the process exit status.
pub fn main() -> i32 {
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    let print_config = cli.args.print_config;
    let sources = ConfigSources::new(cli.args);
    let config = match sources.load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kvraftd: {e}");
            return EXIT_CONFIG;
        }
    };
    if print_config {
        print!("{}", config.to_toml());
        return 0;
    }
    let logging = match logging::init(&config) {
        Ok(logging) => logging,
        Err(e) => {
            eprintln!("kvraftd: {e}");
            return EXIT_CONFIG;
        }
    };
    let prometheus = match crate::metrics::install() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("kvraftd: {e}");
            return EXIT_FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(run(config, sources, &logging, prometheus));
    logging.shutdown();
    // Don't wait for blocking tasks: after a second signal the raft thread may
    // still be busy, and exiting must not wait for it.
    runtime.shutdown_background();
    code
}

async fn run(
    config: NodeConfig,
    sources: ConfigSources,
    logging: &logging::Logging,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
) -> i32 {
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kvraftd: cannot install signal handlers: {e}");
            return EXIT_FAILURE;
        }
    };
    let started = match crate::server::Listeners::bind(&config, Some(prometheus)).await {
        Ok(listeners) => crate::server::start(config.clone(), listeners).await,
        Err(e) => Err(e),
    };
    let node = match started {
        Ok(node) => node,
        Err(e) => {
            eprintln!("kvraftd: {e}");
            return if e.is_configuration() {
                EXIT_CONFIG
            } else {
                EXIT_FAILURE
            };
        }
    };
    // Ready once storage is recovered, listeners are bound and the raft loop
    // runs; not waiting for a leader (see the README's systemd section).
    systemd::notify_ready();
    let _watchdog = systemd::spawn_watchdog(node.raft_rounds.clone());
    let _status = systemd::spawn_status(node.handle.clone());

    loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Some(SIGHUP) => match sources.load() {
                    Ok(reloaded) => {
                        let ignored: Vec<String> = config
                            .changed_keys(&reloaded)
                            .into_iter()
                            .filter(|k| !crate::config::RELOADABLE_KEYS.contains(&k.as_str()))
                            .collect();
                        if !ignored.is_empty() {
                            warn!(
                                "SIGHUP: changed settings that only a restart applies were NOT applied: {}; \
                                 restart the node to use them (systemctl restart kvraft)",
                                ignored.join(", ")
                            );
                        }
                        logging.reload(&reloaded.log_filter);
                        for problem in node.security.reload(&reloaded) {
                            error!("SIGHUP: {problem}");
                        }
                    }
                    Err(e) => error!(error = %e, "SIGHUP: configuration not reloaded"),
                },
                Some(signal) => {
                    info!(signal = if signal == SIGTERM { "SIGTERM" } else { "SIGINT" }, "shutting down gracefully");
                    break;
                }
                None => break,
            },
            _ = node.stopped() => {
                if node.handle.status().removed {
                    warn!("this node was removed from the cluster; exiting");
                }
                break;
            }
        }
    }
    systemd::notify_stopping();
    let timeout = config.shutdown_timeout();
    let shutdown = node.shutdown(timeout);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            result = &mut shutdown => {
                return match result {
                    Ok(()) => {
                        info!("stopped");
                        0
                    }
                    // The data dir must change before a start can succeed.
                    Err(e @ StorageError::Mismatch(_)) => {
                        eprintln!("kvraftd: {e}");
                        EXIT_CONFIG
                    }
                    Err(e) => {
                        eprintln!("kvraftd: {e}");
                        EXIT_FAILURE
                    }
                };
            }
            signal = signals.next() => {
                if matches!(signal, Some(SIGTERM) | Some(SIGINT)) {
                    // Every durable write is atomic (raft-engine batches,
                    // renamed snapshot files), so stopping now loses nothing
                    // that was acknowledged.
                    warn!("second signal: exiting at once");
                    return EXIT_FAILURE;
                }
            }
            _ = tokio::time::sleep(timeout + Duration::from_secs(1)) => {
                error!(?timeout, "graceful shutdown took too long; exiting");
                return EXIT_FAILURE;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_a_flag_and_every_flag_but_two_is_a_key() {
        let command = Cli::command();
        let flags: Vec<&str> = command.get_arguments().map(|a| a.get_id().as_str()).collect();
        for key in crate::config::keys() {
            assert!(flags.contains(key), "config key {key} has no flag");
        }
        for flag in &flags {
            let known =
                crate::config::keys().contains(flag) || ["config", "print_config", "help", "version"].contains(flag);
            assert!(known, "flag {flag} is not a config key");
        }
    }

    #[test]
    fn the_help_shows_each_default_from_the_defaults_themselves() {
        let help = command().render_long_help().to_string();
        let defaults = NodeConfig::default();
        for (flag, shown) in [
            ("--tick-ms", defaults.tick_ms.to_string()),
            ("--election-ticks", defaults.election_ticks.to_string()),
            ("--client-addr", defaults.client_addr.clone()),
            ("--data-dir", defaults.data_dir.display().to_string()),
            (
                "--max-partial-frame-bytes",
                defaults.max_partial_frame_bytes.to_string(),
            ),
            ("--otlp-endpoint", "\"\"".to_string()),
        ] {
            let section = help
                .split(flag)
                .nth(1)
                .unwrap_or_else(|| panic!("{flag} is not in the help"));
            let section = section.split("\n\n").next().unwrap();
            assert!(section.contains(&format!("[default: {shown}]")), "{flag}: {section}");
        }
        // Flags without a value show no default.
        let join = help.split("--join").nth(1).unwrap().split("\n\n").next().unwrap();
        assert!(!join.contains("[default"), "{join}");
    }
}
