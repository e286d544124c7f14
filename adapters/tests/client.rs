//! The shared client and the adapters against a small in-test EHR (actix-web on a random
//! port): token caching and refresh, retries, Retry-After, the circuit breaker, paging, NDJSON,
//! the Group export listing, claim pushes and the audit of every exchange.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use fhirgate_adapters::audit::AuditUnavailable;
use fhirgate_adapters::{
    AdapterContext, AdapterError, ClaimStatusUpdate, Connection, Credential, EhrAdapter,
    ExportFile, OutboundAction, OutboundAudit, OutboundCall, Registry,
};
use fhirgate_mappings::Profiles;
use futures_util::StreamExt;
use serde_json::{json, Value};

const PATIENT_ID: &str = "pt-secret-4711";

/// What the in-test EHR does and saw.
#[derive(Default)]
struct Ehr {
    origin: Mutex<String>,
    token_requests: AtomicUsize,
    token_delay_ms: AtomicU64,
    token_error: Mutex<Option<&'static str>>,
    token_forms: Mutex<Vec<String>>,
    token_auth: Mutex<Vec<String>>,
    refused_tokens: Mutex<HashSet<String>>,
    discovery_requests: AtomicUsize,
    fhir_requests: AtomicUsize,
    fhir_times: Mutex<Vec<Instant>>,
    queries: Mutex<Vec<String>>,
    /// The next FHIR responses: status and Retry-After.
    script: Mutex<VecDeque<(u16, Option<&'static str>)>>,
    /// Every FHIR call answers this status while non-zero.
    always: AtomicU16,
    evil_next: AtomicBool,
    polls: AtomicUsize,
    pushes: Mutex<Vec<(String, Value)>>,
}

fn outcome(code: &str) -> Value {
    json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code,
        "diagnostics": format!("about {PATIENT_ID}")}]})
}

fn patient(id: &str, updated: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "meta": {"lastUpdated": updated}})
}

async fn token(ehr: web::Data<Ehr>, req: HttpRequest, body: String) -> HttpResponse {
    let n = ehr.token_requests.fetch_add(1, SeqCst) + 1;
    ehr.token_forms.lock().unwrap().push(body);
    if let Some(auth) = req.headers().get("authorization") {
        ehr.token_auth
            .lock()
            .unwrap()
            .push(auth.to_str().unwrap().to_owned());
    }
    let delay = ehr.token_delay_ms.load(SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(code) = *ehr.token_error.lock().unwrap() {
        return HttpResponse::BadRequest()
            .json(json!({"error": code, "error_description": "client s3cret rejected"}));
    }
    HttpResponse::Ok().json(
        json!({"access_token": format!("tok-{n}"), "token_type": "Bearer",
        "expires_in": 300, "scope": "system/Patient.read"}),
    )
}

async fn discovery(ehr: web::Data<Ehr>) -> HttpResponse {
    ehr.discovery_requests.fetch_add(1, SeqCst);
    let origin = ehr.origin.lock().unwrap().clone();
    HttpResponse::Ok().json(json!({"token_endpoint": format!("{origin}/auth/token")}))
}

/// The bearer and fault checks every FHIR route makes first.
fn gate(ehr: &Ehr, req: &HttpRequest) -> Option<HttpResponse> {
    ehr.fhir_requests.fetch_add(1, SeqCst);
    ehr.fhir_times.lock().unwrap().push(Instant::now());
    ehr.queries
        .lock()
        .unwrap()
        .push(req.query_string().to_owned());
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    match bearer {
        Some(t) if t.starts_with("tok-") && !ehr.refused_tokens.lock().unwrap().contains(&t) => {}
        _ => {
            return Some(
                HttpResponse::Unauthorized()
                    .insert_header(("WWW-Authenticate", "Bearer error=\"invalid_token\""))
                    .json(outcome("login")),
            )
        }
    }
    let scripted = ehr.script.lock().unwrap().pop_front();
    let always = ehr.always.load(SeqCst);
    let (status, after) = match scripted {
        Some(s) => s,
        None if always != 0 => (always, None),
        None => return None,
    };
    let mut response = HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap());
    if let Some(after) = after {
        response.insert_header(("Retry-After", after));
    }
    Some(response.json(outcome("transient")))
}

