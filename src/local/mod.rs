//! `datapipeline-local`: an offline endpoint that speaks the Data Pipeline API (AWS JSON 1.1,
//! SigV4) closely enough for awscli, boto3 and this project's runner.
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the command line: `serve`, `submit`, `runs` |
//! | [`server`] | HTTP (axum): body cap, target, SigV4, model validation, long poll, error bodies |
//! | [`sigv4`] | SigV4 verification with `hmac`/`sha2` |
//! | [`shapes`] | request validation driven by the embedded API model |
//! | [`expr`] | `#{...}` expressions and the functions of the Developer Guide (branch `expr`) |
//! | [`engine`] | pipelines, objects, instances, attempts, hand-out, retries, timeouts |
//! | [`store`] | SQLite persistence with `--state DIR` |
//! | [`client`] | the signing client behind `submit` and `runs`; the definition-file translation |

pub mod cli;
pub mod client;
mod compat;
pub mod engine;
pub mod expr;
pub mod server;
pub mod shapes;
pub mod sigv4;
pub mod store;
