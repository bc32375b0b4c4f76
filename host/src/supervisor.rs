//! Every long-running loop runs under a supervisor: a loop that panics (or returns when it
//! should not) is logged at ERROR with its name and restarted with backoff; a loop that
//! keeps failing (5 failures within 10 minutes) makes warden exit non-zero, so that
//! systemd restarts the whole process rather than leaving it up doing nothing.
//!
//! Fatal conditions (that one, and a plugin refusing its configuration) reach `main`
//! through one channel, each with the exit code it stands for.

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backoff::Backoff;

/// EX_CONFIG: a configuration that cannot work.
pub(crate) const EXIT_CONFIG: u8 = 78;
/// EX_SOFTWARE: warden itself keeps failing.
pub(crate) const EXIT_SOFTWARE: u8 = 70;

/// Why warden must stop on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fatal {
    #[error("{0}")]
    Config(String),
    #[error("loop {name} keeps failing ({failures} times in 10 minutes), last: {last}")]
    LoopFailing {
        name: &'static str,
        failures: usize,
        last: String,
    },
}

impl Fatal {
    pub fn exit_code(&self) -> u8 {
        match self {
            Fatal::Config(_) => EXIT_CONFIG,
            Fatal::LoopFailing { .. } => EXIT_SOFTWARE,
        }
    }
}

/// How many failures within `WINDOW` make a loop fatal.
pub(crate) const MAX_FAILURES: usize = 5;
pub(crate) const WINDOW: Duration = Duration::from_secs(600);

/// Counts failures in a sliding window (pure): true when the loop must be given up.
#[derive(Debug, Default)]
pub(crate) struct Failures(VecDeque<Instant>);

impl Failures {
    pub(crate) fn record(&mut self, now: Instant) -> bool {
        self.0.push_back(now);
        while self
            .0
            .front()
            .is_some_and(|t| now.duration_since(*t) > WINDOW)
        {
            self.0.pop_front();
        }
        self.0.len() >= MAX_FAILURES
    }
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// A task that ends with whoever holds it: dropped (its owner returned, or unwound from
/// a panic), it is aborted. A loop's helpers (the elector beside the manager's worker)
/// are held so, so that a restarted loop never finds the last run's helpers still at
/// work under the same identity.
pub(crate) struct Owned(pub tokio::task::JoinHandle<()>);

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Test builds only: `WARDEN_TEST_PANIC=<loop>:<n>` makes the first `n` runs of that
/// loop panic, so the supervision is tested in the real binary. Release builds ignore it.
pub(crate) fn injected_panic(name: &str, run: u32) -> bool {
    if !cfg!(debug_assertions) {
        return false;
    }
    std::env::var("WARDEN_TEST_PANIC").ok().is_some_and(|v| {
        v.split_once(':')
            .is_some_and(|(n, times)| n == name && times.parse::<u32>().is_ok_and(|t| run <= t))
    })
}

/// The text of a panic payload.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

pub(crate) struct Supervisor {
    tasks: JoinSet<()>,
    fatal: mpsc::UnboundedSender<Fatal>,
    shutdown: watch::Receiver<bool>,
}

impl Supervisor {
    pub(crate) fn new(
        fatal: mpsc::UnboundedSender<Fatal>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            tasks: JoinSet::new(),
            fatal,
            shutdown,
        }
    }

    /// Runs the loop `make()` builds, and builds it again after a failure.
    pub(crate) fn spawn<F, Fut>(&mut self, name: &'static str, make: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let fatal = self.fatal.clone();
        let mut shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let mut failures = Failures::default();
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            let mut runs = 0u32;
            loop {
                runs += 1;
                let outcome = if injected_panic(name, runs) {
                    tokio::spawn(async move { panic!("injected by WARDEN_TEST_PANIC (run {runs})") })
                        .await
                } else {
                    tokio::spawn(make()).await
                };
                if *shutdown.borrow() {
                    return;
                }
                let why = match outcome {
                    Err(e) if e.is_panic() => format!("panicked: {}", panic_text(&*e.into_panic())),
                    Err(e) => format!("ended: {e}"),
                    Ok(()) => "returned on its own".to_owned(),
                };
                if failures.record(Instant::now()) {
                    tracing::error!(loop_name = name, failures = failures.len(), "loop {name} {why}; it keeps failing: warden exits so that it is restarted whole");
                    let _ = fatal.send(Fatal::LoopFailing {
                        name,
                        failures: failures.len(),
                        last: why,
                    });
                    return;
                }
                let delay = backoff.next_delay();
                crate::metrics::get()
                    .loop_restarts
                    .get_or_create(&crate::metrics::LoopLabel {
                        name: name.to_owned(),
                    })
                    .inc();
                tracing::error!(loop_name = name, restart_in = %crate::logs::humantime(delay), "loop {name} {why}; restarting it");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    /// Waits for every loop to end, at most `limit`.
    pub(crate) async fn join(mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_loop_is_restarted_then_given_up() {
        let (ftx, mut frx) = mpsc::unbounded_channel();
        let (stop, shutdown) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let mut s = Supervisor::new(ftx, shutdown);
        let r = runs.clone();
        s.spawn("boom", move || {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                panic!("overflow when adding duration to instant");
            }
        });
        let fatal = frx.recv().await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), MAX_FAILURES as u32);
        assert_eq!(fatal.exit_code(), EXIT_SOFTWARE);
        assert!(
            fatal.to_string().contains("overflow when adding"),
            "{fatal}"
        );
        drop(stop);
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_ended_by_shutdown_is_not_a_failure() {
        let (ftx, mut frx) = mpsc::unbounded_channel();
        let (stop, shutdown) = watch::channel(false);
        let mut s = Supervisor::new(ftx, shutdown.clone());
        s.spawn("quiet", move || {
            let mut sd = shutdown.clone();
            async move {
                let _ = sd.changed().await;
            }
        });
        stop.send_replace(true);
        assert!(s.join(Duration::from_secs(1)).await);
        assert!(frx.try_recv().is_err());
    }

    #[test]
    fn failures_age_out_of_the_window() {
        let mut f = Failures::default();
        let t = Instant::now();
        for i in 0..4 {
            assert!(!f.record(t + Duration::from_secs(i * 200)));
        }
        assert!(
            !f.record(t + Duration::from_secs(1000)),
            "the first ones aged out"
        );
        assert_eq!(f.len(), 3);
    }
}
