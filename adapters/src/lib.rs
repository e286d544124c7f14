//! EHR adapters for fhirgate: the `EhrAdapter` trait, the Epic, Cerner and generic SMART R4
//! implementations, the shared OAuth/HTTP client and the conformance kit every adapter passes.
//!
//! This crate is where integration engineers work; it never depends on the gateway's storage or
//! HTTP surface, and never logs PHI. (Its contents arrive with the adapters issue.)
