#!/usr/bin/env python3
"""regfacade side by side with its peers, on loopback.

Starts, each on a free 127.0.0.1 port and stopped by PID at the end:
  upstream      Debian's docker-registry (CNCF distribution 2.8), holding
                bench/big:v1, an OCI image whose one layer is a 256 MiB
                uncompressed tar of random bytes (built here, pushed with the registry API)
  regfacade     in front of upstream (embedded default policy: the mirror's
                resolve hook runs on every request)
  distribution  docker-registry as a pull-through cache (proxy.remoteurl) of upstream
  nginx         serving the same blob file (sendfile on)
  containerd    root, state and socket in a temp folder, for ctr pulls

and runs the same workloads against each:
  (a) cached manifest GETs/s: wrk -t2 -c64 -d10s, Accept header set
  (b) cached blob throughput of the 256 MiB blob: curl -o /dev/null, median
  (c) a cold pull of the blob (empty cache) against a direct pull from upstream
  (d) 32 concurrent cold pulls: wall time, upstream GETs of the blob (counted
      from upstream's access log)
  (e) regfacade's peak RSS (VmHWM) during (d)
  (f) skopeo copy and ctr pull of the whole image through each

and writes RESULTS.md (machine, every sample, medians, ratios against the
targets) followed by bench/findings.md (profiling notes, written by hand).

Usage: bench.py --regfacade build/regfacade [--out bench/RESULTS.md] [--quick]
Bounded: a hard deadline (--deadline seconds, default 900) stops everything.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
# The integration suite's process group and clients, as blobserve_bench.py uses them.
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "spec", "integration"))
from clients import Containerd  # noqa: E402
from harness import ProcessGroup, free_port  # noqa: E402

MIB = 1024 * 1024
BLOB_SIZE = 256 * MIB
REPO = "bench/big"
TAG = "v1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

TARGETS = {
    "manifest_rps_ratio": 10.0,   # regfacade / distribution, at least
    "cached_blob_ratio": 0.9,     # regfacade / nginx throughput, at least
    "cold_pull_ratio": 0.9,       # regfacade cold / direct throughput, at least
    "concurrent_time_ratio": 1.3,  # 32 cold / one cold, at most
    "concurrent_upstream_gets": 1,
    "peak_rss_mib": 64.0,         # at most
}


class Deadline(Exception):
    pass


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def http_status(url, headers=None, method="GET", timeout=5):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:  # noqa: BLE001 - not up yet
        return None


def http_text(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def wait_up(url, proc, timeout=30, ok=(200, 401)):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited {proc.returncode}:\n{tail(proc.log_path)}")
        if http_status(url) in ok:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer at {url}:\n{tail(proc.log_path)}")


def settle_disk():
    """After removing a 256 MiB cache: let the file system finish freeing
    (and discarding) its blocks before the next timed pull, so that the
    pull does not pay for the previous run's cleanup."""
    os.sync()
    time.sleep(0.5)


def tail(path, n=3000):
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def run(argv, timeout=300, check=True, env=None):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


# ---------------------------------------------------------------- the image

