//! `sqs-queue`: the messages waiting in an SQS queue (`ApproximateNumberOfMessages`,
//! plus the in-flight `ApproximateNumberOfMessagesNotVisible` when asked), by queue name
//! or URL. Throttling, timeouts and 5xx are `transient`; a queue that does not exist or
//! access denied is `config` (the operator must act).

use warden_plugin_api::prelude::*;

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::QueueAttributeName;

/// `[metrics.<name>] plugin = "sqs-queue"`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// The queue's name (looked up once with GetQueueUrl) or its URL.
    pub queue: String,
    /// Count the messages in flight (received, not yet deleted) too.
    #[serde(default)]
    pub include_in_flight: bool,
    /// AWS region (default: the SDK's chain: AWS_REGION, instance metadata...).
    #[serde(default)]
    pub region: Option<String>,
}

/// A metric source reading one queue's depth.
pub struct SqsQueue {
    sqs: aws_sdk_sqs::Client,
    url: warden_plugin_api::tokio::sync::OnceCell<String>,
    config: Config,
}

fn classify<E, R>(what: &str, e: SdkError<E, R>) -> PluginError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("");
            let message = format!("{what}: {code}: {}", s.err().message().unwrap_or(""));
            if code.contains("Throttl")
                || code.starts_with("Internal")
                || code == "ServiceUnavailable"
                || code == "RequestThrottled"
            {
                PluginError::transient(message)
            } else {
                // NonExistentQueue, AccessDenied, InvalidAddress...
                PluginError::config(message)
            }
        }
        _ => PluginError::transient(format!(
            "{what}: {}",
            aws_sdk_sqs::error::DisplayErrorContext(&e)
        )),
    }
}

impl SqsQueue {
    async fn url(&self) -> Result<&str, PluginError> {
        self.url
            .get_or_try_init(|| async {
                if self.config.queue.starts_with("https://")
                    || self.config.queue.starts_with("http://")
                {
                    return Ok(self.config.queue.clone());
                }
                let out = self
                    .sqs
                    .get_queue_url()
                    .queue_name(&self.config.queue)
                    .send()
                    .await
                    .map_err(|e| classify(&format!("queue {:?}", self.config.queue), e))?;
                out.queue_url()
                    .map(str::to_owned)
                    .ok_or_else(|| PluginError::transient("GetQueueUrl gave no URL"))
            })
            .await
            .map(String::as_str)
    }
}

impl MetricSource for SqsQueue {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        if config.queue.trim().is_empty() {
            return Err(PluginError::config("queue: must not be empty"));
        }
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .app_name(aws_config::AppName::new("warden-sqs-queue").expect("valid"));
        if let Some(r) = &config.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        Ok(SqsQueue {
            sqs: aws_sdk_sqs::Client::new(&loader.load().await),
            url: Default::default(),
            config,
        })
    }

    async fn measure(&self) -> Result<Measurement, PluginError> {
        let url = self.url().await?;
        let mut ask = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages);
        if self.config.include_in_flight {
            ask = ask.attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible);
        }
        let out = ask
            .send()
            .await
            .map_err(|e| classify(&format!("queue {:?}", self.config.queue), e))?;
        let attrs = out.attributes();
        let read = |name: QueueAttributeName| -> Result<f64, PluginError> {
            attrs
                .and_then(|a| a.get(&name))
                .ok_or_else(|| {
                    PluginError::transient(format!("no {} in the answer", name.as_str()))
                })?
                .parse::<f64>()
                .map_err(|e| PluginError::transient(format!("{}: {e}", name.as_str())))
        };
        let mut value = read(QueueAttributeName::ApproximateNumberOfMessages)?;
        if self.config.include_in_flight {
            value += read(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?;
        }
        Ok(Measurement::new(value)
            .unit("messages")
            .label("queue", self.config.queue.clone()))
    }
}

export_plugin! { name: "sqs-queue", metric_source: SqsQueue }
