//! The composition root of the `taskrunner` daemon: settings -> logging -> hooks -> pollers and the
//! precondition pool -> heartbeat -> wait -> drain -> exit code.
//!
//! Slots. `--tasks N` pollers each hold at most one outstanding PollForTask and run the activity
//! they receive before polling again: N activities at most. The service hands out activities and
//! preconditions through the same PollForTask for a worker group, so a poller that receives a
//! precondition hands it to the precondition pool and polls again at once. A precondition *check*
//! (its process) needs one of `precondition_tasks` permits (the guide's two precondition threads);
//! waiting out `retryDelay` holds no permit and no activity slot.
//!
//! Drain (SIGTERM/SIGINT, `terminate: true` on a heartbeat, exit-after-N-tasks, exit-after-idle):
//! stop polling at once (an in-flight long poll is dropped: the service hands an unacknowledged
//! task out again), let running tasks go on for up to `drain_timeout` with their progress reports
//! flowing, then stop the rest (TERM, `kill_grace`, KILL) and report them FAILED
//! `TaskRunnerShutdown`. A second SIGTERM/SIGINT skips the wait. Exit 0.
//!
//! Hook points for the service side ([`Hooks`]): READY, the status channel (STATUS=, control
//! socket), drain/resume commands (control socket), SIGHUP reload, log level changes.

use crate::api::{PipelineApi, PollRequest};
use crate::config::Settings;
use crate::poller::{self, Backoff, PollerContext, TaskBudget};
use crate::status::{Backoff as StatusBackoff, RunningTask, StatusSnapshot};
use crate::supervisor::ObjectStore;
use crate::worker::{Handled, WorkerConfig, WorkerContext};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// After the drain stopped the remaining tasks: how long their FAILED reports may take.
const REPORT_AFTER_STOP: Duration = Duration::from_secs(30);
/// How often the daemon checks its exit-after conditions and refreshes the status.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(1);
/// Heartbeat retry after a failure (the regular period is `heartbeat_interval`).
const HEARTBEAT_RETRY_MAX: Duration = Duration::from_secs(60);

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The status, published on a `watch` channel: the one piece of shared mutable state. Workers and
/// pollers update it; sd_notify's STATUS= and the control socket read it.
#[derive(Clone)]
pub struct StatusBoard {
    tx: Arc<watch::Sender<StatusSnapshot>>,
    last_activity: Arc<Mutex<tokio::time::Instant>>,
}

impl StatusBoard {
    pub fn new(initial: StatusSnapshot) -> Self {
        StatusBoard {
            tx: Arc::new(watch::channel(initial).0),
            last_activity: Arc::new(Mutex::new(tokio::time::Instant::now())),
        }
    }
    pub fn subscribe(&self) -> watch::Receiver<StatusSnapshot> {
        self.tx.subscribe()
    }
    pub fn snapshot(&self) -> StatusSnapshot {
        self.tx.borrow().clone()
    }
    fn touch(&self) {
        *self.last_activity.lock().expect("not poisoned") = tokio::time::Instant::now();
    }
    /// Time since a task was last received or ended.
    pub fn idle_for(&self) -> Duration {
        self.last_activity.lock().expect("not poisoned").elapsed()
    }
    pub fn set_state(&self, state: &str) {
        self.tx.send_if_modified(|s| {
            let changed = s.state != state;
            s.state = state.to_string();
            changed
        });
    }
    pub fn set_slots(&self, slots: usize) {
        self.tx.send_modify(|s| s.slots = slots);
    }
    pub fn task_started(&self, ids: &crate::activity::TaskIds) {
        self.touch();
        self.tx.send_modify(|s| {
            s.running.push(RunningTask {
                task_id: ids.task_id.clone(),
                attempt_id: ids.attempt_id.clone(),
                pipeline_id: ids.pipeline_id.clone(),
                activity_type: ids.activity_type.clone(),
                pid: None,
                started_at: unix_now(),
            })
        });
    }
    pub fn set_pid(&self, task_id: &str, pid: Option<u32>) {
        self.tx.send_modify(|s| {
            if let Some(t) = s.running.iter_mut().find(|t| t.task_id == task_id) {
                t.pid = pid;
            }
        });
    }
    pub fn task_ended(&self, task_id: &str, handled: Handled) {
        self.touch();
        self.tx.send_modify(|s| {
            s.running.retain(|t| t.task_id != task_id);
            match handled {
                Handled::Finished => s.counters.finished += 1,
                Handled::Failed => s.counters.failed += 1,
                Handled::False => s.counters.r#false += 1,
                Handled::Canceled => s.counters.canceled += 1,
                Handled::Dropped => {}
            }
        });
    }
    pub fn running(&self) -> usize {
        self.tx.borrow().running.len()
    }
    pub fn poll_ok(&self) {
        self.tx.send_modify(|s| {
            s.last_poll_ok = Some(unix_now());
            s.backoff = None;
        });
    }
    pub fn heartbeat_ok(&self) {
        self.tx.send_modify(|s| s.last_heartbeat_ok = Some(unix_now()));
    }
    pub fn set_backoff(&self, reason: String, wait: Duration, attempt: u32) {
        self.tx.send_modify(|s| {
            s.backoff = Some(StatusBackoff {
                reason,
                next_try_at: unix_now() + wait.as_secs() as i64,
                attempt,
            })
        });
    }
    pub fn clear_backoff(&self) {
        self.tx.send_if_modified(|s| s.backoff.take().is_some());
    }
}

