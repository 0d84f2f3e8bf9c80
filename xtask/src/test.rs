//! `cargo xtask test`: every test, in the order that fails fastest, each step timed.

use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::Args;

use xtask::artifacts::{self, root, Artifact, TARGET, TEST_VARIANTS};

use crate::fuzz;

/// Options of `cargo xtask test`.
#[derive(Args)]
pub struct TestArgs {
    /// Leave out formatting and lints.
    #[arg(long)]
    no_lints: bool,
    /// Leave out the fuzz runs and Miri (they need the nightly toolchain).
    #[arg(long)]
    no_fuzz: bool,
}

/// One step: a title and a cargo command line.
struct Step {
    title: &'static str,
    args: Vec<String>,
}

fn cargo(title: &'static str, args: &[&str]) -> Step {
    Step {
        title,
        args: args.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn lint_steps() -> Vec<Step> {
    let variants = TEST_VARIANTS.join(",");
    vec![
        cargo("formatting", &["fmt", "--all", "--", "--check"]),
        cargo(
            "clippy, host",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        cargo(
            "clippy, mmu with arm-el2",
            &[
                "clippy",
                "-p",
                "mmu",
                "--all-targets",
                "--features",
                "arm-el2",
                "--",
                "-D",
                "warnings",
            ],
        ),
        cargo(
            "clippy, mmu-bench on aarch64-unknown-linux-gnu",
            &[
                "clippy",
                "-p",
                "mmu-bench",
                "--all-targets",
                "--target",
                "aarch64-unknown-linux-gnu",
                "--",
                "-D",
                "warnings",
            ],
        ),
        cargo(
            "clippy, bare metal",
            &[
                "clippy",
                "-p",
                "mmu",
                "-p",
                "boot",
                "-p",
                "hypervisor",
                "-p",
                "test-guest",
                "--target",
                TARGET,
                "--features",
                "mmu/arm-el2",
                "--",
                "-D",
                "warnings",
            ],
        ),
        Step {
            title: "clippy, bare-metal test builds",
            args: [
                "clippy",
                "-p",
                "hypervisor",
                "--target",
                TARGET,
                "--features",
                &variants,
                "--",
                "-D",
                "warnings",
            ]
            .map(String::from)
            .to_vec(),
        },
    ]
}

fn run_step(step: &Step) -> Result<(), String> {
    let start = Instant::now();
    eprintln!("== {}", step.title);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(&step.args)
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    eprintln!(
        "== {}: {} in {:.0} s",
        step.title,
        if status.success() { "passed" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: cargo {}",
            step.title,
            step.args.join(" ")
        ))
    }
}

/// Runs `f` as a titled, timed step.
fn timed<T>(title: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    let start = Instant::now();
    eprintln!("== {title}");
    let r = f();
    eprintln!(
        "== {title}: {} in {:.0} s",
        if r.is_ok() { "passed" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    r
}

/// The fuzz and Miri steps (docs/fuzzing.md): the fuzz crate's lints, `mmu`'s tests
/// under Miri, then each fuzz target for a short run on its committed corpus.
fn fuzz_and_miri(lints: bool) -> Result<(), String> {
    let toolchain = fuzz::Toolchain::detect()?;
    if lints {
        timed("clippy and formatting, fuzz crate", || {
            fuzz::clippy(toolchain)
        })?;
    }
    match timed("mmu under Miri", fuzz::miri)? {
        Some(passed) => {
            eprintln!("== Miri: {passed} mmu tests passed, no undefined behaviour found");
        }
        None => eprintln!(
            "== Miri: SKIPPED: no nightly toolchain with Miri on this machine \
             (scripts/setup --test installs one where rustup can fetch it)"
        ),
    }
    timed(
        &format!("fuzz targets: build ({})", toolchain.describe()),
        || fuzz::build(toolchain),
    )?;
    timed(
        &format!(
            "fuzz targets: {} s each on the committed corpus",
            fuzz::TEST_SECONDS
        ),
        || fuzz::run_all(toolchain, &fuzz::TARGETS, fuzz::TEST_SECONDS, true),
    )
}

/// Runs every step, stopping at the first failure.
///
/// # Errors
///
/// The step that failed.
pub fn run(args: &TestArgs) -> Result<ExitCode, String> {
    let start = Instant::now();
    if !args.no_lints {
        for step in lint_steps() {
            run_step(&step)?;
        }
    }
    run_step(&cargo(
        "host unit and property tests",
        &["test", "--workspace", "--exclude", "integration"],
    ))?;
    if !args.no_fuzz {
        fuzz_and_miri(!args.no_lints)?;
    }
    run_step(&cargo(
        "mmu and its peers agree (aarch64-unknown-linux-gnu under qemu-aarch64)",
        &[
            "test",
            "-p",
            "mmu-bench",
            "--target",
            "aarch64-unknown-linux-gnu",
            "--test",
            "agree",
        ],
    ))?;
    eprintln!("== bare-metal images");
    let mut all = vec![Artifact::Hypervisor, Artifact::TestGuest];
    all.extend(TEST_VARIANTS.map(Artifact::Variant));
    artifacts::build(&all)?;
    eprintln!("== Debian arm64 kernel and initramfs for the Linux guest tests");
    crate::fetch_linux()?;
    run_step(&cargo(
        "QEMU integration tests",
        &["test", "-p", "integration", "--", "--test-threads=1"],
    ))?;
    eprintln!(
        "== every test passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
