//! One AWS configuration for every client (ECS, EC2, ELB, S3 in plugins aside), resolved
//! once at start, and AWS errors as an operator reads them: code and message, never a
//! Debug dump.

use std::error::Error;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};

/// The region of an Availability Zone name (`eu-west-1a` → `eu-west-1`), so that a host
/// whose AZ is configured needs no instance metadata for its region.
pub(crate) fn region_of_az(az: &str) -> Option<&str> {
    let trimmed = az.trim_end_matches(|c: char| c.is_ascii_lowercase());
    (trimmed.len() < az.len()
        && trimmed.ends_with(|c: char| c.is_ascii_digit())
        && trimmed.contains('-'))
    .then_some(trimmed)
}

/// Loads the SDK's shared config: default credential chain, `AWS_REGION` (else the
/// region of the configured AZ, else the chain's own lookup), `AWS_ENDPOINT_URL`, bounded
/// retries and timeouts.
pub(crate) async fn load(az: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        // `app/warden` in every request's user agent: CloudTrail (and the tests' IAM
        // check) can tell warden's calls from anyone else's.
        .app_name(aws_config::AppName::new("warden").expect("a valid app name"))
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        );
    let env_region = std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .ok()
        .filter(|r| !r.is_empty());
    if env_region.is_none() {
        if let Some(region) = az.and_then(region_of_az) {
            loader = loader.region(aws_config::Region::new(region.to_owned()));
        }
    }
    loader.load().await
}

/// `ThrottlingException: Rate exceeded`, `timed out`, `could not connect: …`.
pub(crate) fn describe<E, R>(e: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + Error + 'static,
    R: std::fmt::Debug,
{
    let text = match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            match (err.code(), err.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_owned(),
                _ => format!("{}", aws_sdk_ecs::error::DisplayErrorContext(err)),
            }
        }
        SdkError::TimeoutError(_) => "no answer in time (timed out)".to_owned(),
        SdkError::DispatchFailure(_) => format!(
            "could not send: {}",
            aws_sdk_ecs::error::DisplayErrorContext(e)
        ),
        // The cause only: this variant's context carries the raw response, whose Debug
        // dump (headers and all) is no message for an operator.
        SdkError::ResponseError(_) => format!(
            "unreadable answer: {}",
            e.source().map_or_else(|| "no detail".to_owned(), causes)
        ),
        other => format!("{}", aws_sdk_ecs::error::DisplayErrorContext(other)),
    };
    shorten(&text, 300)
}

/// An error and its sources, each said once: `a: b: c`.
fn causes(e: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        next = s.source();
    }
    parts.join(": ")
}

/// Cuts `text` to at most `max` characters, marking the cut.
pub(crate) fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let cut: String = text.chars().take(max).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_come_from_az_names() {
        assert_eq!(region_of_az("eu-west-1a"), Some("eu-west-1"));
        assert_eq!(region_of_az("us-gov-west-1b"), Some("us-gov-west-1"));
        assert_eq!(region_of_az("us-west-2-lax-1a"), Some("us-west-2-lax-1"));
        assert_eq!(region_of_az("unknown"), None);
        assert_eq!(region_of_az("eu-west-1"), None);
    }

    #[test]
    fn long_texts_are_cut() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("abcdef", 3), "abc…");
    }
}
