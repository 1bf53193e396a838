//! `trainyard serve`: the control plane in one process — recorder, scheduler,
//! event triggers, the demand metrics loop and the HTTP API — safe to run as
//! several replicas sharing a PostgreSQL store.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use lapin::{options::QueueDeclareOptions, types::FieldTable, Channel, Connection};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use trainyard_common::{amqp::connect, artifacts::ArtifactStore, metrics::ControlMetrics, topology::Topology, CommonError};

use crate::{
    admission::{board::AdmissionBoard, Admitter},
    api::{self, ApiState, Tokens},
    coalesce::Coalescer,
    config::ControlConfig,
    livelogs::LiveLogs,
    ops::{Ops, OpsError},
    recorder::Recorder,
    scheduler::Scheduler,
    store::{Store, StoreError},
    triggers::Triggers,
    workers::WorkerTable,
};

/// Job types known when no configuration names any.
pub const DEFAULT_JOB_TYPES: &[&str] = &["intent-train", "intent-eval", "noop"];

/// Settings of `trainyard serve`.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Broker URL.
    pub amqp_url: String,
    /// Topology names.
    pub topology: Topology,
    /// Job store URL.
    pub database_url: String,
    /// Artifact store location.
    pub artifacts: String,
    /// Known job types: declared at start-up, their gauges exported from then on.
    pub job_types: Vec<String>,
    /// API tokens.
    pub tokens: Tokens,
    /// Schedules and trigger rules.
    pub config: ControlConfig,
    /// Request body limit of the API.
    pub body_limit: usize,
    /// How often the demand gauges are refreshed.
    pub demand_interval: Duration,
    /// The broker's `consumer_timeout`: debounce windows must close well before it.
    pub consumer_timeout: Duration,
}

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Broker trouble.
    #[error(transparent)]
    Broker(#[from] CommonError),
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Setup trouble.
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// Metrics registration failed.
    #[error("failed to register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The configuration does not fit the settings (types served, consumer timeout).
    #[error("the configuration does not fit this control plane: {0}")]
    Settings(String),
    /// The HTTP server failed.
    #[error("failed to serve HTTP: {0}")]
    Http(std::io::Error),
    /// A configuration file is wrong.
    #[error("failed to read configuration {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Runs the control plane on `listener` until `shutdown`.
pub async fn serve(settings: ServeSettings, listener: tokio::net::TcpListener, shutdown: CancellationToken) -> Result<(), ServeError> {
    settings.config.check_settings(&settings.job_types, settings.consumer_timeout).map_err(ServeError::Settings)?;
    let store = Store::open(&settings.database_url).await?;
    let artifacts = ArtifactStore::open(&settings.artifacts)?;
    trainyard_common::artifacts::refuse_unfit(&artifacts).await?;
    let mut ops = Ops::new(store.clone(), artifacts.clone(), &settings.amqp_url, settings.topology.clone())?;
    let admission = AdmissionBoard::default();
    ops.admission = Some(admission.clone());
    ops.submitter.declare_shared().await?;
    for t in &settings.job_types {
        ops.submitter.declare_job_type(t).await?;
    }
    let registry = Registry::new();
    let metrics = ControlMetrics::new(&registry, &settings.job_types)?;
    let Background { mut tasks, workers, live_logs } = spawn_tasks(&settings, &ops, artifacts, &admission, &metrics, &shutdown);

    let tokens = Arc::new(settings.tokens.clone());
    let control = Arc::new(settings.config.clone());
    let state = ApiState { ops, tokens, registry, metrics: Some(metrics), shutdown: shutdown.clone(), workers, live_logs, control };
    let app = api::router(state, settings.body_limit);
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, job_types = ?settings.job_types, "control plane serving");
    let stop = shutdown.clone();
    let served = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    store.close().await;
    served.map_err(ServeError::Http)
}

