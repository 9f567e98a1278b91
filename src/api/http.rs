//! [`HttpPipelineApi`]: the Data Pipeline API over reqwest and aws-sigv4.
//!
//! Why not aws-sdk-datapipeline: the SDK would pull another large generated crate (and a second
//! HTTP stack configuration) for five calls; the wire format is small and fixed (AWS JSON 1.1,
//! SPEC-NOTES §9.1), and a thin client lets us control what the issues ask for directly: the
//! read timeout above the 90 s long poll, per-call deadlines, `{}` vs `{"taskObject": null}`,
//! the SetTaskStatus field limits, error classification into [`ApiErrorKind`], and a rate
//! limiter that keeps this process under the documented call rates (dp-limits.md).
//!
//! Each call is `POST /` with `X-Amz-Target: DataPipeline.<Op>` and `Content-Type:
//! application/x-amz-json-1.1`, signed with SigV4 (service `datapipeline`, the configured region,
//! `X-Amz-Security-Token` for temporary credentials). Credentials come from a
//! `SharedCredentialsProvider` and are cached until five minutes before they expire.
//! This module does not retry (see [`crate::retry`]) except once, immediately, when the service
//! says the credentials expired.

use super::{ApiError, ApiErrorKind, PipelineApi, PollRequest, StatusReport, LONG_POLL};
use crate::model::{Field, InstanceIdentity, PipelineObject, TaskObject};
use aws_credential_types::provider::{
    error::CredentialsError, ProvideCredentials, SharedCredentialsProvider,
};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};
use tokio::sync::Mutex;

/// The SigV4 signing name of the service (SPEC-NOTES §9.1).
pub const SIGNING_NAME: &str = "datapipeline";
pub const CONTENT_TYPE: &str = "application/x-amz-json-1.1";
/// Deadline of a PollForTask call: the 90 s the service may hold it, plus slack.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(LONG_POLL.as_secs() + 30);
/// Deadline of every other call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// `errorId` and `errorStackTrace` are the model's `string` shape: at most 1024 characters.
pub const MAX_ERROR_ID: usize = 1024;
pub const MAX_STACK_TRACE: usize = 1024;
/// `errorMessage` is unbounded in the model, but it is stored as a field of the attempt, and a
/// field holds at most 10,240 UTF-8 bytes (dp-limits.md); a person reads it in the console.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;
/// Ids per DescribeObjects call (the API documentation's limit).
pub const DESCRIBE_OBJECTS_BATCH: usize = 25;
/// Refresh temporary credentials this long before they expire.
const CREDENTIALS_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Calls allowed at once before the rate limiter spaces them (the service allows bursts of 100).
const RATE_BURST: f64 = 10.0;
/// How much of a service error message is kept (a proxy may answer with a whole HTML page).
const MAX_SERVICE_MESSAGE: usize = 512;

/// The Data Pipeline API over HTTP with SigV4. Cheap to share behind an `Arc`.
pub struct HttpPipelineApi {
    client: reqwest::Client,
    endpoint: url::Url,
    region: String,
    credentials: SharedCredentialsProvider,
    cached: Mutex<Option<Credentials>>,
    poll_timeout: Duration,
    call_timeout: Duration,
    limiter: Option<RateLimiter>,
    /// Strings scrubbed from every error message (the proxy password), belt and braces.
    scrub: Vec<String>,
}

