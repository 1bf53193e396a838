//! Submitting jobs and following them to their outcome.

use std::time::Duration;

use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties, Channel, Connection,
};
use trainyard_common::{
    amqp::{connect, publish_confirmed},
    codec, headers,
    topology::Topology,
    CommonError, JobEvent, JobSpec, JobStatus,
};

use crate::pool::{self, ChannelPool};

/// How many times a job's `queued` event is published before it is given up (logged).
const EVENT_TRIES: u32 = 3;
/// How long a try of a `queued` event waits for a channel of the pool.
const EVENT_POOL_WAIT: Duration = Duration::from_secs(5);

/// Publishes jobs: confirmed, `mandatory` (an unknown job type is an error,
/// never a silent drop), persistent, then records a `queued` event.
#[derive(Debug, Clone)]
pub struct Submitter {
    pool: ChannelPool,
    topology: Topology,
    url: String,
    shared_declared: std::sync::Arc<tokio::sync::OnceCell<()>>,
}

impl Submitter {
    /// A submitter publishing to the broker at `url` (connections are made lazily).
    pub fn new(url: &str, topology: Topology) -> Result<Self, CommonError> {
        Ok(Self {
            pool: pool::channel_pool(url, "trainyard-submit", 8)?,
            topology,
            url: url.to_string(),
            shared_declared: Default::default(),
        })
    }

    /// The topology names in use.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Declares the shared exchanges and queues (events, recorder, dead letters).
    pub async fn declare_shared(&self) -> Result<(), CommonError> {
        let ch = pool::get(&self.pool).await?;
        self.topology.declare_shared(&ch).await
    }

    /// Declares a job type's queues, so jobs of that type can be submitted before a worker starts.
    pub async fn declare_job_type(&self, job_type: &str) -> Result<(), CommonError> {
        let ch = pool::get(&self.pool).await?;
        self.topology.declare_job_type(&ch, job_type).await
    }

    /// Publishes `spec` and then its `queued` event, both confirmed by the broker.
    pub async fn submit(&self, spec: &JobSpec) -> Result<(), CommonError> {
        self.submit_traced(spec, None).await
    }

    /// [`Self::submit`] on behalf of a caller who sent the W3C `traceparent` `parent`: the job
    /// carries the caller's trace (a new one when `parent` is absent or invalid), and the
    /// worker logs its trace id with every line of the job.
    pub async fn submit_traced(&self, spec: &JobSpec, parent: Option<&str>) -> Result<(), CommonError> {
        spec.validate()?;
        let body = codec::to_msgpack(spec)?;
        let mut hdrs = FieldTable::default();
        headers::set_int(&mut hdrs, headers::ATTEMPT, 1);
        headers::set_str(&mut hdrs, headers::TRACEPARENT, headers::child_traceparent(parent));
        let props = job_properties(spec, hdrs);
        let ch = pool::get(&self.pool).await?;
        // The exchanges must exist for an unknown job type to come back as unroutable
        // (and for the `queued` event to reach the recorder); declared once per submitter.
        self.shared_declared.get_or_try_init(|| self.topology.declare_shared(&ch)).await?;
        let key = trainyard_common::topology::jobs_routing_key(&spec.job_type, spec.priority);
        // Through the submit exchange: to the admission queue when the control plane admits
        // this type (fair share, per-bot limit), else on to the work queues (its alternate exchange).
        publish_confirmed(&ch, &self.topology.submit_exchange(), &key, &body, props, true).await?;
        self.announce(ch, spec).await;
        Ok(())
    }

    /// Publishes the `queued` event of a job already confirmed in its queue, trying again on
    /// fresh channels. The job runs and its worker's events record it whatever happens here, so
    /// a failure is only logged: answered as an error, it told the caller that a queued job had
    /// failed, and a caller that submitted it again made a second job.
    async fn announce(&self, first: pool::Pooled, spec: &JobSpec) {
        let event = JobEvent::queued(spec);
        let mut ch = Some(first);
        for tries in 1..=EVENT_TRIES {
            // A failed channel goes back (and is discarded) before another is taken: held while
            // waiting for the next, every channel of the pool could end up waiting on another.
            let taken = match ch.take() {
                Some(c) => Ok(c),
                None => tokio::time::timeout(EVENT_POOL_WAIT, pool::get(&self.pool)).await.unwrap_or_else(|_| {
                    Err(CommonError::PoolUnavailable { url: "the channel pool".into(), reason: "no channel within 5 s".into() })
                }),
            };
            let e = match taken {
                Ok(c) => match self.publish_event(&c, &event).await {
                    Ok(()) => return,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if tries == EVENT_TRIES {
                tracing::warn!(job_id = %spec.job_id, error = %e,
                    "the job is queued, but its queued event could not be published: the store learns of it from its worker's events");
                return;
            }
            tokio::time::sleep(Duration::from_millis(100 << tries)).await;
        }
    }

    /// Publishes an event to the events exchange, confirmed.
    pub async fn publish_event(&self, ch: &Channel, event: &JobEvent) -> Result<(), CommonError> {
        publish_event(ch, &self.topology, event).await
    }

    /// Publishes an audit record to the events exchange, confirmed.
    pub async fn publish_audit(&self, record: &crate::audit::AuditRecord) -> Result<(), CommonError> {
        let ch = pool::get(&self.pool).await?;
        self.shared_declared.get_or_try_init(|| self.topology.declare_shared(&ch)).await?;
        crate::audit::publish(&ch, &self.topology, record).await
    }

    /// Opens a subscription to one job's events. Open it **before** submitting
    /// so no event is missed.
    pub async fn watch(&self, spec: &JobSpec) -> Result<JobWatch, CommonError> {
        JobWatch::open(&self.url, &self.topology, &spec.job_type, &spec.job_id).await
    }
}

/// AMQP properties of a job message.
pub fn job_properties(spec: &JobSpec, hdrs: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(codec::MSGPACK.into())
        .with_delivery_mode(2)
        .with_message_id(spec.job_id.as_str().into())
        .with_timestamp(spec.submitted_at.timestamp().max(0) as u64)
        .with_type(spec.job_type.as_str().into())
        .with_headers(hdrs)
}

pub use trainyard_common::amqp::publish_event;

/// A live subscription to one job's events (and to its dead letter, in case
/// the broker dead-letters it without a worker event).
pub struct JobWatch {
    _conn: Connection,
    consumer: lapin::Consumer,
    job_id: String,
}

impl std::fmt::Debug for JobWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobWatch").field("job_id", &self.job_id).finish_non_exhaustive()
    }
}

