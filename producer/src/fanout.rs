//! Consuming a fanout exchange of fleeting messages (workers' heartbeats, live log lines): each
//! control-plane replica binds an exclusive, auto-delete queue of its own, consumes it without
//! acks, and hands every body to a callback. Nothing is recorded: the messages are only worth
//! their freshness.

use futures::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;
use trainyard_common::{
    amqp::{connect, declare_fleeting_fanout},
    metrics::ControlMetrics,
    CommonError,
};

/// Consumes `exchange` (declared fanout, not durable) into `handle` until `shutdown`,
/// reconnecting when lost; `what` names the connection and the logs.
pub async fn run(
    what: &str,
    url: &str,
    exchange: &str,
    metrics: Option<&ControlMetrics>,
    shutdown: CancellationToken,
    handle: impl Fn(&[u8]),
) {
    crate::recorder::run_reconnecting(what, &shutdown, metrics, || session(what, url, exchange, &shutdown, &handle)).await
}

async fn session(what: &str, url: &str, exchange: &str, shutdown: &CancellationToken, handle: &impl Fn(&[u8])) -> Result<(), CommonError> {
    let conn = connect(url, &format!("trainyard-{what}")).await?;
    let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
    declare_fleeting_fanout(&ch, exchange).await?;
    let own = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let queue =
        ch.queue_declare("".into(), own, FieldTable::default()).await.map_err(CommonError::amqp(format!("declare a {what} queue")))?;
    let name = queue.name().as_str().to_string();
    ch.queue_bind(name.as_str().into(), exchange.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .map_err(CommonError::amqp(format!("bind {name} to {exchange}")))?;
    let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let mut consumer = ch
        .basic_consume(name.as_str().into(), "".into(), no_ack, FieldTable::default())
        .await
        .map_err(CommonError::amqp(format!("consume {name}")))?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = conn.close(200, "shutdown".into()).await;
                return Ok(());
            }
            next = consumer.next() => {
                let Some(d) = next else { return Err(CommonError::ConsumerEnded { queue: name }) };
                let d = d.map_err(CommonError::amqp(format!("receive from {exchange}")))?;
                handle(&d.data);
            }
        }
    }
}
