//! Shipping log files to S3 through a durable queue, and the disk budget of the output directory.
//!
//! # The queue
//! `<state_dir>/log-uploads.sqlite3` (WAL, `synchronous=FULL`): one row per (file, destination).
//! A row is committed before [`Shipper::enqueue`] returns; a worker uploads pending rows oldest
//! first and marks them `done` only after S3 answered 200, and only then deletes the local file
//! when the row asked for it. Rows survive restarts (the worker resumes them at start) and S3
//! outages: a failure puts the whole bucket on a capped, jittered exponential backoff, and the
//! reason (403, NoSuchBucket, connection/proxy) is logged as a WARN at most once per
//! [`ShipperConfig::warn_interval`] per bucket, not per try. A row whose file disappeared is
//! marked `lost` with an ERROR. Files of [`ShipperConfig::multipart_threshold`] and more go up as
//! multipart uploads read part by part (one part in memory at a time); smaller ones are streamed
//! from disk in one PUT. Rows that ask for gzip are compressed into `<state_dir>/upload-spool/`
//! first (atomically), so a retry does not compress again.
//!
//! # Key layout
//! * `--logUri s3://b/p`: `s3://b/p/<taskrunnerId or hostname>/TaskRunner.log.YYYY-MM-DD-HH.gz`,
//!   one object per hour, always gzip (the guide: "pushing your compressed logs"). Closed hours
//!   are queued by the maintenance pass (every [`ShipperConfig::maintenance_interval`]), and at
//!   [`Shipper::shutdown`] every file is queued, the current hour too; when the runner comes
//!   back in the same hour, that hour is uploaded again in full when it closes (same key).
//! * `pipelineLogUri s3://b/p` ([`Shipper::ship_attempt`]):
//!   `s3://b/p/<pipelineId>/<component>/<instance>/<attempt>/<file>`, the files of the attempt
//!   directory as they are (`stdout`, `stderr`, `activity.log`), as `dp-viewing-logs.md`
//!   describes. The local copies stay; the disk budget removes uploaded files first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::budget::{self, FileClass};
use super::clock::{hour_start, Clock};
use super::compress::{gzip_file, with_suffix};
use super::hourly::{file_name, parse_file_name};
use crate::config::S3Uri;

/// `--logUri` shipping of the hourly files.
#[derive(Clone, Debug)]
pub struct HourlyShipping {
    pub log_uri: S3Uri,
    /// `--taskrunnerId`, or the host name when there is none.
    pub runner_name: String,
}

/// How the shipper runs. [`ShipperConfig::new`] has the production values.
#[derive(Clone, Debug)]
pub struct ShipperConfig {
    /// Holds the queue database and the gzip spool.
    pub state_dir: PathBuf,
    /// `--output`: `logs/` (hourly files) and `tasks/` (attempts) live here; the budget covers it.
    pub output_dir: PathBuf,
    pub hourly: Option<HourlyShipping>,
    /// `None`: no budget (usage is still measured).
    pub disk_budget_bytes: Option<u64>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub multipart_threshold: u64,
    pub part_size: usize,
    pub warn_interval: Duration,
    pub maintenance_interval: Duration,
}

