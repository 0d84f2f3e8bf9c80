//! Running a command to completion or a time limit, capturing what it prints, and the
//! checks the integration tests and benchmarks make on that output.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The hypervisor's exit statuses as QEMU reports them (`boot::exit_status`).
pub mod exit_status {
    /// Success: PSCI SYSTEM_OFF.
    pub const SUCCESS: i32 = 0;
    /// A Rust panic.
    pub const PANIC: i32 = boot::exit_status::PANIC as i32;
    /// An unexpected exception at EL2.
    pub const EL2_EXCEPTION: i32 = boot::exit_status::EL2_EXCEPTION as i32;
    /// Not loaded at the link address.
    pub const WRONG_LOAD_ADDRESS: i32 = boot::exit_status::WRONG_LOAD_ADDRESS as i32;
    /// Not entered at EL2.
    pub const NOT_EL2: i32 = boot::exit_status::NOT_EL2 as i32;
    /// Start-up error.
    pub const STARTUP: i32 = boot::exit_status::STARTUP as i32;
    /// Every VM is done and at least one was stopped.
    pub const VM_FAILED: i32 = boot::exit_status::VM_FAILED as i32;
}

/// Runs `command` to completion or until `timeout` (then kills it), capturing standard
/// output and error.
///
/// # Errors
///
/// A message when the command cannot be started.
pub fn run_captured(mut command: Command, timeout: Duration) -> Result<Run, String> {
    let line = format!("{command:?}");
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {line} ({e}): run scripts/setup"))?;
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(format!("{line}: no pipes"));
    };
    // Standard output line by line, with the time each line arrived.
    let out_reader = thread::spawn(move || {
        let mut lines = Vec::new();
        let mut reader = BufReader::new(&mut stdout);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf).replace(['\r', '\n'], "");
            lines.push((start.elapsed(), line));
            buf.clear();
        }
        lines
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
    let lines = out_reader.join().unwrap_or_default();
    let mut stdout = String::new();
    for (_, line) in &lines {
        stdout += line;
        stdout.push('\n');
    }
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    Ok(Run {
        command: line,
        stdout,
        line_times: lines.into_iter().map(|(t, _)| t).collect(),
        stderr,
        status: if timed_out {
            None
        } else {
            status.and_then(|s| s.code())
        },
        timed_out,
        duration,
    })
}

/// The result of a QEMU run.
#[derive(Clone, Debug)]
pub struct Run {
    /// The command line that ran.
    pub command: String,
    /// The serial console (carriage returns removed), one line per `\n`.
    pub stdout: String,
    /// When each line of `stdout` arrived, from the start of the run.
    pub line_times: Vec<Duration>,
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

    /// When the first line containing `needle` arrived, from the start of the run.
    #[must_use]
    pub fn time_of(&self, needle: &str) -> Option<Duration> {
        let at = self.stdout.lines().position(|l| l.contains(needle))?;
        self.line_times.get(at).copied()
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
            line_times: stdout.lines().map(|_| Duration::from_millis(5)).collect(),
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
        assert_eq!(run.time_of("c 4"), Some(Duration::from_millis(5)));
        assert_eq!(run.time_of("d"), None);
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
}
