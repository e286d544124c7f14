//! FHIR R4 <-> internal practice model mappings, as pure functions, and the per-vendor mapping
//! profiles in `mappings/profiles/` (identifier systems, extension URLs, code translations).
//!
//! Vendor differences are data, not code. (Its contents arrive with the adapters issue.)
