//! Official examples pass; mutated ones fail at the right element, never quoting the value.
//!
//! The shared fixtures are `../shared/fixtures/r4-examples` (HL7 FHIR R4 4.0.1 examples). The
//! files in `testdata/` come from the same package (`hl7.fhir.r4.examples` 4.0.1 on npm): the
//! Group examples, which the shared fixtures lack, and the canonical `Patient-example.json`.

use std::path::{Path as FsPath, PathBuf};

use serde_json::{json, Value};

use super::diff::NOT_THIS_TYPE;
use super::{model, validate, Issue, IssueCode};

const SERVED: [&str; 8] = [
    "Patient",
    "Practitioner",
    "Organization",
    "Coverage",
    "Encounter",
    "Claim",
    "ClaimResponse",
    "Group",
];

fn shared_examples() -> PathBuf {
    FsPath::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/r4-examples")
}

fn testdata() -> PathBuf {
    FsPath::new(env!("CARGO_MANIFEST_DIR")).join("src/fhir/validate/testdata")
}

/// The JSON files of `dirs` as (file name, resource).
fn examples(dirs: &[PathBuf]) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for dir in dirs {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable example");
            let value: Value = serde_json::from_str(&text).expect("an example is JSON");
            let name = path
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            out.push((name, value));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn example(name: &str) -> Value {
    let path = [testdata(), shared_examples()]
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no example {name}"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("readable")).expect("JSON")
}

fn resource_type(value: &Value) -> &str {
    value["resourceType"].as_str().expect("a resourceType")
}

/// The issues of an invalid resource, as (expression, code, diagnostics).
fn issues(value: &Value) -> Vec<(String, &'static str, String)> {
    match validate(resource_type(value), value) {
        Ok(()) => panic!("expected issues, the resource is valid"),
        Err(issues) => issues
            .iter()
            .map(|i| (i.path.clone(), i.code.as_str(), i.message.clone()))
            .collect(),
    }
}

/// The one issue of an invalid resource.
fn issue(value: &Value) -> (String, &'static str, String) {
    let mut all = issues(value);
    assert_eq!(all.len(), 1, "expected one issue: {all:?}");
    all.remove(0)
}

fn report(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| format!("{} [{}] {}", i.path, i.code.as_str(), i.message))
        .collect::<Vec<_>>()
        .join("; ")
}

#[test]
fn every_official_example_of_the_served_types_validates() {
    let all = examples(&[shared_examples(), testdata()]);
    for served in SERVED {
        let of_type: Vec<_> = all
            .iter()
            .filter(|(_, v)| resource_type(v) == served)
            .collect();
        assert!(!of_type.is_empty(), "no {served} example to check");
        for (name, value) in of_type {
            if let Err(issues) = validate(served, value) {
                panic!("{name}: {}", report(&issues));
            }
        }
    }
}

#[test]
fn every_shared_example_validates() {
    // AuditEvent, Bundle (transaction, response, searchset), OperationOutcome and Subscription
    // too: any type fhir-sdk models, resources inside Bundles included.
    for (name, value) in examples(&[shared_examples()]) {
        if let Err(issues) = validate(resource_type(&value), &value) {
            panic!("{name}: {}", report(&issues));
        }
    }
}

