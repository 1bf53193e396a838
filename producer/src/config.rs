//! The control plane's configuration file (TOML): known job types, cron
//! schedules and event-trigger rules.
//!
//! ```toml
//! job_types = ["intent-train", "noop"]
//!
//! [[schedule]]
//! name = "nightly-banking"
//! cron = "0 2 * * 1-5"          # 5 fields: Unix cron (day of week 0-7, 0 and 7 Sunday); 6-7: seconds first
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

use std::path::Path;

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

pub use crate::cron_expr::parse_cron;

/// The longest debounce window of a trigger rule: a week (a control plane refuses windows
/// its broker's consumer timeout would cut: [`longest_debounce_s`]).
pub const MAX_DEBOUNCE_S: u64 = 7 * 24 * 3600;

/// The longest debounce window under a broker `consumer_timeout` of `consumer_timeout_s`:
/// the timeout less a tenth (1,620 s at RabbitMQ's default 1,800 s).
pub fn longest_debounce_s(consumer_timeout_s: u64) -> u64 {
    consumer_timeout_s - consumer_timeout_s / 10
}

impl ScheduleConfig {
    /// The job a fire of this schedule submits (its id is set by the fire).
    pub fn job_spec(&self) -> trainyard_common::JobSpec {
        use trainyard_common::{Trigger, TriggerKind};
        let trigger = Trigger { kind: TriggerKind::Schedule, source: self.name.clone() };
        let mut spec = trainyard_common::JobSpec::new(&self.job_type, &self.bot, self.params.clone(), trigger);
        spec.priority = self.priority;
        spec.coalesce_key = self.coalesce_key.clone();
        spec
    }
}

impl ControlConfig {
    /// Parses and checks a configuration.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: ControlConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        for s in &cfg.schedules {
            cfg.check_schedule(s).map_err(|e| format!("schedule {:?}: {e}", s.name))?;
        }
        unique("schedule", cfg.schedules.iter().map(|s| s.name.as_str()))?;
        unique("trigger", cfg.triggers.iter().map(|t| t.name.as_str()))?;
        if let Some(bad) = cfg.policies.keys().find(|t| !trainyard_common::job::valid_job_type(t)) {
            return Err(format!("policy {bad:?}: not a job type name"));
        }
        for (t, p) in &cfg.policies {
            if p.max_running_per_bot == Some(0) || p.weights.values().any(|w| *w == 0) {
                return Err(format!("policy {t:?}: max_running_per_bot and weights must be at least 1"));
            }
        }
        for t in &cfg.triggers {
            cfg.check_trigger(t).map_err(|e| format!("trigger {:?}: {e}", t.name))?;
        }
        Ok(cfg)
    }

    /// A schedule that could never publish is refused here, not retried every few seconds
    /// for ever: its cron and time zone, and the job it submits (type, bot, params, key).
    fn check_schedule(&self, s: &ScheduleConfig) -> Result<(), String> {
        parse_cron(&s.cron)?;
        s.timezone.parse::<chrono_tz::Tz>().map_err(|e| format!("bad time zone: {e}"))?;
        s.job_spec().validate().map_err(|e| e.to_string())?;
        self.check_known(&s.job_type)
    }

    fn check_trigger(&self, t: &TriggerRule) -> Result<(), String> {
        if t.routing_key.is_empty() || !trainyard_common::job::valid_job_type(&t.job_type) {
            return Err("needs a routing key and a valid job type".into());
        }
        if !t.params.is_object() {
            return Err(format!("params must be a table (a JSON object), not {}", t.params));
        }
        if !t.bot.contains("{{") && !trainyard_common::job::valid_bot_name(&t.bot) {
            return Err(format!("bot {:?} is neither a bot name nor a template ({{{{field}}}})", t.bot));
        }
        if t.debounce_s > MAX_DEBOUNCE_S {
            return Err(format!("debounce_s {} is over a week ({MAX_DEBOUNCE_S})", t.debounce_s));
        }
        self.check_known(&t.job_type)
    }

    /// Checks the configuration against the settings `serve` runs with: every schedule, rule
    /// and policy names one of `job_types` (the effective list: `--types`, else the file's,
    /// else the built-in ones), and every debounce window closes well before the broker's
    /// `consumer_timeout` (the events of a burst stay unacked until their job is out: a window
    /// past the timeout would have the broker close the channel and the burst start over, for ever).
    pub fn check_settings(&self, job_types: &[String], consumer_timeout: std::time::Duration) -> Result<(), String> {
        let known = |what: &str, name: &str, job_type: &str| {
            if job_types.iter().any(|t| t == job_type) {
                Ok(())
            } else {
                Err(format!(
                    "{what} {name:?}: job type {job_type:?} is not one this control plane serves ({job_types:?}; \
                     set them with job_types in the file or --types / TRAINYARD_JOB_TYPES)"
                ))
            }
        };
        for s in &self.schedules {
            known("schedule", &s.name, &s.job_type)?;
        }
        for t in &self.triggers {
            known("trigger", &t.name, &t.job_type)?;
        }
        for name in self.policies.keys() {
            known("policy", name, name)?;
        }
        let ct = consumer_timeout.as_secs();
        let longest = longest_debounce_s(ct);
        if let Some(t) = self.triggers.iter().find(|t| t.debounce_s > longest) {
            return Err(format!(
                "trigger {:?}: debounce_s {} is longer than the broker's consumer_timeout ({ct} s, \
                 --consumer-timeout-s / TRAINYARD_CONSUMER_TIMEOUT_S) allows: at most {longest} s \
                 (a tenth of the timeout is kept for submitting the job); raise the broker's \
                 consumer_timeout and the setting together, or shorten the window",
                t.name, t.debounce_s
            ));
        }
        Ok(())
    }

    /// With `job_types` given, a schedule or rule must name one of them.
    fn check_known(&self, job_type: &str) -> Result<(), String> {
        if self.job_types.is_empty() || self.job_types.iter().any(|t| t == job_type) {
            Ok(())
        } else {
            Err(format!("job type {job_type:?} is not one of job_types {:?}", self.job_types))
        }
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        Self::parse(&text)
    }
}

