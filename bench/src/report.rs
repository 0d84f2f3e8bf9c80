//! Turns measurements into the markdown tables of `docs/BENCHMARKS.md`.
//!
//! Inputs are criterion's `estimates.json` medians and a TSV of instruction counts and
//! frame counts (`arch crate workload instructions frames`, written by `scripts/bench`).
//! The candidate crate is [`CANDIDATE`]; every other crate in [`PEERS`] is a peer; rows of
//! any other crate name (e.g. `mmu-stage2`) are reported without ratios.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The crate the goal is about.
pub const CANDIDATE: &str = "mmu";
/// The crates it is compared with.
pub const PEERS: [&str; 2] = ["aarch64-paging", "page_table_multiarch"];
/// Required speed-up over the best peer, in time and in instructions.
pub const GOAL: f64 = 1.5;

/// One measured (arch, crate, workload).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// Median time of one run of the workload, in nanoseconds.
    pub time_ns: Option<f64>,
    /// Instructions of one run of the workload.
    pub instructions: Option<u64>,
    /// Table frames in use after the workload.
    pub frames: Option<u64>,
}

/// `(arch, crate, workload)` → measurements.
pub type Results = BTreeMap<(String, String, String), Row>;

/// Reads criterion's median point estimate (nanoseconds) out of an `estimates.json`.
#[must_use]
pub fn criterion_median(json: &str) -> Option<f64> {
    let median = &json[json.find("\"median\":")?..];
    let value = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value.find([',', '}'])?;
    value[..end].trim().parse().ok()
}

/// Parses the counts TSV (`arch crate workload instructions frames`, `-` for unknown)
/// into `results`.
///
/// # Errors
///
/// Returns the offending line when a line has the wrong shape.
pub fn read_counts(tsv: &str, results: &mut Results) -> Result<(), String> {
    for line in tsv.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        let [arch, krate, workload, insns, frames] = f[..] else {
            return Err(format!("bad counts line: {line}"));
        };
        let row = results
            .entry((arch.into(), krate.into(), workload.into()))
            .or_default();
        row.instructions = insns.parse().ok();
        row.frames = frames.parse().ok();
    }
    Ok(())
}

