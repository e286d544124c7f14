//! Access tokens for a connection (SMART Backend Services, and OAuth client_credentials with a
//! client secret as Oracle Health system accounts use).
//!
//! The exchange itself is the `oauth2` crate's client_credentials request, sent over our own
//! reqwest client through its async HTTP hook so that it is rate-limited and audited like every
//! other call. For `private_key_jwt` the request carries a client assertion (RFC 7523; SMART
//! Backend Services): a JWT signed RS384 (RSA key) or ES384 (P-384 key) with `iss` = `sub` = the
//! client id, `aud` = the token URL, `exp` five minutes ahead and a fresh `jti`. A client secret
//! travels in HTTP Basic. The token endpoint is the connection's `token_url`, else the
//! `token_endpoint` of `{base}/.well-known/smart-configuration` (fetched once).
//!
//! Tokens are cached in moka until shortly before they expire (80% of `expires_in`, or 60 s
//! before expiry for tokens living over 5 minutes); moka's `try_get_with` makes concurrent
//! callers share one request. Errors carry the OAuth `error` code only: never the assertion,
//! the secret, the token or `error_description`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use moka::future::Cache;
use oauth2::basic::{BasicClient, BasicErrorResponse};
use oauth2::{ClientId, ClientSecret, RequestTokenError, Scope, TokenResponse, TokenUrl};
use reqwest::header::CONTENT_TYPE;
use reqwest::Method;
use serde::Serialize;
use tokio::sync::OnceCell;
use url::Url;

use super::http::{error_from_response, is_plain_code, read_limited, Transport};
use super::paging::same_origin;
use super::settings::{setting_error, str_setting};
use crate::audit::OutboundAction;
use crate::{AdapterError, Connection, Credential, RegistryError};

pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How far ahead a client assertion expires (SMART Backend Services: at most five minutes).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// Assumed when a token response has no `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// A bearer token and when to stop using it. Its `Debug` does not show it.
pub struct AccessToken {
    secret: String,
    refresh_after: Duration,
}

impl AccessToken {
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// How long after it was issued it is replaced.
    pub fn refresh_after(&self) -> Duration {
        self.refresh_after
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"[redacted]")
            .field("refresh_after", &self.refresh_after)
            .finish()
    }
}

/// When a token issued for `lifetime` is replaced: 60 s early for long-lived tokens, at 80%
/// of its life for short ones.
pub fn refresh_after(lifetime: Duration) -> Duration {
    if lifetime > Duration::from_secs(300) {
        lifetime - Duration::from_secs(60)
    } else {
        lifetime.mul_f64(0.8)
    }
}

struct RefreshBeforeExpiry;

impl moka::Expiry<(), Arc<AccessToken>> for RefreshBeforeExpiry {
    fn expire_after_create(
        &self,
        _: &(),
        token: &Arc<AccessToken>,
        _: Instant,
    ) -> Option<Duration> {
        Some(token.refresh_after)
    }
}

enum ClientAuth {
    Assertion {
        key: EncodingKey,
        alg: Algorithm,
        kid: Option<String>,
    },
    Secret(String),
}

/// The claims of a client assertion.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct AssertionClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub jti: String,
}

/// A signed client assertion for `client_id` at `token_url`, expiring five minutes after `now`.
pub fn client_assertion(
    client_id: &str,
    token_url: &str,
    key: &EncodingKey,
    alg: Algorithm,
    kid: Option<&str>,
    now: SystemTime,
) -> Result<String, AdapterError> {
    let exp = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(ASSERTION_LIFETIME)
        .as_secs();
    let claims = AssertionClaims {
        iss: client_id.to_owned(),
        sub: client_id.to_owned(),
        aud: token_url.to_owned(),
        exp,
        jti: uuid::Uuid::new_v4().to_string(),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, key)
        .map_err(|_| AdapterError::Auth("the client assertion could not be signed".into()))
}

