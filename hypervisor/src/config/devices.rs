//! The host devices a VM is given (`passthrough-devices` in its description): the
//! top-level device-tree nodes named, the nodes they depend on, and the MMIO ranges they
//! occupy. The VM description maps those ranges; a Linux guest's device tree copies those
//! nodes (`crate::linux::guest_dt`).

use alloc::vec::Vec;
use core::fmt;

use fdt::node::FdtNode;
use fdt::Fdt;

use crate::mem::{PhysAddr, PhysRange};

/// Top-level host nodes that are never copied: the guest gets its own.
pub(crate) const REWRITTEN: &[&str] = &[
    "chosen",
    "cpus",
    "psci",
    "memory",
    "reserved-memory",
    "aliases",
];

/// `compatible` of the architected timer node.
pub(crate) const TIMER_COMPATIBLE: &str = "arm,armv8-timer";

/// Why the devices of a description cannot be found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// The host device tree has no root node.
    NoRoot,
    /// `devices[i]` is not a top-level node of the host DT (or is one the guest never
    /// gets from the host, such as `/chosen`).
    NoSuchDevice(usize),
    /// `devices[i]` is the GIC or an ITS, which only the hypervisor drives.
    InterruptController(usize),
    /// `devices[i]` (or a node below it) has an interrupt that is not a GIC SPI (a PPI,
    /// an interrupt of another controller, or a specifier the hypervisor cannot read):
    /// it cannot be given to one VM.
    NotAnSpi(usize),
    /// An SPI of `devices[i]` is also the interrupt of a host node the VM is not given
    /// (the hypervisor's console, another device).
    SharedSpi(usize),
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRoot => f.write_str("the host device tree has no root node"),
            Self::NoSuchDevice(i) => write!(f, "device {i} is not a top-level host node"),
            Self::InterruptController(i) => write!(
                f,
                "device {i} is the GIC or its ITS, which is never assigned to a VM"
            ),
            Self::NotAnSpi(i) => write!(f, "device {i} has an interrupt that is not an SPI"),
            Self::SharedSpi(i) => write!(
                f,
                "device {i} shares an interrupt (SPI) with a host node the VM is not given"
            ),
        }
    }
}

impl core::error::Error for DeviceError {}

/// The host physical MMIO ranges of the devices `devices` (host DT paths) passes
/// through, with the nodes they depend on: every `reg` of those nodes and of their
/// descendants that sit on identity-mapped buses (empty `ranges` all the way up), rounded
/// out to 4 KiB pages, sorted and merged.
///
/// # Errors
/// [`DeviceError`] when the tree has no root or a path names no top-level node.
pub fn passthrough_regions(
    host: &Fdt<'_>,
    devices: &[&str],
) -> Result<Vec<PhysRange>, DeviceError> {
    let root = super::find_path(host, "/").ok_or(DeviceError::NoRoot)?;
    let mut regions = Vec::new();
    for node in select(host, devices)? {
        collect_regs(&node, cells(&root, 2, 1), Empty::Skipped, &mut regions);
    }
    regions.sort_by_key(|r: &PhysRange| r.base);
    let mut merged: Vec<PhysRange> = Vec::new();
    for r in regions {
        match merged.last_mut() {
            Some(last) if r.base <= last.end() => {
                *last = PhysRange::from_to(last.base, last.end().max(r.end()));
            }
            _ => merged.push(r),
        }
    }
    Ok(merged)
}

/// The MMIO ranges of the host's GIC nodes and everything below them (the ITS), rounded
/// out to pages: what no VM may have mapped. A `reg` of size 0 still counts as its page.
#[must_use]
pub fn gic_regions(host: &Fdt<'_>) -> Vec<PhysRange> {
    regions_of(host, is_interrupt_controller)
}

/// `compatible` of QEMU's firmware configuration device.
pub(crate) const FW_CFG_COMPATIBLE: &str = "qemu,fw-cfg-mmio";

/// The MMIO ranges of every fw-cfg node of the host, rounded out to pages (a `reg` of
/// size 0 as its page): what no VM may have mapped, whether or not the hypervisor could
/// use the device (`super::fw_cfg`).
#[must_use]
pub fn fw_cfg_regions(host: &Fdt<'_>) -> Vec<PhysRange> {
    regions_of(host, |n| {
        n.compatible()
            .is_some_and(|c| c.all().any(|s| s == FW_CFG_COMPATIBLE))
    })
}

