//! Boots the stock Debian arm64 kernel as the hypervisor's guest (docs/linux-guest.md)
//! and checks what its userspace and the hypervisor print.

use std::path::PathBuf;
use std::process::Command;

const GUEST_RAM: u64 = 256 << 20;
const GUEST_RAM_BASE: u64 = 0x5000_0000;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Output of one boot and QEMU's exit status.
struct Boot {
    out: String,
    success: bool,
}

impl Boot {
    /// The value after `TWOSTAGE-<key> ` on the first line that has it.
    fn fact(&self, key: &str) -> Option<&str> {
        let tag = format!("TWOSTAGE-{key} ");
        self.out
            .lines()
            .find_map(|l| l.find(&tag).map(|at| l[at + tag.len()..].trim()))
    }
}

fn boot_linux(cpus: u32, cpu_model: &str, extra: &[&str]) -> Boot {
    let root = root();
    assert!(
        root.join("out/linux/Image").exists(),
        "out/linux/Image is missing: run scripts/fetch-linux (scripts/test does)"
    );
    // scripts/run is what a user runs; --no-build: scripts/test built everything already.
    let out = Command::new("timeout")
        .arg("600")
        .arg(root.join("scripts/run"))
        .args(["--no-build", "--kernel", "out/linux/Image"])
        .args(["--initrd", "out/linux/initramfs.cpio"])
        .args([
            "--cpus",
            &cpus.to_string(),
            "--mem",
            "256M",
            "--cpu",
            cpu_model,
        ])
        .args(extra)
        .current_dir(&root)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("scripts/run starts");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Boot {
        out: text,
        success: out.status.success(),
    }
}

fn check(cpus: u32, cpu_model: &str) -> Boot {
    check_with(cpus, cpu_model, &[])
}

fn check_with(cpus: u32, cpu_model: &str, extra: &[&str]) -> Boot {
    let boot = boot_linux(cpus, cpu_model, extra);
    let log = &boot.out;
    // Each of the guest's console lines comes out of the hypervisor's console with the
    // VM's name in front.
    assert!(
        log.lines()
            .any(|l| l.trim_end().ends_with("[linux] TWOSTAGE-LINUX-UP")),
        "no userspace marker:\n{log}"
    );
    let version = std::fs::read_to_string(root().join("out/linux/VERSION")).unwrap();
    assert_eq!(boot.fact("UNAME"), Some(version.trim()), "{log}");
    assert_eq!(boot.fact("CPUS"), Some(cpus.to_string().as_str()), "{log}");

    // Linux's System RAM is exactly the guest's RAM: nothing of the machine's other memory.
    let ram: Vec<(u64, u64)> = log
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("TWOSTAGE-RAM ")? + "TWOSTAGE-RAM ".len()..];
            let mut it = rest.split_whitespace();
            let s = u64::from_str_radix(it.next()?, 16).ok()?;
            let e = u64::from_str_radix(it.next()?, 16).ok()?;
            Some((s, e))
        })
        .collect();
    assert!(!ram.is_empty(), "no System RAM lines:\n{log}");
    for (s, e) in &ram {
        assert_eq!(
            (*s, *e),
            (GUEST_RAM_BASE, GUEST_RAM_BASE + GUEST_RAM - 1),
            "{log}"
        );
    }
    // MemTotal is the guest RAM less what the kernel keeps for itself: well above half of
    // it, and never more (the machine has more than twice as much).
    let total_kb: u64 = boot
        .fact("MEMTOTAL-KB")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal:\n{log}"));
    assert!(
        total_kb * 1024 <= GUEST_RAM,
        "MemTotal {total_kb} kB:\n{log}"
    );
    assert!(
        total_kb * 1024 > GUEST_RAM / 2,
        "MemTotal {total_kb} kB:\n{log}"
    );

    // The hypervisor: the VM's VMID (never 0) and stage-2 layout are logged, no exit was
    // left unhandled (that stops the VM with a "stopped:" line), and the run ended because
    // the guest powered off (PSCI SYSTEM_OFF), with QEMU exiting 0.
    let created = log
        .lines()
        .find(|l| l.contains("VM linux created:"))
        .unwrap_or_else(|| panic!("no VM creation line:\n{log}"));
    let vmid: u32 = created
        .split("VMID ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VMID in {created}"));
    assert_ne!(vmid, 0, "{created}");
    assert!(created.contains(&format!("{cpus} vCPU(s)")), "{created}");
    let ram_line = format!(
        "VM linux stage 2: IPA [{GUEST_RAM_BASE:#x}, {:#x}) -> PA {GUEST_RAM_BASE:#x}: RAM, \
         normal write-back, RWX, 4 KiB pages",
        GUEST_RAM_BASE + GUEST_RAM
    );
    assert!(log.contains(&ram_line), "no '{ram_line}':\n{log}");
    // Its GIC and console are virtual: emulated, never mapped; nothing is passed through.
    for emulated in [
        "IPA [0x8000000, 0x8010000): virtual GIC distributor, unmapped (emulated)",
        &format!(
            "IPA [0x80a0000, {:#x}): virtual GIC redistributors, unmapped (emulated)",
            0x80a_0000 + 0x2_0000 * u64::from(cpus)
        ),
        "IPA [0x9000000, 0x9001000): virtual UART (emulated), its register page mapped \
         read-only while no input waits",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("VM linux stage 2:") && l.contains(emulated)),
            "no '{emulated}':\n{log}"
        );
    }
    assert!(!log.contains("pass-through"), "{log}");
    assert!(!log.contains(" stopped:"), "{log}");
    assert!(log.contains("VM linux powered off"), "{log}");
    assert!(log.contains("all VMs done: success"), "{log}");
    assert!(boot.success, "QEMU did not exit with success:\n{log}");
    boot
}

