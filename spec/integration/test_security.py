"""Hardening (docs/security.md): every hostile input is refused with the
right status and the server keeps serving.

- header injection through ?ns= and through repository names (CR/LF, NUL,
  other control characters, percent-encoded or raw) -> 400, no injected
  header in the answer;
- paths that climb out of the cache folder -> 400/404, nothing written
  outside the cache;
- a header over limits.header_max_bytes -> 431 (or the connection closed);
  a URL over limits.url_max_bytes -> 414;
- thousands of idle connections, bounded by limits.connections_per_ip and
  limits.max_connections: memory stays flat, other clients are served, and
  limits.header_timeout_seconds cuts them (slowloris: trickled headers too);
- limits.requests_per_second per client IP -> 429 TOOMANYREQUESTS with
  Retry-After, other IPs unaffected;
- the cache folder is 0700 and a symlink in its place is refused;
- "user": the process drops to an unprivileged user after binding and still
  serves;
- client credentials and upstream secrets never appear in the log.
"""
import base64
import json
import os
import pwd
import resource
import socket
import stat
import subprocess
import tempfile
import time

import pytest

from fake_upstream import assert_oci_error, raw_request, request, verify_cache
from harness import REGFACADE, Regfacade, vm_rss_kib

REPO = "good/app"


@pytest.fixture
def good(fake_upstream):
    return fake_upstream.add_image(REPO, "v1", layer_sizes=[2000, 30000])


def healthy(rf, good, src=None):
    """/v2/ and a whole good pull work (from source address src if given)."""
    get = (lambda p: request_from(src, rf.port, p)) if src else (lambda p: request(rf.host, "GET", p))
    r = get("/v2/")
    assert r.status == 200, r
    r = get(f"/v2/{REPO}/manifests/v1")
    assert r.status == 200 and r.body == good.manifest, r
    for b in [good.config] + good.layers:
        r = get(f"/v2/{REPO}/blobs/{b.digest}")
        assert r.status == 200 and r.body == b.data, r


