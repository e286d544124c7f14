//! Patient: demographics of the practice's patients (all PHI, sealed at rest).

use serde_json::Value;

use super::fields;
use super::search::{Param, ParamKind, SystemValue};
use super::Kind;

pub static PATIENT: Kind = Kind {
    resource_type: "Patient",
    params: &[
        Param {
            name: "identifier",
            kind: ParamKind::Identifier { identifiers },
            doc: "system|value, value, |value or system| (exact match; the value is a blind index)",
        },
        Param {
            name: "family",
            kind: ParamKind::Name {
                strings: family,
                prefix_index: "family:3",
            },
            doc: "starts with, case- and accent-insensitive; :exact for an exact match",
        },
        Param {
            name: "given",
            kind: ParamKind::Name {
                strings: given,
                prefix_index: "given:3",
            },
            doc: "starts with, case- and accent-insensitive; :exact for an exact match",
        },
        Param {
            name: "name",
            kind: ParamKind::Name {
                strings: any_name,
                prefix_index: "name:3",
            },
            doc: "any of family, given, prefix, suffix or text: starts with, case- and accent-insensitive; :exact",
        },
        Param {
            name: "birthdate",
            kind: ParamKind::BirthDate {
                date: birth_date,
                year_index: "birthdate:year",
            },
            doc: "prefixes eq (default), lt, gt, le, ge; YYYY, YYYY-MM or YYYY-MM-DD",
        },
        Param {
            name: "gender",
            kind: ParamKind::Code { codes: gender },
            doc: "male | female | other | unknown",
        },
    ],
    patient: |_, id| Some(id.to_owned()),
};

const ALL_NAME_PARTS: &[&str] = &["family", "given", "prefix", "suffix", "text"];

fn identifiers(resource: &Value) -> Vec<SystemValue> {
    fields::identifiers(resource)
}

fn family(resource: &Value) -> Vec<String> {
    fields::name_parts(resource, &["family"])
}

fn given(resource: &Value) -> Vec<String> {
    fields::name_parts(resource, &["given"])
}

fn any_name(resource: &Value) -> Vec<String> {
    fields::name_parts(resource, ALL_NAME_PARTS)
}

fn birth_date(resource: &Value) -> Option<String> {
    resource
        .get("birthDate")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn gender(resource: &Value) -> Vec<String> {
    fields::code(resource, "gender")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_part_of_every_name_is_a_name() {
        let p = json!({
            "resourceType": "Patient",
            "name": [
                { "family": "Chalmers", "given": ["Peter", "James"], "prefix": ["Mr"] },
                { "text": "Jim", "given": ["Jim"] }
            ]
        });
        assert_eq!(
            any_name(&p),
            ["Chalmers", "Peter", "James", "Mr", "Jim", "Jim"]
        );
    }
}
