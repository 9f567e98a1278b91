//! The HTTP surface of the real `datapipeline-local` binary: SigV4 (signed by `aws-sigv4`: good,
//! wrong secret, changed body, stale date), a table of malformed requests that each get the
//! right error while the server stays up, response headers, and the awscli/boto3 suite in
//! `tests/py/` (run with `python3 -m pytest`).

mod local_support;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use local_support::*;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime};

struct Raw {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

/// Signs `signed_body` for `target` at `at`, then sends `sent_body` (to simulate tampering).
async fn send(
    url: &str,
    target: &str,
    secret: &str,
    signed_body: &[u8],
    sent_body: Vec<u8>,
    at: SystemTime,
) -> Raw {
    let identity = Credentials::new(AK, secret, None, None, "test").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("datapipeline")
        .time(at)
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let headers = [
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", target),
    ];
    let req = SignableRequest::new(
        "POST",
        format!("{url}/"),
        headers.iter().copied(),
        SignableBody::Bytes(signed_body),
    )
    .unwrap();
    let (instructions, _) = sign(req, &params).unwrap().into_parts();
    taskrunner::net::install_crypto_provider();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut rb = client.post(format!("{url}/")).body(sent_body);
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    for (k, v) in instructions.headers() {
        rb = rb.header(k, v);
    }
    let resp = rb.send().await.expect("the server answers");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    let crc: u32 = headers["x-amz-crc32"].to_str().unwrap().parse().unwrap();
    assert_eq!(crc, crc32fast::hash(&bytes), "x-amz-crc32 matches the body");
    assert!(headers.contains_key("x-amzn-requestid"));
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Raw {
        status,
        headers,
        body,
    }
}

async fn good(url: &str, target: &str, body: &[u8]) -> Raw {
    send(url, target, SK, body, body.to_vec(), SystemTime::now()).await
}

fn code(r: &Raw) -> &str {
    r.body["__type"]
        .as_str()
        .unwrap_or("")
        .rsplit('#')
        .next()
        .unwrap_or("")
}

#[tokio::test]
async fn sigv4_good_wrong_secret_changed_body_stale_date() {
    let s = start(&[]);
    let t = "DataPipeline.ListPipelines";
    let r = good(&s.url, t, b"{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/x-amz-json-1.1");
    assert_eq!(r.body["pipelineIdList"], json!([]));

    let r = send(
        &s.url,
        t,
        "not-the-secret",
        b"{}",
        b"{}".to_vec(),
        SystemTime::now(),
    )
    .await;
    assert_eq!(
        (r.status, code(&r)),
        (400, "InvalidSignatureException"),
        "{}",
        r.body
    );

    let r = send(
        &s.url,
        t,
        SK,
        b"{}",
        b"{\"marker\":\"x\"}".to_vec(),
        SystemTime::now(),
    )
    .await;
    assert_eq!(
        (r.status, code(&r)),
        (400, "InvalidSignatureException"),
        "{}",
        r.body
    );

    let stale = SystemTime::now() - Duration::from_secs(20 * 60);
    let r = send(&s.url, t, SK, b"{}", b"{}".to_vec(), stale).await;
    assert_eq!(
        (r.status, code(&r)),
        (400, "InvalidSignatureException"),
        "{}",
        r.body
    );
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .starts_with("Signature expired:"),
        "{}",
        r.body
    );

    let c = s.client_with("AKIDNOBODY", SK);
    let e = c.call("ListPipelines", &json!({})).await.unwrap_err();
    assert!(e.to_string().contains("UnrecognizedClientException"), "{e}");

    taskrunner::net::install_crypto_provider();
    let unsigned = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/", s.url))
        .header("x-amz-target", t)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status().as_u16(), 403);
}

