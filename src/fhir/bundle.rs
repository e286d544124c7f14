//! Batch and transaction Bundles at `POST /fhir/r4` (FHIR R4 http.html#transaction).
//!
//! A **transaction** is all or nothing: every entry is checked (structure, scopes, `ifMatch`,
//! `ifNoneExist`, references) before anything is written, and then every write and its audit
//! event commit in one database transaction. Entries whose `fullUrl` is a `urn:uuid:` (or any
//! URN) get server-assigned ids, and every reference to that URN in the Bundle is rewritten to
//! `Type/id`. References to resource types the gateway serves must resolve, to a resource that
//! exists or to one the transaction writes (422 otherwise), so a transaction never leaves a
//! dangling reference. `GET` entries (read, vread) run after the writes.
//!
//! A **batch** runs each entry on its own, as if it were a separate request: one failing entry
//! does not stop the others, and each entry's response carries its status (and an
//! OperationOutcome when it failed). Batch entries may not reference one another (FHIR says
//! so); an entry referencing a URN is refused.
//!
//! Supported entry requests: `POST Type` (with `ifNoneExist`), `PUT Type/id` (with `ifMatch`),
//! `DELETE Type/id`, `GET Type/id` and `GET Type/id/_history/vid`. Searches, conditional
//! update/delete and `PATCH` inside a Bundle are refused with 400 (per entry in a batch).
//! Each entry is checked against the token's scopes as its own request would be (403).
//! Every entry is audited as the interaction it is (create, update, delete, read).

use std::collections::{HashMap, HashSet};

use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::resources::{
    check_resource, conditional_key, deletion, etag, instant, kind_of, lock_for, open_json,
    prefer_return, prepare, search, Kind, Prepared, Return,
};
use super::FHIR_BASE;
use crate::audit::middleware::{request_event, AuditedInTransaction};
use crate::audit::{Action, NewAuditEvent};
use crate::domain::{new_resource_id, ResourceId};
use crate::gate::{Caller, Permission};
use crate::http::ApiError;
use crate::startup::AppState;
use crate::store::{Cond, Expect, ResourceQuery, SortKey, StoreError, StoredVersion};

/// The most entries a Bundle may carry.
pub const MAX_ENTRIES: usize = 1_000;
/// The largest Bundle body accepted (larger ones get 413).
pub const MAX_BUNDLE_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    fn action(self) -> Action {
        match self {
            Method::Get => Action::Read,
            Method::Post => Action::Create,
            Method::Put => Action::Update,
            Method::Delete => Action::Delete,
        }
    }

    fn permission(self) -> Permission {
        match self {
            Method::Get => Permission::Read,
            Method::Post => Permission::Create,
            Method::Put => Permission::Update,
            Method::Delete => Permission::Delete,
        }
    }
}

/// One entry's request, checked.
pub(crate) struct Entry {
    pub(crate) index: usize,
    pub(crate) method: Method,
    pub(crate) kind: &'static Kind,
    pub(crate) id: Option<ResourceId>,
    pub(crate) vid: Option<i64>,
    pub(crate) full_url: Option<String>,
    pub(crate) resource: Option<Map<String, Value>>,
    pub(crate) if_match: Option<i64>,
    pub(crate) if_none_exist: Option<String>,
}

impl Entry {
    fn target(&self) -> Option<String> {
        self.id
            .as_ref()
            .map(|id| format!("{}/{id}", self.kind.resource_type))
    }
}

/// Why an entry (or, in a transaction, the whole Bundle) fails: a status and its
/// OperationOutcome issues.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: StatusCode,
    pub(crate) issues: Vec<Value>,
}

impl Failure {
    fn new(
        status: StatusCode,
        code: &str,
        diagnostics: String,
        expression: Option<String>,
    ) -> Self {
        let mut issue = json!({ "severity": "error", "code": code, "diagnostics": diagnostics });
        if let Some(e) = expression {
            issue["expression"] = json!([e]);
        }
        Self {
            status,
            issues: vec![issue],
        }
    }

    fn invalid(index: usize, element: &str, diagnostics: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            diagnostics.into(),
            Some(format!("Bundle.entry[{index}].{element}")),
        )
    }

    fn outcome(&self) -> Value {
        json!({ "resourceType": "OperationOutcome", "issue": self.issues })
    }

    fn from_api(err: ApiError, index: usize) -> Self {
        use actix_web::ResponseError;
        let status = err.status_code();
        Self::new(
            status,
            match status {
                StatusCode::NOT_FOUND => "not-found",
                StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT => "conflict",
                StatusCode::FORBIDDEN => "forbidden",
                StatusCode::SERVICE_UNAVAILABLE => "transient",
                StatusCode::INTERNAL_SERVER_ERROR => "exception",
                _ => "invalid",
            },
            err.to_string(),
            Some(format!("Bundle.entry[{index}]")),
        )
    }
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        ApiError::Invalid {
            status: f.status.as_u16(),
            issues: f.issues,
        }
    }
}

