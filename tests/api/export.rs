//! FHIR Bulk Data export: kick-off, status, manifest, NDJSON files, cancellation, scopes,
//! tenancy, sealing at rest, audit, and a job resumed by another instance.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reqwest::{Method, Response};
use serde_json::{json, Value};

use fhirgate::domain::{NewPractice, PracticeName, ResourceId, TimeZoneName};
use fhirgate::gate::{ClientKeys, NewApiClient, Role, ScopeSet};
use fhirgate::store::{
    Backend, Expect, ExportQuery, ExportScope, IndexRow, ResourceWrite, StoredVersion,
};

use crate::auth::{token_at, SigningKey, TestClient};
use crate::helpers::{
    assert_valid_fhir, backend, fhir_body, spawn_app, spawn_app_on, spawn_app_with,
    test_master_key, TestApp,
};
use crate::patient::Fhir;

const ALL: &str = "system/Patient.cruds system/Group.cruds system/AuditEvent.rs";

/// Small chunks, files and pages, so a handful of resources spans several of each.
const SMALL: &str = "[export]\nchunk_kib = 1\nfile_max_resources = 3\npage_size = 2\n";

/// Quotas out of reach, for tests that kick off many exports (each costs `cost_export`).
const ROOMY: &str = "[rate_limit]\nclient_points = 1000000\npractice_points = 1000000\n";

fn patient(family: &str, mrn: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:oid:1.2.36.146.595.217.0.1", "value": mrn }],
        "name": [{ "family": family, "given": ["Export"] }],
        "gender": "other",
        "birthDate": "1971-03-04"
    })
}

fn group(members: &[&str]) -> Value {
    let mut group = json!({ "resourceType": "Group", "type": "person", "actual": true });
    // FHIR JSON has no empty arrays: a group without members leaves `member` out.
    if !members.is_empty() {
        group["member"] = members
            .iter()
            .map(|m| json!({ "entity": { "reference": m } }))
            .collect();
    }
    group
}

fn id(resource: &Value) -> String {
    resource["id"].as_str().unwrap().to_owned()
}

fn header(res: &Response, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Sends a kick-off (`Prefer: respond-async`) to `path` under the FHIR base.
async fn kick_off(fhir: &Fhir<'_>, path: &str) -> Response {
    fhir.request(Method::GET, path)
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+json")
        .send()
        .await
        .unwrap()
}

/// Kicks off an export and returns its status URL.
async fn start(fhir: &Fhir<'_>, path: &str) -> String {
    let res = kick_off(fhir, path).await;
    assert_eq!(res.status(), 202, "{path}: {}", res.text().await.unwrap());
    let location = header(&res, "content-location").expect("Content-Location");
    let outcome = fhir_body(res).await;
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    location
}

async fn get_url(fhir: &Fhir<'_>, url: &str) -> Response {
    fhir.app
        .client
        .get(url)
        .bearer_auth(&fhir.session.token)
        .send()
        .await
        .unwrap()
}

/// Polls a status URL until the export is complete and returns the manifest.
async fn wait(fhir: &Fhir<'_>, status_url: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let res = get_url(fhir, status_url).await;
        match res.status().as_u16() {
            202 => {
                let progress = header(&res, "x-progress").expect("X-Progress while running");
                assert!(
                    progress == "queued"
                        || progress.starts_with("exporting ")
                        || progress == "finishing",
                    "{progress}"
                );
                assert!(header(&res, "retry-after").is_some());
            }
            200 => {
                assert_eq!(
                    header(&res, "content-type").as_deref(),
                    Some("application/json")
                );
                assert!(
                    header(&res, "expires").is_some(),
                    "Expires says when files go"
                );
                return res.json().await.unwrap();
            }
            other => panic!("status {other}: {}", res.text().await.unwrap()),
        }
        assert!(Instant::now() < deadline, "the export did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Downloads one output file: every line a resource.
async fn download(fhir: &Fhir<'_>, url: &str) -> Vec<Value> {
    let res = fhir
        .app
        .client
        .get(url)
        .bearer_auth(&fhir.session.token)
        .header("accept", "application/fhir+ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        header(&res, "content-type").as_deref(),
        Some("application/fhir+ndjson")
    );
    let text = res.text().await.unwrap();
    assert!(text.ends_with('\n'), "every line ends with a newline");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON resource"))
        .collect()
}

/// Every file of a manifest, downloaded, checked against its entry (type, count) and the R4
/// schema: (type, resource) in file order.
async fn download_all(fhir: &Fhir<'_>, manifest: &Value) -> Vec<(String, Value)> {
    let mut all = Vec::new();
    for file in manifest["output"].as_array().unwrap() {
        let ty = file["type"].as_str().unwrap();
        let resources = download(fhir, file["url"].as_str().unwrap()).await;
        assert_eq!(resources.len() as u64, file["count"].as_u64().unwrap());
        assert!(resources.iter().all(|r| r["resourceType"] == ty));
        all.extend(resources.into_iter().map(|r| (ty.to_owned(), r)));
    }
    if !all.is_empty() {
        assert_valid_fhir(&all.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>());
    }
    all
}

fn ids_of(exported: &[(String, Value)], ty: &str) -> BTreeSet<String> {
    exported
        .iter()
        .filter(|(t, _)| t == ty)
        .map(|(_, r)| id(r))
        .collect()
}

fn set(ids: &[&String]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).clone()).collect()
}

#[tokio::test]
async fn a_system_export_runs_from_kick_off_to_valid_ndjson_files() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let a = fhir.create(&patient("Alpha", "MRN-A")).await;
    let b = fhir.create(&patient("Bravo", "MRN-B")).await;
    let g = fhir.create(&group(&[&format!("Patient/{}", id(&a))])).await;

    let status = start(&fhir, "/$export").await;
    assert!(status.starts_with(&app.url("/fhir/r4/$export-status/")));
    let manifest = wait(&fhir, &status).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    assert_eq!(manifest["request"], app.url("/fhir/r4/$export").as_str());
    assert_eq!(manifest["error"], json!([]));
    let tt = manifest["transactionTime"].as_str().unwrap();
    assert!(tt.ends_with('Z') && tt.contains('T'), "{tt}");
    let types: Vec<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Patient", "Group"]);

    let exported = download_all(&fhir, &manifest).await;
    assert_eq!(ids_of(&exported, "Patient"), set(&[&id(&a), &id(&b)]));
    assert_eq!(ids_of(&exported, "Group"), set(&[&id(&g)]));
    // Each line is the resource as stored, exactly as a read returns it.
    let read = fhir_body(fhir.get(&format!("/Patient/{}", id(&a))).await).await;
    assert!(exported.iter().any(|(_, r)| *r == read));
}

