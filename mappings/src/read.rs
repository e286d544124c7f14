//! Reading a resource as an EHR sent it: the profile's code translations applied to its JSON,
//! then fhir-sdk's typed read. The typed models refuse a code outside an element's required
//! value set (`"gender": "M"` does not parse), so a vendor's own codes are translated here,
//! before the `from_fhir` functions see the resource.
//!
//! Pure: no I/O. Never puts a value of the resource into an error (it may be PHI): a failed read
//! names the resource type only.

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::profile::CodeElement;
use crate::{MappingError, Profile};

/// Resource types the mappings read, as `'static` names for errors.
const TYPES: &[&str] = &[
    "Patient",
    "Practitioner",
    "Organization",
    "Coverage",
    "Encounter",
    "Claim",
    "ClaimResponse",
];

/// Replaces, in place, every code of `resource` that the profile translates (see
/// [`CodeElement`] for the elements). Codes without a translation are left as they are.
pub fn translate_codes(resource: &mut Value, profile: &Profile) {
    let ty = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(object) = resource.as_object_mut() else {
        return;
    };
    let translate = |value: Option<&mut Value>, element: CodeElement| {
        if let Some(value) = value {
            if let Some(fhir) = value
                .as_str()
                .and_then(|c| profile.codes.table(element).get(c))
            {
                *value = Value::String(fhir.clone());
            }
        }
    };
    match ty.as_str() {
        "Patient" | "Practitioner" | "Organization" => {
            translate(object.get_mut("gender"), CodeElement::Gender);
            for name in array(object.get_mut("name")) {
                translate(name.get_mut("use"), CodeElement::NameUse);
            }
            for telecom in array(object.get_mut("telecom")) {
                translate(telecom.get_mut("system"), CodeElement::TelecomSystem);
                translate(telecom.get_mut("use"), CodeElement::TelecomUse);
            }
            for address in array(object.get_mut("address")) {
                translate(address.get_mut("use"), CodeElement::AddressUse);
            }
            for extension in array(object.get_mut("extension")) {
                if extension.get("url").and_then(Value::as_str)
                    == Some(profile.extensions.birth_sex.as_str())
                {
                    translate(extension.get_mut("valueCode"), CodeElement::BirthSex);
                }
            }
        }
        "Coverage" => translate(object.get_mut("status"), CodeElement::CoverageStatus),
        "Encounter" => translate(object.get_mut("status"), CodeElement::EncounterStatus),
        _ => {}
    }
}

fn array(value: Option<&mut Value>) -> impl Iterator<Item = &mut Value> {
    value
        .and_then(Value::as_array_mut)
        .into_iter()
        .flat_map(|a| a.iter_mut())
}

