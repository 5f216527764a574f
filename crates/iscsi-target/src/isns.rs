//! iSNS protocol (RFC 4171), sans-IO: the iSNSP header, TLV attributes,
//! the messages a target sends (DevAttrReg, DevAttrQry, DevDereg) and the
//! answers it must give (ESIRsp), and a [`Decoder`] that reassembles
//! messages split over several PDUs. No sockets, no clocks: the daemon's
//! client task (iscsitd) moves the bytes and decides when to retry.
//!
//! Every length read from the wire is checked before use; a message is
//! bounded by [`MAX_MESSAGE`], so a hostile server cannot make us allocate
//! more than that.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// iSNSP version 1 (RFC 4171 §5.1).
pub const VERSION: u16 = 1;
/// The well-known iSNS port.
pub const PORT: u16 = 3205;
/// Bytes in the iSNSP header.
pub const HEADER_LEN: usize = 12;
/// Largest reassembled message we accept.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest PDU payload we send (the length field is 16 bits).
const MAX_PAYLOAD: usize = 65532;

/// Function IDs (RFC 4171 §6.1).
pub mod function {
    pub const DEV_ATTR_REG: u16 = 0x0001;
    pub const DEV_ATTR_QRY: u16 = 0x0002;
    pub const DEV_GET_NEXT: u16 = 0x0003;
    pub const DEV_DEREG: u16 = 0x0004;
    pub const SCN_REG: u16 = 0x0005;
    pub const SCN: u16 = 0x0008;
    pub const ESI: u16 = 0x000D;
    pub const HEARTBEAT: u16 = 0x000E;
    /// A response's function ID is its request's with this bit set.
    pub const RESPONSE: u16 = 0x8000;
}

/// Header flags (RFC 4171 §5.1.4; bit 16 of the RFC is our MSB).
pub mod flags {
    pub const CLIENT: u16 = 0x8000;
    pub const SERVER: u16 = 0x4000;
    pub const AUTH: u16 = 0x2000;
    pub const REPLACE: u16 = 0x1000;
    pub const LAST_PDU: u16 = 0x0800;
    pub const FIRST_PDU: u16 = 0x0400;
}

/// Attribute tags used by an iSCSI target (RFC 4171 §6.1).
pub mod tag {
    pub const DELIMITER: u32 = 0;
    pub const ENTITY_ID: u32 = 1;
    pub const ENTITY_PROTOCOL: u32 = 2;
    pub const REGISTRATION_PERIOD: u32 = 6;
    pub const PORTAL_IP: u32 = 16;
    pub const PORTAL_PORT: u32 = 17;
    pub const ESI_INTERVAL: u32 = 20;
    pub const ESI_PORT: u32 = 21;
    pub const ISCSI_NAME: u32 = 32;
    pub const ISCSI_NODE_TYPE: u32 = 33;
    pub const ISCSI_ALIAS: u32 = 34;
    pub const PG_ISCSI_NAME: u32 = 48;
    pub const PG_PORTAL_IP: u32 = 49;
    pub const PG_PORTAL_PORT: u32 = 50;
    pub const PG_TAG: u32 = 51;
}

/// Entity Protocol value for iSCSI.
pub const PROTOCOL_ISCSI: u32 = 2;
/// iSCSI Node Type bits (RFC 4171 §6.4.2).
pub const NODE_TARGET: u32 = 0x1;

