//! The plugin host: finds `*.so` files, checks each on its own, and hands out clients
//! that call plugin instances safely.
//!
//! A file that fails to load is reported in one short line and skipped; the others still
//! load. Each file is opened first in a child process (the probe), which reports its
//! manifest; the library is mapped into warden itself only when an in-process instance of
//! it is first created, so a plugin that sits in the directory unused costs no memory
//! (1 to 3 MB of relocated pages each, the AWS-based ones the most). Libraries are never
//! unloaded: a plugin is replaced by an atomic rename of the new file over the old one,
//! then a restart of warden (copying over a loaded `.so` crashes the process that has it
//! mapped).

pub mod breaker;
pub mod call;
pub mod client;
pub mod elf;
pub mod executor;
pub mod isolated;
pub mod pin;
pub mod probe;
pub mod schema;
pub mod security;
pub mod settings;
pub mod slot;

pub use settings::{Isolation, PluginRef, PluginsConfig};

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use warden_plugin_api::host::Library;
use warden_plugin_api::{Kind, Manifest};

pub use client::{
    CallError, CallOptions, Decode, InProcessClient, MetricClient, PluginClient, ServicesClient,
};

/// A plugin file that passed its checks: its manifest, and its library once this process
/// needs it.
#[derive(Debug)]
pub struct Plugin {
    manifest: Manifest,
    path: PathBuf,
    allow_insecure: bool,
    /// Its SHA-256 pin (`plugins.sha256`), checked again before every load.
    pin: Option<String>,
    library: OnceLock<Result<Library, LoadError>>,
}

impl Plugin {
    fn loaded(library: Library) -> Plugin {
        Plugin {
            manifest: library.manifest().clone(),
            path: library.path().to_owned(),
            allow_insecure: false,
            pin: None,
            library: OnceLock::from(Ok(library)),
        }
    }

    /// Whether its permission checks are skipped (`allow_insecure`).
    pub fn allow_insecure(&self) -> bool {
        self.allow_insecure
    }

    /// Its SHA-256 pin, when the config gives one.
    pub fn pin(&self) -> Option<&str> {
        self.pin.as_deref()
    }

    /// Every check of a load again, without loading (before an isolated child loads the
    /// file itself): permissions, ELF, pin.
    pub fn recheck(&self) -> Result<(), LoadError> {
        if !self.allow_insecure {
            security::check_plugin_file(&self.path).map_err(LoadError::Permissions)?;
        }
        elf::check_file(&self.path).map_err(LoadError::Elf)?;
        if let Some(pin) = &self.pin {
            pin::verify(&self.path, &self.manifest.name, pin).map_err(LoadError::Pin)?;
        }
        Ok(())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the library is mapped into this process.
    pub fn is_loaded(&self) -> bool {
        matches!(self.library.get(), Some(Ok(_)))
    }

    /// The library in this process, loaded on first use with every check of the first
    /// load again (the file may have changed since): permissions, ELF, probe, then the
    /// manifest must be the one checked. Blocks: call from a blocking thread. A failure
    /// stays: the file is not tried again before a restart.
    pub fn library(&self) -> Result<&Library, LoadError> {
        let loaded = self.library.get_or_init(|| {
            if let Some(pin) = &self.pin {
                pin::verify(&self.path, &self.manifest.name, pin).map_err(LoadError::Pin)?;
            }
            let library = open_checked(&self.path, self.allow_insecure)?;
            let (was, now) = (&self.manifest, library.manifest());
            if was != now {
                // Either the file changed after its check, or an older library at the
                // same path is already mapped (the loader hands that one back).
                return Err(LoadError::Changed {
                    checked: format!("{} {}", was.name, was.version),
                    loaded: format!("{} {}", now.name, now.version),
                });
            }
            tracing::debug!(plugin = %now.name, path = %self.path.display(), "plugin library mapped into warden");
            Ok(library)
        });
        loaded.as_ref().map_err(Clone::clone)
    }
}

/// A file that was not loaded, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadFailure {
    pub path: PathBuf,
    pub reason: LoadError,
}

