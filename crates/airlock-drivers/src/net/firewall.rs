//! Per-sandbox packet filtering (nftables): the host may reach the guest's
//! agent and VNC ports; the guest may reach only its gateway's proxy port.
//! (Owned by the egress work: `install` and `remove` are the driver's hooks.)
//!
//! The rules live on the host, never in the sandbox's own namespace: the guest
//! runs as root in a container that shares that namespace and could flush
//! anything put there. On the host side it can touch nothing.
//!
//! One shared table, `inet airlock`, holds two base chains that dispatch by
//! interface name through verdict maps, so the cost per packet does not grow
//! with the number of sandboxes:
//!
//! ```text
//! prerouting (priority -150, after conntrack) ── iifname vmap @from_guest ──▶ <if>_in
//! forward    (priority 0)                      ── oifname vmap @to_guest   ──▶ <if>_to
//! output     (priority 0)                      ── oifname @guest_links, socket not root ──▶ drop
//! ```
//!
//! The output chain keeps host users away from guests: the guest's agent and
//! VNC server trust whoever reaches them with the right secret, and only the
//! control plane (root) holds those, so a packet towards a sandbox's link
//! from a socket some other host user owns is dropped. Root is the owner to trust because airlock must run as root
//! anyway (namespaces, mounts, nftables); matching a socket cgroup instead
//! would need the control plane in a cgroup v2 path of its own, which hybrid
//! hosts do not give it. Packets without a full socket (a listener's SYN-ACK,
//! a kernel RST) carry no owner and are not matched.
//!
//! `<if>_in` sees every packet the guest sends, before routing, whether it is
//! addressed to the host itself or meant to be forwarded, and whether or not
//! the host forwards at all. It accepts replies of connections the host opened
//! (agent, VNC) and new TCP connections to `gateway:proxy_port`; everything
//! else is dropped and counted by kind. `<if>_to` drops anything forwarded
//! towards the guest from elsewhere. A sandbox's chains, counters and map
//! entries are added in one `nft` transaction and removed in one.

use crate::host::{Cmd, Host, HostError};
use crate::net::link::LinkNames;
use crate::Lease;

/// The shared table (family `inet`).
pub const TABLE: &str = "airlock";

/// The kinds of dropped packets counted per sandbox, in report order.
pub const KINDS: [&str; 5] = ["tcp", "udp", "icmp", "other", "link_local"];

fn counter_name(names: &LinkNames, kind: &str) -> String {
    format!("{}_{kind}", names.host_if)
}

/// The `nft` script that installs (or re-installs) one sandbox's rules.
pub fn install_script(names: &LinkNames, lease: &Lease, proxy_port: Option<u16>) -> String {
    let ifname = &names.host_if;
    let t = format!("inet {TABLE}");
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    // The shared skeleton; `add` of what exists is a no-op.
    line(format!("add table {t}"));
    line(format!(
        "add map {t} from_guest {{ type ifname : verdict; }}"
    ));
    line(format!("add map {t} to_guest {{ type ifname : verdict; }}"));
    line(format!(
        "add chain {t} prerouting {{ type filter hook prerouting priority -150; policy accept; }}"
    ));
    line(format!(
        "add chain {t} forward {{ type filter hook forward priority 0; policy accept; }}"
    ));
    line(format!("add set {t} guest_links {{ type ifname; }}"));
    line(format!(
        "add chain {t} output {{ type filter hook output priority 0; policy accept; }}"
    ));
    line(format!("flush chain {t} output"));
    line(format!(
        "add rule {t} output oifname @guest_links meta skuid != 0 drop"
    ));
    // The dispatch rules go in once: flushing the base chains and adding them
    // again keeps them single without a lookup (the maps keep their entries).
    line(format!("flush chain {t} prerouting"));
    line(format!("add rule {t} prerouting iifname vmap @from_guest"));
    line(format!("flush chain {t} forward"));
    line(format!("add rule {t} forward oifname vmap @to_guest"));
    // This sandbox.
    for kind in KINDS {
        line(format!("add counter {t} {}", counter_name(names, kind)));
    }
    line(format!("add counter {t} {ifname}_inbound"));
    let chain_in = format!("{ifname}_in");
    let chain_to = format!("{ifname}_to");
    line(format!("add chain {t} {chain_in}"));
    line(format!("flush chain {t} {chain_in}"));
    line(format!(
        "add rule {t} {chain_in} ct state established,related accept"
    ));
    if let Some(port) = proxy_port {
        line(format!(
            "add rule {t} {chain_in} ip daddr {} tcp dport {port} ct state new accept",
            lease.host
        ));
    }
    // IPv6 neighbour discovery and multicast listener reports never leave the
    // link; counted apart so they do not look like attempts to get out.
    line(format!(
        "add rule {t} {chain_in} ip6 daddr ff02::/16 counter name {} drop",
        counter_name(names, "link_local")
    ));
    for (kind, matcher) in [
        ("tcp", "meta l4proto tcp"),
        ("udp", "meta l4proto udp"),
        ("icmp", "meta l4proto { icmp, ipv6-icmp }"),
    ] {
        line(format!(
            "add rule {t} {chain_in} {matcher} counter name {} drop",
            counter_name(names, kind)
        ));
    }
    line(format!(
        "add rule {t} {chain_in} counter name {} drop",
        counter_name(names, "other")
    ));
    line(format!("add chain {t} {chain_to}"));
    line(format!("flush chain {t} {chain_to}"));
    line(format!(
        "add rule {t} {chain_to} counter name {ifname}_inbound drop"
    ));
    line(format!(
        "add element {t} from_guest {{ \"{ifname}\" : jump {chain_in} }}"
    ));
    line(format!(
        "add element {t} to_guest {{ \"{ifname}\" : jump {chain_to} }}"
    ));
    line(format!("add element {t} guest_links {{ \"{ifname}\" }}"));
    s
}

