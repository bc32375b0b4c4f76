//! ECS for the leader: the calls warden makes, behind a small trait ([`Ecs`]) so that the
//! worker is unit-tested with a fake; the AWS implementation; and the pure choices (the
//! family of a task definition, which tasks to stop, the clientToken).
//!
//! Every call takes the worker's [`Guard`]. The AWS implementation attaches it to the
//! request as an interceptor that checks it right before *each attempt* is transmitted
//! (the SDK's retries included) and tags the request with `x-warden-epoch`, so that a
//! deposed leader's retry is never sent and every call can be attributed on the AWS side.
//! Tasks are counted by family and `startedBy` (so warden never touches tasks it did not
//! start). RunTask goes in batches of at most 10 with a spread-by-AZ placement and a
//! clientToken that a successor deciding the same step derives too. StopTask takes
//! PENDING tasks first, then from the fullest AZ, in an order every leader computes alike.

use std::collections::BTreeMap;
use std::future::Future;

use aws_sdk_ecs::config::interceptors::{
    BeforeTransmitInterceptorContextMut, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_ecs::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types::{DesiredStatus, PlacementStrategy, PlacementStrategyType};

use super::leadership::Guard;

/// One of warden's tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Task {
    pub arn: String,
    pub last_status: TaskStatus,
    pub az: String,
}

/// Where a task is in its life, as far as stopping one is concerned: one not yet
/// placed is the cheapest to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskStatus {
    /// `PROVISIONING` or `PENDING` (ECS gives no status at first either).
    Pending,
    /// `RUNNING`.
    Running,
    /// Any later status (`DEACTIVATING`, `STOPPING`...).
    Ending,
}

impl TaskStatus {
    /// ECS's `lastStatus`.
    pub(crate) fn from_ecs(status: Option<&str>) -> TaskStatus {
        match status {
            None | Some("PROVISIONING" | "PENDING" | "ACTIVATING") => TaskStatus::Pending,
            Some("RUNNING") => TaskStatus::Running,
            Some(_) => TaskStatus::Ending,
        }
    }
}

/// Counts of the ECS calls one loop sent, for the decision record and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub(crate) struct Calls {
    pub list_tasks: u32,
    pub describe_tasks: u32,
    pub run_task: u32,
    pub stop_task: u32,
    pub update_service: u32,
}

/// One RunTask call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunTask {
    pub cluster: String,
    pub task_definition: String,
    pub started_by: String,
    pub count: u32,
    pub client_token: String,
}

/// What a RunTask answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Started {
    pub arns: Vec<String>,
    /// ECS's reasons for tasks it did not place (`RESOURCE:MEMORY`…).
    pub failures: Vec<String>,
}

