"""Layer injection through the real binary, against a real
upstream (docker-registry) and real clients (containerd, skopeo, podman).

The policy is layerkit.LAYER_POLICY: a request for v/<variant>:<ref> gets the
stack config "policy.options.variants[variant]" describes. Layer sources:
.tar.gz and .tar files (layerkit.LayerFiles), the IDE image of
examples/workspace/build.sh ({image=, skip=1}), blobs by descriptor (from the
programmable fake upstream). Proved here:

- containerd pulls and unpacks the assembled image (unpacking checks every
  diff_id) and `ctr run` prints files from a file layer and an image layer
  and the prepended PATH; prepend, append and interleave orders, and a stack
  without "base"; a blob layer by descriptor;
- skopeo copies the assembled index for both platforms; the policy's
  `platforms` drops one; a layer given for one platform is in that
  platform's manifest only;
- podman runs the assembled image;
- Docker schema2 in -> schema2 out (added layers' media types converted),
  OCI in -> OCI out;
- HEAD and GET, by tag and by digest, agree; the config and every added
  layer are served as blobs with their digests;
- a restart between a pull by tag and a pull by digest serves the same
  digest; two processes with separate caches give byte-identical output; a
  changed decision gives a new digest;
- history: one entry per added layer, aligned with the non-empty layers;
  unknown manifest and config fields survive byte for byte;
- the examples/workspace example works end to end.
"""
import json
import os

import pytest

import clients
import images
import layerkit
from clients import diag
from layerkit import (DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR, DOCKER_MANIFEST, OCI_INDEX, OCI_LAYER_GZIP,
                      OCI_LAYER_TAR, OCI_MANIFEST, config_of, env_of, get_blob, get_manifest, manifest_ok,
                      sha256, start_layers_facade)

BASE_PATH = images.IMAGE_PATH


@pytest.fixture(scope="module")
def kit(plain_registry, built_images, tmp_path_factory):
    """Layer files, the workspace example's images (pushed), the odd image."""
    d = tmp_path_factory.mktemp("layers-kit")

    class Kit:
        pass

    k = Kit()
    k.files = layerkit.LayerFiles(str(d / "files"))
    k.ws = layerkit.WorkspaceBuild(str(d / "workspace"), plain_registry.host)
    k.odd_manifest, k.odd_config = layerkit.build_odd_image(str(d / "odd"), plain_registry.host)
    # the multi-platform index again, as a Docker manifest list
    clients.skopeo_copy(built_images.oci_ref("multi"), f"docker://{plain_registry.host}/rf-layers/multi-s2:v1",
                        all_images=True, extra=["--format", "v2s2"])
    k.list_s2 = images.describe(plain_registry.host, "rf-layers/multi-s2", "v1")
    k.reg = plain_registry
    k.oci = plain_registry.images["oci"]
    k.schema2 = plain_registry.images["schema2"]
    k.index = plain_registry.images["index"]
    return k


def ide_ref(name="acme/ide"):
    return f"up/{name}:1.2"


def standard_variants(kit):
    """The variants most tests use."""
    f = kit.files
    ide = {"image": ide_ref(), "skip": 1}
    return {
        # the workspace stack: base, a file layer, the IDE's layers minus its first
        "ws": {"repository": kit.oci["repo"], "path_prepend": "/ide/bin:", "env_modifiers": True,
               "layers": ["base", {"file": f.tools["path"], "created_by": "ADD tools"}, ide]},
        "prepend": {"repository": kit.oci["repo"],
                    "layers": [{"file": f.override["path"]}, {"file": f.tools["path"]}, "base"]},
        "append": {"repository": kit.oci["repo"],
                   "layers": ["base", {"file": f.override["path"]}, {"file": f.tools["path"]}]},
        "interleave": {"repository": kit.oci["repo"],
                       "layers": [{"file": f.tools["path"]}, "base", ide, {"file": f.override["path"]}]},
        # no "base": the busybox layers of the small image, then tools, on the IDE image's config
        "nobase": {"repository": "acme/ide", "reference": "1.2",
                   "layers": [{"image": f"up/{kit.oci['repo']}:v1"}, {"file": f.tools["path"]}]},
    }


