//! Structural validation of incoming resources against fhir-sdk 0.16's typed R4B models (the
//! gateway speaks R4 4.0.1; R4B is wire-compatible with it for the types the gateway serves).
//! Every issue names its element as a FHIRPath-style expression (`Patient.name[0].given[1]`) and
//! never quotes the submitted value, which may be PHI: only fixed diagnostics leave this module,
//! and of the body only element names that are shaped like FHIR element names.
//!
//! What is checked, and how:
//! - `resourceType` is the expected one (else the single issue `expected a {type}`).
//! - The body is read into the typed model (`model`) through a path-tracking deserializer over
//!   the borrowed `Value` (`de`; the body is not cloned): JSON types, codes of the required
//!   bindings fhir-sdk types as enums (`Patient.gender`, `Encounter.status`), date, dateTime,
//!   instant and time formats, integer ranges (positiveInt, unsignedInt), base64, required
//!   elements (`Claim.patient`, `Coverage.status`, `Coverage.payor`, a required `value[x]`). serde
//!   stops at the first such fault: one of these issues at most.
//! - The model is written back and compared with the body (`diff`). fhir-sdk ignores unknown
//!   fields, so every key it did not write back is reported, all of them, each with its path;
//!   so are `null`s, empty arrays, objects and strings, `_x` siblings of non-primitive elements,
//!   `null` placeholders without their `_x` partner, and dates fhir-sdk reads leniently
//!   (`1990-1`, `+1990`, `19741225`).
//! - R4 rules the R4B model does not carry (`rules`): required bindings fhir-sdk reads as free
//!   text (fm-status of `Coverage.status`, `Claim.status`, `ClaimResponse.status`) or into an
//!   enum that takes any code (`Task.intent`).
//!
//! Any resource type fhir-sdk models can be checked, contained resources and Bundle entries
//! included; another type (an R4 type that R4B dropped) gets `not-supported`. A body nested
//! deeper than 48 levels is refused before the typed check (`too-costly`), so a crafted body
//! cannot overflow a worker's stack; at most 100 issues are listed.
//!
//! Not checked: terminology beyond required bindings (extensible and preferred bindings, code
//! systems of Codings), invariants and other FHIRPath constraints (`ele-1`, `dom-3`, ...),
//! profiles in `meta.profile`, reference targets, the XHTML of `Narrative.div`, the regular
//! expressions of the string-based primitives (`id`, `oid`, `uri`, ...) beyond non-emptiness,
//! whether a `_x` belongs to a primitive when `x` itself is absent, and R4 elements of types the
//! gateway does not serve that R4B changed (R4B redesigned `Evidence`, for one).
//!
//! Cost, measured with `tests::validating_the_patient_example_is_cheap` (release build, one
//! core): 35 µs to validate the official `Patient-example.json` (2.5 KB), where fhir-sdk's typed
//! read alone through serde_json's own `&Value` deserializer takes 10 µs and read plus write-back
//! 18 µs; 22 µs for `Claim-100150.json`. The write-back and the comparison are the price of
//! finding unknown elements, which fhir-sdk does not refuse.

mod de;
mod diff;
mod model;
mod rules;

#[cfg(test)]
mod tests;

use serde_json::{json, Value};

use de::{Kind, Path};

/// OperationOutcome issue codes (<https://hl7.org/fhir/R4/valueset-issue-type.html>) this
/// module reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    /// Wrong JSON type, unknown element, null or empty value.
    Structure,
    /// A value not valid for its type (a malformed date, a number out of range).
    Value,
    /// A code outside a required value set.
    CodeInvalid,
    /// A required element is missing.
    Required,
    /// A resource type fhir-sdk does not model.
    NotSupported,
    /// More issues than are listed.
    TooCostly,
}

impl IssueCode {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Structure => "structure",
            IssueCode::Value => "value",
            IssueCode::CodeInvalid => "code-invalid",
            IssueCode::Required => "required",
            IssueCode::NotSupported => "not-supported",
            IssueCode::TooCostly => "too-costly",
        }
    }
}

