//! What the elector tells the worker: "leading with epoch E until deadline D", or not.
//!
//! The elector is the only writer of a `watch` channel of [`Leadership`]; it renews the
//! lease in a task of its own and moves the deadline forward after every renewal, so no
//! amount of slow work can delay a renewal. The worker holds a [`Guard`] for the epoch it
//! works under and asks it before every ECS call (and the AWS client asks it again right
//! before each attempt is transmitted): a call is sent only while that epoch is still the
//! published one and its deadline has not passed by this host's monotonic clock.

use tokio::sync::watch;
use tokio::time::Instant;

use super::lease::Lease;

/// The elector's view of this host's role.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Leadership {
    #[default]
    Following,
    /// Leading under `lease` until `deadline` (lease − margin after the last renewal was sent).
    Leading { lease: Lease, deadline: Instant },
}

impl Leadership {
    pub(crate) fn epoch(&self) -> Option<u64> {
        match self {
            Leadership::Leading { lease, .. } => Some(lease.epoch),
            Leadership::Following => None,
        }
    }
}

/// Why a call was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Lost {
    #[error("epoch {0} is no longer this host's")]
    Deposed(u64),
    #[error("the deadline of epoch {0} passed without a renewal")]
    Expired(u64),
}

/// The right to act under one epoch, checked afresh on every use.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    rx: watch::Receiver<Leadership>,
    epoch: u64,
}

impl Guard {
    pub(crate) fn new(rx: watch::Receiver<Leadership>, epoch: u64) -> Self {
        Self { rx, epoch }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Ok only while this epoch is published and its deadline is ahead.
    pub(crate) fn check(&self) -> Result<(), Lost> {
        match &*self.rx.borrow() {
            Leadership::Leading { lease, deadline } if lease.epoch == self.epoch => {
                if Instant::now() < *deadline {
                    Ok(())
                } else {
                    Err(Lost::Expired(self.epoch))
                }
            }
            _ => Err(Lost::Deposed(self.epoch)),
        }
    }

    /// Resolves when this epoch stops being published (or its deadline passes first).
    pub(crate) async fn lost(&self) {
        let mut rx = self.rx.clone();
        loop {
            let deadline = match &*rx.borrow_and_update() {
                Leadership::Leading { lease, deadline } if lease.epoch == self.epoch => *deadline,
                _ => return,
            };
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lease(epoch: u64) -> Lease {
        Lease {
            id: "i-1".into(),
            epoch,
            az: "a".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_guard_holds_only_its_epoch_until_its_deadline() {
        let (tx, rx) = watch::channel(Leadership::Following);
        let g = Guard::new(rx, 7);
        assert_eq!(g.check(), Err(Lost::Deposed(7)));
        tx.send_replace(Leadership::Leading {
            lease: lease(7),
            deadline: Instant::now() + Duration::from_secs(1),
        });
        assert_eq!(g.check(), Ok(()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(g.check(), Err(Lost::Expired(7)));
        tx.send_replace(Leadership::Leading {
            lease: lease(8),
            deadline: Instant::now() + Duration::from_secs(1),
        });
        assert_eq!(
            g.check(),
            Err(Lost::Deposed(7)),
            "a later epoch is not ours"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lost_resolves_on_step_down_or_on_the_deadline() {
        let (tx, rx) = watch::channel(Leadership::Leading {
            lease: lease(3),
            deadline: Instant::now() + Duration::from_secs(10),
        });
        let g = Guard::new(rx, 3);
        let start = Instant::now();
        // A renewal moves the deadline; the guard follows it.
        let t = tokio::spawn({
            let g = g.clone();
            async move { g.lost().await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.send_replace(Leadership::Leading {
            lease: lease(3),
            deadline: Instant::now() + Duration::from_secs(10),
        });
        t.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(15));
        let t = tokio::spawn(async move { g.lost().await });
        tokio::time::sleep(Duration::from_millis(1)).await;
        tx.send_replace(Leadership::Following);
        t.await.unwrap();
    }
}
