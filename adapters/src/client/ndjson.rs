//! A Bulk Data output file (NDJSON) as a [`PageStream`] of bounded chunks: the body is streamed
//! and split into lines as it arrives, so memory holds one chunk of resources and one partial
//! line, whatever the file's size. A line longer than [`MAX_LINE`] or that is not a resource of
//! the file's type is a permanent error (and never quoted).

use std::collections::VecDeque;

use futures_util::stream;
use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::Response;
use serde_json::Value;
use url::Url;

use super::http::{EhrClient, NoResponse, OutboundRequest};
use super::paging::Watermark;
use crate::audit::OutboundAction;
use crate::{AdapterError, Page, PageStream};

/// The longest NDJSON line accepted (one resource).
pub const MAX_LINE: usize = 16 * 1024 * 1024;

struct Download {
    url: Option<Url>,
    response: Option<Response>,
    buffer: Vec<u8>,
    ready: VecDeque<Value>,
    finished: bool,
    watermark: Watermark,
}

/// The resources of the NDJSON file at `url`, `chunk` at a time.
pub fn ndjson_pages<'a>(
    client: &'a EhrClient,
    url: Url,
    resource_type: String,
    chunk: usize,
) -> PageStream<'a> {
    let chunk = chunk.max(1);
    let state = Download {
        url: Some(url),
        response: None,
        buffer: Vec::new(),
        ready: VecDeque::new(),
        finished: false,
        watermark: Watermark::default(),
    };
    Box::pin(stream::try_unfold(state, move |mut state| {
        let resource_type = resource_type.clone();
        async move {
            if let Some(url) = state.url.take() {
                let request =
                    OutboundRequest::get(url, OutboundAction::ExportDownload, Some(&resource_type))
                        .header(ACCEPT, HeaderValue::from_static("application/fhir+ndjson"));
                state.response = Some(client.send(&request).await?);
            }
            while state.ready.len() < chunk && !state.finished {
                let next = match state.response.as_mut() {
                    Some(response) => response.chunk().await.map_err(|e| {
                        if e.is_timeout() {
                            NoResponse::Timeout.into_error()
                        } else {
                            NoResponse::Other.into_error()
                        }
                    })?,
                    None => None,
                };
                match next {
                    Some(bytes) => state.buffer.extend_from_slice(&bytes),
                    None => {
                        state.finished = true;
                        state.buffer.push(b'\n');
                    }
                }
                take_lines(&mut state, &resource_type)?;
            }
            if state.ready.is_empty() {
                return Ok(None);
            }
            let take = state.ready.len().min(chunk);
            let resources: Vec<Value> = state.ready.drain(..take).collect();
            Ok(Some((
                Page {
                    resources,
                    watermark: state.watermark.current(),
                },
                state,
            )))
        }
    }))
}

fn take_lines(state: &mut Download, resource_type: &str) -> Result<(), AdapterError> {
    let mut start = 0;
    while let Some(end) = state.buffer[start..].iter().position(|b| *b == b'\n') {
        let line = &state.buffer[start..start + end];
        start += end + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let resource: Value = serde_json::from_slice(line)
            .map_err(|_| AdapterError::Permanent("an NDJSON line is not JSON".into()))?;
        if resource.get("resourceType").and_then(Value::as_str) != Some(resource_type) {
            return Err(AdapterError::Permanent(format!(
                "an NDJSON line is not a {resource_type}"
            )));
        }
        state.watermark.observe(&resource);
        state.ready.push_back(resource);
    }
    state.buffer.drain(..start);
    if state.buffer.len() > MAX_LINE {
        return Err(AdapterError::Permanent("an NDJSON line is too long".into()));
    }
    Ok(())
}
