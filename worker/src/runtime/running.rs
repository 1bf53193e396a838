//! A job's handler while it runs: its progress events forwarded as they come, and its
//! timeout.

use std::{sync::Arc, time::Duration};

use futures::FutureExt;

use tokio_util::sync::CancellationToken;
use trainyard_common::JobEvent;

use super::{session::SessionCtx, Shared};
use crate::handler::{JobContext, JobError, JobHandler};

/// How long a stopped job may take to unwind after its token fired, at most.
const UNWIND: Duration = Duration::from_secs(30);

/// How long a timed-out job may take to unwind under `consumer_timeout`: [`UNWIND`], or half the
/// [`super::process::margin`] kept for ending a job when that is shorter (a consumer timeout
/// under 600 s), so that the unwinding, the last progress events and the ack stay inside the
/// margin (a 30-s wait under a 60-s consumer timeout, whose margin is 6 s, went past it: the
/// broker closed the channel, and every job of the type on it went back to its queue).
pub(super) fn unwind(consumer_timeout: Duration) -> Duration {
    UNWIND.min(super::process::margin(consumer_timeout) / 2)
}

/// How long a finished job's last progress events may take to go out, at most: 5 s, or an
/// eighth of the margin when that is shorter.
pub(super) fn progress_wait(consumer_timeout: Duration) -> Duration {
    Duration::from_secs(5).min(super::process::margin(consumer_timeout) / 8)
}

/// Publishes each progress report of `reports` as a copy of `base` (a `progress` event),
/// in order, with seq numbers from a block reserved after `started`; stops at the first
/// publish that fails (the session is lost then).
pub(super) fn forward_progress(
    shared: Arc<Shared>,
    sctx: SessionCtx,
    base: JobEvent,
    mut reports: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let first_seq = base.seq;
        let mut i = 0u64;
        while let Some(p) = reports.recv().await {
            observe_epoch(&shared, &p);
            let mut ev = base.clone();
            ev.seq = first_seq + i;
            ev.at = chrono::Utc::now();
            ev.progress = Some(p);
            i += 1;
            if super::process::publish_event(&sctx, &shared, &ev).await.is_err() {
                return;
            }
        }
    })
}

/// Runs the handler until it returns or `timeout_s` passes; then fires `token` and gives
/// it `unwind` ([`unwind`]) to stop. The result, and whether it timed out. A handler that panics has
/// failed permanently ([`JobError::panicked`]): its job ends like any other, acked.
pub(super) async fn run_with_timeout(
    handler: &dyn JobHandler,
    ctx: JobContext,
    token: &CancellationToken,
    timeout_s: u64,
    unwind: Duration,
) -> (Result<serde_json::Value, JobError>, bool) {
    let run = std::panic::AssertUnwindSafe(handler.run(ctx)).catch_unwind().map(|r| r.unwrap_or_else(|p| Err(JobError::panicked(&*p))));
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => (r, false),
        _ = tokio::time::sleep(Duration::from_secs(timeout_s)) => {
            token.cancel();
            let _ = tokio::time::timeout(unwind, &mut run).await;
            (Err(JobError::timeout(format!("attempt ran past its timeout of {timeout_s}s"))), true)
        }
    }
}

/// A progress report with `epoch_seconds` and `device` (a training epoch) feeds the epoch histogram.
fn observe_epoch(shared: &Shared, p: &serde_json::Value) {
    if let (Some(secs), Some(device)) =
        (p.get("epoch_seconds").and_then(serde_json::Value::as_f64), p.get("device").and_then(serde_json::Value::as_str))
    {
        shared.metrics.epoch_seconds.with_label_values(&[device]).observe(secs);
    }
}