/// The official R4 examples that do not validate, and why. The first are invalid R4 as
/// published; the last is an R4B difference (R4B redesigned Evidence).
const KNOWN_FAULTS: &[(&str, &str)] = &[
    ("ImplementationGuide-fhir.json", "ImplementationGuide.name"),
    ("ig-r4.json", "ImplementationGuide.name"),
    (
        "Questionnaire-qs1.json",
        "Questionnaire.item[0].item[0].linkId",
    ),
    (
        "SearchParameter-codesystem-extensions-CodeSystem-author.json",
        "SearchParameter.base",
    ),
    (
        "SearchParameter-codesystem-extensions-CodeSystem-effective.json",
        "SearchParameter.base",
    ),
    (
        "SearchParameter-codesystem-extensions-CodeSystem-end.json",
        "SearchParameter.base",
    ),
    (
        "SearchParameter-codesystem-extensions-CodeSystem-keyword.json",
        "SearchParameter.base",
    ),
    (
        "SearchParameter-codesystem-extensions-CodeSystem-workflow.json",
        "SearchParameter.base",
    ),
    (
        "SearchParameter-valueset-extensions-ValueSet-author.json",
        "SearchParameter.base",
    ),
    (
        "SearchParameter-valueset-extensions-ValueSet-effective.json",
        "SearchParameter.base",
    ),
    (
        "SearchParameter-valueset-extensions-ValueSet-end.json",
        "SearchParameter.base",
    ),
    (
        "SearchParameter-valueset-extensions-ValueSet-keyword.json",
        "SearchParameter.base",
    ),
    (
        "SearchParameter-valueset-extensions-ValueSet-workflow.json",
        "SearchParameter.base",
    ),
    ("Evidence-example.json", "Evidence.variableDefinition"),
];

