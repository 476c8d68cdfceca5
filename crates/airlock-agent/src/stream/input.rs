//! The viewer's input, injected into the display with XTest: pointer motion and
//! buttons, wheel notches, keys by keysym and text as key presses.
//!
//! A keysym is pressed through the keycode the current keyboard mapping gives
//! it. One the mapping lacks (most non-Latin characters) is mapped onto a spare
//! keycode (one with no symbols) for as long as it is used, and restored to
//! nothing after [`SPARE_HOLD`] without use or when the stream ends: clients read
//! a changed mapping lazily, so a mapping undone at once could make them look
//! up a press after it is gone.

use airlock_proto::stream::Control;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::xproto::{
    ConnectionExt as _, Keycode, Keysym, Window, BUTTON_PRESS_EVENT, BUTTON_RELEASE_EVENT,
    KEY_PRESS_EVENT, KEY_RELEASE_EVENT, MOTION_NOTIFY_EVENT,
};
use x11rb::protocol::xtest::ConnectionExt as _;
use x11rb::rust_connection::RustConnection;

const NO_SYMBOL: Keysym = 0;
const SHIFT_L: Keysym = 0xffe1;
const SHIFT_R: Keysym = 0xffe2;
const RETURN: Keysym = 0xff0d;
const TAB: Keysym = 0xff09;

/// How long a spare keycode keeps its keysym after its last use.
pub const SPARE_HOLD: Duration = Duration::from_secs(1);
/// Most wheel notches one message scrolls; the control plane refuses more,
/// and this holds even for a message that reached the guest some other way.
pub const MAX_WHEEL_NOTCHES: u32 = 100;
/// A spare taken over for another keysym waits this long after its last press,
/// for the same reason.
const SPARE_REUSE_GAP: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("connecting to the X display {display}")]
    Connect {
        display: String,
        #[source]
        source: x11rb::errors::ConnectError,
    },
    #[error("the X connection failed")]
    Connection(#[from] x11rb::errors::ConnectionError),
    #[error("the X server refused a request")]
    Reply(#[from] x11rb::errors::ReplyError),
    #[error("the X server lacks the XTEST extension")]
    NoXtest,
    #[error("no spare keycode is left for a keysym the mapping lacks")]
    NoSpare(Keysym),
}

/// The keysym typing `c` produces: Latin-1 as itself, the rest of Unicode in
/// X's Unicode range; newline and tab as their keys. Other control characters
/// have no key and are skipped.
pub fn keysym_of(c: char) -> Option<Keysym> {
    let cp = u32::from(c);
    match c {
        '\n' => Some(RETURN),
        '\t' => Some(TAB),
        _ if cp < 0x20 || (0x7f..0xa0).contains(&cp) => None,
        _ if cp < 0x100 => Some(cp),
        _ => Some(0x0100_0000 + cp),
    }
}

/// How many button clicks a wheel step of `notches` becomes: its size,
/// saturated at [`MAX_WHEEL_NOTCHES`] (`i32::MIN` has no positive twin; its
/// `abs()` wraps in a release build).
pub fn wheel_clicks(notches: i32) -> u32 {
    notches.unsigned_abs().min(MAX_WHEEL_NOTCHES)
}

/// The core keyboard mapping: `per` keysyms for each keycode from `min` up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keymap {
    pub min: Keycode,
    pub per: u8,
    pub syms: Vec<Keysym>,
}

impl Keymap {
    pub fn fetch(conn: &impl Connection) -> Result<Self, InputError> {
        let (min, max) = (conn.setup().min_keycode, conn.setup().max_keycode);
        let r = conn.get_keyboard_mapping(min, max - min + 1)?.reply()?;
        Ok(Keymap {
            min,
            per: r.keysyms_per_keycode,
            syms: r.keysyms,
        })
    }

    fn rows(&self) -> impl Iterator<Item = (Keycode, &[Keysym])> {
        self.syms
            .chunks(usize::from(self.per.max(1)))
            .enumerate()
            .map(|(i, row)| (self.min.saturating_add(i as u8), row))
    }

