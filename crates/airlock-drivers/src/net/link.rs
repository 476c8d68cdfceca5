//! One sandbox's private link: a named network namespace and a veth pair whose
//! host end carries the gateway address. Nothing is shared between sandboxes.

use crate::host::{Cmd, Host, HostError};
use crate::Lease;

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

async fn create_steps(host: &dyn Host, names: &LinkNames, lease: &Lease) -> Result<(), HostError> {
    let host_cidr = format!("{}/{}", lease.host, lease.prefix_len);
    let guest_cidr = format!("{}/{}", lease.guest, lease.prefix_len);
    let ns = names.netns.as_str();
    let steps = [
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
    ];
    for step in &steps {
        host.run(step).await?;
    }
    Ok(())
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
}
