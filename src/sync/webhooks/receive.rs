//! The webhook handler: reads the body within the size limit, authenticates the request against
//! its connection's webhook secret, charges the connection's rate limit, parses the events, and
//! writes them sealed to the inbox before answering, then wakes the worker. No EHR is called
//! here; the only waits are one connection read, one inbox transaction and the audit event.
//!
//! Every answer is an OperationOutcome: 202 when events were queued (or had been, for a
//! duplicate), 200 for a handshake, heartbeat or a notification with nothing to follow, 401 for
//! anything unauthenticated (nothing stored), 413, 400, 429. Every request is audited
//! (`webhook`, with the connection when known); no PHI goes to a log, an error or the audit.

use std::sync::Arc;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use fhir_sdk::r4b::codes::{IssueSeverity, IssueType};
use futures_util::StreamExt;

use super::notification::{self, AuthError, EventAction, Notification, ParseError};
use super::{PatientEvent, Webhooks, EVENT_KEY_COLUMN, PAYLOAD_COLUMN};
use crate::audit::{Action, NewAuditEvent};
use crate::crypto::field_aad;
use crate::domain::ResourceId;
use crate::fhir::resources::now_us;
use crate::gate::rate_limit::{add_headers, too_many, Decision};
use crate::http::error::operation_outcome;
use crate::http::{ApiError, FHIR_JSON};
use crate::startup::AppState;
use crate::store::{InboxAccept, InboxKind, NewInboxEvent, StoreError};

/// Why a webhook request was refused.
#[derive(Debug, thiserror::Error)]
enum WebhookError {
    #[error("{0}")]
    Unauthenticated(AuthError),
    #[error("the body is larger than the {0}-byte limit for webhooks")]
    TooLarge(usize),
    #[error("{0}")]
    BadRequest(String),
    #[error("rate limited")]
    Limited(Decision),
    #[error(transparent)]
    Api(#[from] ApiError),
}

impl From<StoreError> for WebhookError {
    fn from(err: StoreError) -> Self {
        WebhookError::Api(err.into())
    }
}

impl From<ParseError> for WebhookError {
    fn from(err: ParseError) -> Self {
        WebhookError::BadRequest(err.to_string())
    }
}

impl ResponseError for WebhookError {
    fn status_code(&self) -> StatusCode {
        match self {
            WebhookError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            WebhookError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WebhookError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebhookError::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
            WebhookError::Api(e) => e.status_code(),
        }
    }

    fn error_response(&self) -> HttpResponse {
        let code = match self {
            WebhookError::Unauthenticated(_) => IssueType::Login,
            WebhookError::TooLarge(_) => IssueType::TooLong,
            WebhookError::BadRequest(_) => IssueType::Invalid,
            WebhookError::Limited(decision) => return too_many(*decision),
            WebhookError::Api(e) => return e.error_response(),
        };
        let outcome = operation_outcome(IssueSeverity::Error, code, self.to_string());
        let mut res = HttpResponse::build(self.status_code());
        res.insert_header((header::CONTENT_TYPE, FHIR_JSON));
        if let WebhookError::Unauthenticated(_) = self {
            res.insert_header((
                header::WWW_AUTHENTICATE,
                r#"Bearer realm="fhirgate-webhooks""#,
            ));
        }
        res.body(serde_json::to_vec(&outcome).unwrap_or_default())
    }
}

/// What the audit event of a request can say: the connection, once it is known to exist.
#[derive(Default)]
struct Facts {
    practice: Option<ResourceId>,
    connection: Option<String>,
}

/// What an accepted request is answered with.
struct Reply {
    status: StatusCode,
    diagnostics: String,
    limit: Option<Decision>,
    /// Whether its audit event was written with its inbox rows.
    audited: bool,
}

/// The audit event of a request answered with `status` (no PHI: ids of the connection and the
/// request, network facts).
fn audit_event(req: &HttpRequest, facts: &Facts, status: StatusCode) -> NewAuditEvent {
    NewAuditEvent {
        practice_id: facts.practice.clone(),
        action: Some(Action::Webhook),
        status_code: status.as_u16(),
        connection_id: facts.connection.clone(),
        source_ip: crate::http::client_ip::client_ip(req).map(|ip| ip.to_string()),
        user_agent: req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(256).collect()),
        request_id: req
            .extensions()
            .get::<crate::http::observe::RequestId>()
            .map(|r| r.0.clone()),
        ..NewAuditEvent::default()
    }
}

