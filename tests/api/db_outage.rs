//! The database going away under load, and coming back: requests fail fast with 503 and an
//! OperationOutcome (never hang, never a 500), `/readyz` goes red then green, nothing
//! acknowledged is lost or half-written, and the gateway, its webhook inbox worker, its
//! claim-status dispatcher and its pull scheduler recover by themselves.
//!
//! **How PostgreSQL is "stopped".** The machine's PostgreSQL is shared with other test runs, so
//! it is never stopped. Instead the gateway reaches it through a small TCP proxy ([`PgProxy`],
//! tokio, in this file): "stop" = the proxy stops accepting (its port refuses connections, as
//! a stopped server's does) and resets (RST) every open connection, as a crashed server's
//! connections end; "restart" = it listens on the same port again. Everything the gateway
//! sees of an outage is there: pooled connections die mid-query, new ones are refused, then
//! connect again. What it does not show is a server that shuts down politely (`57P01
//! terminating connection due to administrator command`, `57P03 the database system is
//! starting up`); those SQLSTATEs are mapped to 503 too (`src/store/mod.rs`), and
//! [`a_real_postgres_restart_under_load`] (ignored; run it on a machine of your own) drives
//! the same scenario against a real stop and start.
//!
//! **Under SQLite** (an embedded file: there is no server to stop) the honest equivalent is
//! another process holding the database's write lock for a few seconds (a `sqlite3` shell
//! mid-transaction, a long `fhirgate` CLI command): writes, and reads whose audit event must be
//! written first, wait at most the busy timeout (`database_acquire_timeout_secs`) and answer
//! 503, then the gateway serves again once the lock is gone. Each test says so and does
//! nothing on the other backend.
//!
//! Run: `cargo test --test api db_outage` (SQLite), and with
//! `FHIRGATE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres` for PostgreSQL.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fhirgate::config::DatabaseUrl;
use fhirgate::crypto::Keyring;
use fhirgate::domain::ResourceId;
use fhirgate::gate::Role;
use fhirgate::store::{Backend, Store};
use fhirgate::sync::webhooks::notification::{sign, signing_key};
use fhirgate::sync::Connections;
use fhirgate_ehr_sim::{Personality, SimConfig, Simulator};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::claim_push::{prepared_claim, Gateway};
use crate::helpers::{backend, spawn_app_on, TestApp, TestDb};

fn master_key() -> String {
    format!("test1:{}", "3e".repeat(32))
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The longest any request may take, outage or not: the pool's acquire timeout is 1 s here,
/// and a request waits for it at most a few times (its handler, its audit event).
const BOUND: Duration = Duration::from_secs(15);

/// How long the database stays away.
const OUTAGE: Duration = Duration::from_secs(4);

/// Gateway settings: a 1 s pool acquire timeout (the "fail fast" of the outage: the default is
/// 5 s), no rate limits (the load is one client's), quick worker retries and short leases so the
/// workers' recovery plays out in the test's time, and a scheduler firing every 2 s.
fn settings() -> String {
    format!(
        "master_key = '{}'\ndatabase_acquire_timeout_secs = 1\n\
         [rate_limit]\nenabled = false\n\
         [sync]\nscheduler = true\nrefresh_secs = 1\nlease_secs = 2\ncoverage = false\n\
         [webhooks]\npoll_interval_ms = 100\nretry_base_ms = 50\nmax_attempts = 100\nlease_secs = 2\n\
         [outbox]\nretry_base_ms = 50\nretry_max_ms = 500\nmax_attempts = 100\npoll_interval_ms = 50\n\
         lease_ms = 3000\n",
        master_key()
    )
}

/// A TCP proxy the test can stop (refuse and reset every connection) and restart (on the same
/// port). See the module doc for why.
struct PgProxy {
    port: u16,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl PgProxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = bind(0).await;
        let port = listener.local_addr().unwrap().port();
        let (up, rx) = watch::channel(true);
        let task = tokio::spawn(accept(listener, port, upstream, rx));
        Self { port, up, task }
    }

    /// Refuses new connections and resets the open ones.
    fn stop(&self) {
        self.up.send_replace(false);
    }

    /// Accepts again, on the same port.
    fn restart(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A listener on 127.0.0.1:`port` (0: any), re-binding a port the proxy just left.
async fn bind(port: u16) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        match socket.bind(SocketAddr::from(([127, 0, 0, 1], port))) {
            Ok(()) => return socket.listen(1024).unwrap(),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the proxy cannot re-bind {port}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept(
    first: TcpListener,
    port: u16,
    upstream: SocketAddr,
    mut up: watch::Receiver<bool>,
) {
    let mut listening = Some(first);
    loop {
        match listening.take() {
            Some(listener) => {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((client, _)) = accepted {
                            tokio::spawn(pipe(client, upstream, up.clone()));
                        }
                        listening = Some(listener);
                    }
                    changed = up.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // Stopped: the listener is dropped here, so the port refuses.
                        if *up.borrow_and_update() {
                            listening = Some(listener);
                        }
                    }
                }
            }
            None => {
                if up.wait_for(|u| *u).await.is_err() {
                    return;
                }
                listening = Some(bind(port).await);
            }
        }
    }
}

