//! Turns a PollForTask [`TaskObject`] into an [`Activity`]: which kind of work it is, with every
//! field the runner needs already checked. Parsing is pure (no I/O): the worker fetches missing
//! referenced objects first ([`missing_references`]), then calls [`parse`].
//!
//! Errors carry a stable `errorId` ([`TaskError::error_id`]) next to a message a person can act on,
//! and name the field that is wrong. Nothing here decides how to run a command: that is
//! [`crate::supervisor`]'s job.

use crate::config::S3Uri;
use crate::model::{PipelineObject, TaskObject};
use std::path::PathBuf;
use std::time::Duration;

/// The names of the object types the runner executes itself.
pub const SHELL_COMMAND_ACTIVITY: &str = "ShellCommandActivity";
pub const SHELL_COMMAND_PRECONDITION: &str = "ShellCommandPrecondition";

/// Where a task's objects sit: the ids used for per-attempt log paths and status lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskIds {
    pub task_id: String,
    pub pipeline_id: String,
    /// The attempt object id (`@Comp_2026-01-01T00:00:00_Attempt=1`).
    pub attempt_id: String,
    /// `@componentParent` (falls back to the attempt's `name`).
    pub component: String,
    /// `@instanceParent` (falls back to the attempt id without its `_Attempt=n` suffix).
    pub instance: String,
    /// The `type` field, or `unknown`.
    pub activity_type: String,
}

/// One piece of work the runner knows how to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Activity {
    ShellCommand(ShellCommand),
    ShellCommandPrecondition {
        shell: ShellCommand,
        /// Gap between two checks (`retryDelay`).
        retry_delay: Duration,
        /// Checks stop after this long since the first one (`preconditionTimeout`). `None`: one
        /// check only; the service owns further retries (`maximumRetries`).
        precondition_timeout: Option<Duration>,
    },
}

/// `command` or `scriptUri`, with arguments and output redirection.
#[derive(Clone, Debug, PartialEq)]
pub struct ShellCommand {
    pub program: Program,
    /// `scriptArgument` values in order: `$1..$n`.
    pub args: Vec<String>,
    /// `stdout` / `stderr` fields: an extra copy of the stream (the attempt's own log always exists).
    pub stdout: Option<OutputTarget>,
    pub stderr: Option<OutputTarget>,
    /// `attemptTimeout`, enforced locally too.
    pub attempt_timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Program {
    /// Run by the shell (`bash -c`, or `sh -c` without bash).
    Command(String),
    /// Downloaded from S3, made executable, run directly.
    ScriptUri(S3Uri),
}

#[derive(Clone, Debug, PartialEq)]
pub enum OutputTarget {
    /// A local file (allowed with `workerGroup`, per the object's field table).
    Local(PathBuf),
    /// Uploaded when the task ends.
    S3(S3Uri),
}

/// Why a task cannot run. Reported FAILED with [`TaskError::error_id`] and the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    #[error("invalid task: field `{field}` of object {object:?}: {problem}")]
    InvalidTask {
        object: String,
        field: String,
        problem: String,
    },
    #[error(
        "{type_name} is not supported by this task runner (it runs ShellCommandActivity and \
         ShellCommandPrecondition); route this activity to another worker group or run it elsewhere"
    )]
    Unsupported { type_name: String },
    #[error(
        "object {object:?} has `stage: true`, and staging (${{INPUT1_STAGING_DIR}}, \
         ${{OUTPUT1_STAGING_DIR}}) is not supported by this version of taskrunner; the command \
         was not run. Remove `stage` or copy the data in the command itself"
    )]
    StagingNotSupported { object: String },
}

impl TaskError {
    /// The stable `errorId` for SetTaskStatus (never starts with `Service_`).
    pub fn error_id(&self) -> &'static str {
        match self {
            TaskError::InvalidTask { .. } => "InvalidTask",
            TaskError::Unsupported { .. } => "UnsupportedActivity",
            TaskError::StagingNotSupported { .. } => "StagingNotSupported",
        }
    }
}

/// The attempt object of a task: `objects[attemptId]`, else the one with `@sphere = ATTEMPT`,
/// else the only object.
pub fn attempt_object(task: &TaskObject) -> Result<&PipelineObject, TaskError> {
    if let Some(id) = &task.attempt_id {
        if let Some(o) = task.objects.get(id) {
            return Ok(o);
        }
    }
    let mut attempts = task
        .objects
        .values()
        .filter(|o| o.get("@sphere") == Some("ATTEMPT"));
    if let Some(o) = attempts.next() {
        return Ok(o);
    }
    if task.objects.len() == 1 {
        return Ok(task.objects.values().next().expect("one object"));
    }
    Err(TaskError::InvalidTask {
        object: task.attempt_id.clone().unwrap_or_else(|| task.task_id.clone()),
        field: "objects".into(),
        problem: format!(
            "the task carries {} objects and none is its attempt (attemptId {:?})",
            task.objects.len(),
            task.attempt_id
        ),
    })
}

