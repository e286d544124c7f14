//! The internal API at `/api/v1`, for the practice's own system and its administrators. Behind
//! the same gate as the FHIR API (bearer token, rate limits, audit); success bodies are plain
//! JSON, errors are OperationOutcomes like everywhere else.

pub mod clients;
pub mod jobs;

use actix_web::middleware::from_fn;
use actix_web::{web, HttpMessage, HttpRequest};

use crate::audit::middleware::audit_request;
use crate::gate::middleware::authenticate;
use crate::gate::rate_limit::limit_request;
use crate::gate::{Caller, GateError, Role};
use crate::http::ApiError;

pub const API_BASE: &str = "/api/v1";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope(API_BASE)
            .wrap(from_fn(limit_request))
            .wrap(from_fn(authenticate))
            .wrap(from_fn(audit_request))
            .configure(clients::configure)
            .configure(jobs::configure)
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
