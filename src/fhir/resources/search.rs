//! Search: parameters, the index they are answered from, and `searchset` Bundles with keyset
//! paging.
//!
//! How each kind of parameter is answered without decrypting, and what it leaks:
//! - codes and references (`gender`, `patient`, `status`): stored as they are (not PHI);
//! - identifiers: the system as it is, the value as a blind index (exact match, FHIR token
//!   semantics: `system|value`, `value`, `|value`, `system|`);
//! - names (`family`, `given`, `name`): FHIR's default is a case- and accent-insensitive
//!   starts-with match. Each name string is indexed twice: a blind index of the whole
//!   normalised string (for `:exact`) and one of its first three characters. A query of three
//!   characters or more selects candidates by the three-character index, which the gateway then
//!   decrypts to check the full prefix; a shorter query checks every resource of the type in the
//!   practice (correct, slower). The three-character index leaks which rows share a name
//!   prefix, no more than the whole-name index already does.
//! - birth dates: a blind index of the full date (an `eq` search for a day is one index lookup)
//!   and the birth *year* in clear, which HIPAA's Safe Harbor method (45 CFR 164.514(b)(2))
//!   does not count as an identifier, with years of people over 89 aggregated into one bucket.
//!   Ranges (`lt`, `ge`...) and partial dates select candidates by year and are checked on the
//!   decrypted resource.
//!
//! Paging is by keyset (the sort key and id of the last row sent), so pages stay correct while
//! rows are inserted: nothing is skipped or repeated. Links of a `POST _search` never carry its
//! parameters (they may be PHI): the parameters are kept server-side for 30 minutes under a
//! random key, for the same client only, and the links name that key.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{caller, open_json, Kind};
use crate::crypto::{normalise, PhiVault};
use crate::domain::ResourceId;
use crate::fhir::FHIR_BASE;
use crate::gate::Permission;
use crate::http::ApiError;
use crate::startup::AppState;
use crate::store::{
    Bound, CmpOp, Cond, IndexMatch, IndexRow, ResourceQuery, SortKey, StoredVersion,
};

pub const DEFAULT_COUNT: i64 = 50;
pub const MAX_COUNT: i64 = 500;
/// Rows fetched per round when candidates must be checked after decryption.
const SCAN_BATCH: i64 = 200;
/// A lower bound standing for "any year up to the aggregation year" (Safe Harbor, ages > 89).
const AGGREGATED_LOW: i64 = i64::MIN / 4;
/// An upper bound standing for "still open" (a period without end).
const OPEN_HIGH: i64 = i64::MAX / 4;

/// A search parameter of a resource type, and how resources are indexed for it.
pub struct Param {
    pub name: &'static str,
    pub kind: ParamKind,
    pub doc: &'static str,
}

/// An identifier's (system, value).
pub type SystemValue = (Option<String>, String);

pub enum ParamKind {
    /// Codes stored as they are (not PHI), e.g. `gender`.
    Code { codes: fn(&Value) -> Vec<String> },
    /// Identifiers: (system, value); the value is PHI.
    Identifier {
        identifiers: fn(&Value) -> Vec<SystemValue>,
    },
    /// Name strings (PHI) with FHIR's starts-with match; `prefix_index` names the index of
    /// their first three characters.
    Name {
        strings: fn(&Value) -> Vec<String>,
        prefix_index: &'static str,
    },
    /// A birth date (PHI); `year_index` names the index of its (coarsened) year.
    BirthDate {
        date: fn(&Value) -> Option<String>,
        year_index: &'static str,
    },
    /// References to resources of `target`, stored as ids.
    Reference {
        target: &'static str,
        ids: fn(&Value) -> Vec<String>,
    },
    /// Dates of care (an encounter's period, a claim's creation): PHI, so only their years
    /// are indexed (under `year_index`, in clear, as Safe Harbor allows); the exact ranges
    /// (microseconds, end exclusive, from [`date_range_us`]) are checked on the decrypted
    /// resource.
    Date {
        ranges: fn(&Value) -> Vec<(i64, i64)>,
        year_index: &'static str,
    },
}

impl ParamKind {
    pub fn fhir_type(&self) -> &'static str {
        match self {
            ParamKind::Code { .. } | ParamKind::Identifier { .. } => "token",
            ParamKind::Name { .. } => "string",
            ParamKind::BirthDate { .. } | ParamKind::Date { .. } => "date",
            ParamKind::Reference { .. } => "reference",
        }
    }
}

/// The blind index column label of a parameter: `Patient.family`.
fn label(kind: &Kind, index: &str) -> String {
    format!("{}.{index}", kind.resource_type)
}

fn first3(normalised: &str) -> String {
    normalised.chars().take(3).collect()
}

