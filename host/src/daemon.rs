//! `warden run`: wires the parts together and runs them until shutdown.
//!
//! Each loop gets its clients and a shutdown receiver; nothing here decides anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use warden_plugin_api::Kind;

use crate::config::{Config, PluginRef};
use crate::identity;
use crate::manager::ecs::AwsEcs;
use crate::manager::election::Timing;
use crate::manager::policy::Mapping;
use crate::manager::{ManagedService, Manager, Target};
use crate::plugins::slot::Slot;
use crate::plugins::{CallOptions, PluginHost, ServicesClient};
use crate::registrar::{self, redx, Registrar};

/// The plugin that gives service definitions when none is configured.
pub const DEFAULT_SOURCE: &str = "docker-labels";

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Creates the service sources, retrying until every one is created (a source that
/// cannot start must not make its services' routes disappear).
async fn sources(
    host: &PluginHost,
    refs: &[PluginRef],
    options: CallOptions,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Vec<ServicesClient>> {
    let default = [PluginRef {
        plugin: DEFAULT_SOURCE.into(),
        config: serde_json::json!({}),
    }];
    let refs = if refs.is_empty() { &default[..] } else { refs };
    loop {
        let mut out = Vec::new();
        let mut failed = false;
        for (i, r) in refs.iter().enumerate() {
            match host
                .create(&r.plugin, Kind::ServiceDefinitions, &r.config, options)
                .await
            {
                Ok(c) => out.push(ServicesClient(c)),
                Err(e) => {
                    tracing::error!(
                        source = i,
                        "service source not created; the registrar waits for it: {e}"
                    );
                    failed = true;
                }
            }
        }
        if !failed {
            return Some(out);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

/// Managed services from the config, each with its metric (and mapping) plugin slot.
fn managed_services(
    config: &Config,
    slots: &BTreeMap<String, Slot>,
) -> anyhow::Result<Vec<ManagedService>> {
    let mut out = Vec::new();
    for s in &config.manager.services {
        let target = match (&s.task_definition, &s.ecs_service) {
            (Some(t), _) => Target::Tasks {
                task_definition: t.clone(),
                family: crate::manager::ecs::family_of(t)
                    .map_err(anyhow::Error::msg)?
                    .to_owned(),
            },
            (None, Some(svc)) => Target::Service {
                service: svc.clone(),
            },
            (None, None) => anyhow::bail!(
                "manager.services {}: no target (checked by the config)",
                s.name
            ),
        };
        let slot = |name: &str| {
            slots
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no [metrics.{name}] (checked by the config)"))
        };
        out.push(ManagedService {
            name: s.name.clone(),
            cluster: s.cluster.clone(),
            target,
            metric: slot(&s.metric)?,
            mapper: match &s.mapping {
                Mapping::Plugin(name) => Some(slot(name)?),
                _ => None,
            },
            mapping: s.mapping.clone(),
            policy: s.policy.clone(),
        });
    }
    Ok(out)
}

/// Runs warden until `shutdown` resolves.
pub async fn run(
    config: Config,
    insecure: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let host = Arc::new(PluginHost::load_dirs(
        &config.plugins.dirs,
        insecure || config.plugins.allow_insecure,
    ));
    let options = CallOptions::from_config(&config.plugins);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let me = identity::resolve(&config.host).await;
    // One AWS configuration for every client, loaded only when something needs AWS.
    let needs_aws = config.manager.central_redis.is_some()
        || (config.registrar.enabled && me.instance_id.is_some());
    let sdk = if needs_aws {
        Some(crate::aws::load(me.availability_zone.as_deref()).await)
    } else {
        None
    };

    // Metric sources are created in the background, with a timeout and retries: a plugin
    // whose `new` hangs or fails holds up nothing else.
    let create_timeout = Duration::from_millis(config.plugins.create_timeout_ms);
    let slots: BTreeMap<String, Slot> = config
        .metrics
        .iter()
        .map(|(name, r)| {
            let slot = Slot::spawn(
                host.clone(),
                &format!("metrics.{name}"),
                r,
                Kind::MetricSource,
                options,
                create_timeout,
                stop_rx.clone(),
            );
            (name.clone(), slot)
        })
        .collect();

    if let (Some(url), Some(sdk)) = (&config.manager.central_redis, &sdk) {
        let central = redis::Client::open(url.as_str()).map_err(|e| {
            anyhow::anyhow!(
                "manager.central_redis {}: {}",
                crate::redis_util::addr(url),
                crate::redis_util::describe(&e)
            )
        })?;
        let id = me.instance_id.clone().unwrap_or_else(hostname);
        let az = me
            .availability_zone
            .clone()
            .unwrap_or_else(|| "unknown".into());
        let m = &config.manager;
        let manager = Manager {
            id: id.clone(),
            az,
            central,
            central_addr: crate::redis_util::addr(url),
            timing: Timing {
                lease: Duration::from_millis(m.lease_ms),
                tick: Duration::from_millis(m.tick_ms),
                guard: Duration::from_millis(m.guard_ms),
            },
            loop_interval: Duration::from_secs(m.loop_secs),
            services: managed_services(&config, &slots)?,
            ecs: (!m.dry_run).then(|| AwsEcs::new(sdk)),
            ec2: Some(aws_sdk_ec2::Client::new(sdk)),
        };
        tracing::info!(instance = %id, services = manager.services.len(), dry_run = m.dry_run, "manager started");
        tasks.spawn(manager.run(stop_rx.clone()));
    }

    if config.registrar.enabled {
        let docker = bollard::Docker::connect_with_defaults()
            .map_err(|e| anyhow::anyhow!("cannot set up the Docker client (DOCKER_HOST?): {e}"))?;
        let owner = me.instance_id.clone().unwrap_or_else(hostname);
        let routes = redx::Routes::new(
            redx::RedisStore::new(&config.registrar.local_redis, &owner)
                .map_err(|e| anyhow::anyhow!("registrar.local_redis: {e}"))?,
        );
        let (elb_tx, elb_rx) = watch::channel(BTreeMap::new());
        let (ports_tx, ports_rx) = watch::channel(BTreeSet::new());
        if let Some(file) = config.registrar.router_ports_file.clone() {
            tasks.spawn(registrar::router::run(
                file,
                config.registrar.router_pid_file.clone(),
                ports_rx,
                stop_rx.clone(),
            ));
        }
        if let (Some(instance), Some(sdk)) = (me.instance_id.clone(), &sdk) {
            let client = aws_sdk_elasticloadbalancing::Client::new(sdk);
            tasks.spawn(registrar::elb::run(
                client,
                instance,
                elb_rx,
                stop_rx.clone(),
            ));
        }
        let (refs, resync) = (
            config.registrar.sources.clone(),
            Duration::from_secs(config.registrar.resync_secs),
        );
        let drain_on_stop = config.registrar.drain_on_stop;
        let selector = config
            .registrar
            .require_label
            .as_deref()
            .map(registrar::store::Selector::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("registrar.require_label: {e}"))?;
        let host = host.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let Some(sources) = sources(&host, &refs, options, &mut stop).await else {
                return;
            };
            tracing::info!(owner = %owner, sources = sources.len(), "registrar started");
            Registrar {
                docker,
                sources,
                routes,
                resync,
                drain_on_stop,
                elbs: elb_tx,
                ports: ports_tx,
                selector,
            }
            .run(stop)
            .await
        });
    }

    tracing::info!(
        plugins = host.plugins().len(),
        failed = host.failures().len(),
        metrics = slots.len(),
        registrar = config.registrar.enabled,
        "warden running; waiting for SIGTERM or SIGINT"
    );
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    for slot in slots.values() {
        if let Ok(c) = slot.get() {
            c.shutdown();
        }
    }
    Ok(())
}
