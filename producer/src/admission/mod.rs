//! Fair share between bots and per-bot concurrency limits: the control plane's admission step.
//!
//! Jobs are submitted to `<prefix>.submit`, whose alternate exchange is `<prefix>.jobs`. For a
//! job type whose policy asks for fair share or `max_running_per_bot`, the admitter binds the
//! type's admission queue `<prefix>.admit.<type>` there, so its jobs wait in that queue instead
//! of the work queues; for any other type nothing is bound and jobs go straight on to the
//! workers. The admitter (one active consumer across replicas: single active consumer) holds
//! the waiting jobs as unacknowledged deliveries, follows the type's events to know which
//! admitted jobs finished, and admits the next job ([`state`]) by publishing its exact bytes
//! and headers (less the admission queue's `x-delivery-count`) to the work queue of its tier
//! with a publisher confirm, then acknowledging the
//! waiting copy. A crash in between leaves both copies: the job is admitted again and the
//! worker's outcome record makes the second run a no-op. A waiting job holds no worker slot
//! and no delivery count of its work queue (its message there is new when admitted).

pub mod board;
pub mod state;

use std::{collections::BTreeMap, time::Duration};

use futures::{FutureExt, StreamExt};
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties, Channel, Consumer,
};
use tokio_util::sync::CancellationToken;
use trainyard_common::{
    amqp::{confirm_channel, connect, lasting_properties, publish_all_mandatory, publish_confirmed, Outgoing},
    artifacts::{keys, ArtifactStore},
    codec, headers,
    job::Priority,
    topology::{jobs_routing_key, Topology},
    CommonError, JobEvent, JobSpec, JobStatus,
};

use self::{board::Snapshot, state::Admission};
use crate::{config::JobTypePolicy, store::Store, workers::WorkerTable};

/// How many waiting jobs the admitter holds (its prefetch): fairness covers these; jobs
/// beyond them wait in the queue in arrival order until held ones are admitted.
pub const HOLD: u16 = 20_000;
/// How often snapshots are published and outdated keyed jobs looked for.
const TICK: Duration = Duration::from_secs(1);
/// Every this many ticks, admitted jobs the store has seen end are forgotten (their final event
/// may have been published while no admitter followed the events: a failover).
const CHECK_EVERY: u64 = 3;

/// A job's event: a final one frees its bot's place.
fn follow(state: &mut Admission<Delivery>, d: &Delivery) {
    let ct = d.properties.content_type().as_ref().map(|c| c.as_str().to_string());
    if let Ok(ev) = codec::decode::<JobEvent>(ct.as_deref(), &d.data) {
        if ev.status.is_terminal() {
            state.finished(&ev.job_id);
        }
    }
}

/// The next final event, or never when the session follows none (a type without admission).
async fn next_event(events: &mut Option<Consumer>) -> Option<Result<Delivery, lapin::Error>> {
    match events {
        Some(consumer) => consumer.next().await,
        None => std::future::pending().await,
    }
}

/// The admission step of one job type.
#[derive(Debug, Clone)]
pub struct Admitter {
    job_type: String,
    policy: JobTypePolicy,
    store: Store,
    artifacts: ArtifactStore,
    topology: Topology,
    url: String,
    workers: WorkerTable,
}

/// A session's broker handles.
struct Session {
    ch: Channel,
    waiting: Consumer,
    events: Option<Consumer>,
    board: String,
}

impl Admitter {
    /// The admitter of `job_type` under `policy` (without admission: it only drains the queue).
    pub fn new(
        job_type: &str,
        policy: JobTypePolicy,
        store: Store,
        artifacts: ArtifactStore,
        topology: Topology,
        url: &str,
        workers: WorkerTable,
    ) -> Self {
        Self { job_type: job_type.to_string(), policy, store, artifacts, topology, url: url.to_string(), workers }
    }

    /// Admitters of every known type and every type with a policy: the types without admission
    /// get one that unbinds their admission queue and passes on what is left in it.
    pub fn all(
        job_types: &[String],
        policies: &BTreeMap<String, JobTypePolicy>,
        store: &Store,
        artifacts: &ArtifactStore,
        topology: &Topology,
        url: &str,
        workers: &WorkerTable,
    ) -> Vec<Self> {
        let mut types: Vec<&String> = job_types.iter().chain(policies.keys()).collect();
        types.sort();
        types.dedup();
        types
            .into_iter()
            .map(|t| {
                let p = policies.get(t).cloned().unwrap_or_default();
                Self::new(t, p, store.clone(), artifacts.clone(), topology.clone(), url, workers.clone())
            })
            .collect()
    }

