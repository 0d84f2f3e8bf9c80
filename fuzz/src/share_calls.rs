//! `share_calls`: random memory-sharing call sequences (`TWOSTAGE_MEM_*`,
//! docs/hypercalls.md) from three VMs, with resets and a VM destroyed and made again
//! between them, through `VmManager::share_call` over real stage-2 tables.
//!
//! Input: [`OP_LEN`]-byte records, one per call (at most [`MAX_OPS`]). Handles are
//! named by how recently they were issued, so random inputs reach live transactions.
//!
//! After every call the invariants of [`World::check`] hold; a refused call changed no
//! stage 2 and no transaction; at the end, destroying every VM returns everything.

use hypervisor::mem::PAGE_SIZE;
use hypervisor::vm::share::{fid, Request};

use crate::input::{pick, Bytes};
use crate::world::{ram_size, World, DEVICE, FREE, RAM, RAM2, VUART};

/// Bytes of one call record.
pub const OP_LEN: usize = 8;
/// Most calls read from one input.
pub const MAX_OPS: usize = 48;

const PAGES: [u64; 10] = [1, 2, 3, 4, 16, 255, 256, 512, 0, 65_537];
/// Receiver IPAs of RETRIEVE: free slots that overlap each other, and places that are
/// not free (RAM, UART, device, the top of the IPA space, unaligned).
const SLOTS: [u64; 10] = [
    FREE,
    FREE + 3 * PAGE_SIZE,
    FREE + 0x20_0000,
    FREE + 0x1000_0000,
    RAM + 0x3000,
    VUART,
    DEVICE,
    RAM2 + 0x1_0000,
    (1 << 39) - PAGE_SIZE,
    FREE + 0x10,
];

/// The registers x0..x7 of record `r`, made by VM slot `by`; `handles` are the
/// handles issued so far, newest last.
fn regs(w: &World<'_>, r: [u8; OP_LEN], handles: &[u64]) -> [u64; 8] {
    let by = usize::from(r[1] % 3);
    let handle = match r[6] {
        0xff => 0,
        0xfe => u64::from(r[7]) << 8 | u64::from(r[2]),
        i => {
            let i = usize::from(i % 8);
            handles.len().checked_sub(i + 1).map_or(0, |k| handles[k])
        }
    };
    let receiver = match r[4] % 6 {
        k @ 0..=2 => u64::from(w.vms[usize::from(k)].id),
        3 => u64::from(w.vms[by].id),
        4 => 77,
        _ => u64::from(w.vms[(by + 1) % 3].id),
    };
    let page = u64::from(r[2]) + if r[5] & 0x80 != 0 { 256 } else { 0 };
    let ipa = match r[5] & 0x60 {
        0x20 if by == 2 => RAM2 + (page % 16) * PAGE_SIZE,
        0x40 => RAM + page * PAGE_SIZE + u64::from(r[7] & 1) * 8,
        _ => RAM + (page % (ram_size(by) / PAGE_SIZE + 4)) * PAGE_SIZE,
    };
    let perms = u64::from(r[5] & 0x7) | if r[5] & 0x18 == 0x18 { 8 } else { 0 };
    let x: [u64; 5] = match r[0] % 6 {
        0 => [fid::SHARE.into(), ipa, pick(&PAGES, r[3]), receiver, perms],
        1 => [fid::LEND.into(), ipa, pick(&PAGES, r[3]), receiver, perms],
        2 => [fid::RETRIEVE.into(), handle, pick(&SLOTS, r[3]), perms, 0],
        3 => [fid::RELINQUISH.into(), handle, 0, 0, 0],
        4 => [fid::RECLAIM.into(), handle, 0, 0, 0],
        _ => [fid::QUERY.into(), handle, 0, 0, 0],
    };
    core::array::from_fn(|i| x.get(i).copied().unwrap_or(0))
}

/// Runs one input.
///
/// # Panics
///
/// When an invariant breaks.
pub fn run(data: &[u8]) {
    let frames = mmu::testing::HeapFrames::new();
    let mut w = World::new(&frames);
    let mut handles = Vec::new();
    let mut b = Bytes::new(data);
    for _ in 0..MAX_OPS {
        let Some(r) = b.record::<OP_LEN>() else {
            break;
        };
        let by = usize::from(r[1] % 3);
        match r[0] % 16 {
            14 => w.reset(by),
            15 => w.recreate(by),
            _ => {
                let x = regs(&w, r, &handles);
                let Some(req) = Request::decode(&x) else {
                    panic!("{x:x?} is a sharing call");
                };
                // A give opens the caller's chunks in its range first, even if it is then
                // refused: a guest cannot tell (`World::snapshot`).
                let opens = match req {
                    Request::Give { ipa, pages, .. } => Some((by, ipa.get(), pages)),
                    _ => None,
                };
                let before = (w.snapshot(opens), w.ledger());
                // vCPU 1 of vm1 is off: its calls are refused.
                let vcpu = usize::from(by == 1 && r[1] & 0x80 != 0);
                let (out, _note) = w.m.share_call(&w.vms[by], vcpu, req);
                if out[0] == 0 {
                    if matches!(req, Request::Give { .. }) {
                        assert_ne!(out[1], 0, "a zero handle");
                        handles.push(out[1]);
                    }
                } else {
                    assert_eq!(&out[1..], &[0, 0, 0], "{req:x?}: an error returns zeros");
                    let after = (w.snapshot(opens), w.ledger());
                    assert!(
                        after == before,
                        "refused {req:x?} ({:#x}) changed something",
                        out[0]
                    );
                }
                if vcpu == 1 {
                    assert_ne!(out[0], 0, "a call from a vCPU that is off succeeded");
                }
            }
        }
        w.check();
    }
    w.finish();
}
