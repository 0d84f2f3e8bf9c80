//! The device tree a Linux guest boots with, made from the host's.
//!
//! The guest DT keeps the host's root properties and copies, whole, only the top-level
//! nodes the guest may use (its pass-through devices, named by path, plus the nodes they
//! depend on through `clocks` phandles, and the architected timer, which every CPU
//! has). The host's interrupt controller is never copied: everything about interrupts,
//! memory, CPUs, the console and firmware is written anew:
//!
//! - `/intc@<ipa>`: the VM's virtual GICv3 (`arm,gic-v3`): its distributor and one
//!   redistributor region holding one 128 KiB redistributor per vCPU, at the VM's IPAs;
//!   no ITS and no maintenance interrupt. It takes the phandle of the host's GIC, so the
//!   root's and the copied nodes' `interrupt-parent` point at it;
//! - `/pl011@<ipa>` and its clock `/vuart-clk`: the VM's virtual PL011 (SPI 1, INTID 33)
//!   when it has one, which is then the `stdout-path`;
//! - `/memory@<base>`: the guest's RAM and nothing else, so the hypervisor's memory and
//!   other guests' memory are never described to the guest;
//! - `/chosen`: `bootargs`, `linux,initrd-start`/`-end`, `stdout-path`;
//! - `/psci`: PSCI through HVC, which the hypervisor emulates;
//! - `/cpus`: one `cpu@<i>` node per vCPU with `reg` = *i* (its virtual MPIDR), the other
//!   properties from the host's node of the physical CPU it runs on, and
//!   `enable-method = "psci"`; `cpu-map` is dropped.
//!
//! The host's `/chosen` (and with it the VM descriptions), `/memory`, `/reserved-memory`,
//! `/psci`, the GIC and its ITS never reach a guest.
//! `crate::config::devices::passthrough_regions` gives the MMIO ranges of the same set of
//! devices, for the guest's stage-2 table.

use core::fmt;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use fdt::node::FdtNode;
use fdt::Fdt;

use crate::config::devices::{
    base_name, be_cells, cells, is_interrupt_controller, read_cells, select, DeviceError,
};
use crate::config::{find_path, GicIpa, HostDt};
use vm_fdt::FdtWriter;

/// What the guest's device tree describes.
#[derive(Clone, Copy, Debug)]
pub struct GuestDtConfig<'a> {
    /// Guest-physical start of the guest's RAM.
    pub ram_base: u64,
    /// Bytes of guest RAM.
    pub ram_size: u64,
    /// MPIDR affinity values (the `reg` of the host's `cpu` nodes) of the physical CPUs
    /// the guest's vCPUs run on, in vCPU order; vCPU 0 is the boot CPU.
    pub cpus: &'a [u64],
    /// Where the VM's virtual GIC is.
    pub gic: GicIpa,
    /// IPA of the VM's virtual PL011, if it has one.
    pub vuart: Option<u64>,
    /// Kernel command line.
    pub bootargs: &'a str,
    /// The initrd's guest-physical range `[start, end)`, if there is one.
    pub initrd: Option<(u64, u64)>,
    /// Paths of the host's top-level device nodes passed through, e.g. `/pl011@9000000`.
    pub devices: &'a [&'a str],
}

/// Why the guest's device tree could not be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestDtError {
    /// The host device tree has no root or no `/cpus` node.
    HostDt,
    /// `devices[i]` is not a top-level node of the host DT (or is one the guest never
    /// gets from the host, such as `/chosen`).
    NoSuchDevice(usize),
    /// `devices[i]` is the GIC or its ITS, never given to a guest.
    InterruptController(usize),
    /// No vCPU was given.
    NoCpus,
    /// The host DT has no `cpu` node with this MPIDR.
    NoSuchCpu(u64),
    /// The host root's `#address-cells`/`#size-cells` are not 1 or 2, or a RAM or initrd
    /// address does not fit them.
    Cells,
    /// The initrd range is empty, reversed, or outside the guest's RAM.
    BadInitrd,
    /// The command line holds a NUL byte.
    BadBootargs,
    /// The writer refused the tree (e.g. too large).
    Write,
}

