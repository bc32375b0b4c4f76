//! Fakes of the manager's edges (central Redis, ECS, a metric plugin) and the tests of the
//! elector and worker loops against them, in paused tokio time: slow calls, a lease lost
//! mid-batch, a hung renewal, a refused fence, a handover on shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use warden_plugin_api::Measurement;

use super::central::{CallEntry, LeaseStore, Ledger, LiveHost, Renewal, StoreResult};
use super::ecs::{Calls, Ecs, EcsError, RunTask, Started, Task};
use super::leadership::Guard;
use super::lease::Lease;
use super::metric::{BoxFuture, Metric, MetricError};
use super::policy::PolicyState;
use super::Record;
use crate::plugins::Isolation;

#[derive(Default)]
pub(crate) struct CentralState {
    origin: Option<Instant>,
    lease: Option<(Lease, Instant)>,
    epoch: u64,
    heartbeat: Option<Instant>,
    candidates: BTreeMap<String, (u32, Instant)>,
    kills: HashMap<String, u64>,
    successor: Option<(String, Instant)>,
    hosts: BTreeMap<String, (String, Instant)>,
    pub records: Vec<Record>,
    pub journal: Vec<(String, CallEntry)>,
    policy: HashMap<String, PolicyState>,
    pub acquires: u32,
    /// Every renewal never answers.
    pub hang_renew: bool,
    /// The fence always says no.
    pub refuse_fence: bool,
}

/// The central Redis, in memory, in tokio time.
#[derive(Clone, Default)]
pub(crate) struct FakeCentral {
    pub s: Arc<Mutex<CentralState>>,
    wakes: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

impl FakeCentral {
    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, CentralState> {
        self.s.lock().unwrap()
    }

    fn lease_now(s: &mut CentralState) -> Option<Lease> {
        match &s.lease {
            Some((l, until)) if Instant::now() < *until => Some(l.clone()),
            _ => {
                s.lease = None;
                None
            }
        }
    }

    /// Another host takes the lease (as if ours expired and it won).
    pub(crate) fn steal(&self, id: &str) -> Lease {
        let mut s = self.state();
        s.epoch += 1;
        let l = Lease {
            id: id.into(),
            epoch: s.epoch,
            az: "b".into(),
        };
        s.lease = Some((l.clone(), Instant::now() + Duration::from_secs(3600)));
        s.heartbeat = Some(Instant::now() + Duration::from_secs(3600));
        l
    }

