//! Requests waiting inside the raft loop: proposals until their entry is
//! applied, reads until their ReadIndex round completes. Every waiter has a
//! deadline, so nothing hangs when raft drops a message silently.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use tokio::sync::oneshot;

use super::Error;
use crate::metrics;
use crate::state_machine::ApplyResult;

type ProposalReply = oneshot::Sender<Result<ApplyResult, Error>>;
/// What waits on a read-index round: a read (sent the index), or an answer
/// that may go out only once the round confirms this node leads.
type ReadReply = Box<dyn FnOnce(Result<u64, Error>) + Send>;

struct PendingProposal {
    reply: ProposalReply,
    /// The client request's span, for the "committed" and "applied" events.
    span: tracing::Span,
    proposed_at: Instant,
    deadline: Instant,
    /// The log index, when this node was leader and appended the entry itself.
    index: Option<u64>,
}

/// Proposals in flight, keyed by the proposal id carried in the entry context.
pub struct Proposals {
    next_id: u64,
    waiting: HashMap<u64, PendingProposal>,
    by_index: BTreeMap<u64, u64>,
}

impl Proposals {
    /// Starts ids at a random point so that entries proposed before a restart
    /// (still in the log, committed later) can't be taken for new proposals.
    pub fn new() -> Self {
        Proposals {
            next_id: rand::random::<u64>() >> 1,
            waiting: HashMap::new(),
            by_index: BTreeMap::new(),
        }
    }

    /// A fresh proposal id.
    pub fn next_id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.next_id
    }

    /// Starts waiting for a proposal.
    pub fn insert(
        &mut self,
        id: u64,
        reply: ProposalReply,
        deadline: Instant,
        index: Option<u64>,
        span: tracing::Span,
    ) {
        if let Some(index) = index {
            self.by_index.insert(index, id);
        }
        self.waiting.insert(
            id,
            PendingProposal {
                reply,
                span,
                proposed_at: Instant::now(),
                deadline,
                index,
            },
        );
    }

    /// Number of proposals waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Notes that a proposal's entry is committed (for the commit latency).
    pub fn committed(&self, id: u64) {
        if let Some(p) = self.waiting.get(&id) {
            tracing::debug!(parent: &p.span, "committed");
            metrics::observe(metrics::COMMIT_LATENCY, p.proposed_at.elapsed());
        }
    }

    /// Answers a proposal (if it is still waiting) with its applied result.
    pub fn complete(&mut self, id: u64, result: Result<ApplyResult, Error>) {
        if let Some(p) = self.waiting.remove(&id) {
            if let Some(index) = p.index {
                self.by_index.remove(&index);
            }
            if result.is_ok() {
                tracing::debug!(parent: &p.span, "applied");
                metrics::observe(metrics::APPLY_LATENCY, p.proposed_at.elapsed());
            }
            let _ = p.reply.send(result);
        }
    }

    fn fail(&mut self, id: u64, reason: &'static str, error: Error) {
        if self.waiting.contains_key(&id) {
            metrics::proposal_failed(reason);
            self.complete(id, Err(error));
        }
    }

    /// Called for every applied entry: a proposal this node appended at `index`
    /// whose entry was replaced by another (`applied_id` is not its id) was lost
    /// to a leader change and will never apply, so it fails as retryable.
    pub fn entry_applied(&mut self, index: u64, applied_id: Option<u64>) {
        if let Some(id) = self.by_index.remove(&index) {
            if applied_id != Some(id) {
                let error = Error::Dropped {
                    message: format!(
                        "the proposal at index {index} was replaced after a leader change and was not applied; retry"
                    ),
                    leader: None,
                };
                self.fail(id, "dropped", error);
            }
        }
    }

    /// Fails proposals past their deadline: their outcome is unknown.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let error = Error::OutcomeUnknown(
                "the write was not applied within the node's request timeout (it may be later)".into(),
            );
            self.fail(id, "timeout", error);
        }
    }

    /// Fails every proposal this node forwarded to a leader (those without a
    /// known index): after a leader change we can't tell whether they will
    /// ever be applied.
    pub fn fail_forwarded(&mut self, why: &str) {
        let forwarded: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, p)| p.index.is_none())
            .map(|(id, _)| *id)
            .collect();
        for id in forwarded {
            self.fail(id, "leader_changed", Error::OutcomeUnknown(why.into()));
        }
    }

    /// Fails everything with this error, counted under `reason`.
    pub fn fail_all(&mut self, reason: &'static str, error: Error) {
        self.by_index.clear();
        for (_, p) in self.waiting.drain() {
            metrics::proposal_failed(reason);
            let _ = p.reply.send(Err(error.clone()));
        }
    }
}

impl Default for Proposals {
    fn default() -> Self {
        Self::new()
    }
}

/// Linearizable reads: new ones gather into a batch that shares one ReadIndex
/// round; rounds in flight are keyed by their context, which must be unique
/// across the cluster: the leader ignores a context it already has pending,
/// and followers forward theirs to it.
pub struct Reads {
    node_id: u64,
    next_ctx: u64,
    batch: Vec<ReadReply>,
    rounds: HashMap<Vec<u8>, (Vec<ReadReply>, Instant)>,
}

