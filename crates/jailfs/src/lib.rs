//! The files a jailed VMM sees (README, "Threat model").
//!
//! A jailed VMM lives in a mount namespace of its own whose root is a
//! small tmpfs, owned by root, holding nothing but:
//!
//! - its own directory, bound at its host path (so every path the daemon
//!   and the fork server hand it means the same inside and out);
//! - a procfs that shows only processes it may trace (its own);
//! - while it writes a branch, that branch's directory, bound at its host
//!   path by a privileged process with [`bind_into`] and taken out again
//!   with [`unbind_from`].
//!
//! No device node: a jailed VMM opens `/dev/kvm`, its taps and its
//! userfaultfd before it enters the jail. Its SysV IPC namespace is its
//! own too (it uses none: nothing to share with another VMM).
//!
//! [`enter`] is the VMM's side, while it is root and has one thread.
//! Written against libc: the calls are a handful, and the new mount API
//! (`open_tree`, `move_mount`), which puts a host directory into another
//! namespace, has no well-kept crate.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

// From the kernel's uapi/linux/mount.h (not in the libc crate for glibc
// targets yet).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// Size of the jail's root tmpfs: directories only.
const ROOT_OPTIONS: &str = "size=64k,nr_inodes=1024,mode=0755";

/// Options of the jail's procfs: only the processes the VMM may trace (its
/// own) and none of the host-wide files.
const PROC_OPTIONS: &str = "hidepid=invisible,subset=pid";

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} holds a NUL byte", path.display()),
        )
    })
}

/// `Err` with what failed and the OS error, when `rc` is negative.
fn check(rc: libc::c_long, what: impl FnOnce() -> String) -> io::Result<libc::c_long> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("jail: {}: {e}", what())));
    }
    Ok(rc)
}

fn mount(
    source: Option<&CString>,
    target: &CString,
    fstype: Option<&CString>,
    flags: libc::c_ulong,
    data: Option<&CString>,
) -> libc::c_long {
    let ptr = |s: Option<&CString>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that
    // outlives the call.
    (unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    }) as libc::c_long
}

/// The normal, relative components of absolute `path`; an error for a
/// relative path or one with `..` (the jail binds a directory at exactly
/// its own path).
fn relative(path: &Path) -> io::Result<&Path> {
    let rel = path.strip_prefix("/").map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("jail: {} is not an absolute path", path.display()),
        )
    })?;
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "jail: {} must name a directory below / without . or ..",
                path.display()
            ),
        ));
    }
    Ok(rel)
}

/// Makes every directory of relative `path` below this thread's working
/// directory (0755 whatever the umask, owned by the caller: a jailed VMM
/// must pass through them), keeping those that are there.
fn make_dirs(path: &Path) -> io::Result<()> {
    let mut at = std::path::PathBuf::new();
    for c in path.components() {
        at.push(c);
        let name = cstr(&at)?;
        let fail = |what: &str| {
            let e = io::Error::last_os_error();
            io::Error::new(e.kind(), format!("jail: {what} {}: {e}", at.display()))
        };
        // SAFETY: `name` is a NUL-terminated path.
        if unsafe { libc::mkdir(name.as_ptr(), 0o755) } != 0 {
            if io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                return Err(fail("mkdir"));
            }
            continue;
        }
        // SAFETY: as above.
        if unsafe { libc::chmod(name.as_ptr(), 0o755) } != 0 {
            return Err(fail("chmod"));
        }
    }
    Ok(())
}

/// Moves this process into a mount (and IPC) namespace of its own whose
/// root holds only `own` (absolute: its directory, at that same path) and
/// a procfs of its own processes. The caller must be root with one thread
/// (a mount namespace is shared by threads) and must have opened every
/// other file it needs.
///
/// Fails where `/` is the initial ramfs (pivot_root cannot move it): run
/// from a real root file system, as `switch_root` gives one.
pub fn enter(own: &Path) -> io::Result<()> {
    pivot_into(own)?;
    detach_old_root()
}

