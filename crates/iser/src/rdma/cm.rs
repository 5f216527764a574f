//! librdmacm, called through `rdma-mummy-sys` (the -sys crate sideway itself is built on, which
//! loads librdmacm at run time): event channels read from tokio through `AsyncFd`, CM ids, and
//! connect/accept/reject with private data. sideway 0.4.3's own rdmacm wrapper cannot carry CM
//! private data (its `ConnectionParameter` has no setter and its events no getter), and iSER
//! needs it both ways (`iser_cm_hdr`), so this small layer replaces it.
use rdma_mummy_sys as sys;
use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::unix::AsyncFd;

struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub(crate) struct EventChannel {
    // Field order: the fd is deregistered from tokio before Drop closes it.
    fd: AsyncFd<Fd>,
    ch: NonNull<sys::rdma_event_channel>,
}
// SAFETY: librdmacm's event channel is a file descriptor plus immutable data; its calls are thread-safe.
unsafe impl Send for EventChannel {}
unsafe impl Sync for EventChannel {}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on this channel holds an Arc to it, so none is left when it drops.
        unsafe { sys::rdma_destroy_event_channel(self.ch.as_ptr()) };
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    AddrResolved,
    AddrError,
    RouteResolved,
    RouteError,
    ConnectRequest,
    ConnectResponse,
    ConnectError,
    Unreachable,
    Rejected,
    Established,
    Disconnected,
    DeviceRemoval,
    TimewaitExit,
    Other(u32),
}

impl From<u32> for EventKind {
    fn from(v: u32) -> Self {
        use sys::rdma_cm_event_type as t;
        match v {
            t::RDMA_CM_EVENT_ADDR_RESOLVED => Self::AddrResolved,
            t::RDMA_CM_EVENT_ADDR_ERROR => Self::AddrError,
            t::RDMA_CM_EVENT_ROUTE_RESOLVED => Self::RouteResolved,
            t::RDMA_CM_EVENT_ROUTE_ERROR => Self::RouteError,
            t::RDMA_CM_EVENT_CONNECT_REQUEST => Self::ConnectRequest,
            t::RDMA_CM_EVENT_CONNECT_RESPONSE => Self::ConnectResponse,
            t::RDMA_CM_EVENT_CONNECT_ERROR => Self::ConnectError,
            t::RDMA_CM_EVENT_UNREACHABLE => Self::Unreachable,
            t::RDMA_CM_EVENT_REJECTED => Self::Rejected,
            t::RDMA_CM_EVENT_ESTABLISHED => Self::Established,
            t::RDMA_CM_EVENT_DISCONNECTED => Self::Disconnected,
            t::RDMA_CM_EVENT_DEVICE_REMOVAL => Self::DeviceRemoval,
            t::RDMA_CM_EVENT_TIMEWAIT_EXIT => Self::TimewaitExit,
            other => Self::Other(other),
        }
    }
}

/// A CM event copied out of librdmacm's and acknowledged at once (so `rdma_destroy_id` and
/// `rdma_migrate_id`, which wait for every event of an id to be acknowledged, never block).
pub(crate) struct Event {
    pub kind: EventKind,
    pub status: i32,
    /// For ConnectRequest: the new id, owned (dropping it refuses the request).
    pub request: Option<CmId>,
    pub private_data: Vec<u8>,
    pub responder_resources: u8,
    pub initiator_depth: u8,
}

