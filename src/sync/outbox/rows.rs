//! Writing outbox rows: where a claim's update goes, and the update sealed for the row.
//!
//! A claim goes to the EHR its patient came from. A patient pulled from a connection carries
//! the identifier `urn:fhirgate:connection:{connection id}` whose value is its id at that EHR
//! (see `sync::pull`); the first such identifier naming a connection of the claim's practice
//! decides. A claim whose patient has none (the practice entered the patient itself) has no EHR
//! to tell: no row is written, and the change commits all the same. The claim's id at the EHR
//! is the Claim's identifier of that same system when it has one, else the gateway's Claim id.
//!
//! Never logs or returns in an error anything read from the resources (ids at the EHR,
//! dispositions): they are PHI or close to it.

use std::collections::HashMap;

use fhirgate_adapters::ClaimStatusUpdate;
use serde_json::Value;

use super::ClaimOutbox;
use crate::crypto::{field_aad, PhiVault};
use crate::domain::ClaimStatus;
use crate::domain::ResourceId;
use crate::fhir::resources::{fields, open_json};
use crate::http::ApiError;
use crate::store::{ClaimEffects, ClaimStatusChange, NewOutboxRow, PushSource, Store, StoreError};
use crate::sync::pull::source_system;

/// The column a payload is sealed for: its AAD is `claim_outbox.payload:{row id}`.
pub const PAYLOAD_COLUMN: &str = "claim_outbox.payload";

/// The prefix of the identifier system that carries a pulled resource's id at its EHR.
const SOURCE_PREFIX: &str = "urn:fhirgate:connection:";

/// Longest disposition text sent to an EHR.
pub const MAX_DISPOSITION: usize = 1_000;

/// Where a claim's updates go.
#[derive(Clone, PartialEq, Eq)]
pub struct PushTarget {
    pub connection_id: String,
    /// The patient's id at the EHR.
    pub ehr_patient_id: String,
    /// The claim's id at the EHR (or the gateway's, when the EHR gave it none).
    pub ehr_claim_id: String,
    /// The gateway's patient id (for the audit trail).
    pub patient_id: String,
}

impl std::fmt::Debug for PushTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushTarget")
            .field("connection_id", &self.connection_id)
            .finish_non_exhaustive()
    }
}

/// Resources a write is about to commit, by (type, id): a transaction Bundle may write the
/// claim or its patient beside the ClaimResponse, and those are what the update is about.
pub type Pending<'a> = HashMap<(&'a str, &'a str), Value>;

/// What a FHIR write changes of claims (see [`ClaimEffects`]): the lifecycle steps of the
/// ClaimResponses it writes and the updates it queues for the EHR.
#[derive(Debug, Default)]
pub struct ClaimChanges {
    pub lifecycle: Vec<ClaimStatusChange>,
    /// The gateway's patient id of each lifecycle change's claim (its audit event names it).
    lifecycle_patients: Vec<Option<String>>,
    pub outbox: Vec<NewOutboxRow>,
}

impl ClaimChanges {
    /// One audit event per lifecycle change (`update` of the Claim), each made by `event`
    /// from the claim id and its patient: the trail says which claims an answer moved.
    pub fn audit_events(
        &self,
        event: impl Fn(&str, Option<String>) -> crate::audit::NewAuditEvent,
    ) -> Vec<crate::audit::NewAuditEvent> {
        self.lifecycle
            .iter()
            .zip(&self.lifecycle_patients)
            .map(|(change, patient)| event(&change.claim_id, patient.clone()))
            .collect()
    }

    pub fn effects(&self) -> ClaimEffects<'_> {
        ClaimEffects {
            lifecycle: &self.lifecycle,
            outbox: &self.outbox,
        }
    }
}

/// Whether a ClaimResponse reports a payment: `payment.amount.value` above zero.
fn reports_payment(response: &Value) -> bool {
    response
        .pointer("/payment/amount/value")
        .and_then(Value::as_f64)
        .is_some_and(|v| v > 0.0)
}

/// What the rows need to read resources.
pub struct Reader<'a> {
    pub store: &'a dyn Store,
    pub connections: &'a crate::sync::connections::Connections,
    pub vault: &'a PhiVault,
    pub practice: &'a ResourceId,
    pub pending: &'a Pending<'a>,
}

