//! Event triggers: JSON events published by other systems to the
//! `<prefix>.triggers` topic exchange become jobs, per [`TriggerRule`].
//!
//! - The control plane consumes one quorum queue, `<prefix>.triggers.control-plane`,
//!   with `x-single-active-consumer`: one replica handles triggers at a time,
//!   in order, and another takes over when it goes away.
//! - Debounce is trailing, per (rule, bot): the first event of a burst opens a
//!   window of `debounce_s`; when it closes, **one** job is submitted with the
//!   fields of the latest event. The events of a burst are acked only after
//!   that job is confirmed, so a crash mid-window loses nothing.
//! - Every rule whose pattern matches an event's routing key takes it (one event can
//!   start a training and an evaluation); the event is acked once all of them kept it.
//!   An event delivered again (its session lost while a debounced rule held it) fires the
//!   other rules again: give events a `message_id` and each rule's job id is derived from
//!   it (UUID v5), so the second fire is the same job: not published again once the store
//!   has it (else the worker's outcome record keeps its result once).
//! - `{{field}}` in the rule's bot, parameter and coalescing-key strings is replaced by
//!   the event's field; a string that is only `{{field}}` takes the field's JSON value.
//!   An event without a field a template names is parked with the reason.

mod debounce;
mod template;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions},
    types::FieldTable,
    Acker,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trainyard_common::{amqp::connect, metrics::ControlMetrics, topology::Topology, CommonError, JobSpec, Trigger, TriggerKind};

use trainyard_common::codec;

use self::template::{json_kind, render_str};
pub use self::{
    debounce::{Debouncer, Pending},
    template::{render, topic_matches},
};
use crate::{
    config::TriggerRule,
    store::{ParkedEvent, Store, StoreError},
    submit::Submitter,
};

/// Why a trigger session ended.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// Broker trouble.
    #[error(transparent)]
    Broker(#[from] CommonError),
    /// The job store could not park an event (the event stays unacked).
    #[error("parking a trigger event: {0}")]
    Store(#[from] StoreError),
}

/// The trigger source recorded on the jobs of `rule`: `<routing key> (<name>)`.
pub fn source(rule: &TriggerRule) -> String {
    format!("{} ({})", rule.routing_key, rule.name)
}

/// A trigger event's delivery, acked once every rule that matched it has kept it: fired its
/// job, parked the event, or fired the burst it joined.
#[derive(Debug)]
pub struct Held {
    acker: Acker,
    rules_left: AtomicUsize,
    /// The event's AMQP `message_id`, when its publisher set one.
    message_id: Option<String>,
}

impl Held {
    fn new(acker: Acker, rules: usize, message_id: Option<String>) -> Arc<Self> {
        Arc::new(Self { acker, rules_left: AtomicUsize::new(rules), message_id })
    }

    /// One rule has kept the event; the last one acks it.
    async fn settle(self: Arc<Self>) -> Result<(), TriggerError> {
        if self.rules_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.acker.ack(BasicAckOptions::default()).await.map_err(CommonError::amqp("ack trigger events"))?;
        }
        Ok(())
    }
}

/// Consumes trigger events and submits jobs.
#[derive(Debug, Clone)]
pub struct Triggers {
    rules: Vec<TriggerRule>,
    submitter: Submitter,
    url: String,
    metrics: Option<ControlMetrics>,
    /// Where an event no rule can use is parked with the reason (`trainyard events parked`).
    store: Option<Store>,
}

/// How long a trigger waits for the store to say whether its job is known.
const KNOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The queue the control plane of `t` consumes trigger events from.
pub fn queue_name(t: &Topology) -> String {
    format!("{}.triggers.control-plane", t.prefix())
}

impl Triggers {
    /// Trigger handling for `rules`.
    pub fn new(rules: Vec<TriggerRule>, submitter: Submitter, url: &str, metrics: Option<ControlMetrics>) -> Self {
        Self { rules, submitter, url: url.to_string(), metrics, store: None }
    }