/// [`enter`] up to its pivot_root: the old root is still stacked above
/// the new one.
fn pivot_into(own: &Path) -> io::Result<()> {
    let rel = relative(own)?;
    let own_c = cstr(own)?;
    // SAFETY: unshare takes flags only; the caller has one thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC) };
    check(rc.into(), || "unshare(CLONE_NEWNS | CLONE_NEWIPC)".into())?;
    // Nothing mounted here from now on reaches the host, nor the reverse.
    let slash = cstr(Path::new("/"))?;
    check(
        mount(None, &slash, None, libc::MS_REC | libc::MS_PRIVATE, None),
        || "make / private".into(),
    )?;
    // The directory itself, held before a tmpfs covers its path.
    // SAFETY: `own_c` is a NUL-terminated path; the result is checked.
    let fd = check(
        unsafe {
            libc::open(
                own_c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        } as libc::c_long,
        || format!("open {}", own.display()),
    )?;
    // SAFETY: a descriptor just opened and owned by nobody else.
    let held = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    // The new root: a tmpfs over the directory's path (in this namespace
    // only), which becomes the working directory.
    let tmpfs = CString::new("tmpfs").expect("no NUL");
    let name = CString::new("forkd-jail").expect("no NUL");
    let options = CString::new(ROOT_OPTIONS).expect("no NUL");
    check(
        mount(
            Some(&name),
            &own_c,
            Some(&tmpfs),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(&options),
        ),
        || format!("mount a tmpfs root on {}", own.display()),
    )?;
    std::env::set_current_dir(own)
        .map_err(|e| io::Error::new(e.kind(), format!("jail: chdir into the new root: {e}")))?;
    make_dirs(rel)?;
    let held_path = CString::new(format!("/proc/self/fd/{}", held.as_raw_fd())).expect("no NUL");
    let rel_c = cstr(rel)?;
    check(
        mount(Some(&held_path), &rel_c, None, libc::MS_BIND, None),
        || format!("bind {} into the new root", own.display()),
    )?;
    drop(held);
    make_dirs(Path::new("proc"))?;
    let proc_c = CString::new("proc").expect("no NUL");
    let proc_options = CString::new(PROC_OPTIONS).expect("no NUL");
    check(
        mount(
            Some(&proc_c),
            &proc_c,
            Some(&proc_c),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(&proc_options),
        ),
        || format!("mount a procfs ({PROC_OPTIONS})"),
    )?;
    let dot = CString::new(".").expect("no NUL");
    // pivot_root(".", "."): the old root is stacked on the new one, and
    // the lazy unmount takes it (and every host mount under it) away.
    // SAFETY: both arguments are NUL-terminated paths.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    check(rc, || {
        "pivot_root into the new root (where / is the initial ramfs, switch_root to a tmpfs first, or run with the jail off)".into()
    })?;
    Ok(())
}

/// The rest of [`enter`]: the old root, stacked above the new one since
/// the pivot (the working directory is there), goes.
fn detach_old_root() -> io::Result<()> {
    let dot = CString::new(".").expect("no NUL");
    // SAFETY: a NUL-terminated path and a flag.
    let rc = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check(rc.into(), || "detach the old root".into())?;
    std::env::set_current_dir("/")
        .map_err(|e| io::Error::new(e.kind(), format!("jail: chdir /: {e}")))?;
    Ok(())
}

