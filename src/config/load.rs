//! The loader: raw layers -> merged values with their sources -> typed, validated [`Settings`].
//!
//! Every settings key is declared once in [`KEYS`], with its kind. A layer (a file, the
//! environment, the command line) is a list of `(key, raw value, source)`; layers are applied in
//! precedence order, so the last value of a key wins and keeps its source. Only then are values
//! typed, so a bad value is reported with the place it came from (`file:line`, `env VAR`, `--flag`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cli::{self, Cli, Parsed};
use super::units::{format_duration, format_size, parse_duration, parse_size};
use super::{KeepWorkdirs, ProxySettings, S3Uri, Settings, DEFAULT_SETTINGS_FILE};
use crate::credentials::{self, CredentialSource, Secret, StaticKeys};

/// What the command line asked the daemon to do.
#[derive(Debug)]
pub enum Invocation {
    Run(Box<Settings>),
    /// `--check-config`: print [`render_check`] and exit 0.
    CheckConfig(Box<Settings>),
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File {
        path: PathBuf,
        line: usize,
    },
    Env(String),
    Flag(&'static str),
    /// Computed from something else, e.g. `$LOGS_DIRECTORY` or "from region".
    Derived(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File { path, line } => write!(f, "{}:{line}", path.display()),
            Source::Env(v) => write!(f, "env {v}"),
            Source::Flag(fl) => f.write_str(fl),
            Source::Derived(d) => f.write_str(d),
        }
    }
}

impl Source {
    /// Precedence rank: a higher rank overrides a lower one.
    fn rank(&self) -> u8 {
        match self {
            Source::Default | Source::Derived(_) => 0,
            Source::File { .. } => 1,
            Source::Env(_) => 2,
            Source::Flag(_) => 3,
        }
    }
}

/// A configuration error. Its `Display` names where the bad value came from:
/// `<file>:<line>: <key>: <problem>`, `--flag: <problem>`, `env VAR: <problem>`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A bad command line (clap's message, with usage).
    #[error("{}", .0.trim_end())]
    Usage(String),
    /// A bad value; `at` says where it came from.
    #[error("{}", invalid_message(at, key, problem))]
    Invalid {
        at: Source,
        key: String,
        problem: String,
    },
    /// A settings file that cannot be read or is not valid TOML.
    #[error("{}{}: {problem}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    File {
        path: PathBuf,
        line: Option<usize>,
        problem: String,
    },
    /// A required setting is missing.
    #[error("{flag}: required: {hint}")]
    Missing { flag: &'static str, hint: String },
    #[error(transparent)]
    Credentials(#[from] credentials::CredentialsError),
}

fn invalid_message(at: &Source, key: &str, problem: &str) -> String {
    match at {
        Source::File { .. } => format!("{at}: {key}: {problem}"),
        Source::Flag(_) | Source::Env(_) => format!("{at}: {problem}"),
        Source::Default | Source::Derived(_) => format!("{key} ({at}): {problem}"),
    }
}

impl ConfigError {
    /// Every configuration error exits 78 (EX_CONFIG), so the unit's
    /// `RestartPreventExitStatus=78` stops a restart loop.
    pub fn exit_code(&self) -> i32 {
        crate::exit::CONFIG
    }
}

/// The command line and environment a [`Settings`] was loaded from, kept for [`reload`].
/// `Debug` shows neither: both may hold secrets (`--secretKey`, `AWS_SECRET_ACCESS_KEY`).
#[derive(Clone, Default)]
pub struct LoadOrigin {
    pub args: Vec<OsString>,
    pub env: BTreeMap<String, String>,
    /// The working directory relative paths were resolved against.
    pub cwd: PathBuf,
}

impl std::fmt::Debug for LoadOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LoadOrigin {{ {} args, {} env vars, cwd: {:?} }}",
            self.args.len(),
            self.env.len(),
            self.cwd
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The keys

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Str,
    UInt,
    Bool,
    Duration,
    Size,
}

/// Every settings key, as written in a file (kebab-case; `proxy.x` is `x` in the `[proxy]` table)
/// and, upper snake-cased, in the environment (`TASKRUNNER_PROXY_NO_PROXY`).
const KEYS: &[(&str, Kind)] = &[
    ("worker-group", Kind::Str),
    ("region", Kind::Str),
    ("endpoint", Kind::Str),
    ("taskrunner-id", Kind::Str),
    ("tasks", Kind::UInt),
    ("precondition-tasks", Kind::UInt),
    ("output", Kind::Str),
    ("state-dir", Kind::Str),
    ("runtime-dir", Kind::Str),
    ("log-uri", Kind::Str),
    ("credentials-file", Kind::Str),
    ("proxy.url", Kind::Str),
    ("proxy.host", Kind::Str),
    ("proxy.port", Kind::UInt),
    ("proxy.username", Kind::Str),
    ("proxy.password", Kind::Str),
    ("proxy.no-proxy", Kind::Str),
    ("proxy.domain", Kind::Str),
    ("proxy.workstation", Kind::Str),
    ("ca-bundle", Kind::Str),
    ("s3-endpoint", Kind::Str),
    ("s3-no-proxy", Kind::Bool),
    ("jdbc-driver-s3-path", Kind::Str),
    ("progress-interval", Kind::Duration),
    ("heartbeat-interval", Kind::Duration),
    ("drain-timeout", Kind::Duration),
    ("kill-grace", Kind::Duration),
    ("user", Kind::Str),
    ("group", Kind::Str),
    ("allow-root", Kind::Bool),
    ("log-level", Kind::Str),
    ("disk-budget", Kind::Size),
    ("keep-workdirs", Kind::Str),
    ("exit-after-tasks", Kind::UInt),
    ("exit-after-idle", Kind::Duration),
];

