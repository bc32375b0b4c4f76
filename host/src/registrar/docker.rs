//! Reading Docker: a running container's details, and events reduced to store events.
//!
//! Errors are sorted where they happen: a container that vanished between an event and
//! its inspection is [`InspectError::Gone`] (normal, nothing to do); anything else means
//! Docker itself is not answering and the watcher reconnects.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bollard::models::{
    ContainerInspectResponse, EventMessage, EventMessageTypeEnum, HealthStatusEnum,
};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::Docker;
use futures_util::{stream, StreamExt, TryStreamExt};

use super::store::{Container, Event, Health};

use super::containers::DockerError;
pub use super::containers::InspectError;

fn docker_error(e: bollard::errors::Error) -> DockerError {
    DockerError(e.to_string())
}

/// Builds a [`Container`] from `docker inspect`; `None` if it is not running.
pub fn from_inspect(i: ContainerInspectResponse) -> Option<Container> {
    let state = i.state.as_ref()?;
    if state.running != Some(true) {
        return None;
    }
    let config = i.config.as_ref();
    let labels: BTreeMap<String, String> = config
        .and_then(|c| c.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let exposed_tcp: BTreeSet<u16> = config
        .and_then(|c| c.exposed_ports.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.strip_suffix("/tcp").and_then(|n| n.parse().ok()))
        .collect();
    let networks: BTreeMap<String, String> = i
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, ep)| {
            ep.ip_address
                .filter(|ip| !ip.is_empty())
                .map(|ip| (name, ip))
        })
        .collect();
    let health = match state.health.as_ref().and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Health::Starting,
        Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
        _ => Health::None,
    };
    Some(Container {
        id: i.id.clone()?,
        name: i
            .name
            .clone()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        image: config.and_then(|c| c.image.clone()).unwrap_or_default(),
        labels,
        networks,
        exposed_tcp,
        health,
        started_at: state.started_at.clone().unwrap_or_default(),
        stopping: false,
        paused: state.paused == Some(true),
    })
}

pub async fn inspect(docker: &Docker, id: &str) -> Result<Container, InspectError> {
    match docker.inspect_container(id, None).await {
        Ok(i) => from_inspect(i).ok_or_else(|| InspectError::Gone(id.to_owned())),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Err(InspectError::Gone(id.to_owned())),
        Err(e) => Err(InspectError::Docker(docker_error(e))),
    }
}

/// Lists and inspects every running container (8 inspections at a time).
pub async fn list_running(docker: &Docker) -> Result<Vec<Container>, DockerError> {
    let ids: Vec<String> = docker
        .list_containers(Some(ListContainersOptions {
            all: false,
            ..Default::default()
        }))
        .await
        .map_err(docker_error)?
        .into_iter()
        .filter_map(|c| c.id)
        .collect();
    let inspected: Vec<Option<Container>> = stream::iter(ids)
        .map(|id| async move {
            match inspect(docker, &id).await {
                Ok(c) => Ok(Some(c)),
                Err(InspectError::Gone(_)) => Ok(None),
                Err(InspectError::Docker(e)) => Err(e),
            }
        })
        .buffer_unordered(8)
        .try_collect()
        .await?;
    Ok(inspected.into_iter().flatten().collect())
}

/// The event stream, replaying from `since` (seconds since the epoch) so that nothing
/// that happened while the containers were listed is missed.
pub fn events(
    docker: &Docker,
    since: i64,
) -> impl futures_util::Stream<Item = Result<EventMessage, bollard::errors::Error>> + Unpin {
    let filters = HashMap::from([(
        "type".to_string(),
        vec!["container".to_string(), "network".to_string()],
    )]);
    docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        until: None,
        filters: Some(filters),
    }))
}

/// Reduces a Docker event to a store event (`None`: not one the registrar follows).
pub fn to_event(msg: &EventMessage) -> Option<Event> {
    let actor = msg.actor.as_ref()?;
    let attrs = actor.attributes.as_ref();
    let attr = |k: &str| attrs.and_then(|a| a.get(k)).cloned();
    let action = msg.action.as_deref()?;
    match msg.typ {
        Some(EventMessageTypeEnum::CONTAINER) => {
            let id = actor.id.clone()?;
            Some(match action {
                "start" => Event::Start(id),
                "kill" => Event::Kill {
                    id,
                    signal: attr("signal").unwrap_or_default(),
                },
                "stop" => Event::Stop(id),
                "die" => Event::Die(id),
                "destroy" => Event::Destroy(id),
                "pause" => Event::Pause(id),
                "unpause" => Event::Unpause(id),
                "rename" => Event::Changed(id),
                a if a.starts_with("health_status") => Event::Health {
                    id,
                    status: Health::parse(a.split_once(':').map_or("", |(_, s)| s)),
                },
                _ => return None,
            })
        }
        Some(EventMessageTypeEnum::NETWORK) if matches!(action, "connect" | "disconnect") => {
            attr("container").map(Event::Changed)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    fn msg(
        typ: EventMessageTypeEnum,
        action: &str,
        id: &str,
        attrs: &[(&str, &str)],
    ) -> EventMessage {
        EventMessage {
            typ: Some(typ),
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some(id.into()),
                attributes: Some(
                    attrs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn container_events() {
        use EventMessageTypeEnum::CONTAINER as C;
        assert_eq!(
            to_event(&msg(C, "start", "a", &[])),
            Some(Event::Start("a".into()))
        );
        assert_eq!(
            to_event(&msg(C, "kill", "a", &[("signal", "15")])),
            Some(Event::Kill {
                id: "a".into(),
                signal: "15".into()
            })
        );
        assert_eq!(
            to_event(&msg(C, "health_status: healthy", "a", &[])),
            Some(Event::Health {
                id: "a".into(),
                status: Health::Healthy
            })
        );
        assert_eq!(to_event(&msg(C, "exec_start: sh", "a", &[])), None);
    }

    #[test]
    fn network_events_name_the_container() {
        let m = msg(
            EventMessageTypeEnum::NETWORK,
            "connect",
            "net-id",
            &[("container", "abc"), ("name", "front")],
        );
        assert_eq!(to_event(&m), Some(Event::Changed("abc".into())));
        let m = msg(EventMessageTypeEnum::NETWORK, "create", "net-id", &[]);
        assert_eq!(to_event(&m), None);
    }
}