/// The index rows of a resource, from its type's parameters.
pub(crate) fn index_rows(kind: &Kind, resource: &Value, vault: &PhiVault) -> Vec<IndexRow> {
    let mut rows = Vec::new();
    for param in kind.params {
        match &param.kind {
            ParamKind::Code { codes } => {
                rows.extend(
                    codes(resource)
                        .into_iter()
                        .map(|c| IndexRow::value(param.name, c)),
                );
            }
            ParamKind::Identifier { identifiers } => {
                let column = label(kind, param.name);
                for (system, value) in identifiers(resource) {
                    if let Ok(n) = normalise::identifier(&value) {
                        let mut row = IndexRow::hash(param.name, vault.blind(&column, &n));
                        row.value = system;
                        rows.push(row);
                    }
                }
            }
            ParamKind::Name {
                strings,
                prefix_index,
            } => {
                let (whole, prefix) = (label(kind, param.name), label(kind, prefix_index));
                for s in strings(resource) {
                    if let Ok(n) = normalise::search_string(&s) {
                        rows.push(IndexRow::hash(param.name, vault.blind(&whole, &n)));
                        rows.push(IndexRow::hash(
                            prefix_index,
                            vault.blind(&prefix, &first3(&n)),
                        ));
                    }
                }
            }
            ParamKind::BirthDate { date, year_index } => {
                if let Some(d) = date(resource) {
                    if let Ok(n) = normalise::birth_date(&d) {
                        let column = label(kind, param.name);
                        rows.push(IndexRow::hash(param.name, vault.blind(&column, &n)));
                    }
                    if let Some((low, high)) = coarse_year(&d, OffsetDateTime::now_utc().year()) {
                        rows.push(IndexRow::range(year_index, low, high));
                    }
                }
            }
            ParamKind::Reference { ids, .. } => {
                rows.extend(
                    ids(resource)
                        .into_iter()
                        .map(|id| IndexRow::value(param.name, id)),
                );
            }
            ParamKind::Date { ranges, year_index } => {
                rows.extend(
                    ranges(resource)
                        .into_iter()
                        .filter_map(|(low, high)| year_span(low, high))
                        .map(|(low, high)| IndexRow::range(year_index, low, high)),
                );
            }
        }
    }
    rows.sort_by(|a, b| (a.param, &a.value, &a.hash).cmp(&(b.param, &b.value, &b.hash)));
    rows.dedup();
    rows
}

/// The year range of a birth date in seconds, years of people over 89 (as of `this_year`)
/// aggregated into one range.
fn coarse_year(date: &str, this_year: i32) -> Option<(i64, i64)> {
    let year: i32 = date.get(..4)?.parse().ok()?;
    let start = |y: i32| {
        time::Date::from_calendar_date(y, time::Month::January, 1)
            .ok()
            .map(|d| d.midnight().assume_utc().unix_timestamp())
    };
    let oldest_exact = this_year - 89;
    if year < oldest_exact {
        Some((AGGREGATED_LOW, start(oldest_exact)?))
    } else {
        Some((start(year)?, start(year + 1)?))
    }
}

/// The whole years (in seconds, end exclusive) that a range of microseconds touches; an open
/// end (`i64::MIN`/`i64::MAX`, a period without start or end) stays open.
fn year_span(low_us: i64, high_us: i64) -> Option<(i64, i64)> {
    let year_start = |y: i32| {
        time::Date::from_calendar_date(y, time::Month::January, 1)
            .ok()
            .map(|d| d.midnight().assume_utc().unix_timestamp())
    };
    let year_of = |us: i64| {
        OffsetDateTime::from_unix_timestamp(us.div_euclid(1_000_000))
            .ok()
            .map(|t| t.year())
    };
    let low = if low_us == i64::MIN {
        AGGREGATED_LOW
    } else {
        year_start(year_of(low_us)?)?
    };
    let high = if high_us == i64::MAX {
        OPEN_HIGH
    } else {
        year_start(year_of(high_us.saturating_sub(1))? + 1)?
    };
    Some((low, high))
}

/// The interval a FHIR Period denotes (microseconds, end exclusive): a missing start or end is
/// open (FHIR R4 datatypes.html#Period: an ongoing period has no end).
pub(crate) fn period_range_us(period: &Value) -> Option<(i64, i64)> {
    let bound = |name: &str| period.get(name).and_then(Value::as_str).map(date_range_us);
    let low = match bound("start") {
        Some(Some((low, _))) => low,
        Some(None) => return None,
        None => i64::MIN,
    };
    let high = match bound("end") {
        Some(Some((_, high))) => high,
        Some(None) => return None,
        None => i64::MAX,
    };
    (low != i64::MIN || high != i64::MAX).then_some((low, high))
}

/// The interval a FHIR date, dateTime or instant denotes, in microseconds (end exclusive):
/// `2024` is the whole year, `2024-03` the month, `2024-03-05` the day, an instant to the
/// second (or millisecond, with a fraction).
pub(crate) fn date_range_us(text: &str) -> Option<(i64, i64)> {
    let b = text.as_bytes();
    let day = |y: i32, m: u8, d: u8| -> Option<i64> {
        let month = time::Month::try_from(m).ok()?;
        let date = time::Date::from_calendar_date(y, month, d).ok()?;
        Some(date.midnight().assume_utc().unix_timestamp() * 1_000_000)
    };
    let digits = |r: std::ops::Range<usize>| -> Option<i32> {
        let s = text.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())
            .flatten()
    };
    match b.len() {
        4 => {
            let y = digits(0..4)?;
            Some((day(y, 1, 1)?, day(y + 1, 1, 1)?))
        }
        7 if b[4] == b'-' => {
            let (y, m) = (digits(0..4)?, u8::try_from(digits(5..7)?).ok()?);
            let next = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            Some((day(y, m, 1)?, day(next.0, next.1, 1)?))
        }
        10 if b[4] == b'-' && b[7] == b'-' => {
            let start = day(
                digits(0..4)?,
                u8::try_from(digits(5..7)?).ok()?,
                u8::try_from(digits(8..10)?).ok()?,
            )?;
            Some((start, start + 86_400_000_000))
        }
        _ => {
            let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
            let start = i64::try_from(t.unix_timestamp_nanos() / 1_000).ok()?;
            let step = if text.contains('.') { 1_000 } else { 1_000_000 };
            Some((
                start - start.rem_euclid(step),
                start - start.rem_euclid(step) + step,
            ))
        }
    }
}

