//! A parked child's link to its server (a `SOCK_SEQPACKET` pair) and the
//! order the server hands it out with.
//!
//! An order is one message: an option byte, the length of the network
//! namespace's name (0: none), the disk quota in MiB (8 bytes, little
//! endian; 0: none), the name, and the child's directory path,
//! carrying as `SCM_RIGHTS` the control socket's listener when the server
//! made it (said by an option bit) and then the snapshot's taps, attached
//! by the server in the child's namespace (the child may not enter it). [`encode`] and [`decode`] are the message's bytes alone; the
//! send and receive around them are hand-written rather than
//! vmm-sys-util's `ScmSocket`, which neither refuses a truncated message
//! (`MSG_TRUNC`) nor receives descriptors close-on-exec nor sends without
//! SIGPIPE, all three of which a child that may be handed a dead link needs.

use std::io::{Error, ErrorKind};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use vmm::devices::virtio::net::tap::MAX_NETNS_LEN;

use super::ChildOptions;

/// Option bits of an order.
const ORDER_PAUSED: u8 = 1;
const ORDER_CONSOLE_LOG: u8 = 2;
const ORDER_PREWARM: u8 = 4;
/// The first descriptor that comes with the order is a listener.
const ORDER_LISTENER: u8 = 8;
/// Most descriptors an order carries: a listener and a tap for each of
/// the snapshot's network interfaces.
pub(super) const MAX_ORDER_FDS: usize = 1 + 16;
/// An order's header: the option byte, the length of the namespace name
/// and the disk quota.
const ORDER_HEADER: usize = 10;
/// Longest order: its header, a network namespace name and a directory path.
const MAX_ORDER: usize = ORDER_HEADER + MAX_NETNS_LEN + libc::PATH_MAX as usize;

/// An order as a parked child reads it.
#[derive(Debug)]
pub(super) struct Order {
    /// The child's directory.
    pub(super) dir: PathBuf,
    pub(super) options: ChildOptions,
    /// The network namespace its taps are in (`None`: the server's).
    pub(super) netns: Option<String>,
    /// The control socket the server made, when it did not rename the
    /// child's staged directory.
    pub(super) listener: Option<UnixListener>,
    /// The snapshot's taps, attached in `netns` by the server.
    pub(super) taps: Vec<std::fs::File>,
}

/// An order's bytes (the listener travels beside them).
pub(super) fn encode(
    dir: &Path,
    options: ChildOptions,
    netns: Option<&str>,
) -> std::io::Result<Vec<u8>> {
    let path = dir.as_os_str().as_bytes();
    let ns = netns.unwrap_or("").as_bytes();
    if ns.len() > MAX_NETNS_LEN {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("the network namespace name {netns:?} is too long"),
        ));
    }
    if path.is_empty() || path.len() >= libc::PATH_MAX as usize {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("the child directory {:?} is empty or too long a path", dir),
        ));
    }
    let mut data = Vec::with_capacity(ORDER_HEADER + ns.len() + path.len());
    let mut flags = 0;
    if options.paused {
        flags |= ORDER_PAUSED;
    }
    if options.console_log {
        flags |= ORDER_CONSOLE_LOG;
    }
    if options.prewarm {
        flags |= ORDER_PREWARM;
    }
    data.push(flags);
    data.push(ns.len() as u8);
    data.extend_from_slice(&options.disk_quota_mib.unwrap_or(0).to_le_bytes());
    data.extend_from_slice(ns);
    data.extend_from_slice(path);
    Ok(data)
}

/// An order's bytes read back: (directory, options, namespace). Refuses
/// anything [`encode`] does not make.
pub(super) fn decode(data: &[u8]) -> std::io::Result<(PathBuf, ChildOptions, Option<String>)> {
    let malformed = || Error::new(ErrorKind::InvalidData, "a malformed order");
    if data.len() < ORDER_HEADER || data.len() > MAX_ORDER {
        return Err(malformed());
    }
    if data[0] & !(ORDER_PAUSED | ORDER_CONSOLE_LOG | ORDER_PREWARM | ORDER_LISTENER) != 0 {
        return Err(malformed());
    }
    let options = ChildOptions {
        paused: data[0] & ORDER_PAUSED != 0,
        console_log: data[0] & ORDER_CONSOLE_LOG != 0,
        // Parked children map the memory file: memfd orders fork cold.
        memfd: false,
        huge_pages: false,
        prewarm: data[0] & ORDER_PREWARM != 0,
        disk_quota_mib: Some(u64::from_le_bytes(data[2..10].try_into().expect("8 bytes")))
            .filter(|&q| q != 0),
    };
    let ns_len = usize::from(data[1]);
    let path_at = ORDER_HEADER + ns_len;
    if ns_len > MAX_NETNS_LEN || path_at >= data.len() {
        return Err(malformed());
    }
    let netns = match &data[ORDER_HEADER..path_at] {
        [] => None,
        name => Some(String::from_utf8(name.to_vec()).map_err(|_| malformed())?),
    };
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&data[path_at..]));
    Ok((dir, options, netns))
}

