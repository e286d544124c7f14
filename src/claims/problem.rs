//! One validation problem: which request field, what kind, which rule, and a message that names
//! the field and the rule but never repeats the client's value (it may be PHI).

use serde::Serialize;

/// What kind of problem, so the HTTP edge can pick the FHIR `OperationOutcome.issue.code`:
/// `Required` -> `required`, `Invalid` -> `value`, `UnknownCode` -> `code-invalid`,
/// `BusinessRule` -> `business-rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The field (or something the claim needs, such as the practitioner's NPI) is missing.
    Required,
    /// The field is present but has the wrong type or format, or is out of range.
    Invalid,
    /// The field is well-formed but names no known code (CPT, ICD-10-CM, payer, currency).
    UnknownCode,
    /// The claim is well-formed but breaks a rule (a payer's rule, timely filing, copay above fee).
    BusinessRule,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The request field, e.g. `fee`, `icd10_codes[1]`, `member_id`.
    pub field: String,
    pub kind: ProblemKind,
    /// A stable id for the rule, e.g. `fee.positive`, `cpt.known`, `payer.BCBS.prior-authorization-90837`.
    pub rule: String,
    /// `"{field}: {what the rule wants}"`; contains no value from the request.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(
        field: impl Into<String>,
        kind: ProblemKind,
        rule: impl Into<String>,
        what: impl AsRef<str>,
    ) -> Self {
        let field = field.into();
        let message = format!("{field}: {}", what.as_ref());
        Self {
            field,
            kind,
            rule: rule.into(),
            message,
        }
    }
}
