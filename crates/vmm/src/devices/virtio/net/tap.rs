//! A tap device: the host end of a VM's network interface, optionally
//! inside a network namespace.
//!
//! A booted VM opens its tap by name, creating it when missing
//! ([`Tap::open`]). A restored child attaches to a tap someone made for it
//! beforehand ([`Tap::attach`]), typically a persistent one in a namespace
//! of the child's own, and never creates one: a tap made on the spot would
//! have none of the addresses and routes the guest expects.

use std::ffi::CString;
use std::fs::File;
use std::io;

/// Longest interface name (IFNAMSIZ less the terminating NUL).
pub const MAX_NAME_LEN: usize = netif::MAX_IFNAME_LEN;
/// Longest network namespace name accepted.
pub const MAX_NETNS_LEN: usize = netif::netns::MAX_NAME_LEN;

/// Errors opening a tap device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// A name the kernel will not take.
    #[error("tap name {0:?} is invalid: use 1 to 15 letters, digits, '-' or '_'")]
    Name(String),
    /// A namespace name that is not a plain name under /var/run/netns.
    #[error("network namespace name {0:?} is invalid: use 1 to 64 letters, digits, '_', '.' or '-' (not . or ..)")]
    NetnsName(String),
    /// /dev/net/tun is missing or cannot be opened.
    #[error("cannot open /dev/net/tun: {0}; load the tun module (modprobe tun) and run as root or with CAP_NET_ADMIN")]
    Tun(io::Error),
    /// The namespace could not be entered.
    #[error("cannot enter network namespace {name:?} (/var/run/netns/{name}): {source}; create it first (ip netns add {name})")]
    Netns {
        /// The namespace.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// TUNSETIFF failed.
    #[error("cannot create tap device {name:?}: {source}; the name may be taken by a device that is not a free tap")]
    Create {
        /// The device name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// A tap to attach to is not there.
    #[error(
        "there is no tap {name:?} in {}: create it first ({})",
        where_(netns),
        create_hint(name, netns)
    )]
    Missing {
        /// The device name.
        name: String,
        /// The namespace looked in (`None`: this process's).
        netns: Option<String>,
    },
    /// TUNSETIFF on an existing device failed.
    #[error(
        "cannot attach to tap {name:?} in {}: {source}; {}",
        where_(netns),
        attach_hint(source)
    )]
    Attach {
        /// The device name.
        name: String,
        /// The namespace (`None`: this process's).
        netns: Option<String>,
        /// Why.
        source: io::Error,
    },
}

fn where_(netns: &Option<String>) -> String {
    match netns {
        Some(ns) => format!("network namespace {ns:?}"),
        None => "this process's network namespace".into(),
    }
}

fn create_hint(name: &str, netns: &Option<String>) -> String {
    let ip = match netns {
        Some(ns) => format!("ip -n {ns}"),
        None => "ip".into(),
    };
    format!(
        "{ip} tuntap add dev {name} mode tap, then give it its address and \
         `{ip} link set {name} up`"
    )
}

fn attach_hint(source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EBUSY) => "another process has it open: each VM needs a tap of its own",
        Some(libc::EPERM) => {
            "run as root or with CAP_NET_ADMIN, or make the tap owned by this user"
        }
        _ => {
            "it must be a tap device without packet information or multiple queues \
              (ip tuntap add dev NAME mode tap)"
        }
    }
}

/// Checks a tap name as the kernel will take it (and no more: letters,
/// digits, '-' and '_').
pub fn check_name(name: &str) -> Result<(), TapError> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(TapError::Name(name.to_owned()));
    }
    Ok(())
}

/// Checks a network namespace name: a plain file name under
/// /var/run/netns, 1 to [`MAX_NETNS_LEN`] letters, digits, '_', '.' or '-'.
pub fn check_netns_name(ns: &str) -> Result<(), TapError> {
    netif::netns::check_name(ns).map_err(|_| TapError::NetnsName(ns.to_owned()))
}

