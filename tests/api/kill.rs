//! Killed at random points (issue 8, "Faults"): a real `fhirgate` process doing one kind of
//! work is SIGKILLed ten times in a row and restarted on the same database each time, then let
//! finish; what a user sees afterwards is what an uninterrupted run gives, the audit chain
//! verifies, and nothing is lost, applied twice or half done:
//!
//! - a nightly pull (`fhirgate sync run`, and the scheduler of `fhirgate serve` taking over):
//!   ends identical to an uninterrupted pull of the same EHR, one patient per EHR id;
//! - a claim-status push storm (1,000 updates): each applied once at the EHR, in order per claim;
//! - a webhook burst (1,000 signed events, each re-sent until acknowledged): each processed
//!   once, no duplicate patient, the inbox drained;
//! - a Bulk export: completes, with every resource exactly once;
//! - a key rotation (`fhirgate keys rotate`): every resource reads back identical throughout,
//!   and everything ends under the new key.
//!
//! Kill points are seeded: each test prints `FHIRGATE_TEST_KILL_SEED=...` and every kill (how much
//! visible progress it waited for, the delay after it, where the work stood); set that variable
//! to replay the same points. A kill comes after a random amount of *progress* (pages committed,
//! updates applied, events acknowledged, resources exported, batches re-encrypted) plus a random
//! delay, so kills land mid-work on a fast machine and on a loaded CI box alike. Every wait is
//! bounded, with generous limits; none is a timing goal. Leases are short (`FHIRGATE_*` lease
//! settings), so each restart takes over within a second or two.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::ops::RangeInclusive;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use fhirgate::config::DatabaseUrl;
use fhirgate::crypto::Keyring;
use fhirgate::domain::ResourceId;
use fhirgate::store::{PoolOptions, Store};
use fhirgate::sync::pull::local_id;
use fhirgate::sync::webhooks::notification::{sign, signing_key};
use fhirgate::sync::Connections;
use fhirgate_ehr_sim::{Personality, SimConfig, Simulator};
use serde_json::{json, Value};

use crate::auth::{SigningKey, TestClient};
use crate::binary::{fhirgate, free_port, run};
use crate::helpers::{test_master_key, TestDb};

/// How many times each test kills its process.
const KILLS: usize = 10;

/// Every instance answers as this URL: the access tokens it issues name it, so one token serves
/// every restarted instance whatever port it listens on.
const PUBLIC_URL: &str = "http://fhirgate.kill.test";

/// The master key [`fhirgate()`] gives the binary; the test seals connections' credentials with
/// it too.
fn master_key() -> String {
    format!("test1:{}", "A".repeat(43) + "=")
}

// ---------------------------------------------------------------------------------------------
// Kill points, processes, clients

/// The seeded source of kill points, and the test's log of them.
struct Chaos {
    test: &'static str,
    rng: fastrand::Rng,
}

