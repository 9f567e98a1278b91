//! The LaunchDaemon plist parses as a property list (Python's plistlib, the parser closest to
//! launchd's that runs here) and carries what issue 5 asks for.

use std::process::Command;

const PLIST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/launchd/com.taskrunner.taskrunner.plist"
);

#[test]
fn launch_daemon_plist_is_valid_and_complete() {
    let script = r#"
import json, plistlib, sys
with open(sys.argv[1], "rb") as f:
    p = plistlib.load(f)
print(json.dumps(p))
"#;
    let out = Command::new("python3")
        .args(["-c", script, PLIST])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "plistlib: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["Label"], "com.taskrunner.taskrunner");
    let args = p["ProgramArguments"]
        .as_array()
        .expect("ProgramArguments is an array");
    assert!(args[0].as_str().unwrap().ends_with("/taskrunner"), "{args:?}");
    // Restarted when it fails, not after a clean drain.
    assert_eq!(p["KeepAlive"]["SuccessfulExit"], false);
    assert_eq!(p["RunAtLoad"], true);
    // Either launchd switches user, or the daemon starts as root and drops privileges itself
    // (our choice): then no UserName, and the comment in the file says so.
    assert!(p.get("UserName").is_none());
    let text = std::fs::read_to_string(PLIST).unwrap();
    assert!(text.contains("drops to the configured `user`"));
    for key in ["StandardOutPath", "StandardErrorPath"] {
        assert!(
            p[key]
                .as_str()
                .unwrap()
                .starts_with("/usr/local/var/log/taskrunner/"),
            "{key}"
        );
    }
    // Longer than a drain: launchd SIGKILLs after ExitTimeOut.
    assert!(p["ExitTimeOut"].as_i64().unwrap() >= 600);
}
