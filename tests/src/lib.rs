//! Harness for the QEMU integration tests.
