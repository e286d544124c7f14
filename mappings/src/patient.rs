//! Patient <-> [`model::Patient`]: names, birth date, gender, address, telecom, identifiers
//! (with the MRN chosen by the vendor profile) and the US Core race, ethnicity and birth-sex
//! extensions.

use fhir_sdk::r4b::codes::{
    AddressUse, ContactPointSystem, ContactPointUse, IdentifierUse, NameUse,
};
use fhir_sdk::r4b::resources::Patient;
use fhir_sdk::r4b::types::{
    Address, CodeableConcept, Coding, ContactPoint, Extension, ExtensionValue, HumanName,
    Identifier,
};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::model::{self, Code, Gender, PersonName, RaceOrEthnicity};
use crate::profile::{CodeElement, SSN_SYSTEMS};
use crate::{MappingError, Profile};

/// The HL7 v2-0203 identifier type system, whose `MR` marks a medical record number.
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";

/// A code enum of fhir-sdk as its FHIR code.
fn code_of<T: Serialize>(code: &T) -> Option<String> {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
}

fn strings(values: &[Option<String>]) -> Vec<String> {
    values.iter().flatten().cloned().collect()
}

/// Maps a Patient read from an EHR into the internal model.
pub fn from_fhir(patient: &Patient, profile: &Profile) -> Result<model::Patient, MappingError> {
    let identifiers: Vec<&Identifier> = patient
        .identifier
        .iter()
        .flatten()
        .filter(|i| profile.identifiers.keep_ssn || !is_ssn(i))
        .collect();
    let gender = match &patient.gender {
        None => None,
        Some(g) => {
            let code = code_of(g).ok_or(MappingError::Invalid {
                element: "Patient.gender",
                rule: "not a code",
            })?;
            let fhir = profile.gender(&code).ok_or(MappingError::Invalid {
                element: "Patient.gender",
                rule: "not an administrative gender code, and the profile does not translate it",
            })?;
            Gender::from_code(fhir)
        }
    };
    let birth_date = patient
        .birth_date
        .as_ref()
        .and_then(|d| serde_json::to_value(d).ok())
        .and_then(|v| v.as_str().map(str::to_owned));
    let telecom: Vec<&ContactPoint> = patient.telecom.iter().flatten().collect();
    // The current contact point of the system with the best (lowest) rank; unranked ones after
    // ranked ones, in the feed's order; `old` ones never.
    let telecom_value = |system: ContactPointSystem| {
        let mut current: Vec<&&ContactPoint> = telecom
            .iter()
            .filter(|t| t.system.as_ref() == Some(&system) && t.value.is_some())
            .filter(|t| t.period.as_ref().is_none_or(|p| p.end.is_none()))
            .filter(|t| t.r#use != Some(ContactPointUse::Old))
            .collect();
        current.sort_by_key(|t| t.rank.map_or(u32::MAX, |r| r.get()));
        current.first().and_then(|t| t.value.clone())
    };
    let birth_sex =
        match extension(&patient.extension, &profile.extensions.birth_sex).and_then(|e| {
            match &e.value {
                Some(ExtensionValue::Code(code)) => Some(code.as_str()),
                _ => None,
            }
        }) {
            None => None,
            Some(code) => Some(
                profile
                    .code(CodeElement::BirthSex, code)
                    .ok_or(MappingError::Invalid {
                        element: "Patient.extension(birthsex)",
                        rule: "not a US Core birth-sex code (F, M, UNK), and the profile does not \
                           translate it",
                    })?
                    .to_owned(),
            ),
        };
    Ok(model::Patient {
        source_id: patient.id.clone(),
        mrn: mrn(&identifiers, profile),
        identifiers: identifiers
            .iter()
            .filter_map(|i| {
                Some(model::Identifier {
                    system: i.system.clone(),
                    value: i.value.clone()?,
                })
            })
            .collect(),
        name: best_name(patient.name.iter().flatten()),
        birth_date,
        gender,
        address: best_address(patient.address.iter().flatten()),
        phone: telecom_value(ContactPointSystem::Phone),
        email: telecom_value(ContactPointSystem::Email),
        race: extension(&patient.extension, &profile.extensions.race).map(race_or_ethnicity),
        ethnicity: extension(&patient.extension, &profile.extensions.ethnicity)
            .map(race_or_ethnicity),
        birth_sex,
    })
}

/// A social security number: of an SSN system, or typed `SS` (HL7 v2-0203).
fn is_ssn(identifier: &Identifier) -> bool {
    identifier
        .system
        .as_deref()
        .is_some_and(|s| SSN_SYSTEMS.contains(&s))
        || identifier
            .r#type
            .as_ref()
            .is_some_and(|t| has_code(t, V2_0203, "SS"))
}

/// The MRN: the first identifier of a profile MRN system (in the profile's order), else one
/// typed `MR`; identifiers whose use is `old` are no longer the record's number.
fn mrn(identifiers: &[&Identifier], profile: &Profile) -> Option<String> {
    let identifiers: Vec<&Identifier> = identifiers
        .iter()
        .filter(|i| i.r#use != Some(IdentifierUse::Old))
        .copied()
        .collect();
    profile
        .identifiers
        .mrn_systems
        .iter()
        .find_map(|system| {
            identifiers
                .iter()
                .find(|i| i.system.as_deref() == Some(system.as_str()))
                .and_then(|i| i.value.clone())
        })
        .or_else(|| {
            identifiers
                .iter()
                .find(|i| {
                    i.r#type
                        .as_ref()
                        .is_some_and(|t| has_code(t, V2_0203, "MR"))
                })
                .and_then(|i| i.value.clone())
        })
}

fn has_code(concept: &CodeableConcept, system: &str, code: &str) -> bool {
    concept
        .coding
        .iter()
        .flatten()
        .any(|c| c.system.as_deref() == Some(system) && c.code.as_deref() == Some(code))
}

/// The official name, else a usual one, else the first with a family or given name; names
/// whose period has ended are skipped.
pub(crate) fn best_name<'a>(names: impl Iterator<Item = &'a HumanName>) -> Option<PersonName> {
    let current: Vec<&HumanName> = names
        .filter(|n| n.period.as_ref().is_none_or(|p| p.end.is_none()))
        .filter(|n| n.family.is_some() || n.given.iter().flatten().next().is_some())
        .collect();
    let pick = current
        .iter()
        .find(|n| n.r#use == Some(NameUse::Official))
        .or_else(|| current.iter().find(|n| n.r#use == Some(NameUse::Usual)))
        .or_else(|| current.first())?;
    Some(PersonName {
        family: pick.family.clone(),
        given: strings(&pick.given),
        prefix: strings(&pick.prefix),
        suffix: strings(&pick.suffix),
    })
}

/// The current home address, else the first current one that is not a billing or old address.
fn best_address<'a>(addresses: impl Iterator<Item = &'a Address>) -> Option<model::Address> {
    let current: Vec<&Address> = addresses
        .filter(|a| a.period.as_ref().is_none_or(|p| p.end.is_none()))
        .filter(|a| !matches!(a.r#use, Some(AddressUse::Old) | Some(AddressUse::Billing)))
        .collect();
    let pick = current
        .iter()
        .find(|a| a.r#use == Some(AddressUse::Home))
        .or_else(|| current.first())?;
    Some(model::Address {
        line: strings(&pick.line),
        city: pick.city.clone(),
        state: pick.state.clone(),
        postal_code: pick.postal_code.clone(),
        country: pick.country.clone(),
    })
}

fn extension<'a>(extensions: &'a [Extension], url: &str) -> Option<&'a Extension> {
    extensions.iter().find(|e| e.url == url)
}

fn code(coding: &Coding) -> Option<Code> {
    Some(Code {
        system: coding.system.clone(),
        code: coding.code.clone()?,
        display: coding.display.clone(),
    })
}

/// The US Core race/ethnicity complex extension: `ombCategory` and `detailed` codings, `text`.
fn race_or_ethnicity(ext: &Extension) -> RaceOrEthnicity {
    let mut out = RaceOrEthnicity::default();
    for part in &ext.extension {
        match (part.url.as_str(), &part.value) {
            ("ombCategory", Some(ExtensionValue::Coding(c))) => {
                out.omb_categories.extend(code(c));
            }
            ("detailed", Some(ExtensionValue::Coding(c))) => out.detailed.extend(code(c)),
            ("text", Some(ExtensionValue::String(t))) => out.text = Some(t.clone()),
            _ => {}
        }
    }
    out
}

/// The FHIR Patient of an internal patient, as the gateway writes it to an EHR or serves it:
/// JSON (the client-facing representation), with the profile's extension URLs and the MRN
/// under the profile's first MRN system (or typed `MR` when the profile names none).
pub fn to_fhir(patient: &model::Patient, profile: &Profile) -> Value {
    let mut out = Map::new();
    out.insert("resourceType".into(), json!("Patient"));
    if let Some(id) = &patient.source_id {
        out.insert("id".into(), json!(id));
    }
    let mut extensions = Vec::new();
    for (url, value) in [
        (&profile.extensions.race, &patient.race),
        (&profile.extensions.ethnicity, &patient.ethnicity),
    ] {
        if let Some(v) = value {
            let mut parts: Vec<Value> = Vec::new();
            for (name, codes) in [
                ("ombCategory", &v.omb_categories),
                ("detailed", &v.detailed),
            ] {
                parts.extend(
                    codes
                        .iter()
                        .map(|c| json!({ "url": name, "valueCoding": coding_json(c) })),
                );
            }
            if let Some(t) = &v.text {
                parts.push(json!({ "url": "text", "valueString": t }));
            }
            extensions.push(json!({ "url": url, "extension": parts }));
        }
    }
    if let Some(sex) = &patient.birth_sex {
        extensions.push(json!({ "url": profile.extensions.birth_sex, "valueCode": sex }));
    }
    if !extensions.is_empty() {
        out.insert("extension".into(), Value::Array(extensions));
    }
    let mut identifiers: Vec<Value> = patient
        .identifiers
        .iter()
        .map(|i| {
            let mut v = json!({ "value": i.value });
            if patient.mrn.as_ref() == Some(&i.value) {
                v["type"] = json!({ "coding": [{ "system": V2_0203, "code": "MR" }] });
            }
            if let Some(s) = &i.system {
                v["system"] = json!(s);
            }
            v
        })
        .collect();
    if let Some(mrn) = &patient.mrn {
        let listed = patient.identifiers.iter().any(|i| &i.value == mrn);
        if !listed {
            let mut v = json!({
                "type": { "coding": [{ "system": V2_0203, "code": "MR" }] },
                "value": mrn,
            });
            if let Some(system) = profile.identifiers.mrn_systems.first() {
                v["system"] = json!(system);
            }
            identifiers.insert(0, v);
        }
    }
    if !identifiers.is_empty() {
        out.insert("identifier".into(), Value::Array(identifiers));
    }
    if let Some(n) = &patient.name {
        let mut name = json!({ "use": "official" });
        if let Some(f) = &n.family {
            name["family"] = json!(f);
        }
        for (key, list) in [
            ("given", &n.given),
            ("prefix", &n.prefix),
            ("suffix", &n.suffix),
        ] {
            if !list.is_empty() {
                name[key] = json!(list);
            }
        }
        out.insert("name".into(), json!([name]));
    }
    let mut telecom = Vec::new();
    if let Some(p) = &patient.phone {
        telecom.push(json!({ "system": "phone", "value": p }));
    }
    if let Some(e) = &patient.email {
        telecom.push(json!({ "system": "email", "value": e }));
    }
    if !telecom.is_empty() {
        out.insert("telecom".into(), Value::Array(telecom));
    }
    if let Some(g) = patient.gender {
        out.insert("gender".into(), json!(g.code()));
    }
    if let Some(d) = &patient.birth_date {
        out.insert("birthDate".into(), json!(d));
    }
    if let Some(a) = &patient.address {
        let mut address = json!({ "use": "home" });
        if !a.line.is_empty() {
            address["line"] = json!(a.line);
        }
        for (key, value) in [
            ("city", &a.city),
            ("state", &a.state),
            ("postalCode", &a.postal_code),
            ("country", &a.country),
        ] {
            if let Some(v) = value {
                address[key] = json!(v);
            }
        }
        out.insert("address".into(), json!([address]));
    }
    Value::Object(out)
}

fn coding_json(c: &Code) -> Value {
    let mut v = json!({ "code": c.code });
    if let Some(s) = &c.system {
        v["system"] = json!(s);
    }
    if let Some(d) = &c.display {
        v["display"] = json!(d);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Profiles;

    fn fixture(name: &str) -> Patient {
        let path = format!(
            "{}/../../shared/fixtures/r4-examples/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn generic() -> Profile {
        Profiles::built_in()
            .unwrap()
            .get("generic")
            .unwrap()
            .clone()
    }

    fn us_core_patient() -> Patient {
        serde_json::from_value(json!({
            "resourceType": "Patient",
            "id": "ehr-1",
            "extension": [
                { "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": [
                    { "url": "ombCategory", "valueCoding": { "system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White" } },
                    { "url": "detailed", "valueCoding": { "system": "urn:oid:2.16.840.1.113883.6.238", "code": "1586-7", "display": "Shoshone" } },
                    { "url": "text", "valueString": "Mixed" }
                ] },
                { "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity", "extension": [
                    { "url": "ombCategory", "valueCoding": { "system": "urn:oid:2.16.840.1.113883.6.238", "code": "2186-5", "display": "Not Hispanic or Latino" } },
                    { "url": "text", "valueString": "Not Hispanic or Latino" }
                ] },
                { "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": "F" }
            ],
            "identifier": [
                { "system": "urn:oid:9.9.9", "value": "OTHER-1" },
                { "type": { "coding": [{ "system": V2_0203, "code": "MR" }] }, "system": "urn:oid:1.2.3", "value": "MRN-42" }
            ],
            "name": [
                { "use": "old", "family": "Maiden", "period": { "end": "2001" } },
                { "use": "nickname", "given": ["Jo"] },
                { "use": "official", "family": "Shaw", "given": ["Amy", "V."], "suffix": ["PhD"] }
            ],
            "telecom": [
                { "system": "phone", "value": "555-0100", "period": { "end": "2020-01-01" } },
                { "system": "phone", "value": "555-0101" },
                { "system": "email", "value": "amy@example.org" }
            ],
            "gender": "female",
            "birthDate": "1987-02-20",
            "address": [
                { "use": "billing", "line": ["PO Box 1"] },
                { "use": "home", "line": ["49 Meadow St"], "city": "Mounds", "state": "OK", "postalCode": "74047", "country": "US" }
            ]
        }))
        .unwrap()
    }

    #[test]
    fn a_us_core_patient_maps_every_element_the_model_has() {
        let p = from_fhir(&us_core_patient(), &generic()).unwrap();
        assert_eq!(p.source_id.as_deref(), Some("ehr-1"));
        assert_eq!(p.mrn.as_deref(), Some("MRN-42"));
        assert_eq!(p.identifiers.len(), 2);
        let name = p.name.as_ref().unwrap();
        assert_eq!(name.family.as_deref(), Some("Shaw"));
        assert_eq!(name.given, ["Amy", "V."]);
        assert_eq!(name.suffix, ["PhD"]);
        assert_eq!(p.birth_date.as_deref(), Some("1987-02-20"));
        assert_eq!(p.gender, Some(Gender::Female));
        assert_eq!(p.phone.as_deref(), Some("555-0101"));
        assert_eq!(p.email.as_deref(), Some("amy@example.org"));
        let address = p.address.as_ref().unwrap();
        assert_eq!(address.line, ["49 Meadow St"]);
        assert_eq!(address.postal_code.as_deref(), Some("74047"));
        let race = p.race.as_ref().unwrap();
        assert_eq!(race.omb_categories[0].code, "2106-3");
        assert_eq!(race.detailed[0].code, "1586-7");
        assert_eq!(race.text.as_deref(), Some("Mixed"));
        assert_eq!(
            p.ethnicity.as_ref().unwrap().omb_categories[0].code,
            "2186-5"
        );
        assert_eq!(p.birth_sex.as_deref(), Some("F"));
    }

    #[test]
    fn the_profile_decides_which_identifier_is_the_mrn() {
        let mut profile = generic();
        profile.identifiers.mrn_systems = vec!["urn:oid:9.9.9".into()];
        let p = from_fhir(&us_core_patient(), &profile).unwrap();
        assert_eq!(p.mrn.as_deref(), Some("OTHER-1"));
    }

    #[test]
    fn an_ssn_stays_out_of_the_model_unless_the_profile_keeps_it() {
        let mut fhir = us_core_patient();
        let extra: Vec<Identifier> = serde_json::from_value(json!([
            { "system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-99-9999" },
            { "type": { "coding": [{ "system": V2_0203, "code": "SS" }] }, "value": "999999999" }
        ]))
        .unwrap();
        fhir.identifier.extend(extra.into_iter().map(Some));
        let mut profile = generic();
        let p = from_fhir(&fhir, &profile).unwrap();
        assert_eq!(p.identifiers.len(), 2);
        assert!(p.identifiers.iter().all(|i| !i.value.starts_with("999")));
        profile.identifiers.keep_ssn = true;
        assert_eq!(from_fhir(&fhir, &profile).unwrap().identifiers.len(), 4);
    }

    #[test]
    fn telecom_is_chosen_by_rank_and_old_numbers_are_skipped() {
        let mut fhir = us_core_patient();
        fhir.telecom = serde_json::from_value(json!([
            { "system": "phone", "use": "old", "value": "555-0001", "rank": 1 },
            { "system": "phone", "use": "work", "value": "555-0002" },
            { "system": "phone", "use": "mobile", "value": "555-0003", "rank": 2 },
            { "system": "email", "value": "b@example.org", "rank": 3 },
            { "system": "email", "value": "a@example.org", "rank": 1 }
        ]))
        .unwrap();
        let p = from_fhir(&fhir, &generic()).unwrap();
        assert_eq!(p.phone.as_deref(), Some("555-0003"));
        assert_eq!(p.email.as_deref(), Some("a@example.org"));
    }

    #[test]
    fn an_old_identifier_is_not_the_mrn() {
        let mut fhir = us_core_patient();
        fhir.identifier = serde_json::from_value(json!([
            { "use": "old", "type": { "coding": [{ "system": V2_0203, "code": "MR" }] }, "value": "OLD-1" },
            { "type": { "coding": [{ "system": V2_0203, "code": "MR" }] }, "value": "NEW-2" }
        ]))
        .unwrap();
        assert_eq!(
            from_fhir(&fhir, &generic()).unwrap().mrn.as_deref(),
            Some("NEW-2")
        );
    }

    #[test]
    fn birth_sex_is_a_us_core_code_or_the_profile_translates_it() {
        let mut fhir = us_core_patient();
        let url = generic().extensions.birth_sex;
        fhir.extension.retain(|e| e.url != url);
        fhir.extension
            .push(serde_json::from_value(json!({ "url": url, "valueCode": "female" })).unwrap());
        let err = from_fhir(&fhir, &generic()).unwrap_err();
        assert!(
            err.to_string().starts_with("Patient.extension(birthsex): "),
            "{err}"
        );
        assert!(!err.to_string().contains("female"), "{err}");
        let mut profile = generic();
        profile.codes.birth_sex.insert("female".into(), "F".into());
        assert_eq!(
            from_fhir(&fhir, &profile).unwrap().birth_sex.as_deref(),
            Some("F")
        );
    }

    #[test]
    fn the_internal_model_round_trips_through_fhir() {
        let profile = generic();
        let p = from_fhir(&us_core_patient(), &profile).unwrap();
        let fhir: Patient = serde_json::from_value(to_fhir(&p, &profile)).unwrap();
        assert_eq!(from_fhir(&fhir, &profile).unwrap(), p);
    }

    #[test]
    fn the_official_examples_map() {
        let profile = generic();
        let p = from_fhir(&fixture("Patient-f001.json"), &profile).unwrap();
        assert_eq!(p.gender, Some(Gender::Male));
        assert_eq!(p.birth_date.as_deref(), Some("1944-11-17"));
        assert!(p.name.unwrap().family.is_some());
        for file in [
            "Patient-animal.json",
            "Patient-pat2.json",
            "Patient-infant-twin-2.json",
            "Patient-xcda.json",
        ] {
            let p = from_fhir(&fixture(file), &profile).unwrap();
            assert!(p.source_id.is_some(), "{file}");
        }
    }
}
