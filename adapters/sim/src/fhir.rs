//! FHIR endpoints of one personality: Patient read and search (with each vendor's rules),
//! Coverage search, ClaimResponse conditional create, `metadata` and the SMART configuration.
//! Every call passes [`guard`] (fault knobs, then the bearer check). Search results are sorted
//! by `meta.lastUpdated` then id and paged by keyset with an opaque token, so a page never
//! skips or repeats a patient that did not change. Epic refuses a Patient search without one
//! of its minimum data sets (FHIR id, identifier, or family name + birthdate; see
//! <https://fhir.epic.com/Specifications?api=10450> and the "minimum data sets" note of
//! <https://fhir.epic.com/Documentation?docId=testpatients>), so `_lastUpdated` alone is 400.
//! Never logs query strings or resources.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::error::{outcome, SimError, FHIR_JSON};
use crate::personality::NextLink;
use crate::state::{
    lock, now_ms, read, AtomicCounters, ClaimUpdate, Malformed, PatientRecord, Shared,
};
use crate::synthetic::instant;
use crate::Personality;

type Query = web::Query<Vec<(String, String)>>;

/// Counts the call, applies the fault knobs, then checks the bearer token.
pub(crate) fn guard(sh: &Shared, req: &HttpRequest) -> Result<(), SimError> {
    AtomicCounters::bump(&sh.counters.fhir_requests);
    {
        let mut f = lock(&sh.faults);
        if f.throttle_next > 0 {
            f.throttle_next -= 1;
            return Err(SimError::Throttled {
                retry_after: f.throttle_retry_after,
            });
        }
        if f.fail_next > 0 {
            f.fail_next -= 1;
            return Err(SimError::Injected {
                status: f.fail_status,
                retry_after: f.fail_retry_after,
            });
        }
        if f.failure_rate > 0.0 && f.rng.f64() < f.failure_rate {
            return Err(SimError::Injected {
                status: 500,
                retry_after: None,
            });
        }
    }
    crate::token::check_bearer(sh, req)
}

fn fhir_ok(body: impl actix_web::body::MessageBody + 'static) -> HttpResponse {
    HttpResponse::Ok().content_type(FHIR_JSON).body(body)
}

pub(crate) async fn read_patient(
    sh: web::Data<Shared>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    let store = read(&sh.patients);
    let rec = store
        .get(&id)
        .ok_or_else(|| SimError::NotFound("Patient".into()))?;
    let etag = format!(
        "W/\"{}\"",
        rec.resource["meta"]["versionId"].as_str().unwrap_or("1")
    );
    let body = maybe_malformed_read(&sh, &rec.json);
    Ok(HttpResponse::Ok()
        .content_type(FHIR_JSON)
        .insert_header((header::ETAG, etag))
        .body(body))
}

/// A parsed `_lastUpdated` bound: (prefix, ms).
#[derive(Debug, Clone, Copy)]
enum Bound {
    Gt(i64),
    Ge(i64),
    Lt(i64),
    Le(i64),
}

