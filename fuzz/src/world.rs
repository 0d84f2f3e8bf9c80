//! The world the memory-sharing and exit-handler targets run in: a [`VmManager`] over
//! real `mmu` stage-2 tables (frames from [`HeapFrames`], which counts them), three VMs
//! made from a description the way start-up makes them, and the invariants that hold
//! between any two calls ([`World::check`]).

use std::sync::{Arc, OnceLock};

use hypervisor::config::fw_cfg::FwCfgError;
use hypervisor::config::{self, HostDt, HostRanges, ImageSource, Stage2Mappings, VmDesc};
use hypervisor::mem::layout::{GUEST_RAM_BASE, STAGING};
use hypervisor::mem::{Ipa, IpaRange, PhysAddr, PhysRange, PAGE_SIZE};
use hypervisor::vm::vmid::{Vmid, VmidBits, VmidFlush};
use hypervisor::vm::{ram, MmuStage2, S2Kind, Stage2Table, Vm, VmManager, IPA_BITS};
use mmu::testing::HeapFrames;
use mmu::{NoTlbMaintenance, Permissions};
use vm_fdt::FdtWriter;

/// The stage-2 table type of the fuzz manager.
pub type S2<'f> = MmuStage2<&'f HeapFrames, NoTlbMaintenance>;

/// The machine side of the manager: stage-2 tables from a frame pool; guest memory is
/// not modelled (scrubs and image copies do nothing).
pub struct Machine<'f> {
    frames: &'f HeapFrames,
}

impl VmidFlush for Machine<'_> {
    fn flush_vmid(&mut self, _vmid: Vmid) {}
}

/// Guest memory, not modelled: scrubs and image copies do nothing.
pub struct NoMemory;

impl hypervisor::vm::GuestMemory for NoMemory {
    fn zero(&self, _pa: PhysAddr, _len: u64) {}

    fn load(&self, _dst: PhysAddr, _src: ImageSource, _len: u64) -> Result<(), FwCfgError> {
        Ok(())
    }

    fn clean_to_poc(&self, _va: u64, _len: u64) {}
}

impl<'f> hypervisor::vm::Backend for Machine<'f> {
    type S2 = S2<'f>;
    type Mem = NoMemory;

    fn memory(&self) -> NoMemory {
        NoMemory
    }

    fn new_stage2(&mut self, vmid: Vmid, mappings: Stage2Mappings) -> Result<S2<'f>, mmu::Error> {
        let regime = mmu::Stage2::new(vmid.get(), IPA_BITS)
            .with_pa_bits(40)
            .with_vmid16(true);
        MmuStage2::new(regime, self.frames, NoTlbMaintenance, mappings)
    }

    fn free_stage2(&mut self, s2: S2<'f>) {
        drop(s2);
    }

    fn table_frames(&self) -> usize {
        self.frames.in_use()
    }

    fn ich_vtr(&self) -> u64 {
        // QEMU 7.2's: four list registers, five priority bits.
        0x90b8_0003
    }

    fn apply_gic(&mut self, _action: hypervisor::vm::vgic::PhysAction) {}
}

/// The guest RAM the manager hands out (the machine's 512 MiB below staging).
const GUEST_POOL: PhysRange = PhysRange::from_to(GUEST_RAM_BASE, STAGING.base);

/// IPA of every VM's first RAM region.
pub const RAM: u64 = 0x4000_0000;
/// IPA of VM 2's second RAM region (64 KiB).
pub const RAM2: u64 = 0x8000_0000;
/// IPA of the virtual UART of VMs 0 and 2.
pub const VUART: u64 = 0x0900_0000;
/// IPA (= PA) of VM 2's pass-through page.
pub const DEVICE: u64 = 0x0a00_0000;
/// Free IPA space above every VM's RAM, where borrowed pages go.
pub const FREE: u64 = 0x1_0000_0000;

/// Bytes of RAM of VM `slot` from [`RAM`] on (one range in IPA space, though vm0's is
/// two regions).
#[must_use]
pub fn ram_size(slot: usize) -> u64 {
    if slot == 2 {
        0x20_0000
    } else {
        0x10_0000
    }
}