impl Chaos {
    fn new(test: &'static str) -> Self {
        let seed = match std::env::var("FHIRGATE_TEST_KILL_SEED") {
            Ok(s) if !s.trim().is_empty() => {
                s.trim().parse().expect("FHIRGATE_TEST_KILL_SEED: a u64")
            }
            _ => fastrand::u64(..),
        };
        eprintln!("{test}: kill points from FHIRGATE_TEST_KILL_SEED={seed}");
        Self {
            test,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The next kill: after `progress` more units of work (drawn from the range), then a delay
    /// drawn from `delay_ms`.
    fn point(
        &mut self,
        progress: RangeInclusive<u64>,
        delay_ms: RangeInclusive<u64>,
    ) -> (u64, Duration) {
        (
            self.rng.u64(progress),
            Duration::from_millis(self.rng.u64(delay_ms)),
        )
    }

    fn say(&self, what: impl std::fmt::Display) {
        eprintln!("{}: {what}", self.test);
    }
}

/// Where the processes' output goes: the test's own with `FHIRGATE_TEST_LOG=1`, else nowhere.
fn output() -> Stdio {
    if std::env::var_os("FHIRGATE_TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

/// SIGKILL (`Child::kill` on Unix): no shutdown, leases held, requests and transactions cut off.
fn sigkill(child: &mut Child) {
    let _ = child.kill();
    child.wait().expect("the killed process is reaped");
}

/// Waits until `progress()` reaches `target` while `child` runs, and returns where it stands.
/// Bounded (a loaded CI machine runs many tests beside this one); a child that exits first
/// fails the test.
async fn progress_to<F, Fut>(child: &mut Child, what: &str, target: u64, mut progress: F) -> u64
where
    F: FnMut() -> Fut,
    Fut: Future<Output = u64>,
{
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let now = progress().await;
        if now >= target {
            return now;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what}: the process exited ({status}) at {now} of {target}");
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {now} of {target} after 180 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A `fhirgate serve` and its base URL.
struct Serve {
    child: Child,
    base: String,
}

/// Starts `fhirgate serve` on `url` with `env` over the kill tests' defaults (no rate limits, no
/// scheduler, hour-long tokens) and waits until it answers `/healthz`. A process that exits
/// before (its port taken meanwhile by another test, say) is started again on another port.
async fn serve(url: &DatabaseUrl, env: &[(&str, &str)]) -> Serve {
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let port = free_port();
        let mut child = fhirgate()
            .arg("serve")
            .env("FHIRGATE_DATABASE_URL", url.expose())
            .env("FHIRGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("FHIRGATE_PUBLIC_URL", PUBLIC_URL)
            .env("FHIRGATE_WORKERS", "2")
            .env("FHIRGATE_DATABASE_MAX_CONNECTIONS", "5")
            .env("FHIRGATE_ACCESS_TOKEN_LIFETIME_SECS", "3600")
            .env("FHIRGATE_RATE_LIMIT__ENABLED", "false")
            .env("FHIRGATE_SYNC__SCHEDULER", "false")
            .envs(env.iter().copied())
            .stdout(output())
            .stderr(output())
            .spawn()
            .expect("fhirgate starts");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = match http.get(format!("{base}/healthz")).send().await {
                Ok(res) => res.status() == 200,
                Err(_) => false,
            };
            if let Some(status) = child.try_wait().unwrap() {
                eprintln!("fhirgate serve exited early ({status}); starting it again");
                break;
            }
            if up {
                return Serve { child, base };
            }
            assert!(Instant::now() < deadline, "fhirgate serve did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("fhirgate serve exited early three times");
}

/// A URL the gateway gave (under [`PUBLIC_URL`]) as reachable at `base`.
fn at(base: &str, url: &str) -> String {
    url.replacen(PUBLIC_URL, base, 1)
}

/// A store of the test's own on the database the processes share.
async fn test_store(url: &DatabaseUrl) -> Arc<dyn Store> {
    fhirgate::store::connect(
        url,
        &PoolOptions {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(10),
        },
    )
    .await
    .unwrap()
}

fn connections(store: &Arc<dyn Store>) -> Connections {
    let keyring = Keyring::parse(&master_key()).unwrap();
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().unwrap());
    Connections::new(store.clone(), &keyring, profiles)
}

/// A simulator of `patients` generic-EHR patients.
fn simulator(patients: usize) -> Simulator {
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = patients;
    Simulator::start(config).unwrap()
}

/// A practice made with the CLI, as an operator would.
fn cli_practice(url: &DatabaseUrl, name: &str) -> ResourceId {
    let out = run(fhirgate()
        .args(["practices", "add", "--name", name])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let practice: Value = serde_json::from_slice(&out.stdout).unwrap();
    ResourceId::parse("practice", practice["id"].as_str().unwrap()).unwrap()
}

/// A client of `practice` made with the CLI, as an operator would.
fn cli_client(url: &DatabaseUrl, practice: &ResourceId, role: &str, scopes: &str) -> TestClient {
    let key = SigningKey::es384("kill-1");
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, SigningKey::jwks(&[&key])).unwrap();
    let out = run(fhirgate()
        .args(["clients", "add", "--practice", practice.as_str()])
        .args(["--name", "Kill test", "--role", role, "--scope", scopes])
        .arg("--jwks")
        .arg(&jwks)
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client: Value = serde_json::from_slice(&out.stdout).unwrap();
    TestClient {
        client_id: client["client_id"].as_str().unwrap().to_owned(),
        key,
        token_url: format!("{PUBLIC_URL}/auth/token"),
    }
}

/// A new client of `practice` (made with the CLI) using the gateway at `base`, with a token
/// valid at every instance of the same active master key (they share [`PUBLIC_URL`]).
async fn client_api(
    url: &DatabaseUrl,
    base: &str,
    practice: &ResourceId,
    role: &str,
    scopes: &str,
) -> Api {
    let client = cli_client(url, practice, role, scopes);
    Api::new(base, token(base, &client, scopes).await)
}

/// An access token for `client` from the gateway at `base`.
async fn token(base: &str, client: &TestClient, scopes: &str) -> String {
    let res = reqwest::Client::new()
        .post(format!("{base}/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", scopes),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &client.sign(&client.claims())),
        ])
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {body}"))
        .to_owned()
}

/// A client's view of whichever instance is up: requests go to the current base URL.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    token: String,
    base: Arc<RwLock<String>>,
}

impl Api {
    fn new(base: &str, token: String) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            token,
            base: Arc::new(RwLock::new(base.to_owned())),
        }
    }

    fn base(&self) -> String {
        self.base.read().unwrap().clone()
    }

    fn moved_to(&self, base: &str) {
        base.clone_into(&mut self.base.write().unwrap());
    }

    /// GET of `path` (or of a URL the gateway gave) until an instance answers it (bounded).
    async fn get(&self, path_or_url: &str) -> reqwest::Response {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let url = if path_or_url.starts_with(PUBLIC_URL) {
                at(&self.base(), path_or_url)
            } else {
                format!("{}{path_or_url}", self.base())
            };
            match self.http.get(url).bearer_auth(&self.token).send().await {
                Ok(res) if !res.status().is_server_error() => return res,
                _ => {}
            }
            assert!(Instant::now() < deadline, "GET {path_or_url}: no answer");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base()))
            .bearer_auth(&self.token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    /// Creates a resource; its id.
    async fn create(&self, resource: Value) -> String {
        let ty = resource["resourceType"].as_str().unwrap().to_owned();
        let res = self.post(&format!("/fhir/r4/{ty}"), &resource).await;
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 201, "{ty}: {body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Creates `resources` in transaction Bundles of 200; their ids, in order.
    async fn create_all(&self, resources: Vec<Value>) -> Vec<String> {
        let mut ids = Vec::new();
        for chunk in resources.chunks(200) {
            let bundle = json!({
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": chunk.iter().map(|r| json!({
                    "resource": r,
                    "request": { "method": "POST", "url": r["resourceType"] }
                })).collect::<Vec<_>>()
            });
            let res = self.post("/fhir/r4", &bundle).await;
            let status = res.status();
            let body: Value = res.json().await.unwrap();
            assert_eq!(status, 200, "{body}");
            for entry in body["entry"].as_array().unwrap() {
                let location = entry["response"]["location"].as_str().unwrap();
                ids.push(location.split('/').nth(1).unwrap().to_owned());
            }
        }
        ids
    }

