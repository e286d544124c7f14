//! Rate limits (governor, GCRA): keyed per client and per practice, plus a global ceiling, in
//! *points* per window, where an interaction's cost reflects its weight (by default a read costs
//! 1, a search 10, a write 100, an export 500 — Medplum publishes 1 per read and 100 per write),
//! so one client's bulk writes cannot starve others' reads. Token requests are limited per source
//! IP, and EHR webhooks per connection in a quota of their own (an EHR is not a practice's
//! client and must not spend its practice's points). Limited requests get 429 + `Retry-After` + an OperationOutcome and never reach a handler;
//! every response carries `RateLimit-Policy` / `RateLimit` (IETF httpapi ratelimit headers draft).
//! Keys unused for a window are evicted, so memory stays bounded however many keys appear.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, Error, HttpMessage, HttpResponse};
use fhir_sdk::r4b::codes::{IssueSeverity, IssueType};
use governor::clock::Reference;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::middleware::StateSnapshot;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{InsufficientCapacity, NotUntil, Quota, RateLimiter};
use serde::Deserialize;

use super::Caller;
use crate::audit::middleware::classify;
use crate::audit::Action;
use crate::http::error::operation_outcome;
use crate::http::FHIR_JSON;
use crate::startup::AppState;

type Keyed =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;
type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// `[rate_limit]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub enabled: bool,
    pub window_secs: u64,
    pub client_points: u32,
    pub practice_points: u32,
    pub global_points: u32,
    pub token_ip_points: u32,
    /// Webhook requests per EHR connection per window (each costs 1).
    pub webhook_points: u32,
    pub cost_read: u32,
    pub cost_search: u32,
    pub cost_write: u32,
    pub cost_export: u32,
    pub cost_token: u32,
    /// Per-client points per window, overriding `client_points`.
    #[serde(default)]
    pub clients: HashMap<String, u32>,
}

impl RateLimitSettings {
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.window_secs == 0 {
            return Err(("rate_limit.window_secs", "must be at least 1"));
        }
        for (key, v) in [
            ("rate_limit.client_points", self.client_points),
            ("rate_limit.practice_points", self.practice_points),
            ("rate_limit.global_points", self.global_points),
            ("rate_limit.token_ip_points", self.token_ip_points),
            ("rate_limit.webhook_points", self.webhook_points),
            ("rate_limit.cost_read", self.cost_read),
            ("rate_limit.cost_search", self.cost_search),
            ("rate_limit.cost_write", self.cost_write),
            ("rate_limit.cost_export", self.cost_export),
            ("rate_limit.cost_token", self.cost_token),
        ] {
            if v == 0 {
                return Err((key, "must be at least 1"));
            }
        }
        if self.clients.values().any(|v| *v == 0) {
            return Err(("rate_limit.clients", "every override must be at least 1"));
        }
        Ok(())
    }

    fn cost(&self, action: Action) -> u32 {
        match action {
            Action::Read | Action::Vread | Action::History | Action::Access => self.cost_read,
            Action::Search => self.cost_search,
            Action::Create | Action::Update | Action::Delete => self.cost_write,
            Action::Export => self.cost_export,
            Action::Token | Action::Webhook | Action::Sync | Action::Push => self.cost_token,
            // Never an inbound request: outbound calls have their own limit per connection.
            Action::Outbound(_) => 0,
        }
    }
}

/// The outcome of a check, with what the headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed {
        policy: Policy,
        remaining: u32,
    },
    Limited {
        policy: Policy,
        retry_after_secs: u64,
    },
}

/// A named quota: `points` per `window_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub name: &'static str,
    pub points: u32,
    pub window_secs: u64,
}

struct KeyedPolicy {
    limiter: Keyed,
    policy: Policy,
}

