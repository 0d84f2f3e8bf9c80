//! The hypervisor boots at EL2 on QEMU `virt`, builds its own stage 1, brings every CPU
//! online and powers off; its W^X is real; and the start-up checks stop bad boots loudly.

use integration::{artifact, exit_status, Qemu, Run};

fn boot(cpu_model: &str, cpus: usize) -> Run {
    let run = Qemu::new().cpu_model(cpu_model).cpus(cpus).run();
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
        "stage 1: stacks ",
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
    let run = Qemu::new()
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
    let run = Qemu::new()
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

#[test]
fn refuses_to_run_below_el2() {
    let run = Qemu::new().machine("virt,gic-version=3").run();
    run.assert_status(exit_status::NOT_EL2);
    assert!(run.stderr.contains("not entered at EL2"), "{}", run.stderr);
}

#[test]
fn refuses_to_run_away_from_its_link_address() {
    // Load the image 2 MiB higher than linked and start the CPU there directly.
    let image = artifact("hypervisor.bin");
    let loader = format!("loader,file={},addr=0x40400000,cpu-num=0", image.display());
    let run = Qemu::new()
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
        let run = Qemu::new()
            .cpus(2)
            .cpu_model(model)
            .kernel(artifact("hypervisor-selftest-guest-entry.bin"))
            .run();
        run.assert_success();
        run.assert_lines_in_order(&[
            "MMU on",
            "guest entry self-test: HVC and SMC exits, registers, PC, PSTATE and SIMD state: ok",
            "guest entry self-test: 1000 HVC round trips",
            "all 2 CPUs online",
        ]);
    }
}
