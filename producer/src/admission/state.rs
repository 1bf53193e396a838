//! What the admitter holds and which job it admits next: no I/O, so every rule is a unit test.
//!
//! Jobs wait per tier (high, normal, low) and per bot, in arrival order. The next job is from
//! the highest tier that has a job of a bot under its limit; within the tier, with fair share,
//! from the bot with the fewest admitted jobs per weight (ties: the oldest waiting job), else
//! the oldest waiting job. With fair share, nothing is admitted while the admitted jobs of all
//! bots fill the window (the workers' slots plus a few ahead).

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;
use trainyard_common::job::Priority;

use crate::config::JobTypePolicy;

/// A job waiting for admission; `payload` is what releasing it needs (the delivery).
#[derive(Debug)]
pub struct Held<T> {
    /// The job.
    pub job_id: String,
    /// Its bot.
    pub bot: String,
    /// Its tier.
    pub priority: Priority,
    /// Its coalescing key.
    pub coalesce_key: Option<String>,
    /// Whatever the caller needs to release it.
    pub payload: T,
    arrival: u64,
}

/// One bot's usage of a job type, as the API and `jobs list --bot` show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BotUsage {
    /// Admitted and not finished.
    pub running: u64,
    /// Waiting for admission.
    pub waiting: u64,
    /// `max_running_per_bot`, if any.
    pub limit: Option<u32>,
    /// Its fair-share weight.
    pub weight: u32,
    /// Its share of the slots now: weight / total weight of the bots with jobs.
    pub share: f64,
}

/// The admitter's state for one job type.
#[derive(Debug)]
pub struct Admission<T> {
    policy: JobTypePolicy,
    /// Per tier (index in [`Priority::ALL`]), per bot, in arrival order.
    waiting: [BTreeMap<String, VecDeque<Held<T>>>; 3],
    /// Admitted and not finished: job id → bot.
    admitted: HashMap<String, String>,
    per_bot: HashMap<String, u64>,
    arrivals: u64,
}

fn tier(p: Priority) -> usize {
    Priority::ALL.iter().position(|x| *x == p).unwrap_or(1)
}

impl<T> Admission<T> {
    /// Empty, under `policy`.
    pub fn new(policy: JobTypePolicy) -> Self {
        Self { policy, waiting: Default::default(), admitted: HashMap::new(), per_bot: HashMap::new(), arrivals: 0 }
    }

    /// A bot's weight (default 1).
    pub fn weight(&self, bot: &str) -> u32 {
        self.policy.weights.get(bot).copied().unwrap_or(1).max(1)
    }

    /// Holds a job until [`Self::next`] admits it. A copy of a job counted as admitted (its
    /// admission was not acknowledged before a crash, or it was published again with its id)
    /// waits and leaves the job counted: the job may be running, and freeing its place let the
    /// bot's next job, then the copy itself, run beside it. Admitted once the job has finished,
    /// the copy ends at once on a worker (its outcome is recorded).
    pub fn hold(&mut self, job_id: String, bot: String, priority: Priority, coalesce_key: Option<String>, payload: T) {
        self.arrivals += 1;
        let held = Held { job_id, bot: bot.clone(), priority, coalesce_key, payload, arrival: self.arrivals };
        self.waiting[tier(priority)].entry(bot).or_default().push_back(held);
    }

    /// Counts `job_id` of `bot` as admitted (running on a worker, or in its queue).
    pub fn admitted(&mut self, job_id: &str, bot: &str) {
        if self.admitted.insert(job_id.to_string(), bot.to_string()).is_none() {
            *self.per_bot.entry(bot.to_string()).or_default() += 1;
        }
    }

