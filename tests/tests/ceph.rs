//! LUs on Ceph RBD, on a real throw-away cluster: `tests/ceph/single-node.sh` starts one
//! monitor, one manager and one OSD on 127.0.0.1 (pool `rbd`, about 15 s) and is stopped at
//! the end, failed test or not. Two gateways (two `iscsitd` processes, separate configs and
//! portals) export the same images as the same LUs (same GUID/NAA and serial).
//!
//! One test, in phases, so the cluster is started once:
//! 1. identity: both gateways report the same serial and LU designators;
//! 2. a 64 MiB `qemu-img convert` through gateway A reads back equal through gateway B and
//!    through `rbd export`;
//! 3. `rbd resize` on the cluster: the LU's new capacity is seen through both gateways;
//! 0. the RBD backend in this process against an image of its own: data, zeroes,
//!    compare-and-write, allocation status, the exclusive lock moving between two opens,
//!    and the shared LU state (reservations, mode parameters) swapped and announced;
//! 4. `iscsi-test-cu --dataloss --test=ALL` against an RBD LU (both nexuses on gateway A),
//!    with no failure allowed; its SANITIZE suite again with `--allow-sanitize` (one known
//!    gap, see KNOWN_GAPS); then the MultipathIO and persistent reservation suites with one
//!    URL per gateway;
//! 5. persistent reservations in the cluster: initiator X registers and takes Write
//!    Exclusive through gateway A; initiator Y's write through gateway B gets RESERVATION
//!    CONFLICT; A is killed and started again, and the keys and the reservation are still
//!    there (Y still conflicts, X writes); Y registers through B, and X's CLEAR through
//!    the new A frees Y on B and reaches it there as RESERVATIONS PREEMPTED; then mode
//!    parameters: SWP set by MODE SELECT through A makes writes through B fail with
//!    SOFTWARE WRITE PROTECTED, after MODE PARAMETERS CHANGED on B's nexus, and back;
//! 6. failover: a verified stream of writes through our initiator (`iscsi write` with both
//!    paths configured: A's URL, and B's as `--path`) to gateway A, A killed with SIGKILL
//!    while a write is in flight; that write completes through B by itself and the rest of
//!    the stream logs in through B (the in-flight chunk is then rewritten with new data, so
//!    a late write from dead A would show); the whole range read back through B and
//!    `rbd export` must match.
//!    The exclusive lock moves to B once the OSD drops dead A's watch (the test cluster
//!    sets `osd client watch timeout` to 10 s) and librbd blocklists A.
//!
//! Needs ceph-mon, ceph-mgr, ceph-osd, ceph-common (and librbd1, loaded by the daemon at run
//! time): scripts/install-test-deps.sh installs them. Without them the test skips, or fails
//! under CI=true / IRONSTAR_REQUIRE_PEERS=1.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironstar_interop::command::{run, Outcome};
use ironstar_interop::cunit;
use ironstar_interop::daemon::{binary, free_port, TempDir};
use ironstar_interop::raw::{rw10, RawConn, Recv, ScsiStatus};
use ironstar_interop::{peers, INITIATOR2_IQN, INITIATOR_IQN, MIB, TARGET_IQN};
use scsi_target::{Backend, CompareAndWrite, RbdBackend, RbdConfig};

const T: Duration = Duration::from_secs(180);

/// The LUs both gateways export: (LUN, image, GUID, serial, MiB).
const LUS: [(u32, &str, &str, &str, u64); 2] = [
    (0, "lu0", "6001405C0FFEE000", "ceph-lu0", 64),
    (1, "cu0", "6001405C0FFEE001", "ceph-cu0", 32),
];

/// A single-node cluster in a temp dir; stopped (every daemon killed) on drop.
struct Cluster {
    script: PathBuf,
    dir: TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ceph/single-node.sh");
        let c = Cluster {
            script,
            dir: TempDir::new("ironstar-ceph").expect("temp dir"),
        };
        run(
            Command::new("bash")
                .arg(&c.script)
                .arg("start")
                .arg(c.path())
                // The images here are small: an OSD in RAM keeps the test short.
                .env("CEPH_OBJECTSTORE", "memstore"),
            T,
        )
        .assert_success();
        c
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn conf(&self) -> PathBuf {
        self.path().join("ceph.conf")
    }