impl ShipperConfig {
    pub fn new(state_dir: impl Into<PathBuf>, output_dir: impl Into<PathBuf>) -> ShipperConfig {
        ShipperConfig {
            state_dir: state_dir.into(),
            output_dir: output_dir.into(),
            hourly: None,
            disk_budget_bytes: None,
            backoff_initial: Duration::from_secs(2),
            backoff_max: Duration::from_secs(300),
            multipart_threshold: 16 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
            warn_interval: Duration::from_secs(3600),
            maintenance_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("upload queue {}: {source}", path.display())]
    Db { path: PathBuf, source: rusqlite::Error },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{field} {value:?} cannot be used in an S3 key: {why}")]
    BadKeySegment {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("pipelineLogUri: {0}")]
    BadUri(String),
}

/// One queue row.
#[derive(Clone, Debug)]
struct Row {
    id: i64,
    local_path: PathBuf,
    bucket: String,
    key: String,
    gzip: bool,
    delete_after: bool,
    partial: bool,
}

/// Why an upload failed.
enum UploadError {
    /// The local file is gone: nothing to retry.
    SourceMissing,
    /// Try again later.
    Retry(String),
}

#[derive(Default)]
struct Destination {
    failures: u32,
    retry_at: Option<Instant>,
    last_warn: Option<DateTime<Utc>>,
}

struct Inner {
    client: Client,
    cfg: ShipperConfig,
    clock: Arc<dyn Clock>,
    db: Mutex<Connection>,
    db_path: PathBuf,
    spool: PathBuf,
    wake: Notify,
    disk_used: AtomicU64,
    maintenance_passes: AtomicU64,
    dests: Mutex<HashMap<String, Destination>>,
}

/// The upload queue, its worker and the maintenance pass. Needs a Tokio runtime.
pub struct Shipper {
    inner: Arc<Inner>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS uploads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    local_path TEXT NOT NULL,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    gzip INTEGER NOT NULL,
    delete_after INTEGER NOT NULL,
    partial INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    enqueued_at INTEGER NOT NULL,
    done_at INTEGER
);
CREATE INDEX IF NOT EXISTS uploads_state ON uploads(state, bucket, id);
CREATE INDEX IF NOT EXISTS uploads_path ON uploads(local_path);
CREATE INDEX IF NOT EXISTS uploads_key ON uploads(bucket, key);
";

fn open_db(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // WAL + FULL: a committed enqueue survives a power loss.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(SCHEMA)?;
    // A cheap check that the file is a usable database (a torn or foreign file fails here).
    conn.query_row("SELECT COUNT(*) FROM uploads", [], |r| r.get::<_, i64>(0))?;
    Ok(conn)
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Shipper {
    /// Open (or create) the queue in `cfg.state_dir` and start the worker and the maintenance pass.
    /// Rows left pending by an earlier run are resumed.
    pub fn start(client: Client, cfg: ShipperConfig, clock: Arc<dyn Clock>) -> Result<Shipper, ShipError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| ShipError::Io {
            what: "cannot create the state directory",
            path: cfg.state_dir.clone(),
            source,
        })?;
        let db_path = cfg.state_dir.join("log-uploads.sqlite3");
        let conn = match open_db(&db_path) {
            Ok(c) => c,
            Err(e) => {
                // Never refuse to start over a damaged queue: keep it aside for inspection.
                let aside = with_suffix(
                    &db_path,
                    &format!(".corrupt-{}", Utc::now().format("%Y%m%dT%H%M%SZ")),
                );
                tracing::error!(
                    "upload queue {} cannot be read ({e}); moved it to {} and starting an empty queue; \
                     files it listed stay on disk but will not be uploaded",
                    db_path.display(),
                    aside.display()
                );
                let _ = std::fs::rename(&db_path, &aside);
                for ext in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(with_suffix(&db_path, ext));
                }
                open_db(&db_path).map_err(|source| ShipError::Db {
                    path: db_path.clone(),
                    source,
                })?
            }
        };
        let spool = cfg.state_dir.join("upload-spool");
        std::fs::create_dir_all(&spool).map_err(|source| ShipError::Io {
            what: "cannot create the upload spool",
            path: spool.clone(),
            source,
        })?;
        // A crash while compressing leaves `<id>.gz.tmp` behind; the complete ones are reused.
        if let Ok(rd) = std::fs::read_dir(&spool) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let inner = Arc::new(Inner {
            client,
            cfg,
            clock,
            db: Mutex::new(conn),
            db_path,
            spool,
            wake: Notify::new(),
            disk_used: AtomicU64::new(0),
            maintenance_passes: AtomicU64::new(0),
            dests: Mutex::new(HashMap::new()),
        });
        let pending = inner.pending().unwrap_or(0);
        if pending > 0 {
            tracing::info!("{pending} log uploads pending from an earlier run; resuming them");
        }
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(worker(inner.clone(), cancel.clone()));
        tasks.spawn(maintenance(inner.clone(), cancel.clone()));
        Ok(Shipper { inner, cancel, tasks })
    }

    /// Queue `local_path` for `s3://bucket/key`; durable when this returns. Queuing the same
    /// file for the same key while a row for it is still pending does nothing.
    pub fn enqueue(
        &self,
        local_path: &Path,
        bucket: &str,
        key: &str,
        delete_after_upload: bool,
    ) -> Result<i64, ShipError> {
        let id = self
            .inner
            .insert(local_path, bucket, key, false, delete_after_upload, false)?;
        self.inner.wake.notify_one();
        Ok(id)
    }

    /// Queue every file of an attempt directory for
    /// `<pipelineLogUri>/<pipelineId>/<component>/<instance>/<attempt>/<file>`.
    /// Returns how many files were queued.
    pub fn ship_attempt(
        &self,
        attempt_dir: &Path,
        pipeline_log_uri: &str,
        pipeline_id: &str,
        component: &str,
        instance: &str,
        attempt: &str,
    ) -> Result<usize, ShipError> {
        let uri = S3Uri::parse(pipeline_log_uri.trim()).map_err(ShipError::BadUri)?;
        let mut prefix = Vec::new();
        for (field, value) in [
            ("pipelineId", pipeline_id),
            ("component", component),
            ("instance", instance),
            ("attempt", attempt),
        ] {
            check_segment(field, value)?;
            prefix.push(value);
        }
        let mut files = Vec::new();
        collect_files(attempt_dir, attempt_dir, &mut files).map_err(|source| ShipError::Io {
            what: "cannot read the attempt directory",
            path: attempt_dir.to_path_buf(),
            source,
        })?;
        files.sort();
        for rel in &files {
            let rel_key = rel
                .iter()
                .map(|c| c.to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let key = uri.key(&format!("{}/{rel_key}", prefix.join("/")));
            self.inner
                .insert(&attempt_dir.join(rel), &uri.bucket, &key, false, false, false)?;
        }
        self.inner.wake.notify_one();
        Ok(files.len())
    }

    /// Rows waiting for upload (for `taskrunner-ctl status`).
    pub fn pending(&self) -> u64 {
        self.inner.pending().unwrap_or(0)
    }

    /// Bytes under the output directory at the last maintenance pass.
    pub fn disk_used(&self) -> u64 {
        self.inner.disk_used.load(Ordering::Relaxed)
    }

    /// Maintenance passes completed (queue closed hours, disk budget); the first runs at start.
    pub fn maintenance_passes(&self) -> u64 {
        self.inner.maintenance_passes.load(Ordering::Relaxed)
    }

    /// Queue closed hourly files (and, with `include_current`, the current one) now.
    pub fn queue_hourly_files(&self, include_current: bool) -> Result<usize, ShipError> {
        let n = self.inner.queue_hourly(include_current)?;
        self.inner.wake.notify_one();
        Ok(n)
    }

    /// Run the disk budget now (the maintenance pass does it every interval).
    pub fn enforce_budget(&self) -> budget::BudgetReport {
        self.inner.enforce_budget()
    }

    /// Queue every hourly file (the current one too), try each bucket once more even if it is
    /// backing off, and upload until the queue is empty or `deadline`. Whatever is left stays
    /// queued for the next start. Returns the number of rows left pending.
    pub async fn shutdown(&self, deadline: Instant) -> u64 {
        if let Err(e) = self.inner.queue_hourly(true) {
            tracing::error!("cannot queue the hourly log files for upload at shutdown: {e}");
        }
        for d in self
            .inner
            .dests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values_mut()
        {
            d.retry_at = None;
        }
        self.inner.wake.notify_one();
        loop {
            let left = self.pending();
            if left == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(
                Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
        }
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        let left = self.pending();
        if left > 0 {
            tracing::warn!(
                "{left} log uploads still pending at shutdown; they stay queued in {} and resume at the next start",
                self.inner.db_path.display()
            );
        } else {
            tracing::info!("all queued log uploads are done");
        }
        left
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A path segment of an S3 key built from task data: no separators, no `.`/`..`, no control
/// characters (the task data comes from the service and could be hostile).
fn check_segment(field: &'static str, value: &str) -> Result<(), ShipError> {
    let why = if value.is_empty() {
        Some("it is empty")
    } else if value.contains('/') || value.contains('\\') {
        Some("it contains a path separator")
    } else if value == "." || value == ".." {
        Some("it is a relative path component")
    } else if value.chars().any(char::is_control) {
        Some("it contains control characters")
    } else if value.len() > 512 {
        Some("it is longer than 512 bytes")
    } else {
        None
    };
    match why {
        Some(why) => Err(ShipError::BadKeySegment {
            field,
            value: value.chars().take(80).collect(),
            why,
        }),
        None => Ok(()),
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ty = e.file_type()?;
        if ty.is_dir() {
            collect_files(root, &e.path(), out)?;
        } else if ty.is_file() {
            out.push(e.path().strip_prefix(root).expect("under root").to_path_buf());
        }
    }
    Ok(())
}

impl Inner {
    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn db_err(&self, source: rusqlite::Error) -> ShipError {
        ShipError::Db {
            path: self.db_path.clone(),
            source,
        }
    }

    fn insert(
        &self,
        local: &Path,
        bucket: &str,
        key: &str,
        gzip: bool,
        delete_after: bool,
        partial: bool,
    ) -> Result<i64, ShipError> {
        let db = self.db();
        let local_s = path_str(local);
        let existing: Option<(i64, bool)> = db
            .query_row(
                "SELECT id, partial FROM uploads WHERE state='pending' AND local_path=?1 AND bucket=?2 AND key=?3",
                params![local_s, bucket, key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.db_err(e))?;
        if let Some((id, was_partial)) = existing {
            if was_partial && !partial {
                // A pending snapshot of an hour that has closed since: upload the whole file.
                db.execute("UPDATE uploads SET partial=0 WHERE id=?1", params![id])
                    .map_err(|e| self.db_err(e))?;
                let _ = std::fs::remove_file(self.spool_path(id));
            }
            return Ok(id);
        }
        db.execute(
            "INSERT INTO uploads (local_path, bucket, key, gzip, delete_after, partial, enqueued_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                local_s,
                bucket,
                key,
                gzip,
                delete_after,
                partial,
                Utc::now().timestamp()
            ],
        )
        .map_err(|e| self.db_err(e))?;
        Ok(db.last_insert_rowid())
    }

    fn pending(&self) -> rusqlite::Result<u64> {
        self.db()
            .query_row("SELECT COUNT(*) FROM uploads WHERE state='pending'", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
    }

    fn spool_path(&self, id: i64) -> PathBuf {
        self.spool.join(format!("{id}.gz"))
    }

    /// The oldest pending row of a bucket that is not backing off; and, if none, when the
    /// earliest backing-off bucket may be tried again.
    fn next_due(&self) -> rusqlite::Result<(Option<Row>, Option<Instant>)> {
        let db = self.db();
        let buckets: Vec<String> = {
            let mut st = db.prepare("SELECT DISTINCT bucket FROM uploads WHERE state='pending'")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let now = Instant::now();
        let dests = self.dests.lock().unwrap_or_else(|e| e.into_inner());
        let mut best: Option<Row> = None;
        let mut wake_at: Option<Instant> = None;
        for b in buckets {
            if let Some(at) = dests.get(&b).and_then(|d| d.retry_at) {
                if at > now {
                    wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
                    continue;
                }
            }
            let row = db
                .query_row(
                    "SELECT id, local_path, bucket, key, gzip, delete_after, partial FROM uploads \
                     WHERE state='pending' AND bucket=?1 ORDER BY id LIMIT 1",
                    params![b],
                    |r| {
                        Ok(Row {
                            id: r.get(0)?,
                            local_path: PathBuf::from(r.get::<_, String>(1)?),
                            bucket: r.get(2)?,
                            key: r.get(3)?,
                            gzip: r.get(4)?,
                            delete_after: r.get(5)?,
                            partial: r.get(6)?,
                        })
                    },
                )
                .optional()?;
            if let Some(row) = row {
                if best.as_ref().is_none_or(|b| row.id < b.id) {
                    best = Some(row);
                }
            }
        }
        Ok((best, wake_at))
    }

    /// False when the row changed while it was uploading (a snapshot of the current hour that
    /// became the complete hour): it stays pending and goes up again.
    fn mark_done(&self, row: &Row) -> rusqlite::Result<bool> {
        let n = self.db().execute(
            "UPDATE uploads SET state='done', done_at=?2, last_error=NULL WHERE id=?1 AND partial=?3",
            params![row.id, Utc::now().timestamp(), row.partial],
        )?;
        Ok(n == 1)
    }

    fn mark_lost(&self, row: &Row) -> rusqlite::Result<()> {
        self.db().execute(
            "UPDATE uploads SET state='lost', last_error='local file missing' WHERE id=?1",
            params![row.id],
        )?;
        Ok(())
    }

    fn mark_failed(&self, row: &Row, reason: &str) -> rusqlite::Result<()> {
        self.db().execute(
            "UPDATE uploads SET attempts=attempts+1, last_error=?2 WHERE id=?1",
            params![row.id, reason],
        )?;
        Ok(())
    }

    fn backoff(&self, failures: u32) -> Duration {
        let exp = self
            .cfg
            .backoff_initial
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(self.cfg.backoff_max);
        // Full jitter in [exp/2, exp]: many runners behind one proxy do not retry in step.
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    fn on_success(&self, bucket: &str) {
        let mut dests = self.dests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = dests.get_mut(bucket) {
            if d.failures > 0 && d.last_warn.is_some() {
                tracing::info!(
                    "uploads to s3://{bucket} work again after {} failed tries",
                    d.failures
                );
            }
            *d = Destination::default();
        }
    }

    fn on_failure(&self, row: &Row, reason: &str) {
        let pending = self.pending().unwrap_or(0);
        let mut dests = self.dests.lock().unwrap_or_else(|e| e.into_inner());
        let d = dests.entry(row.bucket.clone()).or_default();
        d.failures += 1;
        let wait = self.backoff(d.failures);
        d.retry_at = Some(Instant::now() + wait);
        let now = self.clock.now();
        let warn_due = d.last_warn.is_none_or(|t| {
            now.signed_duration_since(t)
                .to_std()
                .is_ok_and(|age| age >= self.cfg.warn_interval)
        });
        if warn_due {
            d.last_warn = Some(now);
            tracing::warn!(
                "log upload to s3://{}/{} failed: {reason}; {pending} log uploads are pending and will be retried \
                 (next try in {:.0?}); this warning repeats at most once an hour for this bucket",
                row.bucket,
                row.key,
                wait
            );
        } else {
            tracing::debug!(
                "log upload to s3://{}/{} failed again ({} tries): {reason}",
                row.bucket,
                row.key,
                d.failures
            );
        }
    }

    /// The file to send for `row`, compressing into the spool when asked.
    async fn body_path(&self, row: &Row) -> Result<PathBuf, UploadError> {
        let src = &row.local_path;
        if !row.gzip {
            return if src.is_file() {
                Ok(src.clone())
            } else {
                Err(UploadError::SourceMissing)
            };
        }
        let spooled = self.spool_path(row.id);
        if spooled.is_file() {
            return Ok(spooled);
        }
        if !src.is_file() {
            // Compressed locally in the meantime (eight-hour rule): send that.
            let gz = with_suffix(src, ".gz");
            return if gz.is_file() {
                Ok(gz)
            } else {
                Err(UploadError::SourceMissing)
            };
        }
        let (s, d) = (src.clone(), spooled.clone());
        match tokio::task::spawn_blocking(move || gzip_file(&s, &d)).await {
            Ok(Ok(())) => Ok(spooled),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                let gz = with_suffix(src, ".gz");
                if gz.is_file() {
                    Ok(gz)
                } else {
                    Err(UploadError::SourceMissing)
                }
            }
            Ok(Err(e)) => Err(UploadError::Retry(format!(
                "cannot compress {}: {e}",
                src.display()
            ))),
            Err(e) => Err(UploadError::Retry(format!("compression task failed: {e}"))),
        }
    }

    async fn upload(&self, row: &Row) -> Result<(), UploadError> {
        let path = self.body_path(row).await?;
        let len = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(UploadError::SourceMissing),
            Err(e) => return Err(UploadError::Retry(format!("cannot read {}: {e}", path.display()))),
        };
        let content_type = if row.key.ends_with(".gz") {
            "application/gzip"
        } else {
            "text/plain"
        };
        if len >= self.cfg.multipart_threshold {
            return self.upload_multipart(row, &path, content_type).await;
        }
        let body = ByteStream::from_path(&path)
            .await
            .map_err(|e| UploadError::Retry(format!("cannot read {}: {e}", path.display())))?;
        self.client
            .put_object()
            .bucket(&row.bucket)
            .key(&row.key)
            .content_type(content_type)
            .content_length(len as i64)
            .body(body)
            .send()
            .await
            .map_err(|e| UploadError::Retry(describe(&e)))?;
        Ok(())
    }

    async fn upload_multipart(&self, row: &Row, path: &Path, content_type: &str) -> Result<(), UploadError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&row.bucket)
            .key(&row.key)
            .content_type(content_type)
            .send()
            .await
            .map_err(|e| UploadError::Retry(describe(&e)))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| UploadError::Retry("CreateMultipartUpload returned no upload id".into()))?
            .to_string();
        let result = self.send_parts(row, path, &upload_id).await;
        if result.is_err() {
            // Best effort: an abandoned upload costs storage until a lifecycle rule removes it.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&row.bucket)
                .key(&row.key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    async fn send_parts(&self, row: &Row, path: &Path, upload_id: &str) -> Result<(), UploadError> {
        let mut file = tokio::fs::File::open(path).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => UploadError::SourceMissing,
            _ => UploadError::Retry(format!("cannot open {}: {e}", path.display())),
        })?;
        let mut parts = Vec::new();
        let mut number = 1i32;
        loop {
            // One part in memory at a time.
            let mut buf = vec![0u8; self.cfg.part_size];
            let mut filled = 0;
            while filled < buf.len() {
                let n = file
                    .read(&mut buf[filled..])
                    .await
                    .map_err(|e| UploadError::Retry(format!("cannot read {}: {e}", path.display())))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 && number > 1 {
                break;
            }
            buf.truncate(filled);
            let out = self
                .client
                .upload_part()
                .bucket(&row.bucket)
                .key(&row.key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(buf))
                .send()
                .await
                .map_err(|e| UploadError::Retry(describe(&e)))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .build(),
            );
            number += 1;
            if filled < self.cfg.part_size {
                break;
            }
        }
        let parts_sent = parts.len();
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&row.bucket)
            .key(&row.key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await;
        match completed {
            Ok(_) => Ok(()),
            Err(e) => {
                // S3 may answer 200 with an error body, and some S3 implementations (moto 5.2)
                // answer with a body the SDK cannot parse: when the answer is unclear, the object
                // itself decides (its size, and a multipart ETag of as many parts as we sent).
                let expected_len = tokio::fs::metadata(path).await.map(|m| m.len() as i64).ok();
                let head = self
                    .client
                    .head_object()
                    .bucket(&row.bucket)
                    .key(&row.key)
                    .send()
                    .await;
                if let Ok(h) = head {
                    let etag_parts = h
                        .e_tag()
                        .unwrap_or("")
                        .trim_matches('"')
                        .rsplit('-')
                        .next()
                        .map(str::to_string);
                    if h.content_length() == expected_len && etag_parts == Some(parts_sent.to_string()) {
                        tracing::debug!(
                            "CompleteMultipartUpload for s3://{}/{} gave an unclear answer ({}), but the object is complete",
                            row.bucket,
                            row.key,
                            describe(&e)
                        );
                        return Ok(());
                    }
                }
                Err(UploadError::Retry(describe(&e)))
            }
        }
    }

    /// Queue hourly files whose hour has closed (and the current one when asked) unless a
    /// complete upload of that hour is already queued or done.
    fn queue_hourly(&self, include_current: bool) -> Result<usize, ShipError> {
        let Some(h) = &self.cfg.hourly else { return Ok(0) };
        let logs = self.cfg.output_dir.join("logs");
        let Ok(rd) = std::fs::read_dir(&logs) else {
            return Ok(0);
        };
        let current = hour_start(self.clock.now());
        let mut names: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut queued = 0;
        for name in names {
            let Some(parsed) = parse_file_name(&name) else {
                continue;
            };
            let closed = parsed.hour < current;
            if !closed && !include_current {
                continue;
            }
            let plain = file_name(parsed.hour);
            // Both `x` and `x.gz` may be listed (a crash mid-compression); handle the hour once.
            if parsed.gz && logs.join(&plain).is_file() {
                continue;
            }
            let key = h.log_uri.key(&format!("{}/{plain}.gz", h.runner_name));
            let complete_exists: bool = self
                .db()
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM uploads WHERE bucket=?1 AND key=?2 AND partial=0 AND state!='lost')",
                    params![h.log_uri.bucket, key],
                    |r| r.get(0),
                )
                .map_err(|e| self.db_err(e))?;
            if complete_exists {
                continue;
            }
            // Always record the plain name: if the file is gzipped locally before the upload, the
            // worker finds `<name>.gz`.
            let local = logs.join(&plain);
            let gzip = !parsed.gz;
            let local = if gzip { local } else { logs.join(&name) };
            self.insert(&local, &h.log_uri.bucket, &key, gzip, false, !closed)?;
            queued += 1;
        }
        Ok(queued)
    }

    fn classify(&self, path: &Path) -> FileClass {
        let p = path_str(path);
        let plain = p.strip_suffix(".gz").unwrap_or(&p).to_string();
        let states: Vec<String> = {
            let db = self.db();
            let Ok(mut st) =
                db.prepare_cached("SELECT state FROM uploads WHERE local_path=?1 OR local_path=?2")
            else {
                return FileClass::Pending;
            };
            let states: Vec<String> = match st.query_map(params![p, plain], |r| r.get::<_, String>(0)) {
                Ok(rows) => rows.flatten().collect(),
                Err(_) => return FileClass::Pending,
            };
            states
        };
        if states.iter().any(|s| s == "pending") {
            FileClass::Pending
        } else if states.iter().any(|s| s == "done") {
            FileClass::Uploaded
        } else {
            FileClass::LocalOnly
        }
    }

    fn enforce_budget(&self) -> budget::BudgetReport {
        let dir = &self.cfg.output_dir;
        let report = match self.cfg.disk_budget_bytes {
            Some(limit) => {
                let protected = [dir.join("logs").join(file_name(self.clock.now()))];
                budget::enforce(dir, limit, &protected, SystemTime::now(), |p| self.classify(p))
            }
            None => {
                let used = budget::disk_usage(dir);
                budget::BudgetReport {
                    used_before: used,
                    used_after: used,
                    removed: Vec::new(),
                }
            }
        };
        self.disk_used.store(report.used_after, Ordering::Relaxed);
        // Rows of files that are gone and uploaded are history: keep the table small.
        if !report.removed.is_empty() {
            let db = self.db();
            for (path, _, _) in &report.removed {
                let p = path_str(path);
                let plain = p.strip_suffix(".gz").unwrap_or(&p).to_string();
                let _ = db.execute(
                    "DELETE FROM uploads WHERE state='done' AND partial=1 AND (local_path=?1 OR local_path=?2)",
                    params![p, plain],
                );
            }
        }
        report
    }
}

