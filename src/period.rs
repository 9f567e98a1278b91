//! Data Pipeline periods (`15 minutes`, `1 Day`), date-times (`2012-12-12T00:00:00`, UTC only) and
//! `Schedule` objects. Shared by both sides: the runner reads `attemptTimeout`, `retryDelay`,
//! `preconditionTimeout` and `reportProgressTimeout` with [`Period::parse`]; `datapipeline-local`
//! turns `Schedule` objects into instances with [`Schedule::instances_due`].
//!
//! Sources: DG:dp-expressions-functions.md (Period, DateTime), DG:dp-object-schedule.md (Schedule),
//! SPEC-NOTES §13-14.

use chrono::{DateTime, Duration as ChronoDuration, Months, NaiveDateTime, Utc};
use std::fmt;
use std::time::Duration;

/// The unit of a [`Period`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeriodUnit {
    /// Not in the guide; accepted so that tests and impatient operators can write `attemptTimeout:
    /// "30 seconds"`. A schedule still refuses anything under 15 minutes ([`Period::check_schedule_bounds`]).
    Seconds,
    Minutes,
    Hours,
    Days,
    Weeks,
    Months,
    Years,
}

impl PeriodUnit {
    fn name(self) -> &'static str {
        match self {
            PeriodUnit::Seconds => "second",
            PeriodUnit::Minutes => "minute",
            PeriodUnit::Hours => "hour",
            PeriodUnit::Days => "day",
            PeriodUnit::Weeks => "week",
            PeriodUnit::Months => "month",
            PeriodUnit::Years => "year",
        }
    }
}

/// "N [years|months|weeks|days|hours|minutes]" (DG:dp-expressions-functions.md). Singular, plural
/// and any capitalisation are accepted ("1 Day", "15 Minutes", "1 hours" all appear in the guide).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Period {
    pub count: u32,
    pub unit: PeriodUnit,
}

/// The guide's bounds for a schedule period (DG:dp-expressions-functions.md: "The minimum period is
/// 15 minutes and the maximum period is 3 years").
pub const MIN_SCHEDULE_PERIOD: Period = Period {
    count: 15,
    unit: PeriodUnit::Minutes,
};
pub const MAX_SCHEDULE_PERIOD: Period = Period {
    count: 3,
    unit: PeriodUnit::Years,
};

