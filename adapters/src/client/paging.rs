//! Searchset listings as a [`PageStream`]: one request per page, pages fetched as they are
//! consumed (memory flat in the listing's length), `Bundle.link[relation=next]` followed only
//! on the FHIR base URL's origin (scheme, host, port). A next link elsewhere is a permanent
//! error and is never fetched: our bearer token must not travel to another server. A page that
//! is not a Bundle is a permanent error too.

use futures_util::stream;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use url::Url;

use super::http::{EhrClient, OutboundRequest};
use crate::audit::OutboundAction;
use crate::{AdapterError, Page, PageStream};

/// Whether two URLs share scheme, host and port.
pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.origin() == b.origin()
}

/// The largest `meta.lastUpdated` seen, compared as instants (not as strings: offsets differ).
#[derive(Debug, Clone, Default)]
pub(crate) struct Watermark(Option<(OffsetDateTime, String)>);

impl Watermark {
    pub(crate) fn starting_at(since: Option<&str>) -> Self {
        let mut mark = Self::default();
        if let Some(since) = since {
            mark.offer(since);
        }
        mark
    }

    pub(crate) fn offer(&mut self, instant: &str) {
        let Ok(at) = OffsetDateTime::parse(instant, &Rfc3339) else {
            return;
        };
        if self.0.as_ref().is_none_or(|(max, _)| at > *max) {
            self.0 = Some((at, instant.to_owned()));
        }
    }

    pub(crate) fn observe(&mut self, resource: &Value) {
        if let Some(updated) = resource
            .get("meta")
            .and_then(|m| m.get("lastUpdated"))
            .and_then(Value::as_str)
        {
            self.offer(updated);
        }
    }

    pub(crate) fn current(&self) -> Option<String> {
        self.0.as_ref().map(|(_, s)| s.clone())
    }
}

struct Listing {
    next: Option<Url>,
    watermark: Watermark,
}

/// The pages of the search at `first` (a URL on the client's base): its matches (included
/// resources and OperationOutcome entries are left out). A match of another type than
/// `resource_type` is kept for the caller to refuse (a pull quarantines it with the reason)
/// rather than dropped unseen. Each page's watermark is the largest `meta.lastUpdated` of the
/// `resource_type` matches so far, starting from `since`.
pub fn search_pages<'a>(
    client: &'a EhrClient,
    first: Url,
    resource_type: &'a str,
    since: Option<&str>,
) -> PageStream<'a> {
    let state = Listing {
        next: Some(first),
        watermark: Watermark::starting_at(since),
    };
    Box::pin(stream::try_unfold(state, move |mut state| async move {
        let Some(url) = state.next.take() else {
            return Ok(None);
        };
        let request = OutboundRequest::get(url, OutboundAction::Search, Some(resource_type));
        let mut bundle = client.send_json(&request).await?;
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(AdapterError::Permanent(
                "a search page is not a Bundle".into(),
            ));
        }
        state.next = next_link(&bundle, client.base_url())?;
        let resources = bundle_resources(&mut bundle, resource_type);
        // A record of the wrong type says nothing about where the next pull starts.
        resources
            .iter()
            .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some(resource_type))
            .for_each(|r| state.watermark.observe(r));
        let page = Page {
            resources,
            watermark: state.watermark.current(),
        };
        Ok(Some((page, state)))
    }))
}