/// Commands from the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlCommand {
    /// Stop taking tasks (running ones go on); the process stays up.
    Drain,
    /// Take tasks again.
    Resume,
}

/// SIGHUP: load the settings again from the running ones (`config::reload`).
pub type ReloadFn = Box<dyn Fn(&Settings) -> Result<Settings, String> + Send + Sync>;

/// Where the service side plugs in. Everything is optional: `taskrunner` started by hand or in a
/// test runs without any of it.
#[derive(Default)]
pub struct Hooks {
    /// Called once the loops run (sd_notify READY=1).
    pub ready: Option<Box<dyn FnOnce(&StatusBoard) + Send>>,
    /// Called when a drain begins (sd_notify STOPPING=1).
    pub stopping: Option<Box<dyn FnOnce() + Send>>,
    /// Drain/resume from the control socket.
    pub control: Option<mpsc::Receiver<ControlCommand>>,
    /// SIGHUP: load the settings again (the config helper's `config::reload`). `Err` keeps the
    /// old settings; the message says why.
    pub reload: Option<ReloadFn>,
    /// Applies a new log level (the logging layer's reload handle), and reopens log files.
    pub set_log_level: Option<Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>>,
}

/// Why the daemon drains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DrainReason {
    Signal,
    Terminate,
    ExitAfterTasks,
    ExitAfterIdle,
}

