//! VM descriptions: the data that says which VMs to create.
//!
//! A VM is a child node of `/chosen` in the host DTB with `compatible = "twostage,vm"`
//! (dom0less-style); the full property list is in `docs/vms.md`. Every address and size is
//! a 64-bit value written as two cells, independent of `#address-cells`. VMs get ids 0, 1,
//! ... in DT order.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use super::dtb::HostDt;
use super::fw_cfg::FwCfgFile;
use crate::mem::{Ipa, IpaRange, PhysAddr, PhysRange, PAGE_SIZE};

/// The `compatible` string of a VM node.
pub const COMPATIBLE: &str = "twostage,vm";
/// Longest accepted VM name.
pub const MAX_NAME: usize = 32;

/// A range of guest memory: `size` bytes at guest IPA `ipa`, backed by host PA `pa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRegion {
    /// Guest IPA.
    pub ipa: Ipa,
    /// Host physical address.
    pub pa: PhysAddr,
    /// Bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
}

impl GuestRegion {
    /// The region in the guest's IPA space.
    #[must_use]
    pub const fn ipa_range(&self) -> IpaRange {
        IpaRange::new(self.ipa, self.size)
    }

    /// The host physical range backing it.
    #[must_use]
    pub const fn pa_range(&self) -> PhysRange {
        PhysRange::new(self.pa, self.size)
    }

    /// The host PA of guest IPA `ipa`, if `[ipa, ipa + len)` lies inside this region
    /// and the PA range does not wrap.
    #[must_use]
    pub fn pa_of(&self, ipa: Ipa, len: u64) -> Option<PhysAddr> {
        if !self.ipa_range().contains(&IpaRange::new(ipa, len)) {
            return None;
        }
        let pa = self.pa.checked_add(ipa.checked_offset_from(self.ipa)?)?;
        pa.checked_add(len).map(|_| pa)
    }
}

/// Where the bytes of an [`Image`] come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// Staged by the host at this PA, inside the staging range (QEMU's `-device loader`,
    /// or a boot loader on a board): copied from there.
    Staged(PhysAddr),
    /// A file of QEMU's fw-cfg device, by the item key that selects it (`super::fw_cfg`):
    /// fetched by DMA straight into the VM's RAM.
    FwCfg(u16),
}

/// An image written into the VM's RAM at IPA `ipa` each time the VM is created or reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Image {
    /// Where its bytes come from.
    pub src: ImageSource,
    /// Its length in bytes.
    pub size: u64,
    /// Destination guest IPA (inside one RAM region).
    pub ipa: Ipa,
}

impl Image {
    /// Where it is staged, for a staged image.
    #[must_use]
    pub const fn staged_range(&self) -> Option<PhysRange> {
        match self.src {
            ImageSource::Staged(pa) => Some(PhysRange::new(pa, self.size)),
            ImageSource::FwCfg(_) => None,
        }
    }

    /// Where it goes in the guest.
    #[must_use]
    pub const fn ipa_range(&self) -> IpaRange {
        IpaRange::new(self.ipa, self.size)
    }
}

/// What happens when the guest touches an IPA that is neither RAM, a pass-through range
/// nor an emulated device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortPolicy {
    /// Inject a synchronous external abort into the guest at EL1.
    Inject,
    /// Stop the VM (all its vCPUs) with a log line.
    Stop,
}

/// How a VM's stage 2 maps its ranges (`stage2-mappings` in the description).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stage2Mappings {
    /// The largest entries that fit: 1 GiB and 2 MiB blocks where a range is aligned,
    /// 4 KiB pages elsewhere. Fewest table frames and TLB entries on hardware.
    #[default]
    Blocks,
    /// 4 KiB pages only. Under QEMU's TCG a stage-2 block makes every TLB entry of the
    /// guest count as a block-sized entry, and each of the guest's TLB invalidations by
    /// address then flushes QEMU's whole TLB (`docs/linux-guest.md`).
    Pages,
}

/// Where a VM's emulated GICv3 lies in its IPA space (`gic-distributor`,
/// `gic-redistributors`); QEMU virt's addresses by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicIpa {
    /// IPA of the 64 KiB distributor frame.
    pub dist: Ipa,
    /// IPA of the redistributors: 128 KiB per vCPU, one after the other.
    pub redist: Ipa,
}

impl GicIpa {
    /// QEMU virt's: GICD at `0x0800_0000`, GICR at `0x080A_0000`.
    pub const QEMU_VIRT: Self = Self {
        dist: Ipa::new(0x0800_0000),
        redist: Ipa::new(0x080A_0000),
    };
    /// Size of the distributor frame.
    pub const DIST_SIZE: u64 = 0x1_0000;
    /// Size of one vCPU's redistributor (`RD_base` and `SGI_base`).
    pub const REDIST_STRIDE: u64 = 0x2_0000;

    /// Bytes of the redistributor region of a VM with `vcpus` vCPUs.
    #[must_use]
    pub const fn redist_size(vcpus: usize) -> u64 {
        (vcpus as u64).saturating_mul(Self::REDIST_STRIDE)
    }

    /// The distributor frame.
    #[must_use]
    pub const fn dist_range(&self) -> IpaRange {
        IpaRange::new(self.dist, Self::DIST_SIZE)
    }

    /// The redistributor region of a VM with `vcpus` vCPUs.
    #[must_use]
    pub const fn redist_range(&self, vcpus: usize) -> IpaRange {
        IpaRange::new(self.redist, Self::redist_size(vcpus))
    }
}

/// The INTID of the virtual UART's interrupt (SPI 1, QEMU virt's PL011 line).
pub const VUART_INTID: u32 = 33;

/// How many memory-sharing transactions a VM may take part in at a time
/// (`sharing-max-owned`, `sharing-max-received`; `docs/vms.md`, `docs/hypercalls.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharingLimits {
    /// Live transactions the VM may own (`SHARE`/`LEND` beyond it: `NO_MEMORY`).
    pub owned: u32,
    /// Live transactions any one other VM may address to this VM (beyond it: `BUSY`):
    /// one owner cannot fill the VM's view for the others.
    pub received: u32,
}

impl SharingLimits {
    /// Default of both limits.
    pub const DEFAULT: u32 = 16;
    /// Largest value either limit may be given.
    pub const MAX: u32 = 256;
}

impl Default for SharingLimits {
    fn default() -> Self {
        Self {
            owned: Self::DEFAULT,
            received: Self::DEFAULT,
        }
    }
}