impl EventChannel {
    pub(crate) fn new() -> io::Result<Arc<Self>> {
        // SAFETY: plain constructor; null means failure with errno set.
        let ch = unsafe { sys::rdma_create_event_channel() };
        let ch = NonNull::new(ch).ok_or_else(io::Error::last_os_error)?;
        // SAFETY: ch is a live channel; fd is its descriptor.
        let raw = unsafe { ch.as_ref().fd };
        set_nonblocking(raw)?;
        // SAFETY: the fd stays open until the channel is destroyed in Drop, after the AsyncFd field drops.
        let fd = match unsafe { AsyncFd::register(Fd(raw)) }.map_err(io::Error::from) {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: ch was created above and nothing else refers to it.
                unsafe { sys::rdma_destroy_event_channel(ch.as_ptr()) };
                return Err(e);
            }
        };
        Ok(Arc::new(Self { ch, fd }))
    }

    pub(crate) fn create_id(self: &Arc<Self>) -> io::Result<CmId> {
        let mut id = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; RC port space.
        let ret = unsafe {
            sys::rdma_create_id(
                self.ch.as_ptr(),
                &mut id,
                std::ptr::null_mut(),
                sys::rdma_port_space::RDMA_PS_TCP,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        let id = NonNull::new(id).ok_or_else(|| io::Error::other("rdma_create_id gave no id"))?;
        Ok(CmId {
            id,
            channel: self.clone(),
        })
    }

    fn try_get(self: &Arc<Self>) -> io::Result<Event> {
        let mut ev = std::ptr::null_mut();
        // SAFETY: non-blocking fd: EAGAIN when empty.
        let ret = unsafe { sys::rdma_get_cm_event(self.ch.as_ptr(), &mut ev) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        let ev =
            NonNull::new(ev).ok_or_else(|| io::Error::other("rdma_get_cm_event gave no event"))?;
        // SAFETY: ev is valid until rdma_ack_cm_event below; everything needed is copied first.
        let out = unsafe {
            let e = ev.as_ref();
            let kind = EventKind::from(e.event);
            let conn = e.param.conn;
            let private_data = if conn.private_data.is_null() || conn.private_data_len == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(
                    conn.private_data as *const u8,
                    usize::from(conn.private_data_len),
                )
                .to_vec()
            };
            // A ConnectRequest's id is a new one that librdmacm hands to us to own.
            let request = if kind == EventKind::ConnectRequest {
                NonNull::new(e.id).map(|id| CmId {
                    id,
                    channel: Arc::clone(self),
                })
            } else {
                None
            };
            Event {
                kind,
                status: e.status,
                request,
                private_data,
                responder_resources: conn.responder_resources,
                initiator_depth: conn.initiator_depth,
            }
        };
        // SAFETY: acknowledges the event taken above, once.
        unsafe { sys::rdma_ack_cm_event(ev.as_ptr()) };
        Ok(out)
    }

    pub(crate) async fn next_event(self: &Arc<Self>) -> io::Result<Event> {
        loop {
            let mut guard = self.fd.readable().await?;
            match self.try_get() {
                Ok(ev) => return Ok(ev),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Our references on librdmacm's devices, one `rdma_get_devices` reference per live device, by
/// device name (the context pointers are librdmacm's, kept as addresses).
///
/// Why: rdma-core 44's librdmacm deadlocks on itself when its own device list is empty while
/// the verbs device list is not. `ucma_init` then takes librdmacm's global lock, re-reads the
/// list, and through `ucma_set_af_ib_support` → `rdma_create_id` calls itself, which finds the
/// list still empty and waits for the lock it holds; every later librdmacm call (a listener's
/// re-bind included) then waits on that lock too. A re-read made while a device is being
/// removed can drop every entry nobody holds a reference on (seen in the test bed under
/// `rdma link delete`: the re-read lists 0 devices and the next call hangs, with gdb showing
/// the recursion). An entry with a reference is only marked dead, never dropped, so holding one
/// on every live device keeps the list non-empty while any other device is present. The
/// reference on a device being removed is let go first, so librdmacm can close its context of
/// it and the kernel can finish the removal.
static PINNED: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);

fn lock_pinned() -> MutexGuard<'static, Option<HashMap<String, usize>>> {
    PINNED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gives references taken by `rdma_get_devices` back (`rdma_free_devices`, which frees the
/// array it is given with `free`, so the array is made with `malloc`).
fn release(contexts: &[usize]) {
    if contexts.is_empty() {
        return;
    }
    let slot = std::mem::size_of::<*mut sys::ibv_context>();
    // SAFETY: a fresh malloc'd array of len + 1 pointers, filled and NULL-terminated before use;
    // every pointer is one rdma_get_devices returned and was not given back yet.
    unsafe {
        let array = libc::malloc(slot * (contexts.len() + 1)).cast::<*mut sys::ibv_context>();
        if array.is_null() {
            // Out of memory: the references stay held, which only keeps contexts open.
            return;
        }
        for (i, &c) in contexts.iter().enumerate() {
            *array.add(i) = c as *mut sys::ibv_context;
        }
        *array.add(contexts.len()) = std::ptr::null_mut();
        sys::rdma_free_devices(array);
    }
}

/// Has librdmacm re-read its device list (`rdma_get_devices`) and holds one reference on each
/// live device it lists, giving back the ones held on devices that are gone from the verbs
/// device list. librdmacm keeps a verbs context of every device it has used open on its own, and the
/// kernel cannot finish removing a device without disassociate support (rdma_rxe) while any
/// context of it is open: a re-read marks a vanished device dead, and librdmacm closes its
/// context once no CM id and no reference holds it. When the re-read fails or lists no live
/// device (both seen while a device is being removed) the references held are kept.
pub(crate) fn pin_devices() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let mut n = 0;
    // SAFETY: out-pointer to a local.
    let list = unsafe { sys::rdma_get_devices(&mut n) };
    if list.is_null() {
        tracing::debug!(tid, "iser rdma: librdmacm lists no device; references kept");
        return;
    }
    let mut fresh: HashMap<String, usize> = HashMap::new();
    let mut give_back = Vec::new();
    // SAFETY: a NULL-terminated array of live contexts, each with its device, whose name is a
    // NUL-terminated string; the array (not the references) is ours to free.
    unsafe {
        let mut i = 0;
        while let Some(ctx) = NonNull::new(*list.add(i)) {
            i += 1;
            let name = (*ctx.as_ptr()).device.as_ref().map(|d| {
                CStr::from_ptr(d.name.as_ptr())
                    .to_string_lossy()
                    .into_owned()
            });
            let addr = ctx.as_ptr() as usize;
            match name {
                Some(name) if !fresh.contains_key(&name) => {
                    fresh.insert(name, addr);
                }
                _ => give_back.push(addr),
            }
        }
        libc::free(list.cast());
    }
    if fresh.is_empty() {
        // Seen in the middle of a removal: librdmacm took every entry for dead, the other
        // devices included. Letting go now could empty its list: keep what is held.
        release(&give_back);
        tracing::debug!(
            tid,
            "iser rdma: librdmacm lists no live device; references kept"
        );
        return;
    }
    // Verbs' own list (libibverbs), to tell a device really gone from one librdmacm only calls
    // dead: the reference on the latter is kept.
    let present = super::qp::device_names();
    let mut held = lock_pinned();
    let old = held.take().unwrap_or_default();
    for (name, addr) in old {
        if fresh.contains_key(&name) || !present.contains(&name) {
            // Held twice now (a fresh reference replaces it), or the device is gone.
            give_back.push(addr);
        } else {
            fresh.insert(name, addr);
        }
    }
    let names: Vec<String> = fresh.keys().cloned().collect();
    *held = Some(fresh);
    drop(held);
    release(&give_back);
    tracing::debug!(
        tid,
        ?names,
        "iser rdma: librdmacm lists {n} devices; one reference held on each"
    );
}

/// Takes the first references ([`pin_devices`]) unless some are held already.
pub(crate) fn pin_devices_once() {
    if lock_pinned().is_none() {
        pin_devices();
    }
}

/// Gives back our reference on `name` (removed or failed), so librdmacm can close its context
/// of it at its next re-read.
pub(crate) fn unpin_device(name: &str) {
    let held = lock_pinned().as_mut().and_then(|m| m.remove(name));
    if let Some(addr) = held {
        release(&[addr]);
        tracing::debug!("iser rdma: reference on {name} given back to librdmacm");
    }
}

pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub(crate) struct CmId {
    id: NonNull<sys::rdma_cm_id>,
    channel: Arc<EventChannel>,
}
// SAFETY: an rdma_cm_id is used through librdmacm calls that are safe from any thread.
unsafe impl Send for CmId {}
unsafe impl Sync for CmId {}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        tracing::debug!(tid, device = ?self.device_name(), "iser rdma: destroying a cm id");
        // SAFETY: we own the id; all its events were acknowledged when read.
        unsafe { sys::rdma_destroy_id(self.id.as_ptr()) };
        tracing::debug!(tid, "iser rdma: cm id destroyed");
    }
}

pub(crate) struct ConnParam<'a> {
    pub private_data: &'a [u8],
    pub responder_resources: u8,
    pub initiator_depth: u8,
    pub qp_num: u32,
}

fn check(ret: i32) -> io::Result<()> {
    if ret != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as _)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as _)
        }
    }
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
}

