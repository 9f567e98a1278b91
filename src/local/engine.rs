//! The state of `datapipeline-local` and every operation on it: pipelines, their definitions, the
//! object model COMPONENT -> INSTANCE -> ATTEMPT, scheduling (ondemand and `Schedule` objects,
//! `dependsOn`, preconditions), hand-out to pollers, retries and timeouts. Pure and synchronous:
//! the server holds one mutex over an [`Engine`] and passes `now` in, so hand-out is exactly-once.

use super::compat::{evaluate, format_datetime, parse_datetime, Period, Schedule, Scope};
use crate::model::{Field, PipelineObject, TaskObject};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// An error the API answers with: `__type` name, message and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiErr {
    pub code: &'static str,
    pub message: String,
    pub status: u16,
}

impl ApiErr {
    pub fn invalid(m: impl Into<String>) -> Self {
        ApiErr {
            code: "InvalidRequestException",
            message: m.into(),
            status: 400,
        }
    }
    fn not_found(id: &str) -> Self {
        ApiErr {
            code: "PipelineNotFoundException",
            message: format!(
                "Pipeline {id} not found (pipelines belong to the access key that created them)"
            ),
            status: 400,
        }
    }
    fn deleted(id: &str) -> Self {
        ApiErr {
            code: "PipelineDeletedException",
            message: format!("Pipeline {id} has been deleted"),
            status: 400,
        }
    }
    fn task_not_found(id: &str) -> Self {
        ApiErr {
            code: "TaskNotFoundException",
            message: format!("Task {id} not found"),
            status: 400,
        }
    }
}

type R<T> = Result<T, ApiErr>;

/// Timing knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// A task handed out and not acknowledged by ReportTaskProgress within this is handed out again.
    pub ack_timeout: TimeDelta,
    /// Default `reportProgressTimeout` (an object's own value wins).
    pub progress_timeout: TimeDelta,
    /// `retryDelay`, `attemptTimeout` and `reportProgressTimeout` of objects are divided by this,
    /// so that tests can use the service's minimum periods and still run in seconds.
    pub period_divisor: u32,
    /// Runner ids whose heartbeat is answered with `terminate: true`.
    pub terminate_runners: BTreeSet<String>,
    /// PollForTask returns the attempt object alone (no referenced objects).
    pub attempt_only: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            ack_timeout: TimeDelta::minutes(2),
            progress_timeout: TimeDelta::minutes(5),
            period_divisor: 1,
            terminate_runners: BTreeSet::new(),
            attempt_only: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Definition {
    pub pipeline_objects: Vec<PipelineObject>,
    #[serde(default)]
    pub parameter_objects: Vec<Value>,
    #[serde(default)]
    pub parameter_values: Vec<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum InstanceKind {
    Activity,
    /// A precondition instance checked on behalf of these activity instances.
    Precondition {
        for_instances: Vec<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub component: String,
    pub kind: InstanceKind,
    #[serde(with = "dt")]
    pub scheduled_start: DateTime<Utc>,
    #[serde(with = "dt")]
    pub scheduled_end: DateTime<Utc>,
    pub status: String,
    pub attempts: Vec<String>,
    #[serde(with = "opt_dt")]
    pub actual_start: Option<DateTime<Utc>>,
    #[serde(with = "opt_dt")]
    pub actual_end: Option<DateTime<Utc>>,
    /// No new attempt before this (retryDelay).
    #[serde(with = "opt_dt")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub waiting_on: Vec<String>,
    pub cascade_failed_on: Option<String>,
    pub error_message: Option<String>,
    /// Where its attempts go: the `runsOn` resource id or the `workerGroup`.
    pub route: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub id: String,
    pub instance: String,
    pub number: u32,
    pub status: String,
    pub task_id: Option<String>,
    pub hostname: Option<String>,
    #[serde(with = "opt_dt")]
    pub handed_out_at: Option<DateTime<Utc>>,
    #[serde(with = "opt_dt")]
    pub acked_at: Option<DateTime<Utc>>,
    #[serde(with = "opt_dt")]
    pub last_progress: Option<DateTime<Utc>>,
    #[serde(with = "opt_dt")]
    pub actual_start: Option<DateTime<Utc>>,
    #[serde(with = "opt_dt")]
    pub actual_end: Option<DateTime<Utc>>,
    pub error_id: Option<String>,
    pub error_message: Option<String>,
    pub error_stack_trace: Option<String>,
    pub cancel_requested: bool,
    pub cancellation_reason: Option<String>,
    pub progress_fields: Vec<Field>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pipeline {
    pub id: String,
    pub name: String,
    pub unique_id: String,
    pub description: Option<String>,
    pub tags: Vec<Tag>,
    pub owner: String,
    #[serde(with = "dt")]
    pub created: DateTime<Utc>,
    /// `@pipelineState`: PENDING, SCHEDULED, INACTIVE, FINISHED.
    pub state: String,
    pub deleted: bool,
    pub latest: Option<Definition>,
    pub active: Option<Definition>,
    #[serde(with = "opt_dt")]
    pub activated_at: Option<DateTime<Utc>>,
    pub version: u32,
    pub instances: BTreeMap<String, Instance>,
    pub attempts: BTreeMap<String, Attempt>,
    pub paused: BTreeSet<String>,
}

/// Times in the state file as RFC 3339 strings (chrono's serde feature is not enabled here).
mod dt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

mod opt_dt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&t.to_rfc3339()),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| {
                DateTime::parse_from_rfc3339(&s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(serde::de::Error::custom)
            })
            .transpose()
    }
}

const TIME_FMT: &str = "%Y-%m-%dT%H:%M:%S";
const DEFAULT_MAX_RETRIES: u32 = 2;
const DEFAULT_RETRY_DELAY: TimeDelta = TimeDelta::minutes(10);
const TERMINAL: [&str; 5] = ["FINISHED", "FAILED", "CANCELED", "CASCADE_FAILED", "SKIPPED"];

fn ts(t: DateTime<Utc>) -> String {
    t.format(TIME_FMT).to_string()
}

fn is_terminal(status: &str) -> bool {
    TERMINAL.contains(&status)
}

/// Activity types (the objects that get instances and run on a runner).
fn is_activity(obj: &PipelineObject) -> bool {
    obj.get("type").is_some_and(|t| t.ends_with("Activity"))
}

fn str_arg<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(|x| x.as_str()).unwrap_or("")
}

/// All pipelines, the task index, heartbeats.
pub struct Engine {
    pub pipelines: BTreeMap<String, Pipeline>,
    /// taskId -> (pipelineId, attemptId).
    tasks: HashMap<String, (String, String)>,
    heartbeats: BTreeMap<String, DateTime<Utc>>,
    pub opts: EngineOptions,
    /// Pipelines changed since the last [`Engine::take_dirty`].
    dirty: BTreeSet<String>,
}

impl Engine {
    pub fn new(opts: EngineOptions, pipelines: Vec<Pipeline>) -> Engine {
        let mut e = Engine {
            pipelines: BTreeMap::new(),
            tasks: HashMap::new(),
            heartbeats: BTreeMap::new(),
            opts,
            dirty: BTreeSet::new(),
        };
        for p in pipelines {
            for a in p.attempts.values() {
                if let Some(t) = &a.task_id {
                    e.tasks.insert(t.clone(), (p.id.clone(), a.id.clone()));
                }
            }
            e.pipelines.insert(p.id.clone(), p);
        }
        e
    }

    /// Pipelines changed since the last call (to be persisted).
    pub fn take_dirty(&mut self) -> Vec<&Pipeline> {
        let ids = std::mem::take(&mut self.dirty);
        ids.iter().filter_map(|id| self.pipelines.get(id)).collect()
    }

    fn scaled(&self, p: Period, base: DateTime<Utc>) -> TimeDelta {
        let full = p.add_to(base) - base;
        full / self.opts.period_divisor.max(1) as i32
    }

    fn owned(&self, owner: &str, id: &str) -> R<&Pipeline> {
        match self.pipelines.get(id) {
            Some(p) if p.owner == owner && p.deleted => Err(ApiErr::deleted(id)),
            Some(p) if p.owner == owner => Ok(p),
            _ => Err(ApiErr::not_found(id)),
        }
    }

