//! LU backends: where a logical unit's blocks live (sbd's backing store).
//!
//! The SCSI core talks to a backend in bytes, never in blocks, and never
//! asks it for more than `size_bytes()`; the core checks ranges first, and the
//! backends check them again so a bug above cannot reach past the end.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use bytes::{Bytes, BytesMut};

use crate::bufpool::{self, PooledBuf};
use crate::MoreData;

/// What a backend can do, as the SCSI core needs to know it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCaps {
    /// Unmap really releases space (the LU may then report thin provisioning).
    pub thin_provisioning: bool,
    /// I/O may sleep (file, block device): the port must call us on a blocking thread.
    pub may_block: bool,
    /// Writes need `flush` to be durable.
    pub volatile_cache: bool,
}

/// The store behind one logical unit.
pub trait Backend: Send + Sync {
    fn size_bytes(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// The `len` bytes at `offset` as `Bytes` for the Data-In path. Stores
    /// that keep their data in memory return a view of it (no copy); the
    /// default reads into a pooled buffer.
    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let mut buf = PooledBuf::take(len);
        self.read_at(offset, &mut buf)?;
        Ok(buf.into_bytes())
    }
    /// [`read_bytes`](Self::read_bytes) in pieces to be sent one after
    /// another: the first is returned, the others are pushed to `rest`. A
    /// store that keeps its data in pages hands out each page's own slice,
    /// so a read across pages is not gathered into a copy either. The
    /// default is one piece. On an error nothing is left pushed.
    fn read_pieces(&self, offset: u64, len: usize, rest: &mut MoreData) -> io::Result<Bytes> {
        let _ = rest;
        self.read_bytes(offset, len)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// [`write_at`](Self::write_at) of the whole of `data`, a buffer of its
    /// own: a store that keeps its data in memory may keep the buffer
    /// instead of copying it. The default copies.
    fn write_buffer(&self, offset: u64, data: &Bytes) -> io::Result<()> {
        self.write_at(offset, data)
    }
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Afterwards the range reads as zeros.
    fn unmap(&self, offset: u64, len: u64) -> io::Result<()>;
    fn caps(&self) -> BackendCaps;
    /// The unit the store really writes in: a power of two. The default,
    /// 4096, is the host page that RAM and the page cache are kept in, so
    /// smaller writes cost a read-modify-write of a page.
    fn physical_block_size(&self) -> u32 {
        4096
    }
    /// Change the capacity (grow with zeros, or shrink). Backends whose size is
    /// set from outside (a block device) re-read it when `new_size` is `None`.
    fn set_size(&self, new_size: Option<u64>) -> io::Result<u64> {
        let _ = new_size;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Whether the bytes at `offset` are mapped (true) or deallocated (false),
    /// and for how many bytes from there (at most `max_len`) that holds.
    /// `None` when the backend cannot tell.
    fn map_status(&self, offset: u64, max_len: u64) -> Option<(bool, u64)> {
        let _ = (offset, max_len);
        None
    }
    /// Writes the one-block `pattern` over `[offset, offset+len)` in the
    /// store itself (`len` a multiple of the pattern). `Unsupported` makes
    /// the core write the pattern out with `write_at`.
    fn write_same(&self, offset: u64, len: u64, pattern: &[u8]) -> io::Result<()> {
        let _ = (offset, len, pattern);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Compares `compare` with the bytes at `offset` and writes `write`
    /// there only if they are equal, atomically for every user of the store
    /// (other gateways included). `Unsupported` makes the core do it under
    /// its own lock, which is atomic only within this process.
    fn compare_and_write(
        &self,
        offset: u64,
        compare: &[u8],
        write: &[u8],
    ) -> io::Result<CompareAndWrite> {
        let _ = (offset, compare, write);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// How many I/Os of this store may run at once: the width of the LU's
    /// I/O threads ([`crate::LogicalUnit::spawn_io`]) when `caps().may_block`.
    fn io_threads(&self) -> usize {
        DEFAULT_IO_THREADS
    }
    /// The LU state every gateway must see alike (persistent reservations,
    /// resets, mode parameters) when the store is shared by several
    /// gateways (`None`: in this process only).
    fn shared_state(&self) -> Option<&dyn SharedState> {
        None
    }
}

/// I/O threads of a blocking store that does not say (an RBD image, whose
/// requests wait on the network rather than on a local queue).
pub const DEFAULT_IO_THREADS: usize = 64;

/// Logical unit state kept beside a shared store, so that every gateway
/// serving the LU enforces the same registrations and reservation, hears of
/// each other's resets and applies the same mode parameters, and all of it
/// survives a gateway's restart.
pub trait SharedState: Send + Sync {
    /// The stored state (an opaque encoding of the core's).
    fn load(&self) -> io::Result<Vec<u8>>;
    /// Replaces the state if it still is `expected`; `Ok(false)` when
    /// someone else changed it first. Other gateways learn of the change
    /// before this returns.
    fn replace(&self, expected: &[u8], new: &[u8]) -> io::Result<bool>;
    /// True (once) when the state may have changed since the last call;
    /// called on every command, so it must be cheap.
    fn take_changed(&self) -> bool;
    /// Tells the other gateways that this LU was reset, so their nexuses
    /// get the unit attention too (SAM: a LUN reset reaches every I_T nexus).
    fn announce_reset(&self) {}
    /// Whether another gateway reset the LU since the last call (cheap).
    fn take_reset(&self) -> bool {
        false
    }
    /// A mode parameter (by the core's name for it) as last stored by any
    /// gateway; `None` when none has stored it.
    fn load_mode_param(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let _ = name;
        Ok(None)
    }
    /// Stores these mode parameters in one step; the other gateways learn
    /// of it before this returns.
    fn store_mode_params(&self, params: &[(&str, &[u8])]) -> io::Result<()> {
        let _ = params;
        Ok(())
    }
    /// True (once) when another gateway may have changed mode parameters
    /// since the last call; called on every command, so it must be cheap.
    fn take_mode_changed(&self) -> bool {
        false
    }
}

/// How an atomic compare-and-write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareAndWrite {
    Written,
    /// Nothing was written: the first differing byte is this many bytes
    /// past the start of the range.
    Miscompare(u64),
}

/// Whether every byte is zero. OR-folding a block at a time vectorizes (an
/// early-exit `all` per byte does not) and still stops at the first non-zero block.
fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "access beyond the end of the backend",
        )),
    }
}

