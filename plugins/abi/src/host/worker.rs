//! The dedicated thread of one loaded plugin. Callers queue jobs on a channel and wait for the
//! reply with a timeout; the thread runs one job at a time through an [`Executor`] (a dylib's
//! function table or an in-process [`Plugin`](crate::Plugin)).
//!
//! When a call times out the caller gets [`HostError::Timeout`] at once and the job's cancel
//! flag is set. A thread cannot be killed safely, so the stuck call is left to finish on its
//! own; until it does, the plugin is *stalled* and every new call fails fast with
//! [`HostError::Stalled`] instead of queueing behind it. When the stuck call returns (a plugin
//! that polls the flag returns promptly), the plugin is usable again. Jobs that time out while
//! still queued are skipped, not run, and do not stall the plugin.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::HostError;
use crate::plugin::{Method, NativeHost, NativeProgress};

/// One progress report from a running call.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Share of the work done, in `[0, 1]`.
    pub fraction: f64,
    /// The plugin's detail (step, loss, ...); `null` if it sent none or sent invalid JSON.
    pub detail: Value,
}

/// Where a call's progress goes. Called on the plugin's worker thread, so it should be quick
/// (update a job record, send on a channel). Reports after the call timed out are dropped.
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// Services a call may ask of the host while it runs ([`crate::CallContext::host_call`]):
/// `(service, request) → reply`. Runs on the plugin's worker thread.
pub type HostService = Arc<dyn Fn(&str, &Value) -> Result<Value, String> + Send + Sync>;

/// Runs one call of a plugin and returns the raw reply bytes, or why there are none.
pub(crate) trait Executor: Send + 'static {
    fn execute(
        &self,
        method: Method,
        input: &[u8],
        cancel: &AtomicBool,
        progress: Option<NativeProgress<'_>>,
        host: Option<NativeHost<'_>>,
    ) -> Result<Vec<u8>, String>;
}

struct Job {
    id: u64,
    method: Method,
    input: Vec<u8>,
    cancel: Arc<AtomicBool>,
    progress: Option<ProgressSink>,
    host: Option<HostService>,
    reply: mpsc::SyncSender<Result<Vec<u8>, String>>,
}

#[derive(Default)]
struct State {
    running: Option<u64>,
    stalled: Option<Stall>,
}

struct Stall {
    method: Method,
    at: Instant,
}

/// The handle on one plugin's worker thread; the thread ends when this is dropped and the
/// current job (if any) returns.
pub(crate) struct Worker {
    plugin: String,
    tx: mpsc::Sender<Job>,
    state: Arc<Mutex<State>>,
    next_id: AtomicU64,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state is two plain fields updated atomically under the lock; a panic elsewhere
    // cannot leave it half-written.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Worker {
    /// Starts the thread `plugin-<name>`.
    pub fn spawn(plugin: &str, executor: Box<dyn Executor>) -> Result<Worker, HostError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let state = Arc::new(Mutex::new(State::default()));
        let thread_state = Arc::clone(&state);
        std::thread::Builder::new()
            .name(format!("plugin-{plugin}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    run_job(&*executor, &thread_state, job);
                }
            })
            .map_err(|source| HostError::Spawn {
                plugin: plugin.to_string(),
                source,
            })?;
        Ok(Worker {
            plugin: plugin.to_string(),
            tx,
            state,
            next_id: AtomicU64::new(0),
        })
    }

    /// Runs `method` on the worker and waits up to `timeout` (queueing included) for the raw
    /// reply. Blocks the calling thread; async callers use `spawn_blocking`.
    pub fn call(
        &self,
        method: Method,
        input: Vec<u8>,
        timeout: Duration,
        cancel: Arc<AtomicBool>,
        progress: Option<ProgressSink>,
        host: Option<HostService>,
    ) -> Result<Result<Vec<u8>, String>, HostError> {
        if let Some(stall) = &lock(&self.state).stalled {
            return Err(HostError::Stalled {
                plugin: self.plugin.clone(),
                method: stall.method,
                since: stall.at.elapsed(),
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = mpsc::sync_channel(1);
        let job = Job {
            id,
            method,
            input,
            cancel: Arc::clone(&cancel),
            progress,
            host,
            reply,
        };
        self.tx.send(job).map_err(|_| HostError::WorkerGone {
            plugin: self.plugin.clone(),
        })?;
        match rx.recv_timeout(timeout) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Disconnected) => Err(HostError::WorkerGone {
                plugin: self.plugin.clone(),
            }),
            Err(RecvTimeoutError::Timeout) => {
                cancel.store(true, Ordering::Release);
                {
                    let mut st = lock(&self.state);
                    if st.running == Some(id) {
                        st.stalled = Some(Stall {
                            method,
                            at: Instant::now(),
                        });
                    }
                }
                // The reply may have landed between the timeout and the lock; the worker
                // cleared any stall when it finished, so the answer is simply usable.
                if let Ok(r) = rx.try_recv() {
                    return Ok(r);
                }
                Err(HostError::Timeout {
                    plugin: self.plugin.clone(),
                    method,
                    timeout,
                })
            }
        }
    }
}

fn run_job(executor: &dyn Executor, state: &Mutex<State>, job: Job) {
    {
        let mut st = lock(state);
        // Timed out while queued: the caller is gone, do not start it.
        if job.cancel.load(Ordering::Acquire) {
            return;
        }
        st.running = Some(job.id);
    }
    let cancel = &*job.cancel;
    let sink = job.progress.clone();
    let gate = move |fraction: f64, bytes: &[u8]| {
        let Some(sink) = &sink else { return };
        if cancel.load(Ordering::Acquire) {
            return;
        }
        let detail = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(bytes).unwrap_or(Value::Null)
        };
        // A panicking host closure must not unwind into the plugin's C frame.
        let _ = panic::catch_unwind(AssertUnwindSafe(|| sink(Progress { fraction, detail })));
    };
    let progress: Option<NativeProgress<'_>> = if job.progress.is_some() {
        Some(&gate)
    } else {
        None
    };
    let service = job.host.clone();
    let host_fn = move |name: &str, request: &Value| -> Result<Value, String> {
        let Some(service) = &service else {
            return Err(format!("the host offers no `{name}` service to this call"));
        };
        panic::catch_unwind(AssertUnwindSafe(|| service(name, request)))
            .unwrap_or_else(|_| Err(format!("the host's `{name}` service panicked")))
    };
    let host: Option<NativeHost<'_>> = job.host.as_ref().map(|_| &host_fn as NativeHost<'_>);
    let out = panic::catch_unwind(AssertUnwindSafe(|| {
        executor.execute(job.method, &job.input, cancel, progress, host)
    }))
    .unwrap_or_else(|_| Err("the host side of the call panicked".to_string()));
    {
        let mut st = lock(state);
        st.running = None;
        st.stalled = None;
    }
    // The caller may have timed out and dropped its receiver; nothing to do then.
    let _ = job.reply.send(out);
}