fn caller(req: &HttpRequest) -> Result<Caller, ApiError> {
    super::resources::caller(req).map_err(|_| ApiError::Internal)
}

/// `POST /fhir/r4` with a `batch` or `transaction` Bundle.
pub async fn process(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller(&req)?;
    let Submitted {
        transaction,
        entries: raw_entries,
    } = read_bundle(&body)?;
    let base = format!("{}{FHIR_BASE}/", state.base_url);
    let parsed: Vec<Result<Entry, Failure>> = raw_entries
        .iter()
        .enumerate()
        .map(|(i, e)| parse_entry(i, e, &base, &caller))
        .collect();
    let ret = prefer_return(&req);
    let (response_type, entries) = if transaction {
        let entries = parsed.into_iter().collect::<Result<Vec<_>, _>>()?;
        let out = execute(&state, &req, &caller, entries, true, ret).await?;
        ("transaction-response", out)
    } else {
        let mut out = Vec::with_capacity(parsed.len());
        for entry in parsed {
            let result = match entry {
                Ok(entry) => {
                    let index = entry.index;
                    let (method, ty, id) =
                        (entry.method, entry.kind.resource_type, entry.id.clone());
                    match execute(&state, &req, &caller, vec![entry], false, ret).await {
                        Ok(mut one) => Ok(one.pop().unwrap_or(Value::Null)),
                        Err(f) => Err((f, Some((index, method, ty, id)))),
                    }
                }
                Err(f) => Err((f, None)),
            };
            let raw = &raw_entries[out.len()];
            match result {
                Ok(entry) => out.push(entry),
                Err((failure, what)) => {
                    let (action, ty, id) = match what {
                        Some((_, method, ty, id)) => (method.action(), Some(ty), id),
                        None => unparsed_request(raw),
                    };
                    audit_failure(&state, &req, action, ty, id, failure.status).await?;
                    out.push(json!({
                        "response": {
                            "status": status_line(failure.status),
                            "outcome": failure.outcome(),
                        }
                    }));
                }
            }
        }
        ("batch-response", out)
    };
    req.extensions_mut().insert(AuditedInTransaction);
    let mut response = Map::new();
    response.insert("resourceType".into(), json!("Bundle"));
    response.insert("type".into(), json!(response_type));
    if !entries.is_empty() {
        response.insert("entry".into(), Value::Array(entries));
    }
    crate::http::fhir_json(&req, StatusCode::OK, &Value::Object(response))
}

/// A batch or transaction Bundle as submitted: its type and its entries, not yet checked.
pub(crate) struct Submitted {
    pub(crate) transaction: bool,
    pub(crate) entries: Vec<Value>,
}

/// Reads a `POST /fhir/r4` body: a JSON Bundle of type batch or transaction with at most
/// [`MAX_ENTRIES`] entries.
pub(crate) fn read_bundle(body: &[u8]) -> Result<Submitted, ApiError> {
    let mut bundle: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "the body is not JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(ApiError::BadRequest(
            "POST to the base expects a Bundle of type batch or transaction".into(),
        ));
    }
    let transaction = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => true,
        Some("batch") => false,
        _ => {
            return Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "Bundle.type: expected batch or transaction".into(),
                Some("Bundle.type".into()),
            )
            .into())
        }
    };
    let entries = match bundle.get_mut("entry").map(Value::take) {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "Bundle.entry: expected an array".into(),
            ))
        }
    };
    if entries.len() > MAX_ENTRIES {
        return Err(ApiError::BadRequest(format!(
            "a Bundle may carry at most {MAX_ENTRIES} entries"
        )));
    }
    Ok(Submitted {
        transaction,
        entries,
    })
}

