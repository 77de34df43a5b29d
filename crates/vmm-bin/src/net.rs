//! The network namespaces a batch of children is given: checked before
//! anything is forked, so a request that cannot be served starts nothing.

use vmm::devices::virtio::net::check_netns_name;
use vmm::snapshot::PreparedSnapshot;

/// The taps of `snapshot`'s network interfaces, attached in `netns` (this
/// process's when `None`), in order: opened by a process that may, for a
/// VMM that gives up root before it runs.
pub fn open_taps(
    snapshot: &PreparedSnapshot,
    netns: Option<&str>,
) -> Result<Vec<std::fs::File>, String> {
    use vmm::devices::virtio::net::Tap;
    snapshot
        .meta
        .nets
        .iter()
        .map(|net| {
            Tap::attach(&net.tap, netns)
                .map(Tap::into_file)
                .map_err(|e| format!("tap {:?}: {e}", net.tap))
        })
        .collect()
}

/// Checks `netns` for `n` children of `snapshot`: one per child when given
/// (each a plain, distinct namespace name), required when the snapshot has
/// network interfaces and there is more than one child, and, for a
/// snapshot with network interfaces, that each namespace (this process's
/// when none is given) holds the taps the children will attach to.
pub fn check_namespaces(
    snapshot: &PreparedSnapshot,
    n: u32,
    netns: &[String],
) -> Result<(), String> {
    let taps: Vec<&str> = snapshot.meta.nets.iter().map(|t| t.tap.as_str()).collect();
    check_names(n, netns, &taps)?;
    if taps.is_empty() {
        return Ok(());
    }
    let each: Vec<Option<&str>> = if netns.is_empty() {
        vec![None]
    } else {
        netns.iter().map(|ns| Some(ns.as_str())).collect()
    };
    for (i, ns) in each.into_iter().enumerate() {
        vmm::builder::check_taps(snapshot, ns).map_err(|e| {
            if netns.is_empty() {
                e.to_string()
            } else {
                format!("child {i}: {e}")
            }
        })?;
    }
    Ok(())
}

/// The part of [`check_namespaces`] that looks at names only: `taps` are
/// the snapshot's tap names, in order.
fn check_names(n: u32, netns: &[String], taps: &[&str]) -> Result<(), String> {
    if !netns.is_empty() && netns.len() != n as usize {
        return Err(format!(
            "{} network namespaces were given for {n} children: give exactly one per child",
            netns.len()
        ));
    }
    for (i, ns) in netns.iter().enumerate() {
        check_netns_name(ns).map_err(|e| format!("child {i}: {e}"))?;
        if let Some(j) = netns[..i].iter().position(|other| other == ns) {
            return Err(format!(
                "network namespace {ns:?} is given for children {j} and {i}: each child needs \
                 its own (a tap serves one VM)"
            ));
        }
    }
    if !taps.is_empty() && n > 1 && netns.is_empty() {
        return Err(format!(
            "the snapshot has network interfaces (on tap {}): each of the {n} children needs a \
             network namespace of its own holding a tap of that name; give one per child \
             (--netns NS once per child, or \"netns\": [...] in a fork request)",
            taps.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn namespaces_are_one_per_child_distinct_and_plain_names() {
        let nic = ["forkd0"];
        assert_eq!(check_names(2, &names(&["a", "b"]), &nic), Ok(()));
        // One child may use this process's namespace; no NIC, no namespace.
        assert_eq!(check_names(1, &[], &nic), Ok(()));
        assert_eq!(check_names(5, &[], &[]), Ok(()));
        // Given for a snapshot without NICs: harmless, but still checked.
        assert_eq!(check_names(2, &names(&["a", "b"]), &[]), Ok(()));
        assert!(check_names(2, &names(&["a", "a/b"]), &[]).is_err());

        let err = check_names(2, &[], &nic).unwrap_err();
        assert!(
            err.contains("forkd0")
                && err.contains("each of the 2 children")
                && err.contains("--netns"),
            "{err}"
        );
        let err = check_names(3, &names(&["a", "b"]), &nic).unwrap_err();
        assert!(
            err.contains("2 network namespaces were given for 3 children"),
            "{err}"
        );
        let err = check_names(1, &names(&["a", "b"]), &nic).unwrap_err();
        assert!(err.contains("for 1 children"), "{err}");
        let err = check_names(3, &names(&["a", "b", "a"]), &nic).unwrap_err();
        assert!(err.contains("children 0 and 2"), "{err}");
        for bad in ["", "..", "../etc", "a b", &"x".repeat(65)] {
            let err = check_names(2, &names(&["ok", bad]), &nic).unwrap_err();
            assert!(err.starts_with("child 1: "), "{bad:?}: {err}");
        }
    }
}
