//! Privilege drop, directory preparation and the task identity, with real users and processes.
//! These need root (CI runs as root); as another user each test says so and does nothing.

#[path = "service_support/mod.rs"]
mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;

use nix::unistd::{Gid, Uid};
use support::{is_root, run_self, tagged, TestUser};
use taskrunner::config::{self, Settings};
use taskrunner::privileges::{self, PrivError};

const CHILD_USER: &str = "TASKRUNNER_TEST_DROP_TO";

fn skip_unless_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("{test}: skipped: needs root (CI runs as root)");
        return true;
    }
    false
}

/// Not a test of its own: the child half of `drop_to_sticks_in_a_real_process`, run in a
/// process of its own because a privilege drop cannot be undone. Does nothing without its env
/// var.
#[test]
fn child_entry_drop_to() {
    let Ok(user) = std::env::var(CHILD_USER) else {
        return;
    };
    match privileges::drop_to(&user, None) {
        Ok(()) => println!("CHILD drop=ok"),
        Err(e) => println!("CHILD drop=err {e}"),
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    for l in status.lines() {
        if l.starts_with("Uid:") || l.starts_with("Gid:") || l.starts_with("Groups:") {
            println!("CHILD {l}");
        }
    }
    let again = nix::unistd::setuid(Uid::from_raw(0));
    println!("CHILD setuid0={}", if again.is_ok() { "ok" } else { "refused" });
    let shadow = std::fs::File::open("/etc/shadow");
    println!(
        "CHILD shadow={}",
        if shadow.is_ok() { "readable" } else { "denied" }
    );
}

fn ids(line: &str) -> Vec<u32> {
    line.split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap())
        .collect()
}

#[test]
fn drop_to_sticks_in_a_real_process() {
    if skip_unless_root("drop_to_sticks_in_a_real_process") {
        return;
    }
    let user = TestUser::create();
    let out = run_self("child_entry_drop_to", &[(CHILD_USER, &user.name)]);
    let lines = tagged(&out, "CHILD ");
    let dump = format!("{lines:?}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{dump}");
    assert!(lines.contains(&"drop=ok".to_string()), "{dump}");
    let get = |p: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p}: {dump}"))
    };
    // Real, effective, saved and filesystem ids all switched.
    assert_eq!(ids(get("Uid:")), vec![user.uid; 4], "{dump}");
    assert_eq!(ids(get("Gid:")), vec![user.gid; 4], "{dump}");
    // Root's supplementary groups are gone: only the user's own.
    assert_eq!(ids(get("Groups:")), vec![user.gid], "{dump}");
    assert!(lines.contains(&"setuid0=refused".to_string()), "{dump}");
    assert!(lines.contains(&"shadow=denied".to_string()), "{dump}");
}

#[test]
fn drop_to_unknown_user_names_it() {
    let e = privileges::drop_to("no-such-user-for-taskrunner", None).unwrap_err();
    assert!(matches!(e, PrivError::UnknownUser(_)), "{e}");
    assert!(e.to_string().contains("no-such-user-for-taskrunner"), "{e}");
}

/// Settings as the daemon loads them (an empty settings file and the jar's two required
/// options), then `user` and `allow-root` as the test needs.
fn settings(user: Option<&str>, allow_root: bool) -> Settings {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("config.toml");
    std::fs::write(&file, "").unwrap();
    let args: Vec<std::ffi::OsString> = vec![
        "taskrunner".into(),
        "--workerGroup=wg-test".into(),
        "--region=us-east-1".into(),
        "--settings".into(),
        file.into_os_string(),
    ];
    let mut s = match config::load(args, &Default::default()) {
        Ok(config::Invocation::Run(s)) => *s,
        other => panic!("settings did not load: {other:?}"),
    };
    s.user = user.map(str::to_string);
    s.group = None;
    s.allow_root = allow_root;
    s
}

#[test]
fn tasks_never_run_as_root_by_accident() {
    if skip_unless_root("tasks_never_run_as_root_by_accident") {
        return;
    }
    // No user while root: refused, and the message says how to fix it.
    let e = privileges::task_identity(&settings(None, false)).unwrap_err();
    assert!(matches!(e, PrivError::RootRefused { .. }), "{e}");
    assert!(e.to_string().contains("allow-root = true"), "{e}");
    // A user that is uid 0 is root too.
    let e = privileges::task_identity(&settings(Some("root"), false)).unwrap_err();
    assert!(e.to_string().contains("uid 0"), "{e}");
    // Explicitly allowed: run as the daemon (root).
    assert_eq!(privileges::task_identity(&settings(None, true)).unwrap(), None);
    assert_eq!(
        privileges::task_identity(&settings(Some("root"), true)).unwrap(),
        None
    );
    // Unknown users are named.
    let e = privileges::task_identity(&settings(Some("no-such-user-for-taskrunner"), false)).unwrap_err();
    assert!(e.to_string().contains("no-such-user-for-taskrunner"), "{e}");
}

#[test]
fn a_task_runs_as_the_configured_user() {
    if skip_unless_root("a_task_runs_as_the_configured_user") {
        return;
    }
    let user = TestUser::create();
    let (uid, gid, groups) = privileges::task_identity(&settings(Some(&user.name), false))
        .unwrap()
        .expect("root with a user: an identity");
    assert_eq!((uid.as_raw(), gid.as_raw()), (user.uid, user.gid));
    assert!(groups.contains(&gid));
    // What the supervisor does: apply it in pre_exec, then exec the task.
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", "grep -E '^(Uid|Gid|Groups):' /proc/self/status"]);
    unsafe {
        cmd.pre_exec(move || privileges::become_identity(uid, gid, &groups));
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |p: &str| text.lines().find(|l| l.starts_with(p)).unwrap().to_string();
    assert_eq!(ids(&get("Uid:")), vec![user.uid; 4], "{text}");
    assert_eq!(ids(&get("Gid:")), vec![user.gid; 4], "{text}");
    assert_eq!(ids(&get("Groups:")), vec![user.gid], "{text}");
}

#[test]
fn prepare_dirs_hands_directories_to_the_service_user() {
    if skip_unless_root("prepare_dirs_hands_directories_to_the_service_user") {
        return;
    }
    let user = TestUser::create();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("var/lib/taskrunner/inst");
    let run = tmp.path().join("run/taskrunner/inst");
    // An existing directory with the wrong owner and mode is fixed too.
    std::fs::create_dir_all(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (u, g) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    privileges::prepare_dirs(&[(&state, 0o700), (&run, 0o750)], u, g).unwrap();
    for (dir, mode) in [(&state, 0o700), (&run, 0o750)] {
        let m = std::fs::metadata(dir).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{}", dir.display());
        assert_eq!((m.uid(), m.gid()), (user.uid, user.gid), "{}", dir.display());
    }
    // A planted symlink is not followed: the file it points at keeps root as owner.
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let e = privileges::prepare_dirs(&[(&link, 0o700)], u, g).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(std::fs::metadata(&victim).unwrap().uid(), 0);
}
