//! The gateway's outbound side: its EHR connections, the adapters built for them, and the audit
//! of every call they make; pulls, and the claim-status outbox ([`outbox`]) that pushes claim
//! statuses to the EHRs.
//! Never logs a credential, a resource or a URL with a query string.

pub mod connections;
pub mod jobs;
pub mod outbound_audit;
pub mod outbox;
pub mod pull;
pub(crate) mod retry;
pub mod scheduler;
pub mod webhooks;

pub use connections::{
    ConnectionError, ConnectionInfo, ConnectionSpec, Connections, OpenedConnection,
};
pub use jobs::{JobError, PullJobs, StartedBy, SyncSettings};
pub use outbound_audit::AuditedCalls;
pub use outbox::{ClaimOutbox, OutboxSettings};
pub use pull::{
    ingest, ingest_each, on_page, pull, Ingested, PullError, PullOptions, PullProgress, PullReport,
    PullTarget,
};
