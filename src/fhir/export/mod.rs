//! FHIR Bulk Data Access v2 export (`$export`, https://hl7.org/fhir/uv/bulkdata/export.html):
//! the kick-off at the system, Patient and Group levels, the status endpoint, the NDJSON files,
//! and the background runner that writes them.
//!
//! What it owns:
//! - jobs in the database (`export_jobs`), so any instance answers a status request and a job
//!   interrupted by a restart is resumed where its last sealed chunk left it;
//! - the output as chunks of whole NDJSON lines, each sealed with AES-256-GCM bound to
//!   (practice, job, file, chunk) (`export_chunks`): the NDJSON is PHI and is never stored in
//!   plaintext;
//! - who may see a job: only the client that started it, in its practice; anyone else gets the
//!   404 of a job that does not exist.
//!
//! What it must never do: log or store anything of a resource's content in clear (only ids,
//! counts and fixed phrases), or echo a client's parameter values in an error.

mod kickoff;
mod runner;
mod status;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use actix_web::http::Method;
use serde::Deserialize;

use super::resources::{Kind, ParamKind};
use super::{FhirApi, OperationDef, FHIR_BASE};
use crate::gate::Permission;

pub(crate) use runner::start;

/// The OperationDefinitions of Bulk Data Access v2.
pub const EXPORT_DEFINITION: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export";
pub const PATIENT_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export";
pub const GROUP_EXPORT_DEFINITION: &str =
    "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export";

/// The status endpoint of a job (the kick-off's `Content-Location`): GET polls, DELETE cancels.
const STATUS_PATH: &str = "/$export-status/{id}";
/// One output file of a finished job.
const FILE_PATH: &str = "/$export-file/{id}/{file}";

/// The NDJSON media type of the output files.
pub const NDJSON: &str = "application/fhir+ndjson";

/// `[export]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSettings {
    /// Hours a finished (or failed) export stays; then the job and its files are deleted.
    pub output_retention_hours: u64,
    /// Resources per NDJSON file; a type with more is split over several files.
    pub file_max_resources: u64,
    /// Size in KiB at which a file's NDJSON is cut into a sealed chunk (whole lines: a chunk
    /// exceeds it by less than one resource).
    pub chunk_kib: u64,
    /// Resources read from the store per round trip.
    pub page_size: u64,
    /// Exports one instance runs at once; more wait their turn (status: "queued").
    pub max_running_jobs: u64,
    /// How long a runner holds its job without committing (seconds): a job whose instance died
    /// is resumed elsewhere once this has passed.
    pub lease_secs: u64,
    /// How often each instance looks for expired jobs and for jobs nobody holds (seconds).
    pub sweep_secs: u64,
}

impl ExportSettings {
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !(1..=24 * 30).contains(&self.output_retention_hours) {
            return Err((
                "export.output_retention_hours",
                "must be between 1 and 720 (30 days)",
            ));
        }
        if self.file_max_resources == 0 {
            return Err(("export.file_max_resources", "must be at least 1"));
        }
        if !(1..=64 * 1024).contains(&self.chunk_kib) {
            return Err(("export.chunk_kib", "must be between 1 and 65536 (64 MiB)"));
        }
        if !(1..=10_000).contains(&self.page_size) {
            return Err(("export.page_size", "must be between 1 and 10000"));
        }
        if !(1..=64).contains(&self.max_running_jobs) {
            return Err(("export.max_running_jobs", "must be between 1 and 64"));
        }
        if !(1..=3600).contains(&self.lease_secs) {
            return Err(("export.lease_secs", "must be between 1 and 3600"));
        }
        if !(1..=3600).contains(&self.sweep_secs) {
            return Err(("export.sweep_secs", "must be between 1 and 3600"));
        }
        Ok(())
    }

    fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_secs)
    }

    fn retention_us(&self) -> i64 {
        i64::try_from(self.output_retention_hours)
            .unwrap_or(720)
            .saturating_mul(3_600_000_000)
    }
}

/// Declares `$export` at the system level, on Patient and on Group instances (each when the
/// type is served), and the routes of its jobs. Exported types are every type the resource
/// store keeps ([`FhirApi::stored_kinds`]), found when the application is assembled.
pub fn register(api: FhirApi) -> FhirApi {
    let served = |ty: &str| api.resources().iter().any(|r| r.resource_type == ty);
    let (patient, group) = (served("Patient"), served("Group"));
    let mut api = api.operation(
        OperationDef::system("export", EXPORT_DEFINITION)
            .documentation(
                "Every exported type of the caller's practice that its scopes allow reading \
                 (r and s); Prefer: respond-async; _type, _since, _outputFormat (NDJSON)",
            )
            .handler(Method::GET, kickoff::system)
            .handler(Method::POST, kickoff::system),
    );
    if patient {
        api = api.operation(
            OperationDef::on_type("Patient", "export", PATIENT_EXPORT_DEFINITION)
                .documentation(
                    "Every patient of the practice and the resources of their compartments",
                )
                .requires(Permission::Read)
                .handler(Method::GET, kickoff::patient)
                .handler(Method::POST, kickoff::patient),
        );
    }
    if patient && group {
        api = api.operation(
            OperationDef::on_instance("Group", "export", GROUP_EXPORT_DEFINITION)
                .documentation(
                    "The group's Patient members (Group.member.entity) and their compartments",
                )
                .requires(Permission::Read)
                .handler(Method::GET, kickoff::group)
                .handler(Method::POST, kickoff::group),
        );
    }
    api.job_route(STATUS_PATH, Method::GET, status::status)
        .job_route(STATUS_PATH, Method::DELETE, status::cancel)
        .job_route(FILE_PATH, Method::GET, status::download)
}

