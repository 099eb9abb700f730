#!/usr/bin/env python3
"""Runs the shell blocks of README.md and docs/quickstart.md verbatim, so a doc line that stops
working fails the build (scripts/test runs this after the test suite and the demo).

Every ```sh block must be preceded by an annotation saying how it is run:

  <!-- doctest: run -->                        run as is
  <!-- doctest: run stop-background -->        stop what earlier blocks left running, then run
  <!-- doctest: background until=REGEX -->    start it, wait until its output matches REGEX
                                              (60 s), paste the `export` lines it printed into the
                                              session (as the doc tells a reader to), go on
  <!-- doctest: wait-port=PORT -->            run as is once 127.0.0.1:PORT accepts connections
  <!-- doctest: skip REASON -->               not run here, and why (printed)

All blocks of one document run in one bash session (`set -euo pipefail`), so an `export` in one
block holds in the next, from the repository root. What the harness adds is only what a reader's
machine would have and this one lacks: providers. A stand-in provider (TLS, a certificate from its
own CA) answers for api.anthropic.com and accepts only the key the reader configured; keyswap is
pointed at it with KEYSWAP_UPSTREAM (the environment form of `--upstream`). Everything a block
starts is ended with the session's process group. Files the blocks write (certs/egress,
envoy.yaml) are removed afterwards.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/quickstart.md"]
ANNOTATION = re.compile(r"<!--\s*doctest:\s*(\w[\w-]*)(.*?)-->")

STANDIN = r'''
import http.server, json, ssl, sys
accepted = set(sys.argv[3].split(","))
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        key = self.headers.get("x-api-key", "")
        if key not in accepted or self.headers.get("authorization"):
            body, status = json.dumps({"type": "error", "error": {"type": "authentication_error",
                "message": "stand-in provider: wrong credential"}}).encode(), 401
        else:
            body, status = json.dumps({"id": "msg_doctest", "type": "message", "role": "assistant",
                "model": "claude-sonnet-4-5", "content": [{"type": "text", "text": "Hello from the stand-in provider"}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 6}}).encode(), 200
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
'''


def blocks(path):
    """(line, mode, argument, text) of every ```sh block."""
    lines = open(os.path.join(ROOT, path)).read().split("\n")
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = ANNOTATION.search(lines[k]) if k >= 0 else None
            if not m:
                sys.exit(f"{path}:{i + 1}: a ```sh block without a <!-- doctest: … --> annotation")
            out.append((i + 1, m.group(1), m.group(2).strip(), "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return out


def session(path, standin_env):
    script = [
        "set -euo pipefail",
        f"cd {ROOT}",
        # The previous document's gateway may still be letting go of its ports.
        "for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/10000) 2>/dev/null || break; sleep 0.1; done",
    ]
    for line, mode, arg, text in blocks(path):
        where = f"{path}:{line}"
        if mode == "skip":
            print(f"  skip {where}: {arg}")
            continue
        script.append(f"echo '==> {where} ({mode})'")
        if mode == "run":
            if arg == "stop-background":
                # What earlier blocks left running stops first (the doc says so: Ctrl-C).
                script.append("for p in $(jobs -p); do pkill -TERM -P \"$p\" 2>/dev/null || true; kill \"$p\" 2>/dev/null || true; done; wait || true")
                script.append("for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/10000) 2>/dev/null || break; sleep 0.1; done")
            script.append(text)
        elif mode == "wait-port":
            port = int(arg.split("=", 1)[1])
            script.append(f"for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && break; sleep 0.1; done")
            script.append(text)
        elif mode == "background":
            until = arg.split("=", 1)[1].strip('"')
            log = f"$DOCTEST_WORK/bg-{line}.log"
            script.append(f"( {text}\n) >{log} 2>&1 &")
            script.append(
                f"for _ in $(seq 600); do grep -Eq '{until}' {log} && break; sleep 0.1; done\n"
                f"grep -Eq '{until}' {log} || {{ echo '{where}: never printed /{until}/:'; cat {log}; exit 1; }}\n"
                f"eval \"$(grep '^export ' {log})\""
            )
        else:
            sys.exit(f"{where}: unknown doctest mode `{mode}`")
    print(f"==> {path}")
    env = dict(os.environ, **standin_env)
    env["PATH"] = os.path.join(ROOT, "target", "release") + os.pathsep + env["PATH"]
    p = subprocess.Popen(["bash", "-c", "\n".join(script)], env=env, start_new_session=True)
    try:
        code = p.wait(timeout=900)
    finally:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return code


def main():
    work = tempfile.mkdtemp(prefix="keyswap-doctest-")
    created = [p for p in ("certs/egress", "envoy.yaml") if not os.path.exists(os.path.join(ROOT, p))]
    standin = None
    try:
        key, crt, ca = (os.path.join(work, n) for n in ("standin.key", "standin.crt", "standin-ca.crt"))
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=doctest stand-in", "-addext",
                        "subjectAltName=DNS:api.anthropic.com", "-keyout", key, "-out", crt],
                       check=True, capture_output=True)
        shutil.copy(crt, ca)
        # The keys the docs configure: the README's and quickstart's ANTHROPIC_API_KEY, and the
        # development Secret of manifests/examples.
        accepted = "sk-ant-doctest,sk-ant-...,sk-ant-replace-me"
        standin = subprocess.Popen([sys.executable, "-c", STANDIN, crt, key, accepted], stdout=subprocess.PIPE, text=True)
        port = int(standin.stdout.readline())
        env = {
            "DOCTEST_WORK": work,
            "KEYSWAP_UPSTREAM": f"api.anthropic.com=127.0.0.1:{port},ca={ca}",
            # The README assumes the reader has a key in the environment.
            "ANTHROPIC_API_KEY": "sk-ant-doctest",
        }
        failed = [d for d in DOCS if session(d, env) != 0]
        if failed:
            sys.exit(f"doctest failed: {', '.join(failed)}")
        print("doctest: every runnable block of " + ", ".join(DOCS) + " works")
    finally:
        if standin:
            standin.kill()
        for p in created:
            full = os.path.join(ROOT, p)
            shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else (os.path.exists(full) and os.remove(full))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