impl core::error::Error for GuestDtError {}

impl fmt::Display for GuestDtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HostDt => f.write_str("the host device tree has no root or no /cpus"),
            Self::NoSuchDevice(i) => write!(f, "device {i} is not a top-level host node"),
            Self::InterruptController(i) => {
                write!(f, "device {i} is the GIC or its ITS: never assigned")
            }
            Self::NoCpus => f.write_str("no vCPU"),
            Self::NoSuchCpu(mpidr) => write!(f, "the host has no CPU with MPIDR {mpidr:#x}"),
            Self::Cells => f.write_str("an address does not fit the host's cell sizes"),
            Self::BadInitrd => f.write_str("the initrd is empty or outside the guest's RAM"),
            Self::BadBootargs => f.write_str("the command line holds a NUL byte"),
            Self::Write => f.write_str("the device tree could not be written"),
        }
    }
}

impl From<DeviceError> for GuestDtError {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::NoRoot => Self::HostDt,
            DeviceError::NoSuchDevice(i) => Self::NoSuchDevice(i),
            DeviceError::InterruptController(i) => Self::InterruptController(i),
            // Only `passthrough_spis` reports these, which the guest DT does not use.
            DeviceError::NotAnSpi(i) | DeviceError::SharedSpi(i) => Self::NoSuchDevice(i),
        }
    }
}

impl From<vm_fdt::Error> for GuestDtError {
    fn from(_: vm_fdt::Error) -> Self {
        Self::Write
    }
}

/// Writes the DTB for a guest described by `cfg`, from the host device tree `host`.
///
/// # Errors
/// [`GuestDtError`] when the host DTB is unreadable, `cfg` names a device or CPU the host
/// does not have, the initrd lies outside the guest RAM, or the tree cannot be written.
pub fn build_guest_dt(host: &HostDt<'_>, cfg: &GuestDtConfig<'_>) -> Result<Vec<u8>, GuestDtError> {
    let host = host.fdt();
    let root = find_path(host, "/").ok_or(GuestDtError::HostDt)?;
    let (acells, scells) = cells(&root, 2, 1);
    if !(1..=2).contains(&acells) || !(1..=2).contains(&scells) {
        return Err(GuestDtError::Cells);
    }
    if cfg.bootargs.contains('\0') {
        return Err(GuestDtError::BadBootargs);
    }
    let ram_end = cfg
        .ram_base
        .checked_add(cfg.ram_size)
        .ok_or(GuestDtError::Cells)?;
    if let Some((start, end)) = cfg.initrd {
        if start >= end || start < cfg.ram_base || end > ram_end {
            return Err(GuestDtError::BadInitrd);
        }
    }
    let selected: Vec<_> = select(host, cfg.devices)?
        .into_iter()
        .filter(|n| !is_interrupt_controller(n))
        .collect();
    if cfg.cpus.is_empty() {
        return Err(GuestDtError::NoCpus);
    }
    // Fresh phandles above every one the host uses (0xffff_ffff is not a valid one).
    let mut next_phandle = max_phandle(host).saturating_add(1);
    let gic_phandle = find_path(host, "/")
        .and_then(|r| r.property("interrupt-parent"))
        .and_then(|p| be_cells(p.value).next())
        .unwrap_or_else(|| {
            let fresh = next_phandle;
            next_phandle = next_phandle.saturating_add(1);
            fresh
        });

    let mut w = FdtWriter::new()?;
    // The boot CPU is vCPU 0, whose `reg` is 0 (boot_cpuid_phys in the FDT header).
    w.set_boot_cpuid_phys(0);
    let top = w.begin_node("")?;
    for p in root.properties() {
        if p.name != "interrupt-parent" {
            w.property(p.name, p.value)?;
        }
    }
    w.property_u32("interrupt-parent", gic_phandle)?;

    let memory = w.begin_node(&format!("memory@{:x}", cfg.ram_base))?;
    w.property_string("device_type", "memory")?;
    let mut reg = Vec::new();
    push_cells(&mut reg, cfg.ram_base, acells)?;
    push_cells(&mut reg, cfg.ram_size, scells)?;
    w.property("reg", &reg)?;
    w.end_node(memory)?;

    let chosen = w.begin_node("chosen")?;
    w.property_string("bootargs", cfg.bootargs)?;
    if let Some((start, end)) = cfg.initrd {
        w.property_u64("linux,initrd-start", start)?;
        w.property_u64("linux,initrd-end", end)?;
    }
    if let Some(uart) = cfg.vuart {
        w.property_string("stdout-path", &format!("/pl011@{uart:x}"))?;
    }
    w.end_node(chosen)?;

    let psci = w.begin_node("psci")?;
    w.property_string_list(
        "compatible",
        ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"]
            .iter()
            .map(|s| String::from(*s))
            .collect(),
    )?;
    w.property_string("method", "hvc")?;
    w.end_node(psci)?;

    write_cpus(host, &mut w, cfg.cpus)?;
    write_gic(&mut w, cfg, gic_phandle, (acells, scells))?;
    if let Some(uart) = cfg.vuart {
        write_vuart(&mut w, uart, gic_phandle, next_phandle, (acells, scells))?;
    }

    for node in &selected {
        copy_subtree(&mut w, node, node.name)?;
    }
    w.end_node(top)?;
    Ok(w.finish()?)
}