/// Copies bytes both ways until either side closes or the proxy stops; then resets both
/// sockets (no orderly close: a dead server's connections end this way).
async fn pipe(mut client: TcpStream, upstream: SocketAddr, mut up: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let stopped = async { drop(up.wait_for(|u| !*u).await) };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = stopped => {
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
    }
}

/// One answer the load got.
#[derive(Debug, Clone)]
struct Answer {
    what: &'static str,
    status: u16,
    took: Duration,
    at: Instant,
    /// For a failure: whether it was an OperationOutcome in `application/fhir+json` with a
    /// `transient` issue (what a client is told to retry).
    transient_outcome: bool,
    /// What the request was about: a create's identifier value, a webhook's EHR patient id.
    key: String,
    /// A create's id, from a 201.
    id: Option<String>,
}

type Answers = Arc<Mutex<Vec<Answer>>>;

fn record(answers: &Answers, answer: Answer) {
    answers.lock().unwrap().push(answer);
}

/// Reads what a response says, checking a failure's shape.
async fn answer(
    what: &'static str,
    key: String,
    started: Instant,
    res: reqwest::Response,
) -> Answer {
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    let transient_outcome = content_type.starts_with("application/fhir+json")
        && body["resourceType"] == "OperationOutcome"
        && body["issue"][0]["code"] == "transient";
    Answer {
        what,
        status,
        took: started.elapsed(),
        at: Instant::now(),
        transient_outcome,
        key,
        id: (status == 201).then(|| body["id"].as_str().unwrap_or_default().to_owned()),
    }
}

/// A request that got no answer at all (the client's own 60 s timeout, a reset): recorded as
/// status 0, which fails the test.
fn no_answer(what: &'static str, key: String, started: Instant) -> Answer {
    Answer {
        what,
        status: 0,
        took: started.elapsed(),
        at: Instant::now(),
        transient_outcome: false,
        key,
        id: None,
    }
}

/// What the load runs against.
#[derive(Clone)]
struct Target {
    base: String,
    token: String,
    http: reqwest::Client,
    /// A Patient that exists before the outage.
    seeded: String,
    webhook_connection: String,
    /// EHR patient ids for webhook events, one per event.
    ehr_patients: Arc<Vec<String>>,
}

