//! The `POST /api/v1/claims/prepare` body and its first pass: every field is taken as raw JSON so
//! that a wrong type is one problem among the others instead of a serde error that hides them,
//! then parsed into a [`Draft`] whose fields are either absent, invalid (a problem was recorded)
//! or a typed value the validators can trust.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::codes::{CptCode, Icd10Code};
use super::money::{Currency, Decimal, DecimalError};
use super::payers::{is_place_of_service, Payer};
use super::problem::{Problem, ProblemKind};
use super::ClaimRules;
use crate::domain::ResourceId;

/// Most ICD-10-CM codes one claim line may point to (the 837P/CMS-1500 limit is 12).
pub const MAX_ICD10_CODES: usize = 12;

/// The request body, field by field as the client sent it (`null` counts as absent). Any JSON
/// object deserialises; nothing is judged until [`ClaimRules::check`](super::ClaimRules::check).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(from = "Map<String, Value>")]
pub struct PrepareRequest {
    /// The caller's practice (optional; the route refuses another practice's id).
    pub practice_id: Option<Value>,
    pub patient: Option<Value>,
    pub practitioner: Option<Value>,
    pub date_of_service: Option<Value>,
    pub cpt_code: Option<Value>,
    pub icd10_codes: Option<Value>,
    pub icd10_code: Option<Value>,
    pub fee: Option<Value>,
    pub copay: Option<Value>,
    pub currency: Option<Value>,
    pub units: Option<Value>,
    pub place_of_service: Option<Value>,
    pub payer_id: Option<Value>,
    pub member_id: Option<Value>,
    pub prior_authorization: Option<Value>,
    pub referring_provider_npi: Option<Value>,
    /// Names of fields this request type does not have, in the order sent.
    pub unknown_fields: Vec<String>,
}

impl From<Map<String, Value>> for PrepareRequest {
    fn from(mut map: Map<String, Value>) -> Self {
        let mut take = |name: &str| map.shift_remove(name).filter(|v| !v.is_null());
        let mut request = Self {
            practice_id: take("practice_id"),
            patient: take("patient_id"),
            practitioner: take("therapist_id"),
            date_of_service: take("session_date"),
            cpt_code: take("cpt_code"),
            icd10_codes: take("icd10_codes"),
            icd10_code: take("icd10_code"),
            fee: take("fee"),
            copay: take("copay"),
            currency: take("currency"),
            units: take("units"),
            place_of_service: take("place_of_service"),
            payer_id: take("payer_id"),
            member_id: take("member_id"),
            prior_authorization: take("prior_authorization"),
            referring_provider_npi: take("referring_provider_npi"),
            unknown_fields: Vec::new(),
        };
        request.unknown_fields = map.into_iter().map(|(name, _)| name).collect();
        request
    }
}

impl PrepareRequest {
    /// The patient's id when it is a valid FHIR id, for the route to look up the patient's
    /// Coverage before [`ClaimRules::check`](super::ClaimRules::check) (which reports it if not).
    pub fn patient_id(&self) -> Option<ResourceId> {
        id_of(&self.patient)
    }
    /// The practitioner's id when it is a valid FHIR id, for the route to read the NPI.
    pub fn practitioner_id(&self) -> Option<ResourceId> {
        id_of(&self.practitioner)
    }
}

fn id_of(value: &Option<Value>) -> Option<ResourceId> {
    ResourceId::parse("id", value.as_ref()?.as_str()?.trim()).ok()
}

/// One field after the first pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input<T> {
    /// Not sent (or `null`), and no default applies.
    Absent,
    /// Sent but unusable; the problem is already recorded, so validators skip it.
    Invalid,
    Valid(T),
}

impl<T> Input<T> {
    pub(crate) fn valid(&self) -> Option<&T> {
        match self {
            Input::Valid(value) => Some(value),
            _ => None,
        }
    }
    pub(crate) fn is_absent(&self) -> bool {
        matches!(self, Input::Absent)
    }
}

