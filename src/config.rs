//! The daemon's settings. Flags are parsed in [`DaemonArgs`]; a config file and
//! `KVRAFT_*` environment variables layer under them in a later release, with
//! the same names.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Everything a node needs to start.
#[derive(Debug, Clone)]
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
    pub advertise_client_addr: Option<String>,
    /// The peer address other nodes use; defaults to `peer_addr`.
    pub advertise_peer_addr: Option<String>,
    /// `ID=PEER_ADDR,...`: the initial members of a new cluster. Ignored once
    /// the data dir is initialised. Default: this node alone.
    pub initial_cluster: Option<String>,
    /// Start empty and wait to be added with `kvraft add-node`.
    pub join: bool,
    /// Take a snapshot every this many applied entries.
    pub snapshot_threshold: u64,
    /// Entries kept in the log behind a snapshot for slow followers (capped at
    /// half the snapshot threshold).
    pub snapshot_catchup_entries: u64,
    /// One raft tick.
    pub tick: Duration,
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
    /// How long a proposal or read may wait inside the node.
    pub request_timeout: Duration,
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
            snapshot_threshold: 10_000,
            snapshot_catchup_entries: 5_000,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            max_frame_size: crate::codec::DEFAULT_MAX_FRAME,
            max_key_size: 8 * 1024,
            max_value_size: 1024 * 1024,
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl NodeConfig {
    /// The log entries kept behind a snapshot.
    pub fn catchup_entries(&self) -> u64 {
        self.snapshot_catchup_entries
            .min(self.snapshot_threshold / 2)
    }

    /// Checks values that flags alone can't constrain.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("--id must be a positive integer (0 is reserved by raft)".into());
        }
        if self.snapshot_threshold == 0 {
            return Err("--snapshot-threshold must be at least 1".into());
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err(format!(
                "--election-ticks ({}) must be greater than --heartbeat-ticks ({}), which must be at least 1",
                self.election_ticks, self.heartbeat_ticks
            ));
        }
        if self.tick.is_zero() {
            return Err("--tick-ms must be at least 1".into());
        }
        if self.max_key_size == 0 || self.max_value_size == 0 {
            return Err("--max-key-size and --max-value-size must be at least 1".into());
        }
        if self.max_key_size + self.max_value_size + 64 > self.max_frame_size {
            return Err(format!(
                "--max-frame-size ({}) must exceed --max-key-size + --max-value-size + 64 ({})",
                self.max_frame_size,
                self.max_key_size + self.max_value_size + 64
            ));
        }
        for (flag, addr) in [
            ("--client-addr", &self.client_addr),
            ("--peer-addr", &self.peer_addr),
        ] {
            check_host_port(addr).map_err(|e| format!("{flag} {addr}: {e}"))?;
        }
        for (flag, addr) in [
            ("--advertise-client-addr", &self.advertise_client_addr),
            ("--advertise-peer-addr", &self.advertise_peer_addr),
        ] {
            if let Some(addr) = addr {
                check_host_port(addr).map_err(|e| format!("{flag} {addr}: {e}"))?;
            }
        }
        if self.join && self.initial_cluster.is_some() {
            return Err("--join and --initial-cluster exclude each other: a joining node learns the members from the cluster".into());
        }
        Ok(())
    }
}

/// Checks that `addr` is `HOST:PORT` with a non-empty host and a numeric port.
/// Host names are allowed (resolved when connecting).
pub fn check_host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT, e.g. 127.0.0.1:7380".to_string())?;
    if host.is_empty()
        || host.contains(char::is_whitespace)
        || host.contains(',')
        || host.contains('=')
    {
        return Err("expected HOST:PORT with a non-empty host name or IP address".into());
    }
    port.parse::<u16>()
        .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
    Ok(())
}

/// Parses `ID=HOST:PORT,ID=HOST:PORT,...`.
pub fn parse_initial_cluster(spec: &str) -> Result<Vec<(u64, String)>, String> {
    let mut members: Vec<(u64, String)> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("--initial-cluster entry {part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().ok().filter(|id| *id > 0).ok_or_else(|| {
            format!("--initial-cluster entry {part:?}: the id must be a positive integer")
        })?;
        check_host_port(addr.trim())
            .map_err(|e| format!("--initial-cluster entry {part:?}: {e}"))?;
        if members.iter().any(|(other, _)| *other == id) {
            return Err(format!("--initial-cluster names node {id} twice"));
        }
        members.push((id, addr.trim().to_string()));
    }
    if members.is_empty() {
        return Err(
            "--initial-cluster is empty; give ID=HOST:PORT for every initial member".into(),
        );
    }
    members.sort();
    Ok(members)
}

