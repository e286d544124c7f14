//! Load benchmark: starts the real gateway in-process (as the tests do, through
//! `Application::build`) on a fresh database and drives it with an in-process HTTP client at a
//! fixed concurrency for a fixed time per scenario. Every scenario is reported beside `baseline`
//! (`GET /healthz`: a constant body, no database), so the figures read as "what this endpoint
//! costs over the bare HTTP stack" on whatever machine runs it.
//!
//! ```text
//! cargo bench --bench gateway                 # every scenario
//! cargo bench --bench gateway -- metadata     # baseline + scenarios whose name contains "metadata"
//! cargo bench --bench gateway -- export       # baseline + the bulk export run
//! ```
//!
//! `export_system` is not a load scenario but one timed run: it seeds `BENCH_EXPORT_PATIENTS`
//! (default 100,000) patients straight through `Store::write_resources` (sealed and indexed as a
//! create would, 1,000 per transaction), then times a whole system-level `$export` through the
//! gate (kick-off, polls, every file downloaded and counted) and prints the peak RSS (VmHWM)
//! before and after it.
//!
//! Environment: `BENCH_SECONDS` (default 10, per scenario, after a 1 s warm-up),
//! `BENCH_CONCURRENCY` (default 32 client tasks), `BENCH_JSON=path` (also write the figures as
//! JSON), `FHIRGATE_BENCH_DATABASE_URL=postgres://...` (benchmark PostgreSQL: a database
//! `fhirgate_bench_<uuid>` is created on that server and dropped afterwards).
//!
//! No tracing subscriber is installed, so nothing logs. The gateway runs in a temp working
//! directory, so nothing it writes lands in the source tree. Client and server share the process
//! and its CPUs; peak RSS is the whole process's (server, client, and the latency samples at four
//! bytes a request).

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

use fhirgate::config::Settings;
use fhirgate::startup::{Application, BuildOptions};
use reqwest::{Client, Method, RequestBuilder};
use support::{peak_rss_mib, reset_peak_rss, BenchDatabase};

const WARM_UP: Duration = Duration::from_secs(1);
const DEFAULT_SECONDS: f64 = 10.0;
const DEFAULT_CONCURRENCY: usize = 32;

/// Adds what a request needs beyond its method and path (headers, a body), from the context
/// set up once the gateway runs (a bearer token, a client key...).
type Prepare = fn(&Context, RequestBuilder) -> RequestBuilder;

/// Which in-process gateway a scenario drives: the real one, or the same gateway built with
/// auditing skipped (to report what auditing costs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Gateway {
    Audited,
    Unaudited,
}

/// One endpoint under load.
struct Scenario {
    name: &'static str,
    method: Method,
    path: fn(&Context) -> String,
    gateway: Gateway,
    prepare: Option<Prepare>,
}

/// What authenticated scenarios need: a registered client with its signing key, a token, and
/// the id of an audit event to read.
struct Context {
    client_id: String,
    key: jsonwebtoken::EncodingKey,
    token: String,
    token_url: String,
    audit_event_id: String,
    patient_id: String,
    /// The body of `transaction_100`.
    transaction: String,
}

/// Patients seeded before the Patient scenarios (searches pick one among them).
const SEEDED_PATIENTS: usize = 1000;

fn bench_patient(i: usize) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:bench:mrn", "value": format!("MRN-{i:06}") }],
        "name": [{ "family": format!("Benchmark{}", i % 97), "given": ["Pat", "Q"] }],
        "gender": if i % 2 == 0 { "female" } else { "male" },
        "birthDate": format!("19{:02}-0{}-1{}", 40 + i % 60, 1 + i % 9, i % 10),
        "telecom": [{ "system": "phone", "value": "555-0100" }],
        "address": [{ "line": ["1 Bench Street"], "city": "Springfield", "postalCode": "12345" }]
    })
}

