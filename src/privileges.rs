//! Privileges: who the daemon and its tasks run as.
//!
//! Owns the drop from root (initgroups/setgid/setuid, then a check that it stuck), the creation
//! and ownership of the directories the daemon needs while it is still root, and the decision of
//! which identity a task runs as ([`task_identity`]: never root unless `allow-root = true`).
//!
//! Order in the daemon (issue 5): read settings and credentials, [`prepare_dirs`], bind the
//! control socket, then [`drop_to`]. Under systemd the unit may instead start as the service
//! user (credentials through `LoadCredential=`); then [`is_root`] is false and nothing here
//! changes identity.
//!
//! Linux and macOS differ in small ways (supplementary groups, saved ids): those bits are behind
//! `cfg(target_os = "linux")` with a portable path through `libc` for macOS.

use std::ffi::CString;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, Uid, User};

use crate::config::Settings;

/// The user (and group) the daemon drops to when none is configured.
pub const DEFAULT_USER: &str = "taskrunner";

/// The WARN logged when tasks are allowed to run as root.
pub const ROOT_TASKS_WARNING: &str =
    "tasks will run as root because allow-root = true: any pipeline in this worker group can run commands as root on this host";

/// Why a privilege change or check failed. Every message names the user, group, path or call.
#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    #[error("user {0:?} does not exist on this host (create it, or set `user` in the config)")]
    UnknownUser(String),
    #[error("group {0:?} does not exist on this host (create it, or set `group` in the config)")]
    UnknownGroup(String),
    #[error("looking up {what}: {source}")]
    Lookup {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("{call} failed while dropping privileges to {user}: {source}")]
    Syscall {
        call: &'static str,
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error("privilege drop to {user} did not stick: {detail}")]
    NotDropped { user: String, detail: String },
    #[error("cannot switch to user {user:?}: not running as root (running as uid {uid})")]
    NotRoot { user: String, uid: u32 },
    #[error(
        "refusing to run tasks as root: set `user` to an unprivileged account (default {DEFAULT_USER:?}), \
         or set `allow-root = true` if you really mean it{detail}"
    )]
    RootRefused { detail: String },
    #[error("{path}: {action}: {source}")]
    Dir {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a symbolic link; refusing to create or chown through it")]
    Symlink { path: PathBuf },
}

/// True when the effective user is root.
pub fn is_root() -> bool {
    Uid::effective().is_root()
}

/// Resolves a user name (or a numeric uid) to its passwd entry.
pub fn lookup_user(name: &str) -> Result<User, PrivError> {
    let found = match name.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(name),
    };
    found
        .map_err(|source| PrivError::Lookup {
            what: format!("user {name:?}"),
            source,
        })?
        .ok_or_else(|| PrivError::UnknownUser(name.to_string()))
}

/// Resolves a group name (or a numeric gid).
pub fn lookup_group(name: &str) -> Result<Group, PrivError> {
    let found = match name.parse::<u32>() {
        Ok(gid) => Group::from_gid(Gid::from_raw(gid)),
        Err(_) => Group::from_name(name),
    };
    found
        .map_err(|source| PrivError::Lookup {
            what: format!("group {name:?}"),
            source,
        })?
        .ok_or_else(|| PrivError::UnknownGroup(name.to_string()))
}

/// The uid, primary gid and supplementary groups `user` (with `group` overriding its primary
/// group) would run with.
pub fn resolve(user: &str, group: Option<&str>) -> Result<(User, Gid, Vec<Gid>), PrivError> {
    let u = lookup_user(user)?;
    let gid = match group {
        Some(g) => lookup_group(g)?.gid,
        None => u.gid,
    };
    let groups = supplementary_groups(&u, gid)?;
    Ok((u, gid, groups))
}

#[cfg(target_os = "linux")]
fn supplementary_groups(user: &User, gid: Gid) -> Result<Vec<Gid>, PrivError> {
    let name = cstring(&user.name)?;
    let mut groups = nix::unistd::getgrouplist(&name, gid).map_err(|source| PrivError::Lookup {
        what: format!("groups of user {:?}", user.name),
        source,
    })?;
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(groups)
}

#[cfg(not(target_os = "linux"))]
fn supplementary_groups(_user: &User, gid: Gid) -> Result<Vec<Gid>, PrivError> {
    // macOS: the kernel's group list is filled by initgroups(3) in `drop_to`; for tasks the
    // primary group is enough (std's `Command::gid`).
    Ok(vec![gid])
}

