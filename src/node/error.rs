//! What can go wrong with a request to the node, in the node's own terms.
//! The server turns these into wire errors in one place
//! (`server::wire_errors`); nothing in the node layer speaks the wire's
//! language.

/// A leader a caller can be pointed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    /// Its node id.
    pub id: u64,
    /// Its client address ("" if this node doesn't know it yet).
    pub client_addr: String,
}

/// Why the node could not do what was asked. Each variant says whether the
/// request may have taken effect: only [`Error::OutcomeUnknown`] leaves that
/// open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No leader is known; nothing was proposed.
    #[error("{0}")]
    NoLeader(String),
    /// The request must go through the leader; nothing was proposed.
    #[error("{message}")]
    NotLeader {
        /// What happened and what to do.
        message: String,
        /// The leader to retry on, when known.
        leader: Option<LeaderHint>,
    },
    /// raft dropped the proposal, or it was replaced after a leader change:
    /// it was not applied and will not be.
    #[error("{message}")]
    Dropped {
        /// What happened and what to do.
        message: String,
        /// The leader to retry on, when known.
        leader: Option<LeaderHint>,
    },
    /// The write was handed to raft, but this node can't tell whether it
    /// was (or will be) applied.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// This node is stopping; nothing was proposed.
    #[error("{0}")]
    ShuttingDown(String),
    /// This node was removed from the cluster.
    #[error("{0}")]
    Removed(String),
    /// A read did not complete in time (safe to retry).
    #[error("{0}")]
    ReadTimeout(String),
    /// Another membership change is still being applied.
    #[error("{0}")]
    ChangeInProgress(String),
    /// The node to add is already a member.
    #[error("{0}")]
    MemberExists(String),
    /// The node to remove is not a member.
    #[error("{0}")]
    UnknownNode(String),
    /// The request can't succeed as given.
    #[error("{0}")]
    Invalid(String),
    /// The raft loop is behind and refused the request; nothing was done.
    #[error("{0}")]
    Overloaded(String),
    /// raft or storage failed on this node.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The one way to say that node `id` knows no leader.
    pub fn no_leader(id: u64) -> Self {
        Error::NoLeader(format!(
            "node {id} knows no leader (an election may be under way, or a majority of voters is unreachable); retry shortly"
        ))
    }

    /// The one way to say that node `id` was removed.
    pub fn removed(id: u64) -> Self {
        Error::Removed(format!("node {id} was removed from the cluster; use another endpoint"))
    }

    /// The one way to say that this node is stopping.
    pub fn shutting_down() -> Self {
        Error::ShuttingDown("this node is shutting down; retry on another endpoint".into())
    }
}
