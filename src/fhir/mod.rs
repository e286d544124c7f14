//! The FHIR R4 REST surface at `/fhir/r4`. Routes and the CapabilityStatement are both generated
//! from one [`FhirApi`] registry, so what `metadata` declares is exactly what is served.
//!
//! Models come from fhir-sdk's R4B module, which is wire-compatible with R4 for the resources the
//! gateway serves; differences that matter are noted where they bite (see README, "FHIR notes").

pub mod audit_event;
pub mod bundle;
pub mod capability;
pub mod export;
pub mod negotiate;
pub mod registry;
pub mod resources;
pub mod validate;

use actix_web::middleware::from_fn;
use actix_web::{web, HttpRequest};

use crate::audit::middleware::audit_request;
use crate::gate::middleware::authenticate;
use crate::gate::rate_limit::limit_request;
use crate::gate::smart;

use crate::http::ApiError;

pub use registry::{FhirApi, Interaction, OperationDef, ResourceDef, SearchParamDef};

/// The largest resource body accepted by a create or update (a Bundle may be larger:
/// [`bundle::MAX_BUNDLE_BYTES`]). Larger bodies get 413 with an OperationOutcome.
pub const MAX_RESOURCE_BYTES: usize = 4 * 1024 * 1024;

/// Base path of the FHIR API.
pub const FHIR_BASE: &str = "/fhir/r4";

/// Mounts the FHIR API: negotiation, the registered resources, `metadata`, and OperationOutcome
/// 404s for everything else under the base.
pub fn configure(api: &FhirApi, cfg: &mut web::ServiceConfig) {
    // Wrapped last runs first: the audit (which records whatever comes back), negotiation
    // (406), authentication (401), rate limits (429), then the per-interaction scope checks of
    // the registry (403).
    let scope = web::scope(FHIR_BASE)
        .app_data(web::PayloadConfig::new(MAX_RESOURCE_BYTES))
        .wrap(from_fn(limit_request))
        .wrap(from_fn(authenticate))
        .wrap(from_fn(negotiate::negotiate))
        .wrap(from_fn(audit_request))
        .route(
            "/.well-known/smart-configuration",
            web::get().to(smart::smart_configuration),
        )
        .configure(|scope_cfg| api.configure(scope_cfg))
        .default_service(web::to(unknown_route));
    cfg.service(scope);
}

async fn unknown_route(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    // The path is not echoed: it may contain an identifier.
    let _ = req;
    Err(ApiError::NotFound(
        "no FHIR interaction is registered at this path; see /fhir/r4/metadata".into(),
    ))
}
