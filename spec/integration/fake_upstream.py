"""A small programmable OCI registry for integration tests, plus the HTTP
helpers the pull-API tests use against regfacade.

FakeUpstream runs a ThreadingHTTPServer on a free 127.0.0.1 port in a thread
of the test process. Tests register content (blobs, manifests, whole images
and indexes built here with correct digests), read request counts, and tell a
path to misbehave:

    fake = FakeUpstream().start()
    img = fake.add_image("acme/app", "v1", layer_sizes=[1000])
    fake.misbehave(f"/v2/acme/app/blobs/{img.layers[0].digest}", "status", status=503)
    fake.count("GET", "/v2/acme/app/manifests/v1")
    fake.stop()

Misbehaviour kinds (misbehave(path_or_paths, kind, times=None, **kw)):
    status        status=N [retry_after=S] [body=bytes]: answer N with an OCI error body
    invalid_json  a manifest body that is not JSON
    too_big       an OCI manifest of size bytes (default 4 MiB + 1 KiB) that is valid JSON
    schema1       a Docker schema1 manifest (application/vnd.docker.distribution.manifest.v1+prettyjws)
    corrupt       the registered bytes with one byte changed (blobs: last byte flipped, same length;
                  manifests: a space inserted after the first '{', still valid JSON); headers
                  (Docker-Content-Digest) still claim the registered digest
    body          body=bytes [content_type=...] [digest=...]: serve exactly this
    (invalid_json, too_big, schema1 and body bodies are then also served by their own digest,
    as a consistent upstream would, until behave())
    hang          seconds=S (default 60): stall before answering, until release() or stop()
    cut           after=N (default: half of the body): announce the full Content-Length, send
                  N bytes, close the connection
    announce      length=N [send=M] [hold=True]: blobs: announce Content-Length N (the registered
                  bytes' digest header), send M bytes (default 0) of filler, (hold: wait for
                  release() or stop()), close the connection
    chunked       blobs: the body with Transfer-Encoding: chunked and no Content-Length;
                  body=bytes (default: the registered bytes) or repeat=N bytes of filler
`times=K` makes a misbehaviour apply to the first K requests only.

Content-level corruption, independent of which path the client uses
(tag or digest, HEAD then GET):
    put_blob(repo, data, digest=claimed)          bytes that do not match their digest
    put_manifest(repo, body, media_type, tags, digest=claimed)
"""
import gzip
import hashlib
import http.client
import io
import json
import os
import random
import re
import socket
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlsplit

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MT_SCHEMA1_PLAIN = "application/vnd.docker.distribution.manifest.v1+json"

ALL_MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_OCI_INDEX, MT_DOCKER_MANIFEST, MT_DOCKER_LIST)

