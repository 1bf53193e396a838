//! Fuzzes the job decoder: any bytes under any content type either decode to a
//! job that passes `validate()` and survives a re-encode, or are refused with
//! an error — never a panic, never an unbounded allocation.
//!
//! Input layout: the first byte picks the content type, the rest is the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trainyard_common::codec::{self, decode_job, JSON, MSGPACK};

const CONTENT_TYPES: [Option<&str>; 6] =
    [None, Some(MSGPACK), Some(JSON), Some("application/x-msgpack"), Some("application/json; charset=utf-8"), Some("text/plain")];

/// The worker's default limit is 1 MiB; the fuzzer's inputs are smaller, so a
/// small limit also exercises the size check.
const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let ct = CONTENT_TYPES[usize::from(sel) % CONTENT_TYPES.len()];
    let Ok(spec) = decode_job(ct, body, LIMIT) else { return };
    assert!(spec.validate().is_ok(), "decode_job returned an invalid job");
    // What was accepted re-encodes and decodes to the same job, in both encodings.
    let again = decode_job(Some(MSGPACK), &codec::to_msgpack(&spec).unwrap(), usize::MAX).expect("msgpack re-encode decodes");
    assert_eq!(again, spec);
    let json = decode_job(Some(JSON), &codec::to_json(&spec).unwrap(), usize::MAX).expect("JSON re-encode decodes");
    assert_eq!(json.job_id, spec.job_id);
    // The params are a JSON object a handler can look at.
    assert!(spec.params.is_object());
    let _ = rmp_serde::to_vec_named(&spec.params);
    let _ = serde_json::to_string(&spec.params);
});
