//! Scale and memory: a thousand idle sessions on one daemon, and a thousand commands
//! outstanding at once. Each reports the daemon's memory per session / per command and its
//! file descriptors, and asserts the budgets of the robustness and performance issues
//! (under 64 KiB per idle session; outstanding commands bounded), with every session still
//! answering afterwards.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironstar_interop::config::Config;
use ironstar_interop::daemon::Daemon;
use ironstar_interop::raw::{rss_bytes, rw10, RawConn, Recv};
use ironstar_interop::MIB;

const IDLE_SESSIONS: usize = 1000;
/// The performance issue's budget for an idle session.
const IDLE_SESSION_BUDGET: u64 = 64 * 1024;
const OUTSTANDING_SESSIONS: usize = 8;
const COMMANDS_PER_SESSION: usize = 125;
/// What 1,000 commands waiting for their data may cost (they hold no data buffer yet).
const OUTSTANDING_BUDGET: u64 = 16 * MIB;

/// Lifts this process's soft open-file limit to the hard one (the daemon, our child,
/// inherits it and also lifts its own); returns the new soft limit.
fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn settle() {
    thread::sleep(Duration::from_millis(500));
}

#[test]
fn a_thousand_idle_sessions_cost_under_64_kib_each_and_all_answer() {
    let limit = raise_open_file_limit();
    assert!(
        limit >= (IDLE_SESSIONS as u64) * 2 + 256,
        "open-file hard limit {limit} is too low for {IDLE_SESSIONS} sessions"
    );
    let mut cfg = Config::single_memory_lu(16 * MIB);
    // Idle means idle: no target NOP-In pings while we count.
    cfg.defaults.push("nop_in_interval = 0".into());
    let d = Daemon::start(&cfg);
    settle();
    let (rss0, fds0) = (rss_bytes(d.pid()), open_fds(d.pid()));
    let t0 = Instant::now();
    let mut conns: Vec<RawConn> = (0..IDLE_SESSIONS)
        .map(|i| {
            RawConn::login(
                d.addr(),
                &format!("iqn.2026-11.dev.ironstar:idle-{i}"),
                false,
            )
        })
        .collect();
    let login_time = t0.elapsed();
    settle();
    let (rss1, fds1) = (rss_bytes(d.pid()), open_fds(d.pid()));
    let per_session = rss1.saturating_sub(rss0) / IDLE_SESSIONS as u64;
    println!(
        "{IDLE_SESSIONS} idle sessions: logged in in {login_time:.2?}; daemon RSS {} KiB -> {} KiB \
         ({per_session} bytes per session); fds {fds0} -> {fds1}",
        rss0 / 1024,
        rss1 / 1024
    );
    assert!(
        fds1 >= fds0 + IDLE_SESSIONS,
        "the daemon holds {fds1} fds: some sessions are gone"
    );
    assert!(
        per_session < IDLE_SESSION_BUDGET,
        "an idle session costs {per_session} bytes (budget {IDLE_SESSION_BUDGET})"
    );
    let t0 = Instant::now();
    for (i, c) in conns.iter_mut().enumerate() {
        assert!(c.ping(), "idle session {i} does not answer a NOP-Out");
    }
    println!("every session answered a ping in {:.2?}", t0.elapsed());
    for c in conns {
        c.close();
    }
    // Every connection's resources go when its socket closes.
    let deadline = Instant::now() + Duration::from_secs(15);
    while open_fds(d.pid()) > fds0 + 8 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let fds2 = open_fds(d.pid());
    println!("after closing them: fds {fds2}");
    assert!(
        fds2 <= fds0 + 8,
        "{fds2} fds still open after every session closed"
    );
}