/// The taskrunner id: `--taskrunnerId`, else the one persisted in `state_dir/taskrunner-id`, else a
/// new one written there (so that restarts keep it).
pub fn taskrunner_id(settings: &Settings) -> std::io::Result<String> {
    if let Some(id) = &settings.taskrunner_id {
        return Ok(id.clone());
    }
    let path = settings.state_dir.join("taskrunner-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = format!("tr-{}", uuid::Uuid::new_v4());
    std::fs::create_dir_all(&settings.state_dir)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// A description of where the credentials come from; never the secret.
pub fn credential_source(settings: &Settings) -> String {
    use crate::credentials::CredentialSource;
    match &settings.credentials {
        CredentialSource::CommandLine(k) => {
            format!(
                "--accessId/--secretKey on the command line (access key {})",
                k.access_key_id
            )
        }
        CredentialSource::File { path, keys } => {
            format!(
                "credentials file {} (access key {})",
                path.display(),
                keys.access_key_id
            )
        }
        CredentialSource::DefaultChain => {
            "the AWS default chain (environment, profile, instance role)".into()
        }
    }
}

/// Initial directories: `output/logs`, `output/tasks`, `state`. Prints `Logging to <dir>` as the jar does.
pub fn prepare_directories(settings: &Settings) -> std::io::Result<PathBuf> {
    let logs = settings.output_dir.join("logs");
    for d in [&logs, &settings.output_dir.join("tasks"), &settings.state_dir] {
        std::fs::create_dir_all(d)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
    }
    Ok(logs)
}

/// Runs the daemon until it has drained. Returns the exit code.
pub async fn run(
    settings: Settings,
    api: Arc<dyn PipelineApi>,
    store: Option<Arc<dyn ObjectStore>>,
    mut hooks: Hooks,
) -> i32 {
    let logs = match prepare_directories(&settings) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot create the runner's directories");
            return crate::exit::FAILURE;
        }
    };
    println!("Logging to {}", absolute(&logs).display());
    let host = hostname();
    let id = match taskrunner_id(&settings) {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, state_dir = %settings.state_dir.display(), "cannot read or write the taskrunner id");
            return crate::exit::FAILURE;
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        worker_group = %settings.worker_group,
        endpoint = %settings.endpoint,
        region = %settings.region,
        taskrunner_id = %id,
        credentials = %credential_source(&settings),
        tasks = settings.tasks.get(),
        precondition_tasks = settings.precondition_tasks.get(),
        "taskrunner {} starting",
        env!("CARGO_PKG_VERSION")
    );
    for w in &settings.warnings {
        tracing::warn!("{w}");
    }
    let worker_config = WorkerConfig::from_settings(&settings, host.clone());
    if let Err(why) = &worker_config.run_as {
        tracing::warn!("{why}");
    } else if nix::unistd::geteuid().is_root() && worker_config.run_as.as_ref().is_ok_and(|r| r.is_none()) {
        tracing::warn!("allow-root is set: tasks run as root");
    }

    let status = StatusBoard::new(StatusSnapshot {
        state: "starting".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        instance: settings.instance.clone(),
        worker_group: settings.worker_group.clone(),
        endpoint: settings.endpoint.clone(),
        region: settings.region.clone(),
        pid: std::process::id(),
        started_at: unix_now(),
        slots: settings.tasks.get(),
        disk_budget_bytes: settings.disk_budget_bytes,
        config_source: settings
            .settings_files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        ..Default::default()
    });

    // Signals first, so that a TERM right after start is not lost.
    let (mut sigterm, mut sigint, mut sighup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            tracing::error!("cannot install signal handlers");
            return crate::exit::FAILURE;
        }
    };

    let instance_identity = crate::api::imds::Imds::from_env().instance_identity().await;
    tracing::info!(on_ec2 = instance_identity.is_some(), "instance identity checked");

    let stop_polling = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let give_up = CancellationToken::new();
    let (paused_tx, paused_rx) = watch::channel(false);
    let (wanted_tx, wanted_rx) = watch::channel(settings.tasks.get());
    let budget = Arc::new(TaskBudget::new(settings.exit_after_tasks));
    let preconditions = TaskTracker::new();
    let worker = WorkerContext {
        api: api.clone(),
        store,
        config: Arc::new(worker_config),
        status: status.clone(),
        hard_stop: hard_stop.clone(),
        give_up: give_up.clone(),
        precondition_slots: Arc::new(Semaphore::new(settings.precondition_tasks.get())),
    };
    let poller_ctx = PollerContext {
        worker,
        request: PollRequest {
            worker_group: settings.worker_group.clone(),
            hostname: host.clone(),
            // On EC2 the signed identity document (checked once, short timeout); elsewhere none.
            instance_identity,
        },
        stop: stop_polling.clone(),
        paused: paused_rx,
        wanted: wanted_rx,
        budget: budget.clone(),
        preconditions: preconditions.clone(),
    };
    let mut pollers: HashMap<usize, JoinHandle<()>> = HashMap::new();
    spawn_pollers(&mut pollers, &poller_ctx, settings.tasks.get());

    let (terminate_tx, mut terminate_rx) = mpsc::channel::<()>(1);
    let heartbeat = tokio::spawn(heartbeat_loop(
        api.clone(),
        id.clone(),
        settings.worker_group.clone(),
        host.clone(),
        settings.heartbeat_interval,
        status.clone(),
        terminate_tx,
    ));

    status.set_state("polling");
    if let Some(ready) = hooks.ready.take() {
        ready(&status);
    }

    let mut drain_timeout = settings.drain_timeout;
    let mut current = settings;
    let mut control = hooks.control.take();
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_PERIOD);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    enum Event {
        Drain(DrainReason),
        Reload,
        Control(Option<ControlCommand>),
        Tick,
    }
    let reason = loop {
        let event = tokio::select! {
            _ = sigterm.recv() => Event::Drain(DrainReason::Signal),
            _ = sigint.recv() => Event::Drain(DrainReason::Signal),
            _ = sighup.recv() => Event::Reload,
            Some(()) = terminate_rx.recv() => Event::Drain(DrainReason::Terminate),
            c = recv_control(&mut control) => Event::Control(c),
            _ = housekeeping.tick() => Event::Tick,
        };
        match event {
            Event::Drain(r) => break r,
            Event::Reload => {
                let Some(reload) = &hooks.reload else {
                    tracing::info!("SIGHUP: no reloadable configuration; nothing to do");
                    continue;
                };
                match reload(&current) {
                    Err(why) => tracing::error!(
                        "SIGHUP: the new configuration is not valid, keeping the old one: {why}"
                    ),
                    Ok(new) => {
                        apply_reload(&current, &new, &hooks, &wanted_tx, &status);
                        drain_timeout = new.drain_timeout;
                        spawn_pollers(&mut pollers, &poller_ctx, new.tasks.get());
                        current = new;
                    }
                }
            }
            Event::Control(Some(ControlCommand::Drain)) => {
                tracing::info!("drain requested over the control socket: not taking new tasks");
                let _ = paused_tx.send(true);
                status.set_state("paused");
            }
            Event::Control(Some(ControlCommand::Resume)) => {
                tracing::info!("resume requested over the control socket: taking tasks again");
                let _ = paused_tx.send(false);
                status.set_state("polling");
            }
            Event::Control(None) => control = None,
            Event::Tick => {
                pollers.retain(|_, h| !h.is_finished());
                let idle = status.running() == 0 && preconditions.is_empty();
                if budget.exhausted() && pollers.is_empty() && idle {
                    break DrainReason::ExitAfterTasks;
                }
                if let Some(limit) = current.exit_after_idle {
                    if idle && status.idle_for() >= limit {
                        break DrainReason::ExitAfterIdle;
                    }
                }
                if status.snapshot().backoff.is_some() {
                    status.set_state("backing-off");
                } else if !*paused_tx.borrow() {
                    status.set_state("polling");
                }
            }
        }
    };

    // The drain.
    tracing::info!(reason = ?reason, running = status.running(), drain_timeout = ?drain_timeout, "draining: no new tasks");
    status.set_state("draining");
    if let Some(stopping) = hooks.stopping.take() {
        stopping();
    }
    stop_polling.cancel();
    let all_done = {
        let pollers: Vec<JoinHandle<()>> = pollers.drain().map(|(_, h)| h).collect();
        let preconditions = preconditions.clone();
        async move {
            for h in pollers {
                let _ = h.await;
            }
            preconditions.close();
            preconditions.wait().await;
        }
    };
    tokio::pin!(all_done);
    enum DrainEnd {
        Done,
        TimedOut,
        SecondSignal,
    }
    let end = if status.running() == 0 && preconditions.is_empty() {
        tokio::select! {
            _ = &mut all_done => DrainEnd::Done,
            _ = tokio::time::sleep(Duration::from_secs(5)) => DrainEnd::TimedOut,
        }
    } else {
        tokio::select! {
            _ = &mut all_done => DrainEnd::Done,
            _ = tokio::time::sleep(drain_timeout) => DrainEnd::TimedOut,
            _ = sigterm.recv() => DrainEnd::SecondSignal,
            _ = sigint.recv() => DrainEnd::SecondSignal,
        }
    };
    match end {
        DrainEnd::Done => tracing::info!("drain complete: every task ended and was reported"),
        DrainEnd::TimedOut | DrainEnd::SecondSignal => {
            let why = if matches!(end, DrainEnd::TimedOut) {
                "drain timeout reached"
            } else {
                "second signal"
            };
            tracing::warn!(running = status.running(), "{why}: stopping the remaining tasks");
            status.set_state("stopping");
            hard_stop.cancel();
            let bound = current.kill_grace + REPORT_AFTER_STOP;
            if tokio::time::timeout(bound, &mut all_done).await.is_err() {
                tracing::error!(
                    running = status.running(),
                    "tasks did not report in time; giving up on their status"
                );
                give_up.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut all_done).await;
            }
        }
    }
    give_up.cancel();
    heartbeat.abort();
    let snap = status.snapshot();
    tracing::info!(
        finished = snap.counters.finished,
        failed = snap.counters.failed,
        canceled = snap.counters.canceled,
        r#false = snap.counters.r#false,
        "taskrunner stopped"
    );
    crate::exit::OK
}

