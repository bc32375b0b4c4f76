//! ECS task control for the leader: count warden's tasks, run or stop the difference.
//!
//! Tasks are counted by task-definition family and `startedBy` (so warden never touches
//! tasks it did not start), with paging. RunTask goes in batches of at most 10 with a
//! spread-by-AZ placement and an idempotent `clientToken` derived from the epoch and the
//! decision, so a retried call never starts tasks twice; partial failures are logged
//! with their reasons and retried on the next loop. StopTask takes PENDING tasks first,
//! then tasks from the AZ that holds the most.

use std::collections::BTreeMap;

use aws_sdk_ecs::types::{DesiredStatus, PlacementStrategy, PlacementStrategyType};
use aws_sdk_ecs::Client;

/// One of warden's tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub arn: String,
    pub last_status: String,
    pub az: String,
}

/// Counts from one loop, for the decision record and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    pub list_tasks: u32,
    pub describe_tasks: u32,
    pub run_task: u32,
    pub stop_task: u32,
    pub update_service: u32,
}

fn err<E: std::error::Error>(e: E) -> String {
    // The whole chain: the SDK's own Display says only "service error" or "response error".
    aws_sdk_ecs::error::DisplayErrorContext(e).to_string()
}

/// The ARNs of the RUNNING and PENDING tasks of `family` started by `started_by`
/// (ListTasks with desiredStatus RUNNING; one call a page of 100).
pub async fn list(
    client: &Client,
    cluster: &str,
    family: &str,
    started_by: &str,
    calls: &mut Calls,
) -> Result<Vec<String>, String> {
    let mut arns = Vec::new();
    let mut pages = client
        .list_tasks()
        .cluster(cluster)
        .family(family)
        .started_by(started_by)
        .desired_status(DesiredStatus::Running)
        .into_paginator()
        .send();
    while let Some(page) = pages.try_next().await.map_err(err)? {
        calls.list_tasks += 1;
        arns.extend(page.task_arns().iter().cloned());
    }
    Ok(arns)
}

/// Status and AZ of the given tasks (DescribeTasks, 100 at a time), for choosing which to
/// stop. If ECS's answer cannot be read, every task is taken as RUNNING in an unknown AZ
/// (moto_server answers container cpu/memory as numbers, which the SDK refuses).
pub async fn describe(
    client: &Client,
    cluster: &str,
    arns: &[String],
    calls: &mut Calls,
) -> Vec<Task> {
    let mut out = Vec::new();
    for chunk in arns.chunks(100) {
        calls.describe_tasks += 1;
        match client
            .describe_tasks()
            .cluster(cluster)
            .set_tasks(Some(chunk.to_vec()))
            .send()
            .await
        {
            Ok(d) => {
                for t in d.tasks() {
                    out.push(Task {
                        arn: t.task_arn().unwrap_or_default().to_owned(),
                        last_status: t.last_status().unwrap_or("PENDING").to_owned(),
                        az: t.availability_zone().unwrap_or("").to_owned(),
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %err(e), "DescribeTasks unreadable; choosing tasks to stop without status or AZ");
                out.extend(chunk.iter().map(|arn| Task {
                    arn: arn.clone(),
                    last_status: "RUNNING".into(),
                    az: String::new(),
                }));
            }
        }
    }
    out
}

/// Which tasks to stop: PENDING first, then one at a time from the AZ holding the most.
pub fn choose_to_stop(tasks: &[Task], n: usize) -> Vec<String> {
    let mut chosen = Vec::new();
    let mut pending: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.last_status == "PENDING")
        .collect();
    pending.sort_by(|a, b| a.arn.cmp(&b.arn));
    for t in pending.into_iter().take(n) {
        chosen.push(t.arn.clone());
    }
    let mut by_az: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for t in tasks.iter().filter(|t| t.last_status != "PENDING") {
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

/// Starts `n` tasks in batches of ten. Returns the number started and the failure reasons.
pub async fn run(
    client: &Client,
    cluster: &str,
    task_definition: &str,
    started_by: &str,
    n: u32,
    token: &str,
    calls: &mut Calls,
) -> (u32, Vec<String>) {
    let mut started = 0;
    let mut failures = Vec::new();
    let mut left = n;
    let mut batch = 0;
    while left > 0 {
        let count = left.min(10);
        left -= count;
        calls.run_task += 1;
        let client_token: String = format!("{token}-{batch}").chars().take(64).collect();
        batch += 1;
        let result = client
            .run_task()
            .cluster(cluster)
            .task_definition(task_definition)
            .count(count as i32)
            .started_by(started_by)
            .client_token(client_token)
            .placement_strategy(
                PlacementStrategy::builder()
                    .r#type(PlacementStrategyType::Spread)
                    .field("attribute:ecs.availability-zone")
                    .build(),
            )
            .send()
            .await;
        match result {
            Ok(out) => {
                started += out.tasks().len() as u32;
                for f in out.failures() {
                    failures.push(format!(
                        "{}: {}",
                        f.arn().unwrap_or("?"),
                        f.reason().unwrap_or("no reason given")
                    ));
                }
                let missing = count as usize - out.tasks().len();
                if missing > 0 && out.failures().is_empty() {
                    failures.push(format!(
                        "{missing} of {count} tasks not placed (no reason given)"
                    ));
                }
            }
            Err(e) => failures.push(err(e)),
        }
    }
    (started, failures)
}

/// Stops the given tasks; returns how many stops were accepted and the errors.
pub async fn stop(
    client: &Client,
    cluster: &str,
    arns: &[String],
    calls: &mut Calls,
) -> (u32, Vec<String>) {
    let mut stopped = 0;
    let mut errors = Vec::new();
    for arn in arns {
        calls.stop_task += 1;
        match client
            .stop_task()
            .cluster(cluster)
            .task(arn)
            .reason("warden: scaling down")
            .send()
            .await
        {
            Ok(_) => stopped += 1,
            Err(e) => errors.push(format!("{arn}: {}", err(e))),
        }
    }
    (stopped, errors)
}

/// ECS service mode: the service's desired count.
pub async fn service_desired(client: &Client, cluster: &str, service: &str) -> Result<u32, String> {
    let out = client
        .describe_services()
        .cluster(cluster)
        .services(service)
        .send()
        .await
        .map_err(err)?;
    out.services()
        .first()
        .map(|s| s.desired_count().max(0) as u32)
        .ok_or_else(|| format!("service {service} not found in cluster {cluster}"))
}

pub async fn set_service_desired(
    client: &Client,
    cluster: &str,
    service: &str,
    n: u32,
    calls: &mut Calls,
) -> Result<(), String> {
    calls.update_service += 1;
    client
        .update_service()
        .cluster(cluster)
        .service(service)
        .desired_count(n as i32)
        .send()
        .await
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(arn: &str, status: &str, az: &str) -> Task {
        Task {
            arn: arn.into(),
            last_status: status.into(),
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
}
