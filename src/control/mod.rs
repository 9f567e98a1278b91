//! The control socket: the daemon's server side and the client `taskrunner-ctl` uses.
//!
//! One Unix stream socket per instance, `<runtime_dir>/control.sock` ([`SOCKET_NAME`]), mode 0660
//! with the service's group, in a directory made 0750. The protocol is versioned JSON, one request
//! line and one response line (a connection may send several requests in turn):
//!
//! ```text
//! -> {"v":1,"cmd":"status"}
//! <- {"v":1,"ok":true,"status":{...StatusSnapshot...}}
//! -> {"v":1,"cmd":"drain","wait":true}
//! <- {"v":1,"ok":true,"status":{...}}                       (after the running tasks ended)
//! -> {"v":1,"cmd":"resume"}
//! <- {"v":1,"ok":false,"kind":"forbidden","error":"..."}
//! ```
//!
//! Who may do what is decided from the peer's credentials (SO_PEERCRED on Linux, getpeereid on
//! macOS, both through tokio's `peer_cred`): `status` is for anyone who can connect (the file mode
//! decides that), `drain` and `resume` only for root or the service user.
//!
//! The server does not change the daemon's state itself: it sends a [`ControlCommand`] to the loop
//! and relays its answer, and it reads [`StatusSnapshot`]s from the loop's `watch` channel.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::status::StatusSnapshot;

pub mod ctl;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// File name of the socket inside the instance's runtime directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Mode of the socket: owner and the service group may connect.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of the directory the socket is in.
pub const DIR_MODE: u32 = 0o750;
/// Longest request line accepted; a request is a few dozen bytes.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long a connected client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the loop may take to answer a drain/resume before the client is told so.
const LOOP_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A request line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub cmd: Command,
}

/// What a client asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    Status,
    /// Stop taking tasks; with `wait`, answer only once no task runs any more.
    Drain {
        #[serde(default)]
        wait: bool,
    },
    /// Take tasks again.
    Resume,
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusSnapshot>,
    /// On failure: `forbidden`, `bad-request`, `unsupported-version`, `rejected`, `unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn ok(status: StatusSnapshot) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: true,
            status: Some(status),
            kind: None,
            error: None,
        }
    }
    fn err(kind: &str, error: impl Into<String>) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: false,
            status: None,
            kind: Some(kind.into()),
            error: Some(error.into()),
        }
    }
}

/// What the server asks of the daemon's loop. The loop answers on `reply`: `Ok(())` when done
/// (drain: no new task will be taken; the running ones go on), `Err(reason)` when it will not.
#[derive(Debug)]
pub enum ControlCommand {
    Drain {
        reply: oneshot::Sender<Result<(), String>>,
    },
    Resume {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: another taskrunner already answers on this control socket (is the instance running twice?)"
    )]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
}

/// A bound control socket, not serving yet. Bind while still root (so the file can be given to
/// the service group), then [`ControlListener::serve`] once the loop's channels exist.
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
}

