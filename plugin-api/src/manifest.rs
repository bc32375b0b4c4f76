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

/// The calls a host makes on an instance. The ABI carries the name as a string (so a
/// new call is an addition, not a new layout); this is the one list of names that the
/// host, the SDK's dispatch and the test harness share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// A metric source's reading (no arguments).
    Measure,
    /// A value through a metric source's table (`{"value": x}`).
    Map,
    /// A service source's definitions (no arguments, or the host's containers).
    List,
    /// A number that changes when the service list may have changed (no arguments).
    Generation,
}

impl Op {
    /// Every call, in a fixed order.
    pub const ALL: [Op; 4] = [Op::Measure, Op::Map, Op::List, Op::Generation];

    /// The call's name on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Op::Measure => "measure",
            Op::Map => "map",
            Op::List => "list",
            Op::Generation => "generation",
        }
    }

    /// The call named `s`, if any.
    pub fn parse(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// The kind that answers it.
    pub const fn kind(self) -> Kind {
        match self {
            Op::Measure | Op::Map => Kind::MetricSource,
            Op::List | Op::Generation => Kind::ServiceDefinitions,
        }
    }

    /// The calls a kind answers, the first its default (`plugins call` without `--op`).
    pub fn of(kind: Kind) -> &'static [Op] {
        match kind {
            Kind::MetricSource => &[Op::Measure, Op::Map],
            Kind::ServiceDefinitions => &[Op::List, Op::Generation],
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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

#[cfg(test)]
mod op_tests {
    use super::*;

    #[test]
    fn each_op_has_one_name_and_belongs_to_one_kind() {
        for op in Op::ALL {
            assert_eq!(Op::parse(op.as_str()), Some(op));
            assert!(Op::of(op.kind()).contains(&op), "{op}");
        }
        assert_eq!(Op::parse("list_for"), None);
    }
}
