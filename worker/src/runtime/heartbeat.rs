//! The worker's heartbeat: every [`WorkerConfig::heartbeat_interval`](super::WorkerConfig) a
//! [`Heartbeat`] (id, attributes, host, pod, job types, device, slots, running jobs, version) on
//! the heartbeats exchange, over a connection of its own so that a busy or reconnecting job
//! session never delays it; a goodbye when the worker has stopped. Best effort: a heartbeat that
//! cannot be sent is skipped (logged), the next one reconnects.

use std::sync::{atomic::Ordering, Arc};

use lapin::{options::BasicPublishOptions, BasicProperties, Channel, Connection};
use trainyard_common::{
    amqp,
    heartbeat::{self, Heartbeat},
    CommonError,
};

use super::{host_name, pod_name, Shared};

/// Sends heartbeats until [`Shared::stopped`] fires, then a goodbye.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut link: Option<(Connection, Channel, String)> = None;
    loop {
        let goodbye = shared.stopped.is_cancelled();
        if let Err(e) = beat(&shared, &mut link, goodbye).await {
            tracing::debug!(target: super::TARGET, error = %e, "heartbeat not sent");
            link = None;
        }
        if goodbye {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.config.heartbeat_interval) => {}
            _ = shared.stopped.cancelled() => {}
        }
    }
    if let Some((conn, _, _)) = link {
        let _ = conn.close(200, "worker stopped".into()).await;
    }
}

async fn beat(shared: &Shared, link: &mut Option<(Connection, Channel, String)>, goodbye: bool) -> Result<(), CommonError> {
    if link.as_ref().is_none_or(|(c, ch, _)| !c.status().connected() || !ch.status().connected()) {
        let conn = amqp::connect(&shared.config.amqp_url, "trainyard-heartbeat").await?;
        let ch = conn.create_channel().await.map_err(CommonError::amqp("open the heartbeat channel"))?;
        let exchange = heartbeat::declare_exchange(&ch, &shared.config.topology).await?;
        *link = Some((conn, ch, exchange));
    }
    let Some((_, ch, exchange)) = link.as_ref() else { return Ok(()) };
    // Plain strings, numbers and a timestamp: encoding cannot fail.
    let body = serde_json::to_vec(&snapshot(shared, goodbye)).unwrap_or_default();
    let props = BasicProperties::default().with_content_type("application/json".into()).with_expiration("30000".into());
    ch.basic_publish(exchange.as_str().into(), "".into(), BasicPublishOptions::default(), &body, props)
        .await
        .map_err(CommonError::amqp("publish a heartbeat"))?;
    Ok(())
}

/// This worker now.
fn snapshot(shared: &Shared, goodbye: bool) -> Heartbeat {
    let c = &shared.config;
    let job_types = shared.registry.job_types();
    Heartbeat {
        worker: c.worker.clone(),
        host: host_name(),
        pod: pod_name(),
        slots: usize::from(c.concurrency) * job_types.len(),
        job_types,
        device: c.device.clone(),
        slots_in_use: shared.running_count.load(Ordering::SeqCst),
        current_jobs: shared.cancels.running_ids(),
        waiting: shared.waiting.iter().map(|(t, n)| (t.clone(), n.load(Ordering::SeqCst))).filter(|(_, n)| *n > 0).collect(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        interval_s: c.heartbeat_interval.as_secs().max(1),
        sent_at: chrono::Utc::now(),
        goodbye,
    }
}
