//! The front door: who is calling, and from where. Every request except
//! `/healthz` passes here before any handler runs:
//!
//! ```text
//!  request ──▶ Host one of ours? ──no──▶ 421 misdirected     (DNS rebinding)
//!                 │ yes      (HTTP/2's :authority when there is no Host;
//!                 │           a target authority that differs from Host: 421)
//!                 ▼
//!     %00..%1F in the path or query? ──yes──▶ 400
//!                 │ no
//!                 ▼
//!     WebSocket or state-changing? ──▶ Origin same-origin or allowed,
//!                 │                    not Sec-Fetch-Site: cross-site? ──no──▶ 403
//!                 ▼
//!     `?token=` off the viewer sockets? ──yes──▶ 401        (tokens stay out of URLs)
//!                 │ no
//!                 ▼
//!     loopback peer, no proxy headers, loopback listener, local_user on?
//!                 ──yes──▶ marked [`LocalCaller`]: may act as `local` without a token
//! ```
//!
//! and every answer gets the headers that keep the pages out of other
//! sites' frames and the browser from guessing content types.

use super::error::ApiError;
use crate::app::AppConfig;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Both ends of the TCP connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub remote: SocketAddr,
    /// The address the connection reached (a wildcard listener's real one).
    pub local: Option<SocketAddr>,
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer {
            remote: *stream.remote_addr(),
            local: stream.io().local_addr().ok(),
        }
    }
}

/// Set on a request that may act as the token-less `local` user.
#[derive(Debug, Clone, Copy)]
pub struct LocalCaller;

/// Headers that say a proxy stands between the caller and us: such a request
/// is never the local user, whatever its peer address.
const PROXY_HEADERS: [&str; 6] = [
    "forwarded",
    "x-forwarded-for",
    "x-real-ip",
    "x-forwarded-host",
    "x-forwarded-proto",
    "via",
];

/// A `Host` (or a `public_hosts` entry): a lower-case name or IP literal
/// (IPv6 in brackets), and a port when one was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostName {
    pub host: String,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
}

impl HostName {
    /// A `Host` header value: `name`, `name:port`, `1.2.3.4[:port]`, `[::1][:port]`.
    pub fn parse(value: &str) -> Result<HostName, &'static str> {
        if value.is_empty() || value.len() > 260 {
            return Err("must be a host name or address, with an optional port");
        }
        if value.contains(['@', '/', '?', '#', '\\']) {
            return Err("must be a host name or address only (no user, path or query)");
        }
        let (host, port) = if let Some(rest) = value.strip_prefix('[') {
            let (inner, after) = rest
                .split_once(']')
                .ok_or("an IPv6 address lacks its ']'")?;
            let ip: std::net::Ipv6Addr = inner.parse().map_err(|_| "not an IPv6 address")?;
            (format!("[{ip}]"), after)
        } else {
            match value.rsplit_once(':') {
                Some((h, _)) => (h.to_ascii_lowercase(), &value[h.len()..]),
                None => (value.to_ascii_lowercase(), ""),
            }
        };
        let port = match port {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|d| d.parse::<u16>().ok())
                    .ok_or("the port must be a number from 0 to 65535")?,
            ),
        };
        let host = host.strip_suffix('.').unwrap_or(&host).to_owned();
        let ip = if let Some(v6) = host.strip_prefix('[') {
            Some(IpAddr::V6(
                v6.trim_end_matches(']')
                    .parse()
                    .map_err(|_| "not an IPv6 address")?,
            ))
        } else if let Ok(v4) = host.parse::<std::net::Ipv4Addr>() {
            Some(IpAddr::V4(v4))
        } else {
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            if host.is_empty() || !host.split('.').all(label_ok) {
                return Err("must be a DNS name (letters, digits, '-', '.') or an IP address");
            }
            None
        };
        Ok(HostName { host, ip, port })
    }

    /// A `public_hosts` entry: like a `Host` header, and said plainly when
    /// it looks like a URL.
    pub fn parse_setting(value: &str) -> Result<HostName, String> {
        if value.contains("://") {
            return Err("write the host name without a scheme (`airlock.example.com` or `airlock.example.com:443`)".into());
        }
        HostName::parse(value).map_err(str::to_owned)
    }

    fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.ip.is_some_and(|ip| ip.to_canonical().is_loopback())
    }

    /// Whether an allowlist entry covers this request host (an entry without
    /// a port covers every port).
    fn covered_by(&self, entry: &HostName) -> bool {
        entry.host == self.host && (entry.port.is_none() || entry.port == self.port)
    }
}

