//! What the hypervisor learns from the device tree QEMU hands it in `x0`: RAM, CPUs,
//! the PL011 console, the GIC, the PSCI firmware interface and QEMU's fw-cfg device.
//!
//! Parsing uses the `fdt` crate and needs no heap (it runs before the heap exists), so
//! every list has a fixed capacity. The device tree comes from the platform firmware
//! (QEMU), not from a guest.

use core::fmt;

use super::dtb::HostDt;
use crate::mem::{PhysAddr, PhysRange};

use fdt::node::FdtNode;
use fdt::Fdt;

/// Most RAM regions recorded.
pub const MAX_MEMORY_REGIONS: usize = 8;

/// Most CPUs recorded (one EL2 stack each in the boot crate).
pub const MAX_CPUS: usize = boot::MAX_CPUS;

/// How PSCI calls reach the firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciConduit {
    /// `SMC #0` (QEMU `virt` with `virtualization=on`).
    Smc,
    /// `HVC #0`.
    Hvc,
}

/// The PSCI node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Psci {
    /// The conduit (`method` property).
    pub conduit: PsciConduit,
    /// Whether the firmware implements PSCI 0.2 or later (standard function IDs,
    /// SYSTEM_OFF); 0.1-only firmware has just the IDs in the node.
    pub v0_2_or_later: bool,
}

/// The interrupt controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gic {
    /// 2 or 3.
    pub version: u8,
    /// GICD.
    pub distributor: PhysRange,
    /// GICv3: the (first) redistributor region; GICv2: the CPU interface.
    pub second: PhysRange,
}

/// Everything the hypervisor needs from the device tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hardware {
    /// Where the device tree itself lies (`totalsize` bytes from the header).
    pub dtb: PhysRange,
    memory: [PhysRange; MAX_MEMORY_REGIONS],
    memory_count: usize,
    cpus: [u64; MAX_CPUS],
    cpu_count: usize,
    /// CPUs present in the tree beyond [`MAX_CPUS`] (not brought up).
    pub cpus_ignored: usize,
    /// The PL011 console (the `/chosen` `stdout-path` node if it is a PL011, otherwise
    /// the first `arm,pl011` node).
    pub uart: Option<PhysRange>,
    /// The console PL011's interrupt (INTID of its first GIC SPI in `interrupts`), for
    /// console input.
    pub uart_intid: Option<u32>,
    /// The GIC.
    pub gic: Option<Gic>,
    /// PSCI.
    pub psci: Option<Psci>,
    /// QEMU's firmware configuration device (`qemu,fw-cfg-mmio`), a source of guest
    /// images (`super::fw_cfg`).
    pub fw_cfg: Option<FwCfgDevice>,
}

/// QEMU's firmware configuration device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwCfgDevice {
    /// Its registers.
    pub regs: PhysRange,
    /// Whether the node says `dma-coherent` (QEMU's always does): its transfers need no
    /// cache maintenance.
    pub dma_coherent: bool,
}

/// Why the device tree could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardwareError {
    /// The blob is not a valid flattened device tree (bad magic, truncated, ...).
    BadHeader,
    /// No `device_type = "memory"` node with a usable `reg`.
    NoMemory,
    /// More RAM regions than [`MAX_MEMORY_REGIONS`].
    TooManyMemoryRegions,
    /// No `/cpus/cpu@*` node.
    NoCpus,
    /// A CPU node's `reg` is missing or not 1 or 2 cells.
    BadCpuReg,
    /// A device node's `reg` is missing or malformed.
    BadReg(&'static str),
}

impl core::error::Error for HardwareError {}

impl fmt::Display for HardwareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadHeader => f.write_str("not a valid flattened device tree"),
            Self::NoMemory => f.write_str("no memory node"),
            Self::TooManyMemoryRegions => {
                write!(f, "more than {MAX_MEMORY_REGIONS} memory regions")
            }
            Self::NoCpus => f.write_str("no CPU nodes under /cpus"),
            Self::BadCpuReg => f.write_str("a CPU node has a malformed reg"),
            Self::BadReg(node) => write!(f, "node {node} has a malformed reg"),
        }
    }
}

