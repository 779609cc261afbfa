//! Linearizability checker for key-value histories: the Wing & Gong search
//! with Lowe's memoization, as in Porcupine.
//!
//! The model is a map of independent registers keyed by `Vec<u8>`, each
//! initially absent (`None`). A `Write` sets a key, a `Delete` clears it and a
//! `Read` returns its current value. Since keys are independent, a history is
//! linearizable iff each key's sub-history is, so every key is checked on its
//! own ([`check`]): the search is exponential in the worst case, and
//! partitioning keeps each search small.
//!
//! Recording a history (from any number of client threads or tasks):
//!
//! * Take `invoke` from a clock shared by all threads (e.g. one [`Clock`],
//!   which is `Copy`) just *before* sending the request, and `complete` just
//!   *after* receiving the reply. Never use wall-clock time: it may jump.
//! * An operation whose outcome is unknown (timeout, lost connection, error
//!   after sending) is recorded with `complete: None`; it may have taken
//!   effect at any point after `invoke`, or never. Reads whose outcome is
//!   unknown carry no information and may be left out (they are ignored if
//!   present), as may operations known to have failed without effect.
//! * Let each thread collect its own `Vec<Op>` and merge them afterwards
//!   ([`History`] implements `Extend<Op>`), or share an
//!   `Arc<Mutex<Vec<Op>>>`. The order of ops in a history is irrelevant; only
//!   the timestamps matter.
//!
//! Cost: valid histories are usually checked in near-linear time. A failing
//! history makes the search exhaust every configuration before the failure
//! point, roughly `ops * 2^(ops in flight on that key at once)`: with a few
//! clients per key, a few hundred or thousand ops take milliseconds; with
//! 20 concurrent writers on one key, seconds. Unique write values help, as
//! do reads (they pin down the state).

