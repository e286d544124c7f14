//! R4 rules that fhir-sdk's R4B model does not carry, for every resource type it models: codes of
//! required bindings that fhir-sdk reads as free strings (`Coverage.status`, `Claim.status` and
//! `ClaimResponse.status`: fm-status) or into an enum that accepts any code, and the one array of
//! minimum cardinality 1 whose absence fhir-sdk accepts (its other such arrays have no serde
//! default, so absence is a missing field, and an empty array is refused by the round trip).
//!
//! Derived once by comparing the R4 (4.0.1) StructureDefinitions and ValueSets of the
//! `hl7.fhir.r4.examples` package (npm) with fhir-sdk 0.16's `r4b` structs: every element with a
//! minimum of 1 that fhir-sdk types as `Vec` with a default, and every `code` element bound
//! (required) to a value set of at most a few dozen codes that fhir-sdk types as `String` or as
//! an enum with a `_Custom` variant. Left out: rules on data types (`Signature.type`,
//! `MarketingStatus`), and bindings to open-ended value sets (mime types, currencies, resource
//! and data type names).

use serde_json::Value;

use super::de::Path;
use super::{IssueCode, Issues};

enum Rule {
    /// The element must be present with at least one item.
    AtLeastOne,
    /// The element's code (or each of its codes) must be one of these.
    Codes(&'static [&'static str]),
}

/// Paths from the resource type down, through arrays transparently.
const RULES: &[(&str, Rule)] = &[
    (
        "CapabilityStatement.rest.interaction.code",
        Rule::Codes(SYSTEM_RESTFUL_INTERACTION),
    ),
    (
        "CapabilityStatement.rest.resource.interaction.code",
        Rule::Codes(TYPE_RESTFUL_INTERACTION),
    ),
    (
        "CarePlan.activity.detail.kind",
        Rule::Codes(CARE_PLAN_ACTIVITY_KIND),
    ),
    ("CarePlan.intent", Rule::Codes(CARE_PLAN_INTENT)),
    ("Claim.status", Rule::Codes(FM_STATUS)),
    ("ClaimResponse.status", Rule::Codes(FM_STATUS)),
    (
        "ClinicalImpression.status",
        Rule::Codes(CLINICALIMPRESSION_STATUS),
    ),
    (
        "Composition.confidentiality",
        Rule::Codes(V3_CONFIDENTIALITYCLASSIFICATION),
    ),
    (
        "Contract.contentDefinition.publicationStatus",
        Rule::Codes(CONTRACT_PUBLICATIONSTATUS),
    ),
    ("Contract.status", Rule::Codes(CONTRACT_STATUS)),
    ("Coverage.status", Rule::Codes(FM_STATUS)),
    ("CoverageEligibilityRequest.status", Rule::Codes(FM_STATUS)),
    ("CoverageEligibilityResponse.status", Rule::Codes(FM_STATUS)),
    ("EnrollmentRequest.status", Rule::Codes(FM_STATUS)),
    ("EnrollmentResponse.status", Rule::Codes(FM_STATUS)),
    ("EvidenceVariable.characteristic", Rule::AtLeastOne),
    ("Immunization.status", Rule::Codes(IMMUNIZATION_STATUS)),
    (
        "ImmunizationEvaluation.status",
        Rule::Codes(IMMUNIZATION_EVALUATION_STATUS),
    ),
    ("Medication.status", Rule::Codes(MEDICATION_STATUS)),
    (
        "MedicationAdministration.status",
        Rule::Codes(MEDICATION_ADMIN_STATUS),
    ),
    (
        "MedicationDispense.status",
        Rule::Codes(MEDICATIONDISPENSE_STATUS),
    ),
    (
        "MedicationKnowledge.status",
        Rule::Codes(MEDICATIONKNOWLEDGE_STATUS),
    ),
    (
        "MedicationRequest.intent",
        Rule::Codes(MEDICATIONREQUEST_INTENT),
    ),
    (
        "MedicationRequest.status",
        Rule::Codes(MEDICATIONREQUEST_STATUS),
    ),
    (
        "MedicationStatement.status",
        Rule::Codes(MEDICATION_STATEMENT_STATUS),
    ),
    (
        "MessageDefinition.responseRequired",
        Rule::Codes(MESSAGEHEADER_RESPONSE_REQUEST),
    ),
    ("MolecularSequence.quality.type", Rule::Codes(QUALITY_TYPE)),
    (
        "MolecularSequence.referenceSeq.orientation",
        Rule::Codes(ORIENTATION_TYPE),
    ),
    (
        "MolecularSequence.referenceSeq.strand",
        Rule::Codes(STRAND_TYPE),
    ),
    (
        "MolecularSequence.repository.type",
        Rule::Codes(REPOSITORY_TYPE),
    ),
    ("MolecularSequence.type", Rule::Codes(SEQUENCE_TYPE)),
    ("PaymentNotice.status", Rule::Codes(FM_STATUS)),
    ("PaymentReconciliation.status", Rule::Codes(FM_STATUS)),
    ("Task.intent", Rule::Codes(TASK_INTENT)),
    ("VisionPrescription.status", Rule::Codes(FM_STATUS)),
];

