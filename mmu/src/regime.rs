//! Translation regimes: geometry, descriptor encodings and control-register values.
//!
//! Descriptor bit positions follow the Arm ARM (DDI 0487), D8.3 "Translation table
//! descriptor formats" (VMSAv8-64, 4 KiB granule) and D8.4 "Memory access control"
//! (stage 1 AP/PXN/UXN, stage 2 S2AP/XN, MemAttr).

use crate::attrs::{Attributes, MemoryType, Permissions, SwBits, TableAttrs};
use crate::desc;
use crate::error::Error;
use crate::tlb::{TlbContext, TlbOp};

/// Shape of a table: input size, start level and number of concatenated root tables.
///
/// Only consistent shapes can be built ([`Geometry::new`], [`Geometry::stage1`],
/// [`Geometry::stage2`]), so every method is total.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    input_bits: u8,
    start_level: u8,
    root_tables: u8,
}

impl Geometry {
    /// A geometry with `input_bits` (25..=48) of input address resolved from a root at
    /// `start_level` (0..=2) made of `root_tables` concatenated tables (1, 2, 4, 8 or
    /// 16; more than 1 only when one table at that level cannot resolve the input
    /// size, and never at level 0, Arm ARM D8.2.6).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for any other combination.
    pub const fn new(input_bits: u8, start_level: u8, root_tables: u8) -> Result<Self, Error> {
        if input_bits < 25 || input_bits > 48 || start_level > 2 {
            return Err(Error::InvalidConfig);
        }
        if !root_tables.is_power_of_two() || root_tables > 16 {
            return Err(Error::InvalidConfig);
        }
        let shift = desc::level_shift(start_level);
        let extra = root_tables.trailing_zeros();
        let bits = input_bits as u32;
        // The root resolves bits [input_bits-1 : shift]: more than one entry's worth,
        // at most what the (concatenated) root holds, and concatenation only when one
        // table would not do.
        let ok = bits > shift
            && bits <= shift + 9 + extra
            && (root_tables == 1 || (start_level > 0 && bits == shift + 9 + extra));
        if !ok {
            return Err(Error::InvalidConfig);
        }
        Ok(Geometry {
            input_bits,
            start_level,
            root_tables,
        })
    }

    /// Input address bits: the table translates `0 .. 1 << input_bits`.
    #[must_use]
    pub const fn input_bits(&self) -> u8 {
        self.input_bits
    }

    /// Level of the root table (0..=2).
    #[must_use]
    pub const fn start_level(&self) -> u8 {
        self.start_level
    }

    /// Number of concatenated root tables (1, or up to 16 for stage 2).
    #[must_use]
    pub const fn root_tables(&self) -> u8 {
        self.root_tables
    }

    /// Stage-1 geometry (no concatenation) for `input_bits` of VA, 25..=48.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] outside 25..=48 (4 KiB granule without FEAT_TTST/LPA2).
    pub const fn stage1(input_bits: u8) -> Result<Self, Error> {
        if input_bits < 25 || input_bits > 48 {
            return Err(Error::InvalidConfig);
        }
        let start_level = if input_bits > 39 {
            0
        } else if input_bits > 30 {
            1
        } else {
            2
        };
        Self::new(input_bits, start_level, 1)
    }

