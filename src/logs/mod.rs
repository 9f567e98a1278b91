//! Logging: the tracing subscriber (journald or stderr, plus the hourly files), gzip of old hourly
//! files, and shipping to S3 through a durable queue ([`ship`]) with a disk budget ([`budget`]).
//!
//! The per-attempt capture (`<output>/tasks/<pipelineId>/<component>/<instance>/<attempt>/
//! {stdout,stderr,activity.log}`) is written by [`crate::supervisor`]; this module ships those
//! directories ([`ship::Shipper::ship_attempt`]) and counts them in the disk budget.
//!
//! # For the daemon
//! ```text
//! let logs = logs::init(&LogConfig::new(output_dir, settings.log_level, worker_group))?; // first thing
//! SIGHUP          -> logs.reopen()
//! level reload    -> logs.set_level("taskrunner=debug")?
//! shutdown        -> logs.flush(); shipper.shutdown(deadline).await; logs.shutdown();
//! ```
//!
//! # Where lines go
//! * **journald or stderr, never both.** [`Journald::Auto`] uses the journal only when our stderr
//!   *is* the journal: `JOURNAL_STREAM` is set and names the device:inode of our fd 2 (the check
//!   `systemd.exec(5)` prescribes). The mere presence of `/run/systemd/journal/socket` is not
//!   enough: an operator running `nohup taskrunner ... 2>run.log` on a systemd host expects the
//!   lines in `run.log`. `On` requires the journal (error if unreachable), `Off` never uses it.
//!   If `Auto` decides for the journal but cannot reach it, lines go to stderr.
//! * **the hourly files** `<output>/logs/TaskRunner.log.YYYY-MM-DD-HH` (UTC hour, no space in the
//!   name: see [`hourly`] for why, and for what happens when the writer falls behind), always.
//!   After eight hours a file is gzipped in place ([`compress`]), once a minute by a background
//!   thread.
//!
//! # The span contract (for the runner)
//! Everything an attempt does runs inside one span named `task` ([`journald::TASK_SPAN`]):
//! ```text
//! let span = tracing::info_span!("task",
//!     pipeline_id = %task.pipeline_id, task_id = %task.task_id,
//!     attempt_id = %task.attempt_id, activity_type = %activity.type_name());
//! async { ... }.instrument(span).await;
//! ```
//! Each field of that span becomes a journal field named in upper case (`PIPELINE_ID`, `TASK_ID`,
//! `ATTEMPT_ID`, `ACTIVITY_TYPE`) on every entry logged inside it, so `journalctl TASK_ID=...`
//! finds a task. Fields may be declared `tracing::field::Empty` and recorded later. Every entry
//! also carries `WORKER_GROUP` (from [`LogConfig::worker_group`]). Other event fields are sent as
//! `F_<NAME>` and appended to `MESSAGE` as `name=value`. In the hourly files and on stderr the
//! span appears in the usual `task{pipeline_id=.. task_id=..}:` prefix.
//!
//! # Levels
//! [`LogConfig::level`] is a `RUST_LOG`-style filter (`info`, `taskrunner=debug,aws=warn`); a
//! non-empty `RUST_LOG` in the environment overrides it at start; [`LogHandle::set_level`]
//! replaces it at run time.

pub mod budget;
pub mod clock;
pub mod compress;
pub mod hourly;
pub mod journald;
pub mod ship;

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{reload, EnvFilter, Registry};

pub use clock::{Clock, ManualClock, SystemClock};
pub use hourly::HourlyFiles;

