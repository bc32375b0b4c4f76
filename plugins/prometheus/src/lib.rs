//! `prometheus`: one number from an instant PromQL query through Prometheus's HTTP API
//! (`/api/v1/query`). The query must give a scalar or a vector of exactly one sample
//! (aggregate with `sum(...)` when series vary); an empty vector is an error unless
//! `empty_as` gives the value it stands for (as KEDA's `ignoreNullValues`).
//!
//! Errors: Prometheus not answering, 5xx, 429 → `transient`; a query Prometheus refuses
//! (`bad_data`) or that gives several series → `config`, with Prometheus's own words.

use std::collections::BTreeMap;
use std::time::Duration;

use warden_plugin_api::prelude::*;
use warden_plugin_api::serde_json::{self, Value};

use warden_plugin_common::http;

/// `[metrics.<name>] plugin = "prometheus"`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
#[schemars(crate = "warden_plugin_api::schemars")]
pub struct Config {
    /// Prometheus's base URL, such as `http://prometheus:9090`.
    pub url: String,
    /// The PromQL expression, evaluated at the time of each call.
    pub query: String,
    /// The value an empty result stands for (default: an empty result is an error).
    #[serde(default)]
    pub empty_as: Option<f64>,
    /// Request headers (authentication in front of Prometheus).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Longest the query may take, in ms (also sent as Prometheus's own `timeout`).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Unit shown in status and metrics.
    #[serde(default)]
    pub unit: Option<String>,
}

fn default_timeout_ms() -> u64 {
    3000
}

/// A metric source asking Prometheus.
pub struct Prometheus {
    config: Config,
    url: String,
    headers: Vec<(String, String)>,
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters kept).
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The number an `/api/v1/query` answer gives, or why not.
pub fn value_of(body: &[u8], empty_as: Option<f64>) -> Result<f64, PluginError> {
    let doc: Value = serde_json::from_slice(body)
        .map_err(|e| PluginError::permanent(format!("the answer is not JSON: {e}")))?;
    if doc["status"] != "success" {
        return Err(PluginError::config(format!(
            "prometheus: {}: {}",
            doc["errorType"].as_str().unwrap_or("error"),
            doc["error"].as_str().unwrap_or("no message")
        )));
    }
    let data = &doc["data"];
    let sample = match data["resultType"].as_str() {
        Some("scalar") => &data["result"],
        Some("vector") => {
            let result = data["result"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            match result {
                [] => {
                    return empty_as.ok_or_else(|| {
                        PluginError::transient(
                            "the query gave no series (set empty_as to read that as a number)",
                        )
                    })
                }
                [one] => &one["value"],
                many => {
                    return Err(PluginError::config(format!(
                        "the query gave {} series; aggregate them (sum, max, ...) into one",
                        many.len()
                    )))
                }
            }
        }
        other => {
            return Err(PluginError::config(format!(
                "the query gives a {}, not a scalar or a vector",
                other.unwrap_or("result of no type")
            )))
        }
    };
    let v = sample[1]
        .as_str()
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or_else(|| PluginError::permanent(format!("unreadable sample {sample}")))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(PluginError::transient(format!("the query gave {v}")))
    }
}

impl MetricSource for Prometheus {
    type Config = Config;

    async fn new(config: Config) -> Result<Self, PluginError> {
        let base = config.url.trim_end_matches('/');
        let url = format!(
            "{base}/api/v1/query?query={}&timeout={}ms",
            encode(&config.query),
            config.timeout_ms
        );
        let _: ::http::Uri = url.parse().map_err(|e| {
            PluginError::config(format!("url {:?}: {e}", http::redact(&config.url)))
        })?;
        let headers = config
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Prometheus {
            config,
            url,
            headers,
        })
    }

    async fn measure(&self) -> Result<Measurement, PluginError> {
        let body = match http::get(
            &self.url,
            &self.headers,
            Duration::from_millis(self.config.timeout_ms),
        )
        .await
        {
            // Prometheus answers a bad query with 400 and its reason in JSON.
            Err(e) if e.message.contains("HTTP 400") => {
                return Err(PluginError::config(e.message));
            }
            other => other?,
        };
        let value = value_of(&body, self.config.empty_as)?;
        let mut m = Measurement::new(value).label("query", self.config.query.clone());
        if let Some(u) = &self.config.unit {
            m = m.unit(u.clone());
        }
        Ok(m)
    }
}

export_plugin! { name: "prometheus", metric_source: Prometheus }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_of_the_query_api() {
        let scalar =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000.1,"4"]}}"#;
        assert_eq!(value_of(scalar, None).unwrap(), 4.0);
        let one = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"7.5"]}]}}"#;
        assert_eq!(value_of(one, None).unwrap(), 7.5);
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(
            value_of(empty, None).unwrap_err().kind,
            ErrorKind::Transient
        );
        assert_eq!(value_of(empty, Some(0.0)).unwrap(), 0.0);
        let two = br#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}}"#;
        let e = value_of(two, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Config);
        assert!(e.message.contains("2 series"), "{}", e.message);
        let bad = br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(value_of(bad, None)
            .unwrap_err()
            .message
            .contains("parse error"));
    }

    #[test]
    fn queries_are_encoded() {
        assert_eq!(
            encode("sum(up{job=\"a b\"})"),
            "sum%28up%7Bjob%3D%22a%20b%22%7D%29"
        );
    }
}
