//! Broker helpers of the benchmark: queue counts, waiting for consumers, the
//! event observer that timestamps events as they arrive, and clean-up.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
    Connection,
};
use tokio::sync::mpsc;
use trainyard_common::{amqp, topology::Topology};

/// The job types whose queues a benchmark may have declared.
pub const JOB_TYPES: [&str; 3] = ["noop", "intent-train", "intent-eval"];

/// Ready messages and consumers of a queue; `None` when it does not exist.
pub async fn queue_counts(conn: &Connection, queue: &str) -> anyhow::Result<Option<(u32, u32)>> {
    // A passive declare of a missing queue closes the channel: one channel per look.
    let ch = conn.create_channel().await.context("open a channel")?;
    let r = ch.queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default()).await;
    let out = r.ok().map(|q| (q.message_count(), q.consumer_count()));
    if ch.status().connected() {
        let _ = ch.close(200, "bench".into()).await;
    }
    Ok(out)
}

/// Waits until each queue has at least `n` consumers.
pub async fn wait_consumers(conn: &Connection, queues: &[String], n: u32, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for q in queues {
        loop {
            if let Some((_, c)) = queue_counts(conn, q).await? {
                if c >= n {
                    break;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "queue {q} did not get {n} consumer(s) within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// One event seen by the observer: job id (from the `message_id` `<job_id>/<seq>`),
/// status (from the routing key `<type>.<status>`) and when it arrived.
#[derive(Debug)]
pub struct Seen {
    /// The job.
    pub job_id: String,
    /// The status.
    pub status: String,
    /// Arrival time at the observer.
    pub at: Instant,
}

/// Subscribes to `<prefix>.events` with the given routing keys on an exclusive,
/// auto-delete queue (auto-ack: it only measures). The same observer is used for
/// trainyard and for the raw baseline, so it costs both the same.
pub async fn observe(url: &str, topology: &Topology, keys: &[&str]) -> anyhow::Result<(Connection, mpsc::UnboundedReceiver<Seen>)> {
    let conn = amqp::connect(url, "trainyard-bench observer").await?;
    let ch = conn.create_channel().await?;
    topology.declare_shared(&ch).await?;
    let q = ch
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
        .await?;
    for key in keys {
        ch.queue_bind(
            q.name().clone(),
            topology.events_exchange().into(),
            (*key).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "bench-observer".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _ch = ch;
        while let Some(Ok(d)) = consumer.next().await {
            let at = Instant::now();
            let mid = d.properties.message_id().as_ref().map(|s| s.as_str()).unwrap_or("");
            let job_id = mid.split('/').next().unwrap_or("").to_string();
            let status = d.routing_key.as_str().rsplit('.').next().unwrap_or("").to_string();
            if tx.send(Seen { job_id, status, at }).is_err() {
                return;
            }
        }
    });
    Ok((conn, rx))
}

/// Deletes every queue and exchange of a prefix (idempotent).
pub async fn cleanup(url: &str, prefix: &str) -> anyhow::Result<()> {
    let t = Topology::new(prefix);
    let conn = amqp::connect(url, "trainyard-bench cleanup").await?;
    let ch = conn.create_channel().await?;
    for q in &trainyard::serve::queues(&t, &JOB_TYPES) {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.with_context(|| format!("delete queue {q}"))?;
    }
    for x in trainyard::serve::exchanges(&t) {
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()).await.with_context(|| format!("delete exchange {x}"))?;
    }
    let _ = conn.close(200, "bench cleanup".into()).await;
    Ok(())
}

/// The local broker's reductions (the Erlang VM's count of work done, all its processes) so
/// far, read with `rabbitmqctl eval`; `None` when that cannot be run (no CLI, another host).
/// Unlike its CPU time, this does not grow with what else the machine does: the difference of
/// two readings over a run is the work the run asked of the broker. `rabbitmqctl` itself costs
/// about a second of CPU: read it outside a timed window.
pub async fn reductions() -> Option<u64> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["eval", "element(1, erlang:statistics(exact_reductions))."])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out).await.ok()?.ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
