"""Reliability: regfacade stays correct under upstream faults and load.

A fault-injecting loopback proxy (FaultProxy, below: threads and raw sockets)
sits between regfacade and the real upstream (Debian's docker-registry from
registries.py, or the programmable fake of fake_upstream.py). It counts every
request and, per rule, answers a status (503 bursts, 429 with Retry-After),
hangs before answering, resets the connection mid-body, truncates a body,
flips a byte, stalls or trickles the body.

- Through each fault, skopeo and ctr pulls either succeed with the right
  digests or fail with a clear error, and the cache never holds a wrong file
  (every file under cache/blobs hashes to its name).
- 50 clients of one cold 110 MiB blob cause exactly one upstream GET and all
  get the right bytes, while the client that started the fetch goes away.
- Concurrent requests of a cold tag cause one HEAD and one GET upstream.
- Retries: 429 with Retry-After in seconds and as an HTTP-date, the retry
  budget, mirrors (down, 5xx, a reset whose resume goes to the mirror).
- Stale serving of tag resolutions on 5xx and 429, within stale_max_seconds.
- Eviction under a small cache.max_bytes while a client reads the oldest blob.
- upstream_client.max_concurrent_fetches caps transfers (they wait, not fail).
- kill -9 during a fetch, restart, pull again: correct.
"""
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import struct
import threading
import time
from email.utils import formatdate
from urllib.parse import urlsplit

import pytest

import clients
from clients import check_copied_layout, diag
from fake_upstream import random_bytes, request, verify_cache, wait_until
from harness import REGFACADE, Regfacade, free_port, wait_http

MiB = 1024 * 1024


# ---------------------------------------------------------------------------
# the fault-injecting proxy
# ---------------------------------------------------------------------------

class Rule:
    """kind, with what it applies to (path: a regex searched in the request
    path; method) and how often (times: None = always)."""

    def __init__(self, kind, path=None, method=None, times=None, **kw):
        self.kind = kind
        self.path = re.compile(path) if path else None
        self.method = method
        self.times = times
        self.kw = kw

    def matches(self, method, path):
        return ((self.method is None or self.method == method)
                and (self.path is None or self.path.search(path) is not None)
                and (self.times is None or self.times > 0))


