//! Patient-change webhooks as an EHR and a practice see them: a signed event or a FHIR
//! subscription notification is acknowledged once it is in the inbox, and its patient then
//! appears in `/fhir/r4/Patient` (fetched from the EHR simulator, or taken from the payload);
//! anything unauthenticated is 401 and leaves no row; duplicates are processed once; missed
//! events are recovered by a pull; failures are retried, then dead; a worker killed mid-way
//! leaves its row to another instance; and no PHI reaches the logs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirgate::crypto::Keyring;
use fhirgate::domain::ResourceId;
use fhirgate::gate::Role;
use fhirgate::store::{InboxEntry, Store};
use fhirgate::sync::pull::local_id;
use fhirgate::sync::webhooks::notification::{sign, signing_key};
use fhirgate::sync::Connections;
use fhirgate_ehr_sim::{Personality, SimConfig, Simulator};
use serde_json::{json, Value};

use crate::auth::{session, token_at, Session};
use crate::helpers::{fhir_body, spawn_app_on, spawn_app_with, test_settings, TestApp};

/// A fixed master key, so a second gateway (and the test) opens what the first sealed.
fn master_key() -> String {
    format!("test1:{}", "6b".repeat(32))
}

/// A Standard Webhooks secret (`whsec_` + base64 of 24 bytes).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Fast retries and polls, short leases: the test's clock.
const FAST: &str =
    "[webhooks]\npoll_interval_ms = 100\nretry_base_ms = 50\nmax_attempts = 4\nlease_secs = 2\n";

const SCOPES: &str = "system/Patient.rs system/Coverage.rs";

struct Hooked {
    app: TestApp,
    sim: Simulator,
    session: Session,
    practice: ResourceId,
    connections: Connections,
    connection: String,
}

fn keyring() -> Keyring {
    Keyring::parse(&master_key()).unwrap()
}

fn connections_of(store: Arc<dyn Store>) -> Connections {
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().unwrap());
    Connections::new(store, &keyring(), profiles)
}

/// A connection of `practice` to `sim` with `secret` as its webhook secret; the EHR client does
/// not retry in-call, so every failure reaches the inbox worker.
async fn add_connection(
    connections: &Connections,
    sim: &Simulator,
    practice: &ResourceId,
    secret: Option<&str>,
) -> String {
    let mut spec = fhirgate::cli::sandbox_spec(sim, practice).unwrap();
    spec.webhook_secret = secret.map(str::to_owned);
    spec.settings.insert("max_attempts".into(), json!(1));
    spec.settings.insert("breaker_failures".into(), json!(1000));
    connections.add(spec).await.unwrap().id
}

