//! The host's half of the boundary: opening a plugin file and calling it.
//!
//! Each file is opened with abi_stable's `lib_header_from_path` + `init_root_module`,
//! never `RootModule::load_from_*`: those load one fixed file name and cache one module
//! per interface type, so a second plugin would silently be the first. Libraries are
//! never unloaded (abi_stable leaks them on purpose); replace a plugin by atomic rename
//! and a restart, never by copying over the loaded file.

use std::future::Future;
use std::panic::catch_unwind;
use std::path::{Path, PathBuf};

use abi_stable::library::{lib_header_from_path, LibraryError};
use abi_stable::std_types::{RResult, RStr};

use crate::ffi::{InstanceBox, LogSink, PluginModRef};
use crate::{Kind, Manifest, PluginError};

/// Why a file could not be loaded as a plugin, in one short paragraph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open it as a shared library: {0}")]
    /// The file could not be opened as a shared library.
    Open(String),
    #[error(
        "not a warden plugin: it is a shared library, but it exports no abi_stable root module"
    )]
    /// The file is a shared library but not a warden plugin.
    NotAPlugin,
    #[error("built with an incompatible abi_stable: {0}")]
    /// abi_stable refused the library (its own message).
    AbiStable(String),
    #[error(
        "built against warden-plugin-api {found}, but this warden takes {major}.x \
         (it has {expected}): rebuild the plugin against warden-plugin-api {major}.x",
        major = expected.split('.').next().unwrap_or("?")
    )]
    /// Built against an incompatible major version of this crate.
    IncompatibleVersion {
        /// The version this host was built with.
        expected: String,
        /// The version the plugin was built with.
        found: String,
    },
    #[error("its interface does not match this warden's ({0}); rebuild it against this warden-plugin-api")]
    /// The frozen types do not have the layout this host expects.
    Layout(String),
    #[error("its manifest is unreadable: {0}")]
    /// The plugin's manifest could not be read.
    Manifest(String),
    #[error("it was built with panic = \"abort\": a panic in it would end warden")]
    /// Built with `panic = "abort"`: a panic could not be contained.
    NoUnwind,
    #[error("{0}")]
    /// Any other failure.
    Other(String),
}

/// The first line of a long error, with a count of what was left out.
fn first_lines(text: &str, keep: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut out = lines
        .iter()
        .take(keep)
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    if lines.len() > keep {
        out.push_str(&format!(
            " (and {} more lines of layout report)",
            lines.len() - keep
        ));
    }
    out
}

fn short_reason(err: LibraryError) -> LoadError {
    match err {
        LibraryError::OpenError { err, .. } => LoadError::Open(err.to_string()),
        LibraryError::GetSymbolError { .. } => LoadError::NotAPlugin,
        LibraryError::InvalidAbiHeader(h) => LoadError::AbiStable(format!("{h:?}")),
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => LoadError::IncompatibleVersion {
            expected: expected_version.to_string(),
            found: actual_version.to_string(),
        },
        LibraryError::AbiInstability(e) => LoadError::Layout(first_lines(&e.to_string(), 2)),
        LibraryError::Many(errs) => errs
            .into_iter()
            .next()
            .map(short_reason)
            .unwrap_or_else(|| LoadError::Other("unknown load error".into())),
        other => LoadError::Other(first_lines(&other.to_string(), 2)),
    }
}

/// A loaded plugin library.
pub struct Library {
    path: PathBuf,
    module: PluginModRef,
    manifest: Manifest,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("manifest", &self.manifest)
            .finish()
    }
}

