//! `warden run`: wires the parts together and runs them until shutdown.
//!
//! Each loop gets its clients and a shutdown receiver; nothing here decides anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use warden_plugin_api::Kind;

use crate::config::{Config, PluginRef};
use crate::manager::election::Timing;
use crate::manager::{ManagedService, Manager, Target};
use crate::plugins::{CallOptions, MetricClient, PluginClient, PluginHost, ServicesClient};
use crate::registrar::{self, redx::RedisRoutes, Registrar};

/// The plugin that gives service definitions when none is configured.
pub const DEFAULT_SOURCE: &str = "docker-labels";

/// Loads the AWS SDK's shared config: default credential chain, `AWS_REGION`,
/// `AWS_ENDPOINT_URL` (a moto_server in tests), bounded retries and timeouts.
pub async fn aws_config() -> aws_config::SdkConfig {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(RetryConfig::standard().with_max_attempts(5))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(Duration::from_secs(10))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
        .load()
        .await
}

/// Instance id from config, else EC2 instance metadata (IMDSv2).
async fn instance_id(config: &Config) -> Option<String> {
    if let Some(id) = &config.host.instance_id {
        return Some(id.clone());
    }
    let imds = aws_config::imds::client::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .read_timeout(Duration::from_millis(500))
        .max_attempts(2)
        .build();
    match imds.get("/latest/meta-data/instance-id").await {
        Ok(id) => Some(id.as_ref().to_owned()),
        Err(e) => {
            tracing::warn!(error = %e, "instance id unknown: set host.instance_id or WARDEN_INSTANCE_ID (not on EC2?); ELB membership is off");
            None
        }
    }
}

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
    let mut metrics: BTreeMap<String, Arc<dyn PluginClient>> = BTreeMap::new();
    for (name, r) in &config.metrics {
        match host
            .create(&r.plugin, Kind::MetricSource, &r.config, options)
            .await
        {
            Ok(c) => {
                metrics.insert(name.clone(), c);
            }
            Err(e) => tracing::error!(metric = %name, "metric source not created: {e}"),
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();

    if let Some(url) = &config.manager.central_redis {
        let central = redis::Client::open(url.as_str())
            .map_err(|e| anyhow::anyhow!("manager.central_redis: {e}"))?;
        let id = instance_id(&config).await.unwrap_or_else(hostname);
        let az = config
            .host
            .availability_zone
            .clone()
            .unwrap_or_else(|| "unknown".into());
        let mut services = Vec::new();
        for s in &config.manager.services {
            let Some(metric) = metrics.get(&s.metric) else {
                tracing::error!(service = %s.name, metric = %s.metric, "managed service skipped: its metric source was not created");
                continue;
            };
            services.push(ManagedService {
                name: s.name.clone(),
                cluster: s.cluster.clone(),
                target: match (&s.task_definition, &s.ecs_service) {
                    (Some(t), _) => Target::Tasks {
                        task_definition: t.clone(),
                    },
                    (None, Some(svc)) => Target::Service {
                        service: svc.clone(),
                    },
                    (None, None) => unreachable!("checked by the config"),
                },
                metric: MetricClient(metric.clone()),
                mapper: match &s.mapping {
                    crate::manager::policy::Mapping::Plugin(name) => match metrics.get(name) {
                        Some(m) => Some(MetricClient(m.clone())),
                        None => {
                            tracing::error!(service = %s.name, mapping = %name, "managed service skipped: its mapping plugin was not created");
                            continue;
                        }
                    },
                    _ => None,
                },
                mapping: s.mapping.clone(),
                policy: s.policy.clone(),
            });
        }
        let sdk = aws_config().await;
        let ecs = if config.manager.dry_run {
            None
        } else {
            Some(aws_sdk_ecs::Client::new(&sdk))
        };
        let ec2 = Some(aws_sdk_ec2::Client::new(&sdk));
        let m = &config.manager;
        let manager = Manager {
            id: id.clone(),
            az,
            central,
            timing: Timing {
                lease: Duration::from_millis(m.lease_ms),
                tick: Duration::from_millis(m.tick_ms),
                guard: Duration::from_millis(m.guard_ms),
            },
            loop_interval: Duration::from_secs(m.loop_secs),
            services,
            ecs,
            ec2,
        };
        tracing::info!(instance = %id, services = manager.services.len(), dry_run = m.dry_run, "manager started");
        tasks.spawn(manager.run(stop_rx.clone()));
    }

    if config.registrar.enabled {
        let docker = bollard::Docker::connect_with_defaults()
            .map_err(|e| anyhow::anyhow!("cannot set up the Docker client (DOCKER_HOST?): {e}"))?;
        let instance = instance_id(&config).await;
        let owner = instance.clone().unwrap_or_else(hostname);
        let routes = RedisRoutes::new(&config.registrar.local_redis, &owner)
            .map_err(|e| anyhow::anyhow!("registrar.local_redis: {e}"))?;
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
        if let Some(instance) = instance {
            let client = aws_sdk_elasticloadbalancing::Client::new(&aws_config().await);
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
            }
            .run(stop)
            .await
        });
    }

    tracing::info!(
        plugins = host.plugins().len(),
        failed = host.failures().len(),
        metrics = metrics.len(),
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
    for m in metrics.values() {
        m.shutdown();
    }
    Ok(())
}