fn cells(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

/// The description: vm0 (1 MiB in two regions, 64 KiB holding the kernel and the rest a
/// chunk of its own that is not ready until first touched (`hypervisor::vm::ram`),
/// pages, inject, virtual UART, CPU 1), vm1 (1 MiB, pages,
/// stop, two vCPUs on CPUs 2 and 3), vm2 (2 MiB mapped with a block plus 64 KiB, a
/// pass-through page, virtual UART, inject, CPU 4), all with one 8 KiB kernel staged.
type Node = (
    &'static str,
    &'static [u32],
    &'static [u64],
    &'static str,
    &'static str,
    &'static [u64],
);

fn description() -> Result<Vec<u8>, vm_fdt::Error> {
    let mut w = FdtWriter::new()?;
    let root = w.begin_node("")?;
    let chosen = w.begin_node("chosen")?;
    // (name, CPUs, memory triples, stage-2 mappings, abort policy, pass-through triples)
    let vms: [Node; 3] = [
        (
            "vm0",
            &[1],
            &[
                RAM,
                0x5000_0000,
                0x1_0000,
                RAM + 0x1_0000,
                0x5001_0000,
                0xf_0000,
            ],
            "pages",
            "inject",
            &[],
        ),
        (
            "vm1",
            &[2, 3],
            &[RAM, 0x5010_0000, 0x10_0000],
            "pages",
            "stop",
            &[],
        ),
        (
            "vm2",
            &[4],
            &[RAM, 0x5020_0000, 0x20_0000, RAM2, 0x5040_0000, 0x1_0000],
            "blocks",
            "inject",
            &[DEVICE, DEVICE, PAGE_SIZE],
        ),
    ];
    for (name, cpus, memory, s2, abort, passthrough) in vms {
        let n = w.begin_node(name)?;
        // docs/vms.md: a VM node is compatible with "twostage,vm".
        w.property_string("compatible", "twostage,vm")?;
        w.property_array_u32("cpus", cpus)?;
        w.property("memory", &cells(memory))?;
        w.property("kernel", &cells(&[0x7000_0000, 0x2000]))?;
        w.property("kernel-ipa", &cells(&[RAM]))?;
        w.property_string("stage2-mappings", s2)?;
        w.property_string("abort-policy", abort)?;
        let vuart = name != "vm1";
        if vuart {
            w.property("vuart", &cells(&[VUART]))?;
        }
        if !passthrough.is_empty() {
            w.property("passthrough", &cells(passthrough))?;
        }
        w.end_node(n)?;
    }
    w.end_node(chosen)?;
    w.end_node(root)?;
    w.finish()
}

/// The three VM descriptions, parsed once by `config::parse`.
///
/// # Panics
///
/// When the parser refuses the description (a change of its rules).
#[must_use]
pub fn descs() -> &'static [VmDesc] {
    static DESCS: OnceLock<Vec<VmDesc>> = OnceLock::new();
    DESCS.get_or_init(|| {
        let mut blob = description().expect("the description is written");
        let dt = HostDt::new(&mut blob).expect("the description is a device tree");
        let ram = [PhysRange::new(PhysAddr::new(0x4000_0000), 0x8000_0000)];
        let ranges = HostRanges {
            ram: &ram,
            staging: STAGING,
            console: None,
            files: &[],
        };
        config::parse(&dt, &ranges).expect("the description is valid")
    })
}

/// A manager, its frames and its VMs by slot (a destroyed VM's slot is refilled with a
/// new VM from the same description).
pub struct World<'f> {
    /// The manager.
    pub m: VmManager<Machine<'f>>,
    /// The frame pool of every stage 2.
    pub frames: &'f HeapFrames,
    /// The VM of each slot.
    pub vms: Vec<Arc<Vm<S2<'f>>>>,
}

/// A memory-sharing transaction as the invariants see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tx {
    handle: u64,
    owner: u32,
    receiver: u32,
    ipa: u64,
    pages: u64,
    lend: bool,
    retrieved: bool,
    perms: u64,
}

/// Page states in the stage-2 software bits (`hypervisor::vm::share`, `page_state.rs`).
const OWNED: u8 = 0;
const SHARED_OWNED: u8 = 1;
const SHARED_BORROWED: u8 = 2;
const NOT_READY: u8 = 3;

impl<'f> World<'f> {
    /// A manager with the three VMs, each with vCPU 0 on.
    ///
    /// # Panics
    ///
    /// When a VM cannot be created.
    #[must_use]
    pub fn new(frames: &'f HeapFrames) -> Self {
        let m = VmManager::new(Machine { frames }, VmidBits::Sixteen, &[GUEST_POOL]);
        let mut w = Self {
            m,
            frames,
            vms: Vec::new(),
        };
        for slot in 0..3 {
            let vm = w.create(slot);
            w.vms.push(vm);
        }
        w
    }

