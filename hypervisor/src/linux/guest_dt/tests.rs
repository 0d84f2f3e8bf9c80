// The tests read the trees the hypervisor wrote with the crate's own lookups.
#![allow(clippy::disallowed_methods)]

use super::*;
use crate::config::devices::be_cells;

use crate::config::dtb::qemu_virt;
use crate::mem::Ipa;

const MIB: u64 = 1024 * 1024;
const DEVICES: &[&str] = &["/pl031@9010000", "/timer"];

fn config<'a>(cpus: &'a [u64], devices: &'a [&'a str]) -> GuestDtConfig<'a> {
    GuestDtConfig {
        ram_base: 0x5000_0000,
        ram_size: 256 * MIB,
        cpus,
        bootargs: "console=ttyAMA0 rdinit=/init",
        initrd: Some((0x5f00_0000, 0x5f1c_3000)),
        devices,
        gic: GicIpa::QEMU_VIRT,
        vuart: Some(0x0900_0000),
    }
}

fn top_names(dtb: &[u8]) -> Vec<String> {
    let fdt = Fdt::new(dtb).unwrap();
    let mut names: Vec<String> = fdt
        .find_node("/")
        .unwrap()
        .children()
        .map(|n| String::from(n.name))
        .collect();
    names.sort();
    names
}

fn u64_prop(fdt: &Fdt<'_>, path: &str, name: &str) -> Option<u64> {
    let p = fdt.find_node(path)?.property(name)?;
    read_cells(p.value, p.value.len() / 4)
}

#[test]
fn memory_node_holds_only_the_guest_ram() {
    let dtb = build_guest_dt(&qemu_virt(), &config(&[0], DEVICES)).unwrap();
    let fdt = Fdt::new(&dtb).unwrap();
    let memories: Vec<_> = fdt
        .find_node("/")
        .unwrap()
        .children()
        .filter(|n| base_name(n.name) == "memory")
        .collect();
    assert_eq!(memories.len(), 1);
    assert_eq!(memories[0].name, "memory@50000000");
    let regions: Vec<_> = fdt.memory().regions().collect();
    assert_eq!(regions.len(), 1);
    assert_eq!(regions[0].starting_address as u64, 0x5000_0000);
    assert_eq!(regions[0].size, Some((256 * MIB) as usize));
    assert_eq!(
        fdt.find_node("/memory@50000000")
            .unwrap()
            .property("device_type")
            .and_then(|p| p.as_str()),
        Some("memory")
    );
}

#[test]
fn only_the_named_devices_and_their_dependencies_are_copied() {
    let dtb = build_guest_dt(&qemu_virt(), &config(&[0], DEVICES)).unwrap();
    // apb-pclk comes in as the RTC's clock; the GIC and the virtual PL011 are the
    // VM's own.
    assert_eq!(
        top_names(&dtb),
        [
            "apb-pclk",
            "chosen",
            "cpus",
            "intc@8000000",
            "memory@50000000",
            "pl011@9000000",
            "pl031@9010000",
            "psci",
            "timer",
            "vuart-clk",
        ]
    );
    let fdt = Fdt::new(&dtb).unwrap();
    let root = fdt.find_node("/").unwrap();
    assert_eq!(
        root.property("compatible").and_then(|p| p.as_str()),
        Some("linux,dummy-virt")
    );
    // The host GIC's phandle is the virtual GIC's: the root and the copied nodes'
    // interrupt-parent point at it.
    assert_eq!(
        root.property("interrupt-parent").unwrap().value,
        [0, 0, 0x80, 0x03]
    );
}

#[test]
fn without_devices_the_timer_is_kept() {
    let dtb = build_guest_dt(&qemu_virt(), &config(&[0], &[])).unwrap();
    assert_eq!(
        top_names(&dtb),
        [
            "chosen",
            "cpus",
            "intc@8000000",
            "memory@50000000",
            "pl011@9000000",
            "psci",
            "timer",
            "vuart-clk",
        ]
    );
}

