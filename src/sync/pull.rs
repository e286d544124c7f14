//! One pull of an EHR connection's patients (and, when asked, their coverages) into the
//! practice's FHIR store: page by page from the adapter, each resource mapped to the internal
//! model with the vendor's profile (a resource that does not map, or fails the FHIR checks, is
//! kept sealed in the quarantine with the rule it broke, never stored half-way), checked as a
//! FHIR write is, and written with one transaction per page together with its audit events.
//! A resource whose keyed digest matches the one stored by the last pull is counted unchanged
//! and not written again, so pulling twice (or resuming a pull) makes no new versions.
//!
//! A pulled resource keeps the EHR's JSON, under a local id derived from the connection and
//! the EHR's id (the same EHR resource always lands on the same local resource, so a second
//! pull updates rather than duplicates), with the EHR's id kept as an identifier of system
//! `urn:fhirgate:connection:{id}` and references between pulled resources rewritten to the
//! local ids. Nothing here logs a resource or an id.

use std::collections::HashMap;

use fhirgate_adapters::{AdapterError, EhrAdapter};
use fhirgate_mappings::Profile;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::audit::{Action, NewAuditEvent};
use crate::crypto::{field_aad, PhiVault};
use crate::domain::ResourceId;
use crate::fhir::resources::{bulk, kind_of};
use crate::store::{Expect, QuarantineRow, ResourceWrite, Store, StoreError, SyncDigests};

/// Where a pull writes.
pub struct PullTarget<'a> {
    pub store: &'a dyn Store,
    pub vault: &'a PhiVault,
    pub practice: &'a ResourceId,
    pub connection_id: &'a str,
    /// The job run pulling (named in quarantine rows), if any.
    pub run_id: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PullOptions {
    /// Also fetch each pulled patient's coverages.
    pub coverage: bool,
}

