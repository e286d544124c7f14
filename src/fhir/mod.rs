//! The FHIR R4 REST surface at `/fhir/r4`. Routes and the CapabilityStatement are both generated
//! from one [`FhirApi`] registry, so what `metadata` declares is exactly what is served.
//!
//! Models come from fhir-sdk's R4B module, which is wire-compatible with R4 for the resources the
//! gateway serves; differences that matter are noted where they bite (see README, "FHIR notes").

pub mod capability;
pub mod negotiate;
pub mod registry;

use actix_web::{web, HttpRequest};

use crate::http::ApiError;

pub use registry::{FhirApi, Interaction, ResourceDef, SearchParamDef};

/// Base path of the FHIR API.
pub const FHIR_BASE: &str = "/fhir/r4";

/// Mounts the FHIR API: negotiation, the registered resources, `metadata`, and OperationOutcome
/// 404s for everything else under the base.
pub fn configure(api: &FhirApi, cfg: &mut web::ServiceConfig) {
    let scope = web::scope(FHIR_BASE)
        .wrap(actix_web::middleware::from_fn(negotiate::negotiate))
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
