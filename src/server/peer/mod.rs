//! The peer protocol, both directions: [`outbound`] is the node's transport
//! (connections this node opens to its peers); the rest of this module serves
//! inbound peer connections. Each one must prove within a few seconds that it
//! speaks for a member (TLS certificate or source address, then a small hello
//! envelope) before frames larger than a few KiB are accepted from it; after
//! that it may only ever speak for that member. The checks themselves live in
//! `crate::peer_guard`; this module feeds them and acts on their verdict.
//!
//! - `slots`: how many connections may be open, and for how long.
//! - `standing`: who is a member, and from which addresses.

pub mod outbound;
mod slots;
mod snapshot;
mod standing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
use crate::peer_guard::{self, ConnectionRefusal, PeerConnection, RefusalLog};
use crate::proto::{peer_rejection::Reason, PeerEnvelope, PeerRejection};
use crate::tls::server::PeerTls;
use slots::{PendingSlot, PendingSlots, Sessions};
use standing::Members;

/// TLS handshake and hello must be done within this.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// A member's connection silent this long is closed (the member reconnects
/// when it next has something to say); a half-open connection left by a
/// crashed host doesn't hold its session forever.
const SESSION_IDLE: Duration = Duration::from_secs(300);
/// A refusal for the same (peer, reason) is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(300);

/// What a peer connection needs.
#[derive(Clone)]
pub struct PeerContext {
    /// This node.
    pub node_id: u64,
    /// The raft loop's inbox.
    pub inbox: crate::node::InboxSender,
    /// For membership and the cluster id (0 while a joining node waits).
    pub handle: NodeHandle,
    /// Peer TLS, if on.
    pub tls: Option<Arc<PeerTls>>,
}

/// State shared by every inbound peer connection.
struct Shared {
    context: PeerContext,
    members: Members,
    pending: Arc<PendingSlots>,
    sessions: Arc<Sessions>,
    snapshot_streams: Arc<slots::SnapshotStreams>,
    log: RefusalLog,
}

/// Accepts peer connections until `stop` turns true.
pub async fn serve(listener: TcpListener, context: PeerContext, mut stop: watch::Receiver<bool>) {
    let shared = Arc::new(Shared {
        members: Members::new(context.handle.clone()),
        context,
        pending: Arc::default(),
        sessions: Arc::default(),
        snapshot_streams: Arc::default(),
        log: RefusalLog::new("refused peer input", LOG_EVERY),
    });
    let mut acceptor = Acceptor::new(listener, "peer");
    loop {
        let (stream, remote) = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = acceptor.accept() => accepted,
        };
        // Only worth a lookup when strangers have filled their share.
        let member_address = shared.pending.strangers_full() && shared.members.is_member_address(remote.ip()).await;
        let Some(slot) = shared.pending.take(remote.ip(), member_address) else {
            let detail = format!("too many pending peer connections; refused {remote}");
            shared.refuse(ConnectionRefusal::TooManyConnections, &detail);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err((refusal, detail)) = connection(stream, remote, slot, &shared).await {
                shared.refuse(refusal, &detail);
            }
        });
    }
}

impl Shared {
    /// Counts a refused connection and logs it (by reason: strangers may
    /// come from ever new addresses).
    fn refuse(&self, refusal: ConnectionRefusal, detail: &str) {
        counter!(metrics::PEER_CONNECTIONS_REFUSED, "reason" => refusal.label()).increment(1);
        self.log.refused("peer port", refusal.label(), detail);
    }
}

pub(super) type Refused = (ConnectionRefusal, String);

/// Serves one inbound connection; an error says why it was refused.
async fn connection(stream: TcpStream, remote: SocketAddr, slot: PendingSlot, shared: &Shared) -> Result<(), Refused> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let Some(tls) = &shared.context.tls else {
        let peer = PeerConnection {
            remote_ip: peer_guard::canonical(remote.ip()),
            certified_node: None,
            tls: false,
        };
        return serve_frames(stream, peer, deadline, slot, shared).await;
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
    let node = match crate::tls::leaf_certificate(stream.get_ref().1).map(crate::tls::files::node_identity) {
        Some(Ok(node)) => node,
        Some(Err(what)) => {
            return Err((
                ConnectionRefusal::NotANodeCertificate,
                format!("{remote} presented {what}"),
            ))
        }
        None => {
            return Err((
                ConnectionRefusal::NotANodeCertificate,
                format!("{remote} presented no certificate"),
            ))
        }
    };
    let peer = PeerConnection {
        remote_ip: peer_guard::canonical(remote.ip()),
        certified_node: Some(node),
        tls: true,
    };
    serve_frames(stream, peer, deadline, slot, shared).await
}