/// `POST /webhooks/{connection_id}`.
pub(super) async fn receive(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    handle(req, path.into_inner(), None, body, state).await
}

/// `PUT /webhooks/{connection_id}/Patient/{id}`: an R4 rest-hook with a payload, which FHIR R4
/// sends to `{endpoint}/{type}/{id}` (R4 Subscription, "rest-hook" channel).
pub(super) async fn receive_put(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let (connection, id) = path.into_inner();
    handle(req, connection, Some(id), body, state).await
}

async fn handle(
    req: HttpRequest,
    connection_id: String,
    put_id: Option<String>,
    body: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let mut facts = Facts::default();
    let mut audited = false;
    let response = match accept(&req, &connection_id, put_id, body, &state, &mut facts).await {
        Ok(reply) => {
            audited = reply.audited;
            let outcome = operation_outcome(
                IssueSeverity::Information,
                IssueType::Informational,
                reply.diagnostics,
            );
            let mut res = HttpResponse::build(reply.status)
                .insert_header((header::CONTENT_TYPE, FHIR_JSON))
                .body(serde_json::to_vec(&outcome).unwrap_or_default());
            if let Some(decision) = reply.limit {
                add_headers(res.headers_mut(), decision);
            }
            res
        }
        Err(err) => {
            if let WebhookError::Limited(_) = err {
                state.metrics.observe_rate_limited("webhook");
            }
            if err.status_code() == StatusCode::UNAUTHORIZED {
                tracing::info!(reason = %err, "webhook refused");
            }
            err.error_response()
        }
    };
    if state.skip_audit || audited {
        return response;
    }
    match state
        .audit
        .record(audit_event(&req, &facts, response.status()))
        .await
    {
        Ok(()) => response,
        // Fail closed: the sender retries, and what was stored is recognised as a duplicate.
        Err(_) => ApiError::Unavailable.error_response(),
    }
}

fn header_str<'a>(req: &'a HttpRequest, name: &'static str) -> Result<Option<&'a str>, AuthError> {
    req.headers()
        .get(name)
        .map(|v| v.to_str().map_err(|_| AuthError::MalformedHeader(name)))
        .transpose()
}

/// How the request says it is authentic.
enum Proof<'a> {
    Signed {
        id: &'a str,
        timestamp: &'a str,
        signatures: &'a str,
    },
    Bearer(&'a str),
}

fn proof_of(req: &HttpRequest) -> Result<Proof<'_>, AuthError> {
    let id = header_str(req, "webhook-id")?;
    let timestamp = header_str(req, "webhook-timestamp")?;
    let signatures = header_str(req, "webhook-signature")?;
    if id.is_some() || timestamp.is_some() || signatures.is_some() {
        let id = id.ok_or(AuthError::MissingHeader("webhook-id"))?;
        if !notification::valid_event_id(id) {
            return Err(AuthError::MalformedHeader("webhook-id"));
        }
        return Ok(Proof::Signed {
            id,
            timestamp: timestamp.ok_or(AuthError::MissingHeader("webhook-timestamp"))?,
            signatures: signatures.ok_or(AuthError::MissingHeader("webhook-signature"))?,
        });
    }
    match header_str(req, "authorization")? {
        Some(value) => Ok(Proof::Bearer(value)),
        None => Err(AuthError::Missing),
    }
}

