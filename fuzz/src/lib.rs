//! Harnesses for Ironstar's cargo-fuzz targets (see `fuzz/README.md`).
//!
//! Each `fuzz_targets/*.rs` is a one-line call into a function here, so the
//! harness logic can be read (and reused by a reproducer) in one place. The
//! input layouts are in [`format`]. A harness panics only when the code under
//! test broke an invariant: a panic inside the code under test, or a result
//! that contradicts another path (split vs whole stream, encode/decode).

pub mod config;
pub mod format;
pub mod isns;
pub mod login;
pub mod pdu;
pub mod rpc;
pub mod scsi;
