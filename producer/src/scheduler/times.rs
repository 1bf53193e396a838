//! When a cron schedule fires, in its time zone, across daylight-saving changes.
//!
//! The `cron` crate walks local times and, at a change, fires an hour that comes twice at both
//! of its instants and never fires an hour that does not exist. That is right for an interval
//! (a minute, hour or second field that begins with `*`: `*/15 * * * *`, `0 * * * *`), which
//! goes on by elapsed time. A fixed time of day (`0 2 * * *`) is walked on the wall clock
//! instead (its local times, taken as if they were UTC, where no hour repeats or goes missing),
//! and each wall time becomes one instant, as Vixie cron tells the two apart: a time that comes
//! twice fires at its first instant only, and a time the clock skips fires when the skip ends
//! (times of one skipped hour fire once, there: one instant is one fire id).

use chrono::{DateTime, LocalResult, NaiveDateTime, Offset, TimeDelta, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// A fire older than this at tick time counts as missed.
pub const GRACE: TimeDelta = TimeDelta::seconds(60);

/// How far past a time the backward search for the latest fire before it starts: wall times
/// up to this much later can be instants before it (an hour that comes twice).
const REPEAT_MARGIN: TimeDelta = TimeDelta::hours(3);

/// The fires of a schedule a tick looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Due {
    /// The fires in `(from, now]` within [`GRACE`] of `now`, oldest first.
    pub on_time: Vec<DateTime<Utc>>,
    /// The latest fire in `(from, now - GRACE)`: missed.
    pub latest_missed: Option<DateTime<Utc>>,
}

/// The fires of `cron` in `tz` after `from` up to `now`: the ones on time, and the latest
/// missed one (found by walking back from `now`, so a long downtime costs no more than a
/// short one, and the fire found is the latest, whatever the number of fires missed).
pub fn due(cron: &cron::Schedule, tz: Tz, from: DateTime<Utc>, now: DateTime<Utc>) -> Due {
    let cutoff = now - GRACE;
    let start = from.max(cutoff - TimeDelta::seconds(1));
    let mut on_time: Vec<DateTime<Utc>> = after(cron, tz, start).take_while(|t| *t <= now).filter(|t| *t > from && *t >= cutoff).collect();
    on_time.dedup();
    if from >= cutoff {
        // Ticking along: nothing between the last tick and the grace window.
        return Due { on_time, latest_missed: None };
    }
    let latest_missed = before(cron, tz, cutoff + REPEAT_MARGIN).find(|t| *t < cutoff || *t <= from).filter(|t| *t > from && *t < cutoff);
    Due { on_time, latest_missed }
}

/// Whether `cron` is a fixed time of day, walked on the wall clock: none of its second, minute
/// and hour fields begins with `*` (Vixie cron's rule, with the seconds field this crate has).
fn fixed_time(cron: &cron::Schedule) -> bool {
    !cron.source().split_whitespace().take(3).any(|field| field.starts_with('*'))
}

/// The fire instants of `cron` in `tz` after `from`, in order (a fire of a skipped hour may
/// repeat the instant before it).
pub fn after(cron: &cron::Schedule, tz: Tz, from: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
    // Near a change of offset, a wall time before `from`'s can fire after it (an hour that
    // comes twice): start the margin earlier then.
    let offset = |t: DateTime<Utc>| tz.offset_from_utc_datetime(&t.naive_utc()).fix();
    let changes = offset(from - REPEAT_MARGIN) != offset(from) || offset(from + REPEAT_MARGIN) != offset(from);
    let walls = cron.after(&wall(if changes { from - REPEAT_MARGIN } else { from }, tz));
    InOrder::new(Box::new(walls), tz, fixed_time(cron), true).skip_while(move |t| *t <= from)
}

/// The fire instants of `cron` in `tz` before `until` and a little after it, latest first.
fn before(cron: &cron::Schedule, tz: Tz, until: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
    InOrder::new(Box::new(cron.after(&wall(until, tz)).rev()), tz, fixed_time(cron), false)
}