async fn read_patient(
    ehr: web::Data<Ehr>,
    req: HttpRequest,
    id: web::Path<String>,
) -> HttpResponse {
    if let Some(r) = gate(&ehr, &req) {
        return r;
    }
    HttpResponse::Ok().json(patient(&id, "2024-01-01T00:00:00.000Z"))
}

async fn search_patients(ehr: web::Data<Ehr>, req: HttpRequest) -> HttpResponse {
    if let Some(r) = gate(&ehr, &req) {
        return r;
    }
    let page: usize = req
        .query_string()
        .split('&')
        .find_map(|p| p.strip_prefix("page="))
        .and_then(|p| p.parse().ok())
        .unwrap_or(1);
    let origin = ehr.origin.lock().unwrap().clone();
    let entries: Vec<Value> = (0..2)
        .map(|i| {
            let n = (page - 1) * 2 + i;
            json!({"resource": patient(&format!("p{n}"), &format!("2024-02-0{}T00:00:00.000Z", n + 1))})
        })
        .collect();
    let mut links = vec![json!({"relation": "self", "url": format!("{origin}/fhir/Patient")})];
    if page < 3 {
        let host = if ehr.evil_next.load(SeqCst) {
            origin.replace("127.0.0.1", "localhost")
        } else {
            origin
        };
        links.push(
            json!({"relation": "next", "url": format!("{host}/fhir/Patient?page={}", page + 1)}),
        );
    }
    HttpResponse::Ok().json(
        json!({"resourceType": "Bundle", "type": "searchset", "total": 6,
        "link": links, "entry": entries}),
    )
}

async fn kick_off(ehr: web::Data<Ehr>, req: HttpRequest) -> HttpResponse {
    if let Some(r) = gate(&ehr, &req) {
        return r;
    }
    if req.headers().get("prefer").and_then(|v| v.to_str().ok()) != Some("respond-async") {
        return HttpResponse::BadRequest().json(outcome("invalid"));
    }
    let origin = ehr.origin.lock().unwrap().clone();
    HttpResponse::Accepted()
        .insert_header(("Content-Location", format!("{origin}/bulkstatus/1")))
        .finish()
}

async fn bulk_status(ehr: web::Data<Ehr>, req: HttpRequest) -> HttpResponse {
    if let Some(r) = gate(&ehr, &req) {
        return r;
    }
    if ehr.polls.fetch_add(1, SeqCst) == 0 {
        return HttpResponse::Accepted()
            .insert_header(("X-Progress", "50%"))
            .insert_header(("Retry-After", "0"))
            .finish();
    }
    let origin = ehr.origin.lock().unwrap().clone();
    HttpResponse::Ok().json(
        json!({"transactionTime": "2024-03-01T00:00:00Z", "request": "x",
        "requiresAccessToken": true, "error": [], "output": [
            {"type": "Patient", "url": format!("{origin}/bulkfiles/1/1.ndjson"), "count": 1200}]}),
    )
}

async fn bulk_file(ehr: web::Data<Ehr>, req: HttpRequest) -> HttpResponse {
    if let Some(r) = gate(&ehr, &req) {
        return r;
    }
    let lines: String = (0..1200)
        .map(|i| {
            let day = 1 + (i * 11) % 28;
            format!(
                "{}\n",
                patient(&format!("b{i}"), &format!("2024-02-{day:02}T00:00:00.000Z"))
            )
        })
        .collect();
    HttpResponse::Ok()
        .content_type("application/fhir+ndjson")
        .body(lines)
}

