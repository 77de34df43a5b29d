//! File operations: read, write (to a temporary file renamed into place),
//! list and stat; protocol 2's mkdir, remove and rename. Content is streamed in [`CHUNK`]-byte data frames.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proto::agent::{
    read_frame, write_frame, Entry, ErrorCode, FileType, ListRequest, MkdirRequest, ReadRequest,
    RemoveRequest, RenameRequest, Reply, StatRequest, WriteRequest, CHUNK, LIST_BATCH, MAX_FRAME,
};

use crate::reply::{io_error_code, send_error, Outcome};

/// How long the host may pause between the frames of a write.
const WRITE_IDLE: Duration = Duration::from_secs(60);

fn absolute(conn: &mut UnixStream, path: &str) -> Result<PathBuf, Outcome> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(send_error(
            conn,
            ErrorCode::BadRequest,
            format!("path {path:?} is not absolute"),
        ));
    }
    Ok(p)
}

fn sent(r: Result<(), proto::agent::FrameError>) -> Result<(), Outcome> {
    r.map_err(|_| Outcome::HostGone)
}

/// `read`: header, data frames, end.
pub fn read(conn: &mut UnixStream, req: ReadRequest) -> Outcome {
    match read_inner(conn, &req) {
        Ok(()) => Outcome::Done,
        Err(o) => o,
    }
}

