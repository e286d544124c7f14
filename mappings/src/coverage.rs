//! Coverage <-> [`model::Coverage`]: the beneficiary, the paying organization, the member id
//! (by the profile's member-id systems, else `subscriberId`), the plan and the period.

use fhir_sdk::r4b::resources::Coverage;
use fhir_sdk::r4b::types::{Period, Reference};
use serde_json::{json, Value};

use crate::model;
use crate::{MappingError, Profile};

/// The coverage class type system, whose `plan` class names the plan.
const COVERAGE_CLASS: &str = "http://terminology.hl7.org/CodeSystem/coverage-class";
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";

/// The id of a relative reference to a resource of type `ty` (`Patient/123` gives `123`).
pub fn reference_id(reference: &Reference, ty: &str) -> Option<String> {
    let text = reference.reference.as_deref()?;
    let path = text.split("/_history/").next()?;
    let (before, id) = path.rsplit_once('/')?;
    (before.rsplit('/').next() == Some(ty) && !id.is_empty()).then(|| id.to_owned())
}

fn instant_text<T: serde::Serialize>(value: &Option<T>) -> Option<String> {
    value
        .as_ref()
        .and_then(|v| serde_json::to_value(v).ok())
        .and_then(|v| v.as_str().map(str::to_owned))
}

fn period(period: &Option<Period>) -> (Option<String>, Option<String>) {
    match period {
        Some(p) => (instant_text(&p.start), instant_text(&p.end)),
        None => (None, None),
    }
}

/// Maps a Coverage read from an EHR into the internal model.
pub fn from_fhir(coverage: &Coverage, profile: &Profile) -> Result<model::Coverage, MappingError> {
    let patient_id =
        reference_id(&coverage.beneficiary, "Patient").ok_or(MappingError::Invalid {
            element: "Coverage.beneficiary",
            rule: "expected a reference to a Patient",
        })?;
    let member_id = profile
        .identifiers
        .member_id_systems
        .iter()
        .find_map(|system| {
            coverage
                .identifier
                .iter()
                .flatten()
                .find(|i| i.system.as_deref() == Some(system.as_str()))
                .and_then(|i| i.value.clone())
        })
        .or_else(|| {
            // An identifier typed MB (member number, HL7 v2-0203), the subscriber id, the
            // insurer's first identifier: in that order.
            let ids: Vec<_> = coverage.identifier.iter().flatten().collect();
            ids.iter()
                .find(|i| {
                    i.r#type.as_ref().is_some_and(|t| {
                        t.coding.iter().flatten().any(|c| {
                            c.system.as_deref() == Some(V2_0203) && c.code.as_deref() == Some("MB")
                        })
                    })
                })
                .and_then(|i| i.value.clone())
                .or_else(|| coverage.subscriber_id.clone())
                .or_else(|| ids.first().and_then(|i| i.value.clone()))
        });
    let plan = coverage.class.iter().flatten().find_map(|c| {
        let is_plan = c.r#type.coding.iter().flatten().any(|coding| {
            coding.system.as_deref() == Some(COVERAGE_CLASS)
                && coding.code.as_deref() == Some("plan")
        });
        is_plan.then(|| c.name.clone().unwrap_or_else(|| c.value.clone()))
    });
    let (period_start, period_end) = period(&coverage.period);
    let status = serde_json::to_value(&coverage.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .ok_or(MappingError::Missing {
            element: "Coverage.status",
        })?;
    Ok(model::Coverage {
        source_id: coverage.id.clone(),
        patient_id,
        payer_id: coverage
            .payor
            .iter()
            .flatten()
            .find_map(|r| reference_id(r, "Organization")),
        member_id,
        plan,
        status,
        period_start,
        period_end,
    })
}

/// The FHIR Coverage of an internal coverage (JSON, as the gateway serves or sends it).
pub fn to_fhir(coverage: &model::Coverage, profile: &Profile) -> Value {
    let mut out = json!({
        "resourceType": "Coverage",
        "status": coverage.status,
        "beneficiary": { "reference": format!("Patient/{}", coverage.patient_id) },
    });
    if let Some(id) = &coverage.source_id {
        out["id"] = json!(id);
    }
    if let Some(member) = &coverage.member_id {
        match profile.identifiers.member_id_systems.first() {
            Some(system) => {
                out["identifier"] = json!([{ "system": system, "value": member }]);
            }
            None => {
                out["identifier"] = json!([{
                    "type": { "coding": [{ "system": V2_0203, "code": "MB" }] },
                    "value": member,
                }]);
            }
        }
    }
    out["payor"] = match &coverage.payer_id {
        Some(payer) => json!([{ "reference": format!("Organization/{payer}") }]),
        // payor is 1..*: an unknown payer is said so, not left out.
        None => json!([{ "display": "unknown payer" }]),
    };
    if let Some(plan) = &coverage.plan {
        out["class"] = json!([{
            "type": { "coding": [{ "system": COVERAGE_CLASS, "code": "plan" }] },
            "value": plan,
        }]);
    }
    if coverage.period_start.is_some() || coverage.period_end.is_some() {
        let mut p = json!({});
        if let Some(s) = &coverage.period_start {
            p["start"] = json!(s);
        }
        if let Some(e) = &coverage.period_end {
            p["end"] = json!(e);
        }
        out["period"] = p;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Profiles;

    fn fixture(name: &str) -> Coverage {
        let path = format!(
            "{}/../../shared/fixtures/r4-examples/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn the_official_example_maps_and_round_trips() {
        let profile = Profiles::built_in()
            .unwrap()
            .get("generic")
            .unwrap()
            .clone();
        let c = from_fhir(&fixture("Coverage-9876B1.json"), &profile).unwrap();
        assert_eq!(c.status, "active");
        assert_eq!(c.member_id.as_deref(), Some("12345"));
        assert_eq!(
            c.plan.as_deref(),
            Some("Full Coverage: Medical, Dental, Pharmacy, Vision, EHC")
        );
        assert_eq!(c.period_start.as_deref(), Some("2011-05-23"));
        let back: Coverage = serde_json::from_value(to_fhir(&c, &profile)).unwrap();
        assert_eq!(from_fhir(&back, &profile).unwrap(), c);
    }

    #[test]
    fn member_ids_come_from_the_profile_systems_first() {
        let mut profile = Profiles::built_in()
            .unwrap()
            .get("generic")
            .unwrap()
            .clone();
        let mut coverage = fixture("Coverage-9876B1.json");
        coverage.subscriber_id = Some("SUB-1".into());
        assert_eq!(
            from_fhir(&coverage, &profile).unwrap().member_id.as_deref(),
            Some("SUB-1")
        );
        profile.identifiers.member_id_systems = vec!["http://benefitsinc.com/certificate".into()];
        let c = from_fhir(&coverage, &profile).unwrap();
        assert_eq!(c.member_id.as_deref(), Some("12345"));
        coverage.beneficiary.reference = Some("Group/1".into());
        assert_eq!(
            from_fhir(&coverage, &profile).unwrap_err(),
            MappingError::Invalid {
                element: "Coverage.beneficiary",
                rule: "expected a reference to a Patient"
            }
        );
    }
}