/// The signing key and algorithm of a PEM private key: RSA signs RS384, EC (P-384) signs ES384,
/// unless the connection's `alg` setting says which.
fn signing_key(
    connection: &Connection,
    pem: &str,
) -> Result<(EncodingKey, Algorithm), RegistryError> {
    let bad_key = |problem| setting_error(connection, "private_key", problem);
    let alg = match str_setting(connection, "alg")? {
        None => None,
        Some("RS384") => Some(Algorithm::RS384),
        Some("ES384") => Some(Algorithm::ES384),
        Some(_) => return Err(setting_error(connection, "alg", "must be RS384 or ES384")),
    };
    let rsa = || EncodingKey::from_rsa_pem(pem.as_bytes()).ok();
    let ec = || EncodingKey::from_ec_pem(pem.as_bytes()).ok();
    match alg {
        Some(Algorithm::RS384) => rsa()
            .map(|k| (k, Algorithm::RS384))
            .ok_or_else(|| bad_key("is not an RSA private key (PEM) for RS384")),
        Some(_) => ec()
            .map(|k| (k, Algorithm::ES384))
            .ok_or_else(|| bad_key("is not an EC private key (PEM) for ES384")),
        None => rsa()
            .map(|k| (k, Algorithm::RS384))
            .or_else(|| ec().map(|k| (k, Algorithm::ES384)))
            .ok_or_else(|| bad_key("is not an RSA or EC private key in PEM")),
    }
}

#[derive(Debug, thiserror::Error)]
enum TokenHttpError {
    #[error("token endpoint unavailable")]
    Unavailable(AdapterError),
}

/// Tokens for one connection.
pub struct TokenSource {
    transport: Arc<Transport>,
    client_id: String,
    auth: ClientAuth,
    scopes: String,
    fhir_base: Url,
    token_url: OnceCell<Url>,
    cache: Cache<(), Arc<AccessToken>>,
}

impl TokenSource {
    pub(crate) fn new(
        connection: &Connection,
        default_scopes: &str,
        fhir_base: &Url,
        transport: Arc<Transport>,
    ) -> Result<Self, RegistryError> {
        let auth = match &connection.credential {
            Credential::PrivateKey { pem, kid } => {
                let (key, alg) = signing_key(connection, pem)?;
                // Sign once now, so a key that cannot sign (an ES384 setting with a P-256 key)
                // fails the connection's start, not its first pull.
                client_assertion("check", "https://check", &key, alg, None, SystemTime::now())
                    .map_err(|_| setting_error(connection, "private_key", "cannot sign with it"))?;
                ClientAuth::Assertion {
                    key,
                    alg,
                    kid: kid.clone(),
                }
            }
            Credential::ClientSecret(secret) => ClientAuth::Secret(secret.clone()),
        };
        let token_url = OnceCell::new();
        if let Some(configured) = &connection.token_url {
            let url = Url::parse(configured)
                .map_err(|_| setting_error(connection, "token_url", "is not a URL"))?;
            check_token_url(&url, fhir_base)
                .map_err(|problem| setting_error(connection, "token_url", problem))?;
            let _ = token_url.set(url);
        }
        Ok(Self {
            transport,
            client_id: connection.client_id.clone(),
            auth,
            scopes: connection
                .scopes
                .clone()
                .unwrap_or_else(|| default_scopes.to_owned()),
            fhir_base: fhir_base.clone(),
            token_url,
            cache: Cache::builder()
                .max_capacity(1)
                .expire_after(RefreshBeforeExpiry)
                .build(),
        })
    }

    /// A valid token: the cached one, or one new one shared by every concurrent caller.
    pub async fn token(&self) -> Result<Arc<AccessToken>, AdapterError> {
        self.cache
            .try_get_with((), self.request_token())
            .await
            .map_err(|e| (*e).clone())
    }

    /// Drops `used` from the cache (the EHR refused it), unless it was already replaced.
    pub async fn invalidate(&self, used: &AccessToken) {
        if let Some(current) = self.cache.get(&()).await {
            if current.secret == used.secret {
                self.cache.invalidate(&()).await;
            }
        }
    }

    /// The token endpoint: configured, or discovered once.
    pub async fn token_url(&self) -> Result<&Url, AdapterError> {
        self.token_url.get_or_try_init(|| self.discover()).await
    }