fn read_inner(conn: &mut UnixStream, req: &ReadRequest) -> Result<(), Outcome> {
    let path = absolute(conn, &req.path)?;
    let fail = |conn: &mut UnixStream, e: std::io::Error| {
        send_error(
            conn,
            io_error_code(&e),
            format!("cannot read {:?}: {e}", req.path),
        )
    };
    let mut f = File::open(&path).map_err(|e| fail(conn, e))?;
    let meta = f.metadata().map_err(|e| fail(conn, e))?;
    if !meta.is_file() {
        return Err(send_error(
            conn,
            ErrorCode::BadRequest,
            format!("{:?} is not a regular file", req.path),
        ));
    }
    let size = meta.len().saturating_sub(req.offset);
    if size > req.max_bytes {
        return Err(send_error(
            conn,
            ErrorCode::TooLarge,
            format!(
                "{:?} has {size} bytes to read, more than the {} the host accepts",
                req.path, req.max_bytes
            ),
        ));
    }
    if req.offset > 0 {
        f.seek(SeekFrom::Start(req.offset))
            .map_err(|e| fail(conn, e))?;
    }
    sent(write_frame(conn, &Reply::File { size }, &[]))?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    // Never more than announced: the file may grow while it is read.
    while total < size {
        let want = ((size - total) as usize).min(CHUNK);
        let n = match f.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail(conn, e)),
        };
        sent(write_frame(conn, &Reply::Data, &buf[..n]))?;
        total += n as u64;
    }
    let end = Reply::End {
        bytes: Some(total),
        truncated: None,
    };
    sent(write_frame(conn, &end, &[]))
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// `write`: ready, then the host's data frames until end, then written.
pub fn write(conn: &mut UnixStream, req: WriteRequest) -> Outcome {
    let path = match absolute(conn, &req.path) {
        Ok(p) => p,
        Err(o) => return o,
    };
    let Some(parent) = path.parent().map(Path::to_path_buf) else {
        return send_error(conn, ErrorCode::BadRequest, "cannot write to /");
    };
    if req.create_dirs {
        if let Err(e) = fs::create_dir_all(&parent) {
            return send_error(
                conn,
                io_error_code(&e),
                format!("cannot create {parent:?}: {e}"),
            );
        }
    }
    // Replace atomically: write beside the target, rename at the end.
    let target = if req.append {
        path.clone()
    } else {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        parent.join(format!(
            ".{name}.forkd-{}-{}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ))
    };
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).mode(req.mode & 0o7777);
    if req.append {
        opts.append(true);
    } else {
        opts.truncate(true);
    }
    let mut file = match opts.open(&target) {
        Ok(f) => f,
        Err(e) => {
            return send_error(
                conn,
                io_error_code(&e),
                format!("cannot write {:?}: {e}", req.path),
            )
        }
    };
    let cleanup = |t: &Path| {
        if !req.append {
            let _ = fs::remove_file(t);
        }
    };
    if write_frame(conn, &Reply::Ready, &[]).is_err() {
        cleanup(&target);
        return Outcome::HostGone;
    }
    let _ = conn.set_read_timeout(Some(WRITE_IDLE));
    let mut total = 0u64;
    loop {
        let frame = match read_frame(conn, MAX_FRAME) {
            Ok(f) => f,
            Err(e) => {
                cleanup(&target);
                return send_error(conn, ErrorCode::BadRequest, format!("during write: {e}"));
            }
        };
        match frame.parse::<Reply>() {
            Ok(Reply::Data) => {
                if let Err(e) = file.write_all(&frame.data) {
                    cleanup(&target);
                    return send_error(
                        conn,
                        io_error_code(&e),
                        format!("writing {:?} failed after {total} bytes: {e}", req.path),
                    );
                }
                total += frame.data.len() as u64;
            }
            Ok(Reply::End { .. }) => break,
            Ok(other) => {
                cleanup(&target);
                return send_error(
                    conn,
                    ErrorCode::BadRequest,
                    format!("during write, expected a data or end frame, got {other:?}"),
                );
            }
            Err(e) => {
                cleanup(&target);
                return send_error(conn, ErrorCode::BadRequest, format!("during write: {e}"));
            }
        }
    }
    drop(file);
    if !req.append {
        if let Err(e) = fs::rename(&target, &path) {
            cleanup(&target);
            return send_error(
                conn,
                io_error_code(&e),
                format!("cannot move the written file to {:?}: {e}", req.path),
            );
        }
    }
    match write_frame(conn, &Reply::Written { bytes: total }, &[]) {
        Ok(()) => Outcome::Done,
        Err(_) => Outcome::HostGone,
    }
}

fn entry(name: String, meta: &fs::Metadata) -> Entry {
    let ft = meta.file_type();
    let file_type = if ft.is_file() {
        FileType::File
    } else if ft.is_dir() {
        FileType::Dir
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::Other
    };
    Entry {
        name,
        file_type,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime_unix: meta.mtime(),
        uid: meta.uid(),
        gid: meta.gid(),
    }
}

/// `list`: entries in batches, then end.
pub fn list(conn: &mut UnixStream, req: ListRequest) -> Outcome {
    let path = match absolute(conn, &req.path) {
        Ok(p) => p,
        Err(o) => return o,
    };
    let dir = match fs::read_dir(&path) {
        Ok(d) => d,
        Err(e) => {
            return send_error(
                conn,
                io_error_code(&e),
                format!("cannot list {:?}: {e}", req.path),
            )
        }
    };
    let mut batch = Vec::new();
    let mut count = 0u64;
    let mut truncated = false;
    for de in dir {
        let Ok(de) = de else { continue };
        if count >= req.max_entries {
            truncated = true;
            break;
        }
        // An entry that vanished meanwhile is skipped.
        let Ok(meta) = de.metadata() else { continue };
        batch.push(entry(de.file_name().to_string_lossy().into_owned(), &meta));
        count += 1;
        if batch.len() >= LIST_BATCH {
            let entries = std::mem::take(&mut batch);
            if write_frame(conn, &Reply::Entries { entries }, &[]).is_err() {
                return Outcome::HostGone;
            }
        }
    }
    if !batch.is_empty() && write_frame(conn, &Reply::Entries { entries: batch }, &[]).is_err() {
        return Outcome::HostGone;
    }
    let end = Reply::End {
        bytes: None,
        truncated: Some(truncated),
    };
    match write_frame(conn, &end, &[]) {
        Ok(()) => Outcome::Done,
        Err(_) => Outcome::HostGone,
    }
}

/// `stat`: one entry.
pub fn stat(conn: &mut UnixStream, req: StatRequest) -> Outcome {
    let path = match absolute(conn, &req.path) {
        Ok(p) => p,
        Err(o) => return o,
    };
    let meta = if req.follow_symlinks {
        fs::metadata(&path)
    } else {
        fs::symlink_metadata(&path)
    };
    match meta {
        Ok(m) => {
            let reply = Reply::Stat {
                entry: entry(req.path.clone(), &m),
            };
            match write_frame(conn, &reply, &[]) {
                Ok(()) => Outcome::Done,
                Err(_) => Outcome::HostGone,
            }
        }
        Err(e) => send_error(
            conn,
            io_error_code(&e),
            format!("cannot stat {:?}: {e}", req.path),
        ),
    }
}

fn done(conn: &mut UnixStream, what: String, r: std::io::Result<()>) -> Outcome {
    match r {
        Ok(()) => match write_frame(conn, &Reply::Ok, &[]) {
            Ok(()) => Outcome::Done,
            Err(_) => Outcome::HostGone,
        },
        Err(e) => send_error(conn, io_error_code(&e), format!("{what}: {e}")),
    }
}

/// `mkdir`: one directory, or (`parents`) the missing ones on the way.
pub fn mkdir(conn: &mut UnixStream, req: MkdirRequest) -> Outcome {
    let path = match absolute(conn, &req.path) {
        Ok(p) => p,
        Err(o) => return o,
    };
    let r = fs::DirBuilder::new()
        .recursive(req.parents)
        .mode(req.mode & 0o7777)
        .create(&path);
    done(conn, format!("cannot make directory {:?}", req.path), r)
}

/// `remove`: a file or link, or (`recursive`) a directory and its content;
/// an empty directory needs no `recursive`.
pub fn remove(conn: &mut UnixStream, req: RemoveRequest) -> Outcome {
    let path = match absolute(conn, &req.path) {
        Ok(p) => p,
        Err(o) => return o,
    };
    if path.parent().is_none() {
        return send_error(conn, ErrorCode::BadRequest, "refusing to remove /");
    }
    let r = match fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() && req.recursive => fs::remove_dir_all(&path),
        Ok(m) if m.is_dir() => fs::remove_dir(&path),
        Ok(_) => fs::remove_file(&path),
        Err(e) => Err(e),
    };
    let what = match &r {
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => format!(
            "cannot remove {:?} (a directory with content: set recursive)",
            req.path
        ),
        _ => format!("cannot remove {:?}", req.path),
    };
    done(conn, what, r)
}

/// `rename`: rename(2), which replaces a file at `to`.
pub fn rename(conn: &mut UnixStream, req: RenameRequest) -> Outcome {
    let (from, to) = match (absolute(conn, &req.from), absolute(conn, &req.to)) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(o), _) | (_, Err(o)) => return o,
    };
    let r = fs::rename(&from, &to);
    done(
        conn,
        format!("cannot rename {:?} to {:?}", req.from, req.to),
        r,
    )
}
