//! Every PDU of RFC 7143 §11: the 48-byte Basic Header Segment (BHS) of each
//! opcode as a typed header, plus the AHS of the SCSI Command and the data segment.
//!
//! Parsing goes in two steps. The framing codec (`codec`) cuts a [`RawPdu`]
//! out of the byte stream using only TotalAHSLength and DataSegmentLength;
//! [`RawPdu::parse`] then turns it into a typed [`Pdu`]. A parse error keeps
//! the raw BHS, so the caller can return it in a Reject PDU (RFC 7143 §11.17).
//! All accessors work on fixed-size arrays: nothing here can index out of bounds.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// iSCSI opcodes (RFC 7143 §11.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    SnackRequest = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

impl Opcode {
    pub fn from_u8(value: u8) -> Option<Opcode> {
        Some(match value & 0x3f {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskMgmtRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::SnackRequest,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskMgmtResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::R2t,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            _ => return None,
        })
    }

    /// Opcodes an initiator sends (a target receives).
    pub fn is_initiator_opcode(self) -> bool {
        (self as u8) < 0x20
    }
}

/// Reserved value of the Initiator Task Tag and Target Transfer Tag.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const LONG_OPERATION_REJECT: u8 = 0x0a;
    pub const DEPRECATED_NEGOTIATION_RESET: u8 = 0x0b;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// Task management function codes (RFC 7143 §11.5.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;
    pub const QUERY_TASK: u8 = 9;
    pub const QUERY_TASK_SET: u8 = 10;
    pub const I_T_NEXUS_RESET: u8 = 11;
    pub const QUERY_ASYNC_EVENT: u8 = 12;

    /// Task management responses (RFC 7143 §11.6.1, RFC 7144 for the query results).
    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    pub const TASK_STILL_ALLEGIANT: u8 = 3;
    pub const REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const FUNCTION_NOT_SUPPORTED: u8 = 5;
    pub const AUTHORIZATION_FAILED: u8 = 6;
    pub const FUNCTION_SUCCEEDED: u8 = 7;
    pub const FUNCTION_REJECTED: u8 = 255;
}

/// Login stages (CSG/NSG, RFC 7143 §11.12.3).
pub mod stage {
    pub const SECURITY: u8 = 0;
    pub const OPERATIONAL: u8 = 1;
    pub const FULL_FEATURE: u8 = 3;
}

/// Login status class and detail (RFC 7143 §11.13.5).
pub mod login_status {
    pub const SUCCESS: (u8, u8) = (0, 0);
    pub const TARGET_MOVED_TEMPORARILY: (u8, u8) = (1, 1);
    pub const TARGET_MOVED_PERMANENTLY: (u8, u8) = (1, 2);
    pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
    pub const AUTHENTICATION_FAILURE: (u8, u8) = (2, 1);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (2, 2);
    pub const NOT_FOUND: (u8, u8) = (2, 3);
    pub const TARGET_REMOVED: (u8, u8) = (2, 4);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
    pub const TOO_MANY_CONNECTIONS: (u8, u8) = (2, 6);
    pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
    pub const CANT_INCLUDE_IN_SESSION: (u8, u8) = (2, 8);
    pub const SESSION_TYPE_NOT_SUPPORTED: (u8, u8) = (2, 9);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (2, 10);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (2, 11);
    pub const TARGET_ERROR: (u8, u8) = (3, 0);
    pub const SERVICE_UNAVAILABLE: (u8, u8) = (3, 1);
    pub const OUT_OF_RESOURCES: (u8, u8) = (3, 2);
}

/// Logout reason codes (RFC 7143 §11.14.1) and responses (§11.15.1).
pub mod logout {
    pub const CLOSE_SESSION: u8 = 0;
    pub const CLOSE_CONNECTION: u8 = 1;
    pub const REMOVE_CONNECTION_FOR_RECOVERY: u8 = 2;

    pub const SUCCESS: u8 = 0;
    pub const CID_NOT_FOUND: u8 = 1;
    pub const RECOVERY_NOT_SUPPORTED: u8 = 2;
    pub const CLEANUP_FAILED: u8 = 3;
}

/// Async event codes (RFC 7143 §11.9.1).
pub mod async_event {
    pub const SCSI_ASYNC_EVENT: u8 = 0;
    pub const LOGOUT_REQUESTED: u8 = 1;
    pub const CONNECTION_WILL_DROP: u8 = 2;
    pub const SESSION_WILL_DROP: u8 = 3;
    pub const NEGOTIATION_REQUESTED: u8 = 4;
    pub const TASK_TERMINATION: u8 = 5;
    pub const VENDOR_SPECIFIC: u8 = 255;
}

/// SCSI Response `response` field (RFC 7143 §11.4.3).
pub mod scsi_response {
    pub const COMMAND_COMPLETED: u8 = 0x00;
    pub const TARGET_FAILURE: u8 = 0x01;
}