impl JobWatch {
    async fn open(url: &str, topology: &Topology, job_type: &str, job_id: &str) -> Result<Self, CommonError> {
        let conn = connect(url, "trainyard-watch").await?;
        let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
        topology.declare_shared(&ch).await?;
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(CommonError::amqp("declare a watch queue"))?;
        let qname = q.name().clone();
        ch.queue_bind(
            qname.clone(),
            topology.events_exchange().into(),
            format!("{job_type}.*").into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(CommonError::amqp("bind the watch queue to events"))?;
        for key in trainyard_common::topology::dead_letter_keys(job_type) {
            ch.queue_bind(qname.clone(), topology.dead_exchange().into(), key.into(), QueueBindOptions::default(), FieldTable::default())
                .await
                .map_err(CommonError::amqp("bind the watch queue to dead letters"))?;
        }
        let consumer = ch
            .basic_consume(qname, "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(CommonError::amqp("consume the watch queue"))?;
        Ok(Self { _conn: conn, consumer, job_id: job_id.to_string() })
    }

    /// The next event of this job; `None` when the subscription ended.
    pub async fn next(&mut self) -> Option<Result<JobEvent, CommonError>> {
        while let Some(delivery) = self.consumer.next().await {
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => return Some(Err(CommonError::amqp("receive events")(e))),
            };
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            if let Some(event) = self.match_delivery(&delivery) {
                return Some(Ok(event));
            }
        }
        None
    }

    fn match_delivery(&self, d: &lapin::message::Delivery) -> Option<JobEvent> {
        let ct = d.properties.content_type().as_ref().map(|s| s.as_str());
        if let Ok(event) = codec::decode::<JobEvent>(ct, &d.data) {
            return (event.job_id == self.job_id).then_some(event);
        }
        // A dead letter. A worker's own comes with its reason and is followed
        // by the worker's event; only one the broker made itself (delivery
        // limit: a crash loop) stands for the job's final status here.
        let hdrs = d.properties.headers().as_ref();
        if headers::string(hdrs, headers::DEAD_REASON).is_some() {
            return None;
        }
        let spec: JobSpec = codec::decode(ct, &d.data).ok()?;
        if spec.job_id != self.job_id {
            return None;
        }
        let reason = headers::string(hdrs, headers::DEAD_REASON).unwrap_or_else(|| "dead-lettered by the broker (delivery limit)".into());
        let mut event = JobEvent::new(&spec, JobStatus::Dead, headers::attempt(hdrs), trainyard_common::event::DEAD_LETTER_SEQ);
        event.run = Some(headers::run(hdrs));
        event.error = Some(trainyard_common::ErrorInfo { kind: trainyard_common::ErrorKind::Permanent, message: reason });
        Some(event)
    }

    /// Follows events until a terminal one, calling `on_event` for each.
    /// Errors if `timeout` passes first.
    pub async fn until_terminal(&mut self, timeout: Duration, mut on_event: impl FnMut(&JobEvent)) -> Result<JobEvent, WaitError> {
        let fut = async {
            while let Some(ev) = self.next().await {
                let ev = ev.map_err(WaitError::Broker)?;
                on_event(&ev);
                if ev.status.is_terminal() {
                    return Ok(ev);
                }
            }
            Err(WaitError::Closed)
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| WaitError::Timeout(timeout))?
    }
}

/// Why waiting for a job failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// No terminal event in time.
    #[error("no final status within {0:?}")]
    Timeout(Duration),
    /// The subscription closed.
    #[error("the event subscription closed before a final status")]
    Closed,
    /// Broker trouble.
    #[error(transparent)]
    Broker(CommonError),
}
