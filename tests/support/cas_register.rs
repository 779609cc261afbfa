//! Linearizability checker for compare-and-swap registers whose successful
//! swaps each write a value never written before on that key.
//!
//! The general search in `linearizability.rs` is exponential in the worst
//! case. Here, uniqueness of written values makes the check exact and close
//! to linear: a value names the one swap that wrote it, so the successful
//! swaps form a single chain, each expecting the value the previous one
//! wrote, and all that is left is to check that real time allows that order.
//!
//! The model is a map of independent registers keyed by `Vec<u8>`, each
//! initially absent (`None`). Keys are checked one by one ([`check`]). On a
//! key:
//!
//! * A `Swap { expect, new }` atomically checks that the register holds
//!   `expect` and sets it to `new`. Record a swap only if it succeeded
//!   (`complete: Some`) or its outcome is unknown (`complete: None`: it may
//!   have taken effect at any time after `invoke`, or never).
//! * A swap that failed because the register held some other value is, as far
//!   as the register is concerned, a read of that value: record it as a
//!   `Read` ([`Op::failed_swap`]). A failure that reports nothing is dropped.
//! * A `Read` returned a value. Reads whose outcome is unknown carry no
//!   information and are ignored.
//!
//! The precondition: no two recorded swaps of a key write the same `new`
//! value. A plain counter breaks it (two clients whose swaps `3 -> 4` have
//! unknown outcomes), so tag values with the client and a sequence number,
//! e.g. `"4:client2:17"`; the counter can still be read from the prefix, and
//! [`KeySummary::swaps`] says how many increments took effect.
//!
//! Time convention (the same as `linearizability.rs`): timestamps are ticks of
//! one clock shared by all clients ([`Clock`]); an op takes effect at some
//! instant `t` with `invoke <= t <= complete`, both ends included, and ops that
//! take effect at the same instant may be ordered either way. So two ops are
//! ordered by real time only when one completes strictly before the other is
//! invoked, intervals that share an endpoint overlap, and every constraint
//! below is a non-strict inequality between integer timestamps: no scaling or
//! tie-breaking ranks are needed.

// Not every integration test uses every item of this support module.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// What an operation did, with what it returned for reads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// The value the read returned (`None`: the key was absent).
    Read(Option<Vec<u8>>),
    /// Set the key to `new` if it held `expect` (`None`: absent).
    Swap { expect: Option<Vec<u8>>, new: Vec<u8> },
}

/// One client operation on one key, with its real-time interval.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Op {
    pub key: Vec<u8>,
    pub kind: OpKind,
    /// When the client issued the request (any monotonic ticks).
    pub invoke: u64,
    /// When the client got the reply; `None` if the outcome is unknown (the
    /// op may take effect at any time after `invoke`, or not at all).
    pub complete: Option<u64>,
}

impl Op {
    /// A read that completed and returned `result`.
    pub fn read(key: impl Into<Vec<u8>>, result: Option<Vec<u8>>, invoke: u64, complete: u64) -> Self {
        Op {
            key: key.into(),
            kind: OpKind::Read(result),
            invoke,
            complete: Some(complete),
        }
    }

    /// A swap that succeeded (`complete: Some`) or whose outcome is unknown
    /// (`complete: None`). Never a swap known to have failed: see
    /// [`Op::failed_swap`].
    pub fn swap(
        key: impl Into<Vec<u8>>,
        expect: Option<Vec<u8>>,
        new: impl Into<Vec<u8>>,
        invoke: u64,
        complete: Option<u64>,
    ) -> Self {
        let kind = OpKind::Swap {
            expect,
            new: new.into(),
        };
        Op {
            key: key.into(),
            kind,
            invoke,
            complete,
        }
    }

    /// A swap that failed because the register held `current`: it changed
    /// nothing and observed `current`, so it is recorded as a read of it.
    pub fn failed_swap(key: impl Into<Vec<u8>>, current: Option<Vec<u8>>, invoke: u64, complete: u64) -> Self {
        Op::read(key, current, invoke, complete)
    }

    fn is_unknown_swap(&self) -> bool {
        matches!(self.kind, OpKind::Swap { .. }) && self.complete.is_none()
    }
}

/// A value for messages: quoted and escaped, or `absent`.
fn show(value: Option<&[u8]>) -> String {
    match value {
        Some(v) => format!("\"{}\"", v.escape_ascii()),
        None => "absent".to_string(),
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.key.escape_ascii();
        match &self.kind {
            OpKind::Read(r) => write!(f, "read \"{key}\" -> {}", show(r.as_deref()))?,
            OpKind::Swap { expect, new } => write!(
                f,
                "swap \"{key}\" {} -> {}",
                show(expect.as_deref()),
                show(Some(new.as_slice()))
            )?,
        }
        match self.complete {
            Some(c) => write!(f, " @ [{}, {c}]", self.invoke),
            None => write!(f, " @ [{}, unknown]", self.invoke),
        }
    }
}

