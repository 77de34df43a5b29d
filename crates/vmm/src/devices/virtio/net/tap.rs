//! A tap device: the host end of a VM's network interface, optionally
//! created inside a network namespace.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;

/// TUNSETIFF: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Longest interface name (IFNAMSIZ less the terminating NUL).
pub const MAX_NAME_LEN: usize = 15;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Errors opening a tap device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// A name the kernel will not take.
    #[error("tap name {0:?} is invalid: use 1 to 15 letters, digits, '-' or '_'")]
    Name(String),
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
    /// The helper thread could not run.
    #[error("cannot start a thread to open the tap device: {0}")]
    Thread(io::Error),
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
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(TapError::Name(name.to_owned()));
        }
        let Some(ns) = netns else {
            return open_here(name);
        };
        // setns(2) moves only the calling thread: do it on a thread of its
        // own. The tap stays in the namespace it was created in.
        let (name, ns) = (name.to_owned(), ns.to_owned());
        std::thread::Builder::new()
            .name("tap-open".into())
            .spawn(move || {
                let path = format!("/var/run/netns/{ns}");
                let f = File::open(&path).map_err(|source| TapError::Netns {
                    name: ns.clone(),
                    source,
                })?;
                // SAFETY: setns on a namespace file descriptor we own, for
                // this thread only; no memory is involved.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(TapError::Netns {
                        name: ns,
                        source: io::Error::last_os_error(),
                    });
                }
                open_here(&name)
            })
            .map_err(TapError::Thread)?
            .join()
            .unwrap_or_else(|_| Err(TapError::Thread(io::Error::other("the thread panicked"))))
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file descriptor's file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn open_here(name: &str) -> Result<Tap, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::Tun)?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and may write back) a `struct ifreq`, which
    // `IfReq` lays out (40 bytes, name then flags); `req` outlives the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if r < 0 {
        return Err(TapError::Create {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(Tap {
        file,
        name: name.to_owned(),
    })
}
