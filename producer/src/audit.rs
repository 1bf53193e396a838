//! The audit trail: who did what to which job or bot, and when.
//!
//! Every operator action of [`crate::ops::Ops`] (submit, cancel, retry, replay, promote,
//! rollback, by the CLI, the API or the console) is an [`AuditRecord`] published on the events
//! exchange with the AMQP `type` property [`AUDIT_TYPE`] (routing key `audit.<action>`), so the
//! events stream keeps it beside the job events and `store rebuild` restores it; the action's
//! own control plane also records it in the store at once (the recorder's copy is a duplicate).

use chrono::{DateTime, Utc};
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};
use trainyard_common::{amqp::publish_confirmed, codec, topology::Topology, version::SchemaVersion, CommonError};

/// Every action an audit record can have (what `trainyard audit --action` accepts).
pub const ACTIONS: &[&str] = &["submit", "cancel", "retry", "replay", "promote", "rollback"];

/// The AMQP `type` property of an audit record on the events exchange.
pub const AUDIT_TYPE: &str = "trainyard.audit";

/// One operator action. Unknown fields are ignored (a newer minor version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    /// Contract version (omitted: 1.0).
    #[serde(default, skip_serializing_if = "SchemaVersion::is_current")]
    pub version: SchemaVersion,
    /// A UUID v7: unique, time-ordered; the store records each id once.
    pub id: String,
    /// When it was done.
    pub at: DateTime<Utc>,
    /// Who: the API token's name, or the user running the CLI.
    pub actor: String,
    /// What: `submit`, `cancel`, `retry`, `replay`, `promote` or `rollback`.
    pub action: String,
    /// To what: a job id, or a bot (promote, rollback).
    pub target: String,
    /// More about it (the new job of a retry, the reason of a cancel, the model promoted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl AuditRecord {
    /// A record of `action` on `target` by `actor`, now.
    pub fn new(actor: &str, action: &str, target: &str, detail: Option<serde_json::Value>) -> Self {
        Self {
            version: SchemaVersion::CURRENT,
            id: trainyard_common::job::new_job_id(),
            at: Utc::now(),
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail,
        }
    }

    /// Why this record cannot be kept, if it cannot: another major version, an id that is not a UUID.
    pub fn check(&self) -> Result<(), String> {
        if !self.version.readable() {
            return Err(format!("unsupported audit schema version {} (this build reads {}.x)", self.version, SchemaVersion::CURRENT.major));
        }
        if uuid::Uuid::parse_str(&self.id).is_err() {
            return Err(format!("audit id {:?} is not a UUID", self.id.chars().take(80).collect::<String>()));
        }
        Ok(())
    }
}

/// Is this delivery of the events exchange an audit record (by its `type` property)?
pub fn is_audit(props: &BasicProperties) -> bool {
    props.kind().as_ref().is_some_and(|k| k.as_str() == AUDIT_TYPE)
}

/// Decodes and checks an audit record; the reason when it cannot be kept.
pub fn decode(content_type: Option<&str>, body: &[u8]) -> Result<AuditRecord, String> {
    let record: AuditRecord = codec::decode(content_type, body).map_err(|e| format!("undecodable audit record: {e}"))?;
    record.check()?;
    Ok(record)
}

/// What a parked message reads as now (`trainyard events reprocess`). Audit records are told
/// apart by their routing key (`audit.<action>`; the AMQP `type` is not kept with a parked
/// message); one that does not read as an audit record is tried as a job event (a job type
/// named `audit`), and the audit reason is kept when neither reads.
pub fn decode_parked(routing_key: &str, content_type: Option<&str>, body: &[u8]) -> Result<crate::store::Unparked, String> {
    use crate::store::Unparked;
    let event = || crate::recorder::decode_event(content_type, body).map(|e| Unparked::Event(Box::new(e)));
    if routing_key.starts_with("audit.") {
        decode(content_type, body).map(Unparked::Audit).or_else(|reason| event().map_err(|_| reason))
    } else {
        event()
    }
}

/// Publishes `record` on the events exchange (confirmed).
pub async fn publish(ch: &Channel, topology: &Topology, record: &AuditRecord) -> Result<(), CommonError> {
    let body = codec::to_json(record)?;
    let props = BasicProperties::default()
        .with_content_type(codec::JSON.into())
        .with_type(AUDIT_TYPE.into())
        .with_delivery_mode(2)
        .with_message_id(record.id.clone().into());
    publish_confirmed(ch, &topology.events_exchange(), &format!("audit.{}", record.action), &body, props, false).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused_with_a_reason() {
        let r = AuditRecord::new("ops-token", "cancel", "01936f5e-8c4a-7b2e-9d1f-3a5b7c9e1f20", Some(serde_json::json!({"reason": "r"})));
        let body = codec::to_json(&r).unwrap();
        assert_eq!(decode(Some(codec::JSON), &body).unwrap(), r);
        let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["new_field"] = 1.into();
        assert_eq!(decode(Some(codec::JSON), v.to_string().as_bytes()).unwrap(), r, "unknown fields are read");
        v["id"] = "nope".into();
        assert!(decode(Some(codec::JSON), v.to_string().as_bytes()).unwrap_err().contains("not a UUID"));
        assert!(decode(Some(codec::JSON), b"{").unwrap_err().starts_with("undecodable"));
    }
}
