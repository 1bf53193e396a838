//! The job wire contract: [`JobSpec`].
//!
//! A job is published to `trainyard.jobs` with its job type as routing key.
//! Its body is a `JobSpec`, msgpack (as a map, named fields) or JSON. The
//! contract is versioned ([`SchemaVersion`]): unknown fields and enum values (a
//! newer minor version wrote them) are accepted and ignored, a major version this
//! build does not read is refused with that reason; `params` is validated by the
//! job type's handler, which rejects unknown keys.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::CodecError;
pub use crate::version::SchemaVersion;

/// The schema version this build writes (it reads every minor version of its major).
pub const SCHEMA_VERSION: SchemaVersion = SchemaVersion::CURRENT;
/// Default number of attempts (first run plus retries).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default job timeout: 25 minutes, below RabbitMQ's default `consumer_timeout` (30 minutes),
/// so that a job submitted with defaults runs on a worker started with defaults
/// (`--consumer-timeout-s` 1800). Longer jobs say so (`--timeout`, up to [`MAX_TIMEOUT_S`])
/// and need a broker that allows it (docs/operations.md).
pub const DEFAULT_TIMEOUT_S: u64 = 1500;
/// RabbitMQ's default `consumer_timeout` (30 min): what a worker and a control plane assume
/// unless told (`--consumer-timeout-s` / `TRAINYARD_CONSUMER_TIMEOUT_S`).
pub const DEFAULT_CONSUMER_TIMEOUT_S: u64 = 1800;
/// Longest allowed job timeout: the broker's `consumer_timeout` must be above it.
pub const MAX_TIMEOUT_S: u64 = 6 * 3600;
/// Upper bound on `max_attempts`, below the quorum queue's delivery limit.
pub const MAX_ATTEMPTS_LIMIT: u32 = 10;

/// What started a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TriggerKind {
    /// A person, through the CLI.
    Manual,
    /// A cron schedule of the control plane.
    Schedule,
    /// An event published by another system.
    Event,
    /// The HTTP API.
    Api,
    /// A kind this build does not know (a newer minor version of the contract).
    #[serde(other)]
    Unknown,
}

impl TriggerKind {
    /// Every kind this build knows.
    pub const ALL: [TriggerKind; 4] = [TriggerKind::Manual, TriggerKind::Schedule, TriggerKind::Event, TriggerKind::Api];
}

impl std::str::FromStr for TriggerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TriggerKind::ALL
            .into_iter()
            .chain([TriggerKind::Unknown])
            .find(|k| k.to_string() == s)
            .ok_or_else(|| format!("unknown trigger {s:?} (one of manual, schedule, event, api)"))
    }
}

impl std::fmt::Display for TriggerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TriggerKind::Manual => "manual",
            TriggerKind::Schedule => "schedule",
            TriggerKind::Event => "event",
            TriggerKind::Api => "api",
            TriggerKind::Unknown => "unknown",
        })
    }
}

/// A job's priority tier. Workers never start a lower-tier job while a higher-tier
/// job of their types is ready (each tier has its own queue, see
/// [`Topology::tier_queue`](crate::topology::Topology::tier_queue)).
///
/// Absent on the wire means `normal`; a value this build does not know (a newer
/// minor version's tier) is read as `normal`, so that the job still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Before everything else (an urgent fix).
    High,
    /// The default.
    #[default]
    Normal,
    /// Only when nothing else is ready (bulk imports).
    Low,
}

impl Priority {
    /// Every tier, highest first: the order workers take them in.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The lower-case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// Is this the default tier (left out on the wire)?
    pub fn is_normal(&self) -> bool {
        *self == Priority::Normal
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| format!("unknown priority {s:?} (one of high, normal, low)"))
    }
}

impl<'de> Deserialize<'de> for Priority {
    /// Lenient: any value that is not a known tier name reads as `normal`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(v.as_str().and_then(|s| s.parse().ok()).unwrap_or_default())
    }
}

/// Longest coalescing key.
pub const MAX_COALESCE_KEY: usize = 256;

/// Who or what triggered a job, for the audit trail. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Trigger {
    /// The kind of trigger.
    pub kind: TriggerKind,
    /// Its source: a user or token name, a schedule name, an event routing key.
    #[serde(default)]
    pub source: String,
}

impl Trigger {
    /// A manual trigger by `who`.
    pub fn manual(who: impl Into<String>) -> Self {
        Self { kind: TriggerKind::Manual, source: who.into() }
    }
}

