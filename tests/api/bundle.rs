//! Batch and transaction Bundles at `POST /fhir/r4`: all-or-nothing transactions with
//! `urn:uuid` reference rewriting and referential checks, per-entry outcomes of a batch, scopes
//! and audit per entry.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_valid_fhir, fhir_body, spawn_app};
use crate::patient::{ids, Fhir};

const ALL: &str = "system/*.cruds";

const PATIENT_URN: &str = "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a";
const THERAPIST_URN: &str = "urn:uuid:88f151c0-a954-468a-bdd2-2a6b9d1d4e2a";

async fn post_bundle(fhir: &Fhir<'_>, bundle: &Value) -> reqwest::Response {
    fhir.post("", bundle).await
}

fn entry_post(full_url: Option<&str>, resource: Value) -> Value {
    let ty = resource["resourceType"].as_str().unwrap().to_owned();
    let mut e = json!({ "resource": resource, "request": { "method": "POST", "url": ty } });
    if let Some(u) = full_url {
        e["fullUrl"] = json!(u);
    }
    e
}

fn statuses(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_owned())
        .collect()
}

fn location_id(entry: &Value) -> String {
    let location = entry["response"]["location"].as_str().unwrap();
    location.split('/').nth(1).unwrap().to_owned()
}

/// A patient, a therapist, a session between them and the patient's coverage with an existing
/// payer, linked by `urn:uuid` references.
fn intake(payer: &str) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            entry_post(Some(PATIENT_URN), json!({
                "resourceType": "Patient",
                "identifier": [{ "system": "urn:mrn", "value": "TX-1" }],
                "name": [{ "family": "Transact" }]
            })),
            entry_post(Some(THERAPIST_URN), json!({
                "resourceType": "Practitioner", "name": [{ "family": "Freud" }]
            })),
            entry_post(None, json!({
                "resourceType": "Encounter",
                "status": "finished",
                "class": { "code": "AMB" },
                "subject": { "reference": PATIENT_URN },
                "participant": [{ "individual": { "reference": THERAPIST_URN } }],
                "period": { "start": "2026-03-05T10:00:00Z", "end": "2026-03-05T10:50:00Z" }
            })),
            entry_post(None, json!({
                "resourceType": "Coverage",
                "status": "active",
                "beneficiary": { "reference": PATIENT_URN },
                "payor": [{ "reference": format!("Organization/{payer}") }]
            })),
        ]
    })
}

#[tokio::test]
async fn a_transaction_writes_everything_with_urn_references_rewritten() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let payer = fhir
        .create(&json!({ "resourceType": "Organization", "name": "Acme" }))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = post_bundle(&fhir, &intake(&payer)).await;
    assert_eq!(res.status(), 200);
    let response = fhir_body(res).await;
    assert_eq!(response["type"], "transaction-response");
    assert_eq!(statuses(&response), ["201 Created"; 4]);
    let entries = response["entry"].as_array().unwrap();
    let patient = location_id(&entries[0]);
    let therapist = location_id(&entries[1]);
    let encounter = location_id(&entries[2]);
    for e in entries {
        assert!(e["response"]["location"]
            .as_str()
            .unwrap()
            .ends_with("/_history/1"));
        assert_eq!(e["response"]["etag"], "W/\"1\"");
        assert!(e["fullUrl"]
            .as_str()
            .unwrap()
            .starts_with(&app.url("/fhir/r4/")));
    }
    // The stored resources point at the new ids, and are indexed by them.
    let read = fhir_body(fhir.get(&format!("/Encounter/{encounter}")).await).await;
    assert_eq!(read["subject"]["reference"], format!("Patient/{patient}"));
    assert_eq!(
        read["participant"][0]["individual"]["reference"],
        format!("Practitioner/{therapist}")
    );
    assert_eq!(entries[2]["resource"], read);
    assert_eq!(
        fhir.search_ids(&format!("/Encounter?patient={patient}"))
            .await,
        [encounter.clone()] as [String; 1]
    );
    assert_eq!(
        fhir.search_ids(&format!("/Coverage?patient={patient}&payor={payer}"))
            .await
            .len(),
        1
    );
    let mut emitted = vec![response.clone()];
    emitted.extend(entries.iter().map(|e| e["resource"].clone()));
    assert_valid_fhir(&emitted);

    // Each entry is audited as its own interaction, with the patient it concerns.
    let events = app
        .store
        .audit_chain_page(&fhir.session.practice_id, 0, 10_000)
        .await
        .unwrap();
    let creates: Vec<(&str, Option<&str>)> = events
        .iter()
        .filter(|e| e.action == "create" && e.resource_type.as_deref() != Some("Organization"))
        .map(|e| (e.resource_type.as_deref().unwrap(), e.patient_id.as_deref()))
        .collect();
    assert_eq!(
        creates,
        [
            ("Patient", Some(patient.as_str())),
            ("Practitioner", None),
            ("Encounter", Some(patient.as_str())),
            ("Coverage", Some(patient.as_str()))
        ]
    );
}