impl Context {
    /// A fresh ES384 client assertion (unique jti), as a SMART backend-services client sends.
    fn assertion(&self) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs();
        let claims = serde_json::json!({
            "iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
            "exp": now + 240, "jti": uuid::Uuid::new_v4().to_string(),
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
        header.kid = Some("bench-key".into());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign the assertion")
    }
}

/// The scenarios, `baseline` first. A new scenario is one more entry here.
fn scenarios() -> Vec<Scenario> {
    let plain = |name, path: fn(&Context) -> String| Scenario {
        name,
        method: Method::GET,
        path,
        gateway: Gateway::Audited,
        prepare: None,
    };
    let audit_read = |ctx: &Context| format!("/fhir/r4/AuditEvent/{}", ctx.audit_event_id);
    vec![
        plain("baseline", |_| "/healthz".into()),
        Scenario {
            prepare: Some(|_, req| req.header("accept", "application/fhir+json")),
            ..plain("metadata", |_| "/fhir/r4/metadata".into())
        },
        plain("readyz", |_| "/readyz".into()),
        // Client assertion verified (ES384), jti remembered, token signed, event audited.
        Scenario {
            method: Method::POST,
            prepare: Some(|ctx, req| {
                let assertion = ctx.assertion();
                req.form(&[
                    ("grant_type", "client_credentials"),
                    ("scope", "system/AuditEvent.rs"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.as_str()),
                ])
            }),
            ..plain("token", |_| "/auth/token".into())
        },
        // The same gated FHIR read (bearer check, rate limit, scope, tenant query), with its
        // audit event made durable before the response, and without auditing.
        Scenario {
            prepare: Some(|ctx, req| req.bearer_auth(&ctx.token)),
            ..plain("read_audited", audit_read)
        },
        Scenario {
            gateway: Gateway::Unaudited,
            prepare: Some(|ctx, req| req.bearer_auth(&ctx.token)),
            ..plain("read_unaudited", audit_read)
        },
        // Patient: decrypt and serve one version; a blind-index search among the seeded
        // patients; a create (validate, stamp, encrypt, index, write + audit in one commit).
        Scenario {
            prepare: Some(|ctx, req| req.bearer_auth(&ctx.token)),
            ..plain("patient_read", |ctx| {
                format!("/fhir/r4/Patient/{}", ctx.patient_id)
            })
        },
        Scenario {
            prepare: Some(|ctx, req| req.bearer_auth(&ctx.token)),
            ..plain("patient_search_identifier", |_| {
                "/fhir/r4/Patient?identifier=urn:bench:mrn%7CMRN-000421".into()
            })
        },
        Scenario {
            method: Method::POST,
            prepare: Some(|ctx, req| {
                req.bearer_auth(&ctx.token)
                    .header("content-type", "application/fhir+json")
                    .body(bench_patient(7).to_string())
            }),
            ..plain("patient_create", |_| "/fhir/r4/Patient".into())
        },
        // 100 creates in one all-or-nothing transaction (one commit, 100 audit events).
        Scenario {
            method: Method::POST,
            prepare: Some(|ctx, req| {
                req.bearer_auth(&ctx.token)
                    .header("content-type", "application/fhir+json")
                    .header("prefer", "return=minimal")
                    .body(ctx.transaction.clone())
            }),
            ..plain("transaction_100", |_| "/fhir/r4".into())
        },
    ]
}

struct BenchConfig {
    concurrency: usize,
    duration: Duration,
    json_path: Option<PathBuf>,
    filters: Vec<String>,
}

impl BenchConfig {
    fn from_env_and_args() -> Result<Self, String> {
        let concurrency = env_number("BENCH_CONCURRENCY", DEFAULT_CONCURRENCY)?;
        let seconds = env_number("BENCH_SECONDS", DEFAULT_SECONDS)?;
        if concurrency == 0 {
            return Err("BENCH_CONCURRENCY must be at least 1".into());
        }
        if !(seconds > 0.0 && seconds.is_finite()) {
            return Err("BENCH_SECONDS must be a positive number".into());
        }
        // cargo passes flags of its own (`--bench`); anything else is a scenario name filter.
        let filters = std::env::args()
            .skip(1)
            .filter(|arg| !arg.starts_with('-'))
            .collect();
        Ok(Self {
            concurrency,
            duration: Duration::from_secs_f64(seconds),
            // Absolute now: the bench runs in a temp working directory.
            json_path: match std::env::var_os("BENCH_JSON").filter(|p| !p.is_empty()) {
                Some(path) => Some(
                    std::path::absolute(&path).map_err(|e| format!("BENCH_JSON={path:?}: {e}"))?,
                ),
                None => None,
            },
            filters,
        })
    }

