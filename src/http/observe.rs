//! The outermost middleware: gives every request an id (echoed in `X-Request-Id`), runs it in a
//! tracing span that carries the id, method and route template, logs one completion line and
//! records metrics. It never logs the raw path or query string: they can carry PHI
//! (`Patient?name=...`, identifiers in ids).

use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpMessage};
use tracing::Instrument;

use crate::ops::metrics::{method_label, UNMATCHED_ROUTE};
use crate::startup::AppState;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, available to handlers through the request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// A client-supplied id is kept only when it is a UUID: anything else could smuggle PHI into logs.
fn request_id_for(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| uuid::Uuid::parse_str(v).ok())
        .unwrap_or_else(uuid::Uuid::new_v4)
        .hyphenated()
        .to_string()
}

pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let started = Instant::now();
    let request_id = request_id_for(&req);
    let method = method_label(req.method());
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .map(web::Data::into_inner);
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method,
        route = tracing::field::Empty,
    );
    req.extensions_mut().insert(RequestId(request_id.clone()));

    // Middlewares of ours answer with responses, never `Err`; an `Err` from actix itself is
    // still logged and counted (actix renders it), under the unmatched route label.
    let mut res = match next.call(req).instrument(span.clone()).await {
        Ok(res) => res.map_into_boxed_body(),
        Err(err) => {
            let status = err.as_response_error().status_code().as_u16();
            record(
                &span,
                state.as_deref(),
                UNMATCHED_ROUTE,
                method,
                status,
                started,
            );
            return Err(err);
        }
    };
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
    record(
        &span,
        state.as_deref(),
        &route,
        method,
        res.status().as_u16(),
        started,
    );
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    Ok(res)
}

fn record(
    span: &tracing::Span,
    state: Option<&AppState>,
    route: &str,
    method: &'static str,
    status: u16,
    started: Instant,
) {
    let elapsed = started.elapsed();
    span.record("route", route);
    if let Some(state) = state {
        state
            .metrics
            .observe_request(route, method, status, elapsed);
    }
    let _enter = span.enter();
    let duration_ms = elapsed.as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::error!(status, duration_ms, "request failed");
    } else {
        tracing::info!(status, duration_ms, "request completed");
    }
}
