//! One HTTP(S) request with hyper's connection API, a deadline, a size limit and errors
//! sorted where they happen (shared by the `http-json`, `prometheus` and `cloudwatch`
//! plugins).

// Each plugin that includes this file uses part of it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use warden_plugin_api::tokio::net::TcpStream;
use warden_plugin_api::PluginError;

/// Answers larger than this are refused.
pub const MAX_BODY: usize = 1 << 20;

/// `GET url` with `headers`; the body of a 2xx answer.
pub async fn get(
    url: &str,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<Bytes, PluginError> {
    request(http::Method::GET, url, headers, Bytes::new(), timeout).await
}

/// `method url` with `headers` and `body`; the body of a 2xx answer. A 4xx other than
/// 429 is `permanent`; a 5xx, 429, timeout or connection failure is `transient`.
pub async fn request(
    method: http::Method,
    url: &str,
    headers: &[(String, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<Bytes, PluginError> {
    let what = format!("{method} {}", redact(url));
    let (status, body) = exchange(method, url, headers, body, timeout).await?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        let message = format!("{what}: HTTP {status}: {text}");
        return Err(if status.is_client_error() && status.as_u16() != 429 {
            PluginError::permanent(message)
        } else {
            PluginError::transient(message)
        });
    }
    Ok(body)
}

/// `method url`: the status and body of whatever answer came, for callers that read
/// their service's own error bodies. Only a timeout, a connection or TLS failure and a
/// bad URL are errors here.
pub async fn exchange(
    method: http::Method,
    url: &str,
    headers: &[(String, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), PluginError> {
    let what = format!("{method} {}", redact(url));
    warden_plugin_api::tokio::time::timeout(timeout, inner(&what, method, url, headers, body))
        .await
        .map_err(|_| PluginError::transient(format!("{what}: no answer within {timeout:?}")))?
}

/// The URL without any user:password part, for messages.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_owned(),
    }
}

async fn inner(
    what: &str,
    method: http::Method,
    url: &str,
    headers: &[(String, String)],
    body: Bytes,
) -> Result<(http::StatusCode, Bytes), PluginError> {
    let shown = redact(url);
    let uri: http::Uri = url
        .parse()
        .map_err(|e| PluginError::config(format!("url {shown:?}: {e}")))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return Err(PluginError::config(format!(
                "url {shown:?}: expected http:// or https://"
            )))
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| PluginError::config(format!("url {shown:?}: no host")))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let fail = |step: &str, e: &dyn std::fmt::Display| {
        PluginError::transient(format!("{what}: {step}: {e}"))
    };
    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| fail("cannot connect", &e))?;
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority(&host, port, https));
    for (k, v) in headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let request = request
        .body(Full::new(body))
        .map_err(|e| PluginError::config(format!("headers: {e}")))?;
    let response = if https {
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| PluginError::config(format!("url {shown:?}: {e}")))?;
        let tls = tls_connector()?
            .connect(name, tcp)
            .await
            .map_err(|e| fail("TLS", &e))?;
        send(TokioIo::new(tls), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
    .map_err(|e| fail("request failed", &e))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| fail("reading the answer", &e))?
        .to_bytes();
    Ok((status, body))
}

fn authority(host: &str, port: u16, https: bool) -> String {
    if (https && port == 443) || (!https && port == 80) {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    }
}

async fn send<I>(
    io: I,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    warden_plugin_api::tokio::spawn(conn);
    sender.send_request(request).await
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, PluginError> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(PluginError::permanent(
            "no trusted CA certificates found on this host",
        ));
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