impl Reader<'_> {
    /// The current JSON of a resource of the practice (pending writes first); `None` when it
    /// does not exist or is deleted.
    pub async fn resource(&self, resource_type: &str, id: &str) -> Result<Option<Value>, ApiError> {
        if let Some(value) = self.pending.get(&(resource_type, id)) {
            return Ok(Some(value.clone()));
        }
        let Some(stored) = self
            .store
            .read_resource(self.practice, resource_type, id, None)
            .await?
        else {
            return Ok(None);
        };
        if stored.deleted {
            return Ok(None);
        }
        let json = open_json(self.vault, self.practice, &stored)?;
        Ok(serde_json::from_slice(&json).ok())
    }

    /// Where the Claim `claim_id` (whose JSON is `claim`) goes; `None` when its patient came
    /// from no connection of the practice.
    pub async fn target_for(
        &self,
        claim_id: &str,
        claim: &Value,
    ) -> Result<Option<PushTarget>, ApiError> {
        let Some(patient_id) = claim
            .get("patient")
            .and_then(|p| fields::reference_id(p, "Patient"))
        else {
            return Ok(None);
        };
        let Some(patient) = self.resource("Patient", &patient_id).await? else {
            return Ok(None);
        };
        for (system, value) in fields::identifiers(&patient) {
            let Some(connection_id) = system
                .as_deref()
                .and_then(|s| s.strip_prefix(SOURCE_PREFIX))
            else {
                continue;
            };
            // Only a connection of this practice: an identifier is data a client may write, and
            // must not send a claim to another practice's EHR.
            match self.connections.stored(connection_id).await {
                Ok(c) if &c.practice_id == self.practice => {}
                Ok(_) | Err(StoreError::NotFound) => continue,
                Err(e) => return Err(e.into()),
            }
            let system = source_system(connection_id);
            let ehr_claim_id = fields::identifiers(claim)
                .into_iter()
                .find(|(s, _)| s.as_deref() == Some(system.as_str()))
                .map_or_else(|| claim_id.to_owned(), |(_, v)| v);
            return Ok(Some(PushTarget {
                connection_id: connection_id.to_owned(),
                ehr_patient_id: value,
                ehr_claim_id,
                patient_id,
            }));
        }
        Ok(None)
    }
}