impl Hardware {
    /// Reads the hardware from the host device tree.
    ///
    /// # Errors
    ///
    /// [`HardwareError`] when the tree lacks RAM or CPUs or has a malformed `reg`. A
    /// missing UART, GIC or PSCI node is not an error here (the fields are `None`).
    pub fn parse(dt: &HostDt<'_>) -> Result<Self, HardwareError> {
        let fdt = dt.fdt();
        let mut platform = Hardware {
            dtb: dt.range(),
            memory: [PhysRange::default(); MAX_MEMORY_REGIONS],
            memory_count: 0,
            cpus: [0; MAX_CPUS],
            cpu_count: 0,
            cpus_ignored: 0,
            uart: None,
            uart_intid: None,
            gic: None,
            psci: None,
            fw_cfg: None,
        };
        platform.parse_memory(fdt)?;
        platform.parse_cpus(fdt)?;
        (platform.uart, platform.uart_intid) = match find_uart(fdt)? {
            Some((range, intid)) => (Some(range), intid),
            None => (None, None),
        };
        platform.gic = find_gic(fdt)?;
        platform.psci = find_psci(fdt);
        platform.fw_cfg = find_fw_cfg(fdt);
        Ok(platform)
    }

    /// The RAM regions, in device-tree order.
    #[must_use]
    pub fn memory(&self) -> &[PhysRange] {
        self.memory.get(..self.memory_count).unwrap_or_default()
    }

    /// The MPIDR affinity value (the `reg` of each `/cpus/cpu@*` node) of every CPU, in
    /// device-tree order.
    #[must_use]
    pub fn cpus(&self) -> &[u64] {
        self.cpus.get(..self.cpu_count).unwrap_or_default()
    }

    /// The RAM region containing `region`, if any.
    #[must_use]
    pub fn ram_containing(&self, region: &PhysRange) -> Option<PhysRange> {
        self.memory().iter().copied().find(|r| r.contains(region))
    }

    fn parse_memory(&mut self, fdt: &Fdt<'_>) -> Result<(), HardwareError> {
        for node in fdt.all_nodes() {
            let is_memory = node
                .property("device_type")
                .and_then(|p| p.as_str())
                .is_some_and(|t| t == "memory");
            if !is_memory {
                continue;
            }
            let Some(regs) = node.reg() else { continue };
            for reg in regs {
                let size = reg.size.unwrap_or(0) as u64;
                if size == 0 {
                    continue;
                }
                let slot = self
                    .memory
                    .get_mut(self.memory_count)
                    .ok_or(HardwareError::TooManyMemoryRegions)?;
                *slot = PhysRange::new(PhysAddr::new(reg.starting_address as u64), size);
                self.memory_count = self.memory_count.saturating_add(1);
            }
        }
        if self.memory_count == 0 {
            return Err(HardwareError::NoMemory);
        }
        Ok(())
    }

    fn parse_cpus(&mut self, fdt: &Fdt<'_>) -> Result<(), HardwareError> {
        let Some(cpus) = find_path(fdt, "/cpus") else {
            return Err(HardwareError::NoCpus);
        };
        for node in cpus.children() {
            let is_cpu = node
                .property("device_type")
                .and_then(|p| p.as_str())
                .is_some_and(|t| t == "cpu");
            if !is_cpu {
                continue;
            }
            let reg = node.property("reg").ok_or(HardwareError::BadCpuReg)?;
            let mpidr = match reg.value.len() {
                4 => u64::from(u32::from_be_bytes(
                    reg.value.try_into().map_err(|_| HardwareError::BadCpuReg)?,
                )),
                8 => {
                    u64::from_be_bytes(reg.value.try_into().map_err(|_| HardwareError::BadCpuReg)?)
                }
                _ => return Err(HardwareError::BadCpuReg),
            };
            match self.cpus.get_mut(self.cpu_count) {
                Some(slot) => {
                    *slot = mpidr;
                    self.cpu_count = self.cpu_count.saturating_add(1);
                }
                None => self.cpus_ignored = self.cpus_ignored.saturating_add(1),
            }
        }
        if self.cpu_count == 0 {
            return Err(HardwareError::NoCpus);
        }
        Ok(())
    }
}

