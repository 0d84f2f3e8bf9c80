//! The bare-metal images in `out/`, and the cargo builds that make them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The bare-metal target.
pub const TARGET: &str = "aarch64-unknown-none";
/// The Cargo profile of the bare-metal images (`image` in Cargo.toml: `release` with LTO).
pub const PROFILE: &str = "image";

/// Hypervisor builds with a fault-injection or self-test feature, each proving one
/// property in the QEMU tests (`hypervisor/Cargo.toml` says what each does). Only the
/// tests need them.
pub const TEST_VARIANTS: [&str; 6] = [
    "fault-write-text",
    "fault-exec-data",
    "fault-read-guest-ram",
    "fault-panic",
    "fault-stack-overflow",
    "selftest-guest-entry",
];

/// The workspace root.
#[must_use]
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// Where images, generated device trees and logs go: `$TWOSTAGE_OUT`, or `out/`.
#[must_use]
pub fn out_dir() -> PathBuf {
    std::env::var_os("TWOSTAGE_OUT").map_or_else(|| root().join("out"), PathBuf::from)
}

/// One image to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Artifact {
    /// `out/hypervisor.{elf,bin}`.
    Hypervisor,
    /// `out/hypervisor-<feature>.{elf,bin}`.
    Variant(&'static str),
    /// `out/test-guest.{elf,bin}`: the EL1 test guest.
    TestGuest,
}

impl Artifact {
    /// The file name without extension.
    #[must_use]
    pub fn name(self) -> String {
        match self {
            Self::Hypervisor => "hypervisor".into(),
            Self::Variant(feature) => format!("hypervisor-{feature}"),
            Self::TestGuest => "test-guest".into(),
        }
    }

    /// The raw image (what QEMU loads).
    #[must_use]
    pub fn bin(self) -> PathBuf {
        out_dir().join(format!("{}.bin", self.name()))
    }

    /// The ELF (symbols for gdb).
    #[must_use]
    pub fn elf(self) -> PathBuf {
        out_dir().join(format!("{}.elf", self.name()))
    }

    fn cargo_args(self) -> Vec<&'static str> {
        let mut args = vec!["build", "-q", "--profile", PROFILE, "--target", TARGET];
        match self {
            Self::Hypervisor => args.extend(["-p", "hypervisor"]),
            Self::Variant(feature) => args.extend(["-p", "hypervisor", "--features", feature]),
            Self::TestGuest => args.extend(["-p", "test-guest"]),
        }
        args
    }

    fn built_binary(self) -> PathBuf {
        let name = match self {
            Self::Hypervisor | Self::Variant(_) => "hypervisor",
            Self::TestGuest => "test-guest",
        };
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root().join("target"), PathBuf::from);
        target.join(TARGET).join(PROFILE).join(name)
    }
}

/// `llvm-objcopy` from the active toolchain's `llvm-tools` component.
fn objcopy() -> Result<PathBuf, String> {
    let output = |args: &[&str]| -> Result<String, String> {
        let out = Command::new("rustc")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run rustc: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let sysroot = output(&["--print", "sysroot"])?;
    let host = output(&["-vV"])?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .ok_or("rustc -vV names no host")?;
    let path = Path::new(&sysroot)
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-objcopy");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: run scripts/setup (rustup component add llvm-tools)",
            path.display()
        ))
    }
}

/// Builds `artifacts` in order, each into `out/`, saying what it does and how long it
/// took.
///
/// # Errors
///
/// A message naming the build that failed (cargo prints the compiler's errors).
pub fn build(artifacts: &[Artifact]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let objcopy = objcopy()?;
    std::fs::create_dir_all(out_dir()).map_err(|e| format!("{}: {e}", out_dir().display()))?;
    for &a in artifacts {
        let start = Instant::now();
        eprint!("xtask: building {} ... ", a.name());
        let status = Command::new(&cargo)
            .args(a.cargo_args())
            .current_dir(root())
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            eprintln!("failed");
            return Err(format!("building {} failed", a.name()));
        }
        std::fs::copy(a.built_binary(), a.elf())
            .map_err(|e| format!("{}: {e}", a.elf().display()))?;
        let status = Command::new(&objcopy)
            .args(["-O", "binary"])
            .arg(a.elf())
            .arg(a.bin())
            .status()
            .map_err(|e| format!("cannot run {}: {e}", objcopy.display()))?;
        if !status.success() {
            return Err(format!("objcopy of {} failed", a.name()));
        }
        eprintln!("{:.1} s", start.elapsed().as_secs_f64());
    }
    Ok(())
}

/// The path of an artifact that must already be built.
///
/// # Errors
///
/// A message naming the command that builds it.
pub fn existing(path: PathBuf) -> Result<PathBuf, String> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build it with `cargo xtask build` (scripts/run and scripts/test do)",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_build_commands() {
        assert_eq!(Artifact::Hypervisor.name(), "hypervisor");
        assert_eq!(
            Artifact::Variant("fault-panic").bin().file_name(),
            Some("hypervisor-fault-panic.bin".as_ref())
        );
        assert_eq!(
            Artifact::Variant("fault-panic").cargo_args(),
            [
                "build",
                "-q",
                "--profile",
                PROFILE,
                "--target",
                TARGET,
                "-p",
                "hypervisor",
                "--features",
                "fault-panic"
            ]
        );
        assert!(Artifact::TestGuest
            .built_binary()
            .ends_with("target/aarch64-unknown-none/image/test-guest"));
    }

    #[test]
    fn a_missing_artifact_names_the_command_that_builds_it() {
        let err = existing(out_dir().join("no-such-image.bin")).expect_err("missing");
        assert!(err.contains("cargo xtask build"), "{err}");
    }
}
