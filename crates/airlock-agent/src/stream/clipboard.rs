//! The guest's clipboard, through X selections: text from the viewer is put on
//! `CLIPBOARD` and `PRIMARY` (so Ctrl+V in Chromium and Shift+Insert or the
//! middle button in the terminal paste it), and new text on `CLIPBOARD` goes
//! back to the viewer.
//!
//! An X selection is not stored anywhere: its owner, a client, answers every
//! request for it. So the text the viewer sent lives in this process, which
//! answers for it until another client takes the selection (someone copies in
//! the guest) or the process ends. XFixes tells us when the owner changes;
//! then we ask the new owner for `UTF8_STRING` and read the answer.
//!
//! Text only, at most [`MAX_CLIPBOARD_BYTES`]; a larger selection, or one its
//! owner hands over in pieces (`INCR`, which X programs use for texts larger
//! than a request), is not read (logged).
//!
//! Used by `capture` (one thread, its own connection) and by
//! `airlock-agent clipboard get|set`.

use airlock_proto::stream::MAX_CLIPBOARD_BYTES;
use std::time::{Duration, Instant};
use x11rb::connection::Connection;
use x11rb::protocol::xfixes::{ConnectionExt as _, SelectionEventMask};
use x11rb::protocol::xproto::{
    Atom, AtomEnum, ConnectionExt as _, CreateWindowAux, EventMask, PropMode, SelectionNotifyEvent,
    SelectionRequestEvent, Window, WindowClass, SELECTION_NOTIFY_EVENT,
};
use x11rb::protocol::Event;
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;
use x11rb::{CURRENT_TIME, NONE};

#[derive(Debug, thiserror::Error)]
pub enum ClipboardError {
    #[error("connecting to the X display {display}")]
    Display {
        display: String,
        #[source]
        source: x11rb::errors::ConnectError,
    },
    #[error("the X connection failed")]
    X(#[from] x11rb::errors::ConnectionError),
    #[error("an X request failed")]
    Reply(#[from] x11rb::errors::ReplyError),
    #[error("an X request could not be made")]
    Id(#[from] x11rb::errors::ReplyOrIdError),
    #[error("the X server has no XFixes: clipboard changes cannot be followed")]
    NoXfixes,
    #[error("clipboard text of {0} bytes is larger than {MAX_CLIPBOARD_BYTES}")]
    TooLarge(usize),
    #[error("another program took the selection at once")]
    NotOwner,
}

struct Atoms {
    clipboard: Atom,
    utf8: Atom,
    text: Atom,
    text_plain: Atom,
    targets: Atom,
    incr: Atom,
    /// The property on our window a selection's text is delivered to.
    landing: Atom,
}

/// What an X event meant for the clipboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Another program put this text on `CLIPBOARD`.
    Text(String),
    /// Another program took `CLIPBOARD` from us.
    Lost,
}

/// One connection's view of the clipboard.
pub struct Clipboard {
    conn: RustConnection,
    window: Window,
    atoms: Atoms,
    /// The text we answer for while we own the selections.
    owned: Option<String>,
}

impl std::fmt::Debug for Clipboard {
    /// Never the text: it may be a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clipboard")
            .field("window", &self.window)
            .field("owns", &self.owned.is_some())
            .finish()
    }
}

fn intern(conn: &RustConnection, name: &str) -> Result<Atom, ClipboardError> {
    Ok(conn.intern_atom(false, name.as_bytes())?.reply()?.atom)
}

impl Clipboard {
    pub fn connect(display: &str) -> Result<Self, ClipboardError> {
        let (conn, screen) =
            x11rb::connect(Some(display)).map_err(|source| ClipboardError::Display {
                display: display.to_owned(),
                source,
            })?;
        let root = conn.setup().roots[screen].root;
        let window = conn.generate_id()?;
        // A window nobody sees, as the owner and the requestor.
        conn.create_window(
            0,
            window,
            root,
            0,
            0,
            1,
            1,
            0,
            WindowClass::INPUT_ONLY,
            0,
            &CreateWindowAux::new().event_mask(EventMask::PROPERTY_CHANGE),
        )?;
        let atoms = Atoms {
            clipboard: intern(&conn, "CLIPBOARD")?,
            utf8: intern(&conn, "UTF8_STRING")?,
            text: intern(&conn, "TEXT")?,
            text_plain: intern(&conn, "text/plain;charset=utf-8")?,
            targets: intern(&conn, "TARGETS")?,
            incr: intern(&conn, "INCR")?,
            landing: intern(&conn, "AIRLOCK_CLIPBOARD")?,
        };
        let xfixes = conn
            .xfixes_query_version(5, 0)
            .ok()
            .and_then(|c| c.reply().ok())
            .is_some_and(|v| v.major_version >= 1);
        if !xfixes {
            return Err(ClipboardError::NoXfixes);
        }
        conn.xfixes_select_selection_input(
            window,
            atoms.clipboard,
            SelectionEventMask::SET_SELECTION_OWNER
                | SelectionEventMask::SELECTION_WINDOW_DESTROY
                | SelectionEventMask::SELECTION_CLIENT_CLOSE,
        )?;
        conn.flush()?;
        Ok(Clipboard {
            conn,
            window,
            atoms,
            owned: None,
        })
    }

