//! The hypervisor boots at EL2 on QEMU `virt`, builds its own stage 1, brings every CPU
//! online and powers off; its W^X is real, and so is the absence of guest RAM from its
//! address space; and the start-up checks stop bad boots loudly.

use integration::{artifact, exit_status, Boot, Ram, Run, Staged, VmNode};

fn boot(cpu_model: &str, cpus: u32) -> Run {
    let run = Boot::new().cpu_model(cpu_model).cpus(cpus).run();
    run.assert_success();
    run.assert_lines_in_order(&[
        "twostage hypervisor starting",
        "running at EL2",
        "memory: [0x40000000, 0xc0000000)",
        &format!("cpus: {cpus} found"),
        "uart: pl011 [0x09000000",
        "gic: v3 distributor [0x08000000",
        "psci: conduit Smc",
        "heap: [",
        "page-table frames: [",
        "stage 1: text ",
        "stage 1: rodata ",
        "stage 1: data+bss ",
        "stage 1: stack ",
        "stage 1: uart ",
        "MMU on",
        "cpu0 online",
        &format!("all {cpus} CPUs online"),
        "hypervisor ready",
        "powering off",
    ]);
    // Permissions as logged: text R-X, rodata R--, everything writable without X.
    assert!(run.lines_containing("stage 1: text ")[0].contains(" R-X normal"));
    assert!(run.lines_containing("stage 1: rodata ")[0].contains(" R-- normal"));
    assert!(run.lines_containing("stage 1: uart ")[0].contains(" RW- device-nGnRE"));
    let maps = run.lines_containing("] stage 1: ");
    assert!(maps.iter().all(|l| !l.contains("RWX")), "{maps:?}");
    // Every CPU says it is online, from itself, with its MMU on.
    for cpu in 0..cpus {
        let line = format!("cpu{cpu}] cpu{cpu} online: MPIDR {cpu:#x}, MMU on");
        assert_eq!(
            run.lines_containing(&line).len(),
            1,
            "{line}\n{}",
            run.stdout
        );
    }
    run.assert_no_line("ERROR");
    run
}

#[test]
fn boots_one_cortex_a57() {
    boot("cortex-a57", 1);
}

#[test]
fn boots_four_cortex_a57() {
    boot("cortex-a57", 4);
}

#[test]
fn boots_one_max() {
    boot("max", 1);
}

#[test]
fn boots_four_max() {
    boot("max", 4);
}

/// The address a W^X proof build announces before its deliberate access.
fn announced_address(run: &Run, feature: &str) -> String {
    let line = run.assert_lines_in_order(&[feature])[0];
    let addr = line.rsplit(" at ").next().unwrap_or_default().trim();
    assert!(addr.starts_with("0x"), "{line}");
    format!("{:#018x}", u64::from_str_radix(&addr[2..], 16).unwrap())
}

#[test]
fn writing_own_text_faults() {
    let run = Boot::new()
        .cpus(2)
        .kernel(artifact("hypervisor-fault-write-text.bin"))
        .run();
    run.assert_status(exit_status::EL2_EXCEPTION);
    let target = announced_address(&run, "fault-write-text: writing to the hypervisor text at");
    run.assert_lines_in_order(&[
        "MMU on",
        "fault-write-text",
        "*** unexpected synchronous exception taken from EL2 on cpu0",
        "EC 0x25: data abort at EL2",
        "cause    data abort at EL2 on write: permission fault",
        &format!("FAR_EL2 {target}"),
        " x0  0x",
        " x28 0x",
        "*** stopping the machine (exit status 2)",
    ]);
}

#[test]
fn executing_own_data_faults() {
    let run = Boot::new()
        .cpus(2)
        .cpu_model("max")
        .kernel(artifact("hypervisor-fault-exec-data.bin"))
        .run();
    run.assert_status(exit_status::EL2_EXCEPTION);
    let target = announced_address(&run, "fault-exec-data: jumping to the hypervisor data at");
    run.assert_lines_in_order(&[
        "MMU on",
        "fault-exec-data",
        "*** unexpected synchronous exception taken from EL2 on cpu0",
        "EC 0x21: instruction abort at EL2",
        "cause    instruction abort at EL2: permission fault",
        &format!("ELR_EL2  {target}  FAR_EL2 {target}"),
        "*** stopping the machine (exit status 2)",
    ]);
}

/// Guest RAM is not in the hypervisor's address space: after a VM was created (its RAM
/// scrubbed and its image copied in through the window), reading that RAM at EL2 at its
/// physical address takes a translation fault.
#[test]
fn reading_guest_ram_at_el2_faults() {
    let image = artifact("test-guest.bin");
    let size = std::fs::metadata(&image)
        .expect("guest image")
        .len()
        .div_ceil(4096)
        * 4096;
    let vm = VmNode::new(
        "alpha",
        &[1],
        Ram {
            ipa: 0x4000_0000,
            pa: 0x5020_0000,
            size: 0x20_0000,
        },
        Staged {
            pa: 0x7000_0000,
            size,
            ipa: 0x4000_0000,
        },
    );
    let run = Boot::new()
        .cpus(2)
        .kernel(artifact("hypervisor-fault-read-guest-ram.bin"))
        .load(image, 0x7000_0000)
        .with_vms("fault-read-guest-ram", &[vm], &[])
        .run();
    run.assert_status(exit_status::EL2_EXCEPTION);
    let target = announced_address(&run, "fault-read-guest-ram: reading guest RAM at");
    assert_eq!(target, "0x0000000050200000");
    run.assert_lines_in_order(&[
        "stage 1: guest RAM not mapped: EL2 reaches it through the window at 0x7fc0000000",
        "MMU on",
        "guest RAM pool: [0x480",
        "VM alpha created",
        "fault-read-guest-ram",
        "*** unexpected synchronous exception taken from EL2 on cpu0",
        "EC 0x25: data abort at EL2",
        "cause    data abort at EL2 on read: translation fault",
        &format!("FAR_EL2 {target}"),
        "*** stopping the machine (exit status 2)",
    ]);
    run.assert_no_line("stage 1: ram ");
}