#[derive(Debug)]
pub struct Issue {
    /// FHIRPath-style expression of the element (`Patient.birthDate`).
    pub path: String,
    /// Diagnostics; never the submitted value.
    pub message: String,
    pub code: IssueCode,
}

impl Issue {
    pub fn to_outcome_issue(&self) -> Value {
        json!({
            "severity": "error",
            "code": self.code.as_str(),
            "diagnostics": self.message,
            "expression": [self.path],
        })
    }
}

/// Checks that `resource` is a structurally valid R4 resource of `expected_type`.
pub fn validate(expected_type: &str, resource: &Value) -> Result<(), Vec<Issue>> {
    if resource.get("resourceType").and_then(Value::as_str) != Some(expected_type) {
        return Err(vec![Issue {
            path: "resourceType".into(),
            message: format!("expected a {expected_type}"),
            code: IssueCode::Structure,
        }]);
    }
    if expected_type.starts_with('_') || !de::is_element_name(expected_type) {
        // Every expression below starts with the type's name: one not shaped like a FHIR name
        // is the caller's (or the body's) text, which must not be echoed.
        return Err(vec![Issue {
            path: "resourceType".into(),
            message: model::NOT_A_RESOURCE_TYPE.into(),
            code: IssueCode::Structure,
        }]);
    }
    let root = Path::Root {
        name: expected_type,
        prefix: &[],
    };
    let mut issues = Issues::default();
    if nested_deeper_than(resource, MAX_DEPTH) {
        issues.push(
            IssueCode::TooCostly,
            expected_type.to_owned(),
            format!("nested deeper than {MAX_DEPTH} levels of objects and arrays"),
        );
        return issues.finish();
    }
    if !model::check_resource(expected_type, resource, &root, resource, &mut issues) {
        issues.push(
            IssueCode::NotSupported,
            expected_type.to_owned(),
            "this resource type is not supported",
        );
    }
    rules::check(resource, &root, &mut issues);
    issues.finish()
}

/// How deep a body may nest objects and arrays. The deepest of the 5,300 official R4 examples
/// nests 22 levels. The typed check spends stack on every level (serde's visitors, and more for
/// resources inside resources, which serde buffers), and a request runs on a worker thread of
/// 2 MiB: a bound well below serde_json's own 128 keeps a crafted body from overflowing it (an
/// overflow aborts the process).
const MAX_DEPTH: usize = 48;

fn nested_deeper_than(value: &Value, levels: usize) -> bool {
    let deeper = |child: &Value| nested_deeper_than(child, levels - 1);
    match value {
        Value::Array(items) => levels == 0 || items.iter().any(deeper),
        Value::Object(map) => levels == 0 || map.values().any(deeper),
        _ => false,
    }
}

/// At most this many issues are listed; a body with more is refused all the same.
const MAX_ISSUES: usize = 100;

/// The issues found so far, each path and message once.
#[derive(Default)]
struct Issues {
    list: Vec<Issue>,
    unlisted: usize,
}

impl Issues {
    fn push(&mut self, code: IssueCode, path: String, message: impl Into<String>) {
        let message = message.into();
        if self
            .list
            .iter()
            .any(|i| i.path == path && i.message == message)
        {
            return;
        }
        if self.list.len() < MAX_ISSUES {
            self.list.push(Issue {
                path,
                message,
                code,
            });
        } else {
            self.unlisted += 1;
        }
    }

    fn push_kind(&mut self, kind: &Kind, path: String) {
        let (code, message) = kind.describe();
        self.push(code, path, message);
    }

    /// Issues found, listed or not.
    fn len(&self) -> usize {
        self.list.len() + self.unlisted
    }

    fn finish(mut self) -> Result<(), Vec<Issue>> {
        if self.list.is_empty() {
            return Ok(());
        }
        if self.unlisted > 0 {
            let root = self.list[0]
                .path
                .split(['.', '['])
                .next()
                .unwrap_or_default();
            let issue = Issue {
                path: root.to_owned(),
                message: format!("{} more issues are not listed", self.unlisted),
                code: IssueCode::TooCostly,
            };
            self.list.push(issue);
        }
        Err(self.list)
    }
}
