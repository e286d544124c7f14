//! Master key rotation: `fhirgate keys rotate` re-encrypts stored PHI under the new key while a
//! gateway holding both keys serves, resumably, without disturbing blind-index search.

use serde_json::{json, Value};

use crate::binary::fhirgate;
use crate::helpers::{spawn_app_on, spawn_app_with, test_master_key};
use crate::patient::Fhir;

const ALL: &str = "system/Patient.cruds";

fn keys_cli(database_url: &str, spec: &str, args: &[&str]) -> (i32, Value, String) {
    let out = fhirgate()
        .arg("keys")
        .args(args)
        .env("FHIRGATE_DATABASE_URL", database_url)
        .env("FHIRGATE_MASTER_KEY", spec)
        .output()
        .expect("fhirgate runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        line,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn rotation_reencrypts_everything_in_resumable_batches_while_search_keeps_working() {
    let old = test_master_key();
    let app = spawn_app_with(&format!("master_key = '{old}'")).await;
    let fhir = Fhir::new(&app, ALL).await;
    let mut ids = Vec::new();
    for (family, mrn) in [("Rotated", "R-1"), ("Rotated", "R-2"), ("Turned", "R-3")] {
        let mut p = fhir
            .create(&json!({
                "resourceType": "Patient",
                "identifier": [{ "system": "urn:mrn", "value": mrn }],
                "name": [{ "family": family }],
                "birthDate": "1980-01-01"
            }))
            .await;
        p["active"] = json!(true);
        let id = p["id"].as_str().unwrap().to_owned();
        assert_eq!(fhir.put(&format!("/Patient/{id}"), &p).await.status(), 200);
        ids.push(id);
    }
    let url = app.database_url.expose().to_owned();

    // The operator restarts the gateway with the new key first and the old one retired...
    let new_key = test_master_key().replace("test1:", "test2:");
    let both = format!("{new_key},{old}");
    let rotated = spawn_app_on(&app.database_url, &format!("master_key = '{both}'"))
        .await
        .expect("a gateway with both keys starts");
    let during = fhir.via(&rotated, ALL).await;

    let (code, status, _) = keys_cli(&url, &both, &["status"]);
    assert_eq!(code, 0);
    assert_eq!(status["active_key"], "test2");
    assert_eq!(status["versions_by_key"]["test1"], 6);

    // ...then rotates, in batches of two.
    let (code, done, stderr) = keys_cli(&url, &both, &["rotate", "--batch-size", "2"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(done["reencrypted"], 6);
    assert_eq!(done["versions_by_key"], json!({ "test2": 6 }));
    assert_eq!(stderr.matches("re-encrypted").count(), 3, "{stderr}");
    // A second run finds nothing left to do.
    let (code, again, _) = keys_cli(&url, &both, &["rotate"]);
    assert_eq!(code, 0);
    assert_eq!(again["reencrypted"], 0);

    // Every version still reads, and the blind indexes (under the recorded key) still match.
    for id in &ids {
        assert_eq!(during.get(&format!("/Patient/{id}")).await.status(), 200);
        let v1 = during.get(&format!("/Patient/{id}/_history/1")).await;
        assert_eq!(v1.status(), 200);
    }
    let found = during
        .search_ids("/Patient?family=rotated&identifier=urn:mrn|R-2")
        .await;
    assert_eq!(found, vec![ids[1].clone()]);

    // The old key must stay in the spec: it computes the blind indexes. Without it the gateway
    // refuses to start rather than search wrongly.
    let err = match spawn_app_on(&app.database_url, &format!("master_key = '{new_key}'")).await {
        Ok(_) => panic!("a gateway without the blind index key started"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("blind index key `test1`"), "{err}");
}

#[tokio::test]
async fn rotation_refuses_a_spec_without_the_keys_in_use_and_rewrites_nothing() {
    let old = test_master_key();
    let app = spawn_app_with(&format!("master_key = '{old}'")).await;
    let fhir = Fhir::new(&app, ALL).await;
    fhir.create(&json!({ "resourceType": "Patient", "name": [{ "family": "Kept" }] }))
        .await;
    // A spec whose key under the recorded id is another key: refused before anything is read.
    let impostor = test_master_key();
    let (code, _, stderr) = keys_cli(app.database_url.expose(), &impostor, &["rotate"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("not the key this database"), "{stderr}");
    // A spec without the key the data is sealed under: rotation stops, naming no content.
    let other = test_master_key().replace("test1:", "test9:");
    let (code, _, stderr) = keys_cli(app.database_url.expose(), &other, &["rotate"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("blind index key `test1`"), "{stderr}");
    let (_, status, _) = keys_cli(app.database_url.expose(), &old, &["status"]);
    assert_eq!(
        status["versions_by_key"]["test1"], 1,
        "nothing was rewritten"
    );

    // A version sealed under a key that has left the spec: rotation stops and says so.
    let k2 = test_master_key().replace("test1:", "test2:");
    let second = spawn_app_on(&app.database_url, &format!("master_key = '{k2},{old}'"))
        .await
        .unwrap();
    fhir.via(&second, ALL)
        .await
        .create(&json!({ "resourceType": "Patient", "name": [{ "family": "Newer" }] }))
        .await;
    let k3 = test_master_key().replace("test1:", "test3:");
    let (code, _, stderr) = keys_cli(
        app.database_url.expose(),
        &format!("{k3},{old}"),
        &["rotate"],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("does not open") && stderr.contains("test2"),
        "{stderr}"
    );
}
