//! The validator chain: one type per concern, each looking at the parsed [`Draft`] and adding
//! problems, never stopping the others. A field that did not parse is `Input::Invalid` (its problem
//! is already recorded) and every validator that needs it skips it.
//!
//! To add a validator: write a unit struct here implementing [`Validator`], give its problems
//! `rule` ids of the form `{field}.{rule}` (or `payer.{PAYER}.{rule}` for payer data), write
//! messages that name the field and the rule but never the client's value, add it to [`chain`],
//! and test it pass and fail in `tests.rs`.

use crate::domain::Npi;

use super::money::{Decimal, MinorUnitsError};
use super::payers::{Payer, Requirement, When};
use super::problem::{Problem, ProblemKind};
use super::request::{Draft, Input};
use super::{ClaimContext, ClaimRules};

pub(crate) trait Validator {
    fn check(
        &self,
        draft: &Draft<'_>,
        rules: &ClaimRules,
        ctx: &ClaimContext,
        out: &mut Vec<Problem>,
    );
}

pub(crate) type Chain = Vec<Box<dyn Validator + Send + Sync>>;

/// The chain in the order its problems are reported.
pub(crate) fn chain() -> Chain {
    vec![
        Box::new(Fee),
        Box::new(CptKnown),
        Box::new(Icd10Known),
        Box::new(ServiceDate),
        Box::new(ProviderNpis),
        Box::new(MemberId),
        Box::new(PayerRules),
    ]
}

/// A problem of an amount field (`{field}.{rule}`).
fn invalid_amount(field: &str, rule: &str, message: impl AsRef<str>) -> Problem {
    Problem::new(
        field,
        ProblemKind::Invalid,
        format!("{field}.{rule}"),
        message,
    )
}

/// Fee positive, copay not negative and not above the fee, both within the currency's decimals
/// and below [`MAX_MINOR_UNITS`](super::money::MAX_MINOR_UNITS).
struct Fee;

impl Validator for Fee {
    fn check(&self, draft: &Draft<'_>, _: &ClaimRules, _: &ClaimContext, out: &mut Vec<Problem>) {
        let currency = draft.currency.valid().copied();
        // The sign needs no currency; the decimals and the size do.
        let mut minor = |field: &str, amount: &Input<Decimal>, positive: bool| {
            let amount = amount.valid()?;
            if positive && !amount.is_positive() {
                out.push(invalid_amount(
                    field,
                    "positive",
                    "must be greater than zero",
                ));
                return None;
            }
            if amount.is_negative() {
                out.push(invalid_amount(
                    field,
                    "not-negative",
                    "must not be negative",
                ));
                return None;
            }
            let currency = currency?;
            match amount.to_minor_units(currency) {
                Ok(units) => Some(units),
                Err(MinorUnitsError::TooPrecise) => {
                    out.push(invalid_amount(
                        field,
                        "precision",
                        format!(
                            "has more decimal places than {currency} allows ({})",
                            currency.minor_units()
                        ),
                    ));
                    None
                }
                Err(MinorUnitsError::TooLarge) => {
                    out.push(invalid_amount(
                        field,
                        "magnitude",
                        "is too large for a claim amount",
                    ));
                    None
                }
            }
        };
        let fee = minor("fee", &draft.fee, true);
        let copay = minor("copay", &draft.copay, false);
        if let (Some(fee), Some(copay)) = (fee, copay) {
            if copay > fee {
                out.push(Problem::new(
                    "copay",
                    ProblemKind::BusinessRule,
                    "copay.not-above-fee",
                    "must not be more than the fee",
                ));
            }
        }
    }
}

/// The CPT code is in `config/codes/cpt.csv`.
struct CptKnown;

impl Validator for CptKnown {
    fn check(
        &self,
        draft: &Draft<'_>,
        rules: &ClaimRules,
        _: &ClaimContext,
        out: &mut Vec<Problem>,
    ) {
        if let Some(code) = draft.cpt.valid() {
            if rules.cpt().get(code.as_str()).is_none() {
                out.push(Problem::new(
                    "cpt_code",
                    ProblemKind::UnknownCode,
                    "cpt.known",
                    "is not a CPT code of the gateway's code table",
                ));
            }
        }
    }
}

/// Each ICD-10-CM code is a billable code of the shipped list, and none repeats.
struct Icd10Known;

