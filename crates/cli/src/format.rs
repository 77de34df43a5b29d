//! Text output: tables, ages, durations, and JSON indented in its own key order.

use std::time::Duration;

use proto::api::{SandboxInfo, SnapshotInfo};

/// A table with a header row; columns are left-aligned and two spaces apart.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are blank).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in `\n`; the last
    /// column is not padded.
    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = r.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == cols {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// How long ago `then` was, from `now` (both Unix seconds): `12s ago`,
/// `5m ago`, `3h ago`, `2d ago`; `just now` for the future or the same second.
pub fn age(now: u64, then: u64) -> String {
    if then >= now {
        return "just now".into();
    }
    let d = now - then;
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86_399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

/// Now, in Unix seconds.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A duration for people: `850 us`, `12.3 ms`, `1.25 s`, `2m 05s`.
pub fn duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} us")
    } else if us < 1e6 {
        let ms = us / 1000.0;
        if ms < 100.0 {
            format!("{ms:.1} ms")
        } else {
            format!("{ms:.0} ms")
        }
    } else if us < 60e6 {
        format!("{:.2} s", us / 1e6)
    } else {
        let s = d.as_secs();
        format!("{}m {:02}s", s / 60, s % 60)
    }
}

/// Milliseconds with three decimals (for JSON figures).
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// `value` or `-`.
pub fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// The `forkd ls` / `forkd spawn` table.
pub fn sandbox_table(sandboxes: &[SandboxInfo], now: u64) -> String {
    sandbox_table_with(sandboxes, now, false)
}

/// The `forkd ls --all` table: with each sandbox's state (and how an
/// exited one ended).
pub fn sandbox_table_with_state(sandboxes: &[SandboxInfo], now: u64) -> String {
    sandbox_table_with(sandboxes, now, true)
}

fn sandbox_table_with(sandboxes: &[SandboxInfo], now: u64, states: bool) -> String {
    let mut head = vec!["ID", "SNAPSHOT", "PID"];
    if states {
        head.push("STATE");
    }
    head.extend(["CREATED", "MEM LIMIT", "LIVE FORK", "NETNS", "GUEST ADDR"]);
    let mut t = Table::new(&head);
    for s in sandboxes {
        let mut row = vec![s.id.clone(), s.snapshot_tag.clone(), s.pid.to_string()];
        if states {
            row.push(state(s));
        }
        row.extend([
            age(now, s.created_at_unix),
            or_dash(s.memory_limit_mib.map(|m| format!("{m} MiB"))),
            if s.live_fork { "yes" } else { "no" }.into(),
            or_dash(s.netns.as_deref()),
            or_dash(s.guest_addr.as_deref()),
        ]);
        t.row(row);
    }
    t.render()
}

/// `running`, or `exited (signal 9, oom)`, `exited (status 1)`,
/// `exited (unknown)`.
fn state(s: &SandboxInfo) -> String {
    if s.state != proto::api::SandboxState::Exited {
        return s.state.as_str().to_owned();
    }
    let how = match (s.signal, s.exit_code) {
        (Some(sig), _) => format!("signal {sig}"),
        (None, Some(code)) => format!("status {code}"),
        (None, None) => "unknown".to_owned(),
    };
    let oom = if s.oom_killed == Some(true) {
        ", oom"
    } else {
        ""
    };
    format!("exited ({how}{oom})")
}

/// The `forkd images` table; `parent(tag)` gives a snapshot's parent.
pub fn image_table(
    snapshots: &[SnapshotInfo],
    parent: impl Fn(&SnapshotInfo) -> Option<String>,
    now: u64,
) -> String {
    let mut t = Table::new(&["TAG", "STATUS", "KIND", "CREATED", "PARENT"]);
    for s in snapshots {
        let mut status = s.status.as_str().to_string();
        if s.status == proto::api::SnapshotStatus::Ready && !s.bootable {
            status.push_str(" (not bootable)");
        }
        t.row(vec![
            s.tag.clone(),
            status,
            or_dash(s.kind.as_deref()),
            age(now, s.created_at_unix),
            or_dash(parent(s)),
        ]);
    }
    t.render()
}