    fn wake(&self, id: &str) -> Arc<Notify> {
        self.wakes
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    pub(crate) fn leader_id(&self) -> Option<String> {
        Self::lease_now(&mut self.state()).map(|l| l.id)
    }
}

impl LeaseStore for FakeCentral {
    async fn leader(&self) -> StoreResult<Option<Lease>> {
        Ok(Self::lease_now(&mut self.state()))
    }
    async fn heartbeat_age(&self) -> StoreResult<Option<Duration>> {
        Ok(self
            .state()
            .heartbeat
            .map(|t| Instant::now().saturating_duration_since(t)))
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> StoreResult<Renewal> {
        if self.state().hang_renew {
            std::future::pending::<()>().await;
        }
        let mut s = self.state();
        if Self::lease_now(&mut s).as_ref() != Some(lease) {
            return Ok(Renewal::NotOurs);
        }
        if let Some(&e) = s.kills.get(&lease.id).filter(|e| **e > lease.epoch) {
            return Ok(Renewal::Killed(e));
        }
        s.lease = Some((lease.clone(), Instant::now() + ttl));
        s.heartbeat = Some(Instant::now());
        Ok(Renewal::Renewed)
    }
    async fn acquire(
        &self,
        id: &str,
        az: &str,
        ttl: Duration,
        depose: Option<&Lease>,
    ) -> StoreResult<Option<Lease>> {
        let mut s = self.state();
        let cur = Self::lease_now(&mut s);
        if cur.is_some() && cur.as_ref() != depose {
            return Ok(None);
        }
        s.epoch += 1;
        s.acquires += 1;
        let l = Lease {
            id: id.into(),
            epoch: s.epoch,
            az: az.into(),
        };
        s.lease = Some((l.clone(), Instant::now() + ttl));
        s.heartbeat = Some(Instant::now());
        s.candidates.clear();
        if s.successor.as_ref().is_some_and(|(x, _)| x == id) {
            s.successor = None;
        }
        Ok(Some(l))
    }
    async fn release(
        &self,
        lease: &Lease,
        successor: Option<&str>,
        ttl: Duration,
    ) -> StoreResult<bool> {
        {
            let mut s = self.state();
            if Self::lease_now(&mut s).as_ref() != Some(lease) {
                return Ok(false);
            }
            s.lease = None;
            if let Some(x) = successor {
                s.successor = Some((x.to_owned(), Instant::now() + ttl));
            }
        }
        if let Some(x) = successor {
            self.wake(x).notify_one();
        }
        Ok(true)
    }
    async fn enter(&self, id: &str, ttl: Duration) -> StoreResult<()> {
        let score = fastrand::u32(0..1_000_000);
        self.state()
            .candidates
            .insert(id.to_owned(), (score, Instant::now() + ttl));
        Ok(())
    }
    async fn winner(&self) -> StoreResult<Option<String>> {
        let s = self.state();
        let alive: Vec<(String, f64)> = s
            .candidates
            .iter()
            .filter(|(_, (_, until))| Instant::now() < *until)
            .map(|(id, (score, _))| (id.clone(), f64::from(*score)))
            .collect();
        Ok(super::lease::pick_winner(&alive))
    }
    async fn successor(&self) -> StoreResult<Option<String>> {
        let s = self.state();
        Ok(s.successor
            .as_ref()
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(x, _)| x.clone()))
    }
    async fn seen(&self, id: &str, az: &str, _ttl: Duration) -> StoreResult<()> {
        self.state()
            .hosts
            .insert(id.to_owned(), (az.to_owned(), Instant::now()));
        Ok(())
    }
    async fn live_hosts(&self, max_age: Duration) -> StoreResult<Vec<LiveHost>> {
        let s = self.state();
        Ok(s.hosts
            .iter()
            .map(|(id, (az, t))| LiveHost {
                id: id.clone(),
                az: az.clone(),
                age: t.elapsed(),
            })
            .filter(|h| h.age <= max_age)
            .collect())
    }
    async fn wait_wake(&self, id: &str, max: Duration) -> StoreResult<bool> {
        let n = self.wake(id);
        tokio::select! {
            _ = n.notified() => Ok(true),
            _ = tokio::time::sleep(max) => Ok(false),
        }
    }
}

impl Ledger for FakeCentral {
    async fn now_ms(&self) -> StoreResult<u64> {
        let mut s = self.state();
        let origin = *s.origin.get_or_insert_with(Instant::now);
        Ok(origin.elapsed().as_millis() as u64 + 1_000_000)
    }
    async fn policy_state(&self, service: &str) -> StoreResult<PolicyState> {
        Ok(self
            .state()
            .policy
            .get(service)
            .cloned()
            .unwrap_or_default())
    }
    async fn last_record(&self, service: &str) -> StoreResult<Option<Record>> {
        Ok(self
            .state()
            .records
            .iter()
            .rev()
            .find(|r| r.service == service)
            .cloned())
    }
    async fn fence(
        &self,
        lease: &Lease,
        min_left: Duration,
        service: &str,
        call: &CallEntry,
    ) -> StoreResult<bool> {
        let mut s = self.state();
        if s.refuse_fence {
            return Ok(false);
        }
        let ok = match &s.lease {
            Some((l, until)) => l == lease && *until >= Instant::now() + min_left,
            None => false,
        };
        if ok {
            s.journal.push((service.to_owned(), call.clone()));
        }
        Ok(ok)
    }
    async fn journal(&self, service: &str, call: &CallEntry) -> StoreResult<()> {
        self.state()
            .journal
            .push((service.to_owned(), call.clone()));
        Ok(())
    }
    async fn record(
        &self,
        lease: &Lease,
        record: &Record,
        state: &PolicyState,
    ) -> StoreResult<bool> {
        let mut s = self.state();
        if Self::lease_now(&mut s).as_ref() != Some(lease) {
            return Ok(false);
        }
        s.records.push(record.clone());
        s.policy.insert(record.service.clone(), state.clone());
        Ok(true)
    }
}

/// One ECS call as it left the host.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sent {
    pub at: Instant,
    pub op: &'static str,
    pub epoch: u64,
}

#[derive(Default)]
pub(crate) struct EcsState {
    pub tasks: Vec<String>,
    next: u64,
    pub sent: Vec<Sent>,
    pub latency: Duration,
    pub service_desired: u32,
}

/// ECS in memory: the guard is checked when a call is sent, as the AWS client's
/// interceptor does; the effect lands after `latency`.
#[derive(Clone, Default)]
pub(crate) struct FakeEcs(pub Arc<Mutex<EcsState>>);

impl FakeEcs {
    pub(crate) fn with_latency(latency: Duration) -> Self {
        let f = FakeEcs::default();
        f.0.lock().unwrap().latency = latency;
        f
    }
    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, EcsState> {
        self.0.lock().unwrap()
    }
    async fn send(&self, op: &'static str, guard: &Guard) -> Result<(), EcsError> {
        guard.check().map_err(|e| EcsError::NotSent {
            op,
            why: e.to_string(),
        })?;
        let latency = {
            let mut s = self.state();
            s.sent.push(Sent {
                at: Instant::now(),
                op,
                epoch: guard.epoch(),
            });
            s.latency
        };
        tokio::time::sleep(latency).await;
        Ok(())
    }
}

impl Ecs for FakeEcs {
    async fn list_tasks(
        &self,
        _c: &str,
        _f: &str,
        _s: &str,
        guard: &Guard,
        calls: &mut Calls,
    ) -> Result<Vec<String>, EcsError> {
        calls.list_tasks += 1;
        self.send("ListTasks", guard).await?;
        Ok(self.state().tasks.clone())
    }
    async fn describe_tasks(
        &self,
        _c: &str,
        arns: &[String],
        guard: &Guard,
        calls: &mut Calls,
    ) -> Result<Vec<Task>, EcsError> {
        calls.describe_tasks += 1;
        self.send("DescribeTasks", guard).await?;
        Ok(arns
            .iter()
            .map(|a| Task {
                arn: a.clone(),
                last_status: crate::manager::ecs::TaskStatus::Running,
                az: "a".into(),
            })
            .collect())
    }
    async fn run_task(&self, req: &RunTask, guard: &Guard) -> Result<Started, EcsError> {
        self.send("RunTask", guard).await?;
        let mut s = self.state();
        let mut arns = Vec::new();
        for _ in 0..req.count {
            s.next += 1;
            let arn = format!("task-{:04}", s.next);
            s.tasks.push(arn.clone());
            arns.push(arn);
        }
        Ok(Started {
            arns,
            failures: Vec::new(),
        })
    }
    async fn stop_task(&self, _c: &str, arn: &str, guard: &Guard) -> Result<(), EcsError> {
        self.send("StopTask", guard).await?;
        self.state().tasks.retain(|t| t != arn);
        Ok(())
    }
    async fn service_desired(&self, _c: &str, _s: &str, guard: &Guard) -> Result<u32, EcsError> {
        self.send("DescribeServices", guard).await?;
        Ok(self.state().service_desired)
    }
    async fn set_service_desired(
        &self,
        _c: &str,
        _s: &str,
        desired: u32,
        guard: &Guard,
    ) -> Result<(), EcsError> {
        self.send("UpdateService", guard).await?;
        self.state().service_desired = desired;
        Ok(())
    }
}

/// A metric source answering `value` after `delay`.
pub(crate) struct FakeMetric {
    pub value: Arc<Mutex<f64>>,
    pub delay: Duration,
}

impl Metric for FakeMetric {
    fn isolation(&self) -> Option<Isolation> {
        Some(Isolation::InProcess)
    }
    fn measure(&self) -> BoxFuture<'_, Result<Measurement, MetricError>> {
        let value = *self.value.lock().unwrap();
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            Ok(Measurement {
                value,
                unit: None,
                labels: Default::default(),
                detail: None,
            })
        })
    }
    fn map(&self, value: f64) -> BoxFuture<'_, Result<f64, MetricError>> {
        Box::pin(async move { Ok(value) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::az::AzCache;
    use crate::manager::election::{Elector, Timing};
    use crate::manager::leadership::Leadership;
    use crate::manager::policy::{Mapping, Policy};
    use crate::manager::worker::Worker;
    use crate::manager::{ManagedService, Target};
    use tokio::sync::watch;

    struct Host {
        leadership: watch::Receiver<Leadership>,
        stop: watch::Sender<bool>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    fn service(metric: f64, delay: Duration) -> (ManagedService, Arc<Mutex<f64>>) {
        let value = Arc::new(Mutex::new(metric));
        let client = Arc::new(FakeMetric {
            value: value.clone(),
            delay,
        });
        (
            ManagedService {
                name: "web".into(),
                cluster: "c1".into(),
                target: Target::Tasks {
                    task_definition: "web".into(),
                    family: "web".into(),
                },
                metric: client,
                mapper: None,
                mapping: Mapping::TargetPerTask(1.0),
                policy: Policy {
                    max: 100,
                    scale_down_window_secs: 0,
                    tolerance: 0.0,
                    ..Policy::default()
                },
            },
            value,
        )
    }

    fn start(
        id: &str,
        central: &FakeCentral,
        ecs: &FakeEcs,
        services: Vec<ManagedService>,
    ) -> Host {
        let (stop, shutdown) = watch::channel(false);
        let (tx, rx) = watch::channel(Leadership::Following);
        let timing = Timing::default();
        let elector = Elector {
            id: id.into(),
            az: "a".into(),
            store: central.clone(),
            timing,
            azs: AzCache::default(),
        };
        let worker = Worker {
            id: id.into(),
            ecs: Some(ecs.clone()),
            ledger: central.clone(),
            plan: tokio::sync::watch::channel(crate::manager::worker::Plan {
                services,
                loop_interval: Duration::from_secs(1),
                dry_run: false,
                refused: Vec::new(),
            })
            .1,
            margin: timing.margin(),
        };
        let tasks = vec![
            tokio::spawn(elector.run(tx, shutdown.clone())),
            tokio::spawn(worker.run(rx.clone(), shutdown)),
        ];
        Host {
            leadership: rx,
            stop,
            tasks,
        }
    }

    async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !f() {
            assert!(Instant::now() < deadline, "not within {within:?}: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// 1.5 s per ECS call and a 6 s metric: the lease is renewed throughout, by one leader.
    #[tokio::test(start_paused = true)]
    async fn slow_work_never_costs_the_lease() {
        let central = FakeCentral::default();
        let ecs = FakeEcs::with_latency(Duration::from_millis(1500));
        let (svc, _) = service(30.0, Duration::from_secs(6));
        let _h = start("i-1", &central, &ecs, vec![svc]);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(central.state().acquires, 1, "leadership changed hands");
        assert_eq!(central.leader_id().as_deref(), Some("i-1"));
        assert_eq!(ecs.state().tasks.len(), 30, "the work got done meanwhile");
    }

    /// The lease goes to another host between two batches, before this host's elector
    /// has noticed (its next renewal is up to a tick away): the fence before the next
    /// batch refuses, and no call of the old epoch leaves after that moment.
    #[tokio::test(start_paused = true)]
    async fn a_lease_lost_mid_batch_stops_every_later_call() {
        let central = FakeCentral::default();
        let ecs = FakeEcs::with_latency(Duration::from_millis(40));
        let (svc, _) = service(30.0, Duration::ZERO);
        let h = start("i-1", &central, &ecs, vec![svc]);
        until("a first RunTask", Duration::from_secs(10), || {
            ecs.state().sent.iter().any(|s| s.op == "RunTask")
        })
        .await;
        let stolen_at = Instant::now();
        let new = central.steal("i-2");
        tokio::time::sleep(Duration::from_secs(20)).await;
        let late: Vec<Sent> = ecs
            .state()
            .sent
            .iter()
            .filter(|s| s.at > stolen_at && s.epoch < new.epoch)
            .cloned()
            .collect();
        assert!(late.is_empty(), "calls after the lease was lost: {late:?}");
        assert_eq!(*h.leadership.borrow(), Leadership::Following);
        assert_eq!(ecs.state().tasks.len(), 10, "only the first batch went out");
    }

    /// Renewals hang: the deadline passes, and nothing is sent after it even though the
    /// fence, answered by a Redis that still has the lease, would say yes.
    #[tokio::test(start_paused = true)]
    async fn a_hung_renewal_stops_calls_at_the_deadline() {
        let central = FakeCentral::default();
        let ecs = FakeEcs::with_latency(Duration::from_millis(100));
        let (svc, value) = service(3.0, Duration::ZERO);
        let mut h = start("i-1", &central, &ecs, vec![svc]);
        until("3 tasks", Duration::from_secs(10), || {
            ecs.state().tasks.len() == 3
        })
        .await;
        let (epoch, deadline) = match &*h.leadership.borrow_and_update() {
            Leadership::Leading { lease, deadline } => (lease.epoch, *deadline),
            other => panic!("not leading: {other:?}"),
        };
        central.state().hang_renew = true;
        *value.lock().unwrap() = 50.0;
        tokio::time::sleep(Duration::from_secs(10)).await;
        let late = ecs
            .state()
            .sent
            .iter()
            .filter(|s| s.epoch == epoch && s.at >= deadline)
            .count();
        assert_eq!(late, 0, "calls of epoch {epoch} sent after its deadline");
        // Once its lease expired the host may be elected again, under a new epoch.
        assert!(h.leadership.borrow().epoch() != Some(epoch));
    }

    /// The fence says no: no mutating call is sent and nothing is journalled.
    #[tokio::test(start_paused = true)]
    async fn a_refused_fence_sends_nothing() {
        let central = FakeCentral::default();
        central.state().refuse_fence = true;
        let ecs = FakeEcs::default();
        let (svc, _) = service(5.0, Duration::ZERO);
        let _h = start("i-1", &central, &ecs, vec![svc]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let sent: Vec<&str> = ecs.state().sent.iter().map(|s| s.op).collect();
        assert!(sent.contains(&"ListTasks"), "{sent:?}");
        assert!(
            !sent.contains(&"RunTask"),
            "a RunTask went out past a refused fence: {sent:?}"
        );
        assert!(central.state().journal.is_empty());
        let rec = central.state().records.last().cloned().expect("a record");
        assert!(
            matches!(&rec.outcome, crate::manager::Outcome::Interrupted { sent: 0, why } if why.contains("fence refused")),
            "{:?}",
            rec.outcome
        );
    }

    /// Shutdown of the leader: it stops acting, gives the lease up and names the other
    /// host, which takes it at once, without a competition.
    #[tokio::test(start_paused = true)]
    async fn shutdown_hands_over_at_once() {
        let central = FakeCentral::default();
        let ecs = FakeEcs::default();
        let (s1, _) = service(2.0, Duration::ZERO);
        let (s2, _) = service(2.0, Duration::ZERO);
        let a = start("i-a", &central, &ecs, vec![s1]);
        until("a leader", Duration::from_secs(10), || {
            central.leader_id().is_some()
        })
        .await;
        let first = central.leader_id().unwrap();
        let b = start("i-b", &central, &ecs, vec![s2]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (leader, other) = if first == "i-a" { (a, b) } else { (b, a) };
        let t0 = Instant::now();
        leader.stop.send_replace(true);
        for t in leader.tasks {
            t.await.unwrap();
        }
        assert_eq!(*leader.leadership.borrow(), Leadership::Following);
        until("the other host leads", Duration::from_secs(5), || {
            central.leader_id().is_some_and(|l| l != first)
        })
        .await;
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "handover took {:?}",
            t0.elapsed()
        );
        assert_eq!(central.state().acquires, 2);
        drop(other);
    }
}