impl Reads {
    /// Read rounds of this node.
    pub fn new(node_id: u64) -> Self {
        Reads {
            node_id,
            // Random start: contexts from before a restart may still be pending.
            next_ctx: rand::random::<u64>() >> 1,
            batch: Vec::new(),
            rounds: HashMap::new(),
        }
    }

    /// Queues a read for the next round.
    pub fn push(&mut self, reply: oneshot::Sender<Result<u64, Error>>) {
        self.batch.push(Box::new(move |index| {
            let _ = reply.send(index);
        }));
    }

    /// Queues `then` for the next round: it runs with the round's outcome
    /// (the index once confirmed, or why not).
    pub fn push_confirmation(&mut self, then: impl FnOnce(Result<u64, Error>) + Send + 'static) {
        self.batch.push(Box::new(then));
    }

    /// Takes the queued reads as one round with a fresh context, if any.
    pub fn start_round(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        if self.batch.is_empty() {
            return None;
        }
        self.next_ctx = self.next_ctx.wrapping_add(1);
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.node_id.to_be_bytes());
        ctx.extend_from_slice(&self.next_ctx.to_be_bytes());
        self.rounds
            .insert(ctx.clone(), (std::mem::take(&mut self.batch), deadline));
        Some(ctx)
    }

    /// Answers every read of a completed round.
    pub fn complete(&mut self, ctx: &[u8], index: u64) {
        if let Some((replies, _)) = self.rounds.remove(ctx) {
            for r in replies {
                r(Ok(index));
            }
        }
    }

    /// Number of reads waiting.
    pub fn len(&self) -> usize {
        self.batch.len() + self.rounds.values().map(|(r, _)| r.len()).sum::<usize>()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fails rounds past their deadline (reads are safe to retry).
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<Vec<u8>> = self
            .rounds
            .iter()
            .filter(|(_, (_, d))| *d <= now)
            .map(|(c, _)| c.clone())
            .collect();
        for ctx in expired {
            if let Some((replies, _)) = self.rounds.remove(&ctx) {
                for r in replies {
                    r(Err(Error::ReadTimeout(
                        "the read index round did not complete in time (leader change or lost quorum); retry".into(),
                    )));
                }
            }
        }
    }

    /// Fails every waiting read with this error.
    pub fn fail_all(&mut self, error: Error) {
        let rounds = self.rounds.drain().flat_map(|(_, (r, _))| r);
        for r in self.batch.drain(..).chain(rounds) {
            r(Err(error.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_replaced_entry_fails_its_proposal_as_retryable() {
        let mut p = Proposals::new();
        let (tx, mut rx) = oneshot::channel();
        let id = p.next_id();
        p.insert(
            id,
            tx,
            Instant::now() + Duration::from_secs(5),
            Some(7),
            tracing::Span::none(),
        );
        p.entry_applied(7, Some(id + 1));
        let err = rx.try_recv().unwrap().unwrap_err();
        assert!(matches!(err, Error::Dropped { .. }), "{err:?}");
        assert!(p.is_empty());
    }

    #[test]
    fn the_matching_entry_leaves_the_proposal_to_complete() {
        let mut p = Proposals::new();
        let (tx, mut rx) = oneshot::channel();
        let id = p.next_id();
        p.insert(
            id,
            tx,
            Instant::now() + Duration::from_secs(5),
            Some(7),
            tracing::Span::none(),
        );
        p.entry_applied(7, Some(id));
        assert_eq!(p.len(), 1);
        p.complete(id, Ok(ApplyResult::Set { revision: 7 }));
        assert_eq!(rx.try_recv().unwrap().unwrap(), ApplyResult::Set { revision: 7 });
    }

    #[test]
    fn expired_proposals_fail_with_an_unknown_outcome() {
        let mut p = Proposals::new();
        let (tx, mut rx) = oneshot::channel();
        let id = p.next_id();
        let now = Instant::now();
        p.insert(id, tx, now, None, tracing::Span::none());
        p.expire(now + Duration::from_millis(1));
        let err = rx.try_recv().unwrap().unwrap_err();
        assert!(matches!(err, Error::OutcomeUnknown(_)), "{err:?}");
    }

    #[test]
    fn read_contexts_differ_across_nodes() {
        let deadline = Instant::now() + Duration::from_secs(1);
        let (mut a, mut b) = (Reads::new(1), Reads::new(2));
        a.next_ctx = 7;
        b.next_ctx = 7;
        a.push(oneshot::channel().0);
        b.push(oneshot::channel().0);
        assert_ne!(a.start_round(deadline), b.start_round(deadline));
    }

    #[test]
    fn reads_batch_into_one_round() {
        let mut r = Reads::new(1);
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        r.push(a);
        r.push(b);
        let deadline = Instant::now() + Duration::from_secs(1);
        let ctx = r.start_round(deadline).unwrap();
        assert!(r.start_round(deadline).is_none(), "no reads, no round");
        r.complete(&ctx, 42);
        assert_eq!(ra.try_recv().unwrap().unwrap(), 42);
        assert_eq!(rb.try_recv().unwrap().unwrap(), 42);
        assert!(r.is_empty());
    }
}
