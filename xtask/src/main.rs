//! `cargo xtask build | run | debug | test | bench | fuzz | fetch-linux`: see `--help`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use xtask::artifacts::{self, root, Artifact, TEST_VARIANTS};
use xtask::linux::KernelGuest;
use xtask::qemu::{Console, Load, Machine, Qemu};
use xtask::size::Size;
use xtask::vm::{AbortPolicy, Stage2Mappings};

mod bench;
mod fuzz;
mod test;

/// Builds, runs, debugs, tests and benchmarks twostage, the AArch64 hypervisor, under
/// QEMU `virt` (EL2, GIC).
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Builds the hypervisor and the EL1 test guest into out/.
    Build {
        /// Also the hypervisor's fault-injection and self-test builds the QEMU tests use.
        #[arg(long)]
        test_variants: bool,
    },
    /// Builds what the run needs and boots the hypervisor under QEMU.
    ///
    /// With no guest option: two EL1 test-guest VMs (docs/examples/two-test-guests.dts)
    /// that run their checks and power off. The run ends by itself: exit status 0 after
    /// PSCI SYSTEM_OFF, the hypervisor's failure status otherwise
    /// (docs/architecture.md). Quit by hand with Ctrl-a x.
    Run(RunArgs),
    /// Like `run`, but QEMU waits halted for gdb-multiarch, which opens on the
    /// hypervisor's symbols; the serial console goes to out/debug-serial.log.
    Debug(RunArgs),
    /// Runs every test: formatting and lints, host tests, the bare-metal builds, the
    /// QEMU integration tests (including the Debian kernel guest).
    Test(test::TestArgs),
    /// Benchmarks; each writes its section of docs/BENCHMARKS.md.
    Bench(bench::BenchArgs),
    /// Runs the coverage-guided fuzz targets of fuzz/ (nightly toolchain, cargo-fuzz;
    /// docs/fuzzing.md): `cargo xtask fuzz share_calls --seconds 3600`.
    Fuzz(fuzz::FuzzArgs),
    /// Fetches the Debian arm64 kernel and builds the initramfs images (out/linux/).
    FetchLinux,
}

/// What to boot, the guest's size and the machine's.
#[derive(Args, Clone, Debug)]
#[command(group(ArgGroup::new("kernel_guest").args(["linux", "kernel"])))]
#[command(group(ArgGroup::new("guests").args(["bare", "linux", "kernel", "vms", "image"])))]
pub struct RunArgs {
    /// The hypervisor with no VM: start-up, then power off.
    #[arg(long, help_heading = "What to boot")]
    bare: bool,
    /// Debian's arm64 kernel with a busybox shell (downloaded on first use).
    #[arg(long, help_heading = "What to boot")]
    linux: bool,
    /// A kernel of yours as the guest: an arm64 Image, or a raw binary.
    #[arg(long, value_name = "IMAGE", help_heading = "What to boot")]
    kernel: Option<PathBuf>,
    /// The VMs of a description (docs/vms.md): a `/ { chosen { ... }; };` fragment.
    #[arg(long, value_name = "FILE.dts", help_heading = "What to boot")]
    vms: Option<PathBuf>,
    /// With --vms: stage FILE at physical ADDR (a guest image the description names).
    #[arg(
        long = "load",
        value_name = "FILE@ADDR",
        requires = "vms",
        help_heading = "What to boot"
    )]
    loads: Vec<String>,
    /// Another hypervisor image, with no VM.
    #[arg(long, value_name = "FILE", help_heading = "What to boot")]
    image: Option<PathBuf>,

    /// The guest's vCPUs [default: 1].
    #[arg(long, requires = "kernel_guest", help_heading = "The kernel guest")]
    cpus: Option<u32>,
    /// Each guest's RAM, as much as the machine has free (docs/memory-map.md)
    /// [default: 256M].
    #[arg(long, requires = "kernel_guest", help_heading = "The kernel guest")]
    mem: Option<Size>,
    /// Boot the kernel in this many VMs side by side, each with --cpus vCPUs on CPUs of
    /// its own and --mem of RAM, each with its own console (lines prefixed linux0,
    /// linux1, ...); the run ends when all are done.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        requires = "kernel_guest",
        help_heading = "The kernel guest"
    )]
    vms_count: u32,
    /// Its initramfs [--linux: out/linux/initramfs-shell.cpio].
    #[arg(
        long,
        value_name = "FILE",
        requires = "kernel_guest",
        help_heading = "The kernel guest"
    )]
    initrd: Option<PathBuf>,
    /// Its command line.
    #[arg(
        long,
        value_name = "ARGS",
        default_value = "console=ttyAMA0",
        requires = "kernel_guest",
        help_heading = "The kernel guest"
    )]
    append: String,
    /// What an access to an IPA with nothing behind it does: an external abort injected
    /// into the guest, or the VM stopped.
    #[arg(
        long,
        value_enum,
        default_value_t,
        requires = "kernel_guest",
        help_heading = "The kernel guest"
    )]
    abort_policy: AbortPolicy,
    /// How stage 2 maps the guest's RAM; pages are faster under QEMU's TCG
    /// (docs/linux-guest.md).
    #[arg(
        long,
        value_enum,
        default_value = "pages",
        requires = "kernel_guest",
        help_heading = "The kernel guest"
    )]
    stage2: Stage2Mappings,
    /// Pass a host device through to the (first) guest, by its path in the machine's
    /// device tree (repeatable), with its interrupts. The GIC, its ITS and the console
    /// are never passed through: every VM has a virtual GIC and a virtual PL011.
    #[arg(
        long = "device",
        value_name = "DT-PATH",
        requires = "kernel_guest",
        help_heading = "The kernel guest"
    )]
    devices: Vec<String>,

    /// CPU model: cortex-a57, max, or a model with options (max,sme=off).
    #[arg(long, default_value = "cortex-a57", help_heading = "The machine")]
    cpu: String,
    /// The machine's CPUs [default: 4; with kernel guests, their vCPUs].
    #[arg(long, help_heading = "The machine")]
    machine_cpus: Option<u32>,
    /// The machine's RAM [default: 2G, or what the kernel guests need].
    #[arg(long, help_heading = "The machine")]
    machine_mem: Option<Size>,
    /// GIC version.
    #[arg(long, value_enum, default_value = "3", help_heading = "The machine")]
    gic_version: GicVersion,
    /// More -machine options (repeatable), e.g. mte=on; the device tree describes them.
    #[arg(long = "machine-opt", value_name = "OPT", help_heading = "The machine")]
    machine_opts: Vec<String>,

    /// Do not build first.
    #[arg(long)]
    no_build: bool,
    /// Write the run's files (the host DTB QEMU boots with, host.dtb) here and keep them;
    /// by default they go to out/run/<pid>, removed when QEMU ends.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// More QEMU arguments; they reach the device tree too (e.g. -device ...).
    #[arg(last = true, value_name = "QEMU-ARGS")]
    qemu_args: Vec<String>,
}

