//! Where a sandbox may not go through its forward proxy: this host (loopback,
//! its own addresses, the sandbox address pool, so the control plane and
//! other guests) and addresses that are never a destination on the internet
//! (unspecified, link-local, multicast, broadcast).
//!
//! The user's upstream proxy may run on this host or next to it, where such
//! an address reaches us. So the target is checked here, before the upstream
//! sees it: a literal address as the URL parser reads it (`127.1`,
//! `0x7f000001` and `[::ffff:127.0.0.1]` are all loopback), a name after this
//! host resolves it. The upstream is then given the address that was checked,
//! never the name (it could resolve the name again, to another address: DNS
//! rebinding). A name this host cannot resolve is passed on as a name when
//! the upstream is far (a public address: what it reaches there, anyone on the
//! internet reaches), and refused when the upstream is near (on this host, or
//! a private, link-local or sandbox address), where the upstream could resolve
//! it to us.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the list of this host's own addresses is reused.
const OWN_TTL: Duration = Duration::from_secs(2);
/// How long a name may take to resolve before it is passed on unchecked.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a target is refused; the label of `airlock_egress_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    Loopback,
    LinkLocal,
    /// Unspecified, multicast, broadcast: not a host on any network.
    NotAHost,
    /// One of this host's own addresses.
    Host,
    /// In the sandbox address pool (the gateways and other guests).
    SandboxPool,
    /// A name this host cannot resolve, with an upstream that could resolve
    /// it to this host.
    Unresolved,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Loopback => "loopback",
            Refusal::LinkLocal => "link_local",
            Refusal::NotAHost => "not_a_host",
            Refusal::Host => "host_address",
            Refusal::SandboxPool => "sandbox_pool",
            Refusal::Unresolved => "unresolved",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Refusal::Loopback => "a loopback address",
            Refusal::LinkLocal => "a link-local address",
            Refusal::NotAHost => "an unspecified, multicast or broadcast address",
            Refusal::Host => "an address of the airlock host itself",
            Refusal::SandboxPool => "an address in the sandbox network",
            Refusal::Unresolved => {
                "a name the airlock host cannot resolve, and the upstream proxy is near enough to resolve it to this host"
            }
        }
    }
}

/// The networks a sandbox may not reach, besides the fixed ones.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// IPv4 networks as (base, prefix length): the sandbox address pool.
    pools: Vec<(Ipv4Addr, u8)>,
    /// Names the operator lets sandboxes reach though they may lead here
    /// (`egress_allow`): passed on to the upstream as names, unchecked.
    allowed: Vec<String>,
}

/// Where a request goes once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An address, checked: the upstream gets this.
    Addr(IpAddr),
    /// A name this host could not resolve: passed on as it is.
    Name(String),
    /// A name in `egress_allow`: passed on as it is, never refused.
    Allowed(String),
}

impl Target {
    /// The host as a URL or request line writes it (`[v6]`).
    pub fn host(&self) -> String {
        match self {
            Target::Addr(IpAddr::V6(ip)) => format!("[{ip}]"),
            Target::Addr(ip) => ip.to_string(),
            Target::Name(name) | Target::Allowed(name) => name.clone(),
        }
    }

    /// `host:port` for a request line.
    pub fn authority(&self, port: u16) -> String {
        format!("{}:{port}", self.host())
    }
}

/// A refused target: what the client wrote and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: Refusal,
    pub addr: Option<IpAddr>,
}

impl Guard {
    /// Also refuse `pool` (an IPv4 network, `base/len`).
    pub fn with_pool(mut self, base: Ipv4Addr, len: u8) -> Self {
        self.pools.push((base, len.min(32)));
        self
    }

    /// Pass these host names on unchecked (lower case, no trailing dot; a
    /// leading `.` covers every name under it).
    pub fn allowing(mut self, names: &[String]) -> Self {
        self.allowed = names
            .iter()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        self
    }

    fn allows(&self, name: &str) -> bool {
        self.allowed.iter().any(|a| match a.strip_prefix('.') {
            Some(parent) => name.len() > parent.len() && name.ends_with(a.as_str()),
            None => a == name,
        })
    }

    /// Why `ip` may not be reached, if it may not.
    pub fn check_addr(&self, ip: IpAddr) -> Option<Refusal> {
        let ip = match ip {
            IpAddr::V6(v6) => match embedded_v4(v6) {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            },
            v4 => v4,
        };
        if let Some(fixed) = fixed(ip) {
            return Some(fixed);
        }
        if let IpAddr::V4(v4) = ip {
            if self.pools.iter().any(|(base, len)| within(v4, *base, *len)) {
                return Some(Refusal::SandboxPool);
            }
        }
        own_addresses().contains(&ip).then_some(Refusal::Host)
    }