    /// Creates the VM of `slot` with vCPU 0 on.
    ///
    /// # Panics
    ///
    /// When it cannot be created.
    pub fn create(&self, slot: usize) -> Arc<Vm<S2<'f>>> {
        let vm = match self.m.create(descs()[slot].clone()) {
            Ok(vm) => vm,
            Err(e) => panic!("creating vm{slot}: {e}"),
        };
        vm.state.lock().psci.take_pending(0);
        vm
    }

    /// Destroys the VM of `slot` (as the run loop does once it is finished) and creates
    /// it again.
    ///
    /// # Panics
    ///
    /// When either fails.
    pub fn recreate(&mut self, slot: usize) {
        let vm = &self.vms[slot];
        if let Err(e) = self.m.destroy(vm.id) {
            panic!("destroying vm{slot}: {e}");
        }
        self.vms[slot] = self.create(slot);
    }

    /// Resets the VM of `slot` and starts its vCPU 0 (what the run loop does after
    /// `SYSTEM_RESET`).
    ///
    /// # Panics
    ///
    /// When the VM is gone.
    pub fn reset(&self, slot: usize) {
        if let Err(e) = self.m.reset(self.vms[slot].id) {
            panic!("resetting vm{slot}: {e}");
        }
        self.vms[slot].state.lock().psci.take_pending(0);
    }

    /// Every leaf of every VM's stage 2, to compare before and after a call. `opens`
    /// (slot, IPA, pages) is a give's range: in the caller's chunks it touches, RAM not
    /// ready yet is shown as open RAM, since the call opens them first
    /// (`hypervisor::vm::ram`), even when it is then refused, and a guest cannot tell (an
    /// opened chunk reads as zero, as its first touch would have made it). Anywhere else
    /// a chunk opened by the call is a change.
    #[must_use]
    pub fn snapshot(&self, opens: Option<(usize, u64, u64)>) -> Vec<Vec<mmu::Mapping>> {
        self.vms
            .iter()
            .enumerate()
            .map(|(slot, v)| {
                let opened = |va: u64| {
                    opens.is_some_and(|(by, ipa, pages)| {
                        let size = pages.saturating_mul(PAGE_SIZE);
                        by == slot
                            && ram::chunks_in(&v.desc, Ipa::new(ipa), size)
                                .any(|(_, c)| c.ipa_range().contains_addr(Ipa::new(va)))
                    })
                };
                let mut out = Vec::new();
                if let Some(s2) = v.stage2.lock().as_ref() {
                    let _ = s2.walk(Ipa::ZERO, 1 << IPA_BITS, &mut |m| {
                        let mut m = *m;
                        if m.attrs == S2Kind::NotReady.attributes() && opened(m.va) {
                            m.attrs = S2Kind::Ram.attributes();
                        }
                        out.push(m);
                    });
                }
                out
            })
            .collect()
    }

    /// The live transactions, oldest first.
    #[must_use]
    pub fn ledger(&self) -> Vec<(u64, u32, u32, u64, u64, u64)> {
        self.m.with_shares(|l| {
            l.transactions()
                .iter()
                .map(|t| {
                    (
                        t.handle,
                        t.owner,
                        t.receiver,
                        t.ipa.get(),
                        t.pages,
                        t.packed(),
                    )
                })
                .collect()
        })
    }

    fn transactions(&self) -> Vec<Tx> {
        self.ledger()
            .into_iter()
            .map(|(handle, owner, receiver, ipa, pages, packed)| Tx {
                handle,
                owner,
                receiver,
                ipa,
                pages,
                perms: (packed >> 32) & 0xff,
                lend: (packed >> 40) & 1 == 1,
                retrieved: (packed >> 48) & 1 == 1,
            })
            .collect()
    }

    /// Checks the invariants between calls: guest RAM, VMIDs and table frames accounted
    /// for; the ledger well formed; every page of every VM's stage 2 in the state the
    /// ledger says (own RAM owned or shared, lent pages absent, borrowed pages mapped only
    /// in their receiver, to the owner's page, within the granted permissions); every
    /// host page mapped by at most one owner and one borrower.
    ///
    /// # Panics
    ///
    /// When one breaks.
    pub fn check(&self) {
        let live: Vec<_> = self
            .vms
            .iter()
            .filter(|v| v.stage2.lock().is_some())
            .collect();
        let (free, total, tables, vmids) = self.m.accounting();
        let ram: u64 = live.iter().map(|v| v.desc.ram_size()).sum();
        assert_eq!(
            free + ram,
            total,
            "guest RAM: free {free:#x} + VMs' {ram:#x}"
        );
        assert_eq!(vmids, live.len(), "VMIDs in use");
        let reachable: usize = live
            .iter()
            .filter_map(|v| v.stage2.lock().as_ref().map(|s| s.0.frames_in_use()))
            .sum();
        assert_eq!(
            tables, reachable,
            "table frames: the pool's against the tables'"
        );
        assert_eq!(self.frames.in_use(), reachable, "table frames leaked");

        let txs = self.transactions();
        let ids: Vec<u32> = live.iter().map(|v| v.id).collect();
        for (i, t) in txs.iter().enumerate() {
            assert!(t.handle != 0 && t.pages > 0, "{t:x?}");
            assert!(ids.contains(&t.owner), "{t:x?}: the owner is gone");
            // A destroyed receiver's transactions go back to pending, for the owner to
            // reclaim (VM ids are never reused, so no other VM can retrieve them).
            assert!(
                ids.contains(&t.receiver) || !t.retrieved,
                "{t:x?}: retrieved by a VM that is gone"
            );
            assert_ne!(t.owner, t.receiver, "{t:x?}");
            assert!(t.perms & 1 == 1 && t.perms < 8, "{t:x?}: permissions");
            for o in &txs[i + 1..] {
                let same = (o.owner, o.receiver, o.handle) == (t.owner, t.receiver, t.handle);
                assert!(!same, "handle {:#x} twice", t.handle);
                let overlap =
                    t.ipa < o.ipa + o.pages * PAGE_SIZE && o.ipa < t.ipa + t.pages * PAGE_SIZE;
                assert!(
                    !(o.owner == t.owner && overlap),
                    "{t:x?} and {o:x?} give the same pages"
                );
            }
        }

        // host PA -> (owner mappings, borrowed mappings)
        let mut host: std::collections::BTreeMap<u64, (u32, u32)> = Default::default();
        // (owner, handle) -> (receiver IPA - owner IPA, pages seen)
        let mut borrowed: std::collections::BTreeMap<(u32, u64), (u64, u64)> = Default::default();
        for v in &live {
            let s2 = v.stage2.lock();
            let Some(s2) = s2.as_ref() else { continue };
            let d = &v.desc;
            let mut pages: Vec<mmu::Mapping> = Vec::new();
            let walked = s2.walk(Ipa::ZERO, 1 << IPA_BITS, &mut |m| {
                for i in 0..m.size / PAGE_SIZE {
                    let mut p = *m;
                    p.va += i * PAGE_SIZE;
                    p.output += i * PAGE_SIZE;
                    p.size = PAGE_SIZE;
                    pages.push(p);
                }
            });
            assert_eq!(walked, Ok(()), "walking {}", d.name);
            let mut mapped_own = 0u64;
            for p in &pages {
                let state = p.attrs.sw.bits();
                let ipa = p.va;
                // The oracle's own arithmetic, on raw values.
                if let Some(r) = d.ram_region(Ipa::new(ipa), PAGE_SIZE) {
                    assert_eq!(
                        p.output,
                        r.pa.get() + (ipa - r.ipa.get()),
                        "{}: RAM {ipa:#x}",
                        d.name
                    );
                    let t = txs.iter().find(|t| {
                        t.owner == v.id && t.ipa <= ipa && ipa < t.ipa + t.pages * PAGE_SIZE
                    });
                    // A chunk not touched yet: mapped without access, in no transaction.
                    let ready = ram::chunk_of(d, Ipa::new(ipa))
                        .is_some_and(|(i, _)| v.ram.lock().is_ready(i));
                    if state == NOT_READY {
                        assert!(!ready && t.is_none(), "{}: page {ipa:#x} not ready", d.name);
                        assert_eq!(p.attrs, S2Kind::NotReady.attributes(), "{}", d.name);
                        mapped_own += 1;
                        continue;
                    }
                    assert!(ready, "{}: page {ipa:#x} open in a chunk not ready", d.name);
                    assert_eq!(
                        p.attrs.with_sw(mmu::SwBits::NONE),
                        S2Kind::Ram.attributes(),
                        "{}: RAM {ipa:#x}",
                        d.name
                    );
                    match (state, t) {
                        (OWNED, None) => {}
                        (SHARED_OWNED, Some(t)) if !t.lend => {}
                        _ => panic!("{}: page {ipa:#x} in state {state} under {t:x?}", d.name),
                    }
                    mapped_own += 1;
                    host.entry(p.output).or_default().0 += 1;
                } else if let Some(r) = d.passthrough.iter().find(|r| {
                    r.ipa_range()
                        .contains(&IpaRange::new(Ipa::new(ipa), PAGE_SIZE))
                }) {
                    assert_eq!(
                        p.output,
                        r.pa.get() + (ipa - r.ipa.get()),
                        "{}: device {ipa:#x}",
                        d.name
                    );
                    assert_eq!(
                        p.attrs,
                        S2Kind::Device.attributes(),
                        "{}: device {ipa:#x}",
                        d.name
                    );
                } else {
                    assert_eq!(
                        state, SHARED_BORROWED,
                        "{}: stray page {ipa:#x} -> {:#x}",
                        d.name, p.output
                    );
                    // The owner's page behind it.
                    let owner = live.iter().find_map(|o| {
                        o.desc
                            .memory
                            .iter()
                            .find(|r| r.pa_range().contains_addr(PhysAddr::new(p.output)))
                            .map(|r| (o, r.ipa.get() + (p.output - r.pa.get())))
                    });
                    let Some((o, oipa)) = owner else {
                        panic!(
                            "{}: borrowed {ipa:#x} -> {:#x}, no VM's RAM",
                            d.name, p.output
                        );
                    };
                    let Some(t) = txs.iter().find(|t| {
                        t.owner == o.id
                            && t.receiver == v.id
                            && t.retrieved
                            && t.ipa <= oipa
                            && oipa < t.ipa + t.pages * PAGE_SIZE
                    }) else {
                        panic!(
                            "{}: borrowed {ipa:#x} from {} without a retrieved transaction",
                            d.name, o.desc.name
                        );
                    };
                    let perms = p.attrs.perms;
                    assert!(
                        t.perms & 2 != 0 || !perms.contains(Permissions::WRITE),
                        "{t:x?}: writable"
                    );
                    assert!(
                        t.perms & 4 != 0
                            || !perms
                                .intersects(Permissions::EXEC_EL1.union(Permissions::EXEC_EL0)),
                        "{t:x?}: executable"
                    );
                    let e = borrowed
                        .entry((t.owner, t.handle))
                        .or_insert((ipa.wrapping_sub(oipa), 0));
                    assert_eq!(
                        e.0,
                        ipa.wrapping_sub(oipa),
                        "{t:x?}: not one contiguous range"
                    );
                    e.1 += 1;
                    host.entry(p.output).or_default().1 += 1;
                }
            }
            // Own RAM not mapped: exactly the lent pages.
            let lent: u64 = txs
                .iter()
                .filter(|t| t.owner == v.id && t.lend)
                .map(|t| t.pages)
                .sum();
            assert_eq!(
                mapped_own + lent,
                d.ram_size() / PAGE_SIZE,
                "{}: lent pages",
                d.name
            );
        }
        for t in txs.iter().filter(|t| t.retrieved) {
            let seen = borrowed.get(&(t.owner, t.handle)).map_or(0, |e| e.1);
            assert_eq!(seen, t.pages, "{t:x?}: pages mapped in the receiver");
        }
        for t in txs.iter().filter(|t| !t.retrieved) {
            assert!(
                !borrowed.contains_key(&(t.owner, t.handle)),
                "{t:x?}: pending but mapped"
            );
        }
        for (pa, (own, borrow)) in host {
            assert!(
                own <= 1 && borrow <= 1,
                "host page {pa:#x}: {own} owners, {borrow} borrowers"
            );
        }
    }

    /// Destroys every VM and checks that everything came back.
    ///
    /// # Panics
    ///
    /// When something leaked.
    pub fn finish(self) {
        for v in &self.vms {
            if v.stage2.lock().is_some() {
                assert_eq!(self.m.destroy(v.id), Ok(()), "destroying {}", v.desc.name);
            }
        }
        let (free, total, tables, vmids) = self.m.accounting();
        assert_eq!((free, tables, vmids), (total, 0, 0), "all returned");
        assert_eq!(self.frames.in_use(), 0, "every table frame freed");
        assert!(self.ledger().is_empty(), "no transaction left");
    }
}
