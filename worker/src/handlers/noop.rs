//! `noop`: sleeps `sleep_ms` (default 0) and succeeds. Used by tests,
//! benchmarks and chaos runs. With `log_every_ms`, it logs a line that often while it
//! sleeps (the console's live log). `fail` makes it fail on purpose:
//! `"transient"` (until attempt `fail_until`, default forever), `"permanent"`;
//! with `fail_until_run`, only in runs before it (a dead letter replayed after the
//! fault is gone).

use async_trait::async_trait;
use serde::Deserialize;

use crate::handler::{JobContext, JobError, JobHandler};

/// The `noop` job type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    sleep_ms: u64,
    /// Log a line this often while sleeping.
    #[serde(default)]
    log_every_ms: Option<u64>,
    #[serde(default)]
    fail: Option<Fail>,
    /// With `fail = "transient"`: succeed from this attempt on.
    #[serde(default)]
    fail_until: Option<u32>,
    /// With `fail`: succeed from this run (dead-letter replay) on.
    #[serde(default)]
    fail_until_run: Option<u32>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Fail {
    Transient,
    Permanent,
}

/// Longest allowed sleep (1 hour).
const MAX_SLEEP_MS: u64 = 3_600_000;

fn parse(params: &serde_json::Value) -> Result<Params, JobError> {
    let p: Params = serde_json::from_value(params.clone()).map_err(|e| JobError::permanent(format!("invalid noop params: {e}")))?;
    if p.sleep_ms > MAX_SLEEP_MS {
        return Err(JobError::permanent(format!("invalid noop params: sleep_ms {} is over {MAX_SLEEP_MS}", p.sleep_ms)));
    }
    if p.log_every_ms.is_some_and(|ms| ms < 100) {
        return Err(JobError::permanent("invalid noop params: log_every_ms must be at least 100 (a line a millisecond flooded the log)"));
    }
    Ok(p)
}

/// Sleeps `ms`, logging a line every `log_every_ms`; an error when cancelled.
async fn sleep(ctx: &JobContext, ms: u64, log_every_ms: Option<u64>) -> Result<(), JobError> {
    let mut left = ms;
    let mut lines = 0u64;
    while left > 0 {
        let step = log_every_ms.unwrap_or(left).min(left);
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(step)) => {}
            _ = ctx.cancel.cancelled() => return Err(JobError::cancelled("noop stopped while sleeping")),
        }
        left -= step;
        if log_every_ms.is_some() && left > 0 {
            lines += 1;
            tracing::info!(line = lines, left_ms = left, "noop still sleeping");
        }
    }
    Ok(())
}

#[async_trait]
impl JobHandler for Noop {
    fn validate(&self, params: &serde_json::Value) -> Result<(), JobError> {
        parse(params).map(|_| ())
    }

    async fn run(&self, ctx: JobContext) -> Result<serde_json::Value, JobError> {
        let p = parse(&ctx.spec.params)?;
        sleep(&ctx, p.sleep_ms, p.log_every_ms).await?;
        let fail = p.fail.filter(|_| p.fail_until_run.is_none_or(|until| ctx.run < until));
        match fail {
            Some(Fail::Permanent) => Err(JobError::permanent("noop failed on purpose (permanent)")),
            Some(Fail::Transient) if p.fail_until.is_none_or(|until| ctx.attempt < until) => {
                Err(JobError::transient(format!("noop failed on purpose (transient, attempt {})", ctx.attempt)))
            }
            _ => Ok(serde_json::json!({"slept_ms": p.sleep_ms, "attempt": ctx.attempt})),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse;
    use serde_json::json;

    #[test]
    fn noop_params_are_bounded() {
        assert!(parse(&json!({"sleep_ms": 10, "log_every_ms": 100})).is_ok());
        for (bad, says) in [
            (json!({"sleep_ms": 3_600_001}), "is over 3600000"),
            (json!({"sleep_ms": 1000, "log_every_ms": 1}), "at least 100"),
            (json!({"colour": 1}), "unknown field"),
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(e.message.contains(says), "{bad}: {}", e.message);
        }
    }
}