/// Most a binder waits for a process to finish entering its jail.
const ENTER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until process `pid` has entered its jail (its root is no longer
/// this process's), at most [`ENTER_WAIT`]: a VMM may be asked for work
/// (its control socket, bound before, takes connections) while it still
/// sets its jail up, and a directory bound into a namespace it is about
/// to leave would be lost.
fn wait_entered(pid: i32) -> io::Result<()> {
    let ours = std::fs::metadata("/")?;
    let deadline = std::time::Instant::now() + ENTER_WAIT;
    loop {
        if root_of(pid)? != (ours.dev(), ours.ino()) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "jail: process {pid} is not in a jail of its own after {} s (is it jailed?)",
                    ENTER_WAIT.as_secs()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The mount namespace of process `pid`, or `None` when it is this
/// process's (an unjailed VMM: nothing to bind).
fn namespace_of(pid: i32) -> io::Result<Option<File>> {
    let theirs = File::open(format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| io::Error::new(e.kind(), format!("jail: process {pid}'s namespace: {e}")))?;
    let ours = std::fs::metadata("/proc/self/ns/mnt")?;
    let them = theirs.metadata()?;
    if (them.dev(), them.ino()) == (ours.dev(), ours.ino()) {
        return Ok(None);
    }
    Ok(Some(theirs))
}

/// The device and inode of process `pid`'s root directory.
fn root_of(pid: i32) -> io::Result<(u64, u64)> {
    let root = std::fs::metadata(format!("/proc/{pid}/root"))
        .map_err(|e| io::Error::new(e.kind(), format!("jail: process {pid}'s root: {e}")))?;
    Ok((root.dev(), root.ino()))
}

/// Runs `work` on a new thread that has joined mount namespace `ns`, when
/// that namespace's root (where a joining thread lands) is `root`, the
/// jail's: `None` while it is not. A jailed process's root is its jail's
/// from its pivot_root on, but until it has detached the old root, that
/// old root is stacked above, and a thread joining its namespace lands
/// there. This thread's own namespace is untouched.
fn inside<T: Send>(
    ns: &File,
    root: (u64, u64),
    work: &(impl Fn() -> io::Result<T> + Sync),
) -> io::Result<Option<T>> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // A thread shares its file system context (root, working
            // directory) with its process until it unshares it, and may
            // not change namespace while it does.
            // SAFETY: flags only.
            let rc = unsafe { libc::unshare(libc::CLONE_FS) };
            check(rc.into(), || "unshare(CLONE_FS)".into())?;
            // SAFETY: `ns` is an open namespace descriptor.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) };
            check(rc.into(), || "setns into the VMM's mount namespace".into())?;
            std::env::set_current_dir("/")?;
            let here = std::fs::metadata("/")?;
            if (here.dev(), here.ino()) != root {
                return Ok(None);
            }
            work().map(Some)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("jail: the binding thread panicked")))
    })
}

