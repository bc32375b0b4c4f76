//! warden's configuration: a TOML file, environment overrides, embedded defaults.
//!
//! Parsing is pure (text in, [`Config`] or a [`ConfigError`] out) so that every rule is
//! unit-tested without files or processes. Errors name the file, the key and what was
//! expected; TOML syntax and type errors carry line and column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod problems;

// Each part owns its settings; this module reads them as one file and checks them
// together. Re-exported so that the daemon and the one-shot commands name them here.
pub use crate::http::{HttpConfig, DEFAULT_HTTP_LISTEN};
pub use crate::identity::HostConfig;
pub use crate::manager::settings::{ManagedServiceConfig, ManagerConfig};
pub use crate::plugins::settings::{Isolation, PluginRef, PluginsConfig};
pub use crate::registrar::settings::RegistrarConfig;

/// Environment variables that override settings of the same meaning.
pub const ENV_PLUGIN_DIR: &str = "WARDEN_PLUGIN_DIR";
pub const ENV_LOCAL_REDIS: &str = "WARDEN_LOCAL_REDIS";
pub const ENV_CENTRAL_REDIS: &str = "WARDEN_CENTRAL_REDIS";
pub const ENV_INSTANCE_ID: &str = "WARDEN_INSTANCE_ID";
pub const ENV_AVAILABILITY_ZONE: &str = "WARDEN_AVAILABILITY_ZONE";
pub const ENV_PRIVATE_IP: &str = "WARDEN_PRIVATE_IP";
pub const ENV_HTTP_LISTEN: &str = "WARDEN_HTTP_LISTEN";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub host: HostConfig,
    pub plugins: PluginsConfig,
    pub registrar: RegistrarConfig,
    pub manager: ManagerConfig,
    pub http: HttpConfig,
    /// Metric sources by name: `[metrics.<name>]` with `plugin` and `config`.
    pub metrics: BTreeMap<String, PluginRef>,
    /// What service definitions from plugins (labels, a services hash, a table...) may
    /// claim; a source's own `grants` replaces this for that source. Default: nothing.
    pub grants: crate::grants::Grants,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {message}")]
    Read { file: String, message: String },
    /// The file is not safe to act on: others can write it, or read its secrets.
    #[error("{file}: refused: {message}")]
    Unsafe { file: String, message: String },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
    /// Every problem found in a file, each `line L, column C: key: what` (one a line).
    #[error("{}", problems.iter().map(|p| format!("{file}: {p}")).collect::<Vec<_>>().join("\n"))]
    Problems { file: String, problems: Vec<String> },
}

