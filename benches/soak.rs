//! Soak: the gateway under its bench rates of every kind of traffic at once, for ten minutes,
//! reported minute by minute so a drift shows (throughput falling, p99 climbing, memory growing).
//!
//! ```text
//! FHIRGATE_BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench soak
//! BENCH_SOAK_SECONDS=120 BENCH_SOAK_INTERVAL=20 cargo bench --bench soak      # short, SQLite
//! ```
//!
//! The gateway is the real binary (`fhirgate serve`) in a process of its own, so the RSS column is
//! the gateway's alone (`VmRSS` of its process at the end of each interval), not the load
//! generator's or the simulator's, which live in this process. Four open-loop streams run at
//! once, each request leaving at its scheduled time whether or not earlier ones were answered
//! (latency counts from that time):
//!
//! - `reads` (`BENCH_SOAK_READ_RATE`, default 200/s): `GET /fhir/r4/Patient/{id}` of the patients
//!   written before the run, and every fourth one a search by identifier;
//! - `writes` (`BENCH_SOAK_WRITE_RATE`, default 50/s): `POST /fhir/r4/Patient`;
//! - `webhooks` (`BENCH_SOAK_WEBHOOK_RATE`, default 500/s, the webhooks bench's rate): signed
//!   `patient.changed` events, each making the inbox worker fetch the patient from the simulated EHR
//!   and upsert it;
//! - `pushes` (`BENCH_SOAK_PUSH_RATE`, default 200/s, the claim_push bench's rate): claim status
//!   changes, each queued in the outbox in the change's transaction and pushed to the EHR as a
//!   ClaimResponse; claims cycle accepted -> denied -> appealed -> accepted so a few hundred
//!   claims carry the whole run. `deliv p99` is event-to-delivery (change committed to the
//!   simulator storing it) of the changes made in that interval.
//!
//! The traffic is spread round robin over `BENCH_SOAK_PRACTICES` (default 4) practices, each
//! with its own client and its own connection to the one simulated EHR: a gateway serves many
//! practices, and each practice's audited writes take turns on that practice's audit chain.
//!
//! `BENCH_SOAK_SCALE` (default 1) multiplies the four rates, keeping the mix: the rates a machine
//! holds are found with it. Each stream keeps at most `BENCH_SOAK_MAX_INFLIGHT` (2,000) requests
//! open, waiting behind schedule past that (the wait counts in the latency), and the client gives
//! a request `BENCH_SOAK_TIMEOUT_SECS` (10) to be answered: an overloaded gateway shows as late
//! answers and timeouts, not as the load generator running out of file descriptors.
//!
//! An error is any answer other than the expected 2xx, or no answer. Per interval it prints each
//! stream's achieved rate and p99, the errors, the inbox and outbox backlog, the gateway's RSS and
//! where the CPU went (the gateway, PostgreSQL, this process with the load and the simulator, the
//! whole host; % of one core); `BENCH_SOAK_CSV=path` also writes the rows as CSV. Exits 1 when
//! more than 0.1% of requests failed, or a pushed update was lost or applied twice.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fhirgate::config::DatabaseUrl;
use fhirgate::crypto::Keyring;
use fhirgate::gate::Role;
use fhirgate::store::{PoolOptions, Store};
use fhirgate::sync::webhooks::notification::{sign, signing_key};
use fhirgate::sync::Connections;
use fhirgate_ehr_sim::{Personality, SimConfig, Simulator};
use serde_json::json;
use support::client::{bench_client, Api};
use support::BenchDatabase;
use time::OffsetDateTime;

const MASTER_KEY: &str = "bench1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SCOPES: &str = "system/Patient.cruds system/Organization.cruds system/Coverage.cruds \
    system/Claim.cruds system/ClaimResponse.cruds";
/// The statuses a claim cycles through once accepted: each change is pushed to the EHR.
const CYCLE: [&str; 3] = ["denied", "appealed", "accepted"];
/// Patients written before the run, for the reads.
const SEEDED_PATIENTS: usize = 500;
/// Stream names, in column order.
const STREAMS: [&str; 4] = ["reads", "writes", "webhooks", "pushes"];