/// An `allowed_origins` entry in the form browsers send (`scheme://host[:port]`,
/// no default port), or why it is not one.
pub fn parse_origin_setting(value: &str) -> Result<String, String> {
    let url = url::Url::parse(value).map_err(|e| format!("not an origin ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("the scheme must be http or https".into());
    }
    if url.host_str().is_none()
        || !url.username().is_empty()
        || url.password().is_some()
        || url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err("must be scheme://host[:port] and nothing else".into());
    }
    Ok(url.origin().ascii_serialization())
}

/// The guard's settings, taken once from the app's configuration.
#[derive(Debug, Clone)]
pub struct Guard {
    public_hosts: Vec<HostName>,
    /// The listen address's IP, unless it is a wildcard.
    listen_ip: Option<IpAddr>,
    allowed_origins: Vec<String>,
    /// [`AppConfig::local_user_on`]: the setting (or its automatic value)
    /// allows `local` and the listener is loopback-bound.
    local_user: bool,
}

/// What the guard lets through: whether the caller may be `local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub local: bool,
}

impl Guard {
    /// From settings `Config::validate` already checked; an entry that still
    /// does not parse is left out (it could only ever refuse).
    pub fn new(cfg: &AppConfig) -> Guard {
        Guard {
            public_hosts: cfg
                .public_hosts
                .iter()
                .filter_map(|h| HostName::parse_setting(h).ok())
                .collect(),
            listen_ip: Some(cfg.listen.ip()).filter(|ip| !ip.is_unspecified()),
            allowed_origins: cfg
                .allowed_origins
                .iter()
                .filter_map(|o| parse_origin_setting(o).ok())
                .collect(),
            local_user: cfg.local_user_on(),
        }
    }

    /// Whether `host` is one of this server's names. `local` is the address
    /// the connection reached: an IP literal Host naming it cannot come from
    /// a rebinding name.
    fn host_allowed(&self, host: &HostName, local: Option<IpAddr>) -> bool {
        host.is_loopback()
            || host.ip.is_some_and(|ip| {
                Some(ip.to_canonical()) == self.listen_ip.map(|l| l.to_canonical())
                    || Some(ip.to_canonical()) == local.map(|l| l.to_canonical())
            })
            || self.public_hosts.iter().any(|e| host.covered_by(e))
    }

