//! The values that cross the plugin boundary as JSON.
//!
//! Hosts read these leniently (unknown fields are ignored, missing optional ones default),
//! so that a plugin built against a later 1.x can add a field without being refused.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One reading of a metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form detail for logs and `warden status` (for example, where the value came from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl Measurement {
    pub fn new(value: f64) -> Self {
        Self {
            value,
            unit: None,
            labels: BTreeMap::new(),
            detail: None,
        }
    }
    pub fn unit(mut self, unit: impl Into<String>) -> Self {
        self.unit = Some(unit.into());
        self
    }
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }
}

/// How a service recognises its containers. Every rule that is set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ContainerMatch {
    /// Exact image name, with or without tag (`repo/app` matches `repo/app:1.2`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Image name prefix (`registry.example/team/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_prefix: Option<String>,
    /// Container name glob: `*` any run of characters, `?` one character.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels that must be present with these exact values.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// ECS task-definition family (the ECS agent's `com.amazonaws.ecs.task-definition-family` label).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecs_family: Option<String>,
    /// Container ids, when the provider names the containers themselves (docker-labels).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub ids: BTreeSet<String>,
}

impl ContainerMatch {
    pub fn is_empty(&self) -> bool {
        self.image.is_none()
            && self.image_prefix.is_none()
            && self.name.is_none()
            && self.labels.is_empty()
            && self.ecs_family.is_none()
            && self.ids.is_empty()
    }
}

/// A service as the registrar and manager see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceDefinition {
    /// Service name; also the default Redx backend name.
    pub name: String,
    /// How its containers are recognised.
    #[serde(
        default,
        rename = "match",
        skip_serializing_if = "ContainerMatch::is_empty"
    )]
    pub matches: ContainerMatch,
    /// Container port that serves traffic (needed when the image exposes several).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Redx backend name, when it is not the service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Host or host/path front-ends (`api.example.com`, `example.com/api/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frontends: Vec<String>,
    /// Host port of the service's front-end on the router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend_port: Option<u16>,
    /// Classic ELB the host joins while it runs this service's containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elb: Option<String>,
    /// Docker network whose IP is routed to, when a container has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Seconds between the last container leaving and the ELB deregistration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_seconds: Option<u64>,
}

impl ServiceDefinition {
    pub fn backend_name(&self) -> &str {
        self.backend.as_deref().unwrap_or(&self.name)
    }
}

/// What a service-definitions provider is told of each running container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerView {
    pub id: String,
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Arguments of the `list` operation: the host's running containers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListArgs {
    #[serde(default)]
    pub containers: Vec<ContainerView>,
}

/// `Host/Path` → `host/path/`: Redx matches hosts lower-cased (port stripped) and path
/// front-ends only with a trailing slash.
pub fn normalise_frontend(f: &str) -> Result<String, String> {
    let f = f.trim();
    let (host, path) = f.split_once('/').map_or((f, None), |(h, p)| (h, Some(p)));
    if host.is_empty() || host.contains(':') || host.chars().any(char::is_whitespace) {
        return Err(format!(
            "{f:?} is not `host` or `host/path/` (no scheme, no port)"
        ));
    }
    let host = host.to_ascii_lowercase();
    Ok(match path.map(|p| p.trim_matches('/')) {
        None | Some("") => host,
        Some(p) => format!("{host}/{p}/"),
    })
}

/// Arguments of a metric source's `map` operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapArgs {
    pub value: f64,
}
