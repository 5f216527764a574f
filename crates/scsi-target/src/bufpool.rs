//! Recycled data buffers. A READ fills a buffer that travels to the port as
//! `Bytes` and is dropped after the socket took it; allocating a fresh one
//! each time costs page faults and zeroing on every large read (seen as the
//! top item of a 128 KiB read profile). Dropped buffers come back here.
//!
//! The port receives write data into buffers from here too
//! ([`take_write_buffer`]): a memory LU keeps a whole-page one as the page
//! and gives the page it replaces back ([`recycle`]), so large writes cycle
//! through the same memory without a copy or an allocation.
//!
//! Buffers are kept per power-of-two size class, a few per class, so the
//! pool stays small (at most [`MAX_PER_CLASS`] × class size per class).
//!
//! O_DIRECT needs memory aligned to the device's sector (4096 covers every
//! sector size): [`PooledBuf::take_aligned`] hands out a window of a
//! slightly larger pooled buffer that starts on such a boundary, so the
//! alignment costs no `unsafe` allocator call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

/// Smallest class: 4 KiB.
const MIN_SHIFT: u32 = 12;
/// Largest pooled class: 32 MiB; larger reads are not pooled.
const MAX_SHIFT: u32 = 25;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;
/// Buffers kept per class.
const MAX_PER_CLASS: usize = 64;

static POOL: [Mutex<Vec<Vec<u8>>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];

fn class_of(len: usize) -> Option<usize> {
    let shift = len
        .max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_SHIFT);
    (shift <= MAX_SHIFT).then(|| (shift - MIN_SHIFT) as usize)
}

/// A buffer of exactly `len` bytes (contents unspecified: the caller
/// overwrites all of it) that returns to the pool when dropped.
pub(crate) struct PooledBuf {
    buf: Vec<u8>,
    /// The caller's bytes are `buf[start..start + len]`.
    start: usize,
    len: usize,
    class: Option<usize>,
}

/// Alignment of [`PooledBuf::take_aligned`]: the largest logical sector.
pub(crate) const DIRECT_ALIGN: usize = 4096;

impl PooledBuf {
    pub(crate) fn take(len: usize) -> PooledBuf {
        Self::take_with_slack(len, 0)
    }

    /// Like [`take`](Self::take), starting at a [`DIRECT_ALIGN`] boundary.
    pub(crate) fn take_aligned(len: usize) -> PooledBuf {
        let mut b = Self::take_with_slack(len, DIRECT_ALIGN);
        // The vector is never grown again, so its address, and the
        // window's alignment, stay as computed here.
        let pad = b.buf.as_ptr().align_offset(DIRECT_ALIGN);
        b.start = if pad <= DIRECT_ALIGN { pad } else { 0 };
        b
    }

    fn take_with_slack(len: usize, slack: usize) -> PooledBuf {
        let total = len.saturating_add(slack);
        let class = class_of(total);
        let recycled = class
            .and_then(|c| POOL.get(c))
            .and_then(|slot| slot.lock().ok().and_then(|mut v| v.pop()));
        let mut buf = recycled.unwrap_or_else(|| {
            let cap = class.map_or(total, |c| 1usize << (c as u32 + MIN_SHIFT));
            Vec::with_capacity(cap)
        });
        // Stale bytes from a previous read are overwritten by the caller; a
        // new buffer is zeroed once here, never again.
        buf.resize(total, 0);
        buf.truncate(total);
        PooledBuf {
            buf,
            start: 0,
            len,
            class,
        }
    }

    pub(crate) fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

/// Write buffers, per class as [`POOL`]; kept apart from the read buffers,
/// which are handed out full length (an empty write buffer would cost them
/// a zeroing).
static WRITE_POOL: [Mutex<Vec<BytesMut>>; CLASSES] = [const { Mutex::new(Vec::new()) }; CLASSES];
/// Bytes held by [`WRITE_POOL`], all classes together.
static WRITE_POOL_BYTES: AtomicUsize = AtomicUsize::new(0);
/// At most this much memory waits in the write pool.
const WRITE_POOL_MAX_BYTES: usize = 32 << 20;

/// An empty buffer with room for `len` bytes, from the pool when one is
/// there: its capacity is `len` rounded up to a power of two (at least
/// 4 KiB), or exactly `len` beyond the largest class.
pub fn take_write_buffer(len: usize) -> BytesMut {
    let class = class_of(len);
    let recycled = class
        .and_then(|c| WRITE_POOL.get(c))
        .and_then(|slot| slot.lock().ok().and_then(|mut v| v.pop()));
    match recycled {
        Some(b) => {
            WRITE_POOL_BYTES.fetch_sub(b.capacity(), Ordering::Relaxed);
            b
        }
        None => BytesMut::with_capacity(class.map_or(len, |c| 1usize << (c as u32 + MIN_SHIFT))),
    }
}

/// Gives a buffer back to the write pool when its capacity is one of the
/// pool's classes (else it is just freed). Pass only a buffer that nothing
/// else shares (`Bytes::try_into_mut` gives such).
pub fn recycle(mut buf: BytesMut) {
    let cap = buf.capacity();
    let Some(slot) = class_of(cap)
        .filter(|c| 1usize << (*c as u32 + MIN_SHIFT) == cap)
        .and_then(|c| WRITE_POOL.get(c))
    else {
        return;
    };
    buf.clear();
    if let Ok(mut v) = slot.lock() {
        if v.len() < MAX_PER_CLASS
            && WRITE_POOL_BYTES.load(Ordering::Relaxed) + cap <= WRITE_POOL_MAX_BYTES
        {
            WRITE_POOL_BYTES.fetch_add(cap, Ordering::Relaxed);
            v.push(buf);
        }
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf
            .get(self.start..self.start + self.len)
            .unwrap_or(&[])
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let end = self.start + self.len;
        self.buf.get_mut(self.start..end).unwrap_or(&mut [])
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let Some(slot) = self.class.and_then(|c| POOL.get(c)) else {
            return;
        };
        if let Ok(mut v) = slot.lock() {
            if v.len() < MAX_PER_CLASS {
                v.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_have_the_asked_length_and_come_back() {
        let mut b = PooledBuf::take(100_000);
        assert_eq!(b.len(), 100_000);
        b.fill(7);
        let bytes = b.into_bytes();
        assert_eq!(bytes.len(), 100_000);
        assert!(bytes.iter().all(|&x| x == 7));
        let ptr = bytes.as_ptr();
        drop(bytes);
        // The same class hands the buffer out again (single-threaded test:
        // nobody else takes it in between, unless tests run concurrently,
        // so only the length is asserted strictly).
        let again = PooledBuf::take(70_000);
        assert_eq!(again.len(), 70_000);
        let _ = ptr;
    }

    #[test]
    fn aligned_buffers_start_on_a_sector_boundary() {
        for len in [512, 4096, 100_000, 1 << 20] {
            let mut b = PooledBuf::take_aligned(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
            b.fill(3);
            let bytes = b.into_bytes();
            assert_eq!(bytes.len(), len);
            assert_eq!(bytes.as_ptr() as usize % DIRECT_ALIGN, 0);
        }
    }

    #[test]
    fn huge_reads_are_not_pooled() {
        let b = PooledBuf::take(64 << 20);
        assert!(b.class.is_none());
        assert_eq!(b.len(), 64 << 20);
    }
}
