//! The config module's public contract as the daemon, `taskrunner-ctl` and the man-page generator
//! use it: `config::load`, `Invocation`, `ConfigError::exit_code`, `render_check`, `reload`,
//! `config::cli::command`. (The real binary is tested once its main exists.)

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;

use taskrunner::config::{self, Invocation};
use taskrunner::credentials::CredentialSource;

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

fn args(a: &[&str]) -> Vec<OsString> {
    std::iter::once("taskrunner")
        .chain(a.iter().copied())
        .map(OsString::from)
        .collect()
}

#[test]
fn every_jar_option_is_in_the_clap_command() {
    let help = config::cli::command().render_long_help().to_string();
    for opt in [
        "--config",
        "--accessId",
        "--secretKey",
        "--endpoint",
        "--workerGroup",
        "--taskrunnerId",
        "--output",
        "--region",
        "--logUri",
        "--proxyHost",
        "--proxyPort",
        "--proxyUsername",
        "--proxyPassword",
        "--proxyDomain",
        "--proxyWorkstation",
        "--tasks",
        "--jdbcDriverS3Path",
        "--s3NoProxy",
        "--settings",
        "--instance",
        "--exit-after-tasks",
        "--exit-after-idle",
        "--check-config",
        "--version",
        "--state-dir",
        "--runtime-dir",
        "--log-level",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help");
    }
}

#[test]
fn load_render_and_reload_through_the_public_api() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("config.toml");
    std::fs::write(&settings, "tasks = 3\n").unwrap();
    let creds = dir.path().join("credentials.json");
    std::fs::write(
        &creds,
        format!(r#"{{"access-id": "AKIDEXAMPLE", "private-key": "{SECRET}"}}"#),
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let env = BTreeMap::from([("TASKRUNNER_SETTINGS".to_string(), settings.display().to_string())]);

    let inv = config::load(
        args(&[
            "--config",
            creds.to_str().unwrap(),
            "--workerGroup=wg-12345",
            "--check-config",
        ]),
        &env,
    )
    .unwrap();
    let Invocation::CheckConfig(s) = inv else {
        panic!("expected CheckConfig")
    };
    assert_eq!(s.tasks.get(), 3);
    assert!(matches!(s.credentials, CredentialSource::File { .. }));
    let text = config::render_check(&s);
    assert!(text.contains("worker-group = \"wg-12345\""), "{text}");
    assert!(!text.contains(SECRET) && !format!("{s:?}").contains(SECRET));

    std::fs::write(&settings, "tasks = 5\n").unwrap();
    assert_eq!(config::reload(&s).unwrap().tasks.get(), 5);

    let e = config::load(args(&["--workerGroup=wg", "--tasks=none"]), &env).unwrap_err();
    assert_eq!(e.exit_code(), 78);
    assert_eq!(e.to_string(), "--tasks: \"none\" is not a whole number");
    let e = config::load(args(&["--workerGroup=wg", "--nope"]), &env).unwrap_err();
    assert_eq!(e.exit_code(), 78);
}