/// Runs the load until `stop`: two writers creating Patients, a reader reading and searching,
/// one EHR posting webhook events; each pauses 20 ms between requests.
fn start_load(
    target: &Target,
    answers: &Answers,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for writer in 0..2 {
        let (t, answers, stop) = (target.clone(), answers.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !*stop.borrow() {
                n += 1;
                let key = format!("w{writer}-{n}-{}", uuid::Uuid::new_v4().simple());
                let body = json!({
                    "resourceType": "Patient",
                    "identifier": [{ "system": "urn:test:outage", "value": key }],
                    "name": [{ "family": "Outage", "given": [format!("Writer{writer}")] }],
                    "birthDate": "1980-02-03"
                });
                let started = Instant::now();
                let res = t
                    .http
                    .post(format!("{}/fhir/r4/Patient", t.base))
                    .bearer_auth(&t.token)
                    .header("content-type", "application/fhir+json")
                    .body(body.to_string())
                    .send()
                    .await;
                let a = match res {
                    Ok(res) => answer("create", key, started, res).await,
                    Err(_) => no_answer("create", key, started),
                };
                record(&answers, a);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    {
        let (t, answers, stop) = (target.clone(), answers.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !*stop.borrow() {
                n += 1;
                let (what, path) = if n % 2 == 0 {
                    ("read", format!("/fhir/r4/Patient/{}", t.seeded))
                } else {
                    (
                        "search",
                        "/fhir/r4/Patient?identifier=urn:test:seed|seed-1".to_owned(),
                    )
                };
                let started = Instant::now();
                let res = t
                    .http
                    .get(format!("{}{path}", t.base))
                    .bearer_auth(&t.token)
                    .send()
                    .await;
                let a = match res {
                    Ok(res) => answer(what, String::new(), started, res).await,
                    Err(_) => no_answer(what, String::new(), started),
                };
                record(&answers, a);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    {
        let (t, answers, stop) = (target.clone(), answers.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let key = signing_key(SECRET).unwrap();
            for (n, patient) in t.ehr_patients.iter().enumerate() {
                if *stop.borrow() {
                    break;
                }
                let body = json!({"type": "patient.changed", "patient_id": patient}).to_string();
                let event = format!("load-{n}");
                let ts = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
                let started = Instant::now();
                let res = t
                    .http
                    .post(format!("{}/webhooks/{}", t.base, t.webhook_connection))
                    .header("content-type", "application/json")
                    .header("webhook-id", &event)
                    .header("webhook-timestamp", &ts)
                    .header(
                        "webhook-signature",
                        sign(&key, &event, &ts, body.as_bytes()),
                    )
                    .body(body)
                    .send()
                    .await;
                let a = match res {
                    Ok(res) => answer("webhook", patient.clone(), started, res).await,
                    Err(_) => no_answer("webhook", patient.clone(), started),
                };
                record(&answers, a);
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        }));
    }
    tasks
}

/// Polls `/readyz` every 200 ms until `stop`: (when, status).
fn watch_readiness(
    base: String,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<(Instant, u16)>> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut seen = Vec::new();
        while !*stop.borrow() {
            let status = match http.get(format!("{base}/readyz")).send().await {
                Ok(res) => res.status().as_u16(),
                Err(_) => 0,
            };
            seen.push((Instant::now(), status));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        seen
    })
}

/// How the database is taken away and given back.
#[async_trait::async_trait]
trait Outage: Send + Sync {
    async fn begin(&self);
    async fn end(&self);
}

#[async_trait::async_trait]
impl Outage for PgProxy {
    async fn begin(&self) {
        self.stop();
    }
    async fn end(&self) {
        self.restart();
    }
}

/// The practice's set-up before the outage: a seeded Patient, a webhook connection to one EHR,
/// another EHR pulled every 2 s, a slow claims EHR with claim submissions in flight.
struct Scene {
    gw: Gateway,
    hooks_ehr: Simulator,
    hooks: String,
    /// An EHR the scheduler pulls every 2 s (kept running), and its connection.
    _scheduled_ehr: Simulator,
    scheduled: String,
    claims_ehr: Simulator,
    /// (local claim id, the update id its submission queued).
    submissions: Vec<(String, String)>,
    seeded: String,
}

fn connections(store: &Arc<dyn Store>) -> Connections {
    let keyring = Keyring::parse(&master_key()).unwrap();
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().unwrap());
    Connections::new(store.clone(), &keyring, profiles)
}

async fn connect(
    store: &Arc<dyn Store>,
    practice: &ResourceId,
    sim: &Simulator,
    schedule: Option<&str>,
) -> String {
    let mut spec = fhirgate::cli::sandbox_spec(sim, practice).unwrap();
    spec.webhook_secret = Some(SECRET.into());
    spec.schedule = schedule.map(str::to_owned);
    // The adapter tries once and its circuit stays closed: the EHRs are healthy here.
    spec.settings.insert("max_attempts".into(), json!(1));
    spec.settings.insert("breaker_failures".into(), json!(1000));
    connections(store).add(spec).await.unwrap().id
}

async fn set_scene(app: &TestApp) -> Scene {
    let gw = Gateway::of(app, Role::Billing).await;
    let seeded = gw
        .create(json!({
            "resourceType": "Patient",
            "identifier": [{ "system": "urn:test:seed", "value": "seed-1" }],
            "name": [{ "family": "Seed" }]
        }))
        .await;
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = 400;
    let hooks_ehr = Simulator::start(config).unwrap();
    let hooks = connect(&app.store, &gw.practice, &hooks_ehr, None).await;
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = 5;
    let scheduled_ehr = Simulator::start(config).unwrap();
    let scheduled = connect(
        &app.store,
        &gw.practice,
        &scheduled_ehr,
        Some("*/2 * * * * *"),
    )
    .await;
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = 3;
    let claims_ehr = Simulator::start(config).unwrap();
    let claims = connect(&app.store, &gw.practice, &claims_ehr, None).await;
    let mut submissions = Vec::new();
    for n in 0..4 {
        let claim = prepared_claim(&gw, &claims, &format!("ehr-pat-{n}")).await;
        submissions.push((claim, String::new()));
    }
    // The claims EHR answers after 1.5 s: the submissions are in flight when the database
    // goes, so the dispatcher cannot record their delivery and must deliver them again.
    claims_ehr
        .controls()
        .set_latency(Duration::from_millis(1500));
    for (claim, update) in &mut submissions {
        *update = gw.change(claim, "submitted").await.unwrap();
    }
    Scene {
        gw,
        hooks_ehr,
        hooks,
        _scheduled_ehr: scheduled_ehr,
        scheduled,
        claims_ehr,
        submissions,
        seeded,
    }
}

/// Load, outage, recovery, then every check; `expect_unready` says whether `/readyz` must go
/// red during the outage (PostgreSQL down: yes; SQLite locked: the database still answers).
async fn outage_under_load(app: &TestApp, outage: &dyn Outage, expect_unready: bool) {
    let scene = set_scene(app).await;
    let gw = &scene.gw;
    let target = Target {
        base: app.address.clone(),
        token: gw.token.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
        seeded: scene.seeded.clone(),
        webhook_connection: scene.hooks.clone(),
        ehr_patients: Arc::new(scene.hooks_ehr.patient_ids()),
    };
    let answers: Answers = Arc::default();
    let (stop_tx, stop) = watch::channel(false);
    let readiness = watch_readiness(app.address.clone(), stop.clone());
    let load = start_load(&target, &answers, &stop);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let down = Instant::now();
    outage.begin().await;
    tokio::time::sleep(OUTAGE).await;
    let up = Instant::now();
    let restarted_at = time::OffsetDateTime::now_utc();
    outage.end().await;
    // The gateway serves again by itself: wait (bounded) for a create to succeed after the
    // restart, then let the load run a little longer.
    let deadline = up + Duration::from_secs(30);
    loop {
        let served = answers
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.at > up && a.what == "create" && a.status == 201);
        if served {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no create succeeded within 30 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered_in = up.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_tx.send_replace(true);
    for task in load {
        task.await.unwrap();
    }
    let readiness = readiness.await.unwrap();
    let answers = answers.lock().unwrap().clone();

    // Every answer: 2xx, or 503 with an OperationOutcome (never a 500, never no answer), in
    // bounded time.
    let mut by_status: BTreeMap<(&str, u16), usize> = BTreeMap::new();
    for a in &answers {
        *by_status.entry((a.what, a.status)).or_default() += 1;
    }
    let slowest = answers.iter().map(|a| a.took).max().unwrap_or_default();
    println!(
        "db outage ({}): {} requests {by_status:?}; slowest {slowest:?}; served again {recovered_in:?} after the restart",
        backend().as_str(),
        answers.len()
    );
    for a in &answers {
        assert!(
            (200..300).contains(&a.status) || a.status == 503,
            "{} answered {} after {:?}",
            a.what,
            a.status,
            a.took
        );
        if a.status == 503 {
            assert!(
                a.transient_outcome,
                "{} 503 without a transient OperationOutcome",
                a.what
            );
        }
        assert!(a.took <= BOUND, "{} took {:?}", a.what, a.took);
    }
    let during = |a: &&Answer| a.at > down && a.at < up + Duration::from_millis(200);
    assert!(
        answers.iter().filter(during).any(|a| a.status == 503),
        "the outage was not felt"
    );
    assert!(answers.iter().any(|a| a.at < down && a.status == 201));

    // /readyz: red while the database was away, green after.
    let red = readiness
        .iter()
        .any(|(at, s)| *at > down && *at < up + Duration::from_millis(200) && *s == 503);
    if expect_unready {
        assert!(red, "/readyz never went red: {readiness:?}");
    }
    assert!(
        readiness.iter().all(|(_, s)| *s == 200 || *s == 503),
        "{readiness:?}"
    );
    assert_eq!(readiness.last().map(|r| r.1), Some(200), "{readiness:?}");
    assert_eq!(app.get("/readyz").await.status(), 200);

    // Every acknowledged create is there, whole; an unacknowledged one is there whole or not
    // at all.
    let client = &target.http;
    let get = |path: String| async move {
        let res = client
            .get(format!("{}{path}", app.address))
            .bearer_auth(&gw.token)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json::<Value>().await.unwrap_or(Value::Null))
    };
    // One search lists every Patient the load's creates left (whole resources, as a client
    // reads them).
    let (status, stored) =
        get("/fhir/r4/Patient?identifier=urn:test:outage|&_count=1000".to_owned()).await;
    assert_eq!(status, 200);
    let mut stored_by_key: HashMap<String, Vec<Value>> = HashMap::new();
    for entry in stored["entry"].as_array().cloned().unwrap_or_default() {
        let patient = entry["resource"].clone();
        assert_eq!(patient["name"][0]["family"], "Outage", "{patient}");
        let key = patient["identifier"][0]["value"]
            .as_str()
            .unwrap()
            .to_owned();
        stored_by_key.entry(key).or_default().push(patient);
    }
    let mut acknowledged = 0;
    let mut unacknowledged_kept = 0;
    for a in answers.iter().filter(|a| a.what == "create") {
        let found = stored_by_key
            .get(&a.key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(found.len() <= 1, "created twice: {found:?}");
        if a.status == 201 {
            acknowledged += 1;
            assert_eq!(found.len(), 1, "an acknowledged create is gone");
            assert_eq!(found[0]["id"].as_str(), a.id.as_deref());
        } else if !found.is_empty() {
            unacknowledged_kept += 1;
        }
    }
    assert_eq!(
        stored_by_key.len(),
        acknowledged + unacknowledged_kept,
        "a Patient nobody asked for"
    );
    // The creates acknowledged around the outage read back by id too.
    for a in answers
        .iter()
        .filter(|a| a.what == "create" && a.status == 201 && a.at > down)
        .take(5)
    {
        let id = a.id.as_deref().unwrap();
        let (status, patient) = get(format!("/fhir/r4/Patient/{id}")).await;
        assert_eq!(status, 200, "an acknowledged create is not readable");
        assert_eq!(patient["identifier"][0]["value"], a.key.as_str());
    }
    println!("creates: {acknowledged} acknowledged and present; {unacknowledged_kept} committed without their answer");

    // The audit trail is whole, and every stored create has its audit event (same
    // transaction): nothing half-written.
    let records = app
        .store
        .audit_chain_page(gw.practice.as_str(), 0, 1_000_000)
        .await
        .unwrap();
    let report = fhirgate::audit::verify_chain(gw.practice.as_str(), &records);
    assert!(report.ok, "{report:?}");
    let mut create_events: HashMap<&str, usize> = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r.action == "create" && r.status_code == 201)
    {
        if let Some(id) = r.resource_id.as_deref() {
            *create_events.entry(id).or_default() += 1;
        }
    }
    for patient in stored_by_key.values().flatten() {
        let id = patient["id"].as_str().unwrap();
        assert_eq!(
            create_events.get(id),
            Some(&1),
            "Patient/{id}'s create event"
        );
    }

    // Webhook events acknowledged with 202 all reach the store (the inbox worker survived).
    let accepted: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.what == "webhook" && a.status == 202)
        .collect();
    assert!(!accepted.is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    for a in &accepted {
        loop {
            let (_, bundle) = get(format!(
                "/fhir/r4/Patient?identifier=urn:fhirgate:connection:{}|{}",
                scene.hooks, a.key
            ))
            .await;
            if bundle["entry"].as_array().is_some_and(|e| e.len() == 1) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "an acknowledged webhook event was lost"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Claim submissions in flight when the database went are each applied once, and a new
    // change after it reaches the EHR (the dispatcher survived).
    scene.claims_ehr.controls().set_latency(Duration::ZERO);
    for (claim, update) in &scene.submissions {
        let updates = applied(&scene.claims_ehr, claim, 1).await;
        let ids: Vec<&str> = updates
            .iter()
            .filter_map(|u| u.update_id.as_deref())
            .collect();
        assert_eq!(ids, [update.as_str()], "claim {claim}");
    }
    let (claim, _) = &scene.submissions[0];
    let accepted_update = gw.change(claim, "accepted").await.unwrap();
    let updates = applied(&scene.claims_ehr, claim, 2).await;
    assert_eq!(
        updates[1].update_id.as_deref(),
        Some(accepted_update.as_str())
    );

    // The scheduler survived: a scheduled pull finishes after the restart.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let runs = app
            .store
            .jobs()
            .list_runs(None, Some(&scene.scheduled), 100)
            .await
            .unwrap();
        if runs
            .iter()
            .any(|r| r.status == "succeeded" && r.finished_at.is_some_and(|f| f > restarted_at))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scheduled pull finished after the restart: {runs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
            "claim {claim}: {} of {n} updates",
            updates.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `url` with its host and port replaced by 127.0.0.1:`port`.
fn via(url: &DatabaseUrl, port: u16) -> DatabaseUrl {
    let mut parsed = reqwest::Url::parse(url.expose()).unwrap();
    parsed.set_host(Some("127.0.0.1")).unwrap();
    parsed.set_port(Some(port)).unwrap();
    DatabaseUrl::new(parsed.to_string())
}

fn upstream(url: &DatabaseUrl) -> SocketAddr {
    let parsed = reqwest::Url::parse(url.expose()).unwrap();
    let host = parsed.host_str().unwrap_or("127.0.0.1");
    let port = parsed.port().unwrap_or(5432);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .unwrap()
        .next()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_under_load_answers_503_goes_unready_and_recovers_by_itself() {
    if backend() != Backend::Postgres {
        println!("db_outage: PostgreSQL-only (set FHIRGATE_TEST_POSTGRES_URL); the SQLite equivalent is sqlite_locked_by_another_process_*");
        return;
    }
    let (db, url) = TestDb::create().await;
    let proxy = PgProxy::start(upstream(&url)).await;
    let app = spawn_app_on(&via(&url, proxy.port), &settings())
        .await
        .expect("the gateway starts through the proxy");
    outage_under_load(&app, &proxy, true).await;
    drop(app.stop().await);
    drop(proxy);
    drop(db);
}

/// Holds SQLite's write lock from another connection, as another process would.
struct SqliteLock {
    url: DatabaseUrl,
    held: tokio::sync::Mutex<Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>>,
    pool: tokio::sync::OnceCell<sqlx::SqlitePool>,
}

#[async_trait::async_trait]
impl Outage for SqliteLock {
    async fn begin(&self) {
        let pool = self
            .pool
            .get_or_init(|| async { sqlx::SqlitePool::connect(self.url.expose()).await.unwrap() })
            .await;
        let mut conn = pool.acquire().await.unwrap();
        // The gateway's busy timeout lets this wait for a gateway writer to finish.
        sqlx::query("PRAGMA busy_timeout = 10000")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *conn)
            .await
            .unwrap();
        *self.held.lock().await = Some(conn);
    }
    async fn end(&self) {
        if let Some(mut conn) = self.held.lock().await.take() {
            sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_by_another_process_under_load_answers_503_and_recovers_by_itself() {
    if backend() != Backend::Sqlite {
        println!("db_outage: SQLite-only (the run without FHIRGATE_TEST_POSTGRES_URL); PostgreSQL has postgres_stopped_under_load_*");
        return;
    }
    let (db, url) = TestDb::create().await;
    let app = spawn_app_on(&url, &settings()).await.unwrap();
    let lock = SqliteLock {
        url: url.clone(),
        held: tokio::sync::Mutex::new(None),
        pool: tokio::sync::OnceCell::new(),
    };
    outage_under_load(&app, &lock, false).await;
    drop(app.stop().await);
    drop(db);
}

/// Runs the shell commands `stop` and `start`.
struct Commands {
    stop: String,
    start: String,
}

#[async_trait::async_trait]
impl Outage for Commands {
    async fn begin(&self) {
        run_shell(&self.stop).await;
    }
    async fn end(&self) {
        run_shell(&self.start).await;
    }
}

async fn run_shell(command: &str) {
    let owned = command.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .args(["-c", &owned])
            .status()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "`{command}` failed");
}

/// The same scenario with a real PostgreSQL stop and start, for a machine of your own (it
/// stops the server every other test uses):
///
/// ```sh
/// FHIRGATE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
/// FAULTS_PG_STOP='pg_ctlcluster 16 main stop -m fast' \
/// FAULTS_PG_START='pg_ctlcluster 16 main start' \
/// cargo test --test api a_real_postgres_restart_under_load -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the machine's PostgreSQL; see its doc comment"]
async fn a_real_postgres_restart_under_load() {
    let (Ok(stop), Ok(start)) = (
        std::env::var("FAULTS_PG_STOP"),
        std::env::var("FAULTS_PG_START"),
    ) else {
        panic!("set FAULTS_PG_STOP and FAULTS_PG_START (and FHIRGATE_TEST_POSTGRES_URL)");
    };
    assert_eq!(
        backend(),
        Backend::Postgres,
        "set FHIRGATE_TEST_POSTGRES_URL"
    );
    let (db, url) = TestDb::create().await;
    let app = spawn_app_on(&url, &settings()).await.unwrap();
    outage_under_load(&app, &Commands { stop, start }, true).await;
    drop(app.stop().await);
    drop(db);
}
