//! Tenant isolation, authentication and scopes attacked systematically: every served FHIR type
//! and every interaction on a resource id (read, vread, history, search by `_id`, update,
//! delete), and the internal API's id routes, are tried with another practice's token, with no
//! token, with a forged token and with a token whose scopes do not cover the interaction. Every
//! attempt is refused the way a missing resource or a missing permission is (nothing tells an
//! attacker the id exists), the victim's resources are untouched, and every refused attempt by
//! an authenticated client is in its practice's audit trail.

use fhirgate::domain::ResourceId;
use fhirgate::store::AuditQuery;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{fhir_body, spawn_app_with};
use crate::patient::Fhir;

/// Many requests as one client: quotas out of the way.
const UNLIMITED: &str = "[rate_limit]\nclient_points = 10000000\npractice_points = 10000000\n";

/// One resource of each served type, as the victim practice stores it.
fn victims() -> Vec<Value> {
    let dir = format!(
        "{}/../shared/fixtures/r4-examples",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut out: Vec<Value> = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("the fixtures are in ../shared/fixtures")
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for path in names {
        let value: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ty = value["resourceType"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let served = fhirgate::fhir::resources::kind_of(&ty).is_some();
        if served && !out.iter().any(|v| v["resourceType"] == ty.as_str()) {
            out.push(value);
        }
    }
    if !out.iter().any(|v| v["resourceType"] == "Group") {
        out.push(json!({ "resourceType": "Group", "id": "grp-victim", "type": "person", "actual": true }));
    }
    let served = fhirgate::fhir::resources::KINDS.len();
    assert_eq!(out.len(), served, "one resource of each served type");
    out
}

/// Every interaction on `/{ty}/{id}` an attacker may try: method, path, body.
fn attempts(ty: &str, id: &str, body: &Value) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (Method::GET, format!("/{ty}/{id}"), None),
        (Method::GET, format!("/{ty}/{id}/_history/1"), None),
        (Method::GET, format!("/{ty}/{id}/_history"), None),
        (Method::DELETE, format!("/{ty}/{id}"), None),
        (Method::PUT, format!("/{ty}/{id}"), Some(body.clone())),
    ]
}

async fn send(
    client: &reqwest::Client,
    url: String,
    method: Method,
    token: Option<&str>,
    body: Option<&Value>,
    if_match: bool,
) -> reqwest::Response {
    let mut req = client.request(method, url);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req
            .header("content-type", "application/fhir+json")
            .body(body.to_string());
    }
    if if_match {
        req = req.header("if-match", "W/\"1\"");
    }
    req.send().await.unwrap()
}

/// The audit events of `practice` about resource `id` that were refusals.
async fn refusals_about(app: &crate::helpers::TestApp, practice: &str, id: &str) -> usize {
    let (events, _) = app
        .store
        .search_audit(&AuditQuery {
            practice: ResourceId::parse("practice", practice).unwrap(),
            since: None,
            until: None,
            patient: None,
            agent: None,
            actions: None,
            after_seq: 0,
            limit: 10_000,
        })
        .await
        .unwrap();
    events
        .iter()
        .filter(|e| e.resource_id.as_deref() == Some(id) && e.status_code >= 400)
        .count()
}

