//! Host tests of memory sharing over real `mmu` stage-2 tables (`MmuFake`: heap frames,
//! recording TLB).

use super::abi::{Kind, Perms, MAX_PAGES};
use super::ledger::{State, Transaction};
use super::page_state::PageState;
use super::*;
use crate::config::SharingLimits;
use crate::config::{GuestRegion, Stage2Mappings};
use crate::mem::{Ipa, PhysAddr, PAGE_SIZE};
use crate::vm::tests::{desc, MmuFake, MmuS2, GUEST_RAM};
use crate::vm::vmid::VmidBits;
use crate::vm::{Vm, IPA_BITS};
use crate::vm::{VmManager, VmStatus};
use alloc::sync::Arc;
use mmu::testing::HeapFrames;
use mmu::SwBits;
use mmu::TlbOp;

type M = VmManager<MmuFake>;
type V = Arc<Vm<MmuS2>>;

const RAM: u64 = 0x4000_0000;
const FREE: u64 = 0x8000_0000;
const P: u64 = PAGE_SIZE;
const INVALID: i64 = -2;
const NO_MEMORY: i64 = -3;
const DENIED: i64 = -6;
const NO_DATA: i64 = -9;

fn frames() -> &'static HeapFrames {
    Box::leak(Box::new(HeapFrames::new()))
}

fn manager(frames: &'static HeapFrames) -> M {
    VmManager::new(
        MmuFake {
            fake: crate::vm::tests::Fake::default(),
            frames,
        },
        VmidBits::Eight,
        &[GUEST_RAM],
    )
}

/// VM number `n` (1 MiB of RAM at IPA 0x4000_0000, 4 KiB pages), its vCPU 0 on.
fn vm(m: &M, n: u64) -> V {
    let mut d = desc(0x5000_0000 + n * 0x10_0000, n as u32 + 1);
    d.name = format!("vm{n}");
    d.stage2 = Stage2Mappings::Pages;
    let v = m.create(d).expect("create");
    v.state.lock().psci.take_pending(0);
    v
}

/// A VM with 2 MiB of RAM at PA 0x5020_0000 (IPA 0x4000_0000) mapped with one block, on
/// CPU 3, its vCPU 0 on.
fn block_vm(m: &M) -> V {
    let mut d = desc(0x5020_0000, 3);
    d.name = "vm2".into();
    d.memory[0].size = 0x20_0000;
    d.stage2 = Stage2Mappings::Blocks;
    let v = m.create(d).expect("create");
    v.state.lock().psci.take_pending(0);
    v
}

/// Makes a call with registers x0.. = `regs`, through the hypercall decoder.
fn call(m: &M, v: &V, regs: &[u64]) -> [u64; 4] {
    let mut x = [0u64; 8];
    x[..regs.len()].copy_from_slice(regs);
    let req = Request::decode(&x).expect("a sharing call");
    m.share_call(v, 0, req).0
}

fn code(r: [u64; 4]) -> i64 {
    r[0] as i64
}

/// `SHARE`/`LEND` that must succeed; returns the handle.
fn give(m: &M, owner: &V, f: u32, ipa: u64, pages: u64, to: &V, perms: u64) -> u64 {
    let r = call(m, owner, &[f.into(), ipa, pages, to.id.into(), perms]);
    assert_eq!(r[0], 0, "give failed: {r:x?}");
    assert_ne!(r[1], 0, "handles are non-zero");
    assert_eq!(&r[2..], &[0, 0]);
    r[1]
}

fn translate(v: &V, ipa: u64) -> Option<mmu::Translation> {
    v.stage2.lock().as_ref().expect("live").0.translate(ipa)
}

/// Every leaf of the VM's stage 2.
fn snapshot(v: &V) -> Vec<mmu::Mapping> {
    let mut out = Vec::new();
    let s2 = v.stage2.lock();
    s2.as_ref()
        .expect("live")
        .0
        .walk(0, 1 << IPA_BITS, |m| out.push(*m))
        .expect("walk");
    out
}

fn invalidated_ipas(v: &V, vmid: u16) -> Vec<u64> {
    let s2 = v.stage2.lock();
    s2.as_ref()
        .expect("live")
        .0
        .tlb()
        .invalidations()
        .into_iter()
        .filter_map(|op| match op {
            TlbOp::Stage2Ipa { vmid: v, ipa, .. } if v == vmid => Some(ipa),
            _ => None,
        })
        .collect()
}

fn clear_tlb(v: &V) {
    v.stage2.lock().as_mut().expect("live").0.tlb_mut().clear();
}

fn destroy_all(m: &M, vms: &[&V]) {
    for v in vms {
        v.state.lock().status = VmStatus::Off;
        m.destroy(v.id).expect("destroy");
    }
}

#[test]
fn share_retrieve_relinquish_reclaim() {
    let fr = frames();
    let m = manager(fr);
    let (a, b, c) = (vm(&m, 0), vm(&m, 1), vm(&m, 2));
    let h = give(&m, &a, fid::SHARE, RAM + 2 * P, 2, &b, 0b011);
    // The owner keeps read/write/execute; its pages are shared-owned.
    let t = translate(&a, RAM + 3 * P).expect("owner keeps access");
    assert_eq!(t.output, 0x5000_0000 + 3 * P);
    assert_eq!(PageState::from_sw(t.sw_bits), Some(PageState::SharedOwned));
    assert!(t.attrs.perms.contains(mmu::Permissions::EXEC_EL1));
    let t = translate(&a, RAM + 4 * P).expect("mapped");
    assert_eq!(PageState::from_sw(t.sw_bits), Some(PageState::Owned));
    // The receiver finds it; the owner sees it too; a third VM does not.
    let q = call(&m, &b, &[fid::QUERY.into(), 0]);
    let packed = u64::from(a.id) | u64::from(b.id) << 16 | 0b011 << 32;
    assert_eq!(q, [0, h, packed, 2]);
    assert_eq!(call(&m, &a, &[fid::QUERY.into(), h]), q);
    assert_eq!(code(call(&m, &c, &[fid::QUERY.into(), h])), INVALID);
    assert_eq!(code(call(&m, &a, &[fid::QUERY.into(), 0])), NO_DATA);
    // Retrieved read-only at a free IPA, in pages, state shared-borrowed.
    assert_eq!(
        call(&m, &b, &[fid::RETRIEVE.into(), h, FREE, 0b001]),
        [0; 4]
    );
    for i in 0..2 {
        let t = translate(&b, FREE + i * P + 8).expect("borrowed");
        assert_eq!(t.output, 0x5000_0000 + (2 + i) * P + 8);
        assert_eq!(t.level, 3);
        assert_eq!(t.attrs.perms, mmu::Permissions::READ);
        assert_eq!(t.attrs.mem_type, mmu::MemoryType::Normal);
        assert_eq!(
            PageState::from_sw(t.sw_bits),
            Some(PageState::SharedBorrowed)
        );
    }
    assert!(translate(&b, FREE + 2 * P).is_none());
    assert_eq!(
        call(&m, &b, &[fid::QUERY.into(), h])[2] >> 48,
        1,
        "retrieved"
    );
    assert_eq!(code(call(&m, &b, &[fid::QUERY.into(), 0])), NO_DATA);
    // Relinquish: unmapped, with an invalidation of each page for the receiver's VMID.
    clear_tlb(&b);
    assert_eq!(call(&m, &b, &[fid::RELINQUISH.into(), h]), [0; 4]);
    assert!(translate(&b, FREE).is_none());
    assert_eq!(
        invalidated_ipas(&b, b.vmid.get()),
        vec![FREE, FREE + P],
        "TLBI IPAS2E1IS for each page, VMID of the receiver"
    );
    // Reclaim: owned again, the handle is gone.
    assert_eq!(call(&m, &a, &[fid::RECLAIM.into(), h]), [0; 4]);
    let t = translate(&a, RAM + 2 * P).expect("mapped");
    assert_eq!(PageState::from_sw(t.sw_bits), Some(PageState::Owned));
    assert_eq!(code(call(&m, &a, &[fid::QUERY.into(), h])), INVALID);
    assert_eq!(code(call(&m, &a, &[fid::RECLAIM.into(), h])), INVALID);
    assert!(m.with_shares(|t| t.transactions().is_empty()));
    destroy_all(&m, &[&a, &b, &c]);
    assert_eq!(fr.in_use(), 0, "every table frame came back");
}

