//! Content negotiation for the FHIR API (FHIR R4 http.html#mime-type): `_format` wins over
//! `Accept`; only JSON is served, so a client that accepts nothing JSON gets 406 with an
//! OperationOutcome (in JSON, the only format we have). `_pretty=true` pretty-prints. Bulk export
//! files are NDJSON, so their route also accepts an `Accept` of NDJSON.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, Header, Quality};
use actix_web::middleware::Next;
use actix_web::mime::Mime;
use actix_web::{Error, HttpMessage, ResponseError};

use crate::http::respond::Pretty;
use crate::http::ApiError;

/// `_format` values that mean FHIR JSON (R4 http.html#mime-type lists the short forms).
const JSON_FORMATS: &[&str] = &[
    "json",
    "application/json",
    "application/fhir+json",
    "application/json+fhir",
];

fn accepts_json(mime: &Mime) -> bool {
    let (ty, sub) = (mime.type_(), mime.subtype());
    match (ty.as_str(), sub.as_str()) {
        ("*", "*") | ("application", "*") => true,
        ("application", "json") | ("application", "json+fhir") => true,
        ("application", "fhir") => mime.suffix().map(|s| s.as_str()) == Some("json"),
        _ => false,
    }
}

/// Whether an `Accept` item names the NDJSON of bulk export files.
fn accepts_ndjson(mime: &Mime) -> bool {
    let (ty, sub) = (mime.type_(), mime.subtype());
    matches!(
        (ty.as_str(), sub.as_str(), mime.suffix().map(|s| s.as_str())),
        ("application", "ndjson", None) | ("application", "fhir", Some("ndjson"))
    )
}

pub(crate) enum Decision {
    Json { pretty: bool },
    NotAcceptable(&'static str),
}

/// Decides from the query string and the Accept header.
pub(crate) fn decide(query: &str, accept: Option<&header::Accept>) -> Decision {
    let mut pretty = false;
    let mut format: Option<String> = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "_format" => format = Some(value.into_owned()),
            "_pretty" => pretty = value == "true",
            _ => {}
        }
    }
    if let Some(format) = format {
        // A `_format` may carry parameters (`application/fhir+json;fhirVersion=4.0`).
        let base = format.split(';').next().unwrap_or_default().trim();
        return if JSON_FORMATS.contains(&base) {
            Decision::Json { pretty }
        } else {
            Decision::NotAcceptable("the requested _format is not supported; this server serves application/fhir+json only")
        };
    }
    match accept {
        None => Decision::Json { pretty },
        Some(accept) if accept.0.is_empty() => Decision::Json { pretty },
        Some(accept) => {
            let acceptable = accept
                .0
                .iter()
                .any(|item| item.quality > Quality::ZERO && accepts_json(&item.item));
            if acceptable {
                Decision::Json { pretty }
            } else {
                Decision::NotAcceptable("no acceptable media type in Accept; this server serves application/fhir+json only")
            }
        }
    }
}

/// An OperationOutcome in place of an error that is not one already: actix's own answers to
/// a body over the size limit (413), a body that cannot be read (400) and the like come as
/// plain text, and every FHIR error must be an OperationOutcome.
pub(crate) fn outcome_for_plain_error<B>(
    res: &ServiceResponse<B>,
) -> Option<actix_web::HttpResponse> {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let is_fhir = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/fhir+json"));
    if is_fhir {
        return None;
    }
    let (code, diagnostics) = match status.as_u16() {
        413 => (
            "too-long",
            "the request body is larger than this endpoint accepts (see the README, limits)",
        ),
        415 => (
            "not-supported",
            "unsupported Content-Type; send application/fhir+json",
        ),
        400..=499 => ("invalid", "the request could not be read"),
        _ => ("exception", "internal error"),
    };
    let issues = vec![serde_json::json!({
        "severity": "error",
        "code": code,
        "diagnostics": diagnostics,
    })];
    Some(
        ApiError::Invalid {
            status: status.as_u16(),
            issues,
        }
        .error_response(),
    )
}

pub async fn negotiate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    // An Accept header that does not parse is treated as absent (lenient, as browsers and
    // curl send well-formed ones).
    let accept = if req.headers().contains_key(header::ACCEPT) {
        header::Accept::parse(req.request()).ok()
    } else {
        None
    };
    let ndjson_file = crate::fhir::export::is_file_path(req.path())
        && accept.as_ref().is_some_and(|a| {
            a.0.iter()
                .any(|item| item.quality > Quality::ZERO && accepts_ndjson(&item.item))
        });
    let decision = if ndjson_file {
        Decision::Json { pretty: false }
    } else {
        decide(req.query_string(), accept.as_ref())
    };
    match decision {
        Decision::Json { pretty } => {
            if pretty {
                req.extensions_mut().insert(Pretty);
            }
            let res = next.call(req).await?;
            if let Some(outcome) = outcome_for_plain_error(&res) {
                return Ok(res.into_response(outcome).map_into_right_body());
            }
            Ok(res.map_into_left_body())
        }
        Decision::NotAcceptable(why) => Ok(req
            .into_response(ApiError::NotAcceptable(why.into()).error_response())
            .map_into_right_body()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{Accept, QualityItem};

    fn accept(values: &[&str]) -> Accept {
        Accept(
            values
                .iter()
                .map(|v| v.parse::<QualityItem<Mime>>().unwrap())
                .collect(),
        )
    }

    fn is_json(d: Decision) -> bool {
        matches!(d, Decision::Json { .. })
    }

    #[test]
    fn fhir_json_and_plain_json_are_acceptable() {
        assert!(is_json(decide(
            "",
            Some(&accept(&["application/fhir+json"]))
        )));
        assert!(is_json(decide("", Some(&accept(&["application/json"])))));
        assert!(is_json(decide(
            "",
            Some(&accept(&["text/html", "*/*;q=0.1"]))
        )));
        assert!(is_json(decide("", None)));
    }

    #[test]
    fn xml_only_is_not_acceptable() {
        assert!(!is_json(decide(
            "",
            Some(&accept(&["application/fhir+xml"]))
        )));
        assert!(!is_json(decide(
            "",
            Some(&accept(&["application/json;q=0"]))
        )));
    }

    #[test]
    fn format_parameter_overrides_accept() {
        assert!(is_json(decide(
            "_format=json",
            Some(&accept(&["application/fhir+xml"]))
        )));
        assert!(!is_json(decide(
            "_format=xml",
            Some(&accept(&["application/fhir+json"]))
        )));
        assert!(is_json(decide("_format=application%2Ffhir%2Bjson", None)));
    }

    #[test]
    fn ndjson_is_the_media_type_of_export_files_only() {
        let ndjson = |v: &str| accepts_ndjson(&v.parse::<Mime>().unwrap());
        assert!(ndjson("application/fhir+ndjson"));
        assert!(ndjson("application/ndjson"));
        assert!(!ndjson("application/fhir+json"));
        assert!(!is_json(decide(
            "",
            Some(&accept(&["application/fhir+ndjson"]))
        )));
    }

    #[test]
    fn pretty_is_recorded() {
        assert!(matches!(
            decide("_pretty=true", None),
            Decision::Json { pretty: true }
        ));
        assert!(matches!(
            decide("_pretty=false", None),
            Decision::Json { pretty: false }
        ));
    }
}
