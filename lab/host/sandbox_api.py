"""The lab's host step, second part: the sandbox API of this build (the
forkd CLI and the daemon's REST routes) against a real Linux guest in the
lab, through lab/run's port forward. Run after compat/lab_linux.py, whose
snapshot `mcp-linux` (a Linux guest with forkd-agent and a warm numpy) it
forks:

- a streamed exec shows its first line before the process ends;
- stdin reaches `cat` while it runs (a stream, then /processes/PID/stdin);
- a pseudo-terminal runs `python3 -i` interactively (forkd shell);
- a 200 MiB binary file goes in and out byte-exact (forkd cp);
- env and cwd apply;
- a forgotten sandbox ends at its deadline.

Environment (from lab/run): LAB_URL, LAB_TOKEN. Usage: python3
lab/host/sandbox_api.py PATH/TO/forkd (standard library only).
"""

import base64
import hashlib
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import urllib.request

URL = os.environ["LAB_URL"]
TOKEN = os.environ["LAB_TOKEN"]
FORKD = sys.argv[1]
ENV = dict(os.environ, FORKD_URL=URL, FORKD_TOKEN=TOKEN, FORKD_TIMEOUT="600")
for k in [k for k in ENV if k.startswith("FORKD_") and k not in ("FORKD_URL", "FORKD_TOKEN", "FORKD_TIMEOUT")]:
    del ENV[k]


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}", flush=True)


def forkd(*args, stdin=None):
    p = subprocess.run([FORKD, *args], env=ENV, input=stdin, capture_output=True, timeout=900)
    return p.returncode, p.stdout, p.stderr


def must(*args, stdin=None):
    rc, out, err = forkd(*args, stdin=stdin)
    if rc != 0:
        raise AssertionError(f"forkd {' '.join(args)}: exit {rc}: {err.decode(errors='replace')}")
    return out


