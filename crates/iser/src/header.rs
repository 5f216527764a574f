//! The iSER wire formats (RFC 7145 §9), sans-IO: the iSER header that
//! prefixes every iSCSI control PDU in a SEND (§9.2), the Hello and
//! HelloReply messages (§9.3, §9.4), and the private data of the CM REQ/REP
//! (§9.1; Linux's `struct iser_cm_hdr`). Decoding checks the length once and
//! never panics on what a peer sends.

use thiserror::Error;

/// Length of the iSER header in front of each iSCSI PDU.
pub const ISER_HEADER_LEN: usize = 28;
/// Length of the iSER CM private data.
pub const CM_HEADER_LEN: usize = 4;

const OP_CONTROL: u8 = 0x1;
const OP_HELLO: u8 = 0x2;
const OP_HELLO_REPLY: u8 = 0x3;
const WSV: u8 = 0x08;
const RSV: u8 = 0x04;
/// HelloReply's reject flag (RFC 7145 §9.4: the low bit of the first byte).
const HELLO_REJECT: u8 = 0x01;

/// CM private data flag: zero-based virtual addressing is not supported.
pub const CM_ZBVA_NOT_SUPPORTED: u8 = 0x80;
/// CM private data flag: Send with Invalidate is not supported.
pub const CM_SEND_W_INV_NOT_SUPPORTED: u8 = 0x40;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeaderError {
    #[error("iSER header needs {ISER_HEADER_LEN} bytes, got {0}")]
    Short(usize),
    #[error("unknown iSER opcode {0:#x}")]
    UnknownOpcode(u8),
}

/// A tagged buffer advertised by the initiator: STag and base virtual address
/// (the address of buffer offset 0; the target adds the offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tagged {
    pub stag: u32,
    pub va: u64,
}

/// The iSER header (RFC 7145 §9.2 for control PDUs, §9.3/§9.4 for Hello).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IserHeader {
    /// iSCSI control-type PDU follows; W/R valid flags are the `Some`s.
    Control {
        write: Option<Tagged>,
        read: Option<Tagged>,
    },
    Hello {
        max_ver: u8,
        min_ver: u8,
        ird: u16,
    },
    HelloReply {
        reject: bool,
        max_ver: u8,
        cur_ver: u8,
        ord: u16,
    },
}

impl IserHeader {
    /// A control header with no tagged buffers.
    pub const PLAIN: IserHeader = IserHeader::Control {
        write: None,
        read: None,
    };

    pub fn encode(&self) -> [u8; ISER_HEADER_LEN] {
        let mut b = [0u8; ISER_HEADER_LEN];
        match *self {
            IserHeader::Control { write, read } => {
                b[0] = OP_CONTROL << 4;
                if let Some(w) = write {
                    b[0] |= WSV;
                    b[4..8].copy_from_slice(&w.stag.to_be_bytes());
                    b[8..16].copy_from_slice(&w.va.to_be_bytes());
                }
                if let Some(r) = read {
                    b[0] |= RSV;
                    b[16..20].copy_from_slice(&r.stag.to_be_bytes());
                    b[20..28].copy_from_slice(&r.va.to_be_bytes());
                }
            }
            IserHeader::Hello {
                max_ver,
                min_ver,
                ird,
            } => {
                b[0] = OP_HELLO << 4;
                b[1] = (max_ver << 4) | (min_ver & 0x0f);
                b[2..4].copy_from_slice(&ird.to_be_bytes());
            }
            IserHeader::HelloReply {
                reject,
                max_ver,
                cur_ver,
                ord,
            } => {
                b[0] = (OP_HELLO_REPLY << 4) | if reject { HELLO_REJECT } else { 0 };
                b[1] = (max_ver << 4) | (cur_ver & 0x0f);
                b[2..4].copy_from_slice(&ord.to_be_bytes());
            }
        }
        b
    }

