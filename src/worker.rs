//! One attempt, end to end: acknowledge (ReportTaskProgress at once), fetch referenced objects
//! PollForTask left out (DescribeObjects), parse, run (with a progress ticker every
//! `progress_interval` that also listens for `canceled: true`), and report (SetTaskStatus, retried
//! until the service answers or says the task is gone).
//!
//! Everything the runner knows about one attempt lives in one [`AttemptRecord`]: its ids, phase,
//! pid, check count and the report to deliver. The record is the unit a later durable journal
//! writes (issue 9): every phase change goes through [`AttemptRecord::set_phase`].
//!
//! Reports: FINISHED; FAILED with a stable `errorId` ([`error_ids`]) and a message a person can
//! act on (exit status or signal, the last lines of stderr); FALSE for an unmet precondition; a
//! canceled task gets no status at all (the API says none is needed).
//!
//! Preconditions: a check process holds one of the precondition pool's permits only while it runs;
//! waiting out `retryDelay` holds nothing, so preconditions never take an activity slot.

use crate::activity::{self, Activity, OutputTarget, Program, ShellCommand, TaskError, TaskIds};
use crate::api::{ApiError, ApiErrorKind, PipelineApi, StatusReport};
use crate::config::{KeepWorkdirs, Settings};
use crate::daemon::StatusBoard;
use crate::model::{Field, TaskObject, TaskStatus};
use crate::poller::Backoff;
use crate::supervisor::{self, ExitKind, ObjectStore, RunAs, Spec, StopTokens, Stopped};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

/// The stable `errorId`s this runner reports. None starts with `Service_` (reserved).
pub mod error_ids {
    pub const SHELL_COMMAND_FAILED: &str = "ShellCommandFailed";
    pub const SHELL_COMMAND_KILLED: &str = "ShellCommandKilled";
    pub const ATTEMPT_TIMEOUT: &str = "AttemptTimeout";
    pub const TASK_RUNNER_SHUTDOWN: &str = "TaskRunnerShutdown";
    pub const TASK_SETUP_FAILED: &str = "TaskSetupFailed";
    pub const SCRIPT_DOWNLOAD_FAILED: &str = "ScriptDownloadFailed";
    pub const OUTPUT_UPLOAD_FAILED: &str = "OutputUploadFailed";
    pub const REFERENCED_OBJECT_UNAVAILABLE: &str = "ReferencedObjectUnavailable";
    pub const RUN_AS_ROOT_REFUSED: &str = "RunAsRootRefused";
    // From `activity::TaskError::error_id`: InvalidTask, UnsupportedActivity, StagingNotSupported.
}

/// `errorStackTrace` is a 1024-character `string` in the API model.
pub const MAX_STACK_TRACE_CHARS: usize = 1024;
/// How many trailing stderr lines go into `errorMessage`.
const STDERR_LINES_IN_MESSAGE: usize = 10;
/// `errorMessage` stays short enough for a console even when stderr is huge.
const MAX_MESSAGE_CHARS: usize = 2000;
/// The service reassigns a task not acknowledged within 2 minutes (API ReportTaskProgress): stop
/// trying to acknowledge well before, and leave the task to the next poller.
const ACK_DEADLINE: Duration = Duration::from_secs(90);

/// What a worker needs from the daemon. Built once; cheap to share.
#[derive(Clone)]
pub struct WorkerContext {
    pub api: Arc<dyn PipelineApi>,
    /// S3 for `scriptUri` and `s3://` stdout/stderr; `None` refuses those tasks with a message.
    pub store: Option<Arc<dyn ObjectStore>>,
    pub config: Arc<WorkerConfig>,
    pub status: StatusBoard,
    /// Cancelled when the drain ran out of time: running tasks are stopped and reported
    /// FAILED `TaskRunnerShutdown`.
    pub hard_stop: CancellationToken,
    /// Cancelled at the very end of a shutdown: stop retrying SetTaskStatus (and say so loudly).
    pub give_up: CancellationToken,
    /// The precondition pool: one permit per running precondition check.
    pub precondition_slots: Arc<Semaphore>,
}

