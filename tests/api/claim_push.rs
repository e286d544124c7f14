//! Claim-status push as a practice's system and an EHR see it: a status change (or a FHIR
//! ClaimResponse) reaches the claim's EHR simulator with the right outcome, in order per claim,
//! at least once and applied once even when the gateway is killed mid-push, retried while the
//! EHR fails and dead-lettered when it keeps failing, visible in `/api/v1/dead-letters` and the
//! CLI and replayable; refusals queue nothing; another practice sees nothing; no PHI in logs.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirgate::crypto::Keyring;
use fhirgate::domain::ResourceId;
use fhirgate::gate::Role;
use fhirgate::store::Store;
use fhirgate::sync::Connections;
use fhirgate_ehr_sim::{ClaimUpdate, Personality, SimConfig, Simulator};
use serde_json::{json, Value};

use crate::auth::{session, SigningKey, TestClient};
use crate::binary::{fhirgate, free_port, run, sigterm, wait_until_up};
use crate::helpers::{spawn_app_on, spawn_app_with, TestApp, TestDb};

/// The master key `crate::binary::fhirgate()` gives the binary; the in-process gateways of
/// these tests use it too, so both open the connections' sealed credentials.
fn master_key() -> String {
    format!("test1:{}", "A".repeat(43) + "=")
}

/// Fast retries, few attempts and a quick poll, so failures play out in a test's time.
fn fast_outbox() -> String {
    format!(
        "master_key = '{}'\n[outbox]\nretry_base_ms = 20\nretry_max_ms = 100\nmax_attempts = 3\n\
         poll_interval_ms = 50\n",
        master_key()
    )
}

const SCOPES: &str = "system/Patient.cruds system/Practitioner.cruds system/Organization.cruds \
    system/Coverage.cruds system/Claim.cruds system/ClaimResponse.cruds";

/// A gateway as one client of one practice uses it (in-process or a `fhirgate serve`); each
/// [`Gateway::of`] is a client of a new practice.
pub(crate) struct Gateway {
    base: String,
    http: reqwest::Client,
    pub(crate) token: String,
    pub(crate) practice: ResourceId,
}

impl Gateway {
    pub(crate) async fn of(app: &TestApp, role: Role) -> Self {
        let s = session(app, SCOPES, role).await;
        Self {
            base: app.address.clone(),
            http: reqwest::Client::new(),
            token: s.token,
            practice: ResourceId::parse("practice", s.practice_id).unwrap(),
        }
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
    }

    /// Creates a FHIR resource; its id.
    pub(crate) async fn create(&self, resource: Value) -> String {
        let ty = resource["resourceType"].as_str().unwrap().to_owned();
        let res = self.post(&format!("/fhir/r4/{ty}"), &resource).await;
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 201, "{ty}: {body}");
        body["id"].as_str().unwrap().to_owned()
    }

    pub(crate) async fn set_status(&self, claim: &str, status: &str) -> reqwest::Response {
        self.post(
            &format!("/api/v1/claims/{claim}/status"),
            &json!({ "status": status }),
        )
        .await
    }

    /// Changes a claim's status, expecting success; the update id queued for the EHR, if any.
    pub(crate) async fn change(&self, claim: &str, status: &str) -> Option<String> {
        let res = self.set_status(claim, status).await;
        let code = res.status();
        let body: Value = res.json().await.unwrap();
        assert_eq!(code, 200, "{status}: {body}");
        assert_eq!(body["status"], status);
        body["push"]["update_id"].as_str().map(str::to_owned)
    }
}

/// A patient the practice pulled from `connection` (it carries its id at the EHR), a payer and
/// a coverage: what a claim needs.
struct Patient {
    id: String,
    payer: String,
    coverage: String,
}

async fn pulled_patient(gw: &Gateway, connection: &str, ehr_id: &str) -> Patient {
    let id = gw
        .create(json!({
            "resourceType": "Patient",
            "identifier": [{ "system": format!("urn:fhirgate:connection:{connection}"), "value": ehr_id }],
            "name": [{ "family": "Quillfeather", "given": ["Ada"] }],
            "birthDate": "1961-04-12"
        }))
        .await;
    let payer = gw
        .create(json!({ "resourceType": "Organization", "name": "Acme Health" }))
        .await;
    let coverage = gw
        .create(json!({
            "resourceType": "Coverage",
            "status": "active",
            "beneficiary": { "reference": format!("Patient/{id}") },
            "payor": [{ "reference": format!("Organization/{payer}") }]
        }))
        .await;
    Patient {
        id,
        payer,
        coverage,
    }
}

/// A Claim of `patient`; with `ehr_claim`, it carries its id at the EHR of `connection`.
fn claim_body(
    patient: &str,
    payer: &str,
    coverage: &str,
    ehr_claim: Option<(&str, &str)>,
) -> Value {
    let mut claim = json!({
        "resourceType": "Claim",
        "status": "active",
        "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional" }] },
        "use": "claim",
        "patient": { "reference": patient },
        "created": "2026-11-20",
        "provider": { "reference": format!("Organization/{payer}") },
        "priority": { "coding": [{ "code": "normal" }] },
        "insurance": [{ "sequence": 1, "focal": true, "coverage": { "reference": coverage } }]
    });
    if let Some((connection, id)) = ehr_claim {
        claim["identifier"] =
            json!([{ "system": format!("urn:fhirgate:connection:{connection}"), "value": id }]);
    }
    claim
}

