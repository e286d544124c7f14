//! FHIR logical ids (`[A-Za-z0-9\-\.]{1,64}`, FHIR R4 datatypes.html#id), used for every row id.

use std::fmt;

use super::InvalidValue;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct ResourceId(String);

impl ResourceId {
    pub fn parse(field: &'static str, value: impl Into<String>) -> Result<Self, InvalidValue> {
        let value = value.into();
        let ok = (1..=64).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if ok {
            Ok(Self(value))
        } else {
            Err(InvalidValue::new(
                field,
                "must be 1-64 characters of A-Z, a-z, 0-9, '-' or '.'",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For values read back from our own database, which only ever stores parsed ids.
    pub(crate) fn from_trusted(value: String) -> Self {
        Self(value)
    }
}

/// A new server-assigned id (a random UUID, so ids leak neither counts nor order).
pub fn new_resource_id() -> ResourceId {
    ResourceId(uuid::Uuid::new_v4().to_string())
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_id_is_a_valid_fhir_id() {
        let id = new_resource_id();
        assert!(ResourceId::parse("id", id.as_str()).is_ok());
    }

    #[test]
    fn an_id_longer_than_64_characters_is_rejected() {
        assert!(ResourceId::parse("id", "a".repeat(65)).is_err());
        assert!(ResourceId::parse("id", "a".repeat(64)).is_ok());
    }

    #[test]
    fn an_id_with_a_slash_or_space_is_rejected() {
        assert!(ResourceId::parse("id", "a/b").is_err());
        assert!(ResourceId::parse("id", "a b").is_err());
        assert!(ResourceId::parse("id", "").is_err());
    }
}
