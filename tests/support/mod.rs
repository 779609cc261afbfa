//! Test harness: real `kvraftd` processes on 127.0.0.1 with their data in temp
//! dirs, and helpers that wait on conditions with deadlines.
#![allow(dead_code)]

pub mod peer_probe;

use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kvraft::proto::InfoResponse;
use kvraft::tls::client::ClientTlsOptions;
use kvraft::{Client, ClientOptions};

/// Raft timing for tests: 25 ms ticks, heartbeats every 50 ms, elections after
/// 0.5-1 s (shorter timeouts made leaders step down on a loaded 2-core CI machine).
pub const FAST_TIMING: &[&str] = &["--tick-ms", "25", "--election-ticks", "20", "--heartbeat-ticks", "2"];

/// A port nobody listens on right now.
///
/// Ports come from 20000-31999, below Linux's ephemeral range (32768-60999):
/// a port the kernel picked with bind(0) could be taken as the source port of
/// an outgoing connection before the node binds it. A process-wide counter
/// keeps the tests of one binary apart; the start depends on the pid.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (start.wrapping_add(n) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One node of a test cluster.
pub struct Node {
    pub id: u64,
    pub client_addr: String,
    pub peer_addr: String,
    pub metrics_addr: String,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub args: Vec<String>,
    env_removed: Vec<String>,
    env_extra: Vec<(String, String)>,
    child: Option<Child>,
}

impl Node {
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts this node with an extra environment variable.
    pub fn env(&mut self, name: &str, value: &str) {
        self.env_extra.push((name.to_string(), value.to_string()));
    }

    /// Starts this node without the harness's value of an environment variable.
    pub fn env_remove(&mut self, name: &str) {
        self.env_removed.push(name.to_string());
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

/// A set of nodes sharing a temp dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    /// TLS settings of the clients this harness makes (off by default).
    pub client_tls: ClientTlsOptions,
}

impl Cluster {
    /// `n` nodes started with the same `--initial-cluster`.
    pub fn start_static(n: u64, extra: &[&str]) -> Cluster {
        Cluster::start_static_each(n, |_| extra.iter().map(|s| s.to_string()).collect())
    }

