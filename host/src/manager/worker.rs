//! The leader's scaling work, kept apart from the lease.
//!
//! The worker waits until the elector publishes "leading with epoch E", then runs one loop
//! per managed service, concurrently (a slow metric of one service delays no other), until
//! that epoch stops being published: then the work in flight is dropped at once. Each
//! loop: read the metric (and map it), count what runs in ECS, decide (a pure function),
//! act, record. Every mutating ECS call (each RunTask batch, each StopTask, each
//! UpdateService) is preceded by the fence in the central Redis, which also journals the
//! call with its epoch, and by the local deadline check after the fence; the AWS client
//! checks the deadline once more right before each attempt is transmitted.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use warden_plugin_api::Measurement;

use super::central::{CallEntry, Ledger};
use super::ecs::{self, Calls, Ecs, EcsError, RunTask};
use super::leadership::{Guard, Leadership};
use super::lease::Lease;
use super::policy::{self, Decision, PolicyState};
use super::{ManagedService, MetricError, Outcome, Record, Target};

/// The scaling work; `ecs` is `None` where there is no ECS to call (it then decides and
/// records only, as in dry-run).
pub(crate) struct Worker<E: Ecs, L: Ledger> {
    pub id: String,
    pub ecs: Option<E>,
    pub ledger: L,
    /// What to scale, replaced whole by a configuration reload.
    pub plan: watch::Receiver<Plan>,
    /// Lease time the fence asks to be left before each call.
    pub margin: Duration,
}

/// The managed services and how the loops run: what a reload may change without
/// touching the lease.
#[derive(Clone)]
pub(crate) struct Plan {
    pub services: Vec<ManagedService>,
    pub loop_interval: Duration,
    /// Decide and record, call nothing.
    pub dry_run: bool,
    /// Managed services from sources refused by their grants, for `warden status`.
    pub refused: Vec<super::sources::ManagedRefusal>,
}

/// The metric as read, and as mapped by a mapping plugin.
#[derive(Debug, Clone)]
pub(crate) struct Reading {
    pub metric: Result<Measurement, MetricError>,
    pub mapped: Option<Result<f64, MetricError>>,
    /// Where the metric source's instance runs (none before it is created).
    pub isolation: Option<crate::plugins::settings::Isolation>,
}

impl Reading {
    /// The value the policy maps, or why there is none.
    pub(crate) fn input(&self) -> Result<f64, String> {
        match (&self.metric, &self.mapped) {
            (Err(e), _) => Err(e.to_string()),
            (Ok(_), Some(Err(e))) => Err(format!("mapping: {e}")),
            (Ok(_), Some(Ok(v))) => Ok(*v),
            (Ok(m), None) => Ok(m.value),
        }
    }
}

/// What runs now, as counted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Count {
    /// Dry-run: nothing is counted; the last decision's desired count stands in.
    NotCounted(u32),
    Tasks(Vec<String>),
    Service(u32),
}

impl Count {
    fn current(&self) -> u32 {
        match self {
            Count::NotCounted(n) | Count::Service(n) => *n,
            Count::Tasks(arns) => arns.len() as u32,
        }
    }
    fn running(&self) -> Option<u32> {
        match self {
            Count::NotCounted(_) => None,
            _ => Some(self.current()),
        }
    }
}

