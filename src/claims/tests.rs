//! The whole check against the shipped config: each validator pass and fail, the payer rules,
//! all problems at once, and no client value in any message.

use std::path::Path;
use std::sync::OnceLock;

use serde_json::{json, Value};
use time::macros::date;
use time::{Date, Duration};

use super::*;

const TODAY: Date = date!(2026 - 03 - 15);
/// The CMS worked example; passes the check digit.
const NPI: &str = "1234567893";
const OTHER_NPI: &str = "1987654328";

fn rules() -> &'static ClaimRules {
    static RULES: OnceLock<ClaimRules> = OnceLock::new();
    RULES.get_or_init(|| {
        ClaimRules::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config")).unwrap()
    })
}

fn ctx() -> ClaimContext {
    ClaimContext {
        today: TODAY,
        practitioner_npi: Some(NPI.into()),
        member_id: None,
    }
}

/// A request that passes for BCBS; tests change one thing at a time.
fn base() -> Value {
    json!({
        "patient_id": "pat-1",
        "therapist_id": "prac-1",
        "session_date": "2026-03-10",
        "cpt_code": "90834",
        "icd10_codes": ["F41.1"],
        "fee": 150,
        "payer_id": "BCBS",
        "member_id": "XYZ123456",
    })
}

fn with(changes: Value) -> Value {
    let mut body = base();
    for (k, v) in changes.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn without(field: &str) -> Value {
    let mut body = base();
    body.as_object_mut().unwrap().remove(field);
    body
}

fn check_in(body: Value, ctx: &ClaimContext) -> Result<CheckedClaim, Vec<Problem>> {
    let request: PrepareRequest = serde_json::from_value(body).unwrap();
    rules().check(&request, ctx)
}

fn check(body: Value) -> Result<CheckedClaim, Vec<Problem>> {
    check_in(body, &ctx())
}

fn problems(body: Value) -> Vec<Problem> {
    check(body).expect_err("expected problems")
}

fn rule_ids(body: Value) -> Vec<String> {
    problems(body).into_iter().map(|p| p.rule).collect()
}

/// The only problem of a request, by rule id.
fn only_problem(body: Value) -> Problem {
    let mut found = problems(body);
    assert_eq!(found.len(), 1, "{found:#?}");
    found.remove(0)
}

fn date_str(d: Date) -> String {
    d.to_string()
}

#[test]
fn a_valid_request_gives_a_claim_with_normalised_values() {
    let claim = check(with(json!({
        "icd10_codes": ["f411", "F32.A", "z6372"],
        "fee": "150.5",
        "copay": 20,
        "place_of_service": "02",
        "payer_id": "bcbs",
    })))
    .unwrap();
    let codes: Vec<&str> = claim.icd10_codes.iter().map(Icd10Code::as_str).collect();
    assert_eq!(codes, ["F41.1", "F32.A", "Z63.72"]);
    assert_eq!(claim.fee.minor_units, 15050);
    assert_eq!(claim.copay.minor_units, 2000);
    assert_eq!(claim.fee.currency, Currency::USD);
    assert_eq!(claim.payer_id, "BCBS");
    assert_eq!(claim.payer_name, rules().payer("BCBS").unwrap().name());
    assert_eq!(claim.cpt_family, "psychotherapy");
    assert_eq!(claim.place_of_service, "02");
    assert_eq!(claim.practitioner_npi.as_str(), NPI);
    assert_eq!(claim.member_id.as_deref(), Some("XYZ123456"));
    assert_eq!(claim.date_of_service, date!(2026 - 03 - 10));
}

#[test]
fn defaults_apply_to_optional_fields() {
    let claim = check(base()).unwrap();
    assert_eq!(claim.units, 1);
    assert_eq!(claim.place_of_service, "11");
    assert_eq!(claim.copay.minor_units, 0);
    assert_eq!(claim.copay.currency, Currency::USD);
    assert_eq!(claim.prior_authorization, None);
    assert_eq!(claim.referring_provider_npi, None);
}

// --- fee -----------------------------------------------------------------------------------

#[test]
fn a_zero_or_negative_fee_is_rejected() {
    for fee in [json!(0), json!("0.00"), json!(-10)] {
        let problem = only_problem(with(json!({ "fee": fee })));
        assert_eq!(
            (problem.field.as_str(), problem.rule.as_str()),
            ("fee", "fee.positive")
        );
        assert_eq!(problem.kind, ProblemKind::Invalid);
    }
}

#[test]
fn a_copay_equal_to_the_fee_passes_and_one_above_it_does_not() {
    let claim = check(with(json!({ "fee": "80.00", "copay": 80 }))).unwrap();
    assert_eq!(claim.copay, claim.fee);
    let problem = only_problem(with(json!({ "fee": "80.00", "copay": "80.01" })));
    assert_eq!(problem.rule, "copay.not-above-fee");
    assert_eq!(problem.kind, ProblemKind::BusinessRule);
    assert_eq!(
        rule_ids(with(json!({ "copay": -1 }))),
        ["copay.not-negative"]
    );
}

#[test]
fn three_decimals_in_dollars_is_a_precision_problem() {
    assert_eq!(rule_ids(with(json!({ "fee": 150.505 }))), ["fee.precision"]);
    assert_eq!(
        rule_ids(with(json!({ "copay": "1.001" }))),
        ["copay.precision"]
    );
    let claim = check(with(json!({ "fee": 150.50 }))).unwrap();
    assert_eq!(claim.fee.minor_units, 15050);
}

#[test]
fn yen_have_no_decimals() {
    let problem = only_problem(with(json!({ "fee": "1500.5", "currency": "JPY" })));
    assert_eq!(problem.rule, "fee.precision");
    let claim = check(with(json!({ "fee": 1500, "currency": "jpy" }))).unwrap();
    assert_eq!(claim.fee.minor_units, 1500);
    assert_eq!(claim.fee.currency.code(), "JPY");
}

#[test]
fn an_unsupported_currency_is_an_unknown_code() {
    let problem = only_problem(with(json!({ "currency": "XAU" })));
    assert_eq!(
        (problem.rule.as_str(), problem.kind),
        ("currency.supported", ProblemKind::UnknownCode)
    );
    // The fee's sign is still checked without a currency.
    let mut found = rule_ids(with(json!({ "currency": "XAU", "fee": -5 })));
    found.sort();
    assert_eq!(found, ["currency.supported", "fee.positive"]);
}

#[test]
fn absurd_or_malformed_amounts_are_problems_not_panics() {
    assert_eq!(rule_ids(with(json!({ "fee": "1e400" }))), ["fee.magnitude"]);
    let huge: Value = serde_json::from_str(&"9".repeat(60)).unwrap();
    assert_eq!(rule_ids(with(json!({ "fee": huge }))), ["fee.magnitude"]);
    assert_eq!(
        rule_ids(with(json!({ "fee": 1_000_000_000 }))),
        ["fee.magnitude"]
    );
    assert_eq!(rule_ids(with(json!({ "fee": "$150" }))), ["fee.format"]);
    assert_eq!(rule_ids(with(json!({ "fee": true }))), ["fee.type"]);
    assert_eq!(rule_ids(without("fee")), ["fee.required"]);
}

// --- CPT -----------------------------------------------------------------------------------

#[test]
fn every_psychotherapy_code_is_known() {
    for code in [
        "90832", "90833", "90834", "90836", "90837", "90838", "90846", "90847", "90853",
    ] {
        // AETNA-free, prior-auth-free payer for 90837: MEDICARE.
        let body =
            with(json!({ "cpt_code": code, "payer_id": "MEDICARE", "member_id": "1EG4TE5MK73" }));
        let claim = check(body).unwrap_or_else(|p| panic!("{code}: {p:#?}"));
        assert_eq!(claim.cpt_code.as_str(), code);
        assert_eq!(claim.cpt_family, "psychotherapy");
    }
}

#[test]
fn an_unknown_cpt_code_is_an_unknown_code_and_a_malformed_one_is_invalid() {
    let problem = only_problem(with(json!({ "cpt_code": "12345" })));
    assert_eq!(
        (problem.rule.as_str(), problem.kind),
        ("cpt.known", ProblemKind::UnknownCode)
    );
    assert_eq!(
        rule_ids(with(json!({ "cpt_code": "9083" }))),
        ["cpt.format"]
    );
    assert_eq!(
        rule_ids(with(json!({ "cpt_code": 90834 }))),
        ["cpt_code.type"]
    );
}

// --- ICD-10-CM -----------------------------------------------------------------------------

#[test]
fn a_malformed_icd10_code_differs_from_an_unknown_one() {
    let problem = only_problem(with(json!({ "icd10_codes": ["F41.1", "F4.11"] })));
    assert_eq!(
        (problem.field.as_str(), problem.rule.as_str()),
        ("icd10_codes[1]", "icd10.format")
    );
    assert_eq!(problem.kind, ProblemKind::Invalid);
    // A category with subdivisions is well-formed but not billable.
    let problem = only_problem(with(json!({ "icd10_codes": ["F41"] })));
    assert_eq!(
        (problem.field.as_str(), problem.rule.as_str()),
        ("icd10_codes[0]", "icd10.known")
    );
    assert_eq!(problem.kind, ProblemKind::UnknownCode);
}

#[test]
fn the_single_code_shorthand_works_but_not_together_with_the_list() {
    let claim = check(
        with(json!({ "icd10_code": "f411" }))
            .as_object()
            .map(|o| {
                let mut o = o.clone();
                o.remove("icd10_codes");
                Value::Object(o)
            })
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claim.icd10_codes[0].as_str(), "F41.1");
    assert_eq!(
        rule_ids(with(json!({ "icd10_code": "F41.1" }))),
        ["icd10.one-of"]
    );
    assert_eq!(rule_ids(without("icd10_codes")), ["icd10_codes.required"]);
}

#[test]
fn between_one_and_twelve_distinct_codes_are_accepted() {
    assert_eq!(
        rule_ids(with(json!({ "icd10_codes": [] }))),
        ["icd10_codes.count"]
    );
    let twelve: Vec<&str> = [
        "F41.1", "F32.A", "F43.10", "F43.12", "F90.0", "F90.1", "F90.2", "F90.8", "F90.9",
        "F40.10", "F40.11", "F42.2",
    ]
    .to_vec();
    assert!(check(with(json!({ "icd10_codes": twelve.clone() }))).is_ok());
    let mut thirteen = twelve;
    thirteen.push("F41.0");
    assert_eq!(
        rule_ids(with(json!({ "icd10_codes": thirteen }))),
        ["icd10_codes.count"]
    );
    let problem = only_problem(with(json!({ "icd10_codes": ["F41.1", "f411"] })));
    assert_eq!(
        (problem.field.as_str(), problem.rule.as_str()),
        ("icd10_codes[1]", "icd10.duplicate")
    );
}

// --- dates ---------------------------------------------------------------------------------

#[test]
fn a_date_after_today_is_rejected_and_today_is_fine() {
    let tomorrow = date_str(TODAY + Duration::days(1));
    assert_eq!(
        rule_ids(with(json!({ "session_date": tomorrow }))),
        ["session_date.not-future"]
    );
    assert!(check(with(json!({ "session_date": date_str(TODAY) }))).is_ok());
}

#[test]
fn the_timely_filing_window_includes_its_last_day() {
    let days = i64::from(rules().payer("BCBS").unwrap().timely_filing_days());
    let last_day = date_str(TODAY - Duration::days(days));
    assert!(check(with(json!({ "session_date": last_day }))).is_ok());
    let one_late = date_str(TODAY - Duration::days(days + 1));
    let problem = only_problem(with(json!({ "session_date": one_late })));
    assert_eq!(problem.rule, "session_date.timely-filing");
    assert_eq!(problem.kind, ProblemKind::BusinessRule);
}

#[test]
fn a_date_not_written_yyyy_mm_dd_or_not_on_the_calendar_is_invalid() {
    for bad in [
        "2026-02-30",
        "03/10/2026",
        "2026-3-10",
        "2026-03-10T00:00:00",
    ] {
        assert_eq!(
            rule_ids(with(json!({ "session_date": bad }))),
            ["session_date.format"],
            "{bad}"
        );
    }
}

// --- NPI -----------------------------------------------------------------------------------

#[test]
fn a_practitioner_without_an_npi_is_a_required_problem() {
    let ctx = ClaimContext {
        practitioner_npi: None,
        ..ctx()
    };
    let problems = check_in(base(), &ctx).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(
        (problems[0].field.as_str(), problems[0].kind),
        ("therapist_id", ProblemKind::Required)
    );
}

#[test]
fn an_npi_with_a_bad_check_digit_is_rejected() {
    let ctx = ClaimContext {
        practitioner_npi: Some("1234567890".into()),
        ..ctx()
    };
    let problems = check_in(base(), &ctx).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].rule, "therapist_id.npi");
    assert_eq!(
        rule_ids(with(json!({ "referring_provider_npi": "1987654320" }))),
        ["referring_provider_npi.npi"]
    );
    let claim = check(with(json!({ "referring_provider_npi": OTHER_NPI }))).unwrap();
    assert_eq!(claim.referring_provider_npi.unwrap().as_str(), OTHER_NPI);
}

