//! `cargo xtask fuzz`: the coverage-guided fuzz targets of `fuzz/` (cargo-fuzz, libFuzzer;
//! AddressSanitizer with the nightly toolchain), and the short runs and Miri runs of
//! `cargo xtask test` (docs/fuzzing.md).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use clap::Args;

use xtask::artifacts::root;

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: [&str; 5] = [
    "mmu_ops",
    "config_dtb",
    "linux_image",
    "share_calls",
    "vcpu_exits",
];

/// Seconds each target runs in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 20;

/// Options of `cargo xtask fuzz`.
#[derive(Args)]
pub struct FuzzArgs {
    /// The target to run (every target when left out): mmu_ops, config_dtb, linux_image,
    /// share_calls, vcpu_exits.
    target: Option<String>,
    /// How long each target runs.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Rewrite the seed corpus (fuzz/corpus/<target>/seed-*) and run nothing.
    #[arg(long)]
    seeds: bool,
}

/// What one run found.
#[derive(Debug, Default)]
pub struct Counts {
    /// Inputs executed.
    pub runs: u64,
    /// Inputs in the corpus at the end (committed seeds and what the run added).
    pub corpus: u64,
    /// Crashes, timeouts and leaks, each saved under `fuzz/artifacts/<target>/`.
    pub crashes: Vec<String>,
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

fn succeeds(toolchain: Option<&str>, args: &[&str]) -> bool {
    let mut c = cargo(toolchain, &root());
    c.args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The toolchain the fuzz targets build with: nightly (AddressSanitizer) where the
/// machine has it, otherwise the default one with no sanitizer (coverage-guided all the
/// same: panics, overflow checks and invariants are what the targets look for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toolchain {
    /// `cargo +nightly fuzz`, AddressSanitizer.
    Nightly,
    /// `cargo fuzz --sanitizer none` on the default toolchain.
    Default,
}

impl Toolchain {
    /// Nightly if it and cargo-fuzz run, else the default toolchain with cargo-fuzz.
    ///
    /// # Errors
    ///
    /// cargo-fuzz is not installed (`scripts/setup --test` installs it).
    pub fn detect() -> Result<Self, String> {
        if succeeds(Some("nightly"), &["fuzz", "--version"]) {
            Ok(Self::Nightly)
        } else if succeeds(None, &["fuzz", "--version"]) {
            Ok(Self::Default)
        } else {
            Err("cargo-fuzz is missing: run scripts/setup --test".into())
        }
    }

    fn name(self) -> Option<&'static str> {
        match self {
            Self::Nightly => Some("nightly"),
            Self::Default => None,
        }
    }

    /// How the targets are built, for the step titles.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::Nightly => "nightly, AddressSanitizer",
            Self::Default => "no nightly toolchain here: default toolchain, no sanitizer",
        }
    }

    /// `cargo [+nightly] fuzz SUB` with the sanitizer choice.
    fn fuzz(self, sub: &str) -> Command {
        let mut c = cargo(self.name(), &fuzz_dir());
        c.args(["fuzz", sub]);
        if self == Self::Default {
            c.args(["--sanitizer", "none"]);
        }
        c
    }
}

/// `cargo [+toolchain] ...` in `dir`, without the variables of the cargo running the
/// xtask (which would pin its toolchain).
fn cargo(toolchain: Option<&str>, dir: &Path) -> Command {
    let mut c = Command::new("cargo");
    if let Some(t) = toolchain {
        c.arg(format!("+{t}"));
    }
    c.current_dir(dir);
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "CARGO_MANIFEST_DIR",
    ] {
        c.env_remove(var);
    }
    c
}

fn status(mut c: Command, what: &str) -> Result<(), String> {
    let s = c.status().map_err(|e| format!("cannot run {what}: {e}"))?;
    if s.success() {
        Ok(())
    } else {
        Err(format!("{what} failed"))
    }
}

/// Builds every target (instrumented, with debug assertions).
///
/// # Errors
///
/// The build failed.
pub fn build(toolchain: Toolchain) -> Result<(), String> {
    status(toolchain.fuzz("build"), "cargo fuzz build")
}

/// Lints and checks the formatting of the fuzz crate (its own workspace).
///
/// # Errors
///
/// A lint fired.
pub fn clippy(toolchain: Toolchain) -> Result<(), String> {
    let mut c = cargo(toolchain.name(), &fuzz_dir());
    c.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    status(c, "cargo clippy in fuzz/")?;
    let mut c = cargo(toolchain.name(), &fuzz_dir());
    c.args(["fmt", "--", "--check"]);
    status(c, "cargo fmt in fuzz/")
}

/// Writes the seed corpus.
fn seeds() -> Result<(), String> {
    let mut c = cargo(None, &fuzz_dir());
    c.args(["run", "-q", "--example", "seeds"]);
    status(c, "the seeds example")
}

