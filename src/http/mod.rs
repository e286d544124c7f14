//! The HTTP surface: the one error mapping, the FHIR response writer, and the middleware that
//! every request passes (request id, tracing span, metrics). Never writes PHI or query strings
//! to logs or metric labels.

pub mod client_ip;
pub mod error;
pub mod observe;
pub mod respond;

pub use error::ApiError;
pub use respond::{fhir_json, FHIR_JSON};