impl std::fmt::Debug for HttpPipelineApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpPipelineApi")
            .field("endpoint", &self.endpoint.as_str())
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl HttpPipelineApi {
    /// `endpoint`: `https://datapipeline.<region>.amazonaws.com` or a local endpoint URL.
    pub fn new(
        client: reqwest::Client,
        endpoint: &str,
        region: &str,
        credentials: SharedCredentialsProvider,
    ) -> Result<Self, crate::net::NetError> {
        let endpoint = parse_endpoint(endpoint)?;
        Ok(HttpPipelineApi {
            client,
            endpoint,
            region: region.to_string(),
            credentials,
            cached: Mutex::new(None),
            poll_timeout: POLL_TIMEOUT,
            call_timeout: CALL_TIMEOUT,
            limiter: Some(RateLimiter::default()),
            scrub: Vec::new(),
        })
    }

    /// The client the daemon uses: [`crate::net::http_client`] (proxy, CA bundle, timeouts) and
    /// [`crate::net::credentials_provider`].
    pub async fn from_settings(settings: &crate::config::Settings) -> Result<Self, crate::net::NetError> {
        let client = crate::net::http_client(settings)?;
        let creds = crate::net::credentials_provider(settings).await?;
        let mut api = Self::new(client, &settings.endpoint, &settings.region, creds)?;
        if let Some(pw) = settings.proxy.as_ref().and_then(|p| p.password.as_ref()) {
            if !pw.expose().is_empty() {
                api.scrub.push(pw.expose().to_string());
            }
        }
        Ok(api)
    }

    /// Per-call deadlines (tests shorten them).
    pub fn with_timeouts(mut self, poll: Duration, other: Duration) -> Self {
        self.poll_timeout = poll;
        self.call_timeout = other;
        self
    }

    /// Turns the client-side rate limiter off (load tests against a local endpoint).
    pub fn without_rate_limit(mut self) -> Self {
        self.limiter = None;
        self
    }

    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    async fn credentials(&self, operation: &'static str) -> Result<Credentials, ApiError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            let fresh = match c.expiry() {
                None => true,
                Some(exp) => exp
                    .duration_since(SystemTime::now())
                    .is_ok_and(|left| left > CREDENTIALS_REFRESH_MARGIN),
            };
            if fresh {
                return Ok(c.clone());
            }
        }
        let fut = self.credentials.provide_credentials();
        let creds = match tokio::time::timeout(self.call_timeout, fut).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(credentials_error(operation, &e)),
            Err(_) => {
                return Err(ApiError {
                    operation,
                    kind: ApiErrorKind::Transport,
                    message: format!(
                        "loading credentials timed out after {} s",
                        self.call_timeout.as_secs()
                    ),
                })
            }
        };
        *cached = Some(creds.clone());
        Ok(creds)
    }

    async fn forget_credentials(&self) {
        *self.cached.lock().await = None;
    }

    fn scrubbed(&self, mut s: String) -> String {
        for secret in &self.scrub {
            if s.contains(secret.as_str()) {
                s = s.replace(secret.as_str(), "<redacted>");
            }
        }
        s
    }

    /// One signed call; on an expired-token answer, refreshes credentials and tries once more.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        operation: &'static str,
        body: &Req,
    ) -> Result<Resp, ApiError> {
        let body = serde_json::to_vec(body).map_err(|e| ApiError {
            operation,
            kind: ApiErrorKind::Client {
                status: 0,
                code: "SerializationError".into(),
            },
            message: e.to_string(),
        })?;
        if let Some(l) = &self.limiter {
            l.acquire(operation).await;
        }
        match self.call_once(operation, &body).await {
            Err(e) if is_expired_token(&e) => {
                tracing::info!(operation, "credentials expired; refreshing and retrying once");
                self.forget_credentials().await;
                self.call_once(operation, &body).await
            }
            other => other,
        }
    }

    async fn call_once<Resp: DeserializeOwned>(
        &self,
        operation: &'static str,
        body: &[u8],
    ) -> Result<Resp, ApiError> {
        let creds = self.credentials(operation).await?;
        let target = format!("DataPipeline.{operation}");
        let headers = sign_headers(
            &self.endpoint,
            &self.region,
            &creds,
            &target,
            body,
            SystemTime::now(),
        )
        .map_err(|message| ApiError {
            operation,
            kind: ApiErrorKind::Client {
                status: 0,
                code: "SigningError".into(),
            },
            message,
        })?;
        let timeout = if operation == "PollForTask" {
            self.poll_timeout
        } else {
            self.call_timeout
        };
        let mut req = self
            .client
            .post(self.endpoint.clone())
            .timeout(timeout)
            .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
            .header("x-amz-target", &target)
            .body(body.to_vec());
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let transport = |e: reqwest::Error| ApiError {
            operation,
            kind: ApiErrorKind::Transport,
            message: self.scrubbed(if e.is_timeout() {
                format!(
                    "no answer within {} s: {}",
                    timeout.as_secs(),
                    crate::net::error_chain(&e)
                )
            } else {
                crate::net::error_chain(&e)
            }),
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let crc = resp
            .headers()
            .get("x-amz-crc32")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        let error_type = resp
            .headers()
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp.bytes().await.map_err(transport)?;
        if let Some(expected) = crc {
            let got = crc32fast::hash(&bytes);
            if got != expected {
                return Err(ApiError {
                    operation,
                    kind: ApiErrorKind::Transport,
                    message: format!("response damaged in transit (x-amz-crc32 {expected}, body {got})"),
                });
            }
        }
        if !(200..300).contains(&status) {
            let mut e = classify(operation, status, error_type.as_deref(), &bytes);
            e.message = self.scrubbed(e.message);
            return Err(e);
        }
        // SetTaskStatus may answer with an empty body (Content-Length: 0, EX:set_task_status).
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes).map_err(|e| ApiError {
            operation,
            // A truncated or garbled body (a proxy, a reset) is worth another try.
            kind: ApiErrorKind::Transport,
            message: format!("unreadable response (HTTP {status}): {e}"),
        })
    }
}

