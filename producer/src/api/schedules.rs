//! `GET /v1/schedules` and `GET /v1/triggers`: the schedules and trigger rules this control plane
//! runs (from its configuration), each with what the job store knows of its recent fires.
//!
//! - A schedule's fires come from `schedule_fires` (the exact fire time and the claimed job id,
//!   the same table the scheduler reads to apply missed fires); a store without them (rebuilt
//!   from the events stream, which does not carry claims) falls back on the jobs recorded with
//!   the schedule as trigger, at their submission time. Its next fire is computed from the cron
//!   expression in its time zone.
//! - A trigger rule's last matches are the jobs recorded with the rule as trigger source
//!   (`<routing key> (<name>)`), newest first: they survive restarts and `store rebuild`.
//!
//! The console reloads them when the stream reports a job with a schedule or event trigger.

use axum::{extract::State, Json};
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{ApiError, ApiState};
use crate::{config::MissedFire, scheduler, triggers};

/// How many recent fires or matches are listed.
pub const RECENT: i64 = 5;

/// One fire of a schedule, or one match of a trigger rule.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Fire {
    /// The fire time (a match: the job's submission time).
    pub at: DateTime<Utc>,
    /// The job it submitted.
    pub job_id: String,
    /// That job's status, once recorded.
    pub status: Option<String>,
}

/// A schedule and its fires.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ScheduleView {
    /// Its name (the trigger source of its jobs).
    pub name: String,
    /// Cron expression.
    pub cron: String,
    /// Time zone of the expression.
    pub timezone: String,
    /// Job type and bot of its jobs.
    pub job_type: String,
    /// Bot of its jobs.
    pub bot: String,
    /// `skip` or `fire_once`.
    pub missed: &'static str,
    /// Its next fire after now.
    pub next_fire: Option<DateTime<Utc>>,
    /// Its latest fire, when any.
    pub last_fire: Option<Fire>,
    /// Its [`RECENT`] latest fires, newest first.
    pub fires: Vec<Fire>,
}

/// A trigger rule and its last matches.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TriggerView {
    /// Its name.
    pub name: String,
    /// Topic pattern on the triggers exchange.
    pub routing_key: String,
    /// Job type of its jobs.
    pub job_type: String,
    /// Bot template.
    pub bot: String,
    /// Debounce window per bot, seconds.
    pub debounce_s: u64,
    /// Its latest match, when any.
    pub last_match: Option<Fire>,
    /// Its [`RECENT`] latest matches (the jobs it submitted), newest first.
    pub matches: Vec<Fire>,
}

fn fires(rows: Vec<(DateTime<Utc>, String, Option<String>)>) -> Vec<Fire> {
    rows.into_iter().map(|(at, job_id, status)| Fire { at, job_id, status }).collect()
}

/// `GET /v1/schedules`.
#[utoipa::path(get, path = "/schedules", tag = "ops", security(("bearer" = [])),
    responses((status = 200, description = "the schedules and their fires", body = Vec<ScheduleView>),
        super::errors::AuthResponses, super::errors::UnavailableResponses))]
pub async fn schedules(State(s): State<ApiState>) -> Result<Json<Vec<ScheduleView>>, ApiError> {
    let store = &s.ops.store;
    let now = Utc::now();
    let mut out = Vec::new();
    for cfg in &s.control.schedules {
        let mut recent = store.recent_schedule_fires(&cfg.name, RECENT).await.map_err(crate::ops::OpsError::from)?;
        if recent.is_empty() {
            recent = store.triggered_jobs("schedule", &cfg.name, RECENT).await.map_err(crate::ops::OpsError::from)?;
        }
        let fires = fires(recent);
        out.push(ScheduleView {
            name: cfg.name.clone(),
            cron: cfg.cron.clone(),
            timezone: cfg.timezone.clone(),
            job_type: cfg.job_type.clone(),
            bot: cfg.bot.clone(),
            missed: match cfg.missed {
                MissedFire::Skip => "skip",
                MissedFire::FireOnce => "fire_once",
            },
            next_fire: scheduler::next_fire(cfg, now),
            last_fire: fires.first().cloned(),
            fires,
        });
    }
    Ok(Json(out))
}

/// `GET /v1/triggers`.
#[utoipa::path(get, path = "/triggers", tag = "ops", security(("bearer" = [])),
    responses((status = 200, description = "the trigger rules and their matches", body = Vec<TriggerView>),
        super::errors::AuthResponses, super::errors::UnavailableResponses))]
pub async fn triggers(State(s): State<ApiState>) -> Result<Json<Vec<TriggerView>>, ApiError> {
    let mut out = Vec::new();
    for rule in &s.control.triggers {
        let rows = s.ops.store.triggered_jobs("event", &triggers::source(rule), RECENT).await.map_err(crate::ops::OpsError::from)?;
        let matches = fires(rows);
        out.push(TriggerView {
            name: rule.name.clone(),
            routing_key: rule.routing_key.clone(),
            job_type: rule.job_type.clone(),
            bot: rule.bot.clone(),
            debounce_s: rule.debounce_s,
            last_match: matches.first().cloned(),
            matches,
        });
    }
    Ok(Json(out))
}