/// The ids of a task, as far as they can be read. Never fails: a broken task still needs ids for
/// its log directory and its FAILED report.
pub fn task_ids(task: &TaskObject) -> TaskIds {
    let attempt = attempt_object(task).ok();
    let attempt_id = task
        .attempt_id
        .clone()
        .or_else(|| attempt.map(|o| o.id.clone()))
        .unwrap_or_else(|| "unknown-attempt".to_string());
    let component = attempt
        .and_then(|o| o.get_ref("@componentParent").map(str::to_string))
        .or_else(|| attempt.map(|o| o.name.clone()))
        .unwrap_or_else(|| "unknown-component".to_string());
    let instance = attempt
        .and_then(|o| o.get_ref("@instanceParent").map(str::to_string))
        .unwrap_or_else(|| match attempt_id.rsplit_once("_Attempt=") {
            Some((i, _)) => i.to_string(),
            None => attempt_id.clone(),
        });
    let activity_type = attempt
        .and_then(|o| o.get("type"))
        .unwrap_or("unknown")
        .to_string();
    TaskIds {
        task_id: task.task_id.clone(),
        pipeline_id: task.pipeline_id.clone(),
        attempt_id,
        component,
        instance,
        activity_type,
    }
}

/// True when the task is a precondition: it runs in the precondition pool, not an activity slot.
pub fn is_precondition(task: &TaskObject) -> bool {
    attempt_object(task)
        .ok()
        .and_then(|o| o.get("type"))
        .is_some_and(|t| t == SHELL_COMMAND_PRECONDITION)
}

/// Referenced objects the runner needs to run this task that PollForTask did not include (the
/// real service may send the attempt object alone). The worker fetches them with
/// DescribeObjects before [`parse`]. Only references that the activity uses are listed: today
/// that is `input`/`output` of a staged ShellCommandActivity (named in the staging error).
pub fn missing_references(task: &TaskObject) -> Vec<String> {
    let Ok(attempt) = attempt_object(task) else {
        return Vec::new();
    };
    let staged = attempt
        .get("stage")
        .is_some_and(|s| s.eq_ignore_ascii_case("true"));
    let keys: &[&str] = match attempt.get("type") {
        Some(SHELL_COMMAND_ACTIVITY) if staged => &["input", "output"],
        _ => &[],
    };
    let mut out = Vec::new();
    for key in keys {
        for id in attempt.get_refs(key) {
            if !task.objects.contains_key(id) && !out.iter().any(|o| o == id) {
                out.push(id.to_string());
            }
        }
    }
    out
}

/// Parses a task into the work to do. Pure.
pub fn parse(task: &TaskObject) -> Result<Activity, TaskError> {
    let attempt = attempt_object(task)?;
    let type_name = attempt.get("type").ok_or_else(|| TaskError::InvalidTask {
        object: attempt.id.clone(),
        field: "type".into(),
        problem: "missing: the object has no `type`, so the runner cannot tell what to run".into(),
    })?;
    match type_name {
        SHELL_COMMAND_ACTIVITY => {
            if attempt
                .get("stage")
                .is_some_and(|s| s.eq_ignore_ascii_case("true"))
            {
                return Err(TaskError::StagingNotSupported {
                    object: attempt.id.clone(),
                });
            }
            Ok(Activity::ShellCommand(shell_command(attempt)?))
        }
        SHELL_COMMAND_PRECONDITION => {
            let shell = shell_command(attempt)?;
            let retry_delay = optional_period(attempt, "retryDelay")?.unwrap_or(DEFAULT_RETRY_DELAY);
            let precondition_timeout = optional_period(attempt, "preconditionTimeout")?;
            Ok(Activity::ShellCommandPrecondition {
                shell,
                retry_delay,
                precondition_timeout,
            })
        }
        other => Err(TaskError::Unsupported {
            type_name: other.to_string(),
        }),
    }
}

/// `retryDelay` when a precondition does not set it: the service's minimum gap between retries
/// (`dp-limits.md`: "a minimum of 2 minutes between retries").
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(120);

