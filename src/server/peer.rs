//! Inbound peer connections. Each one must prove within a few seconds that it
//! speaks for a member (TLS certificate or source address, then a small hello
//! envelope) before frames larger than a few KiB are accepted from it; after
//! that it may only ever speak for that member. The checks themselves live in
//! [`crate::peer_guard`]; this module feeds them and acts on their verdict.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::metrics::counter;
use futures::SinkExt;
use prost::Message as _;
use protobuf::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::accept::Acceptor;
use crate::codec::{self, FrameReader};
use crate::metrics;
use crate::node::{Inbox, NodeHandle};
use crate::peer_guard::{self, ConnectionRefusal, PeerConnection, RefusalLog, SenderStanding};
use crate::proto::{peer_rejection::Reason, PeerEnvelope, PeerRejection};
use crate::state_machine::conf_ids;
use crate::tls::server::PeerTls;

/// Inbound peer connections from one address at once (a member keeps one;
/// a few more cover reconnects and several nodes on one host).
const CONNECTIONS_PER_ADDRESS: usize = 16;
/// Inbound peer connections at once, from everywhere.
const CONNECTIONS_MAX: usize = 256;
/// TLS handshake and hello must be done within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a resolved member address is trusted.
const RESOLVE_TTL: Duration = Duration::from_secs(30);
/// A refusal for the same (peer, reason) is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(300);

/// What a peer connection needs.
#[derive(Clone)]
pub struct PeerContext {
    /// This node.
    pub node_id: u64,
    /// The raft loop's inbox.
    pub inbox: mpsc::Sender<Inbox>,
    /// For membership.
    pub handle: NodeHandle,
    /// Our cluster (0 while a joining node waits).
    pub cluster_id: Arc<AtomicU64>,
    /// Peer TLS, if on.
    pub tls: Option<Arc<PeerTls>>,
}

/// State shared by every inbound peer connection.
struct Shared {
    context: PeerContext,
    open: Mutex<HashMap<IpAddr, usize>>,
    resolved: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
    log: RefusalLog,
}

/// Accepts peer connections until `stop` turns true.
pub async fn serve(listener: TcpListener, context: PeerContext, mut stop: watch::Receiver<bool>) {
    let shared = Arc::new(Shared {
        context,
        open: Mutex::new(HashMap::new()),
        resolved: Mutex::new(HashMap::new()),
        log: RefusalLog::new("refused peer input", LOG_EVERY),
    });
    let mut acceptor = Acceptor::new(listener, "peer");
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            (stream, remote) = acceptor.accept() => {
                let Some(slot) = Slot::take(&shared, remote.ip()) else {
                    shared.refuse(&remote.ip().to_string(), ConnectionRefusal::TooManyConnections, "too many peer connections");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err((refusal, detail)) = connection(stream, remote, &shared).await {
                        shared.refuse(&remote.ip().to_string(), refusal, &detail);
                    }
                    drop(slot);
                });
            }
        }
    }
}

