//! Exact money: decimal text in, integer minor units (cents) out. No floating point anywhere.

use std::fmt;

/// An ISO 4217 currency we accept, with its number of minor-unit digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    minor_units: u32,
}

/// The currencies a claim may be in (ISO 4217 table A.1 minor units). Add a row to support another.
const CURRENCIES: &[Currency] = &[
    Currency {
        code: "USD",
        minor_units: 2,
    },
    Currency {
        code: "CAD",
        minor_units: 2,
    },
    Currency {
        code: "EUR",
        minor_units: 2,
    },
    Currency {
        code: "GBP",
        minor_units: 2,
    },
    Currency {
        code: "AUD",
        minor_units: 2,
    },
    Currency {
        code: "CHF",
        minor_units: 2,
    },
    Currency {
        code: "MXN",
        minor_units: 2,
    },
    Currency {
        code: "JPY",
        minor_units: 0,
    },
];

impl Currency {
    pub const USD: Currency = CURRENCIES[0];

    /// A supported ISO 4217 code, case-insensitively (`usd` is `USD`).
    pub fn parse(code: &str) -> Option<Self> {
        CURRENCIES
            .iter()
            .find(|c| c.code.eq_ignore_ascii_case(code.trim()))
            .copied()
    }
    pub fn code(&self) -> &'static str {
        self.code
    }
    /// Digits after the decimal point: 2 for USD, 0 for JPY.
    pub fn minor_units(&self) -> u32 {
        self.minor_units
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

/// Amounts above this many minor units (100 million USD, 10 billion JPY) are rejected as absurd
/// for one claim line, long before anything could overflow.
pub const MAX_MINOR_UNITS: i64 = 10_000_000_000;

/// An exact decimal as written by the client: `mantissa * 10^-scale`, trailing fractional zeros
/// dropped (`150.50` is 15050 scale 2 -> 1505 scale 1). Anything with more than 30 significant
/// digits or an exponent beyond +-30 is `TooLarge`/`TooPrecise`, so later arithmetic never
/// overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    negative: bool,
    mantissa: u128,
    scale: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecimalError {
    /// Not a decimal number (`12,50`, `$12`, `1e`, empty).
    Format,
    /// So many digits or such an exponent that it cannot be a fee.
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinorUnitsError {
    /// More fractional digits than the currency has (`150.505` USD, `1500.5` JPY).
    TooPrecise,
    /// Above [`MAX_MINOR_UNITS`].
    TooLarge,
}

const MAX_DIGITS: usize = 30;

impl Decimal {
    pub const ZERO: Decimal = Decimal {
        negative: false,
        mantissa: 0,
        scale: 0,
    };

    /// JSON number grammar (RFC 8259 section 6): `-? int frac? exp?`, plus a leading `+`-less
    /// plain form for strings. The text is the client's, exactly (serde_json's
    /// `arbitrary_precision` keeps a number's text).
    pub fn parse(text: &str) -> Result<Self, DecimalError> {
        let text = text.trim();
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (number, exponent) = match rest.find(['e', 'E']) {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let (int, frac) = match number.split_once('.') {
            Some((int, frac)) => (int, frac),
            None => (number, ""),
        };
        let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty()
            || !digits_only(int)
            || !digits_only(frac)
            || (number.contains('.') && frac.is_empty())
        {
            return Err(DecimalError::Format);
        }
        let exponent: i64 = match exponent {
            None => 0,
            Some(e) => {
                let unsigned = e.strip_prefix(['+', '-']).unwrap_or(e);
                if unsigned.is_empty() || !digits_only(unsigned) {
                    return Err(DecimalError::Format);
                }
                if unsigned.trim_start_matches('0').len() > 3 {
                    return Err(DecimalError::TooLarge);
                }
                e.parse().map_err(|_| DecimalError::Format)?
            }
        };
        let frac = frac.trim_end_matches('0');
        let digits = format!("{int}{frac}");
        let digits = digits.trim_start_matches('0');
        if digits.len() > MAX_DIGITS {
            return Err(DecimalError::TooLarge);
        }
        let mut mantissa: u128 = if digits.is_empty() {
            0
        } else {
            digits.parse().map_err(|_| DecimalError::Format)?
        };
        // value = mantissa * 10^(exponent - frac.len())
        let mut power = exponent - frac.len() as i64;
        if mantissa == 0 {
            power = 0;
        }
        if !(-(MAX_DIGITS as i64)..=MAX_DIGITS as i64).contains(&power) {
            return Err(DecimalError::TooLarge);
        }
        let scale = if power >= 0 {
            mantissa = mantissa
                .checked_mul(10u128.pow(power as u32))
                .filter(|m| *m < 10u128.pow(MAX_DIGITS as u32))
                .ok_or(DecimalError::TooLarge)?;
            0
        } else {
            let mut scale = (-power) as u32;
            while scale > 0 && mantissa % 10 == 0 {
                mantissa /= 10;
                scale -= 1;
            }
            scale
        };
        Ok(Self {
            negative: negative && mantissa != 0,
            mantissa,
            scale,
        })
    }

    pub fn is_positive(&self) -> bool {
        !self.negative && self.mantissa != 0
    }
    pub fn is_negative(&self) -> bool {
        self.negative
    }

    /// The amount in the currency's minor units, exactly.
    pub fn to_minor_units(self, currency: Currency) -> Result<i64, MinorUnitsError> {
        if self.scale > currency.minor_units {
            return Err(MinorUnitsError::TooPrecise);
        }
        let magnitude = 10u128
            .checked_pow(currency.minor_units - self.scale)
            .and_then(|p| self.mantissa.checked_mul(p))
            .filter(|m| *m <= MAX_MINOR_UNITS as u128)
            .ok_or(MinorUnitsError::TooLarge)?;
        // Bounded by MAX_MINOR_UNITS above, so this fits.
        let magnitude = magnitude as i64;
        Ok(if self.negative { -magnitude } else { magnitude })
    }
}

/// An amount in a currency's minor units (`15050` USD is 150.50 dollars).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money {
    pub minor_units: i64,
    pub currency: Currency,
}

impl fmt::Display for Money {
    /// `150.50 USD`, `1500 JPY`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.currency.minor_units;
        let sign = if self.minor_units < 0 { "-" } else { "" };
        let abs = self.minor_units.unsigned_abs();
        if digits == 0 {
            return write!(f, "{sign}{abs} {}", self.currency);
        }
        let unit = 10u64.pow(digits);
        write!(
            f,
            "{sign}{}.{:0width$} {}",
            abs / unit,
            abs % unit,
            self.currency,
            width = digits as usize
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minor(text: &str, currency: &str) -> Result<i64, MinorUnitsError> {
        Decimal::parse(text)
            .unwrap()
            .to_minor_units(Currency::parse(currency).unwrap())
    }

    #[test]
    fn dollars_with_zero_one_or_two_decimals_convert_exactly() {
        assert_eq!(minor("150", "USD"), Ok(15000));
        assert_eq!(minor("150.5", "USD"), Ok(15050));
        assert_eq!(minor("150.50", "USD"), Ok(15050));
        assert_eq!(minor("0.01", "USD"), Ok(1));
        // Trailing zeros carry no precision.
        assert_eq!(minor("150.500", "USD"), Ok(15050));
        assert_eq!(minor("1.5e2", "USD"), Ok(15000));
        assert_eq!(minor("15050E-2", "USD"), Ok(15050));
    }

    #[test]
    fn more_decimals_than_the_currency_has_is_too_precise() {
        assert_eq!(minor("150.505", "USD"), Err(MinorUnitsError::TooPrecise));
        assert_eq!(minor("1500.5", "JPY"), Err(MinorUnitsError::TooPrecise));
        assert_eq!(minor("1500.0", "JPY"), Ok(1500));
    }

    #[test]
    fn absurd_amounts_are_errors_not_overflows() {
        assert_eq!(minor("100000001", "USD"), Err(MinorUnitsError::TooLarge));
        assert_eq!(minor("100000000", "USD"), Ok(MAX_MINOR_UNITS));
        assert_eq!(Decimal::parse(&"9".repeat(40)), Err(DecimalError::TooLarge));
        assert_eq!(
            Decimal::parse("1e999999999999"),
            Err(DecimalError::TooLarge)
        );
        assert_eq!(Decimal::parse("1e31"), Err(DecimalError::TooLarge));
        assert_eq!(Decimal::parse("1e-31"), Err(DecimalError::TooLarge));
        assert!(!Decimal::parse("0e99").unwrap().is_positive());
    }

    #[test]
    fn text_that_is_not_a_decimal_is_a_format_error() {
        for bad in [
            "", "-", "12,50", "$12", "1.", ".5", "1e", "1e+", "abc", "1.2.3", "+1", "0x10",
        ] {
            assert_eq!(Decimal::parse(bad), Err(DecimalError::Format), "{bad:?}");
        }
    }

    #[test]
    fn sign_is_kept_and_zero_is_neither_positive_nor_negative() {
        assert!(Decimal::parse("-5").unwrap().is_negative());
        assert!(!Decimal::parse("-0.00").unwrap().is_negative());
        assert!(!Decimal::parse("0").unwrap().is_positive());
        assert_eq!(minor("-5.25", "USD"), Ok(-525));
    }

    #[test]
    fn currencies_are_looked_up_case_insensitively_with_their_minor_units() {
        assert_eq!(Currency::parse("usd"), Some(Currency::USD));
        assert_eq!(Currency::parse("JPY").unwrap().minor_units(), 0);
        assert_eq!(Currency::parse("XXX"), None);
    }

    #[test]
    fn money_displays_with_the_currency_digits() {
        let usd = Money {
            minor_units: 15050,
            currency: Currency::USD,
        };
        assert_eq!(usd.to_string(), "150.50 USD");
        let jpy = Money {
            minor_units: 1500,
            currency: Currency::parse("JPY").unwrap(),
        };
        assert_eq!(jpy.to_string(), "1500 JPY");
    }
}
