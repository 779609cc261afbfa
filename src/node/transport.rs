//! How the raft loop's outgoing messages leave the node: the [`Transport`]
//! trait, which the raft loop calls and never waits on. The real transport,
//! over TCP and TLS, is `server::peer::outbound::TcpTransport`, next to the
//! inbound side of the same protocol; tests plug in an in-memory network
//! instead (tests/support/memnet.rs).

use std::sync::Arc;

use raft::prelude::Message;

use super::ControlSender;

/// Who we are on the wire.
#[derive(Clone)]
pub struct LocalPeer {
    /// Our node id.
    pub id: u64,
    /// Our advertised peer address.
    pub peer_addr: String,
    /// Our data dir's incarnation (see `Member.incarnation`).
    pub incarnation: u64,
}

/// Where the raft loop's outgoing messages go. An implementation must not
/// block: it queues, and reports what it could not deliver through the inbox
/// ([`super::Inbox::Unreachable`], and [`super::Inbox::SnapshotSent`] for every snapshot
/// message). A snapshot message carries only metadata: the transport streams
/// the state with it (`storage::snapshot_stream`), and the receiver stages
/// that before it hands the message to its raft loop.
pub trait Transport: Send {
    /// Queues a message for peer `message.to` at `addr`. Returns false when
    /// it could not be queued (no address known, queue full): the caller
    /// reports the peer unreachable.
    fn send(&mut self, message: Message, addr: Option<&str>) -> bool;
    /// Stops talking to a peer no longer in the cluster.
    fn forget(&mut self, id: u64);
    /// Sets the cluster id once a joining node has learned it.
    fn set_cluster_id(&mut self, cluster_id: u64);
}

/// What a transport is built from: who we are and where to report.
pub struct TransportContext {
    /// Our id and advertised peer address.
    pub local: LocalPeer,
    /// Our cluster (0 while a joining node hasn't learned it).
    pub cluster_id: u64,
    /// Where delivery reports go (the loop's control channel: never full).
    pub reports: ControlSender,
    /// This node's state store: a snapshot message's state is streamed from
    /// the view raft pinned in it (`StateStore::take_pinned`).
    pub store: Arc<crate::storage::StateStore>,
}

/// Builds the transport once the raft loop's inbox exists.
pub type TransportFactory = Box<dyn FnOnce(TransportContext) -> Box<dyn Transport> + Send>;
