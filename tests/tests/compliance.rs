//! libiscsi's compliance suite, `iscsi-test-cu --dataloss --allow-sanitize --test=ALL` (SCSI + iSCSI
//! families, 230 tests in libiscsi 1.19), against a fresh daemon with a 1 GiB memory LU.
//!
//! CUnit counts a skipped test as passed, so outcomes are counted from the output
//! (`ironstar_interop::cunit`). The per-suite table is written to
//! `<target dir>/interop/iscsi-test-cu-summary.txt` (and the raw output beside it), which
//! `scripts/test.sh` prints at the end of a run.
//!
//! Options that matter: `--dataloss` (allows the write tests), `-i`/`-I` two initiator names
//! (the reservation and multi-nexus tests log in as both). The `--test` regexp defaults to
//! ALL; set IRONSTAR_CU_TESTS=FAMILY[.SUITE[.TEST]] to run fewer while working on a gap.
//!
//! Reference: tgt 1.0.85 with a 1 GiB LU backed by a file on /dev/shm, run through this
//! very test with `scripts/tgt-as-iscsitd.sh` (see there) on 2 cores, 23 s: 160 passed,
//! 8 failed, 62 skipped of 230. Its failures: GetLBAStatus.BeyondEol,
//! PrinServiceactionRange.Range, ProutReserve.Ownership{EA,WE,EARO,WERO},
//! Reserve6.2Initiators, iSCSIdatasn.iSCSIDataSnInvalid. Per suite:
//! ```text
//! suite                              pass   fail   skip
//! CompareAndWrite                       0      0      5
//! ExtendedCopy                          0      0      6
//! GetLBAStatus                          1      1      1
//! Inquiry                               6      0      1
//! Mandatory                             1      0      0
//! ModeSense6                            5      0      0
//! NoMedia                               1      0      0
//! OrWrite                               6      0      0
//! Prefetch10                            4      0      0
//! Prefetch16                            4      0      0
//! PreventAllow                          0      0      8
//! PrinReadKeys                          2      0      0
//! PrinServiceactionRange                0      1      0
//! PrinReportCapabilities                1      0      0
//! ProutRegister                         1      0      0
//! ProutReserve                          9      4      0
//! ProutClear                            1      0      0
//! ProutPreempt                          1      0      0
//! Read6                                 2      0      0
//! Read10                                6      0      0
//! Read12                                5      0      0
//! Read16                                5      0      0
//! ReadCapacity10                        1      0      0
//! ReadCapacity16                        4      0      0
//! ReadDefectData10                      0      0      1
//! ReadDefectData12                      0      0      1
//! ReadOnly                              0      0      1
//! ReceiveCopyResults                    0      0      2
//! ReportSupportedOpcodes                3      0      1
//! Reserve6                              4      1      2
//! Sanitize                              0      0     11
//! StartStopUnit                         2      0      1
//! TestUnitReady                         1      0      0
//! Unmap                                 0      0      3
//! Verify10                              8      0      0
//! Verify12                              8      0      0
//! Verify16                              8      0      0
//! Write10                               6      0      0
//! Write12                               5      0      0
//! Write16                               5      0      0
//! WriteAtomic16                         0      0      6
//! WriteSame10                           6      0      4
//! WriteSame16                           6      0      4
//! WriteVerify10                         6      0      0
//! WriteVerify12                         6      0      0
//! WriteVerify16                         6      0      0
//! iSCSIcmdsn                            2      0      0
//! iSCSIdatasn                           0      1      0
//! iSCSIResiduals                       10      0      0
//! iSCSITMF                              2      0      0
//! MultipathIO                           0      0      4
//! iscsi-test-cu: 160 passed, 8 failed, 62 skipped
//! ```

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ironstar_interop::command::run;
use ironstar_interop::config::Config;
use ironstar_interop::cunit;
use ironstar_interop::daemon::Daemon;
use ironstar_interop::{peers, GIB, INITIATOR2_IQN, INITIATOR_IQN};

