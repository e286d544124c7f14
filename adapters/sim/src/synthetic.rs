//! Synthetic patients and coverages, generated deterministically from a seed (same seed, same
//! people; only `meta.lastUpdated` is anchored to the start time). Names, streets and numbers
//! come from small built-in lists and reserved ranges (555-01xx phones, example.com mail), and
//! every resource carries the `urn:fhirgate:sim|synthetic` tag: nothing here is real PHI, and
//! this module must never read real data.

use serde_json::{json, Value};

use crate::personality::IdStyle;
use crate::Personality;

const GIVEN_F: &[&str] = &[
    "Ada", "Bea", "Cora", "Dina", "Elsa", "Fay", "Gwen", "Hana", "Iris", "June", "Kira", "Lena",
];
const GIVEN_M: &[&str] = &[
    "Abe", "Bo", "Cal", "Dev", "Eli", "Finn", "Gus", "Hal", "Ivo", "Jon", "Kai", "Leo",
];
const FAMILY: &[&str] = &[
    "Testwood",
    "Samplesby",
    "Mockridge",
    "Fauxley",
    "Simmons-Synth",
    "Dummer",
    "Placeholt",
    "Fixturo",
    "Stubbins",
    "Exampleton",
    "Fakeland",
    "Demoski",
];
const STREETS: &[&str] = &[
    "Synthetic Way",
    "Sample St",
    "Mock Ave",
    "Fixture Rd",
    "Test Ln",
    "Demo Blvd",
];
const CITIES: &[(&str, &str, &str)] = &[
    ("Madison", "WI", "53703"),
    ("Kansas City", "MO", "64105"),
    ("Springfield", "IL", "62701"),
    ("Portland", "OR", "97201"),
    ("Austin", "TX", "78701"),
];
/// OMB race categories (CDC Race & Ethnicity code system, urn:oid:2.16.840.1.113883.6.238).
const RACES: &[(&str, &str)] = &[
    ("1002-5", "American Indian or Alaska Native"),
    ("2028-9", "Asian"),
    ("2054-5", "Black or African American"),
    ("2076-8", "Native Hawaiian or Other Pacific Islander"),
    ("2106-3", "White"),
];
const ETHNICITIES: &[(&str, &str)] = &[
    ("2135-2", "Hispanic or Latino"),
    ("2186-5", "Not Hispanic or Latino"),
];
const PAYORS: &[&str] = &[
    "Synthetic Mutual Health",
    "Sample Care Plan",
    "Mock Medicaid (synthetic)",
];
const CDC_RACE: &str = "urn:oid:2.16.840.1.113883.6.238";
pub const SYNTHETIC_TAG_SYSTEM: &str = "urn:fhirgate:sim";

impl Personality {
    /// The identifier system that carries the MRN at this vendor.
    pub fn mrn_system(self) -> &'static str {
        self.traits().mrn_system
    }
}

/// One generated patient: its id, `meta.lastUpdated` (ms since the epoch) and resources.
#[derive(Debug, Clone)]
pub struct Generated {
    pub id: String,
    pub last_updated_ms: i64,
    pub patient: Value,
    pub coverages: Vec<Value>,
}

/// Formats ms since the epoch as a FHIR instant with milliseconds and `Z`.
pub fn instant(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

fn pick<'a, T>(rng: &mut fastrand::Rng, list: &'a [T]) -> &'a T {
    &list[rng.usize(..list.len())]
}

fn tag() -> Value {
    json!([{ "system": SYNTHETIC_TAG_SYSTEM, "code": "synthetic", "display": "Synthetic test data" }])
}

fn patient_id(personality: Personality, rng: &mut fastrand::Rng, index: usize) -> String {
    match personality.traits().id_style {
        // Epic FHIR ids are long opaque strings; the index suffix keeps them unique.
        IdStyle::Opaque => {
            let body: String = (0..20).map(|_| rng.alphanumeric()).collect();
            format!("e{body}{index:x}")
        }
        // Millennium ids are numeric.
        IdStyle::Numeric => (12_724_066 + index).to_string(),
        IdStyle::Prefixed(prefix) => format!("{prefix}{index:06}"),
    }
}

/// Generates `count` patients; `meta.lastUpdated` is strictly increasing with the index and spread
/// over the year before `now_ms` (the last one a minute before it).
pub fn generate(personality: Personality, count: usize, seed: u64, now_ms: i64) -> Vec<Generated> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let year_ms: i64 = 365 * 24 * 3600 * 1000;
    let start = now_ms - year_ms;
    let step = (year_ms - 60_000) / (count.max(1) as i64);
    (0..count)
        .map(|i| {
            let jitter = if step > 2 { rng.i64(0..step / 2) } else { 0 };
            let last_updated_ms = start + (i as i64) * step.max(1) + jitter;
            let id = patient_id(personality, &mut rng, i);
            let patient = patient(personality, &mut rng, &id, i, last_updated_ms);
            let n_cov = rng.usize(0..3);
            let coverages = (0..n_cov)
                .map(|k| coverage(&mut rng, &id, k, last_updated_ms))
                .collect();
            Generated {
                id,
                last_updated_ms,
                patient,
                coverages,
            }
        })
        .collect()
}