    fn owned_mut(&mut self, owner: &str, id: &str) -> R<&mut Pipeline> {
        self.owned(owner, id)?;
        self.dirty.insert(id.to_string());
        Ok(self.pipelines.get_mut(id).expect("checked above"))
    }

    /// Runs one operation (everything but PollForTask). `Ok(true)` in the second slot means a task may
    /// have become ready (the server wakes long polls).
    pub fn call(&mut self, op: &str, owner: &str, input: &Value, now: DateTime<Utc>) -> R<(Value, bool)> {
        self.tick(now);
        let out = match op {
            "CreatePipeline" => (self.create_pipeline(owner, input, now), false),
            "PutPipelineDefinition" => (self.put_definition(owner, input, false)?, false),
            "ValidatePipelineDefinition" => (self.put_definition(owner, input, true)?, false),
            "GetPipelineDefinition" => (self.get_definition(owner, input)?, false),
            "ActivatePipeline" => (self.activate(owner, input, now)?, true),
            "DeactivatePipeline" => (self.deactivate(owner, input, now)?, false),
            "DeletePipeline" => (self.delete(owner, input, now)?, false),
            "DescribePipelines" => (self.describe_pipelines(owner, input)?, false),
            "ListPipelines" => (self.list_pipelines(owner, input)?, false),
            "DescribeObjects" => (self.describe_objects(owner, input)?, false),
            "QueryObjects" => (self.query_objects(owner, input)?, false),
            "SetStatus" => (self.set_status(owner, input, now)?, true),
            "AddTags" => (self.add_tags(owner, input)?, false),
            "RemoveTags" => (self.remove_tags(owner, input)?, false),
            "EvaluateExpression" => (self.evaluate_expression(owner, input)?, false),
            "ReportTaskProgress" => (self.report_progress(owner, input, now)?, false),
            "ReportTaskRunnerHeartbeat" => (self.heartbeat(input, now), false),
            "SetTaskStatus" => (self.set_task_status(owner, input, now)?, true),
            other => return Err(ApiErr::invalid(format!("operation {other} is not implemented"))),
        };
        let woke = self.tick(now);
        Ok((out.0, out.1 || woke))
    }

    // ---- pipelines ------------------------------------------------------------------------

