//! `POST /auth/token`: the SMART Backend Services token endpoint (SMART App Launch 2.x,
//! backend-services.html; RFC 7523 client assertions). Errors use the OAuth format (RFC 6749
//! section 5.2) and never echo the assertion or its claims.

use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::json;

use super::access_token::unix_now;
use super::clients::{ClientKeys, ClientStatus};
use super::scopes::ScopeSet;
use crate::audit::middleware::AuditActor;
use crate::startup::AppState;
use crate::store::StoreError;

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// SMART: the assertion's `exp` SHALL be no more than five minutes in the future.
const MAX_ASSERTION_LIFETIME_SECS: u64 = 300;
/// Tolerated clock skew between client and gateway.
const LEEWAY_SECS: u64 = 30;
const MAX_ASSERTION_BYTES: usize = 16 * 1024;

/// An OAuth error response.
#[derive(Debug)]
pub struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: &'static str,
}

impl OAuthError {
    fn request(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            description,
        }
    }
    fn client(description: &'static str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "invalid_client",
            description,
        }
    }
    fn scope(description: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_scope",
            description,
        }
    }
    fn unavailable() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "temporarily_unavailable",
            description: "the authorization server cannot serve the request now; retry later",
        }
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    pub(crate) fn response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status);
        res.insert_header((header::CACHE_CONTROL, "no-store"))
            .insert_header((header::PRAGMA, "no-cache"));
        if self.status == StatusCode::UNAUTHORIZED {
            res.insert_header((header::WWW_AUTHENTICATE, r#"Bearer realm="fhirgate""#));
        }
        res.json(json!({ "error": self.code, "error_description": self.description }))
    }
}

impl From<StoreError> for OAuthError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => OAuthError::client("unknown client"),
            other => {
                tracing::error!(error = %other, "token endpoint storage failure");
                OAuthError::unavailable()
            }
        }
    }
}

#[derive(Default)]
struct TokenForm {
    grant_type: Option<String>,
    scope: Option<String>,
    client_assertion_type: Option<String>,
    client_assertion: Option<String>,
}

impl TokenForm {
    fn parse(body: &[u8]) -> Self {
        let mut form = TokenForm::default();
        for (k, v) in form_urlencoded::parse(body) {
            let slot = match k.as_ref() {
                "grant_type" => &mut form.grant_type,
                "scope" => &mut form.scope,
                "client_assertion_type" => &mut form.client_assertion_type,
                "client_assertion" => &mut form.client_assertion,
                _ => continue,
            };
            *slot = Some(v.into_owned());
        }
        form
    }
}

#[derive(Deserialize)]
struct UnverifiedClaims {
    iss: Option<String>,
    sub: Option<String>,
}

#[derive(Deserialize)]
struct AssertionClaims {
    sub: String,
    exp: u64,
    jti: Option<String>,
}

pub async fn token(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    match exchange(&req, &body, &state).await {
        Ok(body) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .insert_header((header::PRAGMA, "no-cache"))
            .json(body),
        Err(err) => {
            tracing::info!(
                error = err.code,
                reason = err.description,
                "token request refused"
            );
            err.response()
        }
    }
}

