//! The real `taskrunner-ctl` binary against a control server run in the test (real Unix socket,
//! real peer credentials), fed a `StatusSnapshot` and a small stand-in for the daemon's loop.

#[path = "service_support/mod.rs"]
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{is_root, TestUser};
use taskrunner::control::{self, ControlCommand, SOCKET_NAME};
use taskrunner::status::{Counters, RunningTask, StatusSnapshot};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const INSTANCE: &str = "wg-test";

fn snapshot() -> StatusSnapshot {
    let now = chrono::Utc::now().timestamp();
    StatusSnapshot {
        state: "polling".into(),
        version: "9.8.7".into(),
        instance: INSTANCE.into(),
        worker_group: "wg-test".into(),
        endpoint: "http://127.0.0.1:4567".into(),
        region: "eu-west-1".into(),
        pid: 31337,
        started_at: now - 7200,
        slots: 2,
        running: vec![RunningTask {
            task_id: "task-abc".into(),
            attempt_id: "@attempt-xyz".into(),
            pipeline_id: "df-PIPE".into(),
            activity_type: "ShellCommandActivity".into(),
            pid: Some(4321),
            started_at: now - 65,
        }],
        counters: Counters {
            finished: 11,
            failed: 2,
            canceled: 1,
            r#false: 4,
        },
        last_poll_ok: Some(now - 2),
        last_heartbeat_ok: Some(now - 600),
        backoff: None,
        upload_queue_depth: 3,
        disk_used_bytes: 10 * 1024 * 1024,
        disk_budget_bytes: 1024 * 1024 * 1024,
        config_source: "/etc/taskrunner/config.toml".into(),
    }
}

/// A control server plus a stand-in for the loop: drain pauses and, after `finish_after`,
/// lets the running task end; resume polls again. Every command that reaches it is logged.
struct Daemon {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    sock: PathBuf,
    seen: Arc<Mutex<Vec<&'static str>>>,
    cancel: CancellationToken,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(owner_uid: u32, chown: Option<(u32, u32)>, finish_after: Duration) -> Daemon {
    let tmp = tempfile::tempdir().unwrap();
    // Other users must be able to reach the socket's directory (it is 0750 itself).
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let base = tmp.path().join("run");
    let sock = base.join(INSTANCE).join(SOCKET_NAME);
    let (stx, srx) = watch::channel(snapshot());
    let (ctx, mut crx) = mpsc::channel(8);
    let cancel = CancellationToken::new();
    control::bind(&sock, chown)
        .unwrap()
        .serve(srx, ctx, owner_uid, cancel.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some(cmd) = crx.recv().await {
            match cmd {
                ControlCommand::Drain { reply } => {
                    log.lock().unwrap().push("drain");
                    stx.send_modify(|s| s.state = "paused".into());
                    reply.send(Ok(())).unwrap();
                    let stx = stx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(finish_after).await;
                        stx.send_modify(|s| {
                            s.running.clear();
                            s.counters.finished += 1;
                        });
                    });
                }
                ControlCommand::Resume { reply } => {
                    log.lock().unwrap().push("resume");
                    stx.send_modify(|s| s.state = "polling".into());
                    reply.send(Ok(())).unwrap();
                }
            }
        }
    });
    Daemon {
        _tmp: tmp,
        base,
        sock,
        seen,
        cancel,
    }
}

