//! What plugin authors write against; abi_stable never shows here.
//!
//! An author implements [`MetricSource`] and/or [`ServiceDefinitions`] with a typed config
//! (serde + schemars) and calls [`export_plugin!`](crate::export_plugin) once. The SDK
//! gives each plugin library its own tokio runtime (the host's runtime cannot drive the
//! plugin's copy of tokio), catches panics at every entry point, cancels work when the
//! host drops a call, and forwards the plugin's `tracing` events into warden's log.

use std::future::Future;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;

use crate::{ContainerView, Measurement, PluginError, ServiceDefinition};

pub mod export;
mod logging;
mod once;
mod runtime;
pub mod trust;

pub use once::SaidOnce;
pub use runtime::runtime;

/// A source of one metric value, read by warden's manager.
///
/// ```ignore
/// impl MetricSource for Queue {
///     type Config = QueueConfig;
///     async fn new(config: QueueConfig) -> Result<Self, PluginError> { ... }
///     async fn measure(&self) -> Result<Measurement, PluginError> { ... }
/// }
/// ```
pub trait MetricSource: Sized + Send + Sync + 'static {
    /// The instance's configuration; its JSON Schema is published in the manifest and
    /// checked by the host before [`MetricSource::new`] is called.
    type Config: DeserializeOwned + JsonSchema;

    /// Builds an instance. Runs on the plugin's own runtime.
    ///
    /// What warden does with the outcome (the daemon creates instances in the
    /// background; nothing else waits for them):
    /// * `Err` of kind [`crate::ErrorKind::Config`] on the first attempt: the
    ///   configuration cannot work, `warden run` exits 78 naming the `[metrics.<name>]`
    ///   (and a reload is refused); on a later attempt, retried every 5 minutes.
    /// * any other `Err` (transient, permanent, timeout, a panic): retried with backoff
    ///   from 1 s up to 60 s, each failure logged once then counted; the services that
    ///   use the source hold their count meanwhile.
    /// * no answer within `plugins.create_timeout_ms` (10 s): reported as hanging;
    ///   warden keeps waiting for that attempt.
    fn new(config: Self::Config) -> impl Future<Output = Result<Self, PluginError>> + Send;

    /// Reads the metric once. Runs in the plugin's runtime context; the host may drop the
    /// future (timeout, shutdown), which cancels it. Do not block the thread: use
    /// `tokio::task::spawn_blocking` for blocking work.
    fn measure(&self) -> impl Future<Output = Result<Measurement, PluginError>> + Send;

    /// Maps a value read from another metric (for example through a table, as the
    /// `s3-table` plugin does). Most sources do not map: the default says so.
    fn map(&self, value: f64) -> impl Future<Output = Result<f64, PluginError>> + Send {
        let _ = value;
        std::future::ready(Err(PluginError::unsupported(
            "this metric source does not map values",
        )))
    }
}

/// A provider of service definitions, read by warden's registrar and manager.
pub trait ServiceDefinitions: Sized + Send + Sync + 'static {
    /// The instance's configuration, read with serde; its JSON Schema is published.
    type Config: DeserializeOwned + JsonSchema;

    /// Creates an instance (connect clients, read files); see [`MetricSource::new`] for what a failure does.
    fn new(config: Self::Config) -> impl Future<Output = Result<Self, PluginError>> + Send;

    /// The current set of services.
    fn list(&self) -> impl Future<Output = Result<Vec<ServiceDefinition>, PluginError>> + Send;

    /// The current set of services, given the host's running containers. Providers that
    /// derive services from containers (docker-labels) implement this; the default
    /// ignores the containers and answers [`ServiceDefinitions::list`].
    fn list_for(
        &self,
        containers: Vec<ContainerView>,
    ) -> impl Future<Output = Result<Vec<ServiceDefinition>, PluginError>> + Send {
        drop(containers);
        self.list()
    }

    /// A number that changes whenever [`ServiceDefinitions::list`] would answer
    /// differently. Must be cheap: the host asks often and lists only on a change.
    fn generation(&self) -> impl Future<Output = Result<u64, PluginError>> + Send;
}
