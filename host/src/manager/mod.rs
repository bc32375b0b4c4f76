//! The manager: every host takes part in the election; the leader reads each managed
//! service's metric through its plugin, decides the task count, and runs or stops ECS
//! tasks (or sets an ECS service's desired count) until the right number run.
//!
//! Safety rests on [`election`]: the leader acts only while its lease is valid by its
//! own monotonic clock *and* the fence in Redis confirms its epoch right before every
//! batch of ECS calls. Every decision is logged with its inputs and kept in Redis
//! (`warden:decision:<service>`, history in `warden:decisions:<service>`), written by a
//! fenced script so a deposed leader cannot record one either.

pub mod ecs;
pub mod election;
pub mod policy;

use std::time::Duration;

use redis::Script;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::plugins::MetricClient;
use election::{ElectionStore, Lease, Timing, Verdict};
use policy::{Decision, Mapping, Policy, PolicyState};

/// How a service's count is applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Standalone tasks of a task definition (`family` or `family:revision`).
    Tasks { task_definition: String },
    /// An ECS service's desiredCount.
    Service { service: String },
}

pub struct ManagedService {
    pub name: String,
    pub cluster: String,
    pub target: Target,
    pub metric: MetricClient,
    /// The plugin behind `Mapping::Plugin`.
    pub mapper: Option<MetricClient>,
    pub mapping: Mapping,
    pub policy: Policy,
}

impl ManagedService {
    /// `startedBy` for warden's tasks of this service (ECS allows 36 characters).
    pub fn started_by(&self) -> String {
        format!("warden-{}", self.name).chars().take(36).collect()
    }
}

/// A decision as kept in Redis and shown by `warden status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub service: String,
    pub leader: String,
    pub epoch: u64,
    pub time_ms: u64,
    #[serde(flatten)]
    pub decision: Decision,
    /// What was done: `dry-run`, `none`, `ran N`, `stopped N`, `set desired N`, or the error.
    pub outcome: String,
    pub list_tasks: u32,
    pub run_task: u32,
    pub stop_task: u32,
}

pub fn decision_key(service: &str) -> String {
    format!("warden:decision:{service}")
}
pub fn history_key(service: &str) -> String {
    format!("warden:decisions:{service}")
}
fn policy_key(service: &str) -> String {
    format!("warden:policy:{service}")
}

/// Writes a decision and the policy state only if the lease is still ours.
const RECORD: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('LTRIM', KEYS[3], -1000, -1)
redis.call('SET', KEYS[4], ARGV[3])
return 1
"#;

pub struct Manager {
    pub id: String,
    pub az: String,
    pub central: redis::Client,
    pub timing: Timing,
    pub loop_interval: Duration,
    pub services: Vec<ManagedService>,
    /// `None`: dry-run, decide and log, call nothing.
    pub ecs: Option<aws_sdk_ecs::Client>,
    /// For the Availability Zone check (EC2 DescribeAvailabilityZones).
    pub ec2: Option<aws_sdk_ec2::Client>,
}

/// AZ states from EC2, refreshed every 10 s by a task of its own so that a slow EC2 API
/// never delays an election tick. An AZ is unavailable only on positive knowledge: an
/// EC2 error, or an AZ that EC2 does not list, counts as available.
#[derive(Clone, Default)]
struct AzCache(std::sync::Arc<std::sync::RwLock<std::collections::BTreeMap<String, String>>>);

