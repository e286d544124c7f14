//! What a webhook request proves and says, as pure functions of its headers and body:
//! authentication (the Standard Webhooks signature, or the FHIR subscription's bearer token) and
//! parsing into the events to queue (a generic `patient.changed` event; an R4 rest-hook Patient
//! or id-only ping; an R4B/R5 or R4-backport notification Bundle). A notification queues each
//! patient it names once, however many of its events name it, so its inbox rows (and the EHR
//! fetches they cost) are bounded by the patients it names, not by its events.
//!
//! Nothing here logs, and no error carries a value from the request: errors are fixed phrases
//! naming the rule broken (a patient id or name must never reach a log or a client's error).

use std::collections::HashMap;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::store::SequenceMark;

/// The Standard Webhooks secret prefix: the key is the base64 of what follows.
const WHSEC_PREFIX: &str = "whsec_";
/// Longest event id, subscription reference or patient id accepted.
const MAX_ID_LEN: usize = 256;

/// Why a request is not authentic (401). The phrases are the client's diagnostic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no webhook authentication: send webhook-id, webhook-timestamp and webhook-signature (Standard Webhooks), or Authorization: Bearer with the subscription's header")]
    Missing,
    #[error("the {0} header is missing")]
    MissingHeader(&'static str),
    #[error("the {0} header is malformed")]
    MalformedHeader(&'static str),
    #[error("webhook-timestamp is outside the accepted tolerance; check the sender's clock")]
    Stale,
    /// Unknown or disabled connection, no secret configured, wrong signature or token: one
    /// phrase for all, so a caller learns nothing about which connections exist.
    #[error("the webhook could not be authenticated for this connection")]
    Refused,
}

/// Why an authentic request cannot be queued (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the body is not valid JSON")]
    Malformed,
    #[error("{0}")]
    Unknown(&'static str),
}

/// The HMAC key of a webhook secret: `whsec_` + base64 (Standard Webhooks), or else the secret's
/// UTF-8 bytes.
pub fn signing_key(secret: &str) -> Result<Zeroizing<Vec<u8>>, AuthError> {
    match secret.strip_prefix(WHSEC_PREFIX) {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map(Zeroizing::new)
            .map_err(|_| AuthError::Refused),
        None => Ok(Zeroizing::new(secret.as_bytes().to_vec())),
    }
}

/// The `webhook-timestamp` as unix seconds, refused when more than `tolerance_secs` away from
/// `now` either way (a replayed or delayed request).
pub fn check_timestamp(value: &str, now: i64, tolerance_secs: i64) -> Result<i64, AuthError> {
    let at: i64 = value
        .trim()
        .parse()
        .map_err(|_| AuthError::MalformedHeader("webhook-timestamp"))?;
    if now.abs_diff(at) > tolerance_secs.unsigned_abs() {
        return Err(AuthError::Stale);
    }
    Ok(at)
}

/// The Standard Webhooks signature of `{id}.{timestamp}.{body}`.
fn mac_of(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC-SHA256 takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Whether any `v1,<base64>` signature of the space-separated `header` is the signature of the
/// request under `key` (compared in constant time by `hmac`).
pub fn signature_matches(key: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    let mac = mac_of(key, id, timestamp, body);
    header
        .split(' ')
        .filter(|s| !s.is_empty())
        .any(|candidate| {
            let Some(("v1", encoded)) = candidate.split_once(',') else {
                return false;
            };
            match base64::engine::general_purpose::STANDARD.decode(encoded) {
                Ok(signature) => mac.clone().verify_slice(&signature).is_ok(),
                Err(_) => false,
            }
        })
}

/// The signature header value for a request (what a sender computes; tests and the bench).
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let tag = mac_of(key, id, timestamp, body).finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// Whether `Authorization: Bearer <token>` carries exactly `secret` (constant time).
pub fn bearer_matches(authorization: &str, secret: &str) -> bool {
    let Some((scheme, token)) = authorization.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && crate::crypto::constant_time_eq(token.trim().as_bytes(), secret.as_bytes())
}

/// Whether `id` is a usable event id (printable ASCII, not too long).
pub fn valid_event_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A FHIR id: `[A-Za-z0-9\-\.]{1,64}`.
fn fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// What the worker is asked to do for one event.
#[derive(Debug, Clone, PartialEq)]
pub enum EventAction {
    /// Upsert this patient: fetch it from the EHR, or use the resource the sender included.
    Patient {
        ehr_id: String,
        resource: Option<Value>,
    },
    /// Pull what changed since the connection's watermark.
    Resync,
}

/// One event of a request, under the id duplicates are recognised by.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_id: String,
    pub action: EventAction,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub events: Vec<Event>,
    /// The subscription's event numbers, for a FHIR subscription notification.
    pub sequence: Option<SequenceMark>,
    /// A handshake, heartbeat or query-status notification: answered 200, nothing queued
    /// (but a gap it reveals is).
    pub status_only: bool,
}

/// A generic event: `{"type": "patient.changed", "patient_id": "..."}`, its id the
/// `webhook-id` header.
pub fn parse_generic(event_id: &str, body: &[u8]) -> Result<Notification, ParseError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| ParseError::Malformed)?;
    let Value::Object(object) = value else {
        return Err(ParseError::Unknown("the event must be a JSON object"));
    };
    match object.get("type").and_then(Value::as_str) {
        Some("patient.changed") => {}
        Some(_) => {
            return Err(ParseError::Unknown(
                "unknown event type: only patient.changed is accepted",
            ))
        }
        None => return Err(ParseError::Unknown("the event has no type")),
    }
    let ehr_id = object
        .get("patient_id")
        .and_then(Value::as_str)
        .filter(|id| fhir_id(id))
        .ok_or(ParseError::Unknown(
            "patient_id must be the patient's FHIR id at the EHR ([A-Za-z0-9-.], 1 to 64 characters)",
        ))?;
    Ok(Notification {
        events: vec![Event {
            event_id: event_id.to_owned(),
            action: EventAction::Patient {
                ehr_id: ehr_id.to_owned(),
                resource: None,
            },
        }],
        sequence: None,
        status_only: false,
    })
}