impl ClaimOutbox {
    /// The outbox row of one update of the practice's Claim `claim_id` to `target`, its
    /// payload sealed for the row.
    pub fn row(
        &self,
        practice: &ResourceId,
        claim_id: &str,
        target: &PushTarget,
        outcome: &str,
        disposition: Option<String>,
        source: PushSource,
    ) -> NewOutboxRow {
        let id = uuid::Uuid::new_v4().to_string();
        let update = ClaimStatusUpdate {
            claim_id: target.ehr_claim_id.clone(),
            patient_id: target.ehr_patient_id.clone(),
            outcome: outcome.to_owned(),
            disposition,
            update_id: id.clone(),
        };
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(&update).unwrap_or_default());
        let payload = self
            .cipher()
            .encrypt(&plain, field_aad(PAYLOAD_COLUMN, &id).as_bytes());
        NewOutboxRow {
            id,
            practice_id: practice.clone(),
            connection_id: target.connection_id.clone(),
            claim_id: claim_id.to_owned(),
            patient_id: Some(target.patient_id.clone()),
            source,
            payload,
        }
    }

    /// What the ClaimResponses among `written` (type, id, JSON of each resource a write is
    /// about to commit) change of their claims: for each whose `request` names a Claim of the
    /// practice, the lifecycle steps its answer takes the claim through
    /// ([`ClaimStatus::steps_for_answer`], from the claim's status as stored, compared and set
    /// at commit), and, when the claim has somewhere to go, the update with its `outcome` and
    /// `disposition`.
    pub async fn claim_response_changes(
        &self,
        reader: &Reader<'_>,
        written: &[(&str, &str, &Value)],
    ) -> Result<ClaimChanges, ApiError> {
        let mut rows = Vec::new();
        let mut lifecycle: Vec<ClaimStatusChange> = Vec::new();
        let mut lifecycle_patients = Vec::new();
        for (resource_type, _, resource) in written {
            if *resource_type != "ClaimResponse" {
                continue;
            }
            let Some(claim_id) = resource
                .get("request")
                .and_then(|r| fields::reference_id(r, "Claim"))
            else {
                continue;
            };
            // The FHIR checks require an outcome of the R4 code set; anything else says nothing.
            let Some(outcome) = resource
                .get("outcome")
                .and_then(Value::as_str)
                .filter(|o| matches!(*o, "queued" | "complete" | "error" | "partial"))
            else {
                continue;
            };
            let Some(claim) = reader.resource("Claim", &claim_id).await? else {
                continue;
            };
            // Where the claim stands: after this write's earlier answers, else as stored.
            let (at, mut version) = match lifecycle.iter().rev().find(|c| c.claim_id == claim_id) {
                Some(last) => (last.status, last.expected_version + 1),
                None => match reader
                    .store
                    .outbox()
                    .claim_state(reader.practice, &claim_id)
                    .await?
                {
                    Some(state) => (state.status, state.version),
                    None => (ClaimStatus::INITIAL, 0),
                },
            };
            for step in at.steps_for_answer(outcome, reports_payment(resource)) {
                lifecycle_patients.push(
                    claim
                        .get("patient")
                        .and_then(|p| fields::reference_id(p, "Patient")),
                );
                lifecycle.push(ClaimStatusChange {
                    practice_id: reader.practice.clone(),
                    claim_id: claim_id.clone(),
                    status: step,
                    expected_version: version,
                });
                version += 1;
            }
            let Some(target) = reader.target_for(&claim_id, &claim).await? else {
                continue;
            };
            let disposition = resource
                .get("disposition")
                .and_then(Value::as_str)
                .map(|d| d.chars().take(MAX_DISPOSITION).collect());
            rows.push(self.row(
                reader.practice,
                &claim_id,
                &target,
                outcome,
                disposition,
                PushSource::ClaimResponse,
            ));
        }
        Ok(ClaimChanges {
            lifecycle,
            lifecycle_patients,
            outbox: rows,
        })
    }

    /// Opens a row's payload (dispatcher).
    pub(crate) fn open(&self, id: &str, payload: &[u8]) -> Option<ClaimStatusUpdate> {
        let plain = self
            .cipher()
            .decrypt(payload, field_aad(PAYLOAD_COLUMN, id).as_bytes())
            .ok()?;
        serde_json::from_slice(&plain).ok()
    }
}

/// What a FHIR write changes of claims: for each ClaimResponse among `prepared` (the versions
/// one request is about to commit together), its claim's lifecycle steps and, when the claim
/// has somewhere to go, its update. The other resources of the same request are read as they
/// will be once it commits.
pub(crate) async fn for_fhir_writes(
    state: &crate::startup::AppState,
    practice: &ResourceId,
    prepared: &[&crate::fhir::resources::Prepared],
) -> Result<ClaimChanges, ApiError> {
    let reports = |p: &&crate::fhir::resources::Prepared| {
        p.write.resource_type == "ClaimResponse" && p.write.sealed.is_some()
    };
    if !prepared.iter().any(reports) {
        return Ok(ClaimChanges::default());
    }
    let values: Vec<(&str, &str, Value)> = prepared
        .iter()
        .filter(|p| p.write.sealed.is_some())
        .filter_map(|p| {
            let value = serde_json::from_slice(&p.json).ok()?;
            Some((p.write.resource_type.as_str(), p.write.id.as_str(), value))
        })
        .collect();
    let pending: Pending = values
        .iter()
        .map(|(t, id, v)| ((*t, *id), v.clone()))
        .collect();
    let written: Vec<(&str, &str, &Value)> = values.iter().map(|(t, id, v)| (*t, *id, v)).collect();
    let reader = Reader {
        store: &*state.store,
        connections: &state.connections,
        vault: state.vault().await?,
        practice,
        pending: &pending,
    };
    state.outbox.claim_response_changes(&reader, &written).await
}
