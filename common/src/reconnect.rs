//! One reconnect loop for every long-lived broker session (worker, recorder,
//! trigger listener): exponential backoff with jitter, reset after a session that
//! stayed healthy for a while, and a counter of reconnects.
//!
//! The delay rule is a pure [`BackoffTimer`] (tested without a clock); [`run`]
//! drives a session function with it until the session ends for shutdown.

use std::{future::Future, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Backoff settings of a reconnect loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// First delay after a session ends.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
    /// A session that lasted this long was healthy: the next delay starts from `base` again.
    pub healthy_after: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self { base: Duration::from_millis(250), max: Duration::from_secs(30), healthy_after: Duration::from_secs(30) }
    }
}

/// The delay before each reconnect: doubles from `base` to `max` while sessions
/// keep failing, back to `base` after a healthy one; up to half of it again as jitter,
/// so that many clients losing one broker do not come back in step.
#[derive(Debug, Clone)]
pub struct BackoffTimer {
    policy: ReconnectPolicy,
    next: Duration,
}

impl BackoffTimer {
    /// A timer at `policy.base`.
    pub fn new(policy: ReconnectPolicy) -> Self {
        Self { policy, next: policy.base }
    }

    /// The delay after a session that lasted `lasted`; `jitter` in `[0, 1)` picks the
    /// share of the jitter (half the delay at most) to add.
    pub fn delay(&mut self, lasted: Duration, jitter: f64) -> Duration {
        if lasted >= self.policy.healthy_after {
            self.next = self.policy.base;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        delay + delay.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }
}

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd<E> {
    /// Shutdown was asked for: stop.
    Shutdown,
    /// The session was lost or failed: reconnect after the backoff.
    Lost(E),
}

/// Runs `session` until it ends with [`SessionEnd::Shutdown`] or `shutdown` fires,
/// reconnecting after each lost session with the backoff of `policy`.
/// `on_lost` is called once per lost session (log it, count the reconnect).
pub async fn run<E, F, Fut>(policy: ReconnectPolicy, shutdown: &CancellationToken, mut session: F, mut on_lost: impl FnMut(&E, Duration))
where
    F: FnMut() -> Fut,
    Fut: Future<Output = SessionEnd<E>>,
{
    let mut timer = BackoffTimer::new(policy);
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        let err = match session().await {
            SessionEnd::Shutdown => return,
            SessionEnd::Lost(e) => e,
        };
        let delay = timer.delay(started.elapsed(), rand::random::<f64>());
        on_lost(&err, delay);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ReconnectPolicy =
        ReconnectPolicy { base: Duration::from_millis(100), max: Duration::from_millis(800), healthy_after: Duration::from_secs(10) };

    #[test]
    fn doubles_to_the_cap_and_resets_after_a_healthy_session() {
        let mut t = BackoffTimer::new(P);
        let quick = Duration::from_millis(5);
        let got: Vec<u128> = (0..6).map(|_| t.delay(quick, 0.0).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 800, 800]);
        // Healthy for 10 s: back to the base delay (the recorder used to stay at its cap for ever).
        assert_eq!(t.delay(Duration::from_secs(10), 0.0).as_millis(), 100);
        assert_eq!(t.delay(quick, 0.0).as_millis(), 200);
        // Jitter adds at most half.
        let mut t = BackoffTimer::new(P);
        assert_eq!(t.delay(quick, 0.999_999).as_millis(), 149);
    }

    #[tokio::test(start_paused = true)]
    async fn run_reconnects_with_backoff_and_stops_on_shutdown() {
        let shutdown = CancellationToken::new();
        let mut sessions = 0u32;
        let mut lost = Vec::new();
        let t0 = Instant::now();
        run(
            P,
            &shutdown,
            || {
                sessions += 1;
                let n = sessions;
                async move {
                    if n == 3 {
                        // A healthy session: lasts 20 s, then is lost.
                        tokio::time::sleep(Duration::from_secs(20)).await;
                    }
                    if n == 5 {
                        SessionEnd::Shutdown
                    } else {
                        SessionEnd::Lost(format!("lost {n}"))
                    }
                }
            },
            |e: &String, delay| lost.push((e.clone(), delay.as_millis() / 100)),
        )
        .await;
        assert_eq!(sessions, 5);
        // Delays (in 100 ms, jitter included): 1, 2, then reset after the healthy session: 1, 2.
        let shown: Vec<(String, u128)> = lost;
        assert_eq!(shown.iter().map(|(_, d)| *d).collect::<Vec<_>>(), [1, 2, 1, 2], "{shown:?}");
        assert!(t0.elapsed() >= Duration::from_secs(20));
    }
}
