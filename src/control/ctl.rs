//! `taskrunner-ctl`: the command line over [`super::Client`]. The binary is a shim that calls
//! [`main`].
//!
//! Finding a daemon: `--socket PATH` names one; otherwise an INSTANCE is looked up as
//! `<base>/<INSTANCE>/control.sock` in the per-user runtime base (when not root) and
//! `/run/taskrunner` ([`super::runtime_bases`]), or under `--runtime-dir`. Without an INSTANCE,
//! the only instance found is used.
//!
//! Exit codes: 0 done, 1 refused or failed, 2 usage (several instances and none named, too),
//! 3 ([`crate::exit::NOT_RUNNING`]) when no daemon answers, like `systemctl status`, 78
//! ([`crate::exit::CONFIG`]) when `validate` finds an error.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::{discover, runtime_bases, Client, ClientError, SOCKET_NAME};
use crate::exit;
use crate::service::human_secs;
use crate::status::StatusSnapshot;

/// The clap command of `taskrunner-ctl`, for its man page and completions (`examples/gen-docs.rs`).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Debug, Parser)]
#[command(
    name = "taskrunner-ctl",
    version,
    about = "Inspect and control the taskrunner daemons on this host through their control sockets"
)]
struct Cli {
    /// Talk to the daemon listening on this socket (overrides INSTANCE and --runtime-dir).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where instances live: a directory holding `<INSTANCE>/control.sock`, or one instance's own
    /// runtime directory (holding `control.sock`). Default: /run/taskrunner and, when not root,
    /// $XDG_RUNTIME_DIR/taskrunner or /tmp/taskrunner-<uid>.
    #[arg(long, global = true, value_name = "DIR", env = "TASKRUNNER_RUNTIME_DIR")]
    runtime_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Show what a daemon is doing: state, running tasks, counters, backoff, uploads, disk.
    Status {
        /// The instance (systemd's %i; the worker group when started by hand).
        instance: Option<String>,
        /// Print the daemon's status as JSON (the protocol's StatusSnapshot) for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List every instance on this host and its state.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop taking new tasks (running tasks go on); the process keeps running.
    Drain {
        instance: Option<String>,
        /// Return only once no task runs any more.
        #[arg(long)]
        wait: bool,
    },
    /// Take tasks again after a drain.
    Resume { instance: Option<String> },
    /// Check the daemon's configuration without starting it (the daemon's `--check-config`):
    /// prints every effective setting and where it came from; exit 78 on an error.
    Validate {
        /// The settings file to check [default: /etc/taskrunner/config.toml].
        #[arg(long, value_name = "FILE")]
        settings: Option<PathBuf>,
        /// More of the daemon's options, as its unit passes them (e.g. `-- --workerGroup=wg-1`).
        #[arg(last = true, value_name = "DAEMON ARGS")]
        daemon_args: Vec<std::ffi::OsString>,
    },
}

/// Runs the command line in `std::env::args` and returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { exit::USAGE } else { exit::OK };
        }
    };
    match run(cli) {
        Ok(()) => exit::OK,
        Err(Failure { code, message }) => {
            eprintln!("taskrunner-ctl: {message}");
            code
        }
    }
}

struct Failure {
    code: i32,
    message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let code = if e.is_not_running() {
            exit::NOT_RUNNING
        } else {
            exit::FAILURE
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let now = chrono::Utc::now().timestamp();
    match &cli.cmd {
        Cmd::Status { instance, json } => {
            let s = connect(&cli, instance.as_deref())?.status()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&s).expect("serializes"));
            } else {
                print!("{}", render_status(&s, now, use_colour()));
            }
        }
        Cmd::List { json } => list(&cli, *json),
        Cmd::Drain { instance, wait } => {
            let mut c = connect(&cli, instance.as_deref())?;
            if *wait {
                eprintln!(
                    "draining {}: waiting for the running tasks to end...",
                    c.path().display()
                );
            }
            let s = c.drain(*wait)?;
            println!(
                "{}: {} ({} running); `taskrunner-ctl resume` takes tasks again",
                label(&s),
                s.state,
                s.running.len()
            );
        }
        Cmd::Resume { instance } => {
            let s = connect(&cli, instance.as_deref())?.resume()?;
            println!("{}: {}", label(&s), s.state);
        }
        Cmd::Validate {
            settings,
            daemon_args,
        } => validate(settings.as_deref(), daemon_args)?,
    }
    Ok(())
}

/// The daemon's own loader with `--check-config`, so that `validate` and the daemon can never
/// disagree about a file.
fn validate(settings: Option<&std::path::Path>, daemon_args: &[std::ffi::OsString]) -> Result<(), Failure> {
    let mut args: Vec<std::ffi::OsString> = vec!["taskrunner".into(), "--check-config".into()];
    if let Some(f) = settings {
        args.push("--settings".into());
        args.push(f.as_os_str().to_owned());
    }
    args.extend(daemon_args.iter().cloned());
    let env: std::collections::BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    match crate::config::load(args, &env) {
        Ok(crate::config::Invocation::CheckConfig(s) | crate::config::Invocation::Run(s)) => {
            // The listing ends with the settings' warnings itself.
            print!("{}", crate::config::render_check(&s));
            Ok(())
        }
        Err(e) => Err(Failure {
            code: e.exit_code(),
            message: format!("invalid configuration: {e}"),
        }),
    }
}

