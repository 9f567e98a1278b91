//! Shared by the `tests/local_*.rs` integration tests: spawn the real `datapipeline-local` binary
//! on 127.0.0.1:0 in a temp dir, kill it on drop, and talk to it with the signing client.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use taskrunner::local::client::Client;

pub const AK: &str = "AKIDLOCALTEST";
pub const SK: &str = "local-secret-key";

pub struct Server {
    pub child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn write_credentials(dir: &Path, name: &str, ak: &str, sk: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, json!({"access-id": ak, "private-key": sk}).to_string()).unwrap();
    p
}

/// Starts the server with credentials AK/SK plus `extra` arguments.
pub fn start(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, extra)
}

pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Server {
    let creds = write_credentials(dir.path(), "credentials.json", AK, SK);
    let mut child = Command::new(env!("CARGO_BIN_EXE_datapipeline-local"))
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--credentials")
        .arg(&creds)
        .args(extra)
        .current_dir(dir.path())
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env("NO_PROXY", "*")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn datapipeline-local");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Server { child, url, dir }
}

impl Server {
    pub fn client(&self) -> Client {
        Client::new(&self.url, "us-east-1", AK.into(), SK.into()).unwrap()
    }
    pub fn client_with(&self, ak: &str, sk: &str) -> Client {
        Client::new(&self.url, "us-east-1", ak.into(), sk.into()).unwrap()
    }
}

/// An ondemand pipeline with `n` ShellCommandActivity objects on `wg`.
pub fn ondemand_definition(n: usize, wg: &str) -> Value {
    let mut objects = vec![json!({"id": "Default", "name": "Default", "fields": [
        {"key": "scheduleType", "stringValue": "ondemand"},
        {"key": "workerGroup", "stringValue": wg}]})];
    for i in 0..n {
        objects.push(
            json!({"id": format!("Act{i}"), "name": format!("Act{i}"), "fields": [
            {"key": "type", "stringValue": "ShellCommandActivity"},
            {"key": "command", "stringValue": format!("echo {i}")}]}),
        );
    }
    json!({"pipelineObjects": objects})
}

/// Create + put + activate; returns the pipeline id.
pub async fn create_active(client: &Client, mut def: Value) -> String {
    let id = client
        .call(
            "CreatePipeline",
            &json!({"name": "p", "uniqueId": uuid::Uuid::new_v4().to_string()}),
        )
        .await
        .unwrap()["pipelineId"]
        .as_str()
        .unwrap()
        .to_string();
    def["pipelineId"] = json!(id);
    let put = client.call("PutPipelineDefinition", &def).await.unwrap();
    assert_eq!(put["errored"], json!(false), "{put}");
    client
        .call("ActivatePipeline", &json!({"pipelineId": id}))
        .await
        .unwrap();
    id
}
