//! The practice's own records: Practitioner (its therapists) and Organization (the practice
//! and the payers it bills). Names and identifiers are indexed as blind indexes like a
//! patient's, though they are rarely PHI: one index scheme for every name keeps search
//! uniform.

use serde_json::Value;

use super::fields;
use super::search::{Param, ParamKind, SystemValue};
use super::Kind;

const IDENTIFIER_DOC: &str =
    "system|value, value, |value or system| (exact match; the value is a blind index)";
const NAME_DOC: &str = "starts with, case- and accent-insensitive; :exact for an exact match";

pub static PRACTITIONER: Kind = Kind {
    resource_type: "Practitioner",
    params: &[
        Param {
            name: "identifier",
            kind: ParamKind::Identifier { identifiers },
            doc: IDENTIFIER_DOC,
        },
        Param {
            name: "family",
            kind: ParamKind::Name {
                strings: family,
                prefix_index: "family:3",
            },
            doc: NAME_DOC,
        },
        Param {
            name: "given",
            kind: ParamKind::Name {
                strings: given,
                prefix_index: "given:3",
            },
            doc: NAME_DOC,
        },
        Param {
            name: "name",
            kind: ParamKind::Name {
                strings: any_name,
                prefix_index: "name:3",
            },
            doc: "any of family, given, prefix, suffix or text: starts with, case- and accent-insensitive; :exact",
        },
    ],
    patient: |_, _| None,
};

pub static ORGANIZATION: Kind = Kind {
    resource_type: "Organization",
    params: &[
        Param {
            name: "identifier",
            kind: ParamKind::Identifier { identifiers },
            doc: IDENTIFIER_DOC,
        },
        Param {
            name: "name",
            kind: ParamKind::Name {
                strings: organization_name,
                prefix_index: "name:3",
            },
            doc: "the name or an alias: starts with, case- and accent-insensitive; :exact",
        },
    ],
    patient: |_, _| None,
};

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
    fields::name_parts(resource, &["family", "given", "prefix", "suffix", "text"])
}

fn organization_name(resource: &Value) -> Vec<String> {
    fields::strings(resource.get("name"))
        .chain(fields::strings(resource.get("alias")))
        .map(str::to_owned)
        .collect()
}
