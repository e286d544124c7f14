//! The practice's data as FHIR R4 resources: read, vread, create, update (with `If-Match`),
//! conditional create (`If-None-Exist`), soft delete, instance history and search, for every
//! resource type described by a [`Kind`].
//!
//! What a client writes is what it reads back: the resource's own JSON is stored (numbers kept
//! digit for digit by serde_json's `arbitrary_precision`), with only `id`, `meta.versionId` and
//! `meta.lastUpdated` set by the server. Each version is sealed with AES-256-GCM before it
//! reaches the store; search parameters that are PHI are indexed only as keyed blind indexes.
//! Writes commit with their audit event in one transaction.

pub mod bulk;
pub mod care;
pub mod fields;
pub mod group;
pub mod patient;
pub mod practice;
pub mod search;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::{Interaction, ResourceDef, SearchParamDef, FHIR_BASE};
use crate::audit::middleware::{request_event, AuditedInTransaction};
use crate::audit::Action;
use crate::crypto::{PhiVault, VersionRef};
use crate::domain::{new_resource_id, ResourceId};
use crate::gate::{Caller, GateError};
use crate::http::respond::Pretty;
use crate::http::{ApiError, FHIR_JSON};
use crate::startup::AppState;
use crate::store::{Expect, ResourceWrite, StoreError, StoredVersion};

pub use search::{Param, ParamKind};

/// How the gateway handles one resource type: its search parameters, how a resource of the
/// type is indexed, and which patient it concerns (for the audit trail).
pub struct Kind {
    pub resource_type: &'static str,
    /// Search parameters; they also say how a resource of the type is indexed.
    pub params: &'static [Param],
    /// The id of the patient the resource is about (`id` is the resource's own id).
    pub patient: fn(&Value, &str) -> Option<String>,
}

/// Every resource type served through this module, in the CapabilityStatement's order.
pub static KINDS: &[&Kind] = &[
    &patient::PATIENT,
    &practice::PRACTITIONER,
    &practice::ORGANIZATION,
    &care::COVERAGE,
    &care::ENCOUNTER,
    &care::CLAIM,
    &care::CLAIM_RESPONSE,
    &group::GROUP,
];

/// The kind of a resource type, if the gateway serves it.
pub fn kind_of(resource_type: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .copied()
        .find(|k| k.resource_type == resource_type)
}

/// Registers every interaction of `kind`.
pub fn resource_def(kind: &'static Kind) -> ResourceDef {
    let mut def = ResourceDef::new(kind.resource_type)
        .stored_as(kind)
        .versioned()
        .interaction(
            Interaction::Read,
            move |req: HttpRequest, state: web::Data<AppState>| read(kind, req, state, None),
        )
        .interaction(
            Interaction::Vread,
            move |req: HttpRequest, state: web::Data<AppState>| {
                let vid = req.match_info().get("vid").map(str::to_owned);
                read(kind, req, state, Some(vid.unwrap_or_default()))
            },
        )
        .interaction(
            Interaction::Create,
            move |req: HttpRequest, body: web::Bytes, state: web::Data<AppState>| {
                create(kind, req, body, state)
            },
        )
        .interaction(
            Interaction::Update,
            move |req: HttpRequest, body: web::Bytes, state: web::Data<AppState>| {
                update(kind, req, body, state)
            },
        )
        .interaction(
            Interaction::Delete,
            move |req: HttpRequest, state: web::Data<AppState>| delete(kind, req, state),
        )
        .interaction(
            Interaction::HistoryInstance,
            move |req: HttpRequest, state: web::Data<AppState>| history(kind, req, state),
        )
        .interaction(
            Interaction::SearchType,
            move |req: HttpRequest, body: web::Bytes, state: web::Data<AppState>| {
                search::search(kind, req, body, state)
            },
        );
    for (name, kind, doc) in [
        ("_id", "token", "one or more ids, comma separated"),
        ("_lastUpdated", "date", "prefixes eq, lt, gt, le, ge"),
    ] {
        def = def.search_param(SearchParamDef {
            name,
            kind,
            definition: None,
            documentation: Some(doc),
        });
    }
    for param in kind.params {
        def = def.search_param(SearchParamDef {
            name: param.name,
            kind: param.kind.fhir_type(),
            definition: None,
            documentation: Some(param.doc),
        });
        if let ParamKind::Reference { .. } = param.kind {
            def = def.search_include(format!("{}:{}", kind.resource_type, param.name));
        }
    }
    def
}

