//! The Ceph RBD backend: a logical unit whose blocks are an RBD image, so
//! that several gateways (iscsitd processes on several hosts) can serve the
//! same LU.
//!
//! **Binding.** librbd and librados are loaded at run time (`dlopen` of
//! `librbd.so.1`, whose dependency tree brings `librados.so.2`), and only the
//! C functions this file calls are declared, each with the signature of
//! Debian 12's `rbd/librbd.h` / `rados/librados.h` (Ceph 16.2, stable since
//! 15.2). Chosen over `rbd-sys` (bindgen on the installed `librbd.h` at
//! build time, so libclang and librbd-dev on every build machine, and no
//! librados functions) and the `ceph` crate (links librados at build time):
//! one binary serves every user, `cargo build` needs no Ceph packages, and a
//! host without librbd1 gets a clear error when an RBD LU is created instead
//! of a daemon that does not start. The price is that the declarations are
//! ours to keep right; they are few and the C ABI of these calls has not
//! changed since they were added.
//!
//! **Concurrency.** The SCSI core's backend interface is synchronous, and an
//! LU whose backend may block runs each command on its own blocking thread
//! (`BackendCaps::may_block`). Each call here submits one `rbd_aio_*`
//! request and waits for its completion, so as many commands are in flight
//! per LU as the port has commands running, and librbd pipelines them to the
//! OSDs; no lock of ours is held across the wait.
//!
//! **Durability across gateways.** The librbd cache is turned off, so a
//! write is acknowledged only once the OSDs have it: when the exclusive lock
//! moves to another gateway (librbd asks the owner to release it, or breaks
//! and blocklists a dead owner), nothing acknowledged is left behind in the
//! old gateway's memory, and a dead owner's late writes are refused by the
//! blocklist. FUA and SYNCHRONIZE CACHE still call `rbd_aio_flush`.
//!
//! **COMPARE AND WRITE** goes to `rbd_aio_compare_and_write`, which the
//! OSD executes as one compare-extent + write operation, atomic against
//! every gateway. librbd 16 accepts it only within one 512-byte sector (one
//! block of a 512-byte LU, what ESXi's ATS sends); larger ranges fall back
//! to the core's in-process lock, atomic only within one gateway.
//!
//! **No hangs.** `client_mount_timeout`, `rados_mon_op_timeout` and
//! `rados_osd_op_timeout` are set on every cluster handle, so an unreachable
//! cluster turns into an error (ETIMEDOUT) on connect, open or I/O.
//!
//! Secrets: the cephx key is read by librados from the keyring the
//! configuration names; this file never sees it, so never logs it.

use std::ffi::{c_char, c_int, c_void, CString};
use std::io;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::backend::{Backend, BackendCaps, CompareAndWrite, SharedState};

type RadosT = *mut c_void;
type IoCtxT = *mut c_void;
type ImageT = *mut c_void;
type CompletionT = *mut c_void;
type UpdateCb = unsafe extern "C" fn(arg: *mut c_void);
type CompleteCb = unsafe extern "C" fn(c: CompletionT, arg: *mut c_void);
type ProgressCb = unsafe extern "C" fn(offset: u64, total: u64, arg: *mut c_void) -> c_int;
type WatchCb = unsafe extern "C" fn(
    arg: *mut c_void,
    notify_id: u64,
    handle: u64,
    notifier_id: u64,
    data: *mut c_void,
    data_len: usize,
);
type WatchErrCb = unsafe extern "C" fn(arg: *mut c_void, cookie: u64, err: c_int);
type WriteOpT = *mut c_void;
type DiffCb =
    unsafe extern "C" fn(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int;

/// Declares the C functions we use and loads them all at once.
macro_rules! api {
    ($( $name:ident : fn($($arg:ty),*) $(-> $ret:ty)? ;)*) => {
        /// The librbd/librados entry points, resolved from `librbd.so.1`.
        struct Api {
            $( $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )*
        }

        impl Api {
            fn resolve(handle: *mut c_void) -> Result<Api, String> {
                Ok(Api {
                    $( $name: {
                        let p = symbol(handle, concat!(stringify!($name), "\0"))?;
                        // SAFETY: `p` is the address of the C function of
                        // this name in librbd/librados, whose prototype in
                        // Ceph 16's headers is the one declared here; code
                        // and data pointers have the same size on every
                        // platform Ceph supports.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(p)
                        }
                    }, )*
                })
            }
        }
    };
}

