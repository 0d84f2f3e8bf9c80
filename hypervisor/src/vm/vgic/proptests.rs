//! Property tests: random sequences of guest register accesses from several vCPUs,
//! SGIs, injections and entry/exit rounds with a simulated guest, checked step by step
//! against [`super::model::Model`].

use super::lr::{LrState, LrValue, ICH_HCR_NPIE, ICH_HCR_UIE, VTR_PRI_BITS_SHIFT};
use super::model::Model;
use super::sgi::SgiRegister;
use super::*;
use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use proptest::prelude::*;

/// Three vCPUs in two clusters.
const MPIDRS: [u64; 3] = [0x0, 0x1, 0x100];
/// INTIDs 33 and 34 emulated, 40 -> 72 and 63 -> 99 physical; 32, 35-39, 41-62 not
/// owned (but inside ITLinesNumber).
const SPIS: [(u32, Option<u32>); 4] = [(33, None), (34, None), (40, Some(72)), (63, Some(99))];
const OWNED_PHYS: [u32; 2] = [72, 99];

fn config(lrs: usize) -> (Vec<VcpuDesc>, Vec<SpiDesc>, u64) {
    let vcpus = MPIDRS
        .iter()
        .enumerate()
        .map(|(i, &m)| VcpuDesc {
            mpidr: m,
            pcpu_mpidr: 0x100 + i as u64,
        })
        .collect();
    let spis = SPIS
        .iter()
        .map(|&(intid, p)| SpiDesc {
            intid,
            source: p.map_or(SpiSource::Virtual, |pintid| SpiSource::Hardware { pintid }),
        })
        .collect();
    // Five priority bits, `lrs` list registers.
    let vtr = (4 << VTR_PRI_BITS_SHIFT) | (lrs as u64 - 1);
    (vcpus, spis, vtr)
}

#[derive(Clone, Debug)]
enum Op {
    DistWrite(u64, u8, u64),
    DistRead(u64, u8),
    RedistWrite(u64, u8, u64),
    RedistRead(u64, u8),
    Sgi(usize, u8, u64),
    InjectHw(u32),
    InjectSpi(u32),
    SpiLevel(u32, bool),
    PpiLevel(usize, u32, bool),
    Vmcr(usize, u64),
    /// Flush every vCPU (in this order), let the guest act on each list register
    /// (0 nothing, 1 acknowledge, 2 deactivate, 3 both), sync every vCPU.
    Round(Vec<usize>, Vec<u8>),
}

fn size() -> impl Strategy<Value = u8> {
    prop_oneof![6 => Just(4u8), 2 => Just(1u8), 2 => Just(8u8), 1 => 0u8..=16]
}

fn dist_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0u64..0x1_0000,
        1 => Just(0u64),
        4 => (0u64..7, 0u64..4).prop_map(|(r, n)| 0x80 * (r + 1) + 4 * n),
        2 => 0x400u64..0x440,
        2 => (0u64..8).prop_map(|n| 0xc00 + 4 * n),
        3 => (28u64..66, prop::bool::ANY).prop_map(|(n, h)| 0x6000 + 8 * n + 4 * u64::from(h)),
        1 => 0x1_0000u64..0x1_0010,
        1 => Just(u64::MAX - 3),
    ]
}

fn redist_offset() -> impl Strategy<Value = u64> {
    let reg = prop_oneof![
        2 => 0u64..0x1_0000,
        3 => prop::sample::select(vec![0x0u64, 0x4, 0x8, 0xc, 0x14, 0x70, 0xffe8]),
        6 => (0u64..7).prop_map(|r| 0x1_0000 + 0x80 * (r + 1)),
        3 => 0x1_0400u64..0x1_0424,
        2 => prop::sample::select(vec![0x1_0c00u64, 0x1_0c04]),
        1 => 0x1_0000u64..0x2_0000,
    ];
    (0u64..4, reg).prop_map(|(v, r)| v * 0x2_0000 + r)
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => any::<u64>(),
        2 => (0u32..32).prop_map(|b| 1u64 << b),
        1 => Just(u64::MAX),
        1 => Just(0u64),
        2 => 0u64..4,
    ]
}