    /// The whole decision for one request, without I/O. `authority` is the
    /// request target's own (HTTP/2's `:authority`, or an HTTP/1.1 request
    /// in absolute form).
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        authority: Option<&str>,
        headers: &HeaderMap,
        peer: Option<Peer>,
    ) -> Result<Admission, ApiError> {
        let host = self.host(headers, authority, peer)?;
        if has_encoded_control(path) || query.is_some_and(has_encoded_control) {
            return Err(ApiError::bad_request(
                "the address holds a control character (such as %00); no name or value here has one",
            ));
        }
        if needs_origin_check(method, headers) {
            self.origin(headers, &host)?;
        }
        if has_token_param(query) && !is_viewer_socket(path) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send the API token as `Authorization: Bearer <token>`; a token in the URL \
                 (?token=) is accepted only on the viewer WebSockets, and a viewer ticket \
                 (POST /api/v1/sandboxes/{id}/tickets) replaces it there",
            ));
        }
        if has_param(query, "share") && !is_viewer_socket(path) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a share link's secret (?share=) is accepted only on the viewer WebSockets",
            ));
        }
        let local = self.local_user
            && peer.is_some_and(|p| p.remote.ip().to_canonical().is_loopback())
            && !PROXY_HEADERS.iter().any(|h| headers.contains_key(*h));
        Ok(Admission { local })
    }

    /// The name the request is for: its `Host` header, or, without one, the
    /// target's authority (HTTP/2 sends `:authority` instead of `Host`).
    /// When both are there they must name the same host and port.
    fn host(
        &self,
        headers: &HeaderMap,
        authority: Option<&str>,
        peer: Option<Peer>,
    ) -> Result<HostName, ApiError> {
        let misdirected = |message: String| {
            ApiError::new(StatusCode::MISDIRECTED_REQUEST, "misdirected", message)
        };
        let parse = |text: &str| {
            HostName::parse(text).map_err(|why| {
                misdirected(format!("Host {:?} is not valid: it {why}", shorten(text)))
            })
        };
        let mut values = headers.get_all(header::HOST).iter();
        let (text, host) = match (values.next(), values.next(), authority) {
            (Some(value), None, _) => {
                let Ok(text) = value.to_str() else {
                    return Err(misdirected("the Host header is not valid".into()));
                };
                let host = parse(text)?;
                if let Some(authority) = authority {
                    if parse(authority)? != host {
                        return Err(misdirected(format!(
                            "the Host header {:?} and the request's authority {:?} \
                             name different servers",
                            shorten(text),
                            shorten(authority)
                        )));
                    }
                }
                (text, host)
            }
            (None, _, Some(authority)) => (authority, parse(authority)?),
            _ => {
                return Err(misdirected(
                    "the request must carry exactly one Host header (or, over HTTP/2, \
                     an :authority)"
                        .into(),
                ))
            }
        };
        let shown = shorten(text);
        if self.host_allowed(&host, peer.and_then(|p| p.local).map(|a| a.ip())) {
            Ok(host)
        } else {
            Err(misdirected(format!(
                "Host {shown:?} is not a name of this server. If it is, add it to \
                 public_hosts in the config file"
            )))
        }
    }

    fn origin(&self, headers: &HeaderMap, host: &HostName) -> Result<(), ApiError> {
        let forbidden =
            |message: String| ApiError::new(StatusCode::FORBIDDEN, "forbidden", message);
        let origin = match headers.get(header::ORIGIN).map(HeaderValue::to_str) {
            None => None,
            Some(Ok(o)) => Some(o),
            Some(Err(_)) => return Err(forbidden("the Origin header is not valid".into())),
        };
        if let Some(origin) = origin {
            let normal = parse_origin_setting(origin).ok();
            if normal.is_some_and(|n| self.allowed_origins.contains(&n)) {
                return Ok(());
            }
            if !same_origin(origin, host) {
                return Err(forbidden(format!(
                    "a page of {:?} may not open viewer sockets or change anything here; \
                     only this server's own pages may (or origins listed in allowed_origins \
                     in the config file)",
                    shorten(origin)
                )));
            }
        }
        let cross_site = headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
        if cross_site {
            return Err(forbidden(
                "a cross-site request (Sec-Fetch-Site: cross-site) may not open viewer \
                 sockets or change anything here"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Long header values are cut in messages; they are the caller's own words.
fn shorten(s: &str) -> String {
    if s.chars().count() <= 80 {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(80).collect();
        out.push('…');
        out
    }
}

/// A WebSocket upgrade, or any method that may change state.
fn needs_origin_check(method: &Method, headers: &HeaderMap) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        || headers.contains_key(header::UPGRADE)
        || headers.contains_key(header::SEC_WEBSOCKET_KEY)
}

/// Whether the `Origin` is the server at `host`: same host, same port (the
/// scheme's default when the Host has none). The scheme itself is not known
/// here (a TLS terminator may stand in front), so http and https both count.
fn same_origin(origin: &str, host: &HostName) -> bool {
    let Ok(url) = url::Url::parse(origin) else {
        return false;
    };
    let Some(name) = url.host_str() else {
        return false;
    };
    let default = match url.scheme() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    let Ok(origin_host) = HostName::parse(name) else {
        return false;
    };
    origin_host.host == host.host
        && url.port_or_known_default() == Some(host.port.unwrap_or(default))
}

/// A percent-encoded control character (`%00`–`%1F`, `%7F`): no id, name
/// or parameter of ours has one, and a NUL would reach the store.
fn has_encoded_control(s: &str) -> bool {
    s.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1].to_ascii_uppercase(), w[2].to_ascii_uppercase()),
                (b'0' | b'1', b'0'..=b'9' | b'A'..=b'F') | (b'7', b'F')
            )
    })
}

fn has_token_param(query: Option<&str>) -> bool {
    has_param(query, "token")
}

fn has_param(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| url::form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == name))
}