/// [`inside`] the jail of process `pid` (namespace `ns`), waiting at most
/// [`ENTER_WAIT`] for it to be complete.
fn in_jail<T: Send>(pid: i32, ns: &File, work: impl Fn() -> io::Result<T> + Sync) -> io::Result<T> {
    let root = root_of(pid)?;
    let deadline = std::time::Instant::now() + ENTER_WAIT;
    loop {
        if let Some(done) = inside(ns, root, &work)? {
            return Ok(done);
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "jail: process {pid}'s jail is not complete after {} s",
                    ENTER_WAIT.as_secs()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Binds host directory `dir` (absolute) into the jail of process `pid`
/// at the same path, so the jailed VMM can use it, once it is in its
/// jail (waiting a little for one still entering). The caller must be
/// root, and bind only into a process that jails itself.
pub fn bind_into(pid: i32, dir: &Path) -> io::Result<()> {
    let rel = relative(dir)?.to_owned();
    wait_entered(pid)?;
    let Some(ns) = namespace_of(pid)? else {
        return Err(io::Error::other(format!(
            "jail: process {pid} has a root of its own but this process's mount namespace"
        )));
    };
    let dir_c = cstr(dir)?;
    // A copy of the directory's mount, attached nowhere yet, made while
    // the host's paths are still the ones resolved.
    // SAFETY: a NUL-terminated path and flags; the result is checked.
    let fd = check(
        unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                dir_c.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )
        },
        || format!("open_tree {}", dir.display()),
    )?;
    // SAFETY: a descriptor just made and owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let rel_c = cstr(&rel)?;
    in_jail(pid, &ns, || {
        make_dirs(&rel)?;
        let empty = CString::new("").expect("no NUL");
        // SAFETY: `tree` is a detached mount; both paths are
        // NUL-terminated.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_FDCWD,
                rel_c.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        check(rc, || {
            format!("move_mount {} into process {pid}'s jail", rel.display())
        })?;
        Ok(())
    })
}

/// Takes `dir`, bound by [`bind_into`], out of process `pid`'s jail (and
/// the empty directory it was bound on); nothing when `pid` shares this
/// process's mount namespace or has gone.
pub fn unbind_from(pid: i32, dir: &Path) -> io::Result<()> {
    let rel = relative(dir)?.to_owned();
    let ns = match namespace_of(pid) {
        Ok(Some(ns)) => ns,
        Ok(None) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let rel_c = cstr(&rel)?;
    let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
    let done = in_jail(pid, &ns, || {
        // SAFETY: a NUL-terminated path and a flag.
        if unsafe { libc::umount2(rel_c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            // Not bound there (or not there at all): nothing to take out.
            if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "jail: unmount {} from process {pid}'s jail: {e}",
                        rel.display()
                    ),
                ));
            }
            return Ok(());
        }
        // SAFETY: a NUL-terminated path.
        unsafe { libc::rmdir(rel_c.as_ptr()) };
        Ok(())
    });
    match done {
        Err(e) if gone(&e) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bind asked for between a child's pivot_root and its detach of
    /// the old root (where a thread joining its namespace lands) waits
    /// for the detach, then lands in the jail.
    #[test]
    fn a_bind_waits_out_the_old_root_still_stacked_after_the_pivot() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "run this test as root");
        let base = std::path::PathBuf::from(format!("/tmp/jailfs-window-{}", std::process::id()));
        let (own, branch) = (base.join("own"), base.join("branch"));
        std::fs::create_dir_all(&own).unwrap();
        std::fs::create_dir_all(&branch).unwrap();
        std::fs::write(branch.join("b.txt"), "bound").unwrap();
        let mut go = [0i32; 2];
        let mut said = [0i32; 2];
        // SAFETY: arrays of two descriptors for pipe to fill.
        unsafe {
            assert_eq!(libc::pipe(go.as_mut_ptr()), 0);
            assert_eq!(libc::pipe(said.as_mut_ptr()), 0);
        }
        let byte = |fd: i32| {
            let mut b = [0u8; 1];
            // SAFETY: a one-byte buffer.
            unsafe { libc::read(fd, b.as_mut_ptr().cast(), 1) };
            b[0]
        };
        // SAFETY: a one-byte buffer.
        let send = |fd: i32, b: u8| unsafe { libc::write(fd, [b].as_ptr().cast(), 1) };
        // SAFETY: the child runs this test's code only, then _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let ok = pivot_into(&own).is_ok();
            send(said[1], ok as u8);
            // Held between the pivot and the detach until told.
            byte(go[0]);
            let ok = detach_old_root().is_ok();
            // Whether the bound directory is in its jail now.
            byte(go[0]);
            send(said[1], (ok && branch.join("b.txt").exists()) as u8);
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(0) };
        }
        // Killed and reaped however the test ends (a child left waiting
        // would hold the harness's output open).
        struct Reap(i32);
        impl Drop for Reap {
            fn drop(&mut self) {
                // SAFETY: our own child; a null status is allowed.
                unsafe {
                    libc::kill(self.0, libc::SIGKILL);
                    libc::waitpid(self.0, std::ptr::null_mut(), 0);
                }
            }
        }
        let _reap = Reap(pid);
        assert_eq!(byte(said[0]), 1, "the child could not pivot");
        let binder = {
            let branch = branch.clone();
            std::thread::spawn(move || bind_into(pid, &branch))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !binder.is_finished(),
            "the bind did not wait for the detach"
        );
        send(go[1], 1);
        binder.join().unwrap().unwrap();
        send(go[1], 1);
        assert_eq!(byte(said[0]), 1, "the bound directory is not in the jail");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn paths_bound_are_absolute_and_plain() {
        assert_eq!(
            relative(Path::new("/var/lib/x")).unwrap(),
            Path::new("var/lib/x")
        );
        for bad in ["var/x", "/", "/a/../b", ""] {
            assert!(relative(Path::new(bad)).is_err(), "{bad:?} was accepted");
        }
    }
}
