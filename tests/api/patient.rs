//! Patient over FHIR REST: create, read, vread, update with If-Match, conditional create, soft
//! delete, history and search, with PHI sealed at rest and every write audited with its data.

use reqwest::{Method, Response};
use serde_json::{json, Value};

use fhirgate::gate::Role;

use crate::auth::{session, token_at, Session, TestClient};
use crate::helpers::{assert_valid_fhir, backend, fhir_body, spawn_app, TestApp};

const ALL: &str = "system/Patient.cruds system/AuditEvent.rs";

/// A client of a new practice, speaking FHIR JSON.
pub struct Fhir<'a> {
    pub app: &'a TestApp,
    pub session: Session,
}

impl<'a> Fhir<'a> {
    pub async fn new(app: &'a TestApp, scopes: &str) -> Self {
        Self {
            app,
            session: session(app, scopes, Role::ExternalSystem).await,
        }
    }

    /// The same client, through another gateway on the same database.
    pub async fn via(&self, app: &'a TestApp, scopes: &str) -> Fhir<'a> {
        let token = token_at(app, &self.session.client, scopes).await;
        Fhir {
            app,
            session: Session {
                token,
                client_id: self.session.client_id.clone(),
                practice_id: self.session.practice_id.clone(),
                client: TestClient {
                    client_id: self.session.client.client_id.clone(),
                    key: self.session.client.key.clone(),
                    token_url: app.url("/auth/token"),
                },
            },
        }
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.app
            .client
            .request(method, self.app.url(&format!("/fhir/r4{path}")))
            .bearer_auth(&self.session.token)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path).send().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.request(Method::POST, path)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn put(&self, path: &str, body: &Value) -> Response {
        self.request(Method::PUT, path)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    /// Creates a resource and returns it as stored.
    pub async fn create(&self, body: &Value) -> Value {
        let ty = body["resourceType"].as_str().unwrap();
        let res = self.post(&format!("/{ty}"), body).await;
        assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
        res.json().await.unwrap()
    }

    /// The ids in a search response, in order.
    pub async fn search_ids(&self, query: &str) -> Vec<String> {
        let res = self.get(query).await;
        assert_eq!(res.status(), 200, "{query}");
        let bundle = fhir_body(res).await;
        ids(&bundle)
    }
}

pub fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn header(res: &Response, name: &str) -> String {
    res.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == relation)
        .map(|l| l["url"].as_str().unwrap().to_owned())
}

fn patient(family: &str, given: &str, birth: &str, mrn: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:oid:1.2.36.146.595.217.0.1", "value": mrn }],
        "name": [{ "use": "official", "family": family, "given": [given] }],
        "gender": "female",
        "birthDate": birth
    })
}

#[tokio::test]
async fn a_created_patient_reads_back_exactly_with_server_ids_and_versions() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    // Elements the internal model has no column for, and a decimal whose digits matter.
    let sent: Value = serde_json::from_str(&json!({
        "resourceType": "Patient",
        "id": "ignored-on-create",
        "meta": { "versionId": "77", "profile": ["http://hl7.org/fhir/StructureDefinition/Patient"] },
        "text": { "status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Zoë Quixotic</div>" },
        "extension": [{ "url": "http://example.org/fhir/StructureDefinition/score", "valueDecimal": 1.50 }],
        "identifier": [
            { "system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-Q-31337" },
            { "system": "http://example.org/chart", "value": "C-9" }
        ],
        "active": true,
        "name": [{ "family": "Quixotic", "given": ["Zoë"] }],
        "gender": "female",
        "birthDate": "1987-02-20",
        "_birthDate": { "extension": [{ "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1987-02-20T06:10:00+01:00" }] }
    })
    .to_string()
    // json! holds an f64; the digits a client sends are what must survive.
    .replace("\"valueDecimal\":1.5", "\"valueDecimal\":1.50"))
    .unwrap();
    let res = fhir.post("/Patient", &sent).await;
    assert_eq!(res.status(), 201);
    let location = header(&res, "location");
    assert_eq!(header(&res, "etag"), "W/\"1\"");
    assert!(!header(&res, "last-modified").is_empty());
    let created: Value = fhir_body(res).await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_ne!(id, "ignored-on-create");
    assert_eq!(
        location,
        app.url(&format!("/fhir/r4/Patient/{id}/_history/1"))
    );
    assert_eq!(created["meta"]["versionId"], "1");
    assert_eq!(
        created["meta"]["profile"][0],
        "http://hl7.org/fhir/StructureDefinition/Patient"
    );

    let res = fhir.get(&format!("/Patient/{id}")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "etag"), "W/\"1\"");
    let text = res.text().await.unwrap();
    // The decimal keeps its digits: 1.50, not 1.5.
    assert!(text.contains("\"valueDecimal\":1.50"), "{text}");
    let read: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(read, created);
    let mut expected = sent.clone();
    expected["id"] = json!(id);
    expected["meta"] = read["meta"].clone();
    assert_eq!(read, expected, "everything the client sent comes back");
    assert_valid_fhir(&[read]);
}