pub(crate) fn caller(req: &HttpRequest) -> Result<Caller, GateError> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(GateError::MissingToken)
}

/// The current time in microseconds since the Unix epoch (what `last_updated_us` stores).
pub(crate) fn now_us() -> i64 {
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos / 1_000).unwrap_or(i64::MAX)
}

/// A FHIR instant with microseconds, `2026-11-25T10:15:30.123456Z`.
pub(crate) fn instant(us: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.format(&format).unwrap_or_default()
}

fn http_date(us: i64) -> header::HttpDate {
    let secs = u64::try_from(us / 1_000_000).unwrap_or(0);
    header::HttpDate::from(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

pub(crate) fn etag(version_id: i64) -> String {
    format!("W/\"{version_id}\"")
}

/// The version an `If-Match` header names: `W/"3"` (or `"3"`, which some clients send).
pub(crate) fn if_match(req: &HttpRequest) -> Result<Option<i64>, ApiError> {
    let Some(value) = req.headers().get(header::IF_MATCH) else {
        return Ok(None);
    };
    let bad = || ApiError::BadRequest("If-Match: expected a version ETag such as W/\"3\"".into());
    let text = value.to_str().map_err(|_| bad())?.trim();
    let quoted = text.strip_prefix("W/").unwrap_or(text);
    let version = quoted
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .ok_or_else(bad)?;
    version.parse::<i64>().map(Some).map_err(|_| bad())
}

/// What the client asked to get back (`Prefer: return=...`, FHIR R4 http.html#ops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

pub(crate) fn prefer_return(req: &HttpRequest) -> Return {
    let prefer = req
        .headers()
        .get_all("prefer")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .map(str::trim);
    for token in prefer {
        match token {
            "return=minimal" => return Return::Minimal,
            "return=OperationOutcome" => return Return::OperationOutcome,
            "return=representation" => return Return::Representation,
            _ => {}
        }
    }
    Return::Representation
}

pub(crate) fn parse_id(value: &str) -> Result<ResourceId, ApiError> {
    ResourceId::parse("id", value).map_err(|e| ApiError::NotFound(e.to_string()))
}

fn version_ref<'a>(practice: &'a ResourceId, v: &'a StoredVersion) -> VersionRef<'a> {
    VersionRef {
        practice_id: practice.as_str(),
        resource_type: &v.resource_type,
        id: &v.id,
        version_id: v.version_id,
    }
}

/// Opens a stored version's JSON. A version that does not open is a fault of ours (a missing
/// key, a tampered row): 500, logged without content.
pub(crate) fn open_json(
    vault: &PhiVault,
    practice: &ResourceId,
    v: &StoredVersion,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ApiError> {
    let sealed = v.content.as_deref().ok_or(ApiError::Internal)?;
    vault.open(version_ref(practice, v), sealed).map_err(|e| {
        tracing::error!(error = %e, resource_type = %v.resource_type, "stored resource does not open");
        ApiError::Internal
    })
}

/// A response carrying a resource's JSON, pretty-printed on request.
fn resource_response(
    req: &HttpRequest,
    status: StatusCode,
    json: &[u8],
) -> Result<HttpResponse, ApiError> {
    let body = if req.extensions().get::<Pretty>().is_some() {
        let value: Value = serde_json::from_slice(json).map_err(|_| ApiError::Internal)?;
        serde_json::to_vec_pretty(&value).map_err(|_| ApiError::Internal)?
    } else {
        json.to_vec()
    };
    Ok(HttpResponse::build(status)
        .insert_header((header::CONTENT_TYPE, FHIR_JSON))
        .body(body))
}

fn version_headers(res: &mut HttpResponse, v: &StoredVersion) {
    let headers = res.headers_mut();
    if let Ok(value) = header::HeaderValue::from_str(&etag(v.version_id)) {
        headers.insert(header::ETAG, value);
    }
    if let Ok(value) = header::HeaderValue::from_str(&http_date(v.last_updated_us).to_string()) {
        headers.insert(header::LAST_MODIFIED, value);
    }
}

/// `GET /{type}/{id}` and `GET /{type}/{id}/_history/{vid}`.
async fn read(
    kind: &'static Kind,
    req: HttpRequest,
    state: web::Data<AppState>,
    vid: Option<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller(&req).map_err(|_| ApiError::Internal)?;
    let id = parse_id(req.match_info().get("id").unwrap_or_default())?;
    let version = match vid {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .map_err(|_| ApiError::NotFound("no such version".into()))?,
        ),
    };
    let stored = state
        .store
        .read_resource(
            &caller.practice_id,
            kind.resource_type,
            id.as_str(),
            version,
        )
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{} not found", kind.resource_type)))?;
    if stored.deleted {
        let mut res = actix_web::ResponseError::error_response(&ApiError::Gone(format!(
            "this {} was deleted",
            kind.resource_type
        )));
        version_headers(&mut res, &stored);
        return Ok(res);
    }
    let json = open_json(state.vault().await?, &caller.practice_id, &stored)?;
    let mut res = resource_response(&req, StatusCode::OK, &json)?;
    version_headers(&mut res, &stored);
    Ok(res)
}

/// Parses a request body as a JSON resource of `kind` and checks it: JSON, `resourceType`,
/// and the structure of the type.
pub(crate) fn parse_body(kind: &Kind, body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::Invalid {
        status: 400,
        issues: vec![serde_json::json!({
            "severity": "error",
            "code": "structure",
            "diagnostics": format!("the body is not JSON (line {}, column {})", e.line(), e.column()),
        })],
    })?;
    check_resource(kind, value).map_err(|issues| ApiError::Invalid {
        status: 400,
        issues,
    })
}

/// Checks a resource of `kind` (see [`super::validate`]); the problems as OperationOutcome
/// issues, each naming its element.
pub(crate) fn check_resource(kind: &Kind, value: Value) -> Result<Map<String, Value>, Vec<Value>> {
    super::validate::validate(kind.resource_type, &value).map_err(|issues| {
        issues
            .iter()
            .map(|i| i.to_outcome_issue())
            .collect::<Vec<_>>()
    })?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(vec![serde_json::json!({
            "severity": "error",
            "code": "structure",
            "diagnostics": "a resource must be a JSON object",
        })]),
    }
}