    /// Every Patient the client's practice holds, by id, following the search's next links.
    async fn all_patients(&self) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        let mut next = Some("/fhir/r4/Patient?_count=500".to_owned());
        while let Some(url) = next.take() {
            let res = self.get(&url).await;
            assert_eq!(res.status(), 200, "{url}");
            let bundle: Value = res.json().await.unwrap();
            for entry in bundle["entry"].as_array().cloned().unwrap_or_default() {
                let resource = entry["resource"].clone();
                let id = resource["id"].as_str().unwrap().to_owned();
                assert!(
                    out.insert(id.clone(), resource).is_none(),
                    "Patient/{id} listed twice"
                );
            }
            next = bundle["link"]
                .as_array()
                .and_then(|links| links.iter().find(|l| l["relation"] == "next"))
                .and_then(|l| l["url"].as_str())
                .map(str::to_owned);
        }
        out
    }
}

/// `fhirgate audit verify` passes: every practice's hash chain is intact.
fn audit_verifies(url: &DatabaseUrl) {
    let out = run(fhirgate()
        .args(["audit", "verify"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!reports.is_empty(), "no chain verified");
    assert!(reports.iter().all(|r| r["ok"] == true), "{stdout}");
}

/// A generic patient resource for the tests that write their own.
fn patient(n: usize) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:oid:1.2.36.146.595.217.0.1", "value": format!("KILL-{n:05}") }],
        "name": [{ "family": format!("Killington{n}"), "given": ["Sam", "Q"] }],
        "gender": if n % 2 == 0 { "female" } else { "male" },
        "birthDate": format!("19{:02}-0{}-1{}", 30 + n % 60, 1 + n % 9, n % 10),
        "telecom": [{ "system": "phone", "value": format!("555-01{:02}", n % 100) }]
    })
}

// ---------------------------------------------------------------------------------------------
// 1. Nightly pull

/// Every Patient of a practice, by its id at the EHR, without what the gateway adds (its id,
/// `meta`, the connection's identifier): what two pulls of the same EHR must agree on. Panics
/// on a second patient of one EHR id.
async fn pulled(api: &Api) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (_, mut patient) in api.all_patients().await {
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
        let ehr_id = ehr_id.expect("a pulled patient names its EHR id");
        assert!(
            out.insert(ehr_id.clone(), patient).is_none(),
            "two patients of EHR id {ehr_id}"
        );
    }
    out
}

/// `fhirgate sync run --connection ID` with the pull settings of these tests.
fn sync_run(url: &DatabaseUrl, connection: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = fhirgate();
    cmd.args(["sync", "run", "--connection", connection])
        .env("FHIRGATE_DATABASE_URL", url.expose())
        .envs(env.iter().copied());
    cmd
}

/// The pull run of `connection` (the only one these tests start).
async fn pull_run(store: &Arc<dyn Store>, connection: &str) -> Option<fhirgate::store::JobRun> {
    store
        .jobs()
        .list_runs(None, Some(connection), 10)
        .await
        .unwrap()
        .into_iter()
        .next()
}

