//! Domain types whose constructor is the only way in: once a value has its type, nobody re-checks it.
//! Error messages name the rule that failed, never the rejected value (it may be PHI).

mod claim_status;
mod ids;
mod practice;

pub use claim_status::ClaimStatus;
pub use ids::{new_resource_id, ResourceId};
pub use practice::{NewPractice, Npi, Practice, PracticeName, TaxId, TimeZoneName};

/// A value that failed its type's rule; `field` is the input's name, `rule` says what it must be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct InvalidValue {
    pub field: &'static str,
    pub rule: &'static str,
}

impl InvalidValue {
    pub fn new(field: &'static str, rule: &'static str) -> Self {
        Self { field, rule }
    }
}
