//! The manager's port to what it measures: a metric source, and the plugin behind a
//! `Mapping::Plugin`. The manager knows no plugin machinery; the daemon adapts a plugin
//! slot to this trait (`daemon::adapters`), and the loop tests use fakes.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};
use warden_plugin_api::Measurement;

use crate::plugins::settings::Isolation;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source the leader reads once a loop per service.
pub(crate) trait Metric: Send + Sync {
    /// Where its instance runs, once created (shown by `warden status`).
    fn isolation(&self) -> Option<Isolation>;
    /// The current reading.
    fn measure(&self) -> BoxFuture<'_, Result<Measurement, MetricError>>;
    /// `value` through this source's table (a mapping plugin).
    fn map(&self, value: f64) -> BoxFuture<'_, Result<f64, MetricError>>;
}

/// Why there is no metric reading: the error's kind (`config`, `transient`, `timeout`,
/// `resting`, …) and its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MetricError {
    pub kind: String,
    pub message: String,
}

impl std::fmt::Display for MetricError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.kind)
    }
}
