//! Leader election among all hosts through the central Redis, fenced.
//!
//! It keeps the seed's shape (a heartbeat naming the leader and its Availability Zone; a
//! competition of random numbers in a sorted set, won after a guard time by the highest
//! live entry; a kill message left for a deposed leader) and makes it safe: leadership is
//! a lease with a TTL in Redis, renewed by an atomic script; every new leader takes a new
//! epoch (the fencing token), checked in Redis before every ECS call; ages are measured in
//! Redis time.
//!
//! The [`Elector`] runs in a task of its own and does nothing but keep the lease: no
//! metric, mapping or AWS call can ever delay a renewal. It publishes "leading with epoch
//! E until deadline D" on a watch channel ([`Leadership`]); the deadline is lease − 25 %
//! after the last renewal was *sent*, so it always falls before Redis lets the lease go.
//! It steps down (publishes `Following`) the moment the deadline passes without a
//! renewal, a kill message arrives, or its own AZ becomes unavailable. On shutdown it
//! stops acting first, then gives the lease up and names the most recently seen other
//! host as successor, which is woken at once and takes the lease without a competition.
//!
//! What it costs the central Redis: every renewal publishes the lease on a channel, and
//! a follower that hears it sends nothing; it registers itself once a lease period and
//! looks at the lease itself only when the heartbeat has been quiet for a lease period
//! (then every tick, until a leader is heard again). The leader sends one script a tick
//! (and a `WAIT` with `central_min_replicas`). Measured in docs/benchmarks.md.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::az::AzCache;
use super::central::{Beat, LeaseStore, LiveHost, Renewal, StoreError};
use super::leadership::Leadership;
use super::lease::Lease;
use crate::logs::Repeated;

/// Timing of the election. Defaults replace a dead leader within about 3 s:
/// lease expiry (2 s) + one tick (0.25 s) + guard (0.5 s) + acquisition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Timing {
    pub lease: Duration,
    pub tick: Duration,
    pub guard: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease: Duration::from_millis(2000),
            tick: Duration::from_millis(250),
            guard: Duration::from_millis(500),
        }
    }
}

impl Timing {
    /// A leader stops acting this long before its lease would expire in Redis, to allow
    /// for the time a renewal takes to travel; the fence also asks for this much left.
    pub(crate) fn margin(&self) -> Duration {
        self.lease / 4
    }
}

/// Why a leader steps down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StepDown {
    /// Its own Availability Zone is not available: it gives the lease up.
    OwnAz(String),
    /// The lease is someone else's, or gone.
    NotOurs,
    /// A newer epoch left a kill message.
    Killed(u64),
    /// The store did not renew it (twice): the text says why.
    Store(String),
    /// The deadline passed without a renewal.
    Deadline,
}

impl std::fmt::Display for StepDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepDown::OwnAz(az) => write!(f, "own Availability Zone {az} is not available"),
            StepDown::NotOurs => write!(f, "the lease is no longer ours"),
            StepDown::Killed(e) => write!(f, "kill message from epoch {e}"),
            StepDown::Store(e) => write!(f, "cannot renew the lease: {e}"),
            StepDown::Deadline => write!(f, "the lease deadline passed without a renewal"),
        }
    }
}

/// Whom a departing leader names: the most recently seen other host whose AZ is
/// available and that was seen within `max_age` (pure).
pub(crate) fn choose_successor(
    hosts: &[LiveHost],
    me: &str,
    max_age: Duration,
    az_available: impl Fn(&str) -> bool,
) -> Option<String> {
    hosts
        .iter()
        .filter(|h| h.id != me && h.age <= max_age && az_available(&h.az))
        .min_by_key(|h| h.age)
        .map(|h| h.id.clone())
}

/// Keeps (or competes for) the lease and publishes [`Leadership`].
pub(crate) struct Elector<S: LeaseStore> {
    pub id: String,
    pub az: String,
    pub store: S,
    pub timing: Timing,
    pub azs: AzCache,
}

/// What the elector holds while leading.
struct Held {
    lease: Lease,
    deadline: Instant,
}

