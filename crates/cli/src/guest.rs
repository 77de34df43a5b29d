//! Commands that reach inside a sandbox or drive its life: streamed exec,
//! `shell` (a WebSocket terminal), `cp`, `ls-files`, `ps`, `pause`,
//! `resume`, `timeout`, `stats`.

use std::io::{Read, Write};
use std::time::Duration;

use base64::Engine;
use proto::api::{ExecEvent, FileList, ProcessInfo, ProcessRequest, SandboxInfo, SandboxStats};
use proto::routes;

use crate::args::{CpArgs, ExecArgs, IdArg, LsFilesArgs, ShellArgs, TimeoutArgs};
use crate::commands::{exit_code, read_bytes, Ctx, Outcome};
use crate::error::CliError;
use crate::format::{self, now_unix};

/// `b` as standard base64.
pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Standard base64 decoded; an error names it as the daemon's.
pub fn unb64(s: &str) -> Result<Vec<u8>, CliError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| CliError::Other(format!("the daemon sent output that is not base64: {e}")))
}

/// `forkd exec --stream`: output written as it comes.
pub fn exec_stream(ctx: &mut Ctx, a: &ExecArgs) -> Outcome {
    let stdin = a.stdin_file.as_deref().map(read_bytes).transpose()?;
    let req = ProcessRequest {
        args: a.args.clone(),
        env: a.env.iter().cloned().collect(),
        cwd: a.cwd.clone(),
        user: a.user.clone(),
        timeout_secs: a.timeout_secs,
        stdin_base64: stdin.map(|b| b64(&b)),
        ..ProcessRequest::default()
    };
    let path = routes::for_sandbox(routes::SANDBOX_EXEC_STREAM, &a.id);
    let mut code = None;
    let (out, err) = (&mut *ctx.out, &mut *ctx.err);
    ctx.client.post_lines(&path, &req, |line| {
        let event: ExecEvent = match serde_json::from_str(line) {
            Ok(e) => e,
            // A newer daemon's event: skipped, as the API says.
            Err(_) => return Ok(true),
        };
        match event {
            ExecEvent::Stdout { data } => {
                out.write_all(&unb64(&data)?)?;
                out.flush()?;
            }
            ExecEvent::Stderr { data } => {
                err.write_all(&unb64(&data)?)?;
                err.flush()?;
            }
            ExecEvent::Exit(e) => {
                if e.timed_out {
                    writeln!(err, "forkd: {} timed out in {}", a.args[0], a.id)?;
                }
                code = Some(e.exit_code);
                return Ok(false);
            }
            ExecEvent::Error { error, status } => {
                return Err(CliError::Api {
                    status,
                    message: error,
                })
            }
            ExecEvent::Started { .. } | ExecEvent::Keepalive => {}
        }
        Ok(true)
    })?;
    match code {
        Some(c) => Ok(exit_code(c)),
        None => Err(CliError::Other(format!(
            "the stream of {} in {} ended without its exit",
            a.args[0], a.id
        ))),
    }
}

/// `ID:/path` split, when `s` names a guest path.
fn remote(s: &str) -> Option<(&str, &str)> {
    let (id, path) = s.split_once(':')?;
    let is_id = !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    (is_id && path.starts_with('/')).then_some((id, path))
}

/// The last component of a path, for a copy into a directory.
fn base_name(p: &str) -> Result<&str, CliError> {
    p.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "-")
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{p:?} has no file name to copy under: name the destination file"
            ))
        })
}

