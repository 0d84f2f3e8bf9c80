//! A VM's virtual GICv3: the emulated distributor and redistributors, interrupt
//! ownership, SGI routing and list-register allocation, as plain logic that is tested on
//! the host. The machine layer wires it to stage-2 data aborts, to trapped
//! `ICC_SGI*R_EL1` writes, to the maintenance interrupt and to every VM entry and exit.
//!
//! # The model
//!
//! References are to the GICv3/v4 architecture specification (Arm IHI 0069, issue H)
//! and, for the `ICH_*`/`ICC_*` system registers, to the Arm ARM (DDI 0487).
//!
//! - **What a guest sees.** A GICv3 with one Security state (`GICD_CTLR.DS` = 1), affinity
//!   routing always on (`ARE` reads 1, writes ignored), no LPIs and no ITS (IHI 0069 chapter 12,
//!   `GICD_CTLR`, `GICD_TYPER`). `GICD_TYPER.ITLinesNumber` covers the VM's own SPIs only. The
//!   distributor frame is 64 KiB ([`dist`]); each vCPU has a redistributor of two 64 KiB
//!   frames, `RD_base` and `SGI_base` ([`redist`], IHI 0069 chapter 12, redistributor map). Registers a guest
//!   does not need read as zero and ignore writes; accesses of a size or alignment the
//!   architecture does not allow are reported as [`MmioError`] for the caller's policy.
//! - **State.** Every interrupt has enable, pending (a latch plus, for level-sensitive
//!   sources, the input level), active, group, priority and trigger state (IHI 0069
//!   chapter 4). SGIs and PPIs (INTIDs 0-31) are per vCPU; SPIs are per VM and routed
//!   by `GICD_IROUTER<n>` to the vCPU with that affinity (IHI 0069 chapter 2 and `GICD_IROUTER<n>`).
//! - **Ownership.** An SPI exists only if the VM's description assigns it ([`SpiDesc`]):
//!   either emulated by the hypervisor ([`SpiSource::Virtual`]) or a physical SPI
//!   ([`SpiSource::Hardware`]). Every other INTID reads as zero and ignores writes. Guest
//!   writes to an owned hardware SPI reach the physical distributor as [`PhysAction`]s
//!   through a [`PhysGic`]; nothing else a guest writes ever does.
//! - **SGIs.** A trapped `ICC_SGI1R_EL1` (or `SGI0R`, `ASGI1R`) write is decoded
//!   ([`sgi::SgiTarget`]) and makes the SGI pending on the targeted vCPUs of this VM
//!   only; targets that do not exist are ignored (IHI 0069 and DDI 0487,
//!   `ICC_SGI1R_EL1`).
//! - **Delivery.** The guest receives interrupts through the list registers of the
//!   virtual CPU interface (IHI 0069 chapter 6). [`Vgic::flush`] fills them before a VM entry
//!   with active interrupts first, then the highest-priority pending ones, and asks for
//!   a maintenance interrupt (`ICH_HCR_EL2.NPIE`/`UIE`) when more are pending than fit;
//!   [`Vgic::sync`] folds the list registers read back after an exit into the model.
//!   A physical interrupt is delivered with the HW bit and its physical INTID, so the
//!   guest's deactivation deactivates it (IHI 0069 chapter 6, hardware interrupts).
//!
//! # Calling protocol
//!
//! The model is one plain value per VM; the caller serialises access to it (a lock,
//! [`SharedVgic`]). On every exit of a vCPU, call [`Vgic::sync`] with that vCPU's list
//! registers before emulating anything; before every entry call [`Vgic::flush`] and write
//! the values it returns. Both may be skipped when they would change nothing: the sync
//! when the list registers read back as written ([`Flush::unchanged`]) and `ICH_VMCR_EL2`
//! is as last synced (the model then is as the registers are, as while the vCPU runs);
//! the flush when, in addition, nobody took the lock since it was made
//! ([`SharedVgic::takes`]): the registers already hold it. A maintenance interrupt is a sync followed by a flush
//! ([`Vgic::maintenance`]). Writes return the set of vCPUs ([`VcpuMask`]) that may have
//! a newly deliverable interrupt, so the caller can wake or kick them.
//!
//! # Limits
//!
//! A change made by one vCPU to an interrupt that sits in another running vCPU's list
//! registers (for example clearing its pending state) takes effect at that vCPU's next
//! sync. With a single list register, or with more active interrupts than list registers,
//! delivery of further interrupts waits for the next exit rather than for a maintenance
//! interrupt. An SPI routed with `IRM` = 1 goes to vCPU 0.

pub mod dist;
mod irq;
pub mod lr;
#[cfg(test)]
mod model;
#[cfg(test)]
mod proptests;
pub mod redist;
mod regs;
pub mod sgi;
#[cfg(test)]
pub(crate) mod tests;

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use irq::Irq;
pub use lr::{Flush, LrValue};

