//! The wall clock behind every hour-based decision in [`crate::logs`]: which hourly file a line
//! goes to, when a file is old enough to gzip, when a closed hour is shipped, and the once-an-hour
//! upload warnings. Injected so tests can cross an hour boundary or the 8-hour rule without waiting.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Timelike, Utc};

/// Wall-clock time, UTC.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The real clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock(Arc::new(Mutex::new(start)))
    }
    /// `ManualClock::at(2026, 11, 30, 2, 59, 59)`.
    pub fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> ManualClock {
        ManualClock::new(
            Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
                .single()
                .expect("valid date"),
        )
    }
    pub fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }
    pub fn advance(&self, by: std::time::Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *t += ChronoDuration::from_std(by).expect("duration in range");
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The start of the UTC hour that contains `t`.
pub fn hour_start(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_minute(0)
        .and_then(|t| t.with_second(0))
        .and_then(|t| t.with_nanosecond(0))
        .expect("truncating to the hour is always valid in UTC")
}
