"""Bad input from clients and from the upstream, per CONTRACT.md: every case
gets a clear OCI error, changes nothing in the cache, and leaves the server
serving (/v2/ and a good pull still work). Upstream misbehaviour comes from
the programmable fake in fake_upstream.py."""
import os
import socket
import struct
import threading
import time

import pytest

from fake_upstream import (
    MT_OCI_MANIFEST, assert_oci_error, cache_files, cache_path, random_bytes, raw_request,
    request, sha256_digest, verify_cache, wait_until,
)
from harness import free_port

MiB = 1024 * 1024
GOOD_REPO = "good/app"


class Env:
    """A fake upstream holding a good image, and a regfacade in front of it."""

    def __init__(self, fake, rf, good, prefix=""):
        self.fake, self.rf, self.good, self.prefix = fake, rf, good, prefix

    def get(self, path, headers=None, method="GET", timeout=30):
        return request(self.rf.host, method, path, headers, timeout=timeout)

    def snapshot(self):
        return cache_files(self.rf.cache_dir)

    def assert_unchanged(self, before, settle=0.3):
        time.sleep(settle)  # a late background write would show up here
        after = cache_files(self.rf.cache_dir)
        assert after == before, f"cache changed: new {sorted(set(after) - set(before))}"
        verify_cache(self.rf.cache_dir)

    def assert_healthy(self, timeout=10):
        r = self.get("/v2/", timeout=timeout)
        assert r.status == 200, r
        g = self.good
        r = self.get(f"{self.prefix}/v2/{GOOD_REPO}/manifests/v1", timeout=timeout)
        assert r.status == 200 and r.body == g.manifest, r
        assert r.header("Docker-Content-Digest") == g.digest, r
        for b in [g.config] + g.layers:
            r = self.get(f"{self.prefix}/v2/{GOOD_REPO}/blobs/{b.digest}", timeout=timeout)
            assert r.status == 200 and r.body == b.data, r
        verify_cache(self.rf.cache_dir)


@pytest.fixture
def env(fake_upstream, fake_facade):
    good = fake_upstream.add_image(GOOD_REPO, "v1", layer_sizes=[2000, 30000])
    return Env(fake_upstream, fake_facade(), good)


def assert_not_reached(fake, before_count):
    assert fake.count() == before_count, \
        f"bad input reached the upstream: {fake.paths_seen()[before_count:]}"


# ================================================================ client input

LONG_NAME = "abcdefghi/" * 29 + "abcdefghij"  # 300 characters, each component valid
assert len(LONG_NAME) == 300

BAD_NAMES = ["Upper/app", "acme/App", "UPPER", "a//b", "abc-", "acme/app-", "-abc", "_abc",
             "acme/.app", "acme/app/", "a" * 300, LONG_NAME]


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: n if len(n) < 20 else f"{len(n)}chars")
def test_malformed_names(env, name):
    before, n0 = env.snapshot(), env.fake.count()
    d = env.good.layers[0].digest
    for path in (f"/v2/{name}/manifests/v1", f"/v2/{name}/manifests/{env.good.digest}",
                 f"/v2/{name}/blobs/{d}", f"/v2/{name}/tags/list"):
        for method in ("GET", "HEAD"):
            r = env.get(path, method=method)
            if method == "HEAD":
                assert r.status == 400, r
            else:
                assert_oci_error(r, 400, "NAME_INVALID")
    assert_not_reached(env.fake, n0)
    env.assert_unchanged(before)
    env.assert_healthy()


