//! Calling plugin instances so that a bad one loses only its own value.
//!
//! Every call runs as its own tokio task under a timeout and behind the instance's
//! circuit breaker; a panic, an error, a hang or an answer of the wrong shape becomes a
//! [`CallError`] and the daemon goes on. Dropping a call cancels the plugin's work.
//! [`PluginClient`] is the seam for a later out-of-process host: the same `.so` run in a
//! child process would be one more implementation of it.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use warden_plugin_api::host::RawInstance;
use warden_plugin_api::{ErrorKind, Kind, Measurement, Op, PluginError, ServiceDefinition};

use super::breaker::Breaker;
use super::Plugin;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Decodes an answer (JSON text) into the operation's type; an answer that does not
/// decode counts as a failure of the plugin.
pub type Decode = fn(&str) -> Result<Box<dyn Any + Send>, String>;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallOptions {
    pub timeout: Duration,
    pub breaker_failures: u32,
    pub breaker_rest: Duration,
    /// Where the instance lives: in warden's process, or in a child of its own.
    pub isolation: crate::plugins::Isolation,
}

impl Default for CallOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            breaker_failures: 3,
            breaker_rest: Duration::from_secs(30),
            isolation: crate::plugins::Isolation::InProcess,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    #[error("plugin {plugin} {op}: {error}")]
    Failed {
        plugin: String,
        op: String,
        error: PluginError,
    },
    #[error("plugin {plugin} {op}: not called, resting after {failures} consecutive failures (next try in {}){}", crate::logs::humantime(*retry_in), last.as_ref().map_or(String::new(), |e| format!("; last error: {e}")))]
    Resting {
        plugin: String,
        op: String,
        failures: u32,
        retry_in: Duration,
        /// The failure that made it rest.
        last: Option<PluginError>,
    },
}

impl CallError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CallError::Failed { error, .. } => error.kind,
            CallError::Resting { last, .. } => {
                last.as_ref().map_or(ErrorKind::Transient, |e| e.kind)
            }
        }
    }
}

/// One plugin instance as the rest of warden sees it.
pub trait PluginClient: Send + Sync {
    fn plugin_name(&self) -> &str;
    fn kind(&self) -> Kind;
    /// Calls `op` with `args` (JSON text); the answer must pass `decode`.
    fn call(
        &self,
        op: Op,
        args: &str,
        decode: Decode,
    ) -> BoxFuture<Result<Box<dyn Any + Send>, CallError>>;
    fn shutdown(&self);
    /// Where the instance runs: `in-process` or `process`.
    fn isolation(&self) -> crate::plugins::Isolation;
    /// For an in-process instance: the number of its calls that wedged (never returned
    /// from the plugin's code), watched, so that its slot can re-create it elsewhere.
    fn wedges(&self) -> Option<tokio::sync::watch::Receiver<usize>> {
        None
    }
}

/// An instance's circuit breaker and last error: the same rules for every kind of client.
#[derive(Clone)]
pub(crate) struct Health {
    breaker: Arc<Mutex<Breaker>>,
    last_error: Arc<Mutex<Option<PluginError>>>,
}

impl Health {
    pub(crate) fn new(options: &CallOptions) -> Self {
        Self {
            breaker: Arc::new(Mutex::new(Breaker::new(
                options.breaker_failures,
                options.breaker_rest,
            ))),
            last_error: Arc::new(Mutex::new(None)),
        }
    }

    /// May a call be made now? If not, why (resting, with the error that caused it).
    pub(crate) fn admit(&self, plugin: &str, op: &str) -> Result<(), CallError> {
        let allowed = self
            .breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(tokio::time::Instant::now());
        allowed.map_err(|r| CallError::Resting {
            plugin: plugin.to_owned(),
            op: op.to_owned(),
            failures: r.failures,
            retry_in: r.retry_in,
            last: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        })
    }

    /// Records a call's outcome: a permanent or config error rests the instance at once.
    pub(crate) fn settle(
        &self,
        plugin: String,
        op: String,
        outcome: Result<Box<dyn Any + Send>, PluginError>,
        started: std::time::Instant,
    ) -> Result<Box<dyn Any + Send>, CallError> {
        let m = crate::metrics::get();
        let label = match &outcome {
            Ok(_) => "ok",
            Err(e) => e.kind.as_str(),
        };
        m.observe_plugin_call(&plugin, &op, label, started.elapsed());
        let mut b = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(value) => {
                if b.on_success() {
                    m.breaker_open.get_or_create(&plugin_label(&plugin)).dec();
                }
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(value)
            }
            Err(error) => {
                let now = tokio::time::Instant::now();
                let rest = match error.kind {
                    ErrorKind::Permanent | ErrorKind::Config => b.on_lasting_failure(now),
                    _ => b.on_failure(now),
                };
                if let Some(rest) = rest {
                    if b.first_trip() {
                        m.breaker_open.get_or_create(&plugin_label(&plugin)).inc();
                    }
                    tracing::warn!(plugin = %plugin, op = %op, kind = %error.kind, rest = %crate::logs::humantime(rest), "plugin resting after its error: {}", error.message);
                }
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
                Err(CallError::Failed { plugin, op, error })
            }
        }
    }
}

fn plugin_label(plugin: &str) -> crate::metrics::PluginLabel {
    crate::metrics::PluginLabel {
        plugin: plugin.to_owned(),
    }
}

/// Decodes an answer; a wrong shape is the plugin's failure.
pub(crate) fn decode_answer(
    text: &str,
    decode: Decode,
) -> Result<Box<dyn Any + Send>, PluginError> {
    decode(text).map_err(|why| {
        PluginError::new(
            ErrorKind::InvalidResponse,
            format!("answer of the wrong shape: {why}"),
        )
    })
}