fn parse_endpoint(endpoint: &str) -> Result<url::Url, crate::net::NetError> {
    let bad = |reason: String| crate::net::NetError::Build(format!("endpoint {endpoint:?}: {reason}"));
    let u = url::Url::parse(endpoint.trim()).map_err(|e| bad(e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(bad("expected http(s)://host[:port]".into()));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad("credentials do not belong in the endpoint URL".into()));
    }
    Ok(u)
}

/// The SigV4 headers (`authorization`, `x-amz-date`, and `x-amz-security-token` with a session
/// token) for `POST <endpoint>` with our content type and target. Pure apart from its inputs.
pub fn sign_headers(
    endpoint: &url::Url,
    region: &str,
    creds: &Credentials,
    target: &str,
    body: &[u8],
    time: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    let identity = creds.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SIGNING_NAME)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let signable = SignableRequest::new(
        "POST",
        endpoint.as_str(),
        [("content-type", CONTENT_TYPE), ("x-amz-target", target)].into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _signature) = sign(signable, &params).map_err(|e| e.to_string())?.into_parts();
    Ok(instructions
        .headers()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

fn credentials_error(operation: &'static str, e: &CredentialsError) -> ApiError {
    // The provider's messages name the source (profile, IMDS, ...), never a key.
    let message = format!("loading credentials: {}", crate::net::error_chain(e));
    let kind = match e {
        // Nothing configured, or a broken profile: trying again will not help.
        CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_) => {
            ApiErrorKind::Client {
                status: 0,
                code: "CredentialsNotLoaded".into(),
            }
        }
        // Timeouts and provider errors (IMDS or STS unreachable): retry with backoff.
        _ => ApiErrorKind::Transport,
    };
    ApiError {
        operation,
        kind,
        message,
    }
}

fn is_expired_token(e: &ApiError) -> bool {
    matches!(&e.kind, ApiErrorKind::Client { code, .. }
        if matches!(code.as_str(), "ExpiredTokenException" | "ExpiredToken" | "RequestExpired"))
}

/// Error codes that mean "slow down" (botocore `_retry.json`, plus the usual AWS spellings).
const THROTTLING_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "ProvisionedThroughputExceededException",
    "BandwidthLimitExceeded",
];

/// The error code in an AWS JSON error: `__type` (or `code`), or the `x-amzn-ErrorType` header,
/// as the part after the last `#` and before any `:` (`aws.protocols#X:http://...`).
pub fn error_code(error_type_header: Option<&str>, body: &serde_json::Value) -> Option<String> {
    let raw = body
        .get("__type")
        .or_else(|| body.get("code"))
        .or_else(|| body.get("Code"))
        .and_then(|v| v.as_str())
        .or(error_type_header)?;
    let after_hash = raw.rsplit('#').next().unwrap_or(raw);
    let code = after_hash.split(':').next().unwrap_or(after_hash).trim();
    (!code.is_empty()).then(|| code.to_string())
}

