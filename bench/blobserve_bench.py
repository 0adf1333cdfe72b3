#!/usr/bin/env python3
"""blobserve measurements. Run by hand; not part of `make test`.

On loopback, every process on a free 127.0.0.1 port and stopped by PID:
  registry    Debian's docker-registry holding bench/web:v1, an OCI image
              whose one gzip layer holds index.html (first in the tar, 1 KiB),
              big.bin (50 MiB of random bytes) and app.js
  regfacade   with a blobserve listener; a fresh cache per cold trial
  nginx       serving blobserve's own extraction tree of that layer
              (sendfile on), i.e. the very same files

(1) cold: time to first byte of index.html through blobserve with empty
    caches, against the time to download the layer blob from the registry
    directly (curl, time_total). Each trial also records blobserve's own
    "extracted layer ... N s" log line, and, on a second fresh instance,
    splits the cold path in two: the blob fetched through the registry
    listener first (download, sha256, spool, fsync, commit), then the first
    byte through blobserve (extraction only). Medians of --trials.
(2) cached: big.bin (50 MiB) throughput, curl -o /dev/null, 2 x --trials
    samples per server, interleaved; and index.html requests/s with
    wrk -t2 -c16, --wrk-seconds per round, 3 rounds interleaved, keep-alive.
    Ratio blobserve / nginx (target >= 0.9). The load average before and
    after is recorded: on a shared machine, other work skews both sides.

Usage: bench/blobserve_bench.py [--regfacade build/regfacade] [--out bench/BLOBSERVE.md]
                                [--trials 5] [--wrk-seconds 10]
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "spec", "integration"))

import harness  # noqa: E402
import registries  # noqa: E402
from harness import ProcessGroup, free_port, wait_http  # noqa: E402
from oci_layout import F, Layout, push, rbytes  # noqa: E402

MIB = 1024 * 1024
BIG = 50 * MIB
REPO = "bench/web"
TOOLS = ["nginx", "wrk", "curl", "docker-registry", "skopeo"]


def log(msg):
    print(f"[blobserve-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(argv, timeout=300):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def curl_times(url):
    """(time_starttransfer, time_total, bytes, speed bytes/s) of one GET."""
    out = run(["curl", "-sS", "-o", "/dev/null", "--max-time", "300", "-w",
               "%{http_code} %{time_starttransfer} %{time_total} %{size_download} %{speed_download}", url])
    code, ttfb, total, size, speed = out.split()
    if code != "200":
        raise RuntimeError(f"GET {url}: {code}")
    return float(ttfb), float(total), int(size), float(speed)


def wrk_rps(url, seconds):
    out = run(["wrk", "-t2", "-c16", f"-d{seconds}s", url], timeout=seconds + 60)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not m or bad:
        raise RuntimeError(f"wrk {url}:\n{out}")
    return float(m.group(1))


def load():
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work or f"/tmp/blobserve-bench-{os.getpid()}")
        os.makedirs(self.work, exist_ok=True)
        self.procs = ProcessGroup(self.work)
        self.load0 = load()
        self.r = {"cold": [], "direct": [], "extract_s": [], "big_bs": [], "big_nginx": [], "store_fetch": [],
                  "extract_only": [], "small_bs": [], "small_nginx": []}

    # --- peers ---
    def build_and_push(self):
        lay = Layout(os.path.join(self.work, "layout"))
        entries = [F("index.html", b"<html>" + b"x" * 1000 + b"</html>\n"),
                   F("big.bin", rbytes(BIG, 42)),
                   F("app.js", b"console.log('bench');\n")]
        m, layers = lay.manifest([(entries, "gzip")])
        lay.tag("web", m)
        self.layer = layers[0]
        self.layer_size = os.path.getsize(os.path.join(lay.path, "blobs", "sha256", self.layer[7:]))
        self.reg = registries.start_registry(self.procs, os.path.join(self.work, "registry"), name="registry")
        push(lay, "web", self.reg.host, f"{REPO}:v1")
        log(f"pushed {REPO}:v1, layer {self.layer} ({self.layer_size / MIB:.1f} MiB compressed)")

    def start_facade(self, name):
        port = free_port()
        cache = os.path.join(self.work, f"{name}-cache")
        shutil.rmtree(cache, ignore_errors=True)
        cfg = {"cache": {"dir": cache}, "upstreams": {"reg": {"url": self.reg.url}},
               "blobserve": {"listen": f"127.0.0.1:{port}", "repositories": [REPO]}}
        rf = harness.Regfacade(self.procs, self.work, cfg, name=name)
        harness.REGFACADE = self.args.regfacade
        rf.start()
        rf.bs_url = f"http://127.0.0.1:{port}"
        rf.bs_cache = os.path.join(cache, "blobserve")
        wait_http(rf.bs_url + "/readyz", ok=(200,))
        return rf

    def start_nginx(self, root):
        d = os.path.join(self.work, "nginx")
        os.makedirs(os.path.join(d, "logs"), exist_ok=True)
        port = free_port()
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""user root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    types {{ text/html html; application/octet-stream bin; }}
    default_type application/octet-stream;
    etag on;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fastcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
""")
        self.nginx = self.procs.start("nginx", ["/usr/sbin/nginx", "-p", d, "-c", conf, "-g", "daemon off;"])
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/index.html", ok=(200,))
        return url

    # --- measurements ---
    def cold(self):
        blob_url = f"{self.reg.url}/v2/{REPO}/blobs/{self.layer}"
        for i in range(self.args.trials):
            _, total, size, _ = curl_times(blob_url)
            assert size == self.layer_size
            self.r["direct"].append(total)
            rf = self.start_facade(f"cold{i}")
            ttfb, _, _, _ = curl_times(rf.bs_url + f"/{REPO}:v1/index.html")
            self.r["cold"].append(ttfb)
            m = re.search(r"extracted layer \S+: .*?([\d.]+) s\"", rf.log())
            if m:
                self.r["extract_s"].append(float(m.group(1)))
            rf.stop()
            shutil.rmtree(os.path.join(self.work, f"cold{i}-cache"), ignore_errors=True)
            # the same, in two steps: the blob into the store, then extraction only
            rf = self.start_facade(f"split{i}")
            _, fetch_s, _, _ = curl_times(f"{rf.url}/v2/{REPO}/blobs/{self.layer}")
            ext, _, _, _ = curl_times(rf.bs_url + f"/{REPO}:v1/index.html")
            self.r["store_fetch"].append(fetch_s)
            self.r["extract_only"].append(ext)
            rf.stop()
            shutil.rmtree(os.path.join(self.work, f"split{i}-cache"), ignore_errors=True)
            log(f"cold trial {i}: blobserve TTFB {ttfb * 1000:.0f} ms, direct layer download {total * 1000:.0f} ms; "
                f"split: registry-path fetch {fetch_s * 1000:.0f} ms + blobserve from the store {ext * 1000:.0f} ms")

    def cached(self):
        rf = self.start_facade("warm")
        bs = rf.bs_url + f"/{REPO}:v1"
        curl_times(bs + "/index.html")  # extract
        root = os.path.join(rf.bs_cache, "layers", self.layer[7:], "root")
        ng = self.start_nginx(root)
        for url in (bs, ng):  # warm the page cache and both servers
            curl_times(url + "/big.bin")
        for i in range(2 * self.args.trials):
            pairs = (("big_bs", bs), ("big_nginx", ng))
            for key, url in (pairs if i % 2 == 0 else pairs[::-1]):
                _, _, size, speed = curl_times(url + "/big.bin")
                assert size == BIG
                self.r[key].append(speed / MIB)
        log(f"big.bin MiB/s: blobserve {[round(x) for x in self.r['big_bs']]}, "
            f"nginx {[round(x) for x in self.r['big_nginx']]}")
        for i in range(3):
            pairs = (("small_bs", bs), ("small_nginx", ng))
            for key, url in (pairs if i % 2 == 0 else pairs[::-1]):
                self.r[key].append(wrk_rps(url + "/index.html", self.args.wrk_seconds))
        log(f"index.html req/s: blobserve {[round(x) for x in self.r['small_bs']]}, "
            f"nginx {[round(x) for x in self.r['small_nginx']]}")
        self.procs.stop(self.nginx)
        rf.stop()

    def report(self):
        med = statistics.median
        r = self.r
        cold, direct = med(r["cold"]), med(r["direct"])
        big_ratio = med(r["big_bs"]) / med(r["big_nginx"])
        small_ratio = med(r["small_bs"]) / med(r["small_nginx"])

        def ver(argv):
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                return (p.stdout + p.stderr).strip().splitlines()[0]
            except Exception as e:  # noqa: BLE001
                return f"? ({e})"

        lines = [
            "<!-- written by bench/blobserve_bench.py; the notes below the results are by hand -->",
            "## Results",
            "",
            f"Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {platform.node()}: "
            f"{os.cpu_count()} cores, Linux {platform.release()}; {ver([self.args.regfacade, '--version'])}, "
            f"{ver(['/usr/sbin/nginx', '-v'])}, {ver(['wrk', '-v']).split(' Copyright')[0]}. "
            f"{self.args.trials} trials, medians. Load average before {self.load0}, after {load()}.",
            "",
            "| measurement | blobserve | reference | ratio | target |",
            "| --- | --- | --- | --- | --- |",
            f"| (1) cold: first byte of index.html, 50 MiB layer, empty caches vs downloading the layer "
            f"({self.layer_size / MIB:.1f} MiB gzip) from the registry | {cold * 1000:.0f} ms | "
            f"{direct * 1000:.0f} ms | {cold / direct:.2f} | (none set) |",
            f"| (1) blobserve's own log: download + extraction of the layer | {med(r['extract_s']) * 1000:.0f} ms "
            f"| | | |" if r["extract_s"] else "| (1) extraction time | not logged | | | |",
            f"| (1) split: the blob through the registry listener, cold (download, sha256, spool, fsync) | "
            f"{med(r['store_fetch']) * 1000:.0f} ms | {direct * 1000:.0f} ms | {med(r['store_fetch']) / direct:.2f} | |",
            f"| (1) split: then first byte through blobserve, blob already in the store (extraction only) | "
            f"{med(r['extract_only']) * 1000:.0f} ms | | | |",
            f"| (2) cached big.bin (50 MiB), curl, MiB/s | {med(r['big_bs']):.0f} | nginx {med(r['big_nginx']):.0f} "
            f"| {big_ratio:.2f} | >= 0.9 {'met' if big_ratio >= 0.9 else 'NOT met'} |",
            f"| (2) cached index.html (1 KiB), wrk -t2 -c16 -d{self.args.wrk_seconds}s x 3, req/s | "
            f"{med(r['small_bs']):.0f} | nginx {med(r['small_nginx']):.0f} | {small_ratio:.2f} | "
            f">= 0.9 {'met' if small_ratio >= 0.9 else 'NOT met'} |",
            "",
            "Samples:",
            "",
            f"- cold TTFB (s): {', '.join(f'{x:.3f}' for x in r['cold'])}",
            f"- direct layer download (s): {', '.join(f'{x:.3f}' for x in r['direct'])}",
            f"- extraction (s): {', '.join(f'{x:.3f}' for x in r['extract_s'])}",
            f"- big.bin blobserve (MiB/s): {', '.join(f'{x:.0f}' for x in r['big_bs'])}",
            f"- big.bin nginx (MiB/s): {', '.join(f'{x:.0f}' for x in r['big_nginx'])}",
            f"- registry-path cold fetch (s): {', '.join(f'{x:.3f}' for x in r['store_fetch'])}",
            f"- blobserve TTFB with the blob in the store (s): {', '.join(f'{x:.3f}' for x in r['extract_only'])}",
            f"- index.html blobserve (req/s): {', '.join(f'{x:.0f}' for x in r['small_bs'])}",
            f"- index.html nginx (req/s): {', '.join(f'{x:.0f}' for x in r['small_nginx'])}",
            "",
        ]
        text = "\n".join(lines)
        print(text)
        if self.args.out:
            notes = ""
            if os.path.exists(self.args.out):
                old = open(self.args.out).read()
                i = old.find("## Notes")
                notes = old[i:] if i >= 0 else ""
            head = "# blobserve benchmark\n\n`bench/blobserve_bench.py` (run by hand). What it measures is in its docstring.\n\n"
            with open(self.args.out, "w") as f:
                f.write(head + text + ("\n" + notes if notes else ""))
            log(f"wrote {self.args.out}")

    def stop(self):
        self.procs.stop_all()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regfacade", default=os.path.join(ROOT, "build", "regfacade"))
    ap.add_argument("--out", default=os.path.join(HERE, "BLOBSERVE.md"))
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--wrk-seconds", type=int, default=10)
    ap.add_argument("--work", help="scratch folder (default /tmp/blobserve-bench-PID, removed at the end)")
    args = ap.parse_args()
    args.regfacade = os.path.abspath(args.regfacade)
    missing = [t for t in TOOLS if not shutil.which(t) and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        subprocess.run([os.path.join(ROOT, "tools", "ensure-packages"),
                        *[{"docker-registry": "docker-registry"}.get(t, t) for t in missing]], check=True)
    b = Bench(args)
    try:
        b.build_and_push()
        b.cold()
        b.cached()
        b.report()
    finally:
        b.stop()
        if not args.work:
            shutil.rmtree(b.work, ignore_errors=True)


if __name__ == "__main__":
    main()
