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
/// The status a worker ended the job with when it dead-lettered it (`failed` or `dead`);
/// absent on older letters, whose status follows from their kind.
pub const DEAD_STATUS: &str = "x-trainyard-dead-status";
/// The worker that dead-lettered a message.
pub const DEAD_WORKER: &str = "x-trainyard-dead-worker";
/// When a worker dead-lettered a message (RFC 3339).
pub const DEAD_AT: &str = "x-trainyard-dead-at";
/// The job id of a dead letter, when the body could be decoded.
pub const JOB_ID: &str = "x-trainyard-job-id";
/// Set on a job republished from a dead-letter queue.
pub const REPLAYED: &str = "x-trainyard-replayed";
/// The run of a job message: 0 as first submitted, and one more on each dead-letter
/// replay (set by the replay). Absent means 0. Every event of the run carries it.
pub const RUN: &str = "x-trainyard-run";
/// Broker-maintained redelivery count on quorum queues.
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// Deliveries of the job before a worker handed it back as a fresh copy (one that waited
/// too long for a slot): counted on, so that a job's redeliveries, and with them the
/// sequence numbers of its events, never go backwards.
pub const EARLIER_DELIVERIES: &str = "x-trainyard-earlier-deliveries";
/// Broker-maintained dead-lettering history.
pub const X_DEATH: &str = "x-death";

/// Set on a worker's copy of a delivery whose headers were too big to carry over: how many
/// bytes of them were dropped.
pub const HEADERS_DROPPED: &str = "x-trainyard-headers-dropped";

/// The most bytes of headers a worker's copy of a delivery (a retry, a dead letter, a hand-back)
/// carries over from it. The copy adds its own (a dead letter's reason: up to 4,000 bytes) and
/// its header frame must fit the connections' frame size (128 KiB by default): the broker
/// routes a bigger one, and each consumer it reaches (the dead-letter recorder, a watch) loses
/// its connection on "frame too large", on every delivery of it.
pub const COPY_BUDGET: usize = 32 * 1024;

/// The headers trainyard reads, kept on a copy whose headers are over [`COPY_BUDGET`].
const KEPT: [&str; 7] = [ATTEMPT, TRACEPARENT, JOB_ID, REPLAYED, RUN, DELIVERY_COUNT, EARLIER_DELIVERIES];

/// `headers` for a worker's copy: as they are when they encode within [`COPY_BUDGET`]; else only
/// the ones trainyard reads (a string among them cut to 256 bytes), and [`HEADERS_DROPPED`]
/// saying how many bytes went.
pub fn within_copy_budget(headers: FieldTable) -> FieldTable {
    let size = table_len(&headers);
    if size <= COPY_BUDGET {
        return headers;
    }
    let mut kept = FieldTable::default();
    for (k, v) in headers.inner() {
        if KEPT.contains(&k.as_str()) {
            let v = match v {
                AMQPValue::LongString(s) if s.as_bytes().len() > 256 => {
                    AMQPValue::LongString(String::from_utf8_lossy(&s.as_bytes()[..256]).into_owned().into())
                }
                other => other.clone(),
            };
            kept.insert(k.clone(), v);
        }
    }
    let dropped = size - table_len(&kept);
    set_str(&mut kept, HEADERS_DROPPED, format!("{dropped} bytes of headers over the {COPY_BUDGET}-byte budget of a copy"));
    kept
}

/// About how many bytes `table` takes encoded (each entry: its key's length byte and key, a
/// type byte and the value).
fn table_len(table: &FieldTable) -> usize {
    table.inner().iter().map(|(k, v)| 1 + k.as_str().len() + 1 + value_len(v)).sum()
}

fn value_len(v: &AMQPValue) -> usize {
    match v {
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldTable(t) => 4 + table_len(t),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(|v| 1 + value_len(v)).sum::<usize>(),
        _ => 8,
    }
}

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

