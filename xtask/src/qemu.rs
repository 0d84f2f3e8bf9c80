//! The one place that writes a `qemu-system-aarch64` command line.
//!
//! Every line starts from `-nodefaults` and adds exactly the devices it names, so that a
//! run needs nothing a fresh machine lacks: no default NIC (whose boot ROM comes from a
//! package the set-up does not install), no default display, no default monitor.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::size::Size;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-aarch64";

/// The machine QEMU models: `virt` with EL2 (`virtualization=on`) and a GIC.
///
/// Its size (CPUs, RAM) is the machine's, not a guest's: a guest gets a part of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// `-cpu`: `cortex-a57`, `max`, or a model with options (`max,sme=off`).
    pub cpu: String,
    /// `-smp`.
    pub cpus: u32,
    /// `-m`.
    pub memory: Size,
    /// `gic-version=` (2 or 3).
    pub gic_version: u8,
    /// `virtualization=on` (EL2). Off only to show that the hypervisor refuses to run.
    pub el2: bool,
    /// More `-machine` options (`mte=on`, ...), appended to the machine's own.
    pub options: Vec<String>,
}

impl Default for Machine {
    /// One `cortex-a57`, 2 GiB, GICv3, EL2 on.
    fn default() -> Self {
        Self {
            cpu: "cortex-a57".into(),
            cpus: 1,
            memory: Size::gib(2),
            gic_version: 3,
            el2: true,
            options: Vec::new(),
        }
    }
}

impl Machine {
    /// The value of `-machine`.
    #[must_use]
    pub fn machine_arg(&self) -> String {
        let mut arg = String::from("virt");
        if self.el2 {
            arg += ",virtualization=on";
        }
        arg += &format!(",gic-version={}", self.gic_version);
        for option in &self.options {
            arg.push(',');
            arg += option;
        }
        arg
    }

    /// The arguments that define the machine (`-machine`, `-cpu`, `-smp`, `-m`): what a
    /// device-tree dump and the real run must share.
    #[must_use]
    pub fn args(&self) -> Vec<String> {
        vec![
            "-machine".into(),
            self.machine_arg(),
            "-cpu".into(),
            self.cpu.clone(),
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            self.memory.qemu_arg(),
        ]
    }
}

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Console {
    /// The terminal, multiplexed with QEMU's monitor (Ctrl-a x quits, Ctrl-a c monitor).
    Interactive,
    /// Standard output, no monitor (tests and benchmarks read it).
    Stdout,
    /// A file (the terminal belongs to a debugger).
    File(PathBuf),
}

/// A file QEMU's generic loader writes into guest-physical memory before any CPU runs
/// (`-device loader,file=..,addr=..,force-raw=on`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Load {
    /// The file.
    pub file: PathBuf,
    /// Its physical address.
    pub addr: u64,
}

impl Load {
    /// Parses `FILE@ADDR` (`ADDR` in hex with `0x`, or decimal).
    ///
    /// # Errors
    ///
    /// A message naming the malformed part.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (file, addr) = spec
            .rsplit_once('@')
            .ok_or_else(|| format!("'{spec}' is not FILE@ADDR"))?;
        let addr = crate::size::parse_u64(addr)
            .ok_or_else(|| format!("'{addr}' in '{spec}' is not an address"))?;
        Ok(Self {
            file: file.into(),
            addr,
        })
    }
}

/// A file QEMU's fw-cfg device offers under `name` (`-fw_cfg name=..,file=..`); the
/// hypervisor fetches it by DMA straight into a VM's RAM (`docs/vms.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FwCfgFile {
    /// Its name in the device's directory (`opt/...`).
    pub name: String,
    /// The file.
    pub file: PathBuf,
}

/// A `qemu-system-aarch64` command line (builder).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qemu {
    /// The machine.
    pub machine: Machine,
    /// `-kernel`: the image QEMU boots (an arm64 Image is entered at EL2 with x0 = DTB).
    pub kernel: Option<PathBuf>,
    /// `-dtb`: the device tree passed in x0 instead of QEMU's own.
    pub dtb: Option<PathBuf>,
    /// Files staged in memory.
    pub loads: Vec<Load>,
    /// Files offered through the fw-cfg device.
    pub files: Vec<FwCfgFile>,
    /// The serial console.
    pub console: Console,
    /// Start halted with a gdb server on TCP port 1234 (`-s -S`).
    pub gdb: bool,
    /// More arguments, after everything else (they reach the device-tree dump too).
    pub extra: Vec<String>,
}