#[tokio::test]
async fn files_are_split_by_count_and_chunked_by_size_and_read_back_whole() {
    let app = spawn_app_with(SMALL).await;
    let fhir = Fhir::new(&app, ALL).await;
    let mut created = BTreeSet::new();
    for i in 0..8 {
        // About 600 bytes a line: three make a file of two chunks or more.
        let mut p = patient(&format!("Split{i}"), &format!("MRN-S{i}"));
        p["name"][0]["given"] = json!(["Export", "Q".repeat(400)]);
        let p = fhir.create(&p).await;
        created.insert(id(&p));
    }
    let manifest = wait(&fhir, &start(&fhir, "/$export?_type=Patient").await).await;
    let counts: Vec<u64> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [3, 3, 2], "three resources a file at most");
    let exported = download_all(&fhir, &manifest).await;
    assert_eq!(exported.len(), 8, "nothing repeated");
    assert_eq!(ids_of(&exported, "Patient"), created);
    // At 1 KiB a chunk, a file of three patients is several chunks.
    let job = status_job_id(&manifest["output"][0]["url"]);
    let practice = ResourceId::parse("p", fhir.session.practice_id.clone()).unwrap();
    let files = app
        .store
        .exports()
        .export_files(&practice, &job)
        .await
        .unwrap();
    assert_eq!(files.len(), 3);
    assert!(files.iter().all(|f| f.chunks >= 1));
    assert!(files.iter().any(|f| f.chunks > 1), "{files:?}");
}

/// The job id in a file or status URL.
fn status_job_id(url: &Value) -> String {
    let url = url.as_str().unwrap();
    let rest = url
        .split_once("$export-file/")
        .or_else(|| url.split_once("$export-status/"))
        .unwrap()
        .1;
    rest.split('/').next().unwrap().to_owned()
}

