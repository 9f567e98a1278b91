//! Configuration in stages: the command line (the Java jar's options, verbatim), `TASKRUNNER_*`
//! environment variables, `/etc/taskrunner/config.toml` with `config.d/*.toml` and per-instance
//! settings, then defaults -> one validated [`Settings`]. Every error names the file, line and
//! key; the binary exits 78 on any of them.
//!
//! - [`cli`]: the clap command line (Java jar options in camelCase, service options in kebab-case);
//! - [`load`]: raw layers (defaults < main file < `config.d/*.toml` in name order <
//!   `instances/<instance>.toml` < environment < command line), merged key by key with the source
//!   of each value kept, then typed and validated into [`Settings`];
//! - [`reload`]: the same again for SIGHUP, from the command line and environment the process
//!   started with (kept in [`Settings::origin`]); the credentials are not re-read;
//! - [`render_check`]: `--check-config`'s listing, secrets redacted.
//!
//! Per-instance settings live in `instances/<instance>.toml` next to the main file (one file per
//! `taskrunner@<instance>`), chosen over an `[instance.<name>]` table so that configuration
//! management can drop one file per instance and a fragment never has to be merged by hand.

pub mod cli;
mod load;
pub mod units;

pub use load::{load, load_from_process, reload, render_check, ConfigError, Invocation, LoadOrigin, Source};

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

/// Default main settings file.
pub const DEFAULT_SETTINGS_FILE: &str = "/etc/taskrunner/config.toml";

/// `s3://bucket/prefix`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Uri {
    pub bucket: String,
    /// Without a leading `/`; may be empty; no trailing `/`.
    pub prefix: String,
}

impl S3Uri {
    pub fn parse(s: &str) -> Result<S3Uri, String> {
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{s:?} is not an s3:// URI"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("{s:?} has no bucket"));
        }
        Ok(S3Uri {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }
    /// The key for `rel` under the prefix.
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{}", self.prefix, rel)
        }
    }
}

impl std::fmt::Display for S3Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Proxy for every outbound client (Data Pipeline, S3, STS, IMDS excluded).
#[derive(Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// `http://host:port`
    pub url: String,
    pub username: Option<String>,
    pub password: Option<crate::credentials::Secret>,
    /// Hosts that bypass the proxy (`NO_PROXY` syntax).
    pub no_proxy: Option<String>,
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySettings")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// Everything the daemon runs with, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Instance name (systemd's `%i`, or the worker group when started by hand).
    pub instance: String,
    pub worker_group: String,
    pub region: String,
    /// `https://datapipeline.<region>.amazonaws.com` unless `--endpoint`.
    pub endpoint: String,
    /// `--taskrunnerId`; when `None` the daemon generates one and persists it in `state_dir`.
    pub taskrunner_id: Option<String>,
    /// `--tasks`: activity pollers/slots (default 2).
    pub tasks: NonZeroUsize,
    /// Precondition pool (the guide's two precondition threads).
    pub precondition_tasks: NonZeroUsize,
    /// `--output`: hourly logs go to `<output_dir>/logs`, per-attempt logs to `<output_dir>/tasks`.
    pub output_dir: PathBuf,
    /// Task journal, taskrunner id, upload queue, attempt working directories.
    pub state_dir: PathBuf,
    /// Control socket.
    pub runtime_dir: PathBuf,
    /// `--logUri`.
    pub log_uri: Option<S3Uri>,
    pub proxy: Option<ProxySettings>,
    /// Extra CA bundle (PEM) trusted by every outbound client, in addition to the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// S3 endpoint override (a local S3 for tests and offline use), with path-style addressing.
    pub s3_endpoint: Option<String>,
    pub credentials: crate::credentials::CredentialSource,
    /// Exit 0 after this many tasks were handled.
    pub exit_after_tasks: Option<u64>,
    /// Exit 0 after being idle (no task running, none handed out) this long.
    pub exit_after_idle: Option<Duration>,
    /// ReportTaskProgress period after the first ack (default 60 s).
    pub progress_interval: Duration,
    /// ReportTaskRunnerHeartbeat period (default 15 min).
    pub heartbeat_interval: Duration,
    /// SIGTERM: how long running tasks may go on before TERM/grace/KILL.
    pub drain_timeout: Duration,
    /// TERM -> KILL grace for a task's process group.
    pub kill_grace: Duration,
    /// User and group tasks (and the daemon, after the drop from root) run as.
    pub user: Option<String>,
    pub group: Option<String>,
    /// Tasks may run as root only when this is true.
    pub allow_root: bool,
    /// `RUST_LOG`-style filter, e.g. `info` or `taskrunner=debug`.
    pub log_level: String,
    /// Disk budget for `output_dir` in bytes.
    pub disk_budget_bytes: u64,
    /// Keep an attempt's working directory after it ended: `never`, `on-failure`, `always`.
    pub keep_workdirs: KeepWorkdirs,
    /// Where each effective value came from, for `--check-config` (key -> "file:line" / "env" / "flag" / "default").
    pub sources: std::collections::BTreeMap<String, String>,
    /// Things the daemon must log as WARN at every start (NTLM not implemented, secrets on the
    /// command line, options accepted but not used, unknown `TASKRUNNER_*` variables...).
    pub warnings: Vec<String>,
    /// The settings files that were read, in merge order (for `taskrunner-ctl status`).
    pub settings_files: Vec<PathBuf>,
    /// `--jdbcDriverS3Path` (accepted for compatibility with the jar; see `warnings`).
    pub jdbc_driver_s3_path: Option<S3Uri>,
    /// `--s3NoProxy`: S3 clients do not use `proxy`.
    pub s3_no_proxy: bool,
    /// The command line and environment the settings were loaded from, for [`reload`].
    pub origin: LoadOrigin,
}

impl KeepWorkdirs {
    pub fn as_str(self) -> &'static str {
        match self {
            KeepWorkdirs::Never => "never",
            KeepWorkdirs::OnFailure => "on-failure",
            KeepWorkdirs::Always => "always",
        }
    }
}

impl std::str::FromStr for KeepWorkdirs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(KeepWorkdirs::Never),
            "on-failure" => Ok(KeepWorkdirs::OnFailure),
            "always" => Ok(KeepWorkdirs::Always),
            _ => Err(format!("{s:?} is not one of never, on-failure, always")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepWorkdirs {
    Never,
    OnFailure,
    Always,
}
