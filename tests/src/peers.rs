//! Finding the third-party tools the tests drive. A missing tool skips its test on a
//! developer's machine, but fails it under CI (`CI=true`) or with `IRONSTAR_REQUIRE_PEERS=1`,
//! so a broken install can never turn the interop suite green by skipping it.

use std::env;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// True when missing peers must fail tests instead of skipping them.
pub fn strict() -> bool {
    let on = |k: &str| env::var(k).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes"));
    on("CI") || on("IRONSTAR_REQUIRE_PEERS")
}

/// The full path of `tool` on `PATH`, if any.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// True if every tool is on `PATH`. Otherwise returns false after saying which are missing
/// (the caller then returns early: a skip), or panics when [`strict`].
pub fn require(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    missing_is_fine(&missing.join(", "))
}

/// True if qemu-img is there and has its iSCSI driver (from the package qemu-block-extra,
/// which must be the exact version of qemu-utils); else as [`require`].
pub fn require_qemu_iscsi() -> bool {
    if !require(&["qemu-img"]) {
        return false;
    }
    // Without the module qemu-img says "Unknown protocol 'iscsi'"; with it, opening a closed
    // port fails with the driver's own message.
    let probe = Command::new("qemu-img")
        .args(["info", "iscsi://127.0.0.1:1/iqn.2000-01.invalid:probe/0"])
        .stdin(Stdio::null())
        .output();
    let has_iscsi = probe.is_ok_and(|o| {
        let err = String::from_utf8_lossy(&o.stderr);
        !err.contains("Unknown protocol") && !err.contains("Unknown driver")
    });
    if has_iscsi {
        true
    } else {
        missing_is_fine("qemu-img's iscsi driver (qemu-block-extra at the version of qemu-utils)")
    }
}

fn missing_is_fine(missing: &str) -> bool {
    if missing.is_empty() {
        return true;
    }
    let msg = format!("peer tool(s) missing: {missing}; install them with `sudo bash scripts/install-test-deps.sh`");
    if strict() {
        panic!("{msg} (CI=true or IRONSTAR_REQUIRE_PEERS=1: missing peers fail the test)");
    }
    eprintln!("SKIPPED: {msg}");
    false
}
