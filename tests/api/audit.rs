//! The HIPAA audit trail: every request reaching the gate is recorded before its response, the
//! per-practice hash chain verifies, tampering is detected (SQLite) or refused (PostgreSQL).

use fhirgate::audit::{verify_chain, AuditRecord};
use fhirgate::domain::ResourceId;
use fhirgate::store::Backend;
use serde_json::Value;

use fhirgate::gate::Role;

use crate::auth::{register_client, request_token, session};
use crate::helpers::{backend, spawn_app, TestApp};

async fn chain(app: &TestApp, chain: &str) -> Vec<AuditRecord> {
    app.store.audit_chain_page(chain, 0, 10_000).await.unwrap()
}

/// A practice's client, its token, and the practice id.
async fn authenticated(app: &TestApp) -> (String, String) {
    let s = session(app, "system/Patient.rs", Role::ExternalSystem).await;
    (s.token, s.practice_id)
}

#[tokio::test]
async fn every_gated_request_is_audited_before_its_response_without_phi() {
    let app = spawn_app().await;
    let (token, practice) = authenticated(&app).await;

    // Answered only after the event is durable: read the trail right after each response.
    let res = app
        .client
        .get(app.url("/fhir/r4/Patient/pat-1?name=Zebediah"))
        .bearer_auth(&token)
        .header("x-purpose-of-use", "TREAT")
        .header("user-agent", "partner-ehr/1.0")
        .send()
        .await
        .unwrap();
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(res.status(), 404);
    let events = chain(&app, &practice).await;
    let actions: Vec<_> = events
        .iter()
        .map(|e| (e.action.as_str(), e.status_code))
        .collect();
    // A read of a patient that does not exist: type and id from the route template and the
    // validated path parameter; the query string is not recorded.
    assert_eq!(actions, [("token", 200), ("read", 404)]);
    let read = &events[1];
    assert_eq!(read.resource_type.as_deref(), Some("Patient"));
    assert_eq!(read.resource_id.as_deref(), Some("pat-1"));
    assert_eq!(read.patient_id.as_deref(), Some("pat-1"));
    assert_eq!(read.outcome, "failure");
    assert_eq!(read.purpose_of_use.as_deref(), Some("TREAT"));
    assert_eq!(read.user_agent.as_deref(), Some("partner-ehr/1.0"));
    assert_eq!(read.request_id.as_deref(), Some(request_id.as_str()));
    assert_eq!(read.source_ip.as_deref(), Some("127.0.0.1"));
    assert!(read.actor_client_id.is_some());
    assert_eq!(read.actor_role.as_deref(), Some("external_system"));

    // A request without a token belongs to no practice: the system chain.
    let res = app.get("/fhir/r4/Coverage?patient=Zebediah").await;
    assert_eq!(res.status(), 401);
    let system = chain(&app, "-").await;
    assert_eq!(system.len(), 1);
    assert_eq!(system[0].action, "search");
    assert_eq!(system[0].resource_type.as_deref(), Some("Coverage"));
    assert_eq!(system[0].status_code, 401);
    assert!(system[0].actor_client_id.is_none());

    let all = serde_json::to_string(&[events, system].concat()).unwrap();
    assert!(
        !all.contains("Zebediah"),
        "PHI from the query string reached the audit trail"
    );

    // The public documents are not PHI access and are not audited.
    app.get("/fhir/r4/metadata").await;
    assert_eq!(chain(&app, &practice).await.len(), 2);
}

#[tokio::test]
async fn refused_token_requests_are_audited_against_the_client_practice() {
    let app = spawn_app().await;
    let client = register_client(&app, "system/Patient.rs").await;
    let mut claims = client.claims();
    claims["aud"] = "https://elsewhere.example/token".into();
    let res = request_token(&app, &client.sign(&claims), "system/Patient.rs").await;
    assert_eq!(res.status(), 401);
    let practice = app
        .store
        .get_client(&client.client_id)
        .await
        .unwrap()
        .practice_id;
    let events = chain(&app, practice.as_str()).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].action, "token");
    assert_eq!(events[0].status_code, 401);
    assert_eq!(
        events[0].actor_client_id.as_deref(),
        Some(client.client_id.as_str())
    );
}

