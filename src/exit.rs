//! Exit codes of the binaries. Documented in the README ("Exit codes") and in the man pages.

/// Normal exit: drained after SIGTERM, `terminate: true`, or an exit-after condition was met.
pub const OK: i32 = 0;
/// Something failed at run time that a restart may fix (the unit restarts on it).
pub const FAILURE: i32 = 1;
/// Command line usage error (clap's own code).
pub const USAGE: i32 = 2;
/// `taskrunner-ctl`: no daemon answers on the control socket (as `systemctl status` uses 3).
pub const NOT_RUNNING: i32 = 3;
/// EX_CONFIG from sysexits.h: the configuration or credentials are wrong. The unit sets
/// `RestartPreventExitStatus=78` so that a bad config does not become a restart loop.
pub const CONFIG: i32 = 78;

/// Makes any panic, in any thread or task, end the process (after the default hook printed it), as
/// `panic = "abort"` would. An async daemon whose poller or worker task panicked must not keep running as a
/// ghost: systemd restarts it instead (`Restart=on-failure`). Called first thing by each binary's `main`.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        std::process::abort();
    }));
}