async fn recv_control(c: &mut Option<mpsc::Receiver<ControlCommand>>) -> Option<ControlCommand> {
    match c {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn spawn_pollers(pollers: &mut HashMap<usize, JoinHandle<()>>, ctx: &PollerContext, n: usize) {
    for i in 0..n {
        if pollers.get(&i).is_none_or(|h| h.is_finished()) {
            pollers.insert(i, tokio::spawn(poller::run_poller(i, ctx.clone())));
        }
    }
}

fn apply_reload(
    old: &Settings,
    new: &Settings,
    hooks: &Hooks,
    wanted: &watch::Sender<usize>,
    status: &StatusBoard,
) {
    if new.tasks != old.tasks {
        tracing::info!(
            from = old.tasks.get(),
            to = new.tasks.get(),
            "SIGHUP: --tasks changed"
        );
        let _ = wanted.send(new.tasks.get());
        status.set_slots(new.tasks.get());
    }
    if new.drain_timeout != old.drain_timeout {
        tracing::info!(from = ?old.drain_timeout, to = ?new.drain_timeout, "SIGHUP: drain timeout changed");
    }
    if let Some(set) = &hooks.set_log_level {
        match set(&new.log_level) {
            Ok(()) if new.log_level != old.log_level => {
                tracing::info!(level = %new.log_level, "SIGHUP: log level changed")
            }
            Ok(()) => {}
            Err(e) => tracing::error!("SIGHUP: cannot apply log level {:?}: {e}", new.log_level),
        }
    }
    for key in ["worker_group", "endpoint", "region", "credentials"] {
        let changed = match key {
            "worker_group" => new.worker_group != old.worker_group,
            "endpoint" => new.endpoint != old.endpoint,
            "region" => new.region != old.region,
            _ => new.credentials != old.credentials,
        };
        if changed {
            tracing::warn!("SIGHUP: a change of {key} needs a restart; the running value is kept");
        }
    }
}

async fn heartbeat_loop(
    api: Arc<dyn PipelineApi>,
    id: String,
    worker_group: String,
    host: String,
    interval: Duration,
    status: StatusBoard,
    terminate: mpsc::Sender<()>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), HEARTBEAT_RETRY_MAX.min(interval));
    loop {
        let wait = match api.report_task_runner_heartbeat(&id, &worker_group, &host).await {
            Ok(t) => {
                backoff.reset();
                status.heartbeat_ok();
                if t {
                    tracing::info!("the service asked this task runner to terminate");
                    let _ = terminate.send(()).await;
                }
                interval
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?wait, "heartbeat failed");
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// Stderr logging until the `logs` module's layers are wired in here. Returns a setter for the
/// level (used on SIGHUP).
pub fn init_stderr_logging(level: &str) -> Box<dyn Fn(&str) -> Result<(), String> + Send + Sync> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt::layer().with_writer(std::io::stderr))
        .try_init();
    Box::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    })
}

