//! Elastic Load Balancing v2: a target group's ARN and type, its targets' health, its
//! attributes, and registering or deregistering one target.

use std::time::Duration;

use aws_config::SdkConfig;

pub use crate::xml::{Target, TargetGroup};
use crate::{xml, Query, QueryError, Service};

/// ELBv2's Query API (same endpoint as classic ELB, another version).
pub const SERVICE: Service = Service {
    signing_name: "elasticloadbalancing",
    endpoint_prefix: "elasticloadbalancing",
    version: "2015-12-01",
    endpoint_env: "AWS_ENDPOINT_URL_ELASTIC_LOAD_BALANCING_V2",
    what: "ELBv2",
};

/// An ELBv2 client for one region.
pub struct Elbv2 {
    query: Query,
}

impl Elbv2 {
    /// A client with `sdk`'s region and credentials; each call times out after `timeout`.
    pub fn new(sdk: &SdkConfig, timeout: Duration) -> Result<Elbv2, QueryError> {
        Ok(Elbv2 {
            query: Query::new(sdk, SERVICE, timeout)?,
        })
    }

    /// The target group named `name`, or with that ARN (DescribeTargetGroups); `None`
    /// when the answer lists none.
    pub async fn target_group(&self, name: &str) -> Result<Option<TargetGroup>, QueryError> {
        let by = if name.starts_with("arn:") {
            "TargetGroupArns.member.1"
        } else {
            "Names.member.1"
        };
        let text = self
            .query
            .call(&[("Action", "DescribeTargetGroups"), (by, name)])
            .await?;
        Ok(xml::target_groups(&text)?.into_iter().next())
    }

    /// The targets of group `arn` with their health (DescribeTargetHealth).
    pub async fn targets(&self, arn: &str) -> Result<Vec<Target>, QueryError> {
        let text = self
            .query
            .call(&[("Action", "DescribeTargetHealth"), ("TargetGroupArn", arn)])
            .await?;
        xml::targets(&text)
    }

    /// The group's attributes, key and value (DescribeTargetGroupAttributes).
    pub async fn attributes(&self, arn: &str) -> Result<Vec<(String, String)>, QueryError> {
        let text = self
            .query
            .call(&[
                ("Action", "DescribeTargetGroupAttributes"),
                ("TargetGroupArn", arn),
            ])
            .await?;
        xml::attributes(&text)
    }

    /// Registers (or deregisters) target `id` (on `port`, if given) with group `arn`.
    pub async fn set(
        &self,
        arn: &str,
        id: &str,
        port: Option<u16>,
        register: bool,
    ) -> Result<(), QueryError> {
        let action = if register {
            "RegisterTargets"
        } else {
            "DeregisterTargets"
        };
        let port = port.map(|p| p.to_string());
        let mut params = vec![
            ("Action", action),
            ("TargetGroupArn", arn),
            ("Targets.member.1.Id", id),
        ];
        if let Some(p) = port.as_deref() {
            params.push(("Targets.member.1.Port", p));
        }
        self.query.call(&params).await?;
        Ok(())
    }
}