/// The part of `Settings` a worker reads.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub hostname: String,
    pub output_dir: PathBuf,
    pub state_dir: PathBuf,
    pub progress_interval: Duration,
    pub kill_grace: Duration,
    pub keep_workdirs: KeepWorkdirs,
    /// Who tasks run as, or why they may not run at all (root without `allow-root`).
    pub run_as: Result<Option<RunAs>, String>,
}

impl WorkerConfig {
    pub fn from_settings(s: &Settings, hostname: String) -> Self {
        WorkerConfig {
            hostname,
            output_dir: s.output_dir.clone(),
            state_dir: s.state_dir.clone(),
            progress_interval: s.progress_interval,
            kill_grace: s.kill_grace,
            keep_workdirs: s.keep_workdirs,
            run_as: task_credentials(s),
        }
    }
}

/// Who a task runs as. Not root: as the daemon's own user. Root: as `Settings.user`; root itself
/// only with `allow_root`.
///
/// (A private helper until `privileges::task_credentials` lands; the daemon normally drops root
/// itself before any task runs.)
pub fn task_credentials(s: &Settings) -> Result<Option<RunAs>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match s.user.as_deref() {
        Some(name) if name != "root" => {
            let user = nix::unistd::User::from_name(name)
                .map_err(|e| format!("cannot look up user {name:?}: {e}"))?
                .ok_or_else(|| format!("user {name:?} (setting `user`) does not exist"))?;
            let gid = match s.group.as_deref() {
                Some(g) => {
                    nix::unistd::Group::from_name(g)
                        .map_err(|e| format!("cannot look up group {g:?}: {e}"))?
                        .ok_or_else(|| format!("group {g:?} (setting `group`) does not exist"))?
                        .gid
                }
                None => user.gid,
            };
            Ok(Some(RunAs {
                uid: user.uid.as_raw(),
                gid: gid.as_raw(),
                user: name.to_string(),
                home: user.dir,
            }))
        }
        _ if s.allow_root => Ok(None),
        _ => Err(
            "taskrunner runs as root and refuses to run tasks as root: set `user` to the account \
                  tasks should run as, or set `allow-root = true` if they really must run as root"
                .to_string(),
        ),
    }
}

/// Where one attempt is in its life. The journal (issue 9) records these transitions.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    Received,
    Acknowledged,
    Running {
        pid: Option<u32>,
    },
    /// A precondition between two checks.
    Waiting {
        next_check_at: SystemTime,
    },
    /// The outcome is known and is being delivered.
    Reporting(ReportSummary),
    Done(Handled),
}

/// What the report says, without the long texts.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportSummary {
    pub status: TaskStatus,
    pub error_id: Option<String>,
}

/// How a task left the runner; the daemon counts these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    Finished,
    Failed,
    False,
    /// Canceled by the service: no status sent.
    Canceled,
    /// Not acknowledged or the service said it is gone: left to the service.
    Dropped,
}

/// The per-task state: one struct per attempt, owned by its worker.
#[derive(Clone, Debug)]
pub struct AttemptRecord {
    pub ids: TaskIds,
    pub received_at: SystemTime,
    pub phase: Phase,
    /// Precondition checks run so far.
    pub checks: u32,
    pub report: Option<StatusReport>,
}

impl AttemptRecord {
    pub fn new(ids: TaskIds) -> Self {
        AttemptRecord {
            ids,
            received_at: SystemTime::now(),
            phase: Phase::Received,
            checks: 0,
            report: None,
        }
    }

    /// Every state change of an attempt goes through here (one place for a journal to hook).
    pub fn set_phase(&mut self, phase: Phase, status: &StatusBoard) {
        tracing::debug!(task_id = %self.ids.task_id, ?phase, "attempt phase");
        if let Phase::Running { pid } = &phase {
            status.set_pid(&self.ids.task_id, *pid);
        }
        self.phase = phase;
    }

    /// `<output>/tasks/<pipelineId>/<component>/<instance>/<attempt>/`
    pub fn log_dir(&self, output_dir: &Path) -> PathBuf {
        output_dir
            .join("tasks")
            .join(path_component(&self.ids.pipeline_id))
            .join(path_component(&self.ids.component))
            .join(path_component(&self.ids.instance))
            .join(path_component(&self.ids.attempt_id))
    }