# The 14 error codes of the distribution spec.
SPEC_ERROR_CODES = {
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED",
    "TOOMANYREQUESTS",
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def random_bytes(n: int, seed) -> bytes:
    return random.Random(seed).randbytes(n)


def make_layer(files: dict) -> tuple:
    """A deterministic gzip'ed tar of {path: bytes}. Returns (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            data = files[name]
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 0
            ti.mode = 0o644
            ti.uname = ti.gname = "root"
            tf.addfile(ti, io.BytesIO(data))
    tar = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=1) as g:
        g.write(tar)
    return gz.getvalue(), sha256_digest(tar)


@dataclass
class Blob:
    digest: str
    data: bytes
    media_type: str = "application/octet-stream"

    @property
    def size(self):
        return len(self.data)

    def descriptor(self):
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass
class Image:
    repo: str
    media_type: str
    manifest: bytes
    digest: str
    config: Blob
    layers: list
    diff_ids: list
    platform: dict

    @property
    def size(self):
        return len(self.manifest)

    def descriptor(self):
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                "platform": self.platform}


@dataclass
class Index:
    repo: str
    media_type: str
    manifest: bytes
    digest: str
    images: list

    @property
    def size(self):
        return len(self.manifest)


@dataclass
class _Repo:
    blobs: dict = field(default_factory=dict)      # digest -> bytes
    manifests: dict = field(default_factory=dict)  # digest -> (bytes, content_type)
    tags: dict = field(default_factory=dict)       # tag -> digest


@dataclass
class _Misbehaviour:
    kind: str
    times: Optional[int]
    kw: dict


_MANIFEST_RE = re.compile(r"^/v2/(.+)/manifests/([^/]+)$")
_BLOB_RE = re.compile(r"^/v2/(.+)/blobs/([^/]+)$")
_TAGS_RE = re.compile(r"^/v2/(.+)/tags/list$")
_REFERRERS_RE = re.compile(r"^/v2/(.+)/referrers/(sha256:[0-9a-f]{64})$")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr, handler, fake):
        self.fake = fake
        self.conns = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def drop_all_connections(self):
        with self.conns_lock:
            conns = list(self.conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-upstream/1"
    timeout = 60

    def log_message(self, fmt, *args):  # quiet
        pass

    # Every method goes through one dispatcher.
    def do_GET(self):
        self.server.fake._handle(self)

    do_HEAD = do_GET
    do_PUT = do_GET
    do_POST = do_GET
    do_DELETE = do_GET
    do_PATCH = do_GET


class FakeUpstream:
    def __init__(self, port=None):
        self.port = port
        self._lock = threading.Lock()
        self._repos = {}
        self._misbehave = {}
        self._shadow = {}  # (repo, digest) -> (body, type) of bodies a misbehaviour served
        self._counts = {}
        self.requests = []  # dicts: method, path, query, headers
        self.tag_page_size = None  # set: tags/list answers pages of this size even without n
        self.referrers = {}  # (repo, subject digest) -> [descriptor]
        self.referrers_api = False  # answer /v2/<name>/referrers/<digest> (else 404, like distribution 2.8)
        self.referrers_filter = True  # apply ?artifactType= itself (and say so)
        self._server = None
        self._thread = None
        self._release = threading.Event()
        self._stopping = threading.Event()

    # ---------------------------------------------------------------- lifecycle
    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        self._stopping.clear()
        self._release.clear()
        self._server = _Server(("127.0.0.1", self.port or 0), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop listening and cut every open connection (keep-alive included),
        so a client sees the upstream as down. Content is kept; start() again
        serves it on the same port."""
        if self._server is None:
            return
        self._stopping.set()
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_all_connections()
        self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    @property
    def running(self):
        return self._server is not None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- content
    def _repo(self, name) -> _Repo:
        return self._repos.setdefault(name, _Repo())

    def put_blob(self, repo, data: bytes, digest=None) -> str:
        """Register a blob; digest defaults to its sha256 (pass another one to
        serve bytes that do not match their digest)."""
        digest = digest or sha256_digest(data)
        with self._lock:
            self._repo(repo).blobs[digest] = data
        return digest

    def put_manifest(self, repo, body: bytes, media_type, tags=(), digest=None) -> str:
        digest = digest or sha256_digest(body)
        with self._lock:
            r = self._repo(repo)
            r.manifests[digest] = (body, media_type)
            for t in tags:
                r.tags[t] = digest
        return digest

    def tag(self, repo, tag, digest):
        with self._lock:
            self._repo(repo).tags[tag] = digest

    def set_tags(self, repo, tags, digest=None):
        """Make repo's tag list exactly tags (all pointing at digest, or at an
        existing manifest)."""
        with self._lock:
            r = self._repo(repo)
            if digest is None:
                digest = next(iter(r.manifests), "sha256:" + "0" * 64)
            r.tags = {t: digest for t in tags}

    def remove_repo(self, repo):
        with self._lock:
            self._repos.pop(repo, None)

    def add_image(self, repo, tag=None, layer_sizes=(200,), docker=False, seed=None,
                  platform=("linux", "amd64"), annotations=None, extra_config=None) -> Image:
        """Build and register a valid image: gzip'ed tar layers each holding
        one file of random bytes of the given size, a config whose diff_ids
        and history match, and an OCI (or Docker schema2) manifest."""
        seed = seed if seed is not None else f"{repo}:{tag}:{docker}:{list(layer_sizes)}"
        layers, diff_ids = [], []
        lmt = MT_DOCKER_LAYER if docker else MT_OCI_LAYER
        for i, n in enumerate(layer_sizes):
            blob, diff_id = make_layer({f"layer{i}/data.bin": random_bytes(n, f"{seed}/{i}")})
            layers.append(Blob(sha256_digest(blob), blob, lmt))
            diff_ids.append(diff_id)
        os_, arch = platform[0], platform[1]
        cfg = {
            "created": "2024-01-01T00:00:00Z",
            "architecture": arch,
            "os": os_,
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Cmd": ["/bin/sh"], "Labels": {"test.seed": str(seed)}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"}
                        for i in range(len(layers))],
        }
        if extra_config:
            cfg.update(extra_config)
        cfg_bytes = canonical_json(cfg)
        config = Blob(sha256_digest(cfg_bytes), cfg_bytes, MT_DOCKER_CONFIG if docker else MT_OCI_CONFIG)
        mt = MT_DOCKER_MANIFEST if docker else MT_OCI_MANIFEST
        man = {"schemaVersion": 2, "mediaType": mt, "config": config.descriptor(),
               "layers": [l.descriptor() for l in layers]}
        if annotations and not docker:
            man["annotations"] = dict(annotations)
        body = canonical_json(man)
        plat = {"architecture": arch, "os": os_}
        if len(platform) > 2:
            plat["variant"] = platform[2]
        for b in [config] + layers:
            self.put_blob(repo, b.data)
        digest = self.put_manifest(repo, body, mt, tags=[tag] if tag else [])
        return Image(repo, mt, body, digest, config, layers, diff_ids, plat)

    def add_index(self, repo, tag, images, docker=False, annotations=None) -> Index:
        mt = MT_DOCKER_LIST if docker else MT_OCI_INDEX
        idx = {"schemaVersion": 2, "mediaType": mt, "manifests": [i.descriptor() for i in images]}
        if annotations and not docker:
            idx["annotations"] = dict(annotations)
        body = canonical_json(idx)
        digest = self.put_manifest(repo, body, mt, tags=[tag] if tag else [])
        return Index(repo, mt, body, digest, list(images))

    # Bodies for misbehaving manifests, also usable with put_manifest.
    @staticmethod
    def invalid_json_body() -> bytes:
        return b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {'

    @staticmethod
    def too_big_body(size=4 * 1024 * 1024 + 1024) -> bytes:
        head = {"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                "config": {"mediaType": MT_OCI_CONFIG, "digest": "sha256:" + "a" * 64, "size": 2},
                "layers": [], "annotations": {"pad": ""}}
        base = canonical_json(head)
        pad = size - len(base)
        head["annotations"]["pad"] = "x" * max(pad, 0)
        return canonical_json(head)

    @staticmethod
    def schema1_body(name="repo", tag="latest") -> bytes:
        return canonical_json({
            "schemaVersion": 1, "name": name, "tag": tag, "architecture": "amd64",
            "fsLayers": [{"blobSum": "sha256:" + "b" * 64}],
            "history": [{"v1Compatibility": "{\"id\":\"x\"}"}],
            "signatures": [{"header": {"alg": "ES256"}, "signature": "AAAA", "protected": "e30"}],
        })

    # ---------------------------------------------------------------- misbehaviour
    def misbehave(self, paths, kind, times=None, **kw):
        if isinstance(paths, str):
            paths = [paths]
        assert kind in ("status", "invalid_json", "too_big", "schema1", "corrupt", "body",
                        "hang", "cut", "announce", "chunked"), kind
        if kind == "hang":
            self._release.clear()
        with self._lock:
            for p in paths:
                self._misbehave[p] = _Misbehaviour(kind, times, kw)

    def behave(self, paths=None):
        """Clear misbehaviour for paths (all when None) and release hangs."""
        with self._lock:
            self._shadow.clear()
            if paths is None:
                self._misbehave.clear()
            else:
                for p in [paths] if isinstance(paths, str) else paths:
                    self._misbehave.pop(p, None)
        self.release()

    def release(self):
        """Let every hanging request go on (they then answer normally)."""
        self._release.set()

    # ---------------------------------------------------------------- counters
    def count(self, method=None, path=None) -> int:
        with self._lock:
            return sum(n for (m, p), n in self._counts.items()
                       if (method is None or m == method) and (path is None or p == path))

    def counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def paths_seen(self):
        with self._lock:
            return [r["path"] for r in self.requests]

    def reset_counts(self):
        with self._lock:
            self._counts.clear()
            self.requests.clear()

    # ---------------------------------------------------------------- serving
    def _take_misbehaviour(self, path):
        with self._lock:
            mb = self._misbehave.get(path)
            if mb is None:
                return None
            if mb.times is not None:
                if mb.times <= 0:
                    return None
                mb.times -= 1
            return mb

    def _handle(self, h: _Handler):
        method = h.command
        parts = urlsplit(h.path)
        path, query = parts.path, parse_qs(parts.query)
        # Drain a request body, if any, so keep-alive stays in sync.
        n = int(h.headers.get("Content-Length") or 0)
        if n:
            h.rfile.read(n)
        with self._lock:
            self._counts[(method, path)] = self._counts.get((method, path), 0) + 1
            self.requests.append({"method": method, "path": path, "query": query,
                                  "headers": dict(h.headers.items())})
        try:
            self._dispatch(h, method, path, query)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def _send(self, h, status, body=b"", headers=None, content_type="application/json",
              cut_after=None, length=None):
        h.send_response(status)
        if content_type:
            h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body) if length is None else length))
        h.send_header("Docker-Distribution-API-Version", "registry/2.0")
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command == "HEAD":
            return
        if cut_after is not None:
            h.wfile.write(body[:cut_after])
            h.wfile.flush()
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        h.wfile.write(body)

    def _send_chunked(self, h, body, repeat, headers):
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Transfer-Encoding", "chunked")
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command == "HEAD":
            return
        chunk = b"z" * 65536
        total = len(body) if repeat is None else repeat
        sent = 0
        while sent < total:
            piece = body[sent:sent + 65536] if repeat is None else chunk[:min(65536, total - sent)]
            h.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sent += len(piece)
        h.wfile.write(b"0\r\n\r\n")

    def _error(self, h, status, code, message, headers=None):
        body = canonical_json({"errors": [{"code": code, "message": message, "detail": None}]})
        self._send(h, status, body, headers)

    def _dispatch(self, h, method, path, query):
        mb = self._take_misbehaviour(path)
        if mb is not None and mb.kind == "hang":
            self._release.wait(mb.kw.get("seconds", 60))
            if self._stopping.is_set():
                h.close_connection = True
                return
            mb = None
        if mb is not None and mb.kind == "status":
            st = mb.kw["status"]
            hdrs = {}
            if "retry_after" in mb.kw:
                hdrs["Retry-After"] = str(mb.kw["retry_after"])
            body = mb.kw.get("body")
            if body is not None:
                self._send(h, st, body, hdrs)
            else:
                code = {404: "BLOB_UNKNOWN" if "/blobs/" in path else "MANIFEST_UNKNOWN", 429: "TOOMANYREQUESTS", 401: "UNAUTHORIZED",
                        403: "DENIED"}.get(st, "UNKNOWN")
                self._error(h, st, code, f"fake upstream says {st}", hdrs)
            return

        if method not in ("GET", "HEAD"):
            return self._error(h, 405, "UNSUPPORTED", "read-only fake")
        if path == "/v2/" or path == "/v2":
            return self._send(h, 200, b"{}")

        m = _TAGS_RE.match(path)
        if m:
            return self._tags(h, m.group(1), query)
        m = _REFERRERS_RE.match(path)
        if m and self.referrers_api:
            return self._referrers(h, m.group(1), m.group(2), query)
        m = _MANIFEST_RE.match(path)
        if m:
            return self._manifest(h, m.group(1), m.group(2), mb)
        m = _BLOB_RE.match(path)
        if m:
            return self._blob(h, m.group(1), m.group(2), mb)
        return self._error(h, 404, "UNSUPPORTED", "no such route")

    def add_referrer(self, repo, subject_digest, descriptor):
        """A referrer of subject_digest in repo, as the referrers API lists it."""
        with self._lock:
            self.referrers.setdefault((repo, subject_digest), []).append(descriptor)

    def _referrers(self, h, name, digest, query):
        with self._lock:
            found = list(self.referrers.get((name, digest), []))
        hdrs = {}
        at = query.get("artifactType", [None])[0]
        if at is not None and self.referrers_filter:
            found = [d for d in found if d.get("artifactType") == at]
            hdrs["OCI-Filters-Applied"] = "artifactType"
        body = canonical_json({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                               "manifests": found})
        self._send(h, 200, body, hdrs, content_type="application/vnd.oci.image.index.v1+json")

    def _tags(self, h, name, query):
        with self._lock:
            r = self._repos.get(name)
            tags = sorted(r.tags) if r else None
        if tags is None:
            return self._error(h, 404, "NAME_UNKNOWN", f"repository {name} not known")
        last = query.get("last", [None])[0]
        if last is not None:
            tags = [t for t in tags if t > last]
        hdrs = {}
        n = query.get("n", [None])[0]
        if n is None and self.tag_page_size:
            n = self.tag_page_size  # an upstream that pages whatever it is asked
        if n is not None:
            n = int(n)
            if len(tags) > n:
                tags = tags[:n]
                hdrs["Link"] = f'</v2/{name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
        body = canonical_json({"name": name, "tags": tags})
        self._send(h, 200, body, hdrs)

    def _manifest(self, h, name, ref, mb):
        body = ctype = digest = None
        with self._lock:
            r = self._repos.get(name)
            if r is not None:
                digest = r.tags.get(ref, ref)
                if digest in r.manifests:
                    body, ctype = r.manifests[digest]
            if body is None and (name, ref) in self._shadow:
                body, ctype = self._shadow[(name, ref)]
                digest = ref
        kind = mb.kind if mb else None
        if kind == "invalid_json":
            body, ctype = self.invalid_json_body(), MT_OCI_MANIFEST
            digest = sha256_digest(body)
        elif kind == "too_big":
            body, ctype = self.too_big_body(mb.kw.get("size", 4 * 1024 * 1024 + 1024)), MT_OCI_MANIFEST
            digest = sha256_digest(body)
        elif kind == "schema1":
            body, ctype = self.schema1_body(name, ref), MT_SCHEMA1
            digest = sha256_digest(body)
        elif kind == "body":
            body = mb.kw["body"]
            ctype = mb.kw.get("content_type", MT_OCI_MANIFEST)
            digest = mb.kw.get("digest", sha256_digest(body))
        if kind in ("invalid_json", "too_big", "schema1", "body"):
            # a consistent upstream: what it served by tag it also serves by digest
            with self._lock:
                self._shadow[(name, digest)] = (body, ctype)
        if body is None:
            return self._error(h, 404, "MANIFEST_UNKNOWN", f"manifest {name}:{ref} not known")
        if kind == "corrupt":
            i = body.index(b"{") + 1
            body = body[:i] + b" " + body[i:]
        cut = None
        if kind == "cut":
            cut = mb.kw.get("after", len(body) // 2)
        self._send(h, 200, body, {"Docker-Content-Digest": digest, "ETag": f'"{digest}"'},
                   content_type=ctype, cut_after=cut)

    def _blob(self, h, name, digest, mb):
        with self._lock:
            r = self._repos.get(name)
            data = r.blobs.get(digest) if r else None
        kind = mb.kind if mb else None
        if kind == "body":
            data = mb.kw["body"]
        if data is None:
            return self._error(h, 404, "BLOB_UNKNOWN", f"blob {digest} not known")
        if kind == "corrupt":
            data = data[:-1] + bytes([data[-1] ^ 0xFF]) if data else b"x"
        size = len(data)
        hdrs = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes", "ETag": f'"{digest}"'}
        if kind == "announce":
            if mb.kw.get("hold"):
                self._send(h, 200, b"\0" * mb.kw.get("send", 0), hdrs, content_type="application/octet-stream",
                           length=mb.kw["length"])
                h.wfile.flush()
                self._release.wait(60)
                h.close_connection = True
                return
            return self._send(h, 200, b"\0" * mb.kw.get("send", 0), hdrs, content_type="application/octet-stream",
                              length=mb.kw["length"], cut_after=mb.kw.get("send", 0))
        if kind == "chunked":
            return self._send_chunked(h, mb.kw.get("body", data), mb.kw.get("repeat"), hdrs)
        status = 200
        rng = h.headers.get("Range")
        if rng:
            span = parse_single_range(rng, size)
            if span == "unsatisfiable":
                hdrs["Content-Range"] = f"bytes */{size}"
                return self._send(h, 416, b"", hdrs)
            if span is not None:
                a, b = span
                data = data[a:b + 1]
                hdrs["Content-Range"] = f"bytes {a}-{b}/{size}"
                status = 206
        cut = None
        if kind == "cut":
            cut = mb.kw.get("after", len(data) // 2)
        self._send(h, status, data, hdrs, content_type="application/octet-stream", cut_after=cut)


def parse_single_range(value, size):
    """(first, last) for one satisfiable byte range, "unsatisfiable", or None
    (ignore the header) for anything else."""
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", value)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    a, b = m.group(1), m.group(2)
    if a == "":
        n = int(b)
        if n == 0:
            return "unsatisfiable"
        return (max(size - n, 0), size - 1)
    a = int(a)
    if b != "" and int(b) < a:
        return None
    if a >= size:
        return "unsatisfiable"
    return (a, min(int(b), size - 1) if b != "" else size - 1)


# ============================================================ client helpers


@dataclass
class Response:
    status: int
    headers: object  # http.client.HTTPMessage
    body: bytes
    error: Optional[BaseException] = None  # set when the body was cut short

    def header(self, name, default=None):
        return self.headers.get(name, default)

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        b = self.body[:300]
        return (f"<Response {self.status} headers={dict(self.headers.items())} "
                f"body={b!r}{'...' if len(self.body) > 300 else ''} error={self.error!r}>")


def request(host, method, path, headers=None, timeout=30, body=None) -> Response:
    """One request on a fresh connection. headers: dict or list of pairs
    (repeat a name to send it twice). A body cut short returns what arrived,
    with .error set (IncompleteRead or a connection error)."""
    h, p = host.rsplit(":", 1)
    conn = http.client.HTTPConnection(h, int(p), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        for k, v in items:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        err = None
        if method == "HEAD":
            data = b""
        else:
            try:
                data = r.read()
            except http.client.IncompleteRead as e:
                data, err = e.partial, e
            except (ConnectionError, socket.timeout, OSError) as e:
                data, err = b"", e
        return Response(r.status, r.headers, data, err)
    finally:
        conn.close()


def raw_request(host, data: bytes, timeout=10, read_limit=None) -> bytes:
    """Send raw bytes, read until close (or read_limit bytes); returns what
    arrived. Connection errors end the read."""
    h, p = host.rsplit(":", 1)
    out = b""
    with socket.create_connection((h, int(p)), timeout=timeout) as s:
        try:
            s.sendall(data)
            while read_limit is None or len(out) < read_limit:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (ConnectionError, socket.timeout, OSError):
            pass
    return out


def error_codes(resp: Response, allow_unknown=False) -> list:
    """Check resp's body is an OCI error document; return its codes."""
    assert resp.header("Content-Type", "").split(";")[0].strip() == "application/json", resp
    doc = json.loads(resp.body)
    assert isinstance(doc, dict) and isinstance(doc.get("errors"), list) and doc["errors"], resp
    allowed = SPEC_ERROR_CODES | ({"UNKNOWN"} if allow_unknown else set())
    codes = []
    for e in doc["errors"]:
        assert isinstance(e, dict), resp
        assert set(("code", "message", "detail")) <= set(e), f"error lacks code/message/detail: {resp}"
        assert isinstance(e["code"], str) and isinstance(e["message"], str), resp
        assert e["code"] in allowed, f"{e['code']} is not a spec error code: {resp}"
        codes.append(e["code"])
    return codes


def assert_oci_error(resp: Response, status, code=None):
    """resp has status (int or tuple of ints) and an OCI error body whose first
    code is code (str or tuple)."""
    statuses = (status,) if isinstance(status, int) else tuple(status)
    assert resp.status in statuses, f"expected {statuses}, got {resp}"
    codes = error_codes(resp, allow_unknown=resp.status >= 500)
    if code is not None:
        want = (code,) if isinstance(code, str) else tuple(code)
        assert codes[0] in want, f"expected code {want}, got {codes}: {resp}"
    return codes


def cache_files(cache_dir) -> dict:
    """{relative path: size} of every file under cache_dir/blobs."""
    root = os.path.join(cache_dir, "blobs")
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            try:
                out[os.path.relpath(p, root)] = os.path.getsize(p)
            except OSError:
                pass
    return out


def cache_path(cache_dir, digest) -> str:
    algo, hexd = digest.split(":", 1)
    return os.path.join(cache_dir, "blobs", algo, hexd[:2], hexd)


def verify_cache(cache_dir) -> int:
    """Every cached file's sha256 equals its name; returns the file count."""
    n = 0
    for rel in cache_files(cache_dir):
        parts = rel.split(os.sep)
        assert len(parts) == 3 and parts[0] == "sha256" and parts[1] == parts[2][:2], rel
        with open(os.path.join(cache_dir, "blobs", rel), "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        assert got == parts[2], f"cache file {rel} holds bytes with sha256 {got}"
        n += 1
    return n


def wait_until(pred, timeout=5.0, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