/// The `nft` script that removes one sandbox's rules (fails if any is missing).
pub fn remove_script(names: &LinkNames) -> String {
    remove_steps(names).join("\n") + "\n"
}

fn remove_steps(names: &LinkNames) -> Vec<String> {
    let ifname = &names.host_if;
    let t = format!("inet {TABLE}");
    let mut steps = vec![
        format!("delete element {t} from_guest {{ \"{ifname}\" }}"),
        format!("delete element {t} to_guest {{ \"{ifname}\" }}"),
        format!("delete element {t} guest_links {{ \"{ifname}\" }}"),
        format!("delete chain {t} {ifname}_in"),
        format!("delete chain {t} {ifname}_to"),
    ];
    for kind in KINDS {
        steps.push(format!("delete counter {t} {}", counter_name(names, kind)));
    }
    steps.push(format!("delete counter {t} {ifname}_inbound"));
    steps
}

/// Install the sandbox's rules, atomically. `proxy_port: None` lets nothing out.
pub async fn install(
    host: &dyn Host,
    names: &LinkNames,
    lease: &Lease,
    proxy_port: Option<u16>,
) -> Result<(), HostError> {
    // One invocation is one netlink batch: all of it applies, or none.
    host.run(&Cmd::new("nft").arg(install_script(names, lease, proxy_port)))
        .await
        .map(|_| ())
}

/// Remove the sandbox's rules; missing rules are not an error.
pub async fn remove(host: &dyn Host, names: &LinkNames) {
    if host
        .run(&Cmd::new("nft").arg(remove_script(names)))
        .await
        .is_ok()
    {
        return;
    }
    // Installs are atomic, so a failed removal means the rules are gone or
    // someone removed parts by hand: take away whatever is left, piece by piece.
    for step in remove_steps(names) {
        let _ = host.run(&Cmd::new("nft").arg(step)).await;
    }
}

/// Packets the rules dropped for one sandbox, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Blocked {
    /// Outbound, from the guest: TCP to anything but the proxy port.
    pub tcp: u64,
    /// Outbound UDP, DNS included.
    pub udp: u64,
    /// Outbound ICMP and ICMPv6.
    pub icmp: u64,
    /// Any other outbound packet.
    pub other: u64,
    /// IPv6 link-local multicast (neighbour discovery); never leaves the link.
    pub link_local: u64,
    /// Packets from elsewhere the host would have forwarded to the guest.
    pub inbound: u64,
}

impl Blocked {
    /// Outbound attempts to get out another way (link-local noise excluded).
    pub fn outbound(&self) -> u64 {
        self.tcp + self.udp + self.icmp + self.other
    }
}