    /// Decodes the header at the start of `buf` (the rest is the iSCSI PDU).
    pub fn decode(buf: &[u8]) -> Result<IserHeader, HeaderError> {
        let b: &[u8; ISER_HEADER_LEN] = buf
            .get(..ISER_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(HeaderError::Short(buf.len()))?;
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        match b[0] >> 4 {
            OP_CONTROL => Ok(IserHeader::Control {
                write: (b[0] & WSV != 0).then(|| Tagged {
                    stag: u32_at(4),
                    va: u64_at(8),
                }),
                read: (b[0] & RSV != 0).then(|| Tagged {
                    stag: u32_at(16),
                    va: u64_at(20),
                }),
            }),
            OP_HELLO => Ok(IserHeader::Hello {
                max_ver: b[1] >> 4,
                min_ver: b[1] & 0x0f,
                ird: u16::from_be_bytes([b[2], b[3]]),
            }),
            OP_HELLO_REPLY => Ok(IserHeader::HelloReply {
                reject: b[0] & HELLO_REJECT != 0,
                max_ver: b[1] >> 4,
                cur_ver: b[1] & 0x0f,
                ord: u16::from_be_bytes([b[2], b[3]]),
            }),
            op => Err(HeaderError::UnknownOpcode(op)),
        }
    }
}

/// The iSER CM private data (REQ from the initiator, REP from the target):
/// which optional RDMA features the sender does without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmHeader {
    /// Zero-based virtual addresses in STag offsets (we never use them).
    pub zbva: bool,
    /// Send with Invalidate of the initiator's STag on the SCSI Response.
    pub send_with_invalidate: bool,
}

impl CmHeader {
    /// What our initiator offers in its CM REQ: no ZBVA, no Send with
    /// Invalidate (its buffers come from a pool registered once, so there is
    /// nothing to invalidate: a remote invalidation would only revoke a key
    /// the pool still hands out).
    pub const INITIATOR: CmHeader = CmHeader {
        zbva: false,
        send_with_invalidate: false,
    };

    /// What our target can do: no ZBVA (we always send the full VA), but
    /// Send with Invalidate of the initiator's STag with the SCSI Response.
    pub const TARGET: CmHeader = CmHeader {
        zbva: false,
        send_with_invalidate: true,
    };

    /// Target: what this connection uses, from the initiator's CM REQ
    /// private data. It is also the REP's private data, which tells the
    /// initiator whether to expect remote invalidations (Linux ib_iser treats
    /// one it was not told about as a protocol error). As Linux isert does,
    /// Send with Invalidate needs the initiator to have sent its header with
    /// the "not supported" bit clear: a REQ without private data gets none.
    pub fn target_agreement(req_private_data: &[u8]) -> CmHeader {
        let mut agreed = CmHeader::TARGET.agree(CmHeader::decode(req_private_data));
        if req_private_data.is_empty() {
            agreed.send_with_invalidate = false;
        }
        agreed
    }

    pub fn encode(&self) -> [u8; CM_HEADER_LEN] {
        let mut flags = 0;
        if !self.zbva {
            flags |= CM_ZBVA_NOT_SUPPORTED;
        }
        if !self.send_with_invalidate {
            flags |= CM_SEND_W_INV_NOT_SUPPORTED;
        }
        [flags, 0, 0, 0]
    }

    /// Reads a peer's private data. Absent or short data (some peers send
    /// none) means the RFC's defaults: both features available.
    pub fn decode(private_data: &[u8]) -> CmHeader {
        let flags = private_data.first().copied().unwrap_or(0);
        CmHeader {
            zbva: flags & CM_ZBVA_NOT_SUPPORTED == 0,
            send_with_invalidate: flags & CM_SEND_W_INV_NOT_SUPPORTED == 0,
        }
    }

