//! One sandbox's private link: a named network namespace and a veth pair whose
//! host end carries the gateway address. Nothing is shared between sandboxes.
//!
//! The namespace's end of the veth is one of two things:
//!
//! ```text
//! nspawn:        host ─ al<id> (gateway/30) ══veth══ eth0 (guest/30, default via gateway)
//!                                                    └ the container's own interface
//!
//! jailed VM:     host ─ al<id> (gateway/30) ══veth══ eth0 ─┐
//!                                                          br0 (no address)
//!                          the guest (guest/30) ── tap0 ───┘
//! ```
//!
//! For a VM the namespace is where its jailed Firecracker runs: the TAP must be
//! there for it to open. A bridge of its own inside the namespace joins the TAP
//! to the veth, so the guest's frames reach the host end unchanged and the
//! guest keeps the lease's address and gateway; nothing in the namespace has an
//! address (IPv6 link-local included), so the guest can reach nothing in it.
//! Either way the host end is `al<id>`, where the firewall hook matches.

use crate::host::{Cmd, Host, HostError};
use crate::net::tap;
use crate::Lease;

/// The bridge inside a VM's namespace.
pub const VM_BRIDGE: &str = "br0";
/// The VM's TAP inside its namespace: every VM has a namespace of its own, so
/// one name serves all (and a snapshot names the same TAP wherever it is restored).
pub const VM_TAP: &str = "tap0";

/// Names derived from a sandbox id (interface names must fit in 15 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkNames {
    pub netns: String,
    pub host_if: String,
    /// The interface name inside the namespace.
    pub guest_if: String,
}

impl LinkNames {
    pub fn for_sandbox(id: &str) -> Self {
        let short: String = id
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        LinkNames {
            netns: format!("airlock-{short}"),
            host_if: format!("al{short}"),
            guest_if: "eth0".into(),
        }
    }
    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }
}

/// Create the namespace and link, addressed from `lease`. On failure, whatever
/// was made is removed again before the error returns.
pub async fn create(host: &dyn Host, names: &LinkNames, lease: &Lease) -> Result<(), HostError> {
    let result = create_steps(host, names, lease).await;
    if result.is_err() {
        destroy(host, names).await;
    }
    result
}

/// The namespace, the veth pair and the host end addressed and up: what both
/// kinds of link share.
fn host_side(names: &LinkNames, lease: &Lease) -> Vec<Cmd> {
    let host_cidr = format!("{}/{}", lease.host, lease.prefix_len);
    let ns = names.netns.as_str();
    vec![
        Cmd::new("ip").args(["netns", "add", ns]),
        Cmd::new("ip").args([
            "link",
            "add",
            &names.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &names.guest_if,
            "netns",
            ns,
        ]),
        Cmd::new("ip").args(["addr", "add", &host_cidr, "dev", &names.host_if]),
        Cmd::new("ip").args(["link", "set", &names.host_if, "up"]),
    ]
}

async fn create_steps(host: &dyn Host, names: &LinkNames, lease: &Lease) -> Result<(), HostError> {
    let guest_cidr = format!("{}/{}", lease.guest, lease.prefix_len);
    let ns = names.netns.as_str();
    let mut steps = host_side(names, lease);
    steps.extend([
        Cmd::new("ip").args(["-n", ns, "link", "set", "lo", "up"]),
        Cmd::new("ip").args(["-n", ns, "addr", "add", &guest_cidr, "dev", &names.guest_if]),
        Cmd::new("ip").args(["-n", ns, "link", "set", &names.guest_if, "up"]),
        Cmd::new("ip").args([
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &lease.host.to_string(),
        ]),
    ]);
    for step in &steps {
        host.run(step).await?;
    }
    Ok(())
}

/// Create a VM's namespace and link: the veth's far end and a TAP (owned by
/// `owner`, so an unprivileged VMM may open it) bridged inside the namespace.
/// On failure, whatever was made is removed again before the error returns.
pub async fn create_for_vm(
    host: &dyn Host,
    names: &LinkNames,
    lease: &Lease,
    owner: Option<(u32, u32)>,
) -> Result<(), HostError> {
    let result = create_for_vm_steps(host, names, lease, owner).await;
    if result.is_err() {
        destroy_for_vm(host, names).await;
    }
    result
}

