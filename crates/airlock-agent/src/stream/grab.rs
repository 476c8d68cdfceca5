//! Reads the display's pixels when they change.
//!
//! The DAMAGE extension tells when: one `DamageNotify` each time the screen's
//! damaged region goes from empty to non-empty. [`Grabber::grab`] empties the
//! region *before* it reads, so a change made while it reads raises the next
//! notification and is never lost. MIT-SHM reads the screen into a segment
//! shared with the X server (one copy, no socket transfer of megabytes); a
//! server without it (or one in another IPC namespace) is read with a plain
//! `GetImage`.
//!
//! The pixels are the root window's in ZPixmap form: for the 24-bit TrueColor
//! visuals Xvnc and Xvfb use, 32 bits per pixel in the X server's byte order,
//! which on little-endian hosts is what GStreamer calls BGRx.

use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::damage::{self, ConnectionExt as _};
use x11rb::protocol::shm::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{self, ConnectionExt as _, ImageFormat};
use x11rb::rust_connection::RustConnection;

#[derive(Debug, thiserror::Error)]
pub enum GrabError {
    #[error("the X server has no DAMAGE extension (needed to know when the screen changes)")]
    NoDamage,
    #[error("the screen is {depth} bits deep with {bpp} bits per pixel; only 24/32-bit TrueColor is captured")]
    Format { depth: u8, bpp: u8 },
    #[error("the X connection failed")]
    Connection(#[from] x11rb::errors::ConnectionError),
    #[error("the X server refused a request")]
    Reply(#[from] x11rb::errors::ReplyError),
    #[error("no X resource id left")]
    Ids(#[from] x11rb::errors::ReplyOrIdError),
}

/// A shared memory segment attached both here and in the X server.
#[derive(Debug)]
struct Segment {
    seg: shm::Seg,
    addr: *mut u8,
    size: usize,
}

impl Segment {
    /// A private segment of `size` bytes, attached to the server; `None` when
    /// either side cannot (the caller then reads without SHM).
    #[allow(unsafe_code)]
    fn attach(conn: &RustConnection, size: usize) -> Option<Segment> {
        conn.extension_information(shm::X11_EXTENSION_NAME)
            .ok()
            .flatten()?;
        // SAFETY: shmget/shmat/shmctl are called with a size and flags of our
        // own; the address is checked before use and detached in Drop. The
        // segment is marked for removal as soon as the server has attached
        // it, so it disappears with the last process that uses it, even if
        // this one is killed.
        unsafe {
            let id = libc::shmget(libc::IPC_PRIVATE, size, libc::IPC_CREAT | 0o600);
            if id < 0 {
                return None;
            }
            let addr = libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY);
            if addr as isize == -1 {
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
                return None;
            }
            let attached = (|| {
                let seg = conn.generate_id().ok()?;
                // The server writes into it: read_only = false on its side.
                conn.shm_attach(seg, id as u32, false).ok()?.check().ok()?;
                Some(seg)
            })();
            libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            match attached {
                Some(seg) => Some(Segment {
                    seg,
                    addr: addr.cast(),
                    size,
                }),
                None => {
                    libc::shmdt(addr);
                    None
                }
            }
        }
    }

    #[allow(unsafe_code)]
    fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: the mapping is `size` bytes long and lives as long as self;
        // `len` is clamped to it. The server writes it only during a
        // ShmGetImage, whose reply has been received before this is called.
        unsafe { std::slice::from_raw_parts(self.addr, len.min(self.size)) }
    }

    #[allow(unsafe_code)]
    fn detach(self, conn: &RustConnection) {
        let _ = conn.shm_detach(self.seg);
        let _ = conn.flush();
        // SAFETY: `addr` came from shmat and is detached once, here.
        unsafe {
            libc::shmdt(self.addr.cast());
        }
    }
}

/// Damage tracking and reads of the area `width`×`height` from the top-left.
#[derive(Debug)]
pub struct Grabber<'c> {
    conn: &'c RustConnection,
    root: xproto::Window,
    damage: damage::Damage,
    shm: Option<Segment>,
    width: u16,
    height: u16,
    /// Pixels of the last plain `GetImage` (without SHM).
    plain: Vec<u8>,
}

impl<'c> Grabber<'c> {
    pub fn new(
        conn: &'c RustConnection,
        screen: usize,
        width: u16,
        height: u16,
    ) -> Result<Self, GrabError> {
        let s = &conn.setup().roots[screen];
        let root = s.root;
        let bpp = conn
            .setup()
            .pixmap_formats
            .iter()
            .find(|f| f.depth == s.root_depth)
            .map(|f| f.bits_per_pixel)
            .unwrap_or(0);
        if s.root_depth != 24 || bpp != 32 {
            return Err(GrabError::Format {
                depth: s.root_depth,
                bpp,
            });
        }
        conn.extension_information(damage::X11_EXTENSION_NAME)?
            .ok_or(GrabError::NoDamage)?;
        conn.damage_query_version(1, 1)?.reply()?;
        let damage = conn.generate_id()?;
        conn.damage_create(damage, root, damage::ReportLevel::NON_EMPTY)?
            .check()?;
        let shm = Segment::attach(conn, usize::from(width) * usize::from(height) * 4);
        if shm.is_none() {
            tracing::info!("MIT-SHM not available: reading the screen with GetImage");
        }
        Ok(Grabber {
            conn,
            root,
            damage,
            shm,
            width,
            height,
            plain: Vec::new(),
        })
    }

    /// Whether `event` says the screen changed.
    pub fn is_damage(&self, event: &x11rb::protocol::Event) -> bool {
        matches!(event, x11rb::protocol::Event::DamageNotify(n) if n.damage == self.damage)
    }

    /// The whole area as BGRx, `width * 4` bytes per row. Marks everything
    /// up to now as seen first.
    pub fn grab(&mut self) -> Result<&[u8], GrabError> {
        self.conn
            .damage_subtract(self.damage, x11rb::NONE, x11rb::NONE)?;
        let len = usize::from(self.width) * usize::from(self.height) * 4;
        match &self.shm {
            Some(seg) => {
                self.conn
                    .shm_get_image(
                        self.root,
                        0,
                        0,
                        self.width,
                        self.height,
                        !0,
                        ImageFormat::Z_PIXMAP.into(),
                        seg.seg,
                        0,
                    )?
                    .reply()?;
                Ok(seg.bytes(len))
            }
            None => {
                let reply = self
                    .conn
                    .get_image(
                        ImageFormat::Z_PIXMAP,
                        self.root,
                        0,
                        0,
                        self.width,
                        self.height,
                        !0,
                    )?
                    .reply()?;
                self.plain = reply.data;
                self.plain.truncate(len);
                Ok(&self.plain)
            }
        }
    }
}

impl Drop for Grabber<'_> {
    fn drop(&mut self) {
        if let Some(seg) = self.shm.take() {
            seg.detach(self.conn);
        }
        let _ = self.conn.damage_destroy(self.damage);
        let _ = self.conn.flush();
    }
}