#[tokio::test]
async fn every_fhir_interaction_on_another_practices_resource_is_refused_and_audited() {
    let app = spawn_app_with(UNLIMITED).await;
    let victim = Fhir::new(&app, "system/*.cruds").await;
    let attacker = Fhir::new(&app, "system/*.cruds").await;
    // The victim practice's own client, with a token whose scopes cover only Patient reads.
    let narrow = victim.via(&app, "system/Patient.r").await;
    let http = &app.client;

    let mut stored = Vec::new();
    for resource in victims() {
        let ty = resource["resourceType"].as_str().unwrap().to_owned();
        let id = resource["id"].as_str().unwrap().to_owned();
        let res = victim.put(&format!("/{ty}/{id}"), &resource).await;
        assert_eq!(res.status(), 201, "{ty}: {}", res.text().await.unwrap());
        let original = fhir_body(victim.get(&format!("/{ty}/{id}")).await).await;
        stored.push((ty, id, original));
    }

    let mut tried = 0;
    for (ty, id, original) in &stored {
        let mut body = original.clone();
        body.as_object_mut().unwrap().shift_remove("meta");
        for (method, path, payload) in attempts(ty, id, &body) {
            let url = app.url(&format!("/fhir/r4{path}"));
            let what = format!("{method} {path}");

            // Another practice, every scope: the answer of a missing resource. (A PUT with
            // If-Match is an update of a resource the attacker's practice does not have.)
            let is_put = method == Method::PUT;
            let res = send(
                http,
                url.clone(),
                method.clone(),
                Some(&attacker.session.token),
                payload.as_ref(),
                is_put,
            )
            .await;
            let status = res.status().as_u16();
            assert!(
                matches!(status, 404 | 412),
                "{what} by another practice: {status}"
            );
            let outcome = fhir_body(res).await;
            assert_eq!(outcome["resourceType"], "OperationOutcome", "{what}");
            tried += 1;

            // No token, and a forged one: 401 with a challenge, before anything is looked up.
            for token in [
                None,
                Some("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"),
            ] {
                let res = send(
                    http,
                    url.clone(),
                    method.clone(),
                    token,
                    payload.as_ref(),
                    false,
                )
                .await;
                assert_eq!(res.status(), 401, "{what} with token {token:?}");
                assert!(res.headers().contains_key("www-authenticate"), "{what}");
            }

            // The victim practice's own client, without the scope for this: 403.
            if !(ty == "Patient" && method == Method::GET) {
                let res = send(
                    http,
                    url.clone(),
                    method.clone(),
                    Some(&narrow.session.token),
                    payload.as_ref(),
                    false,
                )
                .await;
                assert_eq!(res.status(), 403, "{what} without its scope");
            }
        }

        // Search: another practice finds nothing by the id.
        let found = fhir_body(attacker.get(&format!("/{ty}?_id={id}")).await).await;
        assert_eq!(found["total"], 0, "{ty}?_id by another practice: {found}");

        // The victim's resource is as it was: same version, same content.
        let now = fhir_body(victim.get(&format!("/{ty}/{id}")).await).await;
        assert_eq!(&now, original, "{ty}/{id} changed");
    }
    assert_eq!(tried, stored.len() * 5);

    // Every refusal of the attacker is in the attacker practice's trail, naming the id tried.
    for (ty, id, _) in &stored {
        let refused = refusals_about(&app, &attacker.session.practice_id, id).await;
        assert!(refused >= 5, "{ty}/{id}: {refused} refusals audited");
    }
}

#[tokio::test]
async fn the_internal_apis_id_routes_refuse_other_practices_and_missing_tokens() {
    let app = spawn_app_with(UNLIMITED).await;
    let http = &app.client;
    let victim = crate::claim_push::Gateway::of(&app, fhirgate::gate::Role::PracticeAdmin).await;
    let attacker = crate::claim_push::Gateway::of(&app, fhirgate::gate::Role::PracticeAdmin).await;
    let patient = victim
        .create(json!({ "resourceType": "Patient", "name": [{ "family": "Victim" }] }))
        .await;
    let claim = victim
        .create(json!({
            "resourceType": "Claim",
            "status": "active",
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional" }] },
            "use": "claim",
            "patient": { "reference": format!("Patient/{patient}") },
            "created": "2026-11-20",
            "provider": { "reference": format!("Patient/{patient}") },
            "priority": { "coding": [{ "code": "normal" }] },
            "insurance": [{ "sequence": 1, "focal": true, "coverage": { "display": "self-pay" } }]
        }))
        .await;
    assert_eq!(victim.set_status(&claim, "prepared").await.status(), 200);

    let routes: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, format!("/api/v1/claims/{claim}/status"), None),
        (
            Method::POST,
            format!("/api/v1/claims/{claim}/status"),
            Some(json!({ "status": "submitted" })),
        ),
        (
            Method::GET,
            "/api/v1/jobs/00000000-0000-4000-8000-000000000000".into(),
            None,
        ),
        (
            Method::POST,
            "/api/v1/dead-letters/00000000-0000-4000-8000-000000000000/replay".into(),
            None,
        ),
    ];
    for (method, path, body) in &routes {
        let url = app.url(path);
        let res = send(
            http,
            url.clone(),
            method.clone(),
            Some(&attacker.token),
            body.as_ref(),
            false,
        )
        .await;
        assert_eq!(res.status(), 404, "{method} {path} by another practice");
        let res = send(http, url, method.clone(), None, body.as_ref(), false).await;
        assert_eq!(res.status(), 401, "{method} {path} without a token");
    }
    // The victim's claim did not move.
    let res = victim.get(&format!("/api/v1/claims/{claim}/status")).await;
    let state: Value = res.json().await.unwrap();
    assert_eq!(state["status"], "prepared");
    assert_eq!(
        refusals_about(&app, attacker.practice.as_str(), &claim).await,
        2,
        "both claim-status attempts are in the attacker practice's trail"
    );
}
