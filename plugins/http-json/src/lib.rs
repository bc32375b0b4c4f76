//! `http-json`: a number at a JSON pointer (RFC 6901) in an HTTP(S) response: a queue
//! depth from an application's stats endpoint, a backlog from an admin API.
//!
//! The value may be a JSON number or a string holding one. A server not answering, a 5xx
//! or a 429 is `transient`; another 4xx is `permanent`; a pointer that finds nothing or
//! something that is not a number is `config`, with what was found.

use std::collections::BTreeMap;
use std::time::Duration;

use warden_plugin_api::prelude::*;

use warden_plugin_common::http;

/// `[metrics.<name>] plugin = "http-json"`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// `http://` or `https://` URL (HTTPS checked against the system's CAs).
    pub url: String,
    /// JSON pointer to the number, such as `/queues/jobs/depth` (`""` for the whole body).
    pub pointer: String,
    /// Request headers (an `Authorization` header, for example).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Longest the request may take, in ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Unit shown in status and metrics.
    #[serde(default)]
    pub unit: Option<String>,
}

fn default_timeout_ms() -> u64 {
    3000
}

/// A metric source reading one JSON value.
pub struct HttpJson {
    config: Config,
    headers: Vec<(String, String)>,
}

/// The number at `pointer` in `body`, or why not.
pub fn number_at(body: &[u8], pointer: &str) -> Result<f64, PluginError> {
    let doc: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        PluginError::permanent(format!(
            "the answer is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&body[..body.len().min(120)])
        ))
    })?;
    let found = doc.pointer(pointer).ok_or_else(|| {
        PluginError::config(format!("pointer {pointer:?} finds nothing in the answer"))
    })?;
    let value = match found {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match value {
        Some(v) if v.is_finite() => Ok(v),
        _ => Err(PluginError::config(format!(
            "pointer {pointer:?} finds {found}, not a number"
        ))),
    }
}

use warden_plugin_api::serde_json;

impl MetricSource for HttpJson {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        if !config.pointer.is_empty() && !config.pointer.starts_with('/') {
            return Err(PluginError::config(format!(
                "pointer {:?}: a JSON pointer starts with '/' (or is empty for the whole body)",
                config.pointer
            )));
        }
        let _: ::http::Uri = config.url.parse().map_err(|e| {
            PluginError::config(format!("url {:?}: {e}", http::redact(&config.url)))
        })?;
        let headers = config
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(HttpJson { config, headers })
    }

    async fn measure(&self) -> Result<Measurement, PluginError> {
        let body = http::get(
            &self.config.url,
            &self.headers,
            Duration::from_millis(self.config.timeout_ms),
        )
        .await?;
        let value = number_at(&body, &self.config.pointer)?;
        let mut m = Measurement::new(value).label("url", http::redact(&self.config.url));
        if let Some(u) = &self.config.unit {
            m = m.unit(u.clone());
        }
        Ok(m)
    }
}

export_plugin! { name: "http-json", metric_source: HttpJson }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_at_pointers() {
        let body =
            br#"{"queues": {"jobs": {"depth": 12, "age": "3.5", "name": "jobs"}}, "list": [1, 2]}"#;
        assert_eq!(number_at(body, "/queues/jobs/depth").unwrap(), 12.0);
        assert_eq!(number_at(body, "/queues/jobs/age").unwrap(), 3.5);
        assert_eq!(number_at(body, "/list/1").unwrap(), 2.0);
        assert_eq!(number_at(b"42", "").unwrap(), 42.0);
        let e = number_at(body, "/queues/jobs/name").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Config);
        assert!(e.message.contains("\"jobs\""), "{}", e.message);
        assert_eq!(
            number_at(body, "/nope").unwrap_err().kind,
            ErrorKind::Config
        );
        assert_eq!(
            number_at(b"<html>", "/x").unwrap_err().kind,
            ErrorKind::Permanent
        );
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            http::redact("https://u:p@h.example:8443/x?y"),
            "https://h.example:8443/x?y"
        );
        assert_eq!(http::redact("http://h/x"), "http://h/x");
    }
}