/// Why a plugin file (or its directory) was not loaded: the check that refused it, in
/// the order the checks run. Each says what to do about it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    /// The file, a symlink's target or a directory above it can be written by others,
    /// or belongs to another user (StrictModes).
    #[error("{0}; or pass --allow-insecure-plugins for development")]
    Permissions(String),
    /// The directory could not be listed.
    #[error("cannot list directory: {0}")]
    Directory(String),
    /// Not a complete ELF shared object (truncated, still being copied, not a library).
    #[error("{0}")]
    Elf(String),
    /// The probe child refused the file, or could not say.
    #[error("{0}")]
    Probe(String),
    /// Its SHA-256 differs from its pin (`plugins.sha256`), or it could not be read.
    #[error("{0}")]
    Pin(String),
    /// The dynamic loader or the interface check refused it.
    #[error(transparent)]
    Library(#[from] warden_plugin_api::host::LoadError),
    /// The file mapped is not the one checked (changed since, or an older copy at the
    /// same path is mapped already).
    #[error("the file does not hold what warden checked (checked: {checked}, loaded: {loaded}); restart warden to use it")]
    Changed { checked: String, loaded: String },
    /// A plugin of the same name was found earlier (the first directory wins).
    #[error("plugin {name:?} is already loaded from {}", first.display())]
    Duplicate { name: String, first: PathBuf },
}

impl std::fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// Why an instance could not be created.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CreateError {
    #[error("no plugin named {name:?} is loaded (loaded: {loaded})")]
    UnknownPlugin { name: String, loaded: String },
    #[error("plugin {plugin:?} offers no {kind} (it offers: {offers})")]
    KindNotOffered {
        plugin: String,
        kind: Kind,
        offers: String,
    },
    #[error("config does not match plugin {plugin:?}'s schema: {}", errors.join("; "))]
    Schema { plugin: String, errors: Vec<String> },
    #[error("plugin {plugin:?} refused the config: {error}")]
    Plugin {
        plugin: String,
        error: warden_plugin_api::PluginError,
    },
}

/// All loaded plugins, and the files that failed.
#[derive(Debug, Default)]
pub struct PluginHost {
    plugins: Vec<Arc<Plugin>>,
    failures: Vec<LoadFailure>,
    /// How isolated children are started.
    child: isolated::ChildPolicy,
    /// Under `isolation = "auto"`, the directories whose plugins run in process
    /// (canonical paths).
    in_process_dirs: Vec<PathBuf>,
}

/// Checks one file: permissions (unless `allow_insecure`), the ELF structure (no code of
/// the file runs), then a probe in a child process, which reports the manifest; the
/// library itself is mapped into this process on first use ([`Plugin::library`]). Without
/// a probe (a library user such as a test) the file is loaded here at once.
pub fn load_file(path: &Path, allow_insecure: bool) -> Result<Plugin, LoadError> {
    load_file_pinned(path, allow_insecure, &std::collections::BTreeMap::new())
}

/// [`load_file`], with the SHA-256 pins by plugin name (checked once the probe has said
/// the file's name).
pub fn load_file_pinned(
    path: &Path,
    allow_insecure: bool,
    pins: &std::collections::BTreeMap<String, String>,
) -> Result<Plugin, LoadError> {
    let mut plugin = load_unpinned(path, allow_insecure)?;
    if let Some(pin) = pins.get(&plugin.manifest.name) {
        pin::verify(path, &plugin.manifest.name, pin).map_err(LoadError::Pin)?;
        plugin.pin = Some(pin.clone());
    }
    Ok(plugin)
}