// --- member id -----------------------------------------------------------------------------

#[test]
fn a_member_id_missing_from_request_and_coverage_is_required() {
    let problem = only_problem(without("member_id"));
    assert_eq!(problem.field, "member_id");
    assert_eq!(problem.kind, ProblemKind::Required);
    assert_eq!(problem.rule, "payer.BCBS.member-id");
}

#[test]
fn the_coverage_member_id_fills_in_and_the_request_one_wins() {
    let ctx = ClaimContext {
        member_id: Some("COV777".into()),
        ..ctx()
    };
    let claim = check_in(without("member_id"), &ctx).unwrap();
    assert_eq!(claim.member_id.as_deref(), Some("COV777"));
    let claim = check_in(base(), &ctx).unwrap();
    assert_eq!(claim.member_id.as_deref(), Some("XYZ123456"));
}

#[test]
fn medicare_needs_a_well_formed_mbi() {
    let medicare = |member: &str| with(json!({ "payer_id": "MEDICARE", "member_id": member }));
    let claim = check(medicare("1eg4te5mk73")).unwrap();
    assert_eq!(claim.member_id.as_deref(), Some("1EG4TE5MK73"));
    for bad in ["1EG4-TE5-MK73", "1SG4TE5MK73", "1EG4TE5MK7"] {
        let problem = only_problem(medicare(bad));
        assert_eq!(problem.rule, "payer.MEDICARE.member-id-format", "{bad}");
        assert_eq!(problem.field, "member_id");
    }
    // Not even a plausible member id for any payer.
    assert_eq!(
        only_problem(medicare("1EG4 TE5MK73")).rule,
        "member_id.format"
    );
    // The Coverage's value is held to the same format.
    let ctx = ClaimContext {
        member_id: Some("0EG4TE5MK73".into()),
        ..ctx()
    };
    let body = with(json!({ "payer_id": "MEDICARE" }));
    let mut body = body;
    body.as_object_mut().unwrap().remove("member_id");
    let problems = check_in(body, &ctx).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].rule, "payer.MEDICARE.member-id-format");
}