/// Why a BHS could not be turned into a typed header.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("opcode {opcode:?} carries AHS, which only SCSI Command may")]
    UnexpectedAhs { opcode: Opcode },
    #[error("malformed AHS: {0}")]
    BadAhs(&'static str),
    #[error("invalid field in {opcode:?}: {what}")]
    InvalidField { opcode: Opcode, what: &'static str },
}

impl ParseError {
    /// The Reject reason that answers this error (RFC 7143 §11.17.1).
    pub fn reject_reason(&self) -> u8 {
        match self {
            ParseError::UnknownOpcode(_) => reject_reason::COMMAND_NOT_SUPPORTED,
            ParseError::UnexpectedAhs { .. } | ParseError::BadAhs(_) => {
                reject_reason::PROTOCOL_ERROR
            }
            ParseError::InvalidField { .. } => reject_reason::INVALID_PDU_FIELD,
        }
    }
}

/// A PDU cut out of the stream but not yet interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawPdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Bytes,
    pub data: Bytes,
}

/// A typed PDU: its header and its data segment (without padding or digest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu {
    pub header: Header,
    pub data: Bytes,
}

/// The typed Basic Header Segment of each opcode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Header {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SCSI task attributes (RFC 7143 §11.3.1.3).
pub mod task_attr {
    pub const UNTAGGED: u8 = 0;
    pub const SIMPLE: u8 = 1;
    pub const ORDERED: u8 = 2;
    pub const HEAD_OF_QUEUE: u8 = 3;
    pub const ACA: u8 = 4;
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F: no unsolicited Data-Out follows.
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_transfer_length: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
    /// CDB bytes beyond the first 16 (Extended CDB AHS, RFC 7143 §11.3.4.1).
    pub extended_cdb: Option<Bytes>,
    /// Bidirectional Read Expected Data Transfer Length AHS (§11.3.4.2).
    pub bidi_read_length: Option<u32>,
}

impl ScsiCommand {
    /// The whole CDB, including any extension.
    pub fn full_cdb(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.extended_cdb {
            None => std::borrow::Cow::Borrowed(&self.cdb[..]),
            Some(ext) => {
                let mut v = Vec::with_capacity(16 + ext.len());
                v.extend_from_slice(&self.cdb);
                v.extend_from_slice(ext);
                std::borrow::Cow::Owned(v)
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnackRequest {
    pub snack_type: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_residual_count: u32,
    pub residual_count: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// S: the SCSI status is in this PDU.
    pub status_present: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual_count: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_data_transfer_length: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub event: u8,
    pub vcode: u8,
    pub parameter1: u16,
    pub parameter2: u16,
    pub parameter3: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
}

// ---- field access on a BHS; every index is within the 48-byte array ----

fn be16(b: &[u8; BHS_LEN], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8; BHS_LEN], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8; BHS_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}
fn put16(b: &mut [u8; BHS_LEN], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8; BHS_LEN], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8; BHS_LEN], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn bit(byte: u8, mask: u8) -> bool {
    byte & mask != 0
}
fn flag(on: bool, mask: u8) -> u8 {
    if on {
        mask
    } else {
        0
    }
}

/// DataSegmentLength of a raw BHS.
pub fn data_segment_length(bhs: &[u8; BHS_LEN]) -> u32 {
    u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]])
}

/// TotalAHSLength of a raw BHS, in bytes.
pub fn total_ahs_length(bhs: &[u8; BHS_LEN]) -> usize {
    usize::from(bhs[4]) * 4
}

/// Initiator Task Tag of a raw BHS (bytes 16..20 for every opcode).
pub fn itt(bhs: &[u8; BHS_LEN]) -> u32 {
    be32(bhs, 16)
}

const AHS_EXTENDED_CDB: u8 = 1;
const AHS_BIDI_READ_LENGTH: u8 = 2;

impl RawPdu {
    pub fn opcode_byte(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    pub fn itt(&self) -> u32 {
        itt(&self.bhs)
    }

    /// Interprets the BHS and AHS.
    pub fn parse(self) -> Result<Pdu, ParseError> {
        let header = Header::parse(&self.bhs, &self.ahs)?;
        Ok(Pdu {
            header,
            data: self.data,
        })
    }
}

impl Header {
    pub fn opcode(&self) -> Opcode {
        match self {
            Header::NopOut(_) => Opcode::NopOut,
            Header::ScsiCommand(_) => Opcode::ScsiCommand,
            Header::TaskMgmtRequest(_) => Opcode::TaskMgmtRequest,
            Header::LoginRequest(_) => Opcode::LoginRequest,
            Header::TextRequest(_) => Opcode::TextRequest,
            Header::DataOut(_) => Opcode::DataOut,
            Header::LogoutRequest(_) => Opcode::LogoutRequest,
            Header::SnackRequest(_) => Opcode::SnackRequest,
            Header::NopIn(_) => Opcode::NopIn,
            Header::ScsiResponse(_) => Opcode::ScsiResponse,
            Header::TaskMgmtResponse(_) => Opcode::TaskMgmtResponse,
            Header::LoginResponse(_) => Opcode::LoginResponse,
            Header::TextResponse(_) => Opcode::TextResponse,
            Header::DataIn(_) => Opcode::DataIn,
            Header::LogoutResponse(_) => Opcode::LogoutResponse,
            Header::R2t(_) => Opcode::R2t,
            Header::AsyncMessage(_) => Opcode::AsyncMessage,
            Header::Reject(_) => Opcode::Reject,
        }
    }