#[test]
fn lend_takes_the_pages_from_the_owner_until_reclaimed() {
    let fr = frames();
    let m = manager(fr);
    let (a, b) = (vm(&m, 0), vm(&m, 1));
    let before = translate(&a, RAM + 5 * P).expect("mapped");
    clear_tlb(&a);
    let h = give(&m, &a, fid::LEND, RAM + 5 * P, 3, &b, 0b111);
    for i in 0..3 {
        assert!(translate(&a, RAM + (5 + i) * P).is_none(), "lent page {i}");
    }
    assert!(translate(&a, RAM + 8 * P).is_some());
    let inv = invalidated_ipas(&a, a.vmid.get());
    // The owner's RAM carries the contiguous hint: the group of 16 pages holding the
    // lent ones first loses it (break-before-make, each page invalidated), then the
    // lent pages go.
    let group: Vec<u64> = (0..16).map(|i| RAM + i * P).collect();
    assert_eq!(inv[..16], group[..]);
    assert_eq!(inv[16..], [RAM + 5 * P, RAM + 6 * P, RAM + 7 * P]);
    assert_eq!(
        call(&m, &b, &[fid::QUERY.into(), 0])[2] >> 40 & 0xff,
        1,
        "lend"
    );
    assert_eq!(
        call(&m, &b, &[fid::RETRIEVE.into(), h, FREE, 0b111]),
        [0; 4]
    );
    let t = translate(&b, FREE + 2 * P).expect("borrowed");
    assert_eq!(t.output, 0x5000_0000 + 7 * P);
    assert!(t
        .attrs
        .perms
        .contains(mmu::Permissions::RW | mmu::Permissions::EXEC_EL1 | mmu::Permissions::EXEC_EL0));
    assert_eq!(code(call(&m, &a, &[fid::RECLAIM.into(), h])), DENIED);
    assert_eq!(call(&m, &b, &[fid::RELINQUISH.into(), h]), [0; 4]);
    assert_eq!(call(&m, &a, &[fid::RECLAIM.into(), h]), [0; 4]);
    assert_eq!(
        translate(&a, RAM + 5 * P),
        Some(before),
        "mapped back as it was"
    );
    assert_eq!(
        translate(&a, RAM + 7 * P).map(|t| t.output),
        Some(0x5000_0000 + 7 * P)
    );
    destroy_all(&m, &[&a, &b]);
    assert_eq!(fr.in_use(), 0);
}

/// Runs `regs` as `caller` and checks it fails with `expected` and changes nothing.
fn refused(m: &M, vms: &[&V], caller: &V, regs: &[u64], expected: i64) {
    let walks: Vec<_> = vms.iter().map(|v| snapshot(v)).collect();
    let table: Vec<Transaction> = m.with_shares(|t| t.transactions().to_vec());
    let r = call(m, caller, regs);
    assert_eq!(r, [expected as u64, 0, 0, 0], "{regs:x?}");
    for (v, w) in vms.iter().zip(&walks) {
        assert_eq!(
            &snapshot(v),
            w,
            "{regs:x?} changed {}'s stage 2",
            v.desc.name
        );
    }
    assert_eq!(m.with_shares(|t| t.transactions().to_vec()), table);
}

#[test]
fn share_and_lend_errors_change_nothing() {
    let m = manager(frames());
    let (a, b, c) = (vm(&m, 0), vm(&m, 1), vm(&m, 2));
    let all = [&a, &b, &c];
    let bid = u64::from(b.id);
    for f in [fid::SHARE, fid::LEND] {
        let f = u64::from(f);
        for (regs, e) in [
            ([f, RAM + 1, 1, bid, 1], INVALID),
            ([f, RAM, 0, bid, 1], INVALID),
            ([f, RAM, MAX_PAGES + 1, bid, 1], INVALID),
            ([f, !0xfff, 2, bid, 1], INVALID),
            ([f, (1 << 39) - P, 2, bid, 1], INVALID),
            ([f, RAM, 1, bid, 0b1001], INVALID),
            ([f, RAM, 1, bid, 0b010], INVALID),
            ([f, RAM, 1, bid, 0], INVALID),
            ([f, RAM, 1, 99, 1], INVALID),
            ([f, RAM, 1, u64::from(a.id), 1], INVALID),
            ([f, RAM, 1, bid | 1 << 32, 1], INVALID),
            ([f, 0x9000_0000, 1, bid, 1], DENIED),
            ([f, 0x0900_0000, 1, bid, 1], DENIED),
            ([f, RAM + 0xff * P, 2, bid, 1], DENIED),
        ] {
            refused(&m, &all, &a, &regs, e);
        }
    }
    // Pages already shared, lent, or borrowed.
    let shared = give(&m, &a, fid::SHARE, RAM + 4 * P, 2, &b, 1);
    let lent = give(&m, &a, fid::LEND, RAM + 8 * P, 2, &b, 3);
    assert_eq!(call(&m, &b, &[fid::RETRIEVE.into(), lent, FREE, 3])[0], 0);
    for (owner, ipa) in [
        (&a, RAM + 5 * P),
        (&a, RAM + 3 * P),
        (&a, RAM + 9 * P),
        (&a, RAM + 7 * P),
        (&b, FREE),
    ] {
        for f in [fid::SHARE, fid::LEND] {
            let to = u64::from(c.id);
            refused(&m, &all, owner, &[f.into(), ipa, 2, to, 1], DENIED);
        }
    }
    // A receiver that is not running.
    c.state.lock().status = VmStatus::Off;
    refused(
        &m,
        &all,
        &a,
        &[fid::SHARE.into(), RAM, 1, c.id.into(), 1],
        DENIED,
    );
    c.state.lock().status = VmStatus::Running;
    // A vCPU that is no longer on (its VM is resetting) is refused too.
    c.state.lock().psci.all_off();
    refused(&m, &all, &c, &[fid::SHARE.into(), RAM, 1, bid, 1], DENIED);
    assert_ne!(shared, lent);
}

const BUSY: i64 = -4;

