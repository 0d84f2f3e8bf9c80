//! A deliberately plain model of the virtual GIC for the property tests: every
//! interrupt in a map, every register decoded by a straight range match, written from
//! the architecture's register descriptions rather than from the implementation.

use super::lr::{LrState, LrValue, ICH_HCR_NPIE, ICH_HCR_UIE};
use super::sgi::SgiRegister;
use super::{MmioError, PendingIrq, PhysAction, SpiDesc, SpiSource, VcpuDesc};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct MIrq {
    pub enabled: bool,
    pub latch: bool,
    pub line: bool,
    pub active: bool,
    pub group1: bool,
    pub level: bool,
    pub priority: u8,
    pub route: u64,
    pub hw: Option<u32>,
}

impl MIrq {
    fn new(level: bool) -> Self {
        Self {
            group1: true,
            level,
            ..Self::default()
        }
    }
    pub fn pending(&self) -> bool {
        self.latch || (self.level && self.line)
    }
}

#[derive(Clone, Debug)]
pub(super) struct Model {
    pub ctlr: u64,
    pub mpidr: Vec<u64>,
    pub private: Vec<Vec<MIrq>>,
    pub sleep: Vec<bool>,
    pub vmcr: Vec<(u8, bool, bool)>,
    pub spis: BTreeMap<u32, MIrq>,
    pub prio_mask: u8,
    pub nr_lrs: usize,
    pub limit: u32,
}

/// Which access sizes an offset takes: 4 always, 1 for byte registers, 8 for 64-bit
/// ones.
fn size_ok(size: u8, byte: bool, dword: bool) -> bool {
    size == 4 || (size == 1 && byte) || (size == 8 && dword)
}

fn bit_read(reg: u64, irq: &MIrq) -> bool {
    match reg {
        0x080 => irq.group1,
        0x100 | 0x180 => irq.enabled,
        0x200 | 0x280 => irq.pending(),
        0x300 | 0x380 => irq.active,
        _ => false,
    }
}

/// The architectural effect of writing bit 1 (or, for IGROUPR, any bit) to `reg`.
fn bit_write(reg: u64, irq: &mut MIrq, bit: bool, acts: &mut Vec<PhysAction>) {
    if reg == 0x080 {
        irq.group1 = bit;
        return;
    }
    if !bit {
        return;
    }
    let hw = irq.hw;
    match reg {
        0x100 | 0x180 => {
            let en = reg == 0x100;
            if irq.enabled != en {
                irq.enabled = en;
                if let Some(p) = hw {
                    acts.push(PhysAction::Enable {
                        pintid: p,
                        enable: en,
                    });
                }
            }
        }
        0x200 => match hw {
            Some(p) => acts.push(PhysAction::Pending {
                pintid: p,
                pending: true,
            }),
            None => irq.latch = true,
        },
        0x280 => {
            let held = irq.latch;
            irq.latch = false;
            if let Some(p) = hw {
                acts.push(PhysAction::Pending {
                    pintid: p,
                    pending: false,
                });
                if held && !irq.active {
                    acts.push(PhysAction::Active {
                        pintid: p,
                        active: false,
                    });
                }
            }
        }
        0x300 | 0x380 => {
            let a = reg == 0x300;
            if irq.active != a {
                irq.active = a;
                if let Some(p) = hw {
                    acts.push(PhysAction::Active {
                        pintid: p,
                        active: a,
                    });
                }
            }
        }
        _ => {}
    }
}

fn id_reg(off: u64) -> u64 {
    match off {
        0xffd0 => 0x04,
        0xffe4 => 0xb0,
        0xffe8 => 0x3b,
        0xfff0 => 0x0d,
        0xfff4 => 0xf0,
        0xfff8 => 0x05,
        0xfffc => 0xb1,
        _ => 0,
    }
}

impl Model {
    pub fn new(vcpus: &[VcpuDesc], spis: &[SpiDesc], nr_lrs: usize, pri_bits: u8) -> Self {
        let max = spis.iter().map(|s| s.intid).max().unwrap_or(31);
        Self {
            ctlr: 0,
            mpidr: vcpus.iter().map(|v| v.mpidr).collect(),
            private: vcpus
                .iter()
                .map(|_| (0..32).map(|i| MIrq::new(i >= 16)).collect())
                .collect(),
            sleep: vec![true; vcpus.len()],
            vmcr: vec![(0xff, true, true); vcpus.len()],
            spis: spis
                .iter()
                .map(|s| {
                    let mut irq = MIrq::new(true);
                    if let SpiSource::Hardware { pintid } = s.source {
                        irq.hw = Some(pintid);
                    }
                    (s.intid, irq)
                })
                .collect(),
            prio_mask: !(0xffu16 >> pri_bits) as u8,
            nr_lrs,
            limit: (max + 1).div_ceil(32) * 32,
        }
    }