/// Binds `path` (creating its directory 0750), makes it 0660 and, when `owner` is given (the
/// daemon runs as root), chowns socket and directory to that uid/gid. A stale socket left by a
/// crash is replaced; a live one is an error ([`BindError::InUse`]). Needs a tokio runtime.
pub fn bind(path: &Path, owner: Option<(u32, u32)>) -> Result<ControlListener, BindError> {
    let io = |action: &'static str| {
        move |source| BindError::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let dio = |action: &'static str| {
            move |source| BindError::Io {
                path: dir.to_path_buf(),
                action,
                source,
            }
        };
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(dio("create directory"))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)).map_err(dio("chmod"))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(dio("chown"))?;
            }
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(io("remove stale socket"))?;
        }
        Ok(_) => {
            return Err(BindError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect")(e)),
    }
    let listener = UnixListener::bind(path).map_err(io("bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io("chmod"))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io("chown"))?;
    }
    Ok(ControlListener {
        listener,
        path: path.to_path_buf(),
    })
}

impl ControlListener {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `cancel`, then removes the socket file. `owner_uid` is the service user:
    /// it and root may drain and resume.
    pub fn serve(
        self,
        status_rx: watch::Receiver<StatusSnapshot>,
        cmd_tx: mpsc::Sender<ControlCommand>,
        owner_uid: u32,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let ControlListener { listener, path } = self;
            let conns = tokio_util::task::TaskTracker::new();
            loop {
                let accepted = tokio::select! {
                    _ = cancel.cancelled() => break,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let ctx = Ctx {
                            status_rx: status_rx.clone(),
                            cmd_tx: cmd_tx.clone(),
                            owner_uid,
                            cancel: cancel.clone(),
                        };
                        conns.spawn(async move {
                            if let Err(e) = handle(stream, ctx).await {
                                tracing::debug!("control connection: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: do not spin.
                        tracing::warn!("control socket {}: accept: {e}", path.display());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            drop(listener);
            let _ = std::fs::remove_file(&path);
            conns.close();
            // Connections in a `drain --wait` see the cancel and answer; others end at EOF.
            let _ = tokio::time::timeout(Duration::from_secs(2), conns.wait()).await;
        })
    }
}

/// Binds and serves in one call; see [`bind`] and [`ControlListener::serve`].
pub fn serve(
    path: &Path,
    status_rx: watch::Receiver<StatusSnapshot>,
    cmd_tx: mpsc::Sender<ControlCommand>,
    owner_uid: u32,
    cancel: CancellationToken,
) -> Result<JoinHandle<()>, BindError> {
    Ok(bind(path, None)?.serve(status_rx, cmd_tx, owner_uid, cancel))
}

struct Ctx {
    status_rx: watch::Receiver<StatusSnapshot>,
    cmd_tx: mpsc::Sender<ControlCommand>,
    owner_uid: u32,
    cancel: CancellationToken,
}

async fn handle(stream: UnixStream, mut ctx: Ctx) -> std::io::Result<()> {
    let peer = stream.peer_cred()?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut rd).take(MAX_REQUEST_BYTES as u64);
        let n = tokio::select! {
            _ = ctx.cancel.cancelled() => return Ok(()),
            r = tokio::time::timeout(REQUEST_TIMEOUT, limited.read_line(&mut line)) => match r {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            },
        };
        if n == 0 {
            return Ok(());
        }
        let too_long = !line.ends_with('\n') && n >= MAX_REQUEST_BYTES;
        let resp = if too_long {
            Response::err(
                "bad-request",
                format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            )
        } else {
            answer(line.trim(), peer.uid(), &mut ctx).await
        };
        let mut out = serde_json::to_vec(&resp).expect("a Response always serializes");
        out.push(b'\n');
        wr.write_all(&out).await?;
        if too_long {
            // The rest of that line would be read as garbage requests.
            return Ok(());
        }
    }
}

async fn answer(line: &str, peer_uid: u32, ctx: &mut Ctx) -> Response {
    // Look at the version before the command, so a newer client gets a useful answer.
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Response::err("bad-request", format!("not a JSON request line: {e}")),
    };
    match value.get("v").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Response::err(
                "unsupported-version",
                format!(
                    "protocol version {v} is not supported; this daemon speaks version {PROTOCOL_VERSION}"
                ),
            )
        }
        None => return Response::err("bad-request", "missing protocol version \"v\""),
    }
    let req: Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => return Response::err("bad-request", format!("bad request: {e}")),
    };
    let name = match &req.cmd {
        Command::Status => return Response::ok(ctx.status_rx.borrow().clone()),
        Command::Drain { .. } => "drain",
        Command::Resume => "resume",
    };
    if peer_uid != 0 && peer_uid != ctx.owner_uid {
        tracing::warn!("control socket: refused {name} from uid {peer_uid}");
        return Response::err(
            "forbidden",
            format!(
                "{name} refused: you are {}; only root or the service user ({}) may {name}",
                user_label(peer_uid),
                user_label(ctx.owner_uid)
            ),
        );
    }
    tracing::info!("control socket: {name} requested by {}", user_label(peer_uid));
    let (reply, rx) = oneshot::channel();
    let cmd = match req.cmd {
        Command::Resume => ControlCommand::Resume { reply },
        _ => ControlCommand::Drain { reply },
    };
    if ctx.cmd_tx.send(cmd).await.is_err() {
        return Response::err("unavailable", "the daemon is shutting down");
    }
    match tokio::time::timeout(LOOP_REPLY_TIMEOUT, rx).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(why))) => return Response::err("rejected", why),
        Ok(Err(_)) => return Response::err("unavailable", "the daemon is shutting down"),
        Err(_) => {
            return Response::err(
                "unavailable",
                format!(
                    "the daemon did not answer the {name} within {}s",
                    LOOP_REPLY_TIMEOUT.as_secs()
                ),
            )
        }
    }
    if let Command::Drain { wait: true } = req.cmd {
        // Wait on the loop's own snapshots until nothing runs.
        let waited = tokio::select! {
            _ = ctx.cancel.cancelled() => Err("the daemon is shutting down"),
            r = ctx.status_rx.wait_for(|s| s.running.is_empty()) => r.map(drop).map_err(|_| "the daemon is shutting down"),
        };
        if let Err(why) = waited {
            return Response::err("unavailable", why);
        }
    }
    let snapshot = ctx.status_rx.borrow().clone();
    Response::ok(snapshot)
}