/// Per-VM limits: an owner cannot hold more than `sharing-max-owned` live transactions
/// (`NO_MEMORY`), nor address more than the receiver's `sharing-max-received` to one
/// receiver (`BUSY`); a VM that fills its own quota leaves the others' intact, so an
/// unrelated VM still gets its SHARE.
#[test]
fn per_vm_limits_keep_one_vm_from_filling_the_table() {
    let fr = frames();
    let m = manager(fr);
    let (a, b, c) = (vm(&m, 0), vm(&m, 1), vm(&m, 2));
    // `a` shares with `b` until it is refused: its own quota (default 16) runs out.
    let mut handles = Vec::new();
    let mut refusal = 0;
    for i in 0..300u64 {
        let r = call(&m, &a, &[fid::SHARE.into(), RAM + i * P, 1, b.id.into(), 1]);
        if r[0] != 0 {
            refusal = code(r);
            break;
        }
        handles.push(r[1]);
    }
    assert_eq!(refusal, NO_MEMORY, "the owner's quota");
    assert_eq!(handles.len(), SharingLimits::DEFAULT as usize);
    // An unrelated VM still shares with `b`, and with `a`.
    let from_c = give(&m, &c, fid::SHARE, RAM, 1, &b, 1);
    give(&m, &c, fid::SHARE, RAM + P, 1, &a, 1);
    // `b` finds `c`'s transaction by owner, however many `a` left pending before it.
    let q = call(&m, &b, &[fid::QUERY.into(), 0, c.id.into()]);
    assert_eq!((q[0], q[1]), (0, from_c));
    let q = call(&m, &b, &[fid::QUERY.into(), 0, a.id.into()]);
    assert_eq!((q[0], q[1]), (0, handles[0]), "the oldest from `a`");
    assert_eq!(
        code(call(&m, &b, &[fid::QUERY.into(), 0, 7])),
        NO_DATA,
        "no such owner"
    );
    // Handles say only what the two parties know: owner, receiver, and their own count.
    assert_eq!(from_c, u64::from(c.id) << 48 | u64::from(b.id) << 32 | 1);
    assert_eq!(handles[3], u64::from(b.id) << 32 | 4);
    // Room comes back with a RECLAIM; handles are never reused.
    assert_eq!(call(&m, &a, &[fid::RECLAIM.into(), handles[7]])[0], 0);
    let h = give(&m, &a, fid::LEND, RAM + 100 * P, 1, &b, 1);
    assert!(!handles.contains(&h) && h > handles[15], "{h:#x}");
    destroy_all(&m, &[&a, &b, &c]);
    assert_eq!(fr.in_use(), 0);
}

#[test]
fn a_receiver_limit_applies_per_owner() {
    let fr = frames();
    let m = manager(fr);
    let a = vm(&m, 0);
    let mut d = desc(0x5010_0000, 2);
    d.name = "small".into();
    d.stage2 = Stage2Mappings::Pages;
    d.sharing = SharingLimits {
        owned: 0,
        received: 2,
    };
    let b = m.create(d).expect("create");
    b.state.lock().psci.take_pending(0);
    let c = vm(&m, 2);
    give(&m, &a, fid::SHARE, RAM, 1, &b, 1);
    give(&m, &a, fid::LEND, RAM + P, 1, &b, 1);
    refused(
        &m,
        &[&a, &b, &c],
        &a,
        &[fid::SHARE.into(), RAM + 2 * P, 1, b.id.into(), 1],
        BUSY,
    );
    // Another owner has its own two.
    give(&m, &c, fid::SHARE, RAM, 1, &b, 1);
    give(&m, &c, fid::SHARE, RAM + P, 1, &b, 1);
    // `b` may own nothing.
    refused(
        &m,
        &[&a, &b, &c],
        &b,
        &[fid::SHARE.into(), RAM, 1, a.id.into(), 1],
        NO_MEMORY,
    );
    destroy_all(&m, &[&a, &b, &c]);
    assert_eq!(fr.in_use(), 0);
}

#[test]
fn retrieve_relinquish_reclaim_errors_change_nothing() {
    let m = manager(frames());
    let (a, b, c) = (vm(&m, 0), vm(&m, 1), vm(&m, 2));
    let all = [&a, &b, &c];
    let h = give(&m, &a, fid::SHARE, RAM, 4, &b, 0b011);
    let h2 = give(&m, &c, fid::LEND, RAM, 1, &b, 0b001);
    let r = u64::from(fid::RETRIEVE);
    for (caller, regs, e) in [
        (&b, [r, 0, FREE, 1], INVALID),
        (&b, [r, h + 100, FREE, 1], INVALID),
        (&b, [r, h, FREE + 8, 1], INVALID),
        (&b, [r, h, (1 << 39) - 2 * P, 1], INVALID),
        (&b, [r, h, FREE, 0b1001], INVALID),
        (&b, [r, h, FREE, 0b010], INVALID),
        (&a, [r, h, FREE, 1], DENIED),
        // Not a party: the handle does not exist for it.
        (&c, [r, h, FREE, 1], INVALID),
        (&b, [r, h, FREE, 0b111], DENIED),
        (&b, [r, h2, FREE, 0b011], DENIED),
        (&b, [r, h, RAM + 0xff * P, 1], INVALID),
        (&b, [r, h, RAM - 2 * P, 1], INVALID),
        (&b, [r, h, 0x0900_0000 - P, 1], INVALID),
    ] {
        refused(&m, &all, caller, &regs, e);
    }
    // A range that is already mapped (another borrowed mapping).
    assert_eq!(call(&m, &b, &[r, h2, FREE + 2 * P, 1])[0], 0);
    refused(&m, &all, &b, &[r, h, FREE, 1], INVALID);
    assert_eq!(call(&m, &b, &[r, h, FREE + 0x10 * P, 1])[0], 0);
    refused(&m, &all, &b, &[r, h, FREE + 0x20 * P, 1], DENIED);
    // Relinquish: only the receiver, only when retrieved.
    let rel = u64::from(fid::RELINQUISH);
    refused(&m, &all, &a, &[rel, h], DENIED);
    refused(&m, &all, &b, &[rel, 77], INVALID);
    let rec = u64::from(fid::RECLAIM);
    refused(&m, &all, &a, &[rec, h], DENIED);
    refused(&m, &all, &b, &[rec, h2], DENIED);
    assert_eq!(call(&m, &b, &[rel, h])[0], 0);
    refused(&m, &all, &b, &[rel, h], DENIED);
    refused(&m, &all, &b, &[rec, h], DENIED);
    refused(&m, &all, &c, &[rec, h], INVALID);
    refused(&m, &all, &c, &[rel, h], INVALID);
    refused(&m, &all, &a, &[rec, 0], INVALID);
    assert_eq!(call(&m, &a, &[rec, h])[0], 0);
}

#[test]
fn pass_through_ranges_are_not_free() {
    let m = manager(frames());
    let a = vm(&m, 0);
    let mut d = desc(0x5010_0000, 2);
    d.passthrough.push(GuestRegion {
        ipa: Ipa::new(0x0a00_0000),
        pa: PhysAddr::new(0x0a00_0000),
        size: P,
    });
    let b = m.create(d).expect("b");
    b.state.lock().psci.take_pending(0);
    let h = give(&m, &a, fid::SHARE, RAM, 2, &b, 1);
    let r = u64::from(fid::RETRIEVE);
    refused(&m, &[&a, &b], &b, &[r, h, 0x0a00_0000 - P, 1], INVALID);
    assert_eq!(call(&m, &b, &[r, h, 0x0a00_0000 + P, 1])[0], 0);
}

#[test]
fn the_emulated_gic_and_uart_are_not_free() {
    let m = manager(frames());
    let a = vm(&m, 0);
    let b = vm(&m, 1);
    assert_eq!(b.desc.cpus.len(), 1);
    let h = give(&m, &a, fid::SHARE, RAM, 2, &b, 1);
    let r = u64::from(fid::RETRIEVE);
    let gic = b.desc.gic;
    let redist_end = gic.redist_range(1).end().get();
    // Two pages in the distributor, the last two of the (one vCPU's) redistributor
    // region, two that end in the distributor, and the virtual UART's page.
    let mut refused_at = vec![gic.dist.get(), redist_end - 2 * P, gic.dist.get() - P];
    refused_at.extend(b.desc.vuart.map(|u| u.get()));
    for ipa in refused_at {
        refused(&m, &[&a, &b], &b, &[r, h, ipa, 1], INVALID);
    }
    // Right after the redistributors: free.
    assert_eq!(call(&m, &b, &[r, h, redist_end, 1])[0], 0);
}

