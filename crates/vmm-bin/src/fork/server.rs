//! `forkd-vmm fork-server`: the request loop (one request per connection,
//! on the main thread: forking needs a single-threaded process) and the
//! answer to one request.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use proto::control::{ForkRequest, ForkResponse, MAX_REQUEST_BYTES};

use super::forker::Forker;
use super::pool::{Pool, Refill};
use super::reaper::Reaper;
use super::ForkServerArgs;
use super::{BoxError, ChildOptions, MAX_CHILDREN};

/// `forkd-vmm fork-server`: one request per connection, served in order on
/// the main thread (forking needs a single-threaded process); between
/// requests, the pool is refilled one child at a time.
pub fn fork_server(args: ForkServerArgs) -> Result<ExitCode, BoxError> {
    if args.pool > MAX_CHILDREN {
        return Err(format!(
            "a pool of {} is out of range: keep 0 to {MAX_CHILDREN} children",
            args.pool
        )
        .into());
    }
    let forker = Forker::new(&args.snapshot, &args.cgroup_parent)?;
    // Before the first fork: every child's end is recorded and reaped here.
    let mut reaper =
        Reaper::new().map_err(|e| format!("fork server: cannot watch for children ending: {e}"))?;
    let listener = crate::control::bind(&args.socket)?;
    listener.set_nonblocking(true)?;
    let mut staging = args.socket.clone().into_os_string();
    staging.push(".pool");
    let mut pool = Pool::new(args.pool as usize, PathBuf::from(staging))?;
    pool.limits = proto::control::Limits {
        memory_mib: args.memory_limit_mib,
        cpu_millis: args.cpu_limit_millis,
        pids: args.pids_limit,
        io: args.io_limit,
    };
    if let Some(cgroups) = &forker.cgroups {
        cgroups.check(&pool.limits)?;
        cgroups.make_spares(&pool.limits);
    }
    loop {
        // While the pool is short, only look for a request; otherwise wait
        // for one, for a child to end, or for a parked child to die.
        let refill = pool.refill_wanted();
        let mut fds: Vec<libc::pollfd> = [listener.as_raw_fd(), reaper.fd()]
            .into_iter()
            .chain(pool.parked.iter().map(|p| p.link.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let timeout = match refill {
            Refill::Now => 0,
            Refill::After(wait) => wait.as_millis().clamp(1, 1000) as libc::c_int,
            Refill::No => -1,
        };
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("fork server: cannot wait for requests: {e}").into());
        }
        // A parked child says when it is ready, and nothing else: a link
        // that reads as closed means the child died.
        let readable: Vec<usize> = fds[2..]
            .iter()
            .enumerate()
            .filter(|(_, f)| f.revents != 0)
            .map(|(i, _)| i)
            .collect();
        pool.check(&readable);
        pool.check_started();
        if fds[1].revents != 0 {
            reaper.reap();
        }
        // None of a child's business: the server's socket and signalfd.
        let server_fds = [listener.as_raw_fd(), reaper.fd()];
        if fds[0].revents != 0 {
            match listener.accept() {
                Ok((stream, _)) => {
                    // Accepted sockets do not inherit O_NONBLOCK on Linux.
                    if serve_one(&forker, &mut pool, &mut reaper, stream, &server_fds) {
                        break;
                    }
                    // After the answer: the next request's groups.
                    if let Some(cgroups) = &forker.cgroups {
                        cgroups.make_spares(&pool.limits);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => eprintln!("forkd-vmm fork-server: cannot accept a request: {e}"),
            }
        } else if matches!(refill, Refill::Now) {
            pool.add_one(&forker, &server_fds);
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    pool.remove_staging();
    if let Some(cgroups) = &forker.cgroups {
        cgroups.remove_spares();
    }
    // Those that ended already are recorded; the rest run on, unwatched.
    reaper.reap();
    Ok(ExitCode::SUCCESS)
}

/// Answers one request; true when the server should stop. The children
/// close `server_fds` and this connection; `reaper` learns where each
/// child started lives.
pub(super) fn serve_one(
    forker: &Forker,
    pool: &mut Pool,
    reaper: &mut Reaper,
    stream: UnixStream,
    server_fds: &[RawFd],
) -> bool {
    // A client that sends nothing must not stall the server.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = Vec::new();
    let read = BufReader::new(&stream)
        .take(MAX_REQUEST_BYTES as u64)
        .read_until(b'\n', &mut line);
    let (response, stop) = match read.map_err(|e| e.to_string()).and_then(|_| {
        serde_json::from_slice::<ForkRequest>(&line).map_err(|e| format!("bad request: {e}"))
    }) {
        Ok(ForkRequest::Fork {
            n,
            out_dir,
            paused,
            console_log,
            memfd,
            netns,
            huge_pages,
            prewarm,
            limits,
            disk_quota_mib,
        }) => {
            let close: Vec<RawFd> = server_fds
                .iter()
                .copied()
                .chain([stream.as_raw_fd()])
                .collect();
            let spawned = forker.spawn(
                &super::forker::Batch {
                    n,
                    out_dir: &out_dir,
                    options: ChildOptions {
                        paused,
                        console_log,
                        memfd,
                        huge_pages,
                        prewarm,
                        disk_quota_mib,
                    },
                    netns: &netns,
                    limits,
                },
                &close,
                Some(pool),
            );
            let started = match &spawned {
                Ok(children) => children,
                Err(partial) => &partial.started,
            };
            for child in started {
                reaper.track(child.pid, &child.dir);
            }
            match spawned {
                Ok(children) => (ForkResponse::Forked { children }, false),
                Err(e) => (
                    ForkResponse::Error {
                        message: e.to_string(),
                    },
                    false,
                ),
            }
        }
        Ok(ForkRequest::Shutdown) => (ForkResponse::Ok, true),
        Err(message) => (ForkResponse::Error { message }, false),
    };
    let mut out = serde_json::to_vec(&response).expect("responses serialise");
    out.push(b'\n');
    let _ = (&stream).write_all(&out);
    stop
}
