//! The glue behind [`export_plugin!`](crate::export_plugin): turns a plugin's typed traits
//! into the frozen root module, with a panic guard at every entry point.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use abi_stable::std_types::{RResult, RStr, RString};
use async_ffi::{FfiFuture, FutureExt as _};
use futures_util::FutureExt as _;
use serde::de::DeserializeOwned;

use super::runtime::{run_to_completion, InRuntime};
use super::{logging, MetricSource, ServiceDefinitions};
use crate::ffi::{export::instance_box, CallResult, FfiError, Instance, InstanceBox, LogSink};
use crate::{ErrorKind, Kind, KindManifest, Manifest, Op, PluginError};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type Factory = Box<
    dyn Fn(serde_json::Value) -> BoxFuture<Result<Arc<dyn Dispatch>, PluginError>> + Send + Sync,
>;

/// An instance as the SDK sees it: operations by name, JSON in and out.
pub trait Dispatch: Send + Sync + 'static {
    /// Runs the operation `op` with JSON `args`; answers JSON.
    fn call(self: Arc<Self>, op: String, args: String) -> BoxFuture<Result<String, PluginError>>;
}

/// What a plugin library offers; built once by `export_plugin!`.
pub struct PluginDescriptor {
    manifest: Manifest,
    factories: Vec<(Kind, Factory)>,
}

pub(crate) fn schema_of<C: schemars::JsonSchema>() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(C)).unwrap_or(serde_json::Value::Null)
}