async fn create_for_vm_steps(
    host: &dyn Host,
    names: &LinkNames,
    lease: &Lease,
    owner: Option<(u32, u32)>,
) -> Result<(), HostError> {
    let ns = names.netns.as_str();
    let in_ns = |args: &[&str]| Cmd::new("ip").args(["-n", ns]).args(args.iter().copied());
    let mut steps = host_side(names, lease);
    steps.extend([
        in_ns(&["link", "add", VM_BRIDGE, "type", "bridge"]),
        Cmd::new("ip")
            .args(["-n", ns])
            .args(tap::add_args(VM_TAP, owner)),
    ]);
    // No address in the namespace: an interface given `addrgenmode none` while
    // down never gets an IPv6 link-local one. (Set in the same command as `up`,
    // the kernel brings the link up first and the address is already there.)
    for dev in [VM_BRIDGE, names.guest_if.as_str(), VM_TAP] {
        steps.push(in_ns(&["link", "set", dev, "addrgenmode", "none"]));
    }
    for port in [names.guest_if.as_str(), VM_TAP] {
        steps.push(in_ns(&["link", "set", port, "master", VM_BRIDGE, "up"]));
    }
    steps.push(in_ns(&["link", "set", VM_BRIDGE, "up"]));
    for step in &steps {
        host.run(step).await?;
    }
    Ok(())
}

/// Remove a VM's link and namespace; missing pieces are not an error. The TAP
/// and bridge are deleted by name rather than left to the namespace's end:
/// a namespace some process still holds outlives `ip netns del`, and its
/// devices with it.
pub async fn destroy_for_vm(host: &dyn Host, names: &LinkNames) {
    for dev in [VM_TAP, VM_BRIDGE] {
        let _ = host
            .run(&Cmd::new("ip").args(["-n", &names.netns, "link", "del", dev]))
            .await;
    }
    destroy(host, names).await;
}

/// Remove the link and namespace; missing pieces are not an error.
pub async fn destroy(host: &dyn Host, names: &LinkNames) {
    // Deleting either end of a veth pair deletes both.
    let _ = host
        .run(&Cmd::new("ip").args(["link", "del", &names.host_if]))
        .await;
    let _ = host
        .run(&Cmd::new("ip").args(["netns", "del", &names.netns]))
        .await;
}

/// Whether the host end of the link still exists.
pub async fn exists(host: &dyn Host, names: &LinkNames) -> bool {
    host.run(&Cmd::new("ip").args(["link", "show", &names.host_if]))
        .await
        .is_ok()
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
    fn names_fit_linux_limits() {
        let names = LinkNames::for_sandbox("0123456789abcdef-extra");
        assert!(names.host_if.len() <= 15);
        assert_eq!(names.netns, "airlock-0123456789ab");
    }

    #[tokio::test]
    async fn failed_step_cleans_up_what_was_made() {
        let host = FakeHost::default();
        host.fail_on("route add");
        let names = LinkNames::for_sandbox("abc");
        let err = create(&host, &names, &lease()).await;
        assert!(err.is_err());
        let cmds = host.commands();
        let last_two = &cmds[cmds.len() - 2..];
        assert_eq!(last_two[0], "ip link del alabc");
        assert_eq!(last_two[1], "ip netns del airlock-abc");
    }

    #[tokio::test]
    async fn a_vm_link_bridges_its_tap_inside_the_namespace() {
        let host = FakeHost::default();
        let names = LinkNames::for_sandbox("abc");
        create_for_vm(&host, &names, &lease(), Some((123, 456)))
            .await
            .expect("create");
        assert_eq!(
            host.commands(),
            [
                "ip netns add airlock-abc",
                "ip link add alabc type veth peer name eth0 netns airlock-abc",
                "ip addr add 10.9.0.1/30 dev alabc",
                "ip link set alabc up",
                "ip -n airlock-abc link add br0 type bridge",
                "ip -n airlock-abc tuntap add dev tap0 mode tap user 123 group 456",
                "ip -n airlock-abc link set br0 addrgenmode none",
                "ip -n airlock-abc link set eth0 addrgenmode none",
                "ip -n airlock-abc link set tap0 addrgenmode none",
                "ip -n airlock-abc link set eth0 master br0 up",
                "ip -n airlock-abc link set tap0 master br0 up",
                "ip -n airlock-abc link set br0 up",
            ]
        );
        let made = host.commands().len();
        destroy_for_vm(&host, &names).await;
        assert_eq!(
            host.commands()[made..],
            [
                "ip -n airlock-abc link del tap0",
                "ip -n airlock-abc link del br0",
                "ip link del alabc",
                "ip netns del airlock-abc",
            ]
        );
    }

    #[tokio::test]
    async fn a_vm_link_that_fails_half_way_is_undone() {
        let host = FakeHost::default();
        host.fail_on("tap0 master br0");
        let names = LinkNames::for_sandbox("abc");
        assert!(create_for_vm(&host, &names, &lease(), None).await.is_err());
        let cmds = host.commands();
        assert_eq!(
            cmds[cmds.len() - 4..],
            [
                "ip -n airlock-abc link del tap0",
                "ip -n airlock-abc link del br0",
                "ip link del alabc",
                "ip netns del airlock-abc",
            ]
        );
    }
}
