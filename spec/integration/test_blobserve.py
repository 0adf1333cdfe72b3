"""blobserve: files from inside image layers over HTTP.

A real docker-registry holds images this module writes itself (a small OCI
layout writer, then `skopeo copy`):

  bs/web:v1     two gzip layers of web assets; the upper one overrides
                index.html, deletes old.txt by whiteout, makes static/ opaque,
                whites out docs/guide/ and adds a symlink
  bs/web-v2s2   the same image as Docker schema2 (skopeo --format v2s2)
  bs/multi:v1   an index: linux/amd64 -> bs/web's manifest, linux/arm64 -> another
  bs/zstd:v1    one tar+zstd layer
  bs/sparse:v1  a GNU sparse file (pax 1.0) with a 3 MiB hole
  bs/evil:v1    a hostile layer: ../ entries, absolute and escaping symlinks,
                hard links out of the tree, a file through a symlinked folder
  bs/cold:v1    two bigger layers (for 20 concurrent cold requests)
  bs/big1, bs/big2  one 20 MiB layer each (eviction under a small cap)

Requests go through curl (GET, HEAD, Range, If-None-Match) or, for raw
paths curl would normalise, through http.client. Every process is started
through a ProcessGroup and stopped by PID.
"""
import gzip
import hashlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import tarfile
import threading
import time

import pytest

import harness
import registries
from harness import ProcessGroup, Regfacade, free_port, wait_http
from oci_layout import D, F, H, L, Layout, push, rbytes, tar_bytes

ORIGIN_PLACEHOLDER = b"ORIGIN_PLACEHOLDER"
ORIGIN = b"https://ide.example.test"
BIG = 20 * 1024 * 1024


WEB_LOWER = [
    F("index.html", b"<html>lower index</html>\n"),
    F("app.js", b"console.log('app');\n"),
    F("style.css", b"body { color: black; }\n"),
    F("old.txt", b"to be deleted by a whiteout\n"),
    F("data.bin", rbytes(65536, 1)),
    D("static"),
    F("static/logo.svg", b"<svg>lower logo</svg>\n"),
    D("docs"),
    F("docs/index.html", b"docs index\n"),
    F("docs/guide/page.html", b"guide page\n"),
    F("deep/" + "d" * 120 + "/long-" + "x" * 150 + ".txt", b"a long name through PAX\n"),
    F("caf\u00e9.txt", b"non-ASCII name\n"),
    L("assets", "/static"),
    F("/abs.txt", b"an absolute name, confined\n"),
]
WEB_UPPER = [
    F("index.html", b"<html><base href=\"ORIGIN_PLACEHOLDER/\">upper index ORIGIN_PLACEHOLDER</html>\n"),
    F(".wh.old.txt", b""),
    F("static/.wh..wh..opq", b""),
    F("static/new.svg", b"<svg>upper logo</svg>\n"),
    F("docs/.wh.guide", b""),
    L("latest.js", "app.js"),
]
ARM_LAYER = [F("index.html", b"arm64 index\n")]
ZSTD_LAYER = [F("hello.txt", b"hello from a zstd layer\n"), F("index.html", b"zstd index\n")]
COLD_LOWER = [F("blob.bin", rbytes(6 * 1024 * 1024, 2)), F("index.html", b"cold index\n")]
COLD_UPPER = [F("app.js", b"cold app\n"), F("more.bin", rbytes(4 * 1024 * 1024, 3))]


def evil_layer(host_dir):
    return [
        D("etc"),
        F("etc/passwd", b"image passwd\n"),
        L("abs-link", "/etc/passwd"),
        L("rel-escape", "../../../../../../../../etc/passwd"),
        L("dir-escape", "../../../../../../../../etc"),
        F("../escape.txt", b"escaped!\n"),
        F("../../escape-dir/x.txt", b"escaped!\n"),
        H("hl-out", "../../../../etc/passwd"),
        H("hl-abs", "/etc/passwd"),
        L("outdir", host_dir),
        F("outdir/pwned.txt", b"pwned\n"),
        L("loop1", "loop2"),
        L("loop2", "loop1"),
        {"name": "dev-null", "type": tarfile.CHRTYPE},
        F("ok.txt", b"ok\n"),
    ]


SPARSE_SIZE = 4 * 1024 * 1024