async fn count(fhir: &Fhir<'_>, ty: &str) -> Value {
    fhir_body(fhir.get(&format!("/{ty}?_summary=count")).await).await["total"].clone()
}

#[tokio::test]
async fn a_failing_transaction_writes_nothing() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let payer = fhir
        .create(&json!({ "resourceType": "Organization", "name": "Acme" }))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let existing = fhir
        .create(&json!({ "resourceType": "Patient", "name": [{ "family": "Stay" }] }))
        .await;
    let existing_id = existing["id"].as_str().unwrap().to_owned();

    // A reference to a missing resource: 422 naming the element; nothing written.
    let mut bundle = intake(&payer);
    bundle["entry"][3]["resource"]["payor"][0]["reference"] = json!("Organization/nope");
    let res = post_bundle(&fhir, &bundle).await;
    assert_eq!(res.status(), 422);
    let outcome = fhir_body(res).await;
    assert_eq!(
        outcome["issue"][0]["expression"][0],
        "Bundle.entry[3].resource.payor[0].reference"
    );
    assert_eq!(count(&fhir, "Patient").await, 1);

    // A URN no entry has.
    let mut bundle = intake(&payer);
    bundle["entry"][2]["resource"]["subject"]["reference"] =
        json!("urn:uuid:00000000-0000-0000-0000-000000000000");
    let res = post_bundle(&fhir, &bundle).await;
    assert_eq!(res.status(), 422);
    assert_eq!(
        fhir_body(res).await["issue"][0]["expression"][0],
        "Bundle.entry[2].resource.subject.reference"
    );

    // A structurally invalid entry: 400 with the entry's path.
    let mut bundle = intake(&payer);
    bundle["entry"][1]["resource"]["resourceType"] = json!("Patient");
    let res = post_bundle(&fhir, &bundle).await;
    assert_eq!(res.status(), 400);
    let issue = &fhir_body(res).await["issue"][0];
    assert!(issue["expression"][0]
        .as_str()
        .unwrap()
        .starts_with("Bundle.entry[1].resource"));

    let mut bundle = intake(&payer);
    bundle["entry"][0]["resource"]["gender"] = json!("robot");
    let res = post_bundle(&fhir, &bundle).await;
    assert_eq!(res.status(), 400);
    assert_eq!(
        fhir_body(res).await["issue"][0]["expression"][0],
        "Bundle.entry[0].resource.gender"
    );

    // An update whose ifMatch is stale: 412, and the other entries are not written either.
    let mut update = existing.clone();
    update["name"] = json!([{ "family": "Changed" }]);
    let mut bundle = intake(&payer);
    bundle["entry"].as_array_mut().unwrap().push(json!({
        "resource": update,
        "request": { "method": "PUT", "url": format!("Patient/{existing_id}"), "ifMatch": "W/\"7\"" }
    }));
    let res = post_bundle(&fhir, &bundle).await;
    assert_eq!(res.status(), 412);
    assert_eq!(count(&fhir, "Patient").await, 1);
    let read = fhir_body(fhir.get(&format!("/Patient/{existing_id}")).await).await;
    assert_eq!(read["name"][0]["family"], "Stay");

    // The same resource written twice; a delete of a resource another entry references.
    let mut bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        { "request": { "method": "DELETE", "url": format!("Patient/{existing_id}") } },
        { "request": { "method": "DELETE", "url": format!("Patient/{existing_id}") } }
    ]});
    assert_eq!(post_bundle(&fhir, &bundle).await.status(), 400);
    bundle["entry"][1] = entry_post(
        None,
        json!({
            "resourceType": "Claim", "status": "active", "use": "claim",
            "type": { "coding": [{ "code": "professional" }] },
            "patient": { "reference": format!("Patient/{existing_id}") },
            "created": "2026-03-06", "provider": { "reference": format!("Organization/{payer}") },
            "priority": { "coding": [{ "code": "normal" }] },
            "insurance": [{ "sequence": 1, "focal": true, "coverage": { "display": "self-pay" } }]
        }),
    );
    let res = post_bundle(&fhir, &bundle).await;
    assert_eq!(res.status(), 422);
    assert_eq!(
        fhir.get(&format!("/Patient/{existing_id}")).await.status(),
        200
    );
    assert!(fhir.search_ids("/Claim").await.is_empty());

    // Only Encounters may be written by this client: the whole transaction is 403.
    let limited = fhir
        .via(&app, "system/Encounter.cruds system/Patient.rs")
        .await;
    let res = post_bundle(&limited, &intake(&payer)).await;
    assert_eq!(res.status(), 403);
    assert_eq!(
        fhir_body(res).await["issue"][0]["expression"][0],
        "Bundle.entry[0].request"
    );
    assert_eq!(count(&fhir, "Patient").await, 1);
}

