"""Real clients (skopeo, containerd/ctr, podman) pulling through regfacade
from a real upstream (Debian's docker-registry), per CONTRACT.md:

- skopeo copies every test image (OCI, Docker schema2, multi-platform index
  with --all, a 110 MiB layer) and verifies every digest; the manifest digest
  through regfacade is the upstream's (no rewrite by the mirror policy); the
  blobs land in <cache.dir>/blobs/sha256/xx/hex; with the upstream stopped a
  second copy is served from the cache.
- ctr pulls (and unpacks, which checks diff_ids) by HOST:PORT/REPO:TAG and
  runs the image; and pulls through a hosts.toml mirror, where containerd
  sends ?ns=UPSTREAM and regfacade maps it to that upstream.
- podman pulls and runs through regfacade.
"""
import os

import pytest

import clients
import images
from clients import assert_cached, check_copied_layout, diag, sha256_digest, start_facade
from harness import free_port


# ---------------------------------------------------------------------------
# skopeo
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["oci", "schema2", "index", "big"])
def test_skopeo_copy_through_facade_then_from_cache(name, procs, tmp_path, plain_registry):
    info = plain_registry.images[name]
    # An upstream of our own (same storage as the session's registry), so we may stop it.
    upstream = plain_registry.registry.clone(procs, str(tmp_path / "upstream"),
                                             name=f"upstream-{name}")
    rf = start_facade(procs, tmp_path, {"up": {"url": upstream.url}})
    ref = f"{rf.host}/{info['repo']}:{info['tag']}"
    all_images = "children" in info
    preserved = name != "schema2"  # an oci: layout cannot hold a schema2 manifest
    extra = ["--preserve-digests"] if preserved else []

    # The mirror policy serves the upstream manifest byte for byte.
    raw = clients.skopeo_inspect(ref, raw=True)
    assert sha256_digest(raw) == info["manifest_digest"], diag(rf, upstream)

    # skopeo verifies every blob digest while copying.
    out1 = str(tmp_path / "copy1")
    r = clients.skopeo_copy(f"docker://{ref}", f"oci:{out1}:{info['tag']}",
                            all_images=all_images, extra=extra, check=False)
    assert r.returncode == 0, f"{r.stderr}\n{diag(rf, upstream)}"
    check_copied_layout(out1, info["tag"], info, preserved)
    assert_cached(rf, info)

    # Upstream gone: the same pull is served from the cache (tag_ttl_seconds is high).
    upstream.stop()
    out2 = str(tmp_path / "copy2")
    r = clients.skopeo_copy(f"docker://{ref}", f"oci:{out2}:{info['tag']}",
                            all_images=all_images, extra=extra, check=False)
    assert r.returncode == 0, f"copy with the upstream stopped failed:\n{r.stderr}\n{diag(rf)}"
    check_copied_layout(out2, info["tag"], info, preserved)
    raw2 = clients.skopeo_inspect(ref, raw=True)
    assert raw2 == raw


# ---------------------------------------------------------------------------
# containerd
# ---------------------------------------------------------------------------

def ctr_image_digest(containerd, ref, namespace):
    """The target digest ctr recorded for ref (ctr images ls)."""
    r = containerd.ctr("images", "ls", namespace=namespace)
    for line in r.stdout.splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] == ref:
            return cols[2]
    raise AssertionError(f"{ref} not in ctr images ls:\n{r.stdout}")