api! {
    rados_create: fn(*mut RadosT, *const c_char) -> c_int;
    rados_conf_read_file: fn(RadosT, *const c_char) -> c_int;
    rados_conf_set: fn(RadosT, *const c_char, *const c_char) -> c_int;
    rados_connect: fn(RadosT) -> c_int;
    rados_shutdown: fn(RadosT);
    rados_ioctx_create: fn(RadosT, *const c_char, *mut IoCtxT) -> c_int;
    rados_ioctx_destroy: fn(IoCtxT);
    rbd_open: fn(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    rbd_close: fn(ImageT) -> c_int;
    rbd_get_size: fn(ImageT, *mut u64) -> c_int;
    rbd_get_stripe_unit: fn(ImageT, *mut u64) -> c_int;
    rbd_resize2: fn(ImageT, u64, bool, Option<ProgressCb>, *mut c_void) -> c_int;
    rbd_update_watch: fn(ImageT, *mut u64, Option<UpdateCb>, *mut c_void) -> c_int;
    rbd_update_unwatch: fn(ImageT, u64) -> c_int;
    rbd_diff_iterate2: fn(ImageT, *const c_char, u64, u64, u8, u8, Option<DiffCb>, *mut c_void) -> c_int;
    rados_getxattr: fn(IoCtxT, *const c_char, *const c_char, *mut c_char, usize) -> c_int;
    rados_create_write_op: fn() -> WriteOpT;
    rados_release_write_op: fn(WriteOpT);
    rados_write_op_create: fn(WriteOpT, c_int, *const c_char);
    rados_write_op_cmpxattr: fn(WriteOpT, *const c_char, u8, *const c_char, usize);
    rados_write_op_setxattr: fn(WriteOpT, *const c_char, *const c_char, usize);
    rados_write_op_operate: fn(WriteOpT, IoCtxT, *const c_char, *mut libc::time_t, c_int) -> c_int;
    rados_watch2: fn(IoCtxT, *const c_char, *mut u64, Option<WatchCb>, Option<WatchErrCb>, *mut c_void) -> c_int;
    rados_unwatch2: fn(IoCtxT, u64) -> c_int;
    rados_watch_flush: fn(RadosT) -> c_int;
    rados_notify2: fn(IoCtxT, *const c_char, *const c_char, c_int, u64, *mut *mut c_char, *mut usize) -> c_int;
    rados_notify_ack: fn(IoCtxT, *const c_char, u64, u64, *const c_char, c_int) -> c_int;
    rados_buffer_free: fn(*mut c_char);
    rbd_aio_create_completion: fn(*mut c_void, Option<CompleteCb>, *mut CompletionT) -> c_int;
    rbd_aio_wait_for_complete: fn(CompletionT) -> c_int;
    rbd_aio_get_return_value: fn(CompletionT) -> isize;
    rbd_aio_release: fn(CompletionT);
    rbd_aio_read: fn(ImageT, u64, usize, *mut c_char, CompletionT) -> c_int;
    rbd_aio_write: fn(ImageT, u64, usize, *const c_char, CompletionT) -> c_int;
    rbd_aio_flush: fn(ImageT, CompletionT) -> c_int;
    rbd_aio_write_zeroes: fn(ImageT, u64, usize, CompletionT, c_int, c_int) -> c_int;
    rbd_aio_writesame: fn(ImageT, u64, usize, *const c_char, usize, CompletionT, c_int) -> c_int;
    rbd_aio_compare_and_write:
        fn(ImageT, u64, usize, *const c_char, *const c_char, CompletionT, *mut u64, c_int) -> isize;
}

const LIBRBD: &str = "librbd.so.1";

fn symbol(handle: *mut c_void, name: &'static str) -> Result<*mut c_void, String> {
    // SAFETY: `handle` came from dlopen and is never closed; `name` is a
    // NUL-terminated literal.
    let p = unsafe { libc::dlsym(handle, name.as_ptr().cast()) };
    if p.is_null() {
        Err(format!(
            "{LIBRBD} has no {}: librbd 15.2 or newer is needed",
            name.trim_end_matches('\0')
        ))
    } else {
        Ok(p)
    }
}

/// Loads librbd once per process; the library stays loaded for good.
fn api() -> Result<&'static Api, RbdError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        // SAFETY: dlopen with a NUL-terminated name; librbd's initialisers
        // are safe to run at any time (they only register static data).
        let h = unsafe { libc::dlopen(c"librbd.so.1".as_ptr(), libc::RTLD_NOW) };
        if h.is_null() {
            // SAFETY: dlerror returns a thread-local NUL-terminated string
            // or null, read before any other dl call on this thread.
            let why = unsafe {
                let e = libc::dlerror();
                if e.is_null() {
                    "not found".to_string()
                } else {
                    std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            return Err(why);
        }
        Api::resolve(h)
    })
    .as_ref()
    .map_err(|why| RbdError::Load(why.clone()))
}

/// Whether librbd can be loaded on this host (tests skip without it).
pub fn librbd_available() -> bool {
    api().is_ok()
}

/// Why an RBD image could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RbdError {
    #[error("cannot load {LIBRBD} ({0}): install librbd1 (Debian: apt-get install librbd1) to use RBD LUs")]
    Load(String),
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    #[error("{what}: {source}")]
    Call {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// Where the image is and how to reach the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RbdConfig {
    pub pool: String,
    pub image: String,
    /// The cluster's ceph.conf; `None`: librados's default search
    /// (`$CEPH_CONF`, /etc/ceph/ceph.conf, ...).
    pub conf: Option<String>,
    /// The cephx client id ("admin" for client.admin).
    pub client_id: String,
    /// Seconds every monitor and OSD call may take before it fails.
    pub timeout_secs: u32,
}

impl RbdConfig {
    pub fn new(pool: &str, image: &str) -> Self {
        RbdConfig {
            pool: pool.to_string(),
            image: image.to_string(),
            conf: None,
            client_id: "admin".to_string(),
            timeout_secs: DEFAULT_TIMEOUT_SECS,
        }
    }
}

/// Long enough for an exclusive-lock hand-off between gateways, short
/// enough that an initiator sees an error before it gives up on us.
pub const DEFAULT_TIMEOUT_SECS: u32 = 30;

fn cstr(s: &str, what: &'static str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul(what))
}