/// Reads zeros and discards writes: for benchmarks of everything above the store.
#[derive(Debug)]
pub struct NullBackend {
    size: AtomicU64,
}

impl NullBackend {
    pub fn new(size_bytes: u64) -> Self {
        NullBackend {
            size: AtomicU64::new(size_bytes),
        }
    }
}

impl Backend for NullBackend {
    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.size_bytes())?;
        buf.fill(0);
        Ok(())
    }
    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        check_range(offset, len as u64, self.size_bytes())?;
        match ZEROS.get(..len) {
            Some(z) => Ok(Bytes::from_static(z)),
            None => Ok(Bytes::from(vec![0u8; len])),
        }
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        check_range(offset, data.len() as u64, self.size_bytes())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.size_bytes())
    }
    fn caps(&self) -> BackendCaps {
        BackendCaps {
            thin_provisioning: true,
            may_block: false,
            volatile_cache: false,
        }
    }
    fn set_size(&self, new_size: Option<u64>) -> io::Result<u64> {
        let s = new_size.unwrap_or_else(|| self.size_bytes());
        self.size.store(s, Ordering::Relaxed);
        Ok(s)
    }
}

/// One page of a [`MemoryBackend`]: its bytes, or empty for a hole (never
/// written, or unmapped) that reads as zeros.
type Page = RwLock<Bytes>;

/// Zeros that reads of holes are sliced from, without a copy. A static
/// in .bss: its pages are the kernel's shared zero page until written,
/// which nothing does.
static ZEROS: [u8; 1 << 20] = [0u8; 1 << 20];

/// A sparse RAM store: fixed-size pages allocated on first write, each with
/// its own lock so readers and writers of different pages never meet.
///
/// A page is a refcounted [`Bytes`], so a READ within one page returns a
/// slice of the page itself: no copy between the LU and the socket. A
/// write to a page that such a read still holds (its Data-In not yet sent)
/// copies the page first (copy on write), so the bytes in flight never
/// change under the sender and no `unsafe` aliasing is needed.
pub struct MemoryBackend {
    chunk_shift: u32,
    size: AtomicU64,
    /// The outer lock is taken for writing only by `set_size`.
    chunks: RwLock<Vec<Page>>,
    /// Pages copied because a read still held them (for tests and tuning).
    cow_copies: AtomicU64,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("size", &self.size_bytes())
            .field("chunk_size", &(1u64 << self.chunk_shift))
            .finish()
    }
}

/// Default page: 128 KiB. Reads are sent from the pages themselves, a read
/// across pages as one slice of each ([`Backend::read_pieces`]), so the
/// page size costs reads only Data-In PDUs cut at page boundaries. But a
/// write smaller than a page is copied into it, and a write to a page
/// that an unsent read still holds copies the whole page first, so a
/// bigger page makes that copy dearer (at most 128 KiB per such write;
/// with random I/O it is rare: about queue depth × page / LU size of the
/// writes), and the page table grows as the page shrinks (8192 entries
/// per GiB here). Sparse LUs allocate in pages too.
pub const DEFAULT_CHUNK_SHIFT: u32 = 17;

impl MemoryBackend {
    pub fn new(size_bytes: u64) -> Self {
        Self::with_chunk_shift(size_bytes, DEFAULT_CHUNK_SHIFT)
    }

    /// `chunk_shift` is log2 of the page size, clamped to 12..=30.
    pub fn with_chunk_shift(size_bytes: u64, chunk_shift: u32) -> Self {
        let chunk_shift = chunk_shift.clamp(12, 30);
        let n = Self::chunks_for(size_bytes, chunk_shift);
        MemoryBackend {
            chunk_shift,
            size: AtomicU64::new(size_bytes),
            chunks: RwLock::new((0..n).map(|_| RwLock::new(Bytes::new())).collect()),
            cow_copies: AtomicU64::new(0),
        }
    }

    pub fn chunk_size(&self) -> u64 {
        1u64 << self.chunk_shift
    }

