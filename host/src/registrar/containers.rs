//! The registrar's edge to Docker: list, inspect and follow events, behind a small trait
//! so that the registrar loop is tested with a fake in paused time ([`super::fakes`]).
//!
//! The bollard implementation is [`docker`](super::docker)'s functions; what crosses the
//! trait is already warden's own types (a [`Container`], an [`Event`] with the Docker
//! action it came from), so neither the loop nor its fake sees bollard.

use std::future::Future;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;

use super::docker;
use super::store::{Container, Event};

/// Docker did not answer, or answered with an error: the watcher reconnects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DockerError(pub String);

/// Why one container could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Vanished between an event and its inspection, or not running: nothing to do.
    #[error("container {0} is gone or not running")]
    Gone(String),
    #[error("docker: {0}")]
    Docker(#[from] DockerError),
}

/// A Docker event as the registrar reads it: the action (counted by type) and, for the
/// events it follows, what it means for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Docker's action (`start`, `health_status: healthy`...), if any.
    pub action: Option<String>,
    pub event: Option<Event>,
}

/// Docker, as the registrar uses it.
pub trait Containers: Send + Sync + 'static {
    /// Every running container, inspected.
    fn list_running(&self) -> impl Future<Output = Result<Vec<Container>, DockerError>> + Send;
    /// One container's details.
    fn inspect(&self, id: &str) -> impl Future<Output = Result<Container, InspectError>> + Send;
    /// Container and network events since `since` (seconds since the epoch), replayed
    /// from then; the stream ends or fails when Docker goes away.
    fn events(&self, since: i64) -> BoxStream<'static, Result<Seen, DockerError>>;
}

impl Containers for bollard::Docker {
    async fn list_running(&self) -> Result<Vec<Container>, DockerError> {
        docker::list_running(self).await
    }

    async fn inspect(&self, id: &str) -> Result<Container, InspectError> {
        docker::inspect(self, id).await
    }

    fn events(&self, since: i64) -> BoxStream<'static, Result<Seen, DockerError>> {
        docker::events(self, since)
            .map(|m| match m {
                Ok(msg) => Ok(Seen {
                    action: msg.action.clone(),
                    event: docker::to_event(&msg),
                }),
                Err(e) => Err(DockerError(e.to_string())),
            })
            .boxed()
    }
}
