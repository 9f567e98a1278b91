//! The journald layer against a journal socket bound by the test (a Unix datagram socket read in
//! journald's native protocol), and the hourly file written at the same time.

#![cfg(unix)]

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use taskrunner::logs::journald::parse_datagram;
use taskrunner::logs::{build, Destination, Journald, LogConfig, ManualClock};

fn field<'a>(entry: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    entry
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
}

#[test]
fn task_entries_carry_the_structured_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("journal.sock");
    let journal = UnixDatagram::bind(&sock_path).unwrap();
    journal.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

    let mut cfg = LogConfig::new(tmp.path().join("output"), "info", "wg-12345");
    cfg.journald = Journald::On;
    cfg.journal_socket = sock_path.clone();
    cfg.use_rust_log_env = false;
    let clock = ManualClock::at(2026, 11, 30, 2, 30, 0);
    let (subscriber, handle) = build(&cfg, Arc::new(clock)).unwrap();
    assert_eq!(handle.destination(), Destination::Journald);

    tracing::subscriber::with_default(subscriber, || {
        tracing::info!("runner started");
        let span = tracing::info_span!(
            "task",
            pipeline_id = "df-00123456ABC7DEF8HIJK",
            task_id = "task-1",
            attempt_id = tracing::field::Empty,
            activity_type = "ShellCommandActivity"
        );
        span.record("attempt_id", "@A_2014-05-01T00:00:00_Attempt=1");
        let _e = span.enter();
        tracing::warn!(exit_code = 3, "command failed\nsecond line");
        tracing::debug!("filtered out at info");
    });

    let mut buf = vec![0u8; 256 * 1024];
    let mut entries = Vec::new();
    while entries.len() < 2 {
        let n = journal.recv(&mut buf).expect("a datagram within 30 s");
        if n == 0 {
            continue; // the connect probe
        }
        entries.push(parse_datagram(&buf[..n]).unwrap());
    }
    journal
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(journal.recv(&mut buf).is_err(), "the debug line must be filtered");

    let plain = &entries[0];
    assert_eq!(field(plain, "MESSAGE"), Some("runner started"));
    assert_eq!(field(plain, "WORKER_GROUP"), Some("wg-12345"));
    assert_eq!(field(plain, "PRIORITY"), Some("6"));
    assert_eq!(field(plain, "SYSLOG_IDENTIFIER"), Some("taskrunner"));
    assert_eq!(field(plain, "TASK_ID"), None);

    let task = &entries[1];
    assert_eq!(
        field(task, "MESSAGE"),
        Some("command failed\nsecond line exit_code=3")
    );
    assert_eq!(field(task, "PRIORITY"), Some("4"));
    assert_eq!(field(task, "WORKER_GROUP"), Some("wg-12345"));
    assert_eq!(field(task, "PIPELINE_ID"), Some("df-00123456ABC7DEF8HIJK"));
    assert_eq!(field(task, "TASK_ID"), Some("task-1"));
    assert_eq!(
        field(task, "ATTEMPT_ID"),
        Some("@A_2014-05-01T00:00:00_Attempt=1")
    );
    assert_eq!(field(task, "ACTIVITY_TYPE"), Some("ShellCommandActivity"));
    assert_eq!(field(task, "F_EXIT_CODE"), Some("3"));

    // The hourly file has the same lines, with the span.
    assert!(handle.shutdown());
    let text = std::fs::read_to_string(tmp.path().join("output/logs/TaskRunner.log.2026-11-30-02")).unwrap();
    assert!(text.contains("runner started"), "{text}");
    assert!(
        text.contains("task_id=\"task-1\"") || text.contains("task_id=task-1"),
        "{text}"
    );
}

#[test]
fn journald_on_without_a_journal_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = LogConfig::new(tmp.path().join("output"), "info", "wg");
    cfg.journald = Journald::On;
    cfg.journal_socket = tmp.path().join("nobody-listens.sock");
    let err = match build(&cfg, Arc::new(ManualClock::at(2026, 1, 1, 0, 0, 0))) {
        Ok(_) => panic!("must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("nobody-listens.sock"), "{err}");
}
