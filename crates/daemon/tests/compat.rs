//! The published upstream clients, unchanged, against a real forkd-daemon
//! driving built-in guest microVMs: the `forkd` 0.5.3 SDK's `Controller`
//! (every method, spawn with each option, branch in every mode) and the
//! forkd-mcp 0.2.0 and 0.2.1 servers over stdio (every tool), from the
//! venvs `compat/setup` makes (`.ci/setup` runs it). The calls and their
//! checks are in `compat/published_clients.py`; `/metrics` is read with
//! `prometheus_client`'s own text parser, and `/v1/openapi.json` checked
//! with `openapi-spec-validator`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{kill_all, Config, Daemon, TempDir};
use serde_json::json;

/// The venvs of `compat/setup`, or a failure saying how to make them.
fn venvs() -> PathBuf {
    let root = std::env::var_os("FORKD_COMPAT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/forkd/compat"))
        .join("current");
    for v in ["0.2.0", "0.2.1"] {
        let mcp = root.join(format!("forkd-mcp-{v}/bin/forkd-mcp"));
        assert!(
            mcp.is_file(),
            "{} is missing: run compat/setup (.ci/setup does) to install the published clients",
            mcp.display()
        );
    }
    root
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../compat/published_clients.py")
}

#[test]
fn the_published_clients_drive_the_daemon() {
    let venvs = venvs();
    let tmp = TempDir::new("compat");
    let token = "compat-token-0123456789abcdef";
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            token: Some(token.into()),
            ..Default::default()
        },
    );
    d.expect(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "compat", "builtin": true})),
        201,
    );
    d.expect(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "compat-net", "builtin": true, "network": true})),
        201,
    );
    for (v, controller) in [("0.2.0", true), ("0.2.1", false)] {
        let venv = venvs.join(format!("forkd-mcp-{v}"));
        let mut cmd = Command::new(venv.join("bin/python"));
        cmd.arg(script())
            .args(["--url", &d.url, "--token", token])
            .args(["--tag", "compat", "--net-tag", "compat-net"])
            .arg("--mcp")
            .arg(venv.join("bin/forkd-mcp"))
            .args(["--mcp-version", v]);
        if controller {
            cmd.arg("--controller");
        }
        let out = cmd.output().expect("the venv's python runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("forkd-mcp {v} (controller: {controller}):\n{stdout}");
        assert!(
            out.status.success() && stdout.lines().last().is_some_and(|l| l.starts_with("PASS")),
            "forkd-mcp {v}{}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}\ndaemon log:\n{}",
            if controller { " and the forkd SDK" } else { "" },
            out.status,
            common::tail(&d.log_text(), 3000)
        );
    }
    // /metrics in the text format a Prometheus client parses, and
    // /v1/openapi.json a valid OpenAPI document, in their tools' view.
    let python = venvs.join("forkd-mcp-0.2.1/bin/python");
    let get = |route: &str| {
        format!(
            "import json, urllib.request\n\
             req = urllib.request.Request('{}{route}', headers={{'Authorization': 'Bearer {token}'}})\n\
             r = urllib.request.urlopen(req)\n",
            d.url
        )
    };
    run_python(
        &python,
        &(get("/metrics")
            + "from prometheus_client.parser import text_string_to_metric_families\n\
               ct = r.headers['Content-Type']\n\
               assert ct.startswith('text/plain; version=0.0.4'), ct\n\
               fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}\n\
               cap = fams['forkd_branch_concurrency_cap'].samples[0].value\n\
               assert cap == 4, cap\n\
               assert 'forkd_branches_in_flight' in fams and 'forkd_sandboxes_active' in fams\n"),
        "prometheus_client cannot read /metrics",
    );
    run_python(
        &python,
        &(get("/v1/openapi.json")
            + "from openapi_spec_validator import validate\n\
               validate(json.load(r))\n"),
        "/v1/openapi.json is not a valid OpenAPI document",
    );
    kill_all(&d);
}

/// Runs `code` with the venv's `python`; fails with `what` and its output.
fn run_python(python: &std::path::Path, code: &str, what: &str) {
    let out = Command::new(python).args(["-c", code]).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
