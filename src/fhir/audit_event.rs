//! `AuditEvent` (read and search), the audit trail as FHIR, shaped after IHE Basic Audit Log
//! Patterns: `type` rest (or DICOM "User Authentication" for token requests), `subtype` the
//! RESTful interaction, the client as requesting agent with its network address, the gateway as
//! observer, the touched resource and patient as entities. Only the caller's practice's events
//! are visible; another practice's event is a plain 404 (and that attempt is itself audited).
//!
//! Resources are built as JSON and checked against the official R4 schema in the tests.

use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{Interaction, ResourceDef, SearchParamDef, FHIR_BASE};
use crate::audit::AuditRecord;
use crate::gate::{Caller, GateError};
use crate::http::{fhir_json, ApiError};
use crate::startup::AppState;
use crate::store::AuditQuery;

const DEFAULT_COUNT: i64 = 50;
const MAX_COUNT: i64 = 500;

pub fn resource() -> ResourceDef {
    let param = |name, kind, doc| SearchParamDef {
        name,
        kind,
        definition: None,
        documentation: Some(doc),
    };
    ResourceDef::new("AuditEvent")
        .interaction(Interaction::Read, read)
        .interaction(Interaction::SearchType, search)
        .search_param(param(
            "date",
            "date",
            "recorded; prefixes eq, ge, gt, le, lt",
        ))
        .search_param(param("patient", "reference", "Patient/{id} or {id}"))
        .search_param(param("agent", "reference", "the acting client id"))
        .search_param(param("action", "token", "C | R | U | D | E"))
}

fn caller(req: &HttpRequest) -> Result<Caller, GateError> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(GateError::MissingToken)
}

fn instant(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// FHIR AuditEvent.action for a recorded action.
fn action_code(action: &str) -> &'static str {
    match action {
        "create" => "C",
        "read" | "vread" | "history" | "ehr-read" | "ehr-search" | "ehr-export-download" => "R",
        "update" => "U",
        "delete" => "D",
        _ => "E",
    }
}

/// The recorded actions an AuditEvent.action code stands for.
fn actions_for(code: &str) -> Option<&'static str> {
    Some(match code {
        "C" => "create",
        "R" => "read,vread,history,ehr-read,ehr-search,ehr-export-download",
        "U" => "update",
        "D" => "delete",
        "E" => "search,export,token,access,webhook,sync,push,ehr-discovery,ehr-token,ehr-export-start,ehr-export-poll,ehr-push",
        _ => return None,
    })
}

fn subtype(action: &str) -> Option<&'static str> {
    Some(match action {
        "read" => "read",
        "vread" => "vread",
        "search" | "ehr-search" => "search-type",
        "ehr-read" => "read",
        "history" => "history-instance",
        "create" => "create",
        "update" => "update",
        "delete" => "delete",
        _ => return None,
    })
}