impl CmId {
    pub(crate) fn bind(&self, addr: SocketAddr) -> io::Result<()> {
        let (mut ss, _) = to_sockaddr(addr);
        // SAFETY: ss is a valid sockaddr for the call's duration.
        check(unsafe { sys::rdma_bind_addr(self.id.as_ptr(), &mut ss as *mut _ as *mut _) })
    }

    pub(crate) fn listen(&self, backlog: i32) -> io::Result<()> {
        // SAFETY: id is live.
        check(unsafe { sys::rdma_listen(self.id.as_ptr(), backlog) })
    }

    pub(crate) fn resolve_addr(&self, dst: SocketAddr, timeout_ms: i32) -> io::Result<()> {
        let (mut ss, _) = to_sockaddr(dst);
        // SAFETY: ss is valid for the call; src null = any.
        check(unsafe {
            sys::rdma_resolve_addr(
                self.id.as_ptr(),
                std::ptr::null_mut(),
                &mut ss as *mut _ as *mut _,
                timeout_ms,
            )
        })
    }

    pub(crate) fn resolve_route(&self, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: id is live.
        check(unsafe { sys::rdma_resolve_route(self.id.as_ptr(), timeout_ms) })
    }

    /// Moves the id's events to another channel (all its events so far were acknowledged).
    pub(crate) fn migrate(&mut self, channel: Arc<EventChannel>) -> io::Result<()> {
        // SAFETY: both live; events were acknowledged when read, so this does not block.
        check(unsafe { sys::rdma_migrate_id(self.id.as_ptr(), channel.ch.as_ptr()) })?;
        self.channel = channel;
        Ok(())
    }

