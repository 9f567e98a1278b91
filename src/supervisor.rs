//! Runs one process for one attempt and reports how it ended: spawn in its own process group,
//! stream stdout/stderr to the attempt's log files, enforce `attemptTimeout`, and on timeout,
//! cancel or shutdown TERM the whole group, wait `kill_grace`, then KILL it. Also owns the S3 side
//! of a shell task ([`ObjectStore`]: `scriptUri` downloads and `s3://` stdout/stderr uploads).
//!
//! Output capture: one OS thread per stream does blocking `read`/`write` with a 64 KiB buffer, so
//! memory is bounded whatever the task writes, stdout and stderr drain independently (a task that
//! fills stderr while stdout is idle never blocks), and a fast writer is limited by the disk, not
//! by the runtime. The last [`STDERR_TAIL_BYTES`] of stderr are kept for the error message.
//!
//! When the main process exits, anything it left in its process group (a `cmd &`) is stopped the
//! same way (TERM, grace, KILL): nothing outlives its attempt, and the output pipes reach EOF.

use crate::config::S3Uri;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// How much of the end of stderr is kept for `errorMessage`.
pub const STDERR_TAIL_BYTES: usize = 4096;
/// Bytes per read from a task's pipe.
const PIPE_BUFFER_BYTES: usize = 64 * 1024;
/// After the group was KILLed, how long to wait for the output threads before giving up on a
/// process that escaped the group but still holds a pipe.
const READER_AFTER_KILL: Duration = Duration::from_secs(5);

/// Environment variables never passed to a task: the runner's own secrets and service-manager
/// plumbing. A pipeline that wants keys in a task puts them there itself.
const SCRUBBED_ENV: &[&str] = &[
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "CREDENTIALS_DIRECTORY",
];

/// The uid/gid a task runs as (when the daemon runs as root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub user: String,
    pub home: PathBuf,
}

/// What to run and where its output goes.
#[derive(Clone, Debug)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The command as written in the pipeline, for activity.log.
    pub display: String,
    /// The attempt's working directory (exists, 0700).
    pub workdir: PathBuf,
    /// The attempt's log directory: `stdout`, `stderr`, `activity.log` are written here.
    pub log_dir: PathBuf,
    /// Extra local copies (the object's `stdout`/`stderr` local paths), appended to.
    pub stdout_copy: Option<PathBuf>,
    pub stderr_copy: Option<PathBuf>,
    pub timeout: Option<Duration>,
    pub kill_grace: Duration,
    pub run_as: Option<RunAs>,
    /// Append to the log files instead of starting them afresh (a precondition's later checks).
    pub append: bool,
}

/// How the process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exit status {c}"),
            ExitKind::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "killed by signal {s} ({name})")
            }
        }
    }
}

/// Why the runner stopped the process itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    Timeout(Duration),
    /// The service answered `canceled: true`.
    Canceled,
    /// The drain ran out of time.
    Shutdown,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub exit: ExitKind,
    pub stopped: Option<Stopped>,
    /// The last bytes of stderr, lossily decoded.
    pub stderr_tail: String,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.stopped.is_none() && self.exit == ExitKind::Code(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("cannot create {path}: {source}")]
    Output { path: PathBuf, source: std::io::Error },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The stop requests a running process listens to.
#[derive(Clone, Debug, Default)]
pub struct StopTokens {
    /// The service canceled the task.
    pub cancel: CancellationToken,
    /// The drain timed out (or a second signal came).
    pub shutdown: CancellationToken,
}

/// The shell for `command`: bash when installed (the guide's own sample runs `bash -x ...`, and
/// Amazon Linux's `/bin/sh` is bash), else `/bin/sh`. Arguments: `-c <command> <arg0>
/// <scriptArgument...>`, so `scriptArgument` values are `$1..$n` and `$0` is the component id
/// (the shell's own messages then name the activity: `CreateDirectory: line 1: foo: not found`).
pub fn shell_invocation(command: &str, arg0: &str, args: &[String]) -> (PathBuf, Vec<String>) {
    let shell = if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let mut argv = vec!["-c".to_string(), command.to_string(), arg0.to_string()];
    argv.extend(args.iter().cloned());
    (PathBuf::from(shell), argv)
}