async fn exchange(
    req: &HttpRequest,
    body: &[u8],
    state: &AppState,
) -> Result<serde_json::Value, OAuthError> {
    let form_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return Err(OAuthError::request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let AssertionRequest {
        assertion,
        requested,
        alg,
        kid,
        client_id,
    } = read_request(body)?;
    let client = state.store.get_client(&client_id).await?;
    req.extensions_mut().insert(AuditActor {
        client_id: client.client_id.clone(),
        practice_id: client.practice_id.clone(),
        role: client.role.as_str(),
    });
    if client.status != ClientStatus::Active {
        return Err(OAuthError::client("the client is disabled"));
    }

    let key = decoding_key(state, &client.keys(), &kid, alg).await?;
    let Verified { exp, jti } =
        verify_assertion(&assertion, alg, &key, &state.gate.token_url, &client_id)?;
    // Remember the jti until the assertion expires; a second use is a replay.
    let fresh = state
        .store
        .remember_assertion(&client.practice_id, &client_id, &jti, exp + LEEWAY_SECS)
        .await?;
    if !fresh {
        return Err(OAuthError::client("client_assertion jti was already used"));
    }

    let allowed = ScopeSet::parse(&client.scope).unwrap_or_default();
    let granted = allowed.grant(&requested);
    if granted.is_empty() {
        return Err(OAuthError::scope(
            "none of the requested scopes is allowed for this client",
        ));
    }
    let issued = state
        .gate
        .tokens
        .issue(&client_id, &client.practice_id, client.role, &granted)
        .map_err(|_| OAuthError::unavailable())?;
    Ok(json!({
        "access_token": issued.token,
        "token_type": "bearer",
        "expires_in": issued.expires_in,
        "scope": granted.to_string(),
    }))
}

/// What a token request asks for, read from its form before any key is looked up. Nothing in
/// it is trusted until the assertion verifies; `client_id` only says whose keys to try.
pub(crate) struct AssertionRequest {
    pub(crate) assertion: String,
    pub(crate) requested: ScopeSet,
    pub(crate) alg: Algorithm,
    pub(crate) kid: String,
    pub(crate) client_id: String,
}

/// Reads a token request's form: the grant and assertion types, the scopes asked for, and the
/// assertion's header (alg, kid) and unverified `iss`/`sub`.
pub(crate) fn read_request(body: &[u8]) -> Result<AssertionRequest, OAuthError> {
    let form = TokenForm::parse(body);
    match form.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(_) => {
            return Err(OAuthError {
                status: StatusCode::BAD_REQUEST,
                code: "unsupported_grant_type",
                description: "only client_credentials is supported",
            })
        }
        None => return Err(OAuthError::request("grant_type is required")),
    }
    if form.client_assertion_type.as_deref() != Some(ASSERTION_TYPE) {
        return Err(OAuthError::client(
            "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ));
    }
    let assertion = form
        .client_assertion
        .filter(|a| !a.is_empty() && a.len() <= MAX_ASSERTION_BYTES)
        .ok_or_else(|| OAuthError::client("client_assertion is missing or too large"))?;
    let requested = ScopeSet::parse(form.scope.as_deref().unwrap_or_default())
        .map_err(|_| OAuthError::scope("a requested scope is malformed"))?;
    if requested.is_empty() {
        return Err(OAuthError::scope("request at least one system/ scope"));
    }

    let head = jsonwebtoken::decode_header(&assertion)
        .map_err(|_| OAuthError::client("client_assertion is not a JWT"))?;
    if !matches!(head.alg, Algorithm::RS384 | Algorithm::ES384) {
        return Err(OAuthError::client(
            "client_assertion must be signed RS384 or ES384",
        ));
    }
    let kid = head
        .kid
        .ok_or_else(|| OAuthError::client("client_assertion header needs a kid"))?;
    // Only to find the client whose keys verify it; nothing is trusted before verification.
    let unverified = jsonwebtoken::dangerous::insecure_decode::<UnverifiedClaims>(&assertion)
        .map_err(|_| OAuthError::client("client_assertion claims are malformed"))?
        .claims;
    let client_id = match (unverified.iss, unverified.sub) {
        (Some(iss), Some(sub)) if iss == sub && !iss.is_empty() && iss.len() <= 128 => iss,
        _ => return Err(OAuthError::client("iss and sub must both be the client id")),
    };
    Ok(AssertionRequest {
        assertion,
        requested,
        alg: head.alg,
        kid,
        client_id,
    })
}

/// What a verified assertion leaves to check against the store.
pub(crate) struct Verified {
    pub(crate) exp: u64,
    pub(crate) jti: String,
}

/// Verifies an assertion with the client's `key`: signature, `aud` (this endpoint's URL),
/// `iss` and `sub` (the client), `exp` (with leeway, at most five minutes ahead) and a `jti`.
pub(crate) fn verify_assertion(
    assertion: &str,
    alg: Algorithm,
    key: &DecodingKey,
    token_url: &str,
    client_id: &str,
) -> Result<Verified, OAuthError> {
    let mut validation = Validation::new(alg);
    validation.set_audience(&[token_url]);
    validation.set_issuer(&[client_id]);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    validation.leeway = LEEWAY_SECS;
    let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, key, &validation)
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => OAuthError::client("client_assertion has expired"),
                ErrorKind::InvalidAudience => {
                    OAuthError::client("client_assertion aud must be this token endpoint's URL")
                }
                ErrorKind::InvalidSignature => {
                    OAuthError::client("client_assertion signature does not verify")
                }
                _ => OAuthError::client("client_assertion is invalid"),
            }
        })?
        .claims;
    if claims.sub != client_id {
        return Err(OAuthError::client("iss and sub must both be the client id"));
    }
    let now = unix_now();
    if claims.exp > now + MAX_ASSERTION_LIFETIME_SECS + LEEWAY_SECS {
        return Err(OAuthError::client(
            "client_assertion exp must be at most five minutes ahead",
        ));
    }
    let jti = claims
        .jti
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or_else(|| OAuthError::client("client_assertion needs a jti"))?;
    Ok(Verified {
        exp: claims.exp,
        jti,
    })
}

/// The client's verifying key with `kid` for `alg`; a JWKS URL is re-fetched once when the kid
/// is unknown (the client may have rotated its keys).
async fn decoding_key(
    state: &AppState,
    keys: &Option<ClientKeys>,
    kid: &str,
    alg: Algorithm,
) -> Result<DecodingKey, OAuthError> {
    let no_key = || OAuthError::client("no key of the client matches the assertion's kid");
    let set: Arc<JwkSet> =
        match keys {
            Some(ClientKeys::Inline(jwks)) => Arc::new(
                serde_json::from_str(jwks)
                    .map_err(|_| OAuthError::client("the client's JWKS is invalid"))?,
            ),
            Some(ClientKeys::Url(url)) => {
                let set = state.gate.jwks.get(url, false).await.map_err(|_| {
                    OAuthError::client("the client's JWKS URL could not be fetched")
                })?;
                if set.find(kid).is_some() {
                    set
                } else {
                    state.gate.jwks.get(url, true).await.map_err(|_| {
                        OAuthError::client("the client's JWKS URL could not be fetched")
                    })?
                }
            }
            None => return Err(no_key()),
        };
    key_in_set(&set, kid, alg)
}

/// The key with `kid` of a client's JWKS, if it may verify `alg`.
pub(crate) fn key_in_set(
    set: &JwkSet,
    kid: &str,
    alg: Algorithm,
) -> Result<DecodingKey, OAuthError> {
    let no_key = || OAuthError::client("no key of the client matches the assertion's kid");
    let jwk = set.find(kid).ok_or_else(no_key)?;
    // A key published for another algorithm must not verify this one.
    if let Some(key_alg) = jwk.common.key_algorithm {
        if key_alg.to_string() != format!("{alg:?}") {
            return Err(no_key());
        }
    }
    DecodingKey::from_jwk(jwk).map_err(|_| no_key())
}
