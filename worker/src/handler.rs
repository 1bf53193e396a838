//! The [`JobHandler`] trait, the context a job runs in, and the registry of job types.
//!
//! A handler validates its `params` up front and then runs one attempt. Its
//! error carries the disposition ([`ErrorKind`]): transient errors are retried
//! with backoff, permanent ones go to the dead-letter queue at once.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use trainyard_common::{artifacts::ArtifactStore, ErrorKind, JobSpec, WorkerInfo};

/// A failed attempt: what went wrong and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct JobError {
    /// The disposition.
    pub kind: ErrorKind,
    /// What failed, with which input.
    pub message: String,
}

impl JobError {
    /// Might work next time: retried with backoff.
    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Transient, message: message.into() }
    }
    /// Will never work: dead-lettered at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Permanent, message: message.into() }
    }
    /// The handler panicked: permanent (a panic is a bug, not bad luck), with its message.
    pub fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let what = payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str));
        Self::permanent(format!("the handler panicked: {}", what.unwrap_or("(no message)")))
    }
    /// The attempt ran past its time limit.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Timeout, message: message.into() }
    }
    /// Stopped on request.
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Cancelled, message: message.into() }
    }
}

/// Sends live progress (free-form JSON: epoch, loss, accuracy…) of a running
/// attempt. The runtime publishes each as a `progress` event. Never blocks.
#[derive(Debug, Clone)]
pub struct Progress {
    tx: mpsc::UnboundedSender<serde_json::Value>,
}

impl Progress {
    /// A progress sender and the receiver the runtime drains.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<serde_json::Value>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }
    /// Reports progress. Safe to call from any thread, including a training thread.
    pub fn report(&self, value: serde_json::Value) {
        let _ = self.tx.send(value);
    }
}

/// Keeps a job's slot busy while work of its attempt may still run. The runtime gives the slot
/// to the next job only once every clone is dropped: work that outlives the handler's future
/// (a thread of its own that ignored its stop when the attempt timed out) would otherwise run
/// beside the next job, or beside the retry of its own (two trainings on one GPU).
#[derive(Debug, Clone, Default)]
pub struct SlotHold(Arc<()>);

impl SlotHold {
    /// Waits until this is the last clone, saying so once when it has to wait.
    pub(crate) async fn released(self, job_id: &str) {
        if Arc::strong_count(&self.0) == 1 {
            return;
        }
        tracing::warn!(job_id, "the attempt has ended but its thread still runs: its slot stays busy until the thread stops");
        while Arc::strong_count(&self.0) > 1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs `f` on a new OS thread (CPU-heavy work never runs on the async runtime) and awaits
/// its result; the thread keeps `slot` until it ends, even when the attempt has been given
/// up. A panic there is a bug: the job ends `dead` with its message ([`JobError::panicked`]).
pub async fn on_thread<F>(name: &str, slot: SlotHold, f: F) -> Result<serde_json::Value, JobError>
where
    F: FnOnce() -> Result<serde_json::Value, JobError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(result.unwrap_or_else(|p| Err(JobError::panicked(&*p))));
            drop(slot);
        })
        .map_err(|e| JobError::transient(format!("failed to start the {name} thread: {e}")))?;
    rx.await.unwrap_or_else(|_| Err(JobError::transient(format!("the {name} thread panicked"))))
}

/// Everything an attempt of a job may use.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job, decoded and validated.
    pub spec: JobSpec,
    /// The real attempt number (1-based).
    pub attempt: u32,
    /// The job's run: 0 as submitted, one more after each dead-letter replay.
    pub run: u32,
    /// How many times the broker redelivered this attempt (0 normally; > 0
    /// after a crash, preemption or lost connection: resume from a checkpoint).
    pub redelivery: u32,
    /// The artifact store.
    pub artifacts: ArtifactStore,
    /// The root of datasets; job params name paths relative to it.
    pub data_dir: PathBuf,
    /// Cancelled when the job must stop: cancel request, timeout or shutdown.
    /// Long jobs check it between batches.
    pub cancel: CancellationToken,
    /// Live progress.
    pub progress: Progress,
    /// The worker running the attempt and its attributes.
    pub worker: WorkerInfo,
    /// Keeps the job's slot busy while a clone lives: move one into work that may outlive
    /// the handler's future ([`on_thread`] does).
    pub slot: SlotHold,
}

/// A job type.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Checks `params` before running; an error here is permanent.
    fn validate(&self, params: &serde_json::Value) -> Result<(), JobError>;

    /// Runs one attempt and returns its result (stored and published in the
    /// `succeeded` event). Must return promptly once `ctx.cancel` fires.
    /// CPU-heavy work belongs on its own thread, never on the async runtime.
    async fn run(&self, ctx: JobContext) -> Result<serde_json::Value, JobError>;
}

/// The job types a worker serves, by name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn JobHandler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds (or replaces) a job type.
    pub fn register(mut self, job_type: impl Into<String>, handler: impl JobHandler) -> Self {
        self.handlers.insert(job_type.into(), Arc::new(handler));
        self
    }
    /// The handler of a job type.
    pub fn get(&self, job_type: &str) -> Option<Arc<dyn JobHandler>> {
        self.handlers.get(job_type).cloned()
    }
    /// The registered job types.
    pub fn job_types(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }
    /// Keeps only `types`; unknown names are an error listing what is available.
    pub fn only(&self, types: &[String]) -> Result<Self, String> {
        let mut out = Self::new();
        for t in types {
            let h = self.handlers.get(t).ok_or_else(|| format!("unknown job type {t:?}; this worker knows {:?}", self.job_types()))?;
            out.handlers.insert(t.clone(), h.clone());
        }
        Ok(out)
    }
}