fn patient(p: Personality, rng: &mut fastrand::Rng, id: &str, i: usize, lu: i64) -> Value {
    let (gender, sex, given) = match rng.u8(0..20) {
        0 => ("other", "UNK", pick(rng, GIVEN_F)),
        1 => ("unknown", "UNK", pick(rng, GIVEN_M)),
        n if n % 2 == 0 => ("female", "F", pick(rng, GIVEN_F)),
        _ => ("male", "M", pick(rng, GIVEN_M)),
    };
    let family = pick(rng, FAMILY);
    let middle = pick(rng, if sex == "F" { GIVEN_F } else { GIVEN_M });
    let birth = format!(
        "{}-{:02}-{:02}",
        rng.u16(1930..2021),
        rng.u8(1..13),
        rng.u8(1..29)
    );
    let (city, state, zip) = pick(rng, CITIES);
    let race = pick(rng, RACES);
    let eth = pick(rng, ETHNICITIES);
    json!({
        "resourceType": "Patient",
        "id": id,
        "meta": { "versionId": "1", "lastUpdated": instant(lu), "tag": tag() },
        "extension": [
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                "extension": [
                    { "url": "ombCategory", "valueCoding": { "system": CDC_RACE, "code": race.0, "display": race.1 } },
                    { "url": "text", "valueString": race.1 }
                ]
            },
            {
                "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
                "extension": [
                    { "url": "ombCategory", "valueCoding": { "system": CDC_RACE, "code": eth.0, "display": eth.1 } },
                    { "url": "text", "valueString": eth.1 }
                ]
            },
            { "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex", "valueCode": sex }
        ],
        "identifier": [{
            "use": "usual",
            "type": {
                "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR", "display": "Medical Record Number" }],
                "text": "MRN"
            },
            "system": p.mrn_system(),
            "value": format!("{}", 100_000_000 + i * 7 + rng.usize(0..7))
        }],
        "active": true,
        "name": [{ "use": "official", "family": family, "given": [given, middle] }],
        "telecom": [
            { "system": "phone", "value": format!("555-01{:02}", rng.u8(0..100)), "use": "home" },
            { "system": "email", "value": format!("{}.{}{}@example.com", given.to_lowercase(), family.to_lowercase(), i), "use": "home" }
        ],
        "gender": gender,
        "birthDate": birth,
        "address": [{
            "use": "home",
            "line": [format!("{} {}", rng.u16(1..9999), pick(rng, STREETS))],
            "city": city, "state": state, "postalCode": zip, "country": "US"
        }]
    })
}

fn coverage(rng: &mut fastrand::Rng, patient_id: &str, k: usize, lu: i64) -> Value {
    let year = rng.u16(2018..2026);
    json!({
        "resourceType": "Coverage",
        "id": format!("{patient_id}-cov{k}"),
        "meta": { "versionId": "1", "lastUpdated": instant(lu), "tag": tag() },
        "status": "active",
        "subscriberId": format!("SYN{:09}", rng.u32(0..1_000_000_000)),
        "beneficiary": { "reference": format!("Patient/{patient_id}") },
        "relationship": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship", "code": "self" }] },
        "period": { "start": format!("{year}-01-01"), "end": format!("{year}-12-31") },
        "payor": [{ "display": pick(rng, PAYORS) }],
        "class": [
            {
                "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "group" }] },
                "value": format!("GRP{:05}", rng.u32(0..100_000)), "name": "Synthetic Employer Group"
            },
            {
                "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "plan" }] },
                "value": format!("PLN{:03}", rng.u32(0..1000)), "name": "Synthetic PPO"
            }
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_patients_and_another_seed_others() {
        let a = generate(Personality::Epic, 20, 7, 1_700_000_000_000);
        let b = generate(Personality::Epic, 20, 7, 1_700_000_000_000);
        let c = generate(Personality::Epic, 20, 8, 1_700_000_000_000);
        assert_eq!(a[5].patient, b[5].patient);
        assert_ne!(a[5].patient, c[5].patient);
    }

    #[test]
    fn last_updated_is_strictly_increasing_and_ids_unique() {
        let all = generate(Personality::Cerner, 10_000, 1, 1_700_000_000_000);
        assert!(all
            .windows(2)
            .all(|w| w[0].last_updated_ms < w[1].last_updated_ms));
        let ids: std::collections::HashSet<_> = all.iter().map(|g| g.id.clone()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(all.iter().all(|g| g.last_updated_ms < 1_700_000_000_000));
    }

    #[test]
    fn instants_have_milliseconds_and_z() {
        assert_eq!(instant(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
