//! Concurrency and delivery: `--tasks 4` runs four at once; 50 tasks across 3 runners run exactly
//! once; a precondition waiting on retryDelay does not block an activity; the endpoint down for
//! ~30 s; a scriptUri from a real S3 (moto).

mod common;
use common::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn four_slots_run_four_tasks_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let marks = tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    // Each task marks itself started, then waits until four marks exist (or gives up after 60 s).
    let cmd = format!(
        "touch {m}/$1; for i in $(seq 600); do [ $(ls {m} | wc -l) -ge 4 ] && exit 0; sleep 0.1; done; exit 1",
        m = marks.display()
    );
    let ids: Vec<String> = (0..4)
        .map(|i| local.submit(&shell_pipeline(&cmd, json!({"scriptArgument": format!("t{i}")}))))
        .collect();
    let runner = Runner::start(&local, &tmp.path().join("r"), "", &["--tasks", "4"]);
    for id in &ids {
        let a = local.wait_attempt(id, &["FINISHED", "FAILED"]);
        assert_eq!(a.get("@status"), Some("FINISHED"), "{a:?}\n{}", runner.log());
    }
}

#[test]
fn fifty_tasks_across_three_runners_run_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let ledger = tmp.path().join("ledger");
    let ids: Vec<String> = (0..50)
        .map(|i| {
            local.submit(&shell_pipeline(
                &format!("echo $1 >> {}", ledger.display()),
                json!({"scriptArgument": format!("task-{i}")}),
            ))
        })
        .collect();
    let _runners: Vec<Runner> = (0..3)
        .map(|i| Runner::start(&local, &tmp.path().join(format!("r{i}")), "", &["--tasks", "3"]))
        .collect();
    for id in &ids {
        let a = local.wait_attempt(id, &["FINISHED", "FAILED"]);
        assert_eq!(a.get("@status"), Some("FINISHED"), "{a:?}");
    }
    let text = std::fs::read_to_string(&ledger).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    let before = lines.len();
    lines.dedup();
    assert_eq!(before, 50, "some task ran twice or not at all");
    assert_eq!(lines.len(), 50);
}

#[test]
fn a_waiting_precondition_does_not_block_an_activity() {
    let tmp = tempfile::tempdir().unwrap();
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let counter = tmp.path().join("checks");
    let check = format!(
        "n=$(cat {f} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {f}; [ $n -ge 3 ]",
        f = counter.display()
    );
    let guarded = local.submit(&json!({"objects": [
        {"id": "Default", "name": "Default", "scheduleType": "ondemand"},
        {"id": "Ready", "name": "Ready", "type": "ShellCommandPrecondition", "command": check,
         "retryDelay": "3 seconds", "preconditionTimeout": "5 minutes"},
        {"id": "Act", "name": "Act", "type": "ShellCommandActivity", "workerGroup": WORKER_GROUP,
         "command": "true", "precondition": {"ref": "Ready"}, "maximumRetries": "0"}
    ]}));
    // One activity slot: if the precondition held it, the second pipeline could not run.
    let runner = Runner::start(&local, &tmp.path().join("r"), "", &["--tasks", "1"]);
    wait_for("the first check", WAIT, || counter.exists().then_some(()));
    let other = local.submit(&shell_pipeline("true", json!({})));
    let a = local.wait_attempt(&other, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("@status"), Some("FINISHED"));
    let checks_when_other_done: u32 = std::fs::read_to_string(&counter).unwrap().trim().parse().unwrap();
    assert!(
        checks_when_other_done < 3,
        "the activity waited for the precondition\n{}",
        runner.log()
    );
    let a = local.wait_attempt(&guarded, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("@status"), Some("FINISHED"), "{}", runner.log());
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "3");
}

