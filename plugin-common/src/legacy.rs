//! The original warden's service files (Perl and Go), read as they were written.
//! Shared by `file-services` and `dynamodb-services`.

// Each plugin that includes this file uses part of it.

use warden_plugin_api::model::{ContainerMatch, ServiceDefinition};
use warden_plugin_api::{serde, serde_json};

/// One service as the original warden described it. Both spellings are accepted, as
/// the Perl (`Name`) and Go (`name`) versions wrote them; any other key is an error.
#[derive(serde::Deserialize)]
#[serde(crate = "warden_plugin_api::serde", deny_unknown_fields)]
struct Description {
    #[serde(alias = "Name")]
    name: String,
    #[serde(rename = "backendName", alias = "BackendName", default)]
    backend_name: Option<String>,
    #[serde(rename = "containerName", alias = "ContainerName")]
    container_name: String,
    #[serde(rename = "loadBalancerName", alias = "LoadBalancerName", default)]
    load_balancer_name: Option<String>,
    #[serde(rename = "loadBalancerUrl", alias = "LoadBalancerUrl", default)]
    load_balancer_url: Option<String>,
    #[serde(alias = "Port", default)]
    port: Option<u16>,
    #[serde(alias = "Site", default)]
    site: Option<String>,
    // Read so that a file of the original is accepted whole; the original manager
    // ran tasks from them, warden's manager is configured in [[manager.services]].
    #[serde(rename = "taskName", alias = "TaskName", default)]
    _task_name: Option<String>,
    #[serde(rename = "taskVersion", alias = "TaskVersion", default)]
    _task_version: Option<serde_json::Value>,
}

/// Parses a JSON array of the original's service descriptions. Errors name the line
/// and column.
pub fn parse(text: &str) -> Result<Vec<ServiceDefinition>, String> {
    let list: Vec<Description> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    list.into_iter()
        .enumerate()
        .map(|(i, d)| convert(d).map_err(|e| format!("[{i}] {e}")))
        .collect()
}

/// The fields of the original's description, as the Perl version spelled them.
pub const PERL_FIELDS: [&str; 9] = [
    "Name",
    "BackendName",
    "ContainerName",
    "LoadBalancerName",
    "LoadBalancerUrl",
    "Port",
    "Site",
    "TaskName",
    "TaskVersion",
];

/// One description given as a JSON object (a DynamoDB item, say).
pub fn from_value(v: serde_json::Value) -> Result<ServiceDefinition, String> {
    convert(serde_json::from_value(v).map_err(|e| e.to_string())?)
}

fn blank(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

fn convert(d: Description) -> Result<ServiceDefinition, String> {
    let at = format!("({:?})", d.name);
    let image = d.container_name.trim().to_owned();
    if image.is_empty() {
        return Err(format!("{at}.ContainerName: must not be empty"));
    }
    let frontends = match blank(d.load_balancer_url) {
        None => Vec::new(),
        // The original routed `frontend:<LoadBalancerUrl><Site>`.
        Some(host) => vec![format!("{host}{}", blank(d.site).unwrap_or_default())],
    };
    Ok(ServiceDefinition {
        name: d.name,
        matches: ContainerMatch {
            image: Some(image),
            ..Default::default()
        },
        port: d.port,
        backend: blank(d.backend_name),
        frontends,
        elb: blank(d.load_balancer_name),
        ..Default::default()
    })
}
