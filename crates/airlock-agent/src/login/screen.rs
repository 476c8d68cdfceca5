//! What the login command shows: its output with terminal escapes stripped.

/// Terminal output to plain text: CSI, OSC, DCS and other escapes removed;
/// cursor moves that stand for blanks (claude-code draws spaces with
/// `CSI n C` / `CSI n G`) become one space; other C0 controls dropped except
/// line breaks and tabs. Kept across chunks in `pending`.
#[derive(Debug, Default)]
pub struct Stripper {
    state: EscState,
    utf8: Vec<u8>,
    csi: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum EscState {
    #[default]
    Text,
    Esc,
    Csi,
    /// OSC, DCS, SOS, PM, APC: until BEL or ST.
    String,
    StringEsc,
}

impl Stripper {
    pub fn feed(&mut self, bytes: &[u8]) -> String {
        let mut out = Vec::new();
        for &b in bytes {
            match self.state {
                EscState::Text => match b {
                    0x1b => self.state = EscState::Esc,
                    b'\n' | b'\r' | b'\t' => out.push(b),
                    0..=0x1f | 0x7f => {}
                    _ => out.push(b),
                },
                EscState::Esc => {
                    self.state = match b {
                        b'[' => {
                            self.csi.clear();
                            EscState::Csi
                        }
                        b']' | b'P' | b'X' | b'^' | b'_' => EscState::String,
                        _ => EscState::Text,
                    }
                }
                EscState::Csi => {
                    if (0x40..=0x7e).contains(&b) {
                        if b == b'C' || b == b'G' || b == b'H' || b == b'f' {
                            out.push(b' ');
                        }
                        self.state = EscState::Text;
                    } else if self.csi.len() < 64 {
                        self.csi.push(b);
                    }
                }
                EscState::String => match b {
                    0x07 => self.state = EscState::Text,
                    0x1b => self.state = EscState::StringEsc,
                    _ => {}
                },
                EscState::StringEsc => {
                    self.state = if b == b'\\' {
                        EscState::Text
                    } else {
                        EscState::String
                    }
                }
            }
        }
        // Keep an incomplete UTF-8 sequence for the next chunk.
        self.utf8.extend_from_slice(&out);
        let valid_upto = match std::str::from_utf8(&self.utf8) {
            Ok(_) => self.utf8.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.utf8.len(),
        };
        let rest = self.utf8.split_off(valid_upto);
        let text = String::from_utf8_lossy(&self.utf8).into_owned();
        self.utf8 = rest;
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_escapes_and_keeps_urls() {
        let raw = b"\x1b[2GPaste\x1b[8Gcode\r\n\x1b]8;id=x;https://a.example/o?x=1\x07\x1b[38;5;246mhttps://a.example/o?x=1\x1b[39m\x1b]8;;\x07\r\n";
        let mut s = Stripper::default();
        let text = s.feed(raw);
        assert!(text.contains("Paste code"), "{text:?}");
        assert!(text.contains("https://a.example/o?x=1\r\n"), "{text:?}");
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn utf8_split_across_chunks() {
        let mut s = Stripper::default();
        let bytes = "╭─╮".as_bytes();
        let a = s.feed(&bytes[..2]);
        let b = s.feed(&bytes[2..]);
        assert_eq!(format!("{a}{b}"), "╭─╮");
    }
}
