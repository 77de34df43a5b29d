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