/// The page-rounded `reg` ranges of the top-level nodes `which` picks and of everything
/// below them, empty ones as their page.
fn regions_of(host: &Fdt<'_>, which: impl Fn(&FdtNode<'_, '_>) -> bool) -> Vec<PhysRange> {
    let mut regions = Vec::new();
    let Some(root) = super::find_path(host, "/") else {
        return regions;
    };
    for top in root.children().filter(|n| which(n)) {
        collect_regs(&top, cells(&root, 2, 1), Empty::AsItsPage, &mut regions);
    }
    regions
}

/// What [`collect_regs`] does with a `reg` of size 0.
#[derive(Clone, Copy)]
enum Empty {
    /// Nothing: a device with no registers maps nothing.
    Skipped,
    /// Its page: a range no VM may have must not slip through as empty.
    AsItsPage,
}

/// The SPIs (INTIDs 32..=1019) of the devices `devices` names (host DT paths), from the
/// `interrupts` (or `interrupts-extended`) of those nodes and of their descendants,
/// whose interrupt parent is the GIC (three-cell specifiers: type 0 = SPI, number,
/// flags; IHI 0069 and the Linux `arm,gic-v3` binding). The interrupt parent is the
/// node's `interrupt-parent`, else its parent's, up to the root (the devicetree
/// specification, "Interrupts"). Sorted, without duplicates. The nodes they merely depend
/// on (clocks) are not the VM's: their interrupts are not included.
///
/// # Errors
/// [`DeviceError`] as [`passthrough_regions`]; [`DeviceError::NotAnSpi`] for a PPI or a
/// specifier that is not three cells of a GIC SPI, or an interrupt whose parent is not
/// the GIC (its cells would name some other controller's line, not a GIC SPI); and
/// [`DeviceError::SharedSpi`] when another host node outside `devices` (the hypervisor's
/// console, another device) has the same SPI: the VM would own that node's interrupt.
pub fn passthrough_spis(host: &Fdt<'_>, devices: &[&str]) -> Result<Vec<u32>, DeviceError> {
    let root = super::find_path(host, "/").ok_or(DeviceError::NoRoot)?;
    // Checks the paths (and refuses the GIC) the same way.
    select(host, devices)?;
    let gics: Vec<u32> = root
        .children()
        .filter(is_interrupt_controller)
        .filter_map(|n| phandle(&n))
        .collect();
    let root_parent = interrupt_parent(&root);
    // Each device's own SPIs, in the order of `devices`.
    let mut per_device = Vec::with_capacity(devices.len());
    for (i, path) in devices.iter().enumerate() {
        let name = path.strip_prefix('/').ok_or(DeviceError::NoSuchDevice(i))?;
        let Some(node) = root.children().find(|n| n.name == name) else {
            return Err(DeviceError::NoSuchDevice(i));
        };
        let mut mine = Vec::new();
        if !node_spis(&node, root_parent, &gics, &mut mine) {
            return Err(DeviceError::NotAnSpi(i));
        }
        per_device.push(mine);
    }
    // Every other top-level node (GIC nodes aside: theirs are PPIs) with a readable SPI.
    for other in root.children() {
        let name = other.name;
        if is_interrupt_controller(&other)
            || devices.iter().any(|d| d.strip_prefix('/') == Some(name))
        {
            continue;
        }
        let mut theirs = Vec::new();
        // A node whose interrupts cannot be read shares nothing the VM could be given.
        let _ = node_spis(&other, root_parent, &gics, &mut theirs);
        if let Some(i) = per_device
            .iter()
            .position(|mine| mine.iter().any(|t| theirs.contains(t)))
        {
            return Err(DeviceError::SharedSpi(i));
        }
    }
    let mut spis: Vec<u32> = per_device.into_iter().flatten().collect();
    spis.sort_unstable();
    spis.dedup();
    Ok(spis)
}

/// The `phandle` of `node`.
fn phandle(node: &FdtNode<'_, '_>) -> Option<u32> {
    node.properties()
        .find(|p| p.name == "phandle" || p.name == "linux,phandle")
        .and_then(|p| be_cells(p.value).next())
}

/// The `interrupt-parent` property of `node` itself.
fn interrupt_parent(node: &FdtNode<'_, '_>) -> Option<u32> {
    node.property("interrupt-parent")
        .and_then(|p| be_cells(p.value).next())
}