fn shell_command(o: &PipelineObject) -> Result<ShellCommand, TaskError> {
    let invalid = |field: &str, problem: String| TaskError::InvalidTask {
        object: o.id.clone(),
        field: field.to_string(),
        problem,
    };
    let program = match (nonempty(o, "command"), nonempty(o, "scriptUri")) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "scriptUri",
                "both `command` and `scriptUri` are set; set only one of them".into(),
            ))
        }
        (Some(c), None) => Program::Command(c.to_string()),
        (None, Some(u)) => Program::ScriptUri(S3Uri::parse(u).map_err(|e| invalid("scriptUri", e))?),
        (None, None) => {
            // A reference where a string belongs is a definition error worth naming.
            let field = if o.get_ref("command").is_some() {
                "command"
            } else {
                "command` or `scriptUri"
            };
            return Err(invalid(
                field,
                "missing: one of `command` and `scriptUri` is required".into(),
            ));
        }
    };
    let args = o.get_all("scriptArgument").map(str::to_string).collect();
    Ok(ShellCommand {
        program,
        args,
        stdout: output_target(o, "stdout")?,
        stderr: output_target(o, "stderr")?,
        attempt_timeout: optional_period(o, "attemptTimeout")?,
    })
}

fn nonempty<'a>(o: &'a PipelineObject, key: &str) -> Option<&'a str> {
    o.get(key).filter(|s| !s.trim().is_empty())
}

fn output_target(o: &PipelineObject, key: &str) -> Result<Option<OutputTarget>, TaskError> {
    let Some(v) = nonempty(o, key) else {
        return Ok(None);
    };
    if v.starts_with("s3://") {
        return S3Uri::parse(v)
            .map(|u| Some(OutputTarget::S3(u)))
            .map_err(|e| TaskError::InvalidTask {
                object: o.id.clone(),
                field: key.into(),
                problem: e,
            });
    }
    let p = PathBuf::from(v);
    if !p.is_absolute() {
        return Err(TaskError::InvalidTask {
            object: o.id.clone(),
            field: key.into(),
            problem: format!("{v:?} is neither an s3:// URI nor an absolute local path"),
        });
    }
    Ok(Some(OutputTarget::Local(p)))
}

fn optional_period(o: &PipelineObject, key: &str) -> Result<Option<Duration>, TaskError> {
    let Some(v) = nonempty(o, key) else {
        return Ok(None);
    };
    parse_period(v)
        .map(Some)
        .map_err(|problem| TaskError::InvalidTask {
            object: o.id.clone(),
            field: key.into(),
            problem,
        })
}

