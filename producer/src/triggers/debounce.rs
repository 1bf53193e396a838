//! Trailing per-key debounce of trigger events, with the clock passed in.

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;

/// A burst of events (`E`) for one (rule, bot), waiting for its window to close.
#[derive(Debug)]
pub struct Pending<T, E> {
    /// When the window closes.
    pub deadline: Instant,
    /// The latest event.
    pub event: E,
    /// What to settle when the job is out (delivery ackers).
    pub held: Vec<T>,
    /// Events in the burst.
    pub count: usize,
}

/// Trailing per-key debounce, with the clock passed in.
#[derive(Debug)]
pub struct Debouncer<T, E> {
    pending: HashMap<(String, String), Pending<T, E>>,
}

impl<T, E> Default for Debouncer<T, E> {
    fn default() -> Self {
        Self { pending: HashMap::new() }
    }
}

impl<T, E> Debouncer<T, E> {
    /// Adds an event; returns `true` when it opened a new window.
    pub fn offer(&mut self, key: (String, String), event: E, held: T, now: Instant, window: Duration) -> bool {
        match self.pending.get_mut(&key) {
            Some(p) => {
                p.event = event;
                p.held.push(held);
                p.count += 1;
                false
            }
            None => {
                self.pending.insert(key, Pending { deadline: now + window, event, held: vec![held], count: 1 });
                true
            }
        }
    }

    /// Takes the bursts whose window has closed at `now`.
    pub fn due(&mut self, now: Instant) -> Vec<((String, String), Pending<T, E>)> {
        let keys: Vec<_> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(k, _)| k.clone()).collect();
        keys.into_iter().filter_map(|k| self.pending.remove(&k).map(|p| (k, p))).collect()
    }

    /// The next deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test(start_paused = true)]
    async fn a_burst_yields_one_fire_with_the_latest_event() {
        let mut d: Debouncer<u32, serde_json::Value> = Debouncer::default();
        let w = Duration::from_secs(300);
        let key = ("r".to_string(), "banking".to_string());
        assert!(d.offer(key.clone(), json!({"v": 1}), 1, Instant::now(), w));
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(!d.offer(key.clone(), json!({"v": 2}), 2, Instant::now(), w));
        assert!(d.offer(("r".into(), "other".into()), json!({"v": 9}), 9, Instant::now(), w));
        assert!(d.due(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(200)).await;
        let due = d.due(Instant::now());
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].1.event, json!({"v": 2}));
        assert_eq!(due[0].1.held, vec![1, 2]);
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(d.due(Instant::now()).len(), 1);
        assert!(d.next_deadline().is_none());
    }
}
