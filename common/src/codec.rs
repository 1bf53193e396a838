//! Encoding and decoding of jobs and events, chosen by AMQP content type.
//!
//! Jobs are msgpack **as a map** (named fields), so any field order and
//! optional fields work and unknown fields (a newer minor version) are ignored; a body with content
//! type `application/json` is read as JSON, so any language can publish a job.

use serde::{de::DeserializeOwned, Serialize};

use crate::{error::CodecError, job::JobSpec, version::SchemaVersion};

/// Content type of msgpack bodies.
pub const MSGPACK: &str = "application/msgpack";
/// Content type of JSON bodies.
pub const JSON: &str = "application/json";
/// Default limit on a job message body.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Deepest nesting of arrays and maps a msgpack body may have (serde_json's own
/// limit is 128 too). rmp-serde allows 1024 by default, deep enough for a
/// hostile body to overflow a worker thread's stack and abort the process.
pub const MAX_DEPTH: usize = 128;

/// Encodes `value` as msgpack with named fields.
pub fn to_msgpack<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(value).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Encodes `value` as JSON.
pub fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(value).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a body by content type (`None` or empty means msgpack).
pub fn decode<T: DeserializeOwned>(content_type: Option<&str>, body: &[u8]) -> Result<T, CodecError> {
    // Parameters such as "; charset=utf-8" are allowed.
    let ct = content_type.unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match ct.as_str() {
        "" | MSGPACK | "application/x-msgpack" => from_msgpack(body).map_err(|e| CodecError::Msgpack(e.to_string())),
        JSON => serde_json::from_slice(body).map_err(|e| CodecError::Json(e.to_string())),
        other => Err(CodecError::ContentType(other.to_string())),
    }
}

fn from_msgpack<T: DeserializeOwned>(body: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de)
}

/// Decodes and validates a job body, enforcing the size limit first.
pub fn decode_job(content_type: Option<&str>, body: &[u8], max_bytes: usize) -> Result<JobSpec, CodecError> {
    if body.len() > max_bytes {
        return Err(CodecError::TooLarge { size: body.len(), limit: max_bytes });
    }
    let spec: JobSpec = match decode(content_type, body) {
        Ok(spec) => spec,
        Err(e) => return Err(unreadable_version(content_type, body).map_or(e, |v| CodecError::Invalid { field: "version", reason: v })),
    };
    spec.validate()?;
    Ok(spec)
}

/// Why a message this build could not decode cannot be read, when it says it is of a major
/// version this build does not read: a newer major version may change any field, and its
/// refusal must name the version (an upgrade skew), not the field it failed on (corruption).
pub fn unreadable_version(content_type: Option<&str>, body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Versioned {
        version: Option<SchemaVersion>,
    }
    let version = decode::<Versioned>(content_type, body).ok()?.version?;
    let major = SchemaVersion::CURRENT.major;
    (!version.readable()).then(|| format!("unsupported schema version {version} (this build reads {major}.x)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Trigger;

    fn spec() -> JobSpec {
        JobSpec::new("noop", "bot-1", serde_json::json!({"sleep_ms": 5}), Trigger::manual("me"))
    }

    #[test]
    fn msgpack_round_trip_is_a_map() {
        let s = spec();
        let bytes = to_msgpack(&s).unwrap();
        // A fixmap/map16 marker, not an array: fields travel by name.
        assert!(matches!(bytes[0], 0x80..=0x8f | 0xde | 0xdf), "not a map: {:#x}", bytes[0]);
        assert_eq!(decode_job(Some(MSGPACK), &bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap(), s);
        assert_eq!(decode_job(None, &bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap(), s);
    }

    #[test]
    fn json_round_trip() {
        let s = spec();
        let bytes = to_json(&s).unwrap();
        assert_eq!(decode_job(Some("application/json; charset=utf-8"), &bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap(), s);
    }

    #[test]
    fn reads_unknown_fields_of_a_newer_minor_version() {
        let s = spec();
        let mut v = serde_json::to_value(&s).unwrap();
        v["colour"] = "blue".into();
        v["trigger"]["signed_by"] = "ci".into();
        assert_eq!(decode_job(Some(JSON), &serde_json::to_vec(&v).unwrap(), 1 << 20).unwrap(), s);
        assert_eq!(decode_job(Some(MSGPACK), &rmp_serde::to_vec_named(&v).unwrap(), 1 << 20).unwrap(), s);
        v["version"] = 2.into();
        let err = decode_job(Some(JSON), &serde_json::to_vec(&v).unwrap(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("unsupported schema version 2.0"), "{err}");
        // A newer major version that changed a field's shape is refused for its version, not
        // for the field (it read as corruption: "missing field `bot`").
        let bot = v.as_object_mut().unwrap().remove("bot").unwrap();
        v["owner"] = bot;
        for (ct, body) in [(JSON, serde_json::to_vec(&v).unwrap()), (MSGPACK, rmp_serde::to_vec_named(&v).unwrap())] {
            let err = decode_job(Some(ct), &body, 1 << 20).unwrap_err();
            assert!(err.to_string().contains("unsupported schema version 2.0"), "{ct}: {err}");
        }
        v["version"] = "1.4".into();
        let err = decode_job(Some(JSON), &serde_json::to_vec(&v).unwrap(), 1 << 20).unwrap_err();
        assert!(matches!(err, CodecError::Json(_)), "a readable version's missing field is the field's error: {err}");
    }

    #[test]
    fn rejects_oversized_garbage_and_foreign_content_types() {
        let bytes = to_msgpack(&spec()).unwrap();
        assert!(matches!(decode_job(None, &bytes, 10), Err(CodecError::TooLarge { .. })));
        assert!(matches!(decode_job(None, b"\xc1\xff garbage", 1 << 20), Err(CodecError::Msgpack(_))));
        assert!(matches!(decode_job(Some("text/plain"), b"{}", 1 << 20), Err(CodecError::ContentType(_))));
        assert!(matches!(decode_job(Some(JSON), b"{\"job_id\":1}", 1 << 20), Err(CodecError::Json(_))));
    }

    #[test]
    fn refuses_deep_msgpack_nesting_without_overflowing_the_stack() {
        // 1,000 nested one-element arrays (rmp-serde's default limit is 1,024), and 100,000.
        for n in [1_000, 100_000] {
            let mut body = vec![0x91u8; n];
            body.push(0);
            let err = decode::<serde_json::Value>(Some(MSGPACK), &body).unwrap_err();
            assert!(err.to_string().contains("depth"), "{err}");
        }
        let mut ok = vec![0x91u8; MAX_DEPTH - 1];
        ok.push(0);
        assert!(decode::<serde_json::Value>(Some(MSGPACK), &ok).is_ok());
    }
}
