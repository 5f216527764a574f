//! seedgen: turns real iSCSI traffic into seed corpora for the fuzz targets.
//!
//! `seedgen proxy LISTEN UPSTREAM DIR` is a recording TCP proxy: point an
//! initiator (iscsi-test-cu, iscsi-inq, ...) at LISTEN, it forwards to
//! iscsitd at UPSTREAM and writes each connection's two byte streams to
//! DIR/conn-N.i2t and DIR/conn-N.t2i. It stops when DIR/stop appears.
//!
//! `seedgen seeds DIR CORPUS` splits those streams into PDUs with our own
//! decoder (`iscsi_proto::codec::PduDecoder`) and writes, under
//! CORPUS/<target>/, one seed per distinct PDU (pdu_decoder), per login
//! (text_negotiation) and per CDB (scsi_cdb), plus a few whole-connection
//! seeds; sizes are capped so the committed corpus stays small.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use bytes::BytesMut;
use iscsi_proto::codec::PduDecoder;
use iscsi_proto::pdu::{Header, Pdu};
use iscsi_proto::text;

#[allow(dead_code)]
#[path = "../../src/format.rs"]
mod format;

/// A PDU seed larger than this is skipped (big writes and reads add bytes, not paths).
const MAX_PDU_SEED: usize = 1200;
/// Data-out kept with a CDB seed.
const MAX_CDB_DATA: usize = 1024;
/// Seeds of one kind (by opcode / CDB opcode) at most.
const PER_KIND: usize = 12;
/// Whole-connection seeds per target at most.
const MAX_CONN_SEEDS: usize = 24;

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("proxy") if args.len() == 5 => proxy(&args[2], &args[3], Path::new(&args[4])),
        Some("seeds") if args.len() == 4 => seeds(Path::new(&args[2]), Path::new(&args[3])),
        _ => {
            eprintln!("usage: seedgen proxy LISTEN UPSTREAM DIR | seedgen seeds DIR CORPUS");
            std::process::exit(2);
        }
    }
}

// ---------------------------------------------------------------- recording