def digests(m):
    return [l["digest"] for l in m["layers"]]


def non_empty(history):
    return [h for h in history if not h.get("empty_layer")]


def ctr_pull_run(containerd, rf, ref, script, ns, cid=None):
    r = containerd.pull(ref, namespace=ns, check=False)
    assert r.returncode == 0, f"ctr pull {ref}: {r.stdout[-2000:]}\n{r.stderr}\n{diag(rf)}"
    r = containerd.run(ref, cid or f"rf-l-{ns}", "sh", "-c", script, namespace=ns, check=False)
    assert r.returncode == 0, f"ctr run {ref}: {r.stdout}\n{r.stderr}\n{containerd.log()[-2000:]}"
    return r.stdout


# ---------------------------------------------------------------------------
# containerd: the workspace stack, the orders, no base
# ---------------------------------------------------------------------------

def test_ctr_runs_file_and_image_layers_with_prepended_path(kit, procs, tmp_path, containerd):
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, standard_variants(kit))
    body, m, digest = manifest_ok(rf, "v/ws")
    _, cfg = config_of(rf, "v/ws", m)
    base = kit.oci
    ide_layers = [l["digest"] for l in kit.ws.ide["layers"]]
    assert digests(m) == [l["digest"] for l in base["layers"]] + [kit.files.tools["digest"]] + ide_layers[1:]
    env = env_of(cfg)
    # env_prepend, then the IDE config's GITPOD_ENV_PREPEND_PATH / SET_EDITOR
    assert env["PATH"] == "/ide/bin/remote-cli:/ide/bin:" + BASE_PATH
    assert env["EDITOR"] == "/ide/bin/code"

    ns = containerd.new_namespace()
    try:
        out = ctr_pull_run(containerd, rf, f"{rf.host}/v/ws:v1",
                           'echo "PATH=$PATH"; cat /opt/tools/hello.txt /ide/version.txt; '
                           'code; cat /etc/regfacade-test.txt', ns)
        assert out.splitlines() == [
            f"PATH=/ide/bin/remote-cli:/ide/bin:{BASE_PATH}",
            layerkit.LayerFiles.TOOLS_TEXT.decode().strip(),
            "ide 1.2",
            "ide: code 1.2 (EDITOR=/ide/bin/code)",
            images.TEST_FILE_CONTENT.strip(),
        ]
    finally:
        containerd.remove_namespace(ns)


@pytest.mark.parametrize("order", ["prepend", "append", "interleave", "nobase"])
def test_ctr_orders(order, kit, procs, tmp_path, containerd):
    """The stack is the final order: a later layer wins over an earlier one
    (override.tar replaces the base's test file only when it is above it)."""
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, standard_variants(kit))
    _, m, _ = manifest_ok(rf, f"v/{order}")
    _, cfg = config_of(rf, f"v/{order}", m)
    f = kit.files
    base = [l["digest"] for l in kit.oci["layers"]]
    ide = [l["digest"] for l in kit.ws.ide["layers"]][1:]
    want = {
        "prepend": [f.override["digest"], f.tools["digest"]] + base,
        "append": base + [f.override["digest"], f.tools["digest"]],
        "interleave": [f.tools["digest"]] + base + ide + [f.override["digest"]],
        "nobase": base + [f.tools["digest"]],
    }[order]
    assert digests(m) == want
    assert len(cfg["rootfs"]["diff_ids"]) == len(want)
    assert len(non_empty(cfg["history"])) == len(want)
    # the uncompressed .tar keeps its type, the .tar.gz its own
    types = {l["digest"]: l["mediaType"] for l in m["layers"]}
    if f.override["digest"] in types:
        assert types[f.override["digest"]] == OCI_LAYER_TAR
    assert types[f.tools["digest"]] == OCI_LAYER_GZIP
    if order == "nobase":
        # the upstream's (acme/ide) config, with only the listed layers
        assert "GITPOD_ENV_SET_EDITOR=/ide/bin/code" in cfg["config"]["Env"]
        assert cfg["rootfs"]["diff_ids"][-1] == f.tools["diff_id"]
        assert [h["created_by"] for h in cfg["history"] if h.get("empty_layer")] == ["ENV GITPOD_ENV_*"]

    expect_test_file = {
        "prepend": images.TEST_FILE_CONTENT, "append": f.OVERRIDE_TEXT.decode(),
        "interleave": f.OVERRIDE_TEXT.decode(), "nobase": images.TEST_FILE_CONTENT,
    }[order]
    ns = containerd.new_namespace()
    try:
        out = ctr_pull_run(containerd, rf, f"{rf.host}/v/{order}:v1",
                           "cat /etc/regfacade-test.txt /opt/tools/hello.txt; "
                           "if [ -e /ide/version.txt ]; then echo ide; else echo no-ide; fi", ns)
        assert out == expect_test_file + f.TOOLS_TEXT.decode() + \
            ("ide\n" if order == "interleave" else "no-ide\n")
    finally:
        containerd.remove_namespace(ns)


