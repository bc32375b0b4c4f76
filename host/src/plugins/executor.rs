//! Where in-process plugin code runs: a thread of each instance's own, never warden's
//! runtime.
//!
//! A plugin's future is polled by whoever awaits it, and a poll runs the plugin's code.
//! Polled on warden's runtime, code that never yields (a blocking read, a busy retry)
//! holds a runtime worker: its call's timeout cannot fire, and two such plugins on two
//! cores freeze the lease renewal, `/livez` and the signal handling. So each instance's
//! calls are polled on a thread of its own (a current-thread runtime), and the caller
//! waits on a channel with its timeout: the timeout is enforced from outside the call.
//!
//! A call past its timeout is dropped (an async plugin is cancelled on its thread). If
//! the thread is still inside the plugin's code, it cannot be interrupted: the instance
//! is *wedged*. Its thread is abandoned (counted, said at ERROR once) and the next call
//! gets a new one, up to [`MAX_ABANDONED`] a client; past that, calls fail at once with
//! `wedged` and say why, so a plugin that wedges every call cannot use up threads. A
//! wedged instance is named by `/readyz` (not ready) and `/status` until a call of it
//! answers again or it is replaced: its slot ([`super::slot`]) creates it again in a
//! process of its own, where a call past its timeout is killed, so its value comes back.
//!
//! Handing a call to another thread and back costs two wake-ups of a parked thread
//! (about 5 µs each on a 2-core VM, 10.9 µs a call measured). Both sides spin briefly
//! instead: the call thread looks for the next call for [`IDLE_SPIN`] after each one
//! before it parks, and the caller looks for the answer for [`ANSWER_SPIN`] before it
//! awaits it. A metric read once a loop pays one wake-up; calls made one after another
//! pay none. The price is bounded CPU: at most [`IDLE_SPIN`] of a busy call thread after
//! each call, and at most [`ANSWER_SPIN`] of a runtime worker held by a caller.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use warden_plugin_api::{ErrorKind, PluginError};

/// Threads a client may abandon to wedged calls before it stops calling.
pub const MAX_ABANDONED: usize = 4;

/// How long a call thread looks for the next call before it parks.
pub const IDLE_SPIN: Duration = Duration::from_micros(50);

/// How long a caller looks for its answer before it awaits it (holding its runtime
/// worker that long at most).
pub const ANSWER_SPIN: Duration = Duration::from_micros(20);

type Answer = Result<String, PluginError>;
type Job = (
    Pin<Box<dyn Future<Output = Answer> + Send>>,
    oneshot::Sender<Answer>,
);

/// Milliseconds since `EPOCH` when the current poll began, 0 when no poll runs.
fn now_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64 + 1
}

/// One thread and its queue.
struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// When the poll in progress began (0: none).
    polling_since: Arc<AtomicU64>,
}

impl Worker {
    fn start(name: &str, epoch: Instant) -> std::io::Result<Worker> {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let polling_since = Arc::new(AtomicU64::new(0));
        let since = polling_since.clone();
        std::thread::Builder::new()
            .name(format!("plugin {name}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(_) => return,
                };
                rt.block_on(async move {
                    while let Some((fut, tx)) = next_job(&mut rx).await {
                        let since = since.clone();
                        tokio::spawn(async move {
                            let mut tx = tx;
                            let watched = Watched {
                                inner: fut,
                                since,
                                epoch,
                            };
                            tokio::select! {
                                answer = watched => { let _ = tx.send(answer); }
                                // The caller gave up (timeout, cancel): drop the work.
                                _ = tx.closed() => {}
                            }
                        });
                        // Let the call run before looking for the next one.
                        tokio::task::yield_now().await;
                    }
                });
            })?;
        Ok(Worker {
            jobs,
            polling_since,
        })
    }

    /// Whether the thread has been inside one poll for at least `at_least`.
    fn stuck(&self, epoch: Instant, at_least: Duration) -> bool {
        let since = self.polling_since.load(Ordering::Relaxed);
        since != 0 && now_ms(epoch).saturating_sub(since) >= at_least.as_millis() as u64
    }
}