// Not every integration test uses every item of this support module.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// What an operation did, with what it returned for reads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Set the key to this value.
    Write(Vec<u8>),
    /// The value the read returned (`None`: the key was absent).
    Read(Option<Vec<u8>>),
    /// Remove the key (sets it back to `None`).
    Delete,
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
    /// A write; `complete: None` if the client never learned the outcome.
    pub fn write(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, invoke: u64, complete: Option<u64>) -> Self {
        let kind = OpKind::Write(value.into());
        Op {
            key: key.into(),
            kind,
            invoke,
            complete,
        }
    }

    /// A read that completed and returned `result`.
    pub fn read(key: impl Into<Vec<u8>>, result: Option<Vec<u8>>, invoke: u64, complete: u64) -> Self {
        let kind = OpKind::Read(result);
        Op {
            key: key.into(),
            kind,
            invoke,
            complete: Some(complete),
        }
    }

    /// A delete; `complete: None` if the client never learned the outcome.
    pub fn delete(key: impl Into<Vec<u8>>, invoke: u64, complete: Option<u64>) -> Self {
        Op {
            key: key.into(),
            kind: OpKind::Delete,
            invoke,
            complete,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.key.escape_ascii();
        match &self.kind {
            OpKind::Write(v) => write!(f, "write \"{key}\" = \"{}\"", v.escape_ascii())?,
            OpKind::Read(Some(v)) => write!(f, "read \"{key}\" -> \"{}\"", v.escape_ascii())?,
            OpKind::Read(None) => write!(f, "read \"{key}\" -> absent")?,
            OpKind::Delete => write!(f, "delete \"{key}\"")?,
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

/// A collection of operations, in any order. A plain `Vec<Op>` works as
/// well; see [`check`].
#[derive(Clone, Debug, Default)]
pub struct History {
    ops: Vec<Op>,
}

impl History {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// See [`check`].
    pub fn check(&self) -> Result<(), Violation> {
        check(&self.ops)
    }
}

impl Extend<Op> for History {
    fn extend<I: IntoIterator<Item = Op>>(&mut self, iter: I) {
        self.ops.extend(iter);
    }
}

impl FromIterator<Op> for History {
    fn from_iter<I: IntoIterator<Item = Op>>(iter: I) -> Self {
        History {
            ops: iter.into_iter().collect(),
        }
    }
}

/// Why a history is not linearizable: the first key (in byte order) whose
/// sub-history admits no linearization. Its `Debug` form is the readable
/// `Display` one, so that `unwrap()` and `{:?}` print a useful report.
#[derive(Clone)]
pub struct Violation {
    pub key: Vec<u8>,
    /// Ops of this key that were searched (unknown-outcome reads and
    /// unobservable unknown-outcome writes/deletes are left out).
    pub ops_checked: usize,
    /// The most ops the search managed to linearize (a valid prefix).
    pub longest_prefix: usize,
    /// At that deepest point, the ops that could have come next in real-time
    /// order; none of them could be linearized. One of them is usually the
    /// culprit (e.g. a stale read). Sorted by `invoke`.
    pub stuck: Vec<Op>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "history of key \"{}\" is not linearizable: at most {} of {} ops linearize; \
             then none of these can come next:",
            self.key.escape_ascii(),
            self.longest_prefix,
            self.ops_checked
        )?;
        for op in &self.stuck {
            write!(f, "\n  {op}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Violation {}

/// Checks that `ops` is linearizable with respect to the key-value register
/// model. `Ok(())` means a valid linearization exists for every key.
///
/// # Panics
///
/// If an op completes before it was invoked (a bug in the recording code).
pub fn check(ops: &[Op]) -> Result<(), Violation> {
    // BTreeMap: deterministic choice of the reported key.
    let mut by_key: BTreeMap<&[u8], Vec<&Op>> = BTreeMap::new();
    for op in ops {
        if let Some(c) = op.complete {
            assert!(c >= op.invoke, "op completes before it is invoked: {op}");
        }
        // A read with an unknown result tells nothing about the system.
        if matches!(op.kind, OpKind::Read(_)) && op.complete.is_none() {
            continue;
        }
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, key_ops) in by_key {
        check_key(key, &key_ops)?;
    }
    Ok(())
}

/// Register state of a key that is absent.
const ABSENT: u32 = 0;
/// Register state holding a value that no read returned.
const UNREAD: u32 = u32::MAX;

/// Effect of one op on the register state (an interned value).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Set(u32),
    Expect(u32),
}

/// Sentinels of the doubly linked event list.
const HEAD: usize = 0;
const NIL: usize = usize::MAX;

/// The time-ordered list of call and return events of the ops not yet
/// linearized. Op `i` has its call at entry `2i + 1` and its return at
/// `2i + 2`; entry 0 is the head. Removal and re-insertion are O(1) ("dancing
/// links") and happen in LIFO order, which makes `relink` undo `unlink`.
struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl EventList {
    fn unlink(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = x;
        if n != NIL {
            self.prev[n] = x;
        }
    }

    /// Removes op `op`'s call and return (it has been linearized).
    fn lift(&mut self, op: usize) {
        self.unlink(2 * op + 1);
        self.unlink(2 * op + 2);
    }

    fn unlift(&mut self, op: usize) {
        self.relink(2 * op + 2);
        self.relink(2 * op + 1);
    }

    /// Where to continue the search in state `state` after a change of
    /// configuration: normally the first event, but if some candidate (a
    /// call before the first return) is a read that returns `state`, that
    /// read alone. Reads do not change the state, and a candidate may move
    /// before any op not yet linearized without breaking real-time order, so
    /// if any valid completion exists, one starts with this read: trying
    /// other orders would only revisit equivalent configurations.
    fn next_entry(&self, steps: &[Step], state: u32) -> usize {
        let mut e = self.next[HEAD];
        while e != NIL && e % 2 == 1 {
            if matches!(steps[(e - 1) / 2], Step::Expect(s) if s == state) {
                return e;
            }
            e = self.next[e];
        }
        self.next[HEAD]
    }

    /// Whether, once optional op `op` is linearized with resulting state
    /// `state`, a read of `state` could come next (it is a call before the
    /// first return of a required op). If not, there is no point in
    /// linearizing `op` here: if a valid linearization does, removing `op`
    /// from it keeps it valid, as nothing observes its value. Checking
    /// before the configuration enters the cache keeps the cache meaning
    /// "explored and failed" whichever path reaches it.
    fn read_follows(&mut self, op: usize, state: u32, steps: &[Step], optional: &[bool]) -> bool {
        self.lift(op);
        let mut e = self.next[HEAD];
        let mut found = false;
        while e != NIL {
            let i = (e - 1) / 2;
            if e % 2 == 1 && matches!(steps[i], Step::Expect(s) if s == state) {
                found = true;
                break;
            }
            if e.is_multiple_of(2) && !optional[i] {
                break;
            }
            e = self.next[e];
        }
        self.unlift(op);
        found
    }

    /// Whether an optional op with the same effect as the one called at
    /// `entry` is called before it. Optional ops with the same effect also
    /// have the same deadline, so once both are candidates they are
    /// interchangeable (swap them in any valid linearization), and only the
    /// first needs trying. Without this, every subset of e.g. pending
    /// deletes would be a distinct configuration.
    fn has_earlier_twin(&self, entry: usize, steps: &[Step], optional: &[bool]) -> bool {
        let step = steps[(entry - 1) / 2];
        let mut e = self.next[HEAD];
        while e != entry {
            let i = (e - 1) / 2;
            if e % 2 == 1 && optional[i] && steps[i] == step {
                return true;
            }
            e = self.next[e];
        }
        false
    }
}

/// One linearized (or omitted) op on the search stack.
struct Frame {
    op: usize,
    /// Register state before the op.
    before: u32,
    /// Whether this was the only possible move from the configuration
    /// below it (a matching read, or omitting an op), so that when it fails,
    /// that configuration fails too.
    forced: bool,
    /// The pass of the candidate scan in which the move was made.
    late: bool,
}

fn check_key(key: &[u8], all_ops: &[&Op]) -> Result<(), Violation> {
    // Earliest and latest completion of the reads of each value, and the
    // number of writes of each value.
    let mut reads: HashMap<Option<&[u8]>, (u64, u64)> = HashMap::new();
    let mut writers: HashMap<&[u8], usize> = HashMap::new();
    for &op in all_ops {
        match (&op.kind, op.complete) {
            (OpKind::Read(r), Some(c)) => {
                let (first, last) = reads.entry(r.as_deref()).or_insert((c, c));
                *first = c.min(*first);
                *last = c.max(*last);
            }
            (OpKind::Write(v), _) => *writers.entry(v.as_slice()).or_default() += 1,
            _ => {}
        }
    }

    // Each kept op gets a return time (`deadline`). An unknown-outcome
    // write or delete would naively get an infinite one, but then it stays
    // a candidate forever and every subset of such ops is a distinct
    // configuration, which makes failing searches explode. Instead, with M
    // such an op producing value x (None for a delete):
    //
    // * If no read of x completed after M's invocation, M is dropped: in any
    //   linearization containing M, no read sits between M and the next
    //   mutation, so removing M keeps the linearization valid.
    // * If M is the only write of x (and x is not None, which is also the
    //   initial state), M must precede every read of x: it is required, with
    //   the earliest such read's completion as deadline.
    // * Otherwise M is optional: by the first argument it may be assumed to
    //   precede some read of x or be omitted, so its deadline is the latest
    //   completion of a read of x. At that deadline, the search omits it.
    let mut ops: Vec<&Op> = Vec::with_capacity(all_ops.len());
    let mut deadline = Vec::with_capacity(all_ops.len());
    let mut optional = Vec::with_capacity(all_ops.len());
    for &op in all_ops {
        let (d, opt) = match (op.complete, &op.kind) {
            (Some(c), _) => (c, false),
            (None, OpKind::Read(_)) => continue, // dropped by check() already
            (None, kind) => {
                let (x, unique) = match kind {
                    OpKind::Write(v) => (Some(v.as_slice()), writers[v.as_slice()] == 1),
                    _ => (None, false),
                };
                match reads.get(&x) {
                    Some(&(first, _)) if unique => (first, false),
                    Some(&(_, last)) if last >= op.invoke => (last, true),
                    _ => continue,
                }
            }
        };
        ops.push(op);
        deadline.push(d);
        optional.push(opt);
    }
    let n = ops.len();

    // Intern values so that the state is a small integer (cheap to hash and
    // compare). Values no read returned all get the same id: such states
    // are indistinguishable (no read accepts them), and merging them lets
    // the cache identify e.g. the two orders of concurrent blind writes. A
    // read of a value never written gets an id no op sets.
    let ids: HashMap<&[u8], u32> = reads.keys().flatten().zip(1..).map(|(&v, id)| (v, id)).collect();
    let id = |v: &[u8]| ids.get(v).copied().unwrap_or(UNREAD);
    let steps: Vec<Step> = ops
        .iter()
        .map(|op| match &op.kind {
            OpKind::Write(v) => Step::Set(id(v)),
            OpKind::Delete => Step::Set(ABSENT),
            OpKind::Read(r) => Step::Expect(r.as_deref().map_or(ABSENT, id)),
        })
        .collect();

    // Sort events by time; at equal times calls go first, so ops that merely
    // touch (A.complete == B.invoke) count as concurrent: A must precede B
    // only if A.complete < B.invoke.
    let mut order: Vec<usize> = (1..=2 * n).collect();
    order.sort_by_key(|&e| {
        let op = (e - 1) / 2;
        if e % 2 == 1 {
            (ops[op].invoke, false)
        } else {
            (deadline[op], true)
        }
    });
    let mut list = EventList {
        next: vec![NIL; 2 * n + 1],
        prev: vec![NIL; 2 * n + 1],
    };
    let mut last = HEAD;
    for e in order {
        list.next[last] = e;
        list.prev[e] = last;
        last = e;
    }

    // WGL depth-first search. `stack` holds the moves made (linearized or
    // omitted ops). `config` is the set of ops they cover as a bitset, plus
    // the register state as a last word: reaching a configuration twice
    // cannot lead anywhere new, so `cache` prunes it (Lowe's improvement).
    // As the search stops at the first success, every cached configuration
    // is one from which the search failed.
    let words = n.div_ceil(64);
    let mut config = vec![0u64; words + 1];
    let mut cache: HashSet<Vec<u64>> = HashSet::new();
    let mut stack: Vec<Frame> = Vec::new();
    // Optional ops covered by `config` (a subsequence of `stack`).
    let mut optionals: Vec<usize> = Vec::new();
    let mut state = ABSENT;
    // Whether the scan of the candidates is in its second pass, over the
    // optional ops; see `dominated`.
    let mut late = false;
    // Required ops not yet linearized. Once none is left we are done: the
    // remaining optional ops are taken not to have happened.
    let mut required = optional.iter().filter(|&&o| !o).count();
    // Deepest point where the search got stuck: (depth, candidate ops).
    let mut deepest: Option<(usize, Vec<usize>)> = None;
    let mut entry = list.next_entry(&steps, state);
    while required > 0 {
        // A required op is still listed, so its return is reached before
        // the end of the list: `entry` is never NIL here.
        let op = (entry - 1) / 2;
        let is_call = entry % 2 == 1;
        // The move to try from this configuration, if any: linearize the
        // op, or omit it if this is the return of an optional op.
        let attempt = match (is_call, steps[op]) {
            (true, _) if optional[op] != late => None,
            (true, Step::Set(s))
                if late
                    && (list.has_earlier_twin(entry, &steps, &optional)
                        || !list.read_follows(op, s, &steps, &optional)) =>
            {
                None
            }
            (true, Step::Set(s)) => Some((s, false)),
            (true, Step::Expect(s)) => (s == state).then_some((state, true)),
            (false, _) if !late => {
                // End of the first pass: scan the candidates again for
                // optional ops.
                late = true;
                entry = list.next[HEAD];
                continue;
            }
            (false, _) if optional[op] => Some((state, true)),
            (false, _) => {
                // The return of a required op not yet linearized: no
                // remaining candidate works. Remember the deepest such
                // point for the report, then backtrack.
                if deepest.as_ref().is_none_or(|(d, _)| stack.len() > *d) {
                    let mut candidates = Vec::new();
                    let mut e = list.next[HEAD];
                    while e != entry {
                        if e % 2 == 1 {
                            candidates.push((e - 1) / 2);
                        }
                        e = list.next[e];
                    }
                    deepest = Some((stack.len(), candidates));
                }
                None
            }
        };
        if let Some((after, forced)) = attempt {
            config[op / 64] |= 1 << (op % 64);
            config[words] = u64::from(after);
            // For an omission, the configuration without `op` is the
            // current one, not a failed one, so `op` is not left out there.
            let extra = (is_call && optional[op]).then_some(op);
            if !dominated(&mut config, &optionals, extra, &cache) && !cache.contains(&config) {
                cache.insert(config.clone());
                stack.push(Frame {
                    op,
                    before: state,
                    forced,
                    late,
                });
                if optional[op] {
                    optionals.push(op);
                } else {
                    required -= 1;
                }
                state = after;
                late = false;
                list.lift(op);
                entry = list.next_entry(&steps, state);
                continue;
            }
            config[op / 64] &= !(1 << (op % 64));
            if !forced {
                // Already explored; try the next candidate.
                entry = list.next[entry];
                continue;
            }
            // A read is only tried as the forced choice (see `next_entry`),
            // and omission only once all candidates failed, so this
            // configuration is a dead end too.
        } else if is_call {
            // Not for this pass, a read that does not match, or a useless
            // optional op: try the next candidate.
            entry = list.next[entry];
            continue;
        }
        // Backtrack: undo the last move and try the next candidate after it.
        // A forced move had no alternatives, so keep undoing.
        loop {
            let Some(frame) = stack.pop() else {
                let (depth, candidates) = deepest.unwrap_or_default();
                let mut stuck: Vec<Op> = candidates.into_iter().map(|i| ops[i].clone()).collect();
                stuck.sort_by_key(|op| op.invoke);
                return Err(Violation {
                    key: key.to_vec(),
                    ops_checked: n,
                    longest_prefix: depth,
                    stuck,
                });
            };
            let op = frame.op;
            config[op / 64] &= !(1 << (op % 64));
            if optional[op] {
                optionals.pop();
            } else {
                required += 1;
            }
            state = frame.before;
            late = frame.late;
            list.unlift(op);
            entry = list.next[2 * op + 1];
            if !frame.forced {
                break;
            }
        }
    }
    Ok(())
}

/// Whether configuration `config` is dominated by a cached, hence failed,
/// configuration: the same one with one of the optional ops `optionals` or
/// `extra` left out. Any valid completion of `config` is one of the smaller
/// configuration too, with that op omitted, so `config` must fail as well.
/// This matters when a history fails and has unknown-outcome ops: every
/// subset of them that got used along the way would otherwise make equal
/// configurations distinct. The candidate scan's second pass over optional
/// ops makes the search visit the smaller configurations first.
///
/// The smaller configuration may also be the current one, which is not
/// failed but is being explored, when `extra` does not change the state;
/// then linearizing `extra` is pointless anyway, as the current
/// configuration can do anything the larger one can.
fn dominated(config: &mut [u64], optionals: &[usize], extra: Option<usize>, cache: &HashSet<Vec<u64>>) -> bool {
    optionals.iter().copied().chain(extra).any(|d| {
        config[d / 64] &= !(1 << (d % 64));
        let hit = cache.contains(&*config);
        config[d / 64] |= 1 << (d % 64);
        hit
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(value: &str, invoke: u64, complete: u64) -> Op {
        Op::write("k", value, invoke, Some(complete))
    }
    fn w_unknown(value: &str, invoke: u64) -> Op {
        Op::write("k", value, invoke, None)
    }
    fn r(result: Option<&str>, invoke: u64, complete: u64) -> Op {
        Op::read("k", result.map(Vec::from), invoke, complete)
    }
    fn d(invoke: u64, complete: Option<u64>) -> Op {
        Op::delete("k", invoke, complete)
    }

    fn assert_ok(ops: &[Op]) {
        if let Err(v) = check(ops) {
            panic!("valid history rejected: {v}");
        }
    }
    fn assert_violation(ops: &[Op]) -> Violation {
        check(ops).expect_err("invalid history accepted")
    }

    #[test]
    fn accepts_sequential_and_touching() {
        assert_ok(&[]);
        assert_ok(&[
            r(None, 0, 1),
            w("a", 2, 3),
            r(Some("a"), 4, 5),
            w("b", 6, 7),
            r(Some("b"), 8, 9),
            w("a", 10, 11), // duplicate values are fine
            r(Some("a"), 12, 13),
        ]);
        // Intervals sharing an endpoint overlap, so the read may go first.
        assert_ok(&[w("a", 0, 5), r(None, 5, 6)]);
    }

    #[test]
    fn accepts_concurrent_writes_seen_in_either_order() {
        for first in ["a", "b"] {
            assert_ok(&[
                w("a", 0, 10),
                w("b", 0, 10),
                r(Some(first), 11, 12),
                r(Some(first), 13, 14),
            ]);
        }
        // Reads during the writes may see none, one, then the other.
        assert_ok(&[
            w("a", 0, 100),
            w("b", 0, 100),
            r(None, 1, 2),
            r(Some("b"), 10, 20),
            r(Some("a"), 15, 30), // overlaps the previous read
            r(Some("a"), 101, 102),
        ]);
    }

    #[test]
    fn accepts_unknown_outcomes_either_way() {
        // Took effect, long after the client gave up.
        assert_ok(&[w_unknown("a", 0), r(None, 5, 6), r(Some("a"), 7, 8)]);
        // Never took effect.
        assert_ok(&[w("x", 0, 1), w_unknown("y", 2), r(Some("x"), 10, 11)]);
        assert_ok(&[
            w("x", 0, 1),
            w_unknown("y", 2),
            r(Some("x"), 10, 11),
            r(Some("y"), 12, 13),
        ]);
        // Unknown reads are ignored, whatever they claim.
        let mut lost_read = r(Some("zzz"), 0, 1);
        lost_read.complete = None;
        assert_ok(&[lost_read]);
    }

    #[test]
    fn accepts_deletes() {
        assert_ok(&[
            w("a", 0, 1),
            d(2, Some(3)),
            r(None, 4, 5),
            w("b", 6, 7),
            r(Some("b"), 8, 9),
            d(10, None),
            r(Some("b"), 11, 12),
            r(None, 13, 14),
        ]);
    }

    #[test]
    fn keys_are_independent() {
        let mut h = History::new();
        h.push(Op::write("k1", "a", 0, Some(1)));
        h.push(Op::write("k2", "b", 2, Some(3)));
        h.extend([
            Op::read("k1", Some(b"a".to_vec()), 4, 5),
            Op::read("k2", Some(b"b".to_vec()), 4, 5),
        ]);
        h.push(Op::read("k3", None, 0, 9));
        assert!(h.check().is_ok());
        h.push(Op::read("k2", None, 6, 7)); // "b" can't disappear
        let v = h.check().unwrap_err();
        assert_eq!(v.key, b"k2");
    }

    #[test]
    fn rejects_stale_read_after_completed_write() {
        let v = assert_violation(&[w("a", 0, 1), w("b", 2, 3), r(Some("a"), 4, 5)]);
        assert_eq!((v.key.as_slice(), v.ops_checked, v.longest_prefix), (&b"k"[..], 3, 2));
        assert_eq!(v.stuck, vec![r(Some("a"), 4, 5)]);
        assert!(v.to_string().contains("read \"k\" -> \"a\" @ [4, 5]"), "{v}");
        assert_violation(&[w("a", 0, 1), r(None, 2, 3)]);
        assert_violation(&[w("a", 0, 1), d(2, Some(3)), r(Some("a"), 4, 5)]);
    }

    #[test]
    fn rejects_value_never_written() {
        assert_violation(&[w("a", 0, 1), r(Some("z"), 2, 3)]);
        assert_violation(&[w_unknown("a", 0), r(Some("z"), 2, 3)]);
    }

    #[test]
    fn rejects_non_monotonic_reads() {
        // v, w, v again with a single write of v.
        assert_violation(&[
            w("v", 0, 100),
            w("w", 0, 100),
            r(Some("v"), 10, 11),
            r(Some("w"), 20, 21),
            r(Some("v"), 30, 31),
        ]);
        // An unknown-outcome write cannot be undone either.
        assert_violation(&[w_unknown("a", 0), r(Some("a"), 5, 6), r(None, 7, 8)]);
    }

    #[test]
    fn rejects_contradicting_orders() {
        // One client sees a then b, a later one sees b then a.
        assert_violation(&[
            w("a", 0, 100),
            w("b", 0, 100),
            r(Some("a"), 10, 11),
            r(Some("b"), 12, 13),
            r(Some("b"), 20, 21),
            r(Some("a"), 22, 23),
        ]);
    }

    #[test]
    fn rejects_read_from_the_future() {
        assert_violation(&[r(Some("a"), 0, 1), w("a", 2, 3)]);
        assert_violation(&[r(Some("a"), 0, 1), w_unknown("a", 2)]);
    }

    #[test]
    fn each_unknown_delete_takes_effect_at_most_once() {
        // 12 deletes of unknown outcome, then writes each followed by a read
        // of absent: each such read needs a delete of its own.
        let history = |absent_reads: u64| {
            let mut ops: Vec<Op> = (0..12).map(|i| d(i, None)).collect();
            for j in 0..absent_reads {
                let t = 100 + 10 * j;
                ops.push(w(&format!("v{j}"), t, t + 1));
                ops.push(r(Some(&format!("v{j}")), t + 2, t + 3));
                ops.push(r(None, t + 4, t + 5));
            }
            ops
        };
        assert_ok(&history(12));
        assert_violation(&history(13));
    }

    /// Tiny deterministic PRNG (xorshift64) so the test needs no crates.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// A valid history of `n` ops (n < 1000) by 5 concurrent clients on one
    /// key: each op takes effect at a distinct instant inside its interval.
    /// Some writes/deletes have unknown outcomes and may or may not take
    /// effect.
    fn random_valid_history(n: usize, seed: &mut u64) -> Vec<Op> {
        let mut clients = [0u64; 5];
        let mut ops = Vec::new();
        // (effect instant, op index) of the ops that take effect.
        let mut effects = Vec::new();
        for i in 0..n {
            let c = (rng(seed) % 5) as usize;
            let invoke = clients[c] + rng(seed) % 10;
            let at = invoke + 1 + rng(seed) % 20;
            let complete = at + 1 + rng(seed) % 20;
            clients[c] = complete + 1;
            let kind = match rng(seed) % 10 {
                0..=3 => OpKind::Write(format!("v{i}").into_bytes()),
                4 => OpKind::Delete,
                _ => OpKind::Read(None), // result filled in below
            };
            let unknown = !matches!(kind, OpKind::Read(_)) && rng(seed).is_multiple_of(10);
            if !unknown || rng(seed).is_multiple_of(2) {
                // Scaled by 1000 so that `+ i` makes instants distinct while
                // staying strictly inside (invoke, complete).
                effects.push((at * 1000 + i as u64, i));
            }
            let complete = (!unknown).then_some(complete * 1000);
            ops.push(Op {
                key: b"k".to_vec(),
                kind,
                invoke: invoke * 1000,
                complete,
            });
        }
        effects.sort_unstable();
        let mut value: Option<Vec<u8>> = None;
        for (_, i) in effects {
            match &mut ops[i].kind {
                OpKind::Write(v) => value = Some(v.clone()),
                OpKind::Delete => value = None,
                OpKind::Read(result) => *result = value.clone(),
            }
        }
        ops
    }

    #[test]
    fn random_histories_of_hundreds_of_ops() {
        let mut seed = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2 {
            let mut ops = random_valid_history(300, &mut seed);
            assert_ok(&ops);
            // Make a late read return a value overwritten long before.
            let first = ops
                .iter()
                .find(|op| matches!(op.kind, OpKind::Write(_)) && op.complete.is_some());
            let OpKind::Write(old) = first.unwrap().kind.clone() else {
                unreachable!()
            };
            let late = ops.iter().rposition(|op| matches!(op.kind, OpKind::Read(_))).unwrap();
            assert_ne!(ops[late].kind, OpKind::Read(Some(old.clone())));
            ops[late].kind = OpKind::Read(Some(old));
            let v = assert_violation(&ops);
            assert!(v.stuck.contains(&ops[late]), "{v}");
        }
    }
}