impl Config {
    /// Parses config text; `file` names it in errors, which list every problem found
    /// (see [`problems`]), each with its line, column and key.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let every = |first: ConfigError| {
            let problems = problems::every(text, file);
            if problems.is_empty() {
                first
            } else {
                ConfigError::Problems {
                    file: file.to_owned(),
                    problems,
                }
            }
        };
        let config: Config = toml::from_str(text).map_err(|e| {
            every(ConfigError::Parse {
                file: file.to_owned(),
                message: toml_message(text, &e),
            })
        })?;
        config.validate(file).map_err(every)?;
        Ok(config)
    }

    /// The settings that hold a secret: Redis URLs with a password, and plugin configs'
    /// keys named like a secret (`password`, `secret`, `token`...) or URLs with one.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        if crate::redis_util::has_password(&self.registrar.local_redis) {
            out.push("registrar.local_redis".to_owned());
        }
        if self
            .manager
            .central_redis
            .as_deref()
            .is_some_and(crate::redis_util::has_password)
        {
            out.push("manager.central_redis".to_owned());
        }
        for (key, _, r) in self.plugin_refs() {
            secrets_in(&format!("{key}.config"), &r.config, &mut out);
        }
        out
    }

    /// Reads the file at `path`, or the embedded defaults when `path` is `None`, then
    /// applies the environment (`env` looks a variable up).
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (mut config, file) = match path {
            Some(p) => {
                let file = p.display().to_string();
                let unsafe_file = |message: String| ConfigError::Unsafe {
                    file: file.clone(),
                    message,
                };
                // Whoever can write it can grant themselves anything: StrictModes first.
                warden_plugin_api::sdk::trust::check_file(p).map_err(unsafe_file)?;
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    file: file.clone(),
                    message: e.to_string(),
                })?;
                let config = Config::parse(&text, &file)?;
                let secrets = config.secrets();
                if !secrets.is_empty() {
                    let what = format!("a secret ({})", secrets.join(", "));
                    warden_plugin_api::sdk::trust::check_private(p, &what).map_err(unsafe_file)?;
                }
                (config, file)
            }
            None => (Config::default(), "(embedded defaults)".to_owned()),
        };
        config.apply_env(env);
        config.validate(&format!("{file} with environment overrides"))?;
        Ok(config)
    }

    /// Environment variables override the settings of the same meaning.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        let set = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        if let Some(dirs) = set(env(ENV_PLUGIN_DIR)) {
            self.plugins.dirs = dirs
                .split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect();
        }
        if let Some(v) = set(env(ENV_LOCAL_REDIS)) {
            self.registrar.local_redis = v;
        }
        if let Some(v) = set(env(ENV_CENTRAL_REDIS)) {
            self.manager.central_redis = Some(v);
        }
        if let Some(v) = set(env(ENV_INSTANCE_ID)) {
            self.host.instance_id = Some(v);
        }
        if let Some(v) = set(env(ENV_PRIVATE_IP)) {
            self.host.private_ip = Some(v);
        }
        if let Some(v) = set(env(ENV_AVAILABILITY_ZONE)) {
            self.host.availability_zone = Some(v);
        }
        if let Some(v) = set(env(ENV_HTTP_LISTEN)) {
            self.http.listen = v;
        }
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let bad = |(key, message): Bad| ConfigError::Invalid {
            file: file.to_owned(),
            key,
            message,
        };
        check_redis_url(&self.registrar.local_redis)
            .map_err(|m| bad(("registrar.local_redis".into(), m)))?;
        if let Some(url) = &self.manager.central_redis {
            check_redis_url(url).map_err(|m| bad(("manager.central_redis".into(), m)))?;
        }
        self.http
            .addr()
            .map_err(|m| bad(("http.listen".into(), m)))?;
        self.check_plugins().map_err(bad)?;
        self.check_registrar().map_err(bad)?;
        self.check_sources_and_grants().map_err(bad)?;
        self.check_manager_timing(file)?;
        self.check_managed_services().map_err(bad)
    }

    /// `[plugins]`: timeouts, breaker and memory within bounds; pins and the user well
    /// formed.
    fn check_plugins(&self) -> Result<(), Bad> {
        let p = &self.plugins;
        within(
            "plugins.call_timeout_ms",
            p.call_timeout_ms,
            1,
            600_000,
            "ms; a call longer than 10 min is a hang",
        )?;
        within(
            "plugins.create_timeout_ms",
            p.create_timeout_ms,
            1,
            600_000,
            "ms; a `new` longer than 10 min is reported as hanging anyway",
        )?;
        within(
            "plugins.breaker_failures",
            u64::from(p.breaker_failures),
            1,
            1000,
            "consecutive failures before a plugin rests",
        )?;
        within(
            "plugins.breaker_open_ms",
            p.breaker_open_ms,
            1,
            3_600_000,
            "ms; the rest doubles up to 10 min",
        )?;
        within(
            "plugins.isolation_memory_mb",
            p.isolation_memory_mb,
            64,
            1_048_576,
            "MiB an isolated plugin process may use for data",
        )?;
        for (name, digest) in &p.sha256 {
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((
                    format!("plugins.sha256.{name}"),
                    "expected 64 hex digits (sha256sum of the .so)".into(),
                ));
            }
        }
        if let Some(u) = &p.isolation_user {
            if u.trim().is_empty() {
                return Err((
                    "plugins.isolation_user".into(),
                    "expected a user name".into(),
                ));
            }
        }
        Ok(())
    }

    /// `[registrar]`: resync interval, label selector, reserved ports.
    fn check_registrar(&self) -> Result<(), Bad> {
        let r = &self.registrar;
        within(
            "registrar.resync_secs",
            r.resync_secs,
            1,
            86_400,
            "seconds; at least one full re-list a day",
        )?;
        if let Some(l) = &r.require_label {
            crate::registrar::store::Selector::parse(l)
                .map_err(|m| ("registrar.require_label".to_owned(), m))?;
        }
        if let Some(p) = r.reserved_ports.iter().find(|p| **p == 0) {
            return Err((
                "registrar.reserved_ports".into(),
                format!("{p} is not a port (1-65535)"),
            ));
        }
        Ok(())
    }

    /// Every plugin reference (sources and metrics) well formed; grants only on service
    /// sources, each valid.
    fn check_sources_and_grants(&self) -> Result<(), Bad> {
        for (name, metric) in &self.metrics {
            check_plugin_ref(metric).map_err(|m| (format!("metrics.{name}"), m))?;
            if metric.grants.is_some() {
                return Err((
                    format!("metrics.{name}.grants"),
                    "grants apply to service sources ([[registrar.sources]], [[manager.sources]]), not to metric sources".into(),
                ));
            }
        }
        self.grants.validate("grants")?;
        let sources = self
            .registrar
            .sources
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("registrar.sources[{i}]"), r))
            .chain(
                self.manager
                    .sources
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (format!("manager.sources[{i}]"), r)),
            );
        for (key, r) in sources {
            check_plugin_ref(r).map_err(|m| (key.clone(), m))?;
            if let Some(g) = &r.grants {
                g.validate(&format!("{key}.grants"))?;
            }
        }
        Ok(())
    }

    /// `[[manager.services]]`: names unique, also as ECS's 36-character `startedBy`
    /// tags; each service's own checks; the replica count in bounds.
    fn check_managed_services(&self) -> Result<(), Bad> {
        let m = &self.manager;
        within(
            "manager.central_min_replicas",
            u64::from(m.central_min_replicas),
            0,
            16,
            "replicas acknowledging each lease write",
        )?;
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut started: BTreeMap<String, usize> = BTreeMap::new();
        for (i, s) in m.services.iter().enumerate() {
            let key = |k: &str| format!("manager.services[{i}].{k}");
            if let Some(j) = names.insert(&s.name, i) {
                return Err((
                    key("name"),
                    format!("{:?} is also the name of manager.services[{j}]", s.name),
                ));
            }
            let tag = crate::manager::started_by(&s.name);
            if let Some(j) = started.insert(tag.clone(), i) {
                return Err((
                    key("name"),
                    format!(
                        "{:?} and manager.services[{j}] ({:?}) would both tag their tasks startedBy {tag:?} (ECS keeps 36 characters): each would count the other's tasks",
                        s.name, m.services[j].name
                    ),
                ));
            }
            s.check(&self.metrics).map_err(|(k, m)| (key(&k), m))?;
        }
        Ok(())
    }

    /// Election timing within bounds that keep it working (each reason in the message).
    fn check_manager_timing(&self, file: &str) -> Result<(), ConfigError> {
        let m = &self.manager;
        let bad = |key: &str, message: String| ConfigError::Invalid {
            file: file.to_owned(),
            key: key.to_owned(),
            message,
        };
        if !(10..=10_000).contains(&m.tick_ms) {
            return Err(bad(
                "manager.tick_ms",
                format!("{} is outside 10..=10000 ms", m.tick_ms),
            ));
        }
        if m.lease_ms < 3 * m.tick_ms || m.lease_ms > 120_000 {
            return Err(bad(
                "manager.lease_ms",
                format!(
                    "{} must be at least 3 ticks ({} ms, so a leader can miss two renewals) and at most 120000 ms",
                    m.lease_ms,
                    3 * m.tick_ms
                ),
            ));
        }
        if m.guard_ms < 50 || m.guard_ms > m.lease_ms {
            return Err(bad(
                "manager.guard_ms",
                format!(
                    "{} must be between 50 ms (time for every candidate's entry to land) and lease_ms ({} ms, or no host is ever elected in time)",
                    m.guard_ms, m.lease_ms
                ),
            ));
        }
        if m.loop_secs == 0 || m.loop_secs > 86_400 {
            return Err(bad(
                "manager.loop_secs",
                format!("{} is outside 1..=86400 seconds", m.loop_secs),
            ));
        }
        Ok(())
    }

    /// Every plugin instance the config asks for: (config key, kind, reference).
    pub fn plugin_refs(&self) -> Vec<(String, warden_plugin_api::Kind, &PluginRef)> {
        use warden_plugin_api::Kind;
        let sources = self.registrar.sources.iter().enumerate().map(|(i, r)| {
            (
                format!("registrar.sources[{i}]"),
                Kind::ServiceDefinitions,
                r,
            )
        });
        let managed = self
            .manager
            .sources
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("manager.sources[{i}]"), Kind::ServiceDefinitions, r));
        let metrics = self
            .metrics
            .iter()
            .map(|(n, r)| (format!("metrics.{n}"), Kind::MetricSource, r));
        sources.chain(managed).chain(metrics).collect()
    }
}

