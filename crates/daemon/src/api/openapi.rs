//! `GET /v1/openapi.json`: the v1 API as an OpenAPI 3 document, made from
//! the same things the router and the handlers use: the paths are
//! `proto::routes`' patterns and every body's schema is derived from its
//! `proto::api` type (`utoipa::ToSchema`), so the document follows the code.
//! `docs/openapi.json` is a copy, checked against this by a test.

use proto::agent::{Pong, PtySize};
use proto::api::{
    BranchMode, BranchRequest, CompactRequest, CreateSnapshot, Encoding, Entry, ErrorBody,
    EvalRequest, EvalResponse, ExecEvent, ExecInput, ExecRequest, ExecResponse, FileList, FileType,
    Health, MkdirRequest, OnTimeout, PingResponse, ProcessExit, ProcessInfo, ProcessRequest,
    RenameRequest, SandboxInfo, SandboxState, SandboxStats, SignalRequest, SnapshotDetail,
    SnapshotInfo, SnapshotStatus, SpawnRequest, Spawned, TimeoutRequest, Uploaded, Version,
    WaitRequest, WaitResponse,
};
use proto::api::{CreateWorkspaceRequest, SuspendWorkspaceRequest, WorkspaceInfo, WorkspaceStatus};
use proto::routes;
use utoipa::openapi::path::{
    HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ComponentsBuilder, Ref};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    Content, InfoBuilder, OpenApi, OpenApiBuilder, Paths, RefOr, Required, ResponseBuilder, Schema,
};