TRAVERSALS = [
    "/v2/../etc/passwd",
    "/v2/../../../../etc/passwd",
    "/v2/a/%2e%2e/b/manifests/x",
    "/v2/%2e%2e/%2e%2e/etc/passwd",
    "/v2/good%2Fapp/manifests/v1",
    "/v2/good/app%2F..%2F..%2Fetc/manifests/v1",
    "/v2/..%2F..%2Fetc%2Fpasswd/blobs/sha256:" + "a" * 64,
    "/v2//etc/passwd/manifests/latest",
    "/v2/good/../../etc/passwd/manifests/latest",
    "/v2/good/app/manifests/../../../../etc/passwd",
    "/v2/good/app/blobs/../../../../etc/passwd",
    "/v2/good/app/blobs/sha256:..%2F..%2F..%2Fetc%2Fpasswd",
    "/v2/good/app/manifests/..",
    "/v2/good/./app/manifests/v1",
    "/fake/v2/../../etc/passwd",
    "//etc/passwd",
    "/../etc/passwd",
    "/etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal(env, path):
    before, n0 = env.snapshot(), env.fake.count()
    r = env.get(path)
    assert r.status in (400, 404), r
    # inside /v2/: 400 NAME_INVALID; outside: 404 UNSUPPORTED (CONTRACT.md)
    assert_oci_error(r, r.status, "NAME_INVALID" if r.status == 400 else "UNSUPPORTED")
    assert b"root:" not in r.body, r
    assert_not_reached(env.fake, n0)
    env.assert_unchanged(before)
    env.assert_healthy()


BAD_BLOB_DIGESTS = ["sha256:xyz", "sha256:" + "A" * 64, "sha256:" + "aB" * 32,
                    "md5:d41d8cd98f00b204e9800998ecf8427e", "sha256:" + "a" * 63,
                    "sha256:" + "a" * 65, "sha256:", ":" + "a" * 64, "sha256" + "a" * 64,
                    "notadigest", "sha256:" + "g" * 64]
BAD_MANIFEST_DIGESTS = ["sha256:xyz", "sha256:" + "A" * 64, "md5:d41d8cd98f00b204e9800998ecf8427e",
                        "sha256:" + "a" * 63, "sha256:" + "a" * 65, "sha256:totallywrong"]
BAD_TAGS = ["-tag", ".tag", "a" * 129]


@pytest.mark.parametrize("ref", BAD_BLOB_DIGESTS)
def test_bad_blob_digest(env, ref):
    before, n0 = env.snapshot(), env.fake.count()
    assert_oci_error(env.get(f"/v2/{GOOD_REPO}/blobs/{ref}"), 400, "DIGEST_INVALID")
    assert env.get(f"/v2/{GOOD_REPO}/blobs/{ref}", method="HEAD").status == 400
    assert_not_reached(env.fake, n0)
    env.assert_unchanged(before)
    env.assert_healthy()


@pytest.mark.parametrize("ref", BAD_MANIFEST_DIGESTS)
def test_bad_manifest_digest(env, ref):
    before, n0 = env.snapshot(), env.fake.count()
    assert_oci_error(env.get(f"/v2/{GOOD_REPO}/manifests/{ref}"), 400, "DIGEST_INVALID")
    assert env.get(f"/v2/{GOOD_REPO}/manifests/{ref}", method="HEAD").status == 400
    assert_not_reached(env.fake, n0)
    env.assert_unchanged(before)
    env.assert_healthy()


@pytest.mark.parametrize("tag", BAD_TAGS, ids=lambda t: t if len(t) < 20 else f"{len(t)}chars")
def test_bad_tag(env, tag):
    """No manifest has a name that is not a tag: 404 (the distribution spec's
    answer for a nonexistent manifest), asked of nobody."""
    before, n0 = env.snapshot(), env.fake.count()
    assert_oci_error(env.get(f"/v2/{GOOD_REPO}/manifests/{tag}"), 404, "MANIFEST_UNKNOWN")
    assert env.get(f"/v2/{GOOD_REPO}/manifests/{tag}", method="HEAD").status == 404
    assert_not_reached(env.fake, n0)
    env.assert_unchanged(before)
    env.assert_healthy()


BAD_RANGES = ["bytes=0-1,5-6", "bytes=0-1, 3-4", "bytes=abc", "bytes=1-2-3", "bytes=",
              "bytes=--1", "bytes=-", "bytes=1--2", "bytes=0x10-20", "bytes 0-10", "=0-10"]


@pytest.mark.parametrize("state", ["cold", "cached"])
@pytest.mark.parametrize("rng", BAD_RANGES)
def test_bad_range(env, rng, state):
    data = random_bytes(5000, f"bad range {rng}")
    d = env.fake.put_blob(GOOD_REPO, data)
    path = f"/v2/{GOOD_REPO}/blobs/{d}"
    if state == "cached":
        r = env.get(path)
        assert r.status == 200 and r.body == data, r
        assert wait_until(lambda: os.path.exists(cache_path(env.rf.cache_dir, d)))
    before = env.snapshot()
    assert_oci_error(env.get(path, {"Range": rng}), 416, "UNSUPPORTED")
    env.assert_unchanged(before)
    r = env.get(path, {"Range": "bytes=10-19"})
    assert r.status == 206 and r.body == data[10:20], r
    env.assert_healthy()


def _status_of(raw: bytes):
    if not raw.startswith(b"HTTP/1."):
        return None
    return int(raw.split(b" ", 2)[1])


@pytest.mark.parametrize("shape", ["one 64 KiB header", "2000 headers", "64 KiB URL"])
def test_oversized_request(env, shape):
    before = env.snapshot()
    if shape == "one 64 KiB header":
        req = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n"
        allowed = (431,)
    elif shape == "2000 headers":
        req = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"X-H%d: %s\r\n" % (i, b"v" * 40) for i in range(2000)) + b"\r\n"
        allowed = (431,)
    else:
        req = b"GET /v2/" + b"a" * 65536 + b"/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n"
        allowed = (400, 404, 414, 431)
    raw = raw_request(env.rf.host, req, timeout=10)
    st = _status_of(raw)
    assert st is None or st in allowed, raw[:500]
    env.assert_unchanged(before)
    env.assert_healthy()


