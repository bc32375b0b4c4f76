//! `cloudwatch`: one CloudWatch metric, read with GetMetricData (namespace, name,
//! dimensions, statistic, period), whose newest datapoint must be at most `max_age_secs`
//! old.
//!
//! Why not the AWS SDK's CloudWatch client: it speaks CloudWatch's CBOR protocol only,
//! which the AWS stand-in the tests run against (moto) does not answer in a form the SDK
//! reads. CloudWatch also serves the AWS JSON 1.0 protocol (`X-Amz-Target:
//! GraniteServiceVersion20100801.GetMetricData`), which both real AWS and moto answer,
//! so this plugin sends that one request itself, signed with SigV4 by `aws-sigv4` and
//! with credentials, region and endpoint from the SDK's usual chain (`aws-config`).
//!
//! Errors: throttling, 5xx, an expired token, no answer → `transient`; access denied,
//! an invalid parameter, unknown credentials, no region → `config`; no datapoint within
//! `max_age_secs` → `transient` (the manager holds the count) unless `when_missing` says
//! what an absent datapoint stands for.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::provider::{error::CredentialsError, ProvideCredentials};
use warden_plugin_api::prelude::*;
use warden_plugin_api::serde_json::{self, json, Value};

use warden_plugin_common::http as web;

const TARGET: &str = "GraniteServiceVersion20100801.GetMetricData";
const CONTENT_TYPE: &str = "application/x-amz-json-1.0";

/// `[metrics.<name>] plugin = "cloudwatch"`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// The metric's namespace (`AWS/SQS`, `MyApp`).
    pub namespace: String,
    /// The metric's name (`ApproximateNumberOfMessagesVisible`).
    pub metric_name: String,
    /// The metric's dimensions, name → value (`{ QueueName = "jobs" }`); all of them, as
    /// CloudWatch matches a metric by its full set.
    #[serde(default)]
    pub dimensions: BTreeMap<String, String>,
    /// `Average`, `Sum`, `Minimum`, `Maximum`, `SampleCount` or a percentile (`p99`).
    #[serde(default = "default_statistic")]
    pub statistic: String,
    /// The period of a datapoint, in seconds: 1, 5, 10, 30 or a multiple of 60.
    #[serde(default = "default_period")]
    pub period_secs: u32,
    /// The newest datapoint may be at most this old, in seconds; an older one is not used.
    #[serde(default = "default_max_age")]
    pub max_age_secs: u64,
    /// The value that no datapoint within `max_age_secs` stands for (many AWS metrics
    /// publish nothing while idle). Default: no datapoint is an error.
    #[serde(default)]
    pub when_missing: Option<f64>,
    /// AWS region (default: the SDK's chain: AWS_REGION, profile, instance metadata).
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint URL (default: AWS_ENDPOINT_URL_CLOUDWATCH, AWS_ENDPOINT_URL, then
    /// `https://monitoring.<region>.amazonaws.com`).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Longest one call may take, in ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_statistic() -> String {
    "Average".into()
}
fn default_period() -> u32 {
    60
}
fn default_max_age() -> u64 {
    300
}
fn default_timeout_ms() -> u64 {
    5000
}

impl Config {
    /// Everything that can be checked without AWS, each error naming the field.
    fn check(&self) -> Result<(), String> {
        if self.namespace.trim().is_empty() {
            return Err("namespace: must not be empty".into());
        }
        if self.metric_name.trim().is_empty() {
            return Err("metric_name: must not be empty".into());
        }
        let stat = self.statistic.as_str();
        let percentile = stat
            .strip_prefix('p')
            .and_then(|p| p.parse::<f64>().ok())
            .is_some_and(|p| (0.0..=100.0).contains(&p));
        if !percentile && !["Average", "Sum", "Minimum", "Maximum", "SampleCount"].contains(&stat) {
            return Err(format!(
                "statistic: {stat:?} is not Average, Sum, Minimum, Maximum, SampleCount or pNN"
            ));
        }
        let p = self.period_secs;
        if !(matches!(p, 1 | 5 | 10 | 30) || (p >= 60 && p % 60 == 0)) {
            return Err(format!(
                "period_secs: {p} is not 1, 5, 10, 30 or a multiple of 60"
            ));
        }
        if self.max_age_secs < u64::from(p) {
            return Err(format!(
                "max_age_secs: {} is shorter than period_secs ({p}): no datapoint could qualify",
                self.max_age_secs
            ));
        }
        if !(100..=120_000).contains(&self.timeout_ms) {
            return Err(format!(
                "timeout_ms: {} is outside 100..=120000",
                self.timeout_ms
            ));
        }
        Ok(())
    }
}

