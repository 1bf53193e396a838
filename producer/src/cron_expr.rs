//! Cron expressions of schedules, read as their users mean them.
//!
//! Five fields (`minute hour day-of-month month day-of-week`) are Unix cron, as in crontab(5):
//! day of week 0–7 with 0 and 7 both Sunday, so `1-5` is Monday to Friday. The `cron` crate
//! that computes the fire times counts days of week from Sunday = 1 (Quartz), so the day-of-week
//! field is translated; a 5-field expression handed to it as is fired `0 2 * * 1-5` from Sunday
//! to Thursday. Unix cron fires when *either* restricted day field matches, the crate only when
//! both do: an expression restricting both is refused rather than read the other way. Six or
//! seven fields (seconds first, optional year) are the crate's own syntax (day of week 1–7 from
//! Sunday, or names). Vixie cron's shortcuts (`@hourly`, `@daily`, …) stand for their five
//! fields; `@reboot` is refused. An expression that never fires (`0 0 30 2 *`) is refused.

use std::str::FromStr;

/// Day names of Unix cron, Sunday = 0.
const DAY_NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// Parses a schedule's cron expression (see the module docs).
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, String> {
    let bad = |why: String| format!("bad cron expression {expr:?}: {why}");
    if let Some(name) = expr.trim().strip_prefix('@') {
        // Vixie cron's shortcuts, as the five fields they stand for: `@hourly` is an interval
        // like `0 * * * *` (the crate took it as its own and it was walked as a time of day).
        let five = match name.to_ascii_lowercase().as_str() {
            "yearly" | "annually" => "0 0 1 1 *",
            "monthly" => "0 0 1 * *",
            "weekly" => "0 0 * * 0",
            "daily" | "midnight" => "0 0 * * *",
            "hourly" => "0 * * * *",
            _ => return Err(bad("the shortcuts are @yearly, @annually, @monthly, @weekly, @daily, @midnight and @hourly".into())),
        };
        return parse_cron(five).map_err(bad);
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let full = match fields.as_slice() {
        [minute, hour, dom, month, dow] => {
            if *dom != "*" && *dom != "?" && *dow != "*" && *dow != "?" {
                return Err(bad("it restricts both the day of month and the day of week; Unix cron fires when either matches and this \
                     scheduler only when both do, so give one of them as *"
                    .into()));
            }
            format!("0 {minute} {hour} {dom} {month} {}", unix_days_of_week(dow).map_err(bad)?)
        }
        _ => expr.to_string(),
    };
    let schedule = cron::Schedule::from_str(&full).map_err(|e| bad(e.to_string()))?;
    if schedule.upcoming(chrono::Utc).next().is_none() {
        return Err(bad("it never fires (a date that does not exist?)".into()));
    }
    Ok(schedule)
}

/// A Unix day-of-week field (`*`, `1-5`, `0,6`, `mon-fri`, `*/2`, `1-5/2`; 0 and 7 Sunday) in
/// the `cron` crate's numbering (Sunday = 1), as a list of days.
fn unix_days_of_week(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok(field.to_string());
    }
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => (r, s.parse::<usize>().ok().filter(|s| *s > 0).ok_or(format!("bad step in day of week {item:?}"))?),
            None => (item, 1),
        };
        let (first, last) = match range.split_once('-') {
            _ if range == "*" => (0, 6),
            Some((a, b)) => (day(a)?, day(b)?),
            None if step > 1 => (day(range)?, 6),
            None => (day(range)?, day(range)?),
        };
        // 7 is Sunday too: `5-7` is Friday to Sunday.
        let last = if last == 0 && first > 0 { 7 } else { last };
        if first > last {
            return Err(format!("day-of-week range {item:?} runs backwards"));
        }
        for d in (first..=last).step_by(step) {
            days[d % 7] = true;
        }
    }
    Ok(days.iter().enumerate().filter(|(_, on)| **on).map(|(d, _)| (d + 1).to_string()).collect::<Vec<_>>().join(","))
}

/// One Unix day of week, a number 0–7 or a name; 7 stays 7 (Sunday at the end of a range).
fn day(s: &str) -> Result<usize, String> {
    let lower = s.to_ascii_lowercase();
    if let Some(d) = DAY_NAMES.iter().position(|n| lower == *n || (lower.len() > 3 && full_name(n).starts_with(&lower))) {
        return Ok(d);
    }
    s.parse::<usize>().ok().filter(|d| *d <= 7).ok_or_else(|| format!("{s:?} is not a day of week (0-7, 0 and 7 Sunday, or sun-sat)"))
}

fn full_name(short: &str) -> &'static str {
    match short {
        "sun" => "sunday",
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        _ => "saturday",
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Datelike, TimeZone, Utc, Weekday};

    use super::*;

    /// The weekdays of the next 14 fires of a daily-at-most expression.
    fn weekdays(expr: &str) -> Vec<Weekday> {
        let from = Utc.with_ymd_and_hms(2026, 11, 30, 0, 0, 0).unwrap(); // a Monday
        let mut days: Vec<Weekday> = parse_cron(expr).unwrap().after(&from).take(14).map(|t| t.weekday()).collect();
        days.sort_by_key(|d| d.num_days_from_sunday());
        days.dedup();
        days
    }

    #[test]
    fn five_fields_read_days_of_week_as_unix_cron() {
        use Weekday::*;
        assert_eq!(weekdays("0 2 * * 1-5"), [Mon, Tue, Wed, Thu, Fri], "1-5 is Monday to Friday, not Sunday to Thursday");
        assert_eq!(weekdays("0 2 * * 0"), [Sun]);
        assert_eq!(weekdays("0 2 * * 7"), [Sun]);
        assert_eq!(weekdays("0 2 * * 5-7"), [Sun, Fri, Sat]);
        assert_eq!(weekdays("0 2 * * 0,6"), [Sun, Sat]);
        assert_eq!(weekdays("0 2 * * mon-fri"), [Mon, Tue, Wed, Thu, Fri]);
        assert_eq!(weekdays("0 2 * * */2"), [Sun, Tue, Thu, Sat]);
        assert_eq!(weekdays("0 2 * * 1-5/2"), [Mon, Wed, Fri]);
        assert_eq!(weekdays("0 2 * * *").len(), 7);
        // Six fields are the crate's syntax (seconds first, Sunday = 1), unchanged.
        assert_eq!(weekdays("0 0 2 * * 2"), [Mon]);
    }

    #[test]
    fn expressions_that_would_be_misread_or_never_fire_are_refused() {
        for (expr, says) in [
            ("0 2 1 * 1", "both the day of month and the day of week"),
            ("0 0 30 2 *", "never fires"),
            ("0 2 * * 8", "not a day of week"),
            ("0 2 * * 5-1", "backwards"),
            ("0 2 * * 1/0", "bad step"),
            ("0 2 * * funday", "not a day of week"),
            ("nope", "bad cron expression"),
        ] {
            let e = parse_cron(expr).unwrap_err();
            assert!(e.contains(says) && e.contains(expr), "{expr}: {e}");
        }
    }
}
