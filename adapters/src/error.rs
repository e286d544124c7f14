//! The one error every adapter call returns. Its variants say what a caller should do (retry
//! later, refresh credentials, dead-letter), and none of them carries a value from a resource:
//! messages name elements and HTTP statuses only, since they reach logs and the audit trail.

use std::time::Duration;

use fhirgate_mappings::MappingError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdapterError {
    /// The EHR refused our credentials (401/403, or the token endpoint said no). Not retried
    /// until the connection's credentials change.
    #[error("authentication with the EHR failed: {0}")]
    Auth(String),
    /// The resource does not exist at the EHR (404/410).
    #[error("not found at the EHR")]
    NotFound,
    /// The EHR asked us to slow down (429, or 503 with Retry-After).
    #[error("rate limited by the EHR; retry after {} s", retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    /// A failure that may pass: 5xx, timeouts, connection errors, an open circuit breaker.
    #[error("transient failure talking to the EHR: {0}")]
    Transient(String),
    /// A failure that will not pass by retrying: 4xx other than the above, a malformed
    /// response, an unsupported operation.
    // (Worded for both halves: "refused the request" read wrong for a malformed answer, which
    // is what a pull's run records as its error.)
    #[error("permanent failure talking to the EHR: {0}")]
    Permanent(String),
    /// The EHR's resource does not map to the internal model.
    #[error("mapping: {0}")]
    Mapping(#[from] MappingError),
}

impl AdapterError {
    /// Whether the same call may succeed later (retry with backoff), as opposed to needing a
    /// person (dead-letter).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AdapterError::RateLimited { .. } | AdapterError::Transient(_)
        )
    }

    /// Whether the EHR refused the request with an HTTP status (a [`AdapterError::Permanent`]
    /// made by [`AdapterError::from_status`]), as opposed to answering with something unusable
    /// (malformed JSON, not a Bundle, another resource type than asked for).
    pub fn is_refusal(&self) -> bool {
        matches!(self, AdapterError::Permanent(m) if m.starts_with("HTTP "))
    }

    /// How long to wait before retrying, when the EHR said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AdapterError::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// The error for an HTTP status the EHR answered with (`retry_after` from its header).
    pub fn from_status(status: u16, retry_after: Option<Duration>) -> Self {
        match status {
            401 | 403 => AdapterError::Auth(format!("HTTP {status}")),
            404 | 410 => AdapterError::NotFound,
            429 => AdapterError::RateLimited {
                retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
            },
            503 if retry_after.is_some() => AdapterError::RateLimited {
                retry_after: retry_after.unwrap_or_default(),
            },
            408 | 500..=599 => AdapterError::Transient(format!("HTTP {status}")),
            _ => AdapterError::Permanent(format!("HTTP {status}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_classify_into_retry_or_dead_letter() {
        let s = |status, after: Option<u64>| {
            AdapterError::from_status(status, after.map(Duration::from_secs))
        };
        assert_eq!(s(429, Some(7)).retry_after(), Some(Duration::from_secs(7)));
        assert!(s(429, None).is_retryable());
        assert!(s(503, Some(2)).is_retryable());
        assert!(s(503, None).is_retryable());
        assert!(s(502, None).is_retryable());
        assert!(s(408, None).is_retryable());
        assert!(!s(401, None).is_retryable());
        assert_eq!(s(404, None), AdapterError::NotFound);
        assert!(!s(400, None).is_retryable());
        assert!(!s(422, None).is_retryable());
        assert!(s(422, None).is_refusal());
        assert!(!AdapterError::Permanent("the EHR sent malformed JSON".into()).is_refusal());
        assert!(!s(503, None).is_refusal());
        let mapping: AdapterError = MappingError::Missing {
            element: "Encounter.subject",
        }
        .into();
        assert!(!mapping.is_retryable());
        assert_eq!(
            mapping.to_string(),
            "mapping: Encounter.subject: required by the internal model but missing"
        );
    }
}
