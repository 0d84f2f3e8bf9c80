//! The VM manager over a recording fake and over real `mmu` tables; the fakes are shared
//! with the vCPU and memory-sharing tests.

use super::pool::PoolError;
use super::vmid::{Vmid, VmidBits, VmidFlush};
use super::*;
use crate::config::fw_cfg::FwCfgError;
use crate::config::{tests as dt, GuestRegion, ImageSource, Stage2Mappings};
use crate::mem::frames::{FramePool, SharedFrames};
use crate::mem::{Ipa, PhysAddr, PhysRange};
use alloc::sync::Arc;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Fake host memory: sparse bytes (absent bytes are zero) and how many bytes were
/// zeroed; shared between the [`Fake`] the tests inspect and the handle the manager
/// keeps.
#[derive(Clone, Default)]
pub(crate) struct FakeMem(
    Arc<std::sync::Mutex<(BTreeMap<u64, u8>, u64)>>,
    /// The fw-cfg device's files by select key; fetching one that is not here fails.
    Arc<std::sync::Mutex<BTreeMap<u16, Vec<u8>>>>,
);

impl FakeMem {
    fn inner(&self) -> std::sync::MutexGuard<'_, (BTreeMap<u64, u8>, u64)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl GuestMemory for FakeMem {
    fn clean_to_poc(&self, _va: u64, _len: u64) {}
    fn zero(&self, pa: PhysAddr, len: u64) {
        let pa = pa.get();
        let mut m = self.inner();
        m.1 += len;
        let keys: Vec<u64> = m.0.range(pa..pa + len).map(|(k, _)| *k).collect();
        for k in keys {
            m.0.remove(&k);
        }
    }
    fn load(&self, dst: PhysAddr, src: ImageSource, len: u64) -> Result<(), FwCfgError> {
        let dst = dst.get();
        let src_bytes: Vec<(u64, u8)> = match src {
            ImageSource::Staged(src) => {
                let src = src.get();
                let m = self.inner();
                m.0.range(src..src + len)
                    .map(|(k, v)| (*k - src, *v))
                    .collect()
            }
            ImageSource::FwCfg(select) => {
                let files = self
                    .1
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let file = files.get(&select).ok_or(FwCfgError::Transfer)?;
                (0..len)
                    .zip(file.iter().copied())
                    .filter(|&(_, v)| v != 0)
                    .collect()
            }
        };
        let mut m = self.inner();
        let keys: Vec<u64> = m.0.range(dst..dst + len).map(|(k, _)| *k).collect();
        for k in keys {
            m.0.remove(&k);
        }
        for (k, v) in src_bytes {
            m.0.insert(dst + k, v);
        }
        Ok(())
    }
}

/// Fake host memory and stage-2 tables that take one root frame plus one frame per 2 MiB
/// of IPA space they map, from a shared counter.
#[derive(Default)]
pub(crate) struct Fake {
    pub memory: FakeMem,
    pub frames: Arc<AtomicUsize>,
    pub flushed: Vec<Vmid>,
    pub fail_map_at: Option<u64>,
}

impl Fake {
    /// The fake memory's bytes.
    pub fn mem(&self) -> impl std::ops::DerefMut<Target = BTreeMap<u64, u8>> + '_ {
        struct Bytes<'a>(std::sync::MutexGuard<'a, (BTreeMap<u64, u8>, u64)>);
        impl std::ops::Deref for Bytes<'_> {
            type Target = BTreeMap<u64, u8>;
            fn deref(&self) -> &Self::Target {
                &self.0 .0
            }
        }
        impl std::ops::DerefMut for Bytes<'_> {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.0 .0
            }
        }
        Bytes(self.memory.inner())
    }

    /// Bytes zeroed so far.
    pub fn zeroed(&self) -> u64 {
        self.memory.inner().1
    }
}

pub(crate) struct FakeS2 {
    pub maps: BTreeMap<u64, (u64, S2Kind)>,
    /// Attributes (software bits included) of each page in `maps`.
    pub attrs: BTreeMap<u64, mmu::Attributes>,
    vmid: Vmid,
    held: usize,
    counter: Arc<AtomicUsize>,
    fail_at: Option<u64>,
}

impl FakeS2 {
    fn recount(&mut self) {
        let now = 1 + self
            .maps
            .keys()
            .map(|k| k >> 21)
            .collect::<BTreeSet<_>>()
            .len();
        self.counter.fetch_add(now, Ordering::SeqCst);
        self.counter.fetch_sub(self.held, Ordering::SeqCst);
        self.held = now;
    }

    fn insert(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        kind: S2Kind,
        attrs: mmu::Attributes,
    ) -> Result<(), mmu::Error> {
        if self.fail_at.is_some_and(|f| ipa <= f && f < ipa + size) {
            return Err(mmu::Error::OutOfFrames);
        }
        if let Some((&va, _)) = self.maps.range(ipa..ipa + size).next() {
            return Err(mmu::Error::AlreadyMapped { va });
        }
        for off in (0..size).step_by(4096) {
            self.maps.insert(ipa + off, (pa + off, kind));
            self.attrs.insert(ipa + off, attrs);
        }
        self.recount();
        Ok(())
    }
}