fn cstring(s: &str) -> Result<CString, PrivError> {
    CString::new(s).map_err(|_| PrivError::UnknownUser(s.to_string()))
}

/// Drops the whole process to `user` and `group` (default: the user's primary group):
/// initgroups, setgid, setuid, then verifies that the drop stuck (real, effective and saved ids
/// match, and `setuid(0)` fails).
///
/// Call it once, early, before worker threads hold anything root-only, after the credentials
/// were read, the directories prepared ([`prepare_dirs`]) and the control socket bound. When the
/// process already runs as `user` it only verifies; when it runs as another non-root user it
/// fails with [`PrivError::NotRoot`].
pub fn drop_to(user: &str, group: Option<&str>) -> Result<(), PrivError> {
    let (u, gid, _) = resolve(user, group)?;
    if !is_root() {
        let me = Uid::current();
        if me == u.uid && Uid::effective() == u.uid {
            return verify_dropped(&u, None);
        }
        return Err(PrivError::NotRoot {
            user: user.to_string(),
            uid: me.as_raw(),
        });
    }
    if u.uid.is_root() {
        // Nothing to drop to. The caller decides whether root is allowed (`allow-root`).
        return Ok(());
    }
    let sys = |call: &'static str| {
        let user = u.name.clone();
        move |source| PrivError::Syscall { call, user, source }
    };
    init_groups(&u.name, gid).map_err(sys("initgroups"))?;
    // Group first: once the uid is gone, the process may no longer change its group.
    nix::unistd::setgid(gid).map_err(sys("setgid"))?;
    nix::unistd::setuid(u.uid).map_err(sys("setuid"))?;
    verify_dropped(&u, Some(gid))
}

#[cfg(not(target_vendor = "apple"))]
fn init_groups(user: &str, gid: Gid) -> nix::Result<()> {
    let name = CString::new(user).map_err(|_| nix::Error::EINVAL)?;
    nix::unistd::initgroups(&name, gid)
}

#[cfg(target_vendor = "apple")]
fn init_groups(user: &str, gid: Gid) -> nix::Result<()> {
    let name = CString::new(user).map_err(|_| nix::Error::EINVAL)?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let rc = unsafe { libc::initgroups(name.as_ptr(), gid.as_raw() as libc::c_int) };
    nix::Error::result(rc).map(drop)
}

fn verify_dropped(u: &User, gid: Option<Gid>) -> Result<(), PrivError> {
    let fail = |detail: String| PrivError::NotDropped {
        user: u.name.clone(),
        detail,
    };
    let (ruid, euid) = (Uid::current(), Uid::effective());
    if ruid != u.uid || euid != u.uid {
        return Err(fail(format!("uid {ruid}, euid {euid}, expected {}", u.uid)));
    }
    if let Some(gid) = gid {
        let (rgid, egid) = (Gid::current(), Gid::effective());
        if rgid != gid || egid != gid {
            return Err(fail(format!("gid {rgid}, egid {egid}, expected {gid}")));
        }
    }
    #[cfg(target_os = "linux")]
    {
        // setuid(2) as root sets all three ids; a saved uid of 0 would let the process get
        // root back with seteuid(0).
        let ids = nix::unistd::getresuid().map_err(|source| PrivError::Lookup {
            what: "own uids (getresuid)".into(),
            source,
        })?;
        if ids.saved != u.uid {
            return Err(fail(format!("saved uid is {}", ids.saved)));
        }
    }
    if !u.uid.is_root() {
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(fail("setuid(0) succeeded afterwards".into()));
        }
        if nix::unistd::seteuid(Uid::from_raw(0)).is_ok() {
            return Err(fail("seteuid(0) succeeded afterwards".into()));
        }
    }
    Ok(())
}

/// Creates each directory (and its parents) with its mode, and while root gives it to
/// `uid`/`gid`. Refuses symbolic links at the final component, so that a planted link cannot
/// make root chown a file elsewhere. Existing directories get their mode and owner fixed.
pub fn prepare_dirs(dirs: &[(&Path, u32)], uid: Uid, gid: Gid) -> Result<(), PrivError> {
    for &(path, mode) in dirs {
        let err = |action: &'static str| {
            move |source| PrivError::Dir {
                path: path.to_path_buf(),
                action,
                source,
            }
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(PrivError::Symlink {
                    path: path.to_path_buf(),
                })
            }
            Ok(m) if !m.is_dir() => {
                return Err(PrivError::Dir {
                    path: path.to_path_buf(),
                    action: "expected a directory",
                    source: io::Error::from(io::ErrorKind::AlreadyExists),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path).map_err(err("create"))?
            }
            Err(e) => return Err(err("inspect")(e)),
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err("chmod"))?;
        if is_root() {
            let m = std::fs::symlink_metadata(path).map_err(err("inspect"))?;
            if m.uid() != uid.as_raw() || m.gid() != gid.as_raw() {
                std::os::unix::fs::lchown(path, Some(uid.as_raw()), Some(gid.as_raw()))
                    .map_err(err("chown"))?;
            }
        }
    }
    Ok(())
}