/// An ICD-10-CM code with the request field it came from (`icd10_codes[2]` or `icd10_code`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DraftIcd10 {
    pub field: String,
    pub code: Icd10Code,
}

/// The request after the first pass: what the validators look at.
#[derive(Debug, Clone)]
pub(crate) struct Draft<'r> {
    pub patient: Input<ResourceId>,
    pub practitioner: Input<ResourceId>,
    pub date_of_service: Input<time::Date>,
    pub cpt: Input<CptCode>,
    /// The codes that parsed, primary first; `icd10_complete` says whether all of them did.
    pub icd10: Vec<DraftIcd10>,
    pub icd10_complete: bool,
    pub fee: Input<Decimal>,
    /// Defaults to zero.
    pub copay: Input<Decimal>,
    /// Defaults to USD.
    pub currency: Input<Currency>,
    /// Defaults to 1.
    pub units: Input<u8>,
    /// Defaults to `11` (office).
    pub place_of_service: Input<String>,
    pub payer: Input<&'r Payer>,
    /// As sent, trimmed; the member-id validator falls back to the context's.
    pub member_id: Input<String>,
    pub prior_authorization: Input<String>,
    /// As sent, trimmed; the NPI validator checks it.
    pub referring_provider_npi: Input<String>,
}

/// Parses what can be parsed, recording one problem per unusable field.
pub(crate) fn first_pass<'r>(
    request: &PrepareRequest,
    rules: &'r ClaimRules,
    out: &mut Vec<Problem>,
) -> Draft<'r> {
    let mut p = Pass { out };
    let patient = p.resource_id("patient_id", &request.patient);
    let practitioner = p.resource_id("therapist_id", &request.practitioner);
    let date_of_service = p.date("session_date", &request.date_of_service);
    let cpt = p
        .required_string("cpt_code", &request.cpt_code)
        .then_parse(|s| {
            CptCode::parse(s).ok_or_else(|| {
                p.invalid("cpt_code", "cpt.format", "must be five letters or digits")
            })
        });
    let (icd10, icd10_complete) = p.icd10(request);
    let fee = p.amount("fee", &request.fee);
    let copay = match &request.copay {
        None => Input::Valid(Decimal::ZERO),
        some => p.amount("copay", some),
    };
    let currency = match &request.currency {
        None => Input::Valid(Currency::USD),
        some => p.optional_string("currency", some).then_parse(|s| {
            Currency::parse(s).ok_or_else(|| {
                p.push(
                    "currency",
                    ProblemKind::UnknownCode,
                    "currency.supported",
                    "is not a supported ISO 4217 currency code",
                )
            })
        }),
    };
    let units = match &request.units {
        None => Input::Valid(1),
        Some(v) => match v.as_u64().and_then(|n| u8::try_from(n).ok()) {
            Some(n @ 1..=99) => Input::Valid(n),
            _ => p.fail(
                "units",
                "units.range",
                "must be a whole number from 1 to 99",
            ),
        },
    };
    let place_of_service = match &request.place_of_service {
        None => Input::Valid("11".to_owned()),
        some => p.optional_string("place_of_service", some).then_parse(|s| {
            if is_place_of_service(s) {
                Ok(s.to_owned())
            } else {
                p.invalid(
                    "place_of_service",
                    "place_of_service.format",
                    "must be a two-digit CMS place-of-service code",
                );
                Err(())
            }
        }),
    };
    let payer = p
        .required_string("payer_id", &request.payer_id)
        .then_parse(|s| {
            rules.payer(s).ok_or_else(|| {
                p.push(
                    "payer_id",
                    ProblemKind::UnknownCode,
                    "payer.known",
                    "names no configured payer (config/payers)",
                )
            })
        });
    let member_id = p
        .optional_string("member_id", &request.member_id)
        .then_map(str::to_owned);
    let prior_authorization = p
        .optional_string("prior_authorization", &request.prior_authorization)
        .then_parse(|s| {
            if (1..=50).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic()) {
                Ok(s.to_owned())
            } else {
                p.invalid(
                    "prior_authorization",
                    "prior_authorization.format",
                    "must be 1-50 printable characters without spaces",
                );
                Err(())
            }
        });
    let referring_provider_npi = p
        .optional_string("referring_provider_npi", &request.referring_provider_npi)
        .then_map(str::to_owned);
    for name in &request.unknown_fields {
        // The name is the client's text: shown in `field` only when it looks like a field name.
        let shown = if (1..=64).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            name.as_str()
        } else {
            "(unknown field)"
        };
        p.invalid(
            shown,
            "request.unknown-field",
            "is not a field of this request",
        );
    }
    Draft {
        patient,
        practitioner,
        date_of_service,
        cpt,
        icd10,
        icd10_complete,
        fee,
        copay,
        currency,
        units,
        place_of_service,
        payer,
        member_id,
        prior_authorization,
        referring_provider_npi,
    }
}