    fn chunks_for(size: u64, shift: u32) -> usize {
        let n = size.div_ceil(1u64 << shift);
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// Bytes of memory held by allocated pages.
    pub fn allocated_bytes(&self) -> u64 {
        let chunks = self.chunks.read().unwrap_or_else(|e| e.into_inner());
        let n = chunks
            .iter()
            .filter(|c| !c.read().unwrap_or_else(|e| e.into_inner()).is_empty())
            .count() as u64;
        n << self.chunk_shift
    }

    /// How many pages were copied because a read still held them.
    pub fn cow_copies(&self) -> u64 {
        self.cow_copies.load(Ordering::Relaxed)
    }

    /// Calls `f(chunk_index, offset_in_chunk, range_in_caller_buffer)` for
    /// each chunk piece of `[offset, offset+len)`.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let csize = self.chunk_size();
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let idx = usize::try_from(pos >> self.chunk_shift)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let within = pos & (csize - 1);
            let n = (csize - within).min(len - done);
            let start = done as usize;
            f(idx, within as usize, start..start + n as usize)?;
            done += n;
        }
        Ok(())
    }

    /// Lets `f` change the page in `slot`: a hole becomes a zeroed page, a
    /// page that a read still holds is copied first. `whole` says `f`
    /// overwrites all of it, so neither needs the old contents.
    fn modify_page(&self, slot: &mut Bytes, whole: bool, f: impl FnOnce(&mut [u8])) {
        let csize = self.chunk_size() as usize;
        let old = std::mem::take(slot);
        let mut page = if old.is_empty() {
            BytesMut::zeroed(csize)
        } else {
            match old.try_into_mut() {
                Ok(page) => page,
                Err(held) => {
                    self.cow_copies.fetch_add(1, Ordering::Relaxed);
                    if whole {
                        BytesMut::zeroed(csize)
                    } else {
                        BytesMut::from(&held[..])
                    }
                }
            }
        };
        f(&mut page);
        *slot = page.freeze();
    }

    fn read_into(&self, chunks: &[Page], offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.for_each_piece(offset, buf.len() as u64, |idx, within, range| {
            let dst = buf
                .get_mut(range)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let page = page_at(chunks, idx)?.read().unwrap_or_else(poisoned);
            if page.is_empty() {
                dst.fill(0);
            } else {
                let src = page
                    .get(within..within + dst.len())
                    .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
                dst.copy_from_slice(src);
            }
            Ok(())
        })
    }
}

/// Page `idx`; one past the table is an invalid range, never a panic.
fn page_at(chunks: &[Page], idx: usize) -> io::Result<&Page> {
    chunks
        .get(idx)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

fn poisoned<T>(e: std::sync::PoisonError<T>) -> T {
    e.into_inner()
}

impl Backend for MemoryBackend {
    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let chunks = self.chunks.read().unwrap_or_else(poisoned);
        check_range(offset, buf.len() as u64, self.size_bytes())?;
        self.read_into(&chunks, offset, buf)
    }

    /// Within one page: a slice of the page (or of static zeros for a
    /// hole), no copy. Across pages: one copy into a pooled buffer.
    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let chunks = self.chunks.read().unwrap_or_else(poisoned);
        check_range(offset, len as u64, self.size_bytes())?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let within = (offset & (self.chunk_size() - 1)) as usize;
        let end = within.saturating_add(len);
        if end as u64 <= self.chunk_size() {
            let idx = usize::try_from(offset >> self.chunk_shift)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let page = page_at(&chunks, idx)?.read().unwrap_or_else(poisoned);
            if !page.is_empty() && end <= page.len() {
                return Ok(page.slice(within..end));
            }
            if page.is_empty() {
                if let Some(z) = ZEROS.get(..len) {
                    return Ok(Bytes::from_static(z));
                }
            }
        }
        let mut buf = PooledBuf::take(len);
        self.read_into(&chunks, offset, &mut buf)?;
        Ok(buf.into_bytes())
    }

    /// Across pages: a slice of each page (or of static zeros for a hole),
    /// no copy; the rare piece that cannot be a slice (a hole larger than
    /// the static zeros) makes it one gathered copy as before.
    fn read_pieces(&self, offset: u64, len: usize, rest: &mut MoreData) -> io::Result<Bytes> {
        let within = offset & (self.chunk_size() - 1);
        if within.saturating_add(len as u64) <= self.chunk_size() {
            return self.read_bytes(offset, len);
        }
        let chunks = self.chunks.read().unwrap_or_else(poisoned);
        check_range(offset, len as u64, self.size_bytes())?;
        let ours = rest.len();
        let mut first = None;
        let mut sliced = true;
        let walked = self.for_each_piece(offset, len as u64, |idx, within, range| {
            let page = page_at(&chunks, idx)?.read().unwrap_or_else(poisoned);
            let end = within + range.len();
            let piece = if page.is_empty() {
                ZEROS.get(..range.len()).map(Bytes::from_static)
            } else {
                (end <= page.len()).then(|| page.slice(within..end))
            };
            match (piece, first.is_none()) {
                (Some(p), true) => first = Some(p),
                (Some(p), false) => rest.push(p),
                (None, _) => sliced = false,
            }
            Ok(())
        });
        if walked.is_err() || !sliced || first.is_none() {
            // Only what this call pushed goes.
            rest.truncate(ours);
        }
        walked?;
        match first {
            Some(first) if sliced => Ok(first),
            _ => {
                let mut buf = PooledBuf::take(len);
                self.read_into(&chunks, offset, &mut buf)?;
                Ok(buf.into_bytes())
            }
        }
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let chunks = self.chunks.read().unwrap_or_else(poisoned);
        check_range(offset, data.len() as u64, self.size_bytes())?;
        let csize = self.chunk_size() as usize;
        self.for_each_piece(offset, data.len() as u64, |idx, within, range| {
            let src = data
                .get(range)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let mut page = page_at(&chunks, idx)?.write().unwrap_or_else(poisoned);
            // Writing zeros into a hole keeps it a hole.
            if page.is_empty() && is_zero(src) {
                return Ok(());
            }
            let mut res = Ok(());
            self.modify_page(&mut page, src.len() == csize, |buf| {
                match buf.get_mut(within..within + src.len()) {
                    Some(dst) => dst.copy_from_slice(src),
                    None => res = Err(io::Error::from(io::ErrorKind::InvalidInput)),
                }
            });
            res
        })
    }

    /// A write of exactly one page, on its boundary, keeps the buffer as
    /// the page (no copy); the page it replaces goes back to the write
    /// buffer pool unless a read still holds it. Anything else is copied.
    fn write_buffer(&self, offset: u64, data: &Bytes) -> io::Result<()> {
        let csize = self.chunk_size();
        if data.len() as u64 != csize || offset & (csize - 1) != 0 {
            return self.write_at(offset, data);
        }
        let chunks = self.chunks.read().unwrap_or_else(poisoned);
        check_range(offset, csize, self.size_bytes())?;
        let idx = usize::try_from(offset >> self.chunk_shift)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut page = page_at(&chunks, idx)?.write().unwrap_or_else(poisoned);
        // Writing zeros into a hole keeps it a hole.
        if page.is_empty() && is_zero(data) {
            return Ok(());
        }
        let old = std::mem::replace(&mut *page, data.clone());
        drop(page);
        if let Ok(old) = old.try_into_mut() {
            bufpool::recycle(old);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunks = self.chunks.read().unwrap_or_else(poisoned);
        check_range(offset, len, self.size_bytes())?;
        let csize = self.chunk_size() as usize;
        self.for_each_piece(offset, len, |idx, within, range| {
            let mut page = page_at(&chunks, idx)?.write().unwrap_or_else(poisoned);
            if range.len() == csize {
                // A read still holding the page keeps its own reference.
                *page = Bytes::new();
            } else if !page.is_empty() {
                self.modify_page(&mut page, false, |buf| {
                    if let Some(part) = buf.get_mut(within..within + range.len()) {
                        part.fill(0);
                    }
                });
            }
            Ok(())
        })
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            thin_provisioning: true,
            may_block: false,
            volatile_cache: false,
        }
    }

    fn set_size(&self, new_size: Option<u64>) -> io::Result<u64> {
        let Some(new_size) = new_size else {
            return Ok(self.size_bytes());
        };
        let mut chunks = self.chunks.write().unwrap_or_else(poisoned);
        let old = self.size_bytes();
        if new_size < old {
            // Zero the tail of the last kept page so a later grow reads zeros.
            let csize = self.chunk_size();
            let within = (new_size & (csize - 1)) as usize;
            if within != 0 {
                let idx = usize::try_from(new_size >> self.chunk_shift).unwrap_or(usize::MAX);
                if let Some(c) = chunks.get(idx) {
                    let mut page = c.write().unwrap_or_else(poisoned);
                    if !page.is_empty() {
                        self.modify_page(&mut page, false, |buf| {
                            if let Some(tail) = buf.get_mut(within..) {
                                tail.fill(0);
                            }
                        });
                    }
                }
            }
        }
        let n = Self::chunks_for(new_size, self.chunk_shift);
        chunks.resize_with(n, || RwLock::new(Bytes::new()));
        self.size.store(new_size, Ordering::Release);
        Ok(new_size)
    }

    fn map_status(&self, offset: u64, max_len: u64) -> Option<(bool, u64)> {
        let chunks = self.chunks.read().unwrap_or_else(poisoned);
        let size = self.size_bytes();
        if offset >= size {
            return None;
        }
        let end = offset.saturating_add(max_len).min(size);
        let csize = self.chunk_size();
        let is_mapped = |pos: u64| -> bool {
            usize::try_from(pos >> self.chunk_shift)
                .ok()
                .and_then(|i| chunks.get(i))
                .map(|c| !c.read().unwrap_or_else(poisoned).is_empty())
                .unwrap_or(false)
        };
        let first = is_mapped(offset);
        let mut pos = (offset | (csize - 1)).saturating_add(1);
        while pos < end && is_mapped(pos) == first {
            pos = pos.saturating_add(csize);
        }
        Some((first, pos.min(end) - offset))
    }
}

