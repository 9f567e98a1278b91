//! A tracing layer that speaks journald's native protocol
//! (<https://systemd.io/JOURNAL_NATIVE_PROTOCOL/>) to a socket path we choose.
//!
//! Why not `tracing-journald`: 0.3 hard-codes `/run/systemd/journal/socket` (a test cannot point
//! it at a socket it bound), prefixes every span field with `F_` unless told otherwise, and sends
//! every field of every span. Our contract is narrower and must be testable: `WORKER_GROUP` on
//! every entry, and `PIPELINE_ID`, `TASK_ID`, `ATTEMPT_ID`, `ACTIVITY_TYPE` (plus any other field)
//! from the enclosing span named [`TASK_SPAN`]; see the module doc of [`crate::logs`].
//!
//! Messages longer than [`MESSAGE_MAX_BYTES`] are cut (journald's own `LineMax` default is 48 KiB);
//! the hourly file keeps the whole line.

use std::fmt::{self, Write as _};
use std::io;
#[cfg(unix)]
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// The journal's socket on systemd hosts.
pub const DEFAULT_SOCKET: &str = "/run/systemd/journal/socket";
/// The span the runner opens around everything an attempt does.
pub const TASK_SPAN: &str = "task";
/// Cut longer messages (journald's `LineMax` default).
pub const MESSAGE_MAX_BYTES: usize = 48 * 1024;

/// Sends one datagram per event to the journal.
pub struct JournaldLayer {
    #[cfg(unix)]
    socket: UnixDatagram,
    path: PathBuf,
    /// Pre-encoded fields sent with every entry (`SYSLOG_IDENTIFIER`, `WORKER_GROUP`).
    fixed: Vec<u8>,
}

impl JournaldLayer {
    /// Connect to the journal socket at `path`; fails when nobody listens there.
    pub fn connect(path: &Path, syslog_identifier: &str, worker_group: &str) -> io::Result<JournaldLayer> {
        #[cfg(unix)]
        {
            let socket = UnixDatagram::unbound()?;
            let mut fixed = Vec::new();
            put_field(&mut fixed, "SYSLOG_IDENTIFIER", syslog_identifier.as_bytes());
            if !worker_group.is_empty() {
                put_field(&mut fixed, "WORKER_GROUP", worker_group.as_bytes());
            }
            // An empty datagram is discarded by journald; it tells us whether anyone listens.
            socket.send_to(&[], path)?;
            Ok(JournaldLayer {
                socket,
                path: path.to_path_buf(),
                fixed,
            })
        }
        #[cfg(not(unix))]
        {
            let _ = (path, syslog_identifier, worker_group);
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no journald on this platform",
            ))
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The fields of a [`TASK_SPAN`] span, encoded once when recorded.
struct TaskFields(Vec<(String, String)>);

struct FieldCollector<'a>(&'a mut Vec<(String, String)>);

impl Visit for FieldCollector<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.set(field.name(), format!("{value:?}"));
    }
}

impl FieldCollector<'_> {
    fn set(&mut self, name: &str, value: String) {
        let name = journal_name(name);
        if let Some(slot) = self.0.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            self.0.push((name, value));
        }
    }
}

struct EventFields {
    message: String,
    rest: Vec<(String, String)>,
}

impl Visit for EventFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.rest.push((field.name().to_string(), value.to_string()));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.rest.push((field.name().to_string(), format!("{value:?}")));
        }
    }
}

/// The field names of the span contract, sent without a prefix when an event carries them itself.
const CONTRACT: [&str; 5] = [
    "WORKER_GROUP",
    "PIPELINE_ID",
    "TASK_ID",
    "ATTEMPT_ID",
    "ACTIVITY_TYPE",
];

