//! The Transport seam (what COMSTAR's `idm_transport_ops_t` was): how IDM
//! moves PDUs over TCP or iSER. IDM above it owns sequence numbers, the task
//! table, negotiation results, timers and state; a transport only frames,
//! sends and receives, and learns the negotiated digests and limits.
//!
//! A transport is split into a receive half and a send half so that one task
//! can read while another writes (batching every ready response into one
//! `writev` is what makes small I/O cheap: see PEERS.md's socket costs).

use std::future::Future;

use iscsi_proto::codec::DecodeError;
use iscsi_proto::pdu::{Pdu, RawPdu};
use thiserror::Error;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("transport I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A framing or digest error; see [`DecodeError`] for whether the
    /// connection can go on (a data digest error can, a header digest error cannot).
    #[error("framing: {0}")]
    Decode(#[from] DecodeError),
    #[error("the peer closed the connection in the middle of a PDU")]
    TruncatedPdu,
}

/// What a transport says about itself (for inspection and negotiation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportInfo {
    /// "tcp" or "iser".
    pub kind: &'static str,
    pub local_addr: String,
    pub peer_addr: String,
}

/// A bidirectional PDU transport, before it is split.
pub trait Transport: Send + 'static {
    type Rx: PduRx;
    type Tx: PduTx;
    fn info(&self) -> TransportInfo;
    fn into_split(self) -> (Self::Rx, Self::Tx);
}

/// The receive half.
pub trait PduRx: Send + 'static {
    /// The next PDU, or `Ok(None)` when the peer closed cleanly between PDUs.
    fn recv(&mut self) -> impl Future<Output = Result<Option<RawPdu>, TransportError>> + Send;
    /// Turns digests on or off (after login negotiated them).
    fn set_digests(&mut self, header: bool, data: bool);
    /// Our MaxRecvDataSegmentLength: longer data segments are refused.
    fn set_max_recv_data_segment_length(&mut self, len: u32);
}

/// The send half.
pub trait PduTx: Send + 'static {
    /// Sends the PDUs in order, as few system calls as possible.
    fn send(&mut self, pdus: &[Pdu]) -> impl Future<Output = Result<(), TransportError>> + Send;
    fn set_digests(&mut self, header: bool, data: bool);
    /// Closes the sending direction.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}
