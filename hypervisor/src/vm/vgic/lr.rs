//! List registers: the `ICH_LR<n>_EL2` encoding, and filling them from the model before
//! a VM entry ([`Vgic::flush`]) and folding them back after an exit ([`Vgic::sync`]).
//!
//! Layout of `ICH_LR<n>_EL2` (DDI 0487 and IHI 0069, `ICH_LR<n>_EL2`): vINTID
//! \[31:0\], pINTID \[44:32\] when HW = 1 (physical SPIs and PPIs need bits \[41:32\] only);
//! when HW = 0 bit 41 is EOI (maintenance interrupt on deactivation); Priority
//! \[55:48\] (the unimplemented low bits are ignored); Group \[60\]; HW \[61\]; State
//! \[63:62\].

use super::irq::Irq;
use super::{spi_index, spi_intid, SpiSource, Vgic, PRIVATE_COUNT};

/// The architectural maximum number of list registers (`ICH_VTR_EL2.ListRegs` is
/// 0..=15).
pub const MAX_LIST_REGS: usize = 16;

/// `ICH_LR<n>_EL2.vINTID`, bits \[31:0\].
pub const LR_VINTID_MASK: u64 = 0xffff_ffff;
/// `ICH_LR<n>_EL2.pINTID`, bits \[44:32\] (HW = 1).
pub const LR_PINTID_SHIFT: u32 = 32;
/// Mask of `ICH_LR<n>_EL2.pINTID` after shifting.
pub const LR_PINTID_MASK: u64 = 0x1fff;
/// `ICH_LR<n>_EL2.EOI`, bit 41 (HW = 0): a maintenance interrupt when the guest
/// deactivates the interrupt.
pub const LR_EOI: u64 = 1 << 41;
/// `ICH_LR<n>_EL2.Priority`, bits \[55:48\].
pub const LR_PRIORITY_SHIFT: u32 = 48;
/// `ICH_LR<n>_EL2.Group`, bit 60 (1 = Group 1).
pub const LR_GROUP: u64 = 1 << 60;
/// `ICH_LR<n>_EL2.HW`, bit 61: a hardware interrupt, deactivated with the virtual one.
pub const LR_HW: u64 = 1 << 61;
/// `ICH_LR<n>_EL2.State`, bits \[63:62\].
pub const LR_STATE_SHIFT: u32 = 62;

/// `ICH_HCR_EL2.En`, bit 0: the virtual CPU interface is enabled.
pub const ICH_HCR_EN: u64 = 1 << 0;
/// `ICH_HCR_EL2.UIE`, bit 1: maintenance interrupt when at most one list register
/// holds a valid interrupt (underflow).
pub const ICH_HCR_UIE: u64 = 1 << 1;
/// `ICH_HCR_EL2.LRENPIE`, bit 2: maintenance interrupt while `EOIcount` is non-zero.
pub const ICH_HCR_LRENPIE: u64 = 1 << 2;
/// `ICH_HCR_EL2.NPIE`, bit 3: maintenance interrupt when no list register holds a
/// pending interrupt.
pub const ICH_HCR_NPIE: u64 = 1 << 3;

/// `ICH_VTR_EL2.ListRegs`, bits \[4:0\]: list registers - 1.
pub const VTR_LIST_REGS_MASK: u64 = 0x1f;
/// `ICH_VTR_EL2.PRIbits`, bits \[31:29\]: priority bits - 1.
pub const VTR_PRI_BITS_SHIFT: u32 = 29;

/// The number of list registers `ICH_VTR_EL2` reports (`ListRegs` + 1, at most 16).
#[must_use]
pub fn list_regs_from_vtr(ich_vtr: u64) -> usize {
    // A 5-bit field: the sum is exact.
    ((ich_vtr & VTR_LIST_REGS_MASK) as usize)
        .saturating_add(1)
        .min(MAX_LIST_REGS)
}

/// The number of virtual priority bits `ICH_VTR_EL2` reports (`PRIbits` + 1, 1..=8).
#[must_use]
pub const fn priority_bits_from_vtr(ich_vtr: u64) -> u8 {
    // A 3-bit field: the sum is exact.
    (((ich_vtr >> VTR_PRI_BITS_SHIFT) & 0x7) as u8).saturating_add(1)
}

