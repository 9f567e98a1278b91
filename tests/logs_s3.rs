//! The S3 side of `taskrunner::logs::ship` against moto's S3 server (a real S3 implementation
//! this project did not write), started on 127.0.0.1 by each test and killed on drop.
//! Needs `python3 -m moto.server` (PyPI package `moto[server]`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::Client;
use taskrunner::config::S3Uri;
use taskrunner::logs::ship::{HourlyShipping, Shipper, ShipperConfig};
use taskrunner::logs::{Clock, ManualClock};
use tokio::time::Instant;

const BUCKET: &str = "logs-bucket";

struct Moto {
    child: Child,
}

impl Moto {
    /// Start moto on `port` and wait until it accepts connections.
    fn start(port: u16) -> Moto {
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env("NO_PROXY", "*")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (pip install 'moto[server]')");
        let moto = Moto { child };
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        moto
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn client(port: u16) -> Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .force_path_style(true)
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(60))
                .build(),
        )
        .build();
    Client::from_conf(conf)
}

fn fast_config(state: &Path, output: &Path) -> ShipperConfig {
    let mut cfg = ShipperConfig::new(state, output);
    cfg.backoff_initial = Duration::from_millis(200);
    cfg.backoff_max = Duration::from_secs(2);
    cfg.maintenance_interval = Duration::from_secs(3600);
    cfg
}

async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get(client: &Client, key: &str) -> Vec<u8> {
    let out = client
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{key}: {e:?}"));
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

/// Every key in the bucket with how many versions it has (the bucket is versioned, so a key
/// uploaded twice shows two versions).
async fn versions(client: &Client) -> Vec<(String, usize)> {
    let out = client.list_object_versions().bucket(BUCKET).send().await.unwrap();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for v in out.versions() {
        *counts.entry(v.key().unwrap().to_string()).or_default() += 1;
    }
    counts.into_iter().collect()
}

async fn make_bucket(client: &Client) {
    client.create_bucket().bucket(BUCKET).send().await.unwrap();
    client
        .put_bucket_versioning()
        .bucket(BUCKET)
        .versioning_configuration(
            aws_sdk_s3::types::VersioningConfiguration::builder()
                .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                .build(),
        )
        .send()
        .await
        .unwrap();
}

/// A `tracing` writer that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn upload_warnings(&self) -> usize {
        self.text()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("log upload to s3://"))
            .count()
    }
}

fn write(path: &Path, body: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
}

