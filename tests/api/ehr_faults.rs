//! EHR faults driven through the real jobs, as a practice and an operator see them: nightly
//! pulls (`PullJobs`, what the scheduler and `fhirgate sync run` call), webhook-triggered
//! fetches (the inbox worker) and claim-status pushes (the outbox dispatcher), against the EHR
//! simulator's fault knobs. For each fault: the run's recorded status and error (a fixed phrase,
//! no PHI), how many requests reached the EHR (the simulator's counters, or the audit trail of
//! outbound calls when a request timed out), the circuit breaker (requests stop reaching a
//! failing EHR, fail fast, and resume after), `Retry-After` honoured, malformed pages and
//! wrong-type records (run failed clearly after its committed pages; records quarantined with
//! their reason while the rest of their page lands), a 5 s slow EHR (under the 30 s request
//! timeout: the run completes; over a 1 s timeout: each try stops at the timeout), and the
//! gateway serving other requests throughout.
//!
//! The adapter's tunables are per connection (`adapters/src/client/settings.rs`:
//! `max_attempts`, `retry_base_ms`, `request_timeout_ms`, `breaker_failures`,
//! `breaker_cooldown_ms`, `retry_after_cap_s`); each test sets the few it is about so a fault
//! plays out in seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirgate::crypto::{Keyring, PhiKeys};
use fhirgate::domain::ResourceId;
use fhirgate::gate::Role;
use fhirgate::store::{InboxEntry, JobRun, Store};
use fhirgate::sync::webhooks::notification::{sign, signing_key};
use fhirgate::sync::{Connections, PullJobs, StartedBy, SyncSettings};
use fhirgate_ehr_sim::{Malformed, Personality, SimConfig, Simulator};
use serde_json::{json, Map, Value};

use crate::auth::session;
use crate::claim_push::{prepared_claim, Gateway};
use crate::helpers::{spawn_app_with, TestApp};

fn master_key() -> String {
    format!("test1:{}", "7c".repeat(32))
}

/// A Standard Webhooks secret (`whsec_` + base64 of 24 bytes).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

const SCOPES: &str = "system/Patient.rs system/Coverage.rs";

/// A gateway whose scheduler is off (the tests run pulls themselves), with quick webhook and
/// outbox retries (their own backoff is not what these tests are about; `Retry-After` is).
async fn gateway(extra: &str) -> TestApp {
    spawn_app_with(&format!(
        "master_key = '{}'\n[sync]\nscheduler = false\ncoverage = false\n\
         [webhooks]\npoll_interval_ms = 100\nretry_base_ms = 50\nmax_attempts = 20\nlease_secs = 30\n\
         [outbox]\nretry_base_ms = 50\nretry_max_ms = 400\nmax_attempts = 30\npoll_interval_ms = 50\n{extra}",
        master_key()
    ))
    .await
}

fn connections(store: &Arc<dyn Store>) -> Connections {
    let keyring = Keyring::parse(&master_key()).unwrap();
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().unwrap());
    Connections::new(store.clone(), &keyring, profiles)
}

/// A generic-SMART simulator of `patients` patients and a connection of `practice` to it
/// (pages of 20, webhook secret [`SECRET`]), with the adapter `settings` given.
async fn connect(
    store: &Arc<dyn Store>,
    practice: &ResourceId,
    patients: usize,
    settings: Value,
) -> (Simulator, String) {
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = patients;
    let sim = Simulator::start(config).unwrap();
    let mut spec = fhirgate::cli::sandbox_spec(&sim, practice).unwrap();
    spec.settings.insert("page_size".into(), json!(20));
    let settings: Map<String, Value> = settings.as_object().cloned().unwrap_or_default();
    spec.settings.extend(settings);
    spec.webhook_secret = Some(SECRET.into());
    let id = connections(store).add(spec).await.unwrap().id;
    (sim, id)
}

