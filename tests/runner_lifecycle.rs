//! The daemon's life: heartbeats with its id, `terminate: true`, SIGTERM drains (task finishes;
//! drain timeout shorter than the task; idle), exit-after-tasks.

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const SIGTERM: i32 = 15;

#[test]
fn heartbeat_carries_the_id_and_terminate_drains_with_exit_0() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(
        tmp.path(),
        &[FAST_LOCAL, &["--terminate-runner", "tr-fixed-id"]].concat(),
    );
    let mut runner = Runner::start(
        &local,
        &tmp.path().join("r"),
        "heartbeat-interval = \"2s\"",
        &["--taskrunnerId=tr-fixed-id"],
    );
    // Only a heartbeat that carries this id is answered `terminate: true`.
    let code = runner.proc.wait_exit(WAIT);
    assert_eq!(code, Some(0), "{}", runner.log());
    assert!(runner.log().contains("asked this task runner to terminate"));
}

#[test]
fn a_generated_id_is_persisted_and_kept_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let dir = tmp.path().join("r");
    let mut r1 = Runner::start(&local, &dir, "", &[]);
    let id_file = dir.join("state/taskrunner-id");
    let id = wait_for("the id file", WAIT, || std::fs::read_to_string(&id_file).ok());
    r1.proc.signal(SIGTERM);
    assert_eq!(r1.proc.wait_exit(WAIT), Some(0));
    let mut r2 = Runner::start(&local, &dir, "", &[]);
    r2.proc.signal(SIGTERM);
    assert_eq!(r2.proc.wait_exit(WAIT), Some(0));
    assert_eq!(std::fs::read_to_string(&id_file).unwrap(), id);
    assert!(r2.log().contains(id.trim()), "the id is logged at start");
}

#[test]
fn sigterm_while_idle_exits_fast() {
    let tmp = tempfile::tempdir().unwrap();
    // A long poll the runner is sitting in when the signal comes.
    let local = Local::start(tmp.path(), &["--long-poll-seconds", "60"]);
    let mut runner = Runner::start(&local, &tmp.path().join("r"), "", &[]);
    runner
        .proc
        .wait_output("the first poll", |o| o.contains("instance identity checked"));
    std::thread::sleep(Duration::from_secs(1));
    let start = Instant::now();
    runner.proc.signal(SIGTERM);
    assert_eq!(runner.proc.wait_exit(WAIT), Some(0), "{}", runner.log());
    // Well under a second on an idle machine; generous for a loaded one.
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

#[test]
fn sigterm_lets_a_running_task_finish_and_report() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let started = tmp.path().join("started");
    let pid = local.submit(&shell_pipeline(
        &format!("touch {}; sleep 5", started.display()),
        json!({}),
    ));
    let mut runner = Runner::start(&local, &tmp.path().join("r"), "", &[]);
    wait_for("the task to start", WAIT, || started.exists().then_some(()));
    runner.proc.signal(SIGTERM);
    assert_eq!(runner.proc.wait_exit(WAIT), Some(0), "{}", runner.log());
    let a = local.wait_attempt(&pid, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("@status"), Some("FINISHED"), "{}", runner.log());
}

#[test]
fn sigterm_with_a_short_drain_timeout_fails_the_task_and_kills_its_group() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let pids = tmp.path().join("pids");
    let pid = local.submit(&shell_pipeline(
        &format!("trap '' TERM; sleep 600 & echo $! > {}; wait", pids.display()),
        json!({}),
    ));
    let mut runner = Runner::start(&local, &tmp.path().join("r"), "drain-timeout = \"2s\"", &[]);
    let gc: i32 = wait_for("the pid file", WAIT, || {
        std::fs::read_to_string(&pids).ok()?.trim().parse().ok()
    });
    runner.proc.signal(SIGTERM);
    assert_eq!(runner.proc.wait_exit(WAIT), Some(0), "{}", runner.log());
    assert!(!alive(gc), "the task's process outlived the drain");
    let a = local.wait_attempt(&pid, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("errorId"), Some("TaskRunnerShutdown"), "{a:?}");
}

#[test]
fn exit_after_tasks_takes_exactly_that_many() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let p1 = local.submit(&shell_pipeline("true", json!({})));
    let p2 = local.submit(&shell_pipeline("true", json!({})));
    let mut runner = Runner::start(&local, &tmp.path().join("r"), "", &["--exit-after-tasks", "1"]);
    assert_eq!(runner.proc.wait_exit(WAIT), Some(0), "{}", runner.log());
    let done: usize = [&p1, &p2]
        .iter()
        .filter(|p| {
            local
                .attempts(p)
                .iter()
                .any(|a| a.get("@status") == Some("FINISHED"))
        })
        .count();
    assert_eq!(done, 1);
}
