//! An NBD server in front of one [`Lun`]: qemu, `nbd-client` and other NBD
//! clients can use an iSCSI LUN without a kernel initiator.
//!
//! The fixed newstyle handshake (NBD protocol document, "Newstyle
//! negotiation") with `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`/`NBD_OPT_INFO`
//! (export size, flags, block sizes), `NBD_OPT_LIST` and `NBD_OPT_ABORT`;
//! other options are answered `NBD_REP_ERR_UNSUP`, so clients fall back to
//! simple replies. Transmission serves READ, WRITE (with FUA), FLUSH, TRIM
//! (acknowledged, nothing done) and DISC; requests run concurrently and
//! replies go out as they complete, each matched by its cookie. Requests
//! that are not block-aligned are widened (reads) or read-modify-written
//! (writes). Every length from the client is checked before use.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Mutex, Semaphore};

use crate::error::Error;
use crate::session::Lun;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_FLAG_FUA: u16 = 1;

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Largest option payload we read during the handshake.
const MAX_OPTION: u32 = 64 << 10;
/// Largest READ/WRITE we serve (the NBD maximum payload is 32 MiB).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Requests of one client executing at once.
const DEPTH: usize = 32;

/// What a client connection ended with.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD client I/O: {0}")]
    Io(#[from] io::Error),
    #[error("NBD protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Iscsi(#[from] Error),
}

/// The export: a LUN, its geometry and a name clients may ask for.
#[derive(Clone, Debug)]
pub struct Export {
    pub lun: Lun,
    pub name: String,
    pub block_size: u32,
    pub size: u64,
}

impl Export {
    /// Reads the LUN's capacity.
    pub async fn new(lun: Lun, name: impl Into<String>) -> Result<Export, Error> {
        let cap = lun.read_capacity().await?;
        Ok(Export {
            lun,
            name: name.into(),
            block_size: cap.block_size,
            size: cap.bytes(),
        })
    }
}

async fn opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await
}

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM
}

/// Runs the handshake; `Ok(true)` when transmission should start.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &Export,
) -> Result<bool, NbdError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    let client_flags = s.read_u32().await?;
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("option magic {magic:#x}")));
        }
        let opt = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION {
            return Err(NbdError::Protocol(format!("option of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size.to_be_bytes());
                b.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b).await?;
                return Ok(true);
            }
            OPT_ABORT => {
                opt_reply(s, opt, REP_ACK, &[]).await?;
                return Ok(false);
            }
            OPT_LIST => {
                let mut d = Vec::new();
                d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                d.extend_from_slice(export.name.as_bytes());
                opt_reply(s, opt, REP_SERVER, &d).await?;
                opt_reply(s, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                // u32 name length, name, u16 count, u16 requests: we
                // answer every info we have, whatever was asked.
                let name_len = data
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
                let well_formed = name_len
                    .and_then(|n| n.checked_add(6))
                    .is_some_and(|n| n <= data.len());
                if !well_formed {
                    opt_reply(s, opt, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                let mut info = Vec::new();
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size.to_be_bytes());
                info.extend_from_slice(&transmission_flags().to_be_bytes());
                opt_reply(s, opt, REP_INFO, &info).await?;
                let mut bs = Vec::new();
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&export.block_size.to_be_bytes());
                bs.extend_from_slice(&export.block_size.max(4096).to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                opt_reply(s, opt, REP_INFO, &bs).await?;
                opt_reply(s, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(true);
                }
            }
            _ => opt_reply(s, opt, REP_ERR_UNSUP, &[]).await?,
        }
    }
}

/// Serves one client connection until it disconnects.
pub async fn serve<S>(stream: S, export: Arc<Export>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut stream = stream;
    if !handshake(&mut stream, &export).await? {
        return Ok(());
    }
    let (mut r, w) = tokio::io::split(stream);
    let (tx, mut replies) = mpsc::channel::<Vec<u8>>(DEPTH * 2);
    let writer = tokio::spawn(async move {
        let mut w = w;
        while let Some(b) = replies.recv().await {
            w.write_all(&b).await?;
        }
        w.flush().await?;
        Ok::<(), io::Error>(())
    });
    let slots = Arc::new(Semaphore::new(DEPTH));
    // Read-modify-writes of partial blocks must not interleave.
    let rmw = Arc::new(Mutex::new(()));
    let result = loop {
        let mut head = [0u8; 28];
        match r.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(NbdError::Io(e)),
        }
        let (magic, flags, kind, cookie, offset, len) = parse_request(&head);
        if magic != REQUEST_MAGIC {
            break Err(NbdError::Protocol(format!("request magic {magic:#x}")));
        }
        if kind == CMD_DISC {
            break Ok(());
        }
        let mut payload = Bytes::new();
        if kind == CMD_WRITE {
            if len > MAX_REQUEST {
                break Err(NbdError::Protocol(format!("WRITE of {len} bytes")));
            }
            let mut b = BytesMut::zeroed(len as usize);
            if let Err(e) = r.read_exact(&mut b).await {
                break Err(NbdError::Io(e));
            }
            payload = b.freeze();
        }
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            break Ok(());
        };
        let (export, tx, rmw) = (Arc::clone(&export), tx.clone(), Arc::clone(&rmw));
        tokio::spawn(async move {
            let outcome = execute(&export, &rmw, kind, flags, offset, len, payload).await;
            let mut b = Vec::with_capacity(16);
            b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            match outcome {
                Ok(data) => {
                    b.extend_from_slice(&0u32.to_be_bytes());
                    b.extend_from_slice(&cookie.to_be_bytes());
                    b.extend_from_slice(&data);
                }
                Err(errno) => {
                    b.extend_from_slice(&errno.to_be_bytes());
                    b.extend_from_slice(&cookie.to_be_bytes());
                }
            }
            let _ = tx.send(b).await;
            drop(permit);
        });
    };
    // Let every running request answer before closing.
    let _ = slots.acquire_many(DEPTH as u32).await;
    drop(tx);
    let _ = writer.await;
    result
}

