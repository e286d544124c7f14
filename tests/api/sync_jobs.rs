//! Nightly pulls as jobs: recorded runs, checkpoints that survive a killed process, one run per
//! schedule slot across instances, the quarantine, `fhirgate sync` and `/api/v1/jobs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fhirgate::crypto::{Keyring, PhiKeys};
use fhirgate::domain::ResourceId;
use fhirgate::gate::Role;
use fhirgate::store::{JobRun, Store};
use fhirgate::sync::{Connections, PullJobs, StartedBy, SyncSettings};
use fhirgate_ehr_sim::{Personality, SimConfig, Simulator};
use serde_json::{json, Value};

use crate::auth::session;
use crate::binary::{fhirgate, run};
use crate::helpers::{backend, spawn_app_on, spawn_app_with, TestApp};

fn master_key() -> String {
    format!("test1:{}", "5a".repeat(32))
}

/// An app whose scheduler stays off unless `sync` says otherwise.
async fn app_with(sync: &str) -> TestApp {
    spawn_app_with(&format!(
        "master_key = '{}'\n[sync]\n{}",
        master_key(),
        if sync.is_empty() {
            "scheduler = false"
        } else {
            sync
        }
    ))
    .await
}

/// A simulator and a connection of `practice` to it (pages of 20).
async fn connect(
    store: &Arc<dyn Store>,
    practice: &ResourceId,
    patients: usize,
    schedule: Option<&str>,
) -> (Simulator, String) {
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = patients;
    let sim = Simulator::start(config).unwrap();
    let mut spec = fhirgate::cli::sandbox_spec(&sim, practice).unwrap();
    spec.settings.insert("page_size".into(), json!(20));
    spec.schedule = schedule.map(str::to_owned);
    let id = connections(store).add(spec).await.unwrap().id;
    (sim, id)
}

fn connections(store: &Arc<dyn Store>) -> Connections {
    let keyring = Keyring::parse(&master_key()).unwrap();
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().unwrap());
    Connections::new(store.clone(), &keyring, profiles)
}

/// Pull jobs as another instance would run them, on `store`.
async fn jobs(store: &Arc<dyn Store>, settings: &SyncSettings) -> PullJobs {
    let keys = PhiKeys::new(&Keyring::parse(&master_key()).unwrap());
    let vault = fhirgate::startup::open_vault(&**store, &keys)
        .await
        .unwrap();
    let (log, _writer) = fhirgate::audit::AuditLog::start(store.clone());
    PullJobs::new(store.clone(), connections(store), log, vault, settings)
}

fn no_coverage() -> SyncSettings {
    SyncSettings {
        coverage: false,
        lease_secs: 1,
        ..SyncSettings::default()
    }
}

async fn runs(store: &Arc<dyn Store>, connection: &str) -> Vec<JobRun> {
    store
        .jobs()
        .list_runs(None, Some(connection), 100)
        .await
        .unwrap()
}