/// `/api/v1/sandboxes/{id}/vnc` and `/api/v1/sandboxes/{id}/stream`.
pub fn is_viewer_socket(path: &str) -> bool {
    path.strip_prefix("/api/v1/sandboxes/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(id, what)| !id.is_empty() && matches!(what, "vnc" | "stream"))
}

/// The middleware: refuse, or mark and pass on; secure headers either way.
pub async fn guard(State(guard): State<Arc<Guard>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let framable = path.starts_with("/view/");
    if path == "/healthz" {
        return secure(next.run(req).await, framable);
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0)
        .or_else(|| {
            req.extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| Peer {
                    remote: c.0,
                    local: None,
                })
        });
    let authority = req.uri().authority().map(|a| a.as_str().to_owned());
    let verdict = guard.check(
        req.method(),
        &path,
        req.uri().query(),
        authority.as_deref(),
        req.headers(),
        peer,
    );
    let resp = match verdict {
        Ok(admission) => {
            if admission.local {
                req.extensions_mut().insert(LocalCaller);
            }
            let resp = next.run(req).await;
            if path.starts_with("/api/") {
                as_api_error(resp).await
            } else {
                resp
            }
        }
        Err(refused) => {
            tracing::info!(
                status = refused.status.as_u16(),
                method = %req.method(),
                path = %shorten(&path),
                reason = %refused.message,
                "request refused at the door"
            );
            refused.into_response()
        }
    };
    secure(resp, framable)
}