#[tokio::test]
async fn type_and_since_select_what_is_exported_and_deleted_resources_are_not() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let old = fhir.create(&patient("Older", "MRN-O")).await;
    let gone = fhir.create(&patient("Gone", "MRN-G")).await;
    let g = fhir.create(&group(&[])).await;
    let since = g["meta"]["lastUpdated"].as_str().unwrap().to_owned();
    let new = fhir.create(&patient("Newer", "MRN-N")).await;
    let mut changed = old.clone();
    changed["name"][0]["family"] = json!("Changed");
    let res = fhir.put(&format!("/Patient/{}", id(&old)), &changed).await;
    assert_eq!(res.status(), 200);
    let res = fhir
        .request(Method::DELETE, &format!("/Patient/{}", id(&gone)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);

    let everything = download_all(&fhir, &wait(&fhir, &start(&fhir, "/$export").await).await).await;
    assert_eq!(ids_of(&everything, "Patient"), set(&[&id(&old), &id(&new)]));
    let current = everything.iter().find(|(_, r)| id(r) == id(&old)).unwrap();
    assert_eq!(
        current.1["name"][0]["family"], "Changed",
        "the current version"
    );
    assert_eq!(current.1["meta"]["versionId"], "2");

    let groups = download_all(
        &fhir,
        &wait(&fhir, &start(&fhir, "/$export?_type=Group").await).await,
    )
    .await;
    assert_eq!(ids_of(&groups, "Group"), set(&[&id(&g)]));
    assert!(ids_of(&groups, "Patient").is_empty());

    // Changed after the group was written: the new patient and the update, not the group.
    let url = format!(
        "/$export?_type=Patient,Group&_since={}",
        since.replace('+', "%2B")
    );
    let manifest = wait(&fhir, &start(&fhir, &url).await).await;
    assert!(manifest["request"].as_str().unwrap().contains("_since="));
    let recent = download_all(&fhir, &manifest).await;
    assert_eq!(ids_of(&recent, "Patient"), set(&[&id(&old), &id(&new)]));
    assert!(ids_of(&recent, "Group").is_empty());

    // The manifest's transaction time is the next export's `_since`: nothing new, no files.
    let tt = manifest["transactionTime"].as_str().unwrap().to_owned();
    let next = wait(&fhir, &start(&fhir, &format!("/$export?_since={tt}")).await).await;
    assert_eq!(next["output"], json!([]));
}

#[tokio::test]
async fn patient_and_group_level_exports_hold_their_patients() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let a = fhir.create(&patient("Ann", "MRN-1")).await;
    let b = fhir.create(&patient("Ben", "MRN-2")).await;
    let c = fhir.create(&patient("Cat", "MRN-3")).await;
    let g = fhir
        .create(&group(&[
            &format!("Patient/{}", id(&a)),
            &format!("{}/fhir/r4/Patient/{}", app.address, id(&c)),
            "Practitioner/not-a-patient",
            "Patient/never-existed",
        ]))
        .await;

    let everyone = download_all(
        &fhir,
        &wait(&fhir, &start(&fhir, "/Patient/$export").await).await,
    )
    .await;
    assert_eq!(
        ids_of(&everyone, "Patient"),
        set(&[&id(&a), &id(&b), &id(&c)])
    );
    assert!(
        ids_of(&everyone, "Group").is_empty(),
        "Group is not in the patient compartment"
    );

    let members = download_all(
        &fhir,
        &wait(
            &fhir,
            &start(&fhir, &format!("/Group/{}/$export", id(&g))).await,
        )
        .await,
    )
    .await;
    assert_eq!(ids_of(&members, "Patient"), set(&[&id(&a), &id(&c)]));
    assert_eq!(members.len(), 2);

    // Types outside the compartment are refused at these levels.
    let res = kick_off(&fhir, "/Patient/$export?_type=Group").await;
    assert_eq!(res.status(), 400);
    // An unknown group is a 404, like any missing resource.
    let res = kick_off(&fhir, "/Group/no-such-group/$export").await;
    assert_eq!(res.status(), 404);
    assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome");
}

/// Writes a resource straight into the store (content is opaque bytes to it).
fn write(ty: &str, id: &str, at: i64, index: Vec<IndexRow>) -> ResourceWrite {
    ResourceWrite {
        resource_type: ty.to_owned(),
        id: id.to_owned(),
        expect: Expect::Absent,
        version_id: 1,
        last_updated_us: at,
        sealed: Some(("k".to_owned(), b"sealed".to_vec())),
        index,
    }
}

