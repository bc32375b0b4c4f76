//! Opening a Redis client as warden's own Redis settings do (AUTH in the URL, `rediss://`
//! for TLS, a PEM CA for a private one): shared by `redis-metric` and
//! `redis-services`.

use std::path::Path;

use warden_plugin_api::PluginError;

/// `host:port` of a Redis URL, without any password.
pub fn addr_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

/// A client for `url`, trusting `ca_file` for `rediss://` when given. Errors are `config`
/// and never show the password.
pub fn open(url: &str, ca_file: Option<&Path>) -> Result<redis::Client, PluginError> {
    // One TLS provider for this library's rustls (a no-op when one is installed).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let addr = addr_of(url);
    match ca_file {
        None => redis::Client::open(url),
        Some(ca) => {
            let pem = std::fs::read(ca)
                .map_err(|e| PluginError::config(format!("ca_file {}: {e}", ca.display())))?;
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
    }
    .map_err(|e| PluginError::config(format!("url ({addr}): {e}")))
}
