"""Drives a real forkd-daemon through the published upstream clients.

Run from a venv holding them (.ci/setup makes one per forkd-mcp version;
crates/daemon/tests/compat.rs runs this file against a daemon it starts):

    python published_clients.py --url URL --token TOKEN --tag TAG \
        --net-tag NET_TAG --mcp forkd-mcp --mcp-version 0.2.1 [--controller]

TAG is a ready snapshot of the built-in guest, NET_TAG one with a network
interface. Every call of `forkd.Controller` (with --controller) and every
tool of the forkd-mcp server (over stdio, as an MCP host runs it) is made
and its answer checked the way the client's own users read it. A call that
raises, or an answer the client cannot use, fails the run: the script
prints what failed and exits 1. On success the last line is
`PASS <number of checks>`.
"""

import argparse
import asyncio
import json
import os
import sys
import time
import traceback

CHECKS = []

# Upstream's SandboxInfo fields: always there (null when unset).
SANDBOX_FIELDS = (
    "id",
    "snapshot_tag",
    "netns",
    "guest_addr",
    "created_at_unix",
    "pid",
    "memory_limit_mib",
    "has_branched",
    "branch_count",
    "last_branch_memory_path",
)


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    CHECKS.append(name)
    print(f"ok {name}", flush=True)


def sandbox_shape(name, sb):
    missing = [k for k in SANDBOX_FIELDS if k not in sb]
    check(f"{name}: SandboxInfo has upstream's fields", not missing, f"missing {missing} in {sb}")


