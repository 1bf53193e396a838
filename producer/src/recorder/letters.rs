//! Reading a dead letter of `<prefix>.dead.recorder`: what to list, and the final event of its job.

use base64::Engine;
use lapin::types::FieldTable;
use trainyard_common::job::{valid_bot_name, valid_job_type};
use trainyard_common::{codec, event::DEAD_LETTER_SEQ, headers, ErrorInfo, ErrorKind, JobEvent, JobSpec, JobStatus, WorkerInfo};

use crate::store::DeadLetter;

/// Reason recorded for a letter the broker dead-lettered by itself.
pub use trainyard_common::topology::DELIVERY_LIMIT_REASON;

/// The kind and reason of a letter the broker dead-lettered, from its `x-death` reason: a
/// message whose TTL ran out is not a crash loop.
fn broker_death(reason: Option<&str>) -> (&'static str, String) {
    match reason {
        Some("expired") => ("expired", "expired in its queue before a worker took it (the message's `expiration`)".into()),
        Some("rejected") => ("rejected", "rejected by a consumer without requeue".into()),
        Some("maxlen") => ("maxlen", "dropped from the head of a full queue".into()),
        Some("delivery_limit") | None => ("delivery-limit", DELIVERY_LIMIT_REASON.into()),
        Some(other) => ("broker", format!("dead-lettered by the broker ({other})")),
    }
}

/// Reads a dead letter: what to list, and the final event of its job (when the job is known).
///
/// A worker's dead letter carries `x-trainyard-dead-reason`/`-kind`; one the
/// broker dead-lettered by itself (the delivery limit, an expiration) has only `x-death`.
/// The status is the worker's `x-trainyard-dead-status` when it set one; otherwise kinds
/// `transient` and `timeout` mean the attempts were used up: status `failed`; anything
/// else is `dead`.
///
/// Hostile letters are listed as received: a job id that is not a UUID is kept (the
/// store escapes what it cannot hold) but the letter's id is then a hash of the body
/// and no job is recorded for it, since no worker ever ran such a job; the whole body
/// is kept as base64.
pub fn dead_letter(
    content_type: Option<&str>,
    hdrs: Option<&FieldTable>,
    routing_key: &str,
    body: &[u8],
) -> (DeadLetter, Option<JobEvent>) {
    let spec: Option<JobSpec> = codec::decode(content_type, body).ok().or_else(|| {
        // Content type lost or wrong: try the other encoding.
        codec::decode(Some(codec::JSON), body).ok()
    });
    let by_broker = hdrs.is_some_and(|h| h.inner().contains_key(headers::X_DEATH));
    let broker = by_broker.then(|| broker_death(headers::death_reason(hdrs).as_deref()));
    let worker_reason = headers::string(hdrs, headers::DEAD_REASON);
    let reason = match (worker_reason.clone(), &broker) {
        (Some(r), _) => r,
        (None, Some((_, r))) => r.clone(),
        (None, None) => "dead-lettered without a reason".to_string(),
    };
    let kind = headers::string(hdrs, headers::DEAD_KIND)
        .unwrap_or_else(|| broker.as_ref().map_or_else(|| "unknown".into(), |(kind, _)| (*kind).to_string()));
    let attempt = headers::attempt(hdrs);
    let job_id = spec.as_ref().map(|s| s.job_id.clone()).or_else(|| headers::string(hdrs, headers::JOB_ID));
    // A real job's id: one a worker could have run (it refuses any other).
    let real_id = job_id.clone().filter(|id| uuid::Uuid::parse_str(id).is_ok());
    let job_type = spec
        .as_ref()
        .map(|s| s.job_type.clone())
        .filter(|t| valid_job_type(t))
        .or_else(|| valid_job_type(routing_key).then(|| routing_key.to_string()))
        .unwrap_or_else(|| "unknown".into());
    let bot = spec.as_ref().map(|s| s.bot.clone());
    let id = real_id.clone().unwrap_or_else(|| format!("poison-{}", uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, body)));
    let preview: String =
        String::from_utf8_lossy(&body[..body.len().min(256)]).chars().map(|c| if c.is_control() { '.' } else { c }).collect();
    let letter = DeadLetter {
        id,
        job_id: job_id.clone(),
        job_type,
        bot,
        reason,
        kind,
        attempt,
        run: headers::run(hdrs),
        broker_dead_lettered: by_broker && worker_reason.is_none(),
        body_preview: preview,
        body: Some(base64::engine::general_purpose::STANDARD.encode(body)),
        // When it died, not when the recorder got to it (hours later after an outage), and the
        // same each time it is read again.
        at: headers::death_time(hdrs).unwrap_or_else(chrono::Utc::now),
        replayed_at: None,
    };
    let event = real_id.map(|job_id| final_event(job_id, &letter, hdrs));
    (letter, event)
}