/// The `taskrunner` binary: settings (exit 78 on a config error) -> logging -> clients -> [`run`].
pub fn main() -> i32 {
    use crate::config::{self, Invocation};
    let settings = match config::load_from_process() {
        Ok(Invocation::Run(s)) => *s,
        Ok(Invocation::CheckConfig(s)) => {
            print!("{}", config::render_check(&s));
            return crate::exit::OK;
        }
        Err(e) => {
            eprintln!("taskrunner: {e}");
            return e.exit_code();
        }
    };
    // Logging: the journal under systemd, else stderr; and the hourly files under <output>/logs.
    let logs = match crate::logs::init(&crate::logs::LogConfig::new(
        &settings.output_dir,
        &settings.log_level,
        &settings.worker_group,
    )) {
        Ok(h) => Arc::new(h),
        Err(e) => {
            eprintln!("taskrunner: cannot set up logging: {e}");
            return crate::exit::CONFIG;
        }
    };
    let set_log_level: Box<dyn Fn(&str) -> Result<(), String> + Send + Sync> = {
        let logs = logs.clone();
        Box::new(move |level: &str| {
            logs.reopen();
            logs.set_level(level).map_err(|e| e.to_string())
        })
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("taskrunner: cannot start the async runtime: {e}");
            return crate::exit::FAILURE;
        }
    };
    let logs_for_shutdown = logs.clone();
    let code = runtime.block_on(async move {
        crate::net::install_crypto_provider();
        let api = match crate::api::http::HttpPipelineApi::from_settings(&settings).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("cannot set up the Data Pipeline client: {e}");
                eprintln!("taskrunner: cannot set up the Data Pipeline client: {e}");
                return crate::exit::CONFIG;
            }
        };
        let s3 = match crate::net::s3_client(&settings).await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("no S3 client ({e}): tasks with scriptUri or s3:// stdout/stderr will fail");
                None
            }
        };
        let shipper = match (&settings.log_uri, &s3) {
            (Some(uri), Some(client)) => start_shipper(&settings, uri, client.clone()),
            (Some(uri), None) => {
                tracing::error!("--logUri {uri}: no S3 client, the hourly logs stay on this host");
                None
            }
            (None, _) => None,
        };
        let store: Option<Arc<dyn ObjectStore>> = s3.map(|c| Arc::new(c) as Arc<dyn ObjectStore>);
        let service = ServiceSide::new(&settings);
        let (control_tx, control_rx) = mpsc::channel(8);
        let hooks = Hooks {
            ready: Some(service.ready_hook(control_tx)),
            stopping: Some(service.stopping_hook()),
            control: Some(control_rx),
            reload: Some(Box::new(|current: &Settings| {
                crate::config::reload(current).map_err(|e| e.to_string())
            })),
            set_log_level: Some(set_log_level),
        };
        let code = run(settings, Arc::new(api), store, hooks).await;
        service.cancel.cancel();
        if let Some(shipper) = shipper {
            // At shutdown every hourly file goes up, the current one too (as the jar does), bounded.
            logs_for_shutdown.flush();
            if let Err(e) = shipper.queue_hourly_files(true) {
                tracing::error!("cannot queue the hourly logs for upload: {e}");
            }
            let left = shipper
                .shutdown(tokio::time::Instant::now() + SHIP_AT_SHUTDOWN)
                .await;
            if left > 0 {
                tracing::warn!(
                    pending = left,
                    "log uploads still pending at exit; they resume at the next start"
                );
            }
        }
        code
    });
    logs.shutdown();
    code
}

