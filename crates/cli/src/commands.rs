//! The commands that talk to the daemon.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use proto::api::{
    BranchMode, BranchRequest, CompactRequest, CreateSnapshot, EvalRequest, EvalResponse,
    ExecRequest, ExecResponse, SandboxInfo, SnapshotDetail, SnapshotInfo, SnapshotStatus,
    SpawnRequest, Version,
};

use crate::args::{
    CompactArgs, EvalArgs, ExecArgs, ForkArgs, IdArg, KillArgs, LsArgs, RmiArgs, SnapshotArgs,
    SpawnArgs, TagArg,
};
use crate::client::{routes, Client};
use crate::error::CliError;
use crate::fanout::{self, parallel_map, Failure, THREADS};
use crate::format::{self, age, duration, now_unix, or_dash};
use crate::progress;

/// What every command needs: the daemon, how to print, where to print.
pub struct Ctx<'a> {
    /// The daemon.
    pub client: Client,
    /// `--json`.
    pub json: bool,
    /// Draw progress on standard error.
    pub progress: bool,
    /// Standard output (a buffer in tests).
    pub out: &'a mut dyn Write,
    /// Standard error (a buffer in tests).
    pub err: &'a mut dyn Write,
}

/// A command's result: the process exit code, or the error to print.
pub type Outcome = Result<u8, CliError>;

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Other(format!("writing output: {e}"))
    }
}

fn check_tag(tag: &str) -> Result<(), CliError> {
    if proto::api::valid_tag(tag) {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "bad tag {tag:?}: use 1 to {} letters, digits, '-' or '_'",
            proto::api::MAX_TAG_LEN
        )))
    }
}

/// Seconds to wait for a snapshot: the guest's boot wait and a margin.
pub fn snapshot_timeout(client: &Client, boot_wait_secs: Option<u64>) -> Duration {
    let boot = Duration::from_secs(boot_wait_secs.unwrap_or(60) + 120);
    client.timeout().max(boot)
}

/// One line about a snapshot.
pub fn describe_snapshot(s: &SnapshotInfo) -> String {
    let mut line = format!("snapshot {} is {}", s.tag, s.status.as_str());
    let mut extra = Vec::new();
    if let Some(k) = &s.kind {
        extra.push(k.clone());
    }
    if let Some(g) = &s.guest {
        extra.push(match g.as_str() {
            "builtin" => "built-in guest".to_string(),
            other => format!("{other} guest"),
        });
    }
    if let Some(m) = s.mem_mib {
        extra.push(format!("{m} MiB"));
    }
    if s.network {
        extra.push("network interface".to_string());
    }
    if let Some(b) = &s.branched_from {
        extra.push(format!("branched from {b}"));
    }
    if let Some(p) = pause_ms(s) {
        extra.push(format!("paused {p:.2} ms"));
    }
    if !extra.is_empty() {
        line.push_str(&format!(" ({})", extra.join(", ")));
    }
    line.push_str(&format!(": {}", s.dir));
    if let Some(w) = &s.warning {
        line.push_str(&format!("\nwarning: {w}"));
    }
    line
}

/// `forkd snapshot`.
pub fn snapshot(ctx: &mut Ctx, a: &SnapshotArgs) -> Outcome {
    if let Some(tag) = a.tag() {
        check_tag(tag)?;
    }
    let t0 = Instant::now();
    let (answer, what) = if let Some(id) = &a.from_sandbox {
        let mode = if a.live {
            Some(BranchMode::Live)
        } else if a.diff {
            Some(BranchMode::Diff)
        } else {
            None
        };
        let req = BranchRequest {
            tag: a.tag().map(str::to_string),
            mode,
            diff: None,
            wait: a.no_wait.then_some(false),
            ..BranchRequest::default()
        };
        let sp = ctx
            .progress
            .then(|| progress::spinner(format!("branching sandbox {id}")));
        let client = ctx
            .client
            .with_timeout(ctx.client.timeout().max(Duration::from_secs(600)));
        let r = client.post(&routes::sandbox_op(id, routes::SandboxOp::Branch), &req);
        if let Some(sp) = sp {
            sp.finish_and_clear();
        }
        (r?, "branched")
    } else {
        let tag = a.tag().ok_or_else(|| {
            CliError::Usage(
                "name the new snapshot: forkd snapshot --builtin TAG (or --tag TAG)".into(),
            )
        })?;
        let req = CreateSnapshot {
            tag: tag.to_string(),
            kernel: a.kernel.clone(),
            rootfs: a.rootfs.clone(),
            rw: a.rw.then_some(true),
            boot_wait_secs: a.boot_wait_secs,
            mem_size_mib: a.mem_mib,
            vcpus: a.vcpus,
            builtin: a.builtin,
            kernel_args: a.kernel_args.clone(),
            network: a.network,
            tap: a.tap.clone(),
        };
        let guest = if a.builtin {
            "the built-in guest"
        } else {
            "the Linux guest"
        };
        let sp = ctx.progress.then(|| {
            progress::spinner(format!(
                "booting {guest}, waiting for its agent, snapshotting it as {tag}"
            ))
        });
        let client = ctx
            .client
            .with_timeout(snapshot_timeout(&ctx.client, a.boot_wait_secs));
        let r = client.post(routes::SNAPSHOTS, &req);
        if let Some(sp) = sp {
            sp.finish_and_clear();
        }
        (r?, "made")
    };
    let took = t0.elapsed();
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let info: SnapshotInfo = answer.parse()?;
    writeln!(ctx.out, "{}", describe_snapshot(&info))?;
    writeln!(ctx.out, "{what} in {}", duration(took))?;
    if answer.status == 202 || info.status == SnapshotStatus::Writing {
        writeln!(
            ctx.out,
            "its memory is still being copied: `forkd snapshot-info {}` shows when it is ready",
            info.tag
        )?;
    }
    Ok(0)
}