    /// Stage-2 geometry for `input_bits` of IPA, 25..=48: the start level with the
    /// fewest levels such that at most 16 root tables are concatenated, never
    /// concatenating at level 0 (Arm ARM D8.2.6, "Concatenated translation tables").
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] outside 25..=48.
    pub const fn stage2(input_bits: u8) -> Result<Self, Error> {
        if input_bits < 25 || input_bits > 48 {
            return Err(Error::InvalidConfig);
        }
        // Level 2 resolves 30 bits with one table, 34 with 16 concatenated;
        // level 1 resolves 39 / 43 bits; level 0 (no concatenation) up to 48.
        let (start_level, root_tables) = if input_bits <= 34 {
            (
                2,
                if input_bits > 30 {
                    1u8 << (input_bits - 30)
                } else {
                    1
                },
            )
        } else if input_bits <= 43 {
            (
                1,
                if input_bits > 39 {
                    1u8 << (input_bits - 39)
                } else {
                    1
                },
            )
        } else {
            (0, 1)
        };
        Self::new(input_bits, start_level, root_tables)
    }

    /// Number of entries of the (concatenated) root table.
    #[must_use]
    pub const fn root_entries(&self) -> usize {
        1 << (self.input_bits as u32 - desc::level_shift(self.start_level))
    }

    /// Size in bytes of the input address space.
    #[must_use]
    pub const fn input_size(&self) -> u64 {
        1 << self.input_bits
    }
}

/// `TCR_ELx.{I}PS` / `VTCR_EL2.PS` encoding of an output address size.
const fn ps_field(pa_bits: u8) -> Result<u64, Error> {
    Ok(match pa_bits {
        32 => 0,
        36 => 1,
        40 => 2,
        42 => 3,
        44 => 4,
        48 => 5,
        _ => return Err(Error::InvalidConfig),
    })
}

// Cacheability/shareability of table walks: inner/outer write-back read/write-allocate
// (IRGN=ORGN=0b01), inner shareable (SH=0b11), 4 KiB granule (TG0=0b00).
const WALK_ATTRS: u64 = (0b01 << 8) | (0b01 << 10) | (0b11 << 12);

/// A translation regime: how descriptors and TLB maintenance look for one kind of table.
///
/// Implemented by [`El2`], [`Stage2`] and [`El1`].
///
/// # Safety
///
/// The crate frees table frames once the maintenance a regime asks for has run, and
/// `arch::ArmTlb` loads the translation registers of [`tlb_context`](Self::tlb_context),
/// so an implementation must guarantee that:
///
/// - [`tlbi_entry`](Self::tlbi_entry), [`tlbi_range`](Self::tlbi_range) (followed by
///   [`tlbi_after_entries`](Self::tlbi_after_entries)) and [`tlbi_all`](Self::tlbi_all)
///   remove every TLB and walk-cache entry of this table for the addresses they name
///   (non-leaf forms: walk-cache entries too), and nothing of other tables that
///   they must keep;
/// - [`tlb_context`](Self::tlb_context) names the table rooted at `root` (and its
///   valid configuration), never other tables;
/// - [`encode`](Self::encode) returns attribute bits only (the crate masks the output
///   address and type bits) and [`geometry`](Self::geometry) the table's real shape.
pub unsafe trait Regime {
    /// Short name used in dumps.
    const NAME: &'static str;

    /// Table geometry.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the configuration cannot be expressed.
    fn geometry(&self) -> Result<Geometry, Error>;

    /// Output address bits; output addresses must be below `1 << output_bits()`.
    fn output_bits(&self) -> u8;

    /// Descriptor bits (everything but the output address and bits \[1:0\]) of a leaf
    /// with `attrs`.
    ///
    /// # Errors
    /// [`Error::UnsupportedAttributes`] if the regime cannot express `attrs`.
    fn encode(&self, attrs: &Attributes) -> Result<u64, Error>;

    /// Attributes of a valid leaf descriptor written by [`encode`](Self::encode).
    fn decode(&self, desc: u64) -> Attributes;

    /// Table-descriptor bits for `attrs` (only the table-attribute bits \[62:59\]). The
    /// default accepts no attributes, as for stage 2.
    ///
    /// # Errors
    /// [`Error::UnsupportedAttributes`] if the regime cannot express `attrs`.
    fn encode_table(&self, attrs: TableAttrs) -> Result<u64, Error> {
        if attrs.is_empty() {
            Ok(0)
        } else {
            Err(Error::UnsupportedAttributes)
        }
    }