/// Whether a matched route template is a job's status or file route (not a kick-off): polling
/// and downloading are charged as reads, the export's weight having been paid at kick-off.
pub fn is_job_route(pattern: &str) -> bool {
    pattern
        .strip_prefix(FHIR_BASE)
        .is_some_and(|p| p == STATUS_PATH || p == FILE_PATH)
}

/// Whether a request path names an export file (served as NDJSON, so negotiation accepts an
/// `Accept` of NDJSON there).
pub fn is_file_path(path: &str) -> bool {
    path.strip_prefix(FHIR_BASE)
        .and_then(|p| p.strip_prefix("/$export-file/"))
        .is_some()
}

/// One exported type: its kind, and the parameter that puts a resource of it in a patient's
/// compartment (`None` for Patient itself and for types outside any patient's compartment).
#[derive(Clone, Copy)]
pub(crate) struct ExportType {
    pub kind: &'static Kind,
    pub compartment_param: Option<&'static str>,
}

impl ExportType {
    fn of(kind: &'static Kind) -> Self {
        // A `patient` reference to Patient (Encounter.patient, Claim.patient, Coverage.patient...),
        // the search parameter FHIR's Patient CompartmentDefinition uses for those types.
        let compartment_param = kind
            .params
            .iter()
            .find(|p| {
                p.name == "patient"
                    && matches!(
                        p.kind,
                        ParamKind::Reference {
                            target: "Patient",
                            ..
                        }
                    )
            })
            .map(|p| p.name);
        Self {
            kind,
            compartment_param,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind.resource_type
    }

    /// Whether a Patient- or Group-level export includes the type.
    pub fn in_patient_compartment(&self) -> bool {
        self.name() == "Patient" || self.compartment_param.is_some()
    }
}

/// What the export handlers and runners share: settings, exported types, and this instance's
/// running jobs. Cheap to clone.
#[derive(Clone)]
pub struct Exports {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ExportSettings,
    types: Vec<ExportType>,
    /// The runtime runners and the sweeper run on (the application's, not an HTTP worker's).
    runtime: tokio::runtime::Handle,
    /// Jobs with a runner task on this instance (running or waiting for a permit).
    active: Mutex<HashSet<String>>,
    permits: Arc<tokio::sync::Semaphore>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Exports {
    /// Must be called inside the application's tokio runtime.
    pub fn new(settings: &ExportSettings, api: &FhirApi) -> Self {
        let (stop, _) = tokio::sync::watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                types: api.stored_kinds().map(ExportType::of).collect(),
                runtime: tokio::runtime::Handle::current(),
                active: Mutex::new(HashSet::new()),
                permits: Arc::new(tokio::sync::Semaphore::new(
                    usize::try_from(settings.max_running_jobs).unwrap_or(1),
                )),
                stop,
            }),
        }
    }

    pub(crate) fn settings(&self) -> &ExportSettings {
        &self.inner.settings
    }

    /// Every exported type, in export order.
    pub(crate) fn types(&self) -> &[ExportType] {
        &self.inner.types
    }

    pub(crate) fn find(&self, name: &str) -> Option<ExportType> {
        self.inner.types.iter().find(|t| t.name() == name).copied()
    }

    /// Stops the sweeper and asks runners to stop after their current page, releasing their
    /// jobs (another instance, or this one restarted, resumes them); waits up to `grace` for
    /// them to do so.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        let _ = self.inner.stop.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline && self.running() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    fn stopping(&self) -> bool {
        *self.inner.stop.borrow()
    }

    fn running(&self) -> usize {
        self.inner.active.lock().map(|a| a.len()).unwrap_or(0)
    }
}

/// `4000` as `4,000`.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_with_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4_000), "4,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn job_routes_are_told_apart_from_kick_offs() {
        assert!(is_job_route("/fhir/r4/$export-status/{id}"));
        assert!(is_job_route("/fhir/r4/$export-file/{id}/{file}"));
        assert!(!is_job_route("/fhir/r4/$export"));
        assert!(!is_job_route("/fhir/r4/Patient/$export"));
        assert!(is_file_path("/fhir/r4/$export-file/abc/1"));
        assert!(!is_file_path("/fhir/r4/$export-status/abc"));
    }

    #[test]
    fn the_compartment_is_found_from_the_search_parameters() {
        let patient = ExportType::of(&crate::fhir::resources::patient::PATIENT);
        assert!(patient.in_patient_compartment());
        assert_eq!(patient.compartment_param, None);
        let group = ExportType::of(&crate::fhir::resources::group::GROUP);
        assert!(!group.in_patient_compartment(), "member is not `patient`");
    }
}
