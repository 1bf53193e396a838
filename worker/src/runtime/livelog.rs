//! Publishes the new log lines of running attempts ([`super::joblog::JobLogs`]) every
//! [`livelog::EVERY`] to the logs exchange ([`trainyard_common::livelog`]), over a connection of
//! its own, so that the console shows them while the attempt runs. Best effort: a chunk that
//! cannot be published is skipped (the attempt's saved log keeps every line), the next round
//! reconnects.

use std::sync::Arc;

use lapin::{options::BasicPublishOptions, BasicProperties, Channel, Connection};
use trainyard_common::{
    amqp,
    livelog::{self, LogChunk},
    CommonError,
};

use super::Shared;

/// Publishes new lines until [`Shared::stopped`] fires.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut link: Option<(Connection, Channel, String)> = None;
    let mut sent = super::joblog::Sent::default();
    while !shared.stopped.is_cancelled() {
        let chunks = shared.logs.unsent(&mut sent, livelog::MAX_CHUNK);
        if !chunks.is_empty() {
            if let Err(e) = publish(&shared, &mut link, chunks).await {
                tracing::debug!(target: super::TARGET, error = %e, "live log lines not sent");
                link = None;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(livelog::EVERY) => {}
            _ = shared.stopped.cancelled() => {}
        }
    }
    if let Some((conn, _, _)) = link {
        let _ = conn.close(200, "worker stopped".into()).await;
    }
}

async fn publish(
    shared: &Shared,
    link: &mut Option<(Connection, Channel, String)>,
    chunks: Vec<super::joblog::Unsent>,
) -> Result<(), CommonError> {
    if link.as_ref().is_none_or(|(c, ch, _)| !c.status().connected() || !ch.status().connected()) {
        let conn = amqp::connect(&shared.config.amqp_url, "trainyard-live-logs").await?;
        let ch = conn.create_channel().await.map_err(CommonError::amqp("open the live log channel"))?;
        let exchange = livelog::declare_exchange(&ch, &shared.config.topology).await?;
        *link = Some((conn, ch, exchange));
    }
    let Some((_, ch, exchange)) = link.as_ref() else { return Ok(()) };
    for u in chunks {
        let worker = shared.config.worker.id.clone();
        let chunk = LogChunk { job_id: u.job_id, attempt: u.attempt, offset: u.offset as u64, text: u.text, worker, making: u.making };
        // Strings and numbers: encoding cannot fail.
        let body = serde_json::to_vec(&chunk).unwrap_or_default();
        let props = BasicProperties::default().with_content_type("application/json".into()).with_expiration("60000".into());
        ch.basic_publish(exchange.as_str().into(), "".into(), BasicPublishOptions::default(), &body, props)
            .await
            .map_err(CommonError::amqp("publish live log lines"))?;
    }
    Ok(())
}
