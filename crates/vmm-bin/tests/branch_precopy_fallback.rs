//! Live BRANCH pre-copy that cannot end with a short pause, forced with
//! `FORKD_PRECOPY` (one round, nothing copied in the pause), in a test
//! binary of its own because the variable reaches every VMM this process
//! starts:
//! - by default the pre-copy is abandoned after its rounds and the branch
//!   is a write-protected copy armed before the pause;
//! - with `abandon=0` the residue is write-protected in the pause and
//!   copied after it.

mod branch_common;
mod common;

use branch_common::{with_huge_pages, writes_after_live_branches_reach_the_next_diff, MEM_MIB};

fn precopy_abandoned(backend: &str) {
    for meta in writes_after_live_branches_reach_the_next_diff(backend, true) {
        let copy = &meta["live_copy"];
        assert_eq!(copy["method"], "write_protect", "{meta}");
        assert!(
            !copy["precopy_round_pages"].as_array().unwrap().is_empty(),
            "{meta}"
        );
        assert!(copy.get("residue_pages").is_none(), "{meta}");
    }
}

fn residue_left_to_write_protection(backend: &str) {
    for meta in writes_after_live_branches_reach_the_next_diff(backend, true) {
        let copy = &meta["live_copy"];
        assert_eq!(copy["method"], "precopy", "{meta}");
        assert_eq!(copy["residue_write_protected"], true, "{meta}");
        assert!(copy["residue_pages"].as_u64().unwrap() > 0, "{meta}");
    }
}

#[test]
fn a_precopy_that_cannot_end_in_a_short_pause_falls_back_to_write_protection() {
    // SAFETY (of the calls): this binary's only test sets the variable
    // while no VMM of it runs; the VMMs it starts after read it.
    std::env::set_var("FORKD_PRECOPY", "max_rounds=1,pause_copy_pages=0");
    precopy_abandoned("memfd");
    with_huge_pages(MEM_MIB / 2, || precopy_abandoned("memfd-hugetlb"));
    std::env::set_var("FORKD_PRECOPY", "max_rounds=1,pause_copy_pages=0,abandon=0");
    residue_left_to_write_protection("memfd");
    with_huge_pages(MEM_MIB / 2, || {
        residue_left_to_write_protection("memfd-hugetlb")
    });
}