def test_multi_member_gzip_file_layer(kit, procs, tmp_path, containerd):
    """A .tar.gz of two gzip members: its diff_id covers the whole tar (the
    unpack checks it)."""
    f = kit.files
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, {
        "mm": {"repository": kit.oci["repo"], "layers": ["base", {"file": f.multi["path"]}]}})
    _, m, _ = manifest_ok(rf, "v/mm")
    _, cfg = config_of(rf, "v/mm", m)
    assert m["layers"][-1]["digest"] == f.multi["digest"]
    assert cfg["rootfs"]["diff_ids"][-1] == f.multi["diff_id"]
    ns = containerd.new_namespace()
    try:
        out = ctr_pull_run(containerd, rf, f"{rf.host}/v/mm:v1", "cat /opt/multi/a.txt; wc -c < /opt/multi/b.bin", ns)
        assert out.split() == f.MULTI_TEXT.decode().split() + ["200000"]
    finally:
        containerd.remove_namespace(ns)


def test_ctr_runs_blob_layer_by_descriptor(kit, procs, tmp_path, containerd, fake_upstream):
    """{blob=, size=, media_type=, diff_id=, upstream=, repository=}: the
    manifest names the descriptor, the blob comes from that upstream."""
    blob, diff_id = layerkit.tar_bytes({"opt/blob.txt": b"from a blob layer\n"}), None
    diff_id = sha256(blob)
    import gzip
    gz = gzip.compress(blob, mtime=0)
    digest = fake_upstream.put_blob("acme/blobs", gz)
    variants = {"blob": {"repository": kit.oci["repo"], "layers": [
        "base", {"blob": digest, "size": len(gz), "media_type": OCI_LAYER_GZIP, "diff_id": diff_id,
                 "upstream": "fake", "repository": "acme/blobs", "comment": "by descriptor"}]}}
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, variants,
                             upstreams={"fake": {"url": fake_upstream.url}})
    _, m, _ = manifest_ok(rf, "v/blob")
    assert m["layers"][-1] == {"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(gz)}
    _, cfg = config_of(rf, "v/blob", m)
    assert cfg["history"][-1]["comment"] == "by descriptor"
    ns = containerd.new_namespace()
    try:
        out = ctr_pull_run(containerd, rf, f"{rf.host}/v/blob:v1", "cat /opt/blob.txt", ns)
        assert out == "from a blob layer\n"
    finally:
        containerd.remove_namespace(ns)


# ---------------------------------------------------------------------------
# indexes: skopeo --all, platforms filter, per-platform layers
# ---------------------------------------------------------------------------

def test_skopeo_copies_assembled_index_and_platform_filters(kit, procs, tmp_path, containerd):
    f = kit.files
    variants = {
        "multi": {"repository": kit.index["repo"], "layers": [
            "base", {"file": f.tools["path"]}, {"file": f.arm["path"], "platforms": ["linux/arm64"]}]},
        "multi-amd64": {"repository": kit.index["repo"], "platforms": ["linux/amd64"],
                        "layers": ["base", {"file": f.tools["path"]}]},
        "list-s2": {"repository": "rf-layers/multi-s2", "layers": [
            "base", {"file": f.tools["path"]}, {"file": f.arm["path"], "platforms": ["linux/arm64"]}]},
    }
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, variants)
    _, idx, idx_digest = manifest_ok(rf, "v/multi")
    assert idx["mediaType"] == OCI_INDEX
    by_arch = {d["platform"]["architecture"]: d for d in idx["manifests"]}
    assert set(by_arch) == {"amd64", "arm64"}
    for arch, d in by_arch.items():
        up = kit.index["children"][arch]
        assert d["digest"] != up["manifest_digest"]
        body, m, _ = manifest_ok(rf, "v/multi", d["digest"])
        assert d["size"] == len(body)
        want = [l["digest"] for l in up["layers"]] + [f.tools["digest"]]
        if arch == "arm64":
            want.append(f.arm["digest"])
        assert digests(m) == want, arch
        _, cfg = config_of(rf, "v/multi", m)
        assert cfg["architecture"] == arch
        assert len(cfg["rootfs"]["diff_ids"]) == len(want)

    # skopeo copies both platforms, checking every digest
    out = str(tmp_path / "copy")
    r = clients.skopeo_copy(f"docker://{rf.host}/v/multi:v1", f"oci:{out}:v1", all_images=True,
                            extra=["--preserve-digests"], check=False)
    assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
    lay = images.Layout(out)
    assert lay.descriptor("v1")["digest"] == idx_digest
    copied = json.loads(lay.read_blob(idx_digest))
    assert {d["digest"] for d in copied["manifests"]} == {d["digest"] for d in idx["manifests"]}
    for d in copied["manifests"]:
        cm = json.loads(lay.read_blob(d["digest"]))
        for l in cm["layers"]:
            assert os.path.isfile(lay.blob_path(l["digest"]))

    # the policy's platforms: one left
    _, idx1, _ = manifest_ok(rf, "v/multi-amd64")
    assert [d["platform"]["architecture"] for d in idx1["manifests"]] == ["amd64"]
    assert idx1["manifests"][0]["digest"] == by_arch["amd64"]["digest"]  # same decision for amd64
    out1 = str(tmp_path / "copy1")
    r = clients.skopeo_copy(f"docker://{rf.host}/v/multi-amd64:v1", f"oci:{out1}:v1", all_images=True,
                            check=False)
    assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
    copied1 = json.loads(images.Layout(out1).read_blob(images.Layout(out1).descriptor("v1")["digest"]))
    assert [d["platform"]["architecture"] for d in copied1["manifests"]] == ["amd64"]

    # a Docker manifest list stays a Docker list of Docker manifests
    r = get_manifest(rf, "v/list-s2", "v1")
    assert r.status == 200 and r.headers["Content-Type"] == images.DOCKER_LIST, r
    lst = json.loads(r.body)
    assert lst["mediaType"] == images.DOCKER_LIST
    for d in lst["manifests"]:
        assert d["mediaType"] == DOCKER_MANIFEST
        body, m, _ = manifest_ok(rf, "v/list-s2", d["digest"])
        assert d["size"] == len(body) and m["mediaType"] == DOCKER_MANIFEST
        arch = d["platform"]["architecture"]
        assert len(m["layers"]) == len(kit.list_s2["children"][arch]["layers"]) + (2 if arch == "arm64" else 1)
        assert {l["mediaType"] for l in m["layers"]} == {DOCKER_LAYER_GZIP}
    ns = containerd.new_namespace()
    try:
        out = ctr_pull_run(containerd, rf, f"{rf.host}/v/list-s2:v1",
                           "cat /opt/tools/hello.txt; ls /etc/arm-only.txt 2>/dev/null || echo no-arm", ns)
        assert out == f.TOOLS_TEXT.decode() + "no-arm\n"
    finally:
        containerd.remove_namespace(ns)


