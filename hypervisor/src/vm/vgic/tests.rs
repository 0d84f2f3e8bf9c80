//! Host tests of the virtual GIC: one group per register block, SGI routing, list
//! registers; `proptest` runs random access sequences against a simple model
//! (`model.rs`).

use super::dist::*;
use super::lr::*;
use super::redist::*;
use super::sgi::*;
use super::*;
use alloc::vec;
use alloc::vec::Vec;

/// QEMU's `ICH_VTR_EL2`: PRIbits = 4 (five priority bits), ListRegs = 3 (four LRs).
pub(crate) const VTR_QEMU: u64 = (4 << VTR_PRI_BITS_SHIFT) | 3;
/// The hardware SPI the tests give their VM: virtual 40 = physical 72.
const HW_V: u32 = 40;
const HW_P: u32 = 72;
/// An emulated SPI.
const VIRT: u32 = 33;

fn vcpus(n: usize) -> Vec<VcpuDesc> {
    (0..n)
        .map(|i| VcpuDesc {
            // Aff1 = i / 4, Aff0 = i % 4, like QEMU virt's clusters.
            mpidr: (((i / 4) as u64) << 8) | (i % 4) as u64,
            pcpu_mpidr: 0x100 + i as u64,
        })
        .collect()
}

fn spis() -> Vec<SpiDesc> {
    vec![
        SpiDesc {
            intid: VIRT,
            source: SpiSource::Virtual,
        },
        SpiDesc {
            intid: HW_V,
            source: SpiSource::Hardware { pintid: HW_P },
        },
    ]
}

fn vgic(n: usize) -> Vgic {
    let v = vcpus(n);
    let s = spis();
    Vgic::new(&VgicConfig {
        vcpus: &v,
        spis: &s,
        ich_vtr: VTR_QEMU,
    })
    .expect("valid config")
}

fn rd(vcpu: usize, off: u64) -> u64 {
    vcpu as u64 * REDIST_STRIDE + off
}

fn sgi(vcpu: usize, off: u64) -> u64 {
    rd(vcpu, off) + FRAME_SIZE
}

/// Writes a 32-bit distributor register, expecting success, with no physical effect
/// allowed unless `phys` is checked by the caller.
fn dw(g: &mut Vgic, off: u64, val: u64) -> Vec<PhysAction> {
    let mut phys = Vec::new();
    g.dist_write(off, 4, val, &mut phys).expect("write");
    phys
}

fn dr(g: &Vgic, off: u64) -> u64 {
    g.dist_read(off, 4).expect("read")
}

// ---- configuration ----

#[test]
fn config_is_checked() {
    let v = vcpus(2);
    let bad = |spis: &[SpiDesc], vcpus: &[VcpuDesc]| {
        Vgic::new(&VgicConfig {
            vcpus,
            spis,
            ich_vtr: VTR_QEMU,
        })
        .err()
    };
    assert_eq!(bad(&[], &[]), Some(ConfigError::NoVcpus));
    let many = vcpus(65);
    assert_eq!(bad(&[], &many), Some(ConfigError::TooManyVcpus));
    let twins = [v[0], v[0]];
    assert_eq!(bad(&[], &twins), Some(ConfigError::DuplicateAffinity(0)));
    let spi = |intid, source| SpiDesc { intid, source };
    assert_eq!(
        bad(&[spi(31, SpiSource::Virtual)], &v),
        Some(ConfigError::SpiOutOfRange(31))
    );
    assert_eq!(
        bad(&[spi(1020, SpiSource::Virtual)], &v),
        Some(ConfigError::SpiOutOfRange(1020))
    );
    assert_eq!(
        bad(
            &[spi(40, SpiSource::Virtual), spi(40, SpiSource::Virtual)],
            &v
        ),
        Some(ConfigError::DuplicateSpi(40))
    );
    let hw = |p| SpiSource::Hardware { pintid: p };
    assert_eq!(
        bad(&[spi(40, hw(27))], &v),
        Some(ConfigError::PhysOutOfRange(27))
    );
    assert_eq!(
        bad(&[spi(40, hw(50)), spi(41, hw(50))], &v),
        Some(ConfigError::DuplicatePhys(50))
    );
    assert!(bad(&[spi(1019, hw(1019))], &v).is_none());
}

#[test]
fn list_registers_and_priority_bits_come_from_vtr() {
    assert_eq!(list_regs_from_vtr(VTR_QEMU), 4);
    assert_eq!(list_regs_from_vtr(0), 1);
    assert_eq!(list_regs_from_vtr(0xf), 16);
    assert_eq!(list_regs_from_vtr(0x1f), 16);
    assert_eq!(priority_bits_from_vtr(VTR_QEMU), 5);
    assert_eq!(priority_bits_from_vtr(7 << 29), 8);
    assert_eq!(vgic(1).list_registers(), 4);
}

// ---- distributor ----

#[test]
fn gicd_ctlr_reset_are_ds_and_group_enables() {
    let mut g = vgic(2);
    assert_eq!(dr(&g, GICD_CTLR), u64::from(CTLR_ARE | CTLR_DS));
    // Linux: ARE_NS | EnableGrp1A | EnableGrp1 (bits 4, 1, 0); RWP never reads 1.
    dw(&mut g, GICD_CTLR, 0x13);
    assert_eq!(dr(&g, GICD_CTLR), 0x53);
    dw(&mut g, GICD_CTLR, 0xffff_ffff);
    assert_eq!(
        dr(&g, GICD_CTLR),
        0x53,
        "only the group enables are writable"
    );
    dw(&mut g, GICD_CTLR, 0);
    assert_eq!(dr(&g, GICD_CTLR), 0x50, "ARE and DS stay set");
}

#[test]
fn gicd_typer_reports_the_vms_own_interrupts() {
    let g = vgic(2);
    let t = dr(&g, GICD_TYPER);
    assert_eq!(t & 0x1f, 1, "SPIs up to 63: ITLinesNumber = 1");
    assert_eq!((t >> 5) & 7, 1, "CPUNumber = vCPUs - 1");
    assert_eq!((t >> 19) & 0x1f, 9, "IDbits: 10-bit INTIDs");
    assert_eq!(t & (1 << 17), 0, "no LPIs");
    assert_eq!(t & (1 << 16), 0, "no MBIS");
    assert_eq!(t & (0x1f << 11), 0, "num_LPIs = 0");
    assert_eq!(t & (1 << 10), 0, "no Security extension");
    assert_ne!(t & u64::from(TYPER_RSS), 0);
    assert_ne!(t & u64::from(TYPER_A3V), 0);
    let v = vcpus(12);
    let top = [SpiDesc {
        intid: 1019,
        source: SpiSource::Virtual,
    }];
    let big = Vgic::new(&VgicConfig {
        vcpus: &v,
        spis: &top,
        ich_vtr: VTR_QEMU,
    })
    .unwrap();
    let t = big.dist_read(GICD_TYPER, 4).unwrap();
    assert_eq!(t & 0x1f, 31);
    assert_eq!((t >> 5) & 7, 7, "CPUNumber saturates at 8 PEs");
    assert_eq!(big.intid_limit(), 1024);
    let none = Vgic::new(&VgicConfig {
        vcpus: &v[..1],
        spis: &[],
        ich_vtr: VTR_QEMU,
    })
    .unwrap();
    assert_eq!(none.dist_read(GICD_TYPER, 4).unwrap() & 0xff, 0);
}

