//! The practice's other resources over FHIR REST (Practitioner, Organization, Coverage,
//! Encounter, Claim, ClaimResponse): the official R4 examples round-trip, each type's search
//! parameters, `_include` of the referenced patient, and the CapabilityStatement listing exactly
//! what is served.

use serde_json::{json, Value};

use crate::helpers::{assert_valid_fhir, fhir_body, spawn_app, spawn_app_with};
use crate::patient::{ids, Fhir};

const ALL: &str = "system/*.cruds";
/// These tests make a few hundred requests as one client.
const UNLIMITED: &str = "[rate_limit]\nclient_points = 10000000\npractice_points = 10000000\n";
const SERVED: &[&str] = &[
    "Patient",
    "Practitioner",
    "Organization",
    "Coverage",
    "Encounter",
    "Claim",
    "ClaimResponse",
];

fn examples() -> Vec<(String, Value)> {
    let dir = format!(
        "{}/../shared/fixtures/r4-examples",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("the fixtures are in ../shared/fixtures") {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        if SERVED.contains(&value["resourceType"].as_str().unwrap_or_default()) {
            out.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                value,
            ));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A resource without what the server sets (meta.versionId and meta.lastUpdated; meta itself
/// when nothing else is in it).
fn without_server_meta(mut resource: Value) -> Value {
    if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
        meta.shift_remove("versionId");
        meta.shift_remove("lastUpdated");
        if meta.is_empty() {
            resource.as_object_mut().unwrap().shift_remove("meta");
        }
    }
    resource
}

#[tokio::test]
async fn the_official_examples_of_every_served_type_round_trip() {
    let app = spawn_app_with(UNLIMITED).await;
    let fhir = Fhir::new(&app, ALL).await;
    let examples = examples();
    let mut types: Vec<&str> = examples
        .iter()
        .map(|(_, v)| v["resourceType"].as_str().unwrap())
        .collect();
    types.dedup();
    assert_eq!(
        types.len(),
        SERVED.len(),
        "an example of each type: {types:?}"
    );
    let mut emitted = Vec::new();
    for (file, example) in &examples {
        let ty = example["resourceType"].as_str().unwrap();
        let id = example["id"].as_str().unwrap();
        // Update-as-create keeps the example's id, so its references stay meaningful.
        let res = fhir.put(&format!("/{ty}/{id}"), example).await;
        assert_eq!(res.status(), 201, "{file}: {}", res.text().await.unwrap());
        let res = fhir.get(&format!("/{ty}/{id}")).await;
        assert_eq!(res.status(), 200, "{file}");
        let read = fhir_body(res).await;
        assert_eq!(read["meta"]["versionId"], "1", "{file}");
        // Exactly what was written: every element, in order, numbers digit for digit
        // (arbitrary_precision compares number text).
        assert_eq!(
            serde_json::to_string(&without_server_meta(read.clone())).unwrap(),
            serde_json::to_string(&without_server_meta(example.clone())).unwrap(),
            "{file} did not round-trip"
        );
        emitted.push(read);
    }
    assert_valid_fhir(&emitted);
}

fn coverage(patient: &str, payor: &str, member_id: &str) -> Value {
    json!({
        "resourceType": "Coverage",
        "status": "active",
        "identifier": [{ "system": "https://payer.example/member", "value": member_id }],
        "beneficiary": { "reference": format!("Patient/{patient}") },
        "payor": [{ "reference": format!("Organization/{payor}") }]
    })
}

fn encounter(patient: &str, therapist: &str, start: &str, end: &str) -> Value {
    json!({
        "resourceType": "Encounter",
        "status": "finished",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
        "subject": { "reference": format!("Patient/{patient}") },
        "participant": [{ "individual": { "reference": format!("Practitioner/{therapist}") } }],
        "period": { "start": start, "end": end }
    })
}

fn claim(patient: &str, status: &str, created: &str) -> Value {
    json!({
        "resourceType": "Claim",
        "status": status,
        "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional" }] },
        "use": "claim",
        "patient": { "reference": format!("Patient/{patient}") },
        "created": created,
        "provider": { "reference": "Organization/practice" },
        "priority": { "coding": [{ "code": "normal" }] },
        "insurance": [{ "sequence": 1, "focal": true, "coverage": { "reference": "Coverage/c1" } }]
    })
}