#[tokio::test]
async fn a_conditional_create_in_a_transaction_reuses_the_match() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let payer = fhir
        .create(&json!({ "resourceType": "Organization", "name": "Acme" }))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = fhir_body(post_bundle(&fhir, &intake(&payer)).await).await;
    let patient = location_id(&first["entry"][0]);
    let mut again = intake(&payer);
    again["entry"][0]["request"]["ifNoneExist"] = json!("identifier=urn:mrn|TX-1");
    let res = post_bundle(&fhir, &again).await;
    assert_eq!(res.status(), 200);
    let second = fhir_body(res).await;
    assert_eq!(statuses(&second)[0], "200 OK");
    assert_eq!(location_id(&second["entry"][0]), patient);
    // The new coverage points at the patient that already existed.
    let coverages = fhir
        .search_ids(&format!("/Coverage?patient={patient}"))
        .await;
    assert_eq!(coverages.len(), 2);
}

#[tokio::test]
async fn a_batch_answers_each_entry_on_its_own() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let kept = fhir
        .create(&json!({ "resourceType": "Patient", "name": [{ "family": "Kept" }] }))
        .await;
    let kept_id = kept["id"].as_str().unwrap().to_owned();
    let gone = fhir
        .create(&json!({ "resourceType": "Patient", "name": [{ "family": "Gone" }] }))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let bundle = json!({ "resourceType": "Bundle", "type": "batch", "entry": [
        entry_post(None, json!({ "resourceType": "Patient", "name": [{ "family": "New" }] })),
        { "request": { "method": "GET", "url": format!("Patient/{kept_id}") } },
        { "request": { "method": "GET", "url": "Patient/missing" } },
        { "resource": kept, "request": { "method": "PUT", "url": format!("Patient/{kept_id}"), "ifMatch": "W/\"9\"" } },
        { "request": { "method": "DELETE", "url": format!("Patient/{gone}") } },
        { "request": { "method": "GET", "url": "Patient?name=x" } },
        { "request": { "method": "PATCH", "url": format!("Patient/{kept_id}") } },
        entry_post(None, json!({ "resourceType": "Encounter", "status": "finished", "class": { "code": "AMB" },
            "subject": { "reference": PATIENT_URN } })),
        { "request": { "method": "GET", "url": format!("Patient/{kept_id}/_history/1") } },
    ]});
    let res = post_bundle(&fhir, &bundle).await;
    assert_eq!(res.status(), 200);
    let response = fhir_body(res).await;
    assert_eq!(response["type"], "batch-response");
    assert_eq!(
        statuses(&response),
        [
            "201 Created",
            "200 OK",
            "404 Not Found",
            "412 Precondition Failed",
            "204 No Content",
            "400 Bad Request",
            "400 Bad Request",
            "422 Unprocessable Entity",
            "200 OK"
        ]
    );
    // Every entry is audited, failures included.
    let events = app
        .store
        .audit_chain_page(&fhir.session.practice_id, 0, 10_000)
        .await
        .unwrap();
    let batch: Vec<(String, i64)> = events
        .iter()
        .skip(events.len() - 9)
        .map(|e| (e.action.clone(), e.status_code))
        .collect();
    assert_eq!(
        batch,
        [
            ("create".to_owned(), 201),
            ("read".to_owned(), 200),
            ("read".to_owned(), 404),
            ("update".to_owned(), 412),
            ("delete".to_owned(), 204),
            ("search".to_owned(), 400),
            ("update".to_owned(), 400),
            ("create".to_owned(), 422),
            ("vread".to_owned(), 200),
        ]
    );

    let entries = response["entry"].as_array().unwrap();
    assert_eq!(entries[1]["resource"]["name"][0]["family"], "Kept");
    for failed in [2, 3, 5, 6, 7] {
        assert_eq!(
            entries[failed]["response"]["outcome"]["resourceType"],
            "OperationOutcome"
        );
    }
    // What succeeded is stored; what failed is not.
    let new_id = location_id(&entries[0]);
    assert_eq!(fhir.get(&format!("/Patient/{new_id}")).await.status(), 200);
    assert_eq!(fhir.get(&format!("/Patient/{gone}")).await.status(), 410);
    assert!(fhir.search_ids("/Encounter").await.is_empty());
    let mut emitted = vec![response.clone()];
    emitted.extend(
        entries
            .iter()
            .filter_map(|e| e.get("resource").cloned())
            .chain(
                entries
                    .iter()
                    .filter_map(|e| e["response"].get("outcome").cloned()),
            ),
    );
    assert_valid_fhir(&emitted);

    // Scopes per entry: this client may read Patients but not create them.
    let reader = fhir.via(&app, "system/Patient.rs").await;
    let res = post_bundle(
        &reader,
        &json!({ "resourceType": "Bundle", "type": "batch", "entry": [
            entry_post(None, json!({ "resourceType": "Patient" })),
            { "request": { "method": "GET", "url": format!("Patient/{kept_id}") } },
        ]}),
    )
    .await;
    assert_eq!(statuses(&fhir_body(res).await), ["403 Forbidden", "200 OK"]);
}