/// Every example of the whole `hl7.fhir.r4.examples` package whose type fhir-sdk models
/// (5,293 of 5,306 files): `npm pack hl7.fhir.r4.examples`, unpack, and point
/// `FHIRGATE_R4_EXAMPLES` at its `package` folder.
#[test]
#[ignore = "needs the hl7.fhir.r4.examples package unpacked at FHIRGATE_R4_EXAMPLES"]
fn every_official_r4_example_validates_but_the_known_faults() {
    let dir = std::env::var("FHIRGATE_R4_EXAMPLES").expect("FHIRGATE_R4_EXAMPLES");
    let (mut checked, mut unmodelled, mut failures) = (0, 0, Vec::new());
    for entry in std::fs::read_dir(dir).expect("the package folder") {
        let path = entry.expect("directory entry").path();
        let name = path
            .file_name()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let Some(rt) = value.get("resourceType").and_then(Value::as_str) else {
            continue;
        };
        if !model::RESOURCE_TYPES.contains(&rt) {
            // R4 types R4B dropped (MedicinalProduct*, EffectEvidenceSynthesis, ...).
            unmodelled += 1;
            assert_eq!(
                validate(rt, &value).unwrap_err()[0].code,
                IssueCode::NotSupported
            );
            continue;
        }
        checked += 1;
        let expected = KNOWN_FAULTS.iter().find(|(file, _)| *file == name);
        match (validate(rt, &value), expected) {
            (Ok(()), None) => {}
            (Err(issues), Some((_, path))) if issues.iter().all(|i| i.path == *path) => {}
            (Ok(()), Some(_)) => failures.push(format!("{name}: listed as faulty but valid")),
            (Err(issues), _) => failures.push(format!("{name}: {}", report(&issues))),
        }
    }
    println!("{checked} examples checked, {unmodelled} of types fhir-sdk does not model");
    assert!(checked > 5000, "only {checked} examples found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- mutations of valid examples -------------------------------------------------------------

#[test]
fn a_resource_of_another_type_is_refused_as_today() {
    let practitioner = example("Practitioner-example.json");
    let issues = validate("Patient", &practitioner).unwrap_err();
    assert_eq!(issues.len(), 1);
    assert_eq!(issues[0].path, "resourceType");
    assert_eq!(issues[0].message, "expected a Patient");
    assert_eq!(
        issues[0].to_outcome_issue(),
        json!({ "severity": "error", "code": "structure", "diagnostics": "expected a Patient", "expression": ["resourceType"] })
    );
    assert!(validate("Patient", &json!(["not", "an", "object"])).is_err());
}

#[test]
fn an_unknown_element_at_depth_is_refused_with_its_path() {
    let mut p = example("Patient-example.json");
    p["contact"][0]["name"]["nickname"] = json!("x");
    assert_eq!(
        issue(&p),
        (
            "Patient.contact[0].name.nickname".into(),
            "structure",
            "unknown element".into()
        )
    );
}

#[test]
fn every_unknown_element_is_reported() {
    let mut p = example("Patient-example.json");
    // Top level (a struct with choice elements, where serde cannot deny unknown fields), in a
    // data type, in a choice element's value, in a primitive's extension, in a contained
    // resource, and an element that is not even named like one (not echoed).
    p["favouriteColour"] = json!("x");
    p["name"][1]["middle"] = json!("x");
    p["_birthDate"]["extension"][0]["note"] = json!("x");
    p["extension"] =
        json!([{ "url": "http://example.org/w", "valueQuantity": { "value": 70, "units": "kg" } }]);
    p["contained"] =
        json!([{ "resourceType": "Organization", "id": "o", "name": "O", "motto": "x" }]);
    p["telecom"][0]["not a name"] = json!("x");
    let mut found: Vec<_> = issues(&p).into_iter().map(|(path, _, _)| path).collect();
    found.sort();
    assert_eq!(
        found,
        [
            "Patient.birthDate.extension[0].note",
            "Patient.contained[0].motto",
            "Patient.extension[0].valueQuantity.units",
            "Patient.favouriteColour",
            "Patient.name[1].middle",
            "Patient.telecom[0]",
        ]
    );
}

#[test]
fn a_wrong_json_type_is_refused_with_its_path() {
    let mut p = example("Patient-example.json");
    p["active"] = json!("yes");
    assert_eq!(
        issue(&p),
        (
            "Patient.active".into(),
            "structure",
            "expected a boolean, got a string".into()
        )
    );
    let mut p = example("Patient-example.json");
    p["name"][0]["given"][1] = json!(7);
    assert_eq!(
        issue(&p),
        (
            "Patient.name[0].given[1]".into(),
            "structure",
            "expected a string, got an integer".into()
        )
    );
    let mut p = example("Patient-example.json");
    p["name"] = json!({ "family": "Chalmers" });
    assert_eq!(
        issue(&p),
        (
            "Patient.name".into(),
            "structure",
            "expected an array, got an object".into()
        )
    );
    let mut p = example("Patient-example.json");
    p["maritalStatus"] = json!([{ "text": "married" }]);
    assert_eq!(
        issue(&p),
        (
            "Patient.maritalStatus".into(),
            "structure",
            "expected an object, got an array".into()
        )
    );
    let mut p = example("Patient-example.json");
    p["telecom"][1]["rank"] = json!(0);
    assert_eq!(issue(&p).0, "Patient.telecom[1].rank", "positiveInt");
}

#[test]
fn a_code_outside_a_required_binding_is_refused() {
    let mut p = example("Patient-example.json");
    p["gender"] = json!("robot");
    assert_eq!(
        issue(&p),
        (
            "Patient.gender".into(),
            "code-invalid",
            "not a code of the required value set".into()
        )
    );
    let mut e = example("Encounter-f001.json");
    e["status"] = json!("wandering");
    assert_eq!(issue(&e).0, "Encounter.status");
    assert_eq!(issue(&e).1, "code-invalid");
    // fm-status: a free string in fhir-sdk's R4B model, a required binding in R4.
    for (file, rt) in [
        ("Coverage-9876B1.json", "Coverage"),
        ("Claim-100150.json", "Claim"),
        ("ClaimResponse-R3500.json", "ClaimResponse"),
    ] {
        let mut r = example(file);
        r["status"] = json!("paid-in-full");
        assert_eq!(
            issue(&r),
            (
                format!("{rt}.status"),
                "code-invalid",
                "not a code of the required value set".into()
            )
        );
    }
}

#[test]
fn a_malformed_date_is_refused_with_its_path() {
    for bad in [
        "1990-13-45",
        "1990-02-30",
        "25/12/1974",
        "1974-12-25T14:35",
        "19741225",
    ] {
        let mut p = example("Patient-example.json");
        p["birthDate"] = json!(bad);
        let (path, code, message) = issue(&p);
        assert_eq!(
            (path.as_str(), code),
            ("Patient.birthDate", "value"),
            "{bad}"
        );
        assert!(message.starts_with("not a valid date"), "{bad}: {message}");
    }
    // Read leniently by fhir-sdk, but not FHIR's form: caught when written back.
    for lenient in ["1990-1", "+1990"] {
        let mut p = example("Patient-example.json");
        p["birthDate"] = json!(lenient);
        assert_eq!(issue(&p).0, "Patient.birthDate", "{lenient}");
    }
    // dateTime and instant.
    let mut p = example("Patient-example.json");
    p["_birthDate"]["extension"][0]["valueDateTime"] = json!("1974-12-25T14:35:45");
    assert_eq!(issue(&p).0, "Patient.birthDate.extension[0].valueDateTime");
    let mut c = example("Claim-100150.json");
    c["created"] = json!("2014-08-16T25:00:00Z");
    assert_eq!(issue(&c).0, "Claim.created");
    // Other valid forms of the same instant are not faults.
    let mut p = example("Patient-example.json");
    p["_birthDate"]["extension"][0]["valueDateTime"] = json!("1974-12-25T19:35:45.000+00:00");
    validate("Patient", &p).unwrap_or_else(|i| panic!("{}", report(&i)));
}

#[test]
fn a_missing_required_element_is_refused_with_its_path() {
    let mut c = example("Coverage-9876B1.json");
    c.as_object_mut().expect("object").remove("status");
    assert_eq!(
        issue(&c),
        (
            "Coverage.status".into(),
            "required",
            "a required element is missing".into()
        )
    );
    let mut c = example("Claim-100150.json");
    c.as_object_mut().expect("object").remove("patient");
    assert_eq!(issue(&c).0, "Claim.patient");
    let mut c = example("Claim-100150.json");
    c["insurance"][0]
        .as_object_mut()
        .expect("object")
        .remove("focal");
    assert_eq!(issue(&c).0, "Claim.insurance[0].focal");
    // A 1..* array: absent, or empty.
    let mut c = example("Coverage-9876B1.json");
    c.as_object_mut().expect("object").remove("payor");
    assert_eq!(issue(&c).0, "Coverage.payor");
    let mut c = example("Coverage-9876B1.json");
    c["payor"] = json!([]);
    assert_eq!(issue(&c).0, "Coverage.payor");
    // A required choice element.
    let mut g = example("Group-herd1.json");
    g["characteristic"][0]
        .as_object_mut()
        .expect("object")
        .remove("valueCodeableConcept");
    assert_eq!(
        issue(&g),
        (
            "Group.characteristic[0].value[x]".into(),
            "required",
            "a required element is missing".into()
        )
    );
}

#[test]
fn a_fault_inside_a_choice_element_names_the_choice_element() {
    // An optional choice element: serde drops a failing value without an error.
    let mut p = example("Patient-example.json");
    p.as_object_mut().expect("object").remove("deceasedBoolean");
    p["deceasedDateTime"] = json!("last tuesday");
    let (path, code, _) = issue(&p);
    assert_eq!((path.as_str(), code), ("Patient.deceasedDateTime", "value"));
    // A required one: serde fails the whole object.
    let mut g = example("Group-herd1.json");
    g["characteristic"][0]["valueCodeableConcept"]["coding"] = json!({ "code": "x" });
    assert_eq!(
        issue(&g),
        (
            "Group.characteristic[0].valueCodeableConcept.coding".into(),
            "structure",
            "expected an array, got an object".into()
        )
    );
    // A type this choice element does not take, and two types at once.
    let mut p = example("Patient-example.json");
    p.as_object_mut().expect("object").remove("deceasedBoolean");
    p["deceasedString"] = json!("yes");
    assert_eq!(
        issue(&p),
        (
            "Patient.deceasedString".into(),
            "structure",
            NOT_THIS_TYPE.into()
        )
    );
    let mut g = example("Group-herd1.json");
    let c = g["characteristic"][0].as_object_mut().expect("object");
    c.remove("valueCodeableConcept");
    c.insert("valueString".into(), json!("cows"));
    assert_eq!(
        issue(&g),
        (
            "Group.characteristic[0].valueString".into(),
            "structure",
            NOT_THIS_TYPE.into()
        )
    );
    let mut p = example("Patient-example.json");
    p["deceasedDateTime"] = json!("2015-02-07T13:28:17-05:00");
    assert_eq!(
        issue(&p),
        (
            "Patient.deceasedDateTime".into(),
            "structure",
            "only one type of a choice element may be present".into()
        )
    );
    // Deep in an extension's value.
    let mut p = example("Patient-example.json");
    p["extension"] =
        json!([{ "url": "http://example.org/w", "valueQuantity": { "value": "seventy" } }]);
    assert_eq!(issue(&p).0, "Patient.extension[0].valueQuantity.value");
}

#[test]
fn a_fault_inside_a_contained_resource_names_its_element() {
    let mut p = example("Patient-example.json");
    p["contained"] = json!([
        { "resourceType": "Organization", "id": "o1", "name": "Acme" },
        { "resourceType": "Practitioner", "id": "p1", "gender": "robot" }
    ]);
    assert_eq!(issue(&p).0, "Patient.contained[1].gender");
    p["contained"][1] = json!({ "resourceType": "Nonsense", "id": "n" });
    assert_eq!(
        issue(&p),
        (
            "Patient.contained[1].resourceType".into(),
            "structure",
            "not a resource type of FHIR R4B".into()
        )
    );
    p["contained"][1] = json!({ "id": "n" });
    assert_eq!(issue(&p).0, "Patient.contained[1].resourceType");
    // fm-status applies to contained resources too.
    let mut c = example("Claim-100150.json");
    c["contained"] = json!([{ "resourceType": "Coverage", "id": "c", "status": "bogus",
        "beneficiary": { "reference": "Patient/1" }, "payor": [{ "reference": "Organization/1" }] }]);
    assert_eq!(
        issue(&c),
        (
            "Claim.contained[0].status".into(),
            "code-invalid",
            "not a code of the required value set".into()
        )
    );
}

#[test]
fn decimals_are_read_whatever_their_digits() {
    // With serde_json's arbitrary_precision, `1.50` inside a buffered value (a choice element,
    // a contained resource) is what serde_json's own Value deserializer cannot hand to an f64.
    let p: Value = serde_json::from_str(
        r#"{"resourceType": "Patient",
            "extension": [{"url": "http://example.org/s", "valueDecimal": 1.50},
                          {"url": "http://example.org/t", "valueQuantity": {"value": 1e2, "unit": "kg"}}],
            "contained": [{"resourceType": "Observation", "id": "o", "status": "final",
                           "code": {"text": "w"}, "valueQuantity": {"value": 70.10}}],
            "multipleBirthInteger": 2}"#,
    )
    .expect("JSON");
    validate("Patient", &p).unwrap_or_else(|i| panic!("{}", report(&i)));
    let mut p = p;
    p["multipleBirthInteger"] = serde_json::from_str("2.5").expect("JSON");
    assert_eq!(issue(&p).0, "Patient.multipleBirthInteger");
}

#[test]
fn fhir_json_rules_the_model_does_not_keep() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("gender", Value::Null, "Patient.gender"),
        ("name", json!([]), "Patient.name"),
        ("active", json!(true), ""),
        ("maritalStatus", json!({}), "Patient.maritalStatus"),
        ("_active", json!({}), "Patient._active"),
        // `_x` is only for primitives, though fhir-sdk models it beside every element.
        (
            "_name",
            json!([{ "id": "n" }, { "id": "m" }, { "id": "o" }]),
            "Patient._name",
        ),
    ];
    for (key, value, path) in cases {
        let mut p = example("Patient-example.json");
        p[key] = value;
        if path.is_empty() {
            validate("Patient", &p).unwrap_or_else(|i| panic!("{}", report(&i)));
        } else {
            assert_eq!(issue(&p).0, path, "{key}");
        }
    }
    let mut p = example("Patient-example.json");
    p["name"][0]["family"] = json!("");
    assert_eq!(issue(&p).0, "Patient.name[0].family");
    // null items only line a primitive array up with its `_` sibling.
    let mut p = example("Patient-example.json");
    p["name"][0]["given"] = json!(["Peter", null]);
    assert_eq!(issue(&p).0, "Patient.name[0].given[1]");
    p["name"][0]["_given"] =
        json!([null, { "extension": [{ "url": "http://example.org/x", "valueString": "J" }] }]);
    validate("Patient", &p).unwrap_or_else(|i| panic!("{}", report(&i)));
    p["name"][0]["_given"] = json!([null]);
    assert!(issues(&p)
        .iter()
        .any(|(path, _, _)| path == "Patient.name[0]._given"));
    let mut p = example("Patient-example.json");
    p["name"] = json!([null]);
    assert_eq!(issue(&p).0, "Patient.name[0]");
}

