//! The command line: the Java jar's options spelled exactly as the jar spells them (camelCase,
//! `--opt=value` and `--opt value`), plus the service options of this re-implementation
//! (kebab-case). [`command`] is the one clap `Command`, reachable for man pages and completions.
//!
//! Every value is kept as the text the user typed; typing and validation happen in the loader,
//! which quotes the flag back in its errors (`--tasks: "x" is not a whole number`).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgAction, CommandFactory, Parser};

/// `taskrunner`: AWS Data Pipeline's Task Runner as a system service.
#[derive(Debug, Default, Parser)]
#[command(
    name = "taskrunner",
    version,
    about = "AWS Data Pipeline Task Runner: polls a worker group, runs its tasks, reports their status",
    long_about = "AWS Data Pipeline Task Runner: polls a worker group, runs its tasks, reports their status.\n\n\
        Accepts the Java TaskRunner-1.0.jar's command line verbatim, e.g.\n  \
        taskrunner --config ~/credentials.json --workerGroup=wg-12345 --region=us-east-1 --logUri=s3://bucket/prefix\n\n\
        Settings are also read from /etc/taskrunner/config.toml, its config.d/*.toml fragments and \
        instances/<instance>.toml, and from TASKRUNNER_* environment variables. Precedence: command line > \
        environment > files > defaults. `--check-config` prints the result and where each value came from.",
    after_help = "Configuration errors exit 78 (EX_CONFIG)."
)]
pub struct Cli {
    // --- The Java jar's options (dp-taskrunner-config-options.md) ---
    /// Credentials JSON file: {"access-id": "...", "private-key": "..."}; must not be readable by group or others
    #[arg(
        long = "config",
        value_name = "CREDENTIALS_JSON",
        help_heading = "Task Runner options"
    )]
    pub config: Option<String>,

    /// AWS access key ID (takes precedence over --config; visible in `ps`, prefer a credentials file)
    #[arg(
        long = "accessId",
        alias = "accessID",
        value_name = "KEY_ID",
        help_heading = "Task Runner options"
    )]
    pub access_id: Option<String>,

    /// AWS secret access key, with --accessId (visible in `ps`, prefer a credentials file)
    #[arg(
        long = "secretKey",
        value_name = "SECRET",
        hide_env_values = true,
        help_heading = "Task Runner options"
    )]
    pub secret_key: Option<String>,

    /// Data Pipeline endpoint URL [default: https://datapipeline.<region>.amazonaws.com]
    #[arg(long = "endpoint", value_name = "URL", help_heading = "Task Runner options")]
    pub endpoint: Option<String>,

    /// Worker group to poll for tasks (required, here or in the settings)
    #[arg(
        long = "workerGroup",
        value_name = "NAME",
        help_heading = "Task Runner options"
    )]
    pub worker_group: Option<String>,

    /// ID reported in heartbeats [default: generated once and kept in the state directory]
    #[arg(
        long = "taskrunnerId",
        alias = "taskRunnerId",
        value_name = "ID",
        help_heading = "Task Runner options"
    )]
    pub taskrunner_id: Option<String>,

    /// Output directory: logs in <DIR>/logs, task logs in <DIR>/tasks [default: ./output, or $LOGS_DIRECTORY]
    #[arg(long = "output", value_name = "DIR", help_heading = "Task Runner options")]
    pub output: Option<String>,

    /// Service region [default: us-east-1]
    #[arg(long = "region", value_name = "REGION", help_heading = "Task Runner options")]
    pub region: Option<String>,

    /// S3 location the logs are shipped to every hour and at shutdown (`none`: no shipping)
    #[arg(long = "logUri", value_name = "S3_URI", help_heading = "Task Runner options")]
    pub log_uri: Option<String>,

    /// Proxy host for every AWS client (HTTPS_PROXY is honoured too)
    #[arg(long = "proxyHost", value_name = "HOST", help_heading = "Task Runner options")]
    pub proxy_host: Option<String>,

    /// Proxy port
    #[arg(
        long = "proxyPort",
        value_name = "PORT",
        allow_hyphen_values = true,
        help_heading = "Task Runner options"
    )]
    pub proxy_port: Option<String>,

    /// Proxy user name
    #[arg(
        long = "proxyUsername",
        value_name = "USER",
        help_heading = "Task Runner options"
    )]
    pub proxy_username: Option<String>,

    /// Proxy password (visible in `ps`, prefer the settings file)
    #[arg(
        long = "proxyPassword",
        value_name = "PASSWORD",
        help_heading = "Task Runner options"
    )]
    pub proxy_password: Option<String>,

    /// Windows domain for an NTLM proxy (accepted; NTLM is not implemented, a warning says so)
    #[arg(
        long = "proxyDomain",
        value_name = "DOMAIN",
        help_heading = "Task Runner options"
    )]
    pub proxy_domain: Option<String>,

    /// Windows workstation for an NTLM proxy (accepted; NTLM is not implemented, a warning says so)
    #[arg(
        long = "proxyWorkstation",
        value_name = "HOST",
        help_heading = "Task Runner options"
    )]
    pub proxy_workstation: Option<String>,

    /// Number of activity pollers, i.e. tasks run at once [default: 2]
    #[arg(long = "tasks", value_name = "N", help_heading = "Task Runner options")]
    pub tasks: Option<String>,

    /// S3 path of a JDBC driver (accepted for compatibility; not used yet, a warning says so)
    #[arg(
        long = "jdbcDriverS3Path",
        value_name = "S3_URI",
        help_heading = "Task Runner options"
    )]
    pub jdbc_driver_s3_path: Option<String>,

    /// Do not use the proxy for S3
    #[arg(
        long = "s3NoProxy",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        help_heading = "Task Runner options"
    )]
    pub s3_no_proxy: Option<String>,

    // --- Service options (this implementation) ---
    /// TOML settings file; config.d/*.toml and instances/<instance>.toml next to it are read too
    /// [default: /etc/taskrunner/config.toml; a missing default file is fine]
    #[arg(long = "settings", value_name = "FILE", help_heading = "Service options")]
    pub settings: Option<PathBuf>,

    /// Instance name (systemd's %i) [default: the worker group]
    #[arg(long = "instance", value_name = "NAME", help_heading = "Service options")]
    pub instance: Option<String>,

    /// Exit 0 after this many tasks were handled
    #[arg(long = "exit-after-tasks", value_name = "N", help_heading = "Service options")]
    pub exit_after_tasks: Option<String>,

    /// Exit 0 after being idle this long (e.g. 30s, 5m, 1h)
    #[arg(
        long = "exit-after-idle",
        value_name = "DURATION",
        help_heading = "Service options"
    )]
    pub exit_after_idle: Option<String>,

    /// Print the effective settings with the source of each value, then exit (0, or 78 on an error)
    #[arg(long = "check-config", action = ArgAction::SetTrue, help_heading = "Service options")]
    pub check_config: bool,

    /// State directory (task journal, taskrunner id, upload queue, work directories)
    /// [default: $STATE_DIRECTORY, or <output>/state]
    #[arg(long = "state-dir", value_name = "DIR", help_heading = "Service options")]
    pub state_dir: Option<String>,

    /// Runtime directory (control socket) [default: $RUNTIME_DIRECTORY, /run/taskrunner/<instance> as
    /// root, else $XDG_RUNTIME_DIR/taskrunner/<instance> or /tmp/taskrunner-<uid>/<instance>]
    #[arg(long = "runtime-dir", value_name = "DIR", help_heading = "Service options")]
    pub runtime_dir: Option<String>,

    /// Log filter, RUST_LOG syntax (e.g. info, taskrunner=debug) [default: info]
    #[arg(long = "log-level", value_name = "FILTER", help_heading = "Service options")]
    pub log_level: Option<String>,
}

