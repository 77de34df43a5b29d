//! What a sandbox uses, read from the host: its VMM's CPU time and memory
//! from `/proc`, its disk layers' allocated size, its network interface's
//! byte counts (the VMM's network namespace, seen through its `/proc`).

use std::path::Path;
use std::time::SystemTime;

use proto::api::SandboxStats;

use crate::procs;
use crate::store::SandboxRow;

/// The tap every networked sandbox's guest interface is attached to.
const TAP: &str = "forkd0";

/// Samples `row` now.
pub fn sample(row: &SandboxRow) -> SandboxStats {
    let info = &row.info;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut s = SandboxStats {
        id: info.id.clone(),
        state: info.state,
        uptime_secs: now.saturating_sub(info.created_at_unix),
        ..SandboxStats::default()
    };
    if !info.state.has_vmm() || !procs::alive(info.pid, row.pid_start_ticks) {
        return s;
    }
    let pid = info.pid;
    s.cpu_seconds = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| cpu_ticks(&t))
        // SAFETY: sysconf has no preconditions.
        .map(|ticks| ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64);
    if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        let m = memory(&t);
        s.memory_rss_bytes = Some(m.rss);
        s.memory_private_bytes = Some(m.private);
        s.memory_shared_bytes = Some(m.shared);
    }
    s.disk_layer_bytes = Some(layers(&row.dir));
    if info.netns.is_some() {
        if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/net/dev")) {
            // The tap's receive is what the guest sent, and back.
            if let Some((rx, tx)) = net_dev(&t, TAP) {
                s.net_tx_bytes = Some(rx);
                s.net_rx_bytes = Some(tx);
            }
        }
    }
    s
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line, counted
/// after the command name's last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let mut f = stat[stat.rfind(')')? + 1..].split_whitespace();
    // Field 3 is the first after the name: 14 and 15 are the 12th and 13th.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Memory {
    rss: u64,
    private: u64,
    shared: u64,
}

/// Rss, Private_* and Shared_* of a `smaps_rollup`, in bytes.
fn memory(text: &str) -> Memory {
    let mut m = Memory::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kib: u64 = rest
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or(0);
        let bytes = kib.saturating_mul(1024);
        match key {
            "Rss" => m.rss = bytes,
            "Private_Clean" | "Private_Dirty" => m.private = m.private.saturating_add(bytes),
            "Shared_Clean" | "Shared_Dirty" => m.shared = m.shared.saturating_add(bytes),
            _ => {}
        }
    }
    m
}

/// Bytes allocated to the copy-on-write disk layers (`disk*.cow`) in `dir`.
fn layers(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("disk") && n.ends_with(".cow")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks().saturating_mul(512))
        .sum()
}

/// The receive and transmit byte counts of `dev` in a `/proc/net/dev`.
fn net_dev(text: &str, dev: &str) -> Option<(u64, u64)> {
    text.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != dev {
            return None;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((f.first()?.parse().ok()?, f.get(8)?.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "4242 (forkd vmm (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 150 25 0 0 20 0 3 0 12345 1000 200";
        assert_eq!(cpu_ticks(stat), Some(175));
        assert_eq!(cpu_ticks("garbage"), None);
        let rollup = "00400000-7fff0000 ---p 00000000 00:00 0 [rollup]\nRss: 2048 kB\nPss: 1500 kB\nShared_Clean: 1024 kB\nShared_Dirty: 0 kB\nPrivate_Clean: 512 kB\nPrivate_Dirty: 512 kB\n";
        assert_eq!(
            memory(rollup),
            Memory {
                rss: 2 << 20,
                private: 1 << 20,
                shared: 1 << 20
            }
        );
        let dev = "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes packets\n    lo: 10 1 0 0 0 0 0 0 10 1 0 0 0 0 0 0\nforkd0: 300 3 0 0 0 0 0 0 700 7 0 0 0 0 0 0\n";
        assert_eq!(net_dev(dev, "forkd0"), Some((300, 700)));
        assert_eq!(net_dev(dev, "eth0"), None);
    }

    /// Whatever a /proc file holds, the parsers answer without panicking.
    #[test]
    fn garbage_parses_without_panicking() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet = b") (:kB 0123456789\nRss:Private_Dirty:forkd0:";
        for _ in 0..2000 {
            let len = (x % 200) as usize;
            let s: String = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize] as char
                })
                .collect();
            let _ = cpu_ticks(&s);
            let _ = memory(&s);
            let _ = net_dev(&s, TAP);
            x = x.wrapping_add(1);
        }
    }
}