/// The flags of `kvraftd`.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// This node's id: a positive integer, unique in the cluster.
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    /// Directory for the raft log, snapshots and identity (created 0700).
    #[arg(long, default_value = "kvraft-data")]
    pub data_dir: PathBuf,
    /// Address to listen on for clients.
    #[arg(long, default_value = "127.0.0.1:7379")]
    pub client_addr: String,
    /// Address to listen on for peers.
    #[arg(long, default_value = "127.0.0.1:7380")]
    pub peer_addr: String,
    /// Client address to announce to the cluster, if it differs from --client-addr.
    #[arg(long)]
    pub advertise_client_addr: Option<String>,
    /// Peer address to announce to the cluster, if it differs from --peer-addr.
    #[arg(long)]
    pub advertise_peer_addr: Option<String>,
    /// Initial members of a new cluster, `ID=HOST:PEERPORT,...`, the same on every
    /// initial member. Default: this node alone. Ignored once the data dir exists.
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Start empty and wait to be added by `kvraft add-node`.
    #[arg(long)]
    pub join: bool,
    /// Take a snapshot and compact the log every this many applied entries.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_threshold: u64,
    /// Log entries kept behind a snapshot for slow followers (at most half the threshold).
    #[arg(long, default_value_t = 5_000)]
    pub snapshot_catchup_entries: u64,
    /// Raft tick length in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub tick_ms: u64,
    /// Election timeout in ticks (must be the same on every node).
    #[arg(long, default_value_t = 10)]
    pub election_ticks: usize,
    /// Heartbeat interval in ticks (must be the same on every node).
    #[arg(long, default_value_t = 1)]
    pub heartbeat_ticks: usize,
    /// Largest client frame in bytes.
    #[arg(long, default_value_t = crate::codec::DEFAULT_MAX_FRAME)]
    pub max_frame_size: usize,
    /// Largest key in bytes.
    #[arg(long, default_value_t = 8 * 1024)]
    pub max_key_size: usize,
    /// Largest value in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_value_size: usize,
    /// How long a request may wait inside the node, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub request_timeout_ms: u64,
}

impl DaemonArgs {
    /// The validated configuration.
    pub fn into_config(self) -> Result<NodeConfig, String> {
        let config = NodeConfig {
            id: self.id,
            data_dir: self.data_dir,
            client_addr: self.client_addr,
            peer_addr: self.peer_addr,
            advertise_client_addr: self.advertise_client_addr,
            advertise_peer_addr: self.advertise_peer_addr,
            initial_cluster: self.initial_cluster,
            join: self.join,
            snapshot_threshold: self.snapshot_threshold,
            snapshot_catchup_entries: self.snapshot_catchup_entries,
            tick: Duration::from_millis(self.tick_ms),
            election_ticks: self.election_ticks,
            heartbeat_ticks: self.heartbeat_ticks,
            max_frame_size: self.max_frame_size,
            max_key_size: self.max_key_size,
            max_value_size: self.max_value_size,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
        };
        config.validate()?;
        if let Some(spec) = &config.initial_cluster {
            parse_initial_cluster(spec)?;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_initial_cluster_and_names_bad_entries() {
        let m = parse_initial_cluster("2=127.0.0.1:2,1=node1:7380").unwrap();
        assert_eq!(
            m,
            vec![
                (1, "node1:7380".to_string()),
                (2, "127.0.0.1:2".to_string())
            ]
        );
        assert!(parse_initial_cluster("1=a:1,1=b:2")
            .unwrap_err()
            .contains("twice"));
        assert!(parse_initial_cluster("x=a:1")
            .unwrap_err()
            .contains("positive integer"));
        assert!(parse_initial_cluster("0=a:1")
            .unwrap_err()
            .contains("positive integer"));
        assert!(parse_initial_cluster("1=a")
            .unwrap_err()
            .contains("HOST:PORT"));
        assert!(parse_initial_cluster("1=a:99999")
            .unwrap_err()
            .contains("65535"));
        assert!(parse_initial_cluster("").unwrap_err().contains("empty"));
    }

    #[test]
    fn validates_limits_and_timing() {
        assert!(NodeConfig::default().validate().is_ok());
        let bad = NodeConfig {
            election_ticks: 1,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("--election-ticks"));
        let bad = NodeConfig {
            max_value_size: 10 << 20,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("--max-frame-size"));
        let bad = NodeConfig {
            id: 0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("--id"));
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
}