impl AzCache {
    fn start(ec2: Option<aws_sdk_ec2::Client>, mut shutdown: watch::Receiver<bool>) -> AzCache {
        let cache = AzCache::default();
        let Some(ec2) = ec2 else { return cache };
        let c = cache.clone();
        tokio::spawn(async move {
            loop {
                match ec2.describe_availability_zones().send().await {
                    Ok(out) => {
                        let states = out
                            .availability_zones()
                            .iter()
                            .filter_map(|z| {
                                Some((z.zone_name()?.to_owned(), z.state()?.as_str().to_owned()))
                            })
                            .collect();
                        *c.0.write().unwrap_or_else(|p| p.into_inner()) = states;
                    }
                    Err(e) => {
                        tracing::warn!(error = %aws_sdk_ec2::error::DisplayErrorContext(&e), "cannot read AZ states; keeping the last known")
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        });
        cache
    }

    fn available(&self, az: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(az)
            .is_none_or(|s| s == "available")
    }
}

struct Leadership {
    lease: Lease,
    /// Monotonic instant after which this host must not act (lease − margin after the
    /// last successful renewal was sent).
    deadline: Instant,
}

async fn redis_now_ms(conn: &mut redis::aio::ConnectionManager) -> redis::RedisResult<u64> {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(s * 1000 + us / 1000)
}

impl Manager {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let conn = loop {
            match redis::aio::ConnectionManager::new_with_config(
                self.central.clone(),
                redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timing.lease / 2))
                    .set_response_timeout(Some(self.timing.lease / 2))
                    .set_number_of_retries(1),
            )
            .await
            {
                Ok(c) => break c,
                Err(e) => {
                    let d = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?d, "central redis not answering");
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        let mut store = ElectionStore::new(conn);
        let azs = AzCache::start(self.ec2.clone(), shutdown.clone());
        let record = Script::new(RECORD);
        let mut leading: Option<Leadership> = None;
        let mut next_work = Instant::now();
        let mut tick = tokio::time::interval(self.timing.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    if let Some(l) = &leading {
                        match store.release(&l.lease).await {
                            Ok(true) => tracing::info!(epoch = l.lease.epoch, "leadership given up for shutdown"),
                            Ok(false) => {}
                            Err(e) => tracing::warn!(error = %e, "could not give up the lease; it expires by itself"),
                        }
                    }
                    return;
                }
                _ = tick.tick() => {}
            }
            let _ = store.seen(&self.id, &self.az, self.timing.lease * 10).await;
            if let Some(l) = &mut leading {
                let own_az_ok = azs.available(&self.az);
                let reason = if own_az_ok {
                    self.keep_leading(&mut store, l).await
                } else {
                    let _ = store.release(&l.lease).await;
                    Some(format!(
                        "own Availability Zone {} is not available",
                        self.az
                    ))
                };
                if let Some(reason) = reason {
                    tracing::warn!(epoch = l.lease.epoch, "stepping down: {reason}");
                    leading = None;
                    continue;
                }
                if Instant::now() >= next_work {
                    next_work = Instant::now() + self.loop_interval;
                    for s in &self.services {
                        if !self.work(&mut store, &record, l, s).await {
                            tracing::warn!(
                                epoch = l.lease.epoch,
                                "stepping down: the fence refused this epoch"
                            );
                            leading = None;
                            break;
                        }
                    }
                }
                continue;
            }
            match self.follow(&mut store, &azs).await {
                Ok(Some(l)) => {
                    tracing::info!(epoch = l.lease.epoch, az = %self.az, "became leader");
                    next_work = Instant::now();
                    leading = Some(l);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "election: central redis error"),
            }
        }
    }

    /// Renews the lease; `Some(reason)` if this host must stop acting now.
    async fn keep_leading(&self, store: &mut ElectionStore, l: &mut Leadership) -> Option<String> {
        if Instant::now() >= l.deadline {
            return Some("the lease deadline passed without a renewal".into());
        }
        match store.kill_message(&self.id).await {
            Ok(Some(e)) if e > l.lease.epoch => {
                return Some(format!("kill message from epoch {e}"))
            }
            Err(e) => return Some(format!("central redis error: {e}")),
            _ => {}
        }
        let sent = Instant::now();
        match store.renew(&l.lease, &self.timing).await {
            Ok(true) => {
                l.deadline = sent + self.timing.lease - self.timing.margin();
                None
            }
            Ok(false) => Some("the lease is no longer ours".into()),
            Err(e) => Some(format!("cannot renew the lease: {e}")),
        }
    }

    /// A follower's tick: judge the leader, hold a competition when needed.
    async fn follow(
        &self,
        store: &mut ElectionStore,
        azs: &AzCache,
    ) -> redis::RedisResult<Option<Leadership>> {
        let lease = store.leader().await?;
        let age = store.heartbeat_age().await?;
        let leader_az_ok = match &lease {
            Some(l) => azs.available(&l.az),
            None => true,
        };
        // A host in an unavailable AZ does not compete.
        if !azs.available(&self.az) {
            return Ok(None);
        }
        let verdict = election::judge(lease, age, leader_az_ok, &self.timing);
        let depose = match verdict {
            Verdict::Healthy => return Ok(None),
            Verdict::Vacant => None,
            Verdict::Depose(l) => Some(l),
        };
        store.enter(&self.id, self.timing.guard * 3).await?;
        tokio::time::sleep(self.timing.guard).await;
        if store.winner().await?.as_deref() != Some(self.id.as_str()) {
            return Ok(None);
        }
        let sent = Instant::now();
        Ok(store
            .acquire(&self.id, &self.az, &self.timing, depose.as_ref())
            .await?
            .map(|lease| Leadership {
                lease,
                deadline: sent + self.timing.lease - self.timing.margin(),
            }))
    }