/// S3 is down for the first ~20 s, then up: every queued file arrives exactly once, local files
/// asked to be deleted are deleted only after the upload, and the failure is warned about once
/// per hour, not per try.
#[tokio::test]
async fn s3_outage_then_recovery_every_file_arrives_exactly_once() {
    let captured = Captured::default();
    let cap = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || cap.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("output");
    let state = tmp.path().join("state");
    let clock = ManualClock::at(2026, 11, 30, 5, 10, 0);
    // Three closed hours and the current one.
    let logs = output.join("logs");
    for h in ["02", "03", "04", "05"] {
        write(
            &logs.join(format!("TaskRunner.log.2026-11-30-{h}")),
            format!("hour {h}\n").repeat(100).as_bytes(),
        );
    }
    // One attempt directory as the supervisor leaves it.
    let attempt = output.join("tasks/df-01/ActivityId_fXNzc/@ActivityId_fXNzc_2014-05-01T00:00:00/@ActivityId_fXNzc_2014-05-01T00:00:00_Attempt=1");
    write(&attempt.join("stdout"), b"hello from stdout\n");
    write(&attempt.join("stderr"), b"hello from stderr\n");
    write(&attempt.join("activity.log"), b"command: echo hello\nexit: 0\n");
    // Ten loose files queued with delete_after_upload.
    let loose: Vec<PathBuf> = (0..10)
        .map(|i| tmp.path().join(format!("loose/file-{i}")))
        .collect();
    for (i, p) in loose.iter().enumerate() {
        write(p, format!("loose {i}\n").as_bytes());
    }

    let port = free_port();
    let mut cfg = fast_config(&state, &output);
    cfg.hourly = Some(HourlyShipping {
        log_uri: S3Uri::parse(&format!("s3://{BUCKET}/runner-logs")).unwrap(),
        runner_name: "host-a".into(),
    });
    let shipper = Shipper::start(client(port), cfg, Arc::new(clock.clone())).unwrap();
    assert_eq!(shipper.queue_hourly_files(false).unwrap(), 3);
    let n = shipper
        .ship_attempt(
            &attempt,
            &format!("s3://{BUCKET}/pipeline-logs/"),
            "df-01",
            "ActivityId_fXNzc",
            "@ActivityId_fXNzc_2014-05-01T00:00:00",
            "@ActivityId_fXNzc_2014-05-01T00:00:00_Attempt=1",
        )
        .unwrap();
    assert_eq!(n, 3);
    for (i, p) in loose.iter().enumerate() {
        shipper
            .enqueue(p, BUCKET, &format!("loose/file-{i}"), true)
            .unwrap();
    }
    assert_eq!(shipper.pending(), 16);

    // Nothing listens: connection refused for ~20 s, many tries, one warning.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(shipper.pending(), 16);
    assert!(loose.iter().all(|p| p.exists()), "deleted before the upload");
    assert_eq!(captured.upload_warnings(), 1, "{}", captured.text());
    assert!(captured.text().contains("cannot reach S3"), "{}", captured.text());
    // An hour later (clock) the warning comes once more.
    clock.advance(Duration::from_secs(3601));
    wait_for("a second warning an hour later", 30, || {
        captured.upload_warnings() == 2
    })
    .await;

    // S3 comes up; the bucket is created a moment later (NoSuchBucket in between is fine).
    let _moto = Moto::start(port);
    let c = client(port);
    make_bucket(&c).await;
    wait_for("the queue to drain", 120, || shipper.pending() == 0).await;
    assert!(
        loose.iter().all(|p| !p.exists()),
        "delete_after_upload files must be gone after the upload"
    );

    let mut expected: Vec<String> = ["02", "03", "04"]
        .iter()
        .map(|h| format!("runner-logs/host-a/TaskRunner.log.2026-11-30-{h}.gz"))
        .collect();
    let prefix = "pipeline-logs/df-01/ActivityId_fXNzc/@ActivityId_fXNzc_2014-05-01T00:00:00/@ActivityId_fXNzc_2014-05-01T00:00:00_Attempt=1";
    for f in ["activity.log", "stderr", "stdout"] {
        expected.push(format!("{prefix}/{f}"));
    }
    expected.extend((0..10).map(|i| format!("loose/file-{i}")));
    expected.sort();
    let got = versions(&c).await;
    assert_eq!(got, expected.iter().map(|k| (k.clone(), 1)).collect::<Vec<_>>());

    assert_eq!(
        gunzip(&get(&c, "runner-logs/host-a/TaskRunner.log.2026-11-30-03.gz").await),
        "hour 03\n".repeat(100).into_bytes()
    );
    assert_eq!(get(&c, &format!("{prefix}/stdout")).await, b"hello from stdout\n");
    assert_eq!(get(&c, "loose/file-7").await, b"loose 7\n");
    // The local hourly files and attempt files stay (the budget removes them later).
    assert!(logs.join("TaskRunner.log.2026-11-30-03").exists());
    assert!(attempt.join("stdout").exists());

    // Shutdown ships the current hour too, compressed; the next hour's close does not re-ship
    // what is done.
    let left = shipper.shutdown(Instant::now() + Duration::from_secs(60)).await;
    assert_eq!(left, 0);
    assert_eq!(
        gunzip(&get(&c, "runner-logs/host-a/TaskRunner.log.2026-11-30-05.gz").await),
        "hour 05\n".repeat(100).into_bytes()
    );
    assert_eq!(versions(&c).await.len(), expected.len() + 1);
}

/// Uploads queued while S3 was down survive a restart of the shipper and complete after it.
#[tokio::test]
async fn pending_uploads_resume_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("output");
    let state = tmp.path().join("state");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::at(2026, 11, 30, 5, 10, 0));
    let port = free_port();
    let files: Vec<PathBuf> = (0..5)
        .map(|i| output.join(format!("tasks/p/c/i/a{i}/stdout")))
        .collect();
    for (i, f) in files.iter().enumerate() {
        write(f, format!("attempt {i}\n").as_bytes());
    }
    {
        let shipper = Shipper::start(client(port), fast_config(&state, &output), clock.clone()).unwrap();
        for (i, f) in files.iter().enumerate() {
            shipper.enqueue(f, BUCKET, &format!("k/{i}"), false).unwrap();
        }
        let left = shipper.shutdown(Instant::now() + Duration::from_secs(2)).await;
        assert_eq!(left, 5, "nothing can be uploaded while S3 is down");
    }
    let _moto = Moto::start(port);
    let c = client(port);
    make_bucket(&c).await;
    let shipper = Shipper::start(client(port), fast_config(&state, &output), clock).unwrap();
    assert_eq!(shipper.pending(), 5, "the queue is durable");
    wait_for("the resumed uploads", 120, || shipper.pending() == 0).await;
    for i in 0..5 {
        assert_eq!(
            get(&c, &format!("k/{i}")).await,
            format!("attempt {i}\n").into_bytes()
        );
    }
    assert_eq!(versions(&c).await.len(), 5);
    assert_eq!(
        shipper.shutdown(Instant::now() + Duration::from_secs(10)).await,
        0
    );
}

