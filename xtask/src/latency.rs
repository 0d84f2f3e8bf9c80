//! The result lines of the test guest's interrupt-latency measurement
//! (`tests/guest/src/guest/latency.rs`), which `cargo xtask bench irq` and the QEMU
//! tests read:
//!
//! ```text
//! latency: cntfrq=62500000 timer=49264/65904/29744 timer-wfi=... ipi-wfi=... ipi-spin=...
//! [vm] latency: sgi-self=448/704/432 gicd=35/52/33
//! ```
//!
//! Every line that starts with `latency: `, after any `[...] ` prefixes (the hypervisor's
//! log prefix and the VM's name), adds its `key=value` pairs; each metric is
//! `median/mean/min` in nanoseconds.

use std::fmt;

/// The metrics, in the order the guest prints them.
pub const METRICS: [&str; 6] = [
    "timer",
    "timer-wfi",
    "ipi-wfi",
    "ipi-spin",
    "sgi-self",
    "gicd",
];

/// What starts a result line.
const TAG: &str = "latency: ";

/// One metric over its samples, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// The median.
    pub median: u64,
    /// The mean.
    pub mean: u64,
    /// The smallest sample.
    pub min: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.median, self.mean, self.min)
    }
}

/// One run's results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Latency {
    /// `CNTFRQ_EL0` as the guest read it (Hz).
    pub cntfrq: u64,
    /// The metrics of [`METRICS`], in that order.
    pub stats: [Stats; METRICS.len()],
}

impl Latency {
    /// The metric called `name` (one of [`METRICS`]).
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Stats> {
        METRICS
            .iter()
            .position(|m| *m == name)
            .map(|i| self.stats[i])
    }
}

/// `line` without its leading `[...] ` prefixes.
fn strip_prefixes(mut line: &str) -> &str {
    while let Some(rest) = line.strip_prefix('[') {
        match rest.split_once("] ") {
            Some((_, after)) => line = after,
            None => break,
        }
    }
    line
}

/// Reads the results out of a run's output.
///
/// # Errors
///
/// No result line, a malformed or repeated pair, an unknown key, or a missing metric, by
/// name.
pub fn parse(output: &str) -> Result<Latency, String> {
    let mut cntfrq = None;
    let mut stats: [Option<Stats>; METRICS.len()] = [None; METRICS.len()];
    let mut lines = 0;
    for line in output.lines() {
        let Some(rest) = strip_prefixes(line).strip_prefix(TAG) else {
            continue;
        };
        lines += 1;
        for pair in rest.split_whitespace() {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not key=value"))?;
            if key == "cntfrq" {
                let hz = value
                    .parse()
                    .map_err(|_| format!("cntfrq '{value}' is not a number"))?;
                if cntfrq.replace(hz).is_some() {
                    return Err("cntfrq given twice".into());
                }
                continue;
            }
            let i = METRICS
                .iter()
                .position(|m| *m == key)
                .ok_or_else(|| format!("unknown metric '{key}'"))?;
            let mut parts = value.split('/').map(str::parse::<u64>);
            let (Some(Ok(median)), Some(Ok(mean)), Some(Ok(min)), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("{key} '{value}' is not median/mean/min"));
            };
            if stats[i].replace(Stats { median, mean, min }).is_some() {
                return Err(format!("{key} given twice"));
            }
        }
    }
    if lines == 0 {
        return Err("no 'latency:' line".into());
    }
    let cntfrq = cntfrq.ok_or("no cntfrq")?;
    let mut out = [Stats::default(); METRICS.len()];
    for (i, (slot, got)) in out.iter_mut().zip(stats).enumerate() {
        *slot = got.ok_or_else(|| format!("no {}", METRICS[i]))?;
    }
    Ok(Latency { cntfrq, stats: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BARE: &str = "latency: cntfrq=62500000 timer=49264/65904/29744 \
                        timer-wfi=62080/65680/32064 ipi-wfi=3408/22192/3264 ipi-spin=7392/25728/2048\n\
                        latency: sgi-self=448/704/432 gicd=35/52/33\nPASS latency\n";

    #[test]
    fn reads_both_lines() {
        let got = parse(BARE).expect("parses");
        assert_eq!(got.cntfrq, 62_500_000);
        assert_eq!(
            got.get("timer"),
            Some(Stats {
                median: 49264,
                mean: 65904,
                min: 29744
            })
        );
        assert_eq!(got.get("ipi-spin").map(|s| s.min), Some(2048));
        assert_eq!(got.get("gicd").map(|s| s.median), Some(35));
        assert_eq!(
            got.get("sgi-self").map(|s| s.to_string()),
            Some("448/704/432".into())
        );
        assert_eq!(got.get("nothing"), None);
    }

    #[test]
    fn reads_lines_the_hypervisor_prefixed() {
        // A VM may well be called `latency`: the hypervisor's lines about it are not
        // results.
        let text = "[   0.03 INFO  cpu0] VM latency: vCPU 0 starts at 0x40000000\n".to_owned()
            + &BARE
                .lines()
                .map(|l| format!("[latency] {l}\n"))
                .collect::<String>();
        assert_eq!(parse(&text), parse(BARE));
    }

    #[test]
    fn refuses_what_is_missing_or_malformed() {
        assert!(parse("DONE pass=1 fail=0\n")
            .unwrap_err()
            .contains("no 'latency:'"));
        let without_gicd = BARE.replace(" gicd=35/52/33", "");
        assert_eq!(parse(&without_gicd).unwrap_err(), "no gicd");
        let without_freq = BARE.replace("cntfrq=62500000 ", "");
        assert_eq!(parse(&without_freq).unwrap_err(), "no cntfrq");
        let two_parts = BARE.replace("gicd=35/52/33", "gicd=35/52");
        assert!(parse(&two_parts).unwrap_err().contains("median/mean/min"));
        let four_parts = BARE.replace("gicd=35/52/33", "gicd=35/52/33/1");
        assert!(parse(&four_parts).unwrap_err().contains("median/mean/min"));
        let negative = BARE.replace("gicd=35/52/33", "gicd=-35/52/33");
        assert!(parse(&negative).is_err());
        let unknown = BARE.replace("gicd=", "gicr=");
        assert!(parse(&unknown)
            .unwrap_err()
            .contains("unknown metric 'gicr'"));
        let twice = format!("{BARE}latency: gicd=1/1/1\n");
        assert_eq!(parse(&twice).unwrap_err(), "gicd given twice");
        let bare_word = BARE.replace("gicd=35/52/33", "gicd");
        assert!(parse(&bare_word).unwrap_err().contains("not key=value"));
    }
}