/// One counted connection from an address; released on drop.
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Slot {
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<Slot> {
        let mut open = shared.open.lock().expect("peer slots lock poisoned");
        let total: usize = open.values().sum();
        let here = open.entry(ip).or_insert(0);
        if *here >= CONNECTIONS_PER_ADDRESS || total >= CONNECTIONS_MAX {
            return None;
        }
        *here += 1;
        Some(Slot {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().expect("peer slots lock poisoned");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl Shared {
    fn refuse(&self, peer: &str, refusal: ConnectionRefusal, detail: &str) {
        counter!(metrics::PEER_CONNECTIONS_REFUSED, "reason" => refusal.label()).increment(1);
        self.log.refused(peer, refusal.label(), detail);
    }

    /// The addresses `peer_addr` resolves to, cached for a while.
    async fn resolve(&self, peer_addr: &str) -> Vec<IpAddr> {
        if let Some((at, ips)) = self
            .resolved
            .lock()
            .expect("resolve cache lock poisoned")
            .get(peer_addr)
        {
            if at.elapsed() < RESOLVE_TTL {
                return ips.clone();
            }
        }
        let ips: Vec<IpAddr> = match tokio::net::lookup_host(peer_addr).await {
            Ok(addrs) => addrs.map(|a| peer_guard::canonical(a.ip())).collect(),
            Err(e) => {
                debug!(peer_addr, error = %e, "could not resolve a member's peer address");
                Vec::new()
            }
        };
        let mut cache = self.resolved.lock().expect("resolve cache lock poisoned");
        if cache.len() > 1024 {
            cache.clear();
        }
        cache.insert(peer_addr.to_string(), (Instant::now(), ips.clone()));
        ips
    }

    /// What we know of the node an envelope claims to come from.
    async fn standing(&self, from: u64, needs_address: bool) -> SenderStanding {
        let (is_member, joining, peer_addr) = self.context.handle.read(|sm| {
            let cs = sm.conf_state();
            let joining = cs.voters.is_empty() && cs.learners.is_empty();
            let is_member = conf_ids(cs).any(|id| id == from);
            (is_member, joining, sm.member(from).map(|m| m.peer_addr.clone()))
        });
        let member_ips = match (needs_address && is_member, peer_addr) {
            (true, Some(addr)) => self.resolve(&addr).await,
            _ => Vec::new(),
        };
        SenderStanding {
            is_member,
            joining,
            member_ips,
        }
    }
}

type Refused = (ConnectionRefusal, String);

/// Serves one inbound connection; an error says why it was refused.
async fn connection(stream: TcpStream, remote: SocketAddr, shared: &Shared) -> Result<(), Refused> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let Some(tls) = &shared.context.tls else {
        let peer = PeerConnection {
            remote_ip: peer_guard::canonical(remote.ip()),
            certified_node: None,
            tls: false,
        };
        return serve_frames(stream, peer, deadline, shared).await;
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == 0x16 => {}
        Ok(Ok(1)) => {
            // A plaintext node: tell it why, so its operator sees it.
            let mut sink = codec::framed(stream, codec::PEER_PREAUTH_MAX_FRAME);
            let rejection = PeerRejection {
                reason: Reason::TlsRequired as i32,
                message: "this node's peer port requires TLS: set peer_cert_file, peer_key_file and peer_trusted_ca_file on every node".into(),
            };
            let _ = tokio::time::timeout_at(deadline, sink.send(codec::encode(&rejection))).await;
            return Err((
                ConnectionRefusal::TlsRequired,
                format!("plaintext peer connection from {remote}"),
            ));
        }
        _ => return Err((ConnectionRefusal::NoHello, format!("{remote} sent nothing in time"))),
    }
    let acceptor = TlsAcceptor::from(tls.configs().server.clone());
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            return Err((
                ConnectionRefusal::TlsHandshake,
                format!("TLS handshake with {remote} failed: {e}"),
            ))
        }
        Err(_) => {
            return Err((
                ConnectionRefusal::TlsHandshake,
                format!("TLS handshake with {remote} timed out"),
            ))
        }
    };
    let common_name = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| crate::tls::files::common_name(leaf));
    let Some(node) = common_name.as_deref().and_then(crate::tls::node_id_of_common_name) else {
        return Err((
            ConnectionRefusal::NotANodeCertificate,
            format!(
                "{remote} presented a certificate with common name {:?}, not kvraft-node-<id>",
                common_name.unwrap_or_default()
            ),
        ));
    };
    let peer = PeerConnection {
        remote_ip: peer_guard::canonical(remote.ip()),
        certified_node: Some(node),
        tls: true,
    };
    serve_frames(stream, peer, deadline, shared).await
}