pub struct RateLimits {
    settings: RateLimitSettings,
    client: KeyedPolicy,
    overrides: HashMap<String, KeyedPolicy>,
    practice: KeyedPolicy,
    token_ip: KeyedPolicy,
    webhook: KeyedPolicy,
    global: (Direct, Policy),
}

fn quota(points: u32, window_secs: u64) -> Quota {
    let points = NonZeroU32::new(points).unwrap_or(NonZeroU32::MIN);
    let period = Duration::from_secs(window_secs) / points.get();
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(points))
        .allow_burst(points)
}

fn decide<P: Reference>(
    policy: Policy,
    outcome: Result<Result<StateSnapshot, NotUntil<P>>, InsufficientCapacity>,
    now: P,
) -> Decision {
    match outcome {
        Ok(Ok(snapshot)) => Decision::Allowed {
            policy,
            remaining: snapshot.remaining_burst_capacity(),
        },
        Ok(Err(not_until)) => Decision::Limited {
            policy,
            retry_after_secs: not_until.wait_time_from(now).as_secs_f64().ceil().max(1.0) as u64,
        },
        // More than the whole quota: it can never pass; wait a full window.
        Err(_) => Decision::Limited {
            policy,
            retry_after_secs: policy.window_secs,
        },
    }
}

fn keyed(name: &'static str, points: u32, window_secs: u64) -> KeyedPolicy {
    KeyedPolicy {
        limiter: RateLimiter::keyed(quota(points, window_secs)).with_middleware(),
        policy: Policy {
            name,
            points,
            window_secs,
        },
    }
}