fn parse_config<C: DeserializeOwned>(config: serde_json::Value) -> Result<C, PluginError> {
    serde_json::from_value(config).map_err(|e| PluginError::config(format!("invalid config: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, PluginError> {
    serde_json::to_string(value)
        .map_err(|e| PluginError::new(ErrorKind::InvalidResponse, e.to_string()))
}

impl PluginDescriptor {
    /// A plugin named `name` at `version`; `unwind` is whether panics unwind (they must).
    pub fn new(name: &str, version: &str, unwind: bool) -> Self {
        Self {
            manifest: Manifest {
                name: name.to_owned(),
                version: version.to_owned(),
                api_version: crate::API_VERSION.to_owned(),
                unwind,
                kinds: Vec::new(),
            },
            factories: Vec::new(),
        }
    }

    /// The manifest as built so far.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Offers the metric source `M`.
    pub fn metric_source<M: MetricSource>(mut self) -> Self {
        self.manifest.kinds.push(KindManifest {
            kind: Kind::MetricSource,
            config_schema: schema_of::<M::Config>(),
        });
        self.factories.push((
            Kind::MetricSource,
            Box::new(|config| match parse_config(config) {
                Ok(config) => {
                    let new = M::new(config);
                    Box::pin(async move { Ok(Arc::new(Metric(new.await?)) as Arc<dyn Dispatch>) })
                }
                Err(e) => Box::pin(std::future::ready(Err(e))),
            }),
        ));
        self
    }

    /// Offers the service-definition provider `S`.
    pub fn service_definitions<S: ServiceDefinitions>(mut self) -> Self {
        self.manifest.kinds.push(KindManifest {
            kind: Kind::ServiceDefinitions,
            config_schema: schema_of::<S::Config>(),
        });
        self.factories.push((
            Kind::ServiceDefinitions,
            Box::new(|config| match parse_config(config) {
                Ok(config) => {
                    let new = S::new(config);
                    Box::pin(async move { Ok(Arc::new(Services(new.await?)) as Arc<dyn Dispatch>) })
                }
                Err(e) => Box::pin(std::future::ready(Err(e))),
            }),
        ));
        self
    }

    /// Creates an instance in-process, without the FFI (for a plugin's own tests).
    pub fn create_local(
        &self,
        kind: Kind,
        config: serde_json::Value,
    ) -> Result<Arc<dyn Dispatch>, PluginError> {
        let factory = self
            .factories
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, f)| f)
            .ok_or_else(|| {
                PluginError::unsupported(format!("plugin {} offers no {kind}", self.manifest.name))
            })?;
        run_to_completion(factory(config), "create")
    }
}

struct Metric<M>(M);

impl<M: MetricSource> Dispatch for Metric<M> {
    fn call(self: Arc<Self>, op: String, args: String) -> BoxFuture<Result<String, PluginError>> {
        Box::pin(async move {
            match Op::parse(&op) {
                Some(Op::Measure) => to_json(&self.0.measure().await?),
                Some(Op::Map) => {
                    let a: crate::model::MapArgs = serde_json::from_str(&args)
                        .map_err(|e| PluginError::permanent(format!("map: bad arguments: {e}")))?;
                    to_json(&self.0.map(a.value).await?)
                }
                _ => Err(PluginError::unsupported(format!(
                    "metric-source has no operation {op:?}"
                ))),
            }
        })
    }
}

struct Services<S>(S);

impl<S: ServiceDefinitions> Dispatch for Services<S> {
    fn call(self: Arc<Self>, op: String, args: String) -> BoxFuture<Result<String, PluginError>> {
        Box::pin(async move {
            match Op::parse(&op) {
                Some(Op::List) => {
                    let args: Option<crate::ListArgs> = if args.trim().is_empty() {
                        None
                    } else {
                        serde_json::from_str(&args).map_err(|e| {
                            PluginError::permanent(format!("list: bad arguments: {e}"))
                        })?
                    };
                    match args {
                        Some(a) => to_json(&self.0.list_for(a.containers).await?),
                        None => to_json(&self.0.list().await?),
                    }
                }
                Some(Op::Generation) => to_json(&self.0.generation().await?),
                _ => Err(PluginError::unsupported(format!(
                    "service-definitions has no operation {op:?}"
                ))),
            }
        })
    }
}

/// Turns a caught panic's payload into an error.
pub fn panic_error(payload: Box<dyn Any + Send>, during: &str) -> PluginError {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    // The payload is dropped here, inside the plugin, where it was made.
    drop(payload);
    PluginError::new(
        ErrorKind::Panicked,
        format!("plugin panicked during {during}: {text}"),
    )
}

pub(crate) struct SdkInstance {
    pub(crate) inner: Arc<dyn Dispatch>,
    pub(crate) shut_down: AtomicBool,
}

impl Instance for SdkInstance {
    fn call(&self, op: RStr<'_>, args: RStr<'_>) -> FfiFuture<CallResult> {
        if self.shut_down.load(Ordering::Acquire) {
            let e: FfiError = PluginError::permanent("instance was shut down").into();
            return std::future::ready(RResult::RErr(e)).into_ffi();
        }
        let (op, args) = (op.to_string(), args.to_string());
        let during = format!("operation {op:?}");
        let inner = self.inner.clone();
        // Building the future may panic too, so it is built inside the guard.
        let fut = async move {
            let result = match catch_unwind(AssertUnwindSafe(|| inner.call(op, args))) {
                Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                Err(payload) => Err(payload),
            };
            match result {
                Ok(Ok(json)) => RResult::ROk(RString::from(json)),
                Ok(Err(e)) => RResult::RErr(e.into()),
                Err(payload) => RResult::RErr(panic_error(payload, &during).into()),
            }
        };
        InRuntime::new(fut).into_ffi()
    }

    fn shutdown(&self) {
        self.shut_down.store(true, Ordering::Release);
    }
}

/// Root-module entry: the manifest as JSON.
pub fn ffi_manifest(descriptor: fn() -> &'static PluginDescriptor) -> CallResult {
    match catch_unwind(|| to_json(descriptor().manifest())) {
        Ok(Ok(json)) => RResult::ROk(json.into()),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(payload) => RResult::RErr(panic_error(payload, "manifest").into()),
    }
}

/// Root-module entry: install the log forwarder.
pub fn ffi_set_log_sink(descriptor: fn() -> &'static PluginDescriptor, sink: LogSink) {
    let _ = catch_unwind(|| logging::install(sink, &descriptor().manifest().name));
}

/// Root-module entry: create an instance.
pub fn ffi_create(
    descriptor: fn() -> &'static PluginDescriptor,
    kind: RStr<'_>,
    config: RStr<'_>,
) -> RResult<InstanceBox, FfiError> {
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<InstanceBox, PluginError> {
        let kind = Kind::parse(kind.as_str())
            .ok_or_else(|| PluginError::unsupported(format!("unknown kind {:?}", kind.as_str())))?;
        let config: serde_json::Value = serde_json::from_str(config.as_str())
            .map_err(|e| PluginError::config(format!("config is not JSON: {e}")))?;
        let inner = descriptor().create_local(kind, config)?;
        Ok(instance_box(SdkInstance {
            inner,
            shut_down: AtomicBool::new(false),
        }))
    }));
    match result {
        Ok(Ok(instance)) => RResult::ROk(instance),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(payload) => RResult::RErr(panic_error(payload, "create").into()),
    }
}

