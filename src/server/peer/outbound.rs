//! The outbound side of the peer protocol: [`TcpTransport`], the node's
//! [`Transport`] over TCP (and TLS). Each peer has a bounded queue drained by
//! its own task, which connects (with backoff), says hello, writes frames and
//! reports failures back through the control channel so the raft loop can call
//! `report_unreachable` / `report_snapshot`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::mpsc as tokio_mpsc;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::codec::{self, ByteStream, FrameReader};
use crate::metrics;
use crate::node::transport::{LocalPeer, Transport, TransportContext};
use crate::node::{ControlSender, Inbox};
use crate::proto::{peer_rejection, PeerEnvelope, PeerRejection};
use crate::tls::server::PeerTls;
use ::metrics::counter;

/// Messages queued per peer before we start dropping (raft retransmits).
const QUEUE: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

struct Peer {
    addr: String,
    queue: tokio_mpsc::Sender<Message>,
}

/// The outbound side of the peer protocol over TCP (and TLS).
pub struct TcpTransport {
    local: LocalPeer,
    store: Arc<crate::storage::StateStore>,
    cluster_id: u64,
    peers: HashMap<u64, Peer>,
    runtime: tokio::runtime::Handle,
    reports: ControlSender,
    tls: Option<Arc<PeerTls>>,
}

impl TcpTransport {
    /// A transport whose peer tasks run on `runtime` and report to the
    /// context's inbox, speaking TLS to peers when `tls` is set.
    pub fn new(context: TransportContext, runtime: tokio::runtime::Handle, tls: Option<Arc<PeerTls>>) -> Self {
        TcpTransport {
            local: context.local,
            store: context.store,
            cluster_id: context.cluster_id,
            peers: HashMap::new(),
            runtime,
            reports: context.reports,
            tls,
        }
    }
}

impl TcpTransport {
    /// A task speaking to peer `to` at `addr` on this node's behalf.
    fn peer_task(&self, to: u64, addr: &str) -> PeerTask {
        PeerTask {
            to,
            addr: addr.to_string(),
            local: self.local.clone(),
            cluster_id: self.cluster_id,
            reports: self.reports.clone(),
            tls: self.tls.clone(),
        }
    }
}

impl Transport for TcpTransport {
    fn set_cluster_id(&mut self, cluster_id: u64) {
        if self.cluster_id != cluster_id {
            self.cluster_id = cluster_id;
            self.peers.clear();
        }
    }

    fn send(&mut self, message: Message, addr: Option<&str>) -> bool {
        let to = message.to;
        let Some(addr) = addr else {
            debug!(to, "no address known for peer; dropping message");
            return false;
        };
        let stale = self
            .peers
            .get(&to)
            .is_some_and(|p| p.addr != addr || p.queue.is_closed());
        if stale {
            self.peers.remove(&to);
        }
        if !self.peers.contains_key(&to) {
            let (tx, rx) = tokio_mpsc::channel(QUEUE);
            metrics::zero_peer(to);
            self.runtime.spawn(self.peer_task(to, addr).run(rx));
            let peer = Peer {
                addr: addr.to_string(),
                queue: tx,
            };
            self.peers.insert(to, peer);
        }
        if message.get_msg_type() == MessageType::MsgSnapshot {
            // The state goes on its own connection, streamed; the raft
            // session keeps flowing meanwhile.
            let stream = super::snapshot::send(self.peer_task(to, addr), message, self.store.clone());
            self.runtime.spawn(stream);
            return true;
        }
        self.peers[&to].queue.try_send(message).is_ok()
    }

    fn forget(&mut self, id: u64) {
        self.peers.remove(&id);
    }
}

/// Why a connection to a peer could not be made.
pub(super) enum ConnectFailure {
    /// Unreachable for now (refused, timed out): retried quietly.
    Network(String),
    /// TLS or the peer's identity is wrong: needs an operator.
    Identity(String),
}

pub(super) struct PeerTask {
    pub(super) to: u64,
    pub(super) addr: String,
    pub(super) local: LocalPeer,
    pub(super) cluster_id: u64,
    pub(super) reports: ControlSender,
    pub(super) tls: Option<Arc<PeerTls>>,
}