fn parse_instant(v: &str) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(v, &Rfc3339) {
        return Some((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(v, &fmt)
        .ok()
        .map(|d| d.midnight().assume_utc().unix_timestamp() * 1000)
}

#[derive(Debug, Default)]
struct Filter {
    id: Option<String>,
    identifier: Option<(Option<String>, String)>,
    family: Option<String>,
    birthdate: Option<String>,
    gender: Option<String>,
    bounds: Vec<Bound>,
}

impl Filter {
    fn matches(&self, r: &PatientRecord) -> bool {
        let p = &r.resource;
        if self.id.as_ref().is_some_and(|id| *id != r.id) {
            return false;
        }
        if let Some((system, value)) = &self.identifier {
            let hit = p["identifier"].as_array().is_some_and(|ids| {
                ids.iter().any(|i| {
                    i["value"].as_str() == Some(value.as_str())
                        && system
                            .as_ref()
                            .is_none_or(|s| i["system"].as_str() == Some(s.as_str()))
                })
            });
            if !hit {
                return false;
            }
        }
        if let Some(f) = &self.family {
            let f = f.to_lowercase();
            let hit = p["name"].as_array().is_some_and(|ns| {
                ns.iter().any(|n| {
                    n["family"]
                        .as_str()
                        .is_some_and(|x| x.to_lowercase().starts_with(&f))
                })
            });
            if !hit {
                return false;
            }
        }
        if self
            .birthdate
            .as_ref()
            .is_some_and(|b| p["birthDate"].as_str() != Some(b.as_str()))
        {
            return false;
        }
        if self
            .gender
            .as_ref()
            .is_some_and(|g| p["gender"].as_str() != Some(g.as_str()))
        {
            return false;
        }
        self.bounds.iter().all(|b| match *b {
            Bound::Gt(t) => r.lu > t,
            Bound::Ge(t) => r.lu >= t,
            Bound::Lt(t) => r.lu < t,
            Bound::Le(t) => r.lu <= t,
        })
    }
}

/// Parses the search parameters of `personality`; unknown parameters are ignored (FHIR lenient
/// handling), bad values of known ones are 400.
fn parse_filter(
    p: Personality,
    q: &[(String, String)],
) -> Result<(Filter, Option<usize>), SimError> {
    let mut f = Filter::default();
    let mut count = None;
    for (k, v) in q {
        match k.as_str() {
            "_id" => f.id = Some(v.clone()),
            "identifier" => {
                f.identifier = Some(match v.split_once('|') {
                    Some((s, val)) if !s.is_empty() => (Some(s.to_string()), val.to_string()),
                    Some((_, val)) => (None, val.to_string()),
                    None => (None, v.clone()),
                })
            }
            "family" => f.family = Some(v.clone()),
            "birthdate" => f.birthdate = Some(v.clone()),
            "gender" => f.gender = Some(v.clone()),
            // Epic does not support _lastUpdated on Patient: it is ignored beside its required
            // parameters and refused alone (below).
            "_lastUpdated" if !p.traits().last_updated => {}
            "_lastUpdated" => {
                let bad =
                    || SimError::bad("invalid", "_lastUpdated must be [gt|ge|lt|le]<instant>");
                let (prefix, rest) =
                    if v.len() > 2 && v.as_bytes()[..2].iter().all(u8::is_ascii_alphabetic) {
                        v.split_at(2)
                    } else {
                        ("eq", v.as_str())
                    };
                let t = parse_instant(rest).ok_or_else(bad)?;
                f.bounds.push(match prefix {
                    "gt" => Bound::Gt(t),
                    "ge" | "eq" => Bound::Ge(t),
                    "lt" => Bound::Lt(t),
                    "le" => Bound::Le(t),
                    _ => return Err(bad()),
                });
            }
            "_count" => {
                let n: usize = v
                    .parse()
                    .map_err(|_| SimError::bad("invalid", "_count must be a positive integer"))?;
                if n == 0 {
                    return Err(SimError::bad(
                        "invalid",
                        "_count must be a positive integer",
                    ));
                }
                count = Some(n);
            }
            "_sort" if p.traits().sort && v != "_lastUpdated" => {
                return Err(SimError::bad(
                    "not-supported",
                    "only _sort=_lastUpdated is supported",
                ));
            }
            _ => {}
        }
    }
    if p.traits().identifying_params_required
        && f.id.is_none()
        && f.identifier.is_none()
        && !(f.family.is_some() && f.birthdate.is_some())
    {
        return Err(SimError::bad(
            "required",
            "Required search parameter missing from request: use _id, identifier, or family and birthdate",
        ));
    }
    Ok((f, count))
}

/// The opaque paging token: the search, the last (lastUpdated, id) served, the page size.
#[derive(serde::Serialize, serde::Deserialize)]
struct PageToken {
    q: Vec<(String, String)>,
    a: (i64, String),
    c: usize,
}

fn encode_token(t: &PageToken) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(t).unwrap_or_default())
}