impl<S: LeaseStore> Elector<S> {
    pub(crate) async fn run(
        self,
        tx: watch::Sender<Leadership>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut held: Option<Held> = None;
        let mut errors = Repeated::new("election: central redis");
        let mut seen_errors = Repeated::new("host registration in the central redis");
        // When a follower last heard the leader's heartbeat, and registered itself.
        let mut last_beat: Option<Instant> = None;
        let mut last_seen: Option<Instant> = None;
        let mut quiet_since: Option<Instant> = None;
        loop {
            let beat = tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                b = self.pause(held.is_some(), last_beat) => b,
            };
            if *shutdown.borrow() {
                break;
            }
            if last_seen.is_none_or(|t| t.elapsed() >= self.timing.lease) {
                last_seen = Some(Instant::now());
                self.register(&mut seen_errors).await;
            }
            if let Some(Beat::Leader(lease)) = &beat {
                last_beat = Some(Instant::now());
                quiet_since = None;
                // A leader heard, in an available AZ: nothing to do this time.
                if lease.id != self.id && self.azs.available(&lease.az) {
                    continue;
                }
            }
            held = match held.take() {
                Some(h) => self.keep(h, &tx, &mut errors).await,
                None => {
                    let followed = tokio::select! {
                        biased;
                        _ = shutdown.changed() => break,
                        r = self.follow() => r,
                    };
                    self.took_part(followed, &tx, &mut errors)
                }
            };
            if held.is_none() && !matches!(beat, Some(Beat::Leader(_))) {
                // Still no leader heard: keep looking every tick; a subscription quiet for
                // two leases may be on a dead path (a failed-over primary): made anew.
                last_beat = last_beat.filter(|t| t.elapsed() < self.timing.lease);
                if quiet_since.get_or_insert_with(Instant::now).elapsed() >= self.timing.lease * 2 {
                    self.store.reset_beats().await;
                    quiet_since = None;
                }
            } else {
                quiet_since = None;
            }
        }
        // Stop acting first, then give the lease up.
        tx.send_replace(Leadership::Following);
        if let Some(h) = held {
            self.release(&h.lease).await;
        }
    }

    /// Between two looks: a leader ticks; a follower waits for the heartbeat (or a
    /// wake-up), and looks at the lease itself only when the heartbeat has been quiet
    /// for a lease (`Some(Beat::Quiet)`); `None` for a leader's tick.
    async fn pause(&self, leading: bool, last_beat: Option<Instant>) -> Option<Beat> {
        if leading {
            tokio::time::sleep(self.timing.tick).await;
            return None;
        }
        let max = match last_beat.map(|t| t.elapsed()) {
            Some(q) if q < self.timing.lease => self.timing.lease - q,
            _ => self.timing.tick,
        };
        match self.store.wait_beat(&self.id, max).await {
            Ok(beat) => Some(beat),
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat wait failed");
                tokio::time::sleep(self.timing.tick).await;
                Some(Beat::Quiet)
            }
        }
    }

    /// Says this host is alive (and in which AZ) for a successor's choice; the central
    /// Redis's readiness follows.
    async fn register(&self, seen_errors: &mut Repeated) {
        let up = match self
            .store
            .seen(&self.id, &self.az, self.timing.lease * 10)
            .await
        {
            Ok(()) => {
                seen_errors.cleared();
                true
            }
            Err(e) => {
                seen_errors.failed(&e.0);
                false
            }
        };
        crate::metrics::get().set_up(crate::metrics::Dependency::CentralRedis, up);
    }

    /// A follower's look at the lease, as it turned out: leading (published), or not.
    fn took_part(
        &self,
        followed: Result<Option<Held>, StoreError>,
        tx: &watch::Sender<Leadership>,
        errors: &mut Repeated,
    ) -> Option<Held> {
        match followed {
            Ok(Some(h)) => {
                errors.cleared();
                tracing::info!(epoch = h.lease.epoch, az = %self.az, "became leader");
                tx.send_replace(Leadership::Leading {
                    lease: h.lease.clone(),
                    deadline: h.deadline,
                });
                Some(h)
            }
            Ok(None) => {
                errors.cleared();
                None
            }
            Err(e) => {
                errors.failed(&e.0);
                None
            }
        }
    }

    /// One leader's tick: renew within the deadline, or step down.
    async fn keep(
        &self,
        mut h: Held,
        tx: &watch::Sender<Leadership>,
        errors: &mut Repeated,
    ) -> Option<Held> {
        // A renewal that fails on the store's side (a timeout, a connection dropped by a
        // failover) is tried again on a new connection, within the deadline: a leader
        // whose primary was replaced keeps its lease on the new one if it is there.
        let attempt = async {
            let mut sent = Instant::now();
            match self.renew(&h.lease).await {
                Err(StepDown::Store(first)) => {
                    tracing::debug!(error = %first, "renewal failed; trying again on a new connection");
                    sent = Instant::now();
                    self.renew(&h.lease).await.map(|()| sent)
                }
                other => other.map(|()| sent),
            }
        };
        let reason = match tokio::time::timeout_at(h.deadline, attempt).await {
            Ok(Ok(sent)) => {
                errors.cleared();
                h.deadline = sent + self.timing.lease - self.timing.margin();
                tx.send_modify(|l| {
                    if let Leadership::Leading { deadline, .. } = l {
                        *deadline = h.deadline;
                    }
                });
                return Some(h);
            }
            Ok(Err(reason)) => reason,
            Err(_) => StepDown::Deadline,
        };
        tx.send_replace(Leadership::Following);
        tracing::warn!(epoch = h.lease.epoch, "stepping down: {reason}");
        if matches!(reason, StepDown::OwnAz(_)) {
            self.release(&h.lease).await;
        }
        None
    }

    /// Checks the own AZ, then renews (the store checks the kill message in the same
    /// step). `Err` says why to step down.
    async fn renew(&self, lease: &Lease) -> Result<(), StepDown> {
        if !self.azs.available(&self.az) {
            return Err(StepDown::OwnAz(self.az.clone()));
        }
        match self.store.renew(lease, self.timing.lease).await {
            Ok(Renewal::Renewed) => Ok(()),
            Ok(Renewal::NotOurs) => Err(StepDown::NotOurs),
            Ok(Renewal::Killed(e)) => Err(StepDown::Killed(e)),
            Err(e) => Err(StepDown::Store(e.0)),
        }
    }

    /// Gives the lease up, naming the most recently seen other host.
    async fn release(&self, lease: &Lease) {
        // Hosts register once a lease period.
        let recent = self.timing.lease * 2 + self.timing.tick;
        let hosts = self.store.live_hosts(recent).await.unwrap_or_default();
        let successor = choose_successor(&hosts, &self.id, recent, |az| self.azs.available(az));
        match self
            .store
            .release(lease, successor.as_deref(), self.timing.lease)
            .await
        {
            Ok(true) => tracing::info!(
                epoch = lease.epoch,
                successor = successor.as_deref().unwrap_or("none"),
                "leadership given up"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not give up the lease; it expires by itself")
            }
        }
    }

    /// A follower's tick: judge the leader, hold a competition when needed.
    async fn follow(&self) -> Result<Option<Held>, StoreError> {
        // A host in an unavailable AZ does not compete.
        if !self.azs.available(&self.az) {
            return Ok(None);
        }
        let lease = self.store.leader().await?;
        let age = self.store.heartbeat_age().await?;
        let leader_az_ok = lease.as_ref().is_none_or(|l| self.azs.available(&l.az));
        let depose = match judge(lease, age, leader_az_ok, &self.timing) {
            Verdict::Healthy => return Ok(None),
            Verdict::Vacant => None,
            Verdict::Depose(l) => Some(l),
        };
        // A departing leader named a successor: only that host takes the lease, at once.
        let named = match &depose {
            None => self.store.successor().await?,
            Some(_) => None,
        };
        match named.as_deref() {
            Some(s) if s == self.id => {}
            Some(_) => return Ok(None),
            None => {
                self.store.enter(&self.id, self.timing.guard * 3).await?;
                tokio::time::sleep(self.timing.guard).await;
                if self.store.winner().await?.as_deref() != Some(self.id.as_str()) {
                    return Ok(None);
                }
            }
        }
        let sent = Instant::now();
        Ok(self
            .store
            .acquire(&self.id, &self.az, self.timing.lease, depose.as_ref())
            .await?
            .map(|lease| Held {
                lease,
                deadline: sent + self.timing.lease - self.timing.margin(),
            }))
    }
}