#[test]
fn id_registers() {
    let g = vgic(1);
    assert_eq!((dr(&g, GICD_PIDR2) >> 4) & 0xf, 3, "ArchRev = GICv3");
    assert_eq!(dr(&g, GICD_IIDR) & 0xfff, 0x43b);
    assert_eq!(dr(&g, 0xfff0), 0x0d);
    assert_eq!(dr(&g, 0xfffc), 0xb1);
    assert_eq!(g.redist_read(rd(0, GICR_PIDR2), 4).unwrap() >> 4 & 0xf, 3);
    assert_eq!(g.redist_read(rd(0, GICR_IIDR), 4).unwrap() & 0xfff, 0x43b);
}

#[test]
fn access_size_and_alignment_rules() {
    let mut g = vgic(1);
    let mut phys = Vec::new();
    assert_eq!(g.dist_read(GICD_CTLR, 8), Err(MmioError::BadSize));
    assert_eq!(g.dist_read(GICD_CTLR, 2), Err(MmioError::BadSize));
    assert_eq!(g.dist_read(GICD_CTLR, 1), Err(MmioError::BadSize));
    assert_eq!(g.dist_read(GICD_CTLR, 0), Err(MmioError::BadSize));
    assert_eq!(g.dist_read(GICD_CTLR, 3), Err(MmioError::BadSize));
    assert_eq!(g.dist_read(GICD_TYPER + 2, 4), Err(MmioError::Misaligned));
    assert_eq!(g.dist_read(DIST_SIZE, 4), Err(MmioError::OutOfRange));
    assert_eq!(g.dist_read(u64::MAX, 4), Err(MmioError::OutOfRange));
    assert_eq!(g.dist_read(GICD_IPRIORITYR + 41, 1), Ok(0));
    assert_eq!(
        g.dist_read(GICD_IPRIORITYR + 41, 4),
        Err(MmioError::Misaligned)
    );
    assert_eq!(g.dist_read(GICD_ITARGETSR + 41, 1), Ok(0));
    assert_eq!(g.dist_read(GICD_IROUTER + 8 * 40, 8), Ok(0));
    assert_eq!(g.dist_read(GICD_IROUTER + 8 * 40 + 4, 4), Ok(0));
    assert_eq!(
        g.dist_read(GICD_IROUTER + 8 * 40 + 4, 8),
        Err(MmioError::Misaligned)
    );
    assert_eq!(
        g.dist_read(GICD_IROUTER + 8 * 40, 1),
        Err(MmioError::BadSize)
    );
    // A refused write changes nothing.
    assert_eq!(
        g.dist_write(GICD_CTLR, 8, 3, &mut phys),
        Err(MmioError::BadSize)
    );
    assert_eq!(dr(&g, GICD_CTLR), 0x50);
    assert_eq!(
        g.dist_write(GICD_ISENABLER + 5, 4, !0, &mut phys),
        Err(MmioError::Misaligned)
    );
    assert!(phys.is_empty());
    // Redistributor: TYPER 64-bit or halves; other registers 32-bit.
    assert!(g.redist_read(rd(0, GICR_TYPER), 8).is_ok());
    assert!(g.redist_read(rd(0, GICR_TYPER + 4), 4).is_ok());
    assert_eq!(g.redist_read(rd(0, GICR_WAKER), 8), Err(MmioError::BadSize));
    assert_eq!(
        g.redist_read(sgi(0, GICR_ISENABLER0), 1),
        Err(MmioError::BadSize)
    );
    assert_eq!(g.redist_read(sgi(0, GICR_IPRIORITYR + 3), 1), Ok(0));
    assert_eq!(
        g.redist_read(rd(1, GICR_TYPER), 8),
        Err(MmioError::OutOfRange)
    );
    assert_eq!(
        g.redist_write(rd(1, GICR_WAKER), 4, 0, &mut NoPhys),
        Err(MmioError::OutOfRange)
    );
    assert_eq!(g.redist_read(u64::MAX - 3, 4), Err(MmioError::OutOfRange));
}

#[test]
fn unimplemented_registers_are_raz_wi() {
    let mut g = vgic(1);
    for off in [
        0x000c,
        0x0010,
        0x0040,
        0x0048,
        GICD_ITARGETSR + 40,
        GICD_IGRPMODR + 4,
        0x0e08,
        GICD_SGIR,
        GICD_CPENDSGIR,
        GICD_SPENDSGIR,
        0x5000,
        0x8000,
        0xffd4,
    ] {
        assert!(dw(&mut g, off, 0xffff_ffff).is_empty(), "{off:#x}");
        assert_eq!(dr(&g, off), 0, "{off:#x}");
    }
    // The private interrupts' distributor registers are RAZ/WI with ARE.
    for off in [
        GICD_ISENABLER,
        GICD_ISPENDR,
        GICD_IGROUPR,
        GICD_ICFGR,
        GICD_IPRIORITYR,
    ] {
        dw(&mut g, off, 0xffff_ffff);
        assert_eq!(dr(&g, off), 0, "{off:#x}");
    }
    assert_eq!(g.gicr_typer(0) & 1, 0, "no PLPIS");
    let cases = [
        (GICR_CTLR, 4),
        (GICR_PROPBASER, 8),
        (GICR_PENDBASER, 8),
        (0x0010, 4),
    ];
    for (off, size) in cases {
        g.redist_write(rd(0, off), size, u64::MAX, &mut NoPhys)
            .unwrap();
        assert_eq!(g.redist_read(rd(0, off), size), Ok(0), "{off:#x}");
    }
}

#[test]
fn enable_w1s_w1c_only_on_owned_spis() {
    let mut g = vgic(1);
    let phys = dw(&mut g, GICD_ISENABLER + 4, 0xffff_ffff);
    // Owned: 33 (bit 1) and 40 (bit 8); nothing else sticks.
    assert_eq!(dr(&g, GICD_ISENABLER + 4), (1 << 1) | (1 << 8));
    assert_eq!(dr(&g, GICD_ICENABLER + 4), (1 << 1) | (1 << 8));
    assert_eq!(
        phys,
        vec![PhysAction::Enable {
            pintid: HW_P,
            enable: true
        }]
    );
    // Writing zeroes changes nothing; writing 1 to ICENABLER clears.
    assert!(dw(&mut g, GICD_ICENABLER + 4, 0).is_empty());
    assert_eq!(dr(&g, GICD_ISENABLER + 4), 0x102);
    let phys = dw(&mut g, GICD_ICENABLER + 4, 1 << 8);
    assert_eq!(dr(&g, GICD_ISENABLER + 4), 0x2);
    assert_eq!(
        phys,
        vec![PhysAction::Enable {
            pintid: HW_P,
            enable: false
        }]
    );
    // Repeating a write that changes nothing sends nothing to the physical GIC.
    assert!(dw(&mut g, GICD_ICENABLER + 4, 1 << 8).is_empty());
    // Unowned SPIs in other registers: nothing.
    assert!(dw(&mut g, GICD_ISENABLER + 8, !0).is_empty());
    assert_eq!(dr(&g, GICD_ISENABLER + 8), 0);
}