impl Qemu {
    /// A run of `kernel` on `machine`, console on standard output.
    #[must_use]
    pub fn new(machine: Machine) -> Self {
        Self {
            machine,
            kernel: None,
            dtb: None,
            loads: Vec::new(),
            files: Vec::new(),
            console: Console::Stdout,
            gdb: false,
            extra: Vec::new(),
        }
    }

    /// The boot image (`-kernel`).
    #[must_use]
    pub fn kernel(mut self, image: impl Into<PathBuf>) -> Self {
        self.kernel = Some(image.into());
        self
    }

    /// The device tree (`-dtb`).
    #[must_use]
    pub fn dtb(mut self, dtb: impl Into<PathBuf>) -> Self {
        self.dtb = Some(dtb.into());
        self
    }

    /// Stages `file` at physical `addr`.
    #[must_use]
    pub fn load(mut self, file: impl Into<PathBuf>, addr: u64) -> Self {
        self.loads.push(Load {
            file: file.into(),
            addr,
        });
        self
    }

    /// Where the console goes.
    #[must_use]
    pub fn console(mut self, console: Console) -> Self {
        self.console = console;
        self
    }

    /// More arguments (appended last).
    #[must_use]
    pub fn extra<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// The arguments after `qemu-system-aarch64`.
    #[must_use]
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["-nodefaults".to_owned()];
        args.extend(self.machine.args());
        args.extend(["-display", "none"].map(String::from));
        match &self.console {
            Console::Interactive => args.extend(["-serial", "mon:stdio"].map(String::from)),
            Console::Stdout => {
                args.extend(["-serial", "stdio", "-monitor", "none"].map(String::from));
            }
            Console::File(path) => {
                args.extend([
                    "-serial".into(),
                    format!("file:{}", path.display()),
                    "-monitor".into(),
                    "none".into(),
                ]);
            }
        }
        // Failing exit statuses are reported through semihosting (docs/architecture.md);
        // a reset request ends the run instead of restarting the machine.
        args.extend(["-semihosting", "-no-reboot"].map(String::from));
        if let Some(kernel) = &self.kernel {
            args.extend(["-kernel".into(), kernel.display().to_string()]);
        }
        if let Some(dtb) = &self.dtb {
            args.extend(["-dtb".into(), dtb.display().to_string()]);
        }
        for load in &self.loads {
            args.extend([
                "-device".into(),
                format!(
                    "loader,file={},addr={:#x},force-raw=on",
                    load.file.display(),
                    load.addr
                ),
            ]);
        }
        for f in &self.files {
            args.extend([
                "-fw_cfg".into(),
                format!("name={},file={}", f.name, f.file.display()),
            ]);
        }
        if self.gdb {
            args.extend(["-s", "-S"].map(String::from));
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The arguments that make QEMU write the device tree of this machine to `out` and
    /// exit: the machine and the extra arguments (which may add devices), nothing that
    /// starts a CPU or opens a console.
    #[must_use]
    pub fn dump_dtb_args(&self, out: &Path) -> Vec<String> {
        let mut machine = self.machine.clone();
        machine.options.push(format!("dumpdtb={}", out.display()));
        let mut args = vec!["-nodefaults".to_owned()];
        args.extend(machine.args());
        args.extend(["-display", "none", "-monitor", "none", "-serial", "none"].map(String::from));
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The command, ready to run.
    #[must_use]
    pub fn command(&self) -> Command {
        let mut command = Command::new(QEMU);
        command.args(self.args());
        command
    }
}

impl fmt::Display for Qemu {
    /// The command line as a shell would take it (for logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(QEMU)?;
        for arg in self.args() {
            if arg.contains([' ', '"', '\'']) {
                write!(f, " '{arg}'")?;
            } else {
                write!(f, " {arg}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(args: &[String], what: &str) -> usize {
        args.iter()
            .position(|a| a == what)
            .unwrap_or_else(|| panic!("{what} not in {args:?}"))
    }

    #[test]
    fn every_line_starts_from_nodefaults_and_names_its_devices() {
        let q = Qemu::new(Machine {
            cpu: "max".into(),
            cpus: 4,
            memory: Size::mib(512),
            options: vec!["mte=on".into()],
            ..Machine::default()
        })
        .kernel("/x/hv.bin")
        .dtb("/x/host.dtb")
        .load("/x/guest.bin", 0x7000_0000);
        let mut q = q;
        q.files.push(FwCfgFile {
            name: "opt/twostage/kernel".into(),
            file: "/x/Image".into(),
        });
        let args = q.args();
        assert_eq!(args[0], "-nodefaults");
        assert_eq!(
            args[1..9],
            [
                "-machine",
                "virt,virtualization=on,gic-version=3,mte=on",
                "-cpu",
                "max",
                "-smp",
                "4",
                "-m",
                "512M"
            ]
        );
        // No network device, no default serial/monitor: each one is named.
        assert!(!args.iter().any(|a| a.contains("nic") || a.contains("net")));
        assert_eq!(args[position(&args, "-serial") + 1], "stdio");
        assert_eq!(args[position(&args, "-monitor") + 1], "none");
        assert_eq!(args[position(&args, "-kernel") + 1], "/x/hv.bin");
        assert_eq!(args[position(&args, "-dtb") + 1], "/x/host.dtb");
        assert_eq!(
            args[position(&args, "-device") + 1],
            "loader,file=/x/guest.bin,addr=0x70000000,force-raw=on"
        );
        assert_eq!(
            args[position(&args, "-fw_cfg") + 1],
            "name=opt/twostage/kernel,file=/x/Image"
        );
        assert!(args.contains(&"-semihosting".to_owned()));
    }

    #[test]
    fn consoles() {
        let m = Machine::default();
        let interactive = Qemu::new(m.clone()).console(Console::Interactive).args();
        assert_eq!(
            interactive[position(&interactive, "-serial") + 1],
            "mon:stdio"
        );
        assert!(!interactive.contains(&"-monitor".to_owned()));
        let file = Qemu::new(m)
            .console(Console::File("/t/s.log".into()))
            .args();
        assert_eq!(file[position(&file, "-serial") + 1], "file:/t/s.log");
    }

    #[test]
    fn the_dump_shares_machine_and_extra_arguments_only() {
        let mut q = Qemu::new(Machine {
            cpus: 2,
            gic_version: 2,
            el2: false,
            ..Machine::default()
        })
        .kernel("/x/hv.bin")
        .load("/x/g.bin", 0x1000)
        .extra(["-device", "virtio-blk-device,drive=d"]);
        q.gdb = true;
        let dump = q.dump_dtb_args(Path::new("/t/base.dtb"));
        assert_eq!(dump[0], "-nodefaults");
        assert_eq!(
            dump[position(&dump, "-machine") + 1],
            "virt,gic-version=2,dumpdtb=/t/base.dtb"
        );
        assert_eq!(dump[position(&dump, "-smp") + 1], "2");
        assert!(dump.ends_with(&["-device".into(), "virtio-blk-device,drive=d".into()]));
        for absent in ["-kernel", "-S", "-s", "-semihosting"] {
            assert!(!dump.contains(&absent.to_owned()), "{absent} in {dump:?}");
        }
        let run = q.args();
        assert!(run.ends_with(&[
            "-s".into(),
            "-S".into(),
            "-device".into(),
            "virtio-blk-device,drive=d".into()
        ]));
    }

    #[test]
    fn loads_parse_and_refuse_nonsense() {
        assert_eq!(
            Load::parse("out/g.bin@0x70000000"),
            Ok(Load {
                file: "out/g.bin".into(),
                addr: 0x7000_0000
            })
        );
        assert_eq!(Load::parse("a@b@4096").map(|l| l.addr), Ok(4096));
        assert!(Load::parse("nofile").is_err());
        assert!(Load::parse("f@0xzz").is_err());
    }

    #[test]
    fn display_quotes_arguments_with_spaces() {
        let q = Qemu::new(Machine::default()).extra(["-append", "a b"]);
        let line = q.to_string();
        assert!(line.starts_with("qemu-system-aarch64 -nodefaults -machine virt,"));
        assert!(line.ends_with("-append 'a b'"), "{line}");
    }
}