#[tokio::test]
async fn compartment_and_group_scopes_select_by_the_search_index() {
    let app = spawn_app().await;
    let practice = app
        .store
        .create_practice(&NewPractice {
            name: PracticeName::parse("Scopes").unwrap(),
            timezone: TimeZoneName::default(),
            npi: None,
            tax_id: None,
        })
        .await
        .unwrap()
        .id;
    let patient_ref = |p: &str| vec![IndexRow::value("patient", p)];
    let writes = vec![
        write("Patient", "p1", 10, vec![]),
        write("Patient", "p2", 11, vec![]),
        write("Patient", "p3", 12, vec![]),
        write("Encounter", "e1", 20, patient_ref("p1")),
        write("Encounter", "e2", 21, patient_ref("p2")),
        write("Encounter", "e3", 22, patient_ref("missing")),
        write(
            "Encounter",
            "e4",
            23,
            vec![IndexRow::value("status", "finished")],
        ),
        write("Encounter", "e5", 24, patient_ref("p3")),
        write(
            "Group",
            "g1",
            30,
            vec![
                IndexRow::value("member", "p1"),
                IndexRow::value("member", "p3"),
            ],
        ),
    ];
    app.store
        .write_resources(&practice, &writes, &[])
        .await
        .unwrap();
    // p3 is deleted: neither it nor its encounters are exported any more.
    let mut deletion = write("Patient", "p3", 40, vec![]);
    deletion.expect = Expect::Version(1);
    deletion.version_id = 2;
    deletion.sealed = None;
    app.store
        .write_resources(&practice, &[deletion], &[])
        .await
        .unwrap();

    let page = |ty: &str, scope: ExportScope| {
        let store = app.store.clone();
        let query = ExportQuery {
            practice: practice.clone(),
            resource_type: ty.to_owned(),
            scope,
            since_us: None,
            until_us: 1_000,
            after: None,
            limit: 100,
        };
        async move {
            let rows: Vec<StoredVersion> = store.exports().export_resources(&query).await.unwrap();
            rows.into_iter().map(|v| v.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(page("Patient", ExportScope::All).await, ["p1", "p2"]);
    assert_eq!(
        page("Encounter", ExportScope::All).await,
        ["e1", "e2", "e3", "e4", "e5"]
    );
    assert_eq!(
        page("Encounter", ExportScope::Compartment { param: "patient" }).await,
        ["e1", "e2"]
    );
    let group = || "g1".to_owned();
    assert_eq!(
        page(
            "Patient",
            ExportScope::GroupMembers {
                group_id: group(),
                member_param: "member"
            }
        )
        .await,
        ["p1"]
    );
    assert_eq!(
        page(
            "Encounter",
            ExportScope::GroupCompartment {
                group_id: group(),
                member_param: "member",
                param: "patient"
            }
        )
        .await,
        ["e1"]
    );

    // Keyset paging, the transaction time and `_since` bound the page.
    let store = app.store.exports();
    let mut query = ExportQuery {
        practice: practice.clone(),
        resource_type: "Encounter".into(),
        scope: ExportScope::All,
        since_us: Some(20),
        until_us: 23,
        after: None,
        limit: 1,
    };
    let first = store.export_resources(&query).await.unwrap();
    assert_eq!(first[0].id, "e2");
    query.after = Some((first[0].last_updated_us, first[0].id.clone()));
    query.limit = 10;
    let rest: Vec<String> = store
        .export_resources(&query)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(rest, ["e3", "e4"]);
}

/// A second client of the same practice as `fhir`, with `scopes`.
async fn colleague<'a>(app: &'a TestApp, fhir: &Fhir<'_>, scopes: &str) -> Fhir<'a> {
    let key = SigningKey::es384("colleague-key");
    let practice = ResourceId::parse("p", fhir.session.practice_id.clone()).unwrap();
    let client = app
        .store
        .create_client(&NewApiClient {
            practice_id: practice,
            name: "Colleague".into(),
            role: Role::ExternalSystem,
            scopes: ScopeSet::parse(scopes).unwrap(),
            keys: ClientKeys::inline(&SigningKey::jwks(&[&key])).unwrap(),
        })
        .await
        .unwrap();
    let test_client = TestClient {
        client_id: client.client_id.clone(),
        key,
        token_url: app.url("/auth/token"),
    };
    let token = token_at(app, &test_client, scopes).await;
    Fhir {
        app,
        session: crate::auth::Session {
            token,
            client_id: client.client_id,
            practice_id: fhir.session.practice_id.clone(),
            client: test_client,
        },
    }
}

#[tokio::test]
async fn only_the_client_that_started_an_export_sees_it() {
    let app = spawn_app().await;
    let owner = Fhir::new(&app, ALL).await;
    owner.create(&patient("Owned", "MRN-OWN")).await;
    let status = start(&owner, "/$export").await;
    let manifest = wait(&owner, &status).await;
    let file = manifest["output"][0]["url"].as_str().unwrap().to_owned();

    let same_practice = colleague(&app, &owner, ALL).await;
    let other_practice = Fhir::new(&app, ALL).await;
    for intruder in [&same_practice, &other_practice] {
        for url in [&status, &file] {
            let res = get_url(intruder, url).await;
            assert_eq!(res.status(), 404, "{url}");
            assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome");
        }
        let res = app
            .client
            .delete(&status)
            .bearer_auth(&intruder.session.token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404);
    }
    // Unharmed for its owner; and a made-up job id is the same 404.
    assert_eq!(get_url(&owner, &status).await.status(), 200);
    assert_eq!(download(&owner, &file).await.len(), 1);
    let made_up =
        status.rsplit_once('/').unwrap().0.to_owned() + "/0123456789abcdef0123456789abcdef";
    assert_eq!(get_url(&owner, &made_up).await.status(), 404);
    assert_eq!(get_url(&owner, &format!("{status}x")).await.status(), 404);
}

#[tokio::test]
async fn delete_cancels_an_export_and_removes_its_files() {
    let app = spawn_app_with(SMALL).await;
    let fhir = Fhir::new(&app, ALL).await;
    for i in 0..6 {
        fhir.create(&patient(&format!("Cancel{i}"), &format!("MRN-C{i}")))
            .await;
    }
    let practice = ResourceId::parse("p", fhir.session.practice_id.clone()).unwrap();

    // A finished export: DELETE removes its files; its URLs are 404 from then on.
    let status = start(&fhir, "/$export").await;
    let manifest = wait(&fhir, &status).await;
    let file = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    let job = status_job_id(&json!(status));
    let res = app
        .client
        .delete(&status)
        .bearer_auth(&fhir.session.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(get_url(&fhir, &status).await.status(), 404);
    assert_eq!(get_url(&fhir, &file).await.status(), 404);
    let files = app
        .store
        .exports()
        .export_files(&practice, &job)
        .await
        .unwrap();
    assert!(files.is_empty(), "the sealed chunks are deleted");

    // A running one: cancelled at once, and its runner adds nothing afterwards.
    let status = start(&fhir, "/$export").await;
    let job = status_job_id(&json!(status));
    let res = app
        .client
        .delete(&status)
        .bearer_auth(&fhir.session.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(get_url(&fhir, &status).await.status(), 404);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(app
        .store
        .exports()
        .export_job(&practice, &job)
        .await
        .unwrap()
        .is_none());
    assert!(app
        .store
        .exports()
        .export_files(&practice, &job)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn malformed_kick_offs_are_400_operation_outcomes() {
    let app = spawn_app_with(ROOMY).await;
    let fhir = Fhir::new(&app, ALL).await;
    let res = fhir.request(Method::GET, "/$export").send().await.unwrap();
    assert_eq!(res.status(), 400, "without Prefer: respond-async");
    assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome");
    for query in [
        "_outputFormat=application/fhir%2Bjson",
        "_outputFormat=text/csv",
        "_since=yesterday",
        "_since=2026-01-01",
        "_type=Patientt",
        "_type=AuditEvent",
        "_type=Patient,",
        "_typeFilter=Patient%3Fgender%3Dmale",
        "_elements=id",
        "bogus=1",
    ] {
        let res = kick_off(&fhir, &format!("/$export?{query}")).await;
        assert_eq!(res.status(), 400, "{query}");
        let outcome = fhir_body(res).await;
        assert_eq!(outcome["issue"][0]["severity"], "error", "{query}");
        assert_eq!(outcome["issue"][0]["code"], "invalid", "{query}");
    }
    // Each spelling of NDJSON is accepted; ignored parameters only when lenient.
    for format in ["application/fhir%2Bndjson", "application/ndjson", "ndjson"] {
        let res = kick_off(&fhir, &format!("/$export?_outputFormat={format}")).await;
        assert_eq!(res.status(), 202, "{format}");
    }
    let res = fhir
        .request(Method::GET, "/$export?_typeFilter=x&bogus=Secret")
        .header("prefer", "respond-async, handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let manifest = wait(&fhir, &header(&res, "content-location").unwrap()).await;
    assert!(
        !manifest["request"].as_str().unwrap().contains("Secret"),
        "ignored parameters are not kept"
    );
}

#[tokio::test]
async fn a_post_kick_off_takes_a_parameters_resource() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let p = fhir.create(&patient("Posted", "MRN-P")).await;
    fhir.create(&group(&[])).await;
    let res = fhir
        .request(Method::POST, "/$export")
        .header("prefer", "respond-async")
        .header("content-type", "application/fhir+json")
        .body(
            json!({
                "resourceType": "Parameters",
                "parameter": [
                    { "name": "_type", "valueString": "Patient" },
                    { "name": "_outputFormat", "valueString": "application/fhir+ndjson" },
                    { "name": "_since", "valueInstant": "2000-01-01T00:00:00Z" }
                ]
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let manifest = wait(&fhir, &header(&res, "content-location").unwrap()).await;
    assert_eq!(manifest["request"], app.url("/fhir/r4/$export").as_str());
    let exported = download_all(&fhir, &manifest).await;
    assert_eq!(ids_of(&exported, "Patient"), set(&[&id(&p)]));
    assert!(ids_of(&exported, "Group").is_empty());
}

#[tokio::test]
async fn scopes_decide_what_may_be_exported() {
    let app = spawn_app().await;
    let admin = Fhir::new(&app, ALL).await;
    admin.create(&patient("Scoped", "MRN-SC")).await;
    admin.create(&group(&[])).await;

    // Without _type: only what the client may read and search.
    let patients_only = colleague(&app, &admin, "system/Patient.rs").await;
    let manifest = wait(&patients_only, &start(&patients_only, "/$export").await).await;
    let types: Vec<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Patient"]);
    // Listing a type it cannot read: 403.
    let res = kick_off(&patients_only, "/$export?_type=Patient,Group").await;
    assert_eq!(res.status(), 403);
    assert_eq!(fhir_body(res).await["issue"][0]["code"], "forbidden");
    // Read without search is not enough to export; v1 read (r and s) is.
    let read_only = colleague(&app, &admin, "system/Patient.r system/Group.r").await;
    assert_eq!(kick_off(&read_only, "/$export").await.status(), 403);
    assert_eq!(kick_off(&read_only, "/Patient/$export").await.status(), 403);
    let v1 = colleague(&app, &admin, "system/*.read").await;
    assert_eq!(kick_off(&v1, "/$export").await.status(), 202);
    // Patient-level export needs Patient; Group-level needs Group.
    let groups_only = colleague(&app, &admin, "system/Group.rs").await;
    assert_eq!(
        kick_off(&groups_only, "/Patient/$export").await.status(),
        403
    );
}

/// PHI of the at-rest test: a family name and an identifier no other test uses.
const MARKER: [&str; 2] = ["Zyzzogeton", "MRN-EXPORT-55501"];

#[tokio::test]
async fn exported_ndjson_is_ciphertext_at_rest() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    fhir.create(&patient(MARKER[0], MARKER[1])).await;
    let manifest = wait(&fhir, &start(&fhir, "/$export").await).await;
    let exported = download_all(&fhir, &manifest).await;
    assert!(
        exported
            .iter()
            .any(|(_, r)| r["name"][0]["family"] == MARKER[0]),
        "the marker was exported"
    );
    let practice = ResourceId::parse("p", fhir.session.practice_id.clone()).unwrap();
    let job = status_job_id(&manifest["output"][0]["url"]);
    assert!(!app
        .store
        .exports()
        .export_files(&practice, &job)
        .await
        .unwrap()
        .is_empty());
    match backend() {
        Backend::Sqlite => {
            let bytes = crate::helpers::sqlite_bytes(&app);
            assert!(
                crate::helpers::contains(&bytes, &job),
                "the job is in the file"
            );
            for marker in MARKER {
                assert!(
                    !crate::helpers::contains(&bytes, marker),
                    "{marker} is in the database file"
                );
            }
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(app.database_url.expose())
                .await
                .unwrap();
            for table in ["export_jobs", "export_chunks"] {
                let rows: Vec<String> =
                    sqlx::query_scalar(&format!("SELECT t::text FROM {table} t"))
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                assert!(!rows.is_empty(), "{table}");
                let all = rows.join("\n");
                for marker in MARKER {
                    let hex: String = marker.bytes().map(|b| format!("{b:02x}")).collect();
                    assert!(!all.contains(marker), "{marker} is in {table}");
                    assert!(!all.contains(&hex), "{marker} is in {table} (hex)");
                }
            }
            pool.close().await;
        }
    }
}

#[tokio::test]
async fn postgres_row_level_security_confines_export_rows_to_their_practice() {
    if backend() != Backend::Postgres {
        eprintln!(
            "row-level security exists on PostgreSQL only; run with FHIRGATE_TEST_POSTGRES_URL"
        );
        return;
    }
    let app = spawn_app().await;
    let owner = Fhir::new(&app, ALL).await;
    owner.create(&patient("Confined", "MRN-RLS")).await;
    wait(&owner, &start(&owner, "/$export").await).await;
    let other = Fhir::new(&app, ALL).await;
    let pg = fhirgate::store::PgStore::connect(
        app.database_url.expose(),
        &fhirgate::store::PoolOptions {
            max_connections: 1,
            acquire_timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    for (practice, expected) in [(&owner, 1), (&other, 0)] {
        let practice = ResourceId::parse("p", practice.session.practice_id.clone()).unwrap();
        let mut tx = pg.begin_tenant(&practice).await.unwrap();
        for table in ["export_jobs", "export_chunks"] {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            assert_eq!(n.min(1), expected, "{table}");
        }
        tx.rollback().await.unwrap();
    }
    pg.pool().close().await;
}

#[tokio::test]
async fn kick_off_and_every_download_are_audited_as_export_without_phi() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let a = fhir.create(&patient(MARKER[0], MARKER[1])).await;
    fhir.create(&group(&[&format!("Patient/{}", id(&a))])).await;
    let status = start(&fhir, "/$export").await;
    let manifest = wait(&fhir, &status).await;
    let exported = download_all(&fhir, &manifest).await;
    assert_eq!(exported.len(), 2);
    let job = status_job_id(&json!(status));

    let practice = ResourceId::parse("p", fhir.session.practice_id.clone()).unwrap();
    let events = app
        .store
        .audit_export_page(&practice, time::OffsetDateTime::UNIX_EPOCH, 0, 1000)
        .await
        .unwrap();
    let exports: Vec<_> = events.iter().filter(|e| e.action == "export").collect();
    let kick_offs: Vec<_> = exports
        .iter()
        .filter(|e| e.status_code == 202 && e.resource_id.is_none())
        .collect();
    assert_eq!(kick_offs.len(), 1, "{exports:?}");
    let downloads: Vec<_> = exports
        .iter()
        .filter(|e| e.status_code == 200 && e.resource_id.as_deref() == Some(job.as_str()))
        .collect();
    // One manifest read, and one event per file.
    assert_eq!(
        downloads.len(),
        1 + manifest["output"].as_array().unwrap().len(),
        "{exports:?}"
    );
    assert!(exports
        .iter()
        .all(|e| e.actor_client_id.as_deref() == Some(fhir.session.client_id.as_str())));
    let trail = format!("{events:?}");
    for marker in MARKER {
        assert!(!trail.contains(marker), "{marker} is in the audit trail");
    }
}

#[tokio::test]
async fn files_are_ndjson_and_kick_offs_json() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    fhir.create(&patient("Negotiated", "MRN-NEG")).await;
    let manifest = wait(&fhir, &start(&fhir, "/$export").await).await;
    let file = manifest["output"][0]["url"].as_str().unwrap();
    for accept in ["application/fhir+ndjson", "application/ndjson", "*/*"] {
        let res = app
            .client
            .get(file)
            .bearer_auth(&fhir.session.token)
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{accept}");
    }
    let res = fhir
        .request(Method::GET, "/$export")
        .header("prefer", "respond-async")
        .header("accept", "application/fhir+ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 406, "the kick-off answers FHIR JSON only");
}

#[tokio::test]
async fn any_instance_answers_and_a_stopped_export_resumes_without_gaps_or_repeats() {
    // Both instances share the database and the master key.
    let settings = format!("master_key = '{}'\n{SMALL}", test_master_key());
    let first = spawn_app_with(&settings).await;
    let fhir = Fhir::new(&first, ALL).await;
    let mut created = BTreeSet::new();
    for i in 0..40 {
        let p = fhir
            .create(&patient(&format!("Resume{i}"), &format!("MRN-R{i}")))
            .await;
        created.insert(id(&p));
    }
    let status = start(&fhir, "/$export?_type=Patient").await;
    // Wait until it has sealed something, then stop that gateway mid-way.
    let practice = ResourceId::parse("p", fhir.session.practice_id.clone()).unwrap();
    let job = status_job_id(&json!(status));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = first
            .store
            .exports()
            .export_job(&practice, &job)
            .await
            .unwrap()
            .unwrap();
        if state.cursor.exported > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "nothing sealed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let url = first.database_url.clone();
    let session = &fhir.session;
    let (client_id, key, practice_id) = (
        session.client_id.clone(),
        session.client.key.clone(),
        session.practice_id.clone(),
    );
    let _db = first.stop().await;
    let second = spawn_app_on(&url, &settings).await.unwrap();
    let stopped_at = second
        .store
        .exports()
        .export_job(&practice, &job)
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "the first instance had sealed {} of 40 ({:?}) when it stopped",
        stopped_at.cursor.exported, stopped_at.status
    );

    // The second instance answers the status request, resumes the job at its next sweep and
    // completes it with every patient exactly once.
    let client = TestClient {
        client_id: client_id.clone(),
        key,
        token_url: second.url("/auth/token"),
    };
    let token = token_at(&second, &client, ALL).await;
    let via_second = Fhir {
        app: &second,
        session: crate::auth::Session {
            token,
            client_id,
            practice_id,
            client,
        },
    };
    let status = status.replace(&url_base(&status), &second.address);
    let manifest = wait(&via_second, &status).await;
    let exported = download_all(&via_second, &manifest).await;
    assert_eq!(exported.len(), 40, "nothing repeated");
    assert_eq!(ids_of(&exported, "Patient"), created, "nothing missing");
}

/// `http://127.0.0.1:PORT` of a URL.
fn url_base(url: &str) -> String {
    let after_scheme = url.find("://").unwrap() + 3;
    let end = url[after_scheme..].find('/').unwrap() + after_scheme;
    url[..end].to_owned()
}

#[tokio::test]
async fn expired_exports_are_deleted_with_their_files() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    fhir.create(&patient("Expiring", "MRN-EXP")).await;
    let status = start(&fhir, "/$export").await;
    let manifest = wait(&fhir, &status).await;
    let file = manifest["output"][0]["url"].as_str().unwrap().to_owned();
    // Still there just before the retention (24 h by default) has passed.
    let now_us = time::OffsetDateTime::now_utc().unix_timestamp() * 1_000_000;
    let hour = 3_600_000_000;
    assert_eq!(
        app.store
            .exports()
            .expire_export_jobs(now_us + 23 * hour)
            .await
            .unwrap(),
        0
    );
    assert_eq!(get_url(&fhir, &file).await.status(), 200);
    assert_eq!(
        app.store
            .exports()
            .expire_export_jobs(now_us + 25 * hour)
            .await
            .unwrap(),
        1
    );
    assert_eq!(get_url(&fhir, &status).await.status(), 404);
    assert_eq!(get_url(&fhir, &file).await.status(), 404);
}

#[tokio::test]
async fn the_capability_statement_declares_the_export_operations() {
    let app = spawn_app().await;
    let metadata = fhir_body(app.get("/fhir/r4/metadata").await).await;
    let rest = &metadata["rest"][0];
    assert_eq!(
        rest["operation"],
        json!([{
            "name": "export",
            "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
            "documentation": rest["operation"][0]["documentation"].clone()
        }])
    );
    let resource = |ty: &str| {
        rest["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == ty)
            .unwrap()
            .clone()
    };
    assert_eq!(
        resource("Patient")["operation"][0]["definition"],
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"
    );
    assert_eq!(
        resource("Group")["operation"][0]["definition"],
        "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"
    );
    assert!(resource("AuditEvent").get("operation").is_none());
    let group = resource("Group");
    let group_params: Vec<&str> = group["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(group_params.contains(&"member") && group_params.contains(&"type"));
}

#[tokio::test]
async fn a_group_is_created_read_and_searched_by_member() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let a = fhir.create(&patient("Member", "MRN-M")).await;
    let g = fhir.create(&group(&[&format!("Patient/{}", id(&a))])).await;
    let read = fhir_body(fhir.get(&format!("/Group/{}", id(&g))).await).await;
    assert_eq!(read, g);
    assert_valid_fhir(&[read]);
    assert_eq!(
        fhir.search_ids(&format!("/Group?member=Patient/{}", id(&a)))
            .await,
        vec![id(&g)]
    );
    assert!(fhir
        .search_ids("/Group?member=someone-else")
        .await
        .is_empty());
    assert_eq!(fhir.search_ids("/Group?type=person").await, vec![id(&g)]);
}

/// Distinctive PHI that must never reach the logs of an export.
const LOGGED_PHI: [&str; 3] = ["Quillfeather", "MRN-LOG-77123", "1933-12-25"];

#[tokio::test]
async fn no_phi_of_an_export_reaches_the_logs() {
    use std::io::Read;
    use std::process::Stdio;

    use crate::binary::{fhirgate, free_port, practice_with_client, sigterm, wait_until_up};

    let (_db, url) = crate::helpers::TestDb::create().await;
    let key = SigningKey::es384("k1");
    let client_id = practice_with_client(&url, "Logging Practice", &key);

    let port = free_port();
    let mut child = fhirgate()
        .arg("serve")
        .env("FHIRGATE_DATABASE_URL", url.expose())
        .env("FHIRGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRGATE_LOG_LEVEL", "debug")
        .env("FHIRGATE_EXPORT__CHUNK_KIB", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the logs as they come: at debug level they outgrow a pipe's buffer.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    wait_until_up(port, &mut child);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let test_client = TestClient {
        client_id,
        key,
        token_url: format!("{base}/auth/token"),
    };
    let assertion = test_client.sign(&test_client.claims());
    let token: Value = http
        .post(format!("{base}/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "system/Patient.cruds system/Group.cruds"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().expect("a token").to_owned();
    let mut body = patient(LOGGED_PHI[0], LOGGED_PHI[1]);
    body["birthDate"] = json!(LOGGED_PHI[2]);
    for _ in 0..5 {
        let res = http
            .post(format!("{base}/fhir/r4/Patient"))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
    }
    // A refused kick-off carrying PHI in its parameters, then a real one, polled and downloaded.
    http.get(format!(
        "{base}/fhir/r4/$export?_type={}&_since={}",
        LOGGED_PHI[0], LOGGED_PHI[2]
    ))
    .bearer_auth(&token)
    .header("prefer", "respond-async")
    .send()
    .await
    .unwrap();
    let res = http
        .get(format!("{base}/fhir/r4/$export"))
        .bearer_auth(&token)
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let status = header(&res, "content-location").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let manifest: Value = loop {
        let res = http.get(&status).bearer_auth(&token).send().await.unwrap();
        if res.status() == 200 {
            break res.json().await.unwrap();
        }
        assert_eq!(res.status(), 202);
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut downloaded = String::new();
    for file in manifest["output"].as_array().unwrap() {
        let text = http
            .get(file["url"].as_str().unwrap())
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        downloaded.push_str(&text);
    }
    assert!(downloaded.contains(LOGGED_PHI[0]), "the PHI was exported");
    http.delete(&status)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();

    sigterm(&child);
    let exit = child.wait().unwrap();
    assert!(exit.success());
    let logs = stdout.join().unwrap() + &stderr.join().unwrap();
    assert!(logs.contains("export complete"), "{logs}");
    for value in LOGGED_PHI {
        assert!(!logs.contains(value), "`{value}` reached the logs:\n{logs}");
    }
}