class FaultProxy:
    """An HTTP/1.1 proxy on a free 127.0.0.1 port in front of upstream_url.

    Every answer closes its connection (Connection: close), so each upstream
    request of regfacade is one connection here and one line in `log`.
    Rules (add(kind, path=, method=, times=, ...)), first match wins:
      status   status=N [retry_after=S]: answer N (OCI error body), upstream not asked
      hang     seconds=S: accept, answer nothing, close after S s (or release())
      delay    seconds=S: wait S s (or release()), then forward normally
      reset    after=N: forward; after N body bytes, reset the connection (RST)
      truncate after=N: forward; after N body bytes, close (FIN): a short body
      corrupt  at=N: forward with the byte at offset N of the body flipped
      stall    after=N [seconds=S]: forward N body bytes, then nothing until release()
      trickle  rate=B: forward the body at B bytes/s
    Body faults apply to 2xx answers of GET only.
    """

    def __init__(self, upstream_url):
        u = urlsplit(upstream_url)
        self.up_host, self.up_port = u.hostname, u.port
        self.lock = threading.Lock()
        self.rules = []
        self.log = []          # {"method", "path", "range", "time"}
        self.inflight = 0      # blob requests being answered
        self.max_inflight = 0
        self.released = threading.Event()
        self.stopping = threading.Event()
        self.conns = set()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.thread = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self.thread = threading.Thread(target=self._accept_loop, daemon=True, name="fault-proxy")
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.released.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- rules and counters
    def add(self, kind, path=None, method=None, times=None, **kw):
        with self.lock:
            if kind in ("hang", "delay", "stall"):
                self.released.clear()
            self.rules.append(Rule(kind, path, method, times, **kw))

    def clear(self):
        with self.lock:
            self.rules.clear()
        self.release()

    def release(self):
        self.released.set()

    def requests(self, method=None, path=None):
        with self.lock:
            log = list(self.log)
        rx = re.compile(path) if path else None
        return [r for r in log if (method is None or r["method"] == method)
                and (rx is None or rx.search(r["path"]))]

    def count(self, method=None, path=None):
        return len(self.requests(method, path))

    def _take(self, method, path):
        with self.lock:
            for r in self.rules:
                if r.matches(method, path):
                    if r.times is not None:
                        r.times -= 1
                    return r
        return None

    # -- serving
    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.add(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _end_inflight(self, state):
        """A blob answer is over for the in-flight count: called before its
        last bytes go out, since regfacade may start its next transfer the
        moment they arrive (counting after the close counted that one twice)."""
        if state.get("blob") and not state.get("ended"):
            state["ended"] = True
            with self.lock:
                self.inflight -= 1

    def _serve(self, c):
        blob = False
        state = {}
        try:
            c.settimeout(120)
            f = c.makefile("rb")
            line = f.readline(65536)
            if not line:
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            headers = {}
            while True:
                h = f.readline(65536)
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            path = urlsplit(target).path
            rule = self._take(method, path)
            blob = "/blobs/" in path
            with self.lock:
                self.log.append({"method": method, "path": path, "range": headers.get("range"),
                                 "time": time.time(), "fault": rule.kind if rule else None})
                if blob:
                    self.inflight += 1
                    self.max_inflight = max(self.max_inflight, self.inflight)
                    state["blob"] = True
            self._respond(c, method, target, headers, rule, state)
        except (OSError, ValueError):
            pass
        finally:
            self._end_inflight(state)
            with self.lock:
                self.conns.discard(c)
            try:
                c.close()
            except OSError:
                pass

    def _wait(self, seconds):
        self.released.wait(seconds)

    def _respond(self, c, method, target, headers, rule, state=None):
        state = state if state is not None else {}
        kind = rule.kind if rule else None
        kw = rule.kw if rule else {}
        if kind in ("hang", "delay"):
            self._wait(kw.get("seconds", 30))
            if kind == "hang" or self.stopping.is_set():
                return
            kind = None
        if kind == "status":
            st = kw["status"]
            code = {429: "TOOMANYREQUESTS"}.get(st, "UNKNOWN")
            body = json.dumps({"errors": [{"code": code, "message": f"fault proxy says {st}"}]}).encode()
            hdr = [f"HTTP/1.1 {st} Fault", "Content-Type: application/json",
                   f"Content-Length: {len(body)}", "Connection: close"]
            if "retry_after" in kw:
                ra = kw["retry_after"]
                hdr.append(f"Retry-After: {ra() if callable(ra) else ra}")
            c.sendall(("\r\n".join(hdr) + "\r\n\r\n").encode() + (b"" if method == "HEAD" else body))
            return
        up = http.client.HTTPConnection(self.up_host, self.up_port, timeout=120)
        try:
            fwd = {k: v for k, v in headers.items()
                   if k in ("accept", "range", "authorization", "user-agent")}
            up.request(method, target, headers=fwd)
            resp = up.getresponse()
            out = [f"HTTP/1.1 {resp.status} {resp.reason}"]
            for k, v in resp.getheaders():
                if k.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                    out.append(f"{k}: {v}")
            out.append("Connection: close")
            c.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            if method == "HEAD":
                return
            if not (200 <= resp.status < 300) or method != "GET":
                kind = None
            sent = 0
            chunk = resp.read(65536)
            while True:
                if not chunk:
                    return
                ahead = resp.read(65536)
                if not ahead:
                    self._end_inflight(state)
                if kind == "corrupt":
                    at = kw.get("at", 1000)
                    if sent <= at < sent + len(chunk):
                        i = at - sent
                        chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                if kind in ("reset", "truncate", "stall") and sent + len(chunk) >= kw["after"]:
                    c.sendall(chunk[:kw["after"] - sent])
                    if kind == "reset":
                        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    elif kind == "truncate":
                        c.shutdown(socket.SHUT_WR)
                    else:
                        self._wait(kw.get("seconds", 120))
                    return
                if kind == "trickle":
                    rate = kw["rate"]
                    piece = max(1, rate // 10)
                    for i in range(0, len(chunk), piece):
                        if self.stopping.is_set():
                            return
                        part = chunk[i:i + piece]
                        c.sendall(part)
                        time.sleep(len(part) / rate)
                else:
                    c.sendall(chunk)
                sent += len(chunk)
                chunk = ahead
        finally:
            up.close()


@pytest.fixture
def proxy_factory():
    made = []

    def make(upstream_url):
        p = FaultProxy(upstream_url).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def start_rf(procs, tmp_path, upstreams, name="regfacade", cache=None, **extra):
    """A regfacade whose cache section is cache (dir filled in)."""
    cache_dir = str(tmp_path / f"{name}-cache")
    cache_cfg = {"dir": cache_dir, "tag_ttl_seconds": 3600}
    cache_cfg.update(cache or {})
    cfg = {"cache": cache_cfg, "upstreams": upstreams}
    if len(upstreams) > 1:
        cfg["default_upstream"] = next(iter(upstreams))
    cfg.update(extra)
    rf = Regfacade(procs, str(tmp_path), cfg, name=name)
    rf.cache_dir = cache_dir
    return rf.start()


def blob_files(cache_dir):
    """{digest: size} of cache/blobs."""
    out = {}
    root = os.path.join(cache_dir, "blobs", "sha256")
    for d, _, files in os.walk(root):
        for f in files:
            try:
                out["sha256:" + f] = os.path.getsize(os.path.join(d, f))
            except OSError:  # evicted meanwhile
                pass
    return out


def tmp_files(cache_dir):
    d = os.path.join(cache_dir, "tmp")
    out = {}
    for f in os.listdir(d) if os.path.isdir(d) else ():
        try:
            out[f] = os.path.getsize(os.path.join(d, f))
        except OSError:  # committed or removed meanwhile
            pass
    return out


def stream_get(host, path, abort_after=None, headers=None, timeout=300, pause=None):
    """GET path, hashing the body as it arrives. Returns (status, length, digest);
    abort_after=N closes the connection after N body bytes ("aborted");
    pause=(n, event): after n bytes, wait for the event before reading on."""
    hostname, port = host.split(":")
    conn = http.client.HTTPConnection(hostname, int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        h = hashlib.sha256()
        n = 0
        while True:
            b = r.read(256 * 1024)
            if not b:
                break
            h.update(b)
            n += len(b)
            if abort_after is not None and n >= abort_after:
                conn.sock.shutdown(socket.SHUT_RDWR)
                return r.status, n, "aborted"
            if pause is not None and n >= pause[0]:
                pause[1].wait(60)
                pause = None
        return r.status, n, "sha256:" + h.hexdigest()
    finally:
        conn.close()


def assert_cache_correct(rf):
    """Every cached file hashes to its name; no spool is left over but
    those of running fetches."""
    verify_cache(rf.cache_dir)


# ---------------------------------------------------------------------------
# faults x clients (real docker-registry behind the proxy)
# ---------------------------------------------------------------------------

# fault -> (rules on the layer blob (path placeholder LAYER) or everything, expect success,
#           extra config)
FAULTS = {
    "reset-mid-body": ([("reset", "LAYER", {"after": 300000, "times": 2})], True, {}),
    "503-burst": ([("status", None, {"status": 503, "times": 3})], True, {}),
    "429-retry-after": ([("status", "LAYER", {"status": 429, "retry_after": 1, "times": 1}),
                         ("status", "MANIFEST", {"status": 429, "times": 1, "method": "HEAD",
                                                 "retry_after": lambda: formatdate(time.time() + 2,
                                                                                   usegmt=True)})],
                        True, {}),
    "hang": ([("hang", "LAYER", {"seconds": 30, "times": 1})], True, {}),
    "truncated-body": ([("truncate", "LAYER", {"after": 400000, "times": 1})], True, {}),
    "trickle": ([("trickle", "LAYER", {"rate": 300, "times": 1})], True, {}),
    "wrong-bytes": ([("corrupt", "LAYER", {"at": 5000})], False, {}),
}


def apply_faults(proxy, fault, info):
    layer = re.escape(info["layers"][0]["digest"])
    for kind, where, kw in FAULTS[fault][0]:
        kw = dict(kw)
        path = {"LAYER": f"/blobs/{layer}$", "MANIFEST": "/manifests/", None: None}[where]
        proxy.add(kind, path=path, method=kw.pop("method", None), times=kw.pop("times", None), **kw)


@pytest.mark.parametrize("client", ["skopeo", "ctr"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_pull_through_fault(fault, client, procs, tmp_path, plain_registry, proxy_factory,
                            containerd):
    info = plain_registry.images["oci"]
    layer = info["layers"][0]["digest"]
    proxy = proxy_factory(plain_registry.url)
    ok_expected = FAULTS[fault][1]
    # Stream while resuming (every blob is sent as it arrives); a wrong blob is
    # verified whole first (4 MiB), so the client gets a clean 502 DIGEST_INVALID.
    limits = {"verify_before_send_bytes": 4 * MiB if fault == "wrong-bytes" else 0}
    rf = start_rf(procs, tmp_path, {"up": {"url": proxy.url}},
                  upstream_client={"low_speed_seconds": 2, "low_speed_bytes": 1024, "retries": 4,
                                   "retry_budget_seconds": 20},
                  limits=limits)
    apply_faults(proxy, fault, info)
    ref = f"{rf.host}/{info['repo']}:{info['tag']}"
    t0 = time.time()
    if client == "skopeo":
        out = str(tmp_path / "copy")
        r = clients.skopeo_copy(f"docker://{ref}", f"oci:{out}:{info['tag']}",
                                extra=["--preserve-digests"], check=False, timeout=180)
        ok, err = r.returncode == 0, r.stderr
        if ok:
            check_copied_layout(out, info["tag"], info, preserved=True)
    else:
        ns = containerd.new_namespace()
        try:
            r = containerd.pull(ref, namespace=ns, check=False, timeout=180)
            ok, err = r.returncode == 0, r.stderr + r.stdout[-2000:]
            if ok:
                listed = containerd.ctr("images", "ls", namespace=ns).stdout
                assert info["manifest_digest"] in listed, listed
        finally:
            containerd.remove_namespace(ns)
    elapsed = time.time() - t0
    faults_seen = [x for x in proxy.log if x["fault"]]
    assert faults_seen, f"the fault never happened: {proxy.log}"
    if ok_expected:
        assert ok, f"{client} failed through {fault}: {err}\n{diag(rf)}"
        # The layer is cached, whole and right.
        assert blob_files(rf.cache_dir).get(layer) == info["layers"][0]["size"], diag(rf)
        if fault in ("reset-mid-body", "truncated-body", "trickle"):
            resumed = [x for x in proxy.requests("GET", re.escape(layer)) if x["range"]]
            assert resumed and all(re.fullmatch(r"bytes=[1-9][0-9]*-", x["range"]) for x in resumed), \
                proxy.log
        if fault == "429-retry-after":
            assert elapsed >= 1.0
    else:
        assert not ok, f"{client} succeeded although every copy of the layer was corrupt"
        assert re.search(r"DIGEST_INVALID|digest|502|Bad Gateway|unexpected EOF", err, re.I), err
        print(f"{client} error through {fault}: {err[-600:]}")
        assert layer not in blob_files(rf.cache_dir)
    assert_cache_correct(rf)


# ---------------------------------------------------------------------------
# coalescing
# ---------------------------------------------------------------------------

def test_fifty_clients_one_cold_big_blob_one_upstream_get(procs, tmp_path, plain_registry,
                                                         proxy_factory):
    info = plain_registry.images["big"]
    lay = info["layers"][0]
    assert lay["size"] > 100 * MiB
    proxy = proxy_factory(plain_registry.url)
    rf = start_rf(procs, tmp_path, {"up": {"url": proxy.url}})
    path = f"/v2/{info['repo']}/blobs/{lay['digest']}"
    # The upstream takes 2 s to answer: every client arrives while the blob is cold.
    proxy.add("delay", path=re.escape(lay["digest"]), seconds=2, times=1)

    results = [None] * 50

    def client(i, **kw):
        try:
            results[i] = stream_get(rf.host, path, **kw)
        except Exception as e:  # noqa: BLE001
            results[i] = e

    # Client 0 starts the fetch, then goes away after 1 MiB.
    first = threading.Thread(target=client, args=(0,), kwargs={"abort_after": MiB})
    first.start()
    assert wait_until(lambda: proxy.count("GET", re.escape(lay["digest"])) == 1, timeout=10)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(1, 50)]
    for t in threads:
        t.start()
    first.join(timeout=120)
    for t in threads:
        t.join(timeout=300)
    assert results[0] is not None and not isinstance(results[0], Exception), results[0]
    assert results[0][2] == "aborted"
    bad = [(i, r) for i, r in enumerate(results[1:], 1)
           if isinstance(r, Exception) or r != (200, lay["size"], lay["digest"])]
    assert not bad, f"{len(bad)} clients got wrong answers: {bad[:3]}\n{diag(rf)}"
    gets = proxy.requests("GET", re.escape(lay["digest"]))
    assert len(gets) == 1, gets
    assert blob_files(rf.cache_dir).get(lay["digest"]) == lay["size"]
    assert_cache_correct(rf)


def test_client_that_started_the_fetch_leaves_fetch_goes_on(procs, tmp_path, fake_upstream,
                                                            proxy_factory):
    data = random_bytes(24 * MiB, "starter leaves")
    d = fake_upstream.put_blob("acme/app", data)
    proxy = proxy_factory(fake_upstream.url)
    proxy.add("trickle", path=re.escape(d), rate=40 * MiB, times=1)  # about 0.6 s for the body
    rf = start_rf(procs, tmp_path, {"fake": {"url": proxy.url}})
    st, n, got = stream_get(rf.host, f"/v2/acme/app/blobs/{d}", abort_after=256 * 1024)
    assert st == 200 and got == "aborted"
    # Nobody else asks: the fetch still completes into the cache.
    assert wait_until(lambda: blob_files(rf.cache_dir).get(d) == len(data), timeout=30), diag(rf)
    assert proxy.count("GET", re.escape(d)) == 1
    r = request(rf.host, "GET", f"/v2/acme/app/blobs/{d}")
    assert r.status == 200 and r.body == data
    assert proxy.count("GET", re.escape(d)) == 1
    assert_cache_correct(rf)


def test_concurrent_tag_resolutions_coalesce(procs, tmp_path, fake_upstream):
    img = fake_upstream.add_image("acme/coal", "v1", layer_sizes=[1000])
    tag_path = "/v2/acme/coal/manifests/v1"
    rf = start_rf(procs, tmp_path, {"fake": {"url": fake_upstream.url}})
    # The first tag request (a HEAD) waits 1.5 s upstream; everyone else arrives meanwhile.
    fake_upstream.misbehave(tag_path, "hang", seconds=1.5, times=1)
    results = [None] * 20

    def get(i):
        try:
            results[i] = request(rf.host, "GET", tag_path, timeout=30)
        except Exception as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=get, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in results:
        assert not isinstance(r, Exception) and r.status == 200 and r.body == img.manifest, r
        assert r.header("Docker-Content-Digest") == img.digest
    assert fake_upstream.count("HEAD", tag_path) == 1, fake_upstream.counts()
    assert fake_upstream.count("GET", tag_path) == 0
    assert fake_upstream.count("GET", f"/v2/acme/coal/manifests/{img.digest}") == 1, fake_upstream.counts()
    # And the same for a manifest by digest, cold.
    img2 = fake_upstream.add_image("acme/coal", "v2", layer_sizes=[1000])
    dpath = f"/v2/acme/coal/manifests/{img2.digest}"
    fake_upstream.misbehave(dpath, "hang", seconds=1.5, times=1)
    results = [None] * 10
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, request(rf.host, "GET", dpath, timeout=30))) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(r is not None and r.status == 200 and r.body == img2.manifest for r in results), results
    assert fake_upstream.count("GET", dpath) == 1, fake_upstream.counts()


# ---------------------------------------------------------------------------
# retries, Retry-After, budget, mirrors
# ---------------------------------------------------------------------------

def test_429_retry_after_seconds_and_http_date_are_waited_out(procs, tmp_path, fake_upstream):
    img = fake_upstream.add_image("acme/busy", "v1", layer_sizes=[5000])
    rf = start_rf(procs, tmp_path, {"fake": {"url": fake_upstream.url}})
    lay = img.layers[0]
    bpath = f"/v2/acme/busy/blobs/{lay.digest}"
    fake_upstream.misbehave(bpath, "status", status=429, retry_after=2, times=1)
    t0 = time.time()
    r = request(rf.host, "GET", bpath, timeout=30)
    assert r.status == 200 and r.body == lay.data, r
    assert 1.9 <= time.time() - t0 < 10
    assert fake_upstream.count("GET", bpath) == 2

    tpath = "/v2/acme/busy/manifests/v1"
    fake_upstream.misbehave(tpath, "status", status=429,
                            retry_after=formatdate(time.time() + 2, usegmt=True), times=1)
    t0 = time.time()
    r = request(rf.host, "GET", tpath, timeout=30)
    assert r.status == 200 and r.body == img.manifest, r
    assert 0.9 <= time.time() - t0 < 10  # an HTTP-date has a one-second resolution
    assert_cache_correct(rf)


def test_retry_budget_bounds_the_wait(procs, tmp_path, fake_upstream):
    img = fake_upstream.add_image("acme/down", "v1", layer_sizes=[5000])
    lay = img.layers[0]
    bpath = f"/v2/acme/down/blobs/{lay.digest}"
    rf = start_rf(procs, tmp_path, {"fake": {"url": fake_upstream.url}},
                  upstream_client={"retries": 20, "retry_budget_seconds": 3})
    fake_upstream.misbehave(bpath, "status", status=503)
    t0 = time.time()
    r = request(rf.host, "GET", bpath, timeout=30)
    took = time.time() - t0
    assert r.status in (502, 503), r
    assert b"retry budget" in r.body, r
    assert 1.0 <= took < 6, took
    # A 503 burst shorter than the budget is invisible to the client.
    fake_upstream.behave(bpath)
    fake_upstream.misbehave(bpath, "status", status=503, times=3)
    r = request(rf.host, "GET", bpath, timeout=30)
    assert r.status == 200 and r.body == lay.data, r
    assert_cache_correct(rf)


def test_mirrors_take_over(procs, tmp_path, plain_registry, proxy_factory, fake_upstream):
    info = plain_registry.images["oci"]
    dead = f"http://127.0.0.1:{free_port()}"
    failing = proxy_factory(plain_registry.url)
    failing.add("status", status=503)
    rf = start_rf(procs, tmp_path, {"up": {"url": dead, "mirrors": [failing.url, plain_registry.url]}})
    # skopeo through an upstream whose url is down and whose first mirror answers 503.
    out = str(tmp_path / "copy")
    r = clients.skopeo_copy(f"docker://{rf.host}/{info['repo']}:{info['tag']}", f"oci:{out}:x",
                            extra=["--preserve-digests"], check=False, timeout=120)
    assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
    check_copied_layout(out, "x", info, preserved=True)
    assert failing.count() >= 1
    assert_cache_correct(rf)

    # A reset mid-body on the main URL: the resume goes to the mirror.
    big = plain_registry.images["big"]["layers"][0]
    main = proxy_factory(plain_registry.url)
    main.add("reset", path=re.escape(big["digest"]), after=20 * MiB)
    mirror = proxy_factory(plain_registry.url)
    rf2 = start_rf(procs, tmp_path, {"up": {"url": main.url, "mirrors": [mirror.url]}}, name="rf-mirror")
    st, n, got = stream_get(rf2.host, f"/v2/{plain_registry.images['big']['repo']}/blobs/{big['digest']}")
    assert (st, n, got) == (200, big["size"], big["digest"]), diag(rf2)
    assert main.count("GET", re.escape(big["digest"])) == 1
    resumed = mirror.requests("GET", re.escape(big["digest"]))
    assert len(resumed) == 1 and resumed[0]["range"] and resumed[0]["range"] != "bytes=0-", resumed
    assert_cache_correct(rf2)


# ---------------------------------------------------------------------------
# stale serving
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("status", [503, 429])
def test_stale_tag_served_with_warning_within_limit(status, procs, tmp_path, fake_upstream):
    img = fake_upstream.add_image("acme/stale", "v1", layer_sizes=[1000])
    tpath = "/v2/acme/stale/manifests/v1"
    rf = start_rf(procs, tmp_path, {"fake": {"url": fake_upstream.url}},
                  cache={"tag_ttl_seconds": 1, "stale_max_seconds": 2})
    r = request(rf.host, "GET", tpath)
    assert r.status == 200 and r.header("Warning") is None, r
    fake_upstream.misbehave(tpath, "status", status=status, retry_after=60)
    time.sleep(1.2)  # past the TTL: the upstream is asked, and fails
    t0 = time.time()
    r = request(rf.host, "GET", tpath, timeout=30)
    assert r.status == 200 and r.body == img.manifest, r
    assert r.header("Docker-Content-Digest") == img.digest
    assert (r.header("Warning") or "").startswith("299 - "), r
    assert time.time() - t0 < 2, "a stale answer at hand, yet the failing upstream was retried"
    time.sleep(3.5)  # now past stale_max_seconds (whole seconds: keep a margin)
    r = request(rf.host, "GET", tpath, timeout=30)
    if status == 429:  # passed on (60 s is beyond the retry budget)
        assert r.status == 429 and r.header("Retry-After") == "60", r
    else:
        assert r.status in (502, 503), r
    assert r.header("Warning") is None


def test_stale_serving_off(procs, tmp_path, fake_upstream):
    fake_upstream.add_image("acme/nostale", "v1", layer_sizes=[1000])
    tpath = "/v2/acme/nostale/manifests/v1"
    rf = start_rf(procs, tmp_path, {"fake": {"url": fake_upstream.url}},
                  cache={"tag_ttl_seconds": 1, "stale_max_seconds": 0},
                  upstream_client={"retries": 0})
    assert request(rf.host, "GET", tpath).status == 200
    fake_upstream.misbehave(tpath, "status", status=503)
    time.sleep(1.2)
    r = request(rf.host, "GET", tpath, timeout=30)
    assert r.status in (502, 503) and r.header("Warning") is None, r


# ---------------------------------------------------------------------------
# the bounded cache
# ---------------------------------------------------------------------------

def test_eviction_under_small_cap_spares_blob_being_read(procs, tmp_path, fake_upstream):
    blobs = {k: random_bytes(24 * MiB, f"evict {k}") for k in "ABCD"}
    dg = {k: fake_upstream.put_blob("acme/evict", v) for k, v in blobs.items()}
    rf = start_rf(procs, tmp_path, {"fake": {"url": fake_upstream.url}},
                  cache={"max_bytes": 60 * MiB})
    path = {k: f"/v2/acme/evict/blobs/{d}" for k, d in dg.items()}

    def get_cached(k):
        r = request(rf.host, "GET", path[k])
        assert r.status == 200 and r.body == blobs[k]
        # Clients get the last byte once the digest is verified; the commit follows.
        assert wait_until(lambda: dg[k] in blob_files(rf.cache_dir), timeout=10), diag(rf)

    get_cached("A")
    # A slow client of A (from the cache, by sendfile): it reads 1 MiB, then waits.
    go_on = threading.Event()
    res = {}
    reader = threading.Thread(target=lambda: res.setdefault(
        "A", stream_get(rf.host, path["A"], pause=(MiB, go_on))))
    reader.start()
    try:
        time.sleep(0.5)
        get_cached("B")
        get_cached("C")
        # 72 MiB > 60 MiB: the least recently used (A) is being read, so B went.
        files = blob_files(rf.cache_dir)
        assert dg["A"] in files and dg["C"] in files and dg["B"] not in files, (files, diag(rf))
        assert sum(files.values()) <= 60 * MiB
    finally:
        go_on.set()
        reader.join(timeout=60)
    assert res["A"] == (200, 24 * MiB, dg["A"])
    time.sleep(0.3)  # the response is freed, its fd closed
    get_cached("D")
    files = blob_files(rf.cache_dir)
    assert dg["A"] not in files and dg["C"] in files and dg["D"] in files, files
    assert sum(files.values()) <= 60 * MiB
    # An evicted blob is fetched again, whole and right.
    get_cached("B")
    assert sum(blob_files(rf.cache_dir).values()) <= 60 * MiB
    assert_cache_correct(rf)


def test_kill9_during_fetch_then_restart(procs, tmp_path, plain_registry, proxy_factory):
    info = plain_registry.images["big"]
    lay = info["layers"][0]
    proxy = proxy_factory(plain_registry.url)
    proxy.add("stall", path=re.escape(lay["digest"]), after=8 * MiB, times=1)
    rf = start_rf(procs, tmp_path, {"up": {"url": proxy.url}})
    path = f"/v2/{info['repo']}/blobs/{lay['digest']}"
    t = threading.Thread(target=lambda: _swallow(stream_get, rf.host, path, timeout=60))
    t.start()
    assert wait_until(lambda: any(s >= 8 * MiB for s in tmp_files(rf.cache_dir).values()),
                      timeout=30), (tmp_files(rf.cache_dir), diag(rf))
    procs.stop(rf.proc, sig=signal.SIGKILL)
    rf.proc = None
    proxy.clear()
    t.join(timeout=60)
    assert lay["digest"] not in blob_files(rf.cache_dir)
    assert tmp_files(rf.cache_dir), "the killed fetch's spool should still be there"
    assert_cache_correct(rf)

    rf.start()  # same config, same cache
    assert tmp_files(rf.cache_dir) == {}, "partial spools must be removed at start"
    out = str(tmp_path / "copy")
    r = clients.skopeo_copy(f"docker://{rf.host}/{info['repo']}:{info['tag']}", f"oci:{out}:x",
                            extra=["--preserve-digests"], check=False, timeout=300)
    assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
    check_copied_layout(out, "x", info, preserved=True)
    assert blob_files(rf.cache_dir).get(lay["digest"]) == lay["size"]
    assert_cache_correct(rf)


def test_second_process_on_one_cache_is_refused_first_keeps_committing(procs, tmp_path, plain_registry,
                                                                       proxy_factory):
    """One process per cache folder: a second regfacade on the same cache.dir
    exits non-zero naming the first one's PID (written in DIR/lock), and
    leaves tmp/ alone: the first one's spool in progress is committed."""
    info = plain_registry.images["big"]
    lay = info["layers"][0]
    proxy = proxy_factory(plain_registry.url)
    proxy.add("stall", path=re.escape(lay["digest"]), after=8 * MiB, times=1)
    rf = start_rf(procs, tmp_path, {"up": {"url": proxy.url}})
    with open(os.path.join(rf.cache_dir, "lock")) as f:
        assert f.read().strip() == str(rf.proc.pid)
    path = f"/v2/{info['repo']}/blobs/{lay['digest']}"
    got = {}
    t = threading.Thread(target=lambda: got.update(r=_swallow(stream_get, rf.host, path, timeout=120)))
    t.start()
    assert wait_until(lambda: any(s >= 8 * MiB for s in tmp_files(rf.cache_dir).values()),
                      timeout=30), (tmp_files(rf.cache_dir), diag(rf))
    spools = tmp_files(rf.cache_dir)

    # the same config (so the same cache.dir) on another port
    cfg2 = dict(rf.config, listen=f"127.0.0.1:{free_port()}")
    cfg2_path = str(tmp_path / "second.json")
    with open(cfg2_path, "w") as f:
        json.dump(cfg2, f)
    second = procs.start("second", [REGFACADE, "serve", "--config", cfg2_path])

    def second_settled():  # exited, or (wrongly) serving
        if second.poll() is not None:
            return True
        try:
            return request(cfg2["listen"], "GET", "/v2/", timeout=2).status == 200
        except OSError:
            return False

    assert wait_until(second_settled, timeout=60)
    out = open(second.log_path).read()
    assert second.poll() is not None, f"a second regfacade on {rf.cache_dir} is serving:\n{out}"
    assert second.returncode != 0
    assert f"PID {rf.proc.pid}" in out and rf.cache_dir in out, out
    assert set(spools) <= set(tmp_files(rf.cache_dir)), "the first process's spool was removed"

    # the first one goes on: the stalled fetch resumes, completes, is committed
    proxy.clear()
    t.join(timeout=120)
    assert got.get("r") == (200, lay["size"], lay["digest"]), (got, diag(rf))
    assert wait_until(lambda: blob_files(rf.cache_dir).get(lay["digest"]) == lay["size"], timeout=30), diag(rf)
    oci = plain_registry.images["oci"]
    r = request(rf.host, "GET", f"/v2/{oci['repo']}/manifests/{oci['manifest_digest']}")
    assert r.status == 200 and r.header("Docker-Content-Digest") == oci["manifest_digest"], r
    assert_cache_correct(rf)
    # once the first has stopped, the folder is free again
    rf.stop()
    rf.start()
    assert request(rf.host, "HEAD", f"/v2/{info['repo']}/blobs/{lay['digest']}").status == 200


def _swallow(fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except Exception:  # noqa: BLE001 - the server is killed under it
        return None


# ---------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------

def test_max_concurrent_fetches_waits_not_fails(procs, tmp_path, fake_upstream, proxy_factory):
    blobs = [random_bytes(200000, f"cap {i}") for i in range(6)]
    dgs = [fake_upstream.put_blob("acme/cap", b) for b in blobs]
    proxy = proxy_factory(fake_upstream.url)
    proxy.add("delay", path="/blobs/", seconds=0.7)
    rf = start_rf(procs, tmp_path, {"fake": {"url": proxy.url}},
                  upstream_client={"max_concurrent_fetches": 2})
    res = [None] * 6

    def get(i):
        res[i] = request(rf.host, "GET", f"/v2/acme/cap/blobs/{dgs[i]}", timeout=60)

    threads = [threading.Thread(target=get, args=(i,)) for i in range(6)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i, r in enumerate(res):
        assert r is not None and r.status == 200 and r.body == blobs[i], r
    assert proxy.max_inflight == 2, proxy.max_inflight
    assert time.time() - t0 >= 3 * 0.7 - 0.1  # three waves of two
    assert_cache_correct(rf)


def test_trickling_upstream_is_cut_by_low_speed_limit(procs, tmp_path, fake_upstream, proxy_factory):
    data = random_bytes(300000, "trickle")
    d = fake_upstream.put_blob("acme/slow", data)
    proxy = proxy_factory(fake_upstream.url)
    proxy.add("trickle", path=re.escape(d), rate=200)
    rf = start_rf(procs, tmp_path, {"fake": {"url": proxy.url}},
                  upstream_client={"low_speed_seconds": 1, "low_speed_bytes": 2000, "retries": 1,
                                   "retry_budget_seconds": 10})
    t0 = time.time()
    r = request(rf.host, "GET", f"/v2/acme/slow/blobs/{d}", timeout=60)
    took = time.time() - t0
    # Every attempt trickles: cut after ~1 s each, two attempts, then a clear error.
    assert r.status == 504, r
    assert b"low" in r.body.lower() or b"timeout" in r.body.lower() or b"timed out" in r.body.lower(), r
    assert took < 10, took
    assert proxy.count("GET", re.escape(d)) == 2
    assert d not in blob_files(rf.cache_dir)
    assert_cache_correct(rf)


# ---------------------------------------------------------------------------
# streaming while the upstream stalls
# ---------------------------------------------------------------------------

def test_bytes_before_an_upstream_stall_reach_the_client_during_it(procs, tmp_path, fake_upstream,
                                                                  proxy_factory):
    """regfacade writes a blob to its spool in 256 KiB chunks: bytes short of
    a chunk must still reach the client while the upstream sends nothing
    more (a stalled or slow registry), not only when it goes on."""
    data = random_bytes(3 * MiB, "stall mid-chunk")
    d = fake_upstream.put_blob("acme/stall", data)
    proxy = proxy_factory(fake_upstream.url)
    stall_at = 300000  # 256 KiB and 37,856 bytes: one full chunk and a partial one
    proxy.add("stall", path=re.escape(d), after=stall_at, seconds=60, times=1)
    rf = start_rf(procs, tmp_path, {"fake": {"url": proxy.url}})
    got = {"n": 0, "status": None, "body": b""}

    def read():
        conn = http.client.HTTPConnection(rf.host.split(":")[0], int(rf.host.split(":")[1]), timeout=90)
        try:
            conn.request("GET", f"/v2/acme/stall/blobs/{d}")
            r = conn.getresponse()
            got["status"] = r.status
            parts = []
            while True:
                b = r.read1(65536)
                if not b:
                    break
                parts.append(b)
                got["n"] += len(b)
            got["body"] = b"".join(parts)
        finally:
            conn.close()

    t = threading.Thread(target=read)
    t.start()
    try:
        # Every byte the upstream sent before it stalled, while it still stalls
        # (but one: readers stay a byte behind the spool until the digest is
        # checked, so the last byte of a blob always waits for it).
        assert wait_until(lambda: got["n"] >= stall_at - 1, timeout=10), (got["n"], diag(rf))
        assert got["n"] == stall_at - 1, got["n"]
        assert not proxy.released.is_set()
    finally:
        proxy.release()
        t.join(timeout=60)
    assert got["status"] == 200
    assert got["body"] == data
    assert blob_files(rf.cache_dir).get(d) == len(data)
    assert_cache_correct(rf)


def test_spool_write_failure_fails_the_fetch_caches_nothing_and_serves_on(procs, tmp_path, fake_upstream):
    """A spool that cannot be written (here: a 2 MiB file-size limit on the
    process, so the write past it fails with EFBIG, as on a full disk): the
    client's stream is cut, the log says which spool, where and why, nothing
    is cached, and the server goes on serving."""
    big = random_bytes(3 * MiB, "spool write fails")
    small = random_bytes(300000, "spool write fine")
    d_big = fake_upstream.put_blob("acme/full", big)
    d_small = fake_upstream.put_blob("acme/full", small)
    cache_dir = str(tmp_path / "cache")
    rf = Regfacade(procs, str(tmp_path), {"cache": {"dir": cache_dir}, "upstreams": {"fake": {"url": fake_upstream.url}}})
    rf.proc = procs.start(rf.name, ["prlimit", f"--fsize={2 * MiB}", "--", REGFACADE, "serve",
                                    "--config", rf.config_path])
    wait_http(rf.url + "/v2/", timeout=20)

    got = {}
    try:
        got["r"] = stream_get(rf.host, f"/v2/acme/full/blobs/{d_big}", timeout=60)
    except (http.client.HTTPException, OSError) as e:  # cut mid-body
        got["error"] = e
    assert "error" in got or got["r"][1] < len(big), got
    assert wait_until(lambda: "write at byte 2097152: File too large" in rf.log(), timeout=10), rf.log()
    line = next(l for l in rf.log().splitlines() if "File too large" in l)
    # Which blob, which spool file, where in it and why.
    assert f"blob {d_big} from upstream fake failed" in line and "caching it failed: spool /" in line, line
    assert d_big not in blob_files(cache_dir)

    r = request(rf.host, "GET", f"/v2/acme/full/blobs/{d_small}", timeout=30)
    assert r.status == 200 and r.body == small
    assert blob_files(cache_dir).get(d_small) == len(small)
    assert tmp_files(cache_dir) == {}, "the failed spool is removed"
    verify_cache(cache_dir)
