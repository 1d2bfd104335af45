#!/usr/bin/env python3
"""Summarises a `cargo test --no-fail-fast` log: one line per test binary (tests passed, failed,
seconds), the slowest binaries, then each failing test's captured output. Exits with cargo's
status, so a failing test fails the caller.

Usage: test-summary.py LOG CARGO_STATUS SECONDS
"""
import re
import sys

log_path, status, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
text = open(log_path, encoding="utf-8", errors="replace").read()
lines = text.splitlines()

binaries = []  # (name, passed, failed, ignored, seconds)
current = None
for line in lines:
    m = re.match(r"\s+Running (?:unittests )?(\S+) \((.+)\)", line)
    if m:
        current = m.group(1) + " " + re.sub(r"-[0-9a-f]{16}$", "", m.group(2).split("/")[-1])
        continue
    m = re.match(r"\s+Doc-tests (\S+)", line)
    if m:
        current = "doc " + m.group(1)
        continue
    m = re.match(
        r"test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored;.*finished in ([\d.]+)s", line
    )
    if m and current:
        binaries.append((current, int(m.group(2)), int(m.group(3)), int(m.group(4)), float(m.group(5))))
        current = None

failed_tests = re.findall(r"^test (\S+) \.\.\. FAILED$", text, re.M)
passed = sum(b[1] for b in binaries)
failed = sum(b[2] for b in binaries)
ignored = sum(b[3] for b in binaries)

print("\n==> summary")
for name, p, f, i, s in binaries:
    if p or f:
        mark = "FAIL" if f else "ok  "
        print(f"  {mark} {s:7.1f}s  {p:3d} passed {f:2d} failed  {name}")
slowest = sorted(binaries, key=lambda b: -b[4])[:5]
print("  slowest: " + ", ".join(f"{b[0].split()[-1]} {b[4]:.0f}s" for b in slowest))
print(f"  {len(binaries)} test binaries, {passed} passed, {failed} failed, {ignored} ignored, {seconds} s running")

if failed_tests or status != 0:
    print("\n==> failing tests: their output")
    # Each binary prints its failures as "---- name stdout ----" blocks before its result line.
    blocks = re.split(r"^(---- \S+ stdout ----)$", text, flags=re.M)
    for i in range(1, len(blocks), 2):
        body = blocks[i + 1].split("\nfailures:\n")[0]
        body_lines = body.strip("\n").splitlines()
        if len(body_lines) > 200:
            body_lines = body_lines[:40] + [f"... {len(body_lines) - 120} lines cut ..."] + body_lines[-80:]
        print(blocks[i])
        print("\n".join(body_lines))
    if not failed_tests:
        # A build error, or a binary that crashed without a test result.
        print("\n".join(lines[-60:]))
    print(f"\nFAILED: {', '.join(failed_tests) or 'see above'} (full log: {log_path})")
else:
    print(f"ALL PASSED (full log: {log_path})")
sys.exit(status)