/// `forkd spawn`.
pub fn spawn(ctx: &mut Ctx, a: &SpawnArgs) -> Outcome {
    let req = SpawnRequest {
        snapshot_tag: a.tag.clone(),
        n: a.n,
        per_child_netns: a.per_child_netns.then_some(true),
        memory_limit_mib: a.memory_limit_mib,
        cpu_limit: a.cpu_limit,
        pids_limit: a.pids_limit,
        disk_quota_mib: a.disk_quota_mib,
        io_limit_mibps: a.io_limit_mibps,
        live_fork: a.live_fork.then_some(true),
        prewarm: a.prewarm.then_some(true),
        hugepages: a.hugepages.then_some(true),
        labels: (!a.labels.is_empty()).then(|| a.labels.iter().cloned().collect()),
        timeout_secs: a.timeout_secs,
        on_timeout: a
            .on_timeout
            .as_deref()
            .and_then(proto::api::OnTimeout::parse),
    };
    let sp = ctx
        .progress
        .then(|| progress::spinner(format!("forking {} children of {}", a.n, a.tag)));
    let t0 = Instant::now();
    let r = ctx.client.post(routes::SANDBOXES, &req);
    let took = t0.elapsed();
    if let Some(sp) = sp {
        sp.finish_and_clear();
    }
    let answer = r?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let sandboxes: Vec<SandboxInfo> = answer.parse()?;
    if a.quiet {
        for s in &sandboxes {
            writeln!(ctx.out, "{}", s.id)?;
        }
        return Ok(0);
    }
    write!(ctx.out, "{}", format::sandbox_table(&sandboxes, now_unix()))?;
    writeln!(
        ctx.err,
        "{} sandbox{} forked from {} in {}",
        sandboxes.len(),
        if sandboxes.len() == 1 { "" } else { "es" },
        a.tag,
        duration(took)
    )?;
    Ok(0)
}

/// `forkd fork`.
pub fn fork(ctx: &mut Ctx, a: &ForkArgs) -> Outcome {
    let req = SpawnRequest {
        snapshot_tag: a.tag.clone(),
        n: a.n,
        memory_limit_mib: a.memory_limit_mib,
        live_fork: a.live_fork.then_some(true),
        prewarm: a.prewarm.then_some(true),
        hugepages: a.hugepages.then_some(true),
        ..SpawnRequest::default()
    };
    let figures = fanout::spawn_ping_kill(
        &ctx.client,
        &req,
        Duration::from_secs(30),
        Duration::from_secs(a.settle_secs),
        ctx.progress,
    )?;
    if ctx.json {
        writeln!(
            ctx.out,
            "{}",
            serde_json::to_string_pretty(&figures).expect("serializable")
        )?;
    } else {
        write!(ctx.out, "{}", figures.summary())?;
    }
    Ok(if figures.all_good() { 0 } else { 1 })
}

/// `forkd ls`.
pub fn ls(ctx: &mut Ctx, a: &LsArgs) -> Outcome {
    let mut query: Vec<String> = Vec::new();
    if a.all {
        query.push("all=true".into());
    }
    for (k, v) in &a.labels {
        query.push(format!("label={}", routes::seg(&format!("{k}={v}"))));
    }
    let path = if query.is_empty() {
        routes::SANDBOXES.to_owned()
    } else {
        format!("{}?{}", routes::SANDBOXES, query.join("&"))
    };
    let answer = ctx.client.get(&path)?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let sandboxes: Vec<SandboxInfo> = answer.parse()?;
    if a.quiet {
        for s in &sandboxes {
            writeln!(ctx.out, "{}", s.id)?;
        }
    } else if sandboxes.is_empty() {
        writeln!(ctx.err, "no sandboxes")?;
    } else if a.all {
        write!(
            ctx.out,
            "{}",
            format::sandbox_table_with_state(&sandboxes, now_unix())
        )?;
    } else {
        write!(ctx.out, "{}", format::sandbox_table(&sandboxes, now_unix()))?;
    }
    Ok(0)
}

