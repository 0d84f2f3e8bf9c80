//! The state of one virtual interrupt, shared by SGIs, PPIs and SPIs.

/// One virtual interrupt's state (IHI 0069 chapter 4, the interrupt states and the
/// pending state of level-sensitive and edge-triggered interrupts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Irq {
    /// Forwarding enabled (`GICD_ISENABLER`/`GICR_ISENABLER0`).
    pub enabled: bool,
    /// The pending latch: an edge, a write to `ISPENDR`, an SGI, a hardware interrupt
    /// taken at EL2.
    pub latch: bool,
    /// The input level of a level-sensitive source (timers, emulated devices).
    pub line: bool,
    /// Active (acknowledged, not yet deactivated).
    pub active: bool,
    /// Group 1 (`IGROUPR` bit set); Group 0 otherwise.
    pub group1: bool,
    /// Level-sensitive (`ICFGR` Int_config\[1\] = 0); edge-triggered otherwise.
    pub level: bool,
    /// Priority, already masked to the implemented priority bits.
    pub priority: u8,
    /// The vCPU whose list registers hold this interrupt, if any.
    pub in_lr: Option<u8>,
    /// The list register holding it was written with the pending state (the pending
    /// state the guest sees until the next sync).
    pub lr_pending: bool,
}

impl Irq {
    /// The reset state: disabled, inactive, Group 1, priority 0.
    pub const fn reset(level: bool) -> Self {
        Self {
            enabled: false,
            latch: false,
            line: false,
            active: false,
            group1: true,
            level,
            priority: 0,
            in_lr: None,
            lr_pending: false,
        }
    }

    /// Pending in the model (latch, or a level-sensitive input held high).
    pub const fn pending(&self) -> bool {
        self.latch || (self.level && self.line)
    }

    /// The pending state a guest reads in `ISPENDR` (including a pending state that is
    /// in a list register right now).
    pub const fn pending_visible(&self) -> bool {
        self.pending() || self.lr_pending
    }
}
