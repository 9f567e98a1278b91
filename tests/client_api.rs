//! Integration tests of the outbound clients over real HTTP on 127.0.0.1:
//! - `HttpPipelineApi` against an axum server of this test that VERIFIES each SigV4 signature with
//!   an independent implementation (hmac + sha2), and scripts answers and failures;
//! - `retry::run` over real HTTP; per-call deadlines;
//! - IMDS identity against a tiny local metadata server (token, document, signature, caching);
//! - a real forwarding proxy (CONNECT and absolute-URI, basic auth, counting requests) that both
//!   the Data Pipeline client and the S3 client (against moto's S3 server) must go through.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;
use taskrunner::api::imds::Imds;
use taskrunner::api::{ApiErrorKind, HttpPipelineApi, PipelineApi, PollRequest, StatusReport};
use taskrunner::config::ProxySettings;
use taskrunner::credentials::{CredentialSource, Secret, StaticKeys};
use taskrunner::model::{Field, TaskStatus};
use taskrunner::net::NetSettings;
use taskrunner::retry::{self, Jitter, RetryPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const AKID: &str = "AKIDTESTCLIENT";
const SECRET: &str = "client-test-secret-key-0123456789";

/// Clients read HTTP(S)_PROXY when no proxy is configured, and aws-config reads profile files:
/// make the process hermetic once, before any client exists.
fn hermetic_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for v in [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            std::env::remove_var(v);
        }
        std::env::set_var("NO_PROXY", "*");
        std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/taskrunner-test");
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/taskrunner-test");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    });
}

fn keys(token: Option<&str>, secret: &str) -> CredentialSource {
    CredentialSource::File {
        path: "/tmp/credentials.json".into(),
        keys: StaticKeys {
            access_key_id: AKID.into(),
            secret_access_key: Secret::new(secret),
            session_token: token.map(Secret::new),
        },
    }
}

fn net(endpoint: &str, proxy: Option<ProxySettings>, creds: CredentialSource) -> NetSettings {
    NetSettings {
        region: "us-east-1".into(),
        endpoint: endpoint.into(),
        proxy,
        ca_bundle: None,
        s3_endpoint: None,
        s3_no_proxy: false,
        credentials: creds,
    }
}

// ---------------------------------------------------------------------------------------------
// An independent SigV4 verifier (not aws-sigv4: the point is to check the client's output).

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

/// `Ok(signed header names)` or why the signature is wrong.
fn verify_sigv4(headers: &HeaderMap, body: &[u8], secret: &str) -> Result<Vec<String>, String> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let auth = h("authorization").ok_or("no authorization header")?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not AWS4-HMAC-SHA256")?;
    let mut parts = HashMap::new();
    for p in rest.split(", ") {
        let (k, v) = p.split_once('=').ok_or("bad authorization part")?;
        parts.insert(k.to_string(), v.to_string());
    }
    let cred = &parts["Credential"];
    let scope: Vec<&str> = cred.split('/').collect();
    if scope.len() != 5 || scope[0] != AKID || scope[2] != "us-east-1" || scope[3] != "datapipeline" {
        return Err(format!("bad credential scope {cred}"));
    }
    let signed: Vec<String> = parts["SignedHeaders"].split(';').map(str::to_string).collect();
    let amz_date = h("x-amz-date").ok_or("no x-amz-date")?;
    let mut canonical = String::from("POST\n/\n\n");
    for name in &signed {
        let v = h(name).ok_or(format!("signed header {name} missing"))?;
        canonical.push_str(&format!("{name}:{}\n", v.trim()));
    }
    canonical.push('\n');
    canonical.push_str(&signed.join(";"));
    canonical.push('\n');
    canonical.push_str(&hex::encode(Sha256::digest(body)));
    let sts = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{}/us-east-1/datapipeline/aws4_request\n{}",
        scope[1],
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let k = hmac(format!("AWS4{secret}").as_bytes(), scope[1].as_bytes());
    let k = hmac(&k, b"us-east-1");
    let k = hmac(&k, b"datapipeline");
    let k = hmac(&k, b"aws4_request");
    let sig = hex::encode(hmac(&k, sts.as_bytes()));
    if sig != parts["Signature"] {
        return Err("signature mismatch".into());
    }
    Ok(signed)
}

