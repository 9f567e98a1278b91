//! The task protocol of the real `datapipeline-local` binary over HTTP with SigV4: hand-out,
//! ack, progress, status, heartbeat terminate, cancel, ack timeout, exactly-once, restart.

mod local_support;

use local_support::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test]
async fn ondemand_task_is_handed_out_acked_and_finished() {
    let s = start(&["--long-poll-seconds", "5"]);
    let c = s.client();
    let pid = create_active(&c, ondemand_definition(1, "wg-12345")).await;
    // Another worker group sees nothing (after the long poll).
    let none = c
        .call("PollForTask", &json!({"workerGroup": "other", "hostname": "h"}))
        .await
        .unwrap();
    assert!(none.get("taskObject").is_none(), "{none}");
    let t = c
        .call(
            "PollForTask",
            &json!({"workerGroup": "wg-12345", "hostname": "h1"}),
        )
        .await
        .unwrap();
    let task = &t["taskObject"];
    assert_eq!(task["pipelineId"], json!(pid));
    let aid = task["attemptId"].as_str().unwrap();
    assert!(aid.starts_with("@Act0_") && aid.ends_with("_Attempt=1"), "{aid}");
    let attempt = &task["objects"][aid];
    let fields = attempt["fields"].as_array().unwrap();
    let get = |k: &str| fields.iter().find(|f| f["key"] == k).cloned();
    assert_eq!(get("command").unwrap()["stringValue"], "echo 0");
    assert_eq!(get("workerGroup").unwrap()["stringValue"], "wg-12345");
    assert_eq!(get("@componentParent").unwrap()["refValue"], "Act0");
    assert_eq!(get("@sphere").unwrap()["stringValue"], "ATTEMPT");
    let task_id = task["taskId"].as_str().unwrap();
    let p = c
        .call("ReportTaskProgress", &json!({"taskId": task_id}))
        .await
        .unwrap();
    assert_eq!(p, json!({"canceled": false}));
    c.call(
        "SetTaskStatus",
        &json!({"taskId": task_id, "taskStatus": "FINISHED"}),
    )
    .await
    .unwrap();
    let d = c
        .call("DescribeObjects", &json!({"pipelineId": pid, "objectIds": [aid]}))
        .await
        .unwrap();
    let f = d["pipelineObjects"][0]["fields"].as_array().unwrap().clone();
    assert!(
        f.iter()
            .any(|x| x["key"] == "@status" && x["stringValue"] == "FINISHED"),
        "{d}"
    );
    assert!(
        f.iter()
            .any(|x| x["key"] == "hostname" && x["stringValue"] == "h1"),
        "{d}"
    );
    // The pipeline is done; a second SetTaskStatus on the closed task is refused.
    let e = c
        .call(
            "SetTaskStatus",
            &json!({"taskId": task_id, "taskStatus": "FINISHED"}),
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("TaskNotFoundException"), "{e}");
    let out = taskrunner::local::client::runs(&c, &pid).await.unwrap();
    assert!(out.contains("FINISHED") && out.contains("Act0"), "{out}");
}

#[tokio::test]
async fn tasks_belong_to_the_key_that_created_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let other = write_credentials(dir.path(), "other.json", "AKIDOTHER", "other-secret");
    let other = other.to_str().unwrap().to_string();
    let s = start_in(dir, &["--long-poll-seconds", "2", "--credentials", &other]);
    create_active(&s.client(), ondemand_definition(1, "wg")).await;
    let c2 = s.client_with("AKIDOTHER", "other-secret");
    let r = c2
        .call("PollForTask", &json!({"workerGroup": "wg"}))
        .await
        .unwrap();
    assert!(r.get("taskObject").is_none(), "{r}");
    let r = s
        .client()
        .call("PollForTask", &json!({"workerGroup": "wg"}))
        .await
        .unwrap();
    assert!(r.get("taskObject").is_some(), "{r}");
}

#[tokio::test]
async fn heartbeat_terminate_is_forced_per_runner_id() {
    let s = start(&["--terminate-runner", "runner-doomed"]);
    let c = s.client();
    let r = c
        .call(
            "ReportTaskRunnerHeartbeat",
            &json!({"taskrunnerId": "runner-ok", "workerGroup": "wg", "hostname": "h"}),
        )
        .await
        .unwrap();
    assert_eq!(r, json!({"terminate": false}));
    let r = c
        .call(
            "ReportTaskRunnerHeartbeat",
            &json!({"taskrunnerId": "runner-doomed", "workerGroup": "wg"}),
        )
        .await
        .unwrap();
    assert_eq!(r, json!({"terminate": true}));
}

#[tokio::test]
async fn try_cancel_answers_canceled_on_next_progress() {
    let s = start(&["--long-poll-seconds", "5"]);
    let c = s.client();
    let pid = create_active(&c, ondemand_definition(1, "wg")).await;
    let t = c
        .call("PollForTask", &json!({"workerGroup": "wg"}))
        .await
        .unwrap();
    let task_id = t["taskObject"]["taskId"].as_str().unwrap().to_string();
    let aid = t["taskObject"]["attemptId"].as_str().unwrap().to_string();
    assert_eq!(
        c.call("ReportTaskProgress", &json!({"taskId": task_id}))
            .await
            .unwrap()["canceled"],
        false
    );
    let iid = aid.trim_end_matches("_Attempt=1").to_string();
    c.call(
        "SetStatus",
        &json!({"pipelineId": pid, "objectIds": [iid], "status": "TRY_CANCEL"}),
    )
    .await
    .unwrap();
    assert_eq!(
        c.call("ReportTaskProgress", &json!({"taskId": task_id}))
            .await
            .unwrap()["canceled"],
        true
    );
    let d = c
        .call("DescribeObjects", &json!({"pipelineId": pid, "objectIds": [iid]}))
        .await
        .unwrap();
    let f = d["pipelineObjects"][0]["fields"].as_array().unwrap().clone();
    assert!(
        f.iter()
            .any(|x| x["key"] == "@status" && x["stringValue"] == "CANCELED"),
        "{d}"
    );
}