/// Reads envelopes: the first must arrive by `hello_deadline` and name a
/// sender the connection may speak for; every later one must name the same.
async fn serve_frames<S>(
    stream: S,
    peer: PeerConnection,
    hello_deadline: tokio::time::Instant,
    slot: PendingSlot,
    shared: &Shared,
) -> Result<(), Refused>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let context = &shared.context;
    let (read_half, write_half) = tokio::io::split(stream);
    let mut frames = FrameReader::new(BufReader::new(read_half), codec::PEER_PREAUTH_MAX_FRAME);
    let mut replies = tokio_util::codec::FramedWrite::new(write_half, codec::codec(codec::PEER_PREAUTH_MAX_FRAME));

    // The hello (or whatever comes first) names the sender.
    let first = match tokio::time::timeout_at(hello_deadline, frames.next_frame()).await {
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err((ConnectionRefusal::NoHello, format!("{}: {e}", peer.remote_ip))),
        Err(_) => {
            return Err((
                ConnectionRefusal::NoHello,
                format!("{} sent no hello in time", peer.remote_ip),
            ))
        }
    };
    let Ok(hello) = PeerEnvelope::decode(first.clone()) else {
        return Err((
            ConnectionRefusal::NoHello,
            format!("{} sent a frame that is not a peer envelope", peer.remote_ip),
        ));
    };
    let sender = hello.from_id;
    if let Some((rejection, refusal)) = reject_cluster_or_removed(&hello, context) {
        let _ = replies.send(codec::encode(&rejection)).await;
        return Err((refusal, rejection.message));
    }
    let admitted_while_joining = admit(sender, &peer, shared).await?;
    drop(slot);
    if hello.snapshot_stream {
        // One stream at a time per sender; it does not replace the sender's
        // raft session.
        let Some(_stream) = shared.snapshot_streams.start(sender) else {
            return Err((
                ConnectionRefusal::TooManyConnections,
                format!("node {sender} opened a second snapshot stream while one is running"),
            ));
        };
        return snapshot::receive(&mut frames, &mut replies, sender, shared).await;
    }
    // Proven: no longer pending, but this node's one session.
    let session = shared.sessions.start(sender);
    frames.set_max_frame(codec::PEER_MAX_FRAME);
    // Admitted while this node knew no members: checked again, in full, once
    // it knows them.
    let mut recheck = admitted_while_joining;

    let mut next = Some(first);
    loop {
        let frame = match next.take() {
            Some(frame) => frame,
            None => {
                let read = tokio::select! {
                    read = tokio::time::timeout(SESSION_IDLE, frames.next_frame()) => read,
                    _ = session.superseded() => {
                        debug!(node = sender, "a newer connection from this peer replaces this one");
                        return Ok(());
                    }
                };
                match read {
                    Ok(Ok(Some(frame))) => frame,
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Err(e)) => {
                        debug!(node = sender, error = %e, "peer connection closed");
                        return Ok(());
                    }
                    Err(_) => {
                        debug!(node = sender, "idle peer connection closed");
                        return Ok(());
                    }
                }
            }
        };
        let frame_len = frame.len() as u64 + 4;
        let Ok(envelope) = PeerEnvelope::decode(frame) else {
            return Err((
                ConnectionRefusal::SenderChanged,
                format!("node {sender} sent a frame that is not a peer envelope"),
            ));
        };
        if envelope.from_id != sender {
            return Err((
                ConnectionRefusal::SenderChanged,
                format!(
                    "a connection that spoke for node {sender} now claims to be node {}",
                    envelope.from_id
                ),
            ));
        }
        if let Some((rejection, refusal)) = reject_cluster_or_removed(&envelope, context) {
            let _ = replies.send(codec::encode(&rejection)).await;
            return Err((refusal, rejection.message));
        }
        if recheck {
            let standing = shared.members.standing(sender, !peer.tls).await;
            if !standing.joining {
                admit(sender, &peer, shared).await?;
                recheck = false;
            }
        }
        counter!(metrics::PEER_RECEIVED_BYTES, "peer" => sender.to_string()).increment(frame_len);
        if envelope.raft_message.is_empty() {
            continue; // the hello
        }
        deliver(envelope, sender, peer.certified_node.is_some(), shared);
    }
}

