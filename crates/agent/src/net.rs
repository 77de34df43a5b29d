//! The guest's network interfaces: loopback up, and one interface given an
//! IPv4 address and a default route from `forkd.net=`.
//!
//! Written with the four classic interface ioctls rather than a netlink
//! crate: the agent is a small static PID 1, and an address, a netmask, the
//! up flag and one route are all it sets.

use std::io;
use std::net::Ipv4Addr;

/// One interface's configuration, from `forkd.net=`.
///
/// Syntax: `forkd.net=ADDR/PREFIX[,GATEWAY[,IFNAME]]`, the interface
/// defaulting to `eth0`. Example: `forkd.net=172.16.0.2/30,172.16.0.1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Interface name.
    pub ifname: String,
    /// The guest's address.
    pub addr: Ipv4Addr,
    /// Prefix length (1 to 32).
    pub prefix: u8,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

/// Parses the value of `forkd.net=`.
pub fn parse(s: &str) -> Result<NetConfig, String> {
    let bad = || {
        format!("bad network {s:?}: write ADDR/PREFIX[,GATEWAY[,IFNAME]], e.g. 172.16.0.2/30,172.16.0.1")
    };
    let mut parts = s.split(',');
    let (addr, prefix) = parts
        .next()
        .and_then(|a| a.split_once('/'))
        .ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if !(1..=32).contains(&prefix) {
        return Err(bad());
    }
    let gateway = match parts.next() {
        Some("") | None => None,
        Some(g) => Some(g.parse::<Ipv4Addr>().map_err(|_| bad())?),
    };
    let ifname = parts.next().unwrap_or("eth0").to_string();
    if ifname.is_empty()
        || ifname.len() >= libc::IFNAMSIZ
        || !ifname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || parts.next().is_some()
    {
        return Err(bad());
    }
    if let Some(g) = gateway {
        if !same_subnet(addr, g, prefix) {
            return Err(format!(
                "bad network {s:?}: the gateway {g} is not on {addr}/{prefix}"
            ));
        }
    }
    Ok(NetConfig {
        ifname,
        addr,
        prefix,
        gateway,
    })
}

fn mask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let m = u32::from(mask(prefix));
    u32::from(a) & m == u32::from(b) & m
}

/// An AF_INET datagram socket to issue interface ioctls on.
struct Ctl(libc::c_int);

