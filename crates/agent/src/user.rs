//! Exec's `user`: who a name or uid is in the guest's `/etc/passwd` and
//! `/etc/group`, and the switch to that user between fork and exec.
//!
//! The files are parsed here rather than through `getpwnam`: the agent is
//! a static binary, where glibc's NSS lookups cannot load their modules,
//! and a guest's user database is the two flat files.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Largest `/etc/passwd` or `/etc/group` read.
const MAX_DB: u64 = 4 << 20;
/// Most supplementary groups set.
const MAX_GROUPS: usize = 64;

/// A resolved user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Name (the uid in decimal when it has no passwd entry).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (the primary one included).
    pub groups: Vec<u32>,
    /// Home directory (`/` when it has no passwd entry).
    pub home: String,
}

fn read_db(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(MAX_DB)
        .read_to_string(&mut s)?;
    Ok(s)
}

/// Resolves `who` (a name, or a decimal uid) against the database in `etc`.
pub fn resolve(who: &str, etc: &Path) -> io::Result<User> {
    let passwd = match read_db(&etc.join("passwd")) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let by_uid = who.parse::<u32>().ok();
    let entry = passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        let uid = f[2].parse::<u32>().ok()?;
        let gid = f[3].parse::<u32>().ok()?;
        let hit = match by_uid {
            Some(u) => uid == u,
            None => f[0] == who,
        };
        hit.then(|| (f[0].to_string(), uid, gid, f[5].to_string()))
    });
    let (name, uid, gid, home) = match (entry, by_uid) {
        (Some(e), _) => e,
        // A bare uid with no entry runs with its own number as its group.
        (None, Some(u)) => (u.to_string(), u, u, "/".to_string()),
        (None, None) => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no user {who:?} in the guest's /etc/passwd"),
            ))
        }
    };
    let mut groups = vec![gid];
    if let Ok(group) = read_db(&etc.join("group")) {
        for line in group.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || !f[3].split(',').any(|m| m == name) {
                continue;
            }
            if let Ok(g) = f[2].parse::<u32>() {
                if !groups.contains(&g) && groups.len() < MAX_GROUPS {
                    groups.push(g);
                }
            }
        }
    }
    Ok(User {
        name,
        uid,
        gid,
        groups,
        home,
    })
}

/// Makes `cmd` run as `user`: its environment names the user, and between
/// fork and exec the child sets its groups, gid and uid, in that order
/// (the standard library's `uid`/`gid` cannot set supplementary groups
/// on stable, and its closures run after its own uid switch).
pub fn apply(cmd: &mut Command, user: &User) {
    cmd.env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name);
    let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes the setgroups, setgid and setuid system calls (async-signal-
    // safe in a single-threaded child) on memory captured before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc(passwd: &str, group: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "forkd-agent-user-{}-{}",
            std::process::id(),
            passwd.len() * 31 + group.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("passwd"), passwd).unwrap();
        std::fs::write(dir.join("group"), group).unwrap();
        dir
    }

    #[test]
    fn names_uids_and_groups_resolve() {
        let dir = etc(
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nbroken:x\n",
            "root:x:0:\nalice:x:1000:\nwheel:x:10:bob,alice\nstaff:x:50:bob\n",
        );
        let a = resolve("alice", &dir).unwrap();
        assert_eq!((a.uid, a.gid, a.home.as_str()), (1000, 1000, "/home/alice"));
        assert_eq!(a.groups, vec![1000, 10]);
        assert_eq!(resolve("1000", &dir).unwrap().name, "alice");
        let r = resolve("0", &dir).unwrap();
        assert_eq!((r.name.as_str(), r.home.as_str()), ("root", "/root"));
        let n = resolve("4242", &dir).unwrap();
        assert_eq!((n.uid, n.gid, n.home.as_str()), (4242, 4242, "/"));
        let e = resolve("mallory", &dir).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("mallory"), "{e}");
        assert!(resolve("broken", &dir).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The guest's files are the guest's: any bytes there give an answer
    /// or an error, never a panic, and never a uid the file does not hold.
    #[test]
    fn hostile_user_databases_do_not_panic() {
        let dir = etc("", "");
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"ab:0123456789\n,/x\xff";
        for round in 0..500 {
            let len = (next() % 300) as usize;
            let text: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            std::fs::write(dir.join("passwd"), &text).unwrap();
            std::fs::write(dir.join("group"), &text).unwrap();
            for who in ["ab", "0", "4294967295", "x"] {
                if let Ok(u) = resolve(who, &dir) {
                    assert!(u.groups.len() <= MAX_GROUPS, "round {round}");
                    assert_eq!(u.groups[0], u.gid, "round {round}");
                }
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