/// The largest phandle the host tree uses (0 if none).
fn max_phandle(host: &Fdt<'_>) -> u32 {
    fn visit(n: &FdtNode<'_, '_>, max: &mut u32) {
        for p in n.properties() {
            if p.name == "phandle" || p.name == "linux,phandle" {
                if let Some(v) = be_cells(p.value).next() {
                    *max = (*max).max(v);
                }
            }
        }
        for c in n.children() {
            visit(&c, max);
        }
    }
    let mut max = 0;
    if let Some(root) = find_path(host, "/") {
        visit(&root, &mut max);
    }
    max
}

/// `reg` of one range in the root's cells.
fn reg(base: u64, size: u64, (acells, scells): (usize, usize)) -> Result<Vec<u8>, GuestDtError> {
    let mut out = Vec::new();
    push_cells(&mut out, base, acells)?;
    push_cells(&mut out, size, scells)?;
    Ok(out)
}

/// The VM's virtual GICv3 (Linux `Documentation/devicetree/bindings/interrupt-controller/
/// arm,gic-v3.yaml`): no ITS child, no maintenance interrupt.
fn write_gic(
    w: &mut FdtWriter,
    cfg: &GuestDtConfig<'_>,
    phandle: u32,
    cells: (usize, usize),
) -> Result<(), GuestDtError> {
    let node = w.begin_node(&format!("intc@{:x}", cfg.gic.dist))?;
    let (dist, redist) = (cfg.gic.dist.get(), cfg.gic.redist.get());
    w.property_string("compatible", "arm,gic-v3")?;
    w.property_u32("#interrupt-cells", 3)?;
    w.property_null("interrupt-controller")?;
    w.property_u32("#redistributor-regions", 1)?;
    let mut r = reg(dist, GicIpa::DIST_SIZE, cells)?;
    r.extend(reg(redist, GicIpa::redist_size(cfg.cpus.len()), cells)?);
    w.property("reg", &r)?;
    w.property_u32("phandle", phandle)?;
    w.end_node(node)?;
    Ok(())
}