    /// `<state>/work/<pipelineId>/<attempt>`: attempt ids are unique only within a pipeline (two
    /// pipelines with the same component scheduled in the same second have the same attempt id).
    pub fn work_dir(&self, state_dir: &Path) -> PathBuf {
        state_dir
            .join("work")
            .join(path_component(&self.ids.pipeline_id))
            .join(path_component(&self.ids.attempt_id))
    }
}

/// One path component from an id the service sent: never empty, `.`, `..` or containing `/`.
pub fn path_component(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c == '/' || c == '\0' || c == '\\' {
                '_'
            } else {
                c
            }
        })
        .take(200)
        .collect();
    match s.as_str() {
        "" | "." | ".." => format!("_{s}_"),
        _ => s,
    }
}

/// Runs one task to the end and says how it left.
pub async fn run_task(ctx: &WorkerContext, task: TaskObject) -> Handled {
    let ids = activity::task_ids(&task);
    let span = tracing::info_span!("task", task_id = %ids.task_id, pipeline_id = %ids.pipeline_id,
        attempt_id = %ids.attempt_id, activity_type = %ids.activity_type);
    let mut rec = AttemptRecord::new(ids);
    ctx.status.task_started(&rec.ids);
    let handled = tracing::Instrument::instrument(run_inner(ctx, task, &mut rec), span).await;
    rec.set_phase(Phase::Done(handled), &ctx.status);
    ctx.status.task_ended(&rec.ids.task_id, handled);
    handled
}

async fn run_inner(ctx: &WorkerContext, task: TaskObject, rec: &mut AttemptRecord) -> Handled {
    tracing::info!(component = %rec.ids.component, "task received");
    match acknowledge(ctx, &rec.ids.task_id).await {
        Ack::Ok => rec.set_phase(Phase::Acknowledged, &ctx.status),
        Ack::Canceled => {
            tracing::info!("the service canceled the task before it started");
            return Handled::Canceled;
        }
        Ack::Dropped => return Handled::Dropped,
    }

    let report = match complete_objects(ctx, task).await {
        Err(report) => Some(report),
        Ok(task) => match activity::parse(&task) {
            Err(e) => Some(failed_from_task_error(&rec.ids.task_id, &e)),
            Ok(activity) => execute(ctx, rec, activity).await,
        },
    };
    let Some(report) = report else {
        tracing::info!("task canceled by the service; no status is sent");
        return Handled::Canceled;
    };
    let handled = match report.status {
        TaskStatus::Finished => Handled::Finished,
        TaskStatus::Failed => Handled::Failed,
        TaskStatus::False => Handled::False,
    };
    rec.set_phase(
        Phase::Reporting(ReportSummary {
            status: report.status,
            error_id: report.error_id.clone(),
        }),
        &ctx.status,
    );
    rec.report = Some(report.clone());
    match deliver_status(ctx, &report).await {
        Delivery::Delivered => {
            tracing::info!(status = report.status.as_str(), error_id = ?report.error_id, "status delivered");
            handled
        }
        Delivery::Gone => Handled::Dropped,
        Delivery::GaveUp => handled,
    }
}

enum Ack {
    Ok,
    Canceled,
    Dropped,
}

