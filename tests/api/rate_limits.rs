//! Rate limits as a client sees them: quota headers, 429 with Retry-After and an
//! OperationOutcome, per-client isolation, metrics and audit of refusals.

use serde_json::Value;

use fhirgate::gate::Role;

use crate::auth::{access_token, register_client, request_token, session};
use crate::helpers::spawn_app_with;

#[tokio::test]
async fn a_client_over_its_quota_gets_429_while_another_client_is_served() {
    let app = spawn_app_with("[rate_limit]\nclient_points = 3\nwindow_secs = 3600\n").await;
    let token = access_token(&app, "system/Patient.rs").await;
    let other = access_token(&app, "system/Patient.rs").await;
    let get = |token: &str| {
        app.client
            .get(app.url("/fhir/r4/Patient/p1"))
            .bearer_auth(token.to_owned())
            .send()
    };

    for remaining in [2, 1, 0] {
        let res = get(&token).await.unwrap();
        assert_eq!(res.status(), 404);
        assert_eq!(res.headers()["ratelimit-policy"], "\"client\";q=3;w=3600");
        let state = res.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            state.starts_with(&format!("\"client\";r={remaining};t=")),
            "{state}"
        );
    }
    let res = get(&token).await.unwrap();
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry));
    let outcome: Value = res.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "throttled");

    // Another client (of another practice) is unaffected.
    assert_eq!(get(&other).await.unwrap().status(), 404);

    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(r#"fhirgate_rate_limited_total{quota="client"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn token_requests_are_limited_per_source_address() {
    let app =
        spawn_app_with("[rate_limit]\ntoken_ip_points = 20\ncost_token = 10\nwindow_secs = 3600\n")
            .await;
    let client = register_client(&app, "system/Patient.rs").await;
    for _ in 0..2 {
        let res = request_token(&app, &client.sign(&client.claims()), "system/Patient.rs").await;
        assert_eq!(res.status(), 200);
    }
    let res = request_token(&app, &client.sign(&client.claims()), "system/Patient.rs").await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn refused_requests_are_audited() {
    let app = spawn_app_with("[rate_limit]\nclient_points = 1\nwindow_secs = 3600\n").await;
    let s = session(&app, "system/Patient.rs", Role::ExternalSystem).await;
    for _ in 0..2 {
        app.client
            .get(app.url("/fhir/r4/Patient/p1"))
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap();
    }
    let events = app
        .store
        .audit_chain_page(&s.practice_id, 0, 100)
        .await
        .unwrap();
    let statuses: Vec<i64> = events.iter().map(|e| e.status_code).collect();
    assert_eq!(statuses, [200, 404, 429]);
}