fn label(s: &StatusSnapshot) -> &str {
    if s.instance.is_empty() {
        &s.worker_group
    } else {
        &s.instance
    }
}

fn bases(cli: &Cli) -> Vec<PathBuf> {
    match &cli.runtime_dir {
        Some(d) => vec![d.clone()],
        None => runtime_bases(),
    }
}

/// The socket of `instance` (or of the only instance) per the rules in the module doc.
fn connect(cli: &Cli, instance: Option<&str>) -> Result<Client, Failure> {
    if let Some(p) = &cli.socket {
        return Ok(Client::connect(p)?);
    }
    if let Some(d) = &cli.runtime_dir {
        let own = d.join(SOCKET_NAME);
        if instance.is_none() && own.exists() {
            return Ok(Client::connect(&own)?);
        }
    }
    let bases = bases(cli);
    let where_ = bases
        .iter()
        .map(|b| b.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match instance {
        Some(name) => {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(Failure {
                    code: exit::USAGE,
                    message: format!("{name:?} is not an instance name"),
                });
            }
            let candidates: Vec<PathBuf> = bases.iter().map(|b| b.join(name).join(SOCKET_NAME)).collect();
            let path = candidates.iter().find(|p| p.exists()).unwrap_or(&candidates[0]);
            Client::connect(path).map_err(|e| match e {
                ClientError::NotRunning { .. } => {
                    Failure {
                        code: exit::NOT_RUNNING,
                        message: format!(
                        "instance {name:?} is not running: no daemon answers on {} (looked under {where_})",
                        candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                    ),
                    }
                }
                e => e.into(),
            })
        }
        None => {
            let found = discover(&bases);
            match found.as_slice() {
                [] => Err(Failure {
                    code: exit::NOT_RUNNING,
                    message: format!("no taskrunner is running here: no control socket under {where_}"),
                }),
                [(_, path)] => Ok(Client::connect(path)?),
                many => Err(Failure {
                    code: exit::USAGE,
                    message: format!(
                        "several instances on this host ({}); name one",
                        many.iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }),
            }
        }
    }
}

fn list(cli: &Cli, json: bool) {
    let mut rows = Vec::new();
    let found = match (&cli.socket, &cli.runtime_dir) {
        (Some(p), _) => vec![("-".to_string(), p.clone())],
        (None, Some(d)) if d.join(SOCKET_NAME).exists() => vec![("-".to_string(), d.join(SOCKET_NAME))],
        _ => discover(&bases(cli)),
    };
    for (name, path) in found {
        let answer = Client::connect(&path).and_then(|mut c| c.status());
        rows.push((name, path, answer));
    }
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, path, a)| match a {
                Ok(s) => serde_json::json!({"instance": name, "socket": path, "state": s.state, "status": s}),
                Err(e) => serde_json::json!({"instance": name, "socket": path, "state": "not-running", "error": e.to_string()}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
        return;
    }
    if rows.is_empty() {
        let where_ = bases(cli)
            .iter()
            .map(|b| b.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        println!("no taskrunner instances (looked under {where_})");
        return;
    }
    println!(
        "{:<24} {:<12} {:<20} {:>7} {:>8}  SOCKET",
        "INSTANCE", "STATE", "WORKER GROUP", "RUNNING", "PID"
    );
    for (name, path, a) in rows {
        match a {
            Ok(s) => println!(
                "{:<24} {:<12} {:<20} {:>7} {:>8}  {}",
                name,
                s.state,
                s.worker_group,
                format!("{}/{}", s.running.len(), s.slots),
                s.pid,
                path.display()
            ),
            Err(ClientError::NotRunning { .. }) => {
                println!(
                    "{:<24} {:<12} {:<20} {:>7} {:>8}  {} (stale)",
                    name,
                    "not-running",
                    "-",
                    "-",
                    "-",
                    path.display()
                )
            }
            Err(e) => println!("{:<24} {:<12} {e}", name, "unknown"),
        }
    }
}

fn use_colour() -> bool {
    std::io::stdout().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// The human form of `taskrunner-ctl status` at `now` (Unix seconds); ANSI colour when `colour`.
pub fn render_status(s: &StatusSnapshot, now: i64, colour: bool) -> String {
    use std::fmt::Write;
    let paint = |code: &str, text: &str| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    };
    let state_colour = match s.state.as_str() {
        "polling" => "32",
        "backing-off" | "draining" | "paused" | "starting" => "33",
        _ => "31",
    };
    let ago = |t: Option<i64>| match t {
        Some(t) => format!("{} ago ({})", human_secs(now - t), iso(t)),
        None => "never".to_string(),
    };
    let mut o = String::new();
    let name = label(s);
    let _ = writeln!(
        o,
        "{} taskrunner {} - {}",
        paint(state_colour, "●"),
        name,
        paint(&format!("1;{state_colour}"), &s.state)
    );
    let mut row = |k: &str, v: String| {
        let _ = writeln!(o, "  {:<15} {v}", format!("{k}:"));
    };
    row("version", s.version.clone());
    row("worker group", s.worker_group.clone());
    row("endpoint", format!("{} ({})", s.endpoint, s.region));
    row("pid", s.pid.to_string());
    row(
        "uptime",
        format!("{} (since {})", human_secs(now - s.started_at), iso(s.started_at)),
    );
    row("tasks", format!("{}/{} running", s.running.len(), s.slots));
    let c = &s.counters;
    row(
        "counters",
        format!(
            "{} finished, {} failed, {} canceled, {} false",
            c.finished, c.failed, c.canceled, c.r#false
        ),
    );
    row("last poll", ago(s.last_poll_ok));
    row("last heartbeat", ago(s.last_heartbeat_ok));
    row(
        "backoff",
        match &s.backoff {
            Some(b) => paint(
                "33",
                &format!(
                    "{} (attempt {}), next try in {} at {}",
                    b.reason,
                    b.attempt,
                    human_secs(b.next_try_at - now),
                    iso(b.next_try_at)
                ),
            ),
            None => "none".to_string(),
        },
    );
    row("upload queue", format!("{} file(s)", s.upload_queue_depth));
    let disk = if s.disk_budget_bytes > 0 {
        let pct = s.disk_used_bytes as f64 * 100.0 / s.disk_budget_bytes as f64;
        let text = format!(
            "{} of {} ({pct:.0}%)",
            human_bytes(s.disk_used_bytes),
            human_bytes(s.disk_budget_bytes)
        );
        if pct >= 90.0 {
            paint("31", &text)
        } else {
            text
        }
    } else {
        format!("{} (no budget)", human_bytes(s.disk_used_bytes))
    };
    row("disk", disk);
    row("config", s.config_source.clone());
    if !s.running.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "  {:<24} {:<24} {:<22} {:<24} {:>8} {:>8}",
            "TASK ID", "ATTEMPT ID", "PIPELINE ID", "ACTIVITY", "PID", "ELAPSED"
        );
        for t in &s.running {
            let _ = writeln!(
                o,
                "  {:<24} {:<24} {:<22} {:<24} {:>8} {:>8}",
                t.task_id,
                t.attempt_id,
                t.pipeline_id,
                t.activity_type,
                t.pid.map_or("-".to_string(), |p| p.to_string()),
                human_secs(now - t.started_at)
            );
        }
    }
    o
}

