//! Metric: the number of running EC2 instances of an Elastic Beanstalk environment.
//!
//! Counts instances tagged `elasticbeanstalk:environment-name = <environment>` in the
//! `running` state (DescribeInstances, paged). That works on AWS and on moto_server, which
//! lacks DescribeEnvironmentResources. Uses the SDK's default credential chain and honours
//! `AWS_ENDPOINT_URL` and `AWS_REGION`.

use aws_sdk_ec2::types::Filter;
use warden_plugin_api::prelude::*;

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
    ec2: aws_sdk_ec2::Client,
}

/// Throttling, timeouts and 5xx are worth retrying; anything else is not.
fn classify<E, R>(e: aws_sdk_ec2::error::SdkError<E, R>) -> PluginError
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_ec2::error::SdkError;
    let text = aws_sdk_ec2::error::DisplayErrorContext(&e).to_string();
    match &e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("");
            if code.contains("Throttl")
                || code == "RequestLimitExceeded"
                || code.starts_with("Internal")
                || code == "Unavailable"
            {
                PluginError::transient(text)
            } else {
                PluginError::permanent(text)
            }
        }
        _ => PluginError::transient(text),
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
        let ec2 = aws_sdk_ec2::Client::new(&loader.load().await);
        Ok(BeanstalkInstances {
            environment: config.environment,
            ec2,
        })
    }

    async fn measure(&self) -> Result<Measurement, PluginError> {
        let mut pages = self
            .ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:elasticbeanstalk:environment-name")
                    .values(&self.environment)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("running")
                    .build(),
            )
            .into_paginator()
            .send();
        let mut count = 0usize;
        while let Some(page) = pages.try_next().await.map_err(classify)? {
            count += page
                .reservations()
                .iter()
                .map(|r| r.instances().len())
                .sum::<usize>();
        }
        Ok(Measurement::new(count as f64)
            .unit("instances")
            .label("environment", self.environment.clone()))
    }
}

export_plugin! { name: "beanstalk-instances", metric_source: BeanstalkInstances }
