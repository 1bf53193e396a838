//! Property tests of the wire codec: every valid `JobSpec` and every `JobEvent`
//! survives a msgpack and a JSON round trip unchanged, and no input bytes make
//! the job decoder panic.
//!
//! Floats: any finite `f64`, in msgpack and in JSON alike (the workspace enables
//! serde_json's `float_roundtrip`; without it some 17-digit values came back one
//! ulp off, 1.2822991541001633e-53 as ...163e-53).

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Map, Value};
use trainyard_common::{
    codec::{self, decode_job, DEFAULT_MAX_MESSAGE_BYTES, JSON, MSGPACK},
    event::WorkerInfo,
    ErrorInfo, ErrorKind, JobEvent, JobSpec, JobStatus, Trigger, TriggerKind,
};

/// Any JSON value a job's `params` could hold, nested a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Finite floats only: JSON has no NaN or infinity.
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A value for an optional field: `null` would come back as `None`.
fn some_value() -> impl Strategy<Value = Value> {
    json_value().prop_filter("not null", |v| !v.is_null())
}

fn params() -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[a-z_]{1,16}", json_value(), 0..8).prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // Year 1970 to 2200, with nanoseconds.
    (0i64..7_258_118_400, 0u32..1_000_000_000).prop_map(|(s, ns)| Utc.timestamp_opt(s, ns).unwrap())
}

fn trigger() -> impl Strategy<Value = Trigger> {
    let kind = prop_oneof![Just(TriggerKind::Manual), Just(TriggerKind::Schedule), Just(TriggerKind::Event), Just(TriggerKind::Api)];
    (kind, ".{0,40}").prop_map(|(kind, source)| Trigger { kind, source })
}

/// A `JobSpec` that passes `validate()`.
fn valid_spec() -> impl Strategy<Value = JobSpec> {
    (
        any::<u128>(),
        "[a-z0-9_-]{1,64}",
        "[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}",
        params(),
        trigger(),
        time(),
        1u32..=trainyard_common::job::MAX_ATTEMPTS_LIMIT,
        1u64..=trainyard_common::job::MAX_TIMEOUT_S,
        prop::option::of(".{0,60}"),
    )
        .prop_map(|(id, job_type, bot, params, trigger, submitted_at, max_attempts, timeout_s, idempotency_key)| JobSpec {
            version: trainyard_common::job::SCHEMA_VERSION,
            job_id: uuid::Uuid::from_u128(id).to_string(),
            job_type,
            bot,
            params,
            trigger,
            submitted_at,
            max_attempts,
            timeout_s,
            idempotency_key,
            priority: Default::default(),
            coalesce_key: None,
        })
}

fn status() -> impl Strategy<Value = JobStatus> {
    prop::sample::select(JobStatus::ALL.to_vec())
}

fn error_info() -> impl Strategy<Value = ErrorInfo> {
    let kind = prop_oneof![Just(ErrorKind::Transient), Just(ErrorKind::Permanent), Just(ErrorKind::Timeout), Just(ErrorKind::Cancelled)];
    (kind, ".{0,80}").prop_map(|(kind, message)| ErrorInfo { kind, message })
}

fn worker() -> impl Strategy<Value = WorkerInfo> {
    (".{0,30}", prop::collection::btree_map("[a-z./-]{1,20}", ".{0,20}", 0..4)).prop_map(|(id, attributes)| WorkerInfo { id, attributes })
}