// The history checkers share one clock.
#[path = "clock.rs"]
mod clock;
pub use clock::Clock;

/// What a valid history says about each key, so that tests can assert on
/// it (e.g. that a counter's final value is the number of swaps).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CasSummary {
    /// Every key with at least one checked op, in byte order.
    pub keys: BTreeMap<Vec<u8>, KeySummary>,
}

impl CasSummary {
    /// The summary of `key`, if the history had ops on it.
    pub fn key(&self, key: impl AsRef<[u8]>) -> Option<&KeySummary> {
        self.keys.get(key.as_ref())
    }
}

/// The one order of successful swaps on a key that the history allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySummary {
    /// The values the register held after its initial absence, in order:
    /// the `new` values of the swaps that took effect.
    pub chain: Vec<Vec<u8>>,
    /// Swaps that completed successfully (all of them are in the chain).
    pub known_swaps: usize,
    /// Swaps of unknown outcome that took effect: their value was observed.
    pub unknown_swaps_included: usize,
    /// Swaps of unknown outcome left out: nothing observed their value, so
    /// they may as well never have happened.
    pub unknown_swaps_left_out: usize,
    /// Completed reads (including failed swaps) checked.
    pub reads: usize,
}

impl KeySummary {
    /// How many swaps took effect (known and unknown-outcome ones).
    pub fn swaps(&self) -> usize {
        self.chain.len()
    }

    /// The register's value at the end of the history.
    pub fn final_value(&self) -> Option<&[u8]> {
        self.chain.last().map(Vec::as_slice)
    }
}

/// Why a history is not linearizable (or cannot be checked): the first
/// key, in byte order, that breaks. Its `Debug` form is the readable
/// `Display` one, so that `unwrap()` and `{:?}` print a useful report.
#[derive(Clone, PartialEq, Eq)]
pub struct CasViolation {
    pub key: Vec<u8>,
    /// Boxed: the ops it names make it large, and `Result`s carry it.
    pub kind: Box<ViolationKind>,
}

/// What broke on the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    /// Two swaps write the same value: the checker's precondition is broken
    /// (a bug in the test, not necessarily in the server).
    DuplicateValue { first: Op, second: Op },
    /// Two swaps expected the same value and both took effect (each either
    /// completed or had its value observed): a lost update.
    Fork { at: Option<Vec<u8>>, first: Op, second: Op },
    /// A swap took effect (or its value was observed) although it expected a
    /// value the register never held: no chain of swaps from the initial
    /// absent value leads to it.
    Unreachable { op: Op },
    /// A read returned a value that no swap wrote.
    UnwrittenRead { op: Op },
    /// The chain's order contradicts real time at `position` (1-based; the
    /// swap `writer` wrote the register's `position`-th value): `writer`
    /// cannot take effect before `after` was invoked, yet must take effect
    /// before `before` completed, which happened earlier.
    RealTime {
        position: usize,
        writer: Op,
        after: Op,
        before: Op,
    },
}

impl fmt::Display for CasViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.key.escape_ascii();
        match &*self.kind {
            ViolationKind::DuplicateValue { first, second } => write!(
                f,
                "key \"{key}\" cannot be checked: two swaps write the same value, but this checker needs every \
                 swap's new value to be unique per key (tag values with the client and a sequence number):\
                 \n  {first}\n  {second}"
            ),
            ViolationKind::Fork { at, first, second } => write!(
                f,
                "key \"{key}\": lost update: two swaps both took effect from the same value {}:\n  {first}{}\n  {second}{}",
                show(at.as_deref()),
                observed_note(first),
                observed_note(second)
            ),
            ViolationKind::Unreachable { op } => write!(
                f,
                "key \"{key}\": a swap took effect from a value the register never held (no chain of swaps from \
                 absent writes it):\n  {op}{}",
                observed_note(op)
            ),
            ViolationKind::UnwrittenRead { op } => {
                write!(f, "key \"{key}\": a read returned a value that no swap wrote:\n  {op}")
            }
            ViolationKind::RealTime {
                position,
                writer,
                after,
                before,
            } => {
                let after_role = if after == writer {
                    "it"
                } else if matches!(after.kind, OpKind::Swap { .. }) {
                    "a swap earlier in the chain"
                } else {
                    "a read of an earlier value"
                };
                let before_role = if before == writer { "it" } else { "a read of its value" };
                write!(
                    f,
                    "key \"{key}\": real-time order broken at chain position {position}: the swap that wrote \
                     value #{position}\n  {writer}\ncannot take effect before time {}, when {after_role} was \
                     invoked:\n  {after}\nyet must take effect by time {}, when {before_role} completed:\n  {before}",
                    after.invoke,
                    before.complete.unwrap_or(u64::MAX),
                )
            }
        }
    }
}