#[test]
fn r4_resource_level_primitive_extensions_are_accepted() {
    // fhir-sdk's R4B resources have no `_language`/`_implicitRules`; R4 has them.
    let mut p = example("Patient-example.json");
    p["language"] = json!("en");
    p["_language"] =
        json!({ "extension": [{ "url": "http://example.org/l", "valueString": "x" }] });
    validate("Patient", &p).unwrap_or_else(|i| panic!("{}", report(&i)));
    p["_language"] = json!({ "colour": "x" });
    assert_eq!(issue(&p).0, "Patient.language.colour");
}

#[test]
fn no_issue_ever_contains_the_submitted_value() {
    const MARK: &str = "Zq7Marker-PHI-1935";
    type Mutation = Box<dyn Fn(&mut Value)>;
    let mutations: Vec<Mutation> = vec![
        Box::new(|p| p["gender"] = json!(MARK)),
        Box::new(|p| p["birthDate"] = json!(MARK)),
        Box::new(|p| p["birthDate"] = json!(format!("1990-{MARK}"))),
        Box::new(|p| p["active"] = json!(MARK)),
        Box::new(|p| p["telecom"][1]["rank"] = json!(MARK)),
        Box::new(|p| p["name"][0]["given"] = json!(MARK)),
        Box::new(|p| p["name"][0] = json!(MARK)),
        Box::new(|p| p["deceasedBoolean"] = json!(MARK)),
        Box::new(|p| p["_birthDate"]["extension"][0]["valueDateTime"] = json!(MARK)),
        Box::new(|p| p["photo"] = json!([{ "data": MARK }])),
        Box::new(|p| p["favourite"] = json!(MARK)),
        Box::new(|p| p[MARK] = json!(MARK)),
        Box::new(|p| p[format!("x {MARK}")] = json!(1)),
        // A key the model ignores before it fails elsewhere.
        Box::new(|p| {
            p["telecom"][0][format!("x {MARK}")] = json!(1);
            p["gender"] = json!("robot");
        }),
        Box::new(|p| p["contained"] = json!([{ "resourceType": "Patient", "gender": MARK }])),
        Box::new(|p| p["contained"] = json!([{ "resourceType": MARK }])),
        Box::new(|p| p["extension"] = json!([{ "url": MARK, "valueInteger": MARK }])),
        Box::new(|p| p["extension"] = json!([{ "url": MARK, "valueDate": MARK }])),
        Box::new(|p| p["extension"] = json!([{ "url": MARK, "valueBase64Binary": MARK }])),
        Box::new(|p| p["extension"] = json!([{ "url": MARK, "valueTime": MARK }])),
        Box::new(|p| p["extension"] = json!([{ "url": MARK, "valueInstant": MARK }])),
    ];
    for (i, mutate) in mutations.iter().enumerate() {
        let mut p = example("Patient-example.json");
        mutate(&mut p);
        let issues = validate("Patient", &p).expect_err("refused");
        for issue in &issues {
            let text = issue.to_outcome_issue().to_string();
            assert!(!text.contains("Zq7"), "mutation {i}: {text}");
        }
    }
    // Not even when the resource type is the wrong one.
    let issues = validate("Patient", &json!({ "resourceType": MARK })).expect_err("refused");
    assert!(!issues[0].to_outcome_issue().to_string().contains("Zq7"));
}