fn status_line(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The version an `ifMatch` names (`W/"3"`).
fn parse_version_tag(text: &str) -> Option<i64> {
    let quoted = text.trim().strip_prefix("W/").unwrap_or(text.trim());
    quoted
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .and_then(|v| v.parse().ok())
}

pub(crate) fn parse_entry(
    index: usize,
    raw: &Value,
    base: &str,
    caller: &Caller,
) -> Result<Entry, Failure> {
    let request = raw
        .get("request")
        .filter(|r| r.is_object())
        .ok_or_else(|| Failure::invalid(index, "request", "every entry needs a request"))?;
    let text = |name: &str| request.get(name).and_then(Value::as_str);
    let method = match text("method") {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some("PATCH" | "HEAD") => {
            return Err(Failure::invalid(
                index,
                "request.method",
                "PATCH and HEAD are not supported in a Bundle (GET, POST, PUT and DELETE are)",
            ))
        }
        _ => {
            return Err(Failure::invalid(
                index,
                "request.method",
                "expected GET, POST, PUT or DELETE",
            ))
        }
    };
    let url = text("url")
        .ok_or_else(|| Failure::invalid(index, "request.url", "every request needs a url"))?;
    let url = url.strip_prefix(base).unwrap_or(url);
    if url.contains("://") {
        return Err(Failure::invalid(
            index,
            "request.url",
            "expected a url relative to this server's FHIR base",
        ));
    }
    let url = url.trim_start_matches('/');
    if url.contains('?') {
        return Err(Failure::invalid(
            index,
            "request.url",
            "searches and conditional updates or deletes are not supported in a Bundle; use ifNoneExist for a conditional create",
        ));
    }
    let segments: Vec<&str> = url.split('/').collect();
    let kind = kind_of(segments[0]).ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            "request.url: not a resource type this server serves".into(),
            Some(format!("Bundle.entry[{index}].request.url")),
        )
    })?;
    let id = |s: &str| {
        ResourceId::parse("id", s)
            .map_err(|_| Failure::invalid(index, "request.url", "the id is not a valid FHIR id"))
    };
    let (id, vid) =
        match (method, segments.as_slice()) {
            (Method::Post, [_]) => (None, None),
            (Method::Put | Method::Delete | Method::Get, [_, i]) => (Some(id(i)?), None),
            (Method::Get, [_, i, "_history", v]) => (
                Some(id(i)?),
                Some(v.parse::<i64>().map_err(|_| {
                    Failure::invalid(index, "request.url", "the version is not a number")
                })?),
            ),
            _ => return Err(Failure::invalid(
                index,
                "request.url",
                "expected Type (POST), Type/id (PUT, DELETE, GET) or Type/id/_history/vid (GET)",
            )),
        };
    if !caller
        .scopes
        .allows(kind.resource_type, method.permission())
    {
        return Err(Failure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "the token's scopes do not allow this {} on {}",
                text("method").unwrap_or_default(),
                kind.resource_type
            ),
            Some(format!("Bundle.entry[{index}].request")),
        ));
    }
    let resource = match (method, raw.get("resource")) {
        (Method::Post | Method::Put, Some(resource)) => {
            let map = check_resource(kind, resource.clone()).map_err(|issues| Failure {
                status: StatusCode::BAD_REQUEST,
                issues: issues
                    .into_iter()
                    .map(|issue| at_entry(index, kind, issue))
                    .collect(),
            })?;
            Some(map)
        }
        (Method::Post | Method::Put, None) => {
            return Err(Failure::invalid(
                index,
                "resource",
                "POST and PUT entries need a resource",
            ))
        }
        (_, Some(_)) => {
            return Err(Failure::invalid(
                index,
                "resource",
                "GET and DELETE entries carry no resource",
            ))
        }
        (_, None) => None,
    };
    if method == Method::Put {
        let body_id = resource
            .as_ref()
            .and_then(|r| r.get("id"))
            .and_then(Value::as_str);
        if body_id != id.as_ref().map(ResourceId::as_str) {
            return Err(Failure::invalid(
                index,
                "resource.id",
                "a PUT entry's resource must carry the id of its url",
            ));
        }
    }
    let if_match = match text("ifMatch") {
        None => None,
        Some(_) if method == Method::Post || method == Method::Get => {
            return Err(Failure::invalid(
                index,
                "request.ifMatch",
                "only PUT and DELETE take ifMatch",
            ))
        }
        Some(tag) => Some(parse_version_tag(tag).ok_or_else(|| {
            Failure::invalid(
                index,
                "request.ifMatch",
                "expected a version ETag such as W/\"3\"",
            )
        })?),
    };
    let if_none_exist = match text("ifNoneExist") {
        None => None,
        Some(_) if method != Method::Post => {
            return Err(Failure::invalid(
                index,
                "request.ifNoneExist",
                "only POST takes ifNoneExist",
            ))
        }
        Some(condition) => Some(condition.to_owned()),
    };
    let full_url = raw
        .get("fullUrl")
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Entry {
        index,
        method,
        kind,
        id,
        vid,
        full_url,
        resource,
        if_match,
        if_none_exist,
    })
}

