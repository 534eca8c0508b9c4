//! Capped exponential backoff for retries after failures, built on `backon` so the controller,
//! the agent's report writer and the test harness share one policy shape.
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays doubling from `min` up to `max`, never giving up; [`Backoff::reset`] after a success.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    current: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Self {
            current: builder.build(),
            builder,
            max,
        }
    }

    /// The delay before the next retry (one more failure).
    pub fn next_delay(&mut self) -> Duration {
        // `without_max_times` makes the iterator endless; `max` is only a guard.
        self.current.next().unwrap_or(self.max)
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let first: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(first, [1, 2, 4, 8, 16, 32, 60, 60]);
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }
}