/// The resource as stored: `resourceType`, `id` and `meta` first (with the server's versionId
/// and lastUpdated; other meta elements kept), then the client's elements in their order.
fn stamp(
    kind: &Kind,
    mut body: Map<String, Value>,
    id: &str,
    version_id: i64,
    last_updated_us: i64,
) -> Map<String, Value> {
    // shift_remove keeps the order of the other elements (remove would swap the last one in).
    let mut meta = match body.shift_remove("meta") {
        Some(Value::Object(meta)) => meta,
        _ => Map::new(),
    };
    meta.shift_remove("versionId");
    meta.shift_remove("lastUpdated");
    let mut stamped_meta = Map::with_capacity(meta.len() + 2);
    stamped_meta.insert("versionId".into(), Value::String(version_id.to_string()));
    stamped_meta.insert(
        "lastUpdated".into(),
        Value::String(instant(last_updated_us)),
    );
    stamped_meta.extend(meta);
    body.shift_remove("resourceType");
    body.shift_remove("id");
    let mut out = Map::with_capacity(body.len() + 3);
    out.insert(
        "resourceType".into(),
        Value::String(kind.resource_type.into()),
    );
    out.insert("id".into(), Value::String(id.into()));
    out.insert("meta".into(), Value::Object(stamped_meta));
    out.extend(body);
    out
}

/// A new version ready to write, with the JSON it holds.
pub(crate) struct Prepared {
    pub(crate) write: ResourceWrite,
    pub(crate) json: Vec<u8>,
    pub(crate) patient: Option<String>,
}