/// Checks that the connection may speak for `sender`. Returns whether it was
/// let in only because this node is still waiting to join.
async fn admit(sender: u64, peer: &PeerConnection, shared: &Shared) -> Result<bool, Refused> {
    let standing = shared.members.standing(sender, !peer.tls).await;
    peer_guard::check_sender(sender, peer, &standing).map_err(|refusal| {
        let detail = match refusal {
            ConnectionRefusal::AddressMismatch => format!(
                "a connection from {} claims to be node {sender}, whose peer address resolves to {:?}; \
                 if node {sender} really connects from there, turn peer TLS on (certificates then identify nodes instead of addresses)",
                peer.remote_ip, standing.member_ips
            ),
            ConnectionRefusal::CertificateMismatch => format!(
                "a connection whose certificate names node {:?} claims to be node {sender}",
                peer.certified_node
            ),
            _ => format!(
                "a connection from {} claims to be node {sender}, not a member as far as this node knows \
                 (applied index {}); if node {sender} was added while this node was down and now leads, \
                 this node can't catch up from it: stop the leader gracefully (it hands leadership to \
                 another voter), or remove this node and add it back under a new id",
                peer.remote_ip,
                shared.members.applied_index()
            ),
        };
        (refusal, detail)
    })?;
    Ok(standing.joining)
}

/// Refuses an envelope from another cluster or a removed node, with a reply
/// the sender acts on.
fn reject_cluster_or_removed(
    envelope: &PeerEnvelope,
    context: &PeerContext,
) -> Option<(PeerRejection, ConnectionRefusal)> {
    let ours = context.handle.cluster_id();
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
    let recorded = context.handle.member_incarnation(envelope.from_id);
    if recorded != 0 && envelope.from_incarnation != 0 && envelope.from_incarnation != recorded {
        let message = format!(
            "node {}'s data dir is not the one it ran on before (incarnation {:016x}, the cluster knows {recorded:016x}): \
             it was wiped or replaced, and has forgotten entries it acknowledged and votes it cast",
            envelope.from_id, envelope.from_incarnation
        );
        tracing::warn!(%message, "refusing a peer");
        let rejection = PeerRejection {
            reason: Reason::ReplacedDataDir as i32,
            message,
        };
        return Some((rejection, ConnectionRefusal::ReplacedDataDir));
    }
    if context.handle.is_removed(envelope.from_id) {
        let rejection = PeerRejection {
            reason: Reason::Removed as i32,
            message: format!("node {} was removed from the cluster", envelope.from_id),
        };
        return Some((rejection, ConnectionRefusal::Removed));
    }
    None
}

/// Hands a raft message that passed the addressing checks to the raft loop.
fn deliver(envelope: PeerEnvelope, from: u64, certified: bool, shared: &Shared) {
    let context = &shared.context;
    let message = match raft::prelude::Message::parse_from_bytes(&envelope.raft_message) {
        Ok(m) => m,
        Err(e) => {
            let refusal = peer_guard::MessageRefusal::Undecodable;
            count_message_refusal(shared, from, refusal.label(), &format!("undecodable raft message: {e}"));
            return;
        }
    };
    if let Err(refusal) = peer_guard::check_addressing(&message, from, context.node_id) {
        let detail = format!("{:?} from {} to {}", message.get_msg_type(), message.from, message.to);
        count_message_refusal(shared, from, refusal.label(), &detail);
        return;
    }
    let inbox = Inbox::Raft {
        message: Box::new(message),
        sender: from,
        from_peer_addr: envelope.from_peer_addr,
        cluster_id: envelope.cluster_id,
        certified,
    };
    // A full inbox drops the message (raft retransmits); if the raft loop
    // has stopped, the node is going down anyway. Never block this task.
    if let Err(std::sync::mpsc::TrySendError::Full(_)) = context.inbox.try_send(inbox) {
        crate::metrics::inbox_full();
    }
}

fn count_message_refusal(shared: &Shared, from: u64, reason: &'static str, detail: &str) {
    counter!(metrics::PEER_MESSAGES_REFUSED, "reason" => reason).increment(1);
    shared.log.refused(&format!("node {from}"), reason, detail);
}
