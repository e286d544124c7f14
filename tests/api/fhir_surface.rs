//! The FHIR baseline: CapabilityStatement, content negotiation, OperationOutcome on every error.

use crate::auth::access_token;
use crate::helpers::{assert_valid_fhir, fhir_body, spawn_app};

#[tokio::test]
async fn metadata_is_a_valid_r4_capability_statement_of_this_server() {
    let app = spawn_app().await;
    let res = app.get("/fhir/r4/metadata").await;
    assert_eq!(res.status(), 200);
    let body = fhir_body(res).await;
    assert_eq!(body["resourceType"], "CapabilityStatement");
    assert_eq!(body["fhirVersion"], "4.0.1");
    assert_eq!(body["kind"], "instance");
    assert_eq!(body["status"], "active");
    assert_eq!(body["software"]["name"], "fhirgate");
    assert_eq!(
        body["implementation"]["url"],
        format!("{}/fhir/r4", app.address)
    );
    assert_eq!(body["rest"][0]["mode"], "server");
    // The shared schema is the R4 JSON schema as first published (4.0.0): its FHIRVersion enum
    // predates the 4.0.1 technical correction, so that one element is checked above instead.
    let mut for_schema = body.clone();
    for_schema["fhirVersion"] = "4.0.0".into();
    assert_valid_fhir(&[for_schema]);
}

#[tokio::test]
async fn xml_is_refused_with_406_and_an_operation_outcome() {
    let app = spawn_app().await;
    let by_accept = app
        .client
        .get(app.url("/fhir/r4/metadata"))
        .header("accept", "application/fhir+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(by_accept.status(), 406);
    let outcome = fhir_body(by_accept).await;
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "not-supported");

    let by_format = app.get("/fhir/r4/metadata?_format=xml").await;
    assert_eq!(by_format.status(), 406);
    let outcome2 = fhir_body(by_format).await;
    assert_valid_fhir(&[outcome, outcome2]);
}

#[tokio::test]
async fn format_parameter_wins_over_accept_and_json_variants_are_accepted() {
    let app = spawn_app().await;
    let res = app
        .client
        .get(app.url("/fhir/r4/metadata?_format=json"))
        .header("accept", "application/fhir+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    for accept in [
        "application/json",
        "application/fhir+json",
        "*/*",
        "application/json+fhir",
    ] {
        let res = app
            .client
            .get(app.url("/fhir/r4/metadata"))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "Accept: {accept}");
    }
}

#[tokio::test]
async fn pretty_printing_is_honoured() {
    let app = spawn_app().await;
    let pretty = app
        .get("/fhir/r4/metadata?_pretty=true")
        .await
        .text()
        .await
        .unwrap();
    let compact = app.get("/fhir/r4/metadata").await.text().await.unwrap();
    assert!(pretty.contains("\n  \"resourceType\""));
    assert!(!compact.contains('\n'));
}

#[tokio::test]
async fn an_unknown_fhir_route_is_a_404_operation_outcome_that_does_not_echo_the_path() {
    let app = spawn_app().await;
    let token = access_token(&app, "system/*.rs").await;
    let res = app
        .client
        .get(app.url("/fhir/r4/Patient/jane-doe-1970"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let outcome = fhir_body(res).await;
    assert_eq!(outcome["issue"][0]["code"], "not-found");
    assert!(!outcome.to_string().contains("jane-doe"));
    assert_valid_fhir(&[outcome]);
}

#[tokio::test]
async fn a_wrong_method_is_a_405_with_allow() {
    let app = spawn_app().await;
    let res = app
        .client
        .delete(app.url("/fhir/r4/metadata"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "GET");
    let outcome = fhir_body(res).await;
    assert_eq!(outcome["resourceType"], "OperationOutcome");
}
