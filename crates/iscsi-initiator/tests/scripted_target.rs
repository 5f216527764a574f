//! Session behaviours that a well-behaved target never provokes, pinned
//! against a scripted target: idm's own `TargetLogin` for the login, then a
//! script that answers (or withholds) PDUs over a real loopback socket.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use idm::login::{
    Admission, Binding, LoginAuthority, LoginIdentity, LoginOutcome, LoginStep, TargetLogin,
};
use idm::tcp::{TcpRx, TcpTransport, TcpTx};
use idm::transport::{PduRx, PduTx, Transport};
use iscsi_initiator::portal::Portal;
use iscsi_initiator::session::Reply;
use iscsi_initiator::{Error, Session, SessionOptions};
use iscsi_proto::negotiation::Policy;
use iscsi_proto::pdu::{
    tmf, DataIn, Header, NopIn, Pdu, ScsiCommand, ScsiResponse, TaskMgmtResponse, RESERVED_TAG,
};
use tokio::net::TcpListener;

const IQN: &str = "iqn.2026-11.dev.ironstar.test:scripted";

struct Window(u32);

impl LoginAuthority for Window {
    fn admit(&self, _who: &LoginIdentity) -> Result<Admission, (u8, u8)> {
        Ok(Admission {
            chap: None,
            policy: Policy::default(),
        })
    }
    fn bind(&self, outcome: &LoginOutcome) -> Result<Binding, (u8, u8)> {
        Ok(Binding {
            tsih: 3,
            exp_cmd_sn: outcome.cmd_sn,
            max_cmd_sn: outcome.cmd_sn.wrapping_add(self.0 - 1),
        })
    }
}

async fn recv(rx: &mut TcpRx) -> Pdu {
    rx.recv().await.unwrap().unwrap().parse().unwrap()
}

/// Accepts one connection and logs it in with a command window of `depth`.
async fn accept(listener: TcpListener, depth: u32) -> (TcpRx, TcpTx) {
    let (sock, _) = listener.accept().await.unwrap();
    let (mut rx, mut tx) = TcpTransport::new(sock).unwrap().into_split();
    let mut login = TargetLogin::new(1);
    loop {
        let pdu = recv(&mut rx).await;
        let Header::LoginRequest(req) = &pdu.header else {
            panic!("expected a login request, got {:?}", pdu.header.opcode())
        };
        match login.handle(req, &pdu.data, &Window(depth)) {
            LoginStep::Continue(p) => tx.send(&[p]).await.unwrap(),
            LoginStep::Complete(p, _) => {
                tx.send(&[p]).await.unwrap();
                return (rx, tx);
            }
            LoginStep::Fail(p, s) => {
                tx.send(&[p]).await.unwrap();
                panic!("login failed: {s:?}");
            }
        }
    }
}

async fn setup(
    depth: u32,
    timeout: Duration,
) -> (tokio::task::JoinHandle<(TcpRx, TcpTx)>, Session) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = tokio::spawn(accept(listener, depth));
    let mut o = SessionOptions::new("iqn.2026-11.dev.ironstar.test:ini");
    o.command_timeout = timeout;
    let s = Session::login(&Portal::new("127.0.0.1", port), IQN, o)
        .await
        .unwrap();
    (target, s)
}

fn good(itt: u32, stat_sn: u32, exp: u32, max: u32) -> Pdu {
    Pdu::new(
        Header::ScsiResponse(ScsiResponse {
            itt,
            stat_sn,
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            ..Default::default()
        }),
        Bytes::new(),
    )
}

const TEST_UNIT_READY: [u8; 6] = [0; 6];
/// READ(10) of LBA 0, one block.
const READ_ONE_BLOCK: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];

/// Starts `cdb` on LUN 0 and returns the pending call with the SCSI
/// Command the target received for it.
async fn issue(
    s: &Session,
    rx: &mut TcpRx,
    cdb: &'static [u8],
    expected_in_len: u32,
) -> (tokio::task::JoinHandle<Result<Reply, Error>>, ScsiCommand) {
    let lun = s.lun(0);
    let call = tokio::spawn(async move { lun.execute(cdb, None, expected_in_len).await });
    let pdu = recv(rx).await;
    let Header::ScsiCommand(c) = pdu.header else {
        panic!("expected a command")
    };
    (call, c)
}

/// `h` as the final Data-In of its command, with status, carrying 512
/// zero bytes.
fn last_data_in(h: DataIn) -> Pdu {
    Pdu::new(
        Header::DataIn(DataIn {
            final_: true,
            status_present: true,
            ttt: RESERVED_TAG,
            ..h
        }),
        Bytes::from(vec![0u8; 512]),
    )
}

