//! Where the parts meet the plugin host: a plugin slot as the manager's [`Metric`] and
//! as a [`DefinitionSource`] of managed services. The manager names no plugin type; the
//! composition root is the one place that knows both sides.

use warden_plugin_api::{Measurement, ServiceDefinition};

use crate::manager::metric::BoxFuture;
use crate::manager::sources::DefinitionSource;
use crate::manager::{Metric, MetricError};
use crate::plugins::slot::{NotCreated, Slot};
use crate::plugins::{CallError, Isolation, MetricClient, ServicesClient};

impl Metric for Slot {
    fn isolation(&self) -> Option<Isolation> {
        self.get().ok().map(|c| c.isolation())
    }
    fn measure(&self) -> BoxFuture<'_, Result<Measurement, MetricError>> {
        Box::pin(async move {
            let client = self
                .get()
                .map_err(|nc| not_created("metric source", self.name(), &nc))?;
            MetricClient(client)
                .measure()
                .await
                .map_err(|e| from_call(&e))
        })
    }
    fn map(&self, value: f64) -> BoxFuture<'_, Result<f64, MetricError>> {
        Box::pin(async move {
            let client = self
                .get()
                .map_err(|nc| not_created("mapping plugin", self.name(), &nc))?;
            MetricClient(client)
                .map(value)
                .await
                .map_err(|e| from_call(&e))
        })
    }
}

fn not_created(role: &str, name: &str, nc: &NotCreated) -> MetricError {
    MetricError {
        kind: nc.kind.clone(),
        message: format!("{role} {name}: {nc}"),
    }
}

/// A failed call as the manager records it: the plugin error's kind, or for a resting
/// instance the kind of the failure that made it rest.
fn from_call(e: &CallError) -> MetricError {
    let kind = match e {
        CallError::Failed { error, .. } => error.kind.as_str().to_owned(),
        CallError::Resting { last, .. } => last.as_ref().map_or("resting".to_owned(), |e| {
            format!("resting after {}", e.kind)
        }),
    };
    MetricError {
        kind,
        message: e.to_string(),
    }
}

/// A source whose instance may not be created yet: until it is, it fails (and its last
/// good list, if any, is kept).
impl DefinitionSource for Slot {
    async fn generation(&self) -> Result<u64, String> {
        let client = self.get().map_err(|nc| format!("{}: {nc}", self.name()))?;
        ServicesClient(client)
            .generation()
            .await
            .map_err(|e| e.to_string())
    }
    async fn list(&self) -> Result<Vec<ServiceDefinition>, String> {
        let client = self.get().map_err(|nc| format!("{}: {nc}", self.name()))?;
        ServicesClient(client)
            .list()
            .await
            .map_err(|e| e.to_string())
    }
}

impl DefinitionSource for ServicesClient {
    async fn generation(&self) -> Result<u64, String> {
        ServicesClient::generation(self)
            .await
            .map_err(|e| e.to_string())
    }
    async fn list(&self) -> Result<Vec<ServiceDefinition>, String> {
        ServicesClient::list(self).await.map_err(|e| e.to_string())
    }
}
