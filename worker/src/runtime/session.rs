//! One broker session: a connection, a confirm channel for publishing, a
//! consumer channel per job type (one consumer per priority tier, see
//! [`tiers`]), and the control consumer for cancels.
//!
//! When anything in the session breaks (consumer stream error, failed publish
//! or ack), the session ends as lost: running jobs are stopped, nothing is
//! acked any more (the broker requeues their deliveries) and the worker
//! reconnects. On shutdown it stops consuming, waits for running jobs up to
//! the grace period, then stops the rest, which requeue themselves.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    Channel, Connection,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use trainyard_common::{
    amqp::{self, Mandatory},
    codec,
    control::CancelRequest,
    CommonError,
};

use trainyard_common::job::Priority;

use super::{held::Held, tiers, Shared};

/// After the grace period (or a lost session), how long stopped jobs get to unwind and
/// requeue. With [`CLOSE_WAIT`] and the grace period it makes a worker's stop budget, which a
/// pod's `terminationGracePeriodSeconds` must cover (scripts/validate-k8s.sh checks it).
pub const STOPPED_JOBS_WAIT: Duration = Duration::from_secs(30);
/// The last step of a shutdown: closing the broker connection.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How a session ended.
#[derive(Debug)]
pub enum End {
    /// Shut down on request; running jobs finished or were requeued.
    Shutdown,
    /// The connection or a channel broke.
    Lost(String),
}

/// Tokens and handles a job needs from its session.
#[derive(Debug, Clone)]
pub(crate) struct SessionCtx {
    /// The confirm channel events are published on (and retry queues declared).
    pub(crate) publish: Channel,
    /// Where the copies of deliveries go (retries, dead letters, hand-backs): mandatory, one at a
    /// time on a channel of their own, so a copy no queue takes is told apart (see [`Mandatory`]).
    pub(crate) copies: Mandatory,
    /// Fired when the session is lost: stop, do not ack.
    pub(crate) lost: CancellationToken,
    /// Fired when running jobs must stop (shutdown grace over, or session lost).
    pub(crate) stop_jobs: CancellationToken,
    /// The deliveries held unacked, per job type: named when the broker closes a channel.
    pub(crate) held: Held,
}

pub(crate) async fn run(shared: Arc<Shared>, shutdown: &CancellationToken) -> Result<End, CommonError> {
    let cfg = &shared.config;
    let conn = amqp::connect(&cfg.amqp_url, &format!("trainyard-worker {}", cfg.worker.id)).await?;
    let publish = amqp::confirm_channel(&conn).await?;
    for job_type in shared.registry.job_types() {
        cfg.topology.declare_job_type(&publish, &job_type).await?;
    }
    // A new session declares its retry queues again: a broker that lost its definitions (or
    // an operator) may have deleted them, and a retry to a missing queue is unroutable.
    if let Ok(mut declared) = shared.retry_queues.lock() {
        declared.clear();
    }
    let lost = CancellationToken::new();
    let stop_jobs = lost.child_token();
    let copies = Mandatory::open(&conn).await?;
    let sctx = SessionCtx { publish, copies, lost: lost.clone(), stop_jobs: stop_jobs.clone(), held: Held::default() };
    // Cancel requests are heard before the first job starts: a request published for a job
    // that started in between would find no queue bound and be dropped by the exchange.
    let control = start_control(&conn, &shared, &lost).await?;
    let jobs = TaskTracker::new();
    let consuming = match start_consumers(&conn, &shared, &sctx, &jobs).await {
        Ok(consuming) => consuming,
        Err(e) => {
            // The consumers started so far stop with the session, and take no job outside it.
            lost.cancel();
            control.abort();
            abandon(&conn, &jobs, &stop_jobs, "trainyard: session setup failed").await;
            return Err(e);
        }
    };
    shared.connected.store(true, Ordering::SeqCst);
    tracing::info!(types = ?shared.registry.job_types(), concurrency = cfg.concurrency, "worker consuming");

    let end = tokio::select! {
        _ = shutdown.cancelled() => None,
        _ = lost.cancelled() => Some("a consumer, publish or ack failed".to_string()),
    };
    consuming.stop.cancel();
    shared.connected.store(false, Ordering::SeqCst);

    if let Some(why) = end {
        control.abort();
        abandon(&conn, &jobs, &stop_jobs, "trainyard: session lost").await;
        return Ok(End::Lost(why));
    }
    // Cancel requests are still heard while the running jobs have their grace period: a job
    // cancelled then must not go on to succeed (and promote its model).
    shut_down(&shared, consuming, &jobs, &stop_jobs).await;
    control.abort();
    let _ = tokio::time::timeout(CLOSE_WAIT, conn.close(200, "trainyard: worker shutdown".into())).await;
    tracing::info!("worker stopped");
    Ok(End::Shutdown)
}

/// Ends a broken session: its jobs stopped at once (their deliveries return to the queue
/// with the connection), given [`STOPPED_JOBS_WAIT`] to unwind, then the connection closed.
async fn abandon(conn: &Connection, jobs: &TaskTracker, stop_jobs: &CancellationToken, why: &str) {
    stop_jobs.cancel();
    jobs.close();
    let _ = tokio::time::timeout(STOPPED_JOBS_WAIT, jobs.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(320, why.into())).await;
}

