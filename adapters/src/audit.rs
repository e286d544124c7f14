//! The audit hook every outbound call goes through. The adapters crate does not know the
//! gateway's audit trail: the gateway hands each adapter an [`OutboundAudit`] in its
//! [`crate::AdapterContext`], and the shared client calls it once per HTTP exchange (token
//! requests included). What is recorded names the connection, the action, the resource type, the
//! status and the duration: never an id, a query string or a body, since those may be PHI.

use std::time::Duration;

/// What kind of call went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutboundAction {
    /// `.well-known/smart-configuration`.
    Discovery,
    /// A token request.
    Token,
    Read,
    Search,
    /// Bulk Data kick-off.
    ExportStart,
    ExportPoll,
    /// One Bulk Data output file.
    ExportDownload,
    /// A claim-status update.
    Push,
}

impl OutboundAction {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundAction::Discovery => "discovery",
            OutboundAction::Token => "token",
            OutboundAction::Read => "read",
            OutboundAction::Search => "search",
            OutboundAction::ExportStart => "export-start",
            OutboundAction::ExportPoll => "export-poll",
            OutboundAction::ExportDownload => "export-download",
            OutboundAction::Push => "push",
        }
    }
}

/// One outbound HTTP exchange, as audited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundCall<'a> {
    pub connection: &'a str,
    pub action: OutboundAction,
    /// The FHIR resource type the call was about, when there is one.
    pub resource_type: Option<&'a str>,
    /// The EHR's HTTP status; `None` when no response came (timeout, connection refused, the
    /// circuit breaker open).
    pub status: Option<u16>,
    pub duration: Duration,
}

/// Where outbound calls are recorded. `record` returns once the record is durable; an error
/// means it is not, and the caller fails the call rather than go unaudited.
#[async_trait::async_trait]
pub trait OutboundAudit: Send + Sync {
    async fn record(&self, call: &OutboundCall<'_>) -> Result<(), AuditUnavailable>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the audit trail is unavailable")]
pub struct AuditUnavailable;

/// Records nothing: for unit tests of an adapter and for tools that are not the gateway.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAudit;

#[async_trait::async_trait]
impl OutboundAudit for NoAudit {
    async fn record(&self, _: &OutboundCall<'_>) -> Result<(), AuditUnavailable> {
        Ok(())
    }
}