/// Why a follower holds a competition (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A live leader in an available AZ: nothing to do.
    Healthy,
    /// No lease (expired or released): compete for a free lease.
    Vacant,
    /// The leader's AZ is not available: compete to depose exactly this lease.
    Depose(Lease),
}

pub(crate) fn judge(
    lease: Option<Lease>,
    heartbeat_age: Option<Duration>,
    leader_az_available: bool,
    timing: &Timing,
) -> Verdict {
    match lease {
        None => Verdict::Vacant,
        Some(l) if !leader_az_available => Verdict::Depose(l),
        // A lease whose heartbeat stopped (the holder renews both together) is treated
        // as vacant only once it expires; a heartbeat older than the lease means a
        // holder that is not renewing, and is deposed.
        Some(l) if heartbeat_age.is_some_and(|a| a > timing.lease * 2) => Verdict::Depose(l),
        Some(_) => Verdict::Healthy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judging_the_leader() {
        let t = Timing::default();
        let l = Lease {
            id: "i-1".into(),
            epoch: 1,
            az: "a".into(),
        };
        assert_eq!(judge(None, None, true, &t), Verdict::Vacant);
        assert_eq!(
            judge(Some(l.clone()), Some(Duration::from_millis(100)), true, &t),
            Verdict::Healthy
        );
        assert_eq!(
            judge(Some(l.clone()), Some(Duration::from_millis(100)), false, &t),
            Verdict::Depose(l.clone())
        );
        assert_eq!(
            judge(Some(l.clone()), Some(Duration::from_secs(60)), true, &t),
            Verdict::Depose(l)
        );
    }
}
