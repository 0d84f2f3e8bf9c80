//! Harness for the QEMU integration tests: runs `qemu-system-aarch64` on an artifact from
//! `out/` (built by `scripts/build`), with a time limit, and captures the serial output
//! and the exit status.
//!
//! ```no_run
//! use integration::{artifact, Qemu};
//! use std::time::Duration;
//!
//! let run = Qemu::new()
//!     .cpus(4)
//!     .cpu_model("max")
//!     .kernel(artifact("hypervisor.bin"))
//!     .extra_args(["-device", "loader,file=out/test-guest.bin,addr=0x50000000"])
//!     .timeout(Duration::from_secs(30))
//!     .run();
//! run.assert_success();
//! run.assert_lines_in_order(&["running at EL2", "all 4 CPUs online"]);
//! ```
//!
//! The harness never builds anything: a missing artifact fails the test with a message
//! saying to run `scripts/build` (which `scripts/test` does first).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Default time limit of a run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Exit statuses of the hypervisor (mirrors `boot::exit_status`, which the tests cannot
/// link: it is built for the bare-metal target).
pub mod exit_status {
    /// Success: PSCI SYSTEM_OFF.
    pub const SUCCESS: i32 = 0;
    /// A Rust panic.
    pub const PANIC: i32 = 1;
    /// An unexpected exception at EL2.
    pub const EL2_EXCEPTION: i32 = 2;
    /// Not loaded at the link address.
    pub const WRONG_LOAD_ADDRESS: i32 = 3;
    /// Not entered at EL2.
    pub const NOT_EL2: i32 = 4;
    /// Start-up error.
    pub const STARTUP: i32 = 5;
    /// Every VM is done and at least one was stopped.
    pub const VM_FAILED: i32 = 6;
}

/// The directory holding the build artifacts: `$TWOSTAGE_OUT`, or `out/` at the
/// workspace root.
#[must_use]
pub fn out_dir() -> PathBuf {
    match std::env::var_os("TWOSTAGE_OUT") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../out"),
    }
}

/// The path of an artifact in [`out_dir`].
///
/// # Panics
///
/// If the file does not exist, with a message naming the command that builds it.
#[must_use]
pub fn artifact(name: &str) -> PathBuf {
    let path = out_dir().join(name);
    assert!(
        path.is_file(),
        "missing build artifact {}: run scripts/build first (scripts/test does)",
        path.display()
    );
    path
}

/// A QEMU `virt` machine to run (builder).
#[derive(Clone, Debug)]
pub struct Qemu {
    machine: String,
    cpu_model: String,
    cpus: usize,
    memory: String,
    kernel: Option<PathBuf>,
    extra: Vec<String>,
    timeout: Duration,
}

impl Default for Qemu {
    fn default() -> Self {
        Self::new()
    }
}

