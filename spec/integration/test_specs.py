"""Image specs from outside (docs/specs.md): the spec providers
(pulled from a small spec service written here, pushed through the admin
API, fixed in a file), the spec format's checks, the errors, and the
workspace example end to end with containerd.

The policy is examples/workspace/policy_specs.lua as shipped: names under
remote/ have specs (provider from policy.options.spec_provider), every
other name is mirrored.
"""
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fake_upstream import MT_OCI_MANIFEST, assert_oci_error, request, sha256_digest, wait_until
from harness import REGFACADE, ROOT, Regfacade, free_port

EXAMPLE = os.path.join(ROOT, "examples", "workspace")
POLICY = os.path.join(EXAMPLE, "policy_specs.lua")
TOKEN = "test-admin-token-0123456789abcdef"
ACCEPT = {"Accept": MT_OCI_MANIFEST + ", application/vnd.oci.image.index.v1+json"}
SCRATCH_AMD64 = "sha256:584a3e8bfbef76e0cd02576a494bcf71d3810fc9c43f8853b9379c2946d4bb3b"


# ---------------------------------------------------------------------------
# the spec service (the "pulled" provider's far end)
# ---------------------------------------------------------------------------

class SpecService:
    """GET /specs/<id> -> the spec JSON, 404 when unknown. Counts requests
    per id; `delay` seconds before answering; `fail_status` answers that
    status instead; `token` (when set) must come as a Bearer token."""

    def __init__(self, port=None, tls=None):
        self.tls = tls  # an ssl.SSLContext to serve HTTPS with
        self.specs = {}
        self.raw = {}  # id -> bytes served as they are
        self.counts = Counter()
        self.delay = 0.0
        self.fail_status = None
        self.token = None
        self.auth_seen = []
        self.port = port or free_port()
        self.lock = threading.Lock()
        self.server = None
        self.thread = None

    @property
    def url(self):
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self):
        svc = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):
                pass

            def do_GET(self):
                id_ = self.path[len("/specs/"):] if self.path.startswith("/specs/") else None
                with svc.lock:
                    svc.counts[id_] += 1
                    svc.auth_seen.append(self.headers.get("Authorization"))
                    delay, fail, token = svc.delay, svc.fail_status, svc.token
                    raw = svc.raw.get(id_)
                    spec = svc.specs.get(id_)
                if delay:
                    time.sleep(delay)
                if token and self.headers.get("Authorization") != f"Bearer {token}":
                    return self._send(401, b'{"error":"unauthorized"}')
                if fail:
                    return self._send(fail, b'{"error":"down for maintenance"}')
                if raw is not None:
                    return self._send(200, raw)
                if spec is None:
                    return self._send(404, b'{"error":"no such workspace"}')
                return self._send(200, json.dumps(spec).encode())

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        if self.tls:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def spec_service():
    s = SpecService().start()
    try:
        yield s
    finally:
        s.stop()


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def write_token(tmp_path, token=TOKEN):
    p = tmp_path / "admin.token"
    p.write_text(token + "\n")
    return str(p)


def specs_config(tmp_path, providers, admin=True, policy_options=None, **specs_extra):
    cfg = {
        "policy": {"file": POLICY, "options": dict({"spec_provider": "ws"}, **(policy_options or {}))},
        "specs": dict({"providers": providers}, **specs_extra),
    }
    if admin:
        cfg["admin"] = {"listen": f"127.0.0.1:{free_port()}", "token_file": write_token(tmp_path)}
    return cfg


def admin_host(rf):
    return rf.config["admin"]["listen"]


def admin(rf, method, path, body=None, token=TOKEN, headers=None):
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()
    return request(admin_host(rf), method, path, h, body=body)


def admin_error(r, status, code):
    assert r.status == status, r
    doc = json.loads(r.body)
    assert doc["errors"][0]["code"] == code, r
    return doc["errors"][0]["message"]


def manifest(rf, name, ref="latest", method="GET"):
    return request(rf.host, method, f"/v2/{name}/manifests/{ref}", ACCEPT)


def blob(rf, name, digest):
    return request(rf.host, "GET", f"/v2/{name}/blobs/{digest}")


def config_of(rf, name, man):
    r = blob(rf, name, man["config"]["digest"])
    assert r.status == 200, r
    return json.loads(r.body)


def env_of(cfg):
    return dict(e.split("=", 1) for e in cfg["config"].get("Env") or [])


def pushed_files(rf):
    d = os.path.join(rf.cache_dir, "specs")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


@pytest.fixture
def app(fake_upstream):
    return fake_upstream.add_image("acme/app", "v1", layer_sizes=[300, 500])


# ---------------------------------------------------------------------------
# pushed specs and the admin API
# ---------------------------------------------------------------------------

