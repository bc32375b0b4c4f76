//! The manifest a plugin library describes itself with.
//!
//! It crosses the boundary as JSON, so new fields can be added in a 1.x release: a host
//! ignores what it does not know and fills in defaults for what an older plugin lacks.

use serde::{Deserialize, Serialize};

/// The kinds of thing a plugin can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Gives a number (and may map numbers): drives the manager.
    MetricSource,
    /// Gives the services the registrar routes.
    ServiceDefinitions,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 2] = [Kind::MetricSource, Kind::ServiceDefinitions];

    /// The kind's name in configs and messages (`metric-source`, `service-definitions`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::MetricSource => "metric-source",
            Kind::ServiceDefinitions => "service-definitions",
        }
    }

    /// The kind named `s`, if any.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One kind a plugin offers, with the JSON Schema of the config an instance takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindManifest {
    /// Which kind.
    pub kind: Kind,
    /// The JSON Schema of the config an instance of this kind takes.
    pub config_schema: serde_json::Value,
}

/// What a plugin library says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The plugin's name, as configs refer to it.
    pub name: String,
    /// The plugin's own version.
    pub version: String,
    /// The version of `warden-plugin-api` the plugin was built with.
    pub api_version: String,
    /// Whether the plugin was built with unwinding panics (it must be: see the SDK).
    pub unwind: bool,
    /// The kinds the plugin offers.
    pub kinds: Vec<KindManifest>,
}

impl Manifest {
    /// The manifest of one kind, if offered.
    pub fn kind(&self, kind: Kind) -> Option<&KindManifest> {
        self.kinds.iter().find(|k| k.kind == kind)
    }

    /// The names of the kinds offered.
    pub fn kind_names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.kind.as_str()).collect()
    }
}
