//! Memory sharing between VMs: the `TWOSTAGE_MEM_*` calls of `docs/hypercalls.md`
//! ("Memory sharing between VMs"), after Arm FF-A memory management (DEN 0077) with one
//! receiver per transaction and pKVM's page-state discipline.
//!
//! `abi` decodes the calls as guests make them; the [`Ledger`] (`ledger`) holds the live
//! transactions and runs the calls. Each call checks every page of its request (in the
//! stage-2 tables, whose software bits carry the page state, `page_state`) before it
//! changes anything, then commits with `mmu` operations that are themselves
//! transactional, ordered so that a failure leaves everything as it was.
//!
//! Locking: the caller holds the ledger's lock for a whole call; under it at most one VM's
//! stage-2 lock is held at a time (each party's table is edited in turn), so no order
//! between stage-2 locks is needed. The manager takes its own lock, then a VM's `psci`
//! lock, before the ledger lock, and the ledger lock before any stage-2 lock
//! (`crate::vm::VmManager`). A call allocates nothing: the transactions have room
//! reserved, and a request's RAM segments are walked in the description.

pub(crate) mod abi;
mod ledger;
mod page_state;

#[cfg(test)]
mod tests;

pub use abi::{fid, result_regs, Error, Request};
pub use ledger::{given_range, Ledger, Note};
pub use page_state::PageState;