# ---------------------------------------------------------------------------
# podman
# ---------------------------------------------------------------------------

def test_podman_runs_assembled_image(kit, procs, tmp_path):
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, standard_variants(kit))
    _, _, digest = manifest_ok(rf, "v/ws")
    ref = f"{rf.host}/v/ws:v1"
    pm = clients.Podman(str(tmp_path / "podman"), insecure=[rf.host])
    try:
        r = pm.pull(ref, check=False)
        assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
        got = pm.podman("image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()
        assert got == digest
        r = pm.run(ref, "sh", "-c", 'echo "$PATH"; cat /opt/tools/hello.txt /ide/version.txt', check=False)
        assert r.returncode == 0, f"podman run: {r.stderr}"
        assert r.stdout.splitlines() == [f"/ide/bin/remote-cli:/ide/bin:{BASE_PATH}",
                                         kit.files.TOOLS_TEXT.decode().strip(), "ide 1.2"]
    finally:
        pm.cleanup()


# ---------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------

def test_schema2_in_schema2_out_and_oci_in_oci_out(kit, procs, tmp_path, containerd):
    f = kit.files
    variants = {
        # Docker base, OCI-typed file layers and an OCI IDE image
        "s2": {"repository": kit.schema2["repo"],
               "layers": ["base", {"file": f.tools["path"]}, {"file": f.override["path"]},
                          {"image": ide_ref(), "skip": 1}]},
        # OCI base, a Docker IDE image
        "oci": {"repository": kit.oci["repo"],
                "layers": ["base", {"file": f.tools["path"]}, {"image": ide_ref("acme/ide-s2"), "skip": 1}]},
    }
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, variants)
    r = get_manifest(rf, "v/s2", "v1")
    assert r.status == 200, r
    assert r.headers["Content-Type"] == DOCKER_MANIFEST
    m = json.loads(r.body)
    assert m["mediaType"] == DOCKER_MANIFEST
    assert m["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert [l["mediaType"] for l in m["layers"]] == \
        [DOCKER_LAYER_GZIP] * len(kit.schema2["layers"]) + [DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR, DOCKER_LAYER_GZIP]
    for l in m["layers"]:  # Docker's descriptor key order
        assert list(l) == ["mediaType", "size", "digest"]
    # an OCI-only client cannot take it (the type is not converted)
    r = get_manifest(rf, "v/s2", "v1", accept=OCI_MANIFEST)
    assert r.status == 404 and r.error_codes() == ["MANIFEST_UNKNOWN"]

    r = get_manifest(rf, "v/oci", "v1")
    assert r.status == 200 and r.headers["Content-Type"] == OCI_MANIFEST, r
    m = json.loads(r.body)
    assert m.get("mediaType", OCI_MANIFEST) == OCI_MANIFEST  # optional in OCI; umoci leaves it out
    assert {l["mediaType"] for l in m["layers"]} == {OCI_LAYER_GZIP}
    assert m["layers"][-1]["digest"] == kit.ws.ide_s2["layers"][-1]["digest"]

    # both unpack (every diff_id checked) and run in containerd
    for v in ("s2", "oci"):
        ns = containerd.new_namespace()
        try:
            out = ctr_pull_run(containerd, rf, f"{rf.host}/v/{v}:v1", "cat /opt/tools/hello.txt /ide/version.txt",
                               ns)
            assert out == f.TOOLS_TEXT.decode() + "ide 1.2\n"
        finally:
            containerd.remove_namespace(ns)


# ---------------------------------------------------------------------------
# content addressing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["ws", "nobase", "multi"])
def test_head_and_get_by_tag_and_digest_agree(variant, kit, procs, tmp_path):
    variants = standard_variants(kit)
    variants["multi"] = {"repository": kit.index["repo"], "layers": ["base", {"file": kit.files.tools["path"]}]}
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, variants)
    repo = f"v/{variant}"
    get_tag = get_manifest(rf, repo, "v1")
    assert get_tag.status == 200, f"{get_tag!r}\n{diag(rf)}"
    digest = get_tag.headers["Docker-Content-Digest"]
    assert sha256(get_tag.body) == digest
    answers = [get_tag, get_manifest(rf, repo, "v1", method="HEAD"), get_manifest(rf, repo, digest),
               get_manifest(rf, repo, digest, method="HEAD"), get_manifest(rf, repo, "v1")]
    for r in answers:
        assert r.status == 200, r
        assert r.headers["Docker-Content-Digest"] == digest
        assert r.headers["ETag"] == f'"{digest}"'
        assert r.headers["Content-Type"] == get_tag.headers["Content-Type"]
        assert int(r.headers["Content-Length"]) == len(get_tag.body)
    assert answers[2].body == get_tag.body and answers[4].body == get_tag.body
    # the manifest and every blob it names are served with their digests
    m = json.loads(get_tag.body)
    manifests = [m] if "layers" in m else [json.loads(get_manifest(rf, repo, d["digest"]).body)
                                           for d in m["manifests"]]
    for mm in manifests:
        for d in [mm["config"]] + mm["layers"]:
            h = get_blob(rf, repo, d["digest"], method="HEAD")
            assert h.status == 200 and int(h.headers["Content-Length"]) == d["size"], (d, h)
            assert h.headers["Docker-Content-Digest"] == d["digest"]
            g = get_blob(rf, repo, d["digest"])
            assert g.status == 200 and sha256(g.body) == d["digest"] and len(g.body) == d["size"], d


