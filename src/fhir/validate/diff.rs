//! What the typed model silently dropped or changed: the JSON a client sent against the JSON the
//! model writes back. fhir-sdk ignores unknown fields (no `deny_unknown_fields`, and its structs
//! with choice elements use `#[serde(flatten)]`, which could not deny them anyway), so a key the
//! model did not write back is an element it does not know, or a choice element whose value it
//! swallowed (serde drops a failing `Option` of a flattened enum without an error).
//!
//! Keys are compared, never number text: decimals are `f64` in fhir-sdk (`140` comes back
//! `140.0`). Strings must come back as sent, except dates and times fhir-sdk writes in another
//! valid form (`+00:00` as `Z`, `.500` as `.5`).

use fhir_sdk::r4b::types::FieldExtension;
use serde_json::{Map, Value};

use super::de::{is_element_name, Kind, Path};
use super::model::{check_choice, check_typed, choice_split};
use super::{IssueCode, Issues};

pub(super) fn compare(
    sent: &Value,
    back: &Value,
    path: &Path<'_>,
    top: &Value,
    issues: &mut Issues,
) {
    match (sent, back) {
        (Value::Object(sent), Value::Object(back)) => object(sent, back, path, top, issues),
        (Value::Array(sent), Value::Array(back)) => {
            for (i, (s, b)) in sent.iter().zip(back).enumerate() {
                compare(s, b, &Path::Index(path, i), top, issues);
            }
        }
        (Value::String(s), Value::String(b)) => {
            if s.is_empty() {
                issues.push(
                    IssueCode::Value,
                    path.render(),
                    "an empty string is not allowed (leave the element out)",
                );
            } else if s != b && !is_fhir_temporal(s) && !is_spaced_base64(s, b) {
                // Read leniently, written in FHIR form: the sent text is not that form.
                let kind = if b.contains(':') {
                    Kind::BadInstantOrTime
                } else {
                    Kind::BadDate
                };
                issues.push_kind(&kind, path.render());
            }
        }
        _ => {}
    }
}

fn object(
    sent: &Map<String, Value>,
    back: &Map<String, Value>,
    path: &Path<'_>,
    top: &Value,
    issues: &mut Issues,
) {
    if sent.is_empty() {
        issues.push(
            IssueCode::Structure,
            path.render(),
            "an empty object is not allowed (leave the element out)",
        );
        return;
    }
    for (key, value) in sent {
        if !is_element_name(key) {
            // Not echoed: only names shaped like FHIR element names go into an expression.
            issues.push(
                IssueCode::Structure,
                path.render(),
                "an element whose name is not a FHIR element name",
            );
            continue;
        }
        let here = Path::Key(path, key);
        match value {
            Value::Null => {
                issues.push(
                    IssueCode::Structure,
                    here.render(),
                    "null is not allowed here (leave the element out)",
                );
                continue;
            }
            Value::Array(items) if items.is_empty() => {
                issues.push(
                    IssueCode::Structure,
                    here.render(),
                    "an empty array is not allowed (leave the element out)",
                );
                continue;
            }
            Value::Array(items) => paired_nulls(key, items, sent, &here, issues),
            _ => {}
        }
        match back.get(key) {
            Some(b) => {
                if let Some(element) = key.strip_prefix('_') {
                    // `_x` holds the id and extensions of a primitive `x` (R4 JSON). fhir-sdk
                    // models `_x` beside every element, complex ones too, so check the shape.
                    if back.get(element).is_some_and(|x| !is_primitive(x)) {
                        issues.push(
                            IssueCode::Structure,
                            here.render(),
                            "unknown element (only a primitive element has a `_` sibling)",
                        );
                        continue;
                    }
                    if let (Some(Value::Array(x)), Value::Array(ext)) = (sent.get(element), value) {
                        if x.len() != ext.len() {
                            issues.push(
                                IssueCode::Structure,
                                here.render(),
                                "must have exactly one item for each item of its primitive element",
                            );
                        }
                    }
                }
                compare(value, b, &here, top, issues);
            }
            None => dropped(key, value, back, &here, top, issues),
        }
    }
}

/// A key the model did not write back.
fn dropped(
    key: &str,
    value: &Value,
    back: &Map<String, Value>,
    here: &Path<'_>,
    top: &Value,
    issues: &mut Issues,
) {
    // R4 gives a resource's `implicitRules` and `language` (primitives) their `_` siblings;
    // fhir-sdk 0.16's R4B resources do not model those two, so read them on their own.
    if (key == "_implicitRules" || key == "_language") && back.contains_key("resourceType") {
        check_typed::<FieldExtension>(value, here, top, issues);
        return;
    }
    if let Some((stem, _)) = choice_split(key) {
        let before = issues.len();
        check_choice(key, value, here, top, issues);
        if issues.len() > before {
            return;
        }
        let is_ext = key.starts_with('_');
        let sibling = back.keys().any(|k| {
            k != key
                && k.starts_with('_') == is_ext
                && choice_split(k).is_some_and(|(s, _)| s == stem)
        });
        if sibling {
            issues.push(
                IssueCode::Structure,
                here.render(),
                "only one type of a choice element may be present",
            );
            return;
        }
        issues.push(IssueCode::Structure, here.render(), NOT_THIS_TYPE);
        return;
    }
    issues.push(IssueCode::Structure, here.render(), "unknown element");
}