/// Runs `spec` to the end. `on_spawn` gets the pid (= process group id) once it runs.
pub async fn run(
    spec: &Spec,
    stop: &StopTokens,
    on_spawn: impl FnOnce(u32),
) -> Result<Outcome, SupervisorError> {
    std::fs::create_dir_all(&spec.log_dir).map_err(|source| SupervisorError::Output {
        path: spec.log_dir.clone(),
        source,
    })?;
    let open = |p: &Path, append: bool| {
        std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(p)
            .map_err(|source| SupervisorError::Output {
                path: p.to_path_buf(),
                source,
            })
    };
    let stdout_file = open(&spec.log_dir.join("stdout"), spec.append)?;
    let stderr_file = open(&spec.log_dir.join("stderr"), spec.append)?;
    let stdout_copy = spec.stdout_copy.as_deref().map(|p| open(p, true)).transpose()?;
    let stderr_copy = spec.stderr_copy.as_deref().map(|p| open(p, true)).transpose()?;
    let mut activity_log = open(&spec.log_dir.join("activity.log"), spec.append)?;

    let started = SystemTime::now();
    let clock = tokio::time::Instant::now();
    let _ = writeln!(
        activity_log,
        "command: {}\nprogram: {} {:?}\nworkdir: {}\nstart: {}",
        spec.display,
        spec.program.display(),
        spec.args,
        spec.workdir.display(),
        rfc3339(started)
    );

    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group (pgid = pid): cancel and timeout signal the whole tree.
        .process_group(0)
        .kill_on_drop(false);
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TASKRUNNER_") {
            cmd.env_remove(k);
        }
    }
    if let Some(r) = &spec.run_as {
        // std drops supplementary groups when it switches uid as root.
        cmd.uid(r.uid).gid(r.gid);
        cmd.env("HOME", &r.home)
            .env("USER", &r.user)
            .env("LOGNAME", &r.user);
    }
    let mut child = cmd.spawn().map_err(|source| SupervisorError::Spawn {
        program: spec.program.clone(),
        source,
    })?;
    let pid = child.id().expect("a child that was just spawned has a pid");
    on_spawn(pid);
    let _ = writeln!(activity_log, "pid: {pid}");

    let out_fd = child.stdout.take().expect("piped").into_owned_fd()?;
    let err_fd = child.stderr.take().expect("piped").into_owned_fd()?;
    let out_reader = tokio::task::spawn_blocking(move || copy_stream(out_fd, stdout_file, stdout_copy, 0));
    let err_reader =
        tokio::task::spawn_blocking(move || copy_stream(err_fd, stderr_file, stderr_copy, STDERR_TAIL_BYTES));

    enum Ended {
        Exited(std::io::Result<std::process::ExitStatus>),
        Stop(Stopped),
    }
    let timeout = async {
        match spec.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        s = child.wait() => Ended::Exited(s),
        _ = stop.cancel.cancelled() => Ended::Stop(Stopped::Canceled),
        _ = stop.shutdown.cancelled() => Ended::Stop(Stopped::Shutdown),
        _ = timeout => Ended::Stop(Stopped::Timeout(spec.timeout.unwrap_or_default())),
    };
    let (status, stopped) = match ended {
        Ended::Exited(s) => {
            // The main process is gone: stop whatever it left behind in its group.
            let status = s?;
            let _ = terminate_group(pid, spec.kill_grace, None).await;
            (status, None)
        }
        Ended::Stop(why) => {
            tracing::info!(pid, reason = ?why, "stopping the task's process group");
            let status = terminate_group(pid, spec.kill_grace, Some(&mut child)).await?;
            (status, Some(why))
        }
    };

    let join = |h: tokio::task::JoinHandle<std::io::Result<(u64, Vec<u8>)>>| async move {
        match tokio::time::timeout(READER_AFTER_KILL + spec.kill_grace, h).await {
            Ok(Ok(Ok(r))) => r,
            Ok(Ok(Err(e))) => {
                tracing::warn!(error = %e, "writing the task's output failed");
                (0, Vec::new())
            }
            _ => {
                tracing::warn!(
                    pid,
                    "a process outside the task's group still holds its output pipe"
                );
                (0, Vec::new())
            }
        }
    };
    let (stdout_bytes, _) = join(out_reader).await;
    let (stderr_bytes, tail) = join(err_reader).await;

    use std::os::unix::process::ExitStatusExt;
    let exit = match (status.code(), status.signal()) {
        (Some(c), _) => ExitKind::Code(c),
        (None, Some(s)) => ExitKind::Signal(s),
        (None, None) => ExitKind::Code(-1),
    };
    let outcome = Outcome {
        exit,
        stopped,
        stderr_tail: String::from_utf8_lossy(&tail).into_owned(),
        stdout_bytes,
        stderr_bytes,
        elapsed: clock.elapsed(),
    };
    let _ = writeln!(
        activity_log,
        "end: {}\nexit: {}{}\nstdout bytes: {}\nstderr bytes: {}",
        rfc3339(SystemTime::now()),
        outcome.exit,
        match stopped {
            Some(s) => format!(" (stopped by the runner: {s:?})"),
            None => String::new(),
        },
        stdout_bytes,
        stderr_bytes
    );
    Ok(outcome)
}