/// Room for `n` descriptors in one `SCM_RIGHTS` message.
fn fds_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((n * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Sends a parked child its order, with the control socket's listener when
/// the server made it (the child's own staged one otherwise) and the
/// snapshot's `taps`.
pub(super) fn send_order(
    link: &OwnedFd,
    dir: &Path,
    options: ChildOptions,
    netns: Option<&str>,
    listener: Option<BorrowedFd<'_>>,
    taps: &[std::fs::File],
) -> std::io::Result<()> {
    let mut data = encode(dir, options, netns)?;
    if listener.is_some() {
        data[0] |= ORDER_LISTENER;
    }
    let fds: Vec<RawFd> = listener
        .map(|l| l.as_raw_fd())
        .into_iter()
        .chain(taps.iter().map(|t| t.as_raw_fd()))
        .collect();
    if fds.len() > MAX_ORDER_FDS {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{} taps are more than an order carries", taps.len()),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let space = fds_space(fds.len());
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain old data; every field used is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at `control`, which has room for one cmsghdr
        // carrying `fds` (CMSG_SPACE above); CMSG_FIRSTHDR is non-null for
        // a control buffer that large, and CMSG_DATA points inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as _;
            let at = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(at.add(i), *fd);
            }
        }
    }
    // SAFETY: `msg` and what it points at are valid for the call; MSG_NOSIGNAL
    // turns a dead peer into EPIPE instead of a signal.
    let sent = unsafe { libc::sendmsg(link.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(Error::last_os_error());
    }
    Ok(())
}

/// Waits for this parked child's order: `None` when the server closed the
/// link without one (it is gone).
pub(super) fn receive_order(link: &OwnedFd) -> std::io::Result<Option<Order>> {
    // One byte more than the longest order: a longer message is truncated
    // to it, and refused.
    let mut data = vec![0u8; MAX_ORDER + 1];
    let space = fds_space(MAX_ORDER_FDS);
    let mut control = vec![0u8; space];
    loop {
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain old data; every field used is set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at buffers that live across the call.
        let n = unsafe { libc::recvmsg(link.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: recvmsg filled `msg`; CMSG_FIRSTHDR/CMSG_DATA stay within
        // `control` (msg_controllen says how much of it is valid), and the
        // count comes from the header the kernel wrote. The descriptors
        // arrived with the message: new in this process and ours alone
        // (closed on every error path below).
        let fds: Vec<OwnedFd> = unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null()
                || (*cmsg).cmsg_level != libc::SOL_SOCKET
                || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            {
                Vec::new()
            } else {
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let at = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                (0..len / std::mem::size_of::<RawFd>())
                    .map(|i| OwnedFd::from_raw_fd(std::ptr::read_unaligned(at.add(i))))
                    .collect()
            }
        };
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(Error::new(ErrorKind::InvalidData, "a truncated order"));
        }
        let data = &data[..n as usize];
        let (dir, options, netns) = decode(data)?;
        let mut fds = fds.into_iter();
        let listener = if data[0] & ORDER_LISTENER != 0 {
            let fd = fds.next().ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidData,
                    "an order said a listener came, and none did",
                )
            })?;
            Some(UnixListener::from(fd))
        } else {
            None
        };
        return Ok(Some(Order {
            dir,
            options,
            netns,
            listener,
            taps: fds.map(std::fs::File::from).collect(),
        }));
    }
}

/// What a parked child's link holds, read without waiting.
pub(super) enum LinkNews {
    /// Its one-byte "ready" message.
    Ready,
    /// Its one-byte "cannot run ahead" message ([`RUN_AHEAD_REFUSED`]):
    /// its guest met a device on its way to its first wait, and it ends.
    RunAheadRefused,
    /// Its end: the child is gone.
    Closed,
    /// Nothing (more) yet.
    Nothing,
}

/// What a pooled child sends once its restore is prepared.
pub(super) const READY: u8 = b'R';
/// What a pooled child sends before it ends when its guest could not be
/// run ahead to its first wait (so its siblings should not try).
pub(super) const RUN_AHEAD_REFUSED: u8 = b'A';

pub(super) fn read_link(link: &OwnedFd) -> LinkNews {
    let mut byte = 0u8;
    // SAFETY: `byte` is a valid one-byte buffer; no wait.
    let n = unsafe {
        libc::recv(
            link.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_DONTWAIT,
        )
    };
    match n {
        1.. if byte == RUN_AHEAD_REFUSED => LinkNews::RunAheadRefused,
        1.. => LinkNews::Ready,
        0 => LinkNews::Closed,
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => LinkNews::Nothing,
            _ => LinkNews::Closed,
        },
    }
}