def test_pushed_spec_is_served_then_deleted(fake_facade, tmp_path, app):
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    spec = {"base": "fake/acme/app:v1", "env": {"WORKSPACE": "ws-1", "PATH": {"prepend": "/ide/bin:"}},
            "labels": {"io.example.ws": "ws-1"}, "owner": "alice"}
    r = admin(rf, "PUT", "/specs/ws-1", spec)
    assert r.status == 201, r
    assert r.json()["id"] == "ws-1" and r.json()["digest"].startswith("sha256:")
    assert r.header("Location") == "/specs/ws-1"
    r = manifest(rf, "remote/ws-1")
    assert r.status == 200, (r, rf.log())
    m = json.loads(r.body)
    assert [l["digest"] for l in m["layers"]] == [l.digest for l in app.layers]
    assert m["annotations"]["io.regfacade.workspace.id"] == "ws-1"
    assert m["annotations"]["io.regfacade.workspace.image"] == "fake/acme/app:v1"
    cfg = config_of(rf, "remote/ws-1", m)
    env = env_of(cfg)
    assert env["WORKSPACE"] == "ws-1"
    assert env["PATH"] == "/ide/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert cfg["config"]["Labels"]["io.example.ws"] == "ws-1"
    digest = r.header("Docker-Content-Digest")
    # HEAD, by digest, and the base layers through the workspace name
    assert manifest(rf, "remote/ws-1", method="HEAD").header("Docker-Content-Digest") == digest
    assert manifest(rf, "remote/ws-1", digest).status == 200
    r = blob(rf, "remote/ws-1", app.layers[0].digest)
    assert r.status == 200 and r.body == app.layers[0].data
    # the stored spec, as stored (compact), and the list
    r = admin(rf, "GET", "/specs/ws-1")
    assert r.status == 200 and json.loads(r.body) == spec
    assert admin(rf, "GET", "/specs").json() == {"ids": ["ws-1"]}
    assert pushed_files(rf) == ["ws-1.json"]
    # deleted: the next pull of that name is a 404, blobs too
    r = admin(rf, "DELETE", "/specs/ws-1")
    assert r.status == 204, r
    assert pushed_files(rf) == []
    assert_oci_error(manifest(rf, "remote/ws-1"), 404, "MANIFEST_UNKNOWN")
    assert_oci_error(manifest(rf, "remote/ws-1", digest), 404, "MANIFEST_UNKNOWN")
    assert_oci_error(blob(rf, "remote/ws-1", app.layers[0].digest), 404, "BLOB_UNKNOWN")
    admin_error(admin(rf, "DELETE", "/specs/ws-1"), 404, "SPEC_UNKNOWN")
    admin_error(admin(rf, "GET", "/specs/ws-1"), 404, "SPEC_UNKNOWN")
    # mirrored names are untouched by all this
    r = manifest(rf, "acme/app", "v1")
    assert r.status == 200 and r.header("Docker-Content-Digest") == app.digest


def test_readiness_probe_is_404(fake_facade, tmp_path):
    """Gitpod's registry-facade's readiness probe: GET of a deliberately invalid name -> 404."""
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    r = request(rf.host, "GET", "/v2/remote/not-a-valid-image/manifests/latest")
    codes = assert_oci_error(r, 404, "MANIFEST_UNKNOWN")
    assert "not-a-valid-image" in r.json()["errors"][0]["message"]
    assert codes == ["MANIFEST_UNKNOWN"]
    # ids that cannot exist are 404 too (the name is valid, the id not)
    assert_oci_error(manifest(rf, "remote/a/b"), 404, "MANIFEST_UNKNOWN")


def test_replacing_a_spec_changes_the_image_and_ids_stay_apart(fake_facade, tmp_path, app):
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    spec = {"base": "fake/acme/app:v1", "env": {"A": "1"}}
    assert admin(rf, "PUT", "/specs/ws-a", spec).status == 201
    d1 = manifest(rf, "remote/ws-a").header("Docker-Content-Digest")
    # the same spec under another id: another image (it is annotated with its id)
    assert admin(rf, "PUT", "/specs/ws-b", spec).status == 201
    r = manifest(rf, "remote/ws-b")
    assert r.status == 200 and r.header("Docker-Content-Digest") != d1
    assert json.loads(r.body)["annotations"]["io.regfacade.workspace.id"] == "ws-b"
    # replaced: 200, and the next pull sees the new spec
    r = admin(rf, "PUT", "/specs/ws-a", dict(spec, env={"A": "2"}))
    assert r.status == 200, r
    r = manifest(rf, "remote/ws-a")
    d2 = r.header("Docker-Content-Digest")
    assert d2 != d1
    assert env_of(config_of(rf, "remote/ws-a", json.loads(r.body)))["A"] == "2"
    # putting the first one back gives the first image again (content addressed)
    admin(rf, "PUT", "/specs/ws-a", spec)
    assert manifest(rf, "remote/ws-a").header("Docker-Content-Digest") == d1


def test_admin_needs_the_token(fake_facade, tmp_path):
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    spec = {"base": "fake/acme/app:v1"}
    for token, headers in ((None, None), ("wrong-token-0123456789", None), (None, {"Authorization": TOKEN}),
                           (None, {"Authorization": "Basic " + TOKEN}), (TOKEN + "x", None), (TOKEN[:-1], None)):
        for method, path, body in (("PUT", "/specs/ws-1", spec), ("GET", "/specs/ws-1", None),
                                   ("DELETE", "/specs/ws-1", None), ("GET", "/specs", None)):
            r = admin(rf, method, path, body, token=token, headers=headers)
            msg = admin_error(r, 401, "UNAUTHORIZED")
            assert "token" in msg, r
            assert r.header("WWW-Authenticate", "").startswith("Bearer"), r
    assert pushed_files(rf) == []
    assert admin(rf, "GET", "/specs").json() == {"ids": []}


