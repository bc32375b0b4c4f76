//! Load balancer membership: the host is registered in a service's classic ELB and
//! ELBv2 target groups while the service has a routed container here, and deregistered
//! after the service's drain time once it has none. One loop, [`run`], over a small
//! [`Membership`] trait: classic ELBs here ([`Classic`]), target groups in
//! `target_group.rs`, fakes in the tests.
//!
//! Deregistration happens only on positive knowledge: the wanted set is published by
//! the registrar only while its store is in sync with Docker, so a Docker or plugin
//! outage never removes the host. Every call is preceded by a membership check, so it
//! is idempotent; a failed call is tried again by this loop, with backoff per ELB.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use warden_aws_query::elb::Elb;
use warden_aws_query::QueryError;

use super::desired::ElbWant;
use crate::backoff::Backoff;

/// Re-check membership this often even when nothing changed (someone may have edited
/// the ELB by hand).
const RECHECK: Duration = Duration::from_secs(300);

/// What the loop needs of a kind of load balancer: whether the host is a member, and
/// joining or leaving. Every call is preceded by a membership check.
pub trait Membership: Send + Sync {
    type Key: Ord + Clone + Display + Send + Sync;
    /// For logs: `load balancer`, `target group`.
    const WHAT: &'static str;
    fn is_member(&self, key: &Self::Key) -> impl Future<Output = Result<bool, ElbError>> + Send;
    fn set(
        &self,
        key: &Self::Key,
        register: bool,
    ) -> impl Future<Output = Result<(), ElbError>> + Send;
    /// How long the balancer keeps draining the host's connections after it leaves.
    fn leave_delay(&self, key: &Self::Key) -> impl Future<Output = Duration> + Send {
        let _ = key;
        std::future::ready(Duration::ZERO)
    }
}

struct ElbState {
    /// The last wanted state published for it; kept when its service disappears from
    /// the definitions (docker-labels forgets a service with its last container).
    want: ElbWant,
    member: Option<bool>,
    checked_at: Option<Instant>,
    leave_at: Option<Instant>,
    next_try: Instant,
    backoff: Backoff,
    errors: crate::logs::Repeated,
    /// After a deregistration: when the balancer's own deregistration delay is over.
    gone_at: Option<Instant>,
}

/// The action for one ELB now (pure; tested in paused time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    Register,
    Deregister,
    /// Deregistration is due at this instant.
    WaitUntil(Instant),
}