fn decode_token(s: &str) -> Result<PageToken, SimError> {
    let bad = || SimError::bad("invalid", "the paging token is not valid");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

/// The search parameter the personality requires on every search (athenahealth's
/// `ah-practice`), with the tenant's value: 400 when missing or naming another tenant.
fn require_param(sh: &Shared, query: &[(String, String)]) -> Result<(), SimError> {
    let Some((name, value)) = sh.settings.personality.traits().required_param else {
        return Ok(());
    };
    let expected = value.replace("{tenant}", &sh.settings.tenant);
    match query.iter().find(|(k, _)| k == name) {
        Some((_, v)) if *v == expected => Ok(()),
        Some(_) => Err(SimError::bad(
            "invalid",
            "the practice named by the search is not this client's",
        )),
        None => Err(SimError::bad(
            "required",
            format!("Required search parameter missing from request: {name}"),
        )),
    }
}

fn max_count(p: Personality) -> usize {
    p.traits().max_count
}

fn full_url(sh: &Shared, req: &HttpRequest) -> String {
    let qs = req.query_string();
    if qs.is_empty() {
        format!("{}{}", sh.settings.origin, req.path())
    } else {
        format!("{}{}?{}", sh.settings.origin, req.path(), qs)
    }
}

/// `GET {base}/Patient?...` (and `-pageContext` pages for Epic and Cerner).
pub(crate) async fn search_patients(
    sh: web::Data<Shared>,
    req: HttpRequest,
    q: Query,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    let page = q
        .iter()
        .find(|(k, _)| k == "-pageContext")
        .map(|(_, v)| decode_token(v))
        .transpose()?;
    run_search(&sh, &req, page, &q)
}

/// `GET {base}?_getpages=...` (generic servers page on the base, as HAPI does).
pub(crate) async fn get_pages(
    sh: web::Data<Shared>,
    req: HttpRequest,
    q: Query,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    let token = q
        .iter()
        .find(|(k, _)| k == "_getpages")
        .ok_or_else(|| SimError::bad("not-supported", "search on the base is not supported"))?;
    let page = decode_token(&token.1)?;
    run_search(&sh, &req, Some(page), &q)
}

fn run_search(
    sh: &Shared,
    req: &HttpRequest,
    page: Option<PageToken>,
    q: &[(String, String)],
) -> Result<HttpResponse, SimError> {
    let p = sh.settings.personality;
    let (query, after) = match page {
        Some(t) => (t.q, Some((t.a, t.c))),
        None => (q.to_vec(), None),
    };
    require_param(sh, &query)?;
    let (filter, count) = parse_filter(p, &query)?;
    let count = after
        .as_ref()
        .map(|(_, c)| *c)
        .or(count)
        .unwrap_or(sh.settings.page_size)
        .min(max_count(p));
    let store = read(&sh.patients);
    let mut start = 0;
    for b in &filter.bounds {
        match *b {
            Bound::Gt(t) => start = start.max(store.start_at_instant(t, false)),
            Bound::Ge(t) => start = start.max(store.start_at_instant(t, true)),
            _ => {}
        }
    }
    let total = store.sorted[start..]
        .iter()
        .filter(|r| filter.matches(r))
        .count();
    if let Some(((lu, id), _)) = &after {
        start = start.max(store.after(*lu, id));
    }
    let mut hits = store.sorted[start..].iter().filter(|r| filter.matches(r));
    let entries: Vec<&PatientRecord> = hits.by_ref().take(count).collect();
    let more = hits.next().is_some();
    let next = match (more, entries.last()) {
        (true, Some(last)) => {
            let tok = encode_token(&PageToken {
                q: query
                    .iter()
                    .filter(|(k, _)| k != "_count")
                    .cloned()
                    .collect(),
                a: (last.lu, last.id.clone()),
                c: count,
            });
            let base = sh.settings.base_url();
            Some(match p.traits().next_link {
                NextLink::GetPages => format!("{base}?_getpages={tok}&_bundletype=searchset"),
                NextLink::PageContext => {
                    format!("{base}/Patient?-pageContext={tok}&-pageDirection=NEXT")
                }
            })
        }
        _ => None,
    };
    let base = sh.settings.base_url();
    let items: Vec<(String, &[u8])> = entries
        .iter()
        .map(|r| (format!("{base}/Patient/{}", r.id), r.json.as_ref()))
        .collect();
    let body = bundle(&full_url(sh, req), next.as_deref(), total, &items);
    drop(store);
    Ok(fhir_ok(maybe_malformed(sh, body)))
}

/// Writes a searchset Bundle around pre-serialized resources.
fn bundle(
    self_url: &str,
    next: Option<&str>,
    total: usize,
    entries: &[(String, &[u8])],
) -> Vec<u8> {
    let mut links = vec![json!({"relation": "self", "url": self_url})];
    if let Some(n) = next {
        links.push(json!({"relation": "next", "url": n}));
    }
    let head = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "lastUpdated": instant(now_ms()) },
        "type": "searchset",
        "total": total,
        "link": links,
    })
    .to_string();
    let mut out =
        Vec::with_capacity(head.len() + entries.iter().map(|e| e.1.len() + 120).sum::<usize>());
    out.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    out.extend_from_slice(b",\"entry\":[");
    for (i, (full_url, res)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"fullUrl\":");
        out.extend_from_slice(Value::from(full_url.as_str()).to_string().as_bytes());
        out.extend_from_slice(b",\"resource\":");
        out.extend_from_slice(res);
        out.extend_from_slice(b",\"search\":{\"mode\":\"match\"}}");
    }
    out.extend_from_slice(b"]}");
    out
}

/// The kind of malformation the next response gets, if any (one of the `malformed_next` used).
fn take_malformed(sh: &Shared) -> Option<Malformed> {
    let mut f = lock(&sh.faults);
    if f.malformed_next == 0 {
        return None;
    }
    f.malformed_next -= 1;
    Some(f.malformed_kind)
}