/// A body: one of the API's types, or a list of one.
#[derive(Clone, Copy)]
enum Body {
    One(&'static str),
    List(&'static str),
    Text,
    /// Bytes as they are.
    Binary,
    /// Newline-delimited JSON, each line one of this type.
    Lines(&'static str),
}

impl Body {
    fn content(self) -> (&'static str, Content) {
        let schema: RefOr<Schema> = match self {
            Body::One(name) => Ref::from_schema_name(name).into(),
            Body::List(name) => ArrayBuilder::new()
                .items(Ref::from_schema_name(name))
                .build()
                .into(),
            Body::Text => return ("text/plain; version=0.0.4", Content::new(None::<Schema>)),
            Body::Binary => return ("application/octet-stream", Content::new(None::<Schema>)),
            Body::Lines(name) => {
                let line: RefOr<Schema> = Ref::from_schema_name(name).into();
                return ("application/x-ndjson", Content::new(Some(line)));
            }
        };
        ("application/json", Content::new(Some(schema)))
    }
}

/// One route: its method and pattern, what it does, its body, and its
/// answers (status, body, when).
struct Route {
    method: HttpMethod,
    path: &'static str,
    summary: &'static str,
    body: Option<Body>,
    answers: &'static [(u16, Option<Body>, &'static str)],
    /// Without a token.
    public: bool,
    /// Query parameters: name, what it is, whether it is required.
    query: &'static [(&'static str, &'static str, bool)],
}

const ERR: Option<Body> = Some(Body::One("ErrorBody"));

/// Every route the router serves.
const ROUTES: &[Route] = &[
    Route {
        method: HttpMethod::Get,
        path: routes::HEALTHZ,
        summary: "Liveness (no token)",
        body: None,
        answers: &[(200, Some(Body::One("Health")), "the daemon runs")],
        public: true,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::HEALTHZ_SLASH,
        summary: "Liveness, as upstream also answers it (no token)",
        body: None,
        answers: &[(200, Some(Body::One("Health")), "the daemon runs")],
        public: true,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::VERSION,
        summary: "The daemon's version, and where it keeps its state",
        body: None,
        answers: &[(200, Some(Body::One("Version")), "its version")],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::METRICS,
        summary: "Prometheus metrics (text format 0.0.4)",
        body: None,
        answers: &[(200, Some(Body::Text), "the metrics")],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::OPENAPI,
        summary: "This document",
        body: None,
        answers: &[(200, None, "an OpenAPI 3 document")],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SNAPSHOTS,
        summary: "Boot a guest, wait for its agent, snapshot it",
        body: Some(Body::One("CreateSnapshot")),
        answers: &[
            (201, Some(Body::One("SnapshotInfo")), "made"),
            (400, ERR, "a bad request, or the tag exists"),
            (409, ERR, "another request is making that tag"),
            (422, ERR, "a field missing or of the wrong type"),
            (
                504,
                ERR,
                "the guest's agent did not answer in boot_wait_secs",
            ),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::SNAPSHOTS,
        summary: "Every snapshot",
        body: None,
        answers: &[(200, Some(Body::List("SnapshotInfo")), "the snapshots")],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Delete,
        path: routes::SNAPSHOT,
        summary: "Delete a snapshot (?cascade=true: its dependents too; ?force=true: them left \
            unusable, and sandboxes spawned from it running on)",
        body: None,
        answers: &[
            (204, None, "deleted"),
            (400, ERR, "cascade and force together"),
            (404, ERR, "no such snapshot"),
            (
                409,
                ERR,
                "others depend on it, sandboxes spawned from it run, or it is being written",
            ),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::SNAPSHOT_INFO,
        summary: "A snapshot, its sizes and its place in a chain",
        body: None,
        answers: &[
            (200, Some(Body::One("SnapshotDetail")), "the snapshot"),
            (404, ERR, "no such snapshot"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SNAPSHOT_COMPACT,
        summary: "A flat, self-contained copy of a snapshot and its chain",
        body: Some(Body::One("CompactRequest")),
        answers: &[
            (200, Some(Body::One("SnapshotInfo")), "the copy"),
            (400, ERR, "a bad tag, or the copy's tag is the snapshot's"),
            (404, ERR, "no such snapshot"),
            (
                409,
                ERR,
                "the copy's tag exists, or the snapshot is not ready",
            ),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SANDBOXES,
        summary: "Fork sandboxes from a snapshot",
        body: Some(Body::One("SpawnRequest")),
        answers: &[
            (201, Some(Body::List("SandboxInfo")), "forked"),
            (400, ERR, "a bad request"),
            (404, ERR, "no such snapshot"),
            (409, ERR, "the snapshot is not ready"),
            (422, ERR, "a field missing or of the wrong type"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::SANDBOXES,
        summary: "Every live sandbox: running, paused or suspended (?all=true: the exited ones too)",
        body: None,
        answers: &[
            (200, Some(Body::List("SandboxInfo")), "the sandboxes"),
            (400, ERR, "an unknown parameter, or a label filter not KEY=VALUE"),
        ],
        public: false,
        query: &[
            ("all", "true: the exited ones too", false),
            (
                "label",
                "KEY=VALUE: only sandboxes with that label (repeat it: all must match)",
                false,
            ),
        ],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::SANDBOX,
        summary: "One sandbox, as it is now (state exited, and how, once its VMM has ended)",
        body: None,
        answers: &[
            (200, Some(Body::One("SandboxInfo")), "the sandbox"),
            (404, ERR, "no such sandbox"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Delete,
        path: routes::SANDBOX,
        summary: "Kill a sandbox (or forget an exited one)",
        body: None,
        answers: &[
            (204, None, "killed"),
            (404, ERR, "no such sandbox"),
            (409, ERR, "it is still starting"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SANDBOX_PING,
        summary: "The guest agent's answer",
        body: None,
        answers: &[
            (200, Some(Body::One("PingResponse")), "it answered"),
            (404, ERR, "no such sandbox"),
            (502, ERR, "the agent answered wrongly or went away"),
            (504, ERR, "the agent did not answer in time"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SANDBOX_EXEC,
        summary: "Run a program in the guest",
        body: Some(Body::One("ExecRequest")),
        answers: &[
            (200, Some(Body::One("ExecResponse")), "it ran"),
            (400, ERR, "a bad request"),
            (404, ERR, "no such sandbox"),
            (504, ERR, "the agent did not answer in time"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SANDBOX_EVAL,
        summary: "Evaluate code in the guest's warm interpreter",
        body: Some(Body::One("EvalRequest")),
        answers: &[
            (200, Some(Body::One("EvalResponse")), "it ran"),
            (404, ERR, "no such sandbox"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SANDBOX_BRANCH,
        summary: "BRANCH a running sandbox into a snapshot (an empty body: full)",
        body: Some(Body::One("BranchRequest")),
        answers: &[
            (201, Some(Body::One("SnapshotInfo")), "made"),
            (
                202,
                Some(Body::One("SnapshotInfo")),
                "live, wait: false: still copying",
            ),
            (400, ERR, "a contradictory body or a bad tag"),
            (404, ERR, "no such sandbox"),
            (
                409,
                ERR,
                "the tag exists or is being made, the sandbox's VMM has ended, or a diff's base snapshot was deleted",
            ),
            (413, ERR, "the body is over 2 MB"),
            (
                422,
                ERR,
                "a field missing or of the wrong type, or the VMM refused",
            ),
            (503, ERR, "--branch-concurrency branches are being written"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SANDBOX_EXEC_STREAM,
        summary: "Run a program, its output streamed as newline-delimited JSON (agent protocol 2)",
        body: Some(Body::One("ProcessRequest")),
        answers: &[
            (
                200,
                Some(Body::Lines("ExecEvent")),
                "started, output as it comes (base64), then exit or error",
            ),
            (400, ERR, "a bad request"),
            (404, ERR, "no such sandbox, or the program is not found"),
            (
                501,
                ERR,
                "the snapshot's agent is older than protocol 2, or the guest is the built-in one",
            ),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::SANDBOX_EXEC_WS,
        summary: "Run a program interactively over a WebSocket: first message the ProcessRequest; then binary stdin and ExecInput text; answers ExecEvent text and binary output (first byte 1 stdout, 2 stderr)",
        body: None,
        answers: &[
            (101, None, "switching to the WebSocket"),
            (404, ERR, "no such sandbox"),
            (501, ERR, "the agent is older than protocol 2"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SANDBOX_PROCESSES,
        summary: "Start a program in the background (no timeout unless given)",
        body: Some(Body::One("ProcessRequest")),
        answers: &[
            (201, Some(Body::One("Spawned")), "started"),
            (400, ERR, "a bad request"),
            (503, ERR, "the agent tracks 64 processes already"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::SANDBOX_PROCESSES,
        summary: "The background and streamed processes, running or not yet waited for",
        body: None,
        answers: &[(200, Some(Body::List("ProcessInfo")), "the processes")],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::PROCESS_SIGNAL,
        summary: "Signal a process's group",
        body: Some(Body::One("SignalRequest")),
        answers: &[
            (204, None, "sent"),
            (404, ERR, "no such sandbox or process"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::PROCESS_STDIN,
        summary: "Bytes (the body, as it is) for a process's stdin",
        body: Some(Body::Binary),
        answers: &[
            (204, None, "queued"),
            (400, ERR, "its stdin is closed, or too much is queued"),
            (404, ERR, "no such sandbox or process"),
        ],
        public: false,
        query: &[("eof", "true: close its stdin after these bytes", false)],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::PROCESS_RESIZE,
        summary: "Resize a process's terminal",
        body: Some(Body::One("PtySize")),
        answers: &[
            (204, None, "resized"),
            (400, ERR, "it has no terminal, or the size is out of range"),
            (404, ERR, "no such sandbox or process"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::PROCESS_WAIT,
        summary: "Collect a process's output not taken before, and its exit once it ended (an empty body waits 30 s)",
        body: Some(Body::One("WaitRequest")),
        answers: &[
            (
                200,
                Some(Body::One("WaitResponse")),
                "its output, and its exit or running: true",
            ),
            (404, ERR, "no such sandbox or process"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::SANDBOX_FILES,
        summary: "Download a guest file, streamed",
        body: None,
        answers: &[
            (200, Some(Body::Binary), "its bytes (Content-Length set)"),
            (400, ERR, "not a regular file, or a bad path"),
            (403, ERR, "the guest refused access"),
            (404, ERR, "no such sandbox or file"),
        ],
        public: false,
        query: &[
            ("path", "absolute path in the guest", true),
            ("offset", "start at this byte", false),
        ],
    },
    Route {
        method: HttpMethod::Put,
        path: routes::SANDBOX_FILES,
        summary: "Upload a guest file, streamed; it replaces the file only once complete",
        body: Some(Body::Binary),
        answers: &[
            (201, Some(Body::One("Uploaded")), "written"),
            (403, ERR, "the guest refused access"),
            (404, ERR, "no such sandbox, or the directory is missing"),
        ],
        public: false,
        query: &[
            ("path", "absolute path in the guest", true),
            ("mode", "permission bits, octal (default 644)", false),
            ("create_dirs", "true: make missing parent directories", false),
            ("append", "true: append instead of replacing", false),
        ],
    },
    Route {
        method: HttpMethod::Delete,
        path: routes::SANDBOX_FILES,
        summary: "Remove a guest file or directory (agent protocol 2)",
        body: None,
        answers: &[
            (204, None, "removed"),
            (403, ERR, "the guest refused access"),
            (404, ERR, "no such sandbox or path"),
            (502, ERR, "a directory with content without recursive"),
        ],
        public: false,
        query: &[
            ("path", "absolute path in the guest", true),
            ("recursive", "true: a directory with what it holds", false),
        ],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::FILES_LIST,
        summary: "A guest directory's entries",
        body: None,
        answers: &[
            (200, Some(Body::One("FileList")), "the entries"),
            (403, ERR, "the guest refused access"),
            (404, ERR, "no such sandbox or directory"),
        ],
        public: false,
        query: &[
            ("path", "absolute path in the guest", true),
            ("max_entries", "at most this many (default and limit 10000)", false),
        ],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::FILES_STAT,
        summary: "One guest path's description",
        body: None,
        answers: &[
            (200, Some(Body::One("Entry")), "its description"),
            (404, ERR, "no such sandbox or path"),
        ],
        public: false,
        query: &[
            ("path", "absolute path in the guest", true),
            ("nofollow", "true: a symlink itself, not its target", false),
        ],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::FILES_MKDIR,
        summary: "Make a guest directory (agent protocol 2)",
        body: Some(Body::One("MkdirRequest")),
        answers: &[
            (204, None, "made"),
            (404, ERR, "no such sandbox, or a parent is missing"),
            (502, ERR, "it exists (without parents)"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::FILES_RENAME,
        summary: "Rename a guest path (agent protocol 2)",
        body: Some(Body::One("RenameRequest")),
        answers: &[
            (204, None, "renamed"),
            (404, ERR, "no such sandbox or path"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SANDBOX_PAUSE,
        summary: "Pause a sandbox's VMM (no snapshot: memory and files kept, no CPU used)",
        body: None,
        answers: &[
            (200, Some(Body::One("SandboxInfo")), "paused (or was)"),
            (404, ERR, "no such sandbox"),
            (409, ERR, "it is suspended, starting or exited"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SANDBOX_RESUME,
        summary: "Let a paused sandbox run, or restore a suspended one under its id (a new deadline when it had a timeout)",
        body: None,
        answers: &[
            (200, Some(Body::One("SandboxInfo")), "running"),
            (404, ERR, "no such sandbox"),
            (409, ERR, "it is starting or exited"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::SANDBOX_TIMEOUT,
        summary: "Set a sandbox's deadline this many seconds from now (a suspended one's starts at its resume)",
        body: Some(Body::One("TimeoutRequest")),
        answers: &[
            (200, Some(Body::One("SandboxInfo")), "its new deadline"),
            (400, ERR, "timeout_secs out of range"),
            (404, ERR, "no such sandbox"),
            (409, ERR, "it has exited"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::SANDBOX_STATS,
        summary: "What a sandbox uses now: CPU, memory, disk layer, network, uptime",
        body: None,
        answers: &[
            (200, Some(Body::One("SandboxStats")), "its figures"),
            (404, ERR, "no such sandbox"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::WORKSPACES,
        summary: "Create a workspace: a named sandbox that can be suspended to a snapshot and resumed",
        body: Some(Body::One("CreateWorkspaceRequest")),
        answers: &[
            (201, Some(Body::One("WorkspaceInfo")), "created, its sandbox running"),
            (400, ERR, "a bad name or snapshot tag"),
            (404, ERR, "no such snapshot"),
            (409, ERR, "the name is taken"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::WORKSPACES,
        summary: "Every workspace, by name",
        body: None,
        answers: &[(200, Some(Body::List("WorkspaceInfo")), "the workspaces")],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Get,
        path: routes::WORKSPACE,
        summary: "A workspace (stale once its sandbox ended without a suspend)",
        body: None,
        answers: &[
            (200, Some(Body::One("WorkspaceInfo")), "the workspace"),
            (404, ERR, "no such workspace"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Delete,
        path: routes::WORKSPACE,
        summary: "Delete a workspace: its sandbox killed, its state snapshot removed",
        body: None,
        answers: &[(204, None, "deleted"), (404, ERR, "no such workspace")],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::WORKSPACE_SUSPEND,
        summary: "Suspend a workspace: its sandbox branched (full, or diff) and ended",
        body: Some(Body::One("SuspendWorkspaceRequest")),
        answers: &[
            (200, Some(Body::One("WorkspaceInfo")), "suspended"),
            (400, ERR, "it is not running"),
            (404, ERR, "no such workspace"),
            (503, ERR, "the daemon's branch slots are all busy"),
        ],
        public: false,
        query: &[],
    },
    Route {
        method: HttpMethod::Post,
        path: routes::WORKSPACE_RESUME,
        summary: "Resume a suspended or stale workspace: a sandbox from its last suspend (or its source)",
        body: None,
        answers: &[
            (200, Some(Body::One("WorkspaceInfo")), "running again"),
            (400, ERR, "it is running already"),
            (404, ERR, "no such workspace"),
        ],
        public: false,
        query: &[],
    },
];

fn operation(route: &Route) -> Operation {
    let mut op = OperationBuilder::new().summary(Some(route.summary));
    for name in ["tag", "id", "pid", "name"] {
        if route.path.contains(&format!("{{{name}}}")) {
            op = op.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(
                        utoipa::openapi::ObjectBuilder::new()
                            .schema_type(utoipa::openapi::schema::Type::String),
                    )),
            );
        }
    }
    for &(name, what, required) in route.query {
        op = op.parameter(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Query)
                .description(Some(what))
                .required(if required {
                    Required::True
                } else {
                    Required::False
                })
                .schema(Some(
                    utoipa::openapi::ObjectBuilder::new()
                        .schema_type(utoipa::openapi::schema::Type::String),
                )),
        );
    }
    if let Some(body) = route.body {
        let (mime, content) = body.content();
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content(mime, content)
                .build(),
        ));
    }
    for &(status, body, what) in route.answers {
        let mut r = ResponseBuilder::new().description(what);
        if let Some(body) = body {
            let (mime, content) = body.content();
            r = r.content(mime, content);
        }
        op = op.response(status.to_string(), r.build());
    }
    if route.public {
        // No token: an empty requirement overrides the document's.
        op = op.security(SecurityRequirement::default());
    }
    op.build()
}

/// The document.
pub fn document() -> OpenApi {
    // Methods of one pattern go into one path item.
    let mut paths = Paths::new();
    for route in ROUTES {
        paths.add_path_operation(route.path, vec![route.method.clone()], operation(route));
    }
    let components = ComponentsBuilder::new()
        .schema_from::<ErrorBody>()
        .schema_from::<Health>()
        .schema_from::<Version>()
        .schema_from::<CreateSnapshot>()
        .schema_from::<SnapshotInfo>()
        .schema_from::<SnapshotDetail>()
        .schema_from::<CompactRequest>()
        .schema_from::<SpawnRequest>()
        .schema_from::<SandboxInfo>()
        .schema_from::<PingResponse>()
        .schema_from::<ExecRequest>()
        .schema_from::<ExecResponse>()
        .schema_from::<EvalRequest>()
        .schema_from::<EvalResponse>()
        .schema_from::<BranchRequest>()
        .schema_from::<BranchMode>()
        .schema_from::<SnapshotStatus>()
        .schema_from::<SandboxState>()
        .schema_from::<Pong>()
        .schema_from::<Encoding>()
        .schema_from::<CreateWorkspaceRequest>()
        .schema_from::<WorkspaceInfo>()
        .schema_from::<WorkspaceStatus>()
        .schema_from::<SuspendWorkspaceRequest>()
        .schema_from::<OnTimeout>()
        .schema_from::<TimeoutRequest>()
        .schema_from::<SandboxStats>()
        .schema_from::<ProcessRequest>()
        .schema_from::<PtySize>()
        .schema_from::<ProcessExit>()
        .schema_from::<ExecEvent>()
        .schema_from::<ExecInput>()
        .schema_from::<Spawned>()
        .schema_from::<ProcessInfo>()
        .schema_from::<SignalRequest>()
        .schema_from::<WaitRequest>()
        .schema_from::<WaitResponse>()
        .schema_from::<Uploaded>()
        .schema_from::<FileList>()
        .schema_from::<Entry>()
        .schema_from::<FileType>()
        .schema_from::<MkdirRequest>()
        .schema_from::<RenameRequest>()
        .security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        )
        .build();
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("forkd v1")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "The forkd v1 REST API as forkd-daemon serves it: upstream forkd's \
                     published surface and forkd's extensions (fields marked Extension). \
                     Every route but /healthz needs Authorization: Bearer <token> when the \
                     daemon has one; every error answers {\"error\": \"...\"}.",
                )),
        )
        .paths(paths)
        .components(Some(components))
        .security(Some([SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]))
        .build()
}

/// The document as the route answers it and `docs/openapi.json` holds it.
pub fn json() -> String {
    let mut text = document()
        .to_pretty_json()
        .expect("the document serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` names a schema the document has.
    #[test]
    fn every_reference_resolves() {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let text = json();
        for r in text.split("\"$ref\": \"#/components/schemas/").skip(1) {
            let name = r.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling reference to {name}");
        }
        // Upstream's fields are in the answers' schemas.
        let sandbox = &schemas["SandboxInfo"]["properties"];
        for field in ["netns", "guest_addr", "has_branched", "branch_count"] {
            assert!(sandbox.get(field).is_some(), "SandboxInfo lacks {field}");
        }
        assert!(schemas["SpawnRequest"]["properties"]
            .get("prewarm")
            .is_some());
    }

    /// Each pattern of `proto::routes` is documented, with the methods the
    /// router gives it.
    #[test]
    fn the_document_has_every_route() {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (pattern, methods) in [
            (routes::HEALTHZ, &["get"][..]),
            (routes::HEALTHZ_SLASH, &["get"]),
            (routes::VERSION, &["get"]),
            (routes::METRICS, &["get"]),
            (routes::OPENAPI, &["get"]),
            (routes::SNAPSHOTS, &["get", "post"]),
            (routes::SNAPSHOT, &["delete"]),
            (routes::SNAPSHOT_INFO, &["get"]),
            (routes::SNAPSHOT_COMPACT, &["post"]),
            (routes::SANDBOXES, &["get", "post"]),
            (routes::SANDBOX, &["delete", "get"]),
            (routes::SANDBOX_PING, &["post"]),
            (routes::SANDBOX_EXEC, &["post"]),
            (routes::SANDBOX_EVAL, &["post"]),
            (routes::SANDBOX_BRANCH, &["post"]),
            (routes::WORKSPACES, &["get", "post"]),
            (routes::WORKSPACE, &["delete", "get"]),
            (routes::WORKSPACE_SUSPEND, &["post"]),
            (routes::WORKSPACE_RESUME, &["post"]),
            (routes::SANDBOX_PAUSE, &["post"]),
            (routes::SANDBOX_RESUME, &["post"]),
            (routes::SANDBOX_TIMEOUT, &["post"]),
            (routes::SANDBOX_STATS, &["get"]),
            (routes::SANDBOX_EXEC_STREAM, &["post"]),
            (routes::SANDBOX_EXEC_WS, &["get"]),
            (routes::SANDBOX_PROCESSES, &["get", "post"]),
            (routes::PROCESS_SIGNAL, &["post"]),
            (routes::PROCESS_STDIN, &["post"]),
            (routes::PROCESS_RESIZE, &["post"]),
            (routes::PROCESS_WAIT, &["post"]),
            (routes::SANDBOX_FILES, &["delete", "get", "put"]),
            (routes::FILES_LIST, &["get"]),
            (routes::FILES_STAT, &["get"]),
            (routes::FILES_MKDIR, &["post"]),
            (routes::FILES_RENAME, &["post"]),
        ] {
            let item = paths
                .get(pattern)
                .unwrap_or_else(|| panic!("{pattern} is not documented"));
            let mut got: Vec<&str> = item
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            got.sort();
            assert_eq!(got, methods, "{pattern}");
        }
        assert_eq!(paths.len(), 35, "a documented path the router lacks");
    }

    /// `docs/openapi.json` is this document. After changing the API:
    /// `FORKD_WRITE_OPENAPI=1 cargo test -p forkd-daemon openapi` writes it.
    #[test]
    fn the_checked_in_copy_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let now = json();
        if std::env::var_os("FORKD_WRITE_OPENAPI").is_some() {
            std::fs::write(&path, &now).unwrap();
        }
        let kept = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            kept == now,
            "{} is not the API's document: run FORKD_WRITE_OPENAPI=1 cargo test -p forkd-daemon openapi, and commit it",
            path.display()
        );
    }
}
