//! The RabbitMQ topology, declared idempotently by whoever starts first.
//!
//! | name | kind | purpose |
//! |---|---|---|
//! | `P.submit` | direct exchange | where jobs are submitted; alternate exchange `P.jobs`, so a key nothing binds here goes on to the workers |
//! | `P.admit.<type>` | quorum queue | a job type's jobs waiting for the control plane's admission (bound to `P.submit` only while its policy asks for fair share or a per-bot limit) |
//! | `P.jobs` | direct exchange | routing key = job type |
//! | `P.jobs.<type>` | quorum queue | work queue (normal tier); delivery limit as crash-loop backstop, DLX `P.dead` |
//! | `P.jobs.<type>.high`, `P.jobs.<type>.low` | quorum queues | the same for the high and low tiers (keys `<type>.high`, `<type>.low`) |
//! | `P.retry` + `P.retry.<type>[.<tier>].<ms>` | direct exchange + TTL queues | delayed retries back to `P.jobs`, to the job's tier |
//! | `P.dead` + `P.dead.<type>` + `P.dead.recorder` | topic exchange + quorum queues | dead letters per type, and a copy for the recorder |
//! | `P.events` | topic exchange | routing key `<type>.<status>`; a `queued` event of a job with a coalescing key also goes to key [`COALESCE_ROUTING_KEY`] (a `BCC` header) |
//! | `P.events.log` | stream | durable audit log; the recorder reads it into the job store from its stored offset |
//! | `P.control` | fanout exchange | cancel requests to workers |
//! | `P.triggers` | topic exchange | events from other systems that trigger jobs |
//!
//! `P` is the prefix, `trainyard` unless `TRAINYARD_PREFIX` says otherwise
//! (tests use a unique prefix each, so they run in parallel on one broker).

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
    Channel, ExchangeKind,
};

use crate::{error::CommonError, job::Priority};

/// Broker-side redelivery backstop. On RabbitMQ 3.10 every return of a
/// delivery (crash, SIGTERM requeue, lost connection, broker restart) counts,
/// so it is far above `max_attempts`; real attempts are counted in a header.
pub const DELIVERY_LIMIT: i64 = 20;
/// The reason of a job dead-lettered at the delivery limit: by the broker (the dead-letter
/// recorder writes it) or by a worker counting a handed-back copy's earlier deliveries.
pub const DELIVERY_LIMIT_REASON: &str = "delivery limit reached (crash loop?)";
/// The extra routing key on the events exchange of a `queued` event whose job has a
/// coalescing key (sent as a `BCC` header, so the event is published once): the control
/// plane's coalescing queue binds to it and so gets only these events. It has no dot, so no
/// `<type>.<status>` pattern (`*.queued`, `<type>.*`) matches it; `#` does, and a queue
/// bound both ways still gets the event once.
pub const COALESCE_ROUTING_KEY: &str = "coalesce";
/// How long the audit stream keeps events.
pub const EVENTS_LOG_MAX_AGE: &str = "90D";

/// All names of one trainyard installation, derived from a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new("trainyard")
    }
}