/// A search prefix of FHIR R4 search.html#prefix that the gateway supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefix {
    Eq,
    Gt,
    Lt,
    Ge,
    Le,
}

fn split_prefix(name: &str, value: &str) -> Result<(Prefix, String), ApiError> {
    let prefix = match value.get(..2) {
        Some("eq") => Prefix::Eq,
        Some("gt") => Prefix::Gt,
        Some("lt") => Prefix::Lt,
        Some("ge") => Prefix::Ge,
        Some("le") => Prefix::Le,
        Some("ne" | "sa" | "eb" | "ap") => {
            return Err(ApiError::BadRequest(format!(
                "{name}: the prefixes ne, sa, eb and ap are not supported (eq, gt, lt, ge, le are)"
            )))
        }
        _ => return Ok((Prefix::Eq, value.to_owned())),
    };
    Ok((prefix, value[2..].to_owned()))
}

/// The conditions on a target range [low, high) for `prefix` and a query range [ql, qh),
/// FHIR R4 search.html#date semantics.
fn range_bounds(prefix: Prefix, ql: i64, qh: i64) -> Vec<Bound> {
    match prefix {
        Prefix::Eq => vec![Bound::LowGe(ql), Bound::HighLe(qh)],
        Prefix::Gt => vec![Bound::HighGt(qh)],
        Prefix::Lt => vec![Bound::LowLt(ql)],
        Prefix::Ge => vec![Bound::HighGt(ql)],
        Prefix::Le => vec![Bound::LowLt(qh)],
    }
}

fn range_matches(prefix: Prefix, (low, high): (i64, i64), (ql, qh): (i64, i64)) -> bool {
    match prefix {
        Prefix::Eq => low >= ql && high <= qh,
        Prefix::Gt => high > qh,
        Prefix::Lt => low < ql,
        Prefix::Ge => high > ql,
        Prefix::Le => low < qh,
    }
}

/// Conditions on a year index (ranges in seconds covering whole years) that select every
/// resource the exact conditions `any` may match: each is implied by its exact condition,
/// since a year range contains the exact range (for `eq`, containment becomes overlap).
fn coarse_candidates(any: &[(Prefix, (i64, i64))]) -> Vec<IndexMatch> {
    let secs = |us: i64| us.div_euclid(1_000_000);
    any.iter()
        .map(|(prefix, (ql, qh))| IndexMatch {
            bounds: match prefix {
                Prefix::Eq => vec![Bound::HighGt(secs(*ql)), Bound::LowLt(secs(*qh))],
                p => range_bounds(*p, secs(*ql), secs(*qh)),
            },
            ..Default::default()
        })
        .collect()
}

/// A check made on the decrypted resource, for what the index can only narrow down.
enum Residual {
    Names {
        strings: fn(&Value) -> Vec<String>,
        any: Vec<String>,
        exact: bool,
    },
    Dates {
        date: fn(&Value) -> Option<String>,
        any: Vec<(Prefix, (i64, i64))>,
    },
    Ranges {
        ranges: fn(&Value) -> Vec<(i64, i64)>,
        any: Vec<(Prefix, (i64, i64))>,
    },
}

impl Residual {
    fn matches(&self, resource: &Value) -> bool {
        match self {
            Residual::Names {
                strings,
                any,
                exact,
            } => {
                let values = strings(resource);
                values.iter().any(|s| {
                    if *exact {
                        any.iter().any(|q| q == s)
                    } else {
                        normalise::search_string(s)
                            .is_ok_and(|n| any.iter().any(|q| n.starts_with(q.as_str())))
                    }
                })
            }
            Residual::Dates { date, any } => date(resource)
                .and_then(|d| date_range_us(&d))
                .is_some_and(|r| any.iter().any(|(p, q)| range_matches(*p, r, *q))),
            Residual::Ranges { ranges, any } => ranges(resource)
                .into_iter()
                .any(|r| any.iter().any(|(p, q)| range_matches(*p, r, *q))),
        }
    }
}

/// A parsed search.
pub(crate) struct Plan {
    conds: Vec<Cond>,
    residual: Vec<Residual>,
    sort: SortKey,
    descending: bool,
    count: i64,
    total: bool,
    /// The parameters used, for `self`/`next` links of a GET search.
    echo: Vec<(String, String)>,
    /// Reference parameters whose targets are included (`_include`).
    includes: Vec<&'static Param>,
}

impl Plan {
    /// Whether a decrypted resource passes the checks the index could only narrow down.
    pub(crate) fn matches(&self, resource: &Value) -> bool {
        self.residual.iter().all(|r| r.matches(resource))
    }

    /// Entries per page (0 for `_summary=count`), at most [`MAX_COUNT`].
    pub(crate) fn count(&self) -> i64 {
        self.count
    }
}

