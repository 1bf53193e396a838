//! The control plane's configuration file (TOML): known job types, cron
//! schedules and event-trigger rules.
//!
//! ```toml
//! job_types = ["intent-train", "noop"]
//!
//! [[schedule]]
//! name = "nightly-banking"
//! cron = "0 2 * * *"            # 5 fields (minute first) or 6-7 (seconds first)
//! timezone = "Europe/Berlin"    # default UTC
//! job_type = "intent-train"
//! bot = "banking"
//! params = { dataset = "clinc150/data_full.json", epochs = 20 }
//! missed = "fire_once"          # or "skip" (default): what to do with fires missed while down
//!
//! [[trigger]]
//! name = "dataset-updated"
//! routing_key = "bot.dataset_updated"   # topic pattern on <prefix>.triggers
//! job_type = "intent-train"
//! bot = "{{bot}}"                        # {{field}}: a field of the JSON event
//! params = { dataset = "{{dataset}}", epochs = 20 }
//! debounce_s = 300                       # a burst for one bot within this window → one job
//! priority = "high"                      # high, normal (default) or low
//! coalesce_key = "intent-train/{{bot}}"  # latest wins per bot (optional; a template)
//!
//! [policy.intent-train]
//! supersede_running = true   # latest wins also cancels a running older job with the same coalescing key
//! fair_share = true          # admit jobs bot by bot, the bot with the fewest admitted (per weight) first
//! max_running_per_bot = 2    # at most 2 of one bot's jobs admitted and unfinished
//! weights = { banking = 2 }  # fair-share weights (default 1)
//! ```

use std::{path::Path, str::FromStr};

use serde::Deserialize;
use trainyard_common::job::Priority;

/// What to do with fires missed while no scheduler ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissedFire {
    /// Drop them.
    #[default]
    Skip,
    /// Fire once for all of them.
    FireOnce,
}

/// A cron schedule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Unique name (recorded as the trigger source).
    pub name: String,
    /// Cron expression.
    pub cron: String,
    /// IANA time zone of the expression.
    #[serde(default = "utc")]
    pub timezone: String,
    /// Job type to submit.
    pub job_type: String,
    /// Bot.
    pub bot: String,
    /// Job parameters.
    #[serde(default = "empty")]
    pub params: serde_json::Value,
    /// Missed-fire policy.
    #[serde(default)]
    pub missed: MissedFire,
    /// Priority tier of its jobs.
    #[serde(default, deserialize_with = "priority")]
    pub priority: Priority,
    /// Coalescing key of its jobs (latest wins), e.g. `"intent-train/banking"`.
    #[serde(default)]
    pub coalesce_key: Option<String>,
}

/// An event-trigger rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerRule {
    /// Unique name.
    pub name: String,
    /// Topic pattern on `<prefix>.triggers` (`*` one word, `#` any).
    pub routing_key: String,
    /// Job type to submit.
    pub job_type: String,
    /// Bot, a template (`{{bot}}`).
    pub bot: String,
    /// Parameters; string values are templates.
    #[serde(default = "empty")]
    pub params: serde_json::Value,
    /// Debounce window per bot, seconds (0: every event fires).
    #[serde(default = "default_debounce")]
    pub debounce_s: u64,
    /// Priority tier of its jobs.
    #[serde(default, deserialize_with = "priority")]
    pub priority: Priority,
    /// Coalescing key of its jobs (latest wins), a template (`"{{bot}}"`).
    #[serde(default)]
    pub coalesce_key: Option<String>,
}

/// Per-job-type policy (`[policy.<job_type>]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTypePolicy {
    /// When a newer job with the same coalescing key is queued, cancel an older one
    /// that is already running (default: let it finish; only not-started ones are superseded).
    #[serde(default)]
    pub supersede_running: bool,
    /// Fair share between bots: the control plane admits this type's jobs to the workers
    /// a few at a time, the bot with the fewest admitted jobs (per weight) first.
    #[serde(default)]
    pub fair_share: bool,
    /// At most this many of one bot's jobs of this type admitted and not finished.
    #[serde(default)]
    pub max_running_per_bot: Option<u32>,
    /// Fair-share weights by bot (default 1): a bot of weight 2 gets twice the slots.
    #[serde(default)]
    pub weights: std::collections::BTreeMap<String, u32>,
    /// With fair share: how many jobs beyond the workers' free slots are admitted ahead
    /// (default 2), so that a worker never waits for the control plane.
    #[serde(default)]
    pub admit_ahead: Option<u32>,
}