#[tokio::test]
async fn cmd_sn_window_is_respected_until_max_cmd_sn_opens() {
    let (target, s) = setup(1, Duration::from_secs(5)).await;
    let (mut rx, mut tx) = target.await.unwrap();
    let lun = s.lun(0);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let lun = lun.clone();
        set.spawn(async move { lun.test_unit_ready().await });
    }
    for stat_sn in 1..=3 {
        let pdu = recv(&mut rx).await;
        let Header::ScsiCommand(c) = &pdu.header else {
            panic!("expected a command")
        };
        // Window of one: nothing else may arrive before we open it.
        let early = tokio::time::timeout(Duration::from_millis(150), rx.recv()).await;
        assert!(early.is_err(), "a command arrived beyond MaxCmdSN");
        let next = c.cmd_sn.wrapping_add(1);
        tx.send(&[good(c.itt, stat_sn, next, next)]).await.unwrap();
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
}

#[tokio::test]
async fn target_nop_in_ping_is_echoed() {
    let (target, s) = setup(8, Duration::from_secs(5)).await;
    let (mut rx, mut tx) = target.await.unwrap();
    let ping = Pdu::new(
        Header::NopIn(NopIn {
            itt: RESERVED_TAG,
            ttt: 0x1234,
            stat_sn: 1,
            exp_cmd_sn: 1,
            max_cmd_sn: 8,
            ..Default::default()
        }),
        Bytes::from_static(b"are you there"),
    );
    tx.send(&[ping]).await.unwrap();
    let pdu = recv(&mut rx).await;
    let Header::NopOut(h) = &pdu.header else {
        panic!("expected a NOP-Out, got {:?}", pdu.header.opcode())
    };
    assert_eq!((h.itt, h.ttt, h.immediate), (RESERVED_TAG, 0x1234, true));
    assert_eq!(&pdu.data[..], b"are you there");
    drop(s);
}

#[tokio::test]
async fn command_timeout_fails_the_command_and_aborts_it() {
    let (target, s) = setup(8, Duration::from_millis(300)).await;
    let (mut rx, mut tx) = target.await.unwrap();
    let (call, c) = issue(&s, &mut rx, &TEST_UNIT_READY, 0).await;
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    let pdu = recv(&mut rx).await;
    let Header::TaskMgmtRequest(t) = &pdu.header else {
        panic!("expected ABORT TASK, got {:?}", pdu.header.opcode())
    };
    assert_eq!(t.function, tmf::ABORT_TASK);
    assert_eq!((t.referenced_task_tag, t.ref_cmd_sn), (c.itt, c.cmd_sn));
    let resp = Pdu::new(
        Header::TaskMgmtResponse(TaskMgmtResponse {
            response: tmf::FUNCTION_COMPLETE,
            itt: t.itt,
            stat_sn: 1,
            exp_cmd_sn: 2,
            max_cmd_sn: 9,
        }),
        Bytes::new(),
    );
    tx.send(&[resp]).await.unwrap();
    // The session is still usable.
    let (call, c) = issue(&s, &mut rx, &TEST_UNIT_READY, 0).await;
    tx.send(&[good(c.itt, 2, 3, 10)]).await.unwrap();
    call.await.unwrap().unwrap();
}

#[tokio::test]
async fn data_in_with_a_data_sn_gap_fails_only_that_command() {
    let (target, s) = setup(8, Duration::from_secs(5)).await;
    let (mut rx, mut tx) = target.await.unwrap();
    let (call, c) = issue(&s, &mut rx, &READ_ONE_BLOCK, 512).await;
    let bad = last_data_in(DataIn {
        itt: c.itt,
        stat_sn: 1,
        exp_cmd_sn: 2,
        max_cmd_sn: 9,
        data_sn: 1,
        ..Default::default()
    });
    tx.send(&[bad]).await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("DataSN"), "{err}");
    // A Data-In past the buffer fails the next one the same way, no panic.
    let (call, c) = issue(&s, &mut rx, &READ_ONE_BLOCK, 512).await;
    let over = last_data_in(DataIn {
        itt: c.itt,
        stat_sn: 2,
        exp_cmd_sn: 3,
        max_cmd_sn: 10,
        buffer_offset: 256,
        ..Default::default()
    });
    tx.send(&[over]).await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("beyond"), "{err}");
    assert!(s.closed_reason().is_none());
}