fn sgi_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => any::<u64>(),
        4 => (0u64..16, 0u64..3, prop::bool::weighted(0.25), 0u64..2, 0u64..8).prop_map(
            |(intid, aff1, irm, rs, list)| {
                (intid << 24) | (aff1 << 16) | (u64::from(irm) << 40) | (rs << 44) | list
            }
        ),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (dist_offset(), size(), value()).prop_map(|(o, s, v)| Op::DistWrite(o, s, v)),
        3 => (dist_offset(), size()).prop_map(|(o, s)| Op::DistRead(o, s)),
        8 => (redist_offset(), size(), value()).prop_map(|(o, s, v)| Op::RedistWrite(o, s, v)),
        3 => (redist_offset(), size()).prop_map(|(o, s)| Op::RedistRead(o, s)),
        4 => (0usize..4, 0u8..3, sgi_value()).prop_map(|(f, r, v)| Op::Sgi(f, r, v)),
        2 => prop_oneof![Just(72u32), Just(99u32), 0u32..1100].prop_map(Op::InjectHw),
        2 => prop_oneof![Just(33u32), Just(34u32), 0u32..1100].prop_map(Op::InjectSpi),
        2 => (prop_oneof![Just(33u32), Just(34u32), Just(40u32)], any::<bool>())
            .prop_map(|(n, l)| Op::SpiLevel(n, l)),
        3 => (0usize..4, prop_oneof![Just(27u32), Just(30u32), 0u32..40], any::<bool>())
            .prop_map(|(v, n, l)| Op::PpiLevel(v, n, l)),
        1 => (0usize..4, any::<u64>()).prop_map(|(v, x)| Op::Vmcr(v, x)),
        6 => (
            Just((0usize..3).collect::<Vec<_>>()).prop_shuffle(),
            prop::collection::vec(0u8..4, 48)
        )
            .prop_map(|(o, a)| Op::Round(o, a)),
    ]
}

fn sgi_reg(r: u8) -> SgiRegister {
    match r {
        0 => SgiRegister::Sgi0r,
        1 => SgiRegister::Sgi1r,
        _ => SgiRegister::Asgi1r,
    }
}

/// Registers whose values must agree after every step.
fn probe_offsets() -> (Vec<u64>, Vec<u64>) {
    let mut d = vec![0u64, 4];
    for r in 1..8u64 {
        d.push(0x80 * r + 4);
    }
    for n in 8..16u64 {
        d.push(0x400 + 4 * n);
    }
    d.extend([0xc08, 0xc0c]);
    for n in 32..64u64 {
        d.push(0x6000 + 8 * n);
        d.push(0x6000 + 8 * n + 4);
    }
    let mut r = Vec::new();
    for v in 0..3u64 {
        let b = v * 0x2_0000;
        r.extend([b + 0x8, b + 0xc, b + 0x14]);
        for k in 1..8u64 {
            r.push(b + 0x1_0000 + 0x80 * k);
        }
        for n in 0..8u64 {
            r.push(b + 0x1_0400 + 4 * n);
        }
        r.extend([b + 0x1_0c00, b + 0x1_0c04]);
    }
    (d, r)
}