/// Response status codes (RFC 4171 §6.2.1 / §5.4).
pub fn status_text(code: u32) -> &'static str {
    match code {
        0 => "successful",
        1 => "unknown error",
        2 => "message format error",
        3 => "invalid registration",
        5 => "invalid query",
        6 => "source unknown",
        7 => "source absent",
        8 => "source unauthorized",
        9 => "no such entry",
        10 => "version not supported",
        11 => "internal error",
        12 => "busy",
        13 => "option not understood",
        14 => "invalid update",
        15 => "message not supported",
        18 => "attribute not implemented",
        21 => "ESI not available",
        22 => "invalid deregistration",
        23 => "registration feature not supported",
        _ => "unassigned status",
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IsnsError {
    #[error("iSNSP version {0} is not 1")]
    Version(u16),
    #[error("attribute {tag} runs past the end of the payload")]
    TruncatedAttr { tag: u32 },
    #[error("attribute list ends inside a tag/length pair")]
    TruncatedTlv,
    #[error("response payload shorter than its status code")]
    NoStatus,
    #[error("message longer than {MAX_MESSAGE} bytes")]
    TooLong,
    #[error("PDU {got} of transaction {xid} out of sequence (expected {want})")]
    Sequence { xid: u16, got: u16, want: u16 },
    #[error("PDU of transaction {got} inside transaction {xid}")]
    Interleaved { xid: u16, got: u16 },
}

/// The 12-byte iSNSP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub function: u16,
    pub length: u16,
    pub flags: u16,
    pub xid: u16,
    pub seq: u16,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, IsnsError> {
        let w = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        if w(0) != VERSION {
            return Err(IsnsError::Version(w(0)));
        }
        Ok(Header {
            function: w(2),
            length: w(4),
            flags: w(6),
            xid: w(8),
            seq: w(10),
        })
    }

    pub fn emit(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        for (i, v) in [
            VERSION,
            self.function,
            self.length,
            self.flags,
            self.xid,
            self.seq,
        ]
        .iter()
        .enumerate()
        {
            b[2 * i..2 * i + 2].copy_from_slice(&v.to_be_bytes());
        }
        b
    }
}

/// One TLV attribute; `value` is already padded to a multiple of 4.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub tag: u32,
    pub value: Vec<u8>,
}

impl Attr {
    pub fn delimiter() -> Attr {
        Attr {
            tag: tag::DELIMITER,
            value: vec![],
        }
    }

    /// A NUL-terminated UTF-8 string padded to 4 bytes (§5.5.1).
    pub fn string(tag: u32, s: &str) -> Attr {
        let mut value = s.as_bytes().to_vec();
        value.push(0);
        while value.len() % 4 != 0 {
            value.push(0);
        }
        Attr { tag, value }
    }

    pub fn u32(tag: u32, v: u32) -> Attr {
        Attr {
            tag,
            value: v.to_be_bytes().to_vec(),
        }
    }

    /// An IP address: 16 bytes, IPv4 as an IPv4-mapped IPv6 address.
    pub fn ip(tag: u32, ip: IpAddr) -> Attr {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        Attr {
            tag,
            value: v6.octets().to_vec(),
        }
    }

    /// A TCP port (the UDP bit clear).
    pub fn port(tag: u32, port: u16) -> Attr {
        Attr::u32(tag, u32::from(port))
    }

    /// A zero-length attribute (a query asks for this tag's values).
    pub fn nil(tag: u32) -> Attr {
        Attr { tag, value: vec![] }
    }

    pub fn as_u32(&self) -> Option<u32> {
        let b: [u8; 4] = self.value.as_slice().try_into().ok()?;
        Some(u32::from_be_bytes(b))
    }

    pub fn as_str(&self) -> Option<&str> {
        let end = self
            .value
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.value.len());
        std::str::from_utf8(self.value.get(..end)?).ok()
    }

    pub fn as_ip(&self) -> Option<IpAddr> {
        let b: [u8; 16] = self.value.as_slice().try_into().ok()?;
        let v6 = Ipv6Addr::from(b);
        Some(match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        })
    }

    fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag.to_be_bytes());
        // Attribute values are built here and bounded far below 4 GiB.
        let len = u32::try_from(self.value.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.value);
    }
}

/// Parses a list of TLV attributes.
pub fn parse_attrs(mut b: &[u8]) -> Result<Vec<Attr>, IsnsError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (Some(t), Some(l)) = (b.get(0..4), b.get(4..8)) else {
            return Err(IsnsError::TruncatedTlv);
        };
        let tag = u32::from_be_bytes([t[0], t[1], t[2], t[3]]);
        let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]);
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(8))
            .filter(|&e| e <= b.len())
            .ok_or(IsnsError::TruncatedAttr { tag })?;
        out.push(Attr {
            tag,
            value: b.get(8..end).unwrap_or_default().to_vec(),
        });
        b = b.get(end..).unwrap_or_default();
    }
    Ok(out)
}

