//! The consumer runtime.
//!
//! One [`Worker`] holds one broker connection at a time ([`session`]) and
//! reconnects with backoff when it is lost. Per job type it has a channel
//! whose prefetch equals that type's free slots, so no job waits parked
//! behind a busy one. Each delivery is handled by [`process`]: decode, run
//! with a timeout and cancellation, then make the outcome durable (event,
//! retry copy or dead letter confirmed by the broker) **before** the ack.

pub mod cli;
pub mod disposition;
mod heartbeat;
mod held;
pub mod http;
pub mod joblog;
mod livelog;
pub mod process;
mod running;
pub mod session;
pub mod store_retry;
pub mod tiers;

/// The tracing target prefix of the runtime's own lines (`trainyard_worker::runtime`).
pub(crate) const TARGET: &str = module_path!();

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trainyard_common::{
    artifacts::ArtifactStore,
    codec,
    metrics::WorkerMetrics,
    reconnect::{self, ReconnectPolicy, SessionEnd},
    topology::Topology,
    CommonError, WorkerInfo,
};

use crate::handler::Registry;
pub use disposition::Backoff;
use joblog::JobLogs;

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Broker URL.
    pub amqp_url: String,
    /// Exchange and queue names.
    pub topology: Topology,
    /// Concurrent jobs per job type (the prefetch of its channel).
    pub concurrency: u16,
    /// On shutdown, how long running jobs may take to finish before they are stopped and requeued.
    pub grace_period: Duration,
    /// Larger job messages are dead-lettered unread.
    pub max_message_bytes: usize,
    /// Delays of retries.
    pub backoff: Backoff,
    /// Where outcomes, logs and models go.
    pub artifacts: ArtifactStore,
    /// Root of datasets.
    pub data_dir: PathBuf,
    /// This worker's id and attributes, reported in events.
    pub worker: WorkerInfo,
    /// Longest wait between reconnect attempts.
    pub reconnect_max: Duration,
    /// Seconds between two heartbeats ([`heartbeat`]); at most
    /// [`trainyard_common::heartbeat::MAX_INTERVAL_S`] so that a stopped worker shows as gone within 30 s.
    pub heartbeat_interval: Duration,
    /// The training device setting, as reported in heartbeats.
    pub device: String,
    /// The broker's `consumer_timeout`: how long it lets a delivery stay unacked before it
    /// closes the channel and requeues the job. RabbitMQ does not tell its clients, so it is
    /// a setting; a job whose `timeout_s` is longer fails at once, permanently.
    pub consumer_timeout: Duration,
}

/// RabbitMQ's default `consumer_timeout` (30 min), the default of [`WorkerConfig::consumer_timeout`].
pub use trainyard_common::job::DEFAULT_CONSUMER_TIMEOUT_S;

impl WorkerConfig {
    /// Settings for `amqp_url` and `topology` with laptop defaults for the rest.
    pub fn new(amqp_url: impl Into<String>, topology: Topology, artifacts: ArtifactStore) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            topology,
            concurrency: 1,
            grace_period: Duration::from_secs(25),
            max_message_bytes: codec::DEFAULT_MAX_MESSAGE_BYTES,
            backoff: Backoff::default(),
            artifacts,
            data_dir: trainyard_common::config::data_dir(),
            worker: WorkerInfo { id: default_worker_id(), attributes: Default::default() },
            reconnect_max: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(trainyard_common::heartbeat::DEFAULT_INTERVAL_S),
            device: "auto".into(),
            consumer_timeout: Duration::from_secs(DEFAULT_CONSUMER_TIMEOUT_S),
        }
    }
}

/// `POD_NAME`, else `<hostname>-<pid>`.
pub fn default_worker_id() -> String {
    match pod_name() {
        Some(pod) => pod,
        None => format!("{}-{}", host_name(), std::process::id()),
    }
}

/// `POD_NAME` when set.
pub(crate) fn pod_name() -> Option<String> {
    std::env::var("POD_NAME").ok().filter(|p| !p.is_empty())
}

/// The machine's (or container's) host name.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into())
}

/// Errors that stop a worker from starting.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Bad settings.
    #[error("invalid worker settings: {0}")]
    Config(String),
    /// Broker or store trouble.
    #[error(transparent)]
    Common(#[from] CommonError),
}

