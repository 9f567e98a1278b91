//! The real `taskrunner` binary against bad command lines, settings and credentials files: each
//! exits 78 (EX_CONFIG) with a message that names the problem, and no secret is ever printed.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY";

fn taskrunner(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskrunner"));
    cmd.current_dir(dir).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKRUNNER_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("spawn taskrunner")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write(dir: &Path, name: &str, body: &str, mode: u32) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p.display().to_string()
}

#[test]
fn bad_command_lines_and_configs_exit_78_naming_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let good_creds = write(
        d,
        "good.json",
        &format!(r#"{{"access-id": "AKIDX", "private-key": "{SECRET}"}}"#),
        0o600,
    );
    let open_creds = write(
        d,
        "open.json",
        &format!(r#"{{"access-id": "AKIDX", "private-key": "{SECRET}"}}"#),
        0o644,
    );
    let broken_creds = write(
        d,
        "broken.json",
        r#"{"access-id": "AKIDX", "private-key": "#,
        0o600,
    );
    let unknown_key_creds = write(
        d,
        "unknown.json",
        r#"{"access-id": "AKIDX", "private-key": "x", "secret": "y"}"#,
        0o600,
    );
    let bad_key = write(d, "bad-key.toml", "tasks = 2\nworker_group = \"wg\"\n", 0o644);
    let bad_type = write(d, "bad-type.toml", "\n\ntasks = \"many\"\n", 0o644);
    let bad_toml = write(d, "bad.toml", "tasks = [\n", 0o644);
    let empty = write(d, "empty.toml", "", 0o644);

    // (arguments, what the message must name)
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--settings", &empty, "--config", &good_creds],
            vec!["workerGroup"],
        ),
        (
            vec!["--workerGroup=wg", "--settings", &empty, "--tasks", "0"],
            vec!["tasks"],
        ),
        (
            vec!["--workerGroup=wg", "--settings", &empty, "--tasks=abc"],
            vec!["tasks"],
        ),
        (
            vec!["--workerGroup=wg", "--settings", &empty, "--bogusOption=1"],
            vec!["bogusOption"],
        ),
        (
            vec!["--workerGroup=wg", "--settings", "/nonexistent/config.toml"],
            vec!["/nonexistent/config.toml"],
        ),
        (
            vec!["--workerGroup=wg", "--settings", &bad_key],
            vec!["bad-key.toml", ":2", "worker_group"],
        ),
        (
            vec!["--workerGroup=wg", "--settings", &bad_type],
            vec!["bad-type.toml", ":3", "tasks"],
        ),
        (
            vec!["--workerGroup=wg", "--settings", &bad_toml],
            vec!["bad.toml"],
        ),
        (
            vec!["--workerGroup=wg", "--settings", &empty, "--config", &open_creds],
            vec!["open.json", "chmod 600"],
        ),
        (
            vec![
                "--workerGroup=wg",
                "--settings",
                &empty,
                "--config",
                &broken_creds,
            ],
            vec!["broken.json"],
        ),
        (
            vec![
                "--workerGroup=wg",
                "--settings",
                &empty,
                "--config",
                &unknown_key_creds,
            ],
            vec!["unknown.json", "secret"],
        ),
        (
            vec![
                "--workerGroup=wg",
                "--settings",
                &empty,
                "--config",
                "/nonexistent/creds.json",
            ],
            vec!["/nonexistent/creds.json"],
        ),
        (
            vec![
                "--workerGroup=wg",
                "--settings",
                &empty,
                "--exit-after-idle",
                "soon",
            ],
            vec!["exit-after-idle"],
        ),
        (
            vec![
                "--workerGroup=wg",
                "--settings",
                &empty,
                "--logUri=http://not-s3/x",
            ],
            vec!["logUri"],
        ),
    ];
    for (args, needles) in cases {
        let o = taskrunner(d, &args);
        let t = text(&o);
        assert_eq!(
            o.status.code(),
            Some(78),
            "{args:?} exited {:?}: {t}",
            o.status.code()
        );
        for n in needles {
            assert!(t.contains(n), "{args:?}: the message does not name {n:?}: {t}");
        }
        assert!(!t.contains(SECRET), "{args:?} printed the secret: {t}");
    }
}

#[test]
fn check_config_shows_sources_and_never_the_secret() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let creds = write(
        d,
        "c.json",
        &format!(r#"{{"access-id": "AKIDX", "private-key": "{SECRET}"}}"#),
        0o600,
    );
    let settings = write(d, "s.toml", "# a comment\ntasks = 3\n", 0o644);
    let o = taskrunner(
        d,
        &[
            "--workerGroup=wg-1",
            "--settings",
            &settings,
            "--config",
            &creds,
            "--check-config",
        ],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(t.contains("wg-1") && t.contains("s.toml:2"), "{t}");
    assert!(!t.contains(SECRET), "{t}");

    // Keys on the command line work too (with a warning that `ps` shows them), and stay redacted.
    let o = taskrunner(
        d,
        &[
            "--workerGroup=wg-1",
            "--settings",
            &settings,
            "--accessId",
            "AKIDY",
            "--secretKey",
            SECRET,
            "--check-config",
        ],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(!t.contains(SECRET), "{t}");
}