    /// A job ended (or will never run): its bot may have another one.
    pub fn finished(&mut self, job_id: &str) {
        if let Some(bot) = self.admitted.remove(job_id) {
            if let Some(n) = self.per_bot.get_mut(&bot) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_bot.remove(&bot);
                }
            }
        }
    }

    /// The ids of the admitted jobs.
    pub fn admitted_ids(&self) -> Vec<String> {
        self.admitted.keys().cloned().collect()
    }

    /// Admitted jobs of `bot`.
    pub fn running(&self, bot: &str) -> u64 {
        self.per_bot.get(bot).copied().unwrap_or(0)
    }

    /// Admitted jobs of all bots.
    pub fn running_total(&self) -> u64 {
        self.admitted.len() as u64
    }

    /// Jobs waiting.
    pub fn waiting_total(&self) -> u64 {
        self.waiting.iter().flat_map(|t| t.values()).map(|q| q.len() as u64).sum()
    }

    fn under_limit(&self, bot: &str) -> bool {
        self.policy.max_running_per_bot.is_none_or(|limit| self.running(bot) < u64::from(limit))
    }

    /// `a` goes before `b`: fewer admitted per weight (`ra / wa < rb / wb`), then older.
    fn before(&self, a: &Held<T>, b: &Held<T>) -> bool {
        if self.policy.fair_share {
            let (ra, rb) = (self.running(&a.bot) * u64::from(self.weight(&b.bot)), self.running(&b.bot) * u64::from(self.weight(&a.bot)));
            if ra != rb {
                return ra < rb;
            }
        }
        a.arrival < b.arrival
    }

    /// Takes the next job to admit and counts it as admitted; `None` when none may go now.
    /// `window`: with fair share, how many jobs may be admitted and unfinished in all.
    pub fn next(&mut self, window: u64) -> Option<Held<T>> {
        if self.policy.fair_share && self.running_total() >= window {
            return None;
        }
        let (t, bot) = self.waiting.iter().enumerate().find_map(|(t, bots)| {
            let best =
                bots.values().filter_map(|q| q.front()).filter(|h| self.under_limit(&h.bot)).fold(None::<&Held<T>>, |best, h| match best {
                    Some(b) if !self.before(h, b) => Some(b),
                    _ => Some(h),
                });
            best.map(|h| (t, h.bot.clone()))
        })?;
        let queue = self.waiting[t].get_mut(&bot)?;
        let held = queue.pop_front()?;
        if queue.is_empty() {
            self.waiting[t].remove(&bot);
        }
        self.admitted(&held.job_id, &held.bot);
        Some(held)
    }

    /// Waiting jobs that share a coalescing key with a newer waiting job (latest wins will
    /// supersede them): their ids.
    pub fn outdated(&self) -> Vec<String> {
        let mut newest: HashMap<&str, u64> = HashMap::new();
        let all = || self.waiting.iter().flat_map(|t| t.values()).flatten();
        for h in all() {
            if let Some(k) = h.coalesce_key.as_deref() {
                let n = newest.entry(k).or_default();
                *n = (*n).max(h.arrival);
            }
        }
        all().filter(|h| h.coalesce_key.as_deref().is_some_and(|k| newest[k] > h.arrival)).map(|h| h.job_id.clone()).collect()
    }

    /// Waiting jobs that could be admitted now, bots' limits allowed: for each bot, its waiting
    /// jobs that latest wins will not supersede, at most as many as its limit leaves free. The
    /// autoscaling demand counts these, not every waiting job: a backlog of a bot at its limit
    /// would only bring workers that sit idle. (Fair share's window is left out: it follows the
    /// slots there are, and more workers widen it.)
    pub fn runnable(&self) -> u64 {
        let outdated: std::collections::HashSet<String> = self.outdated().into_iter().collect();
        let mut per_bot: HashMap<&str, u64> = HashMap::new();
        for (bot, q) in self.waiting.iter().flat_map(|t| t.iter()) {
            *per_bot.entry(bot).or_default() += q.iter().filter(|h| !outdated.contains(&h.job_id)).count() as u64;
        }
        let free = |bot: &str| self.policy.max_running_per_bot.map_or(u64::MAX, |l| u64::from(l).saturating_sub(self.running(bot)));
        per_bot.into_iter().map(|(bot, n)| n.min(free(bot))).sum()
    }

    /// Takes a waiting job out without counting it as admitted (it will never run).
    pub fn take(&mut self, job_id: &str) -> Option<Held<T>> {
        for bots in &mut self.waiting {
            for (bot, q) in bots.iter_mut() {
                if let Some(i) = q.iter().position(|h| h.job_id == job_id) {
                    let held = q.remove(i);
                    if q.is_empty() {
                        let bot = bot.clone();
                        bots.remove(&bot);
                    }
                    return held;
                }
            }
        }
        None
    }

    /// Every bot's usage (bots with jobs admitted or waiting).
    pub fn usage(&self) -> BTreeMap<String, BotUsage> {
        let mut out: BTreeMap<String, BotUsage> = BTreeMap::new();
        for (bot, n) in &self.per_bot {
            out.entry(bot.clone()).or_default().running = *n;
        }
        for (bot, q) in self.waiting.iter().flat_map(|t| t.iter()) {
            out.entry(bot.clone()).or_default().waiting += q.len() as u64;
        }
        let total: u64 = out.keys().map(|b| u64::from(self.weight(b))).sum();
        for (bot, u) in &mut out {
            u.limit = self.policy.max_running_per_bot;
            u.weight = self.weight(bot);
            u.share = if total == 0 { 0.0 } else { f64::from(u.weight) / total as f64 };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(fair_share: bool, limit: Option<u32>) -> JobTypePolicy {
        JobTypePolicy { fair_share, max_running_per_bot: limit, ..Default::default() }
    }

    fn hold(a: &mut Admission<()>, id: &str, bot: &str, p: Priority) {
        a.hold(id.into(), bot.into(), p, None, ());
    }

    fn order(a: &mut Admission<()>, window: u64) -> Vec<String> {
        std::iter::from_fn(|| a.next(window).map(|h| h.job_id)).collect()
    }

    #[test]
    fn fair_share_takes_the_bot_with_the_fewest_admitted_first() {
        let mut a = Admission::new(policy(true, None));
        for i in 0..5 {
            hold(&mut a, &format!("a{i}"), "a", Priority::Normal);
        }
        hold(&mut a, "b0", "b", Priority::Normal);
        hold(&mut a, "c0", "c", Priority::Normal);
        assert_eq!(order(&mut a, 3), ["a0", "b0", "c0"], "one each before a second of a's");
        assert_eq!(a.next(3).map(|h| h.job_id), None, "the window is full");
        a.finished("b0");
        assert_eq!(order(&mut a, 3), ["a1"]);
        assert_eq!((a.running("a"), a.running_total(), a.waiting_total()), (2, 3, 3));
    }

    #[test]
    fn weights_share_the_window() {
        let mut a = Admission::new(JobTypePolicy { fair_share: true, weights: [("big".to_string(), 3)].into(), ..Default::default() });
        for i in 0..10 {
            hold(&mut a, &format!("s{i}"), "small", Priority::Normal);
            hold(&mut a, &format!("b{i}"), "big", Priority::Normal);
        }
        let got = order(&mut a, 8);
        assert_eq!(got.iter().filter(|id| id.starts_with('b')).count(), 6, "{got:?}");
        let u = a.usage();
        assert_eq!((u["big"].weight, u["big"].share, u["small"].share), (3, 0.75, 0.25));
    }

    #[test]
    fn a_higher_tier_goes_first_unless_its_bot_is_at_its_limit() {
        let mut a = Admission::new(policy(false, Some(1)));
        hold(&mut a, "low", "x", Priority::Low);
        hold(&mut a, "n1", "y", Priority::Normal);
        hold(&mut a, "n2", "y", Priority::Normal);
        hold(&mut a, "high", "y", Priority::High);
        assert_eq!(order(&mut a, 0), ["high", "low"], "y at its limit of 1, so x's low job goes");
        a.finished("high");
        assert_eq!(order(&mut a, 0), ["n1"]);
        let u = a.usage();
        assert_eq!((u["y"].running, u["y"].waiting, u["y"].limit), (1, 1, Some(1)));
    }

    #[test]
    fn without_fair_share_admission_is_fifo_and_not_windowed() {
        let mut a = Admission::new(policy(false, Some(2)));
        for i in 0..3 {
            hold(&mut a, &format!("a{i}"), "a", Priority::Normal);
        }
        hold(&mut a, "b0", "b", Priority::Normal);
        assert_eq!(order(&mut a, 0), ["a0", "a1", "b0"]);
    }

    #[test]
    fn a_job_that_comes_back_waits_again_and_outdated_keyed_jobs_are_found() {
        let mut a = Admission::new(policy(true, Some(1)));
        hold(&mut a, "j", "a", Priority::Normal);
        assert_eq!(order(&mut a, 9), ["j"]);
        hold(&mut a, "k", "a", Priority::Normal);
        hold(&mut a, "j", "a", Priority::Normal);
        // A copy of a counted job (redelivered after a crash, or published again with its id):
        // the job may be running, so it keeps its place, and neither the bot's next job nor the
        // copy goes before it ends (the place was freed: k, then the copy, ran beside j).
        assert_eq!((a.running("a"), a.waiting_total()), (1, 2));
        assert_eq!(order(&mut a, 9), Vec::<String>::new(), "a at its limit of 1 while j runs");
        a.finished("j");
        assert_eq!(order(&mut a, 9), ["k"]);
        a.hold("k1".into(), "a".into(), Priority::Normal, Some("key".into()), ());
        a.hold("k2".into(), "a".into(), Priority::Normal, Some("key".into()), ());
        assert_eq!(a.outdated(), ["k1"]);
        assert_eq!(a.take("k1").map(|h| h.job_id), Some("k1".into()));
        assert_eq!((a.running("a"), a.waiting_total()), (1, 2));
    }

    #[test]
    fn only_jobs_their_bots_limits_let_run_are_runnable() {
        let mut a = Admission::new(policy(true, Some(2)));
        for i in 0..6 {
            hold(&mut a, &format!("a{i}"), "a", Priority::Normal);
        }
        hold(&mut a, "b0", "b", Priority::High);
        assert_eq!(a.runnable(), 3, "a: 2 of its 6 (limit 2), b: its one");
        assert_eq!(order(&mut a, 1), ["b0"]);
        assert_eq!(a.runnable(), 2, "b0 admitted: a's 2 are left");
        assert_eq!(order(&mut a, 9), ["a0", "a1"]);
        assert_eq!((a.runnable(), a.waiting_total()), (0, 4), "a at its limit: 4 wait, none can run");
        a.finished("a0");
        assert_eq!(a.runnable(), 1);
        a.hold("k1".into(), "c".into(), Priority::Normal, Some("key".into()), ());
        a.hold("k2".into(), "c".into(), Priority::Normal, Some("key".into()), ());
        assert_eq!(a.runnable(), 2, "c's k1 will be superseded by k2");
        let mut unlimited = Admission::new(policy(false, None));
        for i in 0..5 {
            hold(&mut unlimited, &format!("u{i}"), "u", Priority::Low);
        }
        assert_eq!(unlimited.runnable(), 5, "without a limit every waiting job can run");
    }
}
