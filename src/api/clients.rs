//! `/api/v1/clients`: the admin part of the client registry (the CLI's `clients` commands over
//! HTTP), for `practice_admin` callers, confined to their own practice: another practice's
//! client is a 404.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::{json_body, require_role};
use crate::gate::{ApiClient, ClientKeys, ClientStatus, NewApiClient, Role, ScopeSet};
use crate::http::ApiError;
use crate::startup::AppState;
use crate::store::StoreError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/clients")
            .route(web::get().to(list))
            .route(web::post().to(create)),
    )
    .route("/clients/{client_id}/disable", web::post().to(disable))
    .route("/clients/{client_id}/keys", web::put().to(rotate_keys));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    jwks: Option<serde_json::Value>,
    jwks_url: Option<String>,
}

impl Keys {
    fn parse(&self) -> Result<ClientKeys, ApiError> {
        let bad = |e: crate::domain::InvalidValue| ApiError::BadRequest(e.to_string());
        match (&self.jwks, &self.jwks_url) {
            (Some(jwks), None) => ClientKeys::inline(&jwks.to_string()).map_err(bad),
            (None, Some(url)) => ClientKeys::url(url).map_err(bad),
            _ => Err(ApiError::BadRequest(
                "give exactly one of jwks or jwks_url".into(),
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewClient {
    name: String,
    role: Option<String>,
    scope: Option<String>,
    #[serde(flatten)]
    keys: Keys,
}

/// The client, if it belongs to `practice`; another practice's client is indistinguishable from
/// a missing one.
async fn own_client(
    state: &AppState,
    practice: &crate::domain::ResourceId,
    client_id: &str,
) -> Result<ApiClient, ApiError> {
    match state.store.get_client(client_id).await {
        Ok(client) if &client.practice_id == practice => Ok(client),
        Ok(_) | Err(StoreError::NotFound) => Err(ApiError::NotFound("no such client".into())),
        Err(e) => Err(e.into()),
    }
}

async fn list(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_role(&req, Role::PracticeAdmin)?;
    let clients = state
        .store
        .list_clients(Some(&caller.practice_id))
        .await
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(clients))
}

async fn create(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_role(&req, Role::PracticeAdmin)?;
    let new: NewClient = json_body(&body)?;
    let role = match &new.role {
        Some(r) => Role::parse(r).map_err(|e| ApiError::BadRequest(e.to_string()))?,
        None => Role::ExternalSystem,
    };
    let scopes = ScopeSet::parse(new.scope.as_deref().unwrap_or(role.default_scopes()))
        .map_err(|e| ApiError::BadRequest(format!("scope: {e}")))?;
    let name = new.name.trim().to_owned();
    if scopes.is_empty() || name.is_empty() || name.len() > 200 {
        return Err(ApiError::BadRequest(
            "name must be 1-200 characters and scope must hold a system/ scope".into(),
        )
        .into());
    }
    let client = state
        .store
        .create_client(&NewApiClient {
            practice_id: caller.practice_id,
            name,
            role,
            scopes,
            keys: new.keys.parse()?,
        })
        .await
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Created().json(client))
}

async fn disable(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_role(&req, Role::PracticeAdmin)?;
    let client = own_client(&state, &caller.practice_id, &path).await?;
    let client = state
        .store
        .set_client_status(&client.client_id, ClientStatus::Disabled)
        .await
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(client))
}

async fn rotate_keys(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_role(&req, Role::PracticeAdmin)?;
    let keys: Keys = json_body(&body)?;
    let keys = keys.parse()?;
    let client = own_client(&state, &caller.practice_id, &path).await?;
    let client = state
        .store
        .set_client_keys(&client.client_id, &keys)
        .await
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(client))
}
