//! The manager: every host takes part in the election; the leader reads each managed
//! service's metric through its plugin, decides the task count, and runs or stops ECS
//! tasks (or sets an ECS service's desired count) until the right number run.
//!
//! Two tasks, each with its own connection to the central Redis:
//! * the [`election::Elector`] keeps the lease and publishes [`leadership::Leadership`];
//!   nothing else runs in it, so slow work can never cost a renewal;
//! * the [`worker::Worker`] does the scaling while, and only while, its epoch is
//!   published, behind the fence before every ECS call (see `docs/manager-safety.md` for
//!   what is guaranteed and where the guarantee ends).
//!
//! Every decision is logged with its inputs and kept in Redis (`warden:decision:<service>`,
//! history in `warden:decisions:<service>`), written by a fenced script; every ECS call is
//! journalled in `warden:calls:<service>` with its epoch before it is sent.

pub(crate) mod az;
pub(crate) mod central;
pub(crate) mod ecs;
pub(crate) mod election;
pub(crate) mod leadership;
pub(crate) mod lease;
pub(crate) mod metric;
pub(crate) mod policy;
pub(crate) mod settings;
pub(crate) mod sources;
pub(crate) mod worker;

#[cfg(test)]
mod fakes;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::supervisor::Owned;
use central::Central;
use ecs::{AwsEcs, Calls};
use election::{Elector, Timing};
use leadership::Leadership;
use policy::{Decision, Mapping, Policy};

pub(crate) use metric::{Metric, MetricError};

/// How a service's count is applied.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Target {
    /// Standalone tasks of a task definition (`family`, `family:revision` or an ARN),
    /// counted by its family.
    Tasks {
        task_definition: String,
        family: String,
    },
    /// An ECS service's desiredCount.
    Service { service: String },
}

#[derive(Clone)]
pub(crate) struct ManagedService {
    pub name: String,
    pub cluster: String,
    pub target: Target,
    pub metric: Arc<dyn Metric>,
    /// The plugin behind `Mapping::Plugin`.
    pub mapper: Option<Arc<dyn Metric>>,
    pub mapping: Mapping,
    pub policy: Policy,
}

/// `startedBy` for warden's tasks of a service (ECS allows 36 characters).
pub(crate) fn started_by(service: &str) -> String {
    format!("warden-{service}").chars().take(36).collect()
}

impl ManagedService {
    pub(crate) fn started_by(&self) -> String {
        started_by(&self.name)
    }
}

/// What was done about a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Outcome {
    /// Decided and recorded; nothing called (`dry_run`).
    DryRun,
    /// Nothing to do.
    None,
    Ran {
        asked: u32,
        started: u32,
        failures: Vec<String>,
        /// A call's outcome is unknown (sent, no readable answer).
        unknown: bool,
    },
    Stopped {
        asked: u32,
        stopped: u32,
        errors: Vec<String>,
        unknown: bool,
    },
    SetDesired {
        desired: u32,
    },
    Failed {
        error: String,
        unknown: bool,
    },
    /// Leadership was lost part-way: `sent` mutating calls went out before the fence or
    /// the deadline refused the next one.
    Interrupted {
        sent: u32,
        why: String,
    },
}

impl Outcome {
    /// Some call's outcome is unknown.
    pub(crate) fn unknown(&self) -> bool {
        match self {
            Outcome::Ran { unknown, .. }
            | Outcome::Stopped { unknown, .. }
            | Outcome::Failed { unknown, .. } => *unknown,
            _ => false,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::DryRun => f.write_str("dry-run"),
            Outcome::None => f.write_str("none"),
            Outcome::Ran {
                asked,
                started,
                failures,
                ..
            } => {
                write!(f, "ran {started} of {asked}")?;
                if !failures.is_empty() {
                    write!(f, " ({} failures: {})", failures.len(), failures.join("; "))?;
                }
                Ok(())
            }
            Outcome::Stopped {
                asked,
                stopped,
                errors,
                ..
            } => {
                write!(f, "stopped {stopped} of {asked}")?;
                if !errors.is_empty() {
                    write!(f, " ({} errors: {})", errors.len(), errors.join("; "))?;
                }
                Ok(())
            }
            Outcome::SetDesired { desired } => write!(f, "set desired {desired}"),
            Outcome::Failed { error, .. } => write!(f, "error: {error}"),
            Outcome::Interrupted { sent, why } => {
                write!(f, "interrupted after {sent} calls: {why}")
            }
        }
    }
}

