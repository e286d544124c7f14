//! SMART backend-services authorization: `/auth/token` with signed client assertions, SMART
//! discovery, and bearer tokens on the gated routes.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
use base64::Engine;
use fhirgate::domain::{NewPractice, PracticeName, TimeZoneName};
use fhirgate::gate::{ClientKeys, ClientStatus, NewApiClient, Role, ScopeSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp};

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A P-384 key pair and its public JWK.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub key: EncodingKey,
    pub jwk: Value,
}

impl SigningKey {
    pub fn es384(kid: &str) -> Self {
        let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
        let pkcs8 = pair.to_pkcs8v1().unwrap();
        let point = pair.public_key().as_ref(); // 0x04 || X || Y
        let jwk = json!({
            "kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384", "use": "sig",
            "x": b64url(&point[1..49]), "y": b64url(&point[49..97]),
        });
        Self {
            kid: kid.into(),
            key: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk,
        }
    }

    pub fn jwks(keys: &[&SigningKey]) -> String {
        json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
    }
}

pub struct TestClient {
    pub client_id: String,
    pub key: SigningKey,
    pub token_url: String,
}

impl TestClient {
    /// Claims of a valid assertion, to be altered by a test.
    pub fn claims(&self) -> Value {
        json!({
            "iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
            "exp": now() + 240, "iat": now(), "jti": uuid::Uuid::new_v4().to_string(),
        })
    }

    pub fn sign(&self, claims: &Value) -> String {
        sign_with(&self.key, claims)
    }
}

pub fn sign_with(key: &SigningKey, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES384);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.key).unwrap()
}

/// Creates a practice and an `external_system` client of it allowed `scopes`, with an inline JWKS.
pub async fn register_client(app: &TestApp, scopes: &str) -> TestClient {
    register_client_as(app, scopes, Role::ExternalSystem).await
}

/// [`register_client`] with the client's role.
pub async fn register_client_as(app: &TestApp, scopes: &str, role: Role) -> TestClient {
    let practice = app
        .store
        .create_practice(&NewPractice {
            name: PracticeName::parse("Lakeside Therapy").unwrap(),
            timezone: TimeZoneName::default(),
            npi: None,
            tax_id: None,
        })
        .await
        .unwrap();
    let key = SigningKey::es384("key-1");
    let client = app
        .store
        .create_client(&NewApiClient {
            practice_id: practice.id,
            name: "Partner EHR".into(),
            role,
            scopes: ScopeSet::parse(scopes).unwrap(),
            keys: ClientKeys::inline(&SigningKey::jwks(&[&key])).unwrap(),
        })
        .await
        .unwrap();
    TestClient {
        client_id: client.client_id,
        key,
        token_url: app.url("/auth/token"),
    }
}

pub async fn request_token(app: &TestApp, assertion: &str, scope: &str) -> reqwest::Response {
    app.client
        .post(app.url("/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", scope),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", assertion),
        ])
        .send()
        .await
        .unwrap()
}

/// A new practice's client of `role`, allowed and granted `scopes`, with its access token.
pub struct Session {
    pub token: String,
    pub client_id: String,
    pub practice_id: String,
    pub client: TestClient,
}

/// An access token from `app` (any gateway on the same database) for an existing client.
pub async fn token_at(app: &TestApp, client: &TestClient, scopes: &str) -> String {
    let mut claims = client.claims();
    claims["aud"] = json!(app.url("/auth/token"));
    let res = request_token(app, &client.sign(&claims), scopes).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

pub async fn session(app: &TestApp, scopes: &str, role: Role) -> Session {
    let client = register_client_as(app, scopes, role).await;
    let res = request_token(app, &client.sign(&client.claims()), scopes).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let practice_id = app
        .store
        .get_client(&client.client_id)
        .await
        .unwrap()
        .practice_id;
    Session {
        token: body["access_token"].as_str().unwrap().to_owned(),
        client_id: client.client_id.clone(),
        practice_id: practice_id.to_string(),
        client,
    }
}

/// A practice with an `external_system` client allowed `scopes`, and an access token for them.
pub async fn access_token(app: &TestApp, scopes: &str) -> String {
    session(app, scopes, Role::ExternalSystem).await.token
}

async fn oauth_error(res: reqwest::Response, status: u16, code: &str) {
    assert_eq!(res.status(), status);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], code, "{body}");
}

