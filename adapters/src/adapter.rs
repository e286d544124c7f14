//! What the gateway needs from an EHR, as one object-safe trait.
//!
//! Resources travel as the EHR's own JSON (`serde_json::Value`, numbers kept digit for digit):
//! the gateway stores what the EHR sent, and maps it to the internal model with
//! `fhirgate_mappings` and the connection's vendor profile.

use std::pin::Pin;

use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::AdapterError;

/// One page of resources (a searchset Bundle's entries) and where the listing stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub resources: Vec<Value>,
    /// The largest `meta.lastUpdated` seen so far: the watermark to resume from.
    pub watermark: Option<String>,
}

/// Pages of a listing, fetched as they are consumed (memory flat in the listing's length).
pub type PageStream<'a> = Pin<Box<dyn Stream<Item = Result<Page, AdapterError>> + Send + 'a>>;

/// A Bulk Data kick-off (FHIR Bulk Data Access v2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRequest {
    /// A Group id for a group-level export; else a Patient-level export.
    pub group: Option<String>,
    pub types: Vec<String>,
    /// FHIR instant.
    pub since: Option<String>,
}

/// A running export at the EHR: its status URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkExport {
    pub status_url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportFile {
    pub resource_type: String,
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportStatus {
    InProgress {
        progress: Option<String>,
    },
    Complete {
        transaction_time: String,
        files: Vec<ExportFile>,
    },
}

/// A claim's new status, pushed to the EHR (the sync issue defines when).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimStatusUpdate {
    /// The claim's id at the EHR.
    pub claim_id: String,
    pub patient_id: String,
    /// FHIR ClaimResponse outcome: `queued`, `complete`, `error` or `partial`.
    pub outcome: String,
    pub disposition: Option<String>,
    /// An idempotency key: pushing the same update twice has one effect.
    pub update_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReceipt {
    /// What the EHR assigned (a ClaimResponse id, a Task id...).
    pub remote_id: Option<String>,
}

/// An EHR, as the gateway sees it. Implementations hold their own connection state (tokens,
/// rate limits, circuit breaker); every method may be called concurrently.
#[async_trait::async_trait]
pub trait EhrAdapter: Send + Sync {
    /// The vendor this adapter speaks to (`epic`, `cerner`, `generic`...).
    fn vendor(&self) -> &str;

    /// One patient by the EHR's id.
    async fn patient(&self, id: &str) -> Result<Value, AdapterError>;

    /// Patients changed after `since` (a FHIR instant; `None` for all), page by page in
    /// `_lastUpdated` order.
    fn patients_changed_since<'a>(&'a self, since: Option<&'a str>) -> PageStream<'a>;

    /// The coverages of a patient.
    async fn coverage_for(&self, patient_id: &str) -> Result<Vec<Value>, AdapterError>;

    /// Starts a Bulk Data export; `Ok(None)` when the EHR does not support it (the caller
    /// falls back to [`EhrAdapter::patients_changed_since`]).
    async fn start_export(
        &self,
        request: &ExportRequest,
    ) -> Result<Option<BulkExport>, AdapterError>;

    async fn poll_export(&self, export: &BulkExport) -> Result<ExportStatus, AdapterError>;

    /// The resources of one output file, streamed line by line.
    fn download<'a>(&'a self, file: &'a ExportFile) -> PageStream<'a>;

    /// Tells the EHR a claim's new status.
    async fn push_claim_status(
        &self,
        update: &ClaimStatusUpdate,
    ) -> Result<PushReceipt, AdapterError>;
}
