//! `kvraftd`: one kvraft node. With no flags it runs a single-node cluster on
//! 127.0.0.1 (clients 7379, peers 7380) with its data in ./kvraft-data.

use clap::Parser;
use kvraft::config::DaemonArgs;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "kvraftd",
    version,
    about = "A kvraft node: a replicated key-value store on Raft"
)]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `kvraft=debug,raft=info`.
    #[arg(long, env = "KVRAFT_LOG", default_value = "info")]
    log: String,
}

fn main() {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!("kvraftd: --log {:?}: {e}", cli.log);
        std::process::exit(2);
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let config = cli.daemon.into_config().unwrap_or_else(|e| {
        eprintln!("kvraftd: {e}");
        std::process::exit(2);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async move {
        let node = match kvraft::server::start(config).await {
            Ok(node) => node,
            Err(e) => {
                eprintln!("kvraftd: {e}");
                return 1;
            }
        };
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = node.stopped() => {
                if node.handle.status().removed {
                    tracing::warn!("this node was removed from the cluster; exiting");
                }
            }
        }
        match node.shutdown().await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("kvraftd: {e}");
                1
            }
        }
    });
    std::process::exit(code);
}