/// Starts the control plane's background tasks: the recorder, the admitters and their board,
/// the coalescer, the demand loop, the scheduler and triggers (when configured), and the
/// followers of worker heartbeats and live logs that the API reads.
fn spawn_tasks(
    settings: &ServeSettings,
    ops: &Ops,
    artifacts: ArtifactStore,
    admission: &AdmissionBoard,
    metrics: &ControlMetrics,
    shutdown: &CancellationToken,
) -> Background {
    let mut tasks = tokio::task::JoinSet::new();
    let store = &ops.store;
    let (workers, live_logs) = (WorkerTable::default(), LiveLogs::default());

    let recorder = Recorder::new(store.clone(), settings.topology.clone(), &settings.amqp_url, Some(metrics.clone()));
    tasks.spawn({
        let stop = shutdown.clone();
        async move { recorder.run(stop).await }
    });
    let policies = &settings.config.policies;
    for admitter in Admitter::all(&settings.job_types, policies, store, &artifacts, &settings.topology, &settings.amqp_url, &workers) {
        let stop = shutdown.clone();
        tasks.spawn(async move { admitter.run(stop).await });
    }
    tasks.spawn({
        let (stop, board, s) = (shutdown.clone(), admission.clone(), settings.clone());
        async move { board.run(&s.amqp_url, &s.topology, stop).await }
    });
    let coalescer =
        Coalescer::new(store.clone(), artifacts, settings.topology.clone(), &settings.amqp_url, settings.config.policies.clone());
    tasks.spawn({
        let stop = shutdown.clone();
        async move { coalescer.run(stop).await }
    });
    tasks.spawn({
        let (stop, store, metrics, s, board) = (shutdown.clone(), store.clone(), metrics.clone(), settings.clone(), admission.clone());
        let workers = workers.clone();
        async move { demand_loop(&s, &store, &metrics, (&board, &workers), stop).await }
    });
    if !settings.config.schedules.is_empty() {
        let scheduler = Scheduler::new(settings.config.schedules.clone(), store.clone(), ops.submitter.clone(), Some(metrics.clone()));
        tasks.spawn({
            let stop = shutdown.clone();
            async move { scheduler.run(stop).await }
        });
    }
    if !settings.config.triggers.is_empty() {
        let triggers = Triggers::new(settings.config.triggers.clone(), ops.submitter.clone(), &settings.amqp_url, Some(metrics.clone()))
            .with_store(store.clone());
        tasks.spawn({
            let stop = shutdown.clone();
            async move { triggers.run(stop).await }
        });
    }

    tasks.spawn({
        let (stop, workers, s) = (shutdown.clone(), workers.clone(), settings.clone());
        async move { workers.run(&s.amqp_url, &s.topology, stop).await }
    });

    tasks.spawn({
        let (stop, logs, s) = (shutdown.clone(), live_logs.clone(), settings.clone());
        async move { logs.run(&s.amqp_url, &s.topology, stop).await }
    });
    Background { tasks, workers, live_logs }
}

/// The control plane's background tasks, and what the API reads of them.
struct Background {
    tasks: tokio::task::JoinSet<()>,
    workers: WorkerTable,
    live_logs: LiveLogs,
}

/// The status counts (`trainyard_jobs_by_status`) read every row of the job store, so they wait
/// this many times as long as the last count took (and at least one demand interval): on a
/// million-job PostgreSQL store (662 ms a count) every ~13 s instead of every 5 s, at most a
/// twentieth of one connection's time, while the demand gauges stay as fresh as before.
const STATUS_COUNT_SPACING: u32 = 20;

async fn demand_loop(
    s: &ServeSettings,
    store: &Store,
    metrics: &ControlMetrics,
    (board, workers): (&AdmissionBoard, &WorkerTable),
    shutdown: CancellationToken,
) {
    let mut conn: Option<(Connection, Channel)> = None;
    let mut next_count = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_count {
            let started = tokio::time::Instant::now();
            if let Err(e) = update_status_counts(store, metrics).await {
                tracing::warn!(error = %e, "failed to count the jobs by status");
            }
            next_count = started + started.elapsed() * STATUS_COUNT_SPACING;
        }
        if conn.as_ref().is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected()) {
            conn = match connect(&s.amqp_url, "trainyard-demand").await {
                Ok(c) => match c.create_channel().await {
                    Ok(ch) => Some((c, ch)),
                    Err(e) => {
                        tracing::warn!(error = %e, "demand: failed to open a channel");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "demand: failed to connect");
                    None
                }
            };
        }
        let refreshed = match &conn {
            Some((_, ch)) => {
                let held = workers.waiting_by_type(chrono::Utc::now());
                update_demand(ch, &s.topology, store, metrics, (board, &held), &s.job_types).await.map_err(|e| e.to_string())
            }
            None => Err("no broker connection".to_string()),
        };
        if let Err(e) = refreshed {
            // A demand not known now is no demand at all: the series goes, so that KEDA falls
            // back (an empty answer is an error there) and `TrainyardAutoscalingSignalMissing` fires; kept,
            // it went on saying what it said before the store or the broker failed.
            metrics.jobs_demand.reset();
            tracing::warn!(error = %e, "failed to refresh the demand gauges: trainyard_jobs_demand removed until the next refresh");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(s.demand_interval) => {}
        }
    }
}