#[test]
fn pending_and_active_w1s_w1c() {
    let mut g = vgic(1);
    assert!(dw(&mut g, GICD_ISPENDR + 4, 1 << 1).is_empty());
    assert_eq!(dr(&g, GICD_ISPENDR + 4), 1 << 1);
    assert_eq!(dr(&g, GICD_ICPENDR + 4), 1 << 1);
    dw(&mut g, GICD_ICPENDR + 4, 1 << 1);
    assert_eq!(dr(&g, GICD_ISPENDR + 4), 0);
    dw(&mut g, GICD_ISACTIVER + 4, 1 << 1);
    assert_eq!(dr(&g, GICD_ISACTIVER + 4), 1 << 1);
    dw(&mut g, GICD_ICACTIVER + 4, 1 << 1);
    assert_eq!(dr(&g, GICD_ICACTIVER + 4), 0);
    // A hardware SPI: the pending request goes to the physical distributor, and the
    // interrupt comes back when EL2 takes it.
    let phys = dw(&mut g, GICD_ISPENDR + 4, 1 << 8);
    assert_eq!(
        phys,
        vec![PhysAction::Pending {
            pintid: HW_P,
            pending: true
        }]
    );
    assert_eq!(dr(&g, GICD_ISPENDR + 4), 0);
    assert_eq!(g.inject_hw(HW_P), Ok(None), "disabled: nobody to kick");
    assert_eq!(dr(&g, GICD_ISPENDR + 4), 1 << 8);
    // Clearing it drops the physical activation EL2 holds for it.
    let phys = dw(&mut g, GICD_ICPENDR + 4, 1 << 8);
    assert_eq!(
        phys,
        vec![
            PhysAction::Pending {
                pintid: HW_P,
                pending: false
            },
            PhysAction::Active {
                pintid: HW_P,
                active: false
            }
        ]
    );
    let phys = dw(&mut g, GICD_ISACTIVER + 4, 1 << 8);
    assert_eq!(
        phys,
        vec![PhysAction::Active {
            pintid: HW_P,
            active: true
        }]
    );
    assert_eq!(g.inject_hw(HW_P + 1), Err(IrqError::NotOwned));
    assert_eq!(g.inject_spi(HW_V), Err(IrqError::NotOwned), "not emulated");
    assert_eq!(g.inject_spi(34), Err(IrqError::NotOwned));
    assert_eq!(g.inject_spi(5), Err(IrqError::NotOwned));
}

#[test]
fn groups_are_read_write() {
    let mut g = vgic(1);
    assert_eq!(dr(&g, GICD_IGROUPR + 4), 0x102, "Group 1 at reset");
    dw(&mut g, GICD_IGROUPR + 4, 0);
    assert_eq!(dr(&g, GICD_IGROUPR + 4), 0);
    dw(&mut g, GICD_IGROUPR + 4, !0);
    assert_eq!(dr(&g, GICD_IGROUPR + 4), 0x102);
}

#[test]
fn priorities_are_byte_accessible_and_masked() {
    let mut g = vgic(1);
    let mut phys = Vec::new();
    // INTID 33 is byte 1 of IPRIORITYR8 (offset 0x420); five priority bits.
    g.dist_write(GICD_IPRIORITYR + 33, 1, 0xa7, &mut phys)
        .unwrap();
    assert_eq!(g.dist_read(GICD_IPRIORITYR + 33, 1), Ok(0xa0));
    assert_eq!(g.dist_read(GICD_IPRIORITYR + 32, 4), Ok(0xa000));
    // A word write touches four INTIDs; unowned ones stay 0.
    g.dist_write(GICD_IPRIORITYR + 40, 4, 0x4030_2018, &mut phys)
        .unwrap();
    assert_eq!(g.dist_read(GICD_IPRIORITYR + 40, 4), Ok(0x18));
    assert_eq!(
        phys,
        vec![PhysAction::Priority {
            pintid: HW_P,
            priority: 0x18
        }]
    );
    // Redistributor: PPIs and SGIs, bytes and words.
    g.redist_write(sgi(0, GICR_IPRIORITYR + 27), 1, 0x88, &mut NoPhys)
        .unwrap();
    assert_eq!(
        g.redist_read(sgi(0, GICR_IPRIORITYR + 24), 4),
        Ok(0x8800_0000)
    );
    g.redist_write(sgi(0, GICR_IPRIORITYR), 4, 0xffff_ffff, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(sgi(0, GICR_IPRIORITYR), 4), Ok(0xf8f8_f8f8));
    assert_eq!(g.redist_read(sgi(0, GICR_IPRIORITYR + 0x20), 4), Ok(0));
}

#[test]
fn icfgr_trigger_mode() {
    let mut g = vgic(1);
    // SPIs reset level-sensitive; INTID 33 is field 1 of ICFGR2, INTID 40 field 8.
    assert_eq!(dr(&g, GICD_ICFGR + 8), 0);
    let phys = dw(&mut g, GICD_ICFGR + 8, 0xffff_ffff);
    assert_eq!(dr(&g, GICD_ICFGR + 8), (0b10 << 2) | (0b10 << 16));
    assert_eq!(
        phys,
        vec![PhysAction::Trigger {
            pintid: HW_P,
            level: false
        }]
    );
    // SGIs always edge; PPIs writable, level at reset.
    assert_eq!(g.redist_read(sgi(0, GICR_ICFGR0), 4), Ok(0xaaaa_aaaa));
    g.redist_write(sgi(0, GICR_ICFGR0), 4, 0, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(sgi(0, GICR_ICFGR0), 4), Ok(0xaaaa_aaaa));
    assert_eq!(g.redist_read(sgi(0, GICR_ICFGR1), 4), Ok(0));
    g.redist_write(sgi(0, GICR_ICFGR1), 4, 0x5555_ffff, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(sgi(0, GICR_ICFGR1), 4), Ok(0x0000_aaaa));
}

