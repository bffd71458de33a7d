//! libvirt's domain events (`virConnectDomainEventRegisterAny`): lifecycle (defined, undefined, started,
//! stopped, paused, resumed, crashed, saved) and the events that say a domain's definition changed (a device
//! added or removed, a tray opened, a disk's media changed or dropped, its metadata or tunables changed).
//! Each bumps a counter the window watches, to refresh when something changed instead of polling, and marks
//! the domain "dirty" so the host's cache of parsed definitions re-reads its XML; any event also makes the
//! last reading of every domain's state stale. The virt crate has no wrapper for event registration: these
//! are the raw calls. Callbacks run on the libvirt event loop's thread.

use std::collections::HashSet;
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use virt::connect::Connect;
use virt::sys;

/// What events tell the host.
pub struct Watch {
    /// Bumped on every event and on reconnection: the window refreshes on it.
    pub changes: watch::Sender<u64>,
    /// Bumped on every event and on Porthole's own changes: a state reading taken before is stale.
    generation: AtomicU64,
    /// Domains (UUIDs) whose definitions changed since the cache read them.
    dirty: Mutex<HashSet<String>>,
    /// Every definition is to be re-read (the connection was reopened, a read failed half-way).
    all_dirty: AtomicBool,
    /// Whether the present connection delivers every event the cache relies on.
    live: AtomicBool,
}

impl Watch {
    pub fn new() -> Watch {
        Watch {
            changes: watch::channel(0).0,
            generation: AtomicU64::new(0),
            dirty: Mutex::new(HashSet::new()),
            all_dirty: AtomicBool::new(true),
            live: AtomicBool::new(false),
        }
    }

    /// Bumps the window's counter.
    pub fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Something changed `uuid`'s definition or state (every domain's when `None`): its cached definition
    /// and every earlier state reading are stale.
    pub fn touch(&self, uuid: Option<&str>) {
        match uuid {
            Some(u) => {
                self.dirty.lock().unwrap_or_else(|p| p.into_inner()).insert(u.to_string());
            }
            None => self.all_dirty.store(true, Ordering::SeqCst),
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Takes the set of dirty domains: (every domain dirty, these dirty).
    pub fn take_dirty(&self) -> (bool, HashSet<String>) {
        let set = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        (self.all_dirty.swap(false, Ordering::SeqCst), set)
    }

    pub fn live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
    }
}

impl Default for Watch {
    fn default() -> Self {
        Watch::new()
    }
}

/// The event for `dom` arrived: mark it, bump the counter.
///
/// # Safety
/// `opaque` is a boxed `Arc<Watch>` given at registration; `dom` is the event's domain (or null).
unsafe fn seen(dom: sys::virDomainPtr, opaque: *mut c_void) {
    // SAFETY: `opaque` is the boxed `Arc<Watch>` given at registration, alive until `free` runs.
    let watch = unsafe { &*(opaque as *const Arc<Watch>) };
    let mut buf = [0 as c_char; 40];
    // SAFETY: the event's domain is valid during the callback; the buffer holds VIR_UUID_STRING_BUFLEN (37)
    // bytes. virDomainGetUUIDString reads the domain object (no call to the daemon).
    let uuid = (!dom.is_null() && unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } == 0)
        // SAFETY: libvirt wrote a NUL-terminated string into `buf`.
        .then(|| unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned());
    // An event whose domain cannot be named makes every definition stale.
    watch.touch(uuid.as_deref());
    watch.bump();
}

unsafe extern "C" fn lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: as libvirt calls it, with the opaque given at registration.
    unsafe { seen(dom, opaque) };
    0
}

unsafe extern "C" fn device(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: as libvirt calls it, with the opaque given at registration.
    unsafe { seen(dom, opaque) }
}

unsafe extern "C" fn tray(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _alias: *const c_char,
    _reason: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as libvirt calls it, with the opaque given at registration.
    unsafe { seen(dom, opaque) }
}

unsafe extern "C" fn disk_change(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _old: *const c_char,
    _new: *const c_char,
    _alias: *const c_char,
    _reason: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as libvirt calls it, with the opaque given at registration.
    unsafe { seen(dom, opaque) }
}

unsafe extern "C" fn metadata(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _kind: c_int,
    _nsuri: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: as libvirt calls it, with the opaque given at registration.
    unsafe { seen(dom, opaque) }
}

unsafe extern "C" fn tunable(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _params: sys::virTypedParameterPtr,
    _n: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as libvirt calls it, with the opaque given at registration.
    unsafe { seen(dom, opaque) }
}

unsafe extern "C" fn free(opaque: *mut c_void) {
    // SAFETY: the box leaked at registration; libvirt calls this once, when the callback goes away.
    drop(unsafe { Box::from_raw(opaque as *mut Arc<Watch>) });
}

type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);

fn register_one(
    conn: &Connect,
    watch: &Arc<Watch>,
    id: sys::virDomainEventID,
    cb: Generic,
) -> Result<(), virt::error::Error> {
    let opaque = Box::into_raw(Box::new(watch.clone())) as *mut c_void;
    crate::count();
    // SAFETY: a live connection; `opaque` stays valid until libvirt calls `free`; `cb` has the signature
    // libvirt uses for `id` (transmuted to the generic type only as the C API spells the parameter).
    let r = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            id as c_int,
            Some(cb),
            opaque,
            Some(free),
        )
    };
    if r < 0 {
        // SAFETY: libvirt did not take the box: free it here.
        drop(unsafe { Box::from_raw(opaque as *mut Arc<Watch>) });
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// Registers for every domain's lifecycle and definition-change events on `conn`; the registrations end
/// with the connection. The watch is "live" (definitions may be cached) only when all of them took.
pub fn register(conn: &Connect, watch: &Arc<Watch>) -> Result<(), virt::error::Error> {
    type Lifecycle = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
    type Device = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, *mut c_void);
    type Tray = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *const c_char, c_int, *mut c_void);
    type Disk = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        *const c_char,
        *const c_char,
        *const c_char,
        c_int,
        *mut c_void,
    );
    type Meta = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, *const c_char, *mut c_void);
    type Tunable =
        unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, sys::virTypedParameterPtr, c_int, *mut c_void);
    // SAFETY (each): libvirt calls the callback of an event id with that id's signature; the generic type is
    // only how the C API spells the parameter (the documented idiom is VIR_DOMAIN_EVENT_CALLBACK(cb)).
    let callbacks: [(sys::virDomainEventID, Generic); 7] = unsafe {
        [
            (sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE, std::mem::transmute::<Lifecycle, Generic>(lifecycle)),
            (sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, std::mem::transmute::<Device, Generic>(device)),
            (sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, std::mem::transmute::<Device, Generic>(device)),
            (sys::VIR_DOMAIN_EVENT_ID_TRAY_CHANGE, std::mem::transmute::<Tray, Generic>(tray)),
            (sys::VIR_DOMAIN_EVENT_ID_DISK_CHANGE, std::mem::transmute::<Disk, Generic>(disk_change)),
            (sys::VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, std::mem::transmute::<Meta, Generic>(metadata)),
            (sys::VIR_DOMAIN_EVENT_ID_TUNABLE, std::mem::transmute::<Tunable, Generic>(tunable)),
        ]
    };
    watch.set_live(false);
    let mut first_error = None;
    for (id, cb) in callbacks {
        if let Err(e) = register_one(conn, watch, id, cb) {
            // Without lifecycle events nothing is cached; without the others, definitions are re-read.
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            watch.set_live(true);
            Ok(())
        }
    }
}
