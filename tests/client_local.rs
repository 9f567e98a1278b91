//! `HttpPipelineApi` against the real `datapipeline-local` binary (real HTTP, real SigV4 checked
//! by the server): the four task-runner calls plus DescribeObjects, the empty long poll, a task
//! the service no longer knows, and a wrong secret.

mod local_support;

use local_support::{create_active, ondemand_definition, start, AK, SK};
use std::time::Duration;
use taskrunner::api::{ApiErrorKind, HttpPipelineApi, PipelineApi, PollRequest, StatusReport};
use taskrunner::credentials::{CredentialSource, Secret, StaticKeys};
use taskrunner::model::{Field, TaskStatus};
use taskrunner::net::NetSettings;

fn net(endpoint: &str, secret: &str) -> NetSettings {
    // Only the explicit settings decide the proxy; the spawned server and these calls are local.
    NetSettings {
        region: "us-east-1".into(),
        endpoint: endpoint.into(),
        proxy: Some(taskrunner::config::ProxySettings {
            url: "http://127.0.0.1:9".into(),
            username: None,
            password: None,
            no_proxy: Some("*".into()),
        }),
        ca_bundle: None,
        s3_endpoint: None,
        s3_no_proxy: false,
        credentials: CredentialSource::CommandLine(StaticKeys {
            access_key_id: AK.into(),
            secret_access_key: Secret::new(secret),
            session_token: None,
        }),
    }
}

fn poll(wg: &str) -> PollRequest {
    PollRequest {
        worker_group: wg.into(),
        hostname: "client-test".into(),
        instance_identity: None,
    }
}

#[tokio::test]
async fn the_runner_calls_work_against_datapipeline_local() {
    let server = start(&["--long-poll-seconds", "2"]);
    let admin = server.client();
    let pipeline = create_active(&admin, ondemand_definition(1, "wg-client-local")).await;
    let api = HttpPipelineApi::from_settings(&net(&server.url, SK))
        .await
        .unwrap();

    // An unknown worker group: the long poll ends empty.
    let started = std::time::Instant::now();
    assert!(api.poll_for_task(&poll("wg-nobody")).await.unwrap().is_none());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the server held the poll"
    );

    // The activity is handed out (the scheduler may need a moment after activation).
    let mut task = None;
    for _ in 0..30 {
        if let Some(t) = api.poll_for_task(&poll("wg-client-local")).await.unwrap() {
            task = Some(t);
            break;
        }
    }
    let task = task.expect("a task for wg-client-local");
    assert_eq!(task.pipeline_id, pipeline);
    let attempt = task
        .objects
        .values()
        .find(|o| o.get("type") == Some("ShellCommandActivity"))
        .expect("the attempt object carries the activity's fields");
    assert_eq!(attempt.get("command"), Some("echo 0"));

    assert!(!api
        .report_task_progress(&task.task_id, &[Field::string("note", "running")])
        .await
        .unwrap());
    assert!(!api
        .report_task_runner_heartbeat("tr-client-test", "wg-client-local", "client-test")
        .await
        .unwrap());
    let objs = api
        .describe_objects(&pipeline, &["Act0".to_string()])
        .await
        .unwrap();
    assert_eq!(objs.len(), 1);
    assert_eq!(objs[0].get("command"), Some("echo 0"));

    api.set_task_status(&StatusReport {
        task_id: task.task_id.clone(),
        status: TaskStatus::Finished,
        error_id: None,
        error_message: None,
        error_stack_trace: None,
    })
    .await
    .unwrap();

    // A task id the service never issued.
    let e = api
        .set_task_status(&StatusReport {
            task_id: "no-such-task".into(),
            status: TaskStatus::Failed,
            error_id: Some("Service_Nope".into()),
            error_message: Some("x".into()),
            error_stack_trace: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e.kind, ApiErrorKind::TaskNotFound | ApiErrorKind::Client { .. }),
        "{e}"
    );
    assert!(!e.is_retryable(), "{e}");
}

#[tokio::test]
async fn datapipeline_local_refuses_a_wrong_secret() {
    let server = start(&["--long-poll-seconds", "1"]);
    let api = HttpPipelineApi::from_settings(&net(&server.url, "wrong-secret-abc"))
        .await
        .unwrap();
    let e = api.poll_for_task(&poll("wg")).await.unwrap_err();
    assert!(
        matches!(
            e.kind,
            ApiErrorKind::Client {
                status: 400..=403,
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.is_retryable());
    assert!(!e.to_string().contains("wrong-secret-abc"), "{e}");
}
