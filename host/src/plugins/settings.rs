//! `[plugins]` and the plugin instances other sections name (`PluginRef`): where plugin
//! files are looked for, what they must pass, where instances live. The plugin host owns
//! these; `config` reads them as part of the file and checks them with the rest.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Directories whose `*.so` files are loaded, in order (a name seen twice: first wins).
    pub dirs: Vec<PathBuf>,
    /// Load plugin files and directories writable by group/others or owned by others.
    pub allow_insecure: bool,
    /// Longest a single plugin call may take before it is cancelled.
    pub call_timeout_ms: u64,
    /// How long a plugin's `new` may take before warden reports it as hanging (it keeps
    /// waiting for that attempt; nothing else waits for it).
    pub create_timeout_ms: u64,
    /// Consecutive failures after which a plugin instance is not called for a while.
    pub breaker_failures: u32,
    /// How long a tripped instance rests (doubled on each repeated trip, up to 10 min).
    pub breaker_open_ms: u64,
    /// Where plugin instances live by default: `auto` (in process for the plugins in
    /// `in_process_dirs`, the ones installed with warden; in a process for any other),
    /// `in-process`, or `process` (each in a supervised child of its own, so a crash or
    /// an endless loop costs only that child).
    pub isolation: Isolation,
    /// Under `isolation = "auto"`, the directories whose plugins run in warden's own
    /// process: the package's, whose files are root's and shipped with warden.
    pub in_process_dirs: Vec<PathBuf>,
    /// The user isolated plugin processes run as (warden must be root or hold
    /// CAP_SETUID/CAP_SETGID); warden's own user when unset.
    pub isolation_user: Option<String>,
    /// An isolated plugin process's data limit (RLIMIT_DATA), in MiB.
    pub isolation_memory_mb: u64,
    /// SHA-256 pins by plugin name (hex): a file of that name whose digest differs is
    /// refused, in process or isolated.
    pub sha256: BTreeMap<String, String>,
}

/// Where a plugin instance lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// In process for a plugin in `plugins.in_process_dirs` (shipped with warden), in a
    /// process for any other: a metric read once a loop does not miss the ~40 µs and the
    /// few MB of a child, and code warden's authors never read cannot wedge or crash it.
    #[default]
    Auto,
    /// In warden's own process: calls cost about a microsecond; a crash ends warden.
    InProcess,
    /// In a child process (`warden plugin-host`), over a Unix socket: a crash, abort or
    /// endless loop costs that child, which is restarted with backoff.
    Process,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Auto => "auto",
            Isolation::InProcess => "in-process",
            Isolation::Process => "process",
        }
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            dirs: vec![
                PathBuf::from("/usr/lib/warden/plugins"),
                PathBuf::from("./plugins"),
            ],
            allow_insecure: false,
            call_timeout_ms: 5_000,
            create_timeout_ms: 10_000,
            breaker_failures: 3,
            breaker_open_ms: 30_000,
            isolation: Isolation::Auto,
            in_process_dirs: vec![PathBuf::from("/usr/lib/warden/plugins")],
            isolation_user: None,
            isolation_memory_mb: 1024,
            sha256: BTreeMap::new(),
        }
    }
}

/// A plugin instance: which plugin, and the config it gets (checked against its schema).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRef {
    pub plugin: String,
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// Overrides `plugins.isolation` for this instance.
    #[serde(default)]
    pub isolation: Option<Isolation>,
    /// For a service source: what its definitions may claim, instead of `[grants]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grants: Option<crate::grants::Grants>,
    /// For an instance in a process of its own: the variables of warden's environment
    /// its process gets (it gets no other, but PATH, RUST_LOG and NO_COLOR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
}

impl PluginRef {
    /// A reference to `plugin` with an empty config and no overrides.
    pub fn new(plugin: &str) -> PluginRef {
        PluginRef {
            plugin: plugin.to_owned(),
            config: empty_object(),
            isolation: None,
            grants: None,
            env: Vec::new(),
        }
    }
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}
