//! The gateway's outbound side: its EHR connections, the adapters built for them, and the audit
//! of every call they make. Pulls, webhooks and the claim-status outbox (issue 6) build on this.
//! Never logs a credential, a resource or a URL with a query string.

pub mod connections;
pub mod outbound_audit;
pub mod pull;
pub mod webhooks;

pub use connections::{
    ConnectionError, ConnectionInfo, ConnectionSpec, Connections, OpenedConnection,
};
pub use outbound_audit::AuditedCalls;
pub use pull::{ingest, pull, PullError, PullOptions, PullReport, PullTarget};
