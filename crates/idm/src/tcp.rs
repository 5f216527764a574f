//! The TCP transport: iSCSI PDUs framed on a byte stream (RFC 7143 §11),
//! with CRC32C digests when negotiated. Sends gather every PDU of a batch
//! into one vectored write; small data segments are copied next to their
//! header so a batch of 4 KiB reads is a handful of iovecs.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};
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
                unsent: VecDeque::new(),
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
    /// What a [`PduTx::try_send`] could not write at once, in order: views of
    /// the encoded headers and of the PDUs' own data (no copy). It goes out
    /// first on the next send.
    unsent: VecDeque<Bytes>,
}

enum Piece {
    Scratch(usize, usize),
    Data(Bytes),
}

/// At most this many buffers per `writev` (Linux's IOV_MAX is 1024).
const MAX_IOVECS: usize = 1024;

impl TcpTx {
    /// Encodes `pdus` and appends the wire image to `out`: headers, small
    /// data and trailers are packed into one scratch buffer (frozen, so the
    /// pieces are views of it), large data segments are referenced as they are.
    fn encode(&mut self, pdus: &[Pdu], out: &mut VecDeque<Bytes>) {
        self.scratch.clear();
        let mut pieces: Vec<Piece> = Vec::with_capacity(pdus.len() * 2 + 1);
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
            self.scratch.put_slice(trailer.get(..n).unwrap_or(&[]));
        }
        pieces.push(Piece::Scratch(start, self.scratch.len()));
        // Once every view is dropped, the next `clear`/`reserve` reuses the allocation.
        let head = self.scratch.split().freeze();
        for p in pieces {
            let b = match p {
                Piece::Scratch(a, b) if a < b && b <= head.len() => head.slice(a..b),
                Piece::Scratch(..) => continue,
                Piece::Data(d) => d,
            };
            if !b.is_empty() {
                out.push_back(b);
            }
        }
    }
}

/// The next `writev`'s buffers: the front of `q`.
fn iovecs(q: &VecDeque<Bytes>) -> Vec<IoSlice<'_>> {
    q.iter().take(MAX_IOVECS).map(|b| IoSlice::new(b)).collect()
}

/// Drops the first `n` bytes of `q` (they were written).
fn consume(q: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = q.front_mut() else {
            return;
        };
        if front.len() <= n {
            n -= front.len();
            q.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
}

impl PduTx for TcpTx {
    async fn send(&mut self, pdus: &[Pdu]) -> Result<(), TransportError> {
        let mut q = std::mem::take(&mut self.unsent);
        self.encode(pdus, &mut q);
        while !q.is_empty() {
            let n = {
                let slices = iovecs(&q);
                self.sock.write_vectored(&slices).await?
            };
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            consume(&mut q, n);
        }
        // Keep the deque's allocation for the next partial write.
        self.unsent = q;
        Ok(())
    }

    /// Writes what the socket takes now and keeps the rest (as views, no
    /// copy) for the next [`send`](PduTx::send): always takes the PDUs.
    fn try_send(&mut self, pdus: &[Pdu]) -> Result<bool, TransportError> {
        let mut q = std::mem::take(&mut self.unsent);
        self.encode(pdus, &mut q);
        let result = loop {
            if q.is_empty() {
                break Ok(true);
            }
            let r = {
                let slices = iovecs(&q);
                self.sock.try_write_vectored(&slices)
            };
            match r {
                Ok(0) => {
                    break Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
                }
                Ok(n) => consume(&mut q, n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.into()),
            }
        };
        self.unsent = q;
        result
    }

    fn has_unsent(&self) -> bool {
        !self.unsent.is_empty()
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

    #[tokio::test]
    async fn try_send_keeps_what_a_full_socket_refuses_and_send_writes_it_first() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (server, _) = listener.accept().await.unwrap();
        let client = client.await.unwrap();
        let (_crx, mut ctx) = TcpTransport::new(client).unwrap().into_split();
        let (mut srx, _stx) = TcpTransport::new(server).unwrap().into_split();
        srx.set_max_recv_data_segment_length(1 << 24);
        let pdu = |itt: u32, len: usize| {
            Pdu::new(
                Header::DataIn(DataIn {
                    itt,
                    ..Default::default()
                }),
                Bytes::from(vec![itt as u8; len]),
            )
        };
        // Far more than the socket buffers hold while nobody reads.
        let first: Vec<Pdu> = (1..=4).map(|i| pdu(i, 8 << 20)).collect();
        assert!(ctx.try_send(&first).unwrap());
        assert!(ctx.has_unsent());
        let last = vec![pdu(5, 100)];
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..5 {
                got.push(srx.recv().await.unwrap().unwrap().parse().unwrap());
            }
            got
        });
        ctx.send(&last).await.unwrap();
        assert!(!ctx.has_unsent());
        let got = reader.await.unwrap();
        let want: Vec<Pdu> = first.into_iter().chain(last).collect();
        assert_eq!(got, want);
    }
}
