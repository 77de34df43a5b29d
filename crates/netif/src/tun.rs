//! Tap devices.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;

use crate::{ifreq, os_error};

/// TUNSETIFF: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// TUNSETPERSIST: `_IOW('T', 203, int)`.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Opens /dev/net/tun (non-blocking, close-on-exec). The error is the
/// OS's, for the caller to explain.
pub fn open_tun() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
}

/// TUNSETIFF: binds `file` (an open /dev/net/tun) to tap `name` in the
/// calling thread's network namespace, without packet information; makes
/// the tap if there is none of that name, attaches to it if it is a free
/// persistent one. The error is the OS's (EBUSY: the tap is in use), for
/// the caller to explain.
pub fn set_iff(file: &File, name: &str) -> io::Result<()> {
    let mut ifr = ifreq(name)?;
    ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: TUNSETIFF reads (and may write back) an ifreq; `ifr` lives
    // across the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes tap `name` persistent in the calling thread's network namespace:
/// it stays when no process holds it, for a VM to attach to later.
pub fn create_persistent_tap(name: &str) -> io::Result<()> {
    let file = open_tun().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot open /dev/net/tun: {e}; load the tun module (modprobe tun) and run as root or with CAP_NET_ADMIN"),
        )
    })?;
    set_iff(&file, name)
        .map_err(|e| io::Error::new(e.kind(), format!("tap {name}: TUNSETIFF: {e}")))?;
    // SAFETY: TUNSETPERSIST takes an int by value.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_int) } < 0 {
        return Err(os_error(&format!("tap {name}: TUNSETPERSIST")));
    }
    Ok(())
}