    /// `n` nodes started with the same `--initial-cluster`, each with the
    /// extra flags `extra(id)` gives it.
    pub fn start_static_each(n: u64, extra: impl Fn(u64) -> Vec<String>) -> Cluster {
        let mut cluster = Cluster::empty();
        let ids: Vec<u64> = (1..=n).collect();
        let peers: Vec<(u64, String)> = ids
            .iter()
            .map(|id| (*id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let spec = peers
            .iter()
            .map(|(id, p)| format!("{id}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        for (id, peer) in peers {
            let mut args: Vec<String> = vec!["--initial-cluster".into(), spec.clone()];
            args.extend(extra(id));
            cluster.add_node(id, Some(peer), args);
        }
        for id in ids {
            cluster.start(id);
        }
        cluster
    }

    pub fn empty() -> Cluster {
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            nodes: Vec::new(),
            client_tls: ClientTlsOptions::default(),
        }
    }

    /// Registers a node (not started). `args` come after the standard ones.
    pub fn add_node(&mut self, id: u64, peer_addr: Option<String>, args: Vec<String>) -> &mut Node {
        let client_addr = format!("127.0.0.1:{}", free_port());
        let peer_addr = peer_addr.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        self.nodes.push(Node {
            id,
            data_dir: self.dir.path().join(format!("node{id}")),
            log_path: self.dir.path().join(format!("node{id}.log")),
            client_addr,
            peer_addr,
            metrics_addr: format!("127.0.0.1:{}", free_port()),
            args,
            env_removed: Vec::new(),
            env_extra: Vec::new(),
            child: None,
        });
        self.nodes.last_mut().unwrap()
    }

    pub fn node(&mut self, id: u64) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("no such node")
    }

    pub fn node_log(&self, id: u64) -> String {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.log())
            .unwrap_or_default()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Starts (or restarts) a node with its flags.
    pub fn start(&mut self, id: u64) {
        let node = self.node(id);
        assert!(node.child.is_none(), "node {id} is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kvraftd"));
        command
            .arg("--id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--client-addr")
            .arg(&node.client_addr)
            .arg("--peer-addr")
            .arg(&node.peer_addr)
            .arg("--metrics-addr")
            .arg(&node.metrics_addr)
            .args(FAST_TIMING)
            .args(&node.args)
            .env("KVRAFT_LOG_FILTER", "info,raft=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log);
        for name in &node.env_removed {
            command.env_remove(name);
        }
        for (name, value) in &node.env_extra {
            command.env(name, value);
        }
        let child = command.spawn().expect("spawn kvraftd");
        node.child = Some(child);
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.node(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for a node's process to exit by itself.
    pub fn wait_exit(&mut self, id: u64, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let node = self.node(id);
        let child = node.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                node.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// A client for these nodes.
    pub fn client(&self, ids: &[u64]) -> Client {
        self.client_with(ids, Duration::from_secs(10), false)
    }

    pub fn client_with(&self, ids: &[u64], timeout: Duration, serializable: bool) -> Client {
        let endpoints = self
            .nodes
            .iter()
            .filter(|n| ids.contains(&n.id))
            .map(|n| n.client_addr.clone())
            .collect();
        Client::new(ClientOptions {
            endpoints,
            timeout,
            serializable,
            tls: self.client_tls.clone(),
        })
        .unwrap()
    }

    /// Every node as `scripts/bootstrap.sh` takes it: ID=PEER_ADDR=CLIENT_ADDR.
    pub fn bootstrap_members(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("{}={}={}", n.id, n.peer_addr, n.client_addr))
            .collect()
    }

    pub fn endpoints(&self, ids: &[u64]) -> String {
        self.nodes
            .iter()
            .filter(|n| ids.contains(&n.id))
            .map(|n| n.client_addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `info` of one node (short timeout, no failover).
    pub async fn info(&self, id: u64) -> Option<InfoResponse> {
        self.client_with(&[id], Duration::from_millis(500), true)
            .info()
            .await
            .ok()
    }

    /// Waits until every listed node reports the same leader (one of them) in
    /// the same term; returns the leader's id.
    pub async fn wait_for_leader(&self, ids: &[u64], timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut infos = Vec::new();
            for id in ids {
                infos.push(self.info(*id).await);
            }
            if let Some(first) = infos.first().cloned().flatten() {
                let agreed = infos.iter().all(|i| {
                    i.as_ref()
                        .is_some_and(|i| i.leader_id == first.leader_id && i.term == first.term)
                });
                let leader_is_listed = ids.contains(&first.leader_id);
                let leader_says_so = infos
                    .iter()
                    .flatten()
                    .any(|i| i.id == first.leader_id && i.role == "leader");
                if first.leader_id != 0 && agreed && leader_is_listed && leader_says_so {
                    return first.leader_id;
                }
            }
            if Instant::now() > deadline {
                panic!("no agreed leader among {ids:?} within {timeout:?}: {infos:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until node `ask` lists every member with its client address:
    /// each has published its own record (client address and data dir
    /// incarnation travel in the same update).
    pub async fn wait_all_published(&self, ask: u64, timeout: Duration) {
        self.wait_info(ask, timeout, "every member published its record", |i| {
            i.members.iter().all(|m| !m.client_addr.is_empty())
        })
        .await;
    }

    /// Waits until `check` passes on node `id`'s info.
    pub async fn wait_info(
        &self,
        id: u64,
        timeout: Duration,
        what: &str,
        check: impl Fn(&InfoResponse) -> bool,
    ) -> InfoResponse {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.info(id).await;
            if let Some(i) = info.as_ref().filter(|i| check(i)) {
                return i.clone();
            }
            if Instant::now() > deadline {
                panic!("node {id}: {what} not reached within {timeout:?}; last info: {info:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of a metric on node `id`, summed over series whose labels
    /// include `labels` (0 if absent).
    pub fn metric(&self, id: u64, name: &str, labels: &[(&str, &str)]) -> f64 {
        let addr = self.nodes.iter().find(|n| n.id == id).unwrap().metrics_addr.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match http_get(&addr, "/metrics") {
                Ok((200, body)) => return metric_sum(&body, name, labels).unwrap_or(0.0),
                other => assert!(Instant::now() < deadline, "no /metrics from node {id}: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the `kvraft` CLI against these nodes (with the harness's TLS
    /// settings as flags).
    pub fn cli(&self, ids: &[u64], args: &[&str]) -> Output {
        let mut all: Vec<String> = Vec::new();
        let tls = &self.client_tls;
        for (flag, value) in [
            ("--cacert", &tls.ca_file),
            ("--cert", &tls.cert_file),
            ("--key", &tls.key_file),
        ] {
            if let Some(path) = value {
                all.push(flag.into());
                all.push(path.display().to_string());
            }
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        kvraft_cli(&self.endpoints(ids), &all)
    }

    /// The nemesis of the history tests: `times` times, lets traffic run for
    /// 1.5 s, kills -9 the leader among `ids` (calling `on_kill` right after),
    /// and restarts it half a second later.
    pub async fn kill_leaders(&mut self, ids: &[u64], times: usize, mut on_kill: impl FnMut()) {
        for _ in 0..times {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let leader = self.wait_for_leader(ids, Duration::from_secs(30)).await;
            self.kill(leader);
            on_kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.start(leader);
        }
    }

    /// Runs the `kvraft` CLI against these nodes with `input` on its stdin.
    pub fn cli_with_stdin(&self, ids: &[u64], args: &[&str], input: &[u8]) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvraft"))
            .arg("--endpoints")
            .arg(self.endpoints(ids))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run kvraft");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_vec();
        // A separate thread: a CLI that fails early stops reading its stdin.
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("wait for kvraft");
        writer.join().expect("stdin writer");
        out
    }
}

/// Runs the `kvraft` CLI with these endpoints.
pub fn kvraft_cli(endpoints: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvraft"))
        .arg("--endpoints")
        .arg(endpoints)
        .args(args)
        .output()
        .expect("run kvraft")
}

/// Runs `kvraft certs init DIR --nodes NODES --clients CLIENTS`, as a user would.
pub fn certs_init(dir: &std::path::Path, nodes: &str, clients: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvraft"))
        .args([
            "certs",
            "init",
            dir.to_str().unwrap(),
            "--nodes",
            nodes,
            "--clients",
            clients,
        ])
        .output()
        .expect("run kvraft certs init");
    assert!(out.status.success(), "certs init: {}", stderr(&out));
}

/// Flags for node `id` with certificates from a `certs init` directory: TLS
/// on both ports and client certificates required.
pub fn tls_node_flags(certs: &std::path::Path, id: u64) -> Vec<String> {
    let file = |name: String| certs.join(name).display().to_string();
    let (cert, key, ca) = (
        file(format!("node-{id}.pem")),
        file(format!("node-{id}.key")),
        file("ca.pem".into()),
    );
    [
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--trusted-ca-file",
        &ca,
        "--client-cert-auth",
        "--peer-cert-file",
        &cert,
        "--peer-key-file",
        &key,
        "--peer-trusted-ca-file",
        &ca,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs `kvraftd` to completion (for flag and data dir errors).
pub fn kvraftd_once(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvraftd"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!(
        "kvraftd {args:?} did not exit within {timeout:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim_end().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim_end().to_string()
}

/// Polls an async condition until it holds or the deadline passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        if Instant::now() > deadline {
            panic!("{what}: not true within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                let log = node.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("----- node {} log (last 40 lines) -----", node.id);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A plain HTTP/1.0 GET; returns the status code and body.
pub fn http_get(addr: &str, path_and_query: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Percent-encodes a query parameter value.
pub fn url_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of one sample line `name{labels} value` in Prometheus text, summed
/// over every series of `name` whose labels contain all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        if series_name != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
        {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

/// Asserts that every acknowledged write reads back with its value.
pub async fn assert_all_readable(client: &Client, acked: &[(String, String)]) {
    for (k, v) in acked {
        assert_eq!(
            client.get(k.clone()).await.unwrap().as_deref(),
            Some(v.as_bytes()),
            "acknowledged write {k} lost"
        );
    }
}

/// Sets `key` to `value` on a healthy cluster: any error fails the test (the
/// client already retries what is safe to retry, such as no leader yet).
pub async fn put(client: &Client, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
    if let Err(e) = client.set(key.as_ref().to_vec(), value.as_ref().to_vec()).await {
        panic!(
            "set {:?} failed on a healthy cluster: {e}",
            key.as_ref().escape_ascii().to_string()
        );
    }
}

/// One request on a raw connection: no client library, so nothing follows a
/// `NOT_LEADER` hint or retries.
pub async fn raw_request(addr: &str, command: kvraft::proto::request::Command) -> kvraft::proto::response::Result {
    use futures::{SinkExt, StreamExt};
    use prost::Message;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut frames = kvraft::codec::framed(stream, kvraft::codec::CLIENT_MAX_FRAME);
    let request = kvraft::proto::Request {
        id: 7,
        command: Some(command),
        ..Default::default()
    };
    frames.send(kvraft::codec::encode(&request)).await.unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(30), frames.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let response = kvraft::proto::Response::decode(frame).unwrap();
    assert_eq!(response.id, 7);
    response.result.expect("a response carries a result")
}