/// How long the shutdown waits for log uploads (`--logUri`); what is left resumes at the next start
/// (the queue is durable).
const SHIP_AT_SHUTDOWN: Duration = Duration::from_secs(30);

/// `--logUri`: the durable upload queue ships closed hourly files every hour and everything at
/// shutdown, under `<logUri>/<taskrunnerId or hostname>/`.
fn start_shipper(
    settings: &Settings,
    uri: &crate::config::S3Uri,
    client: aws_sdk_s3::Client,
) -> Option<crate::logs::ship::Shipper> {
    let mut cfg = crate::logs::ship::ShipperConfig::new(&settings.state_dir, &settings.output_dir);
    cfg.hourly = Some(crate::logs::ship::HourlyShipping {
        log_uri: uri.clone(),
        runner_name: taskrunner_id(settings).unwrap_or_else(|_| hostname()),
    });
    cfg.disk_budget_bytes = Some(settings.disk_budget_bytes);
    match crate::logs::ship::Shipper::start(client, cfg, Arc::new(crate::logs::clock::SystemClock)) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("--logUri {uri}: cannot start the log shipper: {e}; logs stay on this host");
            None
        }
    }
}

/// The service side of the daemon: sd_notify (READY, STATUS on every change, WATCHDOG while the
/// loop is alive, STOPPING and EXTEND_TIMEOUT during a drain) and the control socket that
/// `taskrunner-ctl` talks to. All of it is a silent no-op without `NOTIFY_SOCKET`.
struct ServiceSide {
    notifier: Arc<crate::service::Notifier>,
    socket: PathBuf,
    cancel: tokio_util::sync::CancellationToken,
}