fn check_plugin_ref(r: &PluginRef) -> Result<(), String> {
    if r.plugin.trim().is_empty() {
        return Err("plugin: expected a plugin name".into());
    }
    if !r.config.is_object() {
        return Err("config: expected a table".into());
    }
    Ok(())
}

/// Keys named like a secret, or URLs with a password, under `v`.
fn secrets_in(at: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    const NAMES: [&str; 6] = [
        "password",
        "passwd",
        "secret",
        "token",
        "credential",
        "apikey",
    ];
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = format!("{at}.{k}");
                let named = NAMES
                    .iter()
                    .any(|n| k.to_ascii_lowercase().replace(['_', '-'], "").contains(n));
                if named && v.as_str().is_some_and(|s| !s.is_empty()) {
                    out.push(key);
                } else {
                    secrets_in(&key, v, out);
                }
            }
        }
        serde_json::Value::Array(list) => {
            for (i, v) in list.iter().enumerate() {
                secrets_in(&format!("{at}[{i}]"), v, out);
            }
        }
        serde_json::Value::String(s) if crate::redis_util::has_password(s) => {
            out.push(at.to_owned())
        }
        _ => {}
    }
}

/// A TOML error with its line and column, and never a value of the file: the snippet
/// toml prints may be a line holding a password, and serde quotes the value it could not
/// read (`invalid type: string "..."`).
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let mut message = redact_strings(e.message().trim());
    if let Some(span) = e.span() {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        let key = text
            .lines()
            .nth(line - 1)
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && !k.starts_with('['));
        message = match key {
            Some(k) => format!("line {line}, column {column}: key {k}: {message}"),
            None => format!("line {line}, column {column}: {message}"),
        };
    }
    message
}

