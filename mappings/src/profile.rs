//! Mapping profiles: one TOML file per vendor in `mappings/profiles/`, loaded and checked at
//! start-up. A profile that does not load stops the start with a message naming the file and the
//! key (never a value from a resource: profiles hold no PHI).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The profiles shipped with the gateway, by vendor: every `mappings/profiles/*.toml`, found by
/// `build.rs` (adding a vendor's profile is adding its file), sorted by file name.
pub const BUILT_IN: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/built_in_profiles.rs"));

/// The text of a built-in profile.
pub fn built_in_text(vendor: &str) -> Option<&'static str> {
    BUILT_IN.iter().find(|(v, _)| *v == vendor).map(|(_, t)| *t)
}

/// The coded elements a profile may translate: the key under `[codes]`, where the code sits, and
/// the FHIR codes (the element's required value set) a translation may produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeElement {
    /// `Patient.gender`, `Practitioner.gender` (AdministrativeGender).
    Gender,
    /// The US Core birth-sex extension's `valueCode` (F, M, UNK).
    BirthSex,
    /// `HumanName.use` (NameUse).
    NameUse,
    /// `ContactPoint.system` (ContactPointSystem).
    TelecomSystem,
    /// `ContactPoint.use` (ContactPointUse).
    TelecomUse,
    /// `Address.use` (AddressUse).
    AddressUse,
    /// `Coverage.status` (FinancialResourceStatusCodes).
    CoverageStatus,
    /// `Encounter.status` (EncounterStatus).
    EncounterStatus,
}

impl CodeElement {
    pub const ALL: [CodeElement; 8] = [
        CodeElement::Gender,
        CodeElement::BirthSex,
        CodeElement::NameUse,
        CodeElement::TelecomSystem,
        CodeElement::TelecomUse,
        CodeElement::AddressUse,
        CodeElement::CoverageStatus,
        CodeElement::EncounterStatus,
    ];

    /// The key of its table under `[codes]`.
    pub fn key(self) -> &'static str {
        match self {
            CodeElement::Gender => "gender",
            CodeElement::BirthSex => "birth_sex",
            CodeElement::NameUse => "name_use",
            CodeElement::TelecomSystem => "telecom_system",
            CodeElement::TelecomUse => "telecom_use",
            CodeElement::AddressUse => "address_use",
            CodeElement::CoverageStatus => "coverage_status",
            CodeElement::EncounterStatus => "encounter_status",
        }
    }

    /// The FHIR R4 codes of the element (its required binding).
    pub fn fhir_codes(self) -> &'static [&'static str] {
        match self {
            CodeElement::Gender => &["male", "female", "other", "unknown"],
            CodeElement::BirthSex => &["F", "M", "UNK"],
            CodeElement::NameUse => &[
                "usual",
                "official",
                "temp",
                "nickname",
                "anonymous",
                "old",
                "maiden",
            ],
            CodeElement::TelecomSystem => {
                &["phone", "fax", "email", "pager", "url", "sms", "other"]
            }
            CodeElement::TelecomUse => &["home", "work", "temp", "old", "mobile"],
            CodeElement::AddressUse => &["home", "work", "temp", "old", "billing"],
            CodeElement::CoverageStatus => &["active", "cancelled", "draft", "entered-in-error"],
            CodeElement::EncounterStatus => &[
                "planned",
                "arrived",
                "triaged",
                "in-progress",
                "onleave",
                "finished",
                "cancelled",
                "entered-in-error",
                "unknown",
            ],
        }
    }
}

/// The SSN identifier systems: the FHIR one and the SSA's OID.
pub const SSN_SYSTEMS: &[&str] = &[
    "http://hl7.org/fhir/sid/us-ssn",
    "urn:oid:2.16.840.1.113883.4.1",
];