/// The identity a task runs as: `(uid, gid, supplementary groups)`, or `None` for "as the
/// daemon itself".
///
/// - Not root: `None`. The daemon already runs as an unprivileged user (after [`drop_to`] or
///   because the unit started it so), and tasks inherit it.
/// - Root with `user` set to an unprivileged account: that account (and `group`).
/// - Root with no user, or a user that is uid 0: refused with [`PrivError::RootRefused`] unless
///   `allow_root`; then `None` and a WARN ([`ROOT_TASKS_WARNING`]). Call this once at start, so
///   the WARN appears at every start.
///
/// The supervisor applies the result in `pre_exec` with [`become_identity`].
pub fn task_identity(settings: &Settings) -> Result<Option<(Uid, Gid, Vec<Gid>)>, PrivError> {
    if !is_root() {
        return Ok(None);
    }
    let user = match settings.user.as_deref() {
        Some(u) => Some(resolve(u, settings.group.as_deref())?),
        None => None,
    };
    match user {
        Some((u, gid, groups)) if !u.uid.is_root() => Ok(Some((u.uid, gid, groups))),
        other => {
            if settings.allow_root {
                tracing::warn!("{ROOT_TASKS_WARNING}");
                return Ok(None);
            }
            let detail = match other {
                Some((u, _, _)) => format!(" (user {:?} is uid 0)", u.name),
                None => " (the daemon runs as root and no `user` is configured)".to_string(),
            };
            Err(PrivError::RootRefused { detail })
        }
    }
}

/// Switches the calling process to `uid`/`gid`/`groups`. Meant for `CommandExt::pre_exec` in
/// the child between fork and exec: it only makes async-signal-safe system calls
/// (setgroups, setgid, setuid) and allocates nothing.
pub fn become_identity(uid: Uid, gid: Gid, groups: &[Gid]) -> io::Result<()> {
    set_groups(groups)?;
    nix::unistd::setgid(gid).map_err(io::Error::from)?;
    nix::unistd::setuid(uid).map_err(io::Error::from)?;
    Ok(())
}

#[cfg(not(target_vendor = "apple"))]
fn set_groups(groups: &[Gid]) -> io::Result<()> {
    nix::unistd::setgroups(groups).map_err(io::Error::from)
}

#[cfg(target_vendor = "apple")]
fn set_groups(groups: &[Gid]) -> io::Result<()> {
    // Gid is repr(transparent) over gid_t. macOS caps the list at NGROUPS_MAX (16).
    let n = groups.len().min(16);
    // SAFETY: the pointer and length describe a live slice of gid_t-sized values.
    let rc = unsafe { libc::setgroups(n as libc::c_int, groups.as_ptr() as *const libc::gid_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_user_and_group_are_named() {
        let e = lookup_user("no-such-user-taskrunner-test").unwrap_err();
        assert!(e.to_string().contains("no-such-user-taskrunner-test"), "{e}");
        let e = lookup_group("no-such-group-taskrunner-test").unwrap_err();
        assert!(e.to_string().contains("no-such-group-taskrunner-test"), "{e}");
    }

    #[test]
    fn numeric_ids_resolve() {
        assert_eq!(lookup_user("0").unwrap().name, "root");
        assert!(lookup_group("0").unwrap().gid.is_root());
    }

    #[test]
    fn prepare_dirs_creates_with_mode_and_refuses_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a/b");
        let (uid, gid) = (Uid::effective(), Gid::effective());
        prepare_dirs(&[(&a, 0o750)], uid, gid).unwrap();
        let m = std::fs::metadata(&a).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o7777, 0o750);

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let e = prepare_dirs(&[(&link, 0o700)], uid, gid).unwrap_err();
        assert!(matches!(e, PrivError::Symlink { .. }), "{e}");
        // The target kept its mode.
        assert_eq!(
            std::fs::metadata(&a).unwrap().permissions().mode() & 0o7777,
            0o750
        );
    }
}