    pub fn connection(&self) -> &RustConnection {
        &self.conn
    }

    /// Whether we answer for the selections now.
    pub fn owns(&self) -> bool {
        self.owned.is_some()
    }

    /// Take `CLIPBOARD` and `PRIMARY` with `text`.
    pub fn set(&mut self, text: String) -> Result<(), ClipboardError> {
        if text.len() > MAX_CLIPBOARD_BYTES {
            return Err(ClipboardError::TooLarge(text.len()));
        }
        for selection in [self.atoms.clipboard, AtomEnum::PRIMARY.into()] {
            self.conn
                .set_selection_owner(self.window, selection, CURRENT_TIME)?;
        }
        let owner = self
            .conn
            .get_selection_owner(self.atoms.clipboard)?
            .reply()?
            .owner;
        if owner != self.window {
            return Err(ClipboardError::NotOwner);
        }
        self.owned = Some(text);
        Ok(())
    }

    /// Ask the owner of `CLIPBOARD` for its text; the answer comes as an
    /// event ([`Clipboard::handle`] returns it).
    pub fn ask(&self) -> Result<(), ClipboardError> {
        self.conn.convert_selection(
            self.window,
            self.atoms.clipboard,
            self.atoms.utf8,
            self.atoms.landing,
            CURRENT_TIME,
        )?;
        self.conn.flush()?;
        Ok(())
    }

    /// Whether some program owns `CLIPBOARD`.
    pub fn has_owner(&self) -> Result<bool, ClipboardError> {
        let owner = self
            .conn
            .get_selection_owner(self.atoms.clipboard)?
            .reply()?
            .owner;
        Ok(owner != NONE)
    }

    /// Deal with one X event of this connection.
    pub fn handle(&mut self, event: &Event) -> Result<Option<Change>, ClipboardError> {
        match event {
            Event::XfixesSelectionNotify(e) if e.selection == self.atoms.clipboard => {
                if e.owner == self.window {
                    return Ok(None);
                }
                let lost = self.owned.take().is_some();
                if e.owner != NONE {
                    self.ask()?;
                }
                Ok(lost.then_some(Change::Lost))
            }
            Event::SelectionClear(e) if e.selection == self.atoms.clipboard => {
                Ok(self.owned.take().map(|_| Change::Lost))
            }
            Event::SelectionRequest(e) => {
                self.answer(e)?;
                Ok(None)
            }
            Event::SelectionNotify(e)
                if e.selection == self.atoms.clipboard && e.requestor == self.window =>
            {
                if e.property == NONE {
                    return Ok(None);
                }
                self.read().map(|t| t.map(Change::Text))
            }
            _ => Ok(None),
        }
    }