async fn new_id(fhir: &Fhir<'_>, body: Value) -> String {
    fhir.create(&body).await["id"].as_str().unwrap().to_owned()
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test]
async fn coverage_encounter_and_claim_are_found_by_their_parameters() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let ann = new_id(
        &fhir,
        json!({ "resourceType": "Patient", "name": [{ "family": "Ann" }] }),
    )
    .await;
    let bob = new_id(
        &fhir,
        json!({ "resourceType": "Patient", "name": [{ "family": "Bob" }] }),
    )
    .await;
    let payer = new_id(
        &fhir,
        json!({ "resourceType": "Organization", "name": "Acme Health" }),
    )
    .await;
    let other_payer = new_id(
        &fhir,
        json!({ "resourceType": "Organization", "name": "Zenith" }),
    )
    .await;
    let t1 = new_id(
        &fhir,
        json!({ "resourceType": "Practitioner", "name": [{ "family": "Freud" }] }),
    )
    .await;
    let t2 = new_id(
        &fhir,
        json!({ "resourceType": "Practitioner", "name": [{ "family": "Jung" }] }),
    )
    .await;

    let c_ann = new_id(&fhir, coverage(&ann, &payer, "MEM-1")).await;
    let c_bob = new_id(&fhir, coverage(&bob, &other_payer, "MEM-2")).await;
    assert_eq!(
        fhir.search_ids(&format!("/Coverage?patient={ann}")).await,
        [c_ann.clone()] as [String; 1]
    );
    assert_eq!(
        fhir.search_ids(&format!("/Coverage?patient=Patient/{bob}"))
            .await,
        [c_bob.clone()] as [String; 1]
    );
    assert_eq!(
        fhir.search_ids(&format!("/Coverage?payor=Organization/{payer}"))
            .await,
        [c_ann.clone()] as [String; 1]
    );
    assert_eq!(
        fhir.search_ids("/Coverage?identifier=https://payer.example/member|MEM-2")
            .await,
        [c_bob.clone()] as [String; 1]
    );
    assert!(fhir
        .search_ids("/Coverage?identifier=MEM-3")
        .await
        .is_empty());

    let e1 = new_id(
        &fhir,
        encounter(&ann, &t1, "2026-03-05T10:00:00Z", "2026-03-05T10:50:00Z"),
    )
    .await;
    let e2 = new_id(
        &fhir,
        encounter(&ann, &t2, "2026-04-01T09:00:00Z", "2026-04-01T09:50:00Z"),
    )
    .await;
    let e3 = new_id(
        &fhir,
        encounter(&bob, &t1, "2025-12-30T15:00:00Z", "2025-12-30T15:50:00Z"),
    )
    .await;
    assert_eq!(
        sorted(fhir.search_ids(&format!("/Encounter?patient={ann}")).await),
        sorted(vec![e1.clone(), e2.clone()])
    );
    assert_eq!(
        fhir.search_ids(&format!("/Encounter?practitioner={t2}"))
            .await,
        [e2.clone()] as [String; 1]
    );
    assert_eq!(
        fhir.search_ids("/Encounter?date=2026-03-05").await,
        [e1.clone()] as [String; 1]
    );
    assert_eq!(
        fhir.search_ids("/Encounter?date=2026-03").await,
        [e1.clone()] as [String; 1]
    );
    assert_eq!(
        sorted(fhir.search_ids("/Encounter?date=ge2026-03-06").await),
        [e2.clone()] as [String; 1]
    );
    assert_eq!(
        fhir.search_ids("/Encounter?date=lt2026").await,
        [e3.clone()] as [String; 1]
    );
    assert_eq!(
        sorted(
            fhir.search_ids("/Encounter?date=ge2025-12-30&date=le2026-03-05")
                .await
        ),
        sorted(vec![e1.clone(), e3.clone()])
    );
    assert_eq!(
        fhir.search_ids(&format!("/Encounter?patient={ann}&date=gt2026-03-05"))
            .await,
        [e2.clone()] as [String; 1]
    );

    let k1 = new_id(&fhir, claim(&ann, "active", "2026-03-06")).await;
    let k2 = new_id(&fhir, claim(&ann, "draft", "2026-04-02T08:00:00Z")).await;
    let k3 = new_id(&fhir, claim(&bob, "active", "2026-04-03")).await;
    assert_eq!(
        sorted(fhir.search_ids(&format!("/Claim?patient={ann}")).await),
        sorted(vec![k1.clone(), k2.clone()])
    );
    assert_eq!(
        sorted(fhir.search_ids("/Claim?status=active").await),
        sorted(vec![k1.clone(), k3.clone()])
    );
    assert_eq!(
        fhir.search_ids("/Claim?created=2026-04-02").await,
        [k2.clone()] as [String; 1]
    );
    assert_eq!(
        sorted(fhir.search_ids("/Claim?created=ge2026-04").await),
        sorted(vec![k2.clone(), k3.clone()])
    );
    assert_eq!(
        fhir.search_ids(&format!("/Claim?patient={bob}&status=draft"))
            .await,
        Vec::<String>::new()
    );

    // A new version moves the resource in the index; a deleted one leaves it.
    let mut moved = encounter(&bob, &t2, "2026-03-05T10:00:00Z", "2026-03-05T10:50:00Z");
    moved["id"] = json!(e1);
    assert_eq!(
        fhir.put(&format!("/Encounter/{e1}"), &moved).await.status(),
        200
    );
    assert_eq!(
        fhir.search_ids(&format!("/Encounter?patient={ann}")).await,
        [e2.clone()] as [String; 1]
    );
    let res = fhir
        .request(reqwest::Method::DELETE, &format!("/Claim/{k3}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(
        fhir.search_ids("/Claim?status=active").await,
        [k1.clone()] as [String; 1]
    );

    // Bad values are 400 with the parameter named.
    for (query, names) in [
        ("/Encounter?date=2026-13", "date"),
        ("/Coverage?patient=Organization/x", "patient"),
        ("/Claim?created=yesterday", "created"),
    ] {
        let res = fhir.get(query).await;
        assert_eq!(res.status(), 400, "{query}");
        let outcome = fhir_body(res).await;
        assert!(outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .starts_with(names));
    }
}