async fn new_claim(gw: &Gateway, p: &Patient, ehr_claim: Option<(&str, &str)>) -> String {
    gw.create(claim_body(
        &format!("Patient/{}", p.id),
        &p.payer,
        &format!("Coverage/{}", p.coverage),
        ehr_claim,
    ))
    .await
}

/// A claim of the practice of `gw`, about a patient pulled from `connection`, prepared and
/// ready to be submitted (the submission is what reaches the EHR).
pub(crate) async fn prepared_claim(gw: &Gateway, connection: &str, ehr_patient: &str) -> String {
    let p = pulled_patient(gw, connection, ehr_patient).await;
    let claim = new_claim(gw, &p, None).await;
    gw.change(&claim, "prepared").await;
    claim
}

/// An EHR simulator and the practice's connection to it. The adapter tries each call once and
/// its circuit breaker stays closed, so every failure is the outbox's to retry.
struct Ehr {
    sim: Simulator,
    connection: String,
}

async fn connect_ehr(store: Arc<dyn Store>, practice: &ResourceId) -> Ehr {
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = 3;
    let sim = Simulator::start(config).unwrap();
    let keyring = Keyring::parse(&master_key()).unwrap();
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().unwrap());
    let connections = Connections::new(store, &keyring, profiles);
    let mut spec = fhirgate::cli::sandbox_spec(&sim, practice).unwrap();
    spec.settings.insert("max_attempts".into(), json!(1));
    spec.settings.insert("breaker_failures".into(), json!(1000));
    let info = connections.add(spec).await.unwrap();
    Ehr {
        sim,
        connection: info.id,
    }
}

/// The updates the simulator applied to `claim`, once it has at least `n` (bounded wait).
async fn applied(sim: &Simulator, claim: &str, n: usize) -> Vec<ClaimUpdate> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let updates = sim.claim_updates(claim);
        if updates.len() >= n {
            return updates;
        }
        assert!(
            Instant::now() < deadline,
            "claim {claim}: {} of {n} updates applied",
            updates.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rows waiting in the outbox, all connections.
async fn outbox_depth(store: &dyn Store) -> i64 {
    store
        .outbox()
        .queue_stats()
        .await
        .unwrap()
        .iter()
        .map(|s| s.depth)
        .sum()
}

/// Waits until the outbox is empty (bounded).
async fn drained(store: &dyn Store) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while outbox_depth(store).await > 0 {
        assert!(Instant::now() < deadline, "the outbox did not drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ids(updates: &[ClaimUpdate]) -> Vec<String> {
    updates
        .iter()
        .map(|u| u.update_id.clone().unwrap_or_default())
        .collect()
}

fn outcomes(updates: &[ClaimUpdate]) -> Vec<&str> {
    updates.iter().map(|u| u.outcome.as_str()).collect()
}

#[tokio::test]
async fn a_status_change_reaches_the_claims_ehr_with_the_mapped_outcome() {
    let app = spawn_app_with(&fast_outbox()).await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let ehr = connect_ehr(app.store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-1").await;
    let claim = new_claim(&gw, &p, Some((&ehr.connection, "ehr-claim-1"))).await;

    // A claim nobody has touched is a draft.
    let res = gw.get(&format!("/api/v1/claims/{claim}/status")).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "draft");
    assert_eq!(body["version"], 0);
    assert_eq!(body["next"], json!(["prepared"]));

    // Prepared: the payer has not seen it, the EHR hears nothing.
    assert_eq!(gw.change(&claim, "prepared").await, None);
    assert_eq!(outbox_depth(&*app.store).await, 0);

    let res = gw
        .post(
            &format!("/api/v1/claims/{claim}/status"),
            &json!({ "status": "submitted", "disposition": "Sent to Acme Health" }),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["etag"], "W/\"2\"");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["version"], 2);
    assert_eq!(body["push"]["connection_id"], ehr.connection.as_str());
    assert_eq!(body["push"]["outcome"], "queued");
    let submitted = body["push"]["update_id"].as_str().unwrap().to_owned();

    let updates = applied(&ehr.sim, "ehr-claim-1", 1).await;
    assert_eq!(ids(&updates), std::slice::from_ref(&submitted));
    assert_eq!(updates[0].outcome, "queued");
    assert_eq!(
        updates[0].disposition.as_deref(),
        Some("Sent to Acme Health")
    );
    let pushed = &updates[0].resource;
    assert_eq!(pushed["request"]["reference"], "Claim/ehr-claim-1");
    assert_eq!(pushed["patient"]["reference"], "Patient/ehr-pat-1");

    // Accepted, then paid: `complete` each, with a disposition naming the status by default.
    gw.change(&claim, "accepted").await.unwrap();
    gw.change(&claim, "paid").await.unwrap();
    let updates = applied(&ehr.sim, "ehr-claim-1", 3).await;
    assert_eq!(outcomes(&updates), ["queued", "complete", "complete"]);
    assert_eq!(updates[2].disposition.as_deref(), Some("Claim paid"));
    assert_eq!(ehr.sim.controls().counters().claim_updates_applied, 3);

    let res = gw.get(&format!("/api/v1/claims/{claim}/status")).await;
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "paid");
    assert_eq!(body["version"], 4);
    assert_eq!(body["next"], json!([]));

    // Each delivery is audited as a push of the claim, with the connection it went to.
    drained(&*app.store).await;
    let records = app
        .store
        .audit_chain_page(gw.practice.as_str(), 0, 10_000)
        .await
        .unwrap();
    let pushes: Vec<_> = records
        .iter()
        .filter(|r| r.action == "push" && r.outcome == "success")
        .collect();
    assert_eq!(pushes.len(), 3, "{pushes:?}");
    assert!(pushes
        .iter()
        .all(|r| r.resource_id.as_deref() == Some(claim.as_str())
            && r.patient_id.as_deref() == Some(p.id.as_str())
            && r.connection_id.as_deref() == Some(ehr.connection.as_str())));
    assert!(records.iter().any(|r| r.action == "ehr-push"));
    assert!(fhirgate::audit::verify_chain(gw.practice.as_str(), &records).ok);
}