    /// Table attributes of a table descriptor written with
    /// [`encode_table`](Self::encode_table).
    fn decode_table(&self, desc: u64) -> TableAttrs {
        let _ = desc;
        TableAttrs::empty()
    }

    /// Invalidation of the entries for one input address.
    fn tlbi_entry(&self, addr: u64, leaf: bool) -> TlbOp;

    /// Invalidation of the entries for `pages` 4 KiB pages from `addr` (FEAT_TLBIRANGE),
    /// used when the table was told to use ranges. The default invalidates everything
    /// ([`tlbi_all`](Self::tlbi_all)), which is correct for any regime.
    fn tlbi_range(&self, addr: u64, pages: u64, leaf: bool) -> TlbOp {
        let _ = (addr, pages, leaf);
        self.tlbi_all()
    }

    /// Invalidation of everything the table may have in the TLBs.
    fn tlbi_all(&self) -> TlbOp;

    /// Extra invalidation needed after a batch of [`tlbi_entry`](Self::tlbi_entry) or
    /// [`tlbi_range`](Self::tlbi_range) operations (stage 2: the combined stage 1+2
    /// entries).
    fn tlbi_after_entries(&self) -> Option<TlbOp> {
        None
    }

    /// The context the table's maintenance runs in (stage 2: its `VTTBR_EL2` and
    /// `VTCR_EL2`).
    fn tlb_context(&self, root: u64) -> TlbContext {
        let _ = root;
        TlbContext::Current
    }
}

fn check_output(bits: u8) -> Result<(), Error> {
    ps_field(bits).map(|_| ())
}

/// Bits common to all our leaves: AF, shareability, software bits.
fn common_bits(attrs: &Attributes) -> u64 {
    let sh = if attrs.mem_type.is_device() {
        0
    } else {
        desc::SH_INNER
    };
    desc::AF | sh | attrs.sw.to_desc()
}

/// EL2 stage 1, non-VHE (`TTBR0_EL2`, `TCR_EL2`, `MAIR_EL2`): one VA range, no ASID.
///
/// Leaves: AttrIndx\[4:2\] into [`MAIR_VALUE`](crate::MAIR_VALUE), AP\[2\] (bit 7) read-only, AP\[1\]
/// (bit 6) RES1, SH\[9:8\], AF\[10\], XN (bit 54), software bits \[58:55\]
/// (Arm ARM D8.3.2 and D8.4.1, "regime that supports one privilege level").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct El2 {
    va_bits: u8,
    pa_bits: u8,
}

impl El2 {
    /// EL2 regime translating `va_bits` (25..=48) of VA to 48-bit PAs.
    #[must_use]
    pub const fn new(va_bits: u8) -> Self {
        El2 {
            va_bits,
            pa_bits: 48,
        }
    }

    /// Sets the output address size (32, 36, 40, 42, 44 or 48): `TCR_EL2.PS`.
    #[must_use]
    pub const fn with_pa_bits(mut self, pa_bits: u8) -> Self {
        self.pa_bits = pa_bits;
        self
    }

    /// `TCR_EL2` value: T0SZ, IRGN0/ORGN0 write-back, SH0 inner shareable, TG0 4 KiB,
    /// PS, and the RES1 bits 31 and 23 (Arm ARM D19.2, TCR_EL2 when E2H == 0).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an unsupported VA or PA size.
    pub const fn tcr(&self) -> Result<u64, Error> {
        if let Err(e) = Geometry::stage1(self.va_bits) {
            return Err(e);
        }
        let ps = match ps_field(self.pa_bits) {
            Ok(ps) => ps,
            Err(e) => return Err(e),
        };
        Ok((1 << 31) | (1 << 23) | (ps << 16) | WALK_ATTRS | (64 - self.va_bits as u64))
    }
}

// SAFETY: the encodings and invalidations follow the Arm ARM sections cited on the
// type; the TLB context is the table's own.
unsafe impl Regime for El2 {
    const NAME: &'static str = "EL2";