    /// Parks the events no rule can use in `store` (without one they are only logged and counted).
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Keeps an event that cannot become a job, with `reason`, where a person sees it
    /// (`trainyard events parked`; its routing key is `trigger:<key>`), then counts it for its
    /// rule, and, when `alerting` and the entry is new, in the parked events the alert watches.
    /// An event two rules cannot use is one entry (the first rule's reason; the log has both)
    /// and counts once there.
    async fn park(&self, rule: &str, routing_key: &str, body: &[u8], reason: &str, alerting: bool) -> Result<(), TriggerError> {
        tracing::warn!(rule, routing_key, reason, "parking a trigger event that cannot become a job");
        let new = match &self.store {
            Some(store) => {
                let parked = ParkedEvent::new(&format!("{PARKED_PREFIX}{routing_key}"), Some(codec::JSON), body, reason);
                store.park(&[parked]).await? > 0
            }
            None => true,
        };
        self.count(rule, if alerting { "parked" } else { "unmatched" });
        if let Some(m) = self.metrics.as_ref().filter(|_| alerting && new) {
            m.events_parked.inc();
        }
        Ok(())
    }

    /// The queue the control plane consumes.
    pub fn queue_name(&self) -> String {
        queue_name(self.submitter.topology())
    }

    /// Runs until `shutdown`, reconnecting with backoff on broker trouble (the recorder's policy).
    pub async fn run(&self, shutdown: CancellationToken) {
        crate::recorder::run_reconnecting("trigger", &shutdown, self.metrics.as_ref(), || self.session(&shutdown)).await
    }