/// Refusals made by the framework itself (a wrong method, a bad path
/// segment, a WebSocket route called without the upgrade) in the API's own
/// error shape, so every 4xx of `/api` reads `{"error": {"code", "message"}}`.
async fn as_api_error(resp: Response) -> Response {
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() || json {
        return resp;
    }
    let code = match status.as_u16() {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        409 => "conflict",
        413 => "too_large",
        415 => "unsupported_media_type",
        426 => "upgrade_required",
        _ => "bad_request",
    };
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let text = text.trim();
    let message = if text.is_empty() || text.chars().any(char::is_control) {
        status.canonical_reason().unwrap_or("refused").to_owned()
    } else {
        shorten(text)
    };
    let mut out = ApiError::new(status, code, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// The UI's pages never sit in another site's frame; the viewer page sits in
/// the UI's own (web/app.js embeds `/view/{id}`).
fn secure(mut resp: Response, framable_by_self: bool) -> Response {
    let h = resp.headers_mut();
    let (ancestors, frame_options) = if framable_by_self {
        ("frame-ancestors 'self'", "SAMEORIGIN")
    } else {
        ("frame-ancestors 'none'", "DENY")
    };
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(ancestors),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        HeaderValue::from_static(frame_options),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AppConfig {
        let mut c = AppConfig::new("/tmp/x".into());
        c.listen = "127.0.0.1:4000".parse().expect("addr");
        c.public_hosts = vec!["airlock.example.com".into(), "alt.example.com:8443".into()];
        c.allowed_origins = vec!["https://dash.example.org".into()];
        c
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn loopback_peer() -> Option<Peer> {
        Some(Peer {
            remote: "127.0.0.1:50000".parse().expect("addr"),
            local: Some("127.0.0.1:4000".parse().expect("addr")),
        })
    }

    fn get(g: &Guard, pairs: &[(&str, &str)]) -> Result<Admission, ApiError> {
        g.check(
            &Method::GET,
            "/api/v1/sandboxes",
            None,
            None,
            &headers(pairs),
            loopback_peer(),
        )
    }

    fn post(g: &Guard, pairs: &[(&str, &str)]) -> Result<Admission, ApiError> {
        g.check(
            &Method::POST,
            "/api/v1/sandboxes",
            None,
            None,
            &headers(pairs),
            loopback_peer(),
        )
    }

    #[test]
    fn loopback_names_and_configured_hosts_pass_any_other_host_is_misdirected() {
        let g = Guard::new(&cfg());
        for ok in [
            "localhost",
            "localhost:4000",
            "LOCALHOST.:80",
            "127.0.0.1:4000",
            "127.9.8.7",
            "[::1]:4000",
            "[::1]",
            "airlock.example.com",
            "airlock.example.com:443",
            "alt.example.com:8443",
        ] {
            assert!(get(&g, &[("host", ok)]).is_ok(), "{ok} should pass");
        }
        for bad in [
            "rebind.attacker.example:4000",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "alt.example.com:443",
            "alt.example.com",
            "10.0.0.1:4000",
            "user@127.0.0.1",
            "127.0.0.1:99999",
            "127.0.0.1:",
            "[::1",
            "",
        ] {
            let err = get(&g, &[("host", bad)]).expect_err(bad);
            assert_eq!(err.status, StatusCode::MISDIRECTED_REQUEST, "{bad}");
            assert_eq!(err.code, "misdirected");
        }
        let err = get(&g, &[("host", "evil.example")]).expect_err("evil");
        assert!(err.message.contains("evil.example"), "{}", err.message);
        assert!(err.message.contains("public_hosts"), "{}", err.message);
        let none = get(&g, &[]).expect_err("no host");
        assert_eq!(none.status, StatusCode::MISDIRECTED_REQUEST);
        let two = get(&g, &[("host", "localhost"), ("host", "evil.example")]).expect_err("two");
        assert_eq!(two.status, StatusCode::MISDIRECTED_REQUEST);
    }

    #[test]
    fn without_a_host_header_the_authority_names_the_server() {
        let g = Guard::new(&cfg());
        let at = |authority: Option<&str>, pairs: &[(&str, &str)]| {
            g.check(
                &Method::GET,
                "/api/v1/sandboxes",
                None,
                authority,
                &headers(pairs),
                loopback_peer(),
            )
        };
        // HTTP/2: `:authority`, no Host.
        assert!(at(Some("127.0.0.1:4000"), &[]).is_ok());
        assert!(at(Some("airlock.example.com"), &[]).is_ok());
        let err = at(Some("rebind.attacker.example:4000"), &[]).expect_err("rebind");
        assert_eq!(err.status, StatusCode::MISDIRECTED_REQUEST);
        assert!(
            err.message.contains("rebind.attacker.example"),
            "{}",
            err.message
        );
        assert!(at(Some("user@127.0.0.1:4000"), &[]).is_err());
        // Both: they must agree (case and a trailing dot aside).
        assert!(at(Some("localhost:4000"), &[("host", "LOCALHOST:4000")]).is_ok());
        for (authority, host) in [
            ("rebind.attacker.example", "localhost"),
            ("localhost", "rebind.attacker.example"),
            ("localhost:4000", "localhost:4001"),
            ("localhost:4000", "localhost"),
            ("airlock.example.com", "127.0.0.1"),
        ] {
            let err = at(Some(authority), &[("host", host)]).expect_err(authority);
            assert_eq!(
                err.status,
                StatusCode::MISDIRECTED_REQUEST,
                "{authority} {host}"
            );
        }
        let two = at(
            Some("localhost"),
            &[("host", "localhost"), ("host", "localhost")],
        );
        assert_eq!(
            two.expect_err("two").status,
            StatusCode::MISDIRECTED_REQUEST
        );
        assert!(at(None, &[]).is_err());
    }

    #[test]
    fn the_listen_address_and_the_reached_address_are_names_too() {
        let mut c = cfg();
        c.listen = "192.0.2.10:4000".parse().expect("addr");
        c.loopback_only = false;
        let g = Guard::new(&c);
        assert!(get(&g, &[("host", "192.0.2.10:4000")]).is_ok());
        c.listen = "0.0.0.0:4000".parse().expect("addr");
        let g = Guard::new(&c);
        let peer = Some(Peer {
            remote: "198.51.100.1:5000".parse().expect("addr"),
            local: Some("192.0.2.11:4000".parse().expect("addr")),
        });
        let h = headers(&[("host", "192.0.2.11:4000")]);
        assert!(g.check(&Method::GET, "/", None, None, &h, peer).is_ok());
        let h = headers(&[("host", "0.0.0.0:4000")]);
        assert!(g.check(&Method::GET, "/", None, None, &h, peer).is_err());
    }

    #[test]
    fn state_changes_and_sockets_need_our_own_origin_or_an_allowed_one() {
        let g = Guard::new(&cfg());
        let host = ("host", "127.0.0.1:4000");
        assert!(post(&g, &[host]).is_ok(), "no Origin: curl, SDKs");
        assert!(post(&g, &[host, ("origin", "http://127.0.0.1:4000")]).is_ok());
        assert!(post(&g, &[host, ("origin", "https://dash.example.org")]).is_ok());
        assert!(post(
            &g,
            &[
                host,
                ("origin", "https://dash.example.org"),
                ("sec-fetch-site", "cross-site")
            ]
        )
        .is_ok());
        assert!(post(
            &g,
            &[
                ("host", "airlock.example.com"),
                ("origin", "https://airlock.example.com")
            ]
        )
        .is_ok());
        for bad in [
            "http://attacker.example",
            "http://127.0.0.1:4001",
            "http://localhost:4000",
            "null",
            "file://",
            "ws://127.0.0.1:4000",
            "https://dash.example.org:444",
        ] {
            let err = post(&g, &[host, ("origin", bad)]).expect_err(bad);
            assert_eq!(err.status, StatusCode::FORBIDDEN, "{bad}");
        }
        let err = post(&g, &[host, ("origin", "http://attacker.example")]).expect_err("x");
        assert!(err.message.contains("attacker.example"), "{}", err.message);
        let err = post(&g, &[host, ("sec-fetch-site", "cross-site")]).expect_err("x");
        assert_eq!(err.status, StatusCode::FORBIDDEN);
        // Reading is not checked: a cross-site page cannot read the answer.
        assert!(get(&g, &[host, ("origin", "http://attacker.example")]).is_ok());
        // A WebSocket upgrade is a GET, and checked.
        let ws = [
            host,
            ("upgrade", "websocket"),
            ("origin", "http://attacker.example"),
        ];
        assert_eq!(get(&g, &ws).expect_err("ws").status, StatusCode::FORBIDDEN);
        for method in [
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::from_bytes(b"BREW").expect("m"),
        ] {
            let h = headers(&[host, ("origin", "http://attacker.example")]);
            let err = g
                .check(&method, "/x", None, None, &h, loopback_peer())
                .expect_err("m");
            assert_eq!(err.status, StatusCode::FORBIDDEN, "{method}");
        }
    }

    #[test]
    fn local_only_from_a_loopback_peer_without_proxy_headers() {
        let mut on = cfg();
        on.local_user = Some(true);
        let g = Guard::new(&on);
        let host = ("host", "127.0.0.1:4000");
        assert!(get(&g, &[host]).expect("ok").local);
        for h in ["forwarded", "x-forwarded-for", "x-real-ip", "via"] {
            assert!(
                !get(&g, &[host, (h, "203.0.113.9")]).expect("ok").local,
                "{h}"
            );
        }
        let far = Some(Peer {
            remote: "192.0.2.7:5000".parse().expect("addr"),
            local: Some("127.0.0.1:4000".parse().expect("addr")),
        });
        let h = headers(&[host]);
        assert!(
            !g.check(&Method::GET, "/", None, None, &h, far)
                .expect("ok")
                .local
        );
        assert!(
            !g.check(&Method::GET, "/", None, None, &h, None)
                .expect("ok")
                .local
        );
        let v6 = Some(Peer {
            remote: "[::ffff:127.0.0.1]:5000".parse().expect("addr"),
            local: None,
        });
        assert!(
            g.check(&Method::GET, "/", None, None, &h, v6)
                .expect("ok")
                .local
        );
        let mut off = cfg();
        off.local_user = Some(false);
        off.public_hosts.clear();
        assert!(!get(&Guard::new(&off), &[host]).expect("ok").local);
        let mut wide = on.clone();
        wide.loopback_only = false;
        assert!(!get(&Guard::new(&wide), &[host]).expect("ok").local);
    }

    #[test]
    fn unset_local_user_is_off_once_public_hosts_are_configured() {
        // nginx's default `proxy_pass http://127.0.0.1:4000` on this host:
        // a loopback peer, `Host: 127.0.0.1:4000`, no forwarding header.
        let host = ("host", "127.0.0.1:4000");
        let behind_proxy = cfg();
        assert_eq!(behind_proxy.local_user, None);
        assert!(!get(&Guard::new(&behind_proxy), &[host]).expect("ok").local);
        let mut alone = cfg();
        alone.public_hosts.clear();
        assert!(get(&Guard::new(&alone), &[host]).expect("ok").local);
    }

    #[test]
    fn a_token_in_the_url_only_on_the_viewer_sockets() {
        let g = Guard::new(&cfg());
        let h = headers(&[("host", "localhost:4000")]);
        let at =
            |path: &str, q: &str| g.check(&Method::GET, path, Some(q), None, &h, loopback_peer());
        assert!(at("/api/v1/sandboxes/abc/vnc", "token=x").is_ok());
        assert!(at("/api/v1/sandboxes/abc/stream", "a=1&token=x").is_ok());
        assert!(at("/api/v1/sandboxes/abc/vnc", "ticket=x").is_ok());
        assert!(at("/api/v1/sandboxes/abc/vnc", "share=vs_x").is_ok());
        for (path, q) in [
            ("/api/v1/sandboxes/abc/shares", "share=vs_x"),
            ("/api/v1/sandboxes/abc/files", "sh%61re=vs_x"),
            ("/view/abc", "share=vs_x"),
        ] {
            let err = at(path, q).expect_err(path);
            assert_eq!(err.status, StatusCode::UNAUTHORIZED, "{path}?{q}");
        }
        for (path, q) in [
            ("/api/v1/sandboxes", "token=x"),
            ("/api/v1/sandboxes/abc", "token="),
            ("/api/v1/sandboxes/abc/exec", "to%6Ben=x"),
            ("/metrics", "token=x"),
            ("/", "token=x"),
            ("/api/v1/sandboxes//vnc", "token=x"),
            ("/api/v1/sandboxes/abc/vnc/x", "token=x"),
        ] {
            let err = at(path, q).expect_err(path);
            assert_eq!(err.status, StatusCode::UNAUTHORIZED, "{path}?{q}");
        }
    }

    #[test]
    fn control_characters_in_the_address_are_refused() {
        let g = Guard::new(&cfg());
        let h = headers(&[("host", "localhost")]);
        for (path, q) in [
            ("/api/v1/sandboxes/%00", None),
            ("/api/v1/sandboxes/a%0Db", None),
            ("/view/%1f", None),
            ("/x%7f", None),
            ("/api/v1/sandboxes", Some("x=%00")),
        ] {
            let err = g
                .check(&Method::GET, path, q, None, &h, loopback_peer())
                .expect_err(path);
            assert_eq!(err.status, StatusCode::BAD_REQUEST, "{path}");
        }
        for (path, q) in [
            ("/api/v1/sandboxes/%20%2F%E2%80%AE", None),
            ("/", Some("a=%41%7e")),
        ] {
            assert!(
                g.check(&Method::GET, path, q, None, &h, loopback_peer())
                    .is_ok(),
                "{path}"
            );
        }
    }

    #[test]
    fn settings_are_checked() {
        assert!(HostName::parse_setting("airlock.example.com").is_ok());
        assert!(HostName::parse_setting("airlock.example.com:8443").is_ok());
        assert!(HostName::parse_setting("[2001:db8::1]:443").is_ok());
        for bad in [
            "https://airlock.example.com",
            "a/b",
            "",
            "a b",
            "*.example.com",
            "x:y",
        ] {
            assert!(HostName::parse_setting(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_origin_setting("https://Dash.Example.org:443").expect("ok"),
            "https://dash.example.org"
        );
        assert_eq!(
            parse_origin_setting("http://localhost:3000/").expect("ok"),
            "http://localhost:3000"
        );
        for bad in [
            "dash.example.org",
            "ftp://a.b",
            "https://a.b/path",
            "https://u@a.b",
            "https://a.b?x",
        ] {
            assert!(parse_origin_setting(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers_keep_pages_out_of_foreign_frames() {
        let page = secure(Response::new(axum::body::Body::empty()), false);
        assert_eq!(page.headers()["x-frame-options"], "DENY");
        assert_eq!(
            page.headers()["content-security-policy"],
            "frame-ancestors 'none'"
        );
        assert_eq!(page.headers()["x-content-type-options"], "nosniff");
        assert_eq!(page.headers()["referrer-policy"], "no-referrer");
        let viewer = secure(Response::new(axum::body::Body::empty()), true);
        assert_eq!(viewer.headers()["x-frame-options"], "SAMEORIGIN");
        assert_eq!(
            viewer.headers()["content-security-policy"],
            "frame-ancestors 'self'"
        );
    }
}