/// The node at an absolute path such as `/cpus` or `/pl011@9000000` (a component without
/// a unit address matches the first node of that name).
///
/// The path is walked child by child from the root: `fdt` 0.1.5's own `find_node` misses
/// nodes in some valid trees (QEMU's tree with a `/chosen` subnode added before `/cpus`).
pub fn find_path<'b, 'a>(fdt: &'b Fdt<'a>, path: &str) -> Option<FdtNode<'b, 'a>> {
    let mut node = fdt.all_nodes().next()?;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        node = node.children().find(|c| {
            c.name == part || (!part.contains('@') && c.name.split('@').next() == Some(part))
        })?;
    }
    Some(node)
}

/// The first `reg` entry of a node.
fn first_reg(node: FdtNode<'_, '_>, name: &'static str) -> Result<PhysRange, HardwareError> {
    let reg = node
        .reg()
        .and_then(|mut r| r.next())
        .ok_or(HardwareError::BadReg(name))?;
    let size = reg.size.ok_or(HardwareError::BadReg(name))? as u64;
    Ok(PhysRange::new(
        PhysAddr::new(reg.starting_address as u64),
        size,
    ))
}

fn is_compatible(node: FdtNode<'_, '_>, compatible: &str) -> bool {
    node.compatible()
        .is_some_and(|c| c.all().any(|s| s == compatible))
}