pub(crate) fn prepare(
    kind: &Kind,
    vault: &PhiVault,
    practice: &ResourceId,
    body: Map<String, Value>,
    id: &str,
    expect: Expect,
) -> Result<Prepared, ApiError> {
    let version_id = match expect {
        Expect::Absent => 1,
        Expect::Version(v) => v + 1,
    };
    let last_updated_us = now_us();
    let resource = Value::Object(stamp(kind, body, id, version_id, last_updated_us));
    let json = serde_json::to_vec(&resource).map_err(|_| ApiError::Internal)?;
    let at = VersionRef {
        practice_id: practice.as_str(),
        resource_type: kind.resource_type,
        id,
        version_id,
    };
    let sealed = vault.seal(at, &json);
    Ok(Prepared {
        write: ResourceWrite {
            resource_type: kind.resource_type.to_owned(),
            id: id.to_owned(),
            expect,
            version_id,
            last_updated_us,
            sealed: Some(sealed),
            index: search::index_rows(kind, &resource, vault),
        },
        patient: (kind.patient)(&resource, id),
        json,
    })
}

/// Writes one prepared version with its audit event and what it changes of claims (a
/// ClaimResponse's lifecycle steps and outbox rows; see `sync::outbox`), all in the same
/// transaction, and marks the request audited.
async fn commit(
    state: &AppState,
    req: &HttpRequest,
    practice: &ResourceId,
    prepared: &Prepared,
    action: Action,
    status: StatusCode,
    claims: &crate::sync::outbox::rows::ClaimChanges,
) -> Result<(), StoreError> {
    let mut event = request_event(req, status);
    event.action = Some(action);
    event.resource_type = Some(prepared.write.resource_type.clone());
    event.resource_id = Some(prepared.write.id.clone());
    event.patient_id = prepared.patient.clone();
    let audit = if state.skip_audit {
        vec![]
    } else {
        let mut events = claims.audit_events(|claim, patient| {
            let mut moved = event.clone();
            moved.action = Some(Action::Update);
            moved.resource_type = Some("Claim".into());
            moved.resource_id = Some(claim.to_owned());
            moved.patient_id = patient;
            moved
        });
        events.insert(0, event);
        events
    };
    state
        .store
        .write_resources_with_claims(
            practice,
            std::slice::from_ref(&prepared.write),
            &audit,
            claims.effects(),
        )
        .await?;
    req.extensions_mut().insert(AuditedInTransaction);
    if !claims.outbox.is_empty() {
        state.outbox.written();
    }
    Ok(())
}

/// The response to a write, as `Prefer: return` asks.
fn write_response(
    req: &HttpRequest,
    state: &AppState,
    kind: &Kind,
    status: StatusCode,
    prepared: &Prepared,
) -> Result<HttpResponse, ApiError> {
    let w = &prepared.write;
    let location = format!(
        "{}{FHIR_BASE}/{}/{}/_history/{}",
        state.base_url, kind.resource_type, w.id, w.version_id
    );
    let mut res = match prefer_return(req) {
        Return::Representation => resource_response(req, status, &prepared.json)?,
        Return::Minimal => HttpResponse::build(status).finish(),
        Return::OperationOutcome => {
            let outcome = crate::http::error::operation_outcome(
                fhir_sdk::r4b::codes::IssueSeverity::Information,
                fhir_sdk::r4b::codes::IssueType::Informational,
                format!(
                    "{} {} version {}",
                    kind.resource_type,
                    if status == StatusCode::CREATED {
                        "created"
                    } else {
                        "updated"
                    },
                    w.version_id
                ),
            );
            crate::http::fhir_json(req, status, &outcome)?
        }
    };
    let stored = StoredVersion {
        resource_type: w.resource_type.clone(),
        id: w.id.clone(),
        version_id: w.version_id,
        last_updated_us: w.last_updated_us,
        deleted: false,
        content: None,
    };
    version_headers(&mut res, &stored);
    if let Ok(value) = header::HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, value);
        if status == StatusCode::CREATED {
            if let Ok(value) = header::HeaderValue::from_str(&location) {
                res.headers_mut().insert(header::CONTENT_LOCATION, value);
            }
        }
    }
    Ok(res)
}

