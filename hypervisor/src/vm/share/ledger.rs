//! The ledger of live transactions, and the calls that move pages between VMs: check
//! every page of a request first, then commit with `mmu` operations that are themselves
//! transactional, ordered so that a failure leaves everything as it was.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use super::abi::{Error, Kind, Perms, Request, MAX_PAGES};

use super::page_state::{all_in_state, nothing_mapped, PageState};
use crate::config::{SharingLimits, VmDesc};
use crate::mem::{Ipa, IpaRange, PhysAddr, PAGE_SIZE};
use crate::vm::vuart::LineSink;
use crate::vm::{S2Kind, Stage2Table, Vm, VmStatus, IPA_BITS};

/// A VM name copied out of its description, for a log line printed after the locks a
/// call ran under are released (VM names are at most 32 bytes, `docs/vms.md`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Name {
    bytes: [u8; 32],
    len: u8,
}

impl Name {
    fn of(name: &str) -> Self {
        let mut bytes = [0; 32];
        let mut len = 0u8;
        for (d, s) in bytes.iter_mut().zip(name.as_bytes()) {
            *d = *s;
            // At most 32 of them (`bytes`' length).
            len = len.saturating_add(1);
        }
        Self { bytes, len }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self
            .bytes
            .get(..usize::from(self.len))
            .and_then(|s| core::str::from_utf8(s).ok());
        f.write_str(s.unwrap_or("?"))
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// What a successful call did, for its log line ([`Note::log`]), which the caller prints
/// once every lock is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Note {
    /// Nothing to say (a failed call, or `QUERY`).
    None,
    /// `SHARE`/`LEND` made a transaction.
    Gave {
        /// The transaction.
        t: Transaction,
        /// Receiver's name.
        receiver: Name,
    },
    /// `RETRIEVE` mapped a transaction's pages into the caller.
    Retrieved {
        /// The transaction, retrieved.
        t: Transaction,
        /// Owner's name.
        owner: Name,
    },
    /// `RELINQUISH` unmapped them again.
    Relinquished {
        /// The transaction (pending again).
        t: Transaction,
        /// Where they were mapped.
        ipa: Ipa,
    },
    /// `RECLAIM` ended a transaction.
    Reclaimed {
        /// The ended transaction.
        t: Transaction,
    },
}

impl Note {
    /// Logs what the call `req` of `caller` did (x0 = `status`) through `sink`, within the
    /// VM's budget of lines about it ([`Vm::log`]): an info line for a change, a debug
    /// line for a failure.
    pub fn log<S>(&self, caller: &Vm<S>, sink: &mut impl LineSink, req: &Request, status: u64) {
        let name = &caller.desc.name;
        let info = log::Level::Info;
        match *self {
            Self::None => {
                if status != 0 && log::log_enabled!(log::Level::Debug) {
                    caller.log(
                        sink,
                        log::Level::Debug,
                        format_args!("VM {name}: {req:x?} failed: {}", status as i64),
                    );
                }
            }
            Self::Gave { t, receiver } => caller.log(
                sink,
                info,
                format_args!(
                    "VM {name} {} {} page(s) at IPA {:#x} with VM {receiver} ({}): handle {}",
                    match t.kind {
                        Kind::Share => "shares",
                        Kind::Lend => "lends",
                    },
                    t.pages,
                    t.ipa,
                    t.perms,
                    t.handle
                ),
            ),
            Self::Retrieved { t, owner } => {
                if let State::Retrieved { ipa, perms } = t.state {
                    caller.log(
                        sink,
                        info,
                        format_args!(
                            "VM {name} retrieves handle {} from VM {owner}: {} page(s) at IPA \
                             {ipa:#x} ({perms})",
                            t.handle, t.pages
                        ),
                    );
                }
            }
            Self::Relinquished { t, ipa } => caller.log(
                sink,
                info,
                format_args!(
                    "VM {name} relinquishes handle {}: {} page(s) at IPA {ipa:#x} unmapped",
                    t.handle, t.pages
                ),
            ),
            Self::Reclaimed { t } => caller.log(
                sink,
                info,
                format_args!(
                    "VM {name} reclaims handle {}: {} page(s) at IPA {:#x} are its own again",
                    t.handle, t.pages, t.ipa
                ),
            ),
        }
    }
}

/// What [`Ledger::end_all`] did, logged by the caller once its locks are released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ended {
    /// Borrowed mappings of the VM removed (its transactions pending again).
    pub relinquished: usize,
    /// Transactions it owned that ended (revoked from their receiver if retrieved).
    pub revoked: usize,
    /// Operations that failed (pages left mapped or not returned); never expected.
    pub failed: usize,
    /// Handle of the last transaction revoked.
    pub last_revoked: u64,
}