#[test]
fn the_list_of_issues_is_bounded() {
    let mut p = example("Patient-example.json");
    for i in 0..500 {
        p[format!("unknown{i}")] = json!(i);
    }
    let issues = validate("Patient", &p).expect_err("refused");
    assert_eq!(issues.len(), 101);
    assert_eq!(issues[100].code, IssueCode::TooCostly);
    assert_eq!(issues[100].message, "400 more issues are not listed");
}

/// Bundles nested `depth` times around a Patient with faults at the bottom (the costliest shape:
/// each resource inside another is buffered by serde, and each fault is looked at again).
fn nested_bundles(depth: usize) -> Value {
    let mut resource = json!({
        "resourceType": "Patient",
        "gender": "robot",
        "contained": [{ "resourceType": "Observation", "status": "final", "code": { "text": "w" },
                        "valueQuantity": { "value": "heavy" } }]
    });
    for _ in 0..depth {
        resource = json!({ "resourceType": "Bundle", "type": "collection", "entry": [{ "resource": resource }] });
    }
    resource
}

/// Validates on a thread with the stack of a request handler (tokio's workers: 2 MiB).
fn on_a_worker_stack(value: Value) -> Result<(), Vec<Issue>> {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || validate(resource_type(&value), &value))
        .expect("a thread")
        .join()
        .expect("no stack overflow")
}

