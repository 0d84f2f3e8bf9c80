//! Memory sizes as users write them (`256M`, `2G`, `512K`, bytes) and numbers in C style.

use std::fmt;
use std::str::FromStr;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    /// `n` MiB.
    #[must_use]
    pub const fn mib(n: u64) -> Self {
        Self(n * MIB)
    }

    /// `n` GiB.
    #[must_use]
    pub const fn gib(n: u64) -> Self {
        Self(n * GIB)
    }

    /// The size as QEMU's `-m` takes it.
    #[must_use]
    pub fn qemu_arg(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Size {
    /// The largest unit that divides the size: `2G`, `256M`, `4K` or bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b != 0 && b % GIB == 0 {
            write!(f, "{}G", b / GIB)
        } else if b != 0 && b % MIB == 0 {
            write!(f, "{}M", b / MIB)
        } else if b != 0 && b % KIB == 0 {
            write!(f, "{}K", b / KIB)
        } else {
            write!(f, "{b}")
        }
    }
}

impl FromStr for Size {
    type Err = String;

    /// `256M`, `1G`, `512K` (either case, an optional `iB`/`B`), or plain bytes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{s}' is not a size (e.g. 256M, 1G, 4096)");
        let t = s.trim();
        let t = t
            .strip_suffix("iB")
            .or_else(|| t.strip_suffix('B'))
            .unwrap_or(t);
        let (digits, unit) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
            _ => (t, ' '),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let scale = match unit {
            ' ' => 1,
            'K' => KIB,
            'M' => MIB,
            'G' => GIB,
            _ => return Err(bad()),
        };
        n.checked_mul(scale).map(Self).ok_or_else(bad)
    }
}

/// A number as C writes it: `0x` hex or decimal, `_` allowed between digits.
#[must_use]
pub fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_every_unit() {
        assert_eq!("256M".parse(), Ok(Size(256 << 20)));
        assert_eq!("256MiB".parse(), Ok(Size(256 << 20)));
        assert_eq!("1g".parse(), Ok(Size(1 << 30)));
        assert_eq!("512K".parse(), Ok(Size(512 << 10)));
        assert_eq!("4096".parse(), Ok(Size(4096)));
        for bad in [
            "",
            "M",
            "12Q",
            "-1M",
            "1.5G",
            "99999999999999999999G",
            "18014398509481984G",
        ] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_print_in_the_largest_unit() {
        assert_eq!(Size::gib(2).to_string(), "2G");
        assert_eq!(Size::mib(1536).to_string(), "1536M");
        assert_eq!(Size(8192).to_string(), "8K");
        assert_eq!(Size(100).to_string(), "100");
        assert_eq!(Size(0).to_string(), "0");
    }

    #[test]
    fn numbers_parse_in_hex_and_decimal() {
        assert_eq!(parse_u64("0x7000_0000"), Some(0x7000_0000));
        assert_eq!(parse_u64("4096"), Some(4096));
        assert_eq!(parse_u64("0xg"), None);
        assert_eq!(parse_u64(""), None);
    }
}
