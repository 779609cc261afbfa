//! The one place where the node's errors become wire errors: the code a
//! client acts on, the message, and the leader hint.

use crate::error::WireError;
use crate::node::{Error, LeaderHint};
use crate::proto::ErrorCode;

impl From<Error> for WireError {
    fn from(error: Error) -> Self {
        let (code, leader): (ErrorCode, Option<&LeaderHint>) = match &error {
            Error::NoLeader(_) => (ErrorCode::NoLeader, None),
            Error::NotLeader { leader, .. } => (ErrorCode::NotLeader, leader.as_ref()),
            Error::Dropped { leader, .. } => (ErrorCode::ProposalDropped, leader.as_ref()),
            Error::OutcomeUnknown(_) => (ErrorCode::OutcomeUnknown, None),
            Error::ShuttingDown(_) => (ErrorCode::ShuttingDown, None),
            Error::Removed(_) => (ErrorCode::NodeRemoved, None),
            Error::ReadTimeout(_) => (ErrorCode::ReadTimeout, None),
            Error::ChangeInProgress(_) => (ErrorCode::ConfChangeInProgress, None),
            Error::MemberExists(_) => (ErrorCode::MemberExists, None),
            Error::UnknownNode(_) => (ErrorCode::UnknownNode, None),
            Error::Invalid(_) => (ErrorCode::InvalidArgument, None),
            Error::Overloaded(_) => (ErrorCode::Overloaded, None),
            Error::Internal(_) => (ErrorCode::Internal, None),
        };
        let hint = leader.cloned();
        let wire = WireError::new(code, error.to_string());
        match hint {
            Some(LeaderHint { id, client_addr }) => wire.with_leader(id, client_addr),
            None => wire,
        }
    }
}