/// Pull jobs as the scheduler runs them (one adapter per connection, shared by every run, so
/// its circuit breaker outlives a run).
async fn jobs(store: &Arc<dyn Store>) -> PullJobs {
    let keys = PhiKeys::new(&Keyring::parse(&master_key()).unwrap());
    let vault = fhirgate::startup::open_vault(&**store, &keys)
        .await
        .unwrap();
    let (log, _writer) = fhirgate::audit::AuditLog::start(store.clone());
    let settings = SyncSettings {
        coverage: false,
        lease_secs: 30,
        ..SyncSettings::default()
    };
    PullJobs::new(store.clone(), connections(store), log, vault, &settings)
}

/// Runs one pull of `connection` to its end (it never finds another running).
async fn pull(jobs: &PullJobs, connection: &str) -> JobRun {
    jobs.run(connection, StartedBy::Manual, None, None)
        .await
        .unwrap()
        .expect("no other run of the connection is running")
}

/// FHIR calls the simulator received so far (token requests not included).
fn requests(sim: &Simulator) -> u64 {
    sim.controls().counters().fhir_requests
}

/// A practice administrator's session and its practice.
struct Admin {
    token: String,
    practice: ResourceId,
}

async fn admin(app: &TestApp) -> Admin {
    let s = session(app, SCOPES, Role::PracticeAdmin).await;
    Admin {
        token: s.token,
        practice: ResourceId::parse("practice", s.practice_id.as_str()).unwrap(),
    }
}