def test_restart_between_pull_by_tag_and_pull_by_digest(kit, procs, tmp_path, containerd):
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, standard_variants(kit))
    ns = containerd.new_namespace()
    ns2 = containerd.new_namespace()
    try:
        r = containerd.pull(f"{rf.host}/v/ws:v1", namespace=ns, check=False)
        assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
        _, _, digest = manifest_ok(rf, "v/ws")
        rf.stop()
        rf.start()
        r = get_manifest(rf, "v/ws", digest)
        assert r.status == 200 and sha256(r.body) == digest, f"{r!r}\n{diag(rf)}"
        # a fresh namespace pulls everything again, by digest
        out = ctr_pull_run(containerd, rf, f"{rf.host}/v/ws@{digest}", "cat /ide/version.txt", ns2)
        assert out == "ide 1.2\n"
        # and the tag still gives the same digest
        assert manifest_ok(rf, "v/ws")[2] == digest
    finally:
        containerd.remove_namespace(ns)
        containerd.remove_namespace(ns2)


def test_two_processes_give_byte_identical_images(kit, procs, tmp_path):
    variants = standard_variants(kit)
    variants["multi"] = {"repository": kit.index["repo"],
                         "layers": ["base", {"file": kit.files.tools["path"]},
                                    {"file": kit.files.arm["path"], "platforms": ["linux/arm64"]}]}
    a = start_layers_facade(procs, str(tmp_path / "a"), kit.reg.url, variants, name="rf-a")
    b = start_layers_facade(procs, str(tmp_path / "b"), kit.reg.url, variants, name="rf-b")
    assert a.cache_dir != b.cache_dir
    for v in ("ws", "interleave", "nobase", "multi"):
        ba, ma, da = manifest_ok(a, f"v/{v}")
        bb, mb, db = manifest_ok(b, f"v/{v}")
        assert ba == bb, v
        children = [ma] if "layers" in ma else [manifest_ok(a, f"v/{v}", d["digest"])[1] for d in ma["manifests"]]
        for m in children:
            assert config_of(a, f"v/{v}", m)[0] == config_of(b, f"v/{v}", m)[0]
        if "manifests" in mb:
            for d in mb["manifests"]:
                assert manifest_ok(b, f"v/{v}", d["digest"])[0] == manifest_ok(a, f"v/{v}", d["digest"])[0]


