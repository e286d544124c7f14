//! [`SmartAdapter`]: the one [`EhrAdapter`] implementation, shaped by a [`VendorSpec`]. It
//! speaks the HTTP contract of `adapters/sim/SPEC.md`: reads and searches, Bulk Data kick-off /
//! status / files, and claim-status pushes as a ClaimResponse `POST` with `If-None-Exist`.
//!
//! Ids from callers and URLs from the EHR are checked before use: an id must be a FHIR id (it
//! cannot add a path segment or a query), and export status and file URLs must be on the FHIR
//! base's origin (they get our bearer token). Never logs; errors never quote values.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt};
use reqwest::header::{HeaderName, HeaderValue, CONTENT_LOCATION, LOCATION, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use url::Url;

use super::{ChangedSince, ExportLevel, VendorSpec};
use crate::audit::OutboundAction;
use crate::client::http::{read_limited, MAX_JSON_BODY};
use crate::client::ndjson::ndjson_pages;
use crate::client::paging::Watermark;
use crate::client::settings::{setting_error, str_setting, u64_setting};
use crate::client::{parse_retry_after, same_origin, search_pages, EhrClient, OutboundRequest};
use crate::{
    AdapterContext, AdapterError, BulkExport, ClaimStatusUpdate, Connection, Credential,
    EhrAdapter, ExportFile, ExportRequest, ExportStatus, Page, PageStream, PushReceipt,
    RegistryError,
};

/// The identifier system of claim-status updates (SPEC.md, `POST {base}/ClaimResponse`).
pub const CLAIM_STATUS_UPDATE_SYSTEM: &str = "urn:fhirgate:claim-status-update";
/// Resources per page of an NDJSON download.
const NDJSON_CHUNK: usize = 500;

/// An EHR adapter for a SMART Backend Services + FHIR R4 server, configured by a vendor spec.
#[derive(Debug)]
pub struct SmartAdapter {
    spec: &'static VendorSpec,
    client: EhrClient,
    page_size: u32,
    group_id: Option<String>,
    /// The spec's `search_params` for this connection.
    search_params: Vec<(String, String)>,
    export_poll: Duration,
    export_timeout: Duration,
}

impl SmartAdapter {
    /// Validates the connection's settings (errors name the key) and builds its client.
    pub fn new(
        spec: &'static VendorSpec,
        connection: &Connection,
        context: &AdapterContext,
    ) -> Result<Self, RegistryError> {
        match connection.credential {
            Credential::PrivateKey { .. } if !spec.accepts_private_key => {
                return Err(setting_error(
                    connection,
                    "credential",
                    "this vendor takes a client secret, not a private key",
                ));
            }
            Credential::ClientSecret(_) if !spec.accepts_client_secret => {
                return Err(setting_error(
                    connection,
                    "credential",
                    "this vendor takes a private key (private_key_jwt), not a client secret",
                ));
            }
            _ => {}
        }
        let page_size = match u64_setting(connection, "page_size")? {
            None => spec.default_page_size,
            Some(n) if n >= 1 && n <= u64::from(spec.max_page_size) => n as u32,
            Some(_) => {
                return Err(setting_error(
                    connection,
                    "page_size",
                    &format!("must be between 1 and {}", spec.max_page_size),
                ))
            }
        };
        let group_id = match str_setting(connection, "group_id")? {
            Some(id) if is_fhir_id(id) => Some(id.to_owned()),
            Some(_) => return Err(setting_error(connection, "group_id", "is not a FHIR id")),
            None if spec.group_required => {
                return Err(setting_error(
                    connection,
                    "group_id",
                    "is required by this vendor",
                ))
            }
            None => None,
        };
        (spec.check)(connection)?;
        let search_params = (spec.search_params)(connection)?;
        let export_poll =
            Duration::from_millis(u64_setting(connection, "export_poll_ms")?.unwrap_or(2_000));
        let export_timeout =
            Duration::from_secs(u64_setting(connection, "export_timeout_s")?.unwrap_or(3_600));
        Ok(Self {
            spec,
            client: EhrClient::new(connection, spec.default_scopes, context)?,
            page_size,
            group_id,
            search_params,
            export_poll,
            export_timeout,
        })
    }

    pub fn client(&self) -> &EhrClient {
        &self.client
    }

    fn search_changed<'a>(
        &'a self,
        since: Option<&'a str>,
        sort: bool,
        floor: Option<&str>,
    ) -> PageStream<'a> {
        let mut url = self.client.url(&["Patient"]);
        {
            let mut query = url.query_pairs_mut();
            match (since, floor) {
                (Some(since), _) => query.append_pair("_lastUpdated", &format!("gt{since}")),
                (None, Some(floor)) => query.append_pair("_lastUpdated", &format!("ge{floor}")),
                (None, None) => &mut query,
            };
            if sort {
                query.append_pair("_sort", "_lastUpdated");
            }
            query.append_pair("_count", &self.page_size.to_string());
            query.extend_pairs(&self.search_params);
        }
        search_pages(&self.client, url, "Patient", since)
    }

    /// Kicks off a Group export of Patients since `since`, waits for it, and streams its
    /// Patient files; the watermark settles on the last page (see the Epic module's doc).
    fn export_changed<'a>(&'a self, since: Option<&'a str>) -> PageStream<'a> {
        struct Files<'a> {
            files: Option<VecDeque<ExportFile>>,
            current: Option<PageStream<'a>>,
        }
        let start = Files {
            files: None,
            current: None,
        };
        let pages = stream::try_unfold(start, move |mut state| async move {
            if state.files.is_none() {
                state.files = Some(self.run_patient_export(since).await?.into());
            }
            loop {
                if let Some(current) = state.current.as_mut() {
                    match current.next().await {
                        Some(page) => return Ok(Some((page?, state))),
                        None => state.current = None,
                    }
                }
                let Some(file) = state.files.as_mut().and_then(VecDeque::pop_front) else {
                    return Ok(None);
                };
                state.current = Some(self.file_pages(file));
            }
        });
        settle_watermark_at_end(Box::pin(pages), since)
    }

    async fn run_patient_export(
        &self,
        since: Option<&str>,
    ) -> Result<Vec<ExportFile>, AdapterError> {
        let request = ExportRequest {
            group: self.group_id.clone(),
            types: vec!["Patient".into()],
            since: since.map(str::to_owned),
        };
        let export = self.start_export(&request).await?.ok_or_else(|| {
            AdapterError::Permanent("no Group to export patients from (setting group_id)".into())
        })?;
        let deadline = Instant::now() + self.export_timeout;
        loop {
            let (status, retry_after) = self.poll(&export).await?;
            match status {
                ExportStatus::Complete { files, .. } => {
                    return Ok(files
                        .into_iter()
                        .filter(|f| f.resource_type == "Patient")
                        .collect())
                }
                ExportStatus::InProgress { .. } => {
                    let wait = retry_after
                        .unwrap_or(self.export_poll)
                        .min(Duration::from_secs(300));
                    if Instant::now() + wait > deadline {
                        return Err(AdapterError::Transient(
                            "the export did not finish in time".into(),
                        ));
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn file_pages(&self, file: ExportFile) -> PageStream<'_> {
        match self.export_url(&file.url) {
            Ok(url) if is_resource_type(&file.resource_type) => {
                ndjson_pages(&self.client, url, file.resource_type, NDJSON_CHUNK)
            }
            Ok(_) => failed(AdapterError::Permanent(
                "an export file's type is not a FHIR resource type".into(),
            )),
            Err(e) => failed(e),
        }
    }

    /// A URL the EHR gave for an export (status or file): absolute, on the base's origin.
    fn export_url(&self, url: &str) -> Result<Url, AdapterError> {
        let url = self
            .client
            .base_url()
            .join(url)
            .map_err(|_| AdapterError::Permanent("an export URL is not a URL".into()))?;
        if !same_origin(&url, self.client.base_url()) {
            return Err(AdapterError::Permanent(
                "an export URL is on another origin; not fetched".into(),
            ));
        }
        Ok(url)
    }

    async fn poll(
        &self,
        export: &BulkExport,
    ) -> Result<(ExportStatus, Option<Duration>), AdapterError> {
        let url = self.export_url(&export.status_url)?;
        let response = self
            .client
            .send(&OutboundRequest::get(url, OutboundAction::ExportPoll, None))
            .await?;
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        match response.status() {
            StatusCode::ACCEPTED => {
                let progress = response
                    .headers()
                    .get("x-progress")
                    .and_then(|v| v.to_str().ok())
                    .map(|p| p.chars().take(100).collect());
                Ok((ExportStatus::InProgress { progress }, retry_after))
            }
            StatusCode::OK => {
                let body = read_limited(response, MAX_JSON_BODY).await?;
                Ok((parse_manifest(&body)?, None))
            }
            _ => Err(AdapterError::Permanent(
                "unexpected export status response".into(),
            )),
        }
    }
}

fn failed<'a>(error: AdapterError) -> PageStream<'a> {
    Box::pin(stream::once(async move { Err(error) }))
}

/// Pages of `inner` with the watermark held at `since` on every page but the last, which gets
/// the largest watermark of all (one page of lookahead).
fn settle_watermark_at_end<'a>(inner: PageStream<'a>, since: Option<&'a str>) -> PageStream<'a> {
    struct Settle<'a> {
        inner: PageStream<'a>,
        ahead: Option<Result<Page, AdapterError>>,
        primed: bool,
        max: Watermark,
    }
    let state = Settle {
        inner,
        ahead: None,
        primed: false,
        max: Watermark::starting_at(since),
    };
    Box::pin(stream::unfold(state, move |mut state| async move {
        if !state.primed {
            state.primed = true;
            state.ahead = state.inner.next().await;
        }
        match state.ahead.take()? {
            Err(error) => Some((Err(error), state)),
            Ok(mut page) => {
                if let Some(mark) = &page.watermark {
                    state.max.offer(mark);
                }
                state.ahead = state.inner.next().await;
                page.watermark = if state.ahead.is_none() {
                    state.max.current()
                } else {
                    since.map(str::to_owned)
                };
                Some((Ok(page), state))
            }
        }
    }))
}

fn parse_manifest(body: &[u8]) -> Result<ExportStatus, AdapterError> {
    let bad = || AdapterError::Permanent("malformed export manifest".into());
    let manifest: Value = serde_json::from_slice(body).map_err(|_| bad())?;
    let transaction_time = manifest
        .get("transactionTime")
        .and_then(Value::as_str)
        .ok_or_else(bad)?
        .to_owned();
    let files = manifest
        .get("output")
        .and_then(Value::as_array)
        .ok_or_else(bad)?
        .iter()
        .map(|o| {
            Some(ExportFile {
                resource_type: o.get("type")?.as_str()?.to_owned(),
                url: o.get("url")?.as_str()?.to_owned(),
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    Ok(ExportStatus::Complete {
        transaction_time,
        files,
    })
}

/// A FHIR id: `[A-Za-z0-9\-\.]{1,64}` (R4 datatypes.html#id).
pub(crate) fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn is_resource_type(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphabetic())
        && name.starts_with(|c: char| c.is_ascii_uppercase())
}

fn is_instant(value: &str) -> bool {
    OffsetDateTime::parse(value, &Rfc3339).is_ok()
}

fn check_id(id: &str, what: &str) -> Result<(), AdapterError> {
    if is_fhir_id(id) {
        Ok(())
    } else {
        Err(AdapterError::Permanent(format!("{what} is not a FHIR id")))
    }
}

#[async_trait::async_trait]
impl EhrAdapter for SmartAdapter {
    fn vendor(&self) -> &str {
        self.spec.vendor
    }

    async fn patient(&self, id: &str) -> Result<Value, AdapterError> {
        check_id(id, "the patient id")?;
        let url = self.client.url(&["Patient", id]);
        let patient = self
            .client
            .send_json(&OutboundRequest::get(
                url,
                OutboundAction::Read,
                Some("Patient"),
            ))
            .await?;
        if patient.get("resourceType").and_then(Value::as_str) != Some("Patient") {
            return Err(AdapterError::Permanent(
                "a Patient read returned another resource".into(),
            ));
        }
        Ok(patient)
    }

    fn patients_changed_since<'a>(&'a self, since: Option<&'a str>) -> PageStream<'a> {
        if since.is_some_and(|s| !is_instant(s)) {
            return failed(AdapterError::Permanent(
                "the watermark is not a FHIR instant".into(),
            ));
        }
        match self.spec.changed_since {
            ChangedSince::Search { sort, floor } => self.search_changed(since, sort, floor),
            ChangedSince::GroupExport => self.export_changed(since),
        }
    }

    async fn coverage_for(&self, patient_id: &str) -> Result<Vec<Value>, AdapterError> {
        check_id(patient_id, "the patient id")?;
        let mut url = self.client.url(&["Coverage"]);
        url.query_pairs_mut()
            .append_pair("patient", patient_id)
            .append_pair("_count", &self.page_size.to_string())
            .extend_pairs(&self.search_params);
        let mut pages = search_pages(&self.client, url, "Coverage", None);
        let mut coverages = Vec::new();
        while let Some(page) = pages.next().await {
            coverages.extend(page?.resources);
        }
        Ok(coverages)
    }

    async fn start_export(
        &self,
        request: &ExportRequest,
    ) -> Result<Option<BulkExport>, AdapterError> {
        let group = request.group.as_deref().or(self.group_id.as_deref());
        let mut url = match (self.spec.export_level, group) {
            (_, Some(group)) => {
                check_id(group, "the group id")?;
                self.client.url(&["Group", group, "$export"])
            }
            (ExportLevel::SystemAndGroup, None) => self.client.url(&["$export"]),
            (ExportLevel::GroupOnly, None) => return Ok(None),
        };
        if request.types.iter().any(|t| !is_resource_type(t)) {
            return Err(AdapterError::Permanent(
                "an export type is not a FHIR resource type".into(),
            ));
        }
        if request.since.as_deref().is_some_and(|s| !is_instant(s)) {
            return Err(AdapterError::Permanent(
                "the export's _since is not a FHIR instant".into(),
            ));
        }
        {
            let mut query = url.query_pairs_mut();
            if !request.types.is_empty() {
                query.append_pair("_type", &request.types.join(","));
            }
            if let Some(since) = &request.since {
                query.append_pair("_since", since);
            }
        }
        let kick_off = OutboundRequest::get(url, OutboundAction::ExportStart, None).header(
            HeaderName::from_static("prefer"),
            HeaderValue::from_static("respond-async"),
        );
        let response = self.client.send(&kick_off).await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(AdapterError::Permanent(
                "the export kick-off was not accepted (202)".into(),
            ));
        }
        let status_url = response
            .headers()
            .get(CONTENT_LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                AdapterError::Permanent("the export kick-off has no Content-Location".into())
            })?;
        let status_url = self.export_url(status_url)?;
        Ok(Some(BulkExport {
            status_url: status_url.into(),
        }))
    }

    async fn poll_export(&self, export: &BulkExport) -> Result<ExportStatus, AdapterError> {
        Ok(self.poll(export).await?.0)
    }

    fn download<'a>(&'a self, file: &'a ExportFile) -> PageStream<'a> {
        self.file_pages(file.clone())
    }

    async fn push_claim_status(
        &self,
        update: &ClaimStatusUpdate,
    ) -> Result<PushReceipt, AdapterError> {
        check_id(&update.claim_id, "the claim id")?;
        check_id(&update.patient_id, "the patient id")?;
        if !matches!(
            update.outcome.as_str(),
            "queued" | "complete" | "error" | "partial"
        ) {
            return Err(AdapterError::Permanent(
                "the outcome is not a ClaimResponse outcome code".into(),
            ));
        }
        let key_ok = (1..=128).contains(&update.update_id.len())
            && update
                .update_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
        if !key_ok {
            return Err(AdapterError::Permanent(
                "the update id is not a plain token".into(),
            ));
        }
        let body = claim_response(
            update,
            &OffsetDateTime::now_utc()
                .format(&Rfc3339)
                .unwrap_or_default(),
        );
        let if_none_exist = HeaderValue::from_str(&format!(
            "identifier={CLAIM_STATUS_UPDATE_SYSTEM}|{}",
            update.update_id
        ))
        .map_err(|_| AdapterError::Permanent("the update id is not a plain token".into()))?;
        let request = OutboundRequest::post_json(
            self.client.url(&["ClaimResponse"]),
            OutboundAction::Push,
            Some("ClaimResponse"),
            &body,
        )
        .header(HeaderName::from_static("if-none-exist"), if_none_exist);
        let response = self.client.send(&request).await?;
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(id_from_location);
        let body = read_limited(response, MAX_JSON_BODY).await.ok();
        let from_body = body
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
            .filter(|id| is_fhir_id(id));
        Ok(PushReceipt {
            remote_id: from_body.or(location),
        })
    }
}

/// The ClaimResponse a status update is sent as (SPEC.md: identifier, `request`, `patient`,
/// `outcome`, `disposition`), with the elements R4 requires.
pub(crate) fn claim_response(update: &ClaimStatusUpdate, now: &str) -> Value {
    let mut body = json!({
        "resourceType": "ClaimResponse",
        "identifier": [{"system": CLAIM_STATUS_UPDATE_SYSTEM, "value": update.update_id}],
        "status": "active",
        "type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/claim-type",
            "code": "professional"
        }]},
        "use": "claim",
        "patient": {"reference": format!("Patient/{}", update.patient_id)},
        "created": now,
        "insurer": {"display": "fhirgate"},
        "request": {"reference": format!("Claim/{}", update.claim_id)},
        "outcome": update.outcome,
    });
    if let (Some(disposition), Some(map)) = (&update.disposition, body.as_object_mut()) {
        map.insert("disposition".into(), Value::String(disposition.clone()));
    }
    body
}

