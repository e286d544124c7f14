//! Claim preparation as a practice's billing system sees it: `POST /api/v1/claims/prepare`
//! turns a session into a stored FHIR Claim with lifecycle status `prepared`, or answers 422
//! with every problem at once (one issue each, naming its field, never quoting a value) and
//! stores nothing; payer rules from `config/payers` apply; the member id comes from the
//! patient's Coverage for the payer; references resolve only within the caller's practice.

use fhirgate::gate::Role;
use serde_json::{json, Value};

use crate::claim_push::Gateway;
use crate::helpers::{assert_valid_fhir, spawn_app, TestApp};

/// A valid NPI (the CMS example; Luhn over 80840 + the digits).
const NPI: &str = "1234567893";
const REFERRING_NPI: &str = "1245319599";

/// The records a session names: a patient, a practitioner with an NPI, and the patient's
/// Coverage with BCBS (member id `XQB812345678`).
struct Practice {
    patient: String,
    practitioner: String,
    coverage: String,
}

async fn practice(gw: &Gateway) -> Practice {
    let patient = gw
        .create(json!({
            "resourceType": "Patient",
            "name": [{ "family": "Marchetti", "given": ["Lucia"] }],
            "birthDate": "1984-02-29"
        }))
        .await;
    let practitioner = gw
        .create(json!({
            "resourceType": "Practitioner",
            "identifier": [{ "system": "http://hl7.org/fhir/sid/us-npi", "value": NPI }],
            "name": [{ "family": "Okafor", "given": ["Chidi"] }]
        }))
        .await;
    let payer = gw
        .create(json!({
            "resourceType": "Organization",
            "name": "Blue Cross Blue Shield",
            "identifier": [{ "system": "urn:fhirgate:payer", "value": "BCBS" }]
        }))
        .await;
    let coverage = gw
        .create(json!({
            "resourceType": "Coverage",
            "status": "active",
            "subscriberId": "XQB812345678",
            "beneficiary": { "reference": format!("Patient/{patient}") },
            "payor": [{ "reference": format!("Organization/{payer}") }]
        }))
        .await;
    Practice {
        patient,
        practitioner,
        coverage,
    }
}

/// Yesterday, as a date of service every payer's window admits.
fn yesterday() -> String {
    (time::OffsetDateTime::now_utc().date() - time::Duration::days(1)).to_string()
}

fn session(p: &Practice, cpt: &str, payer: &str) -> Value {
    json!({
        "patient_id": p.patient,
        "therapist_id": p.practitioner,
        "session_date": yesterday(),
        "cpt_code": cpt,
        "icd10_codes": ["F41.1", "Z63.0"],
        "fee": 150.00,
        "copay": "25.50",
        "payer_id": payer
    })
}