BAD_SPECS = [
    # (body, the message must contain)
    (b'{"base": "fake/acme/app:v1"', "invalid JSON"),
    (b'{"base": "fake/acme/app:v1"} trailing', "invalid JSON"),
    (b'', "invalid JSON"),
    (b'["base"]', "must be a JSON object"),
    (b'{"base": "nope/acme/app:v1"}', '"nope" is not a configured upstream (configured: fake)'),
    (b'{"base": "app:v1"}', "UPSTREAM/REPOSITORY"),
    (b'{"base": "fake/Acme/App:v1"}', "not a valid repository name"),
    (b'{"base": "fake/acme/app:v1", "layers": ["ide"]}', '"ide" is not a layer in the config\'s layers'),
    (b'{"base": "fake/acme/app:v1", "layers": [{"image": "nope/acme/ide:1"}]}', '"nope" is not a configured upstream'),
    (b'{"base": "fake/acme/app:v1", "layers": [{"file": "/etc/passwd"}]}', "specs.file_roots"),
    (b'{"base": "fake/acme/app:v1", "layers": [{"tarball": "x"}]}', 'unknown key "tarball"'),
    (b'{"base": "fake/acme/app:v1", "layers": [{"blob": "sha256:00"}]}', "not a sha256 digest"),
    (b'{"base": null, "layers": ["base"]}', '"base" needs a base image'),
    (b'{"base": null}', "needs at least one layer"),
    (b'{"base": "fake/acme/app:v1", "platform": "linux/arm64"}', "only for a spec without base"),
    (b'{"base": "fake/acme/app:v1", "env": {"A=B": "x"}}', "not a variable name"),
    (b'{"base": "fake/acme/app:v1", "env": {"PATH": {"prepend": 1}}}', "env.PATH"),
    (b'{"base": "fake/acme/app:v1", "labels": {"k": 1}}', "labels.k"),
    (b'{"base": "fake/acme/app:v1", "base": "fake/acme/app:v2"}', "given twice"),
    (b'[' * 40 + b']' * 40, "nesting deeper than 16"),
    (b'{"base": "fake/acme/app:v1", "x": ' + b'{"a":' * 20 + b'1' + b'}' * 20 + b'}', "specs.max_depth"),
]


@pytest.mark.parametrize("body,why", BAD_SPECS, ids=[w[:30] for _, w in BAD_SPECS])
def test_admin_refuses_bad_specs_and_stores_nothing(fake_facade, tmp_path, body, why):
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    msg = admin_error(admin(rf, "PUT", "/specs/ws-1", body), 400, "SPEC_INVALID")
    assert why in msg, msg
    assert msg.startswith("spec ws-1: "), msg
    assert pushed_files(rf) == []
    assert admin(rf, "GET", "/specs").json() == {"ids": []}
    assert_oci_error(manifest(rf, "remote/ws-1"), 404, "MANIFEST_UNKNOWN")


def test_admin_refuses_huge_bodies(fake_facade, tmp_path):
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}, max_bytes=4096))
    big = json.dumps({"base": "fake/acme/app:v1", "x": "y" * 5000}).encode()
    msg = admin_error(admin(rf, "PUT", "/specs/ws-1", big), 413, "TOO_LARGE")
    assert "specs.max_bytes" in msg
    # a very large body is refused from its Content-Length, before it is read
    try:
        r = admin(rf, "PUT", "/specs/ws-1", b"{" + b" " * (8 * 1024 * 1024) + b"}")
        assert r.status == 413, r
    except (BrokenPipeError, ConnectionResetError):
        pass  # the answer came and the connection closed while the body was still going out
    # chunked (no Content-Length): refused once more than the limit arrived
    import http.client
    conn = http.client.HTTPConnection(*admin_host(rf).split(":"), timeout=10)
    try:
        conn.putrequest("PUT", "/specs/ws-1")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for _ in range(10):
                chunk = b"x" * 1000
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass
        resp = conn.getresponse()
        assert resp.status == 413, resp.read()
    finally:
        conn.close()
    assert pushed_files(rf) == []
    # the listener keeps serving
    assert admin(rf, "PUT", "/specs/ws-1", {"base": "fake/acme/app:v1"}).status == 201


@pytest.mark.parametrize("path", ["/specs/..", "/specs/../ws", "/specs/a/b", "/specs/a%2Fb", "/specs/.hidden",
                                  "/specs/-x", "/specs/a%00b", "/specs/a\\b", "/specs/" + "x" * 129,
                                  "/specs/ws%2e1", "/specs/sp ace"])
def test_admin_refuses_ids_with_path_characters(fake_facade, tmp_path, path):
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    r = admin(rf, "PUT", path.replace(" ", "%20") if " " in path else path, {"base": "fake/acme/app:v1"})
    msg = admin_error(r, 400, "ID_INVALID")
    assert "not a valid spec id" in msg
    assert pushed_files(rf) == []
    assert admin(rf, "GET", "/specs").json() == {"ids": []}


def test_admin_other_routes(fake_facade, tmp_path):
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    admin_error(admin(rf, "POST", "/specs/ws-1", {"base": "fake/acme/app:v1"}), 405, "UNSUPPORTED")
    admin_error(admin(rf, "DELETE", "/specs"), 405, "UNSUPPORTED")
    admin_error(admin(rf, "GET", "/v2/"), 404, "UNSUPPORTED")
    admin_error(admin(rf, "GET", "/specs/ws-1", "{}"), 400, "UNSUPPORTED")


