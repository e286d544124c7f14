//! Claim validation for `POST /api/v1/claims/prepare`: a request and its context in, a normalised
//! [`CheckedClaim`] or *every* problem out. Pure: no HTTP, no database, no clock (today's date is
//! in the [`ClaimContext`]), no logging. Problem messages name the field and the rule and never
//! repeat a value from the request (it may be PHI); payer ids and codes named by payer rules may
//! appear, as they come from config.
//!
//! Data, loaded once at start by [`ClaimRules::load`] from the rules directory (`config/`):
//! - `codes/cpt.csv`: the CPT codes we accept, with families and our own short descriptions;
//! - `codes/icd10cm.txt`: the billable ICD-10-CM codes;
//! - `payers/*.yaml`: one file per payer (schema in `config/payers/README.md`); adding a payer
//!   needs no code.
//!
//! The checks run in two steps: a first pass ([`request`]) turns each JSON field into a typed value
//! or records why it cannot be one (type, format, required), then the validator chain
//! ([`validators`], one type per concern: fee, CPT, ICD-10, dates, NPIs, member id, payer rules)
//! checks what parsed. A field that failed the first pass skips the validators that need it.
//!
//! YAML: `yaml_serde`, the YAML organisation's maintained fork of `serde_yaml`. It adds two crates
//! to the tree (itself and `libyaml-rs`, a pure-Rust libyaml); its `deny_unknown_fields` errors
//! carry the key path (`rules[0].when: unknown field ...`). `serde-saphyr` 2.x was the other
//! candidate but needs Rust 1.89, above this workspace's `rust-version` of 1.85.

mod codes;
mod error;
mod money;
mod payers;
mod problem;
mod request;
mod validators;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use codes::{CptCode, CptEntry, CptTable, Icd10Code, Icd10List};
pub use error::LoadError;
pub use money::{Currency, Money, MAX_MINOR_UNITS};
pub use payers::{is_mbi, MemberIdFormat, MemberIdRule, Payer, PayerRule, Requirement, When};
pub use problem::{Problem, ProblemKind};
pub use request::{PrepareRequest, MAX_ICD10_CODES};

use crate::domain::{Npi, ResourceId};
use request::{Draft, Input};
use validators::EffectiveMemberId;

/// Where the claim rules live; for the gateway's settings (`[claims] rules_dir = "config"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaimsSettings {
    /// Holds `codes/cpt.csv`, `codes/icd10cm.txt` and `payers/*.yaml`.
    pub rules_dir: PathBuf,
}

impl Default for ClaimsSettings {
    fn default() -> Self {
        Self {
            rules_dir: PathBuf::from("config"),
        }
    }
}

/// What the route knows that the request does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimContext {
    /// Today in the practice's time zone.
    pub today: time::Date,
    /// The rendering practitioner's NPI from the Practitioner resource; `None` when it has none.
    pub practitioner_npi: Option<String>,
    /// The member id on the patient's Coverage for this payer, used when the request has none.
    pub member_id: Option<String>,
}

/// A claim that passed every check, with normalised values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedClaim {
    pub patient: ResourceId,
    pub practitioner: ResourceId,
    pub practitioner_npi: Npi,
    pub date_of_service: time::Date,
    pub cpt_code: CptCode,
    /// The CPT code's family from `cpt.csv` (e.g. `psychotherapy`).
    pub cpt_family: String,
    /// Upper case with the dot, primary first.
    pub icd10_codes: Vec<Icd10Code>,
    pub units: u8,
    /// Two digits, `11` by default.
    pub place_of_service: String,
    pub fee: Money,
    /// Zero when none was sent; same currency as the fee.
    pub copay: Money,
    pub payer_id: String,
    pub payer_name: String,
    /// The request's, else the Coverage's; `None` only for a payer that does not require one.
    pub member_id: Option<String>,
    pub prior_authorization: Option<String>,
    pub referring_provider_npi: Option<Npi>,
}

/// The code tables, the payers and the validator chain, loaded once at start and shared.
pub struct ClaimRules {
    cpt: CptTable,
    icd10: Icd10List,
    payers: BTreeMap<String, Payer>,
    chain: validators::Chain,
}