    fn geometry(&self) -> Result<Geometry, Error> {
        check_output(self.pa_bits)?;
        Geometry::stage1(self.va_bits)
    }

    fn output_bits(&self) -> u8 {
        self.pa_bits
    }

    #[inline]
    fn encode(&self, attrs: &Attributes) -> Result<u64, Error> {
        let p = attrs.perms;
        if !p.contains(Permissions::READ)
            || p.intersects(Permissions::EXEC_EL1 | Permissions::EXEC_EL0 | Permissions::USER)
        {
            return Err(Error::UnsupportedAttributes);
        }
        let mut d = common_bits(attrs) | desc::AP1 | (attrs.mem_type.mair_index() << 2);
        if !p.contains(Permissions::WRITE) {
            d |= desc::AP2_RO;
        }
        if !p.contains(Permissions::EXEC_EL2) {
            d |= desc::XN;
        }
        Ok(d)
    }

    #[inline]
    fn decode(&self, d: u64) -> Attributes {
        let mut perms = Permissions::READ;
        if d & desc::AP2_RO == 0 {
            perms |= Permissions::WRITE;
        }
        if d & desc::XN == 0 {
            perms |= Permissions::EXEC_EL2;
        }
        Attributes {
            perms,
            mem_type: MemoryType::from_mair_index((d >> 2) & 7).unwrap_or_default(),
            sw: SwBits::from_desc(d),
        }
    }

    fn encode_table(&self, attrs: TableAttrs) -> Result<u64, Error> {
        // One privilege level: APTable[0] and PXNTable are RES0.
        if !(TableAttrs::NO_WRITE | TableAttrs::NO_EXEC_EL2).contains(attrs) {
            return Err(Error::UnsupportedAttributes);
        }
        let mut d = 0;
        if attrs.contains(TableAttrs::NO_WRITE) {
            d |= desc::AP_TABLE_NO_WRITE;
        }
        if attrs.contains(TableAttrs::NO_EXEC_EL2) {
            d |= desc::XN_TABLE;
        }
        Ok(d)
    }

    fn decode_table(&self, d: u64) -> TableAttrs {
        let mut a = TableAttrs::empty();
        if d & desc::AP_TABLE_NO_WRITE != 0 {
            a |= TableAttrs::NO_WRITE;
        }
        if d & desc::XN_TABLE != 0 {
            a |= TableAttrs::NO_EXEC_EL2;
        }
        a
    }

    fn tlbi_entry(&self, va: u64, leaf: bool) -> TlbOp {
        TlbOp::El2Va { va, leaf }
    }

    fn tlbi_range(&self, va: u64, pages: u64, leaf: bool) -> TlbOp {
        TlbOp::El2Range { va, pages, leaf }
    }

    fn tlbi_all(&self) -> TlbOp {
        TlbOp::El2All
    }
}

/// Stage 2 (`VTTBR_EL2`, `VTCR_EL2`) of one VM, tagged with its VMID.
///
/// Leaves: MemAttr\[5:2\] (or the FEAT_S2FWB encoding), S2AP\[7:6\] (bit 6 read,
/// bit 7 write), SH\[9:8\], AF\[10\], XN\[54:53\] (FEAT_XNX: EL1 and EL0 separately;
/// otherwise bit 54 alone), software bits \[58:55\] (Arm ARM D8.3.2, D8.4.2, D8.6.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stage2 {
    vmid: u16,
    ipa_bits: u8,
    pa_bits: u8,
    xnx: bool,
    fwb: bool,
    vmid16: bool,
}