impl Stage2Table for FakeS2 {
    fn map(&mut self, ipa: Ipa, pa: PhysAddr, size: u64, kind: S2Kind) -> Result<(), mmu::Error> {
        self.insert(ipa.get(), pa.get(), size, kind, kind.attributes())
    }
    fn map_pages(
        &mut self,
        ipa: Ipa,
        pa: PhysAddr,
        size: u64,
        attrs: mmu::Attributes,
    ) -> Result<(), mmu::Error> {
        self.insert(ipa.get(), pa.get(), size, S2Kind::Ram, attrs)
    }
    fn unmap(&mut self, ipa: Ipa, size: u64) -> Result<(), mmu::Error> {
        let ipa = ipa.get();
        for off in (0..size).step_by(4096) {
            self.maps.remove(&(ipa + off));
            self.attrs.remove(&(ipa + off));
        }
        self.recount();
        Ok(())
    }
    fn protect(&mut self, ipa: Ipa, size: u64, kind: S2Kind) -> Result<(), mmu::Error> {
        let ipa = ipa.get();
        if self.fail_at.is_some_and(|f| ipa <= f && f < ipa + size) {
            return Err(mmu::Error::OutOfFrames);
        }
        for (_, (_, k)) in self.maps.range_mut(ipa..ipa + size) {
            *k = kind;
        }
        for (_, a) in self.attrs.range_mut(ipa..ipa + size) {
            *a = kind.attributes();
        }
        Ok(())
    }
    fn set_sw(&mut self, ipa: Ipa, size: u64, sw: mmu::SwBits) -> Result<(), mmu::Error> {
        let ipa = ipa.get();
        for (_, a) in self.attrs.range_mut(ipa..ipa + size) {
            *a = a.with_sw(sw);
        }
        Ok(())
    }
    fn coalesce(&mut self, _ipa: Ipa, _size: u64) -> Result<(), mmu::Error> {
        // Pages only: nothing to merge.
        Ok(())
    }
    fn walk(
        &self,
        ipa: Ipa,
        size: u64,
        f: &mut dyn FnMut(&mmu::Mapping),
    ) -> Result<(), mmu::Error> {
        let ipa = ipa.get();
        for (&va, &(output, _)) in self.maps.range(ipa..ipa + size) {
            f(&mmu::Mapping {
                va,
                size: 4096,
                output,
                attrs: self.attrs[&va],
                level: 3,
            });
        }
        Ok(())
    }
    fn vttbr(&self) -> u64 {
        (u64::from(self.vmid.get()) << 48) | 0x4400_0000
    }
}

impl VmidFlush for Fake {
    fn flush_vmid(&mut self, vmid: Vmid) {
        self.flushed.push(vmid);
    }
}

impl Backend for Fake {
    type S2 = FakeS2;
    type Mem = FakeMem;
    fn memory(&self) -> FakeMem {
        self.memory.clone()
    }
    fn new_stage2(&mut self, vmid: Vmid, _mappings: Stage2Mappings) -> Result<FakeS2, mmu::Error> {
        self.frames.fetch_add(1, Ordering::SeqCst);
        Ok(FakeS2 {
            vmid,
            maps: BTreeMap::new(),
            attrs: BTreeMap::new(),
            held: 1,
            counter: Arc::clone(&self.frames),
            fail_at: self.fail_map_at,
        })
    }
    fn free_stage2(&mut self, s2: FakeS2) {
        assert!(
            s2.maps.is_empty(),
            "stage 2 freed while it still maps pages"
        );
        self.frames.fetch_sub(s2.held, Ordering::SeqCst);
    }
    fn table_frames(&self) -> usize {
        self.frames.load(Ordering::SeqCst)
    }
    fn ich_vtr(&self) -> u64 {
        crate::vm::vgic::tests::VTR_QEMU
    }

    fn apply_gic(&mut self, _action: crate::vm::vgic::PhysAction) {}
}

/// The fake memory of [`Fake`] with real `mmu` stage-2 tables whose frames come from
/// the heap (`mmu::testing::HeapFrames`, which counts them).
pub(crate) struct MmuFake {
    pub fake: Fake,
    pub frames: &'static mmu::testing::HeapFrames,
}

pub(crate) type MmuS2 = MmuStage2<&'static mmu::testing::HeapFrames, mmu::testing::RecordingTlb>;

impl VmidFlush for MmuFake {
    fn flush_vmid(&mut self, vmid: Vmid) {
        self.fake.flush_vmid(vmid);
    }
}

impl Backend for MmuFake {
    type S2 = MmuS2;
    type Mem = FakeMem;
    fn memory(&self) -> FakeMem {
        self.fake.memory.clone()
    }
    fn new_stage2(&mut self, vmid: Vmid, mappings: Stage2Mappings) -> Result<MmuS2, mmu::Error> {
        // The VMID size is the machine's; 16 bits covers every VMID the manager hands
        // out under either setting.
        let regime = mmu::Stage2::new(vmid.get(), IPA_BITS)
            .with_pa_bits(40)
            .with_vmid16(true);
        MmuStage2::new(
            regime,
            self.frames,
            mmu::testing::RecordingTlb::new(),
            mappings,
        )
    }
    fn free_stage2(&mut self, s2: MmuS2) {
        drop(s2);
    }
    fn table_frames(&self) -> usize {
        self.frames.in_use()
    }
    fn ich_vtr(&self) -> u64 {
        crate::vm::vgic::tests::VTR_QEMU
    }