fn errno(rc: i64) -> io::Error {
    let e = i32::try_from(rc.unsigned_abs()).unwrap_or(libc::EIO);
    io::Error::from_raw_os_error(e)
}

fn check(rc: c_int, what: impl FnOnce() -> String) -> Result<(), RbdError> {
    if rc < 0 {
        Err(RbdError::Call {
            what: what(),
            source: errno(i64::from(rc)),
        })
    } else {
        Ok(())
    }
}

/// A cluster handle; shut down when dropped.
struct Cluster(&'static Api, RadosT);

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create and every ioctx and
        // image made from it is gone (they are dropped first).
        unsafe { (self.0.rados_shutdown)(self.1) }
    }
}

/// A pool's I/O context; destroyed when dropped.
struct IoCtx(&'static Api, IoCtxT);

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: made by rados_ioctx_create; the image opened on it is
        // closed first.
        unsafe { (self.0.rados_ioctx_destroy)(self.1) }
    }
}

/// An open image; closed when dropped.
struct Image(&'static Api, ImageT);

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: made by rbd_open; no request is in flight (every call
        // here waits for its completion before returning).
        let rc = unsafe { (self.0.rbd_close)(self.1) };
        if rc < 0 {
            tracing::warn!(error = %errno(i64::from(rc)), "rbd_close failed");
        }
    }
}

/// An RBD image as an LU's store.
pub struct RbdBackend {
    api: &'static Api,
    name: String,
    size: AtomicU64,
    object_size: u64,
    /// Set by librbd's header watch (resize from any host); the next
    /// `size_bytes` re-reads the size.
    size_stale: Arc<AtomicBool>,
    watch: Option<u64>,
    /// Where the LU's persistent reservations live (None: this process only).
    pr: Option<PrObject>,
    // Declaration order is drop order: image, then pool, then cluster.
    image: Image,
    _ioctx: IoCtx,
    _cluster: Cluster,
}

// SAFETY: librados and librbd handles may be used from any thread and by
// several threads at once (librbd serialises internally; concurrent aio
// submission is its documented use).
unsafe impl Send for RbdBackend {}
// SAFETY: as above; every &self method only submits requests.
unsafe impl Sync for RbdBackend {}

impl std::fmt::Debug for RbdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdBackend")
            .field("image", &self.name)
            .field("size", &self.size.load(Ordering::Relaxed))
            .finish()
    }
}

unsafe extern "C" fn on_header_update(arg: *mut c_void) {
    // SAFETY: `arg` is the `AtomicBool` inside the backend's
    // `size_stale` Arc, which outlives the watch (unwatched in Drop first).
    let stale = unsafe { &*(arg as *const AtomicBool) };
    stale.store(true, Ordering::Release);
}