/// One vendor's mapping conventions.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub vendor: String,
    pub identifiers: Identifiers,
    pub extensions: Extensions,
    #[serde(default)]
    pub codes: Codes,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Identifiers {
    /// Systems of `Patient.identifier` that carry the MRN, in order of preference. Without a
    /// match, an identifier typed `MR` (HL7 v2-0203) is the MRN.
    pub mrn_systems: Vec<String>,
    pub npi_system: String,
    pub tax_id_system: String,
    /// Systems of `Coverage.identifier` that carry the member id (else `Coverage.subscriberId`).
    pub member_id_systems: Vec<String>,
    /// Whether a Patient's social security number (an identifier of [`SSN_SYSTEMS`] or typed
    /// `SS`) enters the internal model. Off unless a profile says so: the practice's systems do
    /// not need it, and what is not kept cannot leak.
    #[serde(default)]
    pub keep_ssn: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Extensions {
    pub race: String,
    pub ethnicity: String,
    pub birth_sex: String,
}

/// Vendor code -> FHIR code, per element (see [`CodeElement`]). A code without a translation
/// passes through, and must then be FHIR's own.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Codes {
    #[serde(default)]
    pub gender: BTreeMap<String, String>,
    #[serde(default)]
    pub birth_sex: BTreeMap<String, String>,
    #[serde(default)]
    pub name_use: BTreeMap<String, String>,
    #[serde(default)]
    pub telecom_system: BTreeMap<String, String>,
    #[serde(default)]
    pub telecom_use: BTreeMap<String, String>,
    #[serde(default)]
    pub address_use: BTreeMap<String, String>,
    #[serde(default)]
    pub coverage_status: BTreeMap<String, String>,
    #[serde(default)]
    pub encounter_status: BTreeMap<String, String>,
}

impl Codes {
    /// The translation table of an element.
    pub fn table(&self, element: CodeElement) -> &BTreeMap<String, String> {
        match element {
            CodeElement::Gender => &self.gender,
            CodeElement::BirthSex => &self.birth_sex,
            CodeElement::NameUse => &self.name_use,
            CodeElement::TelecomSystem => &self.telecom_system,
            CodeElement::TelecomUse => &self.telecom_use,
            CodeElement::AddressUse => &self.address_use,
            CodeElement::CoverageStatus => &self.coverage_status,
            CodeElement::EncounterStatus => &self.encounter_status,
        }
    }
}

/// Why a profile does not load: the file, the key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("mapping profile {file}: {message}")]
    Invalid { file: String, message: String },
    #[error("mapping profile {file}: cannot be read ({kind})")]
    Unreadable {
        file: String,
        kind: std::io::ErrorKind,
    },
    #[error("mapping profiles: two profiles for vendor `{0}`")]
    Duplicate(String),
}

impl Profile {
    /// Parses and checks a profile; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ProfileError> {
        let invalid = |message: String| ProfileError::Invalid {
            file: file.to_owned(),
            message,
        };
        // toml's message names the key and the line (unknown keys, wrong types, missing keys).
        let profile: Profile = toml::from_str(text)
            .map_err(|e| invalid(e.message().to_owned() + &location(text, e.span())))?;
        let stem = Path::new(file)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if !stem.is_empty() && profile.vendor != stem {
            return Err(invalid(format!(
                "vendor: `{}` differs from the file name `{stem}`",
                profile.vendor
            )));
        }
        let uris = [
            ("identifiers.npi_system", &profile.identifiers.npi_system),
            (
                "identifiers.tax_id_system",
                &profile.identifiers.tax_id_system,
            ),
            ("extensions.race", &profile.extensions.race),
            ("extensions.ethnicity", &profile.extensions.ethnicity),
            ("extensions.birth_sex", &profile.extensions.birth_sex),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(
            profile
                .identifiers
                .mrn_systems
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("identifiers.mrn_systems[{i}]"), v)),
        )
        .chain(
            profile
                .identifiers
                .member_id_systems
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("identifiers.member_id_systems[{i}]"), v)),
        );
        for (key, value) in uris {
            if !is_uri(value) {
                return Err(invalid(format!(
                    "{key}: expected an absolute URI (http(s)://..., urn:oid:..., urn:uuid:...)"
                )));
            }
        }
        for element in CodeElement::ALL {
            let allowed = element.fhir_codes();
            for (from, to) in profile.codes.table(element) {
                let key = format!("codes.{}.{from}", element.key());
                if !allowed.contains(&to.as_str()) {
                    return Err(invalid(format!(
                        "{key}: expected one of {}",
                        allowed.join(", ")
                    )));
                }
                // Translating one FHIR code into another would rewrite what a conformant
                // feed means.
                if allowed.contains(&from.as_str()) && from != to {
                    return Err(invalid(format!(
                        "{key}: a FHIR code of the element cannot be translated"
                    )));
                }
            }
        }
        Ok(profile)
    }

    /// The FHIR code of `element` for a code a feed sent: the profile's translation, or the
    /// code itself when it is FHIR's; `None` when it is neither.
    pub fn code<'a>(&'a self, element: CodeElement, code: &'a str) -> Option<&'a str> {
        match self.codes.table(element).get(code) {
            Some(fhir) => Some(fhir.as_str()),
            None => element.fhir_codes().contains(&code).then_some(code),
        }
    }

    /// The FHIR gender code for a code a feed sent (see [`Profile::code`]).
    pub fn gender<'a>(&'a self, code: &'a str) -> Option<&'a str> {
        self.code(CodeElement::Gender, code)
    }
}