/// While a drain makes progress, ask systemd for this much more time, this often, so that a modest
/// `TimeoutStopSec` does not kill a healthy drain (the drain itself is bounded by `drain-timeout`).
const EXTEND_TIMEOUT_BY: Duration = Duration::from_secs(30);
const EXTEND_TIMEOUT_EVERY: Duration = Duration::from_secs(10);

impl ServiceSide {
    fn new(settings: &Settings) -> ServiceSide {
        ServiceSide {
            notifier: Arc::new(crate::service::Notifier::from_env()),
            socket: settings.runtime_dir.join("control.sock"),
            cancel: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// READY=1 once the loops run and the control socket is bound (not after the first successful
    /// API call: a network outage at boot must not become a restart loop).
    fn ready_hook(&self, control_tx: mpsc::Sender<ControlCommand>) -> Box<dyn FnOnce(&StatusBoard) + Send> {
        let notifier = self.notifier.clone();
        let socket = self.socket.clone();
        let cancel = self.cancel.clone();
        Box::new(move |board: &StatusBoard| {
            let (svc_tx, mut svc_rx) = mpsc::channel::<crate::control::ControlCommand>(8);
            let owner = nix::unistd::geteuid().as_raw();
            if let Err(e) = crate::control::serve(&socket, board.subscribe(), svc_tx, owner, cancel.clone()) {
                tracing::warn!(
                    "control socket {}: {e}; taskrunner-ctl cannot reach this instance",
                    socket.display()
                );
            }
            tokio::spawn(async move {
                while let Some(cmd) = svc_rx.recv().await {
                    let (ours, reply) = match cmd {
                        crate::control::ControlCommand::Drain { reply } => (ControlCommand::Drain, reply),
                        crate::control::ControlCommand::Resume { reply } => (ControlCommand::Resume, reply),
                    };
                    let answer = control_tx
                        .send(ours)
                        .await
                        .map_err(|_| "the daemon is stopping".to_string());
                    let _ = reply.send(answer);
                }
            });
            let _ = notifier.ready();
            let mut rx = board.subscribe();
            tokio::spawn(async move {
                let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
                let mut last = String::new();
                loop {
                    let line =
                        crate::service::status_line(&rx.borrow_and_update(), chrono::Utc::now().timestamp());
                    if line != last {
                        let _ = notifier.status(&line);
                        last = line;
                    }
                    // The watchdog is fed from here, so it stops when the status loop stops.
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { break },
                        _ = async { match watchdog.as_mut() { Some(w) => { w.tick().await; } None => std::future::pending::<()>().await } } => {
                            let _ = notifier.watchdog();
                        }
                        _ = cancel.cancelled() => break,
                    }
                }
            });
        })
    }

    fn stopping_hook(&self) -> Box<dyn FnOnce() + Send> {
        let notifier = self.notifier.clone();
        let cancel = self.cancel.clone();
        Box::new(move || {
            let _ = notifier.stopping();
            tokio::spawn(async move {
                loop {
                    let _ = notifier.extend_timeout(EXTEND_TIMEOUT_BY);
                    tokio::select! {
                        _ = tokio::time::sleep(EXTEND_TIMEOUT_EVERY) => {}
                        _ = cancel.cancelled() => break,
                    }
                }
            });
        })
    }
}