impl RbdBackend {
    /// Connects to the cluster and opens the image. Every step is bounded by
    /// `cfg.timeout_secs`.
    pub fn open(cfg: &RbdConfig) -> Result<RbdBackend, RbdError> {
        let api = api()?;
        let name = format!("{}/{}", cfg.pool, cfg.image);
        let id = cstr(&cfg.client_id, "client id")?;
        let pool = cstr(&cfg.pool, "pool")?;
        let image_name = cstr(&cfg.image, "image")?;
        let mut h: RadosT = null_mut();
        // SAFETY: `h` is a valid out-pointer, `id` NUL-terminated.
        check(unsafe { (api.rados_create)(&mut h, id.as_ptr()) }, || {
            format!("rados_create for client.{}", cfg.client_id)
        })?;
        let cluster = Cluster(api, h);
        let conf = cfg
            .conf
            .as_deref()
            .map(|c| cstr(c, "conf path"))
            .transpose()?;
        // SAFETY: the handle is unconnected, which conf_read_file expects;
        // a null path means the default search.
        let rc = unsafe {
            (api.rados_conf_read_file)(h, conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
        };
        check(rc, || {
            format!(
                "reading {}",
                cfg.conf.as_deref().unwrap_or("the default ceph.conf")
            )
        })?;
        let t = cfg.timeout_secs.max(1).to_string();
        for (k, v) in [
            ("client_mount_timeout", t.as_str()),
            ("rados_mon_op_timeout", t.as_str()),
            ("rados_osd_op_timeout", t.as_str()),
            // Acknowledged means on the OSDs: see the module comment.
            ("rbd_cache", "false"),
        ] {
            let (kc, vc) = (cstr(k, "option")?, cstr(v, "value")?);
            // SAFETY: both strings NUL-terminated; the handle is unconnected.
            let rc = unsafe { (api.rados_conf_set)(h, kc.as_ptr(), vc.as_ptr()) };
            check(rc, || format!("setting {k}"))?;
        }
        // SAFETY: configured handle; bounded by client_mount_timeout.
        check(unsafe { (api.rados_connect)(h) }, || {
            format!("connecting to the cluster as client.{}", cfg.client_id)
        })?;
        let mut io: IoCtxT = null_mut();
        // SAFETY: connected handle, NUL-terminated pool name, valid out-pointer.
        let rc = unsafe { (api.rados_ioctx_create)(h, pool.as_ptr(), &mut io) };
        check(rc, || format!("opening pool {}", cfg.pool))?;
        let ioctx = IoCtx(api, io);
        let mut img: ImageT = null_mut();
        // SAFETY: valid ioctx, NUL-terminated name, no snapshot (null).
        let rc = unsafe { (api.rbd_open)(io, image_name.as_ptr(), &mut img, std::ptr::null()) };
        check(rc, || format!("opening image {name}"))?;
        let image = Image(api, img);
        let mut size = 0u64;
        // SAFETY: open image, valid out-pointer.
        check(unsafe { (api.rbd_get_size)(img, &mut size) }, || {
            format!("size of {name}")
        })?;
        let mut object_size = 0u64;
        // SAFETY: open image, valid out-pointer.
        let rc = unsafe { (api.rbd_get_stripe_unit)(img, &mut object_size) };
        if rc < 0 {
            object_size = 0;
        }
        let size_stale = Arc::new(AtomicBool::new(false));
        let mut handle = 0u64;
        // SAFETY: the callback only stores into the AtomicBool behind the
        // Arc we keep until after rbd_update_unwatch (Drop).
        let rc = unsafe {
            (api.rbd_update_watch)(
                img,
                &mut handle,
                Some(on_header_update),
                Arc::as_ptr(&size_stale) as *mut c_void,
            )
        };
        let watch = if rc < 0 {
            tracing::warn!(image = %name, error = %errno(i64::from(rc)), "no header watch: resizes by others are not noticed");
            None
        } else {
            Some(handle)
        };
        let pr = match PrObject::open(api, io, &cfg.image) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(image = %name, error = %e, "persistent reservations stay in this gateway");
                None
            }
        };
        tracing::info!(image = %name, size, object_size, "RBD image open");
        Ok(RbdBackend {
            api,
            name,
            size: AtomicU64::new(size),
            object_size,
            size_stale,
            watch,
            pr,
            image,
            _ioctx: ioctx,
            _cluster: cluster,
        })
    }

    /// The image as "pool/image".
    pub fn image_name(&self) -> &str {
        &self.name
    }

    /// Runs one asynchronous request to completion: `submit` starts it on
    /// the completion it is given; the calling (blocking) thread waits.
    fn aio(&self, submit: impl FnOnce(CompletionT) -> i64) -> io::Result<i64> {
        let api = self.api;
        let mut c: CompletionT = null_mut();
        // SAFETY: valid out-pointer; no callback, we wait instead.
        let rc = unsafe { (api.rbd_aio_create_completion)(null_mut(), None, &mut c) };
        if rc < 0 {
            return Err(errno(i64::from(rc)));
        }
        let rc = submit(c);
        if rc < 0 {
            // SAFETY: the request was refused, so the completion is ours alone.
            unsafe { (api.rbd_aio_release)(c) };
            return Err(errno(rc));
        }
        // SAFETY: `c` is a live completion of a submitted request; after the
        // wait librbd no longer touches the request's buffers.
        let ret = unsafe {
            (api.rbd_aio_wait_for_complete)(c);
            let r = (api.rbd_aio_get_return_value)(c);
            (api.rbd_aio_release)(c);
            r
        };
        let ret = i64::try_from(ret).unwrap_or(i64::MIN);
        if ret < 0 {
            Err(errno(ret))
        } else {
            Ok(ret)
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "access beyond the end of the image",
            )),
        }
    }

    fn read_size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: open image, valid out-pointer.
        let rc = unsafe { (self.api.rbd_get_size)(self.image.1, &mut size) };
        if rc < 0 {
            return Err(errno(i64::from(rc)));
        }
        self.size.store(size, Ordering::Release);
        Ok(size)
    }

    /// Whether `[offset, offset+len)` lies in one RADOS object, the unit
    /// librbd's compare-and-write is atomic in.
    fn within_one_object(&self, offset: u64, len: u64) -> bool {
        one_object(self.object_size, offset, len)
    }
}

fn one_object(object_size: u64, offset: u64, len: u64) -> bool {
    if object_size == 0 || len == 0 {
        return false;
    }
    let last = offset.saturating_add(len - 1);
    offset / object_size == last / object_size
}

/// librbd reports a miscompare at an image offset; SCSI wants it relative
/// to the start of the compared range.
fn miscompare_offset(range_start: u64, reported: u64, len: u64) -> u64 {
    match reported.checked_sub(range_start) {
        Some(rel) if rel < len => rel,
        _ if reported < len => reported,
        _ => 0,
    }
}

/// Collects the allocated extents `rbd_diff_iterate2` reports.
unsafe extern "C" fn on_extent(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the Vec that `map_status` passes and keeps borrowed
    // until rbd_diff_iterate2 returns; librbd calls back on that thread.
    let v = unsafe { &mut *(arg as *mut Vec<(u64, u64)>) };
    if exists != 0 {
        v.push((offset, len as u64));
    }
    // Enough to answer one GET LBA STATUS descriptor run.
    if v.len() >= 4096 {
        -libc::ECANCELED
    } else {
        0
    }
}

/// The run at `offset` within `[offset, end)` given the allocated extents:
/// (mapped, bytes).
fn run_at(extents: &[(u64, u64)], offset: u64, end: u64) -> (bool, u64) {
    let covering = |p: u64| {
        extents
            .iter()
            .filter(|&&(o, l)| o <= p && p < o.saturating_add(l))
            .map(|&(o, l)| o.saturating_add(l))
            .max()
    };
    match covering(offset) {
        Some(mut e) => {
            let mut pos;
            loop {
                pos = e.min(end);
                match covering(pos) {
                    Some(next) if pos < end => e = next,
                    _ => break,
                }
            }
            (true, pos - offset)
        }
        None => {
            let next = extents
                .iter()
                .map(|&(o, _)| o)
                .filter(|&o| o > offset)
                .min()
                .unwrap_or(end);
            (false, next.min(end) - offset)
        }
    }
}

