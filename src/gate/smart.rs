//! SMART discovery: `/.well-known/smart-configuration`, at the root and under the FHIR base
//! (SMART App Launch 2.x, conformance.html). Lists only what the token endpoint really supports.

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::startup::AppState;

pub async fn smart_configuration(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("cache-control", "public, max-age=3600"))
        .json(json!({
            "issuer": state.base_url,
            "token_endpoint": state.gate.token_url,
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "grant_types_supported": ["client_credentials"],
            "scopes_supported": [
                "system/*.read", "system/*.write", "system/*.*",
                "system/*.cruds", "system/*.rs",
                "system/Patient.rs", "system/Practitioner.rs", "system/Organization.rs",
                "system/Coverage.rs", "system/Encounter.rs", "system/Claim.cruds",
                "system/ClaimResponse.cruds", "system/AuditEvent.rs"
            ],
            "capabilities": [
                "client-confidential-asymmetric",
                "permission-v1",
                "permission-v2"
            ],
        }))
}
