#!/usr/bin/env python3
"""The cost of the policy on a cached manifest GET.

Starts, on free 127.0.0.1 ports and stopped by PID at the end, a fake
upstream (spec/integration/fake_upstream.py, in this process) holding
acme/app:v1, and regfacade in front of it, once per variant:

  no-hooks   a policy file that returns {} (no hook: authorize skipped,
             resolve maps to default_upstream in C): the policy-free path
  default    no policy file: the embedded default, regfacade.mirror's
             resolve hook runs on every request (what `make run` serves)
  all-hooks  authorize (reads client fields, writes req.ctx), resolve
             (regfacade.mirror) and a log hook (reads ctx and res): three
             hook calls per request and the ctx carried between them
  auth       examples/auth/policy.lua with Basic credentials (bcrypt
             remembered in regfacade.shared after the first request)

The manifest is fetched once (cache warm, cache.tag_ttl_seconds long), then
wrk -t2 -cC -dDs with the Accept header, ROUNDS times per variant,
interleaved, so drift hits every variant alike. With taskset available,
regfacade runs on the last CPU and wrk on the others (so they do not fight
for one core). Besides requests/s, the server's own CPU time per request
(utime + stime from /proc/PID/stat over the wrk run) is recorded: it is far
less sensitive to whatever else the machine runs. Writes bench/POLICY.md
with every sample, the medians and the ratios to no-hooks (target: default
at most 10% slower). The access log is off (metrics.access_log: false) in
every variant: it is not what is measured.

With valgrind installed, the same variants also run under callgrind, serving
N sequential requests on one keep-alive connection: the CPU instructions one
cached manifest GET costs, a count that does not depend on what else the
machine runs (two runs, N=200 and N=1200, subtracted: start-up cancels out).

Usage: policy_bench.py --regfacade build/regfacade [--out bench/POLICY.md]
       [--rounds 5] [--duration 8] [--connections 32] [--no-callgrind]
"""
import argparse
import base64
import datetime
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "spec", "integration"))
from fake_upstream import ALL_MANIFEST_TYPES, FakeUpstream  # noqa: E402

ACCEPT = ", ".join(ALL_MANIFEST_TYPES)

ALL_HOOKS = """
local regfacade = require "regfacade"
local mirror = require "regfacade.mirror"
return {
    authorize = function(req)
        req.ctx.who = req.client.user or req.client.ip
        return true
    end,
    resolve = function(req)
        return mirror.resolve(req)
    end,
    log = function(req, res)
        if res.status >= 500 then
            regfacade.log("warn", (req.ctx.who or "?") .. " got " .. res.status)
        end
    end,
}
"""


# (server CPU, wrk CPUs) when taskset exists and there are 2+ CPUs.
PIN = None
if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
    n = os.cpu_count()
    PIN = (str(n - 1), f"0-{n - 2}")