/// A FHIR subscription notification: an empty body (R4 rest-hook without payload), a Patient
/// (R4 rest-hook with payload) or a notification Bundle (R4B/R5, or R4 with the backport's
/// Parameters status).
pub fn parse_fhir(body: &[u8]) -> Result<Notification, ParseError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        // An R4 rest-hook with no payload says only that something matched: pull.
        return Ok(Notification {
            events: vec![Event {
                event_id: format!("ping:{}", uuid::Uuid::new_v4()),
                action: EventAction::Resync,
            }],
            sequence: None,
            status_only: false,
        });
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| ParseError::Malformed)?;
    match value.get("resourceType").and_then(Value::as_str) {
        Some("Patient") => rest_hook_patient(value, body),
        Some("Bundle") => notification_bundle(&value, body),
        _ => Err(ParseError::Unknown(
            "expected a Patient (R4 rest-hook) or a subscription notification Bundle",
        )),
    }
}

/// `sha256:<hex>` of the body (and a position in it): the event id when the sender gives none.
fn body_hash(body: &[u8], position: Option<usize>) -> String {
    let digest = Sha256::digest(body);
    let mut out = String::with_capacity(7 + 64 + 8);
    out.push_str("sha256:");
    crate::crypto::push_hex(&mut out, &digest);
    if let Some(i) = position {
        out.push_str(&format!("#{i}"));
    }
    out
}