/// The next call: looked for during [`IDLE_SPIN`] (yielding, so that calls in progress
/// run), then awaited parked. `None` once the executor is gone.
async fn next_job(rx: &mut mpsc::UnboundedReceiver<Job>) -> Option<Job> {
    let until = Instant::now() + IDLE_SPIN;
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) if Instant::now() < until => {
                tokio::task::yield_now().await
            }
            Err(mpsc::error::TryRecvError::Empty) => return rx.recv().await,
        }
    }
}

/// What a caller sees of its call during [`ANSWER_SPIN`].
enum Soon {
    Answered(Answer),
    /// The call ended without an answer (its task was dropped).
    Lost,
    Wait(oneshot::Receiver<Answer>),
}

/// The answer if it comes within [`ANSWER_SPIN`]; the receiver to await otherwise.
fn answer_soon(mut rx: oneshot::Receiver<Answer>) -> Soon {
    let until = Instant::now() + ANSWER_SPIN;
    loop {
        match rx.try_recv() {
            Ok(answer) => return Soon::Answered(answer),
            Err(oneshot::error::TryRecvError::Closed) => return Soon::Lost,
            Err(oneshot::error::TryRecvError::Empty) if Instant::now() < until => {
                std::hint::spin_loop()
            }
            Err(oneshot::error::TryRecvError::Empty) => return Soon::Wait(rx),
        }
    }
}

/// Records when each poll of the plugin's future begins and ends.
struct Watched {
    inner: Pin<Box<dyn Future<Output = Answer> + Send>>,
    since: Arc<AtomicU64>,
    epoch: Instant,
}

impl Future for Watched {
    type Output = Answer;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        self.since.store(now_ms(self.epoch), Ordering::Relaxed);
        let r = self.inner.as_mut().poll(cx);
        self.since.store(0, Ordering::Relaxed);
        r
    }
}

/// The calls of one in-process instance, on a thread of their own.
pub struct Executor {
    name: String,
    /// `name#n`: this instance, as `/readyz` names it.
    instance: String,
    epoch: Instant,
    worker: Mutex<Option<Arc<Worker>>>,
    abandoned: AtomicUsize,
    /// `abandoned`, watched (the slot re-creates a wedged instance).
    wedges: tokio::sync::watch::Sender<usize>,
}

impl Drop for Executor {
    /// An instance replaced or gone is no longer wedged: `/readyz` stops naming it.
    fn drop(&mut self) {
        if self.abandoned() > 0 {
            crate::metrics::get().set_wedged(&self.instance, false);
        }
    }
}