/// Why an unknown-outcome swap counts as having taken effect.
fn observed_note(op: &Op) -> &'static str {
    if op.is_unknown_swap() {
        "  (outcome unknown, but its value was observed)"
    } else {
        ""
    }
}

impl fmt::Debug for CasViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for CasViolation {}

/// Checks that `ops` (in any order) is linearizable with respect to the
/// compare-and-swap register model, given that no two swaps of a key write
/// the same value. On success, says which swaps took effect on each key.
///
/// # Panics
///
/// If an op completes before it was invoked (a bug in the recording code).
pub fn check(ops: &[Op]) -> Result<CasSummary, CasViolation> {
    // BTreeMap: deterministic choice of the reported key.
    let mut by_key: BTreeMap<&[u8], Vec<&Op>> = BTreeMap::new();
    for op in ops {
        if let Some(c) = op.complete {
            assert!(c >= op.invoke, "op completes before it is invoked: {op}");
        }
        // A read with an unknown result tells nothing about the register.
        if matches!(op.kind, OpKind::Read(_)) && op.complete.is_none() {
            continue;
        }
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut summary = CasSummary::default();
    for (key, mut key_ops) in by_key {
        // Earliest first, so that reports name the earliest culprits
        // whatever order the history was merged in.
        key_ops.sort_by_key(|op| (op.invoke, op.complete));
        let key_summary = check_key(&key_ops).map_err(|kind| CasViolation {
            key: key.to_vec(),
            kind,
        })?;
        summary.keys.insert(key.to_vec(), key_summary);
    }
    Ok(summary)
}

/// What internal checks return on failure (boxed: see [`CasViolation`]).
type Broken = Box<ViolationKind>;

/// A swap of one key, borrowed from its op.
struct Swap<'a> {
    op: &'a Op,
    expect: Option<&'a [u8]>,
    new: &'a [u8],
}

fn check_key(ops: &[&Op]) -> Result<KeySummary, Broken> {
    let mut swaps = Vec::new();
    let mut reads = Vec::new();
    for &op in ops {
        match &op.kind {
            OpKind::Swap { expect, new } => swaps.push(Swap {
                op,
                expect: expect.as_deref(),
                new,
            }),
            OpKind::Read(value) => reads.push((value.as_deref(), op)),
        }
    }
    let writer = writers(&swaps)?;
    let needed = needed_swaps(&swaps, &reads, &writer);
    check_forks(&swaps, &needed)?;
    let chain = build_chain(&swaps, &needed, &writer)?;
    let chain_ops: Vec<&Op> = chain.iter().map(|&i| swaps[i].op).collect();
    let read_states = read_states(&swaps, &chain, &reads)?;
    check_real_time(&chain_ops, &read_states)?;

    let known_swaps = swaps.iter().filter(|s| !s.op.is_unknown_swap()).count();
    let unknown_swaps = swaps.len() - known_swaps;
    Ok(KeySummary {
        chain: chain.iter().map(|&i| swaps[i].new.to_vec()).collect(),
        known_swaps,
        unknown_swaps_included: chain.len() - known_swaps,
        unknown_swaps_left_out: unknown_swaps - (chain.len() - known_swaps),
        reads: reads.len(),
    })
}

/// The swap writing each value. This is what makes the check exact: a
/// value observed anywhere names the one swap that must have taken effect.
fn writers<'a>(swaps: &[Swap<'a>]) -> Result<HashMap<&'a [u8], usize>, Broken> {
    let mut writer: HashMap<&[u8], usize> = HashMap::with_capacity(swaps.len());
    for (i, swap) in swaps.iter().enumerate() {
        if let Some(&j) = writer.get(swap.new) {
            return Err(Box::new(ViolationKind::DuplicateValue {
                first: swaps[j].op.clone(),
                second: swap.op.clone(),
            }));
        }
        writer.insert(swap.new, i);
    }
    Ok(writer)
}