/// One VM, as described.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDesc {
    /// Name (prefix of its console output and of log lines).
    pub name: String,
    /// Physical CPU indices; vCPU *i* runs on `cpus[i]`.
    pub cpus: Vec<u32>,
    /// RAM regions (mapped Normal write-back, RWX).
    pub memory: Vec<GuestRegion>,
    /// Kernel image.
    pub kernel: Image,
    /// Entry IPA of vCPU 0.
    pub entry: Ipa,
    /// Optional initial ramdisk.
    pub initrd: Option<Image>,
    /// Optional guest DTB; when present x0 = its IPA at entry.
    pub dtb: Option<Image>,
    /// Kernel command line for a generated guest DTB.
    pub bootargs: Option<String>,
    /// x0 at entry when there is no `dtb`.
    pub arg: u64,
    /// Stage-2 abort policy.
    pub abort: AbortPolicy,
    /// Block or page mappings at stage 2.
    pub stage2: Stage2Mappings,
    /// IPA of the emulated PL011 page, if any (its interrupt is [`VUART_INTID`]).
    pub vuart: Option<Ipa>,
    /// The hypervisor's console input goes to this VM's `vuart` (`console-input`; one VM
    /// at most).
    pub console_input: bool,
    /// Where the emulated GIC is.
    pub gic: GicIpa,
    /// Device ranges mapped straight through (Device-nGnRE, RW, XN): the `passthrough`
    /// triples, then the identity-mapped ranges of `passthrough-devices`.
    pub passthrough: Vec<GuestRegion>,
    /// Host DT paths of the devices in `passthrough-devices` (what a generated guest DTB
    /// describes).
    pub devices: Vec<String>,
    /// The physical SPIs (INTIDs) of those devices: the VM's, at the same INTIDs in its
    /// virtual GIC, and no other VM's.
    pub spis: Vec<u32>,
    /// Memory-sharing limits.
    pub sharing: SharingLimits,
}

/// A device the hypervisor emulates for a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulatedDevice {
    /// The virtual PL011.
    Uart,
    /// The virtual GIC's distributor.
    Dist,
    /// The virtual GIC's redistributors.
    Redist,
}

impl VmDesc {
    /// The devices the hypervisor emulates for this VM with their IPA ranges (left
    /// unmapped at stage 2 so that every access traps): the virtual UART's page, the
    /// virtual GIC's distributor frame and redistributor region. The one list both the
    /// trap handler and the memory-sharing checks read.
    pub fn emulated_ranges(&self) -> impl Iterator<Item = (EmulatedDevice, IpaRange)> + '_ {
        self.vuart
            .map(|u| (EmulatedDevice::Uart, IpaRange::new(u, PAGE_SIZE)))
            .into_iter()
            .chain([
                (EmulatedDevice::Dist, self.gic.dist_range()),
                (
                    EmulatedDevice::Redist,
                    self.gic.redist_range(self.cpus.len()),
                ),
            ])
    }

    /// The RAM region holding `[ipa, ipa + len)`, if one does.
    #[must_use]
    pub fn ram_region(&self, ipa: Ipa, len: u64) -> Option<&GuestRegion> {
        let range = IpaRange::new(ipa, len);
        self.memory.iter().find(|r| r.ipa_range().contains(&range))
    }

    /// Total RAM bytes.
    #[must_use]
    pub fn ram_size(&self) -> u64 {
        self.memory.iter().map(|r| r.size).sum()
    }

    /// x0 for vCPU 0 at entry.
    #[must_use]
    pub fn boot_x0(&self) -> u64 {
        self.dtb.map_or(self.arg, |d| d.ipa.get())
    }
}

/// Why a description was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DescError {
    /// A VM node breaks a rule: the node name and what is wrong.
    Invalid {
        /// DT node name of the VM.
        node: String,
        /// The broken rule.
        what: &'static str,
    },
}

impl core::error::Error for DescError {}

impl fmt::Display for DescError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid { node, what } => write!(f, "VM node /chosen/{node}: {what}"),
        }
    }
}

fn u64s(bytes: &[u8]) -> Option<Vec<u64>> {
    if bytes.len() % 8 != 0 {
        return None;
    }
    bytes
        .chunks_exact(8)
        .map(|c| c.try_into().ok().map(u64::from_be_bytes))
        .collect()
}

fn u32s(bytes: &[u8]) -> Option<Vec<u32>> {
    if bytes.len() % 4 != 0 {
        return None;
    }
    bytes
        .chunks_exact(4)
        .map(|c| c.try_into().ok().map(u32::from_be_bytes))
        .collect()
}

fn string(bytes: &[u8]) -> Option<String> {
    let s = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    core::str::from_utf8(s).ok().map(ToString::to_string)
}

fn aligned(x: u64) -> bool {
    x % PAGE_SIZE == 0
}

struct Node<'a> {
    name: &'a str,
    props: Vec<(&'a str, &'a [u8])>,
}

impl<'a> Node<'a> {
    fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.props.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    fn err(&self, what: &'static str) -> DescError {
        DescError::Invalid {
            node: self.name.to_string(),
            what,
        }
    }

    fn u64_list(&self, name: &str, what: &'static str) -> Result<Option<Vec<u64>>, DescError> {
        self.get(name)
            .map(|v| u64s(v).ok_or_else(|| self.err(what)))
            .transpose()
    }

    /// A property of one 32-bit cell, at most `max`.
    fn one_u32(&self, name: &str, max: u32, what: &'static str) -> Result<Option<u32>, DescError> {
        let Some(bytes) = self.get(name) else {
            return Ok(None);
        };
        match u32s(bytes).as_deref() {
            Some(&[v]) if v <= max => Ok(Some(v)),
            _ => Err(self.err(what)),
        }
    }

    fn one_u64(&self, name: &str, what: &'static str) -> Result<Option<u64>, DescError> {
        match self.u64_list(name, what)? {
            None => Ok(None),
            Some(v) => match v[..] {
                [one] => Ok(Some(one)),
                _ => Err(self.err(what)),
            },
        }
    }

    fn regions(&self, name: &str, what: &'static str) -> Result<Vec<GuestRegion>, DescError> {
        let Some(v) = self.u64_list(name, what)? else {
            return Ok(Vec::new());
        };
        if v.len() % 3 != 0 {
            return Err(self.err(what));
        }
        Ok(v.chunks_exact(3)
            .filter_map(|c| match *c {
                [ipa, pa, size] => Some(GuestRegion {
                    ipa: Ipa::new(ipa),
                    pa: PhysAddr::new(pa),
                    size,
                }),
                _ => None,
            })
            .collect())
    }

    /// The image of properties `<what>` (staged: `<pa size>`) or `<what>-fw-cfg` (the
    /// name of a file of the fw-cfg device, looked up in `files`), going to IPA
    /// `<what>-ipa`.
    fn image(&self, what: Img, files: &[FwCfgFile]) -> Result<Option<Image>, DescError> {
        let staged = self.u64_list(what.staged, "image must be <pa(2 cells) size(2 cells)>")?;
        let fetched = self
            .get(what.fw_cfg)
            .map(|v| string(v).ok_or_else(|| self.err("an -fw-cfg image is not a string")))
            .transpose()?;
        let (src, size) = match (staged, fetched) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(self.err("an image is given both staged and as an fw-cfg file"))
            }
            (Some(v), None) => {
                let [pa, size] = v[..] else {
                    return Err(self.err("image must be <pa(2 cells) size(2 cells)>"));
                };
                (ImageSource::Staged(PhysAddr::new(pa)), size)
            }
            (None, Some(name)) => {
                let file = super::fw_cfg::find(files, &name).ok_or_else(|| {
                    self.err(
                        "an -fw-cfg image names no file of the fw-cfg device (QEMU: -fw_cfg \
                         name=...,file=...; the start-up log says whether the device is usable)",
                    )
                })?;
                (ImageSource::FwCfg(file.select), u64::from(file.size))
            }
        };
        let ipa = self
            .one_u64(what.ipa, "image IPA must be one 64-bit value")?
            .ok_or_else(|| self.err("image without its -ipa property"))?;
        Ok(Some(Image {
            src,
            size,
            ipa: Ipa::new(ipa),
        }))
    }
}

