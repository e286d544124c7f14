//! Gate middleware: bearer-token authentication for a scope of routes, and the per-route scope
//! check the FHIR registry attaches to every interaction.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpMessage, ResponseError};

use super::scopes::Permission;
use super::{Caller, GateError};
use crate::startup::AppState;

/// Paths under a gated scope that stay public: the CapabilityStatement and SMART discovery
/// (FHIR and SMART require both to be readable before authenticating).
pub(crate) fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/fhir/r4/metadata" | "/fhir/r4/.well-known/smart-configuration"
    )
}

fn bearer(req: &ServiceRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Verifies the bearer token and puts the [`Caller`] in the request extensions.
pub async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    if is_public(req.path()) {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let verdict = match (bearer(&req), req.app_data::<web::Data<AppState>>()) {
        (None, _) => Err(GateError::MissingToken),
        (Some(token), Some(state)) => state.gate.tokens.verify(token),
        (Some(_), None) => Err(GateError::InvalidToken),
    };
    match verdict {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            Ok(next.call(req).await?.map_into_left_body())
        }
        Err(err) => Ok(req
            .into_response(err.error_response())
            .map_into_right_body()),
    }
}

/// Refuses the request with 403 unless the caller's scopes allow `permission` on `resource`.
pub async fn require_scope(
    resource: &'static str,
    permission: Permission,
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    let allowed = req
        .extensions()
        .get::<Caller>()
        .map(|c| c.scopes.allows(resource, permission));
    match allowed {
        Some(true) => Ok(next.call(req).await?.map_into_left_body()),
        Some(false) => {
            let err = GateError::InsufficientScope {
                resource,
                permission: permission_name(permission),
            };
            Ok(req
                .into_response(err.error_response())
                .map_into_right_body())
        }
        // No caller means the route was mounted outside the authenticated scope: refuse.
        None => Ok(req
            .into_response(GateError::MissingToken.error_response())
            .map_into_right_body()),
    }
}

fn permission_name(p: Permission) -> &'static str {
    match p {
        Permission::Create => "create",
        Permission::Read => "read",
        Permission::Update => "update",
        Permission::Delete => "delete",
        Permission::Search => "search",
    }
}