impl Executor {
    pub fn new(name: &str) -> Executor {
        static INSTANCES: AtomicUsize = AtomicUsize::new(0);
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed) + 1;
        Executor {
            name: name.to_owned(),
            instance: format!("{name}#{n}"),
            epoch: Instant::now(),
            worker: Mutex::new(None),
            abandoned: AtomicUsize::new(0),
            wedges: tokio::sync::watch::channel(0).0,
        }
    }

    /// The number of abandoned calls, watched.
    pub fn wedges(&self) -> tokio::sync::watch::Receiver<usize> {
        self.wedges.subscribe()
    }

    /// Threads abandoned to wedged calls so far.
    pub fn abandoned(&self) -> usize {
        self.abandoned.load(Ordering::Relaxed)
    }

    fn worker(&self) -> Result<Arc<Worker>, PluginError> {
        let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = w.as_ref() {
            return Ok(w.clone());
        }
        let made = Arc::new(Worker::start(&self.name, self.epoch).map_err(|e| {
            PluginError::new(
                ErrorKind::Transient,
                format!("cannot start a call thread: {e}"),
            )
        })?);
        *w = Some(made.clone());
        Ok(made)
    }

    /// Runs `fut` on the instance's thread; its answer, or `timeout` after `limit`.
    pub fn call(
        self: &Arc<Self>,
        op: &str,
        fut: impl Future<Output = Answer> + Send + 'static,
        limit: Duration,
    ) -> impl Future<Output = Answer> + Send + 'static {
        let this = self.clone();
        let op = op.to_owned();
        async move {
            let abandoned = this.abandoned();
            if abandoned >= MAX_ABANDONED {
                return Err(PluginError::new(
                    ErrorKind::Timeout,
                    format!("wedged: {abandoned} calls never returned from the plugin's code (blocking code in process); not called again until warden restarts: run it with isolation = \"process\""),
                ));
            }
            let worker = this.worker()?;
            let (tx, rx) = oneshot::channel();
            if worker.jobs.send((Box::pin(fut), tx)).is_err() {
                this.abandon(&worker, &op, "its call thread ended");
                return Err(PluginError::new(
                    ErrorKind::Panicked,
                    "the call thread ended",
                ));
            }
            let waited = match answer_soon(rx) {
                Soon::Answered(answer) => Ok(Ok(answer)),
                Soon::Lost => Ok(Err(())),
                Soon::Wait(rx) => {
                    tokio::time::timeout(limit, async { rx.await.map_err(drop) }).await
                }
            };
            match waited {
                Ok(Ok(answer)) => {
                    // Its thread answers again (a new one after a wedge).
                    if abandoned > 0 {
                        crate::metrics::get().set_wedged(&this.instance, false);
                    }
                    answer
                }
                Ok(Err(_)) => Err(PluginError::new(
                    ErrorKind::Panicked,
                    "the call ended without an answer",
                )),
                Err(_) => {
                    if worker.stuck(this.epoch, limit / 2) {
                        this.abandon(&worker, &op, "it never returned from the plugin's code");
                    }
                    Err(PluginError::new(
                        ErrorKind::Timeout,
                        format!("no answer within {limit:?}; the call was cancelled"),
                    ))
                }
            }
        }
    }

    /// Gives the thread up: the next call gets a new one.
    fn abandon(&self, worker: &Arc<Worker>, op: &str, why: &str) {
        let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if w.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, worker)) {
            *w = None;
            let n = self.abandoned.fetch_add(1, Ordering::Relaxed) + 1;
            self.wedges.send_replace(n);
            crate::metrics::get().plugin_wedged.inc();
            crate::metrics::get().set_wedged(&self.instance, true);
            tracing::error!(plugin = %self.name, op = %op, abandoned = n, "plugin {} {op}: wedged: {why} (code that does not yield, in process); its thread is abandoned ({n} of at most {MAX_ABANDONED}) and the instance is created again in a process of its own, where such a call is killed; set isolation = \"process\" for this plugin", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn code_that_never_yields_times_out_and_the_runtime_stays_free() {
        let ex = Arc::new(Executor::new("spin"));
        let spin = async {
            loop {
                std::hint::spin_loop();
            }
        };
        // One runtime worker: if the call were polled here, this test would hang.
        let t = Instant::now();
        let r = ex.call("measure", spin, Duration::from_millis(200)).await;
        assert_eq!(r.unwrap_err().kind, ErrorKind::Timeout);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(ex.abandoned(), 1);
        // The next call gets a new thread and answers.
        let ok = ex
            .call(
                "measure",
                async { Ok("1".to_owned()) },
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(ok.unwrap(), "1");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_wedge_is_watched_and_named_until_the_instance_is_replaced() {
        let ex = Arc::new(Executor::new("spin-named"));
        let mut wedges = ex.wedges();
        let spin = async {
            loop {
                std::hint::spin_loop();
            }
        };
        let _ = ex.call("measure", spin, Duration::from_millis(100)).await;
        assert_eq!(*wedges.borrow_and_update(), 1);
        let named = |name: &str| crate::metrics::get().wedged().iter().any(|w| w == name);
        let instance = ex.instance.clone();
        assert!(named(&instance), "{instance} is named while wedged");
        drop(ex);
        assert!(
            !named(&instance),
            "{instance} is named after it was replaced"
        );
    }

    #[tokio::test]
    async fn an_async_hang_is_cancelled_without_abandoning_the_thread() {
        let ex = Arc::new(Executor::new("sleepy"));
        let sleepy = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok("never".to_owned())
        };
        let r = ex.call("measure", sleepy, Duration::from_millis(100)).await;
        assert_eq!(r.unwrap_err().kind, ErrorKind::Timeout);
        assert_eq!(ex.abandoned(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn past_the_bound_calls_fail_at_once_as_wedged() {
        let ex = Arc::new(Executor::new("spin"));
        for _ in 0..MAX_ABANDONED {
            let spin = async {
                loop {
                    std::hint::spin_loop();
                }
            };
            let _ = ex.call("measure", spin, Duration::from_millis(50)).await;
        }
        assert_eq!(ex.abandoned(), MAX_ABANDONED);
        let t = Instant::now();
        let e = ex
            .call(
                "measure",
                async { Ok("1".to_owned()) },
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(e.message.contains("wedged"), "{e:?}");
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