/// `POST /{type}`: create with a server-assigned id; with `If-None-Exist`, a conditional create
/// (200 with the match, 412 when several match).
async fn create(
    kind: &'static Kind,
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller(&req).map_err(|_| ApiError::Internal)?;
    let resource = parse_body(kind, &body)?;
    // Held until the create commits, so two identical conditional creates on this instance
    // cannot both find nothing and both create.
    let mut _serialised = None;
    if let Some(condition) = req.headers().get("if-none-exist") {
        let condition = condition.to_str().map_err(|_| {
            ApiError::BadRequest("If-None-Exist: expected search parameters".into())
        })?;
        _serialised = Some(
            conditional_lock(&caller.practice_id, kind.resource_type, condition)
                .lock_owned()
                .await,
        );
        let matches = search::find_matches(kind, &state, &caller.practice_id, condition, 2).await?;
        match matches.as_slice() {
            [] => {}
            [one] => {
                let json = open_json(state.vault().await?, &caller.practice_id, one)?;
                let mut res = match prefer_return(&req) {
                    Return::Minimal => HttpResponse::Ok().finish(),
                    _ => resource_response(&req, StatusCode::OK, &json)?,
                };
                version_headers(&mut res, one);
                let location = format!(
                    "{}{FHIR_BASE}/{}/{}/_history/{}",
                    state.base_url, kind.resource_type, one.id, one.version_id
                );
                if let Ok(value) = header::HeaderValue::from_str(&location) {
                    res.headers_mut().insert(header::LOCATION, value);
                }
                return Ok(res);
            }
            _ => {
                return Err(ApiError::PreconditionFailed(
                    "If-None-Exist: more than one resource matches".into(),
                ))
            }
        }
    }
    let id = new_resource_id();
    let prepared = prepare(
        kind,
        state.vault().await?,
        &caller.practice_id,
        resource,
        id.as_str(),
        Expect::Absent,
    )?;
    let outbox =
        crate::sync::outbox::rows::for_fhir_writes(&state, &caller.practice_id, &[&prepared])
            .await?;
    commit(
        &state,
        &req,
        &caller.practice_id,
        &prepared,
        Action::Create,
        StatusCode::CREATED,
        &outbox,
    )
    .await?;
    write_response(&req, &state, kind, StatusCode::CREATED, &prepared)
}

/// The lock that serialises conditional creates of one condition on one practice's type within
/// this instance. Keyed by a hash (the condition may carry PHI); entries live while held.
pub(crate) fn conditional_lock(
    practice: &ResourceId,
    resource_type: &str,
    condition: &str,
) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    lock_for(conditional_key(practice, resource_type, condition))
}

/// The key of a condition: the same for the same parameters in any order.
pub(crate) fn conditional_key(
    practice: &ResourceId,
    resource_type: &str,
    condition: &str,
) -> [u8; 32] {
    use sha2::Digest;
    let mut params: Vec<(String, String)> = form_urlencoded::parse(condition.as_bytes())
        .into_owned()
        .collect();
    params.sort();
    let mut hash = sha2::Sha256::new();
    for part in [practice.as_str(), resource_type] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    for (k, v) in &params {
        hash.update(k.as_bytes());
        hash.update([0]);
        hash.update(v.as_bytes());
        hash.update([0]);
    }
    hash.finalize().into()
}

pub(crate) fn lock_for(key: [u8; 32]) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    use std::sync::{Arc, LazyLock, Mutex, Weak};
    type Locks = Mutex<std::collections::HashMap<[u8; 32], Weak<tokio::sync::Mutex<()>>>>;
    static LOCKS: LazyLock<Locks> = LazyLock::new(Default::default);
    let mut locks = LOCKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(lock) = locks.get(&key).and_then(Weak::upgrade) {
        return lock;
    }
    locks.retain(|_, weak| weak.strong_count() > 0);
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    locks.insert(key, Arc::downgrade(&lock));
    lock
}