    /// The Initiator Task Tag, for the opcodes that have one.
    pub fn itt(&self) -> Option<u32> {
        Some(match self {
            Header::NopOut(h) => h.itt,
            Header::ScsiCommand(h) => h.itt,
            Header::TaskMgmtRequest(h) => h.itt,
            Header::LoginRequest(h) => h.itt,
            Header::TextRequest(h) => h.itt,
            Header::DataOut(h) => h.itt,
            Header::LogoutRequest(h) => h.itt,
            Header::SnackRequest(h) => h.itt,
            Header::NopIn(h) => h.itt,
            Header::ScsiResponse(h) => h.itt,
            Header::TaskMgmtResponse(h) => h.itt,
            Header::LoginResponse(h) => h.itt,
            Header::TextResponse(h) => h.itt,
            Header::DataIn(h) => h.itt,
            Header::LogoutResponse(h) => h.itt,
            Header::R2t(h) => h.itt,
            Header::AsyncMessage(_) | Header::Reject(_) => return None,
        })
    }

    /// Sets StatSN, ExpCmdSN and MaxCmdSN on the target's PDUs that carry
    /// them; the connection's writer calls this at send time so the numbers
    /// are current and StatSN follows the order on the wire.
    pub fn set_sequence_numbers(&mut self, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) {
        let fields = match self {
            Header::NopIn(h) => Some((&mut h.stat_sn, &mut h.exp_cmd_sn, &mut h.max_cmd_sn)),
            Header::ScsiResponse(h) => Some((&mut h.stat_sn, &mut h.exp_cmd_sn, &mut h.max_cmd_sn)),
            Header::TaskMgmtResponse(h) => {
                Some((&mut h.stat_sn, &mut h.exp_cmd_sn, &mut h.max_cmd_sn))
            }
            Header::LoginResponse(h) => {
                Some((&mut h.stat_sn, &mut h.exp_cmd_sn, &mut h.max_cmd_sn))
            }
            Header::TextResponse(h) => Some((&mut h.stat_sn, &mut h.exp_cmd_sn, &mut h.max_cmd_sn)),
            Header::DataIn(h) => Some((&mut h.stat_sn, &mut h.exp_cmd_sn, &mut h.max_cmd_sn)),
            Header::LogoutResponse(h) => {
                Some((&mut h.stat_sn, &mut h.exp_cmd_sn, &mut h.max_cmd_sn))
            }
            Header::R2t(h) => Some((&mut h.stat_sn, &mut h.exp_cmd_sn, &mut h.max_cmd_sn)),
            Header::AsyncMessage(h) => Some((&mut h.stat_sn, &mut h.exp_cmd_sn, &mut h.max_cmd_sn)),
            Header::Reject(h) => Some((&mut h.stat_sn, &mut h.exp_cmd_sn, &mut h.max_cmd_sn)),
            _ => None,
        };
        if let Some((s, e, m)) = fields {
            *s = stat_sn;
            *e = exp_cmd_sn;
            *m = max_cmd_sn;
        }
    }

