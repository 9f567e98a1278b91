//! TEMPORARY stand-in for `crate::local::expr` and `crate::period` (written on branch `expr` at the
//! same time). Deleted once that branch is merged; everything else imports these names from here so
//! that the switch is one file.

use crate::model::PipelineObject;
use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use std::collections::BTreeMap;

pub struct Scope<'a> {
    pub objects: &'a BTreeMap<String, PipelineObject>,
    pub current: &'a str,
    pub params: &'a BTreeMap<String, Vec<String>>,
}

#[derive(Debug)]
pub struct ExprError(pub String);
impl std::fmt::Display for ExprError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Stand-in: returns the template unchanged.
pub fn evaluate(template: &str, _scope: &Scope<'_>) -> Result<String, ExprError> {
    Ok(template.to_string())
}

#[derive(Debug, Clone, Copy)]
pub struct Period(TimeDelta);

impl Period {
    pub fn parse(s: &str) -> Result<Period, String> {
        let mut it = s.split_whitespace();
        let n: i64 = it
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("bad period {s:?}"))?;
        let unit = it.next().unwrap_or("").to_ascii_lowercase();
        let d = match unit.trim_end_matches('s') {
            "minute" => TimeDelta::minutes(n),
            "hour" => TimeDelta::hours(n),
            "day" => TimeDelta::days(n),
            "week" => TimeDelta::weeks(n),
            "month" => TimeDelta::days(30 * n),
            "year" => TimeDelta::days(365 * n),
            _ => return Err(format!("bad period {s:?}")),
        };
        Ok(Period(d))
    }
    pub fn add_to(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        t + self.0
    }
}

pub fn parse_datetime(s: &str) -> Result<DateTime<Utc>, String> {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S")
        .map(|t| t.and_utc())
        .map_err(|e| format!("bad date-time {s:?}: {e}"))
}

pub fn format_datetime(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

pub struct Schedule {
    start: DateTime<Utc>,
    period: Period,
    end: Option<DateTime<Utc>>,
    occurrences: Option<u32>,
}

impl Schedule {
    pub fn from_object(o: &PipelineObject, activation: DateTime<Utc>) -> Result<Schedule, String> {
        let period = Period::parse(o.get("period").ok_or("schedule has no period")?)?;
        let start = match o.get("startDateTime") {
            Some(s) => parse_datetime(s)?,
            None => activation,
        };
        let end = o.get("endDateTime").map(parse_datetime).transpose()?;
        let occurrences = o.get("occurrences").and_then(|s| s.parse().ok());
        Ok(Schedule {
            start,
            period,
            end,
            occurrences,
        })
    }
    pub fn instances_due(&self, now: DateTime<Utc>) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let mut out = Vec::new();
        let mut s = self.start;
        while s <= now && out.len() < 1000 {
            if self.end.is_some_and(|e| s >= e) || self.occurrences.is_some_and(|n| out.len() as u32 >= n) {
                break;
            }
            let e = self.period.add_to(s);
            out.push((s, e));
            s = e;
        }
        out
    }
}