def test_changed_decision_gives_new_digest(kit, procs, tmp_path):
    variants = standard_variants(kit)
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, variants)
    _, _, d1 = manifest_ok(rf, "v/ws")
    rf.stop()
    # the same cache, one more layer in the decision
    variants["ws"]["layers"].append({"file": kit.files.extra["path"]})
    rf2 = start_layers_facade(procs, str(tmp_path), kit.reg.url, variants, cache_dir=rf.cache_dir)
    _, m2, d2 = manifest_ok(rf2, "v/ws")
    assert d2 != d1
    assert m2["layers"][-1]["digest"] == kit.files.extra["digest"]
    # another order is another image too
    variants["ws"]["layers"] = variants["ws"]["layers"][:-1]
    variants["ws"]["layers"].insert(0, variants["ws"]["layers"].pop())
    rf2.stop()
    rf3 = start_layers_facade(procs, str(tmp_path), kit.reg.url, variants, cache_dir=rf.cache_dir)
    _, _, d3 = manifest_ok(rf3, "v/ws")
    assert d3 not in (d1, d2)
    # what was served before is still served by digest
    assert manifest_ok(rf3, "v/ws", d1)[2] == d1
    assert manifest_ok(rf3, "v/ws", d2)[2] == d2


def test_moved_tags_give_new_digests(kit, procs, tmp_path, built_images):
    """A new upstream digest, of the base or of an added image, is a new
    decision: a new image (tag_ttl_seconds 0: every request asks upstream)."""
    host = kit.reg.host
    suffix = f"{os.getpid()}-{tmp_path.name[-10:]}"
    base_repo, ide_repo = f"rf-layers/moving-base-{suffix}", f"rf-layers/moving-ide-{suffix}"
    clients.skopeo_copy(built_images.oci_ref("small"), f"docker://{host}/{base_repo}:v1")
    clients.skopeo_copy(f"oci:{kit.ws.layout}:ide", f"docker://{host}/{ide_repo}:1.2")
    variants = {"mv": {"repository": base_repo, "layers": ["base", {"image": f"up/{ide_repo}:1.2", "skip": 1}]}}
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, variants, tag_ttl=0)
    _, m1, d1 = manifest_ok(rf, "v/mv")
    assert manifest_ok(rf, "v/mv")[2] == d1  # nothing moved: the same image
    # the base tag moves (same layers, another config)
    clients.skopeo_copy(built_images.oci_ref("small-arm64"), f"docker://{host}/{base_repo}:v1")
    _, m2, d2 = manifest_ok(rf, "v/mv")
    assert d2 != d1 and m2["config"]["digest"] != m1["config"]["digest"]
    # the IDE tag moves (the app image: other layers)
    clients.skopeo_copy(f"oci:{kit.ws.layout}:app", f"docker://{host}/{ide_repo}:1.2")
    _, m3, d3 = manifest_ok(rf, "v/mv")
    assert d3 not in (d1, d2)
    assert m3["layers"][-1]["digest"] == kit.ws.app["layers"][-1]["digest"]


