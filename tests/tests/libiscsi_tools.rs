//! libiscsi's command-line tools against the real daemon: INQUIRY and VPD pages, discovery
//! and LUN listing, CHAP, READ CAPACITY(16).

use std::process::Command;
use std::time::Duration;

use ironstar_interop::command::run;
use ironstar_interop::config::{Config, Lun};
use ironstar_interop::daemon::{client_lun, Daemon};
use ironstar_interop::{peers, GIB, INITIATOR_IQN, MIB, TARGET_IQN};

const T: Duration = Duration::from_secs(60);
const CHAP_USER: &str = "client";
const CHAP_SECRET: &str = "clientsecret12";

/// The value after `key` on the first line that starts with it.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.trim_start().strip_prefix(key))
}

fn inq(d: &Daemon, args: &[&str]) -> String {
    let o = run(
        Command::new("iscsi-inq")
            .args(["-i", INITIATOR_IQN])
            .args(args)
            .arg(d.lun_url(0)),
        T,
    );
    o.assert_success();
    assert!(
        !o.stdout.trim().is_empty(),
        "iscsi-inq printed nothing:\n{o}"
    );
    o.stdout.clone()
}

#[test]
fn inquiry_standard_and_every_vpd_page() {
    if !peers::require(&["iscsi-inq"]) {
        return;
    }
    let mut d = Daemon::start(&Config::single_memory_lu(GIB));

    let std_inq = inq(&d, &[]);
    assert_eq!(
        field(&std_inq, "Peripheral Qualifier:"),
        Some("CONNECTED"),
        "{std_inq}"
    );
    assert_eq!(
        field(&std_inq, "Peripheral Device Type:"),
        Some("DIRECT_ACCESS"),
        "{std_inq}"
    );
    assert_eq!(
        field(&std_inq, "Vendor:").map(str::trim),
        Some("IRONSTAR"),
        "{std_inq}"
    );
    let product = field(&std_inq, "Product:")
        .map(str::trim)
        .unwrap_or_default();
    assert!(!product.is_empty(), "empty product id:\n{std_inq}");
    assert!(
        field(&std_inq, "Revision:").is_some_and(|r| !r.trim().is_empty()),
        "{std_inq}"
    );
    assert_eq!(
        field(&std_inq, "CmdQue:"),
        Some("1"),
        "command queuing not reported:\n{std_inq}"
    );

    // Page numbers in decimal: `-c 0x80` silently shows the page list instead.
    let pages = inq(&d, &["-e", "1", "-c", "0"]);
    for p in ["0x00", "0x80", "0x83", "0xb0", "0xb1", "0xb2"] {
        assert!(
            pages.contains(&format!("Page:{p} ")),
            "supported VPD pages lack {p}:\n{pages}"
        );
    }

    let serial = inq(&d, &["-e", "1", "-c", "128"]);
    let sn = field(&serial, "Unit Serial Number:").unwrap_or_default();
    let sn = sn
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim();
    assert!(!sn.is_empty(), "empty unit serial number:\n{serial}");

    let ident = inq(&d, &["-e", "1", "-c", "131"]);
    assert!(ident.contains("DEVICE_IDENTIFICATION"), "{ident}");
    assert!(
        ident.contains("DEVICE DESIGNATOR #0"),
        "no designator:\n{ident}"
    );
    assert!(
        ident.contains("Association:(0) LOGICAL_UNIT"),
        "no LU designator:\n{ident}"
    );

    let limits = inq(&d, &["-e", "1", "-c", "176"]);
    for key in [
        "maximum transfer length:",
        "optimal transfer length granularity:",
        "maximum unmap lba count:",
    ] {
        assert!(
            field(&limits, key).is_some(),
            "block limits lack {key:?}:\n{limits}"
        );
    }

    let chars = inq(&d, &["-e", "1", "-c", "177"]);
    assert!(field(&chars, "Medium Rotation Rate:").is_some(), "{chars}");

    let prov = inq(&d, &["-e", "1", "-c", "178"]);
    for key in ["Threshold Exponent:", "lbpu:", "provisioning type:"] {
        assert!(
            field(&prov, key).is_some(),
            "provisioning page lacks {key:?}:\n{prov}"
        );
    }
    d.assert_alive();
}

