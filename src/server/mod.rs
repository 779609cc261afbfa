//! The server: binds the client and peer listeners, starts the raft loop on
//! its own thread, and stops everything on request.
//!
//! - [`client`]: client connections (a task per connection, many requests in flight).
//! - [`requests`]: validates a request and routes it to the node.
//! - [`access`]: client identities and roles.
//! - [`peer`]: inbound peer connections feeding the raft loop (the checks
//!   they pass are in `crate::peer_guard`).
//! - [`http`]: `/metrics`, `/health` and `/ready`.
//! - [`accept`]: accepting with backoff, for every listener.

pub mod accept;
pub mod access;
mod backup;
pub mod client;
pub mod http;
pub mod peer;
pub mod requests;
pub mod validate;
mod watches;

pub use watches::DEFAULT_PROGRESS_INTERVAL;
mod wire_errors;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::config::NodeConfig;
use crate::node::startup::prepare;
use crate::node::transport::TransportFactory;
use crate::node::NodeHandle;
use crate::storage::StorageError;
use crate::tls::server::{ClientPortTls, PeerTls};
use access::AccessControl;
use peer::outbound::TcpTransport;

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
    /// A connection with nothing in flight is closed after this long.
    pub idle_timeout: Duration,
    /// A started frame (or TLS handshake) must complete within this.
    pub read_timeout: Duration,
    /// Memory partly received frames may hold across all connections.
    pub max_partial_frame_bytes: usize,
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
    /// Certificates and roles, reloadable without a restart.
    pub security: Security,
    stop_listeners: watch::Sender<bool>,
    http: Option<tokio::task::JoinHandle<()>>,
    raft_thread: std::thread::JoinHandle<Result<(), StorageError>>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The settings don't fit (checked here, before the node is built).
    #[error("{0}")]
    Config(String),
    /// A listener could not be bound, or a thread not started.
    #[error("{0}")]
    Bind(String),
    /// The node refused its data dir or settings, or storage failed.
    #[error(transparent)]
    Node(#[from] crate::node::startup::StartError),
}

impl StartError {
    /// True when the settings or the data dir must change before another
    /// start can succeed (the daemon exits 78 for these).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            StartError::Config(_) | StartError::Node(crate::node::startup::StartError::Config(_))
        )
    }
}

/// The sockets a node serves on, bound by the caller: the daemon binds the
/// configured addresses ([`Listeners::bind`]); a test binds `127.0.0.1:0`.
pub struct Listeners {
    /// Clients.
    pub client: TcpListener,
    /// Peers.
    pub peer: TcpListener,
    /// `/metrics`, `/health` and `/ready`, if served.
    pub metrics: Option<MetricsEndpoint>,
}

/// The metrics listener and the recorder whose metrics it renders.
pub struct MetricsEndpoint {
    /// Where scrapers connect.
    pub listener: TcpListener,
    /// The installed Prometheus recorder.
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
}