/// Resolves when a new plan is published; never once no more can be (the sender gone).
async fn changed(plans: &mut watch::Receiver<Plan>) {
    if plans.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits for a term: leading with a deadline still ahead. `None` when the elector is gone.
async fn next_term(rx: &mut watch::Receiver<Leadership>) -> Option<Lease> {
    loop {
        if let Leadership::Leading { lease, deadline } = &*rx.borrow_and_update() {
            if *deadline > Instant::now() {
                return Some(lease.clone());
            }
        }
        rx.changed().await.ok()?;
    }
}

async fn read_metric(s: &ManagedService) -> Reading {
    let isolation = s.metric.isolation();
    let metric = s.metric.measure().await;
    let mapped = match (&metric, &s.mapper) {
        (Ok(m), Some(mapper)) => Some(mapper.map(m.value).await),
        _ => None,
    };
    Reading {
        metric,
        mapped,
        isolation,
    }
}

impl<E: Ecs, L: Ledger> Worker<E, L> {
    pub(crate) async fn run(
        self,
        mut leadership: watch::Receiver<Leadership>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut plans = self.plan.clone();
        loop {
            let lease = tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                l = next_term(&mut leadership) => match l {
                    Some(l) => l,
                    None => return,
                },
            };
            let guard = Guard::new(leadership.clone(), lease.epoch);
            // One plan at a time; a new plan (a reload) restarts the loops, same lease.
            loop {
                let plan = plans.borrow_and_update().clone();
                let refused = serde_json::to_string(&plan.refused).expect("refusals serialize");
                if let Err(e) = self.ledger.note_refused(&lease, &refused).await {
                    tracing::debug!(error = %e, "refused managed services not published");
                }
                let names: Vec<&str> = plan.services.iter().map(|s| s.name.as_str()).collect();
                let names = serde_json::to_string(&names).expect("names serialize");
                if let Err(e) = self.ledger.note_managed(&lease, &names).await {
                    tracing::debug!(error = %e, "managed services not published");
                }
                tracing::info!(
                    epoch = lease.epoch,
                    services = plan.services.len(),
                    dry_run = plan.dry_run,
                    "leading: scaling work started"
                );
                // Test builds: `WARDEN_TEST_PANIC=worker:<n>` panics the first n terms.
                static TERMS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let term = TERMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if crate::supervisor::injected_panic("worker", term) {
                    panic!("injected by WARDEN_TEST_PANIC (worker term {term})");
                }
                let work = async {
                    self.term(&plan, &lease, &guard).await;
                    // No services: nothing to do until the plan or the lease changes.
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    _ = guard.lost() => {
                        tracing::info!(epoch = lease.epoch, "scaling work stopped: this host no longer leads");
                        break;
                    }
                    _ = changed(&mut plans) => {
                        tracing::info!(epoch = lease.epoch, "managed services changed by a reload; loops restarted under the same lease");
                    }
                    _ = work => {}
                }
            }
        }
    }

    async fn term(&self, plan: &Plan, lease: &Lease, guard: &Guard) {
        let ecs = if plan.dry_run {
            None
        } else {
            self.ecs.as_ref()
        };
        let interval = plan.loop_interval;
        let loops = plan.services.iter().map(|s| async move {
            // A loop skipped for the same reason is said once, then once a minute.
            let mut skipped = crate::logs::Repeated::new("scaling loop skipped");
            loop {
                let next = Instant::now() + interval;
                match self.once(ecs, s, lease, guard).await {
                    Ok(()) => skipped.cleared(),
                    Err(why) => skipped.failed(&format!("service {}: {why}", s.name)),
                }
                tokio::time::sleep_until(next).await;
            }
        });
        futures_util::future::join_all(loops).await;
    }

    /// One loop for one service; `Err` says why it was skipped.
    async fn once(
        &self,
        ecs: Option<&E>,
        s: &ManagedService,
        lease: &Lease,
        guard: &Guard,
    ) -> Result<(), String> {
        let reading = read_metric(s).await;
        let (now_ms, state) = self.state(s).await.map_err(|e| e.to_string())?;
        let mut state = state.for_epoch(lease.epoch);
        let mut calls = Calls::default();
        let count = self
            .count(ecs, s, guard, &mut calls)
            .await
            .map_err(|e| format!("cannot count what runs: {e}"))?;
        let current = count.current();
        let decision = policy::decide(
            reading.input(),
            current,
            now_ms,
            &s.mapping,
            &s.policy,
            &mut state,
        );
        let outcome = match (ecs, decision.desired == current) {
            (None, _) => Outcome::DryRun,
            (Some(_), true) => Outcome::None,
            (Some(ecs), false) => {
                self.act(ecs, s, lease, guard, &decision, &count, &state, &mut calls)
                    .await
            }
        };
        if calls.run_task + calls.stop_task + calls.update_service > 0 {
            state.last_action_ms = Some(now_ms);
            // A step whose outcome is unknown keeps its sequence number, so that the next
            // loop's retry of the same step carries the same clientToken.
            if !outcome.unknown() {
                state.actions += 1;
            }
        }
        let record = Record::new(
            s, &self.id, lease, now_ms, &reading, &count, decision, outcome, calls,
        );
        record.log();
        record.observe();
        match self.ledger.record(lease, &record, &state).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::warn!(service = %s.name, epoch = lease.epoch, "decision not recorded: this epoch no longer holds the lease");
                Ok(())
            }
            Err(e) => Err(format!("decision not recorded: {e}")),
        }
    }

    async fn state(
        &self,
        s: &ManagedService,
    ) -> Result<(u64, PolicyState), super::central::StoreError> {
        Ok((
            self.ledger.now_ms().await?,
            self.ledger.policy_state(&s.name).await?,
        ))
    }

    async fn count(
        &self,
        ecs: Option<&E>,
        s: &ManagedService,
        guard: &Guard,
        calls: &mut Calls,
    ) -> Result<Count, EcsError> {
        let Some(ecs) = ecs else {
            let last = self.ledger.last_record(&s.name).await.ok().flatten();
            return Ok(Count::NotCounted(last.map_or(0, |r| r.decision.desired)));
        };
        match &s.target {
            Target::Tasks { family, .. } => ecs
                .list_tasks(&s.cluster, family, &s.started_by(), guard, calls)
                .await
                .map(Count::Tasks),
            Target::Service { service } => ecs
                .service_desired(&s.cluster, service, guard)
                .await
                .map(Count::Service),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn act(
        &self,
        ecs: &E,
        s: &ManagedService,
        lease: &Lease,
        guard: &Guard,
        d: &Decision,
        count: &Count,
        state: &PolicyState,
        calls: &mut Calls,
    ) -> Outcome {
        let call = Caller {
            worker: self,
            s,
            lease,
            guard,
        };
        match (&s.target, count) {
            (
                Target::Tasks {
                    task_definition, ..
                },
                Count::Tasks(_),
            ) if d.desired > d.current => {
                call.run(ecs, task_definition, d, state.actions, calls)
                    .await
            }
            (Target::Tasks { .. }, Count::Tasks(arns)) => {
                call.stop(ecs, arns, (d.current - d.desired) as usize, calls)
                    .await
            }
            (Target::Service { service }, _) => call.set(ecs, service, d.desired, calls).await,
            _ => Outcome::DryRun,
        }
    }
}

/// The mutating calls of one action, each behind the fence.
struct Caller<'a, E: Ecs, L: Ledger> {
    worker: &'a Worker<E, L>,
    s: &'a ManagedService,
    lease: &'a Lease,
    guard: &'a Guard,
}