/// A validation issue of an entry's resource, its expression rebased on the entry
/// (`Patient.name[0]` becomes `Bundle.entry[3].resource.name[0]`).
fn at_entry(index: usize, kind: &Kind, mut issue: Value) -> Value {
    let prefix = format!("Bundle.entry[{index}].resource");
    if let Some(Value::Array(expressions)) = issue.get_mut("expression") {
        for e in expressions.iter_mut() {
            if let Some(text) = e.as_str() {
                let rest = text.strip_prefix(kind.resource_type).unwrap_or(text);
                let rest = if rest.is_empty() || rest.starts_with('.') || rest.starts_with('[') {
                    rest.to_owned()
                } else {
                    format!(".{rest}")
                };
                *e = Value::String(format!("{prefix}{rest}"));
            }
        }
    } else {
        issue["expression"] = json!([prefix]);
    }
    issue
}

/// What an entry comes to, before anything is written.
enum Planned {
    /// A new version to write.
    Write {
        prepared: Prepared,
        action: Action,
        status: StatusCode,
    },
    /// A conditional create that matched, or a delete of a deleted resource: nothing to write.
    Unchanged {
        version: Option<StoredVersion>,
        status: StatusCode,
    },
    /// A read, run after the writes.
    Read,
}

/// Runs `entries` as one unit: all of them commit, or none.
async fn execute(
    state: &AppState,
    req: &HttpRequest,
    caller: &Caller,
    mut entries: Vec<Entry>,
    check_references: bool,
    ret: Return,
) -> Result<Vec<Value>, Failure> {
    let practice = &caller.practice_id;
    let vault = state.vault().await.map_err(|e| Failure::from_api(e, 0))?;

    check_distinct(&entries)?;

    // Ids: POSTs get new ids (or the match of their ifNoneExist); URNs map to Type/id.
    let mut planned: Vec<Option<Planned>> = entries.iter().map(|_| None).collect();
    // Conditional creates hold their condition's lock until the commit (see
    // `resources::conditional_lock`), in a fixed order so two Bundles cannot deadlock.
    let mut keys: Vec<[u8; 32]> = entries
        .iter()
        .filter_map(|e| {
            let condition = e.if_none_exist.as_deref()?;
            Some(conditional_key(practice, e.kind.resource_type, condition))
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut _serialised = Vec::with_capacity(keys.len());
    for key in keys {
        _serialised.push(lock_for(key).lock_owned().await);
    }
    for (slot, e) in entries.iter_mut().enumerate() {
        if e.method == Method::Post {
            if let Some(condition) = &e.if_none_exist {
                let matches = search::find_matches(e.kind, state, practice, condition, 2)
                    .await
                    .map_err(|err| Failure::from_api(err, e.index))?;
                match matches.len() {
                    0 => {}
                    1 => {
                        let found = matches.into_iter().next();
                        e.id = found
                            .as_ref()
                            .map(|v| ResourceId::from_trusted(v.id.clone()));
                        planned[slot] = Some(Planned::Unchanged {
                            version: found,
                            status: StatusCode::OK,
                        });
                    }
                    _ => {
                        return Err(Failure::new(
                            StatusCode::PRECONDITION_FAILED,
                            "duplicate",
                            "ifNoneExist: more than one resource matches".into(),
                            Some(format!("Bundle.entry[{}].request.ifNoneExist", e.index)),
                        ))
                    }
                }
            }
            if e.id.is_none() {
                e.id = Some(new_resource_id());
            }
        }
    }
    let urns = urn_targets(&entries);

    // References: URNs rewritten, every reference to a served type resolved.
    let wanted = resolve_references(&mut entries, &urns, check_references)?;
    for (ty, ids) in wanted {
        let query = ResourceQuery {
            practice: practice.clone(),
            resource_type: ty.to_owned(),
            limit: i64::try_from(ids.len()).unwrap_or(i64::MAX),
            conds: vec![Cond::Ids(ids.keys().cloned().collect())],
            sort: SortKey::Id,
            descending: false,
            after: None,
        };
        let present: HashSet<String> = state
            .store
            .search_resources(&query)
            .await
            .map_err(|err| Failure::from_api(err.into(), 0))?
            .into_iter()
            .map(|v| v.id)
            .collect();
        let mut missing: Vec<&String> = ids
            .iter()
            .filter(|(id, _)| !present.contains(*id))
            .map(|(_, path)| path)
            .collect();
        missing.sort();
        if let Some(path) = missing.first() {
            return Err(Failure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "not-found",
                format!("the reference names a {ty} that does not exist"),
                Some((*path).clone()),
            ));
        }
    }

    // Versions: creates, updates against their heads (ifMatch), deletes.
    for (slot, e) in entries.iter_mut().enumerate() {
        if planned[slot].is_some() {
            continue;
        }
        let fail = |err: ApiError| Failure::from_api(err, e.index);
        let id = e.id.clone().unwrap_or_else(new_resource_id);
        planned[slot] = Some(match e.method {
            Method::Get => Planned::Read,
            Method::Post => Planned::Write {
                prepared: prepare(
                    e.kind,
                    vault,
                    practice,
                    e.resource.take().unwrap_or_default(),
                    id.as_str(),
                    Expect::Absent,
                )
                .map_err(fail)?,
                action: Action::Create,
                status: StatusCode::CREATED,
            },
            Method::Put | Method::Delete => {
                let head = state
                    .store
                    .read_resource(practice, e.kind.resource_type, id.as_str(), None)
                    .await
                    .map_err(|err| fail(err.into()))?;
                match (e.if_match, &head) {
                    (Some(v), Some(h)) if h.version_id != v => {
                        return Err(Failure::new(
                            StatusCode::PRECONDITION_FAILED,
                            "conflict",
                            format!("ifMatch: the current version is {}", h.version_id),
                            Some(format!("Bundle.entry[{}].request.ifMatch", e.index)),
                        ))
                    }
                    (Some(_), None) => {
                        return Err(Failure::new(
                            StatusCode::PRECONDITION_FAILED,
                            "conflict",
                            "ifMatch: the resource does not exist".into(),
                            Some(format!("Bundle.entry[{}].request.ifMatch", e.index)),
                        ))
                    }
                    _ => {}
                }
                if e.method == Method::Put {
                    let (expect, action, status) = match &head {
                        Some(h) => (
                            Expect::Version(h.version_id),
                            Action::Update,
                            StatusCode::OK,
                        ),
                        None => (Expect::Absent, Action::Create, StatusCode::CREATED),
                    };
                    Planned::Write {
                        prepared: prepare(
                            e.kind,
                            vault,
                            practice,
                            e.resource.take().unwrap_or_default(),
                            id.as_str(),
                            expect,
                        )
                        .map_err(fail)?,
                        action,
                        status,
                    }
                } else {
                    match head {
                        None => {
                            return Err(Failure::new(
                                StatusCode::NOT_FOUND,
                                "not-found",
                                format!("{} not found", e.kind.resource_type),
                                Some(format!("Bundle.entry[{}].request.url", e.index)),
                            ))
                        }
                        Some(h) if h.deleted => Planned::Unchanged {
                            version: None,
                            status: StatusCode::NO_CONTENT,
                        },
                        Some(h) => Planned::Write {
                            prepared: deletion(e.kind, state, practice, &h).await.map_err(fail)?,
                            action: Action::Delete,
                            status: StatusCode::NO_CONTENT,
                        },
                    }
                }
            }
        });
    }

    // Every write and its audit event, in one database transaction.
    let mut writes = Vec::new();
    let mut events = Vec::new();
    let mut slot_of_write = Vec::new();
    for (slot, p) in planned.iter().enumerate() {
        if let Some(Planned::Write {
            prepared,
            action,
            status,
        }) = p
        {
            writes.push(prepared.write.clone());
            slot_of_write.push(slot);
            if !state.skip_audit {
                events.push(entry_event(
                    req,
                    *status,
                    *action,
                    &prepared.write.resource_type,
                    Some(prepared.write.id.clone()),
                    prepared.patient.clone(),
                ));
            }
        }
    }
    if !writes.is_empty() {
        // The claim-status updates the writes report (ClaimResponses), in the same transaction.
        let prepared: Vec<&Prepared> = planned
            .iter()
            .filter_map(|p| match p {
                Some(Planned::Write { prepared, .. }) => Some(prepared),
                _ => None,
            })
            .collect();
        let claims = crate::sync::outbox::rows::for_fhir_writes(state, practice, &prepared)
            .await
            .map_err(|err| Failure::from_api(err, 0))?;
        if !state.skip_audit {
            events.extend(claims.audit_events(|claim, patient| {
                entry_event(
                    req,
                    StatusCode::OK,
                    Action::Update,
                    "Claim",
                    Some(claim.to_owned()),
                    patient,
                )
            }));
        }
        match state
            .store
            .write_resources_with_claims(practice, &writes, &events, claims.effects())
            .await
        {
            Ok(()) => {
                if !claims.outbox.is_empty() {
                    state.outbox.written();
                }
            }
            Err(StoreError::VersionConflict { index }) => {
                let entry = slot_of_write
                    .get(index)
                    .map_or(0, |slot| entries[*slot].index);
                return Err(Failure::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    "the resource was changed by another request at the same time; retry".into(),
                    Some(format!("Bundle.entry[{entry}]")),
                ));
            }
            Err(err) => return Err(Failure::from_api(err.into(), 0)),
        }
    }

    // Reads, after the writes; then the response entries in the Bundle's order.
    let mut out = Vec::with_capacity(entries.len());
    for (e, p) in entries.iter().zip(planned) {
        let kind = e.kind;
        let full_url =
            |id: &str| format!("{}{FHIR_BASE}/{}/{id}", state.base_url, kind.resource_type);
        match p {
            Some(Planned::Write {
                prepared, status, ..
            }) => {
                let w = &prepared.write;
                let mut response =
                    json!({ "status": status_line(status), "etag": etag(w.version_id) });
                if w.sealed.is_some() {
                    response["location"] = json!(format!(
                        "{}/{}/_history/{}",
                        kind.resource_type, w.id, w.version_id
                    ));
                    response["lastModified"] = json!(instant(w.last_updated_us));
                }
                let resource = (w.sealed.is_some())
                    .then(|| serde_json::from_slice::<Value>(&prepared.json).ok())
                    .flatten();
                out.push(response_entry(
                    (w.sealed.is_some()).then(|| full_url(&w.id)),
                    resource,
                    response,
                    ret,
                ));
            }
            Some(Planned::Unchanged { version, status }) => {
                let mut response = json!({ "status": status_line(status) });
                let mut resource = None;
                if let Some(v) = &version {
                    response["location"] = json!(format!(
                        "{}/{}/_history/{}",
                        kind.resource_type, v.id, v.version_id
                    ));
                    response["etag"] = json!(etag(v.version_id));
                    response["lastModified"] = json!(instant(v.last_updated_us));
                    let json = open_json(vault, practice, v)
                        .map_err(|err| Failure::from_api(err, e.index))?;
                    resource = serde_json::from_slice::<Value>(&json).ok();
                }
                out.push(response_entry(
                    version.as_ref().map(|v| full_url(&v.id)),
                    resource,
                    response,
                    ret,
                ));
            }
            Some(Planned::Read) | None => {
                let id = e.id.as_ref().map(ResourceId::as_str).unwrap_or_default();
                let read = state
                    .store
                    .read_resource(practice, kind.resource_type, id, e.vid)
                    .await
                    .map_err(|err| Failure::from_api(err.into(), e.index))?;
                let status = match &read {
                    None => StatusCode::NOT_FOUND,
                    Some(v) if v.deleted => StatusCode::GONE,
                    Some(_) => StatusCode::OK,
                };
                let v = match read {
                    Some(v) if !v.deleted => v,
                    _ => {
                        return Err(Failure::new(
                            status,
                            if status == StatusCode::GONE {
                                "deleted"
                            } else {
                                "not-found"
                            },
                            format!(
                                "{} {}",
                                kind.resource_type,
                                if status == StatusCode::GONE {
                                    "was deleted"
                                } else {
                                    "not found"
                                }
                            ),
                            Some(format!("Bundle.entry[{}].request.url", e.index)),
                        ))
                    }
                };
                // Opened once: for the response and for the patient the audit event names.
                let json = open_json(vault, practice, &v)
                    .map_err(|err| Failure::from_api(err, e.index))?;
                let resource = serde_json::from_slice::<Value>(&json).ok();
                // A failed read is audited by the caller (the batch entry, or the whole request).
                if !state.skip_audit {
                    let action = if e.vid.is_some() {
                        Action::Vread
                    } else {
                        Action::Read
                    };
                    let patient = resource.as_ref().and_then(|r| (kind.patient)(r, id));
                    let event = entry_event(
                        req,
                        status,
                        action,
                        kind.resource_type,
                        Some(id.to_owned()),
                        patient,
                    );
                    state
                        .audit
                        .record(event)
                        .await
                        .map_err(|_| Failure::from_api(ApiError::Unavailable, e.index))?;
                }
                let response = json!({
                    "status": status_line(StatusCode::OK),
                    "etag": etag(v.version_id),
                    "lastModified": instant(v.last_updated_us),
                });
                out.push(response_entry(
                    Some(full_url(&v.id)),
                    resource,
                    response,
                    Return::Representation,
                ));
            }
        }
    }
    Ok(out)
}