#[tokio::test]
async fn include_adds_each_referenced_patient_once() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let ann = new_id(
        &fhir,
        json!({ "resourceType": "Patient", "name": [{ "family": "Ann" }] }),
    )
    .await;
    let bob = new_id(
        &fhir,
        json!({ "resourceType": "Patient", "name": [{ "family": "Bob" }] }),
    )
    .await;
    for p in [&ann, &ann, &bob] {
        new_id(&fhir, claim(p, "active", "2026-03-06")).await;
    }
    let res = fhir
        .get("/Claim?status=active&_include=Claim:patient")
        .await;
    assert_eq!(res.status(), 200);
    let bundle = fhir_body(res).await;
    let entries = bundle["entry"].as_array().unwrap();
    let modes: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["resource"]["resourceType"].as_str().unwrap(),
                e["search"]["mode"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        [
            ("Claim", "match"),
            ("Claim", "match"),
            ("Claim", "match"),
            ("Patient", "include"),
            ("Patient", "include")
        ]
    );
    // total counts matches only; every entry has a fullUrl of its own type.
    assert_eq!(bundle["total"], 3);
    let included: Vec<String> = entries[3..]
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sorted(included), sorted(vec![ann.clone(), bob.clone()]));
    for e in entries {
        let url = e["fullUrl"].as_str().unwrap();
        let r = &e["resource"];
        assert!(url.ends_with(&format!(
            "/fhir/r4/{}/{}",
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        )));
    }
    // The paging links keep the _include.
    assert!(bundle["link"][0]["url"]
        .as_str()
        .unwrap()
        .contains("_include=Claim%3Apatient"));
    let mut all = vec![bundle.clone()];
    all.extend(entries.iter().map(|e| e["resource"].clone()));
    assert_valid_fhir(&all);

    // With the target type named; through POST _search; a deleted patient is left out.
    let res = fhir
        .request(reqwest::Method::DELETE, &format!("/Patient/{bob}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = fhir
        .request(reqwest::Method::POST, "/Claim/_search")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("patient={bob}&_include=Claim:patient:Patient"))
        .send()
        .await
        .unwrap();
    let bundle = fhir_body(res).await;
    assert_eq!(
        ids(&bundle).len(),
        1,
        "the claim, without its deleted patient"
    );

    // Unknown or malformed _include is 400; _include of a type the token cannot read is 403.
    for bad in [
        "Claim:provider",
        "Patient:link",
        "Claim",
        "Claim:patient:Group",
        "*",
    ] {
        let res = fhir.get(&format!("/Claim?_include={bad}")).await;
        assert_eq!(res.status(), 400, "{bad}");
    }
    let res = fhir.get("/Claim?_include:iterate=Claim:patient").await;
    assert_eq!(res.status(), 400);
    let claims_only = fhir.via(&app, "system/Claim.rs").await;
    let res = claims_only.get("/Claim?_include=Claim:patient").await;
    assert_eq!(res.status(), 403);
    assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome");
    assert_eq!(claims_only.get("/Claim").await.status(), 200);
}

