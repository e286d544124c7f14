//! Entry points of the fuzz targets (`fuzz/`, run by `scripts/fuzz`) and of their replay in
//! `cargo test` (`tests/fuzz_replay.rs`). Each takes arbitrary bytes, runs them through the code
//! the gateway runs on a client's or an EHR's input, and panics when a promise to the user
//! breaks: a refusal that is not a 4xx with an OperationOutcome (or an OAuth error), a refusal
//! that quotes the submitted data, an accepted resource that does not read back the same or is
//! stored invalid, a signature check that passes for a wrong signature.
//!
//! Nothing here touches a database or the network; where the handlers need one (conditional
//! creates, reference checks, client keys), the fuzz targets stop at the pure step before it.
//! Not part of the gateway's API.

use std::sync::LazyLock;

use actix_web::body::MessageBody;
use actix_web::ResponseError;
use jsonwebtoken::jwk::JwkSet;
use serde_json::{json, Map, Value};

use crate::crypto::{KeyId, Keyring, PhiVault, VersionRef};
use crate::domain::{new_resource_id, ResourceId};
use crate::fhir::bundle::{self, Entry, Failure, Method};
use crate::fhir::resources::search::{self, Cursor};
use crate::fhir::resources::{self, check_resource, conditional_key, kind_of, Kind, KINDS};
use crate::fhir::validate::validate;
use crate::gate::token_endpoint::{self, OAuthError};
use crate::gate::{Caller, Role, ScopeSet};
use crate::http::ApiError;
use crate::store::Expect;
use crate::sync::webhooks::notification::{self, EventAction, Notification};
use crate::sync::webhooks::PatientEvent;

/// A fixed key for sealing and blind indexes (the bytes 0..32).
const KEY_SPEC: &str = "fuzz:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

static VAULT: LazyLock<PhiVault> = LazyLock::new(|| {
    let keyring = Keyring::parse(KEY_SPEC).expect("the fuzz key spec parses");
    PhiVault::new(&keyring, &KeyId::parse("fuzz").expect("a valid key id"))
        .expect("the fuzz vault opens")
});

static PRACTICE: LazyLock<ResourceId> =
    LazyLock::new(|| ResourceId::parse("practice", "fuzz-practice").expect("a valid id"));

/// A caller allowed every interaction on every type, so that scopes stop nothing.
static CALLER: LazyLock<Caller> = LazyLock::new(|| Caller {
    client_id: "fuzz-client".into(),
    practice_id: PRACTICE.clone(),
    role: Role::ExternalSystem,
    scopes: ScopeSet::parse("system/*.*").expect("a valid scope"),
});

/// The FHIR base the fuzzed Bundles are posted to.
pub const FHIR_BASE_URL: &str = "https://fhirgate.example/fhir/r4/";

// ---------------------------------------------------------------------------------------------
// FHIR resources

/// `POST /{type}` and `PUT /{type}/{id}` bodies: `parse_body` (JSON, `resourceType`, structural
/// validation) of the type the body names (Patient when it names no served type), then what
/// `prepare` stores. Also `validate` against any type the body names, served or not, as for
/// contained resources and Bundle entries.
pub fn fhir_resource(data: &[u8]) {
    let value: Option<Value> = serde_json::from_slice(data).ok();
    let declared = value
        .as_ref()
        .and_then(|v| v.get("resourceType"))
        .and_then(Value::as_str);
    if let (Some(value), Some(declared)) = (&value, declared) {
        if let Err(issues) = validate(declared, value) {
            check_issues(
                &issues
                    .iter()
                    .map(|i| i.to_outcome_issue())
                    .collect::<Vec<_>>(),
                value,
            );
        }
    }
    let kind = declared
        .and_then(kind_of)
        .unwrap_or(&resources::patient::PATIENT);
    match resources::parse_body(kind, data) {
        Err(err) => {
            check_api_error(&err);
            if let (ApiError::Invalid { issues, .. }, Some(value)) = (&err, &value) {
                check_issues(issues, value);
            }
        }
        Ok(resource) => check_accepted(kind, resource),
    }
}