    fn grp_on(&self, irq: &MIrq) -> bool {
        self.ctlr & if irq.group1 { 2 } else { 1 } != 0
    }

    pub fn target(&self, route: u64) -> Option<usize> {
        if route & (1 << 31) != 0 {
            return Some(0);
        }
        self.mpidr
            .iter()
            .position(|m| m & 0xff_00ff_ffff == route & 0xff_00ff_ffff)
    }

    /// Whether vCPU `v` has an enabled, pending interrupt of an enabled group.
    pub fn takeable_any(&self, v: usize) -> bool {
        let ok = |i: &MIrq| i.enabled && i.pending() && self.grp_on(i);
        self.private[v].iter().any(ok)
            || self
                .spis
                .values()
                .any(|i| ok(i) && self.target(i.route) == Some(v))
    }

    pub fn highest_pending(&self, v: usize) -> Option<PendingIrq> {
        let (pmr, g0, g1) = *self.vmcr.get(v)?;
        let ok = |i: &MIrq| {
            i.enabled
                && i.pending()
                && self.grp_on(i)
                && (if i.group1 { g1 } else { g0 })
                && i.priority < pmr
        };
        let mut all: Vec<(u8, u32)> = Vec::new();
        for (n, i) in self.private[v].iter().enumerate() {
            if ok(i) {
                all.push((i.priority, n as u32));
            }
        }
        for (&n, i) in &self.spis {
            if ok(i) && self.target(i.route) == Some(v) {
                all.push((i.priority, n));
            }
        }
        all.sort_unstable();
        all.first()
            .map(|&(priority, intid)| PendingIrq { intid, priority })
    }

    fn dist_check(off: u64, size: u8) -> Result<(), MmioError> {
        if off >= 0x1_0000 {
            return Err(MmioError::OutOfRange);
        }
        let byte = (0x400..0xc00).contains(&off) || (0xf10..0xf30).contains(&off);
        let dword = (0x6000..0x8000).contains(&off);
        if !size_ok(size, byte, dword) {
            return Err(MmioError::BadSize);
        }
        if off % u64::from(size) != 0 {
            return Err(MmioError::Misaligned);
        }
        Ok(())
    }

    pub fn dist_read(&self, off: u64, size: u8) -> Result<u64, MmioError> {
        Self::dist_check(off, size)?;
        let spi = |n: u32| self.spis.get(&n);
        Ok(match off {
            0 => self.ctlr | 0x50,
            4 => {
                u64::from(self.limit / 32 - 1)
                    | ((self.mpidr.len().min(8) as u64 - 1) << 5)
                    | (9 << 19)
                    | (1 << 24)
                    | (1 << 26)
            }
            8 => 0x5400_043b,
            0x080..=0x3ff => {
                let reg = off & !0x7f;
                let first = ((off & 0x7f) / 4 * 32) as u32;
                (0..32).fold(0, |acc, b| {
                    let set = first >= 32 && spi(first + b).is_some_and(|i| bit_read(reg, i));
                    acc | (u64::from(set) << b)
                })
            }
            0x400..=0x7ff => (0..u64::from(size)).fold(0, |acc, k| {
                let n = (off - 0x400 + k) as u32;
                acc | (u64::from(spi(n).map_or(0, |i| i.priority)) << (8 * k))
            }),
            0xc00..=0xcff => (0..16).fold(0, |acc, k| {
                let n = ((off - 0xc00) / 4 * 16) as u32 + k;
                let edge = spi(n).is_some_and(|i| !i.level);
                acc | (u64::from(edge) << (2 * k + 1))
            }),
            0x6000..=0x7fff => {
                let n = ((off - 0x6000) / 8) as u32;
                let r = spi(n).map_or(0, |i| i.route);
                match size {
                    8 => r,
                    _ if off % 8 == 4 => r >> 32,
                    _ => r & 0xffff_ffff,
                }
            }
            0xffd0..=0xffff => id_reg(off),
            _ => 0,
        })
    }

