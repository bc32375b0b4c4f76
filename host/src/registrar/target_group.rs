//! ELBv2 target group membership (Application and Network Load Balancers), the
//! [`Membership`] of `warden.target-group`.
//!
//! Why this shape:
//! * A group is named by name or ARN; it is looked up once (DescribeTargetGroups) for
//!   its ARN and target type, and the lookup is kept.
//! * The target is what the group's type asks for: the instance id for an `instance`
//!   group, the host's private IP for an `ip` group (`host.private_ip`, else instance
//!   metadata's `local-ipv4`), with the service's router port. A `lambda` or `alb` group
//!   cannot have a host as target: a configuration error an operator must fix.
//! * Membership is read before every call (DescribeTargetHealth): a target that is
//!   `draining` is already leaving, so it counts as not a member.
//! * After leaving, the group drains the host's connections for its own deregistration
//!   delay (`deregistration_delay.timeout_seconds`, read from its attributes); the loop
//!   says when that is over, and a container coming back meanwhile re-registers at once.

use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::Arc;

use tokio::sync::{Mutex, OnceCell};
use warden_aws_query::elbv2::Elbv2;
use warden_aws_query::QueryError;

use super::desired::TargetGroupKey;
use super::elb::{counted, ElbError, Membership};

/// What a group's lookup gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub arn: String,
    pub kind: TargetKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Instance,
    Ip,
}

/// The group's target type as warden can use it.
/// (`""`: the answer did not say; AWS's default is `instance`.)
pub fn target_kind(group: &str, t: &str) -> Result<TargetKind, ElbError> {
    match t {
        "instance" | "" => Ok(TargetKind::Instance),
        "ip" => Ok(TargetKind::Ip),
        other => Err(ElbError::Config(format!(
            "target group {group} has target type {other}: a host can only be an `instance` or `ip` target"
        ))),
    }
}

/// Whether the described targets include this one, not draining. A group's own port is
/// used when `port` is `None`, so any port of the target then counts.
pub fn is_listed<'a>(
    targets: impl IntoIterator<Item = (&'a str, Option<u16>, &'a str)>,
    id: &str,
    port: Option<u16>,
) -> bool {
    targets.into_iter().any(|(t, p, state)| {
        t == id && port.is_none_or(|want| p == Some(want)) && state != "draining"
    })
}

/// Target groups, with the host's instance id and (for `ip` groups) private IP.
pub struct TargetGroups {
    client: Arc<Elbv2>,
    instance: String,
    configured_ip: Option<String>,
    private_ip: OnceCell<String>,
    groups: Mutex<BTreeMap<String, Group>>,
}

impl TargetGroups {
    pub fn new(client: Arc<Elbv2>, instance: String, private_ip: Option<String>) -> Self {
        Self {
            client,
            instance,
            configured_ip: private_ip,
            private_ip: OnceCell::new(),
            groups: Mutex::new(BTreeMap::new()),
        }
    }

    async fn group(&self, name: &str) -> Result<Group, ElbError> {
        if let Some(g) = self.groups.lock().await.get(name) {
            return Ok(g.clone());
        }
        let out = self
            .client
            .target_group(name)
            .await
            .map_err(|e| classify(name, "DescribeTargetGroups", e));
        let tg = counted("DescribeTargetGroups", out)?
            .ok_or_else(|| ElbError::NotFound(format!("target group {name}")))?;
        let group = Group {
            kind: target_kind(name, &tg.target_type)?,
            arn: tg.arn,
        };
        self.groups
            .lock()
            .await
            .insert(name.to_owned(), group.clone());
        Ok(group)
    }

    async fn private_ip(&self) -> Result<&str, ElbError> {
        self.private_ip
            .get_or_try_init(|| async {
                if let Some(ip) = &self.configured_ip {
                    return Ok(ip.clone());
                }
                crate::identity::metadata("local-ipv4")
                    .await
                    .map_err(|e| {
                        ElbError::Config(format!(
                            "an `ip` target group needs this host's private IP: set host.private_ip (WARDEN_PRIVATE_IP); instance metadata did not answer ({e})"
                        ))
                    })
            })
            .await
            .map(String::as_str)
    }

    /// The group and this host's target id in it.
    async fn target(&self, key: &TargetGroupKey) -> Result<(Group, String), ElbError> {
        let group = self.group(&key.group).await?;
        let id = match group.kind {
            TargetKind::Instance => self.instance.clone(),
            TargetKind::Ip => self.private_ip().await?.to_owned(),
        };
        Ok((group, id))
    }
}