fn maybe_malformed(sh: &Shared, body: Vec<u8>) -> Vec<u8> {
    match take_malformed(sh) {
        None => body,
        Some(Malformed::Truncated) => body[..body.len() / 2].to_vec(),
        Some(Malformed::WrongResourceType) => {
            let s = String::from_utf8_lossy(&body).replacen(
                "\"resourceType\":\"Bundle\"",
                "\"resourceType\":\"Bundel\"",
                1,
            );
            s.into_bytes()
        }
        Some(Malformed::WrongEntryType) => {
            let Ok(mut bundle) = serde_json::from_slice::<Value>(&body) else {
                return body;
            };
            if let Some(resource) = bundle["entry"]
                .get_mut(0)
                .and_then(|e| e.get_mut("resource"))
            {
                resource["resourceType"] = Value::from("Observation");
            }
            bundle.to_string().into_bytes()
        }
    }
}

/// A read's body, malformed when asked: cut off, or the resource as an `Observation`.
fn maybe_malformed_read(sh: &Shared, body: &[u8]) -> Vec<u8> {
    match take_malformed(sh) {
        None => body.to_vec(),
        Some(Malformed::Truncated) => body[..body.len() / 2].to_vec(),
        Some(Malformed::WrongResourceType | Malformed::WrongEntryType) => {
            match serde_json::from_slice::<Value>(body) {
                Ok(mut resource) => {
                    resource["resourceType"] = Value::from("Observation");
                    resource.to_string().into_bytes()
                }
                Err(_) => body.to_vec(),
            }
        }
    }
}

