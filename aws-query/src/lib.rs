//! The AWS calls warden makes outside ECS, without the SDK crates of those services.
//!
//! warden asks EC2 two questions (the Availability Zones' states for the manager's AZ
//! check; how many instances of an Elastic Beanstalk environment run, for the
//! beanstalk-instances plugin) and keeps the host's membership in classic ELBs and
//! ELBv2 target groups (eight calls). `aws-sdk-ec2` alone took 184.5 s of a 4 min 43 s
//! cold build for its two; each SDK client also costs the daemon's binary (and so its
//! resident memory) a monomorphised stack per operation. All three services speak the
//! Query protocol, a form POST signed with SigV4 answered by XML, so [`Query`] makes
//! those calls with the SDK's own signer (`aws-sigv4`), credentials (`aws-config`'s
//! provider chain) and XML reader (`aws-smithy-xml`), crates that warden builds anyway
//! for ECS; [`ec2`], [`elb`] and [`elbv2`] are the calls.
//!
//! Kept from the SDK: the region and credentials from the same `SdkConfig`, the
//! endpoint override (`AWS_ENDPOINT_URL_<SERVICE>`, then `AWS_ENDPOINT_URL`, as the SDK
//! reads them), warden's user agent, errors sorted transient or permanent the way the
//! SDK's retry classifier does (throttling, `Internal*`, `Unavailable`, 5xx, no answer:
//! transient). Not kept: the SDK's own retries (every caller calls again on its own
//! schedule), FIPS and dual-stack endpoints, and an HTTPS proxy from the environment.

use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

pub mod ec2;
pub mod elb;
pub mod elbv2;
mod xml;

pub use ec2::Ec2;

/// One Query service: how requests to it are signed, addressed and versioned.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    /// SigV4's service name.
    pub signing_name: &'static str,
    /// The first label of the regional endpoint's host.
    pub endpoint_prefix: &'static str,
    /// The API version every call names.
    pub version: &'static str,
    /// The endpoint override the SDK reads for this service.
    pub endpoint_env: &'static str,
    /// For messages.
    pub what: &'static str,
}

/// Credentials are fetched again this long before they expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);

/// The largest answer read (a page of DescribeInstances is a few hundred kB at most):
/// a proxy or endpoint that sends more gets an error, not warden's memory.
const MAX_ANSWER: usize = 8 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The service answered with an error.
    #[error("{code}: {message} (HTTP {status})")]
    Service {
        status: u16,
        code: String,
        message: String,
    },
    /// No answer within the call's timeout.
    #[error("no answer within {0:?} (timed out)")]
    Timeout(Duration),
    /// The request could not be sent or its answer read (connection refused, reset, TLS).
    #[error("request not sent or answer not read: {0}")]
    Dispatch(String),
    /// No credentials (the provider chain found none, or failed).
    #[error("no AWS credentials: {0}")]
    Credentials(String),
    /// The answer is not the XML the service sends.
    #[error("unexpected answer: {0}")]
    Answer(String),
    /// No region, or a bad endpoint.
    #[error("{0}")]
    Config(String),
}

impl QueryError {
    /// Whether calling again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            QueryError::Service { status, code, .. } => {
                *status >= 500
                    || code.contains("Throttl")
                    || code == "RequestLimitExceeded"
                    || code.starts_with("Internal")
                    || code == "Unavailable"
            }
            QueryError::Timeout(_) | QueryError::Dispatch(_) | QueryError::Credentials(_) => true,
            QueryError::Answer(_) | QueryError::Config(_) => false,
        }
    }
}

/// A Query client for one service in one region.
pub struct Query {
    service: Service,
    region: String,
    endpoint: http::Uri,
    credentials: SharedCredentialsProvider,
    cached: tokio::sync::Mutex<Option<Credentials>>,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    /// `warden-aws-query/<version>`, then `app/<name>` of the `SdkConfig` as the SDK sends it:
    /// CloudTrail (and the tests' IAM check) tell warden's calls from anyone else's.
    user_agent: String,
}

