//! The disk budget of the output directory (hourly logs and per-attempt logs).
//!
//! When the files under the directory add up to more than the budget, files are removed in this
//! order until it fits again:
//! 1. files already uploaded to S3, oldest first (INFO each);
//! 2. files that no upload was ever asked for (no `--logUri` / `pipelineLogUri`), oldest first
//!    (WARN each): they would never leave the host anyway;
//! 3. last resort: files waiting for upload, and files written in the last [`ACTIVE_GRACE`]
//!    (a running task's output), oldest first, each with an ERROR naming it.
//!
//! Protected paths (the hourly file being written) are never removed. Sizes are the allocated
//! size on disk (`st_blocks`), which is what fills a disk; empty attempt directories left behind
//! are removed too.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Files modified more recently than this may still be written to.
pub const ACTIVE_GRACE: Duration = Duration::from_secs(300);

/// The order of removal (lowest first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FileClass {
    Uploaded,
    LocalOnly,
    Pending,
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct BudgetReport {
    pub used_before: u64,
    pub used_after: u64,
    pub removed: Vec<(PathBuf, u64, FileClass)>,
}

struct Entry {
    path: PathBuf,
    size: u64,
    mtime: SystemTime,
    class: FileClass,
}

/// Bytes a file takes on disk.
pub fn file_size(meta: &fs::Metadata) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // A sparse or tiny file may take less or more than its length; count what it takes.
        meta.blocks() * 512
    }
    #[cfg(not(unix))]
    meta.len()
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, fs::Metadata)>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let path = e.path();
        // symlink_metadata: never follow a link out of the output directory.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk(&path, out);
        } else if meta.is_file() {
            out.push((path, meta));
        }
    }
}

/// Total bytes of the regular files under `dir`.
pub fn disk_usage(dir: &Path) -> u64 {
    let mut files = Vec::new();
    walk(dir, &mut files);
    files.iter().map(|(_, m)| file_size(m)).sum()
}

/// Bring `dir` under `budget` bytes (see the module doc). `classify` says whether a file is
/// uploaded, local-only or pending.
pub fn enforce(
    dir: &Path,
    budget: u64,
    protected: &[PathBuf],
    now: SystemTime,
    mut classify: impl FnMut(&Path) -> FileClass,
) -> BudgetReport {
    let mut files = Vec::new();
    walk(dir, &mut files);
    let used: u64 = files.iter().map(|(_, m)| file_size(m)).sum();
    let mut report = BudgetReport {
        used_before: used,
        used_after: used,
        removed: Vec::new(),
    };
    if used <= budget {
        return report;
    }
    let mut entries: Vec<Entry> = files
        .into_iter()
        .filter(|(p, _)| !protected.iter().any(|q| q == p))
        .map(|(path, meta)| {
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            let mut class = classify(&path);
            let recent = now
                .duration_since(mtime)
                .map(|age| age < ACTIVE_GRACE)
                .unwrap_or(true);
            if class == FileClass::LocalOnly && recent {
                class = FileClass::Pending;
            }
            Entry {
                size: file_size(&meta),
                path,
                mtime,
                class,
            }
        })
        .collect();
    entries.sort_by(|a, b| (a.class, a.mtime, &a.path).cmp(&(b.class, b.mtime, &b.path)));
    let mut used = used;
    for e in entries {
        if used <= budget {
            break;
        }
        match fs::remove_file(&e.path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::error!("disk budget: cannot remove {}: {err}", e.path.display());
                continue;
            }
        }
        used = used.saturating_sub(e.size);
        match e.class {
            FileClass::Uploaded => tracing::info!(
                "disk budget: removed {} ({} bytes, already in S3)",
                e.path.display(),
                e.size
            ),
            FileClass::LocalOnly => tracing::warn!(
                "disk budget: removed {} ({} bytes; no upload was configured for it)",
                e.path.display(),
                e.size
            ),
            FileClass::Pending => tracing::error!(
                "disk budget ({budget} bytes) exceeded with nothing else left to remove: deleted {} ({} bytes) \
                 BEFORE it was uploaded; it is lost",
                e.path.display(),
                e.size
            ),
        }
        remove_empty_parents(&e.path, dir);
        report.removed.push((e.path, e.size, e.class));
    }
    report.used_after = used;
    report
}

/// Remove the now-empty directories between `file` and `root` (attempt directories), keeping
/// `root` and its direct children (`logs/`, `tasks/`).
fn remove_empty_parents(file: &Path, root: &Path) {
    let mut dir = file.parent();
    while let Some(d) = dir {
        if d == root || d.parent() == Some(root) || !d.starts_with(root) {
            break;
        }
        if fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, len: usize, age: Duration) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, vec![b'x'; len]).unwrap();
        let f = fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn uploaded_go_first_then_local_only_then_pending() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let hour = Duration::from_secs(3600);
        let up_old = d.join("logs/up-old");
        let up_new = d.join("logs/up-new");
        let local = d.join("tasks/p/c/i/a/stdout");
        let pending = d.join("logs/pending");
        let current = d.join("logs/current");
        write(&up_old, 40_960, hour * 5);
        write(&up_new, 40_960, hour * 4);
        write(&local, 40_960, hour * 6);
        write(&pending, 40_960, hour * 7);
        write(&current, 40_960, Duration::ZERO);
        let classify = |p: &Path| {
            if p == up_old || p == up_new {
                FileClass::Uploaded
            } else if p == pending {
                FileClass::Pending
            } else {
                FileClass::LocalOnly
            }
        };
        let used = disk_usage(d);
        assert!(used >= 5 * 40_960);
        // Room for three files: only the two uploaded ones go.
        let r = enforce(
            d,
            used - 2 * 40_960,
            &[current.clone()],
            SystemTime::now(),
            classify,
        );
        let removed: Vec<_> = r.removed.iter().map(|(p, _, _)| p.clone()).collect();
        assert_eq!(removed, [up_old.clone(), up_new.clone()]);
        assert!(local.exists() && pending.exists() && current.exists());
        // Room for one: the local-only one, then the pending one, never the protected one.
        let r = enforce(d, 40_960, &[current.clone()], SystemTime::now(), classify);
        let removed: Vec<_> = r.removed.iter().map(|(p, _, c)| (p.clone(), *c)).collect();
        assert_eq!(
            removed,
            [
                (local.clone(), FileClass::LocalOnly),
                (pending.clone(), FileClass::Pending)
            ]
        );
        assert!(current.exists());
        assert!(r.used_after <= 40_960);
        // The emptied attempt directory went too; tasks/ stays.
        assert!(!d.join("tasks/p").exists());
        assert!(d.join("tasks").exists());
    }
}
