//! The Transport seam (what COMSTAR's `idm_transport_ops_t` was): how IDM
//! moves PDUs over TCP or iSER. IDM above it owns sequence numbers, the task
//! table, negotiation results, timers and state; a transport only frames,
//! sends and receives, and learns the negotiated digests and limits.
//!
//! A transport is split into a receive half and a send half so that one task
//! can read while another writes (batching every ready response into one
//! `writev` is what makes small I/O cheap: see PEERS.md's socket costs).
//!
//! # Data movement: one vocabulary, two realisations
//!
//! IDM above the seam speaks only in iSCSI PDUs, and the transport decides
//! how each data-service PDU is *realised* (COMSTAR's `idm_buf_tx_to_ini` /
//! `idm_buf_rx_from_ini`, which a transport implements its own way):
//!
//! | IDM hands the send half | TCP | iSER (RFC 7145), after [`PduTx::enable_datamover`] |
//! |---|---|---|
//! | Data-In (target "put data") | framed on the stream | RDMA WRITE into the initiator's advertised read buffer at the PDU's offset; the one carrying status becomes a SCSI Response SEND after the writes |
//! | R2T (target "get data") | framed on the stream | RDMA READ of that burst from the initiator's advertised write buffer; no R2T on the wire; its completion comes up the receive half as one Data-Out PDU (same TTT, DataSN 0, F set) |
//! | SCSI Command + its Data-Out (initiator) | framed on the stream (IDM sends only the unsolicited part; solicited Data-Out answers R2Ts) | the command's buffers are registered and advertised in the iSER header (read and write STag + VA): IDM hands **all** its write data as Data-Out PDUs right behind the command, the unsolicited part goes in SENDs and the rest is only staged for the target's RDMA READ |
//! | SCSI Response (initiator receives) | as received | preceded by a Data-In PDU carrying what the target RDMA-wrote (so IDM's Data-In placement is unchanged) |
//!
//! So the TCP path stays exactly as it was (no extra copy, no extra
//! allocation), and task management, MC/S, recovery and CmdSN order are
//! written once above the seam. Buffers a transport hands up are `Bytes`;
//! for iSER they are views of its registered memory, which therefore cannot
//! be reused while IDM holds them.

use std::future::Future;

use bytes::BytesMut;
use iscsi_proto::codec::DecodeError;
use iscsi_proto::negotiation::NegotiatedParams;
use iscsi_proto::pdu::{Pdu, RawPdu, BHS_LEN};
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

/// Which end of iSCSI a transport serves: the iSER data mover does opposite
/// things on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Target,
}

/// The data segment limits of the full feature phase. Over iSER
/// MaxRecvDataSegmentLength is irrelevant and the iSER keys take its place
/// (RFC 7145 §6.2, §6.3): the target receives up to
/// TargetRecvDataSegmentLength and the initiator up to
/// InitiatorRecvDataSegmentLength. A no-op for TCP.
pub fn full_feature_limits(params: &mut NegotiatedParams, role: Role) {
    if !params.rdma_extensions {
        return;
    }
    let (recv, xmit) = match role {
        Role::Target => (
            params.target_recv_data_segment_length,
            params.initiator_recv_data_segment_length,
        ),
        Role::Initiator => (
            params.initiator_recv_data_segment_length,
            params.target_recv_data_segment_length,
        ),
    };
    params.max_recv_data_segment_length = recv;
    params.max_xmit_data_segment_length = xmit;
}

/// A bidirectional PDU transport, before it is split.
pub trait Transport: Send + 'static {
    type Rx: PduRx;
    type Tx: PduTx;
    fn info(&self) -> TransportInfo;
    fn into_split(self) -> (Self::Rx, Self::Tx);
}

/// Where a Data-Out's data may be received straight into: the buffer of the
/// write it belongs to (see [`crate::r2t::WriteCollector::placement`]); also
/// asked for a write command's large immediate data.
pub trait DataOutSink: Send {
    /// For the Data-Out (or the SCSI Command with immediate data) whose BHS
    /// is `bhs`, with `len` data bytes of which `done` are already received
    /// into it: the buffer the rest is appended to, or `None` to receive the
    /// PDU as usual (or, once begun, to drop the rest of its data: the write
    /// went away meanwhile).
    fn sink_for(&mut self, bhs: &[u8; BHS_LEN], len: usize, done: usize) -> Option<&mut BytesMut>;
}

/// What [`PduRx::recv_into`] received.
#[derive(Debug)]
pub enum Received {
    Pdu(RawPdu),
    /// A Data-Out or SCSI Command whose `len` data bytes went into the buffer the sink gave
    /// (all of them unless `dropped`: the sink gave none for the rest).
    Placed {
        bhs: [u8; BHS_LEN],
        len: usize,
        dropped: bool,
    },
}

/// The receive half.
pub trait PduRx: Send + 'static {
    /// The next PDU, or `Ok(None)` when the peer closed cleanly between PDUs.
    fn recv(&mut self) -> impl Future<Output = Result<Option<RawPdu>, TransportError>> + Send;
    /// Like [`recv`](Self::recv), but the data of a Data-Out may be received
    /// straight into the buffer `sink` gives for it. Cancel-safe as `recv`
    /// is. The default receives every PDU as usual.
    fn recv_into<S: DataOutSink>(
        &mut self,
        _sink: S,
    ) -> impl Future<Output = Result<Option<Received>, TransportError>> + Send {
        async move { Ok(self.recv().await?.map(Received::Pdu)) }
    }
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
    /// Sends without waiting, from synchronous code (no task hop to a
    /// writer): `Ok(true)` when the transport took the PDUs — what the
    /// peer's window could not take now is kept, in order, and goes out
    /// first on the next [`send`](Self::send), see [`has_unsent`](Self::has_unsent);
    /// `Ok(false)` when it took nothing and they must go through `send`
    /// (the default, for a transport that cannot send this way).
    fn try_send(&mut self, _pdus: &[Pdu]) -> Result<bool, TransportError> {
        Ok(false)
    }
    /// A [`try_send`](Self::try_send) left bytes that only a `send` (even
    /// of no PDUs) writes out.
    fn has_unsent(&self) -> bool {
        false
    }
    /// Login is over: switch to full feature phase data movement with what
    /// it settled (iSER: from plain SENDs to RDMA-assisted mode, see the
    /// module's table). TCP has nothing to switch.
    fn enable_datamover(&mut self, _params: &NegotiatedParams) {}
    /// Closes the sending direction.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iser_keys_replace_max_recv_data_segment_length_only_over_rdma() {
        let mut p = NegotiatedParams {
            rdma_extensions: true,
            target_recv_data_segment_length: 65536,
            initiator_recv_data_segment_length: 16384,
            ..Default::default()
        };
        let mut t = p.clone();
        full_feature_limits(&mut t, Role::Target);
        assert_eq!(
            (
                t.max_recv_data_segment_length,
                t.max_xmit_data_segment_length
            ),
            (65536, 16384)
        );
        full_feature_limits(&mut p, Role::Initiator);
        assert_eq!(
            (
                p.max_recv_data_segment_length,
                p.max_xmit_data_segment_length
            ),
            (16384, 65536)
        );
        let mut tcp = NegotiatedParams::default();
        let before = tcp.clone();
        full_feature_limits(&mut tcp, Role::Target);
        assert_eq!(tcp, before);
    }
}