impl<S> tracing_subscriber::Layer<S> for JournaldLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != TASK_SPAN {
            return;
        }
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Vec::new();
        attrs.record(&mut FieldCollector(&mut fields));
        span.extensions_mut().insert(TaskFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(TaskFields(fields)) = ext.get_mut::<TaskFields>() {
            values.record(&mut FieldCollector(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut ev = EventFields {
            message: String::new(),
            rest: Vec::new(),
        };
        event.record(&mut ev);

        let mut buf = Vec::with_capacity(512);
        let mut message = ev.message;
        for (k, v) in &ev.rest {
            let _ = write!(message, " {k}={v}");
        }
        if message.len() > MESSAGE_MAX_BYTES {
            let total = message.len();
            let mut cut = MESSAGE_MAX_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            let _ = write!(
                message,
                "... [cut: {total} bytes, the hourly log file has all of it]"
            );
        }
        put_field(&mut buf, "MESSAGE", message.as_bytes());
        put_field(&mut buf, "PRIORITY", priority(meta.level()).as_bytes());
        buf.extend_from_slice(&self.fixed);
        put_field(&mut buf, "TARGET", meta.target().as_bytes());
        if let Some(file) = meta.file() {
            put_field(&mut buf, "CODE_FILE", file.as_bytes());
        }
        if let Some(line) = meta.line() {
            put_field(&mut buf, "CODE_LINE", line.to_string().as_bytes());
        }

        // Task fields from the spans, outermost first (the innermost task span wins).
        let mut task: Vec<(String, String)> = Vec::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(TaskFields(fields)) = span.extensions().get::<TaskFields>() {
                    for (k, v) in fields {
                        FieldCollector(&mut task).set(k, v.clone());
                    }
                }
            }
        }
        for (k, v) in &ev.rest {
            let name = journal_name(k);
            if CONTRACT.contains(&name.as_str()) {
                FieldCollector(&mut task).set(&name, v.clone());
            } else {
                put_field(&mut buf, &format!("F_{name}"), v.as_bytes());
            }
        }
        for (k, v) in &task {
            put_field(&mut buf, k, v.as_bytes());
        }
        #[cfg(unix)]
        {
            // Nothing useful can be done with an error here: the hourly file still has the line.
            let _ = self.socket.send_to(&buf, &self.path);
        }
    }
}

fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "3",
        Level::WARN => "4",
        Level::INFO => "6",
        _ => "7",
    }
}

/// journald field names: `[A-Z0-9_]`, not starting with `_` (those are trusted fields) or a digit,
/// at most 64 bytes.
pub fn journal_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    while out.starts_with('_') {
        out.remove(0);
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "F_");
    }
    out.truncate(64);
    out
}

/// One field in the native protocol: `NAME=value\n`, or the length-prefixed binary form when the
/// value holds a newline.
pub fn put_field(buf: &mut Vec<u8>, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
        buf.extend_from_slice(value);
    } else {
        buf.push(b'=');
        buf.extend_from_slice(value);
    }
    buf.push(b'\n');
}

/// Decode one native-protocol datagram into `(name, value)` pairs (tests, and `taskrunner` tools
/// that read a captured journal datagram).
pub fn parse_datagram(mut data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let nl = data
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("field without a newline")?;
        let line = &data[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                line[eq + 1..].to_vec(),
            ));
            data = &data[nl + 1..];
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let rest = &data[nl + 1..];
            if rest.len() < 8 {
                return Err(format!("{name}: short length"));
            }
            let len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
            let body = rest
                .get(8..8 + len)
                .ok_or_else(|| format!("{name}: short value"))?;
            if rest.get(8 + len) != Some(&b'\n') {
                return Err(format!("{name}: no newline after the value"));
            }
            out.push((name, body.to_vec()));
            data = &rest[8 + len + 1..];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_journal_safe() {
        assert_eq!(journal_name("task_id"), "TASK_ID");
        assert_eq!(journal_name("_SYSTEMD_UNIT"), "SYSTEMD_UNIT");
        assert_eq!(journal_name("r#type"), "R_TYPE");
        assert_eq!(journal_name("1st"), "F_1ST");
    }

    #[test]
    fn encoding_round_trips() {
        let mut buf = Vec::new();
        put_field(&mut buf, "MESSAGE", b"two\nlines");
        put_field(&mut buf, "TASK_ID", b"abc");
        let parsed = parse_datagram(&buf).unwrap();
        assert_eq!(parsed[0], ("MESSAGE".to_string(), b"two\nlines".to_vec()));
        assert_eq!(parsed[1], ("TASK_ID".to_string(), b"abc".to_vec()));
    }
}
