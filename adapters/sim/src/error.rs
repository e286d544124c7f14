//! The simulator's two error shapes: FHIR errors (an OperationOutcome, as every vendor returns)
//! and OAuth token-endpoint errors (RFC 6749 §5.2 JSON). Messages name parameters and rules,
//! never a patient's data or a credential.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

pub const FHIR_JSON: &str = "application/fhir+json";

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("missing, unknown or expired access token")]
    Unauthorized,
    #[error("{0} not found")]
    NotFound(String),
    /// A refused request: `code` is the OperationOutcome issue code (invalid, required, not-supported...).
    #[error("{text}")]
    BadRequest { code: &'static str, text: String },
    #[error("injected failure")]
    Injected {
        status: u16,
        retry_after: Option<u64>,
    },
    #[error("too many requests")]
    Throttled { retry_after: u64 },
}

impl SimError {
    pub fn bad(code: &'static str, text: impl Into<String>) -> Self {
        SimError::BadRequest {
            code,
            text: text.into(),
        }
    }
}

pub fn outcome(severity: &str, code: &str, text: &str) -> serde_json::Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "details": { "text": text } }]
    })
}

impl ResponseError for SimError {
    fn status_code(&self) -> StatusCode {
        match self {
            SimError::Unauthorized => StatusCode::UNAUTHORIZED,
            SimError::NotFound(_) => StatusCode::NOT_FOUND,
            SimError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            SimError::Injected { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            SimError::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        res.content_type(FHIR_JSON);
        let code = match self {
            SimError::Unauthorized => {
                res.insert_header((header::WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#));
                "login"
            }
            SimError::NotFound(_) => "not-found",
            SimError::BadRequest { code, .. } => code,
            SimError::Injected { retry_after, .. } => {
                if let Some(s) = retry_after {
                    res.insert_header((header::RETRY_AFTER, s.to_string()));
                }
                "transient"
            }
            SimError::Throttled { retry_after } => {
                res.insert_header((header::RETRY_AFTER, retry_after.to_string()));
                "throttled"
            }
        };
        res.body(outcome("error", code, &self.to_string()).to_string())
    }
}

/// A token-endpoint refusal (`error` is one of RFC 6749's codes).
#[derive(Debug, thiserror::Error)]
#[error("{error}: {description}")]
pub struct OAuthError {
    pub error: &'static str,
    pub description: String,
}

impl OAuthError {
    pub fn new(error: &'static str, description: impl Into<String>) -> Self {
        Self {
            error,
            description: description.into(),
        }
    }
}

impl ResponseError for OAuthError {
    fn status_code(&self) -> StatusCode {
        if self.error == "invalid_client" {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code())
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(json!({ "error": self.error, "error_description": self.description }))
    }
}