pub fn to_fhir(r: &AuditRecord) -> Value {
    let recorded = instant(r.recorded_at);
    let event_type = if r.action == "token" {
        json!({ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110114", "display": "User Authentication" })
    } else {
        json!({ "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation" })
    };
    let outcome = match r.status_code {
        // An outbound call that got no response (timeout, refused, circuit open).
        0 => "8",
        s if s < 400 => "0",
        s if s < 500 => "4",
        _ => "8",
    };
    let mut agent = json!({
        "type": { "coding": [{ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153", "display": "Source Role ID" }] },
        "requestor": true,
    });
    match (&r.actor_client_id, &r.connection_id) {
        (_, Some(connection)) => {
            // An outbound call: the gateway acted through one of its EHR connections.
            agent["who"] = json!({ "identifier": { "system": "urn:fhirgate:connection-id", "value": connection } });
        }
        (Some(client), None) => {
            agent["who"] =
                json!({ "identifier": { "system": "urn:fhirgate:client-id", "value": client } });
        }
        (None, None) => agent["who"] = json!({ "display": "unauthenticated client" }),
    }
    if let Some(role) = &r.actor_role {
        agent["role"] = json!([{ "coding": [{ "system": "urn:fhirgate:role", "code": role }] }]);
    }
    if let Some(ip) = &r.source_ip {
        // Network access point type 2: an IP address.
        agent["network"] = json!({ "address": ip, "type": "2" });
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": r.id,
        "meta": { "lastUpdated": recorded },
        "type": event_type,
        "action": action_code(&r.action),
        "recorded": recorded,
        "outcome": outcome,
        "outcomeDesc": match r.status_code {
            0 => "no response".to_owned(),
            s => format!("HTTP {s}"),
        },
        "agent": [agent],
        "source": {
            "observer": { "display": "fhirgate" },
            "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server" }],
        },
    });
    if let Some(code) = subtype(&r.action) {
        event["subtype"] =
            json!([{ "system": "http://hl7.org/fhir/restful-interaction", "code": code }]);
    }
    if let Some(ms) = r.duration_ms {
        // An outbound call's duration, as the period it took, ending when it was recorded.
        event["period"] = json!({
            "start": instant(r.recorded_at - time::Duration::milliseconds(ms)),
            "end": recorded,
        });
    }
    if let Some(purpose) = &r.purpose_of_use {
        event["purposeOfEvent"] = json!([{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose }] }]);
    }
    let mut entities = Vec::new();
    if let (Some(ty), Some(id)) = (&r.resource_type, &r.resource_id) {
        entities.push(json!({
            "what": { "reference": format!("{ty}/{id}") },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object" },
        }));
    }
    if let Some(patient) = &r.patient_id {
        entities.push(json!({
            "what": { "reference": format!("Patient/{patient}") },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person" },
            "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient" },
        }));
    }
    if let Some(request_id) = &r.request_id {
        entities.push(json!({
            "what": { "identifier": { "system": "urn:fhirgate:request-id", "value": request_id } },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "4", "display": "Other" },
        }));
    }
    if !entities.is_empty() {
        event["entity"] = Value::Array(entities);
    }
    event
}

/// `GET /fhir/r4/AuditEvent/{id}`.
async fn read(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = caller(&req)?;
    let record = state
        .store
        .get_audit_event(&caller.practice_id, &path.into_inner())
        .await
        .map_err(ApiError::from)?;
    Ok(fhir_json(&req, StatusCode::OK, &to_fhir(&record))?)
}

