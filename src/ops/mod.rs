//! Operations endpoints: `/healthz` (process up), `/readyz` (database reachable and migrated),
//! `/metrics` (Prometheus text). None of them touches PHI.

pub mod metrics;

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::startup::AppState;

pub use metrics::Metrics;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics_text));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/health+json")
        .body(r#"{"status":"pass"}"#)
}

/// Ready when the database answers within two seconds and every embedded migration is applied.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let check = tokio::time::timeout(Duration::from_secs(2), state.store.migration_status()).await;
    let (database, migrations) = match check {
        Ok(Ok(status)) if status.pending() == 0 => ("pass", "pass"),
        Ok(Ok(_)) => ("pass", "fail"),
        Ok(Err(_)) | Err(_) => ("fail", "unknown"),
    };
    let ok = database == "pass" && migrations == "pass";
    let body = json!({
        "status": if ok { "pass" } else { "fail" },
        "checks": { "database": database, "migrations": migrations },
    });
    let mut res = if ok {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    res.content_type("application/health+json")
        .body(body.to_string())
}

async fn metrics_text(state: web::Data<AppState>) -> HttpResponse {
    state.metrics.observe_pool(state.store.pool_stats());
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
