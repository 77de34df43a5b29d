//! Small helpers every part of the daemon uses (a leaf: it imports no
//! other module of the daemon).

use std::time::Duration;

/// Seconds since the epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// `n` random bytes as lower-case hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the kernel's random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Free 2 MiB huge pages on this host (free and not reserved for a
/// mapping already); `None` without hugetlbfs.
pub fn free_huge_pages() -> Option<u64> {
    let dir = std::path::Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB");
    let read = |name: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(read("free_hugepages")?.saturating_sub(read("resv_hugepages").unwrap_or(0)))
}