/// `forkd images`.
pub fn images(ctx: &mut Ctx) -> Outcome {
    let answer = ctx.client.get(routes::SNAPSHOTS)?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let mut snaps: Vec<SnapshotInfo> = answer.parse()?;
    if snaps.is_empty() {
        writeln!(ctx.err, "no snapshots")?;
        return Ok(0);
    }
    snaps.sort_by(|a, b| (a.created_at_unix, &a.tag).cmp(&(b.created_at_unix, &b.tag)));
    // SnapshotInfo does not carry the parent: ask /info for the snapshots
    // that can have one (branched or diff ones).
    let may_have_parent = |s: &SnapshotInfo| {
        s.branched_from.is_some() || s.kind.as_deref().is_some_and(|k| k != "full")
    };
    let client = &ctx.client;
    let parents: Vec<Option<String>> = parallel_map(&snaps, THREADS, None, |s| {
        if !may_have_parent(s) {
            return None;
        }
        match client.get(&routes::snapshot_info(&s.tag)) {
            Ok(a) => a.parse::<SnapshotDetail>().ok().and_then(|d| d.parent_tag),
            Err(_) => Some("?".into()),
        }
    });
    let by_tag: std::collections::HashMap<&str, Option<String>> =
        snaps.iter().map(|s| s.tag.as_str()).zip(parents).collect();
    let table = format::image_table(
        &snaps,
        |s| by_tag.get(s.tag.as_str()).cloned().flatten(),
        now_unix(),
    );
    write!(ctx.out, "{table}")?;
    Ok(0)
}

