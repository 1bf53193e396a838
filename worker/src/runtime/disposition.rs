//! What to do with a finished attempt: a pure function of the outcome and the
//! attempt, unit-tested in a table.

use trainyard_common::ErrorKind;

/// Delays of delayed retries: `base * 2^(attempt-1)`, capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay in milliseconds.
    pub base_ms: u64,
    /// Longest delay in milliseconds.
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base_ms: 5_000, max_ms: 600_000 }
    }
}

impl Backoff {
    /// The delay before attempt `attempt + 1`, after attempt `attempt` failed.
    /// Always one of a few fixed values, so few retry queues exist.
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let exp = attempt.saturating_sub(1).min(30);
        self.base_ms.saturating_mul(1u64 << exp).min(self.max_ms).max(1)
    }
}

/// The decision for a failed (or cancelled) attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Publish a copy with attempt + 1 to the retry queue of `delay_ms`, then ack.
    Retry {
        /// The delay.
        delay_ms: u64,
        /// The next attempt number.
        next_attempt: u32,
    },
    /// Attempts used up: dead-letter with status `failed`, then ack.
    Failed,
    /// Dead-letter at once with status `dead`, then ack.
    Dead,
    /// Record `cancelled` and ack; never retried.
    Cancelled,
}

/// Decides what happens after attempt `attempt` (1-based) of `max_attempts` failed with `kind`.
pub fn decide(kind: ErrorKind, attempt: u32, max_attempts: u32, backoff: &Backoff) -> Disposition {
    match kind {
        // A kind this build does not know cannot come from its own handlers; treat it as permanent.
        ErrorKind::Permanent | ErrorKind::Unknown => Disposition::Dead,
        ErrorKind::Cancelled => Disposition::Cancelled,
        ErrorKind::Transient | ErrorKind::Timeout if attempt < max_attempts => {
            Disposition::Retry { delay_ms: backoff.delay_ms(attempt), next_attempt: attempt + 1 }
        }
        ErrorKind::Transient | ErrorKind::Timeout => Disposition::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Disposition::{Dead, Failed, Retry};
    use ErrorKind::{Permanent, Timeout, Transient};

    #[test]
    fn decision_table() {
        let b = Backoff { base_ms: 1000, max_ms: 5000 };
        let table = [
            // kind, attempt, max, expected
            (Transient, 1, 3, Retry { delay_ms: 1000, next_attempt: 2 }),
            (Transient, 2, 3, Retry { delay_ms: 2000, next_attempt: 3 }),
            (Transient, 3, 3, Failed),
            (Transient, 7, 3, Failed),
            (Timeout, 1, 2, Retry { delay_ms: 1000, next_attempt: 2 }),
            (Timeout, 2, 2, Failed),
            (Transient, 4, 9, Retry { delay_ms: 5000, next_attempt: 5 }),
            (Permanent, 1, 3, Dead),
            (Permanent, 3, 3, Dead),
            (ErrorKind::Cancelled, 1, 3, Disposition::Cancelled),
            (ErrorKind::Unknown, 1, 3, Dead),
            (ErrorKind::Cancelled, 3, 3, Disposition::Cancelled),
            (Transient, 1, 1, Failed),
        ];
        for (kind, attempt, max, want) in table {
            assert_eq!(decide(kind, attempt, max, &b), want, "{kind:?} attempt {attempt}/{max}");
        }
    }

    #[test]
    fn backoff_is_capped_and_never_zero() {
        let b = Backoff { base_ms: 0, max_ms: 10 };
        assert_eq!(b.delay_ms(1), 1);
        let b = Backoff::default();
        assert_eq!(b.delay_ms(1), 5_000);
        assert_eq!(b.delay_ms(100), 600_000);
    }
}
