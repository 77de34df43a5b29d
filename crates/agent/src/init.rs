//! PID 1 duties: standard file descriptors, mounts, volumes from the kernel
//! command line, network interfaces, and a clean power-off. Every failure is logged
//! and survived: PID 1 exiting would panic the kernel.

use std::ffi::CString;
use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::log::log;

/// One volume to mount, from `forkd.volumes=`.
///
/// Syntax: `forkd.volumes=SRC:DEST[:FSTYPE[:OPTS]][,SRC:DEST...]`, where
/// `FSTYPE` defaults to `ext4` and `OPTS` (default `rw`) is a `+`-separated
/// list of mount options: `ro`, `rw`, `noatime`, `nosuid`, `nodev`,
/// `noexec`, `sync`; any other option is passed to the filesystem as data
/// (joined with commas). Example:
/// `forkd.volumes=/dev/vdb:/data,/dev/vdc:/models:ext4:ro+noatime,none:/scratch:tmpfs:size=1g`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// Device or source.
    pub source: String,
    /// Mount point (created if missing).
    pub dest: String,
    /// Filesystem type.
    pub fstype: String,
    /// MS_* flags.
    pub flags: u64,
    /// Filesystem-specific options.
    pub data: String,
}

/// Parses the value of `forkd.volumes=`.
pub fn parse_volumes(s: &str) -> Result<Vec<Volume>, String> {
    let mut out = Vec::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let parts: Vec<&str> = item.split(':').collect();
        if parts.len() < 2 || parts.len() > 4 || parts[0].is_empty() || !parts[1].starts_with('/') {
            return Err(format!(
                "bad volume {item:?}: write SRC:/DEST[:FSTYPE[:OPT+OPT]], e.g. /dev/vdb:/data:ext4:ro"
            ));
        }
        let fstype = parts.get(2).filter(|f| !f.is_empty()).unwrap_or(&"ext4");
        let mut flags = 0u64;
        let mut data = Vec::new();
        for opt in parts
            .get(3)
            .copied()
            .unwrap_or("")
            .split('+')
            .filter(|o| !o.is_empty())
        {
            match opt {
                "ro" => flags |= libc::MS_RDONLY,
                "rw" => flags &= !libc::MS_RDONLY,
                "noatime" => flags |= libc::MS_NOATIME,
                "nosuid" => flags |= libc::MS_NOSUID,
                "nodev" => flags |= libc::MS_NODEV,
                "noexec" => flags |= libc::MS_NOEXEC,
                "sync" => flags |= libc::MS_SYNCHRONOUS,
                other => data.push(other),
            }
        }
        out.push(Volume {
            source: parts[0].to_string(),
            dest: parts[1].to_string(),
            fstype: fstype.to_string(),
            flags,
            data: data.join(","),
        });
    }
    Ok(out)
}

/// Parses a kernel command line into `forkd.`-prefixed key/value pairs.
pub fn forkd_params(cmdline: &str) -> Vec<(String, String)> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("forkd."))
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a string"))
}

/// Mounts `source` on `dest`; an already mounted target (EBUSY) is fine.
pub fn mount(source: &str, dest: &str, fstype: &str, flags: u64, data: &str) -> io::Result<()> {
    if let Err(e) = fs::create_dir_all(dest) {
        if !Path::new(dest).is_dir() {
            return Err(e);
        }
    }
    let (src, dst, ty, dat) = (cstr(source)?, cstr(dest)?, cstr(fstype)?, cstr(data)?);
    let data_ptr = if data.is_empty() {
        std::ptr::null()
    } else {
        dat.as_ptr().cast()
    };
    // SAFETY: all strings are NUL-terminated and live across the call.
    let r = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), flags, data_ptr) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Mounts proc on /proc (already mounted is fine).
pub fn mount_proc() -> io::Result<()> {
    mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )
}

/// Makes sure fds 0, 1 and 2 are open (a kernel without /dev/console in
/// the initial rootfs starts init with none), so no socket ever becomes
/// "stderr".
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: opens /dev/null (static NUL-terminated path); the
            // lowest free fd, i.e. `fd`, is taken.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

/// Points stdout and stderr at /dev/console (after devtmpfs is mounted).
fn console_output() {
    // SAFETY: opens a static NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/dev/console".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return;
    }
    // SAFETY: dup2 onto the standard fds; `fd` is open and closed after.
    unsafe {
        libc::dup2(fd, 1);
        libc::dup2(fd, 2);
        libc::close(fd);
    }
}

