//! The one crate a warden plugin depends on.
//!
//! Warden loads metric sources and service-definition providers from `.so` files that
//! operators drop into a directory. This crate is the contract between the daemon and
//! those files, and it is split in three so that each audience sees only its part:
//!
//! * [`ffi`]: the frozen binary interface (abi_stable). Nothing outside this crate names
//!   abi_stable, so a later move to another ABI crate is a change in one place.
//! * [`sdk`]: what plugin authors write against: the [`MetricSource`] and
//!   [`ServiceDefinitions`] traits, typed config, and [`export_plugin!`].
//! * [`host`]: what the daemon uses to open a plugin file and call it.
//!
//! Values cross the boundary as JSON ([`model`]), so a new capability is a new
//! operation name or a new JSON field, never a change of the frozen types.

#![deny(missing_docs)]

pub mod error;
pub mod ffi;
pub mod host;
pub mod manifest;
pub mod model;
#[cfg(feature = "schema")]
pub mod schema;
pub mod sdk;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::{ErrorKind, PluginError};
pub use manifest::{Kind, KindManifest, Manifest, Op};
pub use model::{ContainerMatch, ContainerView, ListArgs, Measurement, ServiceDefinition};
pub use sdk::{MetricSource, ServiceDefinitions};

/// The version of this interface crate a plugin or host was built with.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

// Re-exports so that a plugin depends on this crate alone.
pub use schemars;
pub use serde;
pub use serde_json;
pub use tokio;
pub use tracing;

/// Everything a plugin author usually needs, in one `use`.
pub mod prelude {
    pub use crate::export_plugin;
    pub use crate::model::{ContainerMatch, ContainerView, Measurement, ServiceDefinition};
    pub use crate::schemars::JsonSchema;
    pub use crate::serde::Deserialize;
    pub use crate::{ErrorKind, MetricSource, PluginError, ServiceDefinitions};
}

#[doc(hidden)]
pub mod __private {
    pub use crate::ffi::{export::*, __ROOT_MODULE_SYMBOL};
    pub use crate::sdk::export::*;
}