#[tokio::test]
async fn concurrent_requests_extend_the_chain_without_gaps_or_forks() {
    let app = spawn_app().await;
    let (token, practice) = authenticated(&app).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let client = app.client.clone();
        let url = app.url(&format!("/fhir/r4/Patient/p{i}"));
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 404);
    }
    let events = chain(&app, &practice).await;
    assert_eq!(events.len(), 61);
    let report = verify_chain(&practice, &events);
    assert!(report.ok, "{report:?}");
}

/// Two gateway instances on one database append to one practice's chain, alone and at once, in
/// between the requests' own appends: every event lands once, in one unbroken chain. (On
/// PostgreSQL an instance appends without locking the head while the head is the one it last
/// saw; here the other instance keeps moving it, so both paths run and must agree.)
#[tokio::test]
async fn appends_from_two_instances_interleave_without_gaps_or_forks() {
    let app = spawn_app().await;
    let (token, practice) = authenticated(&app).await;
    let other = fhirgate::store::connect(
        &app.database_url,
        &fhirgate::store::PoolOptions {
            max_connections: 4,
            acquire_timeout: std::time::Duration::from_secs(30),
        },
    )
    .await
    .unwrap();
    let event = |n: u16| fhirgate::audit::NewAuditEvent {
        practice_id: Some(ResourceId::parse("p", practice.as_str()).unwrap()),
        action: Some(fhirgate::audit::Action::Read),
        status_code: n,
        ..Default::default()
    };
    let mut expected = chain(&app, &practice).await.len();
    // Turns: each instance finds the head moved by the other since its last append.
    for round in 0..4u16 {
        app.store.append_audit(&[event(200 + round)]).await.unwrap();
        app.store
            .append_audit(&[event(300 + round), event(301 + round)])
            .await
            .unwrap();
        other.append_audit(&[event(400 + round)]).await.unwrap();
        expected += 4;
    }
    // At once: both instances and the gateway's own requests.
    let mut appends = Vec::new();
    for i in 0..20u16 {
        let (mine, theirs) = (app.store.clone(), other.clone());
        let (a, b) = (event(500 + i), event(600 + i));
        appends.push(tokio::spawn(async move { mine.append_audit(&[a]).await }));
        appends.push(tokio::spawn(async move { theirs.append_audit(&[b]).await }));
    }
    let mut reads = Vec::new();
    for i in 0..10 {
        let request = app
            .client
            .get(app.url(&format!("/fhir/r4/Patient/p{i}")))
            .bearer_auth(&token);
        reads.push(tokio::spawn(async move { request.send().await }));
    }
    for append in appends {
        assert_eq!(append.await.unwrap().unwrap(), 1);
    }
    for read in reads {
        assert_eq!(read.await.unwrap().unwrap().status(), 404);
    }
    expected += 40 + 10;

    let events = chain(&app, &practice).await;
    assert_eq!(events.len(), expected);
    let seqs: Vec<i64> = events.iter().map(|e| e.chain_seq).collect();
    assert_eq!(seqs, (1..=expected as i64).collect::<Vec<_>>());
    let report = verify_chain(&practice, &events);
    assert!(report.ok, "{report:?}");
    // Each event once: the distinct status codes appended above are all there.
    for code in (500..520).chain(600..620) {
        assert_eq!(
            events
                .iter()
                .filter(|e| e.status_code == i64::from(code))
                .count(),
            1,
            "status {code}"
        );
    }
}

/// The `fhirgate` binary run against the test app's database.
fn fhirgate(app: &TestApp, args: &[&str]) -> std::process::Output {
    crate::binary::fhirgate()
        .args(args)
        .env("FHIRGATE_DATABASE_URL", app.database_url.expose())
        .output()
        .unwrap()
}

