//! The typed check: a JSON value read into fhir-sdk's R4B model through [`ValueDe`], then written
//! back and compared with what was sent ([`super::diff`]). A failure that serde raised inside a
//! value it had buffered (a contained resource, a choice element) is looked at again with the
//! type the buffer held, so its issue names the element that is wrong.

use std::num::NonZeroU32;

use fhir_sdk::r4b::{resources, types};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::de::{is_element_name, render, Ctx, Error, Kind, Path, Seg, ValueDe};
use super::{diff, IssueCode, Issues};

/// Reads `value` as `T`; on success writes it back and compares, on failure reports the error
/// (after a second look when serde had buffered the failing value) and the elements the model
/// had ignored until then.
pub(super) fn check_typed<T>(value: &Value, path: &Path<'_>, top: &Value, issues: &mut Issues)
where
    T: DeserializeOwned + Serialize,
{
    let ctx = Ctx::default();
    match T::deserialize(ValueDe::new(value, path, &ctx)) {
        Ok(typed) => match serde_json::to_value(&typed) {
            Ok(back) => diff::compare(value, &back, path, top, issues),
            Err(_) => unwritable::<T>(value, path, issues),
        },
        Err(error) => {
            // The round trip does not happen, so report what the model ignored until it failed.
            for segs in ctx.ignored.take() {
                ignored(&segs, path.root(), top, issues);
            }
            // An error the type raised itself after reading its value (`DateTime::from_str`)
            // or at the top has no path yet: it is this value's.
            refine(error.located(path, false), path.root(), top, issues);
        }
    }
}

/// A key the model ignored: an unknown element, but for R4's `_implicitRules` and `_language`
/// of a resource, which fhir-sdk's R4B resources do not model (the round trip checks those).
fn ignored(segs: &[Seg], root: &str, top: &Value, issues: &mut Issues) {
    let Some((Seg::Key(key), parent)) = segs.split_last() else {
        return;
    };
    let of_resource = navigate(top, parent).is_some_and(|p| p.get("resourceType").is_some());
    if of_resource && (key == "_implicitRules" || key == "_language") {
        return;
    }
    if is_element_name(key) {
        issues.push(IssueCode::Structure, render(root, segs), "unknown element");
    } else {
        issues.push(
            IssueCode::Structure,
            render(root, parent),
            "an element whose name is not a FHIR element name",
        );
    }
}

/// Whether `value` reads as `T` and writes back.
fn round_trips<T: DeserializeOwned + Serialize>(value: &Value) -> bool {
    let ctx = Ctx::default();
    let root = Path::Root {
        name: "",
        prefix: &[],
    };
    T::deserialize(ValueDe::new(value, &root, &ctx))
        .is_ok_and(|typed| serde_json::to_value(&typed).is_ok())
}

/// Checks a resource of any type fhir-sdk models; false if it models no such type.
pub(super) fn check_resource(
    resource_type: &str,
    value: &Value,
    path: &Path<'_>,
    top: &Value,
    issues: &mut Issues,
) -> bool {
    dispatch_resource(resource_type, value, path, top, issues)
}

macro_rules! resource_types {
    ($($name:ident)*) => {
        /// Every resource type of fhir-sdk's R4B module.
        #[cfg(test)]
        pub(super) const RESOURCE_TYPES: &[&str] = &[$(stringify!($name)),*];

        // Each type is read directly (not through the `Resource` enum, which is internally
        // tagged and so buffers the whole resource before reading it, losing every path).
        fn dispatch_resource(
            resource_type: &str,
            value: &Value,
            path: &Path<'_>,
            top: &Value,
            issues: &mut Issues,
        ) -> bool {
            match resource_type {
                $(stringify!($name) => check_typed::<resources::$name>(value, path, top, issues),)*
                _ => return false,
            }
            true
        }
    };
}

resource_types! {
    Account ActivityDefinition AdministrableProductDefinition AdverseEvent AllergyIntolerance
    Appointment AppointmentResponse AuditEvent Basic Binary BiologicallyDerivedProduct
    BodyStructure Bundle CapabilityStatement CarePlan CareTeam CatalogEntry ChargeItem
    ChargeItemDefinition Citation Claim ClaimResponse ClinicalImpression ClinicalUseDefinition
    CodeSystem Communication CommunicationRequest CompartmentDefinition Composition ConceptMap
    Condition Consent Contract Coverage CoverageEligibilityRequest CoverageEligibilityResponse
    DetectedIssue Device DeviceDefinition DeviceMetric DeviceRequest DeviceUseStatement
    DiagnosticReport DocumentManifest DocumentReference Encounter Endpoint EnrollmentRequest
    EnrollmentResponse EpisodeOfCare EventDefinition Evidence EvidenceReport EvidenceVariable
    ExampleScenario ExplanationOfBenefit FamilyMemberHistory Flag Goal GraphDefinition Group
    GuidanceResponse HealthcareService ImagingStudy Immunization ImmunizationEvaluation
    ImmunizationRecommendation ImplementationGuide Ingredient InsurancePlan Invoice Library
    Linkage List Location ManufacturedItemDefinition Measure MeasureReport Media Medication
    MedicationAdministration MedicationDispense MedicationKnowledge MedicationRequest
    MedicationStatement MedicinalProductDefinition MessageDefinition MessageHeader
    MolecularSequence NamingSystem NutritionOrder NutritionProduct Observation
    ObservationDefinition OperationDefinition OperationOutcome Organization
    OrganizationAffiliation PackagedProductDefinition Parameters Patient PaymentNotice
    PaymentReconciliation Person PlanDefinition Practitioner PractitionerRole Procedure Provenance
    Questionnaire QuestionnaireResponse RegulatedAuthorization RelatedPerson RequestGroup
    ResearchDefinition ResearchElementDefinition ResearchStudy ResearchSubject RiskAssessment
    Schedule SearchParameter ServiceRequest Slot Specimen SpecimenDefinition StructureDefinition
    StructureMap Subscription SubscriptionStatus SubscriptionTopic Substance SubstanceDefinition
    SupplyDelivery SupplyRequest Task TerminologyCapabilities TestReport TestScript ValueSet
    VerificationResult VisionPrescription
}

type Checker = fn(&Value, &Path<'_>, &Value, &mut Issues);

/// The types a choice element (`value[x]`) takes, by the suffix of its JSON name
/// (`deceasedDateTime`, `valueQuantity`), longest first so `DateTime` wins over `Time`.
const CHOICE_TYPES: &[(&str, Checker)] = &[
    ("CodeableReference", check_typed::<types::CodeableReference>),
    (
        "ParameterDefinition",
        check_typed::<types::ParameterDefinition>,
    ),
    ("TriggerDefinition", check_typed::<types::TriggerDefinition>),
    ("DataRequirement", check_typed::<types::DataRequirement>),
    ("CodeableConcept", check_typed::<types::CodeableConcept>),
    ("RelatedArtifact", check_typed::<types::RelatedArtifact>),
    ("ContactDetail", check_typed::<types::ContactDetail>),
    ("ContactPoint", check_typed::<types::ContactPoint>),
    ("Base64Binary", check_typed::<fhir_sdk::Base64Binary>),
    ("UsageContext", check_typed::<types::UsageContext>),
    ("SampledData", check_typed::<types::SampledData>),
    ("Contributor", check_typed::<types::Contributor>),
    ("UnsignedInt", check_typed::<u32>),
    ("PositiveInt", check_typed::<NonZeroU32>),
    ("Identifier", check_typed::<types::Identifier>),
    ("Attachment", check_typed::<types::Attachment>),
    ("Annotation", check_typed::<types::Annotation>),
    ("Expression", check_typed::<types::Expression>),
    ("RatioRange", check_typed::<types::RatioRange>),
    ("Reference", check_typed::<types::Reference>),
    ("HumanName", check_typed::<types::HumanName>),
    ("Signature", check_typed::<types::Signature>),
    ("Canonical", check_typed::<String>),
    ("Markdown", check_typed::<String>),
    ("DateTime", check_typed::<fhir_sdk::DateTime>),
    ("Quantity", check_typed::<types::Quantity>),
    ("Distance", check_typed::<types::Distance>),
    ("Duration", check_typed::<types::Duration>),
    ("Address", check_typed::<types::Address>),
    ("Boolean", check_typed::<bool>),
    ("Decimal", check_typed::<f64>),
    ("Instant", check_typed::<fhir_sdk::Instant>),
    ("Integer", check_typed::<i32>),
    ("Period", check_typed::<types::Period>),
    ("String", check_typed::<String>),
    ("Coding", check_typed::<types::Coding>),
    ("Timing", check_typed::<types::Timing>),
    ("Dosage", check_typed::<types::Dosage>),
    ("Range", check_typed::<types::Range>),
    ("Ratio", check_typed::<types::Ratio>),
    ("Money", check_typed::<types::Money>),
    ("Count", check_typed::<types::Count>),
    ("Code", check_typed::<String>),
    ("Date", check_typed::<fhir_sdk::Date>),
    ("Time", check_typed::<fhir_sdk::Time>),
    ("Meta", check_typed::<types::Meta>),
    ("Uuid", check_typed::<String>),
    ("Age", check_typed::<types::Age>),
    ("Oid", check_typed::<String>),
    ("Uri", check_typed::<String>),
    ("Url", check_typed::<String>),
    ("Id", check_typed::<String>),
];

/// The names of the choice elements (`deceased[x]` is `deceased`) of fhir-sdk's R4B model,
/// sorted: a key is read as a choice element only with one of these stems, so `fooString` stays
/// an unknown element.
pub(super) const CHOICE_STEMS: &[&str] = &[
    "abatement",
    "additive",
    "age",
    "allowed",
    "amount",
    "answer",
    "asNeeded",
    "author",
    "born",
    "bounds",
    "characteristic",
    "chargeItem",
    "citeAs",
    "code",
    "collected",
    "concentration",
    "content",
    "created",
    "date",
    "deceased",
    "defaultValue",
    "definition",
    "detail",
    "diagnosis",
    "dose",
    "doseNumber",
    "due",
    "duration",
    "effective",
    "entity",
    "event",
    "example",
    "fastingStatus",
    "fixed",
    "identified",
    "indication",
    "item",
    "legallyBinding",
    "location",
    "manufacturer",
    "maxValue",
    "medication",
    "minValue",
    "minimumVolume",
    "module",
    "multipleBirth",
    "name",
    "occurred",
    "occurrence",
    "offset",
    "onset",
    "participantEffective",
    "pattern",
    "performed",
    "period",
    "presentation",
    "probability",
    "procedure",
    "product",
    "quantity",
    "rate",
    "reported",
    "scheduled",
    "seriesDoses",
    "serviced",
    "source",
    "start",
    "statusReason",
    "strength",
    "studyEffective",
    "subject",
    "substance",
    "substanceDefinition",
    "target",
    "time",
    "timing",
    "topic",
    "used",
    "value",
    "when",
];

/// The type suffix of a choice element's JSON name (`deceased` + `DateTime`), if it has one.
/// The primitive extension of a choice element (`_valueString`) counts too.
pub(super) fn choice_split(key: &str) -> Option<(&str, Checker)> {
    let name = key.strip_prefix('_').unwrap_or(key);
    CHOICE_TYPES.iter().find_map(|(suffix, checker)| {
        let stem = name.strip_suffix(suffix)?;
        let last = stem.chars().last()?;
        let shaped = last.is_ascii_lowercase() || last.is_ascii_digit();
        (shaped && CHOICE_STEMS.binary_search(&stem).is_ok()).then_some((stem, *checker))
    })
}

/// Checks a choice element's value by the type its name carries; false if the name carries none.
pub(super) fn check_choice(
    key: &str,
    value: &Value,
    path: &Path<'_>,
    top: &Value,
    issues: &mut Issues,
) -> bool {
    match choice_split(key) {
        Some(_) if key.starts_with('_') => {
            check_typed::<types::FieldExtension>(value, path, top, issues);
            true
        }
        Some((_, checker)) => {
            checker(value, path, top, issues);
            true
        }
        None => false,
    }
}

pub(super) const NOT_A_RESOURCE_TYPE: &str = "not a resource type of FHIR R4B";

/// Turns a deserialization error into issues, looking again where serde had buffered.
fn refine(error: Error, root: &str, top: &Value, issues: &mut Issues) {
    let segs = error.path.clone().unwrap_or_default();
    let here = navigate(top, &segs);
    let at = Path::Root {
        name: root,
        prefix: &segs,
    };
    let before = issues.len();
    if error.buffered {
        // A resource inside another (contained, Bundle.entry.resource): check it by its type.
        if let Some((v, rt)) = here.and_then(|v| Some((v, v.get("resourceType")?.as_str()?))) {
            if !check_resource(rt, v, &at, top, issues) {
                issues.push(
                    IssueCode::Structure,
                    Path::Key(&at, "resourceType").render(),
                    NOT_A_RESOURCE_TYPE,
                );
            }
        }
    }
    if !error.buffered_keys.is_empty() {
        // A struct with choice elements failed after its entries: one of the buffered choice
        // values is wrong. Each carries its type in its name.
        if let Some(Value::Object(map)) = here {
            for key in &error.buffered_keys {
                if let Some(v) = map.get(key) {
                    check_choice(key, v, &Path::Key(&at, key), top, issues);
                }
            }
        }
    }
    if issues.len() > before {
        return;
    }
    match &error.kind {
        Kind::Missing(field) => {
            let path = Path::Key(&at, field);
            issues.push_kind(&error.kind, path.render());
        }
        Kind::MissingChoice(enum_name) => {
            let element = choice_element_name(root, &segs, enum_name);
            // Present, but with a type this choice element does not take (`valueString` where
            // only `valueCodeableConcept` and the like are allowed)?
            let stem = element.as_deref().and_then(|e| e.strip_suffix("[x]"));
            let wrong_type = error.buffered_keys.iter().find(|k| {
                !k.starts_with('_') && stem.is_some() && choice_split(k).map(|(s, _)| s) == stem
            });
            match (wrong_type, &element) {
                (Some(key), _) => issues.push(
                    IssueCode::Structure,
                    Path::Key(&at, key).render(),
                    diff::NOT_THIS_TYPE,
                ),
                (None, Some(element)) => {
                    issues.push_kind(&error.kind, Path::Key(&at, element).render());
                }
                (None, None) => issues.push_kind(&error.kind, at.render()),
            }
        }
        // serde read the tag of a contained resource (`Resource` is internally tagged).
        Kind::BadCode if segs.last() == Some(&Seg::Key("resourceType".into())) => {
            issues.push(IssueCode::Structure, at.render(), NOT_A_RESOURCE_TYPE);
        }
        kind => issues.push_kind(kind, at.render()),
    }
}

/// The value at `segs` below `top`.
pub(super) fn navigate<'v>(top: &'v Value, segs: &[Seg]) -> Option<&'v Value> {
    segs.iter().try_fold(top, |v, seg| match seg {
        Seg::Key(k) => v.get(k.as_str()),
        Seg::Index(i) => v.get(*i),
    })
}