/// A Data Pipeline period (`crate::period::Period`: "15 minutes", "1 Day") as the length a timeout
/// needs: months and years count as 30 and 365 days, not as calendar steps.
pub fn parse_period(s: &str) -> Result<Duration, String> {
    crate::period::Period::parse(s).map(|p| p.as_duration_approx())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Field;

    fn task(fields: Vec<Field>) -> TaskObject {
        let attempt = PipelineObject {
            id: "@Act_2026-01-01T00:00:00_Attempt=1".into(),
            name: "Act".into(),
            fields,
        };
        TaskObject {
            task_id: "t1".into(),
            pipeline_id: "df-1".into(),
            attempt_id: Some(attempt.id.clone()),
            objects: [(attempt.id.clone(), attempt)].into_iter().collect(),
        }
    }

    fn s(k: &str, v: &str) -> Field {
        Field::string(k, v)
    }

    #[test]
    fn shell_command_with_arguments_in_order() {
        let t = task(vec![
            s("type", "ShellCommandActivity"),
            s("command", "echo $1 $2"),
            s("scriptArgument", "b"),
            s("scriptArgument", "a"),
            s("scriptArgument", "c"),
            s("stdout", "/tmp/out"),
            s("stderr", "s3://bucket/err"),
            s("attemptTimeout", "2 hours"),
        ]);
        let Activity::ShellCommand(c) = parse(&t).unwrap() else {
            panic!()
        };
        assert_eq!(c.program, Program::Command("echo $1 $2".into()));
        assert_eq!(c.args, vec!["b", "a", "c"]);
        assert_eq!(c.stdout, Some(OutputTarget::Local("/tmp/out".into())));
        assert_eq!(
            c.stderr,
            Some(OutputTarget::S3(S3Uri {
                bucket: "bucket".into(),
                prefix: "err".into()
            }))
        );
        assert_eq!(c.attempt_timeout, Some(Duration::from_secs(7200)));
    }

    #[test]
    fn script_uri() {
        let t = task(vec![
            s("type", "ShellCommandActivity"),
            s("scriptUri", "s3://b/k/run.sh"),
        ]);
        let Activity::ShellCommand(c) = parse(&t).unwrap() else {
            panic!()
        };
        assert_eq!(
            c.program,
            Program::ScriptUri(S3Uri::parse("s3://b/k/run.sh").unwrap())
        );
    }

    #[test]
    fn precondition_timing_fields() {
        let t = task(vec![
            s("type", "ShellCommandPrecondition"),
            s("command", "test -e /x"),
            s("retryDelay", "3 Seconds"),
            s("preconditionTimeout", "1 Minute"),
        ]);
        assert!(is_precondition(&t));
        let Activity::ShellCommandPrecondition {
            retry_delay,
            precondition_timeout,
            ..
        } = parse(&t).unwrap()
        else {
            panic!()
        };
        assert_eq!(retry_delay, Duration::from_secs(3));
        assert_eq!(precondition_timeout, Some(Duration::from_secs(60)));
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(Vec<Field>, &str, &str)> = vec![
            (vec![s("command", "x")], "InvalidTask", "`type`"),
            (
                vec![s("type", "ShellCommandActivity")],
                "InvalidTask",
                "`command` or `scriptUri`",
            ),
            (
                vec![
                    s("type", "ShellCommandActivity"),
                    s("command", "x"),
                    s("scriptUri", "s3://b/k"),
                ],
                "InvalidTask",
                "`scriptUri`",
            ),
            (
                vec![s("type", "ShellCommandActivity"), s("scriptUri", "http://x/y")],
                "InvalidTask",
                "`scriptUri`",
            ),
            (
                vec![
                    s("type", "ShellCommandActivity"),
                    s("command", "x"),
                    s("attemptTimeout", "soon"),
                ],
                "InvalidTask",
                "`attemptTimeout`",
            ),
            (
                vec![
                    s("type", "ShellCommandActivity"),
                    s("command", "x"),
                    s("stdout", "rel/path"),
                ],
                "InvalidTask",
                "`stdout`",
            ),
            (
                vec![
                    s("type", "ShellCommandActivity"),
                    s("command", "x"),
                    s("stage", "true"),
                ],
                "StagingNotSupported",
                "stage",
            ),
            (
                vec![s("type", "HiveActivity")],
                "UnsupportedActivity",
                "HiveActivity",
            ),
            (
                vec![s("type", "SqlActivity")],
                "UnsupportedActivity",
                "SqlActivity",
            ),
            (vec![s("type", "Whatever")], "UnsupportedActivity", "Whatever"),
        ];
        for (fields, id, needle) in cases {
            let e = parse(&task(fields.clone())).unwrap_err();
            assert_eq!(e.error_id(), id, "{fields:?}");
            assert!(e.to_string().contains(needle), "{e} should mention {needle}");
            assert!(!e.error_id().starts_with("Service_"));
        }
    }

    #[test]
    fn ids_from_the_attempt() {
        let mut t = task(vec![
            s("type", "ShellCommandActivity"),
            Field::reference("@componentParent", "Act"),
            Field::reference("@instanceParent", "@Act_2026-01-01T00:00:00"),
        ]);
        let ids = task_ids(&t);
        assert_eq!(ids.component, "Act");
        assert_eq!(ids.instance, "@Act_2026-01-01T00:00:00");
        assert_eq!(ids.activity_type, "ShellCommandActivity");
        // Without the parent references, derive them.
        t.objects.values_mut().next().unwrap().fields.truncate(1);
        let ids = task_ids(&t);
        assert_eq!(ids.instance, "@Act_2026-01-01T00:00:00");
        assert_eq!(ids.component, "Act");
    }

    #[test]
    fn missing_references_of_a_staged_task() {
        let mut t = task(vec![
            s("type", "ShellCommandActivity"),
            s("stage", "true"),
            Field::reference("input", "In"),
            Field::reference("output", "Out"),
        ]);
        assert_eq!(missing_references(&t), vec!["In", "Out"]);
        t.objects.insert(
            "In".into(),
            PipelineObject {
                id: "In".into(),
                name: "In".into(),
                fields: vec![],
            },
        );
        assert_eq!(missing_references(&t), vec!["Out"]);
    }

    #[test]
    fn periods() {
        assert_eq!(parse_period("15 minutes").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_period("1 Day").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_period("2 seconds").unwrap(), Duration::from_secs(2));
        assert!(parse_period("15").is_err());
        assert!(parse_period("x minutes").is_err());
        assert!(parse_period("1 fortnight").is_err());
    }
}