use crate::Lock;

/// A VM's virtual GIC behind its lock, with a count of the times the lock was taken.
///
/// A CPU that reads the same count after an exit as right after its last
/// [`Vgic::flush`] knows that nothing changed the model since: if its list registers also
/// read back as written, the flush it would make now is the one already loaded, and it
/// can enter again without taking the lock (the machine's run loop does).
pub struct SharedVgic {
    vgic: Lock<Vgic>,
    takes: AtomicU64,
}

impl SharedVgic {
    /// Puts `vgic` behind its lock.
    #[must_use]
    pub const fn new(vgic: Vgic) -> Self {
        Self {
            vgic: Lock::new(vgic),
            takes: AtomicU64::new(0),
        }
    }

    /// Takes the lock (and counts it).
    pub fn lock(&self) -> spin::mutex::TicketMutexGuard<'_, Vgic> {
        let guard = self.vgic.lock();
        self.takes.fetch_add(1, Ordering::SeqCst);
        guard
    }

    /// How many times the lock was taken so far.
    #[must_use]
    pub fn takes(&self) -> u64 {
        self.takes.load(Ordering::SeqCst)
    }
}

/// Number of SGIs (INTIDs 0-15).
pub const SGI_COUNT: u32 = 16;
/// Number of private interrupts per vCPU: SGIs and PPIs (INTIDs 0-31).
pub const PRIVATE_COUNT: u32 = 32;
/// The largest SPI INTID (1020-1023 are special INTIDs, IHI 0069 chapter 2).
pub const MAX_SPI_INTID: u32 = 1019;
/// The most vCPUs a VM's virtual GIC supports (the width of [`VcpuMask`]).
pub const MAX_VCPUS: usize = 64;
/// PPI of the EL1 virtual timer (Arm BSA; QEMU `virt`).
pub const PPI_VTIMER: u32 = 27;
/// PPI of the EL1 physical timer (Arm BSA; QEMU `virt`).
pub const PPI_PTIMER: u32 = 30;

/// The index in a VM's SPI table of `intid`, if it is an SPI number (not 0-31).
fn spi_index(intid: u32) -> Option<usize> {
    intid.checked_sub(PRIVATE_COUNT).map(|i| i as usize)
}

/// The INTID of entry `idx` of a VM's SPI table (at most 988 entries: the sum is exact).
fn spi_intid(idx: u16) -> u32 {
    PRIVATE_COUNT.saturating_add(u32::from(idx))
}

/// The affinity fields Aff3 \[39:32\], Aff2 \[23:16\], Aff1 \[15:8\] and Aff0 \[7:0\], as laid
/// out both in `MPIDR_EL1` and in `GICD_IROUTER<n>` (IHI 0069, `GICD_IROUTER<n>`).
pub const AFFINITY_MASK: u64 = 0x0000_00ff_00ff_ffff;

/// One vCPU as the virtual GIC sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuDesc {
    /// The vCPU's virtual `MPIDR_EL1`; only its affinity fields are used.
    pub mpidr: u64,
    /// `MPIDR_EL1` of the physical CPU the vCPU runs on: where owned hardware SPIs routed
    /// to this vCPU are routed in the physical distributor.
    pub pcpu_mpidr: u64,
}

/// Where an SPI of the VM comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpiSource {
    /// Emulated by the hypervisor (a virtual device); raised with [`Vgic::inject_spi`] or
    /// [`Vgic::set_spi_level`].
    Virtual,
    /// A physical SPI given to the VM; raised with [`Vgic::inject_hw`] when it is taken at
    /// EL2, delivered with the HW bit.
    Hardware {
        /// The physical INTID (32..=1019).
        pintid: u32,
    },
}

/// One SPI assigned to the VM by its description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpiDesc {
    /// The INTID the guest sees (32..=1019).
    pub intid: u32,
    /// Where it comes from.
    pub source: SpiSource,
}

/// Everything the virtual GIC of one VM is built from.
#[derive(Clone, Copy, Debug)]
pub struct VgicConfig<'a> {
    /// The vCPUs, in order: index `i` is vCPU `i` (`GICR_TYPER.Processor_Number`).
    pub vcpus: &'a [VcpuDesc],
    /// The SPIs the VM owns.
    pub spis: &'a [SpiDesc],
    /// `ICH_VTR_EL2` of the machine: the number of list registers (`ListRegs` + 1) and of
    /// priority bits (`PRIbits` + 1) come from it, never from assumptions.
    pub ich_vtr: u64,
}

