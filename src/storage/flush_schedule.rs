//! When a node's flusher flushes on its timer: at fixed slots on the wall
//! clock, each node's slots shifted by its id, so the members of a cluster
//! take turns instead of all flushing at once.
//!
//! A flush is the heaviest thing a node does (seconds of CPU and a burst of
//! disk writes). Every member applies the same entries at about the same
//! time, so timers started together keep flushing together; then every
//! node is slow at once and so is every quorum. Shifted, a flush slows one
//! node at a time while the others can still commit (and, where the nodes
//! share a machine, they no longer compete for its CPU and disk at once).
//! Measured with `bench/scale.sh` (see the README).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The flusher's timer: slots `every` apart, shifted by a fraction of
/// `every` that depends on the node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushSchedule {
    every: Duration,
    shift: Duration,
}

impl FlushSchedule {
    /// Slots `every` apart for node `id`. The shift is `every` times the
    /// fractional part of `id` times the golden ratio: whatever ids a
    /// cluster has, consecutive ids fall far apart (1, 2, 3 at 0.62, 0.24
    /// and 0.85 of the period).
    pub fn new(every: Duration, id: u64) -> Self {
        const GOLDEN: f64 = 0.618_033_988_749_895;
        let fraction = (id as f64 * GOLDEN).fract();
        FlushSchedule {
            every,
            shift: every.mul_f64(fraction),
        }
    }

    /// How long from `now` to the next slot (never zero: a flush that ends
    /// on a slot waits for the next one).
    pub fn until_next(&self, now: SystemTime) -> Duration {
        let every = self.every.as_nanos().max(1);
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        let into = (since + every - self.shift.as_nanos() % every) % every;
        Duration::from_nanos((every - into) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn slots_are_a_period_apart_and_shifted_by_id() {
        let every = Duration::from_secs(5);
        let one = FlushSchedule::new(every, 1);
        let shift = one.shift.as_secs_f64();
        assert!((3.090..3.091).contains(&shift), "{shift}");
        // 10^9 s is a whole number of periods: a slot follows it by the shift.
        let slot = at(1_000_000_000_000) + one.shift;
        // Waiting from a slot reaches the next slot a period later.
        assert_eq!(one.until_next(slot), every);
        assert_eq!(one.until_next(slot - Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(one.until_next(slot + Duration::from_secs(1)), Duration::from_secs(4));
    }

    #[test]
    fn three_members_flush_far_apart() {
        let every = Duration::from_secs(5);
        let mut shifts: Vec<f64> = (1..=3)
            .map(|id| FlushSchedule::new(every, id).shift.as_secs_f64())
            .collect();
        shifts.sort_by(f64::total_cmp);
        let gaps = [
            shifts[1] - shifts[0],
            shifts[2] - shifts[1],
            5.0 - shifts[2] + shifts[0],
        ];
        for gap in gaps {
            assert!(gap >= 1.1, "slots {shifts:?} are too close");
        }
    }
}
