//! The manifest a plugin library describes itself with.
//!
//! It crosses the boundary as JSON, so new fields can be added in a 1.x release: a host
//! ignores what it does not know and fills in defaults for what an older plugin lacks.

use serde::{Deserialize, Serialize};

/// The kinds of thing a plugin can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    MetricSource,
    ServiceDefinitions,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::MetricSource, Kind::ServiceDefinitions];

    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::MetricSource => "metric-source",
            Kind::ServiceDefinitions => "service-definitions",
        }
    }

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
    pub kind: Kind,
    pub config_schema: serde_json::Value,
}

/// What a plugin library says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// The version of `warden-plugin-api` the plugin was built with.
    pub api_version: String,
    /// Whether the plugin was built with unwinding panics (it must be: see the SDK).
    pub unwind: bool,
    pub kinds: Vec<KindManifest>,
}

impl Manifest {
    pub fn kind(&self, kind: Kind) -> Option<&KindManifest> {
        self.kinds.iter().find(|k| k.kind == kind)
    }

    pub fn kind_names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.kind.as_str()).collect()
    }
}
