//! `fhirgate sandbox`: try a full pull locally. Starts EHR simulators (Epic, Cerner, generic
//! SMART R4, athenahealth: `adapters/sim`) serving synthetic patients (no real PHI), adds a connection to
//! each for a sandbox practice (through the same checks as `connections add`), pulls every
//! patient through the real adapters into the configured database, prints one JSON line per
//! connection and per pull, then keeps the simulators running until Ctrl-C (`--once` stops
//! after the pulls). Refused in production: it writes a practice and connections.

use std::sync::Arc;

use clap::Args;
use fhirgate_adapters::{AdapterContext, Credential};
use fhirgate_ehr_sim::{Personality, SimConfig, Simulator};
use serde_json::{json, Value};

use super::{print_json, CliError};
use crate::config::{Environment, Settings};
use crate::domain::{NewPractice, PracticeName, ResourceId, TimeZoneName};
use crate::startup::{load_profiles, pool_options};
use crate::store;
use crate::sync::{
    on_page, pull, AuditedCalls, ConnectionSpec, Connections, PullOptions, PullReport, PullTarget,
};

#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Simulators to start: epic, cerner, generic, athena (repeat; default all four).
    #[arg(long = "vendor", value_name = "VENDOR")]
    pub vendors: Vec<String>,
    /// Synthetic patients per simulator.
    #[arg(long, default_value_t = 200)]
    pub patients: usize,
    /// Pull into this practice (default: a new "Sandbox practice").
    #[arg(long)]
    pub practice: Option<String>,
    /// Also pull each patient's coverages.
    #[arg(long)]
    pub coverage: bool,
    /// Stop after the pulls instead of serving the simulators until Ctrl-C.
    #[arg(long)]
    pub once: bool,
}

fn personality(vendor: &str) -> Result<Personality, CliError> {
    Personality::ALL
        .into_iter()
        .find(|p| p.traits().vendor == vendor)
        .ok_or_else(|| {
            let known: Vec<&str> = Personality::ALL.iter().map(|p| p.traits().vendor).collect();
            CliError::Usage(format!(
                "--vendor: no simulator for `{vendor}` ({})",
                known.join(", ")
            ))
        })
}

/// The connection an operator would add for a simulator: its base URL, its client, its key or
/// secret, the token URL (unless the vendor expects discovery) and the vendor's settings, all
/// read from the simulator's personality (no per-vendor code here).
pub fn sandbox_spec(sim: &Simulator, practice: &ResourceId) -> Option<ConnectionSpec> {
    let traits = sim.personality().traits();
    let credential = match (sim.client_secret(), sim.client_key()) {
        (Some(secret), _) => Credential::ClientSecret(secret.to_owned()),
        (None, Some(key)) => Credential::PrivateKey {
            pem: key.private_pem.clone(),
            kid: Some(key.kid.clone()),
        },
        (None, None) => return None,
    };
    let mut settings = sim.vendor_settings();
    // A local simulator takes more than an EHR's polite default.
    settings.insert("rate_limit_per_second".into(), json!(1000));
    Some(ConnectionSpec {
        practice_id: practice.clone(),
        vendor: traits.vendor.to_owned(),
        base_url: sim.fhir_base_url(),
        client_id: sim.client_id().to_owned(),
        token_url: (!traits.discovered_token_url).then(|| sim.token_url()),
        credential,
        scopes: None,
        settings,
        schedule: None,
        webhook_secret: None,
    })
}

