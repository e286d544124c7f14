//! FHIR R4 <-> internal practice model mappings, as pure functions, and the per-vendor mapping
//! profiles in `mappings/profiles/` (identifier systems, extension URLs, code translations).
//!
//! Vendor differences are data, not code: each mapping takes the vendor's [`Profile`]. The
//! mappings read fhir-sdk's typed R4B models (wire-compatible with R4 for these resources) and
//! write the internal model of [`model`]; `to_fhir` functions go the other way. Nothing here
//! logs or formats a value into an error: a [`MappingError`] names the element, never its
//! content (it may be PHI).

pub mod care;
pub mod coverage;
pub mod model;
pub mod patient;
pub mod profile;
pub mod read;

pub use profile::{CodeElement, Profile, ProfileError, Profiles};
pub use read::{read, translate_codes};

/// Why a FHIR resource does not map. Names the element only: values may be PHI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("{element}: required by the internal model but missing")]
    Missing { element: &'static str },
    #[error("{element}: {rule}")]
    Invalid {
        element: &'static str,
        rule: &'static str,
    },
}
