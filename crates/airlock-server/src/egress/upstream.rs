//! An upstream proxy: where it is and the credentials we present to it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};

/// `http://USER:PASS@HOST:PORT`. The password is a secret: `Debug` and
/// [`Upstream::masked`] never show it.
#[derive(Debug)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub username: String,
    password: SecretString,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("the upstream URL is not a URL of the form http://USER:PASS@HOST:PORT")]
    Malformed,
    #[error("the upstream proxy must be spoken to over http:// (got {0}://)")]
    Scheme(String),
    #[error("the upstream URL needs a {0}")]
    Missing(&'static str),
    #[error("the upstream URL must not carry a {0}")]
    Extra(&'static str),
    #[error("the upstream URL's host is not a host name or address")]
    BadHost,
}

/// Whether `url`'s authority ends in `:DIGITS` (`[::1]:80` yes, `[::1]` no).
fn explicit_port(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

impl Upstream {
    pub fn new(host: String, port: u16, username: String, password: SecretString) -> Self {
        Upstream {
            host,
            port,
            username,
            password,
        }
    }

    /// Parse `http://USER:PASS@HOST:PORT` (user and password percent-encoded
    /// where needed). Errors never repeat the URL, since it holds a password.
    pub fn parse(url: &str) -> Result<Self, UpstreamError> {
        // The URL standard drops tabs and line breaks anywhere in a URL; a
        // setting that holds them was not meant as written.
        if url.chars().any(char::is_control) {
            return Err(UpstreamError::Malformed);
        }
        let parsed = url::Url::parse(url).map_err(|_| UpstreamError::Malformed)?;
        if parsed.scheme() != "http" {
            return Err(UpstreamError::Scheme(parsed.scheme().to_owned()));
        }
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or(UpstreamError::Missing("host"))?;
        // The parser drops a port equal to the scheme's default (`:80`), so
        // one written out is looked for in the text itself.
        let port = parsed
            .port()
            .or_else(|| {
                explicit_port(url)
                    .then(|| parsed.port_or_known_default())
                    .flatten()
            })
            .filter(|p| *p != 0)
            .ok_or(UpstreamError::Missing("port"))?;
        if parsed.username().is_empty() {
            return Err(UpstreamError::Missing("user name"));
        }
        let password = parsed
            .password()
            .ok_or(UpstreamError::Missing("password"))?;
        if !(parsed.path().is_empty() || parsed.path() == "/") {
            return Err(UpstreamError::Extra("path"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(UpstreamError::Extra("query or fragment"));
        }
        // The URL standard lets a host hold characters (`"`, `` ` ``, `{`, `}`)
        // that no host name has and a request line cannot carry.
        if format!("{host}:{port}")
            .parse::<hyper::http::uri::Authority>()
            .is_err()
        {
            return Err(UpstreamError::BadHost);
        }
        let decode = |s: &str| {
            percent_decode(s)
                .ok_or(UpstreamError::Malformed)
                .map(|v| v.trim().to_owned())
        };
        Ok(Upstream {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            username: decode(parsed.username())?,
            password: SecretString::from(decode(password)?),
        })
    }

    pub fn password(&self) -> &SecretString {
        &self.password
    }

    /// `host:port`, to connect to.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// For people: `http://user:***@host:port`.
    pub fn masked(&self) -> String {
        format!("http://{}:***@{}", self.username, self.authority())
    }

    /// The `Proxy-Authorization` value, marked sensitive so hyper never logs it.
    pub fn authorization(&self) -> hyper::header::HeaderValue {
        let mut raw = format!("{}:{}", self.username, self.password.expose_secret());
        let mut value = format!("Basic {}", B64.encode(raw.as_bytes()));
        zeroize::Zeroize::zeroize(&mut raw);
        let mut header = hyper::header::HeaderValue::from_str(&value)
            .unwrap_or_else(|_| hyper::header::HeaderValue::from_static("Basic"));
        zeroize::Zeroize::zeroize(&mut value);
        header.set_sensitive(true);
        header
    }
}

fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|v| v.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_masks() {
        let up = Upstream::parse("http://alice:s%40cret@gate.example:10001").expect("valid");
        assert_eq!(up.host, "gate.example");
        assert_eq!(up.port, 10001);
        assert_eq!(up.password().expose_secret(), "s@cret");
        assert_eq!(up.masked(), "http://alice:***@gate.example:10001");
        assert!(!format!("{up:?}").contains("s@cret"));
        let auth = up.authorization();
        assert!(auth.is_sensitive());
        assert_eq!(auth.to_str().expect("ascii"), "Basic YWxpY2U6c0BjcmV0");
    }

    #[test]
    fn errors_name_the_problem_without_the_secret() {
        for (url, want) in [
            ("https://a:b@h:1", UpstreamError::Scheme("https".into())),
            ("http://a:b@h", UpstreamError::Missing("port")),
            ("http://h:1", UpstreamError::Missing("user name")),
            ("http://a@h:1", UpstreamError::Missing("password")),
            ("http://a:b@h:1/x", UpstreamError::Extra("path")),
            ("not a url", UpstreamError::Malformed),
        ] {
            let err = Upstream::parse(url).expect_err(url);
            assert_eq!(err, want, "{url}");
        }
        let err = Upstream::parse("https://a:topsecret@h:1").expect_err("scheme");
        assert!(!err.to_string().contains("topsecret"));
    }

    #[test]
    fn a_written_out_default_port_is_a_port() {
        // The URL parser drops `:80` from an http:// URL; it was written, so
        // it counts (a property test found it: any port but 80 passed).
        let up = Upstream::parse("http://alice:pw@127.0.0.1:80").expect("port 80");
        assert_eq!(up.port, 80);
        let up = Upstream::parse("http://alice:pw@[::1]:80/").expect("IPv6, port 80");
        assert_eq!((up.host.as_str(), up.port), ("::1", 80));
        for url in [
            "http://a:b@h",
            "http://a:b@[::1]",
            "http://a:b@h:",
            "http://a:b@h/:80",
        ] {
            assert_eq!(
                Upstream::parse(url).expect_err(url),
                UpstreamError::Missing("port"),
                "{url}"
            );
        }
    }

    #[test]
    fn a_host_no_request_line_can_carry_is_refused() {
        // Found by the upstream_url fuzz target: accepted, then unusable.
        for url in [
            "http://a:b@g`te.example:10001",
            "http://a:b@proxy.example.{com:8080",
            "http://a:b@proxy.examp\"xle.com:8080",
            "http://a:b@proxy.w{exam}:8080",
        ] {
            assert_eq!(
                Upstream::parse(url).expect_err(url),
                UpstreamError::BadHost,
                "{url}"
            );
        }
        // Also found by it: a line break the URL standard drops, and port 0.
        for url in [
            "http://a:b@127.0.0.1:\n0",
            "http://a:b@h:0",
            "http://a:b@h:1\t2",
        ] {
            assert!(Upstream::parse(url).is_err(), "{url:?}");
        }
        assert!(Upstream::parse("http://a:b@[::1]:8080").is_ok());
        assert!(Upstream::parse("http://a:b@gate-1.example:8080").is_ok());
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,64}") {
            let _ = Upstream::parse(&s);
        }

        #[test]
        fn masked_never_shows_the_password(user in "[a-z]{1,5}", pass in "[A-Za-z0-9]{6,16}", port in 1u16..) {
            let up = Upstream::parse(&format!("http://{user}:{pass}@127.0.0.1:{port}")).expect("valid");
            prop_assert!(!up.masked().contains(&pass));
            prop_assert_eq!(up.password().expose_secret(), pass.as_str());
        }
    }
}