fn kind_of(key: &str) -> Option<(&'static str, Kind)> {
    KEYS.iter().find(|(k, _)| *k == key).copied()
}

fn env_name(key: &str) -> String {
    format!("TASKRUNNER_{}", key.to_ascii_uppercase().replace(['-', '.'], "_"))
}

/// Environment variables that are not settings keys but are ours.
const ENV_SETTINGS: &str = "TASKRUNNER_SETTINGS";
const ENV_INSTANCE: &str = "TASKRUNNER_INSTANCE";

const DEFAULT_REGION: &str = "us-east-1";
const DEFAULT_TASKS: usize = 2;
const DEFAULT_PRECONDITION_TASKS: usize = 2;
/// ReportTaskProgress: the API reference recommends every 60 s.
const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(60);
/// ReportTaskRunnerHeartbeat: every 15 minutes (API reference).
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15 * 60);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10 * 60);
const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_DISK_BUDGET_BYTES: u64 = 2 << 30;
const DEFAULT_LOG_LEVEL: &str = "info";
/// The user a root-started daemon drops to when none is configured (issue 5).
const DEFAULT_SERVICE_USER: &str = "taskrunner";
/// The service reassigns a task whose progress it has not heard of for 5 minutes (API reference,
/// ReportTaskProgress), so a longer progress interval would lose tasks.
const MAX_PROGRESS_INTERVAL: Duration = Duration::from_secs(5 * 60);
const MAX_TASKS: u64 = 1024;

#[derive(Clone, Debug, PartialEq)]
enum Raw {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl std::fmt::Display for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Raw::Str(s) => f.write_str(s),
            Raw::Int(i) => write!(f, "{i}"),
            Raw::Bool(b) => write!(f, "{b}"),
        }
    }
}

type Layer = Vec<(&'static str, Raw, Source)>;

// ---------------------------------------------------------------------------------------------
// Files

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// Suggests the right spelling of a misspelt key: kebab-case for `worker_group`/`workerGroup`.
fn suggestion(key: &str, prefix: &str) -> String {
    let mut kebab = String::new();
    for (i, c) in key.chars().enumerate() {
        if c == '_' {
            kebab.push('-');
        } else if c.is_ascii_uppercase() {
            if i > 0 {
                kebab.push('-');
            }
            kebab.push(c.to_ascii_lowercase());
        } else {
            kebab.push(c);
        }
    }
    let full = format!("{prefix}{kebab}");
    if kebab != key && kind_of(&full).is_some() {
        return format!(" (did you mean `{kebab}`? keys are kebab-case)");
    }
    let mut known: Vec<&str> = KEYS
        .iter()
        .filter_map(|(k, _)| k.strip_prefix(prefix))
        .map(|k| k.split('.').next().unwrap_or(k))
        .collect();
    known.dedup();
    format!(" (known keys: {})", known.join(", "))
}

/// Parses one settings file into a layer. Strict: unknown keys and wrong types are errors that
/// name the file, line and key.
fn parse_file(path: &Path, text: &str) -> Result<Layer, ConfigError> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        line: e.span().map(|s| line_of(text, s.start)),
        problem: format!("not valid TOML: {}", e.message().trim_end()),
    })?;
    let mut layer = Layer::new();
    let err = |offset: usize, key: &str, problem: String| ConfigError::Invalid {
        at: Source::File {
            path: path.to_path_buf(),
            line: line_of(text, offset),
        },
        key: key.to_string(),
        problem,
    };
    let mut entries: Vec<(String, &toml::Spanned<DeValue>, usize)> = Vec::new();
    for (k, v) in doc.get_ref().iter() {
        let name = k.get_ref().to_string();
        if name == "proxy" {
            let Some(table) = v.get_ref().as_table() else {
                return Err(err(
                    k.span().start,
                    "proxy",
                    format!("expected a table ([proxy]), found {}", v.get_ref().type_str()),
                ));
            };
            for (sk, sv) in table.iter() {
                entries.push((format!("proxy.{}", sk.get_ref()), sv, sk.span().start));
            }
        } else {
            entries.push((name, v, k.span().start));
        }
    }
    for (name, v, key_at) in entries {
        let Some((key, kind)) = kind_of(&name) else {
            let (prefix, short) = match name.strip_prefix("proxy.") {
                Some(s) => ("proxy.", s),
                None => ("", name.as_str()),
            };
            return Err(err(
                key_at,
                &name,
                format!("unknown key{}", suggestion(short, prefix)),
            ));
        };
        let at = Source::File {
            path: path.to_path_buf(),
            line: line_of(text, key_at),
        };
        let value = v.get_ref();
        let raw = match (kind, value) {
            (Kind::Str, DeValue::String(s)) => Raw::Str(s.to_string()),
            (Kind::Bool, DeValue::Boolean(b)) => Raw::Bool(*b),
            (Kind::UInt, DeValue::Integer(i)) => {
                match i64::from_str_radix(i.as_str(), i.radix())
                    .ok()
                    .filter(|i| *i >= 0)
                {
                    Some(n) => Raw::Int(n),
                    None => return Err(err(v.span().start, key, format!("{i} is not a whole number ≥ 0"))),
                }
            }
            (Kind::Duration | Kind::Size, DeValue::String(s)) => Raw::Str(s.to_string()),
            (Kind::Duration | Kind::Size, DeValue::Integer(i)) => {
                match i64::from_str_radix(i.as_str(), i.radix())
                    .ok()
                    .filter(|i| *i >= 0)
                {
                    Some(n) => Raw::Int(n),
                    None => return Err(err(v.span().start, key, format!("{i} is not a whole number ≥ 0"))),
                }
            }
            (kind, other) => {
                let want = match kind {
                    Kind::Str => "a string",
                    Kind::UInt => "an integer",
                    Kind::Bool => "true or false",
                    Kind::Duration => "a duration such as \"30s\", \"5m\" or \"1h30m\"",
                    Kind::Size => "a size such as \"2GiB\" or \"500MB\"",
                };
                return Err(err(
                    v.span().start,
                    key,
                    format!("expected {want}, found {}", other.type_str()),
                ));
            }
        };
        layer.push((key, raw, at));
    }
    Ok(layer)
}

