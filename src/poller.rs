//! The pollers: `--tasks` loops, each with at most one outstanding PollForTask for the worker
//! group (the API asks not to re-poll before the previous poll returned). A poller's slot is its
//! loop: it runs the activity it received before it polls again, so `--tasks N` runs at most N
//! activities at once. A precondition is handed to its own pool ([`crate::worker`]) and the poller
//! goes straight back to polling: a precondition never holds an activity slot.
//!
//! Errors back off (capped, jittered, exponential; published in the status) and never end the loop.
//! A stop (drain, or `taskrunner-ctl drain`) drops an in-flight long poll at once: a task the
//! service handed out but we never acknowledged is handed out again after its ack timeout.

use crate::api::PollRequest;
use crate::model::TaskObject;
use crate::worker::{self, WorkerContext};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// First wait after a failed poll.
pub const POLL_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait between failed polls.
pub const POLL_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Capped exponential backoff with jitter: attempt n waits a random time in
/// `[d/2, d]` with `d = min(initial * 2^n, max)`. (A private copy until `retry::RetryPolicy` lands.)
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }
    /// The next delay; each call doubles the base up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        base.mul_f64(rand::random_range(0.5..=1.0))
    }
    /// Failures since the last success.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Caps the number of tasks taken (`exit-after-tasks`): a poller reserves a ticket before it polls
/// and gives it back when the poll brings nothing, so N pollers never take more than the limit.
#[derive(Debug, Default)]
pub struct TaskBudget {
    limit: Option<u64>,
    reserved: AtomicU64,
}

impl TaskBudget {
    pub fn new(limit: Option<u64>) -> Self {
        TaskBudget {
            limit,
            reserved: AtomicU64::new(0),
        }
    }
    fn reserve(&self) -> bool {
        let Some(limit) = self.limit else { return true };
        self.reserved
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                (r < limit).then_some(r + 1)
            })
            .is_ok()
    }
    fn release(&self) {
        if self.limit.is_some() {
            self.reserved.fetch_sub(1, Ordering::SeqCst);
        }
    }
    /// True once every allowed task was taken.
    pub fn exhausted(&self) -> bool {
        self.limit
            .is_some_and(|l| self.reserved.load(Ordering::SeqCst) >= l)
    }
}

/// What every poller shares.
#[derive(Clone)]
pub struct PollerContext {
    pub worker: WorkerContext,
    pub request: PollRequest,
    /// Cancelled when the daemon drains: stop polling now.
    pub stop: CancellationToken,
    /// `true` while `taskrunner-ctl drain` holds the runner paused.
    pub paused: watch::Receiver<bool>,
    /// How many pollers should run (`--tasks`, changed by SIGHUP). Poller `i` ends when `i >= n`.
    pub wanted: watch::Receiver<usize>,
    pub budget: Arc<TaskBudget>,
    /// Precondition workers run here, so the drain waits for them too.
    pub preconditions: TaskTracker,
}

enum PollResult {
    Stop,
    Paused,
    Resized,
    Polled(Result<Option<TaskObject>, crate::api::ApiError>),
}

/// One poller loop. Returns when stopped, or when `--tasks` shrank below its index.
pub async fn run_poller(index: usize, mut ctx: PollerContext) {
    let mut backoff = Backoff::new(POLL_BACKOFF_INITIAL, POLL_BACKOFF_MAX);
    tracing::debug!(poller = index, "poller started");
    loop {
        if ctx.stop.is_cancelled() {
            break;
        }
        if index >= *ctx.wanted.borrow_and_update() {
            tracing::info!(poller = index, "poller ended: --tasks was lowered");
            break;
        }
        if *ctx.paused.borrow_and_update() {
            tokio::select! {
                _ = ctx.stop.cancelled() => break,
                _ = ctx.paused.changed() => continue,
            }
        }
        if !ctx.budget.reserve() {
            tracing::debug!(poller = index, "task budget used up; poller ends");
            break;
        }
        let api = ctx.worker.api.clone();
        let result = tokio::select! {
            _ = ctx.stop.cancelled() => PollResult::Stop,
            _ = ctx.paused.changed() => PollResult::Paused,
            _ = ctx.wanted.changed() => PollResult::Resized,
            r = api.poll_for_task(&ctx.request) => PollResult::Polled(r),
        };
        match result {
            PollResult::Stop => {
                ctx.budget.release();
                break;
            }
            PollResult::Paused | PollResult::Resized => {
                // The dropped poll's task (if any) comes back after the ack timeout.
                ctx.budget.release();
                continue;
            }
            PollResult::Polled(Ok(None)) => {
                ctx.budget.release();
                backoff.reset();
                ctx.worker.status.poll_ok();
            }
            PollResult::Polled(Ok(Some(task))) => {
                backoff.reset();
                ctx.worker.status.poll_ok();
                if crate::activity::is_precondition(&task) {
                    let w = ctx.worker.clone();
                    ctx.preconditions.spawn(async move {
                        worker::run_task(&w, task).await;
                    });
                } else {
                    worker::run_task(&ctx.worker, task).await;
                }
            }
            PollResult::Polled(Err(e)) => {
                ctx.budget.release();
                let wait = backoff.next_delay();
                if e.is_retryable() {
                    tracing::warn!(poller = index, error = %e, retry_in = ?wait, "PollForTask failed");
                } else {
                    tracing::error!(poller = index, error = %e, retry_in = ?wait,
                        "PollForTask refused; check the credentials, region and IAM policy");
                }
                ctx.worker
                    .status
                    .set_backoff(format!("PollForTask: {e}"), wait, backoff.attempt());
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctx.stop.cancelled() => break,
                }
                ctx.worker.status.clear_backoff();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let d: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (i, d) in d.iter().enumerate() {
            let base = Duration::from_secs((1u64 << i).min(8));
            assert!(*d >= base / 2 && *d <= base, "attempt {i}: {d:?} vs {base:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn budget_never_hands_out_more_than_the_limit() {
        let b = TaskBudget::new(Some(2));
        assert!(b.reserve());
        assert!(b.reserve());
        assert!(!b.reserve());
        b.release();
        assert!(!b.exhausted());
        assert!(b.reserve());
        assert!(b.exhausted());
        let unlimited = TaskBudget::new(None);
        assert!((0..100).all(|_| unlimited.reserve()));
    }
}