#[tokio::test]
async fn prefer_return_minimal_leaves_the_resources_out() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        entry_post(None, json!({ "resourceType": "Patient", "name": [{ "family": "Min" }] })),
    ]});
    let res = fhir
        .request(Method::POST, "")
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=minimal")
        .body(bundle.to_string())
        .send()
        .await
        .unwrap();
    let response = fhir_body(res).await;
    assert!(response["entry"][0].get("resource").is_none());
    assert_eq!(response["entry"][0]["response"]["status"], "201 Created");
    let res = fhir
        .request(Method::POST, "")
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=OperationOutcome")
        .body(bundle.to_string())
        .send()
        .await
        .unwrap();
    let response = fhir_body(res).await;
    assert_eq!(
        response["entry"][0]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_valid_fhir(&[response]);
}

#[tokio::test]
async fn malformed_bundles_are_refused_with_an_operation_outcome() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let too_many: Vec<Value> = (0..1001)
        .map(|_| json!({ "request": { "method": "GET", "url": "Patient/x" } }))
        .collect();
    for (body, why) in [
        ("{not json".to_owned(), "not JSON"),
        (json!({ "resourceType": "Patient" }).to_string(), "not a Bundle"),
        (json!({ "resourceType": "Bundle", "type": "collection" }).to_string(), "collection"),
        (json!({ "resourceType": "Bundle", "type": "transaction", "entry": [{ "resource": { "resourceType": "Patient" } }] }).to_string(), "no request"),
        (json!({ "resourceType": "Bundle", "type": "transaction", "entry": [{ "request": { "method": "GET", "url": "https://elsewhere.example/Patient/1" } }] }).to_string(), "foreign url"),
        (json!({ "resourceType": "Bundle", "type": "transaction", "entry": too_many }).to_string(), "too many"),
    ] {
        let res = fhir
            .request(Method::POST, "")
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{why}");
        assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome", "{why}");
    }
    // An empty transaction is a no-op with an empty response.
    let res = post_bundle(
        &fhir,
        &json!({ "resourceType": "Bundle", "type": "transaction" }),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(fhir_body(res).await["type"], "transaction-response");
    assert!(ids(&json!({})).is_empty());
}

#[tokio::test]
async fn the_capability_statement_declares_transaction_and_batch() {
    let app = spawn_app().await;
    let metadata = fhir_body(app.get("/fhir/r4/metadata").await).await;
    let codes: Vec<&str> = metadata["rest"][0]["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["transaction", "batch"]);
}

#[tokio::test]
async fn an_oversized_body_is_413_with_an_operation_outcome() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let big = json!({
        "resourceType": "Patient",
        "photo": [{ "contentType": "image/png", "data": "A".repeat(9 * 1024 * 1024) }]
    });
    let res = fhir.post("/Patient", &big).await;
    assert_eq!(res.status(), 413);
    assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome");
}