#[test]
fn query_finds_the_oldest_pending_transaction_of_an_owner() {
    let m = manager(frames());
    let (a, b, c) = (vm(&m, 0), vm(&m, 1), vm(&m, 2));
    let q = u64::from(fid::QUERY);
    assert_eq!(code(call(&m, &b, &[q, 0])), NO_DATA);
    let h1 = give(&m, &a, fid::SHARE, RAM, 1, &b, 1);
    let h2 = give(&m, &c, fid::LEND, RAM + P, 3, &b, 0b101);
    let h3 = give(&m, &a, fid::SHARE, RAM + P, 1, &c, 1);
    assert_eq!(call(&m, &b, &[q, 0])[1], h1);
    assert_eq!(call(&m, &c, &[q, 0, a.id.into()])[1], h3);
    assert_eq!(code(call(&m, &a, &[q, 0])), NO_DATA);
    assert_eq!(call(&m, &b, &[u64::from(fid::RETRIEVE), h1, FREE, 1])[0], 0);
    assert_eq!(
        code(call(&m, &b, &[q, 0, a.id.into()])),
        NO_DATA,
        "nothing more pending from `a`"
    );
    let r = call(&m, &b, &[q, 0, c.id.into()]);
    let packed = u64::from(c.id) | u64::from(b.id) << 16 | 0b101 << 32 | 1 << 40;
    assert_eq!(r, [0, h2, packed, 3]);
    assert_eq!(code(call(&m, &a, &[q, h2])), INVALID, "not a party");
    assert_eq!(code(call(&m, &b, &[q, 12345])), INVALID);
}

#[test]
fn out_of_frames_changes_nothing() {
    let fr = frames();
    let m = manager(fr);
    // `a` maps its 2 MiB of RAM with a block: sharing or lending part of it splits it.
    let a = block_vm(&m);
    let b = vm(&m, 0);
    assert_eq!(translate(&a, RAM).map(|t| t.level), Some(2));
    let to = u64::from(b.id);
    fr.fail_after(Some(0));
    for f in [fid::SHARE, fid::LEND] {
        refused(&m, &[&a, &b], &a, &[f.into(), RAM + P, 1, to, 1], NO_MEMORY);
    }
    fr.fail_after(None);
    let h = give(&m, &a, fid::LEND, RAM + P, 2, &b, 1);
    assert_eq!(translate(&a, RAM).map(|t| t.level), Some(3), "split");
    // The receiver needs tables for a new IPA range.
    fr.fail_after(Some(1));
    refused(
        &m,
        &[&a, &b],
        &b,
        &[fid::RETRIEVE.into(), h, FREE, 1],
        NO_MEMORY,
    );
    fr.fail_after(None);
    // Lent pages are mapped back with the owner's block policy and attributes.
    assert_eq!(call(&m, &a, &[fid::RECLAIM.into(), h])[0], 0);
    let t = translate(&a, RAM + 2 * P).expect("back");
    assert_eq!(t.output, 0x5020_0000 + 2 * P);
    assert_eq!(t.attrs, crate::vm::S2Kind::Ram.attributes());
    destroy_all(&m, &[&a, &b]);
    assert_eq!(fr.in_use(), 0);
}

#[test]
fn reclaim_gives_a_block_owner_its_blocks_back() {
    let fr = frames();
    let m = manager(fr);
    let a = block_vm(&m);
    let b = vm(&m, 0);
    let (before, frames_before) = (snapshot(&a), fr.in_use());
    assert_eq!(before.len(), 1, "one 2 MiB block");
    for f in [fid::SHARE, fid::LEND] {
        let h = give(&m, &a, f, RAM + 0x40 * P, 3, &b, 1);
        assert_eq!(translate(&a, RAM).map(|t| t.level), Some(3), "split");
        assert_eq!(call(&m, &b, &[fid::RETRIEVE.into(), h, FREE, 1])[0], 0);
        assert_eq!(call(&m, &b, &[fid::RELINQUISH.into(), h])[0], 0);
        assert_eq!(call(&m, &a, &[fid::RECLAIM.into(), h])[0], 0);
        assert_eq!(snapshot(&a), before, "block again after {f:#x}");
        assert_eq!(fr.in_use(), frames_before, "the split table was freed");
    }
    destroy_all(&m, &[&a, &b]);
    assert_eq!(fr.in_use(), 0);
}

#[test]
fn resetting_the_owner_revokes_and_returns_its_pages() {
    let fr = frames();
    let m = manager(fr);
    let (a, b) = (vm(&m, 0), vm(&m, 1));
    let a_before = snapshot(&a);
    let hs = give(&m, &a, fid::SHARE, RAM, 2, &b, 3);
    let hl = give(&m, &a, fid::LEND, RAM + 0x10 * P, 2, &b, 3);
    let r = u64::from(fid::RETRIEVE);
    assert_eq!(call(&m, &b, &[r, hs, FREE, 3])[0], 0);
    assert_eq!(call(&m, &b, &[r, hl, FREE + 0x10 * P, 3])[0], 0);
    clear_tlb(&b);
    m.reset(a.id).expect("reset");
    assert!(translate(&b, FREE).is_none() && translate(&b, FREE + 0x11 * P).is_none());
    let inv = invalidated_ipas(&b, b.vmid.get());
    for ipa in [FREE, FREE + P, FREE + 0x10 * P, FREE + 0x11 * P] {
        assert!(
            inv.contains(&ipa),
            "revoke of {ipa:#x} invalidated for b: {inv:x?}"
        );
    }
    assert!(m.with_shares(|t| t.transactions().is_empty()));
    assert_eq!(snapshot(&a), a_before, "all of a's RAM mapped again, owned");
    assert_eq!(code(call(&m, &b, &[fid::RELINQUISH.into(), hs])), INVALID);
    destroy_all(&m, &[&a, &b]);
    assert_eq!(fr.in_use(), 0);
}

#[test]
fn resetting_the_receiver_drops_its_mappings_only() {
    let fr = frames();
    let m = manager(fr);
    let (a, b) = (vm(&m, 0), vm(&m, 1));
    let h = give(&m, &a, fid::LEND, RAM, 2, &b, 1);
    assert_eq!(call(&m, &b, &[fid::RETRIEVE.into(), h, FREE, 1])[0], 0);
    clear_tlb(&b);
    m.reset(b.id).expect("reset");
    b.state.lock().psci.take_pending(0);
    assert!(translate(&b, FREE).is_none());
    assert_eq!(invalidated_ipas(&b, b.vmid.get()), vec![FREE, FREE + P]);
    assert!(translate(&a, RAM).is_none(), "still lent");
    // Pending again: the rebooted receiver may retrieve it, the owner may reclaim it.
    assert_eq!(call(&m, &b, &[fid::QUERY.into(), 0])[1], h);
    assert_eq!(call(&m, &b, &[fid::RETRIEVE.into(), h, FREE, 1])[0], 0);
    assert_eq!(call(&m, &b, &[fid::RELINQUISH.into(), h])[0], 0);
    assert_eq!(call(&m, &a, &[fid::RECLAIM.into(), h])[0], 0);
    destroy_all(&m, &[&a, &b]);
    assert_eq!(fr.in_use(), 0);
}