/// Takes the matches out of a searchset Bundle: entries of `resource_type`, and entries of any
/// other type that the EHR marks as matches (`search.mode` `match`). Included resources
/// (`search.mode` `include`, or another type without a mode, as servers that omit the mode
/// send `_include`s) and OperationOutcome entries are left out.
///
/// Dropping every entry of another type, as this once did, made a record the EHR calls a match
/// but of the wrong type vanish without trace; kept, it reaches the pull, which quarantines it
/// with its reason.
pub(crate) fn bundle_resources(bundle: &mut Value, resource_type: &str) -> Vec<Value> {
    let Some(Value::Array(entries)) = bundle.get_mut("entry").map(Value::take) else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|mut entry| {
            let mode = entry
                .get("search")
                .and_then(|s| s.get("mode"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let resource = entry.get_mut("resource").map(Value::take)?;
            let of_type = resource.get("resourceType").and_then(Value::as_str);
            let keep = of_type == Some(resource_type)
                || (of_type != Some("OperationOutcome") && mode.as_deref() == Some("match"));
            keep.then_some(resource)
        })
        .collect()
}

/// The Bundle's `next` link, when it is on `base`'s origin.
pub(crate) fn next_link(bundle: &Value, base: &Url) -> Result<Option<Url>, AdapterError> {
    let Some(next) = bundle
        .get("link")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))
        .and_then(|l| l.get("url"))
        .and_then(Value::as_str)
    else {
        return Ok(None);
    };
    let url = base
        .join(next)
        .map_err(|_| AdapterError::Permanent("a search page's next link is not a URL".into()))?;
    if !same_origin(&url, base) {
        return Err(AdapterError::Permanent(
            "a search page's next link is on another origin; not followed".into(),
        ));
    }
    Ok(Some(url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn origin_is_scheme_host_and_port() {
        let base = Url::parse("https://ehr.example/fhir").unwrap();
        let same = |s: &str| same_origin(&Url::parse(s).unwrap(), &base);
        assert!(same("https://ehr.example/fhir/Patient?page=2"));
        assert!(same("https://ehr.example:443/other"));
        assert!(!same("http://ehr.example/fhir"));
        assert!(!same("https://ehr.example:8443/fhir"));
        assert!(!same("https://evil.example/fhir"));
        assert!(!same("https://ehr.example.evil.example/fhir"));
    }

    #[test]
    fn next_links_are_followed_on_the_same_origin_only() {
        let base = Url::parse("https://ehr.example/fhir").unwrap();
        let bundle = |url: &str| {
            json!({"resourceType": "Bundle", "link": [
                {"relation": "self", "url": "https://ehr.example/fhir/Patient"},
                {"relation": "next", "url": url}
            ]})
        };
        assert_eq!(
            next_link(&bundle("https://ehr.example/fhir?page=2"), &base)
                .unwrap()
                .unwrap()
                .as_str(),
            "https://ehr.example/fhir?page=2"
        );
        assert!(matches!(
            next_link(&bundle("https://evil.example/fhir?page=2"), &base),
            Err(AdapterError::Permanent(m)) if !m.contains("evil")
        ));
        assert_eq!(
            next_link(&json!({"resourceType": "Bundle"}), &base).unwrap(),
            None
        );
    }

    #[test]
    fn marked_matches_of_another_type_are_kept_and_includes_and_outcomes_left_out() {
        let mut bundle = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Patient", "id": "a"}, "search": {"mode": "match"}},
            {"resource": {"resourceType": "Observation", "id": "b"}, "search": {"mode": "match"}},
            {"resource": {"resourceType": "Practitioner", "id": "c"}},
            {"resource": {"resourceType": "Organization", "id": "d"}, "search": {"mode": "include"}},
            {"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}},
            {"resource": {"resourceType": "OperationOutcome"}},
            {"fullUrl": "urn:uuid:no-resource"}
        ]});
        let kept = bundle_resources(&mut bundle, "Patient");
        let ids: Vec<&str> = kept.iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn the_watermark_is_the_latest_instant_whatever_its_offset() {
        let mut mark = Watermark::starting_at(Some("2024-01-01T00:00:00Z"));
        mark.offer("2024-01-01T03:00:00+05:00"); // 2023-12-31T22:00Z: older
        assert_eq!(mark.current().as_deref(), Some("2024-01-01T00:00:00Z"));
        mark.offer("2024-01-01T00:00:00.500Z");
        mark.offer("not a date");
        assert_eq!(mark.current().as_deref(), Some("2024-01-01T00:00:00.500Z"));
    }
}