/// How a file LU's data file is opened (LU properties `direct`, `io_threads`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// O_DIRECT: reads and writes bypass the page cache. Requests aligned
    /// to 4096 bytes go straight between the device and (4096-aligned)
    /// pooled buffers; others go through a second, buffered descriptor of
    /// the same file, which the kernel keeps coherent with direct I/O.
    pub direct: bool,
    /// Threads doing this LU's I/O at once; 0 picks one from the device
    /// (see [`default_io_threads`]).
    pub io_threads: u32,
}

/// I/O threads of a regular file LU when `io_threads` is not set: enough
/// to keep an SSD's queue busy without an army of threads per LU.
pub const FILE_IO_THREADS: usize = 16;
/// Most I/O threads a device's queue size may ask for by default.
const MAX_DEFAULT_IO_THREADS: usize = 64;
/// The alignment O_DIRECT requests must have (the largest logical sector).
const DIRECT_ALIGN: u64 = crate::bufpool::DIRECT_ALIGN as u64;

/// The default width of a file LU's I/O pool: for a block device its
/// request queue size (`/sys/dev/block/MAJ:MIN/queue/nr_requests`, for a
/// partition its disk's) capped at 64, else [`FILE_IO_THREADS`].
pub fn default_io_threads(meta: &std::fs::Metadata) -> usize {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if !meta.file_type().is_block_device() {
        return FILE_IO_THREADS;
    }
    let rdev = meta.rdev();
    let dev = format!("/sys/dev/block/{}:{}", libc::major(rdev), libc::minor(rdev));
    ["queue/nr_requests", "../queue/nr_requests"]
        .iter()
        .find_map(|q| std::fs::read_to_string(format!("{dev}/{q}")).ok())
        .and_then(|s| s.trim().parse::<usize>().ok())
        .map_or(FILE_IO_THREADS, |n| n.clamp(1, MAX_DEFAULT_IO_THREADS))
}

