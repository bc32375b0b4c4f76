//! Log hygiene for loops that retry: a repeated error is logged once with its cause, then
//! once a minute with a count, and once when it clears; never once per attempt.

use std::time::Duration;

use tokio::time::Instant;

/// How often a still-failing operation is logged again.
pub(crate) const REPEAT_EVERY: Duration = Duration::from_secs(60);

/// The state of one retried operation's errors.
#[derive(Debug)]
pub(crate) struct Repeated {
    what: &'static str,
    failing: Option<Failing>,
}

#[derive(Debug)]
struct Failing {
    message: String,
    since: Instant,
    last_logged: Instant,
    count: u64,
}

/// What a failure should produce in the log (pure, so the rule is unit-tested).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Say {
    Nothing,
    First,
    /// Still failing: how many times since the first.
    Again(u64),
}

impl Repeated {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            failing: None,
        }
    }

    #[cfg(test)]
    fn is_failing(&self) -> bool {
        self.failing.is_some()
    }

    /// Counts a failure and decides what to log.
    pub(crate) fn note(&mut self, message: &str, now: Instant) -> Say {
        match &mut self.failing {
            None => {
                self.failing = Some(Failing {
                    message: message.to_owned(),
                    since: now,
                    last_logged: now,
                    count: 1,
                });
                Say::First
            }
            Some(f) => {
                f.count += 1;
                // The latest cause is what the next reminder says.
                f.message = message.to_owned();
                if now.duration_since(f.last_logged) >= REPEAT_EVERY {
                    f.last_logged = now;
                    Say::Again(f.count)
                } else {
                    Say::Nothing
                }
            }
        }
    }

    /// Logs a failure at WARN (the loop retries by itself).
    pub(crate) fn failed(&mut self, message: &str) {
        match self.note(message, Instant::now()) {
            Say::Nothing => {}
            Say::First => {
                tracing::warn!(error = %message, "{}: failing; retrying", self.what)
            }
            Say::Again(n) => {
                tracing::warn!(error = %message, failures = n, "{}: still failing", self.what)
            }
        }
    }

    /// Logs the recovery once, if it was failing.
    pub(crate) fn cleared(&mut self) {
        if let Some(f) = self.failing.take() {
            tracing::info!(
                failures = f.count,
                failing_for = %humantime(f.since.elapsed()),
                "{}: answering again",
                self.what
            );
        }
    }
}

/// `1.2s`, `350ms`, `3m10s`: durations as an operator reads them.
pub(crate) fn humantime(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_repeated_error_is_said_once_then_once_a_minute() {
        let mut r = Repeated::new("x");
        let t0 = Instant::now();
        assert_eq!(r.note("refused", t0), Say::First);
        for i in 1..240 {
            let said = r.note("refused", t0 + Duration::from_millis(250 * i));
            assert_eq!(said, Say::Nothing, "{i}");
        }
        assert_eq!(
            r.note("refused", t0 + Duration::from_secs(60)),
            Say::Again(241)
        );
        assert_eq!(
            r.note("timeout", t0 + Duration::from_secs(61)),
            Say::Nothing,
            "another cause is said at the next reminder, not at once"
        );
        r.cleared();
        assert!(!r.is_failing());
        assert_eq!(r.note("refused", t0 + Duration::from_secs(62)), Say::First);
    }

    #[test]
    fn durations_read_plainly() {
        assert_eq!(humantime(Duration::from_millis(350)), "350ms");
        assert_eq!(humantime(Duration::from_millis(1250)), "1.2s");
        assert_eq!(humantime(Duration::from_secs(190)), "3m10s");
    }
}