/// Adds the GIC SPIs of `node` and its descendants (`inherited`: the interrupt parent of
/// `node`'s parent) to `out`; false if one of their interrupts is not a GIC SPI.
fn node_spis(
    node: &FdtNode<'_, '_>,
    inherited: Option<u32>,
    gics: &[u32],
    out: &mut Vec<u32>,
) -> bool {
    let parent = interrupt_parent(node).or(inherited);
    let spi = |spec: &[u32], out: &mut Vec<u32>| match *spec {
        [0, n, _] => match 32u32.checked_add(n) {
            Some(intid) if intid <= 1019 => {
                out.push(intid);
                true
            }
            _ => false,
        },
        _ => false,
    };
    let mut ok = true;
    if let Some(p) = node.property("interrupts-extended") {
        // <phandle cell cell cell>...: every controller must be the GIC (3 cells each).
        let cells: Vec<u32> = be_cells(p.value).collect();
        ok = !cells.is_empty()
            && p.value.len() % 16 == 0
            && cells.chunks_exact(4).all(|c| match c.split_first() {
                Some((ph, spec)) => gics.contains(ph) && spi(spec, out),
                None => false,
            });
    } else if let Some(p) = node.property("interrupts") {
        let cells: Vec<u32> = be_cells(p.value).collect();
        ok = parent.is_some_and(|ph| gics.contains(&ph))
            && !cells.is_empty()
            && cells.len() % 3 == 0
            && p.value.len() % 4 == 0
            && cells.chunks_exact(3).all(|spec| spi(spec, out));
    }
    for child in node.children() {
        ok &= node_spis(&child, parent, gics, out);
    }
    ok
}

/// Whether any of the devices `devices` names (or a node below one) can master DMA: it
/// is `virtio,mmio` (a virtio device reads and writes the guest's buffers by physical
/// address) or says `dma-coherent`. With no SMMU such a device reaches every physical
/// address its driver programs. Paths that name no node are ignored here
/// ([`passthrough_regions`] refuses them).
#[must_use]
pub fn any_dma_capable(host: &Fdt<'_>, devices: &[&str]) -> bool {
    let Some(root) = super::find_path(host, "/") else {
        return false;
    };
    let mut dma = false;
    for path in devices {
        let name = path.strip_prefix('/').unwrap_or(path);
        if let Some(node) = root.children().find(|n| n.name == name) {
            visit(&node, &mut |n| {
                dma |= n.property("dma-coherent").is_some()
                    || n.compatible()
                        .is_some_and(|c| c.all().any(|s| s == "virtio,mmio"));
            });
        }
    }
    dma
}

/// `#address-cells` and `#size-cells` of `node` (the cells of its children's `reg`).
pub(crate) fn cells(node: &FdtNode<'_, '_>, default_a: usize, default_s: usize) -> (usize, usize) {
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

pub(crate) fn be_cells(value: &[u8]) -> impl Iterator<Item = u32> + '_ {
    value
        .chunks_exact(4)
        .filter_map(|c| c.try_into().ok().map(u32::from_be_bytes))
}