def request_from(src_ip, port, path, timeout=15):
    """GET path from a chosen loopback source address (127.0.0.2, ...)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(src_ip, 0))
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        from fake_upstream import Response
        return Response(r.status, r.headers, r.read())
    finally:
        conn.close()


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


# ================================================================ injection

NS_INJECTIONS = [
    "evil.example%0d%0aSet-Cookie:%20injected=1",
    "evil.example%0aX-Injected:%201",
    "evil.example%0d",
    "a%00b",
    "a%09b",
    "a%7fb",
    "a+b",
    "%",
    "%zz",
    "a" * 300,
]


@pytest.mark.parametrize("ns", NS_INJECTIONS, ids=lambda s: s[:24])
def test_ns_header_injection_refused(fake_upstream, fake_facade, good, ns):
    rf = fake_facade()
    n0 = fake_upstream.count()
    for path in (f"/v2/{REPO}/manifests/v1", f"/v2/{REPO}/blobs/{good.layers[0].digest}", "/v2/"):
        r = request(rf.host, "GET", f"{path}?ns={ns}")
        assert_oci_error(r, 400, "UNSUPPORTED")
        assert r.header("Set-Cookie") is None and r.header("X-Injected") is None, r
        assert r.header("OCI-Namespace") is None, r
    assert fake_upstream.count() == n0
    healthy(rf, good)


NAME_INJECTIONS = [
    "/v2/acme%0d%0aSet-Cookie:%20x=1/app/manifests/v1",
    "/v2/acme/app%0aX-Injected:%201/manifests/v1",
    "/v2/acme%00/app/manifests/v1",
    "/v2/acme/app/manifests/v1%0d%0aX-Injected:%201",
    "/v2/acme/app/blobs/sha256:" + "a" * 64 + "%0d%0aX-Injected:%201",
    "/v2/acme/app/tags/list?last=v1%0d%0aX-Injected:%201",
]


@pytest.mark.parametrize("path", NAME_INJECTIONS, ids=range(len(NAME_INJECTIONS)))
def test_name_header_injection_refused(fake_upstream, fake_facade, good, path):
    rf = fake_facade()
    n0 = fake_upstream.count()
    r = request(rf.host, "GET", path)
    assert r.status == 400, r
    assert r.header("Set-Cookie") is None and r.header("X-Injected") is None, r
    assert b"\r\n" not in r.body and b"\n" not in r.body.rstrip(b"\n"), r
    assert fake_upstream.count() == n0
    healthy(rf, good)


@pytest.mark.parametrize("raw", [
    b"GET /v2/acme\x01app/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/acme/app\x7f/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/acme/\xc3\xa9/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v2/acme/app/manifests/v1\rX-Injected: 1 HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["ctl", "del", "utf8", "bare-cr"])
def test_raw_control_bytes_in_path_refused(fake_upstream, fake_facade, good, raw):
    rf = fake_facade()
    out = raw_request(rf.host, raw, timeout=10)
    if out.startswith(b"HTTP/1."):
        status = int(out.split(b" ", 2)[1])
        assert status in (400, 404), out[:300]
        head = out.split(b"\r\n\r\n", 1)[0]
        assert b"X-Injected" not in head, out[:300]
    healthy(rf, good)


CLIMBS = [
    "/v2/../../../../tmp/rf-escape/manifests/v1",
    "/v2/good/app/blobs/sha256:../../../../../tmp/rf-escape",
    "/v2/good/app/blobs/sha256:..%2F..%2F..%2Frf-escape",
    "/v2/good/app/manifests/..%2F..%2F..%2F..%2Ftmp%2Frf-escape",
    "/v2/good/app/manifests/sha256:" + "../" * 20 + "rf-escape",
    "/v2/%2e%2e/%2e%2e/tmp/rf-escape/tags/list",
]


def test_paths_cannot_climb_out_of_the_cache(fake_upstream, fake_facade, good, tmp_path):
    rf = fake_facade()
    outside_before = set(os.listdir(tmp_path))
    for path in CLIMBS:
        for method in ("GET", "HEAD"):
            r = request(rf.host, method, path)
            assert r.status in (400, 404), (path, r)
    assert not os.path.exists("/tmp/rf-escape")
    assert set(os.listdir(tmp_path)) == outside_before
    healthy(rf, good)
    # Everything the facade wrote is inside its cache folder, under names it chose.
    for d, dirs, files in os.walk(rf.cache_dir):
        for n in files + dirs:
            assert ".." not in n and "/" not in n
    verify_cache(rf.cache_dir)


# ================================================================ sizes

def test_header_and_url_limits(fake_facade, good):
    rf = fake_facade(config={"limits": {"header_max_bytes": 16384, "url_max_bytes": 512}})
    # Under the limits: fine.
    r = request(rf.host, "GET", "/v2/", headers={"X-Fill": "a" * 4000})
    assert r.status == 200, r
    # A 20 KiB header: 431, or the connection closed before any answer.
    out = raw_request(rf.host, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20480 + b"\r\n\r\n")
    assert out == b"" or out.startswith(b"HTTP/1.1 431"), out[:200]
    # Many small headers adding up.
    out = raw_request(rf.host, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" +
                      b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 30) for i in range(1000)) + b"\r\n")
    assert out == b"" or out.startswith(b"HTTP/1.1 431"), out[:200]
    # A URL over url_max_bytes: 414 with an OCI error.
    name = "/".join(["abcdefgh"] * 70)  # 629 bytes, a valid name
    r = request(rf.host, "GET", f"/v2/{name}/manifests/v1")
    assert_oci_error(r, 414, "NAME_INVALID")
    healthy(rf, good)


# ================================================================ connections

def _open_idle(n, port, src="127.0.0.1"):
    """n connected sockets that send nothing (those the server refuses are
    closed by it; we keep whatever we got)."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((src, 0))
            s.connect_ex(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def _closed_by_peer(s):
    try:
        s.setblocking(True)
        s.settimeout(0.05)
        return s.recv(1) == b""
    except (socket.timeout, BlockingIOError):
        return False
    except OSError:
        return True


def test_idle_connection_flood_is_bounded(fake_facade, good):
    # Ten thousand idle connections: the test process
    # needs the file descriptors for them.
    flood = 10000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < flood + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, flood + 500), hard))
        soft = min(hard, flood + 500)
    flood = min(flood, soft - 500)
    rf = fake_facade(config={"limits": {"max_connections": 64, "connections_per_ip": 16,
                                        "header_timeout_seconds": 3}})
    healthy(rf, good)
    time.sleep(0.5)
    rss0 = vm_rss_kib(rf.proc.pid)
    socks = _open_idle(flood, rf.port)
    assert len(socks) >= min(flood, 2000), f"only {len(socks)} connections could be opened"
    try:
        time.sleep(1.5)
        # Other clients (another address) are still served while the flood holds
        # its share of connections.
        healthy(rf, good, src="127.0.0.2")
        rss1 = vm_rss_kib(rf.proc.pid)
        assert rss1 - rss0 < 48 * 1024, f"RSS grew from {rss0} KiB to {rss1} KiB"
        threads = int(proc_status(rf.proc.pid)["Threads"])
        assert threads < 64 + 40, f"{threads} threads for a limit of 64 connections"
        # The header deadline cuts the idle connections the server took.
        time.sleep(4.5)
        still_open = [s for s in socks if not _closed_by_peer(s)]
        assert not still_open, f"{len(still_open)} idle connections still open after the header deadline"
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    healthy(rf, good)
    rss2 = vm_rss_kib(rf.proc.pid)
    assert rss2 - rss0 < 48 * 1024, f"RSS grew from {rss0} KiB to {rss2} KiB after the flood"
    log = rf.log()
    assert "closed" in log and "header_timeout_seconds" in log
    # A flood is counted in the log, not echoed line by line.
    noise = [l for l in log.splitlines() if '"access"' not in l]
    assert len(noise) < 200, f"{len(noise)} log lines for one connection flood"