fn pump(mut from: TcpStream, mut to: TcpStream, record: PathBuf) {
    let Ok(mut file) = fs::File::create(&record) else {
        return;
    };
    let mut buf = [0u8; 65536];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let chunk = &buf[..n];
                if file.write_all(chunk).is_err() || to.write_all(chunk).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn proxy(listen: &str, upstream: &str, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let listener = TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let next = Arc::new(AtomicUsize::new(0));
    eprintln!(
        "seedgen: recording {listen} -> {upstream} into {}",
        dir.display()
    );
    while !dir.join("stop").exists() {
        match listener.accept() {
            Ok((client, _)) => {
                client.set_nonblocking(false)?;
                let server = TcpStream::connect(upstream)?;
                let n = next.fetch_add(1, Ordering::SeqCst);
                let (c2, s2) = (client.try_clone()?, server.try_clone()?);
                let i2t = dir.join(format!("conn-{n:05}.i2t"));
                let t2i = dir.join(format!("conn-{n:05}.t2i"));
                thread::spawn(move || pump(client, server, i2t));
                thread::spawn(move || pump(s2, c2, t2i));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ splitting

/// One direction of a connection cut into PDUs: (digests in force, wire bytes, PDU).
type Cut = Vec<(u8, Vec<u8>, Pdu)>;

/// Cuts a stream into PDUs, with digests switched on after the login
/// request/response that completes login, if they were negotiated.
fn cut(stream: &[u8], digests_after_login: u8) -> Cut {
    let mut dec = PduDecoder::new(16_777_215);
    let mut buf = BytesMut::from(stream);
    let mut out = Vec::new();
    let mut flags = 0u8;
    let mut at = 0;
    loop {
        let before = buf.len();
        match dec.decode(&mut buf) {
            Ok(Some(raw)) => {
                let used = before - buf.len();
                let wire = stream.get(at..at + used).unwrap_or(&[]).to_vec();
                at += used;
                let Ok(pdu) = raw.parse() else { continue };
                let done = match &pdu.header {
                    Header::LoginRequest(h) => h.transit && h.nsg == 3,
                    Header::LoginResponse(h) => h.transit && h.nsg == 3 && h.status_class == 0,
                    _ => false,
                };
                out.push((flags, wire, pdu));
                if done {
                    flags = digests_after_login;
                    dec.header_digest = flags & format::PDU_HEADER_DIGEST != 0;
                    dec.data_digest = flags & format::PDU_DATA_DIGEST != 0;
                }
            }
            _ => break,
        }
    }
    out
}

/// The digests a login agreed on, from the target's Login Response texts.
fn negotiated_digests(t2i: &[u8]) -> u8 {
    let mut flags = 0;
    for (_, _, pdu) in cut(t2i, 0) {
        if !matches!(pdu.header, Header::LoginResponse(_)) {
            continue;
        }
        for (k, v) in text::parse_list(&pdu.data).unwrap_or_default() {
            match (k.as_str(), v.as_str()) {
                ("HeaderDigest", "CRC32C") => flags |= format::PDU_HEADER_DIGEST,
                ("DataDigest", "CRC32C") => flags |= format::PDU_DATA_DIGEST,
                _ => {}
            }
        }
        if matches!(&pdu.header, Header::LoginResponse(h) if h.transit && h.nsg == 3) {
            break;
        }
    }
    flags
}

// -------------------------------------------------------------------- seeding

struct Corpus {
    root: PathBuf,
    seen: HashSet<u64>,
    per_kind: HashMap<(String, String), usize>,
    written: BTreeMap<String, (usize, usize)>,
}

impl Corpus {
    fn write(&mut self, target: &str, kind: &str, bytes: &[u8], cap: usize) -> io::Result<()> {
        let mut h = DefaultHasher::new();
        (target, bytes).hash(&mut h);
        let hash = h.finish();
        if !self.seen.insert(hash) {
            return Ok(());
        }
        let n = self
            .per_kind
            .entry((target.into(), kind.into()))
            .or_insert(0);
        if *n >= cap {
            return Ok(());
        }
        *n += 1;
        let dir = self.root.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(format!("{kind}-{hash:016x}")), bytes)?;
        let w = self.written.entry(target.into()).or_insert((0, 0));
        w.0 += 1;
        w.1 += bytes.len();
        Ok(())
    }
}

fn opcode_kind(pdu: &Pdu) -> String {
    match &pdu.header {
        Header::ScsiCommand(c) => format!("scsi-{:02x}", c.cdb.first().copied().unwrap_or(0)),
        h => format!("{:?}", h.opcode()).to_lowercase(),
    }
}

fn seeds(dir: &Path, corpus: &Path) -> io::Result<()> {
    let mut c = Corpus {
        root: corpus.to_path_buf(),
        seen: HashSet::new(),
        per_kind: HashMap::new(),
        written: BTreeMap::new(),
    };
    let mut conns: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "i2t"))
        .collect();
    conns.sort();
    let mut conn_seeds = 0;
    for i2t_path in &conns {
        let i2t = fs::read(i2t_path)?;
        let t2i = fs::read(i2t_path.with_extension("t2i")).unwrap_or_default();
        let digests = negotiated_digests(&t2i);
        let from_initiator = cut(&i2t, digests);
        let from_target = cut(&t2i, digests);

        // pdu_decoder: every distinct PDU of both directions, as it was on the
        // wire, and again with both digests on (re-encoded by us).
        for (flags, wire, pdu) in from_initiator.iter().chain(&from_target) {
            if wire.len() > MAX_PDU_SEED {
                continue;
            }
            let kind = opcode_kind(pdu);
            let seed = format::encode_pdu_input(flags | (3 << 2), &[], wire);
            c.write("pdu_decoder", &kind, &seed, PER_KIND)?;
            let both = format::PDU_HEADER_DIGEST | format::PDU_DATA_DIGEST;
            let redone = pdu.to_bytes(true, true);
            let seed = format::encode_pdu_input(both | (3 << 2), &[7, 48, 1], &redone);
            c.write(
                "pdu_decoder",
                &format!("{kind}-digests"),
                &seed,
                PER_KIND / 2,
            )?;
        }
        // ... and the start of the connection as one stream, in odd pieces.
        if conn_seeds < MAX_CONN_SEEDS {
            let head: Vec<u8> = from_initiator
                .iter()
                .take_while(|(f, _, _)| *f == 0)
                .flat_map(|(_, w, _)| w.clone())
                .take(6 * 1024)
                .collect();
            let seed = format::encode_pdu_input(0, &[1, 47, 200, 0], &head);
            c.write("pdu_decoder", "stream", &seed, MAX_CONN_SEEDS)?;
        }

        // text_negotiation: the whole login, one record per Login Request.
        let mut login = Vec::new();
        let mut chap = false;
        let mut mutual = false;
        let mut texts = Vec::new();
        for (_, _, pdu) in &from_initiator {
            match &pdu.header {
                Header::LoginRequest(h) => {
                    let pairs = text::parse_list(&pdu.data).unwrap_or_default();
                    let mut flags = format::login_flags(h.csg, h.nsg, h.transit, h.cont);
                    if pairs.iter().any(|(k, _)| k == "CHAP_R") {
                        flags |= format::REC_AUTO_CHAP;
                        mutual |= pairs.iter().any(|(k, _)| k == "CHAP_C");
                    }
                    chap |= pairs.iter().any(|(k, _)| k == "CHAP_A");
                    format::push_login_record(&mut login, flags, &pdu.data);
                }
                Header::TextRequest(h) => {
                    let flags = format::login_flags(3, 3, h.final_, h.cont);
                    format::push_login_record(&mut texts, flags, &pdu.data);
                }
                _ => {}
            }
        }
        if !login.is_empty() {
            let mut modes = vec![0u8, format::MODE_DIGESTS];
            if chap {
                let m = if mutual {
                    format::MODE_CHAP | format::MODE_MUTUAL
                } else {
                    format::MODE_CHAP
                };
                modes = vec![m, m | format::MODE_DIGESTS];
            }
            for mode in modes {
                let mut seed = vec![mode];
                seed.extend_from_slice(&login);
                c.write("text_negotiation", "login", &seed, MAX_CONN_SEEDS)?;
            }
        }
        if !texts.is_empty() {
            let mut seed = vec![0u8];
            seed.extend_from_slice(&texts);
            c.write("text_negotiation", "text", &seed, PER_KIND)?;
        }

        // scsi_cdb: each command with its data-out (immediate and Data-Out
        // PDUs of the same ITT), and the connection's first commands in order.
        let mut data_of: HashMap<u32, Vec<u8>> = HashMap::new();
        for (_, _, pdu) in &from_initiator {
            match &pdu.header {
                Header::ScsiCommand(h) => {
                    data_of.insert(h.itt, pdu.data.to_vec());
                }
                Header::DataOut(h) => {
                    if let Some(d) = data_of.get_mut(&h.itt) {
                        d.extend_from_slice(&pdu.data);
                    }
                }
                _ => {}
            }
        }
        let mut sequence = vec![0u8];
        let mut in_sequence = 0;
        for (_, _, pdu) in &from_initiator {
            let Header::ScsiCommand(h) = &pdu.header else {
                continue;
            };
            let cdb = h.full_cdb();
            // The BHS holds 16 bytes whatever the CDB: keep the CDB's own
            // length (by group code) unless an extended CDB made it longer.
            let cdb_len = if cdb.len() > 16 {
                cdb.len().min(32)
            } else {
                match cdb.first().map(|op| op >> 5) {
                    Some(0) => 6,
                    Some(1 | 2) => 10,
                    Some(5) => 12,
                    _ => 16,
                }
            };
            let cdb = cdb.get(..cdb_len.min(cdb.len())).unwrap_or(&[]);
            let data = data_of.get(&h.itt).map(Vec::as_slice).unwrap_or(&[]);
            let data = data.get(..data.len().min(MAX_CDB_DATA)).unwrap_or(&[]);
            let mut seed = vec![0u8];
            format::push_scsi_record(&mut seed, cdb, data);
            let kind = format!("cdb-{:02x}", cdb.first().copied().unwrap_or(0));
            c.write("scsi_cdb", &kind, &seed, PER_KIND)?;
            if in_sequence < 48 {
                let data = data.get(..data.len().min(256)).unwrap_or(&[]);
                format::push_scsi_record(&mut sequence, cdb, data);
                in_sequence += 1;
            }
        }
        if in_sequence > 1 && conn_seeds < MAX_CONN_SEEDS {
            c.write("scsi_cdb", "session", &sequence, MAX_CONN_SEEDS)?;
        }
        conn_seeds += 1;
    }
    for (target, (n, bytes)) in &c.written {
        println!("{target}: {n} seeds, {bytes} bytes");
    }
    Ok(())
}