pub(crate) fn parse_count(value: &str) -> Result<i64, ApiError> {
    value
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .map(|n| n.min(MAX_COUNT))
        .ok_or_else(|| ApiError::BadRequest("_count: expected a number of 0 or more".into()))
}

fn bad(name: &str, rule: &str) -> ApiError {
    ApiError::BadRequest(format!("{name}: {rule}"))
}

/// Parses search parameters into a plan. Unknown parameters are refused unless `lenient`.
pub(crate) fn plan(
    kind: &Kind,
    vault: &PhiVault,
    params: &[(String, String)],
    lenient: bool,
) -> Result<Plan, ApiError> {
    let mut plan = Plan {
        conds: Vec::new(),
        residual: Vec::new(),
        sort: SortKey::LastUpdated,
        descending: false,
        count: DEFAULT_COUNT,
        total: true,
        echo: Vec::new(),
        includes: Vec::new(),
    };
    for (key, value) in params {
        let (name, modifier) = match key.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (key.as_str(), None),
        };
        match name {
            "_format" | "_pretty" | "_cursor" | "_page" => continue,
            "_count" => plan.count = parse_count(value)?,
            "_total" => {
                plan.total = match value.as_str() {
                    "none" => false,
                    "accurate" | "estimate" => true,
                    _ => return Err(bad("_total", "expected none, estimate or accurate")),
                }
            }
            "_summary" if value == "count" => plan.count = 0,
            "_summary" => {
                return Err(bad("_summary", "only _summary=count is supported"));
            }
            "_sort" => {
                let (descending, field) = match value.strip_prefix('-') {
                    Some(f) => (true, f),
                    None => (false, value.as_str()),
                };
                plan.sort = match field {
                    "_lastUpdated" => SortKey::LastUpdated,
                    "_id" => SortKey::Id,
                    _ => return Err(bad(
                        "_sort",
                        "sorting is supported by _lastUpdated and _id (other fields may be encrypted PHI)",
                    )),
                };
                plan.descending = descending;
            }
            "_include" => {
                if modifier.is_some() {
                    return Err(bad("_include", "modifiers (:iterate) are not supported"));
                }
                let param = include_param(kind, value)?;
                if !plan.includes.iter().any(|p| p.name == param.name) {
                    plan.includes.push(param);
                }
            }
            "_id" => {
                if modifier.is_some() {
                    return Err(bad("_id", "modifiers are not supported"));
                }
                let ids = value
                    .split(',')
                    .map(|v| ResourceId::parse("_id", v).map(|id| id.to_string()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                plan.conds.push(Cond::Ids(ids));
            }
            "_lastUpdated" => {
                if value.contains(',') {
                    return Err(bad(
                        "_lastUpdated",
                        "one value per parameter (repeat the parameter to AND)",
                    ));
                }
                let (prefix, text) = split_prefix(name, value)?;
                let (ql, qh) = date_range_us(&text).ok_or_else(|| {
                    bad(
                        "_lastUpdated",
                        "expected a date, YYYY, YYYY-MM, YYYY-MM-DD or an instant",
                    )
                })?;
                match prefix {
                    Prefix::Eq => {
                        plan.conds.push(Cond::LastUpdated(CmpOp::Ge, ql));
                        plan.conds.push(Cond::LastUpdated(CmpOp::Lt, qh));
                    }
                    Prefix::Gt => plan.conds.push(Cond::LastUpdated(CmpOp::Ge, qh)),
                    Prefix::Lt => plan.conds.push(Cond::LastUpdated(CmpOp::Lt, ql)),
                    Prefix::Ge => plan.conds.push(Cond::LastUpdated(CmpOp::Ge, ql)),
                    Prefix::Le => plan.conds.push(Cond::LastUpdated(CmpOp::Lt, qh)),
                }
            }
            _ => match kind.params.iter().find(|p| p.name == name) {
                Some(param) => plan_param(kind, vault, param, modifier, value, &mut plan)?,
                None if lenient => continue,
                None => {
                    let known: Vec<&str> = kind.params.iter().map(|p| p.name).collect();
                    return Err(ApiError::BadRequest(format!(
                        "unknown search parameter for {} (supported: {}, _id, _lastUpdated, _count, _sort, _total, _summary=count); send Prefer: handling=lenient to ignore unknown parameters",
                        kind.resource_type,
                        known.join(", ")
                    )));
                }
            },
        }
        plan.echo.push((key.clone(), value.clone()));
    }
    Ok(plan)
}

/// The reference parameter an `_include` value names: `Coverage:patient` or
/// `Coverage:patient:Patient` (R4 search.html#include).
fn include_param(kind: &Kind, value: &str) -> Result<&'static Param, ApiError> {
    let mut parts = value.split(':');
    let (source, name, target) = (parts.next(), parts.next(), parts.next());
    if parts.next().is_some() || source != Some(kind.resource_type) {
        return Err(bad(
            "_include",
            &format!(
                "expected {}:{{parameter}} or {}:{{parameter}}:{{type}}",
                kind.resource_type, kind.resource_type
            ),
        ));
    }
    let refs = || {
        kind.params
            .iter()
            .filter(|p| matches!(p.kind, ParamKind::Reference { .. }))
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let param = kind
        .params
        .iter()
        .find(|p| Some(p.name) == name && matches!(p.kind, ParamKind::Reference { .. }))
        .ok_or_else(|| {
            bad(
                "_include",
                &format!(
                    "not a reference parameter of {} (supported: {})",
                    kind.resource_type,
                    refs()
                ),
            )
        })?;
    if let (Some(t), ParamKind::Reference { target, .. }) = (target, &param.kind) {
        if t != *target {
            return Err(bad(
                "_include",
                &format!(
                    "{}:{} refers to {target} only",
                    kind.resource_type, param.name
                ),
            ));
        }
    }
    Ok(param)
}

fn plan_param(
    kind: &Kind,
    vault: &PhiVault,
    param: &Param,
    modifier: Option<&str>,
    value: &str,
    plan: &mut Plan,
) -> Result<(), ApiError> {
    let name = param.name;
    let values: Vec<&str> = value.split(',').collect();
    if values.iter().any(|v| v.is_empty()) {
        return Err(bad(name, "empty value"));
    }
    let exact = match (&param.kind, modifier) {
        (_, None) => false,
        (ParamKind::Name { .. }, Some("exact")) => true,
        (_, Some(_)) => {
            return Err(bad(
                name,
                "this modifier is not supported (only :exact, on name parameters)",
            ))
        }
    };
    match &param.kind {
        ParamKind::Code { .. } => {
            let any = values
                .iter()
                .map(|v| IndexMatch {
                    value: Some(v.rsplit('|').next().unwrap_or(v).to_owned()),
                    ..Default::default()
                })
                .collect();
            plan.conds.push(Cond::Index { param: name, any });
        }
        ParamKind::Identifier { .. } => {
            let column = label(kind, name);
            let mut any = Vec::with_capacity(values.len());
            for v in &values {
                let (system, val) = match v.split_once('|') {
                    Some((s, v)) => (Some(s), v),
                    None => (None, *v),
                };
                let hash = if val.is_empty() {
                    None
                } else {
                    let n = normalise::identifier(val)
                        .map_err(|_| bad(name, "empty identifier value"))?;
                    Some(vault.blind(&column, &n).to_vec())
                };
                any.push(IndexMatch {
                    value: system.filter(|s| !s.is_empty()).map(str::to_owned),
                    value_is_null: system == Some(""),
                    hash,
                    bounds: Vec::new(),
                });
            }
            plan.conds.push(Cond::Index { param: name, any });
        }
        ParamKind::Name {
            strings,
            prefix_index,
        } => {
            let normalised = values
                .iter()
                .map(|v| normalise::search_string(v).map_err(|_| bad(name, "empty name")))
                .collect::<Result<Vec<_>, _>>()?;
            if exact {
                let column = label(kind, name);
                let any = normalised
                    .iter()
                    .map(|n| IndexMatch {
                        hash: Some(vault.blind(&column, n).to_vec()),
                        ..Default::default()
                    })
                    .collect();
                plan.conds.push(Cond::Index { param: name, any });
                plan.residual.push(Residual::Names {
                    strings: *strings,
                    any: values.iter().map(|v| (*v).to_owned()).collect(),
                    exact: true,
                });
            } else {
                if normalised.iter().all(|n| n.chars().count() >= 3) {
                    let column = label(kind, prefix_index);
                    let any = normalised
                        .iter()
                        .map(|n| IndexMatch {
                            hash: Some(vault.blind(&column, &first3(n)).to_vec()),
                            ..Default::default()
                        })
                        .collect();
                    plan.conds.push(Cond::Index {
                        param: prefix_index,
                        any,
                    });
                }
                plan.residual.push(Residual::Names {
                    strings: *strings,
                    any: normalised,
                    exact: false,
                });
            }
        }
        ParamKind::BirthDate { date, year_index } => {
            let mut any = Vec::with_capacity(values.len());
            for v in &values {
                let (prefix, text) = split_prefix(name, v)?;
                let range = date_range_us(&text)
                    .ok_or_else(|| bad(name, "expected a date, YYYY, YYYY-MM or YYYY-MM-DD"))?;
                any.push((prefix, text, range));
            }
            if let [(Prefix::Eq, text, _)] = any.as_slice() {
                if let Ok(n) = normalise::birth_date(text) {
                    let column = label(kind, name);
                    plan.conds.push(Cond::Index {
                        param: name,
                        any: vec![IndexMatch {
                            hash: Some(vault.blind(&column, &n).to_vec()),
                            ..Default::default()
                        }],
                    });
                    return Ok(());
                }
            }
            let any: Vec<(Prefix, (i64, i64))> = any.into_iter().map(|(p, _, r)| (p, r)).collect();
            plan.conds.push(Cond::Index {
                param: year_index,
                any: coarse_candidates(&any),
            });
            plan.residual.push(Residual::Dates { date: *date, any });
        }
        ParamKind::Reference { target, .. } => {
            let mut any = Vec::with_capacity(values.len());
            for v in &values {
                let id =
                    v.rsplit_once('/').map_or(
                        *v,
                        |(before, id)| {
                            if before.ends_with(target) {
                                id
                            } else {
                                ""
                            }
                        },
                    );
                let id = ResourceId::parse("reference", id)
                    .map_err(|_| bad(name, &format!("expected {target}/{{id}} or {{id}}")))?;
                any.push(IndexMatch {
                    value: Some(id.to_string()),
                    ..Default::default()
                });
            }
            plan.conds.push(Cond::Index { param: name, any });
        }
        ParamKind::Date { ranges, year_index } => {
            let mut any = Vec::with_capacity(values.len());
            for v in &values {
                let (prefix, text) = split_prefix(name, v)?;
                let range = date_range_us(&text).ok_or_else(|| {
                    bad(
                        name,
                        "expected a date, YYYY, YYYY-MM, YYYY-MM-DD or an instant",
                    )
                })?;
                any.push((prefix, range));
            }
            plan.conds.push(Cond::Index {
                param: year_index,
                any: coarse_candidates(&any),
            });
            plan.residual.push(Residual::Ranges {
                ranges: *ranges,
                any,
            });
        }
    }
    Ok(())
}

/// Where a page starts: after (or, going back, before) the row with this sort key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cursor {
    backward: bool,
    last_updated_us: i64,
    id: String,
}