def sparse_tar(d):
    """A GNU tar (pax sparse 1.0) of a 4 MiB file with a hole: "HEAD" at 0,
    "TAIL" at 3 MiB, zeros elsewhere."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "sparse.bin"), "wb") as f:
        f.write(b"HEAD")
        f.seek(3 * 1024 * 1024)
        f.write(b"TAIL")
        f.truncate(SPARSE_SIZE)
    return subprocess.run(["tar", "--sparse", "--format=pax", "-cf", "-", "-C", d, "sparse.bin"],
                          capture_output=True, check=True).stdout


class Images:
    """What the registry holds: digests and expected contents."""


@pytest.fixture(scope="module")
def bs_registry(tmp_path_factory):
    """A docker-registry seeded with the blobserve images; stopped (by PID)
    when the module ends."""
    work = str(tmp_path_factory.mktemp("bs-registry"))
    group = ProcessGroup(work)
    try:
        reg = registries.start_registry(group, os.path.join(work, "registry"), name="bs-registry")
        host_dir = str(tmp_path_factory.mktemp("bs-host-target"))
        lay = Layout(os.path.join(work, "layout"))
        im = Images()
        im.registry = reg
        im.host_dir = host_dir
        web, im.web_layers = lay.manifest([(WEB_LOWER, "gzip"), (WEB_UPPER, "gzip")])
        im.web_digest = web["digest"]
        lay.tag("web", web)
        arm, _ = lay.manifest([(ARM_LAYER, "gzip")], arch="arm64")
        lay.tag("multi", lay.index([(web, "amd64"), (arm, "arm64")]))
        z, im.zstd_layers = lay.manifest([(ZSTD_LAYER, "zstd")])
        lay.tag("zstd", z)
        sp, _ = lay.manifest([(sparse_tar(os.path.join(work, "sparse")), "gzip")])
        lay.tag("sparse", sp)
        e, im.evil_layers = lay.manifest([(evil_layer(host_dir), "gzip")])
        lay.tag("evil", e)
        cold, im.cold_layers = lay.manifest([(COLD_LOWER, "gzip"), (COLD_UPPER, "gzip")])
        lay.tag("cold", cold)
        im.big = {}
        for n in (1, 2):
            data = rbytes(BIG, 10 + n)
            m, layers = lay.manifest([([F("big.bin", data), F("small.txt", b"small %d\n" % n)], "gzip")])
            lay.tag(f"big{n}", m)
            im.big[n] = {"sha": hashlib.sha256(data).hexdigest(), "layer": layers[0]}
        push(lay, "web", reg.host, "bs/web:v1")
        push(lay, "web", reg.host, "bs/web-v2s2:v1", ["--format", "v2s2"])
        push(lay, "multi", reg.host, "bs/multi:v1", ["--all"])
        push(lay, "zstd", reg.host, "bs/zstd:v1")
        push(lay, "sparse", reg.host, "bs/sparse:v1")
        push(lay, "evil", reg.host, "bs/evil:v1")
        push(lay, "cold", reg.host, "bs/cold:v1")
        push(lay, "big1", reg.host, "bs/big1:v1")
        push(lay, "big2", reg.host, "bs/big2:v1")
        yield im
    finally:
        group.stop_all()


class Blobserve:
    def __init__(self, rf, port, cache_dir):
        self.rf = rf
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.cache_dir = cache_dir

    def stats(self):
        return json.loads(curl(self.url + "/_stats")[2])

    def layer_dirs(self):
        d = os.path.join(self.cache_dir, "layers")
        return set(os.listdir(d)) if os.path.isdir(d) else set()

    def log(self):
        with open(self.rf.proc.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")


@pytest.fixture
def blobserve(procs, tmp_path, bs_registry):
    """Factory: start regfacade with a blobserve section (merged over the
    defaults below); returns a Blobserve. Its log is printed on failure."""
    started = []

    def start(name="bs", wait_ready=False, cache_dir=None, **section):
        port = free_port()
        cache = cache_dir or os.path.join(str(tmp_path), f"{name}-cache")
        bs = {"listen": f"127.0.0.1:{port}",
              "repositories": ["bs/web", "bs/web-v2s2", "bs/multi", "bs/zstd", "bs/sparse", "bs/evil",
                               "bs/cold", "bs/big1", "bs/big2"],
              "replacements": {"bs/web": [{"path": "/index.html", "search": ORIGIN_PLACEHOLDER.decode(),
                                           "replacement": ORIGIN.decode()}]}}
        bs.update(section)
        cfg = {"cache": {"dir": cache}, "upstreams": {"reg": {"url": bs_registry.registry.url}},
               "blobserve": bs}
        rf = Regfacade(procs, str(tmp_path), cfg, name=name)
        started.append(rf)
        rf.start()
        b = Blobserve(rf, port, bs.get("cache", {}).get("dir", os.path.join(cache, "blobserve")))
        wait_http(b.url + "/readyz", timeout=60 if wait_ready else 20, ok=(200,) if wait_ready else (200, 503))
        return b

    yield start
    for rf in started:
        print(f"----- {rf.name} log tail -----\n{harness.log_tail(rf.proc, 6000) if rf.proc else ''}")


def curl(url, *args, method=None):
    """(status, headers {lowercase: value}, body bytes) via the curl CLI."""
    import tempfile
    with tempfile.NamedTemporaryFile(prefix="bs-curl-") as out:
        argv = ["curl", "-sS", "--path-as-is", "-D", "-", "-o", out.name, "--max-time", "120"]
        if method == "HEAD":
            argv.append("-I")  # curl writes the headers to -o as well: use the status and headers only
        p = subprocess.run(argv + list(args) + [url], capture_output=True, timeout=180)
        assert p.returncode == 0, f"curl {url}: {p.stderr.decode(errors='replace')}"
        body = open(out.name, "rb").read()
    head = p.stdout.decode("latin-1")
    blocks = [b for b in head.split("\r\n\r\n") if b.strip()]
    lines = blocks[-1].split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers, body


def raw_get(port, path, method="GET"):
    """A request with the path exactly as given (no client normalisation)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.putrequest(method, path, skip_accept_encoding=True)
        c.endheaders()
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# ---------------------------------------------------------------------------