/// Where plugin log events land: re-emitted on the host's `tracing` under the plugin's name.
extern "C" fn host_log_sink(
    level: u8,
    plugin: RStr<'_>,
    target: RStr<'_>,
    message: RStr<'_>,
    fields: RStr<'_>,
) {
    let _ = catch_unwind(|| {
        let (plugin, target, message, fields) = (
            plugin.as_str(),
            target.as_str(),
            message.as_str(),
            fields.as_str(),
        );
        match level {
            1 => {
                tracing::error!(target: "warden::plugin", plugin, source = target, fields, "{message}")
            }
            2 => {
                tracing::warn!(target: "warden::plugin", plugin, source = target, fields, "{message}")
            }
            3 => {
                tracing::info!(target: "warden::plugin", plugin, source = target, fields, "{message}")
            }
            4 => {
                tracing::debug!(target: "warden::plugin", plugin, source = target, fields, "{message}")
            }
            _ => {
                tracing::trace!(target: "warden::plugin", plugin, source = target, fields, "{message}")
            }
        }
    });
}

impl Library {
    /// Opens `path`, checks its interface and reads its manifest.
    pub fn load(path: &Path) -> Result<Library, LoadError> {
        let header = lib_header_from_path(path).map_err(short_reason)?;
        let module = header
            .init_root_module::<PluginModRef>()
            .map_err(short_reason)?;
        // No catch_unwind around the plugin's functions: they are `extern "C"`, so a
        // panic cannot unwind out of them into the host (the process would abort).
        // The plugin's side catches its panics (sdk::export) and returns them as
        // `panicked` errors; a plugin that lets one escape is for isolation to contain.
        let manifest_json = match (module.manifest())() {
            RResult::ROk(json) => json.into_string(),
            RResult::RErr(e) => return Err(LoadError::Manifest(PluginError::from(e).to_string())),
        };
        let manifest: Manifest =
            serde_json::from_str(&manifest_json).map_err(|e| LoadError::Manifest(e.to_string()))?;
        let major = |v: &str| v.split('.').next().map(str::to_owned);
        if major(&manifest.api_version) != major(crate::API_VERSION) {
            return Err(LoadError::IncompatibleVersion {
                expected: crate::API_VERSION.into(),
                found: manifest.api_version,
            });
        }
        if !manifest.unwind {
            return Err(LoadError::NoUnwind);
        }
        (module.set_log_sink())(LogSink {
            emit: host_log_sink,
        });
        Ok(Library {
            path: path.to_owned(),
            module,
            manifest,
        })
    }

    /// The file this plugin was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the plugin says of itself: name, version, kinds and their config schemas.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Creates an instance of `kind` from `config` (JSON text). Blocks while the plugin
    /// builds it: call from a blocking thread.
    pub fn create(&self, kind: Kind, config: &str) -> Result<RawInstance, PluginError> {
        let create = self.module.create();
        match create(RStr::from_str(kind.as_str()), RStr::from_str(config)) {
            RResult::ROk(inner) => Ok(RawInstance { inner }),
            RResult::RErr(e) => Err(e.into()),
        }
    }
}

/// One plugin instance, untyped: operation names and JSON text.
pub struct RawInstance {
    inner: InstanceBox,
}

impl RawInstance {
    /// Starts one call. Dropping the returned future cancels the plugin's work.
    pub fn call(
        &self,
        op: &str,
        args: &str,
    ) -> impl Future<Output = Result<String, PluginError>> + Send + 'static {
        // As in `create`: the plugin's side turns its panics into errors.
        let fut = self.inner.call(RStr::from_str(op), RStr::from_str(args));
        async move {
            match fut.await {
                RResult::ROk(json) => Ok(json.into_string()),
                RResult::RErr(e) => Err(e.into()),
            }
        }
    }

    /// Tells the instance no call follows.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_layout_reports_are_cut_to_their_first_lines() {
        let report = (0..1600)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let short = first_lines(&report, 2);
        assert_eq!(
            short,
            "line 0 line 1 (and 1598 more lines of layout report)"
        );
    }

    #[test]
    fn version_error_names_both_versions() {
        let e = LoadError::IncompatibleVersion {
            expected: "1.0.0".into(),
            found: "2.0.0".into(),
        };
        let text = e.to_string();
        assert!(
            text.contains("2.0.0") && text.contains("1.x") && text.contains("1.0.0"),
            "{text}"
        );
    }
}