#[tokio::test]
async fn a_client_signing_with_its_key_gets_a_token_with_the_granted_scopes() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs system/Coverage.rs").await;
    let res = request_token(
        &app,
        &client.sign(&client.claims()),
        "system/Patient.read system/Claim.cruds",
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-store");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["token_type"], "bearer");
    assert_eq!(body["expires_in"], 300);
    assert_eq!(body["scope"], "system/Patient.read");
    assert!(body["access_token"].as_str().unwrap().len() > 20);
}

#[tokio::test]
async fn an_expired_assertion_is_refused() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    let mut claims = client.claims();
    claims["exp"] = json!(now() - 120);
    let res = request_token(&app, &client.sign(&claims), "system/Patient.rs").await;
    oauth_error(res, 401, "invalid_client").await;
}

#[tokio::test]
async fn a_replayed_assertion_is_refused() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    let assertion = client.sign(&client.claims());
    assert_eq!(
        request_token(&app, &assertion, "system/Patient.rs")
            .await
            .status(),
        200
    );
    let res = request_token(&app, &assertion, "system/Patient.rs").await;
    oauth_error(res, 401, "invalid_client").await;
}

#[tokio::test]
async fn an_assertion_signed_by_another_key_is_refused() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    let impostor = SigningKey::es384("key-1"); // same kid, different key
    let res = request_token(
        &app,
        &sign_with(&impostor, &client.claims()),
        "system/Patient.rs",
    )
    .await;
    oauth_error(res, 401, "invalid_client").await;
}

#[tokio::test]
async fn an_assertion_for_another_audience_is_refused() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    let mut claims = client.claims();
    claims["aud"] = json!("https://elsewhere.example/token");
    let res = request_token(&app, &client.sign(&claims), "system/Patient.rs").await;
    oauth_error(res, 401, "invalid_client").await;
}

#[tokio::test]
async fn an_assertion_living_longer_than_five_minutes_is_refused() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    let mut claims = client.claims();
    claims["exp"] = json!(now() + 3600);
    let res = request_token(&app, &client.sign(&claims), "system/Patient.rs").await;
    oauth_error(res, 401, "invalid_client").await;
}

#[tokio::test]
async fn an_assertion_without_jti_or_with_iss_other_than_sub_is_refused() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    let mut claims = client.claims();
    claims.as_object_mut().unwrap().remove("jti");
    let res = request_token(&app, &client.sign(&claims), "system/Patient.rs").await;
    oauth_error(res, 401, "invalid_client").await;
    let mut claims = client.claims();
    claims["sub"] = json!("someone-else");
    let res = request_token(&app, &client.sign(&claims), "system/Patient.rs").await;
    oauth_error(res, 401, "invalid_client").await;
}

#[tokio::test]
async fn a_disabled_or_unknown_client_is_refused() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    app.store
        .set_client_status(&client.client_id, ClientStatus::Disabled)
        .await
        .unwrap();
    let res = request_token(&app, &client.sign(&client.claims()), "system/Patient.rs").await;
    oauth_error(res, 401, "invalid_client").await;

    let mut claims = client.claims();
    claims["iss"] = json!("no-such-client");
    claims["sub"] = json!("no-such-client");
    let res = request_token(&app, &client.sign(&claims), "system/Patient.rs").await;
    oauth_error(res, 401, "invalid_client").await;
}

#[tokio::test]
async fn scopes_outside_the_allowed_set_and_bad_grants_are_refused() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    let res = request_token(&app, &client.sign(&client.claims()), "system/Claim.cruds").await;
    oauth_error(res, 400, "invalid_scope").await;
    let res = request_token(&app, &client.sign(&client.claims()), "system/Patient.zz").await;
    oauth_error(res, 400, "invalid_scope").await;

    let res = app
        .client
        .post(app.url("/auth/token"))
        .form(&[("grant_type", "password"), ("scope", "system/Patient.rs")])
        .send()
        .await
        .unwrap();
    oauth_error(res, 400, "unsupported_grant_type").await;
}