fn user_label(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("{} (uid {uid})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// Why a client call failed. [`ClientError::is_not_running`] is what `taskrunner-ctl` turns
/// into exit 3.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no taskrunner is running here: nothing answers on {path} ({source})")]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: permission denied: connecting needs root or membership in the socket's group")]
    PermissionDenied { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the daemon sent an answer this client does not understand: {detail}")]
    Protocol { path: PathBuf, detail: String },
    /// The daemon answered with `ok: false`.
    #[error("{message}")]
    Refused { kind: String, message: String },
}

impl ClientError {
    pub fn is_not_running(&self) -> bool {
        matches!(self, ClientError::NotRunning { .. })
    }
}

/// A blocking client for one daemon (`taskrunner-ctl` is a one-shot command; from async code use
/// `spawn_blocking`).
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<std::os::unix::net::UnixStream>,
}

/// How long a client waits for an answer (except `drain --wait`, which waits as long as tasks
/// run).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        use std::io::ErrorKind::*;
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => Ok(Client {
                path: path.to_path_buf(),
                reader: BufReader::new(s),
            }),
            // ENOENT, or a stale socket file nobody listens on.
            Err(e) if matches!(e.kind(), NotFound | ConnectionRefused) => Err(ClientError::NotRunning {
                path: path.to_path_buf(),
                source: e,
            }),
            Err(e) if e.kind() == PermissionDenied => Err(ClientError::PermissionDenied {
                path: path.to_path_buf(),
            }),
            Err(e) => Err(ClientError::Io {
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and reads its response; `Refused` when the daemon said `ok: false`.
    pub fn request(&mut self, cmd: Command) -> Result<StatusSnapshot, ClientError> {
        let waits = matches!(cmd, Command::Drain { wait: true });
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let stream = self.reader.get_mut();
        stream
            .set_read_timeout(if waits { None } else { Some(CLIENT_TIMEOUT) })
            .map_err(io)?;
        stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(io)?;
        let mut line = serde_json::to_vec(&Request {
            v: PROTOCOL_VERSION,
            cmd,
        })
        .expect("a Request always serializes");
        line.push(b'\n');
        stream.write_all(&line).map_err(io)?;
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ClientError::Protocol {
                path: self.path.clone(),
                detail: "connection closed without an answer".into(),
            });
        }
        let resp: Response = serde_json::from_str(&answer).map_err(|e| ClientError::Protocol {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        match (resp.ok, resp.status) {
            (true, Some(s)) => Ok(s),
            (true, None) => Err(ClientError::Protocol {
                path: self.path.clone(),
                detail: "ok without a status".into(),
            }),
            (false, _) => Err(ClientError::Refused {
                kind: resp.kind.unwrap_or_else(|| "error".into()),
                message: resp
                    .error
                    .unwrap_or_else(|| "the daemon refused without a reason".into()),
            }),
        }
    }

    pub fn status(&mut self) -> Result<StatusSnapshot, ClientError> {
        self.request(Command::Status)
    }

    pub fn drain(&mut self, wait: bool) -> Result<StatusSnapshot, ClientError> {
        self.request(Command::Drain { wait })
    }

    pub fn resume(&mut self) -> Result<StatusSnapshot, ClientError> {
        self.request(Command::Resume)
    }
}

/// Where instances put their runtime directories, as the daemon chooses them: as root
/// `/run/taskrunner/<instance>`, otherwise `$XDG_RUNTIME_DIR/taskrunner/<instance>` or
/// `/tmp/taskrunner-<uid>/<instance>`. First the one this user's daemon would use.
pub fn runtime_bases() -> Vec<PathBuf> {
    let mut bases = Vec::new();
    let uid = nix::unistd::Uid::effective();
    if !uid.is_root() {
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(x) => bases.push(PathBuf::from(x).join("taskrunner")),
            None => bases.push(PathBuf::from(format!("/tmp/taskrunner-{uid}"))),
        }
    }
    bases.push(PathBuf::from(SYSTEM_RUNTIME_BASE));
    bases
}

/// The runtime base of daemons started as root.
pub const SYSTEM_RUNTIME_BASE: &str = "/run/taskrunner";

/// Every `<base>/<instance>/control.sock` under `bases`, as `(instance, socket path)`, sorted
/// (with those in directories this user may not enter).
pub fn discover(bases: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for base in bases {
        let Ok(entries) = std::fs::read_dir(base) else {
            continue;
        };
        for e in entries.flatten() {
            let sock = e.path().join(SOCKET_NAME);
            // A directory we may not enter still counts: connecting then says "permission
            // denied", which is truer than "not running".
            let listed = match std::fs::symlink_metadata(&sock) {
                Ok(m) => m.file_type().is_socket(),
                Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
            };
            if listed {
                found.push((e.file_name().to_string_lossy().into_owned(), sock));
            }
        }
    }
    found.sort();
    found.dedup_by(|a, b| a.1 == b.1);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes() {
        let r: Request = serde_json::from_str(r#"{"v":1,"cmd":"status"}"#).unwrap();
        assert_eq!(r.cmd, Command::Status);
        let r: Request = serde_json::from_str(r#"{"v":1,"cmd":"drain","wait":true}"#).unwrap();
        assert_eq!(r.cmd, Command::Drain { wait: true });
        let r: Request = serde_json::from_str(r#"{"v":1,"cmd":"drain"}"#).unwrap();
        assert_eq!(r.cmd, Command::Drain { wait: false });
        assert_eq!(
            serde_json::to_string(&Request {
                v: 1,
                cmd: Command::Resume
            })
            .unwrap(),
            r#"{"v":1,"cmd":"resume"}"#
        );
        let ok = serde_json::to_value(Response::ok(StatusSnapshot::default())).unwrap();
        assert_eq!(ok["ok"], true);
        assert!(ok["status"].is_object());
        assert!(ok.get("error").is_none());
    }

    async fn server(
        dir: &Path,
        owner_uid: u32,
    ) -> (
        PathBuf,
        watch::Sender<StatusSnapshot>,
        mpsc::Receiver<ControlCommand>,
        CancellationToken,
        JoinHandle<()>,
    ) {
        let path = dir.join("inst").join(SOCKET_NAME);
        let (stx, srx) = watch::channel(StatusSnapshot {
            state: "polling".into(),
            worker_group: "wg-1".into(),
            ..Default::default()
        });
        let (ctx, crx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let h = serve(&path, srx, ctx, owner_uid, cancel.clone()).unwrap();
        (path, stx, crx, cancel, h)
    }

    async fn call(path: &Path, line: &str) -> Response {
        let s = UnixStream::connect(path).await.unwrap();
        let (rd, mut wr) = s.into_split();
        wr.write_all(line.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::io::BufReader::new(rd).read_line(&mut out).await.unwrap();
        serde_json::from_str(&out).unwrap()
    }

    #[tokio::test]
    async fn status_modes_and_cleanup() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, _stx, _crx, cancel, h) = server(tmp.path(), u32::MAX - 1).await;
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, SOCKET_MODE);
        let d = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(d.permissions().mode() & 0o777, DIR_MODE);

        let r = call(&path, "{\"v\":1,\"cmd\":\"status\"}\n").await;
        assert!(r.ok);
        assert_eq!(r.status.unwrap().worker_group, "wg-1");

        // A second daemon on the same socket is refused.
        let e = bind(&path, None).unwrap_err();
        assert!(matches!(e, BindError::InUse { .. }), "{e}");

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .unwrap()
            .unwrap();
        assert!(!path.exists(), "socket removed on shutdown");
    }

    #[tokio::test]
    async fn bad_requests_get_clear_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, _stx, _crx, cancel, _h) = server(tmp.path(), 0).await;
        let r = call(&path, "hello\n").await;
        assert_eq!(r.kind.as_deref(), Some("bad-request"));
        let r = call(&path, "{\"v\":2,\"cmd\":\"status\"}\n").await;
        assert_eq!(r.kind.as_deref(), Some("unsupported-version"));
        assert!(r.error.unwrap().contains("version 1"));
        let r = call(&path, "{\"v\":1,\"cmd\":\"explode\"}\n").await;
        assert_eq!(r.kind.as_deref(), Some("bad-request"));
        assert!(r.error.unwrap().contains("explode"));
        let r = call(&path, "{\"cmd\":\"status\"}\n").await;
        assert_eq!(r.kind.as_deref(), Some("bad-request"));
        cancel.cancel();
    }

    #[tokio::test]
    async fn drain_by_a_stranger_is_refused_without_reaching_the_loop() {
        let tmp = tempfile::tempdir().unwrap();
        let me = nix::unistd::Uid::effective().as_raw();
        if me == 0 {
            // As root every peer is allowed; the refusal is tested with a real second user in
            // tests/ctl_cli.rs.
            return;
        }
        let (path, _stx, mut crx, cancel, _h) = server(tmp.path(), me + 1).await;
        let r = call(&path, "{\"v\":1,\"cmd\":\"drain\"}\n").await;
        assert_eq!(r.kind.as_deref(), Some("forbidden"));
        assert!(crx.try_recv().is_err());
        cancel.cancel();
    }

    #[tokio::test]
    async fn drain_wait_resume_through_the_loop() {
        let tmp = tempfile::tempdir().unwrap();
        let me = nix::unistd::Uid::effective().as_raw();
        let (path, stx, mut crx, cancel, _h) = server(tmp.path(), me).await;
        stx.send_modify(|s| {
            s.running.push(crate::status::RunningTask {
                task_id: "t1".into(),
                ..Default::default()
            })
        });
        // A fake loop: acknowledge the drain, go on running the task a while, then finish it.
        let lp = tokio::spawn(async move {
            let Some(ControlCommand::Drain { reply }) = crx.recv().await else {
                panic!("expected a drain")
            };
            stx.send_modify(|s| s.state = "paused".into());
            reply.send(Ok(())).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            stx.send_modify(|s| s.running.clear());
            let Some(ControlCommand::Resume { reply }) = crx.recv().await else {
                panic!("expected a resume")
            };
            reply.send(Err("already stopping".into())).unwrap();
            stx
        });
        let p = path.clone();
        let snap = tokio::task::spawn_blocking(move || Client::connect(&p).unwrap().drain(true))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(snap.state, "paused");
        assert!(snap.running.is_empty(), "drain --wait answers once nothing runs");
        let p = path.clone();
        let e = tokio::task::spawn_blocking(move || Client::connect(&p).unwrap().resume())
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Refused { kind, .. } if kind == "rejected"),
            "{e}"
        );
        assert_eq!(e.to_string(), "already stopping");
        let _ = lp.await.unwrap();
        cancel.cancel();
    }

    #[test]
    fn client_without_daemon_is_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let e = Client::connect(&tmp.path().join("control.sock")).unwrap_err();
        assert!(e.is_not_running(), "{e}");
        // A stale socket file nobody listens on is the same.
        let stale = tmp.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(Client::connect(&stale).unwrap_err().is_not_running());
    }

    #[test]
    fn discover_finds_sockets_only() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a")).unwrap();
        std::fs::create_dir_all(tmp.path().join("b")).unwrap();
        std::fs::write(tmp.path().join("b").join(SOCKET_NAME), "not a socket").unwrap();
        let _l = std::os::unix::net::UnixListener::bind(tmp.path().join("a").join(SOCKET_NAME)).unwrap();
        let found = discover(&[tmp.path().to_path_buf(), tmp.path().join("missing")]);
        assert_eq!(
            found,
            vec![("a".to_string(), tmp.path().join("a").join(SOCKET_NAME))]
        );
    }
}