/// JSON text re-indented by two spaces, keys in the order they were sent.
/// Text that is not JSON comes back unchanged.
pub fn pretty_json(raw: &str) -> String {
    if serde_json::from_str::<serde::de::IgnoredAny>(raw).is_err() {
        return raw.to_string();
    }
    let mut out = String::with_capacity(raw.len() * 2);
    let mut depth = 0usize;
    let mut chars = raw.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', depth * 2));
    };
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(s) = chars.next() {
                    out.push(s);
                    match s {
                        '\\' => {
                            if let Some(e) = chars.next() {
                                out.push(e);
                            }
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '{' | '[' => {
                while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                    chars.next();
                }
                let close = if c == '{' { '}' } else { ']' };
                if chars.peek() == Some(&close) {
                    chars.next();
                    out.push(c);
                    out.push(close);
                } else {
                    out.push(c);
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::api::SnapshotStatus;

    #[test]
    fn tables_align_columns_and_do_not_pad_the_last() {
        let mut t = Table::new(&["TAG", "STATUS", "PARENT"]);
        t.row(vec!["py".into(), "ready".into(), "-".into()]);
        t.row(vec!["long-tag".into(), "writing".into(), "py".into()]);
        assert_eq!(
            t.render(),
            "TAG       STATUS   PARENT\n\
             py        ready    -\n\
             long-tag  writing  py\n"
        );
    }

    #[test]
    fn tables_trim_trailing_blanks() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["x".into(), "".into()]);
        assert_eq!(t.render(), "A  B\nx\n");
    }

    #[test]
    fn ages_round_down_to_one_unit() {
        assert_eq!(age(100, 100), "just now");
        assert_eq!(age(100, 200), "just now");
        assert_eq!(age(100, 88), "12s ago");
        assert_eq!(age(1000, 1000 - 61), "1m ago");
        assert_eq!(age(10_000, 10_000 - 7200), "2h ago");
        assert_eq!(age(1_000_000, 1_000_000 - 3 * 86_400 - 5), "3d ago");
    }

    #[test]
    fn durations_pick_a_readable_unit() {
        assert_eq!(duration(Duration::from_micros(850)), "850 us");
        assert_eq!(duration(Duration::from_micros(12_340)), "12.3 ms");
        assert_eq!(duration(Duration::from_micros(123_400)), "123 ms");
        assert_eq!(duration(Duration::from_millis(1250)), "1.25 s");
        assert_eq!(duration(Duration::from_secs(125)), "2m 05s");
        assert_eq!(ms(Duration::from_micros(1234)), 1.234);
    }

    fn snap(tag: &str, status: SnapshotStatus, kind: Option<&str>, at: u64) -> SnapshotInfo {
        SnapshotInfo {
            tag: tag.into(),
            dir: format!("/var/lib/forkd/snapshots/{tag}"),
            created_at_unix: at,
            branched_from: None,
            pause_ms: None,
            pause_us: None,
            diff_ms: None,
            diff_physical_bytes: None,
            diff_logical_bytes: None,
            status,
            bootable: status == SnapshotStatus::Ready,
            warning: None,
            kind: kind.map(str::to_string),
            guest: None,
            mem_mib: None,
            network: false,
            tap: None,
        }
    }

    #[test]
    fn image_table_shows_tag_status_kind_created_parent() {
        let snaps = vec![
            snap("base", SnapshotStatus::Ready, Some("full"), 1000),
            snap("b1", SnapshotStatus::Writing, Some("diff"), 1990),
        ];
        let parent = |s: &SnapshotInfo| (s.tag == "b1").then(|| "base".to_string());
        assert_eq!(
            image_table(&snaps, parent, 2000),
            "TAG   STATUS   KIND  CREATED  PARENT\n\
             base  ready    full  16m ago  -\n\
             b1    writing  diff  10s ago  base\n"
        );
    }

    #[test]
    fn sandbox_table_shows_dashes_for_absent_fields() {
        let sb = SandboxInfo {
            id: "sb-1".into(),
            snapshot_tag: "base".into(),
            netns: None,
            guest_addr: None,
            created_at_unix: 95,
            pid: 4242,
            memory_limit_mib: Some(256),
            ..SandboxInfo::default()
        };
        assert_eq!(
            sandbox_table(&[sb], 100),
            "ID    SNAPSHOT  PID   CREATED  MEM LIMIT  LIVE FORK  NETNS  GUEST ADDR\n\
             sb-1  base      4242  5s ago   256 MiB    no         -      -\n"
        );
    }

    #[test]
    fn the_all_table_says_how_each_ended() {
        let base = SandboxInfo {
            id: "a-0".into(),
            snapshot_tag: "s".into(),
            created_at_unix: 100,
            pid: 7,
            ..SandboxInfo::default()
        };
        let killed = SandboxInfo {
            id: "a-1".into(),
            state: proto::api::SandboxState::Exited,
            signal: Some(9),
            oom_killed: Some(true),
            ..base.clone()
        };
        let gone = SandboxInfo {
            id: "a-2".into(),
            state: proto::api::SandboxState::Exited,
            ..base.clone()
        };
        let t = sandbox_table_with_state(&[base, killed, gone], 100);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("PID  STATE"), "{t}");
        assert!(lines[1].contains(" running "), "{t}");
        assert!(lines[2].contains(" exited (signal 9, oom) "), "{t}");
        assert!(lines[3].contains(" exited (unknown) "), "{t}");
    }

    #[test]
    fn pretty_json_keeps_key_order_and_strings() {
        let raw = r#"{"tag":"t","dir":"/a, b: {c}","n":[1,2],"e":{},"l":[ ],"s":"q\"x"}"#;
        assert_eq!(
            pretty_json(raw),
            "{\n  \"tag\": \"t\",\n  \"dir\": \"/a, b: {c}\",\n  \"n\": [\n    1,\n    2\n  ],\n  \
             \"e\": {},\n  \"l\": [],\n  \"s\": \"q\\\"x\"\n}"
        );
        assert_eq!(pretty_json("not json"), "not json");
        assert_eq!(pretty_json(" 3 "), "3");
        let v: serde_json::Value = serde_json::from_str(&pretty_json(raw)).unwrap();
        assert_eq!(v, serde_json::from_str::<serde_json::Value>(raw).unwrap());
    }
}
