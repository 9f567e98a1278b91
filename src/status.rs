//! `StatusSnapshot`: the one piece of shared mutable state. The loop publishes it through a
//! `tokio::sync::watch` channel; the control socket and sd_notify's `STATUS=` read it.
//!
//! (Skeleton: the contract other modules build against.)

use serde::{Deserialize, Serialize};

/// What the daemon is doing, as `taskrunner-ctl status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusSnapshot {
    /// `starting`, `polling`, `backing-off`, `draining`, `paused` (drained by `taskrunner-ctl drain`), `stopping`.
    pub state: String,
    pub version: String,
    pub instance: String,
    pub worker_group: String,
    pub endpoint: String,
    pub region: String,
    pub pid: u32,
    /// Unix seconds.
    pub started_at: i64,
    pub slots: usize,
    pub running: Vec<RunningTask>,
    pub counters: Counters,
    /// Unix seconds of the last successful PollForTask / heartbeat.
    pub last_poll_ok: Option<i64>,
    pub last_heartbeat_ok: Option<i64>,
    /// When backing off: why, and when the next try is (Unix seconds).
    pub backoff: Option<Backoff>,
    pub upload_queue_depth: u64,
    pub disk_used_bytes: u64,
    pub disk_budget_bytes: u64,
    pub config_source: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RunningTask {
    pub task_id: String,
    pub attempt_id: String,
    pub pipeline_id: String,
    pub activity_type: String,
    pub pid: Option<u32>,
    /// Unix seconds.
    pub started_at: i64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Counters {
    pub finished: u64,
    pub failed: u64,
    pub canceled: u64,
    pub r#false: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Backoff {
    pub reason: String,
    pub next_try_at: i64,
    pub attempt: u32,
}
