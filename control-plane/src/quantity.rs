//! Kubernetes quantity notation ("500m", "4", "8Gi", "1e3") turned into the integer units
//! of the mesh's capacity vector. Pure parsing; it must not know where a value came from.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid quantity {input:?}: {why} (examples: \"500m\", \"4\", \"8Gi\", \"1.5G\")")]
pub struct QuantityError {
    pub input: String,
    pub why: &'static str,
}

/// Parses a quantity into thousandths of its unit ("500m" -> 500, "2" -> 2000,
/// "1Ki" -> 1_024_000). Negative values are refused: capacities and costs never are.
pub fn parse_millis(input: &str) -> Result<u128, QuantityError> {
    let err = |why| QuantityError { input: input.to_string(), why };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(err("it must start with a non-negative number"));
    }
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if frac_part.contains('.') {
        return Err(err("more than one decimal point"));
    }
    // value = digits / 10^frac_len * multiplier, kept exact in integers.
    let digits: u128 = format!("{int_part}{frac_part}").parse().map_err(|_| err("too many digits"))?;
    let frac_len = frac_part.len() as u32;
    let (mul_num, mul_den): (u128, u128) = match suffix {
        "" => (1000, 1),
        "m" => (1, 1),
        "k" => (1000 * 1000, 1),
        "M" => (1000 * 1000u128.pow(2), 1),
        "G" => (1000 * 1000u128.pow(3), 1),
        "T" => (1000 * 1000u128.pow(4), 1),
        "P" => (1000 * 1000u128.pow(5), 1),
        "E" => (1000 * 1000u128.pow(6), 1),
        "Ki" => (1000 * 1024, 1),
        "Mi" => (1000 * 1024u128.pow(2), 1),
        "Gi" => (1000 * 1024u128.pow(3), 1),
        "Ti" => (1000 * 1024u128.pow(4), 1),
        "Pi" => (1000 * 1024u128.pow(5), 1),
        "Ei" => (1000 * 1024u128.pow(6), 1),
        exp if exp.starts_with(['e', 'E']) => {
            let e: u32 = exp[1..].parse().map_err(|_| err("bad exponent"))?;
            if e > 18 {
                return Err(err("exponent too large"));
            }
            (1000 * 10u128.pow(e), 1)
        }
        _ => return Err(err("unknown suffix")),
    };
    let den = 10u128.pow(frac_len) * mul_den;
    let num = digits.checked_mul(mul_num).ok_or_else(|| err("too large"))?;
    if num % den != 0 {
        return Err(err("finer than one thousandth of a unit"));
    }
    Ok(num / den)
}

/// CPU in millicores.
pub fn cpu_millis(input: &str) -> Result<u64, QuantityError> {
    to_u64(input, parse_millis(input)?)
}

/// Memory in bytes; fractions of a byte round up.
pub fn memory_bytes(input: &str) -> Result<u64, QuantityError> {
    to_u64(input, parse_millis(input)?.div_ceil(1000))
}

/// A count of whole devices (GPUs).
pub fn whole_units(input: &str) -> Result<u64, QuantityError> {
    let m = parse_millis(input)?;
    if m % 1000 != 0 {
        return Err(QuantityError { input: input.to_string(), why: "devices are counted in whole units" });
    }
    to_u64(input, m / 1000)
}

fn to_u64(input: &str, v: u128) -> Result<u64, QuantityError> {
    u64::try_from(v).map_err(|_| QuantityError { input: input.to_string(), why: "too large" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        assert_eq!(cpu_millis("500m"), Ok(500));
        assert_eq!(cpu_millis("4"), Ok(4000));
        assert_eq!(cpu_millis("0.5"), Ok(500));
        assert_eq!(cpu_millis("1.25"), Ok(1250));
        assert!(cpu_millis("0.0001").is_err());
    }

    #[test]
    fn memory() {
        assert_eq!(memory_bytes("8Gi"), Ok(8 * 1024 * 1024 * 1024));
        assert_eq!(memory_bytes("512Mi"), Ok(512 * 1024 * 1024));
        assert_eq!(memory_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(memory_bytes("1.5Ki"), Ok(1536));
        assert_eq!(memory_bytes("1e3"), Ok(1000));
        assert_eq!(memory_bytes("128974848"), Ok(128_974_848));
    }

    #[test]
    fn devices() {
        assert_eq!(whole_units("1"), Ok(1));
        assert!(whole_units("500m").is_err());
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for bad in ["", "-1", "4x", "1..2", "Gi", "1e99", "1Zi"] {
            let e = parse_millis(bad).expect_err(bad);
            assert!(e.to_string().contains("invalid quantity"), "{e}");
        }
    }
}