    /// Runs until `shutdown`, reconnecting with backoff on broker trouble.
    pub async fn run(&self, shutdown: CancellationToken) {
        crate::recorder::run_reconnecting("admission", &shutdown, None, || self.session(&shutdown)).await
    }

    /// With fair share: how many jobs may be admitted and unfinished, from the live workers'
    /// slots for this type (heartbeats; a worker of several types counted them all, and admitted
    /// more than its slots for this one could run, which then waited in the work queue's order)
    /// plus `admit_ahead`.
    fn window(&self) -> u64 {
        let now = chrono::Utc::now();
        let slots: usize = self.workers.rows(now).iter().filter(|w| w.state == "live").map(|w| w.beat.slots_for(&self.job_type)).sum();
        slots as u64 + u64::from(self.policy.admit_ahead.unwrap_or(2)).max(1)
    }

    async fn open(&self) -> Result<(lapin::Connection, Session), CommonError> {
        let conn = connect(&self.url, "trainyard-admission").await?;
        let ch = confirm_channel(&conn).await?;
        self.topology.declare_job_type(&ch, &self.job_type).await?;
        let queue = self.topology.admission_queue(&self.job_type);
        crate::recorder::declare_single_consumer_queue(&ch, &queue).await?;
        let submit = self.topology.submit_exchange();
        for p in Priority::ALL {
            let key = jobs_routing_key(&self.job_type, p);
            let (q, x, k, t) = (queue.as_str().into(), submit.as_str().into(), key.as_str().into(), FieldTable::default());
            let done = if self.policy.admission() {
                ch.queue_bind(q, x, k, QueueBindOptions::default(), t).await
            } else {
                ch.queue_unbind(q, x, k, t).await
            };
            done.map_err(CommonError::amqp(format!("bind or unbind {queue} on {submit} ({key})")))?;
        }
        let board = board::declare_exchange(&ch, &self.topology).await?;
        // A type without admission only passes on what is left in its queue: no events to follow.
        let events = if self.policy.admission() { Some(self.follow_events(&conn).await?) } else { None };
        let consume_ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
        consume_ch.basic_qos(HOLD, BasicQosOptions::default()).await.map_err(CommonError::amqp("set prefetch"))?;
        let waiting = consume_ch
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("consume {queue}")))?;
        Ok((conn, Session { ch, waiting, events, board }))
    }

    /// A queue of this session's own with the type's final events (to see admitted jobs
    /// finish): one write per job, not one per event. A final status this release does not
    /// know is not bound; such a job is forgotten from the store instead ([`CHECK_EVERY`]).
    async fn follow_events(&self, conn: &lapin::Connection) -> Result<Consumer, CommonError> {
        let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
        let own = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let q = ch.queue_declare("".into(), own, FieldTable::default()).await.map_err(CommonError::amqp("declare an events queue"))?;
        let exchange = self.topology.events_exchange();
        for status in JobStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            let key = format!("{}.{status}", self.job_type);
            let (name, x) = (q.name().clone(), exchange.as_str().into());
            ch.queue_bind(name, x, key.as_str().into(), QueueBindOptions::default(), FieldTable::default())
                .await
                .map_err(CommonError::amqp(format!("bind an events queue to {exchange}")))?;
        }
        let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
        ch.basic_consume(q.name().clone(), "".into(), no_ack, FieldTable::default()).await.map_err(CommonError::amqp("consume events"))
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), CommonError> {
        let (conn, mut s) = self.open().await?;
        let mut state: Admission<Delivery> = Admission::new(self.policy.clone());
        // Jobs started and not finished when this session began (another replica admitted them).
        match self.store.unfinished_started(&self.job_type).await {
            Ok(jobs) => jobs.iter().for_each(|(id, bot)| state.admitted(id, bot)),
            Err(e) => return Err(CommonError::Config { name: "job store".into(), reason: e.to_string() }),
        }
        let mut active = false;
        let mut tick = tokio::time::interval(TICK);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = conn.close(200, "shutdown".into()).await;
                    return Ok(());
                }
                next = s.waiting.next() => {
                    let Some(d) = next else { return Err(CommonError::ConsumerEnded { queue: self.topology.admission_queue(&self.job_type) }) };
                    let d = d.map_err(CommonError::amqp("receive a waiting job"))?;
                    active = true;
                    self.arrive(&s.ch, &mut state, d).await?;
                }
                next = next_event(&mut s.events) => {
                    let Some(d) = next else { return Err(CommonError::ConsumerEnded { queue: "admission events".into() }) };
                    follow(&mut state, &d.map_err(CommonError::amqp("receive an event"))?);
                    // The events that came in meanwhile too, so that one release admits them all.
                    while let Some(Some(Ok(d))) = next_event(&mut s.events).now_or_never() {
                        follow(&mut state, &d);
                    }
                }
                _ = tick.tick() => {
                    ticks += 1;
                    if ticks.is_multiple_of(CHECK_EVERY) {
                        self.forget_finished(&mut state).await;
                    }
                    self.sweep(&s.ch, &mut state).await?;
                    if active {
                        self.publish_snapshot(&s.ch, &s.board, &state).await?;
                    }
                }
            }
            self.release(&s.ch, &mut state).await?;
        }
    }

    /// A job arrives: held, or passed on at once when this type has no admission or the job
    /// cannot be read or is not valid (the worker dead-letters it with the reason, as any bad
    /// input). An invalid job was held and counted: one whose id is not a UUID never gets a
    /// final event (no job is recorded for it), so its bot stayed at its limit for good, and one
    /// whose id no cancel marker can be named for (too long) failed every session.
    async fn arrive(&self, ch: &Channel, state: &mut Admission<Delivery>, d: Delivery) -> Result<(), CommonError> {
        let ct = d.properties.content_type().as_ref().map(|c| c.as_str().to_string());
        match codec::decode::<JobSpec>(ct.as_deref(), &d.data).and_then(|spec| spec.validate().map(|()| spec)) {
            Ok(spec) if self.policy.admission() => {
                state.hold(spec.job_id, spec.bot, spec.priority, spec.coalesce_key, d);
                Ok(())
            }
            Ok(spec) => self.pass_on(ch, spec.priority, d).await,
            Err(_) => self.pass_on(ch, Priority::Normal, d).await,
        }
    }

    /// Admits what may go now: published back to back, their confirms awaited together
    /// ([`publish_all_mandatory`]: a job no queue took is told apart by its body, not by
    /// which confirm lapin handed the broker's return to), each acknowledged in the admission
    /// queue after its own confirm.
    async fn release(&self, ch: &Channel, state: &mut Admission<Delivery>) -> Result<(), CommonError> {
        let window = if self.policy.fair_share { self.window() } else { u64::MAX };
        let mut batch = Vec::new();
        while let Some(held) = state.next(window) {
            let superseded = held.coalesce_key.is_some() && self.artifacts.exists(&keys::cancel_marker(&held.job_id)).await?;
            if superseded {
                // It will never run: the worker ends it `superseded` at once; not counted.
                state.finished(&held.job_id);
            }
            tracing::debug!(job_id = %held.job_id, bot = %held.bot, superseded, "admitted");
            batch.push(held);
        }
        let exchange = self.topology.jobs_exchange();
        let keys: Vec<String> = batch.iter().map(|h| jobs_routing_key(&self.job_type, h.priority)).collect();
        let outgoing: Vec<Outgoing> = batch
            .iter()
            .zip(&keys)
            .map(|(h, key)| Outgoing { exchange: &exchange, routing_key: key, body: &h.payload.data, props: Self::admitted(&h.payload) })
            .collect();
        let confirmed = publish_all_mandatory(ch, &outgoing).await;
        for (held, result) in batch.into_iter().zip(confirmed) {
            result?;
            held.payload.acker.ack(BasicAckOptions::default()).await.map_err(CommonError::amqp("acknowledge an admitted job"))?;
        }
        Ok(())
    }

    /// Forgets admitted jobs whose final status the store holds: a job that ended while no
    /// admitter followed the events (between a crash and the next session) would otherwise
    /// hold its bot's place for ever.
    async fn forget_finished(&self, state: &mut Admission<Delivery>) {
        for id in state.admitted_ids() {
            match self.store.job(&id).await {
                Ok(Some(job)) if job.status.is_terminal() => state.finished(&id),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, job_id = %id, "admission: failed to read a job's status"),
            }
        }
    }

    /// Jobs that latest wins will supersede go on as soon as their cancel marker is written,
    /// so that they end at once instead of waiting for their turn (and counting as demand).
    async fn sweep(&self, ch: &Channel, state: &mut Admission<Delivery>) -> Result<(), CommonError> {
        for id in state.outdated() {
            if self.artifacts.exists(&keys::cancel_marker(&id)).await? {
                if let Some(held) = state.take(&id) {
                    self.pass_on(ch, held.priority, held.payload).await?;
                }
            }
        }
        Ok(())
    }

    /// Publishes the delivery (see [`Self::publish`]) to its tier's work queue
    /// (confirmed, mandatory), then acknowledges it in the admission queue.
    async fn pass_on(&self, ch: &Channel, priority: Priority, d: Delivery) -> Result<(), CommonError> {
        self.publish(ch, priority, &d).await?;
        d.acker.ack(BasicAckOptions::default()).await.map(|_| ()).map_err(CommonError::amqp("acknowledge an admitted job"))
    }

    /// Publishes a delivery's exact bytes and its properties ([`lasting_properties`]: not a
    /// publisher's `expiration` or `user_id`) to its tier's work queue, confirmed, without the
    /// broker's delivery count of the admission queue: each admitter session that
    /// ends returns the jobs it holds, and the worker read that count as its own (the broker
    /// does not set it on a first delivery), ending a job that waited through 20 sessions
    /// `dead` at the delivery limit before it ever ran.
    async fn publish(&self, ch: &Channel, priority: Priority, d: &Delivery) -> Result<(), CommonError> {
        let key = jobs_routing_key(&self.job_type, priority);
        publish_confirmed(ch, &self.topology.jobs_exchange(), &key, &d.data, Self::admitted(d), true).await
    }

    /// The properties of an admitted job's copy.
    fn admitted(d: &Delivery) -> BasicProperties {
        lasting_properties(&d.properties).with_headers(headers::without_broker_count(d.properties.headers().as_ref()))
    }

    async fn publish_snapshot(&self, ch: &Channel, exchange: &str, state: &Admission<Delivery>) -> Result<(), CommonError> {
        let outdated = state.outdated().len() as u64;
        let snap = Snapshot {
            job_type: self.job_type.clone(),
            at: chrono::Utc::now(),
            waiting: state.waiting_total().saturating_sub(outdated),
            runnable: Some(state.runnable()),
            admitted: state.running_total(),
            window: self.policy.fair_share.then(|| self.window()),
            bots: state.usage(),
        };
        let props = BasicProperties::default().with_content_type(codec::JSON.into());
        // Confirmed here, not left in flight: a job published next on this channel and returned
        // by the broker could have its return handed to this confirm (see `publish_all_mandatory`).
        publish_confirmed(ch, exchange, "", &codec::to_json(&snap)?, props, false).await
    }
}

