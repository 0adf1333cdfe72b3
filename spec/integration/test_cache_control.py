"""Cache control (README "Cache control", docs/observability.md): the
admin API's /cache endpoints and the commands that use them or, on a
stopped server's cache, work offline under its lock; /v2/_catalog.

Every test runs the real binary in front of a real docker-registry (a
clone of the session's, serving the same storage, that a test may stop to
prove what is served from the cache) and pulls with skopeo or containerd.
"""
import json
import time
import os
import subprocess

import pytest

import clients
from fake_upstream import cache_path, request, wait_until
from harness import REGFACADE, Regfacade, free_port

TOKEN = "cache-control-admin-token-0123456789"


class Ctl:
    """A regfacade with an admin API in front of its own upstream clone."""

    def __init__(self, procs, tmp_path, upstream, name="rf", policy=None, admin=True):
        self.upstream = upstream
        work = tmp_path / name
        work.mkdir()
        (work / "admin.token").write_text(TOKEN + "\n")
        self.admin = f"127.0.0.1:{free_port()}"
        self.metrics = f"127.0.0.1:{free_port()}"
        cfg = {"upstreams": {"reg": {"url": upstream.url}},
               "cache": {"dir": str(work / "cache"), "tag_ttl_seconds": 3600},
               "metrics": {"listen": self.metrics}}
        if admin:
            cfg["admin"] = {"listen": self.admin, "token_file": str(work / "admin.token")}
        if policy:
            (work / "policy.lua").write_text(policy)
            cfg["policy"] = {"file": "policy.lua"}
        self.rf = Regfacade(procs, str(work), cfg, name=name)
        self.cache_dir = cfg["cache"]["dir"]
        self.config_path = self.rf.config_path
        self.work = work

    def start(self):
        self.rf.start()
        return self

    def stop(self):
        self.rf.stop()

    def cmd(self, *args, check=True):
        """regfacade ARGS --config CONFIG; the CompletedProcess."""
        r = subprocess.run([REGFACADE, *args, "--config", self.config_path], capture_output=True, text=True,
                           timeout=600)
        if check:
            assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r

    def metric(self, name):
        """The value of an unlabelled series on /metrics."""
        for line in request(self.metrics, "GET", "/metrics").body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not on /metrics")

    def api(self, method, path, body=None, token=TOKEN):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        return request(self.admin, method, path, headers=headers, body=data, timeout=600)


@pytest.fixture
def upstream(procs, tmp_path, plain_registry):
    """A docker-registry of our own over the session registry's storage."""
    return plain_registry.registry.clone(procs, str(tmp_path / "upstream"))


@pytest.fixture
def ctl(procs, tmp_path, upstream):
    return Ctl(procs, tmp_path, upstream).start()


def blobs_of(info):
    return set(info["blobs"])


def pull(ctl, repo, tag, tmp_path, name, check=True):
    dest = tmp_path / name
    return clients.skopeo_copy(f"docker://{ctl.rf.host}/{repo}:{tag}", f"oci:{dest}:{tag}", check=check)


def links_of(ctl, digest):
    """The scopes (CACHE/links/<scope>/) that link digest."""
    top = os.path.join(ctl.cache_dir, "links")
    return [sc for sc in os.listdir(top) if os.path.exists(os.path.join(top, sc, digest[7:]))]


def cached(ctl, digest):
    return os.path.exists(cache_path(ctl.cache_dir, digest))


# ---------------------------------------------------------------------------
# the whole round: warm, ls, pull with the upstream stopped, rm, upstream again
# ---------------------------------------------------------------------------