impl Cursor {
    pub(crate) fn encode(&self) -> String {
        let raw = format!(
            "{}{}:{}",
            if self.backward { 'p' } else { 'n' },
            self.last_updated_us,
            self.id
        );
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    pub(crate) fn decode(text: &str) -> Option<Self> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let backward = match raw.get(..1)? {
            "p" => true,
            "n" => false,
            _ => return None,
        };
        let (lu, id) = raw[1..].split_once(':')?;
        Some(Self {
            backward,
            last_updated_us: lu.parse().ok()?,
            id: ResourceId::parse("cursor", id).ok()?.to_string(),
        })
    }

    fn of(v: &StoredVersion, backward: bool) -> Self {
        Self {
            backward,
            last_updated_us: v.last_updated_us,
            id: v.id.clone(),
        }
    }
}

/// One page of matches, opened and parsed.
struct Page {
    rows: Vec<(StoredVersion, Value)>,
    more_after: bool,
    more_before: bool,
    total: Option<i64>,
}

fn query_for(kind: &Kind, practice: &ResourceId, plan: &Plan) -> ResourceQuery {
    ResourceQuery {
        practice: practice.clone(),
        resource_type: kind.resource_type.to_owned(),
        conds: plan.conds.clone(),
        sort: plan.sort,
        descending: plan.descending,
        after: None,
        limit: plan.count + 1,
    }
}