/// Sets up the machine as PID 1: mounts, console, volumes, loopback, the
/// network interface of `forkd.net=`, env. Call before any thread exists
/// (it sets environment variables).
pub fn setup(volumes: &[Volume], net: Option<&crate::net::NetConfig>) {
    if let Err(e) = mount_proc() {
        log!("mount proc on /proc: {e}");
    }
    let base: [(&str, &str, &str, u64, &str); 5] = [
        (
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "ptmxmode=0666",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (src, dest, ty, flags, data) in base {
        if let Err(e) = mount(src, dest, ty, flags, data) {
            log!("mount {ty} on {dest}: {e}");
        }
        if dest == "/dev" {
            console_output();
        }
    }
    for v in volumes {
        match mount(&v.source, &v.dest, &v.fstype, v.flags, &v.data) {
            Ok(()) => log!("mounted {} on {} ({})", v.source, v.dest, v.fstype),
            Err(e) => log!("volume {} on {} ({}): {e}", v.source, v.dest, v.fstype),
        }
    }
    if let Err(e) = crate::net::loopback_up() {
        log!("loopback: {e}");
    }
    if let Some(n) = net {
        match crate::net::configure(n) {
            Ok(()) => log!(
                "{}: {}/{}{}",
                n.ifname,
                n.addr,
                n.prefix,
                n.gateway.map(|g| format!(" via {g}")).unwrap_or_default()
            ),
            Err(e) => log!("network {}: {e}", n.ifname),
        }
    }
    if std::env::var_os("PATH").is_none() {
        std::env::set_var(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    if std::env::var_os("HOME").is_none() {
        std::env::set_var("HOME", "/root");
    }
}

/// How the guest leaves when asked to power off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// `reboot(RB_AUTOBOOT)`: on forkd's microVM (kernel `reboot=k`) this
    /// resets through the i8042, which forkd-vmm treats as the VM's end.
    Reboot,
    /// `reboot(RB_POWER_OFF)`: needs ACPI or another power-off path.
    Poweroff,
}

/// As PID 1: ends every process, syncs, and leaves the machine. Returns
/// only if the final `reboot(2)` fails (which is logged).
pub fn shutdown(mode: ShutdownMode) {
    log!("shutting down ({mode:?})");
    // SAFETY: sync(2) has no arguments.
    unsafe { libc::sync() };
    // SAFETY: kill(-1) as PID 1 signals every other process.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        // SAFETY: kill(-1, 0) only checks whether any process is left.
        if unsafe { libc::kill(-1, 0) } != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above, with SIGKILL.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: sync(2) has no arguments.
    unsafe { libc::sync() };
    let cmd = match mode {
        ShutdownMode::Reboot => libc::RB_AUTOBOOT,
        ShutdownMode::Poweroff => libc::RB_POWER_OFF,
    };
    // SAFETY: reboot(2) with a valid command; it does not return on success.
    if unsafe { libc::reboot(cmd) } != 0 {
        log!("reboot({mode:?}) failed: {}", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_parse() {
        let v = parse_volumes(
            "/dev/vdb:/data,/dev/vdc:/models:ext4:ro+noatime,none:/s:tmpfs:size=1g+nosuid",
        )
        .unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(
            v[0],
            Volume {
                source: "/dev/vdb".into(),
                dest: "/data".into(),
                fstype: "ext4".into(),
                flags: 0,
                data: String::new()
            }
        );
        assert_eq!(v[1].flags, libc::MS_RDONLY | libc::MS_NOATIME);
        assert_eq!(v[2].fstype, "tmpfs");
        assert_eq!(v[2].data, "size=1g");
        assert_eq!(v[2].flags, libc::MS_NOSUID);
        assert!(parse_volumes("").unwrap().is_empty());
        assert!(parse_volumes("/dev/vdb").is_err());
        assert!(parse_volumes("/dev/vdb:relative").is_err());
        assert!(parse_volumes("a:/b:c:d:e").is_err());
    }

    #[test]
    fn cmdline_params() {
        let p = forkd_params(
            "console=ttyS0 reboot=k forkd.port=2000 forkd.volumes=/dev/vdb:/data quiet forkd.flag",
        );
        assert_eq!(
            p,
            vec![
                ("port".into(), "2000".into()),
                ("volumes".into(), "/dev/vdb:/data".into())
            ]
        );
    }
}
