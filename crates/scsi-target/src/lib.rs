//! # scsi-target — the SCSI target core (STMF + sbd's role)
//!
//! Sits under the port providers (`iscsi-target`) on the map in `ARCHITECTURE.md`
//! and knows nothing of iSCSI: it sees an I_T nexus, a LUN, a CDB and the data.
//!
//! A port hands each command to [`LunMap::execute`] (or straight to a
//! [`LogicalUnit`]) with all of its Data-Out already collected, and gets back
//! status, sense and data-in. Execution is synchronous; when
//! [`LogicalUnit::may_block`] is true the port runs it on the LU's own I/O
//! threads ([`LogicalUnit::spawn_io`]).
//!
//! One file per command family: [`spc`] (primary commands), `vpd` (INQUIRY
//! pages), `mode` (MODE SENSE/SELECT), `sbc` (block commands), `sanitize`
//! (SANITIZE, an operation of the LU that outlives its command), `opcodes`
//! (REPORT SUPPORTED OPERATION CODES), `reservation` (RESERVE/RELEASE and
//! persistent reservations), [`sense`] (sense data); [`backend`] and
//! [`rbd`] (Ceph RBD images, loaded at run time) are the stores.
//!
//! What the port does for the core:
//! - calls [`LunMap::nexus_established`] when a session (I_T nexus) reaches
//!   full feature phase, and [`LunMap::nexus_lost`] when it ends for good
//!   (logout, connection loss without recovery, session reinstatement of the
//!   old session), so RESERVE(6) is dropped and unit attentions are
//!   forgotten; a nexus never announced is registered on its first command;
//! - maps LOGICAL UNIT RESET to [`LogicalUnit::reset`] and TARGET WARM/COLD
//!   RESET to [`LunMap::reset_all`], passing the issuing nexus;
//! - truncates data-in to Expected Data Transfer Length and computes the
//!   residuals; for writes [`LunMap::expected_data_out_len`] gives the
//!   transfer length the CDB asks for;
//! - runs `execute` through [`LogicalUnit::spawn_io`] when
//!   [`LogicalUnit::may_block`], and on a thread where a long wait holds
//!   up nothing when [`LogicalUnit::waits_long`] (SANITIZE without IMMED
//!   returns when the sanitize ends).
//!
//! No input from the wire can make this crate panic: CDB bytes are read
//! through [`cdb::Cdb`], which answers zero past the end, and parameter lists
//! are length-checked before use.

pub mod alua;
pub mod backend;
pub mod bufpool;
pub mod cdb;
mod iopool;
mod lu;
mod lunmap;
mod mode;
mod opcodes;
pub mod rbd;
mod reservation;
mod sanitize;
mod sbc;
pub mod sense;
pub mod spc;
mod vpd;

use std::sync::Arc;

use bytes::Bytes;

pub use alua::{AluaGroup, AluaState};
pub use backend::{
    Backend, BackendCaps, CompareAndWrite, FileBackend, FileOptions, MemoryBackend, NullBackend,
    SharedState,
};
pub use lu::{DataDirection, LogicalUnit, LuConfig, LuError, LuStats};
pub use lunmap::LunMap;
pub use rbd::{RbdBackend, RbdConfig, RbdError};
pub use sense::{Sense, SenseCode};

/// Unique per I_T nexus, assigned by the port.
pub type NexusId = u64;

/// One I_T nexus: an initiator port talking to a target port.
#[derive(Clone, Debug)]
pub struct Nexus {
    pub id: NexusId,
    /// iSCSI: `"iqn.x,i,0x<isid hex>"`
    pub initiator_port_name: Arc<str>,
    /// iSCSI: `"iqn.y,t,0x<tpgt hex>"`
    pub target_port_name: Arc<str>,
    pub relative_target_port_id: u16,
    pub target_port_group_id: u16,
}

/// SAM task attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskAttr {
    Simple,
    Ordered,
    HeadOfQueue,
    Aca,
    Untagged,
}

