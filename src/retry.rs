//! Retry as a value: [`RetryPolicy`] (capped exponential backoff with jitter, optionally a bounded
//! number of attempts) and [`run`], which retries an async operation while its error says it is
//! retryable, reports every backoff to the caller (the daemon shows it in `taskrunner-ctl
//! status`), and returns an error that says how many tries were made.
//!
//! The delays are computed by pure functions of `(attempt, previous delay, rng)` so that they can
//! be tested without sleeping; [`run`] sleeps with `tokio::time`, so paused-time tests cover it.
//!
//! Rates: `shared/reference/dp-guide/dp-limits.md` limits PollForTask, DescribeObjects to 2 calls/s,
//! ReportTaskRunnerHeartbeat to 1/s and ReportTaskProgress, SetTaskStatus to 10/s per account.
//! [`RetryPolicy::for_operation`] never retries faster than the documented regular rate, and
//! [`min_call_interval`] gives the spacing the HTTP client enforces between calls
//! (see `api::http`).

use rand::{Rng, RngExt};
use std::future::Future;
use std::time::Duration;

/// How the exponential delay is randomised. Jitter spreads out the retries of many runners that
/// failed at the same moment (an endpoint outage), so they do not come back in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly `initial * multiplier^attempt`, capped (tests, and callers that want determinism).
    None,
    /// Uniform in `[initial, capped exponential]`: "full jitter" with `initial` as a floor, so a
    /// retry never comes sooner than `initial` (keeps the call rate under the documented limits).
    Full,
    /// "Decorrelated jitter": uniform in `[initial, previous * 3]`, capped at `max`.
    Decorrelated,
}

/// A retry policy. `attempt` counts failures so far, from 0 (the delay after the first failure).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub jitter: Jitter,
    /// Total tries including the first; `None`: retry for as long as the error is retryable.
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    /// 1 s, doubling, capped at 60 s, full jitter, unbounded.
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: Jitter::Full,
            max_attempts: None,
        }
    }
}

/// The regular rate limit of an operation in `dp-limits.md`, as the interval between calls.
/// Unknown operations get the strictest documented rate (1 call/s).
pub fn min_call_interval(op: &str) -> Duration {
    match op {
        "PollForTask" | "DescribeObjects" | "QueryObjects" => Duration::from_millis(500),
        "ReportTaskProgress" | "SetTaskStatus" => Duration::from_millis(100),
        _ => Duration::from_secs(1),
    }
}

impl RetryPolicy {
    /// The default policy for a Data Pipeline operation: the first retry comes no sooner than
    /// twice the documented regular interval, and never later than 60 s apart.
    /// SetTaskStatus is retried without bound: a status is never dropped while the service is
    /// unreachable (issue 3 item 5).
    pub fn for_operation(op: &str) -> RetryPolicy {
        let floor = (min_call_interval(op) * 2).max(Duration::from_secs(1));
        RetryPolicy {
            initial: floor,
            ..RetryPolicy::default()
        }
    }

    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n.max(1));
        self
    }

    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// `initial * multiplier^attempt`, capped at `max` (no jitter). Saturates instead of
    /// overflowing for large `attempt`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let max = self.max.max(self.initial);
        let factor = self.multiplier.max(1.0).powi(attempt.min(1000) as i32);
        let secs = self.initial.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= max.as_secs_f64() {
            max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay before retry number `attempt + 1`. `prev` is the previous delay (used only by
    /// [`Jitter::Decorrelated`]; pass `Duration::ZERO` for the first). Pure: same inputs and rng
    /// state, same output. Always within `[initial, max]`.
    pub fn next_delay_after(&self, attempt: u32, prev: Duration, rng: &mut impl Rng) -> Duration {
        let max = self.max.max(self.initial);
        let d = match self.jitter {
            Jitter::None => self.base_delay(attempt),
            Jitter::Full => {
                let hi = self.base_delay(attempt);
                uniform(rng, self.initial, hi)
            }
            Jitter::Decorrelated => {
                let hi = prev.max(self.initial).saturating_mul(3).min(max);
                uniform(rng, self.initial, hi)
            }
        };
        d.clamp(self.initial.min(max), max)
    }

    /// [`Self::next_delay_after`] for policies that do not need the previous delay.
    pub fn next_delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        self.next_delay_after(attempt, self.base_delay(attempt.saturating_sub(1)), rng)
    }

    /// Whether try number `tries + 1` is allowed after `tries` tries.
    pub fn may_try_again(&self, tries: u32) -> bool {
        self.max_attempts.is_none_or(|m| tries < m)
    }
}