def test_files_resolve_through_both_layers(blobserve, bs_registry):
    b = blobserve()
    u = b.url + "/bs/web:v1"
    st, h, body = curl(u + "/index.html")
    assert st == 200
    # the upper layer's index.html, with the replacement applied at extraction
    assert body == b"<html><base href=\"" + ORIGIN + b"/\">upper index " + ORIGIN + b"</html>\n"
    assert h["content-type"].startswith("text/html")
    assert h["content-length"] == str(len(body))
    st, h, body = curl(u + "/")
    assert st == 200 and b"upper index" in body  # a folder serves its index.html
    st, h, body = curl(u + "/app.js")
    assert (st, body) == (200, b"console.log('app');\n")
    assert h["content-type"].startswith("text/javascript")
    st, h, _ = curl(u + "/style.css")
    assert st == 200 and h["content-type"].startswith("text/css")
    st, _, body = curl(u + "/latest.js")  # a relative symlink of the upper layer
    assert (st, body) == (200, b"console.log('app');\n")
    # whiteout: old.txt is gone; opaque static/: the lower logo is hidden
    assert curl(u + "/old.txt")[0] == 404
    assert curl(u + "/static/logo.svg")[0] == 404
    st, h, body = curl(u + "/static/new.svg")
    assert (st, body) == (200, b"<svg>upper logo</svg>\n") and h["content-type"] == "image/svg+xml"
    # an absolute symlink of the lower layer resolves inside the image
    st, _, body = curl(u + "/assets/new.svg")
    assert (st, body) == (200, b"<svg>upper logo</svg>\n")
    # a whited-out folder, and its still-visible parent
    assert curl(u + "/docs/guide/page.html")[0] == 404
    st, _, body = curl(u + "/docs/")
    assert (st, body) == (200, b"docs index\n")
    # a folder without the trailing slash redirects to it
    st, h, _ = curl(u + "/docs")
    assert st == 301 and h["location"] == "/bs/web:v1/docs/"
    st, h, _ = curl(u)
    assert st == 301 and h["location"] == "/bs/web:v1/"
    # PAX long names and a non-ASCII name
    long = "deep/" + "d" * 120 + "/long-" + "x" * 150 + ".txt"
    assert curl(u + "/" + long)[2] == b"a long name through PAX\n"
    assert curl(u + "/caf%C3%A9.txt")[2] == b"non-ASCII name\n"
    assert curl(u + "/abs.txt")[2] == b"an absolute name, confined\n"
    assert curl(u + "/missing.txt")[0] == 404
    assert curl(u + "/app.js/x")[0] == 404
    assert curl(u + "/app.js/")[0] == 404
    # by digest: the same files
    st, h, body = curl(f"{b.url}/bs/web@{bs_registry.web_digest}/app.js")
    assert (st, body) == (200, b"console.log('app');\n")