impl Period {
    /// Parses "15 minutes", "1 Day", "2 hours", "1 week", "1 month", "1 year". The count must be a
    /// positive integer; the error quotes the input and says what is accepted.
    pub fn parse(s: &str) -> Result<Period, String> {
        let text = s.trim();
        let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, rest) = text.split_at(digits_end);
        let unit_text = rest.trim();
        let expected = "expected \"N minutes|hours|days|weeks|months|years\" with N a positive integer, \
                        e.g. \"15 minutes\" or \"1 Day\"";
        if digits.is_empty() || unit_text.is_empty() {
            return Err(format!("invalid period {s:?}: {expected}"));
        }
        let count: u32 = digits
            .parse()
            .map_err(|_| format!("invalid period {s:?}: the count {digits} is too large"))?;
        if count == 0 {
            return Err(format!("invalid period {s:?}: the count must be at least 1"));
        }
        let unit = match unit_text.to_ascii_lowercase().as_str() {
            "second" | "seconds" => PeriodUnit::Seconds,
            "minute" | "minutes" => PeriodUnit::Minutes,
            "hour" | "hours" => PeriodUnit::Hours,
            "day" | "days" => PeriodUnit::Days,
            "week" | "weeks" => PeriodUnit::Weeks,
            "month" | "months" => PeriodUnit::Months,
            "year" | "years" => PeriodUnit::Years,
            _ => {
                return Err(format!(
                    "invalid period {s:?}: unknown unit {unit_text:?}; {expected}"
                ))
            }
        };
        Ok(Period { count, unit })
    }

    /// `t` plus this period. Months and years follow the calendar and clamp to the end of the month
    /// (Jan 31 + 1 month = Feb 28), as Joda-Time does. Saturates at the largest representable time.
    pub fn add_to(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        self.add_times(t, 1)
    }

    /// `t` plus `n` times this period, computed in one step so that month clamping does not drift
    /// (Jan 31 + 2 months is Mar 31, not Feb 28 + 1 month = Mar 28).
    pub fn add_times(&self, t: DateTime<Utc>, n: u32) -> DateTime<Utc> {
        let total = i64::from(self.count) * i64::from(n);
        let out = match self.unit {
            PeriodUnit::Months | PeriodUnit::Years => {
                let months = if self.unit == PeriodUnit::Years {
                    total.saturating_mul(12)
                } else {
                    total
                };
                u32::try_from(months)
                    .ok()
                    .and_then(|m| t.checked_add_months(Months::new(m)))
            }
            _ => ChronoDuration::try_seconds(total.saturating_mul(self.unit_seconds()))
                .and_then(|d| t.checked_add_signed(d)),
        };
        out.unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    fn unit_seconds(&self) -> i64 {
        match self.unit {
            PeriodUnit::Seconds => 1,
            PeriodUnit::Minutes => 60,
            PeriodUnit::Hours => 3_600,
            PeriodUnit::Days => 86_400,
            PeriodUnit::Weeks => 7 * 86_400,
            // Only for `as_duration_approx`: calendar units are added with the calendar.
            PeriodUnit::Months => 30 * 86_400,
            PeriodUnit::Years => 365 * 86_400,
        }
    }

    /// The period as a fixed duration, counting a month as 30 days and a year as 365 days. Exact for
    /// seconds..weeks; meant for timeouts and delays, not for calendar arithmetic.
    pub fn as_duration_approx(&self) -> Duration {
        Duration::from_secs(u64::from(self.count) * self.unit_seconds() as u64)
    }

    /// Whether this period is allowed as a `Schedule` period: between 15 minutes and 3 years.
    pub fn check_schedule_bounds(&self) -> Result<(), String> {
        let d = self.as_duration_approx();
        if d < MIN_SCHEDULE_PERIOD.as_duration_approx() {
            return Err(format!(
                "period \"{self}\" is shorter than the minimum of 15 minutes"
            ));
        }
        if d > MAX_SCHEDULE_PERIOD.as_duration_approx() {
            return Err(format!("period \"{self}\" is longer than the maximum of 3 years"));
        }
        Ok(())
    }
}

impl fmt::Display for Period {
    /// "15 minutes", "1 day": what `Period::parse` reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.count == 1 { "" } else { "s" };
        write!(f, "{} {}{}", self.count, self.unit.name(), plural)
    }
}

impl std::str::FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Period::parse(s)
    }
}

/// The date-time format of the API and of pipeline definitions (`2012-12-12T00:00:00`, UTC).
pub const DATETIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S";

/// Parses `2012-12-12T00:00:00` (UTC). Also tolerates what the guide itself prints: a one-digit hour
/// (`2011-05-24T0:00:00`), a trailing `Z`/`z`, and fractional seconds.
pub fn parse_datetime(s: &str) -> Result<DateTime<Utc>, String> {
    let text = s.trim();
    let text = text
        .strip_suffix('Z')
        .or_else(|| text.strip_suffix('z'))
        .unwrap_or(text);
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .map(|n| n.and_utc())
        .map_err(|e| {
            format!(
                "invalid date-time {s:?}: {e}; expected YYYY-MM-DDTHH:MM:SS in UTC, e.g. 2012-12-12T00:00:00"
            )
        })
}

/// Formats as `2012-12-12T00:00:00`: the form the service uses for `@scheduledStartTime` and friends.
pub fn format_datetime(t: DateTime<Utc>) -> String {
    t.format(DATETIME_FORMAT).to_string()
}

