//! What a configuration needs before anything starts: the plugins it loads and the
//! problems that make it unable to work, the same for `warden check`, `warden run` and a
//! reload.

use std::time::Duration;

use warden_plugin_api::Kind;

use super::DEFAULT_SOURCE;
use crate::config::{Config, PluginsConfig};
use crate::metrics::Dependency;
use crate::plugins::{CreateError, PluginHost};

/// The plugins of the plugin directories, as a configuration loads them: pins checked,
/// isolated children started as `[plugins]` says (an unknown `isolation_user` is a
/// problem [`problems`] reports; the children then run as warden's own user).
pub(crate) fn load_plugins(config: &Config, insecure: bool) -> PluginHost {
    let p = &config.plugins;
    let mut host = PluginHost::load_dirs_pinned(&p.dirs, insecure || p.allow_insecure, &p.sha256);
    host.set_child_policy(crate::plugins::isolated::ChildPolicy {
        user: p
            .isolation_user
            .as_deref()
            .and_then(|u| crate::plugins::isolated::ChildUser::lookup(u).ok()),
        memory_mb: p.isolation_memory_mb,
    });
    host.set_in_process_dirs(&p.in_process_dirs);
    host
}

/// What makes a configuration unable to work, one line each: the same checks for
/// `warden check` and before `warden run` starts anything.
pub(crate) fn problems(config: &Config, host: &PluginHost) -> Vec<String> {
    let mut out = plugin_problems(config, host);
    out.extend(tls_problems(config));
    if config.registrar.enabled && config.registrar.sources.is_empty() {
        if let Err(e) = host.check_config(
            DEFAULT_SOURCE,
            Kind::ServiceDefinitions,
            &serde_json::json!({}),
        ) {
            out.push(format!(
                "registrar: enabled with no [[registrar.sources]], and the default source cannot be used: {e}; on a host that runs only the manager, set registrar.enabled = false"
            ));
        }
    }
    out
}

/// `[plugins]` against what was loaded, and every plugin instance's config against its
/// plugin's schema.
fn plugin_problems(config: &Config, host: &PluginHost) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(u) = &config.plugins.isolation_user {
        if let Err(e) = crate::plugins::isolated::ChildUser::lookup(u) {
            out.push(format!("plugins.isolation_user: {e}"));
        }
    }
    for name in config.plugins.sha256.keys() {
        if host.find(name).is_none() {
            let why = host
                .failures()
                .iter()
                .find(|f| f.reason.to_string().contains(&format!("{name:?}")))
                .map_or(String::new(), |f| format!(" ({f})"));
            out.push(format!(
                "plugins.sha256.{name}: no plugin of that name is loaded{why}"
            ));
        }
    }
    if config.plugins.dirs != PluginsConfig::default().dirs {
        for d in &config.plugins.dirs {
            if !d.is_dir() {
                out.push(format!(
                    "plugins.dirs: {} does not exist or is not a directory",
                    d.display()
                ));
            }
        }
    }
    let failed_loads = || {
        host.failures()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    };
    for (key, kind, r) in config.plugin_refs() {
        if let Err(e) = host.check_config(&r.plugin, kind, &r.config) {
            let mut line = format!("{key}: {e}");
            if matches!(e, CreateError::UnknownPlugin { .. }) && !host.failures().is_empty() {
                line.push_str(&format!(" (files not loaded: {})", failed_loads()));
            }
            out.push(line);
        }
    }
    out
}

/// A CA file given for a `rediss://` URL must be readable PEM.
fn tls_problems(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let tls = [
        (
            "registrar.local_redis_ca_file",
            Some(&config.registrar.local_redis),
            &config.registrar.local_redis_ca_file,
        ),
        (
            "manager.central_redis_ca_file",
            config.manager.central_redis.as_ref(),
            &config.manager.central_redis_ca_file,
        ),
    ];
    for (key, url, ca) in tls {
        if let (Some(url), Some(ca)) = (url, ca) {
            let t = crate::redis_link::Timeouts {
                connect: Duration::from_secs(1),
                response: Duration::from_secs(1),
            };
            if let Err(e) = crate::redis_link::Endpoint::new(url, Some(ca), t) {
                out.push(format!("{key}: {e}"));
            }
        }
    }
    out
}

/// The dependencies `/readyz` waits for, by the parts a configuration runs.
pub(super) fn required_for(config: &Config) -> Vec<Dependency> {
    let mut required = Vec::new();
    if config.registrar.enabled {
        required.extend([
            Dependency::Docker,
            Dependency::LocalRedis,
            Dependency::ServiceSources,
        ]);
    }
    if config.manager.central_redis.is_some() {
        required.push(Dependency::CentralRedis);
    }
    required
}

/// [`load_plugins`] on a blocking thread: probing a plugin file can take up to its probe
/// timeout (seconds), which must not hold a worker of the runtime that renews the lease
/// and answers `/livez`.
pub(super) async fn load_plugins_off_runtime(config: &Config, insecure: bool) -> PluginHost {
    let config = config.clone();
    match tokio::task::spawn_blocking(move || load_plugins(&config, insecure)).await {
        Ok(host) => host,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Said at start when plugins are loaded without their permission checks.
pub(super) fn say_if_insecure(config: &Config, insecure: bool) {
    if insecure || config.plugins.allow_insecure {
        tracing::warn!(
            "plugins are loaded WITHOUT their permission checks (--allow-insecure-plugins or plugins.allow_insecure): anyone who can write a plugin file or directory can run code as warden; for development only"
        );
        crate::metrics::get().plugins_insecure.set(1);
    }
}