/// Checks every probed register and the deliverable interrupt of every vCPU.
fn agree(g: &Vgic, m: &Model) -> Result<(), TestCaseError> {
    let (d, r) = probe_offsets();
    for off in d {
        prop_assert_eq!(g.dist_read(off, 4), m.dist_read(off, 4), "GICD {:#x}", off);
    }
    for off in r {
        prop_assert_eq!(
            g.redist_read(off, 4),
            m.redist_read(off, 4),
            "GICR {:#x}",
            off
        );
    }
    for v in 0..3 {
        prop_assert_eq!(g.highest_pending(v), m.highest_pending(v), "vCPU {}", v);
        prop_assert_eq!(g.has_deliverable(v), m.highest_pending(v).is_some());
    }
    // Unowned SPIs inside the range never show any state.
    for n in (32..64u32).filter(|n| !SPIS.iter().any(|s| s.0 == *n)) {
        let word = 0x80 + 4 * u64::from(n / 32);
        for reg in 0..7u64 {
            let v = g.dist_read(word + 0x80 * reg, 4).unwrap_or(0);
            prop_assert_eq!(v & (1 << (n % 32)), 0, "unowned INTID {}", n);
        }
        prop_assert_eq!(g.dist_read(0x400 + u64::from(n), 1), Ok(0));
        prop_assert_eq!(g.dist_read(0x6000 + 8 * u64::from(n), 8), Ok(0));
    }
    Ok(())
}

fn run(lrs: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let (vcpus, spis, vtr) = config(lrs);
    let mut g = Vgic::new(&VgicConfig {
        vcpus: &vcpus,
        spis: &spis,
        ich_vtr: vtr,
    })
    .expect("config");
    let mut m = Model::new(&vcpus, &spis, lrs, 5);
    prop_assert_eq!(g.list_registers(), lrs);
    for op in ops {
        let before: Vec<bool> = (0..3).map(|v| m.takeable_any(v)).collect();
        let mut kicks = None;
        match *op {
            Op::DistWrite(o, s, v) => {
                let mut got = Vec::new();
                let mut want = Vec::new();
                let r = g.dist_write(o, s, v, &mut got);
                prop_assert_eq!(r.map(|_| ()), m.dist_write(o, s, v, &mut want));
                prop_assert_eq!(&got, &want);
                prop_assert!(got.iter().all(|a| OWNED_PHYS.contains(&a.pintid())));
                kicks = r.ok();
            }
            Op::DistRead(o, s) => prop_assert_eq!(g.dist_read(o, s), m.dist_read(o, s)),
            Op::RedistWrite(o, s, v) => {
                let r = g.redist_write(o, s, v, &mut NoPhys);
                prop_assert_eq!(r.map(|_| ()), m.redist_write(o, s, v));
                kicks = r.ok();
            }
            Op::RedistRead(o, s) => prop_assert_eq!(g.redist_read(o, s), m.redist_read(o, s)),
            Op::Sgi(from, r, v) => {
                let sent = g.sgi_write(from, sgi_reg(r), v);
                let want = m.sgi(from, sgi_reg(r), v);
                prop_assert_eq!(sent.iter().collect::<BTreeSet<_>>(), want.clone());
                prop_assert!(want.iter().all(|&t| t < 3));
                if v & (1 << 40) != 0 {
                    prop_assert!(!sent.contains(from), "broadcast reached the sender");
                }
                kicks = Some(sent);
            }
            Op::InjectHw(p) => {
                let r = g.inject_hw(p);
                let owner = m
                    .spis
                    .iter()
                    .find(|(_, i)| i.hw == Some(p))
                    .map(|(&n, _)| n);
                prop_assert_eq!(r.is_ok(), owner.is_some());
                if let Some(n) = owner {
                    m.irq_mut(0, n).latch = true;
                }
            }
            Op::InjectSpi(n) => {
                let r = g.inject_spi(n);
                let ok = m.spis.get(&n).is_some_and(|i| i.hw.is_none());
                prop_assert_eq!(r.is_ok(), ok);
                if ok {
                    m.irq_mut(0, n).latch = true;
                }
            }
            Op::SpiLevel(n, l) => {
                let r = g.set_spi_level(n, l);
                let ok = m.spis.get(&n).is_some_and(|i| i.hw.is_none());
                prop_assert_eq!(r.is_ok(), ok);
                if ok {
                    let i = m.irq_mut(0, n);
                    if !i.level && l && !i.line {
                        i.latch = true;
                    }
                    i.line = l;
                }
            }
            Op::PpiLevel(v, n, l) => {
                let r = g.set_ppi_level(v, n, l);
                let ok = v < 3 && (16..32).contains(&n);
                prop_assert_eq!(r.is_ok(), ok);
                if ok {
                    let i = m.irq_mut(v, n);
                    if !i.level && l && !i.line {
                        i.latch = true;
                    }
                    i.line = l;
                }
            }
            Op::Vmcr(v, x) => {
                g.set_vmcr(v, x);
                if let Some(c) = m.vmcr.get_mut(v) {
                    *c = ((x >> 24) as u8, x & 1 != 0, x & 2 != 0);
                }
            }
            Op::Round(ref order, ref acts) => round(&mut g, &mut m, order, acts)?,
        }
        if let Some(k) = kicks {
            for (v, was) in before.iter().enumerate() {
                if !was && m.takeable_any(v) {
                    prop_assert!(k.contains(v), "vCPU {} not kicked by {:?}", v, op);
                }
            }
        }
        agree(&g, &m)?;
    }
    Ok(())
}

