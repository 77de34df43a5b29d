//! The REST API's paths: the patterns forkd-daemon's router matches and the
//! builders its clients use, one definition for both. A builder fills its
//! pattern, so a client cannot ask for a path the router does not have.

/// `GET`: liveness, the one route without a token.
pub const HEALTHZ: &str = "/healthz";
/// `GET /healthz/`: the same (upstream answers both without a token).
pub const HEALTHZ_SLASH: &str = "/healthz/";

/// Whether `path` is the health check, which needs no token.
pub fn is_healthz(path: &str) -> bool {
    path == HEALTHZ || path == HEALTHZ_SLASH
}

/// `GET`: the daemon's version.
pub const VERSION: &str = "/version";
/// `GET`: Prometheus metrics.
pub const METRICS: &str = "/metrics";
/// `POST` (make) and `GET` (list).
pub const SNAPSHOTS: &str = "/v1/snapshots";
/// `DELETE`, with `?cascade=true` or `?force=true`.
pub const SNAPSHOT: &str = "/v1/snapshots/{tag}";
/// `GET`: a snapshot and its place in a chain.
pub const SNAPSHOT_INFO: &str = "/v1/snapshots/{tag}/info";
/// `POST`: a flat copy of a snapshot.
pub const SNAPSHOT_COMPACT: &str = "/v1/snapshots/{tag}/compact";
/// `POST` (spawn) and `GET` (list).
pub const SANDBOXES: &str = "/v1/sandboxes";
/// `GET` and `DELETE`.
pub const SANDBOX: &str = "/v1/sandboxes/{id}";
/// `POST`: the agent's answer to a ping.
pub const SANDBOX_PING: &str = "/v1/sandboxes/{id}/ping";
/// `POST`: run a command.
pub const SANDBOX_EXEC: &str = "/v1/sandboxes/{id}/exec";
/// `POST`: evaluate code in the warm interpreter.
pub const SANDBOX_EVAL: &str = "/v1/sandboxes/{id}/eval";
/// `POST`: BRANCH the sandbox into a snapshot.
pub const SANDBOX_BRANCH: &str = "/v1/sandboxes/{id}/branch";
/// `POST`: pause a sandbox's VMM.
pub const SANDBOX_PAUSE: &str = "/v1/sandboxes/{id}/pause";
/// `POST`: let a paused sandbox run, or restore a suspended one.
pub const SANDBOX_RESUME: &str = "/v1/sandboxes/{id}/resume";
/// `POST`: a new deadline.
pub const SANDBOX_TIMEOUT: &str = "/v1/sandboxes/{id}/timeout";
/// `GET`: what a sandbox uses now.
pub const SANDBOX_STATS: &str = "/v1/sandboxes/{id}/stats";
/// `POST` (create) and `GET` (list): upstream's workspaces.
pub const WORKSPACES: &str = "/v1/workspaces";
/// `GET` and `DELETE`: one workspace, by name.
pub const WORKSPACE: &str = "/v1/workspaces/{name}";
/// `POST`: keep a workspace as a snapshot and end its sandbox.
pub const WORKSPACE_SUSPEND: &str = "/v1/workspaces/{name}/suspend";
/// `POST`: a suspended (or stale) workspace's sandbox again.
pub const WORKSPACE_RESUME: &str = "/v1/workspaces/{name}/resume";
/// `POST`: run a command, its output streamed as newline-delimited JSON.
pub const SANDBOX_EXEC_STREAM: &str = "/v1/sandboxes/{id}/exec/stream";
/// `GET` (WebSocket upgrade): run a command interactively.
pub const SANDBOX_EXEC_WS: &str = "/v1/sandboxes/{id}/exec/ws";
/// `POST` (start in the background) and `GET` (list).
pub const SANDBOX_PROCESSES: &str = "/v1/sandboxes/{id}/processes";
/// `POST`: signal a process.
pub const PROCESS_SIGNAL: &str = "/v1/sandboxes/{id}/processes/{pid}/signal";
/// `POST`: bytes (the body) for a process's stdin; `?eof=true` closes it after.
pub const PROCESS_STDIN: &str = "/v1/sandboxes/{id}/processes/{pid}/stdin";
/// `POST`: resize a process's terminal.
pub const PROCESS_RESIZE: &str = "/v1/sandboxes/{id}/processes/{pid}/resize";
/// `POST`: collect a process's output and exit.
pub const PROCESS_WAIT: &str = "/v1/sandboxes/{id}/processes/{pid}/wait";
/// `GET ?path=` (download), `PUT ?path=` (upload), `DELETE ?path=`.
pub const SANDBOX_FILES: &str = "/v1/sandboxes/{id}/files";
/// `GET ?path=`: a directory's entries.
pub const FILES_LIST: &str = "/v1/sandboxes/{id}/files/list";
/// `GET ?path=`: one path's description.
pub const FILES_STAT: &str = "/v1/sandboxes/{id}/files/stat";
/// `POST`: make a directory.
pub const FILES_MKDIR: &str = "/v1/sandboxes/{id}/files/mkdir";
/// `POST`: rename a path.
pub const FILES_RENAME: &str = "/v1/sandboxes/{id}/files/rename";
/// `GET`: this API as an OpenAPI 3 document.
pub const OPENAPI: &str = "/v1/openapi.json";

