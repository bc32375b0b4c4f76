//! `warden routes`: the routing table as the router sees it in the local Redis — every
//! front-end and port front-end with its backend and servers, which container each server
//! is — and what the registrars on this Redis say of conflicts, keys left alone and
//! containers not routed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub(crate) struct Routes {
    pub frontends: Vec<Frontend>,
    /// From every warden writing to this Redis (`warden:registrar:<instance>`).
    pub conflicts: Vec<serde_json::Value>,
    pub blocked: Vec<serde_json::Value>,
    pub not_routed: Vec<serde_json::Value>,
    /// Service definitions refused for a claim outside their grants.
    pub refused: Vec<serde_json::Value>,
    /// Keys that are not of Redx's types (a front-end that is not a string, a backend
    /// that is not a hash): the router skips them too.
    pub wrong_type: Vec<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Frontend {
    /// The Redis key (`frontend:…` or `warden:port:…`).
    pub key: String,
    pub backend: String,
    pub servers: Vec<Server>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Server {
    pub address: String,
    /// The container behind it, when a warden on this Redis routed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

async fn scan(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
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

const WHICH: &str = "local";

/// The routes as the router sees them (front-ends, backends, servers), with what the
/// registrars' accounts say of them (containers, conflicts, refusals, what is not routed).
pub(crate) async fn read(url: &str, ca_file: Option<&std::path::Path>) -> anyhow::Result<Routes> {
    let addr = crate::redis_util::addr(url);
    let fail = |e: redis::RedisError| {
        anyhow::anyhow!("local redis {addr}: {}", crate::redis_util::describe(&e))
    };
    let client = crate::redis_util::open(url, ca_file)
        .map_err(|m| anyhow::anyhow!("{} redis {addr}: {m}", WHICH))?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("local redis {addr}: no answer within 5 s"))?
    .map_err(fail)?;
    let mut routes = Routes::default();
    let containers = accounts(&mut conn, &mut routes).await.map_err(fail)?;
    routes.frontends = frontends(&mut conn, &containers, &mut routes.wrong_type)
        .await
        .map_err(fail)?;
    Ok(routes)
}

/// The registrars' accounts: which container each address is (returned), and the
/// conflicts, blocked keys, refusals and containers not routed (into `routes`).
async fn accounts(
    conn: &mut redis::aio::MultiplexedConnection,
    routes: &mut Routes,
) -> redis::RedisResult<BTreeMap<String, String>> {
    let mut containers: BTreeMap<String, String> = BTreeMap::new();
    for key in scan(conn, "warden:registrar:*").await? {
        let text: Option<String> = redis::cmd("GET").arg(&key).query_async(conn).await?;
        let Some(v) = text.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) else {
            continue;
        };
        for c in v["containers"].as_array().into_iter().flatten() {
            match (c["address"].as_str(), c["name"].as_str()) {
                (Some(a), Some(n)) => {
                    containers.insert(a.to_owned(), n.to_owned());
                }
                _ => routes.not_routed.push(c.clone()),
            }
        }
        let all = |k: &str| v[k].as_array().into_iter().flatten().cloned();
        routes.conflicts.extend(all("conflicts"));
        routes.blocked.extend(all("blocked"));
        routes.refused.extend(all("refused"));
    }
    Ok(containers)
}

/// Every front-end and port key with its backend's servers; keys of another type than
/// Redx's go to `wrong_type` (the router skips them too).
async fn frontends(
    conn: &mut redis::aio::MultiplexedConnection,
    containers: &BTreeMap<String, String>,
    wrong_type: &mut Vec<String>,
) -> redis::RedisResult<Vec<Frontend>> {
    let mut keys = scan(conn, "frontend:*").await?;
    keys.extend(scan(conn, "warden:port:*").await?);
    let mut frontends = Vec::new();
    let wrong = |e: &redis::RedisError| e.code() == Some("WRONGTYPE");
    for key in keys {
        let backend: Option<String> = match redis::cmd("GET").arg(&key).query_async(conn).await {
            Err(e) if wrong(&e) => {
                wrong_type.push(key);
                continue;
            }
            r => r?,
        };
        let Some(backend) = backend else { continue };
        let hash = format!("backend:{backend}");
        let fields: Vec<String> = match redis::cmd("HKEYS").arg(&hash).query_async(conn).await {
            Err(e) if wrong(&e) => {
                wrong_type.push(hash);
                continue;
            }
            r => r?,
        };
        let servers = fields
            .into_iter()
            .filter(|f| !f.starts_with('_'))
            .map(|address| Server {
                container: containers.get(&address).cloned(),
                address,
            })
            .collect();
        frontends.push(Frontend {
            key,
            backend,
            servers,
        });
    }
    Ok(frontends)
}

/// The table an operator reads: the front-ends, then whatever is not as it should be.
pub(crate) fn render(r: &Routes) -> String {
    let mut out = table(r);
    if !r.conflicts.is_empty() {
        out.push_str("conflicts (claims refused):\n");
        for c in &r.conflicts {
            out.push_str(&format!(
                "  {}: held by {} ({}), refused to {} ({})\n",
                shown(c["key"].as_str().unwrap_or("?")),
                c["holder"].as_str().unwrap_or("?"),
                join(&c["holder_containers"]),
                c["refused"].as_str().unwrap_or("?"),
                join(&c["refused_containers"]),
            ));
        }
    }
    if !r.refused.is_empty() {
        out.push_str("refused (a claim outside the grants):\n");
        for f in &r.refused {
            out.push_str(&format!(
                "  service {} from {} ({}): {} is refused: {} ({})\n",
                f["service"].as_str().unwrap_or("?"),
                f["source"].as_str().unwrap_or("?"),
                join(&f["containers"]),
                f["claim"].as_str().unwrap_or("?"),
                f["why"].as_str().unwrap_or("?"),
                f["grant"].as_str().unwrap_or("?"),
            ));
        }
    }
    out.push_str(&left_out(r));
    out
}

/// A key as the table shows it: `port P`, or the front-end without its prefix.
fn shown(key: &str) -> String {
    match key.strip_prefix("warden:port:") {
        Some(p) => format!("port {p}"),
        None => key.strip_prefix("frontend:").unwrap_or(key).to_owned(),
    }
}

/// One line per front-end: its backend and servers (with their containers).
fn table(r: &Routes) -> String {
    let width = r
        .frontends
        .iter()
        .map(|f| shown(&f.key).len())
        .max()
        .unwrap_or(9)
        .max(9);
    let mut out = format!("{:width$}  {:12}  servers\n", "front-end", "backend");
    for f in &r.frontends {
        let servers: Vec<String> = f
            .servers
            .iter()
            .map(|s| match &s.container {
                Some(c) => format!("{} ({c})", s.address),
                None => s.address.clone(),
            })
            .collect();
        let servers = if servers.is_empty() {
            "none (the router answers 500 here: an empty backend)".to_owned()
        } else {
            servers.join(", ")
        };
        out.push_str(&format!(
            "{:width$}  {:12}  {servers}\n",
            shown(&f.key),
            f.backend
        ));
    }
    out
}

/// What is skipped, left alone or not routed, and why.
fn left_out(r: &Routes) -> String {
    let mut out = String::new();
    if !r.wrong_type.is_empty() {
        out.push_str(&format!(
            "skipped (not Redx's type; the router skips them too): {}\n",
            r.wrong_type.join(", ")
        ));
    }
    if !r.blocked.is_empty() {
        out.push_str("left alone (another writer's value):\n");
        for b in &r.blocked {
            out.push_str(&format!(
                "  {} holds {}; warden wants {}\n",
                b["key"].as_str().unwrap_or("?"),
                b["found"],
                b["wanted"]
            ));
        }
    }
    if !r.not_routed.is_empty() {
        out.push_str("not routed:\n");
        for c in &r.not_routed {
            out.push_str(&format!(
                "  {} (service {}): {}\n",
                c["name"].as_str().unwrap_or("?"),
                c["service"].as_str().unwrap_or("?"),
                c["not_routed"].as_str().unwrap_or("?")
            ));
        }
    }
    out
}

fn join(v: &serde_json::Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}
