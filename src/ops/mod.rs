//! Operations endpoints: `/healthz` (process up), `/readyz` (database reachable and migrated;
//! a queue stuck past `sync.stuck_after_secs` is reported as a warning, not a failure),
//! `/metrics` (Prometheus text). None of them touches PHI.

pub mod metrics;
pub mod queues;

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
/// Queues whose oldest waiting row is older than `sync.stuck_after_secs` turn the status to
/// `warn` (still 200: a stuck queue needs a person, not a restart) and are listed.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let check = tokio::time::timeout(Duration::from_secs(2), state.store.migration_status()).await;
    let (database, migrations) = match check {
        Ok(Ok(status)) if status.pending() == 0 => ("pass", "pass"),
        Ok(Ok(_)) => ("pass", "fail"),
        Ok(Err(_)) | Err(_) => ("fail", "unknown"),
    };
    let ok = database == "pass" && migrations == "pass";
    let stuck_after = state.stuck_after.as_secs_f64();
    let queues = if ok {
        match tokio::time::timeout(Duration::from_secs(2), queues::queue_health(&*state.store))
            .await
        {
            Ok(Ok(health)) => Some(
                health
                    .into_iter()
                    .filter(|q| q.depth > 0 && q.oldest_age_secs > stuck_after)
                    .map(|q| {
                        json!({
                            "queue": q.queue,
                            "connection_id": q.connection_id,
                            "depth": q.depth,
                            "oldest_age_seconds": q.oldest_age_secs.round(),
                        })
                    })
                    .collect::<Vec<_>>(),
            ),
            Ok(Err(_)) | Err(_) => None,
        }
    } else {
        None
    };
    let queue_check = match &queues {
        Some(stuck) if stuck.is_empty() => "pass",
        Some(_) => "warn",
        None => "unknown",
    };
    let status = match (ok, queue_check) {
        (false, _) => "fail",
        (true, "pass") => "pass",
        (true, _) => "warn",
    };
    let body = json!({
        "status": status,
        "checks": { "database": database, "migrations": migrations, "queues": queue_check },
        "stuck_queues": queues.unwrap_or_default(),
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
    match tokio::time::timeout(Duration::from_secs(2), queues::queue_health(&*state.store)).await {
        Ok(Ok(health)) => state.metrics.observe_queues(&health),
        Ok(Err(_)) | Err(_) => tracing::warn!("queue depths not read for /metrics"),
    }
    match tokio::time::timeout(Duration::from_secs(2), queues::dead_letters(&*state.store)).await {
        Ok(Ok(counts)) => state.metrics.observe_dead_letters(&counts),
        Ok(Err(_)) | Err(_) => tracing::warn!("dead letters not counted for /metrics"),
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