/// Runs `target` for `seconds` on the committed corpus; new inputs go to
/// `fuzz/target/corpus/<target>` (not committed; emptied first when `fresh`), crashes
/// to `fuzz/artifacts/<target>/`.
///
/// # Errors
///
/// libFuzzer could not be run.
pub fn run_target(
    toolchain: Toolchain,
    target: &str,
    seconds: u64,
    fresh: bool,
) -> Result<Counts, String> {
    let dir = fuzz_dir();
    let scratch = dir.join("target/corpus").join(target);
    if fresh {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let committed = dir.join("corpus").join(target);
    let mut c = toolchain.fuzz("run");
    c.arg(target)
        .arg(&scratch)
        .arg(&committed)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // An input that runs for 20 s is a hang: reported like a crash.
        .arg("-timeout=20")
        .arg("-print_final_stats=1");
    let out = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let mut counts = parse(&text);
    if !out.status.success() && counts.crashes.is_empty() {
        counts
            .crashes
            .push("libFuzzer failed without saving an input".into());
    }
    if !counts.crashes.is_empty() {
        // What the target said: the panic message and the input.
        let lines: Vec<&str> = text.lines().collect();
        for l in &lines[lines.len().saturating_sub(60)..] {
            eprintln!("  | {l}");
        }
    }
    Ok(counts)
}

/// The counts in libFuzzer's output.
fn parse(text: &str) -> Counts {
    let mut c = Counts::default();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            c.runs += v.trim().parse::<u64>().unwrap_or(0);
        }
        // "#2476	DONE   cov: 2717 ft: 10825 corp: 625/49Kb ..."
        if line.contains("DONE") || line.contains("pulse") || line.contains("INITED") {
            if let Some(n) = line
                .split_whitespace()
                .skip_while(|w| *w != "corp:")
                .nth(1)
                .and_then(|v| v.split('/').next())
                .and_then(|v| v.parse().ok())
            {
                c.corpus = n;
            }
        }
        if let Some(i) = line.find("Test unit written to ") {
            c.crashes.push(line[i + 21..].trim().to_owned());
        }
    }
    c
}

/// Number of files in `dir`.
fn files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.filter_map(Result::ok).count())
}

/// Runs every target for `seconds` each and prints its counts; fails on any crash.
/// `fresh`: start from the committed corpus alone (the tests), not from what earlier
/// runs added.
///
/// # Errors
///
/// A target crashed, hung or could not be run.
pub fn run_all(
    toolchain: Toolchain,
    targets: &[&str],
    seconds: u64,
    fresh: bool,
) -> Result<(), String> {
    let mut failed = Vec::new();
    for t in targets {
        let start = Instant::now();
        let committed = files(&fuzz_dir().join("corpus").join(t));
        let c = run_target(toolchain, t, seconds, fresh)?;
        eprintln!(
            "== fuzz {t}: {} inputs run in {:.0} s, corpus {} ({committed} committed), {} crashes",
            c.runs,
            start.elapsed().as_secs_f64(),
            c.corpus,
            c.crashes.len()
        );
        for crash in &c.crashes {
            eprintln!("   crash: {crash}");
            failed.push(format!("{t}: {crash}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzzing found {} crashes (replay one: cd fuzz && cargo +nightly fuzz run <target> <file>): {}",
            failed.len(),
            failed.join(", ")
        ))
    }
}

/// `cargo xtask fuzz`.
///
/// # Errors
///
/// What failed.
pub fn run(args: &FuzzArgs) -> Result<ExitCode, String> {
    if args.seeds {
        seeds()?;
        return Ok(ExitCode::SUCCESS);
    }
    let targets: Vec<&str> = match &args.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => return Err(format!("no fuzz target {t}: {}", TARGETS.join(", "))),
        None => TARGETS.to_vec(),
    };
    let toolchain = Toolchain::detect()?;
    eprintln!("xtask: fuzzing with {}", toolchain.describe());
    build(toolchain)?;
    run_all(toolchain, &targets, args.seconds, false)?;
    Ok(ExitCode::SUCCESS)
}

/// The Miri runs of `cargo xtask test`: `mmu`'s unit tests and the integration tests
/// that finish in minutes under the interpreter (the three that map a GiB in pages and
/// the property tests over random sequences do not; proptest cases are cut to 1).
/// Returns how many tests passed, `None` when the machine has no nightly toolchain with
/// Miri (rustup cannot fetch one everywhere; `scripts/setup --test` installs it where it
/// can).
///
/// # Errors
///
/// Miri found undefined behaviour or a test failed.
pub fn miri() -> Result<Option<usize>, String> {
    if !succeeds(Some("nightly"), &["miri", "--version"]) {
        return Ok(None);
    }
    let runs: [&[&str]; 2] = [
        &[
            "--lib",
            "--test",
            "basic",
            "--test",
            "encoding",
            "--test",
            "regressions",
            // LinearMap over frames reached at unaligned addresses, single-entry paths.
            "--test",
            "mapping",
            "--test",
            "single",
            "--",
            "--skip",
            "range_invalidation_covers",
            "--skip",
            "unmap_frees_hundreds",
            "--skip",
            "huge_range_unmap",
        ],
        &[
            "--test",
            "live",
            "--",
            "remap_output",
            "memory_type_change",
            "block_split_and_merge",
            "threshold_switches",
            "unmap_in_a_gib",
        ],
    ];
    let mut passed = 0;
    for args in runs {
        let mut c = cargo(Some("nightly"), &root());
        c.args(["miri", "test", "-p", "mmu"])
            .args(args)
            // proptest reads the working directory for its regression files.
            .env("MIRIFLAGS", "-Zmiri-disable-isolation")
            .env("PROPTEST_CASES", "1")
            .stderr(Stdio::inherit());
        let out = c
            .output()
            .map_err(|e| format!("cannot run cargo miri: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}");
        if !out.status.success() {
            return Err(format!(
                "Miri: cargo miri test -p mmu {} failed",
                args.join(" ")
            ));
        }
        passed += text
            .lines()
            .filter_map(|l| l.strip_prefix("test result: ok. "))
            .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
            .sum::<usize>();
    }
    Ok(Some(passed))
}