    fn apply_gic(&mut self, _action: crate::vm::vgic::PhysAction) {}
}

/// The guest RAM of the test managers: 4 MiB.
pub(crate) const GUEST_RAM: PhysRange = PhysRange::new(PhysAddr::new(0x5000_0000), 0x40_0000);

pub(crate) fn desc(pa: u64, cpu: u32) -> VmDesc {
    let blob = dt::dtb(&[("vm", dt::vm_props(pa, cpu))]);
    dt::parse_blob(&blob)
        .expect("a device tree")
        .expect("valid description")
        .remove(0)
}

pub(crate) fn manager() -> VmManager<Fake> {
    let fake = Fake::default();
    // A recognisable staged kernel image: 0x2000 bytes at 0x7000_0000.
    for i in (0..0x2000u64).step_by(61) {
        fake.mem().insert(0x7000_0000 + i, (i % 251) as u8 + 1);
    }
    fake.mem().insert(0x7000_1fff, 0xee);
    VmManager::new(fake, VmidBits::Eight, &[GUEST_RAM])
}

#[test]
fn create_maps_ram_loads_image_and_starts_vcpu0() {
    let m = manager();
    let vm = m.create(desc(0x5000_0000, 1)).expect("create");
    assert_eq!(vm.id, 0);
    assert_ne!(vm.vmid.get(), 0);
    assert_eq!(vm.vttbr >> 48, u64::from(vm.vmid.get()));
    {
        let s2 = vm.stage2.lock();
        let s2 = s2.as_ref().expect("live");
        assert_eq!(s2.maps.len(), 256 + 1, "1 MiB of RAM in 4 KiB pages");
        assert_eq!(s2.maps.get(&0x4000_0000), Some(&(0x5000_0000, S2Kind::Ram)));
        let page = vm.uart_page.as_ref().expect("a register page");
        assert_eq!(
            s2.maps.get(&0x0900_0000),
            Some(&(page.pa().get(), S2Kind::RegisterPage)),
            "the virtual UART's register page, read-only"
        );
    }
    m.with_backend(|p| {
        assert_eq!(p.mem().get(&0x5000_0000), Some(&1));
        assert_eq!(p.mem().get(&0x5000_1fff), Some(&0xee));
        assert_eq!(
            p.mem().get(&(0x5000_0000 + 61 * 7)),
            Some(&((61 * 7 % 251) as u8 + 1))
        );
        assert_eq!(p.mem().get(&0x5000_2000), None);
    });
    assert_eq!(
        vm.state.lock().psci.take_pending(0),
        Some((Ipa::new(0x4000_0000), 0))
    );
    assert!(vm.is_ram(Ipa::new(0x400f_f000), 0x1000));
    assert!(!vm.is_ram(Ipa::new(0x400f_f000), 0x1001));
    assert_eq!(m.outcome(), None);
}

#[test]
fn two_vms_same_ipa_distinct_ram_and_vmids() {
    let m = manager();
    let a = m.create(desc(0x5000_0000, 1)).expect("a");
    let b = m.create(desc(0x5010_0000, 2)).expect("b");
    assert_ne!(a.vmid, b.vmid);
    assert_eq!(b.id, 1);
    let pa = |vm: &Arc<Vm<FakeS2>>| {
        vm.stage2
            .lock()
            .as_ref()
            .and_then(|s| s.maps.get(&0x4000_0000))
            .map(|m| m.0)
    };
    assert_eq!(pa(&a), Some(0x5000_0000));
    assert_eq!(pa(&b), Some(0x5010_0000));
    assert_eq!(m.vm_on_cpu(2).map(|(v, i)| (v.id, i)), Some((1, 0)));
    assert!(m.vm_on_cpu(0).is_none());
    // Same RAM again: refused, nothing leaks (a CPU given to two VMs is refused by
    // `config::parse`).
    let before = m.accounting();
    assert!(matches!(
        m.create(desc(0x5000_0000, 3)),
        Err(VmError::Ram(_, PoolError::InUse))
    ));
    assert_eq!(m.accounting(), before);
}

#[test]
fn failed_create_leaks_nothing() {
    let m = manager();
    m.with_backend(|p| p.fail_map_at = Some(0x4008_0000));
    let before = m.accounting();
    assert_eq!(
        m.create(desc(0x5000_0000, 1)).map(|_| ()),
        Err(VmError::Stage2(mmu::Error::OutOfFrames))
    );
    assert_eq!(m.accounting(), before);
    assert!(m.vms().is_empty());
    // Outside guest RAM (images outside the staging area and pass-through ranges over
    // host RAM are refused by `config::parse`).
    m.with_backend(|p| p.fail_map_at = None);
    assert!(matches!(
        m.create(desc(0x6000_0000, 1)),
        Err(VmError::Ram(_, PoolError::OutOfRange))
    ));
    assert_eq!(m.accounting(), before);
}