def test_pushed_specs_are_kept_across_a_restart(fake_facade, tmp_path, app):
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    for i in range(3):
        assert admin(rf, "PUT", f"/specs/ws-{i}", {"base": "fake/acme/app:v1", "env": {"N": str(i)}}).status == 201
    assert admin(rf, "DELETE", "/specs/ws-1").status == 204
    d0 = manifest(rf, "remote/ws-0").header("Docker-Content-Digest")
    # a stray temp file (a crash mid-write) and a file that is not a valid spec
    with open(os.path.join(rf.cache_dir, "specs", ".tmp-1-1"), "w") as f:
        f.write("{")
    with open(os.path.join(rf.cache_dir, "specs", "broken.json"), "w") as f:
        f.write('{"base": "gone/x:1"}')
    rf.stop()
    rf.start()
    assert admin(rf, "GET", "/specs").json() == {"ids": ["ws-0", "ws-2"]}
    assert "broken.json" in rf.log() and "left out" in rf.log()
    assert ".tmp-1-1" not in pushed_files(rf)
    r = manifest(rf, "remote/ws-0")
    assert r.status == 200 and r.header("Docker-Content-Digest") == d0
    assert env_of(config_of(rf, "remote/ws-2", json.loads(manifest(rf, "remote/ws-2").body)))["N"] == "2"
    assert_oci_error(manifest(rf, "remote/ws-1"), 404, "MANIFEST_UNKNOWN")


def test_max_specs(fake_facade, tmp_path):
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed", "max_specs": 2}}))
    for i in range(2):
        assert admin(rf, "PUT", f"/specs/ws-{i}", {"base": "fake/acme/app:v1"}).status == 201
    admin_error(admin(rf, "PUT", "/specs/ws-2", {"base": "fake/acme/app:v1"}), 507, "TOO_MANY_SPECS")
    assert admin(rf, "PUT", "/specs/ws-1", {"base": "fake/acme/app:v2"}).status == 200  # replacing is fine
    assert pushed_files(rf) == ["ws-0.json", "ws-1.json"]


# ---------------------------------------------------------------------------
# an image without base
# ---------------------------------------------------------------------------

def test_spec_without_base_is_built_on_the_empty_base(fake_facade, tmp_path, fake_upstream):
    tools = fake_upstream.add_image("acme/tools", "v1", layer_sizes=[400])
    layer = tools.layers[0]
    spec = {"base": None, "layers": [{"blob": layer.digest, "size": layer.size, "media_type": layer.media_type,
                                      "diff_id": tools.diff_ids[0], "upstream": "fake",
                                      "repository": "acme/tools"}],
            "env": {"PATH": "/tools/bin"}}
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    assert admin(rf, "PUT", "/specs/bare", spec).status == 201, rf.log()
    r = manifest(rf, "remote/bare")
    assert r.status == 200, (r, rf.log())
    m = json.loads(r.body)
    assert m["mediaType"] == MT_OCI_MANIFEST
    assert [l["digest"] for l in m["layers"]] == [layer.digest]
    cfg = config_of(rf, "remote/bare", m)
    assert (cfg["os"], cfg["architecture"]) == ("linux", "amd64")
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [tools.diff_ids[0]]}
    assert len(cfg["history"]) == 1 and cfg["created"] == "1970-01-01T00:00:00Z"
    assert env_of(cfg) == {"PATH": "/tools/bin"}
    r = blob(rf, "remote/bare", layer.digest)
    assert r.status == 200 and r.body == layer.data
    # the empty base itself never went upstream
    assert not any("scratch" in p for p in fake_upstream.paths_seen())
    # and it survives being evicted from the cache
    import glob
    for p in glob.glob(os.path.join(rf.cache_dir, "blobs", "sha256", SCRATCH_AMD64[7:9], SCRATCH_AMD64[7:])):
        os.unlink(p)
    for p in glob.glob(os.path.join(rf.cache_dir, "generated", "*")):
        os.unlink(p)
    assert manifest(rf, "remote/bare").status == 200, rf.log()
    # arm64 on request
    assert admin(rf, "PUT", "/specs/bare-arm", dict(spec, platform="linux/arm64")).status == 201
    m = json.loads(manifest(rf, "remote/bare-arm").body)
    assert config_of(rf, "remote/bare-arm", m)["architecture"] == "arm64"


# ---------------------------------------------------------------------------
# pulled specs
# ---------------------------------------------------------------------------

def pulled(spec_service, **kw):
    return {"ws": dict({"type": "pulled", "url": spec_service.url + "/specs/{id}", "retries": 0}, **kw)}


def test_pulled_spec_is_cached_for_its_ttl(fake_facade, tmp_path, app, spec_service):
    spec_service.specs["ws-1"] = {"base": "fake/acme/app:v1", "env": {"X": "1"}}
    rf = fake_facade(config=specs_config(tmp_path, pulled(spec_service, ttl_seconds=2), admin=False))
    r = manifest(rf, "remote/ws-1")
    assert r.status == 200, (r, rf.log())
    for _ in range(3):
        assert manifest(rf, "remote/ws-1").status == 200
        assert blob(rf, "remote/ws-1", app.layers[0].digest).status == 200
    assert spec_service.counts["ws-1"] == 1
    # a changed spec is seen once the TTL ran out
    spec_service.specs["ws-1"] = {"base": "fake/acme/app:v1", "env": {"X": "2"}}
    time.sleep(2.2)
    r = manifest(rf, "remote/ws-1")
    assert spec_service.counts["ws-1"] == 2
    assert env_of(config_of(rf, "remote/ws-1", json.loads(r.body)))["X"] == "2"


