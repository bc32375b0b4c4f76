//! A per-instance circuit breaker: a plugin that keeps failing is rested, not hammered.
//!
//! Pure state machine over [`tokio::time::Instant`], so its timing is tested in paused
//! time. Closed → (N consecutive failures) → open for a rest period → one trial call
//! (half-open) → closed on success, or open again for twice as long (capped).

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    base_rest: Duration,
    max_rest: Duration,
    consecutive_failures: u32,
    trips: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
}

/// Why a call was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    pub retry_in: Duration,
    pub failures: u32,
}

impl Breaker {
    pub fn new(threshold: u32, base_rest: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            base_rest,
            max_rest: Duration::from_secs(600).max(base_rest),
            consecutive_failures: 0,
            trips: 0,
            open_until: None,
            trial_in_flight: false,
        }
    }

    /// Asks to make a call now.
    pub fn allow(&mut self, now: Instant) -> Result<(), Rejected> {
        match self.open_until {
            None => Ok(()),
            Some(until) if now < until => Err(Rejected {
                retry_in: until - now,
                failures: self.consecutive_failures,
            }),
            Some(_) if self.trial_in_flight => Err(Rejected {
                retry_in: Duration::ZERO,
                failures: self.consecutive_failures,
            }),
            Some(_) => {
                self.trial_in_flight = true;
                Ok(())
            }
        }
    }

    /// Records a success; true when it closes a breaker that had tripped.
    pub fn on_success(&mut self) -> bool {
        let was_tripped = self.trips > 0;
        self.consecutive_failures = 0;
        self.trips = 0;
        self.open_until = None;
        self.trial_in_flight = false;
        was_tripped
    }

    /// True right after the first trip since the last success.
    pub fn first_trip(&self) -> bool {
        self.trips == 1
    }

    /// Records a failure; returns the rest period when this failure trips the breaker.
    pub fn on_failure(&mut self, now: Instant) -> Option<Duration> {
        self.record_failure(now, false)
    }

    /// Records a failure that retrying soon will not fix (a `permanent` or `config`
    /// error): the breaker trips at once.
    pub fn on_lasting_failure(&mut self, now: Instant) -> Option<Duration> {
        self.record_failure(now, true)
    }

    fn record_failure(&mut self, now: Instant, trip: bool) -> Option<Duration> {
        self.consecutive_failures += 1;
        let was_trial = std::mem::take(&mut self.trial_in_flight);
        if trip || was_trial || self.consecutive_failures >= self.threshold {
            let rest = self
                .base_rest
                .saturating_mul(1u32 << self.trips.min(16))
                .min(self.max_rest);
            self.trips += 1;
            self.open_until = Some(now + rest);
            Some(rest)
        } else {
            None
        }
    }

    pub fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn trips_after_threshold_rests_then_allows_one_trial() {
        let mut b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            b.allow(Instant::now()).unwrap();
            assert_eq!(b.on_failure(Instant::now()), None);
        }
        b.allow(Instant::now()).unwrap();
        assert_eq!(b.on_failure(Instant::now()), Some(Duration::from_secs(10)));
        let r = b.allow(Instant::now()).unwrap_err();
        assert_eq!(r.retry_in, Duration::from_secs(10));

        tokio::time::advance(Duration::from_secs(10)).await;
        b.allow(Instant::now()).expect("one trial after the rest");
        assert!(b.allow(Instant::now()).is_err(), "only one trial at a time");
        // The trial fails: rest doubles.
        assert_eq!(b.on_failure(Instant::now()), Some(Duration::from_secs(20)));
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(b.allow(Instant::now()).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        b.allow(Instant::now()).unwrap();
        b.on_success();
        assert!(!b.is_open(Instant::now()));
        // After a success the count starts again from zero.
        b.allow(Instant::now()).unwrap();
        assert_eq!(b.on_failure(Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn rest_is_capped() {
        let mut b = Breaker::new(1, Duration::from_secs(300));
        let mut last = Duration::ZERO;
        for _ in 0..6 {
            tokio::time::advance(last).await;
            b.allow(Instant::now()).unwrap();
            last = b.on_failure(Instant::now()).unwrap();
        }
        assert_eq!(last, Duration::from_secs(600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lasting_failure_trips_at_once() {
        let mut b = Breaker::new(3, Duration::from_secs(10));
        b.allow(Instant::now()).unwrap();
        assert_eq!(
            b.on_lasting_failure(Instant::now()),
            Some(Duration::from_secs(10))
        );
        assert!(b.allow(Instant::now()).is_err());
    }

    #[test]
    fn success_between_failures_resets_the_count() {
        let now = Instant::now();
        let mut b = Breaker::new(2, Duration::from_secs(1));
        assert_eq!(b.on_failure(now), None);
        b.on_success();
        assert_eq!(b.on_failure(now), None);
        assert!(b.on_failure(now).is_some());
    }
}