#[tokio::test]
async fn deactivation_cancels_a_running_task() {
    let s = start(&["--long-poll-seconds", "5"]);
    let c = s.client();
    let pid = create_active(&c, ondemand_definition(1, "wg")).await;
    let t = c
        .call("PollForTask", &json!({"workerGroup": "wg"}))
        .await
        .unwrap();
    let task_id = t["taskObject"]["taskId"].as_str().unwrap().to_string();
    c.call("ReportTaskProgress", &json!({"taskId": task_id}))
        .await
        .unwrap();
    c.call("DeactivatePipeline", &json!({"pipelineId": pid}))
        .await
        .unwrap();
    assert_eq!(
        c.call("ReportTaskProgress", &json!({"taskId": task_id}))
            .await
            .unwrap()["canceled"],
        true
    );
}

#[tokio::test]
async fn an_unacknowledged_task_is_handed_out_again() {
    let s = start(&["--long-poll-seconds", "20", "--ack-timeout-seconds", "2"]);
    let c = s.client();
    create_active(&c, ondemand_definition(1, "wg")).await;
    let t1 = c
        .call("PollForTask", &json!({"workerGroup": "wg"}))
        .await
        .unwrap();
    let first = t1["taskObject"]["taskId"].as_str().unwrap().to_string();
    // Not acked: the long poll returns the same attempt once the ack timeout has passed.
    let t2 = c
        .call("PollForTask", &json!({"workerGroup": "wg"}))
        .await
        .unwrap();
    assert_eq!(
        t2["taskObject"]["attemptId"], t1["taskObject"]["attemptId"],
        "{t2}"
    );
    assert_ne!(t2["taskObject"]["taskId"].as_str().unwrap(), first);
    // The old task id is no longer the runner's to report on.
    assert_eq!(
        c.call("ReportTaskProgress", &json!({"taskId": first}))
            .await
            .unwrap_err()
            .to_string()
            .contains("TaskNotFound")
            || c.call("ReportTaskProgress", &json!({"taskId": first}))
                .await
                .map(|v| v["canceled"] == true)
                .unwrap_or(false),
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_of_200_tasks_is_handed_out_exactly_once_to_4_pollers() {
    let s = start(&["--long-poll-seconds", "2"]);
    let c = s.client();
    for _ in 0..2 {
        create_active(&c, ondemand_definition(100, "wg-many")).await;
    }
    let mut handles = Vec::new();
    for _ in 0..4 {
        let c = s.client();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let r = c
                    .call("PollForTask", &json!({"workerGroup": "wg-many"}))
                    .await
                    .unwrap();
                let Some(t) = r.get("taskObject") else { break };
                let task_id = t["taskId"].as_str().unwrap();
                c.call("ReportTaskProgress", &json!({"taskId": task_id}))
                    .await
                    .unwrap();
                got.push(format!(
                    "{}/{}",
                    t["pipelineId"].as_str().unwrap(),
                    t["attemptId"].as_str().unwrap()
                ));
            }
            got
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let unique: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), 200, "handed out {} tasks", all.len());
    assert_eq!(unique.len(), 200);
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap().to_string();
    let mut s = start_in(dir, &["--state", &state, "--long-poll-seconds", "3"]);
    let c = s.client();
    let pid = create_active(&c, ondemand_definition(2, "wg")).await;
    let t = c
        .call("PollForTask", &json!({"workerGroup": "wg"}))
        .await
        .unwrap();
    let task_id = t["taskObject"]["taskId"].as_str().unwrap().to_string();
    c.call("ReportTaskProgress", &json!({"taskId": task_id}))
        .await
        .unwrap();
    // Stop it with SIGTERM and start again on the same state.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let dir = std::mem::replace(&mut s.dir, tempfile::tempdir().unwrap());
    drop(s);
    let s2 = start_in(dir, &["--state", &state, "--long-poll-seconds", "3"]);
    let c = s2.client();
    let list = c.call("ListPipelines", &json!({})).await.unwrap();
    assert_eq!(list["pipelineIdList"][0]["id"], json!(pid));
    // The acked task is still ours; the second task is still to be handed out.
    assert_eq!(
        c.call("ReportTaskProgress", &json!({"taskId": task_id}))
            .await
            .unwrap()["canceled"],
        false
    );
    c.call(
        "SetTaskStatus",
        &json!({"taskId": task_id, "taskStatus": "FINISHED"}),
    )
    .await
    .unwrap();
    let t2 = c
        .call("PollForTask", &json!({"workerGroup": "wg"}))
        .await
        .unwrap();
    assert!(t2.get("taskObject").is_some(), "{t2}");
    assert_ne!(t2["taskObject"]["attemptId"], t["taskObject"]["attemptId"]);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