// ---------------------------------------------------------------------------------------------
// A scripted Data Pipeline endpoint.

#[derive(Clone, Debug)]
struct Recorded {
    op: String,
    body: serde_json::Value,
    signed: Vec<String>,
    token: Option<String>,
    content_type: Option<String>,
}

#[derive(Default)]
struct Endpoint {
    requests: Mutex<Vec<Recorded>>,
    /// Scripted answers per operation, used before the defaults.
    script: Mutex<HashMap<String, VecDeque<(u16, String)>>>,
    /// Seconds to hold a PollForTask before answering.
    poll_delay: Mutex<Duration>,
}

impl Endpoint {
    fn push(&self, op: &str, status: u16, body: &str) {
        self.script
            .lock()
            .unwrap()
            .entry(op.into())
            .or_default()
            .push_back((status, body.into()));
    }
    fn ops(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.op.clone())
            .collect()
    }
}

async fn endpoint_handler(
    State(st): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let op = target.strip_prefix("DataPipeline.").unwrap_or("").to_string();
    let signed =
        match verify_sigv4(&headers, &body, SECRET) {
            Ok(s) => s,
            Err(why) => return (
                StatusCode::FORBIDDEN,
                format!(
                    r#"{{"__type":"com.amazon.coral.service#InvalidSignatureException","message":"{why}"}}"#
                ),
            )
                .into_response(),
        };
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    st.requests.lock().unwrap().push(Recorded {
        op: op.clone(),
        body: json.clone(),
        signed,
        token: headers
            .get("x-amz-security-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
    if op == "PollForTask" {
        let d = *st.poll_delay.lock().unwrap();
        tokio::time::sleep(d).await;
    }
    let scripted = st.script.lock().unwrap().get_mut(&op).and_then(|q| q.pop_front());
    let (status, text) = scripted.unwrap_or_else(|| match op.as_str() {
        "PollForTask" => (200, "{}".into()),
        "ReportTaskProgress" => (200, r#"{"canceled":false}"#.into()),
        "ReportTaskRunnerHeartbeat" => (200, r#"{"terminate":false}"#.into()),
        "SetTaskStatus" => (200, String::new()),
        "DescribeObjects" => {
            let ids: Vec<String> = json["objectIds"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            let objs: Vec<_> = ids
                .iter()
                .map(|id| serde_json::json!({"id": id, "name": id, "fields": [{"key":"type","stringValue":"S3DataNode"}]}))
                .collect();
            (200, serde_json::json!({"pipelineObjects": objs, "hasMoreResults": false}).to_string())
        }
        _ => (400, r#"{"__type":"UnknownOperationException"}"#.into()),
    });
    let mut resp = (StatusCode::from_u16(status).unwrap(), text).into_response();
    resp.headers_mut()
        .insert("content-type", "application/x-amz-json-1.1".parse().unwrap());
    resp
}

async fn start_endpoint() -> (String, Arc<Endpoint>) {
    let st = Arc::new(Endpoint::default());
    let app = Router::new()
        .route("/", post(endpoint_handler))
        .with_state(st.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), st)
}

async fn api_for(endpoint: &str, creds: CredentialSource) -> HttpPipelineApi {
    hermetic_env();
    HttpPipelineApi::from_settings(&net(endpoint, None, creds))
        .await
        .unwrap()
}

fn poll_req() -> PollRequest {
    PollRequest {
        worker_group: "wg-client".into(),
        hostname: "host.example".into(),
        instance_identity: None,
    }
}

const TASK: &str = r#"{"taskObject":{"taskId":"task-1","pipelineId":"df-CLIENT","attemptId":"@A_2026-11-30T00:00:00_Attempt=1",
  "objects":{"@A_2026-11-30T00:00:00_Attempt=1":{"id":"@A_2026-11-30T00:00:00_Attempt=1","name":"A","fields":[
    {"key":"type","stringValue":"ShellCommandActivity"},{"key":"command","stringValue":"echo $1 $2"},
    {"key":"scriptArgument","stringValue":"first"},{"key":"scriptArgument","stringValue":"second"},
    {"key":"input","refValue":"In"}]}}}}"#;

#[tokio::test]
async fn signed_calls_round_trip() {
    let (url, ep) = start_endpoint().await;
    let api = api_for(&url, keys(Some("SESSION-TOKEN"), SECRET)).await;

    ep.push("PollForTask", 200, "{}");
    ep.push("PollForTask", 200, r#"{"taskObject":null}"#);
    ep.push("PollForTask", 200, TASK);
    assert!(api.poll_for_task(&poll_req()).await.unwrap().is_none());
    assert!(api.poll_for_task(&poll_req()).await.unwrap().is_none());
    let task = api.poll_for_task(&poll_req()).await.unwrap().expect("a task");
    assert_eq!(task.task_id, "task-1");
    let attempt = &task.objects["@A_2026-11-30T00:00:00_Attempt=1"];
    assert_eq!(
        attempt.get_all("scriptArgument").collect::<Vec<_>>(),
        ["first", "second"]
    );

    ep.push("ReportTaskProgress", 200, r#"{"canceled":true}"#);
    assert!(api
        .report_task_progress("task-1", &[Field::string("progress", "1")])
        .await
        .unwrap());
    assert!(!api.report_task_progress("task-1", &[]).await.unwrap());

    api.set_task_status(&StatusReport {
        task_id: "task-1".into(),
        status: TaskStatus::Failed,
        error_id: Some("Service_Crash".into()),
        error_message: Some("exit status 3".into()),
        error_stack_trace: Some("ü".repeat(5000)),
    })
    .await
    .unwrap();

    ep.push("ReportTaskRunnerHeartbeat", 200, r#"{"terminate":true}"#);
    assert!(api
        .report_task_runner_heartbeat("tr-1", "wg-client", "host.example")
        .await
        .unwrap());

    let ids: Vec<String> = (0..30).map(|i| format!("Obj{i}")).collect();
    let objs = api.describe_objects("df-CLIENT", &ids).await.unwrap();
    assert_eq!(objs.len(), 30);

    let reqs = ep.requests.lock().unwrap().clone();
    assert_eq!(
        ep.ops(),
        [
            "PollForTask",
            "PollForTask",
            "PollForTask",
            "ReportTaskProgress",
            "ReportTaskProgress",
            "SetTaskStatus",
            "ReportTaskRunnerHeartbeat",
            "DescribeObjects",
            "DescribeObjects"
        ]
    );
    for r in &reqs {
        assert_eq!(r.content_type.as_deref(), Some("application/x-amz-json-1.1"));
        assert_eq!(r.token.as_deref(), Some("SESSION-TOKEN"));
        for h in [
            "content-type",
            "host",
            "x-amz-date",
            "x-amz-target",
            "x-amz-security-token",
        ] {
            assert!(
                r.signed.iter().any(|s| s == h),
                "{} not signed in {:?}",
                h,
                r.signed
            );
        }
    }
    assert_eq!(reqs[0].body["workerGroup"], "wg-client");
    assert_eq!(reqs[0].body["hostname"], "host.example");
    assert!(reqs[0].body.get("instanceIdentity").is_none());
    assert_eq!(reqs[3].body["fields"][0]["key"], "progress");
    let st = &reqs[5].body;
    assert_eq!(st["taskStatus"], "FAILED");
    assert_eq!(st["errorId"], "Runner_Service_Crash");
    assert!(st["errorStackTrace"].as_str().unwrap().chars().count() <= 1024);
    assert_eq!(reqs[6].body["taskrunnerId"], "tr-1");
    // 30 ids: batches of 25 and 5, expressions evaluated.
    assert_eq!(reqs[7].body["objectIds"].as_array().unwrap().len(), 25);
    assert_eq!(reqs[8].body["objectIds"].as_array().unwrap().len(), 5);
    assert_eq!(reqs[7].body["evaluateExpressions"], true);
}

#[tokio::test]
async fn a_wrong_secret_is_refused_and_never_echoed() {
    let (url, ep) = start_endpoint().await;
    let api = api_for(&url, keys(None, "not-the-right-secret-000")).await;
    let e = api.poll_for_task(&poll_req()).await.unwrap_err();
    assert_eq!(
        e.kind,
        ApiErrorKind::Client {
            status: 403,
            code: "InvalidSignatureException".into()
        }
    );
    assert!(!e.is_retryable());
    assert!(!e.to_string().contains("not-the-right-secret"), "{e}");
    assert!(ep.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn errors_are_classified_over_http() {
    let (url, ep) = start_endpoint().await;
    let api = api_for(&url, keys(None, SECRET)).await;
    ep.push("PollForTask", 503, "<html>busy</html>");
    ep.push(
        "PollForTask",
        400,
        r#"{"__type":"com.amazon.coral.availability#ThrottlingException","message":"Rate exceeded"}"#,
    );
    ep.push(
        "SetTaskStatus",
        400,
        r#"{"__type":"com.amazon.setl.webservice#TaskNotFoundException","message":"no such task"}"#,
    );
    ep.push(
        "ReportTaskProgress",
        400,
        r#"{"__type":"PipelineDeletedException"}"#,
    );
    assert_eq!(
        api.poll_for_task(&poll_req()).await.unwrap_err().kind,
        ApiErrorKind::Server(503)
    );
    assert_eq!(
        api.poll_for_task(&poll_req()).await.unwrap_err().kind,
        ApiErrorKind::Throttled
    );
    let e = api
        .set_task_status(&StatusReport {
            task_id: "gone".into(),
            status: TaskStatus::Finished,
            error_id: None,
            error_message: None,
            error_stack_trace: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind, ApiErrorKind::TaskNotFound);
    assert!(e.message.contains("no such task"), "{e}");
    assert_eq!(
        api.report_task_progress("t", &[]).await.unwrap_err().kind,
        ApiErrorKind::PipelineGone
    );

    // Nothing listens: a transport error, retryable.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let api = api_for(&dead, keys(None, SECRET)).await;
    let e = api.poll_for_task(&poll_req()).await.unwrap_err();
    assert_eq!(e.kind, ApiErrorKind::Transport, "{e}");
    assert!(e.is_retryable());
}

#[tokio::test]
async fn retry_run_recovers_from_an_outage_and_reports_backoffs() {
    let (url, ep) = start_endpoint().await;
    let api = api_for(&url, keys(None, SECRET)).await.without_rate_limit();
    ep.push("SetTaskStatus", 500, r#"{"__type":"InternalServiceError"}"#);
    ep.push("SetTaskStatus", 400, r#"{"__type":"ThrottlingException"}"#);
    let policy = RetryPolicy {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        multiplier: 2.0,
        jitter: Jitter::Full,
        max_attempts: None,
    };
    let backoffs = Mutex::new(Vec::new());
    let report = StatusReport {
        task_id: "t1".into(),
        status: TaskStatus::Finished,
        error_id: None,
        error_message: None,
        error_stack_trace: None,
    };
    retry::run(
        &policy,
        "SetTaskStatus",
        || api.set_task_status(&report),
        |b| backoffs.lock().unwrap().push(b.clone()),
    )
    .await
    .unwrap();
    let b = backoffs.into_inner().unwrap();
    assert_eq!(b.len(), 2);
    assert!(b[0].error.contains("InternalServiceError"), "{}", b[0].error);
    assert!(b[1].error.contains("Throttl"), "{}", b[1].error);
    assert_eq!(ep.ops().len(), 3);

    // A bounded policy against a dead endpoint says how many tries were made.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let api = api_for(&dead, keys(None, SECRET)).await.without_rate_limit();
    let req = poll_req();
    let e = retry::run(
        &policy.with_max_attempts(3),
        "PollForTask",
        || api.poll_for_task(&req),
        |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(e.tries, 3);
    assert!(e.to_string().contains("gave up after 3 tries"), "{e}");
}

#[tokio::test]
async fn a_hung_poll_ends_at_the_deadline() {
    let (url, ep) = start_endpoint().await;
    *ep.poll_delay.lock().unwrap() = Duration::from_secs(30);
    let api = api_for(&url, keys(None, SECRET))
        .await
        .with_timeouts(Duration::from_secs(1), Duration::from_secs(1));
    let started = std::time::Instant::now();
    let e = api.poll_for_task(&poll_req()).await.unwrap_err();
    assert_eq!(e.kind, ApiErrorKind::Transport);
    assert!(e.message.contains("no answer within 1 s"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

// ---------------------------------------------------------------------------------------------
// IMDS

#[derive(Default)]
struct Metadata {
    token_puts: Mutex<u32>,
    gets: Mutex<Vec<String>>,
}

async fn start_metadata() -> (String, Arc<Metadata>) {
    let st = Arc::new(Metadata::default());
    async fn token(State(st): State<Arc<Metadata>>, h: HeaderMap) -> Response {
        *st.token_puts.lock().unwrap() += 1;
        if h.get("x-aws-ec2-metadata-token-ttl-seconds").is_none() {
            return StatusCode::BAD_REQUEST.into_response();
        }
        "TOKEN-123".into_response()
    }
    async fn doc(State(st): State<Arc<Metadata>>, h: HeaderMap) -> Response {
        if h.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()) != Some("TOKEN-123") {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        st.gets.lock().unwrap().push("document".into());
        r#"{"instanceId":"i-0123456789abcdef0","region":"us-east-1"}"#.into_response()
    }
    async fn sig(State(st): State<Arc<Metadata>>, h: HeaderMap) -> Response {
        if h.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()) != Some("TOKEN-123") {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        st.gets.lock().unwrap().push("signature".into());
        "SIGNATURE==\n".into_response()
    }
    let app = Router::new()
        .route("/latest/api/token", put(token))
        .route("/latest/dynamic/instance-identity/document", get(doc))
        .route("/latest/dynamic/instance-identity/signature", get(sig))
        .with_state(st.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), st)
}

#[tokio::test]
async fn imds_identity_is_fetched_once_and_sent_with_the_poll() {
    hermetic_env();
    let (md_url, md) = start_metadata().await;
    let imds = Imds::new(Some(format!("{md_url}/")), false);
    let id = imds.instance_identity().await.expect("identity");
    assert!(id.document.contains("i-0123456789abcdef0"));
    assert_eq!(id.signature, "SIGNATURE==");
    assert_eq!(imds.instance_identity().await, Some(id.clone()));
    assert_eq!(*md.token_puts.lock().unwrap(), 1, "cached after the first answer");
    assert_eq!(md.gets.lock().unwrap().len(), 2);

    let (url, ep) = start_endpoint().await;
    let api = api_for(&url, keys(None, SECRET)).await;
    let mut req = poll_req();
    req.instance_identity = Some(id);
    api.poll_for_task(&req).await.unwrap();
    let body = ep.requests.lock().unwrap()[0].body.clone();
    assert_eq!(body["instanceIdentity"]["signature"], "SIGNATURE==");
    assert!(body["instanceIdentity"]["document"]
        .as_str()
        .unwrap()
        .contains("i-0123"));
}

#[tokio::test]
async fn imds_absent_or_disabled_is_cached_as_none() {
    hermetic_env();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let imds = Imds::new(Some(dead), false);
    assert_eq!(imds.instance_identity().await, None);
    let t = std::time::Instant::now();
    assert_eq!(imds.instance_identity().await, None);
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "negative answer is cached"
    );

    let (md_url, md) = start_metadata().await;
    let imds = Imds::new(Some(md_url), true);
    assert_eq!(imds.instance_identity().await, None);
    assert_eq!(*md.token_puts.lock().unwrap(), 0, "disabled: no request at all");
}

// ---------------------------------------------------------------------------------------------
// A forwarding proxy with basic auth that counts what it forwards, per target.

#[derive(Default)]
struct ProxyStats {
    /// host:port -> requests forwarded
    forwarded: HashMap<String, u32>,
    denied: u32,
}

async fn start_proxy(user: &str, pass: &str) -> (String, Arc<Mutex<ProxyStats>>) {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    );
    let stats = Arc::new(Mutex::new(ProxyStats::default()));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let st = stats.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else { return };
            let (st, expected) = (st.clone(), expected.clone());
            tokio::spawn(async move {
                let _ = proxy_conn(sock, &expected, &st).await;
            });
        }
    });
    (format!("http://{addr}"), stats)
}

/// One request per connection: the forwarded request says `Connection: close`, so the client
/// opens a new connection (and the proxy counts) for every request.
async fn proxy_conn(mut client: TcpStream, expected: &str, st: &Mutex<ProxyStats>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let rest = buf[head_end..].to_vec();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut it = request_line.split(' ');
    let (method, target, version) = (
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
    );
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let auth_ok = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("proxy-authorization") && v == expected);
    if !auth_ok {
        st.lock().unwrap().denied += 1;
        client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    }
    if method == "CONNECT" {
        let mut origin = TcpStream::connect(target).await?;
        *st.lock()
            .unwrap()
            .forwarded
            .entry(target.to_string())
            .or_default() += 1;
        client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await?;
        origin.write_all(&rest).await?;
        tokio::io::copy_bidirectional(&mut client, &mut origin).await?;
        return Ok(());
    }
    let url = url::Url::parse(target).map_err(|e| std::io::Error::other(e.to_string()))?;
    let hostport = format!(
        "{}:{}",
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(80)
    );
    let mut path = url.path().to_string();
    if let Some(q) = url.query() {
        path = format!("{path}?{q}");
    }
    let mut out = format!("{method} {path} {version}\r\n");
    for (k, v) in &headers {
        let lk = k.to_ascii_lowercase();
        if lk == "proxy-authorization" || lk == "proxy-connection" || lk == "connection" || lk == "keep-alive"
        {
            continue;
        }
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    let origin = TcpStream::connect(&hostport).await?;
    *st.lock().unwrap().forwarded.entry(hostport).or_default() += 1;
    let (mut or, mut ow) = origin.into_split();
    let (mut cr, mut cw) = client.into_split();
    ow.write_all(out.as_bytes()).await?;
    ow.write_all(&rest).await?;
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cr, &mut ow).await;
    });
    // The origin closes after its answer (Connection: close); then this exchange is over.
    let _ = tokio::io::copy(&mut or, &mut cw).await;
    let _ = cw.shutdown().await;
    up.abort();
    Ok(())
}

/// moto's S3 server on a free port, killed on drop.
struct Moto {
    child: std::process::Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto() -> Moto {
    use std::io::BufRead;
    let mut child = std::process::Command::new("python3")
        .args(["-m", "moto.server", "-p", "0", "-H", "127.0.0.1"])
        .env("NO_PROXY", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 -m moto.server (moto[server] must be installed)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent {
                if let Some(i) = line.find("http://127.0.0.1:") {
                    let _ = tx.send(line[i..].trim().to_string());
                    sent = true;
                }
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("moto printed its address");
    Moto { child, url }
}

#[tokio::test]
async fn the_data_pipeline_and_s3_clients_both_go_through_the_proxy() {
    hermetic_env();
    let moto = tokio::task::spawn_blocking(start_moto).await.unwrap();
    let (dp_url, ep) = start_endpoint().await;
    let (proxy_url, stats) = start_proxy("proxyuser", "proxy-pass-word").await;
    let proxy = |pw: &str, no_proxy: Option<&str>| ProxySettings {
        url: proxy_url.clone(),
        username: Some("proxyuser".into()),
        password: Some(Secret::new(pw)),
        no_proxy: no_proxy.map(str::to_string),
    };
    let with = |p: ProxySettings| {
        let mut n = net(&dp_url, Some(p), keys(None, SECRET));
        n.s3_endpoint = Some(moto.url.clone());
        n
    };

    // 1. Through the proxy, with the right password: both clients work, and the proxy saw both.
    let ns = with(proxy("proxy-pass-word", None));
    let api = HttpPipelineApi::from_settings(&ns).await.unwrap();
    ep.push("PollForTask", 200, TASK);
    assert!(api.poll_for_task(&poll_req()).await.unwrap().is_some());
    api.report_task_runner_heartbeat("tr", "wg-client", "h")
        .await
        .unwrap();
    let s3 = taskrunner::net::s3_client(&ns).await.unwrap();
    s3.create_bucket().bucket("proxied").send().await.unwrap();
    s3.put_object()
        .bucket("proxied")
        .key("hello.txt")
        .body(aws_sdk_s3::primitives::ByteStream::from_static(
            b"hello through the proxy",
        ))
        .send()
        .await
        .unwrap();
    let got = s3
        .get_object()
        .bucket("proxied")
        .key("hello.txt")
        .send()
        .await
        .unwrap();
    let bytes = got.body.collect().await.unwrap().into_bytes();
    assert_eq!(&bytes[..], b"hello through the proxy");

    let dp_host = dp_url.trim_start_matches("http://").to_string();
    let s3_host = moto
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    {
        let s = stats.lock().unwrap();
        assert_eq!(
            s.forwarded.get(&dp_host).copied().unwrap_or(0),
            2,
            "{:?}",
            s.forwarded
        );
        assert!(
            s.forwarded.get(&s3_host).copied().unwrap_or(0) >= 3,
            "{:?}",
            s.forwarded
        );
        assert_eq!(s.denied, 0);
    }
    assert_eq!(ep.ops(), ["PollForTask", "ReportTaskRunnerHeartbeat"]);

    // 2. A wrong proxy password: the proxy refuses (407) both clients; the password is not echoed.
    let ns = with(proxy("wrong-password-xyz", None));
    let api = HttpPipelineApi::from_settings(&ns).await.unwrap();
    let e = api.poll_for_task(&poll_req()).await.unwrap_err();
    assert!(matches!(e.kind, ApiErrorKind::Client { status: 407, .. }), "{e}");
    assert!(!e.to_string().contains("wrong-password-xyz"), "{e}");
    let s3 = taskrunner::net::s3_client(&ns).await.unwrap();
    assert!(s3.list_buckets().send().await.is_err());
    assert!(stats.lock().unwrap().denied >= 2);

    // 3. no_proxy: both clients bypass the proxy for the listed hosts.
    let before = stats.lock().unwrap().forwarded.values().sum::<u32>();
    let ns = with(proxy("proxy-pass-word", Some("127.0.0.1")));
    let api = HttpPipelineApi::from_settings(&ns).await.unwrap();
    api.poll_for_task(&poll_req()).await.unwrap();
    let s3 = taskrunner::net::s3_client(&ns).await.unwrap();
    s3.list_buckets().send().await.unwrap();
    assert_eq!(stats.lock().unwrap().forwarded.values().sum::<u32>(), before);
}
