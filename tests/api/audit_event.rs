//! The audit trail as FHIR AuditEvent: read and search for clients with system/AuditEvent.rs,
//! confined to their own practice.

use serde_json::Value;

use fhirgate::gate::Role;

use crate::auth::session;
use crate::helpers::{assert_valid_fhir, fhir_body, spawn_app, TestApp};

/// A token of a new practice's client allowed `scopes`, and the client id.
async fn token(app: &TestApp, scopes: &str) -> (String, String) {
    let s = session(app, scopes, Role::ExternalSystem).await;
    (s.token, s.client_id)
}

async fn get(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_compliance_client_searches_and_reads_its_practice_audit_events_as_valid_fhir() {
    let app = spawn_app().await;
    let (admin, client_id) = token(&app, "system/AuditEvent.rs system/Patient.rs").await;
    get(&app, "/fhir/r4/Patient/p1", &admin).await;

    let res = get(&app, "/fhir/r4/AuditEvent", &admin).await;
    assert_eq!(res.status(), 200);
    let bundle = fhir_body(res).await;
    assert_eq!(bundle["type"], "searchset");
    // The token request and the Patient access; this search itself is recorded after it ran.
    assert_eq!(bundle["total"], 2);
    let entries = bundle["entry"].as_array().unwrap();
    assert_eq!(entries[0]["resource"]["type"]["code"], "110114");
    assert_eq!(entries[1]["resource"]["outcome"], "4");
    assert_eq!(
        entries[1]["resource"]["agent"][0]["who"]["identifier"]["value"],
        client_id.as_str()
    );
    assert!(entries[0]["fullUrl"]
        .as_str()
        .unwrap()
        .starts_with(&app.url("/fhir/r4/AuditEvent/")));

    let id = entries[0]["resource"]["id"].as_str().unwrap().to_owned();
    let res = get(&app, &format!("/fhir/r4/AuditEvent/{id}"), &admin).await;
    assert_eq!(res.status(), 200);
    let event = fhir_body(res).await;
    assert_eq!(event["id"], id.as_str());

    // Paging: one per page, with a next link that continues after the cursor.
    let page = fhir_body(get(&app, "/fhir/r4/AuditEvent?_count=1", &admin).await).await;
    assert_eq!(page["entry"].as_array().unwrap().len(), 1);
    let next = page["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let page2: Value = app
        .client
        .get(next)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(
        page2["entry"][0]["resource"]["id"],
        page["entry"][0]["resource"]["id"]
    );

    assert_valid_fhir(&[bundle, event, page, page2]);
}

#[tokio::test]
async fn search_parameters_filter_and_unknown_ones_are_refused() {
    let app = spawn_app().await;
    let (admin, client_id) = token(&app, "system/AuditEvent.rs system/Patient.rs").await;
    get(&app, "/fhir/r4/Patient/p1", &admin).await;

    let by_action = fhir_body(get(&app, "/fhir/r4/AuditEvent?action=E", &admin).await).await;
    assert_eq!(by_action["total"], 1); // the token request (the Patient read is R)
    let by_agent = fhir_body(
        get(
            &app,
            &format!("/fhir/r4/AuditEvent?agent={client_id}"),
            &admin,
        )
        .await,
    )
    .await;
    assert_eq!(by_agent["total"], 3);
    let future = fhir_body(get(&app, "/fhir/r4/AuditEvent?date=ge2999-01-01", &admin).await).await;
    assert_eq!(future["total"], 0);
    assert!(future.get("entry").is_none());

    let res = get(&app, "/fhir/r4/AuditEvent?bogus=1", &admin).await;
    assert_eq!(res.status(), 400);
    assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome");
    let res = app
        .client
        .get(app.url("/fhir/r4/AuditEvent?bogus=1"))
        .bearer_auth(&admin)
        .header("prefer", "handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = get(&app, "/fhir/r4/AuditEvent?date=yesterday", &admin).await;
    assert_eq!(res.status(), 400);

    let res = app
        .client
        .post(app.url("/fhir/r4/AuditEvent/_search"))
        .bearer_auth(&admin)
        .form(&[("action", "E")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_valid_fhir(&[by_action, future]);
}

#[tokio::test]
async fn another_practice_event_is_not_found_and_the_attempt_is_audited() {
    let app = spawn_app().await;
    let (mine, _) = token(&app, "system/AuditEvent.rs").await;
    let (theirs, their_client) = token(&app, "system/AuditEvent.rs").await;
    let bundle = fhir_body(get(&app, "/fhir/r4/AuditEvent", &mine).await).await;
    let my_event = bundle["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let res = get(&app, &format!("/fhir/r4/AuditEvent/{my_event}"), &theirs).await;
    assert_eq!(res.status(), 404);
    let their_practice = app
        .store
        .get_client(&their_client)
        .await
        .unwrap()
        .practice_id;
    let events = app
        .store
        .audit_chain_page(their_practice.as_str(), 0, 100)
        .await
        .unwrap();
    let attempt = events.last().unwrap();
    assert_eq!(attempt.action, "read");
    assert_eq!(attempt.status_code, 404);
    assert_eq!(attempt.resource_type.as_deref(), Some("AuditEvent"));
    assert_eq!(attempt.resource_id.as_deref(), Some(my_event.as_str()));

    // Their search shows none of my events either.
    let theirs_bundle = fhir_body(get(&app, "/fhir/r4/AuditEvent", &theirs).await).await;
    let ids: Vec<&str> = theirs_bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert!(!ids.contains(&my_event.as_str()));
}

#[tokio::test]
async fn a_client_without_the_audit_scope_is_forbidden() {
    let app = spawn_app().await;
    let (token, _) = token(&app, "system/Patient.rs").await;
    let res = get(&app, "/fhir/r4/AuditEvent", &token).await;
    assert_eq!(res.status(), 403);
    let outcome = fhir_body(res).await;
    assert_eq!(outcome["issue"][0]["code"], "forbidden");
}

/// Outbound EHR calls land in the practice's chain through the adapters' audit hook: the
/// connection as agent, the call's duration as the event's period, no request detail; the
/// chain still verifies, and an inbound event's hash is unchanged by the new columns.
#[tokio::test]
async fn outbound_ehr_calls_are_audit_events_naming_the_connection_and_duration() {
    use fhirgate::domain::ResourceId;
    use fhirgate_adapters::{OutboundAction, OutboundAudit, OutboundCall};
    use std::time::Duration;

    let app = spawn_app().await;
    let s = session(&app, "system/AuditEvent.rs", Role::ExternalSystem).await;
    let (log, writer) = fhirgate::audit::AuditLog::start(app.store.clone());
    let calls = fhirgate::sync::AuditedCalls::new(
        log,
        ResourceId::parse("practice", s.practice_id.as_str()).unwrap(),
    );
    for (action, status) in [
        (OutboundAction::Token, Some(200)),
        (OutboundAction::Search, Some(200)),
        (OutboundAction::Read, None),
    ] {
        calls
            .record(&OutboundCall {
                connection: "conn-7",
                action,
                resource_type: (action != OutboundAction::Token).then_some("Patient"),
                status,
                duration: Duration::from_millis(42),
            })
            .await
            .unwrap();
    }
    drop(calls);
    writer.await.unwrap();

    let bundle = fhir_body(get(&app, "/fhir/r4/AuditEvent?_count=50", &s.token).await).await;
    let events: Vec<&Value> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["resource"])
        .filter(|r| r["agent"][0]["who"]["identifier"]["system"] == "urn:fhirgate:connection-id")
        .collect();
    assert_eq!(events.len(), 3, "{bundle}");
    let search = events[1];
    assert_eq!(search["agent"][0]["who"]["identifier"]["value"], "conn-7");
    assert_eq!(search["action"], "R");
    assert_eq!(search["subtype"][0]["code"], "search-type");
    assert_eq!(search["outcome"], "0");
    assert!(
        search["period"]["start"].as_str().unwrap() < search["period"]["end"].as_str().unwrap()
    );
    // No response at all (timeout, refused): a failure, said plainly.
    assert_eq!(events[2]["outcome"], "8");
    assert_eq!(events[2]["outcomeDesc"], "no response");
    assert_valid_fhir(&events.iter().map(|e| (*e).clone()).collect::<Vec<_>>());

    let records = app
        .store
        .audit_chain_page(&s.practice_id, 0, 10_000)
        .await
        .unwrap();
    let outbound: Vec<_> = records
        .iter()
        .filter(|r| r.connection_id.is_some())
        .collect();
    assert_eq!(outbound.len(), 3);
    assert!(outbound.iter().all(|r| r.duration_ms == Some(42)));
    assert_eq!(outbound[0].action, "ehr-token");
    let report = fhirgate::audit::verify_chain(&s.practice_id, &records);
    assert!(report.ok, "{report:?}");
}
