//! `/api/v1/clients`: client administration over HTTP for practice administrators.

use serde_json::{json, Value};

use fhirgate::gate::Role;

use crate::auth::{request_token, session, SigningKey, TestClient};
use crate::helpers::{spawn_app, TestApp};

/// A new practice with a client of `role`, and that client's token.
async fn token_with_role(app: &TestApp, role: Role) -> (String, String) {
    let s = session(app, "system/Patient.rs", role).await;
    (s.token, s.practice_id)
}

#[tokio::test]
async fn a_practice_admin_creates_lists_rotates_and_disables_its_clients() {
    let app = spawn_app().await;
    let (admin, practice) = token_with_role(&app, Role::PracticeAdmin).await;
    let key = SigningKey::es384("partner-1");
    let res = app
        .client
        .post(app.url("/api/v1/clients"))
        .bearer_auth(&admin)
        .json(&json!({
            "name": "Partner EHR",
            "scope": "system/Patient.rs",
            "jwks": serde_json::from_str::<Value>(&SigningKey::jwks(&[&key])).unwrap(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    assert_eq!(created["practice_id"], practice.as_str());
    assert_eq!(created["role"], "external_system");
    let id = created["client_id"].as_str().unwrap().to_owned();

    // The new client can authenticate.
    let partner = TestClient {
        client_id: id.clone(),
        key,
        token_url: app.url("/auth/token"),
    };
    let res = request_token(&app, &partner.sign(&partner.claims()), "system/Patient.rs").await;
    assert_eq!(res.status(), 200);

    let listed: Value = app
        .client
        .get(app.url("/api/v1/clients"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);

    let rotated_key = SigningKey::es384("partner-2");
    let res = app
        .client
        .put(app.url(&format!("/api/v1/clients/{id}/keys")))
        .bearer_auth(&admin)
        .json(&json!({ "jwks": serde_json::from_str::<Value>(&SigningKey::jwks(&[&rotated_key])).unwrap() }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = request_token(&app, &partner.sign(&partner.claims()), "system/Patient.rs").await;
    assert_eq!(res.status(), 401, "the rotated-out key still works");

    let res = app
        .client
        .post(app.url(&format!("/api/v1/clients/{id}/disable")))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["status"], "disabled");
}

#[tokio::test]
async fn other_roles_other_practices_and_bad_bodies_are_refused() {
    let app = spawn_app().await;
    let (admin, _) = token_with_role(&app, Role::PracticeAdmin).await;
    let (clinician, _) = token_with_role(&app, Role::Clinician).await;
    let (other_admin, _) = token_with_role(&app, Role::PracticeAdmin).await;

    let res = app
        .client
        .get(app.url("/api/v1/clients"))
        .bearer_auth(&clinician)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(
        res.json::<Value>().await.unwrap()["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(app.get("/api/v1/clients").await.status(), 401);

    // Another practice's client is invisible.
    let mine: Value = app
        .client
        .get(app.url("/api/v1/clients"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let my_client = mine[0]["client_id"].as_str().unwrap();
    let res = app
        .client
        .post(app.url(&format!("/api/v1/clients/{my_client}/disable")))
        .bearer_auth(&other_admin)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);

    let res = app
        .client
        .post(app.url("/api/v1/clients"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(r#"{"name": "X", "jwks_url": "https://x/j", "scope": "system/Patient.zz"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = app
        .client
        .post(app.url("/api/v1/clients"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(r#"{"name": 1961, "jwks_url": "https://x/j"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let outcome: Value = res.json().await.unwrap();
    assert!(!outcome.to_string().contains("1961"));
}
