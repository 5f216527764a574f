//! The TCP transport: iSCSI PDUs framed on a byte stream (RFC 7143 §11),
//! with CRC32C digests when negotiated. Sends gather every PDU of a batch
//! into one vectored write; small data segments are copied next to their
//! header so a batch of 4 KiB reads is a handful of iovecs.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use iscsi_proto::codec::PduDecoder;
use iscsi_proto::digest;
use iscsi_proto::pdu::{self, Opcode, Pdu, RawPdu, BHS_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::transport::{
    DataOutSink, PduRx, PduTx, Received, Transport, TransportError, TransportInfo,
};

/// Data segments up to this size are copied into the header buffer.
const INLINE_DATA_MAX: usize = 2048;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// Data-Out data segments at least this long are received straight into
/// their write's buffer (below it, the copy costs less than the extra read).
const PLACE_MIN: usize = 4096;
/// The same for a SCSI Command's immediate data: only large ones, since
/// small writes come many to one read and placing one costs reads.
const PLACE_IMMEDIATE_MIN: usize = 64 * 1024;

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
                placing: None,
                header_first: false,
                low_water: 1,
            },
            TcpTx {
                sock: w,
                header_digest: false,
                data_digest: false,
                scratch: BytesMut::with_capacity(16 * 1024),
                unsent: VecDeque::new(),
                pieces: Vec::new(),
            },
        )
    }
}

pub struct TcpRx {
    sock: OwnedReadHalf,
    buf: BytesMut,
    decoder: PduDecoder,
    /// A Data-Out whose data is being received into its write's buffer.
    placing: Option<Placing>,
    /// The last PDU was a placed Data-Out: read the next header alone, so
    /// the data of a Data-Out behind it is not read ahead into `buf`.
    header_first: bool,
    /// The socket's SO_RCVLOWAT as we last set it (1, the default, between
    /// placed data segments).
    low_water: usize,
}

/// Largest SO_RCVLOWAT asked for: the kernel grows the receive buffer to
/// fit it, so it stays modest.
const LOW_WATER_MAX: usize = 256 * 1024;