/// Why a [`VgicConfig`] is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// No vCPU.
    NoVcpus,
    /// More than [`MAX_VCPUS`] vCPUs.
    TooManyVcpus,
    /// Two vCPUs with the same virtual affinity.
    DuplicateAffinity(u64),
    /// A virtual SPI INTID outside 32..=1019.
    SpiOutOfRange(u32),
    /// The same virtual SPI INTID assigned twice.
    DuplicateSpi(u32),
    /// A physical INTID that is not an SPI (32..=1019).
    PhysOutOfRange(u32),
    /// The same physical INTID assigned twice.
    DuplicatePhys(u32),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoVcpus => write!(f, "virtual GIC: a VM needs at least one vCPU"),
            Self::TooManyVcpus => write!(f, "virtual GIC: more than {MAX_VCPUS} vCPUs"),
            Self::DuplicateAffinity(a) => write!(f, "virtual GIC: two vCPUs with affinity {a:#x}"),
            Self::SpiOutOfRange(i) => write!(f, "virtual GIC: SPI {i} is outside 32..=1019"),
            Self::DuplicateSpi(i) => write!(f, "virtual GIC: SPI {i} assigned twice"),
            Self::PhysOutOfRange(i) => write!(f, "virtual GIC: physical INTID {i} is not an SPI"),
            Self::DuplicatePhys(i) => write!(f, "virtual GIC: physical SPI {i} assigned twice"),
        }
    }
}

/// Why an emulated register access was refused. The caller turns it into an abort for
/// the guest, or treats the access as RAZ/WI, per the VM's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioError {
    /// The offset is not a multiple of the access size.
    Misaligned,
    /// An access size the register does not support (IHI 0069 chapter 12, register access rules: 32-bit for most
    /// registers, 64-bit for 64-bit registers, bytes only for the byte-accessible ones).
    BadSize,
    /// The offset is outside the emulated frame.
    OutOfRange,
}

impl fmt::Display for MmioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Misaligned => "misaligned GIC register access",
            Self::BadSize => "GIC register access of an unsupported size",
            Self::OutOfRange => "GIC register access outside the frame",
        })
    }
}

/// Why an injection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqError {
    /// No such vCPU.
    NoSuchVcpu,
    /// Not a PPI/SGI (for the per-vCPU calls) or not an SPI owned with the needed source.
    NotOwned,
}

impl fmt::Display for IrqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoSuchVcpu => "no such vCPU",
            Self::NotOwned => "interrupt not owned by this VM",
        })
    }
}

/// A change to the physical distributor on behalf of the VM that owns `pintid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysAction {
    /// `GICD_ISENABLER`/`GICD_ICENABLER`.
    Enable {
        /// Physical INTID.
        pintid: u32,
        /// Enable (true) or disable.
        enable: bool,
    },
    /// `GICD_IPRIORITYR`.
    Priority {
        /// Physical INTID.
        pintid: u32,
        /// The priority the guest wrote (masked to the virtual priority bits).
        priority: u8,
    },
    /// `GICD_ICFGR`.
    Trigger {
        /// Physical INTID.
        pintid: u32,
        /// Level-sensitive (true) or edge-triggered.
        level: bool,
    },
    /// `GICD_IROUTER` with `IRM` = 0: always one physical CPU of the VM, never "any CPU".
    Route {
        /// Physical INTID.
        pintid: u32,
        /// Affinity of the target physical CPU (`MPIDR_EL1` affinity fields).
        mpidr: u64,
    },
    /// `GICD_ISPENDR`/`GICD_ICPENDR`.
    Pending {
        /// Physical INTID.
        pintid: u32,
        /// Set (true) or clear.
        pending: bool,
    },
    /// `GICD_ISACTIVER`/`GICD_ICACTIVER`; clearing is a deactivation.
    Active {
        /// Physical INTID.
        pintid: u32,
        /// Set (true) or clear.
        active: bool,
    },
    /// Deactivate (and clear the pending state of) the private interrupt `pintid` of the
    /// physical CPU with affinity `mpidr` (`GICR_ICACTIVER0`, `GICR_ICPENDR0` of its
    /// redistributor): a hardware PPI ([`Vgic::set_hw_ppi`]) whose activation the vCPU
    /// held is dropped because the guest cleared its pending or active state, or the
    /// VM was reset.
    DeactivatePrivate {
        /// Affinity of the physical CPU.
        mpidr: u64,
        /// The PPI (16..=31).
        pintid: u32,
    },
}

impl PhysAction {
    /// The physical INTID the action changes.
    #[must_use]
    pub const fn pintid(&self) -> u32 {
        match *self {
            Self::Enable { pintid, .. }
            | Self::Priority { pintid, .. }
            | Self::Trigger { pintid, .. }
            | Self::Route { pintid, .. }
            | Self::Pending { pintid, .. }
            | Self::Active { pintid, .. }
            | Self::DeactivatePrivate { pintid, .. } => pintid,
        }
    }
}