impl Qemu {
    /// `virt` with `virtualization=on` and GICv3, one `cortex-a57`, 2 GiB of RAM,
    /// semihosting on, no network, the default time limit, and the hypervisor image
    /// (`out/hypervisor.bin`) as kernel.
    #[must_use]
    pub fn new() -> Self {
        Self {
            machine: "virt,virtualization=on,gic-version=3".into(),
            cpu_model: "cortex-a57".into(),
            cpus: 1,
            memory: "2G".into(),
            kernel: None,
            extra: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Number of CPUs (`-smp`).
    #[must_use]
    pub fn cpus(mut self, n: usize) -> Self {
        self.cpus = n;
        self
    }

    /// CPU model (`-cpu`), e.g. `cortex-a57` or `max`.
    #[must_use]
    pub fn cpu_model(mut self, model: &str) -> Self {
        self.cpu_model = model.into();
        self
    }

    /// Machine and its options (`-machine`).
    #[must_use]
    pub fn machine(mut self, machine: &str) -> Self {
        self.machine = machine.into();
        self
    }

    /// RAM size (`-m`).
    #[must_use]
    pub fn memory(mut self, size: &str) -> Self {
        self.memory = size.into();
        self
    }

    /// The image QEMU boots with `-kernel`.
    #[must_use]
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// Boots no `-kernel` at all (the extra arguments load everything).
    #[must_use]
    pub fn no_kernel(mut self) -> Self {
        self.kernel = Some(PathBuf::new());
        self
    }

    /// More QEMU arguments, appended after the harness's own.
    #[must_use]
    pub fn extra_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.extra
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Time limit; QEMU is killed when it is reached.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The full command line (for logs and `scripts/debug`-style reproduction).
    #[must_use]
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-machine",
            &self.machine,
            "-cpu",
            &self.cpu_model,
            "-smp",
            &self.cpus.to_string(),
            "-m",
            &self.memory,
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-nic",
            "none",
            "-semihosting",
            "-no-reboot",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let kernel = match &self.kernel {
            Some(k) => k.clone(),
            None => artifact("hypervisor.bin"),
        };
        if !kernel.as_os_str().is_empty() {
            args.push("-kernel".into());
            args.push(kernel.display().to_string());
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Runs QEMU to completion or until the time limit.
    ///
    /// # Panics
    ///
    /// If `qemu-system-aarch64` cannot be started (not installed: run `scripts/setup`).
    #[must_use]
    pub fn run(&self) -> Run {
        let mut command = Command::new("qemu-system-aarch64");
        command.args(self.args());
        run_command(command, self.timeout)
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut command = Command::new(root.join(script));
    command.args(args).current_dir(&root);
    run_command(command, timeout)
}

fn run_command(mut command: Command, timeout: Duration) -> Run {
    let line = format!("{command:?}");
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {line} ({e}): run scripts/setup"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= timeout => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    let duration = start.elapsed();
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Run {
        command: line,
        stdout: stdout.replace('\r', ""),
        stderr,
        status: if timed_out {
            None
        } else {
            status.and_then(|s| s.code())
        },
        timed_out,
        duration,
    }
}

/// The result of a QEMU run.
#[derive(Clone, Debug)]
pub struct Run {
    /// The command line that ran.
    pub command: String,
    /// The serial console (carriage returns removed).
    pub stdout: String,
    /// QEMU's own messages and semihosting output.
    pub stderr: String,
    /// QEMU's exit status; `None` if it was killed (time limit) or died by a signal.
    pub status: Option<i32>,
    /// The time limit was reached.
    pub timed_out: bool,
    /// Wall-clock time of the run.
    pub duration: Duration,
}

impl Run {
    fn context(&self) -> String {
        format!(
            "command: {}\nstatus: {:?}{}, {:.2?}\n--- serial ---\n{}--- stderr ---\n{}",
            self.command,
            self.status,
            if self.timed_out { " (TIMED OUT)" } else { "" },
            self.duration,
            self.stdout,
            self.stderr
        )
    }

    /// Asserts the run ended by itself with `status`.
    ///
    /// # Panics
    ///
    /// Otherwise, printing the whole run.
    pub fn assert_status(&self, status: i32) {
        assert!(
            !self.timed_out && self.status == Some(status),
            "expected exit status {status}\n{}",
            self.context()
        );
    }

    /// Asserts the run ended with status 0 (PSCI SYSTEM_OFF).
    ///
    /// # Panics
    ///
    /// Otherwise, printing the whole run.
    pub fn assert_success(&self) {
        self.assert_status(exit_status::SUCCESS);
    }

    /// Asserts that each needle occurs in a serial line after the line that matched the
    /// previous needle. Returns the matching lines.
    ///
    /// # Panics
    ///
    /// At the first needle not found in order, printing the whole run.
    pub fn assert_lines_in_order(&self, needles: &[&str]) -> Vec<&str> {
        let lines: Vec<&str> = self.stdout.lines().collect();
        let mut from = 0;
        let mut found = Vec::new();
        for needle in needles {
            match lines[from..].iter().position(|l| l.contains(needle)) {
                Some(i) => {
                    found.push(lines[from + i]);
                    from += i + 1;
                }
                None => panic!(
                    "no line containing {needle:?} after line {from} (needles in order: {needles:?})\n{}",
                    self.context()
                ),
            }
        }
        found
    }

    /// The serial lines containing `needle`.
    #[must_use]
    pub fn lines_containing(&self, needle: &str) -> Vec<&str> {
        self.stdout.lines().filter(|l| l.contains(needle)).collect()
    }

    /// Asserts no serial line contains `needle`.
    ///
    /// # Panics
    ///
    /// If one does, printing the whole run.
    pub fn assert_no_line(&self, needle: &str) {
        let hits = self.lines_containing(needle);
        assert!(
            hits.is_empty(),
            "unexpected {needle:?} in {hits:?}\n{}",
            self.context()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(stdout: &str) -> Run {
        Run {
            command: "qemu".into(),
            stdout: stdout.into(),
            stderr: String::new(),
            status: Some(0),
            timed_out: false,
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn lines_in_order() {
        let run = run_with("a 1\nb 2\na 3\nc 4\n");
        assert_eq!(
            run.assert_lines_in_order(&["a", "a", "c"]),
            ["a 1", "a 3", "c 4"]
        );
        assert_eq!(run.lines_containing("a"), ["a 1", "a 3"]);
    }

    #[test]
    #[should_panic(expected = "no line containing \"b\" after line 3")]
    fn lines_out_of_order_fail() {
        run_with("a 1\nb 2\na 3\nc 4\n").assert_lines_in_order(&["a", "a", "b"]);
    }

    #[test]
    #[should_panic(expected = "expected exit status 0")]
    fn timeout_is_not_success() {
        let mut run = run_with("");
        run.timed_out = true;
        run.status = None;
        run.assert_success();
    }

    #[test]
    fn command_line() {
        let q = Qemu::new()
            .cpus(4)
            .cpu_model("max")
            .kernel("/x/hv.bin")
            .extra_args(["-s", "-S"]);
        let args = q.args().join(" ");
        assert!(args.contains("-cpu max -smp 4"), "{args}");
        assert!(args.contains("-semihosting"), "{args}");
        assert!(args.ends_with("-kernel /x/hv.bin -s -S"), "{args}");
        assert!(!Qemu::new()
            .no_kernel()
            .args()
            .contains(&"-kernel".to_string()));
    }

    #[test]
    #[should_panic(expected = "run scripts/build first")]
    fn missing_artifact_is_explained() {
        let _ = artifact("no-such-image.bin");
    }
}
