//! The HIPAA audit trail (45 CFR 164.312(b)): one event for every request that reaches the gate,
//! every outbound EHR call and every job run. Append-only and tamper-evident: each practice has a
//! hash chain (`chain.rs`); PostgreSQL additionally refuses UPDATE/DELETE by trigger.
//! An event holds ids, codes and network facts only, never a PHI value.

pub mod chain;
pub mod middleware;
pub mod writer;

use serde::Serialize;
use time::OffsetDateTime;

use fhirgate_adapters::OutboundAction;

use crate::domain::ResourceId;

pub use chain::{verify_chain, ChainReport};
pub use writer::{AuditError, AuditLog};

/// What was done (the `action` of an event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Read,
    Vread,
    Search,
    History,
    Create,
    Update,
    Delete,
    Export,
    Token,
    Webhook,
    Sync,
    Push,
    /// A request that reached the gate but names no known interaction (404s, 405s).
    Access,
    /// A call the gateway made to an EHR (`ehr-read`, `ehr-token`...).
    #[serde(skip)]
    Outbound(OutboundAction),
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Vread => "vread",
            Action::Search => "search",
            Action::History => "history",
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Export => "export",
            Action::Token => "token",
            Action::Webhook => "webhook",
            Action::Sync => "sync",
            Action::Push => "push",
            Action::Access => "access",
            Action::Outbound(a) => match a {
                OutboundAction::Discovery => "ehr-discovery",
                OutboundAction::Token => "ehr-token",
                OutboundAction::Read => "ehr-read",
                OutboundAction::Search => "ehr-search",
                OutboundAction::ExportStart => "ehr-export-start",
                OutboundAction::ExportPoll => "ehr-export-poll",
                OutboundAction::ExportDownload => "ehr-export-download",
                OutboundAction::Push => "ehr-push",
            },
        }
    }
}

/// An event to record. The chain, sequence, time and hashes are assigned on append.
#[derive(Debug, Clone, Default)]
pub struct NewAuditEvent {
    pub practice_id: Option<ResourceId>,
    pub action: Option<Action>,
    pub status_code: u16,
    pub actor_client_id: Option<String>,
    pub actor_role: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub patient_id: Option<String>,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub purpose_of_use: Option<String>,
    /// The EHR connection of an outbound call.
    pub connection_id: Option<String>,
    /// How long an outbound call took.
    pub duration_ms: Option<i64>,
}

impl NewAuditEvent {
    /// The hash chain the event belongs to: its practice's, or the system chain.
    pub fn chain(&self) -> String {
        self.practice_id
            .as_ref()
            .map_or(SYSTEM_CHAIN.to_owned(), ToString::to_string)
    }
}

/// `success` for 1xx-3xx, `failure` otherwise (the status code says which failure; 0 is an
/// outbound call that got no response).
pub fn outcome_of(status: u16) -> &'static str {
    if (1..400).contains(&status) {
        "success"
    } else {
        "failure"
    }
}

/// The chain of events without a practice (e.g. a token request from an unknown client).
pub const SYSTEM_CHAIN: &str = "-";

/// An event as stored, with its place in its chain and its hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub id: String,
    pub chain: String,
    pub chain_seq: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    pub practice_id: Option<String>,
    pub action: String,
    pub outcome: String,
    pub status_code: i64,
    pub actor_client_id: Option<String>,
    pub actor_role: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub patient_id: Option<String>,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub purpose_of_use: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,
    #[serde(serialize_with = "hex")]
    pub prev_hash: Vec<u8>,
    #[serde(serialize_with = "hex")]
    pub hash: Vec<u8>,
}

fn hex<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::crypto::to_hex(bytes))
}

impl AuditRecord {
    /// Builds the next record of a chain whose head is (`prev_seq`, `prev_hash`).
    pub fn next(
        event: &NewAuditEvent,
        prev_seq: i64,
        prev_hash: &[u8],
        at: OffsetDateTime,
    ) -> Self {
        let mut record = AuditRecord {
            id: uuid::Uuid::new_v4().to_string(),
            chain: event.chain(),
            chain_seq: prev_seq + 1,
            recorded_at: at,
            practice_id: event.practice_id.as_ref().map(ToString::to_string),
            action: event.action.unwrap_or(Action::Access).as_str().to_owned(),
            outcome: outcome_of(event.status_code).to_owned(),
            status_code: i64::from(event.status_code),
            actor_client_id: event.actor_client_id.clone(),
            actor_role: event.actor_role.clone(),
            resource_type: event.resource_type.clone(),
            resource_id: event.resource_id.clone(),
            patient_id: event.patient_id.clone(),
            source_ip: event.source_ip.clone(),
            user_agent: event.user_agent.clone(),
            request_id: event.request_id.clone(),
            purpose_of_use: event.purpose_of_use.clone(),
            connection_id: event.connection_id.clone(),
            duration_ms: event.duration_ms,
            prev_hash: prev_hash.to_vec(),
            hash: Vec::new(),
        };
        record.hash = chain::hash_of(&record).to_vec();
        record
    }
}