def build_image(layout):
    """An OCI layout with bench/big:v1: one uncompressed tar layer of exactly
    BLOB_SIZE bytes (one file of random bytes), written in a single pass."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    payload = BLOB_SIZE - 512 - 1024  # header + data + two zero blocks = BLOB_SIZE
    ti = tarfile.TarInfo("big.bin")
    ti.size = payload
    ti.mode = 0o644
    ti.mtime = 0
    header = ti.tobuf(format=tarfile.USTAR_FORMAT)
    assert len(header) == 512 and payload % 512 == 0
    tmp = os.path.join(layout, "blobs", "sha256", "layer.tmp")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        f.write(header)
        h.update(header)
        left = payload
        while left:
            chunk = os.urandom(min(left, 8 * MIB))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
        f.write(b"\0" * 1024)
        h.update(b"\0" * 1024)
    layer_digest = "sha256:" + h.hexdigest()
    layer_path = os.path.join(layout, "blobs", "sha256", h.hexdigest())
    os.rename(tmp, layer_path)
    assert os.path.getsize(layer_path) == BLOB_SIZE

    def put(data):
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(layout, "blobs", "sha256", d), "wb") as f:
            f.write(data)
        return "sha256:" + d, len(data)

    config = {"created": "2024-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
              "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "regfacade bench: 256 MiB"}]}
    cdig, csize = put(json.dumps(config, separators=(",", ":")).encode())
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cdig, "size": csize},
                "layers": [{"mediaType": OCI_LAYER_TAR, "digest": layer_digest, "size": BLOB_SIZE}]}
    mbytes = json.dumps(manifest, separators=(",", ":")).encode()
    mdig, msize = put(mbytes)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": mdig, "size": msize,
             "annotations": {"org.opencontainers.image.ref.name": TAG}}]}, f)
    return {"layer": layer_digest, "layer_path": layer_path, "manifest": mdig, "manifest_size": msize,
            "config": cdig}


def push_image(host, layout, img):
    """Push the layout's blobs and manifest with the registry API (monolithic
    uploads). skopeo would compress the uncompressed layer on the way."""
    import http.client
    import urllib.parse

    def upload(digest, path):
        c = http.client.HTTPConnection(*host.split(":"), timeout=300)
        c.request("POST", f"/v2/{REPO}/blobs/uploads/", headers={"Content-Length": "0"})
        r = c.getresponse()
        r.read()
        if r.status != 202:
            raise RuntimeError(f"upload start for {digest}: {r.status}")
        loc = urllib.parse.urlsplit(r.getheader("Location"))
        q = (loc.query + "&" if loc.query else "") + "digest=" + urllib.parse.quote(digest)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            c.request("PUT", f"{loc.path}?{q}", body=f,
                      headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
            r = c.getresponse()
            r.read()
        c.close()
        if r.status != 201:
            raise RuntimeError(f"upload of {digest}: {r.status}")

    blobs = os.path.join(layout, "blobs", "sha256")
    for d in (img["config"], img["layer"]):
        upload(d, os.path.join(blobs, d.split(":", 1)[1]))
    with open(os.path.join(blobs, img["manifest"].split(":", 1)[1]), "rb") as f:
        body = f.read()
    c = http.client.HTTPConnection(*host.split(":"), timeout=60)
    c.request("PUT", f"/v2/{REPO}/manifests/{TAG}", body=body, headers={"Content-Type": OCI_MANIFEST})
    r = c.getresponse()
    r.read()
    c.close()
    if r.status != 201:
        raise RuntimeError(f"manifest PUT: {r.status}")


class ThrottleProxy:
    """A TCP relay on 127.0.0.1 in front of the upstream that models a shared
    WAN link: every byte from the upstream to its clients passes one token
    bucket of `rate` bytes/s (requests go through unthrottled). A thread per
    direction per connection; stopped with stop()."""

    def __init__(self, upstream_port, rate):
        self.upstream_port = upstream_port
        self.rate = float(rate)
        self.lock = threading.Lock()
        self.next_free = time.monotonic()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopped = threading.Event()
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _take(self, n):
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)

    def _pipe(self, src, dst, throttle):
        try:
            while not self.stopped.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if throttle:
                    self._take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept(self):
        while not self.stopped.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                c.close()
                continue
            self.conns += [c, u]
            threading.Thread(target=self._pipe, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, True), daemon=True).start()

    def stop(self):
        self.stopped.set()
        self.sock.close()
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass


# ---------------------------------------------------------------- peers

def registry_config(path, storage, host, proxy_of=None, accesslog=True):
    cfg = {
        "version": 0.1,
        "log": {"level": "info" if accesslog else "error", "accesslog": {"disabled": not accesslog}},
        "storage": {"filesystem": {"rootdirectory": storage}, "cache": {"blobdescriptor": "inmemory"},
                    "delete": {"enabled": True}},
        "http": {"addr": host, "secret": "regfacade-bench"},
    }
    if proxy_of:
        cfg["proxy"] = {"remoteurl": proxy_of}
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="rf-bench-")
        os.chmod(self.work, 0o755)
        self.procs = ProcessGroup(self.work)
        self.results = {}
        self.samples = {}
        self.notes = []
        self.deadline = time.time() + args.deadline
        self.rf = self.dist = self.nginx = self.ctrd = None

    def check_deadline(self):
        if time.time() > self.deadline:
            raise Deadline(f"the benchmark ran past its {self.args.deadline}s deadline")

    # --- upstream ---
    def start_upstream(self):
        self.up_port = free_port()
        d = os.path.join(self.work, "upstream")
        os.makedirs(d)
        registry_config(os.path.join(d, "config.yml"), os.path.join(d, "storage"), f"127.0.0.1:{self.up_port}")
        self.up = self.procs.start("upstream", ["/usr/bin/docker-registry", "serve", os.path.join(d, "config.yml")])
        self.up_url = f"http://127.0.0.1:{self.up_port}"
        wait_up(self.up_url + "/v2/", self.up)

    def upstream_blob_gets(self, agent=""):
        """GETs of the big blob in upstream's access log so far, by clients
        whose User-Agent starts with agent (regfacade/..., Go-http-client/...
        for distribution): distribution's proxy logs a late second GET of its
        own (it fetches once for the client and once more to store)."""
        pat = re.compile(r'"GET /v2/' + re.escape(REPO) + r'/blobs/' + re.escape(self.img["layer"]) +
                         r' .*"' + re.escape(agent) + r'[^"]*"$')
        with open(self.up.log_path, "rb") as f:
            return sum(1 for line in f.read().decode("utf-8", "replace").splitlines() if pat.search(line))

    def wait_upstream_log_settled(self, agent=""):
        last, stable = -1, 0
        while stable < 3:
            n = self.upstream_blob_gets(agent)
            stable = stable + 1 if n == last else 0
            last = n
            time.sleep(0.1)
        return last

    # --- regfacade ---
    def start_regfacade(self, fresh=True, upstream_url=None):
        if self.rf is not None:
            self.procs.stop(self.rf)
            self.rf = None
        d = os.path.join(self.work, "regfacade")
        cache = os.path.join(d, "cache")
        if fresh and os.path.exists(cache):
            shutil.rmtree(cache)
            settle_disk()
        os.makedirs(d, exist_ok=True)
        if not getattr(self, "rf_port", None):
            self.rf_port, self.rf_metrics_port = free_port(), free_port()
        cfg = {"listen": f"127.0.0.1:{self.rf_port}", "cache": {"dir": cache},
               "upstreams": {"up": {"url": upstream_url or self.up_url}},
               "metrics": {"listen": f"127.0.0.1:{self.rf_metrics_port}"}}
        path = os.path.join(d, "config.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.rf = self.procs.start("regfacade", [self.args.regfacade, "serve", "--config", path])
        self.rf_url = f"http://127.0.0.1:{self.rf_port}"
        wait_up(self.rf_url + "/v2/", self.rf)

    def rf_metric(self, name):
        text = http_text(f"http://127.0.0.1:{self.rf_metrics_port}/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    # --- distribution as a pull-through cache ---
    def start_distribution(self, fresh=True):
        if self.dist is not None:
            self.procs.stop(self.dist)
            self.dist = None
        d = os.path.join(self.work, "distribution")
        if fresh and os.path.exists(d):
            shutil.rmtree(d)
            settle_disk()
        os.makedirs(d, exist_ok=True)
        if not getattr(self, "dist_port", None):
            self.dist_port = free_port()
        registry_config(os.path.join(d, "config.yml"), os.path.join(d, "storage"), f"127.0.0.1:{self.dist_port}",
                        proxy_of=self.up_url)
        self.dist = self.procs.start("distribution", ["/usr/bin/docker-registry", "serve",
                                                      os.path.join(d, "config.yml")])
        self.dist_url = f"http://127.0.0.1:{self.dist_port}"
        wait_up(self.dist_url + "/v2/", self.dist)

    # --- nginx ---
    def start_nginx(self):
        d = os.path.join(self.work, "nginx")
        os.makedirs(os.path.join(d, "logs"), exist_ok=True)
        self.nginx_port = free_port()
        root = os.path.dirname(self.img["layer_path"])
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""user root;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/logs/access.log;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    types {{ }}
    default_type application/octet-stream;
    client_body_temp_path {d}/tmp_body;
    proxy_temp_path {d}/tmp_proxy;
    fastcgi_temp_path {d}/tmp_fastcgi;
    uwsgi_temp_path {d}/tmp_uwsgi;
    scgi_temp_path {d}/tmp_scgi;
    server {{
        listen 127.0.0.1:{self.nginx_port};
        root {root};
    }}
}}
""")
        self.nginx = self.procs.start("nginx", ["/usr/sbin/nginx", "-p", d, "-c", conf, "-g", "daemon off;"])
        self.nginx_url = f"http://127.0.0.1:{self.nginx_port}/{self.img['layer'].split(':', 1)[1]}"
        wait_up(self.nginx_url, self.nginx, ok=(200,))

    # --- containerd ---
    def start_containerd(self):
        self.ctrd_dir = tempfile.mkdtemp(prefix="rfb-ctrd-")  # AF_UNIX paths are short
        self.ctrd = Containerd(self.procs, self.ctrd_dir).start()

    def stop_containerd(self):
        if self.ctrd is None:
            return
        self.ctrd.stop()
        self.ctrd = None
        try:
            with open("/proc/self/mounts") as f:
                mounts = [line.split()[1] for line in f]
        except OSError:
            mounts = []
        for m in sorted((m for m in mounts if m.startswith(self.ctrd_dir + "/")), reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.ctrd_dir, ignore_errors=True)

    # ------------------------------------------------------------ measuring

    def curl(self, url, headers=(), expect_size=None):
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}"]
        for h in headers:
            argv += ["-H", h]
        r = run(argv + [url], timeout=300)
        code, size, t = r.stdout.split()
        if code != "200" or (expect_size is not None and int(size) != expect_size):
            raise RuntimeError(f"GET {url}: status {code}, {size} bytes")
        return float(t)

    def record(self, key, values, unit):
        self.samples[key] = (list(values), unit)
        med = statistics.median(values)
        self.results[key] = med
        log(f"  {key}: median {med:.4g} {unit} (runs: {', '.join(f'{v:.4g}' for v in values)})")
        return med

    def blob_path(self, base):
        return f"{base}/v2/{REPO}/blobs/{self.img['layer']}"

    def wrk(self, url, seconds):
        r = run(["wrk", "-t2", "-c64", f"-d{seconds}s", "--latency", "-H", f"Accept: {OCI_MANIFEST}", url],
                timeout=seconds + 60)
        m = re.search(r"Requests/sec:\s+([0-9.]+)", r.stdout)
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", r.stdout)
        errs = re.search(r"Socket errors:.*", r.stdout)
        if not m:
            raise RuntimeError(f"wrk printed no rate:\n{r.stdout}")
        if bad:
            self.notes.append(f"wrk {url}: {bad.group(1)} non-2xx answers")
        if errs:
            self.notes.append(f"wrk {url}: {errs.group(0)}")
        p99 = re.search(r"^\s+99%\s+(\S+)", r.stdout, re.M)
        return float(m.group(1)), (p99.group(1) if p99 else "?")

    def a_manifest_rps(self):
        log("(a) cached manifest GETs/s, wrk -t2 -c64")
        secs = 3 if self.args.quick else 10
        rounds = 1 if self.args.quick else 3
        targets = [("regfacade", self.rf_url), ("distribution", self.dist_url), ("upstream", self.up_url)]
        for name, base in targets:  # warm: one GET each so both caches hold the manifest
            url = f"{base}/v2/{REPO}/manifests/{TAG}"
            assert http_status(url, {"Accept": OCI_MANIFEST}) == 200, f"{name}: manifest GET failed"
        # Interleave the rounds so a noisy neighbour hits every target alike.
        rates = {n: [] for n, _ in targets}
        p99s = {n: [] for n, _ in targets}
        for _ in range(rounds):
            for name, base in targets:
                self.check_deadline()
                rps, p99 = self.wrk(f"{base}/v2/{REPO}/manifests/{TAG}", secs)
                rates[name].append(rps)
                p99s[name].append(p99)
        for name, _ in targets:
            self.record(f"manifest_rps_{name}", rates[name], "req/s")
            self.results[f"manifest_p99_{name}"] = ", ".join(p99s[name])

    def b_cached_blob(self):
        log("(b) cached blob throughput, 256 MiB, curl -o /dev/null")
        n = 3 if self.args.quick else 7
        urls = [("regfacade", self.blob_path(self.rf_url)), ("distribution", self.blob_path(self.dist_url)),
                ("nginx", self.nginx_url), ("upstream", self.blob_path(self.up_url))]
        for _, url in urls:  # warm every cache (and the page cache)
            self.curl(url, expect_size=BLOB_SIZE)
        times = {name: [] for name, _ in urls}
        for _ in range(n):
            for name, url in urls:
                self.check_deadline()
                times[name].append(self.curl(url, expect_size=BLOB_SIZE))
        for name, _ in urls:
            self.record(f"cached_blob_mibps_{name}", [BLOB_SIZE / MIB / t for t in times[name]], "MiB/s")

    def cpu_pull(self, url, pids):
        """One curl GET; returns (wall s, {name: CPU s}) with the CPU time
        each named process (and curl itself) spent on it."""
        def cpu(pid):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before = {n: cpu(p) for n, p in pids.items()}
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = self.curl(url, expect_size=BLOB_SIZE)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = {n: cpu(p) - before[n] for n, p in pids.items()}
        used["curl"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        return wall, used

    def c_cold_pull(self):
        log("(c) cold pull of the 256 MiB blob vs a direct pull from upstream")
        n = 2 if self.args.quick else 5
        rf, dist, direct = [], [], []
        cpu_direct, cpu_rf = [], []
        for _ in range(n):
            self.check_deadline()
            w, used = self.cpu_pull(self.blob_path(self.up_url), {"upstream": self.up.pid})
            direct.append(w)
            cpu_direct.append(used)
            self.start_regfacade(fresh=True)
            w, used = self.cpu_pull(self.blob_path(self.rf_url), {"upstream": self.up.pid, "regfacade": self.rf.pid})
            rf.append(w)
            cpu_rf.append(used)
            self.start_distribution(fresh=True)
            dist.append(self.curl(self.blob_path(self.dist_url), expect_size=BLOB_SIZE))
        for label, runs in (("direct", cpu_direct), ("regfacade", cpu_rf)):
            for who in runs[0]:
                self.record(f"cold_pull_cpu_s_{label}_{who}", [r[who] for r in runs], "CPU s")
        self.record("cold_pull_s_direct", direct, "s")
        self.record("cold_pull_s_regfacade", rf, "s")
        self.record("cold_pull_s_distribution", dist, "s")
        for k, v in (("direct", direct), ("regfacade", rf), ("distribution", dist)):
            self.results[f"cold_pull_mibps_{k}"] = BLOB_SIZE / MIB / statistics.median(v)
        # How busy the machine was: CPU seconds of every process involved
        # over (cores x wall time). Near 1, the pull is CPU-bound on the
        # whole machine and only less CPU per byte makes it faster.
        cores = os.cpu_count() or 1
        for label, walls, runs in (("direct", direct, cpu_direct), ("regfacade", rf, cpu_rf)):
            self.record(f"cold_pull_machine_busy_{label}", [sum(u.values()) / (cores * w) for w, u in zip(walls, runs)],
                        f"CPU s / ({cores} cores x wall s)")
        # The best any cache that checks the sha256 before the last byte can
        # do here, with its work spread over every core perfectly:
        self.results["sha256_s"] = self.sha256_seconds()
        # A cache in the middle must also receive every byte (as the client
        # does) and send it (as the upstream does): at least the direct
        # pull's CPU twice, plus the hash, even if writing it cost nothing.
        direct_cpu = statistics.median(sum(u.values()) for u in cpu_direct)
        floor = max(statistics.median(direct), (2 * direct_cpu + self.results["sha256_s"]) / cores)
        self.results["cold_pull_ratio_bound"] = statistics.median(direct) / floor
        if self.args.cold_link_mibps > 0:
            self.c_link_limited()

    def sha256_seconds(self):
        """CPU time of one sha256 of the blob (OpenSSL, as regfacade uses),
        the best of three."""
        with open(self.img["layer_path"], "rb") as f:
            data = f.read()
        best = None
        for _ in range(3):
            t0 = time.process_time()
            hashlib.sha256(data).hexdigest()
            t = time.process_time() - t0
            best = t if best is None else min(best, t)
        return best

    def c_link_limited(self):
        """(c) again with the upstream behind a link of --cold-link-mibps (a
        remote registry, a node's network): both pulls cross the same link."""
        rate = self.args.cold_link_mibps
        log(f"(c') cold pull vs direct pull over a {rate:g} MiB/s upstream link")
        proxy = ThrottleProxy(self.up_port, rate * MIB)
        try:
            direct, rf = [], []
            for _ in range(1 if self.args.quick else 3):
                self.check_deadline()
                direct.append(self.curl(self.blob_path(proxy.url), expect_size=BLOB_SIZE))
                self.start_regfacade(fresh=True, upstream_url=proxy.url)
                rf.append(self.curl(self.blob_path(self.rf_url), expect_size=BLOB_SIZE))
            self.record("link_cold_pull_s_direct", direct, "s")
            self.record("link_cold_pull_s_regfacade", rf, "s")
        finally:
            proxy.stop()
            self.start_regfacade(fresh=False)

    def concurrent(self, name, url, pid, n_clients=32):
        """n_clients pulls of url at once; returns (wall seconds, upstream
        GETs, peak RSS MiB (VmHWM) or None, max polled VmRSS MiB)."""
        agent = {"regfacade": "regfacade/", "distribution": "Go-http-client/"}.get(name, "")
        before = self.wait_upstream_log_settled(agent)
        peak = {"rss": 0}
        stop = threading.Event()

        def poll_rss():
            while not stop.is_set():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                peak["rss"] = max(peak["rss"], int(line.split()[1]))
                except OSError:
                    pass
                time.sleep(0.005)

        poller = threading.Thread(target=poll_rss, daemon=True)
        poller.start()
        t0 = time.monotonic()
        ps = [subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url],
                               stdout=subprocess.PIPE, text=True) for _ in range(n_clients)]
        outs = [p.communicate(timeout=600)[0] for p in ps]
        wall = time.monotonic() - t0
        stop.set()
        poller.join()
        bad = [o for o in outs if o.split() != ["200", str(BLOB_SIZE)]]
        if bad:
            raise RuntimeError(f"{name}: {len(bad)} of {n_clients} concurrent pulls failed: {bad[:3]}")
        hwm = None
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm = int(line.split()[1]) / 1024
        except OSError:
            pass
        gets = self.wait_upstream_log_settled(agent) - before
        return wall, gets, hwm, peak["rss"] / 1024

    def d_concurrent(self):
        log("(d) 32 concurrent cold pulls; (e) regfacade's peak RSS")
        n = 1 if self.args.quick else 3
        walls, gets, hwms, rsss, fetches, coalesced, retries = [], [], [], [], [], [], []
        for _ in range(n):
            self.check_deadline()
            self.start_regfacade(fresh=True)
            w, g, hwm, rss = self.concurrent("regfacade", self.blob_path(self.rf_url), self.rf.pid)
            walls.append(w)
            gets.append(g)
            hwms.append(hwm)
            rsss.append(rss)
            fetches.append(self.rf_metric("regfacade_blob_fetches_total"))
            coalesced.append(self.rf_metric("regfacade_blob_fetch_coalesced_total"))
            retries.append(self.rf_metric("regfacade_upstream_retries_total"))
        self.record("concurrent32_s_regfacade", walls, "s")
        self.record("concurrent32_upstream_gets_regfacade", gets, "GETs")
        self.record("peak_rss_mib_regfacade", hwms, "MiB (VmHWM)")
        self.record("polled_rss_mib_regfacade", rsss, "MiB (VmRSS polled every 5 ms)")
        self.results["concurrent32_metrics_regfacade"] = (
            f"regfacade_blob_fetches_total {fetches}, regfacade_blob_fetch_coalesced_total {coalesced}, "
            f"regfacade_upstream_retries_total {retries}")
        # A single cold pull measured right here too (same conditions).
        singles = []
        for _ in range(n):
            self.start_regfacade(fresh=True)
            singles.append(self.curl(self.blob_path(self.rf_url), expect_size=BLOB_SIZE))
        self.record("single_cold_s_regfacade", singles, "s")

        dwalls, dgets = [], []
        for _ in range(1 if self.args.quick else 2):
            self.check_deadline()
            self.start_distribution(fresh=True)
            w, g, _, _ = self.concurrent("distribution", self.blob_path(self.dist_url), self.dist.pid)
            dwalls.append(w)
            dgets.append(g)
        self.record("concurrent32_s_distribution", dwalls, "s")
        self.record("concurrent32_upstream_gets_distribution", dgets, "GETs")
        dsingles = []
        for _ in range(1 if self.args.quick else 2):
            self.start_distribution(fresh=True)
            dsingles.append(self.curl(self.blob_path(self.dist_url), expect_size=BLOB_SIZE))
        self.record("single_cold_s_distribution", dsingles, "s")
        # Leave both warm for (f).
        self.start_regfacade(fresh=False)
        self.curl(self.blob_path(self.rf_url), expect_size=BLOB_SIZE)
        self.start_distribution(fresh=False)
        self.curl(self.blob_path(self.dist_url), expect_size=BLOB_SIZE)
        # The machine's floor for 32 x 256 MiB to 32 curl processes: the same
        # 32 pulls from caches that are already warm (nginx and regfacade
        # by sendfile), and one warm pull each.
        for name, url, pid in (("nginx", self.nginx_url, self.nginx.pid),
                               ("regfacade_warm", self.blob_path(self.rf_url), self.rf.pid)):
            ws, ones = [], []
            for _ in range(1 if self.args.quick else 2):
                self.check_deadline()
                ws.append(self.concurrent(name, url, pid)[0])
                ones.append(self.curl(url, expect_size=BLOB_SIZE))
            self.record(f"concurrent32_s_{name}", ws, "s")
            self.record(f"single_s_{name}", ones, "s")
        if self.args.link_mibps > 0:
            self.d_link_limited()

    def d_link_limited(self):
        """(d) again with the upstream behind a shared link of --link-mibps
        (a remote registry): what coalescing is for."""
        rate = self.args.link_mibps
        log(f"(d') 32 concurrent cold pulls over a {rate} MiB/s upstream link")
        proxy = ThrottleProxy(self.up_port, rate * MIB)
        try:
            singles, walls, gets, hwms = [], [], [], []
            for _ in range(1 if self.args.quick else 2):
                self.check_deadline()
                self.start_regfacade(fresh=True, upstream_url=proxy.url)
                singles.append(self.curl(self.blob_path(self.rf_url), expect_size=BLOB_SIZE))
                self.start_regfacade(fresh=True, upstream_url=proxy.url)
                w, g, hwm, _ = self.concurrent("regfacade", self.blob_path(self.rf_url), self.rf.pid)
                walls.append(w)
                gets.append(g)
                hwms.append(hwm)
            self.record("link_single_cold_s_regfacade", singles, "s")
            self.record("link_concurrent32_s_regfacade", walls, "s")
            self.record("link_concurrent32_upstream_gets_regfacade", gets, "GETs")
            self.record("link_peak_rss_mib_regfacade", hwms, "MiB (VmHWM)")
        finally:
            proxy.stop()
            self.start_regfacade(fresh=False)

    def f_clients(self):
        log("(f) skopeo copy and ctr pull of the whole image through each")
        n = 1 if self.args.quick else 3
        self.start_containerd()
        hosts = [("regfacade", f"127.0.0.1:{self.rf_port}"), ("distribution", f"127.0.0.1:{self.dist_port}"),
                 ("upstream", f"127.0.0.1:{self.up_port}")]
        try:
            sk = {h: [] for h, _ in hosts}
            ct = {h: [] for h, _ in hosts}
            for i in range(n):
                for name, host in hosts:
                    self.check_deadline()
                    dest = os.path.join(self.work, "skopeo-out")
                    shutil.rmtree(dest, ignore_errors=True)
                    t0 = time.monotonic()
                    run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{host}/{REPO}:{TAG}",
                         f"dir:{dest}"], timeout=300)
                    sk[name].append(time.monotonic() - t0)
                    shutil.rmtree(dest, ignore_errors=True)

                    ns = f"b{i}{name[:4]}"
                    ref = f"{host}/{REPO}:{TAG}"
                    t0 = time.monotonic()
                    self.ctrd.pull(ref, namespace=ns)
                    ct[name].append(time.monotonic() - t0)
                    self.ctrd.ctr("images", "rm", "--sync", ref, namespace=ns, check=False)
                    self.ctrd.ctr("content", "rm", self.img["layer"], self.img["config"], self.img["manifest"],
                                  namespace=ns, check=False)
            for name, _ in hosts:
                self.record(f"skopeo_copy_s_{name}", sk[name], "s")
                self.record(f"ctr_pull_s_{name}", ct[name], "s")
        finally:
            self.stop_containerd()

    # ------------------------------------------------------------ report

    def machine(self):
        def meminfo():
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
            return "?"

        def cpu():
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
            return platform.processor() or "?"

        def ver(argv):
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                return (r.stdout + r.stderr).strip().splitlines()[0]
            except Exception:  # noqa: BLE001
                return "?"

        return [
            ("nproc", str(os.cpu_count())),
            ("memory", meminfo()),
            ("CPU", cpu()),
            ("kernel", platform.release()),
            ("load average (1 min) at start / end", f"{self.load0:.1f} / {os.getloadavg()[0]:.1f}"
             " (other work on the machine shows here; the ratios come from interleaved runs)"),
            ("regfacade", ver([self.args.regfacade, "--version"])),
            ("distribution", ver(["/usr/bin/docker-registry", "--version"])),
            ("nginx", ver(["/usr/sbin/nginx", "-v"])),
            ("wrk", ver(["wrk", "-v"])),
            ("curl", ver(["curl", "--version"])),
        ]

    def verdicts(self):
        R = self.results
        rows = []

        def row(name, value_text, ratio, target_text, ok):
            rows.append((name, value_text, ratio, target_text, "met" if ok else "**missed**"))

        if "manifest_rps_regfacade" in R:
            ratio = R["manifest_rps_regfacade"] / R["manifest_rps_distribution"]
            row("(a) cached manifest GETs/s vs distribution",
                f"{R['manifest_rps_regfacade']:.0f} vs {R['manifest_rps_distribution']:.0f} req/s",
                f"{ratio:.1f}x", f">= {TARGETS['manifest_rps_ratio']:.0f}x", ratio >= TARGETS["manifest_rps_ratio"])
        if "cached_blob_mibps_regfacade" in R:
            ratio = R["cached_blob_mibps_regfacade"] / R["cached_blob_mibps_nginx"]
            row("(b) cached 256 MiB blob vs nginx sendfile",
                f"{R['cached_blob_mibps_regfacade']:.0f} vs {R['cached_blob_mibps_nginx']:.0f} MiB/s",
                f"{ratio:.2f}", f">= {TARGETS['cached_blob_ratio']}", ratio >= TARGETS["cached_blob_ratio"])
        if "cold_pull_mibps_regfacade" in R:
            ratio = R["cold_pull_mibps_regfacade"] / R["cold_pull_mibps_direct"]
            row("(c) cold pull vs direct pull from upstream, raw loopback",
                f"{R['cold_pull_mibps_regfacade']:.0f} vs {R['cold_pull_mibps_direct']:.0f} MiB/s; machine busy "
                f"{R['cold_pull_machine_busy_regfacade']:.0%}; best possible here with a sha256 check: "
                f"{R['cold_pull_ratio_bound']:.2f}",
                f"{ratio:.2f}", f">= {TARGETS['cold_pull_ratio']}", ratio >= TARGETS["cold_pull_ratio"])
            if "link_cold_pull_s_regfacade" in R:
                lratio = R["link_cold_pull_s_direct"] / R["link_cold_pull_s_regfacade"]
                row(f"(c') the same over a {self.args.cold_link_mibps:g} MiB/s upstream link",
                    f"{BLOB_SIZE / MIB / R['link_cold_pull_s_regfacade']:.0f} vs "
                    f"{BLOB_SIZE / MIB / R['link_cold_pull_s_direct']:.0f} MiB/s",
                    f"{lratio:.2f}", f">= {TARGETS['cold_pull_ratio']}", lratio >= TARGETS["cold_pull_ratio"])
        if "concurrent32_s_regfacade" in R:
            ratio = R["concurrent32_s_regfacade"] / R["single_cold_s_regfacade"]
            gets = max(self.samples["concurrent32_upstream_gets_regfacade"][0])
            floor = (f"; nginx's 32 warm pulls of the same file: {R['concurrent32_s_nginx']:.2f} s"
                     if "concurrent32_s_nginx" in R else "")
            row("(d) 32 concurrent cold pulls vs one cold pull, raw loopback",
                f"{R['concurrent32_s_regfacade']:.2f} s vs {R['single_cold_s_regfacade']:.2f} s; "
                f"upstream GETs: {gets:.0f}{floor}",
                f"{ratio:.2f}x", f"<= {TARGETS['concurrent_time_ratio']}x, 1 GET",
                ratio <= TARGETS["concurrent_time_ratio"] and gets == TARGETS["concurrent_upstream_gets"])
            if "link_concurrent32_s_regfacade" in R:
                lratio = R["link_concurrent32_s_regfacade"] / R["link_single_cold_s_regfacade"]
                lgets = max(self.samples["link_concurrent32_upstream_gets_regfacade"][0])
                row(f"(d') the same over a {self.args.link_mibps:g} MiB/s upstream link",
                    f"{R['link_concurrent32_s_regfacade']:.2f} s vs {R['link_single_cold_s_regfacade']:.2f} s; "
                    f"upstream GETs: {lgets:.0f}",
                    f"{lratio:.2f}x", f"<= {TARGETS['concurrent_time_ratio']}x, 1 GET",
                    lratio <= TARGETS["concurrent_time_ratio"] and lgets == TARGETS["concurrent_upstream_gets"])
            peak = max(self.samples["peak_rss_mib_regfacade"][0] +
                       self.samples.get("link_peak_rss_mib_regfacade", ([], ""))[0])
            row("(e) regfacade peak RSS during (d)", f"{peak:.1f} MiB", "-", f"<= {TARGETS['peak_rss_mib']:.0f} MiB",
                peak <= TARGETS["peak_rss_mib"])
        return rows

    def write(self, started, finished):
        R = self.results
        L = ["# regfacade benchmark results", "",
             f"Written by `make bench` (bench/bench.py) on {started} UTC, {finished - self.t0:.0f} s run."
             " Every process on 127.0.0.1; medians of the runs listed. Re-run to refresh; the findings"
             " at the end come from bench/findings.md.", "", "## Machine", "",
             "| | |", "|---|---|"]
        L += [f"| {k} | {v} |" for k, v in self.machine()]
        L += ["", "## Targets (ratios measured in this run)", "",
              "| measurement | measured | ratio | target | |", "|---|---|---|---|---|"]
        L += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in self.verdicts()]
        L += ["", "## Every measurement", "", "| key | median | unit | runs |", "|---|---|---|---|"]
        for k, (vals, unit) in self.samples.items():
            L.append(f"| {k} | {R[k]:.4g} | {unit} | {', '.join(f'{v:.4g}' for v in vals)} |")
        extra = [k for k in R if k not in self.samples]
        if extra:
            L += ["", "Derived and other values:", ""]
            for k in extra:
                v = R[k]
                L.append(f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}")
        if self.notes:
            L += ["", "Notes from the run:", ""] + [f"- {n}" for n in self.notes]
        L += ["", "## What each workload is", "",
              "- (a) `wrk -t2 -c64 -d10s -H 'Accept: application/vnd.oci.image.manifest.v1+json'` on"
              f" `/v2/{REPO}/manifests/{TAG}` (by tag), 3 interleaved rounds; both caches warm. regfacade runs"
              " its embedded default policy (the Lua resolve hook runs on every request) and writes its"
              " JSON access log; distribution logs at info with its access log on, as shipped.",
              "- (b) `curl -s -o /dev/null` of the 256 MiB blob, every cache warm (and the page cache);"
              " nginx serves the same file with `sendfile on`.",
              "- (c) regfacade and distribution restarted on an empty cache before each pull; direct ="
              " the same GET on the upstream registry.",
              "- (d) 32 `curl` processes started at once on a cold regfacade (distribution too); wall"
              " time until the last one ends, against one cold pull measured in the same phase. Upstream"
              " GETs of the blob counted in the upstream registry's access log.",
              "- (e) VmHWM of the regfacade process after (d) (it was restarted just before), and VmRSS"
              " polled every 5 ms during it.",
              "- (f) `skopeo copy docker://HOST/bench/big:v1 dir:...` and `ctr images pull --plain-http`"
              " (containerd 1.6 in a temp folder; image removed with --sync after each pull), caches warm.",
              ""]
        fpath = os.path.join(HERE, "findings.md")
        if os.path.exists(fpath):
            with open(fpath) as f:
                L += [f.read().rstrip(), ""]
        with open(self.args.out, "w") as f:
            f.write("\n".join(L))
        log(f"wrote {self.args.out}")
        print()
        for a, b, c, d, e in self.verdicts():
            print(f"  {a:48s} {b:40s} ratio {c:>7s}  target {d:18s} {e}")

    def main(self):
        self.t0 = time.time()
        self.load0 = os.getloadavg()[0]
        started = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M")
        log(f"work folder {self.work}")
        # Run a private copy: a rebuild of build/regfacade during the run
        # must not change (or remove) the binary under test.
        copy = os.path.join(self.work, "regfacade-under-test")
        shutil.copy2(self.args.regfacade, copy)
        self.args.regfacade = copy
        log("building the 256 MiB image")
        self.img = build_image(os.path.join(self.work, "layout"))
        self.start_upstream()
        log("pushing it into the upstream registry")
        push_image(f"127.0.0.1:{self.up_port}", os.path.join(self.work, "layout"), self.img)
        self.start_regfacade()
        self.start_distribution()
        self.start_nginx()
        only = set(self.args.only.split(",")) if self.args.only else set("abcdf")
        steps = [("c", self.c_cold_pull), ("d", self.d_concurrent), ("a", self.a_manifest_rps),
                 ("b", self.b_cached_blob), ("f", self.f_clients)]
        for key, fn in steps:
            if key in only:
                if key in ("a", "b"):  # need warm caches
                    for base in (self.rf_url, self.dist_url):
                        self.curl(self.blob_path(base), expect_size=BLOB_SIZE)
                fn()
        self.write(started, time.time())

    def cleanup(self):
        self.stop_containerd()
        self.procs.stop_all()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regfacade", default=os.path.join(HERE, "..", "build", "regfacade"))
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--quick", action="store_true", help="fewer and shorter runs (a smoke test)")
    ap.add_argument("--only", default="", help="comma-separated workloads among a,b,c,d,f")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--link-mibps", type=float, default=32,
                    help="(d') also run (d) with the upstream behind a link of this many MiB/s (0: skip)")
    ap.add_argument("--cold-link-mibps", type=float, default=64,
                    help="(c') also run (c) with the upstream behind a link of this many MiB/s (0: skip)")
    ap.add_argument("--deadline", type=int, default=900, help="seconds before everything is stopped")
    args = ap.parse_args()
    args.regfacade = os.path.abspath(args.regfacade)
    for tool in ("/usr/bin/docker-registry", "/usr/sbin/nginx", "/usr/bin/wrk", "/usr/bin/skopeo",
                 "/usr/bin/containerd", "/usr/bin/ctr", "/usr/bin/curl", args.regfacade):
        if not os.path.exists(tool):
            sys.exit(f"bench: {tool} is missing (make bench installs the packages)")
    b = Bench(args)
    def on_term(*_):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    alarm = threading.Timer(args.deadline + 120, lambda: os.kill(os.getpid(), signal.SIGTERM))
    alarm.daemon = True
    alarm.start()
    try:
        b.main()
    finally:
        alarm.cancel()
        b.cleanup()


if __name__ == "__main__":
    main()
