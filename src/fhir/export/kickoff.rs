//! The kick-off request (Bulk Data export.html#bulk-data-kick-off-request): `GET` (parameters in
//! the query string) or `POST` (a Parameters resource) on `/$export`, `/Patient/$export` or
//! `/Group/{id}/$export`, with `Prefer: respond-async`. Answers 202 with the status URL in
//! `Content-Location`; every refusal is an OperationOutcome that never echoes a value sent.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use fhir_sdk::r4b::codes::{IssueSeverity, IssueType};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{ExportType, NDJSON, STATUS_PATH};
use crate::fhir::resources::{caller, now_us, parse_id};
use crate::fhir::FHIR_BASE;
use crate::gate::{Caller, GateError, Permission};
use crate::http::error::operation_outcome;
use crate::http::{fhir_json, ApiError};
use crate::startup::AppState;
use crate::store::{ExportLevel, NewExportJob};

/// `_outputFormat` values meaning NDJSON (the IG: servers SHALL accept all three).
const OUTPUT_FORMATS: &[&str] = &[NDJSON, "application/ndjson", "ndjson"];

/// Parameters of the IG this server does not implement: refused, unless the client said
/// `Prefer: handling=lenient` (export.html#query-parameters).
const UNSUPPORTED: &[&str] = &[
    "_elements",
    "_typeFilter",
    "patient",
    "includeAssociatedData",
    "organizeOutputBy",
    "allowPartialManifests",
];

/// `GET|POST /$export`.
pub(super) async fn system(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    kick_off(ExportLevel::System, req, body, state).await
}

/// `GET|POST /Patient/$export`.
pub(super) async fn patient(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    kick_off(ExportLevel::Patient, req, body, state).await
}

/// `GET|POST /Group/{id}/$export`.
pub(super) async fn group(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    kick_off(ExportLevel::Group, req, body, state).await
}

/// What a kick-off asked for, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Params {
    /// `_type`, in the order given (duplicates dropped).
    types: Option<Vec<String>>,
    since_us: Option<i64>,
    /// `_since` as given (normalised), for the manifest's `request`.
    since: Option<String>,
    output_format: Option<String>,
}

fn bad(text: &str) -> ApiError {
    ApiError::BadRequest(text.to_owned())
}

/// The tokens of the `Prefer` headers (`respond-async`, `handling=lenient`).
fn prefer_tokens(req: &HttpRequest) -> Vec<String> {
    req.headers()
        .get_all("prefer")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .map(|t| t.trim().replace(' ', ""))
        .filter(|t| !t.is_empty())
        .collect()
}

/// The (name, value) pairs of a kick-off: the query string, and for a POST the Parameters body.
fn raw_params(req: &HttpRequest, body: &[u8]) -> Result<Vec<(String, String)>, ApiError> {
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(req.query_string().as_bytes())
        .into_owned()
        .collect();
    if req.method() == actix_web::http::Method::POST && !body.iter().all(u8::is_ascii_whitespace) {
        let parameters: Value = serde_json::from_slice(body)
            .map_err(|_| bad("the body must be a FHIR Parameters resource (JSON)"))?;
        if parameters.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
            return Err(bad("the body must be a FHIR Parameters resource"));
        }
        for p in parameters
            .get("parameter")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice)
        {
            let name = p
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("every Parameters.parameter needs a name"))?;
            // A primitive value[x] of any type; anything else (valueReference...) is a
            // parameter this server does not take.
            let value = p
                .as_object()
                .into_iter()
                .flatten()
                .find(|(k, _)| k.starts_with("value"))
                .map(|(_, v)| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            pairs.push((name.to_owned(), value));
        }
    }
    Ok(pairs)
}