/// The GetMetricData request for the window that ends at `now` (Unix seconds).
fn request_body(c: &Config, now: u64) -> Value {
    let dimensions: Vec<Value> = c
        .dimensions
        .iter()
        .map(|(k, v)| json!({ "Name": k, "Value": v }))
        .collect();
    // One period more than the age allowed, so a datapoint exactly max_age old is in it.
    let start = now.saturating_sub(c.max_age_secs + u64::from(c.period_secs));
    json!({
        "MetricDataQueries": [{
            "Id": "m",
            "MetricStat": {
                "Metric": {
                    "Namespace": c.namespace,
                    "MetricName": c.metric_name,
                    "Dimensions": dimensions,
                },
                "Period": c.period_secs,
                "Stat": c.statistic,
            },
            "ReturnData": true,
        }],
        "StartTime": start,
        "EndTime": now,
        "ScanBy": "TimestampDescending",
    })
}

/// The newest datapoint of the answer and its timestamp, if one is at most `max_age`
/// seconds older than `now`.
fn newest(answer: &Value, now: u64, max_age: u64) -> Result<Option<(f64, u64)>, PluginError> {
    let result = answer["MetricDataResults"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["Id"] == "m"))
        .ok_or_else(|| PluginError::transient(format!("no MetricDataResults in {answer}")))?;
    match result["StatusCode"].as_str().unwrap_or("Complete") {
        "Forbidden" => {
            return Err(PluginError::config(format!(
                "GetMetricData: Forbidden: {}",
                answer["Messages"]
            )))
        }
        "InternalError" => {
            return Err(PluginError::transient(format!(
                "GetMetricData: InternalError: {}",
                answer["Messages"]
            )))
        }
        _ => {}
    }
    let stamps = result["Timestamps"].as_array().cloned().unwrap_or_default();
    let values = result["Values"].as_array().cloned().unwrap_or_default();
    let best = stamps
        .iter()
        .zip(values.iter())
        .filter_map(|(t, v)| Some((v.as_f64()?, t.as_f64()? as u64)))
        .filter(|(_, t)| now.saturating_sub(*t) <= max_age)
        .max_by_key(|(_, t)| *t);
    Ok(best)
}

