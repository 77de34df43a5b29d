//! Live BRANCH pre-copy whose residue is too large for the pause: the pause
//! write-protects just those pages and they are copied after it. Forced
//! here with `FORKD_PRECOPY` (one round, nothing copied in the pause), in a
//! test binary of its own because the variable reaches every VMM this
//! process starts.

mod branch_common;
mod common;

use branch_common::{with_huge_pages, writes_after_live_branches_reach_the_next_diff, MEM_MIB};

fn residue_left_to_write_protection(backend: &str) {
    for meta in writes_after_live_branches_reach_the_next_diff(backend, true) {
        let copy = &meta["live_copy"];
        assert_eq!(copy["method"], "precopy", "{meta}");
        assert_eq!(copy["residue_write_protected"], true, "{meta}");
        assert!(copy["residue_pages"].as_u64().unwrap() > 0, "{meta}");
    }
}

#[test]
fn a_residue_too_large_for_the_pause_is_copied_under_write_protection() {
    // SAFETY (of the call): this binary's only test sets it before starting
    // any thread or VMM.
    std::env::set_var("FORKD_PRECOPY", "max_rounds=1,pause_copy_pages=0");
    residue_left_to_write_protection("memfd");
    with_huge_pages(MEM_MIB / 2, || {
        residue_left_to_write_protection("memfd-hugetlb")
    });
}