#[test]
fn a_body_nested_too_deep_is_refused_before_it_can_exhaust_the_stack() {
    // 14 Bundles: 47 levels, within the bound; its faults are found, even in a debug build.
    let issues = on_a_worker_stack(nested_bundles(14)).unwrap_err();
    let leaf = format!("Bundle{}.gender", ".entry[0].resource".repeat(14));
    assert!(issues.iter().any(|i| i.path == leaf), "{}", report(&issues));
    // 20 Bundles: 65 levels. (30 overflowed 2 MiB in a debug build before the bound.)
    for depth in [16, 20, 40] {
        let issues = on_a_worker_stack(nested_bundles(depth)).unwrap_err();
        assert_eq!(issues.len(), 1);
        assert_eq!(
            (issues[0].path.as_str(), issues[0].code),
            ("Bundle", IssueCode::TooCostly)
        );
    }
}

#[test]
fn a_type_fhir_sdk_does_not_model_is_not_supported() {
    let issues = validate(
        "MedicinalProduct",
        &json!({ "resourceType": "MedicinalProduct" }),
    )
    .unwrap_err();
    assert_eq!(
        (issues[0].path.as_str(), issues[0].code),
        ("MedicinalProduct", IssueCode::NotSupported)
    );
}

#[test]
fn a_type_name_not_shaped_like_fhirs_is_refused_without_quoting_it() {
    // Found by the fhir_resource fuzz target: the name opened every expression of the issues.
    for name in ["p.heuvel@gmail.com", "Zq7 Name", "_Patient", "Ünïcode"] {
        let issues = validate(name, &json!({ "resourceType": name, "text": {} })).unwrap_err();
        assert_eq!(issues.len(), 1, "{name}");
        assert_eq!(
            (issues[0].path.as_str(), issues[0].code),
            ("resourceType", IssueCode::Structure)
        );
        assert!(!issues[0].to_outcome_issue().to_string().contains(name));
    }
}