#[tokio::test]
async fn malformed_requests_get_clear_errors_and_the_server_stays_up() {
    let s = start(&[]);
    let long = "n".repeat(1025);
    let create_long = json!({"name": long, "uniqueId": "u"}).to_string();
    let big = vec![b' '; 10 * 1024 * 1024];
    let table: Vec<(&str, &str, Vec<u8>, u16, &str, &str)> = vec![
        ("broken JSON", "DataPipeline.CreatePipeline", b"{\"name\": ".to_vec(), 400, "SerializationException", "JSON"),
        ("not an object", "DataPipeline.ListPipelines", b"[1, 2]".to_vec(), 400, "InvalidRequestException", "object"),
        ("missing member", "DataPipeline.CreatePipeline", br#"{"name": "x"}"#.to_vec(), 400, "InvalidRequestException", "uniqueId"),
        ("too-long string", "DataPipeline.CreatePipeline", create_long.into_bytes(), 400, "InvalidRequestException", "name"),
        ("wrong enum", "DataPipeline.SetTaskStatus", br#"{"taskId": "t", "taskStatus": "DONE"}"#.to_vec(), 400, "InvalidRequestException", "taskStatus"),
        ("wrong type", "DataPipeline.PollForTask", br#"{"workerGroup": 5}"#.to_vec(), 400, "InvalidRequestException", "workerGroup"),
        ("too many tags", "DataPipeline.CreatePipeline",
            json!({"name": "x", "uniqueId": "u", "tags": (0..11).map(|i| json!({"key": format!("k{i}"), "value": "v"})).collect::<Vec<_>>()}).to_string().into_bytes(),
            400, "InvalidRequestException", "tags"),
        ("unknown target", "DataPipeline.Frobnicate", b"{}".to_vec(), 400, "UnknownOperationException", "Frobnicate"),
        ("no service prefix", "ListPipelines", b"{}".to_vec(), 400, "UnknownOperationException", "ListPipelines"),
        ("10 MB body", "DataPipeline.ListPipelines", big, 413, "InvalidRequestException", "too large"),
        ("unknown pipeline", "DataPipeline.DescribePipelines", br#"{"pipelineIds": ["df-NOPE"]}"#.to_vec(), 400, "PipelineNotFoundException", "df-NOPE"),
        ("unknown task", "DataPipeline.ReportTaskProgress", br#"{"taskId": "nope"}"#.to_vec(), 400, "TaskNotFoundException", "nope"),
    ];
    for (what, target, body, status, want, mention) in table {
        let r = good(&s.url, target, &body).await;
        assert_eq!((r.status, code(&r)), (status, want), "{what}: {}", r.body);
        let msg = r.body["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(mention),
            "{what}: message {msg:?} should mention {mention:?}"
        );
        // Still up.
        let ok = good(&s.url, "DataPipeline.ListPipelines", b"{}").await;
        assert_eq!(ok.status, 200, "after {what}");
    }
    // The stale target prefix of the Developer Guide's wire page is accepted too.
    let r = good(&s.url, "DataPipeline_20121129.ListPipelines", b"{}").await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test]
async fn put_pipeline_definition_refuses_empty_values_and_reports_errors() {
    let s = start(&[]);
    let c = s.client();
    let id = c
        .call("CreatePipeline", &json!({"name": "v", "uniqueId": "v"}))
        .await
        .unwrap()["pipelineId"]
        .clone();
    let e = c
        .call(
            "PutPipelineDefinition",
            &json!({"pipelineId": id, "pipelineObjects": [{"id": "A", "name": "A", "fields": [
                {"key": "workerGroup", "stringValue": ""}]}]}),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("InvalidRequestException"), "{e}");
    let out = c
        .call(
            "PutPipelineDefinition",
            &json!({"pipelineId": id, "pipelineObjects": [
                {"id": "Default", "name": "Default", "fields": [{"key": "scheduleType", "stringValue": "cron"}]},
                {"id": "A", "name": "A", "fields": [{"key": "type", "stringValue": "ShellCommandActivity"},
                    {"key": "command", "stringValue": "true"}, {"key": "workerGroup", "stringValue": "wg"}]}]}),
        )
        .await
        .unwrap();
    assert_eq!(out["errored"], true, "{out}");
    assert_eq!(out["validationErrors"][0]["id"], "A", "{out}");
    let e = c
        .call("ActivatePipeline", &json!({"pipelineId": id}))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no definition"), "{e}");
}

#[test]
fn awscli_and_boto3_suite() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/py"])
        .current_dir(root)
        .env("DATAPIPELINE_LOCAL_BIN", env!("CARGO_BIN_EXE_datapipeline-local"))
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env("NO_PROXY", "*")
        .output()
        .expect("python3 must be installed (with pytest, boto3 and awscli)");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest tests/py failed:\n{text}");
}
