//! Resource quantities (`resource.Quantity`): `100m`, `0.5`, `2`, `128Mi`, `1G`, `1e3`.

/// Why a quantity could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid quantity {0:?}")]
pub struct QuantityError(pub String);

/// The value of a quantity as a float (e.g. `100m` is 0.1, `1Ki` is 1024).
pub fn parse(q: &str) -> Result<f64, QuantityError> {
    let s = q.trim();
    let err = || QuantityError(q.to_string());
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| err())?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| err())?;
            10f64.powi(exp)
        }
        _ => return Err(err()),
    };
    if !n.is_finite() || n < 0.0 {
        return Err(err());
    }
    Ok(n * mult)
}

/// CPU in millicores, rounded up as Kubernetes does.
pub fn millicores(q: &str) -> Result<u64, QuantityError> {
    Ok((parse(q)? * 1000.0).ceil() as u64)
}

/// Bytes (or any count), rounded up.
pub fn whole(q: &str) -> Result<u64, QuantityError> {
    Ok(parse(q)?.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(millicores("100m").unwrap(), 100);
        assert_eq!(millicores("0.5").unwrap(), 500);
        assert_eq!(millicores("2").unwrap(), 2000);
        assert_eq!(whole("128Mi").unwrap(), 128 << 20);
        assert_eq!(whole("1G").unwrap(), 1_000_000_000);
        assert_eq!(whole("1e3").unwrap(), 1000);
        assert_eq!(whole("1.5Ki").unwrap(), 1536);
        assert!(parse("12x").is_err());
        assert!(parse("").is_err());
        assert!(parse("-1").is_err());
    }
}