// --- payer rules ---------------------------------------------------------------------------

#[test]
fn bcbs_needs_prior_authorisation_for_90837_but_not_for_90834() {
    let problem = only_problem(with(json!({ "cpt_code": "90837" })));
    assert_eq!(problem.field, "prior_authorization");
    assert_eq!(problem.rule, "payer.BCBS.prior-authorization-90837");
    assert_eq!(problem.kind, ProblemKind::BusinessRule);
    let claim = check(with(
        json!({ "cpt_code": "90837", "prior_authorization": "PA-2026-0042" }),
    ))
    .unwrap();
    assert_eq!(claim.prior_authorization.as_deref(), Some("PA-2026-0042"));
    assert!(check(with(json!({ "cpt_code": "90834" }))).is_ok());
}

#[test]
fn aetna_needs_a_referring_provider() {
    let problem = only_problem(with(json!({ "payer_id": "AETNA" })));
    assert_eq!(problem.field, "referring_provider_npi");
    assert_eq!(problem.rule, "payer.AETNA.referring-provider");
    assert!(check(with(
        json!({ "payer_id": "AETNA", "referring_provider_npi": OTHER_NPI })
    ))
    .is_ok());
    // Sent but failing the check digit: one NPI problem, not also "missing".
    assert_eq!(
        rule_ids(with(
            json!({ "payer_id": "AETNA", "referring_provider_npi": "1987654320" })
        )),
        ["referring_provider_npi.npi"]
    );
}