    /// The keycode that gives `keysym` and the column it is in: 0 (no Shift)
    /// anywhere is preferred over 1 (Shift).
    pub fn find(&self, keysym: Keysym) -> Option<(Keycode, usize)> {
        (0..usize::from(self.per.min(2))).find_map(|col| {
            self.rows()
                .find(|(_, row)| row.get(col) == Some(&keysym))
                .map(|(kc, _)| (kc, col))
        })
    }

    /// The first keysym of `keycode`.
    pub fn first(&self, keycode: Keycode) -> Option<Keysym> {
        self.rows()
            .find(|(kc, _)| *kc == keycode)
            .and_then(|(_, row)| row.first().copied())
    }

    /// Keycodes without any keysym, highest first (the low ones are where
    /// keyboards put real keys).
    pub fn spares(&self) -> Vec<Keycode> {
        let mut v: Vec<Keycode> = self
            .rows()
            .filter(|(_, row)| row.iter().all(|s| *s == NO_SYMBOL))
            .map(|(kc, _)| kc)
            .collect();
        v.reverse();
        v
    }
}

#[derive(Debug)]
struct Spare {
    keycode: Keycode,
    keysym: Keysym,
    used: Instant,
    held: bool,
}

/// Injects [`Control`]s into one display.
#[derive(Debug)]
pub struct Injector {
    conn: RustConnection,
    root: Window,
    /// The button mask after the last pointer message.
    buttons: u8,
    /// Keys down, by the keysym they were pressed for.
    held: HashMap<Keysym, Keycode>,
    spares: Vec<Spare>,
}

impl Injector {
    pub fn connect(display: &str) -> Result<Self, InputError> {
        let (conn, screen) =
            x11rb::connect(Some(display)).map_err(|source| InputError::Connect {
                display: display.to_owned(),
                source,
            })?;
        if conn
            .extension_information(x11rb::protocol::xtest::X11_EXTENSION_NAME)?
            .is_none()
        {
            return Err(InputError::NoXtest);
        }
        let root = conn.setup().roots[screen].root;
        Ok(Injector {
            conn,
            root,
            buttons: 0,
            held: HashMap::new(),
            spares: Vec::new(),
        })
    }

    /// Applies one message and waits until the server has processed it (so
    /// errors surface here, and a query afterwards sees the effect).
    pub fn apply(&mut self, c: &Control) -> Result<(), InputError> {
        match c {
            // Handled elsewhere: the encoder, the clipboard thread, RandR.
            Control::Keyframe
            | Control::Clipboard { .. }
            | Control::Resize { .. }
            | Control::Bitrate { .. } => return Ok(()),
            Control::Pointer { x, y, buttons } => self.pointer(*x, *y, *buttons)?,
            Control::Wheel { dx, dy } => self.wheel(*dx, *dy)?,
            Control::Key { keysym, down } => self.key(*keysym, *down)?,
            Control::Text { text } => self.text(text)?,
        }
        self.sync()
    }

    fn sync(&self) -> Result<(), InputError> {
        self.conn.get_input_focus()?.reply()?;
        Ok(())
    }

    fn fake(&self, kind: u8, detail: u8, x: i16, y: i16) -> Result<(), InputError> {
        self.conn
            .xtest_fake_input(kind, detail, 0, self.root, x, y, 0)?;
        Ok(())
    }

    fn pointer(&mut self, x: u32, y: u32, buttons: u8) -> Result<(), InputError> {
        let clamp = |v: u32| i16::try_from(v).unwrap_or(i16::MAX);
        self.fake(MOTION_NOTIFY_EVENT, 0, clamp(x), clamp(y))?;
        self.set_buttons(buttons)
    }

    fn set_buttons(&mut self, buttons: u8) -> Result<(), InputError> {
        for bit in 0..3u8 {
            let mask = 1 << bit;
            if (buttons ^ self.buttons) & mask != 0 {
                let kind = if buttons & mask != 0 {
                    BUTTON_PRESS_EVENT
                } else {
                    BUTTON_RELEASE_EVENT
                };
                self.fake(kind, bit + 1, 0, 0)?;
            }
        }
        self.buttons = buttons;
        Ok(())
    }

