//! The raw-lapin baseline: exactly the broker operations of the pipeline per
//! job, with no framework around them.
//!
//! - publisher: the job (mandatory, persistent, to `<p>.jobs`, routed to the
//!   quorum queue `<p>.jobs.noop`), wait for its confirm; a `queued` event
//!   (persistent, to `<p>.events`, routed to the stream `<p>.events.log`), wait for
//!   its confirm;
//! - worker (`raw-worker`, prefetch C): per delivery a `started` event, wait for
//!   its confirm, a `succeeded` event, wait for its confirm, then the ack;
//! - drainer (`raw-drain`): reads the stream `<p>.events.log` from its first entry
//!   with the recorder's prefetch and batches and acks each batch, as the recorder
//!   does (without the job store).
//!
//! Bodies are real encoded jobs and events of the same sizes, made once.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use anyhow::Context;
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Confirmation, Connection,
};
use trainyard_common::{amqp, codec, headers, topology::Topology, JobEvent, JobStatus, WorkerInfo};

use crate::dispatch::noop_spec;

/// Publishes one message and waits for its confirm; an unroutable or nacked one is an error.
pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8], props: BasicProperties, mandatory: bool) -> anyhow::Result<()> {
    let confirm =
        ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions { mandatory, immediate: false }, body, props).await?.await?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        other => anyhow::bail!("publish to {exchange} with key {key} not confirmed: {other:?}"),
    }
}

/// The raw job publisher: one confirm channel per concurrent submit.
pub struct Publisher {
    _conns: Vec<Connection>,
    channels: Vec<Channel>,
    jobs_exchange: String,
    events_exchange: String,
    job_body: Vec<u8>,
    queued_body: Vec<u8>,
    run: String,
    next: AtomicU64,
}

impl Publisher {
    /// Opens `k` confirm channels over up to 4 connections (as the `Submitter`'s pool does).
    pub async fn connect(url: &str, topology: &Topology, k: usize) -> anyhow::Result<Self> {
        let mut conns = Vec::new();
        for i in 0..k.clamp(1, 4) {
            conns.push(amqp::connect(url, &format!("trainyard-bench raw publisher {i}")).await?);
        }
        let mut channels = Vec::new();
        for i in 0..k.max(1) {
            channels.push(amqp::confirm_channel(&conns[i % conns.len()]).await?);
        }
        let spec = noop_spec();
        Ok(Self {
            _conns: conns,
            channels,
            jobs_exchange: topology.jobs_exchange(),
            events_exchange: topology.events_exchange(),
            job_body: codec::to_msgpack(&spec)?,
            queued_body: codec::to_json(&JobEvent::queued(&spec))?,
            run: format!("raw{}", std::process::id()),
            next: AtomicU64::new(0),
        })
    }

    /// Publishes one job and its `queued` event on channel `w`, each confirmed; returns its id.
    pub async fn publish(&self, w: usize) -> anyhow::Result<String> {
        let ch = &self.channels[w % self.channels.len()];
        let id = format!("{}-{}", self.run, self.next.fetch_add(1, Ordering::Relaxed));
        let mut hdrs = FieldTable::default();
        hdrs.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(1));
        hdrs.insert(headers::TRACEPARENT.into(), AMQPValue::LongString("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()));
        let props = BasicProperties::default()
            .with_content_type(codec::MSGPACK.into())
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into())
            .with_timestamp(0)
            .with_type("noop".into())
            .with_headers(hdrs);
        publish(ch, &self.jobs_exchange, "noop", &self.job_body, props, true).await?;
        let props = event_props(&format!("{id}/0"));
        publish(ch, &self.events_exchange, "noop.queued", &self.queued_body, props, false).await?;
        Ok(id)
    }
}

fn event_props(message_id: &str) -> BasicProperties {
    BasicProperties::default().with_content_type(codec::JSON.into()).with_delivery_mode(2).with_message_id(message_id.into())
}

