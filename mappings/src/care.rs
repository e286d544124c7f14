//! Practitioner, Organization, Encounter (a session), Claim and ClaimResponse <-> the internal
//! model. `to_fhir` writes what the model holds and fills the elements FHIR requires that the
//! model does not carry with fixed, documented values (an Encounter's class `AMB`, a Claim's type
//! `professional`, use `claim`, priority `normal`, a ClaimResponse's type `professional` and use
//! `claim`); a reference the model lacks but FHIR requires is written as a `display` saying so.
//! Never formats a value of a resource into an error.

use fhir_sdk::r4b::resources::{
    Claim, ClaimDiagnosisDiagnosis, ClaimItemServiced, ClaimResponse, Encounter, Organization,
    Practitioner,
};
use fhir_sdk::r4b::types::{CodeableConcept, Identifier, Money, Period};
use serde::Serialize;
use serde_json::{json, Value};

use crate::coverage::reference_id;
use crate::model::{self, PersonName};
use crate::{MappingError, Profile};

/// CPT codes (AMA).
pub const CPT: &str = "http://www.ama-assn.org/go/cpt";
/// ICD-10-CM diagnosis codes.
pub const ICD10_CM: &str = "http://hl7.org/fhir/sid/icd-10-cm";
const ORGANIZATION_TYPE: &str = "http://terminology.hl7.org/CodeSystem/organization-type";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const CLAIM_TYPE: &str = "http://terminology.hl7.org/CodeSystem/claim-type";
const PROCESS_PRIORITY: &str = "http://terminology.hl7.org/CodeSystem/processpriority";
const PAYMENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/ex-paymenttype";

fn text<T: Serialize>(value: &T) -> Option<String> {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
}

fn identifier(ids: &[Option<Identifier>], system: &str) -> Option<String> {
    ids.iter()
        .flatten()
        .find(|i| i.system.as_deref() == Some(system))
        .and_then(|i| i.value.clone())
}

fn code_in<'a>(
    concepts: impl IntoIterator<Item = &'a CodeableConcept>,
    system: &str,
) -> Option<String> {
    concepts.into_iter().find_map(|c| {
        c.coding
            .iter()
            .flatten()
            .find(|coding| coding.system.as_deref() == Some(system))
            .and_then(|coding| coding.code.clone())
    })
}

/// An amount in cents (FHIR decimals arrive as f64 from fhir-sdk: rounded to the cent).
fn cents(money: &Option<Money>) -> Option<i64> {
    let value = money.as_ref()?.value?;
    let cents = (value * 100.0).round();
    (cents.is_finite() && cents.abs() < 9.0e15).then_some(cents as i64)
}

fn period(p: &Option<Period>) -> (Option<String>, Option<String>) {
    match p {
        Some(p) => (
            p.start.as_ref().and_then(text),
            p.end.as_ref().and_then(text),
        ),
        None => (None, None),
    }
}

pub fn practitioner_from_fhir(p: &Practitioner, profile: &Profile) -> model::Practitioner {
    model::Practitioner {
        source_id: p.id.clone(),
        npi: identifier(&p.identifier, &profile.identifiers.npi_system),
        // As a patient's: official, else usual, else the first current one.
        name: crate::patient::best_name(p.name.iter().flatten()),
        active: p.active.unwrap_or(true),
    }
}

