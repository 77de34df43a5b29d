//! What the daemon keeps free of the host: disk under its state directory
//! (`--reserve-disk-mib`) and memory (`--reserve-memory-mib`). A request
//! that would start a sandbox or write a snapshot with less than that left
//! is refused with 503 and the figures, instead of filling the disk under
//! every sandbox's copy-on-write layers or letting the kernel's OOM killer
//! choose which VMM dies.
//!
//! What a request needs is estimated from what it makes: a snapshot's
//! memory file is as large as its guest's RAM (a diff is smaller; its
//! guest's RAM bounds it), a live-forkable child holds a private copy of
//! its snapshot's memory, a copy-on-write child holds only the pages it
//! writes (counted as nothing up front: the reserve is its room).

use std::path::Path;

use crate::error::{ApiError, ApiResult};

/// The reserves; 0 turns one off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserve {
    /// MiB of disk left free under the state directory.
    pub disk_mib: u64,
    /// MiB of memory left available (`MemAvailable`).
    pub memory_mib: u64,
}

impl Reserve {
    /// Refuses a request that would leave less than the disk reserve free
    /// under `dir` once it has written `needed_mib`.
    pub fn check_disk(&self, dir: &Path, needed_mib: u64, what: &str) -> ApiResult<()> {
        if self.disk_mib == 0 {
            return Ok(());
        }
        let free = free_disk_mib(dir).map_err(|e| {
            ApiError::internal(format!(
                "cannot tell the free disk under {}: {e}",
                dir.display()
            ))
        })?;
        decide(
            what,
            &format!("disk under {}", dir.display()),
            free,
            needed_mib,
            self.disk_mib,
            "--reserve-disk-mib",
            "delete snapshots or sandboxes you no longer need",
        )
    }

    /// Refuses a request that would leave less than the memory reserve
    /// available once it holds `needed_mib` more.
    pub fn check_memory(&self, needed_mib: u64, what: &str) -> ApiResult<()> {
        if self.memory_mib == 0 {
            return Ok(());
        }
        let meminfo = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| ApiError::internal(format!("cannot read /proc/meminfo: {e}")))?;
        let Some(free) = available_mib(&meminfo) else {
            return Err(ApiError::internal(
                "cannot tell the free memory: /proc/meminfo has no MemAvailable",
            ));
        };
        decide(
            what,
            "memory",
            free,
            needed_mib,
            self.memory_mib,
            "--reserve-memory-mib",
            "delete sandboxes you no longer need",
        )
    }
}

/// The refusal, or none: `free` MiB less `needed` must stay at least
/// `reserve`.
fn decide(
    what: &str,
    of: &str,
    free: u64,
    needed: u64,
    reserve: u64,
    flag: &str,
    fix: &str,
) -> ApiResult<()> {
    if free.saturating_sub(needed) >= reserve && free >= needed {
        return Ok(());
    }
    let needs = match needed {
        0 => String::new(),
        n => format!(" it needs about {n} MiB and"),
    };
    Err(ApiError::unavailable(format!(
        "{what} refused: {free} MiB of {of} is free;{needs} the daemon keeps {reserve} MiB free \
         ({flag}); {fix}, or try again later"
    )))
}

/// `MemAvailable` of `/proc/meminfo`, in MiB.
fn available_mib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

/// Free space of the file system holding `dir` as an unprivileged writer
/// sees it, in MiB (what only root may use is left as the file system's
/// own reserve).
fn free_disk_mib(dir: &Path) -> std::io::Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a zeroed statvfs is a valid value of the plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a struct we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let bytes = u128::from(st.f_bavail) * u128::from(st.f_frsize);
    Ok((bytes >> 20).min(u128::from(u64::MAX)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_refused_when_it_would_eat_into_the_reserve() {
        let d = |free, needed| decide("a spawn", "memory", free, needed, 256, "--r", "fix it");
        assert!(d(1000, 0).is_ok());
        assert!(d(1000, 744).is_ok());
        let e = d(1000, 745).unwrap_err();
        assert_eq!(e.status().as_u16(), 503);
        assert_eq!(
            e.message,
            "a spawn refused: 1000 MiB of memory is free; it needs about 745 MiB and the daemon \
             keeps 256 MiB free (--r); fix it, or try again later"
        );
        assert!(d(100, 0).is_err());
        assert!(d(0, u64::MAX).is_err());
    }

    #[test]
    fn available_memory_is_read_from_meminfo() {
        let text = "MemTotal:        8048576 kB\nMemFree:  100 kB\nMemAvailable:    2097152 kB\n";
        assert_eq!(available_mib(text), Some(2048));
        assert_eq!(available_mib("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn the_state_directory_s_free_disk_is_measured() {
        let r = Reserve {
            disk_mib: 1,
            memory_mib: 1,
        };
        let tmp = std::env::temp_dir();
        assert!(free_disk_mib(&tmp).unwrap() > 0);
        assert!(r.check_disk(&tmp, 0, "x").is_ok());
        let e = r.check_disk(&tmp, u64::MAX / 2, "a snapshot").unwrap_err();
        assert!(e.message.contains("--reserve-disk-mib"), "{}", e.message);
        assert!(r.check_memory(0, "x").is_ok());
        let off = Reserve {
            disk_mib: 0,
            memory_mib: 0,
        };
        assert!(off
            .check_disk(Path::new("/nonexistent"), u64::MAX, "x")
            .is_ok());
    }
}