#[cfg(test)]
mod tests {
    use trainyard_common::heartbeat::Heartbeat;

    use super::*;

    /// The fair-share window of a type counts the live workers' slots for that type, plus
    /// `admit_ahead`: a worker of two types with concurrency 2 beats 4 slots, 2 of them this
    /// type's (the window counted all 4); a worker of another type counts none.
    #[tokio::test]
    async fn the_fair_share_window_counts_the_slots_for_its_type() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}/jobs.db", dir.path().display())).await.unwrap();
        let workers = WorkerTable::default();
        let now = chrono::Utc::now();
        for (id, types, slots) in [("w1", vec!["noop", "intent-eval"], 4), ("w2", vec!["intent-train"], 1)] {
            let worker = trainyard_common::WorkerInfo { id: id.into(), ..Default::default() };
            let job_types = types.into_iter().map(String::from).collect();
            workers.record(Heartbeat { worker, job_types, slots, interval_s: 5, sent_at: now, ..Default::default() }, now);
        }
        let policy = JobTypePolicy { fair_share: true, admit_ahead: Some(2), ..Default::default() };
        let artifacts = ArtifactStore::open("memory://").unwrap();
        let admitter = Admitter::new("noop", policy, store.clone(), artifacts, Topology::new("t"), "amqp://unused", workers);
        assert_eq!(admitter.window(), 2 + 2);
        store.close().await;
    }
}
