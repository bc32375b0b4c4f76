//! Classic Elastic Load Balancing: which instances a balancer has, and registering or
//! deregistering one.

use std::time::Duration;

use aws_config::SdkConfig;

use crate::{xml, Query, QueryError, Service};

/// Classic ELB's Query API.
pub const SERVICE: Service = Service {
    signing_name: "elasticloadbalancing",
    endpoint_prefix: "elasticloadbalancing",
    version: "2012-06-01",
    endpoint_env: "AWS_ENDPOINT_URL_ELASTIC_LOAD_BALANCING",
    what: "ELB",
};

/// A classic ELB client for one region.
pub struct Elb {
    query: Query,
}

impl Elb {
    /// A client with `sdk`'s region and credentials; each call times out after `timeout`.
    pub fn new(sdk: &SdkConfig, timeout: Duration) -> Result<Elb, QueryError> {
        Ok(Elb {
            query: Query::new(sdk, SERVICE, timeout)?,
        })
    }

    /// The instance ids registered with balancer `name` (DescribeLoadBalancers); `None`
    /// when the answer lists no such balancer.
    pub async fn instances(&self, name: &str) -> Result<Option<Vec<String>>, QueryError> {
        let text = self
            .query
            .call(&[
                ("Action", "DescribeLoadBalancers"),
                ("LoadBalancerNames.member.1", name),
            ])
            .await?;
        xml::balancer_instances(&text)
    }

    /// Registers (or deregisters) `instance` with balancer `name`.
    pub async fn set(&self, name: &str, instance: &str, register: bool) -> Result<(), QueryError> {
        let action = if register {
            "RegisterInstancesWithLoadBalancer"
        } else {
            "DeregisterInstancesFromLoadBalancer"
        };
        self.query
            .call(&[
                ("Action", action),
                ("LoadBalancerName", name),
                ("Instances.member.1.InstanceId", instance),
            ])
            .await?;
        Ok(())
    }
}
