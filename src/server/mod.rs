//! The server: binds the client and peer listeners, starts the raft loop on
//! its own thread, and stops everything on request.
//!
//! - [`client`]: client connections (a task per connection, many requests in flight).
//! - [`requests`]: validates a request and routes it to the node.
//! - [`peer`]: inbound peer connections feeding the raft loop.
//! - [`http`]: `/metrics`, `/health` and `/ready`.

pub mod client;
pub mod http;
pub mod peer;
pub mod requests;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::config::NodeConfig;
use crate::node::startup::{prepare, StartError};
use crate::node::{Inbox, NodeHandle};
use crate::storage::{DataDirLock, StorageError};

/// Request size limits enforced at the edge.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame.
    pub max_frame_size: usize,
    /// Largest key.
    pub max_key_size: usize,
    /// Largest value.
    pub max_value_size: usize,
    /// Client connections served at once.
    pub max_connections: usize,
}

/// A started node.
pub struct RunningNode {
    /// Where clients connect (the bound address).
    pub client_addr: SocketAddr,
    /// Where peers connect (the bound address).
    pub peer_addr: SocketAddr,
    /// Talks to the raft loop.
    pub handle: NodeHandle,
    /// Counts raft loop rounds: a watchdog pings only while it moves.
    pub raft_rounds: Arc<AtomicU64>,
    stop_listeners: watch::Sender<bool>,
    raft_thread: std::thread::JoinHandle<Result<(), StorageError>>,
    _lock: DataDirLock,
}

/// Binds the listeners, recovers or bootstraps the node and starts it.
pub async fn start(config: NodeConfig) -> Result<RunningNode, StartError> {
    config
        .validate()
        .map_err(|e| StartError::Config(format!("{} {}", e.key, e.message)))?;
    let client_listener = bind(&config.client_addr, "--client-addr").await?;
    let peer_listener = bind(&config.peer_addr, "--peer-addr").await?;
    let client_addr = client_listener
        .local_addr()
        .map_err(|e| StartError::Bind(e.to_string()))?;
    let peer_addr = peer_listener
        .local_addr()
        .map_err(|e| StartError::Bind(e.to_string()))?;
    let advertise_client = advertised(&config.advertise_client_addr, client_addr, "--advertise-client-addr")?;
    let advertise_peer = advertised(&config.advertise_peer_addr, peer_addr, "--advertise-peer-addr")?;

    let runtime = tokio::runtime::Handle::current();
    let config_for_loop = config.clone();
    let prepared =
        tokio::task::spawn_blocking(move || prepare(&config_for_loop, advertise_client, advertise_peer, runtime))
            .await
            .expect("startup task panicked")?;

    let handle = prepared.handle.clone();
    let raft_loop = prepared.raft_loop;
    let node_id = config.id;
    let raft_thread = std::thread::Builder::new()
        .name("raft-loop".into())
        .spawn(move || {
            let span = tracing::info_span!("raft", node = node_id);
            let _guard = span.enter();
            raft_loop.run()
        })
        .map_err(|e| StartError::Bind(format!("could not start the raft thread: {e}")))?;

    let (stop_listeners, stop_rx) = watch::channel(false);
    let limits = Limits {
        max_frame_size: config.max_frame_size,
        max_key_size: config.max_key_size,
        max_value_size: config.max_value_size,
        max_connections: config.max_connections,
    };
    tokio::spawn(client::serve(client_listener, handle.clone(), limits, stop_rx.clone()));
    tokio::spawn(peer::serve(
        peer_listener,
        peer::PeerContext {
            node_id: config.id,
            inbox: prepared.inbox,
            handle: handle.clone(),
            cluster_id: Arc::clone(&prepared.cluster_id),
        },
        stop_rx,
    ));
    info!(node = config.id, %client_addr, %peer_addr, data_dir = %config.data_dir.display(), "kvraftd started");
    Ok(RunningNode {
        client_addr,
        peer_addr,
        handle,
        raft_rounds: prepared.rounds,
        stop_listeners,
        raft_thread,
        _lock: prepared.lock,
    })
}

impl RunningNode {
    /// Resolves once the raft loop has stopped on its own (removed from the
    /// cluster, or a fatal storage error).
    pub async fn stopped(&self) {
        let mut status = self.handle.watch_status();
        let _ = status.wait_for(|s| s.stopped || s.removed).await;
    }

    /// Stops accepting connections, then shuts the raft loop down gracefully
    /// (leadership handed over, in-flight requests drained, a snapshot at the
    /// applied index) within `timeout`, and waits for it.
    pub async fn shutdown(self, timeout: Duration) -> Result<(), StorageError> {
        let _ = self.stop_listeners.send(true);
        let deadline = std::time::Instant::now() + timeout;
        let _ = self.handle.send(Inbox::Shutdown { deadline });
        let thread = self.raft_thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join task panicked")
            .unwrap_or_else(|_| Err(StorageError::Corrupt("the raft loop panicked".into())))
    }
}

async fn bind(addr: &str, flag: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|e| {
        StartError::Bind(format!(
            "{flag} {addr}: cannot listen ({e}); is another kvraftd (or another program) using it?"
        ))
    })
}

/// The address to announce: the flag if given, else the bound address, which
/// must then be one others can dial.
fn advertised(flag_value: &Option<String>, bound: SocketAddr, flag: &str) -> Result<String, StartError> {
    match flag_value {
        Some(addr) => Ok(addr.clone()),
        None if bound.ip().is_unspecified() => Err(StartError::Config(format!(
            "listening on {bound} needs {flag}: the address other nodes and clients should dial"
        ))),
        None => Ok(bound.to_string()),
    }
}