#[test]
fn the_resource_type_list_is_fhir_sdks() {
    use fhir_sdk::r4b::resources::ResourceType;
    for name in model::RESOURCE_TYPES {
        let parsed: ResourceType = name.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed.as_str(), *name);
    }
    assert_eq!(model::RESOURCE_TYPES.len(), 141);
}

#[test]
fn choice_elements_are_told_by_their_names() {
    assert!(
        model::CHOICE_STEMS.windows(2).all(|w| w[0] < w[1]),
        "sorted for binary search"
    );
    fn stem(k: &str) -> Option<&str> {
        model::choice_split(k).map(|(s, _)| s)
    }
    assert_eq!(stem("deceasedDateTime"), Some("deceased"));
    assert_eq!(stem("valueRatioRange"), Some("value"));
    assert_eq!(stem("_valueString"), Some("value"));
    assert_eq!(stem("multipleBirthInteger"), Some("multipleBirth"));
    assert_eq!(stem("birthDate"), None);
    assert_eq!(stem("favouriteString"), None);
    assert_eq!(stem("value"), None);
}

#[test]
fn fhir_temporal_forms() {
    use super::diff::is_fhir_temporal as ok;
    for good in [
        "2018",
        "1974-12",
        "1974-12-25",
        "2015-02-07T13:28:17-05:00",
        "2017-01-01T00:00:00.000Z",
        "2015-02-07T13:28:17.239+02:00",
        "2015-02-07T13:28:17+14:00",
        "12:30:00",
        "23:59:60.5",
    ] {
        assert!(ok(good), "{good}");
    }
    for bad in [
        "0000",
        "18",
        "1974-1",
        "1974-13",
        "1974-12-32",
        "1974-12-25T13:28",
        "1974-12-25T13:28:17",
        "1974-12-25T13:28:17+14:30",
        "1974-12-25T24:00:00Z",
        "1974-12-25 13:28:17Z",
        "+1974",
        "1974-12-25T13:28:17.Z",
        "24:00:00",
        "",
        "T12:00:00Z",
    ] {
        assert!(!ok(bad), "{bad}");
    }
}