@pytest.mark.parametrize("name", ["oci", "schema2", "index"])
def test_ctr_pull_and_run_through_facade(name, procs, tmp_path, plain_registry, containerd):
    info = plain_registry.images[name]
    rf = start_facade(procs, tmp_path, {"up": {"url": plain_registry.url}})
    ref = f"{rf.host}/{info['repo']}:{info['tag']}"
    ns = containerd.new_namespace()
    try:
        r = containerd.pull(ref, namespace=ns, check=False)
        assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr}\n{diag(rf)}"
        assert ctr_image_digest(containerd, ref, ns) == info["manifest_digest"]
        r = containerd.run(ref, f"rf-{name}-{ns}", "cat", images.TEST_FILE, namespace=ns,
                           check=False)
        assert r.returncode == 0, f"ctr run failed: {r.stderr}\n{containerd.log()[-3000:]}"
        assert r.stdout == images.TEST_FILE_CONTENT
        # ctr took linux/amd64 (this machine) from the index: its blobs went through us.
        amd64 = info["children"]["amd64"] if "children" in info else info
        for layer in amd64["layers"]:
            assert os.path.isfile(clients.cache_blob_path(rf.cache_dir, layer["digest"])), \
                diag(rf)
    finally:
        containerd.remove_namespace(ns)


def test_ctr_pull_via_hosts_mirror_maps_ns(procs, tmp_path, plain_registry, containerd):
    """containerd's hosts.toml mirror: requests carry ?ns=<upstream host:port>;
    regfacade picks the upstream whose url host is that, not the default."""
    info = plain_registry.images["oci"]
    dead = free_port()
    rf = start_facade(procs, tmp_path,
                      {"decoy": {"url": f"http://127.0.0.1:{dead}"},
                       "up": {"url": plain_registry.url}},
                      default_upstream="decoy")

    # The mapping itself, as CONTRACT.md states it.
    r = clients.http_request(
        f"{rf.url}/v2/{info['repo']}/manifests/{info['tag']}?ns={plain_registry.host}",
        headers={"Accept": clients.MANIFEST_ACCEPT})
    assert r.status == 200, f"{r!r}\n{diag(rf)}"
    assert r.headers.get("OCI-Namespace") == plain_registry.host
    assert r.headers.get("Docker-Content-Digest") == info["manifest_digest"]

    # containerd through the mirror; the fallback server is a dead port, so the
    # pull can only succeed through regfacade.
    hosts_dir = clients.write_hosts_dir(str(tmp_path), plain_registry.host, rf.url)
    ref = f"{plain_registry.host}/{info['repo']}:{info['tag']}"
    ns = containerd.new_namespace()
    try:
        r = containerd.pull(ref, namespace=ns, plain_http=False, hosts_dir=hosts_dir, check=False)
        assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr}\n{diag(rf)}"
        assert ctr_image_digest(containerd, ref, ns) == info["manifest_digest"]
        r = containerd.run(ref, f"rf-mirror-{ns}", "cat", images.TEST_FILE, namespace=ns,
                           check=False)
        assert r.returncode == 0, f"ctr run failed: {r.stderr}"
        assert r.stdout == images.TEST_FILE_CONTENT
        for layer in info["layers"]:
            assert os.path.isfile(clients.cache_blob_path(rf.cache_dir, layer["digest"])), \
                diag(rf)
    finally:
        containerd.remove_namespace(ns)


# ---------------------------------------------------------------------------
# podman
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["oci", "schema2"])
def test_podman_pull_and_run_through_facade(name, procs, tmp_path, plain_registry):
    info = plain_registry.images[name]
    rf = start_facade(procs, tmp_path, {"up": {"url": plain_registry.url}})
    ref = f"{rf.host}/{info['repo']}:{info['tag']}"
    pm = clients.Podman(str(tmp_path / "podman"), insecure=[rf.host])
    try:
        r = pm.pull(ref, check=False)
        assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
        digest = pm.podman("image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()
        assert digest == info["manifest_digest"]
        r = pm.run(ref, "cat", images.TEST_FILE, check=False)
        assert r.returncode == 0, f"podman run failed: {r.stderr}"
        assert r.stdout == images.TEST_FILE_CONTENT
        for layer in info["layers"]:
            assert os.path.isfile(clients.cache_blob_path(rf.cache_dir, layer["digest"])), \
                diag(rf)
    finally:
        pm.cleanup()