impl JobTypePolicy {
    /// Do this type's jobs go through the control plane's admission step?
    pub fn admission(&self) -> bool {
        self.fair_share || self.max_running_per_bot.is_some()
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Known job types (empty: the built-in ones).
    #[serde(default)]
    pub job_types: Vec<String>,
    /// Cron schedules.
    #[serde(default, rename = "schedule")]
    pub schedules: Vec<ScheduleConfig>,
    /// Trigger rules.
    #[serde(default, rename = "trigger")]
    pub triggers: Vec<TriggerRule>,
    /// Policies by job type.
    #[serde(default, rename = "policy")]
    pub policies: std::collections::BTreeMap<String, JobTypePolicy>,
}

/// A tier name, strictly (a configuration file's typo is an error, not `normal`).
fn priority<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Priority, D::Error> {
    String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
}

fn utc() -> String {
    "UTC".into()
}
fn empty() -> serde_json::Value {
    serde_json::json!({})
}
fn default_debounce() -> u64 {
    60
}

/// A cron expression: 5 fields get a leading `0` seconds field.
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, String> {
    let fields = expr.split_whitespace().count();
    let full = if fields == 5 { format!("0 {expr}") } else { expr.to_string() };
    cron::Schedule::from_str(&full).map_err(|e| format!("bad cron expression {expr:?}: {e}"))
}

impl ControlConfig {
    /// Parses and checks a configuration.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: ControlConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        for s in &cfg.schedules {
            parse_cron(&s.cron).map_err(|e| format!("schedule {:?}: {e}", s.name))?;
            s.timezone.parse::<chrono_tz::Tz>().map_err(|e| format!("schedule {:?}: bad time zone: {e}", s.name))?;
            if !trainyard_common::job::valid_job_type(&s.job_type) {
                return Err(format!("schedule {:?}: bad job type {:?}", s.name, s.job_type));
            }
        }
        let mut names: Vec<&str> = cfg.schedules.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err("schedule names must be unique".into());
        }
        if let Some(bad) = cfg.policies.keys().find(|t| !trainyard_common::job::valid_job_type(t)) {
            return Err(format!("policy {bad:?}: not a job type name"));
        }
        for (t, p) in &cfg.policies {
            if p.max_running_per_bot == Some(0) || p.weights.values().any(|w| *w == 0) {
                return Err(format!("policy {t:?}: max_running_per_bot and weights must be at least 1"));
            }
        }
        for t in &cfg.triggers {
            if t.routing_key.is_empty() || !trainyard_common::job::valid_job_type(&t.job_type) {
                return Err(format!("trigger {:?}: needs a routing key and a valid job type", t.name));
            }
        }
        Ok(cfg)
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        Self::parse(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let text = include_str!("config.rs").split("//! ```toml\n").nth(1).unwrap().split("//! ```").next().unwrap();
        let text: String =
            text.lines().map(|l| l.strip_prefix("//!").unwrap_or(l).strip_prefix(' ').unwrap_or("")).collect::<Vec<_>>().join("\n");
        let cfg = ControlConfig::parse(&text).unwrap();
        assert_eq!(cfg.schedules[0].missed, MissedFire::FireOnce);
        assert_eq!(cfg.triggers[0].debounce_s, 300);
        assert_eq!(cfg.schedules[0].params["epochs"], 20);
        assert!(cfg.policies["intent-train"].supersede_running);
        let p = &cfg.policies["intent-train"];
        assert_eq!((p.fair_share, p.max_running_per_bot, p.weights.get("banking")), (true, Some(2), Some(&2)));
        assert!(p.admission() && !JobTypePolicy::default().admission());
        assert!(ControlConfig::parse("[policy.noop]\nmax_running_per_bot = 0").is_err(), "a limit of 0 would admit nothing");
        assert_eq!((cfg.triggers[0].priority, cfg.triggers[0].coalesce_key.as_deref()), (Priority::High, Some("intent-train/{{bot}}")));
        assert_eq!(cfg.schedules[0].priority, Priority::Normal);
        let typo = "[[schedule]]\nname='x'\ncron='* * * * *'\njob_type='noop'\nbot='b'\npriority='hihg'";
        assert!(ControlConfig::parse(typo).unwrap_err().contains("hihg"), "a misspelt tier is refused");
        assert!(ControlConfig::parse("[policy.noop]\nsupersede_runing = true").is_err(), "a misspelt policy is refused");
        assert!(ControlConfig::parse("[[schedule]]\nname='x'\ncron='nope'\njob_type='noop'\nbot='b'").is_err());
        assert!(ControlConfig::parse("colour = 1").is_err());
    }
}
