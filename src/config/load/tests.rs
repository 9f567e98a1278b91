//! Loader tests: precedence, merge order, strict errors with line numbers, directories,
//! credentials order, redaction, reload. Every test works in its own temp dir and passes an
//! explicit settings file, so the host's /etc/taskrunner is never read.

use super::*;
use std::os::unix::fs::PermissionsExt;

const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const PROXY_SECRET: &str = "pr0xy-pa55word";

struct Fx {
    dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
}

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), "").unwrap();
        let mut env = BTreeMap::new();
        env.insert(
            ENV_SETTINGS.to_string(),
            dir.path().join("config.toml").display().to_string(),
        );
        Fx { dir, env }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }
    fn creds(&self, rel: &str, mode: u32) -> PathBuf {
        let p = self.write(
            rel,
            &format!(r#"{{"access-id": "AKIDFILE", "private-key": "{SECRET}"}}"#),
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }
    fn env(mut self, k: &str, v: &str) -> Fx {
        self.env.insert(k.into(), v.into());
        self
    }
    fn try_load(&self, args: &[&str]) -> Result<Invocation, ConfigError> {
        let args = std::iter::once("taskrunner")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        load_in(args, &self.env, self.dir.path().join("cwd"))
    }
    fn load(&self, args: &[&str]) -> Settings {
        match self.try_load(args) {
            Ok(Invocation::Run(s)) | Ok(Invocation::CheckConfig(s)) => *s,
            Err(e) => panic!("load failed: {e}"),
        }
    }
    fn err(&self, args: &[&str]) -> String {
        match self.try_load(args) {
            Ok(_) => panic!("{args:?} loaded, expected an error"),
            Err(e) => {
                assert_eq!(e.exit_code(), 78);
                e.to_string()
            }
        }
    }
}

#[test]
fn command_line_alone_with_defaults() {
    let fx = Fx::new();
    let s = fx.load(&["--workerGroup=wg-12345"]);
    assert_eq!(s.worker_group, "wg-12345");
    assert_eq!(s.instance, "wg-12345");
    assert_eq!(s.region, "us-east-1");
    assert_eq!(s.endpoint, "https://datapipeline.us-east-1.amazonaws.com");
    assert_eq!(s.tasks.get(), 2);
    assert_eq!(s.precondition_tasks.get(), 2);
    assert_eq!(s.progress_interval, Duration::from_secs(60));
    assert_eq!(s.heartbeat_interval, Duration::from_secs(900));
    assert_eq!(s.output_dir, fx.path("cwd/output"));
    assert_eq!(s.state_dir, fx.path("cwd/output/state"));
    assert_eq!(s.log_uri, None);
    assert_eq!(s.credentials, CredentialSource::DefaultChain);
    assert_eq!(s.keep_workdirs, KeepWorkdirs::OnFailure);
    assert_eq!(s.sources["worker-group"], "--workerGroup");
    assert_eq!(s.sources["region"], "default");
    assert_eq!(s.sources["endpoint"], "from region");
    assert_eq!(s.sources["instance"], "from worker-group");
    assert_eq!(s.settings_files, vec![fx.path("config.toml")]);
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn the_jars_documented_command_line() {
    let fx = Fx::new();
    let creds = fx.creds("credentials.json", 0o600);
    let s = fx.load(&[
        "--config",
        creds.to_str().unwrap(),
        "--workerGroup=myWorkerGroup",
        "--region=eu-west-1",
        "--logUri=s3://mybucket/foldername/",
        "--taskrunnerId",
        "tr-1",
        "--tasks",
        "4",
        "--output=out",
    ]);
    assert_eq!(s.endpoint, "https://datapipeline.eu-west-1.amazonaws.com");
    assert_eq!(s.log_uri.unwrap().to_string(), "s3://mybucket/foldername");
    assert_eq!(s.taskrunner_id.as_deref(), Some("tr-1"));
    assert_eq!(s.tasks.get(), 4);
    assert_eq!(s.output_dir, fx.path("cwd/out"));
    match &s.credentials {
        CredentialSource::File { path, keys } => {
            assert_eq!(path, &creds);
            assert_eq!(keys.access_key_id, "AKIDFILE");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.sources["credentials"], "--config");
    let s = fx.load(&[
        "--workerGroup=w",
        "--endpoint=http://127.0.0.1:8080/",
        "--logUri=none",
    ]);
    assert_eq!(s.endpoint, "http://127.0.0.1:8080");
    assert_eq!(s.log_uri, None);
}

#[test]
fn precedence_flag_over_env_over_instance_over_fragments_over_main() {
    let fx = Fx::new();
    fx.write(
        "config.toml",
        "# main\nworker-group = \"wg-1\"\ntasks = 3\nregion = \"us-west-2\"\n",
    );
    let s = fx.load(&[]);
    assert_eq!(s.tasks.get(), 3);
    assert_eq!(
        s.sources["tasks"],
        format!("{}:3", fx.path("config.toml").display())
    );
    assert_eq!(
        s.sources["worker-group"],
        format!("{}:2", fx.path("config.toml").display())
    );

    // Fragments in name order, whatever order they were written in.
    fx.write("config.d/20-b.toml", "\n\ntasks = 5\n");
    fx.write("config.d/10-a.toml", "tasks = 4\nlog-level = \"debug\"\n");
    fx.write("config.d/.30-hidden.toml", "tasks = 99\n");
    fx.write("config.d/README", "not toml\n");
    let s = fx.load(&[]);
    assert_eq!(s.tasks.get(), 5);
    assert_eq!(
        s.sources["tasks"],
        format!("{}:3", fx.path("config.d/20-b.toml").display())
    );
    assert_eq!(s.log_level, "debug");
    assert_eq!(
        s.settings_files,
        vec![
            fx.path("config.toml"),
            fx.path("config.d/10-a.toml"),
            fx.path("config.d/20-b.toml")
        ]
    );

    // The instance file (named after the worker group by default).
    fx.write("instances/wg-1.toml", "tasks = 6\n");
    fx.write("instances/other.toml", "tasks = 42\n");
    let s = fx.load(&[]);
    assert_eq!(s.tasks.get(), 6);
    assert_eq!(s.region, "us-west-2");

    // Environment over files, command line over environment.
    let fx = fx.env("TASKRUNNER_TASKS", "7");
    let s = fx.load(&[]);
    assert_eq!(s.tasks.get(), 7);
    assert_eq!(s.sources["tasks"], "env TASKRUNNER_TASKS");
    let s = fx.load(&["--tasks", "8"]);
    assert_eq!(s.tasks.get(), 8);
    assert_eq!(s.sources["tasks"], "--tasks");

    // --instance picks another instance file.
    let s = fx.env("TASKRUNNER_TASKS", "").load(&["--instance", "other"]);
    assert_eq!(s.instance, "other");
    assert_eq!(s.sources["instance"], "--instance");
    assert_eq!(s.tasks.get(), 42);
}

#[test]
fn every_file_key_is_accepted() {
    let fx = Fx::new();
    let creds = fx.creds("creds.json", 0o600);
    let ca = fx.write("ca.pem", "");
    let p = fx.write(
        "config.toml",
        &format!(
            r#"
worker-group = "wg-1"
region = "eu-west-1"
endpoint = "https://datapipeline.eu-west-1.amazonaws.com"
taskrunner-id = "tr"
tasks = 3
precondition-tasks = 1
output = "/var/log/taskrunner"
state-dir = "/var/lib/taskrunner"
runtime-dir = "/run/taskrunner/x"
log-uri = "s3://b/logs"
credentials-file = "{}"
ca-bundle = "{}"
s3-endpoint = "http://127.0.0.1:9000"
s3-no-proxy = true
progress-interval = "30s"
heartbeat-interval = 600
drain-timeout = "1h"
kill-grace = "5s"
user = "tr"
group = "tr"
allow-root = false
log-level = "taskrunner=debug,info"
disk-budget = "512MiB"
keep-workdirs = "always"
exit-after-tasks = 10
exit-after-idle = "5m"

[proxy]
url = "http://proxy.example:3128"
username = "u"
password = "{PROXY_SECRET}"
no-proxy = "169.254.169.254,localhost"
"#,
            creds.display(),
            ca.display()
        ),
    );
    let s = fx.load(&[]);
    assert_eq!(s.precondition_tasks.get(), 1);
    assert_eq!(s.output_dir, PathBuf::from("/var/log/taskrunner"));
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/taskrunner"));
    assert_eq!(s.runtime_dir, PathBuf::from("/run/taskrunner/x"));
    assert_eq!(s.ca_bundle.as_deref(), Some(ca.as_path()));
    assert_eq!(s.s3_endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    assert!(s.s3_no_proxy);
    assert_eq!(s.progress_interval, Duration::from_secs(30));
    assert_eq!(s.heartbeat_interval, Duration::from_secs(600));
    assert_eq!(s.drain_timeout, Duration::from_secs(3600));
    assert_eq!(s.kill_grace, Duration::from_secs(5));
    assert_eq!(s.user.as_deref(), Some("tr"));
    assert_eq!(s.group.as_deref(), Some("tr"));
    assert!(!s.allow_root);
    assert_eq!(s.disk_budget_bytes, 512 << 20);
    assert_eq!(s.keep_workdirs, KeepWorkdirs::Always);
    assert_eq!(s.exit_after_tasks, Some(10));
    assert_eq!(s.exit_after_idle, Some(Duration::from_secs(300)));
    let px = s.proxy.as_ref().unwrap();
    assert_eq!(px.url, "http://proxy.example:3128");
    assert_eq!(px.username.as_deref(), Some("u"));
    assert_eq!(px.password.as_ref().unwrap().expose(), PROXY_SECRET);
    assert_eq!(px.no_proxy.as_deref(), Some("169.254.169.254,localhost"));
    assert_eq!(s.sources["proxy"], format!("{}:30", p.display()));
    assert_eq!(s.sources["disk-budget"], format!("{}:24", p.display()));
}

#[test]
fn strict_file_errors_name_file_line_and_key() {
    let fx = Fx::new();
    let p = fx.path("config.toml");
    let cases: &[(&str, &str)] = &[
        (
            "worker-group = \"w\"\n\nworker_group = \"x\"\n",
            ":3: worker_group: unknown key (did you mean `worker-group`?",
        ),
        (
            "workerGroup = \"x\"\n",
            ":1: workerGroup: unknown key (did you mean `worker-group`?",
        ),
        (
            "worker-group = \"w\"\nfrobnicate = 1\n",
            ":2: frobnicate: unknown key (known keys: worker-group",
        ),
        (
            "worker-group = \"w\"\n[proxy]\nhost = \"h\"\nprt = 1\n",
            ":4: proxy.prt: unknown key",
        ),
        (
            "worker-group = \"w\"\ntasks = \"4\"\n",
            ":2: tasks: expected an integer, found string",
        ),
        (
            "worker-group = \"w\"\ntasks = 0\n",
            ":2: tasks: must be at least 1",
        ),
        (
            "worker-group = \"w\"\ntasks = -3\n",
            ":2: tasks: -3 is not a whole number",
        ),
        (
            "worker-group = \"w\"\nallow-root = \"yes\"\n",
            ":2: allow-root: expected true or false",
        ),
        (
            "worker-group = \"w\"\ndrain-timeout = \"10 fortnights\"\n",
            ":2: drain-timeout: \"10 fortnights\": unknown unit",
        ),
        (
            "worker-group = \"w\"\ndisk-budget = \"lots\"\n",
            ":2: disk-budget:",
        ),
        (
            "worker-group = \"w\"\nkeep-workdirs = \"sometimes\"\n",
            ":2: keep-workdirs: \"sometimes\" is not one of",
        ),
        (
            "worker-group = \"w\"\nlog-uri = \"http://b/x\"\n",
            ":2: log-uri: \"http://b/x\" is not an s3:// URI",
        ),
        (
            "worker-group = \"w\"\nproxy = \"http://p:1\"\n",
            ":2: proxy: expected a table",
        ),
        (
            "worker-group = \"w\"\nprogress-interval = \"10m\"\n",
            ":2: progress-interval: 10m is longer than 5m",
        ),
        (
            "worker-group = \"w\"\nlog-level = \"taskrunner=loud\"\n",
            ":2: log-level:",
        ),
        (
            "worker-group = \"w\"\nregion = [\"a\"]\n",
            ":2: region: expected a string, found array",
        ),
        ("worker-group = \"w\"\n\ntasks = \n", ":3"),
        ("worker-group = \"w\"\ntasks = 1\ntasks = 2\n", ":3"),
    ];
    for (text, want) in cases {
        fx.write("config.toml", text);
        let e = fx.err(&[]);
        assert!(e.starts_with(&p.display().to_string()), "{text:?}: {e}");
        assert!(e.contains(want), "{text:?}: want {want:?} in {e}");
    }
    // An error in a fragment names the fragment.
    fx.write("config.toml", "worker-group = \"w\"\n");
    let frag = fx.write("config.d/50-x.toml", "tasks = 2\nbogus = true\n");
    let e = fx.err(&[]);
    assert!(
        e.starts_with(&format!("{}:2: bogus: unknown key", frag.display())),
        "{e}"
    );
}

#[test]
fn bad_command_lines_and_environments_exit_78_naming_the_problem() {
    let fx = Fx::new();
    let cases: &[(&[&str], &str)] = &[
        (&[], "--workerGroup: required"),
        (&["--workerGroup=w", "--tasks=0"], "--tasks: must be at least 1"),
        (
            &["--workerGroup=w", "--tasks=x"],
            "--tasks: \"x\" is not a whole number",
        ),
        (
            &["--workerGroup=w", "--region=US East"],
            "--region: \"US East\" is not a region",
        ),
        (
            &["--workerGroup=w", "--endpoint=datapipeline"],
            "--endpoint: \"datapipeline\" is not a URL",
        ),
        (&["--workerGroup=w", "--endpoint=ftp://x"], "--endpoint:"),
        (
            &["--workerGroup=w", "--logUri=/tmp/x"],
            "--logUri: \"/tmp/x\" is not an s3:// URI",
        ),
        (
            &["--workerGroup=w", "--exit-after-idle=5 weeks"],
            "--exit-after-idle: \"5 weeks\": unknown unit",
        ),
        (
            &["--workerGroup=w", "--exit-after-tasks=0"],
            "--exit-after-tasks: must be at least 1",
        ),
        (
            &["--workerGroup=w", "--proxyHost=proxy"],
            "--proxyHost: needs a port",
        ),
        (
            &["--workerGroup=w", "--proxyHost=proxy", "--proxyPort=99999"],
            "--proxyPort: 99999 is not a port",
        ),
        (
            &["--workerGroup=w", "--accessId=AKID"],
            "--accessId: needs --secretKey too",
        ),
        (
            &["--workerGroup=w", "--secretKey=S"],
            "--secretKey: needs --accessId too",
        ),
        (
            &["--workerGroup=w", "--instance=../etc"],
            "--instance: \"../etc\"",
        ),
        (
            &["--workerGroup=w", "--log-level=taskrunner=loud"],
            "--log-level:",
        ),
        (
            &["--workerGroup=w", "--config=/nonexistent/c.json"],
            "/nonexistent/c.json: cannot read",
        ),
        (
            &["--workerGroup=w", "--settings=/nonexistent/config.toml"],
            "/nonexistent/config.toml: cannot read",
        ),
        (&["--workerGroup=w", "--bogus"], "--bogus"),
        (&["--workerGroup"], "--workerGroup"),
        (
            &["--workerGroup=w", "--s3NoProxy=maybe"],
            "--s3NoProxy: \"maybe\" is not true or false",
        ),
    ];
    for (args, want) in cases {
        let e = fx.err(args);
        assert!(e.contains(want), "{args:?}: want {want:?} in {e}");
    }
    let fx = Fx::new().env("TASKRUNNER_DRAIN_TIMEOUT", "soon");
    let e = fx.err(&["--workerGroup=w"]);
    assert!(e.starts_with("env TASKRUNNER_DRAIN_TIMEOUT: \"soon\""), "{e}");
    let fx = Fx::new().env("TASKRUNNER_SETTINGS", "/nonexistent/x.toml");
    assert!(fx.err(&["--workerGroup=w"]).contains("/nonexistent/x.toml"));
}

#[test]
fn worker_group_may_come_from_env_and_instance_is_path_safe() {
    let fx = Fx::new().env("TASKRUNNER_WORKER_GROUP", "team a/nightly");
    let s = fx.load(&[]);
    assert_eq!(s.worker_group, "team a/nightly");
    assert_eq!(s.instance, "team_a_nightly");
    assert_eq!(s.sources["worker-group"], "env TASKRUNNER_WORKER_GROUP");
}

#[test]
fn directories_by_hand_and_under_systemd() {
    let fx = Fx::new();
    let s = fx.load(&["--workerGroup=wg-1"]);
    let uid = euid();
    if uid == 0 {
        assert_eq!(s.runtime_dir, PathBuf::from("/run/taskrunner/wg-1"));
        assert_eq!(s.user.as_deref(), Some("taskrunner"));
    } else {
        assert_eq!(
            s.runtime_dir,
            PathBuf::from(format!("/tmp/taskrunner-{uid}/wg-1"))
        );
        assert_eq!(s.user, None);
        let s = Fx::new()
            .env("XDG_RUNTIME_DIR", "/run/user/1000")
            .load(&["--workerGroup=wg-1"]);
        assert_eq!(s.runtime_dir, PathBuf::from("/run/user/1000/taskrunner/wg-1"));
    }
    let fx = Fx::new()
        .env("LOGS_DIRECTORY", "/var/log/taskrunner/wg-1")
        .env("STATE_DIRECTORY", "/var/lib/taskrunner/wg-1:/other")
        .env("RUNTIME_DIRECTORY", "/run/taskrunner/wg-1");
    let s = fx.load(&["--workerGroup=wg-1"]);
    assert_eq!(s.output_dir, PathBuf::from("/var/log/taskrunner/wg-1"));
    assert_eq!(s.state_dir, PathBuf::from("/var/lib/taskrunner/wg-1"));
    assert_eq!(s.runtime_dir, PathBuf::from("/run/taskrunner/wg-1"));
    assert_eq!(s.sources["output"], "env LOGS_DIRECTORY");
    // Keys and flags override what systemd hands over.
    let s = fx.load(&[
        "--workerGroup=wg-1",
        "--output=/o",
        "--state-dir=/s",
        "--runtime-dir=/r",
    ]);
    assert_eq!(
        (s.output_dir, s.state_dir, s.runtime_dir),
        ("/o".into(), "/s".into(), "/r".into())
    );
    // state defaults to <output>/state when only --output is given by hand
    let s = Fx::new().load(&["--workerGroup=wg-1", "--output=/data/out"]);
    assert_eq!(s.state_dir, PathBuf::from("/data/out/state"));
}

#[test]
fn credentials_order() {
    let fx = Fx::new();
    let file = fx.creds("c.json", 0o600);
    let file_arg = format!("--config={}", file.display());

    // --accessId/--secretKey win over --config, with a warning about ps.
    let s = fx.load(&[
        "--workerGroup=w",
        &file_arg,
        "--accessId=AKIDCLI",
        &format!("--secretKey={SECRET}"),
    ]);
    match &s.credentials {
        CredentialSource::CommandLine(k) => assert_eq!(k.access_key_id, "AKIDCLI"),
        other => panic!("{other:?}"),
    }
    assert!(s.warnings.iter().any(|w| w.contains("`ps`")), "{:?}", s.warnings);

    // credentials-file from the TOML file when no --config
    fx.write(
        "config.toml",
        &format!("credentials-file = {:?}\n", file.display().to_string()),
    );
    let s = fx.load(&["--workerGroup=w"]);
    assert!(matches!(&s.credentials, CredentialSource::File { path, .. } if path == &file));
    assert_eq!(
        s.sources["credentials"],
        format!("{}:1", fx.path("config.toml").display())
    );
    fx.write("config.toml", "");

    // $CREDENTIALS_DIRECTORY (systemd LoadCredential=)
    let cd = fx.path("creds");
    std::fs::create_dir_all(&cd).unwrap();
    let fx = fx.env("CREDENTIALS_DIRECTORY", cd.to_str().unwrap());
    let s = fx.load(&["--workerGroup=w"]);
    assert_eq!(s.credentials, CredentialSource::DefaultChain);
    assert!(s.warnings.iter().any(|w| w.contains("CREDENTIALS_DIRECTORY")));
    let loaded = fx.creds("creds/credentials.json", 0o400);
    let s = fx.load(&["--workerGroup=w"]);
    assert!(matches!(&s.credentials, CredentialSource::File { path, .. } if path == &loaded));
    // ... but --config still comes first
    let other = fx.creds("other.json", 0o600);
    let s = fx.load(&["--workerGroup=w", &format!("--config={}", other.display())]);
    assert!(matches!(&s.credentials, CredentialSource::File { path, .. } if path == &other));

    // A group-readable file is refused with the fix.
    let open = fx.creds("open.json", 0o640);
    let e = fx.err(&["--workerGroup=w", &format!("--config={}", open.display())]);
    assert!(e.contains(&format!("chmod 600 {}", open.display())), "{e}");
    assert!(!e.contains(SECRET));
}

#[test]
fn proxies_ntlm_and_https_proxy() {
    let fx = Fx::new();
    let s = fx.load(&[
        "--workerGroup=w",
        "--proxyHost=proxy.corp",
        "--proxyPort",
        "3128",
        "--proxyUsername=bob",
        &format!("--proxyPassword={PROXY_SECRET}"),
        "--proxyDomain=CORP",
        "--proxyWorkstation=WS1",
    ]);
    let px = s.proxy.as_ref().unwrap();
    assert_eq!(px.url, "http://proxy.corp:3128");
    assert_eq!(px.username.as_deref(), Some("bob"));
    assert_eq!(px.password.as_ref().unwrap().expose(), PROXY_SECRET);
    let ntlm: Vec<_> = s.warnings.iter().filter(|w| w.contains("NTLM")).collect();
    assert_eq!(ntlm.len(), 2, "{:?}", s.warnings);
    assert!(ntlm[0].contains("--proxyDomain"));
    assert!(s.warnings.iter().any(|w| w.contains("--proxyPassword")));

    // The jar's installer passes an empty host and port -1 for "no proxy".
    let s = fx.load(&["--workerGroup=w", "--proxyHost=", "--proxyPort=-1"]);
    assert!(s.proxy.is_none());

    // HTTPS_PROXY, the AWS CLI's syntax; the password moves out of the URL.
    let fx = Fx::new()
        .env(
            "HTTPS_PROXY",
            &format!("http://alice:{PROXY_SECRET}@10.0.0.1:8080"),
        )
        .env("NO_PROXY", "localhost");
    let s = fx.load(&["--workerGroup=w"]);
    let px = s.proxy.as_ref().unwrap();
    assert_eq!(px.url, "http://10.0.0.1:8080");
    assert_eq!(px.username.as_deref(), Some("alice"));
    assert_eq!(px.password.as_ref().unwrap().expose(), PROXY_SECRET);
    assert_eq!(px.no_proxy.as_deref(), Some("localhost"));
    assert_eq!(s.sources["proxy"], "env HTTPS_PROXY");
    // ... and the flags override it.
    let s = fx.load(&["--workerGroup=w", "--proxyHost=p", "--proxyPort=1"]);
    assert_eq!(s.proxy.unwrap().url, "http://p:1");

    // url and host in the same layer conflict; in different layers the higher wins.
    fx.write(
        "config.toml",
        "[proxy]\nurl = \"http://a:1\"\nhost = \"b\"\nport = 2\n",
    );
    assert!(fx.err(&["--workerGroup=w"]).contains("not both"));
    fx.write("config.toml", "[proxy]\nurl = \"http://a:1\"\n");
    let s = fx.load(&["--workerGroup=w", "--proxyHost=b", "--proxyPort=2"]);
    assert_eq!(s.proxy.unwrap().url, "http://b:2");
}

#[test]
fn secrets_are_redacted_in_debug_and_check_output() {
    let fx = Fx::new();
    let file = fx.creds("c.json", 0o600);
    let conf = fx.write(
        "config.toml",
        &format!("[proxy]\nurl = \"http://p:1\"\npassword = \"{PROXY_SECRET}\"\n"),
    );
    // world-readable on purpose: the loader warns about a password others can read
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    for args in [
        vec![
            "--workerGroup=w".to_string(),
            format!("--config={}", file.display()),
        ],
        vec![
            "--workerGroup=w".to_string(),
            "--accessId=AK".into(),
            format!("--secretKey={SECRET}"),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let s = fx.load(&args);
        let check = render_check(&s);
        let debug = format!("{s:?}");
        for text in [&check, &debug, &s.warnings.join("\n")] {
            assert!(!text.contains(SECRET), "{text}");
            assert!(!text.contains(PROXY_SECRET), "{text}");
        }
        assert!(check.contains("proxy.password = \"<redacted>\""), "{check}");
        assert!(
            s.warnings.iter().any(|w| w.contains("chmod o-r")),
            "{:?}",
            s.warnings
        );
    }
}

#[test]
fn check_config_lists_every_value_with_its_source() {
    let fx = Fx::new().env("TASKRUNNER_DRAIN_TIMEOUT", "90s");
    fx.write("config.toml", "\nregion = \"eu-west-1\"\n");
    let inv = fx
        .try_load(&["--workerGroup=wg-9", "--check-config", "--tasks=3"])
        .unwrap();
    let Invocation::CheckConfig(s) = inv else {
        panic!("--check-config did not give CheckConfig")
    };
    let text = render_check(&s);
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in\n{text}"))
            .to_string()
    };
    assert!(line("worker-group").ends_with("# --workerGroup"), "{text}");
    assert!(line("tasks").ends_with("# --tasks"), "{text}");
    assert!(line("drain-timeout").contains("\"1m30s\""), "{text}");
    assert!(
        line("drain-timeout").ends_with("# env TASKRUNNER_DRAIN_TIMEOUT"),
        "{text}"
    );
    assert!(
        line("region").ends_with(&format!("# {}:2", fx.path("config.toml").display())),
        "{text}"
    );
    assert!(line("kill-grace").ends_with("# default"), "{text}");
    assert!(line("taskrunner-id").ends_with("  # default"), "{text}");
    assert!(
        text.lines().all(|l| l.starts_with('#') || l.contains("  # ")),
        "{text}"
    );
    assert!(line("endpoint").contains("https://datapipeline.eu-west-1.amazonaws.com"));
    assert!(line("credentials").contains("default chain"));
    for (key, _) in KEYS.iter().filter(|(k, _)| !k.starts_with("proxy.")) {
        if *key == "credentials-file" {
            continue;
        }
        line(key);
    }
}

#[test]
fn unknown_taskrunner_env_vars_are_warned_about() {
    let s = Fx::new().env("TASKRUNNER_TASK", "4").load(&["--workerGroup=w"]);
    assert!(
        s.warnings.iter().any(|w| w.contains("TASKRUNNER_TASK ")),
        "{:?}",
        s.warnings
    );
    assert_eq!(s.tasks.get(), 2);
}

#[test]
fn jdbc_driver_path_is_accepted_with_a_warning() {
    let s = Fx::new().load(&[
        "--workerGroup=w",
        "--jdbcDriverS3Path=s3://b/mysql.jar",
        "--s3NoProxy",
    ]);
    assert_eq!(s.jdbc_driver_s3_path.unwrap().to_string(), "s3://b/mysql.jar");
    assert!(s.s3_no_proxy);
    assert!(s.warnings.iter().any(|w| w.contains("--jdbcDriverS3Path")));
}

#[test]
fn reload_rereads_files_keeps_credentials_and_reports_errors() {
    let fx = Fx::new();
    let file = fx.creds("c.json", 0o600);
    fx.write("config.toml", "tasks = 2\n");
    let s = fx.load(&["--workerGroup=w", &format!("--config={}", file.display())]);
    assert_eq!(s.tasks.get(), 2);

    fx.write("config.toml", "tasks = 5\ndrain-timeout = \"2m\"\n");
    // The credentials file is not re-read (after the privilege drop it may not be readable).
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = reload(&s).unwrap();
    assert_eq!(r.tasks.get(), 5);
    assert_eq!(r.drain_timeout, Duration::from_secs(120));
    assert_eq!(r.credentials, s.credentials);

    fx.write("config.toml", "tasks = \"many\"\n");
    let e = reload(&r).unwrap_err();
    assert!(e.to_string().contains(":1: tasks:"), "{e}");
}

#[test]
fn packaging_example_documents_every_key_with_a_valid_value() {
    let text = include_str!("../../../packaging/config.toml");
    // Uncomment the example assignments (`#key = value`, `#[proxy]`), leave the prose.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest == "[proxy]"
                    || (rest.starts_with(|c: char| c.is_ascii_lowercase()) && rest.contains(" = ")) =>
            {
                rest.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let layer = parse_file(Path::new("packaging/config.toml"), &uncommented).unwrap();
    for (key, _) in KEYS {
        assert!(
            layer.iter().any(|(k, _, _)| k == key),
            "packaging/config.toml does not document {key}"
        );
    }
}

#[test]
fn proxy_user_info_is_percent_decoded() {
    assert_eq!(percent_decode("p%40ss+w%2Fd%"), "p@ss+w/d%");
    assert_eq!(percent_decode("caf%C3%A9%zz"), "café%zz");
}