fn read_file(path: &Path, required: bool) -> Result<Option<Layer>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_file(path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(ConfigError::File {
            path: path.to_path_buf(),
            line: None,
            problem: format!("cannot read: {e}"),
        }),
    }
}

/// `config.d/*.toml` next to the main file, in name order. A missing directory is fine.
fn fragment_files(main: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = main.parent().unwrap_or(Path::new(".")).join("config.d");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ConfigError::File {
                path: dir,
                line: None,
                problem: format!("cannot read the directory: {e}"),
            })
        }
    };
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        // Editors' and package managers' leftovers (".#x.toml", ".x.toml.swp") are not fragments.
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

// ---------------------------------------------------------------------------------------------
// Environment and command line

fn env_layer(env: &BTreeMap<String, String>, warnings: &mut Vec<String>) -> Layer {
    let mut layer = Layer::new();
    for (key, _) in KEYS {
        let var = env_name(key);
        if let Some(v) = env.get(&var) {
            layer.push((key, Raw::Str(v.clone()), Source::Env(var)));
        }
    }
    for var in env.keys().filter(|v| v.starts_with("TASKRUNNER_")) {
        let known =
            var == ENV_SETTINGS || var == ENV_INSTANCE || KEYS.iter().any(|(k, _)| env_name(k) == *var);
        if !known {
            warnings.push(format!(
                "environment variable {var} is not a taskrunner setting and is ignored"
            ));
        }
    }
    layer
}