/// A plugin instance loaded into this process.
pub struct InProcessClient {
    plugin: Arc<Plugin>,
    kind: Kind,
    instance: Arc<RawInstance>,
    timeout: Duration,
    health: Health,
    /// The instance's own call thread: its code never runs on warden's runtime.
    executor: Arc<super::executor::Executor>,
}

impl InProcessClient {
    pub(crate) fn new(
        plugin: Arc<Plugin>,
        kind: Kind,
        instance: RawInstance,
        options: CallOptions,
    ) -> Self {
        let executor = Arc::new(super::executor::Executor::new(&plugin.manifest().name));
        Self {
            plugin,
            kind,
            instance: Arc::new(instance),
            timeout: options.timeout,
            health: Health::new(&options),
            executor,
        }
    }
}

/// Aborts the call's task when the caller drops the call.
struct AbortOnDrop(tokio::task::AbortHandle);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PluginClient for InProcessClient {
    fn plugin_name(&self) -> &str {
        &self.plugin.manifest().name
    }

    fn kind(&self) -> Kind {
        self.kind
    }

    fn call(
        &self,
        op: Op,
        args: &str,
        decode: Decode,
    ) -> BoxFuture<Result<Box<dyn Any + Send>, CallError>> {
        let plugin = self.plugin_name().to_owned();
        let op = op.as_str().to_owned();
        if let Err(resting) = self.health.admit(&plugin, &op) {
            return Box::pin(std::future::ready(Err(resting)));
        }
        let health = self.health.clone();
        let started = std::time::Instant::now();
        let call = self.instance.call(&op, args);
        let call = self.executor.call(&op, call, self.timeout);
        let task = tokio::spawn(call);
        let guard = AbortOnDrop(task.abort_handle());
        Box::pin(async move {
            let outcome = match task.await {
                Ok(Ok(text)) => decode_answer(&text, decode),
                Ok(Err(e)) => Err(e),
                Err(join) => Err(PluginError::new(
                    ErrorKind::Panicked,
                    format!("call task failed: {join}"),
                )),
            };
            drop(guard);
            health.settle(plugin, op, outcome, started)
        })
    }

    fn shutdown(&self) {
        // A wedged instance's code may never return: it is not called again, shutdown
        // included (its thread holds it, and the process's end frees it).
        if self.executor.abandoned() == 0 {
            self.instance.shutdown();
        }
    }

    fn isolation(&self) -> crate::plugins::Isolation {
        crate::plugins::Isolation::InProcess
    }

    fn wedges(&self) -> Option<tokio::sync::watch::Receiver<usize>> {
        Some(self.executor.wedges())
    }
}

fn decode_measurement(text: &str) -> Result<Box<dyn Any + Send>, String> {
    let m: Measurement = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if m.value.is_finite() {
        Ok(Box::new(m))
    } else {
        Err("value is not a finite number".into())
    }
}

fn decode_services(text: &str) -> Result<Box<dyn Any + Send>, String> {
    serde_json::from_str::<Vec<ServiceDefinition>>(text)
        .map(|v| Box::new(v) as Box<dyn Any + Send>)
        .map_err(|e| e.to_string())
}

fn decode_number(text: &str) -> Result<Box<dyn Any + Send>, String> {
    match serde_json::from_str::<f64>(text) {
        Ok(v) if v.is_finite() => Ok(Box::new(v)),
        Ok(_) => Err("not a finite number".into()),
        Err(e) => Err(format!("expected a number: {e}")),
    }
}

fn decode_generation(text: &str) -> Result<Box<dyn Any + Send>, String> {
    serde_json::from_str::<u64>(text)
        .map(|v| Box::new(v) as Box<dyn Any + Send>)
        .map_err(|e| format!("expected a non-negative integer: {e}"))
}

fn take<T: 'static>(answer: Box<dyn Any + Send>) -> T {
    *answer.downcast::<T>().expect("decoded to this type")
}

/// A metric-source instance.
#[derive(Clone)]
pub struct MetricClient(pub Arc<dyn PluginClient>);

impl MetricClient {
    pub async fn measure(&self) -> Result<Measurement, CallError> {
        self.0
            .call(Op::Measure, "null", decode_measurement)
            .await
            .map(take)
    }

    /// Maps a value through this source (a table plugin).
    pub async fn map(&self, value: f64) -> Result<f64, CallError> {
        let args = serde_json::to_string(&warden_plugin_api::model::MapArgs { value })
            .expect("a number serializes");
        self.0.call(Op::Map, &args, decode_number).await.map(take)
    }
}

/// A service-definitions instance.
#[derive(Clone)]
pub struct ServicesClient(pub Arc<dyn PluginClient>);

impl ServicesClient {
    pub async fn list(&self) -> Result<Vec<ServiceDefinition>, CallError> {
        self.0
            .call(Op::List, "null", decode_services)
            .await
            .map(take)
    }
    /// The services, given the host's running containers (providers that derive services
    /// from containers need them; others ignore them).
    pub async fn list_for(
        &self,
        containers: &[warden_plugin_api::ContainerView],
    ) -> Result<Vec<ServiceDefinition>, CallError> {
        let args = serde_json::to_string(&warden_plugin_api::ListArgs {
            containers: containers.to_vec(),
        })
        .expect("containers serialize");
        self.0
            .call(Op::List, &args, decode_services)
            .await
            .map(take)
    }
    pub async fn generation(&self) -> Result<u64, CallError> {
        self.0
            .call(Op::Generation, "null", decode_generation)
            .await
            .map(take)
    }
}