def cpu_seconds(pid):
    """utime + stime of pid and its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def start(binary, workdir, name, upstream_url, policy=None, options=None, data_files=None):
    port = free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "cache": {"dir": os.path.join(workdir, name + "-cache"), "tag_ttl_seconds": 86400},
        "upstreams": {"fake": {"url": upstream_url}},
        "metrics": {"listen": f"127.0.0.1:{free_port()}", "access_log": False},
    }
    if policy:
        cfg["policy"] = {"file": policy, "options": options or {}}
        if data_files:
            cfg["policy"]["data_files"] = data_files
    path = os.path.join(workdir, name + ".json")
    import json
    write(path, json.dumps(cfg))
    log = open(os.path.join(workdir, name + ".log"), "ab")
    argv = [binary, "serve", "--config", path]
    if PIN:
        argv = ["taskset", "-c", PIN[0]] + argv
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.05)
    p.port = port
    return p


def stop(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def warm(port, headers):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/acme/app/manifests/v1",
                                 headers=dict({"Accept": ACCEPT}, **headers))
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        r.read()


def wrk(port, duration, connections, headers):
    args = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "-H", f"Accept: {ACCEPT}"]
    if PIN:
        args = ["taskset", "-c", PIN[1]] + args
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    args.append(f"http://127.0.0.1:{port}/v2/acme/app/manifests/v1")
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = re.search(r"Latency\s+([\d.]+\w+)", out)
    return rps, int(non2xx.group(1)) if non2xx else 0, lat.group(1) if lat else "?", total


def callgrind_instructions(binary, work, name, fake_url, n, headers, **kw):
    """Instructions regfacade ran (callgrind's total) serving n requests."""
    out = os.path.join(work, f"{name}-{n}.cg")
    port = free_port()
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "cache": {"dir": os.path.join(work, name + "-cg-cache"), "tag_ttl_seconds": 86400},
        "upstreams": {"fake": {"url": fake_url}},
        "metrics": {"listen": f"127.0.0.1:{free_port()}", "access_log": False},
    }
    if kw.get("policy"):
        cfg["policy"] = {"file": kw["policy"], "options": kw.get("options") or {}}
        if kw.get("data_files"):
            cfg["policy"]["data_files"] = kw["data_files"]
    import json
    path = os.path.join(work, f"{name}-cg.json")
    write(path, json.dumps(cfg))
    p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "serve", "--config",
                          path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import http.client
    deadline = time.time() + 120
    conn = None
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/v2/acme/app/manifests/v1", headers=dict({"Accept": ACCEPT}, **headers))
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                break
        except OSError:
            time.sleep(0.5)
    for _ in range(n):
        conn.request("GET", "/v2/acme/app/manifests/v1", headers=dict({"Accept": ACCEPT}, **headers))
        r = conn.getresponse()
        r.read()
        assert r.status == 200, r.status
    conn.close()
    time.sleep(1)
    os.killpg(p.pid, signal.SIGTERM)
    p.wait(timeout=120)
    total = 0
    with open(out) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                total = int(line.split()[1])
    return total


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--regfacade", default=os.path.join(ROOT, "build", "regfacade"))
    ap.add_argument("--out", default=os.path.join(HERE, "POLICY.md"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--no-callgrind", action="store_true")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (apt-get install wrk)")
    work = tempfile.mkdtemp(prefix="rf-policy-bench-")
    fake = FakeUpstream().start()
    fake.add_image("acme/app", "v1")
    procs = {}
    try:
        write(os.path.join(work, "no-hooks.lua"), "return {}\n")
        write(os.path.join(work, "all-hooks.lua"), ALL_HOOKS)
        shutil.copy(os.path.join(ROOT, "examples", "auth", "policy.lua"), os.path.join(work, "auth.lua"))
        shutil.copy(os.path.join(ROOT, "examples", "auth", "htpasswd"), os.path.join(work, "htpasswd"))
        auth = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-password").decode()}
        variants = [
            ("no-hooks", dict(policy="no-hooks.lua"), {}),
            ("default", dict(), {}),
            ("all-hooks", dict(policy="all-hooks.lua"), {}),
            ("auth", dict(policy="auth.lua", options={"htpasswd": "htpasswd"}, data_files=["htpasswd"]), auth),
        ]
        for name, kw, headers in variants:
            procs[name] = start(a.regfacade, work, name, fake.url, **kw)
            warm(procs[name].port, headers)
        instr = {}
        if shutil.which("valgrind") and not a.no_callgrind:
            for name, kw, headers in variants:
                lo = callgrind_instructions(a.regfacade, work, name, fake.url, 200, headers, **kw)
                hi = callgrind_instructions(a.regfacade, work, name, fake.url, 1200, headers, **kw)
                instr[name] = (hi - lo) / 1000
                print(f"callgrind {name}: {instr[name]:.0f} instructions per request", flush=True)
        samples = {name: [] for name, _, _ in variants}
        for r in range(a.rounds):
            for name, _, headers in variants:
                cpu0 = cpu_seconds(procs[name].pid)
                rps, bad, lat, total = wrk(procs[name].port, a.duration, a.connections, headers)
                us = (cpu_seconds(procs[name].pid) - cpu0) * 1e6 / max(total, 1)
                samples[name].append((rps, bad, lat, us))
                print(f"round {r + 1} {name}: {rps:.0f} req/s, {us:.1f} us CPU/request, non-2xx {bad}, "
                      f"latency avg {lat}", flush=True)
    finally:
        for p in procs.values():
            stop(p)
        fake.stop()
        shutil.rmtree(work, ignore_errors=True)

    base = median([s[0] for s in samples["no-hooks"]])
    base_cpu = median([s[3] for s in samples["no-hooks"]])
    lines = [
        "# Policy overhead on cached manifest GETs",
        "",
        f"Run {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by "
        "`bench/policy_bench.py` (not a timed test: numbers depend on the machine).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; wrk and regfacade share it.",
        f"Load: `wrk -t2 -c{a.connections} -d{a.duration}s` on `GET /v2/acme/app/manifests/v1` (Accept: all manifest "
        f"types), manifest cached (tag TTL 1 day), access log off; {a.rounds} rounds, variants interleaved"
        + (f"; regfacade pinned to CPU {PIN[0]}, wrk to CPUs {PIN[1]}." if PIN else "."),
        "",
        "| variant | hooks run per request | median req/s | vs no-hooks | median server CPU per request | vs no-hooks | "
        "samples (req/s) | non-2xx |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    what = {"no-hooks": "none (policy-free path)", "default": "resolve (regfacade.mirror)",
            "all-hooks": "authorize, resolve, log (+ req.ctx)", "auth": "authorize (Basic, remembered bcrypt), resolve, log"}
    for name, _, _ in variants:
        rps = [s[0] for s in samples[name]]
        m = median(rps)
        cpu = median([s[3] for s in samples[name]])
        lines.append(f"| {name} | {what[name]} | {m:.0f} | {100 * (m / base - 1):+.1f}% | {cpu:.1f} µs | "
                     f"{100 * (cpu / base_cpu - 1):+.1f}% | {', '.join(f'{x:.0f}' for x in rps)} | "
                     f"{sum(s[1] for s in samples[name])} |")
    d = median([s[0] for s in samples["default"]])
    d_cpu = median([s[3] for s in samples["default"]])
    lines += [
        "",
        f"**Target**: the default policy at most 10% slower than the policy-free path: "
        f"{100 * (1 - d / base):.1f}% fewer requests/s — {'met' if d >= 0.9 * base else 'NOT met'}; "
        f"server CPU per request {100 * (d_cpu / base_cpu - 1):+.1f}%.",
        "",
    ]
    if instr:
        b = instr["no-hooks"]
        lines += [
            "## CPU instructions per request (callgrind)",
            "",
            "Deterministic: regfacade under `valgrind --tool=callgrind` serving 1200 and then 200 sequential cached "
            "manifest GETs on one keep-alive connection; the difference over 1000 requests (start-up cancels out). "
            "All of the server's work is counted (HTTP, cache lookup, hooks), none of the client's.",
            "",
            "| variant | instructions per request | vs no-hooks |",
            "| --- | --- | --- |",
        ]
        for name, _, _ in variants:
            lines.append(f"| {name} | {instr[name]:,.0f} | {100 * (instr[name] / b - 1):+.1f}% |")
        lines.append("")
    notes = os.path.join(HERE, "POLICY-notes.md")
    if os.path.exists(notes):
        lines.append(open(notes).read())
    write(a.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