/// Which swaps must have taken effect: those that completed, those whose
/// value a read returned, and (transitively) the writer of the value that
/// any of these expected. Every other swap has an unknown outcome and an
/// unobserved value, so leaving it out of the chain changes nothing anyone
/// saw, while putting it in could only add constraints.
fn needed_swaps(swaps: &[Swap], reads: &[(Option<&[u8]>, &Op)], writer: &HashMap<&[u8], usize>) -> Vec<bool> {
    let known = (0..swaps.len()).filter(|&i| !swaps[i].op.is_unknown_swap());
    let read_back = reads.iter().filter_map(|(value, _)| writer.get((*value)?).copied());
    let mut todo: Vec<usize> = known.chain(read_back).collect();
    let mut needed = vec![false; swaps.len()];
    while let Some(i) = todo.pop() {
        if needed[i] {
            continue;
        }
        needed[i] = true;
        if let Some(&w) = swaps[i].expect.and_then(|x| writer.get(x)) {
            todo.push(w);
        }
    }
    needed
}

/// Two needed swaps expecting the same value cannot both be in the chain
/// (after the first, the register never holds that value again): the
/// second one's update was applied to a value already overwritten.
fn check_forks(swaps: &[Swap], needed: &[bool]) -> Result<(), Broken> {
    let mut by_expect: HashMap<Option<&[u8]>, usize> = HashMap::new();
    for (i, swap) in swaps.iter().enumerate().filter(|&(i, _)| needed[i]) {
        if let Some(&j) = by_expect.get(&swap.expect) {
            return Err(Box::new(ViolationKind::Fork {
                at: swap.expect.map(<[u8]>::to_vec),
                first: swaps[j].op.clone(),
                second: swap.op.clone(),
            }));
        }
        by_expect.insert(swap.expect, i);
    }
    Ok(())
}

/// Follows the needed swaps from the initial absent value: each link is
/// the (unique, after `check_forks`) needed swap expecting the value the
/// previous one wrote. The walk cannot loop: values are unique, so it
/// would have to come back to absent. A needed swap it misses expected a
/// value the register never held.
fn build_chain(swaps: &[Swap], needed: &[bool], writer: &HashMap<&[u8], usize>) -> Result<Vec<usize>, Broken> {
    let next: HashMap<Option<&[u8]>, usize> = (0..swaps.len())
        .filter(|&i| needed[i])
        .map(|i| (swaps[i].expect, i))
        .collect();
    let mut chain = Vec::new();
    let mut in_chain = vec![false; swaps.len()];
    let mut current = None;
    while let Some(&i) = next.get(&current) {
        chain.push(i);
        in_chain[i] = true;
        current = Some(swaps[i].new);
    }
    let missed: Vec<usize> = (0..swaps.len()).filter(|&i| needed[i] && !in_chain[i]).collect();
    // Report the root of a detached piece (a swap expecting a value nobody
    // wrote) rather than its descendants; failing that, it is a cycle.
    let root = missed
        .iter()
        .find(|&&i| swaps[i].expect.is_some_and(|x| !writer.contains_key(x)))
        .or(missed.first());
    match root {
        Some(&i) => Err(Box::new(ViolationKind::Unreachable {
            op: swaps[i].op.clone(),
        })),
        None => Ok(chain),
    }
}

/// The chain position of the value each read returned: 0 for absent, k for
/// the value written by the k-th swap of the chain.
fn read_states<'a>(
    swaps: &[Swap],
    chain: &[usize],
    reads: &[(Option<&[u8]>, &'a Op)],
) -> Result<Vec<(usize, &'a Op)>, Broken> {
    let position: HashMap<&[u8], usize> = chain.iter().enumerate().map(|(k, &i)| (swaps[i].new, k + 1)).collect();
    reads
        .iter()
        .map(|&(value, op)| match value {
            None => Ok((0, op)),
            Some(v) => position
                .get(v)
                .map(|&k| (k, op))
                .ok_or_else(|| Box::new(ViolationKind::UnwrittenRead { op: op.clone() })),
        })
        .collect()
}

/// An instant bound, with the op whose invocation or completion sets it.
type Bound<'a> = (u64, &'a Op);

