//! FHIR R4 <-> internal practice model mappings, as pure functions, and the per-vendor mapping
//! profiles in `mappings/profiles/` (identifier systems, extension URLs, code translations).
//!
//! Vendor differences are data, not code: each mapping takes the vendor's [`Profile`] (how to
//! write one: `mappings/README.md`, "Writing a profile"). Every type maps both ways:
//!
//! | FHIR R4 | internal model | into the model | back to FHIR |
//! | --- | --- | --- | --- |
//! | Patient | [`model::Patient`] | [`patient::from_fhir`] | [`patient::to_fhir`] |
//! | Coverage | [`model::Coverage`] | [`coverage::from_fhir`] | [`coverage::to_fhir`] |
//! | Practitioner | [`model::Practitioner`] | [`care::practitioner_from_fhir`] | [`care::practitioner_to_fhir`] |
//! | Organization | [`model::Organization`] | [`care::organization_from_fhir`] | [`care::organization_to_fhir`] |
//! | Encounter | [`model::Session`] | [`care::session_from_fhir`] | [`care::session_to_fhir`] |
//! | Claim | [`model::Claim`] | [`care::claim_from_fhir`] | [`care::claim_to_fhir`] |
//! | ClaimResponse | [`model::ClaimResponse`] | [`care::claim_response_from_fhir`] | [`care::claim_response_to_fhir`] |
//!
//! An EHR's JSON goes through [`read()`] first: it applies the profile's code translations (a
//! vendor's `"gender": "M"` does not even parse as fhir-sdk's typed R4B model, wire-compatible
//! with R4 for these resources) and makes decimals readable, then the `from_fhir` functions
//! take the typed resource. `to_fhir` writes JSON valid against the official R4 JSON schema.
//!
//! Everything is pure: no I/O but loading profiles ([`Profiles::load`]). Nothing here logs or
//! formats a value into an error: a [`MappingError`] names the element, never its content (it
//! may be PHI).

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
