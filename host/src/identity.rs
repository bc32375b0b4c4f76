//! Who this host is: its instance id and Availability Zone, from the config (or
//! `WARDEN_INSTANCE_ID` / `WARDEN_AVAILABILITY_ZONE`) and else from EC2 instance metadata
//! (IMDSv2). When both are configured, instance metadata is never asked.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[host]`: who this host is, where instance metadata should not be asked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// EC2 instance id; from instance metadata when absent.
    pub instance_id: Option<String>,
    /// Availability Zone; from instance metadata when absent.
    pub availability_zone: Option<String>,
    /// Private IP this host is registered with in `ip` target groups; from instance
    /// metadata (`local-ipv4`) when absent.
    pub private_ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// `None` off EC2 with nothing configured: ELB membership is off, and the manager
    /// takes part under the host name.
    pub instance_id: Option<String>,
    /// `None` off EC2 with nothing configured: the AZ check is off for this host.
    pub availability_zone: Option<String>,
}

/// Reads what is not configured from IMDSv2; logs once what stays unknown and why.
pub(crate) async fn resolve(host: &HostConfig) -> Identity {
    let mut id = Identity {
        instance_id: host.instance_id.clone(),
        availability_zone: host.availability_zone.clone(),
    };
    if id.instance_id.is_some() && id.availability_zone.is_some() {
        return id;
    }
    if id.instance_id.is_none() {
        match metadata("instance-id").await {
            Ok(v) => id.instance_id = Some(v),
            Err(e) => tracing::warn!(
                error = %e,
                "instance id unknown: not in the config (host.instance_id, WARDEN_INSTANCE_ID) and instance metadata did not answer; ELB membership is off"
            ),
        }
    }
    if id.availability_zone.is_none() {
        match metadata("placement/availability-zone").await {
            Ok(v) => id.availability_zone = Some(v),
            Err(e) => tracing::warn!(
                error = %e,
                "Availability Zone unknown: not in the config (host.availability_zone, WARDEN_AVAILABILITY_ZONE) and instance metadata did not answer; this host's AZ is not checked"
            ),
        }
    }
    id
}

/// One value of this instance's metadata (`/latest/meta-data/<path>`, IMDSv2), trimmed:
/// the one way warden asks instance metadata, with short timeouts (off EC2 it is not
/// there, and nothing may wait long for it).
pub(crate) async fn metadata(path: &str) -> Result<String, String> {
    let imds = aws_config::imds::client::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .read_timeout(Duration::from_millis(500))
        .max_attempts(2)
        .build();
    imds.get(format!("/latest/meta-data/{path}"))
        .await
        .map(|v| v.as_ref().trim().to_owned())
        .map_err(|e| e.to_string())
}
