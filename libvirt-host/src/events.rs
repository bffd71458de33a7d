//! libvirt's domain lifecycle events (`virConnectDomainEventRegisterAny`), turned into a counter the window
//! watches to refresh when something changed (a domain started, stopped, was defined or undefined, paused,
//! resumed, crashed), instead of polling. The virt crate has no wrapper for event registration: this is
//! the raw call. Callbacks run on the libvirt event loop's thread.

use std::os::raw::{c_int, c_void};
use std::sync::Arc;

use tokio::sync::watch;
use virt::connect::Connect;
use virt::sys;

pub type Changes = Arc<watch::Sender<u64>>;

/// Bumps the counter.
pub fn bump(changes: &Changes) {
    changes.send_modify(|n| *n = n.wrapping_add(1));
}

unsafe extern "C" fn lifecycle(
    _conn: sys::virConnectPtr,
    _dom: sys::virDomainPtr,
    _event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: `opaque` is the boxed `Changes` given at registration, alive until `free` runs.
    let changes = unsafe { &*(opaque as *const Changes) };
    bump(changes);
    0
}

unsafe extern "C" fn free(opaque: *mut c_void) {
    // SAFETY: the box leaked at registration; libvirt calls this once, when the callback goes away.
    drop(unsafe { Box::from_raw(opaque as *mut Changes) });
}

/// Registers for every domain's lifecycle events on `conn`; they bump `changes`. The registration ends with
/// the connection.
pub fn register(conn: &Connect, changes: &Changes) -> Result<(), virt::error::Error> {
    let opaque = Box::into_raw(Box::new(changes.clone())) as *mut c_void;
    type Lifecycle = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
    type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
    // SAFETY: libvirt calls a lifecycle callback with the lifecycle signature; the generic type is only how
    // the C API spells the parameter (the documented idiom is VIR_DOMAIN_EVENT_CALLBACK(cb)).
    let cb = unsafe { std::mem::transmute::<Lifecycle, Generic>(lifecycle) };
    // SAFETY: a live connection; `opaque` stays valid until libvirt calls `free`.
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            Some(cb),
            opaque,
            Some(free),
        )
    };
    if id < 0 {
        // SAFETY: libvirt did not take the box: free it here.
        drop(unsafe { Box::from_raw(opaque as *mut Changes) });
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}
