//! A practice is the tenant: every other row belongs to exactly one.

use serde::Serialize;

use super::{InvalidValue, ResourceId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PracticeName(String);

impl PracticeName {
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidValue> {
        let value = value.into().trim().to_owned();
        if value.is_empty() || value.chars().count() > 200 || value.chars().any(char::is_control) {
            return Err(InvalidValue::new(
                "name",
                "must be 1-200 characters without control characters",
            ));
        }
        Ok(Self(value))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An IANA time zone name such as `America/New_York`, checked against the tz database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct TimeZoneName(String);

impl TimeZoneName {
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidValue> {
        let value = value.into();
        match value.parse::<chrono_tz::Tz>() {
            Ok(tz) => Ok(Self(tz.name().to_owned())),
            Err(_) => Err(InvalidValue::new(
                "timezone",
                "must be an IANA time zone name such as America/New_York",
            )),
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TimeZoneName {
    fn default() -> Self {
        Self("UTC".into())
    }
}

/// A National Provider Identifier: 10 digits whose last is a Luhn check digit computed over the
/// digits prefixed with 80840 (CMS, "Requirements for NPI check digit", 45 CFR 162.406).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Npi(String);

impl Npi {
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidValue> {
        let value = value.into();
        if value.len() != 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidValue::new("npi", "must be exactly 10 digits"));
        }
        // Luhn over "80840" + the 10 digits: the prefix contributes a constant 24.
        let mut sum = 24u32;
        for (i, b) in value.bytes().rev().enumerate() {
            let mut d = u32::from(b - b'0');
            if i % 2 == 1 {
                d *= 2;
                if d > 9 {
                    d -= 9;
                }
            }
            sum += d;
        }
        if sum % 10 != 0 {
            return Err(InvalidValue::new(
                "npi",
                "check digit does not match (Luhn)",
            ));
        }
        Ok(Self(value))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A US employer identification number, `NN-NNNNNNN` or nine digits; stored as nine digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct TaxId(String);

impl TaxId {
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidValue> {
        let digits: String = value.into().chars().filter(|c| *c != '-').collect();
        if digits.len() != 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidValue::new(
                "tax_id",
                "must be nine digits (EIN, NN-NNNNNNN)",
            ));
        }
        Ok(Self(digits))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone)]
pub struct NewPractice {
    pub name: PracticeName,
    pub timezone: TimeZoneName,
    pub npi: Option<Npi>,
    pub tax_id: Option<TaxId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Practice {
    pub id: ResourceId,
    pub name: String,
    pub timezone: String,
    pub npi: Option<String>,
    pub tax_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cms_example_npi_passes_the_luhn_check() {
        // The worked example in the CMS NPI check-digit document.
        assert!(Npi::parse("1234567893").is_ok());
    }

    #[test]
    fn an_npi_with_a_wrong_check_digit_is_rejected() {
        assert!(Npi::parse("1234567890").is_err());
    }

    #[test]
    fn an_npi_that_is_not_ten_digits_is_rejected() {
        assert!(Npi::parse("123456789").is_err());
        assert!(Npi::parse("12345678a3").is_err());
    }

    #[test]
    fn an_unknown_time_zone_is_rejected() {
        assert!(TimeZoneName::parse("Mars/Olympus_Mons").is_err());
        assert_eq!(
            TimeZoneName::parse("Europe/Paris").unwrap().as_str(),
            "Europe/Paris"
        );
    }

    #[test]
    fn an_empty_practice_name_is_rejected() {
        assert!(PracticeName::parse("   ").is_err());
        assert!(PracticeName::parse("x".repeat(201)).is_err());
    }

    #[test]
    fn a_tax_id_is_normalised_to_nine_digits() {
        assert_eq!(TaxId::parse("12-3456789").unwrap().as_str(), "123456789");
        assert!(TaxId::parse("12-345").is_err());
    }
}