/// TERM the group, wait up to `grace` for `child` (if still ours to reap) to exit, then KILL the
/// group. Without a child (it was already reaped), waits for the group to empty.
async fn terminate_group(
    pgid: u32,
    grace: Duration,
    child: Option<&mut tokio::process::Child>,
) -> std::io::Result<std::process::ExitStatus> {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let group = Pid::from_raw(pgid as i32);
    if killpg(group, Signal::SIGTERM).is_err() {
        // Empty group: nothing left.
        if let Some(c) = child {
            return c.wait().await;
        }
        return Ok(std::os::unix::process::ExitStatusExt::from_raw(0));
    }
    match child {
        Some(c) => {
            let status = match tokio::time::timeout(grace, c.wait()).await {
                Ok(s) => s?,
                Err(_) => {
                    let _ = killpg(group, Signal::SIGKILL);
                    c.wait().await?
                }
            };
            // The leader may have exited on TERM while a grandchild ignores it.
            let _ = killpg(group, Signal::SIGKILL);
            Ok(status)
        }
        None => {
            let deadline = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < deadline {
                // Signal 0: does any member remain?
                if killpg(group, None).is_err() {
                    return Ok(std::os::unix::process::ExitStatusExt::from_raw(0));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = killpg(group, Signal::SIGKILL);
            Ok(std::os::unix::process::ExitStatusExt::from_raw(0))
        }
    }
}

/// Copies a pipe to its file(s) until EOF. Returns the byte count and the last `tail_cap` bytes.
fn copy_stream(
    fd: OwnedFd,
    mut primary: File,
    mut copy: Option<File>,
    tail_cap: usize,
) -> std::io::Result<(u64, Vec<u8>)> {
    let mut pipe = File::from(fd);
    let mut buf = vec![0u8; PIPE_BUFFER_BYTES];
    let mut total = 0u64;
    let mut tail: Vec<u8> = Vec::new();
    let mut copy_failed = false;
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        // Keep draining the pipe even if the disk fails: a blocked task is worse than a short log.
        if let Err(e) = primary.write_all(&buf[..n]) {
            if !copy_failed {
                tracing::warn!(error = %e, "cannot write the task's output log");
            }
            copy_failed = true;
        }
        if let Some(c) = copy.as_mut() {
            if c.write_all(&buf[..n]).is_err() {
                copy = None;
            }
        }
        if tail_cap > 0 {
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > 2 * tail_cap {
                tail.drain(..tail.len() - tail_cap);
            }
        }
    }
    if tail.len() > tail_cap {
        tail.drain(..tail.len() - tail_cap);
    }
    primary.flush()?;
    Ok((total, tail))
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// S3 as a shell task needs it. Implemented for the SDK client; unit tests may fake it.
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Downloads `uri` to `dest` (streamed).
    async fn download(&self, uri: &S3Uri, dest: &Path) -> anyhow::Result<()>;
    /// Uploads the file `src` to `uri` (streamed from disk).
    async fn upload(&self, src: &Path, uri: &S3Uri) -> anyhow::Result<()>;
}

#[async_trait::async_trait]
impl ObjectStore for aws_sdk_s3::Client {
    async fn download(&self, uri: &S3Uri, dest: &Path) -> anyhow::Result<()> {
        use anyhow::Context;
        use tokio::io::AsyncWriteExt;
        let obj = self
            .get_object()
            .bucket(&uri.bucket)
            .key(&uri.prefix)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("GetObject {uri}: {}", aws_sdk_s3::error::DisplayErrorContext(e)))?;
        let mut body = obj.body.into_async_read();
        let mut file = tokio::fs::File::create(dest)
            .await
            .with_context(|| format!("cannot create {}", dest.display()))?;
        tokio::io::copy(&mut body, &mut file)
            .await
            .with_context(|| format!("downloading {uri} to {}", dest.display()))?;
        file.flush().await?;
        Ok(())
    }

    async fn upload(&self, src: &Path, uri: &S3Uri) -> anyhow::Result<()> {
        let body = aws_sdk_s3::primitives::ByteStream::from_path(src)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", src.display()))?;
        self.put_object()
            .bucket(&uri.bucket)
            .key(&uri.prefix)
            .body(body)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("PutObject {uri}: {}", aws_sdk_s3::error::DisplayErrorContext(e)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, command: &str, timeout: Option<Duration>) -> Spec {
        let work = dir.join("work");
        std::fs::create_dir_all(&work).unwrap();
        let (program, args) = shell_invocation(command, "Test", &["one".into(), "two words".into()]);
        Spec {
            program,
            args,
            display: command.into(),
            workdir: work,
            log_dir: dir.join("log"),
            stdout_copy: None,
            stderr_copy: None,
            timeout,
            kill_grace: Duration::from_secs(2),
            run_as: None,
            append: false,
        }
    }

    fn alive(pid: i32) -> bool {
        // A zombie still answers kill(0); check /proc where it exists.
        #[cfg(target_os = "linux")]
        {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(s) => !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')),
                Err(_) => false,
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        }
    }

    #[tokio::test]
    async fn arguments_output_and_exit_status() {
        let d = tempfile::tempdir().unwrap();
        let s = spec(d.path(), "echo \"$0:$1:$2\"; echo oops >&2; exit 3", None);
        let o = run(&s, &StopTokens::default(), |_| {}).await.unwrap();
        assert_eq!(o.exit, ExitKind::Code(3));
        assert!(!o.success());
        assert_eq!(
            std::fs::read_to_string(d.path().join("log/stdout")).unwrap(),
            "Test:one:two words\n"
        );
        assert_eq!(o.stderr_tail, "oops\n");
        let log = std::fs::read_to_string(d.path().join("log/activity.log")).unwrap();
        assert!(log.contains("exit: exit status 3"), "{log}");
    }

    #[tokio::test]
    async fn big_stderr_keeps_a_bounded_tail_and_stdout_idle_does_not_block() {
        let d = tempfile::tempdir().unwrap();
        // 2 MB on stderr while stdout stays idle, then a last line.
        let s = spec(
            d.path(),
            "head -c 2000000 /dev/zero | tr '\\0' x >&2; echo; echo the-last-line >&2",
            Some(Duration::from_secs(60)),
        );
        let o = run(&s, &StopTokens::default(), |_| {}).await.unwrap();
        assert!(o.success(), "{o:?}");
        assert_eq!(o.stderr_bytes, 2_000_000 + "the-last-line\n".len() as u64);
        assert!(o.stderr_tail.len() <= STDERR_TAIL_BYTES);
        assert!(o.stderr_tail.ends_with("the-last-line\n"));
    }

    #[tokio::test]
    async fn timeout_kills_the_group_including_a_grandchild() {
        let d = tempfile::tempdir().unwrap();
        let s = spec(
            d.path(),
            "sleep 600 & echo $! > grandchild.pid; wait",
            Some(Duration::from_secs(1)),
        );
        let o = run(&s, &StopTokens::default(), |_| {}).await.unwrap();
        assert_eq!(o.stopped, Some(Stopped::Timeout(Duration::from_secs(1))));
        let gc: i32 = std::fs::read_to_string(d.path().join("work/grandchild.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        for _ in 0..100 {
            if !alive(gc) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("grandchild {gc} survived the timeout");
    }

    #[tokio::test]
    async fn cancel_escalates_to_kill_when_term_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let mut s = spec(d.path(), "trap '' TERM; while :; do sleep 0.1; done", None);
        s.kill_grace = Duration::from_millis(500);
        let stop = StopTokens::default();
        let c = stop.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            c.cancel();
        });
        let o = run(&s, &stop, |_| {}).await.unwrap();
        assert_eq!(o.stopped, Some(Stopped::Canceled));
        assert_eq!(o.exit, ExitKind::Signal(9));
        assert_eq!(o.exit.to_string(), "killed by signal 9 (SIGKILL)");
    }

    #[tokio::test]
    async fn background_leftovers_are_stopped_when_the_shell_exits() {
        let d = tempfile::tempdir().unwrap();
        let s = spec(d.path(), "sleep 600 & echo $! > bg.pid; exit 0", None);
        let o = run(&s, &StopTokens::default(), |_| {}).await.unwrap();
        assert!(o.success());
        let bg: i32 = std::fs::read_to_string(d.path().join("work/bg.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        for _ in 0..100 {
            if !alive(bg) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("background process {bg} outlived its attempt");
    }
}