fn load_unpinned(path: &Path, allow_insecure: bool) -> Result<Plugin, LoadError> {
    precheck(path, allow_insecure)?;
    match probe::in_child(path).map_err(LoadError::Probe)? {
        Some(report) if !report.ok => Err(refused(report)),
        Some(probe::Report {
            manifest: Some(manifest),
            ..
        }) => Ok(Plugin {
            manifest,
            path: path.to_owned(),
            allow_insecure,
            pin: None,
            library: OnceLock::new(),
        }),
        _ => Ok(Library::load(path).map(Plugin::loaded)?),
    }
}

/// The checks before any code of the file runs: permissions (unless `allow_insecure`),
/// then the ELF structure.
fn precheck(path: &Path, allow_insecure: bool) -> Result<(), LoadError> {
    if !allow_insecure {
        security::check_plugin_file(path).map_err(LoadError::Permissions)?;
    }
    elf::check_file(path).map_err(LoadError::Elf)
}

fn refused(report: probe::Report) -> LoadError {
    LoadError::Probe(
        report
            .reason
            .unwrap_or_else(|| "refused by the probe".to_owned()),
    )
}

/// Every check of [`load_file`], then the library mapped into this process.
fn open_checked(path: &Path, allow_insecure: bool) -> Result<Library, LoadError> {
    precheck(path, allow_insecure)?;
    if let Some(report) = probe::in_child(path).map_err(LoadError::Probe)? {
        if !report.ok {
            return Err(refused(report));
        }
    }
    Ok(Library::load(path)?)
}

impl PluginHost {
    /// Loads every `*.so` in `dirs`, in order; a missing directory is skipped.
    pub fn load_dirs(dirs: &[PathBuf], allow_insecure: bool) -> PluginHost {
        Self::load_dirs_pinned(dirs, allow_insecure, &std::collections::BTreeMap::new())
    }