pub fn decide(
    want: ElbWant,
    member: Option<bool>,
    leave_at: &mut Option<Instant>,
    now: Instant,
) -> Action {
    if want.wanted {
        *leave_at = None;
        return if member == Some(true) {
            Action::None
        } else {
            Action::Register
        };
    }
    if member == Some(false) {
        *leave_at = None;
        return Action::None;
    }
    let at = *leave_at.get_or_insert(now + want.drain);
    if now >= at {
        Action::Deregister
    } else {
        Action::WaitUntil(at)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ElbError {
    /// The balancer does not exist: an operator must fix the service's setting.
    #[error("{0} does not exist")]
    NotFound(String),
    /// A setting cannot work (a target type warden cannot be, no private IP...).
    #[error("{0}")]
    Config(String),
    /// Anything else: retried with backoff.
    #[error("{0}")]
    Aws(String),
}

/// Classic ELBs, by name, with the host's instance id.
pub struct Classic {
    pub client: Arc<Elb>,
    pub instance: String,
}

impl Membership for Classic {
    type Key = String;
    const WHAT: &'static str = "load balancer";
    async fn is_member(&self, elb: &String) -> Result<bool, ElbError> {
        is_member(&self.client, elb, &self.instance).await
    }
    async fn set(&self, elb: &String, register: bool) -> Result<(), ElbError> {
        act(&self.client, elb, &self.instance, register).await
    }
}

async fn is_member(client: &Elb, elb: &str, instance: &str) -> Result<bool, ElbError> {
    let out = client
        .instances(elb)
        .await
        .map_err(|e| classify(elb, "DescribeLoadBalancers", e));
    let ids = counted("DescribeLoadBalancers", out)?
        .ok_or_else(|| ElbError::NotFound(format!("load balancer {elb}")))?;
    Ok(ids.iter().any(|i| i == instance))
}

/// The error as the loop sorts it; one it retries names the call that failed.
fn classify(elb: &str, op: &str, e: QueryError) -> ElbError {
    match &e {
        QueryError::Service { code, .. }
            if code == "LoadBalancerNotFound" || code == "AccessPointNotFound" =>
        {
            ElbError::NotFound(format!("load balancer {elb}"))
        }
        _ => ElbError::Aws(format!("{op}: {e}")),
    }
}

/// Counts an ELB call by operation and outcome.
pub fn counted<T>(op: &str, r: Result<T, ElbError>) -> Result<T, ElbError> {
    let outcome = match &r {
        Ok(_) => "ok",
        Err(ElbError::NotFound(_)) => "not_found",
        Err(ElbError::Config(_)) => "refused",
        Err(ElbError::Aws(_)) => "error",
    };
    crate::metrics::Metrics::count(&crate::metrics::get().elb_calls, op, outcome);
    r
}

async fn act(client: &Elb, elb: &str, instance: &str, register: bool) -> Result<(), ElbError> {
    let op = if register {
        "RegisterInstancesWithLoadBalancer"
    } else {
        "DeregisterInstancesFromLoadBalancer"
    };
    let r = client
        .set(elb, instance, register)
        .await
        .map_err(|e| classify(elb, op, e));
    counted(op, r)
}

/// Follows the wanted memberships until shutdown.
pub async fn run<M: Membership>(
    lbs: M,
    mut wanted: watch::Receiver<BTreeMap<M::Key, ElbWant>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut states: BTreeMap<M::Key, ElbState> = BTreeMap::new();
    loop {
        let now = Instant::now();
        let desired = wanted.borrow_and_update().clone();
        let mut wake = now + Duration::from_secs(30);
        // A balancer no service names any more is not wanted: it is left after its drain.
        for (key, st) in states.iter_mut() {
            if !desired.contains_key(key) {
                st.want.wanted = false;
            }
        }
        for (key, want) in &desired {
            states
                .entry(key.clone())
                .and_modify(|st| st.want = *want)
                .or_insert_with(|| ElbState {
                    want: *want,
                    member: None,
                    checked_at: None,
                    leave_at: None,
                    next_try: now,
                    backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
                    errors: crate::logs::Repeated::new("load balancer call"),
                    gone_at: None,
                });
        }
        for (key, st) in states.iter_mut() {
            if let Some(at) = step(&lbs, key, st, now).await {
                wake = wake.min(at);
            }
        }
        // A balancer no service names any more, once the host is known to be out of it
        // (and its drain is over), is forgotten: no more polling of names nobody uses.
        states.retain(|key, st| desired.contains_key(key) || !settled_out(st));
        tokio::select! {
            r = wanted.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The host is out of the balancer and nothing is pending for it.
fn settled_out(st: &ElbState) -> bool {
    !st.want.wanted && st.member == Some(false) && st.gone_at.is_none() && st.leave_at.is_none()
}

/// One balancer's turn: decide, then check and act. Returns when to look again.
async fn step<M: Membership>(
    lbs: &M,
    key: &M::Key,
    st: &mut ElbState,
    now: Instant,
) -> Option<Instant> {
    let what = M::WHAT;
    if let Some(at) = st.gone_at {
        if now < at && !st.want.wanted {
            return Some(at);
        }
        st.gone_at = None;
        if !st.want.wanted {
            tracing::info!(balancer = %key, "{what} {key}: its deregistration delay is over; this host is gone from it");
        }
    }
    if st.checked_at.is_some_and(|t| now - t > RECHECK) {
        st.member = None;
    }
    let register = match decide(st.want, st.member, &mut st.leave_at, now) {
        Action::None => return None,
        Action::WaitUntil(at) => return Some(at),
        Action::Register => true,
        Action::Deregister => false,
    };
    if now < st.next_try {
        return Some(st.next_try);
    }
    let result = async {
        let member = lbs.is_member(key).await?;
        if member != register {
            lbs.set(key, register).await?;
        }
        Ok::<bool, ElbError>(member != register)
    }
    .await;
    match result {
        Ok(acted) => {
            st.member = Some(register);
            st.checked_at = Some(Instant::now());
            st.backoff.reset();
            st.errors.cleared();
            if acted && register {
                tracing::info!(balancer = %key, "registered in the {what} {key}");
            } else if acted {
                let delay = lbs.leave_delay(key).await;
                if delay > Duration::ZERO {
                    st.gone_at = Some(Instant::now() + delay);
                    tracing::info!(balancer = %key, delay_secs = delay.as_secs(), "deregistered from the {what} {key}; it drains this host's connections for {} s", delay.as_secs());
                    return st.gone_at;
                }
                tracing::info!(balancer = %key, "deregistered from the {what} {key}");
            }
            None
        }
        Err(e) => {
            let delay = st.backoff.next_delay();
            st.next_try = Instant::now() + delay;
            match e {
                ElbError::NotFound(_) | ElbError::Config(_) => {
                    if st.errors.note(&e.to_string(), Instant::now()) != crate::logs::Say::Nothing {
                        tracing::error!(balancer = %key, "{e}: fix the service's setting (retrying)")
                    }
                }
                ElbError::Aws(_) => st.errors.failed(&format!("{what} {key}: {e}")),
            }
            Some(st.next_try)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(wanted: bool, drain: u64) -> ElbWant {
        ElbWant {
            wanted,
            drain: Duration::from_secs(drain),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn registers_at_once_and_deregisters_after_the_drain() {
        let mut leave = None;
        assert_eq!(
            decide(want(true, 10), None, &mut leave, Instant::now()),
            Action::Register
        );
        assert_eq!(
            decide(want(true, 10), Some(true), &mut leave, Instant::now()),
            Action::None
        );
        let t0 = Instant::now();
        assert_eq!(
            decide(want(false, 10), Some(true), &mut leave, t0),
            Action::WaitUntil(t0 + Duration::from_secs(10))
        );
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(matches!(
            decide(want(false, 10), Some(true), &mut leave, Instant::now()),
            Action::WaitUntil(_)
        ));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            decide(want(false, 10), Some(true), &mut leave, Instant::now()),
            Action::Deregister
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_coming_back_cancels_the_pending_deregistration() {
        let mut leave = None;
        decide(want(false, 10), Some(true), &mut leave, Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            decide(want(true, 10), Some(true), &mut leave, Instant::now()),
            Action::None
        );
        assert_eq!(leave, None);
        tokio::time::advance(Duration::from_secs(6)).await;
        // A new drain starts from now, not from the first departure.
        let now = Instant::now();
        assert_eq!(
            decide(want(false, 10), Some(true), &mut leave, now),
            Action::WaitUntil(now + Duration::from_secs(10))
        );
    }

    /// A fake balancer: membership in memory, every call counted.
    #[derive(Default, Clone)]
    struct Fake {
        member: std::sync::Arc<std::sync::Mutex<bool>>,
        calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Membership for Fake {
        type Key = String;
        const WHAT: &'static str = "load balancer";
        async fn is_member(&self, _: &String) -> Result<bool, ElbError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(*self.member.lock().unwrap())
        }
        async fn set(&self, _: &String, register: bool) -> Result<(), ElbError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            *self.member.lock().unwrap() = register;
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_balancer_no_longer_named_is_left_then_no_longer_polled() {
        let fake = Fake::default();
        let (tx, rx) = watch::channel(BTreeMap::from([("web".to_owned(), want(true, 5))]));
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(run(fake.clone(), rx, stop));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(*fake.member.lock().unwrap(), "registered");
        // The service is gone from the definitions: left after its drain...
        tx.send(BTreeMap::new()).unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            !*fake.member.lock().unwrap(),
            "deregistered after the drain"
        );
        // ...then forgotten: an hour passes (12 rechecks) without a single call.
        let calls = fake.calls.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(fake.calls.load(std::sync::atomic::Ordering::SeqCst), calls);
        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[test]
    fn not_a_member_and_not_wanted_is_left_alone() {
        let mut leave = None;
        assert_eq!(
            decide(want(false, 0), Some(false), &mut leave, Instant::now()),
            Action::None
        );
    }
}