/// Reads envelopes: the first must arrive by `hello_deadline` and name a
/// sender the connection may speak for; every later one must name the same.
async fn serve_frames<S>(
    stream: S,
    peer: PeerConnection,
    hello_deadline: tokio::time::Instant,
    shared: &Shared,
) -> Result<(), Refused>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let context = &shared.context;
    let (read_half, write_half) = tokio::io::split(stream);
    let mut frames = FrameReader::new(BufReader::new(read_half), codec::PEER_PREAUTH_MAX_FRAME);
    let mut replies = tokio_util::codec::FramedWrite::new(write_half, codec::codec(codec::PEER_PREAUTH_MAX_FRAME));
    let mut sender: Option<u64> = None;
    loop {
        let next = if sender.is_none() {
            match tokio::time::timeout_at(hello_deadline, frames.next_frame()).await {
                Ok(next) => next,
                Err(_) => {
                    return Err((
                        ConnectionRefusal::NoHello,
                        format!("{} sent no hello in time", peer.remote_ip),
                    ))
                }
            }
        } else {
            frames.next_frame().await
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(e) if sender.is_none() => {
                return Err((ConnectionRefusal::NoHello, format!("{}: {e}", peer.remote_ip)));
            }
            Err(e) => {
                debug!(remote = %peer.remote_ip, error = %e, "peer connection closed");
                return Ok(());
            }
        };
        let frame_len = frame.len() as u64 + 4;
        let Ok(envelope) = PeerEnvelope::decode(frame) else {
            let refusal = if sender.is_none() {
                ConnectionRefusal::NoHello
            } else {
                ConnectionRefusal::SenderChanged
            };
            return Err((
                refusal,
                format!("{} sent a frame that is not a peer envelope", peer.remote_ip),
            ));
        };
        let from = envelope.from_id;
        if let Some(rejection) = reject_cluster_or_removed(&envelope, context) {
            let _ = replies.send(codec::encode(&rejection.0)).await;
            return Err((rejection.1, rejection.0.message));
        }
        match sender {
            None => {
                let standing = shared.standing(from, !peer.tls).await;
                peer_guard::check_sender(from, &peer, &standing).map_err(|refusal| {
                    let detail = match refusal {
                        ConnectionRefusal::AddressMismatch => format!(
                            "a connection from {} claims to be node {from}, whose peer address resolves to {:?}; \
                             if node {from} really connects from there, turn peer TLS on (certificates then identify nodes instead of addresses)",
                            peer.remote_ip, standing.member_ips
                        ),
                        ConnectionRefusal::CertificateMismatch => format!(
                            "a connection whose certificate names node {:?} claims to be node {from}",
                            peer.certified_node
                        ),
                        _ => format!(
                            "a connection from {} claims to be node {from}, not a member as far as this node knows \
                             (applied index {}); if node {from} was added while this node was down and now leads, \
                             this node can't catch up from it: stop the leader gracefully (it hands leadership to \
                             another voter), or remove this node and add it back under a new id",
                            peer.remote_ip,
                            context.handle.status().applied_index
                        ),
                    };
                    (refusal, detail)
                })?;
                sender = Some(from);
                frames.set_max_frame(codec::PEER_MAX_FRAME);
            }
            Some(first) if first != from => {
                return Err((
                    ConnectionRefusal::SenderChanged,
                    format!("a connection that spoke for node {first} now claims to be node {from}"),
                ));
            }
            Some(_) => {}
        }
        counter!(metrics::PEER_RECEIVED_BYTES, "peer" => from.to_string()).increment(frame_len);
        if envelope.raft_message.is_empty() {
            continue; // the hello
        }
        deliver(envelope, from, shared)?;
    }
}

/// Refuses an envelope from another cluster or a removed node, with a reply
/// the sender acts on.
fn reject_cluster_or_removed(
    envelope: &PeerEnvelope,
    context: &PeerContext,
) -> Option<(PeerRejection, ConnectionRefusal)> {
    let ours = context.cluster_id.load(Ordering::Acquire);
    if ours != 0 && envelope.cluster_id != ours {
        let message = format!(
            "node {} is in cluster {:016x} but node {} is in cluster {ours:016x}: it was bootstrapped with another --initial-cluster or its data dir belongs to another cluster",
            envelope.from_id, envelope.cluster_id, context.node_id
        );
        tracing::warn!(%message, "refusing a peer");
        let rejection = PeerRejection {
            reason: Reason::ClusterMismatch as i32,
            message,
        };
        return Some((rejection, ConnectionRefusal::ClusterMismatch));
    }
    if context.handle.read(|sm| sm.is_removed(envelope.from_id)) {
        let rejection = PeerRejection {
            reason: Reason::Removed as i32,
            message: format!("node {} was removed from the cluster", envelope.from_id),
        };
        return Some((rejection, ConnectionRefusal::Removed));
    }
    None
}

/// Hands a raft message that passed the addressing checks to the raft loop.
fn deliver(envelope: PeerEnvelope, from: u64, shared: &Shared) -> Result<(), Refused> {
    let context = &shared.context;
    let message = match raft::prelude::Message::parse_from_bytes(&envelope.raft_message) {
        Ok(m) => m,
        Err(e) => {
            let refusal = peer_guard::MessageRefusal::Undecodable;
            count_message_refusal(shared, from, refusal.label(), &format!("undecodable raft message: {e}"));
            return Ok(());
        }
    };
    if let Err(refusal) = peer_guard::check_addressing(&message, from, context.node_id) {
        let detail = format!("{:?} from {} to {}", message.get_msg_type(), message.from, message.to);
        count_message_refusal(shared, from, refusal.label(), &detail);
        return Ok(());
    }
    let inbox = Inbox::Raft {
        message: Box::new(message),
        from_peer_addr: envelope.from_peer_addr,
        cluster_id: envelope.cluster_id,
    };
    // The raft loop has stopped: nothing more to do here.
    let _ = context.inbox.send(inbox);
    Ok(())
}

fn count_message_refusal(shared: &Shared, from: u64, reason: &'static str, detail: &str) {
    counter!(metrics::PEER_MESSAGES_REFUSED, "reason" => reason).increment(1);
    shared.log.refused(&format!("node {from}"), reason, detail);
}