#[test]
fn debian_kernel_boots_on_one_cpu() {
    check(1, "cortex-a57");
}

#[test]
fn debian_kernel_boots_on_two_cpus() {
    check(2, "cortex-a57");
}

/// With MTE (FEAT_MTE2 and up) the guest gets allocation tags (`HCR_EL2.ATA`,
/// docs/cpu-state.md): Linux detects MTE, and its first `GCR_EL1` write does not trap.
#[test]
fn debian_kernel_boots_with_mte_on_cpu_max() {
    let boot = check_with(1, "max,sme=off", &["--machine-opt", "mte=on"]);
    assert!(
        boot.out
            .contains("CPU features: detected: Memory Tagging Extension"),
        "{}",
        boot.out
    );
}

/// The newest CPU QEMU has: pointer authentication, SVE (given to the guest at 128-bit
/// vectors), 16-bit VMIDs. SME is off: the hypervisor keeps it trapped (docs/linux-guest.md).
#[test]
fn debian_kernel_boots_on_cpu_max() {
    check(1, "max,sme=off");
}

/// A kernel without the arm64 Image header is a raw binary: placed and entered at RAM start
/// + 0x8_0000, as QEMU's own loader does. This one powers off with PSCI SYSTEM_OFF by HVC.
#[test]
fn raw_binary_kernel_is_placed_like_qemus_loader_does() {
    // mov w0, #0x84000008 (SYSTEM_OFF); hvc #0; b .
    let code: [u32; 4] = [0x5280_0100, 0x72b0_8000, 0xd400_0002, 0x1400_0000];
    let bytes: Vec<u8> = code.iter().flat_map(|i| i.to_le_bytes()).collect();
    let path = std::env::temp_dir().join(format!("twostage-raw-{}.bin", std::process::id()));
    std::fs::write(&path, bytes).expect("temporary kernel file");
    let out = Command::new("timeout")
        .arg("120")
        .arg(root().join("scripts/run"))
        .args(["--no-build", "--kernel"])
        .arg(&path)
        .args(["--mem", "64M"])
        .current_dir(root())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("scripts/run starts");
    let _ = std::fs::remove_file(&path);
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let entry = format!("{:#x}", GUEST_RAM_BASE + 0x8_0000);
    assert!(
        log.contains(&format!("VM linux: vCPU 0 starts at {entry}")),
        "not entered at {entry}:\n{log}"
    );
    assert!(log.contains("VM linux powered off"), "{log}");
    assert!(out.status.success(), "{log}");
}