impl RateLimits {
    pub fn new(settings: &RateLimitSettings) -> Self {
        let w = settings.window_secs;
        let global = RateLimiter::direct(quota(settings.global_points, w)).with_middleware();
        Self {
            client: keyed("client", settings.client_points, w),
            overrides: settings
                .clients
                .iter()
                .map(|(id, points)| (id.clone(), keyed("client", *points, w)))
                .collect(),
            practice: keyed("practice", settings.practice_points, w),
            token_ip: keyed("token", settings.token_ip_points, w),
            webhook: keyed("webhook", settings.webhook_points, w),
            global: (
                global,
                Policy {
                    name: "global",
                    points: settings.global_points,
                    window_secs: w,
                },
            ),
            settings: settings.clone(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    fn check_keyed(kp: &KeyedPolicy, key: &str, cost: NonZeroU32) -> Decision {
        let outcome = kp.limiter.check_key_n(&key.to_owned(), cost);
        decide(kp.policy, outcome, kp.limiter.clock().now())
    }

    /// Charges `action`'s cost to the client, its practice and the global ceiling, in that order;
    /// the first limit hit decides. The client's policy is what an allowed response reports.
    pub fn check(&self, client_id: &str, practice_id: &str, action: Action) -> Decision {
        let cost = NonZeroU32::new(self.settings.cost(action)).unwrap_or(NonZeroU32::MIN);
        let client = self.overrides.get(client_id).unwrap_or(&self.client);
        let verdict = Self::check_keyed(client, client_id, cost);
        if matches!(verdict, Decision::Limited { .. }) {
            return verdict;
        }
        let practice = Self::check_keyed(&self.practice, practice_id, cost);
        if matches!(practice, Decision::Limited { .. }) {
            return practice;
        }
        let outcome = self.global.0.check_n(cost);
        let global = decide(self.global.1, outcome, self.global.0.clock().now());
        if matches!(global, Decision::Limited { .. }) {
            return global;
        }
        verdict
    }

    /// Charges a token request to its source IP.
    pub fn check_token(&self, ip: &str) -> Decision {
        let cost = NonZeroU32::new(self.settings.cost_token).unwrap_or(NonZeroU32::MIN);
        Self::check_keyed(&self.token_ip, ip, cost)
    }

    /// Charges one webhook request to its EHR connection.
    pub fn check_webhook(&self, connection_id: &str) -> Decision {
        Self::check_keyed(&self.webhook, connection_id, NonZeroU32::MIN)
    }

    /// Drops keys whose buckets are full again (indistinguishable from new ones).
    pub fn evict_stale(&self) {
        for kp in [&self.client, &self.practice, &self.token_ip, &self.webhook]
            .into_iter()
            .chain(self.overrides.values())
        {
            kp.limiter.retain_recent();
            kp.limiter.shrink_to_fit();
        }
    }

    /// Keys currently held (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.client.limiter.len() + self.practice.limiter.len() + self.token_ip.limiter.len()
    }
}

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// `RateLimit-Policy` and `RateLimit` values (draft-ietf-httpapi-ratelimit-headers: structured
/// fields, `q` quota, `w` window, `r` remaining, `t` seconds until the quota is whole again).
fn header_values(decision: Decision) -> (String, String) {
    let (policy, remaining, reset) = match decision {
        Decision::Allowed { policy, remaining } => {
            let used = u64::from(policy.points.saturating_sub(remaining));
            let reset = (used * policy.window_secs).div_ceil(u64::from(policy.points.max(1)));
            (policy, remaining, reset)
        }
        Decision::Limited {
            policy,
            retry_after_secs,
        } => (policy, 0, retry_after_secs),
    };
    (
        format!(
            "\"{}\";q={};w={}",
            policy.name, policy.points, policy.window_secs
        ),
        format!("\"{}\";r={};t={}", policy.name, remaining, reset),
    )
}

/// Adds `RateLimit-Policy` and `RateLimit` for `decision`.
pub(crate) fn add_headers(headers: &mut actix_web::http::header::HeaderMap, decision: Decision) {
    let (policy, state) = header_values(decision);
    if let (Ok(p), Ok(s)) = (
        HeaderValue::from_str(&policy),
        HeaderValue::from_str(&state),
    ) {
        headers.insert(RATELIMIT_POLICY, p);
        headers.insert(RATELIMIT, s);
    }
}

/// The 429 response (OperationOutcome, `Retry-After`, rate-limit headers) of a limited request.
pub(crate) fn too_many(decision: Decision) -> HttpResponse {
    let Decision::Limited {
        policy,
        retry_after_secs,
    } = decision
    else {
        return HttpResponse::InternalServerError().finish();
    };
    let outcome = operation_outcome(
        IssueSeverity::Error,
        IssueType::Throttled,
        format!(
            "rate limit of the {} quota exceeded; retry after {retry_after_secs} s",
            policy.name
        ),
    );
    let mut res = HttpResponse::build(StatusCode::TOO_MANY_REQUESTS);
    res.insert_header((actix_web::http::header::CONTENT_TYPE, FHIR_JSON))
        .insert_header((RETRY_AFTER, retry_after_secs.to_string()));
    let mut res = res.body(serde_json::to_vec(&outcome).unwrap_or_default());
    add_headers(res.headers_mut(), decision);
    res
}

async fn apply<B: MessageBody + 'static>(
    state: &AppState,
    decision: Decision,
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, Error> {
    match decision {
        Decision::Allowed { .. } => {
            let mut res = next.call(req).await?;
            add_headers(res.headers_mut(), decision);
            Ok(res.map_into_left_body())
        }
        Decision::Limited { policy, .. } => {
            state.metrics.observe_rate_limited(policy.name);
            Ok(req.into_response(too_many(decision)).map_into_right_body())
        }
    }
}

/// Limits authenticated FHIR and API requests by client, practice and globally.
pub async fn limit_request<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let caller = req
        .extensions()
        .get::<Caller>()
        .map(|c| (c.client_id.clone(), c.practice_id.clone()));
    let Some((client, practice)) = caller.filter(|_| state.rate_limits.enabled()) else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let pattern = req.match_pattern();
    let mut action = classify(pattern.as_deref(), req.method()).0;
    // An export's weight is charged once, at kick-off; polling it and fetching its files are
    // charged as reads.
    if action == Action::Export
        && pattern
            .as_deref()
            .is_some_and(crate::fhir::export::is_job_route)
    {
        action = Action::Read;
    }
    let decision = state.rate_limits.check(&client, practice.as_str(), action);
    apply(&state, decision, req, next).await
}

/// Limits token requests by source IP (before any client is known).
pub async fn limit_token<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    if !state.rate_limits.enabled() {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let ip = crate::http::client_ip::client_ip(req.request())
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    let decision = state.rate_limits.check_token(&ip);
    apply(&state, decision, req, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(client_points: u32) -> RateLimitSettings {
        RateLimitSettings {
            enabled: true,
            window_secs: 60,
            client_points,
            practice_points: 1_000,
            global_points: 10_000,
            token_ip_points: 100,
            webhook_points: 100,
            cost_read: 1,
            cost_search: 10,
            cost_write: 100,
            cost_export: 500,
            cost_token: 10,
            clients: HashMap::from([("vip".to_owned(), 1_000)]),
        }
    }

    #[test]
    fn a_write_costs_more_than_a_search_and_a_search_more_than_a_read() {
        let limits = RateLimits::new(&settings(120));
        assert!(matches!(
            limits.check("a", "p", Action::Create),
            Decision::Allowed { remaining: 20, .. }
        ));
        assert!(matches!(
            limits.check("a", "p", Action::Search),
            Decision::Allowed { remaining: 10, .. }
        ));
        assert!(matches!(
            limits.check("a", "p", Action::Read),
            Decision::Allowed { remaining: 9, .. }
        ));
        // A second write does not fit; reads still do.
        assert!(matches!(
            limits.check("a", "p", Action::Create),
            Decision::Limited { .. }
        ));
        assert!(matches!(
            limits.check("a", "p", Action::Read),
            Decision::Allowed { .. }
        ));
    }

    #[test]
    fn one_client_exhausting_its_quota_leaves_another_clients_reads_alone() {
        let limits = RateLimits::new(&settings(100));
        assert!(matches!(
            limits.check("bulk", "p", Action::Create),
            Decision::Allowed { .. }
        ));
        assert!(matches!(
            limits.check("bulk", "p", Action::Create),
            Decision::Limited { .. }
        ));
        assert!(matches!(
            limits.check("reader", "p", Action::Read),
            Decision::Allowed { .. }
        ));
    }

    #[test]
    fn a_per_client_override_replaces_the_default_quota() {
        let limits = RateLimits::new(&settings(100));
        assert!(matches!(
            limits.check("vip", "p", Action::Create),
            Decision::Allowed {
                remaining: 900,
                policy: Policy { points: 1_000, .. }
            }
        ));
    }

    #[test]
    fn a_limited_decision_says_when_to_retry() {
        let limits = RateLimits::new(&settings(1));
        let _ = limits.check("a", "p", Action::Read);
        match limits.check("a", "p", Action::Read) {
            Decision::Limited {
                retry_after_secs, ..
            } => assert!((1..=60).contains(&retry_after_secs)),
            other => panic!("{other:?}"),
        }
        let (policy, state) = header_values(limits.check("a", "p", Action::Read));
        assert_eq!(policy, "\"client\";q=1;w=60");
        assert!(state.starts_with("\"client\";r=0;t="));
    }

    #[test]
    fn stale_keys_are_evicted_so_memory_stays_bounded() {
        let mut s = settings(10);
        s.window_secs = 1;
        let limits = RateLimits::new(&s);
        for i in 0..5_000 {
            let _ = limits.check(&format!("client-{i}"), "p", Action::Read);
        }
        assert!(limits.tracked_keys() >= 5_000);
        // Once a window has passed every bucket is full again, indistinguishable from new.
        std::thread::sleep(Duration::from_millis(1_100));
        limits.evict_stale();
        assert_eq!(limits.tracked_keys(), 0);
    }
}