def test_pulled_lookups_of_one_id_are_coalesced(fake_facade, tmp_path, app, spec_service):
    spec_service.specs["ws-1"] = {"base": "fake/acme/app:v1"}
    spec_service.specs["ws-2"] = {"base": "fake/acme/app:v1"}
    spec_service.delay = 0.5
    rf = fake_facade(config=specs_config(tmp_path, pulled(spec_service, ttl_seconds=60), admin=False))
    results = []

    def pull(name):
        results.append(manifest(rf, name).status)

    threads = [threading.Thread(target=pull, args=(f"remote/ws-{1 + i % 2}",)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 12, rf.log()
    assert spec_service.counts["ws-1"] == 1 and spec_service.counts["ws-2"] == 1


def test_pulled_provider_down_is_503_then_recovers(fake_facade, tmp_path, app, spec_service):
    spec_service.specs["ws-1"] = {"base": "fake/acme/app:v1"}
    spec_service.fail_status = 503
    rf = fake_facade(config=specs_config(tmp_path, pulled(spec_service, ttl_seconds=60), admin=False))
    for n in (1, 2):
        r = manifest(rf, "remote/ws-1")
        assert r.status == 503, r
        msg = r.json()["errors"][0]["message"]
        assert "spec provider ws is unavailable" in msg and "answered 503" in msg and "try again" in msg, msg
        assert spec_service.counts["ws-1"] == n  # a failure is not cached: asked again
    # a service that refuses our credentials is unavailable too
    spec_service.fail_status = 403
    r = manifest(rf, "remote/ws-1")
    assert r.status == 503 and "refused our credentials" in r.json()["errors"][0]["message"], r
    # not listening at all
    port = spec_service.port
    spec_service.stop()
    r = manifest(rf, "remote/ws-1")
    assert r.status == 503 and "unavailable" in r.json()["errors"][0]["message"], r
    # back: served, and then cached
    spec_service.fail_status = None
    spec_service.port = port
    spec_service.start()
    r = manifest(rf, "remote/ws-1")
    assert r.status == 200, (r, rf.log())
    before = spec_service.counts["ws-1"]
    assert manifest(rf, "remote/ws-1").status == 200
    assert spec_service.counts["ws-1"] == before


def test_pulled_provider_retries(fake_facade, tmp_path, app, spec_service):
    spec_service.specs["ws-1"] = {"base": "fake/acme/app:v1"}
    spec_service.fail_status = 502
    rf = fake_facade(config=specs_config(tmp_path, pulled(spec_service, retries=2), admin=False))
    assert manifest(rf, "remote/ws-1").status == 503
    assert spec_service.counts["ws-1"] == 3


def test_pulled_unknown_id_is_404_and_not_remembered(fake_facade, tmp_path, app, spec_service):
    rf = fake_facade(config=specs_config(tmp_path, pulled(spec_service, ttl_seconds=60), admin=False))
    assert_oci_error(request(rf.host, "GET", "/v2/remote/not-a-valid-image/manifests/latest"), 404,
                     "MANIFEST_UNKNOWN")
    assert_oci_error(manifest(rf, "remote/ws-1"), 404, "MANIFEST_UNKNOWN")
    # registered at the service a moment later: the next pull finds it
    spec_service.specs["ws-1"] = {"base": "fake/acme/app:v1"}
    assert manifest(rf, "remote/ws-1").status == 200
    assert spec_service.counts["ws-1"] == 2


def test_pulled_invalid_answers_are_502_and_not_cached(fake_facade, tmp_path, app, spec_service):
    rf = fake_facade(config=specs_config(tmp_path, pulled(spec_service, ttl_seconds=60), admin=False,
                                         max_bytes=2048))
    cases = {
        "bad-json": b'{"base": ',
        "bad-upstream": b'{"base": "nope/acme/app:v1"}',
        "too-big": json.dumps({"base": "fake/acme/app:v1", "x": "y" * 4000}).encode(),
        "too-deep": b'{"base": "fake/acme/app:v1", "x": ' + b'[' * 30 + b']' * 30 + b'}',
    }
    for id_, body in cases.items():
        spec_service.raw[id_] = body
        r = manifest(rf, f"remote/{id_}")
        assert r.status == 502, r
        assert f'spec provider ws' in r.json()["errors"][0]["message"], r
        manifest(rf, f"remote/{id_}")
        assert spec_service.counts[id_] == 2, id_


def test_pulled_provider_sends_its_token(fake_facade, tmp_path, app, spec_service):
    spec_service.specs["ws-1"] = {"base": "fake/acme/app:v1"}
    spec_service.token = "service-token-1"
    tf = tmp_path / "svc.token"
    tf.write_text("service-token-1\n")
    rf = fake_facade(config=specs_config(tmp_path, pulled(spec_service, token_file=str(tf)), admin=False))
    assert manifest(rf, "remote/ws-1").status == 200, rf.log()
    assert spec_service.auth_seen[-1] == "Bearer service-token-1"
    assert "service-token-1" not in rf.log()


def test_pulled_provider_over_mutual_tls(fake_facade, tmp_path, app):
    import ssl
    from tlsutil import _openssl, make_pki
    pki = make_pki(str(tmp_path / "pki"))
    ck, csr, crt, ext = (str(tmp_path / n) for n in ("client.key", "client.csr", "client.crt", "client.ext"))
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", ck,
             "-out", csr, "-subj", "/CN=regfacade")
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    _openssl("x509", "-req", "-in", csr, "-CA", pki.ca, "-CAkey", pki.ca_key, "-CAcreateserial", "-out", crt,
             "-days", "2", "-extfile", ext)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.cert, pki.key)
    ctx.load_verify_locations(pki.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    svc = SpecService(tls=ctx).start()
    try:
        svc.specs["ws-1"] = {"base": "fake/acme/app:v1"}
        url = svc.url + "/specs/{id}"
        providers = {
            "ws": {"type": "pulled", "url": url, "ca_file": pki.ca, "client_cert_file": crt,
                   "client_key_file": ck, "retries": 0},
            "nocert": {"type": "pulled", "url": url, "ca_file": pki.ca, "retries": 0},
            "noca": {"type": "pulled", "url": url, "client_cert_file": crt, "client_key_file": ck, "retries": 0},
        }
        rf = fake_facade(config=specs_config(tmp_path, providers, admin=False))
        r = manifest(rf, "remote/ws-1")
        assert r.status == 200, (r, rf.log())
        assert svc.counts["ws-1"] == 1
        for name in ("nocert", "noca"):
            cfg = specs_config(tmp_path, providers, admin=False, policy_options={"spec_provider": name})
            rf2 = fake_facade(config=cfg, name=f"rf-{name}")
            r = manifest(rf2, "remote/ws-1")
            assert r.status == 503, (name, r)
            assert f"spec provider {name} is unavailable" in r.json()["errors"][0]["message"], r
    finally:
        svc.stop()


def test_pulled_base_url_form(fake_facade, tmp_path, app, spec_service):
    spec_service.specs["ws-1"] = {"base": "fake/acme/app:v1"}
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pulled", "url": spec_service.url + "/specs"}},
                                         admin=False))
    assert manifest(rf, "remote/ws-1").status == 200, rf.log()