#[test]
fn aetna_has_a_shorter_filing_window_than_bcbs() {
    let aetna = i64::from(rules().payer("AETNA").unwrap().timely_filing_days());
    let bcbs = i64::from(rules().payer("BCBS").unwrap().timely_filing_days());
    assert!(aetna < bcbs);
    let date = date_str(TODAY - Duration::days(aetna + 1));
    assert!(check(with(json!({ "session_date": date }))).is_ok());
    let body = with(
        json!({ "session_date": date, "payer_id": "AETNA", "referring_provider_npi": OTHER_NPI }),
    );
    assert_eq!(rule_ids(body), ["session_date.timely-filing"]);
}

#[test]
fn cigna_limits_psychotherapy_units_and_places_of_service() {
    let cigna = |extra: Value| {
        let mut body = with(json!({ "payer_id": "CIGNA" }));
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    assert!(check(cigna(json!({}))).is_ok());
    assert_eq!(
        rule_ids(cigna(json!({ "units": 2 }))),
        ["payer.CIGNA.one-psychotherapy-unit"]
    );
    // The unit limit is for the psychotherapy family only.
    assert!(check(cigna(json!({ "units": 2, "cpt_code": "96127" }))).is_ok());
    assert_eq!(
        rule_ids(cigna(json!({ "place_of_service": "21" }))),
        ["payer.CIGNA.place-of-service"]
    );
    assert_eq!(
        rule_ids(cigna(json!({ "cpt_code": "96130" }))),
        ["payer.CIGNA.prior-authorization-testing"]
    );
}

#[test]
fn an_unknown_payer_is_an_unknown_code_and_skips_payer_checks() {
    let problem = only_problem(with(json!({ "payer_id": "NOPE", "cpt_code": "90837" })));
    assert_eq!(
        (problem.field.as_str(), problem.rule.as_str()),
        ("payer_id", "payer.known")
    );
    assert_eq!(problem.kind, ProblemKind::UnknownCode);
}

// --- the whole request ---------------------------------------------------------------------

#[test]
fn every_problem_is_reported_at_once() {
    let body = with(json!({
        "fee": 0,                                             // fee.positive
        "cpt_code": "12345",                                  // cpt.known
        "icd10_codes": ["F41.1", "XX"],                       // icd10.format
        "session_date": date_str(TODAY + Duration::days(3)), // session_date.not-future
        "referring_provider_npi": "1234567890",               // referring_provider_npi.npi
    }));
    let mut found = rule_ids(body);
    found.sort();
    assert_eq!(
        found,
        [
            "cpt.known",
            "fee.positive",
            "icd10.format",
            "referring_provider_npi.npi",
            "session_date.not-future"
        ]
    );
}

#[test]
fn wrong_types_missing_fields_and_unknown_fields_are_each_one_problem() {
    let body = json!({
        "patient_id": 42,
        "session_date": null,
        "cpt_code": "90834",
        "icd10_codes": "F41.1",
        "fee": [150],
        "units": 0,
        "place_of_service": "office",
        "payer_id": "BCBS",
        "member_id": "XYZ1",
        "colour": "blue",
        "session_notes": "x",
    });
    let found = problems(body);
    let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "patient_id",
            "therapist_id",
            "session_date",
            "icd10_codes",
            "fee",
            "units",
            "place_of_service",
            "colour",
            "session_notes"
        ],
        "{found:#?}"
    );
    let required: Vec<&str> = found
        .iter()
        .filter(|p| p.kind == ProblemKind::Required)
        .map(|p| p.field.as_str())
        .collect();
    assert_eq!(required, ["therapist_id", "session_date"]);
}