/// The reason for an S3 failure, in the words an operator needs.
fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("unknown");
            if code == "unknown" {
                return format!("S3 answered {:?}: {}", se.raw(), DisplayErrorContext(err));
            }
            let msg = se.err().message().unwrap_or("");
            match code {
                "NoSuchBucket" => format!("the bucket does not exist (NoSuchBucket) {msg}"),
                "AccessDenied" | "Forbidden" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" => {
                    format!("access denied (403 {code}): check the credentials and the IAM policy allows s3:PutObject {msg}")
                }
                _ => format!("S3 error {code}: {msg}"),
            }
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => format!(
            "cannot reach S3 (connection or proxy failure; check the network and the proxy settings): {}",
            DisplayErrorContext(err)
        ),
        _ => format!("{}", DisplayErrorContext(err)),
    }
}

enum Wake {
    Cancelled,
    Ready,
}

async fn worker(inner: Arc<Inner>, cancel: CancellationToken) {
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let (row, wake_at) = match inner.next_due() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("upload queue {}: {e}; retrying in 10 s", inner.db_path.display());
                (None, Some(Instant::now() + Duration::from_secs(10)))
            }
        };
        let Some(row) = row else {
            let until = wake_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
            let woke = tokio::select! {
                _ = cancel.cancelled() => Wake::Cancelled,
                _ = inner.wake.notified() => Wake::Ready,
                _ = tokio::time::sleep_until(until) => Wake::Ready,
            };
            if let Wake::Cancelled = woke {
                return;
            }
            continue;
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = inner.upload(&row) => r,
        };
        match result {
            Ok(()) => {
                match inner.mark_done(&row) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => {
                        // Uploaded but not recorded: it will be uploaded again (same key), never lost.
                        tracing::error!("upload queue {}: {e}", inner.db_path.display());
                        continue;
                    }
                }
                let _ = std::fs::remove_file(inner.spool_path(row.id));
                if row.delete_after {
                    match std::fs::remove_file(&row.local_path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!("uploaded {} but cannot delete it: {e}", row.local_path.display())
                        }
                    }
                }
                tracing::debug!(
                    "uploaded {} to s3://{}/{}",
                    row.local_path.display(),
                    row.bucket,
                    row.key
                );
                inner.on_success(&row.bucket);
            }
            Err(UploadError::SourceMissing) => {
                tracing::error!(
                    "cannot upload {} to s3://{}/{}: the local file is gone (removed outside taskrunner, or by \
                     the disk budget); dropping it from the queue",
                    row.local_path.display(),
                    row.bucket,
                    row.key
                );
                if let Err(e) = inner.mark_lost(&row) {
                    tracing::error!("upload queue {}: {e}", inner.db_path.display());
                }
            }
            Err(UploadError::Retry(reason)) => {
                if let Err(e) = inner.mark_failed(&row, &reason) {
                    tracing::error!("upload queue {}: {e}", inner.db_path.display());
                }
                inner.on_failure(&row, &reason);
            }
        }
    }
}

async fn maintenance(inner: Arc<Inner>, cancel: CancellationToken) {
    loop {
        match inner.queue_hourly(false) {
            Ok(n) if n > 0 => inner.wake.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::error!("cannot queue hourly log files for upload: {e}"),
        }
        let i = inner.clone();
        let _ = tokio::task::spawn_blocking(move || i.enforce_budget()).await;
        inner.maintenance_passes.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(inner.cfg.maintenance_interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_segments_are_refused() {
        assert!(check_segment("attempt", "@A_2014-05-01T00:00:00_Attempt=1").is_ok());
        for bad in ["", "..", ".", "a/b", "a\\b", "a\nb"] {
            let err = check_segment("component", bad).unwrap_err().to_string();
            assert!(err.starts_with("component "), "{err}");
        }
    }
}