/// What happens to an accepted resource: it re-serialises to itself, and the version the server
/// stores (its id and meta stamped) is valid, opens from its seal, and indexes.
fn check_accepted(kind: &Kind, resource: Map<String, Value>) {
    let json = serde_json::to_vec(&resource).expect("an accepted resource serialises");
    let again: Map<String, Value> =
        serde_json::from_slice(&json).expect("an accepted resource reads back");
    assert_eq!(again, resource, "an accepted resource reads back the same");
    let id = "fuzz-1";
    let prepared = resources::prepare(kind, &VAULT, &PRACTICE, resource, id, Expect::Absent)
        .expect("an accepted resource can be prepared");
    let stored: Value = serde_json::from_slice(&prepared.json).expect("the stored version is JSON");
    assert_eq!(stored["id"], id);
    assert_eq!(stored["meta"]["versionId"], "1");
    if let Err(issues) = validate(kind.resource_type, &stored) {
        let found: Vec<(&str, &str)> = issues
            .iter()
            .map(|i| (i.path.as_str(), i.message.as_str()))
            .collect();
        panic!("the stored version of an accepted resource is invalid: {found:?}");
    }
    let (_, sealed) = prepared.write.sealed.as_ref().expect("a write is sealed");
    let at = VersionRef {
        practice_id: PRACTICE.as_str(),
        resource_type: kind.resource_type,
        id,
        version_id: 1,
    };
    let opened = VAULT.open(at, sealed).expect("the sealed version opens");
    assert_eq!(opened.as_slice(), prepared.json.as_slice());
    assert_eq!(
        search::index_rows(kind, &stored, &VAULT),
        prepared.write.index,
        "index rows depend on the resource only"
    );
}

// ---------------------------------------------------------------------------------------------
// Search

/// Sample resources the residual checks of a search plan run against.
static SAMPLES: LazyLock<Vec<Value>> = LazyLock::new(|| {
    vec![
        json!({
            "resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1974-12-25",
            "identifier": [{ "system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345" }],
            "name": [{ "family": "Chalmers", "given": ["Peter", "James"] }, { "text": "Jim" }],
        }),
        json!({
            "resourceType": "Encounter", "id": "e1", "status": "finished",
            "subject": { "reference": "Patient/p1" },
            "period": { "start": "2024-03-05T09:00:00Z", "end": "2024-03-05T10:00:00Z" },
        }),
        json!({
            "resourceType": "Claim", "id": "c1", "status": "active", "created": "2024-03-06",
            "patient": { "reference": "Patient/p1" },
        }),
        json!({ "resourceType": "Coverage", "beneficiary": { "reference": "Patient/p1" } }),
    ]
});