#[test]
fn destroying_either_party_mid_transaction_leaks_nothing() {
    let fr = frames();
    let m = manager(fr);
    let base = m.accounting();
    for owner_first in [true, false] {
        let (a, b) = (vm(&m, 0), vm(&m, 1));
        let hs = give(&m, &a, fid::SHARE, RAM, 3, &b, 3);
        let hl = give(&m, &a, fid::LEND, RAM + 8 * P, 3, &b, 3);
        assert_eq!(call(&m, &b, &[fid::RETRIEVE.into(), hs, FREE, 1])[0], 0);
        assert_eq!(
            call(&m, &b, &[fid::RETRIEVE.into(), hl, FREE + 8 * P, 3])[0],
            0
        );
        if owner_first {
            clear_tlb(&b);
            destroy_all(&m, &[&a]);
            assert!(translate(&b, FREE).is_none() && translate(&b, FREE + 8 * P).is_none());
            assert_eq!(invalidated_ipas(&b, b.vmid.get()).len(), 6);
            assert!(m.with_shares(|t| t.transactions().is_empty()));
            destroy_all(&m, &[&b]);
        } else {
            destroy_all(&m, &[&b]);
            let t = m.with_shares(|t| t.transactions().to_vec());
            assert!(t.iter().all(|t| t.state == State::Pending), "{t:?}");
            assert!(translate(&a, RAM + 8 * P).is_none(), "still lent");
            assert_eq!(call(&m, &a, &[fid::RECLAIM.into(), hl])[0], 0);
            assert!(translate(&a, RAM + 8 * P).is_some());
            destroy_all(&m, &[&a]);
            assert!(m.with_shares(|t| t.transactions().is_empty()));
        }
        assert_eq!(m.accounting(), base, "RAM, frames and VMIDs back");
    }
    assert_eq!(fr.in_use(), 0);
    assert_eq!(fr.total_allocated(), fr.total_freed());
}

#[test]
fn calls_go_through_the_vcpu_exit_path() {
    use crate::vcpu::fakes::{NoHost, HVC_EXIT};
    use crate::vcpu::{handle_exit, Next, VcpuCtx};
    let m = manager(frames());
    let (a, b) = (vm(&m, 0), vm(&m, 1));
    let (mut x, mut pc, mut pstate) = ([0u64; 31], 0x4000_1000, 0x3c5);
    x[..5].copy_from_slice(&[fid::SHARE.into(), RAM, 1, b.id.into(), 1]);
    let mut ctx = VcpuCtx {
        x: &mut x,
        pc: &mut pc,
        pstate: &mut pstate,
    };
    let mut kicks = crate::vm::vgic::VcpuMask::EMPTY;
    let next = handle_exit(
        &a,
        0,
        &mut ctx,
        HVC_EXIT,
        &mut NoHost,
        &mut |req| m.share_call(&a, 0, req),
        &mut kicks,
    );
    assert_eq!(next, Next::Resume);
    let handle = m.with_shares(|t| t.transactions()[0].handle);
    assert_eq!(&x[..4], &[0, handle, 0, 0]);
}

#[test]
fn page_state_checks_of_ranges_that_wrap_are_false() {
    let m = manager(frames());
    let a = vm(&m, 0);
    let guard = a.stage2.lock();
    let s2 = guard.as_ref().expect("stage 2");
    assert!(super::page_state::all_in_state(
        s2,
        Ipa::new(RAM),
        2 * P,
        PageState::Owned
    ));
    // A range whose end passes 2^64 holds no page in any state.
    for (ipa, size) in [(!0xfff, 2 * P), (RAM, !0xfff)] {
        assert!(
            !super::page_state::all_in_state(s2, Ipa::new(ipa), size, PageState::Owned),
            "{ipa:#x} + {size:#x}"
        );
    }
}

#[test]
fn page_states_round_trip_through_software_bits() {
    for s in [
        PageState::Owned,
        PageState::SharedOwned,
        PageState::SharedBorrowed,
        PageState::NotReady,
    ] {
        assert_eq!(PageState::from_sw(s.sw()), Some(s));
    }
    assert_eq!(PageState::Owned.sw().bits(), 0);
    assert_eq!(PageState::SharedOwned.sw().bits(), 1);
    assert_eq!(PageState::SharedBorrowed.sw().bits(), 2);
    assert_eq!(PageState::NotReady.sw().bits(), 3);
    assert_eq!(PageState::from_sw(SwBits::truncate(4)), None);
    assert_eq!(format!("{}", Perms::from_raw(5).expect("valid")), "r-x");
    assert!(Perms::from_raw(1)
        .expect("r")
        .within(Perms::from_raw(3).expect("rw")));
    assert!(!Perms::from_raw(5)
        .expect("rx")
        .within(Perms::from_raw(3).expect("rw")));
}