impl Query {
    /// A client of `service` with `sdk`'s region and credentials; each call times out
    /// after `timeout`.
    pub fn new(sdk: &SdkConfig, service: Service, timeout: Duration) -> Result<Query, QueryError> {
        let region = sdk
            .region()
            .ok_or_else(|| {
                QueryError::Config(format!("{}: no AWS region (set AWS_REGION)", service.what))
            })?
            .to_string();
        let credentials = sdk
            .credentials_provider()
            .ok_or_else(|| QueryError::Credentials("no credentials provider".into()))?;
        let own = std::env::var(service.endpoint_env).ok();
        let url = endpoint(service, &region, own.as_deref().or(sdk.endpoint_url()));
        let endpoint = url
            .parse::<http::Uri>()
            .map_err(|e| QueryError::Config(format!("{} endpoint {url:?}: {e}", service.what)))?;
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(rustls::crypto::aws_lc_rs::default_provider())
            .map_err(|e| {
                QueryError::Config(format!(
                    "{}: cannot read the system's CA certificates: {e}",
                    service.what
                ))
            })?
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(hyper_util::rt::TokioExecutor::new()).build(tls);
        let mut user_agent = concat!("warden-aws-query/", env!("CARGO_PKG_VERSION")).to_owned();
        if let Some(app) = sdk.app_name() {
            user_agent.push_str(&format!(" app/{app}"));
        }
        Ok(Query {
            service,
            region,
            endpoint,
            credentials,
            cached: tokio::sync::Mutex::new(None),
            http,
            timeout,
            user_agent,
        })
    }

    /// One signed Query call; the answer's XML text on success.
    pub(crate) async fn call(&self, params: &[(&str, &str)]) -> Result<String, QueryError> {
        let body = form(self.service.version, params);
        let request = self.signed(body).await?;
        let answer = tokio::time::timeout(self.timeout, async {
            let response = self.http.request(request).await.map_err(dispatch)?;
            let status = response.status().as_u16();
            let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| {
                    QueryError::Dispatch(format!(
                        "answer not read (at most {} MiB): {e}",
                        MAX_ANSWER >> 20
                    ))
                })?;
            Ok::<_, QueryError>((status, bytes.to_bytes()))
        })
        .await
        .map_err(|_| QueryError::Timeout(self.timeout))??;
        let (status, bytes) = answer;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if status == 200 {
            Ok(text)
        } else {
            Err(xml::error(status, &text))
        }
    }

    /// The POST of `body`, signed with the current credentials.
    async fn signed(&self, body: String) -> Result<http::Request<Full<Bytes>>, QueryError> {
        let credentials = self.credentials().await?;
        let mut request = http::Request::post(self.endpoint.clone())
            .header(
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .header("user-agent", &self.user_agent)
            .header("x-amz-user-agent", &self.user_agent)
            .body(Full::new(Bytes::from(body.clone())))
            .map_err(|e| QueryError::Config(format!("{} request: {e}", self.service.what)))?;
        let identity = credentials.into();
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(self.service.signing_name)
            .time(SystemTime::now())
            .settings(aws_sigv4::http_request::SigningSettings::default())
            .build()
            .map_err(|e| QueryError::Config(format!("{} signing: {e}", self.service.what)))?
            .into();
        let uri = self.endpoint.to_string();
        let headers = request
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("")));
        let signable = aws_sigv4::http_request::SignableRequest::new(
            "POST",
            &uri,
            headers,
            aws_sigv4::http_request::SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| QueryError::Config(format!("{} signing: {e}", self.service.what)))?;
        let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)
            .map_err(|e| QueryError::Config(format!("{} signing: {e}", self.service.what)))?
            .into_parts();
        instructions.apply_to_request_http1x(&mut request);
        Ok(request)
    }

    /// The cached credentials, fetched again when near their expiry.
    async fn credentials(&self) -> Result<Credentials, QueryError> {
        let mut cached = self.cached.lock().await;
        let fresh = |c: &Credentials| {
            c.expiry()
                .is_none_or(|at| at > SystemTime::now() + REFRESH_BEFORE)
        };
        if let Some(c) = cached.as_ref().filter(|c| fresh(c)) {
            return Ok(c.clone());
        }
        let c = self
            .credentials
            .provide_credentials()
            .await
            .map_err(|e| QueryError::Credentials(error_chain(&e)))?;
        *cached = Some(c.clone());
        Ok(c)
    }
}

/// The endpoint: the override if any, else the region's public one.
pub fn endpoint(service: Service, region: &str, over: Option<&str>) -> String {
    let prefix = service.endpoint_prefix;
    match over {
        Some(url) => url.trim_end_matches('/').to_owned() + "/",
        None if region.starts_with("cn-") => format!("https://{prefix}.{region}.amazonaws.com.cn/"),
        None => format!("https://{prefix}.{region}.amazonaws.com/"),
    }
}

/// The form body of a Query call (`Version` added), percent-encoded as SigV4 expects.
pub fn form(version: &str, params: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (k, v) in params.iter().chain(std::iter::once(&("Version", version))) {
        if !out.is_empty() {
            out.push('&');
        }
        encode(k, &mut out);
        out.push('=');
        encode(v, &mut out);
    }
    out
}

fn encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
}

