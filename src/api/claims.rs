//! `/api/v1/claims/{id}/status`: a claim's lifecycle status (draft, prepared, submitted,
//! accepted, rejected, paid, denied, appealed), read and changed by the practice's system
//! (`practice_admin` or `billing`). The claim is the practice's FHIR `Claim` of that id; another
//! practice's claim is a 404.
//!
//! A change is checked against the transition table (`domain::claim_status`): an unknown
//! status is 400, an illegal transition 409, a stale `If-Match` 412. It commits with its audit
//! event and, when the claim's patient came from an EHR connection and the new status is one
//! the EHR hears of, the claim-status outbox row for that EHR, in one transaction. Never echoes
//! a disposition or anything of the claim's content.

use actix_web::http::header;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{audit_now, json_body, require_any_role};
use crate::audit::middleware::{request_event, AuditedInTransaction};
use crate::audit::{Action, NewAuditEvent};
use crate::domain::{ClaimStatus, ResourceId};
use crate::fhir::resources::{etag, fields, if_match};
use crate::gate::{Caller, Role};
use crate::http::ApiError;
use crate::startup::AppState;
use crate::store::{ClaimState, ClaimTransition, PushSource, Transitioned};
use crate::sync::outbox::rows::{Pending, Reader, MAX_DISPOSITION};

/// Who may read and change claim statuses.
const ROLES: &[Role] = &[Role::PracticeAdmin, Role::Billing];
const ROLES_NEEDED: &str = "practice_admin or billing";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/claims/{id}/status")
            .route(web::get().to(get_status))
            .route(web::post().to(set_status)),
    );
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusChange {
    status: String,
    disposition: Option<String>,
}

/// A claim's status as answered.
#[derive(Serialize)]
struct StatusBody {
    claim_id: String,
    status: ClaimStatus,
    version: i64,
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    updated_at: Option<time::OffsetDateTime>,
    /// The statuses the claim may move to next.
    next: Vec<ClaimStatus>,
    /// The update queued for the EHR by this change, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    push: Option<QueuedPush>,
}

#[derive(Serialize)]
struct QueuedPush {
    /// The outbox row's id: the idempotency key the EHR receives.
    update_id: String,
    connection_id: String,
    outcome: &'static str,
}

fn body(state: &ClaimState, push: Option<QueuedPush>) -> StatusBody {
    StatusBody {
        claim_id: state.claim_id.clone(),
        status: state.status,
        version: state.version,
        updated_at: state.updated_at,
        next: state.status.next_statuses().collect(),
        push,
    }
}

fn respond(
    status: actix_web::http::StatusCode,
    state: &ClaimState,
    body: StatusBody,
) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::ETAG, etag(state.version)))
        .json(body)
}

fn claim_id(req: &HttpRequest) -> Result<ResourceId, ApiError> {
    ResourceId::parse("id", req.match_info().get("id").unwrap_or_default())
        .map_err(|_| ApiError::NotFound("no such claim".into()))
}

/// The practice's Claim `id` as JSON (deleted or missing: 404).
async fn claim_json(
    state: &AppState,
    caller: &Caller,
    id: &ResourceId,
    pending: &Pending<'_>,
) -> Result<Value, ApiError> {
    let reader = Reader {
        store: &*state.store,
        connections: &state.connections,
        vault: state.vault().await?,
        practice: &caller.practice_id,
        pending,
    };
    reader
        .resource("Claim", id.as_str())
        .await?
        .ok_or_else(|| ApiError::NotFound("no such claim".into()))
}

async fn current(
    state: &AppState,
    caller: &Caller,
    id: &ResourceId,
) -> Result<ClaimState, ApiError> {
    Ok(state
        .store
        .outbox()
        .claim_state(&caller.practice_id, id.as_str())
        .await?
        .unwrap_or(ClaimState {
            claim_id: id.to_string(),
            status: ClaimStatus::INITIAL,
            version: 0,
            updated_at: None,
        }))
}

fn claim_event(
    req: &HttpRequest,
    status: u16,
    action: Action,
    id: &ResourceId,
    claim: &Value,
) -> NewAuditEvent {
    let mut event = request_event(
        req,
        actix_web::http::StatusCode::from_u16(status).unwrap_or_default(),
    );
    event.action = Some(action);
    event.resource_type = Some("Claim".into());
    event.resource_id = Some(id.to_string());
    event.patient_id = claim
        .get("patient")
        .and_then(|p| fields::reference_id(p, "Patient"));
    event
}