/// What a pull did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PullReport {
    pub pages: u64,
    /// Patients the EHR listed.
    pub received: u64,
    pub created: u64,
    pub updated: u64,
    /// Resources identical to what the last pull stored (not written again).
    pub unchanged: u64,
    pub coverages: u64,
    /// Resources that did not map or did not pass the FHIR checks (quarantined).
    pub failed: u64,
    /// The EHR's `meta.lastUpdated` high-water mark after the last page: where the next pull
    /// starts.
    pub watermark: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("EHR: {0}")]
    Adapter(#[from] AdapterError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// The caller stopped the pull after a committed page (shutdown, or its job lease was lost).
    #[error("stopped: {0}")]
    Stopped(&'static str),
}

/// Told after each committed page; an error stops the pull there.
#[async_trait::async_trait]
pub trait PullProgress: Send {
    async fn page_committed(&mut self, report: &PullReport) -> Result<(), PullError>;
}

/// Progress reported to a plain function (a progress line, a test's counter).
pub fn on_page<F: FnMut(&PullReport) + Send>(f: F) -> impl PullProgress {
    struct OnPage<F>(F);
    #[async_trait::async_trait]
    impl<F: FnMut(&PullReport) + Send> PullProgress for OnPage<F> {
        async fn page_committed(&mut self, report: &PullReport) -> Result<(), PullError> {
            (self.0)(report);
            Ok(())
        }
    }
    OnPage(f)
}

/// The AAD of a quarantined record's sealed JSON.
pub fn quarantine_aad(connection_id: &str, resource_type: &str, local_id: &str) -> String {
    field_aad(
        "sync_quarantine.payload",
        &format!("{connection_id}/{resource_type}/{local_id}"),
    )
}

/// The system of the identifier that carries a pulled resource's id at the EHR.
pub fn source_system(connection_id: &str) -> String {
    format!("urn:fhirgate:connection:{connection_id}")
}

/// The local id of an EHR resource: 32 hex digits of SHA-256 over the connection, type and
/// EHR id (a FHIR id, stable across pulls, unrelated between connections).
pub fn local_id(connection_id: &str, resource_type: &str, ehr_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(connection_id.as_bytes())
        .chain_update([0])
        .chain_update(resource_type.as_bytes())
        .chain_update([0])
        .chain_update(ehr_id.as_bytes())
        .finalize();
    crate::crypto::to_hex(&digest[..16])
}

/// Pulls patients changed after `since` (all when `None`), calling `progress` after each page.
pub async fn pull(
    target: &PullTarget<'_>,
    adapter: &dyn EhrAdapter,
    profile: &Profile,
    since: Option<&str>,
    options: PullOptions,
    mut progress: impl PullProgress,
) -> Result<PullReport, PullError> {
    let mut report = PullReport {
        watermark: since.map(str::to_owned),
        ..PullReport::default()
    };
    let mut pages = adapter.patients_changed_since(since);
    while let Some(page) = pages.next().await {
        let page = page?;
        report.pages += 1;
        ingest(
            target,
            adapter,
            profile,
            page.resources,
            options,
            &mut report,
        )
        .await?;
        if page.watermark.is_some() {
            report.watermark = page.watermark;
        }
        progress.page_committed(&report).await?;
    }
    Ok(report)
}

/// Coverage searches a batch runs at the EHR at once (the adapter's rate limit still applies).
const COVERAGE_FETCHES: usize = 8;

/// How one patient of an [`ingest_each`] batch ended.
#[derive(Debug)]
pub enum Ingested {
    /// Written, or identical to what is stored.
    Stored,
    /// It did not map, or failed the FHIR checks: quarantined with the reason.
    Refused,
    /// Fetching its coverages failed: nothing of it was written.
    Adapter(AdapterError),
}

/// Maps and writes one batch of the EHR's patients (and their coverages when asked), counting
/// into `report`: what a pull does with each page. One patient's coverage search failing fails
/// the batch (nothing of it is written; the page is pulled again).
pub async fn ingest(
    target: &PullTarget<'_>,
    adapter: &dyn EhrAdapter,
    profile: &Profile,
    resources: Vec<Value>,
    options: PullOptions,
    report: &mut PullReport,
) -> Result<(), PullError> {
    ingest_with(target, adapter, profile, resources, options, report, true)
        .await
        .map(drop)
}

/// [`ingest`] for independent patients (the webhook worker's batch of events): a patient whose
/// coverage search fails is left out and the others are written. One outcome per resource, in
/// order; `Err` only when storage failed (then nothing of the batch is known to be written).
pub async fn ingest_each(
    target: &PullTarget<'_>,
    adapter: &dyn EhrAdapter,
    profile: &Profile,
    resources: Vec<Value>,
    options: PullOptions,
    report: &mut PullReport,
) -> Result<Vec<Ingested>, PullError> {
    ingest_with(target, adapter, profile, resources, options, report, false).await
}

async fn ingest_with(
    target: &PullTarget<'_>,
    adapter: &dyn EhrAdapter,
    profile: &Profile,
    resources: Vec<Value>,
    options: PullOptions,
    report: &mut PullReport,
    strict: bool,
) -> Result<Vec<Ingested>, PullError> {
    report.received += resources.len() as u64;
    let mut outcomes: Vec<Ingested> = (0..resources.len()).map(|_| Ingested::Stored).collect();
    let mut quarantine = Vec::new();
    // (input position, admitted patient)
    let mut patients = Vec::with_capacity(resources.len());
    for (at, resource) in resources.into_iter().enumerate() {
        match admit(target, profile, "Patient", resource, &HashMap::new()) {
            Ok(admitted) => patients.push((at, admitted)),
            Err(refused) => {
                outcomes[at] = Ingested::Refused;
                quarantine.push(refused);
            }
        }
    }
    let mut coverages = Vec::new();
    if options.coverage {
        // Several searches at once, answers in the patients' order.
        // (The futures are made first: a stream mapping with a closure over borrowed patients
        // does not prove `Send` for every lifetime.)
        let mut searches = Vec::with_capacity(patients.len());
        for (_, patient) in &patients {
            searches.push(adapter.coverage_for(&patient.ehr_id));
        }
        let found: Vec<Result<Vec<Value>, AdapterError>> = futures_util::stream::iter(searches)
            .buffered(COVERAGE_FETCHES)
            .collect()
            .await;
        let mut kept = Vec::with_capacity(patients.len());
        let mut found_for_kept = Vec::with_capacity(patients.len());
        for ((at, patient), found) in patients.into_iter().zip(found) {
            match found {
                Ok(list) => {
                    kept.push((at, patient));
                    found_for_kept.push(list);
                }
                Err(e) if strict => return Err(e.into()),
                Err(e) => outcomes[at] = Ingested::Adapter(e),
            }
        }
        patients = kept;
        let locals: HashMap<String, String> = patients
            .iter()
            .map(|(_, p)| {
                (
                    format!("Patient/{}", p.ehr_id),
                    format!("Patient/{}", p.local_id),
                )
            })
            .collect();
        for list in found_for_kept {
            for coverage in list {
                match admit(target, profile, "Coverage", coverage, &locals) {
                    Ok(admitted) => coverages.push(admitted),
                    Err(refused) => quarantine.push(refused),
                }
            }
        }
    }
    // Which inputs each local id stands for (an EHR listing one patient twice).
    let mut positions: HashMap<String, Vec<usize>> = HashMap::with_capacity(patients.len());
    let patients: Vec<Admitted> = patients
        .into_iter()
        .map(|(at, p)| {
            positions.entry(p.local_id.clone()).or_default().push(at);
            p
        })
        .collect();
    let before = quarantine.len();
    let written = write(target, "Patient", patients, &mut quarantine).await?;
    for refused in &quarantine[before..] {
        for at in positions.get(&refused.local_id).into_iter().flatten() {
            outcomes[*at] = Ingested::Refused;
        }
    }
    report.created += written.created;
    report.updated += written.updated;
    report.unchanged += written.unchanged;
    let coverages = write(target, "Coverage", coverages, &mut quarantine).await?;
    report.coverages += coverages.created + coverages.updated + coverages.unchanged;
    report.failed += quarantine.len() as u64;
    keep_out(target, quarantine).await?;
    Ok(outcomes)
}

/// A resource that could not be admitted: what the quarantine keeps.
struct Refused {
    resource_type: &'static str,
    local_id: String,
    /// Which rule failed (fixed phrases; never a value).
    reason: String,
    json: String,
}

/// Seals refused resources into the quarantine.
async fn keep_out(target: &PullTarget<'_>, refused: Vec<Refused>) -> Result<(), PullError> {
    if refused.is_empty() {
        return Ok(());
    }
    let rows: Vec<QuarantineRow> = refused
        .into_iter()
        .map(|r| {
            let aad = quarantine_aad(target.connection_id, r.resource_type, &r.local_id);
            QuarantineRow {
                id: uuid::Uuid::new_v4().simple().to_string(),
                practice_id: target.practice.clone(),
                connection_id: target.connection_id.to_owned(),
                run_id: target.run_id.map(str::to_owned),
                resource_type: r.resource_type.to_owned(),
                payload: target.vault.seal_field(&aad, r.json.as_bytes()),
                local_id: r.local_id,
                reason: r.reason,
            }
        })
        .collect();
    target.store.jobs().quarantine(&rows).await?;
    Ok(())
}

/// A resource that maps, ready to be written under its local id.
struct Admitted {
    ehr_id: String,
    local_id: String,
    resource: Value,
}

/// Checks that `resource` is of the type asked and maps with the profile, and rewrites it for
/// the local store; refused (for the quarantine) otherwise.
fn admit(
    target: &PullTarget<'_>,
    profile: &Profile,
    resource_type: &'static str,
    mut resource: Value,
    locals: &HashMap<String, String>,
) -> Result<Admitted, Refused> {
    let ehr_id = resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let refuse = |resource: &Value, reason: String| {
        let json = serde_json::to_string(resource).unwrap_or_default();
        // Without an EHR id the record is named by its content (a hash: no PHI).
        let local = match &ehr_id {
            Some(id) => local_id(target.connection_id, resource_type, id),
            None => local_id(target.connection_id, resource_type, &json),
        };
        Refused {
            resource_type,
            local_id: local,
            reason,
            json,
        }
    };
    if resource.get("resourceType").and_then(Value::as_str) != Some(resource_type) {
        return Err(refuse(
            &resource,
            "not of the resource type asked for".into(),
        ));
    }
    let Some(ehr_id) = ehr_id.clone() else {
        return Err(refuse(&resource, "the EHR gave no id".into()));
    };
    let mapped = match resource_type {
        "Patient" => fhirgate_mappings::read(resource.clone(), profile)
            .and_then(|p| fhirgate_mappings::patient::from_fhir(&p, profile))
            .map(drop),
        _ => fhirgate_mappings::read(resource.clone(), profile)
            .and_then(|c| fhirgate_mappings::coverage::from_fhir(&c, profile))
            .map(drop),
    };
    if let Err(e) = mapped {
        // A mapping error names the element and the rule, never a value.
        return Err(refuse(&resource, e.to_string()));
    }
    let local_id = local_id(target.connection_id, resource_type, &ehr_id);
    let Some(object) = resource.as_object_mut() else {
        return Err(refuse(&resource, "not a JSON object".into()));
    };
    let system = source_system(target.connection_id);
    let identifiers = object
        .entry("identifier")
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(list) = identifiers {
        let known = list
            .iter()
            .any(|i| i["system"] == system.as_str() && i["value"] == ehr_id.as_str());
        if !known {
            list.push(json!({ "system": system, "value": ehr_id }));
        }
    }
    if !locals.is_empty() {
        rewrite_references(&mut resource, locals);
    }
    Ok(Admitted {
        ehr_id,
        local_id,
        resource,
    })
}

/// Replaces every `reference` that names a pulled resource by its local reference.
fn rewrite_references(value: &mut Value, locals: &HashMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "reference" {
                    if let Some(local) = v.as_str().and_then(|r| locals.get(r)) {
                        *v = Value::String(local.clone());
                    }
                } else {
                    rewrite_references(v, locals);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_references(v, locals)),
        _ => {}
    }
}