/// The physical distributor as the virtual GIC drives it. On the machine it writes
/// `GICD_*` registers; tests record the actions.
pub trait PhysGic {
    /// Applies `action` to the physical distributor.
    fn apply(&mut self, action: PhysAction);
}

/// Records every action (the host tests' fake; also usable to batch actions).
impl PhysGic for Vec<PhysAction> {
    fn apply(&mut self, action: PhysAction) {
        self.push(action);
    }
}

/// A physical distributor that ignores every action (for VMs without hardware SPIs).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPhys;

impl PhysGic for NoPhys {
    fn apply(&mut self, _action: PhysAction) {}
}

/// A set of vCPUs of one VM, by index (bit `i` = vCPU `i`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuMask(pub u64);

impl VcpuMask {
    /// The empty set.
    pub const EMPTY: Self = Self(0);

    /// Adds vCPU `i` (ignored for `i` >= 64).
    pub fn insert(&mut self, i: usize) {
        if let Some(bit) = 1u64.checked_shl(u32::try_from(i).unwrap_or(u32::MAX)) {
            self.0 |= bit;
        }
    }

    /// Whether vCPU `i` is in the set.
    #[must_use]
    pub fn contains(self, i: usize) -> bool {
        u32::try_from(i)
            .ok()
            .and_then(|s| 1u64.checked_shl(s))
            .is_some_and(|bit| self.0 & bit != 0)
    }

    /// Whether the set is empty.
    #[must_use]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The vCPU indices in the set, in increasing order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        // One step per member (the lowest set bit, then cleared), not one per possible
        // vCPU: the run loop asks on every exit, almost always of an empty set.
        let mut bits = self.0;
        core::iter::from_fn(move || {
            let i = bits.trailing_zeros();
            bits &= bits.wrapping_sub(1);
            (i < u64::BITS).then_some(i as usize)
        })
    }
}

/// The guest's virtual CPU interface settings that decide what a vCPU may take:
/// `ICH_VMCR_EL2` as saved on exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CpuIf {
    /// `VPMR`: only a priority strictly higher (lower value) is signalled.
    pmr: u8,
    /// `VENG0`.
    grp0: bool,
    /// `VENG1`.
    grp1: bool,
}

/// `ICH_VMCR_EL2.VENG0`, bit 0 (DDI 0487 `ICH_VMCR_EL2`).
pub const ICH_VMCR_VENG0: u64 = 1 << 0;
/// `ICH_VMCR_EL2.VENG1`, bit 1.
pub const ICH_VMCR_VENG1: u64 = 1 << 1;
/// `ICH_VMCR_EL2.VPMR`, bits \[31:24\].
pub const ICH_VMCR_VPMR_SHIFT: u32 = 24;

/// One vCPU's part of the virtual GIC.
#[derive(Clone, Debug)]
struct VcpuState {
    desc: VcpuDesc,
    private: [Irq; PRIVATE_COUNT as usize],
    /// `GICR_WAKER.ProcessorSleep`.
    sleep: bool,
    cpuif: CpuIf,
    /// The value the last flush wrote into each list register (invalid = left free;
    /// otherwise its vINTID is the interrupt it holds).
    written: [LrValue; lr::MAX_LIST_REGS],
    /// PPIs backed by the same PPI of the vCPU's physical CPU (bit = INTID).
    hw_ppis: u32,
    /// Hardware PPIs whose physical activation this vCPU holds: taken at EL2, not yet
    /// deactivated by the guest (bit = INTID).
    hw_held: u32,
}

impl VcpuState {
    fn new(desc: VcpuDesc) -> Self {
        Self {
            desc,
            private: core::array::from_fn(|i| Irq::reset(i >= SGI_COUNT as usize)),
            sleep: true,
            cpuif: CpuIf {
                pmr: 0xff,
                grp0: true,
                grp1: true,
            },
            written: [LrValue::INVALID; lr::MAX_LIST_REGS],
            hw_ppis: 0,
            hw_held: 0,
        }
    }

    /// Back to the reset state; the hardware PPIs stay hardware PPIs. Returns the
    /// hardware PPIs whose physical activation was held (to be deactivated).
    fn reset(&mut self) -> u32 {
        let (hw_ppis, held) = (self.hw_ppis, self.hw_held);
        *self = Self::new(self.desc);
        self.hw_ppis = hw_ppis;
        held
    }

    /// Whether private interrupt `intid` is a hardware PPI whose physical activation
    /// this vCPU holds.
    fn holds_hw(&self, intid: u32) -> bool {
        intid < PRIVATE_COUNT && self.hw_held & (1 << intid) != 0
    }
}