#[tokio::test]
async fn gated_fhir_routes_need_a_valid_bearer_token_and_metadata_stays_public() {
    let app = spawn_app().await;
    let res = app.get("/fhir/r4/Patient/123").await;
    assert_eq!(res.status(), 401);
    assert!(res.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let outcome: Value = res.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");

    let res = app
        .client
        .get(app.url("/fhir/r4/Patient/123"))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let client = register_client(&app, "system/Patient.rs").await;
    let token: Value = request_token(&app, &client.sign(&client.claims()), "system/Patient.rs")
        .await
        .json()
        .await
        .unwrap();
    let res = app
        .client
        .get(app.url("/fhir/r4/Patient/123"))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    // Past the gate: no Patient interaction is registered yet, so the FHIR 404.
    assert_eq!(res.status(), 404);

    assert_eq!(app.get("/fhir/r4/metadata").await.status(), 200);
}

#[tokio::test]
async fn smart_configuration_is_published_at_the_root_and_under_the_fhir_base() {
    let app = spawn_app().await;
    for path in [
        "/.well-known/smart-configuration",
        "/fhir/r4/.well-known/smart-configuration",
    ] {
        let res = app.get(path).await;
        assert_eq!(res.status(), 200, "{path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["token_endpoint"], app.url("/auth/token"));
        assert_eq!(
            body["token_endpoint_auth_signing_alg_values_supported"],
            json!(["RS384", "ES384"])
        );
        let caps = body["capabilities"].as_array().unwrap();
        for cap in [
            "client-confidential-asymmetric",
            "permission-v1",
            "permission-v2",
        ] {
            assert!(caps.contains(&json!(cap)), "{cap}");
        }
    }
}

/// Serves a JWKS document that the test can replace, like a client's key endpoint.
async fn serve_jwks(initial: String) -> (String, std::sync::Arc<std::sync::Mutex<String>>) {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let doc = std::sync::Arc::new(std::sync::Mutex::new(initial));
    let shared = doc.clone();
    let server = HttpServer::new(move || {
        let doc = shared.clone();
        App::new().route(
            "/jwks.json",
            web::get().to(move || {
                let body = doc.lock().unwrap().clone();
                async move {
                    HttpResponse::Ok()
                        .content_type("application/json")
                        .body(body)
                }
            }),
        )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let url = format!("http://{}/jwks.json", server.addrs()[0]);
    tokio::spawn(server.run());
    (url, doc)
}

#[tokio::test]
async fn a_jwks_url_is_fetched_and_refetched_when_the_client_rotates_to_a_new_kid() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    let old = SigningKey::es384("url-key-1");
    let (url, doc) = serve_jwks(SigningKey::jwks(&[&old])).await;
    app.store
        .set_client_keys(&client.client_id, &ClientKeys::url(&url).unwrap())
        .await
        .unwrap();

    let res = request_token(
        &app,
        &sign_with(&old, &client.claims()),
        "system/Patient.rs",
    )
    .await;
    assert_eq!(res.status(), 200);

    // The client publishes a new key and signs with it: the cached set lacks the kid, so the
    // gateway fetches the set again.
    let new = SigningKey::es384("url-key-2");
    *doc.lock().unwrap() = SigningKey::jwks(&[&new]);
    let res = request_token(
        &app,
        &sign_with(&new, &client.claims()),
        "system/Patient.rs",
    )
    .await;
    assert_eq!(res.status(), 200);

    // The retired key no longer verifies.
    let res = request_token(
        &app,
        &sign_with(&old, &client.claims()),
        "system/Patient.rs",
    )
    .await;
    oauth_error(res, 401, "invalid_client").await;
}

#[tokio::test]
async fn an_rs384_assertion_is_accepted_too() {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};

    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
    );
    let components = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    let jwk = json!({
        "kty": "RSA", "kid": "rsa-1", "alg": "RS384", "use": "sig",
        "n": b64url(&components.n), "e": b64url(&components.e),
    });
    app.store
        .set_client_keys(
            &client.client_id,
            &ClientKeys::inline(&json!({ "keys": [jwk] }).to_string()).unwrap(),
        )
        .await
        .unwrap();
    let mut header = Header::new(Algorithm::RS384);
    header.kid = Some("rsa-1".into());
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    let assertion = jsonwebtoken::encode(&header, &client.claims(), &key).unwrap();
    let res = request_token(&app, &assertion, "system/Patient.rs").await;
    assert_eq!(res.status(), 200);
}