fn parse_resource(
    vault: &PhiVault,
    practice: &ResourceId,
    v: &StoredVersion,
) -> Result<Value, ApiError> {
    let json = open_json(vault, practice, v)?;
    serde_json::from_slice(&json).map_err(|_| ApiError::Internal)
}

/// Walks the rows of `query` from its `after` onwards in batches, handing each one that passes
/// the residual checks (opened and parsed) to `take`, until `take` says stop or the rows run
/// out. Without residual checks the batch is `limit`; with them, at least [`SCAN_BATCH`].
async fn scan(
    state: &AppState,
    plan: &Plan,
    mut query: ResourceQuery,
    limit: i64,
    mut take: impl FnMut(StoredVersion, Value) -> bool,
) -> Result<(), ApiError> {
    query.limit = if plan.residual.is_empty() {
        limit
    } else {
        SCAN_BATCH.max(limit)
    };
    let vault = state.vault().await?;
    loop {
        let batch = state.store.search_resources(&query).await?;
        let exhausted = (batch.len() as i64) < query.limit;
        for v in batch {
            query.after = Some((v.last_updated_us, v.id.clone()));
            let resource = parse_resource(vault, &query.practice, &v)?;
            if plan.matches(&resource) && !take(v, resource) {
                return Ok(());
            }
        }
        if exhausted {
            return Ok(());
        }
    }
}

/// Collects up to `want` matches from `query` onwards, checking residual conditions on the
/// decrypted resources.
async fn collect(
    state: &AppState,
    plan: &Plan,
    query: ResourceQuery,
    want: usize,
) -> Result<Vec<(StoredVersion, Value)>, ApiError> {
    let mut out = Vec::with_capacity(want.min(64));
    if want == 0 {
        return Ok(out);
    }
    let limit = i64::try_from(want).unwrap_or(MAX_COUNT + 1);
    scan(state, plan, query, limit, |v, resource| {
        out.push((v, resource));
        out.len() < want
    })
    .await?;
    Ok(out)
}

async fn total(state: &AppState, plan: &Plan, query: &ResourceQuery) -> Result<i64, ApiError> {
    if plan.residual.is_empty() {
        return Ok(state.store.count_resources(query).await?);
    }
    let mut from_start = query.clone();
    from_start.after = None;
    let mut n = 0;
    scan(state, plan, from_start, SCAN_BATCH, |_, _| {
        n += 1;
        true
    })
    .await?;
    Ok(n)
}

async fn run(
    kind: &Kind,
    state: &AppState,
    practice: &ResourceId,
    plan: &Plan,
    cursor: Option<&Cursor>,
) -> Result<Page, ApiError> {
    let base = query_for(kind, practice, plan);
    let backward = cursor.is_some_and(|c| c.backward);
    let mut query = base.clone();
    query.descending = plan.descending != backward;
    query.after = cursor.map(|c| (c.last_updated_us, c.id.clone()));
    let want = usize::try_from(plan.count).unwrap_or(0) + 1;
    let mut rows = if plan.count == 0 {
        Vec::new()
    } else {
        collect(state, plan, query, want).await?
    };
    let more = rows.len() == want;
    rows.truncate(want - 1);
    let (more_after, more_before) = if backward {
        rows.reverse();
        (true, more)
    } else {
        (more, cursor.is_some())
    };
    let total = if plan.total {
        Some(total(state, plan, &base).await?)
    } else {
        None
    };
    Ok(Page {
        rows,
        more_after,
        more_before,
        total,
    })
}

