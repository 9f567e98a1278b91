//! Talking to the service manager: sd_notify (`READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`,
//! `RELOADING=1`, `EXTEND_TIMEOUT_USEC=`), and the one-line `STATUS=` text rendered from a
//! [`StatusSnapshot`].
//!
//! Everything here is a silent no-op without `NOTIFY_SOCKET` (launchd, a terminal, tests): a
//! service manager is told what we do, never required. Under launchd readiness is the control
//! socket answering.
//!
//! When to send what (issue 5), for the daemon that owns the loop:
//! - [`Notifier::ready`] once settings and credentials are loaded, the directories exist and the
//!   control socket is bound. It does NOT wait for the first successful API call: a network outage
//!   at boot would otherwise time the start out and become a restart loop; the outage shows in
//!   `STATUS=` (`backing off ...`) instead.
//! - [`Notifier::status`] with [`status_line`] on every state change.
//! - [`Notifier::watchdog`] every [`Notifier::watchdog_interval`], from the loop itself (not from a
//!   timer task of its own), so that a stuck loop stops feeding it.
//! - [`Notifier::stopping`] when a drain starts, [`Notifier::extend_timeout`] while it makes
//!   progress, [`Notifier::reloading`] on SIGHUP followed by [`Notifier::ready`] when done.
//!
//! The datagram format is sd_notify(3)'s; the lines are rendered by the `sd-notify` crate. The
//! socket path is read once, when the [`Notifier`] is made, so tests can aim one at their own
//! socket and the daemon can clear `NOTIFY_SOCKET` from the environment its tasks inherit.

use std::ffi::OsString;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::status::StatusSnapshot;

/// Sends sd_notify messages to one socket, or nowhere.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    socket: Option<OsString>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, as systemd sets them.
    pub fn from_env() -> Notifier {
        Notifier {
            socket: std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty()),
            // sd-notify applies the WATCHDOG_PID rule: only if unset or ours.
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    /// Sends to `socket` (a path, or `@name` for the Linux abstract namespace), with the
    /// watchdog period `watchdog` (the full `WATCHDOG_USEC`, not the half).
    pub fn with_socket(socket: impl Into<OsString>, watchdog: Option<Duration>) -> Notifier {
        Notifier {
            socket: Some(socket.into()),
            watchdog,
        }
    }

    /// Sends nothing, ever.
    pub fn disabled() -> Notifier {
        Notifier::default()
    }

    /// Whether a service manager listens.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// `READY=1` (also after a reload).
    pub fn ready(&self) -> io::Result<()> {
        self.send(&[NotifyState::Ready])
    }

    /// `STATUS=<text>`; the text is made one line (systemd shows only one).
    pub fn status(&self, text: &str) -> io::Result<()> {
        let line = one_line(text);
        self.send(&[NotifyState::Status(&line)])
    }

    /// `STOPPING=1`: the drain started.
    pub fn stopping(&self) -> io::Result<()> {
        self.send(&[NotifyState::Stopping])
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (what `Type=notify-reload` requires); send
    /// [`Notifier::ready`] when the reload is done.
    pub fn reloading(&self) -> io::Result<()> {
        if !self.is_enabled() {
            return Ok(());
        }
        let now = NotifyState::monotonic_usec_now()?;
        self.send(&[NotifyState::Reloading, now])
    }

    /// `EXTEND_TIMEOUT_USEC=`: asks for `by` more before the start/stop timeout fires. Send it
    /// while a drain makes progress, with some margin over the period it is sent at.
    pub fn extend_timeout(&self, by: Duration) -> io::Result<()> {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)])
    }

    /// `WATCHDOG=1`, when the watchdog is on.
    pub fn watchdog(&self) -> io::Result<()> {
        if self.watchdog.is_none() {
            return Ok(());
        }
        self.send(&[NotifyState::Watchdog])
    }

    /// How often to call [`Notifier::watchdog`]: half of `WATCHDOG_USEC` (sd_watchdog_enabled(3)
    /// recommends that margin), or `None` when the watchdog is off or meant for another pid.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2).filter(|d| !d.is_zero())
    }

    fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        let Some(path) = &self.socket else {
            return Ok(());
        };
        let mut msg = String::new();
        for s in states {
            msg.push_str(&s.to_string());
            msg.push('\n');
        }
        let sock = UnixDatagram::unbound()?;
        connect(&sock, path)?;
        let sent = sock.send(msg.as_bytes())?;
        if sent != msg.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short sd_notify datagram",
            ));
        }
        Ok(())
    }
}

fn connect(sock: &UnixDatagram, path: &OsString) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            return sock.connect_addr(&addr);
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract NOTIFY_SOCKET needs Linux",
            ));
        }
    }
    sock.connect(std::path::Path::new(path))
}

