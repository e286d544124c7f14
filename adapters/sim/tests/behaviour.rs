//! The simulator's HTTP contract (SPEC.md), exercised with a plain reqwest client as an adapter
//! would: tokens and their refusals, paging, `_lastUpdated`, Epic's refusal, Bulk export, claim
//! update idempotency and each fault knob.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use fhirgate_ehr_sim::{
    keys, Malformed, Personality, SigningAlg, SimConfig, SimCredential, Simulator,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

fn now_s() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn start(p: Personality, patients: usize) -> Simulator {
    let mut c = SimConfig::new(p);
    c.patients = patients;
    Simulator::start(c).expect("simulator starts")
}

fn claims(sim: &Simulator) -> Value {
    json!({
        "iss": sim.client_id(), "sub": sim.client_id(), "aud": sim.token_url(),
        "exp": now_s() + 240, "iat": now_s(), "jti": uuid::Uuid::new_v4().to_string(),
    })
}

fn sign(sim: &Simulator, claims: &Value) -> String {
    let key = sim.client_key().expect("a generated key");
    let (alg, enc) = match key.alg {
        SigningAlg::ES384 => (
            Algorithm::ES384,
            EncodingKey::from_ec_pem(key.private_pem.as_bytes()).unwrap(),
        ),
        SigningAlg::RS384 => (
            Algorithm::RS384,
            EncodingKey::from_rsa_pem(key.private_pem.as_bytes()).unwrap(),
        ),
    };
    let mut h = Header::new(alg);
    h.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&h, claims, &enc).unwrap()
}

async fn request_token(sim: &Simulator, assertion: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(sim.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("scope", "system/Patient.read system/Coverage.read"),
        ])
        .send()
        .await
        .unwrap()
}

async fn token(sim: &Simulator) -> String {
    let res = match sim.client_secret() {
        Some(secret) => reqwest::Client::new()
            .post(sim.token_url())
            .basic_auth(sim.client_id(), Some(secret))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "system/Patient.read system/Coverage.read"),
            ])
            .send()
            .await
            .unwrap(),
        None => request_token(sim, &sign(sim, &claims(sim))).await,
    };
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

async fn get(url: &str, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn oauth_error(res: reqwest::Response, status: u16, error: &str) {
    assert_eq!(res.status(), status);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], error, "{body}");
}

/// Follows `next` links from `url` and returns every Patient id in order.
async fn pull_all(url: &str, token: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut next = Some(url.to_string());
    while let Some(u) = next.take() {
        let res = get(&u, token).await;
        assert_eq!(res.status(), 200);
        let b: Value = res.json().await.unwrap();
        assert_eq!(b["resourceType"], "Bundle");
        for e in b["entry"].as_array().unwrap() {
            ids.push(e["resource"]["id"].as_str().unwrap().to_string());
        }
        next = b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
    }
    ids
}

#[tokio::test]
async fn an_epic_assertion_gets_a_token_that_reads_a_patient() {
    let sim = start(Personality::Epic, 5);
    let res = request_token(&sim, &sign(&sim, &claims(&sim))).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "system/Patient.read system/Coverage.read");
    let id = &sim.patient_ids()[2];
    let res = get(
        &format!("{}/Patient/{id}", sim.fhir_base_url()),
        body["access_token"].as_str().unwrap(),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), sim.patient(id).unwrap());
    let res = get(
        &format!("{}/Patient/nope", sim.fhir_base_url()),
        body["access_token"].as_str().unwrap(),
    )
    .await;
    assert_eq!(res.status(), 404);
    assert_eq!(sim.controls().counters().tokens_granted, 1);
}

#[tokio::test]
async fn an_rs384_key_works_too() {
    let mut c =
        SimConfig::new(Personality::Generic).with_key(keys::generate(SigningAlg::RS384).unwrap());
    c.patients = 1;
    let sim = Simulator::start(c).unwrap();
    token(&sim).await;
}

