//! EC2: the Availability Zones' states and a count of running instances by tag.

use std::time::Duration;

use aws_config::SdkConfig;

use crate::xml;
pub use crate::xml::Zone;
use crate::{Query, QueryError, Service};

/// EC2's Query API.
pub const SERVICE: Service = Service {
    signing_name: "ec2",
    endpoint_prefix: "ec2",
    version: "2016-11-15",
    endpoint_env: "AWS_ENDPOINT_URL_EC2",
    what: "EC2",
};

/// An EC2 client for one region.
pub struct Ec2 {
    query: Query,
}

impl Ec2 {
    /// A client with `sdk`'s region and credentials; each call times out after `timeout`.
    pub fn new(sdk: &SdkConfig, timeout: Duration) -> Result<Ec2, QueryError> {
        Ok(Ec2 {
            query: Query::new(sdk, SERVICE, timeout)?,
        })
    }

    /// Every Availability Zone of the region with its state (`available`, `impaired`...).
    pub async fn describe_availability_zones(&self) -> Result<Vec<Zone>, QueryError> {
        let text = self
            .query
            .call(&[("Action", "DescribeAvailabilityZones")])
            .await?;
        xml::zones(&text)
    }

    /// The number of running instances whose tag `key` is `value`, all pages read.
    pub async fn count_running_instances(
        &self,
        key: &str,
        value: &str,
    ) -> Result<usize, QueryError> {
        let tag = format!("tag:{key}");
        let mut token: Option<String> = None;
        let mut count = 0;
        loop {
            let mut params = vec![
                ("Action", "DescribeInstances"),
                ("Filter.1.Name", tag.as_str()),
                ("Filter.1.Value.1", value),
                ("Filter.2.Name", "instance-state-name"),
                ("Filter.2.Value.1", "running"),
            ];
            if let Some(t) = token.as_deref() {
                params.push(("NextToken", t));
            }
            let page = xml::instances_page(&self.query.call(&params).await?)?;
            count += page.instances;
            match page.next_token {
                Some(t) => token = Some(t),
                None => return Ok(count),
            }
        }
    }
}