fn one_line(text: &str) -> String {
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Renders a snapshot as the one-line `STATUS=` text `systemctl status` shows, at `now` (Unix
/// seconds):
/// - `polling wg-12345: 1/2 running, last poll 3s ago`
/// - `backing off 40s: endpoint unreachable`
/// - `draining: 2 tasks, oldest 14m`
/// - `paused (taskrunner-ctl drain): 1 task running`
pub fn status_line(s: &StatusSnapshot, now: i64) -> String {
    let running = s.running.len();
    let ago = |t: Option<i64>| match t {
        Some(t) => format!("{} ago", human_secs(now - t)),
        None => "none yet".to_string(),
    };
    let oldest = s.running.iter().map(|t| t.started_at).min();
    let tasks = |n: usize| {
        if n == 1 {
            "1 task".to_string()
        } else {
            format!("{n} tasks")
        }
    };
    let line = match s.state.as_str() {
        "polling" => format!(
            "polling {}: {running}/{} running, last poll {}",
            s.worker_group,
            s.slots,
            ago(s.last_poll_ok)
        ),
        "backing-off" => {
            let mut l = match &s.backoff {
                Some(b) => format!("backing off {}: {}", human_secs(b.next_try_at - now), b.reason),
                None => "backing off".to_string(),
            };
            if running > 0 {
                l.push_str(&format!(" ({running}/{} running)", s.slots));
            }
            l
        }
        "draining" => match oldest {
            Some(t) => format!("draining: {}, oldest {}", tasks(running), human_secs(now - t)),
            None => "draining: no tasks left".to_string(),
        },
        "paused" => format!("paused (taskrunner-ctl drain): {} running", tasks(running)),
        "" => "starting".to_string(),
        other => other.to_string(),
    };
    one_line(&line)
}

/// `3s`, `14m`, `2h05m`, `3d04h`: short, for one-line status texts. Negative counts as 0.
pub fn human_secs(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Backoff, RunningTask};

    fn snap(state: &str) -> StatusSnapshot {
        StatusSnapshot {
            state: state.into(),
            worker_group: "wg-12345".into(),
            slots: 2,
            ..Default::default()
        }
    }

    fn task(started_at: i64) -> RunningTask {
        RunningTask {
            task_id: "t".into(),
            started_at,
            ..Default::default()
        }
    }

    #[test]
    fn the_issue_examples() {
        let now = 1_000_000;
        let mut s = snap("polling");
        s.running.push(task(now - 5));
        s.last_poll_ok = Some(now - 3);
        assert_eq!(
            status_line(&s, now),
            "polling wg-12345: 1/2 running, last poll 3s ago"
        );

        let mut s = snap("backing-off");
        s.backoff = Some(Backoff {
            reason: "endpoint unreachable".into(),
            next_try_at: now + 40,
            attempt: 3,
        });
        assert_eq!(status_line(&s, now), "backing off 40s: endpoint unreachable");
        s.running.push(task(now));
        assert_eq!(
            status_line(&s, now),
            "backing off 40s: endpoint unreachable (1/2 running)"
        );

        let mut s = snap("draining");
        s.running = vec![task(now - 14 * 60 - 5), task(now - 30)];
        assert_eq!(status_line(&s, now), "draining: 2 tasks, oldest 14m");
        s.running.clear();
        assert_eq!(status_line(&s, now), "draining: no tasks left");
    }

    #[test]
    fn other_states_and_odd_input() {
        let now = 100;
        let s = snap("polling");
        assert_eq!(
            status_line(&s, now),
            "polling wg-12345: 0/2 running, last poll none yet"
        );
        assert_eq!(status_line(&snap(""), now), "starting");
        assert_eq!(status_line(&snap("stopping"), now), "stopping");
        let mut s = snap("paused");
        s.running.push(task(now));
        assert_eq!(
            status_line(&s, now),
            "paused (taskrunner-ctl drain): 1 task running"
        );
        // A multi-line reason stays on one line; a retry time in the past shows 0s.
        let mut s = snap("backing-off");
        s.backoff = Some(Backoff {
            reason: "HTTP 503\nService Unavailable".into(),
            next_try_at: now - 5,
            attempt: 1,
        });
        assert_eq!(
            status_line(&s, now),
            "backing off 0s: HTTP 503 / Service Unavailable"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_secs(-4), "0s");
        assert_eq!(human_secs(59), "59s");
        assert_eq!(human_secs(60), "1m");
        assert_eq!(human_secs(3600 + 5 * 60), "1h05m");
        assert_eq!(human_secs(2 * 86_400 + 3 * 3600), "2d03h");
    }

    fn recv_all(sock: &UnixDatagram) -> Vec<String> {
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn datagrams_on_an_explicit_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::with_socket(&path, Some(Duration::from_secs(10)));
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));
        n.ready().unwrap();
        n.status("polling wg-1: 0/2 running\nsecond line").unwrap();
        n.watchdog().unwrap();
        n.extend_timeout(Duration::from_secs(30)).unwrap();
        n.stopping().unwrap();
        n.reloading().unwrap();
        let got = recv_all(&sock);
        assert_eq!(got.len(), 6, "{got:?}");
        assert_eq!(got[0], "READY=1\n");
        assert_eq!(got[1], "STATUS=polling wg-1: 0/2 running / second line\n");
        assert_eq!(got[2], "WATCHDOG=1\n");
        assert_eq!(got[3], "EXTEND_TIMEOUT_USEC=30000000\n");
        assert_eq!(got[4], "STOPPING=1\n");
        let mut lines = got[5].lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let mono = lines.next().unwrap().strip_prefix("MONOTONIC_USEC=").unwrap();
        assert!(mono.parse::<u64>().unwrap() > 0);
    }

    #[test]
    fn no_watchdog_means_no_watchdog_datagram() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::with_socket(&path, None);
        assert_eq!(n.watchdog_interval(), None);
        n.watchdog().unwrap();
        n.ready().unwrap();
        assert_eq!(recv_all(&sock), vec!["READY=1\n".to_string()]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("taskrunner-test-{}", uuid::Uuid::new_v4());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::with_socket(format!("@{name}"), None).ready().unwrap();
        assert_eq!(recv_all(&sock), vec!["READY=1\n".to_string()]);
    }

    #[test]
    fn disabled_is_silent() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready().unwrap();
        n.status("x").unwrap();
        n.reloading().unwrap();
        n.watchdog().unwrap();
    }
}