/// The error for a file system that will not do O_DIRECT, readable by
/// whoever set `direct=true`.
fn direct_refused(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::EINVAL) {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "this file system refuses O_DIRECT (direct=true); use direct=false",
        )
    } else {
        e
    }
}

fn aligned(x: u64) -> bool {
    x % DIRECT_ALIGN == 0
}

/// A regular file or a block device, accessed with pread/pwrite.
#[derive(Debug)]
pub struct FileBackend {
    /// Opened with O_DIRECT when `direct`.
    file: File,
    /// With O_DIRECT: a buffered descriptor for requests not aligned to
    /// [`DIRECT_ALIGN`] (and for zero-filling).
    buffered: Option<File>,
    size: AtomicU64,
    is_block_device: bool,
    io_threads: usize,
}

impl FileBackend {
    /// Opens an existing file or block device.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        Self::open_with(path, read_only, FileOptions::default())
    }

    /// Opens an existing file or block device with `opts`.
    pub fn open_with(
        path: impl AsRef<Path>,
        read_only: bool,
        opts: FileOptions,
    ) -> io::Result<Self> {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(!read_only);
        Self::open_opts(path.as_ref(), &o, opts)
    }

    /// Creates (or extends/truncates) a regular file of `size_bytes`.
    pub fn create(path: impl AsRef<Path>, size_bytes: u64) -> io::Result<Self> {
        Self::create_with(path, size_bytes, FileOptions::default())
    }

    /// Creates (or extends/truncates) a regular file of `size_bytes`, opened with `opts`.
    pub fn create_with(
        path: impl AsRef<Path>,
        size_bytes: u64,
        opts: FileOptions,
    ) -> io::Result<Self> {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true).create(true).truncate(false);
        let b = Self::open_opts(path.as_ref(), &o, opts)?;
        b.file.set_len(size_bytes)?;
        b.size.store(size_bytes, Ordering::Release);
        Ok(b)
    }

    fn open_opts(path: &Path, o: &std::fs::OpenOptions, opts: FileOptions) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        if !opts.direct {
            let mut b = Self::from_file(o.open(path)?)?;
            if opts.io_threads > 0 {
                b.io_threads = opts.io_threads as usize;
            }
            return Ok(b);
        }
        let buffered = o.open(path)?;
        let mut d = o.clone();
        d.custom_flags(libc::O_DIRECT);
        let file = d.open(path).map_err(direct_refused)?;
        let mut b = Self::from_file(file)?;
        b.buffered = Some(buffered);
        if opts.io_threads > 0 {
            b.io_threads = opts.io_threads as usize;
        }
        // Some file systems take the flag at open and refuse the I/O.
        if b.size_bytes() >= DIRECT_ALIGN {
            let mut probe = PooledBuf::take_aligned(DIRECT_ALIGN as usize);
            b.file
                .read_exact_at(&mut probe, 0)
                .map_err(direct_refused)?;
        }
        Ok(b)
    }

    pub fn from_file(file: File) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            Self::device_size(&file)?
        } else {
            meta.len()
        };
        Ok(FileBackend {
            file,
            buffered: None,
            size: AtomicU64::new(size),
            is_block_device,
            io_threads: default_io_threads(&meta),
        })
    }

    /// Whether I/O bypasses the page cache (O_DIRECT).
    pub fn is_direct(&self) -> bool {
        self.buffered.is_some()
    }

    /// The descriptor for a request at `offset` of `len` bytes, and whether
    /// it is the O_DIRECT one (then the memory must be aligned too).
    fn fd_for(&self, offset: u64, len: u64) -> (&File, bool) {
        match &self.buffered {
            Some(b) if !(aligned(offset) && aligned(len)) => (b, false),
            Some(_) => (&self.file, true),
            None => (&self.file, false),
        }
    }

    /// A block device's size: seeking to its end reports it (same answer as
    /// BLKGETSIZE64, without an ioctl); pread/pwrite ignore the file offset.
    fn device_size(file: &File) -> io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        let mut f = file;
        f.seek(SeekFrom::End(0))
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64) as usize;
            let fd = self.buffered.as_ref().unwrap_or(&self.file);
            fd.write_all_at(ZEROS.get(..n).unwrap_or_default(), offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only reads its integer arguments; the fd is owned
        // by `self.file` and open for the duration of the call.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn seek_data_hole(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let off = libc::off_t::try_from(offset).ok()?;
        // SAFETY: lseek only moves the file offset, which this type never
        // relies on (all I/O is positional).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        u64::try_from(r).ok()
    }
}

