//! The TCP transport: iSCSI PDUs framed on a byte stream (RFC 7143 §11),
//! with CRC32C digests when negotiated. Sends gather every PDU of a batch
//! into one vectored write; small data segments are copied next to their
//! header so a batch of 4 KiB reads is a handful of iovecs.

use std::io::IoSlice;

use bytes::{BufMut, Bytes, BytesMut};
use iscsi_proto::codec::PduDecoder;
use iscsi_proto::pdu::{Pdu, RawPdu};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::transport::{PduRx, PduTx, Transport, TransportError, TransportInfo};

/// Data segments up to this size are copied into the header buffer.
const INLINE_DATA_MAX: usize = 2048;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;

pub struct TcpTransport {
    stream: TcpStream,
}

impl TcpTransport {
    pub fn new(stream: TcpStream) -> std::io::Result<Self> {
        // Batching happens in user space; Nagle would only add delay.
        stream.set_nodelay(true)?;
        Ok(TcpTransport { stream })
    }
}

impl Transport for TcpTransport {
    type Rx = TcpRx;
    type Tx = TcpTx;

    fn info(&self) -> TransportInfo {
        TransportInfo {
            kind: "tcp",
            local_addr: self
                .stream
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            peer_addr: self
                .stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
        }
    }

    fn into_split(self) -> (TcpRx, TcpTx) {
        let (r, w) = self.stream.into_split();
        (
            TcpRx {
                sock: r,
                buf: BytesMut::with_capacity(READ_CHUNK),
                decoder: PduDecoder::default(),
            },
            TcpTx {
                sock: w,
                header_digest: false,
                data_digest: false,
                scratch: BytesMut::with_capacity(16 * 1024),
            },
        )
    }
}

pub struct TcpRx {
    sock: OwnedReadHalf,
    buf: BytesMut,
    decoder: PduDecoder,
}

impl PduRx for TcpRx {
    async fn recv(&mut self) -> Result<Option<RawPdu>, TransportError> {
        loop {
            if let Some(pdu) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(pdu));
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.sock.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(TransportError::TruncatedPdu)
                };
            }
        }
    }

    fn set_digests(&mut self, header: bool, data: bool) {
        self.decoder.header_digest = header;
        self.decoder.data_digest = data;
    }

    fn set_max_recv_data_segment_length(&mut self, len: u32) {
        self.decoder.max_data_segment_length = len;
    }
}

pub struct TcpTx {
    sock: OwnedWriteHalf,
    header_digest: bool,
    data_digest: bool,
    scratch: BytesMut,
}

enum Piece {
    Scratch(usize, usize),
    Data(Bytes),
}

impl PduTx for TcpTx {
    async fn send(&mut self, pdus: &[Pdu]) -> Result<(), TransportError> {
        self.scratch.clear();
        let mut pieces: Vec<Piece> = Vec::with_capacity(pdus.len() * 3);
        let mut start = 0;
        for pdu in pdus {
            pdu.encode_header(self.header_digest, &mut self.scratch);
            if pdu.data.is_empty() {
                continue;
            }
            if pdu.data.len() <= INLINE_DATA_MAX {
                self.scratch.put_slice(&pdu.data);
            } else {
                pieces.push(Piece::Scratch(start, self.scratch.len()));
                pieces.push(Piece::Data(pdu.data.clone()));
                start = self.scratch.len();
            }
            let (trailer, n) = pdu.encode_trailer(self.data_digest);
            self.scratch.put_slice(&trailer[..n]);
        }
        pieces.push(Piece::Scratch(start, self.scratch.len()));
        let scratch = &self.scratch;
        let mut slices: Vec<IoSlice<'_>> = pieces
            .iter()
            .filter_map(|p| {
                let s: &[u8] = match p {
                    Piece::Scratch(a, b) => scratch.get(*a..*b)?,
                    Piece::Data(d) => d,
                };
                (!s.is_empty()).then_some(IoSlice::new(s))
            })
            .collect();
        let mut bufs = &mut slices[..];
        while !bufs.is_empty() {
            let n = self.sock.write_vectored(bufs).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        Ok(())
    }

    fn set_digests(&mut self, header: bool, data: bool) {
        self.header_digest = header;
        self.data_digest = data;
    }

    async fn shutdown(&mut self) {
        let _ = self.sock.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iscsi_proto::pdu::{DataIn, Header, NopOut};

    #[tokio::test]
    async fn pdus_cross_a_socket_with_digests_and_large_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (server, _) = listener.accept().await.unwrap();
        let client = client.await.unwrap();
        let (_crx, mut ctx) = TcpTransport::new(client).unwrap().into_split();
        let (mut srx, _stx) = TcpTransport::new(server).unwrap().into_split();
        ctx.set_digests(true, true);
        srx.set_digests(true, true);
        srx.set_max_recv_data_segment_length(1 << 20);
        let big = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let pdus = vec![
            Pdu::new(
                Header::NopOut(NopOut {
                    itt: 1,
                    ..Default::default()
                }),
                Bytes::from_static(b"hello"),
            ),
            Pdu::new(
                Header::DataIn(DataIn {
                    itt: 2,
                    ..Default::default()
                }),
                big.clone(),
            ),
            Pdu::new(
                Header::NopOut(NopOut {
                    itt: 3,
                    ..Default::default()
                }),
                Bytes::new(),
            ),
        ];
        ctx.send(&pdus).await.unwrap();
        for want in &pdus {
            let got = srx.recv().await.unwrap().unwrap().parse().unwrap();
            assert_eq!(&got, want);
        }
        ctx.shutdown().await;
        drop(ctx);
        assert!(srx.recv().await.unwrap().is_none());
    }
}
