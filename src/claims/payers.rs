//! Payer rules as data: one YAML file per payer in `config/payers/`, loaded and checked once at
//! start (schema: `config/payers/README.md`). Adding a payer is dropping a file and restarting.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::codes::{is_slug, CptTable};
use super::LoadError;

/// A payer as loaded from its file; read-only once loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct Payer {
    id: String,
    name: String,
    timely_filing_days: u16,
    member_id: MemberIdRule,
    rules: Vec<PayerRule>,
    file: PathBuf,
}

impl Payer {
    /// `[A-Z0-9_-]{1,32}`, e.g. `BCBS`: what requests send as `payer_id`.
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// A claim may be filed until `date_of_service + timely_filing_days` (that day included).
    pub fn timely_filing_days(&self) -> u16 {
        self.timely_filing_days
    }
    pub fn member_id(&self) -> &MemberIdRule {
        &self.member_id
    }
    pub fn rules(&self) -> &[PayerRule] {
        &self.rules
    }
    /// The file it was loaded from.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

/// `member_id:` in a payer file. A payer needs the patient's member id unless it says
/// `required: false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberIdRule {
    #[serde(default = "yes")]
    pub required: bool,
    #[serde(default)]
    pub format: Option<MemberIdFormat>,
}

impl Default for MemberIdRule {
    fn default() -> Self {
        Self {
            required: true,
            format: None,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberIdFormat {
    /// A Medicare Beneficiary Identifier (CMS, "Understanding the Medicare Beneficiary Identifier
    /// format"): 11 characters, no dashes.
    Mbi,
}

impl MemberIdFormat {
    /// Whether `value` has this format; letters are compared case-insensitively.
    pub fn matches(self, value: &str) -> bool {
        match self {
            Self::Mbi => is_mbi(value),
        }
    }
}

/// MBI positions (1-based): 1 a digit 1-9; 2, 5, 8, 9 a letter; 3, 6 a letter or a digit;
/// 4, 7, 10, 11 a digit. Letters exclude S, L, O, I, B and Z.
pub fn is_mbi(value: &str) -> bool {
    let b = value.as_bytes();
    if b.len() != 11 {
        return false;
    }
    let letter = |c: u8| {
        let c = c.to_ascii_uppercase();
        c.is_ascii_uppercase() && !b"SLOIBZ".contains(&c)
    };
    let digit = |c: u8| c.is_ascii_digit();
    (b'1'..=b'9').contains(&b[0])
        && [1, 4, 7, 8].iter().all(|&i| letter(b[i]))
        && [2, 5].iter().all(|&i| letter(b[i]) || digit(b[i]))
        && [3, 6, 9, 10].iter().all(|&i| digit(b[i]))
}

/// One entry of `rules:`: when the claim matches `when`, it must satisfy `require`.
#[derive(Debug, Clone, PartialEq)]
pub struct PayerRule {
    /// `[a-z0-9-]{1,40}`, unique within the payer; problems carry `payer.{PAYER}.{id}`.
    pub id: String,
    pub when: When,
    pub require: Requirement,
    /// Shown to the client after the field name; from config, so it may name codes and payers.
    pub message: Option<String>,
}

/// Conditions that must all hold for a rule to apply (each list: any of its values). An empty
/// `when` applies to every claim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// CPT codes from `config/codes/cpt.csv`.
    #[serde(default)]
    pub cpt: Vec<String>,
    /// CPT families from `config/codes/cpt.csv` (e.g. `psychotherapy`).
    #[serde(default)]
    pub family: Vec<String>,
    /// Two-digit CMS place-of-service codes.
    #[serde(default)]
    pub place_of_service: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `prior_authorization` must be given.
    PriorAuthorization,
    /// `referring_provider_npi` must be given (and is then checked like any NPI).
    ReferringProvider,
    /// The member id must be known (request or Coverage), even if `member_id.required` is false.
    MemberId,
    /// `units` must not exceed this (1-99).
    MaxUnits(u8),
    /// `place_of_service` must be one of these.
    PlaceOfServiceIn(Vec<String>),
}

const REQUIREMENT_NAMES: &[&str] = &["prior_authorization", "referring_provider", "member_id"];
const REQUIREMENT_KEYS: &[&str] = &["max_units", "place_of_service_in"];

/// `require: prior_authorization` or `require: { max_units: 1 }` (a one-key map rather than the
/// YAML tags `yaml_serde` expects for enums, which few people know how to write).
impl<'de> Deserialize<'de> for Requirement {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};

        struct RequirementVisitor;

        impl<'de> Visitor<'de> for RequirementVisitor {
            type Value = Requirement;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "prior_authorization, referring_provider, member_id, \
                     { max_units: N } or { place_of_service_in: [...] }",
                )
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<Requirement, E> {
                match name {
                    "prior_authorization" => Ok(Requirement::PriorAuthorization),
                    "referring_provider" => Ok(Requirement::ReferringProvider),
                    "member_id" => Ok(Requirement::MemberId),
                    other => Err(E::unknown_variant(other, REQUIREMENT_NAMES)),
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Requirement, A::Error> {
                let key: String = map
                    .next_key()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let requirement = match key.as_str() {
                    "max_units" => Requirement::MaxUnits(map.next_value()?),
                    "place_of_service_in" => Requirement::PlaceOfServiceIn(map.next_value()?),
                    other => return Err(de::Error::unknown_variant(other, REQUIREMENT_KEYS)),
                };
                if map.next_key::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("require takes exactly one key"));
                }
                Ok(requirement)
            }
        }

