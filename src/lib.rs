//! # taskrunner
//!
//! A re-implementation of AWS Data Pipeline's Task Runner as a Linux/macOS system service, plus
//! `datapipeline-local`, an offline endpoint that speaks the Data Pipeline API.
//!
//! Data flows one way: [`poller`] -> [`worker`] -> [`activity`] -> [`supervisor`] -> report through
//! [`api`]. Each task has one owner. Shutdown and a service-side cancel travel the same path (a
//! `CancellationToken` tree), and the drain is bounded.
//!
//! Map of the modules (each owns one thing):
//!
//! | module | owns |
//! |---|---|
//! | [`model`] | the wire shapes shared by the runner and the local endpoint (`PipelineObject`, `Field`, `TaskObject`) |
//! | [`config`] | command line (the Java jar's options), TOML files, environment -> one validated [`config::Settings`] |
//! | [`credentials`] | credentials JSON, `--accessId/--secretKey`, the AWS default chain; secrets redacted in `Debug` |
//! | [`net`] | the one place proxy and TLS settings become HTTP clients (Data Pipeline, S3, STS) |
//! | [`api`] | `trait PipelineApi` and its SigV4/reqwest implementation; the only runner code that knows the wire |
//! | [`period`] | Data Pipeline periods (`15 minutes`, `1 Day`) and date-times, shared by both sides |
//! | [`retry`] | retry as a value: capped, jittered exponential backoff |
//! | [`poller`] | takes a slot, long-polls, hands the task to a worker |
//! | [`worker`] | one attempt end to end: ack -> plan -> supervise (+ progress ticker) -> report |
//! | [`activity`] | parse a task into `enum Activity`; planning is pure |
//! | [`supervisor`] | spawns a process group, captures output, timeout/cancel -> TERM, grace, KILL |
//! | [`logs`] | tracing layers (journald, stderr, hourly files), gzip, per-attempt logs, the S3 upload queue |
//! | [`status`] | `StatusSnapshot`, the one piece of shared mutable state (a `watch` channel) |
//! | [`service`] | sd_notify (READY, STATUS, WATCHDOG, STOPPING); a silent no-op without `NOTIFY_SOCKET` |
//! | [`privileges`] | initgroups/setgid/setuid after secrets are read; verifies the drop stuck |
//! | [`control`] | the control socket (server side) and its client, used by `taskrunner-ctl` |
//! | [`daemon`] | composition root: settings -> logging -> socket -> privileges -> loops -> READY -> drain |
//! | [`exit`] | exit codes (0, 78 = EX_CONFIG, ...) |
//! | [`local`] | `datapipeline-local`: the API server, SigV4 verification, its store, scheduler and expressions |

pub mod activity;
pub mod api;
pub mod config;
pub mod control;
pub mod credentials;
pub mod daemon;
pub mod exit;
pub mod local;
pub mod logs;
pub mod model;
pub mod net;
pub mod period;
pub mod poller;
pub mod privileges;
pub mod retry;
pub mod service;
pub mod status;
pub mod supervisor;
pub mod worker;
