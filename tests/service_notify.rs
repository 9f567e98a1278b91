//! `service::Notifier::from_env` in a real child process (this test binary re-run with
//! NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID set as systemd sets them), read from a real
//! Unix datagram socket.

#[path = "service_support/mod.rs"]
mod support;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use support::tagged;
use taskrunner::service::Notifier;

const CHILD: &str = "TASKRUNNER_TEST_NOTIFY_CHILD";

/// Not a test of its own: the child half of the tests below. Does nothing without its env var.
#[test]
fn child_entry_notify() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let n = Notifier::from_env();
    println!("CHILD enabled={}", n.is_enabled());
    println!(
        "CHILD interval_ms={:?}",
        n.watchdog_interval().map(|d| d.as_millis())
    );
    n.ready().unwrap();
    n.status("polling wg-1: 0/2 running, last poll none yet").unwrap();
    n.watchdog().unwrap();
    n.stopping().unwrap();
    println!("CHILD done");
}

fn child(sock: Option<&std::path::Path>, extra: &[(&str, &str)], keep_pid: bool) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    // `exec` keeps the shell's pid, so `$$` is the pid the child will have: how systemd sets
    // WATCHDOG_PID to the main process.
    let script = if keep_pid {
        "WATCHDOG_PID=$$ exec \"$0\" \"$@\""
    } else {
        "exec \"$0\" \"$@\""
    };
    let mut c = Command::new("/bin/sh");
    c.args(["-c", script])
        .arg(&exe)
        .args(["--exact", "child_entry_notify", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    if let Some(s) = sock {
        c.env("NOTIFY_SOCKET", s);
    }
    for (k, v) in extra {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(tagged(&out, "CHILD ").contains(&"done".to_string()));
    out
}

fn datagrams(sock: &UnixDatagram) -> Vec<String> {
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 4096];
    let mut v = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        v.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_string());
    }
    v
}

#[test]
fn sequence_with_watchdog_for_our_pid() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let out = child(Some(&path), &[("WATCHDOG_USEC", "4000000")], true);
    let lines = tagged(&out, "CHILD ");
    assert!(lines.contains(&"enabled=true".to_string()), "{lines:?}");
    assert!(lines.contains(&"interval_ms=Some(2000)".to_string()), "{lines:?}");
    assert_eq!(
        datagrams(&sock),
        vec![
            "READY=1",
            "STATUS=polling wg-1: 0/2 running, last poll none yet",
            "WATCHDOG=1",
            "STOPPING=1"
        ]
    );
}

#[test]
fn watchdog_meant_for_another_pid_is_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    // PID 1 is never this child.
    let out = child(
        Some(&path),
        &[("WATCHDOG_USEC", "4000000"), ("WATCHDOG_PID", "1")],
        false,
    );
    assert!(tagged(&out, "CHILD ").contains(&"interval_ms=None".to_string()));
    let got = datagrams(&sock);
    assert!(!got.iter().any(|d| d.contains("WATCHDOG")), "{got:?}");
    assert_eq!(got.first().map(String::as_str), Some("READY=1"));
}

#[test]
fn watchdog_without_pid_is_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let out = child(Some(&path), &[("WATCHDOG_USEC", "1000000")], false);
    assert!(tagged(&out, "CHILD ").contains(&"interval_ms=Some(500)".to_string()));
    assert!(datagrams(&sock).contains(&"WATCHDOG=1".to_string()));
}

#[test]
fn without_notify_socket_everything_is_a_silent_no_op() {
    let out = child(None, &[("WATCHDOG_USEC", "1000000")], false);
    let lines = tagged(&out, "CHILD ");
    assert!(lines.contains(&"enabled=false".to_string()), "{lines:?}");
    // The child unwrapped every call: no error without a socket.
    assert!(lines.contains(&"done".to_string()));
}
