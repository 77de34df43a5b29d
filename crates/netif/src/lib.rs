//! Network interfaces and namespaces, by syscall.
//!
//! - [`iface`]: an interface's IPv4 address, MAC, up flag, the default route.
//! - [`tun`]: tap devices (TUNSETIFF, a persistent tap).
//! - [`netns`]: named network namespaces, made the way `ip netns add`
//!   makes them (a bind mount under `/run/netns`), so iproute2 and every
//!   other tool see them.
//!
//! Written by hand rather than over a netlink crate: forkd-agent (a small
//! static PID 1) and forkd-daemon need a handful of classic ioctls and two
//! mounts, and the well-kept netlink crates are async stacks larger than
//! all of this; the daemon used to run iproute2's `ip`, which spent more
//! CPU starting than the kernel spent making the namespace.

pub mod iface;
pub mod netns;
pub mod tun;

use std::io;

/// Longest interface name (IFNAMSIZ less the terminating NUL).
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Checks an interface name: 1 to 15 of letters, digits, `-`, `_`, `.`.
pub fn check_ifname(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() > MAX_IFNAME_LEN
        || name == "."
        || name == ".."
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} is invalid: use 1 to {MAX_IFNAME_LEN} letters, digits, '-', '_' or '.'"),
        ));
    }
    Ok(())
}

/// An `ifreq` naming `ifname` (checked).
fn ifreq(ifname: &str) -> io::Result<libc::ifreq> {
    check_ifname(ifname)?;
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in ifname.bytes().enumerate() {
        ifr.ifr_name[i] = b as libc::c_char;
    }
    Ok(ifr)
}

/// `what: <the OS error>`.
fn os_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        for ok in ["eth0", "forkd0", "a", "x.y-z_1", "fifteen-chars15"] {
            check_ifname(ok).unwrap();
        }
        for bad in ["", ".", "..", "sixteen-chars-16", "a b", "a/b", "é"] {
            assert!(check_ifname(bad).is_err(), "{bad:?} passed");
        }
    }
}