#[test]
fn thousand_create_destroy_cycles_leak_nothing() {
    let m = manager();
    let (free0, total, frames0, vmids0) = m.accounting();
    assert_eq!(free0, total);
    assert_eq!((frames0, vmids0), (0, 0));
    let mut vmids = BTreeSet::new();
    for i in 0..1000u64 {
        let pa = 0x5000_0000 + (i % 4) * 0x10_0000;
        let a = m.create(desc(pa, 1)).expect("create a");
        let b = m
            .create(desc(0x5000_0000 + ((i + 1) % 4) * 0x10_0000, 2))
            .expect("create b");
        vmids.insert(a.vmid);
        let (free, _, frames, used) = m.accounting();
        assert_eq!(free, total - 0x20_0000);
        assert_eq!(
            frames, 6,
            "per VM: root, a leaf table for RAM, one for the UART's register page"
        );
        assert_eq!(used, 2);
        // The guest dirties its RAM.
        m.with_backend(|p| {
            p.mem().insert(pa + 0xf_f000, 0xaa);
        });
        let (ida, idb) = (a.id, b.id);
        // `a` is still referenced (as a CPU would): destroy must not depend on that.
        drop(b);
        m.destroy(ida).expect("destroy a");
        m.destroy(idb).expect("destroy b");
        assert_eq!(m.accounting(), (total, total, 0, 0), "cycle {i}");
        // RAM goes back to the pool as it is and is scrubbed when it is given again.
        let c = m.create(desc(pa, 3)).expect("create c");
        vmids.insert(c.vmid);
        m.with_backend(|p| {
            assert_eq!(
                p.mem().get(&(pa + 0xf_f000)),
                None,
                "scrubbed for the next VM"
            );
        });
        m.destroy(c.id).expect("destroy c");
        assert!(a.stage2.lock().is_none());
    }
    assert!(vmids.len() > 100, "VMIDs rotate instead of reusing one");
    m.with_backend(|p| assert_eq!(p.flushed.len(), 3000, "every freed VMID was flushed"));
    assert_eq!(m.destroy(0), Err(VmError::NoSuchVm(0)));
}

/// The machine's frame source on the host: a [`FramePool`] over leaked heap memory (a
/// frame's address is its pointer, as the machine's identity map makes it), handed out
/// through [`SharedFrames`].
fn machine_frames(count: usize) -> SharedFrames {
    let bytes = count * mmu::FRAME_SIZE as usize;
    let layout = std::alloc::Layout::from_size_align(bytes, 1 << 16).expect("layout");
    // SAFETY: the layout has a non-zero size.
    let base = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!base.is_null(), "out of host memory");
    let pool = FramePool::new(PhysRange::new(PhysAddr::new(base as u64), bytes as u64));
    // SAFETY: the pool's frames are leaked heap memory that nothing else uses, readable and
    // writable at their own address.
    unsafe { SharedFrames::new(Box::leak(Box::new(spin::Mutex::new(pool)))) }
}

/// The fake memory of [`Fake`] with stage-2 tables built as the machine builds them
/// ([`Stage2Config::new_table`] over [`SharedFrames`]).
struct MachineLike {
    fake: Fake,
    frames: SharedFrames,
    stage2: Stage2Config,
}

impl VmidFlush for MachineLike {
    fn flush_vmid(&mut self, vmid: Vmid) {
        self.fake.flush_vmid(vmid);
    }
}

impl Backend for MachineLike {
    type S2 = MmuStage2<SharedFrames, mmu::testing::RecordingTlb>;
    type Mem = FakeMem;
    fn memory(&self) -> FakeMem {
        self.fake.memory.clone()
    }
    fn new_stage2(&mut self, vmid: Vmid, mappings: Stage2Mappings) -> Result<Self::S2, mmu::Error> {
        let tlb = mmu::testing::RecordingTlb::new();
        self.stage2.new_table(vmid, self.frames, tlb, mappings)
    }
    fn free_stage2(&mut self, s2: Self::S2) {
        drop(s2);
    }
    fn table_frames(&self) -> usize {
        self.frames.pool().lock().in_use()
    }
    fn ich_vtr(&self) -> u64 {
        crate::vm::vgic::tests::VTR_QEMU
    }

    fn apply_gic(&mut self, _action: crate::vm::vgic::PhysAction) {}
}

#[test]
fn a_40_bit_ipa_space_takes_a_concatenated_root_from_the_machine_frame_source() {
    let stage2 = Stage2Config {
        ipa_bits: 40,
        // Host heap addresses stand for the frames' PAs (the pool is identity mapped), and
        // mmu checks every table frame against the output size: 48 bits covers them.
        pa_bits: 48,
        vmid16: false,
        tlbi_range: false,
    };
    let backend = MachineLike {
        fake: Fake::default(),
        frames: machine_frames(64),
        stage2,
    };
    let m = VmManager::new(backend, VmidBits::Eight, &[GUEST_RAM]);
    // RAM above 512 GiB of IPA: only the second table of the root reaches it.
    let ipa = 0x80_4000_0000;
    let mut d = desc(0x5000_0000, 1);
    d.memory[0].ipa = Ipa::new(ipa);
    d.kernel.ipa = Ipa::new(ipa);
    d.entry = Ipa::new(ipa);
    let vm = m.create(d).expect("a VM with a 40-bit IPA space");
    let root = vm.vttbr & 0xffff_ffff_fffe;
    assert_eq!(
        root % (2 * mmu::FRAME_SIZE),
        0,
        "two root tables, aligned as a pair"
    );
    let (_, _, frames, _) = m.accounting();
    assert_eq!(
        frames,
        2 + 2 + 2,
        "two root tables, a level-2 and a level-3 table for RAM and for the UART's \
         register page"
    );
    {
        let s2 = vm.stage2.lock();
        let t = s2.as_ref().expect("live").0.translate(ipa + 0x1234);
        assert_eq!(t.map(|t| t.output), Some(0x5000_1234));
    }
    m.destroy(vm.id).expect("destroy");
    assert_eq!(
        m.with_backend(|b| b.table_frames()),
        0,
        "every frame back in the pool"
    );
}