/// The resources matching a condition given as a query string (`If-None-Exist`), up to `limit`.
pub(crate) async fn find_matches(
    kind: &Kind,
    state: &AppState,
    practice: &ResourceId,
    condition: &str,
    limit: usize,
) -> Result<Vec<StoredVersion>, ApiError> {
    let params: Vec<(String, String)> = form_urlencoded::parse(condition.as_bytes())
        .into_owned()
        .collect();
    if params.is_empty() {
        return Err(ApiError::BadRequest(
            "If-None-Exist: expected search parameters".into(),
        ));
    }
    let mut plan = plan(kind, state.vault().await?, &params, false)?;
    plan.count = i64::try_from(limit).unwrap_or(2);
    let query = query_for(kind, practice, &plan);
    Ok(collect(state, &plan, query, limit)
        .await?
        .into_iter()
        .map(|(v, _)| v)
        .collect())
}

/// The resources that the page's `_include` parameters name, each once, as `include` entries
/// (deleted and missing targets are left out).
async fn included(
    state: &AppState,
    practice: &ResourceId,
    plan: &Plan,
    rows: &[(StoredVersion, Value)],
) -> Result<Vec<Value>, ApiError> {
    let mut entries = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for param in &plan.includes {
        let ParamKind::Reference { target, ids } = param.kind else {
            continue;
        };
        let mut wanted: Vec<String> = rows
            .iter()
            .flat_map(|(_, r)| ids(r))
            .filter(|id| !seen.contains(&(target, id.clone())))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            continue;
        }
        let query = ResourceQuery {
            practice: practice.clone(),
            resource_type: target.to_owned(),
            limit: i64::try_from(wanted.len()).unwrap_or(MAX_COUNT),
            conds: vec![Cond::Ids(wanted)],
            sort: SortKey::Id,
            descending: false,
            after: None,
        };
        let vault = state.vault().await?;
        for v in state.store.search_resources(&query).await? {
            let resource = parse_resource(vault, practice, &v)?;
            let full_url = format!("{}{FHIR_BASE}/{target}/{}", state.base_url, v.id);
            seen.insert((target, v.id));
            entries.push(json!({
                "fullUrl": full_url,
                "resource": resource,
                "search": { "mode": "include" },
            }));
        }
    }
    Ok(entries)
}

/// Search parameters of a `POST _search`, kept so its paging links need not carry them.
#[derive(Clone)]
pub struct SavedSearch {
    client_id: String,
    resource_type: &'static str,
    params: Arc<Vec<(String, String)>>,
    lenient: bool,
}

/// The saved `POST _search` parameter sets, 30 minutes each.
pub struct SavedSearches(moka::future::Cache<String, SavedSearch>);

impl Default for SavedSearches {
    fn default() -> Self {
        Self(
            moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(30 * 60))
                .build(),
        )
    }
}

fn lenient(req: &HttpRequest) -> bool {
    req.headers()
        .get_all("prefer")
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("handling=lenient"))
}