def wait_ready(list_snapshots, tag, timeout=60.0):
    """Polls the snapshot list until `tag` is ready (a live copy ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in list_snapshots():
            if s["tag"] == tag and s.get("status") == "ready":
                return s
        time.sleep(0.1)
    raise AssertionError(f"snapshot {tag} did not become ready within {timeout} s")


def run_controller(args):
    from forkd import Controller, ControllerError

    c = Controller(base_url=args.url, token=args.token)
    snaps = c.list_snapshots()
    check("list_snapshots", any(s["tag"] == args.tag for s in snaps), snaps)

    kids = c.spawn_sandboxes(args.tag)
    check("spawn_sandboxes default", len(kids) == 1, kids)
    sandbox_shape("spawn_sandboxes default", kids[0])
    sb = kids[0]["id"]

    two = c.spawn_sandboxes(args.tag, n=2, memory_limit_mib=256)
    check("spawn_sandboxes n=2 memory_limit_mib", len(two) == 2, two)
    check(
        "memory_limit_mib is echoed",
        all(k["memory_limit_mib"] == 256 for k in two),
        two,
    )

    # The SDK always sends per_child_netns: false; a networked snapshot's
    # children get their namespaces anyway, each told so.
    net = c.spawn_sandboxes(args.net_tag, n=2)
    check(
        "spawn_sandboxes networked with the default per_child_netns",
        all(k["netns"] and k.get("warning") for k in net),
        net,
    )
    net_true = c.spawn_sandboxes(args.net_tag, per_child_netns=True)
    check("spawn_sandboxes per_child_netns=True", net_true[0]["netns"], net_true)

    pre = c.spawn_sandboxes(args.tag, prewarm=True)
    check("spawn_sandboxes prewarm", len(pre) == 1, pre)

    live = c.spawn_sandboxes(args.tag, live_fork=True)
    check("spawn_sandboxes live_fork", len(live) == 1, live)
    huge = c.spawn_sandboxes(args.tag, live_fork=True, hugepages=True)
    check(
        "spawn_sandboxes hugepages: on huge pages, or told why not",
        huge[0].get("hugepages") or "huge pages" in (huge[0].get("warning") or ""),
        huge,
    )

    listed = c.list_sandboxes()
    check("list_sandboxes", sb in [s["id"] for s in listed], listed)
    for s in listed:
        sandbox_shape("list_sandboxes", s)
    one = c.get_sandbox(sb)
    check("get_sandbox", one["id"] == sb, one)

    pong = c.ping_sandbox(sb)
    check("ping_sandbox", pong.get("pong") is True, pong)
    out = c.exec_command(sb, ["echo", "hello", "upstream"])
    check(
        "exec_command",
        out["stdout"] == "hello upstream\n" and out["exit_code"] == 0,
        out,
    )
    out = c.exec_command(sb, ["false"], timeout_secs=5)
    check("exec_command exit code", out["exit_code"] == 1, out)
    ev = c.eval_code(sb, "6*7")
    check("eval_code", ev["result"] == "42" and ev["exit_code"] == 0, ev)

    full = c.branch_sandbox(sb, tag="compat-full")
    check(
        "branch_sandbox full",
        full["tag"] == "compat-full"
        and full["branched_from"] == sb
        and isinstance(full["pause_ms"], int),
        full,
    )
    measured = c.branch_sandbox(sb, tag="compat-measured", measure_diff=True)
    check(
        "branch_sandbox measure_diff",
        all(isinstance(measured.get(k), int) for k in ("diff_ms", "diff_physical_bytes", "diff_logical_bytes")),
        measured,
    )
    diff = c.branch_sandbox(sb, tag="compat-diff", diff=True)
    check(
        "branch_sandbox diff=True",
        diff.get("kind") == "diff" and isinstance(diff.get("diff_physical_bytes"), int),
        diff,
    )
    diff2 = c.branch_sandbox(sb, mode="diff")
    check("branch_sandbox mode=diff (generated tag)", diff2.get("kind") == "diff", diff2)
    try:
        c.branch_sandbox(sb, diff=True, measure_diff=True)
        check("measure_diff with diff is refused", False, "no error")
    except ControllerError as e:
        check("measure_diff with diff is refused", e.status == 400, e)

    lid = live[0]["id"]
    lw = c.branch_sandbox(lid, tag="compat-live", mode="live")
    check("branch_sandbox mode=live", lw["status"] == "ready", lw)
    nowait = c.branch_sandbox(lid, tag="compat-nowait", mode="live", wait=False)
    check(
        "branch_sandbox live wait=False",
        nowait["status"] in ("writing", "ready") and isinstance(nowait["pause_ms"], int),
        nowait,
    )
    wait_ready(c.list_snapshots, "compat-nowait")
    check("the wait=False snapshot becomes ready", True)
    after = c.get_sandbox(sb)
    check(
        "get_sandbox counts the branches",
        after["has_branched"] and after["branch_count"] >= 4 and after["last_branch_memory_path"],
        after,
    )

    try:
        c.get_sandbox("nosuchsandbox-0")
        check("get_sandbox of an unknown id raises", False, "no error")
    except ControllerError as e:
        check("get_sandbox of an unknown id raises ControllerError 404", e.status == 404, e)

    c.delete_snapshot("compat-nowait")
    check(
        "delete_snapshot",
        "compat-nowait" not in [s["tag"] for s in c.list_snapshots()],
    )
    for k in [kids, two, net, net_true, pre, live, huge]:
        for s in k:
            c.kill_sandbox(s["id"])
    check("kill_sandbox", not c.list_sandboxes(), c.list_sandboxes())


def tool_result(res):
    """A tool's answer as the JSON the server returned."""
    if res.isError:
        text = " ".join(getattr(c, "text", "") for c in res.content)
        raise AssertionError(f"tool error: {text}")
    # The text content, as every MCP host shows it: one JSON item a
    # content block (a list may come as one array or as a block an item).
    items = [json.loads(c.text) for c in res.content]
    return items[0] if len(items) == 1 else items