def test_slowloris_header_trickle_is_cut(fake_facade, good):
    rf = fake_facade(config={"limits": {"header_timeout_seconds": 2, "client_timeout_seconds": 300}})
    s = socket.create_connection(("127.0.0.1", rf.port), timeout=10)
    start = time.time()
    closed_at = None
    try:
        s.sendall(b"GET /v2/ HTTP/1.1\r\n")
        line = b"X-Slow: " + b"a" * 200 + b"\r\n"
        i = 0
        while time.time() - start < 10:
            try:
                s.sendall(line[i % len(line):i % len(line) + 1])
            except OSError:
                closed_at = time.time()
                break
            i += 1
            s.settimeout(0.3)
            try:
                if s.recv(4096) == b"":
                    closed_at = time.time()
                    break
            except socket.timeout:
                pass
            except OSError:
                closed_at = time.time()
                break
    finally:
        s.close()
    assert closed_at is not None, "a client trickling header bytes was never cut"
    assert closed_at - start < 6, f"cut after {closed_at - start:.1f}s for a 2 s header deadline"
    healthy(rf, good)

    # Keep-alive: a fast client makes several requests on one connection;
    # once idle past the deadline, the connection is closed.
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", rf.port, timeout=10)
    for _ in range(3):
        conn.request("GET", "/v2/")
        r = conn.getresponse()
        assert r.status == 200
        r.read()
    sock = conn.sock
    time.sleep(3.5)
    sock.settimeout(2)
    try:
        assert sock.recv(1) == b""
    except OSError:
        pass
    conn.close()
    healthy(rf, good)


def test_rate_limit_per_ip(fake_facade, good):
    rf = fake_facade(config={"limits": {"requests_per_second": 1, "request_burst": 3}})
    time.sleep(3.2)  # the startup probe's token comes back
    path = f"/v2/{REPO}/manifests/v1"
    got = [request(rf.host, "GET", path).status for _ in range(3)]
    assert got == [200, 200, 200], got
    r = request(rf.host, "GET", path)
    assert_oci_error(r, 429, "TOOMANYREQUESTS")
    ra = int(r.header("Retry-After"))
    assert 1 <= ra <= 2, r
    # Another client address has its own bucket.
    assert request_from("127.0.0.2", rf.port, path).status == 200
    # Health probes are never limited.
    assert request(rf.host, "GET", "/healthz").status == 200
    time.sleep(ra + 0.2)
    assert request(rf.host, "GET", path).status == 200