/// Sets SO_RCVLOWAT: the socket reads as ready once `bytes` are queued (or
/// at its end).
fn set_receive_low_water(sock: &OwnedReadHalf, bytes: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the descriptor is the live socket `sock` borrows, and the
    // option value is a c_int of the length passed.
    let r = unsafe {
        libc::setsockopt(
            sock.as_ref().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

struct Placing {
    bhs: [u8; BHS_LEN],
    len: usize,
    done: usize,
    /// The sink gave no buffer for the rest: it is read and dropped.
    dropped: bool,
}

impl TcpRx {
    /// Reads more of the stream into `buf` (at most `max` bytes); false at EOF.
    async fn fill(&mut self, max: usize) -> Result<bool, TransportError> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(READ_CHUNK);
        }
        let n = self.sock.read_buf(&mut (&mut self.buf).limit(max)).await?;
        Ok(n > 0)
    }

    /// The BHS, header length and data length of a Data-Out (or a SCSI
    /// Command with immediate data) whose header (checked, as the decoder
    /// would) is at the front of `buf` and whose data is worth receiving
    /// straight into a buffer of its own.
    fn data_out_header(&self) -> Option<([u8; BHS_LEN], usize, usize)> {
        let head = self.buf.get(..BHS_LEN)?;
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(head);
        let min = match Opcode::from_u8(bhs[0]) {
            Some(Opcode::DataOut) => PLACE_MIN,
            Some(Opcode::ScsiCommand) => PLACE_IMMEDIATE_MIN,
            _ => return None,
        };
        if pdu::total_ahs_length(&bhs) != 0 {
            return None;
        }
        let len = pdu::data_segment_length(&bhs);
        if (len as usize) < min || len > self.decoder.max_data_segment_length {
            return None;
        }
        let mut header_len = BHS_LEN;
        if self.decoder.header_digest {
            let hd = self.buf.get(BHS_LEN..BHS_LEN + 4)?;
            if digest::from_wire([hd[0], hd[1], hd[2], hd[3]]) != digest::crc32c(&bhs) {
                // The decoder reports it.
                return None;
            }
            header_len += 4;
        }
        Some((bhs, header_len, len as usize))
    }

    /// Goes on with the Data-Out being placed: `Some` once all of it, its
    /// padding and digest are in.
    async fn place<S: DataOutSink>(
        &mut self,
        sink: &mut S,
    ) -> Result<Option<Received>, TransportError> {
        let Some(p) = self.placing.as_mut() else {
            return Ok(None);
        };
        let rest = p.len - p.done;
        if rest > 0 {
            let dst = if p.dropped {
                None
            } else {
                sink.sink_for(&p.bhs, p.len, p.done)
            };
            let Some(dst) = dst else {
                p.dropped = true;
                let have = rest.min(self.buf.len());
                p.done += have;
                self.buf.advance(have);
                // The rest is read and dropped piece by piece: a low-water
                // mark set for it earlier may be above what is still to come.
                if self.low_water != 1 {
                    set_receive_low_water(&self.sock, 1)?;
                    self.low_water = 1;
                }
                if have == 0 && !self.fill(rest).await? {
                    return Err(TransportError::TruncatedPdu);
                }
                return Ok(None);
            };
            // What was read ahead is copied; the rest comes straight from the socket.
            let have = rest.min(self.buf.len());
            if have > 0 {
                dst.extend_from_slice(self.buf.get(..have).unwrap_or(&[]));
                self.buf.advance(have);
                p.done += have;
                return Ok(None);
            }
            match self.sock.try_read_buf(&mut (&mut *dst).limit(rest)) {
                Ok(0) => return Err(TransportError::TruncatedPdu),
                Ok(n) => p.done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Wake once the rest is here rather than for every piece
                    // of it (each wake-up costs a sleep, a poll and a read).
                    // Never above what this PDU still needs: more might
                    // never come.
                    let want = rest.min(LOW_WATER_MAX);
                    if self.low_water != want {
                        set_receive_low_water(&self.sock, want)?;
                        self.low_water = want;
                    }
                    self.sock.readable().await?;
                }
                Err(e) => return Err(e.into()),
            }
            return Ok(None);
        }
        if self.low_water != 1 {
            set_receive_low_water(&self.sock, 1)?;
            self.low_water = 1;
        }
        let pad = digest::pad_len(p.len);
        let trailer = pad + if self.decoder.data_digest { 4 } else { 0 };
        if self.buf.len() < trailer {
            if !self.fill(READ_CHUNK).await? {
                return Err(TransportError::TruncatedPdu);
            }
            return Ok(None);
        }
        let (bhs, len, dropped) = (p.bhs, p.len, p.dropped);
        let digest_ok = !self.decoder.data_digest || dropped || {
            let got = self
                .buf
                .get(pad..pad + 4)
                .map(|d| digest::from_wire([d[0], d[1], d[2], d[3]]));
            let placed = sink
                .sink_for(&bhs, len, len)
                .and_then(|dst| dst.len().checked_sub(len).and_then(|at| dst.get(at..)));
            placed.is_some_and(|d| Some(digest::data_digest(d, pad)) == got)
        };
        self.buf.advance(trailer);
        self.placing = None;
        self.header_first = true;
        if !digest_ok {
            return Err(iscsi_proto::codec::DecodeError::DataDigest { bhs: Box::new(bhs) }.into());
        }
        Ok(Some(Received::Placed { bhs, len, dropped }))
    }
}