mod model {
    //! Random call sequences over three VMs against a simple model of the rules.
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Give {
            by: usize,
            lend: bool,
            page: u64,
            pages: u64,
            to: u64,
            perms: u64,
        },
        Retrieve {
            by: usize,
            handle: usize,
            slot: u64,
            perms: u64,
        },
        Relinquish {
            by: usize,
            handle: usize,
        },
        Reclaim {
            by: usize,
            handle: usize,
        },
        Query {
            by: usize,
            handle: usize,
            /// With handle 0: the owner asked about (3: an unknown VM id).
            owner: usize,
        },
        Reset {
            vm: usize,
        },
    }

    /// Permission values, mostly valid ones.
    fn perms() -> impl Strategy<Value = u64> {
        prop_oneof![3 => prop::sample::select(vec![1u64, 3, 5, 7]), 1 => 0..9u64]
    }

    /// A handle index (see [`World::handle`]), mostly one of the newest.
    fn handle() -> impl Strategy<Value = usize> {
        prop_oneof![4 => 0..2usize, 1 => 0..6usize]
    }

    /// A caller: 0..3 is that VM; 3.. stands for the transaction's party that may make
    /// the call (resolved by [`World::resolve`]).
    fn by() -> impl Strategy<Value = usize> {
        0..6usize
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3usize, any::<bool>(), 250..262u64, 1..5u64, 0..6u64, perms()).prop_map(
                |(by, lend, page, pages, to, perms)| Op::Give {
                    by,
                    lend,
                    page: page % 256 + if page >= 260 { 0x100 } else { 0 },
                    // 0..3: that VM (3 is unknown); 4, 5: the next VM after the owner.
                    to: if to >= 4 { (by as u64 + 1) % 3 } else { to },
                    pages,
                    perms,
                }
            ),
            4 => (by(), handle(), 0..6u64, prop_oneof![3 => Just(1u64), 1 => perms()])
                .prop_map(|(by, handle, slot, perms)| Op::Retrieve { by, handle, slot, perms }),
            2 => (by(), handle()).prop_map(|(by, handle)| Op::Relinquish { by, handle }),
            2 => (by(), handle()).prop_map(|(by, handle)| Op::Reclaim { by, handle }),
            1 => (by(), handle(), 0..4usize)
                .prop_map(|(by, handle, owner)| Op::Query { by, handle, owner }),
            1 => (0..3usize).prop_map(|vm| Op::Reset { vm }),
        ]
    }

    /// The model's transaction: handle, lend, owner, receiver, first owner page, pages,
    /// perms, receiver IPA and perms once retrieved.
    #[derive(Clone, Copy, Debug)]
    struct T {
        handle: u64,
        lend: bool,
        owner: usize,
        receiver: usize,
        page: u64,
        pages: u64,
        perms: u64,
        retrieved: Option<(u64, u64)>,
    }

    /// RAM pages of VM `n` of the model: VM 2 has 2 MiB mapped with a block.
    fn ram_pages(n: usize) -> u64 {
        if n == 2 {
            512
        } else {
            256
        }
    }

    /// Receiver IPA of slot `s`: overlapping ranges, plus one in RAM.
    fn slot_ipa(s: u64) -> u64 {
        if s == 5 {
            RAM + 3 * P
        } else {
            FREE + s * 3 * P
        }
    }

    fn ok_perms(p: u64) -> bool {
        p & 1 == 1 && p < 8
    }

    struct World {
        m: M,
        vms: Vec<V>,
        model: Vec<T>,
        /// Transactions made so far per (owner, receiver).
        sequence: std::collections::BTreeMap<(usize, usize), u64>,
        handles: Vec<u64>,
    }

    impl World {
        /// Handle number `i` counted from the newest; past the oldest, 0 or a value
        /// never issued.
        fn handle(&self, i: usize) -> u64 {
            let n = self.handles.len();
            if i < n {
                self.handles[n - 1 - i]
            } else if i % 2 == 0 {
                0
            } else {
                999
            }
        }

        /// The handle of the next transaction `by` makes with `to`.
        fn next_handle(&self, by: usize, to: usize) -> u64 {
            let id = |i: usize| u64::from(self.vms[i].id);
            let seq = self.sequence.get(&(by, to)).copied().unwrap_or(0) + 1;
            id(by) << 48 | id(to) << 32 | seq
        }

        /// `op` with `by` 3 and 4 replaced by the party allowed to make the call.
        fn resolve(&self, op: Op) -> Op {
            let party = |by: usize, handle: usize, owner: bool| {
                if by < 3 {
                    return by;
                }
                let h = self.handle(handle);
                self.model.iter().find(|t| t.handle == h).map_or(0, |t| {
                    if owner {
                        t.owner
                    } else {
                        t.receiver
                    }
                })
            };
            match op {
                Op::Retrieve {
                    by,
                    handle,
                    slot,
                    perms,
                } => Op::Retrieve {
                    by: party(by, handle, false),
                    handle,
                    slot,
                    perms,
                },
                Op::Relinquish { by, handle } => Op::Relinquish {
                    by: party(by, handle, false),
                    handle,
                },
                Op::Reclaim { by, handle } => Op::Reclaim {
                    by: party(by, handle, true),
                    handle,
                },
                Op::Query { by, handle, owner } => Op::Query {
                    by: party(by, handle, by == 3),
                    handle,
                    owner,
                },
                other => other,
            }
        }

        /// The model's answer: Ok(x1..x3) or the error code.
        fn predict(&self, op: Op) -> Result<[u64; 3], i64> {
            // A handle exists only for the owner and the receiver of its transaction.
            let find = |h: u64, by: usize| {
                self.model
                    .iter()
                    .position(|t| h != 0 && t.handle == h && (t.owner == by || t.receiver == by))
            };
            match op {
                Op::Give {
                    by,
                    page,
                    pages,
                    to,
                    perms,
                    ..
                } => {
                    if !ok_perms(perms) || to as usize == by || to >= 3 {
                        return Err(INVALID);
                    }
                    if page + pages > ram_pages(by) {
                        return Err(DENIED);
                    }
                    let busy = self
                        .model
                        .iter()
                        .any(|t| t.owner == by && t.page < page + pages && page < t.page + t.pages);
                    if busy {
                        return Err(DENIED);
                    }
                    Ok([self.next_handle(by, to as usize), 0, 0])
                }
                Op::Retrieve {
                    by,
                    handle,
                    slot,
                    perms,
                } => {
                    let i = find(self.handle(handle), by).ok_or(INVALID)?;
                    let t = self.model[i];
                    if !ok_perms(perms) {
                        return Err(INVALID);
                    }
                    if t.receiver != by || t.retrieved.is_some() || perms & !t.perms != 0 {
                        return Err(DENIED);
                    }
                    let ipa = slot_ipa(slot);
                    let size = t.pages * P;
                    let clash = ipa < RAM + ram_pages(by) * P && RAM < ipa + size
                        || self.model.iter().any(|o| {
                            o.receiver == by
                                && o.retrieved.is_some_and(|(oi, _)| {
                                    oi < ipa + size && ipa < oi + o.pages * P
                                })
                        });
                    if clash {
                        return Err(INVALID);
                    }
                    Ok([0; 3])
                }
                Op::Relinquish { by, handle } => {
                    let t = self.model[find(self.handle(handle), by).ok_or(INVALID)?];
                    if t.retrieved.is_none() || t.receiver != by {
                        return Err(DENIED);
                    }
                    Ok([0; 3])
                }
                Op::Reclaim { by, handle } => {
                    let t = self.model[find(self.handle(handle), by).ok_or(INVALID)?];
                    if t.owner != by || t.retrieved.is_some() {
                        return Err(DENIED);
                    }
                    Ok([0; 3])
                }
                Op::Query { by, handle, owner } => {
                    let h = self.handle(handle);
                    let t = if h == 0 {
                        *self
                            .model
                            .iter()
                            .find(|t| t.receiver == by && t.owner == owner && t.retrieved.is_none())
                            .ok_or(NO_DATA)?
                    } else {
                        self.model[find(h, by).ok_or(INVALID)?]
                    };
                    let id = |i: usize| u64::from(self.vms[i].id);
                    let packed = id(t.owner)
                        | id(t.receiver) << 16
                        | t.perms << 32
                        | u64::from(t.lend) << 40
                        | u64::from(t.retrieved.is_some()) << 48;
                    Ok([t.handle, packed, t.pages])
                }
                Op::Reset { .. } => Ok([0; 3]),
            }
        }

        fn apply(&mut self, op: Op) {
            let find = |model: &[T], h: u64| model.iter().position(|t| t.handle == h);
            match op {
                Op::Give {
                    by,
                    lend,
                    page,
                    pages,
                    to,
                    perms,
                } => {
                    let handle = self.next_handle(by, to as usize);
                    self.model.push(T {
                        handle,
                        lend,
                        owner: by,
                        receiver: to as usize,
                        page,
                        pages,
                        perms,
                        retrieved: None,
                    });
                    self.handles.push(handle);
                    *self.sequence.entry((by, to as usize)).or_default() += 1;
                }
                Op::Retrieve {
                    handle,
                    slot,
                    perms,
                    ..
                } => {
                    let h = self.handle(handle);
                    if let Some(i) = find(&self.model, h) {
                        self.model[i].retrieved = Some((slot_ipa(slot), perms));
                    }
                }
                Op::Relinquish { handle, .. } => {
                    let h = self.handle(handle);
                    if let Some(i) = find(&self.model, h) {
                        self.model[i].retrieved = None;
                    }
                }
                Op::Reclaim { handle, .. } => {
                    let h = self.handle(handle);
                    self.model.retain(|t| t.handle != h);
                }
                Op::Query { .. } => {}
                Op::Reset { vm } => {
                    for t in &mut self.model {
                        if t.receiver == vm {
                            t.retrieved = None;
                        }
                    }
                    self.model.retain(|t| t.owner != vm);
                }
            }
        }

        fn run(&self, op: Op) -> [u64; 4] {
            let x = |by: usize, regs: &[u64]| call(&self.m, &self.vms[by], regs);
            match op {
                Op::Give {
                    by,
                    lend,
                    page,
                    pages,
                    to,
                    perms,
                } => {
                    let f = if lend { fid::LEND } else { fid::SHARE };
                    let to = if to < 3 {
                        u64::from(self.vms[to as usize].id)
                    } else {
                        77
                    };
                    x(by, &[f.into(), RAM + page * P, pages, to, perms])
                }
                Op::Retrieve {
                    by,
                    handle,
                    slot,
                    perms,
                } => x(
                    by,
                    &[
                        fid::RETRIEVE.into(),
                        self.handle(handle),
                        slot_ipa(slot),
                        perms,
                    ],
                ),
                Op::Relinquish { by, handle } => {
                    x(by, &[fid::RELINQUISH.into(), self.handle(handle)])
                }
                Op::Reclaim { by, handle } => x(by, &[fid::RECLAIM.into(), self.handle(handle)]),
                Op::Query { by, handle, owner } => {
                    let owner = if owner < 3 {
                        u64::from(self.vms[owner].id)
                    } else {
                        77
                    };
                    x(by, &[fid::QUERY.into(), self.handle(handle), owner])
                }
                Op::Reset { vm } => {
                    self.m.reset(self.vms[vm].id).expect("reset");
                    self.vms[vm].state.lock().psci.take_pending(0);
                    [0; 4]
                }
            }
        }

        /// The stage-2 tables say exactly what the model says.
        fn check_tables(&self) {
            for (n, v) in self.vms.iter().enumerate() {
                let pa0 = 0x5000_0000 + n as u64 * 0x10_0000;
                let mut expect: Vec<(u64, u64, u8, mmu::Permissions)> = Vec::new();
                let rwx = crate::vm::S2Kind::Ram.attributes().perms;
                for page in 0..ram_pages(n) {
                    let t = self
                        .model
                        .iter()
                        .find(|t| t.owner == n && (t.page..t.page + t.pages).contains(&page));
                    match t {
                        None => expect.push((RAM + page * P, pa0 + page * P, 0, rwx)),
                        Some(t) if !t.lend => {
                            expect.push((RAM + page * P, pa0 + page * P, 1, rwx));
                        }
                        Some(_) => {}
                    }
                }
                for t in self.model.iter().filter(|t| t.receiver == n) {
                    if let Some((ipa, perms)) = t.retrieved {
                        let opa = 0x5000_0000 + t.owner as u64 * 0x10_0000 + t.page * P;
                        let p = Perms::from_raw(perms).expect("valid").borrowed_attributes();
                        for i in 0..t.pages {
                            expect.push((ipa + i * P, opa + i * P, 2, p.perms));
                        }
                    }
                }
                expect.sort_unstable_by_key(|e| e.0);
                // Blocks as the pages they map.
                let got: Vec<_> = snapshot(v)
                    .iter()
                    .flat_map(|m| {
                        (0..m.size / P).map(move |i| {
                            (
                                m.va + i * P,
                                m.output + i * P,
                                m.attrs.sw.bits(),
                                m.attrs.perms,
                            )
                        })
                    })
                    .collect();
                assert_eq!(got, expect, "stage 2 of vm{n}");
            }
            let vm2_whole = !self.model.iter().any(|t| t.owner == 2);
            let ram_leaves = snapshot(&self.vms[2])
                .iter()
                .filter(|m| m.va < FREE)
                .count();
            assert_eq!(
                ram_leaves == 1,
                vm2_whole,
                "vm2's RAM is one block exactly when none of it is shared or lent"
            );
            let table = self.m.with_shares(|t| t.transactions().to_vec());
            let handles: Vec<u64> = table.iter().map(|t| t.handle).collect();
            let model: Vec<u64> = self.model.iter().map(|t| t.handle).collect();
            assert_eq!(handles, model);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn random_calls_follow_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            let fr = frames();
            let m = manager(fr);
            let vms: Vec<V> = vec![vm(&m, 0), vm(&m, 1), block_vm(&m)];
            let mut w = World { m, vms, model: Vec::new(), sequence: Default::default(), handles: Vec::new() };
            for op in ops {
                let op = w.resolve(op);
                let expected = w.predict(op);
                let walks: Vec<_> = w.vms.iter().map(snapshot).collect();
                let got = w.run(op);
                match expected {
                    Ok(regs) => {
                        prop_assert_eq!(got, [0, regs[0], regs[1], regs[2]], "{:?}", op);
                        w.apply(op);
                    }
                    Err(e) => {
                        prop_assert_eq!(got, [e as u64, 0, 0, 0], "{:?}", op);
                        let after: Vec<_> = w.vms.iter().map(snapshot).collect();
                        prop_assert_eq!(after, walks, "failed {:?} changed a table", op);
                    }
                }
                w.check_tables();
            }
            let vms: Vec<V> = w.vms.clone();
            destroy_all(&w.m, &vms.iter().collect::<Vec<_>>());
            prop_assert_eq!(fr.in_use(), 0);
        }
    }
}

