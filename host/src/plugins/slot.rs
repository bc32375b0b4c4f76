//! A plugin instance created in the background: with a timeout, retried with backoff, so
//! that a plugin whose `new` hangs or fails never holds up anything else.
//!
//! The slot is `Pending` (with the last error, if any) until the instance exists, then
//! `Ready`. A `new` that does not return within the timeout is not abandoned and started
//! again (that would pile up threads stuck in the plugin): the same attempt is waited on,
//! and the slot says why it is pending. Retries follow the error's kind: `config` is an
//! operator's error and is retried only every few minutes (the file it names may be
//! fixed); a host-side refusal (unknown plugin, schema) cannot change until warden is
//! restarted and is not retried; anything else is retried with backoff from 1 s to 1 min.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use warden_plugin_api::{ErrorKind, Kind};

use super::{CallOptions, CreateError, PluginClient, PluginHost};
use crate::backoff::Backoff;
use crate::plugins::PluginRef;

/// Why a slot has no instance yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotCreated {
    /// `config`, `transient`, `timeout`, … or `pending` before the first answer.
    pub kind: String,
    pub message: String,
}

impl std::fmt::Display for NotCreated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not created yet ({}): {}", self.kind, self.message)
    }
}

#[derive(Clone)]
pub enum SlotState {
    Pending(NotCreated),
    Ready(Arc<dyn PluginClient>),
}

/// A handle on an instance that may not exist yet.
#[derive(Clone)]
pub struct Slot {
    name: String,
    rx: watch::Receiver<SlotState>,
}

/// What to do after a failed creation (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    After(Duration),
    Never,
}

/// Config errors every 5 min; host-side refusals never; the rest with `backoff`.
pub fn retry_after(e: &CreateError, backoff: &mut Backoff) -> Retry {
    match e {
        CreateError::UnknownPlugin { .. }
        | CreateError::KindNotOffered { .. }
        | CreateError::Schema { .. } => Retry::Never,
        CreateError::Plugin { error, .. } if error.kind == ErrorKind::Config => {
            Retry::After(Duration::from_secs(300))
        }
        CreateError::Plugin { .. } => Retry::After(backoff.next_delay()),
    }
}

/// The kind of a creation's failure: the plugin's own, else `config` (the host refused
/// the configuration before the plugin saw it).
fn kind_of(e: &CreateError) -> ErrorKind {
    match e {
        CreateError::Plugin { error, .. } => error.kind,
        _ => ErrorKind::Config,
    }
}

impl Slot {
    /// A slot that already holds its instance (tests, and sources created up front).
    pub fn ready(name: &str, client: Arc<dyn PluginClient>) -> Slot {
        let (_tx, rx) = watch::channel(SlotState::Ready(client));
        Slot {
            name: name.to_owned(),
            rx,
        }
    }

    /// A slot whose instance is never created (tests: a source that never answers).
    #[cfg(test)]
    pub fn pending(name: &str) -> Slot {
        let (_tx, rx) = watch::channel(SlotState::Pending(NotCreated {
            kind: "pending".into(),
            message: "not created yet".into(),
        }));
        Slot {
            name: name.to_owned(),
            rx,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits up to `limit` for the first attempt at creating the instance to end.
    pub async fn first_attempt(&self, limit: Duration) {
        let mut rx = self.rx.clone();
        let _ = tokio::time::timeout(limit, rx.changed()).await;
    }

    /// The instance, or why there is none yet.
    pub fn get(&self) -> Result<Arc<dyn PluginClient>, NotCreated> {
        match &*self.rx.borrow() {
            SlotState::Ready(c) => Ok(c.clone()),
            SlotState::Pending(why) => Err(why.clone()),
        }
    }

    /// Starts creating `r` (named `name` in logs) in the background.
    /// A configuration the plugin refuses on the first attempt is fatal (`fatal`):
    /// warden exits and says why.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        host: Arc<PluginHost>,
        name: &str,
        r: &PluginRef,
        kind: Kind,
        options: CallOptions,
        timeout: Duration,
        shutdown: watch::Receiver<bool>,
        fatal: tokio::sync::mpsc::UnboundedSender<crate::supervisor::Fatal>,
    ) -> Slot {
        let (tx, rx) = watch::channel(SlotState::Pending(NotCreated {
            kind: "pending".into(),
            message: "being created".into(),
        }));
        let task = Creator {
            host,
            name: name.to_owned(),
            r: r.clone(),
            kind,
            options,
            timeout,
            fatal,
        };
        tokio::spawn(task.run(tx, shutdown));
        Slot {
            name: name.to_owned(),
            rx,
        }
    }
}

struct Creator {
    host: Arc<PluginHost>,
    name: String,
    r: PluginRef,
    kind: Kind,
    options: CallOptions,
    timeout: Duration,
    fatal: tokio::sync::mpsc::UnboundedSender<crate::supervisor::Fatal>,
}

impl Creator {
    /// Creates the instance; if it wedges in process, creates it again in a process of
    /// its own (where warden can start one), so that its value comes back while the
    /// wedged thread is abandoned.
    async fn run(self, tx: watch::Sender<SlotState>, mut shutdown: watch::Receiver<bool>) {
        let mut isolation = self.options.isolation;
        let mut first = true;
        loop {
            let created = self.create(isolation, first, &tx, &mut shutdown).await;
            first = false;
            let Some(client) = created else {
                return;
            };
            let wedges = client.wedges();
            tx.send_replace(SlotState::Ready(client));
            let Some(mut wedges) = wedges else { return };
            tokio::select! {
                _ = shutdown.changed() => return,
                r = wedges.wait_for(|n| *n > 0) => if r.is_err() { return },
            }
            if super::probe::command().is_none() {
                // No process can be started here: the executor gives calls a new thread.
                return;
            }
            tracing::warn!(source = %self.name, plugin = %self.r.plugin, "plugin instance wedged in process; creating it again in a process of its own (isolation = \"process\"), where a call that does not return is killed");
            isolation = crate::plugins::Isolation::Process;
        }
    }