/// The final event a dead letter gives its job: the worker's `x-trainyard-dead-status` when
/// it set one (a permanent error can end a job `failed`), else what the letter's kind means.
fn final_event(job_id: String, letter: &DeadLetter, hdrs: Option<&FieldTable>) -> JobEvent {
    let (by_kind, error_kind) = match letter.kind.as_str() {
        "transient" => (JobStatus::Failed, ErrorKind::Transient),
        "timeout" => (JobStatus::Failed, ErrorKind::Timeout),
        _ => (JobStatus::Dead, ErrorKind::Permanent),
    };
    let status = match headers::string(hdrs, headers::DEAD_STATUS).as_deref() {
        Some("failed") => JobStatus::Failed,
        Some("dead") => JobStatus::Dead,
        _ => by_kind,
    };
    JobEvent {
        version: Default::default(),
        job_id,
        seq: DEAD_LETTER_SEQ,
        job_type: letter.job_type.clone(),
        bot: letter.bot.clone().filter(|b| valid_bot_name(b)).unwrap_or_default(),
        status,
        attempt: letter.attempt,
        run: Some(headers::run(hdrs)),
        worker: headers::string(hdrs, headers::DEAD_WORKER).map(|id| WorkerInfo { id, attributes: Default::default() }),
        at: letter.at,
        progress: None,
        result: None,
        error: Some(ErrorInfo { kind: error_kind, message: letter.reason.clone() }),
        spec: None,
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldTable;
    use trainyard_common::{codec, headers, JobSpec, JobStatus, Trigger};

    use super::dead_letter;

    fn letter(kind: &str, status: Option<&str>) -> JobStatus {
        let spec = JobSpec::new("noop", "bot", serde_json::json!({}), Trigger::manual("tests"));
        let mut h = FieldTable::default();
        headers::set_str(&mut h, headers::DEAD_REASON, "why");
        headers::set_str(&mut h, headers::DEAD_KIND, kind);
        if let Some(status) = status {
            headers::set_str(&mut h, headers::DEAD_STATUS, status);
        }
        let (_, event) = dead_letter(Some(codec::JSON), Some(&h), "noop", &codec::to_json(&spec).unwrap());
        event.expect("a real job's letter records its final event").status
    }

    #[test]
    fn the_status_is_the_workers_when_it_gave_one_else_it_follows_the_kind() {
        assert_eq!(letter("permanent", Some("failed")), JobStatus::Failed, "a job refused for a setting");
        assert_eq!(letter("permanent", Some("dead")), JobStatus::Dead);
        assert_eq!(letter("permanent", None), JobStatus::Dead, "a letter of an older worker");
        assert_eq!(letter("transient", None), JobStatus::Failed);
        assert_eq!(letter("timeout", None), JobStatus::Failed);
        assert_eq!(letter("permanent", Some("nonsense")), JobStatus::Dead);
    }

    /// A letter and its job's final event are timed when it died: the worker's time, else the
    /// broker's latest death; they were timed when the recorder read the letter, so a control
    /// plane down for hours showed jobs ending hours late, and each reading gave another time.
    #[test]
    fn a_letter_is_timed_when_it_died() {
        use lapin::types::{AMQPValue, FieldArray};
        let spec = JobSpec::new("noop", "bot", serde_json::json!({}), Trigger::manual("tests"));
        let body = codec::to_json(&spec).unwrap();
        let mut by_worker = FieldTable::default();
        headers::set_str(&mut by_worker, headers::DEAD_AT, "2026-12-01T02:25:00.5+00:00");
        let (letter, event) = dead_letter(Some(codec::JSON), Some(&by_worker), "noop", &body);
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-01T02:25:00.5Z").unwrap().to_utc();
        assert_eq!((letter.at, event.unwrap().at), (at, at));
        let death = |secs: u64| {
            let mut d = FieldTable::default();
            d.insert("time".into(), AMQPValue::Timestamp(secs));
            AMQPValue::FieldTable(d)
        };
        let mut by_broker = FieldTable::default();
        let deaths = FieldArray::from(vec![death(1_764_555_900), death(1_764_555_000)]);
        by_broker.insert(headers::X_DEATH.into(), AMQPValue::FieldArray(deaths));
        let (letter, _) = dead_letter(Some(codec::JSON), Some(&by_broker), "noop", &body);
        assert_eq!(letter.at.timestamp(), 1_764_555_900, "the latest death");
        let (first, _) = dead_letter(Some(codec::JSON), None, "noop", &body);
        assert!(first.at <= chrono::Utc::now(), "neither: when read");
    }
}
