//! /healthz, /readyz, /metrics and the request id.

use crate::helpers::{spawn_app, spawn_app_with, TestDb};

#[tokio::test]
async fn healthz_answers_while_the_process_is_up() {
    let app = spawn_app().await;
    let res = app.get("/healthz").await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.json::<serde_json::Value>().await.unwrap()["status"],
        "pass"
    );
}

#[tokio::test]
async fn readyz_is_green_when_the_database_is_reachable_and_migrated() {
    let app = spawn_app().await;
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["checks"]["database"], "pass");
    assert_eq!(body["checks"]["migrations"], "pass");
}

#[tokio::test]
async fn readyz_is_red_while_migrations_are_pending_and_green_after_migrate() {
    let app = spawn_app_with("migrate_on_start = false").await;
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["checks"]["migrations"], "fail");

    app.store.migrate().await.unwrap();
    assert_eq!(app.get("/readyz").await.status(), 200);
}

#[tokio::test]
async fn readyz_is_red_when_the_database_is_gone() {
    let app = spawn_app().await;
    app.store.close().await;
    let res = app.get("/readyz").await;
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["checks"]["database"], "fail");
    // The process itself is still up.
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_client_uuid_is_kept() {
    let app = spawn_app().await;
    let res = app.get("/healthz").await;
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");

    let mine = uuid::Uuid::new_v4().to_string();
    let res = app
        .client
        .get(app.url("/fhir/r4/metadata"))
        .header("x-request-id", &mine)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"].to_str().unwrap(), mine);

    // Anything that is not a UUID could carry PHI into the logs: replaced.
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("x-request-id", "Jane Doe 1970-01-01")
        .send()
        .await
        .unwrap();
    let id = res.headers()["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok());
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_without_raw_ids() {
    let app = spawn_app().await;
    app.get("/fhir/r4/metadata").await;
    app.get("/fhir/r4/metadata").await;
    app.get("/fhir/r4/Patient/secret-id-4242?name=Zebediah")
        .await;

    let res = app.get("/metrics").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = res.text().await.unwrap();
    assert!(
        text.contains(
            r#"fhirgate_http_requests_total{method="GET",route="/fhir/r4/metadata",status="200"} 2"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"status="401""#));
    assert!(text.contains("fhirgate_http_request_duration_seconds_bucket"));
    assert!(text.contains("fhirgate_db_pool_max_connections 5"));
    assert!(!text.contains("secret-id-4242"));
    assert!(!text.contains("Zebediah"));
}

#[tokio::test]
async fn a_fresh_database_per_test_starts_empty() {
    let (_db, url) = TestDb::create().await;
    let store = fhirgate::store::connect(
        &url,
        &fhirgate::store::PoolOptions {
            max_connections: 1,
            acquire_timeout: std::time::Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        store.migration_status().await.unwrap().applied,
        Vec::<i64>::new()
    );
    store.migrate().await.unwrap();
    assert!(store.list_practices().await.unwrap().is_empty());
    store.close().await;
}
