//! Volume sizes: bytes, a positive multiple of 512, with K/M/G/T suffixes
//! (powers of 1024) on input. Parsing never depends on the locale.

use crate::error::{Error, Result};

pub const SECTOR: u64 = 512;

fn invalid(input: &str, reason: impl Into<String>) -> Error {
    Error::InvalidSize {
        input: input.to_owned(),
        reason: reason.into(),
    }
}

/// Checks that a byte count is a valid volume size.
pub fn check_size(bytes: u64, input: &str) -> Result<u64> {
    if bytes == 0 {
        return Err(invalid(input, "a volume size must be greater than 0"));
    }
    if bytes % SECTOR != 0 {
        return Err(invalid(
            input,
            format!("{bytes} bytes is not a multiple of {SECTOR}"),
        ));
    }
    // Files are addressed with signed 64-bit offsets.
    if bytes > i64::MAX as u64 {
        return Err(invalid(input, "larger than the largest possible file"));
    }
    Ok(bytes)
}

/// Parses `123`, `4K`, `10M`, `20G`, `1T`, in either case, and the same
/// with `iB` (`4KiB`, `20GiB`): powers of 1024. `GB`, `Mb` and the like are
/// refused: they read as powers of 1000 (or bits) to many people, and a
/// volume's size must not depend on how its creator read a suffix.
pub fn parse_size(input: &str) -> Result<u64> {
    let s = input.trim();
    if s.starts_with('-') {
        return Err(invalid(input, "a size cannot be negative"));
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid(
            input,
            "expected a number of bytes with an optional K, M, G or T suffix",
        ));
    }
    let unit = match suffix.strip_suffix("iB") {
        Some(u) if u.len() == 1 => u,
        _ => suffix,
    };
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ if suffix.len() == 2 && suffix.ends_with(['B', 'b']) => {
            let p = &suffix[..1].to_ascii_uppercase();
            return Err(invalid(
                input,
                format!(
                    "{suffix:?} is ambiguous (powers of 1000, or bits?); sizes are in powers of 1024: write {p} or {p}iB"
                ),
            ));
        }
        _ => {
            return Err(invalid(
                input,
                format!("unknown suffix {suffix:?}; use K, M, G or T (or KiB, MiB, GiB, TiB): powers of 1024"),
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| invalid(input, "the number does not fit in 64 bits"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| invalid(input, "the size does not fit in 64 bits"))?;
    check_size(bytes, input)
}

/// Formats a byte count for people: exact with a binary suffix when it is a
/// whole multiple, else plain bytes.
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Formats a byte count approximately (one decimal), for usage reports.
pub fn format_approx(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("10M").unwrap(), 10 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("3GiB").unwrap(), 3 << 30);
        assert_eq!(parse_size("8KiB").unwrap(), 8 << 10);
    }

    #[test]
    fn refuses_suffixes_that_read_as_powers_of_1000() {
        for bad in [
            "1Gb", "1GB", "1gb", "4KB", "2MB", "1TB", "512B", "1GIB", "1gib", "1Gi",
        ] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains("1024"), "{bad}: {e}");
        }
        assert!(parse_size("1Gb")
            .unwrap_err()
            .to_string()
            .contains("ambiguous"));
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in [
            "0",
            "0G",
            "100",
            "513",
            "-1",
            "-4K",
            "99999999999999999999999",
            "18446744073709551615",
            "17179869184T",
            "",
            "G",
            "ten",
            "1.5G",
            "4X",
            "4 K",
            "0x200",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(10 << 30), "10G");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(3 << 20), "3M");
        assert_eq!(format_approx(1536), "1.5 KiB");
    }
}