/// What can be asked of one sandbox with a `POST`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxOp {
    /// [`SANDBOX_PING`].
    Ping,
    /// [`SANDBOX_EXEC`].
    Exec,
    /// [`SANDBOX_EVAL`].
    Eval,
    /// [`SANDBOX_BRANCH`].
    Branch,
}

impl SandboxOp {
    /// Its route pattern.
    pub fn pattern(self) -> &'static str {
        match self {
            SandboxOp::Ping => SANDBOX_PING,
            SandboxOp::Exec => SANDBOX_EXEC,
            SandboxOp::Eval => SANDBOX_EVAL,
            SandboxOp::Branch => SANDBOX_BRANCH,
        }
    }
}

/// `s` as one URL path segment (percent-encoding all but unreserved bytes).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `pattern` with its one `{name}` placeholder replaced by `value`, encoded.
fn fill(pattern: &str, value: &str) -> String {
    let open = pattern.find('{').expect("the pattern has a placeholder");
    let close = pattern[open..]
        .find('}')
        .expect("the placeholder is closed")
        + open;
    format!(
        "{}{}{}",
        &pattern[..open],
        seg(value),
        &pattern[close + 1..]
    )
}

/// [`SNAPSHOT`] for `tag`, with `?cascade=true` or `?force=true`.
pub fn snapshot(tag: &str, cascade: bool, force: bool) -> String {
    let q = match (cascade, force) {
        (true, _) => "?cascade=true",
        (false, true) => "?force=true",
        (false, false) => "",
    };
    format!("{}{q}", fill(SNAPSHOT, tag))
}

/// [`SNAPSHOT_INFO`] for `tag`.
pub fn snapshot_info(tag: &str) -> String {
    fill(SNAPSHOT_INFO, tag)
}

/// [`SNAPSHOT_COMPACT`] for `tag`.
pub fn compact(tag: &str) -> String {
    fill(SNAPSHOT_COMPACT, tag)
}

/// [`SANDBOX`] for `id`.
pub fn sandbox(id: &str) -> String {
    fill(SANDBOX, id)
}

/// `op`'s route for sandbox `id`.
pub fn sandbox_op(id: &str, op: SandboxOp) -> String {
    fill(op.pattern(), id)
}

/// `pattern` (one of this module's `/v1/sandboxes/{id}/...` routes without
/// a pid) for sandbox `id`.
pub fn for_sandbox(pattern: &str, id: &str) -> String {
    debug_assert!(!pattern.contains("{pid}"));
    fill(pattern, id)
}

/// `pattern` (one of the `PROCESS_*` routes) for process `pid` of sandbox `id`.
pub fn for_process(pattern: &str, id: &str, pid: i32) -> String {
    fill(&fill(pattern, id), &pid.to_string())
}

/// `pattern` (one of the file routes) for sandbox `id`, with `query`
/// pairs (values percent-encoded) appended.
pub fn with_query(pattern: &str, id: &str, query: &[(&str, &str)]) -> String {
    let mut out = fill(pattern, id);
    for (i, (k, v)) in query.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        out.push_str(k);
        out.push('=');
        out.push_str(&seg(v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_fill_the_router_patterns() {
        assert_eq!(snapshot("t", false, false), "/v1/snapshots/t");
        assert_eq!(snapshot("t", true, false), "/v1/snapshots/t?cascade=true");
        assert_eq!(snapshot("t", false, true), "/v1/snapshots/t?force=true");
        assert_eq!(snapshot_info("t"), "/v1/snapshots/t/info");
        assert_eq!(compact("t"), "/v1/snapshots/t/compact");
        assert_eq!(sandbox("sb-1"), "/v1/sandboxes/sb-1");
        assert_eq!(
            sandbox_op("sb/1", SandboxOp::Exec),
            "/v1/sandboxes/sb%2F1/exec"
        );
        for (op, name) in [
            (SandboxOp::Ping, "ping"),
            (SandboxOp::Exec, "exec"),
            (SandboxOp::Eval, "eval"),
            (SandboxOp::Branch, "branch"),
        ] {
            assert_eq!(sandbox_op("x", op), format!("/v1/sandboxes/x/{name}"));
        }
    }

    #[test]
    fn process_and_file_builders_fill_both_placeholders_and_encode_queries() {
        assert_eq!(
            for_process(PROCESS_WAIT, "sb-1", 42),
            "/v1/sandboxes/sb-1/processes/42/wait"
        );
        assert_eq!(
            for_sandbox(SANDBOX_EXEC_STREAM, "a b"),
            "/v1/sandboxes/a%20b/exec/stream"
        );
        assert_eq!(
            with_query(
                SANDBOX_FILES,
                "sb",
                &[("path", "/tmp/a b&c"), ("append", "true")]
            ),
            "/v1/sandboxes/sb/files?path=%2Ftmp%2Fa%20b%26c&append=true"
        );
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(seg("py-3_12"), "py-3_12");
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
        assert_eq!(seg("../x"), "..%2Fx");
        assert_eq!(seg("é"), "%C3%A9");
        assert_eq!(seg("a?b#c"), "a%3Fb%23c");
    }
}