    /// What both sides can use.
    pub fn agree(self, peer: CmHeader) -> CmHeader {
        CmHeader {
            zbva: self.zbva && peer.zbva,
            send_with_invalidate: self.send_with_invalidate && peer.send_with_invalidate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_header_round_trips_with_both_tagged_buffers() {
        let h = IserHeader::Control {
            write: Some(Tagged {
                stag: 0x1122_3344,
                va: 0x0102_0304_0506_0708,
            }),
            read: Some(Tagged {
                stag: 0xaabb_ccdd,
                va: 0xdead_beef_0000_1000,
            }),
        };
        let b = h.encode();
        assert_eq!(b[0], 0x1c);
        assert_eq!(&b[4..8], &[0x11, 0x22, 0x33, 0x44]);
        assert_eq!(&b[16..20], &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(IserHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn plain_control_header_has_no_valid_bits() {
        let b = IserHeader::PLAIN.encode();
        assert_eq!(b, {
            let mut z = [0u8; ISER_HEADER_LEN];
            z[0] = 0x10;
            z
        });
        assert_eq!(IserHeader::decode(&b).unwrap(), IserHeader::PLAIN);
    }

    #[test]
    fn tags_without_valid_bits_are_ignored() {
        let mut b = [0xffu8; ISER_HEADER_LEN];
        b[0] = 0x10;
        assert_eq!(IserHeader::decode(&b).unwrap(), IserHeader::PLAIN);
    }

    #[test]
    fn hello_and_reply_round_trip() {
        for h in [
            IserHeader::Hello {
                max_ver: 1,
                min_ver: 1,
                ird: 16,
            },
            IserHeader::HelloReply {
                reject: true,
                max_ver: 1,
                cur_ver: 1,
                ord: 8,
            },
        ] {
            assert_eq!(IserHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn short_or_unknown_headers_are_errors_not_panics() {
        assert_eq!(IserHeader::decode(&[0x10; 27]), Err(HeaderError::Short(27)));
        let mut b = [0u8; ISER_HEADER_LEN];
        b[0] = 0x70;
        assert_eq!(IserHeader::decode(&b), Err(HeaderError::UnknownOpcode(7)));
    }

    #[test]
    fn cm_private_data_matches_linux_iser_flags() {
        // Our initiator's REQ: as ib_iser's when it cannot do remote invalidation.
        assert_eq!(CmHeader::INITIATOR.encode(), [0xc0, 0, 0, 0]);
        let linux = CmHeader::decode(&[0x80, 0, 0, 0]);
        assert!(!linux.zbva && linux.send_with_invalidate);
        assert_eq!(CmHeader::INITIATOR.agree(linux), CmHeader::INITIATOR);
        // No private data at all: the RFC defaults.
        assert_eq!(
            CmHeader::decode(&[]),
            CmHeader {
                zbva: true,
                send_with_invalidate: true
            }
        );
    }

    #[test]
    fn target_uses_send_with_invalidate_when_linux_iser_allows_it() {
        // ib_iser with fast registration (its default) leaves the bit clear.
        let cm = CmHeader::target_agreement(&[0x80, 0, 0, 0]);
        assert!(cm.send_with_invalidate && !cm.zbva);
        // The REP says so, as isert's does: ZBVA not used, SWI used.
        assert_eq!(cm.encode(), [0x80, 0, 0, 0]);
        // Longer private data (padding): only the first byte counts.
        assert!(CmHeader::target_agreement(&[0x80, 0, 0, 0, 0, 0]).send_with_invalidate);
    }

    #[test]
    fn target_does_without_send_with_invalidate_when_the_initiator_refuses_it() {
        for req in [
            CmHeader::INITIATOR.encode(),
            [0x40, 0, 0, 0],
            [0xc0, 0xff, 0xff, 0xff],
        ] {
            let cm = CmHeader::target_agreement(&req);
            assert!(!cm.send_with_invalidate, "{req:?}");
            assert_eq!(cm.encode(), [0xc0, 0, 0, 0], "{req:?}");
        }
    }

    #[test]
    fn target_does_without_send_with_invalidate_when_the_req_has_no_private_data() {
        let cm = CmHeader::target_agreement(&[]);
        assert_eq!(cm, CmHeader::INITIATOR);
        assert_eq!(cm.encode(), [0xc0, 0, 0, 0]);
    }

    #[test]
    fn initiator_never_agrees_to_send_with_invalidate_whatever_the_rep_says() {
        for rep in [[0x80u8, 0, 0, 0], [0, 0, 0, 0], [0xc0, 0, 0, 0]] {
            let cm = CmHeader::INITIATOR.agree(CmHeader::decode(&rep));
            assert!(!cm.send_with_invalidate && !cm.zbva, "{rep:?}");
        }
        assert!(
            !CmHeader::INITIATOR
                .agree(CmHeader::decode(&[]))
                .send_with_invalidate
        );
    }
}