#[test]
fn irouter_routes_spis_and_hardware_spis_follow_to_the_vcpus_pcpu() {
    let mut g = vgic(4);
    let r = GICD_IROUTER + 8 * u64::from(HW_V);
    let mut phys = Vec::new();
    // Affinity 0.0.0.3 = vCPU 3; junk bits are dropped.
    g.dist_write(r, 8, 0xffff_ff00_7f00_0003, &mut phys)
        .unwrap();
    assert_eq!(g.dist_read(r, 8), Ok(3));
    assert_eq!(
        phys,
        vec![PhysAction::Route {
            pintid: HW_P,
            mpidr: 0x103
        }]
    );
    // 32-bit halves: Aff3 = 1 names no vCPU, the physical SPI goes to vCPU 0's CPU.
    phys.clear();
    g.dist_write(r + 4, 4, 0xffff_ff01, &mut phys).unwrap();
    assert_eq!(g.dist_read(r, 8), Ok(0x1_0000_0003));
    assert_eq!(g.dist_read(r + 4, 4), Ok(1));
    assert_eq!(g.dist_read(r, 4), Ok(3));
    assert_eq!(
        phys,
        vec![PhysAction::Route {
            pintid: HW_P,
            mpidr: 0x100
        }]
    );
    g.dist_write(r + 4, 4, 0, &mut phys).unwrap();
    assert_eq!(g.dist_read(r, 8), Ok(3));
    // IRM = 1 never reaches the physical distributor as "any CPU".
    phys.clear();
    g.dist_write(r, 4, 1 << 31, &mut phys).unwrap();
    assert_eq!(g.dist_read(r, 8), Ok(1 << 31));
    assert_eq!(
        phys,
        vec![PhysAction::Route {
            pintid: HW_P,
            mpidr: 0x100
        }]
    );
    // Unowned SPI routers are RAZ/WI.
    let u = GICD_IROUTER + 8 * 41;
    g.dist_write(u, 8, 3, &mut phys).unwrap();
    assert_eq!(g.dist_read(u, 8), Ok(0));
    // A routed, enabled, pending SPI is taken by its target only.
    dw(&mut g, GICD_CTLR, 2);
    let v = GICD_IROUTER + 8 * u64::from(VIRT);
    g.dist_write(v, 8, 2, &mut phys).unwrap();
    dw(&mut g, GICD_ISENABLER + 4, 1 << 1);
    assert_eq!(g.inject_spi(VIRT), Ok(Some(2)));
    assert!(g.has_deliverable(2));
    assert!(!g.has_deliverable(0));
    // Routed to an affinity the VM does not have: delivered nowhere, still pending.
    let kicks = g.dist_write(v, 8, 0x0900, &mut phys).unwrap();
    assert!(kicks.is_empty());
    assert!((0..4).all(|i| !g.has_deliverable(i)));
    assert_eq!(dr(&g, GICD_ISPENDR + 4), 1 << 1);
    // Routed back: vCPU 1 must be kicked.
    let kicks = g.dist_write(v, 8, 1, &mut phys).unwrap();
    assert_eq!(kicks, VcpuMask(1 << 1));
}

#[test]
fn reset_puts_hardware_spis_in_a_safe_state() {
    let mut g = vgic(2);
    dw(&mut g, GICD_ISENABLER + 4, !0);
    dw(&mut g, GICD_CTLR, 3);
    let mut phys = Vec::new();
    g.reset(&mut phys);
    assert_eq!(dr(&g, GICD_ISENABLER + 4), 0);
    assert_eq!(dr(&g, GICD_CTLR), 0x50);
    assert!(phys.iter().all(|a| a.pintid() == HW_P));
    assert!(phys.contains(&PhysAction::Enable {
        pintid: HW_P,
        enable: false
    }));
    assert!(phys.contains(&PhysAction::Active {
        pintid: HW_P,
        active: false
    }));
    assert!(phys.contains(&PhysAction::Route {
        pintid: HW_P,
        mpidr: 0x100
    }));
}

// ---- redistributors ----

#[test]
fn gicr_typer_affinity_processor_number_and_last() {
    let g = vgic(6);
    for i in 0..6 {
        let t = g.redist_read(rd(i, GICR_TYPER), 8).unwrap();
        let aff = ((i / 4) << 8 | (i % 4)) as u64;
        assert_eq!(t >> 32, aff, "vCPU {i}");
        assert_eq!((t >> 8) & 0xffff, i as u64);
        assert_eq!(t & TYPER_LAST != 0, i == 5);
        assert_eq!(t & 0b1111, 0, "no PLPIS/VLPIS/DirectLPI");
        assert_eq!(g.redist_read(rd(i, GICR_TYPER + 4), 4), Ok(t >> 32));
        assert_eq!(g.redist_read(rd(i, GICR_TYPER), 4), Ok(t & 0xffff_ffff));
    }
    // Aff3 moves from MPIDR[39:32] to Affinity_Value[31:24].
    let v = [VcpuDesc {
        mpidr: 0x12_0034_5678,
        pcpu_mpidr: 0,
    }];
    let g = Vgic::new(&VgicConfig {
        vcpus: &v,
        spis: &[],
        ich_vtr: 0,
    })
    .unwrap();
    assert_eq!(g.gicr_typer(0) >> 32, 0x1234_5678);
    assert_eq!(g.gicr_typer(1), 0);
}

#[test]
fn redistributor_addresses_decode() {
    let a = RedistAddr::decode(3 * REDIST_STRIDE + FRAME_SIZE + 0x104);
    assert_eq!(
        a,
        RedistAddr {
            vcpu: 3,
            frame: Frame::SgiBase,
            offset: 0x104
        }
    );
    assert_eq!(RedistAddr::decode(0x14).frame, Frame::RdBase);
    let g = vgic(3);
    assert_eq!(g.redist_region_size(), 3 * 0x2_0000);
    let last = g.redist_region_size() - 4;
    assert_eq!(g.redist_read(last, 4), Ok(0));
    assert_eq!(g.redist_read(last + 4, 4), Err(MmioError::OutOfRange));
    assert_eq!(RedistAddr::decode(u64::MAX).vcpu, u64::MAX / REDIST_STRIDE);
}

#[test]
fn waker_handshake() {
    let mut g = vgic(2);
    let sleeping = WAKER_PROCESSOR_SLEEP | WAKER_CHILDREN_ASLEEP;
    assert_eq!(g.redist_read(rd(1, GICR_WAKER), 4), Ok(sleeping));
    g.redist_write(rd(1, GICR_WAKER), 4, 0, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(rd(1, GICR_WAKER), 4), Ok(0));
    assert_eq!(
        g.redist_read(rd(0, GICR_WAKER), 4),
        Ok(sleeping),
        "per vCPU"
    );
    // ChildrenAsleep is read-only; ProcessorSleep brings it back.
    g.redist_write(rd(1, GICR_WAKER), 4, WAKER_CHILDREN_ASLEEP, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(rd(1, GICR_WAKER), 4), Ok(0));
    g.redist_write(rd(1, GICR_WAKER), 4, WAKER_PROCESSOR_SLEEP, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(rd(1, GICR_WAKER), 4), Ok(sleeping));
}

#[test]
fn private_registers_are_per_vcpu() {
    let mut g = vgic(2);
    g.redist_write(sgi(1, GICR_ISENABLER0), 4, 0x0800_ffff, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(sgi(1, GICR_ISENABLER0), 4), Ok(0x0800_ffff));
    assert_eq!(g.redist_read(sgi(1, GICR_ICENABLER0), 4), Ok(0x0800_ffff));
    assert_eq!(g.redist_read(sgi(0, GICR_ISENABLER0), 4), Ok(0));
    g.redist_write(sgi(1, GICR_ICENABLER0), 4, 0xff, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(sgi(1, GICR_ISENABLER0), 4), Ok(0x0800_ff00));
    g.redist_write(sgi(1, GICR_ISPENDR0), 4, 0x3, &mut NoPhys)
        .unwrap();
    g.redist_write(sgi(1, GICR_ICPENDR0), 4, 0x1, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(sgi(1, GICR_ISPENDR0), 4), Ok(0x2));
    g.redist_write(sgi(1, GICR_ISACTIVER0), 4, 0x30, &mut NoPhys)
        .unwrap();
    g.redist_write(sgi(1, GICR_ICACTIVER0), 4, 0x10, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(sgi(1, GICR_ISACTIVER0), 4), Ok(0x20));
    assert_eq!(g.redist_read(sgi(1, GICR_IGROUPR0), 4), Ok(0xffff_ffff));
    g.redist_write(sgi(1, GICR_IGROUPR0), 4, 0xffff_fffe, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(sgi(1, GICR_IGROUPR0), 4), Ok(0xffff_fffe));
    assert_eq!(g.redist_read(sgi(0, GICR_IGROUPR0), 4), Ok(0xffff_ffff));
}

