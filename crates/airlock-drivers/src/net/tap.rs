//! One VM's private link: a TAP device whose host end carries the gateway
//! address of the sandbox's /30. The kernel's connected route for that /30 is
//! the whole routing: no bridge, so VMs cannot see each other.
//!
//! The TAP is named like the nspawn driver's host veth end (`al<id>`), so the
//! firewall hook matches a VM's traffic exactly as it matches a container's.
//!
//! This is the link of a VM whose VMM runs in the host's namespace (QEMU, and
//! Firecracker without its jailer). A jailed Firecracker runs in a namespace
//! of its own, with its TAP there: see `link::create_for_vm`.

use crate::host::{Cmd, Host, HostError};
use crate::net::link::LinkNames;
use crate::Lease;

/// The TAP device of sandbox `id` (at most 15 bytes, as Linux requires).
pub fn name(id: &str) -> String {
    LinkNames::for_sandbox(id).host_if
}

/// A locally administered, unicast MAC derived from the lease, so a guest
/// keeps its MAC across restarts and no two live VMs share one.
pub fn guest_mac(lease: &Lease) -> String {
    let [a, b, c, d] = lease.guest.octets();
    format!("06:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Create the TAP, address its host end and bring it up. On failure whatever
/// was made is removed again before the error returns.
pub async fn create(host: &dyn Host, tap: &str, lease: &Lease) -> Result<(), HostError> {
    create_owned(host, tap, lease, None).await
}

/// Like [`create`], with the TAP owned by `(uid, gid)`: an unprivileged VMM
/// (Firecracker under its jailer) may then open it.
pub async fn create_owned(
    host: &dyn Host,
    tap: &str,
    lease: &Lease,
    owner: Option<(u32, u32)>,
) -> Result<(), HostError> {
    let result = create_steps(host, tap, lease, owner).await;
    if result.is_err() {
        destroy(host, tap).await;
    }
    result
}

async fn create_steps(
    host: &dyn Host,
    tap: &str,
    lease: &Lease,
    owner: Option<(u32, u32)>,
) -> Result<(), HostError> {
    let host_cidr = format!("{}/{}", lease.host, lease.prefix_len);
    let steps = [
        Cmd::new("ip").args(add_args(tap, owner)),
        Cmd::new("ip").args(["addr", "add", &host_cidr, "dev", tap]),
        Cmd::new("ip").args(["link", "set", tap, "up"]),
    ];
    for step in &steps {
        host.run(step).await?;
    }
    Ok(())
}

/// The arguments of `ip` that add a persistent TAP, owned by `(uid, gid)` when given.
pub(crate) fn add_args(tap: &str, owner: Option<(u32, u32)>) -> Vec<String> {
    let mut args: Vec<String> = ["tuntap", "add", "dev", tap, "mode", "tap"]
        .map(str::to_owned)
        .into();
    if let Some((uid, gid)) = owner {
        args.extend([
            "user".to_owned(),
            uid.to_string(),
            "group".to_owned(),
            gid.to_string(),
        ]);
    }
    args
}

/// Remove the TAP (its address and route go with it); a missing TAP is not an error.
pub async fn destroy(host: &dyn Host, tap: &str) {
    let _ = host.run(&Cmd::new("ip").args(["link", "del", tap])).await;
}

/// Whether the TAP still exists.
pub async fn exists(host: &dyn Host, tap: &str) -> bool {
    host.run(&Cmd::new("ip").args(["link", "show", tap]))
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
            index: 1,
            host: Ipv4Addr::new(10, 235, 0, 5),
            guest: Ipv4Addr::new(10, 235, 0, 6),
            prefix_len: 30,
        }
    }

    #[tokio::test]
    async fn creates_an_addressed_tap_and_cleans_up_on_failure() {
        let host = FakeHost::default();
        create(&host, "alx", &lease()).await.expect("create");
        assert_eq!(
            host.commands(),
            [
                "ip tuntap add dev alx mode tap",
                "ip addr add 10.235.0.5/30 dev alx",
                "ip link set alx up"
            ]
        );
        let host = FakeHost::default();
        host.fail_on("addr add");
        assert!(create(&host, "alx", &lease()).await.is_err());
        assert_eq!(
            host.commands().last().map(String::as_str),
            Some("ip link del alx")
        );
    }

    #[test]
    fn mac_is_local_unicast_and_follows_the_lease() {
        let mac = guest_mac(&lease());
        assert_eq!(mac, "06:00:0a:eb:00:06");
        let first = u8::from_str_radix(&mac[..2], 16).expect("hex");
        assert_eq!(first & 0b11, 0b10, "locally administered, unicast");
        assert!(name("0123456789abcdef").len() <= 15);
    }
}