/// `forkd cp`.
pub fn cp(ctx: &mut Ctx, a: &CpArgs) -> Outcome {
    match (remote(&a.src), remote(&a.dst)) {
        (Some(_), Some(_)) => Err(CliError::Usage(
            "both sides are in sandboxes: copy through a local file".into(),
        )),
        (None, None) => Err(CliError::Usage(format!(
            "neither {:?} nor {:?} is ID:/guest/path",
            a.src, a.dst
        ))),
        (None, Some((id, path))) => {
            let path = if path.ends_with('/') {
                format!("{path}{}", base_name(&a.src)?)
            } else {
                path.to_owned()
            };
            let mut query = vec![("path", path.as_str())];
            if let Some(m) = &a.mode {
                query.push(("mode", m));
            }
            if a.parents {
                query.push(("create_dirs", "true"));
            }
            let url = routes::with_query(routes::SANDBOX_FILES, id, &query);
            let answer = if a.src == "-" {
                ctx.client.put_reader(&url, &mut std::io::stdin().lock())?
            } else {
                let mut f = std::fs::File::open(&a.src)
                    .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", a.src)))?;
                ctx.client.put_reader(&url, &mut f)?
            };
            if ctx.json {
                writeln!(ctx.out, "{}", answer.pretty())?;
            } else {
                let up: proto::api::Uploaded = answer.parse()?;
                writeln!(ctx.err, "{} bytes to {id}:{}", up.bytes, up.path)?;
            }
            Ok(0)
        }
        (Some((id, path)), None) => {
            let url = routes::with_query(routes::SANDBOX_FILES, id, &[("path", path)]);
            if a.dst == "-" {
                let mut out = std::io::stdout().lock();
                ctx.client.get_to(&url, &mut out)?;
                out.flush()?;
                return Ok(0);
            }
            let mut dst = std::path::PathBuf::from(&a.dst);
            if dst.is_dir() {
                dst.push(base_name(path)?);
            }
            // Written beside the target and renamed: never half a file.
            let tmp = dst.with_file_name(format!(
                ".{}.forkd-cp-{}",
                dst.file_name().unwrap_or_default().to_string_lossy(),
                std::process::id()
            ));
            let mut f = std::fs::File::create(&tmp)
                .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", tmp.display())))?;
            let r = ctx.client.get_to(&url, &mut f).and_then(|n| {
                f.sync_all()
                    .and_then(|()| std::fs::rename(&tmp, &dst))
                    .map(|()| n)
                    .map_err(|e| CliError::Other(format!("writing {}: {e}", dst.display())))
            });
            let n = r.inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            if !ctx.json {
                writeln!(ctx.err, "{n} bytes from {id}:{path} to {}", dst.display())?;
            }
            Ok(0)
        }
    }
}

/// `forkd ls-files`.
pub fn ls_files(ctx: &mut Ctx, a: &LsFilesArgs) -> Outcome {
    let (id, path) = remote(&a.target)
        .ok_or_else(|| CliError::Usage(format!("{:?} is not ID:/guest/directory", a.target)))?;
    let answer = ctx.client.get(&routes::with_query(
        routes::FILES_LIST,
        id,
        &[("path", path)],
    ))?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let list: FileList = answer.parse()?;
    let mut t = format::Table::new(&["MODE", "TYPE", "SIZE", "MODIFIED", "NAME"]);
    let now = now_unix();
    for e in &list.entries {
        t.row(vec![
            format!("{:04o}", e.mode),
            format!("{:?}", e.file_type).to_lowercase(),
            e.size.to_string(),
            format::age(now, e.mtime_unix.max(0) as u64),
            e.name.clone(),
        ]);
    }
    write!(ctx.out, "{}", t.render())?;
    if list.truncated {
        writeln!(ctx.err, "(the listing stopped at 10000 entries)")?;
    }
    Ok(0)
}

/// `forkd ps`.
pub fn ps(ctx: &mut Ctx, a: &IdArg) -> Outcome {
    let answer = ctx
        .client
        .get(&routes::for_sandbox(routes::SANDBOX_PROCESSES, &a.id))?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let procs: Vec<ProcessInfo> = answer.parse()?;
    let mut t = format::Table::new(&["PID", "STATE", "KEPT", "COMMAND"]);
    for p in &procs {
        let state = match &p.exit {
            None => "running".to_string(),
            Some(e) => format!("exited {}", e.exit_code),
        };
        t.row(vec![
            p.pid.to_string(),
            state,
            p.kept_bytes.to_string(),
            p.args.join(" "),
        ]);
    }
    write!(ctx.out, "{}", t.render())?;
    Ok(0)
}

fn sandbox_answer(ctx: &mut Ctx, answer: crate::client::Answer) -> Outcome {
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
    } else {
        let s: SandboxInfo = answer.parse()?;
        let deadline = s
            .deadline_unix
            .map(|d| format!(", deadline in {} s", d.saturating_sub(now_unix())))
            .unwrap_or_default();
        writeln!(ctx.out, "{} {}{deadline}", s.id, s.state.as_str())?;
    }
    Ok(0)
}