    fn rbd(&self, args: &[&str]) -> Outcome {
        run(
            Command::new("rbd").env("CEPH_CONF", self.conf()).args(args),
            T,
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = run(
            Command::new("bash")
                .arg(&self.script)
                .arg("stop")
                .arg(self.path()),
            Duration::from_secs(60),
        );
        // The OSD's 10 GiB sparse block file is not worth keeping for a look.
        let _ = fs::remove_file(self.path().join("osd.0/block"));
    }
}

/// One gateway: an `iscsitd` of its own with the RBD LUs; killed on drop.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Gateway {
    fn start(name: &str, tag: u16, cluster: &Cluster) -> Gateway {
        let dir = TempDir::new(&format!("ironstar-gw-{name}")).expect("temp dir");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let conf = dir.path().join("iscsitd.toml");
        fs::write(&conf, gateway_toml(addr, tag, &cluster.conf())).expect("write config");
        let log = dir.path().join("iscsitd.log");
        let out = fs::File::create(&log).expect("log");
        let child = Command::new(binary())
            .arg("--config")
            .arg(&conf)
            .arg("--socket")
            .arg(dir.path().join("iscsitd.sock"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start iscsitd");
        let mut g = Gateway {
            child,
            addr,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(st)) = g.child.try_wait() {
                panic!("gateway {name} exited ({st}):\n{}", g.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway {name} not up:\n{}",
                g.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
        println!("gateway {name}: pid {} on {addr}", g.child.id());
        g
    }

    fn url(&self, lun: u32) -> String {
        format!("iscsi://{}/{TARGET_IQN}/{lun}", self.addr)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- gateway {} log ---\n{}", self.addr, self.log());
        }
    }
}

/// Separate portal and portal group per gateway; the same LUs (GUID, serial) on both, and
/// the same ALUA groups: gateway A's ports (tag 1) active/optimized, B's (tag 2)
/// active/non-optimized.
fn gateway_toml(addr: SocketAddr, tag: u16, ceph_conf: &Path) -> String {
    let mut s = format!(
        "[[portal_group]]\ntag = {tag}\nportals = [\"{addr}\"]\n\n\
         [[target]]\niqn = \"{TARGET_IQN}\"\nportal_groups = [{tag}]\nauth = \"none\"\n\n\
         [[alua_group]]\nid = 1\nstate = \"active-optimized\"\nportal_groups = [1]\n\n\
         [[alua_group]]\nid = 2\nstate = \"active-non-optimized\"\nportal_groups = [2]\n\n"
    );
    for (lun, image, guid, serial, _) in LUS {
        s.push_str(&format!(
            "[[lu]]\nguid = \"{guid}\"\nbackend = \"rbd\"\npool = \"rbd\"\nimage = \"{image}\"\n\
             ceph_conf = \"{}\"\nceph_id = \"admin\"\nserial = \"{serial}\"\n\n\
             [[view]]\nlu = \"{guid}\"\nlun = {lun}\n\n",
            ceph_conf.display()
        ));
    }
    s
}

fn random_file(path: &Path, size: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    fs::write(path, &data).unwrap();
    data
}

/// VPD pages 80h and 83h without the designators that name the target port (they differ
/// per gateway by design).
fn lu_identity(url: &str) -> String {
    let mut out = String::new();
    for page in ["128", "131"] {
        let o = run(
            Command::new("iscsi-inq").args(["-e", "1", "-c", page, url]),
            T,
        );
        o.assert_success();
        out.push_str(&o.stdout);
    }
    out.lines()
        .filter(|l| !l.contains(",t,0x"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn capacity(url: &str) -> u64 {
    let o = run(Command::new("iscsi-readcapacity16").arg(url), T);
    o.assert_success();
    o.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Total size:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no size in:\n{o}"))
}

/// Failures iscsi-test-cu's SANITIZE suite may report against an RBD LU, each with its
/// reason.
const KNOWN_GAPS: &[&str] = &[
    // SANITIZE runs in the background with SANITIZE IN PROGRESS (as in compliance.rs), but
    // the test's pattern is all zeros, which a thin RBD LU (LBPRZ) writes by deallocating
    // (write-zeroes). Measured on this single-node cluster: 2 ms for an empty 1 GiB image
    // (MemStore), 0.19 s for a full 1 GiB and 0.9 s for a full 4 GiB one (BlueStore). The
    // test wants it still running about 5 s after it starts: tens of GiB written first (a
    // non-zero pass ran at 250-350 MB/s, 11-17 s for 4 GiB, and Sanitize.Overwrite makes
    // three), far beyond an honest test image and the CI's time.
    "Sanitize.Reset",
];

/// `iscsi-test-cu` on LU 1 through gateway A (both nexuses), with these options; the
/// outcome table is printed.
fn compliance_run(a: &Gateway, options: &[&str], tests: &str) -> cunit::Report {
    let o = run(
        Command::new("iscsi-test-cu")
            .args(options)
            .arg(format!("--test={tests}"))
            .args(["-i", INITIATOR_IQN, "-I", INITIATOR2_IQN])
            .arg(a.url(1))
            .arg(a.url(1)),
        Duration::from_secs(900),
    );
    let report = cunit::parse(&o.stdout);
    let table = report.table();
    println!(
        "iscsi-test-cu {} --test={tests}:\n{table}",
        options.join(" ")
    );
    assert!(!o.timed_out, "iscsi-test-cu timed out:\n{table}");
    if tests == "ALL" {
        assert!(report.counts().total() > 200, "too few tests ran:\n{o}");
    }
    report
}

fn compliance(a: &Gateway, b: &Gateway) {
    // IRONSTAR_CU_TESTS=FAMILY[.SUITE[.TEST]] runs fewer, as in compliance.rs.
    let tests = std::env::var("IRONSTAR_CU_TESTS").unwrap_or_else(|_| "ALL".to_string());
    // The suite with --dataloss, every test: nothing may fail.
    let report = compliance_run(a, &["--dataloss"], &tests);
    assert!(
        report.failures().is_empty(),
        "iscsi-test-cu --dataloss on an RBD LU: failures {:?}\n{}",
        report.failures(),
        report.table()
    );
    // The SANITIZE tests run only with --allow-sanitize too: on their own, since one of
    // them presumes a sanitize slower than an RBD LU's (KNOWN_GAPS).
    if tests == "ALL" || tests.contains("Sanitize") {
        let report = compliance_run(a, &["--dataloss", "--allow-sanitize"], "SCSI.Sanitize");
        let unexpected = report.unexpected_failures(KNOWN_GAPS);
        assert!(
            unexpected.is_empty() && report.counts().total() >= 11,
            "iscsi-test-cu's SANITIZE suite on an RBD LU: unexpected failures {unexpected:?}\n{}",
            report.table()
        );
    }

    // One nexus per gateway: writes through one are compared and overwritten through the
    // other; a LUN reset through one gives a unit attention on the other (announced through
    // the cluster). MultipathIO.CompareAndWrite initialises LBAs 0..255 and then also compares LBA 256,
    // so it runs first, on zeros.
    zero_start(a, 1);
    for t in ["CompareAndWrite", "Simple", "Reset", "CompareAndWriteAsync"] {
        let o = run(
            Command::new("iscsi-test-cu")
                .args(["--dataloss", &format!("--test=SCSI.MultipathIO.{t}")])
                .args(["-i", INITIATOR_IQN, "-I", INITIATOR2_IQN])
                .arg(a.url(1))
                .arg(b.url(1)),
            Duration::from_secs(300),
        );
        let report = cunit::parse(&o.stdout);
        let c = report.counts();
        assert!(
            c.total() == 1 && report.failures().is_empty() && !o.stdout.contains("SKIPPED"),
            "MultipathIO.{t} across gateways:\n{o}"
        );
    }
}

/// libiscsi's persistent reservation suites with one nexus per gateway: registrations and
/// reservations made through one gateway must hold through the other.
fn reservation_suites(a: &Gateway, b: &Gateway) {
    for t in [
        "PrinReadKeys",
        "PrinServiceactionRange",
        "PrinReportCapabilities",
        "ProutRegister",
        "ProutReserve",
        "ProutClear",
        "ProutPreempt",
    ] {
        let o = run(
            Command::new("iscsi-test-cu")
                .args(["--dataloss", &format!("--test=SCSI.{t}")])
                .args(["-i", INITIATOR_IQN, "-I", INITIATOR2_IQN])
                .arg(a.url(1))
                .arg(b.url(1)),
            Duration::from_secs(300),
        );
        let report = cunit::parse(&o.stdout);
        assert!(
            report.counts().total() >= 1 && report.failures().is_empty(),
            "{t} across gateways:\n{o}"
        );
    }
}

/// Writes zeros over the first MiB of `lun` through gateway `g`.
fn zero_start(g: &Gateway, lun: u32) {
    let zeros = g._dir.path().join("zeros");
    fs::write(&zeros, vec![0u8; MIB as usize]).unwrap();
    run(
        Command::new(iscsi_cli())
            .arg("write")
            .arg(g.url(lun))
            .args(["--lba", "0", "-i"])
            .arg(&zeros),
        T,
    )
    .assert_success();
}

#[test]
fn rbd_lu_served_by_two_gateways() {
    let tools = [
        "ceph-mon",
        "ceph-mgr",
        "ceph-osd",
        "ceph",
        "rbd",
        "ceph-authtool",
        "monmaptool",
        "uuidgen",
        "iscsi-inq",
        "iscsi-readcapacity16",
        "iscsi-test-cu",
    ];
    if !peers::require(&tools) || !peers::require_qemu_iscsi() {
        return;
    }
    let started = Instant::now();
    // Declared first, dropped last: the gateways go before the cluster.
    let cluster = Cluster::start();
    for (_, image, _, _, mib) in LUS {
        cluster
            .rbd(&[
                "create",
                &format!("rbd/{image}"),
                "--size",
                &format!("{mib}M"),
            ])
            .assert_success();
    }
    backend_on_a_real_image(&cluster);
    println!("RBD backend checks done after {:.1?}", started.elapsed());
    let a = Gateway::start("a", 1, &cluster);
    let b = Gateway::start("b", 2, &cluster);
    println!("cluster and gateways up after {:.1?}", started.elapsed());

    // 1. Same LU on both gateways; each gateway its own target port group, A's preferred.
    for g in [&a, &b] {
        let mut c = login(g, INITIATOR_IQN);
        assert_eq!(
            target_port_groups(&mut c),
            vec![(1, 0, true), (2, 1, false)],
            "REPORT TARGET PORT GROUPS through {}",
            g.addr
        );
        c.close();
    }
    let (ia, ib) = (lu_identity(&a.url(0)), lu_identity(&b.url(0)));
    assert!(ia.contains("ceph-lu0"), "{ia}");
    assert_eq!(ia, ib, "the gateways disagree on the LU's identity");

    // `stmfadm create-lu rbd:POOL/IMAGE` through A's admin socket; a wrong conf is named.
    admin(&cluster, &a);

    // 2. Written through A, read through B and by the cluster itself.
    let scratch = cluster.path().join("data");
    fs::create_dir_all(&scratch).unwrap();
    let src = scratch.join("src.img");
    let data = random_file(&src, 64 * MIB);
    run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(a.url(0)),
        T,
    )
    .assert_success();
    run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(b.url(0)),
        T,
    )
    .assert_success();
    let exported = scratch.join("export.img");
    cluster
        .rbd(&["export", "rbd/lu0", exported.to_str().unwrap()])
        .assert_success();
    assert!(
        fs::read(&exported).unwrap() == data,
        "rbd export differs from what was written through gateway A"
    );
    println!(
        "64 MiB through A == through B == rbd export ({:.1?})",
        started.elapsed()
    );

    // 3. Grown on the cluster: both gateways report the new capacity.
    cluster
        .rbd(&["resize", "rbd/lu0", "--size", "80M"])
        .assert_success();
    for g in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while capacity(&g.url(0)) != 80 * MIB {
            assert!(
                Instant::now() < deadline,
                "gateway {} kept the old size",
                g.addr
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    // 4. Compliance on an RBD LU, and multipath across the two gateways.
    compliance(&a, &b);
    reservation_suites(&a, &b);
    println!("compliance done after {:.1?}", started.elapsed());

    // 5. A reservation through A binds B and outlives A's restart.
    let a = reservations(&cluster, a, &b);
    println!("reservations done after {:.1?}", started.elapsed());
    mode_parameters(&a, &b);

    // 6. Gateway A dies mid-stream; the stream completes through B.
    failover(&cluster, a, &b);
    println!("done in {:.1?}", started.elapsed());
}

fn stmfadm(g: &Gateway, args: &[&str]) -> Outcome {
    run(
        Command::new(binary().with_file_name("stmfadm"))
            .arg("--socket")
            .arg(g._dir.path().join("iscsitd.sock"))
            .args(args),
        T,
    )
}

fn admin(cluster: &Cluster, a: &Gateway) {
    cluster
        .rbd(&["create", "rbd/adm0", "--size", "16M"])
        .assert_success();
    let conf = format!("conf={}", cluster.conf().display());
    stmfadm(
        a,
        &[
            "create-lu",
            "-p",
            &conf,
            "-p",
            "id=admin",
            "-p",
            "guid=6001405C0FFEE0AD",
            "rbd:rbd/adm0",
        ],
    )
    .assert_success();
    let o = stmfadm(a, &["list-lu", "-v", "6001405C0FFEE0AD"]);
    o.assert_success();
    assert!(
        o.stdout.contains("rbd:rbd/adm0") && o.stdout.contains("RBD LU"),
        "{o}"
    );
    let o = stmfadm(
        a,
        &[
            "create-lu",
            "-p",
            "conf=/nonexistent/ceph.conf",
            "rbd:rbd/adm0",
        ],
    );
    o.assert_failure();
    assert!(
        format!("{}{}", o.stdout, o.stderr).contains("/nonexistent/ceph.conf"),
        "{o}"
    );
    stmfadm(a, &["delete-lu", "6001405C0FFEE0AD"]).assert_success();
}

/// PERSISTENT RESERVE OUT on LUN 0 (parameter list: key, service action key).
fn prout(c: &mut RawConn, sa: u8, ptype: u8, key: u64, sa_key: u64) -> ScsiStatus {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x5F;
    cdb[1] = sa;
    cdb[2] = ptype;
    cdb[8] = 24;
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    let itt = c.itt();
    let cmd = c.scsi_command(itt, &cdb, false, true, 24);
    assert!(c.send(&cmd));
    c.answer_r2ts(itt, &p, None)
}

/// PERSISTENT RESERVE IN, READ KEYS on LUN 0.
fn read_keys(c: &mut RawConn) -> Vec<u64> {
    let data = data_in(c, &[0x5E, 0, 0, 0, 0, 0, 0, 1, 0, 0], 256);
    let len = data
        .get(4..8)
        .map_or(0, |l| u32::from_be_bytes(l.try_into().unwrap()));
    data.get(8..8 + len as usize)
        .unwrap_or(&[])
        .chunks(8)
        .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
        .collect()
}

/// REPORT TARGET PORT GROUPS on LUN 0: (group id, asymmetric access state, PREF) of each
/// descriptor.
fn target_port_groups(c: &mut RawConn) -> Vec<(u16, u8, bool)> {
    let d = data_in(c, &[0xA3, 0x0A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 256);
    let mut out = Vec::new();
    let mut at = 4;
    while at + 8 <= d.len() {
        let ports = usize::from(d[at + 7]);
        out.push((
            u16::from_be_bytes([d[at + 2], d[at + 3]]),
            d[at] & 0x0F,
            d[at] & 0x80 != 0,
        ));
        at += 8 + 4 * ports;
    }
    out
}

/// A command with data-in on LUN 0; the data.
fn data_in(c: &mut RawConn, cdb: &[u8], alloc: u32) -> Vec<u8> {
    let itt = c.itt();
    let cmd = c.scsi_command(itt, cdb, true, false, alloc);
    assert!(c.send(&cmd));
    let mut data = Vec::new();
    loop {
        let p = c.recv_until(|p| p.itt() == itt).pdu();
        if p.opcode_byte() == 0x25 {
            data.extend_from_slice(&p.data);
            if p.bhs[1] & 0x01 != 0 {
                break;
            }
        } else {
            assert!(ScsiStatus::of(&p).good(), "command {:#x} failed", cdb[0]);
            break;
        }
    }
    data
}

const RESERVATION_CONFLICT: u8 = 0x18;

/// WRITE(10) of one block at `lba`, waiting up to a minute for its status: the first
/// write through a gateway may wait for the image's exclusive lock to move to it.
fn write_block(c: &mut RawConn, lba: u32, data: &[u8]) -> ScsiStatus {
    let itt = c.itt();
    let cmd = c.scsi_command(itt, &rw10(0x2A, lba, 1), false, true, 512);
    assert!(c.send(&cmd));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "no status for WRITE within a minute"
        );
        let Recv::Pdu(p) = c.recv_within(Duration::from_secs(60)) else {
            panic!("connection lost during WRITE");
        };
        if p.itt() != itt {
            continue;
        }
        match p.opcode_byte() {
            // R2T: the whole block in one Data-Out.
            0x31 => {
                let ttt = u32::from_be_bytes(p.bhs[20..24].try_into().unwrap());
                let d = c.data_out(itt, ttt, 0, true, Bytes::copy_from_slice(data));
                assert!(c.send(&d));
            }
            0x21 => return ScsiStatus::of(&p),
            other => panic!("unexpected PDU {other:#x} during WRITE"),
        }
    }
}

fn login(g: &Gateway, initiator: &str) -> RawConn {
    let mut c = RawConn::login(g.addr, initiator, false);
    c.clear_unit_attention();
    c
}

fn reservations(cluster: &Cluster, mut a: Gateway, b: &Gateway) -> Gateway {
    let (key, block) = (0x1234_5678_9abc_def0u64, vec![0x77u8; 512]);
    let mut x = login(&a, INITIATOR_IQN);
    assert!(prout(&mut x, 0, 0, 0, key).good(), "REGISTER through A");
    assert!(
        prout(&mut x, 1, 1, key, 0).good(),
        "RESERVE (Write Exclusive) through A"
    );
    let mut y = login(b, INITIATOR2_IQN);
    assert_eq!(
        write_block(&mut y, 4096, &block).status,
        RESERVATION_CONFLICT
    );
    assert_eq!(read_keys(&mut y), vec![key]);
    x.close();

    // Gateway A goes away without a word and comes back: the state is in the cluster.
    a.child.kill().unwrap();
    let _ = a.child.wait();
    drop(a);
    let a = Gateway::start("a-again", 1, cluster);
    let mut x = login(&a, INITIATOR_IQN);
    assert_eq!(read_keys(&mut x), vec![key]);
    assert_eq!(
        write_block(&mut y, 4096, &block).status,
        RESERVATION_CONFLICT
    );
    assert!(
        write_block(&mut x, 4096, &block).good(),
        "the holder writes"
    );
    // Y registers through B; A's CLEAR reaches Y through B as the unit attention SPC-4
    // gives every registrant: RESERVATIONS PREEMPTED (2A/03).
    assert!(prout(&mut y, 0, 0, 0, key ^ 1).good(), "REGISTER through B");
    assert!(
        prout(&mut x, 3, 0, key, 0).good(),
        "CLEAR through the new A"
    );
    let itt = y.itt();
    let tur = y.scsi_command(itt, &[0; 6], false, false, 0);
    assert!(y.send(&tur));
    let ua = ScsiStatus::of(&y.recv_until(|p| p.itt() == itt).pdu());
    assert_eq!(
        (ua.status, ua.sense),
        (0x02, Some((0x06, 0x2A, 0x03))),
        "RESERVATIONS PREEMPTED through B after a CLEAR through A"
    );
    assert!(
        write_block(&mut y, 4096, &block).good(),
        "B writes once cleared"
    );
    x.close();
    y.close();
    a
}

/// MODE SELECT(6) of the control page on LUN 0 with SWP as given (TAS and the busy
/// timeout as the current page has them).
fn set_swp(c: &mut RawConn, on: bool) -> ScsiStatus {
    let mut p = vec![0u8; 16];
    p[4..16].copy_from_slice(&[0x0A, 10, 0, 0, 0, 0x40, 0, 0, 0xFF, 0xFF, 0, 0]);
    p[8] = if on { 0x08 } else { 0 };
    let itt = c.itt();
    let cmd = c.scsi_command(itt, &[0x15, 0x10, 0, 0, 16, 0], false, true, 16);
    assert!(c.send(&cmd));
    c.answer_r2ts(itt, &p, None)
}

fn test_unit_ready(c: &mut RawConn) -> ScsiStatus {
    let itt = c.itt();
    let tur = c.scsi_command(itt, &[0; 6], false, false, 0);
    assert!(c.send(&tur));
    ScsiStatus::of(&c.recv_until(|p| p.itt() == itt).pdu())
}

const MODE_PARAMETERS_CHANGED: Option<(u8, u8, u8)> = Some((0x06, 0x2A, 0x01));

/// The LU's mode parameters are the LU's, not a gateway's: software write protection set
/// through A binds writes through B, whose nexus hears of the change.
fn mode_parameters(a: &Gateway, b: &Gateway) {
    let block = vec![0x5Au8; 512];
    let mut x = login(a, INITIATOR_IQN);
    let mut y = login(b, INITIATOR2_IQN);
    assert!(
        write_block(&mut y, 8192, &block).good(),
        "B writes at first"
    );
    assert!(set_swp(&mut x, true).good(), "MODE SELECT SWP=1 through A");
    let ua = test_unit_ready(&mut y);
    assert_eq!(
        (ua.status, ua.sense),
        (0x02, MODE_PARAMETERS_CHANGED),
        "B's nexus after A's MODE SELECT"
    );
    let w = write_block(&mut y, 8192, &block);
    assert_eq!(
        (w.status, w.sense),
        (0x02, Some((0x07, 0x27, 0x02))),
        "a write through B under SWP set through A: SOFTWARE WRITE PROTECTED"
    );
    assert!(set_swp(&mut y, false).good(), "MODE SELECT SWP=0 through B");
    let ua = test_unit_ready(&mut x);
    assert_eq!((ua.status, ua.sense), (0x02, MODE_PARAMETERS_CHANGED));
    assert!(write_block(&mut x, 8192, &block).good(), "A writes again");
    assert!(write_block(&mut y, 8192, &block).good(), "B writes again");
    x.close();
    y.close();
}

/// The RBD backend itself, in this process, against an image of its own: data, zeroes,
/// compare-and-write, allocation status, the lock moving between two opens, and the
/// shared LU state (reservations, mode parameters) swapped and announced.
fn backend_on_a_real_image(cluster: &Cluster) {
    cluster
        .rbd(&["create", "rbd/backend", "--size", "64M"])
        .assert_success();
    let open = || {
        let cfg = RbdConfig {
            conf: Some(cluster.conf().to_string_lossy().into_owned()),
            timeout_secs: 20,
            ..RbdConfig::new("rbd", "backend")
        };
        RbdBackend::open(&cfg).unwrap()
    };
    let (a, b) = (open(), open());
    round_trips_and_zeroes_and_compares(&a);
    zeroes_seen_after_the_lock_moves(&a, &b);
    shared_state_is_swapped_and_announced(&a, &b);
}

fn round_trips_and_zeroes_and_compares(b: &RbdBackend) {
    assert_eq!(b.physical_block_size(), 512);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    b.write_at(4096, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    b.read_at(4096, &mut back).unwrap();
    assert_eq!(back, data);
    b.flush().unwrap();
    b.unmap(4096 + 512, 1024).unwrap();
    b.read_at(4096, &mut back).unwrap();
    assert!(back[512..1536].iter().all(|&x| x == 0));
    assert_eq!(back[1536..], data[1536..]);
    b.write_same(1 << 20, 8 * 512, &[0xA5; 512]).unwrap();
    let mut ws = vec![0u8; 8 * 512];
    b.read_at(1 << 20, &mut ws).unwrap();
    assert!(ws.iter().all(|&x| x == 0xA5));
    // Equal: written. Different at byte 300: nothing written, offset 300.
    let cur = ws[..512].to_vec();
    let new = vec![0x5A; 512];
    assert_eq!(
        b.compare_and_write(1 << 20, &cur, &new).unwrap(),
        CompareAndWrite::Written
    );
    let mut wrong = new.clone();
    wrong[300] ^= 1;
    assert_eq!(
        b.compare_and_write(1 << 20, &wrong, &cur).unwrap(),
        CompareAndWrite::Miscompare(300)
    );
    b.read_at(1 << 20, &mut ws[..1024]).unwrap();
    assert!(ws[..512].iter().all(|&x| x == 0x5A));
    // Beyond what this librbd compares atomically: the core falls back.
    let two = ws[..1024].to_vec();
    match b.compare_and_write(1 << 20, &two, &two) {
        Ok(CompareAndWrite::Written) => {}
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported),
        other => panic!("{other:?}"),
    }
    // A zero pattern leaves zeros, in part of an object too.
    b.write_same(1 << 20, 4 * 512, &[0u8; 512]).unwrap();
    b.read_at(1 << 20, &mut ws[..2048]).unwrap();
    assert!(ws[..2048].iter().all(|&x| x == 0));
    // A whole object written, then unmapped: deallocated.
    b.write_at(4 << 20, &[1u8; 4096]).unwrap();
    assert_eq!(b.map_status(4 << 20, 4 << 20).map(|m| m.0), Some(true));
    b.unmap(4 << 20, 4 << 20).unwrap();
    assert_eq!(b.map_status(4 << 20, 4 << 20), Some((false, 4 << 20)));
    assert!(b.read_at(b.size_bytes() - 512, &mut [0u8; 1024]).is_err());
}

fn zeroes_seen_after_the_lock_moves(a: &RbdBackend, b: &RbdBackend) {
    for round in 0..4u8 {
        b.write_at(8 << 20, &[round + 1; 4096]).unwrap();
        let mut buf = [9u8; 4096];
        a.read_at(8 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == round + 1), "round {round}: read");
        a.unmap(8 << 20, 128 * 1024).unwrap();
        a.read_at(8 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0), "round {round}: unmap via a");
        b.read_at(8 << 20, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&x| x == 0),
            "round {round}: unmap seen by b"
        );
    }
}

fn shared_state_is_swapped_and_announced(a: &RbdBackend, b: &RbdBackend) {
    let (pa, pb) = (a.shared_state().unwrap(), b.shared_state().unwrap());
    let old = pa.load().unwrap();
    let new = format!("ironstar-pr 1\ngen {}\n", old.len() + 1).into_bytes();
    let _ = pb.take_changed();
    assert!(pa.replace(&old, &new).unwrap());
    // The notify is acknowledged before replace returns.
    assert!(pb.take_changed());
    assert_eq!(pb.load().unwrap(), new);
    // A swap from a stale state loses.
    assert!(!pb.replace(&old, b"ironstar-pr 1\ngen 99\n").unwrap());
    assert!(pa.replace(&new, &old).unwrap());

    // Mode parameters: stored in one step, announced to the others only.
    assert_eq!(pb.load_mode_param("swp").unwrap(), None);
    assert!(!pb.take_mode_changed());
    pa.store_mode_params(&[("swp", b"1"), ("wce", b"0")])
        .unwrap();
    assert!(pb.take_mode_changed(), "b told of a's mode parameters");
    assert!(!pa.take_mode_changed(), "a not told of its own");
    assert_eq!(
        pb.load_mode_param("swp").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(
        pb.load_mode_param("wce").unwrap().as_deref(),
        Some(&b"0"[..])
    );
    pb.store_mode_params(&[("swp", b"0")]).unwrap();
    assert!(pa.take_mode_changed());
    assert_eq!(
        pa.load_mode_param("swp").unwrap().as_deref(),
        Some(&b"0"[..])
    );
    assert_eq!(
        pa.load_mode_param("wce").unwrap().as_deref(),
        Some(&b"0"[..])
    );
}

/// Our initiator's CLI, built beside the daemon.
fn iscsi_cli() -> PathBuf {
    binary().with_file_name("iscsi")
}

const CHUNK: usize = 512 * 1024;
const CHUNKS: usize = 48;
const KILL_AT: usize = 16;
/// Where the write gateway A dies under starts (in chunks: 32 MiB into the 80 MiB LU), and
/// its length.
const BIG_AT: usize = 64;
const BIG_CHUNKS: usize = 64;

fn chunk_data(i: usize, version: u8) -> Vec<u8> {
    let mut x = (i as u32).wrapping_mul(2_654_435_761) ^ u32::from(version).wrapping_mul(40_503);
    (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// `iscsi write` of chunk `i` with both paths configured: gateway A's URL first, B's as
/// `--path`, so the initiator itself goes to B when A is gone.
fn write_cmd(a_url: &str, b_url: &str, i: usize, file: &Path) -> Command {
    let mut c = Command::new(iscsi_cli());
    c.args([
        "--timeout",
        "120",
        "--replacement-timeout",
        "90",
        "--path",
        b_url,
        "write",
    ])
    .arg(a_url)
    .args(["--lba", &(i * CHUNK / 512).to_string(), "-i"])
    .arg(file);
    c
}

fn failover(cluster: &Cluster, mut a: Gateway, b: &Gateway) {
    let dir = cluster.path().join("stream");
    fs::create_dir_all(&dir).unwrap();
    let mut expected = Vec::with_capacity(CHUNK * CHUNKS);
    let (a_url, b_url) = (a.url(0), b.url(0));
    // The write A dies under: 32 MiB from chunk BIG_AT on, long enough to be under way.
    let big_file = dir.join("big");
    let mut big: Vec<u8> = (0..BIG_CHUNKS)
        .flat_map(|j| chunk_data(BIG_AT + j, 1))
        .collect();
    fs::write(&big_file, &big).unwrap();
    for i in 0..CHUNKS {
        let file = dir.join(format!("c{i}"));
        let data = chunk_data(i, 1);
        fs::write(&file, &data).unwrap();
        if i == KILL_AT {
            // Started through A, which dies under it: the initiator finishes it through B.
            let mut child = write_cmd(&a_url, &b_url, BIG_AT, &big_file)
                .env("ISCSI_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("iscsi write");
            // Its log says when the session is up through A; 30 ms later the 32 MiB write is
            // under way, and A dies.
            let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
            let mut log = String::new();
            while !log.contains("session up") {
                let mut line = String::new();
                if stderr.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                log.push_str(&line);
            }
            assert!(
                log.contains(&format!("portal={}", a.addr)),
                "the write did not log in through A:\n{log}"
            );
            thread::sleep(Duration::from_millis(30));
            let t0 = Instant::now();
            let _ = a.child.kill();
            let _ = a.child.wait();
            let _ = stderr.read_to_string(&mut log);
            let status = child.wait().expect("iscsi write");
            assert!(
                status.success(),
                "the write under way when A died did not complete through B:\n{log}"
            );
            let moved = log
                .lines()
                .find(|l| l.contains("session reinstated"))
                .filter(|l| l.contains(&format!("portal={}", b.addr)));
            println!(
                "gateway A killed during a 32 MiB write; that write completed {:.1?} after the \
                 kill, {}",
                t0.elapsed(),
                match moved {
                    Some(line) => format!("moved to B by itself: {}", line.trim()),
                    None => format!("without a move (it had ended through A); its log:\n{log}"),
                }
            );
            // Whatever dead A might still do with it, new data goes there through B.
            let head = dir.join("big-head");
            let v2 = chunk_data(BIG_AT, 2);
            fs::write(&head, &v2).unwrap();
            run(&mut write_cmd(&a_url, &b_url, BIG_AT, &head), T).assert_success();
            big[..CHUNK].copy_from_slice(&v2);
        }
        // After the kill, every login names A first and goes on to B.
        run(&mut write_cmd(&a_url, &b_url, i, &file), T).assert_success();
        expected.extend_from_slice(&data);
    }
    drop(a);
    let read_through_b = |chunk: usize, bytes: usize, name: &str| {
        let out = dir.join(name);
        run(
            Command::new(iscsi_cli())
                .args(["--timeout", "120", "read"])
                .arg(b.url(0))
                .args([
                    "--lba",
                    &(chunk * CHUNK / 512).to_string(),
                    "--blocks",
                    &(bytes / 512).to_string(),
                    "-o",
                ])
                .arg(&out),
            T,
        )
        .assert_success();
        fs::read(&out).unwrap()
    };
    assert!(
        read_through_b(0, CHUNK * CHUNKS, "back.img") == expected,
        "read back through B differs from the acknowledged writes"
    );
    assert!(
        read_through_b(BIG_AT, big.len(), "back-big.img") == big,
        "the write A died under reads back wrong through B"
    );
    let exported = dir.join("export.img");
    cluster
        .rbd(&["export", "rbd/lu0", exported.to_str().unwrap()])
        .assert_success();
    let img = fs::read(&exported).unwrap();
    assert!(
        img.get(..expected.len()) == Some(&expected[..]),
        "rbd export differs from the acknowledged writes"
    );
    assert!(
        img.get(BIG_AT * CHUNK..BIG_AT * CHUNK + big.len()) == Some(&big[..]),
        "rbd export differs from the write A died under"
    );
}
