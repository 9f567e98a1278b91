//! The small signing client behind `datapipeline-local submit` and `runs`: AWS JSON 1.1 over
//! reqwest, signed with `aws-sigv4`; and the translation of the definition-file format used by
//! `aws datapipeline put-pipeline-definition` (objects/parameters/values) into API objects.

use anyhow::{bail, Context};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::{Duration, SystemTime};

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:8990";

pub struct Client {
    http: reqwest::Client,
    endpoint: String,
    region: String,
    access_key: String,
    secret_key: String,
}

/// Reads `{"access-id": ..., "private-key": ...}`.
pub fn read_credentials(path: &Path) -> anyhow::Result<(String, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading credentials {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let get = |k: &str| -> anyhow::Result<String> {
        v.get(k)
            .and_then(|x| x.as_str())
            .filter(|s| !s.is_empty())
            .map(String::from)
            .with_context(|| format!("{}: missing string key {k:?}", path.display()))
    };
    Ok((get("access-id")?, get("private-key")?))
}

impl Client {
    pub fn new(
        endpoint: &str,
        region: &str,
        access_key: String,
        secret_key: String,
    ) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            http,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            region: region.into(),
            access_key,
            secret_key,
        })
    }

    /// Calls `DataPipeline.<op>`; an error answer becomes `Err` with its `__type` and message.
    pub async fn call(&self, op: &str, input: &Value) -> anyhow::Result<Value> {
        let body = serde_json::to_vec(input)?;
        let url = format!("{}/", self.endpoint);
        let host = url::Url::parse(&url)
            .with_context(|| format!("endpoint {:?} is not a URL", self.endpoint))?
            .host_str()
            .map(String::from)
            .unwrap_or_default();
        let _ = host;
        let target = format!("DataPipeline.{op}");
        let headers = [
            ("content-type", "application/x-amz-json-1.1".to_string()),
            ("x-amz-target", target.clone()),
        ];
        let identity = Credentials::new(
            &self.access_key,
            &self.secret_key,
            None,
            None,
            "datapipeline-local",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("datapipeline")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .context("building signing parameters")?
            .into();
        let signable = SignableRequest::new(
            "POST",
            &url,
            headers.iter().map(|(k, v)| (*k, v.as_str())),
            SignableBody::Bytes(&body),
        )
        .context("preparing the request for signing")?;
        let (instructions, _) = sign(signable, &params).context("signing")?.into_parts();
        let mut req = self.http.post(&url).body(body);
        for (k, v) in &headers {
            req = req.header(*k, v);
        }
        for (k, v) in instructions.headers() {
            req = req.header(k, v);
        }
        let resp = req.send().await.with_context(|| format!("{op}: calling {url}"))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .with_context(|| format!("{op}: reading the answer"))?;
        let v: Value = if text.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(&text)?
        };
        if !status.is_success() {
            let ty = v["__type"].as_str().unwrap_or("");
            let code = ty.rsplit('#').next().unwrap_or(ty);
            bail!("{op}: {code}: {}", v["message"].as_str().unwrap_or(&text));
        }
        Ok(v)
    }
}

fn value_to_fields(key: &str, v: &Value, out: &mut Vec<Value>) -> anyhow::Result<()> {
    match v {
        Value::Object(m) if m.len() == 1 && m.contains_key("ref") => {
            let r = m["ref"]
                .as_str()
                .with_context(|| format!("field {key:?}: ref must be a string"))?;
            out.push(json!({"key": key, "refValue": r}));
        }
        Value::Array(items) => {
            for i in items {
                value_to_fields(key, i, out)?;
            }
        }
        Value::String(s) => out.push(json!({"key": key, "stringValue": s})),
        Value::Number(_) | Value::Bool(_) => out.push(json!({"key": key, "stringValue": v.to_string()})),
        other => bail!("field {key:?}: unsupported value {other}"),
    }
    Ok(())
}