    /// The text delivered to our window, `None` when it is not text we take.
    fn read(&self) -> Result<Option<String>, ClipboardError> {
        // One more than the limit tells "too large" from "just fits".
        let words = (MAX_CLIPBOARD_BYTES / 4 + 1) as u32;
        let reply = self
            .conn
            .get_property(
                true,
                self.window,
                self.atoms.landing,
                AtomEnum::ANY,
                0,
                words,
            )?
            .reply()?;
        self.conn.flush()?;
        if reply.type_ == self.atoms.incr {
            tracing::warn!("the clipboard's owner sends its text in pieces (INCR); not read");
            return Ok(None);
        }
        if reply.bytes_after > 0 || reply.value.len() > MAX_CLIPBOARD_BYTES {
            tracing::warn!(
                bytes = reply.value.len() + reply.bytes_after as usize,
                "the clipboard's text is larger than {MAX_CLIPBOARD_BYTES} bytes; not read"
            );
            return Ok(None);
        }
        if reply.format != 8 {
            return Ok(None);
        }
        Ok(Some(String::from_utf8_lossy(&reply.value).into_owned()))
    }

    /// Answer another program's request for the selection we own.
    fn answer(&self, e: &SelectionRequestEvent) -> Result<(), ClipboardError> {
        // Old clients name no property: the target is the property then.
        let property = if e.property == NONE {
            e.target
        } else {
            e.property
        };
        let ours =
            e.selection == self.atoms.clipboard || e.selection == u32::from(AtomEnum::PRIMARY);
        let delivered = match (&self.owned, ours) {
            (Some(text), true) => self.deliver(e.requestor, property, e.target, text)?,
            _ => false,
        };
        let notify = SelectionNotifyEvent {
            response_type: SELECTION_NOTIFY_EVENT,
            sequence: 0,
            time: e.time,
            requestor: e.requestor,
            selection: e.selection,
            target: e.target,
            property: if delivered { property } else { NONE },
        };
        self.conn
            .send_event(false, e.requestor, EventMask::NO_EVENT, notify)?;
        self.conn.flush()?;
        Ok(())
    }

    fn deliver(
        &self,
        requestor: Window,
        property: Atom,
        target: Atom,
        text: &str,
    ) -> Result<bool, ClipboardError> {
        let a = &self.atoms;
        if target == a.targets {
            let targets = [
                a.targets,
                a.utf8,
                a.text_plain,
                a.text,
                AtomEnum::STRING.into(),
            ];
            self.conn.change_property32(
                PropMode::REPLACE,
                requestor,
                property,
                AtomEnum::ATOM,
                &targets,
            )?;
        } else if target == a.utf8 || target == a.text_plain || target == a.text {
            let type_ = if target == a.text { a.utf8 } else { target };
            self.conn.change_property8(
                PropMode::REPLACE,
                requestor,
                property,
                type_,
                text.as_bytes(),
            )?;
        } else if target == u32::from(AtomEnum::STRING) {
            self.conn.change_property8(
                PropMode::REPLACE,
                requestor,
                property,
                AtomEnum::STRING,
                &latin1(text),
            )?;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// Wait at most `wait` for the next event.
    pub fn next_event(&self, wait: Duration) -> Result<Option<Event>, ClipboardError> {
        if let Some(e) = self.conn.poll_for_event()? {
            return Ok(Some(e));
        }
        poll_fd(&self.conn, wait);
        Ok(self.conn.poll_for_event()?)
    }
}

/// `STRING` is Latin-1: characters beyond it become `?`.
fn latin1(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
        .collect()
}

/// Blocks until the X connection has something to read or `wait` passed.
#[allow(unsafe_code)]
fn poll_fd(conn: &RustConnection, wait: Duration) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: conn.stream().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut fd, 1, ms);
    }
}

