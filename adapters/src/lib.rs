//! EHR adapters for fhirgate: the [`EhrAdapter`] trait, the Epic, Cerner and generic SMART R4
//! implementations, the shared OAuth/HTTP client and the conformance kit every adapter passes.
//!
//! This crate is where integration engineers work; it never depends on the gateway's storage or
//! HTTP surface, and never logs PHI. What is here so far: the trait every adapter implements,
//! the one error type callers decide retry or dead-letter by, the registry that builds an
//! adapter from a connection's `vendor`, the shared outbound client ([`client`]) and the Epic,
//! Cerner and generic SMART R4 adapters ([`vendors`]). The simulators and the conformance kit
//! follow (issue 5).

pub mod adapter;
pub mod audit;
pub mod client;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod error;
pub mod registry;
pub mod vendors;

pub use adapter::{
    BulkExport, ClaimStatusUpdate, EhrAdapter, ExportFile, ExportRequest, ExportStatus, Page,
    PageStream, PushReceipt,
};
pub use audit::{AuditUnavailable, NoAudit, OutboundAction, OutboundAudit, OutboundCall};
pub use error::AdapterError;
pub use registry::{
    AdapterContext, AdapterFactory, Connection, Credential, Registry, RegistryError,
};