#[test]
fn no_message_repeats_a_value_from_the_request() {
    let distinctive = [
        "pat-Zq7Wv",
        "prac-Qx9Kk",
        "2031-07-19",
        "Q9Z8Y",
        "Q99.97X",
        "W77.7",
        "98765.4321",
        "4242.42",
        "XAF",
        "ZZ7QQ12345",
        "PAQ-55501",
        "5555555555",
        "Bobby-Tables",
        "77",
    ];
    let body = json!({
        "patient_id": "pat-Zq7Wv",
        "therapist_id": "prac-Qx9Kk",
        "session_date": "2031-07-19",
        "cpt_code": "Q9Z8Y",
        "icd10_codes": ["Q99.97X", "W77.7"],
        "fee": "98765.4321",
        "copay": "4242.42",
        "currency": "XAF",
        "units": 77,
        "place_of_service": "77",
        "payer_id": "ZZ7QQ12345",
        "member_id": "Bobby-Tables!",
        "prior_authorization": "PAQ-55501",
        "referring_provider_npi": "5555555555",
    });
    let ctx = ClaimContext {
        practitioner_npi: Some("5555555555".into()),
        member_id: Some("Bobby-Tables".into()),
        ..ctx()
    };
    let found = check_in(body, &ctx).unwrap_err();
    assert!(found.len() >= 8, "{found:#?}");
    for problem in &found {
        for value in distinctive {
            assert!(!problem.message.contains(value), "{value} in {problem:?}");
            assert!(!problem.rule.contains(value), "{value} in {problem:?}");
        }
    }
    // Same for a known payer, which runs the payer checks.
    let found = check_in(
        with(json!({ "payer_id": "MEDICARE", "member_id": "ZZ7QQ12345", "fee": "98765.4321" })),
        &ctx,
    )
    .unwrap_err();
    for problem in &found {
        for value in ["ZZ7QQ12345", "98765.4321", "5555555555"] {
            assert!(!problem.message.contains(value), "{value} in {problem:?}");
        }
    }
}