/// `GET /{type}?{query}`, `POST /{type}/_search` and `If-None-Exist`: the input is
/// `{type}?{query}` (Patient without a `?`); the query is parsed as the handler does and
/// planned, strict and lenient; `_cursor` values are decoded.
pub fn search_params(data: &[u8]) {
    let (ty, query) = match data.iter().position(|b| *b == b'?') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b"Patient"[..], data),
    };
    let kind = std::str::from_utf8(ty)
        .ok()
        .and_then(kind_of)
        .unwrap_or(KINDS[ty.len() % KINDS.len()]);
    let params: Vec<(String, String)> = form_urlencoded::parse(query).into_owned().collect();
    for (key, value) in &params {
        if key == "_cursor" {
            if let Some(cursor) = Cursor::decode(value) {
                assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
            }
        }
    }
    let strict = search::plan(kind, &VAULT, &params, false);
    let lenient = search::plan(kind, &VAULT, &params, true);
    for result in [&strict, &lenient] {
        match result {
            Err(err) => {
                check_api_error(err);
                let values = params
                    .iter()
                    .map(|(_, v)| Value::String(v.clone()))
                    .collect();
                check_not_echoed(&[err.to_string()], &Value::Array(values));
            }
            Ok(plan) => {
                assert!((0..=search::MAX_COUNT).contains(&plan.count()));
                for sample in SAMPLES.iter() {
                    plan.matches(sample);
                    search::index_rows(kind, sample, &VAULT);
                }
            }
        }
    }
    assert!(
        strict.is_err() || lenient.is_ok(),
        "a search valid in strict handling is valid in lenient handling"
    );
    // If-None-Exist: the same parameters in any order hold the same lock.
    let reversed: String = {
        let mut s = form_urlencoded::Serializer::new(String::new());
        s.extend_pairs(params.iter().rev());
        s.finish()
    };
    if let Ok(query) = std::str::from_utf8(query) {
        assert_eq!(
            conditional_key(&PRACTICE, kind.resource_type, query),
            conditional_key(&PRACTICE, kind.resource_type, &reversed),
            "a condition's lock does not depend on the order of its parameters"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Transaction and batch Bundles

/// `POST /fhir/r4`: `read_bundle`, each entry's `parse_entry`, then the store-free steps of
/// `execute` (one write per resource, URN `fullUrl`s, ids, reference rewriting and checks) for
/// the whole transaction or each batch entry; conditional creates are planned as searches and
/// taken to match nothing. What would be written is prepared and must be valid.
pub fn transaction_bundle(data: &[u8]) {
    let submitted = match bundle::read_bundle(data) {
        Ok(submitted) => submitted,
        Err(err) => return check_api_error(&err),
    };
    let parsed: Vec<Result<Entry, Failure>> = submitted
        .entries
        .iter()
        .enumerate()
        .map(|(i, raw)| bundle::parse_entry(i, raw, FHIR_BASE_URL, &CALLER))
        .collect();
    for (raw, entry) in submitted.entries.iter().zip(&parsed) {
        if let Err(failure) = entry {
            check_failure(failure, raw);
            bundle::unparsed_request(raw);
        }
    }
    if submitted.transaction {
        if let Ok(entries) = parsed.into_iter().collect::<Result<Vec<_>, _>>() {
            rehearse(entries, true, &submitted.entries);
        }
    } else {
        for entry in parsed.into_iter().flatten() {
            rehearse(vec![entry], false, &submitted.entries);
        }
    }
}

/// `execute` up to its first database access, and what it would write.
fn rehearse(mut entries: Vec<Entry>, check_references: bool, raw: &[Value]) {
    let raw = Value::Array(raw.to_vec());
    if let Err(failure) = bundle::check_distinct(&entries) {
        return check_failure(&failure, &raw);
    }
    for e in &mut entries {
        if e.method != Method::Post {
            continue;
        }
        if let Some(condition) = &e.if_none_exist {
            // What `search::find_matches` plans before it asks the store.
            let params: Vec<(String, String)> = form_urlencoded::parse(condition.as_bytes())
                .into_owned()
                .collect();
            if !params.is_empty() {
                if let Err(err) = search::plan(e.kind, &VAULT, &params, false) {
                    return check_api_error(&err);
                }
            }
        }
        e.id.get_or_insert_with(new_resource_id);
    }
    let urns = bundle::urn_targets(&entries);
    let wanted = match bundle::resolve_references(&mut entries, &urns, check_references) {
        Ok(wanted) => wanted,
        Err(failure) => return check_failure(&failure, &raw),
    };
    for (ty, ids) in &wanted {
        assert!(kind_of(ty).is_some(), "only served types are looked up");
        for id in ids.keys() {
            ResourceId::parse("id", id.as_str()).expect("only valid ids are looked up");
        }
    }
    for e in entries {
        let Some(resource) = e.resource else { continue };
        let mut stack: Vec<(Option<&str>, &Value)> = resource
            .iter()
            .map(|(k, v)| (Some(k.as_str()), v))
            .collect();
        while let Some((key, value)) = stack.pop() {
            match value {
                Value::String(text) if key == Some("reference") => {
                    assert!(!text.starts_with("urn:"), "a URN reference is left");
                }
                Value::Object(map) => stack.extend(map.iter().map(|(k, v)| (Some(k.as_str()), v))),
                Value::Array(items) => stack.extend(items.iter().map(|v| (key, v))),
                _ => {}
            }
        }
        // Rewriting references keeps the resource valid; what is stored is checked as for a
        // single create.
        let rewritten = check_resource(e.kind, Value::Object(resource)).unwrap_or_else(|issues| {
            panic!("a resource with rewritten references is invalid: {issues:?}")
        });
        check_accepted(e.kind, rewritten);
    }
}

// ---------------------------------------------------------------------------------------------
// Webhooks

/// The webhook secret of the fuzzed connection (Standard Webhooks' documentation example).
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// `POST /webhooks/{connection}`: the input is `webhook-id`, `webhook-timestamp` and
/// `webhook-signature` (or an `Authorization` value), one a line, then the body. The signature
/// must match exactly when one of its `v1,` entries is the request's signature; the body is
/// parsed as a signed generic event and as a FHIR subscription notification, which queues each
/// patient once and at most one pull, and what would be sealed into the inbox reads back within
/// a bound set by the body.
pub fn webhook(data: &[u8]) {
    let parts: Vec<&[u8]> = data.splitn(4, |b| *b == b'\n').collect();
    let line = |i: usize| String::from_utf8_lossy(parts.get(i).copied().unwrap_or_default());
    let (id, timestamp, signatures) = (line(0), line(1), line(2));
    let body = parts.get(3).copied().unwrap_or_default();

    let key = notification::signing_key(WEBHOOK_SECRET).expect("the fuzz secret is valid");
    let expected = notification::sign(&key, &id, &timestamp, body);
    let matches = notification::signature_matches(&key, &id, &timestamp, body, &signatures);
    let listed = signatures.split(' ').any(|s| s == expected);
    assert_eq!(
        matches, listed,
        "a signature header is accepted exactly when it lists the request's signature"
    );
    assert!(notification::signature_matches(
        &key,
        &id,
        &timestamp,
        body,
        &format!("{signatures} {expected}")
    ));
    let mut other = body.to_vec();
    other.push(b' ');
    assert!(
        !notification::signature_matches(&key, &id, &timestamp, &other, &expected),
        "a signature does not carry over to another body"
    );
    if notification::bearer_matches(&signatures, WEBHOOK_SECRET) {
        assert!(signatures.contains(WEBHOOK_SECRET));
    }
    let _ = notification::check_timestamp(&timestamp, 1_767_225_600, 300);
    let _ = notification::signing_key(&signatures);

    if notification::valid_event_id(&id) {
        if let Ok(parsed) = notification::parse_generic(&id, body) {
            check_notification(&parsed, body);
        }
    }
    if let Ok(parsed) = notification::parse_fhir(body) {
        check_notification(&parsed, body);
    }
}

fn check_notification(parsed: &Notification, body: &[u8]) {
    assert!(
        parsed.events.len() <= body.len().max(1),
        "events are bounded by the body"
    );
    if let Some(mark) = &parsed.sequence {
        assert!(notification::valid_event_id(&mark.subscription));
        assert!(mark.first.is_none_or(|first| first <= mark.through));
    }
    let mut carried = 0;
    let mut patients = std::collections::HashSet::new();
    let mut resyncs = 0;
    for event in &parsed.events {
        assert!(!event.event_id.is_empty());
        let EventAction::Patient { ehr_id, resource } = &event.action else {
            resyncs += 1;
            continue;
        };
        ResourceId::parse("patient", ehr_id.as_str()).expect("a patient id is a FHIR id");
        assert!(
            patients.insert(ehr_id.as_str()),
            "a notification queues each patient once"
        );
        // What the inbox row seals, and what the worker opens.
        let sealed = serde_json::to_vec(&PatientEvent {
            patient_id: ehr_id.clone(),
            resource: resource.clone(),
        })
        .expect("an event serialises");
        carried += sealed.len();
        let opened: PatientEvent = serde_json::from_slice(&sealed).expect("an event reads back");
        assert_eq!(&opened.patient_id, ehr_id);
        assert_eq!(&opened.resource, resource);
    }
    assert!(resyncs <= 1, "a notification queues at most one pull");
    assert!(
        carried <= 2 * body.len() + 256 * parsed.events.len(),
        "the inbox rows of a notification are bounded by its body"
    );
}

// ---------------------------------------------------------------------------------------------
// Client assertions

/// The public keys of the fuzzed client (kid `fuzz-es384`, P-384; kid `fuzz-rs384`, RSA 2048):
/// the seeds in `fuzz/seeds/client_assertion` are signed with their private halves, which were
/// thrown away.
pub const CLIENT_JWKS: &str = r#"{
  "keys": [
    {
      "kty": "EC",
      "crv": "P-384",
      "kid": "fuzz-es384",
      "alg": "ES384",
      "use": "sig",
      "x": "oPRsrsVE5juT-0Bq83vj3EqEfkM2NJamPZcZmxLhSd6MrxMzu28Ly6FayA8IkJAA",
      "y": "o6o0AgnSnleSyJ_vmjWToUbllJuZKGq4UBSexPhKMu3yLoQaJ2HESQXQHWNYu7nM"
    },
    {
      "kty": "RSA",
      "kid": "fuzz-rs384",
      "alg": "RS384",
      "use": "sig",
      "n": "sPXP85ZEC-vrxf1t3FVgH5BB-LlabsAJsw_NtZWWFR4Bouxh70975M_HLtwGleQZAXIOYTrRrkUXkEjd3FATB1md7K6f8_JzVdpNYs-8iZrvppaYld4LgMjGAzzRxRSEKUo8CslDx4ncZeb173B1t6tGubS87m57OFnrW9EbK4tPzWHjVszneBzenhyVg_MjUhI08hbqzeGWkVc0qEtzWVc7vwaK6DjVzCyOETs5RKewWLvJ16fspBH4KBbT1rcPLIDRo44kJ-UDveOL9DAWZVV1zFB12JGFFzl6S5qGgWIDVZYSjvSFvGOpYPJGmBFCCHMbQPU7sHNkM7FaVnXHLw",
      "e": "AQAB"
    }
  ]
}"#;

/// The token endpoint URL the fuzzed assertions are addressed to.
pub const TOKEN_URL: &str = "https://fhirgate.example/auth/token";

static JWKS: LazyLock<JwkSet> =
    LazyLock::new(|| serde_json::from_str(CLIENT_JWKS).expect("the fuzz JWKS parses"));

/// `POST /auth/token`: the form body is read as `read_request` does (grant, assertion type,
/// scopes, the JWT's header and unverified claims); the key is then taken from a fixed client
/// JWKS and the assertion verified as for a client of the store. Every refusal is an OAuth error
/// (400 or 401) that quotes nothing of the request.
pub fn client_assertion(data: &[u8]) {
    let request = match token_endpoint::read_request(data) {
        Ok(request) => request,
        Err(err) => return check_oauth_error(&err),
    };
    assert!(matches!(
        request.alg,
        jsonwebtoken::Algorithm::RS384 | jsonwebtoken::Algorithm::ES384
    ));
    assert!(!request.requested.is_empty());
    assert!((1..=128).contains(&request.client_id.len()));
    assert!(request.assertion.len() <= 16 * 1024);
    let key = match token_endpoint::key_in_set(&JWKS, &request.kid, request.alg) {
        Ok(key) => key,
        Err(err) => return check_oauth_error(&err),
    };
    match token_endpoint::verify_assertion(
        &request.assertion,
        request.alg,
        &key,
        TOKEN_URL,
        &request.client_id,
    ) {
        Ok(verified) => {
            assert!((1..=256).contains(&verified.jti.len()));
        }
        Err(err) => check_oauth_error(&err),
    }
}

// ---------------------------------------------------------------------------------------------
// What every refusal must look like

fn body_of(response: actix_web::HttpResponse) -> Value {
    let bytes = response
        .into_body()
        .try_into_bytes()
        .unwrap_or_else(|_| panic!("an error body is in memory"));
    serde_json::from_slice(&bytes).expect("an error body is JSON")
}

/// A client error (4xx) answered with an OperationOutcome of at least one issue.
fn check_api_error(err: &ApiError) {
    let status = err.status_code();
    assert!(
        status.is_client_error(),
        "a refusal of client input is a 4xx, not {status}: {err:?}"
    );
    let response = err.error_response();
    assert_eq!(response.status(), status);
    let outcome = body_of(response);
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let issues = outcome["issue"]
        .as_array()
        .expect("an OperationOutcome has issues");
    assert!(!issues.is_empty());
    for issue in issues {
        assert!(issue["severity"].is_string() && issue["code"].is_string());
    }
}

/// A Bundle failure: a 4xx with OperationOutcome issues that quote nothing of the Bundle.
fn check_failure(failure: &Failure, bundle: &Value) {
    check_issues(&failure.issues, bundle);
    let err = ApiError::from(Failure {
        status: failure.status,
        issues: failure.issues.clone(),
    });
    assert_eq!(err.status_code(), failure.status);
    check_api_error(&err);
}

/// OperationOutcome issues: each with a severity and a code, none quoting the submitted data.
fn check_issues(issues: &[Value], submitted: &Value) {
    assert!(!issues.is_empty(), "a refusal lists at least one issue");
    assert!(issues.len() <= 101, "at most 100 issues and a summary");
    let mut texts = Vec::new();
    for issue in issues {
        assert!(issue["severity"].is_string() && issue["code"].is_string());
        if let Some(d) = issue["diagnostics"].as_str() {
            texts.push(d.to_owned());
        }
        for e in issue["expression"].as_array().into_iter().flatten() {
            texts.push(e.as_str().unwrap_or_default().to_owned());
        }
    }
    check_not_echoed(&texts, submitted);
}

/// No string value of `submitted` that looks like personal data (six characters or more, with
/// an `@` or a character outside ASCII) appears in `texts`. Element names may be quoted (those
/// shaped like FHIR's are), values may not.
fn check_not_echoed(texts: &[String], submitted: &Value) {
    let mut stack = vec![submitted];
    while let Some(value) = stack.pop() {
        match value {
            Value::String(s) if s.len() >= 6 && s.contains(|c: char| c == '@' || !c.is_ascii()) => {
                for text in texts {
                    assert!(
                        !text.contains(s.as_str()),
                        "a refusal quotes a submitted value"
                    );
                }
            }
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.values()),
            _ => {}
        }
    }
}

/// An OAuth error: 400 or 401 with `error` and `error_description`.
fn check_oauth_error(err: &OAuthError) {
    let response = err.response();
    let status = response.status().as_u16();
    assert!(
        status == 400 || status == 401,
        "a refused token request is 400 or 401, not {status}"
    );
    let body = body_of(response);
    assert_eq!(body["error"], err.code());
    assert!(matches!(
        err.code(),
        "invalid_request" | "invalid_client" | "invalid_scope" | "unsupported_grant_type"
    ));
    assert!(body["error_description"].is_string());
}