    /// Creates the instance, retrying by the error's kind; `None` when it never will be
    /// (a host-side refusal) or on shutdown. A refused config is fatal on the `first`
    /// creation only (a re-creation keeps the instance it has).
    async fn create(
        &self,
        isolation: crate::plugins::Isolation,
        first: bool,
        tx: &watch::Sender<SlotState>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Arc<dyn PluginClient>> {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut last_error: Option<String> = None;
        loop {
            let error = match self.attempt(isolation, tx, shutdown).await? {
                Ok(client) => {
                    let isolation = client.isolation();
                    tracing::info!(source = %self.name, plugin = %self.r.plugin, %isolation, "plugin instance created ({isolation})");
                    return Some(client);
                }
                Err(e) => e,
            };
            let retry = retry_after(&error, &mut backoff);
            let message = error.to_string();
            if first && last_error.is_none() && kind_of(&error) == ErrorKind::Config {
                let _ = self.fatal.send(crate::supervisor::Fatal::Config(format!(
                    "{}: {message}",
                    self.name
                )));
            }
            if last_error.as_deref() != Some(&message) {
                self.say(&error, retry, &message);
                last_error = Some(message.clone());
            }
            if tx.borrow().is_pending() {
                tx.send_replace(SlotState::Pending(NotCreated {
                    kind: kind_of(&error).as_str().to_owned(),
                    message,
                }));
            }
            let Retry::After(delay) = retry else {
                return None;
            };
            tokio::select! {
                _ = shutdown.changed() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt, waited on however long it takes (said after `timeout`, and while
    /// the slot is pending, in its state); `None` on shutdown.
    async fn attempt(
        &self,
        isolation: crate::plugins::Isolation,
        tx: &watch::Sender<SlotState>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Result<Arc<dyn PluginClient>, CreateError>> {
        let host = self.host.clone();
        let (plugin, kind, config, env) = (
            self.r.plugin.clone(),
            self.kind,
            self.r.config.clone(),
            self.r.env.clone(),
        );
        let options = CallOptions {
            isolation,
            ..self.options
        };
        let mut attempt = tokio::spawn(async move {
            host.create_with_env(&plugin, kind, &config, options, &env)
                .await
        });
        let mut waited = Duration::ZERO;
        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => { attempt.abort(); return None }
                r = &mut attempt => break r,
                _ = tokio::time::sleep(self.timeout) => {
                    waited += self.timeout;
                    let message = format!(
                        "plugin {} has not returned from new after {}; still waiting for it",
                        self.r.plugin,
                        crate::logs::humantime(waited)
                    );
                    if waited == self.timeout {
                        tracing::warn!(source = %self.name, "{message}");
                    }
                    if tx.borrow().is_pending() {
                        tx.send_replace(SlotState::Pending(NotCreated { kind: "timeout".into(), message }));
                    }
                }
            }
        };
        Some(result.unwrap_or_else(|join| {
            Err(CreateError::Plugin {
                plugin: self.r.plugin.clone(),
                error: warden_plugin_api::PluginError::new(
                    ErrorKind::Panicked,
                    format!("create task failed: {join}"),
                ),
            })
        }))
    }

    fn say(&self, error: &CreateError, retry: Retry, message: &str) {
        match retry {
            Retry::Never => {
                tracing::error!(source = %self.name, "plugin instance cannot be created until warden is restarted with a fixed config: {message}")
            }
            Retry::After(d) if kind_of(error) == ErrorKind::Config => {
                tracing::error!(source = %self.name, retry_in = %crate::logs::humantime(d), "plugin refused its config: {message}")
            }
            Retry::After(d) => {
                tracing::warn!(source = %self.name, retry_in = %crate::logs::humantime(d), "plugin instance not created: {message}")
            }
        }
    }
}

impl SlotState {
    fn is_pending(&self) -> bool {
        matches!(self, SlotState::Pending(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_plugin_api::PluginError;

    #[test]
    fn retries_follow_the_error_kind() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let plugin = |kind| CreateError::Plugin {
            plugin: "p".into(),
            error: PluginError::new(kind, "x"),
        };
        assert_eq!(
            retry_after(&plugin(ErrorKind::Config), &mut b),
            Retry::After(Duration::from_secs(300))
        );
        assert!(matches!(
            retry_after(&plugin(ErrorKind::Transient), &mut b),
            Retry::After(d) if d <= Duration::from_secs(1)
        ));
        assert_eq!(
            retry_after(
                &CreateError::UnknownPlugin {
                    name: "x".into(),
                    loaded: "none".into()
                },
                &mut b
            ),
            Retry::Never
        );
    }
}
