//! Randomness from the kernel (getrandom(2)): a leaf every layer may use
//! (per-boot identities and VM generations in the builder, layer ids in the
//! block device, the entropy device's bytes).

/// Fills `buf` from getrandom(2), retrying on EINTR.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of
        // `buf`, a valid writable buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// A random value (per-boot identity, VM generation, layer id).
pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    fill_random(&mut buf).expect("getrandom of 8 bytes does not fail on Linux");
    u64::from_le_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_differ_and_large_buffers_fill() {
        assert_ne!(random_u64(), random_u64());
        let mut b = vec![0u8; 1 << 20];
        fill_random(&mut b).unwrap();
        assert!(b.iter().filter(|&&x| x == 0).count() < 1 << 14);
    }
}