def test_limits_config_errors(tmp_path):
    base = {"cache": {"dir": str(tmp_path / "c")}, "upstreams": {"u": {"url": "http://127.0.0.1:9"}}}
    cases = [
        ({"limits": {"header_max_bytes": 100}}, "limits.header_max_bytes: must be a size from 8192"),
        ({"limits": {"url_max_bytes": 100000}}, "limits.url_max_bytes"),
        ({"limits": {"requests_per_second": -1}}, "limits.requests_per_second"),
        ({"limits": {"header_timeout_secs": 1}}, 'unknown key "header_timeout_secs"'),
        ({"user": "no-such-user-rf"}, 'user: no user "no-such-user-rf"'),
        ({"user": ""}, "user: must be a non-empty string"),
    ]
    for extra, want in cases:
        cfg = dict(base, **extra)
        p = tmp_path / "cfg.json"
        p.write_text(json.dumps(cfg))
        r = subprocess.run([REGFACADE, "check", "--config", str(p)], capture_output=True, text=True)
        assert r.returncode != 0 and want in r.stderr, (extra, r.stderr)
    p.write_text(json.dumps(dict(base, user="nobody", limits={
        "header_max_bytes": 8192, "url_max_bytes": 8192, "connections_per_ip": 0,
        "requests_per_second": 0, "request_burst": 0, "header_timeout_seconds": 0})))
    r = subprocess.run([REGFACADE, "check", "--config", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ================================================================ cache folder

def test_cache_folder_is_private(fake_facade, good, tmp_path):
    pre = tmp_path / "pre-existing"
    pre.mkdir(mode=0o755)
    os.chmod(pre, 0o755)
    rf = fake_facade(config={"cache": {"dir": str(pre)}})
    healthy(rf, good)
    for d, dirs, files in os.walk(pre):
        mode = stat.S_IMODE(os.lstat(d).st_mode)
        assert mode == 0o700, f"{d} has mode {mode:o}"
        for f in files:
            m = stat.S_IMODE(os.lstat(os.path.join(d, f)).st_mode)
            assert m & 0o077 == 0, f"{os.path.join(d, f)} has mode {m:o}"


def test_cache_symlink_refused(procs, tmp_path, fake_upstream):
    real = tmp_path / "real-cache"
    real.mkdir(mode=0o700)
    link = tmp_path / "cache-link"
    link.symlink_to(real)
    cfg = {"cache": {"dir": str(link)}, "upstreams": {"fake": {"url": fake_upstream.url}}}
    rf = Regfacade(procs, str(tmp_path), cfg, name="rf-symlink")
    with pytest.raises(RuntimeError) as e:
        rf.start(timeout=5)
    assert "not a folder" in str(e.value) or "symlink" in str(e.value), str(e.value)
    # A symlink inside the cache (blobs -> elsewhere) is refused too.
    cache = tmp_path / "cache2"
    cache.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache / "blobs").symlink_to(elsewhere)
    cfg["cache"]["dir"] = str(cache)
    rf2 = Regfacade(procs, str(tmp_path), cfg, name="rf-symlink2")
    with pytest.raises(RuntimeError) as e:
        rf2.start(timeout=5)
    assert "blobs" in str(e.value), str(e.value)
    assert os.listdir(elsewhere) == []


# ================================================================ privileges

@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_runs_as_unprivileged_user(procs, fake_upstream, good):
    nobody = pwd.getpwnam("nobody")
    # Folders on the way to the cache must be traversable by nobody (pytest's
    # tmp_path is 0700 root).
    base = tempfile.mkdtemp(prefix="rf-user-")
    os.chmod(base, 0o755)
    try:
        cache = os.path.join(base, "cache")
        os.mkdir(cache, 0o755)
        open(os.path.join(cache, "left-by-root"), "w").close()
        cfg = {"cache": {"dir": cache}, "user": "nobody",
               "upstreams": {"fake": {"url": fake_upstream.url}}}
        rf = Regfacade(procs, base, cfg, name="rf-user").start()
        rf.cache_dir = cache
        st = proc_status(rf.proc.pid)
        assert st["Uid"].split() == [str(nobody.pw_uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(nobody.pw_gid)] * 4, st["Gid"]
        assert st["Groups"].split() in ([], [str(nobody.pw_gid)]), st["Groups"]
        assert st.get("NoNewPrivs") == "1"
        assert st["CapEff"] == "0000000000000000"
        healthy(rf, good)
        for d, dirs, files in os.walk(cache):
            for n in [d] + [os.path.join(d, f) for f in files]:
                s = os.lstat(n)
                assert s.st_uid == nobody.pw_uid, f"{n} owned by uid {s.st_uid}"
        assert stat.S_IMODE(os.lstat(cache).st_mode) == 0o700
        assert "running as user nobody" in rf.log()
    finally:
        subprocess.run(["rm", "-rf", base])


# ================================================================ secrets

def test_no_secret_in_logs(procs, tmp_path, fake_upstream, fake_facade, good):
    up_secret = "upstream-secret-9f8e7d"
    pw_file = tmp_path / "up.pass"
    pw_file.write_text(up_secret + "\n")
    client_pw = "client-password-1a2b3c"
    client_token = "client.token.4d5e6f"
    rf = fake_facade(upstream={"username": "rfuser", "password_file": str(pw_file)})
    basic = "Basic " + base64.b64encode(f"alice:{client_pw}".encode()).decode()
    bearer = f"Bearer {client_token}"
    fake_upstream.misbehave(f"/v2/{REPO}/manifests/broken", "status", status=500)
    for auth in (basic, bearer, "Basic !!!" + client_pw, "Bearer " + client_token + " junk"):
        for path in (f"/v2/{REPO}/manifests/v1", f"/v2/{REPO}/manifests/broken",
                     f"/v2/{REPO}/blobs/sha256:" + "0" * 64, "/v2/NotAName/manifests/v1"):
            r = request(rf.host, "GET", path, headers={"Authorization": auth})
            assert r.status in (200, 400, 404, 502), r
            for secret in (client_pw, client_token, up_secret):
                assert secret.encode() not in r.body
    # The client's credentials never reach the upstream (the default policy
    # maps none); the upstream sees at most the configured ones.
    client_b64 = base64.b64encode(f"alice:{client_pw}".encode()).decode()
    for req in fake_upstream.requests:
        sent = json.dumps(req["headers"])
        assert client_pw not in sent and client_token not in sent and client_b64 not in sent, req
    log = rf.log()
    for secret in (client_pw, client_token, up_secret,
                   base64.b64encode(f"alice:{client_pw}".encode()).decode(),
                   base64.b64encode(f"rfuser:{up_secret}".encode()).decode()):
        assert secret not in log, f"{secret!r} appears in the log"
    healthy(rf, good)