/// One write per resource, one entry per fullUrl.
pub(crate) fn check_distinct(entries: &[Entry]) -> Result<(), Failure> {
    let mut targets = HashSet::new();
    let mut full_urls = HashSet::new();
    for e in entries {
        if let (Some(t), Method::Put | Method::Delete) = (e.target(), e.method) {
            if !targets.insert(t) {
                return Err(Failure::invalid(
                    e.index,
                    "request.url",
                    "another entry of this Bundle writes the same resource",
                ));
            }
        }
        if let Some(u) = &e.full_url {
            if !full_urls.insert(u.clone()) {
                return Err(Failure::invalid(
                    e.index,
                    "fullUrl",
                    "another entry of this Bundle has the same fullUrl",
                ));
            }
        }
    }
    Ok(())
}

/// The `Type/id` each URN `fullUrl` stands for (entries have their ids by now).
pub(crate) fn urn_targets(entries: &[Entry]) -> HashMap<String, String> {
    let mut urns = HashMap::new();
    for e in entries {
        if let (Some(url), Some(target)) = (&e.full_url, e.target()) {
            if url.starts_with("urn:") {
                urns.insert(url.clone(), target);
            }
        }
    }
    urns
}

/// References the store must hold, by type: id and the element path naming it.
pub(crate) type Wanted = HashMap<&'static str, HashMap<String, String>>;