/// The persistent reservation state of an RBD LU: the xattr
/// [`PR_XATTR`] of the object `ironstar.pr.<image>` in the image's pool,
/// replaced by one OSD operation that compares the old value and sets the
/// new one (so concurrent changes from two gateways cannot both win). Every
/// gateway watches the object and is notified after each change. The LU's
/// mode parameters live beside it, one xattr each (`ironstar.mode.<name>`),
/// announced the same way.
struct PrObject {
    api: &'static Api,
    io: IoCtxT,
    oid: CString,
    cookie: u64,
    /// Boxed so the watch callback's pointer stays valid; freed after unwatch.
    ctx: Box<PrWatch>,
}

// SAFETY: an ioctx may be used from any thread (librados is thread-safe);
// the rest is owned data and atomics.
unsafe impl Send for PrObject {}
// SAFETY: as above; &self methods only issue librados calls.
unsafe impl Sync for PrObject {}

struct PrWatch {
    api: &'static Api,
    io: IoCtxT,
    oid: CString,
    changed: AtomicBool,
    /// Another gateway reset the LU.
    reset: AtomicBool,
    /// Another gateway stored mode parameters.
    mode_changed: AtomicBool,
    /// This gateway's instance, to ignore its own reset announcements.
    me: u64,
    /// The watch failed: every command re-reads the state from then on.
    broken: AtomicBool,
}

const PR_XATTR: &str = "ironstar.pr";
/// The state with nothing registered, as the core encodes it.
pub(crate) const EMPTY_PR_STATE: &[u8] = b"ironstar-pr 1\ngen 0\n";
const PR_NOTIFY_TIMEOUT_MS: u64 = 3000;
/// The largest reservation state read back (the core's encoding of every
/// registration stays far below it).
const PR_STATE_MAX: usize = 64 * 1024;

/// Tells this process's watches apart from other gateways' (pid, time).
fn instance_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (u64::from(std::process::id()) << 32) ^ nanos
}

unsafe extern "C" fn on_pr_notify(
    arg: *mut c_void,
    notify_id: u64,
    handle: u64,
    _notifier: u64,
    data: *mut c_void,
    len: usize,
) {
    // SAFETY: `arg` is the boxed PrWatch, alive until after rados_unwatch2
    // and rados_watch_flush (PrObject::drop).
    let w = unsafe { &*(arg as *const PrWatch) };
    let payload: &[u8] = if data.is_null() || len == 0 {
        &[]
    } else {
        // SAFETY: librados hands us `len` bytes at `data` for this call.
        unsafe { std::slice::from_raw_parts(data as *const u8, len) }
    };
    if payload.is_empty() {
        w.changed.store(true, Ordering::Release);
    } else if payload.starts_with(b"reset:") && payload != reset_event(w.me).as_slice() {
        w.reset.store(true, Ordering::Release);
    } else if payload.starts_with(b"mode:") && payload != mode_event(w.me).as_slice() {
        w.mode_changed.store(true, Ordering::Release);
    }
    // SAFETY: acknowledging with the ids librados gave us; no payload.
    unsafe {
        (w.api.rados_notify_ack)(w.io, w.oid.as_ptr(), notify_id, handle, std::ptr::null(), 0)
    };
}

unsafe extern "C" fn on_pr_watch_error(arg: *mut c_void, _cookie: u64, _err: c_int) {
    // SAFETY: as in on_pr_notify.
    let w = unsafe { &*(arg as *const PrWatch) };
    w.broken.store(true, Ordering::Release);
}

impl PrObject {
    fn open(api: &'static Api, io: IoCtxT, image: &str) -> io::Result<PrObject> {
        let oid = CString::new(format!("ironstar.pr.{image}"))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let name =
            CString::new(PR_XATTR).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh op filled with NUL-terminated names and a static
        // value, run once and released.
        let rc = unsafe {
            let op = (api.rados_create_write_op)();
            if op.is_null() {
                return Err(io::Error::from(io::ErrorKind::OutOfMemory));
            }
            (api.rados_write_op_create)(op, 1, std::ptr::null());
            (api.rados_write_op_setxattr)(
                op,
                name.as_ptr(),
                EMPTY_PR_STATE.as_ptr().cast(),
                EMPTY_PR_STATE.len(),
            );
            let rc = (api.rados_write_op_operate)(op, io, oid.as_ptr(), null_mut(), 0);
            (api.rados_release_write_op)(op);
            rc
        };
        if rc < 0 && rc != -libc::EEXIST {
            return Err(errno(i64::from(rc)));
        }
        let ctx = Box::new(PrWatch {
            api,
            io,
            oid: oid.clone(),
            // Read the state on the first command.
            changed: AtomicBool::new(true),
            reset: AtomicBool::new(false),
            // LogicalUnit::new reads them when it opens the LU.
            mode_changed: AtomicBool::new(false),
            me: instance_id(),
            broken: AtomicBool::new(false),
        });
        let mut cookie = 0u64;
        // SAFETY: the callbacks only touch the boxed PrWatch, which outlives
        // the watch (see Drop).
        let rc = unsafe {
            (api.rados_watch2)(
                io,
                oid.as_ptr(),
                &mut cookie,
                Some(on_pr_notify),
                Some(on_pr_watch_error),
                (&*ctx as *const PrWatch).cast_mut().cast(),
            )
        };
        if rc < 0 {
            return Err(errno(i64::from(rc)));
        }
        Ok(PrObject {
            api,
            io,
            oid,
            cookie,
            ctx,
        })
    }