/// `.../ClaimResponse/{id}[/_history/{v}]` -> `id`.
fn id_from_location(location: &str) -> Option<String> {
    let path = location.split(['?', '#']).next()?;
    let mut segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    if segments.len() >= 2 && segments[segments.len() - 2] == "_history" {
        segments.truncate(segments.len() - 2);
    }
    let id = segments.pop()?;
    (segments.pop()? == "ClaimResponse" && is_fhir_id(id)).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_change_the_path_or_query_are_refused() {
        assert!(is_fhir_id("eXyZ.123-a"));
        assert!(!is_fhir_id("../Patient"));
        assert!(!is_fhir_id("a?b"));
        assert!(!is_fhir_id("a/b"));
        assert!(!is_fhir_id(""));
        assert!(!is_fhir_id(&"a".repeat(65)));
    }

    #[test]
    fn the_claim_response_carries_the_update_identifier_claim_and_patient() {
        let update = ClaimStatusUpdate {
            claim_id: "cl-1".into(),
            patient_id: "pt-1".into(),
            outcome: "complete".into(),
            disposition: Some("Paid".into()),
            update_id: "u-1".into(),
        };
        let body = claim_response(&update, "2024-01-01T00:00:00Z");
        assert_eq!(body["identifier"][0]["system"], CLAIM_STATUS_UPDATE_SYSTEM);
        assert_eq!(body["identifier"][0]["value"], "u-1");
        assert_eq!(body["request"]["reference"], "Claim/cl-1");
        assert_eq!(body["patient"]["reference"], "Patient/pt-1");
        assert_eq!(body["disposition"], "Paid");
        assert_eq!(body["outcome"], "complete");
    }

    #[test]
    fn the_remote_id_is_read_from_a_location() {
        assert_eq!(
            id_from_location("https://e/fhir/ClaimResponse/42/_history/1").as_deref(),
            Some("42")
        );
        assert_eq!(
            id_from_location("/fhir/ClaimResponse/42").as_deref(),
            Some("42")
        );
        assert_eq!(id_from_location("/fhir/Patient/42"), None);
    }
}
