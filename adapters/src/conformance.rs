//! The conformance kit (feature `conformance`): the one suite every [`EhrAdapter`] passes against
//! its EHR simulator (`fhirgate-ehr-sim`), and the helpers other crates reuse to point an adapter
//! at a simulator ([`connection_for`], [`Kit::start`]).
//!
//! Each check is a plain async function taking a [`Personality`] that starts its own small
//! simulator and the adapter the [`Registry`] builds for it, acts through the [`EhrAdapter`]
//! trait only, and panics (a failed test) with a message naming what the adapter got wrong. The
//! [`conformance_suite!`](crate::conformance_suite) macro turns them into one `#[tokio::test]` per
//! check for a vendor:
//!
//! ```ignore
//! fhirgate_adapters::conformance_suite!(epic, Personality::Epic);
//! ```
//!
//! Everything here runs against synthetic patients only; the panics name ids of synthetic
//! patients at most, never anything from a real EHR. It is test tooling: never use it on a
//! production connection.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fhir_sdk::r4b::resources::{Coverage, Patient};
use fhirgate_mappings::{coverage, patient, Profile, Profiles};
use futures_util::StreamExt;
use serde_json::{json, Value};

pub use fhirgate_ehr_sim::{Personality, SimConfig, SimCredential, Simulator};

use crate::audit::{AuditUnavailable, OutboundAction, OutboundAudit, OutboundCall};
use crate::{
    AdapterContext, AdapterError, ClaimStatusUpdate, Connection, Credential, EhrAdapter,
    ExportRequest, ExportStatus, Registry,
};

/// Patients a kit simulator serves: enough for several pages, few enough to stay quick.
pub const KIT_PATIENTS: usize = 23;
/// `_count` the kit's connections ask for (several pages of [`KIT_PATIENTS`]).
pub const KIT_PAGE_SIZE: u32 = 7;

/// The registry vendor name of a simulator personality.
pub fn vendor_of(personality: Personality) -> &'static str {
    personality.traits().vendor
}

/// A small, quick simulator of `personality`: [`KIT_PATIENTS`] patients, NDJSON files of 10
/// lines (several files per export), one `202` status poll.
pub fn sim_config(personality: Personality) -> SimConfig {
    let mut config = SimConfig::new(personality);
    config.patients = KIT_PATIENTS;
    config.file_lines = 10;
    config.export_polls = 1;
    config
}

/// The [`Connection`] an adapter needs to talk to `sim`: its vendor, FHIR base, client id and
/// credential (the simulator's key or secret), the token URL (configured for the vendors whose
/// documentation gives it; left to SMART discovery for generic), `group_id` and `tenant`, and
/// settings that keep tests quick (small retry delays, a short breaker cool-down, a high rate
/// limit, [`KIT_PAGE_SIZE`]).
pub fn connection_for(sim: &Simulator) -> Connection {
    let personality = sim.personality();
    let credential = match (sim.client_secret(), sim.client_key()) {
        (Some(secret), _) => Credential::ClientSecret(secret.to_owned()),
        (None, Some(key)) => Credential::PrivateKey {
            pem: key.private_pem.clone(),
            kid: Some(key.kid.clone()),
        },
        // A simulator started with a caller's public key only: no usable credential here.
        (None, None) => Credential::ClientSecret(String::new()),
    };
    let mut settings = sim.vendor_settings();
    let mut set = |key: &str, value: Value| {
        settings.insert(key.to_owned(), value);
    };
    set("page_size", json!(KIT_PAGE_SIZE));
    set("max_attempts", json!(3));
    set("retry_base_ms", json!(10));
    set("retry_max_delay_ms", json!(50));
    set("retry_budget_ms", json!(5_000));
    set("retry_after_cap_s", json!(5));
    set("rate_limit_per_second", json!(1_000));
    set("breaker_failures", json!(5));
    set("breaker_cooldown_ms", json!(300));
    set("export_poll_ms", json!(20));
    set("export_timeout_s", json!(30));
    let traits = personality.traits();
    Connection {
        id: format!("kit-{}", vendor_of(personality)),
        vendor: vendor_of(personality).to_owned(),
        fhir_base_url: sim.fhir_base_url(),
        client_id: sim.client_id().to_owned(),
        // Discovery is exercised where the vendor's documentation leaves it as the way.
        token_url: (!traits.discovered_token_url).then(|| sim.token_url()),
        credential,
        scopes: None,
        settings,
    }
}

/// Records every audited outbound call (action and status), to check each one is audited.
#[derive(Debug, Default)]
pub struct RecordingAudit {
    calls: Mutex<Vec<(OutboundAction, Option<u16>)>>,
}

