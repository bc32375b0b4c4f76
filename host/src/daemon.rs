//! `warden run`: wires the parts together and runs them until shutdown.
//!
//! Each loop gets its clients and a shutdown receiver; nothing here decides anything.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, OnceCell};
use warden_plugin_api::{ErrorKind, Kind};

use crate::config::{Config, PluginRef, PluginsConfig};
use crate::identity;
use crate::manager::ecs::AwsEcs;
use crate::manager::election::Timing;
use crate::manager::policy::Mapping;
use crate::manager::{ManagedService, Manager, Target};
use crate::metrics::Dependency;
use crate::plugins::slot::Slot;
use crate::plugins::{CallOptions, CreateError, PluginHost, ServicesClient};
use crate::registrar::{self, redx, Registrar};
use crate::supervisor::{Fatal, Supervisor};

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
/// cannot start must not make its services' routes disappear). A source that refuses its
/// configuration is fatal: retrying cannot help until an operator fixes it.
async fn sources(
    host: &PluginHost,
    refs: &[PluginRef],
    options: CallOptions,
    mut shutdown: watch::Receiver<bool>,
    fatal: mpsc::UnboundedSender<Fatal>,
) -> Option<Vec<ServicesClient>> {
    let default = [PluginRef {
        plugin: DEFAULT_SOURCE.into(),
        config: serde_json::json!({}),
        isolation: None,
    }];
    let refs = if refs.is_empty() { &default[..] } else { refs };
    loop {
        let mut out = Vec::new();
        let mut failed = false;
        for (i, r) in refs.iter().enumerate() {
            let options = CallOptions {
                isolation: r.isolation.unwrap_or(options.isolation),
                ..options
            };
            match host
                .create(&r.plugin, Kind::ServiceDefinitions, &r.config, options)
                .await
            {
                Ok(c) => out.push(ServicesClient(c)),
                Err(e) if matches!(&e, CreateError::Plugin { error, .. } if error.kind != ErrorKind::Config) =>
                {
                    tracing::error!(
                        source = i,
                        "service source not created; the registrar waits for it: {e}"
                    );
                    failed = true;
                }
                Err(e) => {
                    let _ = fatal.send(Fatal::Config(format!("registrar.sources[{i}]: {e}")));
                    std::future::pending::<()>().await;
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

/// What makes a configuration unable to work, one line each: the same checks for
/// `warden check` and before `warden run` starts anything.
pub fn problems(config: &Config, host: &PluginHost) -> Vec<String> {
    let mut out = Vec::new();
    if config.plugins.dirs != PluginsConfig::default().dirs {
        for d in &config.plugins.dirs {
            if !d.is_dir() {
                out.push(format!(
                    "plugins.dirs: {} does not exist or is not a directory",
                    d.display()
                ));
            }
        }
    }
    let failed_loads = || {
        host.failures()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    };
    for (key, kind, r) in config.plugin_refs() {
        if let Err(e) = host.check_config(&r.plugin, kind, &r.config) {
            let mut line = format!("{key}: {e}");
            if matches!(e, CreateError::UnknownPlugin { .. }) && !host.failures().is_empty() {
                line.push_str(&format!(" (files not loaded: {})", failed_loads()));
            }
            out.push(line);
        }
    }
    let tls = [
        (
            "registrar.local_redis_ca_file",
            Some(&config.registrar.local_redis),
            &config.registrar.local_redis_ca_file,
        ),
        (
            "manager.central_redis_ca_file",
            config.manager.central_redis.as_ref(),
            &config.manager.central_redis_ca_file,
        ),
    ];
    for (key, url, ca) in tls {
        if let (Some(url), Some(ca)) = (url, ca) {
            if let Err(e) = crate::redis_util::open(url, Some(ca)) {
                out.push(format!("{key}: {e}"));
            }
        }
    }
    if config.registrar.enabled && config.registrar.sources.is_empty() {
        if let Err(e) = host.check_config(
            DEFAULT_SOURCE,
            Kind::ServiceDefinitions,
            &serde_json::json!({}),
        ) {
            out.push(format!(
                "registrar: enabled with no [[registrar.sources]], and the default source cannot be used: {e}; on a host that runs only the manager, set registrar.enabled = false"
            ));
        }
    }
    out
}

/// Runs warden until `shutdown` resolves, or a fatal condition ends it.
pub async fn run(
    config: Config,
    insecure: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Fatal> {
    let host = Arc::new(PluginHost::load_dirs(
        &config.plugins.dirs,
        insecure || config.plugins.allow_insecure,
    ));
    let found = problems(&config, &host);
    if !found.is_empty() {
        return Err(Fatal::Config(found.join("\n")));
    }
    let options = CallOptions::from_config(&config.plugins);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let mut sup = Supervisor::new(fatal_tx.clone(), stop_rx.clone());
    let me = identity::resolve(&config.host).await;
    let listener = match config
        .http
        .addr()
        .map_err(|m| Fatal::Config(format!("http.listen: {m}")))?
    {
        Some(addr) => Some(Arc::new(
            crate::http::bind(addr).await.map_err(Fatal::Config)?,
        )),
        None => None,
    };
    let manager_on = config.manager.central_redis.is_some();
    let mut required = Vec::new();
    if config.registrar.enabled {
        required.extend([
            Dependency::Docker,
            Dependency::LocalRedis,
            Dependency::ServiceSources,
        ]);
    }
    if manager_on {
        required.push(Dependency::CentralRedis);
    }
    crate::metrics::get().set_required(required);
    if let Some(listener) = listener {
        let info = Arc::new(crate::http::HostInfo {
            instance_id: me.instance_id.clone().unwrap_or_else(hostname),
            availability_zone: me.availability_zone.clone(),
            registrar: config.registrar.enabled,
            central_redis: config.manager.central_redis.clone(),
            central_redis_ca_file: config.manager.central_redis_ca_file.clone(),
        });
        tracing::info!(addr = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "http endpoint listening: /livez /readyz /status /metrics");
        let stop = stop_rx.clone();
        sup.spawn("http", move || {
            crate::http::serve(listener.clone(), info.clone(), stop.clone())
        });
    }
    // One AWS configuration for every client, loaded only when something needs AWS.
    let needs_aws = manager_on || (config.registrar.enabled && me.instance_id.is_some());
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
            let options = CallOptions {
                isolation: r.isolation.unwrap_or(options.isolation),
                ..options
            };
            let slot = Slot::spawn(
                host.clone(),
                &format!("metrics.{name}"),
                r,
                Kind::MetricSource,
                options,
                create_timeout,
                stop_rx.clone(),
                fatal_tx.clone(),
            );
            (name.clone(), slot)
        })
        .collect();

    if let (Some(url), Some(sdk)) = (&config.manager.central_redis, &sdk) {
        let central = crate::redis_util::open(url, config.manager.central_redis_ca_file.as_deref())
            .map_err(|m| {
                Fatal::Config(format!(
                    "manager.central_redis {}: {m}",
                    crate::redis_util::addr(url)
                ))
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
            services: managed_services(&config, &slots)
                .map_err(|e| Fatal::Config(e.to_string()))?,
            ecs: (!m.dry_run).then(|| AwsEcs::new(sdk)),
            ec2: Some(aws_sdk_ec2::Client::new(sdk)),
        };
        tracing::info!(instance = %id, services = manager.services.len(), dry_run = m.dry_run, "manager started");
        let stop = stop_rx.clone();
        sup.spawn("manager", move || manager.clone().run(stop.clone()));
    }

    if config.registrar.enabled {
        let docker = bollard::Docker::connect_with_defaults().map_err(|e| {
            Fatal::Config(format!(
                "cannot set up the Docker client (DOCKER_HOST?): {e}"
            ))
        })?;
        let owner = me.instance_id.clone().unwrap_or_else(hostname);
        let local_redis = config.registrar.local_redis.clone();
        let local_ca = config.registrar.local_redis_ca_file.clone();
        redx::RedisStore::new(&local_redis, local_ca.as_deref(), &owner)
            .map_err(|e| Fatal::Config(format!("registrar.local_redis: {e}")))?;
        let (elb_tx, elb_rx) = watch::channel(BTreeMap::new());
        let (ports_tx, ports_rx) = watch::channel(BTreeSet::new());
        let (elb_tx, ports_tx) = (Arc::new(elb_tx), Arc::new(ports_tx));
        if let Some(file) = config.registrar.router_ports_file.clone() {
            let (pid, stop) = (config.registrar.router_pid_file.clone(), stop_rx.clone());
            sup.spawn("router ports", move || {
                registrar::router::run(file.clone(), pid.clone(), ports_rx.clone(), stop.clone())
            });
        }
        if let (Some(instance), Some(sdk)) = (me.instance_id.clone(), &sdk) {
            let client = aws_sdk_elasticloadbalancing::Client::new(sdk);
            let stop = stop_rx.clone();
            sup.spawn("elb membership", move || {
                registrar::elb::run(
                    client.clone(),
                    instance.clone(),
                    elb_rx.clone(),
                    stop.clone(),
                )
            });
        }
        let refs = config.registrar.sources.clone();
        let resync = Duration::from_secs(config.registrar.resync_secs);
        let drain_on_stop = config.registrar.drain_on_stop;
        let selector = config
            .registrar
            .require_label
            .as_deref()
            .map(registrar::store::Selector::parse)
            .transpose()
            .map_err(|e| Fatal::Config(format!("registrar.require_label: {e}")))?;
        // The sources are created once; a restarted registrar loop reuses them.
        let created: Arc<OnceCell<Option<Vec<ServicesClient>>>> = Arc::new(OnceCell::new());
        let (host, stop, fatal) = (host.clone(), stop_rx.clone(), fatal_tx.clone());
        sup.spawn("registrar", move || {
            let (created, host, refs, stop, fatal) = (
                created.clone(),
                host.clone(),
                refs.clone(),
                stop.clone(),
                fatal.clone(),
            );
            let (docker, owner, local_redis, local_ca, selector) = (
                docker.clone(),
                owner.clone(),
                local_redis.clone(),
                local_ca.clone(),
                selector.clone(),
            );
            let (elbs, ports) = (elb_tx.clone(), ports_tx.clone());
            async move {
                let sources = created
                    .get_or_init(|| sources(&host, &refs, options, stop.clone(), fatal))
                    .await;
                let Some(sources) = sources.clone() else {
                    return;
                };
                let Ok(store) = redx::RedisStore::new(&local_redis, local_ca.as_deref(), &owner)
                else {
                    return;
                };
                tracing::info!(owner = %owner, sources = sources.len(), "registrar started");
                Registrar {
                    docker,
                    sources,
                    routes: redx::Routes::new(store),
                    resync,
                    drain_on_stop,
                    elbs,
                    ports,
                    selector,
                }
                .run(stop)
                .await
            }
        });
    }

    tracing::info!(
        plugins = host.plugins().len(),
        failed = host.failures().len(),
        metrics = slots.len(),
        registrar = config.registrar.enabled,
        "warden running; waiting for SIGTERM or SIGINT"
    );
    let fatal = tokio::select! {
        biased;
        _ = shutdown => None,
        f = fatal_rx.recv() => f,
    };
    match &fatal {
        None => tracing::info!("shutting down"),
        Some(f) => tracing::error!(exit_code = f.exit_code(), "shutting down: {f}"),
    }
    let _ = stop_tx.send(true);
    if !sup.join(SHUTDOWN_LIMIT).await {
        tracing::warn!(
            limit = %crate::logs::humantime(SHUTDOWN_LIMIT),
            "some work did not end in time; exiting anyway"
        );
    }
    for slot in slots.values() {
        if let Ok(c) = slot.get() {
            c.shutdown();
        }
    }
    fatal.map_or(Ok(()), Err)
}

/// The longest shutdown takes: work in flight is cancelled, not waited for.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(2);