/// A registration's token, and its flag that says a cancel request fired it.
type CancelHandle = (CancellationToken, Arc<AtomicBool>);

/// Cancel handles of running jobs, by job id.
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    /// Every registration of a job (a duplicate delivery may be handled here at the same time).
    running: Mutex<HashMap<String, Vec<CancelHandle>>>,
}

impl Cancels {
    /// Registers `job_id` from before its outcome record and cancel marker are looked up, so
    /// that a cancel request arriving after that look-up is still heard: the job then ends
    /// cancelled before it starts, or its handler sees the token fired. Unregistered when the
    /// returned handle is dropped.
    pub(crate) fn register(&self, job_id: &str, token: CancellationToken) -> Registration<'_> {
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut r) = self.running.lock() {
            r.entry(job_id.to_string()).or_default().push((token.clone(), flag.clone()));
        }
        Registration { cancels: self, job_id: job_id.to_string(), token, flag }
    }
    /// Ids of the jobs registered (running or about to start), sorted.
    pub(crate) fn running_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.running.lock().map(|r| r.keys().cloned().collect()).unwrap_or_default();
        ids.sort();
        ids
    }
    /// Cancels every registration of a job; `false` when it does not run here.
    pub(crate) fn cancel(&self, job_id: &str) -> bool {
        let registered = self.running.lock().ok().and_then(|r| r.get(job_id).cloned()).unwrap_or_default();
        for (token, flag) in &registered {
            flag.store(true, Ordering::SeqCst);
            token.cancel();
        }
        !registered.is_empty()
    }
}

/// A job's cancel handle while this worker holds its delivery ([`Cancels::register`]).
pub(crate) struct Registration<'a> {
    cancels: &'a Cancels,
    job_id: String,
    /// Fired by a cancel request (and by the session's stop).
    pub(crate) token: CancellationToken,
    flag: Arc<AtomicBool>,
}

impl Registration<'_> {
    /// Whether a cancel request for the job arrived.
    pub(crate) fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        // Only its own entry: another delivery of the job may be registered too.
        if let Ok(mut r) = self.cancels.running.lock() {
            if let Some(entries) = r.get_mut(&self.job_id) {
                entries.retain(|(_, flag)| !Arc::ptr_eq(flag, &self.flag));
                if entries.is_empty() {
                    r.remove(&self.job_id);
                }
            }
        }
    }
}

/// State shared by the sessions of a worker and its jobs.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: WorkerConfig,
    pub(crate) registry: Registry,
    pub(crate) metrics: WorkerMetrics,
    pub(crate) logs: JobLogs,
    pub(crate) cancels: Cancels,
    pub(crate) running: watch::Sender<usize>,
    pub(crate) running_count: AtomicUsize,
    pub(crate) connected: AtomicBool,
    pub(crate) retry_queues: Mutex<HashSet<(String, u64)>>,
    /// The job slots of each job type, for the worker's life: a job a lost session could not
    /// stop keeps its slot into the next session, which starts only what is left (each session
    /// had slots of its own, and ran the same job again beside the one still running).
    pub(crate) slots: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Deliveries received and not started yet, by job type (see [`tiers::Waiting`]).
    pub(crate) waiting: BTreeMap<String, Arc<AtomicUsize>>,
    /// Fired when the worker stopped (after its jobs were settled): the heartbeat says goodbye.
    pub(crate) stopped: CancellationToken,
}

impl Shared {
    pub(crate) fn job_started(&self, job_type: &str) {
        let n = self.running_count.fetch_add(1, Ordering::SeqCst) + 1;
        self.running.send_replace(n);
        self.metrics.jobs_running.with_label_values(&[job_type]).inc();
        self.update_free_slots(n);
    }
    pub(crate) fn job_finished(&self, job_type: &str) {
        let n = self.running_count.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        self.running.send_replace(n);
        self.metrics.jobs_running.with_label_values(&[job_type]).dec();
        self.update_free_slots(n);
    }
    fn update_free_slots(&self, running: usize) {
        let slots = usize::from(self.config.concurrency) * self.registry.job_types().len();
        self.metrics.free_slots.set(slots.saturating_sub(running) as i64);
    }
}