#[test]
fn endpoint_down_for_a_while_then_the_status_is_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("dp-state");
    let mut local = Local::start(
        tmp.path(),
        &[FAST_LOCAL, &["--state", state.to_str().unwrap()]].concat(),
    );
    let started = tmp.path().join("started");
    let pid = local.submit(&shell_pipeline(
        &format!("touch {}; sleep 10", started.display()),
        json!({}),
    ));
    let runner = Runner::start(&local, &tmp.path().join("r"), "", &[]);
    wait_for("the task to start", WAIT, || started.exists().then_some(()));
    local.kill();
    // The task finishes while the endpoint is down; the runner backs off.
    std::thread::sleep(Duration::from_secs(25));
    assert!(runner.log().contains("SetTaskStatus failed") || runner.log().contains("failed"));
    local.restart();
    let a = local.wait_attempt(&pid, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("@status"), Some("FINISHED"), "{a:?}\n{}", runner.log());
    // And it polls again: a new task runs.
    let next = local.submit(&shell_pipeline("true", json!({})));
    assert_eq!(
        local.wait_attempt(&next, &["FINISHED", "FAILED"]).get("@status"),
        Some("FINISHED")
    );
}

#[test]
fn script_uri_from_s3_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start(tmp.path());
    let out = tmp.path().join("script-ran");
    moto.put(
        "scripts",
        "jobs/run.sh",
        format!("#!/bin/sh\necho \"from s3: $1\" > {}\n", out.display()).as_bytes(),
    );
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let pid = local.submit(&json!({"objects": [
        {"id": "Default", "name": "Default", "scheduleType": "ondemand"},
        {"id": "Act", "name": "Act", "type": "ShellCommandActivity", "workerGroup": WORKER_GROUP,
         "scriptUri": "s3://scripts/jobs/run.sh", "scriptArgument": "hello",
         "stdout": "s3://scripts/out/stdout.txt", "maximumRetries": "0"}
    ]}));
    let runner = Runner::start(
        &local,
        &tmp.path().join("r"),
        &format!("s3-endpoint = \"{}\"", moto.url),
        &[],
    );
    let a = local.wait_attempt(&pid, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("@status"), Some("FINISHED"), "{a:?}\n{}", runner.log());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "from s3: hello\n");
    assert!(
        moto.get("scripts", "out/stdout.txt").is_some(),
        "stdout was not uploaded"
    );
}

/// `--logUri`: at shutdown every hourly file (the current one too) goes to
/// `<logUri>/<taskrunnerId>/TaskRunner.log.YYYY-MM-DD-HH.gz`, compressed, as the jar pushes its logs.
#[test]
fn log_uri_gets_the_hourly_log_at_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let moto = Moto::start(tmp.path());
    moto.put("logs-bucket", "placeholder", b"x");
    let local = Local::start(tmp.path(), FAST_LOCAL);
    let hour_before = chrono::Utc::now().format("%Y-%m-%d-%H").to_string();
    let pid = local.submit(&shell_pipeline("echo shipped", json!({})));
    let mut runner = Runner::start(
        &local,
        &tmp.path().join("r"),
        &format!("s3-endpoint = \"{}\"", moto.url),
        &[
            "--logUri=s3://logs-bucket/tr-logs",
            "--taskrunnerId=tr-ship-test",
            "--exit-after-tasks",
            "1",
        ],
    );
    let a = local.wait_attempt(&pid, &["FINISHED", "FAILED"]);
    assert_eq!(a.get("@status"), Some("FINISHED"), "{a:?}");
    assert_eq!(
        runner.proc.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        runner.log()
    );
    // The hour may have turned while the test ran: the start line is in the file of the first hour.
    let key = format!("tr-logs/tr-ship-test/TaskRunner.log.{hour_before}.gz");
    let body = moto
        .get("logs-bucket", &key)
        .unwrap_or_else(|| panic!("{key} was not uploaded\n{}", runner.log()));
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&body[..]), &mut text).unwrap();
    assert!(
        text.contains("starting"),
        "the uploaded log lacks the start line: {text}"
    );
}
