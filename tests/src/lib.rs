//! Harness for the QEMU integration tests: boots the hypervisor on an image from `out/`
//! with a time limit, through the xtask's QEMU builder and device-tree writer (the same
//! command lines `cargo xtask run` uses), and captures the serial output and exit status.
//!
//! ```no_run
//! use integration::{artifact, Boot};
//! use std::time::Duration;
//!
//! let run = Boot::new()
//!     .cpus(4)
//!     .cpu_model("max")
//!     .kernel(artifact("hypervisor.bin"))
//!     .timeout(Duration::from_secs(30))
//!     .run();
//! run.assert_success();
//! run.assert_lines_in_order(&["running at EL2", "all 4 CPUs online"]);
//! ```
//!
//! The harness never builds anything: a missing artifact fails the test with a message
//! naming the command that builds it (`scripts/test` builds everything first).

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use xtask::artifacts::out_dir;
pub use xtask::process::{exit_status, Run};
use xtask::qemu::{Machine, Qemu};
pub use xtask::vm::{AbortPolicy, Ram, Stage2Mappings, Staged, VmNode};

/// Default time limit of a run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The path of an artifact in [`out_dir`].
///
/// # Panics
///
/// If the file does not exist, with a message naming the command that builds it.
#[must_use]
pub fn artifact(name: &str) -> PathBuf {
    xtask::artifacts::existing(out_dir().join(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// The workspace root.
#[must_use]
pub fn root() -> PathBuf {
    xtask::artifacts::root()
}

/// A boot of the hypervisor under QEMU (builder over [`xtask::qemu::Qemu`]).
#[derive(Clone, Debug)]
pub struct Boot {
    qemu: Qemu,
    timeout: Duration,
}

impl Default for Boot {
    fn default() -> Self {
        Self::new()
    }
}

impl Boot {
    /// One `cortex-a57`, 2 GiB, GICv3, EL2, booting `out/hypervisor.bin`, with the
    /// default time limit.
    #[must_use]
    pub fn new() -> Self {
        Self {
            qemu: Qemu::new(Machine::default()).kernel(out_dir().join("hypervisor.bin")),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Number of CPUs.
    #[must_use]
    pub fn cpus(mut self, n: u32) -> Self {
        self.qemu.machine.cpus = n;
        self
    }

    /// CPU model, e.g. `cortex-a57` or `max`.
    #[must_use]
    pub fn cpu_model(mut self, model: &str) -> Self {
        self.qemu.machine.cpu = model.into();
        self
    }

    /// One more `-machine` option, e.g. `mte=on` (the device tree describes it).
    #[must_use]
    pub fn machine_option(mut self, option: &str) -> Self {
        self.qemu.machine.options.push(option.into());
        self
    }

    /// The machine without EL2 (`virtualization=off`).
    #[must_use]
    pub fn without_el2(mut self) -> Self {
        self.qemu.machine.el2 = false;
        self
    }

    /// The image QEMU boots with `-kernel`.
    #[must_use]
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.qemu.kernel = Some(path.into());
        self
    }

    /// Boots no `-kernel` at all (the extra arguments load everything).
    #[must_use]
    pub fn no_kernel(mut self) -> Self {
        self.qemu.kernel = None;
        self
    }

    /// Stages `file` at physical `addr`.
    #[must_use]
    pub fn load(mut self, file: impl Into<PathBuf>, addr: u64) -> Self {
        self.qemu = self.qemu.load(file, addr);
        self
    }

    /// More QEMU arguments, appended last.
    #[must_use]
    pub fn extra_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.qemu = self.qemu.extra(args);
        self
    }

    /// Time limit; QEMU is killed when it is reached.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Boots with a host device tree of this machine carrying `vms` and the VM nodes of
    /// the `.dts` `fragments`, written into `out/tests/<test>/`.
    ///
    /// # Panics
    ///
    /// If the device tree cannot be written (QEMU's or dtc's message).
    #[must_use]
    pub fn with_vms(mut self, test: &str, vms: &[VmNode], fragments: &[&Path]) -> Self {
        let dir = out_dir().join("tests").join(test);
        let nodes: Vec<_> = vms.iter().map(VmNode::to_node).collect();
        let fragments: Vec<PathBuf> = fragments.iter().map(|f| f.to_path_buf()).collect();
        xtask::write_host_dtb(&mut self.qemu, &nodes, &fragments, &dir)
            .unwrap_or_else(|e| panic!("host device tree for {test}: {e}"));
        self
    }

    /// Runs QEMU to completion or until the time limit.
    ///
    /// # Panics
    ///
    /// If `qemu-system-aarch64` cannot be started (not installed: run `scripts/setup`).
    #[must_use]
    pub fn run(&self) -> Run {
        xtask::process::run_captured(self.qemu.command(), self.timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Runs one of the project's scripts (e.g. `scripts/run`) to completion or until
/// `timeout`, from the repository root, capturing its output like a QEMU run.
///
/// # Panics
///
/// If the script cannot be started.
#[must_use]
pub fn run_script(script: &str, args: &[&str], timeout: Duration) -> Run {
    let mut command = std::process::Command::new(root().join(script));
    command.args(args).current_dir(root());
    xtask::process::run_captured(command, timeout).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "cargo xtask build")]
    fn missing_artifact_is_explained() {
        let _ = artifact("no-such-image.bin");
    }
}
