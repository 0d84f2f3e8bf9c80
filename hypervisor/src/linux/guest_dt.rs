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
//! and `/psci` never reach a guest. [`passthrough_regions`] gives the MMIO ranges of the
//! same set of devices, for the guest's stage-2 table.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use fdt::node::FdtNode;
use fdt::Fdt;
use vm_fdt::FdtWriter;

/// Top-level host nodes that are never copied: the guest gets its own.
const REWRITTEN: &[&str] = &[
    "chosen",
    "cpus",
    "psci",
    "memory",
    "reserved-memory",
    "aliases",
];

/// `compatible` of the architected timer node.
const TIMER_COMPATIBLE: &str = "arm,armv8-timer";

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
    /// The host DTB could not be read.
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

impl From<vm_fdt::Error> for GuestDtError {
    fn from(_: vm_fdt::Error) -> Self {
        Self::Write
    }
}

/// A guest-physical MMIO range a pass-through device occupies, rounded out to 4 KiB pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioRegion {
    /// First byte (page aligned).
    pub base: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub size: u64,
}

/// Writes the DTB for a guest described by `cfg`, from the host DTB `host_dtb`.
///
/// # Errors
/// [`GuestDtError`] when the host DTB is unreadable, `cfg` names a device or CPU the host
/// does not have, the initrd lies outside the guest RAM, or the tree cannot be written.
pub fn build_guest_dt(host_dtb: &[u8], cfg: &GuestDtConfig<'_>) -> Result<Vec<u8>, GuestDtError> {
    let host = Fdt::new(host_dtb).map_err(|_| GuestDtError::HostDt)?;
    let root = host.find_node("/").ok_or(GuestDtError::HostDt)?;
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
    let selected = select(&host, cfg.devices)?;

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
    if let Some(stdout) = host.chosen().stdout() {
        if selected.iter().any(|n| n.name == stdout.name) {
            if let Some(path) = host
                .find_node("/chosen")
                .and_then(|c| c.property("stdout-path"))
            {
                w.property("stdout-path", path.value)?;
            }
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

    write_cpus(&host, &mut w, cfg.cpus)?;

    for node in &selected {
        copy_subtree(&mut w, node, node.name)?;
    }
    w.end_node(top)?;
    Ok(w.finish()?)
}

/// The MMIO ranges of the devices `devices` (host DT paths) passes through, with the
/// nodes they depend on: every `reg` of those nodes and of their descendants that sit
/// on identity-mapped buses (empty `ranges` all the way up), rounded out to 4 KiB
/// pages, sorted and merged.
///
/// # Errors
/// [`GuestDtError::HostDt`] or [`GuestDtError::NoSuchDevice`] as for [`build_guest_dt`].
pub fn passthrough_regions(
    host_dtb: &[u8],
    devices: &[&str],
) -> Result<Vec<MmioRegion>, GuestDtError> {
    let host = Fdt::new(host_dtb).map_err(|_| GuestDtError::HostDt)?;
    let root = host.find_node("/").ok_or(GuestDtError::HostDt)?;
    let mut regions = Vec::new();
    for node in select(&host, devices)? {
        collect_regs(&node, cells(&root, 2, 1), &mut regions);
    }
    regions.sort_by_key(|r: &MmioRegion| r.base);
    let mut merged: Vec<MmioRegion> = Vec::new();
    for r in regions {
        match merged.last_mut() {
            Some(last) if r.base <= last.base.saturating_add(last.size) => {
                let end = (last.base + last.size).max(r.base.saturating_add(r.size));
                last.size = end - last.base;
            }
            _ => merged.push(r),
        }
    }
    Ok(merged)
}

/// Paths of the host's top-level device nodes a guest can use given its identity-mapped
/// pass-through ranges: every node with a `reg` that lies wholly inside `regions`, plus
/// `/timer` (the EL1 generic timer is part of every CPU and needs no MMIO). Nodes the
/// guest DT always writes anew (`/memory`, `/chosen`, ...) are never listed.
///
/// # Errors
/// [`GuestDtError::HostDt`] when the host DTB is unreadable.
pub fn devices_within(
    host_dtb: &[u8],
    regions: &[MmioRegion],
) -> Result<Vec<String>, GuestDtError> {
    let host = Fdt::new(host_dtb).map_err(|_| GuestDtError::HostDt)?;
    let root = host.find_node("/").ok_or(GuestDtError::HostDt)?;
    let root_cells = cells(&root, 2, 1);
    let mut out = Vec::new();
    for node in root.children() {
        if REWRITTEN.contains(&base_name(node.name)) {
            continue;
        }
        let mut own = Vec::new();
        collect_regs(&node, root_cells, &mut own);
        let covered = |r: &MmioRegion| {
            regions
                .iter()
                .any(|g| r.base >= g.base && r.base + r.size <= g.base.saturating_add(g.size))
        };
        let is_timer = node
            .compatible()
            .is_some_and(|c| c.all().any(|s| s == TIMER_COMPATIBLE));
        if is_timer || (!own.is_empty() && own.iter().all(covered)) {
            out.push(format!("/{}", node.name));
        }
    }
    Ok(out)
}

/// `#address-cells` and `#size-cells` of `node` (the cells of its children's `reg`).
fn cells(node: &FdtNode<'_, '_>, default_a: usize, default_s: usize) -> (usize, usize) {
    let get = |name, default| {
        node.property(name)
            .and_then(|p| p.as_usize())
            .unwrap_or(default)
    };
    (
        get("#address-cells", default_a),
        get("#size-cells", default_s),
    )
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

fn be_cells(value: &[u8]) -> impl Iterator<Item = u32> + '_ {
    value
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
}

fn read_cells(value: &[u8], ncells: usize) -> Option<u64> {
    match ncells {
        1 => be_cells(value).next().map(u64::from),
        2 => {
            let mut it = be_cells(value);
            Some((u64::from(it.next()?) << 32) | u64::from(it.next()?))
        }
        _ => None,
    }
}

/// The host's top-level nodes the guest gets, in host order: those named in `devices`,
/// the architected timer and, transitively, those they reference by phandle (`interrupt-parent` of the root or
/// of any copied node, `clocks`).
fn select<'b, 'a>(
    host: &'b Fdt<'a>,
    devices: &[&str],
) -> Result<Vec<FdtNode<'b, 'a>>, GuestDtError> {
    let root = host.find_node("/").ok_or(GuestDtError::HostDt)?;
    let tops: Vec<FdtNode<'b, 'a>> = root.children().collect();
    let copyable = |n: &FdtNode<'_, '_>| !REWRITTEN.contains(&base_name(n.name));
    let mut chosen = alloc::vec![false; tops.len()];
    for (i, path) in devices.iter().enumerate() {
        let name = path
            .strip_prefix('/')
            .ok_or(GuestDtError::NoSuchDevice(i))?;
        let at = tops
            .iter()
            .position(|n| n.name == name && copyable(n))
            .ok_or(GuestDtError::NoSuchDevice(i))?;
        chosen[at] = true;
    }
    // The EL1 generic timer is part of every CPU: always described.
    for (i, top) in tops.iter().enumerate() {
        if top
            .compatible()
            .is_some_and(|c| c.all().any(|s| s == TIMER_COMPATIBLE))
        {
            chosen[i] = true;
        }
    }
    // phandle -> index of the top-level node holding it.
    let mut owners: Vec<(u32, usize)> = Vec::new();
    for (i, top) in tops.iter().enumerate() {
        visit(top, &mut |n| {
            for p in n.properties() {
                if p.name == "phandle" || p.name == "linux,phandle" {
                    if let Some(ph) = be_cells(p.value).next() {
                        owners.push((ph, i));
                    }
                }
            }
        });
    }
    let owner = |ph: u32| owners.iter().find(|(p, _)| *p == ph).map(|(_, i)| *i);
    let mut wanted: Vec<u32> = Vec::new();
    if let Some(p) = root.property("interrupt-parent") {
        wanted.extend(be_cells(p.value).take(1));
    }
    if chosen.iter().any(|c| *c) {
        loop {
            for (i, top) in tops.iter().enumerate() {
                if chosen[i] {
                    visit(top, &mut |n| references(host, n, &mut wanted));
                }
            }
            let mut grew = false;
            for ph in wanted.drain(..) {
                if let Some(i) = owner(ph) {
                    if !chosen[i] && copyable(&tops[i]) {
                        chosen[i] = true;
                        grew = true;
                    }
                }
            }
            if !grew {
                break;
            }
        }
    }
    Ok(tops
        .into_iter()
        .zip(chosen)
        .filter_map(|(n, c)| c.then_some(n))
        .collect())
}

/// Node name without the unit address.
fn base_name(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

fn visit<'b, 'a>(node: &FdtNode<'b, 'a>, f: &mut dyn FnMut(&FdtNode<'b, 'a>)) {
    f(node);
    for child in node.children() {
        visit(&child, f);
    }
}

/// Phandles `node` depends on: `interrupt-parent`, and the providers in `clocks`
/// (each followed by that provider's `#clock-cells` argument cells).
fn references(host: &Fdt<'_>, node: &FdtNode<'_, '_>, out: &mut Vec<u32>) {
    for p in node.properties() {
        match p.name {
            "interrupt-parent" => out.extend(be_cells(p.value).take(1)),
            "clocks" => {
                let cells: Vec<u32> = be_cells(p.value).collect();
                let mut i = 0;
                while let Some(&ph) = cells.get(i) {
                    out.push(ph);
                    let args = host
                        .find_phandle(ph)
                        .and_then(|n| n.property("#clock-cells"))
                        .and_then(|c| c.as_usize())
                        .unwrap_or(0);
                    i += 1 + args;
                }
            }
            _ => {}
        }
    }
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
    let cpus = host.find_node("/cpus").ok_or(GuestDtError::HostDt)?;
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

/// Adds the `reg` ranges of `node` (its parent's cells are `parent_cells`) and of the
/// descendants reached through identity `ranges`.
fn collect_regs(node: &FdtNode<'_, '_>, parent_cells: (usize, usize), out: &mut Vec<MmioRegion>) {
    const PAGE: u64 = 4096;
    let (ac, sc) = parent_cells;
    if let Some(reg) = node.property("reg") {
        let entry = 4 * (ac + sc);
        if (1..=2).contains(&ac) && (1..=2).contains(&sc) {
            for chunk in reg.value.chunks_exact(entry) {
                let (Some(base), Some(size)) =
                    (read_cells(chunk, ac), read_cells(&chunk[4 * ac..], sc))
                else {
                    continue;
                };
                let start = base & !(PAGE - 1);
                let Some(end) = base
                    .checked_add(size)
                    .and_then(|e| e.checked_add(PAGE - 1))
                    .map(|e| e & !(PAGE - 1))
                else {
                    continue;
                };
                if end > start {
                    out.push(MmioRegion {
                        base: start,
                        size: end - start,
                    });
                }
            }
        }
    }
    let identity = node.property("ranges").is_some_and(|r| r.value.is_empty());
    if identity {
        let own = cells(node, 2, 1);
        for child in node.children() {
            collect_regs(&child, own, out);
        }
    }
}

#[cfg(test)]
mod tests;