/// A manager over real `mmu` stage-2 tables, and the heap frames they come from.
fn mmu_manager(bits: VmidBits) -> (VmManager<MmuFake>, &'static mmu::testing::HeapFrames) {
    let frames: &'static mmu::testing::HeapFrames =
        Box::leak(Box::new(mmu::testing::HeapFrames::new()));
    let fake = MmuFake {
        fake: Fake::default(),
        frames,
    };
    (VmManager::new(fake, bits, &[GUEST_RAM]), frames)
}

#[test]
fn thousand_cycles_with_real_mmu_tables_leak_no_frame() {
    let (m, frames) = mmu_manager(VmidBits::Sixteen);
    for i in 0..1000u64 {
        let mut d = desc(0x5000_0000 + (i % 2) * 0x20_0000, 1);
        // A 2 MiB-aligned region (a block mapping) plus a device page.
        d.memory[0].size = 0x20_0000;
        d.passthrough.push(GuestRegion {
            ipa: Ipa::new(0x0a00_0000),
            pa: PhysAddr::new(0x0a00_0000),
            size: 0x1000,
        });
        let vm = m.create(d).expect("create");
        let (_, _, in_use, _) = m.accounting();
        assert!(in_use >= 3, "root and tables for RAM and device: {in_use}");
        {
            let s2 = vm.stage2.lock();
            let t = s2
                .as_ref()
                .expect("live")
                .0
                .translate(0x4000_1234)
                .expect("mapped");
            assert_eq!(t.output, 0x5000_1234 + (i % 2) * 0x20_0000);
            assert_eq!(
                s2.as_ref().expect("live").0.vttbr_el2() >> 48,
                u64::from(vm.vmid.get())
            );
        }
        m.destroy(vm.id).expect("destroy");
        let (free, total, in_use, vmids) = m.accounting();
        assert_eq!((free, in_use, vmids), (total, 0, 0), "cycle {i}");
    }
    assert_eq!(frames.in_use(), 0);
    assert!(frames.total_allocated() >= 3000);
    assert_eq!(frames.total_allocated(), frames.total_freed());
}

/// The raw stage-2 descriptor that ends the walk of `ipa` in a table of heap frames.
fn raw_descriptor(
    t: &mmu::PageTable<mmu::Stage2, &'static mmu::testing::HeapFrames, mmu::testing::RecordingTlb>,
    ipa: u64,
) -> u64 {
    let mut level = t.geometry().start_level();
    let mut table = t.root_address();
    loop {
        let shift = 12 + 9 * (3 - u32::from(level));
        let index = ((ipa >> shift)
            & if table == t.root_address() {
                u64::MAX
            } else {
                511
            }) as usize;
        // SAFETY: `table` is a live frame of `t`'s heap frames; `index` is within it.
        let d = unsafe { mmu::testing::frame_ptr(table).add(index).read() };
        if level == 3 || d & 0b11 != 0b11 {
            return d;
        }
        table = d & 0x0000_ffff_ffff_f000;
        level += 1;
    }
}

/// Guest RAM is mapped with the contiguous hint (descriptor bit 52) on its aligned groups
/// of 16 pages or 2 MiB blocks: a TLB may hold one entry for 64 KiB (32 MiB).
#[test]
fn guest_ram_uses_the_contiguous_hint() {
    let (m, _) = mmu_manager(VmidBits::Eight);
    for (mappings, step) in [
        (Stage2Mappings::Pages, 0x1000),
        (Stage2Mappings::Blocks, 0x20_0000),
    ] {
        let mut d = desc(0x5000_0000, 1);
        d.memory[0].size = 0x40_0000;
        d.stage2 = mappings;
        let vm = m.create(d).expect("create");
        let s2 = vm.stage2.lock();
        let t = &s2.as_ref().expect("live").0;
        let first = raw_descriptor(t, 0x4000_0000);
        let hinted = first & (1 << 52) != 0;
        // 4 MiB is 1024 pages (64 groups) but only two 2 MiB blocks (no group of 16).
        assert_eq!(
            hinted,
            mappings == Stage2Mappings::Pages,
            "{mappings:?}: {first:#x}"
        );
        assert_eq!(
            raw_descriptor(t, 0x4000_0000 + 17 * step) & (1 << 52) != 0,
            hinted
        );
        drop(s2);
        m.destroy(vm.id).expect("destroy");
    }
}

#[test]
fn stage2_mappings_of_the_description_reach_the_table() {
    let (m, frames) = mmu_manager(VmidBits::Eight);
    for (mappings, level, tables) in [
        (Stage2Mappings::Blocks, 2, 2),
        (Stage2Mappings::Pages, 3, 3),
    ] {
        let mut d = desc(0x5000_0000, 1);
        d.memory[0].size = 0x20_0000;
        d.stage2 = mappings;
        let vm = m.create(d).expect("create");
        let s2 = vm.stage2.lock();
        let t = s2.as_ref().expect("live").0.translate(0x4010_0000);
        assert_eq!(t.map(|t| t.level), Some(level), "{mappings:?}");
        assert_eq!(
            frames.in_use(),
            tables,
            "{mappings:?}: root, L2 and L3 tables"
        );
        drop(s2);
        m.destroy(vm.id).expect("destroy");
    }
}