/// `PUT /{type}/{id}`: a new version; creates the resource when the id is new (the client
/// chooses ids within its practice). `If-Match: W/"n"` makes it conditional on version n (412
/// otherwise). Without `If-Match`, a concurrent write is retried on the newer version.
async fn update(
    kind: &'static Kind,
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller(&req).map_err(|_| ApiError::Internal)?;
    let id = parse_id(req.match_info().get("id").unwrap_or_default())?;
    let expected = if_match(&req)?;
    let resource = parse_body(kind, &body)?;
    match resource.get("id") {
        Some(Value::String(body_id)) if body_id == id.as_str() => {}
        Some(_) => {
            return Err(ApiError::BadRequest(
                "the id in the body differs from the id in the URL".into(),
            ))
        }
        None => {
            return Err(ApiError::BadRequest(
                "an update must carry the resource's id in the body".into(),
            ))
        }
    }
    for _attempt in 0..3 {
        let head = state
            .store
            .read_resource(&caller.practice_id, kind.resource_type, id.as_str(), None)
            .await?;
        let expect = match (&head, expected) {
            (Some(h), Some(v)) if h.version_id != v => {
                return Err(ApiError::PreconditionFailed(format!(
                    "If-Match: the current version is {}",
                    h.version_id
                )))
            }
            (None, Some(_)) => {
                return Err(ApiError::PreconditionFailed(
                    "If-Match: the resource does not exist".into(),
                ))
            }
            (Some(h), _) => Expect::Version(h.version_id),
            (None, None) => Expect::Absent,
        };
        let created = expect == Expect::Absent;
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let prepared = prepare(
            kind,
            state.vault().await?,
            &caller.practice_id,
            resource.clone(),
            id.as_str(),
            expect,
        )?;
        let action = if created {
            Action::Create
        } else {
            Action::Update
        };
        let outbox =
            crate::sync::outbox::rows::for_fhir_writes(&state, &caller.practice_id, &[&prepared])
                .await?;
        match commit(
            &state,
            &req,
            &caller.practice_id,
            &prepared,
            action,
            status,
            &outbox,
        )
        .await
        {
            Ok(()) => return write_response(&req, &state, kind, status, &prepared),
            Err(StoreError::VersionConflict { .. }) if expected.is_some() => {
                return Err(ApiError::PreconditionFailed(
                    "If-Match: the resource was changed by another request".into(),
                ))
            }
            Err(StoreError::VersionConflict { .. }) => continue,
            Err(other) => return Err(other.into()),
        }
    }
    Err(StoreError::VersionConflict { index: 0 }.into())
}

/// `DELETE /{type}/{id}`: a new, deleted version (the history stays for the audit trail); a
/// later read answers 410. Deleting a deleted resource is a no-op; an unknown one is 404.
async fn delete(
    kind: &'static Kind,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller(&req).map_err(|_| ApiError::Internal)?;
    let id = parse_id(req.match_info().get("id").unwrap_or_default())?;
    let expected = if_match(&req)?;
    for _attempt in 0..3 {
        let head = state
            .store
            .read_resource(&caller.practice_id, kind.resource_type, id.as_str(), None)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("{} not found", kind.resource_type)))?;
        if expected.is_some_and(|v| v != head.version_id) {
            return Err(ApiError::PreconditionFailed(format!(
                "If-Match: the current version is {}",
                head.version_id
            )));
        }
        if head.deleted {
            return Ok(HttpResponse::NoContent().finish());
        }
        let prepared = deletion(kind, &state, &caller.practice_id, &head).await?;
        match commit(
            &state,
            &req,
            &caller.practice_id,
            &prepared,
            Action::Delete,
            StatusCode::NO_CONTENT,
            &Default::default(),
        )
        .await
        {
            Ok(()) => {
                let mut res = HttpResponse::NoContent().finish();
                if let Ok(value) = header::HeaderValue::from_str(&etag(prepared.write.version_id)) {
                    res.headers_mut().insert(header::ETAG, value);
                }
                return Ok(res);
            }
            Err(StoreError::VersionConflict { .. }) if expected.is_none() => continue,
            Err(StoreError::VersionConflict { .. }) => {
                return Err(ApiError::PreconditionFailed(
                    "If-Match: the resource was changed by another request".into(),
                ))
            }
            Err(other) => return Err(other.into()),
        }
    }
    Err(StoreError::VersionConflict { index: 0 }.into())
}