/// A whole iSNSP message (one or more PDUs on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub function: u16,
    /// Flags other than FIRST/LAST PDU (set per PDU when encoding).
    pub flags: u16,
    pub xid: u16,
    /// Responses carry a status code before their attributes.
    pub status: Option<u32>,
    pub attrs: Vec<Attr>,
}

impl Message {
    pub fn is_response(&self) -> bool {
        self.function & function::RESPONSE != 0
    }

    /// The attributes after the delimiter (the operating attributes).
    pub fn operating(&self) -> &[Attr] {
        match self.attrs.iter().position(|a| a.tag == tag::DELIMITER) {
            Some(i) => self.attrs.get(i + 1..).unwrap_or_default(),
            None => &[],
        }
    }

    /// Encodes into one PDU, or several when the payload exceeds a PDU.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        if let Some(s) = self.status {
            payload.extend_from_slice(&s.to_be_bytes());
        }
        for a in &self.attrs {
            a.emit(&mut payload);
        }
        let chunks: Vec<&[u8]> = if payload.is_empty() {
            vec![&[]]
        } else {
            payload.chunks(MAX_PAYLOAD).collect()
        };
        let last = chunks.len().saturating_sub(1);
        let mut out = Vec::with_capacity(payload.len() + HEADER_LEN * chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            let mut f = self.flags & !(flags::FIRST_PDU | flags::LAST_PDU);
            if i == 0 {
                f |= flags::FIRST_PDU;
            }
            if i == last {
                f |= flags::LAST_PDU;
            }
            let h = Header {
                function: self.function,
                length: u16::try_from(c.len()).unwrap_or(u16::MAX),
                flags: f,
                xid: self.xid,
                seq: u16::try_from(i).unwrap_or(u16::MAX),
            };
            out.extend_from_slice(&h.emit());
            out.extend_from_slice(c);
        }
        out
    }
}

