//! Claim-status push benchmark: claim status changes at 200 a second for `BENCH_PUSH_SECONDS`
//! (default 10) through the real route (`POST /api/v1/claims/{id}/status`, bearer token, audit,
//! outbox row in the change's transaction) of a gateway on SQLite (or PostgreSQL with
//! `FHIRGATE_BENCH_DATABASE_URL`, as the other benches), delivered by its dispatcher through the
//! real adapter (OAuth, rate limiter, audit of every call) to an in-process EHR simulator.
//!
//! ```text
//! cargo bench --bench claim_push
//! BENCH_PUSH_RATE=50 cargo bench --bench claim_push   # another rate
//! BENCH_PUSH_SECONDS=30 FHIRGATE_BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench claim_push
//! ```
//!
//! Prints event-to-delivery latency p50/p95/p99/max: from the status change's transaction (the
//! `updated_at` it stamps, just before its commit) to the simulator storing the pushed
//! ClaimResponse (`ClaimUpdate::applied_at`), both on the same system clock; and the achieved
//! rates. The load is open-loop (change k is due at k/200 s whatever the answers), each change a
//! different claim's next status (submitted, accepted, paid), so claims do not queue behind
//! themselves; `sent/s` is the rate the gateway took them at. Gateway, simulator and load generator share the process and its CPUs. Exits 1
//! when an update is lost, applied twice or a change fails.

#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirgate::config::Settings;
use fhirgate::crypto::Keyring;
use fhirgate::gate::Role;
use fhirgate::startup::Application;
use fhirgate::sync::Connections;
use fhirgate_ehr_sim::{Personality, SimConfig, Simulator};
use reqwest::Client;
use serde_json::json;
use support::client::{bench_client, Api};
use support::BenchDatabase;
use time::OffsetDateTime;

const MASTER_KEY: &str = "bench1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const SCOPES: &str = "system/Patient.cruds system/Organization.cruds system/Coverage.cruds \
    system/Claim.cruds system/ClaimResponse.cruds";
/// Status changes per second (`BENCH_PUSH_RATE` overrides).
const RATE: u64 = 200;
/// Each claim's pushed statuses, in order (prepared, set beforehand, pushes nothing).
const STEPS: [&str; 3] = ["submitted", "accepted", "paid"];
/// How long to wait for the last deliveries once the load stops.
const DRAIN: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    let seconds: u64 = match std::env::var("BENCH_PUSH_SECONDS") {
        Ok(v) => match v.parse() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("claim_push bench: BENCH_PUSH_SECONDS must be a positive integer");
                return ExitCode::from(2);
            }
        },
        Err(_) => 10,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the runtime");
    let rate: u64 = match std::env::var("BENCH_PUSH_RATE") {
        Ok(v) => match v.parse() {
            Ok(n) if (1..=10_000).contains(&n) => n,
            _ => {
                eprintln!("claim_push bench: BENCH_PUSH_RATE must be 1 to 10000");
                return ExitCode::from(2);
            }
        },
        Err(_) => RATE,
    };
    runtime.block_on(run(seconds, rate))
}