/// A training (or any other) job, as it travels on the wire.
///
/// Never `deny_unknown_fields`: a job written by a newer minor version (a field this
/// build does not know) must still run here; the unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSpec {
    /// Schema version: `1` (an integer; omitted means 1) or `"MAJOR.MINOR"`.
    #[serde(default)]
    pub version: SchemaVersion,
    /// A UUID string (v7 when trainyard makes it). Also the AMQP `message_id`.
    pub job_id: String,
    /// The job type, also the routing key and the queue suffix.
    pub job_type: String,
    /// The bot this job is for.
    pub bot: String,
    /// Per-type parameters, validated by the job type's handler.
    #[serde(default = "empty_params")]
    pub params: serde_json::Value,
    /// Who or what triggered the job.
    pub trigger: Trigger,
    /// When it was submitted.
    pub submitted_at: DateTime<Utc>,
    /// Attempts allowed in total (first run plus retries).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wall-clock limit of one attempt, in seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Optional key that makes two submissions the same job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Priority tier (absent = normal).
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
    /// Latest wins: of the jobs with the same key, only the newest (by `submitted_at`,
    /// then `job_id`) runs; an older one that has not started ends `superseded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coalesce_key: Option<String>,
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn default_timeout_s() -> u64 {
    DEFAULT_TIMEOUT_S
}
fn empty_params() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// A new time-ordered job id (UUID v7).
pub fn new_job_id() -> String {
    Uuid::now_v7().to_string()
}