        deserializer.deserialize_any(RequirementVisitor)
    }
}

/// The file's shape; turned into a [`Payer`] only after every value is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PayerFile {
    id: String,
    name: String,
    timely_filing_days: i64,
    #[serde(default)]
    member_id: MemberIdRule,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    id: String,
    #[serde(default)]
    when: When,
    require: Requirement,
    #[serde(default)]
    message: Option<String>,
}

/// Every `*.yaml` (or `*.yml`) file of `dir`, in name order; other files (the README) are skipped.
pub(crate) fn load_payers(
    dir: &Path,
    cpt: &CptTable,
) -> Result<BTreeMap<String, Payer>, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|e| LoadError::read(dir, &e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| LoadError::read(dir, &e))?.path();
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        if yaml && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(LoadError::new(
            dir,
            "(directory)",
            "has no payer files (*.yaml); see config/payers/README.md",
        ));
    }
    files.sort();
    let mut payers: BTreeMap<String, Payer> = BTreeMap::new();
    for file in files {
        let payer = load_payer(&file, cpt)?;
        if let Some(first) = payers.get(&payer.id) {
            return Err(LoadError::new(
                &file,
                "id",
                format!(
                    "payer {} is already defined in {}",
                    payer.id,
                    first.file.display()
                ),
            ));
        }
        payers.insert(payer.id.clone(), payer);
    }
    Ok(payers)
}