/// `forkd pause`.
pub fn pause(ctx: &mut Ctx, a: &IdArg) -> Outcome {
    let answer = ctx.client.post(
        &routes::for_sandbox(routes::SANDBOX_PAUSE, &a.id),
        &serde_json::json!({}),
    )?;
    sandbox_answer(ctx, answer)
}

/// `forkd resume`.
pub fn resume(ctx: &mut Ctx, a: &IdArg) -> Outcome {
    let answer = ctx.client.post(
        &routes::for_sandbox(routes::SANDBOX_RESUME, &a.id),
        &serde_json::json!({}),
    )?;
    sandbox_answer(ctx, answer)
}

/// `forkd timeout`.
pub fn timeout(ctx: &mut Ctx, a: &TimeoutArgs) -> Outcome {
    let answer = ctx.client.post(
        &routes::for_sandbox(routes::SANDBOX_TIMEOUT, &a.id),
        &proto::api::TimeoutRequest {
            timeout_secs: a.secs,
        },
    )?;
    sandbox_answer(ctx, answer)
}

/// `forkd stats`.
pub fn stats(ctx: &mut Ctx, a: &IdArg) -> Outcome {
    let answer = ctx
        .client
        .get(&routes::for_sandbox(routes::SANDBOX_STATS, &a.id))?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let s: SandboxStats = answer.parse()?;
    let mib =
        |b: Option<u64>| format::or_dash(b.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0)));
    writeln!(ctx.out, "state    {}", s.state.as_str())?;
    writeln!(ctx.out, "uptime   {} s", s.uptime_secs)?;
    writeln!(
        ctx.out,
        "cpu      {}",
        format::or_dash(s.cpu_seconds.map(|c| format!("{c:.2} s")))
    )?;
    writeln!(ctx.out, "rss      {}", mib(s.memory_rss_bytes))?;
    writeln!(ctx.out, "private  {}", mib(s.memory_private_bytes))?;
    writeln!(ctx.out, "shared   {}", mib(s.memory_shared_bytes))?;
    writeln!(ctx.out, "disk     {}", mib(s.disk_layer_bytes))?;
    writeln!(ctx.out, "net rx   {}", format::or_dash(s.net_rx_bytes))?;
    writeln!(ctx.out, "net tx   {}", format::or_dash(s.net_tx_bytes))?;
    Ok(0)
}

/// The WebSocket URL of `path` on the daemon at `base` (http only).
fn ws_url(base: &str, path: &str) -> Result<String, CliError> {
    match base.strip_prefix("http://") {
        Some(rest) => Ok(format!("ws://{rest}{path}")),
        None => Err(CliError::Usage(format!(
            "forkd shell speaks plain WebSocket (ws://) only, and {base} is https: reach the daemon over http (e.g. through an SSH tunnel), or use exec --stream"
        ))),
    }
}

/// The terminal size of standard output, if it is one.
fn term_size() -> Option<proto::agent::PtySize> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the valid pointer given.
    if unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } != 0 || ws.ws_row == 0 {
        return None;
    }
    let clamp = |v: u16| v.clamp(1, proto::agent::MAX_PTY_SIDE);
    Some(proto::agent::PtySize {
        rows: clamp(ws.ws_row),
        cols: clamp(ws.ws_col),
    })
}

/// Standard input in raw mode while it lives (when it is a terminal).
struct RawMode(Option<libc::termios>);

