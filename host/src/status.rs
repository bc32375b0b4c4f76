//! `warden status`: what the central Redis says of the election and the managed services.

use std::time::Duration;

use serde::Serialize;

use crate::manager::{central, lease, opt, Record};

#[derive(Debug, Serialize)]
pub(crate) struct Status {
    pub leader: Option<LeaderStatus>,
    pub hosts: Vec<HostStatus>,
    pub services: Vec<Record>,
    /// Managed services from sources refused by their grants, as the leader published
    /// them.
    pub refused: Vec<crate::manager::sources::ManagedRefusal>,
}

#[derive(Debug, Serialize)]
pub(crate) struct LeaderStatus {
    pub instance_id: String,
    pub availability_zone: String,
    pub epoch: u64,
    pub heartbeat_age_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct HostStatus {
    pub instance_id: String,
    pub availability_zone: String,
}

async fn scan(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    Ok(keys)
}

const WHICH: &str = "central";

/// One connection to the central Redis (an address, or Sentinels), for `read_from`.
pub(crate) async fn connect(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let t = crate::redis_link::Timeouts {
        connect: Duration::from_secs(5),
        response: Duration::from_secs(5),
    };
    let endpoint = crate::redis_link::Endpoint::new(url, ca_file, t)
        .map_err(|m| anyhow::anyhow!("{} redis {}: {m}", WHICH, crate::redis_util::addr(url)))?;
    let addr = endpoint.addr.clone();
    endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("central redis {addr}: {}", crate::redis_util::describe(&e)))
}

pub(crate) async fn read(url: &str, ca_file: Option<&std::path::Path>) -> anyhow::Result<Status> {
    let mut conn = connect(url, ca_file).await?;
    read_from(&mut conn).await
}

/// The status, read over an open connection (each command bounded by 5 s).
pub(crate) async fn read_from(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<Status> {
    tokio::time::timeout(Duration::from_secs(5), read_inner(conn))
        .await
        .map_err(|_| anyhow::anyhow!("central redis: no answer within 5 s"))?
}

async fn read_inner(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<Status> {
    let mut conn = conn.clone();
    let lease: Option<String> = redis::cmd("GET")
        .arg(central::LEADER)
        .query_async(&mut conn)
        .await?;
    let (now_s, now_us): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
    let now_ms = now_s * 1000 + now_us / 1000;
    let hb: Option<u64> = redis::cmd("HGET")
        .arg(central::HEARTBEAT)
        .arg("time_ms")
        .query_async(&mut conn)
        .await?;
    let leader = lease
        .as_deref()
        .and_then(lease::Lease::parse)
        .map(|l| LeaderStatus {
            instance_id: l.id,
            availability_zone: l.az,
            epoch: l.epoch,
            heartbeat_age_ms: hb.map(|t| now_ms.saturating_sub(t)),
        });
    let mut hosts = Vec::new();
    for key in scan(&mut conn, "warden:host:*").await? {
        let az: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("az")
            .query_async(&mut conn)
            .await?;
        hosts.push(HostStatus {
            instance_id: key.trim_start_matches("warden:host:").to_owned(),
            availability_zone: az.unwrap_or_default(),
        });
    }
    let mut services = Vec::new();
    for key in scan(&mut conn, "warden:decision:*").await? {
        let text: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        if let Some(r) = text.and_then(|t| serde_json::from_str::<Record>(&t).ok()) {
            services.push(r);
        }
    }
    // Only the services the leader manages now (a decision of a service no longer
    // configured stays in Redis, but is not news).
    let managed: Option<String> = redis::cmd("GET")
        .arg(central::MANAGED)
        .query_async(&mut conn)
        .await?;
    if let Some(names) = managed.and_then(|t| serde_json::from_str::<Vec<String>>(&t).ok()) {
        services.retain(|r| names.contains(&r.service));
    }
    let refused: Option<String> = redis::cmd("GET")
        .arg(central::REFUSED)
        .query_async(&mut conn)
        .await?;
    let refused = refused
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    Ok(Status {
        leader,
        hosts,
        services,
        refused,
    })
}

/// The human-readable form.
pub(crate) fn render(s: &Status) -> String {
    let mut out = String::new();
    match &s.leader {
        Some(l) => out.push_str(&format!(
            "leader: {} in {} (epoch {}, heartbeat {} ago)\n",
            l.instance_id,
            l.availability_zone,
            l.epoch,
            l.heartbeat_age_ms
                .map_or("never".to_owned(), |a| format!("{a} ms"))
        )),
        None => out.push_str("leader: none\n"),
    }
    out.push_str(&format!("hosts ({}):\n", s.hosts.len()));
    for h in &s.hosts {
        out.push_str(&format!("  {} {}\n", h.instance_id, h.availability_zone));
    }
    if !s.refused.is_empty() {
        out.push_str(&format!("refused by their grants ({}):\n", s.refused.len()));
        for r in &s.refused {
            out.push_str(&format!("  {r}\n"));
        }
    }
    out.push_str(&format!("services ({}):\n", s.services.len()));
    for r in &s.services {
        let d = &r.decision;
        let unit = r.unit.as_deref().map_or(String::new(), |u| format!(" {u}"));
        let mapped_value = r
            .mapped_value
            .map_or(String::new(), |v| format!(" (mapping plugin: {v})"));
        out.push_str(&format!(
            "  {}: metric {}{unit}{mapped_value} mapped {} desired {} running {} action {} ({}) by {} epoch {}: {}\n",
            r.service,
            r.metric.map_or("failed".to_owned(), |m| m.to_string()),
            opt(&d.mapped),
            d.desired,
            opt(&r.running),
            d.action,
            r.outcome,
            r.leader,
            r.epoch,
            d.reason
        ));
        if let Some(i) = r.metric_isolation {
            out.push_str(&format!(
                "    metric source runs {}\n",
                match i {
                    crate::plugins::Isolation::Process => "in a process of its own",
                    _ => "in warden's process",
                }
            ));
        }
        if !r.labels.is_empty() {
            let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("    metric labels: {}\n", labels.join(", ")));
        }
        if let Some(e) = &r.metric_error {
            out.push_str(&format!("    metric error ({}): {}\n", e.kind, e.message));
        }
    }
    out
}