/// Sorts an AWS JSON error answer by its `__type` (or `x-amzn-ErrorType`) code.
fn classify(status: u16, body: &[u8]) -> PluginError {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let code = parsed["__type"]
        .as_str()
        .map(|t| t.rsplit('#').next().unwrap_or(t))
        .unwrap_or("")
        .to_owned();
    let message = parsed["message"]
        .as_str()
        .or(parsed["Message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    let text = format!("GetMetricData: HTTP {status} {code}: {message}");
    let transient = status >= 500
        || status == 429
        || code.contains("Throttl")
        || code.contains("LimitExceeded")
        || code.starts_with("Internal")
        || code == "ServiceUnavailable"
        || code == "ExpiredTokenException"
        || code == "RequestExpired";
    if transient {
        PluginError::transient(text)
    } else {
        // AccessDenied, InvalidParameter*, MissingParameter, UnrecognizedClient,
        // InvalidClientTokenId, SignatureDoesNotMatch: the operator must act.
        PluginError::config(text)
    }
}

/// The endpoint, in the order the module doc gives.
fn endpoint(
    c: &Config,
    env: impl Fn(&str) -> Option<String>,
    sdk: Option<&str>,
    region: &str,
) -> String {
    let url = c
        .endpoint_url
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL_CLOUDWATCH").filter(|s| !s.is_empty()))
        .or_else(|| sdk.map(str::to_owned))
        .unwrap_or_else(|| {
            let suffix = if region.starts_with("cn-") { ".cn" } else { "" };
            format!("https://monitoring.{region}.amazonaws.com{suffix}")
        });
    let url = url.trim_end_matches('/');
    if url.matches('/').count() > 2 {
        url.to_owned()
    } else {
        format!("{url}/")
    }
}

/// A metric source reading one CloudWatch metric.
pub struct CloudWatch {
    config: Config,
    region: String,
    url: String,
    credentials: SharedCredentialsProvider,
}

impl CloudWatch {
    async fn call(&self, body: Vec<u8>) -> Result<Value, PluginError> {
        let credentials = self.credentials.provide_credentials().await.map_err(|e| {
            let text = format!("AWS credentials: {}", describe(&e));
            match e {
                CredentialsError::CredentialsNotLoaded(_)
                | CredentialsError::InvalidConfiguration(_) => PluginError::config(text),
                _ => PluginError::transient(text),
            }
        })?;
        let identity = credentials.into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("monitoring")
            .time(SystemTime::now())
            .settings(aws_sigv4::http_request::SigningSettings::default())
            .build()
            .map_err(|e| PluginError::permanent(format!("signing: {e}")))?
            .into();
        let signed_headers = [("content-type", CONTENT_TYPE), ("x-amz-target", TARGET)];
        let signable = aws_sigv4::http_request::SignableRequest::new(
            "POST",
            self.url.as_str(),
            signed_headers.iter().copied(),
            aws_sigv4::http_request::SignableBody::Bytes(&body),
        )
        .map_err(|e| PluginError::config(format!("endpoint {:?}: {e}", self.url)))?;
        let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)
            .map_err(|e| PluginError::permanent(format!("signing: {e}")))?
            .into_parts();
        let mut headers: Vec<(String, String)> = signed_headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        headers.push((
            "user-agent".into(),
            concat!(
                "app/warden-cloudwatch warden-cloudwatch/",
                env!("CARGO_PKG_VERSION")
            )
            .into(),
        ));
        headers.extend(
            instructions
                .headers()
                .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let (status, answer) = web::exchange(
            ::http::Method::POST,
            &self.url,
            &headers,
            body.into(),
            timeout,
        )
        .await?;
        if !status.is_success() {
            return Err(classify(status.as_u16(), &answer));
        }
        serde_json::from_slice(&answer).map_err(|e| {
            PluginError::transient(format!("GetMetricData: the answer is not JSON: {e}"))
        })
    }
}

fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl MetricSource for CloudWatch {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        config.check().map_err(PluginError::config)?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .app_name(aws_config::AppName::new("warden-cloudwatch").expect("valid"));
        if let Some(r) = &config.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        let sdk = loader.load().await;
        let region = sdk
            .region()
            .map(|r| r.to_string())
            .ok_or_else(|| PluginError::config("no AWS region: set `region` or AWS_REGION"))?;
        let credentials = sdk
            .credentials_provider()
            .ok_or_else(|| PluginError::config("no AWS credentials provider"))?;
        let url = endpoint(
            &config,
            |k| std::env::var(k).ok(),
            sdk.endpoint_url(),
            &region,
        );
        Ok(CloudWatch {
            config,
            region,
            url,
            credentials,
        })
    }

    async fn measure(&self) -> Result<Measurement, PluginError> {
        let now = unix_now();
        let body = serde_json::to_vec(&request_body(&self.config, now))
            .map_err(|e| PluginError::permanent(e.to_string()))?;
        let answer = self.call(body).await?;
        let c = &self.config;
        let (value, at) = match newest(&answer, now, c.max_age_secs)? {
            Some((value, at)) => (value, Some(at)),
            None => match c.when_missing {
                Some(value) => (value, None),
                None => {
                    return Err(PluginError::transient(format!(
                        "{}/{} {:?}: no datapoint in the last {} s",
                        c.namespace, c.metric_name, c.dimensions, c.max_age_secs
                    )))
                }
            },
        };
        let mut m = Measurement::new(value)
            .label("namespace", c.namespace.clone())
            .label("metric", c.metric_name.clone())
            .label("statistic", c.statistic.clone())
            .detail(json!({ "timestamp": at, "age_secs": at.map(|t| now.saturating_sub(t)) }));
        for (k, v) in &c.dimensions {
            m = m.label(k.clone(), v.clone());
        }
        Ok(m)
    }
}

export_plugin! { name: "cloudwatch", metric_source: CloudWatch }

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> Config {
        let mut v = json!({"namespace": "AWS/SQS", "metric_name": "Depth"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_request_asks_for_one_metric_over_the_allowed_age() {
        let c = config(
            json!({"dimensions": {"QueueName": "jobs"}, "statistic": "p99",
                              "period_secs": 300, "max_age_secs": 900}),
        );
        c.check().unwrap();
        let body = request_body(&c, 10_000);
        assert_eq!(body["StartTime"], 10_000 - 1200);
        assert_eq!(body["EndTime"], 10_000);
        let stat = &body["MetricDataQueries"][0]["MetricStat"];
        assert_eq!(stat["Stat"], "p99");
        assert_eq!(stat["Period"], 300);
        assert_eq!(
            stat["Metric"]["Dimensions"],
            json!([{"Name": "QueueName", "Value": "jobs"}])
        );
    }

    #[test]
    fn bad_settings_name_the_field() {
        for (extra, field) in [
            (json!({"statistic": "Mean"}), "statistic"),
            (json!({"statistic": "p101"}), "statistic"),
            (json!({"period_secs": 45}), "period_secs"),
            (
                json!({"period_secs": 120, "max_age_secs": 60}),
                "max_age_secs",
            ),
            (json!({"timeout_ms": 5}), "timeout_ms"),
            (json!({"namespace": " "}), "namespace"),
        ] {
            let e = config(extra.clone()).check().expect_err(&extra.to_string());
            assert!(e.starts_with(field), "{extra}: {e}");
        }
    }

    #[test]
    fn the_newest_datapoint_within_the_age_is_taken() {
        let answer = json!({"MetricDataResults": [{"Id": "m", "StatusCode": "Complete",
            "Timestamps": [900, 960, 600], "Values": [1.0, 2.0, 3.0]}]});
        assert_eq!(newest(&answer, 1000, 300).unwrap(), Some((2.0, 960)));
        assert_eq!(newest(&answer, 2000, 300).unwrap(), None);
        let forbidden = json!({"MetricDataResults": [{"Id": "m", "StatusCode": "Forbidden"}]});
        assert_eq!(
            newest(&forbidden, 1000, 300).unwrap_err().kind,
            ErrorKind::Config
        );
    }

    #[test]
    fn aws_errors_are_sorted_by_code() {
        let throttled = br#"{"__type":"com.amazon.coral.availability#ThrottlingException","message":"Rate exceeded"}"#;
        assert_eq!(classify(400, throttled).kind, ErrorKind::Transient);
        let denied = br#"{"__type":"AccessDeniedException","message":"no"}"#;
        let e = classify(400, denied);
        assert_eq!(e.kind, ErrorKind::Config);
        assert!(
            e.message.contains("AccessDeniedException: no"),
            "{}",
            e.message
        );
        assert_eq!(classify(503, b"down").kind, ErrorKind::Transient);
    }

    #[test]
    fn the_endpoint_follows_config_then_environment_then_region() {
        let c = config(json!({}));
        let none = |_: &str| None;
        assert_eq!(
            endpoint(&c, none, None, "eu-west-1"),
            "https://monitoring.eu-west-1.amazonaws.com/"
        );
        assert_eq!(
            endpoint(&c, none, None, "cn-north-1"),
            "https://monitoring.cn-north-1.amazonaws.com.cn/"
        );
        assert_eq!(
            endpoint(&c, none, Some("http://127.0.0.1:5000"), "x"),
            "http://127.0.0.1:5000/"
        );
        let env = |k: &str| (k == "AWS_ENDPOINT_URL_CLOUDWATCH").then(|| "http://cw:1".to_owned());
        assert_eq!(endpoint(&c, env, Some("http://other"), "x"), "http://cw:1/");
        let c = config(json!({"endpoint_url": "http://mine:2/"}));
        assert_eq!(endpoint(&c, env, None, "x"), "http://mine:2/");
    }
}
