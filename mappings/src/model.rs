//! The internal practice model as the mappings produce it: what the practice's systems need of
//! each FHIR resource, in plain types. Every PHI field is marked; the gateway stores these only
//! sealed (see the gateway's `crypto` module).

use serde::{Deserialize, Serialize};

/// FHIR administrative gender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gender {
    Male,
    Female,
    Other,
    Unknown,
}

impl Gender {
    pub fn code(self) -> &'static str {
        match self {
            Gender::Male => "male",
            Gender::Female => "female",
            Gender::Other => "other",
            Gender::Unknown => "unknown",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "male" => Some(Gender::Male),
            "female" => Some(Gender::Female),
            "other" => Some(Gender::Other),
            "unknown" => Some(Gender::Unknown),
            _ => None,
        }
    }
}

/// A person's name (PHI).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonName {
    pub family: Option<String>,
    pub given: Vec<String>,
    pub prefix: Vec<String>,
    pub suffix: Vec<String>,
}

/// A postal address (PHI).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub line: Vec<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<String>,
}

/// An identifier as the source system wrote it (the value is PHI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identifier {
    pub system: Option<String>,
    pub value: String,
}

/// A coded value (US Core race and ethnicity categories, birth sex...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Code {
    pub system: Option<String>,
    pub code: String,
    pub display: Option<String>,
}

/// US Core race or ethnicity: the OMB categories, the detailed codes and the text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaceOrEthnicity {
    pub omb_categories: Vec<Code>,
    pub detailed: Vec<Code>,
    pub text: Option<String>,
}

/// A patient of the practice (all PHI).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patient {
    /// The source system's resource id.
    pub source_id: Option<String>,
    /// The medical record number at the source, chosen by the vendor profile.
    pub mrn: Option<String>,
    /// Every identifier, the MRN included.
    pub identifiers: Vec<Identifier>,
    /// The official name (else the first usable one).
    pub name: Option<PersonName>,
    /// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`, as the source gave it.
    pub birth_date: Option<String>,
    pub gender: Option<Gender>,
    /// The home address (else the first current one).
    pub address: Option<Address>,
    pub phone: Option<String>,
    pub email: Option<String>,
    pub race: Option<RaceOrEthnicity>,
    pub ethnicity: Option<RaceOrEthnicity>,
    /// US Core birth sex: `F`, `M` or `UNK`.
    pub birth_sex: Option<String>,
}

/// A coverage of a patient by a payer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    pub source_id: Option<String>,
    /// The id of the beneficiary (a Patient of the same source).
    pub patient_id: String,
    /// The id of the paying Organization, if the payor is one.
    pub payer_id: Option<String>,
    /// The member id (PHI): an identifier of a profile's member-id system, else
    /// `subscriberId`.
    pub member_id: Option<String>,
    /// The plan's name or value (`class` of type `plan`).
    pub plan: Option<String>,
    /// `active`, `cancelled`, `draft` or `entered-in-error`.
    pub status: String,
    pub period_start: Option<String>,
    pub period_end: Option<String>,
}