# ---------------------------------------------------------------------------
# fixed specs
# ---------------------------------------------------------------------------

def write_json(path, doc):
    tmp = str(path) + ".new"
    with open(tmp, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))
    os.replace(tmp, path)


def test_fixed_provider_is_reloaded_when_the_file_changes(fake_facade, tmp_path, app):
    f = tmp_path / "specs.json"
    write_json(f, {"ws-1": {"base": "fake/acme/app:v1", "env": {"V": "1"}}})
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "fixed", "file": str(f),
                                                           "check_interval_ms": 100}}, admin=False))
    r = manifest(rf, "remote/ws-1")
    assert r.status == 200, (r, rf.log())
    d1 = r.header("Docker-Content-Digest")
    assert_oci_error(manifest(rf, "remote/ws-2"), 404, "MANIFEST_UNKNOWN")
    write_json(f, {"ws-1": {"base": "fake/acme/app:v1", "env": {"V": "2"}},
                   "ws-2": {"base": "fake/acme/app:v1"}})
    assert wait_until(lambda: manifest(rf, "remote/ws-2").status == 200, timeout=5), rf.log()
    r = manifest(rf, "remote/ws-1")
    assert r.header("Docker-Content-Digest") != d1
    assert env_of(config_of(rf, "remote/ws-1", json.loads(r.body)))["V"] == "2"
    # a broken file is reported and the specs loaded before stay
    write_json(f, '{"ws-1": ')
    time.sleep(0.3)
    assert manifest(rf, "remote/ws-2").status == 200
    assert wait_until(lambda: "not reloaded" in rf.log()), rf.log()
    write_json(f, {"ws-1": {"base": "nope/x:1"}})
    time.sleep(0.3)
    assert manifest(rf, "remote/ws-2").status == 200
    assert wait_until(lambda: 'nope\\" is not a configured upstream' in rf.log()), rf.log()
    # fixed again, without ws-2
    write_json(f, {"ws-1": {"base": "fake/acme/app:v1"}})
    assert wait_until(lambda: manifest(rf, "remote/ws-2").status == 404, timeout=5)


# ---------------------------------------------------------------------------
# the spec hook and the config
# ---------------------------------------------------------------------------

HOOK_POLICY = r'''
local specs = require "regfacade.specs"
return {
  spec = function(req)
    if req.repository == "x/boom" then error("boom") end
    if req.repository == "x/no" then return nil, { status = 403, code = "DENIED", message = "not yours" } end
    if req.repository == "x/elsewhere" then return { provider = "nope", id = "a" } end
    if req.repository == "x/weird" then return 42 end
    local id = specs.id_from(req.repository, "x/")
    return id and { provider = "ws", id = id } or nil
  end,
  resolve = function(req, spec)
    if spec == nil then return { upstream = "fake" } end
    assert(req.spec.base == spec.base, "req.spec is the same spec")
    return specs.resolve(req, spec)
  end,
}
'''


