//! Bulk Data `$export` (FHIR Bulk Data Access v2, <https://hl7.org/fhir/uv/bulkdata/export.html>):
//! kick-off (Group for every personality, system-level for generic only, as Epic and Cerner
//! document Group export only: <https://fhir.epic.com/Documentation?docId=fhir_bulk_data>),
//! status polling with `X-Progress`/`Retry-After`, the manifest, NDJSON files and cancel. A job
//! snapshots its resources at kick-off. Never logs resources.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::error::{SimError, FHIR_JSON};
use crate::fhir::guard;
use crate::state::{lock, now_ms, read, ExportJob, Shared};
use crate::synthetic::instant;

type Query = web::Query<Vec<(String, String)>>;

pub(crate) async fn group_export(
    sh: web::Data<Shared>,
    req: HttpRequest,
    group: web::Path<String>,
    q: Query,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    if *group != sh.settings.group_id {
        return Err(SimError::NotFound("Group".into()));
    }
    kick_off(&sh, &req, &q)
}

pub(crate) async fn system_export(
    sh: web::Data<Shared>,
    req: HttpRequest,
    q: Query,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    if !sh.settings.personality.traits().system_export {
        return Err(SimError::bad(
            "not-supported",
            "system-level $export is not supported; use Group/{id}/$export",
        ));
    }
    kick_off(&sh, &req, &q)
}

fn kick_off(
    sh: &Shared,
    req: &HttpRequest,
    q: &[(String, String)],
) -> Result<HttpResponse, SimError> {
    let prefer = req
        .headers()
        .get("Prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !prefer.split(',').any(|p| p.trim() == "respond-async") {
        return Err(SimError::bad(
            "invalid",
            "$export requires the header Prefer: respond-async",
        ));
    }
    let mut types = vec!["Patient".to_string(), "Coverage".to_string()];
    let mut since = None;
    for (k, v) in q {
        match k.as_str() {
            "_type" => {
                types = v
                    .split(',')
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .collect();
                if types.is_empty() || types.iter().any(|t| t != "Patient" && t != "Coverage") {
                    return Err(SimError::bad(
                        "not-supported",
                        "_type may name Patient and Coverage only",
                    ));
                }
            }
            "_since" => {
                use time::format_description::well_known::Rfc3339;
                let t = time::OffsetDateTime::parse(v, &Rfc3339)
                    .map_err(|_| SimError::bad("invalid", "_since must be a FHIR instant"))?;
                since = Some((t.unix_timestamp_nanos() / 1_000_000) as i64);
            }
            "_outputFormat"
                if !matches!(
                    v.as_str(),
                    "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                ) =>
            {
                return Err(SimError::bad(
                    "not-supported",
                    "_outputFormat must be ndjson",
                ));
            }
            _ => {}
        }
    }
    let transaction_time = now_ms();
    let origin = &sh.settings.origin;
    let job = uuid::Uuid::new_v4().simple().to_string();
    let lines = sh.settings.file_lines.max(1);
    let store = read(&sh.patients);
    let start = since.map_or(0, |s| store.start_at_instant(s, false));
    let chosen = &store.sorted[start..];
    let mut files = Vec::new();
    let mut output = Vec::new();
    for t in &types {
        let all: Vec<&web::Bytes> = if t == "Patient" {
            chosen.iter().map(|r| &r.json).collect()
        } else {
            chosen.iter().flat_map(|r| r.coverage_json.iter()).collect()
        };
        for chunk in all.chunks(lines) {
            let mut body = Vec::with_capacity(chunk.iter().map(|b| b.len() + 1).sum());
            for line in chunk {
                body.extend_from_slice(line);
                body.push(b'\n');
            }
            files.push(web::Bytes::from(body));
            output.push(json!({
                "type": t,
                "url": format!("{origin}/bulkfiles/{job}/{}.ndjson", files.len()),
                "count": chunk.len(),
            }));
        }
    }
    drop(store);
    let request = format!(
        "{}{}{}",
        origin,
        req.path(),
        if req.query_string().is_empty() {
            String::new()
        } else {
            format!("?{}", req.query_string())
        }
    );
    let manifest = json!({
        "transactionTime": instant(transaction_time),
        "request": request,
        "requiresAccessToken": true,
        "output": output,
        "error": [],
    });
    lock(&sh.jobs).insert(
        job.clone(),
        ExportJob {
            polls_left: sh.settings.export_polls,
            manifest,
            files,
        },
    );
    Ok(HttpResponse::Accepted()
        .insert_header((
            header::CONTENT_LOCATION,
            format!("{origin}/bulkstatus/{job}"),
        ))
        .content_type(FHIR_JSON)
        .body(crate::error::outcome("information", "informational", "export accepted").to_string()))
}

pub(crate) async fn status(
    sh: web::Data<Shared>,
    req: HttpRequest,
    job: web::Path<String>,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    let mut jobs = lock(&sh.jobs);
    let j = jobs
        .get_mut(job.as_str())
        .ok_or_else(|| SimError::NotFound("export job".into()))?;
    if j.polls_left > 0 {
        j.polls_left -= 1;
        return Ok(HttpResponse::Accepted()
            .insert_header(("X-Progress", "in progress"))
            .insert_header((header::RETRY_AFTER, "1"))
            .finish());
    }
    Ok(HttpResponse::Ok().json(&j.manifest))
}

pub(crate) async fn cancel(
    sh: web::Data<Shared>,
    req: HttpRequest,
    job: web::Path<String>,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    lock(&sh.jobs)
        .remove(job.as_str())
        .ok_or_else(|| SimError::NotFound("export job".into()))?;
    Ok(HttpResponse::Accepted().content_type(FHIR_JSON).body(
        crate::error::outcome("information", "informational", "export cancelled").to_string(),
    ))
}

pub(crate) async fn file(
    sh: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, SimError> {
    guard(&sh, &req)?;
    let (job, name) = path.into_inner();
    let n: usize = name
        .strip_suffix(".ndjson")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| SimError::NotFound("file".into()))?;
    let jobs = lock(&sh.jobs);
    let body = jobs
        .get(&job)
        .and_then(|j| n.checked_sub(1).and_then(|i| j.files.get(i)))
        .cloned()
        .ok_or_else(|| SimError::NotFound("file".into()))?;
    Ok(HttpResponse::Ok()
        .content_type("application/fhir+ndjson")
        .body(body))
}