impl RecordingAudit {
    pub fn calls(&self) -> Vec<(OutboundAction, Option<u16>)> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn count(&self, action: OutboundAction) -> usize {
        self.calls().iter().filter(|(a, _)| *a == action).count()
    }
}

#[async_trait::async_trait]
impl OutboundAudit for RecordingAudit {
    async fn record(&self, call: &OutboundCall<'_>) -> Result<(), AuditUnavailable> {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push((call.action, call.status));
        }
        Ok(())
    }
}

/// A simulator and the adapter the built-in [`Registry`] makes for it.
pub struct Kit {
    pub sim: Simulator,
    pub adapter: Arc<dyn EhrAdapter>,
    pub profile: Profile,
    pub audit: Arc<RecordingAudit>,
}

impl Kit {
    /// Starts a simulator from `config` (see [`sim_config`]) and builds its adapter.
    pub async fn start(config: SimConfig) -> Kit {
        Self::start_with(config, |_| {}).await
    }

    /// Starts a simulator from `config` and builds the adapter of [`connection_for`] it, after
    /// `adjust` (to change a setting).
    pub async fn start_with(config: SimConfig, adjust: impl FnOnce(&mut Connection)) -> Kit {
        let sim = Simulator::start(config).expect("the simulator starts");
        let mut connection = connection_for(&sim);
        adjust(&mut connection);
        let profiles = Profiles::built_in().expect("the built-in profiles load");
        let profile = profiles
            .get(&connection.vendor)
            .cloned()
            .expect("the vendor has a mapping profile in mappings/profiles/");
        let audit = Arc::new(RecordingAudit::default());
        let context = AdapterContext {
            audit: audit.clone(),
        };
        let adapter = Registry::built_in()
            .build(&connection, &profiles, &context)
            .expect("the registry builds the vendor's adapter for its simulator");
        Kit {
            sim,
            adapter,
            profile,
            audit,
        }
    }

    /// Every page of `patients_changed_since(since)`: the resources and the last watermark.
    pub async fn changed_since(&self, since: Option<&str>) -> (Vec<Value>, Option<String>) {
        let mut pages = self.adapter.patients_changed_since(since);
        let mut resources = Vec::new();
        let mut watermark = None;
        while let Some(page) = pages.next().await {
            let page = page.expect("a page of the changed-patients listing");
            resources.extend(page.resources);
            watermark = page.watermark.or(watermark);
        }
        (resources, watermark)
    }

