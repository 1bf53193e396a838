//! When a cron schedule fires, in its time zone, across daylight-saving changes.
//!
//! The `cron` crate walks local times and, at a change, fires an hour that comes twice at both
//! of its instants and never fires an hour that does not exist. Here the schedule walks the
//! wall clock instead (its local times, taken as if they were UTC, where no hour repeats or
//! goes missing), and each wall time becomes one instant, as Vixie cron does: a time that
//! comes twice fires at its first instant only, and a time the clock skips fires when the
//! skip ends (times of one skipped hour fire once, there: one instant is one fire id).

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeDelta, TimeZone, Timelike, Utc};
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
    if from >= cutoff - TimeDelta::seconds(1) {
        // Ticking along: nothing between the last tick and the grace window.
        return Due { on_time, latest_missed: None };
    }
    let latest_missed = cron
        .after(&wall(cutoff + REPEAT_MARGIN, tz))
        .rev()
        .filter_map(|w| instant(w, tz))
        .find(|t| *t < cutoff || *t <= from)
        .filter(|t| *t > from && *t < cutoff);
    Due { on_time, latest_missed }
}

/// The fire instants of `cron` in `tz` after `from`, in order (a fire of a skipped hour may
/// repeat the instant before it).
pub fn after(cron: &cron::Schedule, tz: Tz, from: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
    cron.after(&wall(from, tz)).filter_map(move |w| instant(w, tz)).skip_while(move |t| *t <= from)
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