fn percentile(sorted: &[f64], percent: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (percent / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(seconds: u64, rate: u64) -> ExitCode {
    let workdir = tempfile::tempdir().expect("create a temp working directory");
    std::env::set_current_dir(workdir.path()).expect("enter the temp working directory");
    let db = BenchDatabase::create(workdir.path()).await;
    let settings = Settings::from_toml(&format!(
        "listen = '127.0.0.1:0'\nlog_level = 'error'\ndatabase_url = '{}'\nmaster_key = '{MASTER_KEY}'\n\
         [rate_limit]\nclient_points = 4000000000\npractice_points = 4000000000\n\
         global_points = 4000000000\ntoken_ip_points = 4000000000\n{}",
        db.url,
        support::claims_settings()
    ))
    .expect("bench settings are valid");
    let outbox = settings.outbox.clone();
    let app = Application::build(settings)
        .await
        .expect("the gateway starts on the bench database");
    let base = format!("http://{}", app.local_addr());
    let handle = app.handle();
    let store = app.store();
    let server = tokio::spawn(app.run_until_stopped());
    let http = Client::new();
    let (practice, token) = bench_client(&*store, &http, &base, Role::Billing, SCOPES).await;
    let api = Arc::new(Api { http, base, token });

    // The EHR and the practice's connection to it; one patient pulled from it.
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = 1;
    let sim = Simulator::start(config).expect("the simulator starts");
    let keyring = Keyring::parse(MASTER_KEY).expect("the bench key parses");
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().expect("built-in profiles"));
    let connections = Connections::new(store.clone(), &keyring, profiles);
    let spec = fhirgate::cli::sandbox_spec(&sim, &practice).expect("a credential");
    let connection = connections
        .add(spec)
        .await
        .expect("the connection is accepted")
        .id;
    let patient = api
        .create(json!({
            "resourceType": "Patient",
            "identifier": [{ "system": format!("urn:fhirgate:connection:{connection}"), "value": "bench-patient" }],
            "name": [{ "family": "Bench" }]
        }))
        .await
        .expect("a patient");
    let payer = api
        .create(json!({ "resourceType": "Organization", "name": "Bench Payer" }))
        .await
        .expect("a payer");
    let coverage = api
        .create(json!({
            "resourceType": "Coverage", "status": "active",
            "beneficiary": { "reference": format!("Patient/{patient}") },
            "payor": [{ "reference": format!("Organization/{payer}") }]
        }))
        .await
        .expect("a coverage");
    let total = rate * seconds;
    let claim_count = total.div_ceil(STEPS.len() as u64) as usize;
    let claim = json!({
        "resourceType": "Claim", "status": "active",
        "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional" }] },
        "use": "claim",
        "patient": { "reference": format!("Patient/{patient}") },
        "created": "2026-11-20",
        "provider": { "reference": format!("Organization/{payer}") },
        "priority": { "coding": [{ "code": "normal" }] },
        "insurance": [{ "sequence": 1, "focal": true, "coverage": { "reference": format!("Coverage/{coverage}") } }]
    });
    eprintln!("claim_push bench: preparing {claim_count} claims");
    let mut claims = Vec::with_capacity(claim_count);
    for chunk in (0..claim_count).collect::<Vec<_>>().chunks(16) {
        let mut set = tokio::task::JoinSet::new();
        for _ in chunk {
            let (api, claim) = (Arc::clone(&api), claim.clone());
            set.spawn(async move {
                let id = api.create(claim).await?;
                api.post(
                    &format!("/api/v1/claims/{id}/status"),
                    &json!({ "status": "prepared" }),
                )
                .await?;
                Ok::<_, String>(id)
            });
        }
        while let Some(done) = set.join_next().await {
            match done {
                Ok(Ok(id)) => claims.push(id),
                other => {
                    eprintln!("claim_push bench: preparing a claim failed: {other:?}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }

    // The load: change k is claim k % C's step k / C, due at k / RATE s, open loop; a claim's
    // next step waits for its previous one's answer (else an overloaded gateway would see the
    // steps out of order and refuse them).
    println!(
        "nproc={} backend={} rate={rate}/s seconds={seconds} batch={} poll_interval_ms={} (gateway, simulator and load share the process)",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        db.backend(),
        outbox.batch,
        outbox.poll_interval_ms,
    );
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let started = tokio::time::Instant::now();
    let mut changes = tokio::task::JoinSet::new();
    for (i, claim) in claims.iter().enumerate() {
        let (api, claim) = (Arc::clone(&api), claim.clone());
        changes.spawn(async move {
            let mut out = Vec::with_capacity(STEPS.len());
            for (s, step) in STEPS.iter().enumerate() {
                let k = s * claim_count + i;
                if k >= total as usize {
                    break;
                }
                tokio::time::sleep_until(started + period * k as u32).await;
                out.push(
                    api.change(&claim, step)
                        .await
                        .map_err(|e| format!("{claim}: {e}")),
                );
            }
            out
        });
    }
    let mut committed: HashMap<String, OffsetDateTime> = HashMap::with_capacity(total as usize);
    let mut errors = 0u64;
    while let Some(done) = changes.join_next().await {
        for change in done.unwrap_or_default() {
            match change {
                Ok((id, at)) => {
                    committed.insert(id, at);
                }
                Err(e) => {
                    errors += 1;
                    if errors <= 5 {
                        eprintln!("claim_push bench: a change failed: {e}");
                    }
                }
            }
        }
    }
    let sending = started.elapsed().as_secs_f64();

    // Every update delivered, once?
    let deadline = Instant::now() + DRAIN;
    while sim.controls().counters().claim_updates_applied < committed.len() as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies_ms = Vec::with_capacity(committed.len());
    let mut first_commit: Option<OffsetDateTime> = None;
    let mut last_applied: Option<OffsetDateTime> = None;
    let mut duplicates = 0usize;
    for claim in &claims {
        let mut seen = std::collections::HashSet::new();
        for update in sim.claim_updates(claim) {
            let Some(id) = update.update_id else { continue };
            if !seen.insert(id.clone()) {
                duplicates += 1;
            }
            if let Some(at) = committed.get(&id) {
                latencies_ms.push((update.applied_at - *at).as_seconds_f64() * 1000.0);
                first_commit = Some(first_commit.map_or(*at, |f| f.min(*at)));
                last_applied =
                    Some(last_applied.map_or(update.applied_at, |l| l.max(update.applied_at)));
            }
        }
    }
    latencies_ms.sort_by(f64::total_cmp);
    let delivered = latencies_ms.len();
    let delivering = match (first_commit, last_applied) {
        (Some(f), Some(l)) => (l - f).as_seconds_f64(),
        _ => f64::NAN,
    };
    println!(
        "| updates | sent/s | delivered/s | p50 ms | p95 ms | p99 ms | max ms | lost | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let lost = committed.len().saturating_sub(delivered);
    println!(
        "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {lost} | {errors} |",
        committed.len(),
        committed.len() as f64 / sending,
        delivered as f64 / delivering,
        percentile(&latencies_ms, 50.0),
        percentile(&latencies_ms, 95.0),
        percentile(&latencies_ms, 99.0),
        latencies_ms.last().copied().unwrap_or(f64::NAN),
    );

    handle.stop(true).await;
    let _ = server.await;
    sim.stop().await;
    db.drop_database().await;
    if lost > 0 || duplicates > 0 || errors > 0 {
        eprintln!(
            "claim_push bench: {lost} lost, {duplicates} applied twice, {errors} failed changes"
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
