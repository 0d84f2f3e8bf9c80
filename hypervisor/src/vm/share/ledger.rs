//! The ledger of live transactions, and the calls that move pages between VMs: check
//! every page of a request first, then commit with `mmu` operations that are themselves
//! transactional, ordered so that a failure leaves everything as it was.

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::abi::{Error, Kind, Perms, Request, MAX_PAGES};

/// Most live transactions; one more is refused with [`Error::NoMemory`].
pub const MAX_TRANSACTIONS: usize = 64;
use super::page_state::{all_in_state, nothing_mapped, PageState};
use crate::config::VmDesc;
use crate::mem::PAGE_SIZE;
use crate::vm::{S2Kind, Stage2Table, Vm, VmStatus, IPA_BITS};

/// Where a transaction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Created, or relinquished: the receiver has no mapping.
    Pending,
    /// Mapped into the receiver.
    Retrieved {
        /// Receiver IPA of the first page.
        ipa: u64,
        /// Permissions of the receiver's mapping.
        perms: Perms,
    },
}

/// One live transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Its handle (non-zero, never reused).
    pub handle: u64,
    /// Share or lend.
    pub kind: Kind,
    /// Owner VM id.
    pub owner: u32,
    /// Receiver VM id.
    pub receiver: u32,
    /// Owner IPA of the first page.
    pub ipa: u64,
    /// Number of 4 KiB pages.
    pub pages: u64,
    /// Permissions the owner granted.
    pub perms: Perms,
    /// Pending or retrieved.
    pub state: State,
}

impl Transaction {
    fn size(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// `QUERY`'s x2: owner | receiver << 16 | permissions << 32 | kind << 40 | state << 48.
    #[must_use]
    pub fn packed(&self) -> u64 {
        let kind = match self.kind {
            Kind::Share => 0u64,
            Kind::Lend => 1,
        };
        let state = match self.state {
            State::Pending => 0u64,
            State::Retrieved { .. } => 1,
        };
        u64::from(self.owner & 0xffff)
            | (u64::from(self.receiver & 0xffff) << 16)
            | (u64::from(self.perms.bits()) << 32)
            | (kind << 40)
            | (state << 48)
    }
}

/// The byte size of `pages` pages at `ipa`, if the range is page aligned, 1 to
/// [`MAX_PAGES`] pages, and inside the IPA space.
fn ipa_range(ipa: u64, pages: u64) -> Result<u64, Error> {
    if ipa % PAGE_SIZE != 0 || pages == 0 || pages > MAX_PAGES {
        return Err(Error::InvalidParameters);
    }
    let size = pages * PAGE_SIZE;
    match ipa.checked_add(size) {
        Some(end) if end <= 1 << IPA_BITS => Ok(size),
        _ => Err(Error::InvalidParameters),
    }
}

/// One piece of a request that lies in a single RAM region: IPA, PA, bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    ipa: u64,
    pa: u64,
    size: u64,
}

/// The pieces of `[ipa, ipa + size)` of a VM's RAM, cut at region boundaries: an
/// iterator over the description (a call allocates nothing), made by [`ram_segments`].
#[derive(Clone)]
struct Segments<'a> {
    desc: &'a VmDesc,
    at: u64,
    end: u64,
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        if self.at >= self.end {
            return None;
        }
        let r = self.desc.ram_region(self.at, PAGE_SIZE)?;
        let s = Segment {
            ipa: self.at,
            pa: r.pa + (self.at - r.ipa),
            size: (r.ipa + r.size).min(self.end) - self.at,
        };
        self.at += s.size;
        Some(s)
    }
}

/// `[ipa, ipa + size)` of `desc`'s RAM, cut at region boundaries, or [`Error::Denied`]
/// if some page of it is not RAM of the VM.
fn ram_segments(desc: &VmDesc, ipa: u64, size: u64) -> Result<Segments<'_>, Error> {
    let segments = Segments {
        desc,
        at: ipa,
        end: ipa + size,
    };
    if segments.clone().map(|s| s.size).sum::<u64>() == size {
        Ok(segments)
    } else {
        Err(Error::Denied)
    }
}

/// Whether `[ipa, ipa + size)` of the receiver `desc` is free: no RAM, pass-through
/// range or virtual UART page in it.
fn ipa_free(desc: &VmDesc, ipa: u64, size: u64) -> bool {
    let overlaps = |base: u64, len: u64| base < ipa + size && ipa < base.saturating_add(len);
    !desc
        .memory
        .iter()
        .chain(desc.passthrough.iter())
        .any(|r| overlaps(r.ipa, r.size))
        && !desc.vuart.is_some_and(|u| overlaps(u, PAGE_SIZE))
}