#[test]
fn reset_reloads_and_outcome() {
    let m = manager();
    let a = m.create(desc(0x5000_0000, 1)).expect("a");
    let b = m.create(desc(0x5010_0000, 2)).expect("b");
    a.state.lock().psci.take_pending(0);
    m.with_backend(|p| {
        p.mem().insert(0x5000_0000, 0x55);
        p.mem().insert(0x5008_0000, 0x66);
    });
    assert_eq!(a.boots.load(Ordering::SeqCst), 1);
    m.reset(a.id).expect("reset");
    assert_eq!(a.boots.load(Ordering::SeqCst), 2);
    m.with_backend(|p| {
        assert_eq!(p.mem().get(&0x5000_0000), Some(&1), "image copied again");
        assert_eq!(p.mem().get(&0x5008_0000), None, "RAM scrubbed");
    });
    assert_eq!(
        a.state.lock().psci.take_pending(0),
        Some((Ipa::new(0x4000_0000), 0))
    );
    // Both VMs have a vCPU that never leaves the guest.
    a.enter();
    b.enter();
    a.state.lock().status = VmStatus::Off;
    assert_eq!(m.outcome(), None);
    b.state.lock().status = VmStatus::Failed;
    assert_eq!(m.outcome(), Some(false));
    b.state.lock().status = VmStatus::Off;
    assert_eq!(m.outcome(), Some(true));
    assert_eq!(m.reset(9), Err(VmError::NoSuchVm(9)));
}

#[test]
fn finished_vms_are_destroyed_only_when_idle_and_remembered() {
    let m = manager();
    let a = m.create(desc(0x5000_0000, 1)).expect("a");
    let b = m.create(desc(0x5010_0000, 2)).expect("b");
    a.enter();
    assert_eq!(a.leave(), Leave::Nothing, "a running VM is not finished");
    a.enter();
    a.state.lock().status = VmStatus::Failed;
    assert!(!a.finished_and_idle(), "a vCPU still runs it");
    assert_eq!(
        a.leave(),
        Leave::Destroy,
        "the last vCPU out finds it finished"
    );
    assert_eq!(m.outcome(), None, "a waits to be destroyed");
    m.destroy(a.id).expect("destroy a");
    assert_eq!(m.outcome(), None, "b still runs");
    b.state.lock().status = VmStatus::Off;
    assert!(b.finished_and_idle());
    assert_eq!(m.outcome(), None, "b waits to be destroyed");
    m.destroy(b.id).expect("destroy b");
    assert!(m.vms().is_empty());
    assert_eq!(
        m.outcome(),
        Some(false),
        "a destroyed VM that failed still counts"
    );
    let (free, total, frames, vmids) = m.accounting();
    assert_eq!((free, frames, vmids), (total, 0, 0));
}

#[test]
fn create_scrubs_every_byte_the_images_do_not_cover() {
    let m = manager();
    // Stale data in the RAM the VM will get: inside and outside the image's range.
    m.with_backend(|p| {
        p.mem().insert(0x5000_0010, 0x55);
        p.mem().insert(0x5000_3000, 0x66);
        p.mem().insert(0x500f_ffff, 0x77);
    });
    let vm = m.create(desc(0x5000_0000, 1)).expect("create");
    let ram = vm.desc.ram_size();
    m.with_backend(|p| {
        // The 0x2000-byte image replaced what was under it; the rest is zero.
        assert_eq!(p.zeroed(), ram - 0x2000, "only the bytes no image covers");
        assert_eq!(
            p.mem().get(&0x5000_0010),
            None,
            "image bytes there are zero"
        );
        assert_eq!(p.mem().get(&0x5000_1fff), Some(&0xee));
        assert_eq!(p.mem().get(&0x5000_3000), None);
        assert_eq!(p.mem().get(&0x500f_ffff), None);
    });
}

/// [`desc`] with its kernel given as fw-cfg file 0x20 of 0x1800 bytes, which the fake
/// device of the returned manager holds (a pattern ending in 0xab).
fn fw_cfg_desc() -> (VmManager<Fake>, VmDesc) {
    let m = manager();
    let mut file: Vec<u8> = (0..0x1800u32).map(|i| (i % 13) as u8).collect();
    file[0x17ff] = 0xab;
    m.with_backend(|p| {
        p.memory.1.lock().expect("files").insert(0x20, file);
    });
    let mut d = desc(0x5000_0000, 1);
    d.kernel.src = ImageSource::FwCfg(0x20);
    d.kernel.size = 0x1800;
    (m, d)
}