async fn coverage(ehr: web::Data<Ehr>, req: HttpRequest) -> HttpResponse {
    if let Some(r) = gate(&ehr, &req) {
        return r;
    }
    HttpResponse::Ok().json(
        json!({"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Coverage", "id": "cov1"}},
        {"resource": {"resourceType": "Patient", "id": "included"}}]}),
    )
}

async fn push(ehr: web::Data<Ehr>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    if let Some(r) = gate(&ehr, &req) {
        return r;
    }
    let key = req
        .headers()
        .get("if-none-exist")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut pushes = ehr.pushes.lock().unwrap();
    if pushes.iter().any(|(k, _)| *k == key) {
        return HttpResponse::Ok().json(json!({"resourceType": "ClaimResponse", "id": "cr1"}));
    }
    pushes.push((key, serde_json::from_slice(&body).unwrap()));
    HttpResponse::Created()
        .insert_header(("Location", "/fhir/ClaimResponse/cr1/_history/1"))
        .json(json!({"resourceType": "ClaimResponse", "id": "cr1"}))
}

async fn spawn_ehr() -> (Arc<Ehr>, String) {
    let ehr = Arc::new(Ehr::default());
    let data = web::Data::from(ehr.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/auth/token", web::post().to(token))
            .route(
                "/fhir/.well-known/smart-configuration",
                web::get().to(discovery),
            )
            .route("/fhir/Patient/{id}", web::get().to(read_patient))
            .route("/fhir/Patient", web::get().to(search_patients))
            .route("/fhir/Coverage", web::get().to(coverage))
            .route("/fhir/Group/{id}/$export", web::get().to(kick_off))
            .route("/fhir/ClaimResponse", web::post().to(push))
            .route("/bulkstatus/{job}", web::get().to(bulk_status))
            .route("/bulkfiles/{job}/{n}.ndjson", web::get().to(bulk_file))
    })
    .workers(2)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let origin = format!("http://127.0.0.1:{}", server.addrs()[0].port());
    *ehr.origin.lock().unwrap() = origin.clone();
    tokio::spawn(server.run());
    (ehr, origin)
}

/// One audited call: action, resource type, status, and the record's `Debug` text.
type Recorded = (OutboundAction, Option<String>, Option<u16>, String);

/// Records every outbound call (as its `Debug` text too); fails them all when `down`.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Recorded>>,
    down: AtomicBool,
}

#[async_trait::async_trait]
impl OutboundAudit for Recorder {
    async fn record(&self, call: &OutboundCall<'_>) -> Result<(), AuditUnavailable> {
        if self.down.load(SeqCst) {
            return Err(AuditUnavailable);
        }
        self.calls.lock().unwrap().push((
            call.action,
            call.resource_type.map(str::to_owned),
            call.status,
            format!("{call:?}"),
        ));
        Ok(())
    }
}

fn connection(vendor: &str, origin: &str, settings: Value) -> Connection {
    let mut all = json!({"retry_base_ms": 10, "retry_max_delay_ms": 40, "max_attempts": 4,
        "breaker_failures": 5, "breaker_cooldown_ms": 300, "rate_limit_per_second": 1000,
        "export_poll_ms": 10});
    for (k, v) in settings.as_object().unwrap() {
        all[k] = v.clone();
    }
    Connection {
        id: "conn-7".into(),
        vendor: vendor.into(),
        fhir_base_url: format!("{origin}/fhir"),
        client_id: "gw".into(),
        token_url: Some(format!("{origin}/auth/token")),
        credential: Credential::ClientSecret("s3cret".into()),
        scopes: None,
        settings: all.as_object().unwrap().clone(),
    }
}

fn build(connection: &Connection, audit: Arc<Recorder>) -> Arc<dyn EhrAdapter> {
    Registry::built_in()
        .build(
            connection,
            &Profiles::built_in().unwrap(),
            &AdapterContext { audit },
        )
        .unwrap()
}