/// The GIC QEMU models.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum GicVersion {
    /// GICv2.
    #[value(name = "2")]
    V2,
    /// GICv3.
    #[value(name = "3")]
    V3,
}

/// What a run boots.
#[derive(Debug)]
enum Guests {
    None,
    Default,
    Image(PathBuf),
    Description { dts: PathBuf, loads: Vec<Load> },
    Kernel(KernelGuest),
}

/// A path the user gave, checked.
fn user_file(path: &Path, what: &str) -> Result<PathBuf, String> {
    if path.is_file() {
        Ok(path.to_path_buf())
    } else {
        Err(format!("no {what} file '{}'", path.display()))
    }
}

impl RunArgs {
    fn guests(&self) -> Result<Guests, String> {
        if self.bare {
            return Ok(Guests::None);
        }
        if let Some(image) = &self.image {
            return Ok(Guests::Image(user_file(image, "hypervisor image")?));
        }
        if let Some(dts) = &self.vms {
            let loads = self
                .loads
                .iter()
                .map(|l| Load::parse(l))
                .collect::<Result<Vec<_>, _>>()?;
            for l in &loads {
                user_file(&l.file, "--load")?;
            }
            return Ok(Guests::Description {
                dts: user_file(dts, "VM description")?,
                loads,
            });
        }
        let (kernel, initrd) = if self.linux {
            let dir = artifacts::out_dir().join("linux");
            (
                dir.join("Image"),
                Some(
                    self.initrd
                        .clone()
                        .unwrap_or(dir.join("initramfs-shell.cpio")),
                ),
            )
        } else if let Some(k) = &self.kernel {
            (k.clone(), self.initrd.clone())
        } else {
            return Ok(Guests::Default);
        };
        let guest = KernelGuest {
            kernel,
            initrd,
            append: self.append.clone(),
            cpus: self.cpus.unwrap_or(1),
            mem: self.mem.unwrap_or(Size::mib(256)),
            count: self.vms_count,
            devices: self.devices.clone(),
            abort_policy: self.abort_policy,
            stage2: self.stage2,
        };
        guest.check()?;
        Ok(Guests::Kernel(guest))
    }

    fn machine(&self, guests: &Guests) -> Result<Machine, String> {
        let (cpus, memory) = match guests {
            Guests::Kernel(k) => (
                self.machine_cpus
                    .unwrap_or(k.cpus.saturating_mul(k.count.max(1))),
                match self.machine_mem {
                    Some(m) => m,
                    None => k.machine_mem_needed()?,
                },
            ),
            _ => (
                self.machine_cpus.unwrap_or(4),
                self.machine_mem.unwrap_or(Size::gib(2)),
            ),
        };
        Ok(Machine {
            cpu: self.cpu.clone(),
            cpus,
            memory,
            gic_version: match self.gic_version {
                GicVersion::V2 => 2,
                GicVersion::V3 => 3,
            },
            el2: true,
            options: self.machine_opts.clone(),
        })
    }

