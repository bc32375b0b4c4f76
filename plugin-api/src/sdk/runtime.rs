//! The plugin library's own tokio runtime.
//!
//! A `.so` links its own copy of tokio, whose thread-locals the host's runtime never
//! sets: without a runtime of its own, `tokio::time::sleep` in a plugin panics with
//! "there is no reactor running". Each library therefore starts one small runtime on
//! first use, and every future the host polls is polled inside its context.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;
use tokio::runtime::{Handle, Runtime};

use super::export::panic_error;
use crate::{ErrorKind, PluginError};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// This plugin library's runtime (started on first use: one worker thread, timers and IO).
pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("warden-plugin")
            .enable_all()
            .build()
            .expect("cannot start the plugin's tokio runtime")
    })
}

/// Polls the inner future with the plugin's runtime entered, so that timers, IO and
/// `tokio::spawn` inside it use the plugin's own reactor.
pub(crate) struct InRuntime<F> {
    handle: Handle,
    inner: Pin<Box<F>>,
}

impl<F: Future> InRuntime<F> {
    pub(crate) fn new(inner: F) -> Self {
        Self {
            handle: runtime().handle().clone(),
            inner: Box::pin(inner),
        }
    }
}

impl<F: Future> Future for InRuntime<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let _guard = this.handle.enter();
        this.inner.as_mut().poll(cx)
    }
}

/// Runs a future to completion on the plugin runtime from a thread that may or may not be
/// inside some runtime (the host calls `create` from a blocking thread). A panic in the
/// future comes back as a `panicked` error.
pub(crate) fn run_to_completion<F, T>(fut: F, during: &str) -> Result<T, PluginError>
where
    F: Future<Output = Result<T, PluginError>> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(AssertUnwindSafe(fut).catch_unwind().await);
    });
    match rx.recv() {
        Ok(Ok(result)) => result,
        Ok(Err(payload)) => Err(panic_error(payload, during)),
        Err(_) => Err(PluginError::new(
            ErrorKind::Panicked,
            format!("plugin runtime lost the task during {during}"),
        )),
    }
}
