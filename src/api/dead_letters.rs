//! `/api/v1/dead-letters`: the practice's claim-status updates that could not be delivered to
//! their EHR, for `practice_admin` and `billing` callers. The listing shows ids, counts, times
//! and the failure's fixed phrase, never the update's content; a replay moves one back to the
//! outbox with the same id (the EHR's idempotency key), so a late duplicate is still applied
//! once. Another practice's dead letter is a 404.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::{require_any_role, API_BASE};
use crate::audit::middleware::request_event;
use crate::audit::Action;
use crate::gate::Role;
use crate::http::ApiError;
use crate::startup::AppState;
use crate::store::StoreError;

const ROLES: &[Role] = &[Role::PracticeAdmin, Role::Billing];
const ROLES_NEEDED: &str = "practice_admin or billing";
const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 500;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/dead-letters", web::get().to(list))
        .route("/dead-letters/{id}/replay", web::post().to(replay));
}

/// A page cursor: `{dead_us}.{id}` of the last dead letter shown.
fn parse_cursor(value: &str) -> Result<(i64, String), ApiError> {
    let bad = || ApiError::BadRequest("after: not a cursor of this listing".into());
    let (us, id) = value.split_once('.').ok_or_else(bad)?;
    let us = us.parse::<i64>().map_err(|_| bad())?;
    if id.is_empty() || id.len() > 64 {
        return Err(bad());
    }
    Ok((us, id.to_owned()))
}

/// `GET /api/v1/dead-letters?limit=N&after=CURSOR`: oldest first; `next` links the next page.
async fn list(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_any_role(&req, ROLES, ROLES_NEEDED)?;
    let mut limit = DEFAULT_LIMIT;
    let mut after = None;
    for (key, value) in form_urlencoded::parse(req.query_string().as_bytes()) {
        match key.as_ref() {
            "limit" => {
                limit = value
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("limit: expected 1 to {MAX_LIMIT}"))
                    })?
            }
            "after" => after = Some(parse_cursor(&value)?),
            _ => {
                return Err(ApiError::BadRequest(
                    "unknown parameter (supported: limit, after)".into(),
                )
                .into())
            }
        }
    }
    let letters = state
        .store
        .outbox()
        .list_dead_letters(Some(&caller.practice_id), after, limit)
        .await
        .map_err(ApiError::from)?;
    let next = match letters.last() {
        Some(last) if letters.len() as i64 == limit => Some(format!(
            "{}{API_BASE}/dead-letters?limit={limit}&after={}.{}",
            state.base_url, last.dead_us, last.id
        )),
        _ => None,
    };
    Ok(HttpResponse::Ok().json(json!({ "dead_letters": letters, "next": next })))
}

/// `POST /api/v1/dead-letters/{id}/replay`: 202, the update is pending again.
async fn replay(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_any_role(&req, ROLES, ROLES_NEEDED)?;
    let not_found = || ApiError::NotFound("no such dead letter".into());
    if path.is_empty() || path.len() > 64 {
        return Err(not_found().into());
    }
    let outbox = state.store.outbox();
    let letter = match outbox
        .get_dead_letter(Some(&caller.practice_id), &path)
        .await
    {
        Ok(letter) => letter,
        Err(StoreError::NotFound) => return Err(not_found().into()),
        Err(e) => return Err(ApiError::from(e).into()),
    };
    let mut event = request_event(&req, StatusCode::ACCEPTED);
    event.action = Some(Action::Push);
    event.resource_type = Some("Claim".into());
    event.resource_id = Some(letter.claim_id.clone());
    event.connection_id = Some(letter.connection_id.clone());
    let audit = if state.skip_audit {
        vec![]
    } else {
        vec![event]
    };
    match outbox
        .replay_dead_letter(&caller.practice_id, &letter.id, &audit)
        .await
    {
        Ok(_) => {}
        // Replayed meanwhile by someone else.
        Err(StoreError::NotFound) => return Err(not_found().into()),
        Err(e) => return Err(ApiError::from(e).into()),
    }
    // Audited in the replay's transaction.
    mark_audited(&req);
    state.outbox.written();
    Ok(HttpResponse::Accepted().json(json!({
        "id": letter.id,
        "claim_id": letter.claim_id,
        "connection_id": letter.connection_id,
        "status": "pending",
    })))
}

fn mark_audited(req: &HttpRequest) {
    use actix_web::HttpMessage;
    req.extensions_mut()
        .insert(crate::audit::middleware::AuditedInTransaction);
}
