//! Validation of incoming resources. Today: the body is a JSON object of the expected
//! `resourceType`. Still to build (issue 4): structural validation against fhir-sdk's typed models
//! (unknown elements, wrong JSON types, bad codes of required bindings, malformed dates), each
//! issue naming its element path and never echoing the value.

use serde_json::{json, Value};

pub struct Issue {
    pub path: String,
    pub message: String,
}

impl Issue {
    pub fn to_outcome_issue(&self) -> Value {
        json!({ "severity": "error", "code": "structure", "diagnostics": self.message, "expression": [self.path] })
    }
}

pub fn validate(expected_type: &str, resource: &Value) -> Result<(), Vec<Issue>> {
    if resource.get("resourceType").and_then(Value::as_str) == Some(expected_type) {
        Ok(())
    } else {
        Err(vec![Issue {
            path: "resourceType".into(),
            message: format!("expected a {expected_type}"),
        }])
    }
}