impl Listeners {
    /// Binds `client_addr`, `peer_addr` and (when set, with `prometheus`)
    /// `metrics_addr`. Every bind error names the setting to change.
    pub async fn bind(
        config: &NodeConfig,
        prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Result<Self, StartError> {
        let client = bind(&config.client_addr, "--client-addr").await?;
        let peer = bind(&config.peer_addr, "--peer-addr").await?;
        let metrics = match prometheus.filter(|_| !config.metrics_addr.is_empty()) {
            Some(prometheus) => {
                let listener = TcpListener::bind(&config.metrics_addr).await.map_err(|e| {
                    StartError::Bind(format!(
                        "metrics_addr {}: cannot listen ({e}); set another --metrics-addr, or \"\" to turn it off",
                        config.metrics_addr
                    ))
                })?;
                Some(MetricsEndpoint { listener, prometheus })
            }
            None => None,
        };
        Ok(Listeners { client, peer, metrics })
    }
}

/// Why [`run`] ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The node did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The raft loop stopped on a storage error.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Starts a node on `listeners` and runs it until `shutdown` resolves (or
/// the node stops by itself, e.g. removed from the cluster), then stops it
/// gracefully within `shutdown_timeout_ms`.
pub async fn run(
    config: NodeConfig,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let timeout = config.shutdown_timeout();
    let node = start(config, listeners).await?;
    tokio::select! {
        () = shutdown => {}
        () = node.stopped() => {}
    }
    Ok(node.shutdown(timeout).await?)
}

/// Recovers or bootstraps the node and starts serving on `listeners`.
pub async fn start(config: NodeConfig, listeners: Listeners) -> Result<RunningNode, StartError> {
    config
        .validate()
        .map_err(|e| StartError::Config(format!("{} {}", e.key, e.message)))?;
    let Listeners {
        client: client_listener,
        peer: peer_listener,
        metrics,
    } = listeners;
    let client_addr = client_listener
        .local_addr()
        .map_err(|e| StartError::Bind(e.to_string()))?;
    let peer_addr = peer_listener
        .local_addr()
        .map_err(|e| StartError::Bind(e.to_string()))?;
    let advertise_client = advertised(&config.advertise_client_addr, client_addr, "--advertise-client-addr")?;
    let advertise_peer = advertised(&config.advertise_peer_addr, peer_addr, "--advertise-peer-addr")?;

    let security = Security::load(&config)?;
    warn_if_peers_are_unauthenticated(&config, peer_addr);

    let runtime = tokio::runtime::Handle::current();
    let config_for_loop = config.clone();
    let peer_tls = security.peer_tls.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let transport: TransportFactory =
            Box::new(move |context| Box::new(TcpTransport::new(context, runtime, peer_tls)));
        prepare(&config_for_loop, advertise_client, advertise_peer, transport)
    })
    .await
    .expect("startup task panicked")?;

    let handle = prepared.handle.clone();
    let raft_thread = crate::node::spawn(prepared.raft_loop, config.id, prepared.lock)
        .map_err(|e| StartError::Bind(format!("could not start the raft thread: {e}")))?;

    let (stop_listeners, stop_rx) = watch::channel(false);
    let limits = Limits {
        max_frame_size: config.max_frame_size,
        max_key_size: config.max_key_size,
        max_value_size: config.max_value_size,
        max_connections: config.max_connections,
        idle_timeout: config.client_idle_timeout(),
        read_timeout: config.client_read_timeout(),
        max_partial_frame_bytes: config.max_partial_frame_bytes,
    };
    let client_port = client::ClientPort {
        handle: handle.clone(),
        limits,
        tls: security.client_tls.clone(),
        access: security.access.clone(),
    };
    tokio::spawn(client::serve(client_listener, client_port, stop_rx.clone()));
    tokio::spawn(peer::serve(
        peer_listener,
        peer::PeerContext {
            node_id: config.id,
            inbox: prepared.inbox,
            handle: handle.clone(),
            tls: security.peer_tls.clone(),
        },
        stop_rx,
    ));
    let http = metrics.map(|endpoint| {
        if let Ok(addr) = endpoint.listener.local_addr() {
            info!(%addr, "serving /metrics, /health and /ready");
        }
        let endpoints = http::Endpoints {
            prometheus: endpoint.prometheus,
            handle: handle.clone(),
            raft_rounds: prepared.rounds.clone(),
        };
        tokio::spawn(http::serve(endpoint.listener, endpoints, security.metrics_tls.clone()))
    });
    info!(
        node = config.id,
        %client_addr,
        %peer_addr,
        client_tls = security.client_tls.is_some(),
        peer_tls = security.peer_tls.is_some(),
        data_dir = %config.data_dir.display(),
        "kvraftd started"
    );
    Ok(RunningNode {
        client_addr,
        peer_addr,
        handle,
        raft_rounds: prepared.rounds,
        security,
        stop_listeners,
        http,
        raft_thread,
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
        if let Some(http) = &self.http {
            http.abort();
        }
        let deadline = std::time::Instant::now() + timeout;
        self.handle.request_shutdown(deadline);
        let thread = self.raft_thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join task panicked")
            .unwrap_or_else(|_| Err(StorageError::Corrupt("the raft loop panicked".into())))
    }
}