const CARE_PLAN_ACTIVITY_KIND: &[&str] = &[
    "Appointment",
    "CommunicationRequest",
    "DeviceRequest",
    "MedicationRequest",
    "NutritionOrder",
    "Task",
    "ServiceRequest",
    "VisionPrescription",
];
const CARE_PLAN_INTENT: &[&str] = &["proposal", "plan", "order", "option"];
const CLINICALIMPRESSION_STATUS: &[&str] = &["in-progress", "completed", "entered-in-error"];
const CONTRACT_PUBLICATIONSTATUS: &[&str] = &[
    "amended",
    "appended",
    "cancelled",
    "disputed",
    "entered-in-error",
    "executable",
    "executed",
    "negotiable",
    "offered",
    "policy",
    "rejected",
    "renewed",
    "revoked",
    "resolved",
    "terminated",
];
const CONTRACT_STATUS: &[&str] = &[
    "amended",
    "appended",
    "cancelled",
    "disputed",
    "entered-in-error",
    "executable",
    "executed",
    "negotiable",
    "offered",
    "policy",
    "rejected",
    "renewed",
    "revoked",
    "resolved",
    "terminated",
];
const FM_STATUS: &[&str] = &["active", "cancelled", "draft", "entered-in-error"];
const IMMUNIZATION_EVALUATION_STATUS: &[&str] = &["completed", "entered-in-error"];
const IMMUNIZATION_STATUS: &[&str] = &["completed", "entered-in-error", "not-done"];
const MEDICATION_ADMIN_STATUS: &[&str] = &[
    "in-progress",
    "not-done",
    "on-hold",
    "completed",
    "entered-in-error",
    "stopped",
    "unknown",
];
const MEDICATION_STATEMENT_STATUS: &[&str] = &[
    "active",
    "completed",
    "entered-in-error",
    "intended",
    "stopped",
    "on-hold",
    "unknown",
    "not-taken",
];
const MEDICATION_STATUS: &[&str] = &["active", "inactive", "entered-in-error"];
const MEDICATIONDISPENSE_STATUS: &[&str] = &[
    "preparation",
    "in-progress",
    "cancelled",
    "on-hold",
    "completed",
    "entered-in-error",
    "stopped",
    "declined",
    "unknown",
];
const MEDICATIONKNOWLEDGE_STATUS: &[&str] = &["active", "inactive", "entered-in-error"];
const MEDICATIONREQUEST_INTENT: &[&str] = &[
    "proposal",
    "plan",
    "order",
    "original-order",
    "reflex-order",
    "filler-order",
    "instance-order",
    "option",
];
const MEDICATIONREQUEST_STATUS: &[&str] = &[
    "active",
    "on-hold",
    "cancelled",
    "completed",
    "entered-in-error",
    "stopped",
    "draft",
    "unknown",
];
const MESSAGEHEADER_RESPONSE_REQUEST: &[&str] = &["always", "on-error", "never", "on-success"];
const ORIENTATION_TYPE: &[&str] = &["sense", "antisense"];
const QUALITY_TYPE: &[&str] = &["indel", "snp", "unknown"];
const REPOSITORY_TYPE: &[&str] = &["directlink", "openapi", "login", "oauth", "other"];
const SEQUENCE_TYPE: &[&str] = &["aa", "dna", "rna"];
const STRAND_TYPE: &[&str] = &["watson", "crick"];
const SYSTEM_RESTFUL_INTERACTION: &[&str] =
    &["transaction", "batch", "search-system", "history-system"];
const TASK_INTENT: &[&str] = &[
    "unknown",
    "proposal",
    "plan",
    "order",
    "original-order",
    "reflex-order",
    "filler-order",
    "instance-order",
    "option",
];
const TYPE_RESTFUL_INTERACTION: &[&str] = &[
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
];
const V3_CONFIDENTIALITYCLASSIFICATION: &[&str] = &["U", "L", "M", "N", "R", "V"];

/// Applies the rules of `resource`'s type to it and to the resources it contains.
pub(super) fn check(resource: &Value, path: &Path<'_>, issues: &mut Issues) {
    let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str) else {
        return;
    };
    for (rule_path, rule) in RULES {
        let mut steps = rule_path.split('.');
        if steps.next() == Some(resource_type) {
            apply(resource, &steps.collect::<Vec<_>>(), rule, path, issues);
        }
    }
    if let Some(Value::Array(contained)) = resource.get("contained") {
        let at = Path::Key(path, "contained");
        for (i, inner) in contained.iter().enumerate() {
            check(inner, &Path::Index(&at, i), issues);
        }
    }
}

fn apply(node: &Value, steps: &[&str], rule: &Rule, path: &Path<'_>, issues: &mut Issues) {
    let (Some((step, rest)), Value::Object(map)) = (steps.split_first(), node) else {
        return;
    };
    let here = Path::Key(path, step);
    let value = map.get(*step);
    if !rest.is_empty() {
        match value {
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    apply(item, rest, rule, &Path::Index(&here, i), issues);
                }
            }
            Some(item) => apply(item, rest, rule, &here, issues),
            None => {}
        }
        return;
    }
    match (rule, value) {
        (Rule::AtLeastOne, None) => issues.push(
            IssueCode::Required,
            here.render(),
            "a required element is missing",
        ),
        (Rule::Codes(codes), Some(Value::String(code))) if !codes.contains(&code.as_str()) => {
            issues.push(IssueCode::CodeInvalid, here.render(), BAD_CODE);
        }
        (Rule::Codes(codes), Some(Value::Array(items))) => {
            for (i, item) in items.iter().enumerate() {
                if item.as_str().is_some_and(|code| !codes.contains(&code)) {
                    issues.push(
                        IssueCode::CodeInvalid,
                        Path::Index(&here, i).render(),
                        BAD_CODE,
                    );
                }
            }
        }
        // Wrong JSON types and empty arrays are the typed check's to report.
        _ => {}
    }
}

const BAD_CODE: &str = "not a code of the required value set";
