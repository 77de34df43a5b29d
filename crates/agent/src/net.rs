//! The guest's network interfaces: loopback up, and one interface given an
//! IPv4 address and a default route from `forkd.net=` (through [`netif`]).

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
    if netif::check_ifname(&ifname).is_err() || parts.next().is_some() {
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

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let m = u32::from(netif::iface::netmask(prefix));
    u32::from(a) & m == u32::from(b) & m
}

/// Brings the loopback interface up (Python and many tools expect it).
pub fn loopback_up() -> io::Result<()> {
    netif::iface::set_up("lo")
}

/// Gives the interface its address and netmask, brings it up and adds the
/// default route.
pub fn configure(cfg: &NetConfig) -> io::Result<()> {
    let name = cfg.ifname.as_str();
    netif::iface::set_ipv4(name, cfg.addr, cfg.prefix)?;
    netif::iface::set_up(name)?;
    if let Some(g) = cfg.gateway {
        netif::iface::add_default_route(g)?;
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
