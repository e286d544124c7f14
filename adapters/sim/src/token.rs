//! The token endpoint and the bearer check. Client authentication follows the credential the
//! simulator was started with: a `private_key_jwt` assertion (SMART Backend Services,
//! <https://hl7.org/fhir/smart-app-launch/backend-services.html>; Epic:
//! <https://fhir.epic.com/Documentation?docId=oauth2&section=BackendOAuth2Guide>) verified with
//! jsonwebtoken (alg RS384/ES384 only, iss = sub = client id, aud = this endpoint's URL, exp at
//! most 5 minutes ahead and not past, jti never seen before), or an HTTP Basic client secret
//! (Cerner system accounts, <https://docs.oracle.com/en/industries/health/millennium-platform-apis/fhir-authorization-framework/>)
//! compared in constant time over SHA-256 digests. Never logs an assertion, secret or token.

use std::collections::{HashMap, HashSet};

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::error::{OAuthError, SimError};
use crate::state::{lock, now_ms, AtomicCounters, Grant, Shared};
use crate::SimCredential;

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const MAX_ASSERTION_LIFETIME_S: i64 = 300;
/// Clock skew tolerated on `exp`, as most servers allow.
const SKEW_S: i64 = 5;

pub(crate) enum ClientVerifier {
    Key { key: DecodingKey, alg: Algorithm },
    Secret([u8; 32]),
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl ClientVerifier {
    pub fn new(credential: &SimCredential) -> Result<Self, String> {
        match credential {
            SimCredential::ClientSecret(s) => Ok(Self::Secret(sha256(s.as_bytes()))),
            SimCredential::PublicKeyPem(pem) => {
                if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                    Ok(Self::Key {
                        key,
                        alg: Algorithm::RS384,
                    })
                } else if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
                    Ok(Self::Key {
                        key,
                        alg: Algorithm::ES384,
                    })
                } else {
                    Err("the client public key is neither an RSA nor an EC public key PEM".into())
                }
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    jti: String,
    exp: i64,
}

fn verify_assertion(sh: &Shared, form: &HashMap<String, String>) -> Result<(), OAuthError> {
    let ClientVerifier::Key { key, alg } = &sh.verifier else {
        return Err(OAuthError::new(
            "invalid_client",
            "this client authenticates with a client secret",
        ));
    };
    if form.get("client_assertion_type").map(String::as_str) != Some(JWT_BEARER) {
        return Err(OAuthError::new(
            "invalid_client",
            "client_assertion_type must be jwt-bearer",
        ));
    }
    let jwt = form
        .get("client_assertion")
        .ok_or_else(|| OAuthError::new("invalid_client", "client_assertion is missing"))?;
    let head = jsonwebtoken::decode_header(jwt)
        .map_err(|_| OAuthError::new("invalid_client", "client_assertion is not a JWT"))?;
    if !matches!(head.alg, Algorithm::RS384 | Algorithm::ES384) {
        return Err(OAuthError::new(
            "invalid_client",
            "assertion alg must be RS384 or ES384",
        ));
    }
    if head.alg != *alg {
        return Err(OAuthError::new(
            "invalid_client",
            "assertion alg does not match the registered key",
        ));
    }
    let settings = &sh.settings;
    let mut v = Validation::new(*alg);
    v.leeway = SKEW_S as u64;
    v.set_audience(&[settings.token_url()]);
    v.set_issuer(&[settings.client_id.as_str()]);
    v.sub = Some(settings.client_id.clone());
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let data = jsonwebtoken::decode::<Claims>(jwt, key, &v).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        let what = match e.kind() {
            K::ExpiredSignature => "assertion has expired",
            K::InvalidAudience => "assertion aud is not this token endpoint",
            K::InvalidIssuer => "assertion iss is not the client id",
            K::InvalidSubject => "assertion sub is not the client id",
            K::InvalidSignature => "assertion signature does not verify",
            K::MissingRequiredClaim(_) => "assertion lacks a required claim",
            _ => "assertion is invalid",
        };
        OAuthError::new("invalid_client", what)
    })?;
    let now_s = now_ms() / 1000;
    if data.claims.exp > now_s + MAX_ASSERTION_LIFETIME_S + SKEW_S {
        return Err(OAuthError::new(
            "invalid_client",
            "assertion exp is more than 5 minutes ahead",
        ));
    }
    let mut jtis = lock(&sh.jtis);
    jtis.retain(|_, exp| *exp + SKEW_S >= now_s);
    if jtis.contains_key(&data.claims.jti) {
        return Err(OAuthError::new(
            "invalid_client",
            "assertion jti was already used",
        ));
    }
    jtis.insert(data.claims.jti, data.claims.exp);
    Ok(())
}

