//! fhirgate: a HIPAA-audited FHIR R4 integration gateway.
//!
//! Layout follows the architecture: `http` (edge: errors, middleware), `fhir` (the FHIR REST
//! surface), `store` (one trait, SQLite and PostgreSQL), `ops` (health, readiness, metrics),
//! `domain` (parsed types), `cli`, `config`, `telemetry`, `startup`.

pub mod api;
pub mod audit;
pub mod claims;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod fhir;
#[doc(hidden)]
pub mod fuzzing;
pub mod gate;
pub mod http;
pub mod keys;
pub mod ops;
pub mod startup;
pub mod store;
pub mod sync;
pub mod telemetry;