/// Refuses a repeated name among `names` of `what`s.
fn unique<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    match names.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(format!("{what} names must be unique: {:?} is used twice", w[0])),
        None => Ok(()),
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

    /// A schedule, rule or policy for a type this control plane does not serve is refused at
    /// start (a schedule of a misspelt type used to retry as unroutable every 5 s for ever, a
    /// policy for it to leave the real type unlimited), and so is a debounce window the
    /// broker's consumer timeout would cut (the burst would start over for ever).
    #[test]
    fn a_configuration_is_refused_for_types_not_served_and_windows_past_the_consumer_timeout() {
        use std::time::Duration;
        let types = vec!["noop".to_string(), "intent-train".to_string()];
        let ct = Duration::from_secs(1800);
        let parse = |text: &str| ControlConfig::parse(text).unwrap();
        let schedule = |ty: &str| format!("[[schedule]]\nname='s'\ncron='0 2 * * *'\njob_type='{ty}'\nbot='b'\n");
        let trigger =
            |ty: &str, debounce: u64| format!("[[trigger]]\nname='t'\nrouting_key='k'\njob_type='{ty}'\nbot='b'\ndebounce_s={debounce}\n");
        for ok in [schedule("noop"), trigger("intent-train", 1620), "[policy.noop]\nfair_share = true".into()] {
            parse(&ok).check_settings(&types, ct).unwrap();
        }
        for (text, says) in [
            (schedule("intent-trian"), "schedule \"s\": job type \"intent-trian\" is not one this control plane serves"),
            (trigger("nope", 0), "trigger \"t\": job type \"nope\""),
            ("[policy.intent-trian]\nfair_share = true".into(), "policy \"intent-trian\""),
            (trigger("noop", 1621), "at most 1620 s"),
        ] {
            let e = parse(&text).check_settings(&types, ct).unwrap_err();
            assert!(e.contains(says), "{text}\n=> {e}");
        }
        assert_eq!(longest_debounce_s(25_200), 22_680);
    }

    #[test]
    fn schedules_and_rules_that_could_never_publish_are_refused_naming_them() {
        let schedule = |extra: &str| format!("[[schedule]]\nname='s'\ncron='0 2 * * *'\njob_type='noop'\nbot='b'\n{extra}");
        let trigger = |extra: &str| format!("[[trigger]]\nname='t'\nrouting_key='k'\njob_type='noop'\nbot='{{{{bot}}}}'\n{extra}");
        assert!(ControlConfig::parse(&schedule("")).is_ok());
        assert!(ControlConfig::parse(&trigger("")).is_ok());
        for (text, says) in [
            (schedule("").replace("bot='b'", "bot='../x'"), "bot"),
            (schedule("params = 5"), "params"),
            (schedule("").replace("0 2 * * *", "0 0 30 2 *"), "never fires"),
            (format!("job_types = ['intent-train']\n{}", schedule("")), "not one of job_types"),
            (format!("{}{}", schedule(""), schedule("")), "\"s\" is used twice"),
            (trigger("params = 5"), "params must be a table"),
            (trigger("").replace("{{bot}}", "a b"), "neither a bot name nor a template"),
            (trigger("debounce_s = 9300000000000000000"), "over a week"),
            (format!("{}{}", trigger(""), trigger("")), "\"t\" is used twice"),
        ] {
            let e = ControlConfig::parse(&text).unwrap_err();
            assert!(e.contains(says), "{text}\n=> {e}");
        }
    }
}
