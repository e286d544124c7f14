//! `POST /api/v1/claims/prepare`: a therapy session in, a prepared claim out (`practice_admin`
//! or `billing`).
//!
//! The body names the session in the field names of the external contract (ARCHITECTURE.md):
//! `practice_id` (optional, must be the token's), `therapist_id`, `patient_id`, `session_date`,
//! `cpt_code`, `icd10_code` (or `icd10_codes`), `fee`, `copay`, `payer_id`; see
//! `claims::PrepareRequest`. The gateway reads what the body
//! points at, in the caller's practice: the Patient, the Practitioner (its NPI, system
//! `http://hl7.org/fhir/sid/us-npi`) and the patient's Coverage for the payer (its member id,
//! when the body carries none). Then the validator chain (`claims`) runs whole:
//!
//! - any problem: **422** with an OperationOutcome of one issue per problem, each naming the
//!   body's field in `expression` (a body that is not a JSON object is 400). Nothing is stored.
//! - none: the claim is stored as a FHIR `Claim` (checked like any Claim written through
//!   `/fhir/r4`) with lifecycle status `prepared`, and its audit event, in one transaction:
//!   **201**, `Location` the Claim's URL, the body the lifecycle status and the Claim.
//!
//! Issues never quote the body's values (member ids, dates and codes are PHI in context).

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::require_any_role;
use crate::audit::middleware::{request_event, AuditedInTransaction};
use crate::audit::Action;
use crate::claims::{CheckedClaim, ClaimContext, Money, PrepareRequest, Problem, ProblemKind};
use crate::domain::{new_resource_id, ClaimStatus};
use crate::fhir::resources::{self, fields, kind_of, open_json, Prepared};
use crate::gate::{Caller, Role};
use crate::http::ApiError;
use crate::startup::AppState;
use crate::store::{ClaimEffects, ClaimStatusChange, Expect};
use crate::sync::outbox::rows::{Pending, Reader};

const ROLES: &[Role] = &[Role::PracticeAdmin, Role::Billing];
const ROLES_NEEDED: &str = "practice_admin or billing";

/// The NPI identifier system (CMS NPPES, as FHIR names it).
pub const NPI_SYSTEM: &str = "http://hl7.org/fhir/sid/us-npi";
/// Where the payer's id is written on the Claim (`insurer.identifier`): payers are the
/// practice's configuration (`config/payers`), not FHIR Organizations of the store.
pub const PAYER_SYSTEM: &str = "urn:fhirgate:payer";
const CPT_SYSTEM: &str = "http://www.ama-assn.org/go/cpt";
const ICD10CM_SYSTEM: &str = "http://hl7.org/fhir/sid/icd-10-cm";
const POS_SYSTEM: &str =
    "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set";
/// The copay the patient owes at the visit, on the Claim's item (R4 Claim has no element for it).
pub const COPAY_EXTENSION: &str = "https://fhirgate.dev/fhir/StructureDefinition/copay";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/claims/prepare").route(web::post().to(prepare)));
}

/// The practice's local date now.
fn practice_today(timezone: &str) -> time::Date {
    use chrono::Datelike;
    let tz: chrono_tz::Tz = timezone.parse().unwrap_or(chrono_tz::Tz::UTC);
    let local = chrono::Utc::now().with_timezone(&tz).date_naive();
    time::Date::from_ordinal_date(local.year(), u16::try_from(local.ordinal()).unwrap_or(1))
        .unwrap_or(time::OffsetDateTime::now_utc().date())
}

/// The value of a resource's identifier of `system`.
fn identifier_of(resource: &Value, system: &str) -> Option<String> {
    fields::identifiers(resource)
        .into_iter()
        .find(|(s, _)| s.as_deref() == Some(system))
        .map(|(_, v)| v)
}

/// What a Coverage calls its payors: each `payor`'s display and identifier value, and the name
/// and identifier values of the Organization it references (read from the practice's store).
async fn payor_names(reader: &Reader<'_>, coverage: &Value) -> Result<Vec<String>, ApiError> {
    let mut names = Vec::new();
    let payors = coverage.get("payor").and_then(Value::as_array);
    for payor in payors.into_iter().flatten() {
        for text in [payor.get("display"), payor.pointer("/identifier/value")]
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            names.push(text.to_owned());
        }
        if let Some(org_id) = fields::reference_id(payor, "Organization") {
            if let Some(org) = reader.resource("Organization", &org_id).await? {
                if let Some(name) = org.get("name").and_then(Value::as_str) {
                    names.push(name.to_owned());
                }
                names.extend(fields::identifiers(&org).into_iter().map(|(_, v)| v));
            }
        }
    }
    Ok(names)
}

