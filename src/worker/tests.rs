//! Worker unit tests: a fake `PipelineApi`, paused time where no process runs, real short
//! processes where one does.

use super::*;
use crate::activity::TaskIds;
use crate::api::{ApiError, ApiErrorKind, PollRequest};
use crate::model::PipelineObject;
use crate::status::StatusSnapshot;
use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Progress(Vec<Field>),
    Status(TaskStatus, Option<String>),
    Describe(Vec<String>),
}

/// Scripted answers; every call is recorded with the (virtual) time it came at.
#[derive(Default)]
struct FakeApi {
    calls: Mutex<Vec<(tokio::time::Instant, Call)>>,
    progress: Mutex<VecDeque<Result<bool, ApiErrorKind>>>,
    status: Mutex<VecDeque<Result<(), ApiErrorKind>>>,
    statuses: Mutex<Vec<StatusReport>>,
    objects: Mutex<Vec<PipelineObject>>,
}

fn err(kind: ApiErrorKind) -> ApiError {
    ApiError {
        operation: "Fake",
        kind,
        message: "scripted".into(),
    }
}

impl FakeApi {
    fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, c)| c.clone())
            .collect()
    }
    fn times(&self) -> Vec<tokio::time::Instant> {
        self.calls.lock().unwrap().iter().map(|(t, _)| *t).collect()
    }
    fn record(&self, c: Call) {
        self.calls.lock().unwrap().push((tokio::time::Instant::now(), c));
    }
}

#[async_trait::async_trait]
impl PipelineApi for FakeApi {
    async fn poll_for_task(&self, _req: &PollRequest) -> Result<Option<TaskObject>, ApiError> {
        unreachable!("workers do not poll")
    }
    async fn report_task_progress(&self, _task_id: &str, fields: &[Field]) -> Result<bool, ApiError> {
        self.record(Call::Progress(fields.to_vec()));
        self.progress
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(false))
            .map_err(err)
    }
    async fn set_task_status(&self, report: &StatusReport) -> Result<(), ApiError> {
        self.record(Call::Status(report.status, report.error_id.clone()));
        self.statuses.lock().unwrap().push(report.clone());
        self.status
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(()))
            .map_err(err)
    }
    async fn report_task_runner_heartbeat(&self, _: &str, _: &str, _: &str) -> Result<bool, ApiError> {
        Ok(false)
    }
    async fn describe_objects(&self, _p: &str, ids: &[String]) -> Result<Vec<PipelineObject>, ApiError> {
        self.record(Call::Describe(ids.to_vec()));
        Ok(self.objects.lock().unwrap().clone())
    }
}

struct Env {
    api: Arc<FakeApi>,
    ctx: WorkerContext,
    dir: tempfile::TempDir,
}

fn env(progress_interval: Duration) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let api = Arc::new(FakeApi::default());
    let ctx = WorkerContext {
        api: api.clone(),
        store: None,
        config: Arc::new(WorkerConfig {
            hostname: "host.test".into(),
            output_dir: dir.path().join("output"),
            state_dir: dir.path().join("state"),
            progress_interval,
            kill_grace: Duration::from_millis(500),
            keep_workdirs: KeepWorkdirs::Never,
            run_as: Ok(None),
        }),
        status: StatusBoard::new(StatusSnapshot::default()),
        hard_stop: CancellationToken::new(),
        give_up: CancellationToken::new(),
        precondition_slots: Arc::new(Semaphore::new(2)),
    };
    Env { api, ctx, dir }
}

fn task(fields: Vec<(&str, &str)>) -> TaskObject {
    let mut f: Vec<Field> = fields.into_iter().map(|(k, v)| Field::string(k, v)).collect();
    f.push(Field::reference("@componentParent", "Act"));
    let attempt = PipelineObject {
        id: "@Act_2026-01-01T00:00:00_Attempt=1".into(),
        name: "@Act_2026-01-01T00:00:00_Attempt=1".into(),
        fields: f,
    };
    TaskObject {
        task_id: "task-1".into(),
        pipeline_id: "df-TEST".into(),
        attempt_id: Some(attempt.id.clone()),
        objects: [(attempt.id.clone(), attempt)].into_iter().collect(),
    }
}