#[test]
fn the_gic_is_the_vms_virtual_one_without_its() {
    let dtb = build_guest_dt(&qemu_virt(), &config(&[1, 0], DEVICES)).unwrap();
    let fdt = Fdt::new(&dtb).unwrap();
    let gic = fdt.find_node("/intc@8000000").unwrap();
    assert_eq!(gic.property("phandle").unwrap().value, [0, 0, 0x80, 0x03]);
    assert_eq!(
        gic.compatible().map(|c| c.all().collect::<Vec<_>>()),
        Some(vec!["arm,gic-v3"])
    );
    assert!(gic.property("interrupt-controller").is_some());
    assert_eq!(gic.children().count(), 0, "no ITS");
    assert!(
        gic.property("interrupts").is_none(),
        "no maintenance interrupt"
    );
    let reg: Vec<u64> = be_cells(gic.property("reg").unwrap().value)
        .collect::<Vec<u32>>()
        .chunks(2)
        .map(|c| (u64::from(c[0]) << 32) | u64::from(c[1]))
        .collect();
    // Distributor 64 KiB, then two vCPUs' redistributors of 128 KiB.
    assert_eq!(reg, [0x0800_0000, 0x1_0000, 0x080a_0000, 0x4_0000]);
    // A GIC elsewhere in the VM's IPA space.
    let mut cfg = config(&[0], DEVICES);
    cfg.gic = GicIpa {
        dist: Ipa::new(0x2000_0000),
        redist: Ipa::new(0x2010_0000),
    };
    let dtb = build_guest_dt(&qemu_virt(), &cfg).unwrap();
    let fdt = Fdt::new(&dtb).unwrap();
    assert!(fdt.find_node("/intc@20000000").is_some());
    assert!(fdt.find_node("/intc@8000000").is_none());
    // Asking for the host's GIC is an error.
    assert_eq!(
        build_guest_dt(&qemu_virt(), &config(&[0], &["/intc@8000000"])),
        Err(GuestDtError::InterruptController(0))
    );
}

#[test]
fn the_console_is_the_virtual_pl011() {
    let dtb = build_guest_dt(&qemu_virt(), &config(&[0], &[])).unwrap();
    let fdt = Fdt::new(&dtb).unwrap();
    let uart = fdt.find_node("/pl011@9000000").unwrap();
    assert!(uart
        .compatible()
        .unwrap()
        .all()
        .any(|c| c == "arm,primecell"));
    let irq: Vec<u32> = be_cells(uart.property("interrupts").unwrap().value).collect();
    assert_eq!(irq, [0, 1, 4], "SPI 1 = INTID 33, level-high");
    let clocks: Vec<u32> = be_cells(uart.property("clocks").unwrap().value).collect();
    let clk = fdt.find_node("/vuart-clk").unwrap();
    let clk_phandle = be_cells(clk.property("phandle").unwrap().value).next();
    assert_eq!(clocks, [clk_phandle.unwrap(); 2]);
    assert!(
        clk_phandle.unwrap() > 0x8003,
        "a phandle the host does not use"
    );
    // Without a virtual UART: no console node and no stdout-path.
    let mut cfg = config(&[0], &[]);
    cfg.vuart = None;
    let dtb = build_guest_dt(&qemu_virt(), &cfg).unwrap();
    assert!(!top_names(&dtb).iter().any(|n| n.starts_with("pl011")));
    let fdt = Fdt::new(&dtb).unwrap();
    assert!(fdt
        .find_node("/chosen")
        .unwrap()
        .property("stdout-path")
        .is_none());
}

#[test]
fn chosen_carries_bootargs_initrd_and_console_only() {
    let dtb = build_guest_dt(&qemu_virt(), &config(&[0], DEVICES)).unwrap();
    let fdt = Fdt::new(&dtb).unwrap();
    assert_eq!(
        fdt.chosen().bootargs(),
        Some("console=ttyAMA0 rdinit=/init")
    );
    assert_eq!(
        u64_prop(&fdt, "/chosen", "linux,initrd-start"),
        Some(0x5f00_0000)
    );
    assert_eq!(
        u64_prop(&fdt, "/chosen", "linux,initrd-end"),
        Some(0x5f1c_3000)
    );
    assert_eq!(fdt.chosen().stdout().map(|n| n.name), Some("pl011@9000000"));
    let chosen = fdt.find_node("/chosen").unwrap();
    // The host's seeds (and anything else in its /chosen) stay with the host.
    assert!(chosen.property("kaslr-seed").is_none());
    assert!(chosen.property("rng-seed").is_none());

    // No console device: no stdout-path pointing at a node the guest lacks.
    let mut cfg = config(&[0], &["/timer"]);
    cfg.initrd = None;
    cfg.vuart = None;
    let dtb = build_guest_dt(&qemu_virt(), &cfg).unwrap();
    let fdt = Fdt::new(&dtb).unwrap();
    let chosen = fdt.find_node("/chosen").unwrap();
    assert!(chosen.property("stdout-path").is_none());
    assert!(chosen.property("linux,initrd-start").is_none());
}

