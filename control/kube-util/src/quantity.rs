//! Resource quantities (`resource.Quantity`): `100m`, `0.5`, `2`, `128Mi`, `1G`, `1e3`.
//!
//! Read exactly, in integers: a quantity is a decimal number times a power of ten or of
//! 1024, and its value is kept in nano-units, where Kubernetes also stops (a finer value
//! rounds up to the next nano-unit). Floating point would not do: `0.009` is not a binary
//! fraction, and `millicores("9m")` came out as 10. k8s-openapi's `Quantity` is only the
//! string, and the crates that parse it pin other k8s-openapi releases, so the grammar is
//! read here, as apimachinery's `ParseQuantity` reads it.

/// Why a quantity could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantityError {
    #[error(
        "invalid quantity {0:?}: expected a number with an optional suffix (m, k, Mi, Gi, e3, ...)"
    )]
    Syntax(String),
    #[error("invalid quantity {0:?}: negative")]
    Negative(String),
    #[error("quantity {0:?} is too large")]
    TooLarge(String),
}

const NANO: u128 = 1_000_000_000;

/// The exact value of a quantity in nano-units (`100m` is 100,000,000; `1Ki` is
/// 1,024,000,000,000), rounded up to a whole nano-unit.
pub fn nanos(q: &str) -> Result<u128, QuantityError> {
    let too_large = || QuantityError::TooLarge(q.to_string());
    let syntax = || QuantityError::Syntax(q.to_string());
    let (negative, rest) = match q.as_bytes().first() {
        Some(b'-') => (true, &q[1..]),
        Some(b'+') => (false, &q[1..]),
        _ => (false, q),
    };
    let digits_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(digits_end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(syntax());
    }
    // Decimal exponent and binary multiplier of the suffix.
    let (exp10, bin): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        e if e.len() > 1 && e.starts_with(['e', 'E']) => {
            let exp = &e[1..];
            let unsigned = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            (exp.parse().map_err(|_| too_large())?, 0)
        }
        _ => return Err(syntax()),
    };
    // Significant digits as one integer; leading zeros carry nothing, and trailing zeros
    // of the fraction are dropped so that "0.5000000000000000000000000000" still fits.
    let frac = frac.trim_end_matches('0');
    let mut mantissa: u128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(b - b'0')))
            .ok_or_else(too_large)?;
    }
    if negative && mantissa != 0 {
        return Err(QuantityError::Negative(q.to_string()));
    }
    let scaled = mantissa.checked_shl(bin).filter(|v| v >> bin == mantissa);
    let scaled = scaled.ok_or_else(too_large)?;
    // value = scaled × 10^(exp10 − frac digits); in nano-units, 10^(that + 9).
    let exp = i64::from(exp10) - frac.len() as i64 + 9;
    if exp >= 0 {
        let pow = 10u128.checked_pow(exp as u32).ok_or_else(too_large);
        if scaled == 0 {
            return Ok(0);
        }
        return scaled.checked_mul(pow?).ok_or_else(too_large);
    }
    // Finer than a nano-unit: round up, as Kubernetes does.
    Ok(match 10u128.checked_pow((-exp) as u32) {
        Some(div) => scaled.div_ceil(div),
        None => u128::from(scaled != 0),
    })
}

/// The value rounded up to a multiple of `unit` nano-units, counted in those units.
fn in_units(q: &str, unit: u128) -> Result<u64, QuantityError> {
    u64::try_from(nanos(q)?.div_ceil(unit)).map_err(|_| QuantityError::TooLarge(q.to_string()))
}

/// A count in thousandths as a quantity: whole where it is (`3`), else in milli-units
/// (`2500m`), as metrics APIs write values.
pub fn from_milli(milli: i64) -> String {
    if milli % 1000 == 0 {
        format!("{}", milli / 1000)
    } else {
        format!("{milli}m")
    }
}

