//! Network namespaces for guests with a network interface: each holds a
//! persistent tap named [`TAP`] with the host side of the guest's link, so
//! every child of a snapshot finds the same tap, MAC and addresses its
//! parent had, and no two children share a link.
//!
//! Made with iproute2's `ip` (as `ip netns add` makes them, so `ip netns
//! exec` and every other tool see them); `forkd doctor` checks it is there.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use proto::api::{GUEST_ADDR, HOST_ADDR, NET_PREFIX};

/// The tap in every namespace (the name the snapshot's interface records).
pub const TAP: &str = "forkd0";
/// The guest's MAC address (kept by every child: the guest has it).
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";
/// The tap's MAC address. Fixed, because a restored guest's ARP cache
/// holds the parent's: a child's tap with another MAC would drop the
/// guest's frames.
pub const HOST_MAC: &str = "06:00:ac:10:00:01";

/// The kernel parameter that has forkd-agent configure the guest's side.
pub fn guest_kernel_arg() -> String {
    format!("forkd.net={GUEST_ADDR}/{NET_PREFIX},{HOST_ADDR}")
}

/// Where `ip netns add` puts a namespace.
fn path(name: &str) -> std::path::PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// Runs `ip` with `args` (and `stdin`, for `-batch -`).
fn ip(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        format!("cannot run `ip` (iproute2), which network namespaces need: {e}; install iproute2")
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Makes namespace `name` with loopback up and the tap [`TAP`] holding the
/// host side of the guest's link, up. A half-made namespace is removed.
pub fn create(name: &str) -> Result<(), String> {
    if path(name).exists() {
        return Err(format!(
            "network namespace {name} already exists (left by another run?); remove it: ip netns del {name}"
        ));
    }
    ip(&["netns", "add", name], None)?;
    let setup = format!(
        "link set lo up\n\
         tuntap add dev {TAP} mode tap\n\
         link set {TAP} address {HOST_MAC}\n\
         addr add {HOST_ADDR}/{NET_PREFIX} dev {TAP}\n\
         link set {TAP} up\n"
    );
    if let Err(e) = ip(&["-n", name, "-batch", "-"], Some(&setup)) {
        remove(name);
        return Err(format!("cannot set up network namespace {name}: {e}"));
    }
    Ok(())
}

/// Removes namespace `name` and its tap; one already gone is fine, a
/// failure is logged.
pub fn remove(name: &str) {
    if !path(name).exists() {
        return;
    }
    if let Err(e) = ip(&["netns", "del", name], None) {
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
        assert!(link.contains(HOST_MAC) && link.contains(",UP"), "{link}");
        assert!(again.unwrap_err().contains("already exists"));
        assert!(!path(&name).exists());
    }

    #[test]
    fn a_failed_set_of_namespaces_leaves_none() {
        let base = format!("forkd-test-set-{}", std::process::id());
        let mut set = Namespaces::default();
        set.add(format!("{base}-a")).unwrap();
        // An invalid name: `ip netns add` refuses a slash.
        assert!(set.add(format!("{base}/b")).is_err());
        assert_eq!(set.names().len(), 1);
        drop(set);
        assert!(!path(&format!("{base}-a")).exists());
    }
}
