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

use aws_sdk_elasticloadbalancingv2::types::{
    TargetDescription, TargetHealthStateEnum, TargetTypeEnum,
};
use aws_sdk_elasticloadbalancingv2::Client;
use tokio::sync::{Mutex, OnceCell};

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
pub fn target_kind(group: &str, t: Option<&TargetTypeEnum>) -> Result<TargetKind, ElbError> {
    match t {
        Some(TargetTypeEnum::Instance) | None => Ok(TargetKind::Instance),
        Some(TargetTypeEnum::Ip) => Ok(TargetKind::Ip),
        Some(other) => Err(ElbError::Config(format!(
            "target group {group} has target type {}: a host can only be an `instance` or `ip` target",
            other.as_str()
        ))),
    }
}

/// Whether the described targets include this one, not draining. A group's own port is
/// used when `port` is `None`, so any port of the target then counts.
pub fn is_listed<'a>(
    targets: impl IntoIterator<Item = (&'a str, Option<i32>, Option<&'a TargetHealthStateEnum>)>,
    id: &str,
    port: Option<u16>,
) -> bool {
    targets.into_iter().any(|(t, p, state)| {
        t == id
            && port.is_none_or(|want| p == Some(i32::from(want)))
            && state != Some(&TargetHealthStateEnum::Draining)
    })
}

/// Target groups, with the host's instance id and (for `ip` groups) private IP.
pub struct TargetGroups {
    client: Client,
    instance: String,
    configured_ip: Option<String>,
    private_ip: OnceCell<String>,
    groups: Mutex<BTreeMap<String, Group>>,
}

impl TargetGroups {
    pub fn new(client: Client, instance: String, private_ip: Option<String>) -> Self {
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
        let ask = self.client.describe_target_groups();
        let ask = if name.starts_with("arn:") {
            ask.target_group_arns(name)
        } else {
            ask.names(name)
        };
        let out = ask.send().await.map_err(|e| classify(name, e));
        let out = counted("DescribeTargetGroups", out)?;
        let tg = out
            .target_groups()
            .first()
            .ok_or_else(|| ElbError::NotFound(format!("target group {name}")))?;
        let group = Group {
            arn: tg.target_group_arn().unwrap_or(name).to_owned(),
            kind: target_kind(name, tg.target_type())?,
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
                let imds = aws_config::imds::client::Client::builder()
                    .connect_timeout(Duration::from_millis(500))
                    .read_timeout(Duration::from_millis(500))
                    .max_attempts(2)
                    .build();
                imds.get("/latest/meta-data/local-ipv4")
                    .await
                    .map(|v| v.as_ref().trim().to_owned())
                    .map_err(|e| {
                        ElbError::Config(format!(
                            "an `ip` target group needs this host's private IP: set host.private_ip (WARDEN_PRIVATE_IP); instance metadata did not answer ({e})"
                        ))
                    })
            })
            .await
            .map(String::as_str)
    }

    async fn target(&self, key: &TargetGroupKey) -> Result<(Group, TargetDescription), ElbError> {
        let group = self.group(&key.group).await?;
        let id = match group.kind {
            TargetKind::Instance => self.instance.clone(),
            TargetKind::Ip => self.private_ip().await?.to_owned(),
        };
        let target = TargetDescription::builder()
            .id(id)
            .set_port(key.port.map(i32::from))
            .build();
        Ok((group, target))
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
        let (group, target) = self.target(key).await?;
        let out = self
            .client
            .describe_target_health()
            .target_group_arn(&group.arn)
            .send()
            .await
            .map_err(|e| classify(&key.group, e));
        let out = counted("DescribeTargetHealth", out)?;
        let listed = out.target_health_descriptions().iter().filter_map(|d| {
            let t = d.target()?;
            Some((t.id()?, t.port(), d.target_health().and_then(|h| h.state())))
        });
        Ok(is_listed(listed, target.id().unwrap_or(""), key.port))
    }

    async fn set_once(&self, key: &TargetGroupKey, register: bool) -> Result<(), ElbError> {
        let (group, target) = self.target(key).await?;
        if register {
            let r = self
                .client
                .register_targets()
                .target_group_arn(&group.arn)
                .targets(target)
                .send()
                .await
                .map_err(|e| classify(&key.group, e));
            counted("RegisterTargets", r)?;
        } else {
            let r = self
                .client
                .deregister_targets()
                .target_group_arn(&group.arn)
                .targets(target)
                .send()
                .await
                .map_err(|e| classify(&key.group, e));
            counted("DeregisterTargets", r)?;
        }
        Ok(())
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
            .describe_target_group_attributes()
            .target_group_arn(&group.arn)
            .send()
            .await
            .map_err(|e| classify(&key.group, e));
        match counted("DescribeTargetGroupAttributes", out) {
            Ok(out) => out
                .attributes()
                .iter()
                .find(|a| a.key() == Some("deregistration_delay.timeout_seconds"))
                .and_then(|a| a.value()?.parse().ok())
                .map_or(AWS_DEFAULT, Duration::from_secs),
            Err(e) => {
                tracing::warn!(balancer = %key, error = %e, "cannot read the target group's deregistration delay; assuming AWS's default of 300 s");
                AWS_DEFAULT
            }
        }
    }
}

fn classify<E, R>(group: &str, e: aws_sdk_elasticloadbalancingv2::error::SdkError<E, R>) -> ElbError
where
    E: aws_sdk_elasticloadbalancingv2::error::ProvideErrorMetadata
        + std::error::Error
        + std::fmt::Debug
        + 'static,
    R: std::fmt::Debug,
{
    let code = e.as_service_error().and_then(|s| s.code()).unwrap_or("");
    match code {
        "TargetGroupNotFound" => ElbError::NotFound(format!("target group {group}")),
        "InvalidTarget" | "ValidationError" => ElbError::Config(format!(
            "target group {group}: {}",
            crate::aws::describe(&e)
        )),
        _ => ElbError::Aws(crate::aws::describe(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_an_instance_or_ip_target_and_nothing_else() {
        assert_eq!(
            target_kind("g", Some(&TargetTypeEnum::Ip)).unwrap(),
            TargetKind::Ip
        );
        assert_eq!(target_kind("g", None).unwrap(), TargetKind::Instance);
        let e = target_kind("g", Some(&TargetTypeEnum::Lambda)).unwrap_err();
        assert!(
            matches!(&e, ElbError::Config(m) if m.contains("lambda")),
            "{e}"
        );
    }

    #[test]
    fn a_draining_target_or_another_port_is_not_a_member() {
        let healthy = TargetHealthStateEnum::Healthy;
        let draining = TargetHealthStateEnum::Draining;
        let listed = [
            ("i-1", Some(8001), Some(&healthy)),
            ("i-2", Some(8001), Some(&draining)),
        ];
        assert!(is_listed(listed, "i-1", Some(8001)));
        assert!(is_listed(listed, "i-1", None));
        assert!(!is_listed(listed, "i-1", Some(8002)));
        assert!(!is_listed(listed, "i-2", Some(8001)));
        assert!(!is_listed(listed, "i-3", None));
    }
}