    fn wheel(&mut self, dx: i32, dy: i32) -> Result<(), InputError> {
        // X buttons 4/5 scroll up/down, 6/7 left/right.
        for (notches, back, forward) in [(dy, 4, 5), (dx, 6, 7)] {
            let button = if notches < 0 { back } else { forward };
            for _ in 0..wheel_clicks(notches) {
                self.fake(BUTTON_PRESS_EVENT, button, 0, 0)?;
                self.fake(BUTTON_RELEASE_EVENT, button, 0, 0)?;
            }
        }
        Ok(())
    }

    /// The keycode for `keysym`: a spare already carrying it, else the
    /// mapping's, else a newly mapped spare. The column tells whether Shift
    /// is needed (1) or not (0); `shift_ok` false takes a spare instead of a
    /// keycode that needs Shift.
    fn keycode_for(
        &mut self,
        map: &Keymap,
        keysym: Keysym,
        shift_ok: bool,
    ) -> Result<(Keycode, usize), InputError> {
        let now = Instant::now();
        if let Some(s) = self.spares.iter_mut().find(|s| s.keysym == keysym) {
            s.used = now;
            return Ok((s.keycode, 0));
        }
        match map.find(keysym) {
            Some((_, 1)) if !shift_ok => {}
            Some(found) => return Ok(found),
            None => {}
        }
        let free = map
            .spares()
            .into_iter()
            .find(|kc| !self.spares.iter().any(|s| s.keycode == *kc));
        let keycode = match free {
            Some(kc) => kc,
            None => {
                let (i, used) = self
                    .spares
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !s.held)
                    .min_by_key(|(_, s)| s.used)
                    .map(|(i, s)| (i, s.used))
                    .ok_or(InputError::NoSpare(keysym))?;
                let since = used.elapsed();
                if since < SPARE_REUSE_GAP {
                    self.sync()?;
                    std::thread::sleep(SPARE_REUSE_GAP - since);
                }
                self.spares.swap_remove(i).keycode
            }
        };
        let mut row = vec![NO_SYMBOL; usize::from(map.per.max(2))];
        row[0] = keysym;
        row[1] = keysym;
        self.conn
            .change_keyboard_mapping(1, keycode, row.len() as u8, &row)?;
        self.spares.push(Spare {
            keycode,
            keysym,
            used: Instant::now(),
            held: false,
        });
        Ok((keycode, 0))
    }

    fn key(&mut self, keysym: Keysym, down: bool) -> Result<(), InputError> {
        if down {
            let map = Keymap::fetch(&self.conn)?;
            let (kc, col) = self.keycode_for(&map, keysym, true)?;
            if let Some(s) = self.spares.iter_mut().find(|s| s.keycode == kc) {
                s.held = true;
            }
            // A keysym on the Shift level ('>', 'A') comes from a viewer whose
            // own keyboard may not have needed Shift for it (another layout,
            // or text typed by a program): add Shift around the press when
            // the viewer holds none, as a VNC server does.
            let shift_held = self.held.contains_key(&SHIFT_L) || self.held.contains_key(&SHIFT_R);
            let shift = map.find(SHIFT_L).map(|(kc, _)| kc);
            match (col, shift) {
                (1, Some(shift)) if !shift_held => {
                    self.fake(KEY_PRESS_EVENT, shift, 0, 0)?;
                    self.fake(KEY_PRESS_EVENT, kc, 0, 0)?;
                    self.fake(KEY_RELEASE_EVENT, shift, 0, 0)?;
                }
                _ => self.fake(KEY_PRESS_EVENT, kc, 0, 0)?,
            }
            self.held.insert(keysym, kc);
            return Ok(());
        }
        let kc = match self.held.remove(&keysym) {
            Some(kc) => kc,
            None => match Keymap::fetch(&self.conn)?.find(keysym) {
                Some((kc, _)) => kc,
                None => return Ok(()),
            },
        };
        self.fake(KEY_RELEASE_EVENT, kc, 0, 0)?;
        if let Some(s) = self.spares.iter_mut().find(|s| s.keycode == kc) {
            s.held = false;
            s.used = Instant::now();
        }
        Ok(())
    }

    fn tap(&self, kc: Keycode) -> Result<(), InputError> {
        self.fake(KEY_PRESS_EVENT, kc, 0, 0)?;
        self.fake(KEY_RELEASE_EVENT, kc, 0, 0)
    }

    fn text(&mut self, text: &str) -> Result<(), InputError> {
        let map = Keymap::fetch(&self.conn)?;
        let shift = map.find(SHIFT_L).map(|(kc, _)| kc);
        for c in text.chars() {
            let Some(keysym) = keysym_of(c) else { continue };
            // Column 1 needs Shift; without a Shift key it goes on a spare.
            let (kc, col) = self.keycode_for(&map, keysym, shift.is_some())?;
            match (col, shift) {
                (1, Some(shift)) => {
                    self.fake(KEY_PRESS_EVENT, shift, 0, 0)?;
                    self.tap(kc)?;
                    self.fake(KEY_RELEASE_EVENT, shift, 0, 0)?;
                }
                _ => self.tap(kc)?,
            }
            if let Some(s) = self.spares.iter_mut().find(|s| s.keycode == kc) {
                s.used = Instant::now();
            }
        }
        Ok(())
    }

    /// Gives spares unused for [`SPARE_HOLD`] back (`force`: every spare not
    /// held down), unless someone else has mapped them since.
    pub fn tidy(&mut self, force: bool) -> Result<(), InputError> {
        let due: Vec<usize> = (0..self.spares.len())
            .filter(|i| {
                let s = &self.spares[*i];
                !s.held && (force || s.used.elapsed() >= SPARE_HOLD)
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let map = Keymap::fetch(&self.conn)?;
        for i in due.into_iter().rev() {
            let s = self.spares.swap_remove(i);
            if map.first(s.keycode) == Some(s.keysym) {
                let row = vec![NO_SYMBOL; usize::from(map.per.max(1))];
                self.conn
                    .change_keyboard_mapping(1, s.keycode, row.len() as u8, &row)?;
            }
        }
        self.sync()
    }

    /// Releases every key and button this injector holds and gives back every
    /// spare keycode: a stream that ends must not leave a key down.
    pub fn release_all(&mut self) -> Result<(), InputError> {
        let held: Vec<Keycode> = self.held.drain().map(|(_, kc)| kc).collect();
        for kc in held {
            self.fake(KEY_RELEASE_EVENT, kc, 0, 0)?;
        }
        for s in &mut self.spares {
            s.held = false;
        }
        self.set_buttons(0)?;
        self.tidy(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us_like() -> Keymap {
        // Keycodes 8..=12: nothing, a/A, 1/!, Shift_L, nothing.
        Keymap {
            min: 8,
            per: 2,
            syms: vec![0, 0, 0x61, 0x41, 0x31, 0x21, SHIFT_L, 0, 0, 0],
        }
    }

    #[test]
    fn characters_become_keysyms() {
        assert_eq!(keysym_of('a'), Some(0x61));
        assert_eq!(keysym_of('é'), Some(0xe9));
        assert_eq!(keysym_of('€'), Some(0x0100_20ac));
        assert_eq!(keysym_of('\n'), Some(RETURN));
        assert_eq!(keysym_of('\t'), Some(TAB));
        assert_eq!(keysym_of('\r'), None);
        assert_eq!(keysym_of('\u{7f}'), None);
        assert_eq!(keysym_of('\u{85}'), None);
    }

    #[test]
    fn wheel_steps_are_saturated() {
        assert_eq!(wheel_clicks(0), 0);
        assert_eq!(wheel_clicks(-3), 3);
        assert_eq!(wheel_clicks(7), 7);
        assert_eq!(wheel_clicks(i32::MAX), MAX_WHEEL_NOTCHES);
        // Once 2^31 clicks: the guest's input thread spun for hours.
        assert_eq!(wheel_clicks(i32::MIN), MAX_WHEEL_NOTCHES);
    }

    #[test]
    fn keymap_lookups() {
        let m = us_like();
        assert_eq!(m.find(0x61), Some((9, 0)));
        assert_eq!(m.find(0x41), Some((9, 1)));
        assert_eq!(m.find(0x21), Some((10, 1)));
        assert_eq!(m.find(SHIFT_L), Some((11, 0)));
        assert_eq!(m.find(0x0100_20ac), None);
        assert_eq!(m.spares(), vec![12, 8]);
        assert_eq!(m.first(10), Some(0x31));
        assert_eq!(m.first(99), None);
    }
}