    /// Whether the filters (or their absence) select the `export_system` run.
    fn runs_export(&self) -> bool {
        self.filters.is_empty()
            || self
                .filters
                .iter()
                .any(|f| EXPORT_SCENARIO.contains(f.as_str()))
    }

    fn selects(&self, scenario: &Scenario) -> bool {
        scenario.name == "baseline"
            || self.filters.is_empty()
            || self
                .filters
                .iter()
                .any(|f| scenario.name.contains(f.as_str()))
    }
}

fn env_number<T: FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .parse()
            .map_err(|_| format!("{name}={value:?} is not a valid number")),
        _ => Ok(default),
    }
}

fn main() -> ExitCode {
    let config = match BenchConfig::from_env_and_args() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("gateway bench: {err}");
            return ExitCode::from(2);
        }
    };
    let selected: Vec<Scenario> = scenarios()
        .into_iter()
        .filter(|s| config.selects(s))
        .collect();
    if selected.len() == 1 && !config.filters.is_empty() && !config.runs_export() {
        let names: Vec<&str> = scenarios().iter().map(|s| s.name).collect();
        eprintln!(
            "gateway bench: no scenario matches {:?}; known: {}",
            config.filters,
            names.join(", ")
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    runtime.block_on(run(config, selected))
}

async fn run(config: BenchConfig, scenarios: Vec<Scenario>) -> ExitCode {
    // The gateway runs in a temp working directory: whatever it writes relative to it (the
    // generated development master key in data/) stays out of the source tree and is removed.
    let workdir = tempfile::tempdir().expect("create a temp working directory");
    let original_dir = std::env::current_dir().expect("read the current directory");
    std::env::set_current_dir(workdir.path()).expect("enter the temp working directory");
    let db = BenchDatabase::create(workdir.path()).await;
    // A fixed bench-only master key (no development key is generated), one public URL for both
    // gateways (so a token of one is valid at the other), and quotas too large to interfere:
    // the limiter still runs on every request, as it does in production.
    let settings = Settings::from_toml(&format!(
        "listen = '127.0.0.1:0'\nlog_level = 'warn'\ndatabase_url = {}\n\
         master_key = 'bench1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA='\n\
         public_url = 'http://gateway.bench'\n\
         [rate_limit]\nclient_points = 4000000000\npractice_points = 4000000000\n\
         global_points = 4000000000\ntoken_ip_points = 4000000000\n{}",
        toml_string(&db.url),
        support::claims_settings()
    ))
    .expect("bench settings are valid");
    let http_workers = match settings.workers {
        0 => available_cpus(),
        n => n,
    };
    let app = Application::build(settings.clone())
        .await
        .expect("the gateway starts on the bench database");
    let base_url = format!("http://{}", app.local_addr());
    let handle = app.handle();
    let store = app.store();
    let server = tokio::spawn(app.run_until_stopped());
    let unaudited =
        Application::build_with_options(settings.clone(), BuildOptions { skip_audit: true })
            .await
            .expect("the unaudited gateway starts");
    let unaudited_url = format!("http://{}", unaudited.local_addr());
    let unaudited_handle = unaudited.handle();
    let unaudited_server = tokio::spawn(unaudited.run_until_stopped());

    println!(
        "nproc={} concurrency={} duration={}s warmup={}s backend={} http_workers={} (client and server share the process)",
        available_cpus(),
        config.concurrency,
        config.duration.as_secs_f64(),
        WARM_UP.as_secs_f64(),
        db.backend(),
        http_workers,
    );

    let client = Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(config.concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build the HTTP client");

    let context = Arc::new(set_up_context(&*store, &client, &base_url).await);
    // PostgreSQL plans by table statistics, which autovacuum gathers within a minute or so of a
    // bulk load; gather them now rather than measure the plans of tables believed empty (an
    // operator should likewise ANALYZE after a bulk import).
    if db.postgres.is_some() {
        let pool = sqlx::PgPool::connect(&db.url)
            .await
            .expect("connect to analyze");
        sqlx::query("ANALYZE")
            .execute(&pool)
            .await
            .expect("ANALYZE the bench database");
        pool.close().await;
    }
    let mut results = Vec::with_capacity(scenarios.len());
    for scenario in &scenarios {
        let url = match scenario.gateway {
            Gateway::Audited => &base_url,
            Gateway::Unaudited => &unaudited_url,
        };
        results.push(measure(&client, url, scenario, &context, &config).await);
    }
    let export = if config.runs_export() {
        let analyze = db.postgres.as_ref().map(|_| db.url.as_str());
        Some(export_run(&client, &base_url, &*store, &settings, &context, analyze).await)
    } else {
        None
    };

    unaudited_handle.stop(true).await;
    let _ = unaudited_server.await;
    handle.stop(true).await;
    if let Ok(Err(err)) = server.await {
        eprintln!("gateway bench: server stopped with an error: {err}");
    }
    let backend = db.backend();
    db.drop_database().await;
    let _ = std::env::set_current_dir(original_dir);
    drop(workdir);

    let mut report = Report::new(&config, backend, http_workers, results);
    report.export = export;
    report.print_table();
    if let Some(path) = &config.json_path {
        let json = serde_json::to_string_pretty(&report).expect("the report serializes");
        if let Err(err) = std::fs::write(path, json + "\n") {
            eprintln!("gateway bench: cannot write {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// A TOML basic string (the path or URL may hold quotes or backslashes).
fn toml_string(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Registers a practice and a client with an ES384 key, gets a token, and finds an audit event.
async fn set_up_context(
    store: &dyn fhirgate::store::Store,
    client: &Client,
    base_url: &str,
) -> Context {
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
    use base64::Engine;
    use fhirgate::domain::{NewPractice, PracticeName, TimeZoneName};
    use fhirgate::gate::{ClientKeys, NewApiClient, Role, ScopeSet};

    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).expect("generate a key");
    let point = pair.public_key().as_ref();
    let jwks = serde_json::json!({ "keys": [{
        "kty": "EC", "crv": "P-384", "kid": "bench-key", "alg": "ES384",
        "x": b64(&point[1..49]), "y": b64(&point[49..97]),
    }] });
    let practice = store
        .create_practice(&NewPractice {
            name: PracticeName::parse("Bench Practice").expect("valid name"),
            timezone: TimeZoneName::default(),
            npi: None,
            tax_id: None,
        })
        .await
        .expect("create the bench practice");
    let api_client = store
        .create_client(&NewApiClient {
            practice_id: practice.id,
            name: "bench".into(),
            role: Role::PracticeAdmin,
            scopes: ScopeSet::parse(BENCH_SCOPES).expect("valid scope"),
            keys: ClientKeys::inline(&jwks.to_string()).expect("valid JWKS"),
        })
        .await
        .expect("register the bench client");
    let mut context = Context {
        client_id: api_client.client_id,
        key: jsonwebtoken::EncodingKey::from_ec_der(
            pair.to_pkcs8v1().expect("export the key").as_ref(),
        ),
        token: String::new(),
        token_url: "http://gateway.bench/auth/token".into(),
        audit_event_id: String::new(),
        patient_id: String::new(),
        transaction: String::new(),
    };
    let assertion = context.assertion();
    let token: serde_json::Value = client
        .post(format!("{base_url}/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", BENCH_SCOPES),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ])
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token response");
    context.token = token["access_token"]
        .as_str()
        .expect("an access token")
        .to_owned();
    let bundle: serde_json::Value = client
        .get(format!("{base_url}/fhir/r4/AuditEvent?_count=1"))
        .bearer_auth(&context.token)
        .send()
        .await
        .expect("audit search")
        .json()
        .await
        .expect("a Bundle");
    context.audit_event_id = bundle["entry"][0]["resource"]["id"]
        .as_str()
        .expect("an audit event")
        .to_owned();
    for i in 0..SEEDED_PATIENTS {
        let res = client
            .post(format!("{base_url}/fhir/r4/Patient"))
            .bearer_auth(&context.token)
            .header("content-type", "application/fhir+json")
            .body(bench_patient(i).to_string())
            .send()
            .await
            .expect("seed a patient");
        assert_eq!(res.status(), 201, "seeding patients");
        if i == 421 {
            let created: serde_json::Value = res.json().await.expect("a Patient");
            context.patient_id = created["id"].as_str().expect("an id").to_owned();
        }
    }
    let payer: serde_json::Value = client
        .post(format!("{base_url}/fhir/r4/Organization"))
        .bearer_auth(&context.token)
        .header("content-type", "application/fhir+json")
        .body(
            serde_json::json!({ "resourceType": "Organization", "name": "Bench Payer" })
                .to_string(),
        )
        .send()
        .await
        .expect("create the payer")
        .json()
        .await
        .expect("an Organization");
    context.transaction = bench_transaction(payer["id"].as_str().expect("an id")).to_string();
    context
}

/// A 100-entry transaction: 50 new patients, each with a coverage that references it by
/// `urn:uuid` and an existing payer (50 references rewritten, one payer looked up).
fn bench_transaction(payer: &str) -> serde_json::Value {
    let mut entries = Vec::with_capacity(100);
    for i in 0..50 {
        let urn = format!("urn:uuid:00000000-0000-4000-8000-{i:012}");
        entries.push(serde_json::json!({
            "fullUrl": urn,
            "resource": bench_patient(10_000 + i),
            "request": { "method": "POST", "url": "Patient" }
        }));
        entries.push(serde_json::json!({
            "resource": {
                "resourceType": "Coverage",
                "status": "active",
                "identifier": [{ "system": "urn:bench:member", "value": format!("MEM-{i:06}") }],
                "beneficiary": { "reference": urn },
                "payor": [{ "reference": format!("Organization/{payer}") }]
            },
            "request": { "method": "POST", "url": "Coverage" }
        }));
    }
    serde_json::json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries })
}

const BENCH_SCOPES: &str =
    "system/AuditEvent.rs system/Patient.cruds system/Coverage.cruds system/Organization.cruds";

/// The request every worker of a scenario sends, shared between the worker tasks.
struct Target {
    method: Method,
    url: String,
    prepare: Option<Prepare>,
    context: Arc<Context>,
}

impl Target {
    fn request(&self, client: &Client) -> RequestBuilder {
        let req = client.request(self.method.clone(), &self.url);
        match self.prepare {
            Some(prepare) => prepare(&self.context, req),
            None => req,
        }
    }
}

/// What one worker saw: the latency of every response in microseconds, and its failures
/// (non-2xx responses, unreadable bodies and transport errors).
#[derive(Default)]
struct Samples {
    latencies_us: Vec<u32>,
    errors: u64,
    transport_errors: u64,
}

async fn measure(
    client: &Client,
    base_url: &str,
    scenario: &Scenario,
    context: &Arc<Context>,
    config: &BenchConfig,
) -> Measurement {
    let target = Arc::new(Target {
        method: scenario.method.clone(),
        url: format!("{base_url}{}", (scenario.path)(context)),
        prepare: scenario.prepare,
        context: Arc::clone(context),
    });
    drive(client, &target, config.concurrency, WARM_UP).await;

    let rss_reset = reset_peak_rss();
    let started = Instant::now();
    let samples = drive(client, &target, config.concurrency, config.duration).await;
    let elapsed = started.elapsed();
    let peak_rss_mib = peak_rss_mib();

    let mut latencies = samples.latencies_us;
    latencies.sort_unstable();
    let requests = latencies.len() as u64 + samples.transport_errors;
    Measurement {
        name: scenario.name,
        method: scenario.method.to_string(),
        path: (scenario.path)(context),
        requests,
        errors: samples.errors,
        elapsed_s: elapsed.as_secs_f64(),
        requests_per_sec: requests as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile_ms(&latencies, 50.0),
        p99_ms: percentile_ms(&latencies, 99.0),
        p999_ms: percentile_ms(&latencies, 99.9),
        max_ms: latencies.last().map(|&us| f64::from(us) / 1000.0),
        peak_rss_mib,
        peak_rss_reset: rss_reset,
        throughput_ratio: None,
        p99_ratio: None,
    }
}

/// Runs `concurrency` workers sending the target's request back to back for `duration`, and
/// merges what they saw.
async fn drive(
    client: &Client,
    target: &Arc<Target>,
    concurrency: usize,
    duration: Duration,
) -> Samples {
    let deadline = Instant::now() + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(worker(client.clone(), Arc::clone(target), deadline)))
        .collect();
    let mut merged = Samples::default();
    for worker in workers {
        let samples = worker.await.expect("a bench worker panicked");
        merged.latencies_us.extend_from_slice(&samples.latencies_us);
        merged.errors += samples.errors;
        merged.transport_errors += samples.transport_errors;
    }
    merged
}

async fn worker(client: Client, target: Arc<Target>, deadline: Instant) -> Samples {
    let mut samples = Samples::default();
    while Instant::now() < deadline {
        let started = Instant::now();
        match target.request(&client).send().await {
            Ok(response) => {
                let success = response.status().is_success();
                // The body is part of the request's cost, and the connection is only reused
                // once it has been read.
                let body = response.bytes().await;
                let micros = started.elapsed().as_micros();
                samples
                    .latencies_us
                    .push(u32::try_from(micros).unwrap_or(u32::MAX));
                if !success || body.is_err() {
                    samples.errors += 1;
                }
            }
            Err(_) => {
                samples.errors += 1;
                samples.transport_errors += 1;
            }
        }
    }
    samples
}

/// Nearest-rank percentile of sorted microsecond samples, in milliseconds.
fn percentile_ms(sorted_us: &[u32], percent: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = (percent / 100.0 * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    Some(f64::from(sorted_us[index]) / 1000.0)
}

#[derive(serde::Serialize)]
struct Measurement {
    name: &'static str,
    method: String,
    path: String,
    requests: u64,
    errors: u64,
    elapsed_s: f64,
    requests_per_sec: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    p999_ms: Option<f64>,
    max_ms: Option<f64>,
    peak_rss_mib: Option<f64>,
    /// False when /proc/self/clear_refs could not be written: the peak is then since start.
    peak_rss_reset: bool,
    /// requests_per_sec / baseline's.
    throughput_ratio: Option<f64>,
    /// p99_ms / baseline's.
    p99_ratio: Option<f64>,
}

#[derive(serde::Serialize)]
struct Report {
    nproc: usize,
    concurrency: usize,
    duration_s: f64,
    warmup_s: f64,
    backend: &'static str,
    http_workers: usize,
    scenarios: Vec<Measurement>,
    export: Option<ExportMeasurement>,
}

impl Report {
    fn new(
        config: &BenchConfig,
        backend: &'static str,
        http_workers: usize,
        mut scenarios: Vec<Measurement>,
    ) -> Self {
        let (base_rps, base_p99) = scenarios
            .iter()
            .find(|m| m.name == "baseline")
            .map_or((None, None), |b| (Some(b.requests_per_sec), b.p99_ms));
        let ratio = |value: Option<f64>, base: Option<f64>| match (value, base) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        };
        for m in &mut scenarios {
            m.throughput_ratio = ratio(Some(m.requests_per_sec), base_rps);
            m.p99_ratio = ratio(m.p99_ms, base_p99);
        }
        Self {
            nproc: available_cpus(),
            concurrency: config.concurrency,
            duration_s: config.duration.as_secs_f64(),
            warmup_s: WARM_UP.as_secs_f64(),
            backend,
            http_workers,
            scenarios,
            export: None,
        }
    }

    fn print_table(&self) {
        let cell = |value: Option<f64>, decimals: usize| match value {
            Some(v) => format!("{v:.decimals$}"),
            None => "-".to_owned(),
        };
        let width = self
            .scenarios
            .iter()
            .map(|m| m.name.len())
            .max()
            .unwrap_or(0)
            .max("scenario".len());
        println!(
            "{:<width$}  {:>10}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>7}  {:>8}",
            "scenario",
            "req/s",
            "req/s÷b",
            "p50 ms",
            "p99 ms",
            "p99÷b",
            "p99.9 ms",
            "max ms",
            "errors",
            "RSS MiB",
        );
        for m in &self.scenarios {
            println!(
                "{:<width$}  {:>10}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>7}  {:>8}",
                m.name,
                cell(Some(m.requests_per_sec), 1),
                cell(m.throughput_ratio, 2),
                cell(m.p50_ms, 3),
                cell(m.p99_ms, 3),
                cell(m.p99_ratio, 2),
                cell(m.p999_ms, 3),
                cell(m.max_ms, 3),
                m.errors,
                cell(m.peak_rss_mib, 1),
            );
        }
        println!("(÷b: ratio to baseline; RSS MiB: peak resident set of the whole process during the scenario)");
        if self.scenarios.iter().any(|m| !m.peak_rss_reset) {
            println!("note: /proc/self/clear_refs was not writable; RSS MiB is the peak since the process started");
        }
        if let Some(e) = &self.export {
            e.print();
        }
    }
}

/// The name the `export_system` run answers to in filters.
const EXPORT_SCENARIO: &str = "export_system";
/// Patients per `write_resources` call while seeding the export run.
const SEED_BATCH: usize = 1_000;

/// What the `export_system` run measured.
#[derive(serde::Serialize)]
struct ExportMeasurement {
    seeded_patients: usize,
    seed_s: f64,
    exported_resources: u64,
    files: usize,
    ndjson_mib: f64,
    /// Kick-off to the last byte of the last file.
    export_s: f64,
    resources_per_sec: f64,
    /// VmHWM before the export (since the process started: seeding and earlier scenarios).
    peak_rss_before_mib: Option<f64>,
    rss_before_mib: Option<f64>,
    /// VmHWM after the export: its own peak when the counter could be reset before it.
    peak_rss_after_mib: Option<f64>,
    peak_rss_reset: bool,
}

impl ExportMeasurement {
    fn print(&self) {
        let mib = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} MiB"));
        println!(
            "{EXPORT_SCENARIO}: seeded {} patients through the store in {:.1} s; exported {} resources \
             ({} files, {:.1} MiB NDJSON) through the gate in {:.2} s, kick-off to last byte \
             ({:.0} resources/s)",
            self.seeded_patients,
            self.seed_s,
            self.exported_resources,
            self.files,
            self.ndjson_mib,
            self.export_s,
            self.resources_per_sec,
        );
        println!(
            "{EXPORT_SCENARIO}: peak RSS before the export {} (RSS {}), after it {}{}",
            mib(self.peak_rss_before_mib),
            mib(self.rss_before_mib),
            mib(self.peak_rss_after_mib),
            if self.peak_rss_reset {
                " (peak counter reset at the kick-off: the export's own peak)"
            } else {
                " (peak since the process started)"
            }
        );
    }
}

/// VmRSS from /proc/self/status, in MiB.
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Seeds patients through the store, then times a system-level export through the gate.
async fn export_run(
    client: &Client,
    base_url: &str,
    store: &dyn fhirgate::store::Store,
    settings: &Settings,
    context: &Context,
    analyze: Option<&str>,
) -> ExportMeasurement {
    use fhirgate::fhir::resources::{bulk, patient::PATIENT};

    let patients = env_number("BENCH_EXPORT_PATIENTS", 100_000usize)
        .expect("BENCH_EXPORT_PATIENTS is a number");
    let practice = store
        .get_client(&context.client_id)
        .await
        .expect("the bench client")
        .practice_id;
    let master = fhirgate::keys::MasterSecret::from_settings(settings).expect("the bench key");
    let vault =
        fhirgate::startup::open_vault(store, &fhirgate::crypto::PhiKeys::new(master.keyring()))
            .await
            .expect("the PHI vault opens");
    let started = Instant::now();
    for first in (0..patients).step_by(SEED_BATCH) {
        let writes: Vec<_> = (first..(first + SEED_BATCH).min(patients))
            .map(|i| {
                bulk::new_resource(&PATIENT, &vault, &practice, &bench_patient(i))
                    .expect("a valid bench patient")
            })
            .collect();
        store
            .write_resources(&practice, &writes, &[])
            .await
            .expect("seed a batch of patients");
    }
    let seed_s = started.elapsed().as_secs_f64();
    if let Some(url) = analyze {
        let pool = sqlx::PgPool::connect(url)
            .await
            .expect("connect to analyze");
        sqlx::query("ANALYZE")
            .execute(&pool)
            .await
            .expect("ANALYZE");
        pool.close().await;
    }

    let peak_rss_before_mib = peak_rss_mib();
    let rss_before_mib = rss_mib();
    let peak_rss_reset = reset_peak_rss();
    let started = Instant::now();
    let res = client
        .get(format!("{base_url}/fhir/r4/$export"))
        .bearer_auth(&context.token)
        .header("prefer", "respond-async")
        .send()
        .await
        .expect("kick-off");
    assert_eq!(res.status(), 202, "kick-off");
    let status = res
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .expect("Content-Location")
        .replace("http://gateway.bench", base_url);
    let manifest: serde_json::Value = loop {
        let res = client
            .get(&status)
            .bearer_auth(&context.token)
            .send()
            .await
            .expect("status");
        match res.status().as_u16() {
            200 => break res.json().await.expect("the manifest"),
            202 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("export status {other}"),
        }
    };
    let mut exported = 0u64;
    let mut bytes = 0u64;
    let files = manifest["output"].as_array().expect("output").len();
    for file in manifest["output"].as_array().expect("output") {
        let url = file["url"]
            .as_str()
            .expect("a file URL")
            .replace("http://gateway.bench", base_url);
        let mut res = client
            .get(url)
            .bearer_auth(&context.token)
            .header("accept", "application/fhir+ndjson")
            .send()
            .await
            .expect("download");
        assert_eq!(res.status(), 200, "download");
        let mut lines = 0u64;
        while let Some(chunk) = res.chunk().await.expect("file body") {
            bytes += chunk.len() as u64;
            lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        }
        assert_eq!(Some(lines), file["count"].as_u64(), "lines = count");
        exported += lines;
    }
    let export_s = started.elapsed().as_secs_f64();
    ExportMeasurement {
        seeded_patients: patients,
        seed_s,
        exported_resources: exported,
        files,
        ndjson_mib: bytes as f64 / (1024.0 * 1024.0),
        export_s,
        resources_per_sec: exported as f64 / export_s,
        peak_rss_before_mib,
        rss_before_mib,
        peak_rss_after_mib: peak_rss_mib(),
        peak_rss_reset,
    }
}