/// The state field of a list register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrState {
    /// 0b00: no interrupt (free, or the guest deactivated it).
    Invalid,
    /// 0b01.
    Pending,
    /// 0b10.
    Active,
    /// 0b11.
    PendingActive,
}

impl LrState {
    /// Whether the pending state is set.
    #[must_use]
    pub const fn pending(self) -> bool {
        matches!(self, Self::Pending | Self::PendingActive)
    }

    /// Whether the active state is set.
    #[must_use]
    pub const fn active(self) -> bool {
        matches!(self, Self::Active | Self::PendingActive)
    }

    const fn from_bits(pending: bool, active: bool) -> Self {
        match (pending, active) {
            (false, false) => Self::Invalid,
            (true, false) => Self::Pending,
            (false, true) => Self::Active,
            (true, true) => Self::PendingActive,
        }
    }
}

/// One `ICH_LR<n>_EL2` value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LrValue(pub u64);

impl LrValue {
    /// A free list register.
    pub const INVALID: Self = Self(0);

    /// A list register for virtual interrupt `vintid` in `state`, with `priority`,
    /// Group 1 if `group1`, the physical interrupt `hw` (HW = 1, pINTID) if any, and
    /// otherwise the EOI maintenance request if `eoi`.
    #[must_use]
    pub const fn new(
        vintid: u32,
        state: LrState,
        priority: u8,
        group1: bool,
        hw: Option<u32>,
        eoi: bool,
    ) -> Self {
        let mut v = vintid as u64 & LR_VINTID_MASK;
        v |= (state as u64) << LR_STATE_SHIFT;
        v |= (priority as u64) << LR_PRIORITY_SHIFT;
        if group1 {
            v |= LR_GROUP;
        }
        match hw {
            Some(p) => v |= LR_HW | ((p as u64 & LR_PINTID_MASK) << LR_PINTID_SHIFT),
            None if eoi => v |= LR_EOI,
            None => {}
        }
        Self(v)
    }

    /// vINTID.
    #[must_use]
    pub const fn vintid(self) -> u32 {
        (self.0 & LR_VINTID_MASK) as u32
    }

    /// State.
    #[must_use]
    pub const fn state(self) -> LrState {
        match self.0 >> LR_STATE_SHIFT {
            0 => LrState::Invalid,
            1 => LrState::Pending,
            2 => LrState::Active,
            _ => LrState::PendingActive,
        }
    }

    /// Priority.
    #[must_use]
    pub const fn priority(self) -> u8 {
        (self.0 >> LR_PRIORITY_SHIFT) as u8
    }

    /// Group 1.
    #[must_use]
    pub const fn group1(self) -> bool {
        self.0 & LR_GROUP != 0
    }

    /// The physical INTID of a hardware interrupt (HW = 1).
    #[must_use]
    pub const fn hw(self) -> Option<u32> {
        if self.0 & LR_HW != 0 {
            Some(((self.0 >> LR_PINTID_SHIFT) & LR_PINTID_MASK) as u32)
        } else {
            None
        }
    }

    /// The EOI maintenance request (HW = 0 only).
    #[must_use]
    pub const fn eoi(self) -> bool {
        self.0 & (LR_HW | LR_EOI) == LR_EOI
    }

    /// The same interrupt in another state.
    #[must_use]
    pub const fn with_state(self, state: LrState) -> Self {
        Self((self.0 & !(0b11 << LR_STATE_SHIFT)) | ((state as u64) << LR_STATE_SHIFT))
    }
}

/// What to load into the virtual CPU interface before a VM entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flush {
    lrs: [LrValue; MAX_LIST_REGS],
    count: usize,
    used: usize,
    hcr: u64,
}

impl Flush {
    fn new(count: usize) -> Self {
        Self {
            lrs: [LrValue::INVALID; MAX_LIST_REGS],
            count: count.min(MAX_LIST_REGS),
            used: 0,
            hcr: 0,
        }
    }

    /// The value of every list register `ICH_LR0_EL2`..`ICH_LR<N-1>_EL2` (invalid ones
    /// included: each must be written).
    #[must_use]
    pub fn lrs(&self) -> &[LrValue] {
        self.lrs.get(..self.count).unwrap_or(&[])
    }

    /// How many list registers hold an interrupt (they are the first ones).
    #[must_use]
    pub const fn used(&self) -> usize {
        self.used
    }