/// `GET /api/v1/claims/{id}/status`.
async fn get_status(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_any_role(&req, ROLES, ROLES_NEEDED)?;
    let id = claim_id(&req)?;
    let claim = claim_json(&state, &caller, &id, &Pending::new()).await?;
    let now = current(&state, &caller, &id).await?;
    audit_now(
        &state,
        &req,
        claim_event(&req, 200, Action::Read, &id, &claim),
    )
    .await?;
    Ok(respond(
        actix_web::http::StatusCode::OK,
        &now,
        body(&now, None),
    ))
}

/// `POST /api/v1/claims/{id}/status` with `{"status": "...", "disposition": "..."}`.
async fn set_status(
    req: HttpRequest,
    body_bytes: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_any_role(&req, ROLES, ROLES_NEEDED)?;
    let id = claim_id(&req)?;
    let change: StatusChange = json_body(&body_bytes)?;
    let next = ClaimStatus::parse(change.status.trim())
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let disposition = match change.disposition.map(|d| d.trim().to_owned()) {
        Some(d) if d.chars().count() > MAX_DISPOSITION => {
            return Err(ApiError::BadRequest(format!(
                "disposition: at most {MAX_DISPOSITION} characters"
            ))
            .into())
        }
        Some(d) if d.is_empty() => None,
        other => other,
    };
    let expected = if_match(&req)?;
    let pending = Pending::new();
    let claim = claim_json(&state, &caller, &id, &pending).await?;
    // Where the claim's updates go does not depend on its status: found once.
    let target = match next.push_outcome() {
        Some(_) => {
            let reader = Reader {
                store: &*state.store,
                connections: &state.connections,
                vault: state.vault().await?,
                practice: &caller.practice_id,
                pending: &pending,
            };
            reader.target_for(id.as_str(), &claim).await?
        }
        None => None,
    };
    let row = match (&target, next.push_outcome()) {
        (Some(target), Some(outcome)) => Some((
            state.outbox.row(
                &caller.practice_id,
                id.as_str(),
                target,
                outcome,
                Some(disposition.unwrap_or_else(|| next.default_disposition().to_owned())),
                PushSource::Status,
            ),
            outcome,
        )),
        _ => None,
    };
    let audit = if state.skip_audit {
        vec![]
    } else {
        vec![claim_event(&req, 200, Action::Update, &id, &claim)]
    };
    let change = ClaimTransition {
        claim_id: id.to_string(),
        status: next,
        if_match: expected,
        outbox: row.iter().map(|(r, _)| r.clone()).collect(),
        audit,
    };
    // The state is read and the change written in one transaction, which the writer shares
    // with the practice's other changes of the moment.
    match state
        .claim_changes
        .transition(&caller.practice_id, change)
        .await
        .map_err(ApiError::from)?
    {
        Transitioned::Changed(changed) => {
            req.extensions_mut().insert(AuditedInTransaction);
            let push = row.map(|(r, outcome)| {
                state.outbox.written();
                QueuedPush {
                    update_id: r.id,
                    connection_id: r.connection_id,
                    outcome,
                }
            });
            Ok(respond(
                actix_web::http::StatusCode::OK,
                &changed,
                body(&changed, push),
            ))
        }
        Transitioned::Refused(now) => Err(refusal(&now, next, expected).into()),
        Transitioned::Busy => Err(ApiError::Conflict(
            "the claim's status is being changed by other requests at the same time; retry".into(),
        )
        .into()),
    }
}

/// Why a transition was refused: a stale `If-Match` (412) or a move the claim's current status
/// does not allow (409, naming the ones it does).
fn refusal(now: &ClaimState, next: ClaimStatus, expected: Option<i64>) -> ApiError {
    if expected.is_some_and(|v| v != now.version) {
        return ApiError::PreconditionFailed(format!(
            "If-Match: the current version is {}",
            now.version
        ));
    }
    let allowed: Vec<&str> = now
        .status
        .next_statuses()
        .map(ClaimStatus::as_str)
        .collect();
    ApiError::Conflict(format!(
        "the claim is {} and cannot become {} (it may become: {})",
        now.status,
        next,
        if allowed.is_empty() {
            "nothing, it is final".to_owned()
        } else {
            allowed.join(", ")
        }
    ))
}
