//! Descriptor encodings and control-register values, bit by bit, against values
//! worked out by hand from the Arm ARM (DDI 0487): D8.3 (VMSAv8-64 descriptor
//! formats), D8.4 (access permissions, execute-never), D8.6 (memory attributes,
//! stage 2 MemAttr and FEAT_S2FWB), D8.2 (concatenated stage-2 tables), and the
//! register descriptions of TCR_EL2, TCR_EL1, VTCR_EL2, VTTBR_EL2 (D19.2).
#![allow(clippy::identity_op)] // register fields are spelled out, zero ones included

mod common;

use mmu::testing::{HeapFrames, RecordingTlb};
use mmu::{
    Attributes, El1, El2, Error, Geometry, MapFlags, MemoryType, PageTable, Permissions, Regime,
    Stage2, SwBits, MAIR_VALUE, MAIR_VALUE_TAGGED,
};

const P: Permissions = Permissions::READ;
const W: Permissions = Permissions::WRITE;
const X2: Permissions = Permissions::EXEC_EL2;
const X1: Permissions = Permissions::EXEC_EL1;
const X0: Permissions = Permissions::EXEC_EL0;
const U: Permissions = Permissions::USER;

// Descriptor fields, named as in the Arm ARM.
const PAGE: u64 = 0b11; // [1:0] page (level 3)
const BLOCK: u64 = 0b01; // [1:0] block (levels 1, 2)
const fn attr_indx(i: u64) -> u64 {
    i << 2 // AttrIndx[2:0] at [4:2]
}
const AP1: u64 = 1 << 6; // stage 1 AP[1]
const AP2: u64 = 1 << 7; // stage 1 AP[2]
const fn s2ap(v: u64) -> u64 {
    v << 6 // S2AP[1:0] at [7:6]
}
const fn mem_attr(v: u64) -> u64 {
    v << 2 // stage 2 MemAttr[3:0] at [5:2]
}
const SH_IS: u64 = 0b11 << 8; // SH[1:0] inner shareable
const AF: u64 = 1 << 10;
const NG: u64 = 1 << 11;
const PXN: u64 = 1 << 53;
const UXN_XN: u64 = 1 << 54;
const fn s2xn(v: u64) -> u64 {
    v << 53 // stage 2 XN[1:0] at [54:53]
}
const fn sw(v: u64) -> u64 {
    v << 55
}

/// Maps one 4 KiB page (or a 2 MiB block) and returns the raw leaf descriptor.
fn leaf<R: Regime>(regime: R, size: u64, attrs: Attributes) -> Result<(u64, u8), Error> {
    let mut t = PageTable::new(regime, HeapFrames::new(), RecordingTlb::new())?;
    let va = 0x4000_0000;
    let pa = 0x8000_0000;
    t.map(va, pa, size, attrs, MapFlags::empty())?;
    let (d, level) = common::raw_lookup(&t, va);
    Ok((d, level))
}

fn a(perms: Permissions, mem: MemoryType) -> Attributes {
    Attributes::new(perms, mem)
}