/// Why an ECS call failed, sorted by what it means for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EcsError {
    /// Never transmitted: leadership was lost first (or the request could not be built).
    #[error("ECS {op}: not sent: {why}")]
    NotSent { op: &'static str, why: String },
    /// ECS answered with an error: nothing was done.
    #[error("ECS {op}: {message}")]
    Refused { op: &'static str, message: String },
    /// Sent, but the outcome is unknown (timeout, broken connection, unreadable answer).
    #[error("ECS {op}: outcome unknown: {message}")]
    Unknown { op: &'static str, message: String },
}

/// The ECS calls warden makes.
pub(crate) trait Ecs: Send + Sync + 'static {
    /// ARNs of the RUNNING and PENDING tasks of `family` started by `started_by` (paged).
    fn list_tasks(
        &self,
        cluster: &str,
        family: &str,
        started_by: &str,
        guard: &Guard,
        calls: &mut Calls,
    ) -> impl Future<Output = Result<Vec<String>, EcsError>> + Send;
    /// Status and AZ of the given tasks.
    fn describe_tasks(
        &self,
        cluster: &str,
        arns: &[String],
        guard: &Guard,
        calls: &mut Calls,
    ) -> impl Future<Output = Result<Vec<Task>, EcsError>> + Send;
    fn run_task(
        &self,
        req: &RunTask,
        guard: &Guard,
    ) -> impl Future<Output = Result<Started, EcsError>> + Send;
    fn stop_task(
        &self,
        cluster: &str,
        arn: &str,
        guard: &Guard,
    ) -> impl Future<Output = Result<(), EcsError>> + Send;
    fn service_desired(
        &self,
        cluster: &str,
        service: &str,
        guard: &Guard,
    ) -> impl Future<Output = Result<u32, EcsError>> + Send;
    fn set_service_desired(
        &self,
        cluster: &str,
        service: &str,
        desired: u32,
        guard: &Guard,
    ) -> impl Future<Output = Result<(), EcsError>> + Send;
}

/// The family of a task definition given as `family`, `family:revision` or a full ARN
/// (`arn:aws:ecs:eu-west-1:123456789012:task-definition/worker:3` → `worker`).
pub(crate) fn family_of(task_definition: &str) -> Result<&str, String> {
    let name = if task_definition.starts_with("arn:") {
        task_definition
            .split_once(":task-definition/")
            .map(|(_, rest)| rest)
            .ok_or_else(|| {
                format!("{task_definition:?} is an ARN but not of a task definition (expected arn:…:task-definition/family:revision)")
            })?
    } else {
        task_definition
    };
    let (family, revision) = match name.split_once(':') {
        Some((f, r)) => (f, Some(r)),
        None => (name, None),
    };
    let family_ok = !family.is_empty()
        && family.len() <= 255
        && family
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !family_ok {
        return Err(format!(
            "{task_definition:?}: the family {family:?} must be 1-255 letters, digits, '-' or '_'"
        ));
    }
    if let Some(r) = revision {
        if r.is_empty() || !r.chars().all(|c| c.is_ascii_digit()) || r.starts_with('0') {
            return Err(format!(
                "{task_definition:?}: the revision {r:?} must be a positive whole number"
            ));
        }
    }
    Ok(family)
}

/// FNV-1a, 64 bits: a stable hash (the std hasher may change between Rust releases).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0u8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The clientToken of one RunTask batch: the same for every leader that takes the same
/// step (service, task definition, the policy's action count, current → desired, batch),
/// so a successor repeating a step its predecessor sent gets ECS's first answer instead of
/// new tasks. At most 34 characters, whatever the names' length.
pub(crate) fn client_token(
    cluster: &str,
    service: &str,
    task_definition: &str,
    action_seq: u64,
    current: u32,
    desired: u32,
    batch: u32,
) -> String {
    let h = fnv1a(&[
        cluster,
        service,
        task_definition,
        &action_seq.to_string(),
        &current.to_string(),
        &desired.to_string(),
    ]);
    format!("warden-{h:016x}-{batch}")
}

/// RunTask counts for `n` tasks: batches of at most ten.
pub(crate) fn batches(n: u32) -> Vec<u32> {
    let mut out = vec![10; (n / 10) as usize];
    if n % 10 > 0 {
        out.push(n % 10);
    }
    out
}

/// Which tasks to stop: PENDING first, then one at a time from the AZ holding the most.
pub(crate) fn choose_to_stop(tasks: &[Task], n: usize) -> Vec<String> {
    let mut chosen = Vec::new();
    let mut pending: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.last_status == TaskStatus::Pending)
        .collect();
    pending.sort_by(|a, b| a.arn.cmp(&b.arn));
    for t in pending.into_iter().take(n) {
        chosen.push(t.arn.clone());
    }
    let mut by_az: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in tasks
        .iter()
        .filter(|t| t.last_status != TaskStatus::Pending)
    {
        by_az.entry(t.az.as_str()).or_default().push(t);
    }
    for v in by_az.values_mut() {
        v.sort_by(|a, b| b.arn.cmp(&a.arn));
    }
    while chosen.len() < n {
        let Some((_, v)) = by_az
            .iter_mut()
            .filter(|(_, v)| !v.is_empty())
            .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
        else {
            break;
        };
        chosen.push(v.pop().unwrap().arn.clone());
    }
    chosen
}

/// Checks the guard right before each attempt is transmitted, and tags the request with
/// its epoch (`x-warden-epoch`) so that calls can be attributed on the AWS side.
#[derive(Debug)]
struct LeaderOnly(Guard);

