//! Audits every request that reaches the gate (FHIR API and token endpoint), successes and
//! refusals alike (401, 403, 404, 406, 429...). The response is released only after its event is
//! durable; when the trail cannot be written the request fails closed with 503.
//!
//! Facts come from the route *template* and validated ids, never from the raw path or query.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpMessage, HttpRequest, ResponseError};

use super::{Action, NewAuditEvent};
use crate::domain::ResourceId;
use crate::fhir::FHIR_BASE;
use crate::gate::middleware::is_public;
use crate::gate::Caller;
use crate::http::observe::RequestId;
use crate::http::ApiError;
use crate::startup::AppState;

/// Who acted, when the handler learns it without a bearer token (the token endpoint).
#[derive(Debug, Clone)]
pub struct AuditActor {
    pub client_id: String,
    pub practice_id: ResourceId,
    pub role: &'static str,
}

/// Set by a handler that wrote its audit event inside its own data transaction.
#[derive(Debug, Clone, Copy)]
pub struct AuditedInTransaction;

/// HL7 v3 PurposeOfUse codes a client may declare in `X-Purpose-Of-Use`.
const PURPOSES: &[&str] = &[
    "TREAT",
    "ETREAT",
    "HPAYMT",
    "HOPERAT",
    "HSYSADMIN",
    "PUBHLTH",
    "HRESCH",
    "PATRQT",
    "COVERAGE",
    "CLMATTCH",
    "HQUALIMP",
    "LABELING",
];

/// Action, resource type and id from the matched route template.
pub(crate) fn classify(pattern: Option<&str>, method: &Method) -> (Action, Option<String>) {
    let Some(pattern) = pattern else {
        return (Action::Access, None);
    };
    if pattern == "/auth/token" {
        return (Action::Token, None);
    }
    let rest = pattern.strip_prefix(FHIR_BASE).unwrap_or(pattern);
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let resource_type = segments
        .first()
        .filter(|s| s.chars().next().is_some_and(|c| c.is_ascii_uppercase()))
        .map(|s| (*s).to_owned());
    if segments
        .iter()
        .any(|s| s.starts_with('$') && s.contains("export"))
    {
        return (Action::Export, resource_type);
    }
    let action = match (segments.as_slice(), method) {
        ([_], &Method::GET) | ([_, "_search"], &Method::POST) => Action::Search,
        ([_], &Method::POST) => Action::Create,
        ([_, id], &Method::GET) if id.starts_with('{') => Action::Read,
        ([_, _], &Method::PUT) | ([_, _], &Method::PATCH) => Action::Update,
        ([_, _], &Method::DELETE) => Action::Delete,
        ([_, "_history"], _) | ([_, _, "_history"], _) => Action::History,
        ([_, _, "_history", _], _) => Action::Vread,
        _ => Action::Access,
    };
    (action, resource_type)
}

/// The audit event of a request answered with `status`: the caller (or the actor the token
/// endpoint learnt), the interaction from the route template, the id from the path (if valid),
/// network facts and the declared purpose of use. Handlers that write call this to record the
/// event inside their transaction, adjusting what only they know (a created resource's id, the
/// patient a resource is about).
pub fn request_event(request: &HttpRequest, status: StatusCode) -> NewAuditEvent {
    let id = request
        .match_info()
        .get("id")
        .and_then(|id| ResourceId::parse("id", id).ok())
        .map(|id| id.to_string());
    let pattern = request.match_pattern();
    let (action, resource_type) = classify(pattern.as_deref(), request.method());
    let headers = request.headers();
    let mut event = NewAuditEvent {
        action: Some(action),
        status_code: status.as_u16(),
        patient_id: (resource_type.as_deref() == Some("Patient"))
            .then(|| id.clone())
            .flatten(),
        resource_id: id,
        resource_type,
        source_ip: crate::http::client_ip::client_ip(request).map(|ip| ip.to_string()),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(256).collect::<String>()),
        purpose_of_use: headers
            .get("x-purpose-of-use")
            .and_then(|v| v.to_str().ok())
            .filter(|v| PURPOSES.contains(v))
            .map(str::to_owned),
        request_id: request.extensions().get::<RequestId>().map(|r| r.0.clone()),
        ..Default::default()
    };
    if let Some(caller) = request.extensions().get::<Caller>() {
        event.practice_id = Some(caller.practice_id.clone());
        event.actor_client_id = Some(caller.client_id.clone());
        event.actor_role = Some(caller.role.as_str().to_owned());
    } else if let Some(actor) = request.extensions().get::<AuditActor>() {
        event.practice_id = Some(actor.practice_id.clone());
        event.actor_client_id = Some(actor.client_id.clone());
        event.actor_role = Some(actor.role.to_owned());
    }
    event
}

pub async fn audit_request(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    if is_public(req.path()) {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let res = next.call(req).await?;

    let request = res.request();
    if request.extensions().get::<AuditedInTransaction>().is_some() {
        return Ok(res.map_into_left_body());
    }
    let Some(state) = request
        .app_data::<web::Data<AppState>>()
        .filter(|s| !s.skip_audit)
        .cloned()
    else {
        return Ok(res.map_into_left_body());
    };
    let event = request_event(request, res.status());
    match state.audit.record(event).await {
        Ok(()) => Ok(res.map_into_left_body()),
        Err(_) => {
            let (req, _) = res.into_parts();
            let failed = ApiError::Unavailable.error_response();
            Ok(ServiceResponse::new(req, failed).map_into_right_body())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interactions_are_classified_from_the_route_template() {
        let c = |p: &str, m: Method, _id: Option<&str>| classify(Some(p), &m).0;
        assert_eq!(
            c("/fhir/r4/Patient/{id}", Method::GET, Some("1")),
            Action::Read
        );
        assert_eq!(c("/fhir/r4/Patient", Method::GET, None), Action::Search);
        assert_eq!(
            c("/fhir/r4/Patient/_search", Method::POST, None),
            Action::Search
        );
        assert_eq!(c("/fhir/r4/Patient", Method::POST, None), Action::Create);
        assert_eq!(
            c("/fhir/r4/Patient/{id}", Method::PUT, Some("1")),
            Action::Update
        );
        assert_eq!(
            c("/fhir/r4/Patient/{id}", Method::DELETE, Some("1")),
            Action::Delete
        );
        assert_eq!(
            c(
                "/fhir/r4/Patient/{id}/_history/{vid}",
                Method::GET,
                Some("1")
            ),
            Action::Vread
        );
        assert_eq!(
            c("/fhir/r4/Patient/{id}/_history", Method::GET, Some("1")),
            Action::History
        );
        assert_eq!(c("/fhir/r4/$export", Method::GET, None), Action::Export);
        assert_eq!(c("/auth/token", Method::POST, None), Action::Token);
        assert_eq!(
            c("/fhir/r4/Patient/_history", Method::GET, None),
            Action::History
        );
        assert_eq!(classify(None, &Method::GET).0, Action::Access);
    }
}