#[tokio::test]
async fn updates_are_versioned_and_if_match_guards_them() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let mut p = fhir
        .create(&patient("Brightwater", "Ada", "1970-01-01", "M1"))
        .await;
    let id = p["id"].as_str().unwrap().to_owned();
    let path = format!("/Patient/{id}");

    p["name"][0]["family"] = json!("Brightwater-Lee");
    let res = fhir
        .request(Method::PUT, &path)
        .header("if-match", "W/\"1\"")
        .header("content-type", "application/fhir+json")
        .body(p.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "etag"), "W/\"2\"");
    let v2 = fhir_body(res).await;
    assert_eq!(v2["meta"]["versionId"], "2");

    // A stale version: 412, nothing written.
    let res = fhir
        .request(Method::PUT, &path)
        .header("if-match", "W/\"1\"")
        .header("content-type", "application/fhir+json")
        .body(p.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 412);
    assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome");

    // Missing or mismatched id in the body: 400.
    let mut other = p.clone();
    other["id"] = json!("someone-else");
    assert_eq!(fhir.put(&path, &other).await.status(), 400);
    let mut no_id = p.clone();
    no_id.as_object_mut().unwrap().remove("id");
    assert_eq!(fhir.put(&path, &no_id).await.status(), 400);

    let v1 = fhir_body(fhir.get(&format!("{path}/_history/1")).await).await;
    assert_eq!(v1["name"][0]["family"], "Brightwater");
    assert_eq!(fhir.get(&format!("{path}/_history/9")).await.status(), 404);

    // Delete: a new version; the resource is gone (410) but its history stays.
    let res = fhir.request(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(res.status(), 204);
    let res = fhir.get(&path).await;
    assert_eq!(res.status(), 410);
    assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome");
    assert_eq!(
        fhir.request(Method::DELETE, &path)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let history = fhir_body(fhir.get(&format!("{path}/_history")).await).await;
    assert_eq!(history["type"], "history");
    assert_eq!(history["total"], 3);
    let methods: Vec<&str> = history["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["DELETE", "PUT", "POST"]);
    assert!(fhir
        .search_ids(&format!("/Patient?_id={id}"))
        .await
        .is_empty());

    // An update brings a deleted resource back as a new version.
    let res = fhir.put(&path, &p).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "etag"), "W/\"4\"");
    assert_eq!(fhir.get(&path).await.status(), 200);

    // A client-chosen id creates the resource.
    let mut chosen = patient("Chosen", "Id", "1990-05-05", "M2");
    chosen["id"] = json!("chart-0042");
    let res = fhir.put("/Patient/chart-0042", &chosen).await;
    assert_eq!(res.status(), 201);
    assert_eq!(
        header(&res, "location"),
        app.url("/fhir/r4/Patient/chart-0042/_history/1")
    );
    assert_valid_fhir(&[v1, v2, history]);
}

