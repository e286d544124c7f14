//! The code tables shipped in `config/codes/`: CPT (`cpt.csv`, our own short descriptions, never
//! the AMA's descriptors) and ICD-10-CM (`icd10cm.txt`, the billable codes of one fiscal year).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use super::LoadError;

/// A CPT/HCPCS level I code as a client may send it: five ASCII letters or digits, upper-cased
/// (category I codes are five digits; category II and III end in `F` or `T`). Whether it is a
/// code we know is the CPT validator's question, not this type's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CptCode(String);

impl CptCode {
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        (value.len() == 5 && value.bytes().all(|b| b.is_ascii_alphanumeric()))
            .then(|| Self(value.to_ascii_uppercase()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CptCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One row of `cpt.csv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CptEntry {
    pub family: String,
    pub description: String,
    /// An add-on code (reported with a primary code). Recorded only: nothing enforces it yet.
    pub add_on: bool,
}

#[derive(Debug, Clone, Default)]
pub struct CptTable {
    codes: BTreeMap<String, CptEntry>,
    families: BTreeSet<String>,
}

const CPT_HEADER: &str = "code,family,description,add_on";

impl CptTable {
    /// Reads `code,family,description,add_on` rows after that header. No quoting: the description
    /// may contain commas (the columns around it are split off first); `#` lines are comments.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::read(path, &e))?;
        let mut rows = text
            .lines()
            .enumerate()
            .map(|(i, line)| (i + 1, line.trim()))
            .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
        match rows.next() {
            Some((_, CPT_HEADER)) => {}
            Some((n, _)) => {
                return Err(LoadError::new(
                    path,
                    format!("line {n}"),
                    format!("the header must be `{CPT_HEADER}`"),
                ))
            }
            None => return Err(LoadError::new(path, "(file)", "has no CPT codes")),
        }
        let mut table = Self::default();
        for (n, line) in rows {
            let at = |reason: &str| LoadError::new(path, format!("line {n}"), reason);
            let mut head = line.splitn(3, ',');
            let (Some(code), Some(family), Some(rest)) = (head.next(), head.next(), head.next())
            else {
                return Err(at("needs four columns: code,family,description,add_on"));
            };
            let Some((description, add_on)) = rest.rsplit_once(',') else {
                return Err(at("needs four columns: code,family,description,add_on"));
            };
            let code = code.trim();
            if CptCode::parse(code).map(|c| c.0) != Some(code.to_owned()) {
                return Err(at("code must be five upper-case letters or digits"));
            }
            let family = family.trim();
            if !is_slug(family) {
                return Err(at("family must be 1-40 characters of a-z, 0-9 and '-'"));
            }
            let description = description.trim();
            if description.is_empty() {
                return Err(at("description is empty"));
            }
            let add_on = match add_on.trim() {
                "true" => true,
                "false" | "" => false,
                _ => return Err(at("add_on must be true, false or empty")),
            };
            let entry = CptEntry {
                family: family.to_owned(),
                description: description.to_owned(),
                add_on,
            };
            table.families.insert(entry.family.clone());
            if table.codes.insert(code.to_owned(), entry).is_some() {
                return Err(at("code is listed twice"));
            }
        }
        if table.codes.is_empty() {
            return Err(LoadError::new(path, "(file)", "has no CPT codes"));
        }
        Ok(table)
    }

    pub fn get(&self, code: &str) -> Option<&CptEntry> {
        self.codes.get(code)
    }
    pub fn has_family(&self, family: &str) -> bool {
        self.families.contains(family)
    }
    pub fn len(&self) -> usize {
        self.codes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }
}

/// `[a-z0-9-]{1,40}`: CPT families and payer rule ids.
pub(crate) fn is_slug(value: &str) -> bool {
    (1..=40).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An ICD-10-CM code in its usual written form: upper case, a dot after the category
/// (`F41.1`, `S52.521A`, `F99`). Parsing accepts `f411`, `F411` and `F41.1` alike.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Icd10Code(String);

impl Icd10Code {
    /// The ICD-10-CM code structure (CMS/NCHS ICD-10-CM Official Guidelines, section I.A; tabular
    /// list conventions): 3-7 characters, the 1st a letter, the 2nd a digit, the 3rd-7th letters
    /// or digits, and a dot after the 3rd when more follow. Membership in the code list is a
    /// separate question.
    pub fn parse(value: &str) -> Option<Self> {
        let key = Self::parse_key(value)?;
        let len = key.iter().position(|b| *b == 0).unwrap_or(key.len());
        let mut code = String::with_capacity(len + 1);
        for (i, b) in key[..len].iter().enumerate() {
            if i == 3 {
                code.push('.');
            }
            code.push(char::from(*b));
        }
        Some(Self(code))
    }

    /// The code without its dot, upper-cased and zero-padded to seven bytes; no allocation, as
    /// the loader runs it on every line of the list.
    fn parse_key(value: &str) -> Option<[u8; 7]> {
        let value = value.trim().as_bytes();
        let mut key = [0u8; 7];
        let mut len = 0;
        for (i, &b) in value.iter().enumerate() {
            if b == b'.' {
                // Only right after the category, and only when more follows.
                if i != 3 || value.len() <= 4 {
                    return None;
                }
                continue;
            }
            if !b.is_ascii_alphanumeric() || len == key.len() {
                return None;
            }
            key[len] = b.to_ascii_uppercase();
            len += 1;
        }
        let ok = len >= 3 && key[0].is_ascii_alphabetic() && key[1].is_ascii_digit();
        ok.then_some(key)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Seven bytes without the dot, zero-padded: the list's sort key.
    fn key(&self) -> [u8; 7] {
        let mut key = [0u8; 7];
        for (slot, b) in key.iter_mut().zip(self.0.bytes().filter(|b| *b != b'.')) {
            *slot = b;
        }
        key
    }
}

impl fmt::Display for Icd10Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The billable ICD-10-CM codes, as a sorted vector of 7-byte keys (about 0.5 MB for ~75,000
/// codes, one allocation, binary search).
#[derive(Debug, Clone, Default)]
pub struct Icd10List {
    keys: Vec<[u8; 7]>,
}

impl Icd10List {
    /// One code a line (with or without its dot); `#` lines and blank lines are skipped; any other
    /// line that is not an ICD-10-CM code fails the load with its line number.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::read(path, &e))?;
        let mut keys = Vec::with_capacity(80_000);
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = Icd10Code::parse_key(line).ok_or_else(|| {
                LoadError::new(
                    path,
                    format!("line {}", i + 1),
                    "is not an ICD-10-CM code (letter, digit, 1-5 letters or digits)",
                )
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(LoadError::new(path, "(file)", "has no ICD-10-CM codes"));
        }
        // The shipped list is sorted; sorting it again costs tens of milliseconds in debug builds.
        if !keys.is_sorted() {
            keys.sort_unstable();
        }
        keys.dedup();
        Ok(Self { keys })
    }

    pub fn contains(&self, code: &Icd10Code) -> bool {
        self.keys.binary_search(&code.key()).is_ok()
    }
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/codes")
    }

    #[test]
    fn an_icd10_code_is_normalised_to_upper_case_with_its_dot() {
        for written in ["f411", "F411", "F41.1", " f41.1 "] {
            assert_eq!(Icd10Code::parse(written).unwrap().as_str(), "F41.1");
        }
        assert_eq!(Icd10Code::parse("f99").unwrap().as_str(), "F99");
        assert_eq!(Icd10Code::parse("s52521a").unwrap().as_str(), "S52.521A");
    }

    #[test]
    fn an_icd10_code_with_a_misplaced_dot_or_bad_characters_is_not_a_code() {
        for bad in [
            "F4.11",
            "F41.",
            "41.1",
            "FF1.1",
            "F41.12345",
            "F4",
            "F41-1",
            "",
            "F41..1",
        ] {
            assert!(Icd10Code::parse(bad).is_none(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_shipped_icd10_list_loads_and_holds_billable_codes_only() {
        let list = Icd10List::load(&config().join("icd10cm.txt")).unwrap();
        assert!(list.len() > 70_000);
        let has = |c: &str| list.contains(&Icd10Code::parse(c).unwrap());
        assert!(has("F41.1") && has("F32.A") && has("F99") && has("Z00.00"));
        // Categories with subdivisions are not billable.
        assert!(!has("F41") && !has("F32"));
    }

    #[test]
    fn an_icd10_list_with_a_line_that_is_not_a_code_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("icd10cm.txt");
        std::fs::write(&path, "# header\nF41.1\n\nnot-a-code\n").unwrap();
        let err = Icd10List::load(&path).unwrap_err();
        assert_eq!(err.key, "line 4");
        assert!(err.to_string().contains("icd10cm.txt"));
    }

    #[test]
    fn the_shipped_cpt_table_knows_the_psychotherapy_family() {
        let table = CptTable::load(&config().join("cpt.csv")).unwrap();
        for code in ["90832", "90834", "90837", "90846", "90847", "90853"] {
            assert_eq!(table.get(code).unwrap().family, "psychotherapy", "{code}");
        }
        assert!(table.get("90785").unwrap().add_on);
        assert!(!table.get("90834").unwrap().add_on);
        assert!(table.has_family("psychotherapy"));
        assert!(!table.has_family("surgery"));
    }

    #[test]
    fn a_cpt_table_with_a_duplicate_or_malformed_row_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpt.csv");
        let header = "code,family,description,add_on\n";
        std::fs::write(
            &path,
            format!("{header}90834,psychotherapy,a, b,false\n9083,x,y,false\n"),
        )
        .unwrap();
        assert_eq!(CptTable::load(&path).unwrap_err().key, "line 3");
        std::fs::write(&path, format!("{header}90834,p,a,false\n90834,p,b,false\n")).unwrap();
        assert_eq!(CptTable::load(&path).unwrap_err().key, "line 3");
        std::fs::write(&path, "code,description\n90834,a\n").unwrap();
        assert_eq!(CptTable::load(&path).unwrap_err().key, "line 1");
    }

    #[test]
    fn a_description_may_contain_commas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cpt.csv");
        std::fs::write(
            &path,
            "code,family,description,add_on\n90834,p,talk, about 45 min,false\n",
        )
        .unwrap();
        let table = CptTable::load(&path).unwrap();
        assert_eq!(
            table.get("90834").unwrap().description,
            "talk, about 45 min"
        );
    }
}