/// Owner and receiver call at the same time on two threads while a third resets each VM
/// now and then: no deadlock, and the end state agrees between the table and both
/// stage 2s.
#[test]
fn concurrent_calls_and_resets_stay_consistent() {
    use crate::vm::psci::PowerState;
    use crate::vm::tests::{manager as fake_manager, Fake, FakeS2};
    use std::sync::atomic::{AtomicBool, Ordering};
    type FM = VmManager<Fake>;
    type FV = Arc<Vm<FakeS2>>;
    fn on(v: &FV) {
        let mut st = v.state.lock();
        if st.psci.state(0) != Some(PowerState::On) {
            st.psci.take_pending(0);
        }
    }
    fn x(m: &FM, v: &FV, regs: &[u64]) -> [u64; 4] {
        on(v);
        let mut x = [0u64; 8];
        x[..regs.len()].copy_from_slice(regs);
        m.share_call(v, 0, Request::decode(&x).expect("sharing call"))
            .0
    }
    let m = fake_manager();
    let mk = |pa, cpu| {
        let v = m.create(desc(pa, cpu)).expect("create");
        on(&v);
        v
    };
    let (a, b) = (mk(0x5000_0000, 1), mk(0x5010_0000, 2));
    let stop = AtomicBool::new(false);
    let (mut given, mut retrieved) = (0, 0);
    std::thread::scope(|s| {
        let owner = s.spawn(|| {
            let mut n = 0u64;
            for i in 0..400u64 {
                let f = if i % 2 == 0 { fid::SHARE } else { fid::LEND };
                let r = x(&m, &a, &[f.into(), RAM + (i % 8) * P, 2, b.id.into(), 3]);
                // The last ones stay for the final check.
                if r[0] == 0 && i >= 396 {
                    n += 1;
                } else if r[0] == 0 {
                    n += 1;
                    // Give the receiver time to retrieve it.
                    for _ in 0..1000 {
                        let q = x(&m, &a, &[fid::QUERY.into(), r[1]]);
                        if q[0] != 0 || q[2] >> 48 == 1 {
                            break;
                        }
                        std::thread::yield_now();
                    }
                    // Reclaim once the receiver let go (or a reset ended it).
                    for _ in 0..1000 {
                        let r = code(x(&m, &a, &[fid::RECLAIM.into(), r[1]]));
                        if r == 0 || r == INVALID {
                            break;
                        }
                        std::thread::yield_now();
                    }
                }
            }
            n
        });
        let receiver = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let q = x(&m, &b, &[fid::QUERY.into(), 0]);
                if q[0] != 0 {
                    std::thread::yield_now();
                    continue;
                }
                if x(&m, &b, &[fid::RETRIEVE.into(), q[1], FREE, 1])[0] == 0 {
                    n += 1;
                    x(&m, &b, &[fid::RELINQUISH.into(), q[1]]);
                }
            }
            n
        });
        let resets = s.spawn(|| {
            for i in 0..40 {
                let v = if i % 2 == 0 { &a } else { &b };
                m.reset(v.id).expect("reset");
                std::thread::yield_now();
            }
        });
        given = owner.join().expect("owner");
        resets.join().expect("resets");
        stop.store(true, Ordering::SeqCst);
        retrieved = receiver.join().expect("receiver");
    });
    assert!(
        given > 0 && retrieved > 0,
        "{given} given, {retrieved} retrieved"
    );
    // The end state: whatever is left in the table is exactly what the tables show.
    let live = m.with_shares(|t| t.transactions().to_vec());
    let sw = |v: &FV, ipa: u64| {
        v.stage2
            .lock()
            .as_ref()
            .and_then(|s| s.attrs.get(&ipa).map(|a| a.sw.bits()))
    };
    for page in 0..256 {
        let ipa = RAM + page * P;
        let t = live
            .iter()
            .find(|t| (t.ipa.get()..t.ipa.get() + t.pages * P).contains(&ipa));
        let expect = match t.map(|t| t.kind) {
            None => Some(0),
            Some(Kind::Share) => Some(1),
            Some(Kind::Lend) => None,
        };
        assert_eq!(sw(&a, ipa), expect, "owner page {ipa:#x}: {t:?}");
    }
    let borrowed = b
        .stage2
        .lock()
        .as_ref()
        .map_or(0, |s| s.maps.range(FREE..).count());
    let expect: u64 = live
        .iter()
        .filter(|t| matches!(t.state, State::Retrieved { .. }))
        .map(|t| t.pages)
        .sum();
    assert_eq!(borrowed as u64, expect);
}