/// The body, refused past `limit` bytes (announced or received).
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, WebhookError> {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|len| len > limit) {
        return Err(WebhookError::TooLarge(limit));
    }
    let mut body = web::BytesMut::with_capacity(announced.unwrap_or(0).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|_| WebhookError::BadRequest("the body could not be read in full".into()))?;
        if body.len() + chunk.len() > limit {
            return Err(WebhookError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What a request needs of its connection: the ids and, if the connection is active and has
/// one, its webhook secret.
pub(super) struct Receiver {
    id: String,
    practice_id: ResourceId,
    secret: Option<zeroize::Zeroizing<String>>,
}

/// The connection of a request (cached for [`super::CONNECTION_TTL`]); an unknown one is refused
/// (and not cached, so it is recognised as soon as it is added).
async fn receiver(
    state: &AppState,
    hooks: &Webhooks,
    connection_id: &str,
) -> Result<Arc<Receiver>, WebhookError> {
    let refused = WebhookError::Unauthenticated(AuthError::Refused);
    if !notification::valid_event_id(connection_id) {
        return Err(refused);
    }
    if let Some(known) = hooks.inner.connections.get(connection_id).await {
        return Ok(known);
    }
    let stored = match state
        .store
        .connections()
        .get_connection(connection_id)
        .await
    {
        Ok(stored) => stored,
        Err(StoreError::NotFound) => return Err(refused),
        Err(e) => return Err(e.into()),
    };
    let secret = match state.connections.webhook_secret(&stored) {
        Ok(secret) => secret.filter(|_| stored.active),
        Err(e) => {
            tracing::error!(error = %e, "a webhook secret cannot be opened");
            return Err(ApiError::Internal.into());
        }
    };
    let receiver = Arc::new(Receiver {
        id: stored.id,
        practice_id: stored.practice_id,
        secret,
    });
    hooks
        .inner
        .connections
        .insert(connection_id.to_owned(), receiver.clone())
        .await;
    Ok(receiver)
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

async fn accept(
    req: &HttpRequest,
    connection_id: &str,
    put_id: Option<String>,
    payload: web::Payload,
    state: &AppState,
    facts: &mut Facts,
) -> Result<Reply, WebhookError> {
    let hooks: &Webhooks = &state.webhooks;
    let settings = hooks.settings();
    let body = read_body(req, payload, settings.max_body_bytes).await?;
    let proof = proof_of(req).map_err(WebhookError::Unauthenticated)?;
    let stored = receiver(state, hooks, connection_id).await?;
    facts.practice = Some(stored.practice_id.clone());
    facts.connection = Some(stored.id.clone());
    let secret = stored
        .secret
        .as_deref()
        .ok_or(WebhookError::Unauthenticated(AuthError::Refused))?;
    let parsed = match proof {
        Proof::Signed {
            id,
            timestamp,
            signatures,
        } => {
            let tolerance = i64::try_from(settings.tolerance_secs).unwrap_or(i64::MAX);
            notification::check_timestamp(timestamp, unix_now(), tolerance)
                .map_err(WebhookError::Unauthenticated)?;
            let key = notification::signing_key(secret).map_err(WebhookError::Unauthenticated)?;
            if !notification::signature_matches(&key, id, timestamp, &body, signatures) {
                return Err(WebhookError::Unauthenticated(AuthError::Refused));
            }
            Proven::Generic(id.to_owned())
        }
        Proof::Bearer(authorization) => {
            if !notification::bearer_matches(authorization, secret) {
                return Err(WebhookError::Unauthenticated(AuthError::Refused));
            }
            Proven::Fhir
        }
    };
    let decision = state.rate_limits.check_webhook(&stored.id);
    if let Decision::Limited { .. } = decision {
        return Err(WebhookError::Limited(decision));
    }
    let limit = state.rate_limits.enabled().then_some(decision);
    let notification = match parsed {
        Proven::Generic(id) => {
            if put_id.is_some() {
                return Err(WebhookError::BadRequest(
                    "signed generic events are POSTed to /webhooks/{connection_id}".into(),
                ));
            }
            notification::parse_generic(&id, &body)?
        }
        Proven::Fhir => {
            let parsed = notification::parse_fhir(&body)?;
            if let Some(id) = &put_id {
                let same = parsed.events.iter().all(|e| {
                    matches!(&e.action, EventAction::Patient { ehr_id, resource: Some(_) } if ehr_id == id)
                });
                if parsed.events.is_empty() || !same {
                    return Err(WebhookError::BadRequest(
                        "a PUT to /webhooks/{connection_id}/Patient/{id} carries that Patient"
                            .into(),
                    ));
                }
            }
            parsed
        }
    };
    // A write, audited in its own transaction; the answer it will get is known beforehand.
    let status = if notification.status_only || notification.events.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let audit = (!state.skip_audit).then(|| audit_event(req, facts, status));
    let audited = audit.is_some();
    let diagnostics = store(state, hooks, &stored, &notification, audit).await?;
    Ok(Reply {
        status,
        diagnostics,
        limit,
        audited,
    })
}

/// The scheme a request was authenticated by.
enum Proven {
    /// Standard Webhooks, with its `webhook-id`.
    Generic(String),
    Fhir,
}

/// Seals and writes a notification's events (and the resync its sequence may call for) with
/// the request's audit event; what the answer says.
async fn store(
    state: &AppState,
    hooks: &Webhooks,
    stored: &Receiver,
    notification: &Notification,
    audit: Option<NewAuditEvent>,
) -> Result<String, WebhookError> {
    let vault = state.vault().await?;
    let new_row = |event_id: &str, kind: InboxKind, plain: Option<&[u8]>| {
        let id = uuid::Uuid::new_v4().to_string();
        let key = vault.blind(EVENT_KEY_COLUMN, event_id);
        let payload = plain.map(|p| {
            hooks
                .inner
                .cipher
                .encrypt(p, field_aad(PAYLOAD_COLUMN, &id).as_bytes())
        });
        NewInboxEvent {
            id,
            event_key: crate::crypto::to_hex(&key),
            kind,
            payload,
        }
    };
    let mut events = Vec::with_capacity(notification.events.len());
    for event in &notification.events {
        let row = match &event.action {
            EventAction::Patient { ehr_id, resource } => {
                let plain = zeroize::Zeroizing::new(
                    serde_json::to_vec(&PatientEvent {
                        patient_id: ehr_id.clone(),
                        resource: resource.clone(),
                    })
                    .map_err(|_| ApiError::Internal)?,
                );
                new_row(&event.event_id, InboxKind::Patient, Some(&plain))
            }
            EventAction::Resync => new_row(&event.event_id, InboxKind::Resync, None),
        };
        events.push(row);
    }
    let resync = notification.sequence.as_ref().map(|mark| {
        new_row(
            &format!("gap:{}#{}", mark.subscription, mark.through),
            InboxKind::Resync,
            None,
        )
    });
    let accepted = hooks
        .inner
        .writer
        .accept(InboxAccept {
            practice_id: stored.practice_id.clone(),
            connection_id: stored.id.clone(),
            received_us: now_us(),
            events,
            sequence: notification.sequence.clone(),
            resync_on_gap: resync,
            audit,
        })
        .await?;
    if accepted.stored > 0 {
        hooks.wake();
    }
    if accepted.gap {
        tracing::info!(connection = %stored.id, "webhook sequence gap; a resync pull is queued");
    }
    let gap = if accepted.gap {
        "; events were missed, so a pull from the watermark is queued"
    } else {
        ""
    };
    Ok(if notification.status_only {
        format!("notification received{gap}")
    } else if notification.events.is_empty() {
        format!("notification received; it names no patient to follow{gap}")
    } else if accepted.stored == 0 {
        format!("nothing new to queue: already received, or a pull is already waiting{gap}")
    } else {
        format!("accepted: {} event(s) queued{gap}", accepted.stored)
    })
}