impl<E: Ecs, L: Ledger> Caller<'_, E, L> {
    fn entry(&self, op: &str, detail: String) -> CallEntry {
        CallEntry {
            epoch: self.lease.epoch,
            leader: self.worker.id.clone(),
            op: op.to_owned(),
            detail,
            result: None,
        }
    }

    /// The fence (which journals `entry`), then the deadline again.
    async fn fence(&self, entry: &CallEntry) -> Result<(), String> {
        self.guard.check().map_err(|e| e.to_string())?;
        match self
            .worker
            .ledger
            .fence(self.lease, self.worker.margin, &self.s.name, entry)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(format!("the fence refused epoch {}", self.lease.epoch)),
            Err(e) => return Err(format!("the fence could not be checked: {e}")),
        }
        self.guard.check().map_err(|e| e.to_string())
    }

    async fn journal(&self, mut entry: CallEntry, result: String) {
        tracing::debug!(service = %self.s.name, epoch = entry.epoch, op = %entry.op, detail = %entry.detail, result = %result, "ECS call");
        entry.result = Some(result);
        if let Err(e) = self.worker.ledger.journal(&self.s.name, &entry).await {
            tracing::warn!(service = %self.s.name, error = %e, "ECS call result not journalled");
        }
    }

    async fn run(
        &self,
        ecs: &E,
        task_definition: &str,
        d: &Decision,
        seq: u64,
        calls: &mut Calls,
    ) -> Outcome {
        let asked = d.desired - d.current;
        let (mut started, mut failures, mut unknown) = (0, Vec::new(), false);
        for (i, count) in ecs::batches(asked).into_iter().enumerate() {
            let req = RunTask {
                cluster: self.s.cluster.clone(),
                task_definition: task_definition.to_owned(),
                started_by: self.s.started_by(),
                count,
                client_token: ecs::client_token(
                    &self.s.cluster,
                    &self.s.name,
                    task_definition,
                    seq,
                    d.current,
                    d.desired,
                    i as u32,
                ),
            };
            let entry = self.entry(
                "RunTask",
                format!("count {count} token {}", req.client_token),
            );
            if let Err(why) = self.fence(&entry).await {
                return Outcome::Interrupted {
                    sent: i as u32,
                    why,
                };
            }
            calls.run_task += 1;
            let result = ecs.run_task(&req, self.guard).await;
            let said = match &result {
                Ok(st) => format!("started {}", st.arns.len()),
                Err(e) => e.to_string(),
            };
            self.journal(entry, said).await;
            match result {
                Ok(st) => {
                    let placed = st.arns.len() as u32;
                    started += placed;
                    if placed < count && st.failures.is_empty() {
                        failures.push(format!(
                            "{} of {count} tasks not placed (no reason given)",
                            count - placed
                        ));
                    }
                    failures.extend(st.failures);
                }
                Err(EcsError::NotSent { why, .. }) => {
                    return Outcome::Interrupted {
                        sent: i as u32,
                        why,
                    }
                }
                Err(e) => {
                    unknown |= matches!(e, EcsError::Unknown { .. });
                    failures.push(e.to_string());
                }
            }
        }
        for f in &failures {
            tracing::warn!(service = %self.s.name, failure = %f, "RunTask placed fewer tasks; the next loop retries");
        }
        Outcome::Ran {
            asked,
            started,
            failures,
            unknown,
        }
    }

    async fn stop(&self, ecs: &E, arns: &[String], n: usize, calls: &mut Calls) -> Outcome {
        let tasks = match ecs
            .describe_tasks(&self.s.cluster, arns, self.guard, calls)
            .await
        {
            Ok(t) => t,
            Err(EcsError::NotSent { why, .. }) => return Outcome::Interrupted { sent: 0, why },
            Err(e) => {
                tracing::warn!(service = %self.s.name, error = %e, "choosing tasks to stop without their status or AZ");
                arns.iter()
                    .map(|arn| ecs::Task {
                        arn: arn.clone(),
                        last_status: crate::manager::ecs::TaskStatus::Running,
                        az: String::new(),
                    })
                    .collect()
            }
        };
        let chosen = ecs::choose_to_stop(&tasks, n);
        let (mut stopped, mut errors, mut unknown) = (0, Vec::new(), false);
        for (i, arn) in chosen.iter().enumerate() {
            let entry = self.entry("StopTask", arn.clone());
            if let Err(why) = self.fence(&entry).await {
                return Outcome::Interrupted {
                    sent: i as u32,
                    why,
                };
            }
            calls.stop_task += 1;
            let result = ecs.stop_task(&self.s.cluster, arn, self.guard).await;
            let said = match &result {
                Ok(()) => "stopped".to_owned(),
                Err(e) => e.to_string(),
            };
            self.journal(entry, said).await;
            match result {
                Ok(()) => stopped += 1,
                Err(EcsError::NotSent { why, .. }) => {
                    return Outcome::Interrupted {
                        sent: i as u32,
                        why,
                    }
                }
                Err(e) => {
                    unknown |= matches!(e, EcsError::Unknown { .. });
                    tracing::warn!(service = %self.s.name, error = %e, "StopTask failed; the next loop retries");
                    errors.push(e.to_string());
                }
            }
        }
        Outcome::Stopped {
            asked: n as u32,
            stopped,
            errors,
            unknown,
        }
    }

    async fn set(&self, ecs: &E, service: &str, desired: u32, calls: &mut Calls) -> Outcome {
        let entry = self.entry("UpdateService", format!("{service} desired {desired}"));
        if let Err(why) = self.fence(&entry).await {
            return Outcome::Interrupted { sent: 0, why };
        }
        calls.update_service += 1;
        let result = ecs
            .set_service_desired(&self.s.cluster, service, desired, self.guard)
            .await;
        let said = match &result {
            Ok(()) => format!("desired {desired}"),
            Err(e) => e.to_string(),
        };
        self.journal(entry, said).await;
        match result {
            Ok(()) => Outcome::SetDesired { desired },
            Err(EcsError::NotSent { why, .. }) => Outcome::Interrupted { sent: 0, why },
            Err(e) => Outcome::Failed {
                unknown: matches!(e, EcsError::Unknown { .. }),
                error: e.to_string(),
            },
        }
    }
}

impl Record {
    #[allow(clippy::too_many_arguments)]
    fn new(
        s: &ManagedService,
        leader: &str,
        lease: &Lease,
        now_ms: u64,
        reading: &Reading,
        count: &Count,
        decision: Decision,
        outcome: Outcome,
        calls: Calls,
    ) -> Record {
        let (metric, unit, labels, metric_error) = match &reading.metric {
            Ok(m) => (Some(m.value), m.unit.clone(), m.labels.clone(), None),
            Err(e) => (None, None, BTreeMap::new(), Some(e.clone())),
        };
        let (mapped_value, mapping_error) = match &reading.mapped {
            Some(Ok(v)) => (Some(*v), None),
            Some(Err(e)) => (None, Some(e.clone())),
            None => (None, None),
        };
        Record {
            service: s.name.clone(),
            leader: leader.to_owned(),
            epoch: lease.epoch,
            time_ms: now_ms,
            metric,
            unit,
            labels,
            metric_error: metric_error.or(mapping_error),
            mapped_value,
            metric_isolation: reading.isolation,
            running: count.running(),
            decision,
            outcome,
            calls,
        }
    }
}