impl PduRx for TcpRx {
    async fn recv(&mut self) -> Result<Option<RawPdu>, TransportError> {
        loop {
            if let Some(pdu) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(pdu));
            }
            if !self.fill(usize::MAX).await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(TransportError::TruncatedPdu)
                };
            }
        }
    }

    async fn recv_into<S: DataOutSink>(
        &mut self,
        mut sink: S,
    ) -> Result<Option<Received>, TransportError> {
        loop {
            if self.placing.is_some() {
                if let Some(r) = self.place(&mut sink).await? {
                    return Ok(Some(r));
                }
                continue;
            }
            if let Some((bhs, header_len, len)) = self.data_out_header() {
                let whole = header_len + len + digest::pad_len(len);
                if self.buf.len() < whole && sink.sink_for(&bhs, len, 0).is_some() {
                    self.buf.advance(header_len);
                    self.placing = Some(Placing {
                        bhs,
                        len,
                        done: 0,
                        dropped: false,
                    });
                    continue;
                }
            }
            if let Some(pdu) = self.decoder.decode(&mut self.buf)? {
                self.header_first = false;
                return Ok(Some(Received::Pdu(pdu)));
            }
            let max = if self.header_first && self.buf.is_empty() {
                BHS_LEN
            } else {
                usize::MAX
            };
            self.header_first = false;
            if !self.fill(max).await? {
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
    /// [`TcpTx::encode`]'s list of pieces, kept for its allocation.
    pieces: Vec<Piece>,
}

enum Piece {
    Scratch(usize, usize),
    Data(Bytes),
}

impl TcpTx {
    /// Encodes `pdus` and appends the wire image to `out`: headers, small
    /// data and trailers are packed into one scratch buffer (frozen, so the
    /// pieces are views of it), large data segments are referenced as they are.
    fn encode(&mut self, pdus: &[Pdu], out: &mut VecDeque<Bytes>) {
        self.scratch.clear();
        let mut pieces = std::mem::take(&mut self.pieces);
        pieces.clear();
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
        for p in pieces.drain(..) {
            let b = match p {
                Piece::Scratch(a, b) if a < b && b <= head.len() => head.slice(a..b),
                Piece::Scratch(..) => continue,
                Piece::Data(d) => d,
            };
            if !b.is_empty() {
                out.push_back(b);
            }
        }
        self.pieces = pieces;
    }
}

/// Buffers per `writev` gathered on the stack (a batch of responses rarely has more).
const STACK_IOVECS: usize = 64;
/// The same for a long queue (8 KiB of stack, below Linux's IOV_MAX of 1024): a
/// 512 KiB read cut into 8 KiB Data-Ins is about 130 buffers. A longer queue
/// goes out in more calls.
const LONG_STACK_IOVECS: usize = 512;

/// Calls `f` with the next `writev`'s buffers (the front of `q`), without
/// allocating.
fn with_iovecs<R>(q: &VecDeque<Bytes>, f: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
    if q.len() > STACK_IOVECS {
        return with_iovecs_in::<LONG_STACK_IOVECS, R>(q, f);
    }
    with_iovecs_in::<STACK_IOVECS, R>(q, f)
}

fn with_iovecs_in<const N: usize, R>(
    q: &VecDeque<Bytes>,
    f: impl FnOnce(&[IoSlice<'_>]) -> R,
) -> R {
    let mut slices = [IoSlice::new(&[]); N];
    for (s, b) in slices.iter_mut().zip(q) {
        *s = IoSlice::new(b);
    }
    f(slices.get(..q.len().min(N)).unwrap_or(&[]))
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
            // The buffers are gathered on the stack for each try, never held
            // across the wait (they would grow the future by kilobytes).
            let n = match with_iovecs(&q, |slices| self.sock.try_write_vectored(slices)) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.sock.writable().await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
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
            let r = with_iovecs(&q, |slices| self.sock.try_write_vectored(slices));
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

    /// Takes Data-Out data into `buf`, for at most `give_up_to` bytes of it.
    struct Sink {
        buf: BytesMut,
        give_up_to: usize,
    }

    impl DataOutSink for &mut Sink {
        fn sink_for(
            &mut self,
            _bhs: &[u8; BHS_LEN],
            _len: usize,
            done: usize,
        ) -> Option<&mut BytesMut> {
            (done < self.give_up_to).then_some(&mut self.buf)
        }
    }

    async fn pair() -> (TcpRx, TcpTx) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (server, _) = listener.accept().await.unwrap();
        let client = client.await.unwrap();
        let (_crx, ctx) = TcpTransport::new(client).unwrap().into_split();
        let (srx, _stx) = TcpTransport::new(server).unwrap().into_split();
        (srx, ctx)
    }

    /// Writes the PDUs' wire image in small pieces, pausing between them.
    async fn trickle(mut ctx: TcpTx, pdus: Vec<Pdu>, digests: bool) {
        let mut wire = BytesMut::new();
        for p in &pdus {
            p.encode(digests, digests, &mut wire);
        }
        for piece in wire.chunks(3000) {
            ctx.sock.write_all(piece).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
        ctx.shutdown().await;
    }

    fn data_out(itt: u32, data: Bytes) -> Pdu {
        Pdu::new(
            Header::DataOut(iscsi_proto::pdu::DataOut {
                itt,
                ttt: 5,
                final_: true,
                ..Default::default()
            }),
            data,
        )
    }

    #[tokio::test]
    async fn data_out_data_goes_straight_into_the_sink_buffer_across_cancelled_receives() {
        for digests in [false, true] {
            let (mut srx, ctx) = pair().await;
            srx.set_digests(digests, digests);
            srx.set_max_recv_data_segment_length(1 << 20);
            let data = Bytes::from((0..65_537u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
            let nop = |itt| {
                Pdu::new(
                    Header::NopOut(NopOut {
                        itt,
                        ..Default::default()
                    }),
                    Bytes::new(),
                )
            };
            let writer = tokio::spawn(trickle(
                ctx,
                vec![nop(1), data_out(2, data.clone()), nop(3)],
                digests,
            ));
            let mut sink = Sink {
                buf: BytesMut::new(),
                give_up_to: usize::MAX,
            };
            let mut got = Vec::new();
            loop {
                // Short timeouts drop the receive mid-PDU: nothing may be lost.
                match tokio::time::timeout(
                    std::time::Duration::from_micros(300),
                    srx.recv_into(&mut sink),
                )
                .await
                {
                    Err(_) => continue,
                    Ok(r) => match r.unwrap() {
                        None => break,
                        Some(Received::Pdu(raw)) => got.push(raw.parse().unwrap().header.itt()),
                        Some(Received::Placed { bhs, len, dropped }) => {
                            assert_eq!((len, dropped), (data.len(), false));
                            got.push(Header::parse(&bhs, &[]).unwrap().itt());
                        }
                    },
                }
            }
            writer.await.unwrap();
            assert_eq!(got, vec![Some(1), Some(2), Some(3)], "digests {digests}");
            assert_eq!(sink.buf.freeze(), data, "digests {digests}");
        }
    }

    #[tokio::test]
    async fn a_sink_that_lets_go_midway_gets_a_dropped_placement_and_the_stream_stays_in_step() {
        let (mut srx, ctx) = pair().await;
        srx.set_max_recv_data_segment_length(1 << 20);
        let data = Bytes::from(vec![7u8; 100_000]);
        let nop = Pdu::new(
            Header::NopOut(NopOut {
                itt: 9,
                ..Default::default()
            }),
            Bytes::from_static(b"ok"),
        );
        let writer = tokio::spawn(trickle(ctx, vec![data_out(2, data), nop.clone()], false));
        let mut sink = Sink {
            buf: BytesMut::new(),
            give_up_to: 10_000,
        };
        match srx.recv_into(&mut sink).await.unwrap().unwrap() {
            Received::Placed { len, dropped, .. } => assert_eq!((len, dropped), (100_000, true)),
            Received::Pdu(_) => panic!("placed expected"),
        }
        assert!(sink.buf.len() < 100_000);
        match srx.recv_into(&mut sink).await.unwrap().unwrap() {
            Received::Pdu(raw) => assert_eq!(raw.parse().unwrap(), nop),
            Received::Placed { .. } => panic!("the NOP-Out expected"),
        }
        writer.await.unwrap();
    }
}
