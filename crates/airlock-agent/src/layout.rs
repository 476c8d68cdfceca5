//! Keeps the desktop tiled when its size changes: the terminal on the left half,
//! Chromium on the right. The viewer resizes the remote display to fit the
//! user's window (RandR); without this the windows would keep their old size
//! and leave bare strips. Only a resize re-tiles: windows the user opens or
//! moves are left alone otherwise.

use std::time::Duration;
use x11rb::connection::Connection;
use x11rb::protocol::randr::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{
    AtomEnum, ChangeWindowAttributesAux, ClientMessageEvent, ConnectionExt as _, EventMask, Window,
};
use x11rb::protocol::Event;

const DISPLAY: &str = ":0";
/// 0xRRGGBB on the 24-bit TrueColor visual Xvnc serves.
const ROOT_BACKGROUND: u32 = 0x00e5_e7eb;

/// What to place where, by the window's WM_CLASS class name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Left,
    Right,
}

fn slot_for(class: &str) -> Option<Slot> {
    match class.to_ascii_lowercase().as_str() {
        "xterm" => Some(Slot::Left),
        "chromium" | "chromium-browser" => Some(Slot::Right),
        _ => None,
    }
}

/// The rectangle (x, y, width, height) of a slot on a `width`×`height` screen.
fn rect(slot: Slot, width: u16, height: u16) -> (u32, u32, u32, u32) {
    let left = u32::from(width) / 2;
    match slot {
        Slot::Left => (0, 0, left, u32::from(height)),
        Slot::Right => (left, 0, u32::from(width) - left, u32::from(height)),
    }
}

/// Run until killed, reconnecting when the display server restarts.
pub fn run() -> Result<(), String> {
    loop {
        if let Err(e) = watch() {
            tracing::warn!(error = %e, "display connection ended; reconnecting");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn watch() -> Result<(), Box<dyn std::error::Error>> {
    let (conn, screen_num) = x11rb::connect(Some(DISPLAY))?;
    let root = conn.setup().roots[screen_num].root;
    // A quiet grey instead of X's black wherever no window covers the screen
    // (e.g. below the terminal, which sizes itself in whole text rows).
    conn.change_window_attributes(
        root,
        &ChangeWindowAttributesAux::new().background_pixel(ROOT_BACKGROUND),
    )?;
    conn.clear_area(false, root, 0, 0, 0, 0)?;
    conn.randr_select_input(root, randr::NotifyMask::SCREEN_CHANGE)?;
    conn.flush()?;
    tracing::info!("watching the display for resizes");
    loop {
        if let Event::RandrScreenChangeNotify(ev) = conn.wait_for_event()? {
            // RandR reports the size in the screen's rotation; the desktop never rotates.
            tile(&conn, root, ev.width, ev.height)?;
        }
    }
}

fn atom(conn: &impl Connection, name: &str) -> Result<u32, Box<dyn std::error::Error>> {
    Ok(conn.intern_atom(false, name.as_bytes())?.reply()?.atom)
}

fn tile(
    conn: &impl Connection,
    root: Window,
    width: u16,
    height: u16,
) -> Result<(), Box<dyn std::error::Error>> {
    let client_list = atom(conn, "_NET_CLIENT_LIST")?;
    let moveresize = atom(conn, "_NET_MOVERESIZE_WINDOW")?;
    let windows = conn
        .get_property(false, root, client_list, AtomEnum::WINDOW, 0, 1024)?
        .reply()?;
    let Some(windows) = windows.value32() else {
        return Ok(());
    };
    for window in windows.collect::<Vec<_>>() {
        let class = conn
            .get_property(false, window, AtomEnum::WM_CLASS, AtomEnum::STRING, 0, 256)?
            .reply()?;
        // WM_CLASS is "instance\0Class\0".
        let Some(name) = class.value.split(|b| *b == 0).nth(1) else {
            continue;
        };
        let Some(slot) = slot_for(&String::from_utf8_lossy(name)) else {
            continue;
        };
        let (x, y, w, h) = rect(slot, width, height);
        // EWMH: gravity north-west (1), x/y/width/height given (bits 8–11),
        // source "pager" (bit 13): the window manager applies it as asked.
        let flags = 1 | (0xf << 8) | (2 << 12);
        let event = ClientMessageEvent::new(32, window, moveresize, [flags, x, y, w, h]);
        conn.send_event(
            false,
            root,
            EventMask::SUBSTRUCTURE_REDIRECT | EventMask::SUBSTRUCTURE_NOTIFY,
            event,
        )?;
    }
    conn.flush()?;
    tracing::info!(width, height, "re-tiled the desktop");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_cover_the_screen_exactly() {
        for (w, h) in [(1280u16, 800u16), (1025, 700), (321, 241)] {
            let (lx, _, lw, lh) = rect(Slot::Left, w, h);
            let (rx, _, rw, _) = rect(Slot::Right, w, h);
            assert_eq!(lx, 0);
            assert_eq!(rx, lw);
            assert_eq!(lw + rw, u32::from(w));
            assert_eq!(lh, u32::from(h));
        }
    }

    #[test]
    fn only_the_two_desktop_programs_are_placed() {
        assert_eq!(slot_for("XTerm"), Some(Slot::Left));
        assert_eq!(slot_for("Chromium"), Some(Slot::Right));
        assert_eq!(slot_for("Gimp"), None);
    }
}
