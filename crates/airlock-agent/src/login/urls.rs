//! Login URLs: which URL a provider's login may hand over, and finding one
//! on the screen the command draws.
//!
//! The provider's rule (`ProviderDef::url`) says where its URL comes from
//! (the browser hook, or for a CLI that opens no browser, the screen) and
//! what it must hold. A CLI may draw a shortened link on screen (claude-code
//! shows `https://claude.ai/oauth/authorize?z-…`, without client id or
//! redirect, and opens the full one): such a link is never taken, whatever
//! the rule; it is only noted, for a failure's reason.

use super::screen::Drawn;
use airlock_proto::login::ProviderDef;

/// Longest URL taken.
const MAX_URL_BYTES: usize = 8192;

/// Whether `url` is one this provider's login may hand over.
pub fn matches_prefix(def: &ProviderDef, url: &str) -> bool {
    def.url_prefixes.iter().any(|p| url.starts_with(p.as_str()))
        && url.len() <= MAX_URL_BYTES
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Why `url` is not this provider's sign-in URL, or `None` when it is.
pub fn refuses(def: &ProviderDef, url: &str) -> Option<String> {
    if !matches_prefix(def, url) {
        return Some(format!(
            "it does not start with {}",
            def.url_prefixes.join(" or ")
        ));
    }
    def.url.refuses(url)
}

/// The first link drawn that starts with one of the prefixes, as drawn
/// (at most 80 characters, an ellipsis kept), and whether it was cut short.
pub fn sighting(def: &ProviderDef, text: &str) -> Option<(String, bool)> {
    def.url_prefixes.iter().find_map(|p| {
        let start = text.find(p.as_str())?;
        let len: usize = text[start..]
            .chars()
            .take_while(|c| url_char(*c))
            .map(char::len_utf8)
            .sum();
        let end = start + len;
        let shortened = text[end..].starts_with('…') || text[start..end].ends_with("...");
        let mut shown: String = text[start..end].chars().take(80).collect();
        if shortened || len > shown.len() {
            shown.push('…');
        }
        Some((shown, shortened))
    })
}

/// A character a URL drawn on a terminal is made of (RFC 3986's, and `%`).
fn url_char(c: char) -> bool {
    c.is_ascii_graphic() && !matches!(c, '"' | '<' | '>' | '\\' | '^' | '`' | '{' | '|' | '}')
}

/// The first URL in `text` that starts with one of the prefixes, is whole
/// (`growing_at`, where output would go on, is not its end) and was not cut
/// short for display (followed by `…` or ending in `...`).
pub fn find_url(def: &ProviderDef, text: &str, growing_at: Option<usize>) -> Option<String> {
    def.url_prefixes.iter().find_map(|p| {
        text.match_indices(p.as_str()).find_map(|(start, _)| {
            let len: usize = text[start..]
                .chars()
                .take_while(|c| url_char(*c))
                .map(char::len_utf8)
                .sum();
            let end = start + len;
            let url = &text[start..end];
            let shortened = text[end..].starts_with('…') || url.ends_with("...");
            let growing = growing_at == Some(end);
            (!shortened && !growing && matches_prefix(def, url)).then(|| url.to_owned())
        })
    })
}

/// The URL the screen offers: a hyperlink's target first (drawn text may be
/// a shortened form of it), else the first whole URL drawn.
pub fn from_screen(def: &ProviderDef, drawn: &Drawn) -> Option<String> {
    drawn
        .links
        .iter()
        .find(|l| matches_prefix(def, l))
        .cloned()
        .or_else(|| find_url(def, &drawn.text, drawn.cursor))
}

#[cfg(test)]
mod tests {
    use super::super::screen::Screen;
    use super::*;
    use airlock_proto::login::CredentialFile;

    fn def(prefixes: &[&str]) -> ProviderDef {
        ProviderDef {
            name: "t".into(),
            display_name: "T".into(),
            command: vec!["sh".into()],
            env: Default::default(),
            url_prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            prompts: Vec::new(),
            url: Default::default(),
            code_prompt: None,
            credentials: vec![CredentialFile {
                path: ".t/creds.json".into(),
                json_keys: vec![],
                ..Default::default()
            }],
            check: None,
            cols: 200,
        }
    }

    fn screen(cols: u16, bytes: &[u8]) -> Drawn {
        let mut s = Screen::new(50, cols);
        s.feed(bytes);
        s.drawn()
    }

    #[test]
    fn urls_only_when_complete() {
        let d = def(&["https://auth.example/authorize?"]);
        let text = "go to https://auth.example/authorize?a=b";
        assert_eq!(find_url(&d, text, Some(text.len())), None);
        assert_eq!(
            find_url(&d, "go to https://auth.example/authorize?a=b\n", None).as_deref(),
            Some("https://auth.example/authorize?a=b")
        );
        assert_eq!(
            find_url(&d, "https://evil.example/authorize?a\n", None),
            None
        );
        // The same, through the screen: the cursor right after the URL.
        assert_eq!(from_screen(&d, &screen(80, text.as_bytes())), None);
        assert_eq!(
            from_screen(
                &d,
                &screen(80, b"go to https://auth.example/authorize?a=b\r\n")
            )
            .as_deref(),
            Some("https://auth.example/authorize?a=b")
        );
    }

    /// What claude-code draws (recorded, shortened for the test): a short
    /// link ending in an ellipsis, in colour, inside its frame. It is no URL.
    #[test]
    fn a_shortened_link_is_never_taken() {
        let d = def(&["https://claude.ai/oauth/authorize?"]);
        let bytes = b"\x1b[2K\x1b[1G\x1b[38;5;174m\xe2\x95\xad\xe2\x94\x80\x1b[39m\r\n\
            \x1b[2K\x1b[1GBrowser didn't open? Use the url below to sign in:\r\n\r\n\
            \x1b[2K\x1b[1G\x1b[38;5;246mhttps://claude.ai/oauth/authorize?z-\xe2\x80\xa6\x1b[39m\r\n\r\n\
            \x1b[2K\x1b[1GPaste code here if prompted > ";
        assert_eq!(from_screen(&d, &screen(500, bytes)), None);
        assert_eq!(
            find_url(&d, "https://claude.ai/oauth/authorize?z-...\n", None),
            None
        );
    }

    #[test]
    fn a_shortened_link_is_noted_as_seen() {
        let d = def(&["https://claude.ai/oauth/authorize?"]);
        let text = "Use the url below:\nhttps://claude.ai/oauth/authorize?z-ab…\nPaste code here";
        assert_eq!(
            sighting(&d, text),
            Some(("https://claude.ai/oauth/authorize?z-ab…".to_owned(), true))
        );
        assert_eq!(sighting(&d, "nothing here"), None);
        let long = format!("https://claude.ai/oauth/authorize?{}\n", "a".repeat(200));
        let (shown, short) = sighting(&d, &long).expect("seen");
        assert!(!short);
        assert_eq!(shown.chars().count(), 81);
    }

    #[test]
    fn a_wrapped_url_is_found_whole() {
        let d = def(&["https://auth.example/authorize?"]);
        let url = "https://auth.example/authorize?client_id=app&redirect_uri=http%3A%2F%2Flocalhost%3A1455%2Fcb&state=0123456789abcdef";
        let mut bytes = format!("\x1b[1mSign in:\x1b[0m\r\n\x1b[4m{url}\x1b[24m\r\n").into_bytes();
        bytes.extend_from_slice(b"Waiting...");
        assert_eq!(from_screen(&d, &screen(80, &bytes)).as_deref(), Some(url));
    }

    #[test]
    fn a_hyperlink_target_beats_its_drawn_text() {
        let d = def(&["https://claude.ai/oauth/authorize?"]);
        let full = "https://claude.ai/oauth/authorize?code=true&client_id=c&redirect_uri=r&state=s";
        let bytes =
            format!("\x1b]8;;{full}\x07https://claude.ai/oauth/authorize?z-…\x1b]8;;\x07\r\n");
        assert_eq!(
            from_screen(&d, &screen(500, bytes.as_bytes())).as_deref(),
            Some(full)
        );
    }

    #[test]
    fn a_url_ends_where_url_characters_end() {
        let d = def(&["https://auth.example/authorize?"]);
        assert_eq!(
            find_url(&d, "│ https://auth.example/authorize?a=1│\n", None).as_deref(),
            Some("https://auth.example/authorize?a=1")
        );
        // A first occurrence that does not count does not hide a later one.
        assert_eq!(
            find_url(
                &d,
                "https://auth.example/authorize?z-…\nhttps://auth.example/authorize?a=2\n",
                None
            )
            .as_deref(),
            Some("https://auth.example/authorize?a=2")
        );
    }
}
