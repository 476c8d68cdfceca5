//! Which Debian mirror the base layer comes from: the one this host's apt
//! already uses (trixie is served wherever bookworm is), unless
//! `AIRLOCK_DEBIAN_MIRROR` says otherwise. Nothing about mirrors is written into
//! the image's inputs: the same suite from any mirror is the same image.

use crate::ImageError;
use std::path::Path;

pub const MIRROR_ENV: &str = "AIRLOCK_DEBIAN_MIRROR";

/// The mirror URI to build from.
pub fn debian_mirror() -> Result<String, ImageError> {
    if let Ok(m) = std::env::var(MIRROR_ENV) {
        if !m.trim().is_empty() {
            return Ok(m.trim().to_owned());
        }
    }
    let codename = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| os_release_codename(&t))
        .unwrap_or_else(|| "bookworm".to_owned());
    let apt = Path::new("/etc/apt");
    let mut deb822 = Vec::new();
    let mut one_line = Vec::new();
    if let Ok(t) = std::fs::read_to_string(apt.join("sources.list")) {
        one_line.push(t);
    }
    if let Ok(rd) = std::fs::read_dir(apt.join("sources.list.d")) {
        let mut paths: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let Ok(t) = std::fs::read_to_string(&p) else {
                continue;
            };
            match p.extension().and_then(|e| e.to_str()) {
                Some("sources") => deb822.push(t),
                Some("list") => one_line.push(t),
                _ => {}
            }
        }
    }
    deb822
        .iter()
        .find_map(|t| from_deb822(t, &codename))
        .or_else(|| one_line.iter().find_map(|t| from_one_line(t, &codename)))
        .ok_or_else(|| {
            ImageError::Mirror(format!(
                "no apt source for suite {codename} in /etc/apt; set {MIRROR_ENV} to a Debian mirror URI"
            ))
        })
}

fn os_release_codename(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

/// The first URI of a deb822 stanza of type `deb` whose suites include `suite`.
pub(crate) fn from_deb822(text: &str, suite: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let mut types = "";
        let mut uris = "";
        let mut suites = "";
        let mut enabled = true;
        for line in stanza.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "types" => types = v,
                "uris" => uris = v,
                "suites" => suites = v,
                "enabled" => enabled = v.trim() != "no",
                _ => {}
            }
        }
        if enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite)
        {
            if let Some(uri) = uris.split_whitespace().next() {
                return Some(uri.to_owned());
            }
        }
    }
    None
}

/// The URI of the first `deb URI SUITE …` line for `suite`.
pub(crate) fn from_one_line(text: &str, suite: &str) -> Option<String> {
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        // Options: `[arch=amd64 signed-by=…]`, possibly spread over several words.
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']'))?;
            rest.drain(..=end);
        }
        if rest.len() >= 2 && rest[1] == suite {
            return Some(rest[0].to_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_picks_the_stanza_of_the_suite() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            from_deb822(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(from_deb822(text, "trixie"), None);
        let disabled = "Enabled: no\nTypes: deb\nURIs: http://a.example/\nSuites: bookworm\n";
        assert_eq!(from_deb822(disabled, "bookworm"), None);
    }

    #[test]
    fn one_line_format_with_and_without_options() {
        let text = "# comment\ndeb-src http://src.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            from_one_line(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            from_one_line("deb http://m.example/d bookworm main", "bookworm").as_deref(),
            Some("http://m.example/d")
        );
        assert_eq!(
            from_one_line("deb http://m.example/d bullseye main", "bookworm"),
            None
        );
    }

    #[test]
    fn codename_from_os_release() {
        assert_eq!(
            os_release_codename("ID=debian\nVERSION_CODENAME=bookworm\n").as_deref(),
            Some("bookworm")
        );
        assert_eq!(os_release_codename("ID=x\n"), None);
    }
}
