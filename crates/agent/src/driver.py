# forkd-agent's warm interpreter driver. The agent starts `python3 -c` with
# this source; fd 0 and fd 1 carry requests and answers framed as in the agent
# protocol (u32 LE json_len, u32 LE data_len, JSON, data). Requests are
# {"code": str}; answers {"result", "error", "exit_code", "stdout", "stderr"}.
# Every request runs in one globals dict, so state persists between calls.


def _forkd_driver():
    import ast
    import io
    import json
    import os
    import signal
    import struct
    import sys
    import traceback

    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # stray fd-level output goes to the agent's log, not the protocol
    rf = os.fdopen(rfd, "rb", buffering=0)
    wf = os.fdopen(wfd, "wb", buffering=0)
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    limit = 900 * 1024
    caps = {"result": 65536, "stdout": 65536, "stderr": 32768, "error": 32768}

    def readn(n):
        buf = b""
        while len(buf) < n:
            c = rf.read(n - len(buf))
            if not c:
                raise EOFError
            buf += c
        return buf

    def send(res):
        cut = dict(caps)
        while True:
            out = dict(res)
            for k, m in cut.items():
                v = out.get(k)
                if isinstance(v, str) and len(v) > m:
                    out[k] = v[:m] + "\n[truncated]"
            j = json.dumps(out, ensure_ascii=False).encode("utf-8", "replace")
            if len(j) <= limit:
                break
            cut = {k: m // 2 for k, m in cut.items()}
        wf.write(struct.pack("<II", len(j), 0) + j)

    class Cap(io.StringIO):
        def write(self, s):
            if self.tell() < 1 << 20:
                return super().write(s)
            return len(s)

    while True:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            jl, dl = struct.unpack("<II", readn(8))
            req = json.loads(readn(jl))
            readn(dl)
        except EOFError:
            os._exit(0)
        res = {"result": None, "error": None, "exit_code": 0}
        out, err = Cap(), Cap()
        old = sys.stdout, sys.stderr
        try:
            sys.stdout, sys.stderr = out, err
            signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                tree = ast.parse(req.get("code", ""), "<eval>", "exec")
                last = None
                if tree.body and isinstance(tree.body[-1], ast.Expr):
                    last = ast.Expression(tree.body.pop().value)
                exec(compile(tree, "<eval>", "exec"), g)
                if last is not None:
                    v = eval(compile(last, "<eval>", "eval"), g)
                    if v is not None:
                        res["result"] = repr(v)
            except SystemExit as e:
                if e.code is None:
                    res["exit_code"] = 0
                elif isinstance(e.code, int):
                    res["exit_code"] = e.code
                else:
                    res["exit_code"] = 1
                    res["error"] = str(e.code)
            except KeyboardInterrupt:
                res["exit_code"] = 1
                res["error"] = "interrupted: the eval ran past its timeout"
            except BaseException:
                et, ev, tb = sys.exc_info()
                res["exit_code"] = 1
                # Skip the driver's own frame.
                res["error"] = "".join(traceback.format_exception(et, ev, tb.tb_next))
        except BaseException:
            res["exit_code"] = 1
            res["error"] = "interrupted while finishing the eval"
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            sys.stdout, sys.stderr = old
        res["stdout"] = out.getvalue()
        res["stderr"] = err.getvalue()
        send(res)


_forkd_driver()
