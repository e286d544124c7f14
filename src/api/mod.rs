//! The internal API at `/api/v1`, for the practice's own system and its administrators. Behind
//! the same gate as the FHIR API (bearer token, rate limits, audit); success bodies are plain
//! JSON, errors are OperationOutcomes like everywhere else.

pub mod claim_prepare;
pub mod claims;
pub mod clients;
pub mod dead_letters;
pub mod jobs;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, Error, HttpMessage, HttpRequest};

use crate::audit::middleware::{audit_request, AuditedInTransaction};
use crate::audit::NewAuditEvent;
use crate::gate::middleware::authenticate;
use crate::gate::rate_limit::limit_request;
use crate::gate::{Caller, GateError, Role};
use crate::http::ApiError;
use crate::startup::AppState;

pub const API_BASE: &str = "/api/v1";

/// The largest request body the internal API reads (a prepared claim, a client's JWKS).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// actix's own refusals (a body over the limit, one that cannot be read) come as plain text:
/// here, as everywhere, an error is an OperationOutcome.
async fn outcome_errors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let res = next.call(req).await?;
    match crate::fhir::negotiate::outcome_for_plain_error(&res) {
        Some(outcome) => Ok(res.into_response(outcome).map_into_right_body()),
        None => Ok(res.map_into_left_body()),
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope(API_BASE)
            .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
            .wrap(from_fn(limit_request))
            .wrap(from_fn(authenticate))
            .wrap(from_fn(audit_request))
            .wrap(from_fn(outcome_errors))
            .configure(clients::configure)
            .configure(jobs::configure)
            .configure(claim_prepare::configure)
            .configure(claims::configure)
            .configure(dead_letters::configure)
            .default_service(web::to(|| async {
                Err::<actix_web::HttpResponse, _>(ApiError::NotFound(
                    "no internal API route at this path".into(),
                ))
            })),
    );
}

/// The caller, who must hold `role` (practice administration needs `practice_admin`).
pub(crate) fn require_role(req: &HttpRequest, role: Role) -> Result<Caller, GateError> {
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(GateError::MissingToken)?;
    if caller.role == role {
        Ok(caller)
    } else {
        Err(GateError::InsufficientRole(role.as_str()))
    }
}

/// The caller, who must hold one of `roles`; `needed` names them for the 403.
pub(crate) fn require_any_role(
    req: &HttpRequest,
    roles: &[Role],
    needed: &'static str,
) -> Result<Caller, GateError> {
    let caller = req
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(GateError::MissingToken)?;
    if roles.contains(&caller.role) {
        Ok(caller)
    } else {
        Err(GateError::InsufficientRole(needed))
    }
}

/// Records a request's audit event now (durable before the response) instead of through the
/// middleware, because the handler knows more (the resource, the patient).
pub(crate) async fn audit_now(
    state: &AppState,
    req: &HttpRequest,
    event: NewAuditEvent,
) -> Result<(), ApiError> {
    if !state.skip_audit {
        state
            .audit
            .record(event)
            .await
            .map_err(|_| ApiError::Unavailable)?;
    }
    req.extensions_mut().insert(AuditedInTransaction);
    Ok(())
}

/// A JSON request body, with errors that name a missing field at most (serde's messages can
/// quote the offending value).
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let message = e.to_string();
        let detail = match e.classify() {
            serde_json::error::Category::Data if message.starts_with("missing field") => message
                .split(" at line")
                .next()
                .unwrap_or_default()
                .to_owned(),
            serde_json::error::Category::Data => {
                "a field is unknown or has the wrong type".to_owned()
            }
            _ => "the body is not JSON".to_owned(),
        };
        ApiError::BadRequest(format!("invalid JSON body: {detail}"))
    })
}