impl Ctl {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2), checked.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Ctl(s))
    }

    /// An `ifreq` naming `ifname` (checked by the caller to fit IFNAMSIZ).
    fn ifreq(ifname: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (i, b) in ifname.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        ifr
    }

    fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T, what: &str) -> io::Result<()> {
        // SAFETY: every request passed here takes a pointer to `T` (an
        // ifreq or an rtentry) that lives across the call.
        if unsafe { libc::ioctl(self.0, req as _, arg as *mut T) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        Ok(())
    }

    fn set_up(&self, ifname: &str) -> io::Result<()> {
        let mut ifr = Self::ifreq(ifname);
        self.ioctl(libc::SIOCGIFFLAGS, &mut ifr, "read the flags")?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        self.ioctl(libc::SIOCSIFFLAGS, &mut ifr, "set it up")
    }

    fn set_ipv4(
        &self,
        ifname: &str,
        req: libc::c_ulong,
        addr: Ipv4Addr,
        what: &str,
    ) -> io::Result<()> {
        let mut ifr = Self::ifreq(ifname);
        // The ifreq union holds a struct sockaddr; write a sockaddr_in
        // into it (both are 16 bytes).
        let sin = sockaddr_in(addr);
        // SAFETY: the union is at least as large as sockaddr_in, and
        // sockaddr_in is plain data.
        unsafe {
            std::ptr::write_unaligned(
                std::ptr::addr_of_mut!(ifr.ifr_ifru).cast::<libc::sockaddr_in>(),
                sin,
            )
        };
        self.ioctl(req, &mut ifr, what)
    }

    fn add_default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        // SAFETY: rtentry is plain data; all zeroes is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        // SAFETY: each sockaddr member of rtentry is 16 bytes, the size
        // of sockaddr_in.
        unsafe {
            std::ptr::write_unaligned(
                std::ptr::addr_of_mut!(rt.rt_gateway).cast::<libc::sockaddr_in>(),
                sockaddr_in(gateway),
            );
            std::ptr::write_unaligned(
                std::ptr::addr_of_mut!(rt.rt_dst).cast::<libc::sockaddr_in>(),
                sockaddr_in(Ipv4Addr::UNSPECIFIED),
            );
            std::ptr::write_unaligned(
                std::ptr::addr_of_mut!(rt.rt_genmask).cast::<libc::sockaddr_in>(),
                sockaddr_in(Ipv4Addr::UNSPECIFIED),
            );
        }
        match self.ioctl(libc::SIOCADDRT, &mut rt, "add the default route") {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
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

/// Brings the loopback interface up (Python and many tools expect it).
pub fn loopback_up() -> io::Result<()> {
    Ctl::open()?.set_up("lo")
}

/// Gives the interface its address and netmask, brings it up and adds the
/// default route.
pub fn configure(cfg: &NetConfig) -> io::Result<()> {
    let ctl = Ctl::open()?;
    let name = cfg.ifname.as_str();
    ctl.set_ipv4(name, libc::SIOCSIFADDR, cfg.addr, "set the address")?;
    ctl.set_ipv4(
        name,
        libc::SIOCSIFNETMASK,
        mask(cfg.prefix),
        "set the netmask",
    )?;
    ctl.set_up(name)?;
    if let Some(g) = cfg.gateway {
        ctl.add_default_route(g)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms() {
        assert_eq!(
            parse("172.16.0.2/30,172.16.0.1").unwrap(),
            NetConfig {
                ifname: "eth0".into(),
                addr: Ipv4Addr::new(172, 16, 0, 2),
                prefix: 30,
                gateway: Some(Ipv4Addr::new(172, 16, 0, 1)),
            }
        );
        let c = parse("10.0.0.5/24,,eth1").unwrap();
        assert_eq!((c.ifname.as_str(), c.gateway), ("eth1", None));
        assert_eq!(parse("10.0.0.5/8").unwrap().gateway, None);
        for bad in [
            "",
            "10.0.0.5",
            "10.0.0.5/33",
            "10.0.0.5/0",
            "10.0.0.500/24",
            "10.0.0.5/24,10.0.1.1",
            "10.0.0.5/24,10.0.0.1,",
            "10.0.0.5/24,10.0.0.1,averyveryverylongname",
            "10.0.0.5/24,10.0.0.1,eth0,x",
            "10.0.0.5/24,10.0.0.1,et h0",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn masks() {
        assert_eq!(mask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(mask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(mask(1), Ipv4Addr::new(128, 0, 0, 0));
    }

    /// Configures loopback in a fresh network namespace of the test's own
    /// thread: it comes up with its address, and the default route goes
    /// through the gateway.
    #[test]
    fn configures_an_interface_in_a_private_namespace() {
        let handle = std::thread::spawn(|| {
            // SAFETY: unshare moves only this thread into a new network
            // namespace; the thread ends with the test.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "this test needs root (unshare CLONE_NEWNET): {}",
                    io::Error::last_os_error()
                ));
            }
            configure(&NetConfig {
                ifname: "lo".into(),
                addr: Ipv4Addr::new(127, 0, 0, 1),
                prefix: 8,
                gateway: Some(Ipv4Addr::new(127, 0, 0, 2)),
            })
            .map_err(|e| e.to_string())?;
            // Loopback up with its address: a UDP socket can talk to itself.
            let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            s.send_to(b"hi", s.local_addr().unwrap())
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 2];
            s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            s.recv(&mut buf).map_err(|e| e.to_string())?;
            let routes = std::fs::read_to_string("/proc/thread-self/net/route")
                .map_err(|e| e.to_string())?;
            Ok((buf, routes))
        });
        let (buf, routes) = handle.join().unwrap().unwrap();
        assert_eq!(&buf, b"hi");
        // Destination 0.0.0.0 through 127.0.0.2 (little-endian hex).
        assert!(
            routes.lines().any(|l| l
                .split_whitespace()
                .take(3)
                .eq(["lo", "00000000", "0200007F"])),
            "no default route through 127.0.0.2 on lo:\n{routes}"
        );
    }

    /// The configuration forkd-daemon gives its guests, on an interface
    /// named eth0 (a tap, made in a private namespace).
    #[test]
    fn configures_eth0_as_the_daemon_asks() {
        let handle = std::thread::spawn(|| -> Result<String, String> {
            // SAFETY: unshare moves only this thread into a new network
            // namespace; the thread ends with the test.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("needs root: {}", io::Error::last_os_error()));
            }
            // A child process forked from this thread starts in its namespace.
            let made = std::process::Command::new("ip")
                .args(["tuntap", "add", "dev", "eth0", "mode", "tap"])
                .status()
                .map_err(|e| format!("this test needs iproute2's ip: {e}"))?;
            if !made.success() {
                return Err("ip tuntap add dev eth0 mode tap failed".into());
            }
            configure(&parse("172.16.0.2/30,172.16.0.1")?).map_err(|e| e.to_string())?;
            std::fs::read_to_string("/proc/thread-self/net/route").map_err(|e| e.to_string())
        });
        let routes = handle.join().unwrap().unwrap();
        let has = |dst: &str, gw: &str| {
            routes
                .lines()
                .any(|l| l.split_whitespace().take(3).eq(["eth0", dst, gw]))
        };
        // 172.16.0.0/30 on the link, and the default route through .1.
        assert!(has("000010AC", "00000000"), "{routes}");
        assert!(has("00000000", "010010AC"), "{routes}");
    }
}