fn load_payer(path: &Path, cpt: &CptTable) -> Result<Payer, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::read(path, &e))?;
    let file: PayerFile = yaml_serde::from_str(&text).map_err(|e| {
        // yaml_serde's message starts with the key path (`rules[0].when: unknown field ...`).
        let message = e.to_string();
        match message.split_once(": ") {
            Some((key, reason)) if !key.contains(' ') => LoadError::new(path, key, reason),
            _ => LoadError::new(path, "(top level)", message.as_str()),
        }
    })?;
    let bad = |key: String, reason: &str| LoadError::new(path, key, reason);

    let id_ok = (1..=32).contains(&file.id.len())
        && file
            .id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !id_ok {
        return Err(bad(
            "id".into(),
            "must be 1-32 characters of A-Z, 0-9, '_' or '-'",
        ));
    }
    if !is_text(&file.name, 100) {
        return Err(bad(
            "name".into(),
            "must be 1-100 characters without control characters",
        ));
    }
    let timely_filing_days = u16::try_from(file.timely_filing_days)
        .ok()
        .filter(|d| (1..=3650).contains(d))
        .ok_or_else(|| bad("timely_filing_days".into(), "must be between 1 and 3650"))?;

    let mut ids = HashSet::new();
    let mut rules = Vec::with_capacity(file.rules.len());
    for (i, rule) in file.rules.into_iter().enumerate() {
        let key = |k: &str| format!("rules[{i}].{k}");
        if !is_slug(&rule.id) {
            return Err(bad(
                key("id"),
                "must be 1-40 characters of a-z, 0-9 and '-'",
            ));
        }
        if !ids.insert(rule.id.clone()) {
            return Err(bad(key("id"), "is used by another rule of this payer"));
        }
        for (j, code) in rule.when.cpt.iter().enumerate() {
            if cpt.get(code).is_none() {
                return Err(bad(
                    key(&format!("when.cpt[{j}]")),
                    "is not a CPT code of config/codes/cpt.csv",
                ));
            }
        }
        for (j, family) in rule.when.family.iter().enumerate() {
            if !cpt.has_family(family) {
                return Err(bad(
                    key(&format!("when.family[{j}]")),
                    "is not a family of config/codes/cpt.csv",
                ));
            }
        }
        for (j, pos) in rule.when.place_of_service.iter().enumerate() {
            if !is_place_of_service(pos) {
                return Err(bad(
                    key(&format!("when.place_of_service[{j}]")),
                    "must be a two-digit place-of-service code",
                ));
            }
        }
        match &rule.require {
            Requirement::MaxUnits(n) if !(1..=99).contains(n) => {
                return Err(bad(key("require.max_units"), "must be between 1 and 99"));
            }
            Requirement::PlaceOfServiceIn(list) if list.is_empty() => {
                return Err(bad(key("require.place_of_service_in"), "is empty"));
            }
            Requirement::PlaceOfServiceIn(list) => {
                if let Some(j) = list.iter().position(|p| !is_place_of_service(p)) {
                    return Err(bad(
                        key(&format!("require.place_of_service_in[{j}]")),
                        "must be a two-digit place-of-service code",
                    ));
                }
            }
            _ => {}
        }
        if let Some(message) = &rule.message {
            if !is_text(message, 200) {
                return Err(bad(
                    key("message"),
                    "must be 1-200 characters without control characters",
                ));
            }
        }
        rules.push(PayerRule {
            id: rule.id,
            when: rule.when,
            require: rule.require,
            message: rule.message,
        });
    }
    Ok(Payer {
        id: file.id,
        name: file.name,
        timely_filing_days,
        member_id: file.member_id,
        rules,
        file: path.to_path_buf(),
    })
}

fn is_text(value: &str, max_chars: usize) -> bool {
    let n = value.trim().chars().count();
    (1..=max_chars).contains(&n) && !value.chars().any(char::is_control)
}

