//! One error type for the HTTP edge. Every error becomes a FHIR OperationOutcome with the right
//! status; diagnostics are fixed, PHI-free phrases (never an echo of a client's value or a
//! database message).

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use fhir_sdk::r4b::codes::{IssueSeverity, IssueType};
use fhir_sdk::r4b::resources::{OperationOutcome, OperationOutcomeIssue};

use crate::store::StoreError;

use super::respond::FHIR_JSON;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("method {0} is not allowed on this resource")]
    MethodNotAllowed(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    /// The token's scopes do not cover what the request asks for (403).
    #[error("{0}")]
    Forbidden(String),
    /// The resource existed and was deleted (410).
    #[error("{0}")]
    Gone(String),
    /// `If-Match` or a conditional operation's precondition does not hold (412).
    #[error("{0}")]
    PreconditionFailed(String),
    /// A resource that is not valid FHIR: one OperationOutcome issue per problem, each naming
    /// the element path (400 for structure, 422 for rules the content breaks).
    #[error("the resource is not valid")]
    Invalid {
        status: u16,
        issues: Vec<serde_json::Value>,
    },
    /// The database or another dependency is down or saturated; the client may retry.
    #[error("the service is temporarily unavailable; retry later")]
    Unavailable,
    /// A fault of ours. The cause is logged (without PHI), the client sees only this phrase.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    fn issue_type(&self) -> IssueType {
        match self {
            ApiError::NotFound(_) => IssueType::NotFound,
            ApiError::MethodNotAllowed(_) | ApiError::NotAcceptable(_) => IssueType::NotSupported,
            ApiError::BadRequest(_) => IssueType::Invalid,
            ApiError::Conflict(_) | ApiError::PreconditionFailed(_) => IssueType::Conflict,
            ApiError::Gone(_) => IssueType::Deleted,
            ApiError::Forbidden(_) => IssueType::Forbidden,
            ApiError::Invalid { .. } => IssueType::Invalid,
            ApiError::Unavailable => IssueType::Transient,
            ApiError::Internal => IssueType::Exception,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => ApiError::NotFound("resource not found".into()),
            StoreError::Conflict(what) => ApiError::Conflict(what.into()),
            StoreError::VersionConflict { .. } => ApiError::Conflict(
                "the resource was changed by another request at the same time; retry".into(),
            ),
            StoreError::Unavailable(cause) => {
                tracing::warn!(%cause, "database unavailable");
                ApiError::Unavailable
            }
            StoreError::Migration(cause) | StoreError::Database(cause) => {
                tracing::error!(%cause, "database error");
                ApiError::Internal
            }
        }
    }
}

/// An OperationOutcome with one issue.
pub fn operation_outcome(
    severity: IssueSeverity,
    code: IssueType,
    diagnostics: impl Into<String>,
) -> OperationOutcome {
    let issue = OperationOutcomeIssue::builder()
        .severity(severity)
        .code(code)
        .diagnostics(diagnostics.into())
        .build()
        .expect("severity and code are set");
    OperationOutcome::builder()
        .issue(vec![Some(issue)])
        .build()
        .expect("issue is set")
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::Invalid { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header((header::CONTENT_TYPE, FHIR_JSON));
        if matches!(self, ApiError::Unavailable) {
            response.insert_header((header::RETRY_AFTER, "5"));
        }
        let body = match self {
            ApiError::Invalid { issues, .. } => serde_json::to_vec(&serde_json::json!({
                "resourceType": "OperationOutcome",
                "issue": issues,
            })),
            _ => serde_json::to_vec(&operation_outcome(
                IssueSeverity::Error,
                self.issue_type(),
                self.to_string(),
            )),
        };
        match body {
            Ok(body) => response.body(body),
            Err(_) => response.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_error_becomes_a_500_without_its_message() {
        let err = ApiError::from(StoreError::Database("value 'Smith' violates".into()));
        assert_eq!(err.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!err.to_string().contains("Smith"));
    }

    #[test]
    fn an_unreachable_database_becomes_a_503_with_retry_after() {
        let err = ApiError::from(StoreError::Unavailable("i/o".into()));
        let res = err.error_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().contains_key(header::RETRY_AFTER));
    }
}