impl RawMode {
    fn enter() -> RawMode {
        // SAFETY: isatty has no preconditions.
        if unsafe { libc::isatty(0) } != 1 {
            return RawMode(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it from fd 0.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into the valid termios given.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return RawMode(None);
        }
        let saved = t;
        // SAFETY: cfmakeraw edits the termios given; tcsetattr reads it.
        unsafe {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings read at entry from a valid termios.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// `forkd shell`: the daemon's `/exec/ws` with a terminal of this one's
/// size; keys go in raw, the screen comes back as it is; the exit code is
/// the shell's.
pub fn shell(ctx: &mut Ctx, a: &ShellArgs) -> Outcome {
    use tungstenite::Message;
    let url = ws_url(
        ctx.client.base(),
        &routes::for_sandbox(routes::SANDBOX_EXEC_WS, &a.id),
    )?;
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
        .map_err(|e| CliError::Usage(format!("bad daemon URL {url:?}: {e}")))?;
    if let Some(t) = ctx.client.token() {
        let v = format!("Bearer {t}")
            .parse()
            .map_err(|_| CliError::Usage("the token is not a valid header value".into()))?;
        request.headers_mut().insert("Authorization", v);
    }
    let host = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let tcp = std::net::TcpStream::connect(&host).map_err(|e| CliError::Unreachable {
        url: ctx.client.base().to_owned(),
        detail: e.to_string(),
    })?;
    let (mut ws, _) = tungstenite::client(request, tcp).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r)) => {
            let status = r.status().as_u16();
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            CliError::Api {
                status,
                message: crate::error::error_message(status, &body),
            }
        }
        e => CliError::Other(format!("WebSocket to {url}: {e}")),
    })?;
    let args = if a.args.is_empty() {
        vec!["sh".to_string(), "-l".to_string()]
    } else {
        a.args.clone()
    };
    let mut env: std::collections::BTreeMap<String, String> = a.env.iter().cloned().collect();
    env.entry("TERM".into())
        .or_insert_with(|| std::env::var("TERM").unwrap_or_else(|_| "xterm".into()));
    let mut size = term_size();
    let req = ProcessRequest {
        args,
        env,
        cwd: a.cwd.clone(),
        user: a.user.clone(),
        timeout_secs: Some(24 * 3600),
        pty: Some(size.unwrap_or(proto::agent::PtySize { rows: 24, cols: 80 })),
        ..ProcessRequest::default()
    };
    let send_err = |e: tungstenite::Error| CliError::Other(format!("the WebSocket broke: {e}"));
    ws.send(Message::text(
        serde_json::to_string(&req).expect("serializes"),
    ))
    .map_err(send_err)?;
    // One thread: short read timeouts on the socket, a short poll on stdin.
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| CliError::Other(e.to_string()))?;
    let _raw = RawMode::enter();
    let mut stdin_open = true;
    let mut buf = [0u8; 4096];
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) if !b.is_empty() => {
                let to: &mut dyn Write = if b[0] == proto::api::WS_STDERR {
                    &mut *ctx.err
                } else {
                    &mut *ctx.out
                };
                to.write_all(&b[1..])?;
                to.flush()?;
            }
            Ok(Message::Text(t)) => match serde_json::from_str::<ExecEvent>(&t) {
                Ok(ExecEvent::Exit(e)) => return Ok(exit_code(e.exit_code)),
                Ok(ExecEvent::Error { error, status }) => {
                    return Err(CliError::Api {
                        status,
                        message: error,
                    })
                }
                _ => {}
            },
            Ok(Message::Close(_)) => {
                return Err(CliError::Other(
                    "the daemon closed the session without an exit".into(),
                ))
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(send_err(e)),
        }
        let now = term_size();
        if now.is_some() && now != size {
            size = now;
            if let Some(s) = size {
                let m = serde_json::json!({"type": "resize", "rows": s.rows, "cols": s.cols});
                ws.send(Message::text(m.to_string())).map_err(send_err)?;
            }
        }
        if stdin_open {
            let mut pfd = libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, its count given.
            if unsafe { libc::poll(&mut pfd, 1, 10) } > 0 {
                match std::io::stdin().lock().read(&mut buf) {
                    Ok(0) | Err(_) => {
                        stdin_open = false;
                        ws.send(Message::text(r#"{"type":"stdin_end"}"#))
                            .map_err(send_err)?;
                    }
                    Ok(n) => ws
                        .send(Message::binary(buf[..n].to_vec()))
                        .map_err(send_err)?,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_and_urls() {
        assert_eq!(remote("ab12-0:/tmp/x"), Some(("ab12-0", "/tmp/x")));
        assert_eq!(remote("./a:/b"), None);
        assert_eq!(remote("c:relative"), None);
        assert_eq!(remote("/abs/path"), None);
        assert_eq!(base_name("/tmp/dir/file.bin").unwrap(), "file.bin");
        assert!(base_name("-").is_err());
        assert_eq!(
            ws_url("http://127.0.0.1:8889", "/v1/sandboxes/x/exec/ws").unwrap(),
            "ws://127.0.0.1:8889/v1/sandboxes/x/exec/ws"
        );
        assert!(ws_url("https://h:1", "/p").is_err());
    }
}