fn check_regions(
    node: &Node<'_>,
    regions: &[GuestRegion],
    what: &'static str,
) -> Result<(), DescError> {
    for (i, r) in regions.iter().enumerate() {
        if r.size == 0
            || !r.ipa.is_aligned(PAGE_SIZE)
            || !r.pa.is_aligned(PAGE_SIZE)
            || !aligned(r.size)
            || r.ipa.checked_add(r.size).is_none()
            || r.pa.checked_add(r.size).is_none()
        {
            return Err(node.err(what));
        }
        if regions
            .iter()
            .take(i)
            .any(|o| o.ipa_range().overlaps(&r.ipa_range()))
        {
            return Err(node.err("regions overlap in IPA space"));
        }
    }
    Ok(())
}

fn string_list(bytes: &[u8]) -> Option<Vec<String>> {
    let s = bytes.strip_suffix(&[0])?;
    s.split(|b| *b == 0)
        .map(|part| core::str::from_utf8(part).ok().map(ToString::to_string))
        .collect()
}

/// The host's physical ranges a description is checked against.
#[derive(Clone, Copy, Debug)]
pub struct HostRanges<'a> {
    /// All host RAM: a pass-through range may not touch it.
    pub ram: &'a [PhysRange],
    /// Where QEMU stages guest images: every image must lie inside.
    pub staging: PhysRange,
    /// The hypervisor's console UART: never assigned to a VM.
    pub console: Option<PhysRange>,
    /// The files of QEMU's fw-cfg device, for images given by name (empty when the
    /// device is missing or unusable).
    pub files: &'a [FwCfgFile],
}

/// The property names of one image of a VM node.
#[derive(Clone, Copy)]
struct Img {
    staged: &'static str,
    fw_cfg: &'static str,
    ipa: &'static str,
}

impl Img {
    const KERNEL: Self = Self {
        staged: "kernel",
        fw_cfg: "kernel-fw-cfg",
        ipa: "kernel-ipa",
    };
    const INITRD: Self = Self {
        staged: "initrd",
        fw_cfg: "initrd-fw-cfg",
        ipa: "initrd-ipa",
    };
    const DTB: Self = Self {
        staged: "dtb",
        fw_cfg: "dtb-fw-cfg",
        ipa: "dtb-ipa",
    };
}