def test_head_range_and_conditional_get(blobserve, bs_registry):
    b = blobserve()
    data = WEB_LOWER[4]["data"]
    tag_url = b.url + "/bs/web:v1/data.bin"
    dig_url = f"{b.url}/bs/web@{bs_registry.web_digest}/data.bin"
    st, h, body = curl(tag_url)
    assert st == 200 and body == data
    assert h["content-type"] == "application/octet-stream"
    assert h["accept-ranges"] == "bytes"
    etag = h["etag"]
    layer_hex = bs_registry.web_layers[0][7:]  # data.bin is in the lower layer
    assert re.fullmatch(r'"[0-9a-f]{16}-[0-9a-f]{16}"', etag) and etag[1:17] == layer_hex[:16], etag
    assert h["cache-control"] == "public, max-age=60"
    st, h2, body = curl(dig_url)
    assert st == 200 and body == data
    assert h2["cache-control"] == "public, max-age=31536000, immutable"
    assert h2["etag"] == etag  # layer digest + path, whatever the URL named

    st, h, _ = curl(tag_url, method="HEAD")
    assert st == 200
    assert h["content-length"] == str(len(data)) and h["etag"] == etag
    # on the wire: the headers and nothing after them
    with socket.create_connection(("127.0.0.1", b.port), timeout=30) as s:
        s.sendall(b"HEAD /bs/web:v1/data.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest == b""

    st, h, body = curl(tag_url, "-H", "Range: bytes=100-199")
    assert st == 206 and body == data[100:200]
    assert h["content-range"] == f"bytes 100-199/{len(data)}"
    st, h, body = curl(tag_url, "-H", "Range: bytes=-10")
    assert st == 206 and body == data[-10:]
    st, h, body = curl(tag_url, "-H", "Range: bytes=65000-")
    assert st == 206 and body == data[65000:]
    st, h, _ = curl(tag_url, "-H", f"Range: bytes={len(data)}-")
    assert st == 416 and h["content-range"] == f"bytes */{len(data)}"
    # several ranges: ignored, the whole file
    st, _, body = curl(tag_url, "-H", "Range: bytes=0-1,5-6")
    assert st == 200 and body == data
    # If-Range naming another version: the whole file
    st, _, body = curl(tag_url, "-H", "Range: bytes=0-9", "-H", 'If-Range: "other"')
    assert st == 200 and body == data
    st, _, body = curl(tag_url, "-H", "Range: bytes=0-9", "-H", f"If-Range: {etag}")
    assert st == 206 and body == data[:10]

    st, h, body = curl(tag_url, "-H", f"If-None-Match: {etag}")
    assert st == 304 and body == b"" and h["etag"] == etag
    st, _, _ = curl(tag_url, "-H", f'If-None-Match: "nope", W/{etag}')
    assert st == 304
    st, _, body = curl(tag_url, "-H", 'If-None-Match: "nope"')
    assert st == 200 and body == data
    # another file of the same layer has another ETag
    assert curl(b.url + "/bs/web:v1/app.js")[1]["etag"] != etag
    # a small file (sent with the headers, not by sendfile) honours Range too
    js = b"console.log('app');\n"
    st, h, body = curl(b.url + "/bs/web:v1/app.js", "-H", "Range: bytes=8-10")
    assert (st, body, h["content-range"]) == (206, js[8:11], f"bytes 8-10/{len(js)}")
    # ... and with inline_max_bytes 0 every file goes by sendfile, the same bytes
    b0 = blobserve(name="sendfile-only", inline_max_bytes=0)
    st, h, body = curl(b0.url + "/bs/web:v1/app.js", "-H", "Range: bytes=8-10")
    assert (st, body) == (206, js[8:11])
    assert curl(b0.url + "/bs/web:v1/data.bin")[2] == data


def test_url_grammar_and_traversal_refused(blobserve):
    b = blobserve(repositories=["bs/web"])
    host_passwd = open("/etc/passwd", "rb").read()
    for path, want in [
        ("/bs/web/index.html", 400),             # neither tag nor digest
        ("/bs/web:v!/index.html", 400),          # bad tag
        ("/bs/web@sha256:abc/index.html", 400),  # bad digest
        ("/bs/Web:v1/index.html", 400),          # bad repository name
        ("/bs/other:v1/index.html", 403),        # not in blobserve.repositories
        ("/bs/web:v1/../../../../etc/passwd", 400),
        ("/bs/web:v1/static/../../../../etc/passwd", 400),
        ("/bs/web:v1/%2e%2e/%2e%2e/%2e%2e/etc/passwd", 400),
        ("/bs/web:v1/.%2e/.%2E/etc/passwd", 400),
        ("/bs/web:v1/static%2F..%2F..%2Fetc%2Fpasswd", 400),
        ("/bs/web:v1/..%2f..%2fetc%2fpasswd", 400),
        ("/bs/web:v1/a%5c..%5c..%5cetc%5cpasswd", 400),
        ("/bs/web:v1/index.html%00.txt", 400),
        ("/bs/web:v1/./index.html", 400),
        ("/../bs/web:v1/index.html", 400),
        ("/bs/web:v1/.wh.old.txt", 404),         # whiteout markers are not files
        ("/bs/web:v1/static/.wh..wh..opq", 404),
        ("/bs/web:v1/%2e%2e", 400),
    ]:
        st, body = raw_get(b.port, path)
        assert st == want, (path, st, body)
        assert b"root:" not in body and host_passwd not in body
    st, _ = raw_get(b.port, "/bs/web:v1/index.html", method="POST")
    assert st == 405
    # a well-formed request still works after all that
    assert raw_get(b.port, "/bs/web:v1/app.js") == (200, b"console.log('app');\n")


def test_tar_traversal_confined(blobserve, bs_registry):
    b = blobserve()
    u = b.url + "/bs/evil:v1"
    assert curl(u + "/ok.txt")[2] == b"ok\n"
    # absolute and escaping symlinks resolve inside the image: the image's
    # /etc/passwd, never the host's
    for link in ("abs-link", "rel-escape", "dir-escape/passwd", "hl-abs"):
        st, _, body = curl(f"{u}/{link}")
        assert (st, body) == (200, b"image passwd\n"), link
    # ../ entries and a hard link out of the tree were refused at extraction
    for p in ("hl-out", "escape.txt", "escape-dir/x.txt", "outdir/pwned.txt", "loop1", "dev-null"):
        assert curl(f"{u}/{p}")[0] == 404, p
    # nothing was written outside the extraction tree
    assert os.listdir(bs_registry.host_dir) == []
    root = os.path.dirname(b.cache_dir)
    for dirpath, _, files in os.walk(root):
        assert "escape.txt" not in files and "pwned.txt" not in files, dirpath
    assert not os.path.exists(os.path.join(b.cache_dir, "escape-dir"))
    s = b.stats()
    assert s["refused_entries"] >= 4, s  # ../escape.txt, ../../escape-dir/x.txt, hl-out, outdir/pwned.txt
    assert s["extractions"] == 1 and s["extraction_failures"] == 0


def test_concurrent_cold_requests_one_extraction(blobserve, bs_registry):
    b = blobserve(name="cold")
    want = COLD_LOWER[0]["data"]
    results = [None] * 20
    gate = threading.Barrier(20)

    def worker(i):
        gate.wait()
        results[i] = curl(b.url + "/bs/cold:v1/blob.bin")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for st, h, body in results:
        assert st == 200 and body == want
    s = b.stats()
    assert s["extractions"] == 2, s            # one per layer, not one per request
    assert s["blob_fetches_started"] == 2, s   # one download per layer
    assert s["extraction_failures"] == 0
    # every other acquire of a layer found it ready or waited for it (the
    # fast path may count a ready lower layer once more before it defers)
    assert s["waits"] + s["hits"] >= 20 * 2 - 2, s
    # (How many of them waited depends on the machine's speed: not asserted.)
    assert b.log().count("extracted layer") == 2
    assert b.layer_dirs() == {d[7:] for d in bs_registry.cold_layers}


def read_slowly_start(port, path):
    """Open a GET, read the headers and the first bytes, and stop reading:
    the server is left in the middle of sending the file."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    head, rest = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    while len(rest) < 64 * 1024:
        rest += s.recv(65536)
    return s, rest


def test_eviction_under_small_cap_while_reading(blobserve, bs_registry):
    cap = 30 * 1024 * 1024  # one 20 MiB layer fits, two do not
    b = blobserve(name="evict", cache={"max_bytes": cap})
    big1, big2 = bs_registry.big[1], bs_registry.big[2]
    key1, key2 = big1["layer"][7:], big2["layer"][7:]

    sock, got = read_slowly_start(b.port, "/bs/big1:v1/big.bin")
    try:
        # While big1 is being read, big2 is extracted and served: the cap is
        # exceeded, and the held big1 must not be the one evicted.
        st, _, body = curl(b.url + "/bs/big2:v1/big.bin")
        assert st == 200 and hashlib.sha256(body).hexdigest() == big2["sha"]
        s = b.stats()
        assert s["evictions"] == 1 and s["held"] == 1, s
        assert b.layer_dirs() == {key1}, "the layer being read was evicted"
        assert s["bytes"] <= cap
        # finish reading big1: whole and correct
        sock.settimeout(60)
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    finally:
        sock.close()
    assert len(got) == BIG and hashlib.sha256(got).hexdigest() == big1["sha"]
    # big1 is released now: asking for big2 again evicts it instead
    deadline = time.time() + 10
    while b.stats()["held"] != 0 and time.time() < deadline:
        time.sleep(0.05)
    st, _, body = curl(b.url + "/bs/big2:v1/small.txt")
    assert (st, body) == (200, b"small 2\n")
    s = b.stats()
    assert s["extractions"] == 3 and s["evictions"] == 2, s
    assert b.layer_dirs() == {key2}
    assert s["bytes"] <= cap and s["held"] == 0


def test_limits_layer_over_cap_and_replace_file_size(blobserve):
    # A layer that unpacks to more than cache.max_bytes is refused, leaves
    # nothing behind, and is tried again by the next request.
    b = blobserve(name="tiny", cache={"max_bytes": 1024 * 1024})
    for attempt in (1, 2):
        st, _, body = curl(b.url + "/bs/big1:v1/small.txt")
        assert st == 502 and b"blobserve.cache.max_bytes" in body, body
        s = b.stats()
        assert s["extraction_failures"] == attempt and s["extractions"] == 0 and s["layers"] == 0, s
    assert os.listdir(os.path.join(b.cache_dir, "tmp")) == [] and b.layer_dirs() == set()
    assert curl(b.url + "/bs/zstd:v1/hello.txt")[0] == 200  # a small layer still fits
    # A file bigger than max_replace_file_bytes is served unedited.
    b2 = blobserve(name="noedit", max_replace_file_bytes=16)
    st, _, body = curl(b2.url + "/bs/web:v1/index.html")
    assert st == 200 and ORIGIN_PLACEHOLDER in body and ORIGIN not in body
    assert "over max_replace_file_bytes" in b2.log()


def test_prepull_and_readyz(blobserve, bs_registry, tmp_path):
    # A pre-pull that cannot succeed (an unknown tag; a layer cut inside an
    # entry) keeps /readyz at 503, says which and why, and is not retried.
    raw = tar_bytes([F("a.txt", rbytes(2000, 5))])
    lay = Layout(str(tmp_path / "cut"))
    m, _ = lay.manifest([(raw[:1200], "gzip")])
    lay.tag("cut", m)
    push(lay, "cut", bs_registry.registry.host, "bs/web:cut")
    b = blobserve(name="pp-bad", prepull=["bs/web:v1", "bs/web:nope", "bs/web:cut"], wait_for_prepull=True)
    deadline = time.time() + 60
    while b.stats()["prepull_failed"] < 2 and time.time() < deadline:
        time.sleep(0.1)
    s = b.stats()
    assert s["extractions"] == 2 and s["prepull_failed"] == 2 and s["prepull_pending"] == 0, s
    st, _, body = curl(b.url + "/readyz")
    assert st == 503 and b"bs/web:v1" not in body, body
    assert b"pre-pull of bs/web:nope failed (not retried until a reload)" in body, body
    assert b"pre-pull of bs/web:cut failed (not retried until a reload)" in body and b"ends inside" in body, body
    # One attempt each, reported: the pre-pull thread has nothing left to do.
    assert b.log().count("pre-pull of bs/web:nope failed") == 1
    assert b.log().count("pre-pull of bs/web:cut failed") == 1

    # One that can: /readyz turns 200 with the layers already extracted.
    b2 = blobserve(name="pp-good", prepull=["bs/web:v1", f"bs/web@{bs_registry.web_digest}"],
                   wait_for_prepull=True, wait_ready=True)
    s = b2.stats()
    assert s["extractions"] == 2 and s["prepull_pending"] == 0, s
    assert curl(b2.url + "/bs/web:v1/app.js")[0] == 200
    assert b2.stats()["extractions"] == 2  # served from the pre-pulled layers

    # Without wait_for_prepull, ready at once.
    b3 = blobserve(name="pp-nowait", prepull=["bs/web:nope"])
    assert curl(b3.url + "/readyz")[0] == 200


def test_layer_formats_index_zstd_sparse_schema2(blobserve):
    b = blobserve()
    # an index: the linux/amd64 entry (bs/web), not arm64
    st, _, body = curl(b.url + "/bs/multi:v1/app.js")
    assert (st, body) == (200, b"console.log('app');\n")
    st, _, body = curl(b.url + "/bs/multi:v1/index.html")
    assert st == 200 and b"upper index ORIGIN_PLACEHOLDER" in body  # no replacements for bs/multi
    st, _, body = curl(b.url + "/bs/zstd:v1/hello.txt")
    assert (st, body) == (200, b"hello from a zstd layer\n")
    st, _, body = curl(b.url + "/bs/sparse:v1/sparse.bin")
    want = bytearray(SPARSE_SIZE)
    want[0:4] = b"HEAD"
    want[3 * 1024 * 1024:3 * 1024 * 1024 + 4] = b"TAIL"
    assert st == 200 and body == bytes(want)
    st, _, body = curl(b.url + "/bs/web-v2s2:v1/static/new.svg")
    assert (st, body) == (200, b"<svg>upper logo</svg>\n")
    b_arm = blobserve(name="arm", platform="linux/arm64")
    assert curl(b_arm.url + "/bs/multi:v1/index.html")[2] == b"arm64 index\n"


def test_restart_reuses_extracted_layers(blobserve, bs_registry, tmp_path):
    cache = os.path.join(str(tmp_path), "shared-cache")
    b = blobserve(name="first", cache_dir=cache)
    assert curl(b.url + "/bs/web:v1/app.js")[0] == 200
    assert b.stats()["extractions"] == 2
    b.rf.stop()
    # a clean stop synced the trees and recorded this boot
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    assert open(os.path.join(b.cache_dir, "synced-boot")).read().strip() == boot
    b2 = blobserve(name="second", cache_dir=cache)
    st, _, body = curl(b2.url + "/bs/web:v1/index.html")
    assert st == 200 and ORIGIN in body
    s = b2.stats()
    assert s["extractions"] == 0 and s["layers"] == 2, s
    b2.rf.stop()
    # A tree written in another boot that was never synced (a machine
    # crash) is not trusted: removed at start, extracted again.
    key = sorted(b2.layer_dirs())[0]
    meta = os.path.join(b2.cache_dir, "layers", key, "meta")
    text = open(meta).read()
    open(meta, "w").write(text.replace(boot, "00000000-0000-0000-0000-000000000000"))
    b3 = blobserve(name="third", cache_dir=cache)
    assert key not in b3.layer_dirs() and len(b3.layer_dirs()) == 1
    st, _, body = curl(b3.url + "/bs/web:v1/index.html")
    assert st == 200 and ORIGIN in body
    s = b3.stats()
    assert s["extractions"] == 1 and s["layers"] == 2, s


# ---------------------------------------------------------------------------
# Layers whose tar stops after the last entry's data, without the padding to
# 512 bytes and the two zero blocks that end an archive. umoci writes layers
# so; containerd, podman and runc unpack them (GNU tar and Python's tarfile
# complain), and so does blobserve. A cut inside an entry, or a compressed
# stream that stops early, is still refused.

def tar_ends(raw):
    """(end of the last entry's data, that end rounded up to a 512-byte block)"""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        last = tf.getmembers()[-1]
    end = last.offset_data + last.size
    return end, (end + 511) // 512 * 512


def gnu_tar_lists(raw):
    return subprocess.run(["tar", "-tf", "-"], input=raw, capture_output=True).returncode == 0


def layout_layers(lay, tag):
    """The layer digests of lay:tag."""
    blobs = os.path.join(lay, "blobs", "sha256")
    idx = json.load(open(os.path.join(lay, "index.json")))
    desc = next(m for m in idx["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
    man = json.load(open(os.path.join(blobs, desc["digest"][7:])))
    return [d["digest"] for d in man["layers"]]


def layout_layer_tars(lay, tag):
    """The decompressed tars of the layers of lay:tag."""
    blobs = os.path.join(lay, "blobs", "sha256")
    return [gzip.decompress(open(os.path.join(blobs, d[7:]), "rb").read()) for d in layout_layers(lay, tag)]


def test_umoci_layers_without_end_blocks(blobserve, bs_registry, tmp_path, containerd):
    host = bs_registry.registry.host
    # The plainest umoci image: the README's, one file inserted.
    lay = str(tmp_path / "umoci")
    hello = tmp_path / "hello.txt"
    hello.write_text("hello\n")
    for argv in (["init", "--layout", lay], ["new", "--image", f"{lay}:plain"],
                 ["insert", "--image", f"{lay}:plain", str(hello), "/hello.txt"]):
        subprocess.run(["umoci", *argv], check=True, capture_output=True, timeout=120)
    (raw,) = layout_layer_tars(lay, "plain")
    assert not raw.endswith(bytes(1024)) and not gnu_tar_lists(raw), "umoci wrote a complete tar: nothing to test"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{lay}:plain",
                    f"docker://{host}/bs/umoci:v1"], check=True, capture_output=True, timeout=300)
    # This project's own workspace example images (umoci insert, built offline).
    ws = str(tmp_path / "workspace")
    build = subprocess.run([os.path.join(harness.ROOT, "examples", "workspace", "build.sh"), ws, "push", host],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    app_tars = layout_layer_tars(os.path.join(ws, "images"), "app")
    assert not any(gnu_tar_lists(t) for t in app_tars[1:])

    b = blobserve(name="umoci", repositories=["bs/umoci", "acme/app", "acme/ide"], replacements={})
    st, _, body = curl(b.url + "/bs/umoci:v1/hello.txt")
    assert (st, body) == (200, b"hello\n"), body
    st, _, body = curl(b.url + "/acme/app:1.0/app/hello.txt")
    assert (st, body) == (200, b"hello from the user's app image\n"), body
    st, _, body = curl(b.url + "/acme/ide:1.2/ide/version.txt")
    assert (st, body) == (200, b"ide 1.2\n"), body
    st, _, body = curl(b.url + "/acme/ide:1.2/ide/bin/code")
    assert st == 200 and body.startswith(b"#!/bin/sh\n"), body
    st, _, body = curl(b.url + "/acme/app:1.0/bin/busybox")  # the big first layer, with its end blocks
    assert st == 200 and body == open("/bin/busybox", "rb").read()
    s = b.stats()
    layers = {*layout_layers(lay, "plain"), *layout_layers(os.path.join(ws, "images"), "app"),
              *layout_layers(os.path.join(ws, "images"), "ide")}
    # Every layer extracted, none refused. (Not "exactly once": under the
    # sanitizer build one run in about six extracts one layer twice, cause
    # not yet found; what this test is about is that none is refused.)
    assert s["extraction_failures"] == 0 and s["extractions"] >= len(layers), s
    # What blobserve serves is what a runtime unpacks: containerd pulls both
    # images through the same regfacade and reads the same file.
    ns = containerd.new_namespace()
    try:
        containerd.pull(f"{b.rf.host}/bs/umoci:v1", namespace=ns)
        ref = f"{b.rf.host}/acme/app:1.0"
        containerd.pull(ref, namespace=ns)
        r = containerd.run(ref, f"rf-umoci-{ns}", "cat", "/app/hello.txt", namespace=ns, check=False)
        assert r.returncode == 0, f"ctr run failed: {r.stderr}\n{containerd.log()[-3000:]}"
        assert r.stdout == "hello from the user's app image\n"
    finally:
        containerd.remove_namespace(ns)


def test_layer_ends_runtimes_accept_and_cuts_refused(blobserve, bs_registry, tmp_path):
    data = rbytes(1000, 7)
    full = tar_bytes([F("a.txt", b"first\n"), F("last.bin", data)])
    end, padded = tar_ends(full)
    assert not gnu_tar_lists(full[:end])
    accepted = {
        "nopad-gzip": (full[:end], "gzip"),          # what umoci writes
        "nopad-zstd": (full[:end], "zstd"),
        "nopad-plain": (full[:end], None),
        "halfpad-gzip": (full[:end + 10], "gzip"),   # part of the padding
        "noend-gzip": (full[:padded], "gzip"),       # padded, no zero blocks
    }
    refused = {
        "cut-entry": (full[:end - 100], "gzip", None, "ends inside"),
        "cut-header": (full[:padded + 100], "gzip", None, "broken tar"),
        "cut-gzip-trailer": (full[:end], "gzip", lambda z: z[:-8], "decompress"),
        "cut-gzip-deep": (full, "gzip", lambda z: z[:len(z) // 2], "decompress"),
        "cut-zstd": (full[:end], "zstd", lambda z: z[:-3], "decompress"),
    }
    lay = Layout(str(tmp_path / "ends"))
    digests = {}
    for name, (raw, how, *rest) in {**accepted, **refused}.items():
        layer = (raw, how, rest[0]) if rest and rest[0] else (raw, how)
        m, digests[name] = lay.manifest([layer])
        lay.tag(name, m)
        push(lay, name, bs_registry.registry.host, f"bs/ends:{name}")
    b = blobserve(name="ends", repositories=["bs/ends"], replacements={})
    for name, (_, _, _, needle) in refused.items():
        st, _, body = curl(f"{b.url}/bs/ends:{name}/a.txt")
        assert st == 502 and needle.encode() in body, (name, st, body)
        assert digests[name][0][7:] not in b.layer_dirs(), name  # nothing half-extracted is kept
    for name in accepted:
        st, _, body = curl(f"{b.url}/bs/ends:{name}/last.bin")
        assert (st, body) == (200, data), (name, st, body[:200])
        assert curl(f"{b.url}/bs/ends:{name}/a.txt")[2] == b"first\n"
    s = b.stats()
    assert s["extractions"] == len(accepted) and s["extraction_failures"] == len(refused), s


# ---------------------------------------------------------------------------
# blobserve follows reloads: upstreams, credentials and policy options come
# from the configuration generation that is current when a request starts.

SITE_POLICY = """
local regfacade = require "regfacade"
return { resolve = function(req)
  local m = regfacade.config.options.map[req.repository]
  if m then return { upstream = m.upstream, repository = m.repository } end
  return { upstream = "locked" }
end }
"""


def wait_for(pred, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_blobserve_follows_reload(procs, tmp_path, bs_registry):
    # An htpasswd registry holding bs/secret; the first config has the wrong password.
    locked = registries.start_registry(procs, str(tmp_path / "locked"), name="locked", mode="htpasswd",
                                       username="bsuser", password="right-password")
    lay = Layout(str(tmp_path / "secret-layout"))
    m, _ = lay.manifest([([F("secret.txt", b"from the htpasswd registry\n")], "gzip")])
    lay.tag("secret", m)
    push(lay, "secret", locked.host, "bs/secret:v1", ["--dest-creds", locked.creds])
    pw = tmp_path / "pw"
    pw.write_text("wrong-password\n")
    (tmp_path / "site.lua").write_text(SITE_POLICY)
    port = free_port()
    cfg = {"cache": {"dir": str(tmp_path / "cache")},
           "upstreams": {"locked": {"url": locked.url, "username": "bsuser", "password_file": "pw"},
                         "reg": {"url": bs_registry.registry.url}},
           "default_upstream": "locked",
           "policy": {"file": "site.lua", "watch": False,
                      "options": {"map": {"bs/site": {"upstream": "reg", "repository": "bs/zstd"}}}},
           "blobserve": {"listen": f"127.0.0.1:{port}", "repositories": ["bs/secret", "bs/site"],
                         "prepull": ["bs/secret:v1"], "wait_for_prepull": True}}
    rf = Regfacade(procs, str(tmp_path), cfg, name="reload").start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/readyz", timeout=30, ok=(200, 503))
    try:
        # The wrong password: the pre-pull fails and /readyz says why.
        wait_for(lambda: "bs/secret:v1" in rf.log() and "pre-pull of bs/secret:v1 failed" in rf.log(),
                 "the failed pre-pull")
        st, _, body = curl(url + "/readyz")
        assert st == 503 and b"bs/secret:v1" in body, body
        st, _, body = curl(url + "/bs/secret:v1/secret.txt")
        assert st != 200, body
        # Policy options map bs/site to bs/zstd.
        st, _, body = curl(url + "/bs/site:v1/index.html")
        assert (st, body) == (200, b"zstd index\n")

        # Reload: the right password, and bs/site mapped to bs/web.
        pw.write_text("right-password\n")
        rf.config["policy"]["options"]["map"]["bs/site"]["repository"] = "bs/web"
        with open(rf.config_path, "w") as f:
            json.dump(rf.config, f)
        rf.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: reloaded" in rf.log() or "reload rejected" in rf.log(), "the reload")
        assert "reload rejected" not in rf.log()
        st, _, body = curl(url + "/bs/secret:v1/secret.txt")
        assert (st, body) == (200, b"from the htpasswd registry\n"), body
        st, _, body = curl(url + "/bs/site:v1/index.html")  # within the tag TTL: resolved again all the same
        assert st == 200 and b"upper index" in body, body
        # The pre-pull is tried again on the new configuration, and succeeds.
        wait_for(lambda: curl(url + "/readyz")[0] == 200, "/readyz after the reload")
        s = json.loads(curl(url + "/_stats")[2])
        assert s["prepull_pending"] == 0 and s["prepull_failed"] == 0, s
        assert rf.proc.poll() is None
    finally:
        print(f"----- reload log tail -----\n{harness.log_tail(rf.proc, 6000) if rf.proc else ''}")


def test_any_repository_and_unknown_image(blobserve):
    b = blobserve(repositories=[], any_repository=True)
    assert curl(b.url + "/bs/zstd:v1/index.html")[2] == b"zstd index\n"
    st, _, body = curl(b.url + "/bs/nothere:v1/index.html")
    assert st == 404, body
    st, _, _ = curl(b.url + "/bs/web:missing/index.html")
    assert st == 404


def check(tmp_path, section, name="check"):
    cfg = {"cache": {"dir": str(tmp_path / "c")}, "upstreams": {"reg": {"url": "http://127.0.0.1:1"}},
           "blobserve": section}
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return subprocess.run([harness.REGFACADE, "check", "--config", str(p)], capture_output=True, text=True)


@pytest.mark.parametrize("section,needle", [
    ({"listen": "127.0.0.1:5080", "repositories": ["a"], "bogus": 1}, "blobserve.bogus: unknown key"),
    ({"repositories": ["a"]}, "blobserve.listen: required"),
    ({"listen": "127.0.0.1:5080"}, "blobserve.repositories: required"),
    ({"listen": "127.0.0.1:5080", "repositories": ["A"]}, "blobserve.repositories[0]"),
    ({"listen": "127.0.0.1:5080", "repositories": ["a"], "prepull": ["a"]}, "blobserve.prepull[0]"),
    ({"listen": "127.0.0.1:5080", "repositories": ["a"], "prepull": ["b:v1"]}, "not in blobserve.repositories"),
    ({"listen": "127.0.0.1:5080", "repositories": ["a"],
      "replacements": {"a": [{"path": "../x", "search": "s", "replacement": "r"}]}}, "replacements.a[0].path"),
    ({"listen": "127.0.0.1:5080", "repositories": ["a"],
      "replacements": {"a": [{"path": "x", "search": "s", "replacement": "r", "extra": 1}]}},
     "replacements.a[0].extra: unknown key"),
    ({"listen": "127.0.0.1:5080", "repositories": ["a"], "cache": {"max_bytes": 10}}, "blobserve.cache.max_bytes"),
    ({"listen": "127.0.0.1:5080", "repositories": ["a"], "platform": "amd64"}, "blobserve.platform"),
    ({"listen": "127.0.0.1:5080", "repositories": ["a"], "inline_max_bytes": 2097152}, "blobserve.inline_max_bytes"),
])
def test_config_errors(tmp_path, section, needle):
    r = check(tmp_path, section)
    assert r.returncode != 0 and needle in r.stderr, r.stderr


def test_config_ok(tmp_path):
    r = check(tmp_path, {"listen": "127.0.0.1:5080", "repositories": ["ide/web"], "prepull": ["ide/web:1.2"],
                         "wait_for_prepull": True, "cache": {"dir": "bs", "max_bytes": 1 << 30},
                         "replacements": {"ide/web": [{"path": "/index.html", "search": "a",
                                                        "replacement": "b"}]}})
    assert r.returncode == 0, r.stderr


def test_second_process_on_one_blobserve_cache_is_refused(blobserve, procs, tmp_path, bs_registry):
    """One process per blobserve cache folder too: a second regfacade whose
    blobserve.cache.dir is the first one's (its own cache.dir differs)
    exits non-zero naming the first one's PID, and the first keeps serving
    what it extracted."""
    shared = str(tmp_path / "shared-bs-cache")
    first = blobserve(name="bs-first", cache={"dir": shared})
    st, _, body = curl(first.url + "/bs/web:v1/index.html")
    assert st == 200, body
    with open(os.path.join(shared, "lock")) as f:
        assert f.read().strip() == str(first.rf.proc.pid)
    port = free_port()
    cfg = {"cache": {"dir": str(tmp_path / "second-cache")}, "upstreams": {"reg": {"url": bs_registry.registry.url}},
           "blobserve": {"listen": f"127.0.0.1:{port}", "repositories": ["bs/web"], "cache": {"dir": shared}}}
    second = Regfacade(procs, str(tmp_path), cfg, name="bs-second")
    p = procs.start("bs-second", [harness.REGFACADE, "serve", "--config", second.config_path])
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a second regfacade on one blobserve.cache.dir is running")
    out = open(p.log_path).read()
    assert p.returncode != 0 and f"blobserve.cache.dir {shared} is in use by another regfacade (PID " \
        f"{first.rf.proc.pid}" in out, out
    st, _, body = curl(first.url + "/bs/web:v1/index.html")
    assert st == 200, body
