//! A patient's care and its billing: Coverage (insurance), Encounter (a therapy session),
//! Claim and ClaimResponse. Each belongs to one patient (the audit trail records which).
//! Dates of care are PHI: only their years are indexed (see `search`).

use serde_json::Value;

use super::fields;
use super::search::{period_range_us, Param, ParamKind, SystemValue};
use super::Kind;

const PATIENT_DOC: &str = "Patient/{id} or {id}";

pub static COVERAGE: Kind = Kind {
    resource_type: "Coverage",
    params: &[
        Param {
            name: "identifier",
            kind: ParamKind::Identifier { identifiers },
            doc: "system|value, value, |value or system| (exact match; the value is a blind index)",
        },
        Param {
            name: "patient",
            kind: ParamKind::Reference {
                target: "Patient",
                ids: beneficiary,
            },
            doc: "the beneficiary: Patient/{id} or {id}",
        },
        Param {
            name: "beneficiary",
            kind: ParamKind::Reference {
                target: "Patient",
                ids: beneficiary,
            },
            doc: "the same as patient (FHIR R4 defines both): Patient/{id} or {id}",
        },
        Param {
            name: "payor",
            kind: ParamKind::Reference {
                target: "Organization",
                ids: payors,
            },
            doc: "an insurer: Organization/{id} or {id}",
        },
        Param {
            name: "status",
            kind: ParamKind::Code { codes: status },
            doc: "active | cancelled | draft | entered-in-error",
        },
    ],
    patient: |r, _| beneficiary(r).into_iter().next(),
};

pub static ENCOUNTER: Kind = Kind {
    resource_type: "Encounter",
    params: &[
        Param {
            name: "patient",
            kind: ParamKind::Reference {
                target: "Patient",
                ids: subject,
            },
            doc: PATIENT_DOC,
        },
        Param {
            name: "date",
            kind: ParamKind::Date {
                ranges: period,
                year_index: "date:year",
            },
            doc: "the period: prefixes eq (default), lt, gt, le, ge; a date, YYYY, YYYY-MM or an instant",
        },
        Param {
            name: "practitioner",
            kind: ParamKind::Reference {
                target: "Practitioner",
                ids: participants,
            },
            doc: "a participant: Practitioner/{id} or {id}",
        },
        Param {
            name: "status",
            kind: ParamKind::Code { codes: status },
            doc: "planned | arrived | triaged | in-progress | onleave | finished | cancelled | entered-in-error | unknown",
        },
    ],
    patient: |r, _| subject(r).into_iter().next(),
};

/// `patient`, `status` and `created`: what Claim and ClaimResponse share.
const CLAIM_PATIENT: Param = Param {
    name: "patient",
    kind: ParamKind::Reference {
        target: "Patient",
        ids: patient,
    },
    doc: PATIENT_DOC,
};
const CLAIM_STATUS: Param = Param {
    name: "status",
    kind: ParamKind::Code { codes: status },
    doc: "active | cancelled | draft | entered-in-error",
};
const CLAIM_CREATED: Param = Param {
    name: "created",
    kind: ParamKind::Date {
        ranges: created,
        year_index: "created:year",
    },
    doc: "prefixes eq (default), lt, gt, le, ge; a date, YYYY, YYYY-MM or an instant",
};

pub static CLAIM: Kind = Kind {
    resource_type: "Claim",
    params: &[CLAIM_PATIENT, CLAIM_STATUS, CLAIM_CREATED],
    patient: |r, _| patient(r).into_iter().next(),
};

pub static CLAIM_RESPONSE: Kind = Kind {
    resource_type: "ClaimResponse",
    params: &[
        CLAIM_PATIENT,
        Param {
            name: "request",
            kind: ParamKind::Reference {
                target: "Claim",
                ids: request,
            },
            doc: "the claim answered: Claim/{id} or {id}",
        },
        CLAIM_STATUS,
        CLAIM_CREATED,
    ],
    patient: |r, _| patient(r).into_iter().next(),
};

fn identifiers(resource: &Value) -> Vec<SystemValue> {
    fields::identifiers(resource)
}

fn status(resource: &Value) -> Vec<String> {
    fields::code(resource, "status")
}

fn beneficiary(resource: &Value) -> Vec<String> {
    fields::reference_ids(resource, "beneficiary", "Patient")
}

fn payors(resource: &Value) -> Vec<String> {
    fields::reference_ids(resource, "payor", "Organization")
}

fn subject(resource: &Value) -> Vec<String> {
    fields::reference_ids(resource, "subject", "Patient")
}

fn patient(resource: &Value) -> Vec<String> {
    fields::reference_ids(resource, "patient", "Patient")
}

fn request(resource: &Value) -> Vec<String> {
    fields::reference_ids(resource, "request", "Claim")
}

fn participants(resource: &Value) -> Vec<String> {
    fields::items(resource.get("participant"))
        .iter()
        .filter_map(|p| fields::reference_id(p.get("individual")?, "Practitioner"))
        .collect()
}

fn period(resource: &Value) -> Vec<(i64, i64)> {
    resource
        .get("period")
        .and_then(period_range_us)
        .into_iter()
        .collect()
}

fn created(resource: &Value) -> Vec<(i64, i64)> {
    fields::date_time_range(resource, "created")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::resources::search::date_range_us;
    use serde_json::json;

    #[test]
    fn an_encounter_is_indexed_by_its_patient_practitioners_and_period() {
        let e = json!({
            "resourceType": "Encounter",
            "status": "finished",
            "subject": { "reference": "Patient/p1" },
            "participant": [
                { "individual": { "reference": "Practitioner/t1" } },
                { "individual": { "reference": "RelatedPerson/r1" } },
                { "type": [{ "text": "no individual" }] }
            ],
            "period": { "start": "2026-03-05T10:00:00Z", "end": "2026-03-05T10:50:00Z" }
        });
        assert_eq!(subject(&e), ["p1"]);
        assert_eq!(participants(&e), ["t1"]);
        assert_eq!(
            period(&e),
            [(
                date_range_us("2026-03-05T10:00:00Z").unwrap().0,
                date_range_us("2026-03-05T10:50:00Z").unwrap().1
            )]
        );
        assert_eq!((ENCOUNTER.patient)(&e, "e1").as_deref(), Some("p1"));
    }

    #[test]
    fn an_ongoing_period_is_open_ended() {
        let e = json!({ "period": { "start": "2026-03-05" } });
        let (low, high) = period(&e)[0];
        assert_eq!(low, date_range_us("2026-03-05").unwrap().0);
        assert_eq!(high, i64::MAX);
        assert!(period(&json!({ "period": {} })).is_empty());
        assert!(period(&json!({ "period": { "start": "not a date" } })).is_empty());
    }
}