impl PeerTask {
    /// Connects, with TLS when it is on: the peer's certificate must chain to
    /// the peer CA, be valid for the address's host, and name node `to`.
    pub(super) async fn connect(&self) -> Result<Box<dyn ByteStream>, ConnectFailure> {
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ConnectFailure::Network(e.to_string())),
            Err(_) => return Err(ConnectFailure::Network("connect timed out".into())),
        };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = crate::tls::server_name_of(&self.addr).map_err(ConnectFailure::Identity)?;
        let connector = TlsConnector::from(tls.configs().client.clone());
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT * 5, connector.connect(name, tcp)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(self.explain_tls_failure(&e)),
            Err(_) => return Err(ConnectFailure::Network("TLS handshake timed out".into())),
        };
        // The same identity rule as inbound: the certificate must name node `to`.
        match crate::tls::leaf_certificate(stream.get_ref().1).map(crate::tls::files::node_identity) {
            Some(Ok(node)) if node == self.to => Ok(Box::new(stream)),
            Some(Ok(node)) => Err(ConnectFailure::Identity(format!(
                "the peer at {} presented the certificate of node {node}, not of node {}: is the member list's address for node {} right?",
                self.addr, self.to, self.to
            ))),
            Some(Err(what)) => Err(ConnectFailure::Identity(format!(
                "the peer at {} presented {what}",
                self.addr
            ))),
            None => Err(ConnectFailure::Identity(format!(
                "the peer at {} presented no certificate",
                self.addr
            ))),
        }
    }

    /// What a failed peer handshake means, in peer-port terms.
    fn explain_tls_failure(&self, error: &std::io::Error) -> ConnectFailure {
        use crate::tls::client::HandshakeProblem as P;
        let who = format!("node {} at {}", self.to, self.addr);
        let why = match crate::tls::client::classify(error) {
            P::Network(why) => return ConnectFailure::Network(why),
            P::NotTls | P::Closed => {
                format!("{who} does not speak TLS on its peer port (or dropped the handshake): turn peer TLS on on every node")
            }
            P::UnknownIssuer => format!("{who} presented a certificate not signed by peer_trusted_ca_file"),
            P::WrongName(_) => format!("{who} presented a certificate that does not name the host in its peer address"),
            P::Expired | P::NotYetValid => format!("{who} presented a certificate that is not valid now"),
            P::CertificateRequired | P::RefusedOurCertificate | P::OurCertificateExpired => format!(
                "{who} refused this node's peer certificate: is it valid, and signed by the CA in its peer_trusted_ca_file?"
            ),
            P::Other(what) => format!("{who}: {what}"),
        };
        ConnectFailure::Identity(why)
    }

    async fn run(self, mut queue: tokio_mpsc::Receiver<Message>) {
        let mut backoff = Duration::from_millis(20);
        // A TLS or identity problem repeats on every attempt until an
        // operator fixes it: say so once a minute, not once a second.
        let mut last_warning: Option<(String, std::time::Instant)> = None;
        loop {
            let stream = match self.connect().await {
                Ok(stream) => stream,
                Err(failure) => {
                    let why = match failure {
                        ConnectFailure::Network(why) => why,
                        ConnectFailure::Identity(why) => {
                            let repeated = last_warning
                                .as_ref()
                                .is_some_and(|(said, at)| *said == why && at.elapsed() < Duration::from_secs(60));
                            if !repeated {
                                warn!(peer = self.to, addr = %self.addr, "{why}");
                                last_warning = Some((why.clone(), std::time::Instant::now()));
                            }
                            why
                        }
                    };
                    debug!(to = self.to, addr = %self.addr, %why, "peer unreachable");
                    self.count_failure();
                    // Whatever is queued can't go out now; raft resends.
                    if !self.drop_queued(&mut queue) {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let (read_half, write_half) = tokio::io::split(stream);
            let mut sink = tokio_util::codec::FramedWrite::new(write_half, codec::codec(codec::PEER_MAX_FRAME));
            // Replies are only ever small rejections.
            let mut replies = FrameReader::new(BufReader::new(read_half), codec::PEER_PREAUTH_MAX_FRAME);
            // The hello names us before anything large is sent.
            if sink.send(self.hello()).await.is_err() {
                self.count_failure();
                let _ = self.reports.send(Inbox::Unreachable(self.to));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            loop {
                tokio::select! {
                    message = queue.recv() => {
                        let Some(message) = message else { return };
                        let mut batch = vec![message];
                        while batch.len() < 256 {
                            match queue.try_recv() {
                                Ok(m) => batch.push(m),
                                Err(_) => break,
                            }
                        }
                        let snapshots: Vec<u64> = batch
                            .iter()
                            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                            .map(|m| m.to)
                            .collect();
                        let mut failed = false;
                        let mut bytes = 0u64;
                        for m in &batch {
                            let frame = self.envelope(m);
                            bytes += frame.len() as u64 + 4;
                            if sink.feed(frame).await.is_err() {
                                failed = true;
                                break;
                            }
                        }
                        if !failed {
                            failed = SinkExt::<bytes::Bytes>::flush(&mut sink).await.is_err();
                        }
                        for to in snapshots {
                            let _ = self.reports.send(Inbox::SnapshotSent { to, ok: !failed });
                        }
                        if failed {
                            self.count_failure();
                            let _ = self.reports.send(Inbox::Unreachable(self.to));
                            break;
                        }
                        counter!(metrics::PEER_SENT_BYTES, "peer" => self.to.to_string()).increment(bytes);
                        backoff = Duration::from_millis(20);
                    }
                    reply = replies.next_frame() => {
                        // The receiver only ever writes a rejection, then closes.
                        if let Ok(Some(frame)) = reply {
                            if let Ok(rejection) = PeerRejection::decode(frame) {
                                info!(peer = self.to, reason = %rejection.message, "peer refused us");
                                let _ = self.reports.send(Inbox::RejectedByPeer {
                                    peer: self.to,
                                    reason: rejection.message,
                                    removed: rejection.reason == peer_rejection::Reason::Removed as i32,
                                    replaced: rejection.reason
                                        == peer_rejection::Reason::ReplacedDataDir as i32,
                                });
                                // A refusal is not transient: retry slowly.
                                backoff = MAX_BACKOFF;
                            }
                        }
                        let _ = self.reports.send(Inbox::Unreachable(self.to));
                        tokio::time::sleep(backoff).await;
                        break;
                    }
                }
            }
        }
    }

    fn count_failure(&self) {
        counter!(metrics::PEER_SEND_FAILURES, "peer" => self.to.to_string()).increment(1);
    }

    pub(super) fn envelope(&self, message: &Message) -> bytes::Bytes {
        codec::encode(&PeerEnvelope {
            cluster_id: self.cluster_id,
            from_id: self.local.id,
            from_peer_addr: self.local.peer_addr.clone(),
            raft_message: message.write_to_bytes().expect("raft messages always encode"),
            snapshot_stream: false,
            from_incarnation: self.local.incarnation,
        })
    }

    /// The first envelope on a connection: who we are, no raft message.
    fn hello(&self) -> bytes::Bytes {
        self.hello_for(false)
    }

    /// A hello; `snapshot_stream` says the connection carries one snapshot.
    pub(super) fn hello_for(&self, snapshot_stream: bool) -> bytes::Bytes {
        codec::encode(&PeerEnvelope {
            cluster_id: self.cluster_id,
            from_id: self.local.id,
            from_peer_addr: self.local.peer_addr.clone(),
            raft_message: Vec::new(),
            snapshot_stream,
            from_incarnation: self.local.incarnation,
        })
    }

    /// Drops queued messages after a failed connect, telling the loop about
    /// snapshots that did not go out. Returns false if the queue is closed.
    fn drop_queued(&self, queue: &mut tokio_mpsc::Receiver<Message>) -> bool {
        let mut dropped = false;
        loop {
            match queue.try_recv() {
                Ok(m) => {
                    dropped = true;
                    if m.get_msg_type() == MessageType::MsgSnapshot {
                        let _ = self.reports.send(Inbox::SnapshotSent { to: m.to, ok: false });
                    }
                }
                Err(tokio_mpsc::error::TryRecvError::Empty) => break,
                Err(tokio_mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
        if dropped {
            let _ = self.reports.send(Inbox::Unreachable(self.to));
        }
        true
    }
}
