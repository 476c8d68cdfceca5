//! What the login command shows, read as a terminal would draw it.
//!
//! The PTY's bytes go through a terminal emulator (the `vt100` crate): colour
//! codes, cursor moves, erased and redrawn lines end up as cells on a screen,
//! the way the user would see them. Prompts and URLs are looked for in that
//! screen, not in the bytes: a TUI that draws a word, moves the cursor back
//! and draws over it shows the second word only, and a URL wrapped onto two
//! rows reads as one line again.
//!
//! Rows that scroll off the top are kept as plain text (the last
//! [`HISTORY_BYTES`]), so a URL printed just before a burst of output is
//! still found, and a failure can quote the command's last words.

use std::collections::VecDeque;
use vt100::capture::{basic_formatted_to_plain, BasicFormattedCaptureState, RowContents};

/// How much of the text scrolled off the top is kept.
pub const HISTORY_BYTES: usize = 16 * 1024;
/// How many OSC 8 hyperlink targets are kept (the latest).
const MAX_LINKS: usize = 32;
/// Longest OSC 8 target kept.
const MAX_LINK_BYTES: usize = 8192;

/// A terminal screen fed with a command's output.
pub struct Screen {
    parser: vt100::Parser<Seen>,
}

impl std::fmt::Debug for Screen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (rows, cols) = self.parser.screen().size();
        f.debug_struct("Screen")
            .field("rows", &rows)
            .field("cols", &cols)
            .finish_non_exhaustive()
    }
}

/// What the emulator reports besides the cells: rows leaving the screen and
/// hyperlinks.
#[derive(Default)]
struct Seen {
    /// Plain text of the rows that scrolled off, wrapped rows joined.
    history: String,
    capture: BasicFormattedCaptureState,
    /// Targets of OSC 8 hyperlinks (`ESC ] 8 ; params ; URI ST`), oldest first.
    links: VecDeque<String>,
}

impl vt100::Callbacks for Seen {
    fn on_scroll(&mut self, row: RowContents<'_>, alternate_screen: bool) {
        if alternate_screen {
            return; // a full-screen TUI's frames: nothing worth keeping
        }
        let mut formatted = String::new();
        if row
            .write_formatted_basic(&mut formatted, &mut self.capture)
            .is_err()
        {
            return;
        }
        self.history
            .extend(basic_formatted_to_plain(&formatted).map(|s| s.to_owned()));
        if self.history.len() > HISTORY_BYTES {
            let mut cut = self.history.len() - HISTORY_BYTES;
            while !self.history.is_char_boundary(cut) {
                cut += 1;
            }
            self.history.drain(..cut);
        }
    }

    fn unhandled_osc(&mut self, _: &mut vt100::Screen, params: &[&[u8]]) {
        // `8 ; params ; URI`: the URI may itself hold ';', split off as more params.
        let [b"8", _, uri @ ..] = params else {
            return;
        };
        let uri = uri.join(&b';');
        if uri.is_empty() || uri.len() > MAX_LINK_BYTES {
            return; // an empty URI closes the link
        }
        let Ok(uri) = String::from_utf8(uri) else {
            return;
        };
        if self.links.back() != Some(&uri) {
            if self.links.len() == MAX_LINKS {
                self.links.pop_front();
            }
            self.links.push_back(uri);
        }
    }
}

/// The screen as plain text at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drawn {
    /// The rows that scrolled off, then the visible ones: one line per
    /// logical line (a row the terminal wrapped is joined with the next),
    /// trailing blanks and blank rows at the bottom left out.
    pub text: String,
    /// Where in `text` the visible screen starts.
    pub visible_from: usize,
    /// Where in `text` output would go on, if the cursor sits right after the
    /// last thing drawn on its row: text ending there may be incomplete.
    pub cursor: Option<usize>,
    /// Targets of the hyperlinks drawn (OSC 8), oldest first.
    pub links: Vec<String>,
}

