//! VMSAv8-64 translation tables (4 KiB granule) for EL2 stage 1, stage 2 and EL1&0 stage 1.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