pub fn organization_from_fhir(o: &Organization, profile: &Profile) -> model::Organization {
    model::Organization {
        source_id: o.id.clone(),
        name: o.name.clone(),
        npi: identifier(&o.identifier, &profile.identifiers.npi_system),
        tax_id: identifier(&o.identifier, &profile.identifiers.tax_id_system),
        is_payer: code_in(o.r#type.iter().flatten(), ORGANIZATION_TYPE).as_deref() == Some("pay"),
        active: o.active.unwrap_or(true),
    }
}

pub fn session_from_fhir(e: &Encounter) -> Result<model::Session, MappingError> {
    let patient_id = e
        .subject
        .as_ref()
        .and_then(|r| reference_id(r, "Patient"))
        .ok_or(MappingError::Missing {
            element: "Encounter.subject",
        })?;
    let (start, end) = period(&e.period);
    Ok(model::Session {
        source_id: e.id.clone(),
        patient_id,
        practitioner_id: e.participant.iter().flatten().find_map(|p| {
            p.individual
                .as_ref()
                .and_then(|r| reference_id(r, "Practitioner"))
        }),
        start,
        end,
        status: text(&e.status).unwrap_or_default(),
        cpt_code: code_in(e.r#type.iter().flatten(), CPT),
        icd10_code: code_in(e.reason_code.iter().flatten(), ICD10_CM),
    })
}

pub fn claim_from_fhir(c: &Claim) -> Result<model::Claim, MappingError> {
    let patient_id = reference_id(&c.patient, "Patient").ok_or(MappingError::Invalid {
        element: "Claim.patient",
        rule: "expected a reference to a Patient",
    })?;
    let provider = ["Practitioner", "Organization", "PractitionerRole"]
        .iter()
        .find_map(|ty| reference_id(&c.provider, ty).map(|id| format!("{ty}/{id}")));
    let insurance: Vec<_> = c.insurance.iter().flatten().collect();
    let coverage_id = insurance
        .iter()
        .find(|i| i.focal)
        .or_else(|| insurance.first())
        .and_then(|i| reference_id(&i.coverage, "Coverage"));
    let icd10_codes = c
        .diagnosis
        .iter()
        .flatten()
        .filter_map(|d| match &d.diagnosis {
            ClaimDiagnosisDiagnosis::CodeableConcept(cc) => code_in([cc], ICD10_CM),
            _ => None,
        })
        .collect();
    let lines = c
        .item
        .iter()
        .flatten()
        .map(|item| model::ClaimLine {
            cpt_code: code_in([&item.product_or_service], CPT),
            service_date: match &item.serviced {
                Some(ClaimItemServiced::Date(d)) => text(d),
                Some(ClaimItemServiced::Period(p)) => p.start.as_ref().and_then(text),
                _ => None,
            },
            net_cents: cents(&item.net).or_else(|| cents(&item.unit_price)),
        })
        .collect();
    Ok(model::Claim {
        source_id: c.id.clone(),
        patient_id,
        provider,
        coverage_id,
        status: c.status.clone(),
        created: text(&c.created),
        icd10_codes,
        lines,
        total_cents: cents(&c.total),
    })
}

pub fn claim_response_from_fhir(r: &ClaimResponse) -> Result<model::ClaimResponse, MappingError> {
    let patient_id = reference_id(&r.patient, "Patient").ok_or(MappingError::Invalid {
        element: "ClaimResponse.patient",
        rule: "expected a reference to a Patient",
    })?;
    Ok(model::ClaimResponse {
        source_id: r.id.clone(),
        claim_id: r.request.as_ref().and_then(|q| reference_id(q, "Claim")),
        patient_id,
        created: text(&r.created),
        insurer_id: reference_id(&r.insurer, "Organization"),
        status: r.status.clone(),
        outcome: text(&r.outcome).unwrap_or_default(),
        disposition: r.disposition.clone(),
        payment_cents: r
            .payment
            .as_ref()
            .and_then(|p| cents(&Some(p.amount.clone()))),
    })
}

/// A FHIR `Money` in US dollars of an amount in cents, written exactly (`13557` is `135.57`).
fn money(cents: i64) -> Value {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    let text = format!("{sign}{}.{:02}", abs / 100, abs % 100);
    // A decimal literal of digits always parses; the fallback is never taken.
    let value = text
        .parse::<serde_json::Number>()
        .map_or(Value::Null, Value::Number);
    json!({ "value": value, "currency": "USD" })
}

fn coding(system: &str, code: &str) -> Value {
    json!({ "coding": [{ "system": system, "code": code }] })
}

fn human_name(name: &PersonName) -> Value {
    let mut out = json!({ "use": "official" });
    if let Some(f) = &name.family {
        out["family"] = json!(f);
    }
    for (key, list) in [
        ("given", &name.given),
        ("prefix", &name.prefix),
        ("suffix", &name.suffix),
    ] {
        if !list.is_empty() {
            out[key] = json!(list);
        }
    }
    out
}

fn with_id(mut resource: Value, id: &Option<String>) -> Value {
    if let Some(id) = id {
        resource["id"] = json!(id);
    }
    resource
}

fn period_json(start: &Option<String>, end: &Option<String>) -> Option<Value> {
    if start.is_none() && end.is_none() {
        return None;
    }
    let mut p = json!({});
    if let Some(s) = start {
        p["start"] = json!(s);
    }
    if let Some(e) = end {
        p["end"] = json!(e);
    }
    Some(p)
}

/// The FHIR Practitioner of a therapist: the NPI under the profile's NPI system.
pub fn practitioner_to_fhir(p: &model::Practitioner, profile: &Profile) -> Value {
    let mut out = with_id(
        json!({ "resourceType": "Practitioner", "active": p.active }),
        &p.source_id,
    );
    if let Some(npi) = &p.npi {
        out["identifier"] = json!([{ "system": profile.identifiers.npi_system, "value": npi }]);
    }
    if let Some(name) = &p.name {
        out["name"] = json!([human_name(name)]);
    }
    out
}

/// The FHIR Organization of the practice or a payer (typed `pay` when a payer).
pub fn organization_to_fhir(o: &model::Organization, profile: &Profile) -> Value {
    let mut out = with_id(
        json!({ "resourceType": "Organization", "active": o.active }),
        &o.source_id,
    );
    let mut ids = Vec::new();
    if let Some(npi) = &o.npi {
        ids.push(json!({ "system": profile.identifiers.npi_system, "value": npi }));
    }
    if let Some(tax) = &o.tax_id {
        ids.push(json!({ "system": profile.identifiers.tax_id_system, "value": tax }));
    }
    if !ids.is_empty() {
        out["identifier"] = Value::Array(ids);
    }
    if o.is_payer {
        out["type"] = json!([coding(ORGANIZATION_TYPE, "pay")]);
    }
    if let Some(name) = &o.name {
        out["name"] = json!(name);
    }
    out
}

/// The FHIR Encounter of a session: class `AMB` (the practice sees outpatients), the CPT code
/// as its type, the ICD-10-CM code as its reason.
pub fn session_to_fhir(s: &model::Session) -> Value {
    let mut out = with_id(
        json!({
            "resourceType": "Encounter",
            "status": s.status,
            "class": { "system": ACT_CODE, "code": "AMB", "display": "ambulatory" },
            "subject": { "reference": format!("Patient/{}", s.patient_id) },
        }),
        &s.source_id,
    );
    if let Some(cpt) = &s.cpt_code {
        out["type"] = json!([coding(CPT, cpt)]);
    }
    if let Some(practitioner) = &s.practitioner_id {
        out["participant"] =
            json!([{ "individual": { "reference": format!("Practitioner/{practitioner}") } }]);
    }
    if let Some(p) = period_json(&s.start, &s.end) {
        out["period"] = p;
    }
    if let Some(icd) = &s.icd10_code {
        out["reasonCode"] = json!([coding(ICD10_CM, icd)]);
    }
    out
}

/// The FHIR Claim of a claim: a `professional` claim of `normal` priority, its coverage the
/// focal insurance, one item per line.
pub fn claim_to_fhir(c: &model::Claim) -> Value {
    let mut out = with_id(
        json!({
            "resourceType": "Claim",
            "status": c.status,
            "type": coding(CLAIM_TYPE, "professional"),
            "use": "claim",
            "patient": { "reference": format!("Patient/{}", c.patient_id) },
        }),
        &c.source_id,
    );
    if let Some(created) = &c.created {
        out["created"] = json!(created);
    }
    // provider and insurance are required: an unknown one is said so, not left out.
    out["provider"] = match &c.provider {
        Some(provider) => json!({ "reference": provider }),
        None => json!({ "display": "unknown provider" }),
    };
    out["priority"] = coding(PROCESS_PRIORITY, "normal");
    if !c.icd10_codes.is_empty() {
        out["diagnosis"] = c
            .icd10_codes
            .iter()
            .enumerate()
            .map(|(i, code)| {
                json!({ "sequence": i + 1, "diagnosisCodeableConcept": coding(ICD10_CM, code) })
            })
            .collect();
    }
    out["insurance"] = json!([{
        "sequence": 1,
        "focal": true,
        "coverage": match &c.coverage_id {
            Some(id) => json!({ "reference": format!("Coverage/{id}") }),
            None => json!({ "display": "unknown coverage" }),
        },
    }]);
    if !c.lines.is_empty() {
        out["item"] = c
            .lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let mut item = json!({
                    "sequence": i + 1,
                    "productOrService": match &line.cpt_code {
                        Some(cpt) => coding(CPT, cpt),
                        None => json!({ "text": "not coded" }),
                    },
                });
                if let Some(date) = &line.service_date {
                    item["servicedDate"] = json!(date);
                }
                if let Some(net) = line.net_cents {
                    item["net"] = money(net);
                }
                item
            })
            .collect();
    }
    if let Some(total) = c.total_cents {
        out["total"] = money(total);
    }
    out
}