    fn create_pipeline(&mut self, owner: &str, input: &Value, now: DateTime<Utc>) -> Value {
        let name = str_arg(input, "name");
        let unique_id = str_arg(input, "uniqueId");
        if let Some(p) = self
            .pipelines
            .values()
            .find(|p| p.owner == owner && p.unique_id == unique_id && p.name == name && !p.deleted)
        {
            return json!({"pipelineId": p.id});
        }
        let id = loop {
            let raw = uuid::Uuid::new_v4().simple().to_string().to_ascii_uppercase();
            let id = format!("df-{}", &raw[..19]);
            if !self.pipelines.contains_key(&id) {
                break id;
            }
        };
        let tags = input["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| Tag {
                        key: str_arg(t, "key").into(),
                        value: str_arg(t, "value").into(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.pipelines.insert(
            id.clone(),
            Pipeline {
                id: id.clone(),
                name: name.into(),
                unique_id: unique_id.into(),
                description: input["description"].as_str().map(String::from),
                tags,
                owner: owner.into(),
                created: now,
                state: "PENDING".into(),
                deleted: false,
                latest: None,
                active: None,
                activated_at: None,
                version: 0,
                instances: BTreeMap::new(),
                attempts: BTreeMap::new(),
                paused: BTreeSet::new(),
            },
        );
        self.dirty.insert(id.clone());
        json!({"pipelineId": id})
    }

    fn put_definition(&mut self, owner: &str, input: &Value, validate_only: bool) -> R<Value> {
        let id = str_arg(input, "pipelineId");
        self.owned(owner, id)?;
        let def: Definition = serde_json::from_value(json!({
            "pipelineObjects": input["pipelineObjects"],
            "parameterObjects": input.get("parameterObjects").cloned().unwrap_or(json!([])),
            "parameterValues": input.get("parameterValues").cloned().unwrap_or(json!([])),
        }))
        .map_err(|e| ApiErr::invalid(format!("pipelineObjects: {e}")))?;
        // Structural faults are refused outright, as the service does (its example: an empty
        // workerGroup gives InvalidRequestException).
        for (i, o) in def.pipeline_objects.iter().enumerate() {
            for (j, f) in o.fields.iter().enumerate() {
                let at = format!(
                    "pipelineObjects[{i}].fields[{j}] (object {}, key {})",
                    o.id, f.key
                );
                match (&f.string_value, &f.ref_value) {
                    (Some(_), Some(_)) => {
                        return Err(ApiErr::invalid(format!(
                            "{at}: set stringValue or refValue, not both"
                        )))
                    }
                    (None, None) => {
                        return Err(ApiErr::invalid(format!(
                            "{at}: needs a stringValue or a refValue"
                        )))
                    }
                    (Some(s), None) if s.is_empty() => {
                        return Err(ApiErr::invalid(format!(
                            "Pipeline definition has errors: {at}: the value must not be empty"
                        )))
                    }
                    _ => {}
                }
            }
        }
        let (errors, warnings) = validate_definition(&def);
        let errored = !errors.is_empty();
        if !validate_only && !errored {
            let p = self.owned_mut(owner, id)?;
            p.latest = Some(def);
        }
        let errs: Vec<Value> = errors
            .into_iter()
            .map(|(id, m)| json!({"id": id, "errors": m}))
            .collect();
        let warns: Vec<Value> = warnings
            .into_iter()
            .map(|(id, m)| json!({"id": id, "warnings": m}))
            .collect();
        Ok(json!({"validationErrors": errs, "validationWarnings": warns, "errored": errored}))
    }

    fn get_definition(&self, owner: &str, input: &Value) -> R<Value> {
        let p = self.owned(owner, str_arg(input, "pipelineId"))?;
        let def = match input["version"].as_str().unwrap_or("latest") {
            "latest" => p.latest.as_ref(),
            "active" => p.active.as_ref(),
            v => {
                return Err(ApiErr::invalid(format!(
                    "version must be latest or active, got {v:?}"
                )))
            }
        };
        let def = def.ok_or_else(|| ApiErr::invalid(format!("Pipeline {} has no definition", p.id)))?;
        Ok(serde_json::to_value(def).unwrap_or_default())
    }

    fn activate(&mut self, owner: &str, input: &Value, now: DateTime<Utc>) -> R<Value> {
        let id = str_arg(input, "pipelineId").to_string();
        let p = self.owned_mut(owner, &id)?;
        let mut def = p.latest.clone().ok_or_else(|| {
            ApiErr::invalid(format!(
                "Pipeline {id} has no definition: call PutPipelineDefinition first"
            ))
        })?;
        if let Some(values) = input["parameterValues"].as_array() {
            if !values.is_empty() {
                def.parameter_values = values.clone();
            }
        }
        let ondemand = is_ondemand(&def);
        let running = p.instances.values().any(|i| !is_terminal(&i.status));
        if p.state == "SCHEDULED" && (!ondemand || running) {
            // Activating an active pipeline is a no-op on the service too.
            return Ok(json!({}));
        }
        p.active = Some(def);
        p.version += 1;
        p.state = "SCHEDULED".into();
        if p.activated_at.is_none() || ondemand {
            p.activated_at = Some(now);
        }
        if ondemand {
            let objects = resolved_objects(p.active.as_ref().expect("set above"));
            let start = now;
            for c in objects.values().filter(|o| is_activity(o)) {
                create_instance(p, &objects, &c.id, start, start, now);
            }
        }
        Ok(json!({}))
    }

    fn deactivate(&mut self, owner: &str, input: &Value, now: DateTime<Utc>) -> R<Value> {
        let id = str_arg(input, "pipelineId").to_string();
        let cancel_active = input["cancelActive"].as_bool().unwrap_or(true);
        let p = self.owned_mut(owner, &id)?;
        p.state = "INACTIVE".into();
        if cancel_active {
            let ids: Vec<String> = p.instances.keys().cloned().collect();
            for iid in ids {
                cancel_instance(p, &iid, "pipeline deactivated", now);
            }
        }
        Ok(json!({}))
    }

    fn delete(&mut self, owner: &str, input: &Value, now: DateTime<Utc>) -> R<Value> {
        let id = str_arg(input, "pipelineId").to_string();
        let p = self.owned_mut(owner, &id)?;
        let ids: Vec<String> = p.instances.keys().cloned().collect();
        for iid in ids {
            cancel_instance(p, &iid, "pipeline deleted", now);
        }
        p.deleted = true;
        p.state = "DELETING".into();
        Ok(json!({}))
    }

    fn describe_pipelines(&self, owner: &str, input: &Value) -> R<Value> {
        let mut out = Vec::new();
        for id in input["pipelineIds"].as_array().into_iter().flatten() {
            let p = self.owned(owner, id.as_str().unwrap_or(""))?;
            let mut fields = vec![
                Field::string("@pipelineState", &p.state),
                Field::string("@creationTime", ts(p.created)),
                Field::string("@sphere", "PIPELINE"),
                Field::string("@id", &p.id),
                Field::string("name", &p.name),
                Field::string("uniqueId", &p.unique_id),
                Field::string("@userId", &p.owner),
                Field::string("@accountId", "000000000000"),
                Field::string("pipelineCreator", &p.owner),
                Field::string("@version", p.version.to_string()),
            ];
            if let Some(t) = p.activated_at {
                fields.push(Field::string("@lastActivationTime", ts(t)));
            }
            if let Some(d) = &p.description {
                fields.push(Field::string("description", d));
            }
            let health = if p
                .instances
                .values()
                .any(|i| i.status == "FAILED" || i.status == "CASCADE_FAILED")
            {
                "ERROR"
            } else {
                "HEALTHY"
            };
            fields.push(Field::string("@healthStatus", health));
            let mut d = json!({
                "pipelineId": p.id,
                "name": p.name,
                "fields": fields,
                "tags": p.tags.iter().map(|t| json!({"key": t.key, "value": t.value})).collect::<Vec<_>>(),
            });
            if let Some(desc) = &p.description {
                d["description"] = json!(desc);
            }
            out.push(d);
        }
        Ok(json!({"pipelineDescriptionList": out}))
    }

    fn list_pipelines(&self, owner: &str, input: &Value) -> R<Value> {
        const PAGE: usize = 50;
        let start: usize = match input["marker"].as_str() {
            None | Some("") => 0,
            Some(m) => m
                .parse()
                .map_err(|_| ApiErr::invalid(format!("marker {m:?} is not valid")))?,
        };
        let mut mine: Vec<&Pipeline> = self
            .pipelines
            .values()
            .filter(|p| p.owner == owner && !p.deleted)
            .collect();
        mine.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        let page: Vec<Value> = mine
            .iter()
            .skip(start)
            .take(PAGE)
            .map(|p| json!({"id": p.id, "name": p.name}))
            .collect();
        let more = mine.len() > start + PAGE;
        let mut out = json!({"pipelineIdList": page, "hasMoreResults": more});
        if more {
            out["marker"] = json!((start + PAGE).to_string());
        }
        Ok(out)
    }

    fn add_tags(&mut self, owner: &str, input: &Value) -> R<Value> {
        let p = self.owned_mut(owner, str_arg(input, "pipelineId"))?;
        for t in input["tags"].as_array().into_iter().flatten() {
            let key = str_arg(t, "key").to_string();
            let value = str_arg(t, "value").to_string();
            match p.tags.iter_mut().find(|x| x.key == key) {
                Some(x) => x.value = value,
                None => p.tags.push(Tag { key, value }),
            }
        }
        if p.tags.len() > 10 {
            return Err(ApiErr::invalid("a pipeline has at most 10 tags"));
        }
        Ok(json!({}))
    }

    fn remove_tags(&mut self, owner: &str, input: &Value) -> R<Value> {
        let p = self.owned_mut(owner, str_arg(input, "pipelineId"))?;
        let keys: Vec<&str> = input["tagKeys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str())
            .collect();
        p.tags.retain(|t| !keys.contains(&t.key.as_str()));
        Ok(json!({}))
    }

    // ---- objects --------------------------------------------------------------------------

    fn describe_objects(&self, owner: &str, input: &Value) -> R<Value> {
        const PAGE: usize = 100;
        let p = self.owned(owner, str_arg(input, "pipelineId"))?;
        let evaluate_expr = input["evaluateExpressions"].as_bool().unwrap_or(false);
        let ids: Vec<&str> = input["objectIds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect();
        let start: usize = input["marker"].as_str().and_then(|m| m.parse().ok()).unwrap_or(0);
        let view = View::new(p);
        let mut out = Vec::new();
        for id in ids.iter().skip(start).take(PAGE) {
            let Some(mut obj) = view.object(id) else {
                return Err(ApiErr::invalid(format!(
                    "object {id} does not exist in pipeline {}",
                    p.id
                )));
            };
            if evaluate_expr {
                obj = view.evaluated(&obj);
            }
            out.push(obj);
        }
        let more = ids.len() > start + PAGE;
        let mut res = json!({"pipelineObjects": out, "hasMoreResults": more});
        if more {
            res["marker"] = json!((start + PAGE).to_string());
        }
        Ok(res)
    }

    fn query_objects(&self, owner: &str, input: &Value) -> R<Value> {
        let sphere = str_arg(input, "sphere");
        if !["COMPONENT", "INSTANCE", "ATTEMPT"].contains(&sphere) {
            return Err(ApiErr::invalid(format!(
                "sphere must be COMPONENT, INSTANCE or ATTEMPT, got {sphere:?}"
            )));
        }
        let limit = input["limit"].as_i64().unwrap_or(100);
        if !(1..=500).contains(&limit) {
            return Err(ApiErr::invalid(format!(
                "limit must be between 1 and 500, got {limit}"
            )));
        }
        let selectors: Vec<&Value> = input["query"]["selectors"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        if selectors.len() > 10 {
            return Err(ApiErr::invalid("query.selectors: at most 10 selectors"));
        }
        for (i, s) in selectors.iter().enumerate() {
            let t = s["operator"]["type"].as_str().unwrap_or("");
            let n = s["operator"]["values"].as_array().map_or(0, |v| v.len());
            if str_arg(s, "fieldName").is_empty() || t.is_empty() || n == 0 || (t == "BETWEEN" && n != 2) {
                return Err(ApiErr::invalid(format!(
                    "query.selectors[{i}]: needs fieldName, operator.type and operator.values (two for BETWEEN)"
                )));
            }
        }
        let p = self.owned(owner, str_arg(input, "pipelineId"))?;
        let view = View::new(p);
        let candidates: Vec<PipelineObject> = match sphere {
            "COMPONENT" => p
                .active
                .as_ref()
                .or(p.latest.as_ref())
                .map(|d| {
                    d.pipeline_objects
                        .iter()
                        .filter_map(|o| view.object(&o.id))
                        .collect()
                })
                .unwrap_or_default(),
            "INSTANCE" => {
                let mut v: Vec<&Instance> = p.instances.values().collect();
                v.sort_by(|a, b| a.scheduled_start.cmp(&b.scheduled_start).then(a.id.cmp(&b.id)));
                v.iter().filter_map(|i| view.object(&i.id)).collect()
            }
            _ => p.attempts.keys().filter_map(|a| view.object(a)).collect(),
        };
        let ids: Vec<String> = candidates
            .into_iter()
            .filter(|o| selectors.iter().all(|s| selector_matches(o, s)))
            .map(|o| o.id)
            .collect();
        let start: usize = input["marker"].as_str().and_then(|m| m.parse().ok()).unwrap_or(0);
        let end = (start + limit as usize).min(ids.len());
        let page = ids.get(start.min(ids.len())..end).unwrap_or(&[]).to_vec();
        let more = ids.len() > end;
        let mut out = json!({"ids": page, "hasMoreResults": more});
        if more {
            out["marker"] = json!(end.to_string());
        }
        Ok(out)
    }

    fn set_status(&mut self, owner: &str, input: &Value, now: DateTime<Utc>) -> R<Value> {
        let status = str_arg(input, "status").to_string();
        let ids: Vec<String> = input["objectIds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        let p = self.owned_mut(owner, str_arg(input, "pipelineId"))?;
        let components: BTreeSet<String> = p
            .active
            .as_ref()
            .or(p.latest.as_ref())
            .map(|d| d.pipeline_objects.iter().map(|o| o.id.clone()).collect())
            .unwrap_or_default();
        let all_components = ids.iter().all(|i| components.contains(i));
        let all_instances = ids.iter().all(|i| p.instances.contains_key(i));
        match status.as_str() {
            "PAUSE" | "RESUME" => {
                if !all_components {
                    return Err(ApiErr::invalid(format!(
                        "{status} applies to component objects only: {ids:?}"
                    )));
                }
                for i in ids {
                    if status == "PAUSE" {
                        p.paused.insert(i);
                    } else {
                        p.paused.remove(&i);
                    }
                }
            }
            "TRY_CANCEL" | "RERUN" | "MARK_FINISHED" => {
                if !all_instances {
                    return Err(ApiErr::invalid(format!(
                        "{status} applies to instance objects only: {ids:?}"
                    )));
                }
                for iid in ids {
                    match status.as_str() {
                        "TRY_CANCEL" => cancel_instance(p, &iid, "canceled by SetStatus TRY_CANCEL", now),
                        "MARK_FINISHED" => {
                            cancel_instance(p, &iid, "marked finished by SetStatus", now);
                            let inst = p.instances.get_mut(&iid).expect("checked");
                            inst.status = "FINISHED".into();
                            inst.actual_end = Some(now);
                        }
                        _ => rerun_instance(p, &iid, now),
                    }
                }
                if p.state == "FINISHED" {
                    p.state = "SCHEDULED".into();
                }
            }
            other => {
                return Err(ApiErr::invalid(format!(
                    "status must be PAUSE, RESUME, TRY_CANCEL, RERUN or MARK_FINISHED, got {other:?}"
                )))
            }
        }
        Ok(json!({}))
    }

    fn evaluate_expression(&self, owner: &str, input: &Value) -> R<Value> {
        let p = self.owned(owner, str_arg(input, "pipelineId"))?;
        let view = View::new(p);
        let oid = str_arg(input, "objectId");
        if view.object(oid).is_none() {
            return Err(ApiErr::invalid(format!(
                "object {oid} does not exist in pipeline {}",
                p.id
            )));
        }
        let (objects, params) = view.scope_objects(oid);
        let scope = Scope {
            objects: &objects,
            current: oid,
            params: &params,
        };
        let out =
            evaluate(str_arg(input, "expression"), &scope).map_err(|e| ApiErr::invalid(e.to_string()))?;
        Ok(json!({"evaluatedExpression": out}))
    }

    // ---- the task-runner calls ---------------------------------------------------------------

    /// Hands out at most one ready attempt routed to `worker_group` from the caller's pipelines.
    pub fn poll(&mut self, owner: &str, input: &Value, now: DateTime<Utc>) -> Option<TaskObject> {
        self.tick(now);
        let wg = str_arg(input, "workerGroup");
        let hostname = input["hostname"].as_str();
        // Preconditions first (their activity waits for them), then oldest scheduled start.
        let mut best: Option<(bool, DateTime<Utc>, String, String)> = None;
        for p in self.pipelines.values() {
            if p.owner != owner || p.deleted || p.state != "SCHEDULED" {
                continue;
            }
            for a in p.attempts.values() {
                if a.status != "WAITING_FOR_RUNNER" || a.task_id.is_some() {
                    continue;
                }
                let Some(inst) = p.instances.get(&a.instance) else {
                    continue;
                };
                if inst.route.as_deref() != Some(wg) || p.paused.contains(&inst.component) {
                    continue;
                }
                if inst.next_attempt_at.is_some_and(|t| t > now) {
                    continue;
                }
                let key = (
                    !matches!(inst.kind, InstanceKind::Precondition { .. }),
                    inst.scheduled_start,
                    p.id.clone(),
                    a.id.clone(),
                );
                if best.as_ref().is_none_or(|b| key < *b) {
                    best = Some(key);
                }
            }
        }
        let (_, _, pid, aid) = best?;
        let task_id = format!(
            "{}:{}",
            uuid::Uuid::new_v4().simple(),
            base64_id(&format!("{pid}/{aid}"))
        );
        self.tasks.insert(task_id.clone(), (pid.clone(), aid.clone()));
        self.dirty.insert(pid.clone());
        let p = self.pipelines.get_mut(&pid).expect("found above");
        let a = p.attempts.get_mut(&aid).expect("found above");
        a.task_id = Some(task_id.clone());
        a.status = "RUNNING".into();
        a.hostname = hostname.map(String::from);
        a.handed_out_at = Some(now);
        a.acked_at = None;
        a.last_progress = None;
        a.actual_start.get_or_insert(now);
        let inst = p.instances.get_mut(&a.instance).expect("attempt has an instance");
        inst.status = "RUNNING".into();
        inst.actual_start.get_or_insert(now);
        let p = &self.pipelines[&pid];
        let view = View::new(p);
        let objects = view.task_objects(&aid, self.opts.attempt_only);
        Some(TaskObject {
            task_id,
            pipeline_id: pid,
            attempt_id: Some(aid),
            objects,
        })
    }

    fn task(&self, owner: &str, task_id: &str) -> R<(String, String)> {
        let (pid, aid) = self
            .tasks
            .get(task_id)
            .cloned()
            .ok_or_else(|| ApiErr::task_not_found(task_id))?;
        self.owned(owner, &pid)?;
        Ok((pid, aid))
    }

    fn report_progress(&mut self, owner: &str, input: &Value, now: DateTime<Utc>) -> R<Value> {
        let task_id = str_arg(input, "taskId");
        let (pid, aid) = self.task(owner, task_id)?;
        let fields: Vec<Field> =
            serde_json::from_value(input.get("fields").cloned().unwrap_or(json!([]))).unwrap_or_default();
        self.dirty.insert(pid.clone());
        let p = self.pipelines.get_mut(&pid).expect("task index is consistent");
        let a = p.attempts.get_mut(&aid).expect("task index is consistent");
        if a.task_id.as_deref() != Some(task_id) || is_terminal(&a.status) {
            // The task was taken back (timeout) or closed: tell the runner to stop.
            return Ok(json!({"canceled": true}));
        }
        if a.cancel_requested {
            let reason = a.cancellation_reason.clone().unwrap_or_else(|| "canceled".into());
            let iid = a.instance.clone();
            finish_attempt(p, &aid, "CANCELED", now);
            let inst = p.instances.get_mut(&iid).expect("attempt has an instance");
            inst.status = "CANCELED".into();
            inst.actual_end = Some(now);
            inst.error_message = Some(reason);
            return Ok(json!({"canceled": true}));
        }
        a.acked_at.get_or_insert(now);
        a.last_progress = Some(now);
        for f in fields {
            a.progress_fields.retain(|x| x.key != f.key);
            a.progress_fields.push(f);
        }
        Ok(json!({"canceled": false}))
    }

    fn heartbeat(&mut self, input: &Value, now: DateTime<Utc>) -> Value {
        let id = str_arg(input, "taskrunnerId");
        self.heartbeats.insert(id.to_string(), now);
        json!({"terminate": self.opts.terminate_runners.contains(id)})
    }

    fn set_task_status(&mut self, owner: &str, input: &Value, now: DateTime<Utc>) -> R<Value> {
        let task_id = str_arg(input, "taskId");
        let (pid, aid) = self.task(owner, task_id)?;
        if let Some(e) = input["errorId"].as_str() {
            if e.starts_with("Service_") {
                return Err(ApiErr::invalid("errorId must not start with Service_ (reserved)"));
            }
        }
        self.dirty.insert(pid.clone());
        let p = self.pipelines.get_mut(&pid).expect("task index is consistent");
        let a = p.attempts.get_mut(&aid).expect("task index is consistent");
        if a.task_id.as_deref() != Some(task_id) || is_terminal(&a.status) {
            return Err(ApiErr::task_not_found(task_id));
        }
        a.error_id = input["errorId"].as_str().map(String::from);
        a.error_message = input["errorMessage"].as_str().map(String::from);
        a.error_stack_trace = input["errorStackTrace"].as_str().map(String::from);
        let iid = a.instance.clone();
        match str_arg(input, "taskStatus") {
            "FINISHED" => {
                finish_attempt(p, &aid, "FINISHED", now);
                let inst = p.instances.get_mut(&iid).expect("attempt has an instance");
                inst.status = "FINISHED".into();
                inst.actual_end = Some(now);
            }
            "FALSE" => {
                // A precondition that is not met: the runner already retried it within
                // preconditionTimeout, so the service does not retry; its activities will not run.
                finish_attempt(p, &aid, "FAILED", now);
                let inst = p.instances.get_mut(&iid).expect("attempt has an instance");
                inst.status = "FAILED".into();
                inst.actual_end = Some(now);
                inst.error_message = Some("precondition evaluated to false".into());
            }
            _ => {
                finish_attempt(p, &aid, "FAILED", now);
                self.retry_or_fail(&pid, &iid, now);
            }
        }
        Ok(json!({}))
    }

    /// After a failed attempt: a new attempt after `retryDelay` while retries remain, else FAILED.
    fn retry_or_fail(&mut self, pid: &str, iid: &str, now: DateTime<Utc>) {
        let p = &self.pipelines[pid];
        let comp = resolved_component(p, &p.instances[iid].component);
        let max_retries = comp
            .as_ref()
            .and_then(|c| c.get("maximumRetries"))
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(DEFAULT_MAX_RETRIES);
        let delay = comp
            .as_ref()
            .and_then(|c| c.get("retryDelay"))
            .and_then(|s| Period::parse(s).ok())
            .map(|per| self.scaled(per, now))
            .unwrap_or(DEFAULT_RETRY_DELAY / self.opts.period_divisor.max(1) as i32);
        let p = self.pipelines.get_mut(pid).expect("exists");
        let inst = p.instances.get_mut(iid).expect("exists");
        if (inst.attempts.len() as u32) <= max_retries {
            inst.next_attempt_at = Some(now + delay);
            inst.status = "WAITING_FOR_RUNNER".into();
            new_attempt(p, iid);
        } else {
            inst.status = "FAILED".into();
            inst.actual_end = Some(now);
            let last = inst.attempts.last().cloned();
            inst.error_message = last.and_then(|a| p.attempts[&a].error_message.clone());
        }
    }

    // ---- time ---------------------------------------------------------------------------

    /// Advances the model to `now`: scheduled instances, dependencies, timeouts, finished
    /// pipelines. Returns true when an attempt may have become ready for hand-out.
    pub fn tick(&mut self, now: DateTime<Utc>) -> bool {
        let mut woke = false;
        let ids: Vec<String> = self
            .pipelines
            .values()
            .filter(|p| !p.deleted && p.active.is_some())
            .map(|p| p.id.clone())
            .collect();
        for pid in ids {
            let before = fingerprint(&self.pipelines[&pid]);
            woke |= self.tick_pipeline(&pid, now);
            if fingerprint(&self.pipelines[&pid]) != before {
                self.dirty.insert(pid);
            }
        }
        woke
    }

    fn tick_pipeline(&mut self, pid: &str, now: DateTime<Utc>) -> bool {
        let mut woke = false;
        let opts = self.opts.clone();
        let p = self.pipelines.get_mut(pid).expect("exists");
        let def = p.active.clone().expect("active");
        let objects = resolved_objects(&def);
        // New scheduled instances.
        if p.state == "SCHEDULED" && !is_ondemand(&def) {
            let activation = p.activated_at.unwrap_or(now);
            for c in objects.values().filter(|o| is_activity(o)) {
                let Some(sched) = c.get_ref("schedule").and_then(|s| objects.get(s)) else {
                    continue;
                };
                let Ok(schedule) = Schedule::from_object(sched, activation) else {
                    continue;
                };
                for (start, end) in schedule.instances_due(now) {
                    let iid = format!("@{}_{}", c.id, ts(start));
                    if !p.instances.contains_key(&iid) {
                        create_instance(p, &objects, &c.id, start, end, now);
                        woke = true;
                    }
                }
            }
        }
        // Timeouts of handed-out attempts.
        let mut released = Vec::new();
        let mut timed_out = Vec::new();
        for a in p.attempts.values_mut() {
            let Some(task) = a.task_id.clone() else { continue };
            if is_terminal(&a.status) || a.cancel_requested {
                continue;
            }
            let comp = p
                .instances
                .get(&a.instance)
                .map(|i| i.component.clone())
                .unwrap_or_default();
            let c = objects.get(&comp);
            let scale = |per: Period| (per.add_to(now) - now) / opts.period_divisor.max(1) as i32;
            let progress_timeout = c
                .and_then(|c| c.get("reportProgressTimeout"))
                .and_then(|s| Period::parse(s).ok())
                .map(scale)
                .unwrap_or(opts.progress_timeout);
            let attempt_timeout = c
                .and_then(|c| c.get("attemptTimeout"))
                .and_then(|s| Period::parse(s).ok())
                .map(scale);
            let stale = match (a.acked_at, a.last_progress, a.handed_out_at) {
                (None, _, Some(h)) => now - h > opts.ack_timeout,
                (Some(_), Some(l), _) => now - l > progress_timeout,
                _ => false,
            };
            if let (Some(limit), Some(start)) = (attempt_timeout, a.actual_start) {
                if now - start > limit {
                    timed_out.push(a.id.clone());
                    continue;
                }
            }
            if stale {
                released.push(task);
                a.task_id = None;
                a.status = "WAITING_FOR_RUNNER".into();
                a.hostname = None;
                a.handed_out_at = None;
                a.acked_at = None;
                a.last_progress = None;
                woke = true;
            }
        }
        for t in released {
            self.tasks.remove(&t);
        }
        for aid in &timed_out {
            let p = self.pipelines.get_mut(pid).expect("exists");
            let a = p.attempts.get_mut(aid).expect("exists");
            a.cancel_requested = true;
            a.cancellation_reason = Some("attemptTimeout exceeded".into());
            a.error_message = Some("attemptTimeout exceeded".into());
            let iid = a.instance.clone();
            finish_attempt(p, aid, "FAILED", now);
            self.retry_or_fail(pid, &iid, now);
            woke = true;
        }
        let p = self.pipelines.get_mut(pid).expect("exists");
        // Dependencies and preconditions.
        if p.state == "SCHEDULED" {
            woke |= advance_waiting(p, &objects, now);
        }
        // Retries whose delay has passed become ready: wake pollers.
        for inst in p.instances.values_mut() {
            if inst.next_attempt_at.is_some_and(|t| t <= now) {
                inst.next_attempt_at = None;
                woke = true;
            }
        }
        if p.state == "SCHEDULED"
            && is_ondemand(&def)
            && !p.instances.is_empty()
            && p.instances.values().all(|i| is_terminal(&i.status))
        {
            p.state = "FINISHED".into();
        }
        woke
    }
}

fn fingerprint(p: &Pipeline) -> (String, usize, usize, Vec<(String, String)>) {
    (
        p.state.clone(),
        p.instances.len(),
        p.attempts.len(),
        p.attempts
            .values()
            .map(|a| (a.status.clone(), a.task_id.clone().unwrap_or_default()))
            .collect(),
    )
}

fn base64_id(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

pub fn is_ondemand(def: &Definition) -> bool {
    def.pipeline_objects
        .iter()
        .find(|o| o.id == "Default")
        .and_then(|o| o.get("scheduleType"))
        == Some("ondemand")
}

/// The definition's objects with `parent` and `Default` inheritance applied (the object's own keys
/// win; a key set on the child hides every value of that key further up).
pub fn resolved_objects(def: &Definition) -> BTreeMap<String, PipelineObject> {
    let by_id: BTreeMap<&str, &PipelineObject> =
        def.pipeline_objects.iter().map(|o| (o.id.as_str(), o)).collect();
    let mut out = BTreeMap::new();
    for o in &def.pipeline_objects {
        let mut fields = o.fields.clone();
        let mut seen: BTreeSet<String> = fields.iter().map(|f| f.key.clone()).collect();
        let mut chain: Vec<&str> = Vec::new();
        let mut cur = o.get_ref("parent");
        while let Some(pid) = cur {
            if chain.contains(&pid) || pid == o.id {
                break;
            }
            chain.push(pid);
            cur = by_id.get(pid).and_then(|x| x.get_ref("parent"));
        }
        if o.id != "Default" && !chain.contains(&"Default") {
            chain.push("Default");
        }
        for anc in chain {
            let Some(a) = by_id.get(anc) else { continue };
            let keys: BTreeSet<String> = a.fields.iter().map(|f| f.key.clone()).collect();
            for f in &a.fields {
                if !seen.contains(&f.key) && f.key != "parent" {
                    fields.push(f.clone());
                }
            }
            seen.extend(keys);
        }
        out.insert(
            o.id.clone(),
            PipelineObject {
                id: o.id.clone(),
                name: o.name.clone(),
                fields,
            },
        );
    }
    out
}

fn resolved_component(p: &Pipeline, id: &str) -> Option<PipelineObject> {
    p.active.as_ref().and_then(|d| resolved_objects(d).remove(id))
}

fn route_of(c: &PipelineObject) -> Option<String> {
    // DG: with runsOn, workerGroup is ignored; the resource id serves as the worker group here.
    c.get_ref("runsOn")
        .or_else(|| c.get("workerGroup"))
        .map(String::from)
}

fn create_instance(
    p: &mut Pipeline,
    objects: &BTreeMap<String, PipelineObject>,
    comp: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    _now: DateTime<Utc>,
) {
    let c = &objects[comp];
    let iid = format!("@{}_{}", comp, ts(start));
    if p.instances.contains_key(&iid) {
        // A second activation within the same second: keep ids unique.
        return;
    }
    let route = route_of(c);
    let mut waiting_on = Vec::new();
    for pre in c.get_refs("precondition") {
        let pre_iid = format!("@{}_{}", pre, ts(start));
        waiting_on.push(pre_iid.clone());
        if let Some(existing) = p.instances.get_mut(&pre_iid) {
            if let InstanceKind::Precondition { for_instances } = &mut existing.kind {
                for_instances.push(iid.clone());
            }
            continue;
        }
        // "The workerGroup resource is derived from the activity that uses the precondition."
        let pre_route = objects.get(pre).and_then(route_of).or_else(|| route.clone());
        p.instances.insert(
            pre_iid.clone(),
            Instance {
                id: pre_iid.clone(),
                component: pre.to_string(),
                kind: InstanceKind::Precondition {
                    for_instances: vec![iid.clone()],
                },
                scheduled_start: start,
                scheduled_end: end,
                status: "WAITING_FOR_RUNNER".into(),
                attempts: vec![],
                actual_start: None,
                actual_end: None,
                next_attempt_at: None,
                waiting_on: vec![],
                cascade_failed_on: None,
                error_message: None,
                route: pre_route,
            },
        );
        new_attempt(p, &pre_iid);
    }
    for dep in c.get_refs("dependsOn") {
        if objects.get(dep).is_some_and(is_activity) {
            waiting_on.push(format!("@{}_{}", dep, ts(start)));
        }
    }
    let ready = waiting_on.is_empty();
    p.instances.insert(
        iid.clone(),
        Instance {
            id: iid.clone(),
            component: comp.to_string(),
            kind: InstanceKind::Activity,
            scheduled_start: start,
            scheduled_end: end,
            status: if ready {
                "WAITING_FOR_RUNNER"
            } else {
                "WAITING_ON_DEPENDENCIES"
            }
            .into(),
            attempts: vec![],
            actual_start: None,
            actual_end: None,
            next_attempt_at: None,
            waiting_on,
            cascade_failed_on: None,
            error_message: None,
            route,
        },
    );
    if ready {
        new_attempt(p, &iid);
    }
}

fn new_attempt(p: &mut Pipeline, iid: &str) {
    let inst = p.instances.get_mut(iid).expect("exists");
    let n = inst.attempts.len() as u32 + 1;
    let aid = format!("{iid}_Attempt={n}");
    inst.attempts.push(aid.clone());
    p.attempts.insert(
        aid.clone(),
        Attempt {
            id: aid,
            instance: iid.to_string(),
            number: n,
            status: "WAITING_FOR_RUNNER".into(),
            task_id: None,
            hostname: None,
            handed_out_at: None,
            acked_at: None,
            last_progress: None,
            actual_start: None,
            actual_end: None,
            error_id: None,
            error_message: None,
            error_stack_trace: None,
            cancel_requested: false,
            cancellation_reason: None,
            progress_fields: vec![],
        },
    );
}

fn finish_attempt(p: &mut Pipeline, aid: &str, status: &str, now: DateTime<Utc>) {
    let a = p.attempts.get_mut(aid).expect("exists");
    a.status = status.into();
    a.actual_end = Some(now);
}

/// TRY_CANCEL: a handed-out attempt learns it on its next ReportTaskProgress; anything not yet
/// handed out is canceled at once.
fn cancel_instance(p: &mut Pipeline, iid: &str, reason: &str, now: DateTime<Utc>) {
    let Some(inst) = p.instances.get(iid) else { return };
    if is_terminal(&inst.status) {
        return;
    }
    let mut handed_out = false;
    for aid in inst.attempts.clone() {
        let a = p.attempts.get_mut(&aid).expect("exists");
        if is_terminal(&a.status) {
            continue;
        }
        if a.task_id.is_some() {
            a.cancel_requested = true;
            a.cancellation_reason = Some(reason.into());
            handed_out = true;
        } else {
            a.status = "CANCELED".into();
            a.actual_end = Some(now);
            a.cancellation_reason = Some(reason.into());
        }
    }
    if !handed_out {
        let inst = p.instances.get_mut(iid).expect("exists");
        inst.status = "CANCELED".into();
        inst.actual_end = Some(now);
        inst.error_message = Some(reason.into());
    }
}

fn rerun_instance(p: &mut Pipeline, iid: &str, now: DateTime<Utc>) {
    cancel_instance(p, iid, "rerun requested", now);
    let inst = p.instances.get_mut(iid).expect("checked");
    inst.status = if inst.waiting_on.is_empty() {
        "WAITING_FOR_RUNNER"
    } else {
        "WAITING_ON_DEPENDENCIES"
    }
    .into();
    inst.actual_end = None;
    inst.cascade_failed_on = None;
    inst.error_message = None;
    inst.next_attempt_at = None;
    if inst.waiting_on.is_empty() {
        new_attempt(p, iid);
    }
    // Its preconditions are checked again.
    let pres: Vec<String> = p.instances[iid]
        .waiting_on
        .iter()
        .filter(|w| {
            matches!(
                p.instances.get(*w).map(|i| &i.kind),
                Some(InstanceKind::Precondition { .. })
            )
        })
        .cloned()
        .collect();
    for pre in pres {
        if p.instances[&pre].status != "WAITING_FOR_RUNNER" && p.instances[&pre].status != "RUNNING" {
            let pi = p.instances.get_mut(&pre).expect("exists");
            pi.status = "WAITING_FOR_RUNNER".into();
            pi.actual_end = None;
            pi.error_message = None;
            new_attempt(p, &pre);
        }
    }
}

/// Moves WAITING_ON_DEPENDENCIES instances on: ready when everything they wait on FINISHED,
/// CASCADE_FAILED when any of it failed.
fn advance_waiting(
    p: &mut Pipeline,
    _objects: &BTreeMap<String, PipelineObject>,
    _now: DateTime<Utc>,
) -> bool {
    let mut woke = false;
    let waiting: Vec<String> = p
        .instances
        .values()
        .filter(|i| i.status == "WAITING_ON_DEPENDENCIES")
        .map(|i| i.id.clone())
        .collect();
    for iid in waiting {
        let deps = p.instances[&iid].waiting_on.clone();
        let mut all_done = true;
        let mut failed_on = None;
        for d in &deps {
            match p.instances.get(d).map(|i| i.status.as_str()) {
                Some("FINISHED") => {}
                Some("FAILED" | "CASCADE_FAILED" | "CANCELED") => {
                    failed_on = Some(d.clone());
                    break;
                }
                // The dependency's instance does not exist (e.g. another schedule): not blocking.
                None => {}
                _ => all_done = false,
            }
        }
        let inst = p.instances.get_mut(&iid).expect("exists");
        if let Some(f) = failed_on {
            inst.status = "CASCADE_FAILED".into();
            inst.cascade_failed_on = Some(f);
        } else if all_done {
            inst.status = "WAITING_FOR_RUNNER".into();
            new_attempt(p, &iid);
            woke = true;
        }
    }
    woke
}

fn selector_matches(o: &PipelineObject, s: &Value) -> bool {
    let field = str_arg(s, "fieldName");
    let op = s["operator"]["type"].as_str().unwrap_or("");
    let values: Vec<&str> = s["operator"]["values"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect();
    let strings: Vec<&str> = if field == "name" {
        vec![o.name.as_str()]
    } else {
        o.get_all(field).collect()
    };
    let refs: Vec<&str> = o.get_refs(field).collect();
    match op {
        "EQ" => strings.iter().chain(refs.iter()).any(|v| values.contains(v)),
        "REF_EQ" => refs.iter().any(|v| values.contains(v)),
        // Date-times in the model's format sort as strings.
        "LE" => strings.iter().any(|v| *v <= values[0]),
        "GE" => strings.iter().any(|v| *v >= values[0]),
        "BETWEEN" => strings.iter().any(|v| *v >= values[0] && *v <= values[1]),
        _ => false,
    }
}

/// Read-only views of one pipeline's objects as the API shows them.
struct View<'a> {
    p: &'a Pipeline,
    components: BTreeMap<String, PipelineObject>,
    params: BTreeMap<String, Vec<String>>,
}

impl<'a> View<'a> {
    fn new(p: &'a Pipeline) -> View<'a> {
        let def = p.active.as_ref().or(p.latest.as_ref());
        let components = def.map(resolved_objects).unwrap_or_default();
        let params = def.map(parameters).unwrap_or_default();
        View {
            p,
            components,
            params,
        }
    }

    fn common(&self, fields: &mut Vec<Field>, sphere: &str) {
        fields.push(Field::string("@sphere", sphere));
        fields.push(Field::string("@pipelineId", &self.p.id));
        fields.push(Field::string("@version", self.p.version.max(1).to_string()));
    }

    /// Any object by id: component (as defined, plus runtime fields), instance or attempt.
    fn object(&self, id: &str) -> Option<PipelineObject> {
        if let Some(a) = self.p.attempts.get(id) {
            return Some(self.attempt(a));
        }
        if let Some(i) = self.p.instances.get(id) {
            return Some(self.instance(i));
        }
        let def = self.p.active.as_ref().or(self.p.latest.as_ref())?;
        let o = def.pipeline_objects.iter().find(|o| o.id == id)?;
        let mut fields = o.fields.clone();
        self.common(&mut fields, "COMPONENT");
        if is_activity(&self.components[id]) {
            let status = if self.p.paused.contains(id) {
                "PAUSED"
            } else if self.p.state == "SCHEDULED" {
                "SCHEDULED"
            } else {
                "PENDING"
            };
            fields.push(Field::string("@status", status));
        }
        Some(PipelineObject {
            id: o.id.clone(),
            name: o.name.clone(),
            fields,
        })
    }

    /// The component's inherited fields that an instance or attempt carries (not its own
    /// `@`-fields and not `parent`, which an instance replaces with `@componentParent`).
    fn component_fields(&self, comp: &str) -> Vec<Field> {
        self.components
            .get(comp)
            .map(|c| {
                c.fields
                    .iter()
                    .filter(|f| !f.key.starts_with('@'))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn instance(&self, i: &Instance) -> PipelineObject {
        let mut fields = self.component_fields(&i.component);
        self.common(&mut fields, "INSTANCE");
        fields.push(Field::reference("@componentParent", &i.component));
        fields.push(Field::string("@status", &i.status));
        fields.push(Field::string("@scheduledStartTime", ts(i.scheduled_start)));
        fields.push(Field::string("@scheduledEndTime", ts(i.scheduled_end)));
        if let Some(t) = i.actual_start {
            fields.push(Field::string("@actualStartTime", ts(t)));
        }
        if let Some(t) = i.actual_end {
            fields.push(Field::string("@actualEndTime", ts(t)));
        }
        if let Some(a) = i.attempts.last() {
            fields.push(Field::reference("@headAttempt", a));
        }
        fields.push(Field::string("@attemptCount", i.attempts.len().to_string()));
        for w in &i.waiting_on {
            if !self.p.instances.get(w).is_some_and(|x| x.status == "FINISHED") {
                fields.push(Field::reference("@waitingOn", w));
            }
        }
        if let Some(c) = &i.cascade_failed_on {
            fields.push(Field::reference("@cascadeFailedOn", c));
        }
        if let Some(m) = &i.error_message {
            fields.push(Field::string("errorMessage", m));
        }
        PipelineObject {
            id: i.id.clone(),
            name: i.id.clone(),
            fields,
        }
    }

    fn attempt(&self, a: &Attempt) -> PipelineObject {
        let i = &self.p.instances[&a.instance];
        let mut fields = self.component_fields(&i.component);
        self.common(&mut fields, "ATTEMPT");
        fields.push(Field::reference("@componentParent", &i.component));
        fields.push(Field::reference("@instanceParent", &i.id));
        fields.push(Field::string("@status", &a.status));
        fields.push(Field::string("@scheduledStartTime", ts(i.scheduled_start)));
        fields.push(Field::string("@scheduledEndTime", ts(i.scheduled_end)));
        fields.push(Field::string("@attemptNumber", a.number.to_string()));
        let opt = [
            ("@actualStartTime", a.actual_start.map(ts)),
            ("@actualEndTime", a.actual_end.map(ts)),
            ("reportProgressTime", a.last_progress.map(ts)),
            ("hostname", a.hostname.clone()),
            ("errorId", a.error_id.clone()),
            ("errorMessage", a.error_message.clone()),
            ("errorStackTrace", a.error_stack_trace.clone()),
            ("cancellationReason", a.cancellation_reason.clone()),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                fields.push(Field::string(k, v));
            }
        }
        for f in &a.progress_fields {
            if !fields.iter().any(|x| x.key == f.key) {
                fields.push(f.clone());
            }
        }
        if let InstanceKind::Precondition { for_instances } = &i.kind {
            if let Some(n) = for_instances.first() {
                fields.push(Field::reference("node", n));
            }
        }
        PipelineObject {
            id: a.id.clone(),
            name: a.id.clone(),
            fields,
        }
    }

    /// Every object an expression may reach from `current`, with the scheduled times of the
    /// instance at hand copied onto the components it references (data nodes have instances of the
    /// same period on the service).
    fn scope_objects(
        &self,
        current: &str,
    ) -> (BTreeMap<String, PipelineObject>, BTreeMap<String, Vec<String>>) {
        let mut objects = self.components.clone();
        let times: Vec<Field> = self
            .object(current)
            .map(|o| {
                o.fields
                    .into_iter()
                    .filter(|f| f.key == "@scheduledStartTime" || f.key == "@scheduledEndTime")
                    .collect()
            })
            .unwrap_or_default();
        for o in objects.values_mut() {
            if !o.fields.iter().any(|f| f.key == "@scheduledStartTime") {
                o.fields.extend(times.iter().cloned());
            }
        }
        for i in self.p.instances.values() {
            objects.insert(i.id.clone(), self.instance(i));
        }
        for a in self.p.attempts.values() {
            objects.insert(a.id.clone(), self.attempt(a));
        }
        (objects, self.params.clone())
    }

    /// `obj` with every string field's `#{...}` evaluated in its own context. A field that does
    /// not evaluate keeps its text (and the error is logged), so that one bad field does not hide
    /// the object.
    fn evaluated(&self, obj: &PipelineObject) -> PipelineObject {
        let (objects, params) = self.scope_objects(&obj.id);
        self.evaluated_in(obj, &objects, &params)
    }

    fn evaluated_in(
        &self,
        obj: &PipelineObject,
        objects: &BTreeMap<String, PipelineObject>,
        params: &BTreeMap<String, Vec<String>>,
    ) -> PipelineObject {
        let scope = Scope {
            objects,
            current: &obj.id,
            params,
        };
        let mut out = obj.clone();
        for f in &mut out.fields {
            if let Some(s) = &f.string_value {
                if s.contains("#{") {
                    match evaluate(s, &scope) {
                        Ok(v) => f.string_value = Some(v),
                        Err(e) => {
                            tracing::warn!(object = %obj.id, key = %f.key, "expression not evaluated: {e}")
                        }
                    }
                }
            }
        }
        out
    }

    /// What PollForTask carries: the attempt object (component fields merged in) and, unless
    /// `attempt_only`, every object it references, transitively, all evaluated.
    fn task_objects(&self, aid: &str, attempt_only: bool) -> BTreeMap<String, PipelineObject> {
        let (objects, params) = self.scope_objects(aid);
        let mut out = BTreeMap::new();
        let Some(attempt) = objects.get(aid) else {
            return out;
        };
        out.insert(aid.to_string(), self.evaluated_in(attempt, &objects, &params));
        if attempt_only {
            return out;
        }
        let mut queue: Vec<String> = attempt
            .fields
            .iter()
            .filter(|f| !f.key.starts_with('@'))
            .filter_map(|f| f.ref_value.clone())
            .collect();
        while let Some(id) = queue.pop() {
            if out.contains_key(&id) {
                continue;
            }
            let Some(o) = objects.get(&id) else { continue };
            queue.extend(
                o.fields
                    .iter()
                    .filter(|f| !f.key.starts_with('@'))
                    .filter_map(|f| f.ref_value.clone()),
            );
            out.insert(id, self.evaluated_in(o, &objects, &params));
        }
        out
    }
}

/// Parameter values by id: `parameterValues`, else the parameter object's `default`.
fn parameters(def: &Definition) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for v in &def.parameter_values {
        out.entry(str_arg(v, "id").to_string())
            .or_default()
            .push(str_arg(v, "stringValue").to_string());
    }
    for po in &def.parameter_objects {
        let id = str_arg(po, "id");
        if out.contains_key(id) {
            continue;
        }
        for a in po["attributes"].as_array().into_iter().flatten() {
            if str_arg(a, "key") == "default" {
                out.entry(id.to_string())
                    .or_default()
                    .push(str_arg(a, "stringValue").to_string());
            }
        }
    }
    out
}

type Messages = Vec<(String, Vec<String>)>;

/// The service-side checks of PutPipelineDefinition/ValidatePipelineDefinition: errors (the
/// definition is not saved) and warnings, per object id.
pub fn validate_definition(def: &Definition) -> (Messages, Messages) {
    let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut warnings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut err = |id: &str, m: String| errors.entry(id.to_string()).or_default().push(m);
    let mut ids = BTreeSet::new();
    for o in &def.pipeline_objects {
        if !ids.insert(o.id.as_str()) {
            err(&o.id, format!("Duplicate object id {}", o.id));
        }
    }
    let objects = resolved_objects(def);
    let ondemand = is_ondemand(def);
    let epoch = Utc.timestamp_opt(0, 0).single().unwrap_or_default();
    for o in &def.pipeline_objects {
        for f in &o.fields {
            if let Some(r) = &f.ref_value {
                if !ids.contains(r.as_str()) {
                    err(
                        &o.id,
                        format!("Field '{}' references a non-existent object '{r}'", f.key),
                    );
                }
            }
        }
        let r = &objects[&o.id];
        let ty = r.get("type");
        if o.id != "Default" && ty.is_none() {
            err(&o.id, "Object has no 'type' field".into());
        }
        for key in [
            "retryDelay",
            "attemptTimeout",
            "reportProgressTimeout",
            "preconditionTimeout",
            "lateAfterTimeout",
        ] {
            if let Some(v) = o.get(key) {
                match Period::parse(v) {
                    Err(e) => err(&o.id, format!("Field '{key}': {e}")),
                    Ok(p) if key == "retryDelay" && p.add_to(epoch) - epoch < TimeDelta::minutes(2) => {
                        warnings.entry(o.id.clone()).or_default().push(format!(
                            "Field 'retryDelay' is below the service's minimum of 2 minutes (accepted locally)"
                        ))
                    }
                    Ok(_) => {}
                }
            }
        }
        if let Some(v) = o.get("maximumRetries") {
            match v.trim().parse::<u32>() {
                Ok(n) if n <= 5 => {}
                _ => err(
                    &o.id,
                    format!("Field 'maximumRetries' must be an integer from 0 to 5, got {v:?}"),
                ),
            }
        }
        match ty {
            Some("ShellCommandActivity") | Some("ShellCommandPrecondition") => {
                match (r.get("command").is_some(), r.get("scriptUri").is_some()) {
                    (false, false) => err(&o.id, "One of 'command' or 'scriptUri' is required".into()),
                    (true, true) => err(&o.id, "Use only one of 'command' and 'scriptUri'".into()),
                    _ => {}
                }
            }
            Some("Schedule") => {
                if let Some(p) = r.get("period") {
                    if let Err(e) = Period::parse(p) {
                        err(&o.id, format!("Field 'period': {e}"));
                    }
                } else {
                    err(&o.id, "Schedule requires 'period'".into());
                }
                match (r.get("startDateTime"), r.get("startAt")) {
                    (None, None) => err(
                        &o.id,
                        "Schedule requires one of 'startDateTime' or 'startAt'".into(),
                    ),
                    (Some(_), Some(_)) => err(&o.id, "Use only one of 'startDateTime' and 'startAt'".into()),
                    (Some(s), None) => {
                        if let Err(e) = parse_datetime(s) {
                            err(&o.id, format!("Field 'startDateTime': {e}"));
                        }
                    }
                    (None, Some(s)) if s != "FIRST_ACTIVATION_DATE_TIME" => err(
                        &o.id,
                        format!("Field 'startAt' must be FIRST_ACTIVATION_DATE_TIME, got {s:?}"),
                    ),
                    _ => {}
                }
                if let Some(s) = r.get("endDateTime") {
                    if let Err(e) = parse_datetime(s) {
                        err(&o.id, format!("Field 'endDateTime': {e}"));
                    }
                }
                if r.get("endDateTime").is_some() && r.get("occurrences").is_some() {
                    err(&o.id, "Use only one of 'endDateTime' and 'occurrences'".into());
                }
            }
            _ => {}
        }
        if is_activity(r) {
            if route_of(r).is_none() {
                err(
                    &o.id,
                    "An activity needs 'runsOn' or 'workerGroup' (else it waits for a runner forever)".into(),
                );
            }
            let has_schedule = r.get_ref("schedule").is_some();
            if ondemand && has_schedule {
                err(&o.id, "An ondemand pipeline cannot use a 'schedule'".into());
            }
            if !ondemand && !has_schedule {
                err(
                    &o.id,
                    "Object needs a 'schedule' (or set scheduleType ondemand on Default)".into(),
                );
            }
        }
    }
    // dependsOn cycles.
    for o in &def.pipeline_objects {
        let mut stack: Vec<&str> = o.get_refs("dependsOn").collect();
        let mut seen = BTreeSet::new();
        while let Some(d) = stack.pop() {
            if d == o.id {
                err(&o.id, "dependsOn forms a cycle".into());
                break;
            }
            if seen.insert(d) {
                if let Some(x) = objects.get(d) {
                    stack.extend(x.get_refs("dependsOn"));
                }
            }
        }
    }
    for po in &def.parameter_objects {
        let id = str_arg(po, "id");
        if !id.starts_with("my") {
            err(id, format!("Parameter id {id:?} must start with 'my'"));
        }
    }
    let declared: BTreeSet<&str> = def.parameter_objects.iter().map(|p| str_arg(p, "id")).collect();
    for v in &def.parameter_values {
        let id = str_arg(v, "id");
        if !declared.contains(id) {
            err(id, format!("Parameter value {id:?} has no parameter object"));
        }
    }
    let _ = format_datetime;
    (errors.into_iter().collect(), warnings.into_iter().collect())
}