fn dispatch(e: impl std::error::Error) -> QueryError {
    QueryError::Dispatch(error_chain(&e))
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-answer HTTP server: returns its address and, once asked, the request head.
    async fn answer_once(answer: Vec<u8>) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                head.extend_from_slice(&buf[..n]);
            }
            let _ = conn.write_all(&answer).await;
            String::from_utf8_lossy(&head).into_owned()
        });
        (url, task)
    }

    fn sdk(url: &str) -> SdkConfig {
        SdkConfig::builder()
            .region(aws_config::Region::new("eu-west-1"))
            .endpoint_url(url)
            .app_name(aws_config::AppName::new("warden-test").unwrap())
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "AKIDTEST", "secret", None, None, "test",
            )))
            .build()
    }

    #[tokio::test]
    async fn a_call_is_signed_names_warden_and_an_oversized_answer_is_refused() {
        let body = vec![b' '; MAX_ANSWER + 1];
        let mut answer =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        answer.extend_from_slice(&body);
        let (url, server) = answer_once(answer).await;
        let ec2 = Ec2::new(&sdk(&url), Duration::from_secs(10)).unwrap();
        let e = ec2.describe_availability_zones().await.unwrap_err();
        assert!(
            matches!(&e, QueryError::Dispatch(m) if m.contains("at most 8 MiB")),
            "{e}"
        );
        let head = server.await.unwrap().to_ascii_lowercase();
        assert!(head.starts_with("post / http/1.1"), "{head}");
        assert!(
            head.contains("authorization: aws4-hmac-sha256 credential=akidtest/"),
            "{head}"
        );
        assert!(head.contains("/eu-west-1/ec2/aws4_request"), "{head}");
        assert!(head.contains("app/warden-test"), "{head}");
    }

    #[tokio::test]
    async fn an_elb_error_answer_is_its_code_and_not_transient() {
        let xml = "<ErrorResponse><Error><Type>Sender</Type><Code>LoadBalancerNotFound</Code><Message>There is no ACTIVE Load Balancer named 'x'</Message></Error></ErrorResponse>";
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\n\r\n{xml}",
            xml.len()
        );
        let (url, server) = answer_once(answer.into_bytes()).await;
        let elb = elb::Elb::new(&sdk(&url), Duration::from_secs(10)).unwrap();
        let e = elb.instances("x").await.unwrap_err();
        match &e {
            QueryError::Service { status, code, .. } => {
                assert_eq!((*status, code.as_str()), (400, "LoadBalancerNotFound"))
            }
            other => panic!("{other:?}"),
        }
        assert!(!e.is_transient());
        let head = server.await.unwrap().to_ascii_lowercase();
        assert!(
            head.contains("/elasticloadbalancing/aws4_request"),
            "{head}"
        );
    }

    #[test]
    fn the_form_is_percent_encoded_and_names_the_version() {
        assert_eq!(
            form(
                ec2::SERVICE.version,
                &[
                    ("Action", "DescribeInstances"),
                    ("Filter.1.Name", "tag:a b/c")
                ]
            ),
            "Action=DescribeInstances&Filter.1.Name=tag%3Aa%20b%2Fc&Version=2016-11-15"
        );
    }

    #[test]
    fn the_endpoint_is_the_override_or_the_regions_own() {
        assert_eq!(
            endpoint(ec2::SERVICE, "eu-west-1", None),
            "https://ec2.eu-west-1.amazonaws.com/"
        );
        assert_eq!(
            endpoint(ec2::SERVICE, "cn-north-1", None),
            "https://ec2.cn-north-1.amazonaws.com.cn/"
        );
        assert_eq!(
            endpoint(elb::SERVICE, "eu-west-1", Some("http://127.0.0.1:5000")),
            "http://127.0.0.1:5000/"
        );
        assert_eq!(
            endpoint(elbv2::SERVICE, "eu-west-1", None),
            "https://elasticloadbalancing.eu-west-1.amazonaws.com/"
        );
        assert_eq!(
            endpoint(elbv2::SERVICE, "eu-west-1", Some("http://127.0.0.1:5000")),
            "http://127.0.0.1:5000/"
        );
    }

    #[test]
    fn throttling_and_server_errors_are_transient_and_a_bad_request_is_not() {
        let e = |status, code: &str| QueryError::Service {
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(e(400, "RequestLimitExceeded").is_transient());
        assert!(e(503, "Unavailable").is_transient());
        assert!(e(500, "InternalError").is_transient());
        assert!(!e(400, "InvalidParameterValue").is_transient());
        assert!(!e(403, "UnauthorizedOperation").is_transient());
        assert!(QueryError::Timeout(Duration::from_secs(1)).is_transient());
    }
}