/// The deleted version that follows `head` (a live version), with the patient it concerned.
pub(crate) async fn deletion(
    kind: &Kind,
    state: &AppState,
    practice: &ResourceId,
    head: &StoredVersion,
) -> Result<Prepared, ApiError> {
    let patient = match (kind.patient)(&Value::Null, &head.id) {
        Some(p) => Some(p),
        None => {
            let json = open_json(state.vault().await?, practice, head)?;
            serde_json::from_slice::<Value>(&json)
                .ok()
                .and_then(|v| (kind.patient)(&v, &head.id))
        }
    };
    Ok(Prepared {
        write: ResourceWrite {
            resource_type: kind.resource_type.to_owned(),
            id: head.id.clone(),
            expect: Expect::Version(head.version_id),
            version_id: head.version_id + 1,
            last_updated_us: now_us(),
            sealed: None,
            index: Vec::new(),
        },
        json: Vec::new(),
        patient,
    })
}

/// `GET /{type}/{id}/_history`: every version, newest first, as a `history` Bundle (deletions
/// as entries with a `DELETE` request and no resource), paged with `_count` and `_cursor`.
async fn history(
    kind: &'static Kind,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller(&req).map_err(|_| ApiError::Internal)?;
    let id = parse_id(req.match_info().get("id").unwrap_or_default())?;
    let mut count = search::DEFAULT_COUNT;
    let mut before = None;
    for (key, value) in form_urlencoded::parse(req.query_string().as_bytes()) {
        match key.as_ref() {
            "_count" => count = search::parse_count(&value)?,
            "_cursor" => {
                before = Some(value.parse::<i64>().map_err(|_| {
                    ApiError::BadRequest("_cursor: not a cursor of this server".into())
                })?)
            }
            "_format" | "_pretty" => {}
            _ => {
                return Err(ApiError::BadRequest(
                    "history supports _count only (and _cursor in its own links)".into(),
                ))
            }
        }
    }
    let (versions, total) = state
        .store
        .resource_history(
            &caller.practice_id,
            kind.resource_type,
            id.as_str(),
            before,
            count.max(1),
        )
        .await?;
    if total == 0 {
        return Err(ApiError::NotFound(format!(
            "{} not found",
            kind.resource_type
        )));
    }
    let base = format!(
        "{}{FHIR_BASE}/{}/{}",
        state.base_url, kind.resource_type, id
    );
    let mut entries = Vec::with_capacity(versions.len());
    for v in versions.iter().take(usize::try_from(count).unwrap_or(0)) {
        let mut entry = Map::new();
        entry.insert("fullUrl".into(), Value::String(base.clone()));
        let method = if v.deleted {
            "DELETE"
        } else if v.version_id == 1 {
            "POST"
        } else {
            "PUT"
        };
        if !v.deleted {
            let json = open_json(state.vault().await?, &caller.practice_id, v)?;
            let resource: Value = serde_json::from_slice(&json).map_err(|_| ApiError::Internal)?;
            entry.insert("resource".into(), resource);
        }
        let url = if method == "POST" {
            kind.resource_type.to_owned()
        } else {
            format!("{}/{}", kind.resource_type, id)
        };
        entry.insert(
            "request".into(),
            serde_json::json!({ "method": method, "url": url }),
        );
        entry.insert(
            "response".into(),
            serde_json::json!({
                "status": if v.deleted { "204" } else if v.version_id == 1 { "201" } else { "200" },
                "etag": etag(v.version_id),
                "lastModified": instant(v.last_updated_us),
            }),
        );
        entries.push(Value::Object(entry));
    }
    let self_url = match before {
        Some(b) => format!("{base}/_history?_count={count}&_cursor={b}"),
        None => format!("{base}/_history?_count={count}"),
    };
    let mut links = vec![serde_json::json!({ "relation": "self", "url": self_url })];
    if let Some(last) = versions.last().filter(|_| versions.len() as i64 == count) {
        if last.version_id > 1 {
            links.push(serde_json::json!({
                "relation": "next",
                "url": format!("{base}/_history?_count={count}&_cursor={}", last.version_id),
            }));
        }
    }
    let mut bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "history",
        "total": total,
        "link": links,
    });
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    crate::http::fhir_json(&req, StatusCode::OK, &bundle)
}