# ---------------------------------------------------------------------------
# config: history, unknown fields
# ---------------------------------------------------------------------------

def test_history_one_entry_per_added_layer_and_aligned(kit, procs, tmp_path):
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, standard_variants(kit))
    up_cfg = json.loads(clients.http_request(
        f"{kit.reg.url}/v2/{kit.oci['repo']}/blobs/{kit.oci['config_digest']}").body)
    for v, added in (("ws", 2), ("interleave", 3)):
        _, m, _ = manifest_ok(rf, f"v/{v}")
        _, cfg = config_of(rf, f"v/{v}", m)
        hist = cfg["history"]
        assert len(hist) == len(up_cfg["history"]) + added, v
        assert len(non_empty(hist)) == len(m["layers"]) == len(cfg["rootfs"]["diff_ids"])
        # the base's entries, its empty_layer ones included, stay one block in order
        base_pos = [i for i, h in enumerate(hist) if h in up_cfg["history"]]
        assert [hist[i] for i in base_pos] == up_cfg["history"]
        assert base_pos == list(range(base_pos[0], base_pos[0] + len(up_cfg["history"])))
        # added entries carry the base's created time (deterministic)
        for h in hist:
            if h not in up_cfg["history"]:
                assert h["created"] == up_cfg["created"]
    _, m, _ = manifest_ok(rf, "v/ws")
    _, cfg = config_of(rf, "v/ws", m)
    assert cfg["history"][-2]["created_by"] == "ADD tools"


