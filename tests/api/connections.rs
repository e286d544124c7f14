//! EHR connections and pulls as an operator and a practice see them: `fhirgate connections`
//! seals secrets and refuses bad input naming the flag; a pull through each vendor's adapter
//! from its simulator stores every patient once, a second pull from the watermark updates only
//! what changed, everything is audited, and no PHI is at rest in clear.

use std::sync::Arc;

use fhirgate::crypto::{Keyring, PhiKeys};
use fhirgate::domain::ResourceId;
use fhirgate::gate::Role;
use fhirgate::sync::{on_page, pull, AuditedCalls, Connections, PullOptions, PullTarget};
use fhirgate_adapters::AdapterContext;
use fhirgate_ehr_sim::{Personality, SimConfig, Simulator};
use serde_json::Value;

use crate::auth::session;
use crate::binary::{fhirgate, run};
use crate::helpers::{backend, contains, fhir_body, spawn_app_with, sqlite_bytes, TestApp};
use fhirgate::store::Backend;

/// A fixed master key, so the test can seal and open what the app reads.
fn master_key() -> String {
    format!("test1:{}", "5a".repeat(32))
}

fn add(app: &TestApp, args: &[&str]) -> std::process::Output {
    run(fhirgate()
        .args(["connections", "add"])
        .args(args)
        .env("FHIRGATE_DATABASE_URL", app.database_url.expose())
        .env("FHIRGATE_MASTER_KEY", master_key()))
}