/// Tests we know fail and have decided to live with for now, as `Suite.Test`, each with the
/// reason. Any failure not listed here fails the run. Keep it short, and empty if possible.
const KNOWN_GAPS: &[&str] = &[
    // libiscsi 1.19 bug with more than one logical block per physical block: its second
    // loop asks GET LBA STATUS for LBA i+1 and expects the first descriptor to start at
    // i+LBPPB; SBC says it starts at the LBA asked for, which is what we return. We report
    // 4 KiB physical blocks (honest for page-backed LUs), which also lets four
    // UnmapUnaligned / InvalidDataOutSize tests run instead of skipping. (RBD LUs report
    // 512-byte physical blocks and pass it: tests/tests/ceph.rs.)
    "GetLBAStatus.UnmapSingle",
    // SANITIZE runs in the background with SANITIZE IN PROGRESS and survives resets and
    // logouts (unit tests in scsi-target and iscsi-target show it), but this 1 GiB memory
    // LU is overwritten in well under a second; the test wants the sanitize still running
    // about 5 s after it started.
    "Sanitize.Reset",
];

fn timeout() -> Duration {
    let secs = env::var("IRONSTAR_CU_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(900);
    Duration::from_secs(secs)
}

fn report_dir() -> PathBuf {
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        });
    target.join("interop")
}

#[test]
fn iscsi_test_cu_all_with_dataloss() {
    if !peers::require(&["iscsi-test-cu"]) {
        return;
    }
    let mut d = Daemon::start(&Config::single_memory_lu(GIB));
    let tests = env::var("IRONSTAR_CU_TESTS").unwrap_or_else(|_| "ALL".to_string());
    let o = run(
        Command::new("iscsi-test-cu")
            .arg("--dataloss")
            // The SANITIZE tests run only with this flag; without it 11 tests skip.
            .arg("--allow-sanitize")
            .arg(format!("--test={tests}"))
            .args(["-i", INITIATOR_IQN, "-I", INITIATOR2_IQN])
            // The same LU twice: two I_T nexuses, so the MultipathIO suite runs
            // instead of skipping.
            .arg(d.lun_url(0))
            .arg(d.lun_url(0)),
        timeout(),
    );
    let report = cunit::parse(&o.stdout);
    let table = report.table();
    let dir = report_dir();
    if fs::create_dir_all(&dir).is_ok() {
        let _ = fs::write(dir.join("iscsi-test-cu-output.txt"), format!("{o}\n"));
        let _ = fs::write(dir.join("iscsi-test-cu-summary.txt"), &table);
    }
    println!("{table}");

    assert!(
        !o.timed_out,
        "iscsi-test-cu did not finish within {:?}:\n{table}",
        timeout()
    );
    let summary = report.summary.unwrap_or_else(|| {
        panic!("iscsi-test-cu ended without a CUnit run summary:\n{table}\n{o}")
    });
    let counts = report.counts();
    assert!(counts.total() > 0, "no test ran:\n{o}");
    // Our reading must agree with CUnit's own, or the counts above mean nothing.
    assert_eq!(
        counts.total(),
        summary.tests_ran,
        "parsed tests vs CUnit's Ran:\n{table}"
    );
    assert_eq!(
        counts.failed + counts.no_verdict,
        summary.tests_failed,
        "parsed failures vs CUnit's:\n{table}"
    );
    assert_eq!(
        summary.suites_failed, 0,
        "a suite failed to initialise:\n{o}"
    );

    let unexpected = report.unexpected_failures(KNOWN_GAPS);
    assert!(
        unexpected.is_empty(),
        "iscsi-test-cu: {} unexpected failure(s): {}\n{table}",
        unexpected.len(),
        unexpected.join(", ")
    );
    // With every failure a known gap, the tool's exit code 1 is expected; anything else is not.
    let code = o.status.and_then(|s| s.code());
    assert!(
        code == Some(0) || (code == Some(1) && counts.failed > 0),
        "iscsi-test-cu exit {code:?}:\n{o}"
    );
    d.assert_alive();
}