fn rest_hook_patient(resource: Value, body: &[u8]) -> Result<Notification, ParseError> {
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| fhir_id(id))
        .ok_or(ParseError::Unknown("the Patient has no valid id"))?
        .to_owned();
    let meta = resource.get("meta");
    let version = meta
        .and_then(|m| m.get("versionId"))
        .and_then(Value::as_str);
    let updated = meta
        .and_then(|m| m.get("lastUpdated"))
        .and_then(Value::as_str);
    let event_id = match (version, updated) {
        (Some(v), _) => format!("Patient/{id}/_history/{v}"),
        (None, Some(at)) => format!("Patient/{id}@{at}"),
        (None, None) => body_hash(body, None),
    };
    Ok(Notification {
        events: vec![Event {
            event_id,
            action: EventAction::Patient {
                ehr_id: id,
                resource: Some(resource),
            },
        }],
        sequence: None,
        status_only: false,
    })
}

/// An event number: a string (integer64 in R4B/R5, valueString in the R4 backport) or a number.
fn number(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
    .filter(|n| *n >= 0)
}

/// One `notificationEvent` of a status, whichever FHIR version it is written in.
struct StatusEvent<'a> {
    number: Option<i64>,
    focus: Option<&'a str>,
}

/// The subscription status of a notification, read from an R4B/R5 `SubscriptionStatus` or an R4
/// backport `Parameters` (http://hl7.org/fhir/uv/subscriptions-backport).
struct Status<'a> {
    subscription: Option<&'a str>,
    kind: Option<&'a str>,
    events_since_start: Option<i64>,
    events: Vec<StatusEvent<'a>>,
}