/// When a dead letter died: the worker's [`DEAD_AT`], else the time of the broker's latest
/// `x-death` entry (whole seconds); `None` when it carries neither.
pub fn death_time(headers: Option<&FieldTable>) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Some(at) = string(headers, DEAD_AT).and_then(|s| chrono::DateTime::parse_from_rfc3339(&s).ok()) {
        return Some(at.with_timezone(&chrono::Utc));
    }
    let AMQPValue::FieldArray(deaths) = headers?.inner().get(X_DEATH)? else { return None };
    let time = |death: &AMQPValue| match death {
        AMQPValue::FieldTable(t) => match t.inner().get("time")? {
            AMQPValue::Timestamp(secs) => chrono::DateTime::from_timestamp(i64::try_from(*secs).ok()?, 0),
            _ => None,
        },
        _ => None,
    };
    deaths.as_slice().iter().filter_map(time).max()
}

/// The reason of the broker's latest `x-death` entry (`delivery_limit`, `expired`, `rejected`,
/// `maxlen`); `None` without one.
pub fn death_reason(headers: Option<&FieldTable>) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get(X_DEATH)? else { return None };
    match deaths.as_slice().first()? {
        AMQPValue::FieldTable(t) => string(Some(t), "reason"),
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

/// How many times the job was delivered before this delivery (0 on its first): the broker's
/// redelivery count of this message, plus the deliveries before it was handed back as a
/// fresh copy ([`EARLIER_DELIVERIES`]).
pub fn delivery_count(headers: Option<&FieldTable>) -> u32 {
    let count = |name| int(headers, name).and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    count(DELIVERY_COUNT).saturating_add(count(EARLIER_DELIVERIES))
}

/// `headers` without the counts of the job's deliveries: what a retry (the next attempt) or a
/// replay (the next run) starts from, whose deliveries count from none again.
pub fn without_delivery_counts(headers: Option<&FieldTable>) -> FieldTable {
    let mut inner = without_broker_count(headers).inner().clone();
    inner.remove(EARLIER_DELIVERIES);
    FieldTable::from(inner)
}

/// `headers` without the broker's count of this message's deliveries from the queue it came
/// from ([`DELIVERY_COUNT`]): what a message moved on to another queue carries, whose broker
/// leaves a stale count in place on its first delivery. The job's own earlier deliveries
/// ([`EARLIER_DELIVERIES`]) stay.
pub fn without_broker_count(headers: Option<&FieldTable>) -> FieldTable {
    let mut inner = headers.cloned().unwrap_or_default().inner().clone();
    inner.remove(DELIVERY_COUNT);
    FieldTable::from(inner)
}

/// The headers of a fresh copy of a delivery with `headers`: the same, with the deliveries so
/// far under [`EARLIER_DELIVERIES`] and no broker count (the copy's own starts at none).
pub fn fresh_copy(headers: Option<&FieldTable>) -> FieldTable {
    let mut table = without_delivery_counts(headers);
    set_int(&mut table, EARLIER_DELIVERIES, i64::from(delivery_count(headers)));
    table
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
    format!("00-{trace:032x}-{}-01", new_span_id())
}

fn new_span_id() -> String {
    format!("{:016x}", rand::random::<u64>().max(1))
}

/// The trace id and flags of a W3C `traceparent` (`VERSION-TRACEID-PARENTID-FLAGS`, lowercase
/// hex, neither id all zeros, version `ff` invalid; a later version may add fields after the
/// flags); `None` for anything else.
pub fn parse_traceparent(value: &str) -> Option<(&str, &str)> {
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let rest_ok = if version == "00" { parts.next().is_none() } else { true };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    (hex(version, 2) && version != "ff" && hex(trace, 32) && !zero(trace) && hex(parent, 16) && !zero(parent) && hex(flags, 2) && rest_ok)
        .then_some((trace, flags))
}

/// The `traceparent` of a job submitted on behalf of a caller who sent `parent` (an HTTP
/// request's header): the caller's trace, with a span of its own (version 00, the caller's
/// `sampled` flag; the flags version 00 does not define are zero); a new trace when `parent` is
/// absent or not a valid `traceparent`.
pub fn child_traceparent(parent: Option<&str>) -> String {
    match parent.and_then(parse_traceparent) {
        Some((trace, flags)) => {
            let sampled = u8::from_str_radix(flags, 16).unwrap_or(0) & 0x01;
            format!("00-{trace}-{}-{sampled:02x}", new_span_id())
        }
        None => new_traceparent(),
    }
}

/// The trace id of a message's `traceparent` header, if it has a valid one.
pub fn trace_id(headers: Option<&FieldTable>) -> Option<String> {
    string(headers, TRACEPARENT).and_then(|v| parse_traceparent(&v).map(|(trace, _)| trace.to_string()))
}

#[cfg(test)]
mod tests {
    use lapin::types::FieldTable;

    use super::*;

    #[test]
    fn a_traceparent_is_read_only_when_valid_and_a_child_keeps_the_callers_trace() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let parent = format!("00-{trace}-00f067aa0ba902b7-01");
        assert_eq!(parse_traceparent(&parent), Some((trace, "01")));
        assert_eq!(
            parse_traceparent(&format!("cc-{trace}-00f067aa0ba902b7-00-later")),
            Some((trace, "00")),
            "a later version's extra field"
        );
        for bad in [
            format!("00-{trace}-00f067aa0ba902b7-01-extra"),
            format!("ff-{trace}-00f067aa0ba902b7-01"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_string(),
            format!("00-{trace}-0000000000000000-01"),
            format!("00-{}-00f067aa0ba902b7-01", trace.to_uppercase()),
            format!("00-{trace}-00f067aa0ba902b7"),
            "not a trace".to_string(),
        ] {
            assert_eq!(parse_traceparent(&bad), None, "{bad}");
        }
        let child = child_traceparent(Some(&parent));
        assert_eq!(parse_traceparent(&child), Some((trace, "01")), "{child}");
        let unknown_flags = child_traceparent(Some(&format!("00-{trace}-00f067aa0ba902b7-fe")));
        assert_eq!(parse_traceparent(&unknown_flags), Some((trace, "00")), "flags version 00 does not define are zero: {unknown_flags}");
        assert_ne!(child, parent, "a span of its own");
        let fresh = child_traceparent(Some("garbage"));
        assert!(parse_traceparent(&fresh).is_some_and(|(t, _)| t != trace), "{fresh}");
        let mut hdrs = FieldTable::default();
        set_str(&mut hdrs, TRACEPARENT, parent.clone());
        assert_eq!(trace_id(Some(&hdrs)).as_deref(), Some(trace));
        assert_eq!(trace_id(None), None);
    }

    #[test]
    fn a_copys_headers_over_the_budget_keep_only_trainyards() {
        let mut small = FieldTable::default();
        set_int(&mut small, ATTEMPT, 2);
        set_str(&mut small, "x-custom", "kept");
        assert_eq!(within_copy_budget(small.clone()), small, "within the budget: as they are");
        let mut big = small.clone();
        set_str(&mut big, "x-huge", "h".repeat(100_000));
        set_str(&mut big, JOB_ID, "j".repeat(1_000));
        let copy = within_copy_budget(big);
        assert_eq!(int(Some(&copy), ATTEMPT), Some(2));
        assert_eq!(string(Some(&copy), JOB_ID).map(|s| s.len()), Some(256));
        assert!(string(Some(&copy), "x-huge").is_none() && string(Some(&copy), "x-custom").is_none());
        assert!(string(Some(&copy), HEADERS_DROPPED).is_some_and(|n| n.starts_with("100")), "{copy:?}");
        assert!(table_len(&copy) < 1_024);
    }

    #[test]
    fn a_fresh_copy_counts_on_from_the_deliveries_so_far() {
        let mut original = FieldTable::default();
        set_int(&mut original, DELIVERY_COUNT, 2);
        set_int(&mut original, ATTEMPT, 3);
        let copy = fresh_copy(Some(&original));
        assert_eq!(delivery_count(Some(&copy)), 2, "its first delivery counts as the original's");
        assert!(!copy.inner().contains_key(DELIVERY_COUNT), "the broker's count starts again");
        assert_eq!(attempt(Some(&copy)), 3, "the other headers stay");
        let mut redelivered = copy.clone();
        set_int(&mut redelivered, DELIVERY_COUNT, 1);
        assert_eq!(delivery_count(Some(&redelivered)), 3, "the copy's redelivery counts on");
        assert_eq!(delivery_count(Some(&fresh_copy(Some(&redelivered)))), 3, "and so does a copy of the copy");
        assert_eq!(delivery_count(Some(&fresh_copy(None))), 0);
        let next = without_delivery_counts(Some(&redelivered));
        assert_eq!((delivery_count(Some(&next)), attempt(Some(&next))), (0, 3), "a retry or replay counts from none again");
    }
}