impl Intercept for LeaderOnly {
    fn name(&self) -> &'static str {
        "warden-leader-only"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_ecs::error::BoxError> {
        context
            .request_mut()
            .headers_mut()
            .insert("x-warden-epoch", self.0.epoch().to_string());
        Ok(())
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_ecs::error::BoxError> {
        self.0.check().map_err(Into::into)
    }
}

/// ECS through the AWS SDK.
#[derive(Clone)]
pub(crate) struct AwsEcs {
    client: aws_sdk_ecs::Client,
}

impl AwsEcs {
    pub(crate) fn new(sdk: &aws_config::SdkConfig) -> Self {
        Self {
            client: aws_sdk_ecs::Client::new(sdk),
        }
    }
}

fn classify<E, R>(op: &'static str, e: SdkError<E, R>, guard: &Guard) -> EcsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let message = crate::aws::describe(&e);
    // The guard is read once: checked twice, it could pass the second time (a panic on
    // the unwrap) or differ from what the match decided on.
    let lost = guard.check().err();
    let error = match (e, lost) {
        (SdkError::ServiceError(_), _) => EcsError::Refused { op, message },
        (SdkError::ConstructionFailure(_), _) => EcsError::NotSent { op, why: message },
        // An interceptor refusal surfaces as a dispatch failure: say why plainly.
        (SdkError::DispatchFailure(_), Some(lost)) => EcsError::NotSent {
            op,
            why: lost.to_string(),
        },
        _ => EcsError::Unknown { op, message },
    };
    count(
        op,
        match &error {
            EcsError::Refused { .. } => "refused",
            EcsError::NotSent { .. } => "not_sent",
            _ => "unknown",
        },
    );
    error
}

fn count(op: &str, outcome: &str) {
    crate::metrics::Metrics::count(&crate::metrics::get().ecs_calls, op, outcome);
}

impl Ecs for AwsEcs {
    async fn list_tasks(
        &self,
        cluster: &str,
        family: &str,
        started_by: &str,
        guard: &Guard,
        calls: &mut Calls,
    ) -> Result<Vec<String>, EcsError> {
        let mut arns = Vec::new();
        let mut next: Option<String> = None;
        loop {
            calls.list_tasks += 1;
            let page = self
                .client
                .list_tasks()
                .cluster(cluster)
                .family(family)
                .started_by(started_by)
                .desired_status(DesiredStatus::Running)
                .set_next_token(next.take())
                .customize()
                .interceptor(LeaderOnly(guard.clone()))
                .send()
                .await
                .map_err(|e| classify("ListTasks", e, guard))
                .inspect(|_| count("ListTasks", "ok"))?;
            arns.extend(page.task_arns().iter().cloned());
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_owned()),
                _ => return Ok(arns),
            }
        }
    }

    async fn describe_tasks(
        &self,
        cluster: &str,
        arns: &[String],
        guard: &Guard,
        calls: &mut Calls,
    ) -> Result<Vec<Task>, EcsError> {
        let mut out = Vec::new();
        for chunk in arns.chunks(100) {
            calls.describe_tasks += 1;
            let d = self
                .client
                .describe_tasks()
                .cluster(cluster)
                .set_tasks(Some(chunk.to_vec()))
                .customize()
                .interceptor(LeaderOnly(guard.clone()))
                .send()
                .await
                .map_err(|e| classify("DescribeTasks", e, guard))
                .inspect(|_| count("DescribeTasks", "ok"))?;
            out.extend(d.tasks().iter().map(|t| Task {
                arn: t.task_arn().unwrap_or_default().to_owned(),
                last_status: TaskStatus::from_ecs(t.last_status()),
                az: t.availability_zone().unwrap_or("").to_owned(),
            }));
        }
        Ok(out)
    }

    async fn run_task(&self, req: &RunTask, guard: &Guard) -> Result<Started, EcsError> {
        let out = self
            .client
            .run_task()
            .cluster(&req.cluster)
            .task_definition(&req.task_definition)
            .count(req.count as i32)
            .started_by(&req.started_by)
            .client_token(&req.client_token)
            .placement_strategy(
                PlacementStrategy::builder()
                    .r#type(PlacementStrategyType::Spread)
                    .field("attribute:ecs.availability-zone")
                    .build(),
            )
            .customize()
            .interceptor(LeaderOnly(guard.clone()))
            .send()
            .await
            .map_err(|e| classify("RunTask", e, guard))
            .inspect(|_| count("RunTask", "ok"))?;
        Ok(Started {
            arns: out
                .tasks()
                .iter()
                .filter_map(|t| t.task_arn().map(str::to_owned))
                .collect(),
            failures: out
                .failures()
                .iter()
                .map(|f| {
                    format!(
                        "{}: {}",
                        f.arn().unwrap_or("?"),
                        f.reason().unwrap_or("no reason given")
                    )
                })
                .collect(),
        })
    }

    async fn stop_task(&self, cluster: &str, arn: &str, guard: &Guard) -> Result<(), EcsError> {
        self.client
            .stop_task()
            .cluster(cluster)
            .task(arn)
            .reason("warden: scaling down")
            .customize()
            .interceptor(LeaderOnly(guard.clone()))
            .send()
            .await
            .map_err(|e| classify("StopTask", e, guard))
            .inspect(|_| count("StopTask", "ok"))?;
        Ok(())
    }

    async fn service_desired(
        &self,
        cluster: &str,
        service: &str,
        guard: &Guard,
    ) -> Result<u32, EcsError> {
        let out = self
            .client
            .describe_services()
            .cluster(cluster)
            .services(service)
            .customize()
            .interceptor(LeaderOnly(guard.clone()))
            .send()
            .await
            .map_err(|e| classify("DescribeServices", e, guard))
            .inspect(|_| count("DescribeServices", "ok"))?;
        out.services()
            .first()
            .map(|s| s.desired_count().max(0) as u32)
            .ok_or_else(|| EcsError::Refused {
                op: "DescribeServices",
                message: format!("service {service} not found in cluster {cluster}"),
            })
    }

    async fn set_service_desired(
        &self,
        cluster: &str,
        service: &str,
        desired: u32,
        guard: &Guard,
    ) -> Result<(), EcsError> {
        self.client
            .update_service()
            .cluster(cluster)
            .service(service)
            .desired_count(desired as i32)
            .customize()
            .interceptor(LeaderOnly(guard.clone()))
            .send()
            .await
            .map_err(|e| classify("UpdateService", e, guard))
            .inspect(|_| count("UpdateService", "ok"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(arn: &str, status: &str, az: &str) -> Task {
        Task {
            arn: arn.into(),
            last_status: TaskStatus::from_ecs(Some(status)),
            az: az.into(),
        }
    }

    #[test]
    fn pending_first_then_the_fullest_az() {
        let tasks = vec![
            t("a1", "RUNNING", "a"),
            t("a2", "RUNNING", "a"),
            t("a3", "RUNNING", "a"),
            t("b1", "RUNNING", "b"),
            t("p1", "PENDING", "b"),
        ];
        assert_eq!(choose_to_stop(&tasks, 1), vec!["p1"]);
        let three = choose_to_stop(&tasks, 3);
        assert_eq!(three[0], "p1");
        assert!(
            three[1].starts_with('a') && three[2].starts_with('a'),
            "{three:?}"
        );
        // After two from a, a and b hold 1 each.
        assert_eq!(choose_to_stop(&tasks, 10).len(), 5);
    }

    #[test]
    fn task_definitions_as_family_revision_or_arn() {
        assert_eq!(family_of("worker"), Ok("worker"));
        assert_eq!(family_of("worker:3"), Ok("worker"));
        assert_eq!(
            family_of("arn:aws:ecs:eu-west-1:123456789012:task-definition/worker:3"),
            Ok("worker")
        );
        assert_eq!(
            family_of("arn:aws-cn:ecs:cn-north-1:123456789012:task-definition/my_app-2:14"),
            Ok("my_app-2")
        );
        for bad in [
            "",
            "arn:aws:ecs",
            "worker:",
            "worker:x",
            "worker:03",
            "a b",
            "arn:aws:ecs:eu-west-1:1:service/web",
        ] {
            assert!(family_of(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn client_tokens_are_stable_short_and_distinct_per_step() {
        let long = "s".repeat(200);
        let t = client_token("c1", &long, "web:3", 7, 5, 25, 1);
        assert!(t.len() <= 64 && t.ends_with("-1"), "{t}");
        assert_eq!(t, client_token("c1", &long, "web:3", 7, 5, 25, 1));
        assert_ne!(t, client_token("c1", &long, "web:3", 7, 5, 25, 2));
        assert_ne!(t, client_token("c1", &long, "web:3", 8, 5, 25, 1));
        assert_ne!(t, client_token("c1", &long, "web:3", 7, 6, 25, 1));
        // Field boundaries matter: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            client_token("ab", "c", "t", 0, 0, 1, 0),
            client_token("a", "bc", "t", 0, 0, 1, 0)
        );
    }

    #[test]
    fn batches_of_ten() {
        assert_eq!(batches(0), Vec::<u32>::new());
        assert_eq!(batches(7), vec![7]);
        assert_eq!(batches(25), vec![10, 10, 5]);
        assert_eq!(batches(30), vec![10, 10, 10]);
    }
}
