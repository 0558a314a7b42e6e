//! CronJob schedules: cron syntax read in a time zone, as Kubernetes reads
//! `spec.schedule` and `spec.timeZone`.
//!
//! Parsing and the calendar arithmetic are the `croner` crate's; this module holds
//! Kubernetes' rules around it: five fields (no seconds), the `@hourly`-style macros,
//! no `TZ=` prefix (the zone goes in `spec.timeZone`), and an IANA zone name. The API
//! server checks a CronJob with [`Schedule::parse`] and the controller runs it with the
//! same code, so what is accepted is what runs.

use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;

/// Why a schedule or a zone was refused.
#[derive(Debug, thiserror::Error)]
pub enum CronError {
    #[error("empty spec string")]
    Empty,
    #[error("expected exactly 5 fields, found {0}: {1:?}")]
    Fields(usize, String),
    #[error("cannot use TZ or CRON_TZ in schedule, use timeZone field instead")]
    ZoneInSchedule,
    #[error("unknown time zone {0}")]
    Zone(String),
    #[error("{0}")]
    Syntax(#[source] croner::errors::CronError),
}

/// A parsed schedule in its time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: croner::Cron,
    zone: Tz,
}

/// The macros robfig/cron (Kubernetes' parser) knows, as five fields.
fn expand_macro(s: &str) -> Option<&'static str> {
    Some(match s {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => return None,
    })
}

/// The IANA time zone `name` (`Europe/Paris`).
pub fn zone_named(name: &str) -> Result<Tz, CronError> {
    Tz::from_str(name).map_err(|_| CronError::Zone(name.to_string()))
}

impl Schedule {
    /// Parses `schedule` in `zone` (an IANA name; UTC when `None`).
    pub fn parse(schedule: &str, zone: Option<&str>) -> Result<Self, CronError> {
        let schedule = schedule.trim();
        if schedule.is_empty() {
            return Err(CronError::Empty);
        }
        if schedule.starts_with("TZ=") || schedule.starts_with("CRON_TZ=") {
            return Err(CronError::ZoneInSchedule);
        }
        let fields = expand_macro(schedule).unwrap_or(schedule);
        let n = fields.split_whitespace().count();
        if n != 5 {
            return Err(CronError::Fields(n, schedule.to_string()));
        }
        let zone = match zone {
            None | Some("") => Tz::UTC,
            Some(z) => zone_named(z)?,
        };
        let cron = croner::Cron::from_str(fields).map_err(CronError::Syntax)?;
        Ok(Self { cron, zone })
    }

    /// The first scheduled time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.zone), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last scheduled time at or before `t`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.zone), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// How many scheduled times fall in `(from, to]`, counting up to `cap`.
    pub fn count_between(&self, from: DateTime<Utc>, to: DateTime<Utc>, cap: usize) -> usize {
        let mut n = 0;
        let mut at = from;
        while n < cap {
            match self.next_after(at) {
                Some(next) if next <= to => {
                    n += 1;
                    at = next;
                }
                _ => break,
            }
        }
        n
    }

    /// `t` written in the schedule's zone (RFC 3339), as a Job's scheduled-time
    /// annotation carries it.
    pub fn in_zone(&self, t: DateTime<Utc>) -> String {
        t.with_timezone(&self.zone)
            .to_rfc3339_opts(SecondsFormat::Secs, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn kubernetes_schedules_parse_and_others_are_refused() {
        for ok in [
            "* * * * *",
            "*/5 1-3 * JAN,jul MON-FRI",
            "@hourly",
            "@daily",
            "0 0 1 1 *",
        ] {
            assert!(Schedule::parse(ok, None).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("* * * *", "exactly 5 fields"),
            ("0 * * * * *", "exactly 5 fields"),
            ("TZ=UTC * * * * *", "timeZone field"),
            ("61 * * * *", ""),
            ("@every", "exactly 5 fields"),
        ] {
            let e = Schedule::parse(bad, None).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = Schedule::parse("* * * * *", Some("Mars/Olympus")).unwrap_err();
        assert_eq!(e.to_string(), "unknown time zone Mars/Olympus");
    }

    #[test]
    fn times_are_found_in_the_schedules_zone() {
        let s = Schedule::parse("*/15 * * * *", None).unwrap();
        assert_eq!(
            s.next_after(at("2026-12-03T10:15:00Z")),
            Some(at("2026-12-03T10:30:00Z"))
        );
        assert_eq!(
            s.latest_at_or_before(at("2026-12-03T10:15:00Z")),
            Some(at("2026-12-03T10:15:00Z"))
        );
        assert_eq!(
            s.count_between(at("2026-12-03T10:00:00Z"), at("2026-12-03T11:00:00Z"), 100),
            4
        );
        assert_eq!(
            s.count_between(at("2026-12-03T10:00:00Z"), at("2026-12-04T10:00:00Z"), 10),
            10
        );
        let paris = Schedule::parse("30 9 * * *", Some("Europe/Paris")).unwrap();
        assert_eq!(
            paris.next_after(at("2026-12-03T00:00:00Z")),
            Some(at("2026-12-03T08:30:00Z"))
        );
        assert_eq!(
            paris.in_zone(at("2026-12-03T08:30:00Z")),
            "2026-12-03T09:30:00+01:00"
        );
        // Day of month and day of week both restricted: either one matches, as in cron.
        let either = Schedule::parse("0 0 1 * MON", None).unwrap();
        assert_eq!(
            either.next_after(at("2026-12-01T00:00:00Z")),
            Some(at("2026-12-07T00:00:00Z"))
        );
    }
}