impl fmt::Debug for ClaimRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimRules")
            .field("cpt_codes", &self.cpt.len())
            .field("icd10_codes", &self.icd10.len())
            .field("payers", &self.payers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ClaimRules {
    /// Reads `{dir}/codes/cpt.csv`, `{dir}/codes/icd10cm.txt` and `{dir}/payers/*.yaml`, checking
    /// everything; the error names the file and the key or line at fault.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let cpt = CptTable::load(&dir.join("codes").join("cpt.csv"))?;
        let icd10 = Icd10List::load(&dir.join("codes").join("icd10cm.txt"))?;
        let payers = payers::load_payers(&dir.join("payers"), &cpt)?;
        Ok(Self {
            cpt,
            icd10,
            payers,
            chain: validators::chain(),
        })
    }

    pub fn from_settings(settings: &ClaimsSettings) -> Result<Self, LoadError> {
        Self::load(&settings.rules_dir)
    }

    /// A payer by its id, in any case (`BCBS`, `bcbs`).
    pub fn payer(&self, id: &str) -> Option<&Payer> {
        self.payers.get(&id.trim().to_ascii_uppercase())
    }
    /// The payer a request names, if it names a configured one: for the route to pick the
    /// patient's Coverage before [`check`](Self::check).
    pub fn payer_of(&self, request: &PrepareRequest) -> Option<&Payer> {
        self.payer(request.payer_id.as_ref()?.as_str()?)
    }
    pub fn payers(&self) -> impl Iterator<Item = &Payer> {
        self.payers.values()
    }
    pub fn cpt(&self) -> &CptTable {
        &self.cpt
    }
    pub fn icd10(&self) -> &Icd10List {
        &self.icd10
    }

    /// Runs the first pass and the whole validator chain; never stops at the first problem.
    /// Problems come in request-field order (first pass), then chain order.
    pub fn check(
        &self,
        request: &PrepareRequest,
        ctx: &ClaimContext,
    ) -> Result<CheckedClaim, Vec<Problem>> {
        let mut problems = Vec::new();
        let draft = request::first_pass(request, self, &mut problems);
        for validator in &self.chain {
            validator.check(&draft, self, ctx, &mut problems);
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        self.assemble(&draft, ctx).ok_or_else(|| {
            // Every path to an unusable field records a problem; reaching this is a bug.
            vec![Problem::new(
                "(request)",
                ProblemKind::Invalid,
                "claim.incomplete",
                "could not be assembled although no rule failed",
            )]
        })
    }

    fn assemble(&self, draft: &Draft<'_>, ctx: &ClaimContext) -> Option<CheckedClaim> {
        let currency = *draft.currency.valid()?;
        let payer = *draft.payer.valid()?;
        let cpt_code = draft.cpt.valid()?.clone();
        let cpt_family = self.cpt.get(cpt_code.as_str())?.family.clone();
        let money = |amount: &Input<money::Decimal>| {
            let minor_units = amount.valid()?.to_minor_units(currency).ok()?;
            Some(Money {
                minor_units,
                currency,
            })
        };
        if !draft.icd10_complete || draft.icd10.is_empty() {
            return None;
        }
        let member_id = match validators::effective_member_id(draft, ctx) {
            EffectiveMemberId::FromRequest(id) | EffectiveMemberId::FromCoverage(id) => {
                let id = match payer.member_id().format {
                    Some(MemberIdFormat::Mbi) => id.to_ascii_uppercase(),
                    None => id.to_owned(),
                };
                Some(id)
            }
            EffectiveMemberId::Missing => None,
            EffectiveMemberId::Unusable => return None,
        };
        let referring_provider_npi = match &draft.referring_provider_npi {
            Input::Absent => None,
            Input::Invalid => return None,
            Input::Valid(npi) => Some(Npi::parse(npi.as_str()).ok()?),
        };
        let prior_authorization = match &draft.prior_authorization {
            Input::Absent => None,
            Input::Invalid => return None,
            Input::Valid(pa) => Some(pa.clone()),
        };
        Some(CheckedClaim {
            patient: draft.patient.valid()?.clone(),
            practitioner: draft.practitioner.valid()?.clone(),
            practitioner_npi: Npi::parse(ctx.practitioner_npi.as_deref()?.trim()).ok()?,
            date_of_service: *draft.date_of_service.valid()?,
            cpt_code,
            cpt_family,
            icd10_codes: draft.icd10.iter().map(|e| e.code.clone()).collect(),
            units: *draft.units.valid()?,
            place_of_service: draft.place_of_service.valid()?.clone(),
            fee: money(&draft.fee)?,
            copay: money(&draft.copay)?,
            payer_id: payer.id().to_owned(),
            payer_name: payer.name().to_owned(),
            member_id,
            prior_authorization,
            referring_provider_npi,
        })
    }
}