/// Whether one of a Coverage's payor names (see [`payor_names`]) is the payer's id or name,
/// case-insensitively.
fn covers(names: &[String], payer_id: &str, payer_name: &str) -> bool {
    names.iter().any(|n| {
        let n = n.trim();
        n.eq_ignore_ascii_case(payer_id) || n.eq_ignore_ascii_case(payer_name)
    })
}

/// A Coverage's member id: `subscriberId`, else its identifier typed `MB` (v2-0203 member
/// number).
fn member_id_of(coverage: &Value) -> Option<String> {
    if let Some(id) = coverage.get("subscriberId").and_then(Value::as_str) {
        return Some(id.to_owned());
    }
    coverage
        .get("identifier")
        .and_then(Value::as_array)?
        .iter()
        .find(|i| {
            i.pointer("/type/coding")
                .and_then(Value::as_array)
                .is_some_and(|c| c.iter().any(|c| c.get("code") == Some(&json!("MB"))))
        })
        .and_then(|i| i.get("value"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// What the body points at, read from the practice's store.
struct Resolved {
    context: ClaimContext,
    /// The patient's Coverage for the payer (the Claim's `insurance.coverage`).
    coverage_id: Option<String>,
    /// Problems of references that do not resolve.
    problems: Vec<Problem>,
}

fn not_found(field: &str, what: &str) -> Problem {
    Problem {
        field: field.to_owned(),
        kind: ProblemKind::Invalid,
        rule: format!("{field}.exists"),
        message: format!("{field}: no {what} with this id in the practice"),
    }
}

async fn resolve(
    state: &AppState,
    caller: &Caller,
    body: &PrepareRequest,
    today: time::Date,
) -> Result<Resolved, ApiError> {
    let pending = Pending::new();
    let reader = Reader {
        store: &*state.store,
        connections: &state.connections,
        vault: state.vault().await?,
        practice: &caller.practice_id,
        pending: &pending,
    };
    let mut problems = Vec::new();
    // The practice is the token's; a body naming another is refused, never followed.
    if let Some(named) = &body.practice_id {
        if named.as_str().map(str::trim) != Some(caller.practice_id.as_str()) {
            problems.push(Problem {
                field: "practice_id".into(),
                kind: ProblemKind::Invalid,
                rule: "practice_id.caller".into(),
                message:
                    "practice_id: is not the practice of the access token (it may be left out)"
                        .into(),
            });
        }
    }
    let mut practitioner_npi = None;
    if let Some(id) = body.practitioner_id() {
        match reader.resource("Practitioner", id.as_str()).await? {
            Some(practitioner) => practitioner_npi = identifier_of(&practitioner, NPI_SYSTEM),
            None => problems.push(not_found("therapist_id", "Practitioner")),
        }
    }
    let mut member_id = None;
    let mut coverage_id = None;
    if let Some(patient) = body.patient_id() {
        if reader
            .resource("Patient", patient.as_str())
            .await?
            .is_none()
        {
            problems.push(not_found("patient_id", "Patient"));
        } else if let Some(payer) = state.claim_rules.payer_of(body) {
            let kind = kind_of("Coverage").ok_or(ApiError::Internal)?;
            let condition = format!("patient=Patient/{}", patient.as_str());
            let found =
                resources::search::find_matches(kind, state, &caller.practice_id, &condition, 50)
                    .await?;
            for stored in found {
                let json = open_json(reader.vault, &caller.practice_id, &stored)?;
                let Ok(coverage) = serde_json::from_slice::<Value>(&json) else {
                    continue;
                };
                let active = coverage
                    .get("status")
                    .and_then(Value::as_str)
                    .is_none_or(|s| s == "active");
                if active
                    && covers(
                        &payor_names(&reader, &coverage).await?,
                        payer.id(),
                        payer.name(),
                    )
                {
                    member_id = member_id_of(&coverage);
                    coverage_id = Some(stored.id.clone());
                    break;
                }
            }
        }
    }
    Ok(Resolved {
        context: ClaimContext {
            today,
            practitioner_npi,
            member_id,
        },
        coverage_id,
        problems,
    })
}

/// The 422 of a request with problems: one issue each, naming its field.
fn unprocessable(problems: &[Problem]) -> ApiError {
    let issues = problems
        .iter()
        .map(|p| {
            let code = match p.kind {
                ProblemKind::Required => "required",
                ProblemKind::Invalid => "value",
                ProblemKind::UnknownCode => "code-invalid",
                ProblemKind::BusinessRule => "business-rule",
            };
            json!({
                "severity": "error",
                "code": code,
                "details": { "coding": [{ "system": "urn:fhirgate:claim-rule", "code": p.rule }] },
                "diagnostics": p.message,
                "expression": [p.field],
            })
        })
        .collect();
    ApiError::Invalid {
        status: 422,
        issues,
    }
}

/// An amount as a FHIR Money, its decimal written exactly.
fn fhir_money(amount: &Money) -> Value {
    money_value(
        amount.minor_units,
        amount.currency.minor_units(),
        amount.currency.code(),
    )
}

/// `minor` units of `currency` (with `exponent` decimals) as a FHIR Money.
fn money_value(minor: i64, exponent: u32, currency: &str) -> Value {
    let scale = 10_i64.pow(exponent);
    let text = if exponent == 0 {
        minor.to_string()
    } else {
        let sign = if minor < 0 { "-" } else { "" };
        let abs = minor.unsigned_abs();
        let scale = scale.unsigned_abs();
        format!(
            "{sign}{}.{:0width$}",
            abs / scale,
            abs % scale,
            width = exponent as usize
        )
    };
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    json!({ "value": value, "currency": currency })
}

/// The FHIR R4 Claim of a checked session.
fn fhir_claim(claim: &CheckedClaim, coverage_id: Option<&str>, created: &str) -> Value {
    let net = Money {
        minor_units: claim.fee.minor_units * i64::from(claim.units),
        currency: claim.fee.currency,
    };
    let diagnosis: Vec<Value> = claim
        .icd10_codes
        .iter()
        .enumerate()
        .map(|(i, code)| {
            json!({
                "sequence": i + 1,
                "diagnosisCodeableConcept": { "coding": [{ "system": ICD10CM_SYSTEM, "code": code.as_str() }] },
            })
        })
        .collect();
    let pointers: Vec<usize> = (1..=claim.icd10_codes.len()).collect();
    let mut care_team = vec![json!({
        "sequence": 1,
        "provider": { "reference": format!("Practitioner/{}", claim.practitioner.as_str()) },
        "responsible": true,
        "role": { "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/claimcareteamrole",
            "code": "primary",
        }] },
    })];
    if let Some(npi) = &claim.referring_provider_npi {
        care_team.push(json!({
            "sequence": 2,
            "provider": { "identifier": { "system": NPI_SYSTEM, "value": npi.as_str() } },
            "role": {
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/claimcareteamrole",
                    "code": "other",
                }],
                "text": "referring provider",
            },
        }));
    }
    let mut insurance = Map::new();
    insurance.insert("sequence".into(), json!(1));
    insurance.insert("focal".into(), json!(true));
    insurance.insert(
        "coverage".into(),
        match coverage_id {
            Some(id) => json!({ "reference": format!("Coverage/{id}") }),
            None => {
                let mut coverage = json!({ "display": format!("{} coverage", claim.payer_name) });
                if let Some(member) = &claim.member_id {
                    coverage["identifier"] = json!({
                        "system": format!("{PAYER_SYSTEM}:{}:member", claim.payer_id),
                        "value": member,
                    });
                }
                coverage
            }
        },
    );
    if let Some(auth) = &claim.prior_authorization {
        insurance.insert("preAuthRef".into(), json!([auth]));
    }
    let mut item = json!({
        "sequence": 1,
        "careTeamSequence": [1],
        "diagnosisSequence": pointers,
        "productOrService": { "coding": [{ "system": CPT_SYSTEM, "code": claim.cpt_code.as_str() }] },
        "servicedDate": claim.date_of_service.to_string(),
        "locationCodeableConcept": { "coding": [{ "system": POS_SYSTEM, "code": claim.place_of_service }] },
        "quantity": { "value": claim.units },
        "unitPrice": fhir_money(&claim.fee),
        "net": fhir_money(&net),
    });
    if claim.copay.minor_units > 0 {
        item["extension"] = json!([{
            "url": COPAY_EXTENSION,
            "valueMoney": fhir_money(&claim.copay),
        }]);
    }
    json!({
        "resourceType": "Claim",
        "status": "active",
        "type": { "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/claim-type",
            "code": "professional",
        }] },
        "use": "claim",
        "patient": { "reference": format!("Patient/{}", claim.patient.as_str()) },
        "billablePeriod": { "start": claim.date_of_service.to_string(), "end": claim.date_of_service.to_string() },
        "created": created,
        "insurer": {
            "identifier": { "system": PAYER_SYSTEM, "value": claim.payer_id },
            "display": claim.payer_name,
        },
        "provider": { "reference": format!("Practitioner/{}", claim.practitioner.as_str()) },
        "priority": { "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/processpriority",
            "code": "normal",
        }] },
        "careTeam": care_team,
        "diagnosis": diagnosis,
        "insurance": [Value::Object(insurance)],
        "item": [item],
        "total": fhir_money(&net),
    })
}

