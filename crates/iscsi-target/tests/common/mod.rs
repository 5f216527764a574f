//! A small raw-PDU iSCSI initiator for the target's protocol tests: starts
//! the target in-process on an ephemeral port, logs in with AuthMethod=None
//! and whatever operational keys a test wants, and sends and receives typed
//! PDUs over a plain TCP stream. Every read has a timeout so no test hangs.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iscsi_proto::codec::PduDecoder;
use iscsi_proto::pdu::{
    DataOut, Header, LoginRequest, LoginResponse, NopOut, Pdu, RawPdu, ScsiCommand, ScsiResponse,
    TaskMgmtRequest, TaskMgmtResponse, BHS_LEN, RESERVED_TAG,
};
use iscsi_target::portal::Portal;
use iscsi_target::{Config, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

pub const TARGET: &str = "iqn.2026-11.dev.ironstar:test0";
pub const INITIATOR: &str = "iqn.2026-11.dev.ironstar:client";
/// Default wait for a PDU the test expects.
pub const WAIT: Duration = Duration::from_secs(5);

/// A running target; its portals stop when this is dropped.
pub struct TestTarget {
    pub addr: SocketAddr,
    pub addrs: Vec<SocketAddr>,
    pub registry: Arc<Registry>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestTarget {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The usual test configuration: one target with a 64 MiB memory LUN 0,
/// no target-initiated NOP-In unless `extra` says otherwise.
pub fn basic_toml(defaults: &str) -> String {
    let nop = if defaults.contains("nop_in_interval") {
        ""
    } else {
        "nop_in_interval = 0"
    };
    format!(
        r#"
[[portal_group]]
tag = 1
portals = ["@PG1@"]

[[target]]
iqn = "{TARGET}"
portal_groups = [1]
[[target.lun]]
lun = 0
backend = "memory"
size = "64MiB"

[defaults]
{nop}
{defaults}
"#
    )
}

/// Binds one IPv4 portal for each `@PGn@` placeholder (and one IPv6 portal
/// for each `@PG6n@`), puts the bound addresses into the TOML, and starts
/// the target. `addr` is the first IPv4 portal.
pub async fn start_toml(toml: &str) -> TestTarget {
    let mut text = toml.to_string();
    let mut portals = Vec::new();
    for tag in 1u16..=4 {
        for v6 in [false, true] {
            let ph = if v6 {
                format!("@PG6{tag}@")
            } else {
                format!("@PG{tag}@")
            };
            if !text.contains(&ph) {
                continue;
            }
            let bind: SocketAddr = if v6 {
                "[::1]:0".parse().unwrap()
            } else {
                "127.0.0.1:0".parse().unwrap()
            };
            let p = Portal::bind(bind, tag).await.unwrap();
            text = text.replace(&ph, &p.addr.to_string());
            portals.push(p);
        }
    }
    let cfg = Config::from_toml(&text).unwrap();
    let registry = Arc::new(Registry::build(&cfg).unwrap());
    let addrs: Vec<SocketAddr> = portals.iter().map(|p| p.addr).collect();
    let addr = *addrs.iter().find(|a| a.is_ipv4()).unwrap_or(&addrs[0]);
    let tasks = portals
        .into_iter()
        .map(|p| tokio::spawn(p.run(registry.clone())))
        .collect();
    TestTarget {
        addr,
        addrs,
        registry,
        tasks,
    }
}

pub async fn start(defaults: &str) -> TestTarget {
    start_toml(&basic_toml(defaults)).await
}

/// Logs in another connection (`cid`) into `a`'s session at `addr`, from
/// `a`'s CmdSN on; the login must succeed into that same session.
pub async fn join(addr: SocketAddr, a: &Client, opts: &LoginOpts, cid: u16) -> Client {
    let mut b = Client::connect(addr).await;
    b.cmd_sn = a.cmd_sn;
    let r = b
        .login(&LoginOpts {
            tsih: a.tsih,
            cid,
            ..opts.clone()
        })
        .await;
    assert_eq!((r.status_class, r.status_detail), (0, 0), "{r:?}");
    assert_eq!(r.tsih, a.tsih);
    b
}

/// How to log in.
#[derive(Clone, Debug)]
pub struct LoginOpts {
    pub initiator: String,
    pub target: Option<String>,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub cid: u16,
    pub discovery: bool,
    /// Operational keys sent in the operational stage.
    pub keys: Vec<(String, String)>,
}

impl LoginOpts {
    pub fn normal(isid_tail: u8) -> Self {
        LoginOpts {
            initiator: INITIATOR.to_string(),
            target: Some(TARGET.to_string()),
            isid: [0x80, 0x12, 0x34, 0x56, 0x00, isid_tail],
            tsih: 0,
            cid: 1,
            discovery: false,
            keys: Vec::new(),
        }
    }

    pub fn discovery(isid_tail: u8) -> Self {
        LoginOpts {
            target: None,
            discovery: true,
            ..LoginOpts::normal(isid_tail)
        }
    }

    pub fn key(mut self, k: &str, v: &str) -> Self {
        self.keys.retain(|(key, _)| key != k);
        self.keys.push((k.to_string(), v.to_string()));
        self
    }
}

/// What a command produced.
#[derive(Debug, Default)]
pub struct CmdResult {
    pub status: u8,
    pub sense: Option<Vec<u8>>,
    pub data: Vec<u8>,
    pub data_ins: Vec<iscsi_proto::pdu::DataIn>,
    /// Data segment length of each Data-In.
    pub data_in_lens: Vec<usize>,
    pub response: Option<ScsiResponse>,
    pub r2ts: Vec<iscsi_proto::pdu::R2t>,
}

impl CmdResult {
    /// (sense key, ASC, ASCQ), fixed or descriptor format.
    pub fn sense_code(&self) -> Option<(u8, u8, u8)> {
        let s = self.sense.as_ref()?;
        match s.first()? & 0x7f {
            0x70 | 0x71 => Some((s.get(2)? & 0x0f, *s.get(12)?, *s.get(13)?)),
            0x72 | 0x73 => Some((s.get(1)? & 0x0f, *s.get(2)?, *s.get(3)?)),
            _ => None,
        }
    }
}

/// Why a read ended without a PDU.
#[derive(Debug, PartialEq, Eq)]
pub enum RecvEnd {
    Timeout,
    Eof,
}

/// One initiator connection.
pub struct Client {
    pub stream: TcpStream,
    buf: BytesMut,
    dec: PduDecoder,
    pub header_digest: bool,
    pub data_digest: bool,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub next_itt: u32,
    pub tsih: u16,
    pub isid: [u8; 6],
    pub cid: u16,
    /// ExpCmdSN / MaxCmdSN last seen.
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    /// The keys the target answered or declared during login.
    pub target_keys: HashMap<String, String>,
    /// The keys we sent in the operational stage.
    pub our_keys: HashMap<String, String>,
    /// The LUN commands go to (see [`Client::run_on`]).
    pub lun: u64,
}

pub fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    iscsi_proto::text::encode(pairs, &mut out);
    out
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: BytesMut::with_capacity(1 << 20),
            dec: PduDecoder::new(16 << 20),
            header_digest: false,
            data_digest: false,
            cmd_sn: 1,
            exp_stat_sn: 0,
            next_itt: 0x100,
            tsih: 0,
            isid: [0; 6],
            cid: 0,
            exp_cmd_sn: 0,
            max_cmd_sn: 0,
            target_keys: HashMap::new(),
            our_keys: HashMap::new(),
            lun: 0,
        }
    }

    /// Connects and logs in; panics if the login fails.
    pub async fn login_to(addr: SocketAddr, opts: LoginOpts) -> Client {
        let mut c = Client::connect(addr).await;
        let r = c.login(&opts).await;
        assert_eq!(
            (r.status_class, r.status_detail),
            (0, 0),
            "login failed: {r:?}"
        );
        c
    }

    pub fn itt(&mut self) -> u32 {
        let i = self.next_itt;
        self.next_itt = self.next_itt.wrapping_add(1);
        i
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    pub async fn send(&mut self, pdu: &Pdu) {
        let mut out = BytesMut::new();
        pdu.encode(self.header_digest, self.data_digest, &mut out);
        self.send_bytes(&out).await;
    }

    /// The next raw PDU within `wait`.
    pub async fn recv_raw_within(&mut self, wait: Duration) -> Result<RawPdu, RecvEnd> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(raw) = self
                .dec
                .decode(&mut self.buf)
                .expect("target sent a bad PDU")
            {
                return Ok(raw);
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf));
            match read.await {
                Err(_) => return Err(RecvEnd::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(RecvEnd::Eof),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next PDU within `wait`, with sequence numbers noted.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Pdu, RecvEnd> {
        let raw = self.recv_raw_within(wait).await?;
        let pdu = raw.parse().expect("target sent an unparsable PDU");
        self.note(&pdu.header);
        Ok(pdu)
    }

    /// The next PDU; panics after [`WAIT`] or on EOF.
    pub async fn recv(&mut self) -> Pdu {
        match self.recv_within(WAIT).await {
            Ok(p) => p,
            Err(e) => panic!("expected a PDU, got {e:?}"),
        }
    }

    /// Asserts that nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        match self.recv_within(wait).await {
            Err(RecvEnd::Timeout) => {}
            Err(RecvEnd::Eof) => panic!("connection closed, expected silence"),
            Ok(p) => panic!("expected silence, got {:?}", p.header),
        }
    }

    /// Reads until the target closes the connection; returns what came
    /// before. Panics if it stays open for `wait`.
    pub async fn expect_eof(&mut self, wait: Duration) -> Vec<Pdu> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Err(RecvEnd::Eof) => return seen,
                Err(RecvEnd::Timeout) => {
                    panic!("connection still open after {wait:?}; got {seen:?}")
                }
                Ok(p) => seen.push(p),
            }
        }
    }

    fn note(&mut self, h: &Header) {
        let (stat, exp, max, status) = match h {
            Header::ScsiResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true),
            Header::DataIn(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, h.status_present),
            Header::NopIn(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, h.itt != RESERVED_TAG),
            Header::TaskMgmtResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true),
            Header::TextResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true),
            Header::LogoutResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true),
            Header::Reject(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true),
            Header::AsyncMessage(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, true),
            Header::R2t(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn, false),
            _ => return,
        };
        if status {
            self.exp_stat_sn = stat.wrapping_add(1);
        }
        self.exp_cmd_sn = exp;
        self.max_cmd_sn = max;
    }

    fn login_pdu(&self, opts: &LoginOpts, csg: u8, nsg: u8, itt: u32, data: Vec<u8>) -> Pdu {
        Pdu::new(
            Header::LoginRequest(LoginRequest {
                transit: true,
                cont: false,
                csg,
                nsg,
                version_max: 0,
                version_min: 0,
                isid: opts.isid,
                tsih: opts.tsih,
                itt,
                cid: opts.cid,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            Bytes::from(data),
        )
    }

    async fn login_step(&mut self, pdu: Pdu) -> LoginResponse {
        self.send(&pdu).await;
        let resp = self.recv().await;
        let Header::LoginResponse(h) = resp.header else {
            panic!("expected a Login Response, got {:?}", resp.header);
        };
        for (k, v) in iscsi_proto::text::parse_list(&resp.data).unwrap_or_default() {
            self.target_keys.insert(k, v);
        }
        self.exp_stat_sn = h.stat_sn.wrapping_add(1);
        h
    }

    /// Logs in (security stage with AuthMethod=None, then the operational
    /// stage with `opts.keys`); returns the last Login Response, successful
    /// or not. On success digests are switched on as negotiated.
    pub async fn login(&mut self, opts: &LoginOpts) -> LoginResponse {
        self.isid = opts.isid;
        self.cid = opts.cid;
        let itt = self.itt();
        let mut first: Vec<(&str, &str)> = vec![("InitiatorName", opts.initiator.as_str())];
        if let Some(t) = &opts.target {
            first.push(("TargetName", t.as_str()));
        }
        first.push((
            "SessionType",
            if opts.discovery {
                "Discovery"
            } else {
                "Normal"
            },
        ));
        first.push(("AuthMethod", "None"));
        let pdu = self.login_pdu(opts, 0, 1, itt, text(&first));
        let h = self.login_step(pdu).await;
        if h.status_class != 0 {
            return h;
        }
        assert!(h.transit && h.nsg == 1, "security stage did not end: {h:?}");
        let pairs: Vec<(&str, &str)> = opts
            .keys
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.our_keys = opts.keys.iter().cloned().collect();
        let mut data = text(&pairs);
        for _ in 0..4 {
            let pdu = self.login_pdu(opts, 1, 3, itt, std::mem::take(&mut data));
            let h = self.login_step(pdu).await;
            if h.status_class != 0 {
                return h;
            }
            if h.transit && h.nsg == 3 {
                self.tsih = h.tsih;
                self.cmd_sn = h.exp_cmd_sn;
                self.exp_cmd_sn = h.exp_cmd_sn;
                self.max_cmd_sn = h.max_cmd_sn;
                self.header_digest =
                    self.target_keys.get("HeaderDigest").map(String::as_str) == Some("CRC32C");
                self.data_digest =
                    self.target_keys.get("DataDigest").map(String::as_str) == Some("CRC32C");
                self.dec.header_digest = self.header_digest;
                self.dec.data_digest = self.data_digest;
                return h;
            }
        }
        panic!("login did not reach full feature phase");
    }

    /// A negotiated numeric or boolean value: the target's answer to our
    /// offer, else our offer, else `default`.
    pub fn param(&self, key: &str, default: &str) -> String {
        self.target_keys
            .get(key)
            .or_else(|| self.our_keys.get(key))
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    pub fn param_u32(&self, key: &str, default: u32) -> u32 {
        self.param(key, &default.to_string()).parse().unwrap()
    }

    /// The largest data segment the target accepts from us.
    pub fn target_mrdsl(&self) -> u32 {
        self.target_keys
            .get("MaxRecvDataSegmentLength")
            .and_then(|v| v.parse().ok())
            .unwrap_or(8192)
    }

    /// A SCSI Command PDU taking the next CmdSN and a fresh ITT.
    pub fn command(
        &mut self,
        cdb: &[u8],
        edtl: u32,
        read: bool,
        write: bool,
        final_: bool,
        imm: Bytes,
    ) -> (u32, Pdu) {
        let itt = self.itt();
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let pdu = Pdu::new(
            Header::ScsiCommand(ScsiCommand {
                immediate: false,
                final_,
                read,
                write,
                attr: iscsi_proto::pdu::task_attr::SIMPLE,
                lun: iscsi_proto::pdu::lun_to_wire(self.lun),
                itt,
                expected_data_transfer_length: edtl,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                cdb: c,
                extended_cdb: None,
                bidi_read_length: None,
            }),
            imm,
        );
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        (itt, pdu)
    }

    /// Collects a command's Data-In and status. Answers R2Ts with `data`
    /// (if given); panics on anything for another task.
    pub async fn finish(&mut self, itt: u32, data: Option<&[u8]>) -> CmdResult {
        let mut r = CmdResult::default();
        loop {
            let p = self.recv().await;
            match p.header {
                Header::DataIn(h) => {
                    assert_eq!(h.itt, itt, "Data-In for another task");
                    let off = h.buffer_offset as usize;
                    if r.data.len() < off + p.data.len() {
                        r.data.resize(off + p.data.len(), 0);
                    }
                    r.data[off..off + p.data.len()].copy_from_slice(&p.data);
                    let done = h.status_present;
                    if done {
                        r.status = h.status;
                    }
                    r.data_ins.push(h);
                    r.data_in_lens.push(p.data.len());
                    if done {
                        return r;
                    }
                }
                Header::ScsiResponse(h) => {
                    assert_eq!(h.itt, itt, "SCSI Response for another task");
                    r.status = h.status;
                    if p.data.len() >= 2 {
                        let n = u16::from_be_bytes([p.data[0], p.data[1]]) as usize;
                        r.sense = Some(p.data[2..2 + n].to_vec());
                    }
                    r.response = Some(h);
                    return r;
                }
                Header::R2t(h) => {
                    assert_eq!(h.itt, itt, "R2T for another task");
                    let data = data.expect("R2T for a command without data");
                    self.answer_r2t(&h, data).await;
                    r.r2ts.push(h);
                }
                other => panic!("unexpected PDU while waiting for task {itt:#x}: {other:?}"),
            }
        }
    }

    /// Sends the Data-Out PDUs an R2T asks for.
    pub async fn answer_r2t(&mut self, h: &iscsi_proto::pdu::R2t, data: &[u8]) {
        let start = h.buffer_offset;
        let end = start + h.desired_data_transfer_length;
        self.data_out(h.itt, h.ttt, start, end, data).await;
    }

    /// Data-Out PDUs for `data[start..end]`, each at most the target's
    /// MaxRecvDataSegmentLength, DataSN from 0, F on the last.
    pub async fn data_out(&mut self, itt: u32, ttt: u32, start: u32, end: u32, data: &[u8]) {
        let seg = self.target_mrdsl().min(65536);
        let mut off = start;
        let mut sn = 0;
        let mut wire = BytesMut::new();
        while off < end {
            let len = seg.min(end - off);
            let pdu = Pdu::new(
                Header::DataOut(DataOut {
                    final_: off + len == end,
                    lun: 0,
                    itt,
                    ttt,
                    exp_stat_sn: self.exp_stat_sn,
                    data_sn: sn,
                    buffer_offset: off,
                }),
                Bytes::copy_from_slice(&data[off as usize..(off + len) as usize]),
            );
            pdu.encode(self.header_digest, self.data_digest, &mut wire);
            off += len;
            sn += 1;
        }
        self.send_bytes(&wire).await;
    }

    /// Runs a command to completion: immediate data and unsolicited
    /// Data-Out as negotiated, then R2Ts.
    pub async fn run(&mut self, cdb: &[u8], edtl_in: u32, data_out: Option<&[u8]>) -> CmdResult {
        match data_out {
            None => {
                let (itt, pdu) = self.command(cdb, edtl_in, edtl_in > 0, false, true, Bytes::new());
                self.send(&pdu).await;
                self.finish(itt, None).await
            }
            Some(data) => {
                let edtl = data.len() as u32;
                let immediate = self.param("ImmediateData", "Yes") == "Yes";
                let initial_r2t = self.param("InitialR2T", "Yes") == "Yes";
                let first_burst = self.param_u32("FirstBurstLength", 65536).min(edtl);
                let imm_len = if immediate {
                    first_burst.min(self.target_mrdsl())
                } else {
                    0
                };
                let unsolicited = !initial_r2t && imm_len < first_burst;
                let (itt, pdu) = self.command(
                    cdb,
                    edtl,
                    false,
                    true,
                    !unsolicited,
                    Bytes::copy_from_slice(&data[..imm_len as usize]),
                );
                self.send(&pdu).await;
                if unsolicited {
                    self.data_out(itt, RESERVED_TAG, imm_len, first_burst, data)
                        .await;
                }
                self.finish(itt, Some(data)).await
            }
        }
    }

    /// [`Client::run`] on `lun` instead of LUN 0.
    pub async fn run_on(
        &mut self,
        lun: u64,
        cdb: &[u8],
        edtl_in: u32,
        data_out: Option<&[u8]>,
    ) -> CmdResult {
        let before = std::mem::replace(&mut self.lun, lun);
        let r = self.run(cdb, edtl_in, data_out).await;
        self.lun = before;
        r
    }

    pub async fn tur(&mut self) -> CmdResult {
        self.run(&[0u8; 6], 0, None).await
    }

    /// TEST UNIT READY until GOOD (the first command of a new nexus sees
    /// 29/00 POWER ON).
    pub async fn clear_ua(&mut self) {
        for _ in 0..4 {
            if self.tur().await.status == 0 {
                return;
            }
        }
        panic!("unit attention does not clear");
    }

    /// [`Client::clear_ua`] on `lun`.
    pub async fn clear_ua_on(&mut self, lun: u64) {
        let before = std::mem::replace(&mut self.lun, lun);
        self.clear_ua().await;
        self.lun = before;
    }

    pub async fn read10(&mut self, lba: u32, blocks: u16) -> CmdResult {
        self.run(&read10_cdb(lba, blocks), u32::from(blocks) * 512, None)
            .await
    }

    pub async fn write10(&mut self, lba: u32, data: &[u8]) -> CmdResult {
        let blocks = (data.len() / 512) as u16;
        self.run(&write10_cdb(lba, blocks), 0, Some(data)).await
    }

    /// A NOP-Out ping (non-immediate, takes a CmdSN) with `data`.
    pub fn nop_out(&mut self, data: &[u8]) -> (u32, Pdu) {
        let itt = self.itt();
        let pdu = Pdu::new(
            Header::NopOut(NopOut {
                immediate: false,
                lun: 0,
                itt,
                ttt: RESERVED_TAG,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            Bytes::copy_from_slice(data),
        );
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        (itt, pdu)
    }

    /// The next PDU, which must be a Reject: its reason and data (the
    /// rejected PDU's header).
    pub async fn recv_reject(&mut self) -> (u8, Bytes) {
        let p = self.recv().await;
        let Header::Reject(h) = p.header else {
            panic!("expected a Reject, got {:?}", p.header);
        };
        (h.reason, p.data)
    }

    /// Pings and checks the echo.
    pub async fn ping(&mut self) {
        let (itt, pdu) = self.nop_out(b"ping");
        self.send(&pdu).await;
        let mut p = self.recv().await;
        // The target may ping an idle connection at the same moment: answer
        // its NOP-In (reserved ITT) and keep waiting for our echo.
        while let Header::NopIn(h) = &p.header {
            if h.itt != RESERVED_TAG {
                break;
            }
            let answer = Pdu::new(
                Header::NopOut(NopOut {
                    immediate: true,
                    itt: RESERVED_TAG,
                    ttt: h.ttt,
                    cmd_sn: self.cmd_sn,
                    exp_stat_sn: self.exp_stat_sn,
                    ..Default::default()
                }),
                Bytes::new(),
            );
            self.send(&answer).await;
            p = self.recv().await;
        }
        match p.header {
            Header::NopIn(h) => {
                assert_eq!(h.itt, itt);
                assert_eq!(&p.data[..], b"ping");
            }
            other => panic!("expected NOP-In, got {other:?}"),
        }
    }

    /// An immediate task management request.
    pub async fn tmf(&mut self, function: u8, lun: u64, referenced: u32, ref_cmd_sn: u32) -> u8 {
        let itt = self.itt();
        let pdu = Pdu::new(
            Header::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function,
                lun: iscsi_proto::pdu::lun_to_wire(lun),
                itt,
                referenced_task_tag: referenced,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
                ref_cmd_sn,
                exp_data_sn: 0,
            }),
            Bytes::new(),
        );
        self.send(&pdu).await;
        let p = self.recv().await;
        match p.header {
            Header::TaskMgmtResponse(TaskMgmtResponse {
                response, itt: i, ..
            }) => {
                assert_eq!(i, itt);
                response
            }
            other => panic!("expected a TMF response, got {other:?}"),
        }
    }

    /// Logout with `reason` for connection `cid`; returns the response code.
    pub async fn logout(&mut self, reason: u8, cid: u16) -> u8 {
        let itt = self.itt();
        let pdu = Pdu::new(
            Header::LogoutRequest(iscsi_proto::pdu::LogoutRequest {
                immediate: true,
                reason,
                itt,
                cid,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            }),
            Bytes::new(),
        );
        self.send(&pdu).await;
        let p = self.recv().await;
        match p.header {
            Header::LogoutResponse(h) => {
                assert_eq!(h.itt, itt);
                h.response
            }
            other => panic!("expected a Logout Response, got {other:?}"),
        }
    }

    /// Sends a Text Request and returns the whole (possibly continued)
    /// response text.
    pub async fn text_request(&mut self, data: &[u8]) -> Vec<u8> {
        let itt = self.itt();
        let mut ttt = RESERVED_TAG;
        let mut out = Vec::new();
        let mut payload = Bytes::copy_from_slice(data);
        loop {
            let pdu = Pdu::new(
                Header::TextRequest(iscsi_proto::pdu::TextRequest {
                    immediate: true,
                    final_: true,
                    cont: false,
                    lun: 0,
                    itt,
                    ttt,
                    cmd_sn: self.cmd_sn,
                    exp_stat_sn: self.exp_stat_sn,
                }),
                std::mem::take(&mut payload),
            );
            self.send(&pdu).await;
            let p = self.recv().await;
            let Header::TextResponse(h) = p.header else {
                panic!("expected a Text Response, got {:?}", p.header);
            };
            assert_eq!(h.itt, itt);
            out.extend_from_slice(&p.data);
            if h.final_ {
                return out;
            }
            ttt = h.ttt;
        }
    }
}

pub fn read10_cdb(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn write10_cdb(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x2a;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// Recognisable data: every 4-byte word holds its offset plus `seed`.
pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len / 4)
        .flat_map(|i| (i as u32 * 4).wrapping_add(seed).to_be_bytes())
        .collect()
}

/// The 48-byte BHS of a PDU, as the target would echo it in a Reject.
pub fn bhs_of(pdu: &Pdu) -> [u8; BHS_LEN] {
    let mut out = BytesMut::new();
    pdu.encode(false, false, &mut out);
    let mut b = [0u8; BHS_LEN];
    b.copy_from_slice(&out[..BHS_LEN]);
    b
}