/// Rewrites every reference to a URN of `urns` in the entries' resources and refuses one to
/// any other URN (422). With `check_references`, also refuses a reference to a resource the
/// Bundle deletes and returns the references to served types the Bundle does not write, which
/// must exist in the store.
pub(crate) fn resolve_references(
    entries: &mut [Entry],
    urns: &HashMap<String, String>,
    check_references: bool,
) -> Result<Wanted, Failure> {
    let written: HashSet<String> = entries
        .iter()
        .filter(|e| matches!(e.method, Method::Post | Method::Put))
        .filter_map(Entry::target)
        .collect();
    let deleted: HashSet<String> = entries
        .iter()
        .filter(|e| e.method == Method::Delete)
        .filter_map(Entry::target)
        .collect();
    let mut wanted = Wanted::new();
    for e in entries.iter_mut() {
        let Some(resource) = e.resource.as_mut() else {
            continue;
        };
        let mut found = Vec::new();
        let mut path = format!("Bundle.entry[{}].resource", e.index);
        for (key, value) in resource.iter_mut() {
            let len = path.len();
            path.push('.');
            path.push_str(key);
            rewrite_references(value, &mut path, urns, &mut found);
            path.truncate(len);
        }
        for (path, reference) in found {
            if reference.starts_with("urn:") {
                return Err(Failure::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "not-found",
                    "the reference names a URN that is the fullUrl of no entry of this Bundle"
                        .into(),
                    Some(path),
                ));
            }
            if !check_references {
                continue;
            }
            let Some((ty, id)) = relative_reference(&reference) else {
                continue;
            };
            if deleted.contains(&reference) {
                return Err(Failure::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "conflict",
                    "the reference names a resource this transaction deletes".into(),
                    Some(path),
                ));
            }
            if written.contains(&reference) {
                continue;
            }
            wanted.entry(ty).or_default().entry(id).or_insert(path);
        }
    }
    Ok(wanted)
}

