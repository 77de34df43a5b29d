//! Requests a guest answers, and their answers.

use serde::{Deserialize, Serialize};

/// A request to the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum GuestRequest {
    /// Is the guest alive, and what is it?
    Ping,
    /// The guest's per-boot identity value.
    Identity,
    /// Fill `mib` MiB of scratch memory, from `offset_mib` on, with the pattern for (`seed`, `seq`).
    Fill {
        /// Pattern seed.
        seed: u64,
        /// Sequence number.
        seq: u64,
        /// How much memory, in MiB.
        mib: u64,
        /// Where to start, in MiB past the start of scratch memory.
        #[serde(default)]
        offset_mib: u64,
    },
    /// Check `mib` MiB of scratch memory, from `offset_mib` on, against the pattern for (`seed`, `seq`).
    Verify {
        /// Pattern seed.
        seed: u64,
        /// Sequence number.
        seq: u64,
        /// How much memory, in MiB.
        mib: u64,
        /// Where to start, in MiB past the start of scratch memory.
        #[serde(default)]
        offset_mib: u64,
    },
    /// Start the guest's running counter.
    CounterStart,
    /// Read the counter.
    CounterRead,
    /// Stop the counter (answers its last value).
    CounterStop,
    /// Stamp every page of `mib` MiB of scratch memory (from `offset_mib`)
    /// once, then keep stamping them in the background, pass after pass.
    StampStart {
        /// How much memory, in MiB.
        mib: u64,
        /// Where to start, in MiB past the start of scratch memory.
        #[serde(default)]
        offset_mib: u64,
    },
    /// Check the stamp invariant: pages below the cursor carry the current
    /// pass, the others the previous one.
    StampVerify,
    /// Stop stamping.
    StampStop,
}

/// The guest's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestResponse {
    /// Answer to ping.
    Pong {
        /// What the guest says it is, e.g. `guest: builtin`.
        guest: String,
        /// vCPUs the guest sees.
        vcpus: u64,
    },
    /// Answer to identity.
    Identity {
        /// Per-boot identity value (inherited by restored children).
        boot_id: u64,
        /// VM generation: new at boot and at every restore.
        generation: u64,
    },
    /// Answer to fill.
    Filled {
        /// Bytes written.
        bytes: u64,
    },
    /// Answer to verify.
    Verified {
        /// Words that did not match.
        bad_words: u64,
        /// Address of the first word that did not match.
        first_bad_addr: Option<u64>,
    },
    /// Answer to the stamp operations.
    Stamp {
        /// Pages that break the invariant (verify only).
        bad_pages: u64,
        /// The pass being written.
        pass: u64,
        /// The next page to stamp.
        cursor: u64,
        /// Pages stamped (start only).
        pages: u64,
    },
    /// Answer to the counter operations.
    Counter {
        /// Counter value.
        value: u64,
    },
}