/// The instants of wall times walked in order (forward or backward), in the order of time: an
/// interval's wall time that comes twice fires at both its instants, which interleave with
/// those of the wall times around it.
struct InOrder<'a> {
    walls: Box<dyn Iterator<Item = DateTime<Utc>> + 'a>,
    tz: Tz,
    fixed: bool,
    forward: bool,
    pending: Vec<DateTime<Utc>>,
    /// No instant of a wall time still to come is before it (forward) or after it (backward).
    bound: Option<DateTime<Utc>>,
}

impl<'a> InOrder<'a> {
    fn new(walls: Box<dyn Iterator<Item = DateTime<Utc>> + 'a>, tz: Tz, fixed: bool, forward: bool) -> Self {
        Self { walls, tz, fixed, forward, pending: Vec::new(), bound: None }
    }

    /// The next pending instant in walking order, if it is past `bound` (all of them when
    /// `bound` is `None`: the walls are done).
    fn take(&mut self, bound: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
        let forward = self.forward;
        let (i, t) =
            self.pending
                .iter()
                .copied()
                .enumerate()
                .min_by_key(|(_, t)| if forward { t.timestamp_micros() } else { -t.timestamp_micros() })?;
        let ready = bound.is_none_or(|b| if forward { t < b } else { t > b });
        ready.then(|| self.pending.swap_remove(i))
    }
}

impl Iterator for InOrder<'_> {
    type Item = DateTime<Utc>;

    fn next(&mut self) -> Option<DateTime<Utc>> {
        loop {
            if let Some(t) = self.bound.and_then(|b| self.take(Some(b))) {
                return Some(t);
            }
            let Some(w) = self.walls.next() else { return self.take(None) };
            self.pending.extend(instants(w, self.tz, self.fixed));
            // Instants grow with wall times: a later wall's first instant is at or after an
            // earlier one's, and so is its last.
            self.bound = if self.forward { instant(w, self.tz) } else { last_instant(w, self.tz) };
        }
    }
}

/// The instants the wall time `w` of `tz` fires at: a fixed time its first ([`instant`]); an
/// interval each one it has (two in an hour that comes twice, none in one the clock skips).
fn instants(w: DateTime<Utc>, tz: Tz, fixed: bool) -> Vec<DateTime<Utc>> {
    if fixed {
        return instant(w, tz).into_iter().collect();
    }
    match tz.from_local_datetime(&w.naive_utc()) {
        LocalResult::Single(t) => vec![t.with_timezone(&Utc)],
        LocalResult::Ambiguous(a, b) => vec![a.with_timezone(&Utc), b.with_timezone(&Utc)],
        LocalResult::None => Vec::new(),
    }
}

/// The last instant of the wall time `w`: its second when it comes twice; for a skipped time,
/// the end of the skip.
fn last_instant(w: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&w.naive_utc()) {
        LocalResult::Ambiguous(_, later) => Some(later.with_timezone(&Utc)),
        _ => instant(w, tz),
    }
}

/// The local time of `t` in `tz`, written as a UTC time: the wall clock.
fn wall(t: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
    Utc.from_utc_datetime(&t.with_timezone(&tz).naive_local())
}