    /// Check the host of a request's target (`authority.host()`: a name, an
    /// IPv4 address in any form the URL parser takes, or `[v6]`), resolving
    /// names. `Err(None)` when the host is not a valid host at all.
    pub async fn check(&self, host: &str, port: u16) -> Result<Target, Option<Refused>> {
        let parsed = url::Host::parse(host).map_err(|_| None)?;
        let name = match parsed {
            url::Host::Ipv4(v4) => return self.checked(IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => return self.checked(IpAddr::V6(v6)),
            url::Host::Domain(name) => name,
        };
        let bare = name.trim_end_matches('.');
        if bare.is_empty() {
            return Err(None);
        }
        if bare == "localhost" || bare.ends_with(".localhost") {
            return Err(Some(Refused {
                reason: Refusal::Loopback,
                addr: None,
            }));
        }
        if self.allows(&bare.to_ascii_lowercase()) {
            return Ok(Target::Allowed(name));
        }
        let found = tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((bare.to_owned(), port)),
        )
        .await;
        let addrs: Vec<IpAddr> = match found {
            Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
            _ => Vec::new(),
        };
        // Every address the name has must pass: the upstream could pick any.
        for ip in &addrs {
            if let Some(reason) = self.check_addr(*ip) {
                return Err(Some(Refused {
                    reason,
                    addr: Some(*ip),
                }));
            }
        }
        Ok(match addrs.first() {
            Some(ip) => Target::Addr(*ip),
            None => Target::Name(name),
        })
    }

