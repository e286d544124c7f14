//! The `fhirgate` binary as an operator uses it: configuration errors, `migrate`, `practices`,
//! `serve` with JSON logs and graceful shutdown on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::TestDb;

/// The `fhirgate` binary with a fixed test master key and no inherited config file.
pub(crate) fn fhirgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhirgate"));
    cmd.env_remove("FHIRGATE_CONFIG").env(
        "FHIRGATE_MASTER_KEY",
        format!("test1:{}", "A".repeat(43) + "="),
    );
    cmd
}

pub(crate) fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("fhirgate runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_invalid_environment_value_fails_fast_naming_the_key() {
    let out = run(fhirgate()
        .arg("serve")
        .env("FHIRGATE_LISTEN", "not-an-address"));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("`listen`"), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

#[test]
fn an_invalid_config_file_value_names_the_key_and_a_missing_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "database_max_connections = 0\n").unwrap();
    let out = run(fhirgate().args(["serve", "--config"]).arg(&file));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("`database_max_connections`"),
        "{}",
        stderr(&out)
    );

    let out = run(fhirgate().args(["migrate", "--config", "/nonexistent/fhirgate.toml"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/fhirgate.toml"));
}

#[tokio::test]
async fn migrate_then_practices_add_and_list_print_json_lines() {
    let (_db, url) = TestDb::create().await;
    let out = run(fhirgate()
        .arg("migrate")
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    assert!(out.status.success(), "{}", stderr(&out));
    let migrated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
        .unwrap()
        .count();
    assert_eq!(migrated["applied"].as_array().unwrap().len(), files);

    let out = run(fhirgate()
        .args([
            "practices",
            "add",
            "--name",
            "Lakeside Therapy",
            "--timezone",
            "America/Denver",
        ])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    let practice: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(practice["name"], "Lakeside Therapy");
    assert_eq!(practice["timezone"], "America/Denver");
    let id = practice["id"].as_str().unwrap();

    let out = run(fhirgate()
        .args(["practices", "list"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    let listed: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
    assert_eq!(listed["id"], id);
}

#[tokio::test]
async fn practices_add_refuses_an_unknown_time_zone_and_a_bad_npi() {
    let (_db, url) = TestDb::create().await;
    let out = run(fhirgate()
        .args(["practices", "add", "--name", "X", "--timezone", "Mars/Base"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("timezone"));
    let out = run(fhirgate()
        .args(["practices", "add", "--name", "X", "--npi", "1234567890"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("npi"));
}

/// A practice and a `system/*.cruds` client of it signing with `key`, made with the CLI as an
/// operator would; the client's id.
pub(crate) fn practice_with_client(
    url: &fhirgate::config::DatabaseUrl,
    practice_name: &str,
    key: &crate::auth::SigningKey,
) -> String {
    let out = run(fhirgate()
        .args(["practices", "add", "--name", practice_name])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    let practice: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, crate::auth::SigningKey::jwks(&[key])).unwrap();
    let out = run(fhirgate()
        .args([
            "clients",
            "add",
            "--practice",
            practice["id"].as_str().unwrap(),
            "--name",
            "EHR",
        ])
        .arg("--jwks")
        .arg(&jwks)
        .args(["--scope", "system/*.cruds"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    let client: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    client["client_id"].as_str().unwrap().to_owned()
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

pub(crate) fn wait_until_up(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(res) = http_get(port, "/healthz") {
            if res.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("fhirgate serve exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("fhirgate serve did not come up");
}

pub(crate) fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test]
async fn serve_logs_json_with_the_request_id_and_finishes_in_flight_requests_on_sigterm() {
    let (_db, url) = TestDb::create().await;
    let port = free_port();
    let mut child = fhirgate()
        .arg("serve")
        .env("FHIRGATE_DATABASE_URL", url.expose())
        .env("FHIRGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRGATE_WORKERS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_up(port, &mut child);

    let response = http_get(port, "/fhir/r4/metadata").unwrap();
    let request_id = response
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap()
        .trim()
        .to_owned();

    // A request in flight when SIGTERM arrives: its head is in, its body still arriving.
    // (A connection whose request head is incomplete is idle to actix and is closed.)
    let mut in_flight = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        in_flight,
        "POST /fhir/r4/metadata HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n12345"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    sigterm(&child);
    std::thread::sleep(Duration::from_millis(300));
    let _ = write!(in_flight, "67890");
    let mut answer = String::new();
    in_flight
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    in_flight.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 405"),
        "in-flight request was dropped: {answer:?}"
    );

    // Both pipes are drained while waiting, so a chatty child cannot block on a full pipe.
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "serve exited with {}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let lines: Vec<serde_json::Value> = BufReader::new(stdout.as_bytes())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).expect("every log line is JSON"))
        .collect();
    let completed = lines
        .iter()
        .find(|l| l["message"] == "request completed" && l["span"]["route"] == "/fhir/r4/metadata")
        .expect("a completion line for the metadata request");
    assert_eq!(completed["span"]["request_id"], request_id.as_str());
    assert_eq!(completed["status"], 200);
    assert!(lines.iter().any(|l| l["message"] == "shutdown complete"));
}

#[tokio::test]
async fn clients_add_prints_the_client_id_and_refuses_an_unknown_practice() {
    let (_db, url) = TestDb::create().await;
    let out = run(fhirgate()
        .args(["practices", "add", "--name", "Lakeside Therapy"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    let practice: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let practice_id = practice["id"].as_str().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        crate::auth::SigningKey::jwks(&[&crate::auth::SigningKey::es384("k1")]),
    )
    .unwrap();
    let out = run(fhirgate()
        .args([
            "clients",
            "add",
            "--practice",
            practice_id,
            "--name",
            "Partner EHR",
        ])
        .arg("--jwks")
        .arg(&jwks)
        .args(["--scope", "system/Patient.rs system/Coverage.read"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    let client: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(!client["client_id"].as_str().unwrap().is_empty());
    assert_eq!(client["practice_id"], practice_id);
    assert_eq!(client["scope"], "system/Patient.rs system/Coverage.read");
    assert_eq!(client["status"], "active");

    let out = run(fhirgate()
        .args([
            "clients",
            "disable",
            "--client-id",
            client["client_id"].as_str().unwrap(),
        ])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    let disabled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(disabled["status"], "disabled");

    let out = run(fhirgate()
        .args([
            "clients",
            "add",
            "--practice",
            "no-such-practice",
            "--name",
            "X",
        ])
        .arg("--jwks")
        .arg(&jwks)
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no such practice"));

    let out = run(fhirgate()
        .args([
            "clients",
            "add",
            "--practice",
            practice_id,
            "--name",
            "X",
            "--jwks-url",
            "https://x/j",
        ])
        .args(["--scope", "system/Patient.bogus"])
        .env("FHIRGATE_DATABASE_URL", url.expose()));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--scope"));
}

/// Distinctive PHI-like values that must never reach the logs.
const PHI: &[&str] = &[
    "Zebediah",
    "Quackenbush",
    "1961-07-04",
    "MRN-99887766",
    "555-0199",
];

#[tokio::test]
async fn no_phi_reaches_the_logs_whatever_the_request_carries() {
    let (_db, url) = TestDb::create().await;
    let key = crate::auth::SigningKey::es384("k1");
    let client_id = practice_with_client(&url, "Lakeside Therapy", &key);

    let port = free_port();
    let mut child = fhirgate()
        .arg("serve")
        .env("FHIRGATE_DATABASE_URL", url.expose())
        .env("FHIRGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRGATE_LOG_LEVEL", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain both pipes from the start: at debug level the logs outgrow a pipe's buffer (64 KiB)
    // within these requests, and a child blocked writing a log line answers nothing (this test
    // hung on PostgreSQL, whose debug logs are longer, until the pipes were read concurrently).
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    wait_until_up(port, &mut child);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();

    // A token, then requests carrying PHI in the path, query, headers and a form body.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": client_id, "sub": client_id, "aud": format!("{base}/auth/token"),
        "exp": now + 120, "jti": "jti-Zebediah-Quackenbush",
    });
    let assertion = crate::auth::sign_with(&key, &claims);
    let token: serde_json::Value = http
        .post(format!("{base}/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "scope",
                "system/Patient.cruds system/Coverage.cruds system/AuditEvent.rs",
            ),
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
    let phi_query =
        "/fhir/r4/Patient?family=Quackenbush&given=Zebediah&birthdate=1961-07-04&telecom=555-0199";
    for (path, auth) in [
        (phi_query, true),
        (phi_query, false),
        ("/fhir/r4/Patient/MRN-99887766", true),
        (
            "/fhir/r4/AuditEvent?patient=MRN-99887766&agent=Zebediah",
            true,
        ),
        ("/fhir/r4/AuditEvent?bogus=Quackenbush", true),
        ("/fhir/r4/AuditEvent?date=1961-07-04Zebediah", true),
        ("/Zebediah/1961-07-04", false),
    ] {
        let mut req = http
            .get(format!("{base}{path}"))
            .header("x-request-id", "Zebediah Quackenbush")
            .header("user-agent", "MRN-99887766");
        if auth {
            req = req.bearer_auth(&token);
        }
        req.send().await.unwrap();
    }
    http.post(format!("{base}/fhir/r4/AuditEvent/_search"))
        .bearer_auth(&token)
        .form(&[("patient", "Quackenbush"), ("agent", "555-0199")])
        .send()
        .await
        .unwrap();
    // Patient writes and searches carrying the PHI in bodies and headers, valid and not.
    let patient = serde_json::json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:mrn", "value": "MRN-99887766" }],
        "name": [{ "family": "Quackenbush", "given": ["Zebediah"] }],
        "telecom": [{ "system": "phone", "value": "555-0199" }],
        "birthDate": "1961-07-04"
    });
    let created: serde_json::Value = http
        .post(format!("{base}/fhir/r4/Patient"))
        .bearer_auth(&token)
        .header("content-type", "application/fhir+json")
        .header(
            "if-none-exist",
            "identifier=MRN-99887766&family=Quackenbush",
        )
        .body(patient.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().expect("a created patient");
    let mut wrong = patient.clone();
    wrong["id"] = serde_json::json!("Zebediah");
    wrong["gender"] = serde_json::json!("Quackenbush");
    for body in [wrong.to_string(), "{\"Zebediah\": 1961-07-04".to_owned()] {
        http.put(format!("{base}/fhir/r4/Patient/{id}"))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .header("if-match", "W/\"MRN-99887766\"")
            .body(body)
            .send()
            .await
            .unwrap();
    }
    http.post(format!("{base}/fhir/r4/Patient/_search"))
        .bearer_auth(&token)
        .form(&[
            ("family", "Quackenbush"),
            ("birthdate", "lt1961-07-04"),
            ("telecom", "555-0199"),
        ])
        .send()
        .await
        .unwrap();
    // A transaction and a batch carrying the PHI, one valid and one failing on a reference.
    for (ty, reference) in [
        (
            "transaction",
            "urn:uuid:7c1c7f2e-0000-4000-8000-000000000001",
        ),
        ("batch", "Patient/MRN-99887766"),
    ] {
        let bundle = serde_json::json!({
            "resourceType": "Bundle", "type": ty, "entry": [
                { "fullUrl": "urn:uuid:7c1c7f2e-0000-4000-8000-000000000001", "resource": patient,
                  "request": { "method": "POST", "url": "Patient", "ifNoneExist": "identifier=MRN-99887766" } },
                { "resource": { "resourceType": "Coverage", "status": "active",
                    "identifier": [{ "value": "MRN-99887766" }],
                    "beneficiary": { "reference": reference }, "payor": [{ "reference": "Organization/Zebediah" }] },
                  "request": { "method": "POST", "url": "Coverage" } },
                { "request": { "method": "GET", "url": "Patient?family=Quackenbush" } }
            ]
        });
        http.post(format!("{base}/fhir/r4"))
            .bearer_auth(&token)
            .header("content-type", "application/fhir+json")
            .body(bundle.to_string())
            .send()
            .await
            .unwrap();
    }
    // A refused assertion that carries PHI in its claims.
    http.post(format!("{base}/auth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_assertion", "Zebediah.1961-07-04.x"),
        ])
        .send()
        .await
        .unwrap();

    sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success());
    let mut logs = String::from_utf8_lossy(&stdout.join().unwrap()).into_owned();
    logs.push_str(&String::from_utf8_lossy(&stderr.join().unwrap()));
    assert!(
        logs.lines()
            .filter(|l| l.contains("request completed"))
            .count()
            >= 15,
        "{logs}"
    );
    for value in PHI {
        assert!(!logs.contains(value), "`{value}` reached the logs:\n{logs}");
    }
}

#[test]
fn claims_check_rules_lists_the_payers_and_names_the_file_and_key_of_a_bad_one() {
    let out = run(fhirgate().args(["claims", "check-rules"]));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let loaded: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let payers: Vec<&str> = loaded["payers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert!(
        payers.contains(&"BCBS") && payers.contains(&"AETNA"),
        "{loaded}"
    );
    assert!(loaded["icd10_codes"].as_u64().unwrap() > 70_000);

    // A copy of the shipped rules with one more payer whose rule has a typo.
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for sub in ["codes", "payers"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
        for entry in std::fs::read_dir(shipped.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(sub).join(entry.file_name())).unwrap();
        }
    }
    let acme = dir.path().join("payers/acme.yaml");
    std::fs::write(
        &acme,
        "id: ACME\nname: Acme Health\ntimely_filing_days: 90\nrules:\n  - id: auth\n    when: { cpts: [\"90837\"] }\n    require: prior_authorization\n",
    )
    .unwrap();
    let out = run(fhirgate()
        .args(["claims", "check-rules", "--dir"])
        .arg(dir.path()));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("acme.yaml") && err.contains("rules[0].when"),
        "{err}"
    );

    // Fixed, the new payer loads with no code change; serve would use it.
    std::fs::write(
        &acme,
        "id: ACME\nname: Acme Health\ntimely_filing_days: 90\nrules:\n  - id: auth\n    when: { cpt: [\"90837\"] }\n    require: prior_authorization\n",
    )
    .unwrap();
    let out = run(fhirgate()
        .args(["claims", "check-rules", "--dir"])
        .arg(dir.path()));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ACME\""));
}