async fn generic(settings: Value) -> (Arc<Ehr>, Arc<dyn EhrAdapter>, Arc<Recorder>) {
    let (ehr, origin) = spawn_ehr().await;
    let audit = Arc::new(Recorder::default());
    let adapter = build(&connection("generic", &origin, settings), audit.clone());
    (ehr, adapter, audit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_fetched_once_with_basic_auth_and_reused() {
    let (ehr, adapter, _) = generic(json!({})).await;
    assert_eq!(adapter.patient("p1").await.unwrap()["id"], "p1");
    assert_eq!(adapter.patient("p2").await.unwrap()["id"], "p2");
    assert_eq!(ehr.token_requests.load(SeqCst), 1);
    // base64("gw:s3cret")
    assert_eq!(ehr.token_auth.lock().unwrap()[0], "Basic Z3c6czNjcmV0");
    let form = ehr.token_forms.lock().unwrap()[0].clone();
    assert!(form.contains("grant_type=client_credentials"), "{form}");
    assert!(form.contains("scope=system%2FPatient.read"), "{form}");
    assert!(
        !form.contains("s3cret"),
        "the secret travels in the header only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_calls_share_one_token_request() {
    let (ehr, adapter, _) = generic(json!({})).await;
    ehr.token_delay_ms.store(200, SeqCst);
    let calls = (0..20).map(|i| {
        let adapter = adapter.clone();
        async move { adapter.patient(&format!("p{i}")).await }
    });
    let results = futures_util::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(ehr.token_requests.load(SeqCst), 1);
    assert_eq!(ehr.fhir_requests.load(SeqCst), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_replaced_and_the_call_retried_once() {
    let (ehr, adapter, _) = generic(json!({})).await;
    ehr.refused_tokens.lock().unwrap().insert("tok-1".into());
    assert!(adapter.patient("p1").await.is_ok());
    assert_eq!(ehr.token_requests.load(SeqCst), 2);
    assert_eq!(ehr.fhir_requests.load(SeqCst), 2);
    // A second refusal in a row is an authentication failure, not a loop.
    ehr.refused_tokens
        .lock()
        .unwrap()
        .extend(["tok-2".into(), "tok-3".into()]);
    assert!(matches!(
        adapter.patient("p1").await,
        Err(AdapterError::Auth(_))
    ));
    assert_eq!(ehr.token_requests.load(SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_success_within_the_attempt_bound() {
    let (ehr, adapter, _) = generic(json!({})).await;
    ehr.script
        .lock()
        .unwrap()
        .extend([(503, None), (502, None)]);
    assert!(adapter.patient("p1").await.is_ok());
    assert_eq!(ehr.fhir_requests.load(SeqCst), 3);

    ehr.always.store(500, SeqCst);
    let err = adapter.patient("p1").await.unwrap_err();
    assert_eq!(err, AdapterError::Transient("HTTP 500 (transient)".into()));
    assert_eq!(ehr.fhir_requests.load(SeqCst), 3 + 4, "max_attempts = 4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_waited_for_and_a_long_one_is_handed_back() {
    let (ehr, adapter, _) = generic(json!({"retry_after_cap_s": 5})).await;
    ehr.script.lock().unwrap().push_back((429, Some("1")));
    assert!(adapter.patient("p1").await.is_ok());
    let times = ehr.fhir_times.lock().unwrap().clone();
    assert_eq!(times.len(), 2);
    assert!(
        times[1] - times[0] >= Duration::from_millis(950),
        "{:?}",
        times[1] - times[0]
    );

    ehr.script.lock().unwrap().push_back((503, Some("60")));
    let started = Instant::now();
    let err = adapter.patient("p1").await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(60)));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "over the cap: not waited for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_opens_fails_fast_and_half_opens_after_the_cooldown() {
    let (ehr, adapter, audit) =
        generic(json!({"max_attempts": 1, "breaker_failures": 3, "breaker_cooldown_ms": 300}))
            .await;
    assert!(adapter.patient("p1").await.is_ok());
    ehr.always.store(500, SeqCst);
    for _ in 0..3 {
        assert!(
            matches!(adapter.patient("p1").await, Err(AdapterError::Transient(m)) if m.starts_with("HTTP 500"))
        );
    }
    let before = ehr.fhir_requests.load(SeqCst);
    assert_eq!(
        adapter.patient("p1").await.unwrap_err(),
        AdapterError::Transient("circuit open".into())
    );
    assert_eq!(
        ehr.fhir_requests.load(SeqCst),
        before,
        "nothing sent while open"
    );
    let last = audit.calls.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (last.0, last.2),
        (OutboundAction::Read, None),
        "fail-fast calls are audited too"
    );

    ehr.always.store(0, SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(
        adapter.patient("p1").await.is_ok(),
        "the probe goes through"
    );
    assert!(
        adapter.patient("p1").await.is_ok(),
        "and closes the circuit"
    );
    assert_eq!(ehr.fhir_requests.load(SeqCst), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_opens_the_circuit_again() {
    let (ehr, adapter, _) =
        generic(json!({"max_attempts": 1, "breaker_failures": 2, "breaker_cooldown_ms": 200}))
            .await;
    ehr.always.store(503, SeqCst);
    for _ in 0..2 {
        assert!(adapter.patient("p1").await.is_err());
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        matches!(adapter.patient("p1").await, Err(AdapterError::Transient(m)) if m.starts_with("HTTP 503"))
    );
    assert_eq!(
        adapter.patient("p1").await.unwrap_err(),
        AdapterError::Transient("circuit open".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_is_paged_to_the_end_with_a_rising_watermark() {
    let (ehr, adapter, _) = generic(json!({"page_size": 2})).await;
    let pages: Vec<_> = adapter
        .patients_changed_since(Some("2020-01-01T00:00:00Z"))
        .collect()
        .await;
    let pages: Vec<_> = pages.into_iter().map(Result::unwrap).collect();
    assert_eq!(pages.len(), 3);
    let ids: Vec<_> = pages
        .iter()
        .flat_map(|p| {
            p.resources
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(ids, ["p0", "p1", "p2", "p3", "p4", "p5"]);
    assert_eq!(
        pages[0].watermark.as_deref(),
        Some("2024-02-02T00:00:00.000Z")
    );
    assert_eq!(
        pages[2].watermark.as_deref(),
        Some("2024-02-06T00:00:00.000Z")
    );
    let first = ehr.queries.lock().unwrap()[0].clone();
    assert_eq!(
        first,
        "_lastUpdated=gt2020-01-01T00%3A00%3A00Z&_sort=_lastUpdated&_count=2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_link_to_another_origin_is_refused_and_never_fetched() {
    let (ehr, adapter, _) = generic(json!({})).await;
    ehr.evil_next.store(true, SeqCst);
    let pages: Vec<_> = adapter.patients_changed_since(None).collect().await;
    assert_eq!(pages.len(), 1, "the listing ends at the refusal");
    assert!(matches!(&pages[0], Err(AdapterError::Permanent(m)) if m.contains("another origin")));
    // localhost is this very server: had the link been followed, it would have counted.
    assert_eq!(ehr.fhir_requests.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exchange_is_audited_without_ids_queries_or_secrets() {
    let (ehr, adapter, audit) = generic(json!({})).await;
    ehr.script.lock().unwrap().push_back((503, None));
    adapter.patient(PATIENT_ID).await.unwrap();
    let _: Vec<_> = adapter
        .patients_changed_since(Some("2020-01-01T00:00:00Z"))
        .collect()
        .await;
    let calls = audit.calls.lock().unwrap().clone();
    let summary: Vec<_> = calls.iter().map(|c| (c.0, c.1.as_deref(), c.2)).collect();
    assert_eq!(
        summary,
        [
            (OutboundAction::Token, None, Some(200)),
            (OutboundAction::Read, Some("Patient"), Some(503)),
            (OutboundAction::Read, Some("Patient"), Some(200)),
            (OutboundAction::Search, Some("Patient"), Some(200)),
            (OutboundAction::Search, Some("Patient"), Some(200)),
            (OutboundAction::Search, Some("Patient"), Some(200)),
        ]
    );
    for (.., text) in &calls {
        assert!(text.contains("conn-7"));
        for leak in [
            PATIENT_ID,
            "_lastUpdated",
            "2020-01-01",
            "tok-",
            "s3cret",
            "127.0.0.1",
        ] {
            assert!(!text.contains(leak), "{leak} in {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_fails_when_the_audit_trail_is_down() {
    let (ehr, adapter, audit) = generic(json!({})).await;
    audit.down.store(true, SeqCst);
    let err = adapter.patient("p1").await.unwrap_err();
    assert!(matches!(&err, AdapterError::Transient(m) if m.contains("audit")));
    assert_eq!(
        ehr.fhir_requests.load(SeqCst),
        0,
        "no FHIR call without an audited token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_is_discovered_once_and_its_errors_name_the_oauth_code_only() {
    let (ehr, origin) = spawn_ehr().await;
    let audit = Arc::new(Recorder::default());
    let mut conn = connection("generic", &origin, json!({}));
    conn.token_url = None;
    let adapter = build(&conn, audit.clone());
    adapter.patient("p1").await.unwrap();
    adapter.patient("p2").await.unwrap();
    assert_eq!(ehr.discovery_requests.load(SeqCst), 1);
    assert_eq!(audit.calls.lock().unwrap()[0].0, OutboundAction::Discovery);

    let adapter = build(&connection("generic", &origin, json!({})), audit);
    *ehr.token_error.lock().unwrap() = Some("invalid_client");
    let err = adapter.patient("p1").await.unwrap_err();
    assert_eq!(
        err,
        AdapterError::Auth("token endpoint: invalid_client".into())
    );
    assert!(!err.to_string().contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_key_connection_sends_a_verifiable_client_assertion() {
    let (ehr, origin) = spawn_ehr().await;
    let mut conn = connection("generic", &origin, json!({}));
    conn.credential = Credential::PrivateKey {
        pem: include_str!("keys/ec384.pem").into(),
        kid: Some("k1".into()),
    };
    build(&conn, Arc::new(Recorder::default()))
        .patient("p1")
        .await
        .unwrap();
    assert!(ehr.token_auth.lock().unwrap().is_empty(), "no Basic header");
    let form = ehr.token_forms.lock().unwrap()[0].clone();
    let field = |name: &str| {
        form_urlencoded::parse(form.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .unwrap()
    };
    assert_eq!(
        field("client_assertion_type"),
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    let token_url = format!("{origin}/auth/token");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES384);
    validation.set_audience(&[&token_url]);
    validation.set_issuer(&["gw"]);
    let key = jsonwebtoken::DecodingKey::from_ec_pem(include_bytes!("keys/ec384.pub.pem")).unwrap();
    let jwt = field("client_assertion");
    let claims = jsonwebtoken::decode::<Value>(&jwt, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "gw");
    assert_eq!(
        jsonwebtoken::decode_header(&jwt).unwrap().kid.as_deref(),
        Some("k1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ndjson_file_streams_in_bounded_chunks_and_other_origins_are_refused() {
    let (_ehr, origin) = spawn_ehr().await;
    let adapter = build(
        &connection("generic", &origin, json!({})),
        Arc::new(Recorder::default()),
    );
    let file = ExportFile {
        resource_type: "Patient".into(),
        url: format!("{origin}/bulkfiles/1/1.ndjson"),
    };
    let pages: Vec<_> = adapter.download(&file).map(Result::unwrap).collect().await;
    let sizes: Vec<_> = pages.iter().map(|p| p.resources.len()).collect();
    assert_eq!(sizes, [500, 500, 200]);
    assert_eq!(
        pages[2].watermark.as_deref(),
        Some("2024-02-28T00:00:00.000Z")
    );

    let elsewhere = ExportFile {
        resource_type: "Patient".into(),
        url: file.url.replace("127.0.0.1", "localhost"),
    };
    let pages: Vec<_> = adapter.download(&elsewhere).collect().await;
    assert!(matches!(&pages[..], [Err(AdapterError::Permanent(_))]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epic_lists_changed_patients_through_a_group_export() {
    let (ehr, origin) = spawn_ehr().await;
    let mut conn = connection("epic", &origin, json!({"group_id": "grp-1"}));
    conn.credential = Credential::PrivateKey {
        pem: include_str!("keys/rsa.pem").into(),
        kid: None,
    };
    let adapter = build(&conn, Arc::new(Recorder::default()));
    assert_eq!(adapter.vendor(), "epic");
    let pages: Vec<_> = adapter
        .patients_changed_since(Some("2024-01-15T00:00:00Z"))
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(pages.iter().map(|p| p.resources.len()).sum::<usize>(), 1200);
    assert_eq!(
        pages[0].watermark.as_deref(),
        Some("2024-01-15T00:00:00Z"),
        "held until the end"
    );
    assert_eq!(
        pages.last().unwrap().watermark.as_deref(),
        Some("2024-02-28T00:00:00.000Z")
    );
    assert_eq!(ehr.polls.load(SeqCst), 2);
    assert_eq!(
        ehr.queries.lock().unwrap()[0],
        "_type=Patient&_since=2024-01-15T00%3A00%3A00Z"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_statuses_are_pushed_once_per_update_id() {
    let (ehr, adapter, _) = generic(json!({})).await;
    let update = ClaimStatusUpdate {
        claim_id: "cl-9".into(),
        patient_id: "pt-9".into(),
        outcome: "complete".into(),
        disposition: Some("paid".into()),
        update_id: "upd-1".into(),
    };
    assert_eq!(
        adapter
            .push_claim_status(&update)
            .await
            .unwrap()
            .remote_id
            .as_deref(),
        Some("cr1")
    );
    assert_eq!(
        adapter
            .push_claim_status(&update)
            .await
            .unwrap()
            .remote_id
            .as_deref(),
        Some("cr1")
    );
    let pushes = ehr.pushes.lock().unwrap().clone();
    assert_eq!(pushes.len(), 1);
    assert_eq!(
        pushes[0].0,
        "identifier=urn:fhirgate:claim-status-update|upd-1"
    );
    assert_eq!(pushes[0].1["request"]["reference"], "Claim/cl-9");
    let coverages = adapter.coverage_for("pt-9").await.unwrap();
    assert_eq!(coverages.len(), 1, "only Coverage entries");
}

#[tokio::test]
async fn factories_validate_their_settings_by_key() {
    let profiles = Profiles::built_in().unwrap();
    let ctx = AdapterContext::default();
    let key_of = |conn: &Connection| match Registry::built_in().build(conn, &profiles, &ctx) {
        Err(fhirgate_adapters::RegistryError::Setting { key, .. }) => key,
        Err(other) => panic!("{other}"),
        Ok(_) => "ok".into(),
    };
    let origin = "https://ehr.example";
    let mut epic = connection("epic", origin, json!({}));
    assert_eq!(key_of(&epic), "credential", "Epic takes no client secret");
    epic.credential = Credential::PrivateKey {
        pem: include_str!("keys/rsa.pem").into(),
        kid: None,
    };
    assert_eq!(key_of(&epic), "group_id");
    let mut cerner = connection(
        "cerner",
        origin,
        json!({"tenant": "ec2458f2", "page_size": 500}),
    );
    cerner.fhir_base_url = "https://ehr.example/r4/ec2458f2".into();
    assert_eq!(
        key_of(&cerner),
        "page_size",
        "Cerner's _count is at most 200"
    );
    cerner.settings.remove("page_size");
    assert_eq!(key_of(&cerner), "ok");
    cerner.settings.insert("tenant".into(), "other".into());
    assert_eq!(key_of(&cerner), "tenant");
    let generic = connection("generic", origin, json!({"max_attempts": "many"}));
    assert_eq!(key_of(&generic), "max_attempts");
}
