//! qemu-img's iSCSI driver (libiscsi inside qemu) against the real daemon: a data round
//! trip checked byte for byte, and a short benchmark of reads and writes.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ironstar_interop::command::run;
use ironstar_interop::config::Config;
use ironstar_interop::daemon::Daemon;
use ironstar_interop::{peers, MIB};

const T: Duration = Duration::from_secs(180);

/// Writes `size` random bytes to `path` and returns them.
fn random_image(path: &Path, size: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    fs::write(path, &data).unwrap();
    data
}

/// Copies the raw image `src` onto the LU at `lu` (an iscsi:// URL or a
/// json: spec). -n: the LU exists already; qemu must not try to create it.
fn convert_onto_lu(src: &Path, lu: &str) {
    run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(src)
            .arg(lu),
        T,
    )
    .assert_success();
}

/// Copies the LU at `lu` into a new raw image `dst`.
fn convert_from_lu(lu: &str, dst: &Path) {
    run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", lu])
            .arg(dst),
        T,
    )
    .assert_success();
}

#[test]
fn convert_random_image_in_and_back_then_compare() {
    if !peers::require_qemu_iscsi() {
        return;
    }
    let size = 64 * MIB;
    let mut d = Daemon::start(&Config::single_memory_lu(size));
    let src = d.scratch().join("src.img");
    let back = d.scratch().join("back.img");
    random_image(&src, size);
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

    convert_onto_lu(&src, &url);
    convert_from_lu(&url, &back);
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

/// Reads a random image back through a session that negotiated CRC32C
/// header digests (qemu's `header-digest` option of its iSCSI driver).
#[test]
fn header_digest_crc32c_session_reads_back_what_was_written() {
    if !peers::require_qemu_iscsi() {
        return;
    }
    let size = 16 * MIB;
    let mut d = Daemon::start(&Config::single_memory_lu(size));
    let src = d.scratch().join("src.img");
    let back = d.scratch().join("back.img");
    let data = random_image(&src, size);
    let addr = d.addr();
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"iscsi","transport":"tcp","portal":"{}:{}","target":"{}","lun":{},"header-digest":"crc32c"}}}}"#,
        addr.ip(),
        addr.port(),
        ironstar_interop::TARGET_IQN,
        ironstar_interop::daemon::client_lun(0)
    );
    convert_onto_lu(&src, &json);
    convert_from_lu(&json, &back);
    assert!(
        fs::read(&back).unwrap() == data,
        "data differs after the round trip"
    );
    assert!(
        d.log().contains("header_digest=true"),
        "the session did not negotiate header digests"
    );
    d.assert_alive();
}

/// A file-backed LU: what qemu writes through iSCSI is in the file.
#[test]
fn file_backed_lu_stores_what_the_initiator_wrote() {
    if !peers::require_qemu_iscsi() {
        return;
    }
    let dir = ironstar_interop::daemon::TempDir::new("ironstar-file-lu").unwrap();
    let path = dir.path().join("lu.img");
    let size = 32 * MIB;
    fs::File::create(&path).unwrap().set_len(size).unwrap();
    let mut cfg = Config::single_memory_lu(size);
    cfg.targets[0].luns[0].backend = ironstar_interop::config::Backend::File { path: path.clone() };
    let mut d = Daemon::start(&cfg);
    let src = d.scratch().join("src.img");
    let data = random_image(&src, size);
    convert_onto_lu(&src, &d.lun_url(0));
    d.assert_alive();
    drop(d);
    assert!(fs::read(&path).unwrap() == data, "the backing file differs");
}