#[tokio::test]
async fn each_bad_assertion_is_refused() {
    let sim = start(Personality::Epic, 1);
    let c = claims(&sim);
    let with = |k: &str, v: Value| {
        let mut c = claims(&sim);
        c[k] = v;
        c
    };
    // Wrong audience, issuer, subject; exp past; exp too far ahead.
    for bad in [
        with("aud", json!("http://elsewhere/token")),
        with("iss", json!("someone-else")),
        with("sub", json!("someone-else")),
        with("exp", json!(now_s() - 60)),
        with("exp", json!(now_s() + 600)),
    ] {
        oauth_error(
            request_token(&sim, &sign(&sim, &bad)).await,
            401,
            "invalid_client",
        )
        .await;
    }
    // A replayed jti.
    let jwt = sign(&sim, &c);
    assert_eq!(request_token(&sim, &jwt).await.status(), 200);
    oauth_error(request_token(&sim, &jwt).await, 401, "invalid_client").await;
    // HS256 (a shared-secret alg) and a key the simulator does not know.
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(&sim),
        &EncodingKey::from_secret(b"k"),
    )
    .unwrap();
    oauth_error(request_token(&sim, &hs).await, 401, "invalid_client").await;
    let other = keys::generate(SigningAlg::ES384).unwrap();
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::ES384),
        &claims(&sim),
        &EncodingKey::from_ec_pem(other.private_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    oauth_error(request_token(&sim, &forged).await, 401, "invalid_client").await;
    // Wrong grant type and a scope that is not a system scope.
    let res = reqwest::Client::new()
        .post(sim.token_url())
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    oauth_error(res, 400, "unsupported_grant_type").await;
    let res = reqwest::Client::new()
        .post(sim.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", sign(&sim, &claims(&sim)).as_str()),
            ("scope", "patient/Patient.read"),
        ])
        .send()
        .await
        .unwrap();
    oauth_error(res, 400, "invalid_scope").await;
    let counters = sim.controls().counters();
    assert_eq!((counters.tokens_granted, counters.tokens_refused), (1, 10));
}

#[tokio::test]
async fn cerner_takes_a_basic_secret_and_refuses_a_wrong_one() {
    let sim = start(Personality::Cerner, 3);
    assert!(sim
        .fhir_base_url()
        .ends_with(&format!("/r4/{}", sim.tenant())));
    assert!(sim
        .token_url()
        .contains(&format!("/tenants/{}/", sim.tenant())));
    let t = token(&sim).await;
    assert!(!t.is_empty());
    let res = reqwest::Client::new()
        .post(sim.token_url())
        .basic_auth(sim.client_id(), Some("wrong"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.read"),
        ])
        .send()
        .await
        .unwrap();
    oauth_error(res, 401, "invalid_client").await;
    // Cerner documents v1 scopes only.
    let res = reqwest::Client::new()
        .post(sim.token_url())
        .basic_auth(sim.client_id(), sim.client_secret())
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.rs"),
        ])
        .send()
        .await
        .unwrap();
    oauth_error(res, 400, "invalid_scope").await;
}