    pub fn dist_write(
        &mut self,
        off: u64,
        size: u8,
        val: u64,
        acts: &mut Vec<PhysAction>,
    ) -> Result<(), MmioError> {
        Self::dist_check(off, size)?;
        match off {
            0 => self.ctlr = val & 3,
            0x080..=0x3ff => {
                let reg = off & !0x7f;
                let first = ((off & 0x7f) / 4 * 32) as u32;
                for b in 0..32 {
                    if let Some(i) = self.spis.get_mut(&(first + b)) {
                        bit_write(reg, i, (val >> b) & 1 != 0, acts);
                    }
                }
            }
            0x400..=0x7ff => {
                for k in 0..u64::from(size) {
                    let n = (off - 0x400 + k) as u32;
                    let p = (val >> (8 * k)) as u8 & self.prio_mask;
                    if let Some(i) = self.spis.get_mut(&n) {
                        if i.priority != p {
                            i.priority = p;
                            if let Some(pintid) = i.hw {
                                acts.push(PhysAction::Priority {
                                    pintid,
                                    priority: p,
                                });
                            }
                        }
                    }
                }
            }
            0xc00..=0xcff => {
                for k in 0..16 {
                    let n = ((off - 0xc00) / 4 * 16) as u32 + k;
                    let level = (val >> (2 * k + 1)) & 1 == 0;
                    if let Some(i) = self.spis.get_mut(&n) {
                        if i.level != level {
                            i.level = level;
                            if let Some(pintid) = i.hw {
                                acts.push(PhysAction::Trigger { pintid, level });
                            }
                        }
                    }
                }
            }
            0x6000..=0x7fff => {
                let n = ((off - 0x6000) / 8) as u32;
                let Some(old) = self.spis.get(&n).map(|i| i.route) else {
                    return Ok(());
                };
                let new = match size {
                    8 => val,
                    _ if off % 8 == 4 => (old & 0xffff_ffff) | (val << 32),
                    _ => (old & !0xffff_ffff) | (val & 0xffff_ffff),
                } & 0xff_80ff_ffff;
                let t = self.target(new);
                let pcpu = 0x100 + t.unwrap_or(0) as u64;
                if let Some(i) = self.spis.get_mut(&n) {
                    i.route = new;
                    if let (Some(pintid), true) = (i.hw, new != old) {
                        acts.push(PhysAction::Route {
                            pintid,
                            mpidr: pcpu,
                        });
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn redist_decode(&self, off: u64, size: u8) -> Result<(usize, bool, u64), MmioError> {
        let v = off / 0x2_0000;
        let sgi = off % 0x2_0000 >= 0x1_0000;
        let r = off % 0x1_0000;
        let dword = !sgi && matches!(r, 0x8 | 0xc | 0x70..=0x7f | 0xa0..=0xa7 | 0xb0..=0xb7);
        let byte = sgi && (0x400..0x420).contains(&r);
        if !size_ok(size, byte, dword) {
            return Err(MmioError::BadSize);
        }
        if r % u64::from(size) != 0 {
            return Err(MmioError::Misaligned);
        }
        let v = usize::try_from(v).map_err(|_| MmioError::OutOfRange)?;
        if v >= self.mpidr.len() {
            return Err(MmioError::OutOfRange);
        }
        Ok((v, sgi, r))
    }

    pub fn redist_read(&self, off: u64, size: u8) -> Result<u64, MmioError> {
        let (v, sgi, r) = self.redist_decode(off, size)?;
        let p = &self.private[v];
        Ok(match (sgi, r) {
            (false, 0x4) => 0x5400_043b,
            (false, 0x8..=0xf) => {
                let m = self.mpidr[v];
                let aff = (m & 0xff_ffff) | ((m >> 32 & 0xff) << 24);
                let last = u64::from(v + 1 == self.mpidr.len()) << 4;
                let t = (aff << 32) | ((v as u64) << 8) | last;
                match (size, r) {
                    (8, _) => t,
                    (_, 0xc) => t >> 32,
                    _ => t & 0xffff_ffff,
                }
            }
            (false, 0x14) => u64::from(self.sleep[v]) * 6,
            (false, 0xffd0..=0xffff) => id_reg(r),
            (true, 0x080 | 0x100 | 0x180 | 0x200 | 0x280 | 0x300 | 0x380) => {
                (0..32).fold(0, |acc, b| acc | (u64::from(bit_read(r, &p[b])) << b))
            }
            (true, 0x400..=0x41f) => (0..u64::from(size)).fold(0, |acc, k| {
                acc | (u64::from(p[(r - 0x400 + k) as usize].priority) << (8 * k))
            }),
            (true, 0xc00) => 0xaaaa_aaaa,
            (true, 0xc04) => (16..32).fold(0, |acc, n| {
                acc | (u64::from(!p[n].level) << (2 * (n - 16) + 1))
            }),
            _ => 0,
        })
    }

    pub fn redist_write(&mut self, off: u64, size: u8, val: u64) -> Result<(), MmioError> {
        let (v, sgi, r) = self.redist_decode(off, size)?;
        let mask = self.prio_mask;
        let p = &mut self.private[v];
        let mut none = Vec::new();
        match (sgi, r) {
            (false, 0x14) => self.sleep[v] = val & 2 != 0,
            (true, 0x080 | 0x100 | 0x180 | 0x200 | 0x280 | 0x300 | 0x380) => {
                for (b, irq) in p.iter_mut().enumerate() {
                    bit_write(r, irq, (val >> b) & 1 != 0, &mut none);
                }
            }
            (true, 0x400..=0x41f) => {
                for k in 0..u64::from(size) {
                    p[(r - 0x400 + k) as usize].priority = (val >> (8 * k)) as u8 & mask;
                }
            }
            (true, 0xc04) => {
                for (n, irq) in p.iter_mut().enumerate().skip(16) {
                    irq.level = (val >> (2 * (n - 16) + 1)) & 1 == 0;
                }
            }
            _ => {}
        }
        assert!(none.is_empty());
        Ok(())
    }

    /// The vCPUs named by an SGI register write, per the register description.
    pub fn sgi(&mut self, sender: usize, reg: SgiRegister, val: u64) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        let Some(&from) = self.mpidr.get(sender) else {
            return out;
        };
        let intid = ((val >> 24) & 0xf) as usize;
        let irm = val & (1 << 40) != 0;
        let aff =
            ((val >> 48 & 0xff) << 32) | ((val >> 32 & 0xff) << 16) | ((val >> 16 & 0xff) << 8);
        let rs = (val >> 44) & 0xf;
        for (i, &m) in self.mpidr.clone().iter().enumerate() {
            let m = m & 0xff_00ff_ffff;
            let hit = if irm {
                m != from & 0xff_00ff_ffff
            } else {
                let a0 = m & 0xff;
                m & !0xff == aff && a0 / 16 == rs && val & (1 << (a0 % 16)) != 0
            };
            let irq = &mut self.private[i][intid];
            if hit && (reg == SgiRegister::Sgi1r || !irq.group1) {
                irq.latch = true;
                out.insert(i);
            }
        }
        out
    }

    /// What `flush` of vCPU `v` must produce, given the INTIDs already in other vCPUs'
    /// list registers: the LR values and the `ICH_HCR_EL2` requests.
    pub fn expected_flush(&self, v: usize, taken: &BTreeSet<u32>) -> (Vec<LrValue>, u64) {
        let mut cands: Vec<((u8, u8, u32), LrValue)> = Vec::new();
        let mut offer = |n: u32, i: &MIrq| {
            let pend = i.enabled && i.pending() && self.grp_on(i);
            if !(pend || i.active) {
                return;
            }
            let key = (u8::from(pend && !i.active), i.priority, n);
            let lr_pend = pend && !(i.hw.is_some() && i.active);
            let state = match (lr_pend, i.active) {
                (true, true) => LrState::PendingActive,
                (true, false) => LrState::Pending,
                _ => LrState::Active,
            };
            let eoi = i.level && i.hw.is_none() && lr_pend;
            cands.push((key, LrValue::new(n, state, i.priority, i.group1, i.hw, eoi)));
        };
        for (n, i) in self.private[v].iter().enumerate() {
            offer(n as u32, i);
        }
        for (&n, i) in &self.spis {
            if self.target(i.route) == Some(v) && !taken.contains(&n) {
                offer(n, i);
            }
        }
        cands.sort_by_key(|c| c.0);
        let overflow = cands.len() > self.nr_lrs;
        let lrs: Vec<LrValue> = cands.iter().take(self.nr_lrs).map(|c| c.1).collect();
        let mut hcr = 0;
        if overflow {
            if lrs.iter().any(|l| l.state().pending()) {
                hcr = ICH_HCR_NPIE;
            } else if lrs.len() >= 2 {
                hcr = ICH_HCR_UIE;
            }
        }
        (lrs, hcr)
    }

    /// The interrupt `n` as seen from vCPU `v`.
    pub fn irq_mut(&mut self, v: usize, n: u32) -> &mut MIrq {
        if n < 32 {
            &mut self.private[v][n as usize]
        } else {
            self.spis.get_mut(&n).expect("owned SPI")
        }
    }

    /// A list register written as `w` read back as `r`: the model's view of what the
    /// guest did.
    pub fn fold(&mut self, v: usize, w: LrValue, r: LrState) {
        let irq = self.irq_mut(v, w.vintid());
        let level_sw = irq.level && irq.hw.is_none();
        if w.state().pending() && !level_sw {
            irq.latch = false;
        }
        irq.active = r.active();
        if level_sw {
            if !r.pending() {
                irq.latch = false;
            }
        } else if r.pending() {
            irq.latch = true;
        }
    }
}