/// One SPI slot of the VM (INTID 32 + index).
#[derive(Clone, Copy, Debug)]
struct Spi {
    irq: Irq,
    /// `GICD_IROUTER<n>` (Aff3..Aff0 and IRM only).
    route: u64,
    /// None: not owned (RAZ/WI, never pending).
    source: Option<SpiSource>,
}

/// `GICD_CTLR.EnableGrp0`, bit 0 (with DS = 1, IHI 0069 `GICD_CTLR`).
pub const CTLR_ENABLE_GRP0: u32 = 1 << 0;
/// `GICD_CTLR.EnableGrp1`, bit 1 (the bit Linux writes as `EnableGrp1A`).
pub const CTLR_ENABLE_GRP1: u32 = 1 << 1;
/// `GICD_CTLR.ARE`, bit 4: affinity routing, always 1 here.
pub const CTLR_ARE: u32 = 1 << 4;
/// `GICD_CTLR.DS`, bit 6: one Security state, always 1 here.
pub const CTLR_DS: u32 = 1 << 6;

/// The virtual GICv3 of one VM.
#[derive(Clone, Debug)]
pub struct Vgic {
    /// `GICD_CTLR` group enables.
    ctlr: u32,
    vcpus: Vec<VcpuState>,
    /// INTIDs 32.. up to the end of the last owned SPI's block of 32.
    spis: Vec<Spi>,
    /// Indices into `spis` of the owned SPIs, in increasing order.
    owned: Vec<u16>,
    nr_lrs: usize,
    /// Mask of the implemented priority bits (the top `PRIbits + 1` bits).
    priority_mask: u8,
}

/// A pending interrupt that a vCPU may take now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingIrq {
    /// The INTID.
    pub intid: u32,
    /// Its priority.
    pub priority: u8,
}

impl Vgic {
    /// The virtual GIC of a VM with `config`, in its reset state. Call [`Vgic::reset`]
    /// with the physical distributor before the VM first runs, so that the owned
    /// hardware SPIs start disabled and routed to the VM's CPUs.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] for no or too many vCPUs, two vCPUs with one affinity, and SPIs out
    /// of range or assigned twice.
    pub fn new(config: &VgicConfig<'_>) -> Result<Self, ConfigError> {
        if config.vcpus.is_empty() {
            return Err(ConfigError::NoVcpus);
        }
        if config.vcpus.len() > MAX_VCPUS {
            return Err(ConfigError::TooManyVcpus);
        }
        for (i, a) in config.vcpus.iter().enumerate() {
            let aff = a.mpidr & AFFINITY_MASK;
            if config
                .vcpus
                .iter()
                .take(i)
                .any(|b| b.mpidr & AFFINITY_MASK == aff)
            {
                return Err(ConfigError::DuplicateAffinity(aff));
            }
        }
        let mut max = PRIVATE_COUNT - 1;
        for (i, s) in config.spis.iter().enumerate() {
            if !(PRIVATE_COUNT..=MAX_SPI_INTID).contains(&s.intid) {
                return Err(ConfigError::SpiOutOfRange(s.intid));
            }
            if config.spis.iter().take(i).any(|t| t.intid == s.intid) {
                return Err(ConfigError::DuplicateSpi(s.intid));
            }
            if let SpiSource::Hardware { pintid } = s.source {
                if !(PRIVATE_COUNT..=MAX_SPI_INTID).contains(&pintid) {
                    return Err(ConfigError::PhysOutOfRange(pintid));
                }
                let dup =
                    config.spis.iter().take(i).any(
                        |t| matches!(t.source, SpiSource::Hardware { pintid: p } if p == pintid),
                    );
                if dup {
                    return Err(ConfigError::DuplicatePhys(pintid));
                }
            }
            max = max.max(s.intid);
        }
        // Whole blocks of 32 up to the last owned SPI (`GICD_TYPER.ITLinesNumber`):
        // `max <= MAX_SPI_INTID` (checked above), so at most 1024 and the arithmetic
        // is exact.
        let lines = max.saturating_add(1).div_ceil(32).saturating_mul(32);
        let mut spis = Vec::new();
        spis.resize(
            lines.saturating_sub(PRIVATE_COUNT) as usize,
            Spi {
                irq: Irq::reset(true),
                route: 0,
                source: None,
            },
        );
        let mut owned = Vec::new();
        for s in config.spis {
            // Every SPI was checked to lie in 32..=1019 above.
            let Some(idx) = s.intid.checked_sub(PRIVATE_COUNT) else {
                continue;
            };
            if let (Some(slot), Ok(short)) = (spis.get_mut(idx as usize), u16::try_from(idx)) {
                slot.source = Some(s.source);
                owned.push(short);
            }
        }
        owned.sort_unstable();
        let bits = lr::priority_bits_from_vtr(config.ich_vtr);
        Ok(Self {
            ctlr: 0,
            vcpus: config.vcpus.iter().map(|d| VcpuState::new(*d)).collect(),
            spis,
            owned,
            nr_lrs: lr::list_regs_from_vtr(config.ich_vtr),
            priority_mask: !(0xffu8.checked_shr(u32::from(bits)).unwrap_or(0)),
        })
    }