fn uniform(rng: &mut impl Rng, lo: Duration, hi: Duration) -> Duration {
    if hi <= lo {
        return lo;
    }
    let nanos = rng.random_range(lo.as_nanos() as u64..=hi.as_nanos().min(u64::MAX as u128) as u64);
    Duration::from_nanos(nanos)
}

/// An error that knows whether trying again may help.
pub trait Retryable {
    fn is_retryable(&self) -> bool;
}

impl Retryable for crate::api::ApiError {
    fn is_retryable(&self) -> bool {
        crate::api::ApiError::is_retryable(self)
    }
}

/// One backoff, reported before [`run`] sleeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackoffInfo {
    pub operation: &'static str,
    /// Tries made so far (>= 1).
    pub tries: u32,
    pub delay: Duration,
    /// The error of the last try, as text (never a secret: errors carry none).
    pub error: String,
}

impl std::fmt::Display for BackoffInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed ({} tries so far), retrying in {:.1} s: {}",
            self.operation,
            self.tries,
            self.delay.as_secs_f64(),
            self.error
        )
    }
}

/// The final error of [`run`]: the last error and how many tries were made.
#[derive(Debug, thiserror::Error)]
#[error("{operation}: gave up after {tries} {}: {error}", if *.tries == 1 { "try" } else { "tries" })]
pub struct RetryError<E: std::error::Error + 'static> {
    pub operation: &'static str,
    pub tries: u32,
    /// False when the error was not retryable (the first such error ends the run).
    pub exhausted: bool,
    #[source]
    pub error: E,
}

impl<E: std::error::Error + 'static> RetryError<E> {
    pub fn into_inner(self) -> E {
        self.error
    }
}