/// Classifies a non-2xx answer. Pure; unit-tested below.
pub fn classify(
    operation: &'static str,
    status: u16,
    error_type_header: Option<&str>,
    body: &[u8],
) -> ApiError {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let code = error_code(error_type_header, &json);
    let service_message = json
        .get("message")
        .or_else(|| json.get("Message"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            if json.is_null() {
                // Not JSON: a proxy or load balancer page. Keep a short printable excerpt.
                String::from_utf8_lossy(body)
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect::<String>()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            } else {
                String::new()
            }
        });
    let service_message = truncate_chars(&service_message, MAX_SERVICE_MESSAGE);
    let kind = match code.as_deref() {
        Some(c) if THROTTLING_CODES.contains(&c) => ApiErrorKind::Throttled,
        _ if status == 429 => ApiErrorKind::Throttled,
        Some("TaskNotFoundException") => ApiErrorKind::TaskNotFound,
        Some("PipelineNotFoundException" | "PipelineDeletedException") => ApiErrorKind::PipelineGone,
        _ if status >= 500 => ApiErrorKind::Server(status),
        _ => ApiErrorKind::Client {
            status,
            code: code.clone().unwrap_or_else(|| format!("HTTP{status}")),
        },
    };
    let message = match (&code, service_message.is_empty()) {
        (Some(c), false) => format!("HTTP {status} {c}: {service_message}"),
        (Some(c), true) => format!("HTTP {status} {c}"),
        (None, false) => format!("HTTP {status}: {service_message}"),
        (None, true) => format!("HTTP {status}"),
    };
    ApiError {
        operation,
        kind,
        message,
    }
}

/// At most `max` characters, cut on a character boundary, with `…` when cut.
pub fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// At most `max` UTF-16 code units (the service is Java: its "characters" are UTF-16 units, so
/// this is the strictest reading of "1024 characters"), cut on a char boundary, `…` when cut.
pub fn truncate_utf16(s: &str, max: usize) -> String {
    if s.encode_utf16().count() <= max {
        return s.to_string();
    }
    let mut out = String::new();
    let mut units = 0;
    for c in s.chars() {
        if units + c.len_utf16() > max.saturating_sub(1) {
            break;
        }
        units += c.len_utf16();
        out.push(c);
    }
    out.push('…');
    out
}