pub async fn run(args: SandboxArgs, settings: Settings) -> Result<(), CliError> {
    let usage = |e: &dyn std::fmt::Display| CliError::Usage(e.to_string());
    let failed = |e: &dyn std::fmt::Display| CliError::Failed(e.to_string());
    if settings.env == Environment::Production {
        return Err(CliError::Usage(
            "sandbox writes a practice and connections: refused with env = production".into(),
        ));
    }
    let vendors: Vec<String> = if args.vendors.is_empty() {
        Personality::ALL
            .iter()
            .map(|p| p.traits().vendor.to_owned())
            .collect()
    } else {
        args.vendors.clone()
    };
    let personalities = vendors
        .iter()
        .map(|v| personality(v))
        .collect::<Result<Vec<_>, _>>()?;
    if args.patients == 0 || args.patients > 1_000_000 {
        return Err(CliError::Usage("--patients: 1 to 1000000".into()));
    }
    let practice_arg = args
        .practice
        .as_deref()
        .map(|p| ResourceId::parse("practice", p))
        .transpose()
        .map_err(|e| usage(&e))?;
    let master = crate::keys::MasterSecret::from_settings(&settings).map_err(|e| usage(&e))?;
    let profiles = Arc::new(load_profiles(&settings).map_err(|e| usage(&e))?);
    let store = store::connect(&settings.database_url, &pool_options(&settings))
        .await
        .map_err(|e| failed(&e))?;
    let result = async {
        store.migrate().await.map_err(|e| failed(&e))?;
        let keys = crate::crypto::PhiKeys::new(master.keyring());
        let vault = crate::startup::open_vault(&*store, &keys)
            .await
            .map_err(|e| failed(&e))?;
        let practice = match practice_arg {
            Some(p) => {
                store
                    .get_practice(&p)
                    .await
                    .map_err(|_| CliError::Usage("--practice: no such practice".into()))?;
                p
            }
            None => {
                let new = NewPractice {
                    name: PracticeName::parse("Sandbox practice").map_err(|e| usage(&e))?,
                    timezone: TimeZoneName::parse("UTC").map_err(|e| usage(&e))?,
                    npi: None,
                    tax_id: None,
                };
                store
                    .create_practice(&new)
                    .await
                    .map_err(|e| failed(&e))?
                    .id
            }
        };
        let connections = Connections::new(store.clone(), master.keyring(), profiles);
        let (log, writer) = crate::audit::AuditLog::start(store.clone());
        let context = AdapterContext {
            audit: Arc::new(AuditedCalls::new(log, practice.clone())),
        };
        let mut sims = Vec::new();
        let mut outcome = Ok(());
        for p in personalities {
            let mut config = SimConfig::new(p);
            config.patients = args.patients;
            let sim = Simulator::start(config).map_err(|e| failed(&e))?;
            let spec = sandbox_spec(&sim, &practice)
                .ok_or_else(|| CliError::Failed("the simulator has no client credential".into()))?;
            let info = connections.add(spec).await.map_err(|e| failed(&e))?;
            print_json(&json!({ "sandbox": info.vendor, "connection": info }));
            let (_, connection) = connections.open(&info.id).await.map_err(|e| failed(&e))?;
            let adapter = connections
                .build(&connection, &context)
                .map_err(|e| failed(&e))?;
            let profile = connections
                .profile(&info.vendor)
                .ok_or_else(|| CliError::Failed("no mapping profile".into()))?;
            let target = PullTarget {
                store: &*store,
                vault: &vault,
                practice: &practice,
                connection_id: &info.id,
                run_id: None,
            };
            let started = std::time::Instant::now();
            let options = PullOptions {
                coverage: args.coverage,
            };
            match pull(
                &target,
                &*adapter,
                profile,
                None,
                options,
                on_page(|r: &PullReport| {
                    eprint!(
                        "\rfhirgate: {}: {} patients pulled",
                        info.vendor,
                        r.created + r.updated + r.unchanged
                    );
                }),
            )
            .await
            {
                Ok(report) => {
                    eprintln!();
                    let secs = started.elapsed().as_secs_f64();
                    print_json(&json!({
                        "pulled": info.vendor,
                        "connection_id": info.id,
                        "practice_id": practice.as_str(),
                        "report": report,
                        "seconds": (secs * 1000.0).round() / 1000.0,
                    }));
                }
                Err(e) => {
                    eprintln!();
                    outcome = Err(CliError::Failed(format!(
                        "{}: pull failed: {e}",
                        info.vendor
                    )));
                    break;
                }
            }
            sims.push(sim);
        }
        if outcome.is_ok() && !args.once {
            let urls: Vec<Value> = sims.iter().map(|s| json!(s.fhir_base_url())).collect();
            eprintln!(
                "fhirgate: simulators serving at {}; Ctrl-C stops them",
                Value::Array(urls)
            );
            let _ = tokio::signal::ctrl_c().await;
        }
        for sim in sims {
            sim.stop().await;
        }
        drop(context);
        drop(connections);
        let _ = writer.await;
        outcome
    }
    .await;
    store.close().await;
    result
}