impl Validator for Icd10Known {
    fn check(
        &self,
        draft: &Draft<'_>,
        rules: &ClaimRules,
        _: &ClaimContext,
        out: &mut Vec<Problem>,
    ) {
        for (i, entry) in draft.icd10.iter().enumerate() {
            if draft.icd10[..i]
                .iter()
                .any(|earlier| earlier.code == entry.code)
            {
                out.push(Problem::new(
                    &entry.field,
                    ProblemKind::Invalid,
                    "icd10.duplicate",
                    "repeats an earlier code",
                ));
            } else if !rules.icd10().contains(&entry.code) {
                out.push(Problem::new(
                    &entry.field,
                    ProblemKind::UnknownCode,
                    "icd10.known",
                    "is not a billable ICD-10-CM code (a category may need more characters)",
                ));
            }
        }
    }
}

/// Not after today (the practice's date) and within the payer's timely-filing window: a claim may
/// be filed up to and including `date_of_service + timely_filing_days`.
struct ServiceDate;

impl Validator for ServiceDate {
    fn check(&self, draft: &Draft<'_>, _: &ClaimRules, ctx: &ClaimContext, out: &mut Vec<Problem>) {
        let Some(&date) = draft.date_of_service.valid() else {
            return;
        };
        if date > ctx.today {
            out.push(Problem::new(
                "session_date",
                ProblemKind::Invalid,
                "session_date.not-future",
                "is after today in the practice's time zone",
            ));
            return;
        }
        if let Some(payer) = draft.payer.valid() {
            let days = i64::from(payer.timely_filing_days());
            if (ctx.today - date).whole_days() > days {
                out.push(Problem::new(
                    "session_date",
                    ProblemKind::BusinessRule,
                    "session_date.timely-filing",
                    format!(
                        "is more than {days} days ago, past payer {}'s timely-filing window",
                        payer.id()
                    ),
                ));
            }
        }
    }
}

/// The rendering practitioner's NPI (from the Practitioner resource) exists and passes the NPI
/// check digit; a referring provider's NPI, when sent, passes it too.
struct ProviderNpis;

impl Validator for ProviderNpis {
    fn check(&self, draft: &Draft<'_>, _: &ClaimRules, ctx: &ClaimContext, out: &mut Vec<Problem>) {
        // Without a usable practitioner id the route could not look the practitioner up.
        if draft.practitioner.valid().is_some() {
            match ctx.practitioner_npi.as_deref() {
                None => out.push(Problem::new(
                    "therapist_id",
                    ProblemKind::Required,
                    "therapist_id.npi-required",
                    "the practitioner has no NPI on record; a claim needs the rendering provider's NPI",
                )),
                Some(npi) if Npi::parse(npi.trim()).is_err() => out.push(Problem::new(
                    "therapist_id",
                    ProblemKind::Invalid,
                    "therapist_id.npi",
                    "the practitioner's NPI on record is not 10 digits with a valid check digit",
                )),
                Some(_) => {}
            }
        }
        if let Some(npi) = draft.referring_provider_npi.valid() {
            if Npi::parse(npi.as_str()).is_err() {
                out.push(Problem::new(
                    "referring_provider_npi",
                    ProblemKind::Invalid,
                    "referring_provider_npi.npi",
                    "must be an NPI: 10 digits with a valid check digit",
                ));
            }
        }
    }
}

/// Where the member id comes from.
pub(crate) enum EffectiveMemberId<'a> {
    /// Neither the request nor the patient's Coverage has one.
    Missing,
    /// The request's was unusable (problem already recorded).
    Unusable,
    FromRequest(&'a str),
    FromCoverage(&'a str),
}

pub(crate) fn effective_member_id<'a>(
    draft: &'a Draft<'_>,
    ctx: &'a ClaimContext,
) -> EffectiveMemberId<'a> {
    match &draft.member_id {
        Input::Valid(id) => EffectiveMemberId::FromRequest(id),
        Input::Invalid => EffectiveMemberId::Unusable,
        Input::Absent => match ctx.member_id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => EffectiveMemberId::FromCoverage(id),
            _ => EffectiveMemberId::Missing,
        },
    }
}

/// The payer has the member id it needs (the request's, else the Coverage's), in its format.
struct MemberId;