#[tokio::test]
async fn refused_changes_queue_nothing_and_other_practices_see_nothing() {
    let app = spawn_app_with(&fast_outbox()).await;
    let gw = Gateway::of(&app, Role::PracticeAdmin).await;
    let ehr = connect_ehr(app.store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-2").await;
    let claim = new_claim(&gw, &p, None).await;
    let path = format!("/api/v1/claims/{claim}/status");

    // Unknown status: 400 naming the allowed ones. Illegal transition: 409 naming the next.
    let res = gw.set_status(&claim, "void").await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert!(
        body.to_string().contains("must be draft, prepared"),
        "{body}"
    );
    let res = gw.set_status(&claim, "paid").await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert!(
        body.to_string()
            .contains("the claim is draft and cannot become paid (it may become: prepared)"),
        "{body}"
    );
    let res = gw
        .post(&path, &json!({ "status": "prepared", "extra": 1 }))
        .await;
    assert_eq!(res.status(), 400);
    let res = gw
        .post(
            &path,
            &json!({ "status": "prepared", "disposition": "x".repeat(1001) }),
        )
        .await;
    assert_eq!(res.status(), 400);

    // A stale If-Match: 412, nothing changed.
    gw.change(&claim, "prepared").await;
    let res = gw
        .http
        .post(format!("{}{path}", gw.base))
        .bearer_auth(&gw.token)
        .header("if-match", "W/\"0\"")
        .json(&json!({ "status": "submitted" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 412);
    // Going back is illegal too; the claim is still prepared, and nothing was queued.
    assert_eq!(gw.set_status(&claim, "draft").await.status(), 409);
    assert_eq!(outbox_depth(&*app.store).await, 0);
    let body: Value = gw.get(&path).await.json().await.unwrap();
    assert_eq!(
        (body["status"].as_str(), body["version"].as_i64()),
        (Some("prepared"), Some(1))
    );

    // The right If-Match goes through (and the patient's EHR gets the claim's own id).
    let res = gw
        .http
        .post(format!("{}{path}", gw.base))
        .bearer_auth(&gw.token)
        .header("if-match", "W/\"1\"")
        .json(&json!({ "status": "submitted" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(applied(&ehr.sim, &claim, 1).await[0].outcome, "queued");

    // Another practice: its own claim of the same id does not exist, nor its dead letters.
    let other = Gateway::of(&app, Role::Billing).await;
    assert_eq!(other.get(&path).await.status(), 404);
    assert_eq!(other.set_status(&claim, "accepted").await.status(), 404);
    assert_eq!(
        other
            .get("/api/v1/claims/no-such-claim/status")
            .await
            .status(),
        404
    );
    // A role that does not bill: 403.
    let outsider = Gateway::of(&app, Role::ExternalSystem).await;
    assert_eq!(outsider.get(&path).await.status(), 403);
    // A claim whose patient the practice entered itself has no EHR: the change commits alone.
    let local = gw
        .create(json!({ "resourceType": "Patient", "name": [{ "family": "Local" }] }))
        .await;
    let local_claim = gw
        .create(claim_body(
            &format!("Patient/{local}"),
            &p.payer,
            &format!("Coverage/{}", p.coverage),
            None,
        ))
        .await;
    gw.change(&local_claim, "prepared").await;
    assert_eq!(gw.change(&local_claim, "submitted").await, None);
    drained(&*app.store).await;
    assert_eq!(ehr.sim.controls().counters().claim_updates_applied, 1);
}

#[tokio::test]
async fn a_claim_response_written_through_fhir_is_pushed_to_the_claims_ehr() {
    let app = spawn_app_with(&fast_outbox()).await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let ehr = connect_ehr(app.store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-3").await;
    let claim = new_claim(&gw, &p, Some((&ehr.connection, "ehr-claim-3"))).await;
    let response = |request: &str, patient: &str, outcome: &str| {
        json!({
            "resourceType": "ClaimResponse",
            "status": "active",
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional" }] },
            "use": "claim",
            "patient": { "reference": patient },
            "created": "2026-11-21",
            "insurer": { "reference": format!("Organization/{}", p.payer) },
            "request": { "reference": request },
            "outcome": outcome,
            "disposition": "Adjudicated: paid in full"
        })
    };
    gw.create(response(
        &format!("Claim/{claim}"),
        &format!("Patient/{}", p.id),
        "complete",
    ))
    .await;
    let updates = applied(&ehr.sim, "ehr-claim-3", 1).await;
    assert_eq!(updates[0].outcome, "complete");
    assert_eq!(
        updates[0].disposition.as_deref(),
        Some("Adjudicated: paid in full")
    );

    // A transaction writing a new patient's claim and its response together: the response's
    // update reads the claim and the patient as the transaction writes them.
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:2d1b7a52-0000-4000-8000-000000000001",
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{ "system": format!("urn:fhirgate:connection:{}", ehr.connection), "value": "ehr-pat-4" }],
                    "name": [{ "family": "Nightingale" }]
                },
                "request": { "method": "POST", "url": "Patient" }
            },
            {
                "fullUrl": "urn:uuid:2d1b7a52-0000-4000-8000-000000000002",
                "resource": claim_body(
                    "urn:uuid:2d1b7a52-0000-4000-8000-000000000001",
                    &p.payer,
                    &format!("Coverage/{}", p.coverage),
                    Some((&ehr.connection, "ehr-claim-4")),
                ),
                "request": { "method": "POST", "url": "Claim" }
            },
            {
                "resource": response(
                    "urn:uuid:2d1b7a52-0000-4000-8000-000000000002",
                    "urn:uuid:2d1b7a52-0000-4000-8000-000000000001",
                    "error",
                ),
                "request": { "method": "POST", "url": "ClaimResponse" }
            }
        ]
    });
    let res = gw.post("/fhir/r4", &bundle).await;
    let status = res.status();
    assert_eq!(status, 200, "{}", res.text().await.unwrap());
    let updates = applied(&ehr.sim, "ehr-claim-4", 1).await;
    assert_eq!(updates[0].outcome, "error");
    assert_eq!(
        updates[0].resource["patient"]["reference"],
        "Patient/ehr-pat-4"
    );

    // A ClaimResponse about no claim of the practice pushes nothing.
    gw.create(response(
        "Claim/not-a-claim",
        &format!("Patient/{}", p.id),
        "complete",
    ))
    .await;
    drained(&*app.store).await;
    assert_eq!(ehr.sim.controls().counters().claim_updates_applied, 2);
}

#[tokio::test]
async fn quick_changes_of_several_claims_reach_the_ehr_in_order_per_claim() {
    let app = spawn_app_with(&fast_outbox()).await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let ehr = connect_ehr(app.store.clone(), &gw.practice).await;
    // A slow EHR, so each claim's updates queue up behind one another.
    ehr.sim.controls().set_latency(Duration::from_millis(40));
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-5").await;
    let lifecycle = ["submitted", "rejected", "appealed", "accepted", "paid"];
    let mut claims = Vec::new();
    for n in 0..3 {
        let ehr_claim = format!("ehr-claim-5{n}");
        let id = new_claim(&gw, &p, Some((&ehr.connection, &ehr_claim))).await;
        gw.change(&id, "prepared").await;
        claims.push((id, ehr_claim, Vec::new()));
    }
    // Interleaved: every claim's next status, as fast as the API answers.
    for status in lifecycle {
        for (id, _, sent) in claims.iter_mut() {
            sent.push(gw.change(id, status).await.unwrap());
        }
    }
    for (_, ehr_claim, sent) in &claims {
        let updates = applied(&ehr.sim, ehr_claim, lifecycle.len()).await;
        assert_eq!(
            &ids(&updates),
            sent,
            "{ehr_claim}: applied in the order of the changes"
        );
        assert_eq!(
            outcomes(&updates),
            ["queued", "error", "queued", "complete", "complete"]
        );
    }
    drained(&*app.store).await;
    assert_eq!(ehr.sim.controls().counters().claim_updates_applied, 15);
}

#[tokio::test]
async fn the_same_change_sent_at_once_commits_once_and_queues_one_update() {
    let app = spawn_app_with(&fast_outbox()).await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let ehr = connect_ehr(app.store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-6").await;
    let claim = new_claim(&gw, &p, Some((&ehr.connection, "ehr-claim-60"))).await;
    gw.change(&claim, "prepared").await;

    // Eight requests to submit it at once: each reads the status and writes the change in one
    // transaction, so one commits and the others find it submitted already.
    let answers =
        futures_util::future::join_all((0..8).map(|_| gw.set_status(&claim, "submitted"))).await;
    let mut codes = Vec::new();
    for res in answers {
        let code = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        if code == 200 {
            assert_eq!(body["version"], 2, "{body}");
            assert!(body["push"]["update_id"].is_string(), "{body}");
        } else {
            assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
        }
        codes.push(code);
    }
    codes.sort_unstable();
    assert_eq!(codes, [200, 409, 409, 409, 409, 409, 409, 409]);

    let res = gw.get(&format!("/api/v1/claims/{claim}/status")).await;
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        (body["status"].as_str(), body["version"].as_i64()),
        (Some("submitted"), Some(2))
    );
    drained(&*app.store).await;
    assert_eq!(
        outcomes(&applied(&ehr.sim, "ehr-claim-60", 1).await),
        ["queued"]
    );
    assert_eq!(ehr.sim.controls().counters().claim_updates_applied, 1);
    // One audited change (plus the one to prepared), none for the refusals' writes.
    let audit = app
        .store
        .audit_chain_page(gw.practice.as_str(), 0, 10_000)
        .await
        .unwrap();
    let changes = audit
        .iter()
        .filter(|r| {
            r.action == "update"
                && r.resource_type.as_deref() == Some("Claim")
                && r.resource_id.as_deref() == Some(claim.as_str())
                && r.status_code == 200
        })
        .count();
    assert_eq!(changes, 2);
}

#[tokio::test]
async fn a_failing_ehr_is_retried_until_it_applies_the_update() {
    let app = spawn_app_with(&fast_outbox()).await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let ehr = connect_ehr(app.store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-6").await;
    let claim = new_claim(&gw, &p, None).await;
    gw.change(&claim, "prepared").await;
    // Two 503s, then the EHR recovers: the third attempt (of at most three) delivers.
    ehr.sim.controls().fail_next(2, 503, None);
    let before = ehr.sim.controls().counters().fhir_requests;
    let id = gw.change(&claim, "submitted").await.unwrap();
    let updates = applied(&ehr.sim, &claim, 1).await;
    assert_eq!(ids(&updates), [id]);
    drained(&*app.store).await;
    let counters = ehr.sim.controls().counters();
    assert_eq!(
        counters.fhir_requests - before,
        3,
        "two refused, one applied"
    );
    assert_eq!(counters.claim_updates_applied, 1);
    let dead: Value = gw.get("/api/v1/dead-letters").await.json().await.unwrap();
    assert_eq!(dead["dead_letters"], json!([]));
}

#[tokio::test]
async fn an_ehr_that_keeps_failing_dead_letters_the_update_and_a_replay_delivers_it() {
    let app = spawn_app_with(&fast_outbox()).await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let ehr = connect_ehr(app.store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-7").await;
    let first = new_claim(&gw, &p, Some((&ehr.connection, "ehr-claim-7a"))).await;
    let second = new_claim(&gw, &p, Some((&ehr.connection, "ehr-claim-7b"))).await;
    for c in [&first, &second] {
        gw.change(c, "prepared").await;
    }

    ehr.sim.controls().set_failure_rate(1.0);
    let dead_a = gw.change(&first, "submitted").await.unwrap();
    let dead_b = gw.change(&second, "submitted").await.unwrap();
    drained(&*app.store).await;
    let res = gw.get("/api/v1/dead-letters?limit=1").await;
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await.unwrap();
    let letters = page["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1);
    let next = page["next"].as_str().expect("a second page");
    let rest: Value = gw
        .get(next.trim_start_matches(&gw.base))
        .await
        .json()
        .await
        .unwrap();
    let mut all: Vec<Value> = letters.clone();
    all.extend(rest["dead_letters"].as_array().unwrap().iter().cloned());
    assert_eq!(all.len(), 2);
    let mut listed: Vec<&str> = all.iter().map(|l| l["id"].as_str().unwrap()).collect();
    listed.sort();
    let mut expected = vec![dead_a.as_str(), dead_b.as_str()];
    expected.sort();
    assert_eq!(listed, expected);
    for letter in &all {
        assert_eq!(letter["attempts"], 3, "{letter}");
        assert_eq!(
            letter["last_error"],
            "the EHR was unavailable (5xx, timeout or connection failure)"
        );
        assert_eq!(letter["connection_id"], ehr.connection.as_str());
        assert_eq!(letter["source"], "status");
        assert!(letter["dead_at"].is_string());
    }
    let text = serde_json::to_string(&all).unwrap();
    assert!(
        !text.contains("ehr-pat-7") && !text.contains("ehr-claim-7"),
        "{text}"
    );
    assert_eq!(ehr.sim.controls().counters().claim_updates_applied, 0);
    let stats = app.store.outbox().dead_letter_counts().await.unwrap();
    assert_eq!(stats, [(ehr.connection.clone(), 2)]);

    // The CLI lists them for the practice as JSON lines.
    let out = run(fhirgate()
        .args(["outbox", "dead-letters", "--practice", gw.practice.as_str()])
        .env("FHIRGATE_DATABASE_URL", app.database_url.expose()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().any(|l| l["id"] == dead_a.as_str()));

    // Another practice sees none and cannot replay one.
    let other = Gateway::of(&app, Role::PracticeAdmin).await;
    let theirs: Value = other
        .get("/api/v1/dead-letters")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(theirs["dead_letters"], json!([]));
    let res = other
        .post(&format!("/api/v1/dead-letters/{dead_a}/replay"), &json!({}))
        .await;
    assert_eq!(res.status(), 404);

    // The EHR is back. The first claim moves on while its submission is dead: the EHR gets
    // the newer status; the replayed submission arrives after it, with its original id.
    ehr.sim.controls().set_failure_rate(0.0);
    let accepted = gw.change(&first, "accepted").await.unwrap();
    applied(&ehr.sim, "ehr-claim-7a", 1).await;
    let res = gw
        .post(&format!("/api/v1/dead-letters/{dead_a}/replay"), &json!({}))
        .await;
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "pending");
    let updates = applied(&ehr.sim, "ehr-claim-7a", 2).await;
    assert_eq!(ids(&updates), [accepted, dead_a.clone()]);
    assert_eq!(
        gw.post(&format!("/api/v1/dead-letters/{dead_a}/replay"), &json!({}))
            .await
            .status(),
        404,
        "replayed already"
    );

    // The CLI replays the other.
    let out = run(fhirgate()
        .args(["outbox", "replay", &dead_b])
        .env("FHIRGATE_DATABASE_URL", app.database_url.expose()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["status"], "pending");
    let updates = applied(&ehr.sim, "ehr-claim-7b", 1).await;
    assert_eq!(ids(&updates), [dead_b]);
    drained(&*app.store).await;
    let dead: Value = gw.get("/api/v1/dead-letters").await.json().await.unwrap();
    assert_eq!(dead["dead_letters"], json!([]));
    let records = app
        .store
        .audit_chain_page(gw.practice.as_str(), 0, 10_000)
        .await
        .unwrap();
    assert_eq!(
        records
            .iter()
            .filter(|r| r.action == "push" && r.status_code == 502)
            .count(),
        2,
        "each dead-lettering is audited"
    );
    assert_eq!(
        records
            .iter()
            .filter(|r| r.action == "push" && r.status_code == 202)
            .count(),
        2,
        "each replay is audited"
    );
}

/// A practice with a client of `role` made with the CLI; (practice id, client id).
fn cli_client(
    url: &fhirgate::config::DatabaseUrl,
    role: &str,
    key: &SigningKey,
) -> (String, String) {
    let out = run(fhirgate()
        .args(["practices", "add", "--name", "Harbour Therapy"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    let practice: Value = serde_json::from_slice(&out.stdout).unwrap();
    let practice = practice["id"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, SigningKey::jwks(&[key])).unwrap();
    let out = run(fhirgate()
        .args([
            "clients",
            "add",
            "--practice",
            &practice,
            "--name",
            "Billing",
        ])
        .arg("--jwks")
        .arg(&jwks)
        .args(["--scope", SCOPES, "--role", role])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    let client: Value = serde_json::from_slice(&out.stdout).unwrap();
    (practice, client["client_id"].as_str().unwrap().to_owned())
}

/// The client's gateway at `base` (a `fhirgate serve`).
async fn gateway_at(base: &str, practice: &str, client_id: &str, key: &SigningKey) -> Gateway {
    let http = reqwest::Client::new();
    let client = TestClient {
        client_id: client_id.to_owned(),
        key: key.clone(),
        token_url: format!("{base}/auth/token"),
    };
    let assertion = client.sign(&client.claims());
    let token: Value = http
        .post(format!("{base}/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", SCOPES),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Gateway {
        base: base.to_owned(),
        http,
        token: token["access_token"].as_str().expect("a token").to_owned(),
        practice: ResourceId::parse("practice", practice).unwrap(),
    }
}

/// `fhirgate serve` on `url` (stdout and stderr piped when `logs`); its port.
fn serve(
    url: &fhirgate::config::DatabaseUrl,
    env: &[(&str, &str)],
    logs: bool,
) -> (std::process::Child, u16) {
    let port = free_port();
    let output = || if logs { Stdio::piped() } else { Stdio::null() };
    let mut child = fhirgate()
        .arg("serve")
        .env("FHIRGATE_DATABASE_URL", url.expose())
        .env("FHIRGATE_LISTEN", format!("127.0.0.1:{port}"))
        .envs(env.iter().copied())
        .stdout(output())
        .stderr(output())
        .spawn()
        .unwrap();
    wait_until_up(port, &mut child);
    (child, port)
}

#[tokio::test]
async fn a_gateway_killed_mid_push_loses_no_update_and_the_ehr_applies_each_once() {
    let (db, url) = TestDb::create().await;
    let key = SigningKey::es384("k1");
    let (practice, client_id) = cli_client(&url, "billing", &key);
    let (mut first, port) = serve(
        &url,
        &[
            ("FHIRGATE_OUTBOX__LEASE_MS", "2000"),
            ("FHIRGATE_OUTBOX__POLL_INTERVAL_MS", "50"),
        ],
        false,
    );
    let base = format!("http://127.0.0.1:{port}");
    let gw = gateway_at(&base, &practice, &client_id, &key).await;
    let store = fhirgate::store::connect(
        &url,
        &fhirgate::store::PoolOptions {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let ehr = connect_ehr(store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-8").await;
    let mut claims = Vec::new();
    for n in 0..3 {
        let ehr_claim = format!("ehr-claim-8{n}");
        let id = new_claim(&gw, &p, Some((&ehr.connection, &ehr_claim))).await;
        gw.change(&id, "prepared").await;
        claims.push((id, ehr_claim, Vec::new()));
    }
    // One delivery first, so the gateway holds a token and the pushes below go straight out.
    let warm = claims[0].0.clone();
    claims[0]
        .2
        .push(gw.change(&warm, "submitted").await.unwrap());
    applied(&ehr.sim, "ehr-claim-80", 1).await;

    // A slow EHR: the next pushes are in flight, held at the EHR, when the gateway is killed.
    ehr.sim.controls().set_latency(Duration::from_millis(1500));
    for (i, (id, _, sent)) in claims.iter_mut().enumerate() {
        let statuses: &[&str] = if i == 0 {
            &["accepted", "paid"]
        } else {
            &["submitted", "accepted", "paid"]
        };
        for status in statuses {
            sent.push(gw.change(id, status).await.unwrap());
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    first.kill().unwrap(); // SIGKILL: no shutdown, leases held, requests cut off
    first.wait().unwrap();
    ehr.sim.controls().set_latency(Duration::ZERO);

    // Another gateway on the same database takes over once the dead one's leases run out.
    let second = spawn_app_on(
        &url,
        &format!(
            "master_key = '{}'\n[outbox]\nlease_ms = 2000\npoll_interval_ms = 50\n",
            master_key()
        ),
    )
    .await
    .unwrap();
    let mut sent_total = 0;
    for (_, ehr_claim, sent) in &claims {
        let updates = applied(&ehr.sim, ehr_claim, sent.len()).await;
        assert_eq!(
            &ids(&updates),
            sent,
            "{ehr_claim}: every update once, in order"
        );
        sent_total += sent.len() as u64;
    }
    drained(&*second.store).await;
    let counters = ehr.sim.controls().counters();
    eprintln!(
        "killed mid-push: {} ClaimResponse requests for {} updates, {} applied",
        counters.fhir_requests, sent_total, counters.claim_updates_applied
    );
    assert_eq!(
        counters.claim_updates_applied, sent_total,
        "nothing applied twice"
    );
    assert!(second
        .store
        .outbox()
        .list_dead_letters(None, None, 10)
        .await
        .unwrap()
        .is_empty());
    second.stop().await;
    store.close().await;
    drop(db);
}

/// Distinctive PHI that must never reach the logs of a push.
const LOGGED_PHI: [&str; 4] = [
    "Quillfeather",
    "EHRPAT-LOG-5521",
    "EHRCLM-LOG-7781",
    "Paid to Ada Quillfeather",
];

#[tokio::test]
async fn no_phi_of_a_push_reaches_the_logs() {
    use std::io::Read;

    let (_db, url) = TestDb::create().await;
    let key = SigningKey::es384("k1");
    let (practice, client_id) = cli_client(&url, "practice_admin", &key);
    let (mut child, port) = serve(
        &url,
        &[
            ("FHIRGATE_LOG_LEVEL", "debug"),
            ("FHIRGATE_OUTBOX__RETRY_BASE_MS", "20"),
            ("FHIRGATE_OUTBOX__RETRY_MAX_MS", "100"),
        ],
        true,
    );
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let gw = gateway_at(
        &format!("http://127.0.0.1:{port}"),
        &practice,
        &client_id,
        &key,
    )
    .await;
    let store = fhirgate::store::connect(
        &url,
        &fhirgate::store::PoolOptions {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let ehr = connect_ehr(store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, LOGGED_PHI[1]).await;
    let claim = new_claim(&gw, &p, Some((&ehr.connection, LOGGED_PHI[2]))).await;
    for status in ["prepared", "submitted", "accepted"] {
        gw.change(&claim, status).await;
    }
    applied(&ehr.sim, LOGGED_PHI[2], 2).await;
    // A failure on the way, so the retry path logs too.
    ehr.sim.controls().fail_next(1, 503, None);
    let res = gw
        .post(
            &format!("/api/v1/claims/{claim}/status"),
            &json!({ "status": "paid", "disposition": LOGGED_PHI[3] }),
        )
        .await;
    assert_eq!(res.status(), 200);
    let updates = applied(&ehr.sim, LOGGED_PHI[2], 3).await;
    assert_eq!(updates[2].disposition.as_deref(), Some(LOGGED_PHI[3]));
    drained(&*store).await;

    sigterm(&child);
    assert!(child.wait().unwrap().success());
    store.close().await;
    let logs = stdout.join().unwrap() + &stderr.join().unwrap();
    assert!(
        logs.contains("claim-status push failed; retrying"),
        "{logs}"
    );
    assert!(logs.contains("claim-status update delivered"), "{logs}");
    for value in LOGGED_PHI {
        assert!(!logs.contains(value), "`{value}` reached the logs:\n{logs}");
    }
}

#[tokio::test]
async fn a_refused_update_dead_letters_at_once_and_a_replay_from_the_cli_wakes_running_gateways() {
    // On PostgreSQL the gateway polls once a minute here: only `NOTIFY` can wake it in time.
    let poll = if crate::helpers::backend() == fhirgate::store::Backend::Postgres {
        60_000
    } else {
        50
    };
    let app = spawn_app_with(&format!(
        "master_key = '{}'\n[outbox]\nmax_attempts = 5\npoll_interval_ms = {poll}\n",
        master_key()
    ))
    .await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let ehr = connect_ehr(app.store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-9").await;
    let claim = new_claim(&gw, &p, None).await;
    gw.change(&claim, "prepared").await;
    // A 422 will not pass by retrying: dead at the first attempt, whatever max_attempts says.
    ehr.sim.controls().fail_next(1, 422, None);
    let id = gw.change(&claim, "submitted").await.unwrap();
    drained(&*app.store).await;
    let dead: Value = gw.get("/api/v1/dead-letters").await.json().await.unwrap();
    assert_eq!(dead["dead_letters"][0]["id"], id.as_str());
    assert_eq!(dead["dead_letters"][0]["attempts"], 1);
    assert_eq!(
        dead["dead_letters"][0]["last_error"],
        "the EHR refused the update"
    );

    let out = run(fhirgate()
        .args(["outbox", "replay", &id])
        .env("FHIRGATE_DATABASE_URL", app.database_url.expose()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        ids(&applied(&ehr.sim, &claim, 1).await),
        std::slice::from_ref(&id)
    );
    let out = run(fhirgate()
        .args(["outbox", "replay", &id])
        .env("FHIRGATE_DATABASE_URL", app.database_url.expose()));
    assert_eq!(out.status.code(), Some(2), "nothing left to replay");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no dead letter"));
}

/// Issue 7's whole flow: a session is prepared into a claim (the EHR hears nothing yet), the
/// claim is submitted (the EHR hears `queued`), the payer's ClaimResponse arrives through FHIR
/// (complete, with a payment: the claim becomes accepted, then paid, and the EHR hears
/// `complete`), and the paid claim's lifecycle is final.
#[tokio::test]
async fn a_prepared_claim_is_submitted_answered_and_its_status_reaches_the_ehr() {
    let app = spawn_app_with(&fast_outbox()).await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let ehr = connect_ehr(app.store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-flow").await;
    let practitioner = gw
        .create(json!({
            "resourceType": "Practitioner",
            "identifier": [{ "system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893" }]
        }))
        .await;
    let yesterday = (time::OffsetDateTime::now_utc().date() - time::Duration::days(1)).to_string();
    let res = gw
        .post(
            "/api/v1/claims/prepare",
            &json!({
                "patient_id": p.id,
                "therapist_id": practitioner,
                "session_date": yesterday,
                "cpt_code": "90834",
                "icd10_code": "F43.10",
                "fee": "150.00",
                "payer_id": "BCBS",
                "member_id": "XQB812345678"
            }),
        )
        .await;
    let code = res.status();
    let body: Value = res.json().await.unwrap();
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["status"], "prepared");
    let claim = body["claim_id"].as_str().unwrap().to_owned();
    drained(&*app.store).await;
    assert!(
        ehr.sim.claim_updates(&claim).is_empty(),
        "prepared: the EHR hears nothing"
    );

    assert!(gw.change(&claim, "submitted").await.is_some());
    let updates = applied(&ehr.sim, &claim, 1).await;
    assert_eq!(outcomes(&updates), ["queued"]);

    gw.create(json!({
        "resourceType": "ClaimResponse",
        "status": "active",
        "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional" }] },
        "use": "claim",
        "patient": { "reference": format!("Patient/{}", p.id) },
        "created": "2026-11-21",
        "insurer": { "reference": format!("Organization/{}", p.payer) },
        "request": { "reference": format!("Claim/{claim}") },
        "outcome": "complete",
        "disposition": "Paid as billed",
        "payment": {
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/ex-paymenttype", "code": "complete" }] },
            "amount": { "value": 124.50, "currency": "USD" }
        }
    }))
    .await;
    let updates = applied(&ehr.sim, &claim, 2).await;
    assert_eq!(outcomes(&updates), ["queued", "complete"]);
    assert_eq!(updates[1].disposition.as_deref(), Some("Paid as billed"));
    let res = gw.get(&format!("/api/v1/claims/{claim}/status")).await;
    let state: Value = res.json().await.unwrap();
    assert_eq!(state["status"], "paid", "{state}");
    assert_eq!(state["version"], 4, "prepared, submitted, accepted, paid");
    assert_eq!(gw.set_status(&claim, "denied").await.status(), 409);

    // The trail: the claim's creation and each of its three moves, each naming the patient.
    let (events, _) = app
        .store
        .search_audit(&fhirgate::store::AuditQuery {
            practice: gw.practice.clone(),
            since: None,
            until: None,
            patient: Some(p.id.clone()),
            agent: None,
            actions: Some("create,update".into()),
            after_seq: 0,
            limit: 500,
        })
        .await
        .unwrap();
    let of_claim: Vec<&str> = events
        .iter()
        .filter(|e| e.resource_id.as_deref() == Some(claim.as_str()))
        .map(|e| e.action.as_str())
        .collect();
    assert_eq!(of_claim, ["create", "update", "update", "update"]);
}

/// What a queued or dead-lettered update carries (the ids at the EHR, the disposition text) is
/// sealed at rest: scanning everything SQLite wrote finds none of it in clear.
#[tokio::test]
async fn an_update_waiting_or_dead_is_ciphertext_at_rest() {
    if crate::helpers::backend() != fhirgate::store::Backend::Sqlite {
        return; // The scan reads SQLite's files; PostgreSQL's row scan is in patient.rs.
    }
    let app = spawn_app_with(&fast_outbox()).await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let ehr = connect_ehr(app.store.clone(), &gw.practice).await;
    let p = pulled_patient(&gw, &ehr.connection, "ehr-pat-Zyxwvutsrq").await;
    let claim = new_claim(&gw, &p, Some((&ehr.connection, "ehr-claim-Qponmlkjih"))).await;
    gw.change(&claim, "prepared").await;
    ehr.sim.controls().set_failure_rate(1.0);
    let res = gw
        .post(
            &format!("/api/v1/claims/{claim}/status"),
            &json!({ "status": "submitted", "disposition": "Sent for Ada Quillfeather Vwxyzabcde" }),
        )
        .await;
    assert_eq!(res.status(), 200);
    drained(&*app.store).await;
    let res = gw.get("/api/v1/dead-letters").await;
    let page: Value = res.json().await.unwrap();
    assert_eq!(page["dead_letters"].as_array().unwrap().len(), 1);

    let bytes = crate::helpers::sqlite_bytes(&app);
    for secret in [
        "ehr-pat-Zyxwvutsrq",
        "ehr-claim-Qponmlkjih",
        "Vwxyzabcde",
        "Quillfeather",
    ] {
        assert!(
            !crate::helpers::contains(&bytes, secret),
            "{secret} in clear"
        );
    }
}