    async fn discover(&self) -> Result<Url, AdapterError> {
        let mut url = self.fhir_base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty()
                .extend([".well-known", "smart-configuration"]);
        }
        let request = self
            .transport
            .request(Method::GET, url)
            .header(reqwest::header::ACCEPT, "application/json")
            .build()
            .map_err(|_| AdapterError::Permanent("discovery request".into()))?;
        let response = self
            .transport
            .exchange(OutboundAction::Discovery, None, request)
            .await?
            .map_err(|e| e.into_error())?;
        if !response.status().is_success() {
            return Err(error_from_response(response, SystemTime::now()).await);
        }
        let body = read_limited(response, 1024 * 1024).await?;
        let config: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| AdapterError::Permanent("smart-configuration is not JSON".into()))?;
        let endpoint = config
            .get("token_endpoint")
            .and_then(|v| v.as_str())
            .and_then(|s| Url::parse(s).ok())
            .ok_or_else(|| {
                AdapterError::Permanent("smart-configuration has no token_endpoint URL".into())
            })?;
        check_token_url(&endpoint, &self.fhir_base)
            .map_err(|problem| AdapterError::Permanent(format!("token_endpoint {problem}")))?;
        Ok(endpoint)
    }

    async fn request_token(&self) -> Result<Arc<AccessToken>, AdapterError> {
        let token_url = self.token_url().await?.clone();
        let client = BasicClient::new(ClientId::new(self.client_id.clone()))
            .set_token_uri(TokenUrl::from_url(token_url.clone()));
        let client = match &self.auth {
            ClientAuth::Secret(secret) => {
                client.set_client_secret(ClientSecret::new(secret.clone()))
            }
            ClientAuth::Assertion { .. } => client,
        };
        let mut request = client.exchange_client_credentials().add_scopes(
            self.scopes
                .split_whitespace()
                .map(|s| Scope::new(s.to_owned())),
        );
        if let ClientAuth::Assertion { key, alg, kid } = &self.auth {
            let assertion = client_assertion(
                &self.client_id,
                token_url.as_str(),
                key,
                *alg,
                kid.as_deref(),
                SystemTime::now(),
            )?;
            request = request
                .add_extra_param("client_assertion_type", JWT_BEARER_ASSERTION)
                .add_extra_param("client_assertion", assertion);
        }
        let http = TokenHttp(self.transport.clone());
        let response = request.request_async(&http).await.map_err(token_error)?;
        let lifetime = response.expires_in().unwrap_or(DEFAULT_TOKEN_LIFETIME);
        Ok(Arc::new(AccessToken {
            secret: response.access_token().secret().clone(),
            refresh_after: refresh_after(lifetime),
        }))
    }
}

/// oauth2's async HTTP hook over our client (no second reqwest in the tree).
struct TokenHttp(Arc<Transport>);

impl<'c> oauth2::AsyncHttpClient<'c> for TokenHttp {
    type Error = TokenHttpError;
    type Future =
        Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, TokenHttpError>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(exchange(&self.0, request))
    }
}

/// One audited token exchange. Statuses that are not the token endpoint's answer (429, 5xx)
/// become errors here, so they stay retryable.
async fn exchange(
    transport: &Transport,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, TokenHttpError> {
    let unavailable = TokenHttpError::Unavailable;
    let request = reqwest::Request::try_from(request).map_err(|_| {
        unavailable(AdapterError::Permanent(
            "token request could not be built".into(),
        ))
    })?;
    let response = transport
        .exchange(OutboundAction::Token, None, request)
        .await
        .map_err(unavailable)?
        .map_err(|e| unavailable(e.into_error()))?;
    let status = response.status();
    if status.as_u16() == 429 || status.is_server_error() {
        return Err(unavailable(
            error_from_response(response, SystemTime::now()).await,
        ));
    }
    let content_type = response.headers().get(CONTENT_TYPE).cloned();
    let body = read_limited(response, 1024 * 1024)
        .await
        .map_err(unavailable)?;
    let mut out = oauth2::HttpResponse::new(body);
    *out.status_mut() = status;
    if let Some(content_type) = content_type {
        out.headers_mut().insert(CONTENT_TYPE, content_type);
    }
    Ok(out)
}

/// The token URL must be https, or on the FHIR base's own origin (a local simulator).
fn check_token_url(url: &Url, fhir_base: &Url) -> Result<(), &'static str> {
    if url.scheme() == "https" || same_origin(url, fhir_base) {
        Ok(())
    } else {
        Err("must be https (or on the FHIR base URL's origin)")
    }
}

