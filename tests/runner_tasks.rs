//! The real `taskrunner` against the real `datapipeline-local` (SigV4 keys): what a task does and
//! what the service hears about it.

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn create_directory_finishes_and_the_directory_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let target = tmp.path().join("made/new-directory");
    let pid = local.submit(&shell_pipeline(
        "mkdir -p \"$1\"",
        json!({"scriptArgument": target.display().to_string()}),
    ));
    let runner = Runner::start(&local, &tmp.path().join("r"), "", &[]);
    let a = local.wait_attempt(&pid, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("@status"), Some("FINISHED"), "{a:?}\n{}", runner.log());
    assert!(target.is_dir());
    // Per-attempt logs exist.
    let dir = runner.attempt_dir(&pid);
    let activity = std::fs::read_to_string(dir.join("activity.log")).unwrap();
    assert!(activity.contains("exit: exit status 0"), "{activity}");
    assert!(runner.log().contains("Logging to "));
    assert!(
        !runner.log().contains(SECRET_KEY),
        "the secret key leaked into the log"
    );
}

#[test]
fn failures_report_exit_status_and_a_short_stderr_tail_and_arguments_arrive_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let failing = local.submit(&shell_pipeline(
        "echo 'table x is missing' >&2; exit 3",
        json!({}),
    ));
    let noisy = local.submit(&shell_pipeline(
        "head -c 1048576 /dev/zero | tr '\\0' 'e' >&2; echo; echo 'final: disk full' >&2; exit 1",
        json!({}),
    ));
    let out = tmp.path().join("args.txt");
    let args = local.submit(&shell_pipeline(
        &format!("printf '%s|' \"$1\" \"$2\" \"$3\" > {}", out.display()),
        json!({"scriptArgument": ["first arg", "second", "third $HOME"]}),
    ));
    let unsupported = local.submit(&json!({"objects": [
        {"id": "Default", "name": "Default", "scheduleType": "ondemand"},
        {"id": "Hive", "name": "Hive", "type": "HiveActivity", "workerGroup": WORKER_GROUP,
         "hiveScript": "select 1", "maximumRetries": "0"}
    ]}));
    let runner = Runner::start(&local, &tmp.path().join("r"), "", &["--tasks", "3"]);

    let a = local.wait_attempt(&failing, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("@status"), Some("FAILED"), "{}", runner.log());
    assert_eq!(a.get("errorId"), Some("ShellCommandFailed"), "{a:?}");
    let m = a.get("errorMessage").unwrap();
    assert!(
        m.contains("exit status 3") && m.contains("table x is missing"),
        "{m}"
    );

    let a = local.wait_attempt(&noisy, &["FINISHED", "FAILED"]);
    let m = a.get("errorMessage").unwrap();
    assert!(
        m.contains("exit status 1") && m.contains("final: disk full"),
        "{m}"
    );
    assert!(m.len() < 4096, "message of {} bytes", m.len());
    assert!(a.get("errorStackTrace").map_or(0, |s| s.chars().count()) <= 1024);
    let dir = runner.attempt_dir(&noisy);
    assert!(std::fs::metadata(dir.join("stderr")).unwrap().len() > 1_048_576);

    let a = local.wait_attempt(&args, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("@status"), Some("FINISHED"));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "first arg|second|third $HOME|"
    );

    let a = local.wait_attempt(&unsupported, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("@status"), Some("FAILED"));
    assert_eq!(a.get("errorId"), Some("UnsupportedActivity"));
    assert!(a.get("errorMessage").unwrap().contains("HiveActivity"));
}

#[test]
fn attempt_timeout_kills_and_fails_the_task() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let pids = tmp.path().join("pid");
    let pid = local.submit(&shell_pipeline(
        &format!("sleep 600 & echo $! > {}; wait", pids.display()),
        json!({"attemptTimeout": "3 seconds"}),
    ));
    // The endpoint enforces attemptTimeout too; with a long progress period the runner does not
    // hear about it, so what stops the process here is the runner's own timer.
    let runner = Runner::start(&local, &tmp.path().join("r"), "progress-interval = \"60s\"", &[]);
    let gc: i32 = wait_for("the pid file", WAIT, || {
        std::fs::read_to_string(&pids).ok()?.trim().parse().ok()
    });
    wait_for("the timed-out task to be killed", Duration::from_secs(60), || {
        (!alive(gc)).then_some(())
    });
    let a = local.wait_attempt(&pid, &["FAILED"]);
    assert_eq!(a.get("@status"), Some("FAILED"));
    runner
        .proc
        .wait_output("the local timeout", |o| o.contains("Timeout(3s)"));
}

#[test]
fn try_cancel_kills_the_whole_tree_and_sends_no_status() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let pids = tmp.path().join("pids");
    let pid = local.submit(&shell_pipeline(
        &format!(
            "sleep 600 & echo $! > {p}.gc; echo $$ > {p}.sh; wait",
            p = pids.display()
        ),
        json!({}),
    ));
    let runner = Runner::start(&local, &tmp.path().join("r"), "", &[]);
    let read = |ext: &str| -> i32 {
        wait_for("the task's pid files", WAIT, || {
            std::fs::read_to_string(pids.with_extension(ext))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
    };
    let (gc, sh) = (read("gc"), read("sh"));
    assert!(alive(gc) && alive(sh));
    let attempt = local.wait_attempt(&pid, &["RUNNING"]);
    let instance = attempt.get("@instanceParent").unwrap().to_string();
    local.call(
        "SetStatus",
        json!({"pipelineId": pid, "objectIds": [instance], "status": "TRY_CANCEL"}),
    );
    let start = Instant::now();
    wait_for("the task's processes to die", Duration::from_secs(60), || {
        (!alive(gc) && !alive(sh)).then_some(())
    });
    assert!(start.elapsed() < Duration::from_secs(60));
    runner
        .proc
        .wait_output("the cancel to be logged", |o| o.contains("no status is sent"));
    let a = local.attempts(&pid).pop().unwrap();
    assert_ne!(a.get("@status"), Some("FAILED"), "{a:?}");
    assert_ne!(a.get("@status"), Some("FINISHED"), "{a:?}");
    assert!(a.get("errorId").is_none(), "{a:?}");
}