    /// Puts everything back in its reset state (a VM reset), and brings the owned
    /// hardware SPIs in the physical distributor in line: disabled, not pending, not
    /// active, level-sensitive, priority 0, routed to vCPU 0's physical CPU.
    pub fn reset(&mut self, phys: &mut impl PhysGic) {
        self.ctlr = 0;
        for v in &mut self.vcpus {
            let held = v.reset();
            let mpidr = v.desc.pcpu_mpidr & AFFINITY_MASK;
            for pintid in (SGI_COUNT..PRIVATE_COUNT).filter(|i| held & (1 << i) != 0) {
                phys.apply(PhysAction::DeactivatePrivate { mpidr, pintid });
            }
        }
        for s in &mut self.spis {
            s.irq = Irq::reset(true);
            s.route = 0;
        }
        let mpidr = self.route_pcpu(0);
        for &idx in &self.owned {
            let Some(Spi {
                source: Some(SpiSource::Hardware { pintid }),
                ..
            }) = self.spis.get(usize::from(idx)).copied()
            else {
                continue;
            };
            for action in [
                PhysAction::Enable {
                    pintid,
                    enable: false,
                },
                PhysAction::Pending {
                    pintid,
                    pending: false,
                },
                PhysAction::Active {
                    pintid,
                    active: false,
                },
                PhysAction::Trigger {
                    pintid,
                    level: true,
                },
                PhysAction::Priority {
                    pintid,
                    priority: 0,
                },
                PhysAction::Route { pintid, mpidr },
            ] {
                phys.apply(action);
            }
        }
    }

    /// Number of vCPUs.
    #[must_use]
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Number of list registers used per vCPU (`ICH_VTR_EL2.ListRegs` + 1).
    #[must_use]
    pub const fn list_registers(&self) -> usize {
        self.nr_lrs
    }

    /// The first INTID past the VM's SPI range (32 × (`ITLinesNumber` + 1)).
    #[must_use]
    pub fn intid_limit(&self) -> u32 {
        // At most 988 SPIs (`new`): the sum is exact.
        PRIVATE_COUNT.saturating_add(u32::try_from(self.spis.len()).unwrap_or(u32::MAX))
    }

    /// Records the guest's virtual CPU interface settings (`ICH_VMCR_EL2` as saved on
    /// exit): its priority mask and group enables decide [`Vgic::has_deliverable`].
    /// Until called, both groups count as enabled with priority mask 0xff.
    pub fn set_vmcr(&mut self, vcpu: usize, ich_vmcr: u64) {
        if let Some(v) = self.vcpus.get_mut(vcpu) {
            v.cpuif = CpuIf {
                pmr: (ich_vmcr >> ICH_VMCR_VPMR_SHIFT) as u8,
                grp0: ich_vmcr & ICH_VMCR_VENG0 != 0,
                grp1: ich_vmcr & ICH_VMCR_VENG1 != 0,
            };
        }
    }

    /// Sets the input level of PPI `intid` (16..=31) of `vcpu`, for a level-sensitive
    /// source the hypervisor drives (the timers, [`PPI_VTIMER`] and [`PPI_PTIMER`]). On an
    /// edge-triggered PPI a rising level latches it pending. The pending state shows in
    /// `GICR_ISPENDR0` whether or not the PPI is enabled. Returns whether the PPI can
    /// now be taken by the vCPU (enabled and pending).
    ///
    /// # Errors
    ///
    /// [`IrqError::NoSuchVcpu`], or [`IrqError::NotOwned`] if `intid` is not a PPI.
    pub fn set_ppi_level(
        &mut self,
        vcpu: usize,
        intid: u32,
        level: bool,
    ) -> Result<bool, IrqError> {
        let irq = self.ppi_mut(vcpu, intid)?;
        if !irq.level && level && !irq.line {
            irq.latch = true;
        }
        irq.line = level;
        Ok(irq.enabled && irq.pending())
    }

    /// Makes PPI `intid` (16..=31) of `vcpu` pending (an edge). Returns whether the PPI
    /// can now be taken by the vCPU.
    ///
    /// # Errors
    ///
    /// As [`Vgic::set_ppi_level`].
    pub fn inject_ppi(&mut self, vcpu: usize, intid: u32) -> Result<bool, IrqError> {
        let irq = self.ppi_mut(vcpu, intid)?;
        irq.latch = true;
        Ok(irq.enabled)
    }

