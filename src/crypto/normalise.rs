//! Normalisation of searchable PHI before blind indexing, so values a search should treat as
//! equal index equally. Writers and searches must call the same function for a column. Errors
//! name the rule, never the value.

use super::CryptoError;

/// An identifier value (MRN, member id): trimmed, otherwise exact (FHIR identifiers are case
/// sensitive). Put the identifier's system in the column label
/// (`patients.identifier|http://hospital.example/mrn`) so equal values of different systems do
/// not match.
pub fn identifier(value: &str) -> Result<String, CryptoError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(CryptoError::NotIndexable("an identifier must not be empty"));
    }
    Ok(value.to_owned())
}

/// A name part (family, given, text) as FHIR string search compares it: case- and
/// accent-insensitive, white space collapsed. Compatibility decomposition (NFKD) with the
/// combining marks removed, then Unicode lower case: `Öztürk`, `ÖZTÜRK` and `Ozturk` (typed
/// precomposed or decomposed) all normalise to `ozturk`.
pub fn search_string(value: &str) -> Result<String, CryptoError> {
    use unicode_normalization::char::is_combining_mark;
    use unicode_normalization::UnicodeNormalization;
    let mut collapsed = String::with_capacity(value.len());
    for word in value.split_whitespace() {
        if !collapsed.is_empty() {
            collapsed.push(' ');
        }
        collapsed.extend(word.nfkd().filter(|c| !is_combining_mark(*c)));
    }
    if collapsed.is_empty() {
        return Err(CryptoError::NotIndexable("a name must not be empty"));
    }
    // Lower-casing the whole string (not char by char) keeps the Greek final sigma right.
    Ok(collapsed.to_lowercase())
}

/// A birth date: exactly `YYYY-MM-DD` and a real calendar date. FHIR also allows `YYYY` and
/// `YYYY-MM`; those are refused here (not indexed) rather than padded into a wrong day.
pub fn birth_date(value: &str) -> Result<String, CryptoError> {
    const RULE: &str = "a birth date must be a full date, YYYY-MM-DD";
    let value = value.trim();
    let b = value.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && [0, 1, 2, 3, 5, 6, 8, 9]
            .iter()
            .all(|&i| b[i].is_ascii_digit());
    if !shape_ok {
        return Err(CryptoError::NotIndexable(RULE));
    }
    let number = |range: std::ops::Range<usize>| {
        b[range]
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'))
    };
    let month = time::Month::try_from(number(5..7) as u8);
    let real = month.is_ok_and(|month| {
        time::Date::from_calendar_date(i32::from(number(0..4)), month, number(8..10) as u8).is_ok()
    });
    if !real {
        return Err(CryptoError::NotIndexable(RULE));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_folded_for_case_and_accents_trimmed_and_collapsed() {
        assert_eq!(
            search_string("  Van \t Der\u{a0}BERG \n").unwrap(),
            "van der berg"
        );
        assert_eq!(search_string("ÖZTÜRK").unwrap(), "ozturk");
        assert_eq!(search_string("O\u{308}zturk").unwrap(), "ozturk");
        assert_eq!(search_string("Zoë").unwrap(), search_string("zoe").unwrap());
        assert_eq!(search_string("ΟΔΥΣΣΕΥΣ").unwrap(), "οδυσσευς");
        assert!(search_string(" \t ").is_err());
    }

    #[test]
    fn an_identifier_is_trimmed_but_keeps_its_case() {
        assert_eq!(identifier("  MRN-00123a \n").unwrap(), "MRN-00123a");
        assert!(identifier("   ").is_err());
    }

    #[test]
    fn a_birth_date_must_be_a_full_real_date() {
        assert_eq!(birth_date(" 1961-07-04 ").unwrap(), "1961-07-04");
        assert_eq!(birth_date("2024-02-29").unwrap(), "2024-02-29");
        for bad in [
            "1961-7-4",
            "1961-07",
            "1961",
            "04/07/1961",
            "1961-13-01",
            "1961-00-10",
            "2023-02-29",
            "1961-07-32",
            "+961-07-04",
            "1961-07-04T00:00:00Z",
            "１９６１-07-04",
            "",
        ] {
            let err = birth_date(bad).unwrap_err().to_string();
            assert!(err.contains("YYYY-MM-DD"), "{bad}: {err}");
        }
    }

    #[test]
    fn normalisation_errors_never_echo_the_value() {
        let err = birth_date("1961-02-31").unwrap_err().to_string();
        assert!(!err.contains("1961"), "{err}");
    }
}