/// Parses the kick-off parameters. Unknown and unsupported ones are refused unless `lenient`.
fn parse_params(pairs: &[(String, String)], lenient: bool) -> Result<Params, ApiError> {
    let mut params = Params::default();
    for (name, value) in pairs {
        match name.as_str() {
            "_type" => {
                let types = params.types.get_or_insert_with(Vec::new);
                for t in value.split(',').map(str::trim) {
                    if t.is_empty() {
                        return Err(bad("_type: expected resource types separated by commas"));
                    }
                    if !types.iter().any(|have| have == t) {
                        types.push(t.to_owned());
                    }
                }
            }
            "_since" => {
                if params.since.is_some() {
                    return Err(bad("_since: give it once"));
                }
                // A `+` of a time zone offset arrives as a space when the client did not
                // percent-encode it.
                let text = value.trim().replace(' ', "+");
                let instant = OffsetDateTime::parse(&text, &Rfc3339)
                    .ok()
                    .filter(|_| text.len() >= 20 && text.as_bytes().get(10) == Some(&b'T'))
                    .ok_or_else(|| {
                        bad("_since: expected a FHIR instant, such as 2026-01-31T14:00:00Z")
                    })?;
                params.since_us = Some(
                    i64::try_from(instant.unix_timestamp_nanos() / 1_000)
                        .map_err(|_| bad("_since: out of range"))?,
                );
                params.since = Some(text);
            }
            "_outputFormat" => {
                let format = value.trim().replace(' ', "+");
                if !OUTPUT_FORMATS.contains(&format.as_str()) {
                    return Err(bad(
                        "_outputFormat: this server writes application/fhir+ndjson only \
                         (also accepted as application/ndjson or ndjson)",
                    ));
                }
                params.output_format = Some(format);
            }
            // Response format of the kick-off itself: content negotiation's business.
            "_format" | "_pretty" => {}
            _ if lenient => {}
            other if UNSUPPORTED.contains(&other) => {
                return Err(bad(
                    "this export parameter is not supported (supported: _type, _since, \
                     _outputFormat); send Prefer: handling=lenient to have it ignored",
                ))
            }
            _ => {
                return Err(bad(
                    "unknown export parameter (supported: _type, _since, _outputFormat); send \
                     Prefer: handling=lenient to have it ignored",
                ))
            }
        }
    }
    Ok(params)
}

/// Whether the caller may export a type: read and search it (SMART v1 `read`, v2 `rs`).
fn may_export(caller: &Caller, ty: &ExportType) -> bool {
    caller.scopes.allows(ty.name(), Permission::Read)
        && caller.scopes.allows(ty.name(), Permission::Search)
}

/// The types to export at `level`, in export order: those `_type` lists (each must be exported
/// at this level, 400, and allowed to the caller, 403) or, without `_type`, every type of the
/// level the caller may export (403 when that is none).
fn types_to_export(
    all: &[ExportType],
    level: ExportLevel,
    requested: Option<&[String]>,
    caller: &Caller,
) -> Result<Vec<ExportType>, actix_web::Error> {
    let at_level = |t: &ExportType| level == ExportLevel::System || t.in_patient_compartment();
    let exported = || {
        all.iter()
            .filter(|t| at_level(t))
            .map(ExportType::name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let denied = |t: &ExportType| -> actix_web::Error {
        GateError::InsufficientScope {
            resource: t.name(),
            permission: "read and search",
        }
        .into()
    };
    match requested {
        Some(names) => {
            let mut chosen = Vec::with_capacity(names.len());
            for name in names {
                let ty = all
                    .iter()
                    .find(|t| t.name() == name && at_level(t))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "_type: a listed type is not exported {} (exported: {})",
                            match level {
                                ExportLevel::System => "by this server",
                                _ => "at this level, which holds the patient compartment",
                            },
                            exported()
                        ))
                    })?;
                if !may_export(caller, ty) {
                    return Err(denied(ty));
                }
                chosen.push(*ty);
            }
            // Export order is the server's, whatever order `_type` used.
            chosen.sort_by_key(|t| all.iter().position(|a| a.name() == t.name()));
            Ok(chosen)
        }
        None => {
            let chosen: Vec<ExportType> = all
                .iter()
                .filter(|t| at_level(t) && may_export(caller, t))
                .copied()
                .collect();
            match (chosen.is_empty(), all.iter().find(|t| at_level(t))) {
                (true, Some(first)) => Err(denied(first)),
                (true, None) => Err(bad("there is nothing to export at this level").into()),
                (false, _) => Ok(chosen),
            }
        }
    }
}