/// Counts the heap allocations of each thread, so that a test can check that a call path
/// makes none (on the machine a failed allocation would stop the hypervisor).
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    }

    struct Counting;

    // SAFETY: every request is passed to `System` unchanged; the count is a side effect.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
            // SAFETY: the caller's guarantees for `layout` are `System`'s.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` was allocated by `System` with `layout` (above).
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// Heap allocations this thread has made so far.
    pub fn allocations() -> usize {
        ALLOCATIONS.with(Cell::get)
    }
}

#[test]
fn calls_that_change_no_table_allocate_nothing() {
    let m = manager(frames());
    let (a, b) = (vm(&m, 0), vm(&m, 1));
    let h = give(&m, &a, fid::SHARE, RAM, 2, &b, 1);
    let (q, r, s) = (fid::QUERY, fid::RETRIEVE, fid::SHARE);
    // Decoded beforehand: only the manager's part is measured.
    let reqs = [
        (&b, [q.into(), 0, 0, 0, 0]),
        (&a, [q.into(), h, 0, 0, 0]),
        (&a, [q.into(), h + 1, 0, 0, 0]),
        // Refused after the page checks: already shared, a range not free.
        (&a, [s.into(), RAM, 1, b.id.into(), 1]),
        (&b, [r.into(), h, RAM, 1, 0]),
        (&a, [r.into(), h, FREE, 1, 0]),
    ]
    .map(|(v, regs)| {
        let mut x = [0u64; 8];
        x[..5].copy_from_slice(&regs);
        (v, Request::decode(&x).expect("a sharing call"))
    });
    for (v, req) in reqs {
        let before = counting::allocations();
        let r = m.share_call(v, 0, req);
        assert_eq!(
            counting::allocations() - before,
            0,
            "{req:x?} -> {r:x?} allocated"
        );
    }
}

/// Pages the owner gives from RAM it never touched are scrubbed first: the receiver
/// never sees what an earlier user of that RAM left there, and the owner's chunk is
/// ready (mapped, owned) around the lent pages.
#[test]
fn giving_untouched_ram_scrubs_its_chunk_first() {
    let fr = frames();
    let m = VmManager::new(
        MmuFake {
            fake: crate::vm::tests::Fake::default(),
            frames: fr,
        },
        VmidBits::Eight,
        &[crate::mem::PhysRange::new(
            PhysAddr::new(0x5000_0000),
            0x80_0000,
        )],
    );
    let mut d = desc(0x5000_0000, 1);
    d.name = "owner".into();
    d.memory[0].size = 0x40_0000;
    let a = m.create(d).expect("owner");
    a.state.lock().psci.take_pending(0);
    let b = vm(&m, 4);
    let lent = RAM + 0x30_0000;
    m.with_backend(|p| {
        p.fake.mem().insert(0x5030_0010, 0x77);
    });
    let not_ready = translate(&a, lent).expect("mapped without access");
    assert!(
        not_ready.attrs.perms.is_empty(),
        "the second chunk is not ready"
    );
    // A call that cannot take the range (past the end of the owner's RAM) does not
    // make it ready.
    assert_eq!(
        code(call(
            &m,
            &a,
            &[fid::LEND.into(), lent, 0x101, b.id.into(), 0b011]
        )),
        DENIED
    );
    assert!(!a.ram.lock().is_ready(1), "a refused call changes nothing");
    let h = give(&m, &a, fid::LEND, lent, 2, &b, 0b011);
    m.with_backend(|p| assert_eq!(p.fake.mem().get(&0x5030_0010), None, "scrubbed"));
    assert!(a.ram.lock().is_ready(1));
    assert!(translate(&a, lent).is_none(), "lent away");
    assert_eq!(
        translate(&a, RAM + 0x20_0000).map(|t| t.output),
        Some(0x5020_0000),
        "the rest of the chunk is the owner's"
    );
    // A fault on a lent page is not a first touch: the owner's own access is refused.
    let mem = m.with_backend(|p| p.fake.memory.clone());
    assert_eq!(
        a.first_touch(Ipa::new(lent), &mem),
        Ok(crate::vm::Touch::Ready)
    );
    assert_eq!(call(&m, &b, &[fid::RETRIEVE.into(), h, FREE, 0b011])[0], 0);
    assert_eq!(translate(&b, FREE).map(|t| t.output), Some(0x5030_0000));
    destroy_all(&m, &[&a, &b]);
}

/// Two RAM regions that share a 2 MiB window are two chunks, contiguous in both address
/// spaces: after a lend and its reclaim, the chunks are not merged into one block (which a
/// first touch or a reset would then have to split, needing a frame).
#[test]
fn a_reclaim_never_merges_two_chunks_into_one_block() {
    let fr = frames();
    let m = manager(fr);
    let mut d = desc(0x5000_0000, 1);
    d.name = "split".into();
    d.stage2 = Stage2Mappings::Blocks;
    d.memory = vec![
        GuestRegion {
            ipa: Ipa::new(RAM),
            pa: PhysAddr::new(0x5000_0000),
            size: 0x10_0000,
        },
        GuestRegion {
            ipa: Ipa::new(RAM + 0x10_0000),
            pa: PhysAddr::new(0x5010_0000),
            size: 0x10_0000,
        },
    ];
    let a = m.create(d).expect("two regions");
    a.state.lock().psci.take_pending(0);
    let b = vm(&m, 2);
    let mem = m.with_backend(|p| p.fake.memory.clone());
    assert_eq!(
        a.first_touch(Ipa::new(RAM + 0x10_0000), &mem),
        Ok(crate::vm::Touch::MadeReady)
    );
    let h = give(&m, &a, fid::LEND, RAM + 3 * P, 1, &b, 0b011);
    assert_eq!(call(&m, &a, &[fid::RECLAIM.into(), h]), [0; 4]);
    let levels: Vec<u8> = snapshot(&a)
        .iter()
        .filter(|m| m.va < RAM + 0x20_0000)
        .map(|m| m.level)
        .collect();
    assert!(
        levels.iter().all(|&l| l == 3),
        "no block over both chunks: {levels:?}"
    );
    let frames = m.accounting().2;
    m.reset(a.id).expect("reset");
    assert_eq!(a.status(), VmStatus::Running, "the reset needed no frame");
    assert_eq!(m.accounting().2, frames);
    destroy_all(&m, &[&a, &b]);
}