/// A `SOCK_SEQPACKET` pair (one order is one message; a closed end reads
/// as end of file), close-on-exec: (the server's end, the child's end).
pub(super) fn link_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a valid array of two ints for the new descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both descriptors are new and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn opts(paused: bool, console_log: bool) -> ChildOptions {
        ChildOptions {
            paused,
            console_log,
            memfd: false,
            huge_pages: false,
            // Varied with the others, so every bit is seen both ways.
            prewarm: paused != console_log,
            disk_quota_mib: paused.then_some(1 << 40 | 7),
        }
    }

    #[test]
    fn orders_round_trip_as_bytes() {
        for (dir, o, ns) in [
            ("/k/0", opts(false, false), None),
            ("/k/1", opts(true, false), Some("forkd-abc")),
            (
                "/a dir/é",
                opts(false, true),
                Some(&"n".repeat(MAX_NETNS_LEN)[..]),
            ),
            ("/k/3", opts(true, true), None),
        ] {
            let bytes = encode(Path::new(dir), o, ns).unwrap();
            let (d, back, n) = decode(&bytes).unwrap();
            assert_eq!(d, Path::new(dir));
            assert_eq!(
                (back.paused, back.console_log, back.memfd, back.prewarm),
                (o.paused, o.console_log, false, o.prewarm)
            );
            assert_eq!(back.disk_quota_mib, o.disk_quota_mib);
            assert_eq!(n.as_deref(), ns);
        }
    }

    #[test]
    fn what_encode_would_not_make_is_refused() {
        let long_ns = "n".repeat(MAX_NETNS_LEN + 1);
        assert!(encode(Path::new("/k"), opts(false, false), Some(&long_ns)).is_err());
        assert!(encode(Path::new(""), opts(false, false), None).is_err());
        let long_path = format!("/{}", "p".repeat(libc::PATH_MAX as usize));
        assert!(encode(Path::new(&long_path), opts(false, false), None).is_err());
        for bad in [
            &[][..],
            &[0],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0],             // no path
            &[0, 0, 0, 0, 0, 0, 0, 0, b'/'],             // a short quota
            &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'/'],      // an option bit nobody sends
            &[0, 3, 0, 0, 0, 0, 0, 0, 0, 0, b'a', b'b'], // the name runs past the message
            &[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, b'/'], // a name that is not UTF-8
            &[0, 200, 0, 0, 0, 0, 0, 0, 0, 0, b'/'],     // a name longer than any namespace's
        ] {
            assert_eq!(
                decode(bad).unwrap_err().kind(),
                ErrorKind::InvalidData,
                "{bad:?}"
            );
        }
        assert!(decode(&vec![0u8; MAX_ORDER + 1]).is_err());
    }

    #[test]
    fn an_order_crosses_the_link_with_and_without_a_listener_and_taps() {
        let (server, child) = link_pair().unwrap();
        // Two files stand for taps: the same files arrive, in order.
        let taps: Vec<std::fs::File> = (0..2)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        send_order(
            &server,
            Path::new("/k/7"),
            opts(true, false),
            Some("ns7"),
            None,
            &taps,
        )
        .unwrap();
        let o = receive_order(&child).unwrap().unwrap();
        assert_eq!(
            (o.dir.as_path(), o.netns.as_deref()),
            (Path::new("/k/7"), Some("ns7"))
        );
        assert!(o.options.paused && o.listener.is_none());
        let ino = |f: &std::fs::File| std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap());
        assert_eq!(
            o.taps.iter().map(ino).collect::<Vec<_>>(),
            taps.iter().map(ino).collect::<Vec<_>>()
        );
        let too_many: Vec<std::fs::File> = (0..MAX_ORDER_FDS)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let listener_too = UnixListener::bind(
            std::env::temp_dir().join(format!("forkd-order-l-{}", std::process::id())),
        );
        let l = listener_too.unwrap();
        assert!(send_order(
            &server,
            Path::new("/k"),
            opts(false, false),
            None,
            Some(l.as_fd()),
            &too_many
        )
        .is_err());
        let _ = std::fs::remove_file(
            std::env::temp_dir().join(format!("forkd-order-l-{}", std::process::id())),
        );

        let dir = std::env::temp_dir().join(format!("forkd-order-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("control.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        send_order(
            &server,
            &dir,
            opts(false, true),
            None,
            Some(listener.as_fd()),
            &taps[..1],
        )
        .unwrap();
        let o = receive_order(&child).unwrap().unwrap();
        assert_eq!(o.taps.len(), 1, "the tap after the listener");
        let got = o.listener.expect("the listener came along");
        // The descriptor is close-on-exec, and it is the same socket.
        // SAFETY: F_GETFD on a descriptor this test owns.
        let fd_flags = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFD) };
        assert!(fd_flags & libc::FD_CLOEXEC != 0);
        let _client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        got.accept().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        // A message longer than any order is refused, not cut short.
        let big = vec![0u8; MAX_ORDER + 10];
        // SAFETY: a plain send of a valid buffer on a descriptor we own.
        let n = unsafe { libc::send(server.as_raw_fd(), big.as_ptr().cast(), big.len(), 0) };
        assert_eq!(n as usize, big.len());
        assert_eq!(
            receive_order(&child).unwrap_err().kind(),
            ErrorKind::InvalidData
        );

        // The server gone: no order.
        drop(server);
        assert!(receive_order(&child).unwrap().is_none());
        assert!(matches!(read_link(&child), LinkNews::Closed));
    }
}