pub(crate) fn read_cells(value: &[u8], ncells: usize) -> Option<u64> {
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
/// the architected timer and, transitively, those they reference by phandle
/// (`interrupt-parent` of the root or of any copied node, `clocks`).
///
/// # Errors
/// [`DeviceError`] when the tree has no root or a path names no top-level node.
pub(crate) fn select<'b, 'a>(
    host: &'b Fdt<'a>,
    devices: &[&str],
) -> Result<Vec<FdtNode<'b, 'a>>, DeviceError> {
    let root = super::find_path(host, "/").ok_or(DeviceError::NoRoot)?;
    let tops: Vec<FdtNode<'b, 'a>> = root.children().collect();
    // The GIC is the interrupt parent of nearly everything, but a guest gets its own.
    let copyable = |n: &FdtNode<'_, '_>| {
        !REWRITTEN.contains(&base_name(n.name)) && !is_interrupt_controller(n)
    };
    // The EL1 generic timer is part of every CPU: always described.
    let mut chosen: Vec<bool> = tops
        .iter()
        .map(|top| {
            top.compatible()
                .is_some_and(|c| c.all().any(|s| s == TIMER_COMPATIBLE))
        })
        .collect();
    for (i, path) in devices.iter().enumerate() {
        let name = path.strip_prefix('/').ok_or(DeviceError::NoSuchDevice(i))?;
        let (top, pick) = tops
            .iter()
            .zip(chosen.iter_mut())
            .find(|(n, _)| n.name == name && !REWRITTEN.contains(&base_name(n.name)))
            .ok_or(DeviceError::NoSuchDevice(i))?;
        if is_interrupt_controller(top) {
            return Err(DeviceError::InterruptController(i));
        }
        *pick = true;
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
            for (top, _) in tops.iter().zip(&chosen).filter(|(_, c)| **c) {
                visit(top, &mut |n| references(host, n, &mut wanted));
            }
            let mut grew = false;
            for ph in wanted.drain(..) {
                let Some(i) = owner(ph) else { continue };
                if let (Some(top), Some(pick)) = (tops.get(i), chosen.get_mut(i)) {
                    if !*pick && copyable(top) {
                        *pick = true;
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

/// `compatible` values of the interrupt controllers and MSI controllers a guest never
/// gets from the host: the GICv3 (and v2) and its ITS.
pub(crate) const GIC_COMPATIBLES: &[&str] = &[
    "arm,gic-v3",
    "arm,gic-v3-its",
    "arm,gic-400",
    "arm,cortex-a15-gic",
    "arm,gic-v2m-frame",
];

/// Whether `node` is the host's GIC (or an ITS): never copied into a guest.
pub(crate) fn is_interrupt_controller(node: &FdtNode<'_, '_>) -> bool {
    node.compatible()
        .is_some_and(|c| c.all().any(|s| GIC_COMPATIBLES.contains(&s)))
}

/// Node name without the unit address.
pub(crate) fn base_name(name: &str) -> &str {
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
                    i = i.saturating_add(1).saturating_add(args);
                }
            }
            _ => {}
        }
    }
}

/// Adds the `reg` ranges of `node` (its parent's cells are `parent_cells`) and of the
/// descendants reached through identity `ranges`.
fn collect_regs(
    node: &FdtNode<'_, '_>,
    parent_cells: (usize, usize),
    empty: Empty,
    out: &mut Vec<PhysRange>,
) {
    let (ac, sc) = parent_cells;
    if let Some(reg) = node.property("reg") {
        // One or two cells each (checked first, so the products are at most 16).
        if (1..=2).contains(&ac) && (1..=2).contains(&sc) {
            let (a_bytes, s_bytes) = (ac.saturating_mul(4), sc.saturating_mul(4));
            for chunk in reg.value.chunks_exact(a_bytes.saturating_add(s_bytes)) {
                let (addr, len) = chunk.split_at(a_bytes);
                let (Some(base), Some(size)) = (read_cells(addr, ac), read_cells(len, sc)) else {
                    continue;
                };
                let size = match empty {
                    Empty::AsItsPage => size.max(1),
                    Empty::Skipped => size,
                };
                const PAGE_MASK: u64 = mmu::FRAME_SIZE.wrapping_sub(1);
                let start = base & !PAGE_MASK;
                let Some(end) = base
                    .checked_add(size)
                    .and_then(|e| e.checked_add(PAGE_MASK))
                    .map(|e| e & !PAGE_MASK)
                else {
                    continue;
                };
                if let Some(size) = end.checked_sub(start).filter(|s| *s > 0) {
                    out.push(PhysRange::new(PhysAddr::new(start), size));
                }
            }
        }
    }
    let identity = node.property("ranges").is_some_and(|r| r.value.is_empty());
    if identity {
        let own = cells(node, 2, 1);
        for child in node.children() {
            collect_regs(&child, own, empty, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::dtb::qemu_virt;

    #[test]
    fn regions_cover_the_devices_registers_rounded_to_pages() {
        let dt = qemu_virt();
        let host = dt.fdt();
        // The PL011 page only: its interrupt parent, the GIC, never comes along.
        let regions = passthrough_regions(host, &["/pl011@9000000", "/timer"]).unwrap();
        assert_eq!(regions, [PhysRange::new(PhysAddr::new(0x900_0000), 0x1000)]);
        // fw-cfg's 0x18 bytes become one page.
        let regions = passthrough_regions(host, &["/fw-cfg@9020000"]).unwrap();
        assert_eq!(regions, [PhysRange::new(PhysAddr::new(0x902_0000), 0x1000)]);
        assert_eq!(
            passthrough_regions(host, &["/bogus"]),
            Err(DeviceError::NoSuchDevice(0))
        );
        // The GIC (with its ITS) is never a device a VM is given.
        assert_eq!(
            passthrough_regions(host, &["/pl011@9000000", "/intc@8000000"]),
            Err(DeviceError::InterruptController(1))
        );
    }

    #[test]
    fn a_devices_spis_come_from_its_interrupts() {
        let dt = qemu_virt();
        let host = dt.fdt();
        // QEMU virt's PL031 RTC has SPI 2 (INTID 34); its clock brings no interrupt.
        assert_eq!(passthrough_spis(host, &["/pl031@9010000"]), Ok(vec![34]));
        assert_eq!(passthrough_spis(host, &[]), Ok(vec![]));
        // The architected timer's interrupts are PPIs: never one VM's device.
        assert_eq!(
            passthrough_spis(host, &["/pl031@9010000", "/timer"]),
            Err(DeviceError::NotAnSpi(1))
        );
        assert_eq!(
            passthrough_spis(host, &["/intc@8000000"]),
            Err(DeviceError::InterruptController(0))
        );
    }

    /// A host tree: GIC (phandle 1, the root's interrupt parent), a GPIO interrupt
    /// controller (phandle 2), the console with SPI 1, and devices whose interrupts
    /// come every way the devicetree allows.
    fn host_with_interrupt_parents() -> Vec<u8> {
        let be =
            |cells: &[u32]| -> Vec<u8> { cells.iter().flat_map(|c| c.to_be_bytes()).collect() };
        let mut w = vm_fdt::FdtWriter::new().expect("writer");
        let root = w.begin_node("").expect("root");
        w.property_u32("interrupt-parent", 1).expect("prop");
        let gic = w.begin_node("intc@8000000").expect("node");
        w.property_string("compatible", "arm,gic-v3").expect("prop");
        w.property_u32("phandle", 1).expect("prop");
        w.property("interrupts", &be(&[1, 9, 4])).expect("prop");
        w.end_node(gic).expect("end");
        type Node<'a> = (&'a str, &'a [(&'a str, &'a [u32])]);
        let nodes: &[Node<'_>] = &[
            ("pl011@9000000", &[("interrupts", &[0, 1, 4])]),
            (
                "gpio@9030000",
                &[
                    ("phandle", &[2]),
                    ("#interrupt-cells", &[2]),
                    ("interrupts", &[0, 7, 4]),
                ],
            ),
            // A GPIO line: its cells are the GPIO controller's, not a GIC SPI.
            (
                "keys",
                &[("interrupt-parent", &[2]), ("interrupts", &[1, 4])],
            ),
            ("ext", &[("interrupts-extended", &[1, 0, 5, 4, 1, 0, 6, 4])]),
            (
                "ext-gpio",
                &[("interrupts-extended", &[1, 0, 10, 4, 2, 3, 1, 0])],
            ),
            // SPI 1, which the console has.
            ("twin", &[("interrupts", &[0, 1, 4])]),
        ];
        for (name, props) in nodes {
            let n = w.begin_node(name).expect("node");
            for (k, v) in *props {
                w.property(k, &be(v)).expect("prop");
            }
            w.end_node(n).expect("end");
        }
        // A bus without interrupt-parent: its child inherits the root's (the GIC).
        let bus = w.begin_node("bus").expect("node");
        let child = w.begin_node("dev@0").expect("node");
        w.property("interrupts", &be(&[0, 8, 4])).expect("prop");
        w.end_node(child).expect("end");
        w.end_node(bus).expect("end");
        w.end_node(root).expect("end");
        w.finish().expect("finish")
    }

    #[test]
    fn only_gic_interrupts_count_and_an_spi_is_never_shared() {
        let mut blob = host_with_interrupt_parents();
        let dt = crate::config::HostDt::new(&mut blob).expect("valid tree");
        let host = dt.fdt();
        assert_eq!(passthrough_spis(host, &["/ext"]), Ok(vec![37, 38]));
        assert_eq!(
            passthrough_spis(host, &["/bus"]),
            Ok(vec![40]),
            "inherited parent"
        );
        assert_eq!(passthrough_spis(host, &["/gpio@9030000"]), Ok(vec![39]));
        assert_eq!(
            passthrough_spis(host, &["/bus", "/keys"]),
            Err(DeviceError::NotAnSpi(1)),
            "another controller's line"
        );
        assert_eq!(
            passthrough_spis(host, &["/ext-gpio"]),
            Err(DeviceError::NotAnSpi(0))
        );
        assert_eq!(
            passthrough_spis(host, &["/twin"]),
            Err(DeviceError::SharedSpi(0)),
            "the console's SPI"
        );
        assert_eq!(
            passthrough_spis(host, &["/bus", "/twin"]),
            Err(DeviceError::SharedSpi(1)),
            "the refusal names the device that shares"
        );
        // Given together, the two nodes of one SPI are one VM's.
        assert_eq!(
            passthrough_spis(host, &["/twin", "/pl011@9000000"]),
            Ok(vec![33])
        );
    }

    #[test]
    fn virtio_mmio_is_a_dma_master_and_an_rtc_is_not() {
        let dt = qemu_virt();
        let host = dt.fdt();
        assert!(any_dma_capable(host, &["/virtio_mmio@a000000"]));
        assert!(any_dma_capable(
            host,
            &["/pl031@9010000", "/virtio_mmio@a003e00"]
        ));
        assert!(!any_dma_capable(host, &["/pl031@9010000", "/bogus"]));
        assert!(!any_dma_capable(host, &[]));
    }
}