#[test]
fn el2_stage1_descriptors() {
    let r = El2::new(48);
    // RW, not executable, Normal WB (AttrIndx 0): AP[2:1] = 0b01 (AP[1] RES1), XN set.
    let (d, l) = leaf(r, 4096, a(P | W, MemoryType::Normal)).unwrap();
    assert_eq!(l, 3);
    assert_eq!(
        d,
        0x8000_0000 | PAGE | attr_indx(0) | AP1 | SH_IS | AF | UXN_XN
    );
    assert_eq!(d, 0x0040_0000_8000_0743);
    // RO + executable Device-nGnRE (AttrIndx 2), no shareability bits for Device.
    let (d, _) = leaf(r, 4096, a(P | X2, MemoryType::DeviceNGnRE)).unwrap();
    assert_eq!(d, 0x8000_0000 | PAGE | attr_indx(2) | AP1 | AP2 | AF);
    // Device-nGnRnE is AttrIndx 1, Normal-NC AttrIndx 3.
    let (d, _) = leaf(r, 4096, a(P, MemoryType::DeviceNGnRnE)).unwrap();
    assert_eq!(d & 0x1C, attr_indx(1));
    let (d, _) = leaf(r, 4096, a(P, MemoryType::NormalNonCacheable)).unwrap();
    assert_eq!(d & 0x1C, attr_indx(3));
    // 2 MiB block: bits [1:0] = 0b01 at level 2, software bits at [58:55].
    let attrs = a(P | W, MemoryType::Normal).with_sw(SwBits::new(0b1010).unwrap());
    let (d, l) = leaf(r, 2 << 20, attrs).unwrap();
    assert_eq!(l, 2);
    assert_eq!(
        d,
        0x8000_0000 | BLOCK | AP1 | SH_IS | AF | UXN_XN | sw(0b1010)
    );
    assert_eq!(d >> 55 & 0xF, 0b1010);
    // Not expressible: write-only, EL1/EL0 execution, EL0 access.
    for bad in [W, P | X1, P | X0, P | U, Permissions::empty()] {
        assert_eq!(
            leaf(r, 4096, a(bad, MemoryType::Normal)),
            Err(Error::UnsupportedAttributes)
        );
    }
}

/// Tagged Normal memory is AttrIndx 4 in both stage-1 regimes, otherwise like Normal
/// write-back (inner shareable); stage 2 has no tagged type and refuses it.
#[test]
fn normal_tagged_is_attr_index_4_at_stage_1_only() {
    let tagged = a(P | W, MemoryType::NormalTagged);
    let (d, _) = leaf(El2::new(48), 4096, tagged).unwrap();
    assert_eq!(
        d,
        0x8000_0000 | PAGE | attr_indx(4) | AP1 | SH_IS | AF | UXN_XN
    );
    let (d, _) = leaf(El1::new(1, 48), 4096, tagged).unwrap();
    assert_eq!(d & 0x31C, attr_indx(4) | SH_IS);
    for s2 in [Stage2::new(1, 40), Stage2::new(1, 40).with_fwb(true)] {
        assert_eq!(leaf(s2, 4096, tagged), Err(Error::UnsupportedAttributes));
    }
    assert_eq!(MemoryType::NormalTagged.mair_index(), 4);
    assert_eq!(
        MemoryType::from_mair_index(4),
        Some(MemoryType::NormalTagged)
    );
    assert_eq!(MemoryType::from_mair_index(5), None);
}