/// Sleeps until the run's lease (held by a process just killed) has run out.
async fn lease_ran_out(store: &Arc<dyn Store>, connection: &str) {
    let run = pull_run(store, connection).await.unwrap();
    if let Some(until) = run.lease_until_us {
        let now = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64;
        if until > now {
            let wait = u64::try_from(until - now).unwrap_or(0);
            tokio::time::sleep(Duration::from_micros(wait) + Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nightly_pull_killed_ten_times_ends_identical_to_an_uninterrupted_one() {
    const PATIENTS: usize = 1000; // 50 pages of 20
    let mut chaos = Chaos::new("nightly pull");
    let (db, url) = TestDb::create().await;
    let env = [
        ("FHIRGATE_SYNC__LEASE_SECS", "1"),
        ("FHIRGATE_SYNC__REFRESH_SECS", "1"),
        ("FHIRGATE_SYNC__RUN_MISSED", "false"),
        ("FHIRGATE_SYNC__COVERAGE", "false"),
    ];
    let killed_practice = cli_practice(&url, "Killed Pull Therapy");
    let clean_practice = cli_practice(&url, "Clean Pull Therapy");
    let store = test_store(&url).await;
    let sim = simulator(PATIENTS);
    let connection_to = |practice: &ResourceId| {
        let mut spec = fhirgate::cli::sandbox_spec(&sim, practice).unwrap();
        spec.settings.insert("page_size".into(), json!(20));
        spec
    };
    let killed = connections(&store)
        .add(connection_to(&killed_practice))
        .await
        .unwrap()
        .id;
    let clean = connections(&store)
        .add(connection_to(&clean_practice))
        .await
        .unwrap()
        .id;
    // Each page takes a while at the EHR: kills land while a page is asked for, written, or
    // committed.
    sim.controls().set_latency(Duration::from_millis(25));

    // The first attempt is an operator's `fhirgate sync run`; each restart after a kill is in
    // turn a `fhirgate serve` (its scheduler takes the orphaned run over) and `sync run` again
    // (which resumes the interrupted run).
    let pages = |store: &Arc<dyn Store>| {
        let (store, connection) = (store.clone(), killed.clone());
        move || {
            let (store, connection) = (store.clone(), connection.clone());
            async move {
                pull_run(&store, &connection)
                    .await
                    .map_or(0, |r| r.counts.pages as u64)
            }
        }
    };
    let mut child = sync_run(&url, &killed, &env)
        .stdout(output())
        .stderr(output())
        .spawn()
        .unwrap();
    let mut last = 0;
    for kill in 1..=KILLS {
        let (more, delay) = chaos.point(1..=2, 0..=60);
        progress_to(&mut child, "pull", last + more, pages(&store)).await;
        tokio::time::sleep(delay).await;
        sigkill(&mut child);
        let run = pull_run(&store, &killed).await.unwrap();
        assert_eq!(run.status, "running", "killed mid-run: {run:?}");
        chaos.say(format!(
            "kill {kill}/{KILLS} after {more} more pages and {delay:?}: attempt {}, {} pages, \
             {} created",
            run.attempts, run.counts.pages, run.counts.created
        ));
        last = run.counts.pages as u64;
        lease_ran_out(&store, &killed).await;
        child = if kill % 2 == 1 {
            let mut env = env.to_vec();
            env.push(("FHIRGATE_SYNC__SCHEDULER", "true"));
            serve(&url, &env).await.child
        } else {
            sync_run(&url, &killed, &env)
                .stdout(output())
                .stderr(output())
                .spawn()
                .unwrap()
        };
        // The new process has taken the run over once the attempt count moved.
        let deadline = Instant::now() + Duration::from_secs(120);
        while pull_run(&store, &killed).await.unwrap().attempts <= run.attempts {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the process after kill {kill} exited ({status}) without taking over");
            }
            assert!(Instant::now() < deadline, "the run was not taken over");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The last restart (KILLS being even, a `sync run`) is let finish; its exit status says how
    // the run ended.
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the last attempt did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "the last attempt failed: {status}");
    let resumed = pull_run(&store, &killed).await.unwrap();
    assert_eq!(resumed.status, "succeeded", "{resumed:?}");
    assert_eq!(resumed.attempts, 1 + KILLS as i64, "{resumed:?}");
    assert_eq!(resumed.counts.failed, 0, "{resumed:?}");
    // Each patient was written once: what an attempt had committed came back unchanged.
    assert_eq!(
        (resumed.counts.created, resumed.counts.updated),
        (PATIENTS as i64, 0),
        "{resumed:?}"
    );

    // The same EHR pulled without interruption, for another practice.
    sim.controls().set_latency(Duration::ZERO);
    let (clean_url, clean_id) = (url.clone(), clean.clone());
    let out = tokio::task::spawn_blocking(move || run(&mut sync_run(&clean_url, &clean_id, &env)))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let clean_run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(clean_run["status"], "succeeded");
    assert_eq!(clean_run["created"], PATIENTS);

    // What each practice sees: the same patients, one per EHR id.
    let gateway = serve(&url, &[]).await;
    let scopes = "system/Patient.rs";
    let killed_api = client_api(
        &url,
        &gateway.base,
        &killed_practice,
        "external_system",
        scopes,
    )
    .await;
    let clean_api = client_api(
        &url,
        &gateway.base,
        &clean_practice,
        "external_system",
        scopes,
    )
    .await;
    let killed_data = pulled(&killed_api).await;
    let clean_data = pulled(&clean_api).await;
    assert_eq!(killed_data.len(), PATIENTS);
    assert_eq!(
        killed_data.keys().collect::<BTreeSet<_>>(),
        sim.patient_ids().iter().collect::<BTreeSet<_>>()
    );
    assert!(killed_data == clean_data, "the killed pull differs");
    // The job history: one run per connection, the killed one taken over at each restart.
    let out = run(fhirgate()
        .args(["sync", "status", "--connection", &killed, "--runs", "10"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    let runs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["status"], "succeeded");
    assert_eq!(runs[0]["attempts"], 1 + KILLS);
    let stored = store.connections().get_connection(&killed).await.unwrap();
    assert_eq!(stored.watermark, resumed.checkpoint, "the watermark moved");

    let mut gateway = gateway;
    sigkill(&mut gateway.child);
    audit_verifies(&url);
    store.close().await;
    drop(db);
}

// ---------------------------------------------------------------------------------------------
// 2. Claim-status push storm

const CLAIM_SCOPES: &str = "system/Patient.cruds system/Organization.cruds \
    system/Coverage.cruds system/Claim.cruds system/ClaimResponse.cruds";

/// Moves `claim` from `version` to `status` as a practice's system that must neither lose nor
/// double a change does: the same conditional request (`If-Match`) until an instance answers
/// it. A 412 after an unanswered attempt means that attempt committed, which a read confirms.
async fn change_status(api: &Api, claim: &str, version: i64, status: &str, disposition: &str) {
    let path = format!("/api/v1/claims/{claim}/status");
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut unanswered = false;
    loop {
        let sent = api
            .http
            .post(format!("{}{path}", api.base()))
            .bearer_auth(&api.token)
            .header("if-match", format!("W/\"{version}\""))
            .json(&json!({ "status": status, "disposition": disposition }))
            .send()
            .await;
        match sent {
            Ok(res) if res.status() == 200 => return,
            Ok(res) if res.status() == 412 && unanswered => {
                let state: Value = api.get(&path).await.json().await.unwrap();
                assert_eq!(
                    (state["status"].as_str(), state["version"].as_i64()),
                    (Some(status), Some(version + 1)),
                    "{claim}: the unanswered change is not the one that committed"
                );
                return;
            }
            Ok(res) if res.status().is_server_error() => unanswered = true,
            Ok(res) => panic!(
                "{claim} -> {status}: {} {}",
                res.status(),
                res.text().await.unwrap_or_default()
            ),
            // Refused (no instance up) or cut off (killed): it may have committed.
            Err(_) => unanswered = true,
        }
        assert!(
            Instant::now() < deadline,
            "{claim} -> {status}: no answer in 180 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The statuses one claim goes through after `prepared`: submitted, accepted, then denied,
/// appealed and accepted again, round and round; each is pushed to the EHR.
fn storm_lifecycle(n: usize) -> Vec<&'static str> {
    let mut statuses = vec!["submitted", "accepted"];
    let round = ["denied", "appealed", "accepted"];
    while statuses.len() < n {
        statuses.push(round[(statuses.len() - 2) % 3]);
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_storm_killed_ten_times_applies_every_update_once_and_in_order() {
    const CLAIMS: usize = 10;
    const PER_CLAIM: usize = 100;
    const UPDATES: u64 = (CLAIMS * PER_CLAIM) as u64;
    let mut chaos = Chaos::new("push storm");
    let (db, url) = TestDb::create().await;
    let env = [
        ("FHIRGATE_OUTBOX__LEASE_MS", "1000"),
        ("FHIRGATE_OUTBOX__POLL_INTERVAL_MS", "50"),
        ("FHIRGATE_OUTBOX__RETRY_BASE_MS", "20"),
        ("FHIRGATE_OUTBOX__RETRY_MAX_MS", "200"),
    ];
    let mut gateway = serve(&url, &env).await;
    let practice = cli_practice(&url, "Storm Billing");
    let api = client_api(&url, &gateway.base, &practice, "billing", CLAIM_SCOPES).await;
    let store = test_store(&url).await;
    let sim = simulator(3);
    // The adapter tries each push once and its breaker stays closed: every failure is the
    // outbox's to retry.
    let mut spec = fhirgate::cli::sandbox_spec(&sim, &practice).unwrap();
    spec.settings.insert("max_attempts".into(), json!(1));
    spec.settings.insert("breaker_failures".into(), json!(1000));
    let connection = connections(&store).add(spec).await.unwrap().id;

    // A patient pulled from the EHR, its coverage, and claims the EHR knows by its own ids.
    let patient = api
        .create(json!({
            "resourceType": "Patient",
            "identifier": [{ "system": format!("urn:fhirgate:connection:{connection}"), "value": "storm-patient" }],
            "name": [{ "family": "Tempest", "given": ["Ida"] }]
        }))
        .await;
    let payer = api
        .create(json!({ "resourceType": "Organization", "name": "Acme Health" }))
        .await;
    let coverage = api
        .create(json!({
            "resourceType": "Coverage",
            "status": "active",
            "beneficiary": { "reference": format!("Patient/{patient}") },
            "payor": [{ "reference": format!("Organization/{payer}") }]
        }))
        .await;
    let mut claims = Vec::new();
    for n in 0..CLAIMS {
        let ehr_claim = format!("storm-claim-{n}");
        let id = api
            .create(json!({
                "resourceType": "Claim",
                "status": "active",
                "identifier": [{ "system": format!("urn:fhirgate:connection:{connection}"), "value": ehr_claim }],
                "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional" }] },
                "use": "claim",
                "patient": { "reference": format!("Patient/{patient}") },
                "created": "2026-11-20",
                "provider": { "reference": format!("Organization/{payer}") },
                "priority": { "coding": [{ "code": "normal" }] },
                "insurance": [{ "sequence": 1, "focal": true, "coverage": { "reference": format!("Coverage/{coverage}") } }]
            }))
            .await;
        change_status(&api, &id, 0, "prepared", "Ready to bill").await;
        claims.push((id, ehr_claim));
    }
    // Each push takes a while at the EHR: kills land while pushes are in flight.
    sim.controls().set_latency(Duration::from_millis(20));

    // The practice's system changes every claim as fast as the gateway answers, each claim's
    // changes one after the other, all claims at once.
    let disposition = |n: usize, i: usize| format!("storm {n}-{i}");
    let producers: Vec<_> = claims
        .iter()
        .enumerate()
        .map(|(n, (id, _))| {
            let (api, id) = (api.clone(), id.clone());
            tokio::spawn(async move {
                for (i, status) in storm_lifecycle(PER_CLAIM).into_iter().enumerate() {
                    change_status(&api, &id, 1 + i as i64, status, &disposition(n, i)).await;
                }
            })
        })
        .collect();

    let controls = sim.controls();
    let applied = || {
        let controls = controls.clone();
        async move { controls.counters().claim_updates_applied }
    };
    let mut last = 0;
    for kill in 1..=KILLS {
        let (more, delay) = chaos.point(40..=80, 0..=30);
        progress_to(&mut gateway.child, "push storm", last + more, applied).await;
        tokio::time::sleep(delay).await;
        sigkill(&mut gateway.child);
        last = controls.counters().claim_updates_applied;
        chaos.say(format!(
            "kill {kill}/{KILLS} after {more} more updates applied and {delay:?}: \
             {last} of {UPDATES} applied, {} in the outbox",
            outbox_depth(&*store).await
        ));
        gateway = serve(&url, &env).await;
        api.moved_to(&gateway.base);
    }
    for producer in producers {
        tokio::time::timeout(Duration::from_secs(180), producer)
            .await
            .expect("the practice's changes are all answered")
            .unwrap();
    }

    // Every update reached the EHR once, in the order of the changes.
    let deadline = Instant::now() + Duration::from_secs(180);
    for (n, (_, ehr_claim)) in claims.iter().enumerate() {
        let updates = loop {
            let updates = sim.claim_updates(ehr_claim);
            if updates.len() >= PER_CLAIM {
                break updates;
            }
            assert!(
                Instant::now() < deadline,
                "{ehr_claim}: {} of {PER_CLAIM} updates applied",
                updates.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let got: Vec<&str> = updates
            .iter()
            .map(|u| u.disposition.as_deref().unwrap_or_default())
            .collect();
        let expected: Vec<String> = (0..PER_CLAIM).map(|i| disposition(n, i)).collect();
        assert_eq!(got, expected, "{ehr_claim}: every update once, in order");
        let ids: BTreeSet<_> = updates.iter().map(|u| u.update_id.clone()).collect();
        assert_eq!(ids.len(), PER_CLAIM, "{ehr_claim}: one update id each");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while outbox_depth(&*store).await > 0 {
        assert!(Instant::now() < deadline, "the outbox did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counters = sim.controls().counters();
    chaos.say(format!(
        "{} ClaimResponse requests for {UPDATES} updates, {} applied",
        counters.fhir_requests, counters.claim_updates_applied
    ));
    assert_eq!(
        counters.claim_updates_applied, UPDATES,
        "nothing applied twice"
    );
    assert!(store
        .outbox()
        .list_dead_letters(None, None, 10)
        .await
        .unwrap()
        .is_empty());

    sigkill(&mut gateway.child);
    audit_verifies(&url);
    store.close().await;
    drop(db);
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

// ---------------------------------------------------------------------------------------------
// 3. Webhook burst

/// A Standard Webhooks secret (`whsec_` + base64 of 24 bytes).
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Sends one signed `patient.changed` event as an EHR's webhook sender does: again (freshly
/// signed) until an instance acknowledges it with a 2xx.
async fn send_until_acknowledged(api: &Api, connection: &str, event_id: &str, patient: &str) {
    let key = signing_key(WEBHOOK_SECRET).unwrap();
    let body = json!({ "type": "patient.changed", "patient_id": patient }).to_string();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ts = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
        let sent = api
            .http
            .post(format!("{}/webhooks/{connection}", api.base()))
            .header("content-type", "application/json")
            .header("webhook-id", event_id)
            .header("webhook-timestamp", &ts)
            .header(
                "webhook-signature",
                sign(&key, event_id, &ts, body.as_bytes()),
            )
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(res) if res.status().is_success() => return,
            Ok(res) if res.status().is_server_error() || res.status() == 429 => {}
            Ok(res) => panic!(
                "{event_id}: {} {}",
                res.status(),
                res.text().await.unwrap_or_default()
            ),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "{event_id}: not acknowledged in 180 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_burst_killed_ten_times_processes_every_acknowledged_event_once() {
    const EVENTS: usize = 1000;
    const PATIENTS: usize = 400; // so most patients are named by two or three events
    const SENDERS: usize = 8;
    let mut chaos = Chaos::new("webhook burst");
    let (db, url) = TestDb::create().await;
    let env = [
        ("FHIRGATE_WEBHOOKS__LEASE_SECS", "1"),
        ("FHIRGATE_WEBHOOKS__POLL_INTERVAL_MS", "100"),
        ("FHIRGATE_WEBHOOKS__RETRY_BASE_MS", "50"),
    ];
    let mut gateway = serve(&url, &env).await;
    let practice = cli_practice(&url, "Burst Clinic");
    let api = client_api(
        &url,
        &gateway.base,
        &practice,
        "external_system",
        "system/Patient.rs",
    )
    .await;
    let store = test_store(&url).await;
    let sim = simulator(PATIENTS);
    let mut spec = fhirgate::cli::sandbox_spec(&sim, &practice).unwrap();
    spec.webhook_secret = Some(WEBHOOK_SECRET.to_owned());
    spec.settings.insert("max_attempts".into(), json!(1));
    spec.settings.insert("breaker_failures".into(), json!(1000));
    let connection = connections(&store).add(spec).await.unwrap().id;
    let ehr_ids = Arc::new(sim.patient_ids());
    sim.controls().set_latency(Duration::from_millis(5));

    // The EHR's senders: each takes the next event and sends it until it is acknowledged.
    let next = Arc::new(AtomicUsize::new(0));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (api, connection, ehr_ids) = (api.clone(), connection.clone(), ehr_ids.clone());
            let (next, acknowledged) = (next.clone(), acknowledged.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= EVENTS {
                        break;
                    }
                    let patient = &ehr_ids[(i * 7) % PATIENTS];
                    send_until_acknowledged(&api, &connection, &format!("burst-{i:04}"), patient)
                        .await;
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    // Progress: events acknowledged plus events processed (acknowledged and no longer waiting),
    // so kills land while the burst arrives and while the inbox is worked off after it.
    let progress = || {
        let (store, acknowledged) = (store.clone(), acknowledged.clone());
        async move {
            let acked = acknowledged.load(Ordering::SeqCst);
            let waiting: i64 = store
                .inbox()
                .queue_stats()
                .await
                .unwrap()
                .iter()
                .map(|s| s.depth)
                .sum();
            acked + acked.saturating_sub(waiting as u64)
        }
    };
    let mut last = 0;
    for kill in 1..=KILLS {
        let (more, delay) = chaos.point(100..=170, 0..=25);
        progress_to(&mut gateway.child, "webhook burst", last + more, progress).await;
        tokio::time::sleep(delay).await;
        sigkill(&mut gateway.child);
        last = progress().await;
        let done = store
            .inbox()
            .list_events(Some(&connection), Some("done"), 10_000)
            .await
            .unwrap()
            .len();
        chaos.say(format!(
            "kill {kill}/{KILLS} after {more} more events acknowledged or processed and \
             {delay:?}: {} of {EVENTS} acknowledged, {done} processed",
            acknowledged.load(Ordering::SeqCst)
        ));
        gateway = serve(&url, &env).await;
        api.moved_to(&gateway.base);
    }
    for sender in senders {
        tokio::time::timeout(Duration::from_secs(180), sender)
            .await
            .expect("every event is acknowledged")
            .unwrap();
    }
    assert_eq!(acknowledged.load(Ordering::SeqCst), EVENTS as u64);

    // The inbox drains: one row per event, each done.
    let deadline = Instant::now() + Duration::from_secs(180);
    let rows = loop {
        let rows = store
            .inbox()
            .list_events(Some(&connection), None, 10_000)
            .await
            .unwrap();
        if rows.len() >= EVENTS && rows.iter().all(|r| r.status != "pending") {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "the inbox did not drain: {} rows, {} pending",
            rows.len(),
            rows.iter().filter(|r| r.status == "pending").count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rows.len(), EVENTS, "one row per acknowledged event");
    let not_done: Vec<_> = rows.iter().filter(|r| r.status != "done").collect();
    assert!(not_done.is_empty(), "{not_done:#?}");
    assert!(rows.iter().all(|r| !r.has_payload));
    let retried = rows.iter().filter(|r| r.attempts > 1).count();
    chaos.say(format!(
        "{retried} events were taken over after a kill; EHR asked {} times",
        sim.controls().counters().fhir_requests
    ));

    // One patient per EHR id, each written once (a second processing would find it
    // unchanged), each as the EHR has it.
    let patients = api.all_patients().await;
    assert_eq!(
        patients.len(),
        PATIENTS,
        "no duplicate patient, none missing"
    );
    let locals: Vec<String> = ehr_ids
        .iter()
        .map(|ehr| local_id(&connection, "Patient", ehr))
        .collect();
    let versions = store
        .head_versions(&practice, "Patient", &locals)
        .await
        .unwrap();
    for (ehr, local) in ehr_ids.iter().zip(&locals) {
        assert_eq!(versions.get(local), Some(&1), "EHR patient {ehr}");
        let family = &sim.patient(ehr).unwrap()["name"][0]["family"];
        assert_eq!(&patients[local]["name"][0]["family"], family);
    }

    sigkill(&mut gateway.child);
    audit_verifies(&url);
    store.close().await;
    drop(db);
}

// ---------------------------------------------------------------------------------------------
// 4. Bulk export

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_export_killed_ten_times_completes_with_every_resource_once() {
    const PATIENTS: usize = 1000;
    let mut chaos = Chaos::new("bulk export");
    let (db, url) = TestDb::create().await;
    // Small chunks, files and pages: the export commits every few resources.
    let env = [
        ("FHIRGATE_EXPORT__CHUNK_KIB", "1"),
        ("FHIRGATE_EXPORT__FILE_MAX_RESOURCES", "100"),
        ("FHIRGATE_EXPORT__PAGE_SIZE", "2"),
        ("FHIRGATE_EXPORT__LEASE_SECS", "2"),
        ("FHIRGATE_EXPORT__SWEEP_SECS", "1"),
    ];
    let mut gateway = serve(&url, &env).await;
    let practice = cli_practice(&url, "Export Dental");
    let api = client_api(
        &url,
        &gateway.base,
        &practice,
        "external_system",
        "system/Patient.cruds",
    )
    .await;
    let store = test_store(&url).await;
    let created = api.create_all((0..PATIENTS).map(patient).collect()).await;
    let stored = api.all_patients().await;
    assert_eq!(stored.len(), PATIENTS);

    let res = api
        .http
        .get(format!("{}/fhir/r4/$export?_type=Patient", api.base()))
        .bearer_auth(&api.token)
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let status_url = res.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_owned();
    let job = status_url.rsplit('/').next().unwrap().to_owned();
    let exported = || {
        let (store, practice, job) = (store.clone(), practice.clone(), job.clone());
        async move {
            let job = store.exports().export_job(&practice, &job).await.unwrap();
            let job = job.expect("the export job exists");
            assert!(job.error.is_none(), "the export failed: {job:?}");
            job.cursor.exported as u64
        }
    };
    let mut last = 0;
    for kill in 1..=KILLS {
        let (more, delay) = chaos.point(10..=30, 0..=10);
        progress_to(&mut gateway.child, "export", last + more, exported).await;
        tokio::time::sleep(delay).await;
        sigkill(&mut gateway.child);
        let state = store
            .exports()
            .export_job(&practice, &job)
            .await
            .unwrap()
            .unwrap();
        chaos.say(format!(
            "kill {kill}/{KILLS} after {more} more resources sealed and {delay:?}: {:?}, \
             {} of {PATIENTS} sealed, in file {}",
            state.status, state.cursor.exported, state.cursor.file_no
        ));
        last = state.cursor.exported as u64;
        gateway = serve(&url, &env).await;
        api.moved_to(&gateway.base);
    }

    // Another instance takes the job over and completes it.
    let deadline = Instant::now() + Duration::from_secs(180);
    let manifest: Value = loop {
        let res = api.get(&status_url).await;
        match res.status().as_u16() {
            202 => {}
            200 => break res.json().await.unwrap(),
            other => panic!("status {other}: {}", res.text().await.unwrap()),
        }
        assert!(Instant::now() < deadline, "the export did not complete");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut seen = BTreeMap::new();
    for file in manifest["output"].as_array().unwrap() {
        assert_eq!(file["type"], "Patient");
        let res = api.get(file["url"].as_str().unwrap()).await;
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, file["count"].as_u64().unwrap());
        for resource in lines {
            let id = resource["id"].as_str().unwrap().to_owned();
            assert!(
                seen.insert(id.clone(), resource).is_none(),
                "Patient/{id} exported twice"
            );
        }
    }
    assert_eq!(
        seen.keys().collect::<BTreeSet<_>>(),
        created.iter().collect::<BTreeSet<_>>(),
        "every resource once, none missing"
    );
    assert!(seen == stored, "the exported resources are the stored ones");

    sigkill(&mut gateway.child);
    audit_verifies(&url);
    store.close().await;
    drop(db);
}

// ---------------------------------------------------------------------------------------------
// 5. Key rotation

/// `fhirgate keys status` under `spec`: the stored versions per key id.
fn keys_status(url: &DatabaseUrl, spec: &str) -> BTreeMap<String, i64> {
    let out = run(fhirgate()
        .args(["keys", "status"])
        .env("FHIRGATE_DATABASE_URL", url.expose())
        .env("FHIRGATE_MASTER_KEY", spec));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    serde_json::from_value(line["versions_by_key"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_killed_ten_times_leaves_every_resource_readable_and_ends_under_the_new_key()
{
    const PATIENTS: usize = 1000;
    const BATCH: &str = "10"; // 100 batches
    let mut chaos = Chaos::new("key rotation");
    let (db, url) = TestDb::create().await;
    let old = master_key();
    let new = test_master_key().replace("test1:", "test2:");
    let both = format!("{new},{old}");

    // Everything is written under the old key...
    let mut writer = serve(&url, &[]).await;
    let practice = cli_practice(&url, "Rotation Therapy");
    let scopes = "system/Patient.cruds";
    let client = cli_client(&url, &practice, "external_system", scopes);
    let api = Api::new(&writer.base, token(&writer.base, &client, scopes).await);
    api.create_all((0..PATIENTS).map(patient).collect()).await;
    let before = api.all_patients().await;
    assert_eq!(before.len(), PATIENTS);
    sigkill(&mut writer.child);
    assert_eq!(
        keys_status(&url, &old),
        BTreeMap::from([("test1".to_owned(), PATIENTS as i64)])
    );

    // ...then a gateway holding both keys serves while the rotation runs and is killed.
    // (Its access tokens are signed under the new active key: the client asks again.)
    let mut reader = serve(&url, &[("FHIRGATE_MASTER_KEY", &both)]).await;
    let api = Api::new(&reader.base, token(&reader.base, &client, scopes).await);
    let rotate = || {
        let mut child = fhirgate()
            .args(["keys", "rotate", "--batch-size", BATCH])
            .env("FHIRGATE_DATABASE_URL", url.expose())
            .env("FHIRGATE_MASTER_KEY", &both)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Its progress: one stderr line per committed batch.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("re-encrypted") && tx.send(line).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    };
    let mut rotated = 0;
    for kill in 1..=KILLS {
        let (mut child, progress) = rotate();
        let (batches, delay) = chaos.point(1..=4, 0..=15);
        let mut seen = 0;
        progress_to(&mut child, "key rotation", batches, || {
            seen += progress.try_iter().count() as u64;
            std::future::ready(seen)
        })
        .await;
        tokio::time::sleep(delay).await;
        sigkill(&mut child);
        // Whole rows only: every version is under one key or the other, and reads back.
        let counts = keys_status(&url, &both);
        assert_eq!(counts.values().sum::<i64>(), PATIENTS as i64, "{counts:?}");
        let now_rotated = counts.get("test2").copied().unwrap_or(0);
        assert!(now_rotated > rotated, "{counts:?} after {rotated}");
        rotated = now_rotated;
        chaos.say(format!(
            "kill {kill}/{KILLS} after {batches} more batches and {delay:?}: {counts:?}"
        ));
        assert!(
            api.all_patients().await == before,
            "a resource reads back differently after kill {kill}"
        );
    }
    let out = run(fhirgate()
        .args(["keys", "rotate", "--batch-size", BATCH])
        .env("FHIRGATE_DATABASE_URL", url.expose())
        .env("FHIRGATE_MASTER_KEY", &both));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["reencrypted"], PATIENTS as i64 - rotated);
    assert_eq!(done["versions_by_key"], json!({ "test2": PATIENTS }));
    assert_eq!(
        keys_status(&url, &both),
        BTreeMap::from([("test2".to_owned(), PATIENTS as i64)])
    );
    // Every resource reads back identical, and the blind indexes still find them.
    assert!(api.all_patients().await == before);
    let (id, _) = before
        .iter()
        .find(|(_, p)| p["name"][0]["family"] == "Killington500")
        .unwrap();
    let res = api
        .get("/fhir/r4/Patient?family=killington500&identifier=urn:oid:1.2.36.146.595.217.0.1|KILL-00500")
        .await;
    let bundle: Value = res.json().await.unwrap();
    assert_eq!(
        bundle["entry"].as_array().map(Vec::len),
        Some(1),
        "{bundle}"
    );
    assert_eq!(bundle["entry"][0]["resource"]["id"], id.as_str());

    sigkill(&mut reader.child);
    audit_verifies(&url);
    drop(db);
}