struct WorkerCtx {
    publish: Channel,
    events_exchange: String,
    started: Vec<u8>,
    succeeded: Vec<u8>,
}

/// `raw-worker`: consumes `<prefix>.jobs.noop` with prefetch `prefetch` until killed.
pub async fn worker(url: &str, prefix: &str, prefetch: u16) -> anyhow::Result<()> {
    let topology = Topology::new(prefix);
    let conn = amqp::connect(url, "trainyard-bench raw worker").await?;
    let publish_ch = amqp::confirm_channel(&conn).await?;
    let spec = noop_spec();
    let worker = WorkerInfo { id: format!("bench-raw-worker-{}", std::process::id()), attributes: Default::default() };
    let mut started = JobEvent::new(&spec, JobStatus::Started, 1, 1);
    started.worker = Some(worker.clone());
    let mut succeeded = JobEvent::new(&spec, JobStatus::Succeeded, 1, 2);
    succeeded.worker = Some(worker);
    succeeded.result = Some(serde_json::json!({"slept_ms": 0, "attempt": 1, "duration_s": 0.000_123_456}));
    let ctx = Arc::new(WorkerCtx {
        publish: publish_ch,
        events_exchange: topology.events_exchange(),
        started: codec::to_json(&started)?,
        succeeded: codec::to_json(&succeeded)?,
    });
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions { global: false }).await?;
    let mut consumer = ch
        .basic_consume(topology.jobs_queue("noop").into(), "raw-worker".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    while let Some(d) = consumer.next().await {
        let d = d.context("consume")?;
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(&ctx, &d).await {
                eprintln!("raw worker: {e:#}");
                std::process::exit(1);
            }
        });
    }
    Ok(())
}

async fn handle(ctx: &WorkerCtx, d: &Delivery) -> anyhow::Result<()> {
    let id = d.properties.message_id().as_ref().map(|s| s.as_str()).unwrap_or("");
    publish(&ctx.publish, &ctx.events_exchange, "noop.started", &ctx.started, event_props(&format!("{id}/1")), false).await?;
    publish(&ctx.publish, &ctx.events_exchange, "noop.succeeded", &ctx.succeeded, event_props(&format!("{id}/2")), false).await?;
    d.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// `raw-drain`: reads the events stream `<prefix>.events.log` and acks every entry, until
/// killed — in batches exactly as the recorder does (same prefetch, batch size and linger,
/// one `multiple` ack per batch), so both do the same broker operations. After each batch
/// it writes the last offset read to `offset_file` (the recorder keeps it in its store).
/// It also consumes `<prefix>.dead.recorder`, as the recorder does (empty in this benchmark).
pub async fn drain(url: &str, prefix: &str, offset_file: &std::path::Path) -> anyhow::Result<()> {
    use trainyard::recorder::{stream, BATCH, LINGER, PREFETCH};
    let topology = Topology::new(prefix);
    let conn = amqp::connect(url, "trainyard-bench raw drain").await?;
    let ch = conn.create_channel().await?;
    let consumer = stream::subscribe(&ch, &topology, stream::Start::First, PREFETCH, "raw-drain").await?;
    let dead_ch = conn.create_channel().await?;
    dead_ch.basic_qos(16, BasicQosOptions::default()).await?;
    let _dead = dead_ch
        .basic_consume(topology.dead_recorder_queue().into(), "raw-drain".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let batches = tokio_stream::StreamExt::chunks_timeout(consumer, BATCH, LINGER);
    tokio::pin!(batches);
    while let Some(batch) = batches.next().await {
        let deliveries = batch.into_iter().collect::<Result<Vec<_>, _>>().context("consume")?;
        if let Some(last) = deliveries.iter().max_by_key(|d| d.delivery_tag) {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
            let offset = deliveries.iter().filter_map(stream::offset).max().unwrap_or(-1);
            std::fs::write(offset_file, offset.to_string())?;
        }
    }
    Ok(())
}
