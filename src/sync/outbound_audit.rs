//! Outbound EHR calls into the audit trail: the adapters' [`OutboundAudit`] hook, written to the
//! connection's practice's hash chain through the same [`AuditLog`] as inbound requests, and
//! durable before the adapter goes on (an unaudited call fails).

use fhirgate_adapters::{AuditUnavailable, OutboundAudit, OutboundCall};

use crate::audit::{Action, AuditLog, NewAuditEvent};
use crate::domain::ResourceId;

/// The audit hook of one practice's connections.
#[derive(Clone)]
pub struct AuditedCalls {
    log: AuditLog,
    practice: ResourceId,
}

impl AuditedCalls {
    pub fn new(log: AuditLog, practice: ResourceId) -> Self {
        Self { log, practice }
    }
}

#[async_trait::async_trait]
impl OutboundAudit for AuditedCalls {
    async fn record(&self, call: &OutboundCall<'_>) -> Result<(), AuditUnavailable> {
        let event = NewAuditEvent {
            practice_id: Some(self.practice.clone()),
            action: Some(Action::Outbound(call.action)),
            status_code: call.status.unwrap_or(0),
            resource_type: call.resource_type.map(str::to_owned),
            connection_id: Some(call.connection.to_owned()),
            duration_ms: Some(i64::try_from(call.duration.as_millis()).unwrap_or(i64::MAX)),
            ..NewAuditEvent::default()
        };
        self.log.record(event).await.map_err(|_| AuditUnavailable)
    }
}