#[test]
fn stage2_descriptors() {
    let r = Stage2::new(1, 40);
    // RW, executable at EL1 and EL0, Normal WB: MemAttr 0b1111, S2AP 0b11, XN 0b00.
    let (d, _) = leaf(r, 4096, a(P | W | X1 | X0, MemoryType::Normal)).unwrap();
    assert_eq!(
        d,
        0x8000_0000 | PAGE | mem_attr(0b1111) | s2ap(0b11) | SH_IS | AF
    );
    assert_eq!(d, 0x8000_07FF);
    // RO, never executable, Device-nGnRE: MemAttr 0b0001, S2AP 0b01, XN[1:0] = 0b10.
    let (d, _) = leaf(r, 4096, a(P, MemoryType::DeviceNGnRE)).unwrap();
    assert_eq!(
        d,
        0x8000_0000 | PAGE | mem_attr(0b0001) | s2ap(0b01) | AF | s2xn(0b10)
    );
    // Write-only and no access are expressible at stage 2 (S2AP 0b10 / 0b00).
    let (d, _) = leaf(r, 4096, a(W, MemoryType::NormalNonCacheable)).unwrap();
    assert_eq!(d & 0xFC, mem_attr(0b0101) | s2ap(0b10));
    let (d, _) = leaf(r, 4096, a(Permissions::empty(), MemoryType::DeviceNGnRnE)).unwrap();
    assert_eq!(d & 0xFC, mem_attr(0b0000) | s2ap(0b00));
    // Without FEAT_XNX, EL1 and EL0 execute permission cannot differ.
    assert_eq!(
        leaf(r, 4096, a(P | X1, MemoryType::Normal)),
        Err(Error::UnsupportedAttributes)
    );
    assert_eq!(
        leaf(r, 4096, a(P | X0, MemoryType::Normal)),
        Err(Error::UnsupportedAttributes)
    );
    for bad in [P | X2, P | U] {
        assert_eq!(
            leaf(r, 4096, a(bad, MemoryType::Normal)),
            Err(Error::UnsupportedAttributes)
        );
    }
    // FEAT_XNX: XN[1:0] 0b01 = EL0 only, 0b11 = EL1 only.
    let x = r.with_xnx(true);
    let (d, _) = leaf(x, 4096, a(P | X0, MemoryType::Normal)).unwrap();
    assert_eq!(d & s2xn(0b11), s2xn(0b01));
    let (d, _) = leaf(x, 4096, a(P | X1, MemoryType::Normal)).unwrap();
    assert_eq!(d & s2xn(0b11), s2xn(0b11));
    let (d, _) = leaf(x, 4096, a(P, MemoryType::Normal)).unwrap();
    assert_eq!(d & s2xn(0b11), s2xn(0b10));
    // FEAT_S2FWB: Normal WB is MemAttr 0b0110, Normal NC 0b0101, Device unchanged.
    let f = r.with_fwb(true);
    let (d, _) = leaf(f, 4096, a(P, MemoryType::Normal)).unwrap();
    assert_eq!(d & mem_attr(0xF), mem_attr(0b0110));
    let (d, _) = leaf(f, 4096, a(P, MemoryType::NormalNonCacheable)).unwrap();
    assert_eq!(d & mem_attr(0xF), mem_attr(0b0101));
    let (d, _) = leaf(f, 4096, a(P, MemoryType::DeviceNGnRE)).unwrap();
    assert_eq!(d & mem_attr(0xF), mem_attr(0b0001));
}

#[test]
fn el1_stage1_descriptors() {
    let r = El1::new(5, 39);
    // Kernel RW data: AP[2:1] = 0b00, PXN and UXN set, nG set.
    let (d, _) = leaf(r, 4096, a(P | W, MemoryType::Normal)).unwrap();
    assert_eq!(d, 0x8000_0000 | PAGE | SH_IS | AF | NG | PXN | UXN_XN);
    // Kernel text: RO, EL1-executable.
    let (d, _) = leaf(r, 4096, a(P | X1, MemoryType::Normal)).unwrap();
    assert_eq!(d, 0x8000_0000 | PAGE | AP2 | SH_IS | AF | NG | UXN_XN);
    // User text: RO for EL1 and EL0 (AP[2:1] = 0b11), EL0-executable only.
    let (d, _) = leaf(r, 4096, a(P | U | X0, MemoryType::Normal)).unwrap();
    assert_eq!(d, 0x8000_0000 | PAGE | AP1 | AP2 | SH_IS | AF | NG | PXN);
    // User RW data (AP[2:1] = 0b01).
    let (d, _) = leaf(r, 4096, a(P | W | U, MemoryType::Normal)).unwrap();
    assert_eq!(d & (AP1 | AP2), AP1);
    // EL0-writable memory is never EL1-executable (implicit PXN): refused.
    assert_eq!(
        leaf(r, 4096, a(P | W | U | X1, MemoryType::Normal)),
        Err(Error::UnsupportedAttributes)
    );
    for bad in [W, P | X2] {
        assert_eq!(
            leaf(r, 4096, a(bad, MemoryType::Normal)),
            Err(Error::UnsupportedAttributes)
        );
    }
}