/// Runs `op` until it succeeds, fails with an error that is not retryable, or the policy's
/// attempts are used up. Before each backoff sleep, `on_backoff` is called (log it, show it).
pub async fn run<T, E, F, Fut>(
    policy: &RetryPolicy,
    operation: &'static str,
    mut op: F,
    on_backoff: impl Fn(&BackoffInfo),
) -> Result<T, RetryError<E>>
where
    E: Retryable + std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut tries = 0u32;
    let mut prev = Duration::ZERO;
    loop {
        tries += 1;
        let error = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if !error.is_retryable() {
            return Err(RetryError {
                operation,
                tries,
                exhausted: false,
                error,
            });
        }
        if !policy.may_try_again(tries) {
            return Err(RetryError {
                operation,
                tries,
                exhausted: true,
                error,
            });
        }
        // The rng is created and dropped here, not held across the await (ThreadRng is !Send).
        let delay = policy.next_delay_after(tries - 1, prev, &mut rand::rng());
        prev = delay;
        on_backoff(&BackoffInfo {
            operation,
            tries,
            delay,
            error: error.to_string(),
        });
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiError, ApiErrorKind};
    use rand::SeedableRng;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    fn err(kind: ApiErrorKind) -> ApiError {
        ApiError {
            operation: "PollForTask",
            kind,
            message: "boom".into(),
        }
    }

    #[test]
    fn no_jitter_is_exponential_and_capped() {
        let p = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: Jitter::None,
            max_attempts: None,
        };
        let got: Vec<u64> = (0..6).map(|a| p.next_delay(a, &mut rng()).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 10, 10]);
        // Huge attempt numbers saturate at the cap instead of overflowing.
        assert_eq!(p.next_delay(u32::MAX, &mut rng()), Duration::from_secs(10));
    }

    #[test]
    fn full_jitter_stays_in_bounds_and_varies() {
        let p = RetryPolicy::default();
        let mut r = rng();
        for attempt in 0..40 {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..50 {
                let d = p.next_delay(attempt, &mut r);
                assert!(d >= p.initial, "attempt {attempt}: {d:?} below the floor");
                assert!(
                    d <= p.base_delay(attempt),
                    "attempt {attempt}: {d:?} above the exponential"
                );
                assert!(d <= p.max);
                seen.insert(d);
            }
            if attempt >= 2 {
                assert!(
                    seen.len() > 10,
                    "attempt {attempt}: jitter produced {} values",
                    seen.len()
                );
            }
        }
    }

    #[test]
    fn decorrelated_jitter_stays_in_bounds() {
        let p = RetryPolicy::default().with_jitter(Jitter::Decorrelated);
        let mut r = rng();
        let mut prev = Duration::ZERO;
        for attempt in 0..200 {
            let d = p.next_delay_after(attempt, prev, &mut r);
            assert!(d >= p.initial && d <= p.max, "{d:?}");
            assert!(d <= prev.max(p.initial) * 3, "{d:?} after {prev:?}");
            prev = d;
        }
    }

    #[test]
    fn same_seed_same_delays() {
        let p = RetryPolicy::default();
        let a: Vec<_> = (0..10).map(|i| p.next_delay(i, &mut rng())).collect();
        let b: Vec<_> = (0..10).map(|i| p.next_delay(i, &mut rng())).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn defaults_respect_documented_rates() {
        // dp-limits.md: regular rates per account.
        for (op, per_sec) in [
            ("PollForTask", 2.0),
            ("DescribeObjects", 2.0),
            ("ReportTaskProgress", 10.0),
            ("SetTaskStatus", 10.0),
            ("ReportTaskRunnerHeartbeat", 1.0),
        ] {
            let interval = min_call_interval(op).as_secs_f64();
            assert!(1.0 / interval <= per_sec, "{op}: {interval}");
            let p = RetryPolicy::for_operation(op);
            let mut r = rng();
            for attempt in 0..20 {
                let d = p.next_delay(attempt, &mut r).as_secs_f64();
                assert!(1.0 / d <= per_sec, "{op}: retry after {d} s exceeds {per_sec}/s");
            }
            assert!(p.max <= Duration::from_secs(60));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn run_retries_retryable_errors_and_reports_backoffs() {
        let calls = AtomicU32::new(0);
        let backoffs = Mutex::new(Vec::new());
        let start = tokio::time::Instant::now();
        let p = RetryPolicy::default().with_jitter(Jitter::None);
        let out = run(
            &p,
            "PollForTask",
            || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => Err(err(ApiErrorKind::Throttled)),
                        1 => Err(err(ApiErrorKind::Server(503))),
                        2 => Err(err(ApiErrorKind::Transport)),
                        _ => Ok(42),
                    }
                }
            },
            |b| backoffs.lock().unwrap().push(b.clone()),
        )
        .await
        .unwrap();
        assert_eq!(out, 42);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        let b = backoffs.into_inner().unwrap();
        assert_eq!(b.iter().map(|b| b.tries).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(
            b.iter().map(|b| b.delay.as_secs()).collect::<Vec<_>>(),
            vec![1, 2, 4]
        );
        assert!(b[1].error.contains("Server(503)"), "{}", b[1].error);
        // Paused time: the sleeps really happened (auto-advanced), 1 + 2 + 4 s.
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn run_stops_at_first_non_retryable_error() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let e = run(
            &RetryPolicy::default(),
            "SetTaskStatus",
            move || {
                c.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(err(ApiErrorKind::TaskNotFound)) }
            },
            |_| panic!("no backoff for a non-retryable error"),
        )
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(e.tries, 1);
        assert!(!e.exhausted);
        assert_eq!(e.error.kind, ApiErrorKind::TaskNotFound);
        assert!(e.to_string().contains("gave up after 1 try"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn run_gives_up_after_max_attempts_and_says_so() {
        let p = RetryPolicy::default().with_max_attempts(5);
        let n = Mutex::new(0);
        let e = run(
            &p,
            "ReportTaskProgress",
            || {
                *n.lock().unwrap() += 1;
                async { Err::<(), _>(err(ApiErrorKind::Server(500))) }
            },
            |_| {},
        )
        .await
        .unwrap_err();
        assert_eq!(*n.lock().unwrap(), 5);
        assert_eq!(e.tries, 5);
        assert!(e.exhausted);
        assert!(e.to_string().contains("gave up after 5 tries"), "{e}");
    }
}