#[test]
fn psci_is_reached_by_hvc() {
    let dtb = build_guest_dt(&qemu_virt(), &config(&[0], DEVICES)).unwrap();
    let fdt = Fdt::new(&dtb).unwrap();
    let psci = fdt.find_node("/psci").unwrap();
    assert_eq!(
        psci.property("method").and_then(|p| p.as_str()),
        Some("hvc")
    );
    assert!(psci
        .compatible()
        .unwrap()
        .all()
        .any(|c| c == "arm,psci-0.2"));
    // The host's SMC function-ID table is not copied.
    assert!(psci.property("cpu_on").is_none());
}

#[test]
fn cpus_are_the_vcpus_with_virtual_mpidrs_started_by_psci() {
    // One vCPU on physical CPU 1: it is cpu@0 with reg 0 (its virtual MPIDR).
    let one = build_guest_dt(&qemu_virt(), &config(&[1], DEVICES)).unwrap();
    let fdt = Fdt::new(&one).unwrap();
    let cpus: Vec<_> = fdt.cpus().map(|c| c.ids().first()).collect();
    assert_eq!(cpus, [0]);
    assert!(fdt.find_node("/cpus/cpu-map").is_none());
    let cpu = fdt.find_node("/cpus/cpu@0").unwrap();
    assert_eq!(
        cpu.property("enable-method").and_then(|p| p.as_str()),
        Some("psci")
    );
    assert_eq!(
        cpu.compatible().and_then(|c| c.all().next()),
        Some("arm,cortex-a57"),
        "the host CPU's other properties"
    );

    let two = build_guest_dt(&qemu_virt(), &config(&[1, 0], DEVICES)).unwrap();
    let fdt = Fdt::new(&two).unwrap();
    let cpus: Vec<_> = fdt.cpus().map(|c| c.ids().first()).collect();
    assert_eq!(cpus, [0, 1]);
    assert_eq!(
        build_guest_dt(&qemu_virt(), &config(&[0, 5], DEVICES)),
        Err(GuestDtError::NoSuchCpu(5))
    );
    assert_eq!(
        build_guest_dt(&qemu_virt(), &config(&[], DEVICES)),
        Err(GuestDtError::NoCpus)
    );
}

#[test]
fn bad_requests_are_errors() {
    for (i, bad) in [
        "/nonexistent",
        "/chosen",
        "/memory@40000000",
        "pl011@9000000",
    ]
    .iter()
    .enumerate()
    {
        let devices = ["/timer", bad];
        assert_eq!(
            build_guest_dt(&qemu_virt(), &config(&[0], &devices)),
            Err(GuestDtError::NoSuchDevice(1)),
            "case {i}"
        );
    }
    let mut cfg = config(&[0], DEVICES);
    cfg.initrd = Some((0x4000_0000, 0x4010_0000));
    assert_eq!(
        build_guest_dt(&qemu_virt(), &cfg),
        Err(GuestDtError::BadInitrd)
    );
    cfg.initrd = Some((0x5100_0000, 0x5100_0000));
    assert_eq!(
        build_guest_dt(&qemu_virt(), &cfg),
        Err(GuestDtError::BadInitrd)
    );
    cfg.initrd = Some((0x5f00_0000, 0x6000_0001));
    assert_eq!(
        build_guest_dt(&qemu_virt(), &cfg),
        Err(GuestDtError::BadInitrd)
    );
    cfg.initrd = None;
    cfg.bootargs = "a\0b";
    assert_eq!(
        build_guest_dt(&qemu_virt(), &cfg),
        Err(GuestDtError::BadBootargs)
    );
}
