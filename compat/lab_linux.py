"""The lab's host step (lab/run LAB_HOST_STEP, set by
crates/vmm-bin/tests/lab.rs for the daemon scenario): forkd-mcp, unchanged,
over stdio here on the host, drives the forkd-daemon running in the lab's
level 1 through lab/run's port forward: create_snapshot of a real Linux
guest (kernel and rootfs paths in level 1), then its children through the
tools that need a shell in the guest (exec_command, wait_for_text) and the
warm interpreter (eval_code), and a diff branch.

Environment (from lab/run): LAB_URL, LAB_TOKEN, LAB_IMAGES. Run with the
venv of compat/setup: <venv>/bin/python compat/lab_linux.py <venv>/bin/forkd-mcp
"""

import asyncio
import json
import os
import sys
import time


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}", flush=True)


async def main(forkd_mcp):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    images = os.environ["LAB_IMAGES"]
    env = dict(os.environ, FORKD_URL=os.environ["LAB_URL"], FORKD_TOKEN=os.environ["LAB_TOKEN"],
               FORKD_HTTP_TIMEOUT="600")
    params = StdioServerParameters(command=forkd_mcp, args=[], env=env)
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()

            async def call(name, **kw):
                res = await s.call_tool(name, kw)
                if res.isError:
                    raise AssertionError(f"{name}: " + " ".join(getattr(c, "text", "") for c in res.content))
                items = [json.loads(c.text) for c in res.content]
                return items[0] if len(items) == 1 else items

            t = time.monotonic()
            snap = await call(
                "create_snapshot",
                tag="mcp-linux",
                kernel=f"{images}/vmlinux",
                rootfs=f"{images}/rootfs-agent.ext4",
                rw=True,
                # As the CLI step in level 1: a Linux boot and the warm-up of
                # numpy under TCG took 29 s here and passed 60 s on a slower
                # CI machine.
                boot_wait_secs=300,
            )
            check("create_snapshot of a Linux guest", snap["status"] == "ready", snap)
            print(f"create_snapshot took {time.monotonic() - t:.1f} s", flush=True)
            kids = await call("spawn_sandboxes", snapshot_tag="mcp-linux")
            kids = kids if isinstance(kids, list) else [kids]
            sb = kids[0]["id"]
            check("spawn_sandboxes (memory_limit_mib 256)", kids[0]["memory_limit_mib"] == 256, kids)
            pong = await call("ping_sandbox", sandbox_id=sb)
            check("ping_sandbox", pong.get("pong") is True and "linux" in pong.get("guest", ""), pong)
            out = await call("exec_command", sandbox_id=sb,
                             args=["sh", "-c", "echo lab-marker-7 >/tmp/mcp.txt; uname -s"])
            check("exec_command through sh", out["stdout"] == "Linux\n" and out["exit_code"] == 0, out)
            found = await call("wait_for_text", sandbox_id=sb, path="/tmp/mcp.txt",
                               marker="lab-marker-7", timeout_secs=60)
            check("wait_for_text", found["found"] is True, found)
            ev = await call("eval_code", sandbox_id=sb, code="numpy.zeros(3).sum()")
            check("eval_code with the warm numpy", "0.0" in str(ev["result"]), ev)
            # A diff branch. (Not a full one: forkd-mcp caps every child at
            # 256 MiB, and the lab keeps the daemon's state on a tmpfs, whose
            # pages count against the writer's cap, so a full copy of the
            # 256 MiB guest would not fit. measure_diff is covered on the
            # built-in guest by crates/daemon/tests/compat.rs.)
            d = await call("branch_sandbox", sandbox_id=sb, diff=True)
            check("branch_sandbox diff", d.get("kind") == "diff" and isinstance(d.get("diff_ms"), int), d)
            gone = await call("kill_sandbox", sandbox_id=sb)
            check("kill_sandbox", gone.get("killed") is True, gone)
            snaps = await call("list_snapshots")
            snaps = snaps if isinstance(snaps, list) else [snaps]
            check("list_snapshots", {"mcp-linux", d["tag"]} <= {x["tag"] for x in snaps}, snaps)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
    print("PASS", flush=True)
