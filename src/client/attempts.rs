//! What the attempts of one call saw, so that the error shown when the call
//! gives up is the most informative one, not merely the last: a node that
//! answered "no leader" (the cluster has no quorum) says more than a refused
//! connection (that node is down), which says more than silence.

use std::time::Duration;

use crate::error::Error;

/// The attempts of one call so far.
#[derive(Debug)]
pub(super) struct Attempts {
    endpoints: Vec<String>,
    /// The endpoint that last answered "no leader": alive, but it knows none.
    no_leader: Option<String>,
    /// Connection refusals since anything else happened.
    refused_in_a_row: usize,
    /// The last failure of any other kind.
    last: Option<String>,
}

impl Attempts {
    /// A call that will try `endpoints`.
    pub(super) fn new(endpoints: Vec<String>) -> Self {
        Attempts {
            endpoints,
            no_leader: None,
            refused_in_a_row: 0,
            last: None,
        }
    }

    /// `endpoint` answered that it knows no leader.
    pub(super) fn no_leader(&mut self, endpoint: &str) {
        // The latest: the situation as it is now.
        self.no_leader = Some(endpoint.to_string());
        self.refused_in_a_row = 0;
    }

    /// Nothing listens at `endpoint`.
    pub(super) fn refused(&mut self, endpoint: &str, error: &str) {
        self.refused_in_a_row += 1;
        self.last = Some(format!("{endpoint}: {error}"));
    }

    /// Any other failure that leaves the call free to try again.
    pub(super) fn failed(&mut self, endpoint: &str, what: &str) {
        self.refused_in_a_row = 0;
        self.last = Some(format!("{endpoint}: {what}"));
    }

    /// True once every endpoint refused the connection twice running: nothing
    /// listens anywhere, and waiting out the deadline would only hide that.
    /// (Twice, so a node that is just restarting gets a second chance.)
    pub(super) fn nothing_listens(&self) -> bool {
        self.no_leader.is_none() && self.refused_in_a_row >= 2 * self.endpoints.len().max(1)
    }

    /// The error to report: no leader, then nothing listening, then the last
    /// failure with the deadline that ran out.
    pub(super) fn into_error(self, timeout: Duration) -> Error {
        let endpoints = self.endpoints.join(",");
        if let Some(answered) = self.no_leader {
            return Error::NoLeader { answered };
        }
        if self.nothing_listens() {
            return Error::NothingListening { endpoints };
        }
        Error::Unavailable {
            timeout,
            endpoints,
            last: self.last.unwrap_or_else(|| "no attempt finished".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Attempts {
        Attempts::new(vec!["a:1".into(), "b:2".into()])
    }

    #[test]
    fn no_leader_beats_a_later_refusal_and_timeout() {
        let mut attempts = two();
        attempts.no_leader("a:1");
        attempts.no_leader("b:2");
        attempts.refused("a:1", "Connection refused");
        attempts.failed("b:2", "no reply");
        let err = attempts.into_error(Duration::from_secs(5)).to_string();
        assert!(err.contains("no leader (b:2 answered but knows none)"), "{err}");
        assert!(!err.contains("Connection refused"), "{err}");
    }

    #[test]
    fn every_endpoint_refusing_twice_means_nothing_listens() {
        let mut attempts = two();
        for _ in 0..3 {
            attempts.refused("a:1", "Connection refused");
            assert!(!attempts.nothing_listens());
        }
        attempts.refused("b:2", "Connection refused");
        assert!(attempts.nothing_listens());
        let err = attempts.into_error(Duration::from_secs(5)).to_string();
        assert!(err.contains("nothing is listening at a:1,b:2"), "{err}");

        let mut attempts = two();
        for _ in 0..3 {
            attempts.refused("a:1", "Connection refused");
        }
        attempts.failed("b:2", "no reply");
        attempts.refused("a:1", "Connection refused");
        assert!(!attempts.nothing_listens(), "a live endpoint resets the count");
        let err = attempts.into_error(Duration::from_secs(5)).to_string();
        assert!(err.starts_with("no answer within 5s"), "{err}");
    }
}