#[tokio::test(start_paused = true)]
async fn unsupported_activity_is_acked_then_failed_naming_the_type() {
    let e = env(Duration::from_secs(60));
    let h = run_task(&e.ctx, task(vec![("type", "EmrActivity")])).await;
    assert_eq!(h, Handled::Failed);
    assert_eq!(
        e.api.calls(),
        vec![
            Call::Progress(vec![]),
            Call::Status(TaskStatus::Failed, Some("UnsupportedActivity".into()))
        ]
    );
    let s = e.api.statuses.lock().unwrap()[0].clone();
    assert!(s.error_message.unwrap().contains("EmrActivity"));
    assert_eq!(e.ctx.status.snapshot().counters.failed, 1);
    assert!(e.ctx.status.snapshot().running.is_empty());
}

#[tokio::test(start_paused = true)]
async fn canceled_at_the_ack_sends_no_status() {
    let e = env(Duration::from_secs(60));
    e.api.progress.lock().unwrap().push_back(Ok(true));
    let h = run_task(
        &e.ctx,
        task(vec![("type", "ShellCommandActivity"), ("command", "true")]),
    )
    .await;
    assert_eq!(h, Handled::Canceled);
    assert_eq!(e.api.calls(), vec![Call::Progress(vec![])]);
}

#[tokio::test(start_paused = true)]
async fn an_ack_that_keeps_failing_leaves_the_task_to_the_service() {
    let e = env(Duration::from_secs(60));
    for _ in 0..100 {
        e.api
            .progress
            .lock()
            .unwrap()
            .push_back(Err(ApiErrorKind::Server(503)));
    }
    let start = tokio::time::Instant::now();
    let h = run_task(
        &e.ctx,
        task(vec![("type", "ShellCommandActivity"), ("command", "true")]),
    )
    .await;
    assert_eq!(h, Handled::Dropped);
    assert!(start.elapsed() <= ACK_DEADLINE, "{:?}", start.elapsed());
    assert!(e.api.calls().iter().all(|c| matches!(c, Call::Progress(_))));
    assert!(e.api.calls().len() > 3);
}