/// An open tap device (non-blocking), frames without a packet-info header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating if needed) tap `name`, inside network namespace
    /// `netns` (a name under /var/run/netns) when given.
    pub fn open(name: &str, netns: Option<&str>) -> Result<Self, TapError> {
        check_name(name)?;
        let name = name.to_owned();
        in_netns(netns, move || open_here(&name))
    }

    /// Attaches to the existing tap `name` (a persistent one, made
    /// beforehand) inside network namespace `netns` when given, in this
    /// process's otherwise. Never creates one: a missing tap is an error
    /// that says how to make it.
    pub fn attach(name: &str, netns: Option<&str>) -> Result<Self, TapError> {
        check_name(name)?;
        let (name, ns) = (name.to_owned(), netns.map(str::to_owned));
        in_netns(netns, move || {
            present_here(&name, &ns)?;
            open_here(&name).map_err(|e| match e {
                TapError::Create { name, source } => TapError::Attach {
                    name,
                    netns: ns,
                    source,
                },
                other => other,
            })
        })
    }

    /// Checks that tap `name` exists in `netns` (this process's when
    /// `None`), without opening it: what [`Tap::attach`] needs before it
    /// runs.
    pub fn check_present(name: &str, netns: Option<&str>) -> Result<(), TapError> {
        check_name(name)?;
        let (name, ns) = (name.to_owned(), netns.map(str::to_owned));
        in_netns(netns, move || present_here(&name, &ns))
    }

    /// The tap `name` opened by someone else (a process that may enter
    /// its namespace and attach it, for one that may not): `file` is its
    /// `/dev/net/tun` descriptor, attached as [`Tap::attach`] does.
    pub fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_owned(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file descriptor's file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its `/dev/net/tun` descriptor, for another process
    /// ([`Tap::from_file`]).
    pub fn into_file(self) -> File {
        self.file
    }
}

/// Runs `f` inside network namespace `netns` (a name under
/// /var/run/netns) on a thread of its own ([`netif::netns::run_in`]), or
/// here when `None`.
fn in_netns<T: Send>(
    netns: Option<&str>,
    f: impl FnOnce() -> Result<T, TapError> + Send,
) -> Result<T, TapError> {
    let Some(ns) = netns else {
        return f();
    };
    check_netns_name(ns)?;
    netif::netns::run_in(ns, || Ok(f())).map_err(|source| TapError::Netns {
        name: ns.to_owned(),
        source,
    })?
}

/// Whether interface `name` exists in the calling thread's network
/// namespace (an error saying how to make it when not).
fn present_here(name: &str, netns: &Option<String>) -> Result<(), TapError> {
    let c = CString::new(name).map_err(|_| TapError::Name(name.to_owned()))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call;
    // if_nametoindex asks the kernel through a socket it opens in the
    // calling thread's network namespace.
    if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
        return Err(TapError::Missing {
            name: name.to_owned(),
            netns: netns.clone(),
        });
    }
    Ok(())
}

/// TUNSETIFF for tap `name` in the calling thread's network namespace:
/// creates it when missing, attaches to it when it is a free tap.
fn open_here(name: &str) -> Result<Tap, TapError> {
    let file = netif::tun::open_tun().map_err(TapError::Tun)?;
    netif::tun::set_iff(&file, name).map_err(|source| TapError::Create {
        name: name.to_owned(),
        source,
    })?;
    Ok(Tap {
        file,
        name: name.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["forkd0", "a", "tap-1_x", "abcdefghijklmno"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "abcdefghijklmnop", "a b", "a/b", "a.b", "é"] {
            assert!(matches!(check_name(bad), Err(TapError::Name(_))), "{bad:?}");
        }
        for ok in ["n", "forkd-kid.1_A", &"x".repeat(64), "..."] {
            assert!(check_netns_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(65), "ns\n"] {
            assert!(
                matches!(check_netns_name(bad), Err(TapError::NetnsName(_))),
                "{bad:?}"
            );
        }
        // Checked before anything is entered or opened.
        assert!(matches!(
            Tap::attach("forkd0", Some("../../proc/1/ns/net")),
            Err(TapError::NetnsName(_))
        ));
    }

    #[test]
    fn a_missing_tap_is_not_created_by_attach() {
        let name = format!("fkm{}", std::process::id() % 100_000);
        let err = Tap::attach(&name, None).unwrap_err();
        assert!(matches!(err, TapError::Missing { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&name) && text.contains("ip tuntap add dev"),
            "{text}"
        );
        assert!(
            !std::path::Path::new("/sys/class/net").join(&name).exists(),
            "attach made {name}"
        );
    }
}