/// Formats nanoseconds with three significant digits and a unit.
#[must_use]
pub fn fmt_time(ns: f64) -> String {
    let (v, unit) = if ns >= 1e9 {
        (ns / 1e9, "s")
    } else if ns >= 1e6 {
        (ns / 1e6, "ms")
    } else if ns >= 1e3 {
        (ns / 1e3, "µs")
    } else {
        (ns, "ns")
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {unit}")
}

/// Formats a count with thousands separators.
#[must_use]
pub fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

/// Best (smallest) value of `get` among the peers measured for `(arch, workload)`.
fn best_peer<T: PartialOrd + Copy>(
    results: &Results,
    arch: &str,
    workload: &str,
    get: impl Fn(&Row) -> Option<T>,
) -> Option<T> {
    PEERS
        .iter()
        .filter_map(|p| results.get(&(arch.into(), (*p).into(), workload.into())))
        .filter_map(&get)
        .fold(None, |best: Option<T>, v| match best {
            Some(b) if b <= v => Some(b),
            _ => Some(v),
        })
}

/// Verdict on the goal for the candidate's row: the list of what is not met, or "yes".
fn verdict(results: &Results, arch: &str, workload: &str, row: &Row) -> String {
    let mut misses = Vec::new();
    let t = best_peer(results, arch, workload, |r| r.time_ns);
    if let (Some(best), Some(mine)) = (t, row.time_ns) {
        if best / mine < GOAL {
            misses.push(format!("time {:.3}×", best / mine));
        }
    }
    let i = best_peer(results, arch, workload, |r| r.instructions);
    if let (Some(best), Some(mine)) = (i, row.instructions) {
        let ratio = best as f64 / mine as f64;
        if ratio < GOAL {
            misses.push(format!("instructions {ratio:.3}×"));
        }
    }
    let fr = best_peer(results, arch, workload, |r| r.frames);
    if let (Some(best), Some(mine)) = (fr, row.frames) {
        if mine > best {
            misses.push(format!("frames {mine} > {best}"));
        }
    }
    if workload == "W5" && row.frames.is_some_and(|f| f > 1) {
        misses.push("tables left after unmap".into());
    }
    if misses.is_empty() {
        "yes".into()
    } else {
        format!("**no**: {}", misses.join(", "))
    }
}

/// The markdown table for one architecture: every workload, every crate measured there.
#[must_use]
pub fn arch_table(results: &Results, arch: &str, workloads: &[&str]) -> String {
    let mut out = String::new();
    out.push_str(
        "| workload | crate | time (median) | instructions | frames after | \
         time speed-up vs best peer | instr. speed-up vs best peer | goal met |\n\
         |---|---|---:|---:|---:|---:|---:|---|\n",
    );
    for &w in workloads {
        let order = std::iter::once(CANDIDATE).chain(PEERS);
        for krate in order {
            let Some(row) = results.get(&(arch.into(), krate.into(), w.into())) else {
                continue;
            };
            let tb = best_peer(results, arch, w, |r| r.time_ns);
            let ib = best_peer(results, arch, w, |r| r.instructions);
            let ts = opt(tb.zip(row.time_ns), |(b, m)| format!("{:.2}×", b / m));
            let is = opt(ib.zip(row.instructions), |(b, m)| {
                format!("{:.2}×", b as f64 / m as f64)
            });
            let goal = if krate == CANDIDATE {
                verdict(results, arch, w, row)
            } else {
                String::new()
            };
            let name = if krate == CANDIDATE {
                format!("**{krate}**")
            } else {
                krate.to_string()
            };
            let _ = writeln!(
                out,
                "| {w} | {name} | {} | {} | {} | {ts} | {is} | {goal} |",
                opt(row.time_ns, fmt_time),
                opt(row.instructions, fmt_count),
                opt(row.frames, fmt_count),
            );
        }
    }
    out
}

/// A table of rows for crates outside the comparison (e.g. `mmu-stage2`), no ratios.
#[must_use]
pub fn extra_table(results: &Results, arch: &str, krate: &str, workloads: &[&str]) -> String {
    let mut out = String::new();
    out.push_str(
        "| workload | time (median) | instructions | frames after |\n|---|---:|---:|---:|\n",
    );
    for &w in workloads {
        if let Some(row) = results.get(&(arch.into(), krate.into(), w.into())) {
            let _ = writeln!(
                out,
                "| {w} | {} | {} | {} |",
                opt(row.time_ns, fmt_time),
                opt(row.instructions, fmt_count),
                opt(row.frames, fmt_count),
            );
        }
    }
    out
}

/// Replaces the text between `begin` and `end` markers in `doc` with `body` (markers
/// kept); appends a marked section when the markers are missing.
#[must_use]
pub fn splice(doc: &str, begin: &str, end: &str, body: &str) -> String {
    match (doc.find(begin), doc.find(end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{begin}\n{body}{}", &doc[..b], &doc[e..])
        }
        _ => {
            let sep = if doc.is_empty() || doc.ends_with("\n\n") {
                ""
            } else if doc.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{doc}{sep}{begin}\n{body}{end}\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_read_from_criterion_json() {
        let json = r#"{"mean":{"confidence_interval":{"lower_bound":1.0},"point_estimate":5.5},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":2.0,"upper_bound":3.0},"point_estimate":2500.25,"standard_error":1.0},"slope":null}"#;
        assert_eq!(criterion_median(json), Some(2500.25));
        assert_eq!(criterion_median("{}"), None);
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_count(1_234_567), "1,234,567");
        assert_eq!(fmt_count(999), "999");
        assert_eq!(fmt_time(2_500.0), "2.50 µs");
        assert_eq!(fmt_time(291_330_000.0), "291 ms");
        assert_eq!(fmt_time(12.0), "12.0 ns");
    }

    fn key(a: &str, c: &str, w: &str) -> (String, String, String) {
        (a.into(), c.into(), w.into())
    }

    #[test]
    fn verdict_compares_with_the_best_peer() {
        let mut r = Results::new();
        let row = |t, i, f| Row {
            time_ns: Some(t),
            instructions: Some(i),
            frames: Some(f),
        };
        r.insert(key("a", "aarch64-paging", "W1"), row(300.0, 3000, 515));
        r.insert(
            key("a", "page_table_multiarch", "W1"),
            row(200.0, 4000, 516),
        );
        r.insert(key("a", "mmu", "W1"), row(100.0, 1000, 515));
        r.insert(key("a", "aarch64-paging", "W5"), row(100.0, 1000, 3));
        r.insert(key("a", "mmu", "W5"), row(90.0, 500, 3));
        let t = arch_table(&r, "a", &["W1", "W5"]);
        // Best peer time is 200 (multiarch), best peer instructions 3000 (paging).
        assert!(
            t.contains("| W1 | **mmu** | 100 ns | 1,000 | 515 | 2.00× | 3.00× | yes |"),
            "{t}"
        );
        assert!(t.contains("time 1.111×"), "{t}");
        assert!(t.contains("tables left after unmap"), "{t}");
        assert!(!t.contains("instructions 2.000×"), "{t}");
    }

    #[test]
    fn splice_replaces_only_the_marked_section() {
        let doc = "# B\n\nintro\n<!-- a -->\nold\n<!-- b -->\n\n## Linux\nkept\n";
        let out = splice(doc, "<!-- a -->", "<!-- b -->", "new\n");
        assert_eq!(
            out,
            "# B\n\nintro\n<!-- a -->\nnew\n<!-- b -->\n\n## Linux\nkept\n"
        );
        let fresh = splice("# B\n", "<!-- a -->", "<!-- b -->", "x\n");
        assert_eq!(fresh, "# B\n\n<!-- a -->\nx\n<!-- b -->\n");
    }
}