#[test]
fn timer_level_shows_pending_while_disabled_and_wakes_only_when_enabled() {
    let mut g = vgic(2);
    dw(&mut g, GICD_CTLR, 3);
    assert_eq!(g.set_ppi_level(1, PPI_VTIMER, true), Ok(false));
    assert_eq!(g.redist_read(sgi(1, GICR_ISPENDR0), 4), Ok(1 << PPI_VTIMER));
    assert!(!g.has_deliverable(1), "disabled");
    // Clearing the pending state of a level held high does nothing.
    g.redist_write(sgi(1, GICR_ICPENDR0), 4, 1 << PPI_VTIMER, &mut NoPhys)
        .unwrap();
    assert_eq!(g.redist_read(sgi(1, GICR_ISPENDR0), 4), Ok(1 << PPI_VTIMER));
    let kicks = g
        .redist_write(sgi(1, GICR_ISENABLER0), 4, 1 << PPI_VTIMER, &mut NoPhys)
        .unwrap();
    assert_eq!(kicks, VcpuMask(1 << 1));
    assert!(g.has_deliverable(1));
    assert!(!g.has_deliverable(0));
    assert_eq!(
        g.highest_pending(1),
        Some(PendingIrq {
            intid: PPI_VTIMER,
            priority: 0
        })
    );
    // The guest masks it with its priority mask or group enable: no wake-up.
    g.set_vmcr(1, ICH_VMCR_VENG1);
    assert!(!g.has_deliverable(1), "PMR 0 masks everything");
    g.set_vmcr(1, (0xf8 << ICH_VMCR_VPMR_SHIFT) | ICH_VMCR_VENG0);
    assert!(
        !g.has_deliverable(1),
        "Group 1 disabled in the CPU interface"
    );
    g.set_vmcr(1, (0xf8 << ICH_VMCR_VPMR_SHIFT) | ICH_VMCR_VENG1);
    assert!(g.has_deliverable(1));
    assert_eq!(g.set_ppi_level(1, PPI_VTIMER, false), Ok(false));
    assert!(!g.has_deliverable(1));
    assert_eq!(g.redist_read(sgi(1, GICR_ISPENDR0), 4), Ok(0));
    // Edge-configured PPI: a rising level latches.
    g.redist_write(
        sgi(1, GICR_ICFGR1),
        4,
        0b10 << (2 * (PPI_PTIMER - 16)),
        &mut NoPhys,
    )
    .unwrap();
    g.redist_write(sgi(1, GICR_ISENABLER0), 4, 1 << PPI_PTIMER, &mut NoPhys)
        .unwrap();
    assert_eq!(g.set_ppi_level(1, PPI_PTIMER, true), Ok(true));
    assert_eq!(g.set_ppi_level(1, PPI_PTIMER, false), Ok(true), "latched");
    assert_eq!(
        g.set_ppi_level(2, PPI_PTIMER, true),
        Err(IrqError::NoSuchVcpu)
    );
    assert_eq!(g.set_ppi_level(0, 15, true), Err(IrqError::NotOwned));
    assert_eq!(g.inject_ppi(0, 32), Err(IrqError::NotOwned));
    assert_eq!(g.inject_ppi(0, 23), Ok(false));
}

#[test]
fn distributor_group_enable_gates_delivery() {
    let mut g = vgic(1);
    dw(&mut g, GICD_ISENABLER + 4, 1 << 1);
    assert_eq!(g.inject_spi(VIRT), Ok(None), "groups disabled");
    assert!(!g.has_deliverable(0));
    let kicks = g.dist_write(GICD_CTLR, 4, 2, &mut NoPhys).unwrap();
    assert!(kicks.contains(0));
    assert!(g.has_deliverable(0));
    dw(&mut g, GICD_IGROUPR + 4, 0);
    assert!(!g.has_deliverable(0), "now Group 0, which is disabled");
    dw(&mut g, GICD_CTLR, 1);
    assert!(g.has_deliverable(0));
}

// ---- SGIs ----

#[test]
fn sgi1r_decoding() {
    let v = (0x12 << SGIR_AFF3_SHIFT)
        | (0xb << SGIR_RS_SHIFT)
        | SGIR_IRM
        | (0x34 << SGIR_AFF2_SHIFT)
        | (0x7 << SGIR_INTID_SHIFT)
        | (0x56 << SGIR_AFF1_SHIFT)
        | 0x8001;
    let d = SgiTarget::decode(v);
    assert_eq!(
        d,
        SgiTarget {
            intid: 7,
            broadcast: true,
            affinity: 0x12_0034_5600,
            range: 0xb,
            target_list: 0x8001,
        }
    );
    let d = SgiTarget::decode(v & !SGIR_IRM);
    assert!(d.targets(0x12_0034_56b0, 0));
    assert!(d.targets(0x12_0034_56bf, 0));
    assert!(!d.targets(0x12_0034_56b1, 0));
    assert!(!d.targets(0x12_0034_56a0, 0));
    assert!(!d.targets(0x13_0034_56b0, 0));
    // RES0 bits and MPIDR's non-affinity bits are ignored.
    assert!(d.targets(0x8000_0000 | 0x12_0034_56b0, 0));
    assert_eq!(SgiTarget::decode(u64::MAX).intid, 15);
}

#[test]
fn a_target_list_names_exactly_aff0_rs_times_16_plus_n() {
    // Every RS (including the values a constructed target may hold past 4 bits), every
    // Aff0, one-bit and all-bit lists: the PE is named iff Aff0 = RS × 16 + n for a set
    // bit n of TargetList (DDI 0487, `ICC_SGI1R_EL1`).
    for range in 0..=u8::MAX {
        for list in [1u16, 0x8000, 0xa5a5, u16::MAX] {
            let t = SgiTarget {
                intid: 0,
                broadcast: false,
                affinity: 0x12_0034_5600,
                range,
                target_list: list,
            };
            for aff0 in 0..=0xffu32 {
                let named =
                    (0..16u32).any(|n| list & (1 << n) != 0 && aff0 == u32::from(range) * 16 + n);
                let mpidr = 0x12_0034_5600 | u64::from(aff0);
                assert_eq!(
                    t.targets(mpidr, 0),
                    named,
                    "RS {range} list {list:#x} Aff0 {aff0}"
                );
            }
        }
    }
}