struct Options {
    seconds: u64,
    interval: u64,
    /// The bench's target rates times `BENCH_SOAK_SCALE`.
    rates: [u64; 4],
    scale: f64,
    claims: usize,
    practices: usize,
    /// Requests a stream keeps open at most; past it the stream waits for an answer (and the
    /// wait counts in the latency, which runs from the scheduled time).
    max_inflight: usize,
    /// The client's timeout: a request unanswered by then is a failure, "timed out".
    timeout: Duration,
}

/// One practice of the load: its client, its connection to the EHR, the patients its reads read.
struct Tenant {
    api: Arc<Api>,
    connection: String,
    webhook_url: String,
    seeded: Vec<String>,
}

fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .ok_or_else(|| format!("{name} must be a whole number")),
        Err(_) => Ok(default),
    }
}

fn options() -> Result<Options, String> {
    let seconds = env_number("BENCH_SOAK_SECONDS", 600)?;
    let interval = env_number("BENCH_SOAK_INTERVAL", 60)?;
    if seconds == 0 || interval == 0 || seconds > 3000 {
        return Err("BENCH_SOAK_SECONDS must be 1 to 3000, BENCH_SOAK_INTERVAL at least 1".into());
    }
    let scale = match std::env::var("BENCH_SOAK_SCALE") {
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0 && *s <= 10.0)
            .ok_or("BENCH_SOAK_SCALE must be a number above 0, at most 10")?,
        Err(_) => 1.0,
    };
    let rates = [
        env_number("BENCH_SOAK_READ_RATE", 200)?,
        env_number("BENCH_SOAK_WRITE_RATE", 50)?,
        env_number("BENCH_SOAK_WEBHOOK_RATE", 500)?,
        env_number("BENCH_SOAK_PUSH_RATE", 200)?,
    ]
    .map(|r| (r as f64 * scale).round() as u64);
    // Each claim gets a change every `claims / push rate` seconds: long enough for the previous
    // one to be answered at any sane latency.
    let claims = env_number("BENCH_SOAK_CLAIMS", (rates[3] * 2).max(1))? as usize;
    // The load is a gateway's, not one practice's: each practice's audited writes take turns on
    // its own audit chain, so one practice's combined write rate has a ceiling of its own.
    let practices = env_number("BENCH_SOAK_PRACTICES", 4)? as usize;
    if practices == 0 || practices > 64 {
        return Err("BENCH_SOAK_PRACTICES must be 1 to 64".into());
    }
    let max_inflight = env_number("BENCH_SOAK_MAX_INFLIGHT", 2000)?.max(1) as usize;
    let timeout = Duration::from_secs(env_number("BENCH_SOAK_TIMEOUT_SECS", 10)?.max(1));
    Ok(Options {
        seconds,
        interval,
        rates,
        scale,
        claims: claims.max(practices),
        practices,
        max_inflight,
        timeout,
    })
}

fn main() -> ExitCode {
    let options = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the runtime");
    runtime.block_on(run(options))
}

/// One answered (or failed) request: its stream, the interval it was due in, its latency.
#[derive(Default)]
struct Samples {
    /// `[interval][stream]` latencies in ms of the successful requests.
    ok: Vec<[Vec<f32>; 4]>,
    /// `[interval][stream]` failures.
    failed: Vec<[u64; 4]>,
    /// Failures by stream and HTTP status (`NO_ANSWER`, `TIMED_OUT` or the status).
    causes: std::collections::BTreeMap<(usize, u16), u64>,
}

impl Samples {
    fn record(&mut self, interval: usize, stream: usize, ms: Result<f32, u16>) {
        while self.ok.len() <= interval {
            self.ok.push(Default::default());
            self.failed.push([0; 4]);
        }
        match ms {
            Ok(ms) => self.ok[interval][stream].push(ms),
            Err(status) => {
                self.failed[interval][stream] += 1;
                *self.causes.entry((stream, status)).or_default() += 1;
            }
        }
    }
}

/// A failure without a status: no connection, or the connection or the body was cut off.
const NO_ANSWER: u16 = 0;
/// A failure without a status: the client's timeout (`BENCH_SOAK_TIMEOUT_SECS`) ran out.
const TIMED_OUT: u16 = 1;

fn cause(status: u16) -> String {
    match status {
        NO_ANSWER => "no answer".into(),
        TIMED_OUT => "timed out".into(),
        s => s.to_string(),
    }
}