    /// Makes PPI `intid` (16..=31) of every vCPU a hardware PPI: the same PPI of the
    /// vCPU's physical CPU, taken at EL2 and raised with [`Vgic::inject_hw_ppi`], then
    /// delivered with the HW bit so that the guest's deactivation deactivates the
    /// physical one (the EL1 timers, [`PPI_VTIMER`] and [`PPI_PTIMER`]: the vCPU never
    /// leaves its physical CPU). The PPI's virtual enable, priority and group stay the
    /// guest's; the physical one stays enabled (the machine layer keeps it so).
    ///
    /// # Errors
    ///
    /// [`IrqError::NotOwned`] if `intid` is not a PPI.
    pub fn set_hw_ppi(&mut self, intid: u32) -> Result<(), IrqError> {
        if !(SGI_COUNT..PRIVATE_COUNT).contains(&intid) {
            return Err(IrqError::NotOwned);
        }
        for v in &mut self.vcpus {
            v.hw_ppis |= 1 << intid;
        }
        Ok(())
    }

    /// The hardware PPI `intid` of `vcpu`'s physical CPU was taken at EL2 (acknowledged,
    /// priority dropped, still active): makes the virtual PPI pending. It stays pending
    /// while the guest keeps it disabled (and the physical one stays active, so it does
    /// not fire again), shows in `GICR_ISPENDR0`, and reaches the guest with the HW bit
    /// once enabled. Returns whether the vCPU can take it now.
    ///
    /// # Errors
    ///
    /// [`IrqError::NoSuchVcpu`], or [`IrqError::NotOwned`] if `intid` is not a hardware
    /// PPI ([`Vgic::set_hw_ppi`]): the caller then deactivates it itself.
    pub fn inject_hw_ppi(&mut self, vcpu: usize, intid: u32) -> Result<bool, IrqError> {
        let ctlr = self.ctlr;
        let v = self.vcpus.get_mut(vcpu).ok_or(IrqError::NoSuchVcpu)?;
        if !(SGI_COUNT..PRIVATE_COUNT).contains(&intid) || v.hw_ppis & (1 << intid) == 0 {
            return Err(IrqError::NotOwned);
        }
        v.hw_held |= 1 << intid;
        let irq = v
            .private
            .get_mut(intid as usize)
            .ok_or(IrqError::NotOwned)?;
        irq.latch = true;
        let grp = if irq.group1 {
            CTLR_ENABLE_GRP1
        } else {
            CTLR_ENABLE_GRP0
        };
        Ok(irq.enabled && ctlr & grp != 0)
    }

    fn ppi_mut(&mut self, vcpu: usize, intid: u32) -> Result<&mut Irq, IrqError> {
        let v = self.vcpus.get_mut(vcpu).ok_or(IrqError::NoSuchVcpu)?;
        if !(SGI_COUNT..PRIVATE_COUNT).contains(&intid) {
            return Err(IrqError::NotOwned);
        }
        v.private.get_mut(intid as usize).ok_or(IrqError::NotOwned)
    }

    /// Makes the emulated ([`SpiSource::Virtual`]) SPI `intid` pending (an edge). Returns
    /// the vCPU it is routed to, to wake or kick, if it can be taken now.
    ///
    /// # Errors
    ///
    /// [`IrqError::NotOwned`] if the VM has no such emulated SPI.
    pub fn inject_spi(&mut self, intid: u32) -> Result<Option<usize>, IrqError> {
        let idx = self.virtual_spi(intid)?;
        self.raise_spi(idx, |irq| irq.latch = true)
    }

    /// Sets the input level of the emulated SPI `intid` (a level-sensitive device line;
    /// on an edge-triggered SPI a rising level latches it pending). Returns the vCPU to
    /// wake or kick, as [`Vgic::inject_spi`].
    ///
    /// # Errors
    ///
    /// As [`Vgic::inject_spi`].
    pub fn set_spi_level(&mut self, intid: u32, level: bool) -> Result<Option<usize>, IrqError> {
        let idx = self.virtual_spi(intid)?;
        self.raise_spi(idx, |irq| {
            if !irq.level && level && !irq.line {
                irq.latch = true;
            }
            irq.line = level;
        })
    }

    /// The physical SPI `pintid` was taken at EL2 (acknowledged, priority dropped, still
    /// active in the physical GIC): makes the VM's SPI mapped to it pending. It reaches
    /// the guest with the HW bit, and the guest's deactivation deactivates it. While the
    /// guest keeps it disabled it stays pending (and physically active), as on a real
    /// GIC; clearing its pending state (`GICD_ICPENDR`) deactivates it. Returns the vCPU
    /// to wake or kick, as [`Vgic::inject_spi`].
    ///
    /// # Errors
    ///
    /// [`IrqError::NotOwned`] if `pintid` is not given to this VM; the caller then
    /// deactivates it itself.
    pub fn inject_hw(&mut self, pintid: u32) -> Result<Option<usize>, IrqError> {
        let idx = self
            .owned
            .iter()
            .map(|&i| usize::from(i))
            .find(|&i| {
                matches!(
                    self.spis.get(i).and_then(|s| s.source),
                    Some(SpiSource::Hardware { pintid: p }) if p == pintid
                )
            })
            .ok_or(IrqError::NotOwned)?;
        self.raise_spi(idx, |irq| irq.latch = true)
    }