/// `forkd kill`.
pub fn kill(ctx: &mut Ctx, a: &KillArgs) -> Outcome {
    let ids: Vec<String> = if a.all || a.tag.is_some() {
        let list: Vec<SandboxInfo> = ctx.client.get(routes::SANDBOXES)?.parse()?;
        list.into_iter()
            .filter(|s| a.tag.as_ref().is_none_or(|t| *t == s.snapshot_tag))
            .map(|s| s.id)
            .collect()
    } else {
        a.ids.clone()
    };
    let bar = (ctx.progress && ids.len() > 10).then(|| progress::bar(ids.len() as u64, "kill"));
    let client = &ctx.client;
    let results: Vec<Option<Failure>> = parallel_map(&ids, THREADS, bar.as_ref(), |id| {
        client.delete(&routes::sandbox(id)).err().map(|e| Failure {
            id: id.clone(),
            error: e.to_string(),
        })
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut killed = Vec::new();
    let mut failed = Vec::new();
    for (id, r) in ids.iter().zip(results) {
        match r {
            None => killed.push(id.clone()),
            Some(f) => failed.push(f),
        }
    }
    if ctx.json {
        let v = serde_json::json!({ "killed": killed, "failed": failed });
        writeln!(
            ctx.out,
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        )?;
    } else {
        for id in &killed {
            writeln!(ctx.out, "killed {id}")?;
        }
        if ids.is_empty() {
            match &a.tag {
                Some(t) => writeln!(ctx.err, "no sandboxes of {t} to kill")?,
                None => writeln!(ctx.err, "no sandboxes to kill")?,
            }
        }
        for f in &failed {
            writeln!(ctx.err, "forkd: {}: {}", f.id, f.error)?;
        }
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}

/// `forkd rmi`.
pub fn rmi(ctx: &mut Ctx, a: &RmiArgs) -> Outcome {
    let mut deleted = Vec::new();
    let mut failed = Vec::new();
    for tag in &a.tags {
        match ctx
            .client
            .delete(&routes::snapshot(tag, a.cascade, a.force))
        {
            Ok(_) => deleted.push(tag.clone()),
            Err(CliError::Api {
                status: 409,
                message,
            }) if !a.cascade && !a.force => failed.push(Failure {
                id: tag.clone(),
                error: format!(
                    "{message}; with forkd: `forkd rmi {tag} --cascade` (delete them too) or \
                     `--force` (HTTP 409)"
                ),
            }),
            Err(e) => failed.push(Failure {
                id: tag.clone(),
                error: e.to_string(),
            }),
        }
    }
    if ctx.json {
        let v = serde_json::json!({ "deleted": deleted, "failed": failed });
        writeln!(
            ctx.out,
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        )?;
    } else {
        let how = if a.cascade {
            " and the snapshots that depend on it"
        } else {
            ""
        };
        for tag in &deleted {
            writeln!(ctx.out, "deleted {tag}{how}")?;
        }
        for f in &failed {
            writeln!(ctx.err, "forkd: {}: {}", f.id, f.error)?;
        }
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}

/// `forkd where`: the daemon and where it keeps its state.
pub fn where_(ctx: &mut Ctx) -> Outcome {
    let answer = ctx.client.get(routes::VERSION)?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let v: Version = answer.parse()?;
    writeln!(ctx.out, "daemon     {}", ctx.client.base())?;
    let unknown = || "(this daemon does not say)".to_string();
    writeln!(
        ctx.out,
        "state      {}",
        v.state_dir.unwrap_or_else(unknown)
    )?;
    writeln!(
        ctx.out,
        "snapshots  {}",
        v.snapshot_root.unwrap_or_else(unknown)
    )?;
    Ok(0)
}

/// Bytes for people: `512 B`, `4.0 KiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// The `forkd snapshot-info` text.
pub fn detail_text(d: &SnapshotDetail, now: u64) -> String {
    let i = &d.info;
    let mut rows: Vec<(&str, String)> = Vec::new();
    rows.push(("tag", i.tag.clone()));
    let mut status = i.status.as_str().to_string();
    if i.status == SnapshotStatus::Ready {
        status.push_str(if i.bootable {
            " (bootable)"
        } else {
            " (not bootable)"
        });
    }
    rows.push(("status", status));
    rows.push(("kind", or_dash(i.kind.as_deref())));
    rows.push(("guest", or_dash(i.guest.as_deref())));
    rows.push((
        "memory",
        format!(
            "{} of guest RAM, {} stored here",
            bytes(d.memory_logical_bytes),
            bytes(d.memory_physical_bytes)
        ),
    ));
    rows.push(("vmstate", bytes(d.vmstate_bytes)));
    rows.push((
        "network",
        if i.network {
            format!(
                "an interface, the guest at {}; each child in a network namespace of its own",
                proto::api::GUEST_ADDR
            )
        } else {
            "-".into()
        },
    ));
    rows.push((
        "created",
        format!(
            "{} (unix {})",
            age(now, i.created_at_unix),
            i.created_at_unix
        ),
    ));
    if let Some(b) = &i.branched_from {
        let pause = pause_ms(i)
            .map(|p| format!(", paused {p:.2} ms"))
            .unwrap_or_default();
        rows.push(("branched from", format!("{b}{pause}")));
    }
    rows.push((
        "parent",
        match (&d.parent_tag, &d.parent_content_hash) {
            (Some(p), Some(h)) => format!("{p} (content hash {h})"),
            (Some(p), None) => p.clone(),
            _ => "-".into(),
        },
    ));
    let chain = if d.ancestors.is_empty() {
        d.chain_depth.to_string()
    } else {
        format!("{} ({})", d.chain_depth, d.ancestors.join(" -> "))
    };
    rows.push(("chain depth", chain));
    rows.push((
        "dependents",
        if d.dependents.is_empty() {
            "-".into()
        } else {
            d.dependents.join(", ")
        },
    ));
    rows.push(("dir", i.dir.clone()));
    if let Some(w) = &i.warning {
        rows.push(("warning", w.clone()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// `forkd snapshot-info`.
pub fn snapshot_info(ctx: &mut Ctx, a: &TagArg) -> Outcome {
    let answer = ctx.client.get(&routes::snapshot_info(&a.tag))?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let d: SnapshotDetail = answer.parse()?;
    write!(ctx.out, "{}", detail_text(&d, now_unix()))?;
    Ok(0)
}

/// `forkd compact`.
pub fn compact(ctx: &mut Ctx, a: &CompactArgs) -> Outcome {
    check_tag(&a.to)?;
    let sp = ctx
        .progress
        .then(|| progress::spinner(format!("flattening {} into {}", a.tag, a.to)));
    let client = ctx
        .client
        .with_timeout(ctx.client.timeout().max(Duration::from_secs(600)));
    let t0 = Instant::now();
    let r = client.post(
        &routes::compact(&a.tag),
        &CompactRequest { to: a.to.clone() },
    );
    if let Some(sp) = sp {
        sp.finish_and_clear();
    }
    let answer = r?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let info: SnapshotInfo = answer.parse()?;
    writeln!(ctx.out, "{}", describe_snapshot(&info))?;
    writeln!(ctx.out, "compacted {} in {}", a.tag, duration(t0.elapsed()))?;
    Ok(0)
}

/// The process exit code for a guest's: itself when it fits, 124 for a
/// timeout (-1), 1 for anything else out of range.
pub fn exit_code(guest: i32) -> u8 {
    match guest {
        0..=255 => guest as u8,
        -1 => 124,
        _ => 1,
    }
}

fn read_input(path: &std::path::Path) -> Result<String, CliError> {
    let mut s = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::Other(format!("reading standard input: {e}")))?;
    } else {
        s = std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    }
    Ok(s)
}

/// `forkd exec`: the output's bytes exactly (base64 on the wire).
pub fn exec(ctx: &mut Ctx, a: &ExecArgs) -> Outcome {
    if a.stream {
        return crate::guest::exec_stream(ctx, a);
    }
    let stdin = a.stdin_file.as_deref().map(read_bytes).transpose()?;
    let req = ExecRequest {
        args: a.args.clone(),
        timeout_secs: a.timeout_secs,
        stdin_base64: stdin.map(|b| crate::guest::b64(&b)),
        env: a.env.iter().cloned().collect(),
        cwd: a.cwd.clone(),
        user: a.user.clone(),
        encoding: Some(proto::api::Encoding::Base64),
        ..ExecRequest::default()
    };
    let wait = Duration::from_secs(a.timeout_secs.unwrap_or(60) + 30);
    let client = ctx.client.with_timeout(ctx.client.timeout().max(wait));
    let answer = client.post(&routes::sandbox_op(&a.id, routes::SandboxOp::Exec), &req)?;
    let r: ExecResponse = answer.parse()?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
    } else {
        // An older daemon ignores `encoding` and answers text.
        let bytes = |s: &str| match r.encoding {
            Some(proto::api::Encoding::Base64) => crate::guest::unb64(s),
            _ => Ok(s.as_bytes().to_vec()),
        };
        ctx.out.write_all(&bytes(&r.stdout)?)?;
        ctx.err.write_all(&bytes(&r.stderr)?)?;
        if r.exit_code == -1 {
            writeln!(ctx.err, "forkd: {} timed out in {}", a.args[0], a.id)?;
        }
    }
    ctx.out.flush()?;
    Ok(exit_code(r.exit_code))
}

/// A file's bytes (`-`: standard input's).
pub fn read_bytes(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    let mut v = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut v)
            .map_err(|e| CliError::Other(format!("reading standard input: {e}")))?;
    } else {
        v = std::fs::read(path)
            .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    }
    Ok(v)
}

/// `forkd eval`.
pub fn eval(ctx: &mut Ctx, a: &EvalArgs) -> Outcome {
    let code = if a.code == "-" {
        read_input(std::path::Path::new("-"))?
    } else {
        a.code.clone()
    };
    let req = EvalRequest {
        code,
        timeout_secs: a.timeout_secs,
    };
    let wait = Duration::from_secs(a.timeout_secs.unwrap_or(60) + 30);
    let client = ctx.client.with_timeout(ctx.client.timeout().max(wait));
    let answer = client.post(&routes::sandbox_op(&a.id, routes::SandboxOp::Eval), &req)?;
    let r: EvalResponse = answer.parse()?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
    } else {
        if let Some(v) = &r.result {
            writeln!(ctx.out, "{v}")?;
        }
        if let Some(e) = &r.error {
            writeln!(ctx.err, "{}", e.trim_end())?;
        }
    }
    Ok(exit_code(r.exit_code))
}

/// `forkd ping`.
pub fn ping(ctx: &mut Ctx, a: &IdArg) -> Outcome {
    let t0 = Instant::now();
    let answer = ctx.client.post(
        &routes::sandbox_op(&a.id, routes::SandboxOp::Ping),
        &serde_json::json!({}),
    )?;
    let took = t0.elapsed();
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
    } else {
        let body = serde_json::from_str::<serde_json::Value>(&answer.raw)
            .map(|v| v.to_string())
            .unwrap_or_else(|_| answer.raw.trim().to_string());
        writeln!(ctx.out, "{} answered in {}: {body}", a.id, duration(took))?;
    }
    Ok(0)
}

/// `forkd version`.
pub fn version(ctx: &mut Ctx) -> Outcome {
    let answer = ctx.client.get(routes::VERSION)?;
    if ctx.json {
        writeln!(ctx.out, "{}", answer.pretty())?;
        return Ok(0);
    }
    let v: Version = answer.parse()?;
    writeln!(ctx.out, "forkd {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(
        ctx.out,
        "forkd-daemon {} (API {}) at {}",
        v.version,
        v.api,
        ctx.client.base()
    )?;
    Ok(0)
}

/// A branch's pause in milliseconds, to the microsecond when the daemon
/// says it (`pause_us`), else upstream's whole milliseconds.
fn pause_ms(s: &SnapshotInfo) -> Option<f64> {
    s.pause_us
        .map(|us| us as f64 / 1000.0)
        .or(s.pause_ms.map(|ms| ms as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_guest() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3), 3);
        assert_eq!(exit_code(137), 137);
        assert_eq!(exit_code(-1), 124);
        assert_eq!(exit_code(300), 1);
        assert_eq!(exit_code(-9), 1);
    }

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(4096), "4.0 KiB");
        assert_eq!(bytes(128 << 20), "128.0 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
    }

    use crate::args::{ExecArgs, KillArgs, RmiArgs, SnapshotArgs, SpawnArgs};
    use crate::testserver::FakeDaemon;

    fn run(
        client: Client,
        json: bool,
        f: impl FnOnce(&mut Ctx) -> Outcome,
    ) -> (Outcome, String, String) {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let r = {
            let mut ctx = Ctx {
                client,
                json,
                progress: false,
                out: &mut out,
                err: &mut err,
            };
            f(&mut ctx)
        };
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn sandbox_json(id: &str) -> serde_json::Value {
        serde_json::json!({"id": id, "snapshot_tag": "t", "created_at_unix": 1, "pid": 7})
    }

    fn snapshot_json(tag: &str, kind: &str, status: &str) -> serde_json::Value {
        serde_json::json!({"tag": tag, "dir": format!("/s/{tag}"), "created_at_unix": 1,
            "status": status, "bootable": status == "ready", "kind": kind})
    }

    #[test]
    fn spawn_sends_the_request_and_the_token_and_prints_a_table() {
        let d = FakeDaemon::start(|_| {
            let v = serde_json::json!([sandbox_json("sb-1"), sandbox_json("sb-2")]);
            (201, v.to_string())
        });
        let a = SpawnArgs {
            tag: "t".into(),
            n: 2,
            live_fork: true,
            memory_limit_mib: Some(64),
            cpu_limit: Some(0.5),
            pids_limit: None,
            disk_quota_mib: Some(128),
            io_limit_mibps: Some(16),
            per_child_netns: false,
            prewarm: true,
            hugepages: false,
            labels: vec![("team".into(), "a".into())],
            timeout_secs: Some(60),
            on_timeout: Some("pause".into()),
            quiet: false,
        };
        let (r, out, err) = run(d.client(Some("tok")), false, |c| spawn(c, &a));
        assert_eq!(r, Ok(0));
        assert!(out.starts_with("ID    SNAPSHOT  PID"), "{out}");
        assert!(out.contains("sb-2"), "{out}");
        assert!(err.contains("2 sandboxes forked from t"), "{err}");
        let reqs = d.requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(
            (reqs[0].method.as_str(), reqs[0].path.as_str()),
            ("POST", "/v1/sandboxes")
        );
        assert_eq!(reqs[0].header("authorization"), Some("Bearer tok"));
        assert_eq!(
            reqs[0].json(),
            serde_json::json!({"snapshot_tag": "t", "n": 2, "memory_limit_mib": 64, "cpu_limit": 0.5,
                "disk_quota_mib": 128, "io_limit_mibps": 16, "live_fork": true, "prewarm": true,
                "labels": {"team": "a"}, "timeout_secs": 60, "on_timeout": "pause"})
        );
    }

    #[test]
    fn json_prints_the_answer_in_its_own_key_order() {
        let d = FakeDaemon::start(|_| {
            (
                200,
                r#"[{"id":"z","snapshot_tag":"t","created_at_unix":1,"pid":7}]"#.into(),
            )
        });
        let (r, out, _) = run(d.client(None), true, |c| {
            ls(
                c,
                &LsArgs {
                    quiet: false,
                    all: false,
                    labels: vec![],
                },
            )
        });
        assert_eq!(r, Ok(0));
        assert_eq!(
            out,
            "[\n  {\n    \"id\": \"z\",\n    \"snapshot_tag\": \"t\",\n    \"created_at_unix\": 1,\n    \"pid\": 7\n  }\n]\n"
        );
        assert!(d.requests()[0].header("authorization").is_none());
    }

    #[test]
    fn ls_all_asks_for_the_exited_too_and_shows_how_they_ended() {
        let d = FakeDaemon::start(|_| {
            (
                200,
                r#"[{"id":"z-0","snapshot_tag":"t","created_at_unix":1,"pid":7,"state":"exited","signal":9}]"#
                    .into(),
            )
        });
        let (r, out, _) = run(d.client(None), false, |c| {
            ls(
                c,
                &LsArgs {
                    quiet: false,
                    all: true,
                    labels: vec![("team".into(), "a b".into())],
                },
            )
        });
        assert_eq!(r, Ok(0));
        assert!(out.contains("exited (signal 9)"), "{out}");
        assert_eq!(
            d.requests()[0].path,
            "/v1/sandboxes?all=true&label=team%3Da%20b"
        );
    }

    #[test]
    fn daemon_errors_come_back_with_their_status() {
        let d = FakeDaemon::start(|_| {
            (
                409,
                r#"{"error":"snapshot base has dependents: b1"}"#.into(),
            )
        });
        let a = RmiArgs {
            tags: vec!["base".into()],
            cascade: false,
            force: false,
        };
        let (r, _, err) = run(d.client(None), false, |c| rmi(c, &a));
        assert_eq!(r, Ok(1));
        assert_eq!(
            err,
            "forkd: base: snapshot base has dependents: b1; with forkd: `forkd rmi base \
             --cascade` (delete them too) or `--force` (HTTP 409)\n"
        );
    }

    #[test]
    fn rmi_cascade_is_a_query_flag() {
        let d = FakeDaemon::start(|_| (204, String::new()));
        let a = RmiArgs {
            tags: vec!["base".into()],
            cascade: true,
            force: false,
        };
        let (r, out, _) = run(d.client(None), false, |c| rmi(c, &a));
        assert_eq!(r, Ok(0));
        assert!(out.starts_with("deleted base and the snapshots"), "{out}");
        let q = &d.requests()[0];
        assert_eq!(
            (q.method.as_str(), q.path.as_str()),
            ("DELETE", "/v1/snapshots/base?cascade=true")
        );
    }

    #[test]
    fn exec_prints_both_streams_and_exits_with_the_guest_code() {
        let d = FakeDaemon::start(|_| {
            (
                200,
                r#"{"stdout":"hi\n","stderr":"oops\n","exit_code":3}"#.into(),
            )
        });
        let a = ExecArgs {
            id: "sb-1".into(),
            timeout_secs: Some(5),
            stdin_file: None,
            env: vec![("A".into(), "1".into())],
            cwd: None,
            user: Some("nobody".into()),
            stream: false,
            args: vec!["sh".into(), "-c".into(), "echo hi".into()],
        };
        let (r, out, err) = run(d.client(None), false, |c| exec(c, &a));
        assert_eq!(r, Ok(3));
        assert_eq!(out, "hi\n");
        assert_eq!(err, "oops\n");
        let q = &d.requests()[0];
        assert_eq!(q.path, "/v1/sandboxes/sb-1/exec");
        assert_eq!(
            q.json(),
            serde_json::json!({"args": ["sh", "-c", "echo hi"], "timeout_secs": 5,
                "env": {"A": "1"}, "user": "nobody", "encoding": "base64"})
        );
    }

    #[test]
    fn branch_sends_mode_and_wait() {
        let d = FakeDaemon::start(|_| {
            let mut v = snapshot_json("b1", "full", "writing");
            v["branched_from"] = "sb-1".into();
            v["pause_ms"] = 2.into();
            v["pause_us"] = 1500.into();
            (202, v.to_string())
        });
        let a = SnapshotArgs {
            tag_pos: Some("b1".into()),
            tag_opt: None,
            builtin: false,
            kernel: None,
            rootfs: None,
            rw: false,
            kernel_args: None,
            network: false,
            tap: None,
            mem_mib: None,
            vcpus: None,
            boot_wait_secs: None,
            from_sandbox: Some("sb-1".into()),
            diff: false,
            live: true,
            no_wait: true,
        };
        let (r, out, _) = run(d.client(None), false, |c| snapshot(c, &a));
        assert_eq!(r, Ok(0));
        assert!(out.contains("snapshot b1 is writing"), "{out}");
        assert!(out.contains("paused 1.50 ms"), "{out}");
        assert!(out.contains("still being copied"), "{out}");
        let q = &d.requests()[0];
        assert_eq!(q.path, "/v1/sandboxes/sb-1/branch");
        assert_eq!(
            q.json(),
            serde_json::json!({"tag": "b1", "mode": "live", "wait": false})
        );
    }

    #[test]
    fn builtin_snapshots_send_the_extension_flag() {
        let d = FakeDaemon::start(|_| (201, snapshot_json("t", "full", "ready").to_string()));
        let a = SnapshotArgs {
            tag_pos: None,
            tag_opt: Some("t".into()),
            builtin: true,
            kernel: None,
            rootfs: None,
            rw: false,
            kernel_args: None,
            network: false,
            tap: None,
            mem_mib: Some(128),
            vcpus: None,
            boot_wait_secs: None,
            from_sandbox: None,
            diff: false,
            live: false,
            no_wait: false,
        };
        let (r, out, _) = run(d.client(None), false, |c| snapshot(c, &a));
        assert_eq!(r, Ok(0));
        assert!(out.starts_with("snapshot t is ready (full)"), "{out}");
        assert_eq!(
            d.requests()[0].json(),
            serde_json::json!({"tag": "t", "builtin": true, "mem_size_mib": 128})
        );
    }

    #[test]
    fn images_ask_info_only_for_snapshots_that_can_have_a_parent() {
        let d = FakeDaemon::start(|q| match q.path.as_str() {
            "/v1/snapshots" => {
                let mut b1 = snapshot_json("b1", "diff", "ready");
                b1["created_at_unix"] = 2.into();
                (
                    200,
                    serde_json::json!([b1, snapshot_json("base", "full", "ready")]).to_string(),
                )
            }
            "/v1/snapshots/b1/info" => {
                let mut v = snapshot_json("b1", "diff", "ready");
                for (k, x) in [
                    ("memory_logical_bytes", 1),
                    ("memory_physical_bytes", 1),
                    ("vmstate_bytes", 1),
                    ("chain_depth", 1),
                ] {
                    v[k] = x.into();
                }
                v["parent_tag"] = "base".into();
                v["parent_content_hash"] = serde_json::Value::Null;
                v["ancestors"] = serde_json::json!(["base"]);
                v["dependents"] = serde_json::json!([]);
                (200, v.to_string())
            }
            _ => (404, r#"{"error":"no"}"#.into()),
        });
        let (r, out, _) = run(d.client(None), false, images);
        assert_eq!(r, Ok(0));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[1].starts_with("base  ready   full"), "{out}");
        assert!(
            lines[2].starts_with("b1    ready   diff") && lines[2].ends_with("base"),
            "{out}"
        );
        assert_eq!(d.requests().len(), 2);
    }

    #[test]
    fn kill_goes_on_past_a_failure_and_exits_1() {
        let d = FakeDaemon::start(|q| {
            if q.path.ends_with("/bad") {
                (404, r#"{"error":"no sandbox bad"}"#.into())
            } else {
                (204, String::new())
            }
        });
        let a = KillArgs {
            ids: vec!["a".into(), "bad".into(), "c".into()],
            all: false,
            tag: None,
        };
        let (r, out, err) = run(d.client(None), false, |c| kill(c, &a));
        assert_eq!(r, Ok(1));
        assert_eq!(out, "killed a\nkilled c\n");
        assert_eq!(err, "forkd: bad: no sandbox bad (HTTP 404)\n");
    }

    /// The paths the fake daemon was asked to DELETE, sorted.
    fn deleted(d: &FakeDaemon) -> Vec<String> {
        let mut paths: Vec<String> = d
            .requests()
            .into_iter()
            .filter(|q| q.method == "DELETE")
            .map(|q| q.path)
            .collect();
        paths.sort();
        paths
    }

    #[test]
    fn kill_by_tag_deletes_that_snapshots_sandboxes_only() {
        let d = FakeDaemon::start(|q| match q.method.as_str() {
            "GET" => {
                let mut other = sandbox_json("z");
                other["snapshot_tag"] = "other".into();
                (
                    200,
                    serde_json::json!([sandbox_json("x"), other, sandbox_json("y")]).to_string(),
                )
            }
            _ => (204, String::new()),
        });
        let a = KillArgs {
            ids: vec![],
            all: false,
            tag: Some("t".into()),
        };
        let (r, _, _) = run(d.client(None), false, |c| kill(c, &a));
        assert_eq!(r, Ok(0));
        assert_eq!(deleted(&d), ["/v1/sandboxes/x", "/v1/sandboxes/y"]);
    }

    #[test]
    fn rmi_takes_several_tags_and_goes_on_past_a_failure() {
        let d = FakeDaemon::start(|q| match q.path.as_str() {
            "/v1/snapshots/b" => (404, r#"{"error":"no snapshot b"}"#.into()),
            _ => (204, String::new()),
        });
        let a = RmiArgs {
            tags: vec!["a".into(), "b".into(), "c".into()],
            cascade: false,
            force: false,
        };
        let (r, out, err) = run(d.client(None), false, |c| rmi(c, &a));
        assert_eq!(r, Ok(1));
        assert_eq!(out, "deleted a\ndeleted c\n");
        assert_eq!(err, "forkd: b: no snapshot b (HTTP 404)\n");
    }

    #[test]
    fn kill_all_lists_then_deletes_each() {
        let d = FakeDaemon::start(|q| match q.method.as_str() {
            "GET" => (
                200,
                serde_json::json!([sandbox_json("x"), sandbox_json("y")]).to_string(),
            ),
            _ => (204, String::new()),
        });
        let a = KillArgs {
            ids: vec![],
            all: true,
            tag: None,
        };
        let (r, out, _) = run(d.client(None), true, |c| kill(c, &a));
        assert_eq!(r, Ok(0));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["killed"], serde_json::json!(["x", "y"]));
        assert_eq!(deleted(&d), ["/v1/sandboxes/x", "/v1/sandboxes/y"]);
    }

    #[test]
    fn fork_spawns_pings_and_kills_every_child() {
        let d = FakeDaemon::start(|q| match (q.method.as_str(), q.path.as_str()) {
            ("POST", "/v1/sandboxes") => {
                let n = q.json()["n"].as_u64().unwrap();
                let v: Vec<_> = (0..n).map(|i| sandbox_json(&format!("sb-{i}"))).collect();
                (201, serde_json::Value::from(v).to_string())
            }
            ("POST", p) if p.ends_with("/ping") => (200, r#"{"guest":"guest: builtin"}"#.into()),
            ("DELETE", _) => (204, String::new()),
            _ => (400, r#"{"error":"unexpected"}"#.into()),
        });
        let a = ForkArgs {
            tag: "t".into(),
            n: 5,
            live_fork: false,
            memory_limit_mib: None,
            prewarm: false,
            hugepages: false,
            settle_secs: 0,
        };
        let (r, out, _) = run(d.client(None), true, |c| fork(c, &a));
        assert_eq!(r, Ok(0));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["spawned"], 5);
        assert_eq!(v["answered"], 5);
        assert_eq!(v["killed"], 5);
        let reqs = d.requests();
        assert_eq!(reqs.iter().filter(|q| q.path.ends_with("/ping")).count(), 5);
        assert_eq!(reqs.iter().filter(|q| q.method == "DELETE").count(), 5);
    }

    #[test]
    fn snapshot_info_reads_the_chain() {
        let d: SnapshotDetail = serde_json::from_value(serde_json::json!({
            "tag": "b2", "dir": "/s/b2", "created_at_unix": 100, "status": "ready", "bootable": true,
            "kind": "diff", "guest": "builtin", "branched_from": "sb-1", "pause_ms": 2,
            "pause_us": 2250,
            "memory_logical_bytes": 134217728u64, "memory_physical_bytes": 4096,
            "vmstate_bytes": 2048, "parent_tag": "b1", "parent_content_hash": "abc",
            "chain_depth": 2, "ancestors": ["base", "b1"], "dependents": [], "network": true
        }))
        .unwrap();
        let t = detail_text(&d, 160);
        assert!(t.contains("status         ready (bootable)\n"), "{t}");
        assert!(
            t.contains("memory         128.0 MiB of guest RAM, 4.0 KiB stored here\n"),
            "{t}"
        );
        assert!(t.contains("branched from  sb-1, paused 2.25 ms\n"), "{t}");
        assert!(t.contains("parent         b1 (content hash abc)\n"), "{t}");
        assert!(t.contains("chain depth    2 (base -> b1)\n"), "{t}");
        assert!(t.contains("created        1m ago (unix 100)\n"), "{t}");
        assert!(
            t.contains("network        an interface, the guest at 172.16.0.2;"),
            "{t}"
        );
    }

    #[test]
    fn tags_are_checked_before_sending() {
        assert!(check_tag("ok-tag_1").is_ok());
        let e = check_tag("no/slash").unwrap_err();
        assert!(e.to_string().contains("bad tag"), "{e}");
    }
}