/// 8 sessions × 125 WRITEs, each waiting for its data (R2T sent, no Data-Out yet): the
/// daemon's memory per 1,000 outstanding commands. Then the data goes out and every one
/// must complete GOOD.
#[test]
fn a_thousand_outstanding_commands_are_bounded_and_all_complete() {
    raise_open_file_limit();
    let mut cfg = Config::single_memory_lu(64 * MIB);
    cfg.defaults.push("nop_in_interval = 0".into());
    let d = Daemon::start(&cfg);
    let mut conns: Vec<RawConn> = (0..OUTSTANDING_SESSIONS)
        .map(|i| {
            RawConn::login(
                d.addr(),
                &format!("iqn.2026-11.dev.ironstar:busy-{i}"),
                false,
            )
        })
        .collect();
    // Clear the power-on unit attention of each nexus first.
    for c in &mut conns {
        c.clear_unit_attention();
    }
    settle();
    let rss0 = rss_bytes(d.pid());
    // itt -> (ttt, lba) for each session.
    let mut pending: Vec<Vec<(u32, u32, u32)>> = vec![Vec::new(); OUTSTANDING_SESSIONS];
    for (s, c) in conns.iter_mut().enumerate() {
        let mut itts = Vec::new();
        for k in 0..COMMANDS_PER_SESSION {
            let itt = c.itt();
            let lba = ((s * COMMANDS_PER_SESSION + k) * 8) as u32;
            let w = c.scsi_command(itt, &rw10(0x2a, lba, 8), false, true, 4096);
            assert!(c.send(&w));
            itts.push((itt, lba));
        }
        // Collect the R2Ts.
        let mut ttts = std::collections::HashMap::new();
        while ttts.len() < itts.len() {
            match c.recv() {
                Recv::Pdu(p) if p.opcode_byte() == 0x31 => {
                    let ttt = u32::from_be_bytes([p.bhs[20], p.bhs[21], p.bhs[22], p.bhs[23]]);
                    ttts.insert(p.itt(), ttt);
                }
                Recv::Pdu(p) => panic!(
                    "session {s}: expected R2Ts, got opcode {:#x} status {:#x}",
                    p.opcode_byte(),
                    p.bhs[3]
                ),
                other => panic!("session {s}: only {} R2Ts: {other:?}", ttts.len()),
            }
        }
        pending[s] = itts
            .iter()
            .map(|&(itt, lba)| (itt, ttts[&itt], lba))
            .collect();
    }
    settle();
    let rss1 = rss_bytes(d.pid());
    let total = OUTSTANDING_SESSIONS * COMMANDS_PER_SESSION;
    let grew = rss1.saturating_sub(rss0);
    println!(
        "{total} outstanding WRITEs: daemon RSS {} KiB -> {} KiB ({} KiB per 1,000 commands)",
        rss0 / 1024,
        rss1 / 1024,
        grew * 1000 / total as u64 / 1024
    );
    assert!(
        grew * 1000 / (total as u64) < OUTSTANDING_BUDGET,
        "1,000 outstanding commands cost {grew} bytes"
    );
    for (s, c) in conns.iter_mut().enumerate() {
        for &(itt, ttt, lba) in &pending[s] {
            let d = c.data_out(
                itt,
                ttt,
                0,
                true,
                Bytes::from(vec![(lba % 251) as u8; 4096]),
            );
            assert!(c.send(&d));
        }
        let mut done = 0;
        while done < pending[s].len() {
            match c.recv() {
                Recv::Pdu(p) if p.opcode_byte() == 0x21 => {
                    assert_eq!((p.bhs[2], p.bhs[3]), (0, 0), "session {s}: a WRITE failed");
                    done += 1;
                }
                Recv::Pdu(_) => {}
                other => panic!(
                    "session {s}: {done} of {} done: {other:?}",
                    pending[s].len()
                ),
            }
        }
    }
    for c in &mut conns {
        assert!(c.ping());
    }
}

/// `max_sessions`: once that many sessions are open the next login fails with "out of
/// resources" (3/2); reinstating an open session (same initiator port) is still allowed,
/// and a session that ends makes room.
#[test]
fn logins_beyond_max_sessions_fail_with_out_of_resources() {
    let mut cfg = Config::single_memory_lu(16 * MIB);
    cfg.defaults.push("max_sessions = 3".into());
    let d = Daemon::start(&cfg);
    let name = |i: usize| format!("iqn.2026-11.dev.ironstar:limit-{i}");
    let mut open: Vec<RawConn> = (0..3)
        .map(|i| RawConn::login(d.addr(), &name(i), false))
        .collect();
    match RawConn::try_login(d.addr(), &name(3), false) {
        Err(status) => assert_eq!(status, (3, 2), "the 4th session got {status:?}"),
        Ok(_) => panic!("a 4th session was admitted with max_sessions = 3"),
    }
    // Session reinstatement at the limit: the same initiator port logs in again.
    let again = RawConn::login(d.addr(), &name(0), false);
    let old = open.remove(0);
    drop(old);
    open.push(again);
    // One session ends: room for another.
    open.remove(0).close();
    let deadline = Instant::now() + Duration::from_secs(10);
    let fourth = loop {
        match RawConn::try_login(d.addr(), &name(3), false) {
            Ok(c) => break c,
            Err(s) if Instant::now() < deadline => {
                println!("not yet: {s:?}");
                thread::sleep(Duration::from_millis(100));
            }
            Err(s) => panic!("no room after a session ended: {s:?}"),
        }
    };
    open.push(fourth);
    for c in &mut open {
        assert!(c.ping());
    }
}
