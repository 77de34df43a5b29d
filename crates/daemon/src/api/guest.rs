//! Routes that act inside a sandbox's guest: `/exec/stream`, `/exec/ws`,
//! `/processes...` and `/files...`.

use std::sync::Arc;
use std::time::Duration;

use agent_client::Stream;
use axum::body::{Body as HttpBody, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use proto::api::{
    ExecEvent, ExecInput, FileList, FileQuery, MkdirRequest, ProcessInfo, ProcessRequest,
    RenameRequest, ResizeRequest, SignalRequest, Spawned, UploadQuery, Uploaded, WaitRequest,
    WaitResponse, WS_STDERR, WS_STDOUT,
};

use super::{Body, RawBody};
use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult};
use crate::guest::{decode_b64, event_of, Input, Out, Session};

/// How often a quiet stream sends a keepalive line.
const KEEPALIVE: Duration = Duration::from_secs(1);
/// Longest a WebSocket client may take to send its exec request.
const WS_FIRST_MESSAGE: Duration = Duration::from_secs(30);
/// Largest WebSocket message a client may send (stdin chunks, controls).
const WS_MAX_MESSAGE: usize = 1 << 20;

/// A query string as `T`: 400 naming what is wrong.
fn query<T: serde::de::DeserializeOwned>(q: Option<&str>) -> ApiResult<T> {
    serde_urlencoded::from_str(q.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("bad query: {e}")))
}

/// A pid path segment.
fn pid(s: &str) -> ApiResult<i32> {
    s.parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::bad_request(format!("{s:?} is not a pid")))
}

/// `POST /v1/sandboxes/:id/exec/stream`: newline-delimited JSON events,
/// `started` first and `exit` (or `error`) last, `keepalive` each second
/// the process is quiet. The process ends when the client goes away,
/// unless the request said `detach`.
pub async fn exec_stream(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Body(req): Body<ProcessRequest>,
) -> ApiResult<Response> {
    let Session { pid, events, input } = daemon.exec_session(&id, req).await?;
    // Stdin reaches a streamed process through /processes/{pid}/stdin.
    drop(input);
    let first = line(&ExecEvent::Started { pid });
    // The exit (or error) is the last line: the channel itself stays open
    // while the session's hang-up watch holds a sender.
    //
    // A quiet process still gets a keepalive line every second: the server
    // keeps a half-closed connection open (see `conn`), so only a write
    // that fails tells it the client has gone, and with it the process.
    let rest = futures_util::stream::unfold(Some(events), |rx| async move {
        let mut rx = rx?;
        let item = match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
            Ok(item) => item?,
            Err(_) => return Some((Ok(line(&ExecEvent::Keepalive)), Some(rx))),
        };
        let last = !matches!(item, Ok(Out::Output(..)));
        let bytes = line(&event_of(item));
        Some((Ok::<Bytes, std::io::Error>(bytes), (!last).then_some(rx)))
    });
    let body = futures_util::stream::iter([Ok(first)]);
    use futures_util::StreamExt;
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        HttpBody::from_stream(body.chain(rest)),
    )
        .into_response())
}

fn line(e: &ExecEvent) -> Bytes {
    let mut v = serde_json::to_vec(e).expect("an event serializes");
    v.push(b'\n');
    Bytes::from(v)
}

/// `GET /v1/sandboxes/:id/exec/ws`: an interactive exec over a WebSocket.
/// The client's first message is the request (JSON text); then its binary
/// messages are stdin and its text messages [`ExecInput`]s. The daemon
/// sends `started` and `exit`/`error` as JSON text and output as binary
/// messages whose first byte says the stream (1 stdout, 2 stderr).
pub async fn exec_ws(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    // Refuse before the upgrade what can be refused with a status.
    daemon
        .agent_v2(&id, agent_client::ClientConfig::default(), "streaming exec")
        .await?;
    Ok(ws
        .max_message_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| ws_session(daemon, id, socket)))
}

