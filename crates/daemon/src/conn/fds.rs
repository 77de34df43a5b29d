//! Room in the open-file limit for the connection cap: each connection
//! is a file descriptor, and one the daemon cannot accept (EMFILE) waits
//! in the listen backlog unanswered instead of getting its 503.

/// Descriptors the daemon needs besides its connections: the database,
/// logs, VMM control sockets, child pipes.
const HEADROOM: u64 = 256;

/// What the cap needs: `max_connections` served, as many being refused,
/// and [`HEADROOM`].
pub(super) fn needed(max_connections: usize) -> u64 {
    (max_connections as u64)
        .saturating_mul(2)
        .saturating_add(HEADROOM)
}

/// Raises the soft `RLIMIT_NOFILE` to `needed` when it is lower (up to
/// the hard limit); returns the soft limit in force, or why it could not
/// be read.
pub(super) fn make_room(needed: u64) -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given,
    // which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur >= needed {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: needed.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the rlimit it is given; a soft limit at or
    // under the hard one is allowed to any process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Ok(limit.rlim_cur);
    }
    Ok(raised.rlim_cur)
}

/// Makes room for `max_connections`, and warns, saying what to do, when
/// the hard limit leaves too little.
pub(super) fn check(max_connections: usize) {
    let needed = needed(max_connections);
    match make_room(needed) {
        Ok(have) if have >= needed => {}
        Ok(have) => tracing::warn!(
            "the open-file limit is {have}, and --max-connections {max_connections} needs about {needed}: past it, new connections wait unanswered; raise the hard limit (LimitNOFILE=, ulimit -Hn) or lower --max-connections"
        ),
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_needs_twice_its_connections_and_some() {
        assert_eq!(needed(1024), 2304);
        assert_eq!(needed(usize::MAX), u64::MAX);
    }

    fn soft_limit() -> libc::rlimit {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in make_room.
        let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(read, 0);
        limit
    }

    #[test]
    fn a_soft_limit_too_low_is_raised_and_one_high_enough_kept() {
        let before = soft_limit();
        assert_eq!(make_room(1).unwrap(), before.rlim_cur, "high enough");
        let lowered = libc::rlimit {
            rlim_cur: before.rlim_cur - 16,
            rlim_max: before.rlim_max,
        };
        // SAFETY: as in make_room; lowering the soft limit by a few is
        // allowed, and it is raised again just below.
        let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) };
        assert_eq!(set, 0);
        assert_eq!(make_room(before.rlim_cur).unwrap(), before.rlim_cur);
        assert_eq!(soft_limit().rlim_cur, before.rlim_cur);
    }
}