/// One entry/exit of every vCPU with the list registers checked against the model.
fn round(g: &mut Vgic, m: &mut Model, order: &[usize], acts: &[u8]) -> Result<(), TestCaseError> {
    let mut taken = BTreeSet::new();
    let mut flushed = Vec::new();
    for &v in order {
        let f = g.flush(v);
        let (want, hcr) = m.expected_flush(v, &taken);
        prop_assert_eq!(f.lrs().len(), m.nr_lrs);
        prop_assert_eq!(f.used(), want.len());
        prop_assert_eq!(&f.lrs()[..want.len()], &want[..]);
        prop_assert!(f.lrs()[want.len()..].iter().all(|l| *l == LrValue::INVALID));
        prop_assert_eq!(f.hcr(), hcr);
        prop_assert_eq!(f.hcr() & !(ICH_HCR_NPIE | ICH_HCR_UIE), 0);
        for l in &want {
            // No interrupt twice: an SPI in at most one vCPU's list registers.
            if l.vintid() >= 32 {
                prop_assert!(taken.insert(l.vintid()), "SPI {} twice", l.vintid());
            }
        }
        let ids: BTreeSet<u32> = want.iter().map(|l| l.vintid()).collect();
        prop_assert_eq!(ids.len(), want.len(), "an INTID twice in one vCPU");
        flushed.push((v, want));
    }
    let mut k = 0;
    for (v, lrs) in flushed {
        let mut back = Vec::new();
        for l in &lrs {
            let a = acts.get(k).copied().unwrap_or(0);
            k += 1;
            let s = l.state();
            let after = match (a, s) {
                (1, LrState::Pending) => LrState::Active,
                (2, LrState::Active) => LrState::Invalid,
                (2, LrState::PendingActive) => LrState::Pending,
                (3, LrState::Pending | LrState::Active) => LrState::Invalid,
                (3, LrState::PendingActive) => LrState::Pending,
                _ => s,
            };
            back.push(l.with_state(after).0);
            m.fold(v, *l, after);
        }
        g.sync(v, &back);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random guest and hypervisor activity agrees with the model at every step.
    #[test]
    fn random_sequences_agree_with_the_model(
        lrs in 1usize..=4,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run(lrs, &ops)?;
    }

    /// Any number of pending interrupts reaches the guest through list-register
    /// refills, highest priority first, each exactly once.
    #[test]
    fn every_pending_interrupt_is_delivered(
        lrs in 1usize..=4,
        prios in prop::collection::vec(0u8..32, 32),
        spi_prios in prop::collection::vec(0u8..32, 2),
    ) {
        let (vcpus, spis, vtr) = config(lrs);
        let mut g = Vgic::new(&VgicConfig { vcpus: &vcpus, spis: &spis, ich_vtr: vtr }).unwrap();
        let mut phys = Vec::new();
        g.dist_write(0, 4, 3, &mut phys).unwrap();
        // Edge-triggered everything, enabled, with the given priorities; all pending.
        g.redist_write(0x1_0c04, 4, 0xaaaa_aaaa, &mut NoPhys).unwrap();
        g.redist_write(0x1_0100, 4, 0xffff_ffff, &mut NoPhys).unwrap();
        for (n, p) in prios.iter().enumerate() {
            g.redist_write(0x1_0400 + n as u64, 1, u64::from(*p) << 3, &mut NoPhys).unwrap();
        }
        g.redist_write(0x1_0200, 4, 0xffff_ffff, &mut NoPhys).unwrap();
        g.dist_write(0xc08, 4, 0xaaaa_aaaa, &mut phys).unwrap();
        g.dist_write(0x104, 4, (1 << 1) | (1 << 2), &mut phys).unwrap();
        g.dist_write(0x400 + 33, 1, u64::from(spi_prios[0]) << 3, &mut phys).unwrap();
        g.dist_write(0x400 + 34, 1, u64::from(spi_prios[1]) << 3, &mut phys).unwrap();
        g.inject_spi(33).unwrap();
        g.inject_spi(34).unwrap();
        let mut left: BTreeSet<(u8, u32)> = prios
            .iter()
            .enumerate()
            .map(|(n, p)| (*p << 3, n as u32))
            .chain([(spi_prios[0] << 3, 33), (spi_prios[1] << 3, 34)])
            .collect();
        let total = left.len();
        let mut delivered = 0;
        let mut f = g.flush(0);
        for _ in 0..=total {
            if f.used() == 0 {
                break;
            }
            prop_assert!(f.used() <= lrs);
            // Highest priority first: nothing left outside is better than what is in.
            let inside: Vec<(u8, u32)> = f.lrs()[..f.used()]
                .iter()
                .map(|l| (l.priority(), l.vintid()))
                .collect();
            for x in &inside {
                prop_assert!(left.remove(x), "{:?} delivered twice or never pending", x);
            }
            if let Some(first_out) = left.iter().next() {
                prop_assert!(inside.iter().all(|x| x < first_out));
                // More than fit: a maintenance interrupt is requested.
                prop_assert_eq!(f.hcr(), ICH_HCR_NPIE);
            } else {
                prop_assert_eq!(f.hcr(), 0);
            }
            delivered += inside.len();
            // The guest takes and completes all of them; the maintenance interrupt
            // (or the next exit) refills.
            let back: Vec<u64> = f.lrs().iter().map(|l| l.with_state(LrState::Invalid).0).collect();
            f = g.maintenance(0, &back);
        }
        prop_assert_eq!(delivered, total);
        prop_assert!(left.is_empty());
        prop_assert!(!g.has_deliverable(0));
    }

    /// Nothing a guest does with any offset, size and value panics, on either frame.
    #[test]
    fn arbitrary_accesses_never_panic(
        accesses in prop::collection::vec((any::<u64>(), any::<u8>(), any::<u64>(), any::<bool>()), 1..64),
    ) {
        let (vcpus, spis, vtr) = config(4);
        let mut g = Vgic::new(&VgicConfig { vcpus: &vcpus, spis: &spis, ich_vtr: vtr }).unwrap();
        let mut phys = Vec::new();
        for (off, size, val, redist) in accesses {
            if redist {
                let _ = g.redist_write(off, size, val, &mut NoPhys);
                let _ = g.redist_read(off, size);
            } else {
                let _ = g.dist_write(off, size, val, &mut phys);
                let _ = g.dist_read(off, size);
            }
            let _ = g.sgi_write((val & 7) as usize, SgiRegister::Sgi1r, off);
            let _ = g.flush((size & 3) as usize);
            g.sync((size & 3) as usize, &[val, off]);
        }
        prop_assert!(phys.iter().all(|a| OWNED_PHYS.contains(&a.pintid())));
    }
}