impl Ended {
    /// Logs the summary for VM `name` (nothing if nothing ended).
    pub fn log(&self, name: &str) {
        if self.relinquished > 0 {
            log::info!(
                "VM {name}: {} borrowed mapping(s) relinquished as the VM ends or resets",
                self.relinquished
            );
        }
        if self.revoked > 0 {
            log::info!(
                "VM {name}: {} transaction(s) revoked and ended as the VM ends or resets \
                 (last handle {})",
                self.revoked,
                self.last_revoked
            );
        }
        if self.failed > 0 {
            log::error!(
                "VM {name}: {} memory-sharing operation(s) failed as the VM ended",
                self.failed
            );
        }
    }
}

/// Where a transaction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Created, or relinquished: the receiver has no mapping.
    Pending,
    /// Mapped into the receiver.
    Retrieved {
        /// Receiver IPA of the first page.
        ipa: Ipa,
        /// Permissions of the receiver's mapping.
        perms: Perms,
    },
}

/// One live transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Its handle (non-zero, never reused): owner id \[63:48\], receiver id \[47:32\],
    /// and the count of transactions that owner made with that receiver \[31:0\], so it
    /// tells either party nothing it does not know (no other VM's activity).
    pub handle: u64,
    /// Share or lend.
    pub kind: Kind,
    /// Owner VM id.
    pub owner: u32,
    /// Receiver VM id.
    pub receiver: u32,
    /// Owner IPA of the first page.
    pub ipa: Ipa,
    /// Number of 4 KiB pages.
    pub pages: u64,
    /// Permissions the owner granted.
    pub perms: Perms,
    /// Pending or retrieved.
    pub state: State,
}

impl Transaction {
    /// Whether `handle` names this transaction for `caller` (its owner or receiver).
    fn named(&self, handle: u64, caller: u32) -> bool {
        handle != 0 && self.handle == handle && (self.owner == caller || self.receiver == caller)
    }

    /// Bytes: `pages` was checked at `SHARE`/`LEND` ([`ipa_range`]: at most
    /// [`MAX_PAGES`]), so the product cannot saturate.
    fn size(&self) -> u64 {
        self.pages.saturating_mul(PAGE_SIZE)
    }

    /// The owner's pages it covers.
    fn ipa_range(&self) -> IpaRange {
        IpaRange::new(self.ipa, self.size())
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
fn ipa_range(ipa: Ipa, pages: u64) -> Result<u64, Error> {
    if !ipa.is_aligned(PAGE_SIZE) || pages == 0 || pages > MAX_PAGES {
        return Err(Error::InvalidParameters);
    }
    let size = pages
        .checked_mul(PAGE_SIZE)
        .ok_or(Error::InvalidParameters)?;
    match ipa.checked_add(size) {
        Some(end) if end.get() <= 1 << IPA_BITS => Ok(size),
        _ => Err(Error::InvalidParameters),
    }
}

/// One piece of a request that lies in a single RAM region: IPA, PA, bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    ipa: Ipa,
    pa: PhysAddr,
    size: u64,
}

/// The pieces of `[ipa, ipa + size)` of a VM's RAM, cut at region boundaries: an
/// iterator over the description (a call allocates nothing), made by [`ram_segments`].
#[derive(Clone)]
struct Segments<'a> {
    desc: &'a VmDesc,
    at: Ipa,
    end: Ipa,
}

impl Iterator for Segments<'_> {
    type Item = Segment;

    fn next(&mut self) -> Option<Segment> {
        if self.at >= self.end {
            return None;
        }
        let r = self.desc.ram_region(self.at, PAGE_SIZE)?;
        // `r` holds the page at `at`; a region whose addresses would wrap (which the
        // description's checks refuse) ends the walk short, and `ram_segments` denies.
        let region_end = r.ipa.checked_add(r.size)?;
        let size = region_end.min(self.end).checked_offset_from(self.at)?;
        let s = Segment {
            ipa: self.at,
            pa: r.pa_of(self.at, size)?,
            size,
        };
        self.at = self.at.checked_add(s.size)?;
        Some(s)
    }
}

