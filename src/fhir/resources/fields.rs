//! Reading search values out of a resource's JSON: the small helpers every [`super::Kind`]'s
//! extractors are made of.

use serde_json::Value;

use super::search::SystemValue;

/// The strings of an element that is a string or an array of strings.
pub fn strings(value: Option<&Value>) -> impl Iterator<Item = &str> {
    items(value).iter().filter_map(Value::as_str)
}

/// An element's values: the array's items, or the one value of a single-valued element.
pub fn items(value: Option<&Value>) -> &[Value] {
    match value {
        Some(Value::Array(items)) => items,
        Some(one) => std::slice::from_ref(one),
        None => &[],
    }
}

/// The (system, value) of each `identifier` that has a value.
pub fn identifiers(resource: &Value) -> Vec<SystemValue> {
    items(resource.get("identifier"))
        .iter()
        .filter_map(|i| {
            let value = i.get("value")?.as_str()?;
            let system = i.get("system").and_then(Value::as_str).map(str::to_owned);
            Some((system, value.to_owned()))
        })
        .collect()
}

/// The `part` strings (`family`, `given`...) of every HumanName in `name`.
pub fn name_parts(resource: &Value, parts: &[&str]) -> Vec<String> {
    items(resource.get("name"))
        .iter()
        .flat_map(|n| parts.iter().flat_map(move |part| strings(n.get(*part))))
        .map(str::to_owned)
        .collect()
}

/// A code element as a one-or-none list (`gender`, `status`).
pub fn code(resource: &Value, element: &str) -> Vec<String> {
    resource
        .get(element)
        .and_then(Value::as_str)
        .map(|c| vec![c.to_owned()])
        .unwrap_or_default()
}

/// The id a Reference names when it points at a resource of type `target`: `Patient/123`,
/// `https://any.base/fhir/r4/Patient/123` or `Patient/123/_history/2` give `123`; contained
/// (`#p1`), logical-only (identifier) and `urn:` references give nothing.
pub fn reference_id(reference: &Value, target: &str) -> Option<String> {
    let text = reference.get("reference")?.as_str()?;
    if text.starts_with('#') || text.starts_with("urn:") {
        return None;
    }
    let path = match text.find("/_history/") {
        Some(at) => &text[..at],
        None => text,
    };
    let (before, id) = path.rsplit_once('/')?;
    let ty = before.rsplit('/').next()?;
    (ty == target && !id.is_empty()).then(|| id.to_owned())
}

/// The ids of every Reference to `target` in `element` (a Reference or an array of them).
pub fn reference_ids(resource: &Value, element: &str, target: &str) -> Vec<String> {
    items(resource.get(element))
        .iter()
        .filter_map(|r| reference_id(r, target))
        .collect()
}

/// The interval of a dateTime element (microseconds, end exclusive), if present and valid.
pub fn date_time_range(resource: &Value, element: &str) -> Vec<(i64, i64)> {
    resource
        .get(element)
        .and_then(Value::as_str)
        .and_then(super::search::date_range_us)
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_name_their_id_only_for_the_target_type() {
        let r = |s: &str| json!({ "reference": s });
        assert_eq!(
            reference_id(&r("Patient/123"), "Patient").as_deref(),
            Some("123")
        );
        assert_eq!(
            reference_id(&r("https://ehr.example/fhir/r4/Patient/a-1"), "Patient").as_deref(),
            Some("a-1")
        );
        assert_eq!(
            reference_id(&r("Patient/123/_history/4"), "Patient").as_deref(),
            Some("123")
        );
        assert_eq!(reference_id(&r("Practitioner/123"), "Patient"), None);
        assert_eq!(reference_id(&r("#p1"), "Patient"), None);
        assert_eq!(reference_id(&r("urn:uuid:5f7d"), "Patient"), None);
        assert_eq!(reference_id(&json!({ "display": "x" }), "Patient"), None);
        assert_eq!(reference_id(&r("Patient/"), "Patient"), None);
    }

    #[test]
    fn names_and_identifiers_are_read_from_every_entry() {
        let p = json!({
            "name": [
                { "family": "Chalmers", "given": ["Peter", "James"], "prefix": ["Mr"] },
                { "text": "Jim", "given": ["Jim"] }
            ],
            "identifier": [{ "system": "urn:mrn", "value": "12345" }, { "value": "x" }, { "system": "urn:none" }]
        });
        assert_eq!(name_parts(&p, &["family"]), ["Chalmers"]);
        assert_eq!(name_parts(&p, &["given"]), ["Peter", "James", "Jim"]);
        assert_eq!(
            identifiers(&p),
            [
                (Some("urn:mrn".to_owned()), "12345".to_owned()),
                (None, "x".to_owned())
            ]
        );
    }
}