/// A CMS place-of-service code: two digits (`11` office, `02`/`10` telehealth).
pub(crate) fn is_place_of_service(value: &str) -> bool {
    value.len() == 2 && value.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpt() -> CptTable {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        CptTable::load(&root.join("config/codes/cpt.csv")).unwrap()
    }

    /// A payers directory holding the given files.
    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn load_error(files: &[(&str, &str)]) -> LoadError {
        let dir = dir_with(files);
        load_payers(dir.path(), &cpt()).unwrap_err()
    }

    const GOOD: &str = "id: ACME\nname: Acme Health\ntimely_filing_days: 90\n";

    #[test]
    fn the_shipped_payers_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let payers = load_payers(&root.join("config/payers"), &cpt()).unwrap();
        for id in ["BCBS", "AETNA", "MEDICARE"] {
            assert!(payers.contains_key(id), "{id}");
        }
        let medicare = &payers["MEDICARE"];
        assert_eq!(medicare.member_id().format, Some(MemberIdFormat::Mbi));
        assert!(medicare.member_id().required);
    }

    #[test]
    fn a_minimal_payer_needs_a_member_id_and_has_no_rules() {
        let dir = dir_with(&[("acme.yaml", GOOD), ("README.md", "not yaml: [")]);
        let payers = load_payers(dir.path(), &cpt()).unwrap();
        let acme = &payers["ACME"];
        assert_eq!(
            (acme.name(), acme.timely_filing_days()),
            ("Acme Health", 90)
        );
        assert!(acme.member_id().required);
        assert!(acme.rules().is_empty());
    }

    #[test]
    fn an_unknown_key_names_the_file_and_the_key() {
        let err = load_error(&[("acme.yaml", &format!("{GOOD}colour: blue\n"))]);
        let text = err.to_string();
        assert!(
            text.contains("acme.yaml") && text.contains("colour"),
            "{text}"
        );

        let nested = format!("{GOOD}rules:\n  - id: x\n    when: {{ cpts: [\"90837\"] }}\n    require: prior_authorization\n");
        let err = load_error(&[("acme.yaml", &nested)]);
        assert_eq!(err.key, "rules[0].when");
        assert!(err.path.ends_with("acme.yaml"));
        assert!(err.reason.contains("cpts"), "{err}");
    }

    #[test]
    fn a_payer_id_defined_twice_names_both_files() {
        let err = load_error(&[("a.yaml", GOOD), ("b.yaml", GOOD)]);
        assert!(err.path.ends_with("b.yaml"));
        assert_eq!(err.key, "id");
        assert!(err.reason.contains("a.yaml"), "{err}");
    }

    #[test]
    fn a_rule_naming_a_cpt_code_missing_from_the_table_names_the_key() {
        let text = format!("{GOOD}rules:\n  - id: pa\n    when: {{ cpt: [\"90834\", \"99999\"] }}\n    require: prior_authorization\n");
        let err = load_error(&[("acme.yaml", &text)]);
        assert!(err.path.ends_with("acme.yaml"));
        assert_eq!(err.key, "rules[0].when.cpt[1]");
    }

    #[test]
    fn an_unknown_family_is_rejected() {
        let text = format!("{GOOD}rules:\n  - id: pa\n    when: {{ family: [surgery] }}\n    require: prior_authorization\n");
        assert_eq!(
            load_error(&[("acme.yaml", &text)]).key,
            "rules[0].when.family[0]"
        );
    }

    #[test]
    fn a_bad_payer_id_is_rejected() {
        for id in ["acme", "", "A B", &"A".repeat(33)] {
            let text = format!("id: \"{id}\"\nname: Acme\ntimely_filing_days: 90\n");
            assert_eq!(load_error(&[("acme.yaml", &text)]).key, "id", "{id:?}");
        }
    }

    #[test]
    fn timely_filing_days_must_be_between_1_and_3650() {
        for days in ["0", "3651", "-5"] {
            let text = format!("id: ACME\nname: Acme\ntimely_filing_days: {days}\n");
            assert_eq!(
                load_error(&[("acme.yaml", &text)]).key,
                "timely_filing_days"
            );
        }
        for days in ["1", "3650"] {
            let text = format!("id: ACME\nname: Acme\ntimely_filing_days: {days}\n");
            let dir = dir_with(&[("acme.yaml", &text)]);
            assert!(load_payers(dir.path(), &cpt()).is_ok(), "{days}");
        }
    }

    #[test]
    fn an_empty_directory_is_an_error() {
        let err = load_error(&[("README.md", "# payers")]);
        assert_eq!(err.key, "(directory)");
    }

    #[test]
    fn duplicate_rule_ids_and_bad_requirements_are_rejected() {
        let rule = "  - id: pa\n    require: prior_authorization\n";
        let text = format!("{GOOD}rules:\n{rule}{rule}");
        assert_eq!(load_error(&[("acme.yaml", &text)]).key, "rules[1].id");
        let text = format!("{GOOD}rules:\n  - id: u\n    require: {{ max_units: 0 }}\n");
        assert_eq!(
            load_error(&[("acme.yaml", &text)]).key,
            "rules[0].require.max_units"
        );
        let text = format!(
            "{GOOD}rules:\n  - id: p\n    require: {{ place_of_service_in: [\"11\", \"1\"] }}\n"
        );
        assert_eq!(
            load_error(&[("acme.yaml", &text)]).key,
            "rules[0].require.place_of_service_in[1]"
        );
        let text = format!("{GOOD}rules:\n  - id: p\n    require: sunshine\n");
        assert!(load_error(&[("acme.yaml", &text)])
            .to_string()
            .contains("sunshine"));
    }

    #[test]
    fn the_mbi_format_follows_the_cms_positions() {
        // The example MBI CMS publishes, in upper and lower case.
        assert!(is_mbi("1EG4TE5MK73"));
        assert!(is_mbi("1eg4te5mk73"));
        // Position 3 and 6 may be digits.
        assert!(is_mbi("1E94T95MK73"));
        for bad in [
            "0EG4TE5MK73",   // position 1 is 1-9
            "1SG4TE5MK73",   // S is excluded
            "1EG4TE5MK7",    // 10 characters
            "1EG-4TE-5MK73", // dashes
            "1EGATE5MK73",   // position 4 is a digit
            "11G4TE5MK73",   // position 2 is a letter
            "1EG4TE5M173",   // position 9 is a letter
        ] {
            assert!(!is_mbi(bad), "{bad}");
        }
    }
}