/// A choice element's name with a type it may not take here, or no such element at all.
pub(super) const NOT_THIS_TYPE: &str =
    "unknown element (or a type its choice element does not take)";

/// In R4 JSON a `null` item is only a placeholder: it lines up a primitive array with its `_`
/// sibling (`"given": ["Jo", null]` with `"_given": [null, {"extension": ...}]`). fhir-sdk reads
/// `null` items of any array as absent.
fn paired_nulls(
    key: &str,
    items: &[Value],
    sent: &Map<String, Value>,
    here: &Path<'_>,
    issues: &mut Issues,
) {
    let sibling = match key.strip_prefix('_') {
        Some(element) => sent.get(element),
        None => sent.get(&format!("_{key}")),
    }
    .and_then(Value::as_array);
    for (i, item) in items.iter().enumerate() {
        let filled = sibling.and_then(|s| s.get(i)).is_some_and(|s| !s.is_null());
        if item.is_null() && !filled {
            issues.push(
                IssueCode::Structure,
                Path::Index(here, i).render(),
                "null is only allowed as a placeholder matched by the `_` sibling array",
            );
        }
    }
}

/// fhir-sdk drops the whitespace FHIR allows in base64Binary before decoding.
fn is_spaced_base64(sent: &str, back: &str) -> bool {
    sent.chars().filter(|c| !c.is_whitespace()).eq(back.chars())
}

fn is_primitive(value: &Value) -> bool {
    match value {
        Value::Array(items) => items
            .iter()
            .all(|i| !matches!(i, Value::Array(_) | Value::Object(_))),
        Value::Object(_) => false,
        _ => true,
    }
}

/// Whether `s` is a FHIR date, dateTime, instant or time, in the lexical forms of
/// <https://hl7.org/fhir/R4/datatypes.html#primitive>.
pub(super) fn is_fhir_temporal(s: &str) -> bool {
    is_date_time(s) || is_time(s)
}

fn digits(s: &str, n: usize) -> Option<(u32, &str)> {
    let head = s.get(..n)?;
    if !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((head.parse().ok()?, &s[n..]))
}

/// date `YYYY[-MM[-DD]]`, dateTime `YYYY-MM-DDThh:mm:ss[.f+](Z|±hh:mm)` (instant is the latter).
fn is_date_time(s: &str) -> bool {
    let Some((year, rest)) = digits(s, 4) else {
        return false;
    };
    if year == 0 {
        return false;
    }
    let Some(rest) = rest.strip_prefix('-') else {
        return rest.is_empty();
    };
    let Some((month, rest)) = digits(rest, 2) else {
        return false;
    };
    if !(1..=12).contains(&month) {
        return false;
    }
    let Some(rest) = rest.strip_prefix('-') else {
        return rest.is_empty();
    };
    let Some((day, rest)) = digits(rest, 2) else {
        return false;
    };
    if !(1..=31).contains(&day) {
        return false;
    }
    let Some(rest) = rest.strip_prefix('T') else {
        return rest.is_empty();
    };
    let Some(zone) = time_prefix(rest) else {
        return false;
    };
    if zone == "Z" {
        return true;
    }
    let Some(offset) = zone.strip_prefix(['+', '-']) else {
        return false;
    };
    match (
        digits(offset, 2),
        offset.get(2..3),
        offset.get(3..).and_then(|m| digits(m, 2)),
    ) {
        (Some((h, _)), Some(":"), Some((m, ""))) => (h <= 13 && m <= 59) || (h == 14 && m == 0),
        _ => false,
    }
}

/// time `hh:mm:ss[.f+]`.
fn is_time(s: &str) -> bool {
    time_prefix(s).is_some_and(str::is_empty)
}

/// Reads `hh:mm:ss[.f+]` and returns what follows.
fn time_prefix(s: &str) -> Option<&str> {
    let (h, rest) = digits(s, 2)?;
    let (m, rest) = digits(rest.strip_prefix(':')?, 2)?;
    let (sec, rest) = digits(rest.strip_prefix(':')?, 2)?;
    if h > 23 || m > 59 || sec > 60 {
        return None;
    }
    match rest.strip_prefix('.') {
        Some(fraction) => {
            let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
            (n > 0).then(|| &fraction[n..])
        }
        None => Some(rest),
    }
}