    /// The maintenance requests for `ICH_HCR_EL2` (`UIE`, `NPIE`), to be ORed into the
    /// value the machine layer writes (with `En`).
    #[must_use]
    pub const fn hcr(&self) -> u64 {
        self.hcr
    }

    /// Whether the guest left this flush as it was loaded: no maintenance was asked for
    /// and `read_back`, the list registers that held an interrupt read after the exit,
    /// are the values written. Then [`Vgic::sync`] would only take the interrupts out of
    /// the list registers for the next flush to put them back.
    #[must_use]
    pub fn unchanged(&self, read_back: &[u64]) -> bool {
        self.hcr == 0
            && read_back.len() == self.used
            && self.lrs.iter().zip(read_back).all(|(w, &r)| w.0 == r)
    }
}

/// A candidate for a list register: order key and where it lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    /// 0 for active interrupts (they go first: the guest must be able to deactivate
    /// them), 1 for pending ones.
    pending_only: u8,
    priority: u8,
    intid: u32,
}

impl Vgic {
    /// Whether `irq` belongs in a list register: active, or pending and enabled with
    /// its group enabled in `GICD_CTLR`. Returns whether the pending state goes too.
    fn lr_candidate(&self, irq: &Irq) -> Option<bool> {
        let pending = irq.enabled && irq.pending() && self.group_enabled(irq);
        (pending || irq.active).then_some(pending)
    }

    /// Chooses the list register contents of `vcpu` for a VM entry: active interrupts
    /// first, then pending ones by priority (then INTID), as many as there are list
    /// registers. If more are pending than fit, asks for a maintenance interrupt
    /// (`NPIE` when some list register holds a pending interrupt, so a refill follows
    /// once the guest took them; otherwise `UIE` when at least two are in use).
    ///
    /// List registers of an earlier flush that were not synced are first folded back
    /// as written. For a `vcpu` the VM does not have, every list register is invalid.
    pub fn flush(&mut self, vcpu: usize) -> Flush {
        let mut out = Flush::new(self.nr_lrs);
        if vcpu >= self.vcpus.len() {
            return out;
        }
        self.sync(vcpu, &[]);
        let Ok(vcpu_tag) = u8::try_from(vcpu) else {
            return out;
        };
        let n = out.count;
        let mut best = [None::<Key>; MAX_LIST_REGS];
        let mut overflow = false;
        let mut offer = |key: Key| {
            // Insert into the sorted `best[..n]`; what falls off the end overflows.
            let mut carry = Some(key);
            for slot in best.iter_mut().take(n) {
                match (*slot, carry) {
                    (_, None) => break,
                    (None, c) => {
                        *slot = c;
                        carry = None;
                    }
                    (Some(s), Some(c)) if c < s => {
                        *slot = Some(c);
                        carry = Some(s);
                    }
                    _ => {}
                }
            }
            if carry.is_some() {
                overflow = true;
            }
        };
        if let Some(v) = self.vcpus.get(vcpu) {
            for (i, irq) in v.private.iter().enumerate() {
                if let Some(pending) = self.lr_candidate(irq) {
                    offer(Key {
                        pending_only: u8::from(!irq.active && pending),
                        priority: irq.priority,
                        intid: i as u32,
                    });
                }
            }
        }
        for &idx in &self.owned {
            let Some(s) = self.spis.get(usize::from(idx)) else {
                continue;
            };
            // The cheap state checks first: the target is a search of the vCPUs.
            if s.irq.in_lr.is_some() {
                continue;
            }
            let Some(pending) = self.lr_candidate(&s.irq) else {
                continue;
            };
            if self.spi_target(s.route) == Some(vcpu) {
                offer(Key {
                    pending_only: u8::from(!s.irq.active && pending),
                    priority: s.irq.priority,
                    intid: spi_intid(idx),
                });
            }
        }
        let mut any_pending = false;
        for (slot, key) in best.iter().take(n).enumerate() {
            let Some(key) = *key else { break };
            let Some(value) = self.place(vcpu, vcpu_tag, key.intid) else {
                continue;
            };
            any_pending |= value.state().pending();
            let written = self
                .vcpus
                .get_mut(vcpu)
                .and_then(|v| v.written.get_mut(slot));
            if let (Some(lr), Some(w)) = (out.lrs.get_mut(slot), written) {
                *lr = value;
                *w = value;
                // `slot < n <= MAX_LIST_REGS`: the sum is exact.
                out.used = slot.saturating_add(1);
            }
        }
        if overflow {
            if any_pending {
                out.hcr |= ICH_HCR_NPIE;
            } else if out.used >= 2 {
                out.hcr |= ICH_HCR_UIE;
            }
        }
        out
    }