/// At most `max` UTF-8 bytes, cut on a char boundary, `…` when cut.
pub fn truncate_bytes(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let budget = max.saturating_sub('…'.len_utf8());
    let mut end = budget.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// `errorId` as the service accepts it: never starting with `Service_` (reserved for the
/// service: such an id is prefixed with `Runner_`), at most 1024 characters, `None` when empty.
pub fn sanitize_error_id(id: Option<&str>) -> Option<String> {
    let id = id?.trim();
    if id.is_empty() {
        return None;
    }
    let id = if id.starts_with("Service_") {
        format!("Runner_{id}")
    } else {
        id.to_string()
    };
    Some(truncate_utf16(&id, MAX_ERROR_ID))
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SetTaskStatusBody {
    pub task_id: String,
    pub task_status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_stack_trace: Option<String>,
}

impl SetTaskStatusBody {
    /// Enforces the API's limits on the error fields (see the constants above).
    pub fn from_report(r: &StatusReport) -> Self {
        SetTaskStatusBody {
            task_id: r.task_id.clone(),
            task_status: r.status.as_str(),
            error_id: sanitize_error_id(r.error_id.as_deref()),
            error_message: r
                .error_message
                .as_deref()
                .filter(|m| !m.is_empty())
                .map(|m| truncate_bytes(m, MAX_ERROR_MESSAGE_BYTES)),
            error_stack_trace: r
                .error_stack_trace
                .as_deref()
                .filter(|m| !m.is_empty())
                .map(|m| truncate_utf16(m, MAX_STACK_TRACE)),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PollBody<'a> {
    worker_group: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    hostname: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_identity: Option<&'a InstanceIdentity>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PollResponse {
    #[serde(default)]
    task_object: Option<TaskObject>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProgressBody<'a> {
    task_id: &'a str,
    #[serde(skip_serializing_if = "<[Field]>::is_empty")]
    fields: &'a [Field],
}

#[derive(Deserialize)]
struct ProgressResponse {
    #[serde(default)]
    canceled: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HeartbeatBody<'a> {
    taskrunner_id: &'a str,
    worker_group: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    hostname: &'a str,
}

#[derive(Deserialize)]
struct HeartbeatResponse {
    #[serde(default)]
    terminate: bool,
}

#[derive(Deserialize)]
struct Empty {}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DescribeBody<'a> {
    pipeline_id: &'a str,
    object_ids: &'a [String],
    evaluate_expressions: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    marker: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeResponse {
    #[serde(default)]
    pipeline_objects: Vec<PipelineObject>,
    #[serde(default)]
    marker: Option<String>,
    #[serde(default)]
    has_more_results: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EvaluateBody<'a> {
    pipeline_id: &'a str,
    object_id: &'a str,
    expression: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EvaluateResponse {
    evaluated_expression: String,
}

impl HttpPipelineApi {
    /// EvaluateExpression: `#{...}` evaluated by the service in the context of `object_id`
    /// (e.g. for a SQL script read from S3, SPEC-NOTES §7.5).
    pub async fn evaluate_expression(
        &self,
        pipeline_id: &str,
        object_id: &str,
        expression: &str,
    ) -> Result<String, ApiError> {
        let r: EvaluateResponse = self
            .call(
                "EvaluateExpression",
                &EvaluateBody {
                    pipeline_id,
                    object_id,
                    expression,
                },
            )
            .await?;
        Ok(r.evaluated_expression)
    }
}

#[async_trait::async_trait]
impl PipelineApi for HttpPipelineApi {
    async fn poll_for_task(&self, req: &PollRequest) -> Result<Option<TaskObject>, ApiError> {
        let r: PollResponse = self
            .call(
                "PollForTask",
                &PollBody {
                    worker_group: &req.worker_group,
                    hostname: &req.hostname,
                    instance_identity: req.instance_identity.as_ref(),
                },
            )
            .await?;
        Ok(r.task_object)
    }

    async fn report_task_progress(&self, task_id: &str, fields: &[Field]) -> Result<bool, ApiError> {
        let r: ProgressResponse = self
            .call("ReportTaskProgress", &ProgressBody { task_id, fields })
            .await?;
        Ok(r.canceled)
    }

    async fn set_task_status(&self, report: &StatusReport) -> Result<(), ApiError> {
        let _: Empty = self
            .call("SetTaskStatus", &SetTaskStatusBody::from_report(report))
            .await?;
        Ok(())
    }

    async fn report_task_runner_heartbeat(
        &self,
        taskrunner_id: &str,
        worker_group: &str,
        hostname: &str,
    ) -> Result<bool, ApiError> {
        let r: HeartbeatResponse = self
            .call(
                "ReportTaskRunnerHeartbeat",
                &HeartbeatBody {
                    taskrunner_id,
                    worker_group,
                    hostname,
                },
            )
            .await?;
        Ok(r.terminate)
    }

    async fn describe_objects(
        &self,
        pipeline_id: &str,
        object_ids: &[String],
    ) -> Result<Vec<PipelineObject>, ApiError> {
        let mut out = Vec::new();
        for batch in object_ids.chunks(DESCRIBE_OBJECTS_BATCH) {
            let mut marker: Option<String> = None;
            // Bounded: a service that keeps saying "more" with the same marker must not loop us.
            for _page in 0..1000 {
                let r: DescribeResponse = self
                    .call(
                        "DescribeObjects",
                        &DescribeBody {
                            pipeline_id,
                            object_ids: batch,
                            evaluate_expressions: true,
                            marker: marker.as_deref(),
                        },
                    )
                    .await?;
                out.extend(r.pipeline_objects);
                match r.marker.filter(|m| r.has_more_results && !m.is_empty()) {
                    Some(m) if Some(&m) != marker.as_ref() => marker = Some(m),
                    _ => break,
                }
            }
        }
        Ok(out)
    }
}

/// A token bucket per operation: at most [`RATE_BURST`] calls at once, then the regular rate of
/// dp-limits.md ([`crate::retry::min_call_interval`]). Per process; the documented limits are per
/// account, so this is a floor of politeness, not a guarantee across runners.
#[derive(Default)]
struct RateLimiter {
    buckets: std::sync::Mutex<HashMap<&'static str, (f64, tokio::time::Instant)>>,
}

impl RateLimiter {
    async fn acquire(&self, operation: &'static str) {
        let rate = 1.0 / crate::retry::min_call_interval(operation).as_secs_f64();
        let wait = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            let (tokens, last) = buckets.entry(operation).or_insert((RATE_BURST, now));
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(RATE_BURST);
            *last = now;
            // Take the token now (possibly going negative); callers queue behind each other.
            *tokens -= 1.0;
            if *tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-*tokens / rate)
            }
        };
        if !wait.is_zero() {
            tracing::debug!(
                operation,
                wait_ms = wait.as_millis() as u64,
                "rate limit: spacing the call"
            );
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TaskStatus;

    #[test]
    fn classifies_service_errors() {
        let c = |status, body: &str| classify("PollForTask", status, None, body.as_bytes()).kind;
        assert_eq!(
            c(
                400,
                r#"{"__type":"com.amazon.coral.availability#ThrottlingException","message":"Rate exceeded"}"#
            ),
            ApiErrorKind::Throttled
        );
        assert_eq!(c(400, r#"{"__type":"Throttling"}"#), ApiErrorKind::Throttled);
        assert_eq!(c(429, ""), ApiErrorKind::Throttled);
        assert_eq!(
            c(
                500,
                r#"{"__type":"com.amazon.setl.webservice#InternalServiceError","message":"x"}"#
            ),
            ApiErrorKind::Server(500)
        );
        assert_eq!(
            c(503, "<html>Service Unavailable</html>"),
            ApiErrorKind::Server(503)
        );
        assert_eq!(
            c(
                400,
                r#"{"__type":"com.amazon.setl.webservice#TaskNotFoundException","message":"gone"}"#
            ),
            ApiErrorKind::TaskNotFound
        );
        assert_eq!(
            c(
                400,
                r#"{"__type":"com.amazon.setl.webservice#PipelineDeletedException"}"#
            ),
            ApiErrorKind::PipelineGone
        );
        assert_eq!(
            c(400, r#"{"__type":"PipelineNotFoundException"}"#),
            ApiErrorKind::PipelineGone
        );
        assert_eq!(
            c(
                403,
                r#"{"__type":"com.amazon.coral.service#AccessDeniedException","message":"not authorized to perform: datapipeline:PollForTask"}"#
            ),
            ApiErrorKind::Client {
                status: 403,
                code: "AccessDeniedException".into()
            }
        );
        assert_eq!(
            c(404, "not found"),
            ApiErrorKind::Client {
                status: 404,
                code: "HTTP404".into()
            }
        );
    }

    #[test]
    fn error_code_from_header_and_message_kept() {
        let e = classify(
            "SetTaskStatus",
            400,
            Some("InvalidRequestException:http://internal.amazon.com/coral/com.amazon.setl/"),
            b"{\"message\":\"bad errorId\"}",
        );
        assert_eq!(
            e.kind,
            ApiErrorKind::Client {
                status: 400,
                code: "InvalidRequestException".into()
            }
        );
        assert_eq!(e.message, "HTTP 400 InvalidRequestException: bad errorId");
        assert!(!e.is_retryable());
        // Retryability follows the kind.
        assert!(classify("X", 502, None, b"").is_retryable());
        assert!(!classify("X", 400, None, br#"{"__type":"TaskNotFoundException"}"#).is_retryable());
    }

    #[test]
    fn html_error_pages_are_shortened() {
        let page = format!("<html>\n<body>{}</body></html>", "proxy error ".repeat(500));
        let e = classify("PollForTask", 502, None, page.as_bytes());
        assert!(
            e.message.chars().count() < MAX_SERVICE_MESSAGE + 40,
            "{}",
            e.message.len()
        );
        assert!(!e.message.contains('\n'));
    }

    #[test]
    fn error_id_never_starts_with_service() {
        assert_eq!(
            sanitize_error_id(Some("Service_Foo")).unwrap(),
            "Runner_Service_Foo"
        );
        assert_eq!(sanitize_error_id(Some("NonZeroExit")).unwrap(), "NonZeroExit");
        assert_eq!(sanitize_error_id(Some("")), None);
        assert_eq!(sanitize_error_id(None), None);
        let long = "x".repeat(5000);
        assert_eq!(
            sanitize_error_id(Some(&long)).unwrap().chars().count(),
            MAX_ERROR_ID
        );
    }

    #[test]
    fn stack_trace_cut_to_1024_on_char_boundary() {
        // Multi-byte and astral characters: cutting by bytes would split them.
        let s = "é😀".repeat(1000);
        let t = truncate_utf16(&s, MAX_STACK_TRACE);
        assert!(t.encode_utf16().count() <= MAX_STACK_TRACE);
        assert!(t.ends_with('…'));
        assert!(t.chars().count() > 600);
        assert_eq!(truncate_utf16("short", 1024), "short");
        let body = SetTaskStatusBody::from_report(&StatusReport {
            task_id: "t".into(),
            status: TaskStatus::Failed,
            error_id: Some("Service_Oops".into()),
            error_message: Some("m".repeat(100_000)),
            error_stack_trace: Some("ß".repeat(3000)),
        });
        assert!(!body.error_id.as_ref().unwrap().starts_with("Service_"));
        assert!(body.error_message.as_ref().unwrap().len() <= MAX_ERROR_MESSAGE_BYTES);
        assert!(body.error_stack_trace.as_ref().unwrap().chars().count() <= MAX_STACK_TRACE);
        let json = serde_json::to_value(&body).unwrap();
        assert_eq!(json["taskStatus"], "FAILED");
        assert_eq!(json["taskId"], "t");
    }

    #[test]
    fn truncate_bytes_respects_boundaries() {
        let s = "日本語".repeat(2000);
        let t = truncate_bytes(&s, 4096);
        assert!(t.len() <= 4096);
        assert!(t.ends_with('…'));
        assert_eq!(truncate_bytes("abc", 4096), "abc");
    }

    #[test]
    fn poll_response_forms() {
        let none: PollResponse = serde_json::from_str("{}").unwrap();
        assert!(none.task_object.is_none());
        let null: PollResponse = serde_json::from_str(r#"{"taskObject":null}"#).unwrap();
        assert!(null.task_object.is_none());
        let some: PollResponse = serde_json::from_str(
            r#"{"taskObject":{"taskId":"t1","pipelineId":"df-1","attemptId":"@a_Attempt=1",
                "objects":{"@a_Attempt=1":{"id":"@a_Attempt=1","name":"a","fields":[
                  {"key":"scriptArgument","stringValue":"1"},{"key":"scriptArgument","stringValue":"2"},
                  {"key":"input","refValue":"In"}]}}}}"#,
        )
        .unwrap();
        let t = some.task_object.unwrap();
        let o = &t.objects["@a_Attempt=1"];
        assert_eq!(o.get_all("scriptArgument").collect::<Vec<_>>(), vec!["1", "2"]);
        assert_eq!(o.get_ref("input"), Some("In"));
    }

    #[test]
    fn signing_adds_authorization_and_token() {
        let ep = url::Url::parse("http://127.0.0.1:8080/").unwrap();
        let creds = Credentials::new("AKIDEXAMPLE", "secret", Some("TOKEN".into()), None, "test");
        let h = sign_headers(
            &ep,
            "us-east-1",
            &creds,
            "DataPipeline.PollForTask",
            b"{}",
            SystemTime::now(),
        )
        .unwrap();
        let get = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let auth = get("authorization").unwrap();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
            "{auth}"
        );
        assert!(auth.contains("/us-east-1/datapipeline/aws4_request"), "{auth}");
        assert!(
            auth.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target"),
            "{auth}"
        );
        assert!(!auth.contains("secret"));
        assert_eq!(get("x-amz-security-token").as_deref(), Some("TOKEN"));
        assert!(get("x-amz-date").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_allows_a_burst_then_spaces_calls() {
        let l = RateLimiter::default();
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            l.acquire("PollForTask").await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        for _ in 0..4 {
            l.acquire("PollForTask").await;
        }
        // 4 more at 2/s.
        let e = start.elapsed();
        assert!(
            e >= Duration::from_millis(1990) && e <= Duration::from_millis(2010),
            "{e:?}"
        );
    }
}
