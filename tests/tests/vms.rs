//! QEMU tests of the VM manager: test-guest VMs described in the host DTB
//! (`docs/vms.md`), each printing PASS/FAIL lines through its virtual UART.
//!
//! They need `out/hypervisor.bin` and `out/test-guest.bin` (`scripts/build`, which
//! `scripts/test` runs first).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MACHINE: &[&str] = &[
    "-M",
    "virt,virtualization=on,gic-version=3",
    "-cpu",
    "cortex-a57",
    "-smp",
    "4",
    "-m",
    "2G",
];
/// Where QEMU stages the test guest (inside the staging range of docs/memory-map.md).
const STAGED_AT: u64 = 0x7000_0000;
const TIMEOUT: Duration = Duration::from_secs(120);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Guest {
    node: &'static str,
    name: &'static str,
    cpus: &'static [u32],
    ram_pa: u64,
    arg: u64,
    abort: &'static str,
}

fn fragment(guests: &[Guest], image_size: u64) -> String {
    let hi = |v: u64| v >> 32;
    let lo = |v: u64| v & 0xffff_ffff;
    let mut s = String::from("/ {\n    chosen {\n");
    for g in guests {
        let cpus: Vec<String> = g.cpus.iter().map(|c| format!("{c:#x}")).collect();
        s += &format!(
            "        {node} {{
            compatible = \"twostage,vm\";
            vm-name = \"{name}\";
            cpus = <{cpus}>;
            memory = <0x0 0x40000000  {:#x} {:#x}  0x0 0x200000>;
            kernel = <{:#x} {:#x}  0x0 {image_size:#x}>;
            kernel-ipa = <0x0 0x40000000>;
            vuart = <0x0 0x09000000>;
            arg = <{:#x} {:#x}>;
            abort-policy = \"{abort}\";
        }};\n",
            hi(g.ram_pa),
            lo(g.ram_pa),
            hi(STAGED_AT),
            lo(STAGED_AT),
            hi(g.arg),
            lo(g.arg),
            node = g.node,
            name = g.name,
            cpus = cpus.join(" "),
            abort = g.abort,
        );
    }
    s + "    };\n};\n"
}

struct Run {
    status: Option<i32>,
    output: String,
}

impl Run {
    fn lines_of(&self, vm: &str) -> Vec<&str> {
        let tag = format!("[{vm}] ");
        self.output
            .lines()
            .filter_map(|l| l.find(&tag).map(|i| &l[i + tag.len()..]))
            .collect()
    }

    fn position(&self, needle: &str) -> Option<usize> {
        self.output.find(needle)
    }

    /// The VMID the guest reported in its `vm-info` line.
    fn vmid_of(&self, vm: &str) -> Option<u64> {
        let line = self
            .lines_of(vm)
            .into_iter()
            .find(|l| l.starts_with("vm-info "))?;
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("vmid="))?;
        v.parse().ok()
    }

    fn assert_passed(&self, vm: &str, at_least: usize) {
        let lines = self.lines_of(vm);
        let fails: Vec<_> = lines.iter().filter(|l| l.starts_with("FAIL")).collect();
        assert!(
            fails.is_empty(),
            "{vm} failed checks: {fails:?}\n{}",
            self.output
        );
        let passes = lines.iter().filter(|l| l.starts_with("PASS")).count();
        assert!(
            passes >= at_least,
            "{vm}: only {passes} PASS lines\n{}",
            self.output
        );
        assert!(
            lines
                .iter()
                .any(|l| *l == format!("DONE pass={passes} fail=0")),
            "{vm}: no matching DONE line\n{}",
            self.output
        );
    }
}