/// The instant the wall time `w` of `tz` fires: its first instant when it comes twice; for a
/// time the clock skips, the instant the skip ends (the next local minute that exists).
fn instant(w: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
    let first = |local: &NaiveDateTime| match tz.from_local_datetime(local) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t.with_timezone(&Utc)),
        LocalResult::None => None,
    };
    let local = w.naive_utc();
    first(&local).or_else(|| {
        let minute = local.with_second(0)?.with_nanosecond(0)?;
        (1..=180).find_map(|m| first(&(minute + TimeDelta::minutes(m))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cron;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn berlin() -> Tz {
        "Europe/Berlin".parse().unwrap()
    }

    /// Every fire of `cron` in Berlin in `(from, until]`, tick by tick.
    fn fires(cron: &str, from: &str, until: &str) -> Vec<DateTime<Utc>> {
        let cron = parse_cron(cron).unwrap();
        after(&cron, berlin(), t(from)).take_while(|x| *x <= t(until)).collect()
    }

    /// On 2026-10-25 Berlin's 02:00–03:00 comes twice (CEST, then CET): a fire at 02:00 and
    /// one at 02:30 fire once each, at the first instant (the `cron` crate fired both twice).
    #[test]
    fn an_hour_that_comes_twice_fires_once() {
        let got = fires("0,30 2 * * *", "2026-10-24T23:00:00Z", "2026-10-25T03:00:00Z");
        assert_eq!(got, [t("2026-10-25T00:00:00Z"), t("2026-10-25T00:30:00Z")]);
        // Ticks from inside the second pass find nothing more.
        let cron = parse_cron("0,30 2 * * *").unwrap();
        let second_pass = t("2026-10-25T01:10:00Z");
        assert_eq!(due(&cron, berlin(), second_pass, t("2026-10-25T01:40:00Z")), Due::default());
    }

    /// An interval goes on by elapsed time through both changes: hourly fires every hour of
    /// the day that has 25 (it lost 01:00Z when every wall time fired once), and the day that
    /// has 23 has 23 of them.
    #[test]
    fn an_interval_goes_on_by_elapsed_time() {
        let hourly = fires("0 * * * *", "2026-10-24T22:00:00Z", "2026-10-25T04:00:00Z");
        let want: Vec<_> = (23..=28).map(|h| t("2026-10-24T00:00:00Z") + TimeDelta::hours(h)).collect();
        assert_eq!(hourly, want);
        let quarter = fires("*/15 * * * *", "2026-10-25T00:00:00Z", "2026-10-25T02:00:00Z");
        assert_eq!(quarter.len(), 8, "{quarter:?}");
        assert_eq!(fires("0 * * * *", "2026-03-28T23:00:00Z", "2026-03-29T23:00:00Z").len(), 24);
        // `@hourly` is the same interval (it was walked as a time of day, and lost 01:00Z).
        assert_eq!(fires("@hourly", "2026-10-24T22:00:00Z", "2026-10-25T04:00:00Z"), want);
        assert_eq!(
            fires("@daily", "2026-10-24T00:00:00Z", "2026-10-26T00:00:00Z"),
            fires("0 0 * * *", "2026-10-24T00:00:00Z", "2026-10-26T00:00:00Z")
        );
        assert!(parse_cron("@reboot").unwrap_err().contains("the shortcuts are"));
        let cron = parse_cron("0 * * * *").unwrap();
        let d = due(&cron, berlin(), t("2026-10-24T12:00:00Z"), t("2026-10-25T01:30:00Z"));
        assert_eq!(d.latest_missed, Some(t("2026-10-25T01:00:00Z")));
    }

    /// On 2026-03-29 Berlin's 02:00–03:00 does not exist: a fire at 02:30 fires when the
    /// clock reaches 03:00 (01:00Z; the `cron` crate skipped it).
    #[test]
    fn an_hour_the_clock_skips_fires_when_the_skip_ends() {
        assert_eq!(fires("30 2 * * *", "2026-03-28T23:00:00Z", "2026-03-29T06:00:00Z"), [t("2026-03-29T01:00:00Z")]);
        assert_eq!(fires("30 2 * * *", "2026-03-27T23:00:00Z", "2026-03-28T06:00:00Z"), [t("2026-03-28T01:30:00Z")]);
    }

    /// The latest missed fire is the one just before the grace window, however long the
    /// downtime (it was the oldest of the first 10,000 fires after it).
    #[test]
    fn the_latest_missed_fire_is_the_latest() {
        let cron = parse_cron("* * * * *").unwrap();
        let (from, now) = (t("2026-01-01T00:00:00Z"), t("2026-01-20T12:00:30Z"));
        let d = due(&cron, chrono_tz::UTC, from, now);
        assert_eq!(d.on_time, [t("2026-01-20T12:00:00Z")]);
        assert_eq!(d.latest_missed, Some(t("2026-01-20T11:59:00Z")));
        // Nothing missed after `from`.
        let d = due(&cron, chrono_tz::UTC, t("2026-01-20T11:59:00Z"), now);
        assert_eq!(d.latest_missed, None);
        // In a repeated hour, the latest missed fire is found on its first pass.
        let cron = parse_cron("45 2 * * *").unwrap();
        let d = due(&cron, berlin(), t("2026-10-24T12:00:00Z"), t("2026-10-25T01:10:00Z"));
        assert_eq!(d.latest_missed, Some(t("2026-10-25T00:45:00Z")));
    }
}