/// What writing one page's resources of one type did.
#[derive(Default)]
struct Written {
    created: u64,
    updated: u64,
    unchanged: u64,
}

/// Writes admitted resources of one type in one transaction with their audit events, skipping
/// those whose digest matches the last pull's; a resource that fails the FHIR checks goes to
/// `quarantine`. Digests are saved after the write commits: a crash in between only means the
/// next pull writes those resources once more.
async fn write(
    target: &PullTarget<'_>,
    resource_type: &'static str,
    admitted: Vec<Admitted>,
    quarantine: &mut Vec<Refused>,
) -> Result<Written, PullError> {
    let mut out = Written::default();
    if admitted.is_empty() {
        return Ok(out);
    }
    let Some(kind) = kind_of(resource_type) else {
        return Ok(out);
    };
    let ids: Vec<String> = admitted.iter().map(|a| a.local_id.clone()).collect();
    let heads = target
        .store
        .head_versions(target.practice, resource_type, &ids)
        .await?;
    let stored = target
        .store
        .jobs()
        .digests(target.connection_id, resource_type, &ids)
        .await?;
    let mut writes: Vec<ResourceWrite> = Vec::with_capacity(admitted.len());
    let mut audit = Vec::with_capacity(admitted.len());
    let mut digests = Vec::with_capacity(admitted.len());
    let mut admitted_ids = Vec::with_capacity(admitted.len());
    let mut seen = std::collections::HashSet::with_capacity(admitted.len());
    for a in admitted {
        // An EHR page listing one resource twice: the later copy wins on the next pull.
        if !seen.insert(a.local_id.clone()) {
            continue;
        }
        let json = serde_json::to_string(&a.resource).unwrap_or_default();
        let digest = target.vault.blind(DIGEST_LABEL, &json);
        let head = heads.get(&a.local_id).copied();
        admitted_ids.push(a.local_id.clone());
        if head.is_some()
            && stored
                .get(&a.local_id)
                .is_some_and(|d| crate::crypto::constant_time_eq(d, &digest))
        {
            out.unchanged += 1;
            continue;
        }
        let expect = head.map_or(Expect::Absent, Expect::Version);
        match bulk::resource_at(
            kind,
            target.vault,
            target.practice,
            a.resource,
            &a.local_id,
            expect,
        ) {
            Ok(w) => {
                match w.expect {
                    Expect::Absent => out.created += 1,
                    Expect::Version(_) => out.updated += 1,
                }
                let patient = (resource_type == "Patient").then(|| a.local_id.clone());
                audit.push(NewAuditEvent {
                    practice_id: Some(target.practice.clone()),
                    action: Some(Action::Sync),
                    status_code: if matches!(w.expect, Expect::Absent) {
                        201
                    } else {
                        200
                    },
                    resource_type: Some(resource_type.to_owned()),
                    resource_id: Some(a.local_id.clone()),
                    patient_id: patient,
                    connection_id: Some(target.connection_id.to_owned()),
                    ..NewAuditEvent::default()
                });
                digests.push((a.local_id, digest));
                writes.push(w);
            }
            Err(_) => {
                admitted_ids.pop();
                quarantine.push(Refused {
                    resource_type,
                    local_id: a.local_id,
                    reason: "failed the FHIR checks of a write".into(),
                    json,
                });
            }
        }
    }
    if !writes.is_empty() {
        // With their digests, in one transaction: a resource never stands without its digest
        // (killed between two commits, the next pull would write it again as a new version).
        let digests = SyncDigests {
            connection: target.connection_id,
            resource_type,
            digests: &digests,
        };
        target
            .store
            .write_pulled_resources(target.practice, &writes, &audit, digests)
            .await?;
    }
    target
        .store
        .jobs()
        .release_quarantine(target.connection_id, resource_type, &admitted_ids)
        .await?;
    Ok(out)
}

/// The label of pulled resources' digests (a blind index "column").
const DIGEST_LABEL: &str = "sync_digests.digest";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ids_are_stable_fhir_ids_distinct_per_connection_and_type() {
        let a = local_id("c1", "Patient", "e1");
        assert_eq!(a, local_id("c1", "Patient", "e1"));
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, local_id("c2", "Patient", "e1"));
        assert_ne!(a, local_id("c1", "Coverage", "e1"));
    }

    #[test]
    fn references_to_pulled_resources_become_local() {
        let locals = HashMap::from([("Patient/e1".to_owned(), "Patient/l1".to_owned())]);
        let mut coverage = json!({
            "beneficiary": { "reference": "Patient/e1" },
            "payor": [{ "reference": "Organization/o1" }],
        });
        rewrite_references(&mut coverage, &locals);
        assert_eq!(coverage["beneficiary"]["reference"], "Patient/l1");
        assert_eq!(coverage["payor"][0]["reference"], "Organization/o1");
    }
}
