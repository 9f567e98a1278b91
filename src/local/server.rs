//! The HTTP side of `datapipeline-local`: one `POST /` handler that caps the body, reads
//! `X-Amz-Target`, verifies SigV4, validates the input against the model, runs the operation on
//! the [`Engine`] under one mutex (so each task is handed to exactly one poller) and answers in
//! AWS JSON 1.1 with `x-amzn-RequestId` and `x-amz-crc32`. PollForTask long-polls, woken by a
//! `Notify` whenever a task may have become ready.

use super::engine::{ApiErr, Engine};
use super::shapes;
use super::sigv4::{self, KeyRing, RequestParts};
use super::store::Store;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use chrono::Utc;
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Largest request body accepted. A PutPipelineDefinition at the service's limits (100 objects of
/// at most 15,360 bytes of fields) is about 1.5 MB of JSON plus overhead; 4 MiB leaves room.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// A larger body is still read (and dropped) up to this size so that the client sees the 413
/// answer instead of a reset connection; beyond it the connection is closed.
const DRAIN_LIMIT_BYTES: usize = 64 * 1024 * 1024;
/// How often timeouts, retry delays and schedules are checked without a request.
const TICK_INTERVAL: Duration = Duration::from_millis(250);

pub struct AppState {
    pub engine: Mutex<Engine>,
    pub store: Option<Mutex<Store>>,
    pub keys: KeyRing,
    pub long_poll: Duration,
    pub ready: Notify,
    pub shutdown: CancellationToken,
}

impl AppState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Engine> {
        // A poisoned lock cannot happen with panic = "abort"; recover anyway in tests.
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the pipelines the engine changed. A failed write is logged, not fatal.
    fn persist(&self, engine: &mut Engine) {
        let dirty = engine.take_dirty();
        if let Some(store) = &self.store {
            let store = store.lock().unwrap_or_else(|e| e.into_inner());
            for p in dirty {
                if let Err(e) = store.save(p) {
                    tracing::error!(pipeline = %p.id, "saving state failed: {e:#}");
                }
            }
        }
    }

    /// Advances time: called by the ticker task.
    pub fn tick(&self) {
        let mut e = self.lock();
        let woke = e.tick(Utc::now());
        self.persist(&mut e);
        drop(e);
        if woke {
            self.ready.notify_waiters();
        }
    }
}

pub fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(state)
}

/// Runs the ticker until `shutdown`.
pub async fn run_ticker(state: Arc<AppState>) {
    let mut interval = tokio::time::interval(TICK_INTERVAL);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = interval.tick() => state.tick(),
        }
    }
}

fn error_response(code: &str, message: &str, status: u16) -> Response {
    // Authentication errors come from AWS's front end (coral); the service's own from setl.
    let ns = match code {
        "InvalidRequestException"
        | "InternalServiceError"
        | "PipelineNotFoundException"
        | "PipelineDeletedException"
        | "TaskNotFoundException" => "com.amazon.setl.webservice",
        _ => "com.amazon.coral.service",
    };
    let body = json!({"__type": format!("{ns}#{code}"), "message": message});
    respond(
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
        &body,
    )
}

fn respond(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let crc = crc32fast::hash(&bytes);
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/x-amz-json-1.1"),
    );
    if let Ok(v) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        h.insert("x-amzn-requestid", v);
    }
    if let Ok(v) = HeaderValue::from_str(&crc.to_string()) {
        h.insert("x-amz-crc32", v);
    }
    r
}

enum BodyRead {
    Ok(Vec<u8>),
    TooLarge(usize),
    Broken(String),
}

async fn read_body(body: Body) -> BodyRead {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                total += c.len();
                if total <= MAX_BODY_BYTES {
                    buf.extend_from_slice(&c);
                } else if total > DRAIN_LIMIT_BYTES {
                    return BodyRead::TooLarge(total);
                }
            }
            Err(e) => return BodyRead::Broken(e.to_string()),
        }
    }
    if total > MAX_BODY_BYTES {
        BodyRead::TooLarge(total)
    } else {
        BodyRead::Ok(buf)
    }
}

async fn handle(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if parts.method != http::Method::POST {
        return error_response(
            "UnknownOperationException",
            "datapipeline-local answers POST / with X-Amz-Target: DataPipeline.<Operation>",
            404,
        );
    }
    let declared = parts
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT_BYTES) {
        return error_response(
            "InvalidRequestException",
            &format!("request body too large: at most {MAX_BODY_BYTES} bytes"),
            413,
        );
    }
    let body = match read_body(body).await {
        BodyRead::Ok(b) => b,
        BodyRead::TooLarge(n) => {
            return error_response(
                "InvalidRequestException",
                &format!("request body of {n} bytes is too large: at most {MAX_BODY_BYTES} bytes"),
                413,
            )
        }
        BodyRead::Broken(e) => {
            return error_response("SerializationException", &format!("reading body: {e}"), 400)
        }
    };
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The Developer Guide's wire page still shows the old prefix; accept it too.
    let op = target
        .strip_prefix("DataPipeline.")
        .or_else(|| target.strip_prefix("DataPipeline_20121129."));
    let Some(op) = op.filter(|o| shapes::input_shape(o).is_some()) else {
        return error_response(
            "UnknownOperationException",
            &format!("unknown operation (X-Amz-Target {target:?}); expected DataPipeline.<Operation>"),
            400,
        );
    };
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let verified = match sigv4::verify(
        &RequestParts {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
            headers: &headers,
            body: &body,
        },
        &state.keys,
        Utc::now(),
    ) {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(operation = op, "refused: {e}");
            return error_response(e.code(), e.message(), e.status());
        }
    };
    let input: Value = if body.iter().all(|b| b.is_ascii_whitespace()) {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return error_response(
                    "SerializationException",
                    &format!("request body is not valid JSON: {e}"),
                    400,
                )
            }
        }
    };
    if let Err(m) = shapes::validate_input(op, &input) {
        return error_response("InvalidRequestException", &m, 400);
    }
    let owner = verified.access_key;
    tracing::debug!(operation = op, %owner, "request");
    if op == "PollForTask" {
        return poll(&state, &owner, &input).await;
    }
    let result = {
        let mut e = state.lock();
        let r = e.call(op, &owner, &input, Utc::now());
        state.persist(&mut e);
        r
    };
    match result {
        Ok((out, woke)) => {
            if woke {
                state.ready.notify_waiters();
            }
            respond(StatusCode::OK, &out)
        }
        Err(ApiErr {
            code,
            message,
            status,
        }) => error_response(code, &message, status),
    }
}

async fn poll(state: &Arc<AppState>, owner: &str, input: &Value) -> Response {
    let deadline = tokio::time::Instant::now() + state.long_poll;
    loop {
        // Register for wake-ups before looking, so a task made ready in between is not missed.
        let notified = state.ready.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let task = {
            let mut e = state.lock();
            let t = e.poll(owner, input, Utc::now());
            state.persist(&mut e);
            t
        };
        if let Some(t) = task {
            tracing::info!(task = %t.task_id, attempt = ?t.attempt_id, "handed out");
            return respond(StatusCode::OK, &json!({"taskObject": t}));
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return respond(StatusCode::OK, &json!({})),
            r = tokio::time::timeout_at(deadline, &mut notified) => {
                if r.is_err() {
                    return respond(StatusCode::OK, &json!({}));
                }
            }
        }
    }
}
