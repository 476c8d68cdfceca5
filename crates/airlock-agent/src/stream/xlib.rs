//! Keeps Xlib from ending the capture program on an X protocol error.
//!
//! ximagesrc talks to the display through Xlib, whose default error handler
//! prints the error and exits. When the display shrinks, the frame ximagesrc
//! grabs next still has the old size and the server answers `BadMatch`: without
//! this the program would die on every shrink before the capture loop sees the
//! new size and rebuilds the pipeline. The handler installed here only counts
//! errors; the loop checks the display's size as soon as the count moves.
//! (A lost connection goes to Xlib's I/O error handler, which still exits: with
//! the display gone the stream is over.)
//!
//! Xlib is looked up at run time, the same library ximagesrc loads, so the agent
//! does not link it itself.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static ERRORS: AtomicU64 = AtomicU64::new(0);
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Xlib's `XErrorHandler`: `int (*)(Display *, XErrorEvent *)`.
type Handler = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;

extern "C" fn count(_display: *mut c_void, _event: *mut c_void) -> c_int {
    ERRORS.fetch_add(1, Ordering::Relaxed);
    0
}

/// X protocol errors Xlib has reported in this process so far.
pub fn errors() -> u64 {
    ERRORS.load(Ordering::Relaxed)
}

/// Installs the counting handler once per process; false if Xlib cannot be
/// found (then ximagesrc cannot run either).
pub fn tolerate_errors() -> bool {
    *INSTALLED.get_or_init(install)
}

#[allow(unsafe_code)]
fn install() -> bool {
    // SAFETY: dlopen and dlsym get NUL-terminated names. The handle is never
    // closed, so the function stays valid for the life of the process. The
    // symbol is `XErrorHandler XSetErrorHandler(XErrorHandler)`, which is
    // exactly the type it is transmuted to; `count` matches `XErrorHandler`,
    // touches only an atomic, and cannot unwind.
    unsafe {
        let lib = libc::dlopen(c"libX11.so.6".as_ptr(), libc::RTLD_NOW);
        if lib.is_null() {
            return false;
        }
        let sym = libc::dlsym(lib, c"XSetErrorHandler".as_ptr());
        if sym.is_null() {
            return false;
        }
        let set: unsafe extern "C" fn(Option<Handler>) -> Option<Handler> =
            std::mem::transmute(sym);
        set(Some(count));
    }
    true
}