    /// Runs a Bulk export to the end: every resource of every output file, by resource type.
    pub async fn export(&self, request: &ExportRequest) -> BTreeMap<String, Vec<Value>> {
        let export = self
            .adapter
            .start_export(request)
            .await
            .expect("the export kick-off")
            .expect("the adapter supports Bulk export at its simulator");
        let started = Instant::now();
        let files = loop {
            match self.adapter.poll_export(&export).await.expect("a poll") {
                ExportStatus::Complete { files, .. } => break files,
                ExportStatus::InProgress { .. } => {
                    assert!(
                        started.elapsed() < Duration::from_secs(20),
                        "export never ends"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for file in &files {
            let mut pages = self.adapter.download(file);
            while let Some(page) = pages.next().await {
                let page = page.expect("a page of an export file");
                out.entry(file.resource_type.clone())
                    .or_default()
                    .extend(page.resources);
            }
        }
        out
    }

    pub async fn stop(self) {
        self.sim.stop().await;
    }
}

fn id_of(resource: &Value) -> String {
    resource
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn ids(resources: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = resources.iter().map(id_of).collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

fn lu_of(resource: &Value) -> String {
    resource["meta"]["lastUpdated"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Auth: a token is obtained, cached across calls, and replaced after the simulator expires it,
/// with the call that met the 401 still succeeding. Every token request and FHIR call is
/// audited.
pub async fn check_auth(personality: Personality) {
    let kit = Kit::start(sim_config(personality)).await;
    let id = kit.sim.patient_ids()[0].clone();
    for _ in 0..3 {
        kit.adapter.patient(&id).await.expect("a patient read");
    }
    let c = kit.sim.controls().counters();
    assert_eq!(c.tokens_granted, 1, "one token serves several calls");
    assert_eq!(c.tokens_refused, 0);
    kit.sim.controls().expire_tokens();
    let patient = kit
        .adapter
        .patient(&id)
        .await
        .expect("the read succeeds after a refresh");
    assert_eq!(id_of(&patient), id);
    let c = kit.sim.controls().counters();
    assert_eq!(c.tokens_granted, 2, "a refused token is replaced once");
    assert_eq!(c.unauthorized_sent, 1);
    kit.adapter.patient(&id).await.expect("a later read");
    assert_eq!(kit.sim.controls().counters().tokens_granted, 2);
    assert_eq!(kit.audit.count(OutboundAction::Token), 2);
    assert_eq!(
        kit.audit.count(OutboundAction::Read) as u64,
        kit.sim.controls().counters().fhir_requests,
        "every FHIR call is audited"
    );
    kit.stop().await;
}

/// Paging: `patients_changed_since(None)` returns every simulator patient exactly once.
pub async fn check_paging(personality: Personality) {
    let kit = Kit::start(sim_config(personality)).await;
    let (resources, watermark) = kit.changed_since(None).await;
    let got = ids(&resources);
    let distinct: BTreeSet<&String> = got.iter().collect();
    assert_eq!(distinct.len(), got.len(), "a patient was listed twice");
    assert_eq!(got, sorted(kit.sim.patient_ids()), "every patient, once");
    let newest = resources.iter().map(lu_of).max();
    assert_eq!(watermark, newest, "the watermark is the newest lastUpdated");
    kit.stop().await;
}

/// Changed-since: after `touch(k)`, a listing from the previous watermark returns exactly the
/// touched patients (Epic: through its Group export), with their new telecom.
pub async fn check_changed_since(personality: Personality) {
    let kit = Kit::start(sim_config(personality)).await;
    let (_, watermark) = kit.changed_since(None).await;
    let watermark = watermark.expect("a watermark after a full listing");
    let (nothing, same) = kit.changed_since(Some(&watermark)).await;
    assert!(nothing.is_empty(), "nothing changed after the watermark");
    // An empty listing may have no page at all (an export with no output file): the caller
    // keeps its watermark. A page that has one must not move it.
    assert!(
        same.is_none() || same.as_deref() == Some(watermark.as_str()),
        "the watermark holds"
    );
    let touched = kit.sim.controls().touch(3);
    let (changed, next) = kit.changed_since(Some(&watermark)).await;
    assert_eq!(
        ids(&changed),
        sorted(touched.clone()),
        "exactly the touched"
    );
    for resource in &changed {
        let served = kit.sim.patient(&id_of(resource)).expect("a sim patient");
        assert_eq!(resource["telecom"], served["telecom"], "the edit is seen");
    }
    let next = next.expect("a new watermark");
    assert!(next > watermark, "the watermark moves forward");
    kit.stop().await;
}

/// Patient read, and an unknown id is `NotFound`.
pub async fn check_read(personality: Personality) {
    let kit = Kit::start(sim_config(personality)).await;
    for id in kit.sim.patient_ids().iter().take(3) {
        let patient = kit.adapter.patient(id).await.expect("a patient read");
        assert_eq!(Some(patient), kit.sim.patient(id), "the patient as served");
    }
    assert_eq!(
        kit.adapter.patient("no-such-patient").await,
        Err(AdapterError::NotFound)
    );
    kit.stop().await;
}

/// `coverage_for` returns each patient's coverages, none for a patient without any.
pub async fn check_coverage(personality: Personality) {
    let kit = Kit::start(sim_config(personality)).await;
    let mut seen = 0;
    for id in kit.sim.patient_ids() {
        let got = kit.adapter.coverage_for(&id).await.expect("coverage_for");
        let expected = kit.sim.coverages(&id);
        assert_eq!(ids(&got), ids(&expected), "the patient's coverages");
        seen += got.len();
    }
    assert!(seen > 0, "the simulator's patients have coverages");
    kit.stop().await;
}

/// Bulk export of Patient and Coverage with `_since`: kick-off, polls, every file downloaded;
/// exactly the patients changed after `_since` and their coverages.
pub async fn check_bulk_export(personality: Personality) {
    let kit = Kit::start(sim_config(personality)).await;
    let all = kit.sim.patient_ids();
    let middle = kit.sim.patient(&all[all.len() / 2]).expect("a patient");
    let since = lu_of(&middle);
    let since_time =
        time::OffsetDateTime::parse(&since, &time::format_description::well_known::Rfc3339)
            .expect("lastUpdated is an instant");
    let expected = kit.sim.patients_changed_after(since_time);
    assert!(!expected.is_empty() && expected.len() < all.len());
    let out = kit
        .export(&ExportRequest {
            group: None,
            types: vec!["Patient".into(), "Coverage".into()],
            since: Some(since),
        })
        .await;
    let patients = out.get("Patient").cloned().unwrap_or_default();
    assert_eq!(
        ids(&patients),
        ids(&expected),
        "the patients changed after _since"
    );
    let expected_cov: Vec<Value> = expected
        .iter()
        .flat_map(|p| kit.sim.coverages(&id_of(p)))
        .collect();
    let coverages = out.get("Coverage").cloned().unwrap_or_default();
    assert_eq!(ids(&coverages), ids(&expected_cov), "their coverages");
    kit.stop().await;
}

/// Retries: 503s then success is one successful call; a 429 with `Retry-After: 1` is waited
/// for (at least a second) and then succeeds.
pub async fn check_retry(personality: Personality) {
    let kit = Kit::start(sim_config(personality)).await;
    let id = kit.sim.patient_ids()[0].clone();
    kit.adapter.patient(&id).await.expect("a first read");
    let controls = kit.sim.controls();
    let before = controls.counters().fhir_requests;
    controls.fail_next(2, 503, None);
    kit.adapter
        .patient(&id)
        .await
        .expect("retried past two 503s");
    assert_eq!(controls.counters().fhir_requests - before, 3);
    controls.fail_next(3, 502, None);
    let err = kit.adapter.patient(&id).await.unwrap_err();
    assert!(err.is_retryable(), "attempts exhausted: still retryable");
    controls.throttle_next(1, 1);
    let started = Instant::now();
    kit.adapter
        .patient(&id)
        .await
        .expect("after the Retry-After");
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "Retry-After honoured"
    );
    controls.throttle_next(1, 60);
    let err = kit.adapter.patient(&id).await.unwrap_err();
    assert_eq!(
        err.retry_after(),
        Some(Duration::from_secs(60)),
        "a Retry-After over the cap is handed to the caller"
    );
    kit.stop().await;
}

/// Circuit breaker: at failure rate 1.0 it opens, then fails fast without reaching the
/// simulator, then after its cool-down one probe closes it once the EHR is healthy again.
pub async fn check_breaker(personality: Personality) {
    let kit = Kit::start(sim_config(personality)).await;
    let id = kit.sim.patient_ids()[0].clone();
    kit.adapter.patient(&id).await.expect("a first read");
    let controls = kit.sim.controls();
    controls.set_failure_rate(1.0);
    // Two calls of three attempts each: six failures, past the threshold of five.
    for _ in 0..2 {
        let err = kit.adapter.patient(&id).await.unwrap_err();
        assert!(err.is_retryable());
    }
    let reached = controls.counters().fhir_requests;
    for _ in 0..3 {
        let err = kit.adapter.patient(&id).await.unwrap_err();
        assert!(matches!(err, AdapterError::Transient(_)), "{err}");
    }
    assert_eq!(
        controls.counters().fhir_requests,
        reached,
        "an open circuit fails fast without calling the EHR"
    );
    controls.set_failure_rate(0.0);
    tokio::time::sleep(Duration::from_millis(350)).await;
    kit.adapter.patient(&id).await.expect("the probe closes it");
    kit.adapter.patient(&id).await.expect("closed");
    assert_eq!(controls.counters().fhir_requests, reached + 2);
    kit.stop().await;
}

/// Claim-status push: a duplicate of the same update (as a retry sends) is applied once; a new
/// update of the same claim is applied after it.
pub async fn check_claim_push(personality: Personality) {
    let kit = Kit::start(sim_config(personality)).await;
    let patient = kit.sim.patient_ids()[0].clone();
    let update = ClaimStatusUpdate {
        claim_id: "kit-claim-1".into(),
        patient_id: patient,
        outcome: "queued".into(),
        disposition: Some("Received".into()),
        update_id: "kit-update-1".into(),
    };
    let first = kit.adapter.push_claim_status(&update).await.expect("push");
    let again = kit.adapter.push_claim_status(&update).await.expect("again");
    assert!(first.remote_id.is_some());
    assert_eq!(first, again, "the duplicate names the same ClaimResponse");
    let applied = kit.sim.claim_updates("kit-claim-1");
    assert_eq!(applied.len(), 1, "applied once");
    let next = ClaimStatusUpdate {
        outcome: "complete".into(),
        update_id: "kit-update-2".into(),
        ..update
    };
    kit.adapter.push_claim_status(&next).await.expect("push 2");
    assert_eq!(kit.sim.claim_updates("kit-claim-1").len(), 2);
    assert_eq!(kit.sim.controls().counters().claim_updates_applied, 2);
    kit.stop().await;
}

/// Maps a Patient with `profile` (the gateway's path: `read` then `from_fhir`).
pub fn map_patient(resource: Value, profile: &Profile) -> Result<(), AdapterError> {
    let typed: Patient = fhirgate_mappings::read(resource, profile)?;
    patient::from_fhir(&typed, profile)?;
    Ok(())
}

/// Maps a Coverage with `profile`.
pub fn map_coverage(resource: Value, profile: &Profile) -> Result<(), AdapterError> {
    let typed: Coverage = fhirgate_mappings::read(resource, profile)?;
    coverage::from_fhir(&typed, profile)?;
    Ok(())
}

/// Mapping: every Patient and Coverage the adapter returns (listing, reads, coverage searches,
/// export files) maps with the vendor's profile, with zero failures.
pub async fn check_mapping(personality: Personality) {
    let kit = Kit::start(sim_config(personality)).await;
    let mut failures = Vec::new();
    let (patients, _) = kit.changed_since(None).await;
    let mut coverages = Vec::new();
    for p in &patients {
        coverages.extend(kit.adapter.coverage_for(&id_of(p)).await.expect("coverage"));
    }
    let exported = kit
        .export(&ExportRequest {
            group: None,
            types: vec![],
            since: None,
        })
        .await;
    let all_patients = patients
        .iter()
        .chain(exported.get("Patient").into_iter().flatten());
    for p in all_patients {
        if let Err(e) = map_patient(p.clone(), &kit.profile) {
            failures.push(format!("Patient/{}: {e}", id_of(p)));
        }
    }
    let all_coverages = coverages
        .iter()
        .chain(exported.get("Coverage").into_iter().flatten());
    let mut mapped = 0;
    for c in all_coverages {
        mapped += 1;
        if let Err(e) = map_coverage(c.clone(), &kit.profile) {
            failures.push(format!("Coverage/{}: {e}", id_of(c)));
        }
    }
    assert!(mapped > 0 && !patients.is_empty());
    assert!(failures.is_empty(), "mapping failures: {failures:#?}");
    kit.stop().await;
}

/// The shared official R4 examples (`Patient*.json`, `Coverage*.json`): `FHIRGATE_R4_EXAMPLES`,
/// else `../shared/fixtures/r4-examples` beside the workspace.
pub fn official_examples_dir() -> PathBuf {
    std::env::var_os("FHIRGATE_R4_EXAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/r4-examples")
        })
}

/// The official examples map with the vendor's profile (as an EHR following the standard would
/// send them), with zero failures.
pub fn check_official_examples(personality: Personality) {
    let profiles = Profiles::built_in().expect("the built-in profiles load");
    let profile = profiles
        .get(vendor_of(personality))
        .expect("the vendor's profile");
    let dir = official_examples_dir();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (set FHIRGATE_R4_EXAMPLES)", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let (mut patients, mut coverages, mut failures) = (0, 0, Vec::new());
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let mapped = if name.starts_with("Patient") && name.ends_with(".json") {
            patients += 1;
            map_patient(read_json(&path), profile)
        } else if name.starts_with("Coverage") && name.ends_with(".json") {
            coverages += 1;
            map_coverage(read_json(&path), profile)
        } else {
            continue;
        };
        if let Err(e) = mapped {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(
        patients > 0 && coverages > 0,
        "no examples in {}",
        dir.display()
    );
    assert!(failures.is_empty(), "mapping failures: {failures:#?}");
}

fn read_json(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).expect("an example file");
    serde_json::from_str(&text).expect("an example is JSON")
}

/// One `#[tokio::test]` per conformance check for a vendor, in a module named `$name`:
/// `conformance_suite!(epic, Personality::Epic);` (with `Personality` in scope).
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $personality:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use $crate::conformance as kit;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn auth_token_cached_and_refreshed() {
                kit::check_auth($personality).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn paging_lists_every_patient_once() {
                kit::check_paging($personality).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn changed_since_returns_exactly_the_touched() {
                kit::check_changed_since($personality).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn patient_read_and_not_found() {
                kit::check_read($personality).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn coverage_for_each_patient() {
                kit::check_coverage($personality).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bulk_export_since() {
                kit::check_bulk_export($personality).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retries_and_retry_after() {
                kit::check_retry($personality).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn circuit_breaker_opens_and_closes() {
                kit::check_breaker($personality).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn claim_push_applied_once() {
                kit::check_claim_push($personality).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn everything_returned_maps() {
                kit::check_mapping($personality).await
            }
            #[test]
            fn official_examples_map() {
                kit::check_official_examples($personality)
            }
        }
    };
}
