//! The daemon's configuration, layered lowest to highest:
//! built-in defaults < TOML file (`--config PATH`, else `/etc/kvraft/kvraft.toml`
//! if it exists) < `KVRAFT_*` environment variables < command-line flags.
//! Keys are snake_case and match the flags (`client_addr` = `--client-addr` =
//! `KVRAFT_CLIENT_ADDR`). Unknown keys in the file are an error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgAction, Args};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::address::{check_host_port, is_wildcard, parse_initial_cluster};

/// The config file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/kvraft/kvraft.toml";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything a node needs to start. Field names are the config keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (non-zero, unique in the cluster, never reused).
    pub id: u64,
    /// Where the raft log, snapshots and identity live.
    pub data_dir: PathBuf,
    /// Where clients connect (`HOST:PORT`; port 0 picks one).
    pub client_addr: String,
    /// Where peers connect.
    pub peer_addr: String,
    /// The client address other nodes and clients use; defaults to `client_addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_client_addr: Option<String>,
    /// The peer address other nodes use; defaults to `peer_addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_peer_addr: Option<String>,
    /// `ID=PEER_ADDR,...`: the initial members of a new cluster. Ignored once
    /// the data dir is initialised. Default: this node alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_cluster: Option<String>,
    /// Start empty and wait to be added with `kvraft add-node`.
    pub join: bool,
    /// Make the state store durable and compact the log at least every this
    /// many applied entries (and every five seconds while entries are applied).
    pub snapshot_threshold: u64,
    /// Entries kept in the log behind the store's durable applied index for
    /// slow followers (capped at half the snapshot threshold); a follower
    /// further behind gets a streamed snapshot.
    pub snapshot_catchup_entries: u64,
    /// The state store's page cache, in MiB: reads of keys outside it go to
    /// the OS page cache. The node's memory is about this plus the raft log
    /// tail and connection buffers.
    pub store_cache_mb: u64,
    /// Records that single-key gets read from the store, kept for the next
    /// get of the same key, in MiB (0: none kept).
    pub read_cache_mb: u64,
    /// Change history kept for watches, in revisions behind the applied
    /// index; a watch from an older revision is refused (compacted).
    pub history_retention_revisions: u64,
    /// Change history kept for watches, in MiB of records on disk (the
    /// oldest revisions go first past it).
    pub history_retention_mb: u64,
    /// One raft tick, in milliseconds.
    pub tick_ms: u64,
    /// Election timeout in ticks (randomised by raft between this and twice it).
    pub election_ticks: usize,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: usize,
    /// Largest client frame accepted.
    pub max_frame_size: usize,
    /// Largest key accepted.
    pub max_key_size: usize,
    /// Largest value accepted.
    pub max_value_size: usize,
    /// Client connections served at once; more wait in the accept queue.
    pub max_connections: usize,
    /// Where `/metrics`, `/health` and `/ready` are served; empty turns it off.
    pub metrics_addr: String,
    /// How long a proposal or read may wait inside the node, in milliseconds.
    pub request_timeout_ms: u64,
    /// How long a graceful shutdown may take before the node exits anyway.
    pub shutdown_timeout_ms: u64,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `kvraft=debug,raft=warn`.
    pub log_filter: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// OTLP/HTTP collector base URL (e.g. `http://127.0.0.1:4318`) for request
    /// traces; empty turns tracing export off.
    pub otlp_endpoint: String,
    /// A client connection with nothing in flight is closed after this long
    /// without a request, in milliseconds.
    pub client_idle_timeout_ms: u64,
    /// A started client frame (and a TLS handshake) must complete, and a
    /// response be taken by the client, within this long, in milliseconds.
    pub client_read_timeout_ms: u64,
    /// Memory that partly received client frames may hold beyond their first
    /// 8 KiB, across every connection; a frame that needs more waits.
    pub max_partial_frame_bytes: usize,
    /// PEM certificate for the client port; with `key_file`, turns TLS on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// PEM CA bundle that signs client certificates (with `client_cert_auth`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Require every client to present a certificate signed by `trusted_ca_file`.
    pub client_cert_auth: bool,
    /// `NAME=ROLE,...`: client identities (certificate common names) and
    /// their roles (`read`, `write`, `admin`). When set, unlisted identities
    /// are refused. Needs `client_cert_auth`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_roles: Option<String>,
    /// PEM certificate for the peer port, common name `kvraft-node-<id>`; with
    /// the key and CA, turns mutual TLS on between peers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_cert_file: Option<PathBuf>,
    /// PEM private key of `peer_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_key_file: Option<PathBuf>,
    /// PEM CA bundle that signs every node's peer certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Serve `/metrics`, `/health` and `/ready` over HTTPS with `cert_file`.
    pub metrics_tls: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 1,
            data_dir: PathBuf::from("kvraft-data"),
            client_addr: "127.0.0.1:7379".into(),
            peer_addr: "127.0.0.1:7380".into(),
            advertise_client_addr: None,
            advertise_peer_addr: None,
            initial_cluster: None,
            join: false,
            snapshot_threshold: 100_000,
            snapshot_catchup_entries: 5_000,
            store_cache_mb: 16,
            read_cache_mb: (crate::storage::state_store::DEFAULT_READ_CACHE_BYTES >> 20) as u64,
            history_retention_revisions: 1_000_000,
            history_retention_mb: 256,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 1,
            max_frame_size: crate::codec::DEFAULT_MAX_FRAME,
            max_key_size: 8 * 1024,
            max_value_size: 1024 * 1024,
            max_connections: 10_000,
            metrics_addr: "127.0.0.1:9379".into(),
            request_timeout_ms: 5_000,
            shutdown_timeout_ms: 10_000,
            log_filter: "info".into(),
            log_format: LogFormat::Text,
            otlp_endpoint: String::new(),
            client_idle_timeout_ms: 60_000,
            client_read_timeout_ms: 10_000,
            max_partial_frame_bytes: 256 * 1024 * 1024,
            cert_file: None,
            key_file: None,
            trusted_ca_file: None,
            client_cert_auth: false,
            client_roles: None,
            peer_cert_file: None,
            peer_key_file: None,
            peer_trusted_ca_file: None,
            metrics_tls: false,
        }
    }
}