    fn xattr_name() -> &'static std::ffi::CStr {
        c"ironstar.pr"
    }

    /// One xattr of the object, of at most `max` bytes (a longer one is an
    /// error, ERANGE); `None` when it was never set.
    fn getxattr(&self, name: &std::ffi::CStr, max: usize) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; max];
        // SAFETY: `buf` is valid for writes of its length.
        let rc = unsafe {
            (self.api.rados_getxattr)(
                self.io,
                self.oid.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if rc == -libc::ENOENT || rc == -libc::ENODATA {
            return Ok(None);
        }
        let n = usize::try_from(rc).map_err(|_| errno(i64::from(rc)))?;
        buf.truncate(n.min(buf.len()));
        Ok(Some(buf))
    }

    /// Tells every watching gateway (this one included): an empty payload
    /// means "re-read the state", `reset:<instance>` a LUN reset,
    /// `mode:<instance>` new mode parameters.
    fn notify(&self, payload: &[u8], timeout_ms: u64) {
        let mut reply: *mut c_char = null_mut();
        let mut len = 0usize;
        let plen = c_int::try_from(payload.len()).unwrap_or(0);
        // SAFETY: the payload outlives the synchronous call; librados
        // allocates the reply, freed here.
        let rc = unsafe {
            (self.api.rados_notify2)(
                self.io,
                self.oid.as_ptr(),
                payload.as_ptr().cast(),
                plen,
                timeout_ms,
                &mut reply,
                &mut len,
            )
        };
        if !reply.is_null() {
            // SAFETY: allocated by rados_notify2 for us.
            unsafe { (self.api.rados_buffer_free)(reply) };
        }
        if rc < 0 {
            // A dead gateway's watch lingers until the OSD drops it.
            tracing::debug!(error = %errno(i64::from(rc)), "PR change notify incomplete");
        }
    }
}

impl SharedState for PrObject {
    fn load(&self) -> io::Result<Vec<u8>> {
        Ok(self
            .getxattr(Self::xattr_name(), PR_STATE_MAX)?
            .unwrap_or_else(|| EMPTY_PR_STATE.to_vec()))
    }

    fn replace(&self, expected: &[u8], new: &[u8]) -> io::Result<bool> {
        let name = Self::xattr_name();
        // SAFETY: a fresh op whose buffers all outlive the synchronous
        // operate call; released afterwards.
        let rc = unsafe {
            let op = (self.api.rados_create_write_op)();
            if op.is_null() {
                return Err(io::Error::from(io::ErrorKind::OutOfMemory));
            }
            // LIBRADOS_CMPXATTR_OP_EQ
            (self.api.rados_write_op_cmpxattr)(
                op,
                name.as_ptr(),
                1,
                expected.as_ptr().cast(),
                expected.len(),
            );
            (self.api.rados_write_op_setxattr)(op, name.as_ptr(), new.as_ptr().cast(), new.len());
            let rc =
                (self.api.rados_write_op_operate)(op, self.io, self.oid.as_ptr(), null_mut(), 0);
            (self.api.rados_release_write_op)(op);
            rc
        };
        match rc {
            0.. => {
                self.notify(&[], PR_NOTIFY_TIMEOUT_MS);
                Ok(true)
            }
            e if e == -libc::ECANCELED => Ok(false),
            e => Err(errno(i64::from(e))),
        }
    }

    fn take_changed(&self) -> bool {
        self.ctx.broken.load(Ordering::Acquire) || self.ctx.changed.swap(false, Ordering::AcqRel)
    }

    fn announce_reset(&self) {
        // Short: a TMF waits for it, and a dead gateway never answers.
        self.notify(&reset_event(self.ctx.me), 1000);
    }

    fn take_reset(&self) -> bool {
        self.ctx.reset.swap(false, Ordering::AcqRel)
    }

    fn load_mode_param(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        // "0" or "1": a few bytes, read before a command when the watch broke.
        self.getxattr(&mode_xattr(name)?, 16)
    }

    fn store_mode_params(&self, params: &[(&str, &[u8])]) -> io::Result<()> {
        let names = params
            .iter()
            .map(|(n, _)| mode_xattr(n))
            .collect::<io::Result<Vec<CString>>>()?;
        // SAFETY: a fresh op whose names and values all outlive the
        // synchronous operate call; released afterwards. One op: the
        // parameters change together or not at all.
        let rc = unsafe {
            let op = (self.api.rados_create_write_op)();
            if op.is_null() {
                return Err(io::Error::from(io::ErrorKind::OutOfMemory));
            }
            for (name, (_, value)) in names.iter().zip(params) {
                (self.api.rados_write_op_setxattr)(
                    op,
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                );
            }
            let rc =
                (self.api.rados_write_op_operate)(op, self.io, self.oid.as_ptr(), null_mut(), 0);
            (self.api.rados_release_write_op)(op);
            rc
        };
        if rc < 0 {
            return Err(errno(i64::from(rc)));
        }
        self.notify(&mode_event(self.ctx.me), PR_NOTIFY_TIMEOUT_MS);
        Ok(())
    }

    fn take_mode_changed(&self) -> bool {
        self.ctx.broken.load(Ordering::Acquire)
            || self.ctx.mode_changed.swap(false, Ordering::AcqRel)
    }
}