/// CPU in millicores, rounded up as Kubernetes' `MilliValue` does.
pub fn millicores(q: &str) -> Result<u64, QuantityError> {
    in_units(q, NANO / 1000)
}

/// Bytes (or any count, or whole cores), rounded up as Kubernetes' `Value` does.
pub fn whole(q: &str) -> Result<u64, QuantityError> {
    in_units(q, NANO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_millicore_value_is_exact() {
        for i in 0..=100_000u64 {
            assert_eq!(millicores(&format!("{i}m")).unwrap(), i, "{i}m");
        }
        for i in 0..=9_999u64 {
            let q = format!("{}.{:03}", i / 1000, i % 1000);
            assert_eq!(millicores(&q).unwrap(), i, "{q}");
        }
    }

    /// Kubernetes' own answers (`resource.MustParse(s).MilliValue()` and `.Value()`), for
    /// every suffix and the shapes of number it accepts.
    #[test]
    fn the_suffix_table_matches_kubernetes() {
        let cases: &[(&str, u128)] = &[
            ("0", 0),
            ("1n", 1),
            ("1u", 1_000),
            ("1m", 1_000_000),
            ("1", NANO),
            ("1k", 1_000 * NANO),
            ("1M", 1_000_000 * NANO),
            ("1G", 1_000_000_000 * NANO),
            ("1T", 10u128.pow(12) * NANO),
            ("1P", 10u128.pow(15) * NANO),
            ("1E", 10u128.pow(18) * NANO),
            ("1Ki", 1024 * NANO),
            ("1Mi", (1 << 20) * NANO),
            ("1Gi", (1 << 30) * NANO),
            ("1Ti", (1 << 40) * NANO),
            ("1Pi", (1 << 50) * NANO),
            ("1Ei", (1 << 60) * NANO),
            ("1e3", 1_000 * NANO),
            ("1E3", 1_000 * NANO),
            ("1e-3", 1_000_000),
            ("1e+3", 1_000 * NANO),
            ("1.5Gi", 1_610_612_736 * NANO),
            ("0.5", NANO / 2),
            (".5", NANO / 2),
            ("5.", 5 * NANO),
            ("+5", 5 * NANO),
            ("0.1", 100_000_000),
            ("100m", 100_000_000),
            ("0.0000000001", 1), // finer than 1n rounds up
            ("1.0000000001", NANO + 1),
            ("0.5000000000000000000000000000000000000000000", NANO / 2),
            ("-0", 0),
            ("129e6", 129_000_000 * NANO),
            ("0.1Ki", 102_400_000_000),
        ];
        for (q, want) in cases {
            assert_eq!(nanos(q), Ok(*want), "{q}");
        }
        assert_eq!(millicores("1n").unwrap(), 1, "MilliValue rounds up");
        assert_eq!(whole("100m").unwrap(), 1, "Value rounds up");
        assert_eq!(whole("1.5Ki").unwrap(), 1536);
        assert_eq!(whole("128Mi").unwrap(), 128 << 20);
    }

    #[test]
    fn what_kubernetes_refuses_is_refused() {
        for q in [
            "", "x", "12x", "1.2.3", ".", "1 Gi", " 1", "1Gi ", "1e", "1e+", "1ki", "Mi", "1mi",
        ] {
            assert!(matches!(nanos(q), Err(QuantityError::Syntax(_))), "{q:?}");
        }
        assert!(matches!(nanos("-1"), Err(QuantityError::Negative(_))));
        assert!(matches!(nanos("1e40"), Err(QuantityError::TooLarge(_))));
        assert!(matches!(whole("16Ei"), Err(QuantityError::TooLarge(_))));
        assert!(matches!(
            nanos("999999999999999999999999999999999999999999"),
            Err(QuantityError::TooLarge(_))
        ));
        // A huge negative exponent is a tiny value, not an error.
        assert_eq!(nanos("1e-999999"), Ok(1));
    }
}