impl Backend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.size_bytes())?;
        let (fd, direct) = self.fd_for(offset, buf.len() as u64);
        if direct && !aligned(buf.as_ptr() as u64) {
            let mut bounce = PooledBuf::take_aligned(buf.len());
            fd.read_exact_at(&mut bounce, offset)?;
            buf.copy_from_slice(&bounce);
            return Ok(());
        }
        fd.read_exact_at(buf, offset)
    }

    /// With O_DIRECT the device writes straight into an aligned pooled
    /// buffer that travels on as the Data-In.
    fn read_bytes(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        check_range(offset, len as u64, self.size_bytes())?;
        let (fd, direct) = self.fd_for(offset, len as u64);
        let mut buf = if direct {
            PooledBuf::take_aligned(len)
        } else {
            PooledBuf::take(len)
        };
        fd.read_exact_at(&mut buf, offset)?;
        Ok(buf.into_bytes())
    }

    /// With O_DIRECT, data not at an aligned address (the port's receive
    /// buffer) is copied once into an aligned pooled buffer.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        check_range(offset, data.len() as u64, self.size_bytes())?;
        let (fd, direct) = self.fd_for(offset, data.len() as u64);
        if direct && !aligned(data.as_ptr() as u64) {
            let mut bounce = PooledBuf::take_aligned(data.len());
            bounce.copy_from_slice(data);
            return fd.write_all_at(&bounce, offset);
        }
        fd.write_all_at(data, offset)
    }

    fn io_threads(&self) -> usize {
        self.io_threads
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.size_bytes())?;
        if len == 0 {
            return Ok(());
        }
        match self.punch_hole(offset, len) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zeros(offset, len),
        }
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            thin_provisioning: !self.is_block_device,
            may_block: true,
            volatile_cache: true,
        }
    }

    fn set_size(&self, new_size: Option<u64>) -> io::Result<u64> {
        let size = match (new_size, self.is_block_device) {
            (_, true) => Self::device_size(&self.file)?,
            (Some(s), false) => {
                self.file.set_len(s)?;
                s
            }
            (None, false) => self.file.metadata()?.len(),
        };
        self.size.store(size, Ordering::Release);
        Ok(size)
    }

    fn map_status(&self, offset: u64, max_len: u64) -> Option<(bool, u64)> {
        if self.is_block_device {
            return None;
        }
        let size = self.size_bytes();
        if offset >= size {
            return None;
        }
        let end = offset.saturating_add(max_len).min(size);
        let data = self.seek_data_hole(offset, libc::SEEK_DATA);
        match data {
            // No data at or after offset: all hole to the end.
            None => Some((false, end - offset)),
            Some(d) if d > offset => Some((false, d.min(end) - offset)),
            Some(_) => {
                let hole = self.seek_data_hole(offset, libc::SEEK_HOLE).unwrap_or(size);
                Some((true, hole.clamp(offset + 1, end) - offset))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_reads_zero_before_any_write() {
        let m = MemoryBackend::with_chunk_shift(1 << 16, 12);
        let mut b = [1u8; 100];
        m.read_at(5000, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(m.allocated_bytes(), 0);
    }

    #[test]
    fn memory_write_spanning_chunks_reads_back() {
        let m = MemoryBackend::with_chunk_shift(1 << 16, 12);
        let data: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8 + 1).collect();
        m.write_at(3000, &data).unwrap();
        let mut b = vec![0u8; 10000];
        m.read_at(3000, &mut b).unwrap();
        assert_eq!(b, data);
        assert_eq!(m.allocated_bytes(), 4 * 4096);
    }

    #[test]
    fn memory_unmap_frees_whole_chunks_and_zeroes_partial() {
        let m = MemoryBackend::with_chunk_shift(1 << 16, 12);
        m.write_at(0, &[7u8; 3 * 4096]).unwrap();
        m.unmap(100, 4096 * 2).unwrap();
        assert_eq!(m.allocated_bytes(), 2 * 4096);
        let mut b = vec![0u8; 3 * 4096];
        m.read_at(0, &mut b).unwrap();
        assert!(b[..100].iter().all(|&x| x == 7));
        assert!(b[100..100 + 8192].iter().all(|&x| x == 0));
        assert!(b[100 + 8192..].iter().all(|&x| x == 7));
    }

    #[test]
    fn memory_read_within_a_page_is_a_view_of_the_page() {
        let m = MemoryBackend::with_chunk_shift(1 << 20, 16);
        m.write_at(8192, &[4u8; 4096]).unwrap();
        let a = m.read_bytes(8192, 4096).unwrap();
        let b = m.read_bytes(8192, 4096).unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr(), "two reads share the page");
        let c = m.read_bytes(4096, 8192).unwrap();
        assert_eq!(c.as_ptr().wrapping_add(4096), a.as_ptr());
        assert!(a.iter().all(|&x| x == 4));
    }

    #[test]
    fn memory_held_read_does_not_see_a_later_write() {
        let m = MemoryBackend::with_chunk_shift(1 << 20, 16);
        m.write_at(0, &[1u8; 8192]).unwrap();
        let held = m.read_bytes(0, 4096).unwrap();
        m.write_at(512, &[2u8; 512]).unwrap();
        assert!(held.iter().all(|&x| x == 1), "bytes in flight changed");
        assert_eq!(m.cow_copies(), 1);
        let now = m.read_bytes(0, 4096).unwrap();
        assert_ne!(now.as_ptr(), held.as_ptr());
        assert!(now[..512].iter().all(|&x| x == 1));
        assert!(now[512..1024].iter().all(|&x| x == 2));
        assert!(now[1024..].iter().all(|&x| x == 1));
        // Unmapping and shrinking under a held read leave it alone too.
        m.unmap(0, 4096).unwrap();
        m.set_size(Some(100)).unwrap();
        assert!(now[..512].iter().all(|&x| x == 1));
        assert!(held.iter().all(|&x| x == 1));
    }

    #[test]
    fn memory_write_to_an_unheld_page_changes_it_in_place() {
        let m = MemoryBackend::with_chunk_shift(1 << 20, 16);
        m.write_at(0, &[1u8; 4096]).unwrap();
        let p = m.read_bytes(0, 4096).unwrap().as_ptr();
        m.write_at(0, &[2u8; 4096]).unwrap();
        let after = m.read_bytes(0, 4096).unwrap();
        assert_eq!(after.as_ptr(), p);
        assert!(after.iter().all(|&x| x == 2));
        assert_eq!(m.cow_copies(), 0);
    }

    #[test]
    fn memory_read_across_pages_and_of_holes() {
        let m = MemoryBackend::with_chunk_shift(1 << 20, 12);
        let data: Vec<u8> = (0..12288u32).map(|i| (i % 253) as u8).collect();
        m.write_at(4096, &data).unwrap();
        assert_eq!(
            &m.read_bytes(4096 + 100, 10000).unwrap()[..],
            &data[100..10100]
        );
        let hole = m.read_bytes(1 << 19, 4096).unwrap();
        assert!(hole.iter().all(|&x| x == 0));
        assert_eq!(m.allocated_bytes(), 3 * 4096);
        assert!(m.read_bytes((1 << 20) - 10, 20).is_err());
        assert!(m.read_bytes(0, 0).unwrap().is_empty());
    }

    #[test]
    fn memory_read_across_pages_is_a_view_of_each_page() {
        let m = MemoryBackend::with_chunk_shift(1 << 20, 12);
        let data: Vec<u8> = (0..12288u32).map(|i| (i % 253) as u8).collect();
        m.write_at(4096, &data).unwrap();
        // From the middle of page 1 to the middle of page 4 (a hole).
        let mut rest = MoreData::new();
        let first = m.read_pieces(4096 + 100, 14000, &mut rest).unwrap();
        let lens: Vec<usize> = std::iter::once(&first)
            .chain(&rest)
            .map(Bytes::len)
            .collect();
        assert_eq!(lens, vec![3996, 4096, 4096, 1812]);
        let page2 = m.read_bytes(8192, 4096).unwrap();
        assert_eq!(
            rest[0].as_ptr(),
            page2.as_ptr(),
            "page 2 itself, not a copy"
        );
        let whole: Vec<u8> = std::iter::once(&first)
            .chain(&rest)
            .flat_map(|b| b.to_vec())
            .collect();
        assert_eq!(&whole[..12188], &data[100..]);
        assert!(whole[12188..].iter().all(|&x| x == 0));
        // Within one page: one piece, nothing more.
        rest.clear();
        assert_eq!(m.read_pieces(4096, 4096, &mut rest).unwrap().len(), 4096);
        assert!(rest.is_empty());
        // What the caller had pushed stays; nothing is left from a failed call.
        rest.push(Bytes::from_static(b"caller's"));
        assert!(m.read_pieces((1 << 20) - 10, 20, &mut rest).is_err());
        assert!(m
            .read_pieces((1 << 20) - 4096 - 10, 4106 + 1, &mut rest)
            .is_err());
        assert_eq!(rest.len(), 1);
        // A hole larger than the static zeros is gathered into one piece.
        let big = MemoryBackend::with_chunk_shift(8 << 20, 21);
        let mut rest = MoreData::new();
        rest.push(Bytes::from_static(b"caller's"));
        let one = big.read_pieces(1 << 20, 3 << 20, &mut rest).unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(one.len(), 3 << 20);
        assert!(one.iter().all(|&x| x == 0));
    }

    #[test]
    fn memory_rejects_access_past_end() {
        let m = MemoryBackend::with_chunk_shift(8192, 12);
        assert!(m.write_at(8000, &[1u8; 200]).is_err());
        assert!(m.read_at(u64::MAX, &mut [0u8; 2]).is_err());
    }

    #[test]
    fn memory_shrink_then_grow_reads_zeros() {
        let m = MemoryBackend::with_chunk_shift(8192, 12);
        m.write_at(0, &[9u8; 8192]).unwrap();
        m.set_size(Some(5000)).unwrap();
        m.set_size(Some(8192)).unwrap();
        let mut b = vec![0u8; 8192];
        m.read_at(0, &mut b).unwrap();
        assert!(b[..5000].iter().all(|&x| x == 9));
        assert!(b[5000..].iter().all(|&x| x == 0));
    }

    #[test]
    fn memory_map_status_reports_runs() {
        let m = MemoryBackend::with_chunk_shift(1 << 16, 12);
        m.write_at(4096, &[1u8; 4096 * 2]).unwrap();
        assert_eq!(m.map_status(0, 1 << 16), Some((false, 4096)));
        assert_eq!(m.map_status(4096, 1 << 16), Some((true, 8192)));
        assert_eq!(
            m.map_status(5000, 1 << 16),
            Some((true, 8192 + 4096 - 5000))
        );
        assert_eq!(
            m.map_status(12288, 1 << 16),
            Some((false, (1 << 16) - 12288))
        );
    }

    #[test]
    fn file_backend_round_trip_and_unmap() {
        let dir = std::env::temp_dir().join(format!("scsi-target-fb-{}", std::process::id()));
        let f = FileBackend::create(&dir, 1 << 20).unwrap();
        assert_eq!(f.size_bytes(), 1 << 20);
        f.write_at(4096, &[5u8; 8192]).unwrap();
        f.flush().unwrap();
        let mut b = vec![0u8; 8192];
        f.read_at(4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 5));
        f.unmap(4096, 4096).unwrap();
        f.read_at(4096, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..].iter().all(|&x| x == 5));
        assert!(f.write_at((1 << 20) - 10, &[0u8; 20]).is_err());
        assert_eq!(f.set_size(Some(2 << 20)).unwrap(), 2 << 20);
        let _ = std::fs::remove_file(&dir);
    }

    /// A file on a real file system (O_DIRECT needs one; /var/tmp is not tmpfs here).
    fn disk_file(name: &str) -> std::path::PathBuf {
        std::path::Path::new("/var/tmp").join(format!("scsi-target-{name}-{}", std::process::id()))
    }

    fn direct() -> FileOptions {
        FileOptions {
            direct: true,
            io_threads: 0,
        }
    }

    #[test]
    fn direct_file_round_trip_aligned_and_unaligned() {
        let path = disk_file("direct");
        let f = FileBackend::create_with(&path, 1 << 20, direct()).unwrap();
        assert!(f.is_direct());
        assert_eq!(f.io_threads(), FILE_IO_THREADS);
        // Aligned: straight between the device and aligned buffers; the
        // unaligned source address is bounced.
        let data: Vec<u8> = (0..16384u32).map(|i| (i % 249) as u8).collect();
        f.write_at(8192, &data[1..8193]).unwrap();
        let got = f.read_bytes(8192, 8192).unwrap();
        assert_eq!(&got[..], &data[1..8193]);
        assert_eq!(got.as_ptr() as usize % 4096, 0);
        let mut odd = vec![0u8; 8193];
        f.read_at(8192, &mut odd[1..]).unwrap();
        assert_eq!(&odd[1..], &data[1..8193]);
        // Not 4096-aligned (512-byte blocks): through the buffered
        // descriptor, coherent with the direct one both ways.
        f.write_at(512, &[7u8; 512]).unwrap();
        let mut b = vec![0u8; 4096];
        f.read_at(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0));
        assert!(b[512..1024].iter().all(|&x| x == 7));
        assert_eq!(
            &f.read_bytes(8192 + 512, 512).unwrap()[..],
            &data[513..1025]
        );
        f.flush().unwrap();
        f.unmap(8192, 4096).unwrap();
        assert!(f.read_bytes(8192, 4096).unwrap().iter().all(|&x| x == 0));
        drop(f);
        // The data is in the file for a plain open too.
        let plain = FileBackend::open(&path, true).unwrap();
        assert!(!plain.is_direct());
        let mut b = vec![0u8; 4096];
        plain.read_at(12288, &mut b).unwrap();
        assert_eq!(&b[..], &data[4097..8193]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn direct_refusal_is_a_readable_error() {
        let e = direct_refused(io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("direct=false"), "{e}");
        let other = direct_refused(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(other.kind(), io::ErrorKind::NotFound);
        // tmpfs took O_DIRECT before Linux 6.6 with EINVAL; newer kernels
        // accept it. Either way the outcome is a working LU or that error.
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            let p = shm.join(format!("scsi-target-direct-{}", std::process::id()));
            match FileBackend::create_with(&p, 1 << 16, direct()) {
                Ok(f) => {
                    f.write_at(0, &[1u8; 4096]).unwrap();
                    assert!(f.read_bytes(0, 4096).unwrap().iter().all(|&x| x == 1));
                }
                Err(e) => assert!(e.to_string().contains("refuses O_DIRECT"), "{e}"),
            }
            let _ = std::fs::remove_file(&p);
        }
    }

    #[test]
    fn a_whole_page_write_buffer_becomes_the_page_and_the_old_page_is_recycled() {
        let m = MemoryBackend::new(1 << 20);
        let page = m.chunk_size() as usize;
        let mut first = crate::bufpool::take_write_buffer(page);
        first.extend_from_slice(&vec![1u8; page]);
        let first = first.freeze();
        let first_at = first.as_ptr();
        m.write_buffer(page as u64, &first).unwrap();
        drop(first);
        // No copy: reads are served from the very buffer that was written.
        let read = m.read_bytes(page as u64, 4096).unwrap();
        assert_eq!(read.as_ptr(), first_at);
        assert!(read.iter().all(|&x| x == 1));
        drop(read);
        // The next whole-page write replaces it; the old page's memory goes
        // back to the pool for the next write to be received into.
        let mut second = crate::bufpool::take_write_buffer(page);
        second.extend_from_slice(&vec![2u8; page]);
        m.write_buffer(page as u64, &second.freeze()).unwrap();
        assert_eq!(crate::bufpool::take_write_buffer(page).as_ptr(), first_at);
        assert!(m
            .read_bytes(page as u64, page)
            .unwrap()
            .iter()
            .all(|&x| x == 2));
        // A read still holding the page keeps it: a copy is not needed then,
        // and the reader sees the data it read.
        let held = m.read_bytes(page as u64, 512).unwrap();
        let mut third = crate::bufpool::take_write_buffer(page);
        third.extend_from_slice(&vec![3u8; page]);
        m.write_buffer(page as u64, &third.freeze()).unwrap();
        assert!(held.iter().all(|&x| x == 2));
        assert!(m
            .read_bytes(page as u64, 512)
            .unwrap()
            .iter()
            .all(|&x| x == 3));
        // Not one whole aligned page: copied as before.
        let part = Bytes::from(vec![4u8; 8192]);
        m.write_buffer(page as u64 + 4096, &part).unwrap();
        let got = m.read_bytes(page as u64, 16384).unwrap();
        assert_eq!((got[4095], got[4096], got[12287], got[12288]), (3, 4, 4, 3));
        assert_ne!(got.as_ptr(), part.as_ptr());
        // Zeros into a hole keep it a hole.
        let zeros = Bytes::from(vec![0u8; page]);
        m.write_buffer(0, &zeros).unwrap();
        assert_eq!(m.map_status(0, page as u64), Some((false, page as u64)));
    }

    #[test]
    fn io_threads_property_overrides_the_default() {
        let path = disk_file("threads");
        let opts = FileOptions {
            direct: false,
            io_threads: 5,
        };
        let f = FileBackend::create_with(&path, 1 << 16, opts).unwrap();
        assert_eq!(f.io_threads(), 5);
        assert!(!f.is_direct());
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(default_io_threads(&meta), FILE_IO_THREADS);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn null_backend_reads_zeros() {
        let n = NullBackend::new(4096);
        n.write_at(0, &[1u8; 512]).unwrap();
        let mut b = [1u8; 512];
        n.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }
}