#[test]
fn an_fw_cfg_kernel_is_fetched_at_creation_and_again_at_each_reset() {
    let (m, d) = fw_cfg_desc();
    m.with_backend(|p| {
        p.mem().insert(0x5000_0000, 0x55);
        p.mem().insert(0x5000_1800, 0x66);
    });
    let vm = m.create(d).expect("create");
    vm.state.lock().psci.take_pending(0);
    let check = |when: &str| {
        m.with_backend(|p| {
            assert_eq!(p.mem().get(&0x5000_0000), None, "{when}: file byte 0 is 0");
            assert_eq!(p.mem().get(&0x5000_0001), Some(&1), "{when}");
            assert_eq!(p.mem().get(&0x5000_17ff), Some(&0xab), "{when}: last byte");
            assert_eq!(p.mem().get(&0x5000_1800), None, "{when}: scrubbed past it");
            assert_eq!(
                p.mem().get(&0x7000_0000),
                Some(&1),
                "{when}: the staged bytes are not what was loaded"
            );
        });
    };
    check("created");
    m.with_backend(|p| {
        p.mem().insert(0x5000_0001, 0x77);
        p.mem().insert(0x5000_17ff, 0x77);
    });
    m.reset(vm.id).expect("reset");
    check("reset");
}

#[test]
fn a_failed_fetch_at_creation_leaves_nothing_allocated() {
    let (m, mut d) = fw_cfg_desc();
    d.kernel.src = ImageSource::FwCfg(0x21);
    let before = m.accounting();
    assert_eq!(
        m.create(d).map(|_| ()),
        Err(VmError::Load(FwCfgError::Transfer))
    );
    assert_eq!(m.accounting(), before);
    assert!(m.vms().is_empty());
    // An image outside the VM's RAM (a description the parser would refuse) is refused
    // too, not skipped.
    let (_, mut outside) = fw_cfg_desc();
    outside.kernel.ipa = Ipa::new(0x400f_f000);
    assert_eq!(
        m.create(outside).map(|_| ()),
        Err(VmError::ImageOutsideRam(Ipa::new(0x400f_f000)))
    );
    assert_eq!(m.accounting(), before);
    // The RAM and the VMID can be had again.
    let (_, d) = fw_cfg_desc();
    m.with_backend(|p| {
        p.memory
            .1
            .lock()
            .expect("files")
            .insert(0x20, vec![1; 0x1800]);
    });
    assert!(m.create(d).is_ok());
}

#[test]
fn a_failed_fetch_at_a_reset_stops_and_destroys_the_vm() {
    let (m, d) = fw_cfg_desc();
    let vm = m.create(d).expect("create");
    vm.state.lock().psci.take_pending(0);
    m.with_backend(|p| {
        p.memory.1.lock().expect("files").clear();
    });
    m.reset(vm.id).expect("reset");
    assert_eq!(vm.status(), VmStatus::Failed);
    assert!(vm.stage2.lock().is_none(), "destroyed: its stage 2 is gone");
    let (free, total, frames, vmids) = m.accounting();
    assert_eq!((free, frames, vmids), (total, 0, 0), "everything came back");
    assert_eq!(m.outcome(), Some(false), "the run can end");
}

#[test]
fn coalescing_at_the_top_of_the_ipa_space_stays_inside_it() {
    let frames: &'static mmu::testing::HeapFrames =
        Box::leak(Box::new(mmu::testing::HeapFrames::new()));
    let regime = mmu::Stage2::new(1, IPA_BITS).with_pa_bits(40);
    let mut s2 = MmuStage2::new(
        regime,
        frames,
        mmu::testing::RecordingTlb::new(),
        Stage2Mappings::Blocks,
    )
    .expect("stage 2");
    let top = 1u64 << IPA_BITS;
    // The last page: widened to its 2 MiB block, which ends at the top.
    assert_eq!(s2.coalesce(Ipa::new(top - 0x1000), 0x1000), Ok(()));
    // A range from the top is empty; one past it is refused as out of range; one
    // whose end would wrap or round past 2^64 is cut at the top: never wrapped to low
    // addresses, never a panic.
    assert_eq!(s2.coalesce(Ipa::new(top), 0x1000), Ok(()));
    assert_eq!(
        s2.coalesce(Ipa::new(!0xfff), 0x1000),
        Err(mmu::Error::OutOfRange)
    );
    assert_eq!(
        s2.coalesce(Ipa::new(u64::MAX - 0x1f_ffff), 0x20_0000),
        Err(mmu::Error::OutOfRange)
    );
    assert_eq!(s2.coalesce(Ipa::new(0x1000), u64::MAX), Ok(()));
    let mut mapped = 0;
    s2.walk(Ipa::ZERO, top, &mut |_| mapped += 1).expect("walk");
    assert_eq!(mapped, 0, "nothing was mapped");
}

/// A VM with 4 MiB of RAM at PA 0x5000_0000 (IPA 0x4000_0000): two 2 MiB chunks, its
/// image in the first.
fn two_chunk_desc() -> VmDesc {
    let mut d = desc(0x5000_0000, 1);
    d.memory[0].size = 0x40_0000;
    d
}

fn mapped(vm: &Vm<FakeS2>, ipa: u64) -> Option<(u64, S2Kind)> {
    vm.stage2
        .lock()
        .as_ref()
        .expect("live")
        .maps
        .get(&ipa)
        .copied()
}

