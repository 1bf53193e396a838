//! Errors of the common layer.

use thiserror::Error;

/// Why a message body could not be turned into a job or event.
#[derive(Debug, Error)]
pub enum CodecError {
    /// Larger than the configured limit.
    #[error("message of {size} bytes is over the {limit}-byte limit")]
    TooLarge {
        /// Body size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// A content type this build does not read.
    #[error("unsupported content type {0:?} (expected application/msgpack or application/json)")]
    ContentType(String),
    /// Bytes that are not valid msgpack for the schema.
    #[error("failed to decode msgpack body: {0}")]
    Msgpack(String),
    /// Bytes that are not valid JSON for the schema.
    #[error("failed to decode JSON body: {0}")]
    Json(String),
    /// Well-formed but violating the schema.
    #[error("invalid field `{field}`: {reason}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Failed to encode (should not happen for our own types).
    #[error("failed to encode message: {0}")]
    Encode(String),
}

/// Errors of broker and store plumbing shared by producer and worker.
#[derive(Debug, Error)]
pub enum CommonError {
    /// Connecting to the broker failed. The URL is redacted.
    #[error("failed to connect to the broker at {url}: {source}")]
    Connect {
        /// The broker URL, credentials redacted.
        url: String,
        /// The cause.
        source: lapin::Error,
    },
    /// A broker operation failed.
    #[error("failed to {what}: {source}")]
    Amqp {
        /// What we were doing.
        what: String,
        /// The cause.
        source: lapin::Error,
    },
    /// The broker refused (nacked) a publish.
    #[error("the broker refused the message published to {exchange:?} with routing key {routing_key:?}")]
    Nacked {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// A mandatory publish had no queue to go to.
    #[error("no queue is bound for routing key {routing_key:?} on {exchange:?} (unknown job type? start a worker for it or declare it)")]
    Unroutable {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// Encoding or decoding failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The artifact store failed.
    #[error("artifact store: failed to {what} {path:?}: {source}")]
    Artifacts {
        /// What we were doing.
        what: &'static str,
        /// The object path.
        path: String,
        /// The cause.
        source: object_store::Error,
    },
    /// The broker session went away before an operation that needs it (an ack on a
    /// dead session would be lost): the broker redelivers what was not acked.
    #[error("the broker session was lost before {what}; the broker redelivers what was not acked")]
    SessionLost {
        /// What could not be done.
        what: &'static str,
    },
    /// The broker ended a consumer (the queue was deleted, the channel or connection closed).
    #[error("the broker ended the consumer of {queue}")]
    ConsumerEnded {
        /// The queue consumed.
        queue: String,
    },
    /// No pooled broker connection could be had (the pool timed out or is closed).
    #[error("no broker connection to {url} is available: {reason}")]
    PoolUnavailable {
        /// The broker URL, credentials redacted.
        url: String,
        /// What the pool said.
        reason: String,
    },
    /// A job has no trained model in the artifact store.
    #[error("job {job_id} has no model under {prefix}/")]
    ModelMissing {
        /// The job.
        job_id: String,
        /// Where its model would be.
        prefix: String,
    },
    /// A bot has no production model to roll back.
    #[error("bot {bot:?} has no production model to roll back")]
    NoProductionModel {
        /// The bot.
        bot: String,
    },
    /// A bot's production model is no longer the one a change was meant for.
    #[error("bot {bot:?}'s production model is {} now, not {expected}: nothing was changed", current.as_deref().unwrap_or("none"))]
    ProductionMoved {
        /// The bot.
        bot: String,
        /// The production model (a job id) the change was meant for.
        expected: String,
        /// Its production model now.
        current: Option<String>,
    },
    /// A setting is wrong.
    #[error("invalid setting {name}: {reason}")]
    Config {
        /// The setting (environment variable or flag).
        name: String,
        /// What is wrong.
        reason: String,
    },
}

impl CommonError {
    /// Wraps a broker error with what we were doing.
    pub fn amqp(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> CommonError {
        let what = what.into();
        move |source| CommonError::Amqp { what, source }
    }

    /// An artifact-store error no wait can mend: the store does not implement or support the
    /// operation (a bucket without conditional writes, `AWS_CONDITIONAL_PUT=disabled`).
    pub fn store_cannot_do(&self) -> bool {
        matches!(
            self,
            CommonError::Artifacts { source: object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. }, .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each failure says what happened; none of these is a settings problem.
    #[test]
    fn failures_are_not_settings_errors() {
        let errors = [
            CommonError::SessionLost { what: "the ack" },
            CommonError::ConsumerEnded { queue: "p.recorder".into() },
            CommonError::PoolUnavailable { url: "amqp://h".into(), reason: "timeout".into() },
            CommonError::ModelMissing { job_id: "j".into(), prefix: "jobs/j/model".into() },
            CommonError::NoProductionModel { bot: "b".into() },
            CommonError::ProductionMoved { bot: "b".into(), expected: "j1".into(), current: None },
        ];
        for e in &errors {
            assert!(!e.to_string().contains("invalid setting"), "{e}");
        }
        assert_eq!(errors[1].to_string(), "the broker ended the consumer of p.recorder");
    }
}