#[tokio::test]
async fn prefer_return_shapes_the_response_of_a_write() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let body = patient("Minimal", "Mo", "1980-03-03", "M3");
    let res = fhir
        .request(Method::POST, "/Patient")
        .header("prefer", "return=minimal")
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(!header(&res, "location").is_empty());
    assert!(res.bytes().await.unwrap().is_empty());
    let res = fhir
        .request(Method::POST, "/Patient")
        .header("prefer", "return=OperationOutcome")
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn conditional_create_returns_the_match_or_refuses_an_ambiguous_condition() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let first = fhir
        .create(&patient("Once", "Only", "1960-06-06", "MRN-ONCE"))
        .await;
    let conditional = |condition: &'static str, body: Value| {
        fhir.request(Method::POST, "/Patient")
            .header("if-none-exist", condition)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
    };
    let res = conditional(
        "identifier=urn:oid:1.2.36.146.595.217.0.1|MRN-ONCE",
        patient("Once", "Only", "1960-06-06", "MRN-ONCE"),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(fhir_body(res).await["id"], first["id"]);

    let res = conditional(
        "identifier=MRN-NEW",
        patient("Twice", "Made", "1961-06-06", "MRN-NEW"),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);

    fhir.create(&patient("Once", "Again", "1962-06-06", "MRN-OTHER"))
        .await;
    let res = conditional("family=Once", patient("Once", "Third", "1963-06-06", "X"))
        .await
        .unwrap();
    assert_eq!(res.status(), 412);
    assert_eq!(
        fhir.search_ids("/Patient?family=once").await.len(),
        2,
        "the refused create wrote nothing"
    );
}

#[tokio::test]
async fn search_answers_each_parameter_from_the_blind_index() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let oz = fhir
        .create(&patient("Öztürk", "Émile", "1975-04-12", "MRN-100"))
        .await;
    let ng = fhir
        .create(&patient("Ng", "Li", "1990-12-31", "MRN-200"))
        .await;
    let mut old = patient("Oakes", "Walter", "1931-01-15", "MRN-300");
    old["gender"] = json!("male");
    let old = fhir.create(&old).await;
    let id = |p: &Value| p["id"].as_str().unwrap().to_owned();

    let cases: &[(&str, Vec<String>)] = &[
        (
            "identifier=urn:oid:1.2.36.146.595.217.0.1|MRN-100",
            vec![id(&oz)],
        ),
        ("identifier=MRN-200", vec![id(&ng)]),
        ("identifier=urn:other|MRN-200", vec![]),
        ("identifier=|MRN-200", vec![]),
        ("identifier=mrn-200", vec![]), // identifier values are case-sensitive
        ("family=ozt", vec![id(&oz)]),  // starts-with, accent- and case-insensitive
        ("family=OZTURK", vec![id(&oz)]),
        ("family=Öztürk", vec![id(&oz)]),
        ("family:exact=Öztürk", vec![id(&oz)]),
        ("family:exact=ozturk", vec![]),
        ("family=turk", vec![]),
        ("family=o", vec![id(&oz), id(&old)]), // shorter than three characters: a scan
        ("family=ng", vec![id(&ng)]),
        ("family=oak,ng", vec![id(&ng), id(&old)]),
        ("given=emi", vec![id(&oz)]),
        ("name=wal", vec![id(&old)]),
        ("name=oakes", vec![id(&old)]),
        ("birthdate=1975-04-12", vec![id(&oz)]),
        ("birthdate=1975", vec![id(&oz)]),
        ("birthdate=1975-04", vec![id(&oz)]),
        ("birthdate=1975-05", vec![]),
        ("birthdate=lt1975-04-12", vec![id(&old)]),
        ("birthdate=le1975-04-12", vec![id(&oz), id(&old)]),
        ("birthdate=gt1975-04-12", vec![id(&ng)]),
        (
            "birthdate=ge1931-01-15&birthdate=lt1990",
            vec![id(&oz), id(&old)],
        ),
        ("birthdate=1931", vec![id(&old)]), // over 89: the year is aggregated in the index
        ("gender=male", vec![id(&old)]),
        (
            "gender=http://hl7.org/fhir/administrative-gender|female",
            vec![id(&oz), id(&ng)],
        ),
        ("family=o&gender=female", vec![id(&oz)]),
    ];
    for (query, expected) in cases {
        let mut got = fhir
            .search_ids(&format!("/Patient?{query}&_sort=_id"))
            .await;
        let mut want = expected.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{query}");
    }
    let all = fhir.search_ids("/Patient").await;
    assert_eq!(all, vec![id(&oz), id(&ng), id(&old)], "by _lastUpdated");
    let by_id = fhir
        .search_ids(&format!("/Patient?_id={},{}", id(&ng), id(&old)))
        .await;
    assert_eq!(by_id.len(), 2);
    let since = oz["meta"]["lastUpdated"].as_str().unwrap();
    let later = fhir
        .search_ids(&format!(
            "/Patient?_lastUpdated=gt{}",
            since.replace('+', "%2B")
        ))
        .await;
    assert_eq!(later, vec![id(&ng), id(&old)]);
    let newest_first = fhir.search_ids("/Patient?_sort=-_lastUpdated").await;
    assert_eq!(newest_first, vec![id(&old), id(&ng), id(&oz)]);

    let bundle = fhir_body(fhir.get("/Patient?family=ozt").await).await;
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(bundle["total"], 1);
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        app.url(&format!("/fhir/r4/Patient/{}", id(&oz))).as_str()
    );
    assert_eq!(bundle["entry"][0]["search"]["mode"], "match");
    let count_only = fhir_body(fhir.get("/Patient?_summary=count").await).await;
    assert_eq!(count_only["total"], 3);
    assert!(count_only.get("entry").is_none());
    assert_valid_fhir(&[bundle, count_only]);
}