fn sgi1r(intid: u64, aff1: u64, list: u64) -> u64 {
    (intid << SGIR_INTID_SHIFT) | (aff1 << SGIR_AFF1_SHIFT) | list
}

#[test]
fn sgis_reach_only_the_vms_own_vcpus() {
    let mut g = vgic(6); // Aff 0.0.0.0-3, 0.0.1.0-1
                         // Target list: Aff1 = 1, Aff0 = 1 and 3 (vCPU 5 and a vCPU that does not exist).
    let sent = g.sgi_write(0, SgiRegister::Sgi1r, sgi1r(3, 1, 0b1010));
    assert_eq!(sent, VcpuMask(1 << 5));
    assert_eq!(g.redist_read(sgi(5, GICR_ISPENDR0), 4), Ok(1 << 3));
    assert_eq!(g.redist_read(sgi(4, GICR_ISPENDR0), 4), Ok(0));
    // To itself.
    let sent = g.sgi_write(2, SgiRegister::Sgi1r, sgi1r(1, 0, 0b0100));
    assert_eq!(sent, VcpuMask(1 << 2));
    // Broadcast: every other vCPU of the VM.
    let sent = g.sgi_write(4, SgiRegister::Sgi1r, SGIR_IRM | (2 << SGIR_INTID_SHIFT));
    assert_eq!(sent, VcpuMask(0b10_1111));
    for i in 0..6 {
        let p = g.redist_read(sgi(i, GICR_ISPENDR0), 4).unwrap();
        assert_eq!(p & (1 << 2) != 0, i != 4, "vCPU {i}");
    }
    // Another VM's SGIs change nothing here.
    let mut other = vgic(6);
    let before = g.clone();
    let _ = other.sgi_write(0, SgiRegister::Sgi1r, SGIR_IRM | (9 << SGIR_INTID_SHIFT));
    for i in 0..6 {
        assert_eq!(
            g.redist_read(sgi(i, GICR_ISPENDR0), 4),
            before.redist_read(sgi(i, GICR_ISPENDR0), 4)
        );
    }
    // Unknown sender: nothing.
    assert!(g.sgi_write(6, SgiRegister::Sgi1r, SGIR_IRM).is_empty());
    // An RS range with no vCPU: nothing.
    assert!(g
        .sgi_write(0, SgiRegister::Sgi1r, (1 << SGIR_RS_SHIFT) | 0xffff)
        .is_empty());
}

#[test]
fn sgi0r_only_raises_group0_sgis() {
    let mut g = vgic(2);
    // vCPU 1: SGI 4 in Group 0, SGI 5 in Group 1.
    g.redist_write(sgi(1, GICR_IGROUPR0), 4, !(1 << 4), &mut NoPhys)
        .unwrap();
    let s4 = sgi1r(4, 0, 0b10);
    let s5 = sgi1r(5, 0, 0b10);
    assert_eq!(g.sgi_write(0, SgiRegister::Sgi0r, s5), VcpuMask::EMPTY);
    assert_eq!(g.sgi_write(0, SgiRegister::Asgi1r, s5), VcpuMask::EMPTY);
    assert_eq!(g.sgi_write(0, SgiRegister::Sgi0r, s4), VcpuMask(0b10));
    assert_eq!(g.sgi_write(0, SgiRegister::Sgi1r, s5), VcpuMask(0b10));
    assert_eq!(g.redist_read(sgi(1, GICR_ISPENDR0), 4), Ok(0b11_0000));
}

// ---- list registers ----

#[test]
fn lr_encoding_bit_by_bit() {
    let v = LrValue::new(
        0x1234_5678,
        LrState::PendingActive,
        0xa8,
        true,
        Some(0x3ff),
        true,
    );
    assert_eq!(v.0 & 0xffff_ffff, 0x1234_5678);
    assert_eq!((v.0 >> 32) & 0x1fff, 0x3ff);
    assert_eq!(v.0 & LR_EOI, LR_EOI, "bit 41 is part of pINTID 0x3ff here");
    assert!(!v.eoi(), "EOI only with HW = 0");
    assert_eq!((v.0 >> 48) & 0xff, 0xa8);
    assert_eq!(v.0 >> 60 & 1, 1);
    assert_eq!(v.0 >> 61 & 1, 1);
    assert_eq!(v.0 >> 62, 0b11);
    assert_eq!(v.hw(), Some(0x3ff));
    assert_eq!(v.state(), LrState::PendingActive);
    assert!(v.group1());
    assert_eq!(v.priority(), 0xa8);
    let w = LrValue::new(27, LrState::Pending, 0, false, None, true);
    assert_eq!(w.0, (1 << 62) | (1 << 41) | 27);
    assert!(w.eoi());
    assert_eq!(w.hw(), None);
    assert_eq!(w.with_state(LrState::Active).0, (2 << 62) | (1 << 41) | 27);
    assert_eq!(w.with_state(LrState::Invalid).state(), LrState::Invalid);
    assert_eq!(ICH_HCR_UIE, 0b10);
    assert_eq!(ICH_HCR_NPIE, 0b1000);
}

/// Enables SGIs 0-15 of vCPU 0 with priorities `0x10 * (15 - i)` (SGI 15 highest)
/// and makes them pending.
fn many_sgis(g: &mut Vgic) {
    dw(g, GICD_CTLR, 3);
    g.redist_write(sgi(0, GICR_ISENABLER0), 4, 0xffff, &mut NoPhys)
        .unwrap();
    for i in 0..16u64 {
        let p = 0x10 * (15 - i);
        g.redist_write(sgi(0, GICR_IPRIORITYR + i), 1, p, &mut NoPhys)
            .unwrap();
        g.sgi_write(0, SgiRegister::Sgi1r, sgi1r(i, 0, 1));
    }
}

#[test]
fn flush_fills_by_priority_and_asks_for_maintenance() {
    let mut g = vgic(1);
    many_sgis(&mut g);
    let f = g.flush(0);
    assert_eq!(f.lrs().len(), 4);
    assert_eq!(f.used(), 4);
    let ids: Vec<u32> = f.lrs().iter().map(|l| l.vintid()).collect();
    assert_eq!(ids, vec![15, 14, 13, 12]);
    assert!(f.lrs().iter().all(|l| l.state() == LrState::Pending));
    assert_eq!(f.hcr(), ICH_HCR_NPIE);
    // While in the LRs they still read pending.
    assert_eq!(g.redist_read(sgi(0, GICR_ISPENDR0), 4), Ok(0xffff));
    // The guest takes all four: maintenance, the next four come.
    let back: Vec<u64> = f
        .lrs()
        .iter()
        .map(|l| l.with_state(LrState::Invalid).0)
        .collect();
    let f = g.maintenance(0, &back);
    let ids: Vec<u32> = f.lrs().iter().map(|l| l.vintid()).collect();
    assert_eq!(ids, vec![11, 10, 9, 8]);
    assert_eq!(g.redist_read(sgi(0, GICR_ISPENDR0), 4), Ok(0x0fff));
    // The guest acknowledged two without deactivating: they stay, active first.
    let mut back: Vec<u64> = f.lrs().iter().map(|l| l.0).collect();
    back[0] = f.lrs()[0].with_state(LrState::Active).0;
    back[3] = f.lrs()[3].with_state(LrState::Active).0;
    g.sync(0, &back);
    assert_eq!(
        g.redist_read(sgi(0, GICR_ISACTIVER0), 4),
        Ok((1 << 11) | (1 << 8))
    );
    let f = g.flush(0);
    let got: Vec<(u32, LrState)> = f.lrs().iter().map(|l| (l.vintid(), l.state())).collect();
    assert_eq!(
        got,
        vec![
            (11, LrState::Active),
            (8, LrState::Active),
            (10, LrState::Pending),
            (9, LrState::Pending)
        ]
    );
    assert_eq!(f.hcr(), ICH_HCR_NPIE);
}