@pytest.mark.parametrize("state,how", [("cold", "fin"), ("cold", "rst"), ("cached", "rst"),
                                       ("cached", "stall")])
def test_client_disconnects_mid_blob(env, state, how):
    data = random_bytes(8 * MiB, "big blob")
    d = env.fake.put_blob(GOOD_REPO, data)
    path = f"/v2/{GOOD_REPO}/blobs/{d}"
    if state == "cached":
        r = env.get(path)
        assert r.status == 200 and r.body == data, r
        assert wait_until(lambda: os.path.exists(cache_path(env.rf.cache_dir, d)))
    s = socket.create_connection(("127.0.0.1", env.rf.port), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {env.rf.host}\r\n\r\n".encode())
    got = b""
    while len(got) < MiB:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    if how == "stall":
        # stop reading but keep the connection open: others are still served
        env.assert_healthy()
    if how == "rst":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    env.assert_healthy()
    # the blob is cached correctly or not at all; either way a full GET is right
    wait_until(lambda: os.path.exists(cache_path(env.rf.cache_dir, d)), timeout=3)
    verify_cache(env.rf.cache_dir)
    r = env.get(path)
    assert r.status == 200 and r.header("Content-Length") == str(len(data)), r
    assert r.body == data, f"{len(r.body)} bytes, digest {sha256_digest(r.body)}"
    verify_cache(env.rf.cache_dir)


# ================================================================ upstream misbehaviour


def assert_not_cached(env, *digests):
    for d in digests:
        assert not os.path.exists(cache_path(env.rf.cache_dir, d)), f"{d} was cached"


@pytest.mark.parametrize("by", ["tag", "digest"])
def test_upstream_invalid_json_manifest(env, by):
    bad = env.fake.invalid_json_body()
    bd = env.fake.put_manifest("bad/app", bad, MT_OCI_MANIFEST, tags=["v1"])
    before = env.snapshot()
    ref = "v1" if by == "tag" else bd
    assert_oci_error(env.get(f"/v2/bad/app/manifests/{ref}"), 502, "MANIFEST_INVALID")
    env.assert_unchanged(before)
    assert_not_cached(env, bd)
    env.assert_healthy()
    # the upstream behaves again: the same tag now works
    img = env.fake.add_image("bad/app", "v1")
    r = env.get("/v2/bad/app/manifests/v1")
    assert r.status == 200 and r.body == img.manifest, r


@pytest.mark.parametrize("kind,status,code", [("invalid_json", 502, "MANIFEST_INVALID"),
                                              ("too_big", 502, "MANIFEST_INVALID"),
                                              ("schema1", 415, "UNSUPPORTED")])
def test_upstream_bad_manifest_per_path(env, kind, status, code):
    """Bad manifests through a per-path misbehaviour of the tag path."""
    img = env.fake.add_image("bad/app", "v1")
    paths = ["/v2/bad/app/manifests/v1"]
    env.fake.misbehave(paths, kind)
    before = env.snapshot()
    assert_oci_error(env.get("/v2/bad/app/manifests/v1"), status, code)
    env.assert_unchanged(before)
    env.fake.behave(paths)
    r = env.get("/v2/bad/app/manifests/v1")
    assert r.status == 200 and r.body == img.manifest, r
    env.assert_healthy()


def test_upstream_manifest_over_4mib(env):
    big = env.fake.too_big_body()
    assert len(big) > 4 * MiB
    bd = env.fake.put_manifest("bad/app", big, MT_OCI_MANIFEST, tags=["huge"])
    before = env.snapshot()
    assert_oci_error(env.get("/v2/bad/app/manifests/huge"), 502, "MANIFEST_INVALID")
    assert_oci_error(env.get(f"/v2/bad/app/manifests/{bd}"), 502, "MANIFEST_INVALID")
    env.assert_unchanged(before)
    assert_not_cached(env, bd)
    env.assert_healthy()
    img = env.fake.add_image("bad/app", "huge")
    r = env.get("/v2/bad/app/manifests/huge")
    assert r.status == 200 and r.body == img.manifest, r


def test_manifest_size_limit_edge(fake_upstream, fake_facade):
    limit = 8192
    at = fake_upstream.too_big_body(limit)
    over = fake_upstream.too_big_body(limit + 1)
    assert len(at) == limit and len(over) == limit + 1
    da = fake_upstream.put_manifest("edge/app", at, MT_OCI_MANIFEST, tags=["at"])
    do = fake_upstream.put_manifest("edge/app", over, MT_OCI_MANIFEST, tags=["over"])
    rf = fake_facade(config={"limits": {"manifest_max_bytes": limit}})
    r = request(rf.host, "GET", "/v2/edge/app/manifests/at")
    assert r.status == 200 and r.body == at and r.header("Docker-Content-Digest") == da, r
    assert_oci_error(request(rf.host, "GET", "/v2/edge/app/manifests/over"), 502, "MANIFEST_INVALID")
    assert_oci_error(request(rf.host, "GET", f"/v2/edge/app/manifests/{do}"), 502, "MANIFEST_INVALID")
    assert not os.path.exists(cache_path(rf.cache_dir, do))


@pytest.mark.parametrize("size", [1000, 1 * MiB], ids=["1000B", "1MiB"])
def test_upstream_wrong_bytes_small_blob(env, size):
    good = random_bytes(size, f"small wrong {size}")
    d = sha256_digest(good)
    env.fake.put_blob("bad/app", good[:-1] + bytes([good[-1] ^ 1]), digest=d)
    before = env.snapshot()
    assert_oci_error(env.get(f"/v2/bad/app/blobs/{d}"), 502, "DIGEST_INVALID")
    env.assert_unchanged(before)
    assert_not_cached(env, d)
    env.assert_healthy()
    env.fake.put_blob("bad/app", good)
    r = env.get(f"/v2/bad/app/blobs/{d}")
    assert r.status == 200 and r.body == good, r


def test_upstream_corrupt_blob_per_path(env):
    img = env.fake.add_image("bad/app", "v1", layer_sizes=[3000])
    lay = img.layers[0]
    path = f"/v2/bad/app/blobs/{lay.digest}"
    env.fake.misbehave(path, "corrupt")
    before = env.snapshot()
    assert_oci_error(env.get(path), 502, "DIGEST_INVALID")
    env.assert_unchanged(before)
    assert_not_cached(env, lay.digest)
    env.fake.behave(path)
    r = env.get(path)
    assert r.status == 200 and r.body == lay.data, r
    env.assert_healthy()


def test_upstream_wrong_bytes_big_blob_is_cut(env):
    good = random_bytes(3 * MiB, "big wrong")
    d = sha256_digest(good)
    env.fake.put_blob("bad/app", good[:-1] + bytes([good[-1] ^ 1]), digest=d)
    before = env.snapshot()
    try:
        r = env.get(f"/v2/bad/app/blobs/{d}")
    except (ConnectionError, OSError):
        r = None  # cut before the headers: also fine
    if r is not None and r.status != 200:
        # the whole body arrived before the answer started: a plain 502 is fine too
        assert_oci_error(r, 502, "DIGEST_INVALID")
    elif r is not None:
        assert r.header("Content-Length") == str(len(good)), r
        assert r.error is not None and len(r.body) < len(good), \
            f"the whole corrupt blob was delivered ({len(r.body)} bytes) without a cut"
    env.assert_unchanged(before)
    assert_not_cached(env, d)
    env.assert_healthy()
    env.fake.put_blob("bad/app", good)
    r = env.get(f"/v2/bad/app/blobs/{d}")
    assert r.status == 200 and r.body == good, r


def test_upstream_wrong_manifest_bytes_for_digest(env):
    img = env.fake.add_image("bad/app", "v1")
    bad = img.manifest.replace(b"{", b"{ ", 1)  # valid JSON, another digest
    env.fake.put_manifest("bad/app", bad, MT_OCI_MANIFEST, digest=img.digest)
    before = env.snapshot()
    assert_oci_error(env.get(f"/v2/bad/app/manifests/{img.digest}"), 502, "DIGEST_INVALID")
    env.assert_unchanged(before)
    assert_not_cached(env, img.digest, sha256_digest(bad))
    env.assert_healthy()
    env.fake.put_manifest("bad/app", img.manifest, MT_OCI_MANIFEST)
    r = env.get(f"/v2/bad/app/manifests/{img.digest}")
    assert r.status == 200 and r.body == img.manifest, r


@pytest.mark.parametrize("what", ["small blob", "big blob", "manifest"])
def test_upstream_cuts_connection(env, what):
    """The upstream announces a Content-Length and closes half way, every time."""
    img = env.fake.add_image("cut/app", "v1", layer_sizes=[5000, 3 * MiB])
    if what == "manifest":
        paths = [f"/v2/cut/app/manifests/{img.digest}", "/v2/cut/app/manifests/v1"]
        target, digest, data = f"/v2/cut/app/manifests/{img.digest}", img.digest, img.manifest
    else:
        lay = img.layers[0 if what == "small blob" else 1]
        paths = [f"/v2/cut/app/blobs/{lay.digest}"]
        target, digest, data = paths[0], lay.digest, lay.data
    env.fake.misbehave(paths, "cut")
    before = env.snapshot()
    try:
        r = env.get(target)
    except (ConnectionError, OSError):
        r = None
    if r is not None:
        if r.status == 200:
            assert r.error is not None and len(r.body) < len(data), \
                f"a short upstream body was passed on as complete: {r}"
        else:
            assert_oci_error(r, (502, 504))
    env.assert_unchanged(before)
    assert_not_cached(env, digest)
    env.assert_healthy()
    env.fake.behave(paths)
    r = env.get(target)
    assert r.status == 200 and r.body == data, r


def test_upstream_cuts_connection_once(env):
    """A single cut: the server may retry or resume; the client gets the right
    bytes or an error, and the cache holds the right bytes or nothing."""
    img = env.fake.add_image("cut/app", "v1", layer_sizes=[3 * MiB])
    lay = img.layers[0]
    path = f"/v2/cut/app/blobs/{lay.digest}"
    env.fake.misbehave(path, "cut", times=1)
    try:
        r = env.get(path)
    except (ConnectionError, OSError):
        r = None
    if r is not None and r.status == 200 and r.error is None:
        assert r.body == lay.data, "a complete-looking answer with wrong bytes"
    elif r is not None and r.status != 200:
        assert_oci_error(r, (502, 504))
    time.sleep(0.3)
    verify_cache(env.rf.cache_dir)
    r = env.get(path)
    assert r.status == 200 and r.body == lay.data, r
    env.assert_healthy()


def test_upstream_down(fake_upstream, fake_facade):
    good = fake_upstream.add_image(GOOD_REPO, "v1")
    dead = f"http://127.0.0.1:{free_port()}"
    rf = fake_facade(upstream={"url": dead}, upstreams={"good": {"url": fake_upstream.url}})
    env = Env(fake_upstream, rf, good, prefix="/good")
    before = env.snapshot()
    t0 = time.time()
    for path in ("/v2/acme/app/manifests/v1", f"/v2/acme/app/manifests/{good.digest}",
                 f"/v2/acme/app/blobs/{good.layers[0].digest}", "/v2/acme/app/tags/list"):
        assert_oci_error(env.get(path), 502, "UNKNOWN")
    assert env.get("/v2/acme/app/manifests/v1", method="HEAD").status == 502
    assert time.time() - t0 < 60
    env.assert_unchanged(before)
    env.assert_healthy()


@pytest.mark.parametrize("status", [500, 503])
def test_upstream_5xx(env, status):
    img = env.fake.add_image("flaky/app", "v1")
    lay = img.layers[0]
    paths = ["/v2/flaky/app/manifests/v1", f"/v2/flaky/app/manifests/{img.digest}",
             f"/v2/flaky/app/blobs/{lay.digest}"]
    env.fake.misbehave(paths, "status", status=status)
    before = env.snapshot()
    for p in ("/v2/flaky/app/manifests/v1", f"/v2/flaky/app/blobs/{lay.digest}"):
        assert_oci_error(env.get(p), (502, 503))
    env.assert_unchanged(before)
    env.assert_healthy()
    env.fake.behave(paths)
    r = env.get("/v2/flaky/app/manifests/v1")
    assert r.status == 200 and r.body == img.manifest, r
    r = env.get(f"/v2/flaky/app/blobs/{lay.digest}")
    assert r.status == 200 and r.body == lay.data, r


def test_upstream_429_passes_retry_after(env):
    img = env.fake.add_image("busy/app", "v1")
    lay = img.layers[0]
    paths = ["/v2/busy/app/manifests/v1", f"/v2/busy/app/manifests/{img.digest}",
             f"/v2/busy/app/blobs/{lay.digest}"]
    # A Retry-After longer than the retry budget (upstream_client.retry_budget_seconds,
    # default 30) is not waited out: the 429 and its Retry-After go to the client at once.
    # (Shorter ones are waited out: test_reliability.py.)
    env.fake.misbehave(paths, "status", status=429, retry_after=120)
    before = env.snapshot()
    for p in ("/v2/busy/app/manifests/v1", f"/v2/busy/app/blobs/{lay.digest}"):
        t0 = time.time()
        r = env.get(p)
        assert_oci_error(r, 429, "TOOMANYREQUESTS")
        assert r.header("Retry-After") == "120", r
        assert time.time() - t0 < 5, "a Retry-After beyond the retry budget was waited for"
    env.assert_unchanged(before)
    env.assert_healthy()
    env.fake.behave(paths)
    r = env.get("/v2/busy/app/manifests/v1")
    assert r.status == 200 and r.body == img.manifest, r


def test_upstream_429_without_retry_after(env):
    """Without a Retry-After the rate limit is not waited out; the client's
    429 still carries one (the spec's SHOULD)."""
    img = env.fake.add_image("busy/app", "v1")
    paths = ["/v2/busy/app/manifests/v1", f"/v2/busy/app/manifests/{img.digest}"]
    env.fake.misbehave(paths, "status", status=429)
    before = env.snapshot()
    t0 = time.time()
    r = env.get("/v2/busy/app/manifests/v1")
    assert_oci_error(r, 429, "TOOMANYREQUESTS")
    assert r.header("Retry-After"), f"a 429 SHOULD carry Retry-After: {r}"
    assert time.time() - t0 < 5, "a 429 without Retry-After was waited out"
    env.assert_unchanged(before)
    env.fake.behave(paths)
    r = env.get("/v2/busy/app/manifests/v1")
    assert r.status == 200 and r.body == img.manifest, r


def test_upstream_hang_does_not_block_others(env):
    img = env.fake.add_image("slow/app", "v1", layer_sizes=[4000])
    lay = img.layers[0]
    paths = ["/v2/slow/app/manifests/v1", f"/v2/slow/app/manifests/{img.digest}",
             f"/v2/slow/app/blobs/{lay.digest}"]
    env.fake.misbehave(paths, "hang", seconds=30)
    results = {}

    def pull(key, path):
        try:
            results[key] = env.get(path, timeout=40)
        except Exception as e:  # noqa: BLE001
            results[key] = e

    threads = [threading.Thread(target=pull, args=("manifest", paths[0])),
               threading.Thread(target=pull, args=("blob", paths[2]))]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: env.fake.count(path=paths[0]) + env.fake.count(path=paths[1]) >= 1
                          and env.fake.count(path=paths[2]) >= 1, timeout=5), env.fake.counts()
        t0 = time.time()
        env.assert_healthy(timeout=5)
        assert time.time() - t0 < 5, "a hanging upstream request slowed down everyone else"
    finally:
        env.fake.behave(paths)
        for t in threads:
            t.join(timeout=45)
    r = results["manifest"]
    assert not isinstance(r, Exception) and r.status == 200 and r.body == img.manifest, r
    r = results["blob"]
    assert not isinstance(r, Exception) and r.status == 200 and r.body == lay.data, r
