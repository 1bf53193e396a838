//! Control messages, published to the `<prefix>.control` fanout exchange
//! (JSON) and received by every worker.

use serde::{Deserialize, Serialize};

/// A request to cancel a job.
///
/// Workers stop a running job at its next batch boundary and ack it as
/// `cancelled`. So that a job still waiting in a queue is cancelled too, the
/// sender also writes [`cancel_marker`](crate::artifacts::keys::cancel_marker)
/// in the artifact store; a worker checks it before starting a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// The job to cancel.
    pub job_id: String,
    /// Who asked (user or token name).
    #[serde(default)]
    pub by: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
}
