//! Metric: the number of running EC2 instances of an Elastic Beanstalk environment.
//!
//! Counts instances tagged `elasticbeanstalk:environment-name = <environment>` in the
//! `running` state (DescribeInstances, paged). That works on AWS and on moto_server, which
//! lacks DescribeEnvironmentResources. Uses the SDK's default credential chain and honours
//! `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_EC2`) and `AWS_REGION`. The call is warden's
//! own Query client (`warden-aws-query`), not `aws-sdk-ec2`, whose build took two thirds of
//! warden's.

use std::time::Duration;

use warden_plugin_api::prelude::*;

/// The tag Elastic Beanstalk puts on its environment's instances.
const TAG: &str = "elasticbeanstalk:environment-name";

#[derive(Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// The Elastic Beanstalk environment's name.
    pub environment: String,
    /// AWS region (default: the SDK's, from `AWS_REGION` or the profile).
    #[serde(default)]
    pub region: Option<String>,
}

pub struct BeanstalkInstances {
    environment: String,
    ec2: warden_aws_query::Ec2,
}

/// Throttling, timeouts and 5xx are worth retrying; anything else is not.
fn classify(e: warden_aws_query::QueryError) -> PluginError {
    let text = format!("EC2 DescribeInstances: {e}");
    if e.is_transient() {
        PluginError::transient(text)
    } else {
        PluginError::permanent(text)
    }
}

impl MetricSource for BeanstalkInstances {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        if config.environment.trim().is_empty() {
            return Err(PluginError::config("environment: must not be empty"));
        }
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .app_name(aws_config::AppName::new("warden-beanstalk-instances").expect("valid"));
        if let Some(r) = config.region {
            loader = loader.region(aws_config::Region::new(r));
        }
        let ec2 = warden_aws_query::Ec2::new(&loader.load().await, Duration::from_secs(10))
            .map_err(|e| PluginError::config(e.to_string()))?;
        Ok(BeanstalkInstances {
            environment: config.environment,
            ec2,
        })
    }

    async fn measure(&self) -> Result<Measurement, PluginError> {
        let count = self
            .ec2
            .count_running_instances(TAG, &self.environment)
            .await
            .map_err(classify)?;
        Ok(Measurement::new(count as f64)
            .unit("instances")
            .label("environment", self.environment.clone()))
    }
}

export_plugin! { name: "beanstalk-instances", metric_source: BeanstalkInstances }