    /// [`PluginHost::load_dirs`] with SHA-256 pins by plugin name.
    pub fn load_dirs_pinned(
        dirs: &[PathBuf],
        allow_insecure: bool,
        pins: &std::collections::BTreeMap<String, String>,
    ) -> PluginHost {
        let mut host = PluginHost::default();
        for dir in dirs {
            if !dir.is_dir() {
                tracing::debug!(dir = %dir.display(), "plugin directory absent, skipped");
                continue;
            }
            if !allow_insecure {
                if let Err(reason) = security::check_plugin_dir(dir) {
                    host.fail(dir.clone(), LoadError::Permissions(reason));
                    continue;
                }
            }
            let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
                Ok(entries) => entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "so"))
                    .collect(),
                Err(e) => {
                    host.fail(dir.clone(), LoadError::Directory(e.to_string()));
                    continue;
                }
            };
            files.sort();
            for file in files {
                host.load_one(&file, allow_insecure, pins);
            }
        }
        host
    }

    fn fail(&mut self, path: PathBuf, reason: LoadError) {
        tracing::warn!(path = %path.display(), reason = %reason, "plugin not loaded");
        self.failures.push(LoadFailure { path, reason });
    }

    /// How isolated children are started (user, limits).
    pub fn set_child_policy(&mut self, policy: isolated::ChildPolicy) {
        self.child = policy;
    }

    /// The directories whose plugins run in process under `isolation = "auto"`.
    pub fn set_in_process_dirs(&mut self, dirs: &[PathBuf]) {
        self.in_process_dirs = dirs
            .iter()
            .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()))
            .collect();
    }

    /// Where an instance of `plugin` runs when `wanted`: `auto` is in process for a
    /// file in `in_process_dirs` (or when no process can be started: a library user
    /// without the warden executable), in a process for any other.
    pub fn resolve(
        &self,
        wanted: crate::plugins::Isolation,
        plugin: &Plugin,
    ) -> crate::plugins::Isolation {
        let dir = plugin
            .path()
            .parent()
            .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_owned()));
        resolve_isolation(
            wanted,
            dir.as_deref(),
            &self.in_process_dirs,
            probe::command().is_some(),
        )
    }

    fn load_one(
        &mut self,
        file: &Path,
        allow_insecure: bool,
        pins: &std::collections::BTreeMap<String, String>,
    ) {
        match load_file_pinned(file, allow_insecure, pins) {
            Ok(plugin) => {
                let name = &plugin.manifest().name;
                if let Some(first) = self.find(name) {
                    let reason = LoadError::Duplicate {
                        name: name.clone(),
                        first: first.path().to_owned(),
                    };
                    self.fail(file.to_owned(), reason);
                    return;
                }
                let m = plugin.manifest();
                tracing::info!(plugin = %m.name, version = %m.version, api = %m.api_version, kinds = %m.kind_names().join(","), path = %file.display(), "plugin loaded");
                self.plugins.push(Arc::new(plugin));
            }
            Err(reason) => self.fail(file.to_owned(), reason),
        }
    }

    pub fn plugins(&self) -> &[Arc<Plugin>] {
        &self.plugins
    }

    pub fn failures(&self) -> &[LoadFailure] {
        &self.failures
    }

    pub fn find(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.iter().find(|p| p.manifest().name == name)
    }

    fn loaded_names(&self) -> String {
        let names: Vec<&str> = self
            .plugins
            .iter()
            .map(|p| p.manifest().name.as_str())
            .collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    /// Checks an instance config against the plugin's schema, without running plugin code.
    pub fn check_config(
        &self,
        name: &str,
        kind: Kind,
        config: &serde_json::Value,
    ) -> Result<Arc<Plugin>, CreateError> {
        let plugin = self.find(name).ok_or_else(|| CreateError::UnknownPlugin {
            name: name.to_owned(),
            loaded: self.loaded_names(),
        })?;
        check_plugin_config(plugin, kind, config)?;
        Ok(plugin.clone())
    }

    /// Creates an instance and wraps it in a client with timeout and circuit breaker, in
    /// this process or in a child of its own (`options.isolation`).
    pub async fn create(
        &self,
        name: &str,
        kind: Kind,
        config: &serde_json::Value,
        options: CallOptions,
    ) -> Result<Arc<dyn PluginClient>, CreateError> {
        self.create_with_env(name, kind, config, options, &[]).await
    }

    /// [`PluginHost::create`]; an isolated instance's process gets the variables of
    /// warden's environment that `env` names, and no others.
    pub async fn create_with_env(
        &self,
        name: &str,
        kind: Kind,
        config: &serde_json::Value,
        options: CallOptions,
        env: &[String],
    ) -> Result<Arc<dyn PluginClient>, CreateError> {
        let plugin = self.check_config(name, kind, config)?;
        let options = CallOptions {
            isolation: self.resolve(options.isolation, &plugin),
            ..options
        };
        match options.isolation {
            crate::plugins::Isolation::Auto | crate::plugins::Isolation::InProcess => {
                let c: Arc<dyn PluginClient> =
                    create_instance(plugin, kind, config, options).await?;
                Ok(c)
            }
            crate::plugins::Isolation::Process => {
                let exe = probe::command().cloned().ok_or_else(|| CreateError::Plugin {
                    plugin: name.to_owned(),
                    error: warden_plugin_api::PluginError::new(
                        warden_plugin_api::ErrorKind::Config,
                        "process isolation needs the warden executable (it runs `warden plugin-host`)",
                    ),
                })?;
                let c: Arc<dyn PluginClient> = isolated::ProcessClient::start(
                    exe,
                    plugin.clone(),
                    kind,
                    config,
                    options,
                    isolated::ChildSettings {
                        policy: self.child.clone(),
                        env: isolated::pass_env(env),
                        create_timeout: Duration::from_secs(10),
                    },
                )
                .await?;
                Ok(c)
            }
        }
    }
}