    fn virtual_spi(&self, intid: u32) -> Result<usize, IrqError> {
        let idx = intid.checked_sub(PRIVATE_COUNT).ok_or(IrqError::NotOwned)? as usize;
        match self.spis.get(idx).and_then(|s| s.source) {
            Some(SpiSource::Virtual) => Ok(idx),
            _ => Err(IrqError::NotOwned),
        }
    }

    fn raise_spi(
        &mut self,
        idx: usize,
        f: impl FnOnce(&mut Irq),
    ) -> Result<Option<usize>, IrqError> {
        let spi = self.spis.get_mut(idx).ok_or(IrqError::NotOwned)?;
        f(&mut spi.irq);
        let irq = spi.irq;
        let route = spi.route;
        if irq.enabled && irq.pending() && self.group_enabled(&irq) {
            Ok(self.spi_target(route))
        } else {
            Ok(None)
        }
    }

    /// The highest-priority interrupt that `vcpu` may take now: pending, enabled, its
    /// group enabled in `GICD_CTLR` and in the vCPU's interface, and above its priority
    /// mask (ties go to the lower INTID). Interrupts in another vCPU's list registers
    /// are not counted. Meant for a vCPU that is not running (after [`Vgic::sync`]).
    #[must_use]
    pub fn highest_pending(&self, vcpu: usize) -> Option<PendingIrq> {
        let v = self.vcpus.get(vcpu)?;
        let takeable = |irq: &Irq| {
            irq.enabled
                && irq.pending()
                && irq.in_lr.is_none()
                && self.group_enabled(irq)
                && if irq.group1 {
                    v.cpuif.grp1
                } else {
                    v.cpuif.grp0
                }
                && irq.priority < v.cpuif.pmr
        };
        let mut best: Option<PendingIrq> = None;
        let mut offer = |intid: u32, irq: &Irq| {
            if best.is_none_or(|b| irq.priority < b.priority) {
                best = Some(PendingIrq {
                    intid,
                    priority: irq.priority,
                });
            }
        };
        for (i, irq) in v.private.iter().enumerate() {
            if takeable(irq) {
                offer(i as u32, irq);
            }
        }
        for &idx in &self.owned {
            if let Some(s) = self.spis.get(usize::from(idx)) {
                // The cheap state checks first: the target is a search of the vCPUs.
                if takeable(&s.irq) && self.spi_target(s.route) == Some(vcpu) {
                    offer(PRIVATE_COUNT + u32::from(idx), &s.irq);
                }
            }
        }
        best
    }

    /// Whether `vcpu` has an interrupt it may take now (see [`Vgic::highest_pending`]):
    /// the condition that ends a WFI. A pending but disabled interrupt does not count.
    #[must_use]
    pub fn has_deliverable(&self, vcpu: usize) -> bool {
        self.highest_pending(vcpu).is_some()
    }

    /// Whether `irq`'s group is enabled in `GICD_CTLR`.
    fn group_enabled(&self, irq: &Irq) -> bool {
        let bit = if irq.group1 {
            CTLR_ENABLE_GRP1
        } else {
            CTLR_ENABLE_GRP0
        };
        self.ctlr & bit != 0
    }

    /// The vCPU an SPI with `GICD_IROUTER` value `route` goes to: the vCPU with that
    /// affinity, vCPU 0 for IRM = 1, none if no vCPU has the affinity.
    fn spi_target(&self, route: u64) -> Option<usize> {
        if route & regs::IROUTER_IRM != 0 {
            return Some(0);
        }
        self.vcpu_by_affinity(route & AFFINITY_MASK)
    }

    /// The vCPU whose virtual affinity is `aff`.
    fn vcpu_by_affinity(&self, aff: u64) -> Option<usize> {
        self.vcpus
            .iter()
            .position(|v| v.desc.mpidr & AFFINITY_MASK == aff)
    }

    /// The physical CPU for a hardware SPI routed to vCPU `vcpu` (vCPU 0's if there is
    /// no such vCPU).
    fn route_pcpu(&self, vcpu: usize) -> u64 {
        self.vcpus
            .get(vcpu)
            .or_else(|| self.vcpus.first())
            .map_or(0, |v| v.desc.pcpu_mpidr & AFFINITY_MASK)
    }
}