    pub(crate) fn channel(&self) -> &Arc<EventChannel> {
        &self.channel
    }

    fn raw_param(p: &ConnParam<'_>) -> io::Result<sys::rdma_conn_param> {
        let len = u8::try_from(p.private_data.len())
            .map_err(|_| io::Error::other("private data over 255 bytes"))?;
        Ok(sys::rdma_conn_param {
            private_data: if len == 0 {
                std::ptr::null()
            } else {
                p.private_data.as_ptr().cast()
            },
            private_data_len: len,
            responder_resources: p.responder_resources,
            initiator_depth: p.initiator_depth,
            flow_control: 1,
            retry_count: 7,
            rnr_retry_count: 7,
            srq: 0,
            qp_num: p.qp_num,
        })
    }

    pub(crate) fn connect(&self, p: &ConnParam<'_>) -> io::Result<()> {
        let mut raw = Self::raw_param(p)?;
        // SAFETY: raw and the private data it points to outlive the call (librdmacm copies them).
        check(unsafe { sys::rdma_connect(self.id.as_ptr(), &mut raw) })
    }

    pub(crate) fn accept(&self, p: &ConnParam<'_>) -> io::Result<()> {
        let mut raw = Self::raw_param(p)?;
        // SAFETY: as in connect.
        check(unsafe { sys::rdma_accept(self.id.as_ptr(), &mut raw) })
    }

    pub(crate) fn reject(&self, private_data: &[u8]) -> io::Result<()> {
        let len = u8::try_from(private_data.len())
            .map_err(|_| io::Error::other("private data over 255 bytes"))?;
        // SAFETY: private_data outlives the call.
        check(unsafe { sys::rdma_reject(self.id.as_ptr(), private_data.as_ptr().cast(), len) })
    }

    pub(crate) fn establish(&self) -> io::Result<()> {
        // SAFETY: id is live.
        check(unsafe { sys::rdma_establish(self.id.as_ptr()) })
    }

    pub(crate) fn disconnect(&self) -> io::Result<()> {
        // SAFETY: id is live.
        check(unsafe { sys::rdma_disconnect(self.id.as_ptr()) })
    }

    /// QP attributes for `state` as the CM computed them (path, PSNs, remote QPN).
    pub(crate) fn qp_attr(
        &self,
        state: sys::ibv_qp_state::Type,
    ) -> io::Result<(sys::ibv_qp_attr, i32)> {
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = state;
        let mut mask = 0;
        // SAFETY: out-pointers to locals.
        check(unsafe { sys::rdma_init_qp_attr(self.id.as_ptr(), &mut attr, &mut mask) })?;
        Ok((attr, mask))
    }

    /// The id's local address (`rdma_get_local_addr`), once bound or connected.
    pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the route's address storage is part of the live id.
        let sa = unsafe { &(*self.id.as_ptr()).route.addr.src_addr_union.src_storage };
        from_sockaddr(sa)
    }

    /// The peer's address (`rdma_get_peer_addr`), once resolved or requested.
    pub(crate) fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: as in local_addr.
        let sa = unsafe { &(*self.id.as_ptr()).route.addr.dst_addr_union.dst_storage };
        from_sockaddr(sa)
    }

    /// Name of the verbs device the id is bound to (after address resolution or a request).
    pub(crate) fn device_name(&self) -> Option<String> {
        // SAFETY: verbs and its device are set by librdmacm once bound and live as long as the id.
        unsafe {
            let verbs = self.id.as_ref().verbs;
            if verbs.is_null() {
                return None;
            }
            let dev = (*verbs).device;
            if dev.is_null() {
                return None;
            }
            let name = sys::ibv_get_device_name(dev);
            if name.is_null() {
                return None;
            }
            Some(
                std::ffi::CStr::from_ptr(name)
                    .to_string_lossy()
                    .into_owned(),
            )
        }
    }
}