#[tokio::test]
async fn an_expired_or_unknown_token_gets_401_with_www_authenticate() {
    let mut c = SimConfig::new(Personality::Generic);
    c.patients = 2;
    c.token_ttl = Duration::from_secs(1);
    let sim = Simulator::start(c).unwrap();
    let t = token(&sim).await;
    let url = format!("{}/Patient/{}", sim.fhir_base_url(), sim.patient_ids()[0]);
    assert_eq!(get(&url, &t).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let res = get(&url, &t).await;
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.headers()["www-authenticate"],
        r#"Bearer error="invalid_token""#
    );
    assert_eq!(
        res.json::<Value>().await.unwrap()["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(get(&url, "made-up").await.status(), 401);
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 401);
    // expire_tokens: a fresh token stops working at once.
    let t = token(&sim).await;
    sim.controls().expire_tokens();
    assert_eq!(get(&url, &t).await.status(), 401);
    assert_eq!(sim.controls().counters().unauthorized_sent, 4);
}

#[tokio::test]
async fn paging_to_the_end_returns_every_patient_once_in_last_updated_order() {
    for p in [Personality::Cerner, Personality::Generic] {
        let sim = start(p, 1234);
        let t = token(&sim).await;
        let first = format!(
            "{}/Patient?_lastUpdated=gt2000-01-01T00:00:00Z&_count=100",
            sim.fhir_base_url()
        );
        let res: Value = get(&first, &t).await.json().await.unwrap();
        assert_eq!(res["total"], 1234);
        let next = res["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .unwrap();
        assert!(next["url"].as_str().unwrap().starts_with(sim.origin()));
        let ids = pull_all(&first, &t).await;
        assert_eq!(ids, sim.patient_ids(), "{p:?}");
    }
}

#[tokio::test]
async fn cerner_caps_count_at_200() {
    let sim = start(Personality::Cerner, 450);
    let t = token(&sim).await;
    let b: Value = get(
        &format!(
            "{}/Patient?_lastUpdated=ge2000-01-01&_count=500",
            sim.fhir_base_url()
        ),
        &t,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(b["entry"].as_array().unwrap().len(), 200);
}

#[tokio::test]
async fn last_updated_gt_is_strict() {
    let sim = start(Personality::Generic, 300);
    let t = token(&sim).await;
    let pivot = sim.patient(&sim.patient_ids()[100]).unwrap();
    let at = pivot["meta"]["lastUpdated"].as_str().unwrap();
    let url = format!(
        "{}/Patient?_lastUpdated=gt{at}&_sort=_lastUpdated&_count=1000",
        sim.fhir_base_url()
    );
    let ids = pull_all(&url.replace('+', "%2B"), &t).await;
    assert_eq!(ids, sim.patient_ids()[101..].to_vec());
    let ge = pull_all(&url.replace("=gt", "=ge"), &t).await;
    assert_eq!(ge.len(), 200);
    let since =
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).unwrap();
    assert_eq!(sim.patients_changed_after(since).len(), 199);
}

#[tokio::test]
async fn epic_refuses_a_last_updated_only_search_but_finds_by_identifier() {
    let sim = start(Personality::Epic, 20);
    let t = token(&sim).await;
    let res = get(
        &format!(
            "{}/Patient?_lastUpdated=gt2020-01-01T00:00:00Z",
            sim.fhir_base_url()
        ),
        &t,
    )
    .await;
    assert_eq!(res.status(), 400);
    let oo: Value = res.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert_eq!(oo["issue"][0]["code"], "required");
    let p = sim.patient(&sim.patient_ids()[7]).unwrap();
    let mrn = p["identifier"][0]["value"].as_str().unwrap();
    assert_eq!(
        p["identifier"][0]["system"],
        "urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14"
    );
    let url = format!(
        "{}/Patient?identifier=urn:oid:1.2.840.114350.1.13.0.1.7.5.737384.14|{mrn}",
        sim.fhir_base_url()
    );
    let b: Value = get(&url, &t).await.json().await.unwrap();
    assert_eq!(b["total"], 1);
    assert_eq!(b["entry"][0]["resource"]["id"], p["id"]);
}

#[tokio::test]
async fn coverage_search_returns_the_patients_coverages() {
    let sim = start(Personality::Generic, 30);
    let t = token(&sim).await;
    let id = sim
        .patient_ids()
        .into_iter()
        .find(|id| !sim.coverages(id).is_empty())
        .unwrap();
    for param in ["patient", "beneficiary"] {
        let b: Value = get(
            &format!("{}/Coverage?{param}=Patient/{id}", sim.fhir_base_url()),
            &t,
        )
        .await
        .json()
        .await
        .unwrap();
        let got: Vec<Value> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"].clone())
            .collect();
        assert_eq!(got, sim.coverages(&id));
    }
}

fn claim_response(update: &str, outcome: &str) -> Value {
    json!({
        "resourceType": "ClaimResponse", "status": "active",
        "identifier": [{"system": "urn:fhirgate:claim-status-update", "value": update}],
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "professional"}]},
        "use": "claim", "patient": {"reference": "Patient/p1"}, "created": "2025-01-01",
        "insurer": {"display": "Payer"}, "request": {"reference": "Claim/c-9"},
        "outcome": outcome, "disposition": format!("{outcome} by payer"),
    })
}