/// The job consumers of a session: one channel per job type, one consumer per priority tier.
struct Consuming {
    /// Every consumer, by channel and tag (to cancel them on shutdown).
    consumers: Vec<(Channel, String)>,
    /// The dispatch task of each job type.
    dispatchers: Vec<tokio::task::JoinHandle<()>>,
    /// Fired when no further delivery may start a job.
    stop: CancellationToken,
}

/// Opens a channel per job type with the worker's prefetch and consumes its tier queues.
async fn start_consumers(conn: &Connection, shared: &Arc<Shared>, sctx: &SessionCtx, jobs: &TaskTracker) -> Result<Consuming, CommonError> {
    let cfg = &shared.config;
    let mut consuming = Consuming { consumers: Vec::new(), dispatchers: Vec::new(), stop: CancellationToken::new() };
    for job_type in shared.registry.job_types() {
        let ch = conn.create_channel().await.map_err(CommonError::amqp("open a consumer channel"))?;
        ch.basic_qos(cfg.concurrency, BasicQosOptions { global: false })
            .await
            .map_err(CommonError::amqp(format!("set prefetch {} for {job_type}", cfg.concurrency)))?;
        let mut tier_consumers = Vec::new();
        for (priority, queue) in Priority::ALL.into_iter().zip(cfg.topology.tier_queues(&job_type)) {
            let tag = format!("{}/{job_type}/{priority}", cfg.worker.id);
            let consumer = ch
                .basic_consume(queue.as_str().into(), tag.as_str().into(), BasicConsumeOptions::default(), FieldTable::default())
                .await
                .map_err(CommonError::amqp(format!("consume {queue}")))?;
            tier_consumers.push(consumer);
            consuming.consumers.push((ch.clone(), tag));
        }
        let ctx = tiers::Dispatch { job_type: job_type.clone(), shared: shared.clone(), sctx: sctx.clone(), jobs: jobs.clone() };
        let limit = usize::from(cfg.concurrency);
        // Made for every job type of the registry when the worker was.
        let slots = shared.slots.get(&job_type).cloned().unwrap_or_else(|| Arc::new(tokio::sync::Semaphore::new(limit)));
        consuming.dispatchers.push(tokio::spawn(tiers::run(tier_consumers, ctx, slots, consuming.stop.clone())));
    }
    Ok(consuming)
}

/// Shutdown: no new deliveries, then the grace period for running jobs, then the rest are
/// stopped (they requeue themselves).
async fn shut_down(shared: &Shared, consuming: Consuming, jobs: &TaskTracker, stop_jobs: &CancellationToken) {
    for (ch, tag) in &consuming.consumers {
        let _ = ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
    }
    jobs.close();
    let running = shared.running_count.load(Ordering::SeqCst);
    if running > 0 {
        tracing::info!(running, grace_s = shared.config.grace_period.as_secs_f64(), "shutting down: waiting for running jobs");
    }
    if tokio::time::timeout(shared.config.grace_period, jobs.wait()).await.is_err() {
        tracing::warn!("grace period over: stopping running jobs and requeueing them");
        stop_jobs.cancel();
        let _ = tokio::time::timeout(STOPPED_JOBS_WAIT, jobs.wait()).await;
    }
    for handle in consuming.dispatchers {
        handle.abort();
    }
}

/// Consumes cancel requests from the control exchange on an exclusive queue.
async fn start_control(
    conn: &Connection,
    shared: &Arc<Shared>,
    lost: &CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, CommonError> {
    let ch = conn.create_channel().await.map_err(CommonError::amqp("open the control channel"))?;
    let q = ch
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
        .await
        .map_err(CommonError::amqp("declare the control queue"))?;
    let exchange = shared.config.topology.control_exchange();
    ch.queue_bind(q.name().clone(), exchange.as_str().into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .map_err(CommonError::amqp(format!("bind the control queue to {exchange}")))?;
    let mut consumer = ch
        .basic_consume(q.name().clone(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await
        .map_err(CommonError::amqp("consume the control queue"))?;
    let (shared, lost) = (shared.clone(), lost.clone());
    Ok(tokio::spawn(async move {
        let _ch = ch;
        while let Some(Ok(d)) = consumer.next().await {
            let ct = d.properties.content_type().as_ref().map(|s| s.as_str().to_string());
            match codec::decode::<CancelRequest>(ct.as_deref().or(Some(codec::JSON)), &d.data) {
                Ok(req) => {
                    let here = shared.cancels.cancel(&req.job_id);
                    tracing::info!(job_id = %req.job_id, by = %req.by, running_here = here, "cancel requested");
                }
                Err(e) => tracing::warn!(error = %e, "ignoring a malformed control message"),
            }
        }
        if !lost.is_cancelled() {
            tracing::warn!("control consumer closed");
            lost.cancel();
        }
    }))
}