    /// Marks `intid` as held by `vcpu`'s list registers and returns the value for it.
    fn place(&mut self, vcpu: usize, tag: u8, intid: u32) -> Option<LrValue> {
        let (irq, hw) = if intid < PRIVATE_COUNT {
            let v = self.vcpus.get(vcpu)?;
            let irq = *v.private.get(intid as usize)?;
            (irq, v.holds_hw(intid).then_some(intid))
        } else {
            let s = self.spis.get(spi_index(intid)?)?;
            let hw = match s.source {
                Some(SpiSource::Hardware { pintid }) => Some(pintid),
                _ => None,
            };
            (s.irq, hw)
        };
        let mut pending = self.lr_candidate(&irq)?;
        if hw.is_some() && irq.active {
            // A hardware interrupt is never pending and active in a list register: its
            // next pending state waits for the deactivation.
            pending = false;
        }
        let level_sw = irq.level && hw.is_none();
        let value = LrValue::new(
            intid,
            LrState::from_bits(pending, irq.active),
            irq.priority,
            irq.group1,
            hw,
            level_sw && pending,
        );
        let slot = if intid < PRIVATE_COUNT {
            self.vcpus.get_mut(vcpu)?.private.get_mut(intid as usize)?
        } else {
            &mut self.spis.get_mut(spi_index(intid)?)?.irq
        };
        slot.in_lr = Some(tag);
        slot.lr_pending = pending;
        if pending && !level_sw {
            // An edge (or a hardware interrupt, or an SGI) now lives in the list register.
            slot.latch = false;
        }
        Some(value)
    }

    /// Folds the list registers of `vcpu`, read back after an exit, into the model:
    /// `read_back[n]` is `ICH_LR<n>_EL2`. A list register that became invalid was
    /// deactivated by the guest (for a hardware interrupt the physical one with it);
    /// pending, active and pending+active states are kept. A missing entry counts as
    /// unchanged since the flush.
    pub fn sync(&mut self, vcpu: usize, read_back: &[u64]) {
        let Some(v) = self.vcpus.get_mut(vcpu) else {
            return;
        };
        let written = core::mem::replace(&mut v.written, [LrValue::INVALID; MAX_LIST_REGS]);
        for (n, w) in written.into_iter().enumerate() {
            // A list register the flush filled is never written invalid (`Vgic::place`
            // places only active or pending interrupts): an invalid one was left free.
            if w.state() == LrState::Invalid {
                continue;
            }
            let intid = w.vintid();
            let state = read_back.get(n).map_or(w.state(), |&r| LrValue(r).state());
            let (irq, hw) = if intid < PRIVATE_COUNT {
                let Some(v) = self.vcpus.get_mut(vcpu) else {
                    continue;
                };
                let hw = w.hw().is_some();
                if hw && !state.pending() && !state.active() {
                    // The guest deactivated it, and with it the physical PPI.
                    v.hw_held &= !(1 << intid);
                }
                let Some(irq) = v.private.get_mut(intid as usize) else {
                    continue;
                };
                (irq, hw)
            } else {
                let Some(s) = spi_index(intid).and_then(|i| self.spis.get_mut(i)) else {
                    continue;
                };
                let hw = matches!(s.source, Some(SpiSource::Hardware { .. }));
                (&mut s.irq, hw)
            };
            irq.in_lr = None;
            irq.lr_pending = false;
            irq.active = state.active();
            if irq.level && !hw {
                if !state.pending() {
                    // Acknowledged: the latch (a write to ISPENDR) is consumed; a
                    // level still held keeps it pending.
                    irq.latch = false;
                }
            } else if state.pending() {
                irq.latch = true;
            }
        }
    }

    /// Handles the maintenance interrupt of `vcpu` (underflow or no pending): folds
    /// `read_back` in and refills the list registers.
    pub fn maintenance(&mut self, vcpu: usize, read_back: &[u64]) -> Flush {
        self.sync(vcpu, read_back);
        self.flush(vcpu)
    }
}