    /// Whether an upstream at `host` could reach this host's private side:
    /// it is on this host, or at a private, shared, link-local or sandbox
    /// address (a name: any of its addresses; unresolvable: near, to be safe).
    pub async fn near(&self, host: &str) -> bool {
        let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match tokio::time::timeout(
                RESOLVE_TIMEOUT,
                tokio::net::lookup_host((host.to_owned(), 0)),
            )
            .await
            {
                Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
                _ => Vec::new(),
            },
        };
        addrs.is_empty()
            || addrs
                .iter()
                .any(|ip| self.check_addr(*ip).is_some() || private(*ip))
    }

    fn checked(&self, ip: IpAddr) -> Result<Target, Option<Refused>> {
        match self.check_addr(ip) {
            Some(reason) => Err(Some(Refused {
                reason,
                addr: Some(ip),
            })),
            None => Ok(Target::Addr(ip)),
        }
    }
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`) IPv6 address.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let compat = s[..6].iter().all(|x| *x == 0) && u32::from(tail) > 1;
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    (compat || nat64).then_some(tail)
}

fn fixed(ip: IpAddr) -> Option<Refusal> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some(Refusal::Loopback)
            } else if v4.is_link_local() {
                Some(Refusal::LinkLocal)
            } else if v4.octets()[0] == 0 || v4.is_multicast() || v4.is_broadcast() {
                // 0.0.0.0/8 means "this host" to a kernel: loopback in effect.
                Some(Refusal::NotAHost)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some(Refusal::Loopback)
            } else if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                Some(Refusal::LinkLocal)
            } else if v6.is_unspecified() || v6.is_multicast() {
                Some(Refusal::NotAHost)
            } else {
                None
            }
        }
    }
}

/// RFC 1918, shared address space (RFC 6598), unique local IPv6.
fn private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || within(v4, Ipv4Addr::new(100, 64, 0, 0), 10),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => private(IpAddr::V4(v4)),
            None => (v6.segments()[0] & 0xfe00) == 0xfc00,
        },
    }
}

fn within(ip: Ipv4Addr, base: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(base) & mask
}

/// This host's own addresses (every interface), reread at most every
/// [`OWN_TTL`]: from the kernel's local routing table and IPv6 address list.
fn own_addresses() -> Vec<IpAddr> {
    static CACHE: Mutex<Option<(Instant, Vec<IpAddr>)>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, addrs)) = cache.as_ref() {
        if at.elapsed() < OWN_TTL {
            return addrs.clone();
        }
    }
    let mut addrs = std::fs::read_to_string("/proc/net/fib_trie")
        .map(|t| local_v4(&t))
        .unwrap_or_default();
    addrs.extend(
        std::fs::read_to_string("/proc/net/if_inet6")
            .map(|t| local_v6(&t))
            .unwrap_or_default(),
    );
    addrs.sort();
    addrs.dedup();
    *cache = Some((Instant::now(), addrs.clone()));
    addrs
}

/// The `/32 host LOCAL` entries of `/proc/net/fib_trie`.
fn local_v4(trie: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in trie.lines() {
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("|-- ") {
            last = addr.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            if let Some(ip) = last {
                out.push(IpAddr::V4(ip));
            }
        }
    }
    out
}

/// The addresses of `/proc/net/if_inet6` (32 hex digits first on each line).
fn local_v6(list: &str) -> Vec<IpAddr> {
    list.lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|hex| u128::from_str_radix(hex, 16).ok())
        .map(|n| IpAddr::V6(Ipv6Addr::from(n)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn fixed_ranges_and_the_pool_are_refused() {
        let g = Guard::default().with_pool(Ipv4Addr::new(10, 244, 0, 0), 16);
        for (addr, want) in [
            ("127.0.0.1", Refusal::Loopback),
            ("127.9.9.9", Refusal::Loopback),
            ("::1", Refusal::Loopback),
            ("::ffff:127.0.0.1", Refusal::Loopback),
            ("::127.0.0.1", Refusal::Loopback),
            ("64:ff9b::7f00:1", Refusal::Loopback),
            ("169.254.169.254", Refusal::LinkLocal),
            ("fe80::1", Refusal::LinkLocal),
            ("::ffff:169.254.1.1", Refusal::LinkLocal),
            ("0.0.0.0", Refusal::NotAHost),
            ("0.1.2.3", Refusal::NotAHost),
            ("::", Refusal::NotAHost),
            ("224.0.0.1", Refusal::NotAHost),
            ("255.255.255.255", Refusal::NotAHost),
            ("ff02::1", Refusal::NotAHost),
            ("10.244.0.1", Refusal::SandboxPool),
            ("10.244.255.254", Refusal::SandboxPool),
            ("::ffff:10.244.3.2", Refusal::SandboxPool),
        ] {
            assert_eq!(g.check_addr(ip(addr)), Some(want), "{addr}");
        }
        for addr in ["10.245.0.1", "192.0.2.200", "2001:db8::1", "8.8.8.8"] {
            assert_eq!(g.check_addr(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn own_addresses_are_read_from_the_kernel() {
        let trie = "Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n     \
                    |-- 192.0.2.255\n        /32 link BROADCAST\n     |-- 192.0.2.2\n        /32 host LOCAL\n";
        assert_eq!(local_v4(trie), vec![ip("127.0.0.1"), ip("192.0.2.2")]);
        let v6 = "fd000000000000000000000000000002 04 40 00 82     eth0\n";
        assert_eq!(local_v6(v6), vec![ip("fd00::2")]);
        // This machine's: loopback is always among them.
        assert!(own_addresses().contains(&ip("127.0.0.1")));
    }

    #[tokio::test]
    async fn names_and_odd_spellings_are_checked_as_addresses() {
        let g = Guard::default();
        for host in [
            "127.1",
            "0x7f000001",
            "2130706433",
            "0177.0.0.1",
            "[::ffff:7f00:1]",
            "localhost",
            "LOCALHOST.",
            "a.b.localhost",
        ] {
            let got = g.check(host, 80).await;
            assert!(
                matches!(&got, Err(Some(r)) if r.reason == Refusal::Loopback),
                "{host}: {got:?}"
            );
        }
        assert_eq!(
            g.check("192.0.2.200", 443).await,
            Ok(Target::Addr(ip("192.0.2.200")))
        );
        assert_eq!(g.check("", 80).await, Err(None));
        assert_eq!(
            Target::Addr(ip("2001:db8::1")).authority(443),
            "[2001:db8::1]:443"
        );
    }

    #[tokio::test]
    async fn an_upstream_is_near_when_it_could_reach_this_host() {
        let g = Guard::default().with_pool(Ipv4Addr::new(10, 244, 0, 0), 16);
        for near in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.9",
            "100.64.1.1",
            "fd00::1",
            "10.244.0.1",
            "localhost",
            "no-such-name.invalid",
        ] {
            assert!(g.near(near).await, "{near}");
        }
        for far in ["192.0.2.200", "198.51.100.7", "2001:db8::1"] {
            assert!(!g.near(far).await, "{far}");
        }
    }

    #[tokio::test]
    async fn a_name_is_refused_for_what_it_resolves_to() {
        // This host's own name resolves (hosts file or NSS) to one of its
        // addresses or loopback: a name is not a way around the check.
        let me = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
        let me = me.trim();
        let resolved: Vec<IpAddr> = tokio::net::lookup_host((me, 80))
            .await
            .map(|a| a.map(|a| a.ip()).collect())
            .unwrap_or_default();
        assert!(!resolved.is_empty(), "{me} does not resolve here");
        let got = Guard::default().check(me, 80).await;
        assert!(
            matches!(&got, Err(Some(r)) if matches!(r.reason, Refusal::Loopback | Refusal::Host)),
            "{me}: {got:?}"
        );
    }
}

#[cfg(test)]
mod allow_tests {
    use super::*;

    #[tokio::test]
    async fn allowed_names_pass_unchecked_and_nothing_else_does() {
        let guard = Guard::default().allowing(&["oauth.test".into(), ".corp.example".into()]);
        for name in ["oauth.test", "OAuth.Test.", "sso.corp.example"] {
            assert!(
                matches!(guard.check(name, 80).await, Ok(Target::Allowed(_))),
                "{name}"
            );
        }
        // Not the parent itself, not a look-alike, and no address: an
        // allowed name never opens loopback written as a literal.
        for name in ["corp.example", "evil-oauth.test", "localhost", "127.0.0.1"] {
            assert!(
                !matches!(guard.check(name, 80).await, Ok(Target::Allowed(_))),
                "{name}"
            );
        }
        assert!(Guard::default().check("localhost", 80).await.is_err());
    }
}