/// Is `name` usable as a job type (and so in queue names and routing keys)?
pub fn valid_job_type(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Is `name` usable as a bot name (it becomes a path segment of the artifact store)?
pub fn valid_bot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl JobSpec {
    /// A new job with a fresh v7 id, default attempts and timeout, submitted now.
    pub fn new(job_type: impl Into<String>, bot: impl Into<String>, params: serde_json::Value, trigger: Trigger) -> Self {
        Self {
            version: SCHEMA_VERSION,
            job_id: new_job_id(),
            job_type: job_type.into(),
            bot: bot.into(),
            params,
            trigger,
            submitted_at: Utc::now(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout_s: DEFAULT_TIMEOUT_S,
            idempotency_key: None,
            priority: Priority::Normal,
            coalesce_key: None,
        }
    }

    /// Gives the job an idempotency key and the id that key stands for (a UUID v5 of it): the
    /// same key gives the same job. An empty key is refused.
    pub fn set_idempotency_key(&mut self, key: &str) -> Result<(), String> {
        if key.trim().is_empty() {
            return Err("idempotency_key is empty: give a key that names the request, or none".into());
        }
        self.job_id = Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("trainyard:{key}").as_bytes()).to_string();
        self.idempotency_key = Some(key.to_string());
        Ok(())
    }

    /// Whether `other` asks for the same work as this job: type, bot and params (what an
    /// idempotency key must not be reused with different values of).
    pub fn same_work(&self, other: &JobSpec) -> bool {
        self.job_type == other.job_type && self.bot == other.bot && self.params == other.params
    }

    /// The coalescing key `trainyard submit --coalesce` uses: `<job_type>/<bot>`.
    pub fn bot_coalesce_key(&self) -> String {
        format!("{}/{}", self.job_type, self.bot)
    }

    /// Checks what serde cannot: version, id, names, bounds.
    pub fn validate(&self) -> Result<(), CodecError> {
        let bad = |field: &'static str, reason: String| Err(CodecError::Invalid { field, reason });
        if !self.version.readable() {
            let major = SCHEMA_VERSION.major;
            return bad("version", format!("unsupported schema version {} (this build reads {major}.x)", self.version));
        }
        if Uuid::parse_str(&self.job_id).is_err() {
            return bad("job_id", format!("{:?} is not a UUID", truncate(&self.job_id)));
        }
        if !valid_job_type(&self.job_type) {
            return bad("job_type", format!("{:?} is not a job type name ([a-z0-9_-], 1..64)", truncate(&self.job_type)));
        }
        if !valid_bot_name(&self.bot) {
            return bad("bot", format!("{:?} is not a bot name ([A-Za-z0-9._-], 1..128, no leading dot)", truncate(&self.bot)));
        }
        if !self.params.is_object() {
            return bad("params", "must be an object".into());
        }
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS_LIMIT {
            return bad("max_attempts", format!("{} is outside 1..={MAX_ATTEMPTS_LIMIT}", self.max_attempts));
        }
        if self.timeout_s == 0 || self.timeout_s > MAX_TIMEOUT_S {
            return bad("timeout_s", format!("{} is outside 1..={MAX_TIMEOUT_S}", self.timeout_s));
        }
        if let Some(key) = &self.coalesce_key {
            if key.is_empty() || key.len() > MAX_COALESCE_KEY || key.chars().any(char::is_control) {
                return bad(
                    "coalesce_key",
                    format!("{:?} is not a key (1..={MAX_COALESCE_KEY} bytes, no control characters)", truncate(key)),
                );
            }
        }
        Ok(())
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_example_parses_and_validates() {
        let json = r#"{"version": 1,
 "job_id": "01936f5e-8c4a-7b2e-9d1f-3a5b7c9e1f20",
 "job_type": "intent-train", "bot": "banking",
 "params": {"dataset": "clinc150/data_full.json", "epochs": 20, "seed": 7},
 "trigger": {"kind": "event", "source": "bot.dataset_updated"},
 "submitted_at": "2026-11-24T12:00:00Z", "max_attempts": 3, "timeout_s": 3600}"#;
        let spec: JobSpec = serde_json::from_str(json).unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.trigger.kind, TriggerKind::Event);
        assert_eq!(spec.params["epochs"], 20);
    }

    #[test]
    fn version_and_defaults_may_be_omitted() {
        let json = r#"{"job_id":"01936f5e-8c4a-7b2e-9d1f-3a5b7c9e1f20","job_type":"noop","bot":"b",
            "trigger":{"kind":"manual"},"submitted_at":"2026-11-24T12:00:00Z"}"#;
        let spec: JobSpec = serde_json::from_str(json).unwrap();
        spec.validate().unwrap();
        assert_eq!((spec.version, spec.max_attempts, spec.timeout_s), (SCHEMA_VERSION, DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT_S));
    }

    #[test]
    fn newer_minor_versions_unknown_fields_and_kinds_are_read() {
        let json = r#"{"version":"1.4","job_id":"01936f5e-8c4a-7b2e-9d1f-3a5b7c9e1f20","job_type":"noop","bot":"b",
            "trigger":{"kind":"webhook","source":"s","signed":true},"submitted_at":"2026-11-24T12:00:00Z","priority":7}"#;
        let spec: JobSpec = serde_json::from_str(json).unwrap();
        spec.validate().unwrap();
        assert_eq!((spec.version, spec.trigger.kind), (SchemaVersion::new(1, 4), TriggerKind::Unknown));
        let v2 = json.replace("\"1.4\"", "2");
        let err = serde_json::from_str::<JobSpec>(&v2).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("unsupported schema version 2.0"), "{err}");
    }

    #[test]
    fn bounds_are_enforced() {
        let mut spec = JobSpec::new("noop", "b", serde_json::json!({}), Trigger::manual("t"));
        spec.validate().unwrap();
        spec.max_attempts = 0;
        assert!(spec.validate().unwrap_err().to_string().contains("max_attempts"));
        spec.max_attempts = 3;
        spec.bot = "../etc".into();
        assert!(spec.validate().unwrap_err().to_string().contains("bot"));
        spec.bot = "b".into();
        spec.job_type = "No Such".into();
        assert!(spec.validate().is_err());
        spec.job_type = "noop".into();
        spec.coalesce_key = Some(String::new());
        assert!(spec.validate().unwrap_err().to_string().contains("coalesce_key"));
    }

    #[test]
    fn priority_and_key_are_optional_and_lenient() {
        let base = r#"{"job_id":"01936f5e-8c4a-7b2e-9d1f-3a5b7c9e1f20","job_type":"noop","bot":"b",
            "trigger":{"kind":"manual"},"submitted_at":"2026-11-24T12:00:00Z""#;
        let old: JobSpec = serde_json::from_str(&format!("{base}}}")).unwrap();
        assert_eq!((old.priority, old.coalesce_key.as_deref()), (Priority::Normal, None));
        let new: JobSpec = serde_json::from_str(&format!(r#"{base},"priority":"high","coalesce_key":"noop/b"}}"#)).unwrap();
        assert_eq!((new.priority, new.coalesce_key.as_deref()), (Priority::High, Some("noop/b")));
        let newer: JobSpec = serde_json::from_str(&format!(r#"{base},"priority":"urgent"}}"#)).unwrap();
        assert_eq!(newer.priority, Priority::Normal, "a tier this build does not know runs as normal");
        // Written only when set, so that the release before reads the same bytes as always.
        let json = serde_json::to_value(&old).unwrap();
        assert!(json.get("priority").is_none() && json.get("coalesce_key").is_none());
        let bytes = rmp_serde::to_vec_named(&new).unwrap();
        assert_eq!(rmp_serde::from_slice::<JobSpec>(&bytes).unwrap(), new);
        assert_eq!(new.bot_coalesce_key(), "noop/b");
    }
}
