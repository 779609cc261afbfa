//! Errors, typed by who must act on them.
//!
//! The client sees [`Error`]. On the wire an error is a [`proto::Error`] with a
//! [`proto::ErrorCode`]; [`WireError`] helps the server build one.

use std::time::Duration;

use crate::proto::{self, ErrorCode};

/// What a [`crate::Client`] call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong (empty key, value too large, bad address,
    /// unknown node...). Retrying it unchanged fails the same way.
    #[error("{0}")]
    InvalidArgument(String),
    /// The server answered with an error that the client does not retry.
    #[error("{message} ({code:?})")]
    Server {
        /// What went wrong.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// A write's outcome is unknown: it may or may not have been applied. A set
    /// or delete gets this only when the deadline passed after an attempt that
    /// may have been applied (the client retries them in its session until
    /// then); a membership change, as soon as one attempt's outcome is unknown.
    #[error("outcome unknown: {0}; it may or may not have been applied: read the key to find out")]
    OutcomeUnknown(String),
    /// Live nodes answered, but none knows a leader: the cluster has no
    /// quorum. Nothing was proposed.
    #[error("the cluster has no leader ({answered} answered but knows none), so nothing was done: a majority of the voters is down or can't reach the others. Check which nodes run (`kvraft endpoint status` works without a leader) and their logs")]
    NoLeader {
        /// The endpoint that said so last.
        answered: String,
    },
    /// Every endpoint refused the connection: no node listens there.
    #[error("nothing is listening at {endpoints} (connection refused): start the nodes, or fix --endpoints (or KVRAFT_ENDPOINTS)")]
    NothingListening {
        /// The endpoints tried.
        endpoints: String,
    },
    /// No endpoint answered usefully before the deadline.
    #[error("no answer within {timeout:?} from {endpoints}: {last}; check that the nodes are running and that a majority of them can reach each other")]
    Unavailable {
        /// The deadline that ran out.
        timeout: Duration,
        /// The endpoints that were tried.
        endpoints: String,
        /// The last error seen.
        last: String,
    },
    /// The server sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// TLS settings or certificates don't fit the server (wrong CA, name
    /// mismatch, missing client certificate, TLS to a plaintext port or the
    /// reverse). The message says which and what to change.
    #[error("TLS: {0}")]
    Tls(String),
    /// The client's identity lacks the role the request needs; nothing was
    /// changed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The lease named does not exist (it expired or was revoked); nothing
    /// was changed.
    #[error("{0}")]
    LeaseNotFound(String),
}

impl Error {
    /// The process exit status the CLI uses for this error: 2 for what the
    /// user must fix (input, TLS settings), 3 for cluster or network trouble,
    /// 5 for a request the identity may not make, 1 for a lease that is gone
    /// (0 success, 1 key not found and 4 compare failed are decided
    /// elsewhere).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::InvalidArgument(_) | Error::Tls(_) => 2,
            Error::PermissionDenied(_) => 5,
            Error::LeaseNotFound(_) => 1,
            Error::Server { code, .. } if is_callers_fault(*code) => 2,
            _ => 3,
        }
    }
}

/// True for codes the caller must fix: retrying the same request can't help.
pub fn is_callers_fault(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::InvalidArgument
            | ErrorCode::MalformedRequest
            | ErrorCode::FrameTooLarge
            | ErrorCode::UnknownNode
            | ErrorCode::MemberExists
    )
}

/// True for codes that guarantee nothing was applied, so any request may be
/// sent again.
pub fn is_retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::NoLeader
            | ErrorCode::NotLeader
            | ErrorCode::ProposalDropped
            | ErrorCode::ConfChangeInProgress
            | ErrorCode::ShuttingDown
            | ErrorCode::ReadTimeout
            | ErrorCode::IdleClosed
            | ErrorCode::Overloaded
            | ErrorCode::NodeRemoved
    )
}

/// A server-side error about to be put on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    /// The code the client acts on.
    pub code: ErrorCode,
    /// One line that says what was wrong and what to do.
    pub message: String,
    /// The leader as this node knows it, when useful.
    pub leader_id: u64,
    /// That leader's client address, when known.
    pub leader_client_addr: String,
}

impl WireError {
    /// An error with no leader hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
            leader_id: 0,
            leader_client_addr: String::new(),
        }
    }

    /// Shorthand for [`ErrorCode::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// Adds the leader hint.
    pub fn with_leader(mut self, leader_id: u64, leader_client_addr: String) -> Self {
        self.leader_id = leader_id;
        self.leader_client_addr = leader_client_addr;
        self
    }
}

impl From<WireError> for proto::Error {
    fn from(e: WireError) -> Self {
        proto::Error {
            code: e.code as i32,
            message: e.message,
            leader_id: e.leader_id,
            leader_client_addr: e.leader_client_addr,
        }
    }
}
