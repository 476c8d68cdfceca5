//! The pointer's picture, through XFixes: read when the X server says it
//! changed, sent to the viewer to draw (the grabbed screen has no pointer).

use airlock_proto::stream::{CursorImage, MAX_CURSOR_SIDE};
use x11rb::connection::Connection;
use x11rb::protocol::xfixes::{ConnectionExt as _, CursorNotifyMask};
use x11rb::protocol::Event;

/// Asks for cursor-change events on `root`; `false` without XFixes 2.
pub fn watch(conn: &impl Connection, root: u32) -> bool {
    let has = conn
        .xfixes_query_version(4, 0)
        .ok()
        .and_then(|c| c.reply().ok())
        .is_some_and(|v| v.major_version >= 2);
    has && conn
        .xfixes_select_cursor_input(root, CursorNotifyMask::DISPLAY_CURSOR)
        .is_ok()
}

pub fn is_change(event: &Event) -> bool {
    matches!(event, Event::XfixesCursorNotify(_))
}

/// The pointer's picture now; `None` (logged) when it cannot be read or is
/// larger than a viewer shows.
pub fn current(conn: &impl Connection) -> Option<CursorImage> {
    let img = match conn.xfixes_get_cursor_image().map(|c| c.reply()) {
        Ok(Ok(img)) => img,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "the cursor image was not read");
            return None;
        }
        Err(e) => {
            tracing::debug!(error = %e, "the cursor image was not read");
            return None;
        }
    };
    if img.width > MAX_CURSOR_SIDE || img.height > MAX_CURSOR_SIDE {
        tracing::debug!(
            width = img.width,
            height = img.height,
            "a cursor too large to send"
        );
        return None;
    }
    let expected = usize::from(img.width) * usize::from(img.height);
    if img.cursor_image.len() != expected {
        return None;
    }
    Some(CursorImage {
        width: img.width,
        height: img.height,
        xhot: img.xhot.min(img.width.saturating_sub(1)),
        yhot: img.yhot.min(img.height.saturating_sub(1)),
        rgba: to_rgba(&img.cursor_image),
    })
}

/// XFixes gives premultiplied ARGB, one `u32` a pixel; browsers want
/// straight RGBA bytes.
fn to_rgba(argb: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(argb.len() * 4);
    for &p in argb {
        let [a, r, g, b] = p.to_be_bytes();
        let straight = |c: u8| match a {
            0 => 0,
            255 => c,
            _ => ((u32::from(c) * 255 + u32::from(a) / 2) / u32::from(a)).min(255) as u8,
        };
        out.extend_from_slice(&[straight(r), straight(g), straight(b), a]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn premultiplied_argb_becomes_straight_rgba() {
        assert_eq!(
            to_rgba(&[0xff10_2030, 0x0000_0000, 0x8040_2000]),
            vec![0x10, 0x20, 0x30, 0xff, 0, 0, 0, 0, 0x80, 0x40, 0, 0x80]
        );
    }
}