    fn count(&self, rule: &str, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.trigger_events.with_label_values(&[rule, outcome]).inc();
        }
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), TriggerError> {
        let (conn, mut consumer) = self.subscribe().await?;
        let mut debouncer: Debouncers = Debouncer::default();
        loop {
            let sleep_until = debouncer.next_deadline().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => {
                    // Unacked events go back to the queue for the next active consumer.
                    let _ = conn.close(200, "shutdown".into()).await;
                    return Ok(());
                }
                _ = tokio::time::sleep_until(sleep_until) => self.fire_due(&mut debouncer).await?,
                d = consumer.next() => {
                    let Some(d) = d else { return Err(CommonError::ConsumerEnded { queue: self.queue_name() }.into()) };
                    self.take(d.map_err(CommonError::amqp("receive a trigger event"))?, &mut debouncer).await?;
                }
            }
        }
    }

    /// Declares this listener's queue, binds it to every rule's routing key and consumes it.
    async fn subscribe(&self) -> Result<(lapin::Connection, lapin::Consumer), TriggerError> {
        let topo = self.submitter.topology().clone();
        let conn = connect(&self.url, "trainyard-triggers").await?;
        let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
        topo.declare_shared(&ch).await?;
        let queue = self.queue_name();
        crate::recorder::declare_single_consumer_queue(&ch, &queue).await?;
        for r in &self.rules {
            ch.queue_bind(
                queue.as_str().into(),
                topo.triggers_exchange().into(),
                r.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(CommonError::amqp(format!("bind {queue} to {}", r.routing_key)))?;
        }
        ch.basic_qos(1000, BasicQosOptions::default()).await.map_err(CommonError::amqp("set prefetch"))?;
        let consumer = ch
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("consume {queue}")))?;
        Ok((conn, consumer))
    }

    /// Fires every debounced rule whose quiet time is over, then settles the events it held.
    async fn fire_due(&self, debouncer: &mut Debouncers) -> Result<(), TriggerError> {
        for ((rule_name, bot), p) in debouncer.due(Instant::now()) {
            let Some(rule) = self.rules.iter().find(|r| r.name == rule_name) else { continue };
            let message_id = p.held.last().and_then(|h| h.message_id.clone());
            let latest = &p.event;
            if let Err(reason) = self.fire(rule, &bot, &latest.event, p.count, message_id.as_deref()).await? {
                self.park(&rule.name, &latest.key, &latest.data, &reason, true).await?;
            }
            for held in p.held {
                held.settle().await?;
            }
        }
        Ok(())
    }

    /// One trigger event: parked when it is not a JSON object, else taken by every rule whose
    /// pattern matches its key, and acked once all of them kept it. One no rule matches came
    /// through a binding this control plane does not hold (a removed rule's, or a newer
    /// replica's while this older one is the active consumer): it is parked, not dropped.
    async fn take(&self, d: Delivery, debouncer: &mut Debouncers) -> Result<(), TriggerError> {
        let Delivery { data, acker, routing_key, properties, .. } = d;
        let key = routing_key.as_str().to_string();
        let message_id = properties.message_id().as_ref().map(|m| m.to_string());
        let event: serde_json::Value = match serde_json::from_slice(&data) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            read => {
                let reason = match read {
                    Err(e) => format!("not JSON: {e}"),
                    Ok(v) => format!("a JSON {}, not an object", json_kind(&v)),
                };
                self.park("none", &key, &data, &format!("a trigger event must be a JSON object: {reason}"), true).await?;
                return Held::new(acker, 1, None).settle().await;
            }
        };
        let rules: Vec<&TriggerRule> = self.rules.iter().filter(|r| topic_matches(&r.routing_key, &key)).collect();
        let held = Held::new(acker, rules.len().max(1), message_id);
        if rules.is_empty() {
            let reason = format!(
                "no rule of this control plane matches {key:?} (a binding left by a removed rule, or a rule \
                 another replica's configuration has): republish it once a rule takes it"
            );
            // Not alerted on: a removed rule's binding would keep the alert firing (docs/operations.md).
            self.park("none", &key, &data, &reason, false).await?;
            return held.settle().await;
        }
        for rule in rules {
            self.take_for(rule, &key, &data, &event, held.clone(), debouncer).await?;
        }
        Ok(())
    }

    /// `rule`'s share of an event: parked when the rule makes no bot name of it, fired at once,
    /// or held by the debouncer until its burst fires.
    async fn take_for(
        &self,
        rule: &TriggerRule,
        key: &str,
        data: &[u8],
        event: &serde_json::Value,
        held: Arc<Held>,
        debouncer: &mut Debouncers,
    ) -> Result<(), TriggerError> {
        let bot = match render_str(&rule.bot, event) {
            Ok(serde_json::Value::String(s)) if trainyard_common::job::valid_bot_name(&s) => s,
            other => {
                let gives = other.map_or_else(|missing| missing, |v| format!("gives {v}, not a bot name"));
                let reason = format!("rule {:?}: its bot template {:?}: {gives}", rule.name, rule.bot);
                self.park(&rule.name, key, data, &reason, true).await?;
                return held.settle().await;
            }
        };
        if rule.debounce_s == 0 {
            if let Err(reason) = self.fire(rule, &bot, event, 1, held.message_id.as_deref()).await? {
                self.park(&rule.name, key, data, &reason, true).await?;
            }
            held.settle().await
        } else if let Err(reason) = job_of(rule, &bot, event, held.message_id.as_deref())
            .map_err(|r| format!("rule {:?}: {r}", rule.name))
            .and_then(|spec| spec.validate().map_err(|e| format!("rule {:?} made a job that cannot be published: {e}", rule.name)))
        {
            // An event that makes no job is parked now, as it came: a burst fires with its
            // latest event, and a bad one held there took the good ones before it down with it
            // (acked, with no job and nothing parked); a good one after it went unchecked.
            self.park(&rule.name, key, data, &reason, true).await?;
            held.settle().await
        } else {
            let window = Duration::from_secs(rule.debounce_s);
            let latest = Latest { event: event.clone(), key: key.to_string(), data: data.to_vec() };
            if !debouncer.offer((rule.name.clone(), bot), latest, held, Instant::now(), window) {
                self.count(&rule.name, "debounced");
            }
            Ok(())
        }
    }

    /// Submits the job `rule` makes of `event` for `bot`; `Ok(Err(reason))` when it makes a job
    /// that can never be published (invalid, or of a type nothing routes): the event is parked.
    async fn fire(
        &self,
        rule: &TriggerRule,
        bot: &str,
        event: &serde_json::Value,
        burst: usize,
        message_id: Option<&str>,
    ) -> Result<Result<(), String>, CommonError> {
        let spec = match job_of(rule, bot, event, message_id) {
            Ok(spec) => spec,
            Err(reason) => return Ok(Err(format!("rule {:?}: {reason}", rule.name))),
        };
        if message_id.is_some() && self.known(&spec.job_id).await {
            tracing::info!(rule = %rule.name, bot, job_id = %spec.job_id, "trigger event seen before: its job is in the store, not published again");
            return Ok(Ok(()));
        }
        match self.submitter.submit(&spec).await {
            Ok(()) => {
                tracing::info!(rule = %rule.name, bot, burst, job_id = %spec.job_id, "trigger fired");
                self.count(&rule.name, "fired");
                if let Some(m) = &self.metrics {
                    m.jobs_submitted.with_label_values(&[spec.job_type.as_str(), "event"]).inc();
                }
                Ok(Ok(()))
            }
            // A template that yields an invalid job, or a type no queue takes, will never work.
            Err(e @ (CommonError::Codec(_) | CommonError::Unroutable { .. })) => {
                Ok(Err(format!("rule {:?} made a job that cannot be published: {e}", rule.name)))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the store has the job `job_id` (a job a `message_id` names, made by an earlier
    /// delivery of its event): its message was confirmed before its first event, so publishing
    /// it again would only run it twice, at once while the first copy is queued or running. A
    /// store that cannot answer is taken as not having it (the job is published, as before).
    async fn known(&self, job_id: &str) -> bool {
        let Some(store) = &self.store else { return false };
        // Bounded: a store that hangs must not stall every trigger event behind it.
        match tokio::time::timeout(KNOWN_TIMEOUT, store.job(job_id)).await {
            Ok(Ok(job)) => job.is_some(),
            Ok(Err(e)) => {
                tracing::warn!(job_id, error = %e, "could not ask the store whether a trigger's job is known; publishing it");
                false
            }
            Err(_) => {
                tracing::warn!(job_id, "the store did not say within 2 s whether a trigger's job is known; publishing it");
                false
            }
        }
    }
}

/// The debounced bursts of a session, each with its latest event.
type Debouncers = Debouncer<Arc<Held>, Latest>;

/// A burst's latest event, with the routing key and bytes it came with (parked as received
/// when its job cannot be published).
#[derive(Debug)]
struct Latest {
    event: serde_json::Value,
    key: String,
    data: Vec<u8>,
}

/// The job `rule` makes of `event` for `bot`, or why it makes none (a field its templates
/// name is missing, or its coalescing key is null). An event its publisher gave a
/// `message_id` makes the same job id every time (UUID v5 of rule, bot and message id), so
/// that an event delivered again (a session lost while another rule still held it) is the
/// same job, which runs once; without one, each fire is a new job.
fn job_of(rule: &TriggerRule, bot: &str, event: &serde_json::Value, message_id: Option<&str>) -> Result<JobSpec, String> {
    use serde_json::Value;
    let params = render(&rule.params, event).map_err(|e| format!("params: {e}"))?;
    let mut spec = JobSpec::new(&rule.job_type, bot, params, Trigger { kind: TriggerKind::Event, source: source(rule) });
    if let Some(m) = message_id {
        let name = format!("trigger\u{0}{}\u{0}{bot}\u{0}{m}", rule.name);
        spec.job_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string();
    }
    spec.priority = rule.priority;
    if let Some(t) = &rule.coalesce_key {
        spec.coalesce_key = Some(match render_str(t, event).map_err(|e| format!("coalesce_key: {e}"))? {
            Value::String(s) => s,
            Value::Null => return Err(format!("coalesce_key {t:?} gives null")),
            other => other.to_string(),
        });
    }
    Ok(spec)
}

/// The routing-key prefix of a parked trigger event (`trigger:<key>`), which `events
/// reprocess` leaves parked: it is not a job event.
pub const PARKED_PREFIX: &str = "trigger:";