fn parse_vm(
    node: &Node<'_>,
    host: &fdt::Fdt<'_>,
    ranges: &HostRanges<'_>,
) -> Result<VmDesc, DescError> {
    let name = match node.get("vm-name") {
        Some(v) => string(v).ok_or_else(|| node.err("vm-name is not a string"))?,
        None => node.name.to_string(),
    };
    if name.is_empty() || name.len() > MAX_NAME || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(node.err("vm-name must be 1-32 printable ASCII characters"));
    }
    let cpus = u32s(
        node.get("cpus")
            .ok_or_else(|| node.err("no cpus property"))?,
    )
    .ok_or_else(|| node.err("cpus must be a list of 32-bit cells"))?;
    if cpus.is_empty() {
        return Err(node.err("cpus is empty"));
    }
    if cpus
        .iter()
        .enumerate()
        .any(|(i, c)| cpus.iter().take(i).any(|o| o == c))
    {
        return Err(node.err("a physical CPU is named twice in cpus"));
    }
    let memory = node.regions(
        "memory",
        "memory must be <ipa pa size> triples of 64-bit values",
    )?;
    if memory.is_empty() {
        return Err(node.err("no memory"));
    }
    check_regions(
        node,
        &memory,
        "memory region not page-aligned, empty or overflowing",
    )?;
    let mut passthrough = node.regions(
        "passthrough",
        "passthrough must be <ipa pa size> triples of 64-bit values",
    )?;
    let devices = match node.get("passthrough-devices") {
        None => Vec::new(),
        Some(v) => string_list(v)
            .ok_or_else(|| node.err("passthrough-devices must be a list of strings"))?,
    };
    let mut spis = Vec::new();
    if !devices.is_empty() {
        let paths: Vec<&str> = devices.iter().map(String::as_str).collect();
        // Without an SMMU a DMA master reaches any physical address: only a VM whose
        // guest-physical addresses are the physical ones can drive it, and that VM is
        // trusted with the machine's memory (docs/interrupts.md, "Device assignment").
        // (Identity: the IPA's value is the PA's.)
        if super::devices::any_dma_capable(host, &paths)
            && memory.iter().any(|m| m.ipa.get() != m.pa.get())
        {
            return Err(node.err(
                "a DMA-capable device is only given to a VM whose RAM is identity-mapped \
                 (IPA = PA): there is no SMMU, and that VM is trusted with memory",
            ));
        }
        spis = super::devices::passthrough_spis(host, &paths).map_err(|e| match e {
            super::devices::DeviceError::NotAnSpi(_) => node.err(
                "passthrough-devices: a device has an interrupt that is not a GIC SPI (a PPI \
                 belongs to every CPU; another controller's line is not a GIC interrupt)",
            ),
            super::devices::DeviceError::SharedSpi(_) => node.err(
                "passthrough-devices: a device shares its interrupt (SPI) with a host node \
                 the VM is not given, such as the hypervisor's console",
            ),
            super::devices::DeviceError::InterruptController(_) => node.err(
                "the GIC and its ITS are never assigned to a VM: EL2 owns interrupts, \
                 each VM has a virtual GIC",
            ),
            _ => node.err("passthrough-devices names no top-level host device"),
        })?;
        let regions = super::devices::passthrough_regions(host, &paths).map_err(|e| match e {
            super::devices::DeviceError::InterruptController(_) => node.err(
                "the GIC and its ITS are never assigned to a VM: EL2 owns interrupts, \
                     each VM has a virtual GIC",
            ),
            _ => node.err("passthrough-devices names no top-level host device"),
        })?;
        // Identity-mapped: each device's IPA is its PA.
        passthrough.extend(regions.iter().map(|r| GuestRegion {
            ipa: Ipa::new(r.base.get()),
            pa: r.base,
            size: r.size,
        }));
    }
    check_regions(
        node,
        &passthrough,
        "passthrough range not page-aligned, empty or overflowing",
    )?;
    // EL2 owns the interrupt controller (a guest with the GIC could reach every VM's
    // interrupts, and the ITS is a DMA master) and the console it prints every VM's
    // lines on.
    let gic = super::devices::gic_regions(host);
    let fw_cfg = super::devices::fw_cfg_regions(host);
    for p in &passthrough {
        let range = p.pa_range();
        if gic.iter().any(|g| range.overlaps(g)) {
            return Err(node.err(
                "the GIC and its ITS are never assigned to a VM: EL2 owns interrupts, each VM \
                 has a virtual GIC",
            ));
        }
        if ranges.console.is_some_and(|c| range.overlaps(&c)) {
            return Err(node.err(
                "the hypervisor's console UART is never assigned to a VM: each VM has a \
                 virtual PL011 (vuart)",
            ));
        }
        if fw_cfg.iter().any(|f| range.overlaps(f)) {
            return Err(node.err(
                "QEMU's fw-cfg device is never assigned to a VM: the hypervisor fetches \
                 images through it, and it is a DMA master",
            ));
        }
    }
    for p in &passthrough {
        if ranges.ram.iter().any(|r| r.overlaps(&p.pa_range())) {
            return Err(node.err("passthrough range covers host RAM"));
        }
        if memory
            .iter()
            .any(|m| m.ipa_range().overlaps(&p.ipa_range()))
        {
            return Err(node.err("passthrough range overlaps memory in IPA space"));
        }
        if memory.iter().any(|m| m.pa_range().overlaps(&p.pa_range())) {
            return Err(node.err("passthrough range overlaps memory in PA space"));
        }
    }
    let kernel = node
        .image(Img::KERNEL, ranges.files)?
        .ok_or_else(|| node.err("no kernel"))?;
    let initrd = node.image(Img::INITRD, ranges.files)?;
    let dtb = node.image(Img::DTB, ranges.files)?;
    let images = [Some(kernel), initrd, dtb];
    for (i, img) in images.iter().enumerate() {
        let Some(img) = img else { continue };
        if img.size == 0
            || !memory
                .iter()
                .any(|r| r.ipa_range().contains(&img.ipa_range()))
        {
            return Err(node.err("image is empty or not inside one memory region"));
        }
        if img
            .staged_range()
            .is_some_and(|r| !ranges.staging.contains(&r))
        {
            return Err(node.err("image is not inside the staging area"));
        }
        if images
            .iter()
            .take(i)
            .flatten()
            .any(|o| o.ipa_range().overlaps(&img.ipa_range()))
        {
            return Err(node.err("images overlap in the guest"));
        }
    }
    let entry = node
        .one_u64("entry", "entry must be one 64-bit value")?
        .map_or(kernel.ipa, Ipa::new);
    let first_instruction = IpaRange::new(entry, 4);
    if !memory
        .iter()
        .any(|r| r.ipa_range().contains(&first_instruction))
        || !entry.is_aligned(4)
    {
        return Err(node.err("entry is not an aligned IPA inside memory"));
    }
    let bootargs = node
        .get("bootargs")
        .map(|v| string(v).ok_or_else(|| node.err("bootargs is not a string")))
        .transpose()?;
    let arg = node
        .one_u64("arg", "arg must be one 64-bit value")?
        .unwrap_or(0);
    let abort = match node.get("abort-policy").map(string) {
        None => AbortPolicy::Stop,
        Some(Some(s)) if s == "stop" => AbortPolicy::Stop,
        Some(Some(s)) if s == "inject" => AbortPolicy::Inject,
        Some(_) => return Err(node.err("abort-policy must be \"stop\" or \"inject\"")),
    };
    let stage2 = match node.get("stage2-mappings").map(string) {
        None => Stage2Mappings::Blocks,
        Some(Some(s)) if s == "blocks" => Stage2Mappings::Blocks,
        Some(Some(s)) if s == "pages" => Stage2Mappings::Pages,
        Some(_) => return Err(node.err("stage2-mappings must be \"blocks\" or \"pages\"")),
    };
    let gic = GicIpa {
        dist: node
            .one_u64("gic-distributor", "gic-distributor must be one 64-bit IPA")?
            .map_or(GicIpa::QEMU_VIRT.dist, Ipa::new),
        redist: node
            .one_u64(
                "gic-redistributors",
                "gic-redistributors must be one 64-bit IPA",
            )?
            .map_or(GicIpa::QEMU_VIRT.redist, Ipa::new),
    };
    let gic_frames = [gic.dist_range(), gic.redist_range(cpus.len())];
    let taken = |range: &IpaRange| {
        memory
            .iter()
            .chain(&passthrough)
            .any(|r| r.ipa_range().overlaps(range))
    };
    for frame in &gic_frames {
        if !frame.base.is_aligned(0x1_0000)
            || frame.base.checked_add(frame.size).is_none()
            || taken(frame)
        {
            return Err(node
                .err("the GIC distributor and redistributors must be free, 64 KiB aligned IPAs"));
        }
    }
    let [dist, redist] = &gic_frames;
    if dist.overlaps(redist) {
        return Err(node.err("the GIC distributor overlaps the redistributors"));
    }
    let vuart = node
        .one_u64("vuart", "vuart must be one 64-bit IPA")?
        .map(Ipa::new);
    if vuart.is_some() && spis.contains(&VUART_INTID) {
        return Err(
            node.err("a passed-through device uses SPI INTID 33, the virtual UART's interrupt")
        );
    }
    if let Some(u) = vuart {
        let page = IpaRange::new(u, PAGE_SIZE);
        if !u.is_aligned(PAGE_SIZE)
            || u.checked_add(PAGE_SIZE).is_none()
            || taken(&page)
            || gic_frames.iter().any(|f| f.overlaps(&page))
        {
            return Err(node.err("vuart must be a free, page-aligned IPA"));
        }
    }
    let console_input = node.get("console-input").is_some();
    if console_input && vuart.is_none() {
        return Err(node.err("console-input needs a vuart"));
    }
    let defaults = SharingLimits::default();
    let sharing = SharingLimits {
        owned: node
            .one_u32(
                "sharing-max-owned",
                SharingLimits::MAX,
                "sharing-max-owned must be one 32-bit cell, at most 256",
            )?
            .unwrap_or(defaults.owned),
        received: node
            .one_u32(
                "sharing-max-received",
                SharingLimits::MAX,
                "sharing-max-received must be one 32-bit cell, at most 256",
            )?
            .unwrap_or(defaults.received),
    };
    Ok(VmDesc {
        sharing,
        name,
        cpus,
        memory,
        kernel,
        entry,
        initrd,
        dtb,
        bootargs,
        arg,
        abort,
        stage2,
        vuart,
        console_input,
        gic,
        passthrough,
        devices,
        spis,
    })
}