/// `GET {base}/Coverage?patient={id}` (or `beneficiary=`), ids bare or `Patient/{id}`.
pub(crate) async fn search_coverage(
    sh: web::Data<Shared>,
    req: HttpRequest,
    q: Query,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    require_param(&sh, &q)?;
    let who = q
        .iter()
        .find(|(k, _)| k == "patient" || k == "beneficiary")
        .map(|(_, v)| v.strip_prefix("Patient/").unwrap_or(v).to_string())
        .ok_or_else(|| {
            SimError::bad(
                "required",
                "Coverage search requires patient or beneficiary",
            )
        })?;
    let store = read(&sh.patients);
    let base = sh.settings.base_url();
    let items: Vec<(String, &[u8])> = store
        .get(&who)
        .map(|r| {
            r.coverages
                .iter()
                .zip(&r.coverage_json)
                .map(|(c, j)| {
                    (
                        format!("{base}/Coverage/{}", c["id"].as_str().unwrap_or_default()),
                        j.as_ref(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let body = bundle(&full_url(&sh, &req), None, items.len(), &items);
    drop(store);
    Ok(fhir_ok(maybe_malformed(&sh, body)))
}

const UPDATE_SYSTEM: &str = "urn:fhirgate:claim-status-update";

/// `POST {base}/ClaimResponse` with `If-None-Exist: identifier=urn:fhirgate:claim-status-update|{id}`.
pub(crate) async fn create_claim_response(
    sh: web::Data<Shared>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    let mut res: Value = serde_json::from_slice(&body)
        .map_err(|_| SimError::bad("structure", "the body is not JSON"))?;
    if res["resourceType"] != "ClaimResponse" {
        return Err(SimError::bad("invalid", "the body is not a ClaimResponse"));
    }
    let update_id = match req.headers().get("If-None-Exist") {
        None => None,
        Some(h) => {
            let v = h
                .to_str()
                .map_err(|_| SimError::bad("invalid", "If-None-Exist is not text"))?;
            let id = v
                .strip_prefix("identifier=")
                .and_then(|i| i.strip_prefix(UPDATE_SYSTEM))
                .and_then(|i| i.strip_prefix('|'))
                .filter(|i| !i.is_empty())
                .ok_or_else(|| {
                    SimError::bad(
                        "invalid",
                        "If-None-Exist must be identifier=urn:fhirgate:claim-status-update|{id}",
                    )
                })?;
            let carried = res["identifier"].as_array().is_some_and(|ids| {
                ids.iter()
                    .any(|i| i["system"] == UPDATE_SYSTEM && i["value"].as_str() == Some(id))
            });
            if !carried {
                return Err(SimError::bad(
                    "invalid",
                    "the ClaimResponse does not carry the If-None-Exist identifier",
                ));
            }
            Some(id.to_string())
        }
    };
    let claim_id = res["request"]["reference"]
        .as_str()
        .and_then(|r| r.strip_prefix("Claim/"))
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            SimError::bad(
                "required",
                "ClaimResponse.request must reference Claim/{id}",
            )
        })?;
    let outcome_code = res["outcome"]
        .as_str()
        .filter(|o| matches!(*o, "queued" | "complete" | "error" | "partial"))
        .map(str::to_string)
        .ok_or_else(|| {
            SimError::bad(
                "required",
                "ClaimResponse.outcome must be queued, complete, error or partial",
            )
        })?;
    if !res["patient"]["reference"].is_string() {
        return Err(SimError::bad(
            "required",
            "ClaimResponse.patient is required",
        ));
    }
    let base = sh.settings.base_url();
    let mut claims = lock(&sh.claims);
    if let Some(existing) = update_id.as_ref().and_then(|u| claims.by_update.get(u)) {
        let stored = claims
            .resources
            .get(existing)
            .cloned()
            .unwrap_or(Value::Null);
        return Ok(HttpResponse::Ok()
            .content_type(FHIR_JSON)
            .insert_header((
                header::LOCATION,
                format!("{base}/ClaimResponse/{existing}/_history/1"),
            ))
            .body(stored.to_string()));
    }
    let id = uuid::Uuid::new_v4().to_string();
    res["id"] = Value::from(id.clone());
    res["meta"] = json!({ "versionId": "1", "lastUpdated": instant(now_ms()) });
    claims.resources.insert(id.clone(), res.clone());
    if let Some(u) = &update_id {
        claims.by_update.insert(u.clone(), id.clone());
    }
    claims
        .by_claim
        .entry(claim_id)
        .or_default()
        .push(ClaimUpdate {
            update_id,
            outcome: outcome_code,
            disposition: res["disposition"].as_str().map(str::to_string),
            resource: res.clone(),
            applied_at: time::OffsetDateTime::now_utc(),
        });
    drop(claims);
    AtomicCounters::bump(&sh.counters.claim_updates_applied);
    Ok(HttpResponse::Created()
        .content_type(FHIR_JSON)
        .insert_header((
            header::LOCATION,
            format!("{base}/ClaimResponse/{id}/_history/1"),
        ))
        .insert_header((header::ETAG, "W/\"1\""))
        .body(res.to_string()))
}

pub(crate) async fn read_claim_response(
    sh: web::Data<Shared>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    let claims = lock(&sh.claims);
    let res = claims
        .resources
        .get(id.as_str())
        .ok_or_else(|| SimError::NotFound("ClaimResponse".into()))?;
    Ok(fhir_ok(res.to_string()))
}

/// `GET {base}/.well-known/smart-configuration` (no token needed).
pub(crate) async fn smart_configuration(sh: web::Data<Shared>) -> HttpResponse {
    let secret = matches!(sh.verifier, crate::token::ClientVerifier::Secret(_));
    let v2 = sh.settings.personality.traits().v2_scopes;
    HttpResponse::Ok().json(json!({
        "token_endpoint": sh.settings.token_url(),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": [if secret { "client_secret_basic" } else { "private_key_jwt" }],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": if v2 { json!(["system/Patient.rs", "system/Coverage.rs", "system/ClaimResponse.c", "system/*.read"]) } else { json!(["system/Patient.read", "system/Coverage.read", "system/ClaimResponse.write", "system/*.read"]) },
        "capabilities": [if secret { "client-confidential-symmetric" } else { "client-confidential-asymmetric" }, "permission-v1"],
    }))
}

/// `GET {base}/metadata`: a minimal CapabilityStatement with the SMART OAuth URIs extension.
pub(crate) async fn metadata(sh: web::Data<Shared>) -> HttpResponse {
    let types = |names: &[&str]| {
        names
            .iter()
            .map(|t| json!({"type": t, "interaction": [{"code": "read"}, {"code": "search-type"}]}))
            .collect::<Vec<_>>()
    };
    let mut resources = types(&["Patient", "Coverage", "ClaimResponse"]);
    resources.push(json!({"type": "Group", "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}]}));
    fhir_ok(
        json!({
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": instant(now_ms()),
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "rest": [{
                "mode": "server",
                "security": {
                    "extension": [{
                        "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                        "extension": [{"url": "token", "valueUri": sh.settings.token_url()}]
                    }],
                    "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}]}]
                },
                "resource": resources
            }]
        })
        .to_string(),
    )
}

/// Any other path: 404 with an OperationOutcome.
pub(crate) async fn not_found() -> HttpResponse {
    HttpResponse::NotFound()
        .content_type(FHIR_JSON)
        .body(outcome("error", "not-found", "no such endpoint").to_string())
}
