//! The gate every request into `/fhir/r4` and `/api/v1` passes: SMART backend-services OAuth
//! (the gateway is the authorization server), scope checks and the tenant of the request.
//! Never logs tokens, assertions or key material; errors name the rule broken, not the values.

pub mod access_token;
pub mod clients;
pub mod middleware;
pub mod rate_limit;
pub mod scopes;
pub mod smart;
pub mod token_endpoint;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use fhir_sdk::r4b::codes::{IssueSeverity, IssueType};

use crate::domain::ResourceId;
use crate::http::error::operation_outcome;
use crate::http::FHIR_JSON;

pub use access_token::AccessTokens;
pub use clients::{ApiClient, ClientKeys, ClientStatus, NewApiClient, Role};
pub use scopes::{Permission, ScopeSet};

/// The authenticated caller of a request: an API client of one practice (the tenant).
#[derive(Debug, Clone)]
pub struct Caller {
    pub client_id: String,
    pub practice_id: ResourceId,
    pub role: Role,
    pub scopes: ScopeSet,
}

/// Why the gate refused a request (FHIR side: OperationOutcome, 401 or 403).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("a bearer access token is required")]
    MissingToken,
    #[error("the access token is invalid or expired")]
    InvalidToken,
    #[error("this operation needs the {0} role")]
    InsufficientRole(&'static str),
    #[error("the access token's scopes do not allow {permission} on {resource}")]
    InsufficientScope {
        resource: &'static str,
        permission: &'static str,
    },
}

impl ResponseError for GateError {
    fn status_code(&self) -> StatusCode {
        match self {
            GateError::MissingToken | GateError::InvalidToken => StatusCode::UNAUTHORIZED,
            GateError::InsufficientScope { .. } | GateError::InsufficientRole(_) => {
                StatusCode::FORBIDDEN
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        let code = match self {
            GateError::MissingToken => IssueType::Login,
            GateError::InvalidToken => IssueType::Expired,
            GateError::InsufficientScope { .. } | GateError::InsufficientRole(_) => {
                IssueType::Forbidden
            }
        };
        let outcome = operation_outcome(IssueSeverity::Error, code, self.to_string());
        let mut res = HttpResponse::build(self.status_code());
        res.insert_header((header::CONTENT_TYPE, FHIR_JSON));
        // RFC 6750 section 3.
        match self {
            GateError::MissingToken => {
                res.insert_header((header::WWW_AUTHENTICATE, r#"Bearer realm="fhirgate""#));
            }
            GateError::InvalidToken => {
                res.insert_header((
                    header::WWW_AUTHENTICATE,
                    r#"Bearer realm="fhirgate", error="invalid_token""#,
                ));
            }
            GateError::InsufficientRole(_) => {}
            GateError::InsufficientScope { .. } => {
                res.insert_header((
                    header::WWW_AUTHENTICATE,
                    r#"Bearer realm="fhirgate", error="insufficient_scope""#,
                ));
            }
        }
        res.body(serde_json::to_vec(&outcome).unwrap_or_default())
    }
}
