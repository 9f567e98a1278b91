//! The Data Pipeline API as the runner sees it: `trait PipelineApi` (the four task-runner calls
//! plus DescribeObjects) and its implementation over HTTP with SigV4 (service name
//! `datapipeline`). This is the only runner code that knows the wire format. Unit tests use fakes
//! of the trait with tokio's paused time.

pub mod http;
pub mod imds;

pub use http::HttpPipelineApi;

use crate::model::{InstanceIdentity, PipelineObject, TaskObject, TaskStatus};
use std::time::Duration;

/// A call that failed, classified so that callers decide retry vs give up without parsing text.
#[derive(Debug, thiserror::Error)]
#[error("{operation}: {kind:?}: {message}")]
pub struct ApiError {
    pub operation: &'static str,
    pub kind: ApiErrorKind,
    /// What the service (or the transport) said. Never carries a secret.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// Throttling (400 ThrottlingException and friends, 429): retry with backoff.
    Throttled,
    /// 5xx from the service: retry with backoff.
    Server(u16),
    /// Connection refused/reset, timeout, DNS, TLS: retry with backoff.
    Transport,
    /// `TaskNotFoundException`: the service moved on; stop reporting this task.
    TaskNotFound,
    /// `PipelineNotFoundException` / `PipelineDeletedException`: stop reporting this task.
    PipelineGone,
    /// Any other 4xx (bad signature, access denied, invalid request): the code after `#`.
    Client { status: u16, code: String },
}

impl ApiError {
    /// True when the same call may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ApiErrorKind::Throttled | ApiErrorKind::Server(_) | ApiErrorKind::Transport
        )
    }
}

/// The input of PollForTask.
#[derive(Debug, Clone)]
pub struct PollRequest {
    pub worker_group: String,
    pub hostname: String,
    pub instance_identity: Option<InstanceIdentity>,
}

/// The input of SetTaskStatus. `error_id` never starts with `Service_`; `error_stack_trace` is at
/// most 1024 characters (the implementation enforces both).
#[derive(Debug, Clone)]
pub struct StatusReport {
    pub task_id: String,
    pub status: TaskStatus,
    pub error_id: Option<String>,
    pub error_message: Option<String>,
    pub error_stack_trace: Option<String>,
}

/// The calls a runner makes. One implementation speaks HTTP; tests use fakes.
#[async_trait::async_trait]
pub trait PipelineApi: Send + Sync + 'static {
    /// Long-polls (the service holds the call up to 90 s). `Ok(None)`: no task this time.
    async fn poll_for_task(&self, req: &PollRequest) -> Result<Option<TaskObject>, ApiError>;
    /// Returns `canceled`.
    async fn report_task_progress(
        &self,
        task_id: &str,
        fields: &[crate::model::Field],
    ) -> Result<bool, ApiError>;
    async fn set_task_status(&self, report: &StatusReport) -> Result<(), ApiError>;
    /// Returns `terminate`.
    async fn report_task_runner_heartbeat(
        &self,
        taskrunner_id: &str,
        worker_group: &str,
        hostname: &str,
    ) -> Result<bool, ApiError>;
    /// With `evaluateExpressions: true`; for referenced objects that PollForTask did not include.
    async fn describe_objects(
        &self,
        pipeline_id: &str,
        object_ids: &[String],
    ) -> Result<Vec<PipelineObject>, ApiError>;
}

/// The long poll is held up to this long by the service; the client's read timeout must exceed it.
pub const LONG_POLL: Duration = Duration::from_secs(90);