    /// Builds what the run needs (unless --no-build) and writes its QEMU command line;
    /// the files it writes for QEMU (the host DTB) go into [`RunDir`].
    fn prepare(&self, console: Console, dir: &RunDir) -> Result<Qemu, String> {
        let guests = self.guests()?;
        if self.linux {
            fetch_linux()?;
        }
        if !self.no_build {
            let needed: &[Artifact] = match guests {
                Guests::Image(_) => &[],
                Guests::None | Guests::Kernel(_) => &[Artifact::Hypervisor],
                Guests::Default | Guests::Description { .. } => {
                    &[Artifact::Hypervisor, Artifact::TestGuest]
                }
            };
            artifacts::build(needed)?;
        }
        let base = Qemu::new(self.machine(&guests)?)
            .console(console)
            .extra(self.qemu_args.clone());
        let hypervisor = || artifacts::existing(Artifact::Hypervisor.bin());
        let dir = &dir.path;
        Ok(match guests {
            Guests::None => base.kernel(hypervisor()?),
            Guests::Image(image) => base.kernel(image),
            Guests::Default => xtask::test_guests(base, dir)?,
            Guests::Description { dts, loads } => {
                let mut qemu = base.kernel(hypervisor()?);
                qemu.loads = loads;
                xtask::write_host_dtb(&mut qemu, &[], &[dts], dir)?;
                qemu
            }
            Guests::Kernel(guest) => xtask::kernel_guest(base, &guest, dir)?,
        })
    }
}

/// Runs `scripts/fetch-linux` (downloads once, then only checks).
fn fetch_linux() -> Result<(), String> {
    let start = Instant::now();
    let status = Command::new(root().join("scripts/fetch-linux"))
        .status()
        .map_err(|e| format!("cannot run scripts/fetch-linux: {e}"))?;
    if !status.success() {
        return Err("scripts/fetch-linux failed".into());
    }
    eprintln!(
        "xtask: Debian kernel and initramfs ready ({:.1} s)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The directory of one run's files: `--run-dir`, kept; by default `out/run/<pid>`, so
/// that runs side by side (the tests) never share a host DTB, removed when the run ends.
struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl RunDir {
    fn new(args: &RunArgs) -> Self {
        match &args.run_dir {
            Some(dir) => Self {
                path: dir.clone(),
                keep: true,
            },
            None => Self {
                path: artifacts::out_dir()
                    .join("run")
                    .join(std::process::id().to_string()),
                keep: false,
            },
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn run(args: &RunArgs) -> Result<ExitCode, String> {
    let dir = RunDir::new(args);
    let qemu = args.prepare(Console::Interactive, &dir)?;
    eprintln!("xtask: {qemu}");
    let status = qemu
        .command()
        .status()
        .map_err(|e| format!("cannot run QEMU ({e}): run scripts/setup"))?;
    Ok(exit_code(status.code()))
}

fn debug(args: &RunArgs) -> Result<ExitCode, String> {
    let serial = artifacts::out_dir().join("debug-serial.log");
    let dir = RunDir::new(args);
    let mut qemu = args.prepare(Console::File(serial.clone()), &dir)?;
    qemu.gdb = true;
    let elf = match &args.image {
        Some(image) => image.with_extension("elf"),
        None => Artifact::Hypervisor.elf(),
    };
    let status = Command::new(root().join("scripts/setup"))
        .arg("gdb-multiarch")
        .status()
        .map_err(|e| format!("cannot run scripts/setup: {e}"))?;
    if !status.success() {
        return Err("scripts/setup gdb-multiarch failed".into());
    }
    let mut child = qemu
        .command()
        .spawn()
        .map_err(|e| format!("cannot run QEMU ({e}): run scripts/setup"))?;
    eprintln!(
        "xtask: QEMU (pid {}) halted with a gdb server on :1234; serial in {}",
        child.id(),
        serial.display()
    );
    let status = Command::new("gdb-multiarch")
        .arg("-q")
        .arg(&elf)
        .args(["-ex", "target remote localhost:1234"])
        .args(["-ex", "break twostage_primary_main"])
        .args(["-ex", "break twostage_el2_exception"])
        .status();
    let _ = child.kill();
    let _ = child.wait();
    status.map_err(|e| format!("cannot run gdb-multiarch: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// QEMU's exit status as ours (a signal counts as failure).
fn exit_code(code: Option<i32>) -> ExitCode {
    code.and_then(|c| u8::try_from(c).ok())
        .map_or(ExitCode::FAILURE, ExitCode::from)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Cmd::Build { test_variants } => {
            let mut all = vec![Artifact::Hypervisor, Artifact::TestGuest];
            if *test_variants {
                all.extend(TEST_VARIANTS.map(Artifact::Variant));
            }
            artifacts::build(&all).map(|()| ExitCode::SUCCESS)
        }
        Cmd::Run(args) => run(args),
        Cmd::Debug(args) => debug(args),
        Cmd::Test(args) => test::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Fuzz(args) => fuzz::run(args),
        Cmd::FetchLinux => fetch_linux().map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("xtask: {e}");
        ExitCode::from(2)
    })
}