fn cli_layer(cli: &Cli) -> Layer {
    cli.key_values()
        .into_iter()
        .map(|(k, v, flag)| {
            let key = kind_of(k).expect("cli maps to a declared key").0;
            (key, Raw::Str(v), Source::Flag(flag))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Typing

struct Values {
    map: BTreeMap<&'static str, (Raw, Source)>,
    sources: BTreeMap<String, String>,
}

impl Values {
    fn merge(layers: &[Layer]) -> Values {
        let mut map = BTreeMap::new();
        for layer in layers {
            for (k, v, s) in layer {
                map.insert(*k, (v.clone(), s.clone()));
            }
        }
        Values {
            map,
            sources: BTreeMap::new(),
        }
    }

    fn raw(&self, key: &str) -> Option<&(Raw, Source)> {
        self.map.get(key)
    }

    fn bad(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        let at = self
            .map
            .get(key)
            .map(|(_, s)| s.clone())
            .unwrap_or(Source::Default);
        ConfigError::Invalid {
            at,
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    fn note(&mut self, key: &str, source: &Source) {
        self.sources.insert(key.to_string(), source.to_string());
    }

    /// A string value, trimmed; an empty string counts as unset (the jar's installer passes
    /// `--proxyHost=` for "no proxy").
    fn string(&mut self, key: &str) -> Option<String> {
        let (raw, src) = self.map.get(key)?.clone();
        let s = raw.to_string().trim().to_string();
        if s.is_empty() {
            return None;
        }
        self.note(key, &src);
        Some(s)
    }

    fn uint(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        let Some((raw, src)) = self.map.get(key).cloned() else {
            return Ok(None);
        };
        let n = match &raw {
            Raw::Int(i) => u64::try_from(*i).map_err(|_| self.bad(key, format!("{i} is negative")))?,
            Raw::Str(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| self.bad(key, format!("{s:?} is not a whole number")))?,
            Raw::Bool(b) => return Err(self.bad(key, format!("{b} is not a whole number"))),
        };
        self.note(key, &src);
        Ok(Some(n))
    }

    fn boolean(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        let Some((raw, src)) = self.map.get(key).cloned() else {
            return Ok(None);
        };
        let b = match &raw {
            Raw::Bool(b) => *b,
            Raw::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" | "on" => true,
                "false" | "no" | "0" | "off" => false,
                _ => return Err(self.bad(key, format!("{s:?} is not true or false"))),
            },
            Raw::Int(i) => return Err(self.bad(key, format!("{i} is not true or false"))),
        };
        self.note(key, &src);
        Ok(Some(b))
    }

    fn duration(&mut self, key: &str) -> Result<Option<Duration>, ConfigError> {
        let Some((raw, src)) = self.map.get(key).cloned() else {
            return Ok(None);
        };
        let d = match &raw {
            Raw::Int(i) => Duration::from_secs(*i as u64),
            Raw::Str(s) => parse_duration(s).map_err(|e| self.bad(key, e))?,
            Raw::Bool(b) => return Err(self.bad(key, format!("{b} is not a duration"))),
        };
        self.note(key, &src);
        Ok(Some(d))
    }

    fn size(&mut self, key: &str) -> Result<Option<u64>, ConfigError> {
        let Some((raw, src)) = self.map.get(key).cloned() else {
            return Ok(None);
        };
        let n = match &raw {
            Raw::Int(i) => *i as u64,
            Raw::Str(s) => parse_size(s).map_err(|e| self.bad(key, e))?,
            Raw::Bool(b) => return Err(self.bad(key, format!("{b} is not a size"))),
        };
        self.note(key, &src);
        Ok(Some(n))
    }

    fn default_note(&mut self, key: &str) {
        self.sources
            .entry(key.to_string())
            .or_insert_with(|| "default".to_string());
    }

    fn source(&self, key: &str) -> Source {
        self.map
            .get(key)
            .map(|(_, s)| s.clone())
            .unwrap_or(Source::Default)
    }
}

fn expand_path(s: &str, origin: &LoadOrigin) -> PathBuf {
    let p = match (s.strip_prefix("~/"), origin.env.get("HOME")) {
        (Some(rest), Some(home)) => Path::new(home).join(rest),
        _ => PathBuf::from(s),
    };
    if p.is_absolute() {
        p
    } else {
        origin.cwd.join(p)
    }
}

fn check_url(v: &mut Values, key: &str, s: &str) -> Result<String, ConfigError> {
    let u = url::Url::parse(s).map_err(|e| v.bad(key, format!("{s:?} is not a URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(v.bad(key, format!("{s:?} is not an http:// or https:// URL")));
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// An instance name is used in paths (`/run/taskrunner/<instance>`): keep it to a safe set.
fn safe_instance_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-@:".contains(c))
}

/// The worker group made safe for a path, when it is the instance name.
fn instance_from_worker_group(wg: &str) -> String {
    let s: String = wg
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-@:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    if s.starts_with('.') {
        format!("_{}", &s[1..])
    } else {
        s
    }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

// ---------------------------------------------------------------------------------------------
// Loading

/// How credentials are handled: read them (start), or keep those already read (reload: after
/// the privilege drop the root-only file may no longer be readable, and credentials do not
/// change live anyway).
enum Creds<'a> {
    Read,
    Keep(&'a CredentialSource),
}

/// Loads the settings from a command line (program name first) and an environment.
///
/// `--help` and `--version` print clap's text on stdout and exit 0 (as clap does); every other
/// problem is a [`ConfigError`] (exit 78).
pub fn load(args: Vec<OsString>, env: &BTreeMap<String, String>) -> Result<Invocation, ConfigError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    match cli::parse(&args).map_err(ConfigError::Usage)? {
        Parsed::Display(text) => {
            print!("{text}");
            std::process::exit(crate::exit::OK);
        }
        Parsed::Cli(c) => {
            let origin = LoadOrigin {
                args,
                env: env.clone(),
                cwd,
            };
            let check = c.check_config;
            let settings = build(&c, origin, Creds::Read)?;
            Ok(if check {
                Invocation::CheckConfig(Box::new(settings))
            } else {
                Invocation::Run(Box::new(settings))
            })
        }
    }
}

/// [`load`] with this process's command line and environment (variables that are not UTF-8 are
/// skipped: no setting can use them).
pub fn load_from_process() -> Result<Invocation, ConfigError> {
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    load(std::env::args_os().collect(), &env)
}

/// Re-reads the settings files with the command line and environment of the original load
/// (SIGHUP). The credentials are kept from `current`. On an error the caller keeps `current`.
pub fn reload(current: &Settings) -> Result<Settings, ConfigError> {
    let origin = current.origin.clone();
    match cli::parse(&origin.args).map_err(ConfigError::Usage)? {
        Parsed::Cli(c) => build(&c, origin, Creds::Keep(&current.credentials)),
        Parsed::Display(_) => Err(ConfigError::Usage("--help/--version cannot be reloaded".into())),
    }
}

fn build(cli: &Cli, origin: LoadOrigin, creds: Creds) -> Result<Settings, ConfigError> {
    let env = &origin.env;
    let mut warnings = Vec::new();

    // Files: the main file, then config.d/*.toml in name order.
    let (main, main_required) = match (&cli.settings, env.get(ENV_SETTINGS)) {
        (Some(p), _) => (expand_path(&p.to_string_lossy(), &origin), true),
        (None, Some(p)) if !p.is_empty() => (expand_path(p, &origin), true),
        _ => (PathBuf::from(DEFAULT_SETTINGS_FILE), false),
    };
    let mut file_layers = Vec::new();
    let mut settings_files = Vec::new();
    if let Some(layer) = read_file(&main, main_required)? {
        file_layers.push(layer);
        settings_files.push(main.clone());
    }
    for f in fragment_files(&main)? {
        if let Some(layer) = read_file(&f, true)? {
            file_layers.push(layer);
            settings_files.push(f);
        }
    }
    let env_l = env_layer(env, &mut warnings);
    let cli_l = cli_layer(cli);

    // The instance: --instance, TASKRUNNER_INSTANCE, else the worker group known so far.
    let (instance, instance_src) = match (&cli.instance, env.get(ENV_INSTANCE)) {
        (Some(i), _) => (Some(i.clone()), Source::Flag("--instance")),
        (None, Some(i)) if !i.is_empty() => (Some(i.clone()), Source::Env(ENV_INSTANCE.into())),
        _ => (None, Source::Default),
    };
    if let Some(i) = &instance {
        if !safe_instance_name(i) {
            return Err(ConfigError::Invalid {
                at: instance_src,
                key: "instance".into(),
                problem: format!("{i:?}: use letters, digits and . _ - @ : only"),
            });
        }
    }
    let instance_name = match &instance {
        Some(i) => Some(i.clone()),
        None => {
            let pre: Vec<Layer> = file_layers.iter().chain([&env_l, &cli_l]).cloned().collect();
            let mut v = Values::merge(&pre);
            v.string("worker-group").map(|wg| instance_from_worker_group(&wg))
        }
    };
    if let Some(name) = &instance_name {
        let f = main
            .parent()
            .unwrap_or(Path::new("."))
            .join("instances")
            .join(format!("{name}.toml"));
        if let Some(layer) = read_file(&f, false)? {
            file_layers.push(layer);
            settings_files.push(f);
        }
    }

    let mut layers = file_layers;
    layers.push(env_l);
    layers.push(cli_l);
    let mut v = Values::merge(&layers);

    let worker_group = v.string("worker-group").ok_or_else(|| ConfigError::Missing {
        flag: "--workerGroup",
        hint: format!(
            "give --workerGroup=<name>, {} or worker-group in {}",
            env_name("worker-group"),
            main.display()
        ),
    })?;
    if worker_group.len() > 1024 {
        return Err(v.bad("worker-group", "longer than 1024 characters (the API's limit)"));
    }
    let instance = match instance_name {
        Some(i) => {
            v.sources.insert("instance".into(), instance_src.to_string());
            i
        }
        None => {
            v.sources.insert("instance".into(), "from worker-group".into());
            instance_from_worker_group(&worker_group)
        }
    };

    let region = match v.string("region") {
        Some(r) => {
            if !r
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(v.bad("region", format!("{r:?} is not a region name such as us-east-1")));
            }
            r
        }
        None => {
            v.default_note("region");
            DEFAULT_REGION.to_string()
        }
    };
    let endpoint = match v.string("endpoint") {
        Some(e) => check_url(&mut v, "endpoint", &e)?,
        None => {
            v.sources.insert("endpoint".into(), "from region".into());
            format!("https://datapipeline.{region}.amazonaws.com")
        }
    };
    let taskrunner_id = v.string("taskrunner-id");
    if taskrunner_id.as_ref().is_some_and(|t| t.len() > 1024) {
        return Err(v.bad("taskrunner-id", "longer than 1024 characters (the API's limit)"));
    }

    let count = |v: &mut Values, key: &str, default: usize| -> Result<NonZeroUsize, ConfigError> {
        match v.uint(key)? {
            Some(0) => Err(v.bad(key, "must be at least 1")),
            Some(n) if n > MAX_TASKS => Err(v.bad(key, format!("{n} is more than {MAX_TASKS}"))),
            Some(n) => Ok(NonZeroUsize::new(n as usize).expect("checked")),
            None => {
                v.default_note(key);
                Ok(NonZeroUsize::new(default).expect("non-zero default"))
            }
        }
    };
    let tasks = count(&mut v, "tasks", DEFAULT_TASKS)?;
    let precondition_tasks = count(&mut v, "precondition-tasks", DEFAULT_PRECONDITION_TASKS)?;

    // Directories (see the module docs of the README's "Directories" section).
    let systemd_dir = |var: &str| {
        env.get(var)
            .and_then(|s| s.split(':').next())
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    let output_dir = match v.string("output") {
        Some(o) => expand_path(&o, &origin),
        None => match systemd_dir("LOGS_DIRECTORY") {
            Some(d) => {
                v.sources.insert("output".into(), "env LOGS_DIRECTORY".into());
                d
            }
            None => {
                v.default_note("output");
                origin.cwd.join("output")
            }
        },
    };
    let state_dir = match v.string("state-dir") {
        Some(s) => expand_path(&s, &origin),
        None => match systemd_dir("STATE_DIRECTORY") {
            Some(d) => {
                v.sources.insert("state-dir".into(), "env STATE_DIRECTORY".into());
                d
            }
            None => {
                v.sources.insert("state-dir".into(), "<output>/state".into());
                output_dir.join("state")
            }
        },
    };
    let uid = euid();
    let runtime_dir = match v.string("runtime-dir") {
        Some(s) => expand_path(&s, &origin),
        None => match systemd_dir("RUNTIME_DIRECTORY") {
            Some(d) => {
                v.sources
                    .insert("runtime-dir".into(), "env RUNTIME_DIRECTORY".into());
                d
            }
            None => {
                let d = if uid == 0 {
                    PathBuf::from("/run/taskrunner").join(&instance)
                } else if let Some(x) = env.get("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
                    Path::new(x).join("taskrunner").join(&instance)
                } else {
                    PathBuf::from(format!("/tmp/taskrunner-{uid}")).join(&instance)
                };
                v.default_note("runtime-dir");
                d
            }
        },
    };

    let log_uri = match v.string("log-uri") {
        // The jar's installer passes `--logUri none` for "no shipping".
        Some(s) if s.eq_ignore_ascii_case("none") => None,
        Some(s) => Some(S3Uri::parse(&s).map_err(|e| v.bad("log-uri", e))?),
        None => None,
    };
    let jdbc_driver_s3_path = match v.string("jdbc-driver-s3-path") {
        Some(s) => {
            let u = S3Uri::parse(&s).map_err(|e| v.bad("jdbc-driver-s3-path", e))?;
            warnings.push(format!(
                "{}: accepted for compatibility with the Java Task Runner, but not used: \
                 this task runner runs no JDBC activities yet",
                v.source("jdbc-driver-s3-path")
            ));
            Some(u)
        }
        None => None,
    };
    let s3_no_proxy = v.boolean("s3-no-proxy")?.unwrap_or(false);

    let proxy = resolve_proxy(&mut v, env, &mut warnings)?;

    let ca_bundle = v.string("ca-bundle").map(|s| expand_path(&s, &origin));
    if let Some(p) = &ca_bundle {
        if !p.is_file() {
            return Err(v.bad(
                "ca-bundle",
                format!("{} does not exist or is not a file", p.display()),
            ));
        }
    }
    let s3_endpoint = match v.string("s3-endpoint") {
        Some(s) => Some(check_url(&mut v, "s3-endpoint", &s)?),
        None => None,
    };

    let duration = |v: &mut Values, key: &str, default: Duration| -> Result<Duration, ConfigError> {
        match v.duration(key)? {
            Some(d) if d.is_zero() => Err(v.bad(key, "must be longer than 0s")),
            Some(d) => Ok(d),
            None => {
                v.default_note(key);
                Ok(default)
            }
        }
    };
    let progress_interval = duration(&mut v, "progress-interval", DEFAULT_PROGRESS_INTERVAL)?;
    if progress_interval > MAX_PROGRESS_INTERVAL {
        return Err(v.bad(
            "progress-interval",
            format!(
                "{} is longer than {}: the service reassigns a task it has not heard of for 5 minutes",
                format_duration(progress_interval),
                format_duration(MAX_PROGRESS_INTERVAL)
            ),
        ));
    }
    let heartbeat_interval = duration(&mut v, "heartbeat-interval", DEFAULT_HEARTBEAT_INTERVAL)?;
    let drain_timeout = duration(&mut v, "drain-timeout", DEFAULT_DRAIN_TIMEOUT)?;
    let kill_grace = duration(&mut v, "kill-grace", DEFAULT_KILL_GRACE)?;

    let user = match v.string("user") {
        Some(u) => Some(u),
        None if uid == 0 => {
            v.sources
                .insert("user".into(), "default (started as root)".into());
            Some(DEFAULT_SERVICE_USER.to_string())
        }
        None => None,
    };
    let group = v.string("group");
    let allow_root = v.boolean("allow-root")?.unwrap_or_else(|| {
        v.default_note("allow-root");
        false
    });
    if allow_root {
        warnings.push(format!(
            "allow-root = true ({}): tasks may run as root",
            v.source("allow-root")
        ));
    }

    let log_level = match v.string("log-level") {
        Some(l) => {
            tracing_subscriber::EnvFilter::try_new(&l)
                .map_err(|e| v.bad("log-level", format!("{l:?} is not a log filter: {e}")))?;
            l
        }
        None => {
            v.default_note("log-level");
            DEFAULT_LOG_LEVEL.to_string()
        }
    };
    let disk_budget_bytes = match v.size("disk-budget")? {
        Some(0) => return Err(v.bad("disk-budget", "must be more than 0")),
        Some(n) => n,
        None => {
            v.default_note("disk-budget");
            DEFAULT_DISK_BUDGET_BYTES
        }
    };
    let keep_workdirs = match v.string("keep-workdirs") {
        Some(s) => s.parse::<KeepWorkdirs>().map_err(|e| v.bad("keep-workdirs", e))?,
        None => {
            v.default_note("keep-workdirs");
            KeepWorkdirs::OnFailure
        }
    };
    let exit_after_tasks = match v.uint("exit-after-tasks")? {
        Some(0) => return Err(v.bad("exit-after-tasks", "must be at least 1")),
        n => n,
    };
    let exit_after_idle = match v.duration("exit-after-idle")? {
        Some(d) if d.is_zero() => return Err(v.bad("exit-after-idle", "must be longer than 0s")),
        d => d,
    };

    let credentials = match creds {
        Creds::Keep(c) => c.clone(),
        Creds::Read => resolve_credentials(cli, &mut v, &origin, &mut warnings)?,
    };
    v.sources
        .entry("credentials".into())
        .or_insert_with(|| "default".into());

    Ok(Settings {
        instance,
        worker_group,
        region,
        endpoint,
        taskrunner_id,
        tasks,
        precondition_tasks,
        output_dir,
        state_dir,
        runtime_dir,
        log_uri,
        proxy,
        ca_bundle,
        s3_endpoint,
        credentials,
        exit_after_tasks,
        exit_after_idle,
        progress_interval,
        heartbeat_interval,
        drain_timeout,
        kill_grace,
        user,
        group,
        allow_root,
        log_level,
        disk_budget_bytes,
        keep_workdirs,
        sources: v.sources,
        warnings,
        settings_files,
        jdbc_driver_s3_path,
        s3_no_proxy,
        origin,
    })
}

/// `proxy.url` or `proxy.host` + `proxy.port` (`--proxyHost/--proxyPort`), whichever has the
/// higher precedence; else `HTTPS_PROXY` (the guide: "the same configuration used for the AWS
/// CLI"). Credentials in a URL are moved out of it, so the URL can be logged.
fn resolve_proxy(
    v: &mut Values,
    env: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> Result<Option<ProxySettings>, ConfigError> {
    let url_src = v.string("proxy.url").map(|u| (u, v.source("proxy.url")));
    let host = v.string("proxy.host");
    // The jar's installer passes `--proxyPort=-1` for "no port".
    let port = match v.raw("proxy.port").cloned() {
        Some((Raw::Str(s), _)) if s.trim() == "-1" || s.trim().is_empty() => None,
        Some(_) => match v.uint("proxy.port")? {
            Some(p) if (1..=65535).contains(&p) => Some(p as u16),
            Some(p) => return Err(v.bad("proxy.port", format!("{p} is not a port (1-65535)"))),
            None => None,
        },
        None => None,
    };
    let from_host = match host {
        Some(h) => {
            let Some(p) = port else {
                return Err(v.bad("proxy.host", "needs a port too (--proxyPort, proxy.port)"));
            };
            Some((format!("http://{h}:{p}"), v.source("proxy.host")))
        }
        None => None,
    };
    let (raw_url, src) = match (url_src, from_host) {
        (Some(u), Some(h)) if u.1.rank() == h.1.rank() => {
            return Err(v.bad(
                "proxy.url",
                format!(
                    "set either proxy.url or proxy.host/proxy.port, not both (the other is at {})",
                    h.1
                ),
            ))
        }
        (Some(u), Some(h)) => {
            if u.1.rank() > h.1.rank() {
                u
            } else {
                h
            }
        }
        (Some(u), None) | (None, Some(u)) => u,
        (None, None) => {
            let from_env = ["HTTPS_PROXY", "https_proxy"]
                .iter()
                .find_map(|k| env.get(*k).filter(|s| !s.is_empty()).map(|s| (s.clone(), *k)));
            match from_env {
                Some((u, var)) => (u, Source::Env(var.to_string())),
                None => return Ok(None),
            }
        }
    };
    let bad = |problem: String| ConfigError::Invalid {
        at: src.clone(),
        key: "proxy.url".into(),
        // Never quote the URL: it may hold a password.
        problem,
    };
    let with_scheme = if raw_url.contains("://") {
        raw_url.clone()
    } else {
        format!("http://{raw_url}")
    };
    let parsed = url::Url::parse(&with_scheme).map_err(|e| bad(format!("not a proxy URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {:?} is not supported (use http:// or https://)",
            parsed.scheme()
        )));
    }
    let host = parsed.host_str().ok_or_else(|| bad("has no host".into()))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let url = format!("{}://{host}:{port}", parsed.scheme());
    v.sources.insert("proxy".into(), src.to_string());

    let mut username = v.string("proxy.username");
    let mut password = v.string("proxy.password").map(Secret::new);
    if username.is_none() && !parsed.username().is_empty() {
        let dec = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        username = Some(dec(parsed.username()));
        v.sources.insert("proxy.username".into(), src.to_string());
        if password.is_none() {
            if let Some(p) = parsed.password() {
                password = Some(Secret::new(dec(p)));
                v.sources.insert("proxy.password".into(), src.to_string());
            }
        }
    }
    if v.source("proxy.password") == Source::Flag("--proxyPassword") {
        warnings.push(
            "--proxyPassword on the command line is visible to every user in `ps`; \
             set proxy.password in a settings file readable only by root instead"
                .into(),
        );
    }
    let no_proxy = v.string("proxy.no-proxy").or_else(|| {
        ["NO_PROXY", "no_proxy"].iter().find_map(|k| {
            let s = env.get(*k).filter(|s| !s.is_empty())?;
            v.sources.insert("proxy.no-proxy".into(), format!("env {k}"));
            Some(s.clone())
        })
    });
    for key in ["proxy.domain", "proxy.workstation"] {
        if let Some(_d) = v.string(key) {
            warnings.push(format!(
                "{} ({key}): NTLM proxy authentication is not implemented; the proxy is used \
                 with Basic authentication (proxy.username/proxy.password) only",
                v.source(key)
            ));
        }
    }
    Ok(Some(ProxySettings {
        url,
        username,
        password,
        no_proxy,
    }))
}

/// The credentials, in this order: `--accessId/--secretKey`, `credentials-file` (`--config`, env,
/// files), `$CREDENTIALS_DIRECTORY/credentials.json` (systemd `LoadCredential=`), the AWS default
/// chain.
fn resolve_credentials(
    cli: &Cli,
    v: &mut Values,
    origin: &LoadOrigin,
    warnings: &mut Vec<String>,
) -> Result<CredentialSource, ConfigError> {
    let flag_err = |flag: &'static str, problem: &str| ConfigError::Invalid {
        at: Source::Flag(flag),
        key: flag.trim_start_matches('-').into(),
        problem: problem.into(),
    };
    let id = cli.access_id.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let secret = cli.secret_key.as_deref().map(str::trim).filter(|s| !s.is_empty());
    match (id, secret) {
        (Some(id), Some(secret)) => {
            warnings.push(
                "--accessId/--secretKey on the command line are visible to every user in `ps`; \
                 use a credentials file (--config, mode 0600) or systemd LoadCredential= instead"
                    .into(),
            );
            v.sources
                .insert("credentials".into(), "--accessId/--secretKey".into());
            return Ok(CredentialSource::CommandLine(StaticKeys {
                access_key_id: id.to_string(),
                secret_access_key: Secret::new(secret),
                session_token: None,
            }));
        }
        (Some(_), None) => return Err(flag_err("--accessId", "needs --secretKey too")),
        (None, Some(_)) => return Err(flag_err("--secretKey", "needs --accessId too")),
        (None, None) => {}
    }
    if let Some(f) = v.string("credentials-file") {
        let path = expand_path(&f, origin);
        let keys = credentials::read_credentials_file(&path)?;
        v.sources
            .insert("credentials".into(), v.source("credentials-file").to_string());
        return Ok(CredentialSource::File { path, keys });
    }
    if let Some(dir) = origin.env.get("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
        let path = Path::new(dir).join("credentials.json");
        if path.exists() {
            let keys = credentials::read_credentials_file(&path)?;
            v.sources
                .insert("credentials".into(), "env CREDENTIALS_DIRECTORY".into());
            return Ok(CredentialSource::File { path, keys });
        }
        warnings.push(format!(
            "CREDENTIALS_DIRECTORY is set but holds no credentials.json ({}); using the AWS default chain",
            path.display()
        ));
    }
    Ok(CredentialSource::DefaultChain)
}

// ---------------------------------------------------------------------------------------------
// --check-config

/// The effective settings, one per line, with the source of each value; secrets redacted.
pub fn render_check(s: &Settings) -> String {
    fn q(s: &str) -> String {
        format!("{s:?}")
    }
    fn opt(o: &Option<String>) -> String {
        o.as_deref().map(q).unwrap_or_else(|| "(unset)".into())
    }
    let p = |p: &Path| q(&p.display().to_string());
    let mut rows: Vec<(&str, String)> = vec![
        ("instance", q(&s.instance)),
        ("worker-group", q(&s.worker_group)),
        ("region", q(&s.region)),
        ("endpoint", q(&s.endpoint)),
        ("taskrunner-id", opt(&s.taskrunner_id)),
        ("tasks", s.tasks.to_string()),
        ("precondition-tasks", s.precondition_tasks.to_string()),
        ("output", p(&s.output_dir)),
        ("state-dir", p(&s.state_dir)),
        ("runtime-dir", p(&s.runtime_dir)),
        ("log-uri", opt(&s.log_uri.as_ref().map(|u| u.to_string()))),
        ("credentials", q(&s.credentials.describe())),
    ];
    match &s.proxy {
        Some(px) => {
            rows.push(("proxy", q(&px.url)));
            rows.push(("proxy.username", opt(&px.username)));
            rows.push((
                "proxy.password",
                px.password
                    .as_ref()
                    .map(|_| q("<redacted>"))
                    .unwrap_or_else(|| "(unset)".into()),
            ));
            rows.push(("proxy.no-proxy", opt(&px.no_proxy)));
        }
        None => rows.push(("proxy", "(none)".into())),
    }
    rows.extend([
        ("s3-no-proxy", s.s3_no_proxy.to_string()),
        (
            "ca-bundle",
            opt(&s.ca_bundle.as_ref().map(|c| c.display().to_string())),
        ),
        ("s3-endpoint", opt(&s.s3_endpoint)),
        (
            "jdbc-driver-s3-path",
            opt(&s.jdbc_driver_s3_path.as_ref().map(|u| u.to_string())),
        ),
        ("progress-interval", q(&format_duration(s.progress_interval))),
        ("heartbeat-interval", q(&format_duration(s.heartbeat_interval))),
        ("drain-timeout", q(&format_duration(s.drain_timeout))),
        ("kill-grace", q(&format_duration(s.kill_grace))),
        ("user", opt(&s.user)),
        ("group", opt(&s.group)),
        ("allow-root", s.allow_root.to_string()),
        ("log-level", q(&s.log_level)),
        ("disk-budget", q(&format_size(s.disk_budget_bytes))),
        ("keep-workdirs", q(s.keep_workdirs.as_str())),
        (
            "exit-after-tasks",
            s.exit_after_tasks
                .map(|n| n.to_string())
                .unwrap_or_else(|| "(unset)".into()),
        ),
        ("exit-after-idle", opt(&s.exit_after_idle.map(format_duration))),
    ]);
    let width = rows.iter().map(|(k, v)| k.len() + v.len()).max().unwrap_or(0) + 3;
    let mut out = String::new();
    out.push_str("# settings files read: ");
    if s.settings_files.is_empty() {
        out.push_str("(none)");
    } else {
        let names: Vec<String> = s.settings_files.iter().map(|f| f.display().to_string()).collect();
        out.push_str(&names.join(", "));
    }
    out.push('\n');
    for (k, val) in rows {
        let src = s.sources.get(k).map(String::as_str).unwrap_or("-");
        let line = format!("{k} = {val}");
        out.push_str(&format!("{line:<width$}# {src}\n"));
    }
    for w in &s.warnings {
        out.push_str(&format!("# warning: {w}\n"));
    }
    // Belt and braces: a secret must never reach this text, whatever is added above later.
    for secret in [
        s.proxy.as_ref().and_then(|p| p.password.as_ref()),
        s.credentials.static_keys().map(|k| &k.secret_access_key),
        s.credentials.static_keys().and_then(|k| k.session_token.as_ref()),
    ]
    .into_iter()
    .flatten()
    {
        if !secret.expose().is_empty() {
            out = out.replace(secret.expose(), "<redacted>");
        }
    }
    out
}