/// The definition file (`{"objects": [...], "parameters": [...], "values": {...}}`) as the input of
/// PutPipelineDefinition (without `pipelineId`), translated as awscli does: `name` defaults to
/// `id`, fields sorted by key, `{"ref": X}` -> `refValue`, lists -> repeated keys.
pub fn translate_definition(def: &Value) -> anyhow::Result<Value> {
    let objects = def["objects"]
        .as_array()
        .context("the definition has no \"objects\" list")?;
    let mut pipeline_objects = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        let m: &Map<String, Value> = o
            .as_object()
            .with_context(|| format!("objects[{i}] is not an object"))?;
        let id = m
            .get("id")
            .and_then(|v| v.as_str())
            .with_context(|| format!("objects[{i}] has no \"id\""))?;
        let name = m.get("name").and_then(|v| v.as_str()).unwrap_or(id);
        let mut keys: Vec<&String> = m.keys().filter(|k| *k != "id" && *k != "name").collect();
        keys.sort();
        let mut fields = Vec::new();
        for k in keys {
            value_to_fields(k, &m[k], &mut fields).with_context(|| format!("object {id}"))?;
        }
        pipeline_objects.push(json!({"id": id, "name": name, "fields": fields}));
    }
    let mut parameter_objects = Vec::new();
    for (i, p) in def["parameters"].as_array().into_iter().flatten().enumerate() {
        let m = p
            .as_object()
            .with_context(|| format!("parameters[{i}] is not an object"))?;
        let id = m
            .get("id")
            .and_then(|v| v.as_str())
            .with_context(|| format!("parameters[{i}] has no \"id\""))?;
        let mut keys: Vec<&String> = m.keys().filter(|k| *k != "id").collect();
        keys.sort();
        let mut attributes = Vec::new();
        for k in keys {
            let mut tmp = Vec::new();
            value_to_fields(k, &m[k], &mut tmp)?;
            for t in tmp {
                attributes.push(json!({"key": k, "stringValue": t["stringValue"]}));
            }
        }
        parameter_objects.push(json!({"id": id, "attributes": attributes}));
    }
    let mut parameter_values = Vec::new();
    if let Some(values) = def["values"].as_object() {
        for (k, v) in values {
            let mut tmp = Vec::new();
            value_to_fields(k, v, &mut tmp)?;
            for t in tmp {
                parameter_values.push(json!({"id": k, "stringValue": t["stringValue"]}));
            }
        }
    }
    let mut out = json!({"pipelineObjects": pipeline_objects});
    if !parameter_objects.is_empty() {
        out["parameterObjects"] = json!(parameter_objects);
    }
    if !parameter_values.is_empty() {
        out["parameterValues"] = json!(parameter_values);
    }
    Ok(out)
}

/// Create, put, activate; returns the pipeline id.
pub async fn submit(client: &Client, file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let def: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", file.display()))?;
    let mut put = translate_definition(&def).with_context(|| format!("{}", file.display()))?;
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("pipeline")
        .to_string();
    let unique = uuid::Uuid::new_v4().to_string();
    let created = client
        .call("CreatePipeline", &json!({"name": name, "uniqueId": unique}))
        .await?;
    let id = created["pipelineId"]
        .as_str()
        .context("CreatePipeline answered without pipelineId")?
        .to_string();
    put["pipelineId"] = json!(id);
    let out = client.call("PutPipelineDefinition", &put).await?;
    if out["errored"].as_bool().unwrap_or(false) {
        bail!(
            "{}: the pipeline definition has errors: {}",
            file.display(),
            serde_json::to_string_pretty(&out["validationErrors"]).unwrap_or_default()
        );
    }
    client
        .call("ActivatePipeline", &json!({"pipelineId": id}))
        .await?;
    Ok(id)
}

fn field<'a>(o: &'a Value, key: &str) -> &'a str {
    o["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["key"] == key)
        .and_then(|f| f["stringValue"].as_str().or(f["refValue"].as_str()))
        .unwrap_or("")
}

