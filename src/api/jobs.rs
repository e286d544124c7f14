//! `/api/v1/jobs`: the practice's pull runs (what `fhirgate sync status` shows), newest first,
//! and `/api/v1/quarantine`: the EHR records its pulls kept out, with the rule each broke (never
//! the record itself). For `practice_admin` callers, confined to their own practice: another
//! practice's run is a 404.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::require_role;
use crate::gate::Role;
use crate::http::ApiError;
use crate::startup::AppState;
use crate::store::StoreError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/jobs", web::get().to(list))
        .route("/jobs/{id}", web::get().to(read))
        .route("/quarantine", web::get().to(quarantine));
}

/// The most a listing returns.
const MAX_COUNT: i64 = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Listing {
    connection: Option<String>,
    #[serde(rename = "_count")]
    count: Option<i64>,
}

fn listing(req: &HttpRequest) -> Result<Listing, ApiError> {
    let listing = web::Query::<Listing>::from_query(req.query_string())
        .map_err(|_| {
            ApiError::BadRequest(
                "unknown or malformed query parameter (known: connection, _count)".into(),
            )
        })?
        .into_inner();
    if listing.count.is_some_and(|c| !(1..=MAX_COUNT).contains(&c)) {
        return Err(ApiError::BadRequest(format!(
            "_count must be between 1 and {MAX_COUNT}"
        )));
    }
    Ok(listing)
}

async fn list(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_role(&req, Role::PracticeAdmin)?;
    let q = listing(&req)?;
    let runs = state
        .store
        .jobs()
        .list_runs(
            Some(&caller.practice_id),
            q.connection.as_deref(),
            q.count.unwrap_or(50),
        )
        .await
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(json!({ "runs": runs })))
}

async fn read(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_role(&req, Role::PracticeAdmin)?;
    match state.store.jobs().get_run(&path).await {
        Ok(run) if run.practice_id == caller.practice_id.as_str() => {
            Ok(HttpResponse::Ok().json(run))
        }
        Ok(_) | Err(StoreError::NotFound) => {
            Err(ApiError::NotFound("no such job run".into()).into())
        }
        Err(e) => Err(ApiError::from(e).into()),
    }
}

async fn quarantine(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_role(&req, Role::PracticeAdmin)?;
    let q = listing(&req)?;
    let records = state
        .store
        .jobs()
        .list_quarantine(
            Some(&caller.practice_id),
            q.connection.as_deref(),
            q.count.unwrap_or(50),
        )
        .await
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(json!({ "records": records })))
}