#[tokio::test]
async fn audit_verify_detects_an_edit_and_postgres_refuses_it() {
    let app = spawn_app().await;
    let (token, practice) = authenticated(&app).await;
    for i in 0..3 {
        app.client
            .get(app.url(&format!("/fhir/r4/Patient/p{i}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    }
    let out = fhirgate(&app, &["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["chain"], practice.as_str());
    assert_eq!(report["events"], 4);
    assert_eq!(report["ok"], true);

    let tamper = "UPDATE audit_events SET status_code = 200 WHERE chain = $1 AND chain_seq = 3";
    match backend() {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(app.database_url.expose())
                .await
                .unwrap();
            sqlx::query(tamper)
                .bind(&practice)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
            let out = fhirgate(&app, &["audit", "verify"]);
            assert_eq!(out.status.code(), Some(1));
            let report: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["ok"], false);
            assert_eq!(report["first_broken"]["chain_seq"], 3);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("seq 3"), "{stderr}");
        }
        Backend::Postgres => {
            // Even the superuser the gateway connects as cannot change or remove an event.
            let pool = sqlx::PgPool::connect(app.database_url.expose())
                .await
                .unwrap();
            assert!(sqlx::query(tamper)
                .bind(&practice)
                .execute(&pool)
                .await
                .is_err());
            assert!(sqlx::query("DELETE FROM audit_events")
                .execute(&pool)
                .await
                .is_err());
            assert!(sqlx::query("TRUNCATE audit_events")
                .execute(&pool)
                .await
                .is_err());
            pool.close().await;
            assert!(fhirgate(&app, &["audit", "verify"]).status.success());
        }
    }
}

#[tokio::test]
async fn audit_export_writes_the_practice_events_as_verifiable_ndjson() {
    let app = spawn_app().await;
    let (token, practice) = authenticated(&app).await;
    app.client
        .get(app.url("/fhir/r4/Patient/p1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let out = fhirgate(
        &app,
        &[
            "audit",
            "export",
            "--practice",
            &practice,
            "--since",
            "2020-01-01",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["practice_id"] == practice.as_str()));
    assert_eq!(lines[1]["prev_hash"], lines[0]["hash"]);

    let future = fhirgate(
        &app,
        &[
            "audit",
            "export",
            "--practice",
            &practice,
            "--since",
            "2999-01-01",
        ],
    );
    assert!(future.stdout.is_empty());
    let bad = fhirgate(
        &app,
        &[
            "audit",
            "export",
            "--practice",
            &practice,
            "--since",
            "yesterday",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    let _ = ResourceId::parse("p", practice).unwrap();
}

#[tokio::test]
async fn a_purge_removes_only_events_older_than_six_years_and_the_chain_still_verifies() {
    let app = spawn_app().await;
    let (token, practice) = authenticated(&app).await;
    // Three events recorded seven years ago, before the recent ones.
    let old = fhirgate::audit::NewAuditEvent {
        practice_id: Some(ResourceId::parse("p", practice.as_str()).unwrap()),
        action: Some(fhirgate::audit::Action::Read),
        status_code: 200,
        ..Default::default()
    };
    let seven_years_ago = time::OffsetDateTime::now_utc() - time::Duration::days(7 * 365);
    // Appended into a fresh chain of its own, so the old events come first.
    let chain_practice = app
        .store
        .create_practice(&fhirgate::domain::NewPractice {
            name: fhirgate::domain::PracticeName::parse("Old Practice").unwrap(),
            timezone: fhirgate::domain::TimeZoneName::default(),
            npi: None,
            tax_id: None,
        })
        .await
        .unwrap();
    let old = fhirgate::audit::NewAuditEvent {
        practice_id: Some(chain_practice.id.clone()),
        ..old
    };
    app.store
        .append_audit_at(&[old.clone(), old.clone(), old.clone()], seven_years_ago)
        .await
        .unwrap();
    app.store.append_audit(&[old]).await.unwrap();
    app.client
        .get(app.url("/fhir/r4/Patient/p1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();

    let refused = fhirgate(&app, &["audit", "purge", "--before", "2025-01-01"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("six years"));

    let out = fhirgate(&app, &["audit", "purge"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let purged: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(purged["chain"], chain_practice.id.as_str());
    assert_eq!(purged["purged_through_seq"], 3);

    let remaining = chain(&app, chain_practice.id.as_str()).await;
    assert_eq!(remaining.len(), 1);
    assert_eq!(remaining[0].chain_seq, 4);
    // The recent practice's events are untouched.
    assert_eq!(chain(&app, &practice).await.len(), 2);

    let out = fhirgate(&app, &["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The source address of the newest audit event of `practice`, after a gated request that
/// carried `X-Forwarded-For: 203.0.113.7, 198.51.100.20`.
async fn audited_source(app: &TestApp) -> String {
    let (token, practice) = authenticated(app).await;
    let res = app
        .client
        .get(app.url("/fhir/r4/Patient?_summary=count"))
        .bearer_auth(&token)
        .header("x-forwarded-for", "203.0.113.7, 198.51.100.20")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = chain(app, &practice).await;
    events.last().unwrap().source_ip.clone().unwrap()
}

#[tokio::test]
async fn the_audited_source_is_the_peer_unless_it_is_a_trusted_proxy() {
    // By default the header is the client's word and is ignored.
    let app = spawn_app().await;
    assert_eq!(audited_source(&app).await, "127.0.0.1");

    // Behind a trusted proxy (the test client's address), the first untrusted address from the
    // right: 198.51.100.20 was appended by the proxy, 203.0.113.7 sent by the client itself.
    let behind = crate::helpers::spawn_app_with("trusted_proxies = '127.0.0.1'\n").await;
    assert_eq!(audited_source(&behind).await, "198.51.100.20");
    let behind_both =
        crate::helpers::spawn_app_with("trusted_proxies = '127.0.0.1, 198.51.100.0/24'\n").await;
    assert_eq!(audited_source(&behind_both).await, "203.0.113.7");
}

/// Makes every audit insert fail (`down`) or lets them through again.
async fn audit_trail(app: &TestApp, down: bool) {
    let url = app.database_url.expose();
    let statements: &[&str] = match (backend(), down) {
        (Backend::Sqlite, true) => &["CREATE TRIGGER audit_down BEFORE INSERT ON audit_events \
             BEGIN SELECT RAISE(ABORT, 'audit trail down'); END"],
        (Backend::Sqlite, false) => &["DROP TRIGGER audit_down"],
        (Backend::Postgres, true) => &[
            "CREATE FUNCTION audit_down() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'audit trail down'; END $$",
            "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events \
             FOR EACH ROW EXECUTE FUNCTION audit_down()",
        ],
        (Backend::Postgres, false) => &[
            "DROP TRIGGER audit_down ON audit_events",
            "DROP FUNCTION audit_down()",
        ],
    };
    match backend() {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(url).await.unwrap();
            for s in statements {
                sqlx::query(s).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            for s in statements {
                sqlx::query(s).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
    }
}

#[tokio::test]
async fn nothing_is_served_or_stored_while_the_audit_trail_cannot_be_written() {
    let app = spawn_app().await;
    let s = session(&app, "system/Patient.cruds", Role::ExternalSystem).await;
    let patient = serde_json::json!({
        "resourceType": "Patient",
        "name": [{ "family": "Unauditedaccess" }]
    });
    let post = |body: &Value| {
        app.client
            .post(app.url("/fhir/r4/Patient"))
            .bearer_auth(&s.token)
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
    };
    let res = post(&patient).await.unwrap();
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let read = || {
        app.client
            .get(app.url(&format!("/fhir/r4/Patient/{id}")))
            .bearer_auth(&s.token)
            .send()
    };

    audit_trail(&app, true).await;
    // A read would be an unaudited disclosure: 503, and the body carries nothing of the patient.
    let res = read().await.unwrap();
    assert_eq!(res.status(), 503);
    let body = res.text().await.unwrap();
    assert!(
        body.contains("OperationOutcome") && !body.contains("Unauditedaccess"),
        "{body}"
    );
    // A write fails whole: its audit event commits with it or not at all.
    let res = post(&patient).await.unwrap();
    assert_eq!(res.status(), 503, "{}", res.text().await.unwrap());

    // Once the trail takes writes again, the gateway serves again by itself.
    audit_trail(&app, false).await;
    let res = read().await.unwrap();
    assert_eq!(res.status(), 200);
    let count = app
        .client
        .get(app.url("/fhir/r4/Patient?_summary=count"))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(count["total"], 1, "the refused create stored nothing");
}
