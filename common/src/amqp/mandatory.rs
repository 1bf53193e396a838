//! Mandatory publishes told apart when the broker returns one.
//!
//! The broker returns a mandatory message no queue takes (`basic.return`), then confirms it.
//! lapin hands a returned message to whichever publish's confirm it completes first among those
//! one broker ack settles (`multiple`), not to the publish it belongs to: on a channel with
//! other publishes in flight, a refused copy could read as kept (its job then lost: acked, with
//! no copy anywhere) and another publish as refused. So a mandatory publish is either alone in
//! flight on its channel ([`Mandatory`]), or one of a batch whose returned messages are matched
//! to their publishes by content ([`publish_all_mandatory`]).

use std::sync::Arc;

use lapin::{message::Delivery, options::BasicPublishOptions, BasicProperties, Channel, Confirmation, Connection};
use tokio_util::sync::CancellationToken;

use super::{confirm_channel, publish_confirmed};
use crate::CommonError;

/// A confirm channel of its own for mandatory publishes, one at a time.
#[derive(Clone, Debug)]
pub struct Mandatory(Arc<tokio::sync::Mutex<Channel>>);

impl Mandatory {
    /// Opens the channel on `conn`.
    pub async fn open(conn: &Connection) -> Result<Self, CommonError> {
        Ok(Self(Arc::new(tokio::sync::Mutex::new(confirm_channel(conn).await?))))
    }

    /// Publishes `body` mandatory and waits for its confirm, with no other publish in flight on
    /// the channel: [`CommonError::Unroutable`] when no queue took it. Nothing is published once
    /// `lost` has fired, when the channel is this caller's turn ([`CommonError::SessionLost`]):
    /// a copy waits here behind others, and the delivery it copies may meanwhile have gone back
    /// to its queue with a lost session (the copy would be a second live job).
    pub async fn publish(
        &self,
        lost: &CancellationToken,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), CommonError> {
        let ch = self.0.lock().await;
        if lost.is_cancelled() {
            return Err(CommonError::SessionLost { what: "publish a copy" });
        }
        publish_confirmed(&ch, exchange, routing_key, body, props, true).await
    }
}

/// One message of [`publish_all_mandatory`].
pub struct Outgoing<'a> {
    /// The exchange.
    pub exchange: &'a str,
    /// The routing key.
    pub routing_key: &'a str,
    /// The body.
    pub body: &'a [u8],
    /// The properties.
    pub props: BasicProperties,
}

/// Publishes every message of `batch` mandatory on `ch` back to back and waits for all their
/// confirms; each result says whether that message was kept. A returned message is matched to
/// the publish of the same exchange, routing key and body, wherever lapin handed it. Nothing
/// else may publish on `ch` meanwhile.
pub async fn publish_all_mandatory(ch: &Channel, batch: &[Outgoing<'_>]) -> Vec<Result<(), CommonError>> {
    let confirms = futures::future::join_all(batch.iter().map(|m| async move {
        let options = BasicPublishOptions { mandatory: true, immediate: false };
        let what = || format!("publish to {} with key {}", m.exchange, m.routing_key);
        let sent = ch.basic_publish(m.exchange.into(), m.routing_key.into(), options, m.body, m.props.clone()).await;
        sent.map_err(|e| CommonError::amqp(what())(e))?.await.map_err(|e| CommonError::amqp(format!("confirm: {}", what()))(e))
    }))
    .await;
    let mut returned: Vec<Option<Delivery>> = Vec::new();
    let mut results: Vec<Result<(), CommonError>> = Vec::with_capacity(batch.len());
    for (m, confirm) in batch.iter().zip(confirms) {
        let nacked = || CommonError::Nacked { exchange: m.exchange.into(), routing_key: m.routing_key.into() };
        let (result, back) = match confirm {
            Ok(Confirmation::Ack(back)) => (Ok(()), back),
            Ok(Confirmation::Nack(back)) => (Err(nacked()), back),
            Ok(Confirmation::NotRequested) => (Ok(()), None),
            Err(e) => (Err(e), None),
        };
        returned.extend(back.map(|r| Some(r.delivery)));
        results.push(result);
    }
    for (m, result) in batch.iter().zip(results.iter_mut()) {
        let mine = |d: &Delivery| d.exchange.as_str() == m.exchange && d.routing_key.as_str() == m.routing_key && *d.data == *m.body;
        if let Some(slot) = returned.iter_mut().find(|r| r.as_ref().is_some_and(mine)) {
            *slot = None;
            *result = Err(CommonError::Unroutable { exchange: m.exchange.into(), routing_key: m.routing_key.into() });
        }
    }
    results
}