fn verify_basic(sh: &Shared, req: &HttpRequest) -> Result<(), OAuthError> {
    let ClientVerifier::Secret(expected) = &sh.verifier else {
        return Err(OAuthError::new(
            "invalid_client",
            "this client authenticates with a signed assertion",
        ));
    };
    let refused = || OAuthError::new("invalid_client", "client authentication failed");
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .ok_or_else(refused)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| refused())?;
    let decoded = String::from_utf8(decoded).map_err(|_| refused())?;
    // RFC 6749 section 2.3.1: the client id and secret are form-urlencoded before they are
    // joined with ':' and base64-encoded, so a ':' in either arrives as %3A.
    let (id, secret) = decoded.split_once(':').ok_or_else(refused)?;
    let form_decode = |s: &str| -> String {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let (id, secret) = (form_decode(id), form_decode(secret));
    let (id, secret) = (id.as_str(), secret.as_str());
    let id_ok = sha256(id.as_bytes()).ct_eq(&sha256(sh.settings.client_id.as_bytes()));
    let secret_ok = sha256(secret.as_bytes()).ct_eq(expected);
    if bool::from(id_ok & secret_ok) {
        Ok(())
    } else {
        Err(refused())
    }
}

/// Checks the scopes asked for: SMART `system/` scopes, v1 (`.read`, `.write`, `.*`) for every
/// vendor and v2 (`.rs`, `.cruds`...) for generic servers only (Cerner and Epic document v1).
fn check_scope(sh: &Shared, scope: Option<&String>) -> Result<String, OAuthError> {
    let scope = scope
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| OAuthError::new("invalid_scope", "scope is required"))?;
    let v2_ok = sh.settings.personality.traits().v2_scopes;
    for s in scope.split_whitespace() {
        let ok = s
            .strip_prefix("system/")
            .and_then(|r| r.split_once('.'))
            .is_some_and(|(res, perm)| {
                let res_ok =
                    res == "*" || (!res.is_empty() && res.chars().all(|c| c.is_ascii_alphabetic()));
                let v1 = matches!(perm, "read" | "write" | "*");
                let v2 = !perm.is_empty()
                    && perm.chars().all(|c| "cruds".contains(c))
                    && perm.chars().collect::<HashSet<_>>().len() == perm.len();
                res_ok && (v1 || (v2_ok && v2))
            });
        if !ok {
            return Err(OAuthError::new(
                "invalid_scope",
                "a requested scope is not a supported system scope",
            ));
        }
    }
    Ok(scope.to_string())
}

pub(crate) async fn token(
    sh: web::Data<Shared>,
    req: HttpRequest,
    form: web::Form<HashMap<String, String>>,
) -> Result<HttpResponse, OAuthError> {
    let result = grant(&sh, &req, &form);
    match &result {
        Ok(_) => AtomicCounters::bump(&sh.counters.tokens_granted),
        Err(_) => AtomicCounters::bump(&sh.counters.tokens_refused),
    }
    result
}

fn grant(
    sh: &Shared,
    req: &HttpRequest,
    form: &HashMap<String, String>,
) -> Result<HttpResponse, OAuthError> {
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err(OAuthError::new(
            "unsupported_grant_type",
            "grant_type must be client_credentials",
        ));
    }
    match sh.verifier {
        ClientVerifier::Key { .. } => verify_assertion(sh, form)?,
        ClientVerifier::Secret(_) => verify_basic(sh, req)?,
    }
    let scope = check_scope(sh, form.get("scope"))?;
    let token = format!("sim.{}", uuid::Uuid::new_v4().simple());
    let ttl = sh.settings.token_ttl;
    lock(&sh.tokens).insert(
        token.clone(),
        Grant {
            expires_ms: now_ms() + ttl.as_millis() as i64,
        },
    );
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": ttl.as_secs(),
            "scope": scope,
        })))
}

/// The bearer check every FHIR call passes: 401 (counted) when the token is missing, unknown or expired.
pub(crate) fn check_bearer(sh: &Shared, req: &HttpRequest) -> Result<(), SimError> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let valid = token.is_some_and(|t| {
        lock(&sh.tokens)
            .get(t.trim())
            .is_some_and(|g| g.expires_ms > now_ms())
    });
    if valid {
        Ok(())
    } else {
        AtomicCounters::bump(&sh.counters.unauthorized_sent);
        Err(SimError::Unauthorized)
    }
}