/// `GET /{type}?...` and `POST /{type}/_search` (form body, parameters of the query string
/// too).
pub(crate) async fn search(
    kind: &'static Kind,
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller(&req).map_err(|_| ApiError::Internal)?;
    let query_params: Vec<(String, String)> = form_urlencoded::parse(req.query_string().as_bytes())
        .into_owned()
        .collect();
    let get = |name: &str| {
        query_params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let cursor = match get("_cursor") {
        Some(c) => {
            Some(Cursor::decode(&c).ok_or_else(|| bad("_cursor", "not a cursor of this server"))?)
        }
        None => None,
    };
    // Where the parameters come from: a saved POST search, a POST body (saved now), or the URL.
    let (params, lenient, saved_key): (Vec<(String, String)>, bool, Option<String>) =
        if let Some(key) = get("_page") {
            let saved = state
                .saved_searches
                .0
                .get(&key)
                .await
                .filter(|s| {
                    s.client_id == caller.client_id && s.resource_type == kind.resource_type
                })
                .ok_or_else(|| ApiError::Gone("this search has expired; run it again".into()))?;
            ((*saved.params).clone(), saved.lenient, Some(key))
        } else if req.method() == actix_web::http::Method::POST {
            let mut params = query_params.clone();
            params.extend(form_urlencoded::parse(&body).into_owned());
            let lenient = lenient(&req);
            let key = uuid::Uuid::new_v4().simple().to_string();
            state
                .saved_searches
                .0
                .insert(
                    key.clone(),
                    SavedSearch {
                        client_id: caller.client_id.clone(),
                        resource_type: kind.resource_type,
                        params: Arc::new(params.clone()),
                        lenient,
                    },
                )
                .await;
            (params, lenient, Some(key))
        } else {
            (query_params.clone(), lenient(&req), None)
        };
    let plan = plan(kind, state.vault().await?, &params, lenient)?;
    for param in &plan.includes {
        if let ParamKind::Reference { target, .. } = param.kind {
            if !caller.scopes.allows(target, Permission::Read) {
                return Err(ApiError::Forbidden(format!(
                    "_include={}:{}: the token's scopes do not allow reading {target}",
                    kind.resource_type, param.name
                )));
            }
        }
    }
    let page = run(kind, &state, &caller.practice_id, &plan, cursor.as_ref()).await?;
    let included = included(&state, &caller.practice_id, &plan, &page.rows).await?;

    let base = format!("{}{FHIR_BASE}/{}", state.base_url, kind.resource_type);
    let link = |cursor: Option<Cursor>| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        match &saved_key {
            Some(key) => {
                s.append_pair("_page", key);
            }
            None => {
                for (k, v) in &plan.echo {
                    if k != "_count" {
                        s.append_pair(k, v);
                    }
                }
            }
        }
        s.append_pair("_count", &plan.count.to_string());
        if let Some(c) = cursor {
            s.append_pair("_cursor", &c.encode());
        }
        format!("{base}?{}", s.finish())
    };
    let mut links = vec![json!({ "relation": "self", "url": link(cursor.clone()) })];
    if page.more_after {
        if let Some((last, _)) = page.rows.last() {
            links.push(json!({ "relation": "next", "url": link(Some(Cursor::of(last, false))) }));
        }
    }
    if page.more_before {
        if let Some((first, _)) = page.rows.first() {
            links.push(
                json!({ "relation": "previous", "url": link(Some(Cursor::of(first, true))) }),
            );
        }
    }
    let entries: Vec<Value> = page
        .rows
        .into_iter()
        .map(|(v, resource)| {
            let mut entry = Map::with_capacity(3);
            entry.insert("fullUrl".into(), Value::String(format!("{base}/{}", v.id)));
            entry.insert("resource".into(), resource);
            entry.insert("search".into(), json!({ "mode": "match" }));
            Value::Object(entry)
        })
        .chain(included)
        .collect();
    let mut bundle = Map::new();
    bundle.insert("resourceType".into(), json!("Bundle"));
    bundle.insert("type".into(), json!("searchset"));
    if let Some(total) = page.total {
        bundle.insert("total".into(), json!(total));
    }
    bundle.insert("link".into(), Value::Array(links));
    if !entries.is_empty() {
        bundle.insert("entry".into(), Value::Array(entries));
    }
    crate::http::fhir_json(&req, StatusCode::OK, &Value::Object(bundle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_ranges_follow_the_precision_given() {
        let day = 86_400_000_000;
        let (l, h) = date_range_us("1970-01-02").unwrap();
        assert_eq!((l, h), (day, 2 * day));
        let (l, h) = date_range_us("1970").unwrap();
        assert_eq!((l, h), (0, 365 * day));
        let (l, h) = date_range_us("1970-02").unwrap();
        assert_eq!((l, h), (31 * day, 59 * day));
        let (l, h) = date_range_us("1970-12").unwrap();
        assert_eq!(h, 365 * day);
        assert_eq!(l, 334 * day);
        let (l, h) = date_range_us("1970-01-01T00:00:10Z").unwrap();
        assert_eq!((l, h), (10_000_000, 11_000_000));
        let (l, h) = date_range_us("1970-01-01T00:00:10.5Z").unwrap();
        assert_eq!((l, h), (10_500_000, 10_501_000));
        let (l, _) = date_range_us("1969-12-31").unwrap();
        assert_eq!(l, -day);
        for bad in [
            "1970-13",
            "1970-02-30",
            "19700101",
            "yesterday",
            "1970-1-1",
            "",
        ] {
            assert!(date_range_us(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn prefixes_follow_fhir_date_semantics() {
        let q = date_range_us("1980").unwrap();
        let born = |d: &str| date_range_us(d).unwrap();
        assert!(range_matches(Prefix::Eq, born("1980-06-01"), q));
        assert!(!range_matches(Prefix::Eq, born("1981-01-01"), q));
        assert!(range_matches(Prefix::Lt, born("1979-12-31"), q));
        assert!(!range_matches(Prefix::Lt, born("1980-01-01"), q));
        assert!(range_matches(Prefix::Gt, born("1981-01-01"), q));
        assert!(!range_matches(Prefix::Gt, born("1980-12-31"), q));
        assert!(range_matches(Prefix::Ge, born("1980-01-01"), q));
        assert!(!range_matches(Prefix::Ge, born("1979-12-31"), q));
        assert!(range_matches(Prefix::Le, born("1980-12-31"), q));
        assert!(!range_matches(Prefix::Le, born("1981-01-01"), q));
    }

    #[test]
    fn a_birth_year_over_89_years_back_is_aggregated() {
        let (low, high) = coarse_year("1930-05-01", 2026).unwrap();
        assert_eq!(low, AGGREGATED_LOW);
        assert_eq!(high, date_range_us("1937").unwrap().0 / 1_000_000);
        let (low, high) = coarse_year("1937-05-01", 2026).unwrap();
        let (l, h) = date_range_us("1937").unwrap();
        assert_eq!((low, high), (l / 1_000_000, h / 1_000_000));
    }

    #[test]
    fn a_cursor_round_trips_and_foreign_text_is_refused() {
        let c = Cursor {
            backward: true,
            last_updated_us: 1_700_000_000_123_456,
            id: "abc-1".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert!(Cursor::decode("bm90IGEgY3Vyc29y").is_none());
        assert!(Cursor::decode("!!").is_none());
    }
}