    /// Interprets a BHS and its AHS bytes (only SCSI Command may have AHS).
    pub fn parse(b: &[u8; BHS_LEN], ahs: &[u8]) -> Result<Header, ParseError> {
        let opcode = Opcode::from_u8(b[0]).ok_or(ParseError::UnknownOpcode(b[0] & 0x3f))?;
        if !ahs.is_empty() && opcode != Opcode::ScsiCommand {
            return Err(ParseError::UnexpectedAhs { opcode });
        }
        let immediate = bit(b[0], 0x40);
        let f = b[1];
        Ok(match opcode {
            Opcode::NopOut => Header::NopOut(NopOut {
                immediate,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            Opcode::ScsiCommand => {
                let mut cdb = [0u8; 16];
                cdb.copy_from_slice(&b[32..48]);
                let (extended_cdb, bidi_read_length) = parse_command_ahs(ahs)?;
                Header::ScsiCommand(ScsiCommand {
                    immediate,
                    final_: bit(f, 0x80),
                    read: bit(f, 0x40),
                    write: bit(f, 0x20),
                    attr: f & 0x07,
                    lun: be64(b, 8),
                    itt: be32(b, 16),
                    expected_data_transfer_length: be32(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                    cdb,
                    extended_cdb,
                    bidi_read_length,
                })
            }
            Opcode::TaskMgmtRequest => Header::TaskMgmtRequest(TaskMgmtRequest {
                immediate,
                function: f & 0x7f,
                lun: be64(b, 8),
                itt: be32(b, 16),
                referenced_task_tag: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                ref_cmd_sn: be32(b, 32),
                exp_data_sn: be32(b, 36),
            }),
            Opcode::LoginRequest => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Header::LoginRequest(LoginRequest {
                    transit: bit(f, 0x80),
                    cont: bit(f, 0x40),
                    csg: (f >> 2) & 0x03,
                    nsg: f & 0x03,
                    version_max: b[2],
                    version_min: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt: be32(b, 16),
                    cid: be16(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                })
            }
            Opcode::TextRequest => Header::TextRequest(TextRequest {
                immediate,
                final_: bit(f, 0x80),
                cont: bit(f, 0x40),
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            Opcode::DataOut => Header::DataOut(DataOut {
                final_: bit(f, 0x80),
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                exp_stat_sn: be32(b, 28),
                data_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
            }),
            Opcode::LogoutRequest => Header::LogoutRequest(LogoutRequest {
                immediate,
                reason: f & 0x7f,
                itt: be32(b, 16),
                cid: be16(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            Opcode::SnackRequest => Header::SnackRequest(SnackRequest {
                snack_type: f & 0x0f,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                exp_stat_sn: be32(b, 28),
                beg_run: be32(b, 40),
                run_length: be32(b, 44),
            }),
            Opcode::NopIn => Header::NopIn(NopIn {
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            Opcode::ScsiResponse => Header::ScsiResponse(ScsiResponse {
                bidi_overflow: bit(f, 0x10),
                bidi_underflow: bit(f, 0x08),
                overflow: bit(f, 0x04),
                underflow: bit(f, 0x02),
                response: b[2],
                status: b[3],
                itt: be32(b, 16),
                snack_tag: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                exp_data_sn: be32(b, 36),
                bidi_residual_count: be32(b, 40),
                residual_count: be32(b, 44),
            }),
            Opcode::TaskMgmtResponse => Header::TaskMgmtResponse(TaskMgmtResponse {
                response: b[2],
                itt: be32(b, 16),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            Opcode::LoginResponse => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Header::LoginResponse(LoginResponse {
                    transit: bit(f, 0x80),
                    cont: bit(f, 0x40),
                    csg: (f >> 2) & 0x03,
                    nsg: f & 0x03,
                    version_max: b[2],
                    version_active: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt: be32(b, 16),
                    stat_sn: be32(b, 24),
                    exp_cmd_sn: be32(b, 28),
                    max_cmd_sn: be32(b, 32),
                    status_class: b[36],
                    status_detail: b[37],
                })
            }
            Opcode::TextResponse => Header::TextResponse(TextResponse {
                final_: bit(f, 0x80),
                cont: bit(f, 0x40),
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            Opcode::DataIn => Header::DataIn(DataIn {
                final_: bit(f, 0x80),
                ack: bit(f, 0x40),
                overflow: bit(f, 0x04),
                underflow: bit(f, 0x02),
                status_present: bit(f, 0x01),
                // Reserved unless S is set (RFC 7143 §11.7.4).
                status: if bit(f, 0x01) { b[3] } else { 0 },
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                data_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                residual_count: be32(b, 44),
            }),
            Opcode::LogoutResponse => Header::LogoutResponse(LogoutResponse {
                response: b[2],
                itt: be32(b, 16),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                time2wait: be16(b, 40),
                time2retain: be16(b, 42),
            }),
            Opcode::R2t => Header::R2t(R2t {
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                r2t_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                desired_data_transfer_length: be32(b, 44),
            }),
            Opcode::AsyncMessage => Header::AsyncMessage(AsyncMessage {
                lun: be64(b, 8),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                event: b[36],
                vcode: b[37],
                parameter1: be16(b, 38),
                parameter2: be16(b, 40),
                parameter3: be16(b, 42),
            }),
            Opcode::Reject => Header::Reject(Reject {
                reason: b[2],
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                data_sn: be32(b, 36),
            }),
        })
    }

    /// Writes the BHS. TotalAHSLength and DataSegmentLength are filled in by
    /// the caller ([`Pdu::encode_header`]), which knows the AHS and data.
    pub fn write_bhs(&self, b: &mut [u8; BHS_LEN]) {
        *b = [0u8; BHS_LEN];
        b[0] = self.opcode() as u8;
        match self {
            Header::NopOut(h) => {
                b[0] |= flag(h.immediate, 0x40);
                b[1] = 0x80;
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
            }
            Header::ScsiCommand(h) => {
                b[0] |= flag(h.immediate, 0x40);
                b[1] = flag(h.final_, 0x80)
                    | flag(h.read, 0x40)
                    | flag(h.write, 0x20)
                    | (h.attr & 0x07);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.expected_data_transfer_length);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
                b[32..48].copy_from_slice(&h.cdb);
            }
            Header::TaskMgmtRequest(h) => {
                b[0] |= flag(h.immediate, 0x40);
                b[1] = 0x80 | (h.function & 0x7f);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.referenced_task_tag);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
                put32(b, 32, h.ref_cmd_sn);
                put32(b, 36, h.exp_data_sn);
            }
            Header::LoginRequest(h) => {
                b[0] |= 0x40; // login requests are always immediate
                b[1] =
                    flag(h.transit, 0x80) | flag(h.cont, 0x40) | ((h.csg & 3) << 2) | (h.nsg & 3);
                b[2] = h.version_max;
                b[3] = h.version_min;
                b[8..14].copy_from_slice(&h.isid);
                put16(b, 14, h.tsih);
                put32(b, 16, h.itt);
                put16(b, 20, h.cid);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
            }
            Header::TextRequest(h) => {
                b[0] |= flag(h.immediate, 0x40);
                b[1] = flag(h.final_, 0x80) | flag(h.cont, 0x40);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
            }
            Header::DataOut(h) => {
                b[1] = flag(h.final_, 0x80);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 28, h.exp_stat_sn);
                put32(b, 36, h.data_sn);
                put32(b, 40, h.buffer_offset);
            }
            Header::LogoutRequest(h) => {
                b[0] |= flag(h.immediate, 0x40);
                b[1] = 0x80 | (h.reason & 0x7f);
                put32(b, 16, h.itt);
                put16(b, 20, h.cid);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
            }
            Header::SnackRequest(h) => {
                b[1] = 0x80 | (h.snack_type & 0x0f);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 28, h.exp_stat_sn);
                put32(b, 40, h.beg_run);
                put32(b, 44, h.run_length);
            }
            Header::NopIn(h) => {
                b[1] = 0x80;
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
            }
            Header::ScsiResponse(h) => {
                b[1] = 0x80
                    | flag(h.bidi_overflow, 0x10)
                    | flag(h.bidi_underflow, 0x08)
                    | flag(h.overflow, 0x04)
                    | flag(h.underflow, 0x02);
                b[2] = h.response;
                b[3] = h.status;
                put32(b, 16, h.itt);
                put32(b, 20, h.snack_tag);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                put32(b, 36, h.exp_data_sn);
                put32(b, 40, h.bidi_residual_count);
                put32(b, 44, h.residual_count);
            }
            Header::TaskMgmtResponse(h) => {
                b[1] = 0x80;
                b[2] = h.response;
                put32(b, 16, h.itt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
            }
            Header::LoginResponse(h) => {
                b[1] =
                    flag(h.transit, 0x80) | flag(h.cont, 0x40) | ((h.csg & 3) << 2) | (h.nsg & 3);
                b[2] = h.version_max;
                b[3] = h.version_active;
                b[8..14].copy_from_slice(&h.isid);
                put16(b, 14, h.tsih);
                put32(b, 16, h.itt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                b[36] = h.status_class;
                b[37] = h.status_detail;
            }
            Header::TextResponse(h) => {
                b[1] = flag(h.final_, 0x80) | flag(h.cont, 0x40);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
            }
            Header::DataIn(h) => {
                b[1] = flag(h.final_, 0x80)
                    | flag(h.ack, 0x40)
                    | flag(h.overflow, 0x04)
                    | flag(h.underflow, 0x02)
                    | flag(h.status_present, 0x01);
                b[3] = if h.status_present { h.status } else { 0 };
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                put32(b, 36, h.data_sn);
                put32(b, 40, h.buffer_offset);
                put32(b, 44, h.residual_count);
            }
            Header::LogoutResponse(h) => {
                b[1] = 0x80;
                b[2] = h.response;
                put32(b, 16, h.itt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                put16(b, 40, h.time2wait);
                put16(b, 42, h.time2retain);
            }
            Header::R2t(h) => {
                b[1] = 0x80;
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                put32(b, 36, h.r2t_sn);
                put32(b, 40, h.buffer_offset);
                put32(b, 44, h.desired_data_transfer_length);
            }
            Header::AsyncMessage(h) => {
                b[1] = 0x80;
                put64(b, 8, h.lun);
                put32(b, 16, RESERVED_TAG);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                b[36] = h.event;
                b[37] = h.vcode;
                put16(b, 38, h.parameter1);
                put16(b, 40, h.parameter2);
                put16(b, 42, h.parameter3);
            }
            Header::Reject(h) => {
                b[1] = 0x80;
                b[2] = h.reason;
                put32(b, 16, RESERVED_TAG);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                put32(b, 36, h.data_sn);
            }
        }
    }
}

fn parse_command_ahs(mut ahs: &[u8]) -> Result<(Option<Bytes>, Option<u32>), ParseError> {
    let mut extended = None;
    let mut bidi = None;
    while !ahs.is_empty() {
        let (head, rest) = ahs
            .split_first_chunk::<3>()
            .ok_or(ParseError::BadAhs("truncated AHS header"))?;
        let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
        let ty = head[2];
        // AHSLength counts the type-specific byte and what follows it, not
        // the pad; each AHS is padded to a multiple of 4 bytes.
        let body = rest
            .get(..len)
            .ok_or(ParseError::BadAhs("AHSLength beyond TotalAHSLength"))?;
        let payload = body.get(1..).unwrap_or(&[]);
        match ty {
            AHS_EXTENDED_CDB => {
                if payload.is_empty() || extended.is_some() {
                    return Err(ParseError::BadAhs("bad extended CDB AHS"));
                }
                extended = Some(Bytes::copy_from_slice(payload));
            }
            AHS_BIDI_READ_LENGTH => {
                let v = match payload {
                    [a, b, c, d] => [*a, *b, *c, *d],
                    _ => return Err(ParseError::BadAhs("bidi read length AHSLength must be 5")),
                };
                bidi = Some(u32::from_be_bytes(v));
            }
            _ => return Err(ParseError::BadAhs("unknown AHS type")),
        }
        let consumed = (3 + len).div_ceil(4) * 4;
        ahs = ahs.get(consumed..).unwrap_or(&[]);
    }
    Ok((extended, bidi))
}

impl Pdu {
    pub fn new(header: Header, data: Bytes) -> Pdu {
        Pdu { header, data }
    }

    pub fn opcode(&self) -> Opcode {
        self.header.opcode()
    }

    /// AHS bytes for this PDU (SCSI Command only), padded to 4 bytes each.
    fn ahs_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Header::ScsiCommand(cmd) = &self.header {
            if let Some(ext) = &cmd.extended_cdb {
                let len = ext.len() + 1;
                out.extend_from_slice(&(len as u16).to_be_bytes());
                out.push(AHS_EXTENDED_CDB);
                out.push(0);
                out.extend_from_slice(ext);
                out.resize(out.len().div_ceil(4) * 4, 0);
            }
            if let Some(bidi) = cmd.bidi_read_length {
                out.extend_from_slice(&5u16.to_be_bytes());
                out.push(AHS_BIDI_READ_LENGTH);
                out.push(0);
                out.extend_from_slice(&bidi.to_be_bytes());
            }
        }
        out
    }

    /// Writes the BHS, AHS and (if enabled) the header digest.
    pub fn encode_header(&self, header_digest: bool, out: &mut BytesMut) {
        let mut bhs = [0u8; BHS_LEN];
        self.header.write_bhs(&mut bhs);
        let ahs = self.ahs_bytes();
        bhs[4] = (ahs.len() / 4) as u8;
        let dlen = self.data.len() as u32;
        bhs[5..8].copy_from_slice(&dlen.to_be_bytes()[1..4]);
        let start = out.len();
        out.reserve(BHS_LEN + ahs.len() + 4);
        out.put_slice(&bhs);
        out.put_slice(&ahs);
        if header_digest {
            let crc = crate::digest::crc32c(&out[start..]);
            out.put_slice(&crate::digest::to_wire(crc));
        }
    }

    /// Pad bytes and data digest that follow the data segment on the wire.
    pub fn encode_trailer(&self, data_digest: bool) -> ([u8; 7], usize) {
        let mut trailer = [0u8; 7];
        if self.data.is_empty() {
            return (trailer, 0);
        }
        let pad = crate::digest::pad_len(self.data.len());
        let mut n = pad;
        if data_digest {
            let crc = crate::digest::data_digest(&self.data, pad);
            trailer[pad..pad + 4].copy_from_slice(&crate::digest::to_wire(crc));
            n += 4;
        }
        (trailer, n)
    }

    /// The whole PDU as contiguous bytes.
    pub fn encode(&self, header_digest: bool, data_digest: bool, out: &mut BytesMut) {
        self.encode_header(header_digest, out);
        if !self.data.is_empty() {
            out.put_slice(&self.data);
            let (trailer, n) = self.encode_trailer(data_digest);
            out.put_slice(&trailer[..n]);
        }
    }

    /// Convenience: encode to a fresh buffer.
    pub fn to_bytes(&self, header_digest: bool, data_digest: bool) -> Bytes {
        let mut out = BytesMut::with_capacity(BHS_LEN + self.data.len() + 12);
        self.encode(header_digest, data_digest, &mut out);
        out.freeze()
    }
}

/// Decodes an 8-byte LUN field (SAM-5 §4.7) into a flat LUN number for the
/// peripheral (00b) and flat (01b) addressing methods; other methods keep
/// the raw first level so they never alias a valid LUN.
pub fn lun_from_wire(raw: u64) -> u64 {
    let first = (raw >> 48) as u16;
    if raw & 0x0000_ffff_ffff_ffff != 0 {
        // A second addressing level: no LUN of ours lives there.
        return (1u64 << 34) | u64::from(first);
    }
    match first >> 14 {
        0 => u64::from(first & 0x00ff) | if first & 0x3f00 != 0 { 1 << 32 } else { 0 },
        1 => u64::from(first & 0x3fff),
        _ => (1u64 << 33) | u64::from(first),
    }
}

/// Encodes a LUN number the way REPORT LUNS lists it: peripheral addressing
/// below 256, flat addressing above.
pub fn lun_to_wire(lun: u64) -> u64 {
    if lun < 256 {
        lun << 48
    } else {
        ((lun & 0x3fff) | 0x4000) << 48
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(header: Header, data: &'static [u8]) {
        let pdu = Pdu::new(header, Bytes::from_static(data));
        for (hd, dd) in [(false, false), (true, true)] {
            let wire = pdu.to_bytes(hd, dd);
            let mut bhs = [0u8; BHS_LEN];
            bhs.copy_from_slice(&wire[..BHS_LEN]);
            let ahs_len = total_ahs_length(&bhs);
            let dlen = data_segment_length(&bhs) as usize;
            assert_eq!(dlen, data.len());
            let ahs = wire.slice(BHS_LEN..BHS_LEN + ahs_len);
            let dstart = BHS_LEN + ahs_len + if hd { 4 } else { 0 };
            let raw = RawPdu {
                bhs,
                ahs,
                data: wire.slice(dstart..dstart + dlen),
            };
            assert_eq!(raw.parse().unwrap(), pdu);
        }
    }

    #[test]
    fn every_opcode_round_trips() {
        roundtrip(
            Header::NopOut(NopOut {
                immediate: true,
                lun: 1 << 48,
                itt: 7,
                ttt: RESERVED_TAG,
                cmd_sn: 9,
                exp_stat_sn: 10,
            }),
            b"ping",
        );
        roundtrip(
            Header::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: true,
                read: true,
                write: false,
                attr: task_attr::SIMPLE,
                lun: 0,
                itt: 0x1234,
                expected_data_transfer_length: 4096,
                cmd_sn: 1,
                exp_stat_sn: 2,
                cdb: [0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
                extended_cdb: None,
                bidi_read_length: None,
            }),
            b"",
        );
        roundtrip(
            Header::ScsiCommand(ScsiCommand {
                write: true,
                read: true,
                cdb: [0x7f; 16],
                extended_cdb: Some(Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])),
                bidi_read_length: Some(512),
                ..Default::default()
            }),
            b"abcde",
        );
        roundtrip(
            Header::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function: tmf::ABORT_TASK,
                lun: 0,
                itt: 5,
                referenced_task_tag: 4,
                cmd_sn: 3,
                exp_stat_sn: 2,
                ref_cmd_sn: 1,
                exp_data_sn: 0,
            }),
            b"",
        );
        roundtrip(
            Header::LoginRequest(LoginRequest {
                transit: true,
                cont: false,
                csg: stage::SECURITY,
                nsg: stage::OPERATIONAL,
                version_max: 0,
                version_min: 0,
                isid: [0x80, 1, 2, 3, 4, 5],
                tsih: 0,
                itt: 0,
                cid: 1,
                cmd_sn: 1,
                exp_stat_sn: 0,
            }),
            b"InitiatorName=iqn.x\0SessionType=Normal\0",
        );
        roundtrip(
            Header::TextRequest(TextRequest {
                final_: true,
                itt: 3,
                ttt: RESERVED_TAG,
                ..Default::default()
            }),
            b"SendTargets=All\0",
        );
        roundtrip(
            Header::DataOut(DataOut {
                final_: true,
                lun: 0,
                itt: 1,
                ttt: 2,
                exp_stat_sn: 3,
                data_sn: 4,
                buffer_offset: 8192,
            }),
            b"123",
        );
        roundtrip(
            Header::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: logout::CLOSE_SESSION,
                itt: 9,
                cid: 1,
                cmd_sn: 5,
                exp_stat_sn: 6,
            }),
            b"",
        );
        roundtrip(
            Header::SnackRequest(SnackRequest {
                snack_type: 1,
                itt: 2,
                beg_run: 3,
                run_length: 4,
                ..Default::default()
            }),
            b"",
        );
        roundtrip(
            Header::NopIn(NopIn {
                itt: RESERVED_TAG,
                ttt: 77,
                stat_sn: 1,
                exp_cmd_sn: 2,
                max_cmd_sn: 33,
                ..Default::default()
            }),
            b"",
        );
        roundtrip(
            Header::ScsiResponse(ScsiResponse {
                underflow: true,
                status: 2,
                itt: 1,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
                residual_count: 512,
                ..Default::default()
            }),
            b"\0\x12sense-bytes-here!",
        );
        roundtrip(
            Header::TaskMgmtResponse(TaskMgmtResponse {
                response: tmf::TASK_DOES_NOT_EXIST,
                itt: 1,
                stat_sn: 2,
                exp_cmd_sn: 3,
                max_cmd_sn: 4,
            }),
            b"",
        );
        roundtrip(
            Header::LoginResponse(LoginResponse {
                transit: true,
                csg: 1,
                nsg: 3,
                isid: [0x80, 1, 2, 3, 4, 5],
                tsih: 0x0101,
                itt: 0,
                stat_sn: 1,
                exp_cmd_sn: 2,
                max_cmd_sn: 33,
                status_class: 2,
                status_detail: 1,
                ..Default::default()
            }),
            b"TargetPortalGroupTag=1\0",
        );
        roundtrip(
            Header::TextResponse(TextResponse {
                final_: true,
                itt: 3,
                ttt: RESERVED_TAG,
                ..Default::default()
            }),
            b"TargetName=iqn.y\0",
        );
        roundtrip(
            Header::DataIn(DataIn {
                final_: true,
                status_present: true,
                status: 0,
                underflow: true,
                itt: 8,
                ttt: RESERVED_TAG,
                data_sn: 3,
                buffer_offset: 4096,
                residual_count: 100,
                ..Default::default()
            }),
            b"data",
        );
        roundtrip(
            Header::LogoutResponse(LogoutResponse {
                response: logout::SUCCESS,
                itt: 1,
                time2wait: 2,
                time2retain: 20,
                ..Default::default()
            }),
            b"",
        );
        roundtrip(
            Header::R2t(R2t {
                itt: 1,
                ttt: 2,
                r2t_sn: 3,
                buffer_offset: 65536,
                desired_data_transfer_length: 262144,
                ..Default::default()
            }),
            b"",
        );
        roundtrip(
            Header::AsyncMessage(AsyncMessage {
                event: async_event::LOGOUT_REQUESTED,
                parameter3: 5,
                ..Default::default()
            }),
            b"",
        );
        roundtrip(
            Header::Reject(Reject {
                reason: reject_reason::PROTOCOL_ERROR,
                stat_sn: 4,
                ..Default::default()
            }),
            &[0u8; 48],
        );
    }

    /// RFC 7143 §11.12: Login Request layout, byte by byte.
    #[test]
    fn login_request_matches_rfc_layout() {
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x43; // I=1, opcode 0x03
        b[1] = 0x87; // T=1, C=0, CSG=1, NSG=3
        b[2] = 0x00; // Version-max
        b[3] = 0x00; // Version-min
        b[5..8].copy_from_slice(&[0, 0, 0x10]);
        b[8..14].copy_from_slice(&[0x00, 0x02, 0x3d, 0x00, 0x00, 0x01]);
        b[14..16].copy_from_slice(&[0x00, 0x05]); // TSIH
        b[16..20].copy_from_slice(&[0, 0, 0, 0x0a]); // ITT
        b[20..22].copy_from_slice(&[0, 2]); // CID
        b[24..28].copy_from_slice(&[0, 0, 0, 0x11]); // CmdSN
        b[28..32].copy_from_slice(&[0, 0, 0, 0x22]); // ExpStatSN
        let h = Header::parse(&b, &[]).unwrap();
        let Header::LoginRequest(l) = &h else {
            panic!("not a login request")
        };
        assert!(l.transit && !l.cont);
        assert_eq!((l.csg, l.nsg), (1, 3));
        assert_eq!(l.isid, [0x00, 0x02, 0x3d, 0x00, 0x00, 0x01]);
        assert_eq!(
            (l.tsih, l.itt, l.cid, l.cmd_sn, l.exp_stat_sn),
            (5, 10, 2, 0x11, 0x22)
        );
        assert_eq!(data_segment_length(&b), 0x10);
        let mut back = [0u8; BHS_LEN];
        h.write_bhs(&mut back);
        back[5..8].copy_from_slice(&[0, 0, 0x10]);
        assert_eq!(back, b);
    }

    /// RFC 7143 §11.7: Data-In flags byte and the status field placement.
    #[test]
    fn data_in_flags_match_rfc_layout() {
        let pdu = Pdu::new(
            Header::DataIn(DataIn {
                final_: true,
                status_present: true,
                underflow: true,
                status: 0x02,
                itt: 1,
                ..Default::default()
            }),
            Bytes::new(),
        );
        let wire = pdu.to_bytes(false, false);
        assert_eq!(wire[0], 0x25);
        assert_eq!(wire[1], 0x83);
        assert_eq!(wire[3], 0x02);
    }

    /// RFC 7143 §11.3: SCSI Command with the R/W bits and attributes.
    #[test]
    fn scsi_command_flags_match_rfc_layout() {
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x01;
        b[1] = 0xa1; // F, W, SIMPLE
        b[20..24].copy_from_slice(&512u32.to_be_bytes());
        b[32] = 0x2a;
        let Header::ScsiCommand(c) = Header::parse(&b, &[]).unwrap() else {
            panic!()
        };
        assert!(c.final_ && c.write && !c.read && !c.immediate);
        assert_eq!(c.attr, task_attr::SIMPLE);
        assert_eq!(c.expected_data_transfer_length, 512);
        assert_eq!(c.cdb[0], 0x2a);
    }

    #[test]
    fn unknown_opcode_is_rejected_as_not_supported() {
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x1c;
        let err = Header::parse(&b, &[]).unwrap_err();
        assert_eq!(err, ParseError::UnknownOpcode(0x1c));
        assert_eq!(err.reject_reason(), reject_reason::COMMAND_NOT_SUPPORTED);
    }

    #[test]
    fn ahs_on_other_opcodes_is_a_protocol_error() {
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x00;
        let err = Header::parse(&b, &[0, 1, 1, 0]).unwrap_err();
        assert!(matches!(err, ParseError::UnexpectedAhs { .. }));
    }

    #[test]
    fn malformed_ahs_never_panics() {
        let mut b = [0u8; BHS_LEN];
        b[0] = 0x01;
        for ahs in [
            &[0u8][..],
            &[0, 0xff, 1, 0],
            &[0, 0, 1, 0],
            &[0, 5, 2, 0, 0, 0, 0],
            &[0, 1, 9, 0],
        ] {
            assert!(Header::parse(&b, ahs).is_err(), "{ahs:?}");
        }
    }

    #[test]
    fn lun_encoding_round_trips_for_both_methods() {
        for lun in [0u64, 1, 255, 256, 16383] {
            assert_eq!(lun_from_wire(lun_to_wire(lun)), lun);
        }
        // Peripheral addressing with a bus number is not LUN 0.
        assert_ne!(lun_from_wire(0x0100 << 48), 0);
    }
}