/// Reassembles messages from a byte stream (tokio-util's `Decoder` shape:
/// push bytes, take whole messages).
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// The message being reassembled: its first header, the payload so
    /// far and the sequence number the next PDU must carry.
    partial: Option<(Header, Vec<u8>, u16)>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` when more bytes are needed. An
    /// error means the stream is unusable (the caller drops the connection).
    pub fn next_message(&mut self) -> Result<Option<Message>, IsnsError> {
        loop {
            let Some(hb) = self.buf.get(..HEADER_LEN) else {
                return Ok(None);
            };
            let mut h12 = [0u8; HEADER_LEN];
            h12.copy_from_slice(hb);
            let h = Header::parse(&h12)?;
            let end = HEADER_LEN + usize::from(h.length);
            let Some(body) = self.buf.get(HEADER_LEN..end) else {
                return Ok(None);
            };
            let body = body.to_vec();
            self.buf.drain(..end);
            let (first, mut payload, want) = match self.partial.take() {
                None => (h, Vec::new(), 0u16),
                Some((first, p, n)) => {
                    if first.xid != h.xid || first.function != h.function {
                        return Err(IsnsError::Interleaved {
                            xid: first.xid,
                            got: h.xid,
                        });
                    }
                    (first, p, n)
                }
            };
            if h.seq != want {
                return Err(IsnsError::Sequence {
                    xid: h.xid,
                    got: h.seq,
                    want,
                });
            }
            if payload.len() + body.len() > MAX_MESSAGE {
                return Err(IsnsError::TooLong);
            }
            payload.extend_from_slice(&body);
            // A single PDU without FIRST/LAST set is taken as whole: some
            // servers leave them clear on one-PDU answers.
            let last = h.flags & flags::LAST_PDU != 0 || h.flags & flags::FIRST_PDU == 0;
            if !last {
                self.partial = Some((first, payload, want.saturating_add(1)));
                continue;
            }
            return decode_payload(&first, &payload).map(Some);
        }
    }
}

fn decode_payload(h: &Header, payload: &[u8]) -> Result<Message, IsnsError> {
    let response = h.function & function::RESPONSE != 0;
    let (status, rest) = if response {
        let s = payload.get(..4).ok_or(IsnsError::NoStatus)?;
        (
            Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]])),
            payload.get(4..).unwrap_or_default(),
        )
    } else {
        (None, payload)
    };
    Ok(Message {
        function: h.function,
        flags: h.flags & !(flags::FIRST_PDU | flags::LAST_PDU),
        xid: h.xid,
        status,
        attrs: parse_attrs(rest)?,
    })
}

/// One target node to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub alias: Option<String>,
    /// (portal, portal group tag) pairs through which the node is served.
    pub portal_groups: Vec<(SocketAddr, u16)>,
}

/// Everything one network entity registers: the entity, its portals, its
/// target nodes and their portal groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub entity: String,
    /// Seconds the server keeps the registration without a refresh.
    pub period: u32,
    pub nodes: Vec<Node>,
}

impl Registration {
    /// Every distinct portal of every node, in first-seen order.
    pub fn portals(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for n in &self.nodes {
            for (p, _) in &n.portal_groups {
                if !out.contains(p) {
                    out.push(*p);
                }
            }
        }
        out
    }

    /// The node name the server knows us by (the Source attribute).
    pub fn source(&self) -> Option<&str> {
        self.nodes.first().map(|n| n.name.as_str())
    }

    /// DevAttrReg (§5.6.5.1) of the whole entity. With `replace`, the
    /// server drops whatever the entity had registered before, so nodes and
    /// portals that went away disappear in the same step.
    pub fn dev_attr_reg(&self, xid: u16, replace: bool) -> Message {
        let source = self.source().unwrap_or(&self.entity);
        let mut a = vec![
            Attr::string(tag::ISCSI_NAME, source),
            Attr::string(tag::ENTITY_ID, &self.entity),
            Attr::delimiter(),
            Attr::string(tag::ENTITY_ID, &self.entity),
            Attr::u32(tag::ENTITY_PROTOCOL, PROTOCOL_ISCSI),
            Attr::u32(tag::REGISTRATION_PERIOD, self.period),
        ];
        for p in self.portals() {
            a.push(Attr::ip(tag::PORTAL_IP, p.ip()));
            a.push(Attr::port(tag::PORTAL_PORT, p.port()));
        }
        for n in &self.nodes {
            a.push(Attr::string(tag::ISCSI_NAME, &n.name));
            a.push(Attr::u32(tag::ISCSI_NODE_TYPE, NODE_TARGET));
            if let Some(al) = &n.alias {
                a.push(Attr::string(tag::ISCSI_ALIAS, al));
            }
        }
        // Explicit portal groups (§3.4): which node is reachable through
        // which portal, with the TPGT initiators must log in with.
        for n in &self.nodes {
            for (p, t) in &n.portal_groups {
                a.push(Attr::string(tag::PG_ISCSI_NAME, &n.name));
                a.push(Attr::ip(tag::PG_PORTAL_IP, p.ip()));
                a.push(Attr::port(tag::PG_PORTAL_PORT, p.port()));
                a.push(Attr::u32(tag::PG_TAG, u32::from(*t)));
            }
        }
        Message {
            function: function::DEV_ATTR_REG,
            flags: flags::CLIENT | if replace { flags::REPLACE } else { 0 },
            xid,
            status: None,
            attrs: a,
        }
    }
}

/// Where an iSNS server is, as configured: an address, or a host name to
/// resolve when connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    Addr(SocketAddr),
    Host(String, u16),
}

/// Reads "IP", "IP:port", "[v6]:port", "host" or "host:port" (port 3205
/// when absent).
pub fn parse_server(s: &str) -> Result<Server, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Server::Addr(a));
    }
    if let Ok(ip) = s.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        return Ok(Server::Addr(SocketAddr::new(ip, PORT)));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) if p > 0 => (h, p),
            _ => return Err(format!("iSNS server {s:?}: port must be 1..65535")),
        },
        None => (s, PORT),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!(
            "iSNS server {s:?} is not IP[:port], [IPv6]:port or host[:port]"
        ));
    }
    Ok(Server::Host(host.to_string(), port))
}

/// DevDereg (§5.6.5.4) of a whole entity (its portals, nodes and PGs).
pub fn dereg_entity(source: &str, entity: &str, xid: u16) -> Message {
    Message {
        function: function::DEV_DEREG,
        flags: flags::CLIENT,
        xid,
        status: None,
        attrs: vec![
            Attr::string(tag::ISCSI_NAME, source),
            Attr::delimiter(),
            Attr::string(tag::ENTITY_ID, entity),
        ],
    }
}

/// DevDereg of some nodes only.
pub fn dereg_nodes(source: &str, names: &[String], xid: u16) -> Message {
    let mut attrs = vec![Attr::string(tag::ISCSI_NAME, source), Attr::delimiter()];
    attrs.extend(names.iter().map(|n| Attr::string(tag::ISCSI_NAME, n)));
    Message {
        function: function::DEV_DEREG,
        flags: flags::CLIENT,
        xid,
        status: None,
        attrs,
    }
}

/// DevAttrQry (§5.6.5.2): the portals and portal groups of node `name`.
pub fn query_node(source: &str, name: &str, xid: u16) -> Message {
    Message {
        function: function::DEV_ATTR_QRY,
        flags: flags::CLIENT,
        xid,
        status: None,
        attrs: vec![
            Attr::string(tag::ISCSI_NAME, source),
            Attr::string(tag::ISCSI_NAME, name),
            Attr::delimiter(),
            Attr::nil(tag::ISCSI_NAME),
            Attr::nil(tag::ISCSI_NODE_TYPE),
            Attr::nil(tag::PORTAL_IP),
            Attr::nil(tag::PORTAL_PORT),
            Attr::nil(tag::PG_TAG),
        ],
    }
}

/// What a client answers to a server-initiated message: ESI gets an ESIRsp
/// echoing its attributes (§5.6.5.13), a heartbeat or SCN nothing we act on
/// but an acknowledgement where one is due. `None`: no answer.
pub fn answer_server_message(m: &Message) -> Option<Message> {
    if m.is_response() {
        return None;
    }
    match m.function {
        function::ESI | function::SCN => Some(Message {
            function: m.function | function::RESPONSE,
            flags: flags::CLIENT,
            xid: m.xid,
            status: Some(0),
            attrs: m.attrs.clone(),
        }),
        // Heartbeats are multicast announcements; nothing to answer.
        _ => None,
    }
}

/// Checks a response to request `req`: the right function and xid, and a
/// successful status.
pub fn check_response(req: &Message, rsp: &Message) -> Result<(), String> {
    if rsp.function != req.function | function::RESPONSE || rsp.xid != req.xid {
        return Err(format!(
            "unexpected answer (function {:#06x}, xid {}) to function {:#06x} xid {}",
            rsp.function, rsp.xid, req.function, req.xid
        ));
    }
    match rsp.status {
        Some(0) => Ok(()),
        Some(s) => Err(format!("status {s} ({})", status_text(s))),
        None => Err("response without status".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registration {
        let p: SocketAddr = "192.0.2.7:3260".parse().unwrap();
        let q: SocketAddr = "[2001:db8::1]:3261".parse().unwrap();
        Registration {
            entity: "iscsitd:host".into(),
            period: 900,
            nodes: vec![
                Node {
                    name: "iqn.2026-11.dev.ironstar:a".into(),
                    alias: Some("disk a".into()),
                    portal_groups: vec![(p, 1), (q, 2)],
                },
                Node {
                    name: "iqn.2026-11.dev.ironstar:b".into(),
                    alias: None,
                    portal_groups: vec![(p, 1)],
                },
            ],
        }
    }

    #[test]
    fn header_round_trips_and_rejects_other_versions() {
        let h = Header {
            function: 1,
            length: 8,
            flags: flags::CLIENT | flags::FIRST_PDU | flags::LAST_PDU,
            xid: 7,
            seq: 0,
        };
        let b = h.emit();
        assert_eq!(&b[..4], &[0, 1, 0, 1]);
        assert_eq!(Header::parse(&b).unwrap(), h);
        let mut bad = b;
        bad[1] = 2;
        assert_eq!(Header::parse(&bad), Err(IsnsError::Version(2)));
    }

    #[test]
    fn strings_are_nul_terminated_and_padded_to_four() {
        let a = Attr::string(tag::ISCSI_NAME, "abcd");
        assert_eq!(a.value, b"abcd\0\0\0\0");
        assert_eq!(a.as_str(), Some("abcd"));
        assert_eq!(Attr::string(1, "abc").value.len(), 4);
    }

    #[test]
    fn ipv4_is_sent_as_mapped_ipv6_and_read_back() {
        let a = Attr::ip(tag::PORTAL_IP, "10.1.2.3".parse().unwrap());
        assert_eq!(
            &a.value[..],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
        assert_eq!(a.as_ip(), Some("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn registration_lists_entity_portals_nodes_then_portal_groups() {
        let m = reg().dev_attr_reg(5, true);
        assert_eq!(m.flags, flags::CLIENT | flags::REPLACE);
        let tags: Vec<u32> = m.attrs.iter().map(|a| a.tag).collect();
        assert_eq!(&tags[..3], &[tag::ISCSI_NAME, tag::ENTITY_ID, 0]);
        let op = m.operating();
        assert_eq!(op[0].as_str(), Some("iscsitd:host"));
        assert_eq!(op[1].as_u32(), Some(PROTOCOL_ISCSI));
        // Two distinct portals, two nodes (one alias), three PGs.
        let count = |t| op.iter().filter(|a| a.tag == t).count();
        assert_eq!(count(tag::PORTAL_IP), 2);
        assert_eq!(count(tag::ISCSI_NAME), 2);
        assert_eq!(count(tag::ISCSI_ALIAS), 1);
        assert_eq!(count(tag::PG_TAG), 3);
        let first_pg = op.iter().position(|a| a.tag == tag::PG_ISCSI_NAME).unwrap();
        let last_node = op.iter().rposition(|a| a.tag == tag::ISCSI_NAME).unwrap();
        assert!(first_pg > last_node, "PGs follow the nodes they name");
        let pgts: Vec<u32> = op
            .iter()
            .filter(|a| a.tag == tag::PG_TAG)
            .filter_map(Attr::as_u32)
            .collect();
        assert_eq!(pgts, vec![1, 2, 1]);
    }

    #[test]
    fn encoded_message_decodes_to_itself() {
        let m = reg().dev_attr_reg(9, false);
        let mut d = Decoder::new();
        d.push(&m.encode());
        let back = d.next_message().unwrap().unwrap();
        assert_eq!(back, m);
        assert_eq!(d.next_message().unwrap(), None);
    }

    #[test]
    fn a_message_split_over_pdus_and_reads_is_reassembled() {
        let mut r = reg();
        r.nodes[0].alias = Some("x".repeat(70_000));
        let m = r.dev_attr_reg(3, false);
        let wire = m.encode();
        assert!(wire.len() > 70_000 + 2 * HEADER_LEN, "two PDUs");
        let mut d = Decoder::new();
        for chunk in wire.chunks(1000) {
            assert_eq!(d.next_message().unwrap(), None);
            d.push(chunk);
        }
        assert_eq!(d.next_message().unwrap().unwrap(), m);
    }

    #[test]
    fn response_status_and_errors_are_read() {
        let req = dereg_entity("iqn.x", "e", 4);
        let mut rsp = Message {
            function: function::DEV_DEREG | function::RESPONSE,
            flags: flags::SERVER,
            xid: 4,
            status: Some(0),
            attrs: vec![],
        };
        let mut d = Decoder::new();
        d.push(&rsp.encode());
        assert_eq!(
            check_response(&req, &d.next_message().unwrap().unwrap()),
            Ok(())
        );
        rsp.status = Some(9);
        d.push(&rsp.encode());
        let e = check_response(&req, &d.next_message().unwrap().unwrap()).unwrap_err();
        assert!(e.contains("no such entry"), "{e}");
        rsp.xid = 5;
        assert!(check_response(&req, &rsp).is_err());
    }

    #[test]
    fn hostile_lengths_are_errors_not_panics() {
        // Attribute length past the payload.
        let mut b = vec![0, 0, 0, 32, 0xff, 0xff, 0xff, 0xf0, 1, 2];
        assert!(matches!(
            parse_attrs(&b),
            Err(IsnsError::TruncatedAttr { tag: 32 })
        ));
        b.truncate(5);
        assert_eq!(parse_attrs(&b), Err(IsnsError::TruncatedTlv));
        // A response too short for its status.
        let h = Header {
            function: 0x8001,
            length: 2,
            flags: flags::SERVER | flags::FIRST_PDU | flags::LAST_PDU,
            xid: 1,
            seq: 0,
        };
        let mut d = Decoder::new();
        d.push(&h.emit());
        d.push(&[0, 0]);
        assert_eq!(d.next_message(), Err(IsnsError::NoStatus));
        // Endless continuation PDUs stop at MAX_MESSAGE.
        let mut d = Decoder::new();
        let mut cont = Header {
            function: 0x8002,
            length: 65532,
            flags: flags::SERVER | flags::FIRST_PDU,
            xid: 2,
            seq: 0,
        };
        let mut err = None;
        for seq in 0..(MAX_MESSAGE / 65532 + 2) {
            cont.seq = seq as u16;
            d.push(&cont.emit());
            d.push(&vec![0u8; 65532]);
            if let Err(e) = d.next_message() {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(IsnsError::TooLong));
        // A continuation out of sequence is refused.
        let mut d = Decoder::new();
        cont.seq = 0;
        d.push(&cont.emit());
        d.push(&vec![0u8; 65532]);
        assert_eq!(d.next_message(), Ok(None));
        cont.seq = 5;
        d.push(&cont.emit());
        d.push(&vec![0u8; 65532]);
        assert!(matches!(
            d.next_message(),
            Err(IsnsError::Sequence {
                got: 5,
                want: 1,
                ..
            })
        ));
    }

    #[test]
    fn esi_gets_an_esi_response_echoing_its_attributes() {
        let esi = Message {
            function: function::ESI,
            flags: flags::SERVER,
            xid: 77,
            status: None,
            attrs: vec![
                Attr::string(tag::ENTITY_ID, "e"),
                Attr::ip(tag::PORTAL_IP, "10.0.0.1".parse().unwrap()),
            ],
        };
        let a = answer_server_message(&esi).unwrap();
        assert_eq!(a.function, 0x800D);
        assert_eq!((a.xid, a.status), (77, Some(0)));
        assert_eq!(a.attrs, esi.attrs);
        let hb = Message {
            function: function::HEARTBEAT,
            ..esi.clone()
        };
        assert_eq!(answer_server_message(&hb), None);
    }

    #[test]
    fn server_addresses_take_the_default_port_and_refuse_nonsense() {
        let a = |s: &str| parse_server(s).unwrap();
        assert_eq!(
            a("10.0.0.1"),
            Server::Addr("10.0.0.1:3205".parse().unwrap())
        );
        assert_eq!(
            a("10.0.0.1:3206"),
            Server::Addr("10.0.0.1:3206".parse().unwrap())
        );
        assert_eq!(a("[::1]:9"), Server::Addr("[::1]:9".parse().unwrap()));
        assert_eq!(a("::1"), Server::Addr("[::1]:3205".parse().unwrap()));
        assert_eq!(
            a("isns.example.com"),
            Server::Host("isns.example.com".into(), 3205)
        );
        assert_eq!(a("isns-1:4000"), Server::Host("isns-1".into(), 4000));
        for bad in [
            "",
            "a b",
            "host:0",
            "host:99999",
            "-x.example",
            "x..y",
            "10.0.0.1:",
            "a/b",
        ] {
            assert!(parse_server(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn deregistration_names_what_goes() {
        let m = dereg_nodes("iqn.s", &["iqn.a".into(), "iqn.b".into()], 1);
        let names: Vec<&str> = m.operating().iter().filter_map(Attr::as_str).collect();
        assert_eq!(names, vec!["iqn.a", "iqn.b"]);
        let e = dereg_entity("iqn.s", "ent", 2);
        assert_eq!(e.operating()[0].tag, tag::ENTITY_ID);
    }
}
