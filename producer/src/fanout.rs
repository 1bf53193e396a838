//! Consuming a fanout exchange of fleeting messages (workers' heartbeats, live log lines): each
//! control-plane replica binds an exclusive, auto-delete queue of its own and hands every body
//! to a callback. Nothing is recorded: the messages are only worth their freshness. A replica
//! that falls behind holds at most [`PREFETCH`] of them and its queue at most [`MAX_LENGTH`]
//! more, the oldest dropped first (a live log shows the gap and goes on from the newest lines).
//! [`run_with`] binds the same kind of queue to more than one exchange (`jobs logs --follow` on
//! the store: the logs fanout and one job type's events).

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use tokio_util::sync::CancellationToken;
use trainyard_common::{
    amqp::{connect, declare_fleeting_fanout},
    metrics::ControlMetrics,
    CommonError,
};

/// Most messages a consumer holds unacknowledged: a consumer without acks would be sent every
/// message as it comes and buffer, without bound, whatever it has not handled yet.
pub const PREFETCH: u16 = 512;
/// Acknowledged together, once this many are handled (well under [`PREFETCH`]), or once no
/// message came for [`ACK_IDLE`]: a delivery left unacknowledged past the broker's
/// `consumer_timeout` closes the channel (a quiet live log, a follow of a quiet training).
const ACK_EVERY: u64 = 128;
/// See [`ACK_EVERY`].
const ACK_IDLE: std::time::Duration = std::time::Duration::from_secs(1);
/// Most messages waiting in a consumer's queue; beyond it the oldest are dropped.
pub const MAX_LENGTH: i64 = 10_000;

/// One binding of the fleeting queue.
#[derive(Debug, Clone)]
pub struct Bind {
    /// The exchange.
    pub exchange: String,
    /// The routing key (ignored by a fanout exchange).
    pub routing_key: String,
    /// Declare `exchange` as a fleeting fanout first ([`declare_fleeting_fanout`]); otherwise it
    /// must exist (a durable exchange of the topology).
    pub declare_fanout: bool,
}

impl Bind {
    /// A fleeting fanout exchange, declared when missing.
    pub fn fanout(exchange: &str) -> Self {
        Self { exchange: exchange.to_string(), routing_key: String::new(), declare_fanout: true }
    }
}

/// What a session tells [`run_with`]'s caller besides the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The queue is bound and consumed: messages published from now on arrive.
    Bound,
    /// The session ended (it reconnects): messages published meanwhile are lost.
    Lost,
}

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
    run_with(what, url, &[Bind::fanout(exchange)], metrics, shutdown, |_| {}, |d| handle(&d.data)).await
}

/// [`run`] with a queue bound to each of `binds`; `link` hears when a session is bound and when
/// it ends, and `handle` gets whole deliveries (their exchange and properties too).
pub async fn run_with(
    what: &str,
    url: &str,
    binds: &[Bind],
    metrics: Option<&ControlMetrics>,
    shutdown: CancellationToken,
    link: impl Fn(Link),
    handle: impl Fn(&Delivery),
) {
    let (stop, link, handle) = (&shutdown, &link, &handle);
    crate::recorder::run_reconnecting(what, &shutdown, metrics, move || async move {
        let r = session(what, url, binds, stop, link, handle).await;
        link(Link::Lost);
        r
    })
    .await
}

async fn session(
    what: &str,
    url: &str,
    binds: &[Bind],
    shutdown: &CancellationToken,
    link: &impl Fn(Link),
    handle: &impl Fn(&Delivery),
) -> Result<(), CommonError> {
    let conn = connect(url, &format!("trainyard-{what}")).await?;
    let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
    let own = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let mut bounded = FieldTable::default();
    bounded.insert("x-max-length".into(), AMQPValue::LongLongInt(MAX_LENGTH));
    let queue = ch.queue_declare("".into(), own, bounded).await.map_err(CommonError::amqp(format!("declare a {what} queue")))?;
    let name = queue.name().as_str().to_string();
    for b in binds {
        if b.declare_fanout {
            declare_fleeting_fanout(&ch, &b.exchange).await?;
        }
        let (exchange, key) = (b.exchange.as_str(), b.routing_key.as_str());
        ch.queue_bind(name.as_str().into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("bind {name} to {exchange}")))?;
    }
    ch.basic_qos(PREFETCH, BasicQosOptions { global: false }).await.map_err(CommonError::amqp("set prefetch"))?;
    let mut consumer = ch
        .basic_consume(name.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(CommonError::amqp(format!("consume {name}")))?;
    link(Link::Bound);
    // The last delivery handled and not acknowledged yet, and how many up to it.
    let (mut unacked, mut count): (Option<lapin::Acker>, u64) = (None, 0);
    let ack = |acker: lapin::Acker| async move {
        acker.ack(BasicAckOptions { multiple: true }).await.map_err(CommonError::amqp(format!("acknowledge {what} messages")))
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = conn.close(200, "shutdown".into()).await;
                return Ok(());
            }
            _ = tokio::time::sleep(ACK_IDLE), if unacked.is_some() => {
                ack(unacked.take().expect("checked")).await?;
                count = 0;
            }
            next = consumer.next() => {
                let Some(d) = next else { return Err(CommonError::ConsumerEnded { queue: name }) };
                let d = d.map_err(CommonError::amqp(format!("receive from {what}")))?;
                handle(&d);
                count += 1;
                unacked = Some(d.acker.clone());
                if count >= ACK_EVERY {
                    ack(unacked.take().expect("just set")).await?;
                    count = 0;
                }
            }
        }
    }
}