fn event() -> impl Strategy<Value = JobEvent> {
    (
        (valid_spec(), any::<u64>(), status(), any::<u32>(), prop::option::of(worker()), time()),
        (prop::option::of(some_value()), prop::option::of(some_value()), prop::option::of(error_info()), any::<bool>()),
    )
        .prop_map(|((spec, seq, status, attempt, worker, at), (progress, result, error, with_spec))| {
            let mut ev = JobEvent::new(&spec, status, attempt, seq);
            ev.worker = worker;
            ev.at = at;
            ev.progress = progress;
            ev.result = result;
            ev.error = error;
            ev.spec = with_spec.then_some(spec);
            ev
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn valid_job_specs_round_trip_through_msgpack(spec in valid_spec()) {
        let bytes = codec::to_msgpack(&spec).unwrap();
        prop_assert_eq!(decode_job(Some(MSGPACK), &bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap(), spec.clone());
        prop_assert_eq!(decode_job(None, &bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap(), spec);
    }

    #[test]
    fn valid_job_specs_round_trip_through_json(spec in valid_spec()) {
        let bytes = codec::to_json(&spec).unwrap();
        prop_assert_eq!(decode_job(Some(JSON), &bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap(), spec);
    }

    /// Any string fields (also ones `validate()` refuses) survive the codec itself.
    #[test]
    fn any_job_spec_round_trips_through_the_codec(mut spec in valid_spec(), job_id in ".{0,50}", bot in ".{0,50}", version in (any::<u32>(), any::<u32>())) {
        spec.job_id = job_id;
        spec.bot = bot;
        spec.version = trainyard_common::version::SchemaVersion::new(version.0, version.1);
        let m: JobSpec = codec::decode(Some(MSGPACK), &codec::to_msgpack(&spec).unwrap()).unwrap();
        prop_assert_eq!(&m, &spec);
        let j: JobSpec = codec::decode(Some(JSON), &codec::to_json(&spec).unwrap()).unwrap();
        prop_assert_eq!(j, spec);
    }

    #[test]
    fn events_round_trip_through_msgpack_and_json(ev in event()) {
        let m: JobEvent = codec::decode(Some(MSGPACK), &codec::to_msgpack(&ev).unwrap()).unwrap();
        prop_assert_eq!(&m, &ev);
        let j: JobEvent = codec::decode(Some(JSON), &codec::to_json(&ev).unwrap()).unwrap();
        prop_assert_eq!(j, ev);
    }

    /// Arbitrary bytes never panic the decoder, under any content type; what it
    /// accepts is a valid job.
    #[test]
    fn arbitrary_bytes_never_panic_the_job_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512), ct in prop_oneof![
        Just(None), Just(Some(MSGPACK)), Just(Some(JSON)), Just(Some("text/plain")), Just(Some("application/json; charset=utf-8"))
    ]) {
        if let Ok(spec) = decode_job(ct, &bytes, DEFAULT_MAX_MESSAGE_BYTES) {
            prop_assert!(spec.validate().is_ok());
        }
    }

    /// A valid job with a few bytes flipped or cut off is either refused or still valid.
    #[test]
    fn mutated_jobs_are_refused_or_valid(spec in valid_spec(), json in any::<bool>(), cut in any::<prop::sample::Index>(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4)) {
        let (ct, mut bytes) = if json { (JSON, codec::to_json(&spec).unwrap()) } else { (MSGPACK, codec::to_msgpack(&spec).unwrap()) };
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= b;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        if let Ok(spec) = decode_job(Some(ct), &bytes, DEFAULT_MAX_MESSAGE_BYTES) {
            prop_assert!(spec.validate().is_ok());
        }
    }
}

/// The value the JSON property found one ulp off before the workspace enabled
/// serde_json's `float_roundtrip`: it comes back exact, alone and inside a job.
#[test]
fn a_seventeen_digit_float_survives_json_exactly() {
    let x = 1.2822991541001633e-53_f64;
    let back: f64 = serde_json::from_str(&serde_json::to_string(&x).unwrap()).unwrap();
    assert_eq!(back.to_bits(), x.to_bits());
    let spec = JobSpec::new("noop", "bot", serde_json::json!({"lr": x}), Trigger { kind: TriggerKind::Api, source: "test".into() });
    let decoded = decode_job(Some(JSON), &codec::to_json(&spec).unwrap(), DEFAULT_MAX_MESSAGE_BYTES).unwrap();
    assert_eq!(decoded.params["lr"].as_f64().map(f64::to_bits), Some(x.to_bits()));
}