#[test]
fn an_unknown_field_name_that_is_not_an_identifier_is_not_echoed() {
    let problems = problems(with(json!({ "John Smith 1970-01-01": true })));
    assert_eq!(problems.len(), 1);
    assert!(!problems[0].field.contains("Smith"));
    assert_eq!(problems[0].rule, "request.unknown-field");
}

// --- loading -------------------------------------------------------------------------------

#[test]
fn the_shipped_rules_load_with_every_code_list_and_payer() {
    let loaded = ClaimRules::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config")).unwrap();
    assert!(loaded.icd10().len() > 70_000, "{loaded:?}");
    assert!(loaded.cpt().get("90837").is_some());
    for payer in ["BCBS", "AETNA", "MEDICARE", "CIGNA"] {
        assert!(loaded.payer(payer).is_some(), "{payer}: {loaded:?}");
    }
}

#[test]
fn a_missing_rules_dir_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClaimRules::load(dir.path()).unwrap_err();
    assert!(err.path.ends_with("codes/cpt.csv"), "{err}");
}

#[test]
fn claims_settings_default_to_the_config_dir() {
    assert_eq!(ClaimsSettings::default().rules_dir, Path::new("config"));
    let parsed: ClaimsSettings =
        serde_json::from_value(json!({ "rules_dir": "/etc/fhirgate" })).unwrap();
    assert_eq!(parsed.rules_dir, Path::new("/etc/fhirgate"));
}

#[test]
fn claim_rules_can_be_shared_across_worker_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<ClaimRules>();
}

#[test]
fn a_payer_added_as_a_file_applies_without_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("codes")).unwrap();
    std::fs::create_dir_all(dir.path().join("payers")).unwrap();
    for file in ["cpt.csv", "icd10cm.txt"] {
        std::fs::copy(
            root.join("codes").join(file),
            dir.path().join("codes").join(file),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("payers/acme.yaml"),
        "id: ACME\nname: Acme Health\ntimely_filing_days: 30\nmember_id: { required: false }\n\
         rules:\n  - id: member-id-for-testing\n    when: { family: [psychological-testing] }\n    require: member_id\n",
    )
    .unwrap();
    let rules = ClaimRules::load(dir.path()).unwrap();
    let check = |body: Value| {
        let request: PrepareRequest = serde_json::from_value(body).unwrap();
        rules.check(&request, &ctx())
    };
    let mut body = with(json!({ "payer_id": "ACME" }));
    body.as_object_mut().unwrap().remove("member_id");
    let claim = check(body.clone()).unwrap();
    assert_eq!(
        (claim.payer_name.as_str(), claim.member_id),
        ("Acme Health", None)
    );

    body["cpt_code"] = json!("96130");
    let problems = check(body).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(problems[0].rule, "payer.ACME.member-id-for-testing");
    assert_eq!(
        (problems[0].field.as_str(), problems[0].kind),
        ("member_id", ProblemKind::Required)
    );
}

#[test]
fn the_route_can_read_ids_and_payer_before_checking() {
    let request: PrepareRequest =
        serde_json::from_value(with(json!({ "payer_id": "aetna" }))).unwrap();
    assert_eq!(request.patient_id().unwrap().as_str(), "pat-1");
    assert_eq!(request.practitioner_id().unwrap().as_str(), "prac-1");
    assert_eq!(rules().payer_of(&request).unwrap().id(), "AETNA");
    let request: PrepareRequest =
        serde_json::from_value(json!({ "patient_id": "not an id!", "payer_id": 7 })).unwrap();
    assert!(request.patient_id().is_none() && request.practitioner_id().is_none());
    assert!(rules().payer_of(&request).is_none());
}

#[test]
fn a_body_that_is_not_an_object_does_not_deserialise() {
    // The route turns this serde error into a single problem of its own.
    assert!(serde_json::from_value::<PrepareRequest>(json!([1, 2])).is_err());
}
