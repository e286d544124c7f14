//! One [`EhrClient`] per connection: reqwest (rustls) with connect and request timeouts, the
//! connection's outbound rate limit, bearer tokens from [`TokenSource`] (a 401 refreshes the
//! token and retries once), retries with jittered backoff on 5xx, timeouts and connection
//! errors, `Retry-After` on 429/503, and the circuit breaker. Every HTTP exchange, token and
//! discovery requests included, is audited before its result is used; if the audit hook fails,
//! the call fails.
//!
//! It never follows redirects (a bearer token must not travel to another origin), never logs,
//! and never puts a URL, a body or a token in an error: errors carry statuses, OperationOutcome
//! issue codes and fixed words.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::header::{HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;
use url::Url;

use super::breaker::CircuitBreaker;
use super::oauth::{AccessToken, TokenSource};
use super::retry::{backoff_delay, parse_retry_after, RetryPolicy};
use super::settings::{setting_error, ClientSettings};
use crate::audit::{OutboundAction, OutboundAudit, OutboundCall};
use crate::{AdapterContext, AdapterError, Connection, RegistryError};

pub(crate) const FHIR_JSON: &str = "application/fhir+json";
/// The largest JSON body read into memory (a searchset page, a manifest, an error).
pub(crate) const MAX_JSON_BODY: usize = 32 * 1024 * 1024;

/// How an HTTP exchange failed without a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoResponse {
    Timeout,
    Connect,
    Other,
}

impl NoResponse {
    fn from_reqwest(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            NoResponse::Timeout
        } else if e.is_connect() {
            NoResponse::Connect
        } else {
            NoResponse::Other
        }
    }

    pub(crate) fn into_error(self) -> AdapterError {
        AdapterError::Transient(
            match self {
                NoResponse::Timeout => "timed out",
                NoResponse::Connect => "could not connect",
                NoResponse::Other => "the request failed before a response",
            }
            .into(),
        )
    }
}

/// What every exchange of a connection goes through: the HTTP client, the rate limit and the
/// audit hook. Shared by the FHIR calls and the token source.
pub(crate) struct Transport {
    pub(crate) connection_id: String,
    http: reqwest::Client,
    audit: Arc<dyn OutboundAudit>,
    limiter: DefaultDirectRateLimiter,
}

impl Transport {
    pub(crate) fn new(
        connection: &Connection,
        settings: &ClientSettings,
        context: &AdapterContext,
    ) -> Result<Self, RegistryError> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|_| setting_error(connection, "fhir_base_url", "no HTTP client for it"))?;
        Ok(Self {
            connection_id: connection.id.clone(),
            http,
            audit: context.audit.clone(),
            limiter: RateLimiter::direct(Quota::per_second(settings.rate_per_second)),
        })
    }

    /// Records one outbound call; an unavailable audit trail fails the call.
    pub(crate) async fn audit(
        &self,
        action: OutboundAction,
        resource_type: Option<&str>,
        status: Option<u16>,
        duration: Duration,
    ) -> Result<(), AdapterError> {
        self.audit
            .record(&OutboundCall {
                connection: &self.connection_id,
                action,
                resource_type,
                status,
                duration,
            })
            .await
            .map_err(|_| AdapterError::Transient("the audit trail is unavailable".into()))
    }

    /// One rate-limited, audited exchange. The outer error is the audit's; the inner result
    /// is the exchange's.
    pub(crate) async fn exchange(
        &self,
        action: OutboundAction,
        resource_type: Option<&str>,
        request: reqwest::Request,
    ) -> Result<Result<Response, NoResponse>, AdapterError> {
        self.limiter.until_ready().await;
        let start = Instant::now();
        let result = self.http.execute(request).await;
        let status = result.as_ref().ok().map(|r| r.status().as_u16());
        self.audit(action, resource_type, status, start.elapsed())
            .await?;
        Ok(result.map_err(|e| NoResponse::from_reqwest(&e)))
    }

    pub(crate) fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.http.request(method, url)
    }
}