#[test]
fn decode_inverts_encode() {
    let all = [P, W, X2, X1, X0, U];
    let mems = [
        MemoryType::Normal,
        MemoryType::NormalNonCacheable,
        MemoryType::DeviceNGnRE,
        MemoryType::DeviceNGnRnE,
        MemoryType::NormalTagged,
    ];
    fn check<R: Regime>(r: &R, attrs: Attributes) -> bool {
        match r.encode(&attrs) {
            Ok(bits) => {
                assert_eq!(r.decode(bits | 0b11), attrs, "{attrs:?}");
                true
            }
            Err(e) => {
                assert_eq!(e, Error::UnsupportedAttributes);
                false
            }
        }
    }
    let mut counts = [0; 5];
    for m in 0..64u8 {
        let mut perms = Permissions::empty();
        for (i, p) in all.iter().enumerate() {
            if m & (1 << i) != 0 {
                perms |= *p;
            }
        }
        for mem in mems {
            for s in [0, 0b0101, 0b1111] {
                let attrs = Attributes::new(perms, mem).with_sw(SwBits::new(s).unwrap());
                counts[0] += usize::from(check(&El2::new(48), attrs));
                counts[1] += usize::from(check(&Stage2::new(1, 40), attrs));
                counts[2] += usize::from(check(&Stage2::new(1, 40).with_xnx(true), attrs));
                counts[3] += usize::from(check(&Stage2::new(1, 40).with_fwb(true), attrs));
                counts[4] += usize::from(check(&El1::new(1, 48), attrs));
            }
        }
    }
    // EL2: READ required, WRITE/EXEC_EL2 free: 4 permission sets, 5 memory types.
    assert_eq!(counts[0], 4 * 5 * 3);
    // Stage 2: READ/WRITE free, EXEC_EL1 == EXEC_EL0: 8 sets; with XNX 16; 4 memory
    // types (no tagged one).
    assert_eq!(counts[1], 8 * 4 * 3);
    assert_eq!(counts[2], 16 * 4 * 3);
    assert_eq!(counts[3], 8 * 4 * 3);
    // EL1: READ required; WRITE, USER, EXEC_EL1, EXEC_EL0 free except W+U+X1: 16 - 2.
    assert_eq!(counts[4], 14 * 5 * 3);
}

#[test]
fn vtcr_vttbr_for_several_ipa_sizes() {
    // (IPA bits, PA bits, start level, concatenated roots, VTCR_EL2)
    // VTCR_EL2 = RES1[31] | PS[18:16] | TG0=00 | SH0=11 [13:12] | ORGN0=01 [11:10]
    //          | IRGN0=01 [9:8] | SL0[7:6] | T0SZ[5:0]; SL0 (4 KiB): 0 = L2, 1 = L1, 2 = L0.
    let cases = [
        (32, 40, 2, 4, 0x8000_0000 | 2 << 16 | 0x3500 | 0 << 6 | 32),
        (36, 48, 1, 1, 0x8000_0000 | 5 << 16 | 0x3500 | 1 << 6 | 28),
        (40, 48, 1, 2, 0x8005_3558),
        (42, 42, 1, 8, 0x8000_0000 | 3 << 16 | 0x3500 | 1 << 6 | 22),
        (43, 44, 1, 16, 0x8000_0000 | 4 << 16 | 0x3500 | 1 << 6 | 21),
        (44, 48, 0, 1, 0x8005_3594),
        (48, 48, 0, 1, 0x8005_3590),
        (30, 32, 2, 1, 0x8000_0000 | 0x3500 | 34),
    ];
    for (ipa, pa, level, roots, vtcr) in cases {
        let r = Stage2::new(42, ipa).with_pa_bits(pa);
        assert_eq!(r.vtcr(), Ok(vtcr), "IPA {ipa}");
        let g = r.geometry().unwrap();
        assert_eq!(
            (g.start_level(), g.root_tables()),
            (level, roots),
            "IPA {ipa}"
        );
        let t = PageTable::new(r, HeapFrames::new(), RecordingTlb::new()).unwrap();
        assert_eq!(t.vtcr_el2(), vtcr);
        assert_eq!(t.frames_in_use(), usize::from(roots));
        let vttbr = t.vttbr_el2();
        assert_eq!(vttbr >> 48, 42, "VMID in VTTBR_EL2[63:48]");
        let baddr = vttbr & 0x0000_FFFF_FFFF_FFFE;
        assert_eq!(baddr, t.root_address());
        assert_eq!(
            baddr % (u64::from(roots) * 4096),
            0,
            "BADDR aligned to the root size"
        );
        // The concatenated root resolves exactly the IPA space.
        assert_eq!(
            g.root_entries() as u64 * (1u64 << common::shift(level)),
            1u64 << ipa,
            "IPA {ipa}"
        );
    }
    // 16-bit VMIDs set VTCR_EL2.VS (bit 19); a large VMID without them is refused.
    assert_eq!(
        Stage2::new(300, 40).with_vmid16(true).vtcr().unwrap() >> 19 & 1,
        1
    );
    assert_eq!(Stage2::new(300, 40).vtcr(), Err(Error::InvalidConfig));
    assert_eq!(Stage2::new(1, 24).vtcr(), Err(Error::InvalidConfig));
    assert_eq!(Stage2::new(1, 49).vtcr(), Err(Error::InvalidConfig));
    assert_eq!(
        Stage2::new(1, 40).with_pa_bits(41).vtcr(),
        Err(Error::InvalidConfig)
    );
    assert!(PageTable::new(Stage2::new(1, 52), HeapFrames::new(), RecordingTlb::new()).is_err());
}