/// Read the sandbox's drop counters; `None` when its rules are not installed.
pub async fn blocked(host: &dyn Host, names: &LinkNames) -> Result<Option<Blocked>, HostError> {
    let out = host
        .run(&Cmd::new("nft").args(["-j", "list", "counters", "table", "inet", TABLE]))
        .await;
    let out = match out {
        Ok(out) => out,
        Err(e) if e.stderr().is_some_and(|s| s.contains("No such file")) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(parse_counters(&out, names))
}

fn parse_counters(json: &str, names: &LinkNames) -> Option<Blocked> {
    let doc: serde_json::Value = serde_json::from_str(json).ok()?;
    let mut found = false;
    let mut b = Blocked::default();
    for item in doc.get("nftables")?.as_array()? {
        let Some(c) = item.get("counter") else {
            continue;
        };
        let Some(name) = c.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        let Some(kind) = name
            .strip_prefix(names.host_if.as_str())
            .and_then(|k| k.strip_prefix('_'))
        else {
            continue;
        };
        let packets = c.get("packets").and_then(|p| p.as_u64()).unwrap_or(0);
        let slot = match kind {
            "tcp" => &mut b.tcp,
            "udp" => &mut b.udp,
            "icmp" => &mut b.icmp,
            "other" => &mut b.other,
            "link_local" => &mut b.link_local,
            "inbound" => &mut b.inbound,
            _ => continue,
        };
        *slot = packets;
        found = true;
    }
    found.then_some(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::FakeHost;
    use std::net::Ipv4Addr;

    fn lease() -> Lease {
        Lease {
            index: 0,
            host: Ipv4Addr::new(10, 9, 0, 1),
            guest: Ipv4Addr::new(10, 9, 0, 2),
            prefix_len: 30,
        }
    }

    #[test]
    fn only_the_gateway_proxy_port_is_let_out() {
        let names = LinkNames::for_sandbox("abc123");
        let script = install_script(&names, &lease(), Some(3128));
        let accepts: Vec<&str> = script
            .lines()
            .filter(|l| l.contains("alabc123_in") && l.ends_with("accept"))
            .collect();
        assert_eq!(
            accepts,
            [
                "add rule inet airlock alabc123_in ct state established,related accept",
                "add rule inet airlock alabc123_in ip daddr 10.9.0.1 tcp dport 3128 ct state new accept",
            ]
        );
        // The chain ends in a drop that matches everything.
        let last_in = script
            .lines()
            .rfind(|l| l.starts_with("add rule inet airlock alabc123_in"))
            .expect("rules");
        assert_eq!(
            last_in,
            "add rule inet airlock alabc123_in counter name alabc123_other drop"
        );
        assert!(script
            .contains("add element inet airlock from_guest { \"alabc123\" : jump alabc123_in }"));
    }

    #[test]
    fn host_users_other_than_root_are_kept_off_the_guest_link() {
        let names = LinkNames::for_sandbox("abc123");
        let script = install_script(&names, &lease(), Some(3128));
        assert!(script.contains(
            "add chain inet airlock output { type filter hook output priority 0; policy accept; }"
        ));
        let output_rules: Vec<&str> = script
            .lines()
            .filter(|l| l.starts_with("add rule inet airlock output"))
            .collect();
        assert_eq!(
            output_rules,
            ["add rule inet airlock output oifname @guest_links meta skuid != 0 drop"]
        );
        assert!(script.contains("add element inet airlock guest_links { \"alabc123\" }"));
        assert!(remove_script(&names)
            .contains("delete element inet airlock guest_links { \"alabc123\" }"));
    }

    #[test]
    fn without_a_proxy_nothing_new_gets_out() {
        let names = LinkNames::for_sandbox("abc123");
        let script = install_script(&names, &lease(), None);
        assert!(!script.contains("dport"), "{script}");
        assert!(script.contains("ct state established,related accept"));
    }

    #[tokio::test]
    async fn install_and_remove_are_one_transaction_each() {
        let host = FakeHost::default();
        let names = LinkNames::for_sandbox("abc123");
        install(&host, &names, &lease(), Some(3128))
            .await
            .expect("install");
        remove(&host, &names).await;
        let cmds = host.commands();
        assert_eq!(cmds.len(), 2, "{cmds:?}");
        assert!(cmds[1].starts_with("nft delete element inet airlock from_guest"));
    }

    #[tokio::test]
    async fn a_partial_removal_falls_back_to_pieces() {
        let host = FakeHost::default();
        host.fail_on("to_guest { \"alabc123\" }");
        remove(&host, &LinkNames::for_sandbox("abc123")).await;
        // The batch, then every piece on its own.
        assert_eq!(host.commands().len(), 1 + 5 + KINDS.len() + 1);
    }

    #[test]
    fn counters_are_read_per_sandbox() {
        let json = r#"{"nftables":[{"metainfo":{}},
            {"counter":{"family":"inet","name":"alabc123_tcp","table":"airlock","handle":1,"packets":3,"bytes":180}},
            {"counter":{"family":"inet","name":"alabc123_udp","table":"airlock","handle":2,"packets":2,"bytes":60}},
            {"counter":{"family":"inet","name":"alother_tcp","table":"airlock","handle":3,"packets":9,"bytes":1}}]}"#;
        let b = parse_counters(json, &LinkNames::for_sandbox("abc123")).expect("found");
        assert_eq!((b.tcp, b.udp, b.icmp, b.outbound()), (3, 2, 0, 5));
        assert!(parse_counters(json, &LinkNames::for_sandbox("zzz")).is_none());
    }
}
