//! The clock both history checkers take timestamps from.

use std::time::Instant;

/// Monotonic nanoseconds since creation. It is `Copy`: give every client
/// thread a copy of the same clock to get comparable timestamps.
#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Self {
        Clock(Instant::now())
    }

    pub fn now(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