impl Stage2 {
    /// Stage 2 for VMID `vmid` translating `ipa_bits` (25..=48) of IPA to 48-bit PAs,
    /// with 8-bit VMIDs.
    ///
    /// The VMID size (`VTCR_EL2.VS`) is a choice for the whole system, not for one VM:
    /// with VS = 0 the hardware treats the upper 8 VMID bits as zero, so tables of
    /// different sizes would share TLB entries. Select 16-bit VMIDs for every table
    /// with [`with_vmid16`](Self::with_vmid16); a VMID above 255 without it is an
    /// invalid configuration.
    #[must_use]
    pub const fn new(vmid: u16, ipa_bits: u8) -> Self {
        Stage2 {
            vmid,
            ipa_bits,
            pa_bits: 48,
            xnx: false,
            fwb: false,
            vmid16: false,
        }
    }

    /// Sets the output (PA) size: 32, 36, 40, 42, 44 or 48 (`VTCR_EL2.PS`).
    #[must_use]
    pub const fn with_pa_bits(mut self, pa_bits: u8) -> Self {
        self.pa_bits = pa_bits;
        self
    }

    /// Uses FEAT_XNX (separate EL1/EL0 execute-never in XN\[54:53\]).
    #[must_use]
    pub const fn with_xnx(mut self, xnx: bool) -> Self {
        self.xnx = xnx;
        self
    }

    /// Uses the FEAT_S2FWB MemAttr encoding (requires `HCR_EL2.FWB` = 1).
    #[must_use]
    pub const fn with_fwb(mut self, fwb: bool) -> Self {
        self.fwb = fwb;
        self
    }

    /// Uses 16-bit VMIDs (`VTCR_EL2.VS`; requires 16-bit VMID support).
    #[must_use]
    pub const fn with_vmid16(mut self, vmid16: bool) -> Self {
        self.vmid16 = vmid16;
        self
    }

    /// The VMID.
    #[must_use]
    pub const fn vmid(&self) -> u16 {
        self.vmid
    }

    /// `VTCR_EL2` value: T0SZ\[5:0\], SL0\[7:6\] (start level), IRGN0/ORGN0 write-back,
    /// SH0 inner shareable, TG0 4 KiB, PS\[18:16\], VS\[19\], RES1 bit 31
    /// (Arm ARM D19.2, VTCR_EL2).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an unsupported IPA/PA size or a VMID above 255
    /// without 16-bit VMIDs.
    pub const fn vtcr(&self) -> Result<u64, Error> {
        let g = match Geometry::stage2(self.ipa_bits) {
            Ok(g) => g,
            Err(e) => return Err(e),
        };
        let ps = match ps_field(self.pa_bits) {
            Ok(ps) => ps,
            Err(e) => return Err(e),
        };
        if self.vmid > 255 && !self.vmid16 {
            return Err(Error::InvalidConfig);
        }
        // SL0 with a 4 KiB granule: 0 = start at level 2, 1 = level 1, 2 = level 0.
        let sl0 = (2 - g.start_level) as u64;
        let vs = if self.vmid16 { 1 << 19 } else { 0 };
        Ok((1 << 31) | vs | (ps << 16) | WALK_ATTRS | (sl0 << 6) | (64 - self.ipa_bits as u64))
    }

    /// `VTTBR_EL2` for a root at `root` (aligned to the concatenated root size):
    /// BADDR | VMID\[63:48\].
    #[must_use]
    pub const fn vttbr(&self, root: u64) -> u64 {
        root | ((self.vmid as u64) << 48)
    }

    const fn mem_attr(&self, t: MemoryType) -> u64 {
        // MemAttr[3:0] at descriptor bits [5:2]; Arm ARM D8.6.5 (stage 2 memory type).
        // Without FWB: [3:2] outer, [1:0] inner: 0b11 write-back, 0b01 non-cacheable;
        // [3:2] = 0b00 is Device with [1:0] = 0b00 nGnRnE, 0b01 nGnRE.
        // With FWB: MemAttr[2] = 1 Normal ([1:0] 0b10 write-back, 0b01 non-cacheable),
        // MemAttr[2] = 0 Device as above.
        let v = match (t, self.fwb) {
            (MemoryType::Normal, false) => 0b1111,
            (MemoryType::Normal, true) => 0b0110,
            (MemoryType::NormalNonCacheable, false) => 0b0101,
            (MemoryType::NormalNonCacheable, true) => 0b0101,
            (MemoryType::DeviceNGnRE, _) => 0b0001,
            (MemoryType::DeviceNGnRnE, _) => 0b0000,
            // Refused by `encode`: stage 2 has no tagged type (its Normal write-back
            // leaves tags to stage 1).
            (MemoryType::NormalTagged, _) => 0b1111,
        };
        v << 2
    }
}