#[tokio::test]
async fn bad_search_parameters_are_400_unless_lenient() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    for query in [
        "bogus=1",
        "birthdate=yesterday",
        "birthdate=ne1970",
        "family:contains=x",
        "_sort=family",
        "_count=-1",
        "_id=a/b",
        "_cursor=nonsense",
        "identifier=",
    ] {
        let res = fhir.get(&format!("/Patient?{query}")).await;
        assert_eq!(res.status(), 400, "{query}");
        let outcome = fhir_body(res).await;
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(outcome["issue"][0]["severity"], "error");
    }
    let res = fhir
        .request(Method::GET, "/Patient?bogus=1")
        .header("prefer", "handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let bundle = fhir_body(res).await;
    assert!(
        !link(&bundle, "self").unwrap().contains("bogus"),
        "the self link lists only the parameters used"
    );
}

#[tokio::test]
async fn paging_follows_next_and_previous_and_stays_correct_while_rows_are_inserted() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let mut created = Vec::new();
    for i in 0..5 {
        let p = fhir
            .create(&patient(
                "Pager",
                &format!("N{i}"),
                "2000-01-01",
                &format!("P{i}"),
            ))
            .await;
        created.push(p["id"].as_str().unwrap().to_owned());
    }
    let page1 = fhir_body(fhir.get("/Patient?family=pager&_count=2").await).await;
    assert_eq!(ids(&page1), created[..2]);
    assert_eq!(page1["total"], 5);
    assert!(link(&page1, "previous").is_none());
    // A row inserted while paging lands at the end and is seen once; none is skipped.
    let late = fhir
        .create(&patient("Pager", "Late", "2000-01-01", "P9"))
        .await;
    let mut seen = ids(&page1);
    let mut next = link(&page1, "next");
    let mut last_page = page1.clone();
    while let Some(url) = next {
        let res = app
            .client
            .get(url)
            .bearer_auth(&fhir.session.token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        last_page = fhir_body(res).await;
        seen.extend(ids(&last_page));
        next = link(&last_page, "next");
    }
    let mut expected = created.clone();
    expected.push(late["id"].as_str().unwrap().to_owned());
    assert_eq!(seen, expected);
    // And back.
    let prev = link(&last_page, "previous").unwrap();
    let res = app
        .client
        .get(prev)
        .bearer_auth(&fhir.session.token)
        .send()
        .await
        .unwrap();
    let back = fhir_body(res).await;
    assert_eq!(ids(&back), expected[2..4]);
    assert_valid_fhir(&[page1, last_page, back]);
}