fn parse_request(h: &[u8; 28]) -> (u32, u16, u16, u64, u64, u32) {
    let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let u16_at = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    (
        u32_at(0),
        u16_at(4),
        u16_at(6),
        u64_at(8),
        u64_at(16),
        u32_at(24),
    )
}

/// One request against the LUN; `Err` is the errno for the reply.
async fn execute(
    export: &Export,
    rmw: &Mutex<()>,
    kind: u16,
    flags: u16,
    offset: u64,
    len: u32,
    payload: Bytes,
) -> Result<Vec<u8>, u32> {
    let bs = u64::from(export.block_size.max(1));
    let end = offset.checked_add(u64::from(len)).ok_or(EINVAL)?;
    let in_range = end <= export.size;
    let log = |e: &Error| tracing::warn!(error = %e, offset, len, "NBD request failed");
    match kind {
        CMD_READ => {
            if !in_range {
                return Err(EINVAL);
            }
            if len > MAX_REQUEST {
                return Err(EINVAL);
            }
            if len == 0 {
                return Ok(Vec::new());
            }
            let first = offset / bs;
            let last = end.div_ceil(bs);
            let blocks = u32::try_from(last - first).map_err(|_| EINVAL)?;
            let data = export.lun.read(first, blocks).await.map_err(|e| {
                log(&e);
                EIO
            })?;
            let skip = (offset - first * bs) as usize;
            data.get(skip..skip + len as usize)
                .map(<[u8]>::to_vec)
                .ok_or(EIO)
        }
        CMD_WRITE => {
            if !in_range {
                return Err(ENOSPC);
            }
            if len == 0 {
                return Ok(Vec::new());
            }
            let aligned = offset % bs == 0 && end % bs == 0;
            if aligned {
                export.lun.write(offset / bs, payload).await.map_err(|e| {
                    log(&e);
                    EIO
                })?;
            } else {
                let _one = rmw.lock().await;
                let first = offset / bs;
                let last = end.div_ceil(bs);
                let blocks = u32::try_from(last - first).map_err(|_| EINVAL)?;
                let old = export.lun.read(first, blocks).await.map_err(|e| {
                    log(&e);
                    EIO
                })?;
                let mut buf = BytesMut::from(&old[..]);
                let skip = (offset - first * bs) as usize;
                buf.get_mut(skip..skip + payload.len())
                    .ok_or(EIO)?
                    .copy_from_slice(&payload);
                export.lun.write(first, buf.freeze()).await.map_err(|e| {
                    log(&e);
                    EIO
                })?;
            }
            if flags & CMD_FLAG_FUA != 0 {
                export.lun.synchronize_cache().await.map_err(|e| {
                    log(&e);
                    EIO
                })?;
            }
            Ok(Vec::new())
        }
        CMD_FLUSH => {
            export.lun.synchronize_cache().await.map_err(|e| {
                log(&e);
                EIO
            })?;
            Ok(Vec::new())
        }
        // Trimming is advisory; the data may stay.
        CMD_TRIM => Ok(Vec::new()),
        _ => Err(EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_fields_are_read_big_endian() {
        let mut h = [0u8; 28];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&1u16.to_be_bytes());
        h[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        h[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        h[16..24].copy_from_slice(&4096u64.to_be_bytes());
        h[24..28].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            parse_request(&h),
            (
                REQUEST_MAGIC,
                1,
                CMD_WRITE,
                0x1122_3344_5566_7788,
                4096,
                512
            )
        );
    }
}