/// Two Debian kernels side by side through the documented command (docs/linux-guest.md,
/// "Several Linux VMs"): 2 vCPUs and 1 GiB each on a 4-CPU, 4 GiB machine. Each reaches
/// its userspace with its own console, sees only its own CPUs and RAM, and powers off;
/// the first to finish leaves the other running; the run ends with status 0.
#[test]
fn two_debian_kernels_side_by_side() {
    let root = root();
    let out = Command::new("timeout")
        .arg("900")
        .arg(root.join("scripts/run"))
        .args(["--no-build", "--kernel", "out/linux/Image"])
        .args(["--initrd", "out/linux/initramfs.cpio"])
        .args(["--vms-count", "2", "--cpus", "2", "--mem", "1G"])
        .args(["--machine-mem", "4G"])
        .current_dir(&root)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("scripts/run starts");
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let fact = |vm: &str, key: &str| {
        let tag = format!("[{vm}] TWOSTAGE-{key} ");
        log.lines()
            .find_map(|l| l.find(&tag).map(|at| l[at + tag.len()..].trim().to_owned()))
    };
    let mut rams = Vec::new();
    for vm in ["linux0", "linux1"] {
        assert!(
            log.lines()
                .any(|l| l.trim_end().ends_with(&format!("[{vm}] TWOSTAGE-LINUX-UP"))),
            "{vm}: no userspace marker\n{log}"
        );
        assert_eq!(fact(vm, "CPUS").as_deref(), Some("2"), "{vm}\n{log}");
        let ram = fact(vm, "RAM").unwrap_or_else(|| panic!("{vm}: no RAM line\n{log}"));
        let (start, end) = ram.split_once(' ').expect("two numbers");
        let start = u64::from_str_radix(start, 16).expect("hex");
        let end = u64::from_str_radix(end, 16).expect("hex");
        assert_eq!(end - start + 1, 1 << 30, "{vm}: {ram}");
        rams.push((start, end));
        assert!(log.contains(&format!("VM {vm} powered off")), "{log}");
        assert!(
            log.contains(&format!("VM {vm} created: id")) && log.contains("2 vCPU(s)"),
            "{log}"
        );
    }
    assert!(
        rams[0].1 < rams[1].0 || rams[1].1 < rams[0].0,
        "their RAM overlaps: {rams:x?}"
    );
    // Both ran at once: each VM's vCPUs started before the first power-off, and the VM
    // still running then went on to power off by itself.
    let first_off = log
        .lines()
        .position(|l| l.contains(" powered off"))
        .expect("a power-off line");
    for vm in ["linux0", "linux1"] {
        for vcpu in 0..2 {
            let started = log
                .lines()
                .position(|l| l.contains(&format!("VM {vm}: vCPU {vcpu} starts")))
                .unwrap_or_else(|| panic!("{vm} vCPU {vcpu} never started\n{log}"));
            assert!(
                started < first_off,
                "{vm} started after the other ended\n{log}"
            );
        }
    }
    assert!(!log.contains(" stopped:"), "{log}");
    assert!(log.contains("all VMs done: success"), "{log}");
    assert!(
        out.status.success(),
        "QEMU did not exit with success:\n{log}"
    );
}

/// A virtio-mmio block device (QEMU `-device virtio-blk-device`) given to the Linux VM
/// with its interrupt: the initramfs loads Debian's virtio_mmio, virtio_blk and ext4
/// modules, mounts the disk and prints the file on it. The VM's RAM is identity-mapped,
/// as a DMA-capable device requires.
#[test]
fn a_virtio_block_device_is_mounted_by_the_linux_vm() {
    let root = root();
    let dir = std::env::temp_dir().join(format!("twostage-disk-{}", std::process::id()));
    let files = dir.join("root");
    std::fs::create_dir_all(&files).expect("temporary directory");
    let text = format!("disk of test {}", std::process::id());
    std::fs::write(files.join("twostage-disk.txt"), format!("{text}\n")).expect("file");
    let image = dir.join("disk.img");
    let mke2fs = ["/usr/sbin/mke2fs", "/sbin/mke2fs", "mke2fs"]
        .into_iter()
        .find(|p| !p.starts_with('/') || std::path::Path::new(p).exists())
        .expect("mke2fs");
    let made = Command::new(mke2fs)
        .args(["-q", "-t", "ext2", "-b", "1024", "-d"])
        .arg(&files)
        .arg(&image)
        .arg("2048")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("mke2fs runs (e2fsprogs is part of every Debian system)");
    assert!(made.success(), "mke2fs failed");
    let out = Command::new("timeout")
        .arg("600")
        .arg(root.join("scripts/run"))
        .args(["--no-build", "--kernel", "out/linux/Image"])
        .args(["--initrd", "out/linux/initramfs.cpio"])
        .args(["--device", "/virtio_mmio@a003e00", "--"])
        .arg("-drive")
        .arg(format!(
            "if=none,file={},format=raw,id=hd,readonly=on",
            image.display()
        ))
        .args(["-device", "virtio-blk-device,drive=hd"])
        .current_dir(&root)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("scripts/run starts");
    let _ = std::fs::remove_dir_all(&dir);
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!("[linux] TWOSTAGE-DISK {text}")),
        "the disk's file was not read:\n{log}"
    );
    assert!(
        log.contains("VM linux: interrupts of its devices: SPIs [79]"),
        "{log}"
    );
    assert!(
        log.contains("IPA [0xa003000, 0xa004000) -> PA 0xa003000: pass-through"),
        "{log}"
    );
    assert!(!log.contains(" stopped:"), "{log}");
    assert!(log.contains("VM linux powered off"), "{log}");
    assert!(out.status.success(), "{log}");
}