/// One FHIR call as the adapters describe it; [`EhrClient::send`] adds the bearer token.
#[derive(Debug, Clone)]
pub struct OutboundRequest<'a> {
    pub method: Method,
    pub url: Url,
    pub action: OutboundAction,
    pub resource_type: Option<&'a str>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<Vec<u8>>,
}

impl<'a> OutboundRequest<'a> {
    pub fn get(url: Url, action: OutboundAction, resource_type: Option<&'a str>) -> Self {
        Self {
            method: Method::GET,
            url,
            action,
            resource_type,
            headers: Vec::new(),
            body: None,
        }
    }

    pub fn post_json(
        url: Url,
        action: OutboundAction,
        resource_type: Option<&'a str>,
        body: &Value,
    ) -> Self {
        Self {
            method: Method::POST,
            url,
            action,
            resource_type,
            headers: vec![(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
            // Serialising a `Value` cannot fail (its keys are strings).
            body: Some(serde_json::to_vec(body).unwrap_or_default()),
        }
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// The outbound client of one connection. Cheap to share (`Arc`) and safe to call concurrently.
pub struct EhrClient {
    transport: Arc<Transport>,
    base: Url,
    tokens: TokenSource,
    breaker: CircuitBreaker,
    retry: RetryPolicy,
}

impl std::fmt::Debug for EhrClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EhrClient")
            .field("connection", &self.transport.connection_id)
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl EhrClient {
    /// The client of `connection`, asking for `default_scopes` unless the connection names its
    /// own. Fails on a bad base URL, token URL, key or setting, naming the key.
    pub fn new(
        connection: &Connection,
        default_scopes: &str,
        context: &AdapterContext,
    ) -> Result<Self, RegistryError> {
        let settings = ClientSettings::from_connection(connection)?;
        let base = parse_base_url(connection)?;
        let transport = Arc::new(Transport::new(connection, &settings, context)?);
        let tokens = TokenSource::new(connection, default_scopes, &base, transport.clone())?;
        Ok(Self {
            transport,
            base,
            tokens,
            breaker: CircuitBreaker::new(settings.breaker_failures, settings.breaker_cooldown),
            retry: settings.retry,
        })
    }

    pub fn connection_id(&self) -> &str {
        &self.transport.connection_id
    }

    /// The FHIR base URL (no trailing slash).
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    pub fn tokens(&self) -> &TokenSource {
        &self.tokens
    }

    /// `{base}/{segments...}`, each segment percent-encoded (an id cannot add a path level).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends `request` until it succeeds (2xx) or fails for good, per the retry policy; the
    /// response's body is left to the caller.
    pub async fn send(&self, request: &OutboundRequest<'_>) -> Result<Response, AdapterError> {
        let policy = &self.retry;
        let mut retries = 0u32;
        let mut waited = Duration::ZERO;
        let mut refreshed = false;
        loop {
            let Ok(permit) = self.breaker.try_acquire(Instant::now()) else {
                self.transport
                    .audit(request.action, request.resource_type, None, Duration::ZERO)
                    .await?;
                return Err(AdapterError::Transient("circuit open".into()));
            };
            let token = self.tokens.token().await?;
            let http_request = self.build(request, &token)?;
            let outcome = self
                .transport
                .exchange(request.action, request.resource_type, http_request)
                .await?;
            let error = match outcome {
                Ok(response) if response.status().is_success() => {
                    permit.success();
                    return Ok(response);
                }
                Ok(response) if response.status() == StatusCode::UNAUTHORIZED && !refreshed => {
                    // The token was refused (expired or revoked early): one new token, one retry.
                    permit.success();
                    self.tokens.invalidate(&token).await;
                    refreshed = true;
                    continue;
                }
                Ok(response) => {
                    if response.status().is_server_error() {
                        permit.failure();
                    } else {
                        permit.success();
                    }
                    error_from_response(response, SystemTime::now()).await
                }
                Err(no_response) => {
                    permit.failure();
                    no_response.into_error()
                }
            };
            if !error.is_retryable() || retries + 1 >= policy.max_attempts {
                return Err(error);
            }
            let delay = match error.retry_after() {
                Some(after) if after > policy.retry_after_cap => return Err(error),
                Some(after) => after,
                None => backoff_delay(retries, policy.base_delay, policy.max_delay),
            };
            if waited + delay > policy.budget {
                return Err(error);
            }
            tokio::time::sleep(delay).await;
            waited += delay;
            retries += 1;
        }
    }

    /// [`EhrClient::send`], then the body as JSON.
    pub async fn send_json(&self, request: &OutboundRequest<'_>) -> Result<Value, AdapterError> {
        let response = self.send(request).await?;
        let body = read_limited(response, MAX_JSON_BODY).await?;
        serde_json::from_slice(&body)
            .map_err(|_| AdapterError::Permanent("the EHR sent malformed JSON".into()))
    }

    fn build(
        &self,
        request: &OutboundRequest<'_>,
        token: &AccessToken,
    ) -> Result<reqwest::Request, AdapterError> {
        let mut builder = self
            .transport
            .request(request.method.clone(), request.url.clone())
            .header(AUTHORIZATION, format!("Bearer {}", token.secret()));
        if !request.headers.iter().any(|(name, _)| name == ACCEPT) {
            builder = builder.header(ACCEPT, FHIR_JSON);
        }
        for (name, value) in &request.headers {
            builder = builder.header(name.clone(), value.clone());
        }
        if let Some(body) = &request.body {
            builder = builder.body(body.clone());
        }
        builder
            .build()
            .map_err(|_| AdapterError::Permanent("the request could not be built".into()))
    }
}

fn parse_base_url(connection: &Connection) -> Result<Url, RegistryError> {
    let bad = |problem| setting_error(connection, "fhir_base_url", problem);
    let url = Url::parse(connection.fhir_base_url.trim_end_matches('/'))
        .map_err(|_| bad("is not a URL"))?;
    if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
        return Err(bad("must be an http(s) URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must have no query or fragment"));
    }
    Ok(url)
}

/// Reads a body up to `limit` bytes (more is a permanent error: nothing here is that large).
pub(crate) async fn read_limited(
    mut response: Response,
    limit: usize,
) -> Result<Vec<u8>, AdapterError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(AdapterError::Permanent(
                        "the EHR's response is too large".into(),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(NoResponse::from_reqwest(&e).into_error()),
        }
    }
}

/// The error for a non-2xx response, with the OperationOutcome's first issue code when the
/// body has one (the code only: diagnostics may quote resource values).
pub(crate) async fn error_from_response(response: Response, now: SystemTime) -> AdapterError {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now));
    let code = read_limited(response, 64 * 1024)
        .await
        .ok()
        .and_then(|body| outcome_issue_code(&body));
    let error = AdapterError::from_status(status, retry_after);
    match (error, code) {
        (AdapterError::Permanent(m), Some(code)) => {
            AdapterError::Permanent(format!("{m} ({code})"))
        }
        (AdapterError::Transient(m), Some(code)) => {
            AdapterError::Transient(format!("{m} ({code})"))
        }
        (AdapterError::Auth(m), Some(code)) => AdapterError::Auth(format!("{m} ({code})")),
        (error, _) => error,
    }
}

/// `OperationOutcome.issue[0].code` when it is a plain FHIR code (lowercase letters and `-`).
pub(crate) fn outcome_issue_code(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    if value.get("resourceType")?.as_str()? != "OperationOutcome" {
        return None;
    }
    let code = value.get("issue")?.get(0)?.get("code")?.as_str()?;
    is_plain_code(code).then(|| code.to_owned())
}

pub(crate) fn is_plain_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= 40
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_issue_code_is_kept_from_an_operation_outcome() {
        let outcome = |code: &str| {
            serde_json::json!({"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": code, "diagnostics": "Patient Jane Doe born 1970-01-01"}
            ]})
            .to_string()
        };
        assert_eq!(
            outcome_issue_code(outcome("not-found").as_bytes()).as_deref(),
            Some("not-found")
        );
        assert_eq!(outcome_issue_code(outcome("Jane Doe").as_bytes()), None);
        assert_eq!(outcome_issue_code(b"{\"resourceType\":\"Patient\"}"), None);
        assert_eq!(outcome_issue_code(b"<html>"), None);
    }
}