#[test]
fn tcr_ttbr_mair() {
    // TCR_EL2 (E2H = 0): RES1 bits 31 and 23, PS[18:16], SH0/ORGN0/IRGN0, T0SZ.
    assert_eq!(El2::new(48).tcr(), Ok(0x8085_3510));
    assert_eq!(
        El2::new(39).with_pa_bits(40).tcr(),
        Ok(0x8000_0000 | 1 << 23 | 2 << 16 | 0x3500 | 25)
    );
    assert_eq!(Geometry::stage1(39).unwrap().start_level(), 1);
    assert_eq!(Geometry::stage1(48).unwrap().start_level(), 0);
    assert_eq!(Geometry::stage1(30).unwrap().start_level(), 2);
    assert_eq!(Geometry::stage1(30).unwrap().root_entries(), 512);
    assert_eq!(Geometry::stage1(36).unwrap().root_entries(), 64);
    // TCR_EL1: IPS[34:32], TG1[31:30] = 0b10 (4 KiB), EPD1[23], T1SZ[21:16], T0SZ.
    assert_eq!(El1::new(3, 39).tcr(), Ok(0x5_8099_3519));
    assert_eq!(
        El1::new(3, 39).with_asid16(true).tcr().unwrap() >> 36 & 1,
        1
    );
    assert_eq!(
        El1::new(300, 39).with_asid16(false).tcr(),
        Err(Error::InvalidConfig)
    );
    // MAIR: Attr0 = 0xFF, Attr1 = 0x00, Attr2 = 0x04, Attr3 = 0x44, Attr4 = 0xFF
    // (write-back, untagged) or 0xF0 (Tagged Normal, FEAT_MTE2).
    assert_eq!(MAIR_VALUE, 0xFF_4404_00FF);
    assert_eq!(MAIR_VALUE_TAGGED, 0xF0_4404_00FF);
    let t = PageTable::new(El2::new(48), HeapFrames::new(), RecordingTlb::new()).unwrap();
    assert_eq!(t.tcr_el2(), 0x8085_3510);
    assert_eq!(t.ttbr0_el2(), t.root_address());
    assert_eq!(t.mair_el2(), MAIR_VALUE);
    let r = El1::new(0x1234, 48).with_asid16(true);
    let t = PageTable::new(r, HeapFrames::new(), RecordingTlb::new()).unwrap();
    assert_eq!(t.ttbr0_el1(), t.root_address() | 0x1234 << 48);
    assert_eq!(t.tcr_el1() >> 36 & 1, 1, "16-bit ASIDs: TCR_EL1.AS");
}