/// Parses every VM node under `/chosen` of `dt`, checks each against the host's `ranges`
/// and against each other (distinct names, no physical CPU or RAM page given to two VMs).
/// What is checked here is not checked again when the VMs are created.
///
/// # Errors
///
/// [`DescError::Invalid`] naming the first broken rule.
pub fn parse(dt: &HostDt<'_>, ranges: &HostRanges<'_>) -> Result<Vec<VmDesc>, DescError> {
    let fdt = dt.fdt();
    let Some(chosen) = super::find_path(fdt, "/chosen") else {
        return Ok(Vec::new());
    };
    let mut vms: Vec<VmDesc> = Vec::new();
    for child in chosen.children() {
        let node = Node {
            name: child.name,
            props: child.properties().map(|p| (p.name, p.value)).collect(),
        };
        let is_vm = node
            .get("compatible")
            .is_some_and(|c| c.split(|b| *b == 0).any(|s| s == COMPATIBLE.as_bytes()));
        if !is_vm {
            continue;
        }
        let vm = parse_vm(&node, fdt, ranges)?;
        for other in &vms {
            if other.name == vm.name {
                return Err(node.err("two VMs have the same name"));
            }
            if other.cpus.iter().any(|c| vm.cpus.contains(c)) {
                return Err(node.err("a physical CPU is given to two VMs"));
            }
            if other.console_input && vm.console_input {
                return Err(node.err("console input is given to two VMs"));
            }
            if other.spis.iter().any(|i| vm.spis.contains(i)) {
                return Err(node.err("an interrupt (SPI) is given to two VMs"));
            }
            if other.passthrough.iter().any(|a| {
                vm.passthrough
                    .iter()
                    .any(|b| a.pa_range().overlaps(&b.pa_range()))
            }) {
                return Err(node.err("a device range is given to two VMs"));
            }
            if other.memory.iter().any(|a| {
                vm.memory
                    .iter()
                    .any(|b| a.pa_range().overlaps(&b.pa_range()))
            }) {
                return Err(node.err("RAM overlaps another VM's RAM"));
            }
        }
        vms.push(vm);
    }
    Ok(vms)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_fdt::FdtWriter;

    /// The VM descriptions of `blob` as the machine reads them; `None` when the blob is
    /// not a device tree at all.
    pub(crate) fn parse_blob(blob: &[u8]) -> Option<Result<Vec<VmDesc>, DescError>> {
        let blob = Box::leak(blob.to_vec().into_boxed_slice());
        let ranges = HostRanges {
            ram: &[PhysRange::new(PhysAddr::new(0x4000_0000), 0x8000_0000)],
            staging: crate::mem::layout::STAGING,
            console: Some(PhysRange::new(PhysAddr::new(0x0900_0000), 0x1000)),
            files: Box::leak(
                vec![FwCfgFile {
                    name: "opt/twostage/kernel".into(),
                    select: 0x20,
                    size: 0x3000,
                }]
                .into_boxed_slice(),
            ),
        };
        HostDt::new(blob).ok().map(|dt| super::parse(&dt, &ranges))
    }

    fn parse(blob: &[u8]) -> Result<Vec<VmDesc>, DescError> {
        parse_blob(blob).expect("a device tree")
    }

    /// Property values for one test VM node.
    pub(crate) type Props = Vec<(&'static str, Vec<u8>)>;

    pub(crate) fn cells64(v: &[u64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_be_bytes()).collect()
    }

    pub(crate) fn cells32(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_be_bytes()).collect()
    }

    pub(crate) fn str_prop(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    /// A valid test-guest VM: 1 MiB RAM at IPA 0x4000_0000 backed by `pa`.
    pub(crate) fn vm_props(pa: u64, cpu: u32) -> Props {
        vec![
            ("compatible", str_prop(COMPATIBLE)),
            ("cpus", cells32(&[cpu])),
            ("memory", cells64(&[0x4000_0000, pa, 0x10_0000])),
            ("kernel", cells64(&[0x7000_0000, 0x2000])),
            ("kernel-ipa", cells64(&[0x4000_0000])),
            ("vuart", cells64(&[0x0900_0000])),
        ]
    }

    pub(crate) fn dtb(vms: &[(&str, Props)]) -> Vec<u8> {
        let mut w = FdtWriter::new().expect("writer");
        let root = w.begin_node("").expect("root");
        let chosen = w.begin_node("chosen").expect("chosen");
        w.property_string("bootargs", "host").expect("prop");
        let other = w.begin_node("not-a-vm").expect("node");
        w.property_string("compatible", "something,else")
            .expect("prop");
        w.end_node(other).expect("end");
        for (name, props) in vms {
            let n = w.begin_node(name).expect("vm node");
            for (k, v) in props {
                w.property(k, v).expect("prop");
            }
            w.end_node(n).expect("end");
        }
        w.end_node(chosen).expect("end");
        w.end_node(root).expect("end");
        w.finish().expect("finish")
    }

    fn with(mut p: Props, key: &'static str, val: Vec<u8>) -> Props {
        p.retain(|(k, _)| *k != key);
        p.push((key, val));
        p
    }

    fn without(mut p: Props, key: &str) -> Props {
        p.retain(|(k, _)| *k != key);
        p
    }

    fn rejected(p: Props) -> &'static str {
        match parse(&dtb(&[("vm0", p)])) {
            Err(DescError::Invalid { what, .. }) => what,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn pa_of_an_ipa_range_inside_a_region_only() {
        let r = GuestRegion {
            ipa: Ipa::new(0x4000_0000),
            pa: PhysAddr::new(0x5000_0000),
            size: 0x10_0000,
        };
        assert_eq!(
            r.pa_of(Ipa::new(0x4000_0000), 0x10_0000),
            Some(PhysAddr::new(0x5000_0000))
        );
        assert_eq!(
            r.pa_of(Ipa::new(0x4000_3000), 0x1000),
            Some(PhysAddr::new(0x5000_3000))
        );
        assert_eq!(
            r.pa_of(Ipa::new(0x4000_3000), 0x10_0000),
            None,
            "runs past the end"
        );
        assert_eq!(r.pa_of(Ipa::new(0x3fff_f000), 0x2000), None, "starts below");
        assert_eq!(r.pa_of(Ipa::new(u64::MAX), 2), None);
        // A region whose PA range would pass 2^64 (the description's checks refuse
        // it): only the part that ends below 2^64 has a PA.
        let top = GuestRegion {
            ipa: Ipa::new(0),
            pa: PhysAddr::new(u64::MAX - 0x1fff),
            size: 0x3000,
        };
        assert_eq!(
            top.pa_of(Ipa::new(0), 0x1000),
            Some(PhysAddr::new(u64::MAX - 0x1fff))
        );
        assert_eq!(top.pa_of(Ipa::new(0x1000), 0x1000), None);
        assert_eq!(top.pa_of(Ipa::new(0x2000), 0x1000), None);
    }

    #[test]
    fn parses_two_vms() {
        let a = with(vm_props(0x5000_0000, 1), "vm-name", str_prop("alpha"));
        let b = with(
            with(
                with(vm_props(0x5010_0000, 2), "abort-policy", str_prop("inject")),
                "stage2-mappings",
                str_prop("pages"),
            ),
            "arg",
            cells64(&[1]),
        );
        let vms = parse(&dtb(&[("a", a), ("b", b)])).expect("valid");
        assert_eq!(vms.len(), 2);
        assert_eq!(vms[0].name, "alpha");
        assert_eq!(vms[1].name, "b");
        assert_eq!(vms[0].cpus, vec![1]);
        assert_eq!(
            vms[0].memory,
            vec![GuestRegion {
                ipa: Ipa::new(0x4000_0000),
                pa: PhysAddr::new(0x5000_0000),
                size: 0x10_0000
            }]
        );
        assert_eq!(
            vms[0].kernel,
            Image {
                src: ImageSource::Staged(PhysAddr::new(0x7000_0000)),
                size: 0x2000,
                ipa: Ipa::new(0x4000_0000)
            }
        );
        assert_eq!(vms[0].entry, Ipa::new(0x4000_0000));
        assert_eq!(vms[0].abort, AbortPolicy::Stop);
        assert_eq!(vms[0].stage2, Stage2Mappings::Blocks);
        assert_eq!(vms[1].stage2, Stage2Mappings::Pages);
        assert_eq!(vms[1].abort, AbortPolicy::Inject);
        assert_eq!(vms[0].vuart, Some(Ipa::new(0x0900_0000)));
        assert_eq!(vms[1].boot_x0(), 1);
        assert_eq!(vms[0].ram_size(), 0x10_0000);
        assert_eq!(vms[0].sharing, SharingLimits::default());
    }

    #[test]
    fn sharing_limits() {
        let p = with(
            with(vm_props(0x5000_0000, 1), "sharing-max-owned", cells32(&[3])),
            "sharing-max-received",
            cells32(&[0]),
        );
        let vms = parse(&dtb(&[("a", p)])).expect("valid");
        assert_eq!(
            vms[0].sharing,
            SharingLimits {
                owned: 3,
                received: 0
            }
        );
        for (key, bad) in [
            ("sharing-max-owned", cells32(&[257])),
            ("sharing-max-owned", cells32(&[1, 2])),
            ("sharing-max-received", cells64(&[1])),
            ("sharing-max-received", vec![0, 1]),
            ("sharing-max-received", vec![]),
        ] {
            let what = rejected(with(vm_props(0x5000_0000, 1), key, bad));
            assert!(what.starts_with(key), "{what}");
        }
    }

    #[test]
    fn an_image_given_by_fw_cfg_name_takes_the_files_select_and_size() {
        let p = || without(vm_props(0x5000_0000, 1), "kernel");
        let vms = parse(&dtb(&[(
            "vm0",
            with(p(), "kernel-fw-cfg", str_prop("opt/twostage/kernel")),
        )]))
        .expect("valid");
        assert_eq!(
            vms[0].kernel,
            Image {
                src: ImageSource::FwCfg(0x20),
                size: 0x3000,
                ipa: Ipa::new(0x4000_0000)
            }
        );
        assert_eq!(vms[0].kernel.staged_range(), None);
        assert!(
            rejected(with(p(), "kernel-fw-cfg", str_prop("opt/twostage/initrd")))
                .starts_with("an -fw-cfg image names no file of the fw-cfg device")
        );
        assert_eq!(
            rejected(with(
                vm_props(0x5000_0000, 1),
                "kernel-fw-cfg",
                str_prop("opt/twostage/kernel")
            )),
            "an image is given both staged and as an fw-cfg file"
        );
        assert_eq!(
            rejected(with(p(), "kernel-fw-cfg", vec![0xff, 0xfe, 0])),
            "an -fw-cfg image is not a string"
        );
        // The file's size is checked like a staged image's: it must fit in RAM (1 MiB
        // from 0x4000_0000 here).
        let late = with(
            with(p(), "kernel-fw-cfg", str_prop("opt/twostage/kernel")),
            "kernel-ipa",
            cells64(&[0x400f_e000]),
        );
        assert_eq!(
            rejected(late),
            "image is empty or not inside one memory region"
        );
    }

    #[test]
    fn linux_style_vm() {
        let p = vec![
            ("compatible", str_prop(COMPATIBLE)),
            ("vm-name", str_prop("linux")),
            ("cpus", cells32(&[2, 3])),
            ("memory", cells64(&[0x5000_0000, 0x5000_0000, 0x1000_0000])),
            ("kernel", cells64(&[0x7000_0000, 0x200_0000])),
            ("kernel-ipa", cells64(&[0x5020_0000])),
            ("initrd", cells64(&[0x7400_0000, 0x10_0000])),
            ("initrd-ipa", cells64(&[0x5800_0000])),
            ("dtb", cells64(&[0x7800_0000, 0x1_0000])),
            ("dtb-ipa", cells64(&[0x5f00_0000])),
            ("bootargs", str_prop("console=ttyAMA0 rdinit=/init")),
            ("passthrough", cells64(&[0x0a00_0000, 0x0a00_0000, 0x1000])),
        ];
        let vms = parse(&dtb(&[("vm-linux", p)])).expect("valid");
        let v = &vms[0];
        assert_eq!(v.cpus, vec![2, 3]);
        assert_eq!(v.boot_x0(), 0x5f00_0000);
        assert_eq!(v.entry, Ipa::new(0x5020_0000));
        assert_eq!(v.bootargs.as_deref(), Some("console=ttyAMA0 rdinit=/init"));
        assert_eq!(v.initrd.map(|i| i.ipa), Some(Ipa::new(0x5800_0000)));
        assert_eq!(v.passthrough.len(), 1);
        assert_eq!(v.vuart, None);
    }

    #[test]
    fn host_ranges_and_other_vms_are_respected() {
        let p = || vm_props(0x5000_0000, 1);
        assert_eq!(
            rejected(with(p(), "kernel", cells64(&[0x5030_0000, 0x2000]))),
            "image is not inside the staging area"
        );
        assert_eq!(
            rejected(with(
                p(),
                "passthrough",
                cells64(&[0x0a00_0000, 0x4800_0000, 0x1000])
            )),
            "passthrough range covers host RAM"
        );
        let two = parse(&dtb(&[
            ("a", vm_props(0x5000_0000, 1)),
            ("b", vm_props(0x5010_0000, 1)),
        ]));
        assert!(
            matches!(two, Err(DescError::Invalid { what, .. }) if what.contains("CPU is given to two")),
            "{two:?}"
        );
    }

    #[test]
    fn rejects_bad_vms() {
        let p = || vm_props(0x5000_0000, 1);
        rejected(without(p(), "cpus"));
        rejected(with(p(), "cpus", vec![]));
        rejected(with(p(), "cpus", cells32(&[1, 1])));
        rejected(without(p(), "memory"));
        rejected(with(p(), "memory", cells64(&[0x4000_0000, 0x5000_0000])));
        rejected(with(
            p(),
            "memory",
            cells64(&[0x4000_0000, 0x5000_0100, 0x10_0000]),
        ));
        rejected(with(p(), "memory", cells64(&[0x4000_0000, 0x5000_0000, 0])));
        rejected(with(p(), "memory", cells64(&[!0xfff, 0x5000_0000, 0x2000])));
        rejected(with(
            p(),
            "memory",
            cells64(&[
                0x4000_0000,
                0x5000_0000,
                0x2000,
                0x4000_1000,
                0x5100_0000,
                0x1000,
            ]),
        ));
        rejected(without(p(), "kernel"));
        rejected(without(p(), "kernel-ipa"));
        rejected(with(p(), "kernel-ipa", cells64(&[0x400f_f000])));
        rejected(with(p(), "kernel", cells64(&[0x7000_0000, 0])));
        rejected(with(p(), "entry", cells64(&[0x3000_0000])));
        rejected(with(p(), "entry", cells64(&[0x4000_0002])));
        rejected(with(p(), "abort-policy", str_prop("ignore")));
        rejected(with(p(), "stage2-mappings", str_prop("huge")));
        rejected(with(p(), "vuart", cells64(&[0x4000_0000])));
        rejected(with(p(), "vuart", cells64(&[0x0900_0010])));
        rejected(with(p(), "vm-name", str_prop("")));
        rejected(with(p(), "vm-name", str_prop("has space")));
        rejected(with(
            p(),
            "passthrough",
            cells64(&[0x4000_0000, 0x0900_0000, 0x1000]),
        ));
        rejected(with(
            p(),
            "passthrough",
            cells64(&[0x0a00_0000, 0x5000_0000, 0x1000]),
        ));
        rejected(with(p(), "initrd", cells64(&[0x7100_0000, 0x1000])));
        rejected(with(
            with(p(), "initrd", cells64(&[0x7100_0000, 0x1000])),
            "initrd-ipa",
            cells64(&[0x4000_1000]),
        ));
    }

    #[test]
    fn rejects_conflicts_between_vms() {
        let a = vm_props(0x5000_0000, 1);
        let same_cpu = vm_props(0x5010_0000, 1);
        let same_ram = vm_props(0x500f_f000, 2);
        assert!(parse(&dtb(&[("a", a.clone()), ("b", same_cpu)])).is_err());
        assert!(parse(&dtb(&[("a", a.clone()), ("b", same_ram)])).is_err());
        assert!(parse(&dtb(&[("a", a.clone()), ("a", vm_props(0x5100_0000, 3))])).is_err());
        assert!(parse(&dtb(&[("a", a), ("b", vm_props(0x5010_0000, 2))])).is_ok());
    }

    #[test]
    fn no_vms_and_bad_blob() {
        assert_eq!(parse(&dtb(&[])), Ok(Vec::new()));
        assert_eq!(parse_blob(&[0u8; 64]), None);
        assert_eq!(parse_blob(&[]), None);
    }

    #[test]
    fn passthrough_devices_become_identity_ranges() {
        let mut w = FdtWriter::new().expect("writer");
        let root = w.begin_node("").expect("root");
        w.property_u32("#address-cells", 2).expect("prop");
        w.property_u32("#size-cells", 2).expect("prop");
        let uart = w.begin_node("uart@9040000").expect("node");
        w.property("reg", &cells64(&[0x0904_0000, 0x1000]))
            .expect("prop");
        w.end_node(uart).expect("end");
        let chosen = w.begin_node("chosen").expect("chosen");
        let vm = w.begin_node("vm").expect("vm");
        let mut props = vm_props(0x5000_0000, 1);
        props.retain(|(k, _)| *k != "vuart");
        for (k, v) in &props {
            w.property(k, v).expect("prop");
        }
        w.property("passthrough-devices", b"/uart@9040000\0")
            .expect("prop");
        w.end_node(vm).expect("end");
        w.end_node(chosen).expect("end");
        w.end_node(root).expect("end");
        let blob = w.finish().expect("finish");
        let v = parse(&blob).expect("valid").remove(0);
        assert_eq!(v.devices, ["/uart@9040000"]);
        assert_eq!(
            v.passthrough,
            [GuestRegion {
                ipa: Ipa::new(0x0904_0000),
                pa: PhysAddr::new(0x0904_0000),
                size: 0x1000
            }]
        );
        // A path the host does not have rejects the description.
        let bad = blob
            .windows(13)
            .position(|w| w == b"/uart@9040000")
            .expect("path in blob");
        let mut broken = blob.clone();
        broken[bad + 1] = b'x';
        assert!(matches!(parse(&broken), Err(DescError::Invalid { .. })));
    }

    /// A host tree with a GICv3 (phandle 1, every node's interrupt parent, and its ITS
    /// below it), the console UART, an RTC with SPI 2 and a PMU with a PPI, and one VM
    /// node per entry of `vms` (VM *i* on CPU *i* + 1 with the extra properties `vms[i]`).
    fn host_with_gic_vms(vms: &[&[(&str, Vec<u8>)]]) -> Vec<u8> {
        let mut w = FdtWriter::new().expect("writer");
        let root = w.begin_node("").expect("root");
        w.property_u32("#address-cells", 2).expect("prop");
        w.property_u32("#size-cells", 2).expect("prop");
        w.property_u32("interrupt-parent", 1).expect("prop");
        let gic = w.begin_node("intc@8000000").expect("node");
        w.property_string("compatible", "arm,gic-v3").expect("prop");
        w.property_u32("phandle", 1).expect("prop");
        w.property(
            "reg",
            &cells64(&[0x0800_0000, 0x1_0000, 0x080a_0000, 0xf6_0000]),
        )
        .expect("prop");
        w.property_u32("#address-cells", 2).expect("prop");
        w.property_u32("#size-cells", 2).expect("prop");
        w.property_null("ranges").expect("prop");
        let its = w.begin_node("its@8080000").expect("node");
        w.property_string("compatible", "arm,gic-v3-its")
            .expect("prop");
        w.property("reg", &cells64(&[0x0808_0000, 0x2_0000]))
            .expect("prop");
        w.end_node(its).expect("end");
        w.end_node(gic).expect("end");
        let uart = w.begin_node("pl011@9000000").expect("node");
        w.property("reg", &cells64(&[0x0900_0000, 0x1000]))
            .expect("prop");
        w.end_node(uart).expect("end");
        // Two fw-cfg nodes, one with a register block of size 0: both are refused.
        for (name, base, size) in [
            ("fw-cfg@9020000", 0x0902_0000, 0x18),
            ("fw-cfg@9030000", 0x0903_0000, 0),
        ] {
            let fw_cfg = w.begin_node(name).expect("node");
            w.property_string("compatible", "qemu,fw-cfg-mmio")
                .expect("prop");
            w.property("reg", &cells64(&[base, size])).expect("prop");
            w.end_node(fw_cfg).expect("end");
        }
        for (name, base, irq) in [
            ("rtc@9010000", 0x0901_0000, [0, 2, 4]),
            ("pmu", 0, [1, 7, 4]),
        ] {
            let dev = w.begin_node(name).expect("node");
            if base != 0 {
                w.property("reg", &cells64(&[base, 0x1000])).expect("prop");
            }
            w.property("interrupts", &cells32(&irq)).expect("prop");
            w.end_node(dev).expect("end");
        }
        let virtio = w.begin_node("virtio_mmio@a003e00").expect("node");
        w.property_string("compatible", "virtio,mmio")
            .expect("prop");
        w.property("reg", &cells64(&[0x0a00_3e00, 0x200]))
            .expect("prop");
        w.property("interrupts", &cells32(&[0, 0x2f, 1]))
            .expect("prop");
        w.property_null("dma-coherent").expect("prop");
        w.end_node(virtio).expect("end");
        let chosen = w.begin_node("chosen").expect("chosen");
        for (i, extra) in vms.iter().enumerate() {
            let node = w.begin_node(&format!("vm{i}")).expect("vm");
            let mut props = vm_props(0x5000_0000 + 0x10_0000 * i as u64, 1 + i as u32);
            props.retain(|(k, _)| *k != "vuart" && !extra.iter().any(|(e, _)| e == k));
            for (k, v) in props
                .iter()
                .map(|(k, v)| (*k, v))
                .chain(extra.iter().map(|(k, v)| (*k, v)))
            {
                w.property(k, v).expect("prop");
            }
            w.end_node(node).expect("end");
        }
        w.end_node(chosen).expect("end");
        w.end_node(root).expect("end");
        w.finish().expect("finish")
    }

    fn host_with_gic(vm: &[(&str, Vec<u8>)]) -> Vec<u8> {
        host_with_gic_vms(&[vm])
    }

    #[test]
    fn a_devices_spis_are_its_vms_only() {
        let rtc = [("passthrough-devices", str_prop("/rtc@9010000"))];
        let vms = parse(&host_with_gic(&rtc)).expect("valid");
        assert_eq!(vms[0].spis, [34]);
        let err = parse(&host_with_gic_vms(&[&rtc, &rtc])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VM node /chosen/vm1: an interrupt (SPI) is given to two VMs"
        );
        let raw = [("passthrough", cells64(&[0x0a00_0000, 0x0901_0000, 0x1000]))];
        let err = parse(&host_with_gic_vms(&[&rtc, &raw])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VM node /chosen/vm1: a device range is given to two VMs"
        );
        let pmu = [("passthrough-devices", str_prop("/pmu"))];
        assert!(parse(&host_with_gic(&pmu))
            .unwrap_err()
            .to_string()
            .contains("an interrupt that is not a GIC SPI"));
    }

    #[test]
    fn a_dma_master_goes_only_to_an_identity_mapped_vm() {
        let virtio = ("passthrough-devices", str_prop("/virtio_mmio@a003e00"));
        // vm_props maps IPA 0x4000_0000 to another PA: refused.
        let err = parse(&host_with_gic(std::slice::from_ref(&virtio))).unwrap_err();
        assert!(
            err.to_string().contains(
                "a DMA-capable device is only given to a VM whose RAM is identity-mapped"
            ),
            "{err}"
        );
        let identity = ("memory", cells64(&[0x5000_0000, 0x5000_0000, 0x10_0000]));
        let entry = [virtio, identity, ("kernel-ipa", cells64(&[0x5000_0000]))];
        let vms = parse(&host_with_gic(&entry)).expect("valid");
        assert_eq!(vms[0].spis, [79]);
        assert_eq!(vms[0].passthrough[0].pa, PhysAddr::new(0x0a00_3000));
    }

    #[test]
    fn the_gic_its_and_console_are_never_assigned() {
        let why = |vm: &[(&str, Vec<u8>)]| match parse(&host_with_gic(vm)) {
            Err(DescError::Invalid { what, .. }) => what,
            other => panic!("expected a rejection, got {other:?}"),
        };
        let gic_rule = "the GIC and its ITS are never assigned to a VM";
        assert!(why(&[("passthrough-devices", str_prop("/intc@8000000"))]).starts_with(gic_rule));
        // The ITS alone, or the redistributors, as raw ranges.
        for (ipa, size) in [(0x0808_0000, 0x1000), (0x0810_0000, 0x2_0000)] {
            let raw = cells64(&[0x1000_0000, ipa, size]);
            assert!(
                why(&[("passthrough", raw)]).starts_with(gic_rule),
                "{ipa:#x}"
            );
        }
        let console = cells64(&[0x1000_0000, 0x0900_0000, 0x1000]);
        assert!(why(&[("passthrough", console.clone())])
            .starts_with("the hypervisor's console UART is never assigned"));
        assert!(why(&[("passthrough-devices", str_prop("/pl011@9000000"))])
            .starts_with("the hypervisor's console UART is never assigned"));
        let fw_cfg_rule = "QEMU's fw-cfg device is never assigned to a VM";
        for pa in [0x0902_0000, 0x0903_0000] {
            let raw = cells64(&[0x1000_0000, pa, 0x1000]);
            assert!(
                why(&[("passthrough", raw)]).starts_with(fw_cfg_rule),
                "{pa:#x}"
            );
        }
        assert!(
            why(&[("passthrough-devices", str_prop("/fw-cfg@9020000"))]).starts_with(fw_cfg_rule)
        );
        // The message names the node and the rule.
        let err = parse(&host_with_gic(&[("passthrough", console)])).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("VM node /chosen/vm0: the hypervisor's console"));
        // Nothing asked for: accepted, with the virtual GIC at QEMU virt's addresses.
        let ok = parse(&host_with_gic(&[])).expect("valid");
        assert_eq!(ok[0].gic, GicIpa::QEMU_VIRT);
    }

    #[test]
    fn console_input_goes_to_one_vm_with_a_uart() {
        let input = |cpu, pa| with(vm_props(pa, cpu), "console-input", Vec::new());
        let vms = parse(&dtb(&[("a", input(1, 0x5000_0000))])).expect("valid");
        assert!(vms[0].console_input);
        assert!(!parse(&dtb(&[("a", vm_props(0x5000_0000, 1))])).expect("valid")[0].console_input);
        assert_eq!(
            parse(&dtb(&[
                ("a", input(1, 0x5000_0000)),
                ("b", input(2, 0x5010_0000))
            ]))
            .unwrap_err()
            .to_string(),
            "VM node /chosen/b: console input is given to two VMs"
        );
        let mut no_uart = input(1, 0x5000_0000);
        no_uart.retain(|(k, _)| *k != "vuart");
        assert_eq!(rejected(no_uart), "console-input needs a vuart");
    }

    #[test]
    fn the_virtual_gic_needs_free_aligned_ipas() {
        let on_ram = with(
            vm_props(0x5000_0000, 1),
            "gic-distributor",
            cells64(&[0x4000_0000]),
        );
        assert!(rejected(on_ram).starts_with("the GIC distributor and redistributors"));
        let unaligned = with(
            vm_props(0x5000_0000, 1),
            "gic-redistributors",
            cells64(&[0x080a_1000]),
        );
        assert!(rejected(unaligned).starts_with("the GIC distributor and redistributors"));
        let overlap = with(
            vm_props(0x5000_0000, 1),
            "gic-redistributors",
            cells64(&[0x0800_0000]),
        );
        assert_eq!(
            rejected(overlap),
            "the GIC distributor overlaps the redistributors"
        );
        let uart_on_gic = with(vm_props(0x5000_0000, 1), "vuart", cells64(&[0x080a_0000]));
        assert_eq!(
            rejected(uart_on_gic),
            "vuart must be a free, page-aligned IPA"
        );
        let moved = with(
            vm_props(0x5000_0000, 1),
            "gic-distributor",
            cells64(&[0x2000_0000]),
        );
        let v = parse(&dtb(&[("vm0", moved)])).expect("valid").remove(0);
        assert_eq!(v.gic.dist, Ipa::new(0x2000_0000));
        assert_eq!(v.gic.redist, GicIpa::QEMU_VIRT.redist);
    }
}

#[cfg(test)]
mod fuzz {
    use super::tests::{dtb, parse_blob, vm_props};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// A corrupted host DTB is rejected or parsed, never a panic.
        #[test]
        fn corrupted_dtbs_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut blob = dtb(&[("a", vm_props(0x5000_0000, 1)), ("b", vm_props(0x5010_0000, 2))]);
            for (i, b) in &edits {
                let at = i.index(blob.len());
                blob[at] = *b;
            }
            if truncate {
                blob.truncate(cut.index(blob.len()));
            }
            let _ = parse_blob(&blob);
        }
    }
}