/// `capture`'s clipboard thread: puts the viewer's text on the selections
/// (`incoming`) and hands new guest text to `outgoing`, until `stop` is set.
/// The text that is on the clipboard when it starts goes out too.
pub fn run(
    display: &str,
    incoming: std::sync::mpsc::Receiver<String>,
    outgoing: &dyn Fn(String),
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), ClipboardError> {
    let mut clip = Clipboard::connect(display)?;
    if clip.has_owner()? {
        clip.ask()?;
    }
    let mut last_out: Option<String> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        loop {
            match incoming.try_recv() {
                Ok(text) => {
                    let bytes = text.len();
                    match clip.set(text.clone()) {
                        Ok(()) => {
                            tracing::info!(bytes, "the viewer's text is on the clipboard");
                            // What the viewer sent is not sent back to it.
                            last_out = Some(text);
                        }
                        Err(e) => {
                            tracing::warn!(error = %crate::chain(&e), "clipboard not set")
                        }
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        if let Some(event) = clip.next_event(Duration::from_millis(50))? {
            if let Some(Change::Text(text)) = clip.handle(&event)? {
                if last_out.as_deref() != Some(text.as_str()) {
                    tracing::info!(bytes = text.len(), "the guest's clipboard changed");
                    last_out = Some(text.clone());
                    outgoing(text);
                }
            }
        }
    }
    Ok(())
}

pub const USAGE: &str = "usage: airlock-agent clipboard get | set [--hold SECONDS]\n\n\
  get  prints the text on the display's CLIPBOARD selection ($DISPLAY, default :0)\n\
  set  puts standard input (UTF-8, at most 1 MiB) on CLIPBOARD and PRIMARY and\n\
       answers for it until another program takes it or --hold seconds passed\n\
       (default 600)\n";

const GET_WAIT: Duration = Duration::from_secs(3);
const DEFAULT_HOLD: Duration = Duration::from_secs(600);

/// `airlock-agent clipboard …`.
pub fn main(args: &[&str]) -> Result<(), String> {
    let display = std::env::var("DISPLAY")
        .ok()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| ":0".into());
    let err = |e: ClipboardError| crate::chain(&e);
    match args {
        ["get"] => {
            let mut clip = Clipboard::connect(&display).map_err(err)?;
            if !clip.has_owner().map_err(err)? {
                return Err("the clipboard is empty".into());
            }
            clip.ask().map_err(err)?;
            let deadline = Instant::now() + GET_WAIT;
            while Instant::now() < deadline {
                let Some(event) = clip.next_event(Duration::from_millis(100)).map_err(err)? else {
                    continue;
                };
                if let Event::SelectionNotify(e) = &event {
                    if e.property == NONE {
                        return Err("the clipboard's owner has no text".into());
                    }
                }
                if let Some(Change::Text(text)) = clip.handle(&event).map_err(err)? {
                    print!("{text}");
                    return Ok(());
                }
                if matches!(event, Event::SelectionNotify(_)) {
                    return Err("the clipboard's text could not be read".into());
                }
            }
            Err("the clipboard's owner did not answer".into())
        }
        ["set", rest @ ..] => {
            let hold = match rest {
                [] => DEFAULT_HOLD,
                ["--hold", s] => Duration::from_secs(
                    s.parse()
                        .map_err(|_| format!("--hold takes seconds\n\n{USAGE}"))?,
                ),
                _ => return Err(USAGE.into()),
            };
            let mut text = Vec::new();
            use std::io::Read;
            std::io::stdin()
                .take(MAX_CLIPBOARD_BYTES as u64 + 1)
                .read_to_end(&mut text)
                .map_err(|e| format!("reading standard input: {e}"))?;
            let text = String::from_utf8(text).map_err(|_| "the text is not UTF-8".to_owned())?;
            let mut clip = Clipboard::connect(&display).map_err(err)?;
            clip.set(text).map_err(err)?;
            clip.connection().flush().map_err(|e| e.to_string())?;
            let deadline = Instant::now() + hold;
            while Instant::now() < deadline && clip.owns() {
                if let Some(event) = clip.next_event(Duration::from_millis(200)).map_err(err)? {
                    clip.handle(&event).map_err(err)?;
                }
            }
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin1_keeps_what_it_can() {
        assert_eq!(latin1("aé€"), vec![b'a', 0xe9, b'?']);
    }
}