fn response_entry(
    full_url: Option<String>,
    resource: Option<Value>,
    mut response: Value,
    ret: Return,
) -> Value {
    let mut entry = Map::new();
    if let Some(url) = full_url {
        entry.insert("fullUrl".into(), Value::String(url));
    }
    match (ret, resource) {
        (Return::Representation, Some(resource)) => {
            entry.insert("resource".into(), resource);
        }
        (Return::OperationOutcome, _) => {
            let status = response["status"].as_str().unwrap_or_default().to_owned();
            response["outcome"] = json!({
                "resourceType": "OperationOutcome",
                "issue": [{ "severity": "information", "code": "informational", "diagnostics": status }],
            });
        }
        _ => {}
    }
    entry.insert("response".into(), response);
    Value::Object(entry)
}

/// The audit event of one entry.
fn entry_event(
    req: &HttpRequest,
    status: StatusCode,
    action: Action,
    resource_type: &str,
    id: Option<String>,
    patient: Option<String>,
) -> NewAuditEvent {
    let mut event = request_event(req, status);
    event.action = Some(action);
    event.resource_type = Some(resource_type.to_owned());
    event.resource_id = id;
    event.patient_id = patient;
    event
}

/// What an entry that could not be parsed asked for, as far as it can be told: the
/// interaction, a served resource type and a valid id.
pub(crate) fn unparsed_request(raw: &Value) -> (Action, Option<&'static str>, Option<ResourceId>) {
    let request = raw.get("request");
    let text = |name: &str| request.and_then(|r| r.get(name)).and_then(Value::as_str);
    let url = text("url").unwrap_or_default();
    let (path, query) = match url.split_once('?') {
        Some((p, _)) => (p, true),
        None => (url, false),
    };
    let mut segments = path.split('/');
    let ty = segments.next().and_then(kind_of).map(|k| k.resource_type);
    let id = segments
        .next()
        .and_then(|s| ResourceId::parse("id", s).ok());
    let action = match text("method") {
        Some("GET") if query || id.is_none() => Action::Search,
        Some("GET" | "HEAD") => Action::Read,
        Some("POST") => Action::Create,
        Some("PUT" | "PATCH") => Action::Update,
        Some("DELETE") => Action::Delete,
        _ => Action::Access,
    };
    (action, ty, id)
}

