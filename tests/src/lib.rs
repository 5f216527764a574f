//! Support for Ironstar's interop tests: the real `iscsitd` binary, started from a
//! config file written per test, driven by real third-party clients (libiscsi's tools,
//! qemu-img's iSCSI driver, the iscsi-test-cu compliance suite).
//!
//! The tests live in `tests/tests/*.rs`; this library gives them:
//! - [`config`]: the daemon's TOML config, built in code;
//! - [`daemon`]: start `iscsitd` on a free loopback port, wait until it accepts, stop it on drop
//!   and show its log when the test failed;
//! - [`command`]: run an external tool with a timeout and capture its output;
//! - [`peers`]: find a peer tool, and decide whether its absence skips or fails a test;
//! - [`cunit`]: read iscsi-test-cu's CUnit output into per-test outcomes;
//! - [`raw`]: a raw-PDU client for the hostile-initiator tests.

pub mod command;
pub mod config;
pub mod cunit;
pub mod daemon;
pub mod peers;
pub mod raw;

/// The IQN of the target the tests configure (the daemon's default one too).
pub const TARGET_IQN: &str = "iqn.2026-11.dev.ironstar:target0";
/// The initiator name the tests log in with, and the one CHAP credentials are kept under.
pub const INITIATOR_IQN: &str = "iqn.2026-11.dev.ironstar:client";
/// A second initiator name, for tests that need two I_T nexuses.
pub const INITIATOR2_IQN: &str = "iqn.2026-11.dev.ironstar:client2";

pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;