/// Every Patient of a practice, by its id at the EHR, without what the gateway adds (its id,
/// `meta`, the connection's identifier): what two pulls of the same EHR must agree on.
async fn pulled_patients(app: &TestApp, token: &str) -> BTreeMap<String, Value> {
    let res = app
        .client
        .get(app.url("/fhir/r4/Patient?_count=1000"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let bundle: Value = res.json().await.unwrap();
    let mut out = BTreeMap::new();
    for entry in bundle["entry"].as_array().cloned().unwrap_or_default() {
        let mut patient = entry["resource"].clone();
        let object = patient.as_object_mut().unwrap();
        object.remove("id");
        object.remove("meta");
        let mut ehr_id = None;
        if let Some(Value::Array(ids)) = object.get_mut("identifier") {
            ids.retain(|i| {
                let ours = i["system"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("urn:fhirgate:connection:"));
                if ours {
                    ehr_id = i["value"].as_str().map(str::to_owned);
                }
                !ours
            });
        }
        out.insert(ehr_id.expect("a pulled patient names its EHR id"), patient);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_killed_halfway_resumes_from_its_last_committed_page_and_ends_like_a_clean_one() {
    let app = app_with("").await;
    let scopes = "system/Patient.rs";
    let killed = session(&app, scopes, Role::ExternalSystem).await;
    let clean = session(&app, scopes, Role::ExternalSystem).await;
    let killed_practice = ResourceId::parse("practice", killed.practice_id.as_str()).unwrap();
    let clean_practice = ResourceId::parse("practice", clean.practice_id.as_str()).unwrap();
    let (sim, connection) = connect(&app.store, &killed_practice, 200, None).await;
    // The clean pull reads the same EHR through its own connection.
    let mut spec = fhirgate::cli::sandbox_spec(&sim, &clean_practice).unwrap();
    spec.settings.insert("page_size".into(), json!(20));
    let clean_connection = connections(&app.store).add(spec).await.unwrap().id;
    sim.controls().set_latency(Duration::from_millis(150));

    // "Process" A: its own runtime and database pool, killed mid-pull.
    let process = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = app.database_url.clone();
    let id = connection.clone();
    // How the first attempt ended, should it end before it is killed (it must not).
    let (ended_tx, mut ended) = tokio::sync::oneshot::channel();
    process.spawn(async move {
        let options = fhirgate::store::PoolOptions {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(5),
        };
        let store = fhirgate::store::connect(&url, &options).await.unwrap();
        let jobs = jobs(&store, &no_coverage()).await;
        let outcome = jobs.run(&id, StartedBy::Manual, None, None).await;
        let _ = ended_tx.send(format!("{outcome:?}"));
    });
    // A bounded wait (a loaded CI machine runs many tests beside this one), not a timing goal.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let pages = runs(&app.store, &connection)
            .await
            .first()
            .map_or(0, |r| r.counts.pages);
        if pages >= 3 {
            break;
        }
        if let Ok(outcome) = ended.try_recv() {
            panic!("the first attempt ended after {pages} pages instead of running on: {outcome}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first attempt committed {pages} pages in 90 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    process.shutdown_background();
    let interrupted = runs(&app.store, &connection).await.remove(0);
    assert_eq!(interrupted.status, "running");
    assert!(interrupted.counts.pages < 10, "{interrupted:?}");
    let requests_before = sim.controls().counters();
    sim.controls().set_latency(Duration::ZERO);

    // Instance B, after the lease ran out: the run is taken over and finished.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let b = jobs(&app.store, &no_coverage()).await;
    let resumed = b
        .run(&connection, StartedBy::Manual, None, None)
        .await
        .unwrap()
        .expect("the interrupted run is taken over");
    assert_eq!(resumed.id, interrupted.id);
    assert_eq!(resumed.status, "succeeded", "{resumed:?}");
    assert_eq!(resumed.attempts, 2);
    assert_eq!(resumed.counts.failed, 0);
    // Each of the 200 patients was written once: what the first attempt committed came back
    // unchanged, not as new versions.
    assert_eq!(resumed.counts.created, 200, "{resumed:?}");
    assert_eq!(resumed.counts.updated, 0, "{resumed:?}");
    // It resumed from its checkpoint: far fewer than all 10 pages were asked for again.
    let requests = sim.controls().counters();
    let asked_again = requests.fhir_requests - requests_before.fhir_requests;
    assert!(asked_again < 10, "asked for {asked_again} pages again");

    let clean_run = b
        .run(&clean_connection, StartedBy::Manual, None, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(clean_run.status, "succeeded");
    let resumed_data = pulled_patients(&app, &killed.token).await;
    let clean_data = pulled_patients(&app, &clean.token).await;
    assert_eq!(resumed_data.len(), 200);
    assert_eq!(resumed_data, clean_data);
    // The watermark moved to the EHR's newest change.
    let stored = app
        .store
        .connections()
        .get_connection(&connection)
        .await
        .unwrap();
    assert_eq!(stored.watermark, resumed.checkpoint);
    assert!(stored.watermark.is_some());
}

#[tokio::test]
async fn two_instances_firing_the_same_slot_start_one_run_and_a_slot_never_runs_twice() {
    let app = app_with("").await;
    let s = session(&app, "system/Patient.rs", Role::ExternalSystem).await;
    let practice = ResourceId::parse("practice", s.practice_id.as_str()).unwrap();
    let (_sim, connection) = connect(&app.store, &practice, 30, None).await;
    let a = jobs(&app.store, &no_coverage()).await;
    let b = jobs(&app.store, &no_coverage()).await;
    let slot = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap();
    let (ra, rb) = tokio::join!(
        a.run(&connection, StartedBy::Schedule, Some(slot), None),
        b.run(&connection, StartedBy::Schedule, Some(slot), None),
    );
    let started: Vec<JobRun> = [ra.unwrap(), rb.unwrap()].into_iter().flatten().collect();
    assert_eq!(started.len(), 1, "exactly one instance runs the slot");
    assert_eq!(started[0].status, "succeeded");
    assert_eq!(started[0].counts.created, 30);
    // Late, after the first finished: still the same slot, still not run again.
    let late = b
        .run(&connection, StartedBy::Schedule, Some(slot), None)
        .await
        .unwrap();
    assert!(late.is_none());
    // The next slot runs, and finds nothing new.
    let next = a
        .run(
            &connection,
            StartedBy::Schedule,
            Some(slot + time::Duration::DAY),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.status, "succeeded");
    assert_eq!((next.counts.created, next.counts.updated), (0, 0));
    assert_eq!(runs(&app.store, &connection).await.len(), 2);
}

#[tokio::test]
async fn records_that_do_not_map_are_quarantined_with_the_rule_and_released_once_fixed() {
    // Three seconds: the quarantine row must still be "not stuck" at the first /readyz below,
    // however loaded the machine running the suite is.
    let app = app_with("scheduler = false\nstuck_after_secs = 3").await;
    let admin = session(&app, "system/Patient.rs", Role::PracticeAdmin).await;
    let practice = ResourceId::parse("practice", admin.practice_id.as_str()).unwrap();
    let (sim, connection) = connect(&app.store, &practice, 10, None).await;
    let broken = sim.patient_ids()[3].clone();
    let family = sim.patient(&broken).unwrap()["name"][0]["family"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(sim
        .controls()
        .edit_patient(&broken, |p| p["gender"] = json!("x-vendor-other")));
    let jobs = jobs(&app.store, &no_coverage()).await;
    let run = jobs
        .run(&connection, StartedBy::Manual, None, None)
        .await
        .unwrap()
        .unwrap();
    // The quarantine row was written before the run returned: from here its age only grows.
    let quarantined_by = std::time::Instant::now();
    assert_eq!(run.status, "succeeded");
    assert_eq!((run.counts.created, run.counts.failed), (9, 1));

    let res = app
        .client
        .get(app.url("/api/v1/quarantine"))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains(&family), "the listing shows no PHI");
    assert!(!text.contains(&broken), "nor the EHR's id");
    let body: Value = serde_json::from_str(&text).unwrap();
    let records = body["records"].as_array().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["resource_type"], "Patient");
    assert_eq!(records[0]["run_id"], run.id.as_str());
    let reason = records[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("Patient: not a valid FHIR R4 resource of its type"),
        "{reason}"
    );
    let stats = app.store.jobs().quarantine_stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(
        (stats[0].connection_id.as_str(), stats[0].depth),
        (connection.as_str(), 1)
    );
    if backend() == fhirgate::store::Backend::Sqlite {
        let bytes = crate::helpers::sqlite_bytes(&app);
        assert!(
            !crate::helpers::contains(&bytes, &family),
            "the record is sealed at rest"
        );
    }

    // A stuck queue is never silent: /metrics has its depth and age, /readyz warns (still 200).
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let depth =
        format!(r#"fhirgate_queue_depth{{connection="{connection}",queue="quarantine"}} 1"#);
    assert!(metrics.contains(&depth), "{metrics}");
    assert!(metrics.contains("fhirgate_queue_oldest_age_seconds{"));
    let ready: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["checks"]["queues"], "pass", "not stuck yet: {ready}");
    tokio::time::sleep(Duration::from_millis(3100).saturating_sub(quarantined_by.elapsed())).await;
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 200);
    let ready: Value = res.json().await.unwrap();
    assert_eq!(ready["status"], "warn", "{ready}");
    assert_eq!(ready["stuck_queues"][0]["queue"], "quarantine");
    assert_eq!(
        ready["stuck_queues"][0]["connection_id"],
        connection.as_str()
    );

    // Fixed at the EHR: the next pull admits it and empties the quarantine.
    assert!(sim
        .controls()
        .edit_patient(&broken, |p| p["gender"] = json!("female")));
    let run = jobs
        .run(&connection, StartedBy::Manual, None, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((run.counts.created, run.counts.failed), (1, 0), "{run:?}");
    assert!(app
        .store
        .jobs()
        .quarantine_stats()
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn sync_run_and_status_on_the_command_line_and_the_jobs_api() {
    let app = app_with("").await;
    let admin = session(&app, "system/Patient.rs", Role::PracticeAdmin).await;
    let practice = ResourceId::parse("practice", admin.practice_id.as_str()).unwrap();
    let (_sim, connection) = connect(&app.store, &practice, 25, Some("0 30 3 * * *")).await;
    // The simulator's server runs on this test's runtime: waiting for the child on a blocking
    // thread keeps the runtime turning while the child talks to the simulator.
    let cli = |args: &[&str]| {
        let mut command = fhirgate();
        command
            .args(args)
            .env("FHIRGATE_DATABASE_URL", app.database_url.expose())
            .env("FHIRGATE_MASTER_KEY", master_key())
            .env("FHIRGATE_SYNC__COVERAGE", "false");
        async move {
            tokio::task::spawn_blocking(move || run(&mut command))
                .await
                .unwrap()
        }
    };
    let out = cli(&["sync", "run", "--connection", &connection]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["status"], "succeeded");
    assert_eq!(printed["started_by"], "manual");
    assert_eq!(printed["created"], 25);

    let out = cli(&["sync", "status", "--practice", practice.as_str()]).await;
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["connection_id"], connection.as_str());
    assert_eq!(lines[0]["schedule"], "0 30 3 * * *");
    assert_eq!(lines[0]["last_run"]["id"], printed["id"]);
    assert!(lines[0]["watermark"].is_string());
    assert!(lines[0]["next_run"].as_str().unwrap().contains("T03:30:00"));

    let out = cli(&["sync", "run", "--connection", "no-such-connection"]).await;
    assert_eq!(out.status.code(), Some(2));

    let res = app
        .client
        .get(app.url("/api/v1/jobs"))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["runs"][0]["id"], printed["id"]);
    assert_eq!(body["runs"][0]["created"], 25);
    let one = app
        .client
        .get(app.url(&format!("/api/v1/jobs/{}", printed["id"].as_str().unwrap())))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    // Another practice's administrator sees neither the run nor the listing entry.
    let other = session(&app, "system/Patient.rs", Role::PracticeAdmin).await;
    let res = app
        .client
        .get(app.url(&format!("/api/v1/jobs/{}", printed["id"].as_str().unwrap())))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let body: Value = app
        .client
        .get(app.url("/api/v1/jobs"))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["runs"], json!([]));
    let res = app
        .client
        .get(app.url("/api/v1/jobs?_count=0"))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_fires_each_slot_once_across_two_instances() {
    let sync = "refresh_secs = 1\ncoverage = false";
    let a = app_with(sync).await;
    let s = session(&a, "system/Patient.rs", Role::ExternalSystem).await;
    let practice = ResourceId::parse("practice", s.practice_id.as_str()).unwrap();
    let b = spawn_app_on(
        &a.database_url,
        &format!("master_key = '{}'\n[sync]\n{sync}", master_key()),
    )
    .await
    .unwrap();
    let (_sim, connection) = connect(&a.store, &practice, 5, Some("*/2 * * * * *")).await;
    let mut scheduled = Vec::new();
    for _ in 0..200 {
        scheduled = runs(&a.store, &connection)
            .await
            .into_iter()
            .filter(|r| r.started_by == "schedule" && r.status != "running")
            .collect();
        if scheduled.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(scheduled.len() >= 3, "{scheduled:?}");
    let mut slots: Vec<i64> = scheduled
        .iter()
        .filter_map(|r| r.scheduled_for_us)
        .collect();
    let n = slots.len();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), n, "a slot ran twice");
    assert!(
        slots.iter().all(|s| s % 2_000_000 == 0),
        "slots are the schedule's"
    );
    assert!(
        scheduled.iter().all(|r| r.status == "succeeded"),
        "{scheduled:?}"
    );
    drop(b);
}

#[tokio::test]
async fn a_slot_missed_while_no_instance_ran_runs_once_at_start_up() {
    let a = app_with("").await;
    let s = session(&a, "system/Patient.rs", Role::ExternalSystem).await;
    let practice = ResourceId::parse("practice", s.practice_id.as_str()).unwrap();
    let (_sim, connection) = connect(&a.store, &practice, 5, Some("0 0 * * * *")).await;
    // The connection existed two days ago; nothing ran since.
    backdate(&a, &connection).await;
    let sync = format!(
        "master_key = '{}'\n[sync]\nrefresh_secs = 3600\ncoverage = false",
        master_key()
    );
    let b = spawn_app_on(&a.database_url, &sync).await.unwrap();
    let mut done = Vec::new();
    for _ in 0..100 {
        done = runs(&a.store, &connection).await;
        if done.iter().any(|r| r.status == "succeeded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].started_by, "startup");
    let slot = done[0].scheduled_for_us.unwrap();
    assert_eq!(slot % 3_600_000_000, 0, "the missed slot is on the hour");
    // Another start-up: the slot has run, nothing runs again.
    let c = spawn_app_on(&a.database_url, &sync).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(runs(&a.store, &connection).await.len(), 1);
    drop((b, c));
}

async fn backdate(app: &TestApp, connection: &str) {
    let two_days_ago = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let url = app.database_url.expose();
    if backend() == fhirgate::store::Backend::Sqlite {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query("UPDATE ehr_connections SET created_at = $1 WHERE id = $2")
            .bind(two_days_ago)
            .bind(connection)
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query("UPDATE ehr_connections SET created_at = $1 WHERE id = $2")
            .bind(two_days_ago)
            .bind(connection)
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
}
