"""Cached and fetched bytes stay right, and a hostile upstream cannot fill
the disk (docs/security.md, "Integrity of cached bytes").

- limits.blob_max_bytes and descriptor sizes: a huge Content-Length is
  refused before anything is reserved; a body without a length is cut.
- a cold Range on a blob whose bytes turn out wrong never completes.
- a flipped or truncated cached file is never served: verified on open
  (manifests on every read), found by `regfacade cache verify`, by the admin
  API and by the background scrub, quarantined and fetched again.
- an assembled image whose parts were evicted is generated again.

Every test runs the real binary against fake_upstream.py (hostile answers)
or a real docker-registry.
"""
import hashlib
import json
import os
import subprocess
import threading

import pytest

import layerkit
from fake_upstream import assert_oci_error, cache_path, request, sha256_digest, wait_until
from harness import REGFACADE, Regfacade

GiB = 1024 * 1024 * 1024
MiB = 1024 * 1024


def tmp_disk_use(cache_dir):
    """Bytes of disk the spools in cache/tmp hold (allocated blocks, so a
    fallocate'd reservation counts even before anything is written)."""
    d = os.path.join(cache_dir, "tmp")
    total = 0
    for f in os.listdir(d) if os.path.isdir(d) else ():
        try:
            total += os.stat(os.path.join(d, f)).st_blocks * 512
        except OSError:
            pass
    return total


def blob_path(repo, digest):
    return f"/v2/{repo}/blobs/{digest}"


def get_refused(rf, fake, repo, digest, *needles):
    """GET the blob: a 502 whose message holds every needle, after one
    upstream GET (never retried), with no spool left and nothing cached."""
    r = request(rf.host, "GET", blob_path(repo, digest))
    assert_oci_error(r, 502)
    msg = r.json()["errors"][0]["message"]
    assert all(n in msg for n in needles), msg
    assert fake.count("GET", blob_path(repo, digest)) == 1
    assert not os.path.exists(cache_path(rf.cache_dir, digest))
    assert wait_until(lambda: tmp_disk_use(rf.cache_dir) == 0, timeout=30)


# ---------------------------------------------------------------------------
# a hostile upstream cannot fill the disk
# ---------------------------------------------------------------------------