impl TargetGroups {
    /// A group that is gone is looked up again next time (it may be made again with
    /// another ARN).
    async fn forget_if_gone<T>(&self, key: &TargetGroupKey, r: &Result<T, ElbError>) {
        if matches!(r, Err(ElbError::NotFound(_))) {
            self.groups.lock().await.remove(&key.group);
        }
    }

    async fn is_member_once(&self, key: &TargetGroupKey) -> Result<bool, ElbError> {
        let (group, id) = self.target(key).await?;
        let out = self
            .client
            .targets(&group.arn)
            .await
            .map_err(|e| classify(&key.group, "DescribeTargetHealth", e));
        let targets = counted("DescribeTargetHealth", out)?;
        let listed = targets
            .iter()
            .map(|t| (t.id.as_str(), t.port, t.state.as_str()));
        Ok(is_listed(listed, &id, key.port))
    }

    async fn set_once(&self, key: &TargetGroupKey, register: bool) -> Result<(), ElbError> {
        let (group, id) = self.target(key).await?;
        let op = if register {
            "RegisterTargets"
        } else {
            "DeregisterTargets"
        };
        let r = self
            .client
            .set(&group.arn, &id, key.port, register)
            .await
            .map_err(|e| classify(&key.group, op, e));
        counted(op, r)
    }
}

impl Membership for TargetGroups {
    type Key = TargetGroupKey;
    const WHAT: &'static str = "target group";

    async fn is_member(&self, key: &TargetGroupKey) -> Result<bool, ElbError> {
        let r = self.is_member_once(key).await;
        self.forget_if_gone(key, &r).await;
        r
    }

    async fn set(&self, key: &TargetGroupKey, register: bool) -> Result<(), ElbError> {
        let r = self.set_once(key, register).await;
        self.forget_if_gone(key, &r).await;
        r
    }

    async fn leave_delay(&self, key: &TargetGroupKey) -> Duration {
        const AWS_DEFAULT: Duration = Duration::from_secs(300);
        let Ok(group) = self.group(&key.group).await else {
            return AWS_DEFAULT;
        };
        let out = self
            .client
            .attributes(&group.arn)
            .await
            .map_err(|e| classify(&key.group, "DescribeTargetGroupAttributes", e));
        match counted("DescribeTargetGroupAttributes", out) {
            Ok(attributes) => attributes
                .iter()
                .find(|(k, _)| k == "deregistration_delay.timeout_seconds")
                .and_then(|(_, v)| v.parse().ok())
                .map_or(AWS_DEFAULT, Duration::from_secs),
            Err(e) => {
                tracing::warn!(balancer = %key, error = %e, "cannot read the target group's deregistration delay; assuming AWS's default of 300 s");
                AWS_DEFAULT
            }
        }
    }
}

/// The error as the loop sorts it; one it retries names the call that failed.
fn classify(group: &str, op: &str, e: QueryError) -> ElbError {
    let code = match &e {
        QueryError::Service { code, .. } => code.as_str(),
        _ => "",
    };
    match code {
        "TargetGroupNotFound" => ElbError::NotFound(format!("target group {group}")),
        "InvalidTarget" | "ValidationError" => {
            ElbError::Config(format!("target group {group}: {op}: {e}"))
        }
        _ => ElbError::Aws(format!("{op}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_an_instance_or_ip_target_and_nothing_else() {
        assert_eq!(target_kind("g", "ip").unwrap(), TargetKind::Ip);
        assert_eq!(target_kind("g", "instance").unwrap(), TargetKind::Instance);
        assert_eq!(target_kind("g", "").unwrap(), TargetKind::Instance);
        let e = target_kind("g", "lambda").unwrap_err();
        assert!(
            matches!(&e, ElbError::Config(m) if m.contains("lambda")),
            "{e}"
        );
    }

    #[test]
    fn a_draining_target_or_another_port_is_not_a_member() {
        let listed = [
            ("i-1", Some(8001), "healthy"),
            ("i-2", Some(8001), "draining"),
        ];
        assert!(is_listed(listed, "i-1", Some(8001)));
        assert!(is_listed(listed, "i-1", None));
        assert!(!is_listed(listed, "i-1", Some(8002)));
        assert!(!is_listed(listed, "i-2", Some(8001)));
        assert!(!is_listed(listed, "i-3", None));
    }
}
