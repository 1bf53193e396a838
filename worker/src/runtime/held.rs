//! Which jobs a session holds unacked, per job type (one consumer channel each), so
//! that a channel the broker closes can be reported with the jobs it took back; and
//! what the broker says when it closes a channel for an acknowledgement timeout.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

/// The deliveries a session holds, by job type and delivery tag: the job id is the
/// message id the submitter sets. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Held(Arc<Mutex<HashMap<String, BTreeMap<u64, String>>>>);

impl Held {
    /// Notes a delivery of `job_type` as held until [`release`](Self::release).
    pub(crate) fn hold(&self, job_type: &str, d: &lapin::message::Delivery) {
        let id = d.properties.message_id().as_ref().map_or_else(|| "(no message id)".into(), |m| m.as_str().chars().take(100).collect());
        if let Ok(mut held) = self.0.lock() {
            held.entry(job_type.to_string()).or_default().insert(d.delivery_tag, id);
        }
    }

    /// The delivery was acked, requeued or given up with its session.
    pub(crate) fn release(&self, job_type: &str, delivery_tag: u64) {
        if let Ok(mut held) = self.0.lock() {
            if let Some(tags) = held.get_mut(job_type) {
                tags.remove(&delivery_tag);
            }
        }
    }

    /// The job ids held on the channel of `job_type`, in delivery order.
    pub(crate) fn job_ids(&self, job_type: &str) -> Vec<String> {
        self.0.lock().map(|held| held.get(job_type).map(|t| t.values().cloned().collect()).unwrap_or_default()).unwrap_or_default()
    }
}

/// Logs why the consumer of `job_type` failed: an acknowledgement timeout as exactly that,
/// with the job ids held on that channel and the setting to raise; anything else as it is.
pub(crate) fn consumer_failed(job_type: &str, e: &lapin::Error, held: &Held) {
    let job_ids = held.job_ids(job_type);
    match ack_timeout(e) {
        Some(broker_says) => tracing::error!(
            job_type,
            ?job_ids,
            broker_says,
            "acknowledgement timeout: the broker closed the channel of {job_type} because a delivery on it stayed unacked \
             longer than its consumer_timeout, and requeued its jobs; raise the broker's consumer_timeout and this worker's \
             --consumer-timeout-s (TRAINYARD_CONSUMER_TIMEOUT_S) together, or lower the jobs' timeout_s"
        ),
        None => tracing::warn!(job_type, ?job_ids, error = %e, "consumer failed"),
    }
}

/// The broker's words when it closed a channel because a delivery stayed unacked past its
/// `consumer_timeout` (406 PRECONDITION_FAILED "delivery acknowledgement on channel N timed out…").
pub(crate) fn ack_timeout(e: &lapin::Error) -> Option<&str> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            let text = amqp.get_message().as_str();
            (amqp.get_id() == PRECONDITION_FAILED && text.contains("delivery acknowledgement") && text.contains("timed out"))
                .then_some(text)
        }
        _ => None,
    }
}

/// AMQP reply code 406.
const PRECONDITION_FAILED: u16 = 406;

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};

    use super::*;

    fn closed_with(kind: AMQPSoftError, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(AMQPErrorKind::Soft(kind), text.into())).into()
    }

    /// RabbitMQ's words (3.10) when a delivery stays unacked past its consumer_timeout.
    #[test]
    fn an_acknowledgement_timeout_is_told_from_other_channel_closes() {
        let text = "PRECONDITION_FAILED - delivery acknowledgement on channel 2 timed out. Timeout value used: 1800000 ms. \
                    This timeout value can be configured, see consumers doc guide to learn more";
        assert_eq!(ack_timeout(&closed_with(AMQPSoftError::PRECONDITIONFAILED, text)), Some(text));
        let other = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q'";
        assert_eq!(ack_timeout(&closed_with(AMQPSoftError::PRECONDITIONFAILED, other)), None);
        assert_eq!(ack_timeout(&closed_with(AMQPSoftError::NOTFOUND, "NOT_FOUND - no queue 'q'")), None);
        assert_eq!(ack_timeout(&lapin::ErrorKind::MissingHeartbeatError.into()), None);
    }
}