/// Maps `segments` of the owner at `ipa` in `s2` with `attrs`, in 4 KiB pages; undoes
/// what it mapped if a later segment fails.
fn map_segments<S: Stage2Table>(
    s2: &mut S,
    ipa: u64,
    segments: Segments<'_>,
    attrs: mmu::Attributes,
) -> Result<(), mmu::Error> {
    let base = segments.at;
    for (i, s) in segments.clone().enumerate() {
        if let Err(e) = s2.map_pages(ipa + (s.ipa - base), s.pa, s.size, attrs) {
            for done in segments.take(i) {
                // Unmapping 4 KiB pages just mapped splits nothing: it cannot fail.
                let _ = s2.unmap(ipa + (done.ipa - base), done.size);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Maps lent `segments` back into their owner (RAM attributes and the owner's block
/// policy); undoes what it mapped if a later segment fails.
fn map_back<S: Stage2Table>(s2: &mut S, segments: Segments<'_>) -> Result<(), mmu::Error> {
    for (i, s) in segments.clone().enumerate() {
        if let Err(e) = s2.map(s.ipa, s.pa, s.size, S2Kind::Ram) {
            for done in segments.take(i) {
                // Exactly what was just mapped: whole blocks or pages, nothing to split.
                let _ = s2.unmap(done.ipa, done.size);
            }
            return Err(e);
        }
    }
    Ok(())
}

fn find_vm<S>(vms: &[Arc<Vm<S>>], id: u32) -> Option<&Vm<S>> {
    vms.iter().find(|v| v.id == id).map(|v| &**v)
}

/// The live transactions, and the calls that make and end them.
#[derive(Debug)]
pub struct Ledger {
    live: Vec<Transaction>,
    next_handle: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    /// No transactions; room for [`MAX_TRANSACTIONS`] is reserved now, so creating one
    /// never allocates.
    #[must_use]
    pub fn new() -> Self {
        Self {
            live: Vec::with_capacity(MAX_TRANSACTIONS),
            next_handle: 1,
        }
    }

    /// The live transactions, oldest first.
    #[cfg(any(test, feature = "fuzzing"))]
    #[must_use]
    pub fn transactions(&self) -> &[Transaction] {
        &self.live
    }

    /// The transaction with `handle`, if `caller` is its owner or receiver: to any
    /// other VM a handle does not exist (it cannot probe which handles are live).
    fn index(&self, handle: u64, caller: u32) -> Result<usize, Error> {
        self.live
            .iter()
            .position(|t| {
                handle != 0 && t.handle == handle && (t.owner == caller || t.receiver == caller)
            })
            .ok_or(Error::InvalidParameters)
    }

    /// Runs one call by `caller` (a live, running VM); `vms` are the live VMs (the
    /// caller among them). Returns x1..x3 on success. Logs one line per successful
    /// call that changes something (info), and failures (debug).
    ///
    /// # Errors
    ///
    /// The [`Error`] the ABI defines for the request; nothing changed then.
    pub fn call<S: Stage2Table>(
        &mut self,
        vms: &[Arc<Vm<S>>],
        caller: &Vm<S>,
        req: Request,
    ) -> Result<[u64; 3], Error> {
        let r = match req {
            Request::Give {
                kind,
                ipa,
                pages,
                receiver,
                perms,
            } => self
                .give(vms, caller, kind, ipa, pages, receiver, perms)
                .map(|h| [h, 0, 0]),
            Request::Retrieve { handle, ipa, perms } => self
                .retrieve(vms, caller, handle, ipa, perms)
                .map(|()| [0; 3]),
            Request::Relinquish { handle } => self.relinquish(caller, handle).map(|()| [0; 3]),
            Request::Reclaim { handle } => self.reclaim(caller, handle).map(|()| [0; 3]),
            Request::Query { handle } => self
                .query(caller.id, handle)
                .map(|t| [t.handle, t.packed(), t.pages]),
        };
        if let Err(e) = r {
            log::debug!("VM {}: {req:x?} failed: {e}", caller.desc.name);
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn give<S: Stage2Table>(
        &mut self,
        vms: &[Arc<Vm<S>>],
        owner: &Vm<S>,
        kind: Kind,
        ipa: u64,
        pages: u64,
        receiver: u64,
        perms: u64,
    ) -> Result<u64, Error> {
        let size = ipa_range(ipa, pages)?;
        let perms = Perms::from_raw(perms)?;
        let receiver = u32::try_from(receiver)
            .ok()
            .filter(|&r| r != owner.id)
            .and_then(|r| find_vm(vms, r))
            .ok_or(Error::InvalidParameters)?;
        if receiver.status() != VmStatus::Running {
            return Err(Error::Denied);
        }
        ram_segments(&owner.desc, ipa, size)?;
        // A page is in at most one transaction (the stage-2 state says so too).
        if self
            .live
            .iter()
            .any(|t| t.owner == owner.id && t.ipa < ipa + size && ipa < t.ipa + t.size())
        {
            return Err(Error::Denied);
        }
        let mut guard = owner.stage2.lock();
        let s2 = guard.as_mut().ok_or(Error::Denied)?;
        if !all_in_state(s2, ipa, size, PageState::Owned) {
            return Err(Error::Denied);
        }
        if self.live.len() >= MAX_TRANSACTIONS {
            return Err(Error::NoMemory);
        }
        let handle = self.next_handle;
        let next = handle.checked_add(1).ok_or(Error::NoMemory)?;
        match kind {
            // May split a block (and fail, changing nothing); no TLB maintenance: the
            // hardware ignores the software bits.
            Kind::Share => s2.set_sw(ipa, size, PageState::SharedOwned.sw()),
            // The owner's TLB entries for the range are invalidated (its VMID) by `mmu`.
            Kind::Lend => s2.unmap(ipa, size),
        }
        .map_err(Error::from_mmu)?;
        drop(guard);
        self.next_handle = next;
        // Capacity was reserved in `new` and checked above: no allocation.
        self.live.push(Transaction {
            handle,
            kind,
            owner: owner.id,
            receiver: receiver.id,
            ipa,
            pages,
            perms,
            state: State::Pending,
        });
        log::info!(
            "VM {} {} {pages} page(s) at IPA {ipa:#x} with VM {} ({perms}): handle {handle}",
            owner.desc.name,
            match kind {
                Kind::Share => "shares",
                Kind::Lend => "lends",
            },
            receiver.desc.name
        );
        Ok(handle)
    }

    fn retrieve<S: Stage2Table>(
        &mut self,
        vms: &[Arc<Vm<S>>],
        receiver: &Vm<S>,
        handle: u64,
        ipa: u64,
        perms: u64,
    ) -> Result<(), Error> {
        let i = self.index(handle, receiver.id)?;
        let t = self.live[i];
        let size = ipa_range(ipa, t.pages)?;
        let perms = Perms::from_raw(perms)?;
        if t.receiver != receiver.id || t.state != State::Pending || !perms.within(t.perms) {
            return Err(Error::Denied);
        }
        if !ipa_free(&receiver.desc, ipa, size) {
            return Err(Error::InvalidParameters);
        }
        let owner = find_vm(vms, t.owner).ok_or(Error::Denied)?;
        let segments = ram_segments(&owner.desc, t.ipa, t.size())?;
        let mut guard = receiver.stage2.lock();
        let s2 = guard.as_mut().ok_or(Error::Denied)?;
        if !nothing_mapped(s2, ipa, size) {
            return Err(Error::InvalidParameters);
        }
        map_segments(s2, ipa, segments, perms.borrowed_attributes()).map_err(Error::from_mmu)?;
        drop(guard);
        self.live[i].state = State::Retrieved { ipa, perms };
        log::info!(
            "VM {} retrieves handle {handle} from VM {}: {} page(s) at IPA {ipa:#x} ({perms})",
            receiver.desc.name,
            owner.desc.name,
            t.pages
        );
        Ok(())
    }

    fn relinquish<S: Stage2Table>(&mut self, receiver: &Vm<S>, handle: u64) -> Result<(), Error> {
        let i = self.index(handle, receiver.id)?;
        let t = self.live[i];
        let State::Retrieved { ipa, .. } = t.state else {
            return Err(Error::Denied);
        };
        if t.receiver != receiver.id {
            return Err(Error::Denied);
        }
        Self::unmap_borrowed(receiver, ipa, t.size())?;
        self.live[i].state = State::Pending;
        log::info!(
            "VM {} relinquishes handle {handle}: {} page(s) at IPA {ipa:#x} unmapped",
            receiver.desc.name,
            t.pages
        );
        Ok(())
    }

    /// Removes a receiver's borrowed mapping, with the TLB invalidation for its VMID
    /// (`mmu`, before this returns). 4 KiB pages: nothing to split, so it cannot run out
    /// of frames; an error still leaves the table as it was.
    fn unmap_borrowed<S: Stage2Table>(receiver: &Vm<S>, ipa: u64, size: u64) -> Result<(), Error> {
        let mut guard = receiver.stage2.lock();
        let s2 = guard.as_mut().ok_or(Error::Denied)?;
        s2.unmap(ipa, size).map_err(Error::from_mmu)
    }

    fn reclaim<S: Stage2Table>(&mut self, owner: &Vm<S>, handle: u64) -> Result<(), Error> {
        let i = self.index(handle, owner.id)?;
        let t = self.live[i];
        if t.owner != owner.id || t.state != State::Pending {
            return Err(Error::Denied);
        }
        Self::restore_owner(owner, &t)?;
        self.live.remove(i);
        log::info!(
            "VM {} reclaims handle {handle}: {} page(s) at IPA {:#x} are its own again",
            owner.desc.name,
            t.pages,
            t.ipa
        );
        Ok(())
    }

    /// Gives the pages of pending transaction `t` back to its owner: software bits back
    /// to owned, or lent pages mapped again.
    fn restore_owner<S: Stage2Table>(owner: &Vm<S>, t: &Transaction) -> Result<(), Error> {
        let segments = ram_segments(&owner.desc, t.ipa, t.size())?;
        let mut guard = owner.stage2.lock();
        let s2 = guard.as_mut().ok_or(Error::Denied)?;
        match t.kind {
            // The blocks were split when the pages were shared: nothing to split now;
            // a table made uniform again goes back to a block (frees frames, never
            // needs one).
            Kind::Share => s2
                .set_sw(t.ipa, t.size(), PageState::Owned.sw())
                .and_then(|()| s2.coalesce(t.ipa, t.size())),
            // Tables freed by the lend may have to be allocated again; `map` merges.
            Kind::Lend => map_back(s2, segments),
        }
        .map_err(Error::from_mmu)
    }

    fn query(&self, caller: u32, handle: u64) -> Result<Transaction, Error> {
        let t = if handle == 0 {
            self.live
                .iter()
                .find(|t| t.receiver == caller && t.state == State::Pending)
                .ok_or(Error::NoData)?
        } else {
            &self.live[self.index(handle, caller)?]
        };
        Ok(*t)
    }

    /// Ends `vm`'s part in every transaction before it is reset or destroyed
    /// (`docs/hypercalls.md`): as receiver, its borrowed mappings are removed (the
    /// transaction is pending again); as owner, each receiver's mapping is removed with
    /// its TLB invalidation, the pages return to `vm`, and the transaction ends. `vms`
    /// holds the other live VMs.
    pub fn end_all<S: Stage2Table>(&mut self, vms: &[Arc<Vm<S>>], vm: &Vm<S>) {
        for t in &mut self.live {
            if t.receiver != vm.id {
                continue;
            }
            if let State::Retrieved { ipa, .. } = t.state {
                match Self::unmap_borrowed(vm, ipa, t.size()) {
                    Ok(()) => log::info!(
                        "VM {}: handle {} relinquished as the VM ends or resets",
                        vm.desc.name,
                        t.handle
                    ),
                    Err(e) => log::error!(
                        "VM {}: handle {}: borrowed pages not unmapped: {e}",
                        vm.desc.name,
                        t.handle
                    ),
                }
                t.state = State::Pending;
            }
        }
        let mut i = 0;
        while i < self.live.len() {
            let t = self.live[i];
            if t.owner != vm.id {
                i += 1;
                continue;
            }
            if let State::Retrieved { ipa, .. } = t.state {
                if let Some(receiver) = find_vm(vms, t.receiver) {
                    if let Err(e) = Self::unmap_borrowed(receiver, ipa, t.size()) {
                        log::error!(
                            "VM {}: handle {}: pages not revoked: {e}",
                            receiver.desc.name,
                            t.handle
                        );
                    }
                }
            }
            if let Err(e) = Self::restore_owner(vm, &t) {
                log::error!(
                    "VM {}: handle {}: pages not returned: {e}",
                    vm.desc.name,
                    t.handle
                );
            }
            self.live.remove(i);
            log::info!(
                "VM {}: handle {} revoked and ended as the VM ends or resets",
                vm.desc.name,
                t.handle
            );
        }
    }
}
