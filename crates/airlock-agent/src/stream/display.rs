//! The display follows the viewer's window: RandR 1.2 on Xvnc, the way
//! `xrandr --newmode`, `--addmode` and `--output … --mode` do it. A size Xvnc
//! does not list yet becomes a new mode of its one output; the screen and the
//! output's CRTC take it. The capture loop sees the new size (RandR's screen
//! change event) and starts a new stream description and keyframe, and the
//! agent's `layout` re-tiles the windows.

use airlock_proto::stream::{MAX_DISPLAY, MIN_DISPLAY};
use x11rb::connection::Connection;
use x11rb::protocol::randr::{self, ConnectionExt as _, ModeFlag, ModeInfo};
use x11rb::CURRENT_TIME;

#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    #[error("connecting to the X display {display}")]
    Display {
        display: String,
        #[source]
        source: x11rb::errors::ConnectError,
    },
    #[error("the X connection failed")]
    X(#[from] x11rb::errors::ConnectionError),
    #[error("a RandR request failed")]
    Reply(#[from] x11rb::errors::ReplyError),
    #[error("the display has no RandR 1.2")]
    NoRandr,
    #[error("the display has no output with a CRTC to resize")]
    NoOutput,
    #[error("the display refused the new configuration ({0:?})")]
    Refused(randr::SetConfig),
}

/// The size a viewer's request becomes: within the bounds, even (x264 takes
/// even sizes only).
pub fn bounded(width: u32, height: u32) -> (u16, u16) {
    let w = width.clamp(MIN_DISPLAY.0, MAX_DISPLAY.0) & !1;
    let h = height.clamp(MIN_DISPLAY.1, MAX_DISPLAY.1) & !1;
    (w as u16, h as u16)
}

/// A mode's timings for a virtual display: only the size matters; the clock
/// says 60 Hz.
fn mode_info(width: u16, height: u16, name: &str) -> ModeInfo {
    ModeInfo {
        id: 0,
        width,
        height,
        dot_clock: u32::from(width) * u32::from(height) * 60,
        hsync_start: width,
        hsync_end: width,
        htotal: width,
        hskew: 0,
        vsync_start: height,
        vsync_end: height,
        vtotal: height,
        name_len: name.len() as u16,
        mode_flags: ModeFlag::from(0u32),
    }
}

/// Resize the display to `width`×`height` (bounded); returns the size set.
pub fn fit(display: &str, width: u32, height: u32) -> Result<(u16, u16), DisplayError> {
    let (w, h) = bounded(width, height);
    let (conn, screen) = x11rb::connect(Some(display)).map_err(|source| DisplayError::Display {
        display: display.to_owned(),
        source,
    })?;
    let root = conn.setup().roots[screen].root;
    let v = conn.randr_query_version(1, 2)?.reply()?;
    if (v.major_version, v.minor_version) < (1, 2) {
        return Err(DisplayError::NoRandr);
    }
    let geometry = x11rb::protocol::xproto::ConnectionExt::get_geometry(&conn, root)?.reply()?;
    if (geometry.width, geometry.height) == (w, h) {
        return Ok((w, h));
    }
    let res = conn.randr_get_screen_resources_current(root)?.reply()?;
    // The first output that drives a CRTC (Xvnc has one, VNC-0).
    let mut target = None;
    for &output in &res.outputs {
        let info = conn
            .randr_get_output_info(output, res.config_timestamp)?
            .reply()?;
        if info.crtc != 0 {
            target = Some((output, info.crtc, info.modes));
            break;
        }
    }
    let (output, crtc, modes) = target.ok_or(DisplayError::NoOutput)?;
    let name = format!("{w}x{h}");
    // A mode of that size the output already has, or a new one.
    let known = res
        .modes
        .iter()
        .find(|m| m.width == w && m.height == h && modes.contains(&m.id))
        .map(|m| m.id);
    let mode = match known {
        Some(id) => id,
        None => {
            let id = conn
                .randr_create_mode(root, mode_info(w, h, &name), name.as_bytes())?
                .reply()?
                .mode;
            conn.randr_add_output_mode(output, id)?;
            id
        }
    };
    // The CRTC must fit in the screen at every step: off, resize, on.
    let off = conn
        .randr_set_crtc_config(
            crtc,
            CURRENT_TIME,
            res.config_timestamp,
            0,
            0,
            0,
            randr::Rotation::ROTATE0,
            &[],
        )?
        .reply()?;
    if off.status != randr::SetConfig::SUCCESS {
        return Err(DisplayError::Refused(off.status));
    }
    // 96 dots per inch, what X assumes.
    let mm = |px: u16| (u32::from(px) * 254 / 960).max(1);
    conn.randr_set_screen_size(root, w, h, mm(w), mm(h))?;
    let on = conn
        .randr_set_crtc_config(
            crtc,
            CURRENT_TIME,
            res.config_timestamp,
            0,
            0,
            mode,
            randr::Rotation::ROTATE0,
            &[output],
        )?
        .reply()?;
    if on.status != randr::SetConfig::SUCCESS {
        return Err(DisplayError::Refused(on.status));
    }
    conn.flush()?;
    Ok((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bounded_and_even() {
        assert_eq!(bounded(1001, 701), (1000, 700));
        assert_eq!(bounded(10, 10), (640, 480));
        assert_eq!(bounded(100_000, 100_000), (3840, 2160));
    }
}