#[test]
fn panic_on_a_secondary_cpu_is_reported() {
    let run = Boot::new()
        .cpus(2)
        .kernel(artifact("hypervisor-fault-panic.bin"))
        .run();
    run.assert_status(exit_status::PANIC);
    let lines = run.assert_lines_in_order(&[
        "cpu1 online",
        "*** panic on cpu1 at hypervisor/src/machine/mod.rs:",
        "*** stopping the machine (exit status 1)",
    ]);
    assert!(
        lines[1].ends_with(": fault-panic: deliberate panic on cpu1"),
        "{}",
        lines[1]
    );
    run.assert_no_line("all 2 CPUs online");
}

#[test]
fn stack_overflow_hits_the_guard_page() {
    let run = Boot::new()
        .cpus(2)
        .kernel(artifact("hypervisor-fault-stack-overflow.bin"))
        .run();
    run.assert_status(exit_status::EL2_EXCEPTION);
    run.assert_lines_in_order(&[
        "fault-stack-overflow: recursing without bound on cpu1",
        "*** unexpected synchronous exception taken from EL2 on cpu1",
        "cause    data abort at EL2 on write: translation fault, level 3",
        "FAR is in the guard page below cpu1's stack: stack overflow",
        "*** stopping the machine (exit status 2)",
    ]);
}

/// A device tree whose CPU nodes do not include the boot CPU (cpu@0 claims MPIDR 8, with
/// eight CPUs: eight others) stops at start-up with a message, not an index panic.
#[test]
fn refuses_a_device_tree_without_the_boot_cpu() {
    let dir = integration::out_dir().join("tests/no-boot-cpu");
    std::fs::create_dir_all(&dir).expect("test directory");
    let fragment = dir.join("cpus.dts");
    std::fs::write(&fragment, "/ { cpus { cpu@0 { reg = <0x8>; }; }; };\n").expect("fragment");
    let run = Boot::new()
        .cpus(8)
        .with_vms("no-boot-cpu", &[], &[&fragment])
        .run();
    run.assert_status(exit_status::STARTUP);
    run.assert_lines_in_order(&["fatal: the boot CPU (MPIDR 0x0) is not among the CPUs"]);
    run.assert_no_line("*** panic");
}

#[test]
fn refuses_to_run_below_el2() {
    let run = Boot::new().without_el2().run();
    run.assert_status(exit_status::NOT_EL2);
    assert!(run.stderr.contains("not entered at EL2"), "{}", run.stderr);
}

#[test]
fn refuses_to_run_away_from_its_link_address() {
    // Load the image 2 MiB higher than linked and start the CPU there directly.
    let image = artifact("hypervisor.bin");
    let loader = format!("loader,file={},addr=0x40400000,cpu-num=0", image.display());
    let run = Boot::new()
        .no_kernel()
        .extra_args(["-device", &loader])
        .run();
    run.assert_status(exit_status::WRONG_LOAD_ADDRESS);
    assert!(
        run.stderr
            .contains("not running at the address it is linked at"),
        "{}",
        run.stderr
    );
}

#[test]
fn guest_entry_and_exit_round_trip() {
    for model in ["cortex-a57", "max"] {
        let run = Boot::new()
            .cpus(2)
            .cpu_model(model)
            .kernel(artifact("hypervisor-selftest-guest-entry.bin"))
            .run();
        run.assert_success();
        run.assert_lines_in_order(&[
            "MMU on",
            "guest entry self-test: HVC and SMC exits, registers, PC, PSTATE and SIMD state: ok",
            "guest entry self-test: 1000 HVC round trips",
            "scrub self-test: DC ZVA and checked zeroing clear exactly their ranges: ok",
            "all 2 CPUs online",
        ]);
    }
}

#[test]
fn image_header_is_an_arm64_image() {
    let image = std::fs::read(artifact("hypervisor.bin")).unwrap();
    let u64_at = |off: usize| u64::from_le_bytes(image[off..off + 8].try_into().unwrap());
    assert_eq!(&image[0x38..0x3c], b"ARM\x64", "magic");
    assert_eq!(u64_at(8), 0x20_0000, "text_offset");
    let image_size = u64_at(16);
    // image_size covers the file and the NOLOAD BSS and stacks after it (8 x 64 KiB).
    assert!(
        image_size >= image.len() as u64 + 8 * 64 * 1024,
        "image_size {image_size:#x}"
    );
    assert_eq!(image_size % 4096, 0);
    assert_eq!(
        u64_at(24),
        0b0010,
        "flags: little endian, 4 KiB pages, base at start of RAM"
    );
    // code0 is a branch (B imm26) over the header.
    let code0 = u32::from_le_bytes(image[0..4].try_into().unwrap());
    assert_eq!(code0 >> 26, 0b000101, "code0 {code0:#x} is not B");
    assert!(
        (code0 & 0x3ff_ffff) * 4 >= 64,
        "branch lands inside the header"
    );
}