// SAFETY: the encodings and invalidations follow the Arm ARM sections cited on the
// type; the TLB context is the table's own.
unsafe impl Regime for Stage2 {
    const NAME: &'static str = "stage 2";

    fn geometry(&self) -> Result<Geometry, Error> {
        self.vtcr()?;
        Geometry::stage2(self.ipa_bits)
    }

    fn output_bits(&self) -> u8 {
        self.pa_bits
    }

    #[inline]
    fn encode(&self, attrs: &Attributes) -> Result<u64, Error> {
        let p = attrs.perms;
        if p.intersects(Permissions::EXEC_EL2 | Permissions::USER)
            || attrs.mem_type == MemoryType::NormalTagged
        {
            return Err(Error::UnsupportedAttributes);
        }
        let mut d = common_bits(attrs) | self.mem_attr(attrs.mem_type);
        if p.contains(Permissions::READ) {
            d |= desc::S2AP_R;
        }
        if p.contains(Permissions::WRITE) {
            d |= desc::S2AP_W;
        }
        let x1 = p.contains(Permissions::EXEC_EL1);
        let x0 = p.contains(Permissions::EXEC_EL0);
        // XN[1:0] (bits [54:53]), Arm ARM D8.4.2 with FEAT_XNX:
        // 0b00 EL1+EL0 may execute, 0b01 EL0 only, 0b10 neither, 0b11 EL1 only.
        let xn: u64 = match (x1, x0, self.xnx) {
            (true, true, _) => 0b00,
            (false, false, _) => 0b10,
            (false, true, true) => 0b01,
            (true, false, true) => 0b11,
            (_, _, false) => return Err(Error::UnsupportedAttributes),
        };
        d |= xn << 53;
        Ok(d)
    }

    #[inline]
    fn decode(&self, d: u64) -> Attributes {
        let mut perms = Permissions::empty();
        if d & desc::S2AP_R != 0 {
            perms |= Permissions::READ;
        }
        if d & desc::S2AP_W != 0 {
            perms |= Permissions::WRITE;
        }
        match (d >> 53) & 3 {
            0b00 => perms |= Permissions::EXEC_EL1 | Permissions::EXEC_EL0,
            0b01 if self.xnx => perms |= Permissions::EXEC_EL0,
            0b11 if self.xnx => perms |= Permissions::EXEC_EL1,
            _ => {}
        }
        let m = (d >> 2) & 0xF;
        let mem_type = match (m, self.fwb) {
            (0b0000, _) => MemoryType::DeviceNGnRnE,
            (0b0001, _) => MemoryType::DeviceNGnRE,
            (0b0101, _) => MemoryType::NormalNonCacheable,
            _ => MemoryType::Normal,
        };
        Attributes {
            perms,
            mem_type,
            sw: SwBits::from_desc(d),
        }
    }

    fn tlbi_entry(&self, ipa: u64, leaf: bool) -> TlbOp {
        TlbOp::Stage2Ipa {
            vmid: self.vmid,
            ipa,
            leaf,
        }
    }

    fn tlbi_range(&self, ipa: u64, pages: u64, leaf: bool) -> TlbOp {
        TlbOp::Stage2Range {
            vmid: self.vmid,
            ipa,
            pages,
            leaf,
        }
    }

    fn tlbi_all(&self) -> TlbOp {
        TlbOp::Stage2All { vmid: self.vmid }
    }

