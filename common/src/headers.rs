//! AMQP header names used by trainyard, and helpers to read them.

use lapin::types::{AMQPValue, FieldTable};

/// Real attempt number of a job message (1-based). Absent means 1.
pub const ATTEMPT: &str = "x-trainyard-attempt";
/// W3C trace context of the submitter.
pub const TRACEPARENT: &str = "traceparent";
/// Why a message was dead-lettered by a worker.
pub const DEAD_REASON: &str = "x-trainyard-dead-reason";
/// The error kind of a dead letter (`permanent`, `transient`, `timeout`, `poison`).
pub const DEAD_KIND: &str = "x-trainyard-dead-kind";
/// The worker that dead-lettered a message.
pub const DEAD_WORKER: &str = "x-trainyard-dead-worker";
/// The job id of a dead letter, when the body could be decoded.
pub const JOB_ID: &str = "x-trainyard-job-id";
/// Set on a job republished from a dead-letter queue.
pub const REPLAYED: &str = "x-trainyard-replayed";
/// The run of a job message: 0 as first submitted, and one more on each dead-letter
/// replay (set by the replay). Absent means 0. Every event of the run carries it.
pub const RUN: &str = "x-trainyard-run";
/// Broker-maintained redelivery count on quorum queues.
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// Broker-maintained dead-lettering history.
pub const X_DEATH: &str = "x-death";

/// Reads an integer header of any AMQP integer width.
pub fn int(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    match headers?.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

/// Reads a string header.
pub fn string(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The real attempt number carried by a job message (1 when absent or nonsense).
pub fn attempt(headers: Option<&FieldTable>) -> u32 {
    int(headers, ATTEMPT).and_then(|v| u32::try_from(v).ok()).filter(|v| *v >= 1).unwrap_or(1)
}

/// The run carried by a job message (0 when absent or nonsense).
pub fn run(headers: Option<&FieldTable>) -> u32 {
    int(headers, RUN).and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

/// How many times the broker has redelivered this message (0 on first delivery).
pub fn delivery_count(headers: Option<&FieldTable>) -> u32 {
    int(headers, DELIVERY_COUNT).and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

/// Sets a string header.
pub fn set_str(table: &mut FieldTable, name: &str, value: impl Into<String>) {
    table.insert(name.into(), AMQPValue::LongString(value.into().into()));
}

/// Sets an integer header.
pub fn set_int(table: &mut FieldTable, name: &str, value: i64) {
    table.insert(name.into(), AMQPValue::LongLongInt(value));
}

/// A W3C `traceparent` for a new trace (version 00, sampled).
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}
