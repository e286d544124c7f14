//! EHR adapters for fhirgate: the [`EhrAdapter`] trait, the Epic, Cerner, generic SMART R4 and
//! athenahealth implementations, the shared OAuth/HTTP client and the conformance kit every
//! adapter passes.
//!
//! This crate is where integration engineers work; it never depends on the gateway's storage or
//! HTTP surface, and never logs PHI. What is here so far: the trait every adapter implements,
//! the one error type callers decide retry or dead-letter by, the registry that builds an
//! adapter from a connection's `vendor`, the shared outbound client ([`client`]), the vendor
//! adapters ([`vendors`]) and, behind the `conformance` feature, the conformance kit run against
//! the EHR simulator (`conformance`; see `adapters/README.md`).

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
