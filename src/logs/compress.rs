//! gzip of hourly files older than eight hours, done so that a crash at any point leaves either
//! the original or a complete `.gz`, never a partial file under a final name: write
//! `<name>.gz.tmp`, fsync it, rename to `<name>.gz`, fsync the directory, then delete the original.
//!
//! "Older than eight hours" is measured from the end of the hour the file covers (when it was
//! last written), not from its mtime, so the rule is the same after a copy or a restore.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flate2::write::GzEncoder;
use flate2::Compression;

use super::hourly::parse_file_name;

/// The guide: "files older than eight hours are compressed".
pub const COMPRESS_AFTER: Duration = Duration::from_secs(8 * 3600);

/// `a/b` + `.gz` -> `a/b.gz`.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Compress `src` into `dst` atomically (`dst.tmp`, fsync, rename, fsync dir). `src` is left as
/// it is. On any error nothing is left at `dst` or `dst.tmp`.
pub fn gzip_file(src: &Path, dst: &Path) -> io::Result<()> {
    gzip_file_inner(src, dst, None)
}

fn gzip_file_inner(src: &Path, dst: &Path, fail_after: Option<u64>) -> io::Result<()> {
    let tmp = with_suffix(dst, ".tmp");
    let result = (|| {
        let input = File::open(src)?;
        let out = File::create(&tmp)?;
        let mut enc = GzEncoder::new(BufWriter::with_capacity(256 * 1024, out), Compression::default());
        let mut reader = BufReader::with_capacity(256 * 1024, input);
        match fail_after {
            None => {
                io::copy(&mut reader, &mut enc)?;
            }
            Some(n) => {
                // Test hook: a read error part-way through.
                io::copy(&mut (&mut reader).take(n), &mut enc)?;
                return Err(io::Error::other("injected failure"));
            }
        }
        let out = enc.finish()?.into_inner().map_err(|e| e.into_error())?;
        out.sync_all()?;
        drop(out);
        fs::rename(&tmp, dst)?;
        sync_dir(dst)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `x` -> `x.gz`, then delete `x`. Returns the `.gz` path.
pub fn compress_in_place(src: &Path) -> io::Result<PathBuf> {
    let dst = with_suffix(src, ".gz");
    gzip_file(src, &dst)?;
    fs::remove_file(src)?;
    Ok(dst)
}

/// fsync the directory holding `path`, so a rename in it survives a power loss.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)?.sync_all()?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// One file the pass handled.
#[derive(Debug)]
pub enum Compressed {
    Done(PathBuf),
    Failed(PathBuf, io::Error),
}

/// Compress every hourly file in `dir` whose hour ended more than [`COMPRESS_AFTER`] before
/// `now`; finish what a crash interrupted (an original next to a complete `.gz` is deleted; a
/// leftover `.gz.tmp` is removed and redone).
pub fn compress_due(dir: &Path, now: DateTime<Utc>) -> Vec<Compressed> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in &names {
        let path = dir.join(name);
        if let Some(orig) = name.strip_suffix(".gz.tmp") {
            // Only this pass writes `.gz.tmp` in the logs directory, and passes do not overlap.
            if parse_file_name(orig).is_some() {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        let Some(parsed) = parse_file_name(name) else {
            continue;
        };
        if parsed.gz {
            continue;
        }
        let hour_end = parsed.hour + chrono::Duration::hours(1);
        let due = now
            .signed_duration_since(hour_end)
            .to_std()
            .is_ok_and(|age| age > COMPRESS_AFTER);
        if !due {
            continue;
        }
        let gz = with_suffix(&path, ".gz");
        if gz.exists() {
            // A crash between the rename and the delete: the .gz is complete (renamed after fsync).
            match fs::remove_file(&path) {
                Ok(()) => out.push(Compressed::Done(gz)),
                Err(e) => out.push(Compressed::Failed(path, e)),
            }
            continue;
        }
        match compress_in_place(&path) {
            Ok(gz) => out.push(Compressed::Done(gz)),
            // Deleted under us (disk budget): nothing to do.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => out.push(Compressed::Failed(path, e)),
        }
    }
    out
}

/// Decompress a `.gz` file fully (tests and checks).
pub fn gunzip_to_vec(path: &Path) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(File::open(path)?).read_to_end(&mut out)?;
    Ok(out)
}

/// Write `bytes` to `path` (tests).
#[doc(hidden)]
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::clock::{Clock, ManualClock};

    fn ls(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn only_files_older_than_eight_hours_are_gzipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for h in ["2026-11-30-01", "2026-11-30-02", "2026-11-30-03"] {
            write_file(
                &d.join(format!("TaskRunner.log.{h}")),
                format!("line of {h}\n").as_bytes(),
            )
            .unwrap();
        }
        write_file(&d.join("unrelated.txt"), b"x").unwrap();
        // Hour 02 ends at 03:00; eight hours later is 11:00. Just before: nothing for 02.
        let clock = ManualClock::at(2026, 11, 30, 10, 59, 59);
        let done = compress_due(d, clock.now());
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(
            ls(d),
            [
                "TaskRunner.log.2026-11-30-01.gz",
                "TaskRunner.log.2026-11-30-02",
                "TaskRunner.log.2026-11-30-03",
                "unrelated.txt"
            ]
        );
        clock.advance(Duration::from_secs(2));
        compress_due(d, clock.now());
        assert_eq!(
            ls(d),
            [
                "TaskRunner.log.2026-11-30-01.gz",
                "TaskRunner.log.2026-11-30-02.gz",
                "TaskRunner.log.2026-11-30-03",
                "unrelated.txt"
            ]
        );
        assert_eq!(
            gunzip_to_vec(&d.join("TaskRunner.log.2026-11-30-02.gz")).unwrap(),
            b"line of 2026-11-30-02\n"
        );
    }

    #[test]
    fn a_failure_part_way_leaves_the_original_and_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("TaskRunner.log.2026-11-30-01");
        let body: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        write_file(&src, &body).unwrap();
        let dst = with_suffix(&src, ".gz");
        let err = gzip_file_inner(&src, &dst, Some(100_000)).unwrap_err();
        assert_eq!(err.to_string(), "injected failure");
        assert_eq!(ls(dir.path()), ["TaskRunner.log.2026-11-30-01"]);
        assert_eq!(fs::read(&src).unwrap(), body);
        // And a real pass afterwards completes.
        compress_in_place(&src).unwrap();
        assert_eq!(ls(dir.path()), ["TaskRunner.log.2026-11-30-01.gz"]);
        assert_eq!(gunzip_to_vec(&dst).unwrap(), body);
    }

    #[test]
    fn leftovers_of_a_crash_are_finished() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Crash while writing: a partial tmp next to the original.
        write_file(&d.join("TaskRunner.log.2026-11-30-01"), b"one\n").unwrap();
        write_file(&d.join("TaskRunner.log.2026-11-30-01.gz.tmp"), b"\x1f\x8bpartial").unwrap();
        // Crash after the rename, before the delete.
        write_file(&d.join("TaskRunner.log.2026-11-30-02"), b"two\n").unwrap();
        gzip_file(
            &d.join("TaskRunner.log.2026-11-30-02"),
            &d.join("TaskRunner.log.2026-11-30-02.gz"),
        )
        .unwrap();
        let clock = ManualClock::at(2026, 11, 30, 23, 0, 0);
        compress_due(d, clock.now());
        assert_eq!(
            ls(d),
            [
                "TaskRunner.log.2026-11-30-01.gz",
                "TaskRunner.log.2026-11-30-02.gz"
            ]
        );
        assert_eq!(
            gunzip_to_vec(&d.join("TaskRunner.log.2026-11-30-01.gz")).unwrap(),
            b"one\n"
        );
        assert_eq!(
            gunzip_to_vec(&d.join("TaskRunner.log.2026-11-30-02.gz")).unwrap(),
            b"two\n"
        );
    }
}
