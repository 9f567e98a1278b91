//! Shared helpers for the integration tests: spawn `datapipeline-local`, submit a pipeline, wait
//! for an attempt's status, spawn `taskrunner`, start moto's S3 server. Every process is killed
//! when its guard drops; every test works in its own temp dir and binds 127.0.0.1:0.
//!
//! Use from a test file with `mod common;` (not every test uses every helper).
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "AKIDRUNNERTEST000001";
/// A recognisable secret: tests grep logs for it.
pub const SECRET_KEY: &str = "runnerTestSecret/k3y+NEVER-IN-LOGS";
pub const WORKER_GROUP: &str = "wg-12345";

/// Generous: tests run on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(120);

/// A child process killed (SIGKILL to its process group, then reaped) on drop. Its stdout and
/// stderr are collected in memory by reader threads.
pub struct Proc {
    pub child: Child,
    pub name: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Spawns `cmd` in its own process group, with the proxy variables removed.
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        use std::os::unix::process::CommandExt;
        cmd.env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env("NO_PROXY", "*")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        pump(child.stdout.take().unwrap(), stdout.clone());
        pump(child.stderr.take().unwrap(), stderr.clone());
        Proc {
            child,
            name: name.to_string(),
            stdout,
            stderr,
        }
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the process (not its group).
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits up to `limit` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits until `pred(stdout + stderr)` holds.
    pub fn wait_output(&self, what: &str, pred: impl Fn(&str) -> bool) {
        wait_for(what, WAIT, || {
            let all = format!("{}{}", self.stdout(), self.stderr());
            pred(&all).then_some(())
        });
    }

    pub fn kill(&mut self) {
        unsafe {
            libc::killpg(self.pid(), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- {} stdout ----\n{}", self.name, self.stdout());
            eprintln!("---- {} stderr ----\n{}", self.name, tail(&self.stderr(), 8000));
        }
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

fn pump(r: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => into.lock().unwrap().push_str(&line),
            }
        }
    });
}