/// Rewrites every non-integer number as `f64` prints it. With the workspace's serde_json
/// `arbitrary_precision`, a number whose text is not that (`135.50`, `1e3`) reaches serde's
/// buffering (choice elements such as `valueMoney`, contained resources) as serde_json's private
/// number map, and fhir-sdk's typed read fails with "expected f64" on official examples
/// (Coverage-7546D, Claim-100156...). fhir-sdk reads decimals as `f64` anyway: nothing is lost.
fn plain_numbers(value: &mut Value) {
    match value {
        Value::Number(n) if n.as_u64().is_none() && n.as_i64().is_none() => {
            if let Some(plain) = n.as_f64().and_then(serde_json::Number::from_f64) {
                *n = plain;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(plain_numbers),
        Value::Object(members) => members.values_mut().for_each(plain_numbers),
        _ => {}
    }
}

/// The typed resource of an EHR's JSON, the profile's code translations applied first (and its
/// decimals made readable, see `plain_numbers`). A body
/// that still does not parse (wrong type, a code neither FHIR's nor translated, a missing
/// required element) is refused naming its resource type only.
pub fn read<T: DeserializeOwned>(
    mut resource: Value,
    profile: &Profile,
) -> Result<T, MappingError> {
    translate_codes(&mut resource, profile);
    plain_numbers(&mut resource);
    let element = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(|ty| TYPES.iter().find(|t| **t == ty).copied())
        .unwrap_or("resource");
    // serde's message may quote a value of the resource: it is dropped.
    serde_json::from_value(resource).map_err(|_| MappingError::Invalid {
        element,
        rule: "not a valid FHIR R4 resource of its type (a code outside the element's value set \
               that the profile does not translate, a wrong type, or a required element missing)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Profiles;
    use fhir_sdk::r4b::resources::{Coverage, Encounter, Patient};
    use serde_json::json;

    fn vendor() -> Profile {
        let text = crate::profile::built_in_text("generic").unwrap().to_owned()
            + "\n[codes.birth_sex]\nfemale = \"F\"\n[codes.name_use]\nlegal = \"official\"\n\
               [codes.telecom_system]\ntel = \"phone\"\n[codes.telecom_use]\ncell = \"mobile\"\n\
               [codes.address_use]\nresidence = \"home\"\n[codes.coverage_status]\n\
               terminated = \"cancelled\"\n[codes.encounter_status]\ncompleted = \"finished\"\n";
        let text = text.replace("[codes.gender]", "[codes.gender]\nM = \"male\"");
        Profile::parse("generic.toml", &text).unwrap()
    }

    #[test]
    fn vendor_codes_become_fhir_codes_before_the_typed_read() {
        let profile = vendor();
        let raw = json!({
            "resourceType": "Patient",
            "gender": "M",
            "name": [{ "use": "legal", "family": "Doe" }],
            "telecom": [{ "system": "tel", "use": "cell", "value": "555-0100" }],
            "address": [{ "use": "residence", "city": "Tulsa" }],
            "extension": [{ "url": profile.extensions.birth_sex, "valueCode": "female" }]
        });
        let generic = Profiles::built_in()
            .unwrap()
            .get("generic")
            .unwrap()
            .clone();
        assert_eq!(
            read::<Patient>(raw.clone(), &generic).unwrap_err(),
            MappingError::Invalid {
                element: "Patient",
                rule: "not a valid FHIR R4 resource of its type (a code outside the element's \
                       value set that the profile does not translate, a wrong type, or a \
                       required element missing)"
            }
        );
        let patient: Patient = read(raw, &profile).unwrap();
        let p = crate::patient::from_fhir(&patient, &profile).unwrap();
        assert_eq!(p.gender, Some(crate::model::Gender::Male));
        assert_eq!(p.birth_sex.as_deref(), Some("F"));
        assert_eq!(p.phone.as_deref(), Some("555-0100"));
        assert_eq!(p.name.unwrap().family.as_deref(), Some("Doe"));
        assert_eq!(p.address.unwrap().city.as_deref(), Some("Tulsa"));

        let coverage = json!({
            "resourceType": "Coverage", "status": "terminated",
            "beneficiary": { "reference": "Patient/1" }, "payor": [{ "reference": "Organization/2" }]
        });
        let c: Coverage = read(coverage, &profile).unwrap();
        let c = crate::coverage::from_fhir(&c, &profile).unwrap();
        assert_eq!(c.status, "cancelled");
        let encounter = json!({
            "resourceType": "Encounter", "status": "completed",
            "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
            "subject": { "reference": "Patient/1" }
        });
        let e: Encounter = read(encounter, &profile).unwrap();
        assert_eq!(
            crate::care::session_from_fhir(&e).unwrap().status,
            "finished"
        );
    }

    #[test]
    fn decimals_inside_choice_elements_read() {
        let path = format!(
            "{}/../../shared/fixtures/r4-examples/Coverage-7546D.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(
            serde_json::from_value::<fhir_sdk::r4b::resources::Resource>(json.clone()).is_err()
        );
        let c: Coverage = read(json, &vendor()).unwrap();
        assert_eq!(c.cost_to_beneficiary.len(), 1);
    }

    #[test]
    fn a_resource_that_does_not_parse_is_refused_without_its_values() {
        let err = read::<Patient>(
            json!({ "resourceType": "Patient", "birthDate": "SECRET-VALUE" }),
            &vendor(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("Patient: "), "{err}");
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }
}
