//! Upgrading from releases that fed the recorder through a quorum queue of its own,
//! `<prefix>.recorder`, bound to the events exchange (a copy of every event the stream
//! also got). Every session first unbinds that queue, records what is left in it (in
//! batches, each in one transaction, an entry the store refuses parked, acked after the commit: nothing is lost, and
//! recording twice what the stream also holds changes nothing), then deletes it once it
//! is empty and unused. Absent (every installation since), it costs one passive declare.

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
    Channel, Connection,
};
use trainyard_common::CommonError;

use super::{stream, Recorder, RecorderError, BATCH};

/// How many times a session tries to delete the drained queue.
const DELETE_TRIES: u32 = 5;

impl Recorder {
    /// Records and deletes what an earlier release left in `<prefix>.recorder`.
    pub(super) async fn drain_legacy_queue(&self, conn: &Connection) -> Result<(), RecorderError> {
        let queue = self.topology.legacy_recorder_queue();
        let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
        // A queue that is not there closes this channel (404): nothing to upgrade.
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let Ok(declared) = ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await else { return Ok(()) };
        tracing::warn!(queue, messages = declared.message_count(), "draining the recorder queue of an earlier release");
        ch.queue_unbind(queue.as_str().into(), self.topology.events_exchange().as_str().into(), "#".into(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("unbind {queue}")))?;
        let mut drained = 0;
        // Quorum queues refuse `if_unused`/`if_empty` deletes (RabbitMQ 3.10): look, then delete.
        // The broker settles a quorum queue's acks asynchronously, so the count may lag: a few tries.
        for _ in 0..DELETE_TRIES {
            drained += self.record_legacy(&ch, &queue).await?;
            let q = ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await;
            let q = q.map_err(CommonError::amqp(format!("look at {queue}")))?;
            if q.consumer_count() > 0 {
                // A replica of the earlier release still consumes it: a later session tries again.
                tracing::warn!(queue, drained, consumers = q.consumer_count(), "the recorder queue of an earlier release stays for now");
                return Ok(());
            }
            if q.message_count() == 0 {
                ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map_err(CommonError::amqp(format!("delete {queue}")))?;
                tracing::warn!(queue, drained, "recorded and deleted the recorder queue of an earlier release");
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Records what `queue` holds, in batches acked after their commit; how many messages.
    async fn record_legacy(&self, ch: &Channel, queue: &str) -> Result<usize, RecorderError> {
        let mut drained = 0;
        loop {
            let mut deliveries: Vec<Delivery> = Vec::with_capacity(BATCH);
            while deliveries.len() < BATCH {
                let got = ch.basic_get(queue.into(), BasicGetOptions::default()).await;
                match got.map_err(CommonError::amqp(format!("read {queue}")))? {
                    Some(message) => deliveries.push(message.delivery),
                    None => break,
                }
            }
            let Some(last) = deliveries.iter().max_by_key(|d| d.delivery_tag) else { return Ok(drained) };
            let entries: Vec<&Delivery> = deliveries.iter().collect();
            let filed = stream::record_or_park(&self.store, None, &entries).await?;
            self.count(&filed.events, filed.parked as usize, &filed.recorded);
            last.acker.ack(BasicAckOptions { multiple: true }).await.map_err(CommonError::amqp(format!("ack {queue}")))?;
            drained += deliveries.len();
        }
    }
}
