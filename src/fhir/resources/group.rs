//! Group: a set of the practice's patients (or other entities), such as a payer's attributed
//! members or a care program's cohort. Bulk export's `Group/{id}/$export` exports the Patient
//! members and their compartments. Membership is indexed by member id (ids are not PHI); the
//! rest (names, characteristics) is sealed like every resource.

use serde_json::Value;

use super::search::{Param, ParamKind};
use super::Kind;
use crate::domain::ResourceId;

pub static GROUP: Kind = Kind {
    resource_type: "Group",
    params: &[
        Param {
            name: "member",
            kind: ParamKind::Reference {
                target: "Patient",
                ids: patient_members,
            },
            doc: "Patient/{id} or {id}: groups with this Patient as a member (Group.member.entity)",
        },
        Param {
            name: "type",
            kind: ParamKind::Code { codes: group_type },
            doc: "person | animal | practitioner | device | medication | substance",
        },
    ],
    patient: |_, _| None,
};

/// The ids of the Patients in `Group.member.entity` (relative `Patient/{id}` or absolute URLs
/// ending so; members of other types are not Patients and are left out).
pub(crate) fn patient_members(group: &Value) -> Vec<String> {
    let mut ids: Vec<String> = group
        .get("member")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter_map(|m| m.get("entity")?.get("reference")?.as_str())
        .filter_map(patient_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn patient_id(reference: &str) -> Option<String> {
    let mut segments = reference.rsplit('/');
    let id = segments.next()?;
    (segments.next()? == "Patient")
        .then(|| ResourceId::parse("member", id).ok())
        .flatten()
        .map(|id| id.to_string())
}

fn group_type(group: &Value) -> Vec<String> {
    group
        .get("type")
        .and_then(Value::as_str)
        .map(|t| vec![t.to_owned()])
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_patient_members_are_indexed_by_id() {
        let g = json!({
            "resourceType": "Group",
            "type": "person",
            "actual": true,
            "member": [
                { "entity": { "reference": "Patient/p1" } },
                { "entity": { "reference": "https://ehr.example/fhir/Patient/p2" } },
                { "entity": { "reference": "Practitioner/d1" } },
                { "entity": { "reference": "Patient/p1" } },
                { "entity": { "reference": "Patient/not an id" } },
                { "entity": { "display": "no reference" } },
                { "entity": { "reference": "p3" } }
            ]
        });
        assert_eq!(patient_members(&g), ["p1", "p2"]);
        assert_eq!(group_type(&g), ["person"]);
        assert!(patient_members(&json!({ "resourceType": "Group" })).is_empty());
    }
}