fn mode_event(instance: u64) -> Vec<u8> {
    format!("mode:{instance:016x}").into_bytes()
}

fn mode_xattr(name: &str) -> io::Result<CString> {
    CString::new(format!("ironstar.mode.{name}"))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn reset_event(instance: u64) -> Vec<u8> {
    format!("reset:{instance:016x}").into_bytes()
}

impl Drop for PrObject {
    fn drop(&mut self) {
        // SAFETY: the cookie came from rados_watch2 on this ioctx, which is
        // destroyed only after the backend (and so this object) is gone.
        let rc = unsafe { (self.api.rados_unwatch2)(self.io, self.cookie) };
        if rc < 0 {
            tracing::warn!(error = %errno(i64::from(rc)), "rados_unwatch2 failed");
        }
    }
}

impl Drop for RbdBackend {
    fn drop(&mut self) {
        if self.pr.take().is_some() {
            // SAFETY: waits until no watch callback runs any more, so the
            // PrWatch just freed is not touched again.
            unsafe { (self.api.rados_watch_flush)(self._cluster.1) };
        }
        if let Some(h) = self.watch.take() {
            // SAFETY: the handle came from rbd_update_watch on this open
            // image; after it returns the callback is never called again.
            let rc = unsafe { (self.api.rbd_update_unwatch)(self.image.1, h) };
            if rc < 0 {
                tracing::warn!(image = %self.name, error = %errno(i64::from(rc)), "rbd_update_unwatch failed");
            }
        }
    }
}

impl Backend for RbdBackend {
    fn size_bytes(&self) -> u64 {
        if self.size_stale.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.read_size() {
                tracing::warn!(image = %self.name, error = %e, "cannot re-read the image size");
                self.size_stale.store(true, Ordering::Release);
            }
        }
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (img, api) = (self.image.1, self.api);
        let n = self.aio(|c| {
            // SAFETY: `buf` is valid for writes of its length and outlives
            // the request (aio waits for completion).
            i64::from(unsafe {
                (api.rbd_aio_read)(img, offset, buf.len(), buf.as_mut_ptr().cast(), c)
            })
        })?;
        if u64::try_from(n).ok() != Some(buf.len() as u64) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read from {}: {n} of {}", self.name, buf.len()),
            ));
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let (img, api) = (self.image.1, self.api);
        self.aio(|c| {
            // SAFETY: `data` is valid for reads of its length and outlives
            // the request.
            i64::from(unsafe {
                (api.rbd_aio_write)(img, offset, data.len(), data.as_ptr().cast(), c)
            })
        })
        .map(|_| ())
    }

    fn flush(&self) -> io::Result<()> {
        let (img, api) = (self.image.1, self.api);
        // SAFETY: open image; the request holds no buffer of ours.
        self.aio(|c| i64::from(unsafe { (api.rbd_aio_flush)(img, c) }))
            .map(|_| ())
    }

    /// Zeroing that deallocates: whole objects are removed or truncated,
    /// partial ones zeroed, so the range reads as zeros afterwards (LBPRZ),
    /// which a plain discard does not promise.
    fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let l = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let (img, api) = (self.image.1, self.api);
        // SAFETY: open image; no buffer involved; flags 0 = may deallocate.
        self.aio(|c| i64::from(unsafe { (api.rbd_aio_write_zeroes)(img, offset, l, c, 0, 0) }))
            .map(|_| ())
    }

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            thin_provisioning: true,
            may_block: true,
            volatile_cache: true,
        }
    }

    /// librbd takes any whole 512-byte sector, and this path has no page
    /// cache that would read-modify-write a larger unit: like the kernel's
    /// rbd driver and tgt's rbd store, report physical blocks of 512.
    fn physical_block_size(&self) -> u32 {
        512
    }

    /// Grows the image (a shrink is refused: it would destroy data another
    /// gateway may be serving), or re-reads its size.
    fn set_size(&self, new_size: Option<u64>) -> io::Result<u64> {
        if let Some(s) = new_size {
            // SAFETY: open image; no progress callback.
            let rc = unsafe { (self.api.rbd_resize2)(self.image.1, s, false, None, null_mut()) };
            if rc < 0 {
                return Err(errno(i64::from(rc)));
            }
        }
        self.read_size()
    }

    /// Allocation as librbd's object map knows it, a whole object at a time.
    fn map_status(&self, offset: u64, max_len: u64) -> Option<(bool, u64)> {
        let size = self.size_bytes();
        if offset >= size {
            return None;
        }
        // Bounded so one call stays quick on an image without an object map.
        let window = 1024 * self.object_size.max(1 << 22);
        let end = offset.saturating_add(max_len.min(window)).min(size);
        let mut extents: Vec<(u64, u64)> = Vec::new();
        // SAFETY: open image; no snapshot (null); the callback only pushes
        // into `extents`, which outlives the call.
        let rc = unsafe {
            (self.api.rbd_diff_iterate2)(
                self.image.1,
                std::ptr::null(),
                offset,
                end - offset,
                1,
                1,
                Some(on_extent),
                (&mut extents as *mut Vec<(u64, u64)>).cast(),
            )
        };
        if rc < 0 && rc != -libc::ECANCELED {
            tracing::debug!(image = %self.name, error = %errno(i64::from(rc)), "rbd_diff_iterate2 failed");
            return None;
        }
        extents.sort_unstable();
        let (mapped, n) = run_at(&extents, offset, end);
        Some((mapped, n.max(1)))
    }

    fn shared_state(&self) -> Option<&dyn SharedState> {
        self.pr.as_ref().map(|p| p as &dyn SharedState)
    }

    fn write_same(&self, offset: u64, len: u64, pattern: &[u8]) -> io::Result<()> {
        self.check_range(offset, len)?;
        if pattern.iter().all(|&b| b == 0) {
            // librbd turns a zero writesame into a discard that may skip
            // partial objects; write-zeroes always leaves zeros.
            return self.unmap(offset, len);
        }
        let plen = pattern.len() as u64;
        if plen == 0 || len % plen != 0 || len == 0 {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let l = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let (img, api) = (self.image.1, self.api);
        self.aio(|c| {
            // SAFETY: `pattern` is valid for reads of its length and
            // outlives the request.
            i64::from(unsafe {
                (api.rbd_aio_writesame)(
                    img,
                    offset,
                    l,
                    pattern.as_ptr().cast(),
                    pattern.len(),
                    c,
                    0,
                )
            })
        })
        .map(|_| ())
    }

    fn compare_and_write(
        &self,
        offset: u64,
        compare: &[u8],
        write: &[u8],
    ) -> io::Result<CompareAndWrite> {
        let len = compare.len() as u64;
        if write.len() != compare.len() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        self.check_range(offset, len)?;
        if !self.within_one_object(offset, len) {
            // librbd compares within one object only; see the core's fallback.
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let (img, api) = (self.image.1, self.api);
        let mut mismatch = 0u64;
        let mp: *mut u64 = &mut mismatch;
        let r = self.aio(|c| {
            // SAFETY: both buffers are valid for reads of `len` bytes and
            // `mp` for one write; all outlive the request (aio waits).
            let rc = unsafe {
                (api.rbd_aio_compare_and_write)(
                    img,
                    offset,
                    compare.len(),
                    compare.as_ptr().cast(),
                    write.as_ptr().cast(),
                    c,
                    mp,
                    0,
                )
            };
            i64::try_from(rc).unwrap_or(i64::MIN)
        });
        match r {
            Ok(_) => Ok(CompareAndWrite::Written),
            // librbd 16 compares within one 512-byte sector only (later
            // releases lift that): larger ranges go to the core's fallback.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                Err(io::Error::from(io::ErrorKind::Unsupported))
            }
            Err(e) if e.raw_os_error() == Some(libc::EILSEQ) => Ok(CompareAndWrite::Miscompare(
                miscompare_offset(offset, mismatch, len),
            )),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_and_write_range_must_sit_in_one_object() {
        let os = 4 << 20;
        assert!(one_object(os, 0, 512));
        assert!(one_object(os, os - 512, 512));
        assert!(!one_object(os, os - 512, 1024));
        assert!(!one_object(0, 0, 512));
        assert!(!one_object(os, 0, 0));
    }

    #[test]
    fn map_runs_follow_the_allocated_extents() {
        let m = 4u64 << 20;
        let ext = [(m, m), (2 * m, m), (5 * m, m)];
        assert_eq!(run_at(&ext, 0, 8 * m), (false, m));
        assert_eq!(run_at(&ext, m, 8 * m), (true, 2 * m));
        assert_eq!(run_at(&ext, m + 512, 8 * m), (true, 2 * m - 512));
        assert_eq!(run_at(&ext, 3 * m, 8 * m), (false, 2 * m));
        assert_eq!(run_at(&ext, 5 * m, 8 * m), (true, m));
        assert_eq!(run_at(&ext, 6 * m, 8 * m), (false, 2 * m));
        assert_eq!(run_at(&[], 0, m), (false, m));
        assert_eq!(run_at(&ext, m, 2 * m), (true, m));
    }

    #[test]
    fn miscompare_offset_is_relative_to_the_range() {
        assert_eq!(miscompare_offset(8192, 8192 + 17, 512), 17);
        assert_eq!(miscompare_offset(8192, 17, 512), 17);
        assert_eq!(miscompare_offset(8192, 1 << 40, 512), 0);
    }

    #[test]
    fn unreachable_cluster_is_an_error_not_a_hang() {
        if !librbd_available() {
            eprintln!("skipped: librbd not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("rbd-unreach-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("ceph.conf");
        // Port 9 (discard) on loopback: nothing answers there.
        std::fs::write(
            &conf,
            "[global]\nmon host = 127.0.0.1:9\nauth client required = none\nlog file = /dev/null\nadmin socket =\n",
        )
        .unwrap();
        let cfg = RbdConfig {
            conf: Some(conf.to_string_lossy().into_owned()),
            timeout_secs: 2,
            ..RbdConfig::new("rbd", "nothing")
        };
        let start = std::time::Instant::now();
        let err = RbdBackend::open(&cfg).unwrap_err();
        let took = start.elapsed();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(took < std::time::Duration::from_secs(20), "took {took:?}");
        assert!(err.to_string().contains("connecting"), "{err}");
    }

    #[test]
    fn missing_conf_file_is_named_in_the_error() {
        if !librbd_available() {
            return;
        }
        let cfg = RbdConfig {
            conf: Some("/nonexistent/ceph.conf".into()),
            ..RbdConfig::new("rbd", "x")
        };
        let err = RbdBackend::open(&cfg).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ceph.conf"), "{err}");
    }
}