/// `value[x]` for the enum `CoverageCostToBeneficiaryValue` at `Coverage.costToBeneficiary[0]`:
/// fhir-sdk names a choice enum after its element's path.
fn choice_element_name(root: &str, segs: &[Seg], enum_name: &str) -> Option<String> {
    let mut owner = String::from(root);
    for seg in segs {
        if let Seg::Key(k) = seg {
            let mut chars = k.chars();
            if let Some(first) = chars.next() {
                owner.push(first.to_ascii_uppercase());
                owner.push_str(chars.as_str());
            }
        }
    }
    let rest = enum_name.strip_prefix(&owner)?;
    let mut chars = rest.chars();
    let first = chars.next()?;
    Some(format!(
        "{}{}[x]",
        first.to_ascii_lowercase(),
        chars.as_str()
    ))
}

/// fhir-sdk read the value but cannot write it back: its `Date` writes only four-digit years, so
/// a date such as `0999` or `19741225` (read as the year 19741225) fails here, without a path.
/// The culprits are among the strings that read as such a year: each is tried in turn with the
/// others set right (a rare path, so the few extra round trips do not matter).
fn unwritable<T: DeserializeOwned + Serialize>(
    value: &Value,
    path: &Path<'_>,
    issues: &mut Issues,
) {
    fn years(value: &Value, at: &mut Vec<Seg>, found: &mut Vec<Vec<Seg>>) {
        match value {
            Value::String(s) => {
                let year = match s.parse::<fhir_sdk::Date>() {
                    Ok(fhir_sdk::Date::Year(y) | fhir_sdk::Date::YearMonth(y, _)) => Some(y),
                    _ => None,
                };
                if year.is_some_and(|y| !(1000..10000).contains(&y)) {
                    found.push(at.clone());
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    at.push(Seg::Index(i));
                    years(item, at, found);
                    at.pop();
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    at.push(Seg::Key(k.clone()));
                    years(v, at, found);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    fn set(value: &mut Value, segs: &[Seg], to: Value) {
        let slot = segs.iter().try_fold(value, |v, seg| match seg {
            Seg::Key(k) => v.get_mut(k.as_str()),
            Seg::Index(i) => v.get_mut(*i),
        });
        if let Some(slot) = slot {
            *slot = to;
        }
    }
    let mut candidates = Vec::new();
    years(value, &mut Vec::new(), &mut candidates);
    let mut fixed = value.clone();
    for c in &candidates {
        set(&mut fixed, c, Value::String("2000".into()));
    }
    let prefix = path.segments();
    let mut found = false;
    if round_trips::<T>(&fixed) {
        for c in &candidates {
            let mut one = fixed.clone();
            set(
                &mut one,
                c,
                navigate(value, c).cloned().unwrap_or(Value::Null),
            );
            if !round_trips::<T>(&one) {
                found = true;
                let segs: Vec<Seg> = prefix.iter().chain(c).cloned().collect();
                issues.push_kind(&Kind::BadDate, render(path.root(), &segs));
            }
        }
    }
    if !found {
        issues.push_kind(&Kind::Invalid, path.render());
    }
}