/// A file over the multipart threshold goes up in parts, and arrives whole.
#[tokio::test]
async fn a_large_file_goes_up_as_multipart() {
    // The shipper's warnings (why an upload fails) go to the test output.
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).try_init();
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("output");
    let port = free_port();
    let _moto = Moto::start(port);
    let c = client(port);
    make_bucket(&c).await;
    let big = output.join("tasks/p/c/i/a/stdout");
    // 20 MiB of varied bytes: three parts of 8 MiB.
    let mut body = Vec::with_capacity(20 << 20);
    let mut x: u32 = 12345;
    while body.len() < 20 << 20 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        body.extend_from_slice(&x.to_le_bytes());
    }
    write(&big, &body);
    let shipper = Shipper::start(
        client(port),
        fast_config(&tmp.path().join("state"), &output),
        Arc::new(ManualClock::at(2026, 11, 30, 5, 10, 0)),
    )
    .unwrap();
    shipper.enqueue(&big, BUCKET, "big/stdout", false).unwrap();
    wait_for("the multipart upload", 180, || shipper.pending() == 0).await;
    let head = c
        .head_object()
        .bucket(BUCKET)
        .key("big/stdout")
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(20 << 20));
    // A multipart object's ETag is "<md5 of the part md5s>-<parts>".
    let etag = head.e_tag().unwrap().trim_matches('"').to_string();
    assert!(etag.ends_with("-3"), "not a 3-part upload: {etag}");
    assert!(get(&c, "big/stdout").await == body, "content differs");
    shipper.shutdown(Instant::now() + Duration::from_secs(10)).await;
}

/// A budget smaller than the logs: uploaded files go first and the un-uploaded ones survive
/// while uploaded ones exist; when only un-uploaded files are left, the oldest goes (last resort).
#[tokio::test]
async fn the_disk_budget_removes_uploaded_files_first() {
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("output");
    let state = tmp.path().join("state");
    let port = free_port();
    let _moto = Moto::start(port);
    let c = client(port);
    make_bucket(&c).await;
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::at(2026, 11, 30, 5, 10, 0));
    const MIB: u64 = 1 << 20;
    let attempts: Vec<PathBuf> = (0..4).map(|i| output.join(format!("tasks/p/c/i/a{i}"))).collect();
    let mut cfg = fast_config(&state, &output);
    cfg.disk_budget_bytes = Some(MIB * 5 / 2);
    {
        let shipper = Shipper::start(client(port), cfg.clone(), clock.clone()).unwrap();
        // The pass at start must not see half-written fixtures.
        wait_for("the first maintenance pass", 60, || {
            shipper.maintenance_passes() >= 1
        })
        .await;
        for (i, a) in attempts.iter().enumerate() {
            write(&a.join("stdout"), &vec![b'0' + i as u8; MIB as usize]);
            // Oldest first: a0 is the oldest.
            let f = std::fs::File::options()
                .write(true)
                .open(a.join("stdout"))
                .unwrap();
            f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600 * (10 - i as u64)))
                .unwrap();
        }
        // a0 and a1 go to a bucket that does not exist: they stay pending.
        for a in &attempts[..2] {
            shipper
                .ship_attempt(
                    a,
                    "s3://no-such-bucket/x",
                    "p",
                    "c",
                    "i",
                    a.file_name().unwrap().to_str().unwrap(),
                )
                .unwrap();
        }
        for a in &attempts[2..] {
            shipper
                .ship_attempt(
                    a,
                    &format!("s3://{BUCKET}/x"),
                    "p",
                    "c",
                    "i",
                    a.file_name().unwrap().to_str().unwrap(),
                )
                .unwrap();
        }
        wait_for("two uploads", 120, || shipper.pending() == 2).await;

        let r = shipper.enforce_budget();
        assert!(r.used_before >= 4 * MIB, "{r:?}");
        let removed: Vec<PathBuf> = r.removed.iter().map(|(p, _, _)| p.clone()).collect();
        assert_eq!(removed, [attempts[2].join("stdout"), attempts[3].join("stdout")]);
        assert!(attempts[0].join("stdout").exists() && attempts[1].join("stdout").exists());
        assert!(taskrunner::logs::budget::disk_usage(&output) <= MIB * 5 / 2);
        assert_eq!(shipper.disk_used(), r.used_after);
        shipper.shutdown(Instant::now() + Duration::from_secs(1)).await;
    }
    // A tighter budget with only un-uploaded files left: the oldest goes, the newer one stays.
    cfg.disk_budget_bytes = Some(MIB * 3 / 2);
    let shipper = Shipper::start(client(port), cfg, clock).unwrap();
    // The pass at start enforces it.
    wait_for("the first maintenance pass", 60, || {
        shipper.maintenance_passes() >= 1
    })
    .await;
    assert!(
        !attempts[0].join("stdout").exists(),
        "the oldest un-uploaded file is the last resort"
    );
    assert!(attempts[1].join("stdout").exists());
    assert!(!attempts[2].join("stdout").exists() && !attempts[3].join("stdout").exists());
    assert!(taskrunner::logs::budget::disk_usage(&output) <= MIB * 3 / 2);
    shipper.shutdown(Instant::now() + Duration::from_secs(1)).await;
}
