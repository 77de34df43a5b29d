//! An interface's IPv4 address and netmask, MAC, up flag, and the default
//! route, in the calling thread's network namespace.

use std::io;
use std::net::Ipv4Addr;

use crate::{ifreq, os_error};

/// The netmask of a prefix length (0 to 32).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix.min(32)))
            .unwrap_or(0),
    )
}

/// An AF_INET datagram socket to issue interface ioctls on.
struct Ctl(libc::c_int);

impl Ctl {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2), checked.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(os_error("socket"));
        }
        Ok(Ctl(s))
    }

    /// ioctl `req` with a pointer to `arg`.
    ///
    /// # Safety
    /// `req` must be a request that takes a pointer to a `T`.
    unsafe fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T, what: &str) -> io::Result<()> {
        // SAFETY: the caller vouches that `req` takes a `*mut T`; `arg`
        // lives across the call.
        if unsafe { libc::ioctl(self.0, req as _, arg as *mut T) } != 0 {
            return Err(os_error(what));
        }
        Ok(())
    }
}

impl Drop for Ctl {
    fn drop(&mut self) {
        // SAFETY: closes the socket this value owns.
        unsafe { libc::close(self.0) };
    }
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Writes `sin` over a `struct sockaddr` field (both are 16 bytes).
///
/// # Safety
/// `dst` must point to a `struct sockaddr` (or a union at least as large).
unsafe fn put_sockaddr(dst: *mut libc::sockaddr, sin: libc::sockaddr_in) {
    // SAFETY: per the caller, `dst` has room for 16 bytes; unaligned
    // writes are used because a union member carries no alignment promise.
    unsafe { std::ptr::write_unaligned(dst.cast::<libc::sockaddr_in>(), sin) }
}

/// Sets interface `ifname` up.
pub fn set_up(ifname: &str) -> io::Result<()> {
    let ctl = Ctl::open()?;
    let mut ifr = ifreq(ifname)?;
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS take an ifreq.
    unsafe {
        ctl.ioctl(
            libc::SIOCGIFFLAGS,
            &mut ifr,
            &format!("{ifname}: read its flags"),
        )?
    };
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    unsafe {
        ctl.ioctl(
            libc::SIOCSIFFLAGS,
            &mut ifr,
            &format!("{ifname}: set it up"),
        )
    }
}

/// Gives interface `ifname` the address `addr/prefix`.
pub fn set_ipv4(ifname: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let ctl = Ctl::open()?;
    for (req, value, what) in [
        (libc::SIOCSIFADDR, addr, "set its address"),
        (libc::SIOCSIFNETMASK, netmask(prefix), "set its netmask"),
    ] {
        let mut ifr = ifreq(ifname)?;
        // SAFETY: the ifreq union holds a struct sockaddr for these requests.
        unsafe {
            put_sockaddr(
                std::ptr::addr_of_mut!(ifr.ifr_ifru).cast(),
                sockaddr_in(value),
            )
        };
        // SAFETY: SIOCSIFADDR and SIOCSIFNETMASK take an ifreq.
        unsafe { ctl.ioctl(req, &mut ifr, &format!("{ifname}: {what}"))? };
    }
    Ok(())
}

/// Interface `ifname`'s IPv4 address and prefix length, `None` when it
/// has none.
pub fn ipv4(ifname: &str) -> io::Result<Option<(Ipv4Addr, u8)>> {
    let ctl = Ctl::open()?;
    let mut got = [Ipv4Addr::UNSPECIFIED; 2];
    for (slot, req, what) in [
        (0, libc::SIOCGIFADDR, "read its address"),
        (1, libc::SIOCGIFNETMASK, "read its netmask"),
    ] {
        let mut ifr = ifreq(ifname)?;
        // SAFETY: SIOCGIFADDR and SIOCGIFNETMASK take an ifreq.
        match unsafe { ctl.ioctl(req, &mut ifr, &format!("{ifname}: {what}")) } {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => return Ok(None),
            Err(e) => return Err(e),
        }
        // SAFETY: the kernel filled the union's struct sockaddr with an
        // AF_INET address (16 bytes, read unaligned: a union member carries
        // no alignment promise).
        let sin: libc::sockaddr_in = unsafe {
            std::ptr::read_unaligned(std::ptr::addr_of!(ifr.ifr_ifru).cast::<libc::sockaddr_in>())
        };
        got[slot] = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    }
    Ok(Some((got[0], u32::from(got[1]).count_ones() as u8)))
}

/// Interface `ifname`'s Ethernet address.
pub fn mac(ifname: &str) -> io::Result<[u8; 6]> {
    let ctl = Ctl::open()?;
    let mut ifr = ifreq(ifname)?;
    // SAFETY: SIOCGIFHWADDR takes an ifreq.
    unsafe {
        ctl.ioctl(
            libc::SIOCGIFHWADDR,
            &mut ifr,
            &format!("{ifname}: read its MAC"),
        )?
    };
    let mut mac = [0u8; 6];
    // SAFETY: the kernel filled the union's hwaddr member; plain data.
    let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    for (d, s) in mac.iter_mut().zip(data) {
        *d = s as u8;
    }
    Ok(mac)
}

/// Sets interface `ifname`'s Ethernet address.
pub fn set_mac(ifname: &str, mac: [u8; 6]) -> io::Result<()> {
    let ctl = Ctl::open()?;
    let mut ifr = ifreq(ifname)?;
    // SAFETY: the union's hwaddr member is a struct sockaddr; plain data.
    unsafe {
        let hw = &mut ifr.ifr_ifru.ifru_hwaddr;
        hw.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in hw.sa_data.iter_mut().zip(mac) {
            *d = s as libc::c_char;
        }
    }
    // SAFETY: SIOCSIFHWADDR takes an ifreq.
    unsafe {
        ctl.ioctl(
            libc::SIOCSIFHWADDR,
            &mut ifr,
            &format!("{ifname}: set its MAC"),
        )
    }
}

/// Adds the default route through `gateway` (one already there is fine).
pub fn add_default_route(gateway: Ipv4Addr) -> io::Result<()> {
    let ctl = Ctl::open()?;
    // SAFETY: rtentry is plain data; all zeroes is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: rt_gateway, rt_dst and rt_genmask are struct sockaddr fields.
    unsafe {
        put_sockaddr(&mut rt.rt_gateway, sockaddr_in(gateway));
        put_sockaddr(&mut rt.rt_dst, sockaddr_in(Ipv4Addr::UNSPECIFIED));
        put_sockaddr(&mut rt.rt_genmask, sockaddr_in(Ipv4Addr::UNSPECIFIED));
    }
    // SAFETY: SIOCADDRT takes an rtentry.
    match unsafe { ctl.ioctl(libc::SIOCADDRT, &mut rt, "add the default route") } {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is set on a tap reads back (in a namespace of the test's own).
    #[test]
    fn a_taps_address_and_mac_read_back() {
        let ns = format!("netif-iface-{}", std::process::id());
        let _ = crate::netns::remove(&ns);
        crate::netns::create(&ns, || {
            crate::tun::create_persistent_tap("t0")?;
            assert_eq!(ipv4("t0")?, None);
            set_mac("t0", [6, 1, 2, 3, 4, 5])?;
            set_ipv4("t0", Ipv4Addr::new(10, 7, 0, 1), 22)?;
            assert_eq!(mac("t0")?, [6, 1, 2, 3, 4, 5]);
            assert_eq!(ipv4("t0")?, Some((Ipv4Addr::new(10, 7, 0, 1), 22)));
            Ok(())
        })
        .expect("root and /dev/net/tun");
        crate::netns::remove(&ns).unwrap();
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(1), Ipv4Addr::new(128, 0, 0, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
    }
}