/// An MC/S target that hands out TSIH 3, 4, ... and refuses any login that
/// would reinstate a connection (a CID it has seen in that session), as a
/// target without connection reinstatement does.
#[derive(Default)]
struct NoConnectionReinstatement {
    sessions: AtomicU16,
    seen: Mutex<Vec<(u16, u16)>>,
}

impl LoginAuthority for NoConnectionReinstatement {
    fn admit(&self, _who: &LoginIdentity) -> Result<Admission, (u8, u8)> {
        Ok(Admission {
            chap: None,
            policy: Policy {
                max_connections: 4,
                ..Policy::default()
            },
        })
    }
    fn bind(&self, outcome: &LoginOutcome) -> Result<Binding, (u8, u8)> {
        let who = &outcome.identity;
        let tsih = match who.tsih {
            0 => 3 + self.sessions.fetch_add(1, Ordering::SeqCst),
            t => t,
        };
        let mut seen = self.seen.lock().unwrap();
        if seen.contains(&(tsih, who.cid)) {
            // 0x0208: cannot include in session.
            return Err((2, 8));
        }
        seen.push((tsih, who.cid));
        Ok(Binding {
            tsih,
            exp_cmd_sn: outcome.cmd_sn,
            max_cmd_sn: outcome.cmd_sn.wrapping_add(7),
        })
    }
}

/// Logs in every connection that comes and hands the logged-in ones to the
/// test as (TSIH, CID, halves); refused logins are reported as `None`.
fn mcs_acceptor(
    listener: TcpListener,
    authority: Arc<NoConnectionReinstatement>,
) -> tokio::sync::mpsc::UnboundedReceiver<Option<(u16, u16, TcpRx, TcpTx)>> {
    let (out, logins) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (mut rx, mut tx) = TcpTransport::new(sock).unwrap().into_split();
            let (authority, out) = (authority.clone(), out.clone());
            tokio::spawn(async move {
                let mut login = TargetLogin::new(1);
                loop {
                    let Ok(Some(raw)) = rx.recv().await else {
                        return;
                    };
                    let pdu = raw.parse().unwrap();
                    let Header::LoginRequest(req) = &pdu.header else {
                        return;
                    };
                    match login.handle(req, &pdu.data, authority.as_ref()) {
                        LoginStep::Continue(p) => tx.send(&[p]).await.unwrap(),
                        LoginStep::Complete(p, outcome) => {
                            tx.send(&[p]).await.unwrap();
                            // The outcome does not say; bind() just recorded it.
                            let tsih = authority
                                .seen
                                .lock()
                                .unwrap()
                                .iter()
                                .rev()
                                .find(|(_, cid)| *cid == outcome.identity.cid)
                                .map_or(0, |(t, _)| *t);
                            let _ = out.send(Some((tsih, outcome.identity.cid, rx, tx)));
                            return;
                        }
                        LoginStep::Fail(p, _) => {
                            let _ = tx.send(&[p]).await;
                            let _ = out.send(None);
                            return;
                        }
                    }
                }
            });
        }
    });
    logins
}

#[tokio::test]
async fn refused_connection_reinstatement_falls_back_to_session_reinstatement() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut logins = mcs_acceptor(listener, Default::default());
    let mut o = SessionOptions::new("iqn.2026-11.dev.ironstar.test:ini");
    o.connections = 2;
    o.replacement_timeout = Duration::from_secs(10);
    let s = Session::login(&Portal::new("127.0.0.1", port), IQN, o)
        .await
        .unwrap();
    let (first, second) = (logins.recv().await.unwrap(), logins.recv().await.unwrap());
    let (Some((3, 0, ..)), Some((3, 1, rx, tx))) = (&first, second) else {
        panic!("expected CIDs 0 and 1 of TSIH 3");
    };
    assert_eq!(s.connection_commands().len(), 2);
    // The target drops CID 1; the initiator tries to reinstate it, is
    // refused, and reinstates the session instead.
    drop((rx, tx));
    assert!(logins.recv().await.unwrap().is_none(), "no refused login");
    let mut again = Vec::new();
    let mut open = Vec::new();
    for _ in 0..2 {
        let Some((tsih, cid, rx, tx)) = logins.recv().await.unwrap() else {
            panic!("a login of the new session was refused");
        };
        again.push((tsih, cid));
        open.push((rx, tx));
    }
    assert_eq!(again, [(4, 0), (4, 1)]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while s.connection_commands().len() < 2 || s.reconnects() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.reconnects(), 1);
    assert_eq!(s.connection_reinstatements(), 0);
    assert_eq!(s.tsih(), 4);
    drop((first, open));
}