async fn acknowledge(ctx: &WorkerContext, task_id: &str) -> Ack {
    let deadline = tokio::time::Instant::now() + ACK_DEADLINE;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(20));
    loop {
        match ctx.api.report_task_progress(task_id, &[]).await {
            Ok(false) => return Ack::Ok,
            Ok(true) => return Ack::Canceled,
            Err(e) if gone(&e) => {
                tracing::info!(error = %e, "the service no longer has this task; dropping it");
                return Ack::Dropped;
            }
            Err(e) => {
                let wait = backoff.next_delay();
                if tokio::time::Instant::now() + wait > deadline {
                    tracing::warn!(error = %e, "could not acknowledge the task in time; \
                        leaving it to the service to hand out again");
                    return Ack::Dropped;
                }
                tracing::warn!(error = %e, retry_in = ?wait, "acknowledging the task failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

fn gone(e: &ApiError) -> bool {
    matches!(e.kind, ApiErrorKind::TaskNotFound | ApiErrorKind::PipelineGone)
}

/// Adds referenced objects the activity needs that PollForTask did not carry.
async fn complete_objects(ctx: &WorkerContext, mut task: TaskObject) -> Result<TaskObject, StatusReport> {
    let missing = activity::missing_references(&task);
    if missing.is_empty() {
        return Ok(task);
    }
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    for attempt in 1..=5 {
        match ctx.api.describe_objects(&task.pipeline_id, &missing).await {
            Ok(objects) => {
                for o in objects {
                    task.objects.insert(o.id.clone(), o);
                }
                return Ok(task);
            }
            Err(e) if e.is_retryable() && attempt < 5 => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                return Err(failed(
                    &task.task_id,
                    error_ids::REFERENCED_OBJECT_UNAVAILABLE,
                    format!(
                        "the task references {missing:?}, which PollForTask did not include, and \
                         DescribeObjects failed: {e}. The runner's IAM policy needs \
                         datapipeline:DescribeObjects"
                    ),
                    None,
                ))
            }
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// Runs the activity with the progress ticker beside it. `None`: canceled by the service.
async fn execute(ctx: &WorkerContext, rec: &mut AttemptRecord, activity: Activity) -> Option<StatusReport> {
    let stop = StopTokens {
        cancel: CancellationToken::new(),
        shutdown: ctx.hard_stop.child_token(),
    };
    let (fields_tx, fields_rx) = watch::channel(Vec::<Field>::new());
    let task_id = rec.ids.task_id.clone();
    let ticker = progress_ticker(ctx, &task_id, stop.cancel.clone(), fields_rx);
    let work = async {
        match activity {
            Activity::ShellCommand(shell) => run_shell(ctx, rec, &shell, &stop, false).await,
            Activity::ShellCommandPrecondition {
                shell,
                retry_delay,
                precondition_timeout,
            } => {
                run_precondition(
                    ctx,
                    rec,
                    &shell,
                    retry_delay,
                    precondition_timeout,
                    &stop,
                    &fields_tx,
                )
                .await
            }
        }
    };
    tokio::select! {
        r = work => r,
        never = ticker => match never {},
    }
}

/// ReportTaskProgress every `progress_interval` (the first ack was already sent). On
/// `canceled: true` (or the service no longer knowing the task) it cancels the work.
async fn progress_ticker(
    ctx: &WorkerContext,
    task_id: &str,
    cancel: CancellationToken,
    fields: watch::Receiver<Vec<Field>>,
) -> std::convert::Infallible {
    let mut interval = tokio::time::interval_at(
        tokio::time::Instant::now() + ctx.config.progress_interval,
        ctx.config.progress_interval,
    );
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let f = fields.borrow().clone();
        match ctx.api.report_task_progress(task_id, &f).await {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!("the service canceled the task; stopping it");
                cancel.cancel();
            }
            Err(e) if gone(&e) => {
                tracing::warn!(error = %e, "the service no longer has this task; stopping it");
                cancel.cancel();
            }
            Err(e) => tracing::warn!(error = %e, "progress report failed; trying again next period"),
        }
    }
}

/// One run of a shell command (an activity, or one precondition check). `None`: canceled.
async fn run_shell(
    ctx: &WorkerContext,
    rec: &mut AttemptRecord,
    shell: &ShellCommand,
    stop: &StopTokens,
    append: bool,
) -> Option<StatusReport> {
    let task_id = rec.ids.task_id.clone();
    let run_as = match &ctx.config.run_as {
        Ok(r) => r.clone(),
        Err(why) => {
            return Some(failed(
                &task_id,
                error_ids::RUN_AS_ROOT_REFUSED,
                why.clone(),
                None,
            ))
        }
    };
    let work = rec.work_dir(&ctx.config.state_dir);
    let log_dir = rec.log_dir(&ctx.config.output_dir);
    if !append || !work.exists() {
        if let Err(e) = make_workdir(&work, run_as.as_ref()) {
            return Some(failed(
                &task_id,
                error_ids::TASK_SETUP_FAILED,
                format!("cannot create the working directory {}: {e}", work.display()),
                None,
            ));
        }
    }
    let (program, args, display) = match &shell.program {
        Program::Command(c) => {
            let (p, a) = supervisor::shell_invocation(c, &rec.ids.component, &shell.args);
            (p, a, c.clone())
        }
        Program::ScriptUri(uri) => {
            let Some(store) = &ctx.store else {
                return Some(failed(
                    &task_id,
                    error_ids::SCRIPT_DOWNLOAD_FAILED,
                    format!("cannot download scriptUri {uri}: no S3 client is configured"),
                    None,
                ));
            };
            let dest = work.join(script_file_name(uri));
            if let Err(e) = store.download(uri, &dest).await {
                return Some(failed(
                    &task_id,
                    error_ids::SCRIPT_DOWNLOAD_FAILED,
                    format!("cannot download scriptUri {uri}: {e:#}"),
                    None,
                ));
            }
            if let Err(e) = make_executable(&dest, run_as.as_ref()) {
                return Some(failed(
                    &task_id,
                    error_ids::TASK_SETUP_FAILED,
                    format!("cannot make {} executable: {e}", dest.display()),
                    None,
                ));
            }
            (dest, shell.args.clone(), uri.to_string())
        }
    };
    let local = |t: &Option<OutputTarget>| match t {
        Some(OutputTarget::Local(p)) => Some(p.clone()),
        _ => None,
    };
    let spec = Spec {
        program,
        args,
        display,
        workdir: work.clone(),
        log_dir: log_dir.clone(),
        stdout_copy: local(&shell.stdout),
        stderr_copy: local(&shell.stderr),
        timeout: shell.attempt_timeout,
        kill_grace: ctx.config.kill_grace,
        run_as,
        append,
    };
    rec.set_phase(Phase::Running { pid: None }, &ctx.status);
    let status = ctx.status.clone();
    let tid = task_id.clone();
    let result = supervisor::run(&spec, stop, move |pid| status.set_pid(&tid, Some(pid))).await;
    let mut report = match result {
        Err(e) => failed(&task_id, error_ids::TASK_SETUP_FAILED, e.to_string(), None),
        Ok(o) => {
            tracing::info!(exit = %o.exit, stopped = ?o.stopped, elapsed = ?o.elapsed,
                stdout_bytes = o.stdout_bytes, stderr_bytes = o.stderr_bytes, "process ended");
            match outcome_report(&task_id, &o, &ctx.config.hostname) {
                None => {
                    cleanup_workdir(&work, ctx.config.keep_workdirs, false);
                    return None;
                }
                Some(r) => r,
            }
        }
    };
    // s3:// stdout/stderr: uploaded when the task ends.
    for (target, name) in [(&shell.stdout, "stdout"), (&shell.stderr, "stderr")] {
        if let Some(OutputTarget::S3(uri)) = target {
            let r = match &ctx.store {
                Some(store) => store.upload(&log_dir.join(name), uri).await,
                None => Err(anyhow::anyhow!("no S3 client is configured")),
            };
            if let Err(e) = r {
                tracing::warn!(error = %format!("{e:#}"), %uri, "uploading {name} failed");
                if report.status == TaskStatus::Finished {
                    report = failed(
                        &task_id,
                        error_ids::OUTPUT_UPLOAD_FAILED,
                        format!("the command succeeded but its {name} could not be uploaded to {uri}: {e:#}"),
                        None,
                    );
                }
            }
        }
    }
    if !append {
        cleanup_workdir(
            &work,
            ctx.config.keep_workdirs,
            report.status == TaskStatus::Finished,
        );
    }
    Some(report)
}

/// Re-checks every `retry_delay` until the check passes (FINISHED) or `precondition_timeout` since
/// the first check has passed (FALSE).
async fn run_precondition(
    ctx: &WorkerContext,
    rec: &mut AttemptRecord,
    shell: &ShellCommand,
    retry_delay: Duration,
    precondition_timeout: Option<Duration>,
    stop: &StopTokens,
    fields: &watch::Sender<Vec<Field>>,
) -> Option<StatusReport> {
    let first = tokio::time::Instant::now();
    let task_id = rec.ids.task_id.clone();
    let work = rec.work_dir(&ctx.config.state_dir);
    let result = loop {
        // A check runs only with a precondition-pool permit; waiting holds none.
        let permit = tokio::select! {
            p = ctx.precondition_slots.clone().acquire_owned() => p.expect("the pool is never closed"),
            _ = stop.cancel.cancelled() => break None,
            _ = stop.shutdown.cancelled() => break Some(shutdown_report(&task_id, &ctx.config.hostname)),
        };
        let _ = fields.send(vec![
            Field::string("currentRetryCount", rec.checks.to_string()),
            Field::string(
                "lastRetryTime",
                chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string(),
            ),
        ]);
        let append = rec.checks > 0;
        let report = run_shell(ctx, rec, shell, stop, append).await;
        rec.checks += 1;
        drop(permit);
        let Some(report) = report else { break None };
        if report.status == TaskStatus::Finished || report_is_final(&report) {
            break Some(report);
        }
        let Some(limit) = precondition_timeout else {
            break Some(false_report(&task_id, rec.checks, first.elapsed(), &report));
        };
        if first.elapsed() + retry_delay > limit {
            break Some(false_report(&task_id, rec.checks, first.elapsed(), &report));
        }
        let next = SystemTime::now() + retry_delay;
        rec.set_phase(Phase::Waiting { next_check_at: next }, &ctx.status);
        tracing::info!(checks = rec.checks, retry_in = ?retry_delay, "precondition not met yet");
        tokio::select! {
            _ = tokio::time::sleep(retry_delay) => {}
            _ = stop.cancel.cancelled() => break None,
            _ = stop.shutdown.cancelled() => break Some(shutdown_report(&task_id, &ctx.config.hostname)),
        }
    };
    cleanup_workdir(
        &work,
        ctx.config.keep_workdirs,
        result.as_ref().is_some_and(|r| r.status == TaskStatus::Finished),
    );
    result
}

/// A check failure that is not "the command said no": it ends the precondition at once.
fn report_is_final(r: &StatusReport) -> bool {
    !matches!(
        r.error_id.as_deref(),
        Some(error_ids::SHELL_COMMAND_FAILED) | Some(error_ids::SHELL_COMMAND_KILLED)
    )
}

fn false_report(task_id: &str, checks: u32, elapsed: Duration, last: &StatusReport) -> StatusReport {
    StatusReport {
        task_id: task_id.to_string(),
        status: TaskStatus::False,
        error_id: None,
        error_message: Some(format!(
            "precondition not met after {checks} check(s) over {}s; last check: {}",
            elapsed.as_secs(),
            last.error_message.as_deref().unwrap_or("failed")
        )),
        error_stack_trace: None,
    }
}

fn shutdown_report(task_id: &str, hostname: &str) -> StatusReport {
    failed(
        task_id,
        error_ids::TASK_RUNNER_SHUTDOWN,
        format!(
            "the task runner on {hostname} was shut down and the drain timeout ran out while the task \
             was running; its processes were stopped. The service may retry the task"
        ),
        None,
    )
}

/// The report for a finished process. `None`: canceled by the service.
pub fn outcome_report(task_id: &str, o: &supervisor::Outcome, hostname: &str) -> Option<StatusReport> {
    let tail = last_lines(&o.stderr_tail, STDERR_LINES_IN_MESSAGE);
    let with_tail = |head: String| {
        if tail.is_empty() {
            format!("{head} (stderr was empty)")
        } else {
            format!("{head}; last lines of stderr:\n{tail}")
        }
    };
    let stack = (!o.stderr_tail.is_empty()).then(|| o.stderr_tail.clone());
    match o.stopped {
        Some(Stopped::Canceled) => None,
        Some(Stopped::Shutdown) => Some(shutdown_report(task_id, hostname)),
        Some(Stopped::Timeout(t)) => Some(failed(
            task_id,
            error_ids::ATTEMPT_TIMEOUT,
            with_tail(format!(
                "the command ran longer than attemptTimeout ({}s) and was stopped ({})",
                t.as_secs(),
                o.exit
            )),
            stack,
        )),
        None => match o.exit {
            ExitKind::Code(0) => Some(StatusReport {
                task_id: task_id.to_string(),
                status: TaskStatus::Finished,
                error_id: None,
                error_message: None,
                error_stack_trace: None,
            }),
            ExitKind::Code(c) => Some(failed(
                task_id,
                error_ids::SHELL_COMMAND_FAILED,
                with_tail(format!("the command failed with exit status {c}")),
                stack,
            )),
            ExitKind::Signal(_) => Some(failed(
                task_id,
                error_ids::SHELL_COMMAND_KILLED,
                with_tail(format!("the command was {}", o.exit)),
                stack,
            )),
        },
    }
}

fn failed_from_task_error(task_id: &str, e: &TaskError) -> StatusReport {
    tracing::warn!(error = %e, "task cannot run");
    failed(task_id, e.error_id(), e.to_string(), None)
}

/// A FAILED report, with the API's limits applied.
pub fn failed(task_id: &str, error_id: &str, message: String, stack: Option<String>) -> StatusReport {
    debug_assert!(!error_id.starts_with("Service_"));
    StatusReport {
        task_id: task_id.to_string(),
        status: TaskStatus::Failed,
        error_id: Some(error_id.to_string()),
        error_message: Some(truncate_chars(&message, MAX_MESSAGE_CHARS, true)),
        error_stack_trace: stack.map(|s| truncate_chars(&s, MAX_STACK_TRACE_CHARS, false)),
    }
}

/// At most `max` characters: the head of `s` (`keep_head`) or its tail.
pub fn truncate_chars(s: &str, max: usize, keep_head: bool) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_string();
    }
    if keep_head {
        s.chars().take(max - 1).chain(std::iter::once('…')).collect()
    } else {
        std::iter::once('…')
            .chain(s.chars().skip(n - (max - 1)))
            .collect()
    }
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.trim_end().lines().collect();
    let start = lines.len().saturating_sub(n);
    let out = lines[start..].join("\n");
    // One 4 KiB line with no newline is still one line: cut it.
    truncate_chars(&out, MAX_MESSAGE_CHARS - 200, false)
}

enum Delivery {
    Delivered,
    Gone,
    GaveUp,
}

/// SetTaskStatus until the service answers, says the task is gone, or the daemon gives up at the
/// very end of a shutdown. Every failure is logged; nothing is dropped silently.
async fn deliver_status(ctx: &WorkerContext, report: &StatusReport) -> Delivery {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut tries = 0u32;
    loop {
        tries += 1;
        let err = match ctx.api.set_task_status(report).await {
            Ok(()) => return Delivery::Delivered,
            Err(e) if gone(&e) => {
                tracing::warn!(error = %e, status = report.status.as_str(),
                    "the service no longer has this task; its status is dropped");
                return Delivery::Gone;
            }
            Err(e) => e,
        };
        let wait = backoff.next_delay();
        if err.is_retryable() {
            tracing::warn!(error = %err, tries, retry_in = ?wait, "SetTaskStatus failed; will retry");
        } else {
            tracing::error!(error = %err, tries, retry_in = ?wait, "SetTaskStatus refused; will retry");
        }
        ctx.status
            .set_backoff(format!("delivering a task status: {err}"), wait, tries);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.give_up.cancelled() => {
                tracing::error!(status = report.status.as_str(), error_id = ?report.error_id, tries,
                    "shutting down with this task's status undelivered; the service will time the attempt out");
                return Delivery::GaveUp;
            }
        }
        ctx.status.clear_backoff();
    }
}

fn make_workdir(dir: &Path, run_as: Option<&RunAs>) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some(r) = run_as {
        std::os::unix::fs::chown(dir, Some(r.uid), Some(r.gid))?;
    }
    Ok(())
}

fn make_executable(file: &Path, run_as: Option<&RunAs>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o700))?;
    if let Some(r) = run_as {
        std::os::unix::fs::chown(file, Some(r.uid), Some(r.gid))?;
    }
    Ok(())
}

fn script_file_name(uri: &crate::config::S3Uri) -> String {
    let base = uri.prefix.rsplit('/').next().unwrap_or("");
    let base = path_component(base);
    if base.starts_with('_') && base.ends_with('_') || base.is_empty() {
        "script".to_string()
    } else {
        base
    }
}

/// The working-directory policy (`keep-workdirs`): `never` removes it, `on-failure` keeps it when
/// the attempt did not finish, `always` keeps it.
fn cleanup_workdir(dir: &Path, policy: KeepWorkdirs, finished: bool) {
    let remove = match policy {
        KeepWorkdirs::Never => true,
        KeepWorkdirs::OnFailure => finished,
        KeepWorkdirs::Always => false,
    };
    if remove {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the working directory");
            }
        }
    }
}

#[cfg(test)]
mod tests;
