//! Writing FHIR JSON responses: `application/fhir+json; charset=utf-8`, pretty-printed when the
//! request asked for `_pretty=true` (recorded by the negotiation middleware).

use actix_web::http::{header, StatusCode};
use actix_web::{HttpMessage, HttpRequest, HttpResponse};
use serde::Serialize;

use super::ApiError;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Marker the negotiation middleware leaves in the request extensions for `_pretty=true`.
#[derive(Debug, Clone, Copy)]
pub struct Pretty;

pub fn fhir_json<T: Serialize>(
    req: &HttpRequest,
    status: StatusCode,
    body: &T,
) -> Result<HttpResponse, ApiError> {
    let pretty = req.extensions().get::<Pretty>().is_some();
    let bytes = if pretty {
        serde_json::to_vec_pretty(body)
    } else {
        serde_json::to_vec(body)
    }
    .map_err(|e| {
        tracing::error!(error = %e, "response serialisation failed");
        ApiError::Internal
    })?;
    Ok(HttpResponse::build(status)
        .insert_header((header::CONTENT_TYPE, FHIR_JSON))
        .body(bytes))
}