fn iso(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| t.to_string())
}

/// `512 B`, `12.3 MiB`, `1.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Backoff, Counters, RunningTask};

    #[test]
    fn renders_every_field() {
        let now = 1_700_000_000;
        let s = StatusSnapshot {
            state: "backing-off".into(),
            version: "0.1.0".into(),
            instance: "wg-12345".into(),
            worker_group: "wg-12345".into(),
            endpoint: "http://127.0.0.1:1234".into(),
            region: "us-east-1".into(),
            pid: 4242,
            started_at: now - 3 * 3600,
            slots: 2,
            running: vec![RunningTask {
                task_id: "task-1".into(),
                attempt_id: "@attempt_1".into(),
                pipeline_id: "df-0001".into(),
                activity_type: "ShellCommandActivity".into(),
                pid: Some(777),
                started_at: now - 90,
            }],
            counters: Counters {
                finished: 5,
                failed: 1,
                canceled: 2,
                r#false: 3,
            },
            last_poll_ok: Some(now - 3),
            last_heartbeat_ok: None,
            backoff: Some(Backoff {
                reason: "endpoint unreachable".into(),
                next_try_at: now + 40,
                attempt: 4,
            }),
            upload_queue_depth: 7,
            disk_used_bytes: 3 * 1024 * 1024,
            disk_budget_bytes: 1024 * 1024 * 1024,
            config_source: "/etc/taskrunner/config.toml".into(),
        };
        let out = render_status(&s, now, false);
        for want in [
            "taskrunner wg-12345 - backing-off",
            "0.1.0",
            "http://127.0.0.1:1234 (us-east-1)",
            "4242",
            "3h00m",
            "1/2 running",
            "5 finished, 1 failed, 2 canceled, 3 false",
            "last poll:      3s ago",
            "last heartbeat: never",
            "endpoint unreachable (attempt 4), next try in 40s",
            "7 file(s)",
            "3.0 MiB of 1.0 GiB (0%)",
            "/etc/taskrunner/config.toml",
            "task-1",
            "@attempt_1",
            "df-0001",
            "ShellCommandActivity",
            "777",
            "1m",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        assert!(!out.contains('\x1b'), "no colour unless asked");
        assert!(render_status(&s, now, true).contains("\x1b[33m"));
    }

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