/// The clap `Command` of `taskrunner`, for man pages and shell completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Parsed {
    Cli(Box<Cli>),
    /// `--help` or `--version`: clap's text, to print on stdout and exit 0.
    Display(String),
}

/// Parses the command line (with the program name first). A usage error is returned as clap's
/// rendered message.
pub fn parse(args: &[OsString]) -> Result<Parsed, String> {
    use clap::error::ErrorKind;
    use clap::FromArgMatches;
    match command().try_get_matches_from(args) {
        Ok(m) => Cli::from_arg_matches(&m)
            .map(|c| Parsed::Cli(Box::new(c)))
            .map_err(|e| e.render().to_string()),
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Ok(Parsed::Display(e.render().to_string())),
            _ => Err(e.render().to_string()),
        },
    }
}

impl Cli {
    /// `(settings key, value, flag as typed)` for every option given that maps to a settings key.
    /// `--accessId/--secretKey` are credentials, not settings, and are not listed.
    pub(crate) fn key_values(&self) -> Vec<(&'static str, String, &'static str)> {
        let mut out = Vec::new();
        let mut push = |key: &'static str, v: &Option<String>, flag: &'static str| {
            if let Some(v) = v {
                out.push((key, v.clone(), flag));
            }
        };
        push("credentials-file", &self.config, "--config");
        push("endpoint", &self.endpoint, "--endpoint");
        push("worker-group", &self.worker_group, "--workerGroup");
        push("taskrunner-id", &self.taskrunner_id, "--taskrunnerId");
        push("output", &self.output, "--output");
        push("region", &self.region, "--region");
        push("log-uri", &self.log_uri, "--logUri");
        push("proxy.host", &self.proxy_host, "--proxyHost");
        push("proxy.port", &self.proxy_port, "--proxyPort");
        push("proxy.username", &self.proxy_username, "--proxyUsername");
        push("proxy.password", &self.proxy_password, "--proxyPassword");
        push("proxy.domain", &self.proxy_domain, "--proxyDomain");
        push("proxy.workstation", &self.proxy_workstation, "--proxyWorkstation");
        push("tasks", &self.tasks, "--tasks");
        push(
            "jdbc-driver-s3-path",
            &self.jdbc_driver_s3_path,
            "--jdbcDriverS3Path",
        );
        push("s3-no-proxy", &self.s3_no_proxy, "--s3NoProxy");
        push("exit-after-tasks", &self.exit_after_tasks, "--exit-after-tasks");
        push("exit-after-idle", &self.exit_after_idle, "--exit-after-idle");
        push("state-dir", &self.state_dir, "--state-dir");
        push("runtime-dir", &self.runtime_dir, "--runtime-dir");
        push("log-level", &self.log_level, "--log-level");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        std::iter::once("taskrunner")
            .chain(a.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn cli(a: &[&str]) -> Cli {
        match parse(&args(a)).unwrap() {
            Parsed::Cli(c) => *c,
            Parsed::Display(d) => panic!("unexpected display: {d}"),
        }
    }

    #[test]
    fn clap_command_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn both_value_forms_and_camel_case() {
        let c = cli(&[
            "--config",
            "/c.json",
            "--workerGroup=wg-1",
            "--region",
            "eu-west-1",
            "--logUri=s3://b/p",
            "--taskrunnerId",
            "tr1",
            "--tasks=4",
        ]);
        assert_eq!(c.config.as_deref(), Some("/c.json"));
        assert_eq!(c.worker_group.as_deref(), Some("wg-1"));
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.log_uri.as_deref(), Some("s3://b/p"));
        assert_eq!(c.taskrunner_id.as_deref(), Some("tr1"));
        assert_eq!(c.tasks.as_deref(), Some("4"));
    }

    #[test]
    fn access_id_alias_and_installer_style_empty_proxy() {
        let c = cli(&[
            "--accessID=AK",
            "--secretKey",
            "S",
            "--proxyHost=",
            "--proxyPort=-1",
            "--s3NoProxy",
        ]);
        assert_eq!(c.access_id.as_deref(), Some("AK"));
        assert_eq!(c.secret_key.as_deref(), Some("S"));
        assert_eq!(c.proxy_host.as_deref(), Some(""));
        assert_eq!(c.proxy_port.as_deref(), Some("-1"));
        assert_eq!(c.s3_no_proxy.as_deref(), Some("true"));
    }

    #[test]
    fn help_and_version_are_display_not_errors() {
        match parse(&args(&["--help"])).unwrap() {
            Parsed::Display(t) => assert!(t.contains("--workerGroup") && t.contains("--check-config"), "{t}"),
            Parsed::Cli(_) => panic!("--help parsed as a run"),
        }
        match parse(&args(&["--version"])).unwrap() {
            Parsed::Display(t) => assert!(t.contains(env!("CARGO_PKG_VERSION")), "{t}"),
            Parsed::Cli(_) => panic!("--version parsed as a run"),
        }
    }

    #[test]
    fn unknown_and_malformed_options_are_errors() {
        let e = parse(&args(&["--workergroup=x"])).unwrap_err();
        assert!(e.contains("--workergroup"), "{e}");
        let e = parse(&args(&["--workerGroup"])).unwrap_err();
        assert!(e.contains("--workerGroup"), "{e}");
        assert!(parse(&args(&["stray"])).is_err());
    }
}
