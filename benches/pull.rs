//! Pull benchmark: one full pull of `BENCH_PULL_PATIENTS` (default 10,000) synthetic patients
//! from each EHR simulator (Epic through its Group Bulk export, Cerner, generic and athenahealth
//! through paged `_lastUpdated` search) through the real adapters (OAuth, rate limiter, retries,
//! audit of every outbound call), mapped with each vendor's profile and stored sealed and
//! indexed in a fresh database, one transaction per page with its audit events.
//!
//! ```text
//! cargo bench --bench pull                    # epic, cerner, generic, athena on SQLite
//! cargo bench --bench pull -- cerner          # one vendor
//! FHIRGATE_BENCH_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench pull
//! ```
//!
//! Prints patients/second and the peak RSS (VmHWM, reset before each vendor) of the whole
//! process: the simulator serves from the same process and shares its CPUs, so the figures are
//! a floor for a real deployment, where the EHR's latency dominates instead.
//! `BENCH_PULL_COVERAGE=1` also fetches each patient's coverages (one search per patient).
//! After the full pull, 1% of the patients are edited at the EHR and a second pull from the
//! watermark (what a nightly run does) is timed too: the "nightly" columns.

#[path = "support/mod.rs"]
mod support;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use fhirgate::crypto::{Keyring, PhiKeys};
use fhirgate::domain::{NewPractice, PracticeName, TimeZoneName};
use fhirgate::sync::{on_page, pull, AuditedCalls, Connections, PullOptions, PullTarget};
use fhirgate_adapters::AdapterContext;
use fhirgate_ehr_sim::{Personality, SimConfig, Simulator};
use serde_json::json;
use support::{peak_rss_mib, reset_peak_rss, BenchDatabase};

const MASTER_KEY: &str = "bench1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn main() -> ExitCode {
    let patients: usize = match std::env::var("BENCH_PULL_PATIENTS") {
        Ok(v) => match v.parse() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("pull bench: BENCH_PULL_PATIENTS must be a positive integer");
                return ExitCode::from(2);
            }
        },
        Err(_) => 10_000,
    };
    let coverage = std::env::var("BENCH_PULL_COVERAGE").is_ok_and(|v| v == "1");
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let vendors: Vec<(&str, Personality)> = Personality::ALL
        .into_iter()
        .map(|p| (p.traits().vendor, p))
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the runtime");
    runtime.block_on(run(patients, coverage, vendors))
}

async fn run(patients: usize, coverage: bool, vendors: Vec<(&str, Personality)>) -> ExitCode {
    let workdir = tempfile::tempdir().expect("create a temp directory");
    let db = BenchDatabase::create(workdir.path()).await;
    let options = fhirgate::store::PoolOptions {
        max_connections: 10,
        acquire_timeout: std::time::Duration::from_secs(30),
    };
    let store = fhirgate::store::connect(&fhirgate::config::DatabaseUrl::new(&db.url), &options)
        .await
        .expect("the bench database opens");
    store.migrate().await.expect("migrations apply");
    let keyring = Keyring::parse(MASTER_KEY).expect("the bench key parses");
    let vault = fhirgate::startup::open_vault(&*store, &PhiKeys::new(&keyring))
        .await
        .expect("the vault opens");
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
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().expect("built-in profiles"));
    let connections = Connections::new(store.clone(), &keyring, profiles);
    let (log, writer) = fhirgate::audit::AuditLog::start(store.clone());
    let context = AdapterContext {
        audit: Arc::new(AuditedCalls::new(log, practice.clone())),
    };
    println!(
        "nproc={} backend={} patients={patients} coverage={coverage} (simulator and gateway share the process)",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        db.backend(),
    );
    println!("| vendor | listing | patients | pages | seconds | patients/s | peak RSS MiB | nightly: changed | nightly: seconds |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut failed = false;
    let mut results = Vec::new();
    for (name, personality) in vendors {
        let mut config = SimConfig::new(personality);
        config.patients = patients;
        let sim = Simulator::start(config).expect("the simulator starts");
        let mut spec = fhirgate::cli::sandbox_spec(&sim, &practice).expect("a credential");
        let traits = personality.traits();
        if traits.last_updated {
            // The largest page each search API serves, up to 200 (Cerner's cap).
            spec.settings
                .insert("page_size".into(), json!(traits.max_count.min(200)));
        }
        let info = connections
            .add(spec)
            .await
            .expect("the connection is accepted");
        let (_, connection) = connections.open(&info.id).await.expect("it opens");
        let adapter = connections
            .build(&connection, &context)
            .expect("the adapter builds");
        let profile = connections.profile(name).expect("a profile");
        let target = PullTarget {
            store: &*store,
            vault: &vault,
            practice: &practice,
            connection_id: &info.id,
            run_id: None,
        };
        let reset = reset_peak_rss();
        let started = Instant::now();
        let outcome = pull(
            &target,
            &*adapter,
            profile,
            None,
            PullOptions { coverage },
            on_page(|_| {}),
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        let rss = peak_rss_mib().map_or("?".to_owned(), |m| {
            format!("{m:.1}{}", if reset { "" } else { "*" })
        });
        match outcome {
            Ok(report) if report.created as usize == patients && report.failed == 0 => {
                let rate = report.created as f64 / secs;
                let changed = sim.controls().touch((patients / 100).max(1)).len();
                let started = Instant::now();
                let nightly = pull(
                    &target,
                    &*adapter,
                    profile,
                    report.watermark.as_deref(),
                    PullOptions { coverage },
                    on_page(|_| {}),
                )
                .await;
                let nightly_secs = started.elapsed().as_secs_f64();
                let nightly = match nightly {
                    Ok(n) if n.updated as usize == changed && n.failed == 0 => {
                        format!("{changed} | {nightly_secs:.2}")
                    }
                    Ok(n) => {
                        eprintln!(
                            "pull bench: {name}: nightly pull updated {} of {changed}",
                            n.updated
                        );
                        failed = true;
                        "? | ?".to_owned()
                    }
                    Err(e) => {
                        eprintln!("pull bench: {name}: nightly pull: {e}");
                        failed = true;
                        "? | ?".to_owned()
                    }
                };
                println!(
                    "| {name} | {} | {} | {} | {secs:.2} | {rate:.0} | {rss} | {nightly} |",
                    if personality == Personality::Epic {
                        "Group $export"
                    } else {
                        "search"
                    },
                    report.created,
                    report.pages,
                );
                results.push(
                    json!({"vendor": name, "patients": report.created, "pages": report.pages,
                    "seconds": secs, "patients_per_sec": rate, "peak_rss_mib": rss,
                    "nightly": nightly}),
                );
            }
            Ok(report) => {
                eprintln!("pull bench: {name}: incomplete pull: {report:?}");
                failed = true;
            }
            Err(e) => {
                eprintln!("pull bench: {name}: {e}");
                failed = true;
            }
        }
        sim.stop().await;
    }
    drop(context);
    let _ = writer.await;
    store.close().await;
    db.drop_database().await;
    if let Some(path) = std::env::var_os("BENCH_JSON").filter(|p| !p.is_empty()) {
        let _ = std::fs::write(
            path,
            serde_json::to_vec_pretty(&results).unwrap_or_default(),
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