#[tokio::test(start_paused = true)]
async fn status_is_retried_with_backoff_until_the_service_answers() {
    let e = env(Duration::from_secs(60));
    {
        let mut s = e.api.status.lock().unwrap();
        s.push_back(Err(ApiErrorKind::Transport));
        s.push_back(Err(ApiErrorKind::Server(500)));
        s.push_back(Err(ApiErrorKind::Throttled));
        s.push_back(Err(ApiErrorKind::Client {
            status: 403,
            code: "AccessDenied".into(),
        }));
    }
    let report = failed("task-1", "X", "m".into(), None);
    let start = tokio::time::Instant::now();
    assert!(matches!(
        deliver_status(&e.ctx, &report).await,
        Delivery::Delivered
    ));
    assert_eq!(e.api.calls().len(), 5);
    // Waited between tries (1 + 2 + 4 + 8 s bases, jittered down to half).
    assert!(
        start.elapsed() >= Duration::from_millis(7500),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn status_for_a_task_the_service_forgot_is_dropped_after_one_try() {
    let e = env(Duration::from_secs(60));
    e.api
        .status
        .lock()
        .unwrap()
        .push_back(Err(ApiErrorKind::TaskNotFound));
    let report = failed("task-1", "X", "m".into(), None);
    assert!(matches!(deliver_status(&e.ctx, &report).await, Delivery::Gone));
    assert_eq!(e.api.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn give_up_ends_the_retries() {
    let e = env(Duration::from_secs(60));
    for _ in 0..1000 {
        e.api
            .status
            .lock()
            .unwrap()
            .push_back(Err(ApiErrorKind::Server(503)));
    }
    let g = e.ctx.give_up.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(600)).await;
        g.cancel();
    });
    let report = failed("task-1", "X", "m".into(), None);
    assert!(matches!(deliver_status(&e.ctx, &report).await, Delivery::GaveUp));
    // Capped at 60 s: about 600 s / (30..60 s) tries after the first quick ones.
    let n = e.api.calls().len();
    assert!((10..40).contains(&n), "{n} tries");
}

#[tokio::test(start_paused = true)]
async fn progress_ticker_reports_every_interval_and_cancels_on_request() {
    let e = env(Duration::from_secs(60));
    {
        let mut p = e.api.progress.lock().unwrap();
        p.push_back(Ok(false));
        p.push_back(Err(ApiErrorKind::Server(500)));
        p.push_back(Ok(true));
    }
    let cancel = CancellationToken::new();
    let (tx, rx) = watch::channel(vec![Field::string("currentRetryCount", "2")]);
    let start = tokio::time::Instant::now();
    let ticker = progress_ticker(&e.ctx, "task-1", cancel.clone(), rx);
    tokio::select! {
        never = ticker => match never {},
        _ = cancel.cancelled() => {}
    }
    drop(tx);
    let times = e.api.times();
    assert_eq!(times.len(), 3);
    for (i, t) in times.iter().enumerate() {
        assert_eq!(t.duration_since(start), Duration::from_secs(60 * (i as u64 + 1)));
    }
    assert_eq!(
        e.api.calls()[0],
        Call::Progress(vec![Field::string("currentRetryCount", "2")])
    );
}

#[tokio::test(start_paused = true)]
async fn missing_referenced_objects_are_fetched() {
    let e = env(Duration::from_secs(60));
    e.api.objects.lock().unwrap().push(PipelineObject {
        id: "In".into(),
        name: "In".into(),
        fields: vec![Field::string("type", "S3DataNode")],
    });
    let mut t = task(vec![
        ("type", "ShellCommandActivity"),
        ("command", "true"),
        ("stage", "true"),
    ]);
    t.objects
        .values_mut()
        .next()
        .unwrap()
        .fields
        .push(Field::reference("input", "In"));
    let h = run_task(&e.ctx, t).await;
    assert_eq!(h, Handled::Failed);
    assert_eq!(
        e.api.calls(),
        vec![
            Call::Progress(vec![]),
            Call::Describe(vec!["In".into()]),
            Call::Status(TaskStatus::Failed, Some("StagingNotSupported".into()))
        ]
    );
}

// Real processes from here on: real (short) time.

#[tokio::test]
async fn a_command_finishes_and_its_logs_are_in_the_attempt_directory() {
    let e = env(Duration::from_secs(60));
    let h = run_task(
        &e.ctx,
        task(vec![
            ("type", "ShellCommandActivity"),
            ("command", "echo \"$1-$2\"; mkdir made"),
            ("scriptArgument", "a"),
            ("scriptArgument", "b"),
        ]),
    )
    .await;
    assert_eq!(h, Handled::Finished);
    let rec = AttemptRecord::new(TaskIds {
        task_id: "task-1".into(),
        pipeline_id: "df-TEST".into(),
        attempt_id: "@Act_2026-01-01T00:00:00_Attempt=1".into(),
        component: "Act".into(),
        instance: "@Act_2026-01-01T00:00:00".into(),
        activity_type: "ShellCommandActivity".into(),
    });
    let log = rec.log_dir(&e.dir.path().join("output"));
    assert_eq!(std::fs::read_to_string(log.join("stdout")).unwrap(), "a-b\n");
    assert!(log.join("activity.log").exists());
    // keep-workdirs = never: the working directory is gone.
    assert!(!rec.work_dir(&e.dir.path().join("state")).exists());
}

#[tokio::test]
async fn a_failing_command_reports_its_status_and_stderr() {
    let e = env(Duration::from_secs(60));
    let h = run_task(
        &e.ctx,
        task(vec![
            ("type", "ShellCommandActivity"),
            ("command", "echo first >&2; echo 'no such table' >&2; exit 7"),
        ]),
    )
    .await;
    assert_eq!(h, Handled::Failed);
    let s = e.api.statuses.lock().unwrap()[0].clone();
    assert_eq!(s.error_id.as_deref(), Some("ShellCommandFailed"));
    let m = s.error_message.unwrap();
    assert!(m.contains("exit status 7") && m.contains("no such table"), "{m}");
}

#[tokio::test]
async fn cancel_during_the_run_kills_and_sends_no_status() {
    let e = env(Duration::from_millis(300));
    {
        let mut p = e.api.progress.lock().unwrap();
        p.push_back(Ok(false)); // the ack
        p.push_back(Ok(false));
        p.push_back(Ok(true));
    }
    let start = std::time::Instant::now();
    let h = run_task(
        &e.ctx,
        task(vec![("type", "ShellCommandActivity"), ("command", "sleep 600")]),
    )
    .await;
    assert_eq!(h, Handled::Canceled);
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(e.api.calls().iter().all(|c| matches!(c, Call::Progress(_))));
    assert_eq!(e.ctx.status.snapshot().counters.canceled, 1);
}

#[tokio::test]
async fn attempt_timeout_fails_the_task() {
    let e = env(Duration::from_secs(60));
    let h = run_task(
        &e.ctx,
        task(vec![
            ("type", "ShellCommandActivity"),
            ("command", "sleep 600"),
            ("attemptTimeout", "1 seconds"),
        ]),
    )
    .await;
    assert_eq!(h, Handled::Failed);
    let s = e.api.statuses.lock().unwrap()[0].clone();
    assert_eq!(s.error_id.as_deref(), Some("AttemptTimeout"));
}

#[tokio::test]
async fn hard_stop_reports_task_runner_shutdown() {
    let e = env(Duration::from_secs(60));
    let hs = e.ctx.hard_stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        hs.cancel();
    });
    let h = run_task(
        &e.ctx,
        task(vec![("type", "ShellCommandActivity"), ("command", "sleep 600")]),
    )
    .await;
    assert_eq!(h, Handled::Failed);
    let s = e.api.statuses.lock().unwrap()[0].clone();
    assert_eq!(s.error_id.as_deref(), Some("TaskRunnerShutdown"));
}

