//! The stream snapshot memory hashes are defined over: (page index as a
//! little-endian u64, the 4 KiB page) records, one after another, hashed
//! with BLAKE3.
//!
//! Handing BLAKE3 one 8-byte index and then one page at a time is slow:
//! BLAKE3 hashes several 1 KiB chunks at once (SIMD) only when it is given
//! several at once, and the index shifts every page off the chunk
//! boundaries, so a quarter of each page goes through the one-block-at-a-
//! time path. [`PageHasher`] gathers records into a buffer and hands it
//! over whole: the hash is the same (BLAKE3 of a stream does not depend on
//! how the stream is split), at about three times the speed on the
//! development machine (bench/RESULTS.md, verify).

use super::PAGE;

/// Bytes of records gathered before they are hashed: enough for BLAKE3's
/// widest SIMD batches, small enough to stay in a core's cache.
const BATCH: usize = 256 * (8 + PAGE);

/// A BLAKE3 hasher of (page index, page) records.
pub(super) struct PageHasher {
    hasher: blake3::Hasher,
    batch: Vec<u8>,
}

impl PageHasher {
    pub(super) fn new() -> Self {
        PageHasher {
            hasher: blake3::Hasher::new(),
            batch: Vec::with_capacity(BATCH),
        }
    }

    /// Adds page number `index` with content `page` (one page).
    pub(super) fn page(&mut self, index: u64, page: &[u8]) {
        debug_assert_eq!(page.len(), PAGE);
        self.batch.extend_from_slice(&index.to_le_bytes());
        self.batch.extend_from_slice(page);
        if self.batch.len() + 8 + PAGE > BATCH {
            self.hasher.update(&self.batch);
            self.batch.clear();
        }
    }

    /// The hash of every record added, in lower-case hex.
    pub(super) fn finish(mut self) -> String {
        self.hasher.update(&self.batch);
        self.hasher.finalize().to_hex().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same hash as records handed to BLAKE3 one field at a time, for
    /// none, one, and more records than a batch holds.
    #[test]
    fn batching_does_not_change_the_hash() {
        for pages in [0u64, 1, 255, 256, 257, 1000] {
            let mut plain = blake3::Hasher::new();
            let mut batched = PageHasher::new();
            for i in 0..pages {
                let index = i * 3 + 1;
                let page = vec![(i % 251) as u8 ^ 0x5a; PAGE];
                plain.update(&index.to_le_bytes());
                plain.update(&page);
                batched.page(index, &page);
            }
            assert_eq!(
                batched.finish(),
                plain.finalize().to_hex().to_string(),
                "{pages} pages"
            );
        }
    }
}
