//! `warden run`: the composition root. It wires the parts together and runs them until
//! shutdown; nothing here decides anything.
//!
//! - [`checks`]: what a configuration needs before anything starts (the same checks as
//!   `warden check`), and the plugins loaded off the runtime;
//! - [`parts`]: what runs for the configuration in force (metric sources, the manager,
//!   the registrar), each loop given its clients and a stop;
//! - [`reload`]: SIGHUP as prepare, then commit: everything new is made and checked
//!   before anything running is stopped, so a reload is all or nothing.

mod adapters;
mod checks;
mod parts;
mod reload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::identity::{self, Identity};
use crate::manager::sources::Definitions;
use crate::supervisor::{Fatal, Supervisor};

pub(crate) use checks::{load_plugins, problems};

/// The plugin that gives service definitions when none is configured.
pub(crate) const DEFAULT_SOURCE: &str = "docker-labels";

/// The longest shutdown takes: work in flight is cancelled, not waited for.
pub(crate) const SHUTDOWN_LIMIT: Duration = Duration::from_secs(2);

/// A group of loops under one supervisor with a stop of its own, so that a reload can
/// replace it while the others run on.
struct Part {
    stop: watch::Sender<bool>,
    sup: Supervisor,
}

impl Part {
    fn new(fatal: mpsc::UnboundedSender<Fatal>) -> Part {
        let (stop, rx) = watch::channel(false);
        Part {
            sup: Supervisor::new(fatal, rx),
            stop,
        }
    }
    /// Stops the loops; false if some did not end within the limit.
    async fn stop(self) -> bool {
        let _ = self.stop.send(true);
        self.sup.join(SHUTDOWN_LIMIT).await
    }
}

/// Runs warden until `shutdown` resolves, or a fatal condition ends it. Each message on
/// `reload` (SIGHUP) re-reads `path` and applies it, or refuses it whole.
pub(crate) async fn run(
    config: Config,
    path: Option<PathBuf>,
    insecure: bool,
    shutdown: impl std::future::Future<Output = ()>,
    mut reload: mpsc::UnboundedReceiver<()>,
) -> Result<(), Fatal> {
    let host = Arc::new(checks::load_plugins_off_runtime(&config, insecure).await);
    let found = problems(&config, &host);
    if !found.is_empty() {
        return Err(Fatal::Config(found.join("\n")));
    }
    checks::say_if_insecure(&config, insecure);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let mut sup = Supervisor::new(fatal_tx.clone(), stop_rx.clone());
    let me = identity::resolve(&config.host).await;
    crate::metrics::get().set_required(checks::required_for(&config));
    serve_http(&config, &me, insecure, &mut sup, stop_rx.clone()).await?;
    let (defs_tx, mut defs_rx) = watch::channel(Definitions::new());
    let mut running = parts::Running::new(config, host, me, fatal_tx, defs_tx);
    running.start(&mut sup, stop_rx).await?;
    tokio::pin!(shutdown);
    let fatal = loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break None,
            f = fatal_rx.recv() => break f,
            Ok(()) = defs_rx.changed() => running.sources_changed(),
            Some(()) = reload.recv() => running.on_reload(path.as_deref(), insecure).await,
        }
    };
    match &fatal {
        None => tracing::info!("shutting down"),
        Some(f) => tracing::error!(exit_code = f.exit_code(), "shutting down: {f}"),
    }
    let _ = stop_tx.send(true);
    running.stop(sup).await;
    fatal.map_or(Ok(()), Err)
}

/// The HTTP endpoint (`/livez`, `/readyz`, `/status`, `/metrics`), bound before anything
/// else starts so that a taken port ends warden at once.
async fn serve_http(
    config: &Config,
    me: &Identity,
    insecure: bool,
    sup: &mut Supervisor,
    stop: watch::Receiver<bool>,
) -> Result<(), Fatal> {
    let addr = config
        .http
        .addr()
        .map_err(|m| Fatal::Config(format!("http.listen: {m}")))?;
    let Some(addr) = addr else {
        return Ok(());
    };
    let listener = Arc::new(crate::http::bind(addr).await.map_err(Fatal::Config)?);
    let info = Arc::new(crate::http::HostInfo {
        instance_id: me.instance_id.clone().unwrap_or_else(parts::hostname),
        availability_zone: me.availability_zone.clone(),
        registrar: config.registrar.enabled,
        central_redis: config.manager.central_redis.clone(),
        central_redis_ca_file: config.manager.central_redis_ca_file.clone(),
        insecure_plugins: insecure || config.plugins.allow_insecure,
        ..Default::default()
    });
    let bound = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    tracing::info!(addr = %bound, "http endpoint listening: /livez /readyz /status /metrics");
    sup.spawn("http", move || {
        crate::http::serve(listener.clone(), info.clone(), stop.clone())
    });
    Ok(())
}
