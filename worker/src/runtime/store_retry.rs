//! The artifact-store operations of one delivery, retried while the store fails.
//!
//! A store outage is not a broker failure: the delivery that needs the store waits,
//! retrying with capped backoff and logging each retry with its job id, while the
//! session and every other job go on. (Ending the session instead would stop every job
//! on the connection and count one delivery against the delivery limit of each held
//! job per cycle, so a few minutes of S3 outage would dead-letter queued jobs as a
//! crash loop.) It gives up only when running jobs must stop (shutdown, lost session)
//! or when the next wait would reach the broker's consumer timeout; then this one
//! delivery goes back to the queue ([`CommonError::Artifacts`] reaches
//! [`process::handle`](super::process::handle), which requeues it).

use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trainyard_common::{
    reconnect::{BackoffTimer, ReconnectPolicy},
    CommonError,
};

/// First wait after a failed store operation, doubling to [`MAX_WAIT`] (plus up to half as jitter).
pub const FIRST_WAIT: Duration = Duration::from_millis(250);
/// Longest wait between two tries of one store operation.
pub const MAX_WAIT: Duration = Duration::from_secs(15);

/// Retries the store operations of one delivery.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoreRetry<'a> {
    job_id: &'a str,
    /// Past this, the broker may close the channel for an unacked delivery: give it back first.
    deadline: Instant,
    /// Fired when running jobs must stop.
    stop: &'a CancellationToken,
}

impl<'a> StoreRetry<'a> {
    /// Retries for the delivery of `job_id` received at `received`, on a broker whose
    /// consumer timeout is `consumer_timeout` (the last tenth of it is kept as a margin).
    pub(crate) fn new(job_id: &'a str, received: Instant, consumer_timeout: Duration, stop: &'a CancellationToken) -> Self {
        Self { job_id, deadline: received + consumer_timeout - consumer_timeout / 10, stop }
    }

    /// Runs `op` until it succeeds or fails with anything but an artifact-store error;
    /// an artifact-store error is retried after a wait, unless running jobs must stop
    /// or the wait would pass the deadline (then that error is returned). An error no wait
    /// can mend (the store does not implement or support the operation: a bucket without
    /// conditional writes, `AWS_CONDITIONAL_PUT=disabled`) is returned at once: each delivery
    /// held its slot retrying it for nine tenths of the consumer timeout.
    pub(crate) async fn run<T, F, Fut>(&self, what: &'static str, mut op: F) -> Result<T, CommonError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CommonError>>,
    {
        let policy = ReconnectPolicy { base: FIRST_WAIT, max: MAX_WAIT, healthy_after: Duration::MAX };
        let mut timer = BackoffTimer::new(policy);
        for retry in 1u32.. {
            let err = match op().await {
                Err(e @ CommonError::Artifacts { .. }) if !e.store_cannot_do() => e,
                done => return done,
            };
            let wait = timer.delay(Duration::ZERO, rand::random::<f64>());
            if self.stop.is_cancelled() || Instant::now() + wait >= self.deadline {
                tracing::warn!(job_id = %self.job_id, what, retries = retry - 1, error = %err, "artifact store still failing; giving up on this delivery");
                return Err(err);
            }
            tracing::warn!(
                job_id = %self.job_id,
                what,
                retry,
                wait_ms = wait.as_millis() as u64,
                error = %err,
                "artifact store failed; retrying for this delivery (the session and other jobs go on)"
            );
            tokio::select! {
                _ = self.stop.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        unreachable!("the retry counter does not overflow before the deadline")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn store_error() -> CommonError {
        CommonError::Artifacts {
            what: "stat",
            path: "outcomes/x".into(),
            source: object_store::Error::Generic { store: "test", source: "injected outage".into() },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_store_is_retried_with_capped_waits_until_it_works() {
        let stop = CancellationToken::new();
        let retry = StoreRetry::new("job-1", Instant::now(), Duration::from_secs(1800), &stop);
        let calls = AtomicU32::new(0);
        let t0 = Instant::now();
        let got = retry
            .run("stat", || async {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < 12 {
                    Err(store_error())
                } else {
                    Ok(n)
                }
            })
            .await;
        assert_eq!(got.unwrap(), 12);
        // 0.25 + 0.5 + … + 8 s, then 15 s each (with at most half again of jitter).
        let base: f64 = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0].iter().sum::<f64>() + 6.0 * 15.0;
        let waited = t0.elapsed().as_secs_f64();
        assert!(waited >= base && waited <= base * 1.5, "waited {waited} s");
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_are_not_retried_and_stop_or_the_deadline_gives_up() {
        let stop = CancellationToken::new();
        let retry = StoreRetry::new("job-1", Instant::now(), Duration::from_secs(1800), &stop);
        let calls = AtomicU32::new(0);
        let got: Result<(), _> = retry
            .run("read", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(CommonError::SessionLost { what: "the ack" })
            })
            .await;
        assert!(matches!(got, Err(CommonError::SessionLost { .. })) && calls.load(Ordering::SeqCst) == 1);

        // The consumer timeout of 100 s leaves 90 s: the delivery is given back before it.
        let t0 = Instant::now();
        let retry = StoreRetry::new("job-1", t0, Duration::from_secs(100), &stop);
        let got: Result<(), _> = retry.run("read", || async { Err(store_error()) }).await;
        assert!(matches!(got, Err(CommonError::Artifacts { .. })));
        assert!(t0.elapsed() < Duration::from_secs(90), "{:?}", t0.elapsed());
        assert!(t0.elapsed() > Duration::from_secs(30), "{:?}", t0.elapsed());

        // Shutdown (or a lost session) ends the wait at once.
        stop.cancel();
        let t0 = Instant::now();
        let retry = StoreRetry::new("job-1", t0, Duration::from_secs(1800), &stop);
        let got: Result<(), _> = retry.run("read", || async { Err(store_error()) }).await;
        assert!(matches!(got, Err(CommonError::Artifacts { .. })) && t0.elapsed() == Duration::ZERO);
    }

    fn failing(source: object_store::Error) -> CommonError {
        CommonError::Artifacts { what: "create", path: "outcomes/x".into(), source }
    }

    /// A store that cannot do the operation is not retried for most of the consumer timeout;
    /// one that fails for now is.
    #[tokio::test(start_paused = true)]
    async fn an_operation_the_store_cannot_do_is_not_retried() {
        let stop = CancellationToken::new();
        let retry = StoreRetry::new("j", Instant::now(), Duration::from_secs(60), &stop);
        let calls = AtomicU32::new(0);
        let unsupported = || object_store::Error::NotImplemented { operation: "put_opts(Create)".into(), implementer: "S3".into() };
        let e = retry
            .run("create", || async { Err::<(), _>(failing(unsupported())).inspect_err(|_| _ = calls.fetch_add(1, Ordering::SeqCst)) })
            .await;
        assert!(e.is_err());
        assert_eq!(calls.swap(0, Ordering::SeqCst), 1, "tried once");
        let generic = || object_store::Error::Generic { store: "S3", source: "503 Slow Down".into() };
        let e = retry
            .run("create", || async { Err::<(), _>(failing(generic())).inspect_err(|_| _ = calls.fetch_add(1, Ordering::SeqCst)) })
            .await;
        assert!(e.is_err());
        assert!(calls.load(Ordering::SeqCst) > 3, "an outage is retried until the deadline: {}", calls.load(Ordering::SeqCst));
    }
}