/// How long validating the canonical Patient example takes (`cargo test --release --lib
/// fhir::validate::tests::validating_the_patient_example_is_cheap -- --ignored --nocapture`),
/// beside what fhir-sdk's typed read alone costs through serde_json's own `&Value` deserializer,
/// and that read plus writing the model back (the floor of a round trip).
#[test]
#[ignore = "a measurement: run it in release"]
fn validating_the_patient_example_is_cheap() {
    use fhir_sdk::r4b::resources::{Claim, Patient};
    use serde::Deserialize;

    fn time(what: &str, mut f: impl FnMut()) {
        for _ in 0..500 {
            f();
        }
        let n: u32 = 10_000;
        let start = std::time::Instant::now();
        for _ in 0..n {
            f();
        }
        println!("  {what}: {:?}", start.elapsed() / n);
    }
    let patient = example("Patient-example.json");
    println!(
        "Patient-example.json ({} bytes of JSON)",
        patient.to_string().len()
    );
    time("typed read (serde_json's &Value)", || {
        Patient::deserialize(&patient).expect("read");
    });
    time("typed read + write back", || {
        let typed = Patient::deserialize(&patient).expect("read");
        serde_json::to_value(&typed).expect("written");
    });
    time("validate()", || {
        validate("Patient", &patient).expect("valid")
    });
    let claim = example("Claim-100150.json");
    println!(
        "Claim-100150.json ({} bytes of JSON)",
        claim.to_string().len()
    );
    time("typed read (serde_json's &Value)", || {
        Claim::deserialize(&claim).expect("read");
    });
    time("validate()", || validate("Claim", &claim).expect("valid"));
}
