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


def write_policy(tmp_path):
    p = tmp_path / "layers.lua"
    p.write_text(layerkit.LAYER_POLICY)
    return str(p)


def layered_facade(fake_facade, tmp_path, fake_upstream, variants, name="regfacade", cache=None):
    """A regfacade with layerkit's policy; its one upstream is "up"."""
    cfg = {"policy": {"file": write_policy(tmp_path), "options": {"variants": variants}}}
    if cache:
        cfg["cache"] = dict({"dir": str(tmp_path / f"{name}-cache"), "tag_ttl_seconds": 3600}, **cache)
    rf = fake_facade(upstreams={"up": {"url": fake_upstream.url}}, config=cfg, name=name, tag_ttl=3600)
    return rf


def test_descriptor_size_rules_a_config_fetch(fake_upstream, fake_facade, tmp_path):
    """An image's config is fetched for its descriptor: an upstream that
    announces more than the descriptor's size is refused before anything is
    written, whatever limits.blob_max_bytes allows."""
    img = fake_upstream.add_image("acme/cfg", "v1", layer_sizes=[500])
    files = layerkit.LayerFiles(str(tmp_path / "files"))
    variants = {"w": {"repository": "acme/cfg", "layers": ["base", {"file": files.tools["path"]}]}}
    fake_upstream.misbehave(blob_path("acme/cfg", img.config.digest), "announce", length=10 * MiB)
    rf = layered_facade(fake_facade, tmp_path, fake_upstream, variants)
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