async fn post_update(sim: &Simulator, t: &str, update: &str, outcome: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/ClaimResponse", sim.fhir_base_url()))
        .bearer_auth(t)
        .header("Content-Type", "application/fhir+json")
        .header(
            "If-None-Exist",
            format!("identifier=urn:fhirgate:claim-status-update|{update}"),
        )
        .body(claim_response(update, outcome).to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_claim_update_applies_once_whatever_the_retries() {
    let sim = start(Personality::Cerner, 1);
    let t = token(&sim).await;
    let first = post_update(&sim, &t, "u-1", "queued").await;
    assert_eq!(first.status(), 201);
    let location = first.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&format!("{}/ClaimResponse/", sim.fhir_base_url())));
    let stored: Value = first.json().await.unwrap();
    let again = post_update(&sim, &t, "u-1", "queued").await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap(), stored);
    assert_eq!(post_update(&sim, &t, "u-2", "complete").await.status(), 201);
    let updates = sim.claim_updates("c-9");
    let seen: Vec<_> = updates
        .iter()
        .map(|u| (u.update_id.clone().unwrap(), u.outcome.clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("u-1".into(), "queued".into()),
            ("u-2".into(), "complete".into())
        ]
    );
    assert_eq!(sim.controls().counters().claim_updates_applied, 2);
    // An If-None-Exist naming another identifier than the body carries is refused.
    let res = reqwest::Client::new()
        .post(format!("{}/ClaimResponse", sim.fhir_base_url()))
        .bearer_auth(&t)
        .header(
            "If-None-Exist",
            "identifier=urn:fhirgate:claim-status-update|u-3",
        )
        .body(claim_response("u-4", "complete").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

async fn export(sim: &Simulator, t: &str, url: &str) -> Value {
    let client = reqwest::Client::new();
    let no_prefer = client.get(url).bearer_auth(t).send().await.unwrap();
    assert_eq!(no_prefer.status(), 400);
    let res = client
        .get(url)
        .bearer_auth(t)
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let status = res.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(status.starts_with(&format!("{}/bulkstatus/", sim.origin())));
    let poll = get(&status, t).await;
    assert_eq!(poll.status(), 202);
    assert_eq!(poll.headers()["retry-after"], "1");
    assert!(poll.headers().contains_key("x-progress"));
    let done = get(&status, t).await;
    assert_eq!(done.status(), 200);
    done.json().await.unwrap()
}

async fn lines_of(url: &str, t: &str) -> Vec<Value> {
    let res = get(url, t).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/fhir+ndjson");
    res.text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_group_export_delivers_every_patient_and_coverage_in_files() {
    let mut c = SimConfig::new(Personality::Epic);
    c.patients = 250;
    c.file_lines = 100;
    let sim = Simulator::start(c).unwrap();
    let t = token(&sim).await;
    // Epic exports by Group only.
    let sys = reqwest::Client::new()
        .get(format!("{}/$export", sim.fhir_base_url()))
        .bearer_auth(&t)
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(sys.status(), 400);
    let m = export(
        &sim,
        &t,
        &format!(
            "{}/Group/{}/$export?_type=Patient,Coverage",
            sim.fhir_base_url(),
            sim.group_id()
        ),
    )
    .await;
    assert_eq!(m["requiresAccessToken"], true);
    assert!(m["transactionTime"].is_string());
    let mut patients = Vec::new();
    let mut coverages = Vec::new();
    for o in m["output"].as_array().unwrap() {
        let url = o["url"].as_str().unwrap();
        assert_eq!(
            reqwest::get(url).await.unwrap().status(),
            401,
            "files need the token"
        );
        let lines = lines_of(url, &t).await;
        assert_eq!(o["count"], lines.len());
        assert!(lines.len() <= 100);
        match o["type"].as_str().unwrap() {
            "Patient" => patients.extend(lines),
            _ => coverages.extend(lines),
        }
    }
    let ids: Vec<String> = patients
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, sim.patient_ids());
    let expected: usize = sim
        .patient_ids()
        .iter()
        .map(|id| sim.coverages(id).len())
        .sum();
    assert_eq!(coverages.len(), expected);
}

#[tokio::test]
async fn an_export_since_holds_only_later_patients_and_their_coverages() {
    let sim = start(Personality::Generic, 200);
    let t = token(&sim).await;
    let at = sim.patient(&sim.patient_ids()[149]).unwrap()["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_string();
    let m = export(
        &sim,
        &t,
        &format!("{}/$export?_since={at}", sim.fhir_base_url()),
    )
    .await;
    let mut n_pat = 0;
    let mut n_cov = 0;
    for o in m["output"].as_array().unwrap() {
        for r in lines_of(o["url"].as_str().unwrap(), &t).await {
            if r["resourceType"] == "Patient" {
                n_pat += 1;
            } else {
                let pid = r["beneficiary"]["reference"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("Patient/")
                    .to_string();
                assert!(sim.patient_ids()[150..].contains(&pid));
                n_cov += 1;
            }
        }
    }
    assert_eq!(n_pat, 50);
    let expected: usize = sim.patient_ids()[150..]
        .iter()
        .map(|id| sim.coverages(id).len())
        .sum();
    assert_eq!(n_cov, expected);
}

#[tokio::test]
async fn a_cancelled_export_is_gone() {
    let sim = start(Personality::Cerner, 5);
    let t = token(&sim).await;
    let res = reqwest::Client::new()
        .get(format!(
            "{}/Group/{}/$export",
            sim.fhir_base_url(),
            sim.group_id()
        ))
        .bearer_auth(&t)
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    let status = res.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let del = reqwest::Client::new()
        .delete(&status)
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 202);
    assert_eq!(get(&status, &t).await.status(), 404);
}

#[tokio::test]
async fn fail_next_and_throttle_answer_then_recover() {
    let sim = start(Personality::Generic, 3);
    let t = token(&sim).await;
    let url = format!("{}/Patient/{}", sim.fhir_base_url(), sim.patient_ids()[0]);
    sim.controls().fail_next(2, 503, Some(7));
    let r = get(&url, &t).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(get(&url, &t).await.status(), 503);
    assert_eq!(get(&url, &t).await.status(), 200);
    sim.controls().throttle_next(1, 3);
    let r = get(&url, &t).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    assert_eq!(
        r.json::<Value>().await.unwrap()["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(get(&url, &t).await.status(), 200);
    assert_eq!(sim.controls().counters().fhir_requests, 5);
}

#[tokio::test]
async fn a_failure_rate_fails_about_that_share_of_calls() {
    let sim = start(Personality::Generic, 3);
    let t = token(&sim).await;
    let url = format!("{}/Patient/{}", sim.fhir_base_url(), sim.patient_ids()[0]);
    sim.controls().set_failure_rate(0.5);
    let mut failed = 0;
    for _ in 0..100 {
        if get(&url, &t).await.status() == 500 {
            failed += 1;
        }
    }
    assert!((25..=75).contains(&failed), "{failed} of 100 failed");
    sim.controls().set_failure_rate(0.0);
    assert_eq!(get(&url, &t).await.status(), 200);
}

#[tokio::test]
async fn latency_delays_responses() {
    let sim = start(Personality::Generic, 1);
    let t = token(&sim).await;
    sim.controls().set_latency(Duration::from_millis(300));
    let began = std::time::Instant::now();
    get(
        &format!("{}/Patient/{}", sim.fhir_base_url(), sim.patient_ids()[0]),
        &t,
    )
    .await;
    assert!(began.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn malformed_search_responses_are_served_when_asked() {
    let sim = start(Personality::Generic, 10);
    let t = token(&sim).await;
    let url = format!("{}/Patient?_count=5", sim.fhir_base_url());
    sim.controls().malformed_next(1, Malformed::Truncated);
    let text = get(&url, &t).await.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err());
    sim.controls()
        .malformed_next(1, Malformed::WrongResourceType);
    let b: Value = get(&url, &t).await.json().await.unwrap();
    assert_ne!(b["resourceType"], "Bundle");
    let b: Value = get(&url, &t).await.json().await.unwrap();
    assert_eq!(b["resourceType"], "Bundle");
    sim.controls().malformed_next(2, Malformed::WrongEntryType);
    let b: Value = get(&url, &t).await.json().await.unwrap();
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["entry"][0]["resource"]["resourceType"], "Observation");
    assert_eq!(b["entry"][1]["resource"]["resourceType"], "Patient");
    let id = sim.patient_ids()[0].clone();
    let read = format!("{}/Patient/{id}", sim.fhir_base_url());
    let r: Value = get(&read, &t).await.json().await.unwrap();
    assert_eq!(
        (r["resourceType"].as_str(), r["id"].as_str()),
        (Some("Observation"), Some(id.as_str()))
    );
    let r: Value = get(&read, &t).await.json().await.unwrap();
    assert_eq!(r["resourceType"], "Patient");
}

#[tokio::test]
async fn touched_patients_come_back_in_a_changed_since_pull() {
    let sim = start(Personality::Cerner, 100);
    let t = token(&sim).await;
    let last = sim.patient(sim.patient_ids().last().unwrap()).unwrap()["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_string();
    let before = sim.patient_ids();
    let touched = sim.controls().touch(3);
    assert_eq!(touched.len(), 3);
    let ids = pull_all(
        &format!("{}/Patient?_lastUpdated=gt{last}", sim.fhir_base_url()),
        &t,
    )
    .await;
    assert_eq!(ids, touched);
    for id in &touched {
        let p = sim.patient(id).unwrap();
        assert_eq!(p["meta"]["versionId"], "2");
        assert!(before.contains(id));
    }
}

#[tokio::test]
async fn every_personality_publishes_smart_configuration() {
    for p in [Personality::Epic, Personality::Cerner, Personality::Generic] {
        let sim = start(p, 1);
        let conf: Value = reqwest::get(format!(
            "{}/.well-known/smart-configuration",
            sim.fhir_base_url()
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        assert_eq!(conf["token_endpoint"], sim.token_url());
        let method = if p == Personality::Cerner {
            "client_secret_basic"
        } else {
            "private_key_jwt"
        };
        assert_eq!(conf["token_endpoint_auth_methods_supported"][0], method);
    }
}

#[tokio::test]
async fn ten_thousand_patients_pull_quickly() {
    let began = std::time::Instant::now();
    let sim = start(Personality::Generic, 10_000);
    let t = token(&sim).await;
    let ids = pull_all(&format!("{}/Patient?_count=500", sim.fhir_base_url()), &t).await;
    assert_eq!(ids.len(), 10_000);
    // Debug build, shared machine: generous, but a quadratic page walk would blow it.
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "{:?}",
        began.elapsed()
    );
}

#[test]
fn generated_patients_and_coverages_are_valid_r4() {
    let tool = std::env::var("FHIRGATE_VALIDATE_FHIR").unwrap_or_else(|_| {
        format!(
            "{}/../../../shared/tools/validate-fhir",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    assert!(
        std::path::Path::new(&tool).exists(),
        "validate-fhir not found at {tool}; set FHIRGATE_VALIDATE_FHIR"
    );
    let mut sample = Vec::new();
    for p in [Personality::Epic, Personality::Cerner, Personality::Generic] {
        for g in fhirgate_ehr_sim::synthetic::generate(p, 60, 9, 1_700_000_000_000) {
            sample.push(g.patient);
            sample.extend(g.coverages);
        }
    }
    let mut child = Command::new(&tool)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("validate-fhir starts");
    {
        let stdin = child.stdin.as_mut().expect("stdin");
        for r in &sample {
            writeln!(stdin, "{r}").expect("write resource");
        }
    }
    let out = child.wait_with_output().expect("validate-fhir runs");
    assert!(
        out.status.success(),
        "invalid FHIR:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains(&format!("{} passed, 0 failed", sample.len())));
}

#[test]
fn a_public_key_credential_that_is_not_a_key_fails_start() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let mut c = SimConfig::new(Personality::Generic);
    c.credential = SimCredential::PublicKeyPem("not a key".into());
    assert!(Simulator::start(c).is_err());
}

/// RFC 6749 section 2.3.1: the client id and secret are form-urlencoded before Basic encoding,
/// so a `:` or `+` in either survives; the raw (unencoded) form of such a secret is refused.
#[tokio::test]
async fn basic_client_credentials_are_form_urlencoded_per_rfc_6749() {
    use base64::Engine as _;
    let mut c = SimConfig::new(Personality::Cerner);
    c.patients = 1;
    c.client_id = "sim:cerner account".into();
    c.credential = SimCredential::ClientSecret("s3cr+t:/x y".into());
    let sim = Simulator::start(c).unwrap();
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic = |id: &str, secret: &str| {
        let raw = format!("{id}:{secret}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    };
    let ask = |authorization: String| {
        let url = sim.token_url();
        async move {
            reqwest::Client::new()
                .post(url)
                .header("authorization", authorization)
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("scope", "system/Patient.read"),
                ])
                .send()
                .await
                .unwrap()
        }
    };
    let encoded = ask(basic(&enc("sim:cerner account"), &enc("s3cr+t:/x y"))).await;
    assert_eq!(encoded.status(), 200);
    // Unencoded, the id's ':' splits it early and the '+' would read as a space.
    let raw = ask(basic("sim:cerner account", "s3cr+t:/x y")).await;
    oauth_error(raw, 401, "invalid_client").await;
}

/// athenahealth: every search names the practice (`ah-practice`), kept across pages; a missing
/// or foreign practice is 400.
#[tokio::test]
async fn athena_searches_need_the_practice_and_keep_it_across_pages() {
    let mut c = SimConfig::new(Personality::Athena);
    c.patients = 5;
    c.page_size = 2;
    let sim = Simulator::start(c).unwrap();
    assert_eq!(sim.tenant(), "195900");
    let t = token(&sim).await;
    let base = sim.fhir_base_url();
    assert!(base.ends_with("/fhir/r4"));
    let practice = "ah-practice=Organization%2Fa-1.Practice-195900";
    assert_eq!(
        get(&format!("{base}/Patient?_count=2"), &t).await.status(),
        400
    );
    let foreign = "ah-practice=Organization%2Fa-1.Practice-1";
    assert_eq!(
        get(&format!("{base}/Patient?{foreign}"), &t).await.status(),
        400
    );
    let id = &sim.patient_ids()[0];
    let coverage = get(&format!("{base}/Coverage?patient={id}"), &t).await;
    assert_eq!(coverage.status(), 400);
    let mut url = Some(format!("{base}/Patient?{practice}&_sort=_lastUpdated"));
    let mut seen = 0;
    while let Some(u) = url {
        let res = get(&u, &t).await;
        assert_eq!(res.status(), 200);
        let bundle: Value = res.json().await.unwrap();
        seen += bundle["entry"].as_array().map_or(0, Vec::len);
        url = bundle["link"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
            .and_then(|l| l["url"].as_str())
            .map(str::to_owned);
    }
    assert_eq!(seen, 5);
    let coverage = get(&format!("{base}/Coverage?patient={id}&{practice}"), &t).await;
    assert_eq!(coverage.status(), 200);
}