/// Polls `f` until it returns `Some`, or panics naming `what`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes a credentials file (mode 0600) in the format of the jar's credentials.json.
pub fn credentials_file(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("credentials.json");
    std::fs::write(
        &p,
        json!({"access-id": ACCESS_KEY, "private-key": SECRET_KEY}).to_string(),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A running `datapipeline-local serve`.
pub struct Local {
    pub proc: Proc,
    pub url: String,
    pub credentials: PathBuf,
    pub dir: PathBuf,
    args: Vec<String>,
}

/// Flags that make the local endpoint fast for tests: a short long poll, a short ack timeout.
pub const FAST_LOCAL: &[&str] = &["--long-poll-seconds", "2", "--ack-timeout-seconds", "20"];

impl Local {
    /// Starts the endpoint on 127.0.0.1:0 with SigV4 checked against the test keys.
    pub fn start(dir: &Path, extra: &[&str]) -> Local {
        Self::start_on(dir, "127.0.0.1:0", extra)
    }

    pub fn start_on(dir: &Path, listen: &str, extra: &[&str]) -> Local {
        let credentials = credentials_file(dir);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            listen.into(),
            "--credentials".into(),
            credentials.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_datapipeline-local"));
        cmd.args(&args).current_dir(dir);
        let proc = Proc::spawn("datapipeline-local", cmd);
        let url = wait_for("datapipeline-local to listen", WAIT, || {
            proc.stdout()
                .lines()
                .find_map(|l| l.strip_prefix("listening on ").map(|u| u.trim().to_string()))
        });
        Local {
            proc,
            url,
            credentials,
            dir: dir.to_path_buf(),
            args,
        }
    }

    /// Kills the endpoint (as a crash would).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same address with the same flags (use `--state` to keep pipelines).
    pub fn restart(&mut self) {
        let addr = self.url.trim_start_matches("http://").to_string();
        let mut args = self.args.clone();
        let i = args.iter().position(|a| a == "--listen").unwrap();
        args[i + 1] = addr;
        let extra: Vec<&str> = args[5..].iter().map(|s| s.as_str()).collect();
        let fresh = wait_for("the port to be free again", WAIT, || {
            std::net::TcpListener::bind(&args[i + 1]).ok().map(drop)
        });
        let _ = fresh;
        *self = Local::start_on(&self.dir.clone(), &args[i + 1].clone(), &extra);
    }

    pub fn client(&self) -> taskrunner::local::client::Client {
        taskrunner::local::client::Client::new(&self.url, "us-east-1", ACCESS_KEY.into(), SECRET_KEY.into())
            .unwrap()
    }

    /// Calls an operation with the test keys (a small runtime per call: tests are synchronous).
    pub fn call(&self, op: &str, input: Value) -> Value {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = self.client();
        rt.block_on(c.call(op, &input))
            .unwrap_or_else(|e| panic!("{op} failed: {e:#}"))
    }

    /// Create, put, activate (the library's `submit`, as `datapipeline-local submit` does);
    /// returns the pipeline id.
    pub fn submit(&self, definition: &Value) -> String {
        let file = self.dir.join(format!("pipeline-{}.json", uuid_like()));
        std::fs::write(&file, serde_json::to_string_pretty(definition).unwrap()).unwrap();
        taskrunner::net::install_crypto_provider();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = self.client();
        rt.block_on(taskrunner::local::client::submit(&c, &file))
            .unwrap_or_else(|e| panic!("submit failed: {e:#}"))
    }

    /// The attempt objects of a pipeline (evaluated), each as `{id, fields{key: value}}`.
    pub fn attempts(&self, pipeline_id: &str) -> Vec<Obj> {
        let ids = self.call(
            "QueryObjects",
            json!({"pipelineId": pipeline_id, "sphere": "ATTEMPT", "limit": 100}),
        );
        let ids: Vec<String> = ids["ids"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if ids.is_empty() {
            return vec![];
        }
        let objs = self.call(
            "DescribeObjects",
            json!({"pipelineId": pipeline_id, "objectIds": ids, "evaluateExpressions": false}),
        );
        objs["pipelineObjects"]
            .as_array()
            .unwrap()
            .iter()
            .map(Obj::from_json)
            .collect()
    }

    /// Waits until some attempt of the pipeline reaches one of `statuses`; returns it.
    pub fn wait_attempt(&self, pipeline_id: &str, statuses: &[&str]) -> Obj {
        wait_for(
            &format!("an attempt of {pipeline_id} in {statuses:?}"),
            WAIT,
            || {
                self.attempts(pipeline_id)
                    .into_iter()
                    .find(|a| a.get("@status").is_some_and(|s| statuses.contains(&s)))
            },
        )
    }

    /// Heartbeat ids seen by the endpoint are not exposed by the API; tests read them from the
    /// endpoint's log instead.
    pub fn log(&self) -> String {
        self.proc.stderr()
    }
}

/// A pipeline object as `{id, fields}` with the first value of each key.
#[derive(Debug, Clone)]
pub struct Obj {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl Obj {
    fn from_json(v: &Value) -> Obj {
        let fields = v["fields"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|f| {
                        let k = f["key"].as_str().unwrap_or_default().to_string();
                        let v = f["stringValue"]
                            .as_str()
                            .or_else(|| f["refValue"].as_str())
                            .unwrap_or_default()
                            .to_string();
                        (k, v)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Obj {
            id: v["id"].as_str().unwrap_or_default().to_string(),
            fields,
        }
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// An on-demand pipeline with one ShellCommandActivity for the test worker group. `extra` adds
/// fields to the activity (`scriptArgument` may be an array: repeated keys).
pub fn shell_pipeline(command: &str, extra: Value) -> Value {
    let mut act = json!({
        "id": "Act",
        "name": "Act",
        "type": "ShellCommandActivity",
        "workerGroup": WORKER_GROUP,
        "command": command,
        "maximumRetries": "0",
    });
    if let (Some(a), Some(e)) = (act.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            a.insert(k.clone(), v.clone());
        }
    }
    json!({"objects": [
        {"id": "Default", "name": "Default", "scheduleType": "ondemand"},
        act
    ]})
}

/// A running `taskrunner`.
pub struct Runner {
    pub proc: Proc,
    pub dir: PathBuf,
}

/// Test settings for the runner: fast progress, short kill grace, unless `extra` sets them.
pub fn settings_toml(extra: &str) -> String {
    let mut out = String::new();
    for (key, value) in [
        ("progress-interval", "\"1s\""),
        ("kill-grace", "\"2s\""),
        ("drain-timeout", "\"60s\""),
    ] {
        if !extra.lines().any(|l| l.trim_start().starts_with(key)) {
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    // CI runs as root, and taskrunner refuses to run tasks as root unless told so (and its default
    // `taskrunner` user does not exist here). Tests that are about privileges set `user` themselves.
    if nix::unistd::geteuid().is_root() && !extra.lines().any(|l| l.trim_start().starts_with("user")) {
        out.push_str("user = \"root\"\nallow-root = true\n");
    }
    out.push_str(extra);
    out.push('\n');
    out
}

impl Runner {
    /// Starts `taskrunner` against `local` with the jar's options, a settings file made of
    /// [`settings_toml`]`(settings)`, and `extra` arguments. Its directories live under `dir`.
    pub fn start(local: &Local, dir: &Path, settings: &str, extra: &[&str]) -> Runner {
        std::fs::create_dir_all(dir).unwrap();
        let settings_file = dir.join("taskrunner.toml");
        std::fs::write(&settings_file, settings_toml(settings)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskrunner"));
        cmd.current_dir(dir)
            .arg("--config")
            .arg(&local.credentials)
            .arg(format!("--workerGroup={WORKER_GROUP}"))
            .arg("--region=us-east-1")
            .arg(format!("--endpoint={}", local.url))
            .arg("--output")
            .arg(dir.join("output"))
            .arg("--settings")
            .arg(&settings_file)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--runtime-dir")
            .arg(dir.join("run"))
            .args(extra)
            .env("RUST_LOG", "info,taskrunner=debug");
        // Keep the test's own environment from leaking settings in.
        for (k, _) in std::env::vars() {
            if k.starts_with("TASKRUNNER_") || k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        let proc = Proc::spawn("taskrunner", cmd);
        let r = Runner {
            proc,
            dir: dir.to_path_buf(),
        };
        r.proc
            .wait_output("taskrunner to start", |o| o.contains("Logging to "));
        r
    }

    pub fn log(&self) -> String {
        format!("{}{}", self.proc.stdout(), self.proc.stderr())
    }

    /// The per-attempt log directory of the only attempt of `pipeline_id`.
    pub fn attempt_dir(&self, pipeline_id: &str) -> PathBuf {
        let base = self.dir.join("output/tasks").join(pipeline_id);
        find_file(&base, "activity.log")
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| panic!("no attempt directory under {}", base.display()))
    }
}

/// The first file named `name` under `dir` (depth-first).
pub fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let rd = std::fs::read_dir(dir).ok()?;
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// True while a process with this pid exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')),
        Err(_) => false,
    }
}

/// moto's S3 server (`python3 -m moto.server`), on a free port.
pub struct Moto {
    pub proc: Proc,
    pub url: String,
}

impl Moto {
    pub fn start(dir: &Path) -> Moto {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir);
        let proc = Proc::spawn("moto", cmd);
        let url = format!("http://127.0.0.1:{port}");
        wait_for("moto to answer", WAIT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
        });
        Moto { proc, url }
    }

    /// An S3 client with the test keys (moto accepts any).
    pub fn s3(&self) -> aws_sdk_s3::Client {
        let creds = aws_sdk_s3::config::Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test");
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.url)
            .force_path_style(true)
            .credentials_provider(creds)
            // The crate is built without a default HTTPS client: give it a plain-HTTP one for moto.
            .http_client(aws_smithy_http_client::Builder::new().build_http())
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s3 = self.s3();
        rt.block_on(async {
            let _ = s3.create_bucket().bucket(bucket).send().await;
            s3.put_object()
                .bucket(bucket)
                .key(key)
                .body(body.to_vec().into())
                .send()
                .await
                .unwrap();
        });
    }

    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s3 = self.s3();
        rt.block_on(async {
            let o = s3.get_object().bucket(bucket).key(key).send().await.ok()?;
            Some(o.body.collect().await.ok()?.into_bytes().to_vec())
        })
    }
}