def test_unknown_fields_survive(kit, procs, tmp_path):
    variants = {"odd": {"repository": "rf-layers/odd", "path_prepend": "/ide/bin:",
                        "layers": ["base", {"file": kit.files.tools["path"]}]}}
    rf = start_layers_facade(procs, str(tmp_path), kit.reg.url, variants)
    body, m, _ = manifest_ok(rf, "v/odd")
    base_m = json.loads(kit.odd_manifest)
    assert list(m) == list(base_m)
    assert m["annotations"] == {"org.example.kept": "yes"}
    assert m["layers"][0] == base_m["layers"][0]
    assert b'"annotations":{"x-layer-note":"kept"}' in body
    cfg_bytes, cfg = config_of(rf, "v/odd", m)
    base_cfg = json.loads(kit.odd_config)
    assert list(cfg) == list(base_cfg)
    assert list(cfg["config"]) == list(base_cfg["config"])
    for raw in (b'"x-first":{"z":1,"a":[],"n":null}', b'"x-inner":[]', b'"Labels":{}',
                b'"x-big":18446744073709551615', b'"x-neg":-9223372036854775808',
                b'"x-last":{"deep":{"deeper":[1,2,{"k":"v"}]}}'):
        assert raw in cfg_bytes, raw
    assert cfg["x-float"] == 1.5e300
    assert cfg["config"]["Env"] == ["PATH=/ide/bin:/bin"]
    assert len(non_empty(cfg["history"])) == 2 and cfg["history"][1]["empty_layer"] is True


# ---------------------------------------------------------------------------
# examples/workspace
# ---------------------------------------------------------------------------

def test_workspace_example_end_to_end(kit, procs, tmp_path, containerd):
    """examples/workspace/config.json and policy.lua as shipped (upstream
    url, cache and layer file pointed at this test's), build.sh's output."""
    ex = os.path.join(layerkit.ROOT, "examples", "workspace")
    with open(os.path.join(ex, "config.json")) as fh:
        cfg = json.load(fh)
    cfg.pop("listen")
    cfg["cache"]["dir"] = str(tmp_path / "cache")
    cfg["policy"]["file"] = os.path.join(ex, "policy.lua")
    cfg["upstreams"]["local"]["url"] = kit.reg.url
    cfg["layers"]["supervisor"]["file"] = kit.ws.supervisor
    from harness import Regfacade
    rf = Regfacade(procs, str(tmp_path), cfg, name="workspace").start()
    _, m, digest = manifest_ok(rf, "remote/demo", "latest")
    want = [l["digest"] for l in kit.ws.app["layers"]] + [layerkit.sha256(open(kit.ws.supervisor, "rb").read())] \
        + [l["digest"] for l in kit.ws.ide["layers"]][1:]
    assert digests(m) == want
    assert m["annotations"]["io.regfacade.workspace.id"] == "demo"
    _, c = config_of(rf, "remote/demo", m)
    assert env_of(c)["PATH"] == "/ide/bin/remote-cli:/ide/bin:" + BASE_PATH
    # an unknown workspace is a clean 404; mirrored images pass through unchanged
    r = get_manifest(rf, "remote/nope", "latest")
    assert r.status == 404 and r.error_codes() == ["NAME_UNKNOWN"], r
    r = get_manifest(rf, "acme/app", "1.0")
    assert r.status == 200 and r.headers["Docker-Content-Digest"] == kit.ws.app["manifest_digest"], r
    ns = containerd.new_namespace()
    try:
        out = ctr_pull_run(containerd, rf, f"{rf.host}/remote/demo:latest",
                           "/.supervisor/supervisor; code; open README; cat /app/hello.txt", ns)
        assert out.splitlines() == [
            f"supervisor: workspace ready (PATH=/ide/bin/remote-cli:/ide/bin:{BASE_PATH})",
            "ide: code 1.2 (EDITOR=/ide/bin/code)",
            "ide: open README",
            "hello from the user's app image",
        ]
        # by digest too (the policy passes a digest through)
        r = containerd.pull(f"{rf.host}/remote/demo@{digest}", namespace=ns, check=False)
        assert r.returncode == 0, f"{r.stderr}\n{diag(rf)}"
    finally:
        containerd.remove_namespace(ns)
