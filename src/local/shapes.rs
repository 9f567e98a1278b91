//! Request validation driven by the official API model (`datapipeline-service-2.json`, embedded):
//! required members, string lengths and character set, enums, types, list limits. A failure names
//! the member by its path (`pipelineObjects[3].fields[0].key`), as `InvalidRequestException` does.

use serde_json::{Map, Value};
use std::sync::OnceLock;

/// The API model, unchanged from botocore (Apache-2.0).
pub const MODEL_JSON: &str = include_str!("datapipeline-service-2.json");

fn model() -> &'static Value {
    static MODEL: OnceLock<Value> = OnceLock::new();
    MODEL.get_or_init(|| serde_json::from_str(MODEL_JSON).expect("embedded API model is valid JSON"))
}

/// The names of the operations the model defines.
pub fn operation_names() -> Vec<&'static str> {
    model()["operations"]
        .as_object()
        .map(|ops| ops.keys().map(|k| k.as_str()).collect())
        .unwrap_or_default()
}

/// The input shape of an operation, or `None` for an unknown operation.
pub fn input_shape(operation: &str) -> Option<&'static str> {
    model()["operations"].get(operation)?["input"]["shape"].as_str()
}

/// Validates `body` against the input shape of `operation`.
pub fn validate_input(operation: &str, body: &Value) -> Result<(), String> {
    let shape = input_shape(operation).ok_or_else(|| format!("unknown operation {operation}"))?;
    if !body.is_object() {
        return Err("the request body must be a JSON object".into());
    }
    check(shape, body, "")
}

fn shape_def(name: &str) -> &'static Value {
    &model()["shapes"][name]
}

fn member_path(parent: &str, member: &str) -> String {
    if parent.is_empty() {
        member.to_string()
    } else {
        format!("{parent}.{member}")
    }
}

/// The character set of the model's `pattern` (every constrained string uses the same one).
fn allowed_char(c: char) -> bool {
    matches!(c, '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}' | '\r' | '\n' | '\t')
}

fn check(shape: &str, v: &Value, path: &str) -> Result<(), String> {
    let def = shape_def(shape);
    let what = if path.is_empty() { "request" } else { path };
    match def["type"].as_str().unwrap_or("") {
        "structure" => {
            let obj: &Map<String, Value> = v
                .as_object()
                .ok_or_else(|| format!("{what} must be an object ({shape})"))?;
            let members = def["members"].as_object().cloned().unwrap_or_default();
            if let Some(req) = def["required"].as_array() {
                for r in req.iter().filter_map(|r| r.as_str()) {
                    if obj.get(r).is_none_or(|x| x.is_null()) {
                        return Err(format!("{} is required", member_path(path, r)));
                    }
                }
            }
            for (k, val) in obj {
                // Unknown members are ignored, as AWS JSON services do for forward compatibility.
                let Some(m) = members.get(k) else { continue };
                if val.is_null() {
                    continue;
                }
                let sub = m["shape"].as_str().unwrap_or("");
                check(sub, val, &member_path(path, k))?;
            }
            Ok(())
        }
        "list" => {
            let arr = v.as_array().ok_or_else(|| format!("{what} must be a list"))?;
            if let Some(max) = def["max"].as_u64() {
                if arr.len() as u64 > max {
                    return Err(format!("{what} has {} items, at most {max} allowed", arr.len()));
                }
            }
            if let Some(min) = def["min"].as_u64() {
                if (arr.len() as u64) < min {
                    return Err(format!("{what} has {} items, at least {min} required", arr.len()));
                }
            }
            let member = def["member"]["shape"].as_str().unwrap_or("");
            for (i, item) in arr.iter().enumerate() {
                check(member, item, &format!("{what}[{i}]"))?;
            }
            Ok(())
        }
        "map" => {
            let obj = v.as_object().ok_or_else(|| format!("{what} must be a map"))?;
            let key = def["key"]["shape"].as_str().unwrap_or("");
            let value = def["value"]["shape"].as_str().unwrap_or("");
            for (k, item) in obj {
                check(key, &Value::String(k.clone()), &format!("{what} key"))?;
                check(value, item, &format!("{what}[{k}]"))?;
            }
            Ok(())
        }
        "string" => {
            let s = v.as_str().ok_or_else(|| format!("{what} must be a string"))?;
            let len = s.chars().count() as u64;
            if let Some(min) = def["min"].as_u64() {
                if len < min {
                    return Err(format!("{what} must be at least {min} characters long"));
                }
            }
            if let Some(max) = def["max"].as_u64() {
                if len > max {
                    return Err(format!(
                        "{what} must be at most {max} characters long (got {len})"
                    ));
                }
            }
            if def.get("pattern").is_some() && !s.chars().all(allowed_char) {
                return Err(format!("{what} contains a character outside the allowed set"));
            }
            if let Some(values) = def["enum"].as_array() {
                if !values.iter().any(|e| e.as_str() == Some(s)) {
                    let list: Vec<&str> = values.iter().filter_map(|e| e.as_str()).collect();
                    return Err(format!("{what} must be one of {}, got {s:?}", list.join(", ")));
                }
            }
            Ok(())
        }
        "boolean" => v
            .is_boolean()
            .then_some(())
            .ok_or_else(|| format!("{what} must be a boolean")),
        "integer" => v
            .as_i64()
            .filter(|n| i32::try_from(*n).is_ok())
            .map(|_| ())
            .ok_or_else(|| format!("{what} must be a 32-bit integer")),
        // AWS JSON sends timestamps as epoch seconds (a number).
        "timestamp" => v
            .is_number()
            .then_some(())
            .ok_or_else(|| format!("{what} must be a timestamp (epoch seconds)")),
        other => Err(format!("{what}: unsupported shape type {other:?} in the model")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_operation_has_an_input_shape() {
        let ops = operation_names();
        assert_eq!(ops.len(), 19);
        for op in ops {
            assert!(input_shape(op).is_some(), "{op}");
        }
    }

    #[test]
    fn names_the_member() {
        let e = validate_input("CreatePipeline", &json!({"name": "x"})).unwrap_err();
        assert!(e.contains("uniqueId"), "{e}");
        let e = validate_input("SetTaskStatus", &json!({"taskId": "t", "taskStatus": "DONE"})).unwrap_err();
        assert!(e.contains("taskStatus") && e.contains("FINISHED"), "{e}");
        let long = "x".repeat(1025);
        let e = validate_input("CreatePipeline", &json!({"name": long, "uniqueId": "u"})).unwrap_err();
        assert!(e.contains("name") && e.contains("1024"), "{e}");
        let e = validate_input(
            "PutPipelineDefinition",
            &json!({"pipelineId": "df-1", "pipelineObjects": [{"id": "a", "name": "a", "fields": [{"stringValue": "v"}]}]}),
        )
        .unwrap_err();
        assert_eq!(e, "pipelineObjects[0].fields[0].key is required");
        let tags: Vec<_> = (0..11)
            .map(|i| json!({"key": format!("k{i}"), "value": ""}))
            .collect();
        let e = validate_input("AddTags", &json!({"pipelineId": "df-1", "tags": tags})).unwrap_err();
        assert!(e.contains("at most 10"), "{e}");
        assert!(validate_input("PollForTask", &json!({"workerGroup": "wg"})).is_ok());
        assert!(validate_input("PollForTask", &json!({"workerGroup": 5})).is_err());
        assert!(validate_input(
            "QueryObjects",
            &json!({"pipelineId": "p", "sphere": "INSTANCE", "limit": "x"})
        )
        .is_err());
    }
}