async fn ctl(args: &[&str], as_user: Option<(u32, u32)>) -> Output {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_taskrunner-ctl"));
    c.args(args)
        .env_remove("TASKRUNNER_RUNTIME_DIR")
        .env_remove("NO_COLOR")
        .env("NO_PROXY", "*")
        .kill_on_drop(true);
    if let Some((uid, gid)) = as_user {
        c.uid(uid).gid(gid);
    }
    tokio::time::timeout(Duration::from_secs(120), c.output())
        .await
        .expect("taskrunner-ctl finished")
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn rd(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_for_people_and_for_scripts() {
    let me = nix::unistd::Uid::effective().as_raw();
    let d = start(me, None, Duration::from_secs(1)).await;

    let o = ctl(&["--runtime-dir", rd(&d.base), "status", INSTANCE], None).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    for want in [
        "taskrunner wg-test - polling",
        "9.8.7",
        "http://127.0.0.1:4567 (eu-west-1)",
        "31337",
        "2h00m",
        "1/2 running",
        "11 finished, 2 failed, 1 canceled, 4 false",
        "last poll:",
        "last heartbeat: 10m ago",
        "backoff:        none",
        "3 file(s)",
        "10.0 MiB of 1.0 GiB",
        "/etc/taskrunner/config.toml",
        "task-abc",
        "@attempt-xyz",
        "df-PIPE",
        "ShellCommandActivity",
        "4321",
    ] {
        assert!(t.contains(want), "missing {want:?}:\n{t}");
    }
    assert!(
        !t.contains('\x1b'),
        "no colour when stdout is not a terminal:\n{t}"
    );

    // --json is the snapshot, whole.
    let o = ctl(&["--runtime-dir", rd(&d.base), "status", "--json"], None).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let parsed: StatusSnapshot = serde_json::from_slice(&o.stdout).expect("status --json parses");
    let mut want = snapshot();
    want.started_at = parsed.started_at;
    want.last_poll_ok = parsed.last_poll_ok;
    want.last_heartbeat_ok = parsed.last_heartbeat_ok;
    want.running[0].started_at = parsed.running[0].started_at;
    assert_eq!(parsed, want);

    // --socket, and the instance's own runtime directory as --runtime-dir.
    let o = ctl(&["--socket", rd(&d.sock), "status", "--json"], None).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = ctl(&["--runtime-dir", rd(d.sock.parent().unwrap()), "status"], None).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // list: the instance and its state.
    let o = ctl(&["--runtime-dir", rd(&d.base), "list"], None).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let row = t
        .lines()
        .find(|l| l.starts_with(INSTANCE))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(
        row.contains("polling") && row.contains("1/2") && row.contains("31337"),
        "{t}"
    );
    let o = ctl(&["--runtime-dir", rd(&d.base), "list", "--json"], None).await;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["instance"], INSTANCE);
    assert_eq!(v[0]["state"], "polling");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_daemon_exits_3_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("run");
    for args in [
        vec!["--runtime-dir", rd(&base), "status"],
        vec!["--runtime-dir", rd(&base), "status", "wg-none"],
        vec!["--runtime-dir", rd(&base), "drain", "wg-none"],
        vec!["--runtime-dir", rd(&base), "resume"],
    ] {
        let o = ctl(&args, None).await;
        let t = text(&o);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {t}");
        assert!(
            t.contains("not running") || t.contains("no taskrunner is running"),
            "{t}"
        );
    }
    // A socket file left by a crash, nobody listening: also 3, and `list` marks it stale.
    let stale = base.join("wg-dead").join(SOCKET_NAME);
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let o = ctl(&["--runtime-dir", rd(&base), "status", "wg-dead"], None).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let o = ctl(&["--socket", rd(&stale), "status", "--json"], None).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(o.stdout.is_empty());
    let o = ctl(&["--runtime-dir", rd(&base), "list"], None).await;
    let t = text(&o);
    assert!(t.contains("wg-dead") && t.contains("not-running"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_instances_need_a_name() {
    let me = nix::unistd::Uid::effective().as_raw();
    let a = start(me, None, Duration::from_secs(1)).await;
    // A second instance under the same base.
    let other = a.base.join("wg-other").join(SOCKET_NAME);
    let (_stx, srx) = watch::channel(StatusSnapshot {
        state: "backing-off".into(),
        ..Default::default()
    });
    let (ctx, _crx) = mpsc::channel(1);
    control::serve(&other, srx, ctx, me, a.cancel.clone()).unwrap();
    let o = ctl(&["--runtime-dir", rd(&a.base), "status"], None).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("wg-other") && t.contains(INSTANCE), "{t}");
    let o = ctl(&["--runtime-dir", rd(&a.base), "list"], None).await;
    let t = text(&o);
    assert!(t.contains("backing-off") && t.contains("polling"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_then_resume() {
    let me = nix::unistd::Uid::effective().as_raw();
    let d = start(me, None, Duration::from_secs(2)).await;
    let o = ctl(&["--runtime-dir", rd(&d.base), "drain", INSTANCE, "--wait"], None).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    // --wait answered only once the task was gone.
    assert!(t.contains("paused (0 running)"), "{t}");
    let o = ctl(&["--runtime-dir", rd(&d.base), "status", "--json"], None).await;
    let s: StatusSnapshot = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (s.state.as_str(), s.running.len(), s.counters.finished),
        ("paused", 0, 12)
    );
    let o = ctl(&["--runtime-dir", rd(&d.base), "resume"], None).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("polling"));
    assert_eq!(*d.seen.lock().unwrap(), vec!["drain", "resume"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_root_or_the_service_user_may_drain() {
    if !is_root() {
        eprintln!(
            "only_root_or_the_service_user_may_drain: skipped: needs root to create users (CI runs as root)"
        );
        return;
    }
    let service = TestUser::create();
    let stranger = TestUser::create();
    // The socket belongs to the service user; the stranger is in its group (as an operator in
    // the service group would be): able to connect, not to drain.
    let d = start(
        service.uid,
        Some((service.uid, stranger.gid)),
        Duration::from_millis(100),
    )
    .await;
    let base = rd(&d.base).to_string();
    let as_stranger = Some((stranger.uid, stranger.gid));

    let o = ctl(&["--runtime-dir", &base, "status", INSTANCE], as_stranger).await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "status is for anyone who can connect: {}",
        text(&o)
    );

    for cmd in ["drain", "resume"] {
        let o = ctl(&["--runtime-dir", &base, cmd, INSTANCE], as_stranger).await;
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{t}");
        assert!(t.contains(&format!("{cmd} refused")), "{t}");
        assert!(t.contains(&stranger.name) && t.contains(&service.name), "{t}");
    }
    assert!(
        d.seen.lock().unwrap().is_empty(),
        "a refused command never reaches the loop"
    );

    // Someone outside the group cannot even connect, and is told why.
    let o = ctl(
        &["--runtime-dir", &base, "status", INSTANCE],
        Some((65534, 65534)),
    )
    .await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("permission denied"), "{t}");

    let o = ctl(
        &["--runtime-dir", &base, "drain", INSTANCE],
        Some((service.uid, service.gid)),
    )
    .await;
    assert_eq!(
        o.status.code(),
        Some(0),
        "the service user may drain: {}",
        text(&o)
    );
    let o = ctl(&["--runtime-dir", &base, "resume", INSTANCE], None).await;
    assert_eq!(o.status.code(), Some(0), "root may resume: {}", text(&o));
    assert_eq!(*d.seen.lock().unwrap(), vec!["drain", "resume"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_uses_the_daemons_loader() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.toml");
    std::fs::write(&good, "worker-group = \"wg-valid\"\ntasks = 3\n").unwrap();
    let o = ctl(&["validate", "--settings", rd(&good)], None).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("wg-valid") && t.contains("tasks"), "{t}");
    // Daemon options after `--` count as on the daemon's command line.
    let o = ctl(&["validate", "--settings", rd(&good), "--", "--tasks=5"], None).await;
    assert!(text(&o).contains('5'), "{}", text(&o));

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "worker-group = \"wg-valid\"\ntasks = \"many\"\n").unwrap();
    let o = ctl(&["validate", "--settings", rd(&bad)], None).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(78), "{t}");
    assert!(
        t.contains("bad.toml") && t.contains("tasks"),
        "the error names file and key: {t}"
    );
}