/// `[ipa, ipa + size)` of `desc`'s RAM, cut at region boundaries, or [`Error::Denied`]
/// if some page of it is not RAM of the VM.
fn ram_segments(desc: &VmDesc, ipa: Ipa, size: u64) -> Result<Segments<'_>, Error> {
    let segments = Segments {
        desc,
        at: ipa,
        end: ipa.checked_add(size).ok_or(Error::InvalidParameters)?,
    };
    if segments.clone().map(|s| s.size).sum::<u64>() == size {
        Ok(segments)
    } else {
        Err(Error::Denied)
    }
}

/// The size of what `SHARE`/`LEND` of `pages` pages at `ipa` would give from `desc`'s
/// RAM, checked as the call checks it (page-aligned, at most `MAX_PAGES`, inside the
/// VM's RAM), so that it can be made ready before the call
/// (`crate::vm::VmManager::share_call`).
///
/// # Errors
///
/// The error the call would return.
pub fn given_range(desc: &VmDesc, ipa: Ipa, pages: u64) -> Result<u64, Error> {
    let size = ipa_range(ipa, pages)?;
    ram_segments(desc, ipa, size)?;
    Ok(size)
}

/// Whether `[ipa, ipa + size)` of the receiver `desc` is free: no RAM, pass-through
/// range or emulated device (virtual UART, virtual GIC) in it. A mapping over an
/// emulated device would take its accesses away from the emulation.
fn ipa_free(desc: &VmDesc, ipa: Ipa, size: u64) -> bool {
    let range = IpaRange::new(ipa, size);
    !desc
        .memory
        .iter()
        .chain(desc.passthrough.iter())
        .map(crate::config::GuestRegion::ipa_range)
        .chain(desc.emulated_ranges().map(|(_, r)| r))
        .any(|r| r.overlaps(&range))
}