/// The INTID of the first SPI in `node`'s `interrupts` (GIC three-cell specifiers).
fn first_spi(node: FdtNode<'_, '_>) -> Option<u32> {
    let v = node.property("interrupts")?.value;
    let cell = |i: usize| {
        v.get(i..i.checked_add(4)?)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    match (cell(0)?, cell(4)?) {
        (0, n) => n.checked_add(32).filter(|&i| i <= 1019),
        _ => None,
    }
}

fn find_uart(fdt: &Fdt<'_>) -> Result<Option<(PhysRange, Option<u32>)>, HardwareError> {
    let stdout = find_path(fdt, "/chosen")
        .and_then(|c| c.property("stdout-path"))
        .and_then(|p| p.as_str())
        .map(|path| path.split(':').next().unwrap_or(path))
        .and_then(|path| find_path(fdt, path))
        .filter(|node| is_compatible(*node, "arm,pl011"));
    match stdout.or_else(|| fdt.find_compatible(&["arm,pl011"])) {
        Some(node) => Ok(Some((first_reg(node, "pl011")?, first_spi(node)))),
        None => Ok(None),
    }
}

fn find_gic(fdt: &Fdt<'_>) -> Result<Option<Gic>, HardwareError> {
    let Some(node) = fdt.find_compatible(&["arm,gic-v3", "arm,cortex-a15-gic", "arm,gic-400"])
    else {
        return Ok(None);
    };
    let version = if is_compatible(node, "arm,gic-v3") {
        3
    } else {
        2
    };
    let mut regs = node.reg().ok_or(HardwareError::BadReg("gic"))?;
    let mut next = || -> Result<PhysRange, HardwareError> {
        let r = regs.next().ok_or(HardwareError::BadReg("gic"))?;
        Ok(PhysRange::new(
            PhysAddr::new(r.starting_address as u64),
            r.size.ok_or(HardwareError::BadReg("gic"))? as u64,
        ))
    };
    let distributor = next()?;
    let second = next()?;
    Ok(Some(Gic {
        version,
        distributor,
        second,
    }))
}

/// The first fw-cfg node, if its registers are usable: a block of at least
/// [`super::fw_cfg::REGISTERS_LEN`] bytes at an 8-byte aligned address. The device is
/// optional: a node without them is no device (and still never given to a VM,
/// `super::devices::fw_cfg_regions`).
fn find_fw_cfg(fdt: &Fdt<'_>) -> Option<FwCfgDevice> {
    let node = fdt.find_compatible(&[super::devices::FW_CFG_COMPATIBLE])?;
    let regs = first_reg(node, "fw-cfg")
        .ok()
        .filter(|r| r.size >= super::fw_cfg::REGISTERS_LEN && r.base.is_aligned(8))?;
    Some(FwCfgDevice {
        regs,
        dma_coherent: node.property("dma-coherent").is_some(),
    })
}

fn find_psci(fdt: &Fdt<'_>) -> Option<Psci> {
    let node = fdt.find_compatible(&["arm,psci-1.0", "arm,psci-0.2", "arm,psci"])?;
    let conduit = match node.property("method").and_then(|p| p.as_str()) {
        Some("smc") => PsciConduit::Smc,
        Some("hvc") => PsciConduit::Hvc,
        _ => return None,
    };
    let v0_2_or_later = is_compatible(node, "arm,psci-0.2") || is_compatible(node, "arm,psci-1.0");
    Some(Psci {
        conduit,
        v0_2_or_later,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Reads a blob as the machine does (checked and parsed once, then the hardware);
    /// a blob that is not a device tree is a bad header.
    pub(crate) fn parse_blob(blob: &[u8]) -> Result<Hardware, HardwareError> {
        let blob = Box::leak(blob.to_vec().into_boxed_slice());
        let dt = HostDt::new(blob).map_err(|_| HardwareError::BadHeader)?;
        Hardware::parse(&dt)
    }

    // Dumped from QEMU 7.2 with `-machine virt,virtualization=on,gic-version=3,dumpdtb=...`
    // and packed with `dtc -I dtb -O dtb`.
    const SMP4: &[u8] = include_bytes!("../../tests/fixtures/virt-gicv3-a57-smp4-2g.dtb");
    const SMP1: &[u8] = include_bytes!("../../tests/fixtures/virt-gicv3-max-smp1-512m.dtb");

    fn parse(blob: &[u8]) -> Hardware {
        match parse_blob(blob) {
            Ok(p) => p,
            Err(e) => panic!("fixture does not parse: {e}"),
        }
    }

    #[test]
    fn qemu_virt_four_cpus() {
        let p = parse(SMP4);
        assert_eq!(
            p.memory(),
            &[PhysRange::new(PhysAddr::new(0x4000_0000), 2 << 30)]
        );
        assert_eq!(p.cpus(), &[0, 1, 2, 3]);
        assert_eq!(p.cpus_ignored, 0);
        assert_eq!(
            p.uart,
            Some(PhysRange::new(PhysAddr::new(0x0900_0000), 0x1000))
        );
        assert_eq!(p.uart_intid, Some(33), "QEMU virt's PL011 is SPI 1");
        assert_eq!(
            p.gic,
            Some(Gic {
                version: 3,
                distributor: PhysRange::new(PhysAddr::new(0x0800_0000), 0x1_0000),
                second: PhysRange::new(PhysAddr::new(0x080a_0000), 0xf6_0000),
            })
        );
        assert_eq!(
            p.psci,
            Some(Psci {
                conduit: PsciConduit::Smc,
                v0_2_or_later: true
            })
        );
        assert_eq!(
            p.fw_cfg,
            Some(FwCfgDevice {
                regs: PhysRange::new(PhysAddr::new(0x0902_0000), 0x18),
                dma_coherent: true
            })
        );
        assert_eq!(p.dtb.size, SMP4.len() as u64);
    }

    #[test]
    fn vm_descriptions_in_chosen_do_not_hide_the_cpus() {
        // QEMU's tree after the scripts added a VM description under /chosen (as it is
        // booted by the VM tests); `fdt`'s own path lookup does not find /cpus in it.
        let blob = include_bytes!("../../tests/fixtures/virt-gicv3-with-vm-in-chosen.dtb");
        let p = parse(blob);
        assert_eq!(p.cpus(), &[0]);
        assert_eq!(
            p.memory(),
            &[PhysRange::new(PhysAddr::new(0x4000_0000), 2 << 30)]
        );
        assert_eq!(
            p.uart,
            Some(PhysRange::new(PhysAddr::new(0x0900_0000), 0x1000))
        );
    }

    #[test]
    fn qemu_virt_one_cpu_less_ram() {
        let p = parse(SMP1);
        assert_eq!(
            p.memory(),
            &[PhysRange::new(PhysAddr::new(0x4000_0000), 512 << 20)]
        );
        assert_eq!(p.cpus(), &[0]);
    }

    #[test]
    fn ram_containing() {
        let p = parse(SMP4);
        let inside = PhysRange::new(PhysAddr::new(0x4020_0000), 0x10_0000);
        assert_eq!(
            p.ram_containing(&inside),
            Some(PhysRange::new(PhysAddr::new(0x4000_0000), 2 << 30))
        );
        assert_eq!(
            p.ram_containing(&PhysRange::new(PhysAddr::new(0x3fff_f000), 0x2000)),
            None
        );
        assert_eq!(
            p.ram_containing(&PhysRange::new(PhysAddr::new(0xc000_0000), 0x1000)),
            None
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_blob(&[0u8; 64]), Err(HardwareError::BadHeader));
        assert_eq!(parse_blob(&SMP4[..20]), Err(HardwareError::BadHeader));
        let mut bad_magic = SMP4.to_vec();
        bad_magic[0] ^= 0xff;
        assert_eq!(parse_blob(&bad_magic), Err(HardwareError::BadHeader));
    }

    /// A small device tree in the shape of QEMU's, with knobs for the cases QEMU's own
    /// trees do not exercise.
    struct Tree {
        cpus: usize,
        cpu_reg_cells: u32,
        memory: Vec<(u64, u64)>,
        psci_method: Option<&'static str>,
        psci_compatible: &'static [&'static str],
        uarts: &'static [u64],
        stdout: Option<&'static str>,
        /// A fw-cfg node's `reg` (`None`: no `reg`) and whether it says `dma-coherent`.
        fw_cfg: Option<(Option<(u64, u64)>, bool)>,
    }

    impl Default for Tree {
        fn default() -> Self {
            Self {
                cpus: 2,
                cpu_reg_cells: 1,
                memory: vec![(0x4000_0000, 0x4000_0000)],
                psci_method: Some("smc"),
                psci_compatible: &["arm,psci-1.0", "arm,psci-0.2", "arm,psci"],
                uarts: &[0x0900_0000],
                stdout: None,
                fw_cfg: None,
            }
        }
    }

    impl Tree {
        fn build(&self) -> Vec<u8> {
            use vm_fdt::FdtWriter;
            let mut w = FdtWriter::new().unwrap();
            let root = w.begin_node("").unwrap();
            w.property_u32("#address-cells", 2).unwrap();
            w.property_u32("#size-cells", 2).unwrap();
            if let Some(path) = self.stdout {
                let chosen = w.begin_node("chosen").unwrap();
                w.property_string("stdout-path", path).unwrap();
                w.end_node(chosen).unwrap();
            }
            for (i, (base, size)) in self.memory.iter().enumerate() {
                let m = w
                    .begin_node(&format!("memory@{:x}", base + i as u64))
                    .unwrap();
                w.property_string("device_type", "memory").unwrap();
                w.property_array_u64("reg", &[*base, *size]).unwrap();
                w.end_node(m).unwrap();
            }
            let cpus = w.begin_node("cpus").unwrap();
            w.property_u32("#address-cells", self.cpu_reg_cells)
                .unwrap();
            w.property_u32("#size-cells", 0).unwrap();
            for i in 0..self.cpus {
                // Affinity: four CPUs per cluster (Aff1), as multi-cluster systems number them.
                let mpidr = ((i as u64 / 4) << 8) | (i as u64 % 4);
                let c = w.begin_node(&format!("cpu@{mpidr:x}")).unwrap();
                w.property_string("device_type", "cpu").unwrap();
                match self.cpu_reg_cells {
                    1 => w.property_u32("reg", mpidr as u32).unwrap(),
                    2 => w.property_u64("reg", mpidr).unwrap(),
                    _ => w.property("reg", &[0; 3]).unwrap(),
                }
                w.end_node(c).unwrap();
            }
            w.end_node(cpus).unwrap();
            if let Some(method) = self.psci_method {
                let p = w.begin_node("psci").unwrap();
                let list = self
                    .psci_compatible
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect();
                w.property_string_list("compatible", list).unwrap();
                w.property_string("method", method).unwrap();
                w.end_node(p).unwrap();
            }
            for base in self.uarts {
                let u = w.begin_node(&format!("pl011@{base:x}")).unwrap();
                w.property_string_list(
                    "compatible",
                    vec!["arm,pl011".into(), "arm,primecell".into()],
                )
                .unwrap();
                w.property_array_u64("reg", &[*base, 0x1000]).unwrap();
                w.end_node(u).unwrap();
            }
            if let Some((reg, coherent)) = self.fw_cfg {
                let f = w.begin_node("fw-cfg@9020000").unwrap();
                w.property_string("compatible", "qemu,fw-cfg-mmio").unwrap();
                if let Some((base, size)) = reg {
                    w.property_array_u64("reg", &[base, size]).unwrap();
                }
                if coherent {
                    w.property_null("dma-coherent").unwrap();
                }
                w.end_node(f).unwrap();
            }
            w.end_node(root).unwrap();
            w.finish().unwrap()
        }
    }

    #[test]
    fn more_cpus_than_stacks_are_counted_not_used() {
        let p = parse(
            &Tree {
                cpus: MAX_CPUS + 3,
                ..Tree::default()
            }
            .build(),
        );
        assert_eq!(p.cpus().len(), MAX_CPUS);
        assert_eq!(p.cpus_ignored, 3);
        // MPIDRs keep their affinity fields: CPU 5 is Aff1 = 1, Aff0 = 1.
        assert_eq!(p.cpus()[5], 0x101);
    }

    #[test]
    fn two_cell_cpu_reg_and_bad_cpu_reg() {
        let p = parse(
            &Tree {
                cpu_reg_cells: 2,
                cpus: 5,
                ..Tree::default()
            }
            .build(),
        );
        assert_eq!(p.cpus(), &[0, 1, 2, 3, 0x100]);
        let bad = Tree {
            cpu_reg_cells: 3,
            ..Tree::default()
        }
        .build();
        assert_eq!(parse_blob(&bad), Err(HardwareError::BadCpuReg));
    }

    #[test]
    fn missing_nodes() {
        assert_eq!(
            parse_blob(
                &Tree {
                    cpus: 0,
                    ..Tree::default()
                }
                .build()
            ),
            Err(HardwareError::NoCpus)
        );
        assert_eq!(
            parse_blob(
                &Tree {
                    memory: vec![],
                    ..Tree::default()
                }
                .build()
            ),
            Err(HardwareError::NoMemory)
        );
        // Zero-sized banks do not count as RAM.
        assert_eq!(
            parse_blob(
                &Tree {
                    memory: vec![(0x4000_0000, 0)],
                    ..Tree::default()
                }
                .build()
            ),
            Err(HardwareError::NoMemory)
        );
        let p = parse(
            &Tree {
                psci_method: None,
                uarts: &[],
                ..Tree::default()
            }
            .build(),
        );
        assert_eq!((p.psci, p.uart, p.gic), (None, None, None));
    }

    #[test]
    fn memory_banks() {
        let banks: Vec<_> = (0..MAX_MEMORY_REGIONS as u64)
            .map(|i| (0x4000_0000 + (i << 32), 0x1000_0000))
            .collect();
        let p = parse(
            &Tree {
                memory: banks.clone(),
                ..Tree::default()
            }
            .build(),
        );
        assert_eq!(p.memory().len(), MAX_MEMORY_REGIONS);
        assert_eq!(
            p.memory()[3],
            PhysRange::new(PhysAddr::new(0x3_4000_0000), 0x1000_0000)
        );
        let mut too_many = banks;
        too_many.push((0x10_0000_0000, 0x1000));
        assert_eq!(
            parse_blob(
                &Tree {
                    memory: too_many,
                    ..Tree::default()
                }
                .build()
            ),
            Err(HardwareError::TooManyMemoryRegions)
        );
    }

    #[test]
    fn psci_conduit_and_version() {
        let hvc = parse(
            &Tree {
                psci_method: Some("hvc"),
                ..Tree::default()
            }
            .build(),
        );
        assert_eq!(
            hvc.psci,
            Some(Psci {
                conduit: PsciConduit::Hvc,
                v0_2_or_later: true
            })
        );
        let old = parse(
            &Tree {
                psci_compatible: &["arm,psci"],
                ..Tree::default()
            }
            .build(),
        );
        assert_eq!(
            old.psci,
            Some(Psci {
                conduit: PsciConduit::Smc,
                v0_2_or_later: false
            })
        );
        // An unknown conduit is not usable.
        let odd = parse(
            &Tree {
                psci_method: Some("mailbox"),
                ..Tree::default()
            }
            .build(),
        );
        assert_eq!(odd.psci, None);
    }

    #[test]
    fn console_follows_stdout_path() {
        let uarts = &[0x0900_0000, 0x0904_0000];
        let first = parse(
            &Tree {
                uarts,
                ..Tree::default()
            }
            .build(),
        );
        assert_eq!(
            first.uart,
            Some(PhysRange::new(PhysAddr::new(0x0900_0000), 0x1000))
        );
        let chosen = parse(
            &Tree {
                uarts,
                stdout: Some("/pl011@9040000:115200n8"),
                ..Tree::default()
            }
            .build(),
        );
        assert_eq!(
            chosen.uart,
            Some(PhysRange::new(PhysAddr::new(0x0904_0000), 0x1000))
        );
        // stdout-path naming something that is not a PL011: fall back to the first PL011.
        let other = parse(
            &Tree {
                uarts,
                stdout: Some("/cpus"),
                ..Tree::default()
            }
            .build(),
        );
        assert_eq!(
            other.uart,
            Some(PhysRange::new(PhysAddr::new(0x0900_0000), 0x1000))
        );
    }

    #[test]
    fn truncated_blobs_are_rejected_not_read_past() {
        let blob = Tree::default().build();
        for len in [0, 4, 39, 40, blob.len() / 2, blob.len() - 1] {
            assert_eq!(
                parse_blob(&blob[..len]),
                Err(HardwareError::BadHeader),
                "length {len}"
            );
        }
    }

    #[test]
    fn a_fw_cfg_node_without_usable_registers_is_no_device_and_no_error() {
        let with = |fw_cfg| {
            parse(
                &Tree {
                    fw_cfg: Some(fw_cfg),
                    ..Tree::default()
                }
                .build(),
            )
            .fw_cfg
        };
        assert_eq!(
            with((Some((0x0902_0000, 0x18)), false)),
            Some(FwCfgDevice {
                regs: PhysRange::new(PhysAddr::new(0x0902_0000), 0x18),
                dma_coherent: false
            })
        );
        // Too small for the DMA register, misaligned, or no reg at all: the rest of the
        // tree is read as usual.
        for reg in [
            Some((0x0902_0000, 0x10)),
            Some((0x0902_0004, 0x18)),
            Some((0x0902_0000, 0)),
            None,
        ] {
            assert_eq!(with((reg, true)), None, "{reg:x?}");
        }
        assert_eq!(parse(&Tree::default().build()).fw_cfg, None);
    }
}