def test_warm_ls_pull_from_cache_rm_then_upstream(ctl, upstream, plain_registry, tmp_path):
    s2 = plain_registry.images["schema2"]
    multi = plain_registry.images["index"]
    amd64, arm64 = multi["children"]["amd64"], multi["children"]["arm64"]
    # cache warm through the running server (its lock is held: the admin API).
    r = ctl.cmd("cache", "warm", "regfacade-test/schema2:v1", "regfacade-test/multi:v1", "--platform", "linux/arm64")
    assert "warmed:" in r.stdout and " 0 failed" in r.stdout, r.stdout
    for d in blobs_of(s2) | blobs_of(arm64) | {s2["manifest_digest"], multi["manifest_digest"],
                                               arm64["manifest_digest"]}:
        assert cached(ctl, d), (d, r.stdout)
        assert d in r.stdout, (d, r.stdout)
    # Only the platform named: amd64's manifest is not pulled.
    assert not cached(ctl, amd64["manifest_digest"])

    # cache ls: both images, their digests and sizes; the table and --json.
    ls = json.loads(ctl.cmd("cache", "ls", "--json").stdout)
    images = {(i["repository"], i["tag"]): i for i in ls["images"]}
    mine = images[("regfacade-test/schema2", "v1")]
    assert mine["digest"] == s2["manifest_digest"] and mine["missing"] == 0 and mine["upstream"] == "reg", ls
    assert mine["size"] == s2["manifest_size"] + sum(s2["blobs"].values()), (mine, s2)
    assert images[("regfacade-test/multi", "v1")]["missing"] > 0  # amd64 left out
    assert blobs_of(s2) <= {b["digest"] for b in ls["blobs"]}
    # Listing is no use, nor is the background scrub re-hashing what is
    # cached: two listings a moment apart show the same last use of every
    # image and blob (the first taken a moment after the warm, whose last
    # commits may still have been landing).
    def last_uses():
        return {(i["repository"], i["tag"]): i["last_used"]
                for i in json.loads(ctl.cmd("cache", "ls", "--json").stdout)["images"]}
    time.sleep(1.2)
    b1 = {b["digest"]: b["last_used"] for b in json.loads(ctl.cmd("cache", "ls", "--json").stdout)["blobs"]}
    first = last_uses()
    time.sleep(1.2)
    b2 = {b["digest"]: b["last_used"] for b in json.loads(ctl.cmd("cache", "ls", "--json").stdout)["blobs"]}
    changed = {d: (b1.get(d), b2[d]) for d in b2 if b1.get(d) != b2[d]}
    assert not changed, changed
    assert last_uses() == first
    table = ctl.cmd("cache", "ls").stdout
    assert "regfacade-test/schema2" in table and s2["manifest_digest"] in table and "LAST USE" in table, table

    # The upstream stopped: a whole pull is served from the cache.
    upstream.stop()
    pull(ctl, "regfacade-test/schema2", "v1", tmp_path, "from-cache")

    # cache rm: the image's resolution and blobs go, not what multi holds too.
    size_before = ctl.metric("regfacade_cache_size_bytes")
    rm = json.loads(ctl.cmd("cache", "rm", "regfacade-test/schema2:v1", "--json").stdout)
    removed = {b["digest"] for b in rm["removed"]}
    shared = blobs_of(s2) & blobs_of(arm64)
    assert shared, "the test images share their layer"
    assert removed == ({s2["manifest_digest"]} | blobs_of(s2)) - shared, (rm, shared)
    assert [(t["repository"], t["tag"]) for t in rm["tags"]] == [("regfacade-test/schema2", "v1")], rm
    assert rm["bytes"] == sum(b["size"] for b in rm["removed"]) > 0, rm
    assert ctl.metric("regfacade_cache_removed_total") == len(removed)
    assert ctl.metric("regfacade_cache_removed_bytes_total") == rm["bytes"]
    assert ctl.metric("regfacade_cache_size_bytes") == size_before - rm["bytes"]
    for d in removed:
        assert not cached(ctl, d)
        assert not links_of(ctl, d), (d, links_of(ctl, d))  # links follow the bytes
    for d in shared:
        assert cached(ctl, d) and links_of(ctl, d)
    ls = json.loads(ctl.cmd("cache", "ls", "--json").stdout)
    assert [(i["repository"], i["tag"]) for i in ls["images"]] == [("regfacade-test/multi", "v1")], ls

    # The next pull goes upstream: refused while it is stopped, served when back.
    assert pull(ctl, "regfacade-test/schema2", "v1", tmp_path, "cold", check=False).returncode != 0
    upstream.start()
    pull(ctl, "regfacade-test/schema2", "v1", tmp_path, "again")
    assert all(cached(ctl, d) for d in blobs_of(s2))