/// What the sampler saw at the end of an interval.
#[derive(Clone, Copy, Default)]
struct Gauges {
    rss_mib: f64,
    inbox: i64,
    outbox: i64,
    /// CPU used in the interval, in % of one core: the gateway's process, PostgreSQL's
    /// processes (0 on SQLite), this process (load generator and simulator) and the whole host.
    cpu: [f64; 4],
}

/// CPU time so far (clock ticks) of one process: utime + stime of `/proc/{pid}/stat`.
fn process_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The fields after the command, which is in parentheses and may hold spaces.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
    tick(11) + tick(12)
}

/// CPU time so far of every process named `postgres` (the server and its backends).
fn postgres_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "postgres")
        })
        .map(|pid| process_ticks(&pid))
        .sum()
}

/// Busy CPU time so far of the whole host: `/proc/stat`'s cpu line from user to steal, but idle
/// and iowait (the guest fields after steal are already counted in user and nice).
fn host_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0;
    };
    line.split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .filter_map(|(_, f)| f.parse::<u64>().ok())
        .sum()
}

/// `[gateway, postgres, bench, host]` CPU ticks so far.
fn cpu_ticks(gateway: u32) -> [u64; 4] {
    [
        process_ticks(&gateway.to_string()),
        postgres_ticks(),
        process_ticks("self"),
        host_ticks(),
    ]
}

fn p99(values: &mut [f32]) -> f32 {
    if values.is_empty() {
        return f32::NAN;
    }
    values.sort_by(f32::total_cmp);
    let rank = (0.99 * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn rss_mib(pid: u32) -> f64 {
    // statm's second field: resident pages (4 KiB on the machines this runs on).
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(f64::NAN, |pages| pages * 4096.0 / (1024.0 * 1024.0))
}

async fn backlog(store: &dyn Store) -> (i64, i64) {
    let inbox = store
        .inbox()
        .queue_stats()
        .await
        .map_or(-1, |s| s.iter().map(|q| q.depth).sum());
    let outbox = store
        .outbox()
        .queue_stats()
        .await
        .map_or(-1, |s| s.iter().map(|q| q.depth).sum());
    (inbox, outbox)
}

/// The gateway binary on `url`, its port; killed when dropped.
struct Gateway {
    child: Child,
    port: u16,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SIGTERM first (a graceful stop), then make sure.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_gateway(url: &str, workdir: &std::path::Path) -> Result<Gateway, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_fhirgate"));
    // The gateway refuses settings it does not know: none of this process's FHIRGATE_ variables
    // (FHIRGATE_BENCH_DATABASE_URL) reach it, only the ones below.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("FHIRGATE_") {
            command.env_remove(name);
        }
    }
    let child = command
        .arg("serve")
        .current_dir(workdir)
        .env("FHIRGATE_DATABASE_URL", url)
        .env("FHIRGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRGATE_MASTER_KEY", MASTER_KEY)
        .env("FHIRGATE_LOG_LEVEL", "error")
        .env("FHIRGATE_ACCESS_TOKEN_LIFETIME_SECS", "3600")
        .env(
            "FHIRGATE_CLAIMS__RULES_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config"),
        )
        .env("FHIRGATE_RATE_LIMIT__CLIENT_POINTS", "4000000000")
        .env("FHIRGATE_RATE_LIMIT__PRACTICE_POINTS", "4000000000")
        .env("FHIRGATE_RATE_LIMIT__GLOBAL_POINTS", "4000000000")
        .env("FHIRGATE_RATE_LIMIT__TOKEN_IP_POINTS", "4000000000")
        .env("FHIRGATE_WEBHOOKS__POLL_INTERVAL_MS", "200")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the gateway: {e}"))?;
    let mut gateway = Gateway { child, port };
    let health = format!("http://127.0.0.1:{port}/healthz");
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(Some(status)) = gateway.child.try_wait() {
            return Err(format!("the gateway exited at start: {status}"));
        }
        if http
            .get(&health)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(gateway);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateway.child.kill().ok();
    Err("the gateway did not answer /healthz within 60 s".into())
}