async fn kick_off(
    level: ExportLevel,
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = caller(&req).map_err(|_| ApiError::Internal)?;
    let prefer = prefer_tokens(&req);
    if !prefer.iter().any(|t| t == "respond-async") {
        return Err(bad("a bulk export runs asynchronously: send Prefer: respond-async").into());
    }
    let lenient = prefer.iter().any(|t| t == "handling=lenient");
    let params = parse_params(&raw_params(&req, &body)?, lenient)?;
    let exports = &state.exports;
    let types = types_to_export(exports.types(), level, params.types.as_deref(), &caller)?;

    let group_id = match level {
        ExportLevel::Group => {
            let id = parse_id(req.match_info().get("id").unwrap_or_default())?;
            let group = state
                .store
                .read_resource(&caller.practice_id, "Group", id.as_str(), None)
                .await
                .map_err(ApiError::from)?;
            if group.is_none_or(|g| g.deleted) {
                return Err(ApiError::NotFound("Group not found".into()).into());
            }
            Some(id.to_string())
        }
        _ => None,
    };

    let job_id = uuid::Uuid::new_v4().simple().to_string();
    let now = now_us();
    let job = NewExportJob {
        id: job_id.clone(),
        practice: caller.practice_id.clone(),
        client_id: caller.client_id.clone(),
        level,
        group_id,
        types: types.iter().map(|t| t.name().to_owned()).collect(),
        since_us: params.since_us,
        transaction_time_us: now,
        request_url: request_url(&state.base_url, &req, &params),
        created_us: now,
    };
    state
        .store
        .exports()
        .create_export_job(&job)
        .await
        .map_err(ApiError::from)?;
    exports.spawn(state.clone(), caller.practice_id.clone(), job_id.clone());
    tracing::info!(job = %job_id, level = level.as_str(), types = types.len(), "export accepted");

    let outcome = operation_outcome(
        IssueSeverity::Information,
        IssueType::Informational,
        "export accepted; poll the Content-Location URL for its status",
    );
    let mut res = fhir_json(&req, StatusCode::ACCEPTED, &outcome)?;
    let location = format!(
        "{}{FHIR_BASE}{}",
        state.base_url,
        STATUS_PATH.replace("{id}", &job_id)
    );
    if let Ok(value) = header::HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::CONTENT_LOCATION, value);
    }
    Ok(res)
}

/// The manifest's `request`: the kick-off URL with only the parameters understood (an ignored
/// one could carry anything, PHI included, and the URL is stored). A POST's parameters are in
/// its body, so its URL has none (export.html#response---complete-status).
fn request_url(base_url: &str, req: &HttpRequest, params: &Params) -> String {
    let mut url = format!("{base_url}{}", req.path());
    if req.method() == actix_web::http::Method::POST {
        return url;
    }
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(types) = &params.types {
        query.append_pair("_type", &types.join(","));
    }
    if let Some(since) = &params.since {
        query.append_pair("_since", since);
    }
    if let Some(format) = &params.output_format {
        query.append_pair("_outputFormat", format);
    }
    let query = query.finish();
    if !query.is_empty() {
        url.push('?');
        url.push_str(&query);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_three_spellings_of_ndjson_are_accepted_and_nothing_else() {
        for ok in [
            "application/fhir+ndjson",
            "application/fhir ndjson",
            "application/ndjson",
            "ndjson",
        ] {
            assert!(
                parse_params(&pairs(&[("_outputFormat", ok)]), false).is_ok(),
                "{ok}"
            );
        }
        for refused in ["application/fhir+json", "csv", ""] {
            assert!(parse_params(&pairs(&[("_outputFormat", refused)]), false).is_err());
        }
    }

    #[test]
    fn since_must_be_a_full_instant() {
        let p = parse_params(&pairs(&[("_since", "2026-01-31T14:00:00.5+01:00")]), false).unwrap();
        assert_eq!(p.since_us, Some(1_769_864_400_500_000));
        // An unencoded `+` arrives as a space.
        let p = parse_params(&pairs(&[("_since", "2026-01-31T14:00:00 01:00")]), false).unwrap();
        assert_eq!(p.since.as_deref(), Some("2026-01-31T14:00:00+01:00"));
        for refused in [
            "2026-01-31",
            "2026-01-31T14:00",
            "yesterday",
            "2026-01-31T14:00:00",
        ] {
            assert!(
                parse_params(&pairs(&[("_since", refused)]), false).is_err(),
                "{refused}"
            );
        }
    }

    #[test]
    fn types_are_listed_once_in_order() {
        let p = parse_params(
            &pairs(&[("_type", "Group,Patient"), ("_type", "Patient")]),
            false,
        )
        .unwrap();
        assert_eq!(p.types.unwrap(), ["Group", "Patient"]);
        assert!(parse_params(&pairs(&[("_type", "Patient,,Group")]), false).is_err());
    }

    #[test]
    fn unknown_and_unsupported_parameters_are_refused_unless_lenient() {
        for name in ["_typeFilter", "_elements", "patient", "bogus"] {
            let given = pairs(&[(name, "x")]);
            let err = parse_params(&given, false).unwrap_err().to_string();
            assert!(!err.contains(": x"), "the value is not echoed: {err}");
            assert_eq!(parse_params(&given, true).unwrap(), Params::default());
        }
    }
}