/// A decision as kept in Redis and shown by `warden status`: the metric read, the value a
/// mapping plugin gave, the counted number and the decision are each kept apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub service: String,
    pub leader: String,
    pub epoch: u64,
    pub time_ms: u64,
    /// The metric source's reading, before any mapping.
    pub metric: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Why there is no reading (or no mapped value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_error: Option<MetricError>,
    /// What a mapping plugin answered for the reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapped_value: Option<f64>,
    /// Where the metric source's instance runs (`in-process`, `process`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_isolation: Option<crate::plugins::settings::Isolation>,
    /// RUNNING + PENDING tasks counted in ECS (or the service's desired count); none in
    /// dry-run, which counts nothing.
    pub running: Option<u32>,
    #[serde(flatten)]
    pub decision: Decision,
    pub outcome: Outcome,
    #[serde(flatten)]
    pub calls: Calls,
}

/// An optional number as an operator reads it: the number, or `-`.
pub(crate) fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}

impl Record {
    /// The decision in the log: inputs as plain fields, then the reason.
    pub(crate) fn log(&self) {
        let d = &self.decision;
        let error = self.metric_error.as_ref().map(ToString::to_string);
        tracing::info!(
            service = %self.service,
            epoch = self.epoch,
            metric = %opt(&self.metric),
            mapped = %opt(&d.mapped),
            running = %opt(&self.running),
            desired = d.desired,
            action = %d.action,
            outcome = %self.outcome,
            metric_error = %opt(&error),
            "{}", d.reason
        );
    }
}

impl Record {
    /// The decision in the metrics: value, desired, running, and a count by action.
    pub(crate) fn observe(&self) {
        let m = crate::metrics::get();
        let l = crate::metrics::ServiceLabel {
            service: self.service.clone(),
        };
        match self.metric {
            Some(v) => {
                m.metric_value.get_or_create(&l).set(v);
            }
            None => {
                m.metric_value.remove(&l);
            }
        }
        m.desired_tasks
            .get_or_create(&l)
            .set(i64::from(self.decision.desired));
        if let Some(r) = self.running {
            m.running_tasks.get_or_create(&l).set(i64::from(r));
        }
        m.decisions
            .get_or_create(&crate::metrics::Decision {
                service: self.service.clone(),
                action: self.decision.action.as_str().into(),
            })
            .inc();
    }
}

/// Follows the published leadership into the metrics (leader, epoch, changes).
async fn observe_leadership(mut rx: watch::Receiver<Leadership>) {
    let m = crate::metrics::get();
    let mut leading = false;
    loop {
        let epoch = rx.borrow_and_update().epoch();
        if epoch.is_some() != leading {
            leading = epoch.is_some();
            m.leader_changes.inc();
        }
        m.leader.set(i64::from(leading));
        if let Some(e) = epoch {
            m.epoch.set(e as i64);
        }
        if rx.changed().await.is_err() {
            m.leader.set(0);
            return;
        }
    }
}

/// The manager's parts, wired by `daemon`.
#[derive(Clone)]
pub(crate) struct Manager {
    pub id: String,
    pub az: String,
    /// The central Redis (an address, or Sentinels and a master name).
    pub central: std::sync::Arc<crate::redis_link::Endpoint>,
    /// Replicas that must acknowledge every lease and fence write (`WAIT`); 0: none.
    pub min_replicas: u32,
    pub timing: Timing,
    /// The managed services, loop interval and dry-run: replaced by a reload.
    pub plan: watch::Receiver<worker::Plan>,
    /// `None`: no ECS to call (decide and record only).
    pub ecs: Option<AwsEcs>,
    /// For the Availability Zone check (EC2 DescribeAvailabilityZones).
    pub ec2: Option<std::sync::Arc<warden_aws_query::Ec2>>,
}

impl Manager {
    /// A central store for one loop: a connection of its own, made on first use and
    /// made again after any error that says it is no good (a timeout, a failover).
    fn central(&self) -> Central {
        let link = std::sync::Arc::new(crate::redis_link::Link::new((*self.central).clone()));
        // Timeouts of a quarter lease leave time for a second attempt on a new
        // connection before a leader's deadline (lease − 25 %).
        Central::new(link, self.min_replicas, self.timing.tick)
    }

    pub(crate) async fn run(self, shutdown: watch::Receiver<bool>) {
        let (elector_store, ledger) = (self.central(), self.central());
        // Every task started here ends with this run, also when the worker panics: a
        // restarted run must not find the last run's elector still renewing the lease
        // under this host's id (it would never lead, and no other host could).
        let (azs, _az_refresher) = az::AzCache::start(self.ec2.clone(), shutdown.clone());
        let (tx, rx) = watch::channel(Leadership::Following);
        let _observer = Owned(tokio::spawn(observe_leadership(rx.clone())));
        let elector = Elector {
            id: self.id.clone(),
            az: self.az.clone(),
            store: elector_store,
            timing: self.timing,
            azs,
        };
        let mut elector = Owned(tokio::spawn(elector.run(tx, shutdown.clone())));
        let worker = worker::Worker {
            id: self.id,
            ecs: self.ecs,
            ledger,
            plan: self.plan,
            margin: self.timing.margin(),
        };
        worker.run(rx, shutdown).await;
        let _ = (&mut elector.0).await;
    }
}