/// A Linux VM booted with the busybox shell initramfs, driven through the console.
struct Shell {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    log: String,
}

impl Shell {
    fn start() -> Self {
        use std::io::{BufRead, BufReader};
        let root = root();
        let mut child = Command::new("timeout")
            .arg("600")
            .arg(root.join("scripts/run"))
            .args(["--no-build", "--kernel", "out/linux/Image"])
            .args(["--initrd", "out/linux/initramfs-shell.cpio"])
            .current_dir(&root)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("scripts/run starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take().expect("stdin");
        Self {
            child,
            stdin,
            lines,
            log: String::new(),
        }
    }

    /// Reads lines until one contains `needle` (true), or `secs` pass or the output ends.
    fn wait_for(&mut self, needle: &str, secs: u64) -> bool {
        use std::sync::mpsc::RecvTimeoutError;
        use std::time::{Duration, Instant};
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                    if line.contains(needle) {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        false
    }

    fn type_line(&mut self, line: &str) {
        use std::io::Write;
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to QEMU");
        self.stdin.flush().expect("flush");
    }

    /// Waits for the shell, then types a command until the shell runs it (input typed
    /// before the driver opened the console may be dropped, as on a real UART).
    fn wait_for_shell(&mut self) {
        assert!(
            self.wait_for("TWOSTAGE: busybox shell", 300),
            "no shell:\n{}",
            self.log
        );
        for _ in 0..20 {
            self.type_line("echo TWOSTAGE-INPUT-$((6*7))");
            if self.wait_for("[linux] TWOSTAGE-INPUT-42", 10) {
                return;
            }
        }
        panic!("the shell never ran the command:\n{}", self.log);
    }

    /// Powers the guest off and checks that the run ends with success.
    fn power_off(mut self) -> String {
        self.type_line("poweroff -f");
        assert!(self.wait_for("all VMs done: success", 120), "{}", self.log);
        let status = self.child.wait().expect("QEMU ends");
        assert!(status.success(), "{}", self.log);
        self.log
    }
}

/// What is typed on the hypervisor's console reaches the Linux VM's shell (the VM's
/// description has `console-input`): the shell initramfs runs a command given on QEMU's
/// standard input, and powers off when told to.
#[test]
fn console_input_reaches_the_linux_shell() {
    let mut shell = Shell::start();
    shell.wait_for_shell();
    let log = shell.power_off();
    assert!(log.contains("console input goes to VM linux"), "{log}");
}

/// `reboot -f` in the guest: PSCI SYSTEM_RESET, and the hypervisor resets the VM, which
/// fetches the kernel and initramfs from QEMU's fw-cfg device again (the first boot
/// wrote over the kernel's data in RAM); the same kernel boots to its shell a second time.
#[test]
fn a_linux_vm_that_reboots_boots_again_from_fresh_images() {
    let mut shell = Shell::start();
    shell.wait_for_shell();
    shell.type_line("reboot -f");
    assert!(shell.wait_for("VM linux reset", 120), "{}", shell.log);
    assert!(
        shell.wait_for("[linux] TWOSTAGE-LINUX-UP", 300),
        "no second boot:\n{}",
        shell.log
    );
    shell.wait_for_shell();
    let log = shell.power_off();
    assert_eq!(
        log.matches("] Booting Linux on physical CPU").count(),
        2,
        "{log}"
    );
    assert!(log.contains("fw-cfg: at 0x9020000"), "{log}");
    assert!(!log.contains(" stopped:"), "{log}");
}