#[tokio::test]
async fn every_served_type_supports_the_whole_resource_lifecycle() {
    let app = spawn_app_with(UNLIMITED).await;
    let fhir = Fhir::new(&app, ALL).await;
    // Everything the gateway answers along the way, validated against the R4 schema at the end.
    let mut emitted = Vec::new();
    for (file, example) in examples() {
        let ty = example["resourceType"].as_str().unwrap().to_owned();
        let mut body = example.clone();
        body.as_object_mut().unwrap().shift_remove("id");
        let created = fhir.create(&body).await;
        let id = created["id"].as_str().unwrap().to_owned();
        let mut v2 = created.clone();
        v2["language"] = json!("en-US");
        let res = fhir
            .request(reqwest::Method::PUT, &format!("/{ty}/{id}"))
            .header("content-type", "application/fhir+json")
            .header("if-match", "W/\"1\"")
            .body(v2.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{file}");
        emitted.push(fhir_body(res).await);
        let res = fhir
            .request(reqwest::Method::PUT, &format!("/{ty}/{id}"))
            .header("content-type", "application/fhir+json")
            .header("if-match", "W/\"1\"")
            .body(v2.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 412, "{file}");
        emitted.push(fhir_body(res).await);
        let res = fhir.get(&format!("/{ty}/{id}/_history/1")).await;
        let v1 = fhir_body(res).await;
        assert_eq!(v1["meta"]["versionId"], "1", "{file}");
        let res = fhir.get(&format!("/{ty}?_id={id}")).await;
        let found = fhir_body(res).await;
        assert_eq!(ids(&found), [id.clone()] as [String; 1], "{file}");
        let res = fhir
            .request(reqwest::Method::DELETE, &format!("/{ty}/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 204, "{file}");
        let res = fhir.get(&format!("/{ty}/{id}")).await;
        assert_eq!(res.status(), 410, "{file}");
        let gone = fhir_body(res).await;
        let history = fhir_body(fhir.get(&format!("/{ty}/{id}/_history")).await).await;
        assert_eq!(history["total"], 3, "{file}");
        emitted.extend([created, v1, found, gone, history]);
    }
    assert_valid_fhir(&emitted);
}

#[tokio::test]
async fn the_capability_statement_lists_exactly_the_served_types_and_parameters() {
    let app = spawn_app().await;
    let metadata = fhir_body(app.get("/fhir/r4/metadata").await).await;
    let resources = metadata["rest"][0]["resource"].as_array().unwrap();
    let mut types: Vec<&str> = resources
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    types.sort_unstable();
    // Group is served too (the shared examples have none, so it is not in SERVED).
    let mut expected: Vec<&str> = SERVED
        .iter()
        .copied()
        .chain(["AuditEvent", "Group"])
        .collect();
    expected.sort_unstable();
    assert_eq!(types, expected);
    let params = |ty: &str| -> Vec<String> {
        let r = resources.iter().find(|r| r["type"] == ty).unwrap();
        let mut p: Vec<String> = r["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect();
        p.sort();
        p
    };
    assert_eq!(
        params("Coverage"),
        [
            "_id",
            "_lastUpdated",
            "beneficiary",
            "identifier",
            "patient",
            "payor",
            "status"
        ]
    );
    assert_eq!(
        params("Encounter"),
        [
            "_id",
            "_lastUpdated",
            "date",
            "patient",
            "practitioner",
            "status"
        ]
    );
    assert_eq!(
        params("Claim"),
        ["_id", "_lastUpdated", "created", "patient", "status"]
    );
    assert_eq!(
        params("ClaimResponse"),
        [
            "_id",
            "_lastUpdated",
            "created",
            "patient",
            "request",
            "status"
        ]
    );
    assert_eq!(
        params("Practitioner"),
        [
            "_id",
            "_lastUpdated",
            "family",
            "given",
            "identifier",
            "name"
        ]
    );
    assert_eq!(
        params("Organization"),
        ["_id", "_lastUpdated", "identifier", "name"]
    );
    let claim = resources.iter().find(|r| r["type"] == "Claim").unwrap();
    assert_eq!(claim["searchInclude"], json!(["Claim:patient"]));

    // Every declared parameter of every type is accepted by its search.
    let fhir = Fhir::new(&app, ALL).await;
    for r in resources.iter().filter(|r| r["type"] != "AuditEvent") {
        let ty = r["type"].as_str().unwrap();
        for p in r["searchParam"].as_array().unwrap() {
            let value = match p["type"].as_str().unwrap() {
                "date" => "ge2020-01-01",
                "reference" => "x1",
                _ => "x",
            };
            let name = p["name"].as_str().unwrap();
            let res = fhir.get(&format!("/{ty}?{name}={value}")).await;
            assert_eq!(res.status(), 200, "{ty}?{name}");
        }
    }
}

#[tokio::test]
async fn concurrent_conditional_creates_make_one_resource() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let body = json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:mrn", "value": "RACE-1" }],
        "gender": "female"
    });
    let requests = (0..8).map(|i| {
        // The same condition written two ways: parameter order does not matter.
        let condition = if i % 2 == 0 {
            "identifier=urn:mrn|RACE-1&gender=female"
        } else {
            "gender=female&identifier=urn:mrn|RACE-1"
        };
        fhir.request(reqwest::Method::POST, "/Patient")
            .header("content-type", "application/fhir+json")
            .header("if-none-exist", condition)
            .body(body.to_string())
            .send()
    });
    let statuses: Vec<u16> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(
        fhir.search_ids("/Patient?identifier=urn:mrn|RACE-1")
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn structurally_invalid_resources_are_refused_naming_the_element_and_never_the_value() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let marker = "Zebediah-Quackenbush-7731";
    let patient = json!({ "resourceType": "Patient", "name": [{ "family": "Ok" }] });
    let with = |path: &[&str], value: Value| {
        let mut body = patient.clone();
        let mut at = &mut body;
        for key in &path[..path.len() - 1] {
            at = &mut at[*key];
        }
        at[path[path.len() - 1]] = value;
        body
    };
    let cases = [
        (
            with(&["gender"], json!(marker)),
            "Patient.gender",
            "code-invalid",
        ),
        (
            with(&["birthDate"], json!(format!("1990-13-45{marker}"))),
            "Patient.birthDate",
            "value",
        ),
        (
            with(&["name"], json!([{ "family": ["not", marker] }])),
            "Patient.name[0].family",
            "structure",
        ),
        (
            with(&["favouriteColour"], json!(marker)),
            "Patient.favouriteColour",
            "structure",
        ),
        (
            with(&["name"], json!([{ "family": "Ok", "nickname": marker }])),
            "Patient.name[0].nickname",
            "structure",
        ),
        (
            with(&["active"], json!(marker)),
            "Patient.active",
            "structure",
        ),
    ];
    for (body, expression, code) in cases {
        let res = fhir.post("/Patient", &body).await;
        assert_eq!(res.status(), 400, "{expression}");
        let text = res.text().await.unwrap();
        assert!(
            !text.contains(marker),
            "{expression}: the value was echoed: {text}"
        );
        let outcome: Value = serde_json::from_str(&text).unwrap();
        let issue = outcome["issue"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["expression"][0] == expression)
            .unwrap_or_else(|| panic!("{expression} not named: {text}"));
        assert_eq!(issue["code"], code, "{expression}");
        assert_valid_fhir(&[outcome]);
    }
    // Required elements of the other types; an update is checked the same way.
    let res = fhir
        .post(
            "/Encounter",
            &json!({ "resourceType": "Encounter", "class": { "code": "AMB" } }),
        )
        .await;
    assert_eq!(res.status(), 400);
    assert_eq!(
        fhir_body(res).await["issue"][0]["expression"][0],
        "Encounter.status"
    );
    let res = fhir
        .post("/Coverage", &json!({ "resourceType": "Coverage", "status": "active", "payor": [{ "display": "x" }] }))
        .await;
    assert_eq!(res.status(), 400);
    let created = fhir.create(&patient).await;
    let id = created["id"].as_str().unwrap();
    let mut bad = created.clone();
    bad["gender"] = json!("robot");
    let res = fhir.put(&format!("/Patient/{id}"), &bad).await;
    assert_eq!(res.status(), 400);
    // Nothing of it was stored: one patient, at version 1.
    assert_eq!(fhir.search_ids("/Patient").await.len(), 1);
    let read = fhir_body(fhir.get(&format!("/Patient/{id}")).await).await;
    assert_eq!(read["meta"]["versionId"], "1");
}
