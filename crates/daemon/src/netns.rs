//! Network namespaces for guests with a network interface: each holds a
//! persistent tap named [`TAP`] with the host side of the guest's link, so
//! every child of a snapshot finds the same tap, MAC and addresses its
//! parent had, and no two children share a link.
//!
//! Made by syscall ([`netif`]) the way `ip netns add` makes them, so `ip
//! netns exec` and every other tool see them.

use std::net::Ipv4Addr;

use proto::api::{GUEST_ADDR, HOST_ADDR, NET_PREFIX};

/// The tap in every namespace (the name the snapshot's interface records).
pub const TAP: &str = "forkd0";
/// The guest's MAC address (kept by every child: the guest has it).
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";
/// The tap's MAC address. Fixed, because a restored guest's ARP cache
/// holds the parent's: a child's tap with another MAC would drop the
/// guest's frames.
pub const HOST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x01];

/// The kernel parameter that has forkd-agent configure the guest's side.
pub fn guest_kernel_arg() -> String {
    format!("forkd.net={GUEST_ADDR}/{NET_PREFIX},{HOST_ADDR}")
}

/// Makes namespace `name` with loopback up and the tap [`TAP`] holding the
/// host side of the guest's link, up. A half-made namespace is removed.
pub fn create(name: &str) -> Result<(), String> {
    let host: Ipv4Addr = HOST_ADDR.parse().expect("a valid constant");
    netif::netns::create(name, || {
        netif::iface::set_up("lo")?;
        netif::tun::create_persistent_tap(TAP)?;
        netif::iface::set_mac(TAP, HOST_MAC)?;
        netif::iface::set_ipv4(TAP, host, NET_PREFIX)?;
        netif::iface::set_up(TAP)
    })
    .map_err(|e| e.to_string())
}

/// Removes namespace `name` and its tap; one already gone is fine, a
/// failure is logged.
pub fn remove(name: &str) {
    if let Err(e) = netif::netns::remove(name) {
        tracing::warn!("cannot remove network namespace {name}: {e}");
    }
}

/// Namespaces, all or none: removed when dropped unless kept.
#[derive(Default)]
pub struct Namespaces(Vec<String>);

impl Namespaces {
    /// Creates `name`, removed with the rest if this set is dropped.
    pub fn add(&mut self, name: String) -> Result<(), String> {
        create(&name)?;
        self.0.push(name);
        Ok(())
    }

    /// The names, in order.
    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// Keeps them: their owners remove them.
    pub fn keep(mut self) -> Vec<String> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A namespace holds the tap with the host's address and MAC, up;
    /// removing it takes the tap along; a second one of the same name is
    /// refused with what to do.
    #[test]
    fn a_namespace_holds_the_configured_tap() {
        let name = format!("forkd-test-ns-{}", std::process::id());
        remove(&name);
        create(&name).expect("root with iproute2 and /dev/net/tun");
        let show = Command::new("ip")
            .args(["-n", &name, "-o", "addr", "show", "dev", TAP])
            .output()
            .unwrap();
        let addrs = String::from_utf8_lossy(&show.stdout).into_owned();
        let link = Command::new("ip")
            .args(["-n", &name, "-o", "link", "show", "dev", TAP])
            .output()
            .unwrap();
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        let again = create(&name);
        remove(&name);
        assert!(
            addrs.contains(&format!("{HOST_ADDR}/{NET_PREFIX}")),
            "{addrs}"
        );
        assert!(
            link.contains("06:00:ac:10:00:01") && link.contains(",UP"),
            "{link}"
        );
        assert!(again.unwrap_err().contains("already exists"));
        assert!(!netif::netns::path(&name).exists());
    }

    #[test]
    fn a_failed_set_of_namespaces_leaves_none() {
        let base = format!("forkd-test-set-{}", std::process::id());
        let mut set = Namespaces::default();
        set.add(format!("{base}-a")).unwrap();
        // An invalid name: a slash.
        assert!(set.add(format!("{base}/b")).is_err());
        assert_eq!(set.names().len(), 1);
        drop(set);
        assert!(!netif::netns::path(&format!("{base}-a")).exists());
    }
}
