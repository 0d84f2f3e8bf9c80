//! The device tree a Linux guest boots with, made from the host's.
//!
//! The guest DT keeps the host's root properties and copies, whole, only the top-level
//! nodes the guest may use (its pass-through devices, named by path, plus the nodes they
//! depend on through `interrupt-parent` and `clocks` phandles, and the architected timer,
//! which every CPU has). Everything about memory,
//! CPUs and firmware is written anew:
//!
//! - `/memory@<base>`: the guest's RAM and nothing else, so the hypervisor's memory and
//!   other guests' memory are never described to the guest;
//! - `/chosen`: `bootargs`, `linux,initrd-start`/`-end`, and the host's `stdout-path`
//!   when the console device is one of the guest's;
//! - `/psci`: PSCI through HVC, which the hypervisor emulates;
//! - `/cpus`: the host's `cpu` nodes for the physical CPUs the guest runs on (the guest's
//!   vCPUs keep the physical MPIDRs, which GIC pass-through needs), each with
//!   `enable-method = "psci"`; `cpu-map` is dropped.
//!
//! The host's `/chosen` (and with it the VM descriptions), `/memory`, `/reserved-memory`
//! and `/psci` never reach a guest. `crate::config::devices::passthrough_regions` gives
//! the MMIO ranges of the same set of devices, for the guest's stage-2 table.

use core::fmt;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use fdt::node::FdtNode;
use fdt::Fdt;

use crate::config::devices::{base_name, cells, read_cells, select, DeviceError};
use crate::config::{find_path, HostDt};
use vm_fdt::FdtWriter;

/// What the guest's device tree describes.
#[derive(Clone, Copy, Debug)]
pub struct GuestDtConfig<'a> {
    /// Guest-physical start of the guest's RAM.
    pub ram_base: u64,
    /// Bytes of guest RAM.
    pub ram_size: u64,
    /// MPIDR affinity values (the `reg` of the host's `cpu` nodes) of the physical CPUs
    /// the guest runs on, in vCPU order; the first is the boot CPU.
    pub cpus: &'a [u64],
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
    let selected = select(host, cfg.devices)?;

    let mut w = FdtWriter::new()?;
    let boot_cpu = *cfg.cpus.first().ok_or(GuestDtError::NoCpus)?;
    // boot_cpuid_phys holds the boot CPU's `reg` (a 32-bit field in the FDT header).
    w.set_boot_cpuid_phys(u32::try_from(boot_cpu).map_err(|_| GuestDtError::Cells)?);
    let top = w.begin_node("")?;
    for p in root.properties() {
        w.property(p.name, p.value)?;
    }

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
    // The host's console path (without its `:options`) is kept when the guest has that
    // device.
    if let Some(path) = find_path(host, "/chosen").and_then(|c| c.property("stdout-path")) {
        let stdout = path
            .as_str()
            .and_then(|p| p.split(':').next())
            .and_then(|p| find_path(host, p));
        if stdout.is_some_and(|s| selected.iter().any(|n| n.name == s.name)) {
            w.property("stdout-path", path.value)?;
        }
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

    for node in &selected {
        copy_subtree(&mut w, node, node.name)?;
    }
    w.end_node(top)?;
    Ok(w.finish()?)
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
    for &mpidr in mpidrs {
        let cpu = cpus
            .children()
            .find(|n| is_cpu(n) && node_reg(n) == Some(mpidr))
            .ok_or(GuestDtError::NoSuchCpu(mpidr))?;
        let node = w.begin_node(cpu.name)?;
        for p in cpu.properties() {
            if p.name != "enable-method" && p.name != "cpu-release-addr" {
                w.property(p.name, p.value)?;
            }
        }
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