/// The FHIR ClaimResponse of a payer's answer.
pub fn claim_response_to_fhir(r: &model::ClaimResponse) -> Value {
    let mut out = with_id(
        json!({
            "resourceType": "ClaimResponse",
            "status": r.status,
            "type": coding(CLAIM_TYPE, "professional"),
            "use": "claim",
            "patient": { "reference": format!("Patient/{}", r.patient_id) },
        }),
        &r.source_id,
    );
    if let Some(created) = &r.created {
        out["created"] = json!(created);
    }
    out["insurer"] = match &r.insurer_id {
        Some(id) => json!({ "reference": format!("Organization/{id}") }),
        None => json!({ "display": "unknown insurer" }),
    };
    if let Some(claim) = &r.claim_id {
        out["request"] = json!({ "reference": format!("Claim/{claim}") });
    }
    out["outcome"] = json!(r.outcome);
    if let Some(d) = &r.disposition {
        out["disposition"] = json!(d);
    }
    if let Some(paid) = r.payment_cents {
        out["payment"] = json!({ "type": coding(PAYMENT_TYPE, "complete"), "amount": money(paid) });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Profiles;
    use serde::de::DeserializeOwned;

    fn fixture<T: DeserializeOwned>(name: &str) -> T {
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

    #[test]
    fn every_official_example_of_the_care_types_maps() {
        let dir = format!(
            "{}/../../shared/fixtures/r4-examples",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut mapped = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            let ty = name.split('-').next().unwrap_or_default();
            match ty {
                "Practitioner" => {
                    practitioner_from_fhir(&fixture(&name), &generic());
                }
                "Organization" => {
                    organization_from_fhir(&fixture(&name), &generic());
                }
                "Claim" => {
                    let claim: Claim = fixture(&name);
                    let linked = claim
                        .patient
                        .reference
                        .as_deref()
                        .is_some_and(|r| r.starts_with("Patient/"));
                    match claim_from_fhir(&claim) {
                        Ok(c) => assert!(linked && !c.patient_id.is_empty(), "{name}"),
                        // A contained or identifier-only patient cannot be linked to a record.
                        Err(e) => assert!(
                            !linked && e.to_string().starts_with("Claim.patient"),
                            "{name}: {e}"
                        ),
                    }
                }
                "ClaimResponse" => {
                    claim_response_from_fhir(&fixture(&name)).unwrap();
                }
                _ => continue,
            }
            mapped += 1;
        }
        assert!(mapped >= 20, "{mapped}");
    }

    #[test]
    fn claims_map_their_patient_coverage_lines_and_money() {
        let c = claim_from_fhir(&fixture("Claim-100150.json")).unwrap();
        assert_eq!(c.patient_id, "1");
        assert_eq!(c.coverage_id.as_deref(), Some("9876B1"));
        assert_eq!(c.status, "active");
        assert_eq!(c.lines.len(), 1);
        assert_eq!(c.lines[0].net_cents, Some(13_557));
        assert_eq!(c.provider.as_deref(), Some("Organization/1"));
        let r = claim_response_from_fhir(&fixture("ClaimResponse-R3500.json")).unwrap();
        assert_eq!(r.outcome, "complete");
        assert_eq!(r.payment_cents, Some(10_047));
    }

    #[test]
    fn a_session_needs_its_patient() {
        let e: Encounter = fixture("Encounter-f001.json");
        let s = session_from_fhir(&e).unwrap();
        assert_eq!(s.patient_id, "f001");
        assert_eq!(s.start, None);
        assert_eq!(s.status, "finished");
        let mut anonymous = e.clone();
        anonymous.subject = None;
        assert_eq!(
            session_from_fhir(&anonymous).unwrap_err(),
            MappingError::Missing {
                element: "Encounter.subject"
            }
        );
        let p = practitioner_from_fhir(&fixture("Practitioner-example.json"), &generic());
        assert!(p.name.is_some());
        let o = organization_from_fhir(
            &fixture("Organization-2.16.840.1.113883.19.5.json"),
            &generic(),
        );
        assert!(o.name.is_some());
    }
}
