//! qemu-img's iSCSI driver (libiscsi inside qemu) against the real daemon: a data round
//! trip checked byte for byte, and a short benchmark of reads and writes.

use std::fs;
use std::io::Read;
use std::process::Command;
use std::time::Duration;

use ironstar_interop::command::run;
use ironstar_interop::config::Config;
use ironstar_interop::daemon::Daemon;
use ironstar_interop::{peers, MIB};

const T: Duration = Duration::from_secs(180);

#[test]
fn convert_random_image_in_and_back_then_compare() {
    if !peers::require_qemu_iscsi() {
        return;
    }
    let size = 64 * MIB;
    let mut d = Daemon::start(&Config::single_memory_lu(size));
    let src = d.scratch().join("src.img");
    let back = d.scratch().join("back.img");
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    fs::write(&src, &data).unwrap();
    drop(data);
    let url = d.lun_url(0);

    let info = run(
        Command::new("qemu-img").args(["info", "--output=json", &url]),
        T,
    );
    info.assert_success();
    assert!(
        info.stdout.contains(&format!("\"virtual-size\": {size}")),
        "qemu-img sees the wrong size:\n{info}"
    );

    // -n: the LU exists already; qemu must not try to create it.
    run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&url),
        T,
    )
    .assert_success();
    run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &url])
            .arg(&back),
        T,
    )
    .assert_success();
    assert_eq!(fs::metadata(&back).unwrap().len(), size);
    // -s: strict, sizes must match too.
    run(
        Command::new("qemu-img")
            .args(["compare", "-s", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&back),
        T,
    )
    .assert_success();
    d.assert_alive();
}

#[test]
fn bench_reads_and_writes_at_4k_and_128k_depth_1_and_32() {
    if !peers::require_qemu_iscsi() {
        return;
    }
    let mut d = Daemon::start(&Config::single_memory_lu(512 * MIB));
    let url = d.lun_url(0);
    for (bs, count) in [("4k", "4000"), ("128k", "1000")] {
        for depth in ["1", "32"] {
            // Writes first, so the reads cover written blocks.
            for write in [true, false] {
                let mut cmd = Command::new("qemu-img");
                cmd.args([
                    "bench", "-f", "raw", "-t", "none", "-c", count, "-d", depth, "-s", bs,
                ]);
                if write {
                    cmd.arg("-w");
                }
                let o = run(cmd.arg(&url), T);
                o.assert_success();
                assert!(o.stdout.contains("Run completed in"), "{o}");
            }
        }
    }
    d.assert_alive();
}
