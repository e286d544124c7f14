//! Patient: demographics of the practice's patients (all PHI, sealed at rest).

use serde_json::Value;

use super::search::{Param, ParamKind};
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

fn strings(value: Option<&Value>) -> impl Iterator<Item = &str> {
    let list: &[Value] = match value {
        Some(Value::Array(items)) => items,
        Some(one @ Value::String(_)) => std::slice::from_ref(one),
        _ => &[],
    };
    list.iter().filter_map(Value::as_str)
}

fn names(resource: &Value) -> &[Value] {
    resource
        .get("name")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn identifiers(resource: &Value) -> Vec<(Option<String>, String)> {
    resource
        .get("identifier")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter_map(|i| {
            let value = i.get("value")?.as_str()?;
            let system = i.get("system").and_then(Value::as_str).map(str::to_owned);
            Some((system, value.to_owned()))
        })
        .collect()
}

fn family(resource: &Value) -> Vec<String> {
    names(resource)
        .iter()
        .flat_map(|n| strings(n.get("family")))
        .map(str::to_owned)
        .collect()
}

fn given(resource: &Value) -> Vec<String> {
    names(resource)
        .iter()
        .flat_map(|n| strings(n.get("given")))
        .map(str::to_owned)
        .collect()
}

fn any_name(resource: &Value) -> Vec<String> {
    names(resource)
        .iter()
        .flat_map(|n| {
            ["family", "given", "prefix", "suffix", "text"]
                .into_iter()
                .flat_map(move |part| strings(n.get(part)))
        })
        .map(str::to_owned)
        .collect()
}

fn birth_date(resource: &Value) -> Option<String> {
    resource
        .get("birthDate")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn gender(resource: &Value) -> Vec<String> {
    resource
        .get("gender")
        .and_then(Value::as_str)
        .map(|g| vec![g.to_owned()])
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn name_parts_are_extracted_from_every_name() {
        let p = json!({
            "resourceType": "Patient",
            "name": [
                { "family": "Chalmers", "given": ["Peter", "James"], "prefix": ["Mr"] },
                { "text": "Jim", "given": ["Jim"] }
            ],
            "identifier": [{ "system": "urn:mrn", "value": "12345" }, { "value": "x" }, { "system": "urn:none" }]
        });
        assert_eq!(family(&p), ["Chalmers"]);
        assert_eq!(given(&p), ["Peter", "James", "Jim"]);
        assert_eq!(
            any_name(&p),
            ["Chalmers", "Peter", "James", "Mr", "Jim", "Jim"]
        );
        assert_eq!(
            identifiers(&p),
            [
                (Some("urn:mrn".to_owned()), "12345".to_owned()),
                (None, "x".to_owned())
            ]
        );
    }
}