#[test]
fn active_only_lrs_ask_for_underflow_and_free_lrs_stay_invalid() {
    let mut g = vgic(1);
    many_sgis(&mut g);
    g.redist_write(sgi(0, GICR_ISACTIVER0), 4, 0xf, &mut NoPhys)
        .unwrap();
    let f = g.flush(0);
    assert!(f.lrs().iter().all(|l| l.state() == LrState::PendingActive));
    assert_eq!(f.hcr(), ICH_HCR_NPIE);
    // Four active-only interrupts and more pending: underflow.
    let mut g = vgic(1);
    dw(&mut g, GICD_CTLR, 3);
    g.redist_write(sgi(0, GICR_ISACTIVER0), 4, 0xf, &mut NoPhys)
        .unwrap();
    g.redist_write(sgi(0, GICR_ISENABLER0), 4, 0x10, &mut NoPhys)
        .unwrap();
    g.redist_write(sgi(0, GICR_ISPENDR0), 4, 0x10, &mut NoPhys)
        .unwrap();
    let f = g.flush(0);
    assert!(f.lrs().iter().all(|l| l.state() == LrState::Active));
    assert_eq!(f.hcr(), ICH_HCR_UIE);
    // Nothing pending: no request, unused LRs invalid.
    let mut g = vgic(1);
    let f = g.flush(0);
    assert_eq!(f.used(), 0);
    assert_eq!(f.hcr(), 0);
    assert!(f.lrs().iter().all(|l| *l == LrValue::INVALID));
    assert_eq!(g.flush(7).used(), 0, "no such vCPU");
}

#[test]
fn hardware_spi_goes_with_hw_bit_and_guest_deactivation_retires_it() {
    let mut g = vgic(1);
    dw(&mut g, GICD_CTLR, 2);
    dw(&mut g, GICD_ISENABLER + 4, 1 << 8);
    dw(&mut g, GICD_IPRIORITYR + 40, 0x80);
    assert_eq!(g.inject_hw(HW_P), Ok(Some(0)));
    let f = g.flush(0);
    assert_eq!(f.used(), 1);
    let lr = f.lrs()[0];
    assert_eq!(lr.vintid(), HW_V);
    assert_eq!(lr.hw(), Some(HW_P));
    assert_eq!(lr.state(), LrState::Pending);
    assert_eq!(lr.priority(), 0x80);
    assert!(lr.group1());
    assert!(!lr.eoi());
    // Acknowledged and running its handler: active.
    g.sync(0, &[lr.with_state(LrState::Active).0]);
    assert_eq!(dr(&g, GICD_ISACTIVER + 4), 1 << 8);
    assert_eq!(dr(&g, GICD_ISPENDR + 4), 0);
    // A second physical arrival while active (buggy wiring) is held, not put as
    // pending+active with HW.
    g.inject_hw(HW_P).unwrap();
    let f = g.flush(0);
    assert_eq!(f.lrs()[0].state(), LrState::Active);
    assert_eq!(f.lrs()[0].hw(), Some(HW_P));
    // Deactivated by the guest (and with it the physical interrupt).
    g.sync(0, &[0]);
    assert_eq!(dr(&g, GICD_ISACTIVER + 4), 0);
    let f = g.flush(0);
    assert_eq!(f.lrs()[0].state(), LrState::Pending);
}

#[test]
fn level_interrupt_is_redelivered_while_held_and_edge_is_not() {
    let mut g = vgic(1);
    dw(&mut g, GICD_CTLR, 2);
    g.redist_write(sgi(0, GICR_ISENABLER0), 4, 1 << PPI_VTIMER, &mut NoPhys)
        .unwrap();
    g.set_ppi_level(0, PPI_VTIMER, true).unwrap();
    let f = g.flush(0);
    let lr = f.lrs()[0];
    assert_eq!((lr.vintid(), lr.state()), (PPI_VTIMER, LrState::Pending));
    assert!(lr.eoi(), "level: resample on deactivation");
    g.sync(0, &[0]);
    // Still held: pending again.
    assert_eq!(g.flush(0).lrs()[0].vintid(), PPI_VTIMER);
    g.sync(0, &[0]);
    g.set_ppi_level(0, PPI_VTIMER, false).unwrap();
    assert_eq!(g.flush(0).used(), 0);
    // Edge SPI: once.
    dw(&mut g, GICD_ICFGR + 8, 0b10 << 2);
    dw(&mut g, GICD_ISENABLER + 4, 1 << 1);
    g.inject_spi(VIRT).unwrap();
    let f = g.flush(0);
    assert_eq!(f.lrs()[0].vintid(), VIRT);
    assert!(!f.lrs()[0].eoi());
    g.sync(0, &[0]);
    assert_eq!(g.flush(0).used(), 0);
}

#[test]
fn an_edge_arriving_while_in_a_list_register_is_not_lost() {
    let mut g = vgic(1);
    dw(&mut g, GICD_CTLR, 2);
    g.redist_write(sgi(0, GICR_ISENABLER0), 4, 1, &mut NoPhys)
        .unwrap();
    g.sgi_write(0, SgiRegister::Sgi1r, sgi1r(0, 0, 1));
    let f = g.flush(0);
    // Another SGI 0 while the guest runs; the guest takes the first.
    g.sgi_write(0, SgiRegister::Sgi1r, sgi1r(0, 0, 1));
    g.sync(0, &[f.lrs()[0].with_state(LrState::Active).0]);
    let f = g.flush(0);
    assert_eq!(f.lrs()[0].state(), LrState::PendingActive);
}

#[test]
fn unsynced_flush_keeps_state() {
    let mut g = vgic(1);
    many_sgis(&mut g);
    let a = g.flush(0);
    let b = g.flush(0);
    assert_eq!(
        a, b,
        "a second flush without sync gives the same list registers"
    );
}