    fn tlbi_after_entries(&self) -> Option<TlbOp> {
        Some(TlbOp::Stage2Stage1All { vmid: self.vmid })
    }

    fn tlb_context(&self, root: u64) -> TlbContext {
        TlbContext::Stage2 {
            vttbr: self.vttbr(root),
            // `PageTable::new` validated the configuration.
            vtcr: self.vtcr().unwrap_or_default(),
        }
    }
}

/// EL1&0 stage 1 (`TTBR0_EL1`, `TCR_EL1`, `MAIR_EL1`), tagged with an ASID.
///
/// Leaves: AttrIndx\[4:2\], AP\[1\] (bit 6, EL0 access), AP\[2\] (bit 7, read-only),
/// SH\[9:8\], AF\[10\], nG\[11\] (always set: entries are tagged with the ASID),
/// PXN (bit 53), UXN (bit 54), software bits \[58:55\] (Arm ARM D8.3.2, D8.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct El1 {
    asid: u16,
    va_bits: u8,
    pa_bits: u8,
    asid16: bool,
}

impl El1 {
    /// EL1&0 regime (lower VA range, `TTBR0_EL1`) for `asid`, `va_bits` (25..=48) of
    /// VA, 48-bit output, with 8-bit ASIDs.
    ///
    /// As for VMIDs, the ASID size (`TCR_EL1.AS`) is a choice for the whole system:
    /// select 16-bit ASIDs with [`with_asid16`](Self::with_asid16); an ASID above 255
    /// without it is an invalid configuration.
    #[must_use]
    pub const fn new(asid: u16, va_bits: u8) -> Self {
        El1 {
            asid,
            va_bits,
            pa_bits: 48,
            asid16: false,
        }
    }

    /// Sets the output address size (32, 36, 40, 42, 44 or 48): `TCR_EL1.IPS`.
    #[must_use]
    pub const fn with_pa_bits(mut self, pa_bits: u8) -> Self {
        self.pa_bits = pa_bits;
        self
    }

    /// Uses 16-bit ASIDs (`TCR_EL1.AS`).
    #[must_use]
    pub const fn with_asid16(mut self, asid16: bool) -> Self {
        self.asid16 = asid16;
        self
    }

    /// The ASID.
    #[must_use]
    pub const fn asid(&self) -> u16 {
        self.asid
    }

    /// `TCR_EL1` value for walks through `TTBR0_EL1` only: T0SZ, IRGN0/ORGN0
    /// write-back, SH0 inner shareable, TG0 4 KiB, T1SZ = T0SZ, EPD1 = 1 (no
    /// `TTBR1_EL1` walks), TG1 = 0b10 (4 KiB), IPS\[34:32\], AS\[36\] (Arm ARM D19.2, TCR_EL1).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an unsupported VA/PA size or an ASID above 255
    /// without 16-bit ASIDs.
    pub const fn tcr(&self) -> Result<u64, Error> {
        if let Err(e) = Geometry::stage1(self.va_bits) {
            return Err(e);
        }
        let ips = match ps_field(self.pa_bits) {
            Ok(ps) => ps,
            Err(e) => return Err(e),
        };
        if self.asid > 255 && !self.asid16 {
            return Err(Error::InvalidConfig);
        }
        let tsz = 64 - self.va_bits as u64;
        let asid16 = if self.asid16 { 1 << 36 } else { 0 };
        Ok(asid16 | (ips << 32) | (0b10 << 30) | (1 << 23) | (tsz << 16) | WALK_ATTRS | tsz)
    }

    /// `TTBR0_EL1` for a root at `root`: BADDR | ASID\[63:48\].
    #[must_use]
    pub const fn ttbr0(&self, root: u64) -> u64 {
        root | ((self.asid as u64) << 48)
    }
}

// SAFETY: the encodings and invalidations follow the Arm ARM sections cited on the
// type; the TLB context is the table's own.
unsafe impl Regime for El1 {
    const NAME: &'static str = "EL1&0";

