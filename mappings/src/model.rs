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

/// A therapist of the practice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Practitioner {
    pub source_id: Option<String>,
    pub npi: Option<String>,
    pub name: Option<PersonName>,
    pub active: bool,
}

/// The practice itself, or a payer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organization {
    pub source_id: Option<String>,
    pub name: Option<String>,
    pub npi: Option<String>,
    pub tax_id: Option<String>,
    /// Typed `pay` (organization-type): an insurer.
    pub is_payer: bool,
    pub active: bool,
}

/// A therapy session (FHIR Encounter).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub source_id: Option<String>,
    pub patient_id: String,
    /// The first participating Practitioner.
    pub practitioner_id: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    /// FHIR encounter status (`finished`, `in-progress`...).
    pub status: String,
    /// The CPT code of the service (`Encounter.type`).
    pub cpt_code: Option<String>,
    /// The ICD-10-CM reason (`Encounter.reasonCode`).
    pub icd10_code: Option<String>,
}

/// One billed line of a claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimLine {
    pub cpt_code: Option<String>,
    pub service_date: Option<String>,
    /// The line's net amount in cents.
    pub net_cents: Option<i64>,
}

/// A claim for a session's services.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub source_id: Option<String>,
    pub patient_id: String,
    /// A Practitioner or Organization id, as `Type/id`.
    pub provider: Option<String>,
    /// The focal Coverage.
    pub coverage_id: Option<String>,
    pub status: String,
    pub created: Option<String>,
    pub icd10_codes: Vec<String>,
    pub lines: Vec<ClaimLine>,
    pub total_cents: Option<i64>,
}

/// A payer's answer to a claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub source_id: Option<String>,
    pub claim_id: Option<String>,
    pub patient_id: String,
    /// When the payer made the answer (FHIR dateTime).
    pub created: Option<String>,
    /// The id of the paying Organization (`ClaimResponse.insurer`).
    pub insurer_id: Option<String>,
    pub status: String,
    /// `queued`, `complete`, `error` or `partial`.
    pub outcome: String,
    pub disposition: Option<String>,
    pub payment_cents: Option<i64>,
}