def test_terabyte_content_length_refused_with_502_not_retried(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/huge", "v1", layer_sizes=[3000])
    layer = img.layers[0].digest
    fake_upstream.misbehave(blob_path("acme/huge", layer), "announce", length=1 << 40)
    rf = fake_facade()
    # Refused on the headers: no retry, no spool left, nothing cached.
    get_refused(rf, fake_upstream, "acme/huge", layer, "1099511627776", "limits.blob_max_bytes")
    # The server serves on: the right bytes once the upstream behaves.
    fake_upstream.behave()
    r = request(rf.host, "GET", blob_path("acme/huge", layer))
    assert r.status == 200 and r.body == img.layers[0].data


def test_over_limit_content_length_reserves_nothing(fake_upstream, fake_facade):
    """The announced 64 MiB (over a 1 MiB limit) is never fallocate'd: while
    the upstream holds the connection open, cache/tmp stays empty."""
    img = fake_upstream.add_image("acme/big", "v1", layer_sizes=[3000])
    layer = img.layers[0].digest
    fake_upstream.misbehave(blob_path("acme/big", layer), "announce", length=64 * MiB, send=0, hold=True)
    rf = fake_facade(config={"limits": {"blob_max_bytes": MiB}})
    out = {}

    def get():
        out["r"] = request(rf.host, "GET", blob_path("acme/big", layer), timeout=120)

    t = threading.Thread(target=get)
    t.start()
    peak = 0
    try:
        assert wait_until(lambda: fake_upstream.count("GET", blob_path("acme/big", layer)) >= 1, timeout=60)
        # Until the answer is in: watch the disk the spools take.
        while t.is_alive():
            peak = max(peak, tmp_disk_use(rf.cache_dir))
            if peak > MiB:
                break
            t.join(0.02)
    finally:
        fake_upstream.release()
        t.join(120)
    assert peak <= MiB, f"{peak} bytes reserved in cache/tmp for a refused blob"
    r = out["r"]
    assert_oci_error(r, 502)
    assert "limits.blob_max_bytes" in r.json()["errors"][0]["message"], r


def test_chunked_body_longer_than_limit_is_cut_and_nothing_cached(fake_upstream, fake_facade):
    img = fake_upstream.add_image("acme/chunky", "v1", layer_sizes=[3000])
    layer = img.layers[0].digest
    fake_upstream.misbehave(blob_path("acme/chunky", layer), "chunked", repeat=3 * MiB)
    rf = fake_facade(config={"limits": {"blob_max_bytes": MiB}})
    get_refused(rf, fake_upstream, "acme/chunky", layer, "without announcing a length", "1048576")
    # A chunked body within the limit is fine (verified, cached).
    fake_upstream.misbehave(blob_path("acme/chunky", layer), "chunked")
    r = request(rf.host, "GET", blob_path("acme/chunky", layer))
    assert r.status == 200 and r.body == img.layers[0].data
    assert os.path.exists(cache_path(rf.cache_dir, layer))


def test_descriptor_size_rules_a_config_fetch(procs, fake_upstream, tmp_path):
    """An image's config is fetched for its descriptor: an upstream that
    announces more than the descriptor's size is refused before anything is
    written, whatever limits.blob_max_bytes allows."""
    img = fake_upstream.add_image("acme/cfg", "v1", layer_sizes=[500])
    files = layerkit.LayerFiles(str(tmp_path / "files"))
    variants = {"w": {"repository": "acme/cfg", "layers": ["base", {"file": files.tools["path"]}]}}
    fake_upstream.misbehave(blob_path("acme/cfg", img.config.digest), "announce", length=10 * MiB)
    rf = layerkit.start_layers_facade(procs, str(tmp_path), fake_upstream.url, variants)
    r = request(rf.host, "GET", "/v2/v/w/manifests/v1", headers={"Accept": layerkit.OCI_MANIFEST})
    assert_oci_error(r, 502)
    msg = r.json()["errors"][0]["message"]
    assert "descriptor says %d" % len(img.config.data) in msg, msg
    assert fake_upstream.count("GET", blob_path("acme/cfg", img.config.digest)) == 1
    fake_upstream.behave()
    r = request(rf.host, "GET", "/v2/v/w/manifests/v1", headers={"Accept": layerkit.OCI_MANIFEST})
    assert r.status == 200, r


# ---------------------------------------------------------------------------
# a cold Range on a blob whose bytes turn out wrong
# ---------------------------------------------------------------------------

def test_cold_range_of_wrong_blob_never_completes(fake_upstream, fake_facade):
    """The documented choice: a cold Range is cut from the whole (verified)
    fetch, and its last byte waits for the digest. Wrong bytes upstream: the
    206 is cut short, never complete, and nothing is cached."""
    img = fake_upstream.add_image("acme/rng", "v1", layer_sizes=[3 * MiB])
    layer = img.layers[0]
    fake_upstream.misbehave(blob_path("acme/rng", layer.digest), "corrupt")
    rf = fake_facade()
    r = request(rf.host, "GET", blob_path("acme/rng", layer.digest), headers={"Range": "bytes=0-99"})
    complete = r.status == 206 and r.error is None and len(r.body) == 100
    assert not complete, f"a cold Range of a wrong blob completed: {r}"
    assert r.status in (206, 502), r
    assert len(r.body) < 100 or r.status == 502, r
    assert not os.path.exists(cache_path(rf.cache_dir, layer.digest))
    # Right bytes upstream: the same Range is answered in full, and cached.
    fake_upstream.behave()
    r = request(rf.host, "GET", blob_path("acme/rng", layer.digest), headers={"Range": "bytes=1000-1099"})
    assert r.status == 206 and r.error is None and r.body == layer.data[1000:1100], r
    assert r.header("Content-Range") == f"bytes 1000-1099/{len(layer.data)}"
    assert wait_until(lambda: os.path.exists(cache_path(rf.cache_dir, layer.digest)), timeout=30)


# ---------------------------------------------------------------------------
# cached bytes stay right
# ---------------------------------------------------------------------------

def flip_byte(path, at=None):
    """Change one byte of a cached file in place (same size)."""
    size = os.path.getsize(path)
    at = size // 2 if at is None else at
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def quarantined(cache_dir):
    """{digest: count} of the files in cache/quarantine."""
    d = os.path.join(cache_dir, "quarantine")
    out = {}
    for f in os.listdir(d) if os.path.isdir(d) else ():
        digest = "sha256:" + f.split("-")[1]
        out[digest] = out.get(digest, 0) + 1
    return out


def cache_verify(config_path):
    return subprocess.run([REGFACADE, "cache", "verify", "--config", config_path], capture_output=True, text=True,
                          timeout=300)


def get_ok(rf, path, want, headers=None):
    r = request(rf.host, "GET", path, headers=headers)
    assert r.status == 200 and r.error is None, r
    assert r.body == want, f"GET {path}: wrong bytes served with 200 ({len(r.body)} bytes)"
    return r


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped", "truncated"])
def test_damaged_cached_blob_is_fetched_again_not_served(damage, fake_upstream, fake_facade):
    """While serving: a cached layer (served by sendfile) and a cached
    manifest changed on disk are never served; both are quarantined and
    fetched again, and served right from then on."""
    img = fake_upstream.add_image("acme/rot", "v1", layer_sizes=[2 * MiB])
    layer = img.layers[0]
    rf = fake_facade()
    lpath, mpath = blob_path("acme/rot", layer.digest), f"/v2/acme/rot/manifests/{img.digest}"
    get_ok(rf, lpath, layer.data)
    get_ok(rf, mpath, img.manifest, headers={"Accept": img.media_type})
    damage(cache_path(rf.cache_dir, layer.digest))
    damage(cache_path(rf.cache_dir, img.digest))
    for _ in range(2):  # never served twice: the second GET is a plain cache hit
        get_ok(rf, lpath, layer.data)
        get_ok(rf, mpath, img.manifest, headers={"Accept": img.media_type})
    assert fake_upstream.count("GET", lpath) == 2
    assert fake_upstream.count("GET", f"/v2/acme/rot/manifests/{img.digest}") == 2
    assert quarantined(rf.cache_dir) == {layer.digest: 1, img.digest: 1}
    log = rf.log()
    assert f"cached blob {layer.digest} failed verification" in log, log
    assert f"cached blob {img.digest} failed verification" in log, log
    # A range of the blob now cached again is right too.
    r = request(rf.host, "GET", lpath, headers={"Range": "bytes=10-19"})
    assert r.status == 206 and r.body == layer.data[10:20], r


def test_damage_while_stopped_is_found_after_restart(procs, tmp_path, plain_registry):
    """A real docker-registry's image, cached; the cache damaged while the
    server is down: after the restart no wrong byte is served."""
    oci = plain_registry.images["oci"]
    rf = Regfacade(procs, str(tmp_path), {"cache": {"dir": str(tmp_path / "cache"), "tag_ttl_seconds": 3600},
                                         "upstreams": {"reg": {"url": plain_registry.url}}}).start()
    repo = oci["repo"]
    blobs = {d: request(rf.host, "GET", blob_path(repo, d)).body for d in oci["blobs"]}
    for d, data in blobs.items():
        assert sha256_digest(data) == d
    layer, config = oci["layers"][0]["digest"], oci["config_digest"]
    rf.stop()
    truncate(cache_path(str(tmp_path / "cache"), layer))
    flip_byte(cache_path(str(tmp_path / "cache"), config))
    rf.start()
    for d, data in blobs.items():
        get_ok(rf, blob_path(repo, d), data)
    assert set(quarantined(str(tmp_path / "cache"))) == {layer, config}


def test_cache_verify_command_quarantines_and_lists(fake_upstream, fake_facade):
    a = fake_upstream.add_image("acme/a", "v1", layer_sizes=[300000, 5000])
    b = fake_upstream.add_image("acme/b", "v1", layer_sizes=[7000])
    rf = fake_facade()
    for img in (a, b):
        get_ok(rf, f"/v2/{img.repo}/manifests/{img.digest}", img.manifest, headers={"Accept": img.media_type})
        for bl in [img.config] + img.layers:
            get_ok(rf, blob_path(img.repo, bl.digest), bl.data)
    busy = cache_verify(rf.config_path)  # the server holds the cache: refused, nothing touched
    assert busy.returncode == 1 and "regfacade cache verify" in busy.stderr, busy
    rf.stop()
    clean = cache_verify(rf.config_path)
    assert clean.returncode == 0, clean
    assert "0 quarantined" in clean.stdout, clean.stdout
    flip_byte(cache_path(rf.cache_dir, a.layers[0].digest))
    truncate(cache_path(rf.cache_dir, b.layers[0].digest))
    flip_byte(cache_path(rf.cache_dir, a.digest), at=3)
    out = cache_verify(rf.config_path)
    assert out.returncode == 1, out
    listed = {line.split()[1].rstrip(":") for line in out.stdout.splitlines() if line.startswith("QUARANTINED ")}
    assert listed == {a.layers[0].digest, b.layers[0].digest, a.digest}, out.stdout
    assert "3 quarantined" in out.stdout and "7 cached blobs" in out.stdout, out.stdout
    assert set(quarantined(rf.cache_dir)) == listed
    again = cache_verify(rf.config_path)
    assert again.returncode == 0 and "4 cached blobs" in again.stdout, again
    # Served again: the quarantined ones fetched anew, right.
    rf.start()
    for img in (a, b):
        get_ok(rf, f"/v2/{img.repo}/manifests/{img.digest}", img.manifest, headers={"Accept": img.media_type})
        for bl in [img.config] + img.layers:
            get_ok(rf, blob_path(img.repo, bl.digest), bl.data)


def test_admin_cache_verify(fake_upstream, fake_facade, tmp_path):
    from harness import free_port
    token = "integrity-admin-token-0123456789"
    tf = tmp_path / "admin.token"
    tf.write_text(token + "\n")
    admin = f"127.0.0.1:{free_port()}"
    img = fake_upstream.add_image("acme/adm", "v1", layer_sizes=[4000])
    # The admin API comes with a pushed spec provider (docs/specs.md).
    rf = fake_facade(config={"admin": {"listen": admin, "token_file": str(tf)},
                             "specs": {"providers": {"ws": {"type": "pushed"}}}})
    get_ok(rf, blob_path("acme/adm", img.layers[0].digest), img.layers[0].data)
    get_ok(rf, blob_path("acme/adm", img.config.digest), img.config.data)
    auth = {"Authorization": f"Bearer {token}"}
    r = request(admin, "POST", "/cache/verify", headers={})
    assert r.status == 401, r
    r = request(admin, "POST", "/cache/verify", headers=auth)
    # The two blobs, and the specs module's own (scratch images).
    assert r.status == 200 and r.json()["checked"] >= 2 and r.json()["failed"] == [], r
    assert r.json()["bytes"] >= len(img.layers[0].data) + len(img.config.data), r
    flip_byte(cache_path(rf.cache_dir, img.layers[0].digest))
    r = request(admin, "POST", "/cache/verify", headers=auth)
    assert r.status == 200, r
    failed = r.json()["failed"]
    assert [f["digest"] for f in failed] == [img.layers[0].digest] and failed[0]["quarantined"], r
    assert "hash to" in failed[0]["reason"], failed
    get_ok(rf, blob_path("acme/adm", img.layers[0].digest), img.layers[0].data)


def test_scrub_finds_damage_while_serving(fake_upstream, fake_facade, tmp_path):
    """No request touches the damaged blob: the background scrub finds it,
    quarantines it, and the next GET fetches it again."""
    img = fake_upstream.add_image("acme/scrub", "v1", layer_sizes=[2 * MiB, 3000])
    layer = img.layers[0]
    from harness import free_port
    cache_dir = str(tmp_path / "scrub-cache")
    metrics = f"127.0.0.1:{free_port()}"
    rf = fake_facade(config={"cache": {"dir": cache_dir, "scrub_bytes_per_second": "64MiB"},
                             "metrics": {"listen": metrics}})
    lpath = blob_path("acme/scrub", layer.digest)
    get_ok(rf, lpath, layer.data)
    flip_byte(cache_path(cache_dir, layer.digest))
    other = blob_path("acme/scrub", img.layers[1].digest)
    found = False
    for _ in range(600):  # serving meanwhile; the scrub passes over the cache about once a second
        get_ok(rf, other, img.layers[1].data)
        if layer.digest in quarantined(cache_dir):
            found = True
            break
        threading.Event().wait(0.1)
    assert found, rf.log()
    assert fake_upstream.count("GET", lpath) == 1
    assert f"cached blob {layer.digest} failed verification" in rf.log()
    text = request(metrics, "GET", "/metrics").body.decode()
    assert "\nregfacade_cache_quarantined_total 1\n" in text, text
    verified = [l for l in text.splitlines() if l.startswith("regfacade_cache_verified_bytes_total ")]
    assert verified and int(verified[0].split()[1]) >= 2 * MiB, verified
    get_ok(rf, lpath, layer.data)
    assert fake_upstream.count("GET", lpath) == 2


def test_scrub_off_and_config_errors(tmp_path):
    cfg = {"cache": {"dir": str(tmp_path / "c"), "scrub_bytes_per_second": -1},
           "upstreams": {"u": {"url": "http://127.0.0.1:9"}}}
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(cfg))
    r = subprocess.run([REGFACADE, "check", "--config", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "cache.scrub_bytes_per_second" in r.stderr, r
    cfg["cache"]["scrub_bytes_per_second"] = 0
    cfg["limits"] = {"blob_max_bytes": 10}
    p.write_text(json.dumps(cfg))
    r = subprocess.run([REGFACADE, "check", "--config", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "limits.blob_max_bytes" in r.stderr, r
    r = subprocess.run([REGFACADE, "cache", "scrub"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown or missing subcommand scrub (verify, ls, du, rm, gc or warm)" in r.stderr, r


# ---------------------------------------------------------------------------
# generated images survive partial eviction
# ---------------------------------------------------------------------------

def evict(cache_dir, *digests):
    """What eviction does to a blob: its file is gone."""
    for d in digests:
        os.unlink(cache_path(cache_dir, d))


def test_generated_parts_evicted_are_generated_again(procs, fake_upstream, tmp_path):
    img = fake_upstream.add_image("acme/gen", "v1", layer_sizes=[3000])
    files = layerkit.LayerFiles(str(tmp_path / "files"))
    variants = {"w": {"repository": "acme/gen", "layers": ["base", {"file": files.tools["path"]}],
                      "path_prepend": "/tools/bin:"}}
    rf = layerkit.start_layers_facade(procs, str(tmp_path), fake_upstream.url, variants)
    accept = {"Accept": layerkit.OCI_MANIFEST}
    r = request(rf.host, "GET", "/v2/v/w/manifests/v1", headers=accept)
    assert r.status == 200, r
    digest, man = r.header("Docker-Content-Digest"), r.json()
    config, added = man["config"]["digest"], man["layers"][-1]["digest"]
    assert added == files.tools["digest"] and config != img.config.digest
    parts = {d: request(rf.host, "GET", blob_path("v/w", d)).body for d in (config, added)}
    for d, data in parts.items():
        assert sha256_digest(data) == d

    # By digest, the manifest still cached: its config and file layer come back.
    evict(rf.cache_dir, config, added)
    r = request(rf.host, "GET", f"/v2/v/w/manifests/{digest}", headers=accept)
    assert r.status == 200 and sha256_digest(r.body) == digest, r
    for d, data in parts.items():
        get_ok(rf, blob_path("v/w", d), data)

    # By tag: the same image, whole again.
    evict(rf.cache_dir, config, added)
    r = request(rf.host, "GET", "/v2/v/w/manifests/v1", headers=accept)
    assert r.status == 200 and r.header("Docker-Content-Digest") == digest, r
    assert os.path.exists(cache_path(rf.cache_dir, config)) and os.path.exists(cache_path(rf.cache_dir, added))

    # Only under the name it was generated for: another name asks its upstream.
    evict(rf.cache_dir, config)
    r = request(rf.host, "GET", blob_path("acme/gen", config))
    assert_oci_error(r, 404, "BLOB_UNKNOWN")
    assert not os.path.exists(cache_path(rf.cache_dir, config))
    get_ok(rf, blob_path("v/w", config), parts[config])


def test_generated_index_child_evicted_skopeo_pulls_by_tag_and_digest(procs, tmp_path, plain_registry):
    """A real docker-registry's multi-platform image with a file layer added:
    after a child manifest and a config are evicted, skopeo copies the
    generated index by digest and by tag."""
    import clients
    multi = plain_registry.images["index"]
    files = layerkit.LayerFiles(str(tmp_path / "files"))
    variants = {"m": {"repository": multi["repo"], "layers": ["base", {"file": files.extra["path"]}]}}
    rf = layerkit.start_layers_facade(procs, str(tmp_path / "rf"), plain_registry.url, variants)
    raw = clients.skopeo_inspect(f"{rf.host}/v/m:v1", raw=True)
    index = json.loads(raw)
    digest = sha256_digest(raw)
    child = index["manifests"][0]["digest"]
    child_doc = json.loads(request(rf.host, "GET", f"/v2/v/m/manifests/{child}",
                                   headers={"Accept": index["manifests"][0]["mediaType"]}).body)
    config = child_doc["config"]["digest"]
    clients.skopeo_copy(f"docker://{rf.host}/v/m:v1", f"oci:{tmp_path / 'out0'}:x", all_images=True)
    evict(rf.cache_dir, child, config)
    clients.skopeo_copy(f"docker://{rf.host}/v/m@{digest}", f"oci:{tmp_path / 'out1'}:x", all_images=True)
    evict(rf.cache_dir, child, config)
    clients.skopeo_copy(f"docker://{rf.host}/v/m:v1", f"oci:{tmp_path / 'out2'}:x", all_images=True)
    assert clients.skopeo_inspect(f"{rf.host}/v/m:v1", raw=True) == raw