/// Where an instance runs (pure): `auto` is in process for a plugin whose directory is
/// one of `in_process_dirs`, or when no child can be started (`can_spawn`), and in a
/// process for any other; an explicit choice stands.
pub fn resolve_isolation(
    wanted: crate::plugins::Isolation,
    dir: Option<&Path>,
    in_process_dirs: &[PathBuf],
    can_spawn: bool,
) -> crate::plugins::Isolation {
    use crate::plugins::Isolation;
    match wanted {
        Isolation::Auto => {
            let shipped = dir.is_some_and(|d| in_process_dirs.iter().any(|s| s == d));
            if shipped || !can_spawn {
                Isolation::InProcess
            } else {
                Isolation::Process
            }
        }
        other => other,
    }
}

/// Schema check of one instance config.
pub fn check_plugin_config(
    plugin: &Plugin,
    kind: Kind,
    config: &serde_json::Value,
) -> Result<(), CreateError> {
    let m = plugin.manifest();
    let offered = m.kind(kind).ok_or_else(|| CreateError::KindNotOffered {
        plugin: m.name.clone(),
        kind,
        offers: m.kind_names().join(", "),
    })?;
    schema::validate(&offered.config_schema, config).map_err(|errors| CreateError::Schema {
        plugin: m.name.clone(),
        errors,
    })
}

/// Creates an instance of an already-checked plugin (plugin code runs on a blocking thread).
pub async fn create_instance(
    plugin: Arc<Plugin>,
    kind: Kind,
    config: &serde_json::Value,
    options: CallOptions,
) -> Result<Arc<InProcessClient>, CreateError> {
    let name = plugin.manifest().name.clone();
    let text = config.to_string();
    let p = plugin.clone();
    let created = tokio::task::spawn_blocking(move || match p.library() {
        Ok(library) => library.create(kind, &text),
        Err(why) => Err(warden_plugin_api::PluginError::new(
            warden_plugin_api::ErrorKind::Config,
            format!("{}: {why}", p.path().display()),
        )),
    })
    .await
    .unwrap_or_else(|_| {
        Err(warden_plugin_api::PluginError::new(
            warden_plugin_api::ErrorKind::Panicked,
            "plugin panicked in create",
        ))
    });
    match created {
        Ok(raw) => Ok(Arc::new(InProcessClient::new(plugin, kind, raw, options))),
        Err(error) => Err(CreateError::Plugin {
            plugin: name,
            error,
        }),
    }
}

impl CallOptions {
    pub fn from_config(c: &crate::plugins::PluginsConfig) -> Self {
        CallOptions {
            timeout: Duration::from_millis(c.call_timeout_ms),
            breaker_failures: c.breaker_failures,
            breaker_rest: Duration::from_millis(c.breaker_open_ms),
            isolation: c.isolation,
        }
    }
}

#[cfg(test)]
mod isolation_tests {
    use super::*;
    use crate::plugins::Isolation;

    #[test]
    fn auto_runs_shipped_plugins_in_process_and_others_in_a_child() {
        let shipped = [PathBuf::from("/usr/lib/warden/plugins")];
        fn at(d: &str) -> Option<&Path> {
            Some(Path::new(d))
        }
        let r = |w, d, spawn| resolve_isolation(w, d, &shipped, spawn);
        assert_eq!(
            r(Isolation::Auto, at("/usr/lib/warden/plugins"), true),
            Isolation::InProcess
        );
        assert_eq!(
            r(Isolation::Auto, at("/etc/warden/plugins"), true),
            Isolation::Process
        );
        assert_eq!(r(Isolation::Auto, None, true), Isolation::Process);
        // A library user without the warden executable cannot start a child.
        assert_eq!(
            r(Isolation::Auto, at("/opt/x"), false),
            Isolation::InProcess
        );
        // An operator's choice stands either way.
        assert_eq!(
            r(Isolation::InProcess, at("/opt/x"), true),
            Isolation::InProcess
        );
        assert_eq!(
            r(Isolation::Process, at("/usr/lib/warden/plugins"), true),
            Isolation::Process
        );
    }
}