async fn ws_send_event(socket: &mut WebSocket, e: &ExecEvent) -> bool {
    let text = serde_json::to_string(e).expect("an event serializes");
    socket.send(Message::Text(text.into())).await.is_ok()
}

async fn ws_fail(mut socket: WebSocket, e: ApiError) {
    let _ = ws_send_event(&mut socket, &event_of(Err(e))).await;
    let _ = socket.send(Message::Close(None)).await;
}

async fn ws_session(daemon: Arc<Daemon>, id: String, mut socket: WebSocket) {
    let first = match tokio::time::timeout(WS_FIRST_MESSAGE, socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => super::parse_body::<ProcessRequest>(t.as_bytes()),
        Ok(Some(Ok(_))) => Err(ApiError::bad_request(
            "the first message must be the exec request as JSON text",
        )),
        Ok(_) => return,
        Err(_) => Err(ApiError::bad_request(format!(
            "no exec request within {} s of the upgrade",
            WS_FIRST_MESSAGE.as_secs()
        ))),
    };
    let req = match first {
        Ok(r) => r,
        Err(e) => return ws_fail(socket, e).await,
    };
    let Session {
        pid,
        mut events,
        input,
    } = match daemon.exec_session(&id, req).await {
        Ok(s) => s,
        Err(e) => return ws_fail(socket, e).await,
    };
    if !ws_send_event(&mut socket, &ExecEvent::Started { pid }).await {
        return;
    }
    loop {
        tokio::select! {
            item = events.recv() => {
                let Some(item) = item else { break };
                match item {
                    Ok(Out::Output(stream, data)) => {
                        let mut msg = Vec::with_capacity(data.len() + 1);
                        msg.push(match stream {
                            Stream::Stdout => WS_STDOUT,
                            Stream::Stderr => WS_STDERR,
                        });
                        msg.extend_from_slice(&data);
                        if socket.send(Message::Binary(msg.into())).await.is_err() {
                            return;
                        }
                    }
                    last => {
                        let _ = ws_send_event(&mut socket, &event_of(last)).await;
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                }
            }
            msg = socket.recv() => {
                let what = match msg {
                    Some(Ok(Message::Binary(b))) => Input::Stdin(b.to_vec()),
                    Some(Ok(Message::Text(t))) => match ws_input(t.as_bytes()) {
                        Ok(i) => i,
                        Err(e) => {
                            // A client error ends the session: the process with it.
                            return ws_fail(socket, e).await;
                        }
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    // Closed or broken: dropping the session ends (or detaches) the process.
                    _ => return,
                };
                if input.send(what).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn ws_input(text: &[u8]) -> ApiResult<Input> {
    Ok(match super::parse_body::<ExecInput>(text)? {
        ExecInput::Stdin { data } => Input::Stdin(decode_b64("data", &data)?),
        ExecInput::StdinEnd => Input::StdinEnd,
        ExecInput::Signal { signal } => {
            if !proto::agent::valid_signal(signal) {
                return Err(ApiError::bad_request(format!(
                    "signal {signal} is not a signal number (1 to 64)"
                )));
            }
            Input::Signal(signal)
        }
        ExecInput::Resize { rows, cols } => {
            let size = proto::agent::PtySize { rows, cols };
            size.check().map_err(ApiError::bad_request)?;
            Input::Resize(size)
        }
    })
}

/// `POST /v1/sandboxes/:id/processes` → 201.
pub async fn start_process(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Body(req): Body<ProcessRequest>,
) -> ApiResult<(StatusCode, Json<Spawned>)> {
    let pid = daemon.start_process(&id, req).await?;
    Ok((StatusCode::CREATED, Json(Spawned { pid })))
}

/// `GET /v1/sandboxes/:id/processes`.
pub async fn list_processes(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ProcessInfo>>> {
    Ok(Json(daemon.list_processes(&id).await?))
}

/// `POST /v1/sandboxes/:id/processes/:pid/signal` → 204.
pub async fn signal_process(
    State(daemon): State<Arc<Daemon>>,
    Path((id, p)): Path<(String, String)>,
    Body(req): Body<SignalRequest>,
) -> ApiResult<StatusCode> {
    daemon.signal_process(&id, pid(&p)?, req.signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/sandboxes/:id/processes/:pid/resize` → 204.
pub async fn resize_process(
    State(daemon): State<Arc<Daemon>>,
    Path((id, p)): Path<(String, String)>,
    Body(req): Body<ResizeRequest>,
) -> ApiResult<StatusCode> {
    daemon.resize_process(&id, pid(&p)?, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/sandboxes/:id/processes/:pid/stdin[?eof=true]` → 204: the
/// body's bytes, as they are.
pub async fn process_stdin(
    State(daemon): State<Arc<Daemon>>,
    Path((id, p)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    RawBody(body): RawBody,
) -> ApiResult<StatusCode> {
    let [eof] = super::flags(q.as_deref(), ["eof"])?;
    daemon.process_stdin(&id, pid(&p)?, body, eof).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/sandboxes/:id/processes/:pid/wait`; an empty body waits the
/// default 30 s.
pub async fn wait_process(
    State(daemon): State<Arc<Daemon>>,
    Path((id, p)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> ApiResult<Json<WaitResponse>> {
    let req: WaitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        WaitRequest::default()
    } else {
        super::parse_body(&body)?
    };
    Ok(Json(
        daemon.wait_process(&id, pid(&p)?, req.timeout_secs).await?,
    ))
}

/// `GET /v1/sandboxes/:id/files?path=[&offset=]`: the file's bytes, streamed.
pub async fn download(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let q: FileQuery = query(q.as_deref())?;
    let (size, rx) = daemon.download(&id, q.path, q.offset.unwrap_or(0)).await?;
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        HttpBody::from_stream(body),
    )
        .into_response())
}

/// `PUT /v1/sandboxes/:id/files?path=[&mode=644][&create_dirs=true][&append=true]`
/// → 201: the body, streamed into the file.
pub async fn upload(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    body: HttpBody,
) -> ApiResult<(StatusCode, Json<Uploaded>)> {
    let q: UploadQuery = query(q.as_deref())?;
    let mode = match q.mode.as_deref() {
        None => 0o644,
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| ApiError::bad_request(format!("mode {m:?} is not octal 0 to 7777")))?,
    };
    let req = proto::agent::WriteRequest {
        path: q.path,
        mode,
        append: q.append.unwrap_or(false),
        create_dirs: q.create_dirs.unwrap_or(false),
    };
    let up = daemon.upload(&id, req, body).await?;
    Ok((StatusCode::CREATED, Json(up)))
}

/// `DELETE /v1/sandboxes/:id/files?path=[&recursive=true]` → 204.
pub async fn remove(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<StatusCode> {
    let q: FileQuery = query(q.as_deref())?;
    daemon
        .remove_file(&id, q.path, q.recursive.unwrap_or(false))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/sandboxes/:id/files/list?path=[&max_entries=]`.
pub async fn list(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<FileList>> {
    let q: FileQuery = query(q.as_deref())?;
    Ok(Json(daemon.list_files(&id, q.path, q.max_entries).await?))
}

/// `GET /v1/sandboxes/:id/files/stat?path=[&nofollow=true]`.
pub async fn stat(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<proto::api::Entry>> {
    let q: FileQuery = query(q.as_deref())?;
    let follow = !q.nofollow.unwrap_or(false);
    Ok(Json(daemon.stat_file(&id, q.path, follow).await?))
}

/// `POST /v1/sandboxes/:id/files/mkdir` → 204.
pub async fn mkdir(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Body(req): Body<MkdirRequest>,
) -> ApiResult<StatusCode> {
    daemon.mkdir(&id, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/sandboxes/:id/files/rename` → 204.
pub async fn rename(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Body(req): Body<RenameRequest>,
) -> ApiResult<StatusCode> {
    daemon.rename_file(&id, req).await?;
    Ok(StatusCode::NO_CONTENT)
}