/// iscsi-ls prints `Size:NNNM`: libiscsi's arithmetic leaves out the last block, so a
/// whole-MiB LU may show one MiB less.
fn assert_listed_size(out: &str, lun: u32, size: u64, block: u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("Lun:{} ", client_lun(lun))))
        .unwrap_or_else(|| panic!("LUN {lun} not listed:\n{out}"));
    assert!(line.contains("DIRECT_ACCESS"), "{line}");
    let shown = line
        .split("Size:")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no size in {line:?}"));
    let ok = [size / MIB, (size - block) / MIB];
    assert!(
        ok.contains(&shown) && line.contains(&format!("Size:{shown}M")),
        "size {size} listed as {line:?}"
    );
}

#[test]
fn iscsi_ls_lists_the_target_and_its_lun_with_size() {
    if !peers::require(&["iscsi-ls"]) {
        return;
    }
    let size = 96 * MIB;
    let mut d = Daemon::start(&Config::single_memory_lu(size));
    let o = run(
        Command::new("iscsi-ls")
            .args(["-s", "-i", INITIATOR_IQN])
            .arg(d.portal_url()),
        T,
    );
    o.assert_success();
    let want = format!("Target:{TARGET_IQN} Portal:{},1", d.portal());
    assert!(o.stdout.lines().any(|l| l == want), "want {want:?}:\n{o}");
    assert_listed_size(&o.stdout, 0, size, 512);
    d.assert_alive();
}

#[test]
fn chap_logs_in_with_the_right_secret_only() {
    if !peers::require(&["iscsi-ls", "iscsi-inq"]) {
        return;
    }
    let size = 128 * MIB;
    let mut d = Daemon::start(&Config::single_memory_lu(size).with_chap(CHAP_USER, CHAP_SECRET));
    let ls = |user_secret: Option<(&str, &str)>| {
        let url = match user_secret {
            Some((u, s)) => format!("iscsi://{u}%{s}@{}", d.portal()),
            None => d.portal_url(),
        };
        run(
            Command::new("iscsi-ls")
                .args(["-s", "-i", INITIATOR_IQN])
                .arg(url),
            T,
        )
    };

    let good = ls(Some((CHAP_USER, CHAP_SECRET)));
    good.assert_success();
    assert_listed_size(&good.stdout, 0, size, 512);

    let wrong = ls(Some((CHAP_USER, "wrongsecret123")));
    wrong.assert_failure();
    assert!(
        !wrong.stdout.contains("DIRECT_ACCESS"),
        "LUN listed with a wrong secret:\n{wrong}"
    );

    let none = ls(None);
    none.assert_failure();
    assert!(
        !none.stdout.contains("DIRECT_ACCESS"),
        "LUN listed without CHAP:\n{none}"
    );

    // A normal session straight to the LU, as a block client would open it.
    let inq = |secret: &str| {
        run(
            Command::new("iscsi-inq")
                .args(["-i", INITIATOR_IQN])
                .arg(d.lun_url_chap(CHAP_USER, secret, 0)),
            T,
        )
    };
    let ok = inq(CHAP_SECRET);
    ok.assert_success();
    assert!(ok.stdout.contains("Vendor:IRONSTAR"), "{ok}");
    inq("wrongsecret123").assert_failure();
    d.assert_alive();
}

#[test]
fn readcapacity16_reports_the_configured_geometry() {
    if !peers::require(&["iscsi-readcapacity16"]) {
        return;
    }
    let mut cfg = Config::single_memory_lu(256 * MIB);
    cfg.targets[0].luns.push(Lun {
        block_size: 4096,
        ..Lun::memory(1, 64 * MIB)
    });
    let mut d = Daemon::start(&cfg);
    for (lun, size, block) in [(0u32, 256 * MIB, 512u64), (1, 64 * MIB, 4096)] {
        let o = run(
            Command::new("iscsi-readcapacity16")
                .args(["-i", INITIATOR_IQN])
                .arg(d.lun_url(lun)),
            T,
        );
        o.assert_success();
        let num = |key: &str| field(&o.stdout, key).and_then(|v| v.trim().parse::<u64>().ok());
        assert_eq!(num("Total size:"), Some(size), "LUN {lun}:\n{o}");
        assert_eq!(
            num("LOGICAL BLOCK LENGTH IN BYTES:"),
            Some(block),
            "LUN {lun}:\n{o}"
        );
        assert_eq!(
            num("RETURNED LOGICAL BLOCK ADDRESS:"),
            Some(size / block - 1),
            "LUN {lun}:\n{o}"
        );
    }
    d.assert_alive();
}