/// `string "hunter2"` → `a string`.
fn redact_strings(message: &str) -> String {
    let mut out = String::new();
    let mut rest = message;
    while let Some(i) = rest.find("string \"") {
        out.push_str(&rest[..i]);
        out.push_str("a string");
        let after = &rest[i + "string \"".len()..];
        let mut escaped = false;
        let mut end = after.len();
        for (j, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = j + 1;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = &after[end.min(after.len())..];
    }
    out.push_str(rest);
    out
}

/// A refused setting: its dotted key and why.
type Bad = (String, String);

/// `v` within `lo..=hi`, else the key with the bounds and `why`.
fn within(key: &str, v: u64, lo: u64, hi: u64, why: &str) -> Result<(), Bad> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err((
            key.to_owned(),
            format!("{v} is outside {lo}..={hi} ({why})"),
        ))
    }
}

fn check_redis_url(url: &str) -> Result<(), String> {
    let ok = [
        "redis://",
        "rediss://",
        "redis+unix://",
        "unix://",
        "redis+sentinel://",
        "rediss+sentinel://",
    ]
    .iter()
    .any(|scheme| url.starts_with(scheme) && url.len() > scheme.len());
    if ok {
        Ok(())
    } else {
        // Never echo a password: only the address part is shown.
        Err(format!(
            "expected a Redis URL such as redis://127.0.0.1:6379, got {:?}",
            crate::redis_util::redact(url)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn embedded_defaults() {
        let c = Config::load(None, no_env).unwrap();
        assert_eq!(c.registrar.local_redis, "redis://127.0.0.1:6379");
        assert_eq!(
            c.plugins.dirs,
            vec![
                PathBuf::from("/usr/lib/warden/plugins"),
                PathBuf::from("./plugins")
            ]
        );
        assert_eq!(
            c.manager.central_redis, None,
            "manager is off until a central Redis is configured"
        );
    }

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
            [host]
            instance_id = "i-1"
            [plugins]
            dirs = ["/opt/p"]
            call_timeout_ms = 100
            [[registrar.sources]]
            plugin = "file-services"
            config = { path = "/etc/warden/services.toml" }
            [manager]
            central_redis = "redis://central:6379"
            [metrics.upstream]
            plugin = "beanstalk-instances"
            config = { environment = "web-prod" }
            "#,
            "w.toml",
        )
        .unwrap();
        assert_eq!(c.host.instance_id.as_deref(), Some("i-1"));
        assert_eq!(
            c.registrar.sources[0].config["path"],
            "/etc/warden/services.toml"
        );
        assert_eq!(c.metrics["upstream"].plugin, "beanstalk-instances");
        assert_eq!(c.plugin_refs().len(), 2);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = Config::parse("[plugins]\ndirs = []\ncall_timeout = 5\n", "w.toml").unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("w.toml: "), "{text}");
        assert!(
            text.contains("line 3") && text.contains("call_timeout"),
            "{text}"
        );
    }

    #[test]
    fn wrong_type_is_named_with_its_line() {
        let e = Config::parse("[plugins]\ncall_timeout_ms = \"fast\"\n", "w.toml").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("line 2")
                && text.contains("call_timeout_ms")
                && text.contains("expected u64"),
            "{text}"
        );
    }

    #[test]
    fn invalid_values_name_their_key() {
        let e = Config::parse("[registrar]\nlocal_redis = \"localhost\"\n", "w.toml").unwrap_err();
        assert_eq!(
            e,
            ConfigError::Problems {
                file: "w.toml".into(),
                problems: vec!["line 2, column 1: registrar.local_redis: expected a Redis URL such as redis://127.0.0.1:6379, got \"localhost\"".into()]
            }
        );
        let e = Config::parse("[metrics.q]\nplugin = \"x\"\nconfig = 3\n", "w.toml").unwrap_err();
        assert!(e.to_string().contains("metrics.q"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = |k: &str| match k {
            ENV_PLUGIN_DIR => Some("/a:/b".to_owned()),
            ENV_LOCAL_REDIS => Some("redis://127.0.0.1:7000".to_owned()),
            ENV_CENTRAL_REDIS => Some("redis://10.0.0.1:6379".to_owned()),
            ENV_INSTANCE_ID => Some("i-env".to_owned()),
            ENV_AVAILABILITY_ZONE => Some("eu-west-1b".to_owned()),
            _ => None,
        };
        let c = Config::load(None, env).unwrap();
        assert_eq!(
            c.plugins.dirs,
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert_eq!(c.registrar.local_redis, "redis://127.0.0.1:7000");
        assert_eq!(
            c.manager.central_redis.as_deref(),
            Some("redis://10.0.0.1:6379")
        );
        assert_eq!(c.host.instance_id.as_deref(), Some("i-env"));
        assert_eq!(c.host.availability_zone.as_deref(), Some("eu-west-1b"));
    }

    #[test]
    fn manager_services_parse_and_are_checked() {
        let base = r#"
            [manager]
            central_redis = "redis://127.0.0.1:6379"
            [metrics.upstream]
            plugin = "beanstalk-instances"
            [metrics.table]
            plugin = "s3-table"
            [[manager.services]]
            name = "worker"
            task_definition = "worker"
            metric = "upstream"
            mapping = { plugin = "table" }
            policy = { min = 1, max = 20, fallback = { fixed = 2 } }
        "#;
        let c = Config::parse(base, "w.toml").unwrap();
        let s = &c.manager.services[0];
        assert_eq!(s.cluster, "default");
        assert_eq!(
            s.policy.fallback,
            crate::manager::policy::Fallback::Fixed(2)
        );
        assert_eq!(
            s.policy.scale_down_window_secs, 300,
            "defaults fill the rest"
        );
        let e = Config::parse(
            &base.replace("metric = \"upstream\"", "metric = \"nope\""),
            "w.toml",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("manager.services[0].metric: no [metrics.nope]"),
            "{e}"
        );
        let e = Config::parse(
            &base.replace(
                "task_definition = \"worker\"",
                "task_definition = \"w\"\necs_service = \"w\"",
            ),
            "w.toml",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("exactly one of task_definition and ecs_service"),
            "{e}"
        );
        let e = Config::parse(
            &base.replace("{ plugin = \"table\" }", "{ table = [[0, 1], [0, 2]] }"),
            "w.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("mapping: table row 2"), "{e}");
        let e = Config::parse(
            &base.replace("min = 1, max = 20", "min = 5, max = 2"),
            "w.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("min 5 is above max 2"), "{e}");
    }

    #[test]
    fn every_setting_is_bounded_with_the_reason() {
        for (text, key) in [
            (
                "[registrar]\nresync_secs = 9223372036854775807\n",
                "registrar.resync_secs",
            ),
            ("[manager]\nguard_ms = 999999999\n", "manager.guard_ms"),
            ("[manager]\nguard_ms = 0\n", "manager.guard_ms"),
            ("[manager]\ntick_ms = 0\n", "manager.tick_ms"),
            ("[manager]\nlease_ms = 100\n", "manager.lease_ms"),
            ("[manager]\nloop_secs = 0\n", "manager.loop_secs"),
            (
                "[plugins]\ncall_timeout_ms = 0\n",
                "plugins.call_timeout_ms",
            ),
            (
                "[plugins]\nbreaker_open_ms = 99999999999\n",
                "plugins.breaker_open_ms",
            ),
        ] {
            let e = Config::parse(text, "w.toml").unwrap_err().to_string();
            assert!(
                e.contains(key) && (e.contains("outside") || e.contains("must")),
                "{text}: {e}"
            );
        }
        let e = Config::parse(
            "[manager]\ncentral_redis = \"redis://c:1\"\n[metrics.m]\nplugin = \"p\"\n[[manager.services]]\nname = \"w\"\ntask_definition = \"w\"\nmetric = \"m\"\nmapping = { target_per_task = 1.0 }\npolicy = { tolerance = 2.0 }\n",
            "w.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("policy.tolerance"), "{e}");
    }

    #[test]
    fn toml_errors_never_echo_a_value() {
        let e = Config::parse(
            "[manager]\ncentral_redis = \"redis://:hunter2@c:6379\"\nlease_ms = \"hunter3\"\n",
            "w.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("hunter"), "{e}");
        assert!(
            e.contains("line 3") && e.contains("lease_ms") && e.contains("a string"),
            "{e}"
        );
    }

    #[test]
    fn secrets_are_found_in_urls_and_plugin_configs() {
        let c = Config::parse(
            "[registrar]\nlocal_redis = \"redis://:pw@127.0.0.1:6379\"\n[metrics.q]\nplugin = \"p\"\nconfig = { url = \"redis://u:pw@h:1\", auth_token = \"t\", name = \"x\" }\n",
            "w.toml",
        )
        .unwrap();
        assert_eq!(
            c.secrets(),
            [
                "registrar.local_redis",
                "metrics.q.config.auth_token",
                "metrics.q.config.url"
            ]
        );
        assert!(Config::default().secrets().is_empty());
    }

    #[test]
    fn a_config_with_a_secret_that_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("w.toml");
        std::fs::write(&f, "[manager]\ncentral_redis = \"redis://:pw@c:6379\"\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Config::load(Some(&f), no_env).unwrap_err();
        assert!(
            matches!(&e, ConfigError::Unsafe { message, .. } if message.contains("manager.central_redis") && message.contains("chmod 0600")),
            "{e}"
        );
        assert!(!e.to_string().contains("pw@"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        Config::load(Some(&f), no_env).unwrap();
        // Writable by others: refused whatever it holds.
        std::fs::write(&f, "[registrar]\nresync_secs = 5\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o646)).unwrap();
        let e = Config::load(Some(&f), no_env).unwrap_err();
        assert!(e.to_string().contains("writable by others"), "{e}");
    }

    #[test]
    fn a_bad_redis_url_is_shown_without_its_password() {
        let e = Config::parse(
            "[registrar]\nlocal_redis = \"tcp://:hunter2@h:6379\"\n",
            "w.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("hunter2") && e.contains("h:6379"), "{e}");
    }

    #[test]
    fn a_bad_environment_value_is_named() {
        let env = |k: &str| (k == ENV_LOCAL_REDIS).then(|| "nope".to_owned());
        let e = Config::load(None, env).unwrap_err();
        assert!(
            e.to_string().contains("environment")
                && e.to_string().contains("registrar.local_redis"),
            "{e}"
        );
    }
}

/// Every setting of the file with its default, as `docs/operations.md` lists them:
/// (`section.key`, default rendered as JSON, `unset` when absent).
pub fn documented_defaults() -> Vec<(String, String)> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) if !map.is_empty() && !prefix.ends_with("metrics") => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            serde_json::Value::Null => out.push((prefix.to_owned(), "unset".into())),
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let mut out = Vec::new();
    let defaults = serde_json::to_value(Config::default()).expect("the config serializes");
    flatten("", &defaults, &mut out);
    let policy = serde_json::to_value(crate::manager::policy::Policy::default())
        .expect("the policy serializes");
    flatten("manager.services[].policy", &policy, &mut out);
    out
}

#[cfg(test)]
mod doc_tests {
    /// docs/operations.md lists every setting with its default, and nothing else.
    #[test]
    fn operations_doc_lists_every_setting_with_its_default() {
        let doc = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/operations.md"
        ));
        let settings = doc
            .split_once("\n## Settings\n")
            .map(|(_, rest)| rest.split("\n## ").next().unwrap_or(rest))
            .expect("docs/operations.md has a ## Settings section");
        let rows: std::collections::BTreeMap<String, String> = settings
            .lines()
            .filter_map(|l| {
                let mut cells = l.strip_prefix("| `")?.split(" | ");
                let key = cells.next()?.strip_suffix('`')?.to_owned();
                let default = cells.next()?.trim().to_owned();
                Some((key, default))
            })
            .collect();
        for (key, default) in super::documented_defaults() {
            let want = if default == "unset" {
                "unset".to_owned()
            } else {
                format!("`{default}`")
            };
            assert_eq!(
                rows.get(&key),
                Some(&want),
                "docs/operations.md: the row of `{key}` must give its default {want}"
            );
        }
        let known: std::collections::BTreeSet<String> = super::documented_defaults()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for key in rows.keys() {
            let service_field = key.strip_prefix("manager.services[].").is_some_and(|f| {
                [
                    "name",
                    "cluster",
                    "task_definition",
                    "ecs_service",
                    "metric",
                    "mapping",
                ]
                .contains(&f)
            });
            let plugin_ref = ["plugin", "config", "isolation", "env"].iter().any(|f| {
                key == &format!("metrics.<name>.{f}") || key == &format!("registrar.sources[].{f}")
            }) || key == "registrar.sources[].grants";
            assert!(
                known.contains(key) || service_field || plugin_ref,
                "docs/operations.md lists `{key}`, which is not a setting"
            );
        }
    }
}