impl Drawn {
    /// Only what is on the screen now.
    pub fn visible(&self) -> &str {
        &self.text[self.visible_from..]
    }
}

impl Screen {
    pub fn new(rows: u16, cols: u16) -> Screen {
        let size =
            |n: u16| std::num::NonZeroU16::new(n.max(1)).unwrap_or(std::num::NonZeroU16::MIN);
        // No scrollback inside the emulator: rows leaving the screen go to
        // `Seen::on_scroll` as text instead of being kept as cells.
        Screen {
            parser: vt100::Parser::new_with_callbacks(size(rows), size(cols), 0, Seen::default()),
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.parser.process(bytes);
    }

    pub fn drawn(&self) -> Drawn {
        let screen = self.parser.screen();
        let seen = self.parser.callbacks();
        let mut text = seen.history.clone();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        let visible_from = text.len();
        let (_, cols) = screen.size();
        let cols = cols.get();
        let (crow, ccol) = screen.cursor_position();
        let mut cursor = None;
        for (i, row) in screen.rows(0, cols).enumerate() {
            let i = u16::try_from(i).unwrap_or(u16::MAX);
            text.push_str(&row);
            if i == crow && at_end_of_row(screen, crow, ccol, cols) {
                cursor = Some(text.len());
            }
            if !screen.row_wrapped(i) {
                text.push('\n');
            }
        }
        let keep = text
            .trim_end()
            .len()
            .max(visible_from)
            .max(cursor.unwrap_or(0));
        text.truncate(keep);
        Drawn {
            text,
            visible_from,
            cursor,
            links: seen.links.iter().cloned().collect(),
        }
    }
}

/// Whether the cursor sits right after the last cell drawn on its row (or on
/// the last column, where the next character would wrap).
fn at_end_of_row(screen: &vt100::Screen, row: u16, col: u16, cols: u16) -> bool {
    let drawn = |c: u16| screen.cell(row, c).is_some_and(|cell| cell.has_contents());
    if col + 1 >= cols && drawn(cols - 1) {
        return true;
    }
    col > 0 && drawn(col - 1) && !(col..cols).any(drawn)
}

/// Runs of whitespace as one space, none at either end.
pub fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The last 300 characters of `text`, whitespace collapsed.
pub fn last_words(text: &str) -> String {
    let text = collapse(text);
    let n = text.chars().count();
    let s: String = text.chars().skip(n.saturating_sub(300)).collect();
    if s.is_empty() {
        "(none)".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drawn(cols: u16, rows: u16, chunks: &[&[u8]]) -> Drawn {
        let mut s = Screen::new(rows, cols);
        for c in chunks {
            s.feed(c);
        }
        s.drawn()
    }

    #[test]
    fn colour_codes_and_cursor_moves_are_drawn_not_read() {
        // claude-code draws blanks as cursor moves (`CSI n C`, `CSI n G`).
        let d = drawn(
            80,
            10,
            &[b"\x1b[2GPaste\x1b[8Gcode\x1b[1C\x1b[1mhere\x1b[0m\r\n\x1b[38;5;246mok\x1b[39m\r\n"],
        );
        assert_eq!(d.text, " Paste code here\nok", "{d:?}");
        assert!(!d.text.contains('\x1b'));
    }

    #[test]
    fn text_drawn_over_is_gone() {
        // A spinner line rewritten in place, and a prompt replaced by the next
        // one on the same rows (Ink erases lines and draws again).
        let d = drawn(
            80,
            10,
            &[
                b"Loading |\rLoading /\rLoading -\r\n",
                b"Do you trust the files in this folder?\r\n> Yes\r\n",
                b"\x1b[2A\x1b[2K\x1b[1GHow would you like to authenticate?\r\n\x1b[2K> Google\r\n",
            ],
        );
        assert_eq!(
            d.visible(),
            "Loading -\nHow would you like to authenticate?\n> Google"
        );
    }

    #[test]
    fn wrapped_rows_read_as_one_line() {
        let url = "https://auth.example/authorize?client_id=abc&redirect_uri=http%3A%2F%2Flocalhost%3A1455&state=xyz";
        let mut bytes = b"Open this:\r\n".to_vec();
        bytes.extend_from_slice(url.as_bytes());
        bytes.extend_from_slice(b"\r\n> ");
        let d = drawn(40, 10, &[&bytes]);
        assert!(d.text.contains(url), "{d:?}");
        assert_eq!(d.text.lines().count(), 3, "{d:?}");
    }

    #[test]
    fn a_url_split_across_chunks_and_lines_by_the_program() {
        // The program itself breaks the URL (a hard newline, not a wrap): the
        // screen shows two lines, and no more is claimed than that.
        let d = drawn(
            80,
            10,
            &[b"https://auth.example/authorize?a=1&b", b"=2\r\n&c=3\r\n"],
        );
        assert_eq!(d.text, "https://auth.example/authorize?a=1&b=2\n&c=3");
        // Cut in the middle of a UTF-8 character and of an escape: nothing lost.
        let d = drawn(
            80,
            10,
            &[
                &"╭─╮".as_bytes()[..2],
                &"╭─╮".as_bytes()[2..],
                b"\x1b[3",
                b"1mx\x1b[0m\r\n",
            ],
        );
        assert_eq!(d.text, "╭─╮x");
    }

    #[test]
    fn osc8_hyperlinks_show_their_text_and_keep_their_target() {
        let d = drawn(
            80,
            10,
            &[b"\x1b]8;id=1;https://auth.example/authorize?full=1;x=2\x1b\\Sign in\x1b]8;;\x1b\\ or \x1b]8;;https://b.example/\x07here\x1b]8;;\x07\r\n"],
        );
        assert_eq!(d.text, "Sign in or here");
        assert_eq!(
            d.links,
            vec![
                "https://auth.example/authorize?full=1;x=2".to_owned(),
                "https://b.example/".to_owned()
            ]
        );
    }

    #[test]
    fn the_cursor_marks_where_output_goes_on() {
        let d = drawn(80, 10, &[b"go to https://auth.example/a?b"]);
        assert_eq!(d.cursor, Some(d.text.len()), "{d:?}");
        let d = drawn(80, 10, &[b"go to https://auth.example/a?b\r\n"]);
        assert_eq!(d.cursor, None, "{d:?}");
        // Drawn, then the cursor moved up to a prompt: the URL is whole.
        let d = drawn(80, 10, &[b"> \r\nhttps://auth.example/a?b\x1b[1A\x1b[3G"]);
        assert_eq!(d.cursor, Some(2), "{d:?}");
        // The URL fills its row to the last column: it may go on below.
        let d = drawn(10, 5, &[b"0123456789"]);
        assert_eq!(d.cursor, Some(10), "{d:?}");
    }

    #[test]
    fn rows_scrolled_off_stay_readable() {
        let mut s = Screen::new(5, 40);
        s.feed(b"first https://auth.example/authorize?x=1\r\n");
        for i in 0..20 {
            s.feed(format!("line {i}\r\n").as_bytes());
        }
        let d = s.drawn();
        assert!(
            d.text
                .starts_with("first https://auth.example/authorize?x=1\nline 0\n"),
            "{d:?}"
        );
        assert!(!d.visible().contains("first"), "{d:?}");
        assert!(d.visible().contains("line 19"), "{d:?}");
        // Bounded.
        for _ in 0..2000 {
            s.feed(b"0123456789 0123456789 0123456789\r\n");
        }
        assert!(s.drawn().visible_from <= HISTORY_BYTES + 1);
    }

    #[test]
    fn last_words_are_collapsed_and_short() {
        assert_eq!(last_words(" a \n\n b "), "a b");
        assert_eq!(last_words(""), "(none)");
        assert_eq!(last_words(&"x".repeat(1000)).len(), 300);
    }
}