#[tokio::test]
async fn precondition_true_after_two_retries_finishes_and_reports_retry_count() {
    let e = env(Duration::from_millis(200));
    let flag = e.dir.path().join("counter");
    let cmd = format!(
        "n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}; [ $n -ge 3 ]",
        f = flag.display()
    );
    let h = run_task(
        &e.ctx,
        task(vec![
            ("type", "ShellCommandPrecondition"),
            ("command", &cmd),
            ("retryDelay", "1 seconds"),
            ("preconditionTimeout", "1 minutes"),
        ]),
    )
    .await;
    assert_eq!(h, Handled::Finished);
    assert_eq!(std::fs::read_to_string(&flag).unwrap().trim(), "3");
    let reported_counts: Vec<String> = e
        .api
        .calls()
        .iter()
        .filter_map(|c| match c {
            Call::Progress(f) => f
                .iter()
                .find(|f| f.key == "currentRetryCount")
                .and_then(|f| f.string_value.clone()),
            _ => None,
        })
        .collect();
    assert!(reported_counts.iter().any(|c| c != "0"), "{reported_counts:?}");
}

#[tokio::test]
async fn precondition_past_its_timeout_is_false() {
    let e = env(Duration::from_secs(60));
    let h = run_task(
        &e.ctx,
        task(vec![
            ("type", "ShellCommandPrecondition"),
            ("command", "false"),
            ("retryDelay", "1 seconds"),
            ("preconditionTimeout", "2 seconds"),
        ]),
    )
    .await;
    assert_eq!(h, Handled::False);
    let s = e.api.statuses.lock().unwrap()[0].clone();
    assert_eq!(s.status, TaskStatus::False);
    assert!(s.error_message.unwrap().contains("check(s)"));
}

#[test]
fn stack_trace_and_message_are_bounded() {
    let big = "é".repeat(5000);
    let r = failed("t", "X", big.clone(), Some(big));
    assert!(r.error_stack_trace.unwrap().chars().count() <= MAX_STACK_TRACE_CHARS);
    assert!(r.error_message.unwrap().chars().count() <= MAX_MESSAGE_CHARS);
}

#[test]
fn path_components_cannot_escape() {
    assert_eq!(path_component(".."), "_.._");
    assert_eq!(path_component("a/../b"), "a_.._b");
    assert_eq!(path_component(""), "__");
    assert_eq!(
        path_component("@Act_2026-01-01T00:00:00_Attempt=1"),
        "@Act_2026-01-01T00:00:00_Attempt=1"
    );
}
