//! The wire shapes of Data Pipeline that both sides share: the runner reads them from
//! PollForTask/DescribeObjects, `datapipeline-local` writes them. Field names follow the API model
//! (`../shared/reference/datapipeline-service-2.json`): `PipelineObject`, `Field`, `TaskObject`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One key/value pair of a pipeline object: either a string or a reference to another object,
/// never both. Repeated keys form a list and keep their order (`scriptArgument`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Field {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string_value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_value: Option<String>,
}

impl Field {
    pub fn string(key: impl Into<String>, value: impl Into<String>) -> Self {
        Field {
            key: key.into(),
            string_value: Some(value.into()),
            ref_value: None,
        }
    }
    pub fn reference(key: impl Into<String>, id: impl Into<String>) -> Self {
        Field {
            key: key.into(),
            string_value: None,
            ref_value: Some(id.into()),
        }
    }
}

/// A pipeline object (component, instance or attempt) as the API carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineObject {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub fields: Vec<Field>,
}

impl PipelineObject {
    /// The first string value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|f| f.key == key)
            .and_then(|f| f.string_value.as_deref())
    }
    /// Every string value of `key`, in order (repeated keys form a list).
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |f| f.key == key)
            .filter_map(|f| f.string_value.as_deref())
    }
    /// The first reference value of `key`.
    pub fn get_ref(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|f| f.key == key)
            .and_then(|f| f.ref_value.as_deref())
    }
    /// Every reference value of `key`, in order.
    pub fn get_refs<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |f| f.key == key)
            .filter_map(|f| f.ref_value.as_deref())
    }
}

/// What PollForTask hands out. `objects` is keyed by object id; the real service sends the attempt
/// object (with its component's fields merged in) and may or may not add the objects it references.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskObject {
    pub task_id: String,
    pub pipeline_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_id: Option<String>,
    #[serde(default)]
    pub objects: BTreeMap<String, PipelineObject>,
}

/// `SetTaskStatus.taskStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskStatus {
    Finished,
    Failed,
    /// A precondition that evaluated false.
    False,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Finished => "FINISHED",
            TaskStatus::Failed => "FAILED",
            TaskStatus::False => "FALSE",
        }
    }
}

/// `InstanceIdentity` of PollForTask: the EC2 identity document and its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceIdentity {
    pub document: String,
    pub signature: String,
}