#[test]
fn a_flush_the_guest_left_as_it_was_is_the_next_flush() {
    let mut g = vgic(1);
    dw(&mut g, GICD_CTLR, 3);
    g.redist_write(sgi(0, GICR_ISENABLER0), 4, 0b111, &mut NoPhys)
        .unwrap();
    for i in 0..3 {
        g.sgi_write(0, SgiRegister::Sgi1r, sgi1r(i, 0, 1));
    }
    let f = g.flush(0);
    assert_eq!(
        (f.used(), f.hcr()),
        (3, 0),
        "three fit in four: no maintenance"
    );
    let written: Vec<u64> = f.lrs().iter().take(f.used()).map(|l| l.0).collect();
    assert!(f.unchanged(&written));
    // Folding the unchanged registers back and flushing again loads the same: skipping
    // both is exact.
    g.sync(0, &written);
    assert_eq!(g.flush(0), f);
    // The guest acknowledged one, or fewer registers were read back: changed.
    let mut acked = written.clone();
    acked[1] = f.lrs()[1].with_state(LrState::Active).0;
    assert!(!f.unchanged(&acked));
    assert!(!f.unchanged(&written[..2]));
    // A flush that asked for maintenance is never left as it was.
    let mut g = vgic(1);
    many_sgis(&mut g);
    let f = g.flush(0);
    let written: Vec<u64> = f.lrs().iter().map(|l| l.0).collect();
    assert!(!f.unchanged(&written));
    // Nothing in the registers, nothing read back: unchanged.
    assert!(vgic(1).flush(0).unchanged(&[]));
}

#[test]
fn an_spi_is_never_in_two_vcpus_list_registers() {
    let mut g = vgic(2);
    dw(&mut g, GICD_CTLR, 2);
    dw(&mut g, GICD_ISENABLER + 4, 1 << 1);
    g.inject_spi(VIRT).unwrap();
    assert_eq!(g.flush(0).lrs()[0].vintid(), VIRT);
    // Rerouted to vCPU 1 while vCPU 0 holds it.
    g.dist_write(GICD_IROUTER + 8 * u64::from(VIRT), 8, 1, &mut NoPhys)
        .unwrap();
    assert_eq!(g.flush(1).used(), 0);
    g.sync(
        0,
        &[LrValue::new(VIRT, LrState::Pending, 0, true, None, false).0],
    );
    assert_eq!(g.flush(1).lrs()[0].vintid(), VIRT);
}

#[test]
fn vcpu_mask() {
    let mut m = VcpuMask::EMPTY;
    m.insert(0);
    m.insert(63);
    m.insert(64);
    m.insert(usize::MAX);
    assert_eq!(m, VcpuMask(1 | (1 << 63)));
    assert!(m.contains(63) && !m.contains(64) && !m.contains(1));
    assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 63]);
}

// ---- hardware PPIs (the EL1 timers) ----

#[test]
fn hardware_timer_ppi_pends_while_disabled_and_goes_with_the_hw_bit() {
    let mut g = vgic(2);
    assert_eq!(
        g.set_hw_ppi(3),
        Err(IrqError::NotOwned),
        "an SGI is never hardware"
    );
    g.set_hw_ppi(PPI_VTIMER).expect("a PPI");
    assert_eq!(g.inject_hw_ppi(0, 26), Err(IrqError::NotOwned));
    assert_eq!(g.inject_hw_ppi(5, PPI_VTIMER), Err(IrqError::NoSuchVcpu));
    dw(&mut g, GICD_CTLR, u64::from(CTLR_ENABLE_GRP1));
    // Taken at EL2 while the guest keeps it disabled: pending, visible, not delivered.
    assert_eq!(g.inject_hw_ppi(1, PPI_VTIMER), Ok(false));
    let pend = g.redist_read(sgi(1, GICR_ISPENDR0), 4).unwrap();
    assert_ne!(pend & (1 << PPI_VTIMER), 0, "pending while disabled");
    assert_eq!(
        g.redist_read(sgi(0, GICR_ISPENDR0), 4),
        Ok(0),
        "vCPU 0 untouched"
    );
    assert_eq!(g.flush(1).used(), 0);
    g.sync(1, &[]);
    // Enabled: it goes into a list register with HW = 1 and pINTID = 27.
    let mut phys = Vec::new();
    g.redist_write(sgi(1, GICR_ISENABLER0), 4, 1 << PPI_VTIMER, &mut phys)
        .unwrap();
    assert!(phys.is_empty());
    let f = g.flush(1);
    assert_eq!(f.used(), 1);
    let lr = f.lrs()[0];
    assert_eq!(
        (lr.vintid(), lr.hw(), lr.eoi()),
        (PPI_VTIMER, Some(PPI_VTIMER), false)
    );
    assert_eq!(lr.state(), LrState::Pending);
    // The guest acknowledged and deactivated it (the LR reads back invalid): the
    // physical activation is gone with it, nothing left to drop on reset.
    g.sync(1, &[0]);
    assert_eq!(g.redist_read(sgi(1, GICR_ISPENDR0), 4), Ok(0));
    let mut phys = Vec::new();
    g.reset(&mut phys);
    assert!(
        !phys
            .iter()
            .any(|a| matches!(a, PhysAction::DeactivatePrivate { .. })),
        "{phys:?}"
    );
}

#[test]
fn clearing_a_held_hardware_ppi_or_resetting_drops_the_physical_activation() {
    let mut g = vgic(2);
    g.set_hw_ppi(PPI_PTIMER).expect("a PPI");
    g.inject_hw_ppi(0, PPI_PTIMER).expect("hw ppi");
    // Clearing the pending state of a disabled, held timer PPI deactivates it at the
    // physical redistributor of vCPU 0's CPU, once.
    let mut phys = Vec::new();
    g.redist_write(sgi(0, GICR_ICPENDR0), 4, 1 << PPI_PTIMER, &mut phys)
        .unwrap();
    assert_eq!(
        phys,
        vec![PhysAction::DeactivatePrivate {
            mpidr: 0x100,
            pintid: PPI_PTIMER
        }]
    );
    phys.clear();
    g.redist_write(sgi(0, GICR_ICPENDR0), 4, 1 << PPI_PTIMER, &mut phys)
        .unwrap();
    assert!(phys.is_empty(), "not held any more");
    // A software ISPENDR write never makes a list register with the HW bit.
    g.redist_write(sgi(0, GICR_ISPENDR0), 4, 1 << PPI_PTIMER, &mut phys)
        .unwrap();
    g.redist_write(sgi(0, GICR_ISENABLER0), 4, 1 << PPI_PTIMER, &mut phys)
        .unwrap();
    dw(&mut g, GICD_CTLR, u64::from(CTLR_ENABLE_GRP1));
    assert_eq!(g.flush(0).lrs()[0].hw(), None);
    g.sync(0, &[]);
    // Held on vCPU 1 at reset: dropped on vCPU 1's CPU.
    g.inject_hw_ppi(1, PPI_PTIMER).expect("hw ppi");
    let mut phys = Vec::new();
    g.reset(&mut phys);
    assert!(phys.contains(&PhysAction::DeactivatePrivate {
        mpidr: 0x101,
        pintid: PPI_PTIMER
    }));
    // Still a hardware PPI after the reset.
    assert_eq!(g.inject_hw_ppi(1, PPI_PTIMER), Ok(false));
}

#[test]
fn vcpu_mask_iterates_its_members_in_order() {
    assert_eq!(VcpuMask::EMPTY.iter().count(), 0);
    let mut m = VcpuMask::EMPTY;
    for i in [63, 5, 0, 64, 1000] {
        m.insert(i);
    }
    assert_eq!(m.iter().collect::<Vec<_>>(), vec![0, 5, 63]);
    assert!(m.iter().all(|i| m.contains(i)));
}