fn status_of(resource: &Value) -> Option<Status<'_>> {
    match resource.get("resourceType").and_then(Value::as_str)? {
        "SubscriptionStatus" => Some(Status {
            subscription: resource
                .get("subscription")
                .and_then(|s| s.get("reference"))
                .and_then(Value::as_str),
            kind: resource.get("type").and_then(Value::as_str),
            events_since_start: number(resource.get("eventsSinceSubscriptionStart")),
            events: resource
                .get("notificationEvent")
                .and_then(Value::as_array)
                .map(|events| {
                    events
                        .iter()
                        .map(|e| StatusEvent {
                            number: number(e.get("eventNumber")),
                            focus: e
                                .get("focus")
                                .and_then(|f| f.get("reference"))
                                .and_then(Value::as_str),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }),
        "Parameters" => {
            let params = resource.get("parameter").and_then(Value::as_array)?;
            let named = |name: &'static str| {
                params
                    .iter()
                    .filter(move |p| p.get("name").and_then(Value::as_str) == Some(name))
            };
            let part = |p: &'_ Value, name: &str| -> Option<Value> {
                p.get("part")
                    .and_then(Value::as_array)?
                    .iter()
                    .find(|q| q.get("name").and_then(Value::as_str) == Some(name))
                    .cloned()
            };
            let mut events = Vec::new();
            for p in named("notification-event") {
                let parts = p.get("part").and_then(Value::as_array);
                let focus = parts.and_then(|parts| {
                    parts
                        .iter()
                        .find(|q| q.get("name").and_then(Value::as_str) == Some("focus"))
                        .and_then(|q| q.get("valueReference"))
                        .and_then(|r| r.get("reference"))
                        .and_then(Value::as_str)
                });
                let number = part(p, "event-number")
                    .and_then(|q| number(q.get("valueString").or_else(|| q.get("valueInteger"))));
                events.push(StatusEvent { number, focus });
            }
            Some(Status {
                subscription: named("subscription")
                    .next()
                    .and_then(|p| p.get("valueReference"))
                    .and_then(|r| r.get("reference"))
                    .and_then(Value::as_str),
                kind: named("type")
                    .next()
                    .and_then(|p| p.get("valueCode"))
                    .and_then(Value::as_str),
                events_since_start: named("events-since-subscription-start")
                    .next()
                    .and_then(|p| number(p.get("valueString").or_else(|| p.get("valueInteger")))),
                events,
            })
        }
        _ => None,
    }
}

/// The patient id of a focus reference (`Patient/1`, `https://ehr/fhir/Patient/1`,
/// `Patient/1/_history/2`); `None` when it names another type.
fn patient_of(reference: &str) -> Option<&str> {
    let segments: Vec<&str> = reference.split('/').collect();
    let at = segments.iter().rposition(|s| *s == "Patient")?;
    segments.get(at + 1).copied().filter(|id| fhir_id(id))
}

/// A followed patient's EHR id, and the Patient the notification carries for it.
type Focus<'a> = (&'a str, Option<&'a Value>);

fn notification_bundle(bundle: &Value, body: &[u8]) -> Result<Notification, ParseError> {
    match bundle.get("type").and_then(Value::as_str) {
        Some("history" | "subscription-notification") => {}
        _ => {
            return Err(ParseError::Unknown(
                "a notification Bundle has type history (R4/R4B) or subscription-notification (R5)",
            ))
        }
    }
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .filter(|e| !e.is_empty())
        .ok_or(ParseError::Unknown(
            "the notification Bundle has no entries",
        ))?;
    let status = entries[0].get("resource").and_then(status_of).ok_or(ParseError::Unknown(
        "the first entry of a notification Bundle must be a SubscriptionStatus (R4B/R5) or a backport Parameters (R4)",
    ))?;
    let subscription =
        status
            .subscription
            .filter(|s| valid_event_id(s))
            .ok_or(ParseError::Unknown(
                "the subscription status names no subscription",
            ))?;
    let kind = status.kind.ok_or(ParseError::Unknown(
        "the subscription status has no notification type",
    ))?;
    let numbers = status.events.iter().filter_map(|e| e.number);
    let first = numbers.clone().min();
    let through = status
        .events_since_start
        .into_iter()
        .chain(numbers)
        .max()
        .unwrap_or(0);
    let sequence = Some(SequenceMark {
        subscription: subscription.to_owned(),
        first,
        through,
    });
    match kind {
        "handshake" | "heartbeat" | "query-status" => {
            return Ok(Notification {
                events: Vec::new(),
                sequence,
                status_only: true,
            })
        }
        "event-notification" => {}
        _ => {
            return Err(ParseError::Unknown(
                "unknown notification type: expected handshake, heartbeat, event-notification or query-status",
            ))
        }
    }
    // Full-resource payloads: the Patients carried in the further entries, by `fullUrl` and by
    // id (the first of each), looked up once per event rather than searched for.
    let mut by_url: HashMap<&str, &Value> = HashMap::new();
    let mut by_id: HashMap<&str, &Value> = HashMap::new();
    for entry in &entries[1..] {
        let Some(resource) = entry
            .get("resource")
            .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("Patient"))
        else {
            continue;
        };
        if let Some(url) = entry.get("fullUrl").and_then(Value::as_str) {
            by_url.entry(url).or_insert(resource);
        }
        if let Some(id) = resource.get("id").and_then(Value::as_str) {
            by_id.entry(id).or_insert(resource);
        }
    }
    let event_id = |number: Option<i64>, position: usize| match number {
        Some(n) => format!("{subscription}#{n}"),
        None => body_hash(body, Some(position)),
    };
    // One event per patient, and one pull for all `empty` events: a notification naming the
    // same patient in thousands of events queues (and fetches, and seals) that patient once,
    // under the last event's id and with the last payload carried for it. Resources are
    // borrowed until then, and cloned once each.
    let mut queued: Vec<(String, Option<Focus<'_>>)> = Vec::new();
    let mut position: HashMap<Option<&str>, usize> = HashMap::new();
    for (i, event) in status.events.iter().enumerate() {
        let id = event_id(event.number, i);
        // No focus: an `empty` payload, something happened and nothing says what (a pull).
        let patient = match event.focus {
            None => None,
            Some(reference) => {
                let by_reference = by_url.get(reference).copied();
                let ehr_id = match patient_of(reference) {
                    Some(id) => id,
                    None => match by_reference
                        .and_then(|r| r.get("id"))
                        .and_then(Value::as_str)
                    {
                        Some(id) if fhir_id(id) => id,
                        // The focus is not a Patient: this gateway follows patients only.
                        _ => continue,
                    },
                };
                Some((ehr_id, by_reference.or_else(|| by_id.get(ehr_id).copied())))
            }
        };
        match position.get(&patient.map(|(ehr_id, _)| ehr_id)) {
            Some(&at) => {
                let (kept_id, kept) = &mut queued[at];
                *kept_id = id;
                if let (Some((_, kept)), Some((_, Some(resource)))) = (kept, patient) {
                    *kept = Some(resource);
                }
            }
            None => {
                position.insert(patient.map(|(ehr_id, _)| ehr_id), queued.len());
                queued.push((id, patient));
            }
        }
    }
    let mut events: Vec<Event> = queued
        .into_iter()
        .map(|(event_id, patient)| Event {
            event_id,
            action: match patient {
                Some((ehr_id, resource)) => EventAction::Patient {
                    ehr_id: ehr_id.to_owned(),
                    resource: resource.cloned(),
                },
                None => EventAction::Resync,
            },
        })
        .collect();
    if status.events.is_empty() {
        // An event notification without events (`empty` content in R4B): pull.
        events.push(Event {
            event_id: event_id(status.events_since_start, 0),
            action: EventAction::Resync,
        });
    }
    Ok(Notification {
        events,
        sequence,
        status_only: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    #[test]
    fn a_whsec_secret_is_the_base64_of_its_key_and_any_other_its_utf8_bytes() {
        let key = signing_key(SECRET).unwrap();
        assert_eq!(key.len(), 24);
        assert_eq!(
            signing_key("plain-secret-of-16+").unwrap().as_slice(),
            b"plain-secret-of-16+"
        );
        assert_eq!(signing_key("whsec_***"), Err(AuthError::Refused));
    }

    #[test]
    fn a_known_answer_signature_verifies_and_any_listed_signature_may_match() {
        // A known-answer vector, computed independently (Python's hmac over
        // `{id}.{timestamp}.{body}` with the base64-decoded key).
        let key = signing_key(SECRET).unwrap();
        let body = br#"{"test": 2432232314}"#;
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let ts = "1614265330";
        let expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(sign(&key, id, ts, body), expected);
        assert!(signature_matches(&key, id, ts, body, expected));
        assert!(signature_matches(
            &key,
            id,
            ts,
            body,
            &format!("v1,bm90IGl0 v2,xyz {expected}")
        ));
        assert!(!signature_matches(&key, id, ts, b"{}", expected));
        assert!(!signature_matches(&key, id, "1614265331", body, expected));
        assert!(!signature_matches(&key, id, ts, body, "v1,not base64!"));
        assert!(!signature_matches(&key, id, ts, body, ""));
    }

    #[test]
    fn a_timestamp_more_than_the_tolerance_away_is_stale() {
        assert_eq!(check_timestamp("1000", 1200, 300), Ok(1000));
        assert_eq!(check_timestamp("1500", 1200, 300), Ok(1500));
        assert_eq!(check_timestamp("899", 1200, 300), Err(AuthError::Stale));
        assert_eq!(check_timestamp("1501", 1200, 300), Err(AuthError::Stale));
        assert_eq!(
            check_timestamp("yesterday", 1200, 300),
            Err(AuthError::MalformedHeader("webhook-timestamp"))
        );
    }

    #[test]
    fn a_bearer_token_must_equal_the_secret() {
        assert!(bearer_matches(
            "Bearer s3cret-token-123456",
            "s3cret-token-123456"
        ));
        assert!(bearer_matches(
            "bearer s3cret-token-123456",
            "s3cret-token-123456"
        ));
        assert!(!bearer_matches(
            "Bearer s3cret-token-12345",
            "s3cret-token-123456"
        ));
        assert!(!bearer_matches(
            "Basic s3cret-token-123456",
            "s3cret-token-123456"
        ));
        assert!(!bearer_matches(
            "s3cret-token-123456",
            "s3cret-token-123456"
        ));
    }

    #[test]
    fn a_generic_event_names_one_patient() {
        let n =
            parse_generic("evt-1", br#"{"type":"patient.changed","patient_id":"p-1"}"#).unwrap();
        assert_eq!(
            n.events,
            vec![Event {
                event_id: "evt-1".into(),
                action: EventAction::Patient {
                    ehr_id: "p-1".into(),
                    resource: None
                }
            }]
        );
        assert_eq!(parse_generic("e", b"{not json"), Err(ParseError::Malformed));
        for bad in [
            json!({"type": "patient.deleted", "patient_id": "p"}),
            json!({"patient_id": "p"}),
            json!({"type": "patient.changed", "patient_id": "has space"}),
            json!({"type": "patient.changed", "patient_id": 7}),
            json!(["patient.changed"]),
        ] {
            assert!(
                matches!(
                    parse_generic("e", bad.to_string().as_bytes()),
                    Err(ParseError::Unknown(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_r4_rest_hook_patient_is_its_own_payload_and_its_version_the_event_id() {
        let body = json!({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "3"}});
        let n = parse_fhir(body.to_string().as_bytes()).unwrap();
        assert_eq!(n.events[0].event_id, "Patient/p1/_history/3");
        assert!(matches!(
            &n.events[0].action,
            EventAction::Patient { ehr_id, resource: Some(_) } if ehr_id == "p1"
        ));
        let body = json!({"resourceType": "Patient", "id": "p1"}).to_string();
        let n = parse_fhir(body.as_bytes()).unwrap();
        assert!(n.events[0].event_id.starts_with("sha256:"));
        let ping = parse_fhir(b"").unwrap();
        assert_eq!(ping.events[0].action, EventAction::Resync);
        assert!(matches!(
            parse_fhir(br#"{"resourceType":"Observation"}"#),
            Err(ParseError::Unknown(_))
        ));
    }

    /// The R4 backport's id-only example (Bundle r4-notification-id-only), with a Patient focus.
    fn r4_backport(kind: &str, since: &str, events: &[(&str, &str)]) -> Value {
        let mut parameter = vec![
            json!({"name": "subscription", "valueReference": {"reference": "https://example.org/fhir/Subscription/admission"}}),
            json!({"name": "topic", "valueCanonical": "http://hl7.org/SubscriptionTopic/admission"}),
            json!({"name": "status", "valueCode": "active"}),
            json!({"name": "type", "valueCode": kind}),
            json!({"name": "events-since-subscription-start", "valueString": since}),
        ];
        for (number, focus) in events {
            parameter.push(json!({"name": "notification-event", "part": [
                {"name": "event-number", "valueString": number},
                {"name": "timestamp", "valueInstant": "2020-05-29T11:44:13.1882432-05:00"},
                {"name": "focus", "valueReference": {"reference": focus}},
            ]}));
        }
        json!({
            "resourceType": "Bundle",
            "id": "r4-notification-id-only",
            "type": "history",
            "timestamp": "2020-05-29T11:44:13.1882432-05:00",
            "entry": [{
                "fullUrl": "urn:uuid:292d3c72-edc1-4d8a-afaa-d85e19c7f563",
                "resource": {"resourceType": "Parameters", "id": "292d3c72-edc1-4d8a-afaa-d85e19c7f563", "parameter": parameter},
                "request": {"method": "GET", "url": "https://example.org/fhir/Subscription/admission/$status"},
                "response": {"status": "200"}
            }]
        })
    }

    #[test]
    fn an_r4_backport_notification_reads_its_parameters() {
        let body = r4_backport(
            "event-notification",
            "2",
            &[("2", "https://example.org/fhir/Patient/p-9")],
        );
        let n = parse_fhir(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            n.events,
            vec![Event {
                event_id: "https://example.org/fhir/Subscription/admission#2".into(),
                action: EventAction::Patient {
                    ehr_id: "p-9".into(),
                    resource: None
                }
            }]
        );
        assert_eq!(
            n.sequence,
            Some(SequenceMark {
                subscription: "https://example.org/fhir/Subscription/admission".into(),
                first: Some(2),
                through: 2
            })
        );
        let heartbeat =
            parse_fhir(r4_backport("heartbeat", "2", &[]).to_string().as_bytes()).unwrap();
        assert!(heartbeat.status_only && heartbeat.events.is_empty());
        // An Encounter focus is not followed.
        let encounter = r4_backport(
            "event-notification",
            "3",
            &[("3", "https://example.org/fhir/Encounter/86009987")],
        );
        let n = parse_fhir(encounter.to_string().as_bytes()).unwrap();
        assert!(n.events.is_empty() && !n.status_only);
    }

    #[test]
    fn a_patient_named_by_many_events_is_queued_once_under_the_last_event() {
        let focus = "https://example.org/fhir/Patient/p-9";
        let numbers: Vec<String> = (1..=2000).map(|n| n.to_string()).collect();
        let mut events: Vec<(&str, &str)> = numbers.iter().map(|n| (n.as_str(), focus)).collect();
        events.insert(1, ("0", "Patient/p-2"));
        let mut body = r4_backport("event-notification", "2000", &events);
        let carried = json!({"resourceType": "Patient", "id": "p-9", "gender": "other"});
        body["entry"]
            .as_array_mut()
            .unwrap()
            .push(json!({"fullUrl": focus, "resource": carried}));
        let n = parse_fhir(body.to_string().as_bytes()).unwrap();
        let subscription = "https://example.org/fhir/Subscription/admission";
        assert_eq!(
            n.events,
            vec![
                Event {
                    event_id: format!("{subscription}#2000"),
                    action: EventAction::Patient {
                        ehr_id: "p-9".into(),
                        resource: Some(carried)
                    }
                },
                Event {
                    event_id: format!("{subscription}#0"),
                    action: EventAction::Patient {
                        ehr_id: "p-2".into(),
                        resource: None
                    }
                },
            ]
        );
        assert_eq!(n.sequence.unwrap().through, 2000);
        // Events without a focus ask for one pull, not one each.
        let mut empty = r4_backport("event-notification", "3", &[]);
        let parameters = empty["entry"][0]["resource"]["parameter"]
            .as_array_mut()
            .unwrap();
        for number in ["1", "2", "3"] {
            parameters.push(json!({"name": "notification-event", "part": [
                {"name": "event-number", "valueString": number}]}));
        }
        let n = parse_fhir(empty.to_string().as_bytes()).unwrap();
        assert_eq!(
            n.events,
            vec![Event {
                event_id: format!("{subscription}#3"),
                action: EventAction::Resync
            }]
        );
    }

    #[test]
    fn a_notification_of_unknown_shape_is_refused() {
        for bad in [
            json!({"resourceType": "Bundle", "type": "searchset", "entry": [{}]}),
            json!({"resourceType": "Bundle", "type": "history", "entry": []}),
            json!({"resourceType": "Bundle", "type": "history", "entry": [{"resource": {"resourceType": "Patient"}}]}),
            r4_backport("surprise", "1", &[]),
        ] {
            assert!(
                matches!(
                    parse_fhir(bad.to_string().as_bytes()),
                    Err(ParseError::Unknown(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(
            parse_fhir(b"{\"resourceType\":"),
            Err(ParseError::Malformed)
        );
    }

    #[test]
    fn focus_references_name_a_patient_in_any_form() {
        assert_eq!(patient_of("Patient/1"), Some("1"));
        assert_eq!(
            patient_of("https://ehr.example/fhir/Patient/a.b-c"),
            Some("a.b-c")
        );
        assert_eq!(patient_of("Patient/1/_history/2"), Some("1"));
        assert_eq!(patient_of("Encounter/1"), None);
        assert_eq!(patient_of("Patient/"), None);
    }
}