/// A string field after its type check: `Ok(None)` absent, `Err(())` invalid (problem recorded),
/// `Ok(Some)` to be parsed further into an [`Input`].
trait RawExt<'a> {
    fn then_parse<T>(self, f: impl FnOnce(&'a str) -> Result<T, ()>) -> Input<T>;
    fn then_map<T>(self, f: impl FnOnce(&'a str) -> T) -> Input<T>;
}

impl<'a> RawExt<'a> for Result<Option<&'a str>, ()> {
    fn then_parse<T>(self, f: impl FnOnce(&'a str) -> Result<T, ()>) -> Input<T> {
        match self {
            Ok(None) => Input::Absent,
            Err(()) => Input::Invalid,
            Ok(Some(s)) => f(s).map_or(Input::Invalid, Input::Valid),
        }
    }
    fn then_map<T>(self, f: impl FnOnce(&'a str) -> T) -> Input<T> {
        self.then_parse(|s| Ok(f(s)))
    }
}

struct Pass<'o> {
    out: &'o mut Vec<Problem>,
}

impl Pass<'_> {
    fn push(&mut self, field: &str, kind: ProblemKind, rule: &str, what: &str) {
        self.out.push(Problem::new(field, kind, rule, what));
    }
    fn invalid(&mut self, field: &str, rule: &str, what: &str) {
        self.push(field, ProblemKind::Invalid, rule, what);
    }
    fn fail<T>(&mut self, field: &str, rule: &str, what: &str) -> Input<T> {
        self.invalid(field, rule, what);
        Input::Invalid
    }

    /// A string field, trimmed; absent is `Ok(None)`, another JSON type is a problem.
    fn optional_string<'a>(
        &mut self,
        field: &str,
        value: &'a Option<Value>,
    ) -> Result<Option<&'a str>, ()> {
        match value {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim())),
            Some(_) => {
                self.invalid(field, &format!("{field}.type"), "must be a string");
                Err(())
            }
        }
    }

    /// A string the claim cannot do without: absent is a `Required` problem.
    fn required_string<'a>(
        &mut self,
        field: &str,
        value: &'a Option<Value>,
    ) -> Result<Option<&'a str>, ()> {
        match self.optional_string(field, value)? {
            None => {
                self.push(
                    field,
                    ProblemKind::Required,
                    &format!("{field}.required"),
                    "is required",
                );
                Err(())
            }
            some => Ok(some),
        }
    }

    fn resource_id(&mut self, field: &str, value: &Option<Value>) -> Input<ResourceId> {
        self.required_string(field, value).then_parse(|s| {
            ResourceId::parse("id", s).map_err(|_| {
                self.invalid(
                    field,
                    &format!("{field}.format"),
                    "must be a FHIR resource id (1-64 of A-Z, a-z, 0-9, '-', '.')",
                )
            })
        })
    }

    /// `YYYY-MM-DD`, a real calendar date.
    fn date(&mut self, field: &str, value: &Option<Value>) -> Input<time::Date> {
        self.required_string(field, value).then_parse(|s| {
            parse_date(s).ok_or_else(|| {
                self.invalid(
                    field,
                    &format!("{field}.format"),
                    "must be a calendar date written YYYY-MM-DD",
                )
            })
        })
    }

    /// A JSON number or a string holding one, exactly.
    fn amount(&mut self, field: &str, value: &Option<Value>) -> Input<Decimal> {
        let text = match value {
            None => {
                self.push(
                    field,
                    ProblemKind::Required,
                    &format!("{field}.required"),
                    "is required",
                );
                return Input::Invalid;
            }
            // With `arbitrary_precision`, a number displays as the client wrote it.
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return self.fail(
                    field,
                    &format!("{field}.type"),
                    "must be a decimal number (JSON number or string)",
                )
            }
        };
        match Decimal::parse(&text) {
            Ok(amount) => Input::Valid(amount),
            Err(DecimalError::Format) => self.fail(
                field,
                &format!("{field}.format"),
                "must be a decimal number such as 150 or 150.50",
            ),
            Err(DecimalError::TooLarge) => self.fail(
                field,
                &format!("{field}.magnitude"),
                "is too large for a claim amount",
            ),
        }
    }

    /// `icd10_codes` (1-12 strings) or the shorthand `icd10_code` (one string), not both.
    fn icd10(&mut self, request: &PrepareRequest) -> (Vec<DraftIcd10>, bool) {
        let mut codes = Vec::new();
        let mut complete = true;
        let mut one = |p: &mut Self, field: String, value: &Value| match value {
            Value::String(s) => match Icd10Code::parse(s) {
                Some(code) => codes.push(DraftIcd10 { field, code }),
                None => {
                    p.invalid(
                        &field,
                        "icd10.format",
                        "must be an ICD-10-CM code such as A12.3",
                    );
                    complete = false;
                }
            },
            _ => {
                p.invalid(&field, "icd10.type", "must be a string");
                complete = false;
            }
        };
        match (&request.icd10_codes, &request.icd10_code) {
            (Some(_), Some(_)) => {
                self.invalid(
                    "icd10_code",
                    "icd10.one-of",
                    "send either icd10_codes or icd10_code, not both",
                );
                return (codes, false);
            }
            (None, None) => {
                self.push(
                    "icd10_codes",
                    ProblemKind::Required,
                    "icd10_codes.required",
                    "is required",
                );
                return (codes, false);
            }
            (None, Some(single)) => one(self, "icd10_code".to_owned(), single),
            (Some(Value::Array(list)), None) => {
                if list.is_empty() || list.len() > MAX_ICD10_CODES {
                    self.invalid(
                        "icd10_codes",
                        "icd10_codes.count",
                        &format!("must hold 1 to {MAX_ICD10_CODES} codes, the primary first"),
                    );
                    return (codes, false);
                }
                for (i, value) in list.iter().enumerate() {
                    one(self, format!("icd10_codes[{i}]"), value);
                }
            }
            (Some(_), None) => {
                self.invalid(
                    "icd10_codes",
                    "icd10_codes.type",
                    "must be an array of strings",
                );
                return (codes, false);
            }
        }
        (codes, complete)
    }
}

/// Strict `YYYY-MM-DD` (four-digit year, no sign, no time).
pub(crate) fn parse_date(s: &str) -> Option<time::Date> {
    let b = s.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape {
        return None;
    }
    let year: i32 = s[0..4].parse().ok()?;
    let month: u8 = s[5..7].parse().ok()?;
    let day: u8 = s[8..10].parse().ok()?;
    let month = time::Month::try_from(month).ok()?;
    time::Date::from_calendar_date(year, month, day).ok()
}
