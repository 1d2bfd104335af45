#!/usr/bin/env python3
"""Runs every test binary cargo built, a few at a time, longest first, and writes one log in
`cargo test`'s own layout (each binary's "Running" line, then its output) for
`test-summary.py`.

Most of the suite waits on PostgreSQL clusters, brokers and timeouts rather than computing, so
two binaries side by side on two cores take little more than one; `cargo test` runs them one
after another. Durations of the last run (`durations.json` next to the log) order the queue so
the longest binaries start first and no long one is left for the end.

Usage: run-tests.py ARTIFACTS_JSON LOG [JOBS]   (ARTIFACTS_JSON: cargo's --message-format=json)
Exit status: 0 when every binary passed, 101 otherwise (as cargo test).
"""
import json
import os
import subprocess
import sys
import threading
import time

artifacts_path, log_path = sys.argv[1], sys.argv[2]
jobs = int(sys.argv[3]) if len(sys.argv) > 3 else 2
durations_path = os.path.join(os.path.dirname(log_path), "durations.json")

binaries = []  # (label as cargo prints it, executable, package directory)
seen = set()
for line in open(artifacts_path, encoding="utf-8", errors="replace"):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("profile", {}).get("test"):
        continue
    exe = msg.get("executable")
    if not exe or exe in seen:
        continue
    seen.add(exe)
    target = msg["target"]
    pkg_dir = os.path.dirname(msg["manifest_path"])
    src = os.path.relpath(target["src_path"], pkg_dir)
    kind = "" if target["kind"] == ["test"] else "unittests "
    binaries.append((f"{kind}{src} ({os.path.relpath(exe)})", exe, pkg_dir))

try:
    last = json.load(open(durations_path))
except (OSError, ValueError):
    last = {}


def name(b):
    """A binary's name without cargo's hash, stable across builds."""
    return os.path.basename(b[1]).rsplit("-", 1)[0] + " " + b[0].split(" (")[0]


binaries.sort(key=lambda b: -last.get(name(b), 30.0))
results = {}
lock = threading.Lock()
queue = list(binaries)


def worker():
    while True:
        with lock:
            if not queue:
                return
            b = queue.pop(0)
        label, exe, pkg_dir = b
        started = time.time()
        # As cargo test runs them: from the package's directory, with its manifest dir set.
        p = subprocess.run(
            [exe],
            cwd=pkg_dir,
            env=dict(os.environ, CARGO_MANIFEST_DIR=pkg_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        took = time.time() - started
        out = p.stdout.decode("utf-8", errors="replace")
        with lock:
            results[label] = (p.returncode, out, took)
            print(f"     Running {label} [{took:.0f} s]", flush=True)
            for l in out.splitlines():
                if l.startswith("test result:") or l.endswith(" FAILED") or "panicked at" in l:
                    print(l, flush=True)


threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
for t in threads:
    t.start()
for t in threads:
    t.join()

status = 0
with open(log_path, "w", encoding="utf-8") as log:
    for b in binaries:
        label = b[0]
        code, out, took = results[label]
        log.write(f"     Running {label}\n{out}\n")
        if code != 0:
            status = 101
            if "test result:" not in out:
                # It died before its summary (a signal, an abort): count it as a failure.
                log.write(
                    f"test {name(b)} ... FAILED\n"
                    f"test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; "
                    f"finished in {took:.2f}s\n"
                )
        last[name(b)] = round(took, 1)
with open(durations_path, "w") as f:
    json.dump(last, f, indent=1, sort_keys=True)
sys.exit(status)