/// The VM's virtual PL011 at `ipa` with SPI 1 (INTID 33), and the fixed 24 MHz clock
/// the `arm,primecell` binding needs (`uartclk` and `apb_pclk`).
fn write_vuart(
    w: &mut FdtWriter,
    ipa: u64,
    gic: u32,
    clock: u32,
    cells: (usize, usize),
) -> Result<(), GuestDtError> {
    let clk = w.begin_node("vuart-clk")?;
    w.property_string("compatible", "fixed-clock")?;
    w.property_u32("#clock-cells", 0)?;
    w.property_u32("clock-frequency", 24_000_000)?;
    w.property_string("clock-output-names", "vuart-clk")?;
    w.property_u32("phandle", clock)?;
    w.end_node(clk)?;
    let uart = w.begin_node(&format!("pl011@{ipa:x}"))?;
    w.property_string_list(
        "compatible",
        ["arm,pl011", "arm,primecell"]
            .iter()
            .map(|s| String::from(*s))
            .collect(),
    )?;
    w.property("reg", &reg(ipa, crate::mem::PAGE_SIZE, cells)?)?;
    // SPI (0), number INTID - 32, level-high (4).
    let spi = crate::config::VUART_INTID - 32;
    w.property_array_u32("interrupts", &[0, spi, 4])?;
    w.property_u32("interrupt-parent", gic)?;
    w.property_array_u32("clocks", &[clock, clock])?;
    w.property_string_list(
        "clock-names",
        ["uartclk", "apb_pclk"]
            .iter()
            .map(|s| String::from(*s))
            .collect(),
    )?;
    w.end_node(uart)?;
    Ok(())
}

fn push_cells(out: &mut Vec<u8>, value: u64, ncells: usize) -> Result<(), GuestDtError> {
    match ncells {
        1 => out.extend_from_slice(
            &u32::try_from(value)
                .map_err(|_| GuestDtError::Cells)?
                .to_be_bytes(),
        ),
        2 => out.extend_from_slice(&value.to_be_bytes()),
        _ => return Err(GuestDtError::Cells),
    }
    Ok(())
}

fn copy_subtree(w: &mut FdtWriter, node: &FdtNode<'_, '_>, name: &str) -> Result<(), GuestDtError> {
    let handle = w.begin_node(name)?;
    for p in node.properties() {
        w.property(p.name, p.value)?;
    }
    for child in node.children() {
        copy_subtree(w, &child, child.name)?;
    }
    w.end_node(handle)?;
    Ok(())
}

fn write_cpus(host: &Fdt<'_>, w: &mut FdtWriter, mpidrs: &[u64]) -> Result<(), GuestDtError> {
    let cpus = find_path(host, "/cpus").ok_or(GuestDtError::HostDt)?;
    let (acells, _) = cells(&cpus, 1, 0);
    let node_reg =
        |n: &FdtNode<'_, '_>| n.property("reg").and_then(|p| read_cells(p.value, acells));
    let is_cpu = |n: &FdtNode<'_, '_>| base_name(n.name) == "cpu";
    let handle = w.begin_node("cpus")?;
    for p in cpus.properties() {
        w.property(p.name, p.value)?;
    }
    for (vcpu, &mpidr) in mpidrs.iter().enumerate() {
        let cpu = cpus
            .children()
            .find(|n| is_cpu(n) && node_reg(n) == Some(mpidr))
            .ok_or(GuestDtError::NoSuchCpu(mpidr))?;
        let node = w.begin_node(&format!("cpu@{vcpu:x}"))?;
        for p in cpu.properties() {
            if !matches!(
                p.name,
                "enable-method" | "cpu-release-addr" | "reg" | "phandle" | "linux,phandle"
            ) {
                w.property(p.name, p.value)?;
            }
        }
        // The vCPU's virtual MPIDR: Aff0 = its index.
        let mut r = Vec::new();
        push_cells(&mut r, vcpu as u64, acells.max(1))?;
        w.property("reg", &r)?;
        w.property_string("enable-method", "psci")?;
        for child in cpu.children() {
            copy_subtree(w, &child, child.name)?;
        }
        w.end_node(node)?;
    }
    // Shared CPU-side nodes (caches, idle states) stay; the topology map would name
    // CPUs the guest does not have.
    for other in cpus.children() {
        if !is_cpu(&other) && other.name != "cpu-map" {
            copy_subtree(w, &other, other.name)?;
        }
    }
    w.end_node(handle)?;
    Ok(())
}

#[cfg(test)]
mod tests;
