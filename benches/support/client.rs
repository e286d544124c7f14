//! A bench practice's API client: a new practice, a client registered with an ES384 key, its
//! access token (SMART backend services, as a real integration gets one), and the few calls the
//! benches make with it.

use fhirgate::domain::{NewPractice, PracticeName, ResourceId, TimeZoneName};
use fhirgate::gate::{ClientKeys, NewApiClient, Role, ScopeSet};
use reqwest::Client;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// One client of a bench practice, at the gateway.
pub struct Api {
    pub http: Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| failed(path, &e))?;
        let status = res.status();
        let body: Value = res.json().await.map_err(|e| failed(path, &e))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!("{path}: {status}"))
        }
    }

    /// Creates a resource; its id.
    pub async fn create(&self, resource: Value) -> Result<String, String> {
        let ty = resource["resourceType"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let body = self.post(&format!("/fhir/r4/{ty}"), &resource).await?;
        Ok(body["id"].as_str().unwrap_or_default().to_owned())
    }

    /// Sets a claim's status; the update id queued for the EHR and the change's `updated_at`.
    pub async fn change(
        &self,
        claim: &str,
        status: &str,
    ) -> Result<(String, OffsetDateTime), String> {
        let body = self
            .post(
                &format!("/api/v1/claims/{claim}/status"),
                &json!({ "status": status }),
            )
            .await?;
        let id = body["push"]["update_id"]
            .as_str()
            .ok_or("no update queued")?
            .to_owned();
        let at = body["updated_at"]
            .as_str()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .ok_or("no updated_at")?;
        Ok((id, at))
    }
}

/// "path: error", "path: timed out" when the client's timeout ran out (the soak bench counts those).
fn failed(path: &str, e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("{path}: timed out")
    } else {
        format!("{path}: {e}")
    }
}

/// A client (with `role` and `scopes`) of a new practice, registered with an ES384 key straight
/// in the store, and its access token from the gateway at `base`.
pub async fn bench_client(
    store: &dyn fhirgate::store::Store,
    http: &Client,
    base: &str,
    role: Role,
    scopes: &str,
) -> (ResourceId, String) {
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let pair = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).expect("generate a key");
    let point = pair.public_key().as_ref();
    let jwks = json!({ "keys": [{
        "kty": "EC", "crv": "P-384", "kid": "bench-key", "alg": "ES384",
        "x": b64(&point[1..49]), "y": b64(&point[49..97]),
    }] });
    let practice = store
        .create_practice(&NewPractice {
            name: PracticeName::parse("Bench Practice").expect("valid name"),
            timezone: TimeZoneName::default(),
            npi: None,
            tax_id: None,
        })
        .await
        .expect("create the bench practice");
    let client = store
        .create_client(&NewApiClient {
            practice_id: practice.id.clone(),
            name: "bench client".into(),
            role,
            scopes: ScopeSet::parse(scopes).expect("valid scope"),
            keys: ClientKeys::inline(&jwks.to_string()).expect("valid JWKS"),
        })
        .await
        .expect("register the bench client");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let token_url = format!("{base}/auth/token");
    let claims = json!({
        "iss": client.client_id, "sub": client.client_id, "aud": token_url,
        "exp": now + 240, "jti": uuid::Uuid::new_v4().to_string(),
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384);
    header.kid = Some("bench-key".into());
    let key = jsonwebtoken::EncodingKey::from_ec_der(pair.to_pkcs8v1().expect("export").as_ref());
    let assertion = jsonwebtoken::encode(&header, &claims, &key).expect("sign the assertion");
    let token: Value = http
        .post(&token_url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", scopes),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ])
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token response");
    (
        practice.id,
        token["access_token"]
            .as_str()
            .expect("an access token")
            .to_owned(),
    )
}