/// Maps `segments` of the owner at `ipa` in `s2` with `attrs`, in 4 KiB pages; undoes
/// what it mapped if a later segment fails.
fn map_segments<S: Stage2Table>(
    s2: &mut S,
    ipa: Ipa,
    segments: Segments<'_>,
    attrs: mmu::Attributes,
) -> Result<(), mmu::Error> {
    // Where segment `s` goes: as far from `ipa` as it is from the first segment.
    let base = segments.at;
    let at = |s: &Segment| {
        s.ipa
            .checked_offset_from(base)
            .and_then(|offset| ipa.checked_add(offset))
    };
    for (i, s) in segments.clone().enumerate() {
        let mapped = at(&s)
            .ok_or(mmu::Error::OutOfRange)
            .and_then(|to| s2.map_pages(to, s.pa, s.size, attrs));
        if let Err(e) = mapped {
            for done in segments.take(i) {
                // Unmapping 4 KiB pages just mapped splits nothing: it cannot fail.
                if let Some(to) = at(&done) {
                    let _ = s2.unmap(to, done.size);
                }
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

/// Merges back into blocks the whole 2 MiB chunks of `desc`'s RAM (`crate::vm::ram`) that
/// `[ipa, ipa + size)` touches, each alone: a block never spans two chunks (two RAM
/// regions can share a 2 MiB window), so a chunk's access is later changed without a
/// split. Best effort: a merge frees frames and needs none, and a range left in pages is
/// still right.
fn coalesce_chunks<S: Stage2Table>(s2: &mut S, desc: &VmDesc, ipa: Ipa, size: u64) {
    for (_, c) in crate::vm::ram::chunks_in(desc, ipa, size) {
        if c.size == crate::vm::ram::CHUNK {
            let _ = s2.coalesce(c.ipa, c.size);
        }
    }
}

fn find_vm<S>(vms: &[Arc<Vm<S>>], id: u32) -> Option<&Vm<S>> {
    vms.iter().find(|v| v.id == id).map(|v| &**v)
}

/// A VM as a party to transactions: its limits, and the last handle number it used
/// with each receiver.
#[derive(Debug)]
struct Party {
    id: u32,
    limits: SharingLimits,
    /// Live transactions it owns.
    owned: u32,
    /// `sequence[r]`: transactions made so far with receiver VM id `r`.
    sequence: Vec<u32>,
}

/// The live transactions, and the calls that make and end them.
#[derive(Debug, Default)]
pub struct Ledger {
    live: Vec<Transaction>,
    parties: Vec<Party>,
}

/// Highest VM id a handle can name (16 bits each for owner and receiver).
const MAX_PARTY_ID: u32 = 0xffff;

impl Ledger {
    /// No transactions and no parties.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers VM `id` (before it runs) with its `limits`. Room for the transactions it
    /// may own is reserved now, so a call never allocates: the table can hold every
    /// party's quota at once, and no VM can take another's room.
    pub fn add_party(&mut self, id: u32, limits: SharingLimits) {
        // One sequence per possible receiver: VM ids are dense, from 0 in creation order.
        let width = self
            .parties
            .iter()
            .map(|p| p.sequence.len())
            .max()
            .unwrap_or(0)
            // At most `MAX_PARTY_ID + 1`: the sum is exact.
            .max((id.min(MAX_PARTY_ID) as usize).saturating_add(1));
        for p in &mut self.parties {
            p.sequence.resize(width, 0);
        }
        self.live.reserve(limits.owned as usize);
        self.parties.push(Party {
            id,
            limits,
            owned: 0,
            sequence: alloc::vec![0; width],
        });
    }

    /// Forgets VM `id` (destroyed; its transactions were ended by [`Self::end_all`]).
    pub fn remove_party(&mut self, id: u32) {
        self.parties.retain(|p| p.id != id);
    }

    fn party(&self, id: u32) -> Option<&Party> {
        self.parties.iter().find(|p| p.id == id)
    }

    fn party_mut(&mut self, id: u32) -> Option<&mut Party> {
        self.parties.iter_mut().find(|p| p.id == id)
    }

    /// The handle the next transaction of `owner` with `receiver` gets (not taken yet),
    /// and its sequence number.
    fn next_handle(&self, owner: u32, receiver: u32) -> Result<(u64, u32), Error> {
        if owner > MAX_PARTY_ID || receiver > MAX_PARTY_ID {
            return Err(Error::NoMemory);
        }
        let p = self.party(owner).ok_or(Error::Denied)?;
        let seq = p
            .sequence
            .get(receiver as usize)
            .ok_or(Error::Denied)?
            .checked_add(1)
            .ok_or(Error::NoMemory)?;
        let handle = (u64::from(owner) << 48) | (u64::from(receiver) << 32) | u64::from(seq);
        Ok((handle, seq))
    }

    /// The live transactions, oldest first.
    #[cfg(any(test, feature = "fuzzing"))]
    #[must_use]
    pub fn transactions(&self) -> &[Transaction] {
        &self.live
    }

    /// The transaction with `handle`, if `caller` is its owner or receiver: to any
    /// other VM a handle does not exist (it cannot probe which handles are live).
    fn get(&self, handle: u64, caller: u32) -> Result<&Transaction, Error> {
        self.live
            .iter()
            .find(|t| t.named(handle, caller))
            .ok_or(Error::InvalidParameters)
    }

    /// [`Self::get`], to change it.
    fn get_mut(&mut self, handle: u64, caller: u32) -> Result<&mut Transaction, Error> {
        self.live
            .iter_mut()
            .find(|t| t.named(handle, caller))
            .ok_or(Error::InvalidParameters)
    }

    /// Runs one call by `caller` (a live, running VM); `vms` are the live VMs (the
    /// caller among them). Returns x1..x3 on success, and what to log ([`Note::log`]) once
    /// the caller's locks are released.
    ///
    /// # Errors
    ///
    /// The [`Error`] the ABI defines for the request; nothing changed then.
    pub fn call<S: Stage2Table>(
        &mut self,
        vms: &[Arc<Vm<S>>],
        caller: &Vm<S>,
        req: Request,
    ) -> (Result<[u64; 3], Error>, Note) {
        let r = match req {
            Request::Give {
                kind,
                ipa,
                pages,
                receiver,
                perms,
            } => self
                .give(vms, caller, kind, ipa, pages, receiver, perms)
                .map(|(t, receiver)| ([t.handle, 0, 0], Note::Gave { t, receiver })),
            Request::Retrieve { handle, ipa, perms } => self
                .retrieve(vms, caller, handle, ipa, perms)
                .map(|(t, owner)| ([0; 3], Note::Retrieved { t, owner })),
            Request::Relinquish { handle } => self
                .relinquish(caller, handle)
                .map(|(t, ipa)| ([0; 3], Note::Relinquished { t, ipa })),
            Request::Reclaim { handle } => self
                .reclaim(caller, handle)
                .map(|t| ([0; 3], Note::Reclaimed { t })),
            Request::Query { handle, owner } => self
                .query(caller.id, handle, owner)
                .map(|t| ([t.handle, t.packed(), t.pages], Note::None)),
        };
        match r {
            Ok((regs, note)) => (Ok(regs), note),
            Err(e) => (Err(e), Note::None),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn give<S: Stage2Table>(
        &mut self,
        vms: &[Arc<Vm<S>>],
        owner: &Vm<S>,
        kind: Kind,
        ipa: Ipa,
        pages: u64,
        receiver: u64,
        perms: u64,
    ) -> Result<(Transaction, Name), Error> {
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
            .any(|t| t.owner == owner.id && t.ipa_range().overlaps(&IpaRange::new(ipa, size)))
        {
            return Err(Error::Denied);
        }
        let party = self.party(owner.id).ok_or(Error::Denied)?;
        if party.owned >= party.limits.owned {
            return Err(Error::NoMemory);
        }
        let inbox = self
            .party(receiver.id)
            .ok_or(Error::Denied)?
            .limits
            .received;
        let from_owner = self
            .live
            .iter()
            .filter(|t| t.owner == owner.id && t.receiver == receiver.id)
            .count();
        if from_owner >= inbox as usize {
            return Err(Error::Busy);
        }
        let (handle, seq) = self.next_handle(owner.id, receiver.id)?;
        let mut guard = owner.stage2.lock();
        let s2 = guard.as_mut().ok_or(Error::Denied)?;
        if !all_in_state(s2, ipa, size, PageState::Owned) {
            return Err(Error::Denied);
        }
        match kind {
            // May split a block (and fail, changing nothing); no TLB maintenance: the
            // hardware ignores the software bits.
            Kind::Share => s2.set_sw(ipa, size, PageState::SharedOwned.sw()),
            // The owner's TLB entries for the range are invalidated (its VMID) by `mmu`.
            Kind::Lend => s2.unmap(ipa, size),
        }
        .map_err(Error::from_mmu)?;
        drop(guard);
        if let Some(p) = self.party_mut(owner.id) {
            // Below `limits.owned` (checked above): the sum is exact.
            p.owned = p.owned.saturating_add(1);
            if let Some(s) = p.sequence.get_mut(receiver.id as usize) {
                *s = seq;
            }
        }
        let t = Transaction {
            handle,
            kind,
            owner: owner.id,
            receiver: receiver.id,
            ipa,
            pages,
            perms,
            state: State::Pending,
        };
        // The owner's quota was reserved in `add_party` and checked above: no allocation.
        self.live.push(t);
        Ok((t, Name::of(&receiver.desc.name)))
    }

    fn retrieve<S: Stage2Table>(
        &mut self,
        vms: &[Arc<Vm<S>>],
        receiver: &Vm<S>,
        handle: u64,
        ipa: Ipa,
        perms: u64,
    ) -> Result<(Transaction, Name), Error> {
        let t = self.get_mut(handle, receiver.id)?;
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
        t.state = State::Retrieved { ipa, perms };
        Ok((*t, Name::of(&owner.desc.name)))
    }

    fn relinquish<S: Stage2Table>(
        &mut self,
        receiver: &Vm<S>,
        handle: u64,
    ) -> Result<(Transaction, Ipa), Error> {
        let t = self.get_mut(handle, receiver.id)?;
        let State::Retrieved { ipa, .. } = t.state else {
            return Err(Error::Denied);
        };
        if t.receiver != receiver.id {
            return Err(Error::Denied);
        }
        Self::unmap_borrowed(receiver, ipa, t.size())?;
        t.state = State::Pending;
        Ok((*t, ipa))
    }

    /// Removes a receiver's borrowed mapping, with the TLB invalidation for its VMID
    /// (`mmu`, before this returns). 4 KiB pages: nothing to split, so it cannot run out
    /// of frames; an error still leaves the table as it was.
    fn unmap_borrowed<S: Stage2Table>(receiver: &Vm<S>, ipa: Ipa, size: u64) -> Result<(), Error> {
        let mut guard = receiver.stage2.lock();
        let s2 = guard.as_mut().ok_or(Error::Denied)?;
        s2.unmap(ipa, size).map_err(Error::from_mmu)
    }

    fn reclaim<S: Stage2Table>(
        &mut self,
        owner: &Vm<S>,
        handle: u64,
    ) -> Result<Transaction, Error> {
        let t = *self.get(handle, owner.id)?;
        if t.owner != owner.id || t.state != State::Pending {
            return Err(Error::Denied);
        }
        Self::restore_owner(owner, &t)?;
        self.end(&t);
        Ok(t)
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
            Kind::Share => s2.set_sw(t.ipa, t.size(), PageState::Owned.sw()),
            // Tables freed by the lend may have to be allocated again; `map` does not
            // merge (`Stage2Table::map`), so a table made uniform again goes back to a
            // block below, as for a share.
            Kind::Lend => map_back(s2, segments),
        }
        .map_err(Error::from_mmu)?;
        coalesce_chunks(s2, &owner.desc, t.ipa, t.size());
        Ok(())
    }

    /// Removes live transaction `t` and gives its owner the room back.
    fn end(&mut self, t: &Transaction) {
        // Handles are unique: this removes `t` alone.
        self.live.retain(|l| l.handle != t.handle);
        if let Some(p) = self.party_mut(t.owner) {
            p.owned = p.owned.saturating_sub(1);
        }
    }

    fn query(&self, caller: u32, handle: u64, owner: u64) -> Result<Transaction, Error> {
        let t = if handle == 0 {
            // Only what `owner` sent: other VMs' transactions to the caller cannot hide it.
            self.live
                .iter()
                .find(|t| {
                    t.receiver == caller && u64::from(t.owner) == owner && t.state == State::Pending
                })
                .ok_or(Error::NoData)?
        } else {
            self.get(handle, caller)?
        };
        Ok(*t)
    }

    /// Ends `vm`'s part in every transaction before it is reset or destroyed
    /// (`docs/hypercalls.md`): as receiver, its borrowed mappings are removed (the
    /// transaction is pending again); as owner, each receiver's mapping is removed with
    /// its TLB invalidation, the pages return to `vm`, and the transaction ends. `vms`
    /// holds the other live VMs. Returns what ended, for the caller to log.
    pub fn end_all<S: Stage2Table>(&mut self, vms: &[Arc<Vm<S>>], vm: &Vm<S>) -> Ended {
        let mut ended = Ended::default();
        for t in &mut self.live {
            if t.receiver != vm.id {
                continue;
            }
            if let State::Retrieved { ipa, .. } = t.state {
                match Self::unmap_borrowed(vm, ipa, t.size()) {
                    Ok(()) => ended.relinquished = ended.relinquished.saturating_add(1),
                    Err(_) => ended.failed = ended.failed.saturating_add(1),
                }
                t.state = State::Pending;
            }
        }
        // The counts are at most the number of live transactions: the sums are exact.
        let Self { live, parties } = self;
        live.retain(|t| {
            if t.owner != vm.id {
                return true;
            }
            if let State::Retrieved { ipa, .. } = t.state {
                if let Some(receiver) = find_vm(vms, t.receiver) {
                    if Self::unmap_borrowed(receiver, ipa, t.size()).is_err() {
                        ended.failed = ended.failed.saturating_add(1);
                    }
                }
            }
            if Self::restore_owner(vm, t).is_err() {
                ended.failed = ended.failed.saturating_add(1);
            }
            if let Some(p) = parties.iter_mut().find(|p| p.id == t.owner) {
                p.owned = p.owned.saturating_sub(1);
            }
            ended.revoked = ended.revoked.saturating_add(1);
            ended.last_revoked = t.handle;
            false
        });
        ended
    }
}