fn run(test: &str, guests: &[Guest]) -> Run {
    let root = root();
    let out = root.join("out");
    let image = out.join("test-guest.bin");
    let hv = out.join("hypervisor.bin");
    assert!(
        image.exists() && hv.exists(),
        "build the images first (scripts/build)"
    );
    let size = std::fs::metadata(&image)
        .expect("guest image")
        .len()
        .div_ceil(4096)
        * 4096;
    let dir = out.join("tests").join(test);
    std::fs::create_dir_all(&dir).expect("test dir");
    let frag = dir.join("vms.dts");
    std::fs::write(&frag, fragment(guests, size)).expect("fragment");
    let dtb = dir.join("host.dtb");
    let st = Command::new(root.join("scripts/mkdtb"))
        .arg(&dtb)
        .arg(&frag)
        .arg("--")
        .args(MACHINE)
        .status()
        .expect("scripts/mkdtb");
    assert!(st.success(), "scripts/mkdtb failed");
    let mut child = Command::new("qemu-system-aarch64")
        .args(MACHINE)
        .args([
            "-nographic",
            "-nic",
            "none",
            "-semihosting-config",
            "enable=on,target=native",
        ])
        .arg("-kernel")
        .arg(&hv)
        .arg("-dtb")
        .arg(&dtb)
        .arg("-device")
        .arg(format!(
            "loader,file={},addr={STAGED_AT:#x},force-raw=on",
            image.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-aarch64");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let output = reader.join().expect("reader") + &err;
    std::fs::write(dir.join("console.log"), &output).expect("log");
    Run { status, output }
}

#[test]
fn two_vms_on_two_cpus_pass_with_distinct_vmids() {
    let r = run(
        "two-vms",
        &[
            Guest {
                node: "vm-a",
                name: "alpha",
                cpus: &[1],
                ram_pa: 0x5000_0000,
                arg: 0,
                abort: "stop",
            },
            Guest {
                node: "vm-b",
                name: "beta",
                cpus: &[2],
                ram_pa: 0x5020_0000,
                arg: 0,
                abort: "stop",
            },
        ],
    );
    assert_eq!(
        r.status,
        Some(0),
        "run did not end with success\n{}",
        r.output
    );
    r.assert_passed("alpha", 8);
    r.assert_passed("beta", 8);
    let (a, b) = (r.vmid_of("alpha"), r.vmid_of("beta"));
    assert!(
        a.is_some() && b.is_some() && a != b,
        "VMIDs {a:?} {b:?}\n{}",
        r.output
    );
    assert!(r.output.contains("all VMs done: success"), "{}", r.output);
    // Both ran at once: each VM's vCPU ran on its own CPU.
    assert!(
        r.output.contains("cpu1] VM alpha: vCPU 0 starts"),
        "{}",
        r.output
    );
    assert!(
        r.output.contains("cpu2] VM beta: vCPU 0 starts"),
        "{}",
        r.output
    );
}

#[test]
fn unmapped_ipa_stops_or_aborts_only_that_vm() {
    let r = run(
        "unmapped-ipa",
        &[
            // Reads the unmapped IPA: stopped by the hypervisor.
            Guest {
                node: "vm-a",
                name: "alpha",
                cpus: &[1],
                ram_pa: 0x5000_0000,
                arg: 1,
                abort: "stop",
            },
            // Reads it too, but gets an injected abort and carries on.
            Guest {
                node: "vm-b",
                name: "beta",
                cpus: &[2],
                ram_pa: 0x5020_0000,
                arg: 1,
                abort: "inject",
            },
            // Does not touch it and runs on for a second after the others.
            Guest {
                node: "vm-c",
                name: "gamma",
                cpus: &[3],
                ram_pa: 0x5040_0000,
                arg: 4,
                abort: "stop",
            },
        ],
    );
    assert_eq!(
        r.status,
        Some(1),
        "a stopped VM must make the run fail\n{}",
        r.output
    );
    let stop = r
        .position("VM alpha stopped: read of unmapped IPA 0x70000000 (ESR 0x")
        .unwrap_or_else(|| panic!("no stop line for alpha\n{}", r.output));
    assert!(
        !r.lines_of("alpha").iter().any(|l| l.starts_with("DONE")),
        "{}",
        r.output
    );
    assert!(r
        .output
        .contains("VM beta: injected abort for read of unmapped IPA 0x70000000"));
    assert!(
        r.lines_of("beta").contains(&"PASS injected-abort"),
        "{}",
        r.output
    );
    r.assert_passed("beta", 9);
    r.assert_passed("gamma", 9);
    let gamma_done = r.position("[gamma] DONE").expect("gamma finished");
    assert!(
        gamma_done > stop,
        "gamma must carry on after alpha stopped\n{}",
        r.output
    );
    assert!(r.output.contains("all VMs done: failure"), "{}", r.output);
}

#[test]
fn second_vcpu_starts_with_psci_cpu_on() {
    let r = run(
        "cpu-on",
        &[Guest {
            node: "vm-a",
            name: "duo",
            cpus: &[1, 2],
            ram_pa: 0x5000_0000,
            arg: 2,
            abort: "stop",
        }],
    );
    assert_eq!(r.status, Some(0), "{}", r.output);
    let lines = r.lines_of("duo");
    for check in [
        "PASS psci-cpu-on",
        "PASS psci-cpu-on-again",
        "PASS second-vcpu-ran",
        "PASS psci-cpu-off",
    ] {
        assert!(lines.contains(&check), "missing {check}\n{}", r.output);
    }
    r.assert_passed("duo", 12);
    assert!(
        r.output.contains("cpu2] VM duo: vCPU 1 starts"),
        "{}",
        r.output
    );
}