/// The most instances [`Schedule::instances_due`] returns in one call. A schedule of 15 minutes
/// started a year ago would otherwise backfill 35,000 instances at once; the caller asks again later
/// (or uses [`Schedule::instance`] with an index) to get the rest.
pub const MAX_INSTANCES_PER_CALL: usize = 1000;

/// A `Schedule` object, resolved (DG:dp-object-schedule.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// `None` for an on-demand schedule (`period: ONDEMAND_PERIOD`): one instance at activation.
    pub period: Option<Period>,
    /// `startDateTime`, or the activation time for `startAt: FIRST_ACTIVATION_DATE_TIME`.
    pub start: DateTime<Utc>,
    /// `endDateTime`: no instance starts at or after it.
    pub end: Option<DateTime<Utc>>,
    /// `occurrences`: at most this many instances.
    pub occurrences: Option<u32>,
}

impl Schedule {
    /// Reads `period`, `startDateTime` or `startAt`, `endDateTime`, `occurrences` from a `Schedule`
    /// object whose expressions are already evaluated. `activation` is the first activation time
    /// (for `FIRST_ACTIVATION_DATE_TIME` and `ONDEMAND_ACTIVATION_TIME`). Errors name the object and field.
    pub fn from_object(
        obj: &crate::model::PipelineObject,
        activation: DateTime<Utc>,
    ) -> Result<Schedule, String> {
        let id = &obj.id;
        let field_err = |field: &str, msg: String| format!("Schedule {id:?}: field {field:?}: {msg}");
        let period_text = obj
            .get("period")
            .ok_or_else(|| format!("Schedule {id:?}: the required field \"period\" is missing"))?;
        let period = if period_text.trim() == "ONDEMAND_PERIOD" {
            None
        } else {
            let p = Period::parse(period_text).map_err(|e| field_err("period", e))?;
            p.check_schedule_bounds().map_err(|e| field_err("period", e))?;
            Some(p)
        };
        let start = match (obj.get("startDateTime"), obj.get("startAt")) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "Schedule {id:?}: use either \"startDateTime\" or \"startAt\", not both"
                ))
            }
            (Some(s), None) => parse_datetime(s).map_err(|e| field_err("startDateTime", e))?,
            (None, Some(a)) => match a.trim() {
                "FIRST_ACTIVATION_DATE_TIME" | "ONDEMAND_ACTIVATION_TIME" => activation,
                other => {
                    return Err(field_err(
                        "startAt",
                        format!("{other:?} is not a valid value; expected FIRST_ACTIVATION_DATE_TIME"),
                    ))
                }
            },
            (None, None) => {
                if period.is_none() {
                    activation
                } else {
                    return Err(format!(
                        "Schedule {id:?}: one of \"startDateTime\" or \"startAt\" is required"
                    ));
                }
            }
        };
        let end = obj
            .get("endDateTime")
            .map(|s| parse_datetime(s).map_err(|e| field_err("endDateTime", e)))
            .transpose()?;
        let occurrences = obj
            .get("occurrences")
            .map(|s| match s.trim().parse::<u32>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(field_err(
                    "occurrences",
                    format!("{s:?} is not a positive integer"),
                )),
            })
            .transpose()?;
        if end.is_some() && occurrences.is_some() {
            return Err(format!(
                "Schedule {id:?}: \"occurrences\" cannot be used with \"endDateTime\""
            ));
        }
        if let Some(e) = end {
            if e <= start {
                return Err(field_err(
                    "endDateTime",
                    format!(
                        "{} is not later than the start {}",
                        format_datetime(e),
                        format_datetime(start)
                    ),
                ));
            }
        }
        Ok(Schedule {
            period,
            start,
            end,
            occurrences: if period.is_none() { Some(1) } else { occurrences },
        })
    }

    /// The scheduled start and end of instance `index` (0-based), or `None` past `occurrences` or
    /// `endDateTime`. An on-demand instance ends when it starts.
    pub fn instance(&self, index: u32) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if self.occurrences.is_some_and(|n| index >= n) {
            return None;
        }
        let (start, end) = match self.period {
            None => (self.start, self.start),
            Some(p) => (p.add_times(self.start, index), p.add_times(self.start, index + 1)),
        };
        // `add_times` saturates: a saturated start means the schedule has run off the calendar.
        if start == DateTime::<Utc>::MAX_UTC || self.end.is_some_and(|e| start >= e) {
            return None;
        }
        Some((start, end))
    }

    /// Every instance whose scheduled start is `<= now`, in order, as (scheduledStartTime,
    /// scheduledEndTime). At most [`MAX_INSTANCES_PER_CALL`] are returned (the first ones).
    pub fn instances_due(&self, now: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let mut out = Vec::new();
        let mut index = 0u32;
        while out.len() < MAX_INSTANCES_PER_CALL {
            match self.instance(index) {
                Some((s, e)) if s <= now => out.push((s, e)),
                _ => break,
            }
            index += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Field, PipelineObject};

    fn dt(s: &str) -> DateTime<Utc> {
        parse_datetime(s).unwrap()
    }

    fn schedule_obj(fields: &[(&str, &str)]) -> PipelineObject {
        PipelineObject {
            id: "S".into(),
            name: "S".into(),
            fields: fields.iter().map(|(k, v)| Field::string(*k, *v)).collect(),
        }
    }

    #[test]
    fn parses_the_guides_periods() {
        let cases = [
            ("15 minutes", 15, PeriodUnit::Minutes),
            ("15 Minutes", 15, PeriodUnit::Minutes),
            ("1 Day", 1, PeriodUnit::Days),
            ("1 days", 1, PeriodUnit::Days),
            ("2 hours", 2, PeriodUnit::Hours),
            ("1 hours", 1, PeriodUnit::Hours),
            ("1 Hour", 1, PeriodUnit::Hours),
            ("3 hours", 3, PeriodUnit::Hours),
            ("1 week", 1, PeriodUnit::Weeks),
            ("1 month", 1, PeriodUnit::Months),
            ("1 year", 1, PeriodUnit::Years),
            ("3 YEARS", 3, PeriodUnit::Years),
            ("  20 seconds ", 20, PeriodUnit::Seconds),
            ("5minutes", 5, PeriodUnit::Minutes),
        ];
        for (text, count, unit) in cases {
            assert_eq!(Period::parse(text), Ok(Period { count, unit }), "{text}");
        }
    }

    #[test]
    fn refuses_bad_periods_with_the_input_quoted() {
        for bad in [
            "",
            "minutes",
            "15",
            "0 minutes",
            "-1 days",
            "1.5 hours",
            "1 fortnight",
            "one day",
            "99999999999 days",
        ] {
            let err = Period::parse(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "15 minutes",
            "1 day",
            "2 hours",
            "1 week",
            "6 months",
            "1 year",
            "30 seconds",
        ] {
            let p = Period::parse(text).unwrap();
            assert_eq!(p.to_string(), text);
            assert_eq!(Period::parse(&p.to_string()), Ok(p));
        }
    }

    #[test]
    fn adds_with_the_calendar() {
        let t = dt("2011-01-31T17:10:00");
        let p = |s| Period::parse(s).unwrap();
        assert_eq!(p("15 minutes").add_to(t), dt("2011-01-31T17:25:00"));
        assert_eq!(p("2 hours").add_to(t), dt("2011-01-31T19:10:00"));
        assert_eq!(p("1 day").add_to(t), dt("2011-02-01T17:10:00"));
        assert_eq!(p("1 week").add_to(t), dt("2011-02-07T17:10:00"));
        assert_eq!(p("1 month").add_to(t), dt("2011-02-28T17:10:00"));
        assert_eq!(p("1 month").add_times(t, 2), dt("2011-03-31T17:10:00"));
        assert_eq!(
            p("1 year").add_to(dt("2012-02-29T00:00:00")),
            dt("2013-02-28T00:00:00")
        );
        assert_eq!(p("100000 years").add_times(t, 100000), DateTime::<Utc>::MAX_UTC);
    }

    #[test]
    fn approximate_durations() {
        let p = |s| Period::parse(s).unwrap().as_duration_approx();
        assert_eq!(p("15 minutes"), Duration::from_secs(900));
        assert_eq!(p("2 hours"), Duration::from_secs(7200));
        assert_eq!(p("1 day"), Duration::from_secs(86_400));
        assert_eq!(p("1 week"), Duration::from_secs(604_800));
        assert_eq!(p("1 month"), Duration::from_secs(30 * 86_400));
        assert_eq!(p("1 year"), Duration::from_secs(365 * 86_400));
    }

    #[test]
    fn schedule_bounds() {
        assert!(Period::parse("15 minutes")
            .unwrap()
            .check_schedule_bounds()
            .is_ok());
        assert!(Period::parse("3 years").unwrap().check_schedule_bounds().is_ok());
        assert!(Period::parse("14 minutes")
            .unwrap()
            .check_schedule_bounds()
            .is_err());
        assert!(Period::parse("37 months")
            .unwrap()
            .check_schedule_bounds()
            .is_err());
    }

    #[test]
    fn datetimes_round_trip_and_tolerate_the_guides_forms() {
        let t = dt("2012-12-12T00:00:00");
        assert_eq!(format_datetime(t), "2012-12-12T00:00:00");
        assert_eq!(dt("2011-05-24T0:00:00"), dt("2011-05-24T00:00:00"));
        assert_eq!(dt("2011-05-24T17:10:00z"), dt("2011-05-24T17:10:00"));
        assert_eq!(dt("2011-05-24T17:10:00.000Z"), dt("2011-05-24T17:10:00"));
        for bad in [
            "",
            "2012-12-12",
            "2012-13-01T00:00:00",
            "yesterday",
            "2012-12-12 00:00:00",
        ] {
            let err = parse_datetime(bad).unwrap_err();
            assert!(err.contains("YYYY-MM-DDTHH:MM:SS"), "{err}");
        }
    }

    #[test]
    fn hourly_schedule_with_end_date() {
        // DG:dp-object-schedule.md: hourly from 2012-09-01 to 2012-10-01; the first period ends at 01:00.
        let s = Schedule::from_object(
            &schedule_obj(&[
                ("period", "1 hours"),
                ("startDateTime", "2012-09-01T00:00:00"),
                ("endDateTime", "2012-10-01T00:00:00"),
            ]),
            dt("2020-01-01T00:00:00"),
        )
        .unwrap();
        let all = s.instances_due(dt("2030-01-01T00:00:00"));
        assert_eq!(all.len(), 30 * 24);
        assert_eq!(all[0], (dt("2012-09-01T00:00:00"), dt("2012-09-01T01:00:00")));
        assert_eq!(
            *all.last().unwrap(),
            (dt("2012-09-30T23:00:00"), dt("2012-10-01T00:00:00"))
        );
        // Only the ones whose start has come.
        let some = s.instances_due(dt("2012-09-01T02:30:00"));
        assert_eq!(some.len(), 3);
        assert!(s.instances_due(dt("2012-08-31T23:59:59")).is_empty());
    }

    #[test]
    fn first_activation_with_occurrences() {
        let activation = dt("2014-04-25T22:00:00");
        let s = Schedule::from_object(
            &schedule_obj(&[
                ("startAt", "FIRST_ACTIVATION_DATE_TIME"),
                ("period", "1 hours"),
                ("occurrences", "3"),
            ]),
            activation,
        )
        .unwrap();
        assert_eq!(s.start, activation);
        let all = s.instances_due(dt("2014-04-30T00:00:00"));
        assert_eq!(
            all,
            vec![
                (dt("2014-04-25T22:00:00"), dt("2014-04-25T23:00:00")),
                (dt("2014-04-25T23:00:00"), dt("2014-04-26T00:00:00")),
                (dt("2014-04-26T00:00:00"), dt("2014-04-26T01:00:00")),
            ]
        );
        assert_eq!(s.instance(3), None);
    }

    #[test]
    fn daily_default_schedule_from_the_guide() {
        let s = Schedule::from_object(
            &schedule_obj(&[
                ("occurrences", "1"),
                ("period", "1 Day"),
                ("startAt", "FIRST_ACTIVATION_DATE_TIME"),
            ]),
            dt("2020-01-01T10:00:00"),
        )
        .unwrap();
        assert_eq!(
            s.instances_due(dt("2020-01-05T00:00:00")),
            vec![(dt("2020-01-01T10:00:00"), dt("2020-01-02T10:00:00"))]
        );
    }

    #[test]
    fn on_demand_schedule_is_one_instance_at_activation() {
        let activation = dt("2020-01-01T10:00:00");
        let s = Schedule::from_object(
            &schedule_obj(&[
                ("period", "ONDEMAND_PERIOD"),
                ("startAt", "ONDEMAND_ACTIVATION_TIME"),
            ]),
            activation,
        )
        .unwrap();
        assert_eq!(s.instances_due(activation), vec![(activation, activation)]);
    }

    #[test]
    fn unbounded_backfill_is_capped() {
        let s = Schedule::from_object(
            &schedule_obj(&[("period", "15 minutes"), ("startDateTime", "2000-01-01T00:00:00")]),
            dt("2020-01-01T00:00:00"),
        )
        .unwrap();
        let due = s.instances_due(dt("2020-01-01T00:00:00"));
        assert_eq!(due.len(), MAX_INSTANCES_PER_CALL);
        assert_eq!(due[999].0, dt("2000-01-11T09:45:00"));
        assert!(s.instance(5000).is_some());
    }

    #[test]
    fn bad_schedules_name_the_field() {
        let now = dt("2020-01-01T00:00:00");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("startDateTime", "2012-01-01T00:00:00")], "\"period\""),
            (
                &[("period", "5 minutes"), ("startDateTime", "2012-01-01T00:00:00")],
                "\"period\"",
            ),
            (&[("period", "1 day")], "startDateTime"),
            (
                &[
                    ("period", "1 day"),
                    ("startDateTime", "2012-01-01T00:00:00"),
                    ("startAt", "FIRST_ACTIVATION_DATE_TIME"),
                ],
                "not both",
            ),
            (&[("period", "1 day"), ("startAt", "TOMORROW")], "\"startAt\""),
            (
                &[("period", "1 day"), ("startDateTime", "2012/01/01")],
                "\"startDateTime\"",
            ),
            (
                &[
                    ("period", "1 day"),
                    ("startDateTime", "2012-01-01T00:00:00"),
                    ("endDateTime", "2011-01-01T00:00:00"),
                ],
                "\"endDateTime\"",
            ),
            (
                &[
                    ("period", "1 day"),
                    ("startDateTime", "2012-01-01T00:00:00"),
                    ("occurrences", "0"),
                ],
                "\"occurrences\"",
            ),
            (
                &[
                    ("period", "1 day"),
                    ("startDateTime", "2012-01-01T00:00:00"),
                    ("occurrences", "2"),
                    ("endDateTime", "2013-01-01T00:00:00"),
                ],
                "cannot be used",
            ),
        ];
        for (fields, needle) in cases {
            let err = Schedule::from_object(&schedule_obj(fields), now).unwrap_err();
            assert!(err.contains("Schedule \"S\""), "{err}");
            assert!(err.contains(needle), "{fields:?}: {err}");
        }
    }
}