impl Validator for MemberId {
    fn check(&self, draft: &Draft<'_>, _: &ClaimRules, ctx: &ClaimContext, out: &mut Vec<Problem>) {
        let payer = draft.payer.valid();
        let (id, source) = match effective_member_id(draft, ctx) {
            EffectiveMemberId::Unusable => return,
            EffectiveMemberId::Missing => {
                if let Some(payer) = payer.filter(|p| p.member_id().required) {
                    out.push(missing_member_id(
                        payer,
                        format!("payer.{}.member-id", payer.id()),
                    ));
                }
                return;
            }
            EffectiveMemberId::FromRequest(id) => (id, ""),
            EffectiveMemberId::FromCoverage(id) => (id, " (the value on the patient's Coverage)"),
        };
        let plain = (1..=64).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !plain {
            out.push(Problem::new(
                "member_id",
                ProblemKind::Invalid,
                "member_id.format",
                format!("must be 1-64 letters, digits or '-'{source}"),
            ));
            return;
        }
        if let Some(payer) = payer {
            if let Some(format) = payer.member_id().format {
                if !format.matches(id) {
                    out.push(Problem::new(
                        "member_id",
                        ProblemKind::Invalid,
                        format!("payer.{}.member-id-format", payer.id()),
                        format!(
                            "payer {} needs a Medicare Beneficiary Identifier (11 characters, no dashes){source}",
                            payer.id()
                        ),
                    ));
                }
            }
        }
    }
}

fn missing_member_id(payer: &Payer, rule: String) -> Problem {
    Problem::new(
        "member_id",
        ProblemKind::Required,
        rule,
        format!(
            "payer {} needs the patient's member id (none in the request or the patient's Coverage)",
            payer.id()
        ),
    )
}

/// The payer's `rules:` from its YAML file.
struct PayerRules;

impl Validator for PayerRules {
    fn check(
        &self,
        draft: &Draft<'_>,
        rules: &ClaimRules,
        ctx: &ClaimContext,
        out: &mut Vec<Problem>,
    ) {
        let Some(payer) = draft.payer.valid() else {
            return;
        };
        for rule in payer.rules() {
            // A rule whose condition cannot be decided (its field did not parse) is skipped.
            if applies(&rule.when, draft, rules) != Some(true) {
                continue;
            }
            let id = format!("payer.{}.{}", payer.id(), rule.id);
            let (field, broken, default) = match &rule.require {
                Requirement::PriorAuthorization => (
                    "prior_authorization",
                    draft.prior_authorization.is_absent(),
                    format!(
                        "payer {} requires a prior authorisation number{}",
                        payer.id(),
                        for_codes(&rule.when)
                    ),
                ),
                Requirement::ReferringProvider => (
                    "referring_provider_npi",
                    draft.referring_provider_npi.is_absent(),
                    format!(
                        "payer {} requires the referring provider's NPI{}",
                        payer.id(),
                        for_codes(&rule.when)
                    ),
                ),
                Requirement::MemberId => {
                    // Already reported by the member-id validator when the payer always needs one.
                    let missing =
                        matches!(effective_member_id(draft, ctx), EffectiveMemberId::Missing);
                    if missing && !payer.member_id().required {
                        out.push(missing_member_id(payer, id));
                    }
                    continue;
                }
                Requirement::MaxUnits(max) => (
                    "units",
                    draft.units.valid().is_some_and(|units| units > max),
                    format!(
                        "payer {} accepts at most {max} units{}",
                        payer.id(),
                        for_codes(&rule.when)
                    ),
                ),
                Requirement::PlaceOfServiceIn(allowed) => (
                    "place_of_service",
                    draft
                        .place_of_service
                        .valid()
                        .is_some_and(|pos| !allowed.contains(pos)),
                    format!(
                        "payer {} accepts only places of service {}",
                        payer.id(),
                        allowed.join(", ")
                    ),
                ),
            };
            if broken {
                let what = rule.message.clone().unwrap_or(default);
                out.push(Problem::new(field, ProblemKind::BusinessRule, id, what));
            }
        }
    }
}

/// Whether a rule's `when` holds: `None` when a field it looks at did not parse.
fn applies(when: &When, draft: &Draft<'_>, rules: &ClaimRules) -> Option<bool> {
    if !when.cpt.is_empty() || !when.family.is_empty() {
        let code = draft.cpt.valid()?;
        if !when.cpt.is_empty() && !when.cpt.iter().any(|c| c == code.as_str()) {
            return Some(false);
        }
        if !when.family.is_empty() {
            let entry = rules.cpt().get(code.as_str())?;
            if !when.family.contains(&entry.family) {
                return Some(false);
            }
        }
    }
    if !when.place_of_service.is_empty() {
        let pos = draft.place_of_service.valid()?;
        if !when.place_of_service.contains(pos) {
            return Some(false);
        }
    }
    Some(true)
}

/// ` for 90837` or ` for psychotherapy` from the rule's condition (config, not client data).
fn for_codes(when: &When) -> String {
    let named: Vec<&str> = when
        .cpt
        .iter()
        .chain(&when.family)
        .map(String::as_str)
        .collect();
    if named.is_empty() {
        String::new()
    } else {
        format!(" for {}", named.join(", "))
    }
}