/// Where a TOML error is: the line, and the key written on it.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default();
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() => {
            format!(" (key `{}`, line {line_no})", key.trim())
        }
        _ => format!(" (line {line_no})"),
    }
}

fn is_uri(value: &str) -> bool {
    let scheme_ok = value.starts_with("http://")
        || value.starts_with("https://")
        || value.starts_with("urn:oid:")
        || value.starts_with("urn:uuid:")
        || value.starts_with("urn:");
    scheme_ok && !value.contains(char::is_whitespace) && value.len() > "urn:".len()
}

/// Every profile, by vendor: the built-in ones, replaced or extended by the `*.toml` files of a
/// directory.
#[derive(Debug, Clone)]
pub struct Profiles(HashMap<String, Profile>);

impl Profiles {
    /// The built-in profiles (they are checked by this crate's tests).
    pub fn built_in() -> Result<Self, ProfileError> {
        let mut map = HashMap::new();
        for (vendor, text) in BUILT_IN {
            let profile = Profile::parse(&format!("{vendor}.toml"), text)?;
            map.insert(profile.vendor.clone(), profile);
        }
        Ok(Self(map))
    }

    /// The built-in profiles with those of `dir` (a deployment's own) over them.
    pub fn load(dir: &Path) -> Result<Self, ProfileError> {
        let mut profiles = Self::built_in()?;
        let unreadable = |file: &Path, e: std::io::Error| ProfileError::Unreadable {
            file: file.display().to_string(),
            kind: e.kind(),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| unreadable(dir, e))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        let mut seen = std::collections::HashSet::new();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|e| unreadable(&file, e))?;
            let profile = Profile::parse(&file.display().to_string(), &text)?;
            if !seen.insert(profile.vendor.clone()) {
                return Err(ProfileError::Duplicate(profile.vendor));
            }
            profiles.0.insert(profile.vendor.clone(), profile);
        }
        Ok(profiles)
    }

    pub fn get(&self, vendor: &str) -> Option<&Profile> {
        self.0.get(vendor)
    }

    pub fn vendors(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic() -> String {
        built_in_text("generic").unwrap().to_owned()
    }

    #[test]
    fn the_built_in_profiles_load() {
        let profiles = Profiles::built_in().unwrap();
        let mut vendors: Vec<&str> = profiles.vendors().collect();
        vendors.sort_unstable();
        assert_eq!(vendors, ["athena", "cerner", "epic", "generic"]);
        for (stem, text) in BUILT_IN {
            let profile = Profile::parse(stem, text).unwrap();
            assert_eq!(
                &profile.vendor, stem,
                "a profile's file is named after its vendor"
            );
        }
    }

    #[test]
    fn a_bad_profile_names_its_file_and_key() {
        let cases = [
            (
                generic().replace("[extensions]", "[extensions]\nrace_v2 = \"x\""),
                "race_v2",
            ),
            (
                generic().replace(
                    "npi_system = \"http://hl7.org/fhir/sid/us-npi\"",
                    "npi_system = 42",
                ),
                "npi_system",
            ),
            (
                generic().replace("birth_sex = ", "# birth_sex = "),
                "birth_sex",
            ),
            (
                generic().replace(
                    "tax_id_system = \"urn:oid:2.16.840.1.113883.4.4\"",
                    "tax_id_system = \"not a uri\"",
                ),
                "identifiers.tax_id_system",
            ),
            (
                generic().replace("[codes.gender]", "[codes.gender]\nX = \"robot\""),
                "codes.gender.X",
            ),
            (
                generic().replace("vendor = \"generic\"", "vendor = \"epic\""),
                "vendor",
            ),
            (
                generic().replace("[codes.gender]", "[codes.gender]\nmale = \"female\""),
                "codes.gender.male",
            ),
            (
                generic() + "\n[codes.marital_status]\nX = \"M\"\n",
                "marital_status",
            ),
            (
                generic().replace(
                    "member_id_systems = []",
                    "member_id_systems = []\nkeep_ssn = \"yes\"",
                ),
                "keep_ssn",
            ),
        ];
        // A translation of each element to a code outside its value set names that key.
        let mut cases: Vec<(String, String)> = cases
            .into_iter()
            .map(|(text, key)| (text, key.to_owned()))
            .collect();
        for element in CodeElement::ALL {
            let key = element.key();
            cases.push((
                generic().replace("[codes.gender]", "")
                    + &format!("\n[codes.{key}]\nVENDOR = \"not-fhir\"\n"),
                format!("codes.{key}.VENDOR: expected one of"),
            ));
        }
        for (text, key) in cases {
            let err = Profile::parse("profiles/generic.toml", &text)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("mapping profile profiles/generic.toml: "),
                "{err}"
            );
            assert!(err.contains(&key), "{key}: {err}");
        }
    }

    #[test]
    fn a_directory_overrides_the_built_in_profiles() {
        let dir = std::env::temp_dir().join(format!("fhirgate-profiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let custom = generic()
            .replace("vendor = \"generic\"", "vendor = \"epic\"")
            .replace("mrn_systems = []", "mrn_systems = [\"urn:oid:1.2.3.4\"]");
        std::fs::write(dir.join("epic.toml"), custom).unwrap();
        let profiles = Profiles::load(&dir).unwrap();
        assert_eq!(
            profiles.get("epic").unwrap().identifiers.mrn_systems,
            ["urn:oid:1.2.3.4"]
        );
        assert!(profiles.get("cerner").is_some());
        std::fs::write(dir.join("broken.toml"), "vendor = \"broken\"\n").unwrap();
        let err = Profiles::load(&dir).unwrap_err().to_string();
        assert!(err.contains("broken.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_code_element_translates_or_passes_fhir_codes_through() {
        let mut profile = Profile::parse("generic.toml", &generic()).unwrap();
        assert!(!profile.identifiers.keep_ssn);
        profile
            .codes
            .coverage_status
            .insert("terminated".into(), "cancelled".into());
        assert_eq!(
            profile.code(CodeElement::CoverageStatus, "terminated"),
            Some("cancelled")
        );
        for element in CodeElement::ALL {
            for code in element.fhir_codes() {
                assert_eq!(profile.code(element, code), Some(*code));
            }
            assert_eq!(profile.code(element, "no-such-code"), None);
        }
    }

    #[test]
    fn gender_codes_translate_or_pass_through() {
        let mut profile = Profile::parse("generic.toml", &generic()).unwrap();
        profile.codes.gender.insert("M".into(), "male".into());
        assert_eq!(profile.gender("M"), Some("male"));
        assert_eq!(profile.gender("female"), Some("female"));
        assert_eq!(profile.gender("X"), None);
    }
}