async fn describe_all(client: &Client, pipeline: &str, ids: &[String]) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for chunk in ids.chunks(100) {
        let r = client
            .call(
                "DescribeObjects",
                &json!({"pipelineId": pipeline, "objectIds": chunk}),
            )
            .await?;
        out.extend(r["pipelineObjects"].as_array().cloned().unwrap_or_default());
    }
    Ok(out)
}

/// The instances and their attempts with status, in the layout of `aws datapipeline list-runs`.
pub async fn runs(client: &Client, pipeline: &str) -> anyhow::Result<String> {
    let mut ids = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let mut q = json!({"pipelineId": pipeline, "sphere": "INSTANCE"});
        if let Some(m) = &marker {
            q["marker"] = json!(m);
        }
        let r = client.call("QueryObjects", &q).await?;
        ids.extend(
            r["ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from)),
        );
        match (r["hasMoreResults"].as_bool(), r["marker"].as_str()) {
            (Some(true), Some(m)) => marker = Some(m.to_string()),
            _ => break,
        }
    }
    let instances = describe_all(client, pipeline, &ids).await?;
    let mut s = String::new();
    s.push_str(&format!(
        "{:>7}  {:<50} {:<22} {}\n",
        "", "Name", "Scheduled Start", "Status"
    ));
    s.push_str(&format!(
        "{:>7}  {:<50} {:<22} {}\n",
        "", "ID", "Started", "Ended"
    ));
    s.push_str(&format!("{}\n", "-".repeat(110)));
    for (n, inst) in instances.iter().enumerate() {
        s.push_str(&format!(
            "{:>6}.  {:<50} {:<22} {}\n",
            n + 1,
            field(inst, "@componentParent"),
            field(inst, "@scheduledStartTime"),
            field(inst, "@status")
        ));
        s.push_str(&format!(
            "{:>7}  {:<50} {:<22} {}\n",
            "",
            inst["id"].as_str().unwrap_or(""),
            field(inst, "@actualStartTime"),
            field(inst, "@actualEndTime")
        ));
        let attempts = client
            .call(
                "QueryObjects",
                &json!({"pipelineId": pipeline, "sphere": "ATTEMPT", "query": {"selectors": [
                    {"fieldName": "@instanceParent", "operator": {"type": "REF_EQ", "values": [inst["id"]]}}]}}),
            )
            .await?;
        let aids: Vec<String> = attempts["ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        for a in describe_all(client, pipeline, &aids).await? {
            s.push_str(&format!(
                "{:>7}    attempt {:<40} {:<22} {}",
                "",
                a["id"].as_str().unwrap_or(""),
                field(&a, "@actualStartTime"),
                field(&a, "@status")
            ));
            let err = field(&a, "errorMessage");
            if !err.is_empty() {
                s.push_str(&format!("  ({err})"));
            }
            s.push('\n');
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_like_awscli() {
        let def = json!({
            "objects": [{"id": "A", "type": "ShellCommandActivity", "scriptArgument": ["x", "y"],
                          "schedule": {"ref": "S"}, "maximumRetries": 2}],
            "parameters": [{"id": "myDir", "type": "String", "default": "d"}],
            "values": {"myDir": "out"}
        });
        let t = translate_definition(&def).unwrap();
        assert_eq!(
            t["pipelineObjects"][0],
            json!({"id": "A", "name": "A", "fields": [
                {"key": "maximumRetries", "stringValue": "2"},
                {"key": "schedule", "refValue": "S"},
                {"key": "scriptArgument", "stringValue": "x"},
                {"key": "scriptArgument", "stringValue": "y"},
                {"key": "type", "stringValue": "ShellCommandActivity"}]})
        );
        assert_eq!(
            t["parameterObjects"][0],
            json!({"id": "myDir", "attributes": [{"key": "default", "stringValue": "d"}, {"key": "type", "stringValue": "String"}]})
        );
        assert_eq!(
            t["parameterValues"],
            json!([{"id": "myDir", "stringValue": "out"}])
        );
    }
}