#[tokio::test]
async fn connections_add_seals_the_credential_and_refuses_bad_input_naming_the_flag() {
    let app = spawn_app_with(&format!("master_key = '{}'", master_key())).await;
    let s = session(&app, "system/Patient.rs", Role::ExternalSystem).await;
    let key = fhirgate_ehr_sim::keys::generate(fhirgate_ehr_sim::keys::SigningAlg::ES384).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("epic.pem");
    std::fs::write(&pem, &key.private_pem).unwrap();
    let pem = pem.to_str().unwrap();
    let secret = "cerner-secret-7f3a9c1e5b";
    let tenant = "ec2458f2-1e24-41c8-b71b-0e701af7583d";
    let cerner_base = format!("https://fhir-ehr-code.cerner.com/r4/{tenant}");
    let practice = s.practice_id.as_str();

    let epic = add(
        &app,
        &[
            "--practice",
            practice,
            "--vendor",
            "epic",
            "--base-url",
            "https://fhir.epic.example/interconnect-fhir-oauth/api/FHIR/R4/",
            "--token-url",
            "https://fhir.epic.example/interconnect-fhir-oauth/oauth2/token",
            "--client-id",
            "epic-client",
            "--private-key",
            pem,
            "--key-id",
            "k1",
            "--setting",
            "group_id=e3iabhmS8rsueyz7vaimuiaSmfGvi.QwjVXJANlPOgR83",
        ],
    );
    assert!(
        epic.status.success(),
        "{}",
        String::from_utf8_lossy(&epic.stderr)
    );
    let line: Value = serde_json::from_slice(&epic.stdout).unwrap();
    assert_eq!(line["vendor"], "epic");
    assert_eq!(line["auth"], "private_key_jwt");
    assert_eq!(line["key_id"], "k1");
    assert_eq!(
        line["base_url"],
        "https://fhir.epic.example/interconnect-fhir-oauth/api/FHIR/R4"
    );
    assert_eq!(line["schedule"], "0 0 2 * * *");

    let cerner = add(
        &app,
        &[
            "--practice",
            practice,
            "--vendor",
            "cerner",
            "--base-url",
            &cerner_base,
            "--token-url",
            "https://authorization.cerner.com/tenants/x/protocols/oauth2/profiles/smart-v1/token",
            "--client-id",
            "system-account",
            "--client-secret",
            secret,
            "--setting",
            &format!("tenant={tenant}"),
            "--schedule",
            "0 30 1 * * *",
        ],
    );
    assert!(
        cerner.status.success(),
        "{}",
        String::from_utf8_lossy(&cerner.stderr)
    );
    let stdout = String::from_utf8_lossy(&cerner.stdout);
    assert!(stdout.contains("\"auth\":\"client_secret\""), "{stdout}");
    assert!(!stdout.contains(secret));

    let list = run(fhirgate()
        .args(["connections", "list", "--practice", practice])
        .env("FHIRGATE_DATABASE_URL", app.database_url.expose())
        .env("FHIRGATE_MASTER_KEY", master_key()));
    let listed = String::from_utf8_lossy(&list.stdout);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(!listed.contains(secret) && !listed.contains("PRIVATE KEY"));
    if backend() == Backend::Sqlite {
        let bytes = sqlite_bytes(&app);
        assert!(
            !contains(&bytes, secret),
            "the client secret is stored in clear"
        );
        assert!(
            !contains(&bytes, "PRIVATE KEY"),
            "the private key is stored in clear"
        );
    }

    // Each mistake exits 2 naming the flag, and never echoes a secret.
    let epic_base = "https://fhir.epic.example/api/FHIR/R4";
    for (args, expected) in [
        (
            vec![
                "--vendor",
                "meditech",
                "--base-url",
                epic_base,
                "--client-secret",
                secret,
            ],
            "--vendor: no adapter for `meditech`",
        ),
        (
            vec![
                "--vendor",
                "cerner",
                "--base-url",
                "http://fhir.example/r4",
                "--client-secret",
                secret,
            ],
            "--base-url: expected https",
        ),
        (
            vec![
                "--vendor",
                "epic",
                "--base-url",
                epic_base,
                "--private-key",
                pem,
            ],
            "group_id",
        ),
        (
            vec![
                "--vendor",
                "epic",
                "--base-url",
                epic_base,
                "--client-secret",
                secret,
                "--setting",
                "group_id=g1",
            ],
            "--",
        ),
        (
            vec![
                "--vendor",
                "generic",
                "--base-url",
                epic_base,
                "--client-secret",
                secret,
                "--schedule",
                "nightly",
            ],
            "--schedule",
        ),
    ] {
        let mut full = vec!["--practice", practice, "--client-id", "c1"];
        full.extend(args.iter().copied());
        let out = add(&app, &full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains(secret), "{err}");
    }
    let out = add(
        &app,
        &[
            "--practice",
            "no-such-practice",
            "--vendor",
            "generic",
            "--base-url",
            epic_base,
            "--client-id",
            "c1",
            "--client-secret",
            secret,
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--practice: no such practice"));
}

/// The vendor's connection to a simulator, added through the same checks as the CLI's.
async fn connect(
    app: &TestApp,
    practice: &ResourceId,
    personality: Personality,
    patients: usize,
) -> (Simulator, Connections, String) {
    let mut config = SimConfig::new(personality);
    config.patients = patients;
    config.page_size = 25;
    let sim = Simulator::start(config).unwrap();
    let keyring = Keyring::parse(&master_key()).unwrap();
    let profiles = Arc::new(fhirgate_mappings::Profiles::built_in().unwrap());
    let connections = Connections::new(app.store.clone(), &keyring, profiles);
    let spec = fhirgate::cli::sandbox_spec(&sim, practice).unwrap();
    let info = connections.add(spec).await.unwrap();
    (sim, connections, info.id)
}

#[tokio::test]
async fn each_vendor_pull_stores_every_patient_once_and_the_next_pull_only_what_changed() {
    let app = spawn_app_with(&format!("master_key = '{}'", master_key())).await;
    let s = session(
        &app,
        "system/Patient.rs system/Coverage.rs",
        Role::ExternalSystem,
    )
    .await;
    let practice = ResourceId::parse("practice", s.practice_id.as_str()).unwrap();
    let keys = PhiKeys::new(&Keyring::parse(&master_key()).unwrap());
    let vault = fhirgate::startup::open_vault(&*app.store, &keys)
        .await
        .unwrap();
    let (log, writer) = fhirgate::audit::AuditLog::start(app.store.clone());
    let context = AdapterContext {
        audit: Arc::new(AuditedCalls::new(log, practice.clone())),
    };
    let mut total = 0;
    let mut family_names = Vec::new();
    for (personality, vendor) in [
        (Personality::Generic, "generic"),
        (Personality::Cerner, "cerner"),
        (Personality::Epic, "epic"),
    ] {
        let (sim, connections, id) = connect(&app, &practice, personality, 60).await;
        let (_, connection) = connections.open(&id).await.unwrap();
        let adapter = connections.build(&connection, &context).unwrap();
        let profile = connections.profile(vendor).unwrap();
        let target = PullTarget {
            store: &*app.store,
            vault: &vault,
            practice: &practice,
            connection_id: &id,
            run_id: None,
        };
        let options = PullOptions { coverage: true };
        let first = pull(&target, &*adapter, profile, None, options, on_page(|_| {}))
            .await
            .unwrap();
        assert_eq!(
            (first.received, first.created, first.failed),
            (60, 60, 0),
            "{vendor}: {first:?}"
        );
        let expected_coverages: usize = sim
            .patient_ids()
            .iter()
            .map(|p| sim.coverages(p).len())
            .sum();
        assert_eq!(first.coverages, expected_coverages as u64, "{vendor}");
        total += 60;

        // Every simulator patient is findable by its EHR id, once, with its coverages linked.
        for ehr_id in sim.patient_ids().iter().take(3) {
            let query =
                format!("/fhir/r4/Patient?identifier=urn:fhirgate:connection:{id}|{ehr_id}");
            let res = app
                .client
                .get(app.url(&query))
                .bearer_auth(&s.token)
                .send()
                .await
                .unwrap();
            let bundle = fhir_body(res).await;
            assert_eq!(bundle["total"], 1, "{vendor}");
            let local = bundle["entry"][0]["resource"]["id"]
                .as_str()
                .unwrap()
                .to_owned();
            family_names.push(
                sim.patient(ehr_id).unwrap()["name"][0]["family"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
            let res = app
                .client
                .get(app.url(&format!("/fhir/r4/Coverage?beneficiary=Patient/{local}")))
                .bearer_auth(&s.token)
                .send()
                .await
                .unwrap();
            let body = fhir_body(res).await;
            assert_eq!(
                body["total"],
                sim.coverages(ehr_id).len(),
                "{vendor}: {body}"
            );
        }

        // The EHR edits 5 patients: the next pull from the watermark updates exactly those.
        let touched = sim.controls().touch(5);
        assert_eq!(touched.len(), 5);
        let second = pull(
            &target,
            &*adapter,
            profile,
            first.watermark.as_deref(),
            PullOptions::default(),
            on_page(|_| {}),
        )
        .await
        .unwrap();
        assert_eq!(
            (second.created, second.updated, second.failed),
            (0, 5, 0),
            "{vendor}: {second:?}"
        );
        assert!(second.watermark > first.watermark, "{vendor}");
        sim.stop().await;
    }
    let res = app
        .client
        .get(app.url("/fhir/r4/Patient?_summary=count"))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(fhir_body(res).await["total"], total);

    drop(context);
    writer.await.unwrap();
    let records = app
        .store
        .audit_chain_page(practice.as_str(), 0, 100_000)
        .await
        .unwrap();
    let count = |action: &str| records.iter().filter(|r| r.action == action).count();
    assert!(
        count("sync") >= total + 15,
        "every stored resource is audited"
    );
    assert!(count("ehr-token") >= 3 && count("ehr-read") + count("ehr-search") > 0);
    assert!(records
        .iter()
        .filter(|r| r.action.starts_with("ehr-"))
        .all(|r| r.connection_id.is_some()));
    assert!(fhirgate::audit::verify_chain(practice.as_str(), &records).ok);
    if backend() == Backend::Sqlite {
        let bytes = sqlite_bytes(&app);
        for family in &family_names {
            assert!(
                !contains(&bytes, &format!("\"{family}\"")),
                "a pulled name is stored in clear"
            );
        }
    }
}

/// `fhirgate sandbox` as a new user runs it: simulators up, a connection to each, a pull
/// through the real adapters into the configured database, one JSON line per step.
#[tokio::test]
async fn the_sandbox_pulls_every_synthetic_patient_of_each_simulator_it_starts() {
    let (_db, url) = crate::helpers::TestDb::create().await;
    let out = run(fhirgate()
        .args([
            "sandbox",
            "--vendor",
            "cerner",
            "--vendor",
            "athena",
            "--patients",
            "30",
            "--once",
        ])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pulls: Vec<&Value> = lines.iter().filter(|l| l.get("pulled").is_some()).collect();
    assert_eq!(pulls.len(), 2, "{lines:?}");
    for p in pulls {
        assert_eq!(p["report"]["created"], 30, "{p}");
        assert_eq!(p["report"]["failed"], 0, "{p}");
    }
    assert!(lines.iter().all(|l| !l.to_string().contains("PRIVATE KEY")));

    let out = run(fhirgate()
        .args(["sandbox", "--vendor", "meditech", "--once"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vendor: no simulator for `meditech`"));
}