/// How often the background thread looks for hourly files to gzip.
pub const COMPRESS_CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// How long shutdown waits for the file writer to drain.
pub const WRITER_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether to send entries to the journal (see the module doc for `Auto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Journald {
    #[default]
    Auto,
    Off,
    On,
}

/// What [`init`] needs.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// `--output`; the hourly files go to `<output_dir>/logs`.
    pub output_dir: PathBuf,
    /// `RUST_LOG`-style filter; a non-empty `RUST_LOG` overrides it.
    pub level: String,
    pub journald: Journald,
    /// Sent as `WORKER_GROUP` with every journal entry.
    pub worker_group: String,
    /// `SYSLOG_IDENTIFIER` in the journal.
    pub syslog_identifier: String,
    /// The journal's socket ([`journald::DEFAULT_SOCKET`]); tests bind their own.
    pub journal_socket: PathBuf,
    /// Read `RUST_LOG` (tests turn it off).
    pub use_rust_log_env: bool,
}

impl LogConfig {
    pub fn new(
        output_dir: impl Into<PathBuf>,
        level: impl Into<String>,
        worker_group: impl Into<String>,
    ) -> Self {
        LogConfig {
            output_dir: output_dir.into(),
            level: level.into(),
            journald: Journald::Auto,
            worker_group: worker_group.into(),
            syslog_identifier: "taskrunner".into(),
            journal_socket: PathBuf::from(journald::DEFAULT_SOCKET),
            use_rust_log_env: true,
        }
    }

    /// `<output_dir>/logs`.
    pub fn logs_dir(&self) -> PathBuf {
        self.output_dir.join("logs")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log level {filter:?} (from {origin}) is not a valid filter: {message}")]
    BadFilter {
        filter: String,
        origin: &'static str,
        message: String,
    },
    #[error("cannot create the log directory {}: {source}", path.display())]
    LogsDir { path: PathBuf, source: std::io::Error },
    #[error("journald = \"on\" but the journal socket {} cannot be reached: {source}", path.display())]
    Journald { path: PathBuf, source: std::io::Error },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInitialized,
}

/// Where the non-file lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    Journald,
    Stderr,
}

type ReloadHandle = reload::Handle<EnvFilter, Registry>;

/// Controls the installed logging. Dropping it does not stop anything; call [`LogHandle::shutdown`].
pub struct LogHandle {
    hourly: HourlyFiles,
    reload: ReloadHandle,
    destination: Destination,
    clock: Arc<dyn Clock>,
    maintenance: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// Why `Auto` fell back to stderr, logged once the subscriber is up.
    fallback_note: Option<String>,
}

/// Install the global subscriber and start the file writer and the gzip thread.
pub fn init(cfg: &LogConfig) -> Result<LogHandle, LogError> {
    let (subscriber, handle) = build(cfg, Arc::new(SystemClock))?;
    tracing::subscriber::set_global_default(subscriber).map_err(|_| LogError::AlreadyInitialized)?;
    if let Some(note) = &handle.fallback_note {
        tracing::warn!("{note}");
    }
    // `Logging to <dir>` (as the jar prints it, dp-how-task-runner-user-managed.md) is printed once by
    // the daemon on stdout; logging it here too would put it twice in the journal.
    handle.start_compression(COMPRESS_CHECK_INTERVAL);
    Ok(handle)
}

/// The subscriber [`init`] installs, without installing it (tests use it with
/// `tracing::subscriber::with_default`), with an injected clock. Nothing runs in the background
/// but the file writer: call [`LogHandle::start_compression`] for the gzip thread.
pub fn build(
    cfg: &LogConfig,
    clock: Arc<dyn Clock>,
) -> Result<
    (
        impl tracing::Subscriber + Send + Sync + for<'a> LookupSpan<'a>,
        LogHandle,
    ),
    LogError,
> {
    let (filter_text, origin) = match std::env::var("RUST_LOG") {
        Ok(v) if cfg.use_rust_log_env && !v.trim().is_empty() => (v, "RUST_LOG"),
        _ => (cfg.level.clone(), "the configuration"),
    };
    let filter = parse_filter(&filter_text, origin)?;
    let (filter, reload) = reload::Layer::new(filter);

    let logs_dir = cfg.logs_dir();
    let hourly = HourlyFiles::start(&logs_dir, clock.clone()).map_err(|source| LogError::LogsDir {
        path: logs_dir.clone(),
        source,
    })?;

    let (journal, fallback_note) = match cfg.journald {
        Journald::Off => (None, None),
        Journald::On => {
            let layer = journald::JournaldLayer::connect(
                &cfg.journal_socket,
                &cfg.syslog_identifier,
                &cfg.worker_group,
            )
            .map_err(|source| LogError::Journald {
                path: cfg.journal_socket.clone(),
                source,
            })?;
            (Some(layer), None)
        }
        Journald::Auto if stderr_is_journal() => {
            match journald::JournaldLayer::connect(&cfg.journal_socket, &cfg.syslog_identifier, &cfg.worker_group) {
                Ok(layer) => (Some(layer), None),
                Err(e) => (
                    None,
                    Some(format!(
                        "stderr goes to the journal but its socket {} cannot be reached ({e}); logging plain lines to stderr",
                        cfg.journal_socket.display()
                    )),
                ),
            }
        }
        Journald::Auto => (None, None),
    };
    let destination = if journal.is_some() {
        Destination::Journald
    } else {
        Destination::Stderr
    };

    let file_layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(hourly.clone());
    let stderr_layer = if journal.is_none() {
        use std::io::IsTerminal;
        Some(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
    } else {
        None
    };
    let subscriber = Registry::default()
        .with(filter)
        .with(file_layer)
        .with(journal)
        .with(stderr_layer);
    let handle = LogHandle {
        hourly,
        reload,
        destination,
        clock,
        maintenance: Mutex::new(None),
        fallback_note,
    };
    Ok((subscriber, handle))
}

fn parse_filter(text: &str, origin: &'static str) -> Result<EnvFilter, LogError> {
    EnvFilter::builder().parse(text).map_err(|e| LogError::BadFilter {
        filter: text.to_string(),
        origin,
        message: e.to_string(),
    })
}

/// `JOURNAL_STREAM=<dev>:<ino>` names our fd 2 (systemd.exec(5), "$JOURNAL_STREAM").
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    journal_stream_matches_fd(&v, 2)
}

#[cfg(unix)]
fn journal_stream_matches_fd(value: &str, fd: i32) -> bool {
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer we own; we read it only when it succeeded.
    let rc = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    if rc != 0 {
        return false;
    }
    // SAFETY: fstat returned 0, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

#[cfg(not(unix))]
fn journal_stream_matches_fd(_value: &str, _fd: i32) -> bool {
    false
}

impl LogHandle {
    /// SIGHUP: close the hourly file; the next line opens it again by name.
    pub fn reopen(&self) {
        self.hourly.reopen();
    }

    /// Replace the filter (`RUST_LOG` syntax).
    pub fn set_level(&self, filter: &str) -> Result<(), LogError> {
        let new = parse_filter(filter, "set_level")?;
        self.reload.reload(new).map_err(|e| LogError::BadFilter {
            filter: filter.to_string(),
            origin: "set_level",
            message: e.to_string(),
        })
    }

    /// Wait until every line logged so far is in the hourly file (before shipping it).
    pub fn flush(&self) -> bool {
        self.hourly.flush(WRITER_SHUTDOWN_TIMEOUT)
    }

    /// Stop the gzip thread, write and fsync everything queued, stop the writer thread.
    pub fn shutdown(&self) -> bool {
        if let Some((stop, thread)) = self.maintenance.lock().unwrap_or_else(|e| e.into_inner()).take() {
            drop(stop);
            let _ = thread.join();
        }
        self.hourly.shutdown(WRITER_SHUTDOWN_TIMEOUT)
    }

    pub fn destination(&self) -> Destination {
        self.destination
    }

    pub fn logs_dir(&self) -> &Path {
        self.hourly.dir()
    }

    /// The hourly file being written now.
    pub fn current_file(&self) -> PathBuf {
        self.hourly.current_path()
    }

    /// Lines the file layer dropped because its writer was stuck.
    pub fn dropped_lines(&self) -> u64 {
        self.hourly.dropped()
    }

    /// Start the thread that gzips hourly files older than eight hours every `every`.
    pub fn start_compression(&self, every: Duration) {
        let mut slot = self.maintenance.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return;
        }
        let (tx, rx) = mpsc::channel::<()>();
        let dir = self.hourly.dir().to_path_buf();
        let clock = self.clock.clone();
        let spawned = std::thread::Builder::new()
            .name("taskrunner-log-gzip".into())
            .spawn(move || loop {
                compress_pass(&dir, clock.now());
                match rx.recv_timeout(every) {
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    _ => return,
                }
            });
        match spawned {
            Ok(thread) => *slot = Some((tx, thread)),
            Err(e) => tracing::error!("cannot start the log compression thread: {e}"),
        }
    }
}

/// One gzip pass over `dir`, logging what it did.
pub fn compress_pass(dir: &Path, now: chrono::DateTime<chrono::Utc>) {
    for outcome in compress::compress_due(dir, now) {
        match outcome {
            compress::Compressed::Done(gz) => tracing::debug!("compressed {}", gz.display()),
            compress::Compressed::Failed(path, e) => {
                tracing::error!(
                    "cannot gzip the log file {}: {e}; it stays uncompressed",
                    path.display()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_our_stderr() {
        assert!(!journal_stream_matches_fd("garbage", 2));
        assert!(!journal_stream_matches_fd("1:2", 2));
        let f = tempfile::tempfile().unwrap();
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::io::AsRawFd;
        let m = f.metadata().unwrap();
        assert!(journal_stream_matches_fd(
            &format!("{}:{}", m.dev(), m.ino()),
            f.as_raw_fd()
        ));
    }

    #[test]
    fn bad_filter_is_named() {
        let err = parse_filter("info,[", "the configuration")
            .unwrap_err()
            .to_string();
        assert!(err.contains("info,["), "{err}");
        assert!(err.contains("the configuration"), "{err}");
    }

    #[test]
    fn lines_reach_the_hourly_file_and_set_level_applies() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = LogConfig::new(dir.path(), "info", "wg-1");
        cfg.journald = Journald::Off;
        cfg.use_rust_log_env = false;
        let clock = ManualClock::at(2026, 11, 30, 2, 0, 0);
        let (sub, handle) = build(&cfg, Arc::new(clock.clone())).unwrap();
        tracing::subscriber::with_default(sub, || {
            tracing::debug!("hidden at info");
            tracing::info!(answer = 42, "visible");
            handle.set_level("debug").unwrap();
            tracing::debug!("shown at debug");
            assert!(handle.set_level("[").is_err());
        });
        assert!(handle.shutdown());
        let text = std::fs::read_to_string(dir.path().join("logs/TaskRunner.log.2026-11-30-02")).unwrap();
        assert!(text.contains("visible answer=42"), "{text}");
        assert!(text.contains("shown at debug"), "{text}");
        assert!(!text.contains("hidden at info"), "{text}");
        assert_eq!(handle.destination(), Destination::Stderr);
    }
}
