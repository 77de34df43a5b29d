//! Named network namespaces: a namespace kept alive by a bind mount of its
//! `ns/net` file on `/run/netns/<name>`, as iproute2 makes them (`ip netns
//! exec <name>` and `ip -n <name>` work on these).

use std::io;
use std::path::{Path, PathBuf};

use crate::os_error;

/// Where named namespaces live.
pub const RUN_DIR: &str = "/run/netns";
/// Longest namespace name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a namespace name: 1 to 64 of letters, digits, `_`, `.`, `-`,
/// not `.` or `..` (it is a file name under [`RUN_DIR`]).
pub fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name == "."
        || name == ".."
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("network namespace name {name:?} is invalid: use 1 to {MAX_NAME_LEN} letters, digits, '_', '.' or '-'"),
        ));
    }
    Ok(())
}

/// The file that names namespace `name`.
pub fn path(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(name)
}

fn cstring(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

/// mount(2) with C strings made here.
fn mount(src: &str, dst: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let (s, d, none) = (cstring(Path::new(src))?, cstring(dst)?, c"none");
    // SAFETY: every string is NUL-terminated and outlives the call; no
    // data argument.
    if unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            none.as_ptr(),
            flags,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(os_error(&format!("mount {src} on {}", dst.display())));
    }
    Ok(())
}

/// Makes [`RUN_DIR`] and, as iproute2 does, a shared mount, so the
/// namespaces mounted in it reach mount namespaces made later (`ip netns
/// exec` makes one). Once a process: a spawn makes many namespaces.
fn ensure_run_dir() -> io::Result<()> {
    static READY: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if READY.get().is_some() {
        return Ok(());
    }
    make_run_dir()?;
    let _ = READY.set(());
    Ok(())
}

fn make_run_dir() -> io::Result<()> {
    std::fs::create_dir_all(RUN_DIR)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {RUN_DIR}: {e}")))?;
    let dir = Path::new(RUN_DIR);
    let shared = libc::MS_SHARED | libc::MS_REC;
    if mount("", dir, shared).is_ok() {
        return Ok(());
    }
    // Not a mount point yet: bind it on itself, then share it.
    mount(RUN_DIR, dir, libc::MS_BIND | libc::MS_REC)?;
    mount("", dir, shared)
}

/// Makes namespace `name` and runs `setup` in it (on a thread of its own,
/// the only thread that enters it). A namespace of that name already there
/// is an error; a failed `setup` removes the namespace again.
pub fn create<F>(name: &str, setup: F) -> io::Result<()>
where
    F: FnOnce() -> io::Result<()> + Send,
{
    check_name(name)?;
    ensure_run_dir()?;
    let file = path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&file)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(
                    e.kind(),
                    format!("network namespace {name} already exists (left by another run?); remove it: ip netns del {name}"),
                )
            } else {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", file.display()))
            }
        })?;
    let made = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<()> {
            // SAFETY: moves only this thread, which ends here, into a new
            // network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(os_error("unshare(CLONE_NEWNET)"));
            }
            mount("/proc/thread-self/ns/net", &file, libc::MS_BIND)?;
            setup()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace's set-up panicked")))
    });
    if let Err(e) = made {
        let _ = remove(name);
        return Err(io::Error::new(
            e.kind(),
            format!("network namespace {name}: {e}"),
        ));
    }
    Ok(())
}

/// Removes namespace `name` (its interfaces go once no process is in it);
/// one that is not there is fine.
pub fn remove(name: &str) -> io::Result<()> {
    check_name(name)?;
    let file = path(name);
    let c = cstring(&file)?;
    // SAFETY: a NUL-terminated path; a lazy unmount of what is mounted
    // there (EINVAL: nothing is, ENOENT: no file).
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(io::Error::new(
                e.kind(),
                format!("unmount {}: {e}", file.display()),
            ));
        }
    }
    match std::fs::remove_file(&file) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io::Error::new(
            e.kind(),
            format!("remove {}: {e}", file.display()),
        )),
        _ => Ok(()),
    }
}

/// Runs `f` on a thread that has entered namespace `name` (setns moves
/// only the calling thread; what `f` opens, a tap or a socket, stays in
/// the namespace it was opened in). The error is the OS's about entering
/// the namespace (ENOENT: there is none of that name), for the caller to
/// explain; `f`'s own outcome is its return value.
pub fn run_in<T: Send, F: FnOnce() -> io::Result<T> + Send>(name: &str, f: F) -> io::Result<T> {
    check_name(name)?;
    let ns = std::fs::File::open(path(name))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::unix::io::AsRawFd;
            // SAFETY: setns on a namespace file we hold; moves only this
            // thread, which ends here.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("a thread in a namespace panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{iface, tun};
    use std::net::Ipv4Addr;

    /// `/proc/thread-self/net/<rel>` read from inside namespace `ns`.
    fn proc_net_in(ns: &str, rel: &str) -> String {
        let rel = rel.to_owned();
        run_in(ns, move || {
            std::fs::read_to_string(format!("/proc/thread-self/net/{rel}"))
        })
        .unwrap()
    }

    /// A namespace with a persistent tap set up in it: iproute2 sees it
    /// and the tap's address; removal takes both; a second one of the same
    /// name is refused; a failed set-up leaves nothing.
    #[test]
    fn a_namespace_with_a_configured_persistent_tap() {
        let name = format!("netif-test-{}", std::process::id());
        let _ = remove(&name);
        create(&name, || {
            iface::set_up("lo")?;
            tun::create_persistent_tap("tp0")?;
            iface::set_mac("tp0", [6, 0, 0xac, 0x10, 0, 1])?;
            iface::set_ipv4("tp0", Ipv4Addr::new(172, 16, 0, 1), 30)?;
            iface::set_up("tp0")
        })
        .expect("root and /dev/net/tun");
        let dev = proc_net_in(&name, "dev");
        let route = proc_net_in(&name, "route");
        let ip = std::process::Command::new("ip")
            .args(["-n", &name, "-o", "link", "show", "dev", "tp0"])
            .output();
        let again = create(&name, || Ok(()));
        remove(&name).unwrap();
        assert!(dev.contains("tp0:"), "{dev}");
        // 172.16.0.0/30 on tp0 (little-endian hex), so the address and
        // the up flag took.
        assert!(
            route
                .lines()
                .any(|l| l.split_whitespace().take(2).eq(["tp0", "000010AC"])),
            "{route}"
        );
        if let Ok(out) = ip {
            let link = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(link.contains("06:00:ac:10:00:01"), "{link}");
        }
        assert!(again.unwrap_err().to_string().contains("already exists"));
        assert!(!path(&name).exists());
        remove(&name).unwrap();

        let failed = create(&name, || Err(io::Error::other("set-up refused")));
        assert!(failed.unwrap_err().to_string().contains("set-up refused"));
        assert!(!path(&name).exists());
        assert!(create("../x", || Ok(())).is_err());
    }
}
