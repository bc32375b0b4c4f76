//! The frozen binary interface between warden and a plugin library.
//!
//! Everything here is part of warden-plugin-api 1.x's ABI and must never change: a host of
//! any 1.x loads a plugin of any 1.x. The root module is an abi_stable prefix type, so it
//! may only grow **at the end** (a new field after `create`, marked as not required); a
//! new ability is otherwise a new operation name or JSON field passed through
//! [`Instance::call`]. This is the only module that names abi_stable.

// The FFI itself: abi_stable's types and the exported functions are unsafe by nature.
#![allow(unsafe_code)]
#![allow(non_local_definitions)] // emitted by #[sabi_trait]

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, RResult, RStr, RString},
    StableAbi,
};
use async_ffi::FfiFuture;

/// An error as it crosses the boundary. `kind` is an [`crate::ErrorKind`] code.
#[repr(C)]
#[derive(StableAbi, Debug, Clone)]
pub struct FfiError {
    /// An [`crate::ErrorKind`] code.
    pub kind: u32,
    /// The error's message.
    pub message: RString,
    /// JSON text, or empty.
    pub detail: RString,
}

impl From<crate::PluginError> for FfiError {
    fn from(e: crate::PluginError) -> Self {
        FfiError {
            kind: e.kind.code(),
            message: e.message.into(),
            detail: e.detail.into(),
        }
    }
}

impl From<FfiError> for crate::PluginError {
    fn from(e: FfiError) -> Self {
        crate::PluginError {
            kind: crate::ErrorKind::from_code(e.kind),
            message: e.message.into_string(),
            detail: e.detail.into_string(),
        }
    }
}

/// Where a plugin sends its log events.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct LogSink {
    /// (level 1=error..5=trace, plugin name, target, message, fields as `key=value` text)
    pub emit: extern "C" fn(
        level: u8,
        plugin: RStr<'_>,
        target: RStr<'_>,
        message: RStr<'_>,
        fields: RStr<'_>,
    ),
}

/// The result of one call: JSON text or an error.
pub type CallResult = RResult<RString, FfiError>;

/// One instance of a kind, created from a config.
#[sabi_trait]
pub trait Instance: Send + Sync {
    /// Runs one operation. The future is polled by the host; dropping it cancels the work.
    fn call(&self, op: RStr<'_>, args: RStr<'_>) -> FfiFuture<CallResult>;

    /// Releases what the instance holds; no call follows.
    #[sabi(last_prefix_field)]
    fn shutdown(&self);
}

/// A boxed, type-erased instance.
pub type InstanceBox = Instance_TO<'static, RBox<()>>;

/// The root module every warden plugin library exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin's [`crate::Manifest`], as JSON.
    pub manifest: extern "C" fn() -> RResult<RString, FfiError>,
    /// Tells the plugin where to send its log events.
    pub set_log_sink: extern "C" fn(sink: LogSink),
    /// Creates an instance of `kind` from `config` (JSON).
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(kind: RStr<'_>, config: RStr<'_>) -> RResult<InstanceBox, FfiError>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "warden_plugin";
    const NAME: &'static str = "warden plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The exported symbol abi_stable looks up (what `#[export_root_module]` would name it).
/// Spelled out so that plugins need not depend on abi_stable themselves; a unit test
/// checks it against abi_stable's constant.
#[doc(hidden)]
#[macro_export]
macro_rules! __root_module_symbol {
    () => {
        "_1as_0lib_1header_0root_bmodule_bloader"
    };
}
#[doc(hidden)]
pub const __ROOT_MODULE_SYMBOL: &str = __root_module_symbol!();

#[doc(hidden)]
pub mod export {
    pub use super::{CallResult, FfiError, InstanceBox, LogSink, PluginMod, PluginModRef};
    pub use abi_stable::library::{
        __call_root_module_loader, CheckTypeLayout as __CheckTypeLayout, LibHeader as __LibHeader,
        RootModuleResult as __RootModuleResult,
    };
    pub use abi_stable::prefix_type::PrefixTypeTrait as __PrefixTypeTrait;
    pub use abi_stable::std_types::{RResult as __RResult, RStr as __RStr, RString as __RString};

    /// Builds the plugin's root module.
    pub fn root_module(
        manifest: extern "C" fn() -> CallResult,
        set_log_sink: extern "C" fn(LogSink),
        create: extern "C" fn(__RStr<'_>, __RStr<'_>) -> __RResult<InstanceBox, FfiError>,
    ) -> PluginModRef {
        PluginMod {
            manifest,
            set_log_sink,
            create,
        }
        .leak_into_prefix()
    }

    /// The header static a plugin exports.
    ///
    /// # Safety
    /// `constructor` must build the root module with [`root_module`].
    pub const unsafe fn lib_header(
        constructor: extern "C" fn() -> __RootModuleResult,
    ) -> __LibHeader {
        __LibHeader::from_constructor::<PluginModRef>(constructor, __CheckTypeLayout::Yes)
    }

    /// Wraps an instance for the boundary.
    pub fn instance_box<T: super::Instance + 'static>(instance: T) -> InstanceBox {
        super::Instance_TO::from_value(instance, abi_stable::sabi_trait::TD_Opaque)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_module_symbol_matches_abi_stable() {
        assert_eq!(
            super::__ROOT_MODULE_SYMBOL,
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }
}