/// A gateway (with `extra` settings), a practice with a client, a simulator of `patients`
/// patients and a connection to it whose webhook secret is [`SECRET`].
async fn hooked(extra: &str, patients: usize) -> Hooked {
    let app = spawn_app_with(&format!("master_key = '{}'\n{extra}", master_key())).await;
    let session = session(&app, SCOPES, Role::ExternalSystem).await;
    let practice = ResourceId::parse("practice", session.practice_id.as_str()).unwrap();
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = patients;
    let sim = Simulator::start(config).unwrap();
    let connections = connections_of(app.store.clone());
    let connection = add_connection(&connections, &sim, &practice, Some(SECRET)).await;
    Hooked {
        app,
        sim,
        session,
        practice,
        connections,
        connection,
    }
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A generic event for `patient_id`.
fn changed(patient_id: &str) -> String {
    json!({"type": "patient.changed", "patient_id": patient_id}).to_string()
}

/// POSTs `body` to the connection's webhook, signed with `secret` at `timestamp`.
async fn post_signed(
    app: &TestApp,
    connection: &str,
    secret: &str,
    event_id: &str,
    timestamp: i64,
    body: &str,
) -> reqwest::Response {
    let key = signing_key(secret).unwrap();
    let ts = timestamp.to_string();
    app.client
        .post(app.url(&format!("/webhooks/{connection}")))
        .header("content-type", "application/json")
        .header("webhook-id", event_id)
        .header("webhook-timestamp", &ts)
        .header(
            "webhook-signature",
            sign(&key, event_id, &ts, body.as_bytes()),
        )
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

async fn post_event(h: &Hooked, event_id: &str, patient_id: &str) -> reqwest::Response {
    post_signed(
        &h.app,
        &h.connection,
        SECRET,
        event_id,
        unix_now(),
        &changed(patient_id),
    )
    .await
}

/// POSTs a FHIR notification with the subscription's bearer header.
async fn post_fhir(app: &TestApp, connection: &str, token: &str, body: &str) -> reqwest::Response {
    app.client
        .post(app.url(&format!("/webhooks/{connection}")))
        .header("content-type", "application/fhir+json")
        .bearer_auth(token)
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

/// The status and OperationOutcome diagnostics of a webhook answer.
async fn answer(res: reqwest::Response) -> (u16, String) {
    let status = res.status().as_u16();
    let body = fhir_body(res).await;
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    (
        status,
        body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

async fn rows(app: &TestApp, connection: &str) -> Vec<InboxEntry> {
    app.store
        .inbox()
        .list_events(Some(connection), None, 1000)
        .await
        .unwrap()
}

/// Waits (at most 60 s) until every row of the connection is done or dead, and returns them.
async fn settled(app: &TestApp, connection: &str, expected: usize) -> Vec<InboxEntry> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = rows(app, connection).await;
        if rows.len() >= expected && rows.iter().all(|r| r.status != "pending") {
            return rows;
        }
        assert!(Instant::now() < deadline, "inbox did not settle: {rows:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The local Patients carrying the EHR id `ehr_id` of `connection`, as a client finds them.
async fn found(app: &TestApp, token: &str, connection: &str, ehr_id: &str) -> Vec<Value> {
    let res = app
        .client
        .get(app.url(&format!(
            "/fhir/r4/Patient?identifier=urn:fhirgate:connection:{connection}|{ehr_id}"
        )))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let bundle = fhir_body(res).await;
    bundle["entry"]
        .as_array()
        .map(|e| e.iter().map(|e| e["resource"].clone()).collect())
        .unwrap_or_default()
}

/// How many versions the local copy of an EHR patient has (0: never written).
async fn versions(app: &TestApp, practice: &ResourceId, connection: &str, ehr_id: &str) -> i64 {
    let local = local_id(connection, "Patient", ehr_id);
    app.store
        .head_versions(practice, "Patient", std::slice::from_ref(&local))
        .await
        .unwrap()
        .get(&local)
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_signed_event_is_acknowledged_and_its_patient_appears_once_even_when_sent_twice() {
    let h = hooked(FAST, 5).await;
    let ids = h.sim.patient_ids();
    let (status, said) = answer(post_event(&h, "evt-1", &ids[0]).await).await;
    assert_eq!(
        (status, said.as_str()),
        (202, "accepted: 1 event(s) queued")
    );
    let done = settled(&h.app, &h.connection, 1).await;
    assert_eq!(done[0].status, "done");
    assert_eq!(done[0].kind, fhirgate::store::InboxKind::Patient);
    assert!(!done[0].has_payload, "a done event keeps no payload");
    let patients = found(&h.app, &h.session.token, &h.connection, &ids[0]).await;
    assert_eq!(patients.len(), 1);
    let family = h.sim.patient(&ids[0]).unwrap()["name"][0]["family"].clone();
    assert_eq!(patients[0]["name"][0]["family"], family);

    // The same event again is acknowledged alike and not processed again: the next event costs
    // the EHR what the first did, the duplicate nothing.
    let before = h.sim.controls().counters().fhir_requests;
    let (status, said) = answer(post_event(&h, "evt-1", &ids[0]).await).await;
    assert_eq!(status, 202, "{said}");
    assert!(said.starts_with("nothing new to queue"), "{said}");
    assert_eq!(answer(post_event(&h, "evt-2", &ids[1]).await).await.0, 202);
    settled(&h.app, &h.connection, 2).await;
    let one_event = h.sim.controls().counters().fhir_requests - before;
    assert_eq!(answer(post_event(&h, "evt-3", &ids[2]).await).await.0, 202);
    settled(&h.app, &h.connection, 3).await;
    assert_eq!(
        h.sim.controls().counters().fhir_requests - before,
        2 * one_event,
        "the duplicate reached the EHR"
    );
    assert_eq!(rows(&h.app, &h.connection).await.len(), 3);
    assert_eq!(
        versions(&h.app, &h.practice, &h.connection, &ids[0]).await,
        1
    );

    // The same event sent ten times at once (committed together or not): one row, and one
    // answer that says it was queued.
    let burst = futures_util::future::join_all((0..10).map(|_| post_event(&h, "evt-4", &ids[3])));
    let mut queued = 0;
    for res in burst.await {
        let (status, said) = answer(res).await;
        assert_eq!(status, 202, "{said}");
        if said == "accepted: 1 event(s) queued" {
            queued += 1;
        } else {
            assert!(said.starts_with("nothing new to queue"), "{said}");
        }
    }
    assert_eq!(queued, 1, "one of the ten is the one that queued the event");
    settled(&h.app, &h.connection, 4).await;
    assert_eq!(rows(&h.app, &h.connection).await.len(), 4);
    assert_eq!(
        versions(&h.app, &h.practice, &h.connection, &ids[3]).await,
        1
    );

    // Each request is audited as a webhook of the connection.
    let audit = h
        .app
        .store
        .audit_chain_page(h.practice.as_str(), 0, 10_000)
        .await
        .unwrap();
    let hooks: Vec<_> = audit.iter().filter(|r| r.action == "webhook").collect();
    assert_eq!(hooks.len(), 14);
    assert!(hooks.iter().all(
        |r| r.connection_id.as_deref() == Some(h.connection.as_str())
            && r.status_code == 202
            && r.patient_id.is_none()
    ));
}

#[tokio::test]
async fn unauthenticated_oversized_malformed_and_excess_requests_are_refused_and_store_nothing() {
    let h = hooked(
        "[webhooks]\nmax_body_bytes = 2048\n[rate_limit]\nwebhook_points = 10\n",
        3,
    )
    .await;
    let (app, conn) = (&h.app, h.connection.as_str());
    let secretless = add_connection(&h.connections, &h.sim, &h.practice, None).await;
    let patient = h.sim.patient_ids()[0].clone();
    let body = changed(&patient);
    let now = unix_now();
    let url = app.url(&format!("/webhooks/{conn}"));
    let expect = |status: u16, said: &str| (status, said.to_owned());
    let refused = "the webhook could not be authenticated for this connection";

    let mut cases: Vec<(&str, reqwest::RequestBuilder, (u16, String))> = vec![
        (
            "wrong secret",
            {
                let key = signing_key("whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldY").unwrap();
                let ts = now.to_string();
                app.client
                    .post(&url)
                    .header("webhook-id", "e1")
                    .header("webhook-timestamp", &ts)
                    .header("webhook-signature", sign(&key, "e1", &ts, body.as_bytes()))
                    .body(body.clone())
            },
            expect(401, refused),
        ),
        (
            "bad signature",
            app.client
                .post(&url)
                .header("webhook-id", "e1")
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
                .body(body.clone()),
            expect(401, refused),
        ),
        (
            "body changed after signing",
            {
                let key = signing_key(SECRET).unwrap();
                let ts = now.to_string();
                app.client
                    .post(&url)
                    .header("webhook-id", "e1")
                    .header("webhook-timestamp", &ts)
                    .header("webhook-signature", sign(&key, "e1", &ts, body.as_bytes()))
                    .body(changed("someone-else"))
            },
            expect(401, refused),
        ),
        (
            "stale timestamp",
            {
                let key = signing_key(SECRET).unwrap();
                let ts = (now - 301).to_string();
                app.client
                    .post(&url)
                    .header("webhook-id", "e1")
                    .header("webhook-timestamp", &ts)
                    .header("webhook-signature", sign(&key, "e1", &ts, body.as_bytes()))
                    .body(body.clone())
            },
            expect(
                401,
                "webhook-timestamp is outside the accepted tolerance; check the sender's clock",
            ),
        ),
        (
            "missing signature",
            app.client
                .post(&url)
                .header("webhook-id", "e1")
                .header("webhook-timestamp", now.to_string())
                .body(body.clone()),
            expect(401, "the webhook-signature header is missing"),
        ),
        (
            "missing id",
            app.client
                .post(&url)
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", "v1,AAAA")
                .body(body.clone()),
            expect(401, "the webhook-id header is missing"),
        ),
        (
            "no authentication at all",
            app.client.post(&url).body(body.clone()),
            expect(401, "no webhook authentication: send webhook-id, webhook-timestamp and webhook-signature (Standard Webhooks), or Authorization: Bearer with the subscription's header"),
        ),
        (
            "bearer mismatch",
            app.client
                .post(&url)
                .bearer_auth("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSX")
                .body(""),
            expect(401, refused),
        ),
        (
            "unknown connection",
            app.client
                .post(app.url("/webhooks/3f0e7a1c-0000-4000-8000-000000000000"))
                .bearer_auth(SECRET)
                .body(""),
            expect(401, refused),
        ),
        (
            "connection without a webhook secret",
            app.client
                .post(app.url(&format!("/webhooks/{secretless}")))
                .bearer_auth(SECRET)
                .body(""),
            expect(401, refused),
        ),
        (
            "too large",
            app.client
                .post(&url)
                .bearer_auth(SECRET)
                .body(" ".repeat(4096)),
            expect(413, "the body is larger than the 2048-byte limit for webhooks"),
        ),
        (
            "malformed JSON",
            {
                let key = signing_key(SECRET).unwrap();
                let ts = now.to_string();
                let bad = "{\"type\": \"patient.changed\", ";
                app.client
                    .post(&url)
                    .header("webhook-id", "e2")
                    .header("webhook-timestamp", &ts)
                    .header("webhook-signature", sign(&key, "e2", &ts, bad.as_bytes()))
                    .body(bad)
            },
            expect(400, "the body is not valid JSON"),
        ),
        (
            "unknown event type",
            {
                let key = signing_key(SECRET).unwrap();
                let ts = now.to_string();
                let other = json!({"type": "patient.merged", "patient_id": patient}).to_string();
                app.client
                    .post(&url)
                    .header("webhook-id", "e3")
                    .header("webhook-timestamp", &ts)
                    .header("webhook-signature", sign(&key, "e3", &ts, other.as_bytes()))
                    .body(other)
            },
            expect(400, "unknown event type: only patient.changed is accepted"),
        ),
        (
            "unknown FHIR notification",
            app.client
                .post(&url)
                .bearer_auth(SECRET)
                .body(json!({"resourceType": "Observation", "id": "o1"}).to_string()),
            expect(
                400,
                "expected a Patient (R4 rest-hook) or a subscription notification Bundle",
            ),
        ),
    ];
    for (case, request, expected) in cases.drain(..) {
        let res = request.send().await.unwrap();
        let got = answer(res).await;
        assert_eq!(got, expected, "{case}");
    }
    assert!(
        rows(app, conn).await.is_empty(),
        "a refused request left a row"
    );
    assert!(rows(app, &secretless).await.is_empty());
    let audit = app
        .store
        .audit_chain_page(h.practice.as_str(), 0, 10_000)
        .await
        .unwrap();
    assert!(audit
        .iter()
        .any(|r| r.action == "webhook" && r.status_code == 401));

    // Authentic requests beyond the connection's quota get 429 with Retry-After.
    let mut limited = None;
    for i in 0..30 {
        let res = post_event(&h, &format!("quota-{i}"), &patient).await;
        if res.status() == 429 {
            limited = Some(res);
            break;
        }
        assert_eq!(res.status(), 202);
    }
    let res = limited.expect("the webhook quota is enforced");
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(answer(res).await.0, 429);
}

/// An R4B notification Bundle (the backport IG's `r4b-notification-*` examples), with the
/// Subscription and focus at the simulator.
fn r4b_notification(kind: &str, since: u64, events: &[(u64, &str)], resources: &[Value]) -> String {
    let subscription = "https://ehr.example.org/fhir/Subscription/patient-changes";
    let mut status = json!({
        "resourceType": "SubscriptionStatus",
        "id": "9d98f2be-4067-4b90-b0ec-6d3308d75c8e",
        "status": if kind == "handshake" { "requested" } else { "active" },
        "type": kind,
        "eventsSinceSubscriptionStart": since.to_string(),
        "subscription": {"reference": subscription},
        "topic": "http://hl7.org/SubscriptionTopic/patient-changed"
    });
    if !events.is_empty() {
        status["notificationEvent"] = events
            .iter()
            .map(|(n, patient)| {
                json!({
                    "eventNumber": n.to_string(),
                    "timestamp": "2020-05-29T11:44:13.1882432-05:00",
                    "focus": {"reference": format!("https://ehr.example.org/fhir/Patient/{patient}")}
                })
            })
            .collect();
    }
    let mut entry = vec![json!({
        "fullUrl": "urn:uuid:9d98f2be-4067-4b90-b0ec-6d3308d75c8e",
        "resource": status,
        "request": {"method": "GET", "url": format!("{subscription}/$status")},
        "response": {"status": "200"}
    })];
    for r in resources {
        entry.push(json!({
            "fullUrl": format!("https://ehr.example.org/fhir/Patient/{}", r["id"].as_str().unwrap()),
            "resource": r,
            "request": {"method": "PUT", "url": format!("Patient/{}", r["id"].as_str().unwrap())},
            "response": {"status": "200"}
        }));
    }
    json!({
        "resourceType": "Bundle",
        "id": "r4b-notification",
        "meta": {"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification"]},
        "type": "history",
        "timestamp": "2020-05-29T11:44:13.1882432-05:00",
        "entry": entry
    })
    .to_string()
}

#[tokio::test]
async fn fhir_subscription_notifications_are_answered_and_their_patients_upserted() {
    let h = hooked(FAST, 6).await;
    let (app, conn) = (&h.app, h.connection.as_str());
    let ids = h.sim.patient_ids();

    // The backport IG's R4 handshake example (Bundle r4-notification-handshake), as published.
    let ig_handshake = json!({
        "resourceType": "Bundle",
        "id": "r4-notification-handshake",
        "meta": {"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification-r4"]},
        "type": "history",
        "timestamp": "2020-05-29T11:44:13.1882432-05:00",
        "entry": [{
            "fullUrl": "urn:uuid:63c28e8a-f402-43e4-beb2-75b1c0f6833f",
            "resource": {
                "resourceType": "Parameters",
                "id": "63c28e8a-f402-43e4-beb2-75b1c0f6833f",
                "meta": {"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"]},
                "parameter": [
                    {"name": "subscription", "valueReference": {"reference": "https://example.org/fhir/Subscription/admission"}},
                    {"name": "topic", "valueCanonical": "http://hl7.org/SubscriptionTopic/admission"},
                    {"name": "status", "valueCode": "requested"},
                    {"name": "type", "valueCode": "handshake"},
                    {"name": "events-since-subscription-start", "valueString": "0"}
                ]
            },
            "request": {"method": "GET", "url": "https://example.org/fhir/Subscription/admission/$status"},
            "response": {"status": "200"}
        }]
    });
    let (status, said) =
        answer(post_fhir(app, conn, SECRET, &ig_handshake.to_string()).await).await;
    assert_eq!((status, said.as_str()), (200, "notification received"));

    // R4B handshake and heartbeat: 200, nothing queued.
    for (kind, since) in [("handshake", 0), ("heartbeat", 0)] {
        let (status, said) =
            answer(post_fhir(app, conn, SECRET, &r4b_notification(kind, since, &[], &[])).await)
                .await;
        assert_eq!(
            (status, said.as_str()),
            (200, "notification received"),
            "{kind}"
        );
    }
    assert!(rows(app, conn).await.is_empty());

    // Id-only: the patient is fetched from the EHR.
    let id_only = r4b_notification("event-notification", 1, &[(1, &ids[0])], &[]);
    assert_eq!(
        answer(post_fhir(app, conn, SECRET, &id_only).await).await.0,
        202
    );
    // Full resource: the Patient in the notification is what is stored.
    let mut carried = h.sim.patient(&ids[1]).unwrap();
    carried["name"][0]["family"] = json!("Carriedinthepayload");
    carried["meta"]["versionId"] = json!("2");
    let full = r4b_notification("event-notification", 2, &[(2, &ids[1])], &[carried]);
    assert_eq!(
        answer(post_fhir(app, conn, SECRET, &full).await).await.0,
        202
    );
    // The same notification delivered again is acknowledged alike, and queued nothing.
    let (status, said) = answer(post_fhir(app, conn, SECRET, &full).await).await;
    assert_eq!(status, 202);
    assert!(said.starts_with("nothing new to queue"), "{said}");

    // R4: the backport's Parameters status (id-only), a rest-hook with the Patient as payload
    // (POSTed, then PUT to {endpoint}/Patient/{id} as R4 servers do) and one without payload.
    let r4 = json!({
        "resourceType": "Bundle",
        "type": "history",
        "entry": [{
            "fullUrl": "urn:uuid:292d3c72-edc1-4d8a-afaa-d85e19c7f563",
            "resource": {"resourceType": "Parameters", "parameter": [
                {"name": "subscription", "valueReference": {"reference": "https://ehr.example.org/fhir/Subscription/r4"}},
                {"name": "status", "valueCode": "active"},
                {"name": "type", "valueCode": "event-notification"},
                {"name": "events-since-subscription-start", "valueString": "1"},
                {"name": "notification-event", "part": [
                    {"name": "event-number", "valueString": "1"},
                    {"name": "focus", "valueReference": {"reference": format!("Patient/{}", ids[2])}}
                ]}
            ]},
            "request": {"method": "GET", "url": "https://ehr.example.org/fhir/Subscription/r4/$status"},
            "response": {"status": "200"}
        }]
    });
    assert_eq!(
        answer(post_fhir(app, conn, SECRET, &r4.to_string()).await)
            .await
            .0,
        202
    );
    let rest_hook = h.sim.patient(&ids[3]).unwrap();
    assert_eq!(
        answer(post_fhir(app, conn, SECRET, &rest_hook.to_string()).await)
            .await
            .0,
        202
    );
    let put = app
        .client
        .put(app.url(&format!("/webhooks/{conn}/Patient/{}", ids[3])))
        .bearer_auth(SECRET)
        .body(rest_hook.to_string())
        .send()
        .await
        .unwrap();
    let (status, said) = answer(put).await;
    assert_eq!(status, 202);
    assert!(said.starts_with("nothing new to queue"), "{said}");

    let done = settled(app, conn, 4).await;
    assert!(done.iter().all(|r| r.status == "done"), "{done:#?}");
    for ehr_id in &ids[..4] {
        assert_eq!(
            found(app, &h.session.token, conn, ehr_id).await.len(),
            1,
            "{ehr_id}"
        );
    }
    let stored = found(app, &h.session.token, conn, &ids[1]).await;
    assert_eq!(stored[0]["name"][0]["family"], "Carriedinthepayload");
    // Nothing else was pulled.
    let res = app
        .client
        .get(app.url("/fhir/r4/Patient?_summary=count"))
        .bearer_auth(&h.session.token)
        .send()
        .await
        .unwrap();
    assert_eq!(fhir_body(res).await["total"], 4);
}

/// A notification naming one patient in 2,000 events (which a fuzzer found queued 2,000 rows,
/// each sealing its own copy of the carried Patient, and fetched the patient 2,000 times).
#[tokio::test]
async fn a_notification_naming_one_patient_in_2000_events_queues_and_fetches_it_once() {
    let h = hooked(FAST, 3).await;
    let (app, conn) = (&h.app, h.connection.as_str());
    let ids = h.sim.patient_ids();
    let ehr_requests = || h.sim.controls().counters().fhir_requests;

    // What one event for one patient costs the EHR.
    let before = ehr_requests();
    let one = r4b_notification("event-notification", 1, &[(1, &ids[0])], &[]);
    assert_eq!(
        answer(post_fhir(app, conn, SECRET, &one).await).await.0,
        202
    );
    settled(app, conn, 1).await;
    let one_event = ehr_requests() - before;

    // Events 2 to 2001, all on the second patient (id-only: fetched from the EHR).
    let many: Vec<(u64, &str)> = (2..=2001).map(|n| (n, ids[1].as_str())).collect();
    let id_only = r4b_notification("event-notification", 2001, &many, &[]);
    let before = ehr_requests();
    let (status, said) = answer(post_fhir(app, conn, SECRET, &id_only).await).await;
    assert_eq!(
        (status, said.as_str()),
        (202, "accepted: 1 event(s) queued")
    );
    let done = settled(app, conn, 2).await;
    assert_eq!(done.len(), 2, "{done:#?}");
    assert!(done.iter().all(|r| r.status == "done"), "{done:#?}");
    assert_eq!(
        ehr_requests() - before,
        one_event,
        "the patient was fetched more than once"
    );
    assert_eq!(versions(app, &h.practice, conn, &ids[1]).await, 1);

    // Events 2002 to 4001 on the third patient, carried in the notification: stored once, from
    // the payload.
    let mut carried = h.sim.patient(&ids[2]).unwrap();
    carried["name"][0]["family"] = json!("Carriedonce");
    let many: Vec<(u64, &str)> = (2002..=4001).map(|n| (n, ids[2].as_str())).collect();
    let full = r4b_notification("event-notification", 4001, &many, &[carried]);
    let before = ehr_requests();
    let (status, said) = answer(post_fhir(app, conn, SECRET, &full).await).await;
    assert_eq!(
        (status, said.as_str()),
        (202, "accepted: 1 event(s) queued")
    );
    assert_eq!(settled(app, conn, 3).await.len(), 3);
    // The EHR is asked for the patient's coverage, once: one request fewer than an id-only event.
    assert_eq!(ehr_requests() - before, one_event - 1);
    let stored = found(app, &h.session.token, conn, &ids[2]).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["name"][0]["family"], "Carriedonce");
    assert_eq!(versions(app, &h.practice, conn, &ids[2]).await, 1);

    // Delivered again, either is recognised as received.
    for body in [&id_only, &full] {
        let (status, said) = answer(post_fhir(app, conn, SECRET, body).await).await;
        assert_eq!(status, 202);
        assert!(said.starts_with("nothing new to queue"), "{said}");
    }
    assert_eq!(rows(app, conn).await.len(), 3);
}

#[tokio::test]
async fn a_gap_in_event_numbers_queues_a_pull_that_recovers_the_missed_patients() {
    let h = hooked(FAST, 12).await;
    let (app, conn) = (&h.app, h.connection.as_str());
    let ids = h.sim.patient_ids();
    let first = r4b_notification("event-notification", 1, &[(1, &ids[0])], &[]);
    assert_eq!(
        answer(post_fhir(app, conn, SECRET, &first).await).await.0,
        202
    );
    settled(app, conn, 1).await;
    let res = app
        .client
        .get(app.url("/fhir/r4/Patient?_summary=count"))
        .bearer_auth(&h.session.token)
        .send()
        .await
        .unwrap();
    assert_eq!(fhir_body(res).await["total"], 1);

    // Events 2 and 3 never arrive; event 4 reveals it.
    let fourth = r4b_notification("event-notification", 4, &[(4, &ids[1])], &[]);
    let (status, said) = answer(post_fhir(app, conn, SECRET, &fourth).await).await;
    assert_eq!(status, 202);
    assert!(said.contains("events were missed"), "{said}");
    // A heartbeat that agrees with what was delivered queues nothing more.
    let heartbeat = r4b_notification("heartbeat", 4, &[], &[]);
    assert_eq!(
        answer(post_fhir(app, conn, SECRET, &heartbeat).await)
            .await
            .0,
        200
    );

    let done = settled(app, conn, 3).await;
    assert_eq!(done.len(), 3, "{done:#?}");
    assert!(done.iter().all(|r| r.status == "done"), "{done:#?}");
    assert_eq!(
        done.iter()
            .filter(|r| r.kind == fhirgate::store::InboxKind::Resync)
            .count(),
        1
    );
    // The pull from the (empty) watermark brought every patient, and left the watermark alone.
    let res = app
        .client
        .get(app.url("/fhir/r4/Patient?_summary=count"))
        .bearer_auth(&h.session.token)
        .send()
        .await
        .unwrap();
    assert_eq!(fhir_body(res).await["total"], 12);
    assert_eq!(h.connections.get(conn).await.unwrap().watermark, None);
    for ehr_id in &ids {
        assert!(versions(app, &h.practice, conn, ehr_id).await >= 1);
    }
}

#[tokio::test]
async fn events_worked_on_together_end_each_on_its_own_and_a_repeated_patient_is_fetched_once() {
    let h = hooked(FAST, 4).await;
    let (app, conn) = (&h.app, h.connection.as_str());
    let ids = h.sim.patient_ids();
    let ehr_requests = || h.sim.controls().counters().fhir_requests;
    // What one event for one patient costs the EHR (a patient read and a coverage search).
    let before = ehr_requests();
    assert_eq!(answer(post_event(&h, "warm", &ids[3]).await).await.0, 202);
    settled(app, conn, 1).await;
    let one_event = ehr_requests() - before;

    // A slow EHR holds the worker on the first event while the others queue behind it, so they
    // are claimed, fetched and written as one batch.
    h.sim.controls().set_latency(Duration::from_millis(400));
    let before = ehr_requests();
    assert_eq!(answer(post_event(&h, "first", &ids[0]).await).await.0, 202);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (event, patient) in [
        ("b-1", ids[1].as_str()),
        ("b-unknown", "no-such-patient"),
        ("b-2", ids[2].as_str()),
        ("b-1-again", ids[1].as_str()),
    ] {
        assert_eq!(answer(post_event(&h, event, patient).await).await.0, 202);
    }
    let done = settled(app, conn, 6).await;
    h.sim.controls().set_latency(Duration::ZERO);
    // The unknown patient's event is dead with the EHR's reason; every other event is done.
    let dead: Vec<&InboxEntry> = done.iter().filter(|r| r.status == "dead").collect();
    assert_eq!(dead.len(), 1, "{done:#?}");
    assert_eq!(
        dead[0].last_error.as_deref(),
        Some("the EHR has no such patient")
    );
    assert_eq!(
        done.iter().filter(|r| r.status == "done").count(),
        5,
        "{done:#?}"
    );
    for patient in &ids[..3] {
        assert_eq!(found(app, &h.session.token, conn, patient).await.len(), 1);
        assert_eq!(versions(app, &h.practice, conn, patient).await, 1);
    }
    // Patients 0, 1 and 2 fetched once each (with their coverages), the unknown one asked for
    // once: the second event on patient 1 cost the EHR nothing.
    assert_eq!(ehr_requests() - before, 3 * one_event + 1);
}

#[tokio::test]
async fn an_ehr_failure_is_retried_until_the_patient_is_stored() {
    let h = hooked(FAST, 3).await;
    let (app, conn) = (&h.app, h.connection.as_str());
    let patient = h.sim.patient_ids()[0].clone();
    // The EHR is slow, then fails twice: the event waits in the inbox meanwhile.
    h.sim.controls().set_latency(Duration::from_millis(700));
    h.sim.controls().fail_next(2, 503, None);
    assert_eq!(
        answer(post_event(&h, "retry-1", &patient).await).await.0,
        202
    );
    let stats = app.store.inbox().queue_stats().await.unwrap();
    let waiting = stats
        .iter()
        .find(|s| s.connection_id == conn)
        .expect("the event waits in the inbox");
    assert_eq!(waiting.depth, 1);
    assert!(waiting.oldest_pending_at.is_some());
    h.sim.controls().set_latency(Duration::ZERO);

    let done = settled(app, conn, 1).await;
    assert_eq!(done[0].status, "done", "{done:#?}");
    assert_eq!(done[0].attempts, 3, "two failures, then success");
    assert_eq!(done[0].last_error, None);
    assert_eq!(found(app, &h.session.token, conn, &patient).await.len(), 1);
    assert!(app
        .store
        .inbox()
        .queue_stats()
        .await
        .unwrap()
        .iter()
        .all(|s| s.connection_id != conn));
}

#[tokio::test]
async fn an_event_that_keeps_failing_is_dead_after_max_attempts_and_stays_visible() {
    let h = hooked(FAST, 3).await;
    let (app, conn) = (&h.app, h.connection.as_str());
    let patient = h.sim.patient_ids()[0].clone();
    h.sim.controls().set_failure_rate(1.0);
    assert_eq!(
        answer(post_event(&h, "doomed-1", &patient).await).await.0,
        202
    );
    let dead = settled(app, conn, 1).await;
    assert_eq!(dead[0].status, "dead", "{dead:#?}");
    assert_eq!(dead[0].attempts, 4);
    assert_eq!(
        dead[0].last_error.as_deref(),
        Some("the EHR failed or did not answer (gave up after 4 attempts)")
    );
    assert!(dead[0].has_payload, "a dead event keeps its sealed payload");
    assert!(found(app, &h.session.token, conn, &patient)
        .await
        .is_empty());
    let listed = app
        .store
        .inbox()
        .list_events(Some(conn), Some("dead"), 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    // Dead rows are not waiting: the queue of the connection is empty.
    assert!(app
        .store
        .inbox()
        .queue_stats()
        .await
        .unwrap()
        .iter()
        .all(|s| s.connection_id != conn));

    // The operator sees it, and once the EHR is back, retries it.
    let cli = |args: &[&str]| {
        let out = crate::binary::run(
            crate::binary::fhirgate()
                .arg("webhooks")
                .args(args)
                .env("FHIRGATE_DATABASE_URL", app.database_url.expose())
                .env("FHIRGATE_MASTER_KEY", master_key()),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = cli(&["list", "--connection", conn, "--status", "dead"]);
    let lines: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{listed}");
    assert_eq!(lines[0]["status"], "dead");
    assert_eq!(lines[0]["attempts"], 4);
    assert!(!listed.contains(&patient), "{listed}");
    h.sim.controls().set_failure_rate(0.0);
    let retried: Value = serde_json::from_str(&cli(&["retry", "--connection", conn])).unwrap();
    assert_eq!(retried["revived"], 1);
    let done = settled(app, conn, 1).await;
    assert_eq!(done[0].status, "done", "{done:#?}");
    assert_eq!(found(app, &h.session.token, conn, &patient).await.len(), 1);
}

/// A gateway on its own runtime and thread, which the test kills without a shutdown: its
/// tasks stop wherever they are, as when the process dies.
struct Doomed {
    address: String,
    kill: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

fn spawn_doomed(url: fhirgate::config::DatabaseUrl, extra: String) -> Doomed {
    let (address_tx, address_rx) = std::sync::mpsc::channel();
    let (kill, killed) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = fhirgate::startup::Application::build(test_settings(&url, &extra))
                .await
                .unwrap();
            address_tx
                .send(format!("http://127.0.0.1:{}", app.port()))
                .unwrap();
            tokio::spawn(app.run_until_stopped());
            let _ = killed.await;
        });
        // No shutdown: every task of the gateway stops where it is.
        runtime.shutdown_background();
    });
    Doomed {
        address: address_rx.recv().unwrap(),
        kill,
        thread,
    }
}

#[tokio::test]
async fn an_event_whose_worker_died_is_finished_by_another_instance_once() {
    let extra = format!("master_key = '{}'\n{FAST}", master_key());
    let Hooked {
        app,
        sim,
        session,
        practice,
        connection,
        ..
    } = hooked(FAST, 3).await;
    let patient = sim.patient_ids()[0].clone();
    // The first gateway stops (its worker must not take the event); a second one on the same
    // database takes the event and dies holding it, waiting for a slow EHR.
    let url = app.database_url.clone();
    let db = app.stop().await;
    let doomed = spawn_doomed(url.clone(), extra.clone());
    sim.controls().set_latency(Duration::from_secs(30));
    let key = signing_key(SECRET).unwrap();
    let ts = unix_now().to_string();
    let body = changed(&patient);
    let res = reqwest::Client::new()
        .post(format!("{}/webhooks/{connection}", doomed.address))
        .header("webhook-id", "crash-1")
        .header("webhook-timestamp", &ts)
        .header(
            "webhook-signature",
            sign(&key, "crash-1", &ts, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let store = fhirgate::store::connect(
        &url,
        &fhirgate::store::PoolOptions {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = store
            .inbox()
            .list_events(Some(&connection), None, 10)
            .await
            .unwrap();
        if rows.first().is_some_and(|r| r.runner.is_some()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the event was never claimed: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = doomed.kill.send(());
    doomed.thread.join().unwrap();
    store.close().await;

    // Another instance starts on the same database once the EHR is well again.
    sim.controls().set_latency(Duration::ZERO);
    let requests_before = sim.controls().counters().fhir_requests;
    let survivor = spawn_app_on(&url, &extra).await.unwrap();
    let done = settled(&survivor, &connection, 1).await;
    assert_eq!(done[0].status, "done", "{done:#?}");
    assert_eq!(
        done[0].attempts, 2,
        "claimed by the dead worker, then by the survivor"
    );
    assert!(sim.controls().counters().fhir_requests > requests_before);
    // Upserted exactly once: one local resource, in its first version.
    let token = token_at(&survivor, &session.client, SCOPES).await;
    assert_eq!(
        found(&survivor, &token, &connection, &patient).await.len(),
        1
    );
    assert_eq!(
        versions(&survivor, &practice, &connection, &patient).await,
        1
    );
    drop(survivor);
    drop(db);
}

#[tokio::test]
async fn no_phi_of_a_webhook_reaches_the_logs() {
    use std::io::Read;
    use std::process::Stdio;

    use crate::binary::{fhirgate, free_port, sigterm, wait_until_up};
    use fhirgate::domain::{NewPractice, PracticeName, TimeZoneName};

    let (_db, url) = crate::helpers::TestDb::create().await;
    let store = fhirgate::store::connect(
        &url,
        &fhirgate::store::PoolOptions {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let practice = store
        .create_practice(&NewPractice {
            name: PracticeName::parse("Webhook Logging Practice").unwrap(),
            timezone: TimeZoneName::parse("UTC").unwrap(),
            npi: None,
            tax_id: None,
        })
        .await
        .unwrap()
        .id;
    let mut config = SimConfig::new(Personality::Cerner);
    config.patients = 4;
    let sim = Simulator::start(config).unwrap();
    let connection = add_connection(
        &connections_of(store.clone()),
        &sim,
        &practice,
        Some(SECRET),
    )
    .await;

    let port = free_port();
    let mut child = fhirgate()
        .arg("serve")
        .env("FHIRGATE_DATABASE_URL", url.expose())
        .env("FHIRGATE_MASTER_KEY", master_key())
        .env("FHIRGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRGATE_LOG_LEVEL", "debug")
        .env("FHIRGATE_WEBHOOKS__POLL_INTERVAL_MS", "100")
        .env("FHIRGATE_WEBHOOKS__RETRY_BASE_MS", "50")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    wait_until_up(port, &mut child);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let key = signing_key(SECRET).unwrap();
    let ids = sim.patient_ids();
    let mut phi: Vec<String> = Vec::new();
    for id in &ids {
        let patient = sim.patient(id).unwrap();
        phi.push(id.clone());
        phi.push(patient["name"][0]["family"].as_str().unwrap().to_owned());
        phi.push(patient["birthDate"].as_str().unwrap().to_owned());
    }
    let signed = |event_id: &str, body: String| {
        let ts = unix_now().to_string();
        http.post(format!("{base}/webhooks/{connection}"))
            .header("webhook-id", event_id)
            .header("webhook-timestamp", &ts)
            .header(
                "webhook-signature",
                sign(&key, event_id, &ts, body.as_bytes()),
            )
            .body(body)
    };
    // A fetch that fails once (retried), a patient in a rest-hook payload, a patient id the
    // event refuses, and a refused signature over a body naming a patient.
    sim.controls().fail_next(1, 500, None);
    assert_eq!(
        signed("log-1", changed(&ids[0]))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        signed("log-2", changed(&ids[1]))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let rest_hook = sim.patient(&ids[2]).unwrap();
    let res = http
        .post(format!("{base}/webhooks/{connection}"))
        .bearer_auth(SECRET)
        .body(rest_hook.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let bad_id = format!("{} {}", phi[1], phi[2]);
    let res = signed("log-3", changed(&bad_id)).send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert!(!res.text().await.unwrap().contains(&phi[1]));
    let res = http
        .post(format!("{base}/webhooks/{connection}"))
        .header("webhook-id", "log-4")
        .header("webhook-timestamp", unix_now().to_string())
        .header("webhook-signature", "v1,AAAA")
        .body(changed(&ids[3]))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = store
            .inbox()
            .list_events(Some(&connection), None, 10)
            .await
            .unwrap();
        if rows.len() == 3 && rows.iter().all(|r| r.status == "done") {
            assert!(rows.iter().any(|r| r.attempts == 2), "{rows:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "events not processed: {rows:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.close().await;
    sigterm(&child);
    assert!(child.wait().unwrap().success());
    let logs = stdout.join().unwrap() + &stderr.join().unwrap();
    assert!(logs.contains("webhook event will be retried"), "{logs}");
    assert!(logs.contains("webhook refused"), "{logs}");
    for value in &phi {
        assert!(
            !logs.contains(value.as_str()),
            "`{value}` reached the logs:\n{logs}"
        );
    }
}

/// A notification carrying a full Patient is sealed in the inbox and in the store: scanning
/// everything SQLite wrote finds none of its PHI in clear.
#[tokio::test]
async fn a_carried_patient_is_ciphertext_at_rest_in_the_inbox_and_the_store() {
    if crate::helpers::backend() != fhirgate::store::Backend::Sqlite {
        return; // The scan reads SQLite's files; PostgreSQL's row scan is in patient.rs.
    }
    let h = hooked(FAST, 2).await;
    let (app, conn) = (&h.app, h.connection.as_str());
    let ids = h.sim.patient_ids();
    let mut carried = h.sim.patient(&ids[0]).unwrap();
    carried["name"][0]["family"] = json!("Wabbajackfamily");
    carried["birthDate"] = json!("1911-11-11");
    carried["meta"]["versionId"] = json!("2");
    let full = r4b_notification("event-notification", 1, &[(1, &ids[0])], &[carried]);
    assert_eq!(
        answer(post_fhir(app, conn, SECRET, &full).await).await.0,
        202
    );
    let done = settled(app, conn, 1).await;
    assert_eq!(done[0].status, "done", "{done:#?}");
    assert_eq!(found(app, &h.session.token, conn, &ids[0]).await.len(), 1);

    let bytes = crate::helpers::sqlite_bytes(app);
    for secret in ["Wabbajackfamily", "1911-11-11"] {
        assert!(
            !crate::helpers::contains(&bytes, secret),
            "{secret} in clear"
        );
    }
}
