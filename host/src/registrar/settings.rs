//! `[registrar]`: the local Redis the router reads, the service sources, the router's
//! files and ports. The registrar owns these; `config` reads and checks them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::plugins::PluginRef;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrarConfig {
    /// Run the registrar (routes and ELB membership for this host's containers).
    pub enabled: bool,
    /// The host's local Redis, read by the router (`redis://`, `rediss://` for TLS,
    /// `redis://user:password@…` for AUTH).
    pub local_redis: String,
    /// PEM CA that signs a `rediss://` local Redis's certificate (default: the system's).
    pub local_redis_ca_file: Option<PathBuf>,
    /// Full re-list of containers every this many seconds.
    pub resync_secs: u64,
    /// Service-definition plugins; docker-labels when empty.
    pub sources: Vec<PluginRef>,
    /// Remove a container from its backend as soon as Docker says it is being stopped
    /// (`kill` with SIGTERM/SIGKILL, or `stop`). `false` removes it only when it dies,
    /// as Registrator and Traefik do; kept for comparison in the benchmark.
    pub drain_on_stop: bool,
    /// nginx include file warden writes the router's `listen` lines into.
    pub router_ports_file: Option<PathBuf>,
    /// nginx master's pid file, to reload the router when its ports change.
    pub router_pid_file: Option<PathBuf>,
    /// Consider only containers carrying this label: `key` or `key=value` (default: all).
    pub require_label: Option<String>,
    /// The router's own listen ports (and any other port no service may take as its
    /// front-end port); warden's `http.listen` port is added.
    pub reserved_ports: Vec<u16>,
}

impl Default for RegistrarConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            drain_on_stop: true,
            local_redis: "redis://127.0.0.1:6379".into(),
            local_redis_ca_file: None,
            resync_secs: 30,
            sources: Vec::new(),
            router_ports_file: None,
            router_pid_file: None,
            require_label: None,
            reserved_ports: vec![80, 443],
        }
    }
}