    /// One loop for one service. False if the fence refused the epoch.
    async fn work(
        &self,
        store: &mut ElectionStore,
        record: &Script,
        l: &Leadership,
        s: &ManagedService,
    ) -> bool {
        let mut metric = s
            .metric
            .measure()
            .await
            .map(|m| m.value)
            .map_err(|e| e.to_string());
        if let (Ok(v), Some(mapper)) = (&metric, &s.mapper) {
            // A mapping failure is a metric failure: the count is held.
            metric = mapper
                .map(*v)
                .await
                .map_err(|e| format!("mapping {v}: {e}"));
        }
        let conn = &mut store.conn;
        let now_ms = match redis_now_ms(conn).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(service = %s.name, error = %e, "central redis error; loop skipped");
                return true;
            }
        };
        let mut state: PolicyState = redis::cmd("GET")
            .arg(policy_key(&s.name))
            .query_async::<Option<String>>(conn)
            .await
            .ok()
            .flatten()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let mut calls = ecs::Calls::default();
        let current = match (&self.ecs, &s.target) {
            (None, _) => {
                let last: Option<String> = redis::cmd("GET")
                    .arg(decision_key(&s.name))
                    .query_async(conn)
                    .await
                    .ok()
                    .flatten();
                last.and_then(|t| serde_json::from_str::<Record>(&t).ok())
                    .map_or(0, |r| r.decision.desired)
            }
            (Some(c), Target::Tasks { task_definition }) => {
                let family = task_definition.split(':').next().unwrap_or(task_definition);
                match ecs::list(c, &s.cluster, family, &s.started_by(), &mut calls).await {
                    Ok(t) => t.len() as u32,
                    Err(e) => {
                        tracing::warn!(service = %s.name, error = %e, "cannot count tasks; loop skipped");
                        return true;
                    }
                }
            }
            (Some(c), Target::Service { service }) => {
                match ecs::service_desired(c, &s.cluster, service).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!(service = %s.name, error = %e, "cannot read the ECS service; loop skipped");
                        return true;
                    }
                }
            }
        };
        let decision = policy::decide(metric, current, now_ms, &s.mapping, &s.policy, &mut state);
        let mut outcome = if self.ecs.is_none() {
            "dry-run".to_owned()
        } else {
            "none".to_owned()
        };
        if let (Some(c), true) = (&self.ecs, decision.desired != current) {
            // The fence, right before the batch: is the lease still ours, with time left?
            match store.fence(&l.lease, self.timing.margin()).await {
                Ok(true) => {}
                _ => return false,
            }
            if Instant::now() >= l.deadline {
                return false;
            }
            outcome = match &s.target {
                Target::Tasks { task_definition } if decision.desired > current => {
                    let token = format!(
                        "w{}-{}-{}-{}",
                        l.lease.epoch,
                        s.name,
                        now_ms / 1000,
                        decision.desired
                    );
                    let (n, failures) = ecs::run(
                        c,
                        &s.cluster,
                        task_definition,
                        &s.started_by(),
                        decision.desired - current,
                        &token,
                        &mut calls,
                    )
                    .await;
                    for f in &failures {
                        tracing::warn!(service = %s.name, failure = %f, "RunTask placed fewer tasks; the next loop retries");
                    }
                    format!(
                        "ran {n}{}",
                        if failures.is_empty() {
                            String::new()
                        } else {
                            format!(" ({} failures)", failures.len())
                        }
                    )
                }
                Target::Tasks { task_definition } => {
                    let family = task_definition.split(':').next().unwrap_or(task_definition);
                    match ecs::list(c, &s.cluster, family, &s.started_by(), &mut calls).await {
                        Ok(arns) => {
                            let tasks = ecs::describe(c, &s.cluster, &arns, &mut calls).await;
                            let chosen =
                                ecs::choose_to_stop(&tasks, (current - decision.desired) as usize);
                            let (n, errors) = ecs::stop(c, &s.cluster, &chosen, &mut calls).await;
                            for e in &errors {
                                tracing::warn!(service = %s.name, error = %e, "StopTask failed; the next loop retries");
                            }
                            format!("stopped {n}")
                        }
                        Err(e) => format!("error: {e}"),
                    }
                }
                Target::Service { service } => match ecs::set_service_desired(
                    c,
                    &s.cluster,
                    service,
                    decision.desired,
                    &mut calls,
                )
                .await
                {
                    Ok(()) => format!("set desired {}", decision.desired),
                    Err(e) => format!("error: {e}"),
                },
            };
            state.last_action_ms = Some(now_ms);
        }
        tracing::info!(
            service = %s.name,
            epoch = l.lease.epoch,
            metric = ?decision.metric,
            mapped = ?decision.mapped,
            clamped = ?decision.clamped,
            current = decision.current,
            desired = decision.desired,
            action = %decision.action,
            outcome = %outcome,
            "{}", decision.reason
        );
        let rec = Record {
            service: s.name.clone(),
            leader: self.id.clone(),
            epoch: l.lease.epoch,
            time_ms: now_ms,
            decision,
            outcome,
            list_tasks: calls.list_tasks,
            run_task: calls.run_task,
            stop_task: calls.stop_task,
        };
        let written: redis::RedisResult<i64> = record
            .key(election::LEADER)
            .key(decision_key(&s.name))
            .key(history_key(&s.name))
            .key(policy_key(&s.name))
            .arg(l.lease.value())
            .arg(serde_json::to_string(&rec).unwrap_or_default())
            .arg(serde_json::to_string(&state).unwrap_or_default())
            .invoke_async(&mut store.conn)
            .await;
        !matches!(written, Ok(0))
    }
}