impl Topology {
    /// Names under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }
    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Work exchange (direct, key = job type).
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }
    /// Submit exchange (direct, key as on [`Self::jobs_exchange`]); what it does not route goes
    /// on to the jobs exchange (its alternate exchange).
    pub fn submit_exchange(&self) -> String {
        format!("{}.submit", self.prefix)
    }
    /// A job type's admission queue (jobs waiting for the control plane to admit them).
    pub fn admission_queue(&self, job_type: &str) -> String {
        format!("{}.admit.{job_type}", self.prefix)
    }
    /// Work queue of a job type.
    pub fn jobs_queue(&self, job_type: &str) -> String {
        format!("{}.jobs.{job_type}", self.prefix)
    }
    /// Work queue of a job type's priority tier: the normal tier is [`Self::jobs_queue`]
    /// (what workers of the release before consume), the others add `.high` / `.low`.
    pub fn tier_queue(&self, job_type: &str, priority: Priority) -> String {
        format!("{}.jobs.{}", self.prefix, jobs_routing_key(job_type, priority))
    }
    /// The work queues of a job type, highest tier first.
    pub fn tier_queues(&self, job_type: &str) -> [String; 3] {
        Priority::ALL.map(|p| self.tier_queue(job_type, p))
    }
    /// Retry exchange (direct, key = `<type>.<delay_ms>`).
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.prefix)
    }
    /// Retry TTL queue of a job type and delay.
    pub fn retry_queue(&self, job_type: &str, delay_ms: u64) -> String {
        format!("{}.retry.{job_type}.{delay_ms}", self.prefix)
    }
    /// Dead-letter exchange (topic, key = job type).
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    /// Dead-letter queue of a job type.
    pub fn dead_queue(&self, job_type: &str) -> String {
        format!("{}.dead.{job_type}", self.prefix)
    }
    /// Copy of every dead letter, for the recorder.
    pub fn dead_recorder_queue(&self) -> String {
        format!("{}.dead.recorder", self.prefix)
    }
    /// Event exchange (topic, key = `<type>.<status>`).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }
    /// The audit stream.
    pub fn events_log(&self) -> String {
        format!("{}.events.log", self.prefix)
    }
    /// The recorder's own queue of releases before the recorder read the stream (a copy
    /// of every event): no longer declared; the recorder drains and deletes one it finds.
    pub fn legacy_recorder_queue(&self) -> String {
        format!("{}.recorder", self.prefix)
    }
    /// Control exchange (fanout): cancel requests.
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.prefix)
    }
    /// Heartbeats exchange (fanout, not durable): workers' heartbeats ([`crate::heartbeat`]).
    pub fn heartbeats_exchange(&self) -> String {
        format!("{}.heartbeats", self.prefix)
    }
    /// Trigger exchange (topic): events from other systems.
    pub fn triggers_exchange(&self) -> String {
        format!("{}.triggers", self.prefix)
    }

    /// Declares the shared part: exchanges, the audit stream, the dead-letter recorder queue.
    pub async fn declare_shared(&self, ch: &Channel) -> Result<(), CommonError> {
        for (name, kind) in [
            (self.jobs_exchange(), ExchangeKind::Direct),
            (self.retry_exchange(), ExchangeKind::Direct),
            (self.dead_exchange(), ExchangeKind::Topic),
            (self.events_exchange(), ExchangeKind::Topic),
            (self.control_exchange(), ExchangeKind::Fanout),
            (self.triggers_exchange(), ExchangeKind::Topic),
        ] {
            ch.exchange_declare(name.as_str().into(), kind, durable_exchange(), FieldTable::default())
                .await
                .map_err(CommonError::amqp(format!("declare exchange {name}")))?;
        }
        let mut alternate = FieldTable::default();
        alternate.insert("alternate-exchange".into(), AMQPValue::LongString(self.jobs_exchange().into()));
        let submit = self.submit_exchange();
        ch.exchange_declare(submit.as_str().into(), ExchangeKind::Direct, durable_exchange(), alternate)
            .await
            .map_err(CommonError::amqp(format!("declare exchange {submit}")))?;
        let mut stream = FieldTable::default();
        stream.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
        stream.insert("x-max-age".into(), AMQPValue::LongString(EVENTS_LOG_MAX_AGE.into()));
        stream.insert("x-stream-max-segment-size-bytes".into(), AMQPValue::LongLongInt(50_000_000));
        self.declare_bound(ch, &self.events_log(), stream, &self.events_exchange(), "#").await?;
        self.declare_bound(ch, &self.dead_recorder_queue(), quorum_args(), &self.dead_exchange(), "#").await?;
        Ok(())
    }

    /// Declares the queues of one job type (and the shared part).
    pub async fn declare_job_type(&self, ch: &Channel, job_type: &str) -> Result<(), CommonError> {
        self.declare_shared(ch).await?;
        let mut work = quorum_args();
        work.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(DELIVERY_LIMIT));
        work.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead_exchange().into()));
        work.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        work.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        for priority in Priority::ALL {
            let key = jobs_routing_key(job_type, priority);
            self.declare_bound(ch, &self.tier_queue(job_type, priority), work.clone(), &self.jobs_exchange(), &key).await?;
        }
        for key in dead_letter_keys(job_type) {
            self.declare_bound(ch, &self.dead_queue(job_type), quorum_args(), &self.dead_exchange(), &key).await?;
        }
        Ok(())
    }

    /// Declares the retry queue for `delay_ms` of a tier: messages wait there, then go
    /// back to the work exchange with `jobs_key` (see [`jobs_routing_key`]) as routing key.
    pub async fn declare_retry_queue(&self, ch: &Channel, jobs_key: &str, delay_ms: u64) -> Result<String, CommonError> {
        let mut args = quorum_args();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay_ms as i64));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.jobs_exchange().into()));
        args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(jobs_key.into()));
        args.insert("x-dead-letter-strategy".into(), AMQPValue::LongString("at-least-once".into()));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        let queue = self.retry_queue(jobs_key, delay_ms);
        let key = retry_routing_key(jobs_key, delay_ms);
        self.declare_bound(ch, &queue, args, &self.retry_exchange(), &key).await?;
        Ok(key)
    }

    async fn declare_bound(&self, ch: &Channel, queue: &str, args: FieldTable, exchange: &str, key: &str) -> Result<(), CommonError> {
        ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
            .await
            .map_err(CommonError::amqp(format!("declare queue {queue}")))?;
        ch.queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("bind queue {queue} to {exchange} with key {key}")))?;
        Ok(())
    }
}

/// The routing key on the work exchange of a job type's tier: `<type>` for normal
/// (as always), `<type>.high`, `<type>.low`. Job type names have no dots, so these
/// never name another type.
pub fn jobs_routing_key(job_type: &str, priority: Priority) -> String {
    match priority {
        Priority::Normal => job_type.to_string(),
        other => format!("{job_type}.{other}"),
    }
}

/// The routing keys a dead letter of `job_type` carries on the dead-letter exchange: the job
/// type when a worker dead-letters it, the key of its tier queue ([`jobs_routing_key`]) when
/// the broker does (at the delivery limit it keeps the message's routing key).
pub fn dead_letter_keys(job_type: &str) -> Vec<String> {
    Priority::ALL.into_iter().map(|p| jobs_routing_key(job_type, p)).collect()
}

/// The routing key on the retry exchange.
pub fn retry_routing_key(job_type: &str, delay_ms: u64) -> String {
    format!("{job_type}.{delay_ms}")
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions { durable: true, ..Default::default() }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}