async def run_mcp(args):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    env = dict(os.environ, FORKD_URL=args.url, FORKD_TOKEN=args.token or "")
    params = StdioServerParameters(command=args.mcp, args=[], env=env)
    v = args.mcp_version
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()
            names = {t.name for t in (await s.list_tools()).tools}
            expected = {
                "list_snapshots",
                "spawn_sandboxes",
                "branch_sandbox",
                "create_snapshot",
                "wait_for_text",
                "list_sandboxes",
                "get_sandbox",
                "kill_sandbox",
                "exec_command",
                "eval_code",
                "ping_sandbox",
            }
            check(f"mcp {v}: tools", expected <= names, names)

            async def call(name, **kw):
                return tool_result(await s.call_tool(name, kw))

            snaps = await call("list_snapshots")
            snaps = snaps if isinstance(snaps, list) else [snaps]
            check(f"mcp {v}: list_snapshots", any(x["tag"] == args.tag for x in snaps), snaps)
            # The server always sends memory_limit_mib 256, prewarm false,
            # per_child_netns false.
            kids = await call("spawn_sandboxes", snapshot_tag=args.tag)
            kids = kids if isinstance(kids, list) else [kids]
            check(f"mcp {v}: spawn_sandboxes", len(kids) == 1, kids)
            sandbox_shape(f"mcp {v}: spawn_sandboxes", kids[0])
            sb = kids[0]["id"]
            net = await call("spawn_sandboxes", snapshot_tag=args.net_tag)
            net = net if isinstance(net, list) else [net]
            check(f"mcp {v}: spawn_sandboxes networked", net[0]["netns"], net)
            listed = await call("list_sandboxes")
            listed = listed if isinstance(listed, list) else [listed]
            check(f"mcp {v}: list_sandboxes", sb in [x["id"] for x in listed], listed)
            one = await call("get_sandbox", sandbox_id=sb)
            check(f"mcp {v}: get_sandbox", one["id"] == sb, one)
            pong = await call("ping_sandbox", sandbox_id=sb)
            check(f"mcp {v}: ping_sandbox", pong.get("pong") is True, pong)
            out = await call("exec_command", sandbox_id=sb, args=["echo", "mcp"])
            check(f"mcp {v}: exec_command", out["stdout"] == "mcp\n", out)
            ev = await call("eval_code", sandbox_id=sb, code="2+3")
            check(f"mcp {v}: eval_code", ev["result"] == "5", ev)
            b = await call("branch_sandbox", sandbox_id=sb, tag=f"mcp-{v.replace('.', '')}-full")
            check(f"mcp {v}: branch_sandbox", isinstance(b["pause_ms"], int), b)
            m = await call("branch_sandbox", sandbox_id=sb, measure_diff=True)
            check(f"mcp {v}: branch_sandbox measure_diff", isinstance(m.get("diff_ms"), int), m)
            d = await call("branch_sandbox", sandbox_id=sb, diff=True)
            check(f"mcp {v}: branch_sandbox diff", isinstance(d.get("diff_logical_bytes"), int), d)
            if v != "0.2.0":
                live = await call("spawn_sandboxes", snapshot_tag=args.tag, live_fork=True)
                live = live if isinstance(live, list) else [live]
                lid = live[0]["id"]
                lw = await call("branch_sandbox", sandbox_id=lid, mode="live", wait=False)
                check(f"mcp {v}: branch_sandbox live wait=False", lw["status"] in ("writing", "ready"), lw)
                await call("kill_sandbox", sandbox_id=lid)
            # A snapshot of a kernel that is not there: the daemon's 400
            # reaches the MCP host as a tool error, not a crash.
            res = await s.call_tool(
                "create_snapshot",
                {"tag": "mcp-nokernel", "kernel": "/nonexistent/k", "rootfs": "/nonexistent/r"},
            )
            check(f"mcp {v}: create_snapshot of a missing kernel is a tool error", res.isError, res)
            for k in kids + net:
                gone = await call("kill_sandbox", sandbox_id=k["id"])
                check(f"mcp {v}: kill_sandbox", gone.get("killed") is True, gone)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--token", default="")
    p.add_argument("--tag", required=True)
    p.add_argument("--net-tag", required=True)
    p.add_argument("--mcp", required=True)
    p.add_argument("--mcp-version", required=True)
    p.add_argument("--controller", action="store_true")
    args = p.parse_args()
    try:
        if args.controller:
            run_controller(args)
        asyncio.run(run_mcp(args))
    except BaseException:
        traceback.print_exc()
        print(f"FAIL after {len(CHECKS)} checks", flush=True)
        sys.exit(1)
    print(f"PASS {len(CHECKS)}", flush=True)


if __name__ == "__main__":
    main()