    fn geometry(&self) -> Result<Geometry, Error> {
        self.tcr()?;
        Geometry::stage1(self.va_bits)
    }

    fn output_bits(&self) -> u8 {
        self.pa_bits
    }

    #[inline]
    fn encode(&self, attrs: &Attributes) -> Result<u64, Error> {
        let p = attrs.perms;
        if !p.contains(Permissions::READ) || p.contains(Permissions::EXEC_EL2) {
            return Err(Error::UnsupportedAttributes);
        }
        // A location writable at EL0 is never executable at EL1 (Arm ARM D8.4.1.2,
        // "implicit PXN"): refuse rather than silently drop EXEC_EL1.
        if p.contains(Permissions::USER | Permissions::WRITE | Permissions::EXEC_EL1) {
            return Err(Error::UnsupportedAttributes);
        }
        let mut d = common_bits(attrs) | desc::NG | (attrs.mem_type.mair_index() << 2);
        if p.contains(Permissions::USER) {
            d |= desc::AP1;
        }
        if !p.contains(Permissions::WRITE) {
            d |= desc::AP2_RO;
        }
        if !p.contains(Permissions::EXEC_EL1) {
            d |= desc::PXN;
        }
        if !p.contains(Permissions::EXEC_EL0) {
            d |= desc::UXN;
        }
        Ok(d)
    }

    #[inline]
    fn decode(&self, d: u64) -> Attributes {
        let mut perms = Permissions::READ;
        if d & desc::AP2_RO == 0 {
            perms |= Permissions::WRITE;
        }
        if d & desc::AP1 != 0 {
            perms |= Permissions::USER;
        }
        if d & desc::PXN == 0 {
            perms |= Permissions::EXEC_EL1;
        }
        if d & desc::UXN == 0 {
            perms |= Permissions::EXEC_EL0;
        }
        Attributes {
            perms,
            mem_type: MemoryType::from_mair_index((d >> 2) & 7).unwrap_or_default(),
            sw: SwBits::from_desc(d),
        }
    }

    fn encode_table(&self, attrs: TableAttrs) -> Result<u64, Error> {
        if attrs.contains(TableAttrs::NO_EXEC_EL2) {
            return Err(Error::UnsupportedAttributes);
        }
        let mut d = 0;
        for (flag, bit) in [
            (TableAttrs::NO_WRITE, desc::AP_TABLE_NO_WRITE),
            (TableAttrs::NO_USER, desc::AP_TABLE_NO_EL0),
            (TableAttrs::NO_EXEC_EL1, desc::PXN_TABLE),
            (TableAttrs::NO_EXEC_EL0, desc::XN_TABLE),
        ] {
            if attrs.contains(flag) {
                d |= bit;
            }
        }
        Ok(d)
    }

    fn decode_table(&self, d: u64) -> TableAttrs {
        let mut a = TableAttrs::empty();
        for (flag, bit) in [
            (TableAttrs::NO_WRITE, desc::AP_TABLE_NO_WRITE),
            (TableAttrs::NO_USER, desc::AP_TABLE_NO_EL0),
            (TableAttrs::NO_EXEC_EL1, desc::PXN_TABLE),
            (TableAttrs::NO_EXEC_EL0, desc::XN_TABLE),
        ] {
            if d & bit != 0 {
                a |= flag;
            }
        }
        a
    }

    fn tlbi_entry(&self, va: u64, leaf: bool) -> TlbOp {
        TlbOp::El1Va {
            asid: self.asid,
            va,
            leaf,
        }
    }

    fn tlbi_range(&self, va: u64, pages: u64, leaf: bool) -> TlbOp {
        TlbOp::El1Range {
            asid: self.asid,
            va,
            pages,
            leaf,
        }
    }

    fn tlbi_all(&self) -> TlbOp {
        TlbOp::El1Asid { asid: self.asid }
    }
}
