//! A real jail: a forked child enters one and reports what it sees while
//! this process binds a directory in and takes it out again.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

fn need_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "this test makes mount namespaces: run it as root");
}

/// What the jailed child sees: each requested path, present or not, and
/// the names in `/` and in `/proc`.
fn report(paths: &[&Path]) -> String {
    let names = |dir: &str| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v.join(",")
    };
    let seen: Vec<String> = paths
        .iter()
        .map(|p| format!("{}={}", p.display(), p.exists()))
        .collect();
    format!(
        "{} root=[{}] proc=[{}]",
        seen.join(" "),
        names("/"),
        names("/proc")
    )
}

#[test]
fn a_jail_holds_its_directory_and_what_is_bound_in() {
    need_root();
    let base = PathBuf::from(format!("/tmp/jailfs-test-{}", std::process::id()));
    let own = base.join("own");
    let branch = base.join("branch");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::create_dir_all(&branch).unwrap();
    std::fs::write(own.join("own.txt"), "mine").unwrap();
    std::fs::write(branch.join("b.txt"), "bound").unwrap();
    let own_file = own.join("own.txt");
    let branch_file = branch.join("b.txt");
    let (ours, theirs) = UnixStream::pair().unwrap();
    // The binding side's umask, as a daemon's.
    // SAFETY: umask has no preconditions.
    let umask = unsafe { libc::umask(0o077) };
    // SAFETY: the child only runs this test's code and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(ours);
        let mut link = BufReader::new(theirs);
        let mut out = link.get_ref().try_clone().unwrap();
        // Entered, then no longer root (as a VMM's jail goes on): its
        // procfs then shows only itself.
        let id = 1 << 30;
        let drop_ids = || {
            // SAFETY: plain id changes in the forked child.
            unsafe { (libc::setresgid(id, id, id), libc::setresuid(id, id, id)) }
        };
        // A daemon's umask: the jail's directories must not depend on it.
        // SAFETY: umask has no preconditions.
        unsafe { libc::umask(0o077) };
        match jailfs::enter(&own).map(|()| drop_ids()) {
            Ok((0, 0)) => writeln!(out, "entered").unwrap(),
            Ok(ids) => writeln!(out, "failed setres[gu]id {ids:?}").unwrap(),
            Err(e) => writeln!(out, "failed {e}").unwrap(),
        }
        let mut line = String::new();
        while link.read_line(&mut line).unwrap_or(0) > 0 {
            writeln!(
                out,
                "{}",
                report(&[&own_file, &branch_file, Path::new("/etc/passwd")])
            )
            .unwrap();
            line.clear();
        }
        // SAFETY: ends the forked child without running the parent's
        // test harness.
        unsafe { libc::_exit(0) };
    }
    drop(theirs);
    // Reaped whatever happens.
    let _reap = Reap(pid);
    let mut link = BufReader::new(ours.try_clone().unwrap());
    let mut ask = |what: &str| {
        writeln!(&ours, "{what}").unwrap();
        let mut line = String::new();
        link.read_line(&mut line).unwrap();
        line.trim().to_owned()
    };
    let mut first = String::new();
    BufReader::new(ours.try_clone().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "entered");
    let o = own_file.display();
    let b = branch_file.display();
    let before = ask("look");
    assert!(
        before.starts_with(&format!(
            "{o}=true {b}=false /etc/passwd=false root=[proc,tmp] proc=["
        )),
        "{before}"
    );
    // Its procfs shows itself only (and self, thread-self).
    let procs = before
        .rsplit("proc=[")
        .next()
        .unwrap()
        .trim_end_matches(']');
    assert_eq!(procs, format!("{pid},self,thread-self"), "{before}");
    jailfs::bind_into(pid, &branch).unwrap();
    let bound = ask("look");
    assert!(bound.starts_with(&format!("{o}=true {b}=true ")), "{bound}");
    jailfs::unbind_from(pid, &branch).unwrap();
    let after = ask("look");
    assert!(
        after.starts_with(&format!("{o}=true {b}=false ")),
        "{after}"
    );
    // The host saw none of it.
    assert!(branch_file.exists() && own_file.exists());

    drop(ours);
    drop(_reap);
    // SAFETY: as above.
    unsafe { libc::umask(umask) };
    std::fs::remove_dir_all(&base).unwrap();
}

struct Reap(i32);

impl Drop for Reap {
    fn drop(&mut self) {
        // SAFETY: our own child; a null status pointer is allowed.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

/// A bind asked for while the child is still entering its jail (as a
/// daemon branches a sandbox it has just spawned) waits for the jail to
/// be whole and lands in it, every time.
#[test]
fn a_bind_asked_while_the_jail_is_being_entered_lands_in_it() {
    need_root();
    let base = PathBuf::from(format!("/tmp/jailfs-race-{}", std::process::id()));
    let branch = base.join("branch");
    std::fs::create_dir_all(&branch).unwrap();
    std::fs::write(branch.join("b.txt"), "bound").unwrap();
    let branch_file = branch.join("b.txt");
    for round in 0..20 {
        let own = base.join(format!("own-{round}"));
        std::fs::create_dir_all(&own).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        // SAFETY: the child only runs this test's code and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            drop(ours);
            let mut link = BufReader::new(theirs);
            let mut out = link.get_ref().try_clone().unwrap();
            let entered = jailfs::enter(&own);
            let mut line = String::new();
            let _ = link.read_line(&mut line);
            match entered {
                Ok(()) => writeln!(out, "{}", branch_file.exists()).unwrap(),
                Err(e) => writeln!(out, "failed {e}").unwrap(),
            }
            // SAFETY: ends the forked child without the test harness.
            unsafe { libc::_exit(0) };
        }
        drop(theirs);
        let _reap = Reap(pid);
        jailfs::bind_into(pid, &branch).unwrap();
        writeln!(&ours, "look").unwrap();
        let mut seen = String::new();
        BufReader::new(&ours).read_line(&mut seen).unwrap();
        assert_eq!(
            seen.trim(),
            "true",
            "round {round}: the bound directory is not in the jail"
        );
    }
    std::fs::remove_dir_all(&base).unwrap();
}