/// One SCSI command as the port delivers it.
pub struct ScsiTask<'a> {
    pub nexus: &'a Nexus,
    /// The SAM LUN as a plain number 0..16383 (the port decodes the LUN structure).
    pub lun: u64,
    /// 6..=260 bytes.
    pub cdb: &'a [u8],
    /// All write data the initiator sent (may be shorter or longer than the CDB implies).
    pub data_out: &'a [u8],
    /// The buffer `data_out` is, when it is a buffer of its own that a
    /// backend may keep (a memory LU takes a whole page of it as the page
    /// instead of copying it). `None`: `data_out` is only borrowed.
    pub data_out_buffer: Option<&'a bytes::Bytes>,
    /// The initiator's allocation for data-in; we may return more, the port truncates.
    pub expected_in_len: u32,
    pub attr: TaskAttr,
    pub tag: u64,
}

/// SAM status codes.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const ACA_ACTIVE: u8 = 0x30;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// The pieces of read data after the first (see [`ScsiResponse::data_in_more`]).
pub type MoreData = smallvec::SmallVec<[Bytes; 4]>;

/// What a command produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScsiResponse {
    pub status: u8,
    /// Fixed-format sense (70h), 18 bytes, when status is CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// The data for the initiator: this, then each of `data_in_more`.
    pub data_in: Bytes,
    /// Where the data goes on, piece after piece: a read across a memory
    /// LU's pages, sent from each page rather than gathered into a copy
    /// ([`Backend::read_pieces`]). Empty for nearly every command; a read
    /// over up to five pages (any 512 KiB read) keeps its pieces inline (no allocation).
    pub data_in_more: MoreData,
}

impl ScsiResponse {
    pub fn good(data_in: Bytes) -> Self {
        ScsiResponse {
            status: status::GOOD,
            sense: None,
            data_in,
            data_in_more: MoreData::new(),
        }
    }

    /// Bytes of data for the initiator, all pieces together.
    pub fn data_in_len(&self) -> usize {
        self.data_in.len() + self.data_in_more.iter().map(Bytes::len).sum::<usize>()
    }

    /// All the data for the initiator in one buffer (a copy only when it
    /// came in pieces): for callers that want it whole, such as tests.
    pub fn data_in_whole(&self) -> Bytes {
        if self.data_in_more.is_empty() {
            return self.data_in.clone();
        }
        let mut v = Vec::with_capacity(self.data_in_len());
        v.extend_from_slice(&self.data_in);
        for piece in &self.data_in_more {
            v.extend_from_slice(piece);
        }
        Bytes::from(v)
    }

    pub fn good_empty() -> Self {
        Self::good(Bytes::new())
    }

    pub fn check_condition(sense: &Sense) -> Self {
        ScsiResponse {
            status: status::CHECK_CONDITION,
            sense: Some(sense.to_bytes()),
            data_in: Bytes::new(),
            data_in_more: MoreData::new(),
        }
    }

    pub fn with_status(status: u8) -> Self {
        ScsiResponse {
            status,
            sense: None,
            data_in: Bytes::new(),
            data_in_more: MoreData::new(),
        }
    }

    /// The (key, ASC, ASCQ) of the sense data, if any.
    pub fn sense_code(&self) -> Option<SenseCode> {
        let s = self.sense.as_ref()?;
        Some(SenseCode {
            key: s.get(2)? & 0x0F,
            asc: *s.get(12)?,
            ascq: *s.get(13)?,
        })
    }
}

/// Why a command did not complete with GOOD: sense data, or a bare status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fail {
    Check(Sense),
    Status(u8),
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Self {
        Fail::Check(s)
    }
}

impl From<SenseCode> for Fail {
    fn from(c: SenseCode) -> Self {
        Fail::Check(Sense::new(c))
    }
}

impl Fail {
    pub(crate) fn into_response(self) -> ScsiResponse {
        match self {
            Fail::Check(s) => ScsiResponse::check_condition(&s),
            Fail::Status(st) => ScsiResponse::with_status(st),
        }
    }
}

pub(crate) type CmdResult = Result<ScsiResponse, Fail>;

/// Truncates built parameter data to the CDB's ALLOCATION LENGTH: returning
/// less than the full data is not an error (SPC-4 §4.2.5.6).
pub(crate) fn alloc_trunc(mut v: Vec<u8>, alloc_len: u64) -> Bytes {
    if let Ok(a) = usize::try_from(alloc_len) {
        v.truncate(a);
    }
    Bytes::from(v)
}

#[cfg(test)]
mod testutil;