def api(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method,
                                 headers={"Authorization": "Bearer " + TOKEN,
                                          "Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=600)


def main():
    sb = must("spawn", "--tag", "mcp-linux", "-q", "--timeout-secs", "1800").decode().strip()
    print(f"sandbox {sb}", flush=True)

    # A streamed exec: the first line before the process ends.
    t = time.monotonic()
    p = subprocess.Popen([FORKD, "exec", "--stream", sb, "--", "sh", "-c",
                          "for i in 1 2 3; do echo $i; sleep 1; done"],
                         env=ENV, stdout=subprocess.PIPE)
    first = p.stdout.readline()
    first_at = time.monotonic() - t
    rest = p.stdout.read()
    p.wait()
    total = time.monotonic() - t
    check("streamed exec: output in order", first + rest == b"1\n2\n3\n", first + rest)
    check("streamed exec: the first line before the end",
          first_at < total - 1.5, f"first line at {first_at:.2f} s of {total:.2f} s")
    print(f"first line after {first_at:.2f} s, end after {total:.2f} s", flush=True)

    # stdin to a running cat: a stream, then its pid's stdin route.
    r = api("POST", f"/v1/sandboxes/{sb}/exec/stream", {"args": ["cat"]})
    started = json.loads(r.readline())
    pid = started["pid"]
    req = urllib.request.Request(f"{URL}/v1/sandboxes/{sb}/processes/{pid}/stdin",
                                 data=b"ping-1\n", method="POST",
                                 headers={"Authorization": "Bearer " + TOKEN})
    urllib.request.urlopen(req, timeout=60).close()
    got = b""
    while True:
        ev = json.loads(r.readline())
        if ev["type"] == "stdout":
            got += base64.b64decode(ev["data"])
            if got.endswith(b"ping-1\n"):
                break
        elif ev["type"] in ("exit", "error"):
            raise AssertionError(f"cat ended before its input came back: {ev}")
    check("stdin reaches cat while it runs", got == b"ping-1\n", got)
    req = urllib.request.Request(f"{URL}/v1/sandboxes/{sb}/processes/{pid}/stdin?eof=true",
                                 data=b"", method="POST", headers={"Authorization": "Bearer " + TOKEN})
    urllib.request.urlopen(req, timeout=60).close()
    last = None
    while True:
        ev = json.loads(r.readline())
        if ev["type"] in ("exit", "error"):
            last = ev
            break
    check("cat ends at the end of its stdin", last["type"] == "exit" and last["exit_code"] == 0, last)

    # python3 -i on a pseudo-terminal, one line at a time (forkd shell).
    sh = subprocess.Popen([FORKD, "shell", sb, "--", "python3", "-i", "-q"], env=ENV,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    screen = b""

    def until(marker, secs=60):
        nonlocal screen
        end = time.monotonic() + secs
        while marker not in screen:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {marker!r} on the terminal: {screen!r}")
            ready, _, _ = select.select([sh.stdout], [], [], left)
            if ready:
                chunk = os.read(sh.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"the shell ended before {marker!r}: {screen!r}")
                screen += chunk

    until(b">>> ")
    screen = b""
    sh.stdin.write(b"x = 6 * 7\n")
    sh.stdin.flush()
    until(b">>> ", 60)
    screen = b""
    sh.stdin.write(b"print('answer', x)\n")
    sh.stdin.flush()
    until(b"answer 42")
    sh.stdin.write(b"import sys; sys.exit(5)\n")
    sh.stdin.flush()
    rc = sh.wait(timeout=60)
    check("python3 -i on a pseudo-terminal, line by line", rc == 5, f"exit {rc}")

    # env and cwd.
    out = must("exec", "-e", "GREETING=lab hi", "--cwd", "/root", sb, "--", "sh", "-c",
               'echo "$GREETING"; pwd')
    check("env and cwd apply", out == b"lab hi\n/root\n", out)

    # 200 MiB of random bytes in and out, byte-exact. mcp-linux's guest has
    # about 90 MiB free on its root and 120 MiB of tmpfs: a snapshot of a
    # 768 MiB guest holds the file in its /tmp (a tmpfs of half its RAM).
    images = os.environ["LAB_IMAGES"]
    must("snapshot", "big", "--kernel", f"{images}/vmlinux", "--rootfs", f"{images}/rootfs-agent.ext4",
         "--rw", "--mem-mib", "768", "--boot-wait-secs", "300")
    bsb = must("spawn", "--tag", "big", "-q").decode().strip()
    room = must("exec", bsb, "--", "df", "-k", "--output=avail", "/tmp").decode().split()[-1]
    check("the guest's /tmp has room for 200 MiB", int(room) >= 220 * 1024, room)
    big = "/tmp/big.bin"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "big.bin")
        h = hashlib.sha256()
        with open(src, "wb") as f:
            for _ in range(200):
                block = os.urandom(1 << 20)
                h.update(block)
                f.write(block)
        want = h.hexdigest()
        t = time.monotonic()
        must("cp", src, f"{bsb}:{big}")
        up = time.monotonic() - t
        guest = must("exec", bsb, "--", "sha256sum", big).decode().split()[0]
        check("200 MiB in: the guest's sha256 is the host's", guest == want, f"{guest} vs {want}")
        back = os.path.join(d, "back.bin")
        t = time.monotonic()
        must("cp", f"{bsb}:{big}", back)
        down = time.monotonic() - t
        h = hashlib.sha256()
        with open(back, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        check("200 MiB out: byte-exact", h.hexdigest() == want and os.path.getsize(back) == 200 << 20,
              h.hexdigest())
        print(f"200 MiB in {up:.1f} s, out {down:.1f} s", flush=True)
    must("kill", bsb)
    must("rmi", "big")

    # A forgotten sandbox ends at its deadline.
    f = must("spawn", "--tag", "mcp-linux", "-q", "--timeout-secs", "5").decode().strip()
    end = time.monotonic() + 60
    info = {}
    while time.monotonic() < end:
        info = json.loads(must("--json", "ls", "--all"))
        info = next((s for s in info if s["id"] == f), {})
        if info.get("state") == "exited":
            break
        time.sleep(1)
    check("a forgotten sandbox ends at its deadline",
          info.get("state") == "exited" and "deadline" in info.get("exit_detail", ""), info)

    must("kill", sb, f)


if __name__ == "__main__":
    main()
    print("PASS", flush=True)
