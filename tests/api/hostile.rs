//! Hostile input at every door that takes a body: deeply nested JSON, invalid UTF-8, huge
//! arrays, oversized bodies, a flood of headers and a client that never finishes its request.
//! Each is a clear 4xx with an OperationOutcome (or a closed connection for the slow client),
//! nothing is stored, and the gateway goes on serving everyone else.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{fhir_body, spawn_app, TestApp};
use crate::patient::Fhir;

/// `{"a":{"a":...}}` nested `depth` times.
fn nested(depth: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(depth * 6 + 2);
    for _ in 0..depth {
        out.extend_from_slice(b"{\"a\":");
    }
    out.extend_from_slice(b"1");
    out.extend(std::iter::repeat_n(b'}', depth));
    out
}

/// A Patient whose `name` is an array of `n` names.
fn wide_patient(n: usize) -> Vec<u8> {
    let mut out = b"{\"resourceType\":\"Patient\",\"name\":[".to_vec();
    for i in 0..n {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"family\":\"X\"}");
    }
    out.extend_from_slice(b"]}");
    out
}

async fn post_raw(app: &TestApp, token: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let res = app
        .client
        .post(app.url(path))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = res.text().await.unwrap();
    assert_eq!(
        content_type,
        "application/fhir+json; charset=utf-8",
        "{path}: {status} {}",
        text.chars().take(300).collect::<String>()
    );
    (status, serde_json::from_str(&text).unwrap())
}

async fn still_serving(app: &TestApp) {
    let res = app.get("/healthz").await;
    assert_eq!(res.status(), 200, "the gateway stopped serving");
}

#[tokio::test]
async fn malformed_bodies_at_every_door_are_4xx_outcomes_and_store_nothing() {
    let app = spawn_app().await;
    let fhir = Fhir::new(&app, "system/*.cruds").await;
    let token = fhir.session.token.clone();
    let deep = nested(100_000);
    let mut bad_utf8 = br#"{"resourceType":"Patient","name":[{"family":""#.to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    bad_utf8.extend_from_slice(br#""}]}"#);

    for path in [
        "/fhir/r4/Patient",
        "/fhir/r4",
        "/fhir/r4/Patient/_search",
        "/api/v1/claims/prepare",
    ] {
        for (what, body) in [("deep", deep.clone()), ("utf8", bad_utf8.clone())] {
            let (status, outcome) = post_raw(&app, &token, path, body).await;
            assert!(
                (400..500).contains(&status),
                "{what} at {path}: {status} {outcome}"
            );
            assert_eq!(
                outcome["resourceType"], "OperationOutcome",
                "{what} at {path}"
            );
            still_serving(&app).await;
        }
    }

    // Huge arrays: past the 4 MiB resource limit, 413 before anything is parsed.
    let (status, outcome) = post_raw(&app, &token, "/fhir/r4/Patient", wide_patient(400_000)).await;
    assert_eq!(status, 413, "a 5.6 MB Patient");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let (status, outcome) = post_raw(
        &app,
        &token,
        "/fhir/r4/Patient",
        b"[1,2,3]".repeat(1_000_000),
    )
    .await;
    assert!(matches!(status, 400 | 413), "{status}");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    still_serving(&app).await;

    // Nothing of the above was stored.
    let found = fhir_body(fhir.get("/Patient?_summary=count").await).await;
    assert_eq!(found["total"], 0, "{found}");
}

#[tokio::test]
async fn a_flood_of_headers_is_refused_and_others_are_served() {
    let app = spawn_app().await;
    let mut req = app.client.get(app.url("/fhir/r4/metadata"));
    for i in 0..500 {
        req = req.header(format!("x-flood-{i}"), "y".repeat(64));
    }
    match req.send().await {
        Ok(res) => assert!(
            res.status().is_client_error(),
            "500 headers: {}",
            res.status()
        ),
        // The server may close the connection instead of answering.
        Err(e) => assert!(!e.is_timeout(), "{e}"),
    }
    still_serving(&app).await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_cut_off_while_others_are_served() {
    let app = spawn_app().await;
    let addr = app.address.trim_start_matches("http://").to_owned();
    let slow = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream
            .write_all(b"GET /fhir/r4/metadata HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        // The head never ends: the server answers 408 or closes; either way the read returns
        // well before our 30 s guard.
        let mut answer = Vec::new();
        let ended = stream
            .read_to_end(&mut answer)
            .map(|_| ())
            .map_err(|e| e.kind());
        (ended, String::from_utf8_lossy(&answer).into_owned())
    });
    // Meanwhile everyone else is served.
    for _ in 0..5 {
        still_serving(&app).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (ended, answer) = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    // Closed by the server (EOF or reset), not by our read timeout.
    assert!(
        matches!(ended, Ok(()) | Err(std::io::ErrorKind::ConnectionReset)),
        "the server kept the slow connection open: {ended:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
}