def test_spec_hook_answers_and_failures(fake_facade, tmp_path, app):
    pol = tmp_path / "hook.lua"
    pol.write_text(HOOK_POLICY)
    cfg = specs_config(tmp_path, {"ws": {"type": "pushed"}})
    cfg["policy"] = {"file": str(pol)}
    rf = fake_facade(config=cfg)
    assert admin(rf, "PUT", "/specs/ok", {"base": "fake/acme/app:v1"}).status == 201
    r = manifest(rf, "x/ok")
    assert r.status == 200 and r.header("Docker-Content-Digest") == app.digest, r  # no rewrite: the base itself
    r = manifest(rf, "x/boom")
    assert r.status == 500 and "spec hook failed" in r.json()["errors"][0]["message"], r
    assert_oci_error(manifest(rf, "x/no"), 403, "DENIED")
    r = manifest(rf, "x/elsewhere")
    assert r.status == 500 and 'provider "nope", which is not configured' in r.json()["errors"][0]["message"], r
    r = manifest(rf, "x/weird")
    assert r.status == 500 and "provider = NAME, id = ID" in r.json()["errors"][0]["message"], r
    assert manifest(rf, "acme/app", "v1").status == 200  # no spec: resolve(req)


def test_reload_checks_specs_against_the_new_config(fake_facade, tmp_path, app, fake_upstream):
    import signal
    rf = fake_facade(config=specs_config(tmp_path, {"ws": {"type": "pushed"}}))
    spec = {"base": "other/acme/app:v1"}
    msg = admin_error(admin(rf, "PUT", "/specs/ws-1", spec), 400, "SPEC_INVALID")
    assert '"other" is not a configured upstream' in msg
    cfg = dict(rf.config)
    cfg["upstreams"] = dict(cfg["upstreams"], other={"url": fake_upstream.url})
    cfg["default_upstream"] = "fake"
    with open(rf.config_path, "w") as f:
        json.dump(cfg, f)
    rf.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "SIGHUP: reloaded" in rf.log(), timeout=10), rf.log()
    assert admin(rf, "PUT", "/specs/ws-1", spec).status == 201
    r = manifest(rf, "remote/ws-1")
    assert r.status == 200, (r, rf.log())
    assert [l["digest"] for l in json.loads(r.body)["layers"]] == [l.digest for l in app.layers]


def check(tmp_path, cfg):
    cfg = dict({"cache": {"dir": str(tmp_path / "cache")}, "upstreams": {"fake": {"url": "http://127.0.0.1:1"}}},
               **cfg)
    p = tmp_path / "check.json"
    p.write_text(json.dumps(cfg))
    return subprocess.run([REGFACADE, "check", "--config", str(p)], capture_output=True, text=True, timeout=30)


def test_check_validates_the_sections(tmp_path):
    tok = write_token(tmp_path)
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    fixed = tmp_path / "fixed.json"
    fixed.write_text('{"ws-1": {"base": "nope/x:1"}}')
    fixed_ok = tmp_path / "fixed-ok.json"
    fixed_ok.write_text('{"ws-1": {"base": "fake/x:1"}}')
    admin = {"listen": "127.0.0.1:5999", "token_file": tok}
    pushed = {"ws": {"type": "pushed"}}
    bad = [
        ({"specs": {"providers": pushed}}, 'needs the "admin" section'),
        ({"specs": {"providers": pushed, "colour": 1}, "admin": admin}, "specs.colour: unknown key"),
        ({"specs": {"providers": {"ws": {"type": "magic"}}}}, "specs.providers.ws.type"),
        ({"specs": {"providers": {"ws": {"type": "pulled"}}}}, "specs.providers.ws.url: required"),
        ({"specs": {"providers": {"ws": {"type": "pulled", "url": "ftp://x"}}}}, "specs.providers.ws.url"),
        ({"specs": {"providers": {"ws": {"type": "pulled", "url": "http://x", "ttl_seconds": -1}}}},
         "ttl_seconds"),
        ({"specs": {"providers": {"ws": {"type": "pulled", "url": "http://x", "ca_file": "/nonexistent"}}}},
         "ca_file"),
        ({"specs": {"providers": {"ws": {"type": "fixed", "file": str(fixed)}}}},
         '"nope" is not a configured upstream'),
        ({"specs": {"providers": {"ws": {"type": "fixed", "file": "/nonexistent.json"}}}}, "cannot open"),
        ({"specs": {"providers": pushed, "max_depth": 100}, "admin": admin}, "specs.max_depth"),
        ({"specs": {"providers": pushed, "file_roots": ["/nonexistent"]}, "admin": admin}, "file_roots[0]"),
        ({"specs": {"providers": {"a": {"type": "pushed"}, "b": {"type": "pushed"}}}, "admin": admin},
         'only one provider may be of type "pushed"'),
        ({"specs": {"providers": pushed}, "admin": dict(admin, token_file=str(short))}, "at least 16"),
        ({"specs": {"providers": pushed}, "admin": dict(admin, listen="localhost:5999")}, "IPv4"),
        ({"specs": {"providers": pushed}, "admin": dict(admin, port=1)}, "admin.port: unknown key"),
    ]
    for cfg, why in bad:
        r = check(tmp_path, cfg)
        assert r.returncode != 0 and why in r.stderr, (cfg, r.stderr)
    # The admin API serves the cache endpoints too: alone, or beside providers none of which is pushed.
    for cfg in ({"admin": admin}, {"specs": {"providers": {"ws": {"type": "fixed", "file": str(fixed_ok)}}},
                                   "admin": admin}):
        r = check(tmp_path, cfg)
        assert r.returncode == 0, (cfg, r.stderr)
    fixed.write_text('{"ws-1": {"base": "fake/x:1"}}')
    r = check(tmp_path, {"specs": {"providers": {"ws": {"type": "fixed", "file": str(fixed)}, "p": pushed["ws"]},
                                   "file_roots": [str(tmp_path)]}, "admin": admin})
    assert r.returncode == 0, r.stderr