/// A queue's ready messages and consumers, from a passive declare.
async fn queue_counts(ch: &Channel, queue: &str) -> Result<(i64, i64), CommonError> {
    let q = ch
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .map_err(CommonError::amqp(format!("inspect queue {queue}")))?;
    Ok((i64::from(q.message_count()), i64::from(q.consumer_count())))
}

/// Refreshes the per-type gauges: `trainyard_jobs_demand` = ready messages in
/// the work queues (all priority tiers) + jobs recorded as running + jobs waiting for admission
/// that could be admitted now (not those latest wins will supersede, nor those of a bot at its
/// `max_running_per_bot`: more workers would not run them; those too are in
/// `trainyard_jobs_admission_waiting`) + jobs live workers hold and have not started
/// (`held`, from their heartbeats: a busy worker's prefetch on each tier, which the broker
/// counts neither ready nor running; a GPU worker on a long training that held a high and a low
/// job showed a demand of 1, and nothing scaled out); queue and dead-letter depths;
/// consumers (of the busiest tier queue: every worker consumes each tier of its types);
/// running jobs; the age of the oldest queued job. Jobs by status: [`update_status_counts`].
pub async fn update_demand(
    ch: &Channel,
    topo: &Topology,
    store: &Store,
    m: &ControlMetrics,
    (board, held): (&AdmissionBoard, &std::collections::BTreeMap<String, i64>),
    job_types: &[String],
) -> Result<(), ServeError> {
    let running = store.running_by_type().await?;
    let oldest = store.oldest_queued_by_type().await?;
    let now = chrono::Utc::now();
    for t in job_types {
        let (mut ready, mut consumers) = (0, 0);
        for queue in topo.tier_queues(t) {
            let (n, c) = queue_counts(ch, &queue).await?;
            ready += n;
            consumers = consumers.max(c);
        }
        let dead = queue_counts(ch, &topo.dead_queue(t)).await?.0;
        let run = running.get(t).copied().unwrap_or(0);
        let l = [t.as_str()];
        m.queue_ready.with_label_values(&l).set(ready);
        m.queue_dead.with_label_values(&l).set(dead);
        m.queue_consumers.with_label_values(&l).set(consumers);
        m.jobs_running.with_label_values(&l).set(run);
        let snap = board.get(t);
        m.admission_waiting.with_label_values(&l).set(snap.as_ref().map_or(0, |s| s.waiting as i64));
        let runnable = snap.map_or(0, |s| s.demand() as i64);
        let held = held.get(t).copied().unwrap_or(0);
        m.jobs_demand.with_label_values(&l).set(ready + run + runnable + held);
        let age = oldest.get(t).map(|at| (now - *at).num_milliseconds().max(0) as f64 / 1000.0).unwrap_or(0.0);
        m.oldest_waiting.with_label_values(&l).set(age);
    }
    Ok(())
}

/// Refreshes `trainyard_jobs_by_status` (a count of every row: see [`STATUS_COUNT_SPACING`]).
pub async fn update_status_counts(store: &Store, m: &ControlMetrics) -> Result<(), ServeError> {
    let counts = store.count_by_type_and_status().await?;
    m.jobs_by_status.reset();
    for (t, status, n) in counts {
        m.jobs_by_status.with_label_values(&[t.as_str(), status.as_str()]).set(n);
    }
    Ok(())
}

/// Every exchange that submitters, control planes and workers of `t` declare, the fleeting
/// fanouts (heartbeats, live logs, admission snapshots) included: what tearing down a prefix
/// deletes (the tests, `scripts/chaos.sh`, the bench).
pub fn exchanges(t: &Topology) -> [String; 10] {
    [
        t.submit_exchange(),
        t.jobs_exchange(),
        t.retry_exchange(),
        t.dead_exchange(),
        t.events_exchange(),
        t.control_exchange(),
        t.triggers_exchange(),
        t.heartbeats_exchange(),
        trainyard_common::livelog::exchange(t),
        crate::admission::board::exchange(t),
    ]
}

/// Every queue that submitters, control planes and workers of `t` declare for the job types
/// `job_types` (work tiers, dead letters, admission), and the shared ones (the audit stream,
/// the dead-letter recorder queue, the coalescing and trigger queues, the recorder queue of
/// releases before): what tearing down a prefix deletes, besides retry queues (named by delay).
pub fn queues(t: &Topology, job_types: &[&str]) -> Vec<String> {
    let mut queues = vec![
        t.events_log(),
        t.dead_recorder_queue(),
        t.legacy_recorder_queue(),
        crate::coalesce::Coalescer::queue_name(t),
        crate::triggers::queue_name(t),
    ];
    for ty in job_types {
        queues.extend(t.tier_queues(ty));
        queues.push(t.dead_queue(ty));
        queues.push(t.admission_queue(ty));
    }
    queues
}