async fn get_json(app: &TestApp, token: &str, path: &str) -> (u16, Value) {
    let res = app
        .client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// The run as `/api/v1/jobs/{id}` shows it to the practice's administrator.
async fn job_api(app: &TestApp, admin: &Admin, run: &JobRun) -> Value {
    let (status, body) = get_json(app, &admin.token, &format!("/api/v1/jobs/{}", run.id)).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The EHR ids of the practice's Patients pulled from `connection`, sorted (each once: a
/// duplicate would show twice).
async fn pulled(app: &TestApp, admin: &Admin, connection: &str) -> Vec<String> {
    let (status, bundle) = get_json(app, &admin.token, "/fhir/r4/Patient?_count=1000").await;
    assert_eq!(status, 200, "{bundle}");
    let system = format!("urn:fhirgate:connection:{connection}");
    let mut ids: Vec<String> = bundle["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .flat_map(|e| e["resource"]["identifier"].as_array().cloned())
        .flatten()
        .filter(|i| i["system"] == system.as_str())
        .filter_map(|i| i["value"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// The gateway answers its operations and FHIR endpoints as usual.
async fn still_serving(app: &TestApp, admin: &Admin) {
    assert_eq!(app.get("/readyz").await.status(), 200);
    let (status, body) = get_json(app, &admin.token, "/fhir/r4/Patient?_count=1").await;
    assert_eq!(status, 200, "{body}");
}

/// Neither the family name nor the EHR id of any simulated patient appears in `text`.
fn assert_no_phi(sim: &Simulator, text: &str) {
    for id in sim.patient_ids() {
        assert!(!text.contains(&id), "an EHR patient id in: {text}");
        let family = sim.patient(&id).unwrap()["name"][0]["family"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(!text.contains(&family), "a patient's name in: {text}");
    }
}

/// The outbound calls of `action` (`ehr-search`, `ehr-read`...) the audit trail recorded for
/// `connection`, as (HTTP status, 0 when no response came).
async fn outbound_calls(
    app: &TestApp,
    practice: &ResourceId,
    connection: &str,
    action: &str,
) -> Vec<i64> {
    app.store
        .audit_chain_page(practice.as_str(), 0, 100_000)
        .await
        .unwrap()
        .iter()
        .filter(|r| r.action == action && r.connection_id.as_deref() == Some(connection))
        .map(|r| r.status_code)
        .collect()
}

#[tokio::test]
async fn a_failing_ehr_is_retried_within_the_bound_and_a_run_that_gives_up_records_a_clear_error() {
    let app = gateway("").await;
    let admin = admin(&app).await;
    let settings = json!({"max_attempts": 3, "retry_base_ms": 20, "breaker_failures": 1000});
    let (sim, connection) = connect(&app.store, &admin.practice, 45, settings).await;
    let jobs = jobs(&app.store).await;

    // Every try of the first page fails: three requests (the bound), then the run gives up.
    sim.controls().fail_next(3, 500, None);
    let before = requests(&sim);
    let run = pull(&jobs, &connection).await;
    assert_eq!(requests(&sim) - before, 3, "max_attempts = 3");
    assert_eq!(run.status, "failed");
    let error = "EHR: transient failure talking to the EHR: HTTP 500 (transient)";
    assert_eq!(run.error.as_deref(), Some(error));
    let shown = job_api(&app, &admin, &run).await;
    assert_eq!(
        (shown["status"].as_str(), shown["error"].as_str()),
        (Some("failed"), Some(error))
    );
    assert_no_phi(&sim, &shown.to_string());
    assert!(pulled(&app, &admin, &connection).await.is_empty());

    // Two 503s, then the EHR answers: the retries absorb them and the run succeeds.
    sim.controls().fail_next(2, 503, None);
    let before = requests(&sim);
    let run = pull(&jobs, &connection).await;
    assert_eq!(run.status, "succeeded", "{run:?}");
    assert_eq!((run.counts.pages, run.counts.created), (3, 45));
    assert_eq!(
        requests(&sim) - before,
        3 + 2,
        "three pages, two of them retried"
    );

    // Half of all calls fail (seeded, so every run of this test sees the same sequence): each
    // run stays within pages x max_attempts requests and ends succeeded or failed with the
    // same clear error; once the EHR is healthy again, the practice has every patient once.
    sim.controls().touch(45);
    sim.controls().set_failure_rate(0.5);
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        let before = requests(&sim);
        let run = pull(&jobs, &connection).await;
        let sent = requests(&sim) - before;
        assert!(sent <= 3 * 3, "{sent} requests for a pull of 3 pages");
        match run.status.as_str() {
            "succeeded" => assert_eq!(run.error, None),
            "failed" => assert_eq!(run.error.as_deref(), Some(error)),
            other => panic!("a run ended {other}"),
        }
        outcomes.push(run.status);
    }
    assert!(outcomes.iter().any(|s| s == "failed"), "{outcomes:?}");
    sim.controls().set_failure_rate(0.0);
    let run = pull(&jobs, &connection).await;
    assert_eq!(run.status, "succeeded");
    assert_eq!(
        pulled(&app, &admin, &connection).await,
        sorted(sim.patient_ids())
    );
    still_serving(&app, &admin).await;
}

#[tokio::test]
async fn under_sustained_failure_the_circuit_opens_runs_fail_fast_and_it_closes_once_the_ehr_recovers(
) {
    let app = gateway("").await;
    let admin = admin(&app).await;
    let cooldown = Duration::from_millis(3000);
    let settings = json!({"max_attempts": 2, "retry_base_ms": 20, "breaker_failures": 3,
        "breaker_cooldown_ms": cooldown.as_millis() as u64});
    let (sim, connection) = connect(&app.store, &admin.practice, 30, settings).await;
    let jobs = jobs(&app.store).await;
    sim.controls().set_failure_rate(1.0);

    // Two failures (one run's two tries), then a third: the circuit opens, and that run's
    // retry fails fast.
    let before = requests(&sim);
    let first = pull(&jobs, &connection).await;
    assert_eq!(
        first.error.as_deref(),
        Some("EHR: transient failure talking to the EHR: HTTP 500 (transient)")
    );
    assert_eq!(requests(&sim) - before, 2);
    let opened_at = Instant::now();
    let second = pull(&jobs, &connection).await;
    assert_eq!(
        requests(&sim) - before,
        3,
        "the retry did not reach the EHR"
    );
    let open = "EHR: transient failure talking to the EHR: circuit open";
    assert_eq!(second.error.as_deref(), Some(open));

    // While it is open, runs fail at once, and nothing reaches the EHR.
    let mut fast = Vec::new();
    for _ in 0..3 {
        let run = pull(&jobs, &connection).await;
        fast.push(run);
    }
    let elapsed = opened_at.elapsed();
    if elapsed < cooldown {
        assert_eq!(
            requests(&sim) - before,
            3,
            "requests reached an open circuit"
        );
        for run in &fast {
            assert_eq!(run.status, "failed");
            assert_eq!(run.error.as_deref(), Some(open));
            assert_no_phi(&sim, &job_api(&app, &admin, run).await.to_string());
        }
    } else {
        // A machine so loaded that three runs outlasted the cooldown: at most one probe each
        // cooldown went through.
        let probes = (elapsed.as_millis() / cooldown.as_millis()) as u64;
        assert!(requests(&sim) - before <= 3 + probes, "{elapsed:?}");
    }
    // The gateway itself is unaffected.
    still_serving(&app, &admin).await;
    let calls = outbound_calls(&app, &admin.practice, &connection, "ehr-search").await;
    assert!(
        calls.iter().filter(|s| **s == 0).count() >= 2,
        "the refused calls are audited without a status: {calls:?}"
    );

    // The EHR recovers; after the cooldown one probe closes the circuit and the run succeeds.
    sim.controls().set_failure_rate(0.0);
    tokio::time::sleep(cooldown.saturating_sub(opened_at.elapsed()) + Duration::from_millis(300))
        .await;
    let before = requests(&sim);
    let run = pull(&jobs, &connection).await;
    assert_eq!(run.status, "succeeded", "{run:?}");
    assert_eq!(run.counts.created, 30);
    assert_eq!(requests(&sim) - before, 2, "two pages");
    // Closed: the next run reaches the EHR again (one page of nothing new).
    let before = requests(&sim);
    let run = pull(&jobs, &connection).await;
    assert_eq!((run.status.as_str(), run.counts.created), ("succeeded", 0));
    assert_eq!(requests(&sim) - before, 1);
}

#[tokio::test]
async fn a_pull_waits_out_a_429s_retry_after_and_fails_at_once_on_one_longer_than_its_cap() {
    let app = gateway("").await;
    let admin = admin(&app).await;
    let settings = json!({"max_attempts": 3, "retry_base_ms": 20, "retry_after_cap_s": 5,
        "breaker_failures": 1000});
    let (sim, connection) = connect(&app.store, &admin.practice, 30, settings).await;
    let jobs = jobs(&app.store).await;

    // One 429 with Retry-After: 2: the pull waits two seconds, asks again, and succeeds.
    sim.controls().throttle_next(1, 2);
    let before = requests(&sim);
    let started = Instant::now();
    let run = pull(&jobs, &connection).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "Retry-After not honoured"
    );
    assert_eq!(run.status, "succeeded", "{run:?}");
    assert_eq!(run.counts.created, 30);
    assert_eq!(requests(&sim) - before, 2 + 1, "two pages, one asked twice");

    // 429s that do not stop: every try waits its second, three tries, then a clear error.
    sim.controls().touch(5);
    sim.controls().throttle_next(10, 1);
    let before = requests(&sim);
    let started = Instant::now();
    let run = pull(&jobs, &connection).await;
    assert!(started.elapsed() >= Duration::from_secs(2), "not hammered");
    assert_eq!(requests(&sim) - before, 3);
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some("EHR: rate limited by the EHR; retry after 1 s")
    );

    // Retry-After: 600 is past the connection's cap of 5 s: the run does not sit waiting, it
    // fails at once saying so, and the EHR is asked once.
    sim.controls().throttle_next(1, 600);
    let before = requests(&sim);
    let run = pull(&jobs, &connection).await;
    assert_eq!(requests(&sim) - before, 1);
    assert_eq!(
        run.error.as_deref(),
        Some("EHR: rate limited by the EHR; retry after 600 s")
    );
    assert_no_phi(&sim, &job_api(&app, &admin, &run).await.to_string());
    still_serving(&app, &admin).await;

    // The EHR calmed down: the touched patients arrive.
    let run = pull(&jobs, &connection).await;
    assert_eq!((run.status.as_str(), run.counts.updated), ("succeeded", 5));
}

#[tokio::test]
async fn a_malformed_page_fails_the_run_clearly_after_its_committed_pages_and_the_next_run_completes(
) {
    let app = gateway("").await;
    let admin = admin(&app).await;
    let settings = json!({"max_attempts": 3, "retry_base_ms": 20, "breaker_failures": 1000});
    let (sim, connection) = connect(&app.store, &admin.practice, 70, settings).await;
    let jobs = jobs(&app.store).await;

    // Pages 1 and 2 commit; page 3 arrives cut off halfway. Not retried (the same request
    // would get the same answer), the run fails saying what was wrong.
    let controls = sim.controls();
    let mut after_page = move |counts: &fhirgate::store::RunCounts| {
        if counts.pages == 2 {
            controls.malformed_next(1, Malformed::Truncated);
        }
    };
    let before = requests(&sim);
    let run = jobs
        .run(&connection, StartedBy::Manual, None, Some(&mut after_page))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some("EHR: permanent failure talking to the EHR: the EHR sent malformed JSON")
    );
    assert_eq!((run.counts.pages, run.counts.created), (2, 40));
    assert_eq!(
        requests(&sim) - before,
        3,
        "the malformed page is asked once"
    );
    assert!(
        run.checkpoint.is_some(),
        "the committed pages are checkpointed"
    );
    assert_eq!(pulled(&app, &admin, &connection).await.len(), 40);
    assert_no_phi(&sim, &job_api(&app, &admin, &run).await.to_string());

    // A first page whose Bundle is not a Bundle: failed, nothing new written.
    sim.controls()
        .malformed_next(1, Malformed::WrongResourceType);
    let run = pull(&jobs, &connection).await;
    assert_eq!(
        run.error.as_deref(),
        Some("EHR: permanent failure talking to the EHR: a search page is not a Bundle")
    );
    assert_eq!(run.counts.created, 0);
    still_serving(&app, &admin).await;

    // The EHR answers properly again: the next run completes; every patient is there once.
    let run = pull(&jobs, &connection).await;
    assert_eq!(run.status, "succeeded", "{run:?}");
    assert_eq!((run.counts.created, run.counts.failed), (30, 0));
    assert_eq!(
        pulled(&app, &admin, &connection).await,
        sorted(sim.patient_ids())
    );
}

#[tokio::test]
async fn a_record_of_the_wrong_type_is_quarantined_with_its_reason_and_the_rest_of_its_page_lands()
{
    let app = gateway("").await;
    let admin = admin(&app).await;
    let (sim, connection) = connect(&app.store, &admin.practice, 30, json!({})).await;
    let jobs = jobs(&app.store).await;
    // The EHR lists its first patient as an Observation (same id) among the Patients.
    let odd = sim.patient_ids()[0].clone();
    sim.controls().malformed_next(1, Malformed::WrongEntryType);
    let run = pull(&jobs, &connection).await;
    assert_eq!(run.status, "succeeded", "{run:?}");
    assert_eq!(
        (run.counts.received, run.counts.created, run.counts.failed),
        (30, 29, 1)
    );
    let landed = pulled(&app, &admin, &connection).await;
    let mut expected: Vec<String> = sim
        .patient_ids()
        .into_iter()
        .filter(|i| *i != odd)
        .collect();
    expected.sort();
    assert_eq!(
        landed, expected,
        "the 19 others of its page and the next page landed"
    );

    let (status, listing) = get_json(&app, &admin.token, "/api/v1/quarantine").await;
    assert_eq!(status, 200);
    let records = listing["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{listing}");
    assert_eq!(records[0]["resource_type"], "Patient");
    assert_eq!(records[0]["reason"], "not of the resource type asked for");
    assert_eq!(records[0]["run_id"], run.id.as_str());
    assert_eq!(records[0]["connection_id"], connection.as_str());
    assert_no_phi(&sim, &listing.to_string());

    // Fixed at the EHR (an edit gives it a new version): the next pull admits it and the
    // quarantine empties.
    assert!(sim.controls().edit_patient(&odd, |_| {}));
    let run = pull(&jobs, &connection).await;
    assert_eq!((run.counts.created, run.counts.failed), (1, 0), "{run:?}");
    assert_eq!(
        pulled(&app, &admin, &connection).await,
        sorted(sim.patient_ids())
    );
    let (_, listing) = get_json(&app, &admin.token, "/api/v1/quarantine").await;
    assert_eq!(listing["records"], json!([]));
}

#[tokio::test]
async fn a_5_s_slow_ehr_under_the_request_timeout_completes_the_run_while_the_gateway_keeps_serving(
) {
    let app = gateway("").await;
    let admin = admin(&app).await;
    // The default request timeout (30 s) is over the EHR's 5 s.
    let (sim, connection) = connect(&app.store, &admin.practice, 10, json!({})).await;
    let jobs = jobs(&app.store).await;
    sim.controls().set_latency(Duration::from_secs(5));
    let started = Instant::now();
    let running = {
        let (jobs, connection) = (jobs.clone(), connection.clone());
        tokio::spawn(async move { pull(&jobs, &connection).await })
    };
    // Meanwhile the gateway answers others as usual.
    tokio::time::sleep(Duration::from_millis(500)).await;
    still_serving(&app, &admin).await;
    assert!(
        !running.is_finished(),
        "the pull was still waiting for the EHR"
    );
    let run = running.await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "the EHR was slow"
    );
    assert_eq!(run.status, "succeeded", "{run:?}");
    assert_eq!(run.counts.created, 10);
    assert_eq!(
        pulled(&app, &admin, &connection).await,
        sorted(sim.patient_ids())
    );
}

#[tokio::test]
async fn a_5_s_slow_ehr_over_a_1_s_request_timeout_stops_each_try_at_the_timeout_within_the_bound()
{
    let app = gateway("").await;
    let admin = admin(&app).await;
    let settings = json!({"request_timeout_ms": 1000, "max_attempts": 2, "retry_base_ms": 20,
        "breaker_failures": 1000});
    let (sim, connection) = connect(&app.store, &admin.practice, 10, settings).await;
    let jobs = jobs(&app.store).await;
    // A first pull while the EHR is quick (its access token is cached from it).
    assert_eq!(pull(&jobs, &connection).await.status, "succeeded");
    let searches = outbound_calls(&app, &admin.practice, &connection, "ehr-search")
        .await
        .len();

    sim.controls().touch(3);
    sim.controls().set_latency(Duration::from_secs(5));
    let started = Instant::now();
    let run = pull(&jobs, &connection).await;
    let took = started.elapsed();
    assert_eq!(run.status, "failed");
    assert_eq!(
        run.error.as_deref(),
        Some("EHR: transient failure talking to the EHR: timed out")
    );
    // Two tries (max_attempts), each given up after 1 s without an answer, as the audit trail
    // of outbound calls records them (the EHR itself never finished answering).
    let calls = outbound_calls(&app, &admin.practice, &connection, "ehr-search").await;
    assert_eq!(calls[searches..], [0, 0], "{calls:?}");
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert!(
        took < Duration::from_secs(10),
        "the run waited for the EHR's 5 s answers: {took:?}"
    );
    still_serving(&app, &admin).await;

    // The EHR is quick again: the three changed patients arrive.
    sim.controls().set_latency(Duration::ZERO);
    let run = pull(&jobs, &connection).await;
    assert_eq!((run.status.as_str(), run.counts.updated), ("succeeded", 3));
}

/// POSTs a signed `patient.changed` event for `patient_id` to the connection's webhook.
async fn post_event(app: &TestApp, connection: &str, event_id: &str, patient_id: &str) -> u16 {
    let body = json!({"type": "patient.changed", "patient_id": patient_id}).to_string();
    let key = signing_key(SECRET).unwrap();
    let ts = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
    let res = app
        .client
        .post(app.url(&format!("/webhooks/{connection}")))
        .header("content-type", "application/json")
        .header("webhook-id", event_id)
        .header("webhook-timestamp", &ts)
        .header(
            "webhook-signature",
            sign(&key, event_id, &ts, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    res.status().as_u16()
}

async fn inbox(app: &TestApp, connection: &str) -> Vec<InboxEntry> {
    app.store
        .inbox()
        .list_events(Some(connection), None, 1000)
        .await
        .unwrap()
}

/// Waits (bounded) until the connection has `n` rows, none pending, and returns them.
async fn settled(app: &TestApp, connection: &str, n: usize) -> Vec<InboxEntry> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = inbox(app, connection).await;
        if rows.len() >= n && rows.iter().all(|r| r.status != "pending") {
            return rows;
        }
        assert!(Instant::now() < deadline, "inbox did not settle: {rows:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_webhook_fetch_waits_out_a_429s_retry_after_and_a_malformed_or_wrong_type_answer_is_dead_with_its_reason(
) {
    let app = gateway("").await;
    let admin = admin(&app).await;
    // The adapter tries once: every failure is the inbox worker's to handle.
    let settings = json!({"max_attempts": 1, "breaker_failures": 1000});
    let (sim, connection) = connect(&app.store, &admin.practice, 5, settings).await;
    let ids = sim.patient_ids();

    // What one event costs the EHR when all goes well (the read; coverage is off here).
    let before = requests(&sim);
    assert_eq!(post_event(&app, &connection, "evt-0", &ids[0]).await, 202);
    settled(&app, &connection, 1).await;
    let one = requests(&sim) - before;

    // A 429 with Retry-After: 2, although the inbox's own first retry would come after 50 ms.
    sim.controls().throttle_next(1, 2);
    let before = requests(&sim);
    let posted = Instant::now();
    assert_eq!(post_event(&app, &connection, "evt-1", &ids[1]).await, 202);
    let rows = settled(&app, &connection, 2).await;
    let row = rows
        .iter()
        .find(|r| r.status != "done" || r.attempts > 1)
        .unwrap();
    assert_eq!(
        (row.status.as_str(), row.attempts),
        ("done", 2),
        "{rows:#?}"
    );
    let waited = Duration::from_micros((row.finished_us.unwrap() - row.received_us) as u64);
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    assert!(posted.elapsed() >= Duration::from_secs(2));
    assert_eq!(
        requests(&sim) - before,
        one + 1,
        "asked once more, not hammered"
    );

    // The read comes back cut off, or as another resource type: retrying would not help, the
    // event is dead with a reason saying so (not "refused": the EHR answered).
    let unusable = "the EHR's answer could not be used (malformed, or not the resource asked for)";
    for (n, kind) in [(2, Malformed::Truncated), (3, Malformed::WrongEntryType)] {
        sim.controls().malformed_next(1, kind);
        let event = format!("evt-{n}");
        assert_eq!(post_event(&app, &connection, &event, &ids[n]).await, 202);
        let rows = settled(&app, &connection, n + 1).await;
        let dead: Vec<&InboxEntry> = rows.iter().filter(|r| r.status == "dead").collect();
        assert_eq!(dead.len(), n - 1, "{rows:#?}");
        assert!(dead
            .iter()
            .all(|r| r.last_error.as_deref() == Some(unusable)));
        assert!(dead.iter().all(|r| r.has_payload), "kept for a retry");
    }
    let listed = serde_json::to_string(&inbox(&app, &connection).await).unwrap();
    assert_no_phi(&sim, &listed);
    // The worker goes on: the next event is done, the patients of the dead ones are absent.
    assert_eq!(post_event(&app, &connection, "evt-4", &ids[4]).await, 202);
    let rows = settled(&app, &connection, 5).await;
    assert_eq!(rows.iter().filter(|r| r.status == "done").count(), 3);
    let landed = pulled(&app, &admin, &connection).await;
    assert_eq!(
        landed,
        sorted(vec![ids[0].clone(), ids[1].clone(), ids[4].clone()])
    );
    still_serving(&app, &admin).await;
}

/// Waits (bounded) until the simulator applied `n` updates to `claim`.
async fn applied(sim: &Simulator, claim: &str, n: usize) -> Vec<fhirgate_ehr_sim::ClaimUpdate> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let updates = sim.claim_updates(claim);
        if updates.len() >= n {
            return updates;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} updates",
            updates.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_claim_push_answered_429_waits_out_its_retry_after_and_is_applied_once() {
    let app = gateway("").await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let settings = json!({"max_attempts": 1, "breaker_failures": 1000});
    let (sim, connection) = connect(&app.store, &gw.practice, 3, settings).await;
    let claim = prepared_claim(&gw, &connection, "ehr-pat-1").await;

    // The outbox's own next retry would come within 50 ms; the EHR asked for 2 s.
    sim.controls().throttle_next(1, 2);
    let before = requests(&sim);
    let changed = time::OffsetDateTime::now_utc();
    let update = gw.change(&claim, "submitted").await.unwrap();
    let updates = applied(&sim, &claim, 1).await;
    assert_eq!(updates[0].update_id.as_deref(), Some(update.as_str()));
    assert!(
        updates[0].applied_at - changed >= time::Duration::seconds(2),
        "applied {} after the change",
        updates[0].applied_at - changed
    );
    assert_eq!(
        requests(&sim) - before,
        2,
        "the 429, then the update: not hammered"
    );
    assert_eq!(sim.controls().counters().claim_updates_applied, 1);
    let (_, dead) = get_json(&app, &gw.token, "/api/v1/dead-letters").await;
    assert_eq!(dead["dead_letters"], json!([]));
}

#[tokio::test]
async fn a_failing_ehr_opens_the_circuit_for_the_gateways_webhook_worker_and_dispatcher_and_both_deliver_after(
) {
    let app = gateway("").await;
    let gw = Gateway::of(&app, Role::Billing).await;
    let cooldown = Duration::from_millis(1500);
    let settings = json!({"max_attempts": 1, "breaker_failures": 2,
        "breaker_cooldown_ms": cooldown.as_millis() as u64});
    let (sim, connection) = connect(&app.store, &gw.practice, 5, settings).await;
    let claim = prepared_claim(&gw, &connection, "ehr-pat-1").await;
    let ids = sim.patient_ids();

    // The EHR fails every call. Three patient events and a claim submission keep the inbox
    // worker and the outbox dispatcher retrying (quickly: 50 ms, doubling) for a few seconds.
    sim.controls().set_failure_rate(1.0);
    let before = requests(&sim);
    let failing_since = Instant::now();
    for (n, id) in ids.iter().take(3).enumerate() {
        assert_eq!(
            post_event(&app, &connection, &format!("evt-{n}"), id).await,
            202
        );
    }
    let update = gw.change(&claim, "submitted").await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let window = failing_since.elapsed();
    let reached = requests(&sim) - before;
    let attempts: i64 = inbox(&app, &connection)
        .await
        .iter()
        .map(|r| r.attempts)
        .sum();
    // Calls already under way when the circuit opens still arrive (at most one per event and
    // one for the update: the first tries, all at once), then two failures have opened it and
    // only one probe per cooldown gets through, whatever the number of tries the workers make.
    let at_once = 3 + 1;
    let probes = (window.as_millis() / cooldown.as_millis()) as u64 + 1;
    assert!(
        reached <= at_once + probes,
        "{reached} requests reached the EHR in {window:?}"
    );
    assert!(
        attempts > reached as i64,
        "the inbox tried {attempts} times, the EHR saw {reached} requests"
    );
    println!("circuit: {attempts} inbox tries, {reached} EHR requests in {window:?}");
    assert!(inbox(&app, &connection)
        .await
        .iter()
        .all(|r| r.status == "pending"
            && r.last_error.as_deref() == Some("the EHR failed or did not answer")));
    assert!(sim.claim_updates(&claim).is_empty());
    // The gateway itself serves as usual meanwhile.
    assert_eq!(app.get("/readyz").await.status(), 200);
    let res = gw.get(&format!("/api/v1/claims/{claim}/status")).await;
    assert_eq!(res.status(), 200);

    // The EHR recovers: after the cooldown a probe closes the circuit, and both queues drain.
    sim.controls().set_failure_rate(0.0);
    let rows = settled(&app, &connection, 3).await;
    assert!(rows.iter().all(|r| r.status == "done"), "{rows:#?}");
    let updates = applied(&sim, &claim, 1).await;
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].update_id.as_deref(), Some(update.as_str()));
    for id in ids.iter().take(3) {
        let (status, bundle) = get_json(
            &app,
            &gw.token,
            &format!("/fhir/r4/Patient?identifier=urn:fhirgate:connection:{connection}|{id}"),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            bundle["entry"].as_array().map(Vec::len),
            Some(1),
            "{bundle}"
        );
    }
    // Closed again: a new event goes through at its first attempt.
    assert_eq!(post_event(&app, &connection, "evt-3", &ids[3]).await, 202);
    let rows = settled(&app, &connection, 4).await;
    assert!(rows.iter().all(|r| r.status == "done"), "{rows:#?}");
}