async fn run(options: Options) -> ExitCode {
    let workdir = tempfile::tempdir().expect("create a temp working directory");
    let db = BenchDatabase::create(workdir.path()).await;
    let code = match soak(&options, &db, workdir.path()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak bench: {e}");
            ExitCode::FAILURE
        }
    };
    db.drop_database().await;
    code
}

async fn soak(
    options: &Options,
    db: &BenchDatabase,
    workdir: &std::path::Path,
) -> Result<bool, String> {
    let gateway = start_gateway(&db.url, workdir).await?;
    let base = format!("http://127.0.0.1:{}", gateway.port);
    let store = fhirgate::store::connect(
        &DatabaseUrl::new(db.url.clone()),
        &PoolOptions {
            max_connections: 2,
            acquire_timeout: Duration::from_secs(30),
        },
    )
    .await
    .map_err(|e| format!("cannot open the bench database: {e}"))?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(options.timeout)
        .build()
        .map_err(|e| e.to_string())?;
    // The EHR, shared by every practice's connection to it (each with a webhook secret).
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = 1000;
    let sim = Simulator::start(config).map_err(|e| format!("the simulator: {e}"))?;
    let keyring = Keyring::parse(MASTER_KEY).expect("the bench key parses");
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().expect("built-in profiles"));
    let connections = Connections::new(store.clone(), &keyring, profiles);
    let ehr_patients = Arc::new(sim.patient_ids());

    eprintln!(
        "soak bench: {} practices; writing {SEEDED_PATIENTS} patients and {} claims",
        options.practices, options.claims
    );
    let mut tenants = Vec::with_capacity(options.practices);
    // (tenant, claim id) of every claim the pushes move.
    let mut claims: Vec<(usize, String)> = Vec::with_capacity(options.claims);
    for t in 0..options.practices {
        let (practice, token) = bench_client(&*store, &http, &base, Role::Billing, SCOPES).await;
        let api = Arc::new(Api {
            http: http.clone(),
            base: base.clone(),
            token,
        });
        let mut spec =
            fhirgate::cli::sandbox_spec(&sim, &practice).ok_or("no simulator credential")?;
        spec.webhook_secret = Some(SECRET.into());
        let connection = connections
            .add(spec)
            .await
            .map_err(|e| format!("the connection: {e}"))?
            .id;

        // What the reads read, and the claims the pushes move.
        let mut seeded = Vec::with_capacity(SEEDED_PATIENTS / options.practices + 1);
        for i in (t..SEEDED_PATIENTS).step_by(options.practices) {
            seeded.push(api.create(patient(i, "seed")).await?);
        }
        let claim_patient = api
            .create(json!({
                "resourceType": "Patient",
                "identifier": [{ "system": format!("urn:fhirgate:connection:{connection}"), "value": "soak-claims" }],
                "name": [{ "family": "Soak" }]
            }))
            .await?;
        let payer = api
            .create(json!({ "resourceType": "Organization", "name": "Soak Payer" }))
            .await?;
        let coverage = api
            .create(json!({
                "resourceType": "Coverage", "status": "active",
                "beneficiary": { "reference": format!("Patient/{claim_patient}") },
                "payor": [{ "reference": format!("Organization/{payer}") }]
            }))
            .await?;
        let claim = json!({
            "resourceType": "Claim", "status": "active",
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional" }] },
            "use": "claim",
            "patient": { "reference": format!("Patient/{claim_patient}") },
            "created": "2026-11-20",
            "provider": { "reference": format!("Organization/{payer}") },
            "priority": { "coding": [{ "code": "normal" }] },
            "insurance": [{ "sequence": 1, "focal": true, "coverage": { "reference": format!("Coverage/{coverage}") } }]
        });
        for _ in (t..options.claims).step_by(options.practices) {
            let id = api.create(claim.clone()).await?;
            api.post(
                &format!("/api/v1/claims/{id}/status"),
                &json!({ "status": "prepared" }),
            )
            .await?;
            api.change(&id, "submitted").await?;
            api.change(&id, "accepted").await?;
            claims.push((t, id));
        }
        tenants.push(Tenant {
            webhook_url: format!("{base}/webhooks/{connection}"),
            api,
            connection,
            seeded,
        });
    }
    let analyzer = db.stand_in_for_autovacuum(Duration::from_secs(30)).await;
    let tenants = Arc::new(tenants);
    let claims = Arc::new(claims);
    let warm_updates = (options.claims * 2) as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while sim.controls().counters().claim_updates_applied < warm_updates {
        if Instant::now() > deadline {
            return Err("the warm-up pushes were not delivered within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!(
        "nproc={} backend={} practices={} seconds={} interval={} scale={} max_inflight={} timeout={}s rates/s: reads={} writes={} webhooks={} pushes={} claims={}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        db.backend(),
        options.practices,
        options.seconds,
        options.interval,
        options.scale,
        options.max_inflight,
        options.timeout.as_secs(),
        options.rates[0],
        options.rates[1],
        options.rates[2],
        options.rates[3],
        options.claims,
    );

    let samples = Arc::new(Mutex::new(Samples::default()));
    let committed: Arc<Mutex<HashMap<String, (usize, OffsetDateTime)>>> = Arc::default();
    let started = tokio::time::Instant::now();
    let run_for = Duration::from_secs(options.seconds);
    let interval = Duration::from_secs(options.interval);
    let intervals = options.seconds.div_ceil(options.interval) as usize;
    let bucket = move |due: tokio::time::Instant| {
        (((due - started).as_secs_f64() / interval.as_secs_f64()) as usize).min(intervals - 1)
    };

    // The sampler: gauges at the end of each interval.
    let gauges = {
        let store = store.clone();
        let pid = gateway.child.id();
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(intervals);
            let mut ticks = cpu_ticks(pid);
            let mut at = tokio::time::Instant::now();
            for i in 1..=intervals {
                let end = (interval * i as u32).min(run_for);
                tokio::time::sleep_until(started + end).await;
                let now_ticks = cpu_ticks(pid);
                // /proc counts in USER_HZ ticks, 100 a second on Linux.
                let seconds = at.elapsed().as_secs_f64().max(0.001);
                let cpu =
                    std::array::from_fn(|k| now_ticks[k].saturating_sub(ticks[k]) as f64 / seconds);
                (ticks, at) = (now_ticks, tokio::time::Instant::now());
                let (inbox, outbox) = backlog(&*store).await;
                out.push(Gauges {
                    rss_mib: rss_mib(pid),
                    inbox,
                    outbox,
                    cpu,
                });
            }
            out
        })
    };

    let mut streams = tokio::task::JoinSet::new();
    for (stream, &rate) in options.rates.iter().enumerate() {
        if rate == 0 {
            continue;
        }
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        let total = (rate * options.seconds) as usize;
        let (samples, committed) = (samples.clone(), committed.clone());
        let (tenants, ehr_patients, claims) =
            (tenants.clone(), ehr_patients.clone(), claims.clone());
        let key = Arc::new(signing_key(SECRET).expect("a valid secret"));
        let slots = Arc::new(tokio::sync::Semaphore::new(options.max_inflight));
        streams.spawn(async move {
            let mut inflight = tokio::task::JoinSet::new();
            // Pushes: one task per claim, each taking its turns in order (a claim's next change
            // waits for the previous one's answer, as a billing system's would).
            if stream == 3 {
                let claims_n = claims.len();
                for (c, (t, claim)) in claims.iter().enumerate() {
                    let (api, samples, committed) =
                        (tenants[*t].api.clone(), samples.clone(), committed.clone());
                    let claim = claim.clone();
                    inflight.spawn(async move {
                        let mut k = c;
                        let mut step = 0;
                        while k < total {
                            let due = started + period * k as u32;
                            tokio::time::sleep_until(due).await;
                            let status = CYCLE[step % CYCLE.len()];
                            let answer = api.change(&claim, status).await;
                            let ms = due.elapsed().as_secs_f32() * 1000.0;
                            let i = bucket(due);
                            match answer {
                                Ok((update, at)) => {
                                    committed.lock().unwrap().insert(update, (i, at));
                                    samples.lock().unwrap().record(i, 3, Ok(ms));
                                    step += 1;
                                }
                                Err(e) => {
                                    // `Api::post` says "path: 503 Service Unavailable", or
                                    // "path: timed out".
                                    let tail = e.rsplit(": ").next().unwrap_or_default();
                                    let status = if tail == "timed out" {
                                        TIMED_OUT
                                    } else {
                                        tail.get(..3)
                                            .and_then(|s| s.parse().ok())
                                            .unwrap_or(NO_ANSWER)
                                    };
                                    samples.lock().unwrap().record(i, 3, Err(status))
                                }
                            }
                            k += claims_n;
                        }
                    });
                }
            } else {
                for k in 0..total {
                    let due = started + period * k as u32;
                    tokio::time::sleep_until(due).await;
                    let tenant = &tenants[k % tenants.len()];
                    // The tenant's own turn: k / tenants picks within its share.
                    let j = k / tenants.len();
                    let (api, samples) = (&tenant.api, samples.clone());
                    let request = match stream {
                        0 if k % 4 == 3 => api
                            .http
                            .get(format!(
                                "{}/fhir/r4/Patient?identifier=urn:soak|seed-{}",
                                api.base,
                                // The tenant's seeds are t, t + tenants, t + 2 * tenants...
                                (k % tenants.len()) + (j % tenant.seeded.len()) * tenants.len()
                            ))
                            .bearer_auth(&api.token),
                        0 => api
                            .http
                            .get(format!(
                                "{}/fhir/r4/Patient/{}",
                                api.base,
                                tenant.seeded[j % tenant.seeded.len()]
                            ))
                            .bearer_auth(&api.token),
                        1 => api
                            .http
                            .post(format!("{}/fhir/r4/Patient", api.base))
                            .bearer_auth(&api.token)
                            .header("content-type", "application/fhir+json")
                            .body(patient(k, "write").to_string()),
                        _ => {
                            let event_id = format!("soak-{}-{k}", tenant.connection);
                            let body = json!({
                                "type": "patient.changed",
                                "patient_id": ehr_patients[k % ehr_patients.len()],
                            })
                            .to_string();
                            let ts = OffsetDateTime::now_utc().unix_timestamp().to_string();
                            let signature = sign(&key, &event_id, &ts, body.as_bytes());
                            api.http
                                .post(tenant.webhook_url.as_str())
                                .header("webhook-id", event_id)
                                .header("webhook-timestamp", ts)
                                .header("webhook-signature", signature)
                                .body(body)
                        }
                    };
                    // At most `max_inflight` open: past it the stream waits here, behind schedule,
                    // and the requests it sends late count their wait (latency runs from `due`).
                    let Ok(slot) = slots.clone().acquire_owned().await else {
                        break;
                    };
                    let failure =
                        |e: reqwest::Error| if e.is_timeout() { TIMED_OUT } else { NO_ANSWER };
                    inflight.spawn(async move {
                        let outcome = match request.send().await {
                            Ok(res) => {
                                let status = res.status();
                                // Read the whole answer: a request is done when its body is.
                                match (res.bytes().await, status.is_success()) {
                                    (Ok(_), true) => Ok(()),
                                    (Ok(_), false) => Err(status.as_u16()),
                                    (Err(e), _) => Err(failure(e)),
                                }
                            }
                            Err(e) => Err(failure(e)),
                        };
                        drop(slot);
                        let ms = due.elapsed().as_secs_f32() * 1000.0;
                        samples
                            .lock()
                            .unwrap()
                            .record(bucket(due), stream, outcome.map(|()| ms));
                    });
                    // Reap what has finished, so the set stays small.
                    while inflight.try_join_next().is_some() {}
                }
            }
            while inflight.join_next().await.is_some() {}
        });
    }
    while streams.join_next().await.is_some() {}
    let sending = started.elapsed();
    let gauges = gauges.await.unwrap_or_default();

    // Deliveries: every committed update applied once?
    let expected = warm_updates + committed.lock().unwrap().len() as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while sim.controls().counters().claim_updates_applied < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let committed = std::mem::take(&mut *committed.lock().unwrap());
    let mut delivery: Vec<Vec<f32>> = vec![Vec::new(); intervals];
    let mut delivered = 0usize;
    let mut duplicates = 0usize;
    for (_, claim) in claims.iter() {
        let mut seen = std::collections::HashSet::new();
        for update in sim.claim_updates(claim) {
            let Some(id) = update.update_id else { continue };
            if !seen.insert(id.clone()) {
                duplicates += 1;
            }
            if let Some((i, at)) = committed.get(&id) {
                delivered += 1;
                delivery[*i].push(((update.applied_at - *at).as_seconds_f64() * 1000.0) as f32);
            }
        }
    }
    let lost = committed.len().saturating_sub(delivered);

    // The table.
    let mut samples = std::mem::take(&mut *samples.lock().unwrap());
    let mut csv = String::from(
        "interval_end_s,reads_per_s,reads_p99_ms,writes_per_s,writes_p99_ms,webhooks_per_s,webhooks_p99_ms,pushes_per_s,pushes_p99_ms,delivery_p99_ms,errors,inbox_backlog,outbox_backlog,gateway_rss_mib,gateway_cpu_pct,postgres_cpu_pct,bench_cpu_pct,host_cpu_pct\n",
    );
    println!("| until s | reads/s | p99 ms | writes/s | p99 ms | webhooks/s | p99 ms | pushes/s | p99 ms | deliv p99 ms | errors | inbox | outbox | RSS MiB | CPU % gw / pg / bench / host |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (mut total_ok, mut total_failed) = (0u64, 0u64);
    for (i, delivered_in) in delivery.iter_mut().enumerate() {
        let start = interval.as_secs_f64() * i as f64;
        let end = (interval.as_secs_f64() * (i + 1) as f64).min(run_for.as_secs_f64());
        let span = end - start;
        let (ok, failed) = match (samples.ok.get_mut(i), samples.failed.get(i)) {
            (Some(ok), Some(failed)) => (ok, *failed),
            _ => continue,
        };
        let mut row = vec![format!("{end:.0}")];
        for stream in ok.iter_mut() {
            total_ok += stream.len() as u64;
            row.push(format!("{:.0}", stream.len() as f64 / span));
            row.push(format!("{:.1}", p99(stream)));
        }
        row.push(format!("{:.1}", p99(delivered_in)));
        let errors: u64 = failed.iter().sum();
        total_failed += errors;
        row.push(errors.to_string());
        let g = gauges.get(i).copied().unwrap_or_default();
        row.push(g.inbox.to_string());
        row.push(g.outbox.to_string());
        row.push(format!("{:.0}", g.rss_mib));
        let cpu = g.cpu.map(|c| format!("{c:.0}"));
        println!("| {} | {} |", row.join(" | "), cpu.join(" / "));
        row.extend(cpu);
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    let error_rate = total_failed as f64 / (total_ok + total_failed).max(1) as f64;
    println!(
        "{} requests in {:.0} s, {} failed ({:.3}%); {} pushed updates: {lost} lost, {duplicates} applied twice",
        total_ok + total_failed,
        sending.as_secs_f64(),
        total_failed,
        error_rate * 100.0,
        committed.len(),
    );
    let mut by_stream = [0u64; 4];
    for failed in &samples.failed {
        for (s, n) in failed.iter().enumerate() {
            by_stream[s] += n;
        }
    }
    if total_failed > 0 {
        let parts: Vec<String> = STREAMS
            .iter()
            .zip(by_stream)
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        println!("failures by stream: {}", parts.join(", "));
        let causes: Vec<String> = samples
            .causes
            .iter()
            .map(|((s, status), n)| format!("{} {}: {n}", STREAMS[*s], cause(*status)))
            .collect();
        println!("failures by cause: {}", causes.join(", "));
    }
    if let Ok(path) = std::env::var("BENCH_SOAK_CSV") {
        let written = std::fs::File::create(&path).and_then(|mut f| f.write_all(csv.as_bytes()));
        if let Err(e) = written {
            eprintln!("soak bench: cannot write {path}: {e}");
        }
    }
    if let Some(task) = analyzer {
        task.abort();
    }
    drop(gateway);
    sim.stop().await;
    store.close().await;
    Ok(error_rate <= 0.001 && lost == 0 && duplicates == 0)
}

/// A new patient for the reads' seed or the writes; its identifier is searchable.
fn patient(k: usize, kind: &str) -> serde_json::Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:soak", "value": format!("{kind}-{k}") }],
        "name": [{ "family": format!("Soak{k}"), "given": ["Load"] }],
        "gender": if k % 2 == 0 { "female" } else { "male" },
        "birthDate": format!("19{:02}-0{}-1{}", 40 + k % 60, 1 + k % 9, k % 10),
    })
}
