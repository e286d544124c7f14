//! Webhook acknowledge latency: signed generic `patient.changed` events POSTed at a fixed rate
//! (open loop: each request leaves at its scheduled time whether or not earlier ones were
//! answered, and its latency counts from that time) to a gateway on a fresh database, while the
//! inbox worker fetches and upserts the patients from an in-process EHR simulator.
//!
//! ```text
//! cargo bench --bench webhooks                                  # SQLite, 500 events/s, 10 s
//! BENCH_WEBHOOK_SECONDS=30 BENCH_WEBHOOK_RATE=500 cargo bench --bench webhooks
//! FHIRGATE_BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench webhooks
//! ```
//!
//! Prints the acknowledge latency p50/p95/p99/max, the achieved rate, and how long the worker
//! took to drain the inbox afterwards. The gateway, the load and the simulator share the
//! process's CPUs, so the figures are a floor. Exits 1 when any event was not acknowledged 202.

#[path = "support/mod.rs"]
mod support;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhirgate::config::Settings;
use fhirgate::crypto::Keyring;
use fhirgate::domain::{NewPractice, PracticeName, TimeZoneName};
use fhirgate::startup::Application;
use fhirgate::sync::webhooks::notification::{sign, signing_key};
use fhirgate::sync::Connections;
use fhirgate_ehr_sim::{Personality, SimConfig, Simulator};
use support::BenchDatabase;

const MASTER_KEY: &str = "bench1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn env_number(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name} must be a positive integer")),
        Err(_) => Ok(default),
    }
}

fn main() -> ExitCode {
    let (seconds, rate) = match (
        env_number("BENCH_WEBHOOK_SECONDS", 10),
        env_number("BENCH_WEBHOOK_RATE", 500),
    ) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("webhooks bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the runtime");
    runtime.block_on(run(seconds, rate))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn run(seconds: u64, rate: u64) -> ExitCode {
    let workdir = tempfile::tempdir().expect("create a temp directory");
    let db = BenchDatabase::create(workdir.path()).await;
    let settings = Settings::from_toml(&format!(
        "listen = '127.0.0.1:0'\ndatabase_url = '{}'\nmaster_key = '{MASTER_KEY}'\n\
         database_max_connections = 10\n[webhooks]\npoll_interval_ms = 200\n{}",
        db.url,
        support::claims_settings()
    ))
    .expect("bench settings are valid");
    let app = Application::build(settings)
        .await
        .expect("the gateway starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let store = app.store();
    let handle = app.handle();
    let server = tokio::spawn(app.run_until_stopped());

    let practice = store
        .create_practice(&NewPractice {
            name: PracticeName::parse("Bench practice").expect("a valid name"),
            timezone: TimeZoneName::parse("UTC").expect("a valid zone"),
            npi: None,
            tax_id: None,
        })
        .await
        .expect("a practice")
        .id;
    let mut config = SimConfig::new(Personality::Generic);
    config.patients = 1000;
    let sim = Simulator::start(config).expect("the simulator starts");
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().expect("built-in profiles"));
    let connections = Connections::new(
        store.clone(),
        &Keyring::parse(MASTER_KEY).expect("the bench key parses"),
        profiles,
    );
    let mut spec = fhirgate::cli::sandbox_spec(&sim, &practice).expect("a simulator connection");
    spec.webhook_secret = Some(SECRET.into());
    let connection = connections.add(spec).await.expect("a connection").id;
    let patients = sim.patient_ids();
    let key = Arc::new(signing_key(SECRET).expect("a valid secret"));
    let url = Arc::new(format!("{address}/webhooks/{connection}"));
    let http = reqwest::Client::new();

    println!(
        "nproc={} backend={} rate={rate}/s seconds={seconds} (gateway, load and simulator share the process)",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        db.backend(),
    );
    let total = seconds * rate;
    let every = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = started + every.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        let (http, key, url) = (http.clone(), key.clone(), url.clone());
        let event_id = format!("bench-{i}");
        let body = serde_json::json!({
            "type": "patient.changed",
            "patient_id": patients[(i as usize) % patients.len()],
        })
        .to_string();
        tasks.spawn(async move {
            let ts = time::OffsetDateTime::now_utc().unix_timestamp().to_string();
            let signature = sign(&key, &event_id, &ts, body.as_bytes());
            let status = http
                .post(url.as_str())
                .header("webhook-id", &event_id)
                .header("webhook-timestamp", &ts)
                .header("webhook-signature", signature)
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            (status, due.elapsed())
        });
    }
    let mut latencies = Vec::with_capacity(total as usize);
    let mut refused = 0u64;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((202, latency)) => latencies.push(latency),
            _ => refused += 1,
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let achieved = latencies.len() as f64 / elapsed.as_secs_f64();

    // How long the worker needs to catch up with what was acknowledged.
    let drain_started = Instant::now();
    let deadline = drain_started + Duration::from_secs(600);
    let drained = loop {
        let waiting: i64 = store
            .inbox()
            .queue_stats()
            .await
            .map(|s| s.iter().map(|q| q.depth).sum())
            .unwrap_or(i64::MAX);
        if waiting == 0 {
            break Some(drain_started.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dead = store
        .inbox()
        .list_events(Some(&connection), Some("dead"), 100_000)
        .await
        .map(|d| d.len())
        .unwrap_or(0);

    println!("| backend | events | acknowledged 202 | seconds | achieved/s | p50 ms | p95 ms | p99 ms | max ms | inbox drained after s | dead |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {total} | {} | {:.1} | {achieved:.0} | {} | {} | {} | {} | {} | {dead} |",
        db.backend(),
        latencies.len(),
        elapsed.as_secs_f64(),
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 95.0)),
        ms(percentile(&latencies, 99.0)),
        ms(latencies.last().copied().unwrap_or_default()),
        drained.map_or("> 600".into(), |d| format!("{:.1}", d.as_secs_f64())),
    );

    handle.stop(true).await;
    let _ = server.await;
    sim.stop().await;
    db.drop_database().await;
    if refused > 0 {
        eprintln!("webhooks bench: {refused} events were not acknowledged with 202");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