#[test]
fn ram_past_the_images_chunks_is_scrubbed_and_opened_on_first_touch() {
    let m = manager();
    // Stale bytes of an earlier user in both chunks.
    m.with_backend(|p| {
        p.mem().insert(0x5010_0000, 0x66);
        p.mem().insert(0x5030_0000, 0x77);
    });
    let frames_before = m.accounting().2;
    let vm = m.create(two_chunk_desc()).expect("create");
    assert_eq!(mapped(&vm, 0x4000_0000), Some((0x5000_0000, S2Kind::Ram)));
    assert_eq!(
        mapped(&vm, 0x4020_0000),
        Some((0x5020_0000, S2Kind::NotReady)),
        "the second chunk is mapped without access"
    );
    let frames = m.accounting().2;
    assert!(
        frames > frames_before,
        "the tables for all of the RAM are taken now"
    );
    let zeroed_at_create = m.with_backend(|p| p.zeroed());
    assert_eq!(
        zeroed_at_create,
        0x20_0000 - 0x2000,
        "only the image's chunk"
    );
    m.with_backend(|p| {
        assert_eq!(
            p.mem().get(&0x5010_0000),
            None,
            "the image's chunk is scrubbed"
        );
        assert_eq!(p.mem().get(&0x5030_0000), Some(&0x77), "not scrubbed yet");
    });
    let mem = m.with_backend(|p| p.memory.clone());
    assert_eq!(
        vm.first_touch(Ipa::new(0x4030_0008), &mem),
        Ok(Touch::MadeReady)
    );
    m.with_backend(|p| {
        assert_eq!(
            p.zeroed(),
            zeroed_at_create + 0x20_0000,
            "exactly that chunk"
        );
        assert_eq!(p.mem().get(&0x5030_0000), None);
    });
    assert_eq!(mapped(&vm, 0x4020_0000), Some((0x5020_0000, S2Kind::Ram)));
    assert_eq!(mapped(&vm, 0x403f_f000), Some((0x503f_f000, S2Kind::Ram)));
    assert_eq!(m.accounting().2, frames, "no frame taken on first touch");
    // Touched again (another vCPU faulted on it meanwhile): nothing is scrubbed twice.
    m.with_backend(|p| {
        p.mem().insert(0x5030_0000, 0x99);
    });
    assert_eq!(
        vm.first_touch(Ipa::new(0x4020_0000), &mem),
        Ok(Touch::Ready)
    );
    assert_eq!(
        vm.first_touch(Ipa::new(0x4000_0000), &mem),
        Ok(Touch::Ready)
    );
    assert_eq!(
        vm.first_touch(Ipa::new(0x0900_0000), &mem),
        Ok(Touch::NotRam)
    );
    m.with_backend(|p| {
        assert_eq!(
            p.mem().get(&0x5030_0000),
            Some(&0x99),
            "the guest's own data stays"
        );
        assert_eq!(p.zeroed(), zeroed_at_create + 0x20_0000);
    });
}

#[test]
fn a_first_touch_that_cannot_open_the_chunk_leaves_it_waiting() {
    let m = manager();
    let vm = m.create(two_chunk_desc()).expect("create");
    let mem = m.with_backend(|p| p.memory.clone());
    vm.stage2.lock().as_mut().expect("live").fail_at = Some(0x4020_0000);
    assert_eq!(
        vm.first_touch(Ipa::new(0x4020_0000), &mem),
        Err(mmu::Error::OutOfFrames)
    );
    assert_eq!(
        mapped(&vm, 0x4020_0000),
        Some((0x5020_0000, S2Kind::NotReady))
    );
    assert!(!vm.ram.lock().is_ready(1));
    vm.stage2.lock().as_mut().expect("live").fail_at = None;
    assert_eq!(
        vm.first_touch(Ipa::new(0x4020_0000), &mem),
        Ok(Touch::MadeReady)
    );
}

#[test]
fn reset_takes_back_every_touched_chunk() {
    let m = manager();
    let vm = m.create(two_chunk_desc()).expect("create");
    vm.state.lock().psci.take_pending(0);
    let mem = m.with_backend(|p| p.memory.clone());
    assert_eq!(
        vm.first_touch(Ipa::new(0x4020_0000), &mem),
        Ok(Touch::MadeReady)
    );
    m.with_backend(|p| {
        p.mem().insert(0x5030_0000, 0x77);
    });
    m.reset(vm.id).expect("reset");
    assert_eq!(mapped(&vm, 0x4000_0000), Some((0x5000_0000, S2Kind::Ram)));
    assert_eq!(
        mapped(&vm, 0x4020_0000),
        Some((0x5020_0000, S2Kind::NotReady)),
        "without access again"
    );
    assert_eq!(vm.ram.lock().ready_count(), 1);
    assert_eq!(vm.status(), VmStatus::Running);
    // The guest's old data is out of its reach until the chunk is scrubbed again.
    assert_eq!(
        vm.first_touch(Ipa::new(0x4030_0000), &mem),
        Ok(Touch::MadeReady)
    );
    m.with_backend(|p| assert_eq!(p.mem().get(&0x5030_0000), None));
}

#[test]
fn a_reset_that_cannot_take_the_ram_back_stops_and_destroys_the_vm() {
    let m = manager();
    let vm = m.create(two_chunk_desc()).expect("create");
    vm.state.lock().psci.take_pending(0);
    vm.stage2.lock().as_mut().expect("live").fail_at = Some(0x4020_0000);
    m.reset(vm.id).expect("reset");
    assert_eq!(vm.status(), VmStatus::Failed);
    assert!(vm.stage2.lock().is_none(), "destroyed: its stage 2 is gone");
    assert!(m.vms().is_empty());
    let (free, total, frames, vmids) = m.accounting();
    assert_eq!((free, frames, vmids), (total, 0, 0), "everything came back");
    assert_eq!(m.outcome(), Some(false), "the run can end");
}
