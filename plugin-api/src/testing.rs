//! Testing a plugin from its own crate, exactly as warden will call it.
//!
//! Enable the feature in the plugin's `Cargo.toml`:
//!
//! ```toml
//! [dev-dependencies]
//! warden-plugin-api = { version = "1", features = ["testing"] }
//! ```
//!
//! [`metric_source`] (and [`service_definitions`]) create an instance the way the host
//! does: the config is checked against the JSON Schema your `Config` publishes (an error
//! names the field), turned into JSON text and parsed again by the SDK, and `new` runs on
//! the plugin's own runtime inside the panic guard. Each call then goes through the same
//! guard and the same JSON encoding as a call from warden, so a panic comes back as an
//! error of kind `panicked`, a non-finite value is refused, and an unsupported
//! operation says so.
//!
//! Calls are `async`. A test runs them with tokio's test attribute, through this crate
//! (a plugin needs no tokio dependency of its own):
//!
//! ```ignore
//! #[warden_plugin_api::tokio::test(crate = "warden_plugin_api::tokio")]
//! async fn measures_the_configured_value() {
//!     let source = warden_plugin_api::testing::metric_source::<Constant>(
//!         serde_json::json!({ "value": 3.0 }),
//!     )
//!     .unwrap();
//!     assert_eq!(source.measure().await.unwrap().value, 3.0);
//! }
//! ```

use std::sync::atomic::AtomicBool;

use abi_stable::std_types::{RResult, RStr};
use serde::de::DeserializeOwned;

use crate::ffi::Instance;
use crate::model::{ContainerView, ListArgs, MapArgs};
use crate::sdk::export::{schema_of, PluginDescriptor, SdkInstance};
use crate::{
    ErrorKind, Kind, Measurement, MetricSource, Op, PluginError, ServiceDefinition,
    ServiceDefinitions,
};

/// An instance created as warden creates it, called as warden calls it.
pub struct TestInstance {
    inner: SdkInstance,
}

/// Creates an instance of the metric source `M` from `config`, as the host does.
pub fn metric_source<M: MetricSource>(
    config: serde_json::Value,
) -> Result<TestInstance, PluginError> {
    check_schema(&schema_of::<M::Config>(), &config)?;
    create(
        PluginDescriptor::new("test", "0.0.0", true).metric_source::<M>(),
        Kind::MetricSource,
        config,
    )
}

/// Creates an instance of the service-definition provider `S` from `config`.
pub fn service_definitions<S: ServiceDefinitions>(
    config: serde_json::Value,
) -> Result<TestInstance, PluginError> {
    check_schema(&schema_of::<S::Config>(), &config)?;
    create(
        PluginDescriptor::new("test", "0.0.0", true).service_definitions::<S>(),
        Kind::ServiceDefinitions,
        config,
    )
}

fn check_schema(schema: &serde_json::Value, config: &serde_json::Value) -> Result<(), PluginError> {
    crate::schema::validate(schema, config).map_err(|errors| PluginError::config(errors.join("; ")))
}

fn create(
    descriptor: PluginDescriptor,
    kind: Kind,
    config: serde_json::Value,
) -> Result<TestInstance, PluginError> {
    // Through JSON text, as across the boundary.
    let text = serde_json::to_string(&config).map_err(|e| PluginError::config(e.to_string()))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PluginError::config(e.to_string()))?;
    let inner = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        descriptor.create_local(kind, config)
    }))
    .map_err(|p| crate::sdk::export::panic_error(p, "create"))??;
    Ok(TestInstance {
        inner: SdkInstance {
            inner,
            shut_down: AtomicBool::new(false),
        },
    })
}

impl TestInstance {
    /// Calls operation `op` with JSON `args`; the JSON answer.
    pub async fn call(&self, op: &str, args: &str) -> Result<String, PluginError> {
        match self
            .inner
            .call(RStr::from_str(op), RStr::from_str(args))
            .await
        {
            RResult::ROk(text) => Ok(text.into_string()),
            RResult::RErr(e) => Err(e.into()),
        }
    }

    async fn call_as<T: DeserializeOwned>(&self, op: &str, args: &str) -> Result<T, PluginError> {
        let text = self.call(op, args).await?;
        serde_json::from_str(&text).map_err(|e| {
            PluginError::new(
                ErrorKind::InvalidResponse,
                format!("{op}: unreadable answer {text:?}: {e}"),
            )
        })
    }

    /// `measure`, as the manager calls it; a non-finite value is refused as warden does.
    pub async fn measure(&self) -> Result<Measurement, PluginError> {
        let m: Measurement = self.call_as(Op::Measure.as_str(), "").await?;
        if m.value.is_finite() {
            Ok(m)
        } else {
            Err(PluginError::new(
                ErrorKind::InvalidResponse,
                "measure: value is not a finite number",
            ))
        }
    }

    /// `map`, as a `mapping = { plugin = ... }` calls it.
    pub async fn map(&self, value: f64) -> Result<f64, PluginError> {
        let args = serde_json::to_string(&MapArgs { value }).expect("a number serializes");
        self.call_as(Op::Map.as_str(), &args).await
    }

    /// `list` (with the host's containers, as the registrar calls it).
    pub async fn list_for(
        &self,
        containers: Vec<ContainerView>,
    ) -> Result<Vec<ServiceDefinition>, PluginError> {
        let args = serde_json::to_string(&ListArgs { containers }).expect("containers serialize");
        self.call_as(Op::List.as_str(), &args).await
    }

    /// `generation`.
    pub async fn generation(&self) -> Result<u64, PluginError> {
        self.call_as(Op::Generation.as_str(), "").await
    }
}