/// `concurrency` slots for each job type of `registry`.
fn registry_slots(registry: &Registry, concurrency: u16) -> HashMap<String, Arc<tokio::sync::Semaphore>> {
    registry.job_types().into_iter().map(|t| (t, Arc::new(tokio::sync::Semaphore::new(usize::from(concurrency))))).collect()
}

/// A worker: consumes the queues of its registry's job types until shut down.
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    /// A worker running `registry`'s job types, registering its metrics in `metrics_registry`
    /// and capturing job logs through `logs` (whose layer must be installed in the subscriber).
    pub fn new(
        config: WorkerConfig,
        registry: Registry,
        metrics_registry: &prometheus::Registry,
        logs: JobLogs,
    ) -> Result<Self, RuntimeError> {
        if registry.job_types().is_empty() {
            return Err(RuntimeError::Config("no job types to consume".into()));
        }
        if config.concurrency == 0 {
            return Err(RuntimeError::Config("concurrency (--concurrency) must be at least 1".into()));
        }
        let beat = config.heartbeat_interval;
        if beat.is_zero() || beat > Duration::from_secs(trainyard_common::heartbeat::MAX_INTERVAL_S) {
            let max = trainyard_common::heartbeat::MAX_INTERVAL_S;
            return Err(RuntimeError::Config(format!("the heartbeat interval (--heartbeat-s) must be 1 to {max} s, not {beat:?}")));
        }
        let metrics =
            WorkerMetrics::new(metrics_registry, &registry.job_types()).map_err(|e| RuntimeError::Config(format!("metrics: {e}")))?;
        let (running, _) = watch::channel(0);
        let slots = registry_slots(&registry, config.concurrency);
        let waiting = registry.job_types().into_iter().map(|t| (t, Arc::default())).collect();
        let shared = Shared {
            config,
            registry,
            metrics,
            logs,
            cancels: Cancels::default(),
            running,
            running_count: AtomicUsize::new(0),
            connected: AtomicBool::new(false),
            retry_queues: Mutex::new(HashSet::new()),
            slots,
            waiting,
            stopped: CancellationToken::new(),
        };
        shared.update_free_slots(0);
        Ok(Self { shared: Arc::new(shared) })
    }

    /// The number of running jobs, as it changes (for pod-deletion-cost).
    pub fn running(&self) -> watch::Receiver<usize> {
        self.shared.running.subscribe()
    }

    /// Is the worker connected to the broker now?
    pub fn connected_flag(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.connected.load(Ordering::SeqCst)
    }

    /// Runs until `shutdown` fires, then stops consuming, gives running jobs
    /// the grace period, requeues the unfinished ones and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let shared = &self.shared;
        let policy =
            ReconnectPolicy { base: Duration::from_millis(250), max: shared.config.reconnect_max, healthy_after: Duration::from_secs(30) };
        let beats = tokio::spawn(heartbeat::run(shared.clone()));
        let live_logs = tokio::spawn(livelog::run(shared.clone()));
        let shutdown = &shutdown;
        let session = || async move {
            match session::run(shared.clone(), shutdown).await {
                Ok(session::End::Shutdown) => SessionEnd::Shutdown,
                Ok(session::End::Lost(why)) => SessionEnd::Lost(why),
                Err(e) => SessionEnd::Lost(format!("broker session failed: {e}")),
            }
        };
        reconnect::run(policy, shutdown, session, |why, delay| {
            tracing::warn!(reason = %why, "lost the broker session; reconnecting in {delay:?}");
            shared.connected.store(false, Ordering::SeqCst);
            shared.metrics.reconnects_total.inc();
        })
        .await;
        // The goodbye goes after the running jobs were settled.
        shared.stopped.cancel();
        let _ = beats.await;
        let _ = live_logs.await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::Cancels;

    #[test]
    fn a_second_registration_of_a_job_leaves_the_first_cancellable() {
        let cancels = Cancels::default();
        let first = cancels.register("job", CancellationToken::new());
        let second = cancels.register("job", CancellationToken::new());
        drop(second);
        assert_eq!(cancels.running_ids(), ["job"]);
        assert!(cancels.cancel("job"), "the first delivery is still registered");
        assert!(first.requested() && first.token.is_cancelled());
        drop(first);
        assert!(!cancels.cancel("job") && cancels.running_ids().is_empty());
    }
}