/// A node's TLS configurations and roles, all reloadable (SIGHUP).
#[derive(Clone)]
pub struct Security {
    /// The client port's TLS, if on.
    pub client_tls: Option<Arc<ClientPortTls>>,
    /// The peer port's TLS, if on.
    pub peer_tls: Option<Arc<PeerTls>>,
    /// The metrics endpoint's TLS (`metrics_tls`), if on.
    pub metrics_tls: Option<Arc<ClientPortTls>>,
    /// Client roles.
    pub access: AccessControl,
}

impl Security {
    /// Loads every certificate the configuration names; any problem stops
    /// the start with the setting, the file and what to do.
    pub fn load(config: &NodeConfig) -> Result<Security, StartError> {
        crate::tls::install_crypto_provider();
        let tls_error = |e: crate::tls::TlsError| StartError::Config(e.to_string());
        let client_tls = match config.client_tls_files() {
            Some(files) => Some(Arc::new(ClientPortTls::load(files).map_err(tls_error)?)),
            None => None,
        };
        let peer_tls = match config.peer_tls_files() {
            Some(files) => Some(Arc::new(PeerTls::load(files, config.id).map_err(tls_error)?)),
            None => None,
        };
        let metrics_tls = match config.client_tls_files().filter(|_| config.metrics_tls) {
            Some(files) => {
                // The client port's certificate, without asking for client
                // certificates: scrapers only need the CA.
                let files = crate::tls::server::ClientPortFiles {
                    trusted_ca: None,
                    client_cert_auth: false,
                    ..files
                };
                Some(Arc::new(ClientPortTls::load(files).map_err(tls_error)?))
            }
            None => None,
        };
        let access = AccessControl::new(config.client_roles.as_deref()).map_err(StartError::Config)?;
        Ok(Security {
            client_tls,
            peer_tls,
            metrics_tls,
            access,
        })
    }

    /// Re-reads the certificate files (paths are fixed at start) and puts the
    /// reloaded configuration's roles in force. Every part that fails is
    /// reported and keeps what it had.
    pub fn reload(&self, config: &NodeConfig) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(tls) = &self.client_tls {
            if let Err(e) = tls.reload() {
                errors.push(format!(
                    "client TLS not reloaded, the previous certificate stays in use: {e}"
                ));
            }
        }
        if let Some(tls) = &self.peer_tls {
            if let Err(e) = tls.reload() {
                errors.push(format!(
                    "peer TLS not reloaded, the previous certificate stays in use: {e}"
                ));
            }
        }
        if let Some(tls) = &self.metrics_tls {
            if let Err(e) = tls.reload() {
                errors.push(format!(
                    "metrics TLS not reloaded, the previous certificate stays in use: {e}"
                ));
            }
        }
        if config.client_roles.is_some() && self.client_tls.is_none() {
            errors.push("client_roles needs TLS on the client port, which can't be turned on without a restart".into());
        } else if let Err(e) = self.access.replace(config.client_roles.as_deref()) {
            errors.push(format!("client_roles not reloaded: {e}"));
        }
        errors
    }
}

/// Without peer TLS, anyone who can send from a member's address can speak
/// for it: say so when the peer port faces more than this machine.
fn warn_if_peers_are_unauthenticated(config: &NodeConfig, bound: SocketAddr) {
    if config.peer_tls_files().is_none() && !bound.ip().is_loopback() {
        tracing::warn!(
            peer_addr = %bound,
            "peer TLS is off on a non-loopback address: peers are recognised only by their source address, \
             so anyone who can send from a member's address can speak for it. Set peer_cert_file, peer_key_file \
             and peer_trusted_ca_file (see the README, \"Securing a cluster\")"
        );
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