/// A configuration value that is not allowed, by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The offending key.
    pub key: &'static str,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn invalid(key: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        key,
        message: message.into(),
    }
}

impl NodeConfig {
    /// One raft tick.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.tick_ms)
    }

    /// The shortest time to live a lease is granted, in seconds: the longest
    /// election timeout (twice `election_ticks`), rounded up, so that a
    /// leader change alone can't end a lease (2 s with the defaults).
    pub fn min_lease_ttl(&self) -> u64 {
        (2 * self.election_ticks as u64 * self.tick_ms).div_ceil(1000).max(1)
    }

    /// How long a request may wait inside the node.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// How long a graceful shutdown may take.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// How long a client connection may sit idle.
    pub fn client_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.client_idle_timeout_ms)
    }

    /// How long a started client frame or TLS handshake may take.
    pub fn client_read_timeout(&self) -> Duration {
        Duration::from_millis(self.client_read_timeout_ms)
    }

    /// The client port's TLS files, if TLS is on there.
    pub fn client_tls_files(&self) -> Option<crate::tls::server::ClientPortFiles> {
        Some(crate::tls::server::ClientPortFiles {
            cert: self.cert_file.clone()?,
            key: self.key_file.clone()?,
            trusted_ca: self.trusted_ca_file.clone(),
            client_cert_auth: self.client_cert_auth,
        })
    }

    /// The peer port's TLS files, if TLS is on there.
    pub fn peer_tls_files(&self) -> Option<crate::tls::server::PeerFiles> {
        Some(crate::tls::server::PeerFiles {
            cert: self.peer_cert_file.clone()?,
            key: self.peer_key_file.clone()?,
            trusted_ca: self.peer_trusted_ca_file.clone()?,
        })
    }

    /// How much change history the store keeps.
    pub fn history_retention(&self) -> crate::storage::history::Retention {
        crate::storage::history::Retention {
            revisions: self.history_retention_revisions,
            bytes: self.history_retention_mb.saturating_mul(1 << 20),
        }
    }

    /// The state store's cache size in bytes.
    pub fn store_cache_bytes(&self) -> usize {
        (self.store_cache_mb as usize).saturating_mul(1 << 20)
    }

    /// The read cache's size in bytes.
    pub fn read_cache_bytes(&self) -> usize {
        (self.read_cache_mb as usize).saturating_mul(1 << 20)
    }

    /// The log entries kept behind the store's durable applied index.
    pub fn catchup_entries(&self) -> u64 {
        self.snapshot_catchup_entries.min(self.snapshot_threshold / 2)
    }

    /// Checks values that types alone can't constrain.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.id == 0 {
            return Err(invalid("id", "must be a positive integer (0 is reserved by raft)"));
        }
        if self.snapshot_threshold == 0 {
            return Err(invalid("snapshot_threshold", "must be at least 1"));
        }
        if self.history_retention_revisions == 0 {
            return Err(invalid("history_retention_revisions", "must be at least 1"));
        }
        if self.history_retention_mb == 0 {
            return Err(invalid("history_retention_mb", "must be at least 1 (MiB)"));
        }
        if self.store_cache_mb == 0 {
            return Err(invalid("store_cache_mb", "must be at least 1 (MiB)"));
        }
        if self.heartbeat_ticks == 0 {
            return Err(invalid("heartbeat_ticks", "must be at least 1"));
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return Err(invalid(
                "election_ticks",
                format!(
                    "({}) must be greater than heartbeat_ticks ({})",
                    self.election_ticks, self.heartbeat_ticks
                ),
            ));
        }
        if self.tick_ms == 0 {
            return Err(invalid("tick_ms", "must be at least 1"));
        }
        for (key, value) in [
            ("request_timeout_ms", self.request_timeout_ms),
            ("shutdown_timeout_ms", self.shutdown_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.max_key_size == 0 {
            return Err(invalid("max_key_size", "must be at least 1"));
        }
        if self.max_value_size == 0 {
            return Err(invalid("max_value_size", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        // A key and its value travel in one snapshot frame, next to up to a
        // chunk of other records.
        let record_room =
            crate::storage::snapshot_stream::MAX_FRAME - crate::storage::snapshot_stream::CHUNK_BYTES - 4096;
        if self.max_key_size + self.max_value_size > record_room {
            return Err(invalid(
                "max_value_size",
                format!(
                    "max_key_size + max_value_size ({}) must be at most {record_room} bytes: a key and its value must fit one snapshot frame",
                    self.max_key_size + self.max_value_size
                ),
            ));
        }
        if self.max_key_size + self.max_value_size + 64 > self.max_frame_size {
            return Err(invalid(
                "max_frame_size",
                format!(
                    "({}) must exceed max_key_size + max_value_size + 64 ({})",
                    self.max_frame_size,
                    self.max_key_size + self.max_value_size + 64
                ),
            ));
        }
        if !self.metrics_addr.is_empty() {
            check_host_port(&self.metrics_addr)
                .map_err(|e| invalid("metrics_addr", format!("{:?}: {e}", self.metrics_addr)))?;
        }
        for (key, addr) in [("client_addr", &self.client_addr), ("peer_addr", &self.peer_addr)] {
            check_host_port(addr).map_err(|e| invalid(key, format!("{addr:?}: {e}")))?;
        }
        for (key, addr) in [
            ("advertise_client_addr", &self.advertise_client_addr),
            ("advertise_peer_addr", &self.advertise_peer_addr),
        ] {
            if let Some(addr) = addr {
                check_host_port(addr).map_err(|e| invalid(key, format!("{addr:?}: {e}")))?;
            }
        }
        self.validate_advertised()?;
        if let Some(spec) = &self.initial_cluster {
            let members = parse_initial_cluster(spec).map_err(|e| invalid("initial_cluster", e))?;
            if self.join {
                return Err(invalid(
                    "join",
                    "join and initial_cluster exclude each other: a joining node learns the members from the cluster",
                ));
            }
            self.validate_own_member(&members)?;
        }
        if !self.otlp_endpoint.is_empty() && !self.otlp_endpoint.starts_with("http://") {
            return Err(invalid(
                "otlp_endpoint",
                format!(
                    "{:?}: expected an http:// URL such as http://127.0.0.1:4318",
                    self.otlp_endpoint
                ),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_filter) {
            return Err(invalid("log_filter", format!("{:?}: {e}", self.log_filter)));
        }
        for (key, value) in [
            ("client_idle_timeout_ms", self.client_idle_timeout_ms),
            ("client_read_timeout_ms", self.client_read_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.max_partial_frame_bytes < self.max_frame_size {
            return Err(invalid(
                "max_partial_frame_bytes",
                format!(
                    "({}) must be at least max_frame_size ({}), or a largest frame could never arrive",
                    self.max_partial_frame_bytes, self.max_frame_size
                ),
            ));
        }
        self.validate_tls()
    }

    /// A listener on every interface (0.0.0.0, [::]) has no address others
    /// could dial: the advertised one must be given.
    fn validate_advertised(&self) -> Result<(), Invalid> {
        for (key, addr, advertised, advertise_key) in [
            (
                "client_addr",
                &self.client_addr,
                &self.advertise_client_addr,
                "advertise_client_addr",
            ),
            (
                "peer_addr",
                &self.peer_addr,
                &self.advertise_peer_addr,
                "advertise_peer_addr",
            ),
        ] {
            if advertised.is_none() && is_wildcard(addr) {
                return Err(invalid(
                    key,
                    format!(
                        "{addr:?} listens on every interface, so it needs {advertise_key}: the address other nodes and clients should dial"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The initial members must include this node, at the peer address it
    /// advertises, or the cluster it bootstraps could never reach it. Checked
    /// here whenever the address is known before binding (not for port 0 or
    /// a host name, which startup checks against the bound address).
    fn validate_own_member(&self, members: &[(u64, String)]) -> Result<(), Invalid> {
        let Some((_, listed)) = members.iter().find(|(id, _)| *id == self.id) else {
            return Err(invalid(
                "initial_cluster",
                format!(
                    "does not list this node (id {}); list every initial member, this one included",
                    self.id
                ),
            ));
        };
        let advertised = match &self.advertise_peer_addr {
            Some(addr) => Some(addr.clone()),
            None => self
                .peer_addr
                .parse::<std::net::SocketAddr>()
                .ok()
                .filter(|addr| addr.port() != 0)
                .map(|addr| addr.to_string()),
        };
        match advertised {
            Some(advertised) if *listed != advertised => Err(invalid(
                "initial_cluster",
                format!(
                    "gives node {} the peer address {listed}, but this node advertises {advertised}; \
                     make them agree (see peer_addr / advertise_peer_addr)",
                    self.id
                ),
            )),
            _ => Ok(()),
        }
    }

    /// TLS settings come in groups; say which part of a group is missing.
    fn validate_tls(&self) -> Result<(), Invalid> {
        // Errors name the key that was set, so the source shown is where it
        // came from.
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "cert_file",
                    "needs key_file too: the certificate's private key",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "key_file",
                    "needs cert_file too: the client port's certificate",
                ))
            }
            _ => {}
        }
        if self.trusted_ca_file.is_some() && self.cert_file.is_none() {
            return Err(invalid(
                "trusted_ca_file",
                "needs cert_file and key_file: client certificates are checked only over TLS",
            ));
        }
        if self.client_cert_auth && self.trusted_ca_file.is_none() {
            return Err(invalid(
                "client_cert_auth",
                "needs trusted_ca_file (the CA that signs client certificates) and cert_file/key_file",
            ));
        }
        if let Some(roles) = &self.client_roles {
            crate::server::access::parse_roles(roles).map_err(|e| invalid("client_roles", e))?;
            if !self.client_cert_auth {
                return Err(invalid(
                    "client_roles",
                    "needs client_cert_auth: identities are the common names of verified client certificates",
                ));
            }
        }
        let peer = [
            ("peer_cert_file", self.peer_cert_file.is_some()),
            ("peer_key_file", self.peer_key_file.is_some()),
            ("peer_trusted_ca_file", self.peer_trusted_ca_file.is_some()),
        ];
        if let (Some((given, _)), Some((missing, _))) =
            (peer.iter().find(|(_, set)| *set), peer.iter().find(|(_, set)| !*set))
        {
            return Err(invalid(
                given,
                format!(
                    "needs {missing} too: peer TLS is mutual, so peer_cert_file, peer_key_file and peer_trusted_ca_file go together"
                ),
            ));
        }
        if self.metrics_tls && self.cert_file.is_none() {
            return Err(invalid(
                "metrics_tls",
                "needs cert_file and key_file: they serve the metrics endpoint too",
            ));
        }
        Ok(())
    }

    /// An empty file or role setting is unset, so a layer above can turn
    /// TLS off (`KVRAFT_CERT_FILE=` in an environment that had it on).
    fn empty_means_unset(&mut self) {
        for path in [
            &mut self.cert_file,
            &mut self.key_file,
            &mut self.trusted_ca_file,
            &mut self.peer_cert_file,
            &mut self.peer_key_file,
            &mut self.peer_trusted_ca_file,
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *path = None;
            }
        }
        if self.client_roles.as_deref().is_some_and(|r| r.trim().is_empty()) {
            self.client_roles = None;
        }
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the configuration always serialises")
    }

    /// The keys whose values differ between `self` and `other`, in order.
    pub fn changed_keys(&self, other: &NodeConfig) -> Vec<String> {
        let table = |c: &NodeConfig| -> toml::Table { c.to_toml().parse().expect("our own TOML parses") };
        let (a, b) = (table(self), table(other));
        let mut keys: Vec<String> = a
            .keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

/// The keys a SIGHUP puts in force (certificate and key *files* are re-read
/// too, but their paths are fixed at start). Any other changed key needs a
/// restart, and the reload says which.
pub const RELOADABLE_KEYS: &[&str] = &["log_filter", "client_roles"];

/// The flags of `kvraftd`. Every setting flag is optional: an absent flag
/// leaves the value from the lower layers.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct DaemonArgs {
    /// Read this TOML config file (default: /etc/kvraft/kvraft.toml if it exists).
    #[arg(long, value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// This node's id: a positive integer, unique in the cluster.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Directory for the raft log, snapshots and identity, created 0700.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on for clients.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    /// Address to listen on for peers.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_addr: Option<String>,
    /// Client address to announce, if it differs from --client-addr.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_client_addr: Option<String>,
    /// Peer address to announce, if it differs from --peer-addr.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_peer_addr: Option<String>,
    /// Initial members of a new cluster, `ID=HOST:PEERPORT,...`, the same on every
    /// initial member. Default: this node alone. Ignored once the data dir exists.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_cluster: Option<String>,
    /// Start empty and wait to be added by `kvraft add-node`.
    #[arg(long, action = ArgAction::SetTrue)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// Make the state store durable and compact the log at least every this many applied entries.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_threshold: Option<u64>,
    /// Log entries kept behind the store's durable index for slow followers, at most half the threshold.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_catchup_entries: Option<u64>,
    /// The state store's page cache in MiB (the node's memory is about this plus buffers).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_cache_mb: Option<u64>,
    /// Records gets read from the store, kept for the next get, in MiB (0: none kept).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_cache_mb: Option<u64>,
    /// Change history kept for watches, in revisions behind the applied index.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_retention_revisions: Option<u64>,
    /// Change history kept for watches, in MiB on disk.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_retention_mb: Option<u64>,
    /// Raft tick length in milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tick_ms: Option<u64>,
    /// Election timeout in ticks; the same on every node.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub election_ticks: Option<usize>,
    /// Heartbeat interval in ticks; the same on every node.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_ticks: Option<usize>,
    /// Largest client frame in bytes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_size: Option<usize>,
    /// Largest key in bytes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_key_size: Option<usize>,
    /// Largest value in bytes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_value_size: Option<usize>,
    /// Client connections served at once.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Where /metrics, /health and /ready are served; "" turns it off.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    /// How long a request may wait inside the node, in milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout_ms: Option<u64>,
    /// How long a graceful shutdown may take, in milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_ms: Option<u64>,
    /// Log filter, e.g. `info` or `kvraft=debug,raft=warn`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_filter: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// OTLP/HTTP collector URL for request traces, e.g. http://127.0.0.1:4318; "" turns tracing export off.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Close a client connection idle (nothing in flight) this long, in milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_idle_timeout_ms: Option<u64>,
    /// A started client frame or TLS handshake must complete within this, in milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_read_timeout_ms: Option<u64>,
    /// Memory partly received client frames may hold in all, in bytes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_partial_frame_bytes: Option<usize>,
    /// PEM certificate for the client port (turns TLS on with --key-file).
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// PEM CA that signs client certificates (with --client-cert-auth).
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Require client certificates signed by --trusted-ca-file.
    #[arg(long, action = ArgAction::SetTrue)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub client_cert_auth: bool,
    /// Client identities and roles, NAME=read|write|admin,... (needs --client-cert-auth).
    #[arg(long, value_name = "NAME=ROLE,...")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_roles: Option<String>,
    /// PEM certificate for the peer port, common name `kvraft-node-<id>` (mutual TLS between peers).
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_cert_file: Option<PathBuf>,
    /// PEM private key of --peer-cert-file.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_key_file: Option<PathBuf>,
    /// PEM CA that signs every node's peer certificate.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Serve /metrics, /health and /ready over HTTPS with --cert-file.
    #[arg(long, action = ArgAction::SetTrue)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub metrics_tls: bool,
}

/// The configuration keys: `NodeConfig`'s fields in declaration order, read
/// from its `Deserialize` implementation, so a field added there is a key for
/// the file, the environment and the error messages at once.
pub fn keys() -> &'static [&'static str] {
    static KEYS: std::sync::OnceLock<&'static [&'static str]> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let mut fields: &'static [&'static str] = &[];
        let _ = NodeConfig::deserialize(FieldNames(&mut fields));
        assert!(!fields.is_empty(), "NodeConfig deserializes as a struct");
        fields
    })
}

/// Each key's built-in default as `--help` shows it (`""` for an empty
/// string); keys without one (unset by default) are left out.
pub fn default_texts() -> Vec<(&'static str, String)> {
    let table = toml::Table::try_from(NodeConfig::default()).expect("the defaults serialise");
    keys()
        .iter()
        .filter_map(|key| {
            let text = match table.get(*key)? {
                toml::Value::String(s) if s.is_empty() => "\"\"".to_string(),
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some((*key, text))
        })
        .collect()
}

/// A deserializer that only records the field names a struct asks for.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("only field names are read"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(serde::de::Error::custom("only field names are read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// Where the configuration comes from; kept so SIGHUP can read it again.
#[derive(Debug, Clone)]
pub struct ConfigSources {
    file: Option<PathBuf>,
    file_required: bool,
    flags: DaemonArgs,
}

impl ConfigSources {
    /// The sources for these flags: `--config` if given (it must exist), else
    /// the default file if it exists.
    pub fn new(flags: DaemonArgs) -> Self {
        let (file, file_required) = match &flags.config {
            Some(path) => (Some(path.clone()), true),
            None => (Some(PathBuf::from(DEFAULT_CONFIG_FILE)), false),
        };
        ConfigSources {
            file,
            file_required,
            flags,
        }
    }

    /// Like [`ConfigSources::new`] but with another default file (tests).
    pub fn with_default_file(flags: DaemonArgs, default_file: &Path) -> Self {
        let mut sources = Self::new(flags);
        if !sources.file_required {
            sources.file = Some(default_file.to_path_buf());
        }
        sources
    }

    fn figment(&self) -> Result<Figment, String> {
        let mut figment = Figment::from(Named(Serialized::defaults(NodeConfig::default()), "built-in default"));
        if let Some(file) = &self.file {
            if file.exists() {
                figment = figment.merge(Toml::file_exact(file));
            } else if self.file_required {
                return Err(format!(
                    "--config {}: no such file; give the path of a TOML file (see packaging/kvraft.example.toml)",
                    file.display()
                ));
            }
        }
        let env = Env::prefixed("KVRAFT_").only(keys());
        Ok(figment
            .merge(env)
            .merge(Named(Serialized::globals(&self.flags), "command-line flag")))
    }

    /// Reads every layer and validates the result. Errors name the key, the
    /// source that set it and what is allowed.
    pub fn load(&self) -> Result<NodeConfig, String> {
        let figment = self.figment()?;
        let mut config: NodeConfig = figment.extract().map_err(|e| describe_figment_error(&e))?;
        config.empty_means_unset();
        config.validate().map_err(|invalid| {
            let source = figment
                .find_metadata(invalid.key)
                .map(|m| describe_source(m, invalid.key))
                .unwrap_or_else(|| "built-in default".into());
            format!("{} (from {source}) {}", invalid.key, invalid.message)
        })?;
        Ok(config)
    }
}

/// A provider with a name of our choosing, so errors say "command-line flag"
/// rather than the provider's type.
struct Named<P>(P, &'static str);

impl<P: figment::Provider> figment::Provider for Named<P> {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.1)
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.0.data()
    }
}

/// "TOML file /etc/kvraft/kvraft.toml", "KVRAFT_ID environment variable", ...
fn describe_source(metadata: &figment::Metadata, key: &str) -> String {
    if metadata.name.contains("environment") {
        return format!("environment variable KVRAFT_{}", key.to_uppercase());
    }
    match &metadata.source {
        // figment shows file paths relative to the working directory; the
        // whole path is clearer in a daemon's log.
        Some(figment::Source::File(path)) => format!("{} {}", metadata.name, path.display()),
        Some(source) => format!("{} {source}", metadata.name),
        None => metadata.name.to_string(),
    }
}

fn describe_figment_error(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = e
                .metadata
                .as_ref()
                .map(|m| describe_source(m, &key))
                .unwrap_or_default();
            let what = match &e.kind {
                figment::error::Kind::UnknownField(field, _) => {
                    format!("unknown key `{field}`; the keys are: {}", keys().join(", "))
                }
                kind => kind.to_string(),
            };
            match (key.is_empty(), source.is_empty()) {
                (false, false) => format!("{key} (from {source}): {what}"),
                (false, true) => format!("{key}: {what}"),
                (true, false) => format!("{source}: {what}"),
                (true, true) => what,
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_initial_cluster_and_names_bad_entries() {
        let m = parse_initial_cluster("2=127.0.0.1:2,1=node1:7380").unwrap();
        assert_eq!(m, vec![(1, "node1:7380".to_string()), (2, "127.0.0.1:2".to_string())]);
        assert!(parse_initial_cluster("1=a:1,1=b:2").unwrap_err().contains("twice"));
        assert!(parse_initial_cluster("x=a:1").unwrap_err().contains("positive integer"));
        assert!(parse_initial_cluster("0=a:1").unwrap_err().contains("positive integer"));
        assert!(parse_initial_cluster("1=a").unwrap_err().contains("HOST:PORT"));
        assert!(parse_initial_cluster("1=a:99999").unwrap_err().contains("65535"));
        assert!(parse_initial_cluster("").unwrap_err().contains("empty"));
    }

    #[test]
    fn validates_limits_and_timing() {
        assert!(NodeConfig::default().validate().is_ok());
        let bad = NodeConfig {
            election_ticks: 1,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "election_ticks");
        let bad = NodeConfig {
            max_value_size: 10 << 20,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "max_value_size");
        let bad = NodeConfig {
            max_value_size: 5 << 20,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "max_frame_size");
        let bad = NodeConfig {
            id: 0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "id");
        let bad = NodeConfig {
            log_filter: "kvraft=[".into(),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().key, "log_filter");
    }

    #[test]
    fn an_empty_tls_setting_is_unset() {
        let mut config = NodeConfig {
            cert_file: Some("".into()),
            peer_trusted_ca_file: Some("".into()),
            client_roles: Some(" ".into()),
            key_file: Some("k".into()),
            ..Default::default()
        };
        config.empty_means_unset();
        assert_eq!(
            (config.cert_file, config.peer_trusted_ca_file, config.client_roles),
            (None, None, None)
        );
        assert_eq!(config.key_file, Some("k".into()));
    }

    #[test]
    fn catchup_tail_is_capped_by_the_threshold() {
        let c = NodeConfig {
            snapshot_threshold: 100,
            ..Default::default()
        };
        assert_eq!(c.catchup_entries(), 50);
        assert_eq!(NodeConfig::default().catchup_entries(), 5_000);
    }

    #[test]
    fn the_shortest_lease_outlasts_the_longest_election() {
        assert_eq!(NodeConfig::default().min_lease_ttl(), 2);
        let slow = NodeConfig {
            tick_ms: 150,
            election_ticks: 15,
            ..Default::default()
        };
        // 4.5 s of election timeout at most, rounded up.
        assert_eq!(slow.min_lease_ttl(), 5);
    }

    #[test]
    fn every_key_is_listed_for_the_environment() {
        let toml = NodeConfig {
            advertise_client_addr: Some("a:1".into()),
            advertise_peer_addr: Some("a:2".into()),
            initial_cluster: Some("1=a:2".into()),
            cert_file: Some("c".into()),
            key_file: Some("k".into()),
            trusted_ca_file: Some("ca".into()),
            client_roles: Some("a=read".into()),
            peer_cert_file: Some("pc".into()),
            peer_key_file: Some("pk".into()),
            peer_trusted_ca_file: Some("pca".into()),
            ..Default::default()
        }
        .to_toml();
        let table: toml::Table = toml.parse().unwrap();
        let mut serialized: Vec<&str> = table.keys().map(String::as_str).collect();
        serialized.sort();
        let mut listed = keys().to_vec();
        listed.sort();
        assert_eq!(serialized, listed);
    }
}