/// Exports a warden plugin library.
///
/// ```ignore
/// warden_plugin_api::export_plugin! {
///     name: "queue-depth",
///     metric_source: QueueDepth,
/// }
/// ```
/// `metric_source` and `service_definitions` are each optional (give at least one).
/// A plugin must be built with unwinding panics: `panic = "abort"` is a compile error,
/// since a panic could then end warden itself.
#[macro_export]
macro_rules! export_plugin {
    (
        name: $name:literal
        $(, metric_source: $metric:ty)?
        $(, service_definitions: $services:ty)?
        $(,)?
    ) => {
        #[cfg(panic = "abort")]
        compile_error!(
            "warden plugins must be built with panic = \"unwind\": with panic = \"abort\" a \
             panic in the plugin would end warden itself. Remove `panic = \"abort\"` from the \
             profile that builds this plugin."
        );

        /// This library's descriptor (built on first use).
        #[doc(hidden)]
        pub fn __warden_plugin_descriptor() -> &'static $crate::__private::PluginDescriptor {
            static DESCRIPTOR: ::std::sync::OnceLock<$crate::__private::PluginDescriptor> =
                ::std::sync::OnceLock::new();
            DESCRIPTOR.get_or_init(|| {
                let descriptor = $crate::__private::PluginDescriptor::new(
                    $name,
                    ::core::env!("CARGO_PKG_VERSION"),
                    ::core::cfg!(panic = "unwind"),
                );
                $(let descriptor = descriptor.metric_source::<$metric>();)?
                $(let descriptor = descriptor.service_definitions::<$services>();)?
                descriptor
            })
        }

        #[doc(hidden)]
        extern "C" fn __warden_plugin_manifest() -> $crate::__private::CallResult {
            $crate::__private::ffi_manifest(__warden_plugin_descriptor)
        }

        #[doc(hidden)]
        extern "C" fn __warden_plugin_set_log_sink(sink: $crate::__private::LogSink) {
            $crate::__private::ffi_set_log_sink(__warden_plugin_descriptor, sink)
        }

        #[doc(hidden)]
        extern "C" fn __warden_plugin_create(
            kind: $crate::__private::__RStr<'_>,
            config: $crate::__private::__RStr<'_>,
        ) -> $crate::__private::__RResult<$crate::__private::InstanceBox, $crate::__private::FfiError> {
            $crate::__private::ffi_create(__warden_plugin_descriptor, kind, config)
        }

        #[doc(hidden)]
        fn __warden_plugin_root() -> $crate::__private::PluginModRef {
            $crate::__private::root_module(
                __warden_plugin_manifest,
                __warden_plugin_set_log_sink,
                __warden_plugin_create,
            )
        }

        #[doc(hidden)]
        extern "C" fn __warden_plugin_loader() -> $crate::__private::__RootModuleResult {
            $crate::__private::__call_root_module_loader(__warden_plugin_root)
        }

        #[doc(hidden)]
        #[export_name = $crate::__root_module_symbol!()]
        pub static __WARDEN_PLUGIN_ROOT: $crate::__private::__LibHeader =
            unsafe { $crate::__private::lib_header(__warden_plugin_loader) };
    };
}