def test_example_config_passes_check(tmp_path):
    with open(os.path.join(EXAMPLE, "config_specs.json")) as f:
        cfg = json.load(f)
    cfg["policy"]["file"] = POLICY
    cfg["cache"]["dir"] = str(tmp_path / "cache")
    cfg["admin"]["token_file"] = os.path.join(EXAMPLE, "admin-token.example")
    # a stand-in for the supervisor layer build.sh makes: a named layer file must be there
    layer = tmp_path / "supervisor.tar.gz"
    with tarfile.open(layer, "w:gz") as tf:
        tf.addfile(tarfile.TarInfo(".supervisor"))
    cfg["layers"]["supervisor"]["file"] = str(layer)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    r = subprocess.run([REGFACADE, "check", "--config", str(p)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_workspace_example_configs_run_side_by_side(procs, tmp_path):
    """The two workspace configs, as shipped but on free ports, serve at once
    from one copy of the example folder: their cache folders differ (one
    process per cache folder, the second would be refused)."""
    d = tmp_path / "workspace"
    shutil.copytree(EXAMPLE, d, ignore=shutil.ignore_patterns("cache*", "images", "layers"))
    os.chmod(d / "admin-token.example", 0o600)
    # The named supervisor layer must be there at start (build.sh makes it); a stand-in.
    os.makedirs(d / "layers")
    with tarfile.open(d / "layers" / "supervisor.tar.gz", "w:gz") as tf:
        tf.addfile(tarfile.TarInfo(".supervisor"))
    started = []
    for name in ("config.json", "config_specs.json"):
        cfg = json.loads((d / name).read_text())
        cfg["listen"] = f"127.0.0.1:{free_port()}"
        if "admin" in cfg:
            cfg["admin"]["listen"] = f"127.0.0.1:{free_port()}"
        (d / name).write_text(json.dumps(cfg))
        p = procs.start(name, [REGFACADE, "serve", "--config", str(d / name)])
        assert wait_until(lambda: p.poll() is not None or _answers(cfg["listen"]), timeout=30)
        assert p.poll() is None, f"{name} did not start:\n{open(p.log_path).read()}"
        started.append((p, os.path.join(str(d), cfg["cache"]["dir"])))
    for p, cache in started:
        with open(os.path.join(cache, "lock")) as f:
            assert f.read().strip() == str(p.pid)


def _answers(listen):
    try:
        return request(listen, "GET", "/v2/", timeout=2).status == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------
# examples/workspace end to end: admin API, ctr pull, ctr run, delete
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ws_build(plain_registry, tmp_path_factory):
    import layerkit
    return layerkit.WorkspaceBuild(str(tmp_path_factory.mktemp("ws-specs") / "workspace"), plain_registry.host)


def test_workspace_specs_end_to_end(ws_build, plain_registry, procs, tmp_path, containerd):
    with open(os.path.join(EXAMPLE, "config_specs.json")) as f:
        cfg = json.load(f)
    cfg.pop("listen")
    cfg["cache"]["dir"] = str(tmp_path / "cache")
    cfg["policy"]["file"] = POLICY
    cfg["upstreams"]["local"]["url"] = plain_registry.url
    cfg["layers"]["supervisor"]["file"] = ws_build.supervisor
    cfg["admin"] = {"listen": f"127.0.0.1:{free_port()}", "token_file": write_token(tmp_path)}
    rf = Regfacade(procs, str(tmp_path), cfg, name="workspace-specs").start()
    rf.cache_dir = cfg["cache"]["dir"]
    with open(os.path.join(EXAMPLE, "spec-ws-123.json")) as f:
        spec = json.load(f)
    r = admin(rf, "PUT", "/specs/ws-123", spec)
    assert r.status == 201, (r, rf.log())
    ns = containerd.new_namespace()
    ref = f"{rf.host}/remote/ws-123:latest"
    try:
        r = containerd.pull(ref, namespace=ns, check=False)
        assert r.returncode == 0, f"ctr pull: {r.stderr}\n{rf.log()[-4000:]}"
        r = containerd.run(ref, f"rf-specs-{ns}", "sh", "-c",
                           'cat /ide/version.txt; echo "PATH=$PATH"; echo "WS=$WORKSPACE_ID"; code; '
                           '/.supervisor/supervisor; cat /app/hello.txt', namespace=ns, check=False)
        assert r.returncode == 0, f"ctr run: {r.stdout}\n{r.stderr}\n{containerd.log()[-2000:]}"
        path = "/ide/bin:/ide/bin/remote-cli:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        assert r.stdout.splitlines() == [
            "ide 1.2",
            f"PATH={path}",
            "WS=ws-123",
            "ide: code 1.2 (EDITOR=/ide/bin/code)",
            f"supervisor: workspace ready (PATH={path})",
            "hello from the user's app image",
        ], r.stdout
    finally:
        containerd.remove_namespace(ns)
    # deleted: the next pull of that name is a 404
    assert admin(rf, "DELETE", "/specs/ws-123").status == 204
    ns = containerd.new_namespace()
    try:
        r = containerd.pull(ref, namespace=ns, check=False)
        assert r.returncode != 0 and "not found" in r.stderr, r.stderr
        assert_oci_error(manifest(rf, "remote/ws-123"), 404, "MANIFEST_UNKNOWN")
    finally:
        containerd.remove_namespace(ns)