def test_warm_through_admin_api_streams_progress_and_ctr_pulls_from_cache(ctl, upstream, plain_registry, containerd,
                                                                           tmp_path):
    multi = plain_registry.images["index"]
    r = ctl.api("POST", "/cache/warm", {"refs": ["regfacade-test/multi:v1"]})
    assert r.status == 200 and r.headers.get("content-type") == "application/x-ndjson", r
    lines = [json.loads(l) for l in r.body.decode().splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["failed"] == 0, lines[-1]
    seen = {l["digest"] for l in lines[:-1]}
    assert seen == blobs_of(multi) | {multi["manifest_digest"]} | {c["manifest_digest"] for c in
                                                                   multi["children"].values()}, lines
    assert {l["state"] for l in lines[:-1]} <= {"fetched", "cached"}
    # Warm again: everything is cached now, nothing fetched.
    again = [json.loads(l) for l in ctl.api("POST", "/cache/warm", {"refs": ["regfacade-test/multi:v1"]})
             .body.decode().splitlines()]
    assert again[-1]["fetched"] == 0 and again[-1]["cached"] == len(seen), again[-1]
    upstream.stop()
    ns = containerd.new_namespace()
    try:
        containerd.pull(f"{ctl.rf.host}/regfacade-test/multi:v1", namespace=ns, platform="linux/arm64")
    finally:
        containerd.remove_namespace(ns)


def test_admin_cache_endpoints_refuse_bad_requests(ctl, plain_registry):
    assert ctl.api("GET", "/cache", token=None).status == 401
    assert ctl.api("GET", "/cache", token="x" * 40).status == 401
    r = ctl.api("POST", "/cache/rm", {"ref": "Not A Name"})
    assert r.status == 400 and "not a valid repository name" in r.json()["errors"][0]["message"], r
    r = ctl.api("POST", "/cache/rm", {})
    assert r.status == 400 and "\"ref\" is required" in r.json()["errors"][0]["message"], r
    r = ctl.api("POST", "/cache/rm", {"ref": "regfacade-test/oci:v1"})
    assert r.status == 404 and "no cached resolution" in r.json()["errors"][0]["message"], r
    r = ctl.api("POST", "/cache/warm", {"refs": []})
    assert r.status == 400, r
    r = ctl.api("POST", "/cache/warm", {"refs": ["regfacade-test/absent:v1"]})
    assert r.status == 404, r
    r = ctl.api("POST", "/cache/warm", {"refs": ["regfacade-test/multi:v1"], "platforms": ["plan9/mips"]})
    assert r.status == 404 and "no manifest for the platforms named" in r.json()["errors"][0]["message"], r
    assert ctl.api("DELETE", "/cache/gc").status == 405
    # Nothing was cached by any of it but the manifests looked at.
    du = ctl.api("GET", "/cache/du").json()
    assert du["tmp_files"] == 0 and du["quarantine_files"] == 0, du
    assert ctl.cmd("cache", "rm", "sha256:" + "0" * 64, check=False).returncode == 1


# ---------------------------------------------------------------------------
# never a blob in use
# ---------------------------------------------------------------------------

def test_rm_keeps_a_blob_a_client_is_reading(ctl, plain_registry):
    big = plain_registry.images["big"]
    layer = big["layers"][0]["digest"]
    ctl.cmd("cache", "warm", "regfacade-test/big:v1")
    assert cached(ctl, layer)
    # A client reading the 110 MiB layer slowly: the server holds it open.
    import socket
    s = socket.create_connection(("127.0.0.1", ctl.rf.port), timeout=30)
    try:
        s.sendall(f"GET /v2/regfacade-test/big/blobs/{layer} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert b"200" in s.recv(4096)
        r = ctl.cmd("cache", "rm", "regfacade-test/big:v1", "--json", check=False)
        assert r.returncode == 1 and "in use" in r.stderr, (r.stdout, r.stderr)
        out = json.loads(r.stdout)
        assert out["in_use"] == [layer], out
        assert big["manifest_digest"] in {b["digest"] for b in out["removed"]}
        assert cached(ctl, layer)
    finally:
        s.close()
    # Once the reader is gone, it can go.
    assert wait_until(lambda: ctl.cmd("cache", "rm", layer, check=False).returncode == 0, timeout=60)
    assert not cached(ctl, layer)


# ---------------------------------------------------------------------------
# offline: the stopped server's cache, under its lock
# ---------------------------------------------------------------------------

def test_offline_commands_on_a_stopped_servers_cache(ctl, plain_registry):
    oci = plain_registry.images["oci"]
    ctl.cmd("cache", "warm", "regfacade-test/oci:v1")
    pid = ctl.rf.proc.pid
    ctl.stop()
    # ls and du read the folder itself.
    ls = json.loads(ctl.cmd("cache", "ls", "--json").stdout)
    assert [(i["repository"], i["digest"]) for i in ls["images"]] == [("regfacade-test/oci", oci["manifest_digest"])]
    du = json.loads(ctl.cmd("cache", "du", "--json").stdout)
    # (the blobs of the scratch images regfacade keeps for assembled images count too)
    assert du["blobs"] == len(ls["blobs"]) >= len(oci["blobs"]) + 1 and du["tag_records"] == 1, du
    assert du["bytes"] == sum(b["size"] for b in ls["blobs"]), (du, ls)
    # gc: a stray file in blobs/ and a tag record whose manifest is gone.
    stray = os.path.join(ctl.cache_dir, "blobs", "sha256", oci["config_digest"][7:9], "leftover.partial")
    with open(stray, "wb") as f:
        f.write(b"x" * 100)
    gc = json.loads(ctl.cmd("cache", "gc", "--json").stdout)
    assert gc["stray_files"] == 1 and gc["stray_bytes"] == 100 and gc["tag_records"] == 0, gc
    assert not os.path.exists(stray) and cached(ctl, oci["config_digest"])
    os.unlink(cache_path(ctl.cache_dir, oci["manifest_digest"]))
    gc = json.loads(ctl.cmd("cache", "gc", "--json").stdout)
    assert gc["tag_records"] == 1, gc
    assert json.loads(ctl.cmd("cache", "ls", "--json").stdout)["images"] == []
    # rm by digest, offline.
    r = ctl.cmd("cache", "rm", oci["config_digest"])
    assert "removed " + oci["config_digest"] in r.stdout, r.stdout
    assert not cached(ctl, oci["config_digest"])
    # warm, offline: the config's upstream clients and policy, no listener.
    s2 = plain_registry.images["schema2"]
    r = ctl.cmd("cache", "warm", "regfacade-test/schema2:v1", "--json")
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert lines[-1]["done"] and lines[-1]["failed"] == 0, lines
    assert {l["digest"] for l in lines[:-1]} == blobs_of(s2) | {s2["manifest_digest"]}, lines
    assert all(cached(ctl, d) for d in blobs_of(s2))
    r = ctl.cmd("cache", "warm", "regfacade-test/absent:v1", check=False)
    assert r.returncode == 1 and "regfacade-test/absent:v1" in r.stderr, r.stderr
    # A server running on the cache without an admin API: refused, naming its PID.
    other = Ctl(ctl.rf.group, ctl.work.parent, ctl.upstream, name="noadmin", admin=False)
    other.rf.config["cache"]["dir"] = ctl.cache_dir
    with open(other.config_path, "w") as f:
        json.dump(other.rf.config, f)
    other.start()
    try:
        r = subprocess.run([REGFACADE, "cache", "ls", "--config", other.config_path], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1, r
        assert f"PID {other.rf.proc.pid}" in r.stderr and "no \"admin\" section" in r.stderr, r.stderr
        assert pid != other.rf.proc.pid
    finally:
        other.stop()


# ---------------------------------------------------------------------------
# tags refresh
# ---------------------------------------------------------------------------

def test_tags_refresh_forgets_a_resolution(ctl, plain_registry, built_images, tmp_path):
    import images
    repo = f"cachectl-refresh-{free_port()}"
    first = images.push_image(built_images, "oci", plain_registry.host, repo=repo, tag="v1")
    pull(ctl, repo, "v1", tmp_path, "one")
    # The tag moves upstream; with a TTL of an hour the old answer stays.
    second = images.push_image(built_images, "schema2", plain_registry.host, repo=repo, tag="v1")
    assert first["manifest_digest"] != second["manifest_digest"]
    r = request(ctl.rf.host, "HEAD", f"/v2/{repo}/manifests/v1",
                headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                                   "application/vnd.oci.image.manifest.v1+json"})
    assert r.headers["docker-content-digest"] == first["manifest_digest"]
    out = ctl.cmd("tags", "refresh", f"{repo}:v1")
    assert "resolution forgotten" in out.stdout, out.stdout
    r = request(ctl.rf.host, "HEAD", f"/v2/{repo}/manifests/v1",
                headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                                   "application/vnd.oci.image.manifest.v1+json"})
    assert r.headers["docker-content-digest"] == second["manifest_digest"]
    # A second refresh has nothing cached to forget... until the next pull.
    again = json.loads(ctl.cmd("tags", "refresh", f"{repo}:v1", "--json").stdout)
    assert again["forgotten"] is True and again["upstream"] == "reg" and again["repository"] == repo, again
    assert ctl.api("POST", "/tags/refresh", {"ref": f"{repo}:v1"}).json()["forgotten"] is False


# ---------------------------------------------------------------------------
# /v2/_catalog
# ---------------------------------------------------------------------------

CATALOG_POLICY = """
return {
  authorize = function(req)
    if req.kind == "catalog" and req.repository and req.repository:match("multi") and not req.client.user then
      return false, "not for anonymous clients"
    end
    return true
  end,
}
"""


def test_catalog_lists_cached_repositories_policy_filtered_and_paged(procs, tmp_path, upstream, plain_registry):
    c = Ctl(procs, tmp_path, upstream, policy=CATALOG_POLICY).start()
    assert request(c.rf.host, "GET", "/v2/_catalog").json() == {"repositories": []}
    c.cmd("cache", "warm", "regfacade-test/oci:v1", "regfacade-test/multi:v1", "regfacade-test/schema2:v1")
    # Anonymous: multi filtered out by the policy's authorize.
    r = request(c.rf.host, "GET", "/v2/_catalog")
    assert r.status == 200 and r.json() == {"repositories": ["regfacade-test/oci", "regfacade-test/schema2"]}, r
    # A user sees all three, one page at a time.
    import base64
    auth = {"Authorization": "Basic " + base64.b64encode(b"alice:pw").decode()}
    r = request(c.rf.host, "GET", "/v2/_catalog?n=2", headers=auth)
    assert r.json() == {"repositories": ["regfacade-test/multi", "regfacade-test/oci"]}, r
    link = r.headers["link"]
    assert link == '</v2/_catalog?n=2&last=regfacade-test/oci>; rel="next"', link
    r = request(c.rf.host, "GET", link[1:link.index(">")], headers=auth)
    assert r.json() == {"repositories": ["regfacade-test/schema2"]} and "link" not in r.headers, r
    assert request(c.rf.host, "GET", "/v2/_catalog?n=x").status == 400


def test_gc_through_the_running_server_leaves_fresh_spools(ctl, plain_registry):
    """POST /cache/gc while serving: a spool unchanged for two hours is a
    leftover, one written just now may be a transfer in flight."""
    ctl.cmd("cache", "warm", "regfacade-test/oci:v1")
    tmp = os.path.join(ctl.cache_dir, "tmp")
    old, fresh = os.path.join(tmp, "old-spool"), os.path.join(tmp, "fresh-spool")
    for p in (old, fresh):
        with open(p, "wb") as f:
            f.write(b"z" * 10)
    two_hours_ago = os.stat(old).st_mtime - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    gc = json.loads(ctl.cmd("cache", "gc", "--json").stdout)
    assert gc["tmp_files"] == 1 and gc["tmp_bytes"] == 10 and gc["stray_files"] == 0, gc
    assert not os.path.exists(old) and os.path.exists(fresh)
    # Nothing gc may not touch was touched: the image is whole and served.
    ls = ctl.api("GET", "/cache").json()
    assert [i["missing"] for i in ls["images"]] == [0], ls
    oci = plain_registry.images["oci"]
    r = request(ctl.rf.host, "GET", f"/v2/regfacade-test/oci/blobs/{oci['config_digest']}")
    assert r.status == 200
    # tags refresh offline, on the stopped server's cache.
    ctl.stop()
    out = json.loads(ctl.cmd("tags", "refresh", "regfacade-test/oci:v1", "--json").stdout)
    assert out["forgotten"] is True, out
    assert json.loads(ctl.cmd("cache", "ls", "--json").stdout)["images"] == []


ASSEMBLED_POLICY = """
local mirror = require "regfacade.mirror"
return {
  resolve = function(req)
    local where, err = mirror.resolve(req)
    if where and req.repository == "cachectl/assembled" then
      where.repository = "regfacade-test/schema2"
      where.layers = { "base", { image = "reg/regfacade-test/big:v1" } }
    end
    return where, err
  end,
}
"""


def test_warm_an_assembled_image_then_pull_it_with_the_upstream_stopped(procs, tmp_path, upstream, plain_registry,
                                                                         containerd):
    """An image the policy assembles (a base plus another image's layer):
    warming takes the base and the added layer, so the first pull, with the
    upstream stopped, is assembled and served from the cache."""
    big, s2 = plain_registry.images["big"], plain_registry.images["schema2"]
    c = Ctl(procs, tmp_path, upstream, policy=ASSEMBLED_POLICY).start()
    lines = [json.loads(l) for l in c.api("POST", "/cache/warm", {"refs": ["cachectl/assembled:v1"]})
             .body.decode().splitlines()]
    assert lines[-1]["done"] and lines[-1]["failed"] == 0, lines
    warmed = {l["digest"] for l in lines[:-1]}
    assert blobs_of(s2) | {big["layers"][0]["digest"]} <= warmed, lines
    assert big["layers"][0]["digest"] in {l["digest"] for l in lines if l.get("state") == "fetched"}
    upstream.stop()
    ns = containerd.new_namespace()
    try:
        containerd.pull(f"{c.rf.host}/cachectl/assembled:v1", namespace=ns)
    finally:
        containerd.remove_namespace(ns)
