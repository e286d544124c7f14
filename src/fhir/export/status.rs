//! A job's status endpoint (export.html#bulk-data-status-request) and its files
//! (export.html#file-request). A job is visible only to the client that started it, in its
//! practice: anyone else gets the same 404 as for a job that never existed, before anything
//! about the job is looked at.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use fhir_sdk::r4b::codes::{IssueSeverity, IssueType};
use futures_util::stream;
use serde_json::json;

use super::{thousands, FILE_PATH, NDJSON};
use crate::crypto::ExportChunkRef;
use crate::fhir::resources::{caller, instant};
use crate::fhir::FHIR_BASE;
use crate::http::error::operation_outcome;
use crate::http::{fhir_json, ApiError};
use crate::startup::AppState;
use crate::store::{ExportJob, ExportStatus};

/// Seconds a client is asked to wait between polls of a job in progress.
const RETRY_AFTER_SECS: &str = "2";

fn no_such_job() -> ApiError {
    ApiError::NotFound("no such export (it may have expired or been cancelled)".into())
}

/// The caller's own job named in the path, or 404.
async fn own_job(req: &HttpRequest, state: &AppState) -> Result<ExportJob, ApiError> {
    let caller = caller(req).map_err(|_| ApiError::Internal)?;
    let id = req.match_info().get("id").unwrap_or_default();
    // Job ids are 32 hex digits; anything else names no job (and is not looked up).
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(no_such_job());
    }
    match state
        .store
        .exports()
        .export_job(&caller.practice_id, id)
        .await?
    {
        Some(job) if job.client_id == caller.client_id => Ok(job),
        _ => Err(no_such_job()),
    }
}

fn http_date(us: i64) -> String {
    let secs = u64::try_from(us / 1_000_000).unwrap_or(0);
    header::HttpDate::from(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// `GET /$export-status/{id}`: 202 with `X-Progress` while the job runs, 200 with the manifest
/// when it is complete, 500 with an OperationOutcome when it failed.
pub(super) async fn status(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let job = own_job(&req, &state).await?;
    match job.status {
        ExportStatus::Accepted | ExportStatus::Running => {
            let progress = match (job.status, job.types.get(job.cursor.type_index)) {
                (ExportStatus::Running, Some(ty)) => format!(
                    "exporting {ty} ({} of {}): {} resources",
                    job.cursor.type_index + 1,
                    job.types.len(),
                    thousands(job.progress)
                ),
                (ExportStatus::Running, None) => "finishing".to_owned(),
                _ => "queued".to_owned(),
            };
            Ok(HttpResponse::Accepted()
                .insert_header(("x-progress", progress))
                .insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS))
                .finish())
        }
        ExportStatus::Failed => {
            let outcome = operation_outcome(
                IssueSeverity::Error,
                IssueType::Exception,
                format!(
                    "the export failed: {}",
                    job.error.as_deref().unwrap_or("internal error")
                ),
            );
            fhir_json(&req, StatusCode::INTERNAL_SERVER_ERROR, &outcome)
        }
        ExportStatus::Complete => {
            let files = state
                .store
                .exports()
                .export_files(&job.practice, &job.id)
                .await?;
            let output: Vec<_> = files
                .iter()
                .map(|f| {
                    json!({
                        "type": f.resource_type,
                        "url": file_url(&state.base_url, &job.id, f.file_no),
                        "count": f.resources,
                    })
                })
                .collect();
            let manifest = json!({
                "transactionTime": instant(job.transaction_time_us),
                "request": job.request_url,
                "requiresAccessToken": true,
                "output": output,
                "error": [],
            });
            let mut res = HttpResponse::Ok();
            res.content_type("application/json");
            if let Some(expires) = job.expires_us {
                res.insert_header((header::EXPIRES, http_date(expires)));
            }
            Ok(res.body(manifest.to_string()))
        }
    }
}

fn file_url(base_url: &str, job_id: &str, file_no: i64) -> String {
    format!(
        "{base_url}{FHIR_BASE}{}",
        FILE_PATH
            .replace("{id}", job_id)
            .replace("{file}", &file_no.to_string())
    )
}

/// `DELETE /$export-status/{id}`: cancels a running job or deletes a finished one's files
/// (export.html#bulk-data-delete-request); either way the job is gone (later requests: 404).
pub(super) async fn cancel(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let job = own_job(&req, &state).await?;
    // A runner holding the job notices at its next step (which is conditional on the job)
    // and stops; what it had sealed goes with the job.
    if !state
        .store
        .exports()
        .delete_export_job(&job.practice, &job.id)
        .await?
    {
        return Err(no_such_job());
    }
    tracing::info!(job = %job.id, "export deleted");
    let outcome = operation_outcome(
        IssueSeverity::Information,
        IssueType::Informational,
        "the export and its files are deleted",
    );
    fhir_json(&req, StatusCode::ACCEPTED, &outcome)
}

/// `GET /$export-file/{id}/{file}`: the file's NDJSON, opened one chunk at a time as it is
/// sent, so memory stays at about one chunk whatever the file's size.
pub(super) async fn download(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let job = own_job(&req, &state).await?;
    if job.status != ExportStatus::Complete {
        return Err(no_such_job());
    }
    let file_no: i64 = req
        .match_info()
        .get("file")
        .and_then(|f| f.parse().ok())
        .ok_or_else(no_such_job)?;
    let files = state
        .store
        .exports()
        .export_files(&job.practice, &job.id)
        .await?;
    let file = files
        .into_iter()
        .find(|f| f.file_no == file_no)
        .ok_or_else(no_such_job)?;
    // Fail before the first byte if the vault cannot open.
    state.vault().await?;
    let chunks = stream::unfold(0i64, move |chunk_no| {
        let state = state.clone();
        let (practice, job_id, chunks) = (job.practice.clone(), job.id.clone(), file.chunks);
        async move {
            if chunk_no >= chunks {
                return None;
            }
            let next = open_chunk(&state, &practice, &job_id, file_no, chunk_no).await;
            Some((next, chunk_no + 1))
        }
    });
    Ok(HttpResponse::Ok().content_type(NDJSON).streaming(chunks))
}

async fn open_chunk(
    state: &AppState,
    practice: &crate::domain::ResourceId,
    job_id: &str,
    file_no: i64,
    chunk_no: i64,
) -> Result<web::Bytes, actix_web::Error> {
    let sealed = state
        .store
        .exports()
        .export_chunk(practice, job_id, file_no, chunk_no)
        .await
        .map_err(ApiError::from)?
        // Deleted (cancelled or expired) while being downloaded: the response is cut short.
        .ok_or_else(no_such_job)?;
    let vault = state.vault().await?;
    let at = ExportChunkRef {
        practice_id: practice.as_str(),
        job_id,
        file_no,
        chunk_no,
    };
    let plain = vault.open_chunk(at, &sealed).map_err(|e| {
        tracing::error!(error = %e, job = %job_id, file_no, chunk_no, "export chunk does not open");
        ApiError::Internal
    })?;
    Ok(web::Bytes::copy_from_slice(&plain))
}