async fn prepare(gw: &Gateway, body: &Value) -> (u16, Value) {
    let res = gw.post("/api/v1/claims/prepare", body).await;
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

/// The rules the issues of a 422 name, in order.
fn rules(outcome: &Value) -> Vec<String> {
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    outcome["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["details"]["coding"][0]["code"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

fn fields(outcome: &Value) -> Vec<String> {
    outcome["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["expression"][0].as_str().unwrap().to_owned())
        .collect()
}

async fn claims_stored(gw: &Gateway) -> u64 {
    let res = gw.get("/fhir/r4/Claim?_summary=count").await;
    let body: Value = res.json().await.unwrap();
    body["total"].as_u64().unwrap()
}

async fn app_and_gateway(role: Role) -> (TestApp, Gateway) {
    let app = spawn_app().await;
    let gw = Gateway::of(&app, role).await;
    (app, gw)
}

#[tokio::test]
async fn a_valid_session_becomes_a_stored_prepared_fhir_claim() {
    let (_app, gw) = app_and_gateway(Role::Billing).await;
    let p = practice(&gw).await;
    let mut own = session(&p, "90834", "BCBS");
    own["practice_id"] = json!(gw.practice.as_str());
    let (status, body) = prepare(&gw, &own).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "prepared");
    assert_eq!(body["next"], json!(["submitted"]));
    let id = body["claim_id"].as_str().unwrap();
    let claim = &body["claim"];
    assert_valid_fhir(std::slice::from_ref(claim));

    // What the session said, as FHIR: exact money, CPT, ICD-10-CM in order, member id from the
    // patient's Coverage, the practitioner as provider, the payer as insurer.
    assert_eq!(
        claim["patient"]["reference"],
        format!("Patient/{}", p.patient)
    );
    assert_eq!(
        claim["provider"]["reference"],
        format!("Practitioner/{}", p.practitioner)
    );
    assert_eq!(claim["insurer"]["identifier"]["value"], "BCBS");
    assert_eq!(
        claim["insurance"][0]["coverage"]["reference"],
        format!("Coverage/{}", p.coverage)
    );
    let item = &claim["item"][0];
    assert_eq!(item["productOrService"]["coding"][0]["code"], "90834");
    assert_eq!(item["unitPrice"]["value"].to_string(), "150.00");
    assert_eq!(item["unitPrice"]["currency"], "USD");
    assert_eq!(
        item["extension"][0]["valueMoney"]["value"].to_string(),
        "25.50"
    );
    assert_eq!(item["servicedDate"], yesterday());
    assert_eq!(
        claim["diagnosis"][0]["diagnosisCodeableConcept"]["coding"][0]["code"],
        "F41.1"
    );
    assert_eq!(
        claim["diagnosis"][1]["diagnosisCodeableConcept"]["coding"][0]["code"],
        "Z63.0"
    );

    // Stored: the FHIR API serves the same Claim, and its lifecycle status is `prepared`.
    let res = gw.get(&format!("/fhir/r4/Claim/{id}")).await;
    assert_eq!(res.status(), 200);
    let served: Value = res.json().await.unwrap();
    assert_eq!(&served, claim);
    let res = gw.get(&format!("/api/v1/claims/{id}/status")).await;
    let state: Value = res.json().await.unwrap();
    assert_eq!(state["status"], "prepared");
    assert_eq!(state["version"], 1);

    // The lifecycle goes on from there: submitted is legal, paid is not.
    assert_eq!(gw.set_status(id, "paid").await.status(), 409);
    assert_eq!(gw.set_status(id, "submitted").await.status(), 200);
}

#[tokio::test]
async fn every_problem_is_reported_at_once_with_its_field_and_nothing_is_stored() {
    let (_app, gw) = app_and_gateway(Role::Billing).await;
    let p = practice(&gw).await;
    let tomorrow = (time::OffsetDateTime::now_utc().date() + time::Duration::days(1)).to_string();
    let body = json!({
        "patient_id": p.patient,
        "therapist_id": p.practitioner,
        "session_date": tomorrow,
        "cpt_code": "99999",
        "icd10_codes": ["F41"],
        "fee": "80.00",
        "copay": "95.00",
        "payer_id": "BCBS",
        "favourite_colour": "teal",
        "practice_id": "another-practice"
    });
    let (status, outcome) = prepare(&gw, &body).await;
    assert_eq!(status, 422, "{outcome}");
    let fields = fields(&outcome);
    for field in [
        "practice_id",
        "session_date",
        "cpt_code",
        "icd10_codes[0]",
        "copay",
        "favourite_colour",
    ] {
        assert!(
            fields.iter().any(|f| f == field),
            "{field} missing: {outcome}"
        );
    }
    assert!(outcome["issue"].as_array().unwrap().len() >= 5);
    // Issues name fields and rules; they never repeat what the client sent.
    let text = outcome.to_string();
    for value in [tomorrow.as_str(), "99999", "95.00", "teal", "XQB812345678"] {
        assert!(!text.contains(value), "{value} echoed: {text}");
    }
    assert_eq!(claims_stored(&gw).await, 0);

    // Not a JSON object: 400, an OperationOutcome too.
    let res = gw
        .post("/api/v1/claims/prepare", &json!(["not", "an", "object"]))
        .await;
    assert_eq!(res.status(), 400);
    let outcome: Value = res.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn payer_rules_from_config_apply_to_the_payer_named() {
    let (_app, gw) = app_and_gateway(Role::Billing).await;
    let p = practice(&gw).await;

    // BCBS requires prior authorisation for 90837, not for 90834.
    let (status, outcome) = prepare(&gw, &session(&p, "90837", "BCBS")).await;
    assert_eq!(status, 422, "{outcome}");
    assert!(
        rules(&outcome).iter().any(|r| r.starts_with("payer.BCBS")),
        "{outcome}"
    );
    assert_eq!(fields(&outcome), ["prior_authorization"]);
    let mut with_auth = session(&p, "90837", "BCBS");
    with_auth["prior_authorization"] = json!("PA-77123");
    let (status, body) = prepare(&gw, &with_auth).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["claim"]["insurance"][0]["preAuthRef"],
        json!(["PA-77123"])
    );

    // AETNA requires a referring provider; the patient has no Aetna coverage, so the member
    // id must come with the session.
    let (status, outcome) = prepare(&gw, &session(&p, "90834", "AETNA")).await;
    assert_eq!(status, 422, "{outcome}");
    let fields_named = fields(&outcome);
    assert!(
        fields_named.iter().any(|f| f == "referring_provider_npi"),
        "{outcome}"
    );
    assert!(fields_named.iter().any(|f| f == "member_id"), "{outcome}");
    let mut aetna = session(&p, "90834", "AETNA");
    aetna["referring_provider_npi"] = json!(REFERRING_NPI);
    aetna["member_id"] = json!("W123456789");
    let (status, body) = prepare(&gw, &aetna).await;
    assert_eq!(status, 201, "{body}");
    let team = body["claim"]["careTeam"].as_array().unwrap();
    assert!(team
        .iter()
        .any(|m| m["provider"]["identifier"]["value"] == REFERRING_NPI));

    // A payer no file describes.
    let (status, outcome) = prepare(&gw, &session(&p, "90834", "NOSUCHPAYER")).await;
    assert_eq!(status, 422);
    assert_eq!(fields(&outcome), ["payer_id"]);
}

#[tokio::test]
async fn references_resolve_only_in_the_callers_practice_and_roles_are_enforced() {
    let app = spawn_app().await;
    let ours = Gateway::of(&app, Role::Billing).await;
    let theirs = Gateway::of(&app, Role::Billing).await;
    let p = practice(&theirs).await;

    // Another practice's patient and practitioner do not exist for this caller.
    let (status, outcome) = prepare(&ours, &session(&p, "90834", "BCBS")).await;
    assert_eq!(status, 422, "{outcome}");
    let named = fields(&outcome);
    assert!(named.iter().any(|f| f == "patient_id"), "{outcome}");
    assert!(named.iter().any(|f| f == "therapist_id"), "{outcome}");
    assert_eq!(claims_stored(&ours).await, 0);
    assert_eq!(claims_stored(&theirs).await, 0);

    // A practitioner without an NPI cannot bill.
    let bare = theirs
        .create(json!({ "resourceType": "Practitioner", "name": [{ "family": "Nobody" }] }))
        .await;
    let mut body = session(&p, "90834", "BCBS");
    body["therapist_id"] = json!(bare);
    let (status, outcome) = prepare(&theirs, &body).await;
    assert_eq!(status, 422);
    assert_eq!(fields(&outcome), ["therapist_id"]);

    // A clinician's token may not prepare claims.
    let clinician = Gateway::of(&app, Role::Clinician).await;
    let res = clinician
        .post("/api/v1/claims/prepare", &session(&p, "90834", "BCBS"))
        .await;
    assert_eq!(res.status(), 403);
}