/// Audits a batch entry that failed before or while running (nothing of it was written).
async fn audit_failure(
    state: &AppState,
    req: &HttpRequest,
    action: Action,
    resource_type: Option<&str>,
    id: Option<ResourceId>,
    status: StatusCode,
) -> Result<(), ApiError> {
    if state.skip_audit {
        return Ok(());
    }
    let id = id.map(|i| i.to_string());
    let patient = (resource_type == Some("Patient"))
        .then(|| id.clone())
        .flatten();
    let mut event = entry_event(
        req,
        status,
        action,
        resource_type.unwrap_or_default(),
        id,
        patient,
    );
    event.resource_type = resource_type.map(str::to_owned);
    state
        .audit
        .record(event)
        .await
        .map_err(|_| ApiError::Unavailable)
}

/// `Type/id` of a relative reference to a type the gateway serves.
fn relative_reference(reference: &str) -> Option<(&'static str, String)> {
    let (ty, id) = reference.split_once('/')?;
    let kind = kind_of(ty)?;
    let id = id.split('/').next()?;
    ResourceId::parse("reference", id).ok()?;
    Some((kind.resource_type, id.to_owned()))
}

/// Rewrites every `reference` under `value` that names a URN of `urns`, and collects every
/// reference (after rewriting) with its element path.
fn rewrite_references(
    value: &mut Value,
    path: &mut String,
    urns: &HashMap<String, String>,
    found: &mut Vec<(String, String)>,
) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                if key == "reference" {
                    if let Value::String(text) = child {
                        if let Some(target) = urns.get(text.as_str()) {
                            *text = target.clone();
                        }
                        if !text.starts_with('#') {
                            found.push((path.clone(), text.clone()));
                        }
                    }
                } else {
                    rewrite_references(child, path, urns, found);
                }
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                rewrite_references(item, path, urns, found);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urn_references_are_rewritten_wherever_they_are() {
        let mut resource = json!({
            "subject": { "reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a" },
            "participant": [
                { "individual": { "reference": "Practitioner/t1" } },
                { "individual": { "reference": "#contained" } }
            ],
            "contained": [{ "resourceType": "Basic", "author": { "reference": "urn:uuid:nope" } }]
        });
        let urns = HashMap::from([(
            "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a".to_owned(),
            "Patient/p9".to_owned(),
        )]);
        let mut found = Vec::new();
        let mut path = "Encounter".to_owned();
        rewrite_references(&mut resource, &mut path, &urns, &mut found);
        assert_eq!(resource["subject"]["reference"], "Patient/p9");
        assert_eq!(
            found,
            [
                (
                    "Encounter.subject.reference".to_owned(),
                    "Patient/p9".to_owned()
                ),
                (
                    "Encounter.participant[0].individual.reference".to_owned(),
                    "Practitioner/t1".to_owned()
                ),
                (
                    "Encounter.contained[0].author.reference".to_owned(),
                    "urn:uuid:nope".to_owned()
                ),
            ]
        );
        assert_eq!(path, "Encounter");
    }

    #[test]
    fn only_relative_references_to_served_types_are_resolved() {
        assert_eq!(
            relative_reference("Patient/p1"),
            Some(("Patient", "p1".to_owned()))
        );
        assert_eq!(
            relative_reference("Patient/p1/_history/2"),
            Some(("Patient", "p1".to_owned()))
        );
        assert_eq!(relative_reference("Location/l1"), None);
        assert_eq!(
            relative_reference("http://other.example/fhir/Patient/p1"),
            None
        );
        assert_eq!(relative_reference("Patient/"), None);
    }

    #[test]
    fn issue_expressions_are_rebased_on_the_entry() {
        let kind = kind_of("Patient").unwrap();
        let issue = at_entry(3, kind, json!({ "expression": ["Patient.name[0].given"] }));
        assert_eq!(
            issue["expression"][0],
            "Bundle.entry[3].resource.name[0].given"
        );
        let issue = at_entry(1, kind, json!({ "expression": ["resourceType"] }));
        assert_eq!(
            issue["expression"][0],
            "Bundle.entry[1].resource.resourceType"
        );
        let issue = at_entry(2, kind, json!({ "diagnostics": "x" }));
        assert_eq!(issue["expression"][0], "Bundle.entry[2].resource");
    }
}