/// Whether the chain's swaps can take effect at instants t_1 <= ... <= t_n,
/// each within its own interval, such that every read of state k (the value
/// of swap k; absent for k = 0) can take effect within its interval at
/// some s with t_k <= s <= t_{k+1}. With closed intervals, that s exists
/// iff t_k <= read.complete and t_{k+1} >= read.invoke: each read bounds
/// its own state's swap from above and the next swap from below. The bounds
/// are then all lower or upper bounds on single t_k, plus the order, so
/// taking each t_k as early as allowed finds a solution if there is one.
fn check_real_time(chain_ops: &[&Op], reads: &[(usize, &Op)]) -> Result<(), Broken> {
    let n = chain_ops.len();
    // Index k - 1 holds the bounds of t_k.
    let mut lower: Vec<Bound> = chain_ops.iter().map(|&op| (op.invoke, op)).collect();
    let mut upper: Vec<Bound> = chain_ops
        .iter()
        .map(|&op| (op.complete.unwrap_or(u64::MAX), op))
        .collect();
    for &(state, read) in reads {
        // check() keeps only completed reads.
        let complete = read.complete.unwrap_or(u64::MAX);
        if state > 0 && complete < upper[state - 1].0 {
            upper[state - 1] = (complete, read);
        }
        if state < n && read.invoke > lower[state].0 {
            lower[state] = (read.invoke, read);
        }
    }
    let mut earliest: Option<Bound> = None;
    for (k, (&own, &(latest, before))) in lower.iter().zip(&upper).enumerate() {
        // The earliest t_k: its own lower bound, or t_{k-1} if later (the
        // op behind that bound then constrains this swap too).
        let at = match earliest {
            Some(prev) if prev.0 > own.0 => prev,
            _ => own,
        };
        if at.0 > latest {
            return Err(Box::new(ViolationKind::RealTime {
                position: k + 1,
                writer: chain_ops[k].clone(),
                after: at.1.clone(),
                before: before.clone(),
            }));
        }
        earliest = Some(at);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(value: &str) -> Option<Vec<u8>> {
        Some(value.as_bytes().to_vec())
    }
    /// A successful swap on key "k".
    fn s(expect: Option<&str>, new: &str, invoke: u64, complete: u64) -> Op {
        Op::swap("k", expect.and_then(v), new, invoke, Some(complete))
    }
    fn s_unknown(expect: Option<&str>, new: &str, invoke: u64) -> Op {
        Op::swap("k", expect.and_then(v), new, invoke, None)
    }
    fn r(result: Option<&str>, invoke: u64, complete: u64) -> Op {
        Op::read("k", result.and_then(v), invoke, complete)
    }

    /// Checks a valid history and returns the summary of key "k".
    fn assert_ok(ops: &[Op]) -> KeySummary {
        match check(ops) {
            Ok(summary) => summary.key("k").cloned().unwrap_or_default(),
            Err(e) => panic!("valid history rejected: {e}"),
        }
    }
    fn assert_violation(ops: &[Op]) -> ViolationKind {
        let e = check(ops).expect_err("invalid history accepted");
        assert!(!e.to_string().is_empty());
        *e.kind
    }
    fn chain(values: &[&str]) -> Vec<Vec<u8>> {
        values.iter().map(|x| x.as_bytes().to_vec()).collect()
    }

    #[test]
    fn accepts_sequential_history() {
        assert_eq!(assert_ok(&[]), KeySummary::default());
        let summary = assert_ok(&[
            r(None, 0, 1),
            s(None, "1", 2, 3),
            r(Some("1"), 4, 5),
            s(Some("1"), "2", 6, 7),
            r(Some("2"), 8, 9),
        ]);
        assert_eq!(summary.chain, chain(&["1", "2"]));
        assert_eq!((summary.known_swaps, summary.reads), (2, 3));
        assert_eq!((summary.swaps(), summary.final_value()), (2, Some(&b"2"[..])));
        // Intervals sharing an endpoint overlap: either op may go first.
        assert_ok(&[s(None, "a", 0, 5), r(None, 5, 6)]);
        assert_ok(&[r(Some("a"), 0, 5), s(None, "a", 5, 6)]);
        // Two swaps may even take effect at the same instant, in order.
        assert_ok(&[s(None, "a", 0, 5), s(Some("a"), "b", 5, 9), r(None, 0, 5)]);
    }

    #[test]
    fn accepts_concurrent_swap_that_loses() {
        // Both try absent -> x; the loser saw the winner's value.
        let summary = assert_ok(&[
            s(None, "a", 0, 10),
            Op::failed_swap("k", v("a"), 1, 9),
            r(Some("a"), 11, 12),
        ]);
        assert_eq!(summary.chain, chain(&["a"]));
        // The loser retries from what it saw.
        assert_ok(&[
            s(None, "a", 0, 10),
            Op::failed_swap("k", v("a"), 0, 10),
            s(Some("a"), "b", 11, 12),
        ]);
    }

    #[test]
    fn accepts_unknown_swap_observed_later() {
        // Took effect long after the client gave up.
        let summary = assert_ok(&[s_unknown(None, "a", 0), r(None, 5, 6), r(Some("a"), 7, 8)]);
        assert_eq!((summary.unknown_swaps_included, summary.chain.len()), (1, 1));
        // Observed through a later swap that expected its value.
        let summary = assert_ok(&[s_unknown(None, "a", 0), s(Some("a"), "b", 3, 4)]);
        assert_eq!(summary.chain, chain(&["a", "b"]));
        assert_eq!((summary.known_swaps, summary.unknown_swaps_included), (1, 1));
        // Even through a chain of unknown swaps.
        let summary = assert_ok(&[
            s_unknown(None, "a", 0),
            s_unknown(Some("a"), "b", 1),
            r(Some("b"), 2, 3),
        ]);
        assert_eq!(summary.unknown_swaps_included, 2);
        // Unknown reads are ignored, whatever they claim.
        let mut lost_read = r(Some("zzz"), 0, 1);
        lost_read.complete = None;
        assert_eq!(assert_ok(&[lost_read]).reads, 0);
    }

    #[test]
    fn ignores_unknown_swap_never_observed() {
        let summary = assert_ok(&[s(None, "a", 0, 1), s_unknown(Some("a"), "b", 2), r(Some("a"), 10, 11)]);
        assert_eq!(summary.chain, chain(&["a"]));
        assert_eq!((summary.unknown_swaps_included, summary.unknown_swaps_left_out), (0, 1));
        // Its predecessor is left out too if only it observed the value.
        let summary = assert_ok(&[s_unknown(None, "a", 0), s_unknown(Some("a"), "b", 1)]);
        assert_eq!((summary.chain.len(), summary.unknown_swaps_left_out), (0, 2));
        // It lost the race to a known swap from the same value.
        let summary = assert_ok(&[s_unknown(None, "x", 0), s(None, "a", 1, 2), r(Some("a"), 3, 4)]);
        assert_eq!(summary.chain, chain(&["a"]));
        // ... unless its value was seen: then both took effect.
        let kind = assert_violation(&[
            s_unknown(None, "x", 0),
            s(None, "a", 1, 2),
            r(Some("a"), 3, 4),
            r(Some("x"), 5, 6),
        ]);
        assert!(matches!(kind, ViolationKind::Fork { at: None, .. }), "{kind:?}");
    }

    #[test]
    fn rejects_lost_update() {
        let kind = assert_violation(&[s(None, "a", 0, 1), s(None, "b", 2, 3)]);
        assert_eq!(
            kind,
            ViolationKind::Fork {
                at: None,
                first: s(None, "a", 0, 1),
                second: s(None, "b", 2, 3),
            }
        );
        // Concurrent ones too, whatever order the history lists them in.
        let kind = assert_violation(&[s(None, "1", 0, 1), s(Some("1"), "3", 3, 9), s(Some("1"), "2", 2, 8)]);
        let ViolationKind::Fork { at, first, .. } = kind else {
            panic!("{kind:?}")
        };
        assert_eq!((at, first), (v("1"), s(Some("1"), "2", 2, 8)));
    }

    #[test]
    fn rejects_stale_read_after_completed_swap() {
        let e = check(&[s(None, "a", 0, 1), s(Some("a"), "b", 2, 3), r(Some("a"), 4, 5)]).unwrap_err();
        assert_eq!(e.key, b"k");
        assert_eq!(
            *e.kind,
            ViolationKind::RealTime {
                position: 2,
                writer: s(Some("a"), "b", 2, 3),
                after: r(Some("a"), 4, 5),
                before: s(Some("a"), "b", 2, 3),
            }
        );
        let text = e.to_string();
        assert!(text.contains("chain position 2"), "{text}");
        assert!(text.contains("read \"k\" -> \"a\" @ [4, 5]"), "{text}");
        assert!(text.contains("swap \"k\" \"a\" -> \"b\" @ [2, 3]"), "{text}");
        // Stale relative to a read of the newer value, too.
        let kind = assert_violation(&[
            s(None, "a", 0, 1),
            s_unknown(Some("a"), "b", 2),
            r(Some("b"), 3, 4),
            r(Some("a"), 5, 6),
        ]);
        let ViolationKind::RealTime { after, before, .. } = kind else {
            panic!("{kind:?}")
        };
        assert_eq!((after, before), (r(Some("a"), 5, 6), r(Some("b"), 3, 4)));
    }

    #[test]
    fn rejects_read_of_value_never_written() {
        let kind = assert_violation(&[s(None, "a", 0, 1), r(Some("z"), 2, 3)]);
        assert_eq!(kind, ViolationKind::UnwrittenRead { op: r(Some("z"), 2, 3) });
        // A swap that succeeded from such a value.
        let kind = assert_violation(&[s(None, "a", 0, 1), s(Some("z"), "b", 2, 3)]);
        assert_eq!(
            kind,
            ViolationKind::Unreachable {
                op: s(Some("z"), "b", 2, 3)
            }
        );
        // The root of a detached piece is reported, not its descendants.
        let kind = assert_violation(&[s(Some("y"), "z", 0, 1), s(Some("x"), "y", 2, 3)]);
        assert_eq!(
            kind,
            ViolationKind::Unreachable {
                op: s(Some("x"), "y", 2, 3)
            }
        );
        // A cycle.
        let kind = assert_violation(&[s(Some("y"), "x", 0, 1), s(Some("x"), "y", 2, 3)]);
        assert!(matches!(kind, ViolationKind::Unreachable { .. }), "{kind:?}");
    }

    #[test]
    fn rejects_chain_order_contradicting_real_time() {
        // W2 expects W1's value but completes before W1 is invoked.
        let kind = assert_violation(&[s(None, "a", 10, 11), s(Some("a"), "b", 0, 1)]);
        assert_eq!(
            kind,
            ViolationKind::RealTime {
                position: 2,
                writer: s(Some("a"), "b", 0, 1),
                after: s(None, "a", 10, 11),
                before: s(Some("a"), "b", 0, 1),
            }
        );
        // The constraint carries along the chain.
        assert_violation(&[
            s(None, "a", 10, 11),
            s_unknown(Some("a"), "b", 0),
            s(Some("b"), "c", 0, 5),
        ]);
        // A read from the future.
        let kind = assert_violation(&[r(Some("a"), 0, 1), s(None, "a", 2, 3)]);
        assert!(matches!(kind, ViolationKind::RealTime { position: 1, .. }), "{kind:?}");
    }

    #[test]
    fn rejects_read_of_absent_after_swap_completed() {
        let kind = assert_violation(&[s(None, "a", 0, 1), r(None, 2, 3)]);
        assert_eq!(
            kind,
            ViolationKind::RealTime {
                position: 1,
                writer: s(None, "a", 0, 1),
                after: r(None, 2, 3),
                before: s(None, "a", 0, 1),
            }
        );
        // An observed unknown swap cannot be undone either.
        assert_violation(&[s_unknown(None, "a", 0), r(Some("a"), 5, 6), r(None, 7, 8)]);
    }

    #[test]
    fn rejects_duplicate_values() {
        let kind = assert_violation(&[s_unknown(None, "1", 0), s(None, "1", 1, 2)]);
        assert!(matches!(kind, ViolationKind::DuplicateValue { .. }), "{kind:?}");
        let e = check(&[s(None, "1", 0, 1), s(Some("1"), "1", 2, 3)]).unwrap_err();
        assert!(e.to_string().contains("unique"), "{e}");
    }

    #[test]
    fn keys_are_independent() {
        let ops = [
            Op::swap("k1", None, "a", 0, Some(1)),
            Op::swap("k2", None, "a", 0, Some(1)),
            Op::swap("k2", v("a"), "b", 2, None),
            Op::read("k2", v("b"), 3, 4),
            Op::read("k3", None, 0, 1),
        ];
        let summary = check(&ops).unwrap();
        assert_eq!(summary.key("k1").unwrap().chain, chain(&["a"]));
        assert_eq!(summary.key("k2").unwrap().chain, chain(&["a", "b"]));
        assert_eq!(summary.key("k3").unwrap().swaps(), 0);
        assert_eq!(summary.key("k4"), None);
        let mut ops = ops.to_vec();
        ops.push(Op::read("k2", v("a"), 5, 6));
        assert_eq!(check(&ops).unwrap_err().key, b"k2");
    }

    /// Tiny deterministic PRNG (xorshift64) so the test needs no crates.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// The counter in a value "count:client:seq" (0 for absent).
    fn counter(value: Option<&[u8]>) -> u64 {
        let Some(value) = value else { return 0 };
        let text = std::str::from_utf8(value).unwrap();
        text.split(':').next().unwrap().parse().unwrap()
    }

    const EFFECT: u8 = 0;
    const INVOKE: u8 = 1;

    /// A valid history of about `n` ops by 4 simulated clients incrementing
    /// a counter on key "k": each reads, then swaps from what it last saw
    /// (after a success or a failure it may swap again directly). Each op
    /// takes effect inside its interval, in the order of a discrete event
    /// simulation. About 1 swap in 8 has an unknown outcome: it takes effect
    /// (possibly long after, if the value still matches) or never, and the
    /// client reads again.
    fn random_counter_history(n: usize, seed: &mut u64) -> Vec<Op> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;

        let mut events = BinaryHeap::new();
        for c in 0..4 {
            events.push(Reverse((rng(seed) % 10, INVOKE, c)));
        }
        let mut register: Option<Vec<u8>> = None;
        let mut ops: Vec<Op> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        // What each client last learned the value to be, if anything.
        let mut seen: [Option<Option<Vec<u8>>>; 4] = Default::default();
        let mut seq = [0u64; 4];
        while let Some(Reverse((t, event, i))) = events.pop() {
            if event == EFFECT {
                let op = &mut ops[i];
                let known = op.complete.is_some();
                let applies = match &op.kind {
                    OpKind::Swap { expect, .. } => *expect == register,
                    OpKind::Read(_) => false,
                };
                if applies {
                    let OpKind::Swap { new, .. } = &op.kind else {
                        unreachable!()
                    };
                    register = Some(new.clone());
                } else if known {
                    // A completed read, or a failed swap reporting the value.
                    op.kind = OpKind::Read(register.clone());
                }
                if known {
                    seen[owner[i]] = Some(register.clone());
                }
                continue;
            }
            if ops.len() >= n {
                continue;
            }
            let c = i;
            let invoke = t;
            let effect = invoke + rng(seed) % 20;
            let complete = effect + rng(seed) % 20;
            let (kind, complete, next) = match seen[c].take() {
                Some(expect) if !rng(seed).is_multiple_of(4) => {
                    seq[c] += 1;
                    let new = format!("{}:{c}:{}", counter(expect.as_deref()) + 1, seq[c]).into_bytes();
                    let unknown = rng(seed).is_multiple_of(8);
                    let complete = (!unknown).then_some(complete);
                    // A client giving up moves on after its timeout.
                    let next = complete.unwrap_or(invoke + 10 + rng(seed) % 20) + 1 + rng(seed) % 10;
                    (OpKind::Swap { expect, new }, complete, next)
                }
                _ => (OpKind::Read(None), Some(complete), complete + 1 + rng(seed) % 10),
            };
            let lost = complete.is_none() && rng(seed).is_multiple_of(2);
            if !lost {
                // An unknown swap may take effect long after it was sent.
                let effect = if complete.is_none() {
                    invoke + rng(seed) % 80
                } else {
                    effect
                };
                events.push(Reverse((effect, EFFECT, ops.len())));
            }
            events.push(Reverse((next, INVOKE, c)));
            ops.push(Op {
                key: b"k".to_vec(),
                kind,
                invoke,
                complete,
            });
            owner.push(c);
        }
        ops
    }

    #[test]
    fn random_counter_histories_pass_and_mutations_fail() {
        let mut seed = 0x9E37_79B9_7F4A_7C15;
        let (mut included, mut left_out) = (0, 0);
        for _ in 0..20 {
            let mut ops = random_counter_history(300, &mut seed);
            let summary = assert_ok(&ops);
            let known = ops
                .iter()
                .filter(|op| matches!(op.kind, OpKind::Swap { .. }) && op.complete.is_some());
            assert_eq!(summary.known_swaps, known.count());
            // No lost increment: the counter went 1, 2, ... n.
            for (k, value) in summary.chain.iter().enumerate() {
                assert_eq!(counter(Some(value)), k as u64 + 1);
            }
            assert_eq!(counter(summary.final_value()), summary.swaps() as u64);
            assert!(summary.swaps() > 20, "too few increments: {summary:?}");
            included += summary.unknown_swaps_included;
            left_out += summary.unknown_swaps_left_out;

            // A lost update: a second successful swap from the value that a
            // chain swap (other than the first) replaced.
            let winner = ops
                .iter()
                .find(|op| op.complete.is_some() && matches!(&op.kind, OpKind::Swap { expect: Some(_), .. }))
                .unwrap();
            let mut forked = ops.clone();
            let mut loser = winner.clone();
            let OpKind::Swap { new, .. } = &mut loser.kind else {
                unreachable!()
            };
            *new = b"lost".to_vec();
            forked.push(loser.clone());
            let kind = assert_violation(&forked);
            let ViolationKind::Fork { first, second, .. } = kind else {
                panic!("{kind:?}")
            };
            assert!([&first, &second].contains(&&loser), "{first} / {second}");

            // A stale read: the last read returns the first value written.
            let late = ops.iter().rposition(|op| matches!(op.kind, OpKind::Read(_))).unwrap();
            let first_value = Some(summary.chain[0].clone());
            assert_ne!(ops[late].kind, OpKind::Read(first_value.clone()));
            ops[late].kind = OpKind::Read(first_value);
            let kind = assert_violation(&ops);
            let ViolationKind::RealTime { after, .. } = kind else {
                panic!("{kind:?}")
            };
            assert_eq!(after, ops[late]);
        }
        assert!(
            included > 0 && left_out > 0,
            "unknown outcomes not exercised: {included}, {left_out}"
        );
    }
}