#[tokio::test]
async fn post_search_keeps_phi_out_of_urls() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    for i in 0..3 {
        fhir.create(&patient(
            "Sequestered",
            &format!("G{i}"),
            "1999-09-09",
            &format!("S-{i}"),
        ))
        .await;
    }
    let res = fhir
        .request(Method::POST, "/Patient/_search")
        .form(&[
            ("family", "Sequestered"),
            ("birthdate", "1999-09-09"),
            ("_count", "2"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let bundle = fhir_body(res).await;
    assert_eq!(bundle["total"], 3);
    let next = link(&bundle, "next").unwrap();
    for url in [link(&bundle, "self").unwrap(), next.clone()] {
        assert!(
            !url.contains("Sequestered") && !url.contains("1999"),
            "{url}"
        );
    }
    let res = app
        .client
        .get(&next)
        .bearer_auth(&fhir.session.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(ids(&fhir_body(res).await).len(), 1);
    // Another client cannot use the saved search.
    let other = Fhir::new(&app, ALL).await;
    let res = app
        .client
        .get(&next)
        .bearer_auth(&other.session.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 410);
}

#[tokio::test]
async fn another_practice_patient_is_indistinguishable_from_a_missing_one_and_audited() {
    let app = spawn_app().await;
    let mine = Fhir::new(&app, ALL).await;
    let theirs = Fhir::new(&app, ALL).await;
    let p = mine
        .create(&patient("Private", "Pat", "1955-05-05", "MRN-PRIV"))
        .await;
    let id = p["id"].as_str().unwrap();

    let foreign = theirs.get(&format!("/Patient/{id}")).await;
    let missing = theirs.get("/Patient/does-not-exist").await;
    assert_eq!(foreign.status(), 404);
    assert_eq!(missing.status(), 404);
    let (a, b) = (fhir_body(foreign).await, fhir_body(missing).await);
    assert_eq!(a, b);
    assert!(theirs
        .search_ids("/Patient?identifier=MRN-PRIV")
        .await
        .is_empty());
    assert_eq!(
        theirs
            .request(Method::DELETE, &format!("/Patient/{id}"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // The same id in their practice is a resource of their own; mine is untouched.
    let mut own = patient("Theirs", "T", "1950-01-01", "MRN-T");
    own["id"] = json!(id);
    assert_eq!(
        theirs.put(&format!("/Patient/{id}"), &own).await.status(),
        201
    );
    let still = fhir_body(mine.get(&format!("/Patient/{id}")).await).await;
    assert_eq!(still["name"][0]["family"], "Private");

    // The refused read is in their practice's audit trail, with the id they tried.
    let audit = fhir_body(
        theirs
            .get(&format!("/AuditEvent?patient={id}&action=R"))
            .await,
    )
    .await;
    let outcomes: Vec<&str> = audit["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["outcome"].as_str().unwrap())
        .collect();
    assert!(outcomes.contains(&"4"), "{audit}");
}

#[tokio::test]
async fn a_write_and_its_audit_event_commit_together() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let p = fhir
        .create(&patient("Audited", "Al", "1966-06-16", "MRN-AUD"))
        .await;
    let id = p["id"].as_str().unwrap();
    let audit = fhir_body(fhir.get(&format!("/AuditEvent?patient={id}")).await).await;
    let entries = audit["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{audit}");
    let event = &entries[0]["resource"];
    assert_eq!(event["action"], "C");
    assert_eq!(event["outcomeDesc"], "HTTP 201");
    assert_eq!(
        event["entity"][0]["what"]["reference"],
        format!("Patient/{id}").as_str()
    );
    let text = audit.to_string();
    for phi in ["Audited", "MRN-AUD", "1966-06-16"] {
        assert!(!text.contains(phi), "audit events carry no PHI: {phi}");
    }
}

#[tokio::test]
async fn invalid_bodies_are_refused_with_an_operation_outcome_and_nothing_is_stored() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let res = fhir
        .request(Method::POST, "/Patient")
        .header("content-type", "application/fhir+json")
        .body("{ not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(fhir_body(res).await["resourceType"], "OperationOutcome");
    let res = fhir
        .post("/Patient", &json!({ "resourceType": "Practitioner" }))
        .await;
    assert_eq!(res.status(), 400);
    assert!(fhir.search_ids("/Patient").await.is_empty());
}

#[tokio::test]
async fn scopes_limit_each_interaction() {
    let app = spawn_app().await;
    let reader = Fhir::new(&app, "system/Patient.rs").await;
    let res = reader
        .post("/Patient", &patient("No", "Write", "1970-01-01", "X"))
        .await;
    assert_eq!(res.status(), 403);
    assert_eq!(reader.get("/Patient").await.status(), 200);
    let writer = Fhir::new(&app, "system/Patient.c").await;
    let created = writer
        .create(&patient("Write", "Only", "1970-01-01", "Y"))
        .await;
    let res = writer
        .get(&format!("/Patient/{}", created["id"].as_str().unwrap()))
        .await;
    assert_eq!(res.status(), 403);
}

/// The distinctive PHI of `phi_is_ciphertext_at_rest`.
const PHI: [&str; 4] = ["Xylophagous", "Quintessa", "MRN-ZZ-80417", "1948-11-27"];

#[tokio::test]
async fn phi_is_ciphertext_at_rest() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, ALL).await;
    let mut p = fhir.create(&patient(PHI[0], PHI[1], PHI[3], PHI[2])).await;
    p["telecom"] = json!([{ "system": "phone", "value": "555-0199" }]);
    let id = p["id"].as_str().unwrap().to_owned();
    assert_eq!(fhir.put(&format!("/Patient/{id}"), &p).await.status(), 200);
    assert_eq!(
        fhir.search_ids(&format!("/Patient?family={}", PHI[0]))
            .await,
        vec![id.clone()]
    );
    match backend() {
        fhirgate::store::Backend::Sqlite => {
            let bytes = crate::helpers::sqlite_bytes(&app);
            assert!(
                crate::helpers::contains(&bytes, &id),
                "the id is stored in clear"
            );
            for phi in PHI.iter().chain(&["555-0199"]) {
                assert!(
                    !crate::helpers::contains(&bytes, phi),
                    "{phi} is in the database file"
                );
            }
        }
        fhirgate::store::Backend::Postgres => {
            let pool = sqlx::PgPool::connect(app.database_url.expose())
                .await
                .unwrap();
            for table in [
                "resources",
                "resource_versions",
                "search_index",
                "audit_events",
            ] {
                let rows: Vec<String> =
                    sqlx::query_scalar(&format!("SELECT t::text FROM {table} t"))
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                assert!(!rows.is_empty() || table == "search_index");
                let all = rows.join("\n");
                for phi in PHI.iter().chain(&["555-0199"]) {
                    assert!(!all.contains(phi), "{phi} is in {table}");
                }
                // bytea renders as hex: look for the hex of each value too.
                for phi in PHI {
                    let hex: String = phi.bytes().map(|b| format!("{b:02x}")).collect();
                    assert!(!all.contains(&hex), "{phi} is in {table} (hex)");
                }
            }
            pool.close().await;
        }
    }
}

#[tokio::test]
async fn the_capability_statement_declares_exactly_what_patient_serves() {
    let app = spawn_app().await;
    let metadata = fhir_body(app.get("/fhir/r4/metadata").await).await;
    let patient = metadata["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .unwrap()
        .clone();
    let mut interactions: Vec<&str> = patient["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    interactions.sort_unstable();
    assert_eq!(
        interactions,
        [
            "create",
            "delete",
            "history-instance",
            "read",
            "search-type",
            "update",
            "vread"
        ]
    );
    let mut params: Vec<&str> = patient["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    params.sort_unstable();
    assert_eq!(
        params,
        [
            "_id",
            "_lastUpdated",
            "birthdate",
            "family",
            "gender",
            "given",
            "identifier",
            "name"
        ]
    );
    assert_eq!(patient["versioning"], "versioned-update");
    assert_eq!(patient["readHistory"], true);
    assert_eq!(patient["updateCreate"], true);
    assert_eq!(patient["conditionalCreate"], true);
    assert_eq!(patient["conditionalUpdate"], false);
    assert_eq!(patient["conditionalDelete"], "not-supported");

    // Each declared parameter is accepted; an undeclared one is not.
    let fhir = Fhir::new(&app, ALL).await;
    for (name, value) in [
        ("_id", "x"),
        ("_lastUpdated", "ge2020"),
        ("birthdate", "1970"),
        ("family", "abc"),
        ("gender", "male"),
        ("given", "abc"),
        ("identifier", "x"),
        ("name", "abc"),
    ] {
        assert_eq!(
            fhir.get(&format!("/Patient?{name}={value}")).await.status(),
            200,
            "{name}"
        );
    }
    assert_eq!(fhir.get("/Patient?address=x").await.status(), 400);
}
