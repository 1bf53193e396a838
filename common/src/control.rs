//! Control messages, published to the `<prefix>.control` fanout exchange
//! (JSON) and received by every worker.

use serde::{Deserialize, Serialize};

/// A request to cancel a job.
///
/// Workers stop a running job at its next batch boundary and ack it as
/// `cancelled`. So that a job still waiting in a queue is cancelled too, the
/// sender also writes [`cancel_marker`](crate::artifacts::keys::cancel_marker)
/// in the artifact store; a worker checks it before starting a job.
///
/// Never `deny_unknown_fields`: a newer control plane may add a field, and a worker of the
/// release before, refusing it, ignored every cancel (a running job went on to succeed) and
/// read every coalescing marker as a plain cancel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// `by` of the cancel marker with which coalescing supersedes a job.
pub const SUPERSEDED_BY: &str = "coalesce";
/// Prefix of that marker's `reason`, followed by the newer job's id.
pub const SUPERSEDED_REASON: &str = "superseded by ";

impl CancelRequest {
    /// The marker that supersedes `job_id` by the newer job `newer` (latest wins).
    /// A worker that does not know coalescing reads it as a plain cancel.
    pub fn superseded(job_id: &str, newer: &str) -> Self {
        Self { job_id: job_id.to_string(), by: SUPERSEDED_BY.into(), reason: format!("{SUPERSEDED_REASON}{newer}") }
    }

    /// The newer job that supersedes this one, when coalescing wrote this request.
    pub fn superseded_by(&self) -> Option<&str> {
        if self.by == SUPERSEDED_BY {
            self.reason.strip_prefix(SUPERSEDED_REASON)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_superseding_cancel_names_the_newer_job() {
        let req = CancelRequest::superseded("a", "b");
        assert_eq!(req.superseded_by(), Some("b"));
        let json = String::from_utf8(crate::codec::to_json(&req).unwrap()).unwrap();
        assert!(json.contains(r#""reason":"superseded by b""#), "{json}");
        assert_eq!(CancelRequest { by: "alice".into(), ..req }.superseded_by(), None);
    }

    /// A field a newer control plane adds is ignored, not a reason to drop the request.
    #[test]
    fn a_request_with_a_field_this_build_does_not_know_is_read() {
        let req: CancelRequest = serde_json::from_str(r#"{"job_id":"j","by":"a","reason":"r","at":"2026-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(req, CancelRequest { job_id: "j".into(), by: "a".into(), reason: "r".into() });
    }
}