fn token_error(error: RequestTokenError<TokenHttpError, BasicErrorResponse>) -> AdapterError {
    match error {
        RequestTokenError::ServerResponse(response) => {
            let code = response.error().as_ref();
            let code = if is_plain_code(code) {
                code
            } else {
                "unrecognised error"
            };
            AdapterError::Auth(format!("token endpoint: {code}"))
        }
        RequestTokenError::Request(TokenHttpError::Unavailable(error)) => error,
        // `Parse` holds the body, which may hold a token: only say what kind of failure it was.
        RequestTokenError::Parse(..) => {
            AdapterError::Auth("token endpoint: malformed response".into())
        }
        RequestTokenError::Other(_) => {
            AdapterError::Auth("token endpoint: unexpected response".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    const RSA: &str = include_str!("../../tests/keys/rsa.pem");
    const RSA_PUB: &str = include_str!("../../tests/keys/rsa.pub.pem");
    const EC: &str = include_str!("../../tests/keys/ec384.pem");
    const EC_PUB: &str = include_str!("../../tests/keys/ec384.pub.pem");

    fn connection(pem: &str, alg: Option<&str>) -> Connection {
        let mut settings = serde_json::Map::new();
        if let Some(alg) = alg {
            settings.insert("alg".into(), alg.into());
        }
        Connection {
            id: "c1".into(),
            vendor: "epic".into(),
            fhir_base_url: "https://ehr.example/api/FHIR/R4".into(),
            client_id: "gw-client".into(),
            token_url: None,
            credential: Credential::PrivateKey {
                pem: pem.into(),
                kid: None,
            },
            scopes: None,
            settings,
        }
    }

    fn decode(jwt: &str, alg: Algorithm, public: &DecodingKey) -> AssertionClaims {
        let mut validation = Validation::new(alg);
        validation.set_audience(&["https://ehr.example/oauth2/token"]);
        validation.set_issuer(&["gw-client"]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        jsonwebtoken::decode::<AssertionClaims>(jwt, public, &validation)
            .unwrap()
            .claims
    }

    #[test]
    fn an_rsa_key_signs_an_rs384_assertion_with_the_smart_claims() {
        let (key, alg) = signing_key(&connection(RSA, None), RSA).unwrap();
        assert_eq!(alg, Algorithm::RS384);
        let now = SystemTime::now();
        let url = "https://ehr.example/oauth2/token";
        let jwt = client_assertion("gw-client", url, &key, alg, Some("key-1"), now).unwrap();
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.alg, Algorithm::RS384);
        assert_eq!(header.kid.as_deref(), Some("key-1"));
        let claims = decode(
            &jwt,
            alg,
            &DecodingKey::from_rsa_pem(RSA_PUB.as_bytes()).unwrap(),
        );
        assert_eq!(claims.sub, "gw-client");
        let unix_now = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(claims.exp, unix_now + 300);
        assert!(uuid::Uuid::parse_str(&claims.jti).is_ok());
        let again = client_assertion("gw-client", url, &key, alg, None, now).unwrap();
        let again = decode(
            &again,
            alg,
            &DecodingKey::from_rsa_pem(RSA_PUB.as_bytes()).unwrap(),
        );
        assert_ne!(claims.jti, again.jti, "every assertion has its own jti");
    }

    #[test]
    fn a_p384_key_signs_es384_and_the_alg_setting_must_fit_the_key() {
        let (key, alg) = signing_key(&connection(EC, None), EC).unwrap();
        assert_eq!(alg, Algorithm::ES384);
        let jwt = client_assertion(
            "gw-client",
            "https://ehr.example/oauth2/token",
            &key,
            alg,
            None,
            SystemTime::now(),
        )
        .unwrap();
        let claims = decode(
            &jwt,
            alg,
            &DecodingKey::from_ec_pem(EC_PUB.as_bytes()).unwrap(),
        );
        assert_eq!(claims.iss, "gw-client");
        assert!(matches!(
            signing_key(&connection(EC, Some("RS384")), EC).err(),
            Some(RegistryError::Setting { key, .. }) if key == "private_key"
        ));
        assert!(matches!(
            signing_key(&connection(RSA, Some("HS256")), RSA).err(),
            Some(RegistryError::Setting { key, .. }) if key == "alg"
        ));
        assert!(matches!(
            signing_key(&connection("not a key", None), "not a key").err(),
            Some(RegistryError::Setting { key, .. }) if key == "private_key"
        ));
    }

    #[test]
    fn tokens_are_replaced_before_they_expire() {
        assert_eq!(
            refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(3540)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(570)),
            Duration::from_secs(510)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(300)),
            Duration::from_secs(240)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(10)),
            Duration::from_secs(8)
        );
    }
}