/// `POST /api/v1/claims/prepare`.
async fn prepare(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = require_any_role(&req, ROLES, ROLES_NEEDED)?;
    let request: PrepareRequest = serde_json::from_slice(&body).map_err(|_| {
        ApiError::BadRequest("the body must be a JSON object describing the session".into())
    })?;
    let practice = state
        .store
        .get_practice(&caller.practice_id)
        .await
        .map_err(ApiError::from)?;
    let today = practice_today(practice.timezone.as_str());
    let resolved = resolve(&state, &caller, &request, today).await?;
    let checked = state.claim_rules.check(&request, &resolved.context);
    let claim = match (checked, resolved.problems.is_empty()) {
        (Ok(claim), true) => claim,
        (Ok(_), false) => return Err(unprocessable(&resolved.problems).into()),
        (Err(mut problems), _) => {
            // A reference that does not resolve is said once, by what was looked up.
            problems.retain(|p| !resolved.problems.iter().any(|r| r.field == p.field));
            let mut all = resolved.problems;
            all.extend(problems);
            return Err(unprocessable(&all).into());
        }
    };
    let kind = kind_of("Claim").ok_or(ApiError::Internal)?;
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|_| ApiError::Internal)?;
    let value = fhir_claim(&claim, resolved.coverage_id.as_deref(), &created);
    // The Claim passes the same checks as one written through /fhir/r4.
    let body = resources::check_resource(kind, value).map_err(|issues| {
        tracing::error!(
            issues = issues.len(),
            "a prepared claim failed the FHIR checks"
        );
        ApiError::Internal
    })?;
    let id = new_resource_id();
    let prepared: Prepared = resources::prepare(
        kind,
        state.vault().await?,
        &caller.practice_id,
        body,
        id.as_str(),
        Expect::Absent,
    )?;
    let lifecycle = [ClaimStatusChange {
        practice_id: caller.practice_id.clone(),
        claim_id: id.to_string(),
        status: ClaimStatus::Prepared,
        expected_version: 0,
    }];
    let mut event = request_event(&req, StatusCode::CREATED);
    event.action = Some(Action::Create);
    event.resource_type = Some("Claim".into());
    event.resource_id = Some(id.to_string());
    event.patient_id = Some(claim.patient.to_string());
    let audit = if state.skip_audit {
        vec![]
    } else {
        vec![event]
    };
    state
        .store
        .write_resources_with_claims(
            &caller.practice_id,
            std::slice::from_ref(&prepared.write),
            &audit,
            ClaimEffects {
                lifecycle: &lifecycle,
                outbox: &[],
            },
        )
        .await
        .map_err(ApiError::from)?;
    req.extensions_mut().insert(AuditedInTransaction);
    let location = format!(
        "{}{}/Claim/{}/_history/{}",
        state.base_url,
        crate::fhir::FHIR_BASE,
        id.as_str(),
        prepared.write.version_id
    );
    let stored: Value = serde_json::from_slice(&prepared.json).map_err(|_| ApiError::Internal)?;
    Ok(HttpResponse::build(StatusCode::CREATED)
        .insert_header((header::LOCATION, location))
        .insert_header((header::ETAG, resources::etag(1)))
        .json(json!({
            "claim_id": id.as_str(),
            "status": ClaimStatus::Prepared,
            "version": 1,
            "next": ClaimStatus::Prepared.next_statuses().collect::<Vec<_>>(),
            "claim": stored,
        })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_written_exactly_in_the_currencys_decimals() {
        assert_eq!(money_value(15050, 2, "USD")["value"].to_string(), "150.50");
        assert_eq!(money_value(5, 2, "USD")["value"].to_string(), "0.05");
        assert_eq!(money_value(1200, 0, "JPY")["value"].to_string(), "1200");
        assert_eq!(money_value(-250, 2, "USD")["value"].to_string(), "-2.50");
    }

    #[test]
    fn a_coverage_names_its_payer_by_id_or_name_in_any_case() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let full = "Blue Cross Blue Shield";
        assert!(covers(&names(&["bcbs"]), "BCBS", full));
        assert!(covers(
            &names(&["x", " blue cross blue shield "]),
            "BCBS",
            full
        ));
        assert!(!covers(&names(&["Aetna"]), "BCBS", full));
        assert!(!covers(&[], "BCBS", full));
    }

    #[test]
    fn a_member_id_is_the_subscriber_id_or_the_mb_identifier() {
        assert_eq!(
            member_id_of(&json!({"subscriberId": "S1", "identifier": [{"value": "X"}]})).as_deref(),
            Some("S1")
        );
        let typed = json!({"identifier": [
            {"value": "other"},
            {"type": {"coding": [{"code": "MB"}]}, "value": "M2"}
        ]});
        assert_eq!(member_id_of(&typed).as_deref(), Some("M2"));
        assert_eq!(member_id_of(&json!({"identifier": [{"value": "x"}]})), None);
    }
}