fn parse_time_bound(value: &str) -> Result<(String, OffsetDateTime, OffsetDateTime), ApiError> {
    let bad =
        || ApiError::BadRequest("date: expected [eq|ge|gt|le|lt]YYYY-MM-DD or an instant".into());
    let (prefix, rest) = match value.get(..2) {
        Some(p @ ("eq" | "ge" | "gt" | "le" | "lt")) => (p.to_owned(), &value[2..]),
        _ => ("eq".to_owned(), value),
    };
    // The bound is the interval the value denotes: a whole day, or one second.
    if let Ok(t) = OffsetDateTime::parse(rest, &Rfc3339) {
        return Ok((prefix, t, t + time::Duration::seconds(1)));
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let day = time::Date::parse(rest, &format).map_err(|_| bad())?;
    let start = day.midnight().assume_utc();
    Ok((prefix, start, start + time::Duration::days(1)))
}

/// Parses the search parameters into a query (unknown ones are refused unless the client asked
/// for lenient handling).
fn query_from(
    params: &[(String, String)],
    practice: crate::domain::ResourceId,
    lenient: bool,
) -> Result<(AuditQuery, Vec<(String, String)>), ApiError> {
    let mut q = AuditQuery {
        practice,
        since: None,
        until: None,
        patient: None,
        agent: None,
        actions: None,
        after_seq: 0,
        limit: DEFAULT_COUNT,
    };
    let mut echoed = Vec::new();
    for (key, value) in params {
        match key.as_str() {
            "date" => {
                let (prefix, start, end) = parse_time_bound(value)?;
                let (since, until) = match prefix.as_str() {
                    "eq" => (Some(start), Some(end)),
                    "ge" => (Some(start), None),
                    "gt" => (Some(end), None),
                    "le" => (None, Some(end)),
                    _ => (None, Some(start)), // lt
                };
                if let Some(s) = since {
                    q.since = Some(q.since.map_or(s, |cur| cur.max(s)));
                }
                if let Some(u) = until {
                    q.until = Some(q.until.map_or(u, |cur| cur.min(u)));
                }
            }
            "patient" => {
                let id = value.strip_prefix("Patient/").unwrap_or(value);
                crate::domain::ResourceId::parse("patient", id)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
                q.patient = Some(id.to_owned());
            }
            "agent" => q.agent = Some(value.clone()),
            "action" => {
                let actions: Vec<&str> = value
                    .split(',')
                    .map(|c| actions_for(c).ok_or_else(|| ApiError::BadRequest("action: expected C, R, U, D or E".into())))
                    .collect::<Result<_, _>>()?;
                q.actions = Some(actions.join(","));
            }
            "_count" => {
                let n: i64 = value
                    .parse()
                    .map_err(|_| ApiError::BadRequest("_count: expected a number".into()))?;
                q.limit = n.clamp(1, MAX_COUNT);
                continue;
            }
            "_cursor" => {
                q.after_seq = value
                    .parse()
                    .map_err(|_| ApiError::BadRequest("_cursor: not a cursor of this server".into()))?;
                continue;
            }
            "_format" | "_pretty" => continue,
            _ if lenient => continue,
            _ => {
                return Err(ApiError::BadRequest(
                    "unknown search parameter for AuditEvent (supported: date, patient, agent, action, _count); send Prefer: handling=lenient to ignore it".into(),
                ))
            }
        }
        echoed.push((key.clone(), value.clone()));
    }
    Ok((q, echoed))
}

/// `GET /fhir/r4/AuditEvent?...` and `POST /fhir/r4/AuditEvent/_search` (form body).
async fn search(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = caller(&req)?;
    let source: &[u8] = if req.method() == actix_web::http::Method::POST {
        &body
    } else {
        req.query_string().as_bytes()
    };
    let params: Vec<(String, String)> = form_urlencoded::parse(source).into_owned().collect();
    let lenient = req
        .headers()
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("handling=lenient"));
    let (query, echoed) = query_from(&params, caller.practice_id, lenient)?;
    let (records, total) = state
        .store
        .search_audit(&query)
        .await
        .map_err(ApiError::from)?;

    let base = format!("{}{FHIR_BASE}/AuditEvent", state.base_url);
    let encode = |extra: Option<(&str, String)>| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &echoed {
            s.append_pair(k, v);
        }
        s.append_pair("_count", &query.limit.to_string());
        if let Some((k, v)) = extra {
            s.append_pair(k, &v);
        }
        format!("{base}?{}", s.finish())
    };
    let mut links = vec![
        json!({ "relation": "self", "url": encode((query.after_seq > 0).then(|| ("_cursor", query.after_seq.to_string()))) }),
    ];
    if records.len() as i64 == query.limit {
        if let Some(last) = records.last() {
            links.push(json!({ "relation": "next", "url": encode(Some(("_cursor", last.chain_seq.to_string()))) }));
        }
    }
    let entries: Vec<Value> = records
        .iter()
        .map(|r| json!({ "fullUrl": format!("{base}/{}", r.id), "resource": to_fhir(r), "search": { "mode": "match" } }))
        .collect();
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
    });
    // FHIR JSON has no empty arrays: an empty page has no `entry` at all.
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(fhir_json(&req, StatusCode::OK, &bundle)?)
}
