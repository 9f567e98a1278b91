//! Helpers shared by the service/ctl integration tests: throw-away system users, and re-running
//! the test binary itself as a child process (the way these tests get a real second process).
#![allow(dead_code)]

use std::process::{Command, Output};
use std::time::Duration;

/// A system user (with its own group) created for one test and deleted on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    /// Creates the user with `useradd`. Needs root; parallel tests may hold the passwd lock,
    /// so the call is retried for a while.
    pub fn create() -> TestUser {
        let name = format!("trt{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut last = String::new();
        for _ in 0..60 {
            let out = Command::new("useradd")
                .args([
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(&name)
                .output()
                .expect("useradd runs");
            if out.status.success() {
                let u = nix::unistd::User::from_name(&name)
                    .unwrap()
                    .expect("user exists after useradd");
                return TestUser {
                    name,
                    uid: u.uid.as_raw(),
                    gid: u.gid.as_raw(),
                };
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("useradd {name} failed: {last}");
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        for _ in 0..60 {
            let ok = Command::new("userdel")
                .arg(&self.name)
                .output()
                .map(|o| o.status.success());
            if ok.unwrap_or(false) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        // With USERGROUPS_ENAB userdel removed the group already; otherwise remove it here.
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs the test function `entry` of this same test binary in a child process with `envs`.
/// The entry checks its env var and does nothing when run as an ordinary test.
pub fn run_self(entry: &str, envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", entry, "--nocapture", "--test-threads=1"]);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("the test binary re-runs itself")
}

/// The lines a child printed with `prefix`, prefix removed.
pub fn tagged(out: &Output, prefix: &str) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(prefix).map(str::to_string))
        .collect()
}
